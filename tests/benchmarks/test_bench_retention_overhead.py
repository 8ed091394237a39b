"""The retention overhead benchmark runs end to end, on one process and under FSDP2, and writes well-formed rows."""

import json

import pytest

from benchmarks.bench_retention_overhead import main
from tests.helpers import ROOT, run_script

SCRIPT = ROOT / "benchmarks" / "bench_retention_overhead.py"


@pytest.mark.slow
def test_overhead_benchmark_writes_ratios_against_sft(tmp_path):
    results = tmp_path / "overhead.jsonl"
    main(["--methods", "replay", "ewc", "--steps", "3", "--rounds", "2", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in rows] == [(m, i) for i in (0, 1) for m in ("sft", "replay", "ewc")]
    assert rows[0]["ratio_vs_sft"] == rows[3]["ratio_vs_sft"] == 1.0  # each round against its own SFT
    assert rows[2]["ratio_vs_sft"] == rows[2]["step_ms"] / rows[0]["step_ms"]
    assert all(r["step_ms"] > 0 and r["device"] and r["params"] > 0 for r in rows)
    assert rows[2]["state_bytes_over_params"] == 2.0  # one Fisher and one anchor, fp32, after one stage end
    assert {(r["strategy"], r["processes"]) for r in rows} == {("single", 1)}


@pytest.mark.slow
def test_under_fsdp2_each_method_is_timed_against_fsdp2_sft_and_rank_zero_writes(tmp_path):
    results = tmp_path / "overhead.jsonl"
    argv = ["--strategy", "fsdp2", "--methods", "kl_anchor", "--steps", "2", "--rounds", "1", "--results", str(results)]
    result = run_script(SCRIPT, *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["method"], r["strategy"], r["processes"]) for r in rows] == [
        ("sft", "fsdp2", 2),
        ("kl_anchor", "fsdp2", 2),
    ]
    assert rows[1]["ratio_vs_sft"] == rows[1]["step_ms"] / rows[0]["step_ms"]
    assert rows[1]["state_bytes_over_params"] == 1.0  # the reference snapshot, gathered from both processes
