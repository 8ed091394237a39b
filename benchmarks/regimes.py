"""The regimes of the forgetting benchmark: the data and plan a method's config is trained under.

A regime rewrites a method's config (``configs/<method>.yaml``, parsed) and leaves the method itself alone: its
retention callbacks and the shape of its plan (which stages mix abilities, which train one) are kept; the data, the
mixture weights and the single-ability stages change. Every method keeps its total optimizer steps.

- ``balanced``: the configs as written: equal data for every ability, abilities that share nothing.
- ``imbalanced``: the proportions of a real SFT mix (Dong et al. 2023 mixed ~86k ShareGPT conversations with ~20k
  code and ~7.5k math examples): general 8 : code 2 : math 1. Each ability's training pool
  (``data.num_train``), its weight in every mixed stage and its share of the steps of a run of single-ability stages
  (each specialised dataset trained for about one pass, as sequential SFT does) follow them.
- ``hierarchical``: a fourth ability that composes two others, ``builtin:math_code`` (math's word problems answered
  by a Python function). A run of single-ability stages that trains math and code gets a ``math_code`` stage after
  them (prerequisites first: the planned order; ``planners/hft_reversed`` trains it first), the run's steps split
  equally; every other mixed stage that trains both math and code mixes it in too.
- ``incremental``: a model already fine-tuned on math and code must gain general chat. Its start, made once per seed
  and reused by every method, is ``multitask`` under :func:`incremental_base`: the foundation stage, then math and
  code mixed. A method starts from that model (``model.name_or_path``) and keeps only the stages that train
  something new: the foundation stage goes, and each run of stages that train nothing but the base's abilities
  becomes one short ``recall`` stage of :data:`RECALL_STEPS` on them, at whose end the retention methods consolidate
  what the base knows. Methods train different numbers of steps here (HFT 650, multitask 1200): that is the
  compute a user saves by not retraining.

The ``foundation`` stage, which stands in for the pretraining a real base model has, is the same in every regime
(the incremental base has it; the runs that start from the base do not repeat it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

CURRICULUM = "hft_lightning.Curriculum"
FOUNDATION = "foundation"
IMBALANCED_PROPORTIONS = {"general": 8, "code": 2, "math": 1}
"""Ability -> its share of a real SFT mix (general chat dominates, math is the smallest)."""
IMBALANCED_POOL = 500
"""Training examples per unit of proportion: general 4000 (the built-in default), code 1000, math 500."""
COMPOSITE = "math_code"
COMPOSITE_SOURCE = "builtin:math_code"
DEFAULT_ABILITIES = ["builtin:math", "builtin:code", "builtin:general"]
BASE_ABILITIES = ("math", "code")
"""What the incremental regime's start was fine-tuned on."""
RECALL = "recall"
"""The name of the stage standing for the base's abilities in an incremental run."""
RECALL_STEPS = 50
"""Steps of the stage standing for the base's abilities in an incremental run (where retention sees them)."""


def stages(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The stages of the config's curriculum (the list itself: editing it edits the config)."""
    (curriculum,) = [c for c in config["trainer"]["callbacks"] if c["class_path"] == CURRICULUM]
    return curriculum["init_args"]["stages"]


def single_ability_runs(plan: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of each maximal run of consecutive single-ability stages (``math``, ``code``, ``general``)."""
    runs: list[list[int]] = []
    for i, stage in enumerate(plan):
        if len(stage["mixture"]) != 1:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def split_steps(total: int, weights: list[float]) -> list[int]:
    """``total`` steps split in proportion to ``weights``, each at least 1, summing to ``total`` exactly.

    Every stage gets one step, the rest is shared by largest remainders: each share rounded down, the steps left
    going to the largest fractional parts.

    Raises:
        ValueError: If ``total`` is smaller than the number of stages.
    """
    if total < len(weights):
        raise ValueError(f"{total} steps cannot give each of {len(weights)} stages one")
    raw = [(total - len(weights)) * w / sum(weights) for w in weights]
    steps = [1 + int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)[: total - sum(steps)]:
        steps[i] += 1
    return steps


def balanced(config: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(config)


def imbalanced(config: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    config.setdefault("data", {})["num_train"] = {a: p * IMBALANCED_POOL for a, p in IMBALANCED_PROPORTIONS.items()}
    plan = stages(config)
    for stage in plan:
        if stage["name"] != FOUNDATION and len(stage["mixture"]) > 1:
            stage["mixture"] = {a: w * IMBALANCED_PROPORTIONS[a] for a, w in stage["mixture"].items()}
    for run in single_ability_runs(plan):
        shares = [IMBALANCED_PROPORTIONS[next(iter(plan[i]["mixture"]))] for i in run]
        for i, steps in zip(run, split_steps(sum(plan[i]["steps"] for i in run), shares), strict=True):
            plan[i]["steps"] = steps
    return config


def hierarchical(config: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    config.setdefault("data", {})["abilities"] = [*DEFAULT_ABILITIES, COMPOSITE_SOURCE]
    plan = stages(config)
    for stage in plan:
        mixture = stage["mixture"]
        if stage["name"] != FOUNDATION and {"math", "code"} <= set(mixture):
            mixture[COMPOSITE] = (mixture["math"] + mixture["code"]) / 2
    for run in reversed(single_ability_runs(plan)):  # from the end: inserting keeps earlier indices valid
        if not {"math", "code"} <= {a for i in run for a in plan[i]["mixture"]}:
            continue
        total = sum(plan[i]["steps"] for i in run)
        plan.insert(run[-1] + 1, {"name": COMPOSITE, "steps": 0, "mixture": {COMPOSITE: 1.0}})
        for i, steps in zip([*run, run[-1] + 1], split_steps(total, [1.0] * (len(run) + 1)), strict=True):
            plan[i]["steps"] = steps
    return config


def incremental_base(config: dict[str, Any]) -> dict[str, Any]:
    """The start of the incremental regime: ``config``'s plan trained on the base's abilities only after its foundation.

    The data keeps every ability, so the tokenizer the base saves has seen general chat too, and its report measures
    what the base scores on the ability it was not fine-tuned on.
    """
    config = copy.deepcopy(config)
    for stage in stages(config):
        if stage["name"] != FOUNDATION:
            stage["mixture"] = {a: w for a, w in stage["mixture"].items() if a in BASE_ABILITIES}
    return config


def incremental(config: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    plan = stages(config)
    kept: list[dict[str, Any]] = []
    for stage in plan:
        if stage["name"] == FOUNDATION:
            continue
        if not {a for a, w in stage["mixture"].items() if w > 0} <= set(BASE_ABILITIES):
            kept.append(stage)
        elif not kept or kept[-1]["name"] != RECALL:  # a run of base-only stages becomes one recall stage
            kept.append({"name": RECALL, "steps": RECALL_STEPS, "mixture": dict.fromkeys(BASE_ABILITIES, 1.0)})
    plan[:] = kept
    return config


REGIMES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "balanced": balanced,
    "imbalanced": imbalanced,
    "hierarchical": hierarchical,
    "incremental": incremental,
}
"""Regime name -> the rewrite of a method's config."""

STARTS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "incremental": ("multitask", incremental_base)
}
"""Regime name -> the method and rewrite of the run (one per seed) whose saved model the regime's methods start from."""
