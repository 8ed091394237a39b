"""KL divergence from a reference model's next-token distribution, its logits built one chunk of rows at a time.

A KL anchor (Hinton et al. 2015's distillation term; the KL penalty to a reference policy of Ouyang et al. 2022)
compares the trained model's logits ``z`` with the logits a reference model gives the same tokens, summed over the
rows (tokens) taken::

    L = sum_n KL(p_ref,n || p_n) = sum_n sum_v p_ref,n,v (log p_ref,n,v - log p_n,v)
    p_n = softmax(z_n),   p_ref,n = softmax(h_n W^T + b)
    dL/dz_n = p_n - p_ref,n

The reference logits of a whole batch are a ``[tokens, vocab]`` fp32 tensor (152k-token vocabularies: 0.6 MB per
token), and the one-shot formula with autograd keeps several of them until backward (the reference's log-softmax,
the trained one's, their difference). Here the caller gives the reference's last hidden states ``h`` (``[N, H]``)
and its output layer ``(W, b)``; each chunk of ``chunk_size`` rows builds its reference logits, both
log-softmaxes and its rows of the gradient, then frees them: the reference's ``[c, V]`` temporaries exist for one
chunk at a time. The gradient is written into one buffer the size of the trained logits (zero on rows not taken)
in the forward pass (as Liger-Kernel's fused linear cross-entropy does), kept for backward and scaled there in
place: it is the gradient those logits receive in any case, so the term adds no second ``[tokens, vocab]`` tensor
at the backward's peak, and the reference's output layer runs once, not again in backward.

Where it lives: a pure-torch op on tensors, with no knowledge of models or training, so it is a leaf op here
next to the other retention math, with its one-shot reference (:func:`linear_kl_div_reference`, the test oracle).
There is no Triton kernel: each chunk is a matmul (the reference head, cuBLAS-bound) and three row-wise passes;
a fused kernel would save the chunk's fp32 temporaries, not the dominant matmul.

Numerics: every chunk computes in fp32 whatever the dtypes of ``z``, ``h`` and ``W`` (the head's matmul follows
the ambient autocast, as the trained model's head did); the gradient is stored in ``z``'s dtype. Finite logits give
finite log-softmaxes, so ``p_ref * log p_ref`` never meets ``0 * -inf``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


class _LinearKLDiv(torch.autograd.Function):
    """``L`` and ``dL/dz`` in one chunked pass; backward scales the stored gradient in place (once)."""

    @staticmethod
    def forward(ctx, logits, rows, hidden, weight, bias, chunk_size):
        grad = torch.zeros_like(logits)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, rows.numel(), chunk_size):
            index = rows[start : start + chunk_size]
            log_ref = torch.log_softmax(F.linear(hidden[start : start + chunk_size], weight, bias).float(), dim=-1)
            log_p = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
            p_ref = log_ref.exp()
            total += log_ref.sub_(log_p).mul_(p_ref).sum()  # sum_v p_ref (log p_ref - log p), in place
            del log_ref
            grad.index_copy_(0, index, log_p.exp_().sub_(p_ref).to(grad.dtype))  # p - p_ref
        ctx.grad = grad
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("linear_kl_div: backward through the same call twice (its gradient buffer is reused)")
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None


def _check(logits, rows, hidden, weight, bias) -> torch.Tensor:
    if logits.dim() != 2 or hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"linear_kl_div: logits [M, V], hidden [N, H] and weight [V, H] must be 2-d, got shapes "
            f"{tuple(logits.shape)}, {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    rows = torch.arange(logits.shape[0], device=logits.device) if rows is None else rows
    if rows.dim() != 1 or rows.numel() != hidden.shape[0]:
        raise ValueError(f"linear_kl_div: {rows.numel()} rows taken but hidden has {hidden.shape[0]} rows")
    if weight.shape != (logits.shape[1], hidden.shape[1]) or (bias is not None and bias.shape != (logits.shape[1],)):
        raise ValueError(
            f"linear_kl_div: weight {tuple(weight.shape)} (bias {None if bias is None else tuple(bias.shape)}) does "
            f"not map hidden size {hidden.shape[1]} to the {logits.shape[1]} logits"
        )
    return rows


def linear_kl_div(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    chunk_size: int = 512,
) -> torch.Tensor:
    """``sum_n KL(softmax(h_n W^T + b) || softmax(z_rows[n]))``, differentiable w.r.t. the logits ``z`` only.

    Args:
        logits: The trained model's logits ``z``, shape ``[M, V]``, any float dtype; the gradient flows here.
        hidden: The reference's last hidden states of the rows taken, shape ``[N, H]`` (no gradient).
        weight: The reference's output layer, shape ``[V, H]`` (no gradient).
        bias: Its bias, shape ``[V]``, or ``None``.
        rows: Which rows of ``logits`` the ``N`` rows of ``hidden`` belong to, int64 ``[N]``; ``None``: all
            (``N = M``). Rows of ``logits`` not taken get a zero gradient.
        chunk_size: Rows per chunk (> 0): the reference's temporaries are about four ``[chunk_size, V]`` fp32
            tensors at a time.

    Returns:
        The summed KL, a 0-dim fp32 tensor (divide by ``N`` for the mean per row).

    Raises:
        ValueError: On mismatched shapes or ``chunk_size <= 0``.
    """
    if chunk_size <= 0:
        raise ValueError(f"linear_kl_div(chunk_size={chunk_size}): chunk_size must be > 0")
    rows = _check(logits, rows, hidden, weight, bias)
    bias = None if bias is None else bias.detach()
    return _LinearKLDiv.apply(logits, rows, hidden.detach(), weight.detach(), bias, chunk_size)


def linear_kl_div_reference(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same sum in one shot with ``torch.nn.functional.kl_div`` and autograd: the oracle of the chunked op.

    It builds the whole ``[N, V]`` reference logits and keeps several such tensors for backward.
    """
    rows = _check(logits, rows, hidden, weight, bias)
    ref = F.linear(hidden.detach(), weight.detach(), None if bias is None else bias.detach()).float()
    log_p = torch.log_softmax(logits[rows].float(), dim=-1)
    return F.kl_div(log_p, torch.log_softmax(ref, dim=-1), reduction="sum", log_target=True)
