import pytest
import torch

from hft_kernels import ewc_penalty_
from tests.kernels.cases import (
    BACKENDS,
    DEVICE,
    DTYPES,
    MODEL_MIB,
    SHAPE_IDS,
    assert_close,
    assert_lists_close,
    linux_only,
    make,
    make_list,
    needs_triton,
    peak_growth_mib,
)

LAM = 0.7


def _inputs(case: str, dtype: torch.dtype, seed: int = 0, store: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = make_list(case, dtype, gen)
    anchors = [(p.float() + 0.1 * make(p.shape, torch.float32, gen, False)).to(store) for p in params]
    fisher = [make(p.shape, store, gen, False, fn=torch.rand) for p in params]
    grads = make_list(case, dtype, gen)
    return params, anchors, fisher, grads


def _autograd_oracle(params, anchors, fisher, grads):
    """Eager penalty in fp64 and its autograd gradient added to the incoming gradients."""
    theta = [p.double().requires_grad_() for p in params]
    penalty = sum(
        (LAM / 2 * (f.double() * (t - a.double()) ** 2).sum() for t, a, f in zip(theta, anchors, fisher, strict=True)),
        torch.zeros((), dtype=torch.float64),
    )
    dtheta = torch.autograd.grad(penalty, theta, allow_unused=True) if theta else []
    return penalty.detach(), [g.double() + d for g, d in zip(grads, dtheta, strict=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHAPE_IDS)
def test_matches_autograd(case, dtype, backend):
    params, anchors, fisher, grads = _inputs(case, dtype)
    expected_penalty, expected_grads = _autograd_oracle(params, anchors, fisher, grads)
    penalty = ewc_penalty_(params, anchors, fisher, grads, LAM, backend=backend)
    assert penalty.dtype == torch.float32 and penalty.dim() == 0
    assert_close(penalty, expected_penalty, torch.float32)
    assert_lists_close(grads, expected_grads, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["odd", "mixed", "noncontig"])
def test_triton_matches_reference(case, dtype):
    params, anchors, fisher, grads = _inputs(case, dtype, seed=1)
    grads_ref = [g.clone() for g in grads]
    penalty = ewc_penalty_(params, anchors, fisher, grads, LAM, backend="triton")
    penalty_ref = ewc_penalty_(params, anchors, fisher, grads_ref, LAM, backend="torch")
    assert_close(penalty, penalty_ref, torch.float32)
    assert_lists_close(grads, grads_ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_storage_opt_in(backend):
    params, anchors, fisher, grads = _inputs("odd", torch.float32, store=torch.bfloat16)
    expected_penalty, expected_grads = _autograd_oracle(params, anchors, fisher, grads)
    penalty = ewc_penalty_(params, anchors, fisher, grads, LAM, backend=backend)
    assert_close(penalty, expected_penalty, torch.float32)
    assert_lists_close(grads, expected_grads, torch.float32)
    assert all(a.dtype == torch.bfloat16 for a in anchors)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_fisher_is_reported_not_spread(backend):
    params, anchors, fisher, grads = _inputs("odd", torch.float32)
    fisher[0].view(-1)[3] = float("nan")
    fisher[2].view(-1)[0] = float("inf")
    before = [g.clone() for g in grads]
    penalty = ewc_penalty_(params, anchors, fisher, grads, LAM, backend=backend)
    assert not torch.isfinite(penalty)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0].view(-1)[3] == before[0].view(-1)[3]
    assert grads[2].view(-1)[0] == before[2].view(-1)[0]
    clean = [f.nan_to_num(0.0, 0.0, 0.0) for f in fisher]
    _, expected = _autograd_oracle(params, anchors, clean, before)
    assert_lists_close(grads, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_grad_stays_and_penalty_is_finite(backend):
    params, anchors, fisher, grads = _inputs("odd", torch.float32)
    grads[1][4] = float("nan")
    penalty = ewc_penalty_(params, anchors, fisher, grads, LAM, backend=backend)
    assert torch.isfinite(penalty)
    assert torch.isnan(grads[1][4])
    assert torch.isfinite(grads[1][:4]).all()


def test_empty_lists_give_zero():
    assert ewc_penalty_([], [], [], [], LAM).item() == 0.0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a, f, g: a.pop(), "anchors has 2 tensors but params has 3"),
        (lambda a, f, g: f.__setitem__(1, torch.zeros(2, device=DEVICE)), r"fisher\[1\] has shape \(2,\)"),
        (lambda a, f, g: g.__setitem__(0, torch.zeros(3, 5, dtype=torch.long, device=DEVICE)), r"grads\[0\] has dtype"),
    ],
)
def test_rejects_misaligned_lists(mutate, message):
    params, anchors, fisher, grads = _inputs("odd", torch.float32)
    mutate(anchors, fisher, grads)
    with pytest.raises(ValueError, match=message):
        ewc_penalty_(params, anchors, fisher, grads, LAM, backend="torch")


@linux_only
@pytest.mark.parametrize("parameters", [False, True], ids=["tensors", "parameters"])
def test_reference_allocates_no_model_sized_temporary(parameters):
    # a model's parameters require grad: the op must build no autograd graph (it would keep every bucket alive)
    tensor = f"torch.full((n,), v).requires_grad_({parameters} and v == 1.0)"  # v == 1.0: the parameters
    build = f"[[{tensor} for n in sizes] for v in (1.0, 0.5, 2.0, 0.0)]"
    growth = peak_growth_mib(build, "from hft_kernels import ewc_penalty_; ewc_penalty_(*lists, lam=1.0)")
    assert growth < MODEL_MIB / 4, f"reference grew the peak by {growth:.1f} MiB on a {MODEL_MIB} MiB model"


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_that_require_grad_give_a_penalty_without_a_graph(backend):
    params, anchors, fisher, grads = _inputs("mixed", torch.float32)
    params = [torch.nn.Parameter(p) for p in params]
    penalty = ewc_penalty_(params, anchors, fisher, grads, LAM, backend=backend)
    assert penalty.grad_fn is None and not penalty.requires_grad
