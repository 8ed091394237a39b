"""GEM / A-GEM gradient projection, solved on the device without a host round trip.

GEM (Lopez-Paz & Ranzato 2017) replaces the gradient g by the closest vector that does not increase the
loss of earlier tasks, given their reference gradients, the rows of G [k, N]:

    min_z 1/2 ||z - g||^2   s.t.   G z >= 0

through its dual, a k-dimensional non-negative QP:

    v* = argmin_{v >= 0} 1/2 v^T (G G^T) v + v^T (G g),      z = g + G^T v*

A-GEM (Chaudhry et al. 2019) is the case k = 1: ``v = max(0, -<g, r> / <r, r>)``. When no constraint is
violated, v* = 0 and g is unchanged.

Avalanche flattens every gradient, copies them to the host and calls quadprog. Here ``gem_dots`` reduces
``G g`` and ``G G^T`` in one pass, the QP is solved by device tensor ops, and ``g += G^T v`` is a second
pass that only reads the references with ``v_j > 0``: at most (2k + 3) N values move, with no ``.item()``,
no ``.cpu()`` and no data-dependent Python control flow, so the op can be captured in a CUDA graph.

The QP solver is exact active-set enumeration: for each of the 2^k supports S, the stationary point of the
objective on {v_S >= 0, v_rest = 0} is one SPD solve; each candidate is clipped to v >= 0 (so all are
feasible) and the one with the lowest objective is v*, because the optimum is the candidate of its own
support. All 2^k solves run as one batched fixed-length Gauss-Jordan elimination in float64, after a
Jacobi scaling to a unit diagonal plus a ridge of 1e-10 that keeps collinear references solvable. Cost
grows as 2^k k^3 (4096 12x12 systems at the limit ``MAX_REFS = 12``), nothing next to the passes over
N. Unlike a fixed number of projected-gradient or coordinate-descent sweeps, whose error on correlated
references stayed above 1e-3 after 256 sweeps in our trials, the result is exact up to the ridge: the tests
match quadprog (primal) and scipy's NNLS (dual) within 1e-5 relative in fp32, degenerate instances included.

Degenerate inputs: a zero reference has no constraint and gets v_j = 0; collinear references share the
projection; a zero g gives v = 0. Non-finite values: a NaN or Inf in g or in the references makes v NaN
(returned for logging) and no reference is added, so g keeps its values; the references are assumed finite
(check them once when storing them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hft_kernels import _multi_tensor as mt
from hft_kernels.backend import resolve_backend, tl, triton
from hft_kernels.gem_dots import check_refs, gem_dots

MAX_REFS = 12
_RIDGE = 1e-10


@triton.jit
def _gem_update_kernel(
    addrs_ptr,
    numels_ptr,
    chunks_ptr,
    v_ptr,
    num_tensors,
    grad_w,
    ref_w,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, t, start, end = mt.chunk_span(chunks_ptr, numels_ptr, CHUNK)
    rows = tl.arange(0, K_PAD)
    v = tl.load(v_ptr + rows, mask=rows < K, other=0.0)
    active = (rows < K) & (v > 0.0)  # NaN > 0 is false: a failed solve adds nothing
    if tl.max(active.to(tl.int32), axis=0) > 0:
        grad = mt.role_ptr(addrs_ptr, num_tensors, 0, t, grad_w)
        refs = tl.load(addrs_ptr + (1 + rows) * num_tensors + t, mask=active, other=0).to(ref_w.dtype)
        w = tl.where(active, v, 0.0)
        for off in range(start, end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            mask = offs < end
            r = tl.load(refs[:, None] + offs[None, :], mask=active[:, None] & mask[None, :], other=0.0)
            g = tl.load(grad + offs, mask=mask).to(tl.float32)
            g += tl.sum(w[:, None] * r.to(tl.float32), axis=0)
            tl.store(grad + offs, g.to(grad.dtype.element_ty), mask=mask)


def _update_triton(lists: list[list[torch.Tensor]], v: torch.Tensor) -> None:
    lists, pending = mt.contiguous(lists, written=(0,))
    k = v.numel()
    k_pad = triton.next_power_of_2(k)
    for launch in mt.launches(lists):
        _gem_update_kernel[(launch.num_chunks,)](
            launch.addrs,
            launch.numels,
            launch.chunks,
            v,
            launch.num_tensors,
            launch.witnesses[0],
            launch.witnesses[1],
            K=k,
            K_PAD=k_pad,
            CHUNK=mt.CHUNK,
            BLOCK=max(32, 1024 // k_pad),
        )
    mt.write_back(pending)


def _update_torch(lists: list[list[torch.Tensor]], v: torch.Tensor) -> None:
    inactive = ~(v > 0)[:, None]  # NaN counts as inactive, as in the kernel
    w = v.masked_fill(inactive[:, 0], 0.0)
    for grads, *refs in mt.buckets(lists):
        r = torch.stack([mt.flat_f32(ref) for ref in refs]).masked_fill_(inactive, 0.0)
        mt.copy_flat_(grads, mt.flat_f32(grads).add_(w @ r))


def _spd_solve(m: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solves a batch of SPD systems ``m x = rhs`` ([B, k, k], [B, k]) by Gauss-Jordan without pivoting.

    A fixed loop of k eliminations of plain tensor ops: no info checks, hence no host sync (unlike the error
    checking of ``torch.linalg.solve``), and the same arithmetic on every device.
    """
    m, x = m.clone(), rhs.clone()
    for i in range(m.shape[-1]):
        pivot = m[:, i, i]
        row = m[:, i, :] / pivot[:, None]
        xi = x[:, i] / pivot
        col = m[:, :, i].clone()
        col[:, i] = 0.0
        m -= col[:, :, None] * row[:, None, :]
        x -= col * xi[:, None]
        m[:, i, :] = row
        x[:, i] = xi
    return x


