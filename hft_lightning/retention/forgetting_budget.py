"""A forgetting budget: every ability trained so far is watched during training, and a drop is acted on.

Every ``every_n_steps`` optimizer steps of a stage (by default about :data:`CHECKS_PER_STAGE` checks per stage, the
last at the stage's last step), the budget scores every ability trained so far and the ones training now on a fixed
probe of its validation split: :meth:`~hft_lightning.probe.Probe.score`, greedy generations of the first
``probe_examples`` examples of an order seeded by the data seed, judged by the ability's scorer. An ability's reference
is its best probe score since the end of the stage that first trained it (the check at that stage's last step seeds
it). When a score falls more than ``tau`` below its reference, the policy acts:

- ``warn``: the event is logged (a warning) and reported; training goes on unchanged.
- ``strengthen``: every :class:`~hft_lightning.retention.RetentionCallback` of the trainer is strengthened by
  ``factor`` (:meth:`~hft_lightning.retention.RetentionCallback.strengthen`: EWC's ``lam``, Replay's ``ratio``; GEM and
  A-GEM have no knob). The cumulative scale is this callback's checkpoint state and is applied again to the callbacks
  at the start of a resumed run.
- ``rollback``: the trainable weights and the optimizer's state go back to the last check at which every ability was
  within budget, then the retention callbacks are strengthened. Training goes on with the stage's next batches: the
  steps already taken count, so the plan's length, the learning-rate schedule and the global step are unchanged. The
  last good state is kept in CPU memory (with AdamW: the weights and two moments, 3x the trainable parameters), only
  under this policy; under FSDP2 each process keeps its shards of it (gathered into the checkpoint, and held whole
  by every process after a resume until the next good check replaces it).
- ``stop``: the rest of the stage is skipped. Its remaining batches are cut to one example and their updates dropped:
  every gradient is set to ``None`` after each backward pass, so AdamW leaves the weights and its moments as they
  are and no retention callback edits anything. The stage still runs its planned number of (empty) optimizer steps,
  so the global step, the learning-rate schedule, checkpoints, the stage's validation and every later stage keep the
  plan's step counts. A stopped stage is not probed again: its weights no longer change.

Checks run in ``on_train_batch_end``, after the optimizer and the learning-rate scheduler have stepped, before a
``ModelCheckpoint`` saves (Lightning runs checkpoint callbacks last) and, at a stage's last step, before the stage's
validation and the retention callbacks' consolidation: what a rollback restores is what validation scores and what the
next stage protects. Every process probes the same examples with the same weights; rank 0's scores are broadcast, so
every process takes the same decision even where a device rounds differently (as the curriculum does with its plan).

What the checkpoint holds (:meth:`ForgettingBudget.state_dict`): the live matrix (checked steps x abilities), each
ability's best, the events, the strength scale, the stopped stage, the last good state (rollback only) and the probes'
seconds, so a run resumed after an event continues as the uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from typing_extensions import override

from hft_lightning.errors import ConfigError
from hft_lightning.plan import Plan, markdown_cell, require_plan, single_ability
from hft_lightning.probe import Probe
from hft_lightning.report import Section
from hft_lightning.retention.base import RetentionCallback
from hft_lightning.retention.parameters import match_names, trainable
from hft_lightning.sharding import CPUShard, copy_into, gathered, to_cpu

POLICIES = ("warn", "strengthen", "rollback", "stop")
"""What the budget does when an ability falls out of it."""

CHECKS_PER_STAGE = 5
"""Checks per stage when ``every_n_steps`` is ``None``: every ``ceil(steps / 5)`` steps, and at the stage's end."""


