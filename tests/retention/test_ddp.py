"""Under DDP and FSDP2 (2 processes, gloo, CPU) every process ends with the retention state one process would.

The runs train on the same global batches (2 x 4 examples, or 8 on one process) at a negligible learning rate,
so the Fisher, the anchors, the GEM / A-GEM reference gradients and the KL anchor's reference are estimated at the
same weights and must agree: under FSDP2 once gathered from the shards each process keeps.
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


def _assert_same_retention_state(state, single, methods):
    compared = [path for path in state if path.startswith(methods)]
    assert {path.split(".")[1] for path in compared} == {method[1:] for method in methods}
    assert any(".fisher." in p for p in compared) and any(".refs." in p for p in compared)
    assert any(".merges.1.alpha" in p for p in compared)
    assert any(".memory.items." in p for p in compared)
    for path in compared:
        value, expected = state[path], single[path]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-12, msg=path)
        else:
            assert value == expected, path


def test_state_equals_one_process_with_the_same_global_batches(runs):
    rank0, _, single = runs
    assert single[".world_size"] == 1
    _assert_same_retention_state(rank0, single, (".ewc", ".online_ewc", ".gem", ".agem", ".kl", ".wa"))
    assert any(p.startswith(".kl.reference.") for p in rank0)


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


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    result = _run(out, "--devices", "2", "--batch-size", "4", "--fsdp2")
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.mark.slow
def test_fsdp2_gathered_state_equals_one_process(fsdp2_run, runs):
    _, _, single = runs
    rank0, rank1 = (_tensors(state) for state in fsdp2_run)
    assert rank0.keys() == rank1.keys()
    for path, value in rank0.items():  # every process gathers the same state
        assert torch.equal(value, rank1[path]) if isinstance(value, torch.Tensor) else value == rank1[path], path
    _assert_same_retention_state(rank0, single, (".ewc", ".online_ewc", ".gem", ".agem", ".kl", ".wa"))
    for name, value in fsdp2_run[0]["params"].items():
        torch.testing.assert_close(value, single[f".params.{name}"], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fsdp2_each_process_keeps_half_of_the_retention_state(fsdp2_run, runs):
    _, _, single = runs
    for state in fsdp2_run:
        kept = state["local_numel"]
        assert set(kept) == {"ewc", "online_ewc", "gem", "agem", "kl"}
        for method, numel in kept.items():
            assert numel > 0 and numel * 2 == single[f".local_numel.{method}"], method


@pytest.mark.slow
def test_fsdp2_resumed_mid_stage_equals_the_uninterrupted_run(runs, tmp_path):
    """At a real learning rate, from the middle of the second stage: weights, optimizer and retention state restored.

    A ForgettingBudget rolls back at step 7 to step 6: in memory, from each process's shards, in the whole run; from
    the gathered checkpoint of step 6 in the resumed one.
    """
    flags = ("--devices", "2", "--batch-size", "4", "--fsdp2", "--learning-rate", "3e-3", "--budget")
    result = _run(tmp_path / "whole", *flags, "--checkpoint-every", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    [checkpoint] = (tmp_path / "whole" / "ckpt").glob("*step=6.ckpt")
    assert checkpoint.is_dir()  # a distributed checkpoint: each process wrote its shards
    result = _run(tmp_path / "resumed", *flags, "--ckpt-path", str(checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    runs_state = {run: torch.load(tmp_path / run / "rank0.pt", weights_only=False) for run in ("whole", "resumed")}
    [event] = runs_state["whole"]["budget"]["events"]
    assert (event["step"], event["restored_step"]) == (7, 6)
    rolled_back, restored = (_tensors(runs_state["whole"]["snapshots"][step]) for step in (7, 6))
    assert rolled_back.keys() == restored.keys() and any(".exp_avg" in path for path in restored)
    for path, value in rolled_back.items():  # weights and AdamW's moments and step: those of step 6, bit for bit
        assert torch.equal(value, restored[path]), path
    whole, resumed = (_tensors(state) for state in runs_state.values())
    assert set(whole) - set(resumed) == {path for path in whole if path.startswith(".snapshots.6.")}
    for path, value in resumed.items():
        assert torch.equal(value, whole[path]) if isinstance(value, torch.Tensor) else value == whole[path], path
    _, _, single = runs  # at a negligible learning rate: the initial weights
    assert any(not torch.allclose(value, single[path]) for path, value in whole.items() if path.startswith(".params."))