def solve_gem_dual(gram: torch.Tensor, dots: torch.Tensor) -> torch.Tensor:
    """Solves ``min_{v >= 0} 1/2 v^T A v + v^T b`` for ``A = G G^T`` [k, k] and ``b = G g`` [k] on their device.

    Returns:
        v* [k] in fp32: NaN when ``gram`` or ``dots`` holds a non-finite value.
    """
    k = dots.numel()
    a, b = gram.double(), dots.double()
    finite = torch.isfinite(a).all() & torch.isfinite(b).all()
    diag = a.diagonal()
    scale = torch.where(diag > 0, diag.rsqrt(), 0.0)  # zero references drop out with v_j = 0
    a = a * scale[:, None] * scale[None, :]
    b = b * scale
    if k == 1:  # A-GEM closed form, what the enumeration below reduces to, in one op instead of ~40.
        u = (-b / (a[0] + _RIDGE)).clamp_min(0.0)
    else:
        support = ((torch.arange(2**k, device=a.device)[:, None] >> torch.arange(k, device=a.device)) & 1).double()
        eye = torch.eye(k, dtype=a.dtype, device=a.device)
        system = support[:, :, None] * a * support[:, None, :] + torch.diag_embed(1.0 - support) + _RIDGE * eye
        candidates = _spd_solve(system, -support * b).clamp_min(0.0)
        objective = 0.5 * ((candidates @ a) * candidates).sum(1) + candidates @ b
        u = candidates.index_select(0, objective.argmin().view(1))[0]
    return torch.where(finite, u * scale, torch.nan).float()


@torch.no_grad()
def gem_project_(
    grads: Sequence[torch.Tensor],
    refs: Sequence[Sequence[torch.Tensor]],
    backend: str | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """Projects ``grads`` in place so that no reference gradient's loss increases (GEM; A-GEM for k = 1).

    ``g += G^T v*`` with ``v* = argmin_{v >= 0} 1/2 v^T G G^T v + v^T G g``: afterwards ``<g_j, g> >= 0``
    for every reference (up to the rounding of g to its dtype), and g is unchanged when that already held.
    Two passes over memory (``gem_dots``, then the update; the Triton update does not read references with
    ``v_j = 0``, nor anything when v = 0) and a k x k solve on the device; no host sync. Reference path:
    per bucket, the same two passes on bucket-sized fp32 buffers; no model-sized temporary.

    Args:
        grads: T gradient tensors g, fp32, bf16 or fp16, any shapes, contiguous or not; updated in place.
        refs: k <= ``MAX_REFS`` lists of T tensors, the reference gradients, each shaped like ``grads``
            (fp32; bf16 opt-in; one dtype per tensor index).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; ``None`` reads ``HFT_KERNELS_BACKEND``.
        process_group: When g and the references are sharded over the processes of this group (each passes its
            shards, FSDP2), the k + k^2 dot products are summed over the group (one all-reduce) before the solve,
            so every process finds the v* of the whole vectors and projects its shards as the unsharded g would
            be. Every process of the group must call it.

    Returns:
        The dual solution v* [k], fp32, on the device: zero where constraint j was inactive, NaN if g or a
        reference was non-finite (then g is left as it was). ``(v > 0).any()`` says whether g moved.

    Raises:
        ValueError: More than ``MAX_REFS`` references, or misaligned lists.

    Example::

        >>> g = [torch.tensor([1.0, -1.0])]
        >>> gem_project_(g, [[torch.tensor([0.0, 1.0])]], backend="torch")
        tensor([1.])
        >>> g[0]
        tensor([1., 0.])
    """
    grads, refs = list(grads), [list(r) for r in refs]
    k = len(refs)
    if k > MAX_REFS:
        raise ValueError(f"refs has {k} reference gradients; gem_project_ supports at most {MAX_REFS}")
    device = check_refs(grads, refs)
    if device is None or k == 0:
        return torch.zeros(k, device=device or torch.device("cpu"))
    backend = resolve_backend(backend, device)
    dots, gram = gem_dots(grads, refs, backend=backend)
    if process_group is not None:
        summed = torch.cat([dots, gram.view(-1)])
        torch.distributed.all_reduce(summed, group=process_group)
        dots, gram = summed[:k], summed[k:].view(k, k)
    v = solve_gem_dual(gram, dots)
    update = _update_triton if backend == "triton" else _update_torch
    update([grads, *refs], v)
    return v
