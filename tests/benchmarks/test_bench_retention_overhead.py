"""The retention overhead benchmark runs end to end on two methods and writes well-formed rows."""

import json

import pytest

from benchmarks.bench_retention_overhead import main


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
