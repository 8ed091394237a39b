"""Each method's strength knob, which ``strengthen(factor)`` multiplies (a ForgettingBudget's lever).

EWC and online EWC act with ``lam * strength_scale``; Replay with ``ratio * strength_scale``, capped at ``MAX_RATIO``.
GEM and A-GEM have no knob.
"""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from hft_lightning.retention import EWC, OnlineEWC, Replay
from hft_lightning.retention.replay import MAX_RATIO
from tests.retention.common import fit


@pytest.mark.parametrize("method", [EWC, OnlineEWC])
def test_ewc_acts_with_lam_times_the_strength_scale(method):
    generator = torch.Generator().manual_seed(0)
    weights, anchor, fisher = (torch.randn(7, generator=generator) for _ in range(3))
    edits = []
    for lam, factor in [(6.0, None), (2.0, 3.0)]:
        callback = method(lam=lam)
        if factor:
            callback.strengthen(factor)
        state = {"fisher": {"w": fisher.abs()}, "anchor": {"w": anchor}}
        if method is EWC:
            callback.consolidated = [{"stage": 0, **state}]
        else:
            callback.fisher, callback.anchor = state["fisher"], state["anchor"]
        w = torch.nn.Parameter(weights.clone())
        w.grad = torch.zeros(7)
        callback.edit_gradients(None, SimpleNamespace(log=lambda *args, **kwargs: None), {"w": w})
        edits.append(w.grad)
    torch.testing.assert_close(edits[1], edits[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(edits[0], 6.0 * fisher.abs() * (weights - anchor), rtol=1e-5, atol=1e-6)


class RememberedRows(Callback):
    """Counts, in each batch of the last stage (general), the rows whose response Replay remembered."""

    def __init__(self, replay, data):
        self.replay, self.data, self.counts = replay, data, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 2:
            memory = self.replay.memory
            remembered = {_response(self.data.collate([item])["labels"][0])
                          for ability in memory.abilities for item in memory.items(ability)}  # fmt: skip
            self.counts.append(sum(_response(labels) in remembered for labels in batch["labels"]))


def _response(labels):
    return tuple(labels[labels != -100].tolist())


@pytest.mark.parametrize(("scale", "rows"), [(2.0, 2), (10.0, round(MAX_RATIO * 4))])
def test_replay_acts_with_ratio_times_the_strength_scale_capped(tmp_path, tiny_data, scale, rows):
    replay = Replay(memory_size=6, ratio=0.25)
    replay.strengthen(scale)
    counter = RememberedRows(replay, tiny_data)
    fit(tmp_path, [replay, counter], data=tiny_data)
    assert counter.counts == [rows] * 4  # batches of 4 rows
