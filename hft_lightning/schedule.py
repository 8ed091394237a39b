"""The learning-rate schedule of a curriculum: a linear warm-up at the start of every stage.

Each stage is a fine-tuning run of its own: the rate warms up linearly over ``warmup_steps`` from the
stage's first step, then stays at the peak until the stage ends. Measured on the embedded default (see
``benchmarks/LOG.md``): a cosine decay to a tenth of the peak within each stage made the next stage learn
worse (code after math: 0.02 instead of 0.52), so the rate stays constant after the warm-up.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence


class StageSchedule:
    """Multiplier of the peak learning rate at each optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

    A callable object rather than a closure, so that ``LambdaLR.state_dict`` saves it with the checkpoint. A resume
    therefore continues with the checkpoint's stage boundaries and warm-up, whatever the resumed config says
    (the curriculum refuses a changed plan).

    Args:
        stage_steps: Optimizer steps of each stage, in order.
        warmup_steps: Linear warm-up at the start of each stage (capped at the stage's length).

    Example::

        schedule = StageSchedule([100, 50], warmup_steps=10)
        schedule(0), schedule(9), schedule(99), schedule(100)  # (0.1, 1.0, 1.0, 0.1)
    """

    def __init__(self, stage_steps: Sequence[int], warmup_steps: int):
        self.starts = list(itertools.accumulate(stage_steps, initial=0))
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        """The multiplier at optimizer step ``step`` (counted from the start of training)."""
        index = min(bisect.bisect_right(self.starts, step) - 1, len(self.starts) - 2)
        length = self.starts[index + 1] - self.starts[index]
        warmup = max(1, min(self.warmup_steps, length))
        return min(1.0, (step - self.starts[index] + 1) / warmup)
