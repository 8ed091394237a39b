import pytest
import torch

from hft_kernels import gem_dots
from tests.kernels.cases import BACKENDS, DTYPES, SHAPE_IDS, flat64, gem_inputs, needs_triton


def _assert_matches_oracle(grads, refs, dots, gram):
    g = flat64(grads)
    G = torch.stack([flat64(r) for r in refs])
    # fp32 accumulation: error bounded relative to the sum of |products|, the dot's condition.
    dots, gram = dots.double().cpu(), gram.double().cpu()
    torch.testing.assert_close(dots, G @ g, atol=1e-6 + 1e-5 * (G.abs() @ g.abs()).max(), rtol=1e-5)
    torch.testing.assert_close(gram, G @ G.T, atol=1e-6 + 1e-5 * (G.abs() @ G.abs().T).max(), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHAPE_IDS)
def test_matches_oracle(case, dtype, backend):
    grads, refs = gem_inputs(case, dtype, k=3)
    before = [g.clone() for g in grads]
    dots, gram = gem_dots(grads, refs, backend=backend)
    assert dots.shape == (3,) and gram.shape == (3, 3)
    assert dots.dtype == gram.dtype == torch.float32
    _assert_matches_oracle(grads, refs, dots, gram)
    assert all(torch.equal(g, b) for g, b in zip(grads, before, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_number_of_references(k, backend):
    grads, refs = gem_inputs("odd", torch.float32, k=k, seed=k)
    _assert_matches_oracle(grads, refs, *gem_dots(grads, refs, backend=backend))


@needs_triton
@pytest.mark.parametrize("case", ["mixed", "noncontig"])
def test_triton_matches_reference(case):
    grads, refs = gem_inputs(case, torch.bfloat16, k=4, seed=3)
    for ours, ref in zip(gem_dots(grads, refs, backend="triton"), gem_dots(grads, refs, backend="torch"), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_references(backend):
    grads, refs = gem_inputs("odd", torch.float32, k=2)
    refs = [[t.bfloat16() for t in r] for r in refs]
    _assert_matches_oracle(grads, refs, *gem_dots(grads, refs, backend=backend))


def test_no_references_or_tensors():
    dots, gram = gem_dots([torch.ones(3)], [])
    assert dots.shape == (0,) and gram.shape == (0, 0)
    dots, gram = gem_dots([], [[], []])
    assert torch.equal(dots, torch.zeros(2)) and torch.equal(gram, torch.zeros(2, 2))


def test_rejects_mixed_reference_dtypes():
    grads, refs = gem_inputs("odd", torch.float32, k=2)
    refs[1][0] = refs[1][0].bfloat16()
    with pytest.raises(ValueError, match=r"refs\[1\]\[0\] is torch.bfloat16 but refs\[0\]\[0\] is torch.float32"):
        gem_dots(grads, refs)
