import json

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from hft_lightning import Curriculum, HFTModule, Report, Stage
from hft_lightning.errors import ConfigError
from hft_lightning.module import CHECKPOINT_FORMAT
from hft_lightning.planners import Decision, Planner, Prerequisites
from tests.helpers import make_trainer, tiny_module

STAGES = [
    Stage("math", 3, {"math": 1.0}),
    Stage("code", 3, {"code": 1.0}),
    Stage("unified", 2, {"math": 1.0, "code": 1.0, "general": 1.0}),
]


class Recorder(Callback):
    """Records the stage hooks (stage name, index in the plan, step) and the prompts each stage trains on."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.events = []
        self.prompts = {}

    def on_stage_start(self, trainer, pl_module, stage, index):
        self.events.append(("start", stage.name, index, trainer.global_step))

    def on_stage_end(self, trainer, pl_module, stage, index):
        self.events.append(("end", stage.name, index, trainer.global_step))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        stage = Curriculum.of(trainer).current_stage.name
        texts = self.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        self.prompts.setdefault(stage, []).extend(texts)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], "stage plan is empty"),
        ([Stage("a", 0, {"math": 1.0})], r"stages\[0\] \('a'\).steps must be a positive"),
        ([Stage("a", 1, {})], r"stages\[0\] \('a'\).mixture is empty"),
        ([Stage("a", 1, {"math": -1.0})], r"mixture\['math'\] must be a finite weight >= 0"),
        ([Stage("a", 1, {"math": 0.0, "code": 0.0})], "weights are all zero"),
        ([Stage("a", 1, {"math": 1.0}), Stage("a", 1, {"code": 1.0})], "names must be unique"),
    ],
)
def test_bad_plans_are_rejected_naming_the_field(stages, message):
    with pytest.raises(ConfigError, match=message):
        Curriculum(stages)


def test_undeclared_ability_is_rejected_before_training(tiny_data, tmp_path):
    curriculum = Curriculum([Stage("poetry", 1, {"poetry": 1.0})])
    trainer = make_trainer(tmp_path, [curriculum])
    with pytest.raises(ConfigError, match=r"undeclared abilities \['poetry'\].*\['math', 'code', 'general'\]"):
        trainer.fit(tiny_module(tiny_data), datamodule=tiny_data)
    assert trainer.global_step == 0


class OldStageHooks(Callback):
    def on_stage_start(self, trainer, pl_module, stage):
        pass


def test_a_stage_hook_without_the_index_is_refused_before_training(tiny_data, tmp_path):
    trainer = make_trainer(tmp_path, [Curriculum(STAGES), OldStageHooks()])
    message = (
        r"OldStageHooks\.on_stage_start\(trainer, pl_module, stage\) cannot be called as "
        r"on_stage_start\(trainer, pl_module, stage, index\)"
    )
    with pytest.raises(ConfigError, match=message):
        trainer.fit(tiny_module(tiny_data), datamodule=tiny_data)
    assert trainer.global_step == 0


def test_a_curriculum_is_required(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"exactly one hft_lightning\.Curriculum"):
        make_trainer(tmp_path, []).fit(tiny_module(tiny_data), datamodule=tiny_data)


def test_stages_switch_data_and_announce_boundaries(tiny_data, tmp_path):
    recorder = Recorder(tiny_data.tokenizer)
    trainer = make_trainer(tmp_path, [Curriculum(STAGES), recorder])
    trainer.fit(tiny_module(tiny_data), datamodule=tiny_data)
    assert trainer.global_step == 8
    assert recorder.events == [
        ("start", "math", 0, 0), ("end", "math", 0, 3),
        ("start", "code", 1, 3), ("end", "code", 1, 6),
        ("start", "unified", 2, 6), ("end", "unified", 2, 8),
    ]  # fmt: skip
    assert all("How many" in text for text in recorder.prompts["math"])
    assert all("Write a Python function" in text for text in recorder.prompts["code"])
    assert len(recorder.prompts["unified"]) == 2 * tiny_data.batch_size

    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["abilities"] == ["math", "code", "general"]
    assert report["stages"] == ["math", "code", "unified"]
    assert len(report["before"]) == 3
    assert [len(row) for row in report["accuracy_matrix"]] == [3, 3, 3]
    assert all(0 <= v <= 1 for row in report["accuracy_matrix"] for v in row)
    assert set(report["forgetting"]) == {"math", "code", "general"}
    for name in ("summary.md", "accuracy_matrix.png", "ability_curves.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def _fit(data, root, ckpt_path=None, checkpoint=None):
    recorder = Recorder(data.tokenizer)
    callbacks = [Curriculum(STAGES), recorder] + ([checkpoint] if checkpoint else [])
    trainer = make_trainer(root, callbacks, enable_checkpointing=checkpoint is not None)
    module = tiny_module(data)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer, recorder


# mid-stage; on the last batch of a stage (before its validation); mid next stage; the very last batch
@pytest.mark.parametrize(("resume_step", "events_left"), [(2, 5), (3, 5), (4, 3), (8, 1)])
def test_resume_equals_uninterrupted(tiny_data, tmp_path, resume_step, events_left):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    uninterrupted, _, full = _fit(tiny_data, tmp_path / "a", checkpoint=checkpoint)
    ckpt = next((tmp_path / "ckpt").glob(f"*step={resume_step}.ckpt"))
    resumed, trainer, rest = _fit(tiny_data, tmp_path / "b", ckpt_path=str(ckpt))
    assert trainer.global_step == 8
    assert rest.events == full.events[-events_left:]  # every boundary announced exactly once overall
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, equal_nan=True, msg=name)
    assert json.loads((tmp_path / "a" / "report" / "metrics.json").read_text()) == json.loads(
        (tmp_path / "b" / "report" / "metrics.json").read_text()
    )


def test_resuming_with_another_plan_is_an_error():
    curriculum = Curriculum(STAGES)
    with pytest.raises(ConfigError, match="differ from the checkpoint's plan"):
        curriculum.load_state_dict({**Curriculum(STAGES[:2]).state_dict()})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_steps": 5}, r"trainer\.max_steps=5 conflicts"),
        ({"limit_train_batches": 2}, r"trainer\.limit_train_batches=2 would cut stages short"),
        ({"limit_val_batches": 0}, "needs an evaluation after every stage"),
        ({"check_val_every_n_epoch": 2}, "needs an evaluation after every stage"),
    ],
)
def test_trainer_settings_that_break_the_plan_are_refused(tiny_data, tmp_path, overrides, message):
    trainer = make_trainer(tmp_path, [Curriculum(STAGES)], **overrides)
    with pytest.raises(ConfigError, match=message):
        trainer.fit(tiny_module(tiny_data), datamodule=tiny_data)
    assert trainer.global_step == 0


class ConfigOrderReversed(Planner):
    """A measuring planner with a known answer: the configured order reversed; counts its probe calls."""

    measures = True

    def __init__(self):
        super().__init__()
        self.calls = 0

    def order(self, abilities, probe):
        self.calls += 1
        losses = {a: probe.loss(a, examples=2, batch_size=2) for a in abilities}
        return Decision(abilities[::-1], {a: f"loss {loss:.3f}" for a, loss in losses.items()}, {"difficulty": losses})


UNEQUAL = [
    Stage("warmup", 2, {"math": 1.0, "general": 1.0}),
    Stage("math", 1, {"math": 1.0}),
    Stage("code", 3, {"code": 1.0}),
]


def test_a_measured_plan_is_decided_at_fit_start_and_everything_follows_it(tiny_data, tmp_path):
    curriculum = Curriculum(UNEQUAL, planner=ConfigOrderReversed())
    assert not curriculum.planned
    recorder, report = Recorder(tiny_data.tokenizer), Report()
    trainer = make_trainer(tmp_path, [curriculum, recorder, report])
    module = tiny_module(tiny_data)
    trainer.fit(module, datamodule=tiny_data)
    assert [s.name for s in curriculum.plan.stages] == ["warmup", "code", "math"] and curriculum.planner.calls == 1
    # the indices are the stages' places in the planned order, not in the configured one
    assert [e for e in recorder.events if e[0] == "start"] == [("start", "warmup", 0, 0), ("start", "code", 1, 2),
                                                                ("start", "math", 2, 5)]  # fmt: skip
    assert all("Write a Python function" in text for text in recorder.prompts["code"])
    assert trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0].starts == [0, 2, 5, 6]  # the planned lengths
    assert report.accuracy_matrix.learned_at == (0, 1, 0)  # math and general in warmup, code in the planned stage 1

    plan = json.loads((tmp_path / "report" / "plan.json").read_text())
    assert plan["planner"] == "ConfigOrderReversed" and plan["configured_order"] == ["warmup", "math", "code"]
    assert [s["name"] for s in plan["stages"]] == ["warmup", "code", "math"]
    assert plan["probe"]["examples"] == 4 and plan["probe"]["seconds"] >= 0
    assert set(plan["measurements"]["difficulty"]) == {"math", "code"}  # the single-ability stages only
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["stages"] == ["warmup", "code", "math"]
    assert metrics["plan"][1]["why"] == plan["stages"][1]["why"]
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "**ConfigOrderReversed** planner (probe: 4 examples" in summary and "| code | code 1 | 3 | loss" in summary


def test_a_resumed_run_keeps_the_checkpoints_plan_without_measuring_again(tiny_data, tmp_path):
    def fit(root, ckpt_path=None, checkpoint=None):
        curriculum = Curriculum(UNEQUAL, planner=ConfigOrderReversed())
        trainer = make_trainer(root, [curriculum, *([checkpoint] if checkpoint else [])],
                               enable_checkpointing=checkpoint is not None)  # fmt: skip
        module = tiny_module(tiny_data)
        trainer.fit(module, datamodule=tiny_data, ckpt_path=ckpt_path)
        return module, curriculum

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    uninterrupted, planned = fit(tmp_path / "a", checkpoint=checkpoint)
    resumed, restored = fit(tmp_path / "b", ckpt_path=str(next((tmp_path / "ckpt").glob("*step=3.ckpt"))))
    assert restored.planner.calls == 0 and restored.planned
    assert restored.plan == planned.plan
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize(
    ("configured", "warning"),
    [
        (None, r"is Explicit\(reverse=False\) but the checkpoint's plan was decided by "
               r"Prerequisites\(prerequisites=\{'math': \['code'\]\}\); the run continues with the checkpoint's plan"),
        (Prerequisites({}), r"is Prerequisites\(prerequisites=\{\}\) but .* decided by Prerequisites\(prerequisites="),
        (Prerequisites({"math": ["code"]}), None),
    ],
    ids=["another-planner", "other-settings", "same"],
)  # fmt: skip
def test_a_restored_plan_wins_over_another_planner_or_settings_in_the_config(configured, warning):
    import warnings

    stages = [Stage("math", 1, {"math": 1.0}), Stage("code", 1, {"code": 1.0})]
    saved = Curriculum(stages, planner=Prerequisites({"math": ["code"]})).state_dict()
    curriculum = Curriculum(stages, planner=configured)
    with pytest.warns(UserWarning, match=warning) if warning else warnings.catch_warnings(action="error"):
        curriculum.load_state_dict(saved)
    assert [s.name for s in curriculum.plan.stages] == ["code", "math"]
    assert curriculum.plan.planner == "Prerequisites" and curriculum.plan.why[1] == "builds on code"
    assert curriculum.plan.settings == {"prerequisites": {"math": ["code"]}}


def test_each_plan_owns_its_settings():
    stages = [Stage("math", 1, {"math": 1.0}), Stage("code", 1, {"code": 1.0})]
    curriculum = Curriculum(stages, planner=Prerequisites({"math": ["code"]}))
    curriculum.plan.settings["prerequisites"]["math"].append("general")
    assert curriculum.planner.settings() == {"prerequisites": {"math": ["code"]}}
    curriculum.load_state_dict(Curriculum(stages, planner=Prerequisites({"math": ["code"]})).state_dict())
    assert curriculum.plan.settings == {"prerequisites": {"math": ["code"]}}


def test_a_checkpoint_in_another_state_format_is_refused_before_any_state_is_restored(tiny_data, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    _fit(tiny_data, tmp_path / "a", checkpoint=checkpoint)
    path = next((tmp_path / "ckpt").glob("*step=2.ckpt"))
    state = torch.load(path, weights_only=True)
    assert state["hft_lightning_format"] == CHECKPOINT_FORMAT
    del state["hft_lightning_format"]  # as written before formats were numbered
    torch.save(state, tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match=r"ckpt_path: the checkpoint holds hft_lightning state in format None"):
        _fit(tiny_data, tmp_path / "b", ckpt_path=str(tmp_path / "old.ckpt"))
    loaded = HFTModule.load_from_checkpoint(tmp_path / "old.ckpt", tokenizer=tiny_data.tokenizer)  # weights load
    torch.testing.assert_close(loaded.state_dict(), {k: v for k, v in state["state_dict"].items() if "matrix" not in k})


def test_any_planner_records_its_json_arguments_and_its_plan_saves(tmp_path):
    from pathlib import Path

    from hft_lightning.planners import Decision, Planner

    class FromTable(Planner):
        def __init__(self, table: Path, weight: float):
            super().__init__({"code": ["math"]})
            self.table, self.weight, self._cache = table, weight, {}

        def order(self, abilities, probe):
            return Decision(list(abilities), dict.fromkeys(abilities, "from the table"))

    planner = FromTable(tmp_path / "table.csv", 0.5)
    assert planner.settings() == {"prerequisites": {"code": ["math"]}, "weight": 0.5}  # the path is no JSON value
    curriculum = Curriculum([Stage("math", 1, {"math": 1.0}), Stage("code", 1, {"code": 1.0})], planner)
    plan = json.loads(curriculum.save_plan(tmp_path).read_text())
    assert plan["planner"] == "FromTable" and plan["settings"] == planner.settings()
