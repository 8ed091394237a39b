"""Replay: remembered examples of finished abilities replace the tail of every later batch."""

import torch
from lightning.pytorch.callbacks import Callback

from hft_lightning import Stage
from hft_lightning.retention import Replay
from tests.retention.common import fit


class BatchRecorder(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, {k: v.clone() for k, v in batch.items()}))


def _responses(tokenizer, batch):
    return [tokenizer.decode(labels[labels != -100]) for labels in batch["labels"]]


def test_replay_mixes_remembered_examples_into_later_batches(tmp_path, tiny_data):
    replay, recorder = Replay(memory_size=6, ratio=0.5), BatchRecorder()
    fit(tmp_path, [replay, recorder], data=tiny_data)
    remembered = {a: {tiny_data.abilities[[x.name for x in tiny_data.abilities].index(a)].train[i].response
                      for _, i in replay.memory.items(a)} for a in replay.memory.abilities}  # fmt: skip
    assert set(remembered) == {"math", "code"} and all(len(r) <= 6 for r in remembered.values())
    for stage, batch in recorder.batches:
        responses = [r.removesuffix("<|end|>").strip() for r in _responses(tiny_data.tokenizer, batch)]
        assert len(responses) == tiny_data.batch_size  # the batch keeps its size
        tail = responses[tiny_data.batch_size // 2 :]
        if stage > 0:  # nothing is remembered before the first stage ends
            learned = set().union(*(remembered[a] for a in ["math", "code"][:stage]))
            assert all(r in learned for r in tail), (stage, tail)
    last_stage = [batch for stage, batch in recorder.batches if stage == 2]
    replayed = {r for b in last_stage for r in _responses(tiny_data.tokenizer, b)[2:]}
    assert len(replayed) > 1  # draws vary from batch to batch


def test_replayed_rows_are_padded_like_the_collator_pads(tmp_path, tiny_data):
    recorder = BatchRecorder()
    fit(tmp_path, [Replay(memory_size=6, ratio=0.5), recorder], data=tiny_data)
    for _, batch in recorder.batches:
        padding = batch["attention_mask"] == 0
        assert (batch["labels"][padding] == -100).all()
        assert (batch["input_ids"][padding] == tiny_data.tokenizer.pad_token_id).all()
        lengths = batch["attention_mask"].sum(1, keepdim=True)
        positions = torch.arange(batch["attention_mask"].shape[1])
        assert torch.equal(batch["attention_mask"].bool(), positions < lengths)  # right padding, no holes


SHARE_STAGES = [Stage("math", 2, {"math": 1.0}), Stage("code", 8, {"code": 1.0})]


def _replayed_rows(data, stage_index, batches):
    """Per batch of the stage, the rows replaced by Replay: a suffix of the batch, counted against the sampler's."""
    items = list(data.stage_stream(stage_index))
    counts = []
    for b, batch in enumerate(batches):
        size = len(batch["input_ids"])
        own = _responses(data.tokenizer, data.collate(items[b * size : (b + 1) * size]))
        replaced = [got != mine for got, mine in zip(_responses(data.tokenizer, batch), own, strict=True)]
        counts.append(sum(replaced))
        assert replaced == sorted(replaced), replaced  # the replayed rows are the last ones
    return counts


def test_a_share_of_the_stage_is_replayed_spread_evenly_and_deterministically(tmp_path, tiny_data):
    runs = []
    for run in ("a", "b"):
        recorder = BatchRecorder()
        fit(tmp_path / run, [Replay(memory_size=6, share=0.15), recorder], data=tiny_data, stages=SHARE_STAGES)
        runs.append([batch for stage, batch in recorder.batches if stage == 1])
    # round(0.15 * 8 batches * 4 rows) = 5 rows; batch b replaces floor((b + 1) * 5 / 8) - floor(b * 5 / 8)
    assert _replayed_rows(tiny_data, 1, runs[0]) == [0, 1, 0, 1, 1, 0, 1, 1]
    for a, b in zip(*runs, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_the_share_follows_the_strength_up_to_max_ratio():
    replay = Replay(share=0.15)
    rows = lambda: [replay._rows_from_share(8, 4, b) for b in range(8)]  # noqa: E731
    assert sum(rows()) == 5
    replay.strengthen(2.0)
    assert sum(rows()) == round(0.3 * 32) == 10 and max(rows()) - min(rows()) <= 1
    replay.strengthen(100.0)
    assert rows() == [3] * 8  # MAX_RATIO 0.75: a quarter of every batch stays the stage's own
