"""Scoring generations: the scorers of every ability, and the sandbox that runs generated code.

The same scorers judge the built-in abilities and the abilities read from files (which name theirs, see
:func:`build_scorer`). The sandbox itself is :mod:`hft_lightning.sandbox`.
"""

from hft_lightning.scoring.scorers import (
    ExactMatch,
    Scorer,
    ScorerName,
    build_scorer,
    code_exec,
    contains,
    extract_answer,
    extract_program,
    follows_instructions,
)

__all__ = [
    "ExactMatch",
    "Scorer",
    "ScorerName",
    "build_scorer",
    "code_exec",
    "contains",
    "extract_answer",
    "extract_program",
    "follows_instructions",
]
