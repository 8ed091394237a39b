"""One benchmark harness for every kernel (Liger-Kernel style): providers compared in the same run.

A script describes its op with ``Bench``: how to build inputs for a parameter count and dtype, the bytes
the op must move (its memory roofline), and its providers (the fused kernel and the baselines). ``main``
times every provider at every size and dtype, measures the device's copy bandwidth in the same run, and
appends one JSON line per measurement to ``benchmarks/results/kernels.jsonl``:

    {"op", "provider", "size", "dtype", "device", "date", "ms", "bytes", "copy_gbps", "roofline", "timing", "note", ...}

``roofline`` is (bytes the op must move / time) / copy bandwidth: 1.0 means the op runs at copy speed.
Timing, median of ``--repeats`` calls: on CUDA the calls are queued back to back with an event between each
two, so a call's time is what the GPU spends on it once the host has queued it, as in a training step where the
op is queued behind the backward pass (a call slower to launch than to run shows its launch time instead); on
CPU, wall clock.
Parameter lists have the shapes of a LLaMA-style model of the requested size (``llama_shapes``).

Run a script with ``--help``; e.g. ``python benchmarks/bench_ewc.py --sizes 1e6 1e7 --dtypes fp32 bf16``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.jsonl"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Skip(Exception):
    """Raised by a provider's setup when it cannot run here; the reason is recorded in the results."""


@dataclass
class Bench:
    """An op to benchmark.

    Attributes:
        op: Name recorded in the results (the kernel's module name).
        make_inputs: ``(shapes, dtype, device, args) -> inputs``.
        bytes_moved: ``(inputs, args) -> bytes`` the op must read and write at least.
        providers: Name -> ``setup(inputs, args) -> fn``; ``fn()`` runs the op once. Setup may raise ``Skip``.
        extra: ``args -> dict`` of fields added to every row (e.g. the number of references).
        add_args: Hook adding op-specific CLI flags.
    """

    op: str
    make_inputs: Callable
    bytes_moved: Callable
    providers: dict[str, Callable]
    extra: Callable = lambda args: {}
    add_args: Callable = lambda parser: None


def llama_shapes(num_params: float) -> list[tuple[int, ...]]:
    """Parameter shapes of a LLaMA-style decoder with about ``num_params`` parameters.

    Embedding and untied head [V, d]; per layer q, k, v, o [d, d], gate and up [f, d], down [d, f] with
    f = 8d/3 rounded to 64, two RMSNorm weights [d]; a final norm. Depth grows as d / 128 and the
    vocabulary as 32 d (capped at 32000), so small sizes keep realistic mixes of big and small tensors.
    """

    def build(d: int) -> list[tuple[int, ...]]:
        f, v, layers = 64 * math.ceil(8 * d / 3 / 64), min(32000, 32 * d), max(2, d // 128)
        layer = [(d, d)] * 4 + [(f, d), (f, d), (d, f), (d,), (d,)]
        return [(v, d), *layer * layers, (d,), (v, d)]

    def count(d: int) -> int:
        return sum(math.prod(s) for s in build(d))

    best = min(range(64, 16385, 64), key=lambda d: abs(math.log(count(d) / num_params)))
    return build(best)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def timed_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after ``warmup`` calls (see the module's Timing)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
        events[0].record()
        for event in events[1:]:
            fn()
            event.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in itertools.pairwise(events)]
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def copy_gbps(num_bytes: int, device: torch.device, repeats: int) -> float:
    """Copy bandwidth (read + write GB/s) of a ``num_bytes`` buffer on ``device``, measured now."""
    src = torch.empty(max(num_bytes // 4, 1 << 20), dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def parse_args(bench: Bench, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"Benchmark {bench.op}: providers compared in one run.")
    parser.add_argument(
        "--sizes", type=float, nargs="+", help="parameter counts (default 1e6 on CPU, 1e6..1e9 on CUDA)"
    )
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES), help="parameter dtypes")
    parser.add_argument("--providers", nargs="+", choices=list(bench.providers), help="default: all")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on a shared 2-core host, OpenMP barriers "
        "made every 2-thread op ~5 ms, 250x slower than 1 thread)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines file the rows are appended to")
    bench.add_args(parser)
    return parser.parse_args(argv)


def main(bench: Bench, argv: list[str] | None = None) -> list[dict]:
    """Runs every provider at every size and dtype; appends and prints the rows; returns them."""
    args = parse_args(bench, argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ([1e6] if device.type == "cpu" else [1e6, 1e7, 1e8, 1e9])
    repeats = args.repeats or (5 if device.type == "cpu" else 20)
    providers = args.providers or list(bench.providers)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for size in sizes:
        shapes = llama_shapes(size)
        n = sum(math.prod(s) for s in shapes)
        for dtype_name in args.dtypes:
            try:
                inputs = bench.make_inputs(shapes, DTYPES[dtype_name], device, args)
            except torch.OutOfMemoryError:
                print(f"{bench.op} n={n:.2e} {dtype_name}: out of memory, skipped")
                continue
            num_bytes = bench.bytes_moved(inputs, args)
            bandwidth = copy_gbps(num_bytes, device, repeats)
            measured = []
            for name in providers:
                row = {
                    "op": bench.op,
                    "provider": name,
                    "size": n,
                    "dtype": dtype_name,
                    "device": device_name(device),
                    "date": date,
                    "torch": torch.__version__,
                    **bench.extra(args),
                    "bytes": num_bytes,
                    "copy_gbps": round(bandwidth, 2),
                    "timing": "queued" if device.type == "cuda" else "wall",
                }
                try:
                    ms = timed_ms(bench.providers[name](inputs, args), device, repeats)
                    row.update(ms=round(ms, 4), roofline=round(num_bytes / (ms * 1e-3) / 1e9 / bandwidth, 4))
                    measured.append(row)
                except Skip as reason:
                    row.update(ms=None, roofline=None, note=str(reason))
                rows.append(row)
            _print(bench.op, n, dtype_name, bandwidth, rows[-len(providers) :], measured)
            append_rows(args.results, rows[-len(providers) :])  # as measured: a run killed later keeps these
            del inputs
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Appends ``rows`` to the JSON-lines results file ``path`` (created with its folder if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"appended {len(rows)} rows to {path}")


def _print(op: str, n: int, dtype: str, bandwidth: float, rows: list[dict], measured: list[dict]) -> None:
    print(f"\n{op}  n={n:.3e}  {dtype}  copy bandwidth {bandwidth:.1f} GB/s  ({rows[0]['device']})")
    for row in rows:
        if row["ms"] is None:
            print(f"  {row['provider']:>14}: skipped ({row['note']})")
            continue
        ratios = ", ".join(
            f"{row_b['ms'] / row['ms']:.2f}x {row_b['provider']}" for row_b in measured if row_b is not row
        )
        print(f"  {row['provider']:>14}: {row['ms']:9.3f} ms  roofline {row['roofline']:6.1%}  speed vs: {ratios}")
