"""The base of every knowledge-retention method: consolidate at a stage's end, edit gradients before each step.

Design (after Lightning's ``BaseFinetuning``): one shallow base with two override points.

- :meth:`RetentionCallback.consolidate` runs when the :class:`~hft_lightning.Curriculum` announces the end of a
  stage that another stage follows (``on_stage_end(trainer, pl_module, stage, index)``): estimate what the finished
  stage learned (a Fisher diagonal, anchors, a memory of examples).
- :meth:`RetentionCallback.edit_gradients` runs in ``on_before_optimizer_step``, where the gradients are
  accumulated over micro-batches and unscaled, and clipping has not run yet: once per optimizer step.

State is keyed by parameter *name*, never by position, so a checkpoint loads into a model whose parameters are
ordered differently, and a missing or unexpected name is an error that names it (:meth:`match_names`). The
curriculum pushes its :class:`~hft_lightning.plan.Plan` to every retention callback (:meth:`set_plan`). Only
trainable parameters are protected, so adapters (LoRA) are protected and frozen weights cost nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from typing_extensions import override

from hft_lightning.errors import ConfigError
from hft_lightning.plan import Plan, Stage


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

    def set_plan(self, plan: Plan) -> None:
        """Follows ``plan`` (pushed by the curriculum): which stage is the last, which stage an epoch trains."""
        self.plan = plan

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self._identity)

    @staticmethod
    def trainable(pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        """The parameters retention protects: every parameter that requires a gradient, by name."""
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    @staticmethod
    def match_names(what: str, saved: Mapping[str, Any], params: Mapping[str, nn.Parameter]) -> None:
        """Checks that state saved by parameter name covers exactly the trainable parameters.

        Raises:
            ConfigError: Naming the missing and the unexpected parameter names.
        """
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            raise ConfigError(
                f"{what} does not match the model's trainable parameters: missing {missing}, unexpected {unexpected}"
            )

    @classmethod
    def on_parameters(
        cls, what: str, saved: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]
    ) -> dict[str, torch.Tensor]:
        """Checks state restored by name with :meth:`match_names` and moves each tensor to its parameter's device.

        Call it in ``on_train_start``, when a checkpoint's state has been loaded and the model is on its device.
        """
        cls.match_names(what, saved, params)
        return {name: tensor.to(params[name].device) for name, tensor in saved.items()}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy | ModelParallelStrategy):
            raise ConfigError(
                f"{type(self).__name__} does not support trainer.strategy={type(trainer.strategy).__name__} yet "
                "(its state is not sharded); use a single device or strategy=ddp"
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
        params = {name: p for name, p in self.trainable(pl_module).items() if p.grad is not None}
        self.edit_gradients(trainer, pl_module, params)
