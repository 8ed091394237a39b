"""The curriculum: the stage plan of a Hierarchical Fine-Tuning run, driven inside one ``trainer.fit``.

Design: one epoch is one stage. The curriculum sets ``max_epochs`` to the number of stages and asks the
trainer to rebuild the training dataloader every epoch; :class:`~hft_lightning.data.StagedDataModule`
builds each epoch's loader from :attr:`Curriculum.current_stage`. Validation at the end of an epoch is
therefore the evaluation *after* that stage, which is what the accuracy matrix records.

At a stage boundary every callback that defines ``on_stage_end(trainer, pl_module, stage)`` and
``on_stage_start(trainer, pl_module, stage)`` (the retention callbacks) is told, in that order. The
indices of the last stage started and ended are saved in :meth:`Curriculum.state_dict`, and pending
announcements are made before the next training batch, so a run resumed from any checkpoint (mid-stage,
or between a stage's last batch and its end) announces each boundary exactly once. Progress inside a
stage is derived from ``trainer.global_step``, which Lightning restores, so the data order after a resume
is exactly the uninterrupted run's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from hft_lightning.errors import ConfigError


@dataclass
class Stage:
    """One stage of the plan.

    Attributes:
        name: Shown in the progress bar, the logs and the report.
        steps: Optimizer steps the stage trains for.
        mixture: Ability name -> sampling weight of its examples in this stage's batches. A single-ability
            stage is ``{math: 1.0}``; the unified stage mixes all abilities.
    """

    name: str
    steps: int
    mixture: dict[str, float]


DEFAULT_STAGES = (
    Stage(name="foundation", steps=300, mixture={"math": 1.0, "code": 1.0, "general": 1.0}),
    Stage(name="math", steps=300, mixture={"math": 1.0}),
    Stage(name="code", steps=300, mixture={"code": 1.0}),
    Stage(name="general", steps=300, mixture={"general": 1.0}),
    Stage(name="unified", steps=300, mixture={"math": 1.0, "code": 1.0, "general": 1.0}),
)
"""The embedded default plan. The tiny default model starts from random weights, where real SFT starts from a
pretrained model: the short mixed ``foundation`` stage stands in for that pretraining. Without it, a model
trained from scratch on one narrow ability barely learns the next ones (benchmarks/LOG.md, 2026-11-25)."""


def _validate_stages(stages: Sequence[Stage]) -> None:
    if not stages:
        raise ConfigError("Curriculum.stages: the stage plan is empty; give at least one stage")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"Curriculum.stages: stage names must be unique, got {names}")
    for i, stage in enumerate(stages):
        field = f"Curriculum.stages[{i}] ({stage.name!r})"
        if stage.steps <= 0:
            raise ConfigError(f"{field}.steps must be a positive number of optimizer steps, got {stage.steps}")
        if not stage.mixture:
            raise ConfigError(f"{field}.mixture is empty; give ability -> weight, e.g. {{math: 1.0}}")
        for ability, weight in stage.mixture.items():
            if not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"{field}.mixture[{ability!r}] must be a finite weight >= 0, got {weight}")
        if sum(stage.mixture.values()) <= 0:
            raise ConfigError(f"{field}.mixture weights are all zero; at least one must be positive")


def _check_trainer(trainer: pl.Trainer) -> None:
    """Refuses trainer settings under which a stage would not run exactly its planned steps."""
    # Lightning has no public accessor for the flag; it would wrap the stage sampler in a DistributedSampler.
    if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
        raise ConfigError(
            f"set trainer.use_distributed_sampler: false with {trainer.world_size} processes: the curriculum's "
            "stage sampler shards each batch across the processes itself"
        )
    if trainer.max_steps != -1:
        raise ConfigError(
            f"trainer.max_steps={trainer.max_steps} conflicts with the curriculum, which sets the length of "
            "training through Curriculum.stages[*].steps; leave trainer.max_steps unset"
        )
    for flag, value, default in [
        ("limit_train_batches", trainer.limit_train_batches, 1.0),
        ("overfit_batches", trainer.overfit_batches, 0),
        ("fast_dev_run", trainer.fast_dev_run, False),
    ]:
        if value != default:
            raise ConfigError(
                f"trainer.{flag}={value} would cut stages short of their planned steps; shorten "
                "Curriculum.stages[*].steps instead"
            )
    if trainer.limit_val_batches == 0 or trainer.check_val_every_n_epoch not in (1, None):
        raise ConfigError(
            "the accuracy matrix needs an evaluation after every stage: keep trainer.check_val_every_n_epoch=1 "
            f"and trainer.limit_val_batches > 0 (got {trainer.check_val_every_n_epoch} and {trainer.limit_val_batches})"
        )


class Curriculum(Callback):
    """Runs a plan of stages, one ability (or mixture) each, inside one ``trainer.fit``.

    Args:
        stages: The plan, in training order. Defaults to :data:`DEFAULT_STAGES`: a short foundation stage on an
            equal mixture of the built-in abilities, one stage per ability (math, code, general), then a unified
            stage on the mixture.

    Example::

        from lightning.pytorch import Trainer
        from hft_lightning import Curriculum, HFTModule, Stage, StagedDataModule

        data = StagedDataModule()
        curriculum = Curriculum([Stage("math", 100, {"math": 1.0}), Stage("all", 50, {"math": 1.0, "code": 1.0})])
        Trainer(callbacks=[curriculum]).fit(HFTModule(data.tokenizer), datamodule=data)
    """

    def __init__(self, stages: Sequence[Stage] = DEFAULT_STAGES):
        _validate_stages(stages)
        self.stages = [Stage(**asdict(s)) for s in stages]
        self.started = -1
        self.ended = -1
        self._trainer: pl.Trainer | None = None

    @staticmethod
    def of(trainer: pl.Trainer) -> Curriculum:
        """The trainer's curriculum callback.

        Raises:
            ConfigError: If the trainer has none or more than one.
        """
        found = [c for c in trainer.callbacks if isinstance(c, Curriculum)]
        if len(found) != 1:
            raise ConfigError(
                f"trainer.callbacks must contain exactly one hft_lightning.Curriculum, found {len(found)}; "
                "add one (class_path: hft_lightning.Curriculum) to trainer.callbacks"
            )
        return found[0]

    @property
    def stage_index(self) -> int:
        """Index of the stage being trained (the last one once training is over)."""
        if self._trainer is None:
            return 0
        return min(self._trainer.current_epoch, len(self.stages) - 1)

    @property
    def current_stage(self) -> Stage:
        """The stage being trained."""
        return self.stages[self.stage_index]

    def index(self, stage: Stage) -> int:
        """Position of ``stage`` in the plan (stages are identified by their unique names)."""
        return [s.name for s in self.stages].index(stage.name)

    def steps_before(self, index: int) -> int:
        """Optimizer steps of all stages before stage ``index``."""
        return sum(s.steps for s in self.stages[:index])

    def learned_at(self, ability: str) -> int | None:
        """Index of the first stage whose mixture trains ``ability`` (None if no stage does)."""
        return next((i for i, s in enumerate(self.stages) if s.mixture.get(ability, 0) > 0), None)

    def check_abilities(self, abilities: Sequence[str]) -> None:
        """Checks that every stage names only declared abilities.

        Raises:
            ConfigError: Naming the stage, the unknown ability and the declared ones.
        """
        for i, stage in enumerate(self.stages):
            unknown = sorted(set(stage.mixture) - set(abilities))
            if unknown:
                raise ConfigError(
                    f"Curriculum.stages[{i}] ({stage.name!r}).mixture names undeclared abilities {unknown}; "
                    f"declared in data.abilities: {list(abilities)}"
                )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit":
            return
        _check_trainer(trainer)
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "ability_names"):
            self.check_abilities(datamodule.ability_names)
        trainer.fit_loop.max_epochs = len(self.stages)
        trainer.reload_dataloaders_every_n_epochs = 1

    def _announce(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hook: str, index: int) -> None:
        for callback in trainer.callbacks:
            method = getattr(callback, hook, None)
            if callable(method):
                method(trainer, pl_module, self.stages[index])

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Boundaries are caught up here rather than in on_train_epoch_start, which Lightning skips for the epoch
        # a run resumes in (and a resume can land between a stage's last batch and its end hook).
        index = self.stage_index
        self._end_stages_up_to(trainer, pl_module, index - 1)
        if self.started < index:
            self.started = index
            self._announce(trainer, pl_module, "on_stage_start", index)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_stages_up_to(trainer, pl_module, self.stage_index)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run resumed from the last batch of the last stage runs no batch and no epoch end.
        if trainer.global_step >= self.steps_before(len(self.stages)):
            self._end_stages_up_to(trainer, pl_module, len(self.stages) - 1)

    def _end_stages_up_to(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        while self.ended < index:
            self.ended += 1
            self._announce(trainer, pl_module, "on_stage_end", self.ended)

    def plan(self) -> list[dict[str, Any]]:
        """The stage plan as plain data (for reports and logs)."""
        return [asdict(s) for s in self.stages]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stages": self.plan(), "started": self.started, "ended": self.ended}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["stages"] != self.plan():
            raise ConfigError(
                "Curriculum.stages differ from the checkpoint's plan; resume with the same stages.\n"
                f"checkpoint: {state_dict['stages']}\nconfig:     {self.plan()}"
            )
        self.started = state_dict["started"]
        self.ended = state_dict["ended"]
