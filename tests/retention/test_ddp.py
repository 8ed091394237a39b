"""Under DDP (2 processes, gloo, CPU) every process ends with the same retention state as one process would.

Both runs train on the same global batches (2 x 4 examples, or 8 on one process) at a negligible learning rate,
so the Fisher, the anchors, the GEM reference gradients and the KL anchor's reference are estimated at the same
weights and must agree.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from hft_lightning.checks import check_trainer
from hft_lightning.errors import ConfigError
from tests.helpers import run_script

SCRIPT = Path(__file__).with_name("ddp_fit.py")


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, str(out), *args)


def _tensors(state, prefix=""):
    """The state's leaves by dotted path (dicts, lists and tuples walked)."""
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list | tuple) else None
    if items is None:
        return {prefix: state}
    return {path: leaf for key, value in items for path, leaf in _tensors(value, f"{prefix}.{key}").items()}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The 2-process run, checkpointed at its last step (12), before the last stage's validation."""
    out = tmp_path_factory.mktemp("ddp")
    result = _run(out, "--devices", "2", "--batch-size", "4", "--checkpoint-every", "12")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(ddp_run, tmp_path_factory):
    single = tmp_path_factory.mktemp("single")
    result = _run(single, "--devices", "1", "--batch-size", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    load = lambda path: _tensors(torch.load(path, weights_only=False))  # noqa: E731
    return load(ddp_run / "rank0.pt"), load(ddp_run / "rank1.pt"), load(single / "rank0.pt")


def test_every_process_holds_the_same_state(runs):
    rank0, rank1, _ = runs
    assert rank0[".world_size"] == 2
    assert rank0.keys() == rank1.keys()
    for path, value in rank0.items():
        same = torch.equal(value, rank1[path]) if isinstance(value, torch.Tensor) else value == rank1[path]
        assert same, path


def test_state_equals_one_process_with_the_same_global_batches(runs):
    rank0, _, single = runs
    assert single[".world_size"] == 1
    compared = [path for path in rank0 if path.startswith((".ewc", ".gem", ".kl", ".wa"))]
    assert any(".fisher." in p for p in compared) and any(".refs." in p for p in compared)
    assert any(p.startswith(".kl.reference.") for p in compared)
    assert any(".merges.1.alpha" in p for p in compared)
    assert any(".memory.items." in p for p in compared)
    for path in compared:
        value, expected = rank0[path], single[path]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-12, msg=path)
        else:
            assert value == expected, path


def test_lightning_distributed_sampler_is_refused():
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(ConfigError, match=r"set trainer\.use_distributed_sampler: false with 2 processes"):
        check_trainer(trainer)


def test_resuming_at_the_last_step_measures_the_last_row_on_every_process_and_reports(ddp_run, tmp_path):
    """The resumed run records the skipped row and ends: compute() is a collective, run by both processes."""
    [checkpoint] = (ddp_run / "ckpt").glob("*step=12.ckpt")
    result = _run(tmp_path, "--devices", "2", "--batch-size", "4", "--ckpt-path", str(checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert resumed == json.loads((ddp_run / "report" / "metrics.json").read_text())


def test_every_process_follows_the_plan_rank_zero_measured(tmp_path):
    result = _run(tmp_path, "--devices", "2", "--batch-size", "4", "--planner", "rank-dependent")
    assert result.returncode == 0, result.stderr[-3000:]
    plans = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["plan"] for r in (0, 1)]
    assert plans[0] == plans[1]
    assert [s["name"] for s in plans[0]] == ["math", "code", "general"]
    assert {s["why"] for s in plans[0]} == {"measured on rank 0"}


def test_the_affinity_planner_under_ddp_plans_as_one_process(tmp_path):
    for out, devices, batch_size in [(tmp_path / "ddp", "2", "4"), (tmp_path / "single", "1", "8")]:
        result = _run(out, "--devices", devices, "--batch-size", batch_size, "--planner", "affinity")
        assert result.returncode == 0, result.stderr[-3000:]
    plans = [
        torch.load(tmp_path / p, weights_only=False)["plan"]
        for p in ("ddp/rank0.pt", "ddp/rank1.pt", "single/rank0.pt")
    ]
    assert plans[0] == plans[1] == plans[2]
    assert any(s["why"].startswith("affinity ") for s in plans[0])


def test_a_planning_error_on_rank_zero_stops_every_process_with_its_message(tmp_path):
    result = _run(tmp_path, "--devices", "2", "--batch-size", "4", "--planner", "failing")
    assert result.returncode != 0
    # both processes raise rank 0's ConfigError; none is left waiting for a plan or loses its peer
    assert result.stderr.count("ConfigError: data.abilities['math'].val: the probe failed on purpose") == 2
    assert "Connection closed" not in result.stderr
