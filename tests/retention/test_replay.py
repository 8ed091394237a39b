"""Replay: remembered examples of finished abilities replace the tail of every later batch."""

import torch
from lightning.pytorch.callbacks import Callback

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
