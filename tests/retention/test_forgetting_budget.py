"""ForgettingBudget: every trained ability probed during training, and each policy acting on a constructed drop.

The policies are driven by a scripted probe (scores as a function of the step and the ability), so every drop is
where the test puts it; one test makes a real drop on two file abilities with the real probe.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from hft_lightning import Stage
from hft_lightning.errors import ConfigError
from hft_lightning.retention import EWC, ForgettingBudget, Replay, forgetting_budget
from tests.retention.common import ScriptedProbe, fit

DROP = 6
"""The step (in the second stage, code) at which math falls in the scripted scores."""


def scripted(step: int, ability: str) -> float:
    """0.8 for math, except 0.5 at step ``DROP``; code and general score step / 100."""
    if ability == "math":
        return 0.5 if step == DROP else 0.8
    return step / 100


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setattr(forgetting_budget, "Probe", ScriptedProbe)
    monkeypatch.setattr(ScriptedProbe, "calls", [])
    monkeypatch.setattr(ScriptedProbe, "script", staticmethod(scripted), raising=False)
    return ScriptedProbe


class Recorder(Callback):
    """After each step (listed after the budget: after its check), the weights and the optimizer's state."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, optimizer = trainer.global_step, trainer.optimizers[0]
        named = list(pl_module.named_parameters())
        self.weights[step] = {n: p.detach().clone() for n, p in named}
        self.optimizer[step] = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in named}


