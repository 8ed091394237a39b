"""Forgetting is plain without retention and clearly smaller with each method (seeded, ratios not thresholds)."""

import pytest
from lightning.pytorch.callbacks import Callback

from hft_lightning import Stage
from hft_lightning.retention import AGEM, EWC, GEM, OnlineEWC, Replay, WeightAveraging
from tests.helpers import tiny_datamodule
from tests.retention.common import fit

STAGES = [Stage("math", 60, {"math": 1.0}), Stage("code", 60, {"code": 1.0})]


class MathLoss(Callback):
    def __init__(self):
        self.after_stage: list[float] = []

    def on_validation_end(self, trainer, pl_module):
        self.after_stage.append(float(trainer.callback_metrics["val/math/loss"]))


def _math_loss_rise(tmp_path, callbacks) -> float:
    data = tiny_datamodule(abilities=["builtin:math", "builtin:code"], num_val=12, val_batch_size=12)
    recorder = MathLoss()
    fit(tmp_path, [*callbacks, recorder], data=data, stages=STAGES)
    after_math, after_code = recorder.after_stage
    return after_code - after_math


@pytest.fixture(scope="module")
def rise_without_retention(tmp_path_factory):
    return _math_loss_rise(tmp_path_factory.mktemp("none"), [])


# Measured on this problem (seed 0): no retention +0.92; EWC +0.24, online EWC +0.24, GEM +0.70, A-GEM +0.49,
# Replay -0.38, Replay+EWC +0.04, Replay+GEM -0.20. Measured later, when no retention rose +1.68: WeightAveraging
# (alpha 0.5, the code stage merged with its start) +0.50, Replay+WeightAveraging -0.17. The bounds leave room for
# platform noise and fail if a method stops acting.
@pytest.mark.parametrize(
    ("make_callbacks", "max_ratio"),
    [
        (lambda: [EWC(lam=1e5)], 0.5),
        (lambda: [OnlineEWC(lam=1e5)], 0.5),
        (lambda: [GEM(memory_size=16)], 0.85),
        (lambda: [AGEM(memory_size=16, batch_size=8)], 0.7),
        (lambda: [Replay(memory_size=32)], 0.0),
        (lambda: [Replay(memory_size=32), EWC(lam=1e5)], 0.5),
        (lambda: [Replay(memory_size=32), GEM(memory_size=16)], 0.5),
        (lambda: [WeightAveraging(alphas=(0.5,))], 0.5),
        (lambda: [Replay(memory_size=32), WeightAveraging(alphas=(0.5,))], 0.2),
    ],
    ids=["ewc", "online_ewc", "gem", "agem", "replay", "replay+ewc", "replay+gem", "wa", "replay+wa"],
)
def test_retention_reduces_forgetting(tmp_path, rise_without_retention, make_callbacks, max_ratio):
    assert rise_without_retention > 0.5  # the problem forgets plainly: math loss rises while code trains
    assert _math_loss_rise(tmp_path, make_callbacks()) < max_ratio * rise_without_retention
