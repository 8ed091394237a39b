"""Online EWC (Schwarz et al. 2018, "Progress & Compress"): one running Fisher for all finished stages.

At each stage end the running Fisher decays and takes in the finished stage's empirical Fisher,
``F = gamma * F + F_s``, and the anchors move to the current weights ``theta* = theta``. Every later step adds
``lam * F * (theta - theta*)`` to the gradient with :func:`hft_kernels.ewc_penalty_` (one pass over memory) and logs
``retention/ewc_penalty``. Memory: two fp32 copies of the trainable parameters, however many stages; under FSDP2
each process keeps those of its shards, as :class:`~hft_lightning.retention.EWC` does.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from hft_lightning.errors import ConfigError
from hft_lightning.retention.base import RetentionCallback
from hft_lightning.retention.ewc import ewc_pull_
from hft_lightning.retention.gradients import stage_fisher
from hft_lightning.retention.parameters import on_parameters, trainable
from hft_lightning.sharding import gathered, local


class OnlineEWC(RetentionCallback):
    """EWC with a single decaying Fisher and the latest stage end as anchor.

    Args:
        lam: Penalty strength lambda (> 0); it acts as ``lam * strength_scale``
            (:meth:`~hft_lightning.retention.RetentionCallback.strengthen`).
        gamma: Decay of the running Fisher at each stage end, in (0, 1]; 1 sums the stages' Fishers.
        fisher_samples: Examples per ability used to estimate each stage's Fisher diagonal (> 0); see
            :class:`~hft_lightning.retention.EWC` for the estimator.

    Example::

        trainer = Trainer(callbacks=[Curriculum(), OnlineEWC(lam=1000.0, gamma=0.9), Report()])
    """

    works_sharded = True

    def __init__(self, lam: float = 1000.0, gamma: float = 0.9, fisher_samples: int = 64):
        if not lam > 0:
            raise ConfigError(f"OnlineEWC(lam={lam}): lam must be > 0")
        if not 0 < gamma <= 1:
            raise ConfigError(f"OnlineEWC(gamma={gamma}): gamma must be in (0, 1]")
        if fisher_samples <= 0:
            raise ConfigError(f"OnlineEWC(fisher_samples={fisher_samples}): fisher_samples must be > 0")
        super().__init__(lam=lam, gamma=gamma, fisher_samples=fisher_samples)
        self.lam = lam
        self.gamma = gamma
        self.fisher_samples = fisher_samples
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    @override
    def consolidate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage_index: int) -> None:
        params = trainable(pl_module)
        new = stage_fisher(trainer, pl_module, params, stage_index, self.fisher_samples)
        if self.fisher:
            running = [local(self.fisher[name]) for name in new]
            torch._foreach_mul_(running, self.gamma)
            torch._foreach_add_(running, [local(f) for f in new.values()])
        else:
            self.fisher = new
        self.anchor = {name: p.detach().float().clone() for name, p in params.items()}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.fisher:
            return
        params = trainable(pl_module)
        self.fisher = on_parameters("OnlineEWC fisher", self.fisher, params)
        self.anchor = on_parameters("OnlineEWC anchor", self.anchor, params)

    @override
    def edit_gradients(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: dict[str, nn.Parameter]
    ) -> None:
        if not self.fisher:
            return
        penalty = ewc_pull_(params, self.anchor, self.fisher, self.lam * self.strength_scale)
        pl_module.log("retention/ewc_penalty", penalty)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"fisher": gathered(self.fisher), "anchor": gathered(self.anchor)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fisher = state_dict["fisher"]
        self.anchor = state_dict["anchor"]