def assert_equal(a, b):
    """Bit for bit, nested dicts of tensors."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_equal(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


# --- arguments ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"tau": -0.1}, r"ForgettingBudget\(tau=-0.1\): tau must be a finite number >= 0"),
        ({"policy": "x"}, r"ForgettingBudget\(policy='x'\): policy must be one of warn, strengthen, rollback, stop$"),
        ({"factor": 1.0}, r"ForgettingBudget\(factor=1.0\): factor must be > 1"),
        ({"probe_examples": 0}, r"ForgettingBudget\(probe_examples=0\): probe_examples must be > 0"),
        ({"every_n_steps": 0}, r"ForgettingBudget\(every_n_steps=0\): every_n_steps must be > 0"),
        ({"batch_size": -1}, r"ForgettingBudget\(batch_size=-1\): batch_size must be > 0"),
    ],
)
def test_bad_arguments_fail_in_init_naming_the_argument_and_the_allowed_values(arguments, message):
    with pytest.raises(ConfigError, match=message):
        ForgettingBudget(**arguments)


def test_strengthening_without_a_retention_callback_fails_before_training(tmp_path, tiny_data, probe):
    with pytest.raises(ConfigError, match=r"policy='strengthen'\) strengthens the retention callbacks.*has none"):
        fit(tmp_path, [ForgettingBudget(policy="strengthen")], data=tiny_data)
    assert probe.calls == []


# --- what it watches and reports -----------------------------------------------------------------------------------


def test_every_trained_ability_is_probed_at_every_check_and_reported(tmp_path, tiny_data, probe):
    budget = ForgettingBudget(every_n_steps=3)
    fit(tmp_path, [budget], data=tiny_data)
    # stages of 4 steps: every 3 steps and at each stage's end; an ability from the stage that first trains it on
    assert budget.steps == [3, 4, 7, 8, 11, 12]
    expected = {"math": [0.8] * 6, "code": [None, None, 0.07, 0.08, 0.11, 0.12], "general": [None] * 4 + [0.11, 0.12]}
    assert budget.scores == expected
    assert [step for step, _ in probe.calls] == [3, 4, 7, 7, 8, 8, 11, 11, 11, 12, 12, 12]
    # the best counts from the end of the stage that first trained the ability: code's 0.07 at step 7 is not one
    assert budget.best == {"math": 0.8, "code": 0.12, "general": 0.12}
    live = json.loads((tmp_path / "report" / "metrics.json").read_text())["live"]
    assert (live["steps"], live["scores"], live["events"]) == ([3, 4, 7, 8, 11, 12], expected, [])
    assert (tmp_path / "report" / "live_scores.png").stat().st_size > 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "## Forgetting budget" in summary and "![Live probe scores](live_scores.png)" in summary
    assert "No ability fell more than tau = 0.05 below its best." in summary


def test_by_default_a_stage_is_checked_about_five_times_ending_at_its_last_step(tmp_path, tiny_data, probe):
    budget = ForgettingBudget()
    fit(tmp_path, [budget], data=tiny_data, stages=[Stage("math", 12, {"math": 1.0}), Stage("code", 4, {"code": 1.0})])
    assert budget.steps == [3, 6, 9, 12, 13, 14, 15, 16]  # ceil(12 / 5) = 3; ceil(4 / 5) = 1


# --- the policies -----------------------------------------------------------------------------------------------


def test_warn_reports_the_event_and_changes_nothing(tmp_path, tiny_data, probe):
    budget = ForgettingBudget(policy="warn")
    with pytest.warns(UserWarning, match=r"at step 6 \(code\) math scored 0.500, more than tau=0.05 below its best 0"):
        watched, _ = fit(tmp_path / "a", [budget], data=tiny_data)
    assert budget.events == [{"step": 6, "stage": "code", "action": "warn", "ability": "math", "best": 0.8, "now": 0.5}]
    plain, _ = fit(tmp_path / "b", [], data=tiny_data)
    assert_equal(watched.state_dict(), plain.state_dict())  # probing does not change training
    report = tmp_path / "a" / "report"
    assert json.loads((report / "metrics.json").read_text())["live"]["events"] == budget.events
    assert "| 6 | code | math | 0.800 | 0.500 | warned |" in (report / "summary.md").read_text()


def test_strengthen_multiplies_every_retention_callbacks_scale_at_each_event(tmp_path, tiny_data, probe):
    probe.script = staticmethod(lambda step, ability: 0.5 if ability == "math" and step in (6, 10) else 0.8)
    ewc, replay = EWC(lam=10.0, fisher_samples=2), Replay(memory_size=4)
    budget = ForgettingBudget(policy="strengthen", factor=3.0)
    with pytest.warns(UserWarning, match="strengthened retention"):
        fit(tmp_path, [replay, ewc, budget], data=tiny_data)
    assert [(e["step"], e["scale"]) for e in budget.events] == [(6, 3.0), (10, 9.0)]
    assert ewc.strength_scale == replay.strength_scale == budget.scale == 9.0
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["live"]["strength_scale"] == 9.0


def test_rollback_restores_the_weights_and_optimizer_state_of_the_last_good_check(tmp_path, tiny_data, probe):
    ewc, recorder = EWC(lam=10.0, fisher_samples=2), Recorder()
    budget = ForgettingBudget(policy="rollback")
    _, trainer = fit(tmp_path, [ewc, budget, recorder], data=tiny_data)
    [event] = budget.events
    assert (event["step"], event["restored_step"], event["scale"]) == (DROP, DROP - 1, 2.0)
    assert ewc.strength_scale == 2.0
    # after the check at step 6, the weights and AdamW's moments and step count are those of step 5, bit for bit
    assert_equal(recorder.weights[DROP], recorder.weights[DROP - 1])
    assert_equal(recorder.optimizer[DROP], recorder.optimizer[DROP - 1])
    assert not torch.equal(*(next(iter(recorder.weights[step].values())) for step in (DROP + 1, DROP)))
    assert trainer.global_step == 12  # the steps taken count: the plan keeps its length
    assert budget.good["step"] == 12


def test_stop_skips_the_rest_of_the_stage_and_the_next_stages_train(tmp_path, tiny_data, probe):
    code = {step: 0.3 if step <= DROP else 0.28 for step in range(13)}
    probe.script = staticmethod(lambda step, ability: code[step] if ability == "code" else scripted(step, ability))
    recorder = Recorder()
    budget = ForgettingBudget(policy="stop")
    _, trainer = fit(tmp_path, [budget, recorder], data=tiny_data)
    assert [(e["step"], e["action"]) for e in budget.events] == [(DROP, "stop")]
    for step in (DROP + 1, DROP + 2):  # the code stage's remaining steps change nothing, AdamW's state included
        assert_equal(recorder.weights[step], recorder.weights[DROP])
        assert_equal(recorder.optimizer[step], recorder.optimizer[DROP])
    assert not torch.equal(*(next(iter(recorder.weights[step].values())) for step in (9, 8)))
    assert trainer.global_step == 12 and budget.stopped == 1
    assert budget.steps == [1, 2, 3, 4, 5, 6, 9, 10, 11, 12]  # a stopped stage is not probed again
    assert budget.best["code"] == 0.3  # the check that stopped the code stage stands for its end
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert all(score is not None for score in metrics["accuracy_matrix"][2])  # the stage after it is evaluated
    assert metrics["live"]["events"][0]["action"] == "stop"
    assert "stopped the stage" in (tmp_path / "report" / "summary.md").read_text()


# --- resume -------------------------------------------------------------------------------------------------------


def _budget_state(budget):
    state = budget.state_dict()
    state.pop("seconds")  # wall-clock time
    return state


@pytest.mark.parametrize(
    "policy",
    [pytest.param("strengthen", marks=pytest.mark.slow), "rollback", pytest.param("stop", marks=pytest.mark.slow)],
)
def test_a_run_resumed_after_an_event_equals_the_uninterrupted_run(tmp_path, tiny_data, probe, policy):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    runs = {}
    for name, ckpt_path in [("a", None), ("b", str(tmp_path / "ckpt" / f"epoch=1-step={DROP + 1}.ckpt"))]:
        ewc, budget = EWC(lam=10.0, fisher_samples=2), ForgettingBudget(policy=policy)
        module, _ = fit(
            tmp_path / name, [ewc, budget, *([checkpoint] if name == "a" else [])], data=tiny_data,
            ckpt_path=ckpt_path, enable_checkpointing=name == "a",
        )  # fmt: skip
        runs[name] = module, ewc, budget
    (a, ewc_a, budget_a), (b, ewc_b, budget_b) = runs["a"], runs["b"]
    assert len(budget_a.events) == 1 and ewc_b.strength_scale == ewc_a.strength_scale
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)
    state_a, state_b = _budget_state(budget_a), _budget_state(budget_b)
    good_a, good_b = state_a.pop("good"), state_b.pop("good")
    assert state_a == state_b
    assert (good_a is None) == (good_b is None)
    if good_a is not None:
        for name in good_a["params"]:
            torch.testing.assert_close(good_a["params"][name], good_b["params"][name], atol=1e-6, rtol=0)


# --- restoring the optimizer's state ------------------------------------------------------------------------------


def _adamw_after_steps(model, optimizer, steps, trained):
    for _ in range(steps):
        for name, p in model.named_parameters():
            p.grad = torch.ones_like(p) if name in trained else None
        optimizer.step()


def test_a_rollback_drops_optimizer_state_the_good_check_did_not_have():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    trainer = SimpleNamespace(optimizers=[optimizer])
    budget = ForgettingBudget(policy="rollback")
    _adamw_after_steps(model, optimizer, 2, trained={"weight"})  # the bias has no gradient yet: no AdamW state
    assert optimizer.state[model.bias] == {}  # read once: the state's defaultdict now holds an empty entry
    good = budget._state(trainer, model, 2, {})
    assert not good["optimizer"].get("bias") and good["optimizer"]["weight"]
    weight = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    _adamw_after_steps(model, optimizer, 3, trained={"weight", "bias"})
    optimizer.state[model.weight]["extra"] = torch.zeros(1)  # a key the good check did not have
    budget._restore(trainer, model, good)
    assert model.bias not in optimizer.state  # as at the good check, so its next step starts AdamW afresh
    assert optimizer.state[model.weight].keys() == weight.keys()
    for key, value in weight.items():
        assert torch.equal(optimizer.state[model.weight][key], value), key


def test_a_rollback_refuses_to_restore_a_tensor_the_optimizer_no_longer_holds():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    trainer = SimpleNamespace(optimizers=[optimizer])
    budget = ForgettingBudget(policy="rollback")
    _adamw_after_steps(model, optimizer, 1, trained={"weight", "bias"})
    good = budget._state(trainer, model, 1, {})
    del optimizer.state[model.bias]["exp_avg"]
    with pytest.raises(RuntimeError, match=r"no longer holds 'exp_avg' of bias"):
        budget._restore(trainer, model, good)
