"""The curriculum: decides the :class:`~hft_lightning.plan.Plan` and announces its stage boundaries in ``fit``.

Design: one epoch is one stage. The curriculum sets ``max_epochs`` to the number of stages and asks the trainer to
rebuild the training dataloader every epoch; the datamodule builds each epoch's loader from the plan it was given.
Validation at the end of an epoch is therefore the evaluation *after* that stage, which is what the accuracy
matrix records.

Data flows one way. The curriculum runs the planner, keeps the resulting :class:`~hft_lightning.plan.Plan` and
pushes it to every object that :class:`~hft_lightning.plan.FollowsPlan` (the datamodule, the module's learning-rate
schedule, the report callback): in ``setup``, and again in ``on_fit_start`` once the plan is final. At a stage
boundary every callback that defines ``on_stage_end(trainer, pl_module, stage, index)`` and
``on_stage_start(trainer, pl_module, stage, index)`` (the retention callbacks) is told, in that order. The indices
of the last stage started and ended are saved in :meth:`Curriculum.state_dict`, and pending announcements are made
before the next training batch, so a run resumed from any checkpoint (mid-stage, or between a stage's last batch and
its end) announces each boundary exactly once.

Order: a :mod:`planner <hft_lightning.planners>` decides the order of the *single-ability* stages; mixture stages
keep their configured positions. A planner that only reads the config (explicit, prerequisites) decides when the
curriculum is built. A planner that measures the model decides in ``on_fit_start``: the model is on its device and a
checkpoint's state is restored by then, and a restored plan is kept, never measured again. Under DDP rank 0 measures
and broadcasts the plan, so every process trains the same order. ``configure_optimizers`` runs just before that
hook, so if the plan moves stages of different lengths the optimizers are set up again for the schedule to follow
it. The plan is printed, saved to ``report/plan.json`` and kept in :meth:`Curriculum.state_dict`.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from hft_lightning.checks import check_callback_order, check_stage_hooks, check_trainer, validate_stages
from hft_lightning.errors import ConfigError
from hft_lightning.plan import (
    DEFAULT_STAGES,
    MIXTURE_WHY,
    UNPLANNED_WHY,
    FollowsPlan,
    Plan,
    Stage,
    arrange,
    single_ability,
)
from hft_lightning.planners import Decision, Explicit, Planner, Probe
from hft_lightning.report import write_plan

__all__ = ["DEFAULT_STAGES", "Curriculum", "Stage"]


class Curriculum(Callback):
    """Runs a plan of stages, one ability (or mixture) each, inside one ``trainer.fit``.

    Args:
        stages: The stages, in the configured order. Defaults to :data:`~hft_lightning.plan.DEFAULT_STAGES`: a short
            foundation stage on an equal mixture of the built-in abilities, one stage per ability (math, code,
            general), then a unified stage on the mixture.
        planner: Decides the order of the single-ability stages (:mod:`hft_lightning.planners`); mixture stages
            keep their positions. ``None``: :class:`~hft_lightning.planners.Explicit`, the configured order.

    Attributes:
        configured: The stages as configured.
        plan: The plan; until a measuring planner has decided (:attr:`planned`), the configured order.

    A Trainer built in Python lists a :class:`~hft_lightning.callbacks.Report` after the curriculum (the command line
    adds it itself): without one, ``fit`` trains but writes no report and exports no model.

    Example::

        from lightning.pytorch import Trainer
        from hft_lightning import Curriculum, HFTModule, Report, Stage, StagedDataModule

        data = StagedDataModule()
        curriculum = Curriculum([Stage("math", 100, {"math": 1.0}), Stage("all", 50, {"math": 1.0, "code": 1.0})])
        Trainer(callbacks=[curriculum, Report()]).fit(HFTModule(data.tokenizer), datamodule=data)
    """

    def __init__(self, stages: Sequence[Stage] = DEFAULT_STAGES, planner: Planner | None = None):
        validate_stages(stages)
        self.configured = tuple(Stage(**asdict(s)) for s in stages)
        self.planner = Explicit() if planner is None else planner
        self.planner.check(self._abilities_to_order())
        self._settings = self.planner.settings()  # as configured: a measuring planner may keep counters
        self.plan = self._plan(
            self.configured, {s.name: MIXTURE_WHY if single_ability(s) is None else UNPLANNED_WHY for s in stages}
        )
        self.planned = False
        self.started = -1
        self.ended = -1
        self._trainer: pl.Trainer | None = None
        self._schedule_steps: list[int] = []
        if not self.planner.measures:
            self._adopt(self.planner.order(self._abilities_to_order(), probe=None))

    def _abilities_to_order(self) -> list[str]:
        """The abilities of the single-ability stages, in configured order."""
        return [a for a in map(single_ability, self.configured) if a is not None]

    def _plan(
        self,
        stages: Sequence[Stage],
        why: dict[str, str],
        measurements: dict[str, Any] | None = None,
        probe: dict[str, float] | None = None,
    ) -> Plan:
        return Plan(
            stages=tuple(stages),
            why=tuple(why[s.name] for s in stages),
            planner=type(self.planner).__name__,
            settings=copy.deepcopy(self._settings),  # a Plan is frozen: it shares no dict with the planner
            configured_order=tuple(s.name for s in self.configured),
            measurements=measurements or {},
            probe=probe,
        )

    def _adopt(self, decision: Decision, probe_cost: dict[str, float] | None = None) -> None:
        abilities = self._abilities_to_order()
        if sorted(decision.order) != sorted(abilities):
            raise ValueError(
                f"{type(self.planner).__name__}.order returned {decision.order}, not an order of {abilities}"
            )
        stages = arrange(self.configured, decision.order)
        why = {s.name: MIXTURE_WHY if single_ability(s) is None else decision.why[single_ability(s)] for s in stages}
        self.plan = self._plan(stages, why, decision.measurements, probe_cost)
        self.planned = True

    def decide(
        self,
        module: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> Plan:
        """Orders the stages with a planner that measures the model (a no-op once :attr:`planned`).

        The probe's cost, its wall-clock seconds and the examples it measured, is kept in the plan.

        Args:
            module: The :class:`~hft_lightning.HFTModule` to measure, on the device to measure on.
            datamodule: The :class:`~hft_lightning.StagedDataModule` whose held-out examples are measured.
            context: Entered around every forward pass (the trainer's precision context).

        Returns:
            The plan.
        """
        if self.planned:
            return self.plan
        probe = Probe(module, datamodule, context)
        start = time.perf_counter()
        abilities = self._abilities_to_order()
        decision = (
            self.planner.order(abilities, probe)
            if len(abilities) > 1
            else Decision(abilities, dict.fromkeys(abilities, "the only single-ability stage"))
        )
        self._adopt(decision, {"examples": probe.examples_used, "seconds": round(time.perf_counter() - start, 3)})
        return self.plan

    @staticmethod
    def of(trainer: pl.Trainer) -> Curriculum:
        """The trainer's curriculum callback (for the command line and tools outside the training loop).

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
        return 0 if self._trainer is None else self.plan.stage_index(self._trainer.current_epoch)

    @property
    def current_stage(self) -> Stage:
        """The stage being trained."""
        return self.plan.stages[self.stage_index]

    def check_abilities(self, abilities: Sequence[str], evaluated_only: Sequence[str] = ()) -> None:
        """Checks that every stage names only declared abilities that have training data.

        Args:
            abilities: The declared abilities.
            evaluated_only: Those of them with no training data (scored by an lm-evaluation-harness task only).

        Raises:
            ConfigError: Naming the stage, the unknown or untrainable ability and the declared ones.
        """
        for i, stage in enumerate(self.configured):
            field = f"Curriculum.stages[{i}] ({stage.name!r}).mixture"
            unknown = sorted(set(stage.mixture) - set(abilities))
            if unknown:
                raise ConfigError(
                    f"{field} names undeclared abilities {unknown}; declared in data.abilities: {list(abilities)}"
                )
            untrainable = sorted(set(stage.mixture) & set(evaluated_only))
            if untrainable:
                raise ConfigError(
                    f"{field} names abilities {untrainable} that have no training data (lm_eval only); give them a "
                    "train file or remove them from the mixture"
                )

    def _push(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hands the plan to the datamodule, the module and every callback that follows it."""
        for follower in (trainer.datamodule, pl_module, *trainer.callbacks):
            if isinstance(follower, FollowsPlan):
                follower.set_plan(self.plan)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self.of(trainer)  # exactly one curriculum pushes a plan
        if stage != "fit":
            return
        check_callback_order(trainer.callbacks, self)
        check_stage_hooks(trainer.callbacks)
        check_trainer(trainer)
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "ability_names"):
            self.check_abilities(datamodule.ability_names, getattr(datamodule, "evaluated_only", ()))
        trainer.fit_loop.max_epochs = len(self.configured)
        trainer.reload_dataloaders_every_n_epochs = 1
        self._push(trainer, pl_module)
        self._schedule_steps = self.plan.stage_steps  # what configure_optimizers, which runs next, will follow

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plan = self._decide_on_rank_zero(trainer, pl_module)
        self.planned = True
        self._push(trainer, pl_module)
        if self.plan.stage_steps != self._schedule_steps:  # a restored or measured plan moved stages of other lengths
            trainer.strategy.setup_optimizers(trainer)
        rank_zero_info(self.plan.table())
        if trainer.is_global_zero:
            self.save_plan(trainer.default_root_dir)

    def _decide_on_rank_zero(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Plan:
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
        plan, failure = trainer.strategy.broadcast((self.plan, None))
        if failure is not None:
            raise failure
        return plan

    def save_plan(self, root_dir: str | Path) -> Path:
        """Writes ``plan.json`` (:meth:`Plan.to_dict`), and the affinity heatmap if measured, to ``root_dir/report``.

        Returns:
            The path of ``plan.json``.
        """
        return write_plan(Path(root_dir) / "report", self.plan)

    def _announce(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hook: str, index: int) -> None:
        for callback in trainer.callbacks:
            method = getattr(callback, hook, None)
            if callable(method):
                method(trainer, pl_module, self.plan.stages[index], index)

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
        if trainer.global_step >= self.plan.total_steps:
            self._end_stages_up_to(trainer, pl_module, len(self.plan.stages) - 1)

    def _end_stages_up_to(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        while self.ended < index:
            self.ended += 1
            self._announce(trainer, pl_module, "on_stage_end", self.ended)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "configured": [asdict(s) for s in self.configured],
            "planned": self.planned,
            "plan": self.plan.to_dict(),
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
            restored = Plan.from_dict(state_dict["plan"])
            if restored.decided_by() != self.plan.decided_by():
                rank_zero_warn(
                    f"Curriculum.planner is {self.plan.decided_by()} but the checkpoint's plan was decided by "
                    f"{restored.decided_by()}; the run continues with the checkpoint's plan"
                )
            self.plan, self.planned = restored, True
        self.started = state_dict["started"]
        self.ended = state_dict["ended"]
