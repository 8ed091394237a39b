.PHONY: install lint test test-fast test-slow bench

install:
	pip install torch==2.13.0 -e ".[dev]"

lint:
	ruff check .

test:
	python -m pytest

test-fast:
	python -m pytest -m "not slow"

test-slow:
	python -m pytest -m slow

bench:
	for b in ewc fisher gem_dots gem_project retention_overhead retention_memory packing sandbox; do python benchmarks/bench_$$b.py || exit 1; done
