"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks").

At the end of every stage that another stage follows, EWC estimates the empirical Fisher diagonal ``F_s`` of
the finished stage's data and snapshots the weights ``theta*_s``. Every later optimizer step adds the gradient
of ``sum_s lam/2 * sum_i F_s,i (theta_i - theta*_s,i)^2`` to the training gradient with the fused
:func:`hft_kernels.ewc_penalty_` (one pass over memory per stage) and logs the penalty as ``retention/ewc_penalty``.
Memory: two fp32 copies of the trainable parameters per consolidated stage (see :class:`OnlineEWC` for one).

Under FSDP2 each process keeps the Fisher and anchors of its own shards (``1/N`` of the state) and the kernel runs
on them unchanged; the penalty's partial sums are added over the processes for the log. The checkpoint holds the
gathered tensors (:func:`~hft_lightning.sharding.gathered`), re-sharded when a run resumes.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from hft_kernels import ewc_penalty_
from hft_lightning.errors import ConfigError
from hft_lightning.retention.base import RetentionCallback
from hft_lightning.retention.gradients import stage_fisher
from hft_lightning.retention.parameters import on_parameters, trainable
from hft_lightning.sharding import gathered, local, shard_group


def ewc_pull_(
    params: dict[str, nn.Parameter], anchor: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], lam: float
) -> torch.Tensor:
    """Adds ``lam * F * (theta - theta*)`` to the gradients of ``params`` (by name); returns the penalty.

    Runs :func:`hft_kernels.ewc_penalty_` on each process's shards under FSDP2 (on the tensors themselves
    otherwise) and sums the penalty over the processes, so every process returns the whole model's penalty.
    """
    theta = list(params.values())
    penalty = ewc_penalty_(
        [local(p.detach()) for p in theta],
        [local(anchor[name]) for name in params],
        [local(fisher[name]) for name in params],
        [local(p.grad) for p in theta],
        lam,
    )
    group = shard_group(theta)
    if group is not None:
        torch.distributed.all_reduce(penalty, group=group)
    return penalty


class EWC(RetentionCallback):
    """Pulls the weights that mattered to earlier stages back toward their values at those stages' ends.

    The Fisher is the *empirical* Fisher: squared per-example gradients of the loss on the reference responses,
    one backward pass per example, over ``fisher_samples`` examples per ability of the finished stage (drawn by
    reservoir sampling from the examples the stage trained on).

    Args:
        lam: Penalty strength lambda (> 0); it acts as ``lam * strength_scale``
            (:meth:`~hft_lightning.retention.RetentionCallback.strengthen`).
        fisher_samples: Examples per ability used to estimate each stage's Fisher diagonal (> 0).

    Example::

        trainer = Trainer(callbacks=[Curriculum(), EWC(lam=1000.0), Report()])
    """

    works_sharded = True

    def __init__(self, lam: float = 1000.0, fisher_samples: int = 64):
        if not lam > 0:
            raise ConfigError(f"EWC(lam={lam}): lam must be > 0")
        if fisher_samples <= 0:
            raise ConfigError(f"EWC(fisher_samples={fisher_samples}): fisher_samples must be > 0")
        super().__init__(lam=lam, fisher_samples=fisher_samples)
        self.lam = lam
        self.fisher_samples = fisher_samples
        self.consolidated: list[dict[str, Any]] = []

    @override
    def consolidate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage_index: int) -> None:
        params = trainable(pl_module)
        self.consolidated.append(
            {
                "stage": stage_index,
                "fisher": stage_fisher(trainer, pl_module, params, stage_index, self.fisher_samples),
                "anchor": {name: p.detach().float().clone() for name, p in params.items()},
            }
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = trainable(pl_module)
        for state in self.consolidated:
            for key in ("fisher", "anchor"):
                state[key] = on_parameters(f"EWC {key} of stage {state['stage']}", state[key], params)

    @override
    def edit_gradients(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: dict[str, nn.Parameter]
    ) -> None:
        if not self.consolidated:
            return
        lam = self.lam * self.strength_scale
        penalty = sum(ewc_pull_(params, state["anchor"], state["fisher"], lam) for state in self.consolidated)
        pl_module.log("retention/ewc_penalty", penalty)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"consolidated": gathered(self.consolidated)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consolidated = state_dict["consolidated"]
