import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hft_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TINY_FLAGS = [
    "--model.hidden_size=32", "--model.num_layers=1", "--model.num_heads=2", "--model.intermediate_size=64",
    "--model.max_new_tokens=12", "--data.num_train=64", "--data.num_val=4", "--data.batch_size=4",
    "--data.val_batch_size=4", "--data.vocab_size=400",
]  # fmt: skip
TINY_PLAN = """
trainer:
  callbacks:
    - class_path: hft_lightning.Curriculum
      init_args:
        stages:
          - {name: math, steps: 2, mixture: {math: 1.0}}
          - {name: unified, steps: 2, mixture: {math: 1.0, code: 1.0, general: 1.0}}
    - class_path: hft_lightning.StageProgressBar
"""


def _config(cli) -> dict:
    """The parsed values, with containers normalised (a tuple default equals the YAML's list)."""
    config = cli.config.as_dict()
    config.pop("config", None)
    return json.loads(json.dumps(config, default=str))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses_and_starts_with_its_command(path, monkeypatch, tiny_pretrained):
    command = f"# python -m hft_lightning fit --config configs/{path.relative_to(ROOT / 'configs')}"
    assert path.read_text().startswith(command)
    monkeypatch.chdir(ROOT)  # the commands run from the repository root, where data paths are relative to
    # a config naming the user's own checkpoint gets the tiny saved one instead (no download, no local model)
    model = [f"--model.name_or_path={tiny_pretrained}"] if "name_or_path:" in path.read_text() else []
    cli = main(["--config", str(path), *model], run=False)
    assert cli.trainer is not None and cli.model is not None


def test_custom_data_config_trains_on_the_example_files(monkeypatch):
    monkeypatch.chdir(ROOT)
    data = main(["--config", str(ROOT / "configs" / "custom_data.yaml")], run=False).datamodule
    assert data.ability_names == ["chat", "words", "language"]
    chat, words, language = data.abilities
    assert any(len(e.history) > 1 for e in chat.train)  # multi-turn conversations, after a system prompt
    assert all(e.reference["answer"] in e.response for e in chat.val) and words.val[0].reference
    assert {e.history[0]["role"] for e in language.train} == {"system"}  # a system column or a first system turn
    assert all(e.reference["answer"] in e.response for e in language.val) and len(language.val) >= 4


def test_model_name_or_path_alone_names_the_model_and_its_tokenizer(tiny_pretrained):
    cli = main([f"--model.name_or_path={tiny_pretrained}", "--data.num_train=16", "--data.num_val=4"], run=False)
    assert (
        cli.datamodule.tokenizer.name_or_path == str(tiny_pretrained)
        and cli.model.tokenizer is cli.datamodule.tokenizer
    )
    assert type(cli.model.model).__name__ == "Qwen2ForCausalLM"
    with pytest.raises(SystemExit):  # the link owns the data side: it cannot be set apart from the model
        main([f"--model.name_or_path={tiny_pretrained}", "--data.tokenizer_name_or_path=other"], run=False)


def test_custom_config_sets_lora_precision_and_the_example_files(monkeypatch, tiny_pretrained):
    monkeypatch.chdir(ROOT)
    cli = main(
        ["--config", str(ROOT / "configs" / "custom.yaml"), f"--model.name_or_path={tiny_pretrained}"], run=False
    )
    assert cli.trainer.precision == "bf16-mixed" and list(cli.model.lora.target_modules) == ["q_proj", "v_proj"]
    assert cli.datamodule.ability_names == ["chat", "words"] and cli.datamodule.max_length == 512


