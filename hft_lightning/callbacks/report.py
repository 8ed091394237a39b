"""The report of a fit: the accuracy matrix, the row before training, the report folder and the exported model.

The module scores every ability at every validation (:meth:`~hft_lightning.HFTModule.validation_scores`); this
callback keeps those scores as rows of an :class:`~hft_lightning.metrics.AccuracyMatrix`, shaped by the
:class:`~hft_lightning.plan.Plan` the curriculum pushes to it (:meth:`Report.set_plan`): one row per stage, and row 0
for the model before training. The matrix is this callback's checkpoint state, so a resumed run keeps the rows of
the stages it has already finished. After each validation of ``fit`` it logs the continual-learning metrics of the
matrix, ``cl/average_accuracy``, ``cl/bwt`` and ``cl/fwt``, so ``ModelCheckpoint`` and ``EarlyStopping`` can monitor
them.

The row before training is measured once, at the start of training: a resumed run keeps the rows it checkpointed,
and a run resumed exactly at a stage boundary measures the row whose validation Lightning skips on such a restart.
At the end of ``fit`` the report is written to ``<default_root_dir>/report``
(:func:`~hft_lightning.report.write_report`) and the model with its tokenizer to ``<default_root_dir>/model``
(:meth:`~hft_lightning.HFTModule.save_pretrained`). A callback that implements :class:`ContributesToReport` adds
a :class:`~hft_lightning.report.Section` to it (collected at the end of ``fit``, the way the curriculum finds the
followers of its plan).
The command line always adds this callback; a Trainer built in Python lists it after the curriculum (without it, a
fit writes no report and exports nothing).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from hft_lightning.metrics.accuracy_matrix import AccuracyMatrix
from hft_lightning.plan import Plan, require_plan
from hft_lightning.report import Results, Section, write_report


@runtime_checkable
class ContributesToReport(Protocol):
    """A callback with a part of the report of its own (for example a forgetting budget's live scores)."""

    def report_section(self) -> Section | None:
        """Its part of the report, or ``None`` when it has nothing to report. Called on global rank zero."""


class Report(Callback):
    """Keeps the accuracy matrix of a fit, writes the report and exports the fine-tuned model.

    The command line adds it to every run; a Trainer built in Python must list it, after the
    :class:`~hft_lightning.Curriculum`, or ``fit`` writes no report and exports no model.

    Example::

        trainer = Trainer(callbacks=[Curriculum(), Report()])
    """

    def __init__(self) -> None:
        self.plan: Plan | None = None
        self.abilities: list[str] = []
        self.accuracy_matrix: AccuracyMatrix | None = None

    def set_plan(self, plan: Plan) -> None:
        """Follows ``plan`` (pushed by the curriculum): one matrix row per stage, each ability's first stage."""
        self.plan = plan
        if self.accuracy_matrix is not None:
            self.accuracy_matrix.learned_at = tuple(plan.learned_at(name) for name in self.accuracy_matrix.abilities)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_plan(self.plan, "Report")
        self.abilities = trainer.datamodule.ability_names
        # An ability with no scorer (validation loss only) is left out of the accuracy matrix.
        scored = [a.name for a in trainer.datamodule.abilities if a.scored]
        learned_at = [self.plan.learned_at(name) for name in scored]
        self.accuracy_matrix = AccuracyMatrix(scored, len(self.plan.stages), learned_at)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.accuracy_matrix.to(pl_module.device)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Rows measurable now: "before" at step 0, and after a resume exactly at a stage boundary, the row of the
        # stage that just ended (Lightning does not rerun an epoch-end validation a checkpoint was taken before).
        step = trainer.global_step
        matrix = self.accuracy_matrix.matrix
        rows = [
            row
            for row in range(len(self.plan.stages) + 1)
            if self.plan.steps_before(row) == step and torch.isnan(matrix[row]).all()
        ]
        if not rows:
            return
        pl_module.model.eval()
        for dataloader_idx, loader in enumerate(trainer.val_dataloaders):
            for batch in itertools.islice(loader, trainer.num_val_batches[dataloader_idx]):
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, dataloader_idx)
                pl_module.score_batch(batch, dataloader_idx)
        pl_module.model.train()
        scores = pl_module.compute_scores()
        for row in rows:
            self.accuracy_matrix.update(row, scores)
        named = zip(self.accuracy_matrix.abilities, scores.tolist(), strict=True)
        metrics = {f"val/{name}/score": score for name, score in named}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.accuracy_matrix.update(trainer.current_epoch + 1, pl_module.validation_scores())
        derived = self.accuracy_matrix.compute()
        # Logged here, not in on_validation_end, so they reach trainer.callback_metrics before any callback's
        # on_validation_end (ModelCheckpoint, EarlyStopping) reads it.
        for key in ("average_accuracy", "bwt", "fwt"):
            pl_module.log(f"cl/{key}", derived[key], sync_dist=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        derived = self.accuracy_matrix.compute()  # a collective under DDP (a row recorded since the last compute)
        root = Path(trainer.default_root_dir)
        saved = pl_module.save_pretrained(root / "model")  # every process: a sharded model is gathered first
        if not trainer.is_global_zero:
            return
        results = Results(
            abilities=self.abilities,
            before=self._by_ability(self.accuracy_matrix.before),
            accuracy_matrix=[self._by_ability(row) for row in self.accuracy_matrix.stage_rows],
            average_accuracy=derived["average_accuracy"].item(),
            forgetting=dict(zip(self.abilities, self._by_ability(derived["forgetting"]), strict=True)),
            bwt=derived["bwt"].item(),
            fwt=derived["fwt"].item(),
        )
        sections = [
            section
            for callback in trainer.callbacks
            if isinstance(callback, ContributesToReport) and (section := callback.report_section()) is not None
        ]
        report = write_report(root / "report", self.plan, results, sections)
        rank_zero_info(f"HFT report written to {report} (summary.md, metrics.json, plots)")
        rank_zero_info(f"Fine-tuned model and tokenizer saved to {saved} (transformers save_pretrained)")

    def _by_ability(self, scores: torch.Tensor) -> list[float]:
        """One value per declared ability from one per scored ability; NaN (``null`` in the report) where unscored."""
        # reshape: torchmetrics squeezes a one-element result of compute() to 0-dim
        scored = dict(zip(self.accuracy_matrix.abilities, scores.reshape(-1).tolist(), strict=True))
        return [scored.get(name, math.nan) for name in self.abilities]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"accuracy_matrix": self.accuracy_matrix.matrix.cpu()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.accuracy_matrix is not None:  # validate and test restore a checkpoint's weights; they keep no matrix
            self.accuracy_matrix.matrix.copy_(state_dict["accuracy_matrix"])
