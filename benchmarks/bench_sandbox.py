"""Time to score a batch of trivial programs in the sandbox, with and without the per-program namespaces.

The two isolations take turns batch by batch (``basic`` is the fallback forced on), so both see the same load.
Per batch size and isolation: the median wall time of ``run_tests`` over ``--rounds`` batches, its range, and the
load average while it ran; the namespaces' cost per program is the difference of the medians times the worker
count (programs run one per CPU at a time) over the batch size. Wall time follows the machine's load, so the
script also measures the CPU time the namespaces add to one program: in a process as small as the runner, in the
batch's network namespace, a fork that enters a program's namespaces and exits against a fork that only exits,
``--setups`` times each. Results are printed and
appended to ``benchmarks/results/sandbox.jsonl``.

    python benchmarks/bench_sandbox.py                    # batches of 1 and 64, 20 rounds
    python benchmarks/bench_sandbox.py --sizes 64 --rounds 50
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import append_rows
from hft_lightning import sandbox

RESULTS = Path(__file__).resolve().parent / "results" / "sandbox.jsonl"
# Run as ``python -I -S -c SETUP_CPU sandbox.py setups``: the sandbox module alone, like the runner, in the
# batch's namespaces; each setup forks a child that exits at once or after entering a program's namespaces.
SETUP_CPU = """
import importlib.util, os, resource, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
sandbox._enter_batch_namespaces()

def child_cpu_ms(namespaces):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        if namespaces:
            sandbox._enter_namespaces(write_fd)
        os._exit(0)
    os.close(write_fd)
    os.read(read_fd, 1)  # end of file once every process holding it has exited
    os.close(read_fd)
    os.waitpid(pid, 0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000

setups = int(sys.argv[2])
print(sum(child_cpu_ms(True) - child_cpu_ms(False) for _ in range(setups)) / setups)
"""


def time_batch(size: int, namespaces: bool) -> float:
    programs = [f"def add_{k}(x):\n    return x + {k}" for k in range(size)]
    tests = [[f"assert add_{k}(1) == {k + 1}"] for k in range(size)]
    default, sandbox._USE_NAMESPACES = sandbox._USE_NAMESPACES, namespaces
    try:
        start = time.perf_counter()
        results = sandbox.run_tests(programs, tests)
        elapsed = time.perf_counter() - start
    finally:
        sandbox._USE_NAMESPACES = default  # the module's setting outlives this script when it is imported
    assert all(results), "a trivial program failed: the sandbox is broken here"
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sandbox batch time with and without per-program namespaces.")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 64], help="programs per batch")
    parser.add_argument("--rounds", type=int, default=20, help="timed batches per size and isolation")
    parser.add_argument("--setups", type=int, default=500, help="namespace setups timed for their CPU cost")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", "code sandbox without Linux namespaces", RuntimeWarning)  # basic is forced
    missing = sandbox.namespaces_unavailable()
    if missing is not None:
        raise SystemExit(f"namespaces unavailable here, nothing to compare: {missing}")
    workers = len(os.sched_getaffinity(0))
    device = f"cpu: {platform.processor() or platform.machine()}, {workers} cores"
    date = datetime.date.today().isoformat()
    rows = []
    for size in args.sizes:
        times: dict[str, list[float]] = {"namespaces": [], "basic": []}
        load_before = os.getloadavg()[0]
        time_batch(size, namespaces=True)  # warm the page cache and the first-call log
        for _ in range(args.rounds):
            for isolation in times:
                times[isolation].append(time_batch(size, namespaces=isolation == "namespaces"))
        load = (load_before + os.getloadavg()[0]) / 2
        medians = {isolation: statistics.median(t) for isolation, t in times.items()}
        per_program_ms = (medians["namespaces"] - medians["basic"]) * min(workers, size) / size * 1000
        print(f"\n{size} programs, {args.rounds} rounds, load average {load:.1f} ({device})")
        for isolation, t in times.items():
            print(f"  {isolation:>10}: median {medians[isolation]:.3f} s  ({min(t):.3f}-{max(t):.3f})")
            rows.append(
                {
                    "isolation": isolation,
                    "programs": size,
                    "device": device,
                    "date": date,
                    "rounds": args.rounds,
                    "median_s": medians[isolation],
                    "min_s": min(t),
                    "max_s": max(t),
                    "loadavg": round(load, 2),
                }
            )
        print(f"  namespaces cost {per_program_ms:.1f} ms per program per worker")
    load_before = os.getloadavg()[0]
    command = [sys.executable, "-I", "-S", "-c", SETUP_CPU, sandbox.__file__, str(args.setups)]
    setup_cpu_ms = float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    load = (load_before + os.getloadavg()[0]) / 2
    print(f"\nnamespaces: {setup_cpu_ms:.2f} ms of CPU per program over a fork ({args.setups} setups, load {load:.1f})")
    rows.append(
        {
            "isolation": "namespaces",
            "programs": 1,
            "device": device,
            "date": date,
            "setups": args.setups,
            "setup_cpu_ms": setup_cpu_ms,
            "loadavg": round(load, 2),
        }
    )
    append_rows(args.results, rows)


if __name__ == "__main__":
    main()
