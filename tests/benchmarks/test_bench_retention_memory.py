"""The retention memory benchmark runs each method in a fresh process and writes rows against plain SFT."""

import json

import pytest

from benchmarks.bench_retention_memory import main


@pytest.mark.slow
def test_memory_benchmark_writes_peaks_against_sft_run_first_and_last(tmp_path):
    results = tmp_path / "memory.jsonl"
    main(["--methods", "ewc", "--hidden-size", "64", "--num-layers", "1", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["sft", "ewc", "sft"]
    assert all(r["peak_bytes"] > r["param_bytes"] > 0 and r["device"] for r in rows)
    assert rows[0]["added_over_params"] == -rows[2]["added_over_params"]  # the baseline is their mean
    assert rows[1]["kept_over_params"] == 2.0  # one Fisher and one anchor, fp32, after one stage end
