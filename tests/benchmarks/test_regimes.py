"""The regimes rewrite data and plan, keep each method's retention and its total steps."""

import pytest

from benchmarks.forgetting import run_config
from benchmarks.regimes import RECALL_STEPS, REGIMES, STARTS, split_steps, stages

METHODS = ("multitask", "sequential", "mixed_sequential", "dmt", "hft", "planners/hft_reversed")


def plan(method, regime):
    return [(s["name"], s["steps"], s["mixture"]) for s in stages(run_config(method, 1.0, regime))]


@pytest.mark.parametrize("regime", [r for r in REGIMES if r not in STARTS])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_its_total_steps_and_its_retention(method, regime):
    balanced, rewritten = run_config(method, 1.0, "balanced"), run_config(method, 1.0, regime)
    assert sum(s["steps"] for s in stages(rewritten)) == sum(s["steps"] for s in stages(balanced)) == 1500
    callbacks = [c["class_path"] for c in rewritten["trainer"]["callbacks"]]
    assert callbacks == [c["class_path"] for c in balanced["trainer"]["callbacks"]]
    assert plan(method, regime)[0] == plan(method, "balanced")[0]  # the foundation stage is the same everywhere


def test_imbalanced_follows_a_real_mix_in_data_mixtures_and_stage_lengths():
    assert run_config("hft", 1.0, "imbalanced")["data"]["num_train"] == {"general": 4000, "code": 1000, "math": 500}
    assert plan("hft", "imbalanced")[1:] == [
        ("math", 83, {"math": 1.0}),
        ("code", 164, {"code": 1.0}),
        ("general", 653, {"general": 1.0}),
        ("unified", 300, {"math": 1.0, "code": 2.0, "general": 8.0}),
    ]
    assert plan("dmt", "imbalanced")[2][2] == {"general": 8.0, "math": 0.0625, "code": 0.125}
    assert plan("mixed_sequential", "imbalanced")[1:] == [
        ("specialised", 800, {"math": 1.0, "code": 2.0}),
        ("general", 400, {"general": 1.0}),  # a run of one stage keeps its steps
    ]


def test_hierarchical_adds_the_composite_after_its_prerequisites():
    assert run_config("hft", 1.0, "hierarchical")["data"]["abilities"][-1] == "builtin:math_code"
    assert [(name, steps) for name, steps, _ in plan("hft", "hierarchical")] == [
        ("foundation", 300), ("math", 225), ("code", 225), ("general", 225), ("math_code", 225), ("unified", 300),
    ]  # fmt: skip
    assert plan("hft", "hierarchical")[-1][2] == {"math": 1.0, "code": 1.0, "general": 1.0, "math_code": 1.0}
    assert plan("multitask", "hierarchical")[1][2]["math_code"] == 1.0
    mixed = plan("mixed_sequential", "hierarchical")
    assert [name for name, _, _ in mixed] == ["foundation", "specialised", "general"]  # trained with math and code
    assert mixed[1][2] == {"math": 1.0, "code": 1.0, "math_code": 1.0}


def test_incremental_keeps_the_stages_that_train_something_new_and_a_recall_of_the_base():
    both = {"math": 1.0, "code": 1.0}
    recall = ("recall", RECALL_STEPS, both)
    assert plan("hft", "incremental") == [
        recall,
        ("general", 300, {"general": 1.0}),
        ("unified", 300, {**both, "general": 1.0}),
    ]
    assert (
        plan("sequential", "incremental")
        == plan("mixed_sequential", "incremental")
        == [recall, ("general", 400, {"general": 1.0})]
    )
    assert plan("dmt", "incremental")[1] == ("general_k", 400, {"general": 1.0, "math": 0.0625, "code": 0.0625})
    assert plan("multitask", "incremental") == [("multitask", 1200, {**both, "general": 1.0})]  # retrains all three
    config = run_config("hft", 1.0, "incremental")
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == [
        c["class_path"] for c in run_config("hft", 1.0, "balanced")["trainer"]["callbacks"]
    ]


def test_the_incremental_start_is_fine_tuned_on_math_and_code_after_the_foundation():
    method, rewrite = STARTS["incremental"]
    start = [(s["name"], s["steps"], s["mixture"]) for s in stages(rewrite(run_config(method, 1.0)))]
    assert start == [
        ("foundation", 300, {"math": 1.0, "code": 1.0, "general": 1.0}),
        ("multitask", 1200, {"math": 1.0, "code": 1.0}),
    ]


@pytest.mark.parametrize(("total", "weights"), [(900, [1, 2, 8]), (7, [1, 1, 1]), (3, [1, 100, 1]), (1200, [1])])
def test_steps_are_split_in_proportion_exactly(total, weights):
    steps = split_steps(total, weights)
    assert sum(steps) == total and min(steps) >= 1
    assert all(abs(s - total * w / sum(weights)) < 2 for s, w in zip(steps, weights, strict=True))


def test_too_few_steps_to_split_are_refused():
    with pytest.raises(ValueError, match="2 steps cannot give each of 3 stages one"):
        split_steps(2, [1, 1, 1])
