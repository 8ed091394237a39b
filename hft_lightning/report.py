"""The end-of-fit report: what ran, what every ability scored after every stage, what was forgotten.

``write_report`` turns the plan and the accuracy matrix into a folder a person reads and a tool parses:

- ``metrics.json``: the contract other tools read. Keys ``abilities``, ``stages``, ``before``, ``accuracy_matrix``,
  ``average_accuracy``, ``forgetting``, ``bwt``, ``fwt``, plus ``plan`` (the stages with their mixture, steps and,
  when the curriculum gives it, ``why``: the reason for each stage's place). A score that was never recorded (NaN)
  is written as ``null``: strict JSON has no NaN.
- ``accuracy_matrix.png``: the matrix as a heatmap, colour scale fixed to [0, 1] so two reports compare by eye.
- ``ability_curves.png``: one line per ability across the stages, the stretch each stage trains shaded.
- ``summary.md``: the plan, the matrix and the derived numbers as markdown, with both images embedded.

``write_plan`` writes what is known before training, when the curriculum has decided its order: ``plan.json`` (the
stages in training order, why each is where it is, what the planner measured and what the measurement cost) and,
when the planner measured gradient affinity, ``affinity.png``.

Everything is rendered in memory first, then each file is written to a temporary name in the same directory and
moved into place with ``os.replace`` (atomic on POSIX and Windows): an interrupted write leaves the previous
report's files whole, never a half-written one. ``metrics.json`` is replaced last, so once it is new the rest is.

Plots use ``matplotlib.figure.Figure`` with the Agg canvas directly, not ``pyplot``: no global figure registry,
no backend switch for a user who has already imported pyplot, nothing to close.
"""

import io
import json
import math
import numbers
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from hft_lightning.plan import Plan

DPI = 120


