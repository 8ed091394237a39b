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

Order: a :mod:`planner <hft_lightning.planners>` decides the order of the *single-ability* stages (a stage whose
mixture trains one ability); mixture stages keep their configured positions. A planner that only reads the config
(explicit, prerequisites) decides when the curriculum is built. A planner that measures the model decides in
``on_fit_start``: the model is on its device and a checkpoint's state is restored by then, and a restored plan is
kept, never measured again. Under DDP rank 0 measures and broadcasts its plan, so every process trains the same
order. ``configure_optimizers`` runs just before that hook, so if the plan moves stages of different lengths the
optimizers are set up again for the learning-rate schedule to follow the plan; the datamodule and the retention
callbacks read the stages only once training starts. The plan is printed, saved to ``report/plan.json`` and kept in
:meth:`Curriculum.state_dict`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from hft_lightning.errors import ConfigError
from hft_lightning.planners import Decision, Explicit, Planner, Probe
from hft_lightning.report import write_plan


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


ORDER_RULE = "single-ability stages are ordered by the planner; mixture stages keep their configured positions"
MIXTURE_WHY = "mixture: keeps its configured position"


def _single_ability(stage: Stage) -> str | None:
    """The one ability ``stage`` trains, or ``None`` for a mixture of several."""
    trained = [ability for ability, weight in stage.mixture.items() if weight > 0]
    return trained[0] if len(trained) == 1 else None


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


def _describe(planner: Planner) -> dict[str, Any]:
    """Which planner decides, as ``plan.json`` and the checkpoint record it: its class name and its arguments."""
    return {"planner": type(planner).__name__, "settings": planner.settings()}


def _as_call(described: dict[str, Any]) -> str:
    """What :func:`_describe` returns, written as the call that builds the planner: ``Affinity(examples=32, ...)``."""
    arguments = ", ".join(f"{name}={value!r}" for name, value in described["settings"].items())
    return f"{described['planner']}({arguments})"


