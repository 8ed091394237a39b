"""``linear_kl_div``: the chunked KL equals the one-shot formula in value and gradient, and peaks far lower."""

import pytest
import torch

from hft_kernels import linear_kl_div, linear_kl_div_reference
from tests.kernels.cases import DEVICE, linux_only, peak_growth_mib
from tests.kernels.cases import TOLERANCES as STORED

# (value rtol, gradient atol) against the fp64 oracle. bf16: the reference head's matmul rounds its logits to bf16
# (as the trained model's head does under autocast), about 4e-3 relative on each logit.
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (5e-2, 2e-3)}

# (M logits rows, N rows taken or None for all, V, H, chunk_size)
SHAPES = {
    "one_row": (1, None, 7, 3, 4),
    "one_class": (5, None, 1, 3, 2),  # V = 1: both distributions are [1.0], KL = 0
    "chunk_1": (6, None, 11, 5, 1),
    "odd_chunks": (23, 17, 33, 9, 5),  # a last partial chunk
    "exact_chunks": (16, 12, 64, 8, 4),
    "one_chunk": (9, 4, 50, 6, 1024),
    "no_rows": (4, 0, 10, 3, 2),
    "wide_vocab": (8, 6, 3001, 16, 4),
}


def _inputs(shape, dtype, bias: bool, seed=0, noncontig=False):
    m, n, v, h, chunk = shape
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn((v, m) if noncontig else (m, v), generator=gen)).to(DEVICE, dtype)
    logits = (logits.t() if noncontig else logits).requires_grad_()
    rows = None if n is None else torch.randperm(m, generator=gen)[:n].to(DEVICE)
    hidden = torch.randn((m if n is None else n, h), generator=gen).to(DEVICE, dtype)
    weight = torch.randn((v, h), generator=gen).to(DEVICE, dtype)
    b = torch.randn(v, generator=gen).to(DEVICE, dtype) if bias else None
    return logits, hidden, weight, b, rows, chunk


def _oracle(logits, hidden, weight, bias, rows):
    """sum_n sum_v p_ref (log p_ref - log p) in fp64 with autograd, the reference head rounded as the op's input."""
    z = logits.detach().double().requires_grad_()
    ref = torch.nn.functional.linear(hidden, weight, bias).double()  # the head's output in its own dtype
    taken = z if rows is None else z[rows]
    log_ref, log_p = torch.log_softmax(ref, -1), torch.log_softmax(taken, -1)
    value = (log_ref.exp() * (log_ref - log_p)).sum()
    value.backward()
    return value.detach(), z.grad


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_value_and_gradient_equal_the_fp64_oracle(shape, bias, dtype):
    logits, hidden, weight, b, rows, chunk = _inputs(shape, dtype, bias)
    value = linear_kl_div(logits, hidden, weight, b, rows, chunk_size=chunk)
    value.backward()
    expected, expected_grad = _oracle(logits, hidden, weight, b, rows)
    rtol, atol = TOLERANCES[dtype]
    assert value.dtype == torch.float32 and logits.grad.dtype == dtype
    torch.testing.assert_close(value.double().cpu(), expected.cpu(), rtol=rtol, atol=1e-5)
    torch.testing.assert_close(logits.grad.double().cpu(), expected_grad.cpu(), rtol=rtol, atol=atol)
    if rows is not None:  # rows not taken get no gradient
        untouched = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        untouched[rows] = False
        assert (logits.grad[untouched] == 0).all()


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["fp32", "bf16"])
def test_chunked_equals_one_shot_kl_div_with_autograd(dtype):
    """Against ``torch.nn.functional.kl_div`` in the same dtypes, a non-contiguous logits tensor, a scaled loss."""
    logits, hidden, weight, b, rows, _ = _inputs((20, 13, 97, 8, None), dtype, bias=True, seed=1, noncontig=True)
    assert not logits.is_contiguous()
    (2.5 * linear_kl_div(logits, hidden, weight, b, rows, chunk_size=3)).backward()
    chunked = logits.grad.clone()
    logits.grad = None
    reference = linear_kl_div_reference(logits, hidden, weight, b, rows)
    (2.5 * reference).backward()
    atol, rtol = STORED[dtype]  # both gradients are rounded to the logits' dtype once
    torch.testing.assert_close(chunked, logits.grad, rtol=rtol, atol=atol)
    value = linear_kl_div(logits.detach(), hidden, weight, b, rows, chunk_size=3)
    torch.testing.assert_close(value, reference.detach(), rtol=1e-5, atol=1e-6)


def test_equal_distributions_give_zero_and_no_gradient_reaches_the_reference():
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(6, 4, generator=gen), torch.randn(9, 4, generator=gen, requires_grad=True)
    logits = (hidden @ weight.detach().T).requires_grad_()
    value = linear_kl_div(logits, hidden, weight, chunk_size=4)
    value.backward()
    assert abs(float(value.detach())) < 1e-6 and logits.grad.abs().max() < 1e-6 and weight.grad is None


def test_backward_twice_is_refused():
    logits, hidden, weight, b, rows, chunk = _inputs(SHAPES["odd_chunks"], torch.float32, bias=False)
    value = linear_kl_div(logits, hidden, weight, b, rows, chunk_size=chunk)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same call twice"):
        value.backward()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"chunk_size": 0}, r"chunk_size=0\): chunk_size must be > 0"),
        ({"rows": torch.arange(3)}, "3 rows taken but hidden has 4 rows"),
        ({"weight": torch.zeros(5, 3)}, r"weight \(5, 3\) .* does not map hidden size 3 to the 7 logits"),
        ({"bias": torch.zeros(5)}, r"bias \(5,\)"),
        ({"logits": torch.zeros(4, 7, 1)}, "must be 2-d"),
    ],
)
def test_bad_shapes_are_named(change, message):
    arguments = {"logits": torch.zeros(4, 7), "hidden": torch.zeros(4, 3), "weight": torch.zeros(7, 3), **change}
    with pytest.raises(ValueError, match=message):
        linear_kl_div(**arguments)


# 4096 rows x 2048 logits: one fp32 [rows, vocab] tensor is 32 MiB (MODEL_MIB / 2).
_BUILD = (
    "(torch.full((sizes[0] >> 11, 2048), 0.5, requires_grad=True), torch.full((sizes[0] >> 11, 64), 0.1), "
    "torch.full((2048, 64), 0.01))"
)


@linux_only
def test_chunked_peak_memory_is_the_gradient_and_one_chunk_not_several_full_tensors():
    """Forward and backward: one-shot keeps ~6 [rows, vocab] tensors at its peak; chunked adds 1 and one chunk's."""
    chunked = peak_growth_mib(
        _BUILD, "from hft_kernels import linear_kl_div; linear_kl_div(*lists, chunk_size=256).backward()"
    )
    one_shot = peak_growth_mib(
        _BUILD, "from hft_kernels import linear_kl_div_reference; linear_kl_div_reference(*lists).backward()"
    )
    full = 32.0
    assert chunked < 2 * full  # the gradient (which becomes logits.grad) plus a few chunks of 256 rows (8 MiB)
    assert one_shot > 4 * full
