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
	python benchmarks/bench_ewc.py && python benchmarks/bench_fisher.py && python benchmarks/bench_gem.py
