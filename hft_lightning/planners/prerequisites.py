"""Order by declared prerequisites: every ability trains after the abilities it builds on."""

from __future__ import annotations

from typing_extensions import override

from hft_lightning.planners.base import Decision, Planner, topological_order
from hft_lightning.probe import Probe


class Prerequisites(Planner):
    """A topological order of the "builds on" graph; among abilities ready at the same time, config order wins.

    Args:
        prerequisites: Ability -> the abilities it builds on, e.g. ``{code: [math]}`` trains math before code.
            An ability not listed has none. A cycle, or a name no single-ability stage trains, is a
            :class:`~hft_lightning.errors.ConfigError` naming the abilities.

    Example::

        Curriculum(stages, planner=Prerequisites({"code": ["math"], "general": ["code"]}))
    """

    def __init__(self, prerequisites: dict[str, list[str]]):
        super().__init__(prerequisites)

    @override
    def order(self, abilities: list[str], probe: Probe | None) -> Decision:
        order = topological_order(abilities, self.prerequisites, key=abilities.index)
        why = {a: self.reason(a) or "no prerequisites" for a in order}
        return Decision(order, why)
