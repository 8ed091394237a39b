"""A progress bar that names the curriculum stage being trained instead of the epoch number."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from hft_lightning.curriculum import Curriculum


class StageProgressBar(TQDMProgressBar):
    """Shows ``Stage 2/4 code`` where Lightning shows ``Epoch 1``."""

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._describe(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._describe(trainer)  # Lightning skips on_train_epoch_start in the epoch a run resumes in

    def _describe(self, trainer: pl.Trainer) -> None:
        curriculum = Curriculum.of(trainer)
        self.train_progress_bar.set_description(
            f"Stage {curriculum.stage_index + 1}/{len(curriculum.stages)} {curriculum.current_stage.name}"
        )
