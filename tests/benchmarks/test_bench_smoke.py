"""Each benchmark script runs end to end at its smallest size and appends well-formed rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "bench_ewc.py": ["triton", "torch", "eager"],
    "bench_fisher.py": ["triton", "torch", "eager"],
    "bench_gem_dots.py": ["triton", "torch", "flatten"],
    "bench_gem_project.py": ["triton", "torch", "host_quadprog"],
}


def _run(script: str, providers: list[str], results: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--sizes", "1e5", "--repeats", "1"]
    subprocess.run([*cmd, "--providers", *providers, "--results", str(results)], env=env, check=True, cwd=ROOT)
    return [json.loads(line) for line in results.read_text().splitlines()]


def _check(rows: list[dict], providers: list[str]) -> None:
    assert [r["provider"] for r in rows] == providers
    for row in rows:
        assert {"op", "size", "dtype", "device", "date", "bytes", "copy_gbps"} <= row.keys()
        assert (row["ms"] is None and row["note"]) or (row["ms"] > 0 and row["roofline"] > 0)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_script_runs_at_smallest_size(script, tmp_path):
    rows = _run(script, SCRIPTS[script], tmp_path / "kernels.jsonl")
    _check(rows, SCRIPTS[script])


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_ewc.py", "bench_fisher.py"])
def test_compile_provider_runs_or_records_why_not(script, tmp_path):
    _check(_run(script, ["compile"], tmp_path / "kernels.jsonl"), ["compile"])
