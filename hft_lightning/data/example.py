"""The unit of SFT data: a conversation ending in the assistant turn to learn, and what a scorer needs.

Every ability source (the built-in generators, user files) produces :class:`Example` objects, so the
tokenisation, masking, batching and scoring code downstream never needs to know where data came from.

A single-turn example is a prompt and a response. A multi-turn one also carries the earlier turns in
``history`` (a system prompt, earlier user and assistant turns): every assistant turn is trained (unless
``train_history`` is off: then only the response is), and generation is scored on the last one, prompted with
everything before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
"""Roles a message may have; the chat template renders each as ``<|role|>``."""


@dataclass
class Example:
    """One supervised fine-tuning example.

    Attributes:
        prompt: The last user turn.
        response: The last assistant turn: the reference answer to the conversation so far.
        reference: JSON-serialisable data the ability's scorer checks a generation against (a final answer,
            unit tests, instruction constraints).
        history: Messages before ``prompt`` (``{"role": ..., "content": ...}``, roles from :data:`ROLES`),
            oldest first: a system prompt and earlier turns. Empty for a single-turn example.
        train_history: Whether the assistant turns of ``history`` are trained too (a conversation: every
            assistant turn is) or are context only (TRL's prompt/completion: the loss is on the completion alone).
    """

    prompt: str
    response: str
    reference: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)
    train_history: bool = True

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to the last assistant turn: what generation is prompted with."""
        return [*self.history, {"role": "user", "content": self.prompt}]

    @property
    def messages(self) -> list[dict[str, str]]:
        """The whole conversation, the last assistant turn included: what training renders."""
        return [*self.prompt_messages, {"role": "assistant", "content": self.response}]
