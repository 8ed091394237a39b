import json
import math
import os
from pathlib import Path

import matplotlib.image
import pytest
import torch

import hft_lightning.report as report_module
from hft_lightning.metrics import AccuracyMatrix
from hft_lightning.plan import Plan, Stage
from hft_lightning.report import Results, Section, write_plan, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = {"metrics.json", "accuracy_matrix.png", "ability_curves.png", "summary.md"}

ABILITIES = ["math", "code", "general"]
STAGES = (
    Stage("math", 30, {"math": 1.0}),
    Stage("code", 40, {"code": 1.0}),
    Stage("general", 50, {"general": 1.0}),
    Stage("unified", 20, {"math": 0.5, "code": 0.25, "general": 0.25}),
)
WHY = ("configured order", "configured order", "configured order", "mixture: keeps its configured position")
PLAN = Plan(STAGES, WHY, "Explicit", {"reverse": False}, tuple(s.name for s in STAGES))
BEFORE = [0.0, 0.125, 0.25]
MATRIX = [[0.875, 0.25, 0.25], [0.5, 0.75, 0.375], [0.25, 0.5, 0.875], [0.75, 0.625, 0.8125]]
DERIVED = {
    "average_accuracy": 0.7291666666666666,
    "forgetting": {"math": 0.125, "code": 0.125, "general": 0.0625},
    "bwt": -0.10416666666666667,
    "fwt": 0.125,
}


def write(directory, plan=PLAN, **overrides):
    results = {"abilities": ABILITIES, "before": BEFORE, "accuracy_matrix": MATRIX, **DERIVED, **overrides}
    return write_report(directory, plan, Results(**results))


def load_metrics(directory: Path) -> dict:
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads((directory / "metrics.json").read_text(), parse_constant=refuse)


def test_writes_every_file_and_returns_the_directory(tmp_path):
    directory = tmp_path / "nested" / "report"
    assert write(str(directory)) == directory
    assert {path.name for path in directory.iterdir()} == FILES


def test_metrics_json_holds_exactly_the_contract(tmp_path):
    metrics = load_metrics(write(tmp_path))
    assert metrics == {
        "abilities": ABILITIES,
        "stages": ["math", "code", "general", "unified"],
        "before": BEFORE,
        "accuracy_matrix": MATRIX,
        "average_accuracy": DERIVED["average_accuracy"],
        "forgetting": DERIVED["forgetting"],
        "bwt": DERIVED["bwt"],
        "fwt": DERIVED["fwt"],
        "plan": [
            {"name": s.name, "mixture": s.mixture, "steps": s.steps, "why": why}
            for s, why in zip(STAGES, WHY, strict=True)
        ],
    }


@pytest.mark.parametrize("name", ["accuracy_matrix.png", "ability_curves.png"])
def test_images_are_valid_pngs(tmp_path, name):
    path = write(tmp_path) / name
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    height, width, channels = image.shape
    assert height > 200
    assert width > 300
    assert channels in (3, 4)
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_summary_has_plan_matrix_derived_numbers_and_images(tmp_path):
    summary = (write(tmp_path) / "summary.md").read_text()
    assert summary.startswith("# ")
    assert "| unified | math 0.5, code 0.25, general 0.25 | 20 | mixture: keeps its configured position |" in summary
    assert "| math | math 1 | 30 | configured order |" in summary
    assert "Order decided by the **Explicit** planner:" in summary and "affinity.png" not in summary
    assert "| after | math | code | general |" in summary
    assert "| before | 0.000 | 0.125 | 0.250 |" in summary
    assert "| math | 0.875 | 0.250 | 0.250 |" in summary
    assert "| unified | 0.750 | 0.625 | 0.812 |" in summary  # 0.8125 rounds half to even
    assert "**Average accuracy**: 0.729" in summary
    assert "**Max forgetting**: 0.125 (math)" in summary
    assert "**BWT** (backward transfer): -0.104" in summary
    assert "**FWT** (forward transfer): 0.125" in summary
    assert "| general | 0.062 |" in summary
    assert "![Accuracy matrix](accuracy_matrix.png)" in summary
    assert "![Scores across stages](ability_curves.png)" in summary


def test_nan_and_none_become_null_and_n_a(tmp_path):
    directory = write(
        tmp_path,
        before=[math.nan, math.nan, 0.25],
        accuracy_matrix=[MATRIX[0], [math.nan] * 3, *MATRIX[2:]],
        bwt=math.nan,
        forgetting={**DERIVED["forgetting"], "code": math.nan},
    )
    metrics = load_metrics(directory)
    assert metrics["before"] == [None, None, 0.25]
    assert metrics["accuracy_matrix"][1] == [None, None, None]
    assert metrics["bwt"] is None
    assert metrics["forgetting"]["code"] is None
    assert "NaN" not in (directory / "metrics.json").read_text()
    summary = (directory / "summary.md").read_text()
    assert "| before | n/a | n/a | 0.250 |" in summary
    assert "**BWT** (backward transfer): n/a" in summary
    assert matplotlib.image.imread(directory / "accuracy_matrix.png").size > 0


