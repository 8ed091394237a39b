"""What retention needs from the module and the datamodule, as protocols: any pair that provides them works.

Retention computes loss gradients on remembered examples (the module's loss) and rebuilds those examples from
references ``(ability, index)``: it replays the exact stream a stage trained on (the datamodule's stage stream and
seed) and collates remembered examples into batches. :class:`~hft_lightning.HFTModule` and
:class:`~hft_lightning.StagedDataModule` are the implementations; the retention callbacks check both in ``setup``
and name the members one lacks (:func:`missing_members`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase


@runtime_checkable
class HasLoss(Protocol):
    """A module whose training loss retention protects."""

    def sft_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The mean loss over the batch's trained tokens."""


@runtime_checkable
class StageData(Protocol):
    """A datamodule retention can replay: its seed, each stage's example stream and a collate function."""

    seed: int
    tokenizer: PreTrainedTokenizerBase

    def stage_stream(self, index: int) -> Iterator[tuple[str, int]]:
        """Every training example stage ``index`` trains on, in order, as ``(ability, example index)``."""

    def collate(self, examples: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        """A training batch of the given examples."""


def missing_members(obj: object, protocol: type) -> list[str]:
    """The attributes and methods of ``protocol`` that ``obj`` lacks, in the order the protocol declares them."""
    methods = [name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")]
    return [name for name in [*getattr(protocol, "__annotations__", {}), *methods] if not hasattr(obj, name)]
