"""WeightAveraging: each stage after the first ends at (1 - alpha) * start + alpha * end, before its validation."""

import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoModelForCausalLM

from hft_lightning import Curriculum, Stage
from hft_lightning.callbacks import Report
from hft_lightning.errors import ConfigError
from hft_lightning.lora import LoRA
from hft_lightning.plan import Plan
from hft_lightning.probe import Probe
from hft_lightning.retention import EWC, WeightAveraging, trainable
from tests.retention.common import fit
from tests.test_export import fit_tiny


def _weights(pl_module):
    return {name: p.detach().clone() for name, p in trainable(pl_module).items()}


class Snapshots(Callback):
    """Trainable weights (by stage) at the stage's first batch, after its last step and at its validation.

    Listed before WeightAveraging, so ``end`` is taken before the merge.
    """

    def __init__(self):
        self.start, self.end, self.validated = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.start[trainer.current_epoch] = _weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == Curriculum.of(trainer).plan.steps_before(trainer.current_epoch + 1):
            self.end[trainer.current_epoch] = _weights(pl_module)

    def on_validation_start(self, trainer, pl_module):
        self.validated[trainer.current_epoch] = _weights(pl_module)


def _merged(start, end, alpha):
    return {name: start[name] * (1 - alpha) + end[name] * alpha for name in start}


def _assert_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for name in actual:
        assert torch.equal(actual[name], expected[name]), name


def _scores(module, data, weights):
    """The validation scores of the fitted ``module`` with its trainable parameters set to ``weights``."""
    with torch.no_grad():
        for name, p in trainable(module).items():
            p.copy_(weights[name])
    module.eval()
    for index, loader in enumerate(data.val_dataloader()):
        for batch in loader:
            module.score_batch(batch, index)
    return module.compute_scores()


@pytest.mark.parametrize(("alpha", "strength", "effective"), [(0.5, 1.0, 0.5), (0.5, 2.0, 0.25)])
def test_the_stage_validates_and_consolidates_the_merged_weights(tmp_path, tiny_data, alpha, strength, effective):
    snapshots, averaging, ewc, report = Snapshots(), WeightAveraging(alphas=(alpha,)), EWC(fisher_samples=2), Report()
    averaging.strengthen(strength)
    module, _ = fit(tmp_path, [snapshots, averaging, ewc, report], data=tiny_data)
    _assert_equal(snapshots.validated[0], snapshots.end[0])  # the first stage is not merged
    for stage in (1, 2):
        merged = _merged(snapshots.start[stage], snapshots.end[stage], effective)
        _assert_equal(snapshots.validated[stage], merged)
        assert not all(torch.equal(merged[name], snapshots.end[stage][name]) for name in merged) or effective == 1
    _assert_equal(ewc.consolidated[1]["anchor"], snapshots.validated[1])  # consolidation sees the merged weights
    _assert_equal(snapshots.start[2], snapshots.validated[1])  # the next stage starts from them
    for stage in range(3):  # the accuracy-matrix row is the merged model's score
        expected = _scores(module, tiny_data, snapshots.validated[stage])
        torch.testing.assert_close(report.accuracy_matrix.matrix[stage + 1], expected, rtol=0, atol=0)
    assert [(m["stage"], m["alpha"], m["scores"]) for m in averaging.merges] == [
        ("code", effective, None),
        ("general", effective, None),
    ]
    assert averaging.start is None  # nothing is kept once the last stage is merged


def test_alpha_one_is_exactly_no_averaging(tmp_path, tiny_data):
    plain, _ = fit(tmp_path / "plain", [], data=tiny_data)
    averaged, _ = fit(tmp_path / "averaged", [WeightAveraging(alphas=(1.0,))], data=tiny_data)
    _assert_equal(_weights(averaged), _weights(plain))


# Mean probe score per alpha (over the abilities trained so far): 0.5 and 0.75 tie at the top in both merges.
SCORES = {"math": [0.2, 0.8, 0.6, 0.4], "code": [0.0, 0.2, 0.4, 0.4], "general": [0.1, 0.5, 0.5, 0.1]}


