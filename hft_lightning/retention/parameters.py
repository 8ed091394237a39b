"""Retention state is keyed by parameter *name*: which parameters are protected, and checks on restored state.

Keying by name, never by position, lets a checkpoint load into a model whose parameters are ordered differently,
and turns a missing or unexpected name into an error that names it. Only trainable parameters are protected, so
adapters (LoRA) are protected and frozen weights cost nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hft_lightning.errors import ConfigError
from hft_lightning.sharding import reshard, shard_like


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters retention protects: every parameter of ``module`` that requires a gradient, by name.

    Under FSDP2 these are the process's shards (``DTensor``s): groups left gathered by a forward pass outside
    training are resharded first (:func:`~hft_lightning.sharding.reshard`).
    """
    reshard(module)
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def match_names(what: str, saved: Mapping[str, Any], params: Mapping[str, nn.Parameter]) -> None:
    """Checks that state saved by parameter name covers exactly the trainable parameters ``params``.

    Raises:
        ConfigError: Naming ``what``, the missing and the unexpected parameter names.
    """
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ConfigError(
            f"{what} does not match the model's trainable parameters: missing {missing}, unexpected {unexpected}"
        )


def on_parameters(
    what: str, saved: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """Checks state restored by name with :func:`match_names` and places each tensor as its parameter is.

    Each tensor moves to its parameter's device and, under FSDP2, becomes the process's shard of it
    (:func:`~hft_lightning.sharding.shard_like`). Call it in ``on_train_start``, when a checkpoint's state has been
    loaded and the model is on its device.
    """
    match_names(what, saved, params)
    return {name: shard_like(tensor, params[name]) for name, tensor in saved.items()}
