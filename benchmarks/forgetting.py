"""The forgetting benchmark: does staged training with retention keep every ability?

Runs each method's config (``configs/<method>.yaml``) under a regime (``--regime``, :mod:`benchmarks.regimes`:
the data and plan it trains under) through ``python -m hft_lightning fit`` for every seed, reads each run's
``report/metrics.json`` and writes the mean and spread over the seeds:

- ``benchmarks/results/forgetting_<regime>.json``: ``{"regime", "device", "date", "seeds", "scale", "num_val",
  "total_s", "methods": {name: {"final", "final_std", "average_accuracy", "average_accuracy_std", "forgetting",
  "max_forgetting", "max_forgetting_std", "bwt", "steps", "wall_s", "stages", "accuracy_matrix", "per_seed"}}}``,
  scores in [0, 1]; ``accuracy_matrix`` is the mean matrix with the ``before`` row first; ``steps`` the optimizer
  steps of the method's plan; ``"reference"`` and ``"paired"``: every other method's per-seed differences from
  the reference method (:func:`paired`), ``None`` when the reference did not run;
- ``benchmarks/results/forgetting_<regime>.md``: the same as a table, and ``forgetting_<regime>.png``, the methods'
  mean accuracy matrices side by side.

Every method trains the same model on the same data for the same number of optimizer steps; seed ``s`` sets both
``seed_everything`` and ``data.seed``. ``--scale`` multiplies every stage's steps and ``--num-val`` sets the
validation examples per ability, to shrink the benchmark (a smoke test runs it at ``--scale 0.02``).
Each finished run is kept in ``<runs>/<regime>/<method>/seed<s>/run.json``; a rerun with the same settings reuses it,
so an interrupted benchmark goes on where it stopped. ``--jobs`` runs that many fits at once, the CPU threads shared
out among them (a fit with fewer threads may round differently: compare methods measured with the same settings).

    python benchmarks/forgetting.py                                  # 5 methods x 3 seeds, balanced regime
    python benchmarks/forgetting.py --regime imbalanced --methods sequential hft --seeds 100
    python benchmarks/forgetting.py --jobs 8                         # on a machine with 16 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import scipy.stats
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import device_name
from benchmarks.regimes import REGIMES, STARTS, stages
from hft_lightning.report import ACCURACY, draw_heatmap

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("multitask", "sequential", "mixed_sequential", "dmt", "hft")
CURRICULUM = "hft_lightning.Curriculum"  # the name benchmarks.regimes finds the plan by
RETENTION = "hft_lightning.retention."


def config_paths(method: str) -> list[Path]:
    """The configs a method names: ``recipe`` or ``recipe@retention`` (e.g. ``default@retention/kl_anchor``)."""
    return [ROOT / "configs" / f"{name}.yaml" for name in method.split("@", 1)]


def run_config(method: str, scale: float, regime: str = "balanced") -> dict[str, Any]:
    """The method's config under ``regime``, every stage's steps times ``scale`` (at least 1), quiet, no checkpoints.

    ``recipe`` is ``configs/<recipe>.yaml``; ``recipe@retention`` is that recipe with its retention callbacks
    replaced by those of ``configs/<retention>.yaml`` (the same plan, model and data with another retention).
    The progress bar, checkpoints and logger are off: the benchmark reads each run's report.
    """
    path, *retention = config_paths(method)
    config = yaml.safe_load(path.read_text())
    callbacks = config["trainer"]["callbacks"]
    if retention:
        added = [c for c in yaml.safe_load(retention[0].read_text())["trainer"]["callbacks"] if _is_retention(c)]
        if not added:
            raise ValueError(f"{retention[0]}: trainer.callbacks holds no {RETENTION}* callback")
        callbacks = [c for c in callbacks if not _is_retention(c)] + added
    curricula = [c for c in callbacks if c["class_path"] == CURRICULUM]
    if len(curricula) != 1 or "stages" not in curricula[0].get("init_args", {}):
        raise ValueError(f"{path}: trainer.callbacks must hold one {CURRICULUM} with init_args.stages")
    config["trainer"]["callbacks"] = [c for c in callbacks if not c["class_path"].endswith("ProgressBar")]
    config["trainer"].update(enable_progress_bar=False, enable_checkpointing=False, logger=False)
    config = REGIMES[regime](config)
    for stage in stages(config):
        stage["steps"] = max(1, round(stage["steps"] * scale))
    return config


def _is_retention(callback: dict[str, Any]) -> bool:
    return callback["class_path"].startswith(RETENTION)


@dataclass(frozen=True)
class Settings:
    """What every run of one benchmark invocation shares.

    Attributes:
        regime: A name in :data:`benchmarks.regimes.REGIMES`.
        scale: Multiplies every stage's steps.
        num_val: Validation examples per ability.
        runs: Where the runs' folders go (``<runs>/<regime>/<method>/seed<seed>``).
        threads: CPU threads of each fit (``OMP_NUM_THREADS``); ``None``: torch's default, every core.
    """

    regime: str
    scale: float
    num_val: int
    runs: Path
    threads: int | None = None


def run(method: str, seed: int, settings: Settings) -> dict[str, Any]:
    """Trains one method for one seed (or reuses a finished run with the same settings) and returns its record.

    Under a regime with a start (:data:`benchmarks.regimes.STARTS`) the method starts from the model
    :func:`run_start` saved for the seed, which must have run.

    Args:
        method: A config name under ``configs/``, or ``recipe@retention``.
        seed: Sets ``seed_everything`` and ``data.seed``.
        settings: The benchmark's regime, sizes and folders.

    Returns:
        ``{"config", "seed", "num_val", "device", "wall_s", "metrics"}``, ``metrics`` the run's
        ``report/metrics.json``, ``device`` the machine it trained on (a reused run keeps its own).
    """
    config = run_config(method, settings.scale, settings.regime)
    if settings.regime in STARTS:
        config.setdefault("model", {})["name_or_path"] = str(start_directory(seed, settings) / "model")
    return fit(config, settings.runs / settings.regime / method / f"seed{seed}", seed, settings)


def run_start(seed: int, settings: Settings) -> dict[str, Any]:
    """Trains (or reuses) the run whose saved model the regime's methods start from, for one seed."""
    method, rewrite = STARTS[settings.regime]
    return fit(rewrite(run_config(method, settings.scale)), start_directory(seed, settings), seed, settings)


