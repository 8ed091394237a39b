"""The fine-tuned model, written at the end of ``fit`` for plain ``transformers`` to load.

``save_model`` writes ``save_pretrained`` output, the model and its tokenizer (chat template included), into one
folder: ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)`` give back
the trained model. A LoRA run writes either the merged model (the pretrained model reloaded on the CPU, the trained
adapters added into its weights: the training module is left as it is) or the adapter alone.

The folder is built under a hidden name next to it (``.model.staging-<random>``, created with the user's umask like any
folder) and renamed into place, so the path never holds a half-written model: it holds the previous complete model,
or the new one, or (for the instant between the two renames) nothing. An exception or Ctrl-C during the save removes
the hidden folder; a process killed outright leaves it behind (or, killed between the renames, the previous model
in ``.model.old-<random>``), and the next complete save removes such leftovers. Weights are saved in fp32, the
precision they are kept in (mixed precision keeps fp32 weights).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from hft_lightning.lora import LoRA, import_peft


def save_model(
    directory: str | Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lora: LoRA | None = None,
    name_or_path: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Saves ``model`` and ``tokenizer`` with ``save_pretrained`` into ``directory``, replacing it whole.

    Args:
        directory: The output folder; its parent is created if needed.
        model: A ``transformers`` causal LM, or the ``peft`` model wrapping one when ``lora`` is set.
        tokenizer: Its tokenizer.
        lora: The adapter settings of a LoRA run (``lora.save`` picks merged or adapter output).
        name_or_path: The pretrained model a LoRA run adapted, reloaded to merge into.
        state_dict: The weights to save instead of ``model.state_dict()`` (a sharded model's, gathered).

    Returns:
        The folder.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_sibling(directory, "staging")
    try:
        if lora is not None and lora.save == "merged":
            _merged(model, name_or_path, staging, state_dict).save_pretrained(staging)
        else:
            model.save_pretrained(staging, state_dict=state_dict)  # a peft model saves its adapter only
        tokenizer.save_pretrained(staging)
        _replace_dir(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for kind in ("staging", "old"):  # what saves killed before they could clean up left
        for leftover in directory.parent.glob(f".{directory.name}.{kind}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return directory


def _merged(
    model: nn.Module, name_or_path: str, scratch: Path, state_dict: dict[str, torch.Tensor] | None
) -> nn.Module:
    """The pretrained model, freshly loaded in fp32 on the CPU, with ``model``'s trained adapters merged in."""
    adapter = scratch / "adapter"
    model.save_pretrained(adapter, state_dict=state_dict)
    base = AutoModelForCausalLM.from_pretrained(name_or_path).float()
    merged = import_peft().PeftModel.from_pretrained(base, adapter).merge_and_unload()
    shutil.rmtree(adapter)
    return merged


def _hidden_sibling(directory: Path, kind: str) -> Path:
    """A new empty folder ``.<name>.<kind>-<random>`` next to ``directory``, with the umask's permissions."""
    sibling = directory.parent / f".{directory.name}.{kind}-{uuid.uuid4().hex[:12]}"
    sibling.mkdir()
    return sibling


def _replace_dir(source: Path, target: Path) -> None:
    """Renames ``source`` to ``target``, moving an existing ``target`` out of the way first and deleting it after."""
    old = None
    if target.exists():
        old = _hidden_sibling(target, "old")
        os.replace(target, old / target.name)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old)
