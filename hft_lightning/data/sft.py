"""Tokenisation and batching of SFT examples through the tokenizer's chat template.

The loss mask comes from the template itself: assistant content sits inside ``{% generation %}`` tags,
and ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks exactly those tokens, so
prompt tokens, role markers and template glue never contribute to the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from hft_lightning.data.example import Example

IGNORE_INDEX = -100


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example) -> dict[str, torch.Tensor]:
    """Renders an example's whole conversation with the chat template and masks every non-assistant token out.

    Args:
        tokenizer: A tokenizer whose chat template marks assistant turns with ``{% generation %}``.
        example: The example to encode.

    Returns:
        ``input_ids`` and ``labels`` (``-100`` outside the assistant turns, all of them trained in a multi-turn
        conversation), both of shape ``[T]``.
    """
    encoded = tokenizer.apply_chat_template(example.messages, return_dict=True, return_assistant_tokens_mask=True)
    input_ids = torch.tensor(encoded["input_ids"])
    labels = input_ids.masked_fill(torch.tensor(encoded["assistant_masks"]) == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, example: Example) -> torch.Tensor:
    """The chat-templated conversation before the last assistant turn, with its assistant header, shape ``[T]``."""
    encoded = tokenizer.apply_chat_template(example.prompt_messages, add_generation_prompt=True, return_dict=True)
    return torch.tensor(encoded["input_ids"])


class SFTDataset(Dataset):
    """Examples of one ability, encoded lazily (template rendering costs ~0.1 ms, cheaper than up front)."""

    def __init__(self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, with_prompt: bool = False):
        self.examples = examples
        self.tokenizer = tokenizer
        self.with_prompt = with_prompt

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        item: dict[str, Any] = encode_example(self.tokenizer, example)
        if self.with_prompt:
            item["prompt_ids"] = encode_prompt(self.tokenizer, example)
            item["example"] = example
        return item


def _pad(sequences: Sequence[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    out = torch.full((len(sequences), max(len(s) for s in sequences)), value, dtype=sequences[0].dtype)
    for row, seq in zip(out, sequences, strict=True):
        if left:
            row[len(row) - len(seq) :] = seq
        else:
            row[: len(seq)] = seq
    return out


def concat_batches(batches: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Concatenates right-padded training batches (``input_ids``, ``attention_mask``, ``labels``) along rows.

    Shorter batches are right-padded to the longest one (pad token, mask 0, label ``-100``).
    """
    length = max(b["input_ids"].shape[1] for b in batches)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {
        key: torch.cat([torch.nn.functional.pad(b[key], (0, length - b[key].shape[1]), value=pad) for b in batches])
        for key, pad in pads.items()
    }


class SFTCollator:
    """Pads a list of :class:`SFTDataset` items into a batch.

    Training tensors are right-padded: ``input_ids``, ``attention_mask`` and ``labels`` of shape ``[B, T]``.
    Items encoded ``with_prompt`` also give left-padded ``prompt_ids`` and ``prompt_attention_mask`` of shape
    ``[B, P]`` for batched generation, and the list of ``examples`` for scoring.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Pads ``items`` into one batch."""
        input_ids = [item["input_ids"] for item in items]
        batch: dict[str, Any] = {
            "input_ids": _pad(input_ids, self.pad_token_id, left=False),
            "attention_mask": _pad([torch.ones_like(ids) for ids in input_ids], 0, left=False),
            "labels": _pad([item["labels"] for item in items], IGNORE_INDEX, left=False),
        }
        if "prompt_ids" in items[0]:
            prompts = [item["prompt_ids"] for item in items]
            batch["prompt_ids"] = _pad(prompts, self.pad_token_id, left=True)
            batch["prompt_attention_mask"] = _pad([torch.ones_like(p) for p in prompts], 0, left=True)
            batch["examples"] = [item["example"] for item in items]
        return batch
