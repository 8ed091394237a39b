"""Gradients of the SFT loss on remembered examples, for consolidation and reference gradients.

Computed with ``torch.autograd.grad`` so the training gradients in ``p.grad`` are never touched, under the
trainer's precision context (autocast for ``bf16-mixed``), accumulated in fp32. Under DDP the examples are cut
into the same batches as on one process, each process takes its share of the batches (``batches[rank::world_size]``)
and the results are summed with an all-reduce, so every process ends with the same tensors as a single process
would compute (up to summation order).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from hft_kernels import fisher_accumulate_
from hft_lightning.retention.contracts import HasLoss
from hft_lightning.retention.memory import ExampleMemory, Item


def _all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in tensors:
            torch.distributed.all_reduce(tensor)


def _local_batches(trainer: pl.Trainer, items: Sequence[Item], batch_size: int) -> Iterator[dict[str, Any]]:
    starts = range(0, len(items), batch_size)[trainer.global_rank :: trainer.world_size]
    for start in starts:
        yield trainer.strategy.batch_to_device(trainer.datamodule.collate(items[start : start + batch_size]))


def _loss_grads(
    trainer: pl.Trainer, pl_module: HasLoss, params: Sequence[nn.Parameter], batch: dict[str, Any]
) -> list[torch.Tensor]:
    with torch.enable_grad(), trainer.precision_plugin.train_step_context():
        loss = pl_module.sft_loss(batch)
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def loss_gradient(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    params: Sequence[nn.Parameter],
    items: Sequence[Item],
    batch_size: int,
) -> list[torch.Tensor]:
    """The gradient of the SFT loss averaged over ``items``, in fp32, shaped like ``params``.

    Each batch of up to ``batch_size`` examples contributes its mean-token loss gradient weighted by its number
    of examples.
    """
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for batch in _local_batches(trainer, items, batch_size):
        grads = _loss_grads(trainer, pl_module, params, batch)
        torch._foreach_add_(total, [g.float() for g in grads], alpha=len(batch["input_ids"]) / len(items))
    _all_reduce_sum_(total)
    return total


def empirical_fisher(
    trainer: pl.Trainer, pl_module: pl.LightningModule, params: Sequence[nn.Parameter], items: Sequence[Item]
) -> list[torch.Tensor]:
    """The empirical Fisher diagonal ``F = 1/N sum_n (d loss_n / d theta)^2`` over the N ``items``, in fp32.

    ``loss_n`` is example n's mean token cross-entropy on its *reference* response (the empirical Fisher, not
    one sampled from the model), with one backward pass per example: the square of a batch gradient would
    underestimate F by the batch size and mix examples.
    """
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for batch in _local_batches(trainer, items, batch_size=1):
        fisher_accumulate_(fisher, _loss_grads(trainer, pl_module, params, batch), decay=1.0, scale=1.0 / len(items))
    _all_reduce_sum_(fisher)
    return fisher


def stage_fisher(
    trainer: pl.Trainer, pl_module: pl.LightningModule, params: dict[str, nn.Parameter], stage_index: int, samples: int
) -> dict[str, torch.Tensor]:
    """The empirical Fisher of stage ``stage_index``, by parameter name, over ``samples`` examples per ability.

    The examples are a reservoir sample of what the stage trained on (:class:`ExampleMemory`).
    """
    memory = ExampleMemory(samples)
    memory.observe_stage(trainer.datamodule, stage_index)
    fisher = empirical_fisher(trainer, pl_module, list(params.values()), memory.all_items())
    return dict(zip(params, fisher, strict=True))
