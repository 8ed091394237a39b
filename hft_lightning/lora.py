"""LoRA adapters through peft: train a few low-rank matrices, keep the pretrained weights frozen.

``model.lora`` in the config wraps the pretrained model with ``peft.get_peft_model`` (Hu et al. 2021: each target
linear layer computes ``W x + (alpha / r) B A x``, with ``A`` of shape ``[r, in]`` and ``B`` of shape ``[out, r]``,
``B`` starting at zero). Only ``A`` and ``B`` require a gradient, so the optimizer and every retention method
(:meth:`~hft_lightning.retention.RetentionCallback.trainable`) see the adapter parameters and nothing else.

peft is optional: it is imported only when an adapter is configured, and its absence is then a
:class:`~hft_lightning.errors.ConfigError` saying how to install it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Literal, get_args

import torch
from torch import nn

from hft_lightning.errors import ConfigError

SaveMode = Literal["merged", "adapter"]


def import_peft() -> ModuleType:
    """The ``peft`` module, or a :class:`ConfigError` naming ``model.lora`` and the extra that installs it."""
    try:
        return importlib.import_module("peft")
    except ImportError:
        raise ConfigError(
            "model.lora needs peft, which is not installed: pip install 'hft_lightning[lora]' (or pip install peft)"
        ) from None


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters on the pretrained model's linear layers.

    Attributes:
        r: Rank of every adapter (> 0).
        alpha: Scaling numerator: the adapter's output is multiplied by ``alpha / r`` (> 0).
        dropout: Dropout on the adapter's input during training, in [0, 1).
        target_modules: Names (last components) of the layers to adapt, e.g. ``q_proj`` and ``v_proj`` in LLaMA,
            Qwen and Mistral models, ``c_attn`` in GPT-2.
        save: What the end of ``fit`` writes to ``<default_root_dir>/model``: ``merged`` (the adapters added into
            the weights: a plain ``transformers`` model) or ``adapter`` (only the adapter: peft's
            ``AutoPeftModelForCausalLM.from_pretrained(folder)`` loads it onto the base model it names).

    Example::

        module = HFTModule(tokenizer, name_or_path="Qwen/Qwen2.5-0.5B-Instruct", lora=LoRA(r=8, alpha=16))
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Sequence[str] = ("q_proj", "v_proj")
    save: SaveMode = "merged"

    def __post_init__(self) -> None:
        if self.r <= 0 or not self.alpha > 0:
            raise ConfigError(f"model.lora.r and model.lora.alpha must be > 0, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules is empty; name the layers to adapt, e.g. [q_proj, v_proj]")
        if self.save not in get_args(SaveMode):
            raise ConfigError(f"model.lora.save: unknown mode {self.save!r}; allowed: {', '.join(get_args(SaveMode))}")

    def wrap(self, model: nn.Module) -> nn.Module:
        """The ``peft`` model adapting ``model``: only the adapter parameters require a gradient.

        Raises:
            ConfigError: If peft is missing, or no layer of ``model`` matches ``target_modules`` (naming them).
        """
        peft = import_peft()
        config = peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            return peft.get_peft_model(model, config)
        except ValueError as error:
            raise ConfigError(f"model.lora.target_modules={list(self.target_modules)}: {error}") from None


# The settings are saved with the module's hyperparameters: a checkpoint holding them must load under torch.load's
# default weights_only=True (resume, load_from_checkpoint).
torch.serialization.add_safe_globals([LoRA])