def write_report(
    directory: str | Path,
    abilities: Sequence[str],
    stages: Sequence[Mapping[str, Any]],
    before: Sequence[float],
    accuracy_matrix: Sequence[Sequence[float]],
    derived: Mapping[str, Any],
    planning: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``metrics.json``, ``accuracy_matrix.png``, ``ability_curves.png`` and ``summary.md`` into a folder.

    Args:
        directory: The report folder, created if needed; files of an earlier report in it are replaced.
        abilities: Ability names, one per column of the matrix.
        stages: The plan that ran, one mapping per stage with ``name`` (str), ``mixture`` (ability -> weight),
            ``steps`` (int) and optionally ``why`` (str, the reason for its place); other keys are ignored.
        before: Scores before training, one per ability, in [0, 1]; NaN or ``None`` where not measured.
        accuracy_matrix: One row per stage, one score in [0, 1] per ability (NaN or ``None`` where not measured).
        derived: ``average_accuracy``, ``bwt``, ``fwt`` (numbers) and ``forgetting`` (ability -> number), for
            example the values of :class:`hft_lightning.metrics.AccuracyMatrix` ``.compute()``.
        planning: How the order was decided, as written by :func:`write_plan` (``planner``, ``probe``,
            ``measurements``): summarised in ``summary.md``, with the affinity heatmap when there is one.

    Returns:
        The report folder.

    Raises:
        ValueError: An argument has the wrong shape, a missing key or a score outside [0, 1]; the message names it.
    """
    abilities = _abilities(abilities)
    plan = _plan(stages, abilities)
    before_row = _scores("before", before, abilities)
    if len(accuracy_matrix) != len(plan):
        raise ValueError(
            f"accuracy_matrix must have one row per stage ({len(plan)}: {[s['name'] for s in plan]}), "
            f"got {len(accuracy_matrix)}"
        )
    matrix = [_scores(f"accuracy_matrix[{i}]", row, abilities) for i, row in enumerate(accuracy_matrix)]
    numbers = _derived(derived, abilities)
    stage_names = [stage["name"] for stage in plan]

    metrics = {
        "abilities": abilities,
        "stages": stage_names,
        "before": [_json_number(x) for x in before_row],
        "accuracy_matrix": [[_json_number(x) for x in row] for row in matrix],
        "average_accuracy": _json_number(numbers["average_accuracy"]),
        "forgetting": {name: _json_number(x) for name, x in numbers["forgetting"].items()},
        "bwt": _json_number(numbers["bwt"]),
        "fwt": _json_number(numbers["fwt"]),
        "plan": plan,
    }
    files = {  # insertion order is write order: metrics.json last
        "accuracy_matrix.png": _png(_heatmap(abilities, stage_names, before_row, matrix)),
        "ability_curves.png": _png(_curves(abilities, plan, before_row, matrix)),
        "summary.md": _summary(abilities, plan, before_row, matrix, numbers, planning).encode(),
        "metrics.json": (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode(),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        _replace_atomically(directory / name, content)
    return directory


def write_plan(directory: str | Path, plan: Plan) -> Path:
    """Write ``plan.json`` and, when the plan measured gradient affinity, ``affinity.png`` into a folder.

    Args:
        directory: The report folder, created if needed. An ``affinity.png`` of an earlier plan is removed when this
            plan has no affinity, so the folder never shows a matrix that did not decide this plan.
        plan: The plan. Its ``measurements`` may hold ``affinity``: ``abilities`` (k names) and ``matrix`` (k x k
            cosines in [-1, 1]).

    Returns:
        The path of ``plan.json``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    affinity = plan.measurements.get("affinity")
    if affinity is None:
        (directory / "affinity.png").unlink(missing_ok=True)
    else:
        _replace_atomically(
            directory / "affinity.png", _png(_affinity_heatmap(affinity["abilities"], affinity["matrix"]))
        )
    content = json.dumps(plan.to_dict(), indent=2, allow_nan=False) + "\n"
    _replace_atomically(directory / "plan.json", content.encode())
    return directory / "plan.json"


def _affinity_heatmap(abilities: list[str], matrix: list[list[float]]) -> Figure:
    figure = Figure(figsize=(2.2 + 1.15 * len(abilities), 1.5 + 0.55 * len(abilities)), layout="constrained")
    ax = figure.add_subplot()
    values = np.array(matrix, dtype=float)
    image = ax.imshow(values, cmap="RdBu", vmin=-1.0, vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, f"{value:+.2f}", ha="center", va="center", color="white" if abs(value) > 0.6 else "black")
    ax.set_xticks(range(len(abilities)), abilities, **_tick_style(abilities, top=True))
    ax.set_yticks(range(len(abilities)), abilities)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    ax.set_title("Gradient affinity (cosine) before training", fontweight="bold")
    figure.colorbar(image, ax=ax, label="cosine", fraction=0.08, pad=0.03)
    return figure


def _abilities(abilities: Sequence[str]) -> list[str]:
    names = list(abilities)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"abilities must be a non-empty list of non-empty names, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"abilities must be unique, got {names}")
    return names


def _plan(stages: Sequence[Mapping[str, Any]], abilities: list[str]) -> list[dict[str, Any]]:
    if len(stages) == 0:
        raise ValueError("stages must list at least one stage, got an empty sequence")
    plan = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, Mapping) or not {"name", "mixture", "steps"} <= stage.keys():
            raise ValueError(f"stages[{i}] must be a mapping with keys 'name', 'mixture' and 'steps', got {stage!r}")
        name, mixture, steps = stage["name"], stage["mixture"], stage["steps"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"stages[{i}]['name'] must be a non-empty string, got {name!r}")
        if not isinstance(mixture, Mapping) or not mixture:
            raise ValueError(f"stages[{i}]['mixture'] must be a non-empty mapping ability -> weight, got {mixture!r}")
        unknown = [ability for ability in mixture if ability not in abilities]
        if unknown:
            raise ValueError(f"stages[{i}]['mixture'] names unknown abilities {unknown}; allowed: {abilities}")
        if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) for w in mixture.values()):
            raise ValueError(f"stages[{i}]['mixture'] weights must be numbers, got {dict(mixture)!r}")
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"stages[{i}]['steps'] must be an int, got {steps!r}")
        plan.append({"name": name, "mixture": {a: float(w) for a, w in mixture.items()}, "steps": steps})
        if "why" in stage:
            if not isinstance(stage["why"], str):
                raise ValueError(f"stages[{i}]['why'] must be a string, got {stage['why']!r}")
            plan[-1]["why"] = stage["why"]
    return plan


def _scores(argument: str, row: Sequence[float | None], abilities: list[str]) -> list[float]:
    if len(row) != len(abilities):
        raise ValueError(f"{argument} must have one score per ability ({len(abilities)}: {abilities}), got {len(row)}")
    values = [math.nan if x is None else float(x) for x in row]
    outside = [x for x in values if not math.isnan(x) and not 0.0 <= x <= 1.0]
    if outside:
        raise ValueError(f"{argument} scores must lie in [0, 1] (NaN or None for not measured), got {values}")
    return values