@pytest.mark.slow
def test_custom_config_fine_tunes_a_saved_model_and_saves_it(tmp_path, tiny_pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path / "run"
    args = ["fit", "--config", str(ROOT / "configs" / "custom.yaml"), f"--model.name_or_path={tiny_pretrained}",
            f"--trainer.default_root_dir={root}"]  # fmt: skip
    fit = _run(args, ROOT, WANDB_MODE="disabled")
    assert fit.returncode == 0, fit.stderr[-3000:]
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    assert metrics["abilities"] == ["chat", "words"] and metrics["stages"] == ["chat", "words", "unified"]
    model = AutoModelForCausalLM.from_pretrained(root / "model")  # merged: a plain transformers model
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    assert type(model).__name__ == "Qwen2ForCausalLM" and tokenizer.chat_template is not None
    initial = AutoModelForCausalLM.from_pretrained(tiny_pretrained)
    assert not torch.equal(
        model.model.layers[0].self_attn.q_proj.weight, initial.model.layers[0].self_attn.q_proj.weight
    )


def test_default_config_is_the_embedded_default():
    from_file = main(["--config", str(ROOT / "configs" / "default.yaml")], run=False)
    assert _config(from_file) == _config(main([], run=False))


def test_print_config_documents_the_plan(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: hft_lightning.Curriculum" in printed
    assert "mixture:" in printed and "builtin:math" in printed


def _stages(*stages: str) -> str:
    lines = "\n".join(f"          - {s}" for s in stages) if stages else "          []"
    return f"""
trainer:
  callbacks:
    - class_path: hft_lightning.Curriculum
      init_args:
        stages:
{lines}
"""


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("data:\n  abilities: [builtin:math, builtin:poetry]\n", "unknown ability source 'builtin:poetry'; allowed"),
        ("data:\n  abilities: []\n", "data.abilities is empty"),
        (
            "data:\n  abilities: [builtin:math, {name: x, train: /nonexistent.jsonl, scorer: none}]\n",
            r"data\.abilities\['x'\]\.train: /nonexistent\.jsonl does not exist",
        ),
        (_stages(), "the stage plan is empty"),
        (_stages("{name: m, steps: 0, mixture: {math: 1.0}}"), r"stages\[0\] \('m'\).steps must be a positive"),
        (_stages("{name: m, steps: 5, mixture: {math: -1.0}}"), r"mixture\['math'\] must be a finite weight >= 0"),
        (_stages("{name: m, steps: 5, mixture: {math: 0.0}}"), "weights are all zero"),
        (_stages("{name: m, steps: 5, mixture: {poetry: 1.0}}"), r"undeclared abilities \['poetry'\]; declared"),
        ("model:\n  warmup_steps: -1\n", r"model\.warmup_steps and model\.weight_decay must be >= 0"),
        (
            TINY_PLAN + "    - class_path: hft_lightning.Report\n",
            r"trainer\.callbacks lists hft_lightning\.Report, which the command line adds itself",
        ),
    ],
)
def test_config_mistakes_exit_with_one_clear_line_before_training(tmp_path, capsys, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}", *TINY_FLAGS])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("hft_lightning: error: ")
    assert re.search(message, error), error
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "wandb").exists()


