"""The order written in the config (the default planner), or that order reversed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from typing_extensions import override

from hft_lightning.planners.base import Decision, Planner
from hft_lightning.probe import Probe


class Explicit(Planner):
    """Trains the single-ability stages in the order the config lists them, or in the reverse order.

    Args:
        reverse: Train the single-ability stages last-listed first (mixture stages keep their positions): the
            reversed order of the same config, for comparing orders. Stages that train the same ability keep
            their order among themselves.

    Example::

        Curriculum(stages, planner=Explicit(reverse=True))
    """

    def __init__(self, reverse: bool = False):
        super().__init__()
        self.reverse = reverse

    @override
    def settings(self) -> dict[str, Any]:
        return {"reverse": self.reverse}  # it takes no prerequisites

    @override
    def check(self, abilities: Sequence[str]) -> None:
        """Any list of stages has a configured order, repeated abilities included."""

    @override
    def order(self, abilities: list[str], probe: Probe | None) -> Decision:
        if self.reverse:
            return Decision(abilities[::-1], dict.fromkeys(abilities, "configured order, reversed"))
        return Decision(list(abilities), dict.fromkeys(abilities, "configured order"))
