"""Averaged GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM").

A-GEM keeps the same per-ability memory as :class:`~hft_lightning.retention.GEM` but, at every optimizer step,
computes a single reference gradient ``g_ref`` on a random batch drawn from the whole memory, and projects with
the closed form ``g -= min(0, <g, g_ref>) / <g_ref, g_ref> * g_ref`` (:func:`kernels.gem_project_` with k = 1):
one extra forward/backward pass per step instead of k, and one fp32 copy of the trainable parameters, alive only
during the step. The batch is drawn from a generator seeded by the data seed and the step, so a resumed run
draws what the uninterrupted run drew.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from hft_lightning.errors import ConfigError
from hft_lightning.retention.base import RetentionCallback
from hft_lightning.retention.gradients import loss_gradient
from hft_lightning.retention.memory import ExampleMemory
from kernels import gem_project_


class AGEM(RetentionCallback):
    """Projects every step's gradient so that it does not increase the loss on a batch of the memory.

    Args:
        memory_size: Examples remembered per ability (> 0).
        batch_size: Examples of the memory drawn at every step for the reference gradient (> 0).

    Example::

        trainer = Trainer(callbacks=[Curriculum(), AGEM(memory_size=64, batch_size=32)])
    """

    def __init__(self, memory_size: int = 64, batch_size: int = 32):
        for name, value in {"memory_size": memory_size, "batch_size": batch_size}.items():
            if value <= 0:
                raise ConfigError(f"AGEM({name}={value}): {name} must be > 0")
        super().__init__(memory_size=memory_size, batch_size=batch_size)
        self.batch_size = batch_size
        self.memory = ExampleMemory(memory_size)

    @override
    def consolidate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage_index: int) -> None:
        self.memory.observe_stage(trainer.datamodule, stage_index)

    @override
    def edit_gradients(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: dict[str, nn.Parameter]
    ) -> None:
        items = self.memory.all_items()
        if not items:
            return
        generator = torch.Generator().manual_seed(trainer.datamodule.seed * 1_000_003 + trainer.global_step)
        drawn = torch.randperm(len(items), generator=generator)[: self.batch_size].tolist()
        theta = list(params.values())
        ref = loss_gradient(trainer, pl_module, theta, [items[i] for i in drawn], self.batch_size)
        v = gem_project_([p.grad for p in theta], [ref])
        pl_module.log("retention/agem_violated", (v > 0).sum().float())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.memory.load_state_dict(state_dict["memory"])
