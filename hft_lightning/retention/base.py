"""The base of every knowledge-retention method: consolidate at a stage's end, edit gradients before each step.

Design (after Lightning's ``BaseFinetuning``): one shallow base with two override points.

- :meth:`RetentionCallback.consolidate` runs when the :class:`~hft_lightning.Curriculum` announces the end of a
  stage that another stage follows (``on_stage_end(trainer, pl_module, stage, index)``): estimate what the finished
  stage learned (a Fisher diagonal, anchors, a memory of examples).
- :meth:`RetentionCallback.edit_gradients` runs in ``on_before_optimizer_step``, where the gradients are
  accumulated over micro-batches and unscaled, and clipping has not run yet: once per optimizer step.

State is keyed by parameter *name* (:mod:`~hft_lightning.retention.parameters`). What a method needs from the module
and the datamodule is written down as protocols (:mod:`~hft_lightning.retention.contracts`), checked in ``setup``.
The curriculum pushes its :class:`~hft_lightning.plan.Plan` to every retention callback (:meth:`set_plan`). Only
trainable parameters are protected, so adapters (LoRA) are protected and frozen weights cost nothing.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from typing_extensions import override

from hft_lightning.errors import ConfigError
from hft_lightning.plan import Plan, Stage
from hft_lightning.retention.contracts import HasLoss, StageData, missing_members
from hft_lightning.retention.parameters import trainable


class RetentionCallback(Callback):
    """Protects what earlier stages learned while later stages train.

    Subclasses override :meth:`consolidate` and :meth:`edit_gradients`, and keep their state in
    :meth:`state_dict` / :meth:`load_state_dict` (tensors in dicts keyed by parameter name).

    Args:
        **identity: The arguments that identify this instance (for example ``lam=100.0``). They are folded into
            :attr:`state_key`, so two instances with different arguments keep separate state in one checkpoint.
    """

    def __init__(self, **identity: Any):
        self._identity = identity
        self.plan: Plan | None = None
        self.strength_scale = 1.0

    def strengthen(self, factor: float) -> None:
        """Multiplies the method's strength, its one knob (EWC's ``lam``, Replay's ``ratio``), by ``factor``.

        A method reads its knob as ``knob * strength_scale``; a method without a knob (GEM's projection) ignores it.
        :class:`~hft_lightning.retention.ForgettingBudget` strengthens every retention callback when an ability falls
        out of its budget, and keeps the scale in its own checkpoint state.
        """
        if not factor > 0:
            raise ValueError(f"{type(self).__name__}.strengthen(factor={factor}): factor must be > 0")
        self.strength_scale *= factor

    def set_plan(self, plan: Plan) -> None:
        """Follows ``plan`` (pushed by the curriculum): which stage is the last, which stage an epoch trains."""
        self.plan = plan

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self._identity)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(self).__name__
        refuse_sharded(trainer, name)
        if stage != "fit":
            return
        for role, given, protocol in (("datamodule", trainer.datamodule, StageData), ("module", pl_module, HasLoss)):
            missing = missing_members(given, protocol)
            if missing:
                raise ConfigError(
                    f"{name} needs a {role} that provides {protocol.__name__}; {type(given).__name__} has no "
                    f"{', '.join(missing)}"
                )

    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, index: int) -> None:
        """Consolidates the finished stage ``index``, unless it is the last one (nothing trains after it)."""
        if trainer.sanity_checking or index == len(self.plan.stages) - 1:
            return
        self.consolidate(trainer, pl_module, index)

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, index: int) -> None:
        """Called when stage ``index`` begins; nothing by default."""

    def consolidate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage_index: int) -> None:
        """Records what stage ``stage_index`` learned. Override point; nothing by default."""

    def edit_gradients(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: dict[str, nn.Parameter]
    ) -> None:
        """Edits ``p.grad`` of the trainable ``params`` (by name) in place. Override point; nothing by default."""

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.sanity_checking:
            return
        params = {name: p for name, p in trainable(pl_module).items() if p.grad is not None}
        if params:  # none: the step is skipped (a ForgettingBudget stopped the stage)
            self.edit_gradients(trainer, pl_module, params)


def refuse_sharded(trainer: pl.Trainer, name: str) -> None:
    """Refuses the sharded strategies, whose parameters no callback state here is shaped for.

    Raises:
        ConfigError: Naming the callback ``name`` and ``trainer.strategy``.
    """
    if isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy | ModelParallelStrategy):
        raise ConfigError(
            f"{name} does not support trainer.strategy={type(trainer.strategy).__name__} yet "
            "(its state is not sharded); use a single device or strategy=ddp"
        )
