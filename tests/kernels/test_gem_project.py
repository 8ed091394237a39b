import numpy as np
import pytest
import quadprog
import torch
from scipy.optimize import nnls

from hft_kernels import MAX_REFS, gem_project_
from hft_kernels.gem_project import solve_gem_dual
from tests.kernels.cases import (
    BACKENDS,
    DEVICE,
    DTYPES,
    MODEL_MIB,
    SHAPE_IDS,
    TOLERANCES,
    flat64,
    gem_inputs,
    linux_only,
    needs_triton,
    peak_growth_mib,
)


def _nnls_projection(g: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Independent oracle: the dual as non-negative least squares, min_{v>=0} ||G^T v + g||, z = g + G^T v."""
    if g.numel() == 0:
        return g
    v, _ = nnls(G.T.numpy(), -g.numpy(), maxiter=100 * G.shape[0])
    return g + G.T @ torch.from_numpy(v)


def _quadprog_projection(g: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Independent oracle: the primal, min 1/2 ||z - g||^2 s.t. G z >= 0, with quadprog."""
    n = g.numel()
    z = quadprog.solve_qp(np.eye(n), g.numpy(), G.T.numpy().copy(), np.zeros(G.shape[0]))[0]
    return torch.from_numpy(z)


def _check_projection(grads, refs, expected, dtype):
    """g' matches the oracle and satisfies every constraint <g_j, g'> >= -tol ||g_j|| ||g'||."""
    atol, rtol = TOLERANCES[dtype]
    z, G = flat64(grads), torch.stack([flat64(r) for r in refs])
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(z, expected, atol=atol * scale, rtol=rtol)
    slack = G @ z + rtol * G.norm(dim=1) * z.norm()
    assert (slack >= 0).all(), f"constraint violated: {(G @ z).tolist()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHAPE_IDS)
def test_shapes_match_nnls(case, dtype, backend):
    grads, refs = gem_inputs(case, dtype, k=3, kind="conflict")
    before = flat64(grads)
    expected = _nnls_projection(before, torch.stack([flat64(r) for r in refs]))
    gem_project_(grads, refs, backend=backend)
    _check_projection(grads, refs, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["random", "conflict"])
def test_random_instances_match_quadprog(kind, k, backend):
    for seed in range(3):
        grads, refs = gem_inputs("odd", torch.float32, k=k, seed=seed, kind=kind)
        before = flat64(grads)
        expected = _quadprog_projection(before, torch.stack([flat64(r) for r in refs]))
        gem_project_(grads, refs, backend=backend)
        _check_projection(grads, refs, expected, torch.float32)


def _degenerate(name: str):
    gen = torch.Generator().manual_seed(7)
    base = [torch.randn(5, 3, generator=gen), torch.randn(9, generator=gen)]
    g = [-b + 0.1 * torch.randn(b.shape, generator=gen) for b in base]
    other = [torch.randn(b.shape, generator=gen) for b in base]
    if name == "collinear":
        refs = [[s * b for b in base] for s in (1.0, 2.5, 0.1)]
    elif name == "duplicate":
        refs = [base, [b.clone() for b in base], other]
    elif name == "zero_ref":
        refs = [[torch.zeros_like(b) for b in base], base]
    elif name == "all_zero_refs":
        refs = [[torch.zeros_like(b) for b in base]] * 2
    elif name == "zero_g":
        g = [torch.zeros_like(b) for b in base]
        refs = [base, other]
    elif name == "opposite":  # feasible set is the hyperplane <base, z> = 0
        refs = [base, [-b for b in base]]
    return [t.to(DEVICE) for t in g], [[t.to(DEVICE) for t in r] for r in refs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["collinear", "duplicate", "zero_ref", "all_zero_refs", "zero_g", "opposite"])
def test_degenerate_instances_are_finite_and_correct(name, backend):
    grads, refs = _degenerate(name)
    before = flat64(grads)
    expected = _nnls_projection(before, torch.stack([flat64(r) for r in refs]))
    v = gem_project_(grads, refs, backend=backend)
    assert torch.isfinite(v).all() and (v >= 0).all()
    _check_projection(grads, refs, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_satisfied_constraints_leave_g_unchanged(backend):
    grads, refs = gem_inputs("odd", torch.float32, k=3, kind="conflict")
    grads = [-g for g in grads]  # now aligned with the references
    before = [g.clone() for g in grads]
    v = gem_project_(grads, refs, backend=backend)
    assert torch.equal(v, torch.zeros(3, device=DEVICE))
    assert all(torch.equal(g, b) for g, b in zip(grads, before, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_k1_is_the_agem_closed_form(backend):
    grads, refs = gem_inputs("odd", torch.float32, k=1, kind="conflict")
    g, r = flat64(grads), flat64(refs[0])
    v_expected = max(0.0, float(-(g @ r) / (r @ r)))
    assert v_expected > 0
    v = gem_project_(grads, refs, backend=backend)
    torch.testing.assert_close(v.double().cpu(), torch.tensor([v_expected], dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(flat64(grads), g + v_expected * r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["grads", "refs"])
def test_non_finite_input_reports_nan_and_leaves_g(where, backend):
    grads, refs = gem_inputs("odd", torch.float32, k=2, kind="conflict")
    (grads if where == "grads" else refs[1])[0].view(-1)[4] = float("nan")
    before = [g.clone() for g in grads]
    v = gem_project_(grads, refs, backend=backend)
    assert torch.isnan(v).all()
    assert all(torch.equal(g, b) for g, b in zip(grads, before, strict=True) if torch.isfinite(b).all())
    assert torch.equal(grads[0].isnan(), before[0].isnan())


def test_dual_solver_against_quadprog_on_ill_conditioned_gram():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, generator=gen, dtype=torch.float64)
    G = base + 1e-3 * torch.randn(6, 64, generator=gen, dtype=torch.float64)
    g = -base + 0.2 * torch.randn(64, generator=gen, dtype=torch.float64)
    v = solve_gem_dual((G @ G.T).float(), (G @ g).float()).double()
    torch.testing.assert_close(g + G.T @ v, _quadprog_projection(g, G), atol=1e-5, rtol=1e-5)


def _project_half(rank: int, init_file: str, grads, refs, out: str) -> None:
    """Process ``rank`` of 2: projects its half of every (flattened) tensor, the dot products summed over both."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    half = lambda tensors: [t.reshape(-1).tensor_split(2)[rank].clone() for t in tensors]  # noqa: E731
    grads, refs = half(grads), [half(ref) for ref in refs]
    v = gem_project_(grads, refs, backend="torch", process_group=torch.distributed.group.WORLD)
    torch.save({"grads": grads, "v": v}, f"{out}{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_sharded_projection_equals_the_unsharded_one(k, tmp_path):
    """Two gloo processes, each holding half of g and of the references (as FSDP2 shards them)."""
    grads, refs = gem_inputs("odd", torch.float32, k=k, kind="conflict")
    out = str(tmp_path / "rank")
    torch.multiprocessing.spawn(_project_half, (str(tmp_path / "init"), grads, refs, out), nprocs=2)
    halves = [torch.load(f"{out}{rank}.pt") for rank in (0, 1)]
    expected = [g.clone() for g in grads]
    v = gem_project_(expected, refs, backend="torch")
    assert (v > 0).any()  # the instance has active constraints: the projection moves g
    for half in halves:
        torch.testing.assert_close(half["v"], v, rtol=1e-5, atol=1e-7)
    for i, g in enumerate(expected):
        joined = torch.cat([halves[0]["grads"][i], halves[1]["grads"][i]])
        torch.testing.assert_close(joined, g.reshape(-1), rtol=1e-5, atol=1e-6)


def test_too_many_references_are_rejected():
    refs = [[torch.ones(2)] for _ in range(MAX_REFS + 1)]
    with pytest.raises(ValueError, match=f"supports at most {MAX_REFS}"):
        gem_project_([torch.ones(2)], refs)


def test_no_references_is_a_no_op():
    g = [torch.ones(3)]
    assert gem_project_(g, []).shape == (0,)
    assert torch.equal(g[0], torch.ones(3))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference(dtype):
    grads, refs = gem_inputs("mixed", dtype, k=3, seed=5, kind="conflict")
    grads_ref = [g.clone() for g in grads]
    v = gem_project_(grads, refs, backend="triton")
    v_ref = gem_project_(grads_ref, refs, backend="torch")
    torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-6)
    atol, rtol = TOLERANCES[dtype]
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda():
    grads, refs = gem_inputs("mixed", torch.float32, k=4, kind="conflict")
    gem_project_(grads, refs)  # warm-up: compiles the kernels and uploads the launch tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        v = gem_project_(grads, refs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(v).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captures_in_a_cuda_graph():
    """A step that is a CUDA graph replays the projection: no host sync, no host-dependent branch."""
    grads, refs = gem_inputs("mixed", torch.float32, k=4, kind="conflict")
    saved = [g.clone() for g in grads]
    expected = [g.clone() for g in grads]
    v_expected = gem_project_(expected, refs, backend="torch")
    gem_project_(grads, refs)  # warm-up on the captured tensors: compiles the kernels, caches the launch table
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        v = gem_project_(grads, refs)
    torch._foreach_copy_(grads, saved)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(v, v_expected, rtol=1e-4, atol=1e-6)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@linux_only
def test_reference_allocates_no_model_sized_temporary():
    build = "[[torch.full((n,), v) for n in sizes] for v in (-1.0, 1.0, 0.5)]"
    op = "from hft_kernels import gem_project_; gem_project_(lists[0], lists[1:])"
    growth = peak_growth_mib(build, op)
    assert growth < MODEL_MIB / 4, f"reference grew the peak by {growth:.1f} MiB on a {MODEL_MIB} MiB model"
