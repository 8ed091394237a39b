"""The unit of SFT data: one prompt, one response, and what a scorer needs to check a generation.

Every ability source (the built-in generators, user files) produces :class:`Example` objects, so the
tokenisation, masking, batching and scoring code downstream never needs to know where data came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One supervised fine-tuning example.

    Attributes:
        prompt: The user turn.
        response: The assistant turn the model is trained to produce.
        reference: JSON-serialisable data the ability's scorer checks a generation against (a final answer,
            unit tests, instruction constraints).
    """

    prompt: str
    response: str
    reference: dict[str, Any] = field(default_factory=dict)
