import pytest
import torch

from hft_kernels import fisher_accumulate_
from tests.kernels.cases import (
    BACKENDS,
    DTYPES,
    MODEL_MIB,
    SHAPE_IDS,
    assert_lists_close,
    linux_only,
    make_list,
    needs_triton,
    peak_growth_mib,
)

DECAY, SCALE = 0.9, 0.25


def _inputs(case: str, dtype: torch.dtype, seed: int = 0, store: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    fisher = [f.to(store) for f in make_list(case, torch.float32, gen, fn=torch.rand)]
    return fisher, make_list(case, dtype, gen)


def _oracle(fisher, grads):
    return [DECAY * f.double() + SCALE * g.double() ** 2 for f, g in zip(fisher, grads, strict=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHAPE_IDS)
def test_matches_oracle(case, dtype, backend):
    fisher, grads = _inputs(case, dtype)
    expected = _oracle(fisher, grads)
    grads_before = [g.clone() for g in grads]
    fisher_accumulate_(fisher, grads, DECAY, SCALE, backend=backend)
    assert_lists_close(fisher, expected, torch.float32)
    assert all(torch.equal(g, b) for g, b in zip(grads, grads_before, strict=True))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["odd", "mixed", "noncontig"])
def test_triton_matches_reference(case, dtype):
    fisher, grads = _inputs(case, dtype, seed=1)
    fisher_ref = [f.clone() for f in fisher]
    fisher_accumulate_(fisher, grads, DECAY, SCALE, backend="triton")
    fisher_accumulate_(fisher_ref, grads, DECAY, SCALE, backend="torch")
    assert_lists_close(fisher, fisher_ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_storage_opt_in(backend):
    fisher, grads = _inputs("odd", torch.float32, store=torch.bfloat16)
    expected = _oracle(fisher, grads)
    fisher_accumulate_(fisher, grads, DECAY, SCALE, backend=backend)
    assert_lists_close(fisher, expected, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_grad_propagates_into_fisher_only(backend):
    fisher, grads = _inputs("odd", torch.float32)
    grads[0].view(-1)[2] = float("nan")
    grads[1][0] = float("inf")
    fisher_accumulate_(fisher, grads, DECAY, SCALE, backend=backend)
    assert torch.isnan(fisher[0].view(-1)[2])
    assert torch.isinf(fisher[1][0])
    assert sum((~torch.isfinite(f)).sum().item() for f in fisher) == 2


def test_empty_lists_are_a_no_op():
    fisher_accumulate_([], [], DECAY, SCALE)


@linux_only
def test_reference_allocates_no_model_sized_temporary():
    build = "[[torch.full((n,), v) for n in sizes] for v in (1.0, 0.5)]"
    growth = peak_growth_mib(build, "from hft_kernels import fisher_accumulate_; fisher_accumulate_(*lists, 0.9, 0.1)")
    assert growth < MODEL_MIB / 4, f"reference grew the peak by {growth:.1f} MiB on a {MODEL_MIB} MiB model"
