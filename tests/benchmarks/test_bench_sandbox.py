"""The sandbox benchmark runs end to end and writes well-formed rows."""

import json

import pytest

from benchmarks.bench_sandbox import main
from hft_lightning import sandbox


def test_sandbox_benchmark_writes_both_isolations_and_the_setup_cost(tmp_path):
    missing = sandbox.namespaces_unavailable()
    if missing is not None:
        pytest.skip(f"the kernel refuses namespaces: {missing}")
    results = tmp_path / "sandbox.jsonl"
    main(["--sizes", "2", "--rounds", "1", "--setups", "3", "--results", str(results)])
    assert sandbox._USE_NAMESPACES  # the forced fallback of the "basic" rounds does not leak into later tests
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["isolation"], r["programs"]) for r in rows] == [("namespaces", 2), ("basic", 2), ("namespaces", 1)]
    assert all(r["median_s"] > 0 for r in rows[:2]) and rows[2]["setups"] == 3 and rows[2]["setup_cpu_ms"] > 0
