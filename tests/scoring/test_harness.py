"""Abilities scored by lm-evaluation-harness tasks: small local task YAMLs, scored offline on the tiny model."""

import copy
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hft_lightning import Curriculum, Stage
from hft_lightning.callbacks import Report
from hft_lightning.data.source import AbilitySource
from hft_lightning.errors import ConfigError
from hft_lightning.lora import LoRA
from hft_lightning.module import HFTModule
from hft_lightning.scoring.harness import LMEvalTask, _group_metric_key
from tests.data.files import records, write_jsonl
from tests.helpers import make_trainer, run_script, tiny_datamodule, tiny_module

pytest.importorskip("lm_eval")

CHOICES = [str(n) for n in range(2, 11)]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: {choices}
doc_to_target: "{{{{choices.index(answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: brier_score
    aggregation: brier_score
    higher_is_better: false
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


GROUP = """group: {name}
task: [sums, doubles]
"""


@pytest.fixture(scope="session")
def tasks(tmp_path_factory):
    """A folder of local multiple-choice tasks and groups of them.

    Tasks: ``sums`` (20 documents), ``doubles`` (5) and ``lost`` (its data file is missing). Groups of ``sums`` and
    ``doubles``: ``arithmetic`` (accuracy averaged over their documents) and ``unscored`` (no aggregate).
    """
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    docs = [{"question": f"What is {a} + {b}?", "answer": str(a + b), "choices": CHOICES} for a in (1, 2, 3, 4, 5)
            for b in (1, 2, 3, 4)]  # fmt: skip
    write_jsonl(root / "sums.jsonl", docs)
    write_jsonl(root / "doubles.jsonl", [{**doc, "question": f"Twice {doc['question']}"} for doc in docs[::4]])
    for name in ("sums", "doubles"):
        (root / f"{name}.yaml").write_text(TASK.format(name=name, data=root / f"{name}.jsonl", choices=CHOICES))
    (root / "lost.yaml").write_text(TASK.format(name="lost", data=root / "missing.jsonl", choices=CHOICES))
    aggregate = "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
    (root / "arithmetic.yaml").write_text(GROUP.format(name="arithmetic") + aggregate)
    (root / "unscored.yaml").write_text(GROUP.format(name="unscored"))
    return root


def harness(tasks, task="sums", **fields) -> AbilitySource:
    return AbilitySource("sums", lm_eval=LMEvalTask(task, include_path=str(tasks), **fields))


