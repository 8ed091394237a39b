"""Gradient Episodic Memory (Lopez-Paz and Ranzato 2017, "Gradient Episodic Memory for Continual Learning").

GEM keeps a memory of examples of every ability learned so far (reservoir samples of what the finished stages
trained on, :class:`~hft_lightning.retention.memory.ExampleMemory`). Before each optimizer step it computes one
reference gradient ``g_k`` per remembered ability (the loss gradient on that ability's memory) and projects the
training gradient with the fused :func:`hft_kernels.gem_project_`: ``g += G^T v*`` where ``v*`` solves the dual QP
``min_{v >= 0} 1/2 v^T G G^T v + v^T G g`` on the device, so that afterwards ``<g, g_k> >= 0`` for every
ability: to first order, no remembered ability's loss increases. When no constraint is violated, g is unchanged.

The paper recomputes the references at every step (``ref_every=1``): k extra forward/backward passes on the
memory per step. ``ref_every > 1`` reuses them for that many steps, trading exactness for speed
(:class:`~hft_lightning.retention.references.ReferenceGradients`, part of the checkpoint). Memory: k fp32 copies
of the trainable parameters. GEM has no strength knob (the projection removes exactly the conflicting part, no more):
:meth:`~hft_lightning.retention.RetentionCallback.strengthen` changes nothing.

Under FSDP2 each process keeps the references of its shards and projects its shard of g: only the k dot products
``G g`` and the k x k Gram matrix are all-reduced (``gem_project_(..., process_group=...)``), so the projected
gradient is the unsharded one. Every process computes the references on all of the memory
(:mod:`~hft_lightning.retention.gradients`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn
from typing_extensions import override

from hft_kernels import MAX_REFS
from hft_lightning.errors import ConfigError
from hft_lightning.retention.base import RetentionCallback
from hft_lightning.retention.gradients import loss_gradient
from hft_lightning.retention.memory import ExampleMemory
from hft_lightning.retention.parameters import trainable
from hft_lightning.retention.references import ReferenceGradients


class GEM(RetentionCallback):
    """Projects every step's gradient so that it does not increase the loss of any remembered ability.

    Args:
        memory_size: Examples remembered per ability (> 0); each reference gradient uses all of them.
        ref_every: Recompute the reference gradients every this many optimizer steps (1 = the paper).
        batch_size: Examples per forward pass when computing a reference gradient.

    Example::

        trainer = Trainer(callbacks=[Curriculum(), GEM(memory_size=32), Report()])
    """

    works_sharded = True

    def __init__(self, memory_size: int = 32, ref_every: int = 1, batch_size: int = 32):
        for name, value in {"memory_size": memory_size, "ref_every": ref_every, "batch_size": batch_size}.items():
            if value <= 0:
                raise ConfigError(f"GEM({name}={value}): {name} must be > 0")
        super().__init__(memory_size=memory_size, ref_every=ref_every)
        self.batch_size = batch_size
        self.memory = ExampleMemory(memory_size)
        self.references = ReferenceGradients(ref_every)

    @override
    def consolidate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage_index: int) -> None:
        self.memory.observe_stage(trainer.datamodule, stage_index)
        if len(self.memory.abilities) > MAX_REFS:
            raise ConfigError(
                f"GEM projects against at most {MAX_REFS} abilities, the memory holds {len(self.memory.abilities)}"
            )
        self.references.clear()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.references.restore("GEM", trainable(pl_module))

    @override
    def edit_gradients(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: dict[str, nn.Parameter]
    ) -> None:
        if not self.memory.abilities:
            return
        self.references.refresh(trainer.global_step, lambda: self._per_ability(trainer, pl_module, params))
        v = self.references.project_(params)
        pl_module.log("retention/gem_violated", (v > 0).sum().float())

    def _per_ability(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: dict[str, nn.Parameter]
    ) -> dict[str, dict[str, Tensor]]:
        """One reference gradient per remembered ability, over all its remembered examples."""
        refs = {}
        for ability in self.memory.abilities:
            ref = loss_gradient(trainer, pl_module, list(params.values()), self.memory.items(ability), self.batch_size)
            refs[ability] = dict(zip(params, ref, strict=True))
        return refs

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(), "references": self.references.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.memory.load_state_dict(state_dict["memory"])
        self.references.load_state_dict(state_dict["references"])