def _derived(derived: Mapping[str, Any], abilities: list[str]) -> dict[str, Any]:
    missing = [key for key in ("average_accuracy", "forgetting", "bwt", "fwt") if key not in derived]
    if missing:
        raise ValueError(f"derived is missing {missing}; it needs average_accuracy, forgetting, bwt, fwt")
    forgetting = derived["forgetting"]
    if not isinstance(forgetting, Mapping) or sorted(forgetting) != sorted(abilities):
        raise ValueError(f"derived['forgetting'] must map each ability {abilities} to a number, got {forgetting!r}")
    return {
        "average_accuracy": _number("derived['average_accuracy']", derived["average_accuracy"]),
        "forgetting": {name: _number(f"derived['forgetting'][{name!r}]", forgetting[name]) for name in abilities},
        "bwt": _number("derived['bwt']", derived["bwt"]),
        "fwt": _number("derived['fwt']", derived["fwt"]),
    }


def _number(argument: str, x: Any) -> float:
    value = math.nan if x is None else float(x)
    if math.isinf(value):
        raise ValueError(f"{argument} must be a finite number, NaN or None, got {x!r}")
    return value


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else x


def _replace_atomically(path: Path, content: bytes) -> None:
    # A plain exclusive open, not tempfile.mkstemp: the file gets the umask's permissions (mkstemp forces 0600).
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _heatmap(abilities: list[str], stage_names: list[str], before: list[float], matrix: list[list[float]]) -> Figure:
    figure = Figure(figsize=(2.2 + 1.15 * len(abilities), 1.5 + 0.55 * (len(matrix) + 1)), layout="constrained")
    ax = figure.add_subplot()
    image = draw_accuracy_matrix(ax, abilities, stage_names, before, matrix)
    ax.set_title("Accuracy matrix R[stage][ability]", fontweight="bold")
    figure.colorbar(image, ax=ax, label="score", fraction=0.08, pad=0.03)
    return figure


def draw_accuracy_matrix(
    ax: Axes, abilities: list[str], stage_names: list[str], before: list[float], matrix: list[list[float]]
) -> AxesImage:
    """Draws an accuracy matrix on ``ax``: one row per stage (``before`` first), one column per ability.

    Args:
        ax: The axes to draw on; its title is left to the caller.
        abilities: Column labels, ``[num_abilities]``.
        stage_names: Row labels after the ``before`` row, ``[num_stages]``.
        before: Scores before training, ``[num_abilities]``; NaN is drawn as n/a.
        matrix: Scores after each stage, ``[num_stages][num_abilities]``; NaN is drawn as n/a.

    Returns:
        The image, for a colour bar (scores from 0 to 1).
    """
    values = np.array([before, *matrix], dtype=float)
    rows = ["before", *stage_names]
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="#e0e0e0")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colormap, vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        text, colour = (
            ("n/a", "#606060") if math.isnan(value) else (f"{value:.2f}", "white" if value < 0.6 else "black")
        )
        ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=10)
    ax.axhline(0.5, color="white", linewidth=3)  # the untrained row apart from the stage rows
    ax.set_xticks(range(len(abilities)), abilities, **_tick_style(abilities, top=True))
    ax.set_yticks(range(len(rows)), rows)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    ax.set_xlabel("evaluated on ability")
    ax.set_ylabel("after stage")
    for spine in ax.spines.values():
        spine.set_visible(False)
    return image