def _run(args, cwd, **env):
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "hft_lightning", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_fit_then_test_from_the_command_line_with_wandb_offline(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(TINY_PLAN)
    root = tmp_path / "run"
    common = [f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}", *TINY_FLAGS]
    fit = _run(["fit", "--config", str(plan), *common], tmp_path, WANDB_MODE="offline")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "Stage 2/2 unified" in fit.stdout + fit.stderr
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    assert metrics["stages"] == ["math", "unified"] and len(metrics["accuracy_matrix"]) == 2
    assert list((root / "wandb").glob("offline-run-*"))
    checkpoint = next(root.rglob("*.ckpt"))
    test = _run(["test", "--config", str(plan), *common, f"--ckpt_path={checkpoint}"], tmp_path, WANDB_MODE="disabled")
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/math/score" in test.stdout
    assert (root / "config.yaml").exists() and (root / "config_test.yaml").exists()


@pytest.mark.parametrize(
    ("flags", "save_dir"),
    [
        (["--trainer.default_root_dir={root}"], "{root}"),
        (["--trainer.default_root_dir={root}", "--trainer.logger.init_args.save_dir={root}/logs"], "{root}/logs"),
        (
            ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir={root}/c"],
            "{root}/c",
        ),
        ([], "runs/hft"),
    ],
)
def test_the_default_logger_writes_under_the_root_dir(flags, save_dir, tmp_path):
    cli = main([flag.format(root=tmp_path) for flag in flags] + ["--data.num_train=16", "--data.num_val=4"], run=False)
    assert str(cli.trainer.logger.save_dir) == save_dir.format(root=tmp_path)


def test_the_default_logger_is_wandb_offline_or_csv_without_wandb(monkeypatch):
    from hft_lightning import cli

    assert cli.default_logger()["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert cli.default_logger()["init_args"]["offline"] is True
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    assert cli.default_logger()["class_path"] == "lightning.pytorch.loggers.CSVLogger"


def test_plan_only_prints_and_saves_the_plan_without_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = ROOT / "configs" / "planners" / "affinity.yaml"
    main(["fit", "--config", str(config), "--plan_only=true", f"--trainer.default_root_dir={tmp_path}", *TINY_FLAGS])
    printed = capsys.readouterr().out
    assert "Curriculum plan (planner: Affinity; probe: 12 examples in" in printed  # data.num_val=4 of 32 asked
    assert re.search(r"2  \w+ +\w+ +300 +first of the chain", printed), printed
    plan = json.loads((tmp_path / "report" / "plan.json").read_text())
    assert [s["name"] for s in plan["stages"]][::4] == ["foundation", "unified"]
    assert plan["measurements"]["affinity"]["abilities"] == ["math", "code", "general"]
    assert (tmp_path / "report" / "affinity.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["affinity.png", "plan.json"]  # no training


def test_plan_only_is_refused_outside_fit(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--plan_only=true", f"--trainer.default_root_dir={tmp_path}", *TINY_FLAGS])
    assert exit_info.value.code == 2
    assert "--plan_only applies to fit only, not to validate" in capsys.readouterr().err


def test_plan_only_with_a_checkpoint_prints_the_plan_a_resumed_run_follows_and_writes_nothing(tmp_path, capsys):
    plan = """
trainer:
  callbacks:
    - class_path: hft_lightning.Curriculum
      init_args:
        stages: [{name: math, steps: 1, mixture: {math: 1.0}}, {name: code, steps: 1, mixture: {code: 1.0}}]
        planner: {class_path: hft_lightning.planners.Explicit, init_args: {reverse: %s}}
"""
    reversed_plan, configured_plan = tmp_path / "reversed.yaml", tmp_path / "configured.yaml"
    reversed_plan.write_text(plan % "true")
    configured_plan.write_text(plan % "false")
    root = tmp_path / "run"
    common = [f"--trainer.default_root_dir={root}", "--trainer.logger=false", *TINY_FLAGS]
    main(["fit", "--config", str(reversed_plan), *common])
    checkpoint = next(root.rglob("*.ckpt"))
    written = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"planner is Explicit\(reverse=False\) but .* by Explicit\(reverse=True\)"):
        main(["fit", "--config", str(configured_plan), "--plan_only=true", f"--ckpt_path={checkpoint}", *common])
    printed = capsys.readouterr().out
    assert re.search(r"1  code +code +1 +configured order, reversed\n2  math ", printed), printed
    assert f"The plan of {checkpoint}, which a resumed run follows; nothing was trained or written." in printed
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == written
    with pytest.raises(SystemExit):
        main(["fit", "--plan_only=true", f"--ckpt_path={tmp_path / 'missing.ckpt'}", *common])
    assert "hft_lightning: error: --ckpt_path: cannot read a checkpoint from" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--plan_only=true", "--ckpt_path=last", *common])
    assert "error: --ckpt_path=last with --plan_only: give the checkpoint file's path" in capsys.readouterr().err
