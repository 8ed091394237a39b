"""The forgetting benchmark runs end to end at its smallest size and writes well-formed results."""

import json
import math

import pytest

from benchmarks.forgetting import main, paired, parse_args, run_config


def test_scaled_config_keeps_the_plan_and_drops_the_progress_bar():
    config = run_config("sequential", 0.01)
    stages = config["trainer"]["callbacks"][0]["init_args"]["stages"]
    assert [s["name"] for s in stages] == ["foundation", "math", "code", "general"]
    assert [s["steps"] for s in stages] == [3, 4, 4, 4]
    assert not [c for c in config["trainer"]["callbacks"] if "ProgressBar" in c["class_path"]]
    assert config["trainer"]["enable_progress_bar"] is config["trainer"]["enable_checkpointing"] is False


def test_every_method_trains_the_same_number_of_steps():
    def steps(method):
        return sum(s["steps"] for s in run_config(method, 1.0)["trainer"]["callbacks"][0]["init_args"]["stages"])

    assert {steps(m) for m in ("multitask", "sequential", "mixed_sequential", "dmt", "hft")} == {1500}


@pytest.mark.parametrize(("flag", "value"), [("--jobs", "0"), ("--scale", "0"), ("--num-val", "0")])
def test_bad_sizes_are_refused_naming_the_flags(flag, value, capsys):
    with pytest.raises(SystemExit):
        parse_args([flag, value])
    assert "--scale must be > 0, --num-val and --jobs >= 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("regime", "abilities"),
    [("balanced", ["math", "code", "general"]), ("imbalanced", ["math", "code", "general"]),
     ("hierarchical", ["math", "code", "general", "math_code"])],
)  # fmt: skip
def test_benchmark_writes_json_table_and_figure(tmp_path, regime, abilities):
    out = tmp_path / "results"
    argv = ["--methods", "sequential", "hft", "--seeds", "0", "--scale", "0.02", "--num-val", "4", "--jobs", "2"]
    argv += ["--regime", regime]
    results = main([*argv, "--runs", str(tmp_path / "runs"), "--out", str(out)])
    written = json.loads((out / f"forgetting_{regime}.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["regime"] == regime and written["seeds"] == [0] and written["device"] and written["total_s"] > 0
    assert list(written["methods"]) == ["sequential", "hft"]
    assert written["reference"] == "multitask" and written["paired"] is None  # the reference did not run
    for name, m in written["methods"].items():
        assert list(m["final"]) == list(m["final_std"]) == list(m["forgetting"]) == abilities
        scores = [*m["final"].values(), m["average_accuracy"], *(x for row in m["accuracy_matrix"] for x in row)]
        assert all(0.0 <= x <= 1.0 for x in scores), name
        assert all(-1.0 <= x <= 1.0 for x in [*m["forgetting"].values(), m["max_forgetting"], m["bwt"]]), name
        assert m["max_forgetting"] == max(m["forgetting"].values())  # one seed: the mean of maxima is the max
        assert m["final_std"] == dict.fromkeys(abilities, 0.0) and m["average_accuracy_std"] == 0.0
        assert math.isclose(m["average_accuracy"], sum(m["final"].values()) / len(abilities), abs_tol=1e-6)
        assert len(m["accuracy_matrix"]) == len(m["stages"]) + 1 and m["wall_s"] > 0
    assert "| sequential |" in (out / f"forgetting_{regime}.md").read_text()
    assert (out / f"forgetting_{regime}.png").read_bytes().startswith(b"\x89PNG")
    rerun = main([*argv, "--runs", str(tmp_path / "runs"), "--out", str(out)])  # finished runs are reused
    assert rerun["methods"] == results["methods"]


@pytest.mark.slow
def test_incremental_methods_start_where_the_seeds_saved_start_ended(tmp_path):
    runs = tmp_path / "runs"
    argv = ["--regime", "incremental", "--methods", "sequential", "hft", "--seeds", "0", "--scale", "0.02"]
    results = main([*argv, "--num-val", "4", "--jobs", "2", "--runs", str(runs), "--out", str(tmp_path / "out")])
    start = runs / "incremental" / "start" / "seed0"
    start_metrics = json.loads((start / "run.json").read_text())["metrics"]
    assert start_metrics["stages"] == ["foundation", "multitask"]
    for method, steps in [("sequential", 1 + 8), ("hft", 1 + 6 + 6)]:  # recall, then the new stages, at scale 0.02
        record = json.loads((runs / "incremental" / method / "seed0" / "run.json").read_text())
        assert record["config"]["model"]["name_or_path"] == str(start / "model")
        assert record["metrics"]["before"] == start_metrics["accuracy_matrix"][-1]  # the start's model, unchanged
        assert results["methods"][method]["steps"] == steps
        assert results["methods"][method]["stages"][0] == "recall"


def test_methods_are_compared_with_the_reference_seed_by_seed():
    def summary(averages, forgetting):
        return {"per_seed": {"seed": [0, 1, 2], "average_accuracy": averages, "max_forgetting": forgetting}}

    methods = {
        "multitask": summary([0.9, 0.8, 0.7], [0.0, 0.1, 0.0]),
        "hft": summary([0.95, 0.8, 0.8], [0.1, 0.1, 0.2]),
    }
    ((name, row),) = paired(methods, "multitask").items()
    assert name == "hft" and row["better_seeds"] == 2  # a tie is not better
    assert math.isclose(row["average_accuracy"], 0.05) and math.isclose(row["max_forgetting"], 0.1)
    # differences 0.05, 0.0, 0.1: sd 0.05, t(0.975, 2 degrees of freedom) = 4.3027
    assert math.isclose(row["average_accuracy_ci95"], 4.302653 * 0.05 / math.sqrt(3), rel_tol=1e-5)
    one_seed = {k: {"per_seed": {key: v[:1] for key, v in m["per_seed"].items()}} for k, m in methods.items()}
    assert paired(one_seed, "multitask")["hft"]["average_accuracy_ci95"] is None


def test_an_unknown_method_names_the_missing_config(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--methods", "hft", "no_such_recipe"])
    assert "no config configs/no_such_recipe.yaml" in capsys.readouterr().err
    assert parse_args(["--methods", "planners/hft_reversed"]).methods == ["planners/hft_reversed"]
    with pytest.raises(SystemExit):
        parse_args(["--methods", "default@retention/no_such_method"])
    assert "no config configs/retention/no_such_method.yaml" in capsys.readouterr().err


def test_a_recipe_takes_the_retention_of_another_config():
    recipe, combined = run_config("hft", 0.1), run_config("hft@retention/ewc", 0.1)
    classes = [c["class_path"] for c in combined["trainer"]["callbacks"]]
    assert classes == ["hft_lightning.Curriculum", "hft_lightning.retention.EWC"]  # hft's Replay + EWC replaced
    assert combined["trainer"]["callbacks"][0] == recipe["trainer"]["callbacks"][0]  # the recipe's plan
    assert {k: v for k, v in combined.items() if k != "trainer"} == {k: v for k, v in recipe.items() if k != "trainer"}
    with pytest.raises(ValueError, match=r"configs/multitask.yaml: trainer.callbacks holds no hft_lightning.retention"):
        run_config("hft@multitask", 1.0)