def start_directory(seed: int, settings: Settings) -> Path:
    """Where the start of ``settings.regime`` for ``seed`` trains; its model is in ``model/``."""
    return settings.runs / settings.regime / "start" / f"seed{seed}"


def fit(config: dict[str, Any], directory: Path, seed: int, settings: Settings) -> dict[str, Any]:
    """Trains ``config`` in ``directory`` for one seed, or reuses the run already there with the same settings."""
    num_val = settings.num_val
    record_path = directory / "run.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if (record["config"], record["seed"], record["num_val"]) == (config, seed, num_val):
            return record
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "benchmark_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [
        sys.executable, "-m", "hft_lightning", "fit", "--config", str(config_path),
        "--seed_everything", str(seed), "--data.seed", str(seed), "--data.num_val", str(num_val),
        "--trainer.default_root_dir", str(directory),
    ]  # fmt: skip
    log_path = directory / "fit.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        threads = settings.threads
        env = os.environ if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    wall_s = time.perf_counter() - start
    if returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{directory} failed (exit {returncode}), log {log_path}:\n{tail}")
    metrics = json.loads((directory / "report" / "metrics.json").read_text())
    device = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    record = {
        "config": config,
        "seed": seed,
        "num_val": num_val,
        "device": device,
        "wall_s": wall_s,
        "metrics": metrics,
    }
    temporary = record_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, record_path)
    return record


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over the seeds of one method's runs (sample standard deviation; 0 for one seed)."""
    metrics = [r["metrics"] for r in records]
    abilities = metrics[0]["abilities"]
    finals = {a: [m["accuracy_matrix"][-1][j] for m in metrics] for j, a in enumerate(abilities)}
    max_forgetting = [max(m["forgetting"].values()) for m in metrics]
    averages = [m["average_accuracy"] for m in metrics]
    matrices = [[m["before"], *m["accuracy_matrix"]] for m in metrics]  # [seed][row][ability]
    mean_matrix = [[statistics.fmean(c) for c in zip(*row, strict=True)] for row in zip(*matrices, strict=True)]
    return {
        "final": {a: statistics.fmean(v) for a, v in finals.items()},
        "final_std": {a: _std(v) for a, v in finals.items()},
        "average_accuracy": statistics.fmean(averages),
        "average_accuracy_std": _std(averages),
        "forgetting": {a: statistics.fmean(m["forgetting"][a] for m in metrics) for a in abilities},
        "max_forgetting": statistics.fmean(max_forgetting),
        "max_forgetting_std": _std(max_forgetting),
        "bwt": statistics.fmean(m["bwt"] for m in metrics),
        "steps": sum(s["steps"] for s in stages(records[0]["config"])),
        "wall_s": statistics.fmean(r["wall_s"] for r in records),
        "stages": metrics[0]["stages"],
        "accuracy_matrix": mean_matrix,
        "per_seed": {"seed": [r["seed"] for r in records], "average_accuracy": averages,
                     "max_forgetting": max_forgetting},
    }  # fmt: skip


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def paired(methods: dict[str, dict[str, Any]], reference: str) -> dict[str, dict[str, Any]]:
    """Each method against ``reference`` seed by seed: the mean difference and its 95% confidence interval.

    Every method ran on the same seeds, so a seed's data and initial model are shared and the per-seed differences
    cancel what the seed alone decides. The interval is Student's t on the differences:
    ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (``n`` seeds; no interval for one seed).

    Returns:
        Method -> ``{"average_accuracy", "average_accuracy_ci95", "max_forgetting", "max_forgetting_ci95",
        "better_seeds"}``: differences method - reference, the half-widths of their intervals (``None`` for one
        seed), and on how many seeds the method's average accuracy is higher.
    """
    base = methods[reference]["per_seed"]
    compared = {}
    for name, summary in methods.items():
        if name == reference:
            continue
        per_seed = summary["per_seed"]
        row: dict[str, Any] = {}
        differences = {
            key: [a - b for a, b in zip(per_seed[key], base[key], strict=True)]
            for key in ("average_accuracy", "max_forgetting")
        }
        for key, values in differences.items():
            row[key] = statistics.fmean(values)
            row[f"{key}_ci95"] = _half_width(values)
        row["better_seeds"] = sum(d > 0 for d in differences["average_accuracy"])
        compared[name] = row
    return compared