def _curves(abilities: list[str], plan: list[dict[str, Any]], before: list[float], matrix: list[list[float]]) -> Figure:
    values = np.array([before, *matrix], dtype=float)
    colours = {name: f"C{j % 10}" for j, name in enumerate(abilities)}
    figure = Figure(figsize=(max(6.0, 2.5 + 1.2 * len(values)), 4.2), layout="constrained")
    ax = figure.add_subplot()
    for i, stage in enumerate(plan):  # stage i trains between the points x = i and x = i + 1
        trained = [name for name, weight in stage["mixture"].items() if weight > 0]
        colour = colours[trained[0]] if len(trained) == 1 else "0.5"
        ax.axvspan(i, i + 1, color=colour, alpha=0.09, linewidth=0)
    for j, name in enumerate(abilities):
        ax.plot(range(len(values)), values[:, j], marker="o", linewidth=2, color=colours[name], label=name)
    ax.set_xlim(-0.25, len(values) - 0.75)
    ax.set_ylim(-0.03, 1.03)
    labels = ["before", *(stage["name"] for stage in plan)]
    ax.set_xticks(range(len(values)), labels, **_tick_style(labels, top=False))
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Ability scores across stages", fontweight="bold", pad=10)
    ax.set_xlabel("evaluated after stage   (band: a stage training, in the colour of its ability; grey: a mixture)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="ability")
    return figure


def _tick_style(labels: list[str], top: bool) -> dict[str, Any]:
    """Tilt tick labels when one is too long for its column (about 11 characters fit in the widths used here)."""
    if max(len(label) for label in labels) <= 11:
        return {}
    return {"rotation": 30, "rotation_mode": "anchor", "ha": "left" if top else "right"}


def _summary(
    abilities: list[str],
    plan: list[dict[str, Any]],
    before: list[float],
    matrix: list[list[float]],
    numbers: dict[str, Any],
    planning: Mapping[str, Any] | None,
) -> str:
    forgetting = numbers["forgetting"]
    measured = {name: value for name, value in forgetting.items() if not math.isnan(value)}
    worst = max(measured, key=measured.__getitem__) if measured else None
    why = any("why" in s for s in plan)
    lines = [
        "# Hierarchical fine-tuning report",
        "",
        "## Plan",
        "",
        *_planning_lines(planning),
        "| stage | mixture | steps |" + (" why |" if why else ""),
        "| --- | --- | ---: |" + (" --- |" if why else ""),
        *(
            f"| {_cell(s['name'])} | {_cell(', '.join(f'{a} {w:g}' for a, w in s['mixture'].items()))} | {s['steps']} |"
            + (f" {_cell(s.get('why', ''))} |" if why else "")
            for s in plan
        ),
        "",
        "## Accuracy matrix",
        "",
        "Score on each ability (columns) before training and after each stage (rows), in [0, 1].",
        "",
        "| after | " + " | ".join(_cell(name) for name in abilities) + " |",
        "| --- |" + " ---: |" * len(abilities),
        *(
            f"| {_cell(label)} | " + " | ".join(_format(x) for x in row) + " |"
            for label, row in zip(["before", *(s["name"] for s in plan)], [before, *matrix], strict=True)
        ),
        "",
        "## Derived numbers",
        "",
        f"- **Average accuracy**: {_format(numbers['average_accuracy'])}, the mean final score over all abilities.",
        f"- **Max forgetting**: {_format(forgetting[worst]) + f' ({worst})' if worst else 'n/a'}, "
        "the largest drop from an ability's best earlier stage score to its final score.",
        f"- **BWT** (backward transfer): {_format(numbers['bwt'])}, how later stages changed each ability since the "
        "stage that first trained it (negative: forgetting).",
        f"- **FWT** (forward transfer): {_format(numbers['fwt'])}, how earlier stages changed each ability before it "
        "was trained, against the untrained model.",
        "",
        "Forgetting per ability (Chaudhry et al. 2018): best score after an earlier stage minus the final score; "
        "negative means the final score is the best so far.",
        "",
        "| ability | forgetting |",
        "| --- | ---: |",
        *(f"| {_cell(name)} | {_format(value)} |" for name, value in forgetting.items()),
        "",
        "## Figures",
        "",
        "![Accuracy matrix](accuracy_matrix.png)",
        "",
        "![Scores across stages](ability_curves.png)",
        "",
    ]
    return "\n".join(lines)


def _planning_lines(planning: Mapping[str, Any] | None) -> list[str]:
    """How the order was decided, above the plan table: the planner, the probe's cost, the affinity heatmap."""
    if planning is None:
        return []
    probe = planning.get("probe")
    cost = f" (probe: {probe['examples']} examples, {probe['seconds']:.2f} s)" if probe else ""
    lines = [f"Order decided by the **{_cell(planning['planner'])}** planner{cost}: {planning['rule']}; "
             "`plan.json` holds the measurements.", ""]  # fmt: skip
    if "affinity" in planning.get("measurements", {}):
        lines += ["![Gradient affinity](affinity.png)", ""]
    return lines


def _format(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
