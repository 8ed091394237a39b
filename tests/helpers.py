"""Tiny, fast building blocks for tests: a small datamodule and model, and a quiet CPU trainer."""

from lightning.pytorch import Trainer

from hft_lightning import HFTModule, StagedDataModule

TINY_MODEL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_new_tokens": 12}
TINY_DATA = {"num_train": 64, "num_val": 6, "batch_size": 4, "val_batch_size": 6, "vocab_size": 400}


def tiny_datamodule(**overrides) -> StagedDataModule:
    return StagedDataModule(**{**TINY_DATA, **overrides})


def tiny_module(data: StagedDataModule, **overrides) -> HFTModule:
    return HFTModule(data.tokenizer, **{**TINY_MODEL, **overrides})


def make_trainer(root, callbacks, **overrides) -> Trainer:
    """A quiet, deterministic CPU trainer."""
    options = {
        "default_root_dir": root,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    options.update(overrides)
    return Trainer(callbacks=callbacks, **options)
