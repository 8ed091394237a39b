"""The base of every knowledge-retention method: consolidate at a stage's end, then act on every later step.

Design (after Lightning's ``BaseFinetuning``): one shallow base with three override points.

- :meth:`RetentionCallback.consolidate` runs when the :class:`~hft_lightning.Curriculum` announces the end of a
  stage that another stage follows (``on_stage_end(trainer, pl_module, stage, index)``): estimate what the finished
  stage learned (a Fisher diagonal, anchors, a memory of examples, a reference model).
- :meth:`RetentionCallback.loss_term` runs in the module's ``training_step``, once per micro-batch, before
  backward: a term added to the SFT loss, computed from the logits the module already has (a KL anchor).
  A callback that overrides it is pushed to the module in ``setup`` (:class:`~.contracts.TakesLossTerms`).
- :meth:`RetentionCallback.edit_gradients` runs in ``on_before_optimizer_step``, where the gradients are
  accumulated over micro-batches and unscaled, and clipping has not run yet: once per optimizer step.

The order within an optimizer step, for any mix of methods: every micro-batch's loss is the SFT loss plus the
loss terms (in callback order), backward accumulates its gradient; then the gradient edits run on that
accumulated gradient of the whole loss (in callback order), then clipping, then the optimizer. So EWC adds its
pull to the gradient of SFT + KL, and GEM projects that gradient.

State is keyed by parameter *name* (:mod:`~hft_lightning.retention.parameters`). What a method needs from the module
and the datamodule is written down as protocols (:mod:`~hft_lightning.retention.contracts`), checked in ``setup``.
The curriculum pushes its :class:`~hft_lightning.plan.Plan` to every retention callback (:meth:`set_plan`). Only
trainable parameters are protected, so adapters (LoRA) are protected and frozen weights cost nothing.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from hft_lightning.checks import refuse_sharded
from hft_lightning.errors import ConfigError
from hft_lightning.plan import Plan, Stage
from hft_lightning.retention.contracts import HasLoss, StageData, TakesLossTerms, missing_members
from hft_lightning.retention.parameters import trainable


class RetentionCallback(Callback):
    """Protects what earlier stages learned while later stages train.

    Subclasses override :meth:`consolidate` and :meth:`loss_term` or :meth:`edit_gradients` (or both), and keep
    their state in :meth:`state_dict` / :meth:`load_state_dict` (tensors in dicts keyed by parameter name).

    Args:
        **identity: The arguments that identify this instance (for example ``lam=100.0``). They are folded into
            :attr:`state_key`, so two instances with different arguments keep separate state in one checkpoint.
    """

    works_sharded: ClassVar[bool] = False
    """Whether the method works on FSDP2-sharded parameters (``ModelParallelStrategy``); refused there otherwise."""

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
        if not self.works_sharded:
            refuse_sharded(trainer, type(self).__name__)
        if stage != "fit":
            return
        needs = [("datamodule", trainer.datamodule, StageData), ("module", pl_module, HasLoss)]
        if self.adds_loss_term:
            needs.append(("module", pl_module, TakesLossTerms))
        for role, given, protocol in needs:
            self.require(role, given, protocol)
        if self.adds_loss_term:
            pl_module.add_loss_term(self)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.adds_loss_term and isinstance(pl_module, TakesLossTerms):
            pl_module.remove_loss_term(self)

    def require(self, role: str, given: object, protocol: type) -> None:
        """Checks that ``given`` (the module or the datamodule, by ``role``) provides ``protocol``.

        Raises:
            ConfigError: Naming this method, the protocol and the members ``given`` lacks.
        """
        missing = missing_members(given, protocol)
        if missing:
            raise ConfigError(
                f"{type(self).__name__} needs a {role} that provides {protocol.__name__}; {type(given).__name__} has "
                f"no {', '.join(missing)}"
            )

    @property
    def adds_loss_term(self) -> bool:
        """Whether this method overrides :meth:`loss_term` (and is pushed to the module in ``setup``)."""
        return type(self).loss_term is not RetentionCallback.loss_term

    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, index: int) -> None:
        """Consolidates the finished stage ``index``, unless it is the last one (nothing trains after it)."""
        if trainer.sanity_checking or index == len(self.plan.stages) - 1:
            return
        self.consolidate(trainer, pl_module, index)

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, index: int) -> None:
        """Called when stage ``index`` begins; nothing by default."""

    def consolidate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage_index: int) -> None:
        """Records what stage ``stage_index`` learned. Override point; nothing by default."""

    def loss_term(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        inputs: dict[str, torch.Tensor],
        logits: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor | None:
        """A term the module adds to its training loss before backward. Override point; ``None`` by default.

        Called by the module's ``training_step`` on every micro-batch (Replay's examples included: it edits the
        batch before the step), with what it fed its model and the logits it got: the term costs no second forward
        pass of the trained model. The returned 0-dim tensor is added to the SFT loss (``train/loss`` stays the SFT
        loss: log the term under ``retention/<name>``); Lightning divides the sum by ``accumulate_grad_batches``.
        The arguments are those of :meth:`.contracts.LossTerm.loss_term`.
        """
        return None

    def edit_gradients(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: dict[str, nn.Parameter]
    ) -> None:
        """Edits ``p.grad`` of the trainable ``params`` (by name) in place. Override point; nothing by default.

        The gradients are those of the whole loss (SFT plus every loss term), accumulated over the step's
        micro-batches; earlier callbacks' edits are already in them.
        """

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.sanity_checking:
            return
        params = {name: p for name, p in trainable(pl_module).items() if p.grad is not None}
        if params:  # none: the step is skipped (a ForgettingBudget stopped the stage)
            self.edit_gradients(trainer, pl_module, params)
