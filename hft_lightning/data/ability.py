"""An ability: a named source of train and validation examples plus the scorer that judges generations.

The built-in abilities are generated on the fly from a seed (no download); their train and validation
splits are disjoint by construction: a candidate example goes to validation when its prompt hashes into
the validation bucket, so the same prompt can never appear in both.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hft_lightning.data.example import Example
from hft_lightning.errors import ConfigError
from hft_lightning.scoring import ModelScorer, Scorer

Generator = Callable[[random.Random], Example]
"""Draws one example from a seeded random source."""


@dataclass(frozen=True)
class Ability:
    """A named ability with its data and its scorer.

    Attributes:
        name: Short name used in stage plans, logs and reports (``math``, ``code``, ``general``).
        train: Training examples.
        val: Validation examples, disjoint from ``train``.
        scorer: Judges generated responses against the examples' references; None for an ability followed
            through its validation loss only, or scored by ``evaluator``.
        evaluator: Scores the whole model at once instead (an lm-evaluation-harness task), at every validation
            and before training. An ability with neither is left out of the accuracy matrix.
    """

    name: str
    train: Sequence[Example]
    val: Sequence[Example]
    scorer: Scorer | None
    evaluator: ModelScorer | None = None

    @property
    def scored(self) -> bool:
        """Whether the ability has a column in the accuracy matrix: it has a scorer or an evaluator."""
        return self.scorer is not None or self.evaluator is not None


def in_validation_bucket(prompt: str, val_fraction: float) -> bool:
    """True for the ``val_fraction`` share of prompts, by a hash that is the same on every run and machine."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def split_generated(
    name: str, generate: Generator, num_train: int, num_val: int, seed: int, val_fraction: float = 0.2
) -> tuple[list[Example], list[Example]]:
    """Draws examples until both splits are full, routing each distinct prompt to exactly one split.

    Args:
        name: The ability's name, for error messages.
        generate: Draws one example from a ``random.Random``.
        num_train: Number of training examples to return.
        num_val: Number of validation examples to return.
        seed: Seed of the random source; the same seed gives the same splits.
        val_fraction: Share of the prompt space reserved for validation.

    Returns:
        The train and validation examples. Train examples may repeat (small prompt spaces); validation
        prompts are unique.

    Raises:
        ConfigError: If the generator cannot produce enough distinct validation prompts.
    """
    rng = random.Random(seed)
    train: list[Example] = []
    val: list[Example] = []
    seen_val: set[str] = set()
    max_draws = 50 * (num_train + num_val) + 1000
    for _ in range(max_draws):
        if len(train) >= num_train and len(val) >= num_val:
            return train, val
        example = generate(rng)
        if in_validation_bucket(example.prompt, val_fraction):
            if len(val) < num_val and example.prompt not in seen_val:
                seen_val.add(example.prompt)
                val.append(example)
        elif len(train) < num_train:
            train.append(example)
    raise ConfigError(
        f"data.num_val={num_val}: ability {name!r} could not draw {num_train} train and {num_val} distinct "
        f"validation examples (got {len(train)} and {len(val)}); its prompt space is too small, lower data.num_val"
    )
