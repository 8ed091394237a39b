"""The embedded default run, end to end: the claims the README and benchmarks/README.md make about it."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_default_fit_learns_every_ability_in_its_stage_and_keeps_each_one(tmp_path):
    environment = {**os.environ, "WANDB_MODE": "disabled"}
    completed = subprocess.run(
        [sys.executable, "-m", "hft_lightning", "fit", f"--trainer.default_root_dir={tmp_path}"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    stages, abilities, matrix = report["stages"], report["abilities"], report["accuracy_matrix"]
    assert stages == ["foundation", "math", "code", "general", "unified"]
    assert [m["stage"] for m in report["weight_averaging"]["merges"]] == stages[1:]  # the recipe's retention ran
    for ability in abilities:  # each ability is really learned at the end of its own stage
        assert matrix[stages.index(ability)][abilities.index(ability)] >= 0.7, (ability, matrix)
    math = abilities.index("math")
    learned = matrix[stages.index("math")][math]
    assert matrix[stages.index("code")][math] >= learned - 0.15  # kept while code trains (sequential SFT: 0.00)
    assert report["average_accuracy"] >= 0.9 and max(report["forgetting"].values()) <= 0.06
    assert all(0 <= v <= 1 for row in matrix for v in row)
