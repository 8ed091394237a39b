r"""Scorers for abilities declared from data files, chosen by name in the configuration.

- ``exact_match``: the answer extracted from the generation equals the one extracted from the reference
  response. ``answer_pattern`` is a regular expression whose first group is the answer, taken from its last
  match (the final answer, GSM8K style: ``'#### (\S+)'``); without one the answer is the whole stripped text.
- ``contains``: the reference answer (extracted the same way) appears in the generation.
- ``code_exec``: the generated program passes the example's unit tests, run in the sandbox
  (:func:`hft_lightning.sandbox.run_tests`), never in the training process. A generation wrapped in a
  markdown code fence is unwrapped first.
- ``none``: no generation is scored; the ability is followed through its validation loss only.

The reference answer or the tests are read with the example and kept in its ``reference`` (``{"answer": str}``
or ``{"tests": [str, ...]}``), so a scorer is a pure function of the batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from hft_lightning.data.example import Example
from hft_lightning.sandbox import run_tests

ScorerName = Literal["exact_match", "code_exec", "contains", "none"]

_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_answer(text: str, pattern: re.Pattern[str] | None) -> str | None:
    """The answer in ``text``: the first group of ``pattern``'s last match, or the stripped text without a pattern.

    Returns:
        The stripped answer, or None if ``pattern`` does not match.
    """
    if pattern is None:
        return text.strip()
    matches = list(pattern.finditer(text))
    return matches[-1].group(1).strip() if matches else None


def extract_program(text: str) -> str:
    """The body of the first markdown code fence in ``text``, or ``text`` itself when it has none."""
    fence = _FENCE.search(text)
    return fence.group(1) if fence else text


class ExactMatch:
    """True where the answer extracted from a generation equals the example's reference answer.

    Args:
        pattern: Extracts the answer (see :func:`extract_answer`); None compares the whole stripped texts.
    """

    def __init__(self, pattern: re.Pattern[str] | None = None):
        self.pattern = pattern

    def __call__(self, predictions: Sequence[str], examples: Sequence[Example]) -> list[bool]:
        """Scores one batch."""
        return [
            extract_answer(p, self.pattern) == e.reference["answer"] for p, e in zip(predictions, examples, strict=True)
        ]


def contains(predictions: Sequence[str], examples: Sequence[Example]) -> list[bool]:
    """True where a generation contains its example's reference answer."""
    return [e.reference["answer"] in p for p, e in zip(predictions, examples, strict=True)]


def code_exec(predictions: Sequence[str], examples: Sequence[Example]) -> list[bool]:
    """True where a generated program passes its example's unit tests, all run in one sandboxed subprocess."""
    if len(predictions) != len(examples):
        raise ValueError(f"got {len(predictions)} predictions for {len(examples)} examples")
    return run_tests([extract_program(p) for p in predictions], [e.reference["tests"] for e in examples])
