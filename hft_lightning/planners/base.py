"""What every planner shares: the decision it returns and the prerequisites it honours.

A planner decides the training order of the curriculum's *single-ability* stages (a stage whose mixture trains one
ability); mixture stages keep the positions the config gives them, so a foundation stage stays first and a unified
stage last. The planner sees the abilities of those stages in config order and returns them in training order,
with a reason per ability for the plan table.

Prerequisites (``{code: [math]}``: code builds on math) are hard constraints for every planner but
:class:`~hft_lightning.planners.Explicit`: a measured planner orders only within what they allow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from hft_lightning.errors import ConfigError

if TYPE_CHECKING:
    from hft_lightning.probe import Probe

PrerequisiteMap = Mapping[str, Sequence[str]]
"""Ability -> the abilities it builds on, which must be trained before it."""


@dataclass
class Decision:
    """A planner's order of the single-ability stages, and why.

    Attributes:
        order: The abilities of the single-ability stages, in training order.
        why: Ability -> the reason for its place, shown in the plan table and saved in ``plan.json``.
        measurements: What the planner measured, JSON-serialisable, saved in ``plan.json`` (for example
            ``{"difficulty": {"math": 2.1, ...}}``).
    """

    order: list[str]
    why: dict[str, str]
    measurements: dict[str, Any] = field(default_factory=dict)


class Planner(ABC):
    """Decides the order in which the single-ability stages train.

    Subclasses implement :meth:`order`; a planner that measures the model sets :attr:`measures` and receives a
    :class:`~hft_lightning.planners.Probe` at the start of ``fit``, the others decide when the curriculum is built.

    Args:
        prerequisites: Ability -> abilities it builds on (trained first); hard constraints on the order.
    """

    measures: ClassVar[bool] = False
    """Whether :meth:`order` measures the model (then it runs at the start of fit, after a checkpoint restore)."""

    def __init__(self, prerequisites: dict[str, list[str]] | None = None):
        self.prerequisites = {ability: list(before) for ability, before in (prerequisites or {}).items()}

    def check(self, abilities: Sequence[str]) -> None:
        """Checks the planner's arguments against the abilities it will order.

        Raises:
            ConfigError: Two single-ability stages train the same ability (a planner orders abilities), a
                prerequisite names an ability no single-ability stage trains, or prerequisites form a cycle; the
                message names the abilities.
        """
        repeated = sorted({a for a in abilities if list(abilities).count(a) > 1})
        if repeated:
            raise ConfigError(
                f"Curriculum.stages: {repeated} each train alone in more than one stage, but "
                f"Curriculum.planner ({type(self).__name__}) orders abilities; give each ability one single-ability "
                "stage, or use the Explicit planner"
            )
        check_prerequisites(self.prerequisites, abilities)

    @abstractmethod
    def order(self, abilities: list[str], probe: Probe | None) -> Decision:
        """Orders ``abilities`` (those of the single-ability stages, in config order).

        Args:
            abilities: The abilities to order, in config order.
            probe: Measures the model and data; ``None`` for a planner that does not measure.
        """

    def settings(self) -> dict[str, Any]:
        """The planner's arguments, saved with the plan (``plan.json``, the checkpoint): a resume compares them.

        The default records the public attributes that hold plain JSON values (strings, numbers, booleans,
        ``None``, and lists and string-keyed dicts of those), which for the built-in planners are their arguments;
        a planner with other arguments overrides it.
        """
        return {name: value for name, value in vars(self).items() if not name.startswith("_") and _is_json(value)}

    def reason(self, ability: str, measured: str = "") -> str:
        """``measured`` and the prerequisites of ``ability``, when there are any: a row of the plan table."""
        before = self.prerequisites.get(ability, [])
        return "; ".join(part for part in (measured, f"builds on {', '.join(before)}" if before else "") if part)


def _is_json(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(_is_json(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_json(item) for key, item in value.items())
    return value is None or isinstance(value, str | int | float | bool)


def check_prerequisites(prerequisites: PrerequisiteMap, abilities: Sequence[str]) -> None:
    """Checks that ``prerequisites`` name only ``abilities`` and have no cycle.

    Raises:
        ConfigError: Naming the unknown ability and the known ones, or the abilities of a cycle in order.
    """
    known = list(abilities)
    field_name = "Curriculum.planner.prerequisites"
    for ability, before in prerequisites.items():
        for name in (ability, *before):
            if name not in known:
                where = field_name if name == ability else f"{field_name}[{ability!r}]"
                raise ConfigError(
                    f"{where} names {name!r}, which no single-ability stage trains; abilities with their own stage: "
                    f"{known}"
                )
    cycle = _find_cycle(prerequisites, known)
    if cycle:
        path = " -> ".join([*cycle, cycle[0]])
        raise ConfigError(
            f"{field_name} form a cycle: {path} (each builds on the next), so no order trains every ability after "
            f"its prerequisites; abilities in the cycle: {sorted(cycle)}"
        )


def _find_cycle(prerequisites: PrerequisiteMap, abilities: list[str]) -> list[str]:
    """A cycle of the "builds on" graph as a list of abilities, or ``[]``; depth-first, in ability order."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(ability: str) -> list[str]:
        state[ability] = "open"
        path.append(ability)
        for before in prerequisites.get(ability, []):
            if state.get(before) == "open":
                return path[path.index(before) :]
            if before not in state:
                cycle = visit(before)
                if cycle:
                    return cycle
        state[ability] = "done"
        path.pop()
        return []

    for ability in abilities:
        if ability not in state:
            cycle = visit(ability)
            if cycle:
                return cycle
    return []


def ready(ability: str, placed: Sequence[str], prerequisites: PrerequisiteMap) -> bool:
    """Whether every prerequisite of ``ability`` is already in ``placed``."""
    return all(before in placed for before in prerequisites.get(ability, []))


def topological_order(abilities: Sequence[str], prerequisites: PrerequisiteMap, key: Callable[[str], Any]) -> list[str]:
    """The order that always trains next the ready ability with the smallest ``key`` (Kahn's algorithm).

    Args:
        abilities: The abilities, free of cycles (see :func:`check_prerequisites`).
        prerequisites: Ability -> abilities that must come before it.
        key: Sort key among the abilities ready at a step; ties keep ``abilities`` order.
    """
    order: list[str] = []
    remaining = list(abilities)
    while remaining:
        ready_now = [a for a in remaining if ready(a, order, prerequisites)]
        chosen = min(ready_now, key=key)
        order.append(chosen)
        remaining.remove(chosen)
    return order


def check_budget(examples: int, batch_size: int) -> None:
    """Checks a measured planner's probe budget.

    Raises:
        ConfigError: Naming the field that is not a positive number.
    """
    for name, value in (("examples", examples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"Curriculum.planner.{name} must be a positive number of examples, got {value!r}")
