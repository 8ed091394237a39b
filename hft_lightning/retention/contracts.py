"""What retention needs from the module and the datamodule, as protocols: any pair that provides them works.

Retention computes loss gradients on remembered examples (the module's loss) and rebuilds those examples from
references ``(ability, index)``: it replays the exact stream a stage trained on (the datamodule's stage stream and
seed) and collates remembered examples into batches. :class:`~hft_lightning.HFTModule` and
:class:`~hft_lightning.StagedDataModule` are the implementations; the retention callbacks check both in ``setup``
and name the members one lacks (:func:`missing_members`).

A method that adds a term to the training loss (:class:`LossTerm`) is pushed to the module, which takes it
(:class:`TakesLossTerms`): the module computes its logits once per training step and asks each term for its value
given what it fed the model. Values flow one way: the module never looks its terms up through the trainer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


@runtime_checkable
class HasLoss(Protocol):
    """A module whose training loss retention protects."""

    def sft_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The mean loss over the batch's trained tokens."""


@runtime_checkable
class LossTerm(Protocol):
    """A term added to the training loss before backward, computed from the module's own forward pass."""

    def loss_term(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        inputs: dict[str, torch.Tensor],
        logits: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor | None:
        """The term for one training batch (``None``: nothing to add).

        Args:
            trainer: The trainer.
            pl_module: The module being trained.
            inputs: What the module fed its model (after packing: ``input_ids`` and ``position_ids``, shape
                ``[R, L]``; else ``input_ids`` and ``attention_mask``, shape ``[B, T]``).
            logits: The model's fp32 logits for ``inputs``, shape ``[R, L, V]``, in the autograd graph.
            targets: The token each position is trained to predict, shape ``[R, L]``, ``-100`` where none is
                (prompt, padding, the last position): the response tokens are ``targets != -100``.
        """


@runtime_checkable
class TakesLossTerms(Protocol):
    """A module that adds the terms pushed to it to its training loss: ``loss = sft_loss + sum(terms)``."""

    def add_loss_term(self, term: LossTerm) -> None:
        """Adds ``term`` to every later training step (once, however often it is pushed)."""

    def remove_loss_term(self, term: LossTerm) -> None:
        """Stops adding ``term``."""


@runtime_checkable
class HasCausalLM(Protocol):
    """A module whose model is a transformers causal LM (``get_decoder``, ``get_output_embeddings``)."""

    causal_lm: nn.Module


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
