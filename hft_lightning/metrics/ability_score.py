"""Accuracy of generated responses under an ability's scorer, accumulated over validation batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from hft_lightning.data.example import Example
from hft_lightning.scoring import Scorer


class AbilityScore(Metric):
    r"""Share of generations that the ability's scorer judges correct.

    States are summed across processes, so under DDP every rank scores its shard of the validation split
    and the result covers the whole split.

    Args:
        scorer: Judges a batch: ``scorer(predictions, examples) -> list[bool]``.

    Example::

        from hft_lightning.scoring import ExactMatch
        metric = AbilityScore(ExactMatch())
        metric.update([" 4 "], [Example("2 + 2?", "4", {"answer": "4"})])
        metric.compute()  # tensor(1.)
    """

    full_state_update = False

    def __init__(self, scorer: Scorer, **kwargs):
        super().__init__(**kwargs)
        self.scorer = scorer
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], examples: Sequence[Example]) -> None:
        """Scores one batch of generations."""
        verdicts = self.scorer(predictions, examples)
        self.correct += sum(verdicts)
        self.total += len(verdicts)

    def compute(self) -> torch.Tensor:
        """Accuracy in [0, 1]; 0 when nothing was scored."""
        return self.correct / self.total.clamp(min=1)
