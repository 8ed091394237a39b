"""A progress bar that names the curriculum stage being trained instead of the epoch number."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from hft_lightning.plan import Plan, require_plan


class StageProgressBar(TQDMProgressBar):
    """Shows ``Stage 2/4 code`` where Lightning shows ``Epoch 1``; the curriculum pushes the plan it names."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.plan: Plan | None = None

    def set_plan(self, plan: Plan) -> None:
        """Names the stages of ``plan``."""
        self.plan = plan

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._describe(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._describe(trainer)  # Lightning skips on_train_epoch_start in the epoch a run resumes in

    def _describe(self, trainer: pl.Trainer) -> None:
        plan = require_plan(self.plan, "StageProgressBar")
        index = plan.stage_index(trainer.current_epoch)
        stage = plan.stages[index]
        self.train_progress_bar.set_description(f"Stage {index + 1}/{len(plan.stages)} {stage.name}")
