"""Scoring generations: the scorers of every ability, and the sandbox that runs generated code.

The same scorers judge the built-in abilities and the abilities read from files (which name theirs, see
:func:`build_scorer`). An ability can instead be scored as a whole model by an lm-evaluation-harness task
(:mod:`hft_lightning.scoring.harness`, imported only when used). The sandbox itself is :mod:`hft_lightning.sandbox`.
"""

from hft_lightning.scoring.scorers import (
    ExactMatch,
    ModelScorer,
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
    "ModelScorer",
    "Scorer",
    "ScorerName",
    "build_scorer",
    "code_exec",
    "contains",
    "extract_answer",
    "extract_program",
    "follows_instructions",
]