class ForgettingBudget(Callback):
    """Probes every trained ability during each stage and acts when one falls more than ``tau`` below its best.

    It watches and acts on the retention callbacks; it is not one of them (it is never strengthened itself). List
    it after the :class:`~hft_lightning.Curriculum`, which pushes the plan it follows.

    Args:
        tau: How far (in score, [0, 1]) an ability may fall below its best before the policy acts (>= 0).
        policy: ``warn``, ``strengthen``, ``rollback`` or ``stop`` (see the module docstring).
        factor: What ``strengthen`` and ``rollback`` multiply the retention callbacks' strength by (> 1).
        every_n_steps: Optimizer steps between two checks of a stage (> 0), plus one at each stage's end. ``None``:
            about :data:`CHECKS_PER_STAGE` checks per stage, from each stage's length.
        probe_examples: Validation examples per ability in the probe (> 0).
        batch_size: Probe examples generated per forward pass (> 0).

    Example::

        trainer = Trainer(callbacks=[Curriculum(), EWC(), ForgettingBudget(policy="strengthen"), Report()])
    """

    def __init__(
        self,
        tau: float = 0.05,
        policy: str = "warn",
        factor: float = 2.0,
        every_n_steps: int | None = None,
        probe_examples: int = 32,
        batch_size: int = 32,
    ):
        where = "ForgettingBudget({}={!r}): {} must be {}"
        if not (math.isfinite(tau) and tau >= 0):
            raise ConfigError(where.format("tau", tau, "tau", "a finite number >= 0"))
        if policy not in POLICIES:
            raise ConfigError(where.format("policy", policy, "policy", f"one of {', '.join(POLICIES)}"))
        if not (math.isfinite(factor) and factor > 1):
            raise ConfigError(where.format("factor", factor, "factor", "> 1 (a finite number)"))
        for name, value in {"every_n_steps": every_n_steps, "probe_examples": probe_examples,
                            "batch_size": batch_size}.items():  # fmt: skip
            if value is not None and value <= 0:
                raise ConfigError(where.format(name, value, name, "> 0"))
        self.tau = tau
        self.policy = policy
        self.factor = factor
        self.every_n_steps = every_n_steps
        self.probe_examples = probe_examples
        self.batch_size = batch_size
        self.plan: Plan | None = None
        self.abilities: list[str] = []
        self.steps: list[int] = []
        self.scores: dict[str, list[float | None]] = {}
        self.best: dict[str, float] = {}
        self.events: list[dict[str, Any]] = []
        self.scale = 1.0
        self.stopped = -1
        self.last_check = 0
        self.good: dict[str, Any] | None = None
        self.seconds = 0.0
        self._applied = 1.0  # the part of self.scale applied to this process's retention callbacks

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            tau=self.tau, policy=self.policy, factor=self.factor, every_n_steps=self.every_n_steps,
            probe_examples=self.probe_examples,
        )  # fmt: skip

    def set_plan(self, plan: Plan) -> None:
        """Follows ``plan`` (pushed by the curriculum): its stages, their lengths, what each trains."""
        self.plan = plan

    def _every(self, index: int) -> int:
        return self.every_n_steps or max(1, math.ceil(self.plan.stages[index].steps / CHECKS_PER_STAGE))

    def _watched(self, index: int) -> list[str]:
        """The scored abilities that stages ``0..index`` train, in declaration order."""
        return [a for a in self.abilities if (learned := self.plan.learned_at(a)) is not None and learned <= index]

    def _retention(self, trainer: pl.Trainer) -> list[RetentionCallback]:
        return [c for c in trainer.callbacks if isinstance(c, RetentionCallback)]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_plan(self.plan, "ForgettingBudget")
        self.abilities = [a.name for a in trainer.datamodule.abilities if a.scorer is not None]
        if not self.abilities:
            raise ConfigError("ForgettingBudget watches abilities by their score, and no data.abilities has a scorer")
        if self.policy in ("strengthen", "rollback") and not self._retention(trainer):
            raise ConfigError(
                f"ForgettingBudget(policy={self.policy!r}) strengthens the retention callbacks, and trainer.callbacks "
                "has none; add one (e.g. hft_lightning.retention.EWC) or use policy 'warn' or 'stop'"
            )
        plugin = trainer.precision_plugin
        if self.policy == "stop" and isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            raise ConfigError(
                "ForgettingBudget(policy='stop') skips updates by dropping their gradients, which the fp16 gradient "
                "scaler refuses; use trainer.precision bf16-mixed or 32, or another policy"
            )
        self.scores = {a: [] for a in self.abilities}  # a checkpoint's, loaded after setup, replaces it

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.scale != self._applied:  # a restored scale: the callbacks start this process at 1
            for callback in self._retention(trainer):
                callback.strengthen(self.scale / self._applied)
            self._applied = self.scale
        if self.good is not None:
            match_names("ForgettingBudget's last good weights", self.good["params"], trainable(pl_module))

    def _stage_stopped(self, trainer: pl.Trainer) -> bool:
        return self.stopped == self.plan.stage_index(trainer.current_epoch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict[str, Any], batch_idx: int
    ) -> None:
        if self._stage_stopped(trainer):  # its update is dropped: one example is enough to run the step
            batch.update({key: value[:1] for key, value in batch.items()})

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every backward pass, not before the optimizer step: every retention callback's gradient edit then
        # finds no gradient, whatever the order of the callbacks.
        if self._stage_stopped(trainer):
            for p in pl_module.parameters():
                p.grad = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        index = self.plan.stage_index(trainer.current_epoch)
        start, end = self.plan.steps_before(index), self.plan.steps_before(index + 1)
        if step <= max(start, self.last_check) or ((step - start) % self._every(index) and step != end):
            return  # not a check step, or checked already (the micro-batches of one step, a resumed step)
        self.last_check = step
        if self._stage_stopped(trainer):
            if step == end:  # the weights are those of the check that stopped the stage
                self._update_bests(step, {a: self.scores[a][-1] for a in self.abilities})
            return
        scores = self._probe(trainer, pl_module, index)
        self.steps.append(step)
        for ability in self.abilities:
            self.scores[ability].append(scores.get(ability))
            if ability in scores:
                pl_module.log(f"budget/{ability}/score", scores[ability])
        fallen = [a for a, score in scores.items() if a in self.best and score < self.best[a] - self.tau]
        if fallen:
            scores = self._act(trainer, pl_module, index, step, fallen, scores)
        elif self.policy == "rollback":
            self.good = None  # freed before the copy is taken: one copy in memory at a time, not two
            self.good = self._state(trainer, pl_module, step, scores)
        self._update_bests(step, scores)
        pl_module.log("budget/strength_scale", self.scale)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> dict[str, float]:
        """Every watched ability's probe score; rank 0's on every process."""
        begin = time.perf_counter()
        probe = Probe(pl_module, trainer.datamodule, trainer.precision_plugin.train_step_context)
        scores = {a: probe.score(a, self.probe_examples, self.batch_size) for a in self._watched(index)}
        scores = trainer.strategy.broadcast(scores)
        self.seconds += time.perf_counter() - begin
        return scores

    def _update_bests(self, step: int, scores: dict[str, float | None]) -> None:
        """Raises each best to ``scores``, from the end of the stage that first trained the ability on."""
        for ability, score in scores.items():
            if score is not None and step >= self.plan.steps_before(self.plan.learned_at(ability) + 1):
                self.best[ability] = max(self.best.get(ability, score), score)

    def _act(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        index: int,
        step: int,
        fallen: list[str],
        scores: dict[str, float],
    ) -> dict[str, float]:
        """Applies the policy to the abilities that fell; returns the scores of the weights training goes on with."""
        event = {"step": step, "stage": self.plan.stages[index].name, "action": self.policy}
        if self.policy == "rollback":
            event["restored_step"] = None if self.good is None else self.good["step"]
            if self.good is not None:
                self._restore(trainer, pl_module, self.good)
                scores = self.good["scores"]
        if self.policy in ("strengthen", "rollback"):
            for callback in self._retention(trainer):
                callback.strengthen(self.factor)
            self.scale *= self.factor
            self._applied = self.scale
            event["scale"] = self.scale
        if self.policy == "stop":
            self.stopped = index
        for ability in fallen:
            now = self.scores[ability][-1]
            self.events.append({**event, "ability": ability, "best": self.best[ability], "now": now})
            rank_zero_warn(
                f"ForgettingBudget: at step {step} ({event['stage']}) {ability} scored {now:.3f}, more than "
                f"tau={self.tau} below its best {self.best[ability]:.3f}; {describe(self.events[-1])}"
            )
        return scores

    def _state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, scores: dict[str, float]
    ) -> dict[str, Any]:
        """The weights and the optimizer's state by parameter name, in CPU memory, with the scores they probed.

        Under FSDP2 each process keeps its shards (:func:`~hft_lightning.sharding.to_cpu`).
        """
        params = trainable(pl_module)
        optimizer = trainer.optimizers[0]
        return {
            "step": step,
            "scores": dict(scores),
            "params": {name: to_cpu(p) for name, p in params.items()},
            "optimizer": {
                name: {key: _cpu_copy(value) for key, value in optimizer.state[p].items()}
                for name, p in params.items()
                if p in optimizer.state
            },
        }

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any]) -> None:
        """Puts the weights and the optimizer's per-parameter state of ``state`` back, bit for bit, in place.

        The optimizer's parameter groups (the learning rate the schedule has set for the next step) are kept. A
        parameter without optimizer state in ``state`` loses its current one, as on a resume.

        Raises:
            RuntimeError: If the optimizer no longer holds a tensor it held at the good check (no torch optimizer
                drops one: a parameter's state only grows).
        """
        params = trainable(pl_module)
        match_names("ForgettingBudget's last good weights", state["params"], params)
        optimizer = trainer.optimizers[0]
        for name, p in params.items():
            copy_into(p, state["params"][name])
            saved = state["optimizer"].get(name)
            if not saved:
                optimizer.state.pop(p, None)
                continue
            live = optimizer.state[p]
            for key in set(live) - set(saved):
                del live[key]
            for key, value in saved.items():
                if isinstance(live.get(key), torch.Tensor):
                    copy_into(live[key], value)
                elif isinstance(value, torch.Tensor | CPUShard):
                    raise RuntimeError(
                        f"ForgettingBudget: the optimizer no longer holds {key!r} of {name}, so the good check's "
                        "state cannot be restored in place"
                    )
                else:
                    live[key] = copy.deepcopy(value)

    def report_section(self) -> Section:
        """The ``live`` part of the report: the probe scores at every check, the events, a figure."""
        checks = len(self.steps)
        data = {
            "steps": list(self.steps),
            "scores": {a: list(values) for a, values in self.scores.items()},
            "events": copy.deepcopy(self.events),
            "best": dict(self.best),
            "policy": self.policy,
            "tau": self.tau,
            "strength_scale": self.scale,
            "probe_examples": self.probe_examples,
            "seconds_per_check": round(self.seconds / checks, 3) if checks else None,
        }
        per_check = f", {self.seconds / checks:.2f} s each" if checks else ""
        lines = [
            "## Forgetting budget",
            "",
            f"Every ability trained so far was scored on {self.probe_examples} validation examples at {checks} checks"
            f"{per_check}. Policy **{self.policy}** when an ability falls more than tau = {self.tau:g} below its best "
            f"since the end of the stage that first trained it; strength scale at the end: {self.scale:g}.",
            "",
        ]
        if self.events:
            lines += ["| step | stage | ability | best | now | action |", "| ---: | --- | --- | ---: | ---: | --- |"]
            lines += [
                f"| {e['step']} | {markdown_cell(e['stage'])} | {markdown_cell(e['ability'])} | {e['best']:.3f} "
                f"| {e['now']:.3f} | {describe(e)} |"
                for e in self.events
            ]
        else:
            lines.append(f"No ability fell more than tau = {self.tau:g} below its best.")
        lines += ["", "![Live probe scores](live_scores.png)"]
        return Section("live", data, lines, {"scores": self._figure()})

    def _figure(self) -> Figure:
        colours = {name: f"C{j % 10}" for j, name in enumerate(self.abilities)}
        figure = Figure(figsize=(8.0, 4.2), layout="constrained")
        ax = figure.add_subplot()
        for i, stage in enumerate(self.plan.stages):
            trained = single_ability(stage)
            start, end = self.plan.steps_before(i), self.plan.steps_before(i + 1)
            ax.axvspan(start, end, color=colours.get(trained, "0.5"), alpha=0.09, linewidth=0)
            ax.text((start + end) / 2, 1.05, stage.name, ha="center", va="bottom", fontsize=8, clip_on=False)
        for ability in self.abilities:
            points = [(s, v) for s, v in zip(self.steps, self.scores[ability], strict=True) if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, color=colours[ability], label=ability)
        for e in self.events:
            ax.plot(e["step"], e["now"], marker="v", markersize=9, color="red", linestyle="none")
        ax.set_xlim(0, self.plan.total_steps)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("optimizer step   (band: a stage, in the colour of its ability; grey: a mixture; red: an event)")
        ax.set_ylabel("probe score")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title("Live probe scores during training", fontweight="bold", pad=18)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="ability")
        return figure

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "scores": self.scores,
            "best": self.best,
            "events": self.events,
            "scale": self.scale,
            "stopped": self.stopped,
            "last_check": self.last_check,
            "good": gathered(self.good),
            "seconds": self.seconds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = {key: value if key == "good" else copy.deepcopy(value) for key, value in state_dict.items()}
        self.steps, self.scores, self.best = state["steps"], state["scores"], state["best"]
        self.events, self.scale, self.stopped = state["events"], state["scale"], state["stopped"]
        self.last_check, self.good, self.seconds = state["last_check"], state["good"], state["seconds"]


def describe(event: dict[str, Any]) -> str:
    """What was done about an event, in words."""
    action = event["action"]
    if action == "warn":
        return "warned"
    if action == "stop":
        return "stopped the stage"
    strengthened = f"strengthened retention (scale {event['scale']:g})"
    if action == "strengthen":
        return strengthened
    restored = event["restored_step"]
    return ("rolled back to step " + str(restored) if restored is not None else "no good state to roll back to") + (
        f", {strengthened}"
    )


def _cpu_copy(value: Any) -> Any:
    return to_cpu(value) if isinstance(value, torch.Tensor) else copy.deepcopy(value)
