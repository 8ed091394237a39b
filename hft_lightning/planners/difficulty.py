"""Easiest first: order abilities by how hard they are for the base model, measured before training.

The difficulty of an ability is the base model's cross-entropy per response token on a seeded sample of its
validation examples (the validation loss before any training, on ``examples`` examples). Training the ability the
model already predicts best first is the curriculum-learning heuristic of Bengio et al. 2009 applied to abilities:
an easy stage moves the weights least, so later, harder stages start from a model that has lost little.
"""

from __future__ import annotations

from typing_extensions import override

from hft_lightning.planners.base import Decision, Planner, check_budget, topological_order
from hft_lightning.probe import Probe


class Difficulty(Planner):
    """Orders the single-ability stages by the base model's loss per response token, lowest (easiest) first.

    Args:
        examples: Held-out examples measured per ability (the probe budget; each is one forward pass).
        batch_size: Examples per forward pass of the probe.
        prerequisites: Ability -> abilities it builds on; they stay before it whatever their difficulty.

    Example::

        Curriculum(stages, planner=Difficulty(examples=64, prerequisites={"code": ["math"]}))
    """

    measures = True

    def __init__(self, examples: int = 32, batch_size: int = 8, prerequisites: dict[str, list[str]] | None = None):
        super().__init__(prerequisites)
        check_budget(examples, batch_size)
        self.examples = examples
        self.batch_size = batch_size

    @override
    def order(self, abilities: list[str], probe: Probe | None) -> Decision:
        losses = {a: probe.loss(a, self.examples, self.batch_size) for a in abilities}
        order = topological_order(abilities, self.prerequisites, key=losses.__getitem__)
        ranks = {a: rank for rank, a in enumerate(sorted(abilities, key=losses.__getitem__), start=1)}
        why = {
            a: self.reason(a, f"loss {losses[a]:.3f} nats/token (easiest {ranks[a]} of {len(abilities)})")
            for a in order
        }
        return Decision(order, why, {"difficulty": {"loss_per_token": losses}})
