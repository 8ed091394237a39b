"""Gradients of the SFT loss on remembered examples, for consolidation and reference gradients.

Computed under the trainer's precision context (autocast for ``bf16-mixed``), accumulated in fp32, without
disturbing the training gradients in ``p.grad``. The examples are cut into the same batches as on one process.

- One process or DDP: ``torch.autograd.grad``. Under DDP each process takes its share of the batches
  (``batches[rank::world_size]``) and the results are summed with an all-reduce, so every process ends with the
  same tensors as a single process would compute (up to summation order).
- FSDP2: ``torch.autograd.grad`` cannot return the gradients of sharded parameters (FSDP2 computes them in its
  own backward hooks and reduce-scatters them into ``p.grad``), so each batch runs ``loss.backward()`` with the
  training gradients set aside. The reduce-scatter averages over the processes, so every process runs *every*
  batch (a Fisher is a sum of squares, which an average of different batches would not give) and keeps its shard
  of the result: N times the compute of DDP for this part, no model-sized all-reduce, and state of ``1/N`` size.
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
from hft_lightning.sharding import local, shard_group


def _all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in tensors:
            torch.distributed.all_reduce(tensor)


def _batches(trainer: pl.Trainer, items: Sequence[Item], batch_size: int, sharded: bool) -> Iterator[dict[str, Any]]:
    """This process's batches: its share under DDP, all of them under FSDP2 (see the module's docstring)."""
    starts = range(0, len(items), batch_size)
    if not sharded:
        starts = starts[trainer.global_rank :: trainer.world_size]
    for start in starts:
        yield trainer.strategy.batch_to_device(trainer.datamodule.collate(items[start : start + batch_size]))


def _loss_grads(
    trainer: pl.Trainer, pl_module: HasLoss, params: Sequence[nn.Parameter], batch: dict[str, Any], sharded: bool
) -> list[torch.Tensor]:
    """The gradient of the SFT loss on ``batch``, shaped like ``params`` (their shards under FSDP2)."""
    with torch.enable_grad(), trainer.precision_plugin.train_step_context():
        loss = pl_module.sft_loss(batch)
    if sharded:
        training = [p.grad for p in params]
        for p in params:
            p.grad = None
        loss.backward()
        grads = [p.grad for p in params]
        for p, grad in zip(params, training, strict=True):
            p.grad = grad
    else:
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
    sharded = shard_group(params) is not None
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for batch in _batches(trainer, items, batch_size, sharded):
        grads = _loss_grads(trainer, pl_module, params, batch, sharded)
        weight = len(batch["input_ids"]) / len(items)
        torch._foreach_add_([local(t) for t in total], [local(g).float() for g in grads], alpha=weight)
    if not sharded:
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
    sharded = shard_group(params) is not None
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for batch in _batches(trainer, items, 1, sharded):
        grads = _loss_grads(trainer, pl_module, params, batch, sharded)
        fisher_accumulate_([local(f) for f in fisher], [local(g) for g in grads], decay=1.0, scale=1.0 / len(items))
    if not sharded:
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