class Curriculum(Callback):
    """Runs a plan of stages, one ability (or mixture) each, inside one ``trainer.fit``.

    Args:
        stages: The stages, in the configured order. Defaults to :data:`DEFAULT_STAGES`: a short foundation stage
            on an equal mixture of the built-in abilities, one stage per ability (math, code, general), then a
            unified stage on the mixture.
        planner: Decides the order of the single-ability stages (:mod:`hft_lightning.planners`); mixture stages
            keep their positions. ``None``: :class:`~hft_lightning.planners.Explicit`, the configured order.

    Attributes:
        configured: The stages as configured.
        stages: The stages in training order, once planned (:attr:`planned`); the configured order until then.

    Example::

        from lightning.pytorch import Trainer
        from hft_lightning import Curriculum, HFTModule, Stage, StagedDataModule

        data = StagedDataModule()
        curriculum = Curriculum([Stage("math", 100, {"math": 1.0}), Stage("all", 50, {"math": 1.0, "code": 1.0})])
        Trainer(callbacks=[curriculum]).fit(HFTModule(data.tokenizer), datamodule=data)
    """

    def __init__(self, stages: Sequence[Stage] = DEFAULT_STAGES, planner: Planner | None = None):
        _validate_stages(stages)
        self.configured = [Stage(**asdict(s)) for s in stages]
        self.planner = Explicit() if planner is None else planner
        self.planner.check(self._abilities_to_order())
        self.stages = list(self.configured)
        self.planned = False
        self._why = {s.name: MIXTURE_WHY for s in self.configured if _single_ability(s) is None}
        self._measurements: dict[str, Any] = {}
        self._probe_cost: dict[str, float] | None = None
        self._decided_by = _describe(self.planner)
        self.started = -1
        self.ended = -1
        self._trainer: pl.Trainer | None = None
        if not self.planner.measures:
            self._adopt(self.planner.order(self._abilities_to_order(), probe=None))

    def _restore_plan(self, plan: dict[str, Any]) -> None:
        """Adopts a plan as :meth:`state_dict` holds it (``order`` and ``explanation``), decided elsewhere."""
        explanation = plan["explanation"]
        by_name = {s.name: s for s in self.configured}
        self.stages = [by_name[name] for name in plan["order"]]
        self._why = {s["name"]: s["why"] for s in explanation["stages"]}
        self._measurements = explanation["measurements"]
        self._probe_cost = explanation["probe"]
        self._decided_by = {"planner": explanation["planner"], "settings": explanation["settings"]}
        self.planned = True

    def _abilities_to_order(self) -> list[str]:
        """The abilities of the single-ability stages, in configured order."""
        return [a for a in map(_single_ability, self.configured) if a is not None]

    def _adopt(self, decision: Decision, probe_cost: dict[str, float] | None = None) -> None:
        abilities = self._abilities_to_order()
        if sorted(decision.order) != sorted(abilities):
            raise ValueError(
                f"{type(self.planner).__name__}.order returned {decision.order}, not an order of {abilities}"
            )
        queues = {a: [s for s in self.configured if _single_ability(s) == a] for a in abilities}
        planned = iter([queues[a].pop(0) for a in decision.order])
        self.stages = [next(planned) if _single_ability(s) is not None else s for s in self.configured]
        self._why.update({s.name: decision.why[_single_ability(s)] for s in self.stages if _single_ability(s)})
        self._measurements = decision.measurements
        self._probe_cost = probe_cost
        self.planned = True

    def decide(
        self,
        module: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        """Orders the stages with a planner that measures the model (a no-op once :attr:`planned`).

        The probe's cost, its wall-clock seconds and the examples it measured, is kept in the plan.

        Args:
            module: The :class:`~hft_lightning.HFTModule` to measure, on the device to measure on.
            datamodule: The :class:`~hft_lightning.StagedDataModule` whose held-out examples are measured.
            context: Entered around every forward pass (the trainer's precision context).
        """
        if self.planned:
            return
        probe = Probe(module, datamodule, context)
        start = time.perf_counter()
        abilities = self._abilities_to_order()
        decision = (
            self.planner.order(abilities, probe)
            if len(abilities) > 1
            else Decision(abilities, dict.fromkeys(abilities, "the only single-ability stage"))
        )
        self._adopt(decision, {"examples": probe.examples_used, "seconds": round(time.perf_counter() - start, 3)})

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

    @property
    def affinity(self) -> dict[str, dict[str, float]] | None:
        """The gradient affinity of the abilities (``affinity[a][b]``, a cosine) if the plan measured it."""
        measured = self._measurements.get("affinity")
        if measured is None:
            return None
        names = measured["abilities"]
        return {a: dict(zip(names, row, strict=True)) for a, row in zip(names, measured["matrix"], strict=True)}

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

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.planned:
            lengths = [s.steps for s in self.stages]
            self._restore_plan(self._decide_on_rank_zero(trainer, pl_module))
            if [s.steps for s in self.stages] != lengths:  # the schedule configure_optimizers built is per stage
                trainer.strategy.setup_optimizers(trainer)
        rank_zero_info(self.describe())
        if trainer.is_global_zero:
            self.save_plan(trainer.default_root_dir)

    def _decide_on_rank_zero(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Rank 0 measures and decides; every process receives its plan, or its error and raises it too.

        One decision for all, because the same measurement can round differently on another device. A failure on
        rank 0 is broadcast as well, so the other processes stop with its message instead of waiting for a plan.
        """
        if trainer.is_global_zero:
            try:
                self.decide(pl_module, trainer.datamodule, trainer.precision_plugin.train_step_context)
            except Exception as error:
                failure = error if isinstance(error, ConfigError) else RuntimeError(f"rank 0 could not plan: {error!r}")
                trainer.strategy.broadcast((None, failure))
                raise
        plan, failure = trainer.strategy.broadcast((self._plan_state(), None))
        if failure is not None:
            raise failure
        return plan

    def save_plan(self, root_dir: str | Path) -> Path:
        """Writes ``plan.json`` (:meth:`explanation`), and the affinity heatmap if measured, to ``root_dir/report``.

        Returns:
            The path of ``plan.json``.
        """
        return write_plan(Path(root_dir) / "report", self.explanation())

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
        """The stages in training order as plain data, each with why it is there (for reports and logs)."""
        return [{**asdict(s), "why": self._reason(s)} for s in self.stages]

    def _reason(self, stage: Stage) -> str:
        return self._why.get(stage.name, "not planned yet: the planner measures the model at the start of fit")

    def explanation(self) -> dict[str, Any]:
        """The plan and how it was decided, as saved in ``report/plan.json``.

        Returns:
            ``planner`` (the class name of the planner that decided), ``settings`` (its arguments), ``rule`` (which
            stages the planner moves), ``configured_order`` (stage names), ``stages`` (:meth:`plan`),
            ``measurements`` (what the planner measured: ``difficulty`` or ``affinity``) and ``probe`` (``examples``
            and ``seconds`` the measurement cost; ``None`` if nothing was measured).
        """
        return {
            **self._decided_by,
            "rule": ORDER_RULE,
            "configured_order": [s.name for s in self.configured],
            "stages": self.plan(),
            "measurements": self._measurements,
            "probe": self._probe_cost,
        }

    def describe(self) -> str:
        """The plan as a text table: stage, what it trains, steps and why."""
        probe = self._probe_cost
        cost = f"; probe: {probe['examples']} examples in {probe['seconds']:.2f} s" if probe else ""
        rows = [("#", "stage", "trains", "steps", "why")]
        for i, stage in enumerate(self.stages, start=1):
            trains = _single_ability(stage) or "mixture"
            rows.append((str(i), stage.name, trains, str(stage.steps), self._reason(stage)))
        widths = [max(len(row[c]) for row in rows) for c in range(4)]
        lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4]]) for row in rows]
        return f"Curriculum plan (planner: {self._decided_by['planner']}{cost}; {ORDER_RULE})\n" + "\n".join(lines)

    def _plan_state(self) -> dict[str, Any]:
        return {"order": [s.name for s in self.stages], "explanation": self.explanation()}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "configured": [asdict(s) for s in self.configured],
            "planned": self.planned,
            **self._plan_state(),
            "started": self.started,
            "ended": self.ended,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        configured = [asdict(s) for s in self.configured]
        if state_dict["configured"] != configured:
            raise ConfigError(
                "Curriculum.stages differ from the checkpoint's plan; resume with the same stages.\n"
                f"checkpoint: {state_dict['configured']}\nconfig:     {configured}"
            )
        if state_dict["planned"]:
            explanation = state_dict["explanation"]
            configured_planner = _describe(self.planner)
            decided_by = {key: explanation[key] for key in configured_planner}
            if decided_by != configured_planner:
                rank_zero_warn(
                    f"Curriculum.planner is {_as_call(configured_planner)} but the checkpoint's plan was decided by "
                    f"{_as_call(decided_by)}; the run continues with the checkpoint's plan"
                )
            self._restore_plan(state_dict)
        self.started = state_dict["started"]
        self.ended = state_dict["ended"]
