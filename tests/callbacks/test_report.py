import csv
import json

import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from hft_lightning import Curriculum, Stage
from tests.helpers import make_trainer, tiny_module

STAGES = [Stage("math", 2, {"math": 1.0}), Stage("code", 2, {"code": 1.0})]
CL_METRICS = ("cl/average_accuracy", "cl/bwt", "cl/fwt")


def test_cl_metrics_can_be_monitored_and_reach_the_loggers(tiny_data, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="cl/average_accuracy", mode="max")
    # Listed before the Report (make_trainer appends it), as the command line orders a config's callbacks.
    early_stopping = EarlyStopping(monitor="cl/average_accuracy", mode="max", patience=10)
    trainer = make_trainer(
        tmp_path, [Curriculum(STAGES), early_stopping, checkpoint], logger=CSVLogger(tmp_path, name="logs")
    )
    trainer.fit(tiny_module(tiny_data), datamodule=tiny_data)

    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert checkpoint.best_model_path and checkpoint.best_model_score is not None
    assert trainer.callback_metrics["cl/average_accuracy"].item() == pytest.approx(metrics["average_accuracy"])
    assert trainer.callback_metrics["cl/bwt"].item() == pytest.approx(metrics["bwt"])
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["cl/average_accuracy"]]
    assert len(rows) == len(STAGES)  # one per validation, each with every cl metric
    assert all(row[name] for row in rows for name in CL_METRICS)


def test_a_callback_that_contributes_a_section_finds_it_in_the_report(tiny_data, tmp_path):
    from lightning.pytorch.callbacks import Callback

    from hft_lightning.report import Section

    class Counts(Callback):
        def __init__(self):
            self.steps = 0

        def on_train_batch_end(self, *args):
            self.steps += 1

        def report_section(self):
            return Section("counts", {"steps": self.steps}, ["## Counts", "", f"{self.steps} steps"])

    trainer = make_trainer(tmp_path, [Curriculum(STAGES), Counts()])
    trainer.fit(tiny_module(tiny_data), datamodule=tiny_data)
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["counts"] == {"steps": 4}
    assert (tmp_path / "report" / "summary.md").read_text().endswith("## Counts\n\n4 steps\n")