def test_the_grid_picks_the_best_mean_score_ties_to_the_largest_alpha(tmp_path, tiny_data, monkeypatch):
    grid = (0.25, 0.5, 0.75, 1.0)
    snapshots, averaging = Snapshots(), WeightAveraging(alphas=grid, probe_examples=3)
    calls = []

    def score(probe, ability, examples, batch_size):
        calls.append((ability, examples, _weights(probe.module)))
        stage_calls = [c for c in calls if c[0] == ability]
        return SCORES[ability][(len(stage_calls) - 1) % len(grid)]

    monkeypatch.setattr(Probe, "score", score)
    logger = CSVLogger(tmp_path, name="logs")
    fit(tmp_path, [snapshots, averaging], data=tiny_data, logger=logger)
    # every alpha in grid order, each on the abilities trained so far: math and code at stage 1, all three at stage 2
    expected_calls = [(a, 3) for _ in grid for a in ("math", "code")] + [(a, 3) for _ in grid for a in SCORES]
    assert [(ability, examples) for ability, examples, _ in calls] == expected_calls
    for (_, _, weights), alpha in zip(calls[:8:2], grid, strict=True):
        _assert_equal(weights, _merged(snapshots.start[1], snapshots.end[1], alpha) if alpha < 1 else snapshots.end[1])
    assert [m["scores"] for m in averaging.merges] == [
        pytest.approx([0.1, 0.5, 0.5, 0.4]),
        pytest.approx([0.1, 0.5, 0.5, 0.3]),
    ]
    assert [m["alpha"] for m in averaging.merges] == [0.75, 0.75]
    for stage in (1, 2):
        _assert_equal(snapshots.validated[stage], _merged(snapshots.start[stage], snapshots.end[stage], 0.75))
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())["weight_averaging"]
    assert [(m["stage"], m["abilities"], m["alpha"]) for m in metrics["merges"]] == [
        ("code", ["math", "code"], 0.75),
        ("general", ["math", "code", "general"], 0.75),
    ]
    assert "## Weight averaging" in (tmp_path / "report" / "summary.md").read_text()
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "retention/weight_averaging/alpha" in logged and "retention/weight_averaging/score/alpha=0.25" in logged


def test_under_lora_the_adapters_are_averaged_and_nothing_else(tmp_path, tiny_pretrained):
    snapshots = Snapshots()
    lora = LoRA(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    module, _ = fit_tiny(tmp_path, tiny_pretrained, [snapshots, WeightAveraging(alphas=(0.5,))], lora=lora)
    adapters = {n for n, _ in module.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert set(snapshots.validated[1]) == adapters and len(adapters) == 4
    _assert_equal(snapshots.validated[1], _merged(snapshots.start[1], snapshots.end[1], 0.5))
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_pretrained).named_parameters())
    base = dict(module.model.get_base_model().named_parameters())
    frozen = {n.replace(".base_layer", ""): p for n, p in base.items() if ".lora_" not in n}
    assert frozen.keys() == initial.keys()
    for name, weight in frozen.items():  # every weight outside the adapters is the pretrained one
        assert torch.equal(weight, initial[name]), name


class SaveBeforeMerge(Callback):
    """Saves a checkpoint at ``step`` from ``on_train_batch_end``, listed before WeightAveraging (before its merge)."""

    def __init__(self, path, step):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("step", [6, 8])
def test_resume_equals_uninterrupted_mid_stage_and_between_the_last_step_and_the_merge(tmp_path, tiny_data, step):
    """Step 6: mid stage 1, its start snapshot in the checkpoint. Step 8: stage 1's last step, not merged yet."""
    checkpoint = tmp_path / "before_merge.ckpt"
    saver, report = SaveBeforeMerge(checkpoint, step), Report()
    uninterrupted, _ = fit(tmp_path / "a", [saver, WeightAveraging(alphas=(0.5,)), report], data=tiny_data)
    resumed_averaging, resumed_report = WeightAveraging(alphas=(0.5,)), Report()
    resumed, _ = fit(tmp_path / "b", [resumed_averaging, resumed_report], data=tiny_data, ckpt_path=str(checkpoint))
    _assert_equal(_weights(resumed), _weights(uninterrupted))
    assert [(m["stage"], m["alpha"]) for m in resumed_averaging.merges] == [("code", 0.5), ("general", 0.5)]
    torch.testing.assert_close(resumed_report.accuracy_matrix.matrix, report.accuracy_matrix.matrix, equal_nan=True)


def test_bad_probe_setup_is_refused_at_train_start(tiny_data):
    averaging = WeightAveraging(alphas=(0.5, 1.0))
    averaging.set_plan(
        Plan((Stage("a", 1, {"a": 1.0}), Stage("b", 1, {"b": 1.0})), ("", ""), "Explicit", {}, ("a", "b"))
    )
    unscored = SimpleNamespace(
        abilities=[SimpleNamespace(name="a", scorer=None), SimpleNamespace(name="b", scorer=None)]
    )
    with pytest.raises(ConfigError, match=r"no ability trained up to stage 1 \('b'\) has a scorer; give one alpha"):
        averaging.on_train_start(SimpleNamespace(datamodule=unscored, global_step=0), None)