def test_accepts_the_values_of_accuracy_matrix(tmp_path):
    metric = AccuracyMatrix(ABILITIES, num_stages=len(STAGES), learned_at=[0, 1, 2])
    metric.update(0, torch.tensor(BEFORE))
    for i, row in enumerate(MATRIX):
        metric.update(i + 1, torch.tensor(row))
    result = metric.compute()
    metrics = load_metrics(
        write(
            tmp_path,
            before=metric.before.tolist(),
            accuracy_matrix=metric.stage_rows.tolist(),
            average_accuracy=result["average_accuracy"].item(),
            forgetting=dict(zip(ABILITIES, result["forgetting"].tolist(), strict=True)),
            bwt=result["bwt"].item(),
            fwt=result["fwt"].item(),
        )
    )
    assert metrics["accuracy_matrix"] == MATRIX  # multiples of 1/16 are exact in fp32
    for key in ("average_accuracy", "bwt", "fwt"):
        assert metrics[key] == pytest.approx(DERIVED[key], abs=1e-6)
    assert metrics["forgetting"] == pytest.approx(DERIVED["forgetting"], abs=1e-6)


def test_existing_report_is_replaced_cleanly(tmp_path):
    write(tmp_path)
    (tmp_path / "unrelated.txt").write_text("kept")
    write(tmp_path, accuracy_matrix=[[1.0, 1.0, 1.0]] * len(STAGES))
    assert load_metrics(tmp_path)["accuracy_matrix"] == [[1.0, 1.0, 1.0]] * len(STAGES)
    assert "| unified | 1.000 | 1.000 | 1.000 |" in (tmp_path / "summary.md").read_text()
    assert {path.name for path in tmp_path.iterdir()} == FILES | {"unrelated.txt"}  # no temporary file left


def test_interrupted_write_keeps_the_previous_metrics_and_leaves_no_temporary(tmp_path, monkeypatch):
    write(tmp_path)
    before_interruption = (tmp_path / "metrics.json").read_bytes()
    real_replace = os.replace

    def fail_on_summary(source, destination):
        if Path(destination).name == "summary.md":
            raise OSError("disk full")
        real_replace(source, destination)

    monkeypatch.setattr(report_module.os, "replace", fail_on_summary)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path, accuracy_matrix=[[1.0, 1.0, 1.0]] * len(STAGES))
    assert (tmp_path / "metrics.json").read_bytes() == before_interruption
    assert {path.name for path in tmp_path.iterdir()} == FILES


def test_files_get_the_usual_permissions(tmp_path):
    directory = write(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in FILES:
        assert (directory / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_leaves_pyplot_state_alone(tmp_path):
    # Lightning imports pyplot itself, so what matters is that the report touches none of its global state.
    import matplotlib
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    write(tmp_path)
    write_plan(tmp_path, AFFINITY_PLAN)
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == figures
    assert (tmp_path / "metrics.json").exists()


AFFINITY_PLAN = Plan(
    STAGES,
    WHY,
    "Affinity",
    {"examples": 4},
    tuple(s.name for s in STAGES),
    measurements={"affinity": {"abilities": ABILITIES, "matrix": [[1, 0.5, -0.25], [0.5, 1, 0], [-0.25, 0, 1]]}},
    probe={"examples": 12, "seconds": 0.5},
)


def test_the_plan_is_saved_with_its_affinity_heatmap_and_summarised(tmp_path):
    assert json.loads(write_plan(tmp_path, AFFINITY_PLAN).read_text()) == AFFINITY_PLAN.to_dict()
    assert (tmp_path / "affinity.png").read_bytes()[:8] == PNG_MAGIC
    summary = (write(tmp_path, plan=AFFINITY_PLAN) / "summary.md").read_text()
    assert "**Affinity** planner (probe: 12 examples, 0.50 s)" in summary
    assert "![Gradient affinity](affinity.png)" in summary
    write_plan(tmp_path, PLAN)  # a plan without affinity removes the stale heatmap
    assert not (tmp_path / "affinity.png").exists()


def test_a_section_adds_its_key_markdown_and_figures(tmp_path):
    from matplotlib.figure import Figure

    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    section = Section(
        "live", {"steps": [10, 20], "scores": {"math": [0.5, math.nan]}}, ["## Live", "", "text"], {"curves": figure}
    )
    directory = write_report(tmp_path, PLAN, Results(ABILITIES, BEFORE, MATRIX, **DERIVED), [section])
    assert {path.name for path in directory.iterdir()} == FILES | {"live_curves.png"}
    assert (directory / "live_curves.png").read_bytes().startswith(PNG_MAGIC)
    assert load_metrics(directory)["live"] == {"steps": [10, 20], "scores": {"math": [0.5, None]}}
    assert (directory / "summary.md").read_text().endswith("## Live\n\ntext\n")


@pytest.mark.parametrize("key", ["forgetting", "live"])
def test_a_section_cannot_take_a_key_already_written(tmp_path, key):
    sections = [Section("live", {}, []), Section(key, {}, [])]
    with pytest.raises(ValueError, match=f"report section '{key}': metrics.json already has a key '{key}'"):
        write_report(tmp_path, PLAN, Results(ABILITIES, BEFORE, MATRIX, **DERIVED), sections)
    assert not (tmp_path / "metrics.json").exists()  # refused before anything is written