def _half_width(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    return float(scipy.stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def markdown(results: dict[str, Any], figure_name: str) -> str:
    """The results as a markdown table (mean ± standard deviation over the seeds) with the figure below."""
    methods = results["methods"]
    abilities = list(next(iter(methods.values()))["final"])
    header = [
        "method",
        *(f"final {a}" for a in abilities),
        "average accuracy",
        "max forgetting",
        "BWT",
        "steps",
        "wall s",
    ]
    lines = [
        f"# Forgetting benchmark, {results['regime']} regime ({results['date']})",
        "",
        f"Device: {results['device']}. Seeds: {results['seeds']}, step scale {results['scale']}, "
        f"{results['num_val']} validation examples per ability, total {results['total_s'] / 60:.1f} min. "
        "Mean ± standard deviation over the seeds; scores in [0, 1]; forgetting is the drop from an ability's best "
        "score after any earlier stage to its final score (lower is better).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, m in methods.items():
        cells = [
            *(f"{m['final'][a]:.2f} ± {m['final_std'][a]:.2f}" for a in abilities),
            f"{m['average_accuracy']:.3f} ± {m['average_accuracy_std']:.3f}",
            f"{m['max_forgetting']:.3f} ± {m['max_forgetting_std']:.3f}",
            f"{m['bwt']:+.3f}",
            str(m["steps"]),
            f"{m['wall_s']:.0f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if results["paired"]:
        lines += _paired_table(results["paired"], results["reference"], len(results["seeds"]))
    lines += ["", f"![Mean accuracy matrices]({figure_name})", ""]
    return "\n".join(lines)


def _paired_table(compared: dict[str, dict[str, Any]], reference: str, seeds: int) -> list[str]:
    def cell(row: dict[str, Any], key: str) -> str:
        interval = row[f"{key}_ci95"]
        return f"{row[key]:+.3f}" + ("" if interval is None else f" ± {interval:.3f}")

    lines = [
        "",
        f"Paired against {reference}, seed by seed (method - {reference}; ± the 95% confidence interval's "
        "half-width, Student's t over the seeds):",
        "",
        f"| method | average accuracy | max forgetting | seeds with a higher average (of {seeds}) |",
        "|---|---|---|---|",
    ]
    for name, row in compared.items():
        lines.append(
            f"| {name} | {cell(row, 'average_accuracy')} | {cell(row, 'max_forgetting')} | {row['better_seeds']} |"
        )
    return lines


def figure(results: dict[str, Any]) -> Figure:
    """The methods' mean accuracy matrices side by side, on one colour scale."""
    methods = results["methods"]
    abilities = list(next(iter(methods.values()))["final"])
    height = 1.8 + 0.5 * max(len(m["accuracy_matrix"]) for m in methods.values())
    fig = Figure(figsize=(3.3 * len(methods) + 0.8, height), layout="constrained")
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, (name, m) in zip(axes, methods.items(), strict=True):
        before, *matrix = m["accuracy_matrix"]
        image = draw_heatmap(ax, ACCURACY, [before, *matrix], ["before", *m["stages"]], abilities)
        ax.set_title(f"{name}\navg {m['average_accuracy']:.2f}, max forgetting {m['max_forgetting']:.2f}")
        if ax is not axes[0]:
            ax.set_ylabel("")
    fig.colorbar(image, ax=list(axes), label="score (mean over seeds)", fraction=0.02)
    return fig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help="config names under configs/ (planners/hft_reversed), or recipe@retention (default@retention/ewc)",
    )
    parser.add_argument("--regime", choices=list(REGIMES), default="balanced", help="the data and plan (regimes.py)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's steps")
    parser.add_argument("--num-val", type=int, default=100, help="validation examples per ability")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "forgetting", help="where the runs go")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where forgetting_<regime>.{json,md,png} go")
    parser.add_argument("--jobs", type=int, default=1, help="fits run at once, sharing the CPU cores")
    parser.add_argument(
        "--reference", default="multitask", help="the method the others are compared with seed by seed, if it ran"
    )
    args = parser.parse_args(argv)
    missing = [path for m in args.methods for path in config_paths(m) if not path.is_file()]
    if missing:
        parser.error(f"--methods: no config {', '.join(str(path.relative_to(ROOT)) for path in missing)}")
    if args.scale <= 0 or args.num_val < 1 or args.jobs < 1:
        parser.error(
            f"--scale must be > 0, --num-val and --jobs >= 1, got {args.scale}, {args.num_val} and {args.jobs}"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    jobs = [(m, s) for m in args.methods for s in args.seeds]
    threads = None if args.jobs == 1 else max(1, (os.cpu_count() or 1) // args.jobs)
    settings = Settings(args.regime, args.scale, args.num_val, args.runs, threads)
    starts = args.seeds if args.regime in STARTS else []
    total = len(starts) + len(jobs)
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=total, desc="forgetting benchmark", unit="run") as bar:
        for _ in pool.map(lambda seed: run_start(seed, settings), starts):
            bar.update()
        futures = {job: pool.submit(run, *job, settings) for job in jobs}
        # each future updates the bar when its fit ends, in whatever order they end
        for future in futures.values():
            future.add_done_callback(lambda _: bar.update())
        records = {m: [futures[m, s].result() for s in args.seeds] for m in args.methods}
    results = {
        "regime": args.regime,
        "device": ", ".join(sorted({r["device"] for rs in records.values() for r in rs})),
        "date": datetime.date.today().isoformat(),
        "seeds": args.seeds,
        "scale": args.scale,
        "num_val": args.num_val,
        "total_s": sum(r["wall_s"] for rs in records.values() for r in rs),
        "methods": {m: summarize(rs) for m, rs in records.items()},
        "reference": args.reference,
    }
    results["paired"] = paired(results["methods"], args.reference) if args.reference in records else None
    stem = args.out / f"forgetting_{args.regime}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results, f"{stem.name}.png"))
    fig = figure(results)
    FigureCanvasAgg(fig)
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    print(markdown(results, f"{stem.name}.png"))
    print(f"wrote {stem}.{{json,md,png}} in {(time.perf_counter() - start) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
