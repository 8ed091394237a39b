"""Dot products of GEM / A-GEM: ``G g`` and the Gram matrix ``G G^T`` in one pass.

GEM (Lopez-Paz & Ranzato 2017) and A-GEM (Chaudhry et al. 2019) keep k reference gradients g_1..g_k of
earlier tasks, the rows of G [k, N]. The projection needs only their inner products with the current
gradient g and with each other:

    (G g)_j = <g_j, g>,    (G G^T)_jl = <g_j, g_l>

so the kernel reads g and the k references once ((k + 1) N values) and reduces all k + k^2 products per
chunk; nothing is flattened or copied, unlike Avalanche, which concatenates every gradient into a vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hft_kernels import _multi_tensor as mt
from hft_kernels.backend import resolve_backend, tl, triton


@triton.jit
def _gem_dots_kernel(
    addrs_ptr,
    numels_ptr,
    chunks_ptr,
    partials_ptr,
    num_tensors,
    grad_w,
    ref_w,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c, t, start, end = mt.chunk_span(chunks_ptr, numels_ptr, CHUNK)
    grad = mt.role_ptr(addrs_ptr, num_tensors, 0, t, grad_w)
    rows = tl.arange(0, K_PAD)
    row_ok = rows < K
    refs = tl.load(addrs_ptr + (1 + rows) * num_tensors + t, mask=row_ok, other=0).to(ref_w.dtype)
    dots = tl.zeros([K_PAD], dtype=tl.float32)
    gram = tl.zeros([K_PAD, K_PAD], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(refs[:, None] + offs[None, :], mask=row_ok[:, None] & mask[None, :], other=0.0).to(tl.float32)
        dots += tl.sum(r * g[None, :], axis=1)
        gram += tl.sum(r[:, None, :] * r[None, :, :], axis=2)
    out = partials_ptr + c * (K_PAD + K_PAD * K_PAD)
    tl.store(out + rows, dots)
    tl.store(out + K_PAD + rows[:, None] * K_PAD + rows[None, :], gram)


def _block(k_pad: int) -> int:
    # The Gram tile holds K_PAD^2 * BLOCK fp32 products; 4096 keeps it in registers at num_warps=4.
    return min(1024, max(32, 4096 // (k_pad * k_pad)))


def _gem_dots_triton(lists: list[list[torch.Tensor]], k: int, device: torch.device) -> torch.Tensor:
    lists, _ = mt.contiguous(lists, written=())
    k_pad = triton.next_power_of_2(k)
    total = torch.zeros(k_pad + k_pad * k_pad, dtype=torch.float32, device=device)
    for launch in mt.launches(lists):
        partials = torch.empty(launch.num_chunks, total.numel(), dtype=torch.float32, device=device)
        _gem_dots_kernel[(launch.num_chunks,)](
            launch.addrs,
            launch.numels,
            launch.chunks,
            partials,
            launch.num_tensors,
            launch.witnesses[0],
            launch.witnesses[1],
            K=k,
            K_PAD=k_pad,
            CHUNK=mt.CHUNK,
            BLOCK=_block(k_pad),
        )
        total += partials.sum(0)
    return torch.cat([total[:k], total[k_pad:].view(k_pad, k_pad)[:k, :k].reshape(-1)])


def _gem_dots_torch(lists: list[list[torch.Tensor]], k: int, device: torch.device) -> torch.Tensor:
    dots = torch.zeros(k, dtype=torch.float32, device=device)
    gram = torch.zeros(k, k, dtype=torch.float32, device=device)
    for grads, *refs in mt.buckets(lists):
        g = mt.flat_f32(grads)
        r = torch.stack([mt.flat_f32(ref) for ref in refs])
        dots += r @ g
        gram += r @ r.T
    return torch.cat([dots, gram.view(-1)])


def check_refs(grads: Sequence[torch.Tensor], refs: Sequence[Sequence[torch.Tensor]]) -> torch.device | None:
    """Validates ``refs`` against ``grads`` (shared with ``gem_project_``).

    Returns:
        The common device, or ``None`` when ``grads`` is empty.

    Raises:
        ValueError: Misaligned lists, or references of one tensor index in different dtypes.
    """
    names = ("grads", *(f"refs[{j}]" for j in range(len(refs))))
    device = mt.check_lists(names, [grads, *refs])
    for j, ref in enumerate(refs[1:], start=1):
        for i, (a, b) in enumerate(zip(ref, refs[0], strict=True)):
            if a.dtype != b.dtype:
                raise ValueError(f"refs[{j}][{i}] is {a.dtype} but refs[0][{i}] is {b.dtype}; use one dtype")
    return device


@torch.no_grad()
def gem_dots(
    grads: Sequence[torch.Tensor],
    refs: Sequence[Sequence[torch.Tensor]],
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``G g`` [k] and ``G G^T`` [k, k] for k reference gradients, in fp32, in one pass.

    Reference path: per bucket, one read of g and of each reference (concatenated into bucket-sized fp32
    buffers) and two small matrix products; no model-sized temporary.

    Args:
        grads: T gradient tensors g, fp32, bf16 or fp16, any shapes, contiguous or not.
        refs: k lists of T tensors, the reference gradients g_1..g_k, each shaped like ``grads`` (fp32;
            bf16 opt-in; one dtype per tensor index).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; ``None`` reads ``HFT_KERNELS_BACKEND``.

    Returns:
        ``(Gg, GGt)``: ``Gg[j] = <g_j, g>`` of shape [k] and ``GGt[j, l] = <g_j, g_l>`` of shape [k, k], fp32
        on the tensors' device (CPU for empty lists). No host sync.

    Example::

        >>> g = [torch.tensor([1.0, 0.0])]
        >>> gem_dots(g, [[torch.tensor([1.0, 1.0])]], backend="torch")
        (tensor([1.]), tensor([[2.]]))
    """
    grads, refs = list(grads), [list(r) for r in refs]
    k = len(refs)
    device = check_refs(grads, refs)
    if device is None or k == 0:
        device = device or torch.device("cpu")
        return torch.zeros(k, device=device), torch.zeros(k, k, device=device)
    impl = _gem_dots_triton if resolve_backend(backend, device) == "triton" else _gem_dots_torch
    out = impl([grads, *refs], k, device)
    return out[:k], out[k:].view(k, k)
