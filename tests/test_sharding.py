"""FSDP2 (``ModelParallelStrategy`` + ``fully_shard``, 2 processes, gloo, CPU) trains as DDP does, sharded.

Both runs take the same per-process batches at the same learning rate, with Replay and WeightAveraging (the
recommended recipe) and KLAnchor, so every step's averaged gradient, KL term, merge and score must agree.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from transformers import AutoModelForCausalLM

from hft_lightning.checks import check_trainer
from hft_lightning.errors import ConfigError
from hft_lightning.sharding import decoder_layers, shard_model
from tests.helpers import ROOT, run_script, save_tiny_pretrained, tiny_datamodule, tiny_module
from tests.retention.sharded_fit import lora_model
from tests.test_cli import TINY_FLAGS, TINY_PLAN

SCRIPT = Path(__file__).parent / "retention" / "sharded_fit.py"


def _fit(out: Path, strategy: str) -> dict:
    result = run_script(SCRIPT, str(out), "--strategy", strategy)
    assert result.returncode == 0, result.stderr[-3000:]
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    fsdp2, ddp = tmp_path_factory.mktemp("fsdp2"), tmp_path_factory.mktemp("ddp")
    return SimpleNamespace(fsdp2=_fit(fsdp2, "fsdp2"), ddp=_fit(ddp, "ddp"), fsdp2_dir=fsdp2, ddp_dir=ddp)


@pytest.mark.slow
def test_each_process_keeps_half_of_the_parameters(runs):
    for rank in (0, 1):
        assert runs.fsdp2[rank]["local_numel"] * 2 == runs.fsdp2[rank]["numel"]
        assert runs.ddp[rank]["local_numel"] == runs.ddp[rank]["numel"]


@pytest.mark.slow
def test_fsdp2_trains_what_ddp_trains(runs):
    L.seed_everything(0)
    initial = dict(tiny_module(tiny_datamodule(batch_size=4)).named_parameters())
    for rank in (0, 1):
        trained, expected = runs.fsdp2[rank]["params"], runs.ddp[0]["params"]
        assert trained.keys() == expected.keys() == initial.keys()
        for name, value in trained.items():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        assert any(not torch.allclose(trained[n], initial[n]) for n in trained)  # training moved the weights
    for rank in (0, 1):  # each process's KL term on its own batch, to the reference of the last stage end
        assert runs.fsdp2[rank]["kl"] > 1e-4
        torch.testing.assert_close(runs.fsdp2[rank]["kl"], runs.ddp[rank]["kl"], rtol=1e-4, atol=0)
    merges = runs.fsdp2[0]["merges"]
    assert merges == runs.fsdp2[1]["merges"] == runs.ddp[0]["merges"]
    assert [m["alpha"] for m in merges] and all(m["alpha"] < 1 for m in merges)  # the merges changed the weights
    report = lambda run: json.loads((run / "report" / "metrics.json").read_text())  # noqa: E731
    assert report(runs.fsdp2_dir)["accuracy_matrix"] == report(runs.ddp_dir)["accuracy_matrix"]


@pytest.mark.slow
def test_the_export_holds_the_full_trained_weights(runs):
    exported = AutoModelForCausalLM.from_pretrained(runs.fsdp2_dir / "model")
    trained = {name.removeprefix("model."): value for name, value in runs.fsdp2[0]["params"].items()}
    state = exported.state_dict()
    for name, value in trained.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_lora_under_fsdp2_trains_only_the_adapters_and_ewc_keeps_their_shards(tmp_path):
    pretrained = save_tiny_pretrained(tmp_path / "pretrained", tiny_datamodule())
    out = tmp_path / "run"
    result = run_script(SCRIPT, str(out), "--strategy", "fsdp2", "--lora", str(pretrained))
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(out / "rank0.pt", weights_only=False)
    L.seed_everything(0)
    data = tiny_datamodule(batch_size=4, tokenizer_name_or_path=str(pretrained))
    initial = dict(tiny_module(data, **lora_model(pretrained)).named_parameters())
    adapters = state["trainable"]
    assert adapters and all(".lora_A." in name or ".lora_B." in name for name in adapters)
    assert state["params"].keys() == initial.keys()
    for name, value in state["params"].items():
        assert torch.equal(value, initial[name]) == (name not in adapters), name  # only the adapters moved
    assert [sorted(stage["fisher"]) for stage in state["retention"]["consolidated"]] == [adapters] * 2
    assert state["local_numel"] * 2 == state["numel"]
    exported = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()  # adapters merged into the weights
    base = AutoModelForCausalLM.from_pretrained(pretrained).state_dict()
    attention = "model.layers.0.self_attn"
    assert not torch.equal(exported[f"{attention}.q_proj.weight"], base[f"{attention}.q_proj.weight"])
    assert torch.equal(exported[f"{attention}.k_proj.weight"], base[f"{attention}.k_proj.weight"])


RECIPE_PLAN = (
    TINY_PLAN
    + """
    - class_path: hft_lightning.retention.Replay
      init_args: {memory_size: 8, ratio: 0.25}
    - class_path: hft_lightning.retention.WeightAveraging
      init_args: {alphas: [0.5, 1.0], probe_examples: 4}
"""
)


@pytest.mark.slow
def test_the_fsdp_config_fits_then_tests_its_sharded_checkpoint_from_the_command_line(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(RECIPE_PLAN)
    root = tmp_path / "run"
    common = ["--config", str(ROOT / "configs" / "fsdp.yaml"), "--config", str(plan), "--trainer.accelerator=cpu",
              f"--trainer.default_root_dir={root}", "--trainer.logger=false", *TINY_FLAGS]  # fmt: skip
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "hft_lightning", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    fit = run("fit", *common)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "All distributed processes registered. Starting with 2 processes" in fit.stdout + fit.stderr
    assert json.loads((root / "report" / "metrics.json").read_text())["stages"] == ["math", "unified"]
    assert AutoModelForCausalLM.from_pretrained(root / "model").config.num_hidden_layers == 1
    (checkpoint,) = root.rglob("*.ckpt")
    assert (checkpoint / ".metadata").is_file()  # a distributed checkpoint: a folder, one file of shards per process
    test = run("test", *common, f"--ckpt_path={checkpoint}")
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/math/score" in test.stdout


def test_fsdp1_and_deepspeed_are_refused_naming_fsdp2():
    trainer = SimpleNamespace(world_size=1, strategy=FSDPStrategy())  # a Trainer refuses FSDP without a GPU
    with pytest.raises(ConfigError, match=r"FSDPStrategy is not supported.*ModelParallelStrategy.*configs/fsdp.yaml"):
        check_trainer(trainer)


def test_a_model_without_decoder_layers_is_refused_naming_its_class():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=r"Sequential names no decoder layer class"):
        decoder_layers(model, model)


def test_decoder_layers_are_found_through_the_models_declared_classes():
    module = tiny_module(tiny_datamodule())
    layers = decoder_layers(module.model, module.causal_lm)
    assert layers == list(module.model.model.layers)


def test_fp16_is_refused_before_sharding():
    module = tiny_module(tiny_datamodule())
    with pytest.raises(ConfigError, match=r"trainer.precision=16-mixed .*use bf16-mixed"):
        shard_model(module.model, module.causal_lm, mesh=None, precision="16-mixed")
