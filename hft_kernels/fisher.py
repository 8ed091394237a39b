"""Diagonal Fisher accumulation for EWC and online EWC (Kirkpatrick et al. 2017; Schwarz et al. 2018).

    F_i <- decay * F_i + scale * g_i^2

With ``decay = 1`` and ``scale = 1/num_batches`` this averages squared gradients over a consolidation
pass (the empirical Fisher diagonal); online EWC keeps one running Fisher with ``decay < 1``. The kernel
reads F and g once and writes F once (12 bytes per fp32 parameter), in fp32 whatever the storage dtypes.

Non-finite values follow IEEE arithmetic: a NaN or Inf gradient makes its F_i NaN or Inf. F never touches
the parameters directly, and ``ewc_penalty_`` drops non-finite terms from the gradient while its returned
penalty reports them, so a corrupt Fisher is visible in the logged penalty and never reaches the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hft_kernels import _multi_tensor as mt
from hft_kernels.backend import resolve_backend, tl, triton

_BLOCK = 1024


@triton.jit
def _fisher_kernel(
    addrs_ptr,
    numels_ptr,
    chunks_ptr,
    num_tensors,
    decay,
    scale,
    fisher_w,
    grad_w,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, t, start, end = mt.chunk_span(chunks_ptr, numels_ptr, CHUNK)
    fisher = mt.role_ptr(addrs_ptr, num_tensors, 0, t, fisher_w)
    grad = mt.role_ptr(addrs_ptr, num_tensors, 1, t, grad_w)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        f = tl.load(fisher + offs, mask=mask).to(tl.float32)
        g = tl.load(grad + offs, mask=mask).to(tl.float32)
        tl.store(fisher + offs, (decay * f + scale * g * g).to(fisher.dtype.element_ty), mask=mask)


def _fisher_triton(lists: list[list[torch.Tensor]], decay: float, scale: float) -> None:
    lists, pending = mt.contiguous(lists, written=(0,))
    for launch in mt.launches(lists):
        _fisher_kernel[(launch.num_chunks,)](
            launch.addrs,
            launch.numels,
            launch.chunks,
            launch.num_tensors,
            decay,
            scale,
            *launch.witnesses,
            CHUNK=mt.CHUNK,
            BLOCK=_BLOCK,
        )
    mt.write_back(pending)


def _fisher_torch(lists: list[list[torch.Tensor]], decay: float, scale: float) -> None:
    for fisher, grads in mt.buckets(lists):
        g = mt.flat_f32(grads)
        mt.copy_flat_(fisher, torch.addcmul(mt.flat_f32(fisher).mul_(decay), g, g, value=scale))


@torch.no_grad()
def fisher_accumulate_(
    fisher: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    decay: float,
    scale: float,
    backend: str | None = None,
) -> None:
    """Updates the Fisher diagonal in place: ``F = decay * F + scale * g^2``.

    Computed in fp32 and rounded once to F's dtype. Reference path: per bucket, 2 reads (F, g) and
    1 write (F) of every element; temporaries are bucket-sized fp32 buffers, never model-sized.

    Args:
        fisher: T Fisher tensors, fp32 (bf16 opt-in), updated in place.
        grads: T gradients shaped like ``fisher``, fp32, bf16 or fp16, contiguous or not.
        decay: Factor on the running Fisher (1 to accumulate, < 1 for online EWC).
        scale: Factor on the squared gradient (e.g. 1 / number of batches).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; ``None`` reads ``HFT_KERNELS_BACKEND``.

    Example::

        >>> f = [torch.ones(2)]
        >>> fisher_accumulate_(f, [torch.tensor([1.0, 2.0])], decay=0.5, scale=0.25, backend="torch")
        >>> f[0]
        tensor([0.7500, 1.5000])
    """
    lists = [list(fisher), list(grads)]
    device = mt.check_lists(("fisher", "grads"), lists)
    if device is None:
        return
    impl = _fisher_triton if resolve_backend(backend, device) == "triton" else _fisher_torch
    impl(lists, float(decay), float(scale))
