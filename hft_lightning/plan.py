"""The plan of a Hierarchical Fine-Tuning run: a value the curriculum decides once and pushes to its consumers.

A :class:`Plan` holds the stages in training order, why each is where it is, which planner decided and with which
settings, what it measured and what the measurement cost. It is plain data: it pickles (the curriculum broadcasts
it under DDP), it round-trips through :meth:`Plan.to_dict` / :meth:`Plan.from_dict` (``report/plan.json``, the
checkpoint) and it renders itself as a table for the terminal and for ``summary.md``.

Whoever needs the plan (the datamodule, the learning-rate schedule, the report) implements :class:`FollowsPlan` and
receives it from the :class:`~hft_lightning.Curriculum`; nothing looks it up, and each checks it was given one with
:func:`require_plan`. One epoch is one stage (:meth:`Plan.stage_index`). This module imports nothing else from the
package but its errors, so every layer may import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

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

ORDER_RULE = "single-ability stages are ordered by the planner; mixture stages keep their configured positions"
MIXTURE_WHY = "mixture: keeps its configured position"
UNPLANNED_WHY = "not planned yet: the planner measures the model at the start of fit"


def single_ability(stage: Stage) -> str | None:
    """The one ability ``stage`` trains, or ``None`` for a mixture of several."""
    trained = [ability for ability, weight in stage.mixture.items() if weight > 0]
    return trained[0] if len(trained) == 1 else None


def arrange(configured: Sequence[Stage], order: Sequence[str]) -> list[Stage]:
    """The configured stages, the single-ability ones in ``order`` (of their abilities): :data:`ORDER_RULE`.

    Mixture stages keep their positions; stages that train the same ability keep their order among themselves.
    """
    queues: dict[str, list[Stage]] = {}
    for stage in configured:
        ability = single_ability(stage)
        if ability is not None:
            queues.setdefault(ability, []).append(stage)
    planned = iter([queues[ability].pop(0) for ability in order])
    return [next(planned) if single_ability(s) is not None else s for s in configured]


@dataclass(frozen=True)
class Plan:
    """The stages in training order and how that order was decided.

    Attributes:
        stages: The stages in training order.
        why: The reason for each stage's place, one per stage.
        planner: The class name of the planner that decided.
        settings: The planner's arguments (JSON values).
        configured_order: The stage names in the order the config lists them.
        measurements: What the planner measured (``difficulty`` or ``affinity``), JSON values.
        probe: The measurement's cost, ``examples`` and ``seconds``; ``None`` when nothing was measured.

    Example::

        plan = Plan((Stage("math", 10, {"math": 1.0}),), ("configured order",), "Explicit", {}, ("math",))
        plan.steps_before(1), plan.learned_at("math")  # (10, 0)
    """

    stages: tuple[Stage, ...]
    why: tuple[str, ...]
    planner: str
    settings: dict[str, Any]
    configured_order: tuple[str, ...]
    measurements: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, float] | None = None

    def stage_index(self, epoch: int) -> int:
        """The stage trained in ``epoch`` (one epoch is one stage; the last stage once training is over)."""
        return min(epoch, len(self.stages) - 1)

    def steps_before(self, index: int) -> int:
        """Optimizer steps of all stages before stage ``index``."""
        return sum(s.steps for s in self.stages[:index])

    @property
    def stage_steps(self) -> list[int]:
        """Optimizer steps of each stage, in training order."""
        return [s.steps for s in self.stages]

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole plan."""
        return self.steps_before(len(self.stages))

    def learned_at(self, ability: str) -> int | None:
        """Index of the first stage whose mixture trains ``ability`` (None if no stage does)."""
        return next((i for i, s in enumerate(self.stages) if s.mixture.get(ability, 0) > 0), None)

    @property
    def affinity(self) -> dict[str, dict[str, float]] | None:
        """The gradient affinity of the abilities (``affinity[a][b]``, a cosine) if the planner measured it."""
        measured = self.measurements.get("affinity")
        if measured is None:
            return None
        names = measured["abilities"]
        return {a: dict(zip(names, row, strict=True)) for a, row in zip(names, measured["matrix"], strict=True)}

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON values, as saved in ``report/plan.json``.

        Returns:
            ``planner``, ``settings``, ``rule`` (:data:`ORDER_RULE`), ``configured_order``, ``stages`` (each with
            ``name``, ``steps``, ``mixture`` and ``why``), ``measurements`` and ``probe``.
        """
        return {
            "planner": self.planner,
            "settings": self.settings,
            "rule": ORDER_RULE,
            "configured_order": list(self.configured_order),
            "stages": [{**asdict(s), "why": why} for s, why in zip(self.stages, self.why, strict=True)],
            "measurements": self.measurements,
            "probe": self.probe,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """The plan :meth:`to_dict` returned."""
        return cls(
            stages=tuple(Stage(s["name"], s["steps"], dict(s["mixture"])) for s in data["stages"]),
            why=tuple(s["why"] for s in data["stages"]),
            planner=data["planner"],
            settings=data["settings"],
            configured_order=tuple(data["configured_order"]),
            measurements=data["measurements"],
            probe=data["probe"],
        )

    def decided_by(self) -> str:
        """The planner as the call that builds it: ``Affinity(examples=32, ...)``."""
        return f"{self.planner}({', '.join(f'{name}={value!r}' for name, value in self.settings.items())})"

    def table(self) -> str:
        """The plan as a text table for the terminal: stage, what it trains, steps and why."""
        cost = f"; probe: {self.probe['examples']} examples in {self.probe['seconds']:.2f} s" if self.probe else ""
        rows = [("#", "stage", "trains", "steps", "why")]
        for i, (stage, why) in enumerate(zip(self.stages, self.why, strict=True), start=1):
            rows.append((str(i), stage.name, single_ability(stage) or "mixture", str(stage.steps), why))
        widths = [max(len(row[c]) for row in rows) for c in range(4)]
        lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4]]) for row in rows]
        return f"Curriculum plan (planner: {self.planner}{cost}; {ORDER_RULE})\n" + "\n".join(lines)

    def markdown(self) -> list[str]:
        """The plan as markdown lines for ``summary.md``: who decided, then a table of the stages."""
        cost = f" (probe: {self.probe['examples']} examples, {self.probe['seconds']:.2f} s)" if self.probe else ""
        return [
            f"Order decided by the **{markdown_cell(self.planner)}** planner{cost}: {ORDER_RULE}; "
            "`plan.json` holds the measurements.",
            "",
            "| stage | mixture | steps | why |",
            "| --- | --- | ---: | --- |",
            *(
                f"| {markdown_cell(s.name)} | {markdown_cell(', '.join(f'{a} {w:g}' for a, w in s.mixture.items()))} "
                f"| {s.steps} | {markdown_cell(why)} |"
                for s, why in zip(self.stages, self.why, strict=True)
            ),
        ]


@runtime_checkable
class FollowsPlan(Protocol):
    """What receives the plan from the curriculum: the datamodule, the module (its schedule), the report."""

    def set_plan(self, plan: Plan) -> None:
        """Adopts ``plan``; called at setup and again once the plan is decided (a measuring planner, a resume)."""


def require_plan(plan: Plan | None, follower: str) -> Plan:
    """The plan the curriculum pushed to ``follower`` (a class name), checked before ``follower`` uses it.

    Raises:
        ConfigError: Naming ``follower`` and ``trainer.callbacks``, if no curriculum pushed a plan.
    """
    if plan is None:
        raise ConfigError(
            f"{follower} has no plan: trainer.callbacks must contain exactly one hft_lightning.Curriculum, listed "
            "before the callbacks that follow its plan"
        )
    return plan


def markdown_cell(text: str) -> str:
    """``text`` escaped for a cell of a markdown table."""
    return text.replace("|", "\\|")
