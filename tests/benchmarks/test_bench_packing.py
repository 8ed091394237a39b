"""The packing benchmark runs end to end and writes well-formed rows."""

import json

from benchmarks.bench_packing import main


def test_packing_benchmark_writes_ratios_against_padded_rows(tmp_path):
    results = tmp_path / "packing.jsonl"
    main(["--row-lengths", "128", "--steps", "2", "--warmup", "1", "--batch-size", "32", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["packing"] for r in rows] == [None, 128]
    assert rows[0]["ratio_vs_padded"] == 1.0
    assert all(r["step_ms"] > 0 and r["device"] and r["batch_size"] == 32 for r in rows)
    assert 0 < rows[0]["fill"] < rows[1]["fill"] <= 1  # built-in examples differ in length: padding wastes rows
