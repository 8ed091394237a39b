"""Planners: who decides the order of the curriculum's single-ability stages, and why.

Select one in the config as the :class:`~hft_lightning.Curriculum`'s ``planner``:

- :class:`Explicit` (the default): the order the config lists (or its reverse);
- :class:`Prerequisites`: a topological order of declared "builds on" relations;
- :class:`Difficulty`: easiest first, by the base model's loss on held-out examples;
- :class:`Affinity`: consecutive stages with the most similar loss gradients.

Mixture stages (a foundation stage, the unified stage) keep their configured positions.
"""

from hft_lightning.planners.affinity import Affinity
from hft_lightning.planners.base import Decision, Planner
from hft_lightning.planners.difficulty import Difficulty
from hft_lightning.planners.explicit import Explicit
from hft_lightning.planners.prerequisites import Prerequisites
from hft_lightning.probe import Probe

__all__ = ["Affinity", "Decision", "Difficulty", "Explicit", "Planner", "Prerequisites", "Probe"]
