"""The end-of-fit report: what ran, what every ability scored after every stage, what was forgotten.

``write_report`` turns the :class:`~hft_lightning.plan.Plan` and the :class:`Results` of a fit (both built by the
package, so they are rendered as they are, not checked again) into a folder a person reads and a tool parses:

- ``metrics.json``: the contract other tools read. Keys ``abilities``, ``stages``, ``before``, ``accuracy_matrix``,
  ``average_accuracy``, ``forgetting``, ``bwt``, ``fwt``, plus ``plan`` (the stages with their mixture, steps and
  ``why``: the reason for each stage's place). A score that was never recorded (NaN) is written as ``null``: strict
  JSON has no NaN.
- ``accuracy_matrix.png``: the matrix as a heatmap, colour scale fixed to [0, 1] so two reports compare by eye.
- ``ability_curves.png``: one line per ability across the stages, the stretch each stage trains shaded.
- ``summary.md``: the plan, the matrix and the derived numbers as markdown, with both images embedded.
- One :class:`Section` per callback that contributes one (the forgetting budget's live scores, weight averaging's
  choices): its data under its key in ``metrics.json``, its markdown at the end of ``summary.md``, its figures as
  ``<name>.png``.

``write_plan`` writes what is known before training, when the curriculum has decided its order: ``plan.json`` (the
stages in training order, why each is where it is, what the planner measured and what the measurement cost) and,
when the planner measured gradient affinity, ``affinity.png``.

Everything is rendered in memory first, then each file is written to a temporary name in the same directory and
moved into place with ``os.replace`` (atomic on POSIX and Windows): an interrupted write leaves the previous
report's files whole, never a half-written one. ``metrics.json`` is replaced last, so once it is new the rest is.

Plots use ``matplotlib.figure.Figure`` with the Agg canvas directly, not ``pyplot``: no global figure registry,
no backend switch for a user who has already imported pyplot, nothing to close.
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from hft_lightning.plan import Plan, markdown_cell, single_ability

DPI = 120


@dataclass(frozen=True)
class Results:
    """What a fit measured, one value per declared ability (NaN where an ability is not scored or a row not recorded).

    Attributes:
        abilities: Ability names, one per column of the matrix.
        before: Scores before training, in [0, 1].
        accuracy_matrix: One row per stage of the plan, one score in [0, 1] per ability.
        average_accuracy: Mean final score (:class:`hft_lightning.metrics.AccuracyMatrix`).
        forgetting: Ability -> best earlier stage score minus final score.
        bwt: Backward transfer.
        fwt: Forward transfer.
    """

    abilities: list[str]
    before: list[float]
    accuracy_matrix: list[list[float]]
    average_accuracy: float
    forgetting: dict[str, float]
    bwt: float
    fwt: float


@dataclass(frozen=True)
class Section:
    """A part of the report contributed by a callback (:class:`~hft_lightning.callbacks.report.ContributesToReport`).

    Attributes:
        key: Its key in ``metrics.json`` (not one of the report's own keys) and the stem of its figures' names.
        data: What ``metrics.json`` holds under ``key``: JSON values only (NaN is written as ``null``).
        markdown: Lines appended to ``summary.md``, starting with a ``## `` heading; a figure named ``name`` is
            embedded as ``![...](<key>_<name>.png)``.
        figures: Figure name -> figure, written as ``<key>_<name>.png``.
    """

    key: str
    data: dict[str, Any]
    markdown: list[str]
    figures: dict[str, Figure] = field(default_factory=dict)


def write_report(directory: str | Path, plan: Plan, results: Results, sections: Sequence[Section] = ()) -> Path:
    """Write ``metrics.json``, ``accuracy_matrix.png``, ``ability_curves.png`` and ``summary.md`` into a folder.

    Args:
        directory: The report folder, created if needed; files of an earlier report in it are replaced.
        plan: The plan that ran; ``results.accuracy_matrix`` has one row per stage.
        results: The scores and the numbers derived from them.
        sections: Parts contributed by callbacks, in the order given.

    Raises:
        ValueError: If a section's key is one of the report's own keys or another section's.

    Returns:
        The report folder.
    """
    stage_names = [stage.name for stage in plan.stages]
    metrics = {
        "abilities": results.abilities,
        "stages": stage_names,
        "before": [_json_number(x) for x in results.before],
        "accuracy_matrix": [[_json_number(x) for x in row] for row in results.accuracy_matrix],
        "average_accuracy": _json_number(results.average_accuracy),
        "forgetting": {name: _json_number(x) for name, x in results.forgetting.items()},
        "bwt": _json_number(results.bwt),
        "fwt": _json_number(results.fwt),
        "plan": [
            {"name": s.name, "mixture": {a: float(w) for a, w in s.mixture.items()}, "steps": s.steps, "why": why}
            for s, why in zip(plan.stages, plan.why, strict=True)
        ],
    }
    for section in sections:
        if section.key in metrics:
            raise ValueError(f"report section {section.key!r}: metrics.json already has a key {section.key!r}")
        metrics[section.key] = _json_values(section.data)
    rows = ["before", *stage_names]
    files = {  # insertion order is write order: metrics.json last
        "accuracy_matrix.png": _png(
            _heatmap(ACCURACY, [results.before, *results.accuracy_matrix], rows, results.abilities)
        ),
        "ability_curves.png": _png(_curves(plan, results)),
        **{f"{s.key}_{name}.png": _png(figure) for s in sections for name, figure in s.figures.items()},
        "summary.md": "\n".join(
            [_summary(plan, results), *(line for s in sections for line in [*s.markdown, ""])]
        ).encode(),
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
        names = affinity["abilities"]
        _replace_atomically(directory / "affinity.png", _png(_heatmap(AFFINITY, affinity["matrix"], names, names)))
    content = json.dumps(plan.to_dict(), indent=2, allow_nan=False) + "\n"
    _replace_atomically(directory / "plan.json", content.encode())
    return directory / "plan.json"


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else x


def _json_values(value: Any) -> Any:
    """``value`` with every NaN float, at any depth of dicts and lists, written as ``None``."""
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, dict):
        return {key: _json_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_values(item) for item in value]
    return value


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


@dataclass(frozen=True)
class HeatmapStyle:
    """How :func:`draw_heatmap` shows one kind of matrix."""

    title: str
    colormap: str
    vmin: float
    vmax: float
    number: str
    """Format of a cell's value."""
    light_text: Callable[[float], bool]
    """Whether a cell's value is written in white (on a dark colour)."""
    colorbar: str
    first_row_apart: bool = False
    """The first row is the untrained model: a line sets it apart from the stage rows, and the frame is hidden."""
    xlabel: str | None = None
    ylabel: str | None = None


ACCURACY = HeatmapStyle(
    title="Accuracy matrix R[stage][ability]", colormap="viridis", vmin=0.0, vmax=1.0, number="{:.2f}",
    light_text=lambda value: value < 0.6, colorbar="score", first_row_apart=True,
    xlabel="evaluated on ability", ylabel="after stage",
)  # fmt: skip
"""Scores in [0, 1], colour scale fixed so two reports compare by eye."""

AFFINITY = HeatmapStyle(
    title="Gradient affinity (cosine) before training", colormap="RdBu", vmin=-1.0, vmax=1.0, number="{:+.2f}",
    light_text=lambda value: abs(value) > 0.6, colorbar="cosine",
)  # fmt: skip
"""Cosines in [-1, 1]."""


def _heatmap(style: HeatmapStyle, values: Sequence[Sequence[float]], rows: list[str], columns: list[str]) -> Figure:
    figure = Figure(figsize=(2.2 + 1.15 * len(columns), 1.5 + 0.55 * len(rows)), layout="constrained")
    ax = figure.add_subplot()
    image = draw_heatmap(ax, style, values, rows, columns)
    ax.set_title(style.title, fontweight="bold")
    figure.colorbar(image, ax=ax, label=style.colorbar, fraction=0.08, pad=0.03)
    return figure


def draw_heatmap(
    ax: Axes, style: HeatmapStyle, values: Sequence[Sequence[float]], rows: list[str], columns: list[str]
) -> AxesImage:
    """Draws a matrix on ``ax``, one labelled cell per value; NaN is drawn as n/a.

    Args:
        ax: The axes to draw on; its title is left to the caller.
        style: :data:`ACCURACY` or :data:`AFFINITY`.
        values: ``[len(rows)][len(columns)]``.
        rows: Row labels.
        columns: Column labels, drawn on top.

    Returns:
        The image, for a colour bar.
    """
    array = np.array(values, dtype=float)
    colormap = matplotlib.colormaps[style.colormap].with_extremes(bad="#e0e0e0")
    image = ax.imshow(np.ma.masked_invalid(array), cmap=colormap, vmin=style.vmin, vmax=style.vmax, aspect="auto")
    for (i, j), value in np.ndenumerate(array):
        text, colour = (
            ("n/a", "#606060")
            if math.isnan(value)
            else (style.number.format(value), "white" if style.light_text(value) else "black")
        )
        ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=10)
    if style.first_row_apart:
        ax.axhline(0.5, color="white", linewidth=3)
    ax.set_xticks(range(len(columns)), columns, **_tick_style(columns, top=True))
    ax.set_yticks(range(len(rows)), rows)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    if style.xlabel:
        ax.set_xlabel(style.xlabel)
    if style.ylabel:
        ax.set_ylabel(style.ylabel)
    if style.first_row_apart:
        for spine in ax.spines.values():
            spine.set_visible(False)
    return image


