"""``python -m hft_lightning``: the LightningCLI of a Hierarchical Fine-Tuning run.

The embedded default is the constructors' defaults plus :func:`trainer_defaults`: with no argument,
``fit`` trains the tiny LLaMA-style model on the built-in abilities through the default curriculum.
``configs/default.yaml`` spells the same run out (a test checks that they agree).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from hft_lightning.curriculum import DEFAULT_STAGES
from hft_lightning.data.datamodule import StagedDataModule
from hft_lightning.module import HFTModule

DEFAULT_ROOT_DIR = "runs/hft"


def default_logger() -> dict[str, Any]:
    """wandb, offline, when it is installed (``WANDB_MODE`` still overrides); a CSV logger otherwise."""
    if importlib.util.find_spec("wandb") is not None:
        return {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "hft_lightning", "save_dir": DEFAULT_ROOT_DIR, "offline": True},
        }
    return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": DEFAULT_ROOT_DIR}}


def trainer_defaults() -> dict[str, Any]:
    """Trainer settings of the embedded default run."""
    return {
        "default_root_dir": DEFAULT_ROOT_DIR,
        "logger": default_logger(),
        "num_sanity_val_steps": 0,
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 10,
    }


class HFTCLI(LightningCLI):
    """LightningCLI with the tokenizer of the data linked into the model."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.tokenizer", "model.tokenizer", apply_on="instantiate")
        stages = [asdict(s) for s in DEFAULT_STAGES]
        curriculum = {"class_path": "hft_lightning.Curriculum", "init_args": {"stages": stages}}
        parser.set_defaults({"trainer.callbacks": [curriculum, {"class_path": "hft_lightning.StageProgressBar"}]})


def main(args: list[str] | None = None, run: bool = True) -> HFTCLI:
    """Entry point of ``python -m hft_lightning``."""
    return HFTCLI(
        HFTModule,
        StagedDataModule,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        args=args,
        run=run,
    )


