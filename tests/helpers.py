"""Tiny, fast building blocks for tests: a small datamodule and model, and a quiet CPU trainer."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from hft_lightning import HFTModule, StagedDataModule
from hft_lightning.callbacks import Report

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_new_tokens": 12}
TINY_DATA = {"num_train": 64, "num_val": 6, "batch_size": 4, "val_batch_size": 6, "vocab_size": 400}


def tiny_datamodule(**overrides) -> StagedDataModule:
    return StagedDataModule(**{**TINY_DATA, **overrides})


def tiny_module(data: StagedDataModule, **overrides) -> HFTModule:
    return HFTModule(data.tokenizer, **{**TINY_MODEL, **overrides})


def make_trainer(root, callbacks, **overrides) -> Trainer:
    """A quiet, deterministic CPU trainer; it checkpoints only through a ``ModelCheckpoint`` among ``callbacks``.

    As the command line does, it adds a :class:`Report` after ``callbacks`` when they hold none.
    """
    if not any(isinstance(c, Report) for c in callbacks):
        callbacks = [*callbacks, Report()]
    options = {
        "default_root_dir": root,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    options.update(overrides)
    return Trainer(callbacks=callbacks, **options)


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Qwen 2.5's template, reduced: no ``{% generation %}`` tags, as in most real models."""


def save_tiny_pretrained(directory, data: StagedDataModule, chat_template: str | None = CHATML):
    """A user's checkpoint, as ``save_pretrained`` writes it: a tiny Qwen2 model and its tokenizer.

    The tokenizer is ``data``'s BPE tokenizer with ChatML turn markers as special tokens, ``<|im_end|>`` as its end of
    sequence, no padding token, and ``chat_template`` (``None``: none, as a base model's). As in real checkpoints, the
    embedding matrix is padded past the tokenizer's size (to a multiple of 64).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = copy.deepcopy(data.tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.chat_template = "<|im_end|>", None, chat_template
    tokenizer.model_max_length = 256
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    """Runs a test script (a multi-process fit, which Lightning's launcher starts again per process) from the repo.

    The repository root is put on ``PYTHONPATH`` so the script and the processes it launches import ``tests``.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