def _curves(plan: Plan, results: Results) -> Figure:
    abilities = results.abilities
    values = np.array([results.before, *results.accuracy_matrix], dtype=float)
    colours = {name: f"C{j % 10}" for j, name in enumerate(abilities)}
    figure = Figure(figsize=(max(6.0, 2.5 + 1.2 * len(values)), 4.2), layout="constrained")
    ax = figure.add_subplot()
    for i, stage in enumerate(plan.stages):  # stage i trains between the points x = i and x = i + 1
        trained = single_ability(stage)
        ax.axvspan(i, i + 1, color="0.5" if trained is None else colours[trained], alpha=0.09, linewidth=0)
    for j, name in enumerate(abilities):
        ax.plot(range(len(values)), values[:, j], marker="o", linewidth=2, color=colours[name], label=name)
    ax.set_xlim(-0.25, len(values) - 0.75)
    ax.set_ylim(-0.03, 1.03)
    labels = ["before", *(stage.name for stage in plan.stages)]
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


def _summary(plan: Plan, results: Results) -> str:
    forgetting = results.forgetting
    measured = {name: value for name, value in forgetting.items() if not math.isnan(value)}
    worst = max(measured, key=measured.__getitem__) if measured else None
    rows = zip(["before", *(s.name for s in plan.stages)], [results.before, *results.accuracy_matrix], strict=True)
    lines = [
        "# Hierarchical fine-tuning report",
        "",
        "## Plan",
        "",
        *plan.markdown(),
        "",
        *(["![Gradient affinity](affinity.png)", ""] if plan.affinity is not None else []),
        "## Accuracy matrix",
        "",
        "Score on each ability (columns) before training and after each stage (rows), in [0, 1].",
        "",
        "| after | " + " | ".join(markdown_cell(name) for name in results.abilities) + " |",
        "| --- |" + " ---: |" * len(results.abilities),
        *(f"| {markdown_cell(label)} | " + " | ".join(_format(x) for x in row) + " |" for label, row in rows),
        "",
        "## Derived numbers",
        "",
        f"- **Average accuracy**: {_format(results.average_accuracy)}, the mean final score over all abilities.",
        f"- **Max forgetting**: {_format(forgetting[worst]) + f' ({worst})' if worst else 'n/a'}, "
        "the largest drop from an ability's best earlier stage score to its final score.",
        f"- **BWT** (backward transfer): {_format(results.bwt)}, how later stages changed each ability since the "
        "stage that first trained it (negative: forgetting).",
        f"- **FWT** (forward transfer): {_format(results.fwt)}, how earlier stages changed each ability before it "
        "was trained, against the untrained model.",
        "",
        "Forgetting per ability (Chaudhry et al. 2018): best score after an earlier stage minus the final score; "
        "negative means the final score is the best so far.",
        "",
        "| ability | forgetting |",
        "| --- | ---: |",
        *(f"| {markdown_cell(name)} | {_format(value)} |" for name, value in forgetting.items()),
        "",
        "## Figures",
        "",
        "![Accuracy matrix](accuracy_matrix.png)",
        "",
        "![Scores across stages](ability_curves.png)",
        "",
    ]
    return "\n".join(lines)


def _format(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"
