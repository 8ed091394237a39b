"""Fits math with an lm-evaluation-harness ability under DDP (or on one process) and saves the accuracy matrix.

Run as a script, so that Lightning's DDP launcher can start the other processes the same way:

    python tests/scoring/harness_ddp_fit.py OUT TASKS --devices 2           # 2 processes, gloo, CPU
    python tests/scoring/harness_ddp_fit.py OUT TASKS --devices 1           # the same global batches on one
    python tests/scoring/harness_ddp_fit.py OUT TASKS --devices 2 --fail    # the harness fails on rank 0

``TASKS`` holds the ``sums`` task of ``test_harness.py``. The learning rate is negligible, so every run scores the
same weights. Each process writes ``OUT/rank<r>.pt`` with the matrix.
"""

import argparse
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hft_lightning import Curriculum, Stage
from hft_lightning.callbacks import Report
from hft_lightning.data.source import AbilitySource
from hft_lightning.module import HFTModule
from hft_lightning.scoring.harness import LMEvalTask
from tests.helpers import TINY_MODEL, make_trainer, tiny_datamodule


class FailingOnRankZero(HFTModule):
    """The harness raises on global rank 0 at the first evaluation, as a broken task or a full disk would."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.trainer.is_global_zero:
            self.evaluators = dict.fromkeys(self.evaluators, _fail)


def _fail(model, tokenizer) -> float:
    raise OSError("the harness failed on purpose")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("tasks", type=Path)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args()
    sums = AbilitySource("sums", lm_eval=LMEvalTask("sums", include_path=str(args.tasks), limit=8))
    data = tiny_datamodule(abilities=["builtin:math", sums], batch_size=8 // args.devices)
    module_class = FailingOnRankZero if args.fail else HFTModule
    L.seed_everything(0)
    module = module_class(data.tokenizer, **{**TINY_MODEL, "learning_rate": 1e-20})
    report = Report()
    trainer = make_trainer(
        args.out,
        [Curriculum([Stage("math", 2, {"math": 1.0})]), report],
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=data)
    torch.save({"matrix": report.accuracy_matrix.matrix.clone()}, args.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
