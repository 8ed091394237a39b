"""The fine-tuned model, written at the end of ``fit`` for plain ``transformers`` to load.

``save_model`` writes ``save_pretrained`` output, the model and its tokenizer (chat template included), into one
folder: ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)`` give back
the trained model. A LoRA run writes either the merged model (the pretrained model reloaded on the CPU, the trained
adapters added into its weights: the training module is left as it is) or the adapter alone.

The folder is built under a temporary name next to it and renamed into place, so an interrupted save never leaves a
half-written folder: the path holds the previous complete model, or the new one, or (for the instant between the
two renames) nothing. Weights are saved in fp32, the precision they trained in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from hft_lightning.lora import LoRA, import_peft


def save_model(
    directory: str | Path,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lora: LoRA | None = None,
    name_or_path: str | None = None,
) -> Path:
    """Saves ``model`` and ``tokenizer`` with ``save_pretrained`` into ``directory``, replacing it whole.

    Args:
        directory: The output folder; its parent is created if needed.
        model: A ``transformers`` causal LM, or the ``peft`` model wrapping one when ``lora`` is set.
        tokenizer: Its tokenizer.
        lora: The adapter settings of a LoRA run (``lora.save`` picks merged or adapter output).
        name_or_path: The pretrained model a LoRA run adapted, reloaded to merge into.

    Returns:
        The folder.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        if lora is not None and lora.save == "merged":
            _merged(model, name_or_path, staging).save_pretrained(staging)
        else:
            model.save_pretrained(staging)  # a peft model saves its adapter only
        tokenizer.save_pretrained(staging)
        _replace_dir(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _merged(model: nn.Module, name_or_path: str, scratch: Path) -> nn.Module:
    """The pretrained model, freshly loaded in fp32 on the CPU, with ``model``'s trained adapters merged in."""
    adapter = scratch / "adapter"
    model.save_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(name_or_path).float()
    merged = import_peft().PeftModel.from_pretrained(base, adapter).merge_and_unload()
    shutil.rmtree(adapter)
    return merged


def _replace_dir(source: Path, target: Path) -> None:
    """Renames ``source`` to ``target``, moving an existing ``target`` out of the way first and deleting it after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old)
