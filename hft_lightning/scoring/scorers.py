r"""The scorers every ability is judged by, built-in or from files, chosen by name (:func:`build_scorer`).

- ``exact_match``: the answer extracted from the generation equals the example's reference answer.
  ``answer_pattern`` is a regular expression whose first group is the answer, taken from its last match (the
  final answer, GSM8K style: ``'#### (\S+)'``; ``builtin:math`` uses ``'Answer:\s*(-?\d+)'``); without one the
  answer is the whole stripped text. ``builtin:math`` also compares both answers as integers, so ``Answer: 05``
  matches the reference ``5``.
- ``contains``: the reference answer appears in the generation.
- ``code_exec``: the generated program passes the example's unit tests, run in the sandbox
  (:func:`hft_lightning.sandbox.run_tests`), never in the training process. A generation wrapped in a
  markdown code fence is unwrapped first.
- ``instructions``: the generation satisfies every verifiable constraint of the example (IFEval style: a word
  repeated a number of times, capital letters, an order of words, required words).
- ``none``: no generation is scored; the ability is followed through its validation loss only.

What a scorer checks against is kept in the example's ``reference`` (``{"answer": str}``, ``{"tests": [str, ...]}``
or ``{"constraints": [...]}``), so a scorer is a pure function of the batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

from hft_lightning.data.example import Example
from hft_lightning.sandbox import run_tests

Scorer = Callable[[Sequence[str], Sequence[Example]], list[bool]]
"""Judges a batch of generations: ``scorer(predictions, examples)[i]`` is True when prediction i is correct."""

ModelScorer = Callable[[Any, Any], float]
"""Scores a whole model at once, higher is better: ``model_scorer(model, tokenizer)``, e.g. an lm-evaluation-harness
task (:class:`~hft_lightning.scoring.harness.HarnessEvaluator`)."""

ScorerName = Literal["exact_match", "code_exec", "contains", "instructions", "none"]

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
        normalize: Applied to the extracted and the reference answer before they are compared (``int`` compares
            numbers, so ``"05"`` equals ``"5"``); None compares the texts. It must accept whatever ``pattern``'s
            first group can match.
    """

    def __init__(self, pattern: re.Pattern[str] | None = None, normalize: Callable[[str], object] | None = None):
        self.pattern = pattern
        self.normalize = normalize

    def __call__(self, predictions: Sequence[str], examples: Sequence[Example]) -> list[bool]:
        """Scores one batch."""
        return [
            self._matches(extract_answer(p, self.pattern), e.reference["answer"])
            for p, e in zip(predictions, examples, strict=True)
        ]

    def _matches(self, answer: str | None, reference: str) -> bool:
        if answer is None or self.normalize is None:
            return answer == reference
        return self.normalize(answer) == self.normalize(reference)


def contains(predictions: Sequence[str], examples: Sequence[Example]) -> list[bool]:
    """True where a generation contains its example's reference answer."""
    return [e.reference["answer"] in p for p, e in zip(predictions, examples, strict=True)]


def code_exec(predictions: Sequence[str], examples: Sequence[Example]) -> list[bool]:
    """True where a generated program passes its example's unit tests, all run in one sandboxed subprocess."""
    if len(predictions) != len(examples):
        raise ValueError(f"got {len(predictions)} predictions for {len(examples)} examples")
    return run_tests([extract_program(p) for p in predictions], [e.reference["tests"] for e in examples])


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


def _check_repeat(response: str, c: dict[str, Any]) -> bool:
    return _words(response) == [c["word"]] * c["count"]


def _check_uppercase(response: str, c: dict[str, Any]) -> bool:
    letters = [ch for ch in response if ch.isalpha()]
    return bool(letters) and all(ch.isupper() for ch in letters)


def _check_order(response: str, c: dict[str, Any]) -> bool:
    return [w.lower() for w in _words(response)] == c["words"]


def _check_contains(response: str, c: dict[str, Any]) -> bool:
    present = {w.lower() for w in _words(response)}
    return all(w in present for w in c["words"])


CHECKS: dict[str, Callable[[str, dict[str, Any]], bool]] = {
    "repeat": _check_repeat,
    "uppercase": _check_uppercase,
    "order": _check_order,
    "contains": _check_contains,
}
"""Constraint type -> check(response, constraint), for :func:`follows_instructions`."""


def follows_instructions(predictions: Sequence[str], examples: Sequence[Example]) -> list[bool]:
    """True where a generation satisfies every constraint of its example."""
    return [
        all(CHECKS[c["type"]](p, c) for c in e.reference["constraints"])
        for p, e in zip(predictions, examples, strict=True)
    ]


def build_scorer(name: ScorerName, answer_pattern: re.Pattern[str] | None = None) -> Scorer | None:
    """The scorer registered under ``name`` (``None`` for ``none``); ``answer_pattern`` is ``exact_match``'s."""
    scorers: dict[str, Scorer | None] = {
        "exact_match": ExactMatch(answer_pattern),
        "contains": contains,
        "code_exec": code_exec,
        "instructions": follows_instructions,
        "none": None,
    }
    return scorers[name]