def simple_evaluate(tasks, model, tokenizer, task="sums", **options) -> dict:
    """What lm-eval itself reports for ``model`` on ``task``, loaded afresh by its name."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)
    options = {"num_fewshot": None, "apply_chat_template": True, **options}
    return simple_evaluate(lm, tasks=[task], task_manager=manager, log_samples=False, **options)["results"][task]


def test_an_evaluated_only_ability_has_no_data_and_is_scored_by_its_task(tasks):
    data = tiny_datamodule(abilities=["builtin:math", harness(tasks, limit=8)])
    sums = data.abilities[1]
    assert len(sums.train) == len(sums.val) == 0 and sums.scorer is None and sums.scored
    assert data.evaluated_only == ["sums"] and data.val_ability_names == ["math"]
    assert len(data.val_dataloader()) == 1


def test_the_matrix_holds_what_simple_evaluate_reports_before_and_after_training(tasks, tmp_path):
    data = tiny_datamodule(abilities=["builtin:math", harness(tasks, limit=12)])
    module = tiny_module(data)
    before = copy.deepcopy(module.model)
    report = Report()
    trainer = make_trainer(tmp_path, [Curriculum([Stage("math", 3, {"math": 1.0})]), report])
    trainer.fit(module, datamodule=data)
    assert report.accuracy_matrix.abilities == ("math", "sums")
    expected = [simple_evaluate(tasks, m, data.tokenizer, limit=12)["acc,none"] for m in (before, module.model)]
    assert report.accuracy_matrix.matrix[:, 1].tolist() == pytest.approx(expected, abs=1e-6)
    assert trainer.callback_metrics["val/sums/score"].item() == pytest.approx(expected[1], abs=1e-6)


def test_a_group_is_scored_by_its_aggregate_as_simple_evaluate_reports_it(tasks, tmp_path):
    data = tiny_datamodule(abilities=["builtin:math", harness(tasks, task="arithmetic", limit=8)])
    module = tiny_module(data)
    before = copy.deepcopy(module.model)
    report = Report()
    trainer = make_trainer(tmp_path, [Curriculum([Stage("math", 3, {"math": 1.0})]), report])
    trainer.fit(module, datamodule=data)
    expected = [simple_evaluate(tasks, m, data.tokenizer, task="arithmetic", limit=8) for m in (before, module.model)]
    assert [e["sample_len"] for e in expected] == [13, 13]  # 8 sums and the 5 doubles
    scores = [e["acc,none"] for e in expected]
    assert report.accuracy_matrix.matrix[:, 1].tolist() == pytest.approx(scores, abs=1e-6)


def test_a_task_paired_with_training_files_scores_an_ability_they_train(tasks, tmp_path):
    path = str(write_jsonl(tmp_path / "sums.jsonl", records("prompt_response", 40)))
    paired = AbilitySource("sums", train=path, lm_eval=LMEvalTask("sums", include_path=str(tasks), limit=4))
    data = tiny_datamodule(abilities=["builtin:math", paired])
    assert len(data.abilities[1].train) and len(data.abilities[1].val) and data.evaluated_only == []
    report = Report()
    trainer = make_trainer(tmp_path, [Curriculum([Stage("sums", 2, {"sums": 1.0})]), report])
    trainer.fit(tiny_module(data), datamodule=data)
    assert {"val/sums/loss", "val/sums/score"} <= set(trainer.callback_metrics)
    assert report.accuracy_matrix.learned_at == (None, 0)
    assert not torch.isnan(report.accuracy_matrix.matrix[:, 1]).any()


def test_a_stage_cannot_train_an_ability_with_no_training_data(tasks, tmp_path):
    data = tiny_datamodule(abilities=["builtin:math", harness(tasks, limit=4)])
    trainer = make_trainer(tmp_path, [Curriculum([Stage("sums", 2, {"sums": 1.0})])])
    with pytest.raises(ConfigError, match=r"stages\[0\] \('sums'\)\.mixture names abilities \['sums'\] that have no"):
        trainer.fit(tiny_module(data), datamodule=data)


def test_the_harness_scores_the_lora_adapters_and_leaves_mode_and_random_state(tasks, tiny_pretrained):
    from peft.tuners.lora import LoraLayer

    data = tiny_datamodule(abilities=["builtin:math", harness(tasks, limit=12)], tokenizer_name_or_path=tiny_pretrained)
    module = HFTModule(data.tokenizer, name_or_path=str(tiny_pretrained), lora=LoRA(r=4))
    torch.manual_seed(1)
    for layer in module.model.modules():
        if isinstance(layer, LoraLayer):  # B starts at zero: make the adapters change the model
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=1.0)
    merged = copy.deepcopy(module.model).merge_and_unload()
    draws = []
    for evaluate in (False, True):
        torch.manual_seed(0)
        random.seed(0)
        score = data.abilities[1].evaluator(module.model, data.tokenizer) if evaluate else None
        draws.append((torch.rand(3).tolist(), random.random()))
    assert draws[0] == draws[1]
    assert module.model.training
    assert score == pytest.approx(simple_evaluate(tasks, merged, data.tokenizer, limit=12)["acc,none"], abs=1e-6)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lm_eval": None}, r"data\.abilities\['sums'\]: give train \(data files\) or lm_eval \(a harness task\)"),
        ({"scorer": "contains"}, r"\['sums'\]\.scorer: the lm_eval task scores this ability; remove scorer"),
        ({"val": "val.jsonl"}, r"\['sums'\]\.val needs train"),
        ({"lm_eval": None, "train": "t.jsonl"}, r"\['sums'\]\.scorer: missing; give one of exact_match, code_exec"),
    ],
)
def test_a_source_needs_data_or_a_task_and_one_scorer(tasks, fields, message):
    source = AbilitySource(**{"name": "sums", "lm_eval": LMEvalTask("sums", include_path=str(tasks)), **fields})
    with pytest.raises(ConfigError, match=message):
        tiny_datamodule(abilities=["builtin:math", source])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"metric": "acc_norm"},
            r"\['sums'\]\.lm_eval\.metric: task 'sums' reports no 'acc_norm'; it reports acc,none",
        ),
        ({"metric": "brier_score"}, r"\.lm_eval\.metric: 'brier_score,none' is lower-is-better"),
        ({"limit": 0}, r"\['sums'\]\.lm_eval\.limit must be >= 1, got 0"),
        ({"task": "lost"}, r"\['sums'\]\.lm_eval\.task: cannot load the data of task 'lost' \(HF_DATASETS_OFFLINE is"),
        ({"include_path": "/nonexistent"}, r"\['sums'\]\.lm_eval\.include_path: /nonexistent is not a folder"),
        (
            {"task": "unscored"},
            r"\.lm_eval\.metric: group 'unscored' reports no aggregate score \(its YAML has no aggregate_metric_list"
            r"\); name one of its tasks: sums, doubles$",
        ),
        (
            {"task": "arithmetic", "metric": "brier_score"},
            r"\.lm_eval\.metric: group 'arithmetic' reports no 'brier_score'; it reports acc,none$",
        ),
    ],
)
def test_bad_task_fields_are_named_before_training(tasks, fields, message):
    spec = {"task": "sums", "include_path": str(tasks), **fields}
    with pytest.raises(ConfigError, match=message):
        tiny_datamodule(abilities=["builtin:math", AbilitySource("sums", lm_eval=LMEvalTask(**spec))])


def _task(name, metrics, filters=()):
    """A stand-in for a loaded harness task: its metrics (name -> higher is better) and filter names."""
    config = SimpleNamespace(task=name, filter_list=[{"name": f} for f in filters] or None)
    return SimpleNamespace(task_name=name, config=config, higher_is_better=lambda: metrics)


def _group(tasks, *aggregates):
    aggregates = [SimpleNamespace(metric=m, filter_list=f) for m, f in aggregates]
    return SimpleNamespace(name="g", has_aggregation=bool(aggregates), aggregate_metric_list=aggregates,
                           get_all_tasks=lambda: tasks)  # fmt: skip


def test_a_group_aggregate_covers_the_filters_of_the_tasks_that_report_its_metric():
    tasks = [_task("cot", {"exact_match": True}, ["strict-match", "flexible"]), _task("plain", {"acc": True})]
    group = _group(tasks, ("acc", None), ("exact_match", None))
    assert _group_metric_key(None, group, "f") == "acc,none"
    assert _group_metric_key("exact_match", group, "f") == "exact_match,flexible"  # its own aggregate's first filter
    assert _group_metric_key("exact_match,strict-match", group, "f") == "exact_match,strict-match"
    with pytest.raises(ConfigError, match=r"^f: group 'g' reports no 'acc,flexible'; it reports acc,none, exact_m"):
        _group_metric_key("acc,flexible", group, "f")


def test_a_group_aggregate_no_task_reports_or_lower_is_better_is_refused():
    with pytest.raises(ConfigError, match=r"^f: none of group 'g'.s tasks reports its aggregate metrics \(bleu\)$"):
        _group_metric_key(None, _group([_task("plain", {"acc": True})], ("bleu", ["none"])), "f")
    with pytest.raises(ConfigError, match=r"^f: 'perplexity,none' is lower-is-better"):
        _group_metric_key(None, _group([_task("lm", {"perplexity": False})], ("perplexity", None)), "f")


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("gsm8kk", r"\.lm_eval\.task: unknown task 'gsm8kk' in lm-eval's tasks and .*; close matches: gsm8k"),
        ("ai2_arc", r"\.lm_eval\.task: 'ai2_arc' is a tag of tasks, which has no aggregate score; name a task or"),
    ],
)
def test_an_unknown_task_lists_close_matches_from_the_harness_index(tasks, task, message):
    with pytest.raises(ConfigError, match=message):
        tiny_datamodule(abilities=["builtin:math", harness(tasks, task=task)])


def test_without_lm_eval_a_harness_ability_names_the_extra(tasks, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    message = r"^data\.abilities\['sums'\]\.lm_eval: lm-evaluation-harness is not installed; pip install "
    message += r"'hft_lightning\[eval\]'$"
    with pytest.raises(ConfigError, match=message):
        tiny_datamodule(abilities=["builtin:math", harness(tasks)])


@pytest.mark.slow
def test_the_lm_eval_config_fits_from_the_command_line(tmp_path, monkeypatch):
    import json

    from hft_lightning.cli import main
    from tests.test_cli import ROOT, TINY_FLAGS

    monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository root
    config = (ROOT / "configs" / "lm_eval.yaml").read_text().replace("steps: 300", "steps: 2")
    (tmp_path / "lm_eval.yaml").write_text(config.replace("limit: 50", "limit: 6"))
    args = ["fit", "--config", str(tmp_path / "lm_eval.yaml"), f"--trainer.default_root_dir={tmp_path}"]
    main([*args, *TINY_FLAGS, "--trainer.logger=false"])
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["abilities"] == ["math", "general", "word_problems"]
    scores = [metrics["before"][2], *(row[2] for row in metrics["accuracy_matrix"])]
    assert all(0.0 <= score <= 1.0 for score in scores) and "word_problems" in metrics["forgetting"]


def _ddp_fit(out, tasks, *args) -> subprocess.CompletedProcess:
    return run_script(Path(__file__).with_name("harness_ddp_fit.py"), str(out), str(tasks), *args)


@pytest.mark.slow
def test_under_ddp_every_process_holds_the_score_rank_zero_measured(tasks, tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    for out, devices in [(ddp, "2"), (single, "1")]:
        result = _ddp_fit(out, tasks, "--devices", devices)
        assert result.returncode == 0, result.stderr[-3000:]
    matrices = [torch.load(path, weights_only=True)["matrix"] for path in (ddp / "rank0.pt", ddp / "rank1.pt")]
    expected = torch.load(single / "rank0.pt", weights_only=True)["matrix"]
    assert expected[:, 1].gt(0).all()  # the harness scored the ability before and after the stage
    for matrix in matrices:
        torch.testing.assert_close(matrix, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_harness_failure_on_rank_zero_stops_every_process_instead_of_hanging(tasks, tmp_path):
    result = _ddp_fit(tmp_path, tasks, "--devices", "2", "--fail")
    assert result.returncode != 0
    message = "data.abilities['sums'].lm_eval failed on global rank 0: OSError('the harness failed on purpose')"
    assert result.stderr.count(message) >= 2, result.stderr[-3000:]  # raised on both processes
