"""Averaged GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM").

A-GEM keeps the same per-ability memory as :class:`~hft_lightning.retention.GEM` but computes a single reference
gradient ``g_ref`` on a random batch drawn from the whole memory, and projects with the closed form
``g -= min(0, <g, g_ref>) / <g_ref, g_ref> * g_ref`` (:func:`hft_kernels.gem_project_` with k = 1): one extra
forward/backward pass per refresh instead of k, and one fp32 copy of the trainable parameters. The paper draws a
new batch at every step (``ref_every=1``); ``ref_every > 1`` reuses the reference for that many steps
(:class:`~hft_lightning.retention.references.ReferenceGradients`, part of the checkpoint). The batch is drawn
from a generator seeded by the data seed and the step, so a resumed run draws what the uninterrupted run drew.
Like GEM, A-GEM has no strength knob: :meth:`~hft_lightning.retention.RetentionCallback.strengthen` changes nothing.
Under FSDP2 it works on shards as GEM does.
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
from hft_lightning.retention.memory import ExampleMemory, Item
from hft_lightning.retention.parameters import trainable
from hft_lightning.retention.references import ReferenceGradients
from hft_lightning.seeds import derive_seed


class AGEM(RetentionCallback):
    """Projects every step's gradient so that it does not increase the loss on a batch of the memory.

    Args:
        memory_size: Examples remembered per ability (> 0).
        batch_size: Examples of the memory drawn for each reference gradient (> 0).
        ref_every: Draw a new batch and recompute the reference every this many optimizer steps (1 = the paper).

    Example::

        trainer = Trainer(callbacks=[Curriculum(), AGEM(memory_size=64, batch_size=32, ref_every=10), Report()])
    """

    works_sharded = True

    def __init__(self, memory_size: int = 64, batch_size: int = 32, ref_every: int = 1):
        for name, value in {"memory_size": memory_size, "batch_size": batch_size, "ref_every": ref_every}.items():
            if value <= 0:
                raise ConfigError(f"AGEM({name}={value}): {name} must be > 0")
        super().__init__(memory_size=memory_size, batch_size=batch_size, ref_every=ref_every)
        self.batch_size = batch_size
        self.memory = ExampleMemory(memory_size)
        self.references = ReferenceGradients(ref_every)

    @override
    def consolidate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage_index: int) -> None:
        self.memory.observe_stage(trainer.datamodule, stage_index)
        self.references.clear()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.references.restore("AGEM", trainable(pl_module))

    @override
    def edit_gradients(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: dict[str, nn.Parameter]
    ) -> None:
        items = self.memory.all_items()
        if not items:
            return
        self.references.refresh(trainer.global_step, lambda: self._averaged(trainer, pl_module, params, items))
        v = self.references.project_(params)
        pl_module.log("retention/agem_violated", (v > 0).sum().float())

    def _averaged(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: dict[str, nn.Parameter], items: list[Item]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """The gradient over a batch drawn from the whole memory (seeded by the step: the same after a resume)."""
        generator = torch.Generator().manual_seed(derive_seed(trainer.datamodule.seed, "agem", trainer.global_step))
        drawn = torch.randperm(len(items), generator=generator)[: self.batch_size].tolist()
        ref = loss_gradient(trainer, pl_module, list(params.values()), [items[i] for i in drawn], self.batch_size)
        return {"memory": dict(zip(params, ref, strict=True))}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(), "references": self.references.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.memory.load_state_dict(state_dict["memory"])
        self.references.load_state_dict(state_dict["references"])
