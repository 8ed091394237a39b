"""Packing: fewer rows, every example intact and alone, the same loss and gradients as the padded batch."""

import random

import pytest
import torch

from hft_lightning import HFTModule
from hft_lightning.data.packing import first_fit_decreasing, pack_batch
from hft_lightning.data.sft import IGNORE_INDEX
from hft_lightning.errors import ConfigError
from hft_lightning.lora import LoRA
from tests.helpers import TINY_MODEL, tiny_datamodule


def mixed_batch(data, size=12):
    """A right-padded training batch with examples of every ability (lengths differ most across abilities)."""
    return data.collate([(name, i) for i in range(size // 3) for name in data.ability_names])


def test_first_fit_decreasing_places_longest_first_in_the_first_bin_with_room():
    assert first_fit_decreasing([5, 3, 2, 4], 5) == [[0], [3], [1, 2]]
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(200)]
    bins = first_fit_decreasing(lengths, 40)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 40 for b in bins)
    assert len(bins) < 200 and len(bins) >= sum(lengths) / 40


def test_every_example_is_one_contiguous_run_with_its_own_positions(tiny_data):
    batch = mixed_batch(tiny_data)
    packed = pack_batch(batch, pad_token_id=tiny_data.tokenizer.pad_token_id, row_length=128)
    rows, width = packed["input_ids"].shape
    assert width <= 128 and rows <= len(batch["input_ids"]) / 2
    starts = [(r, c) for r in range(rows) for c in range(width) if packed["position_ids"][r, c] == 0]
    found = 0
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        n = int(mask.sum())
        expected_labels = labels[:n].clone()
        expected_labels[0] = IGNORE_INDEX
        for r, c in starts:
            if c + n <= width and torch.equal(packed["input_ids"][r, c : c + n], ids[:n]):
                assert torch.equal(packed["position_ids"][r, c : c + n], torch.arange(n))
                assert torch.equal(packed["labels"][r, c : c + n], expected_labels)
                found += 1
                break
    assert found == len(batch["input_ids"])
    trained = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert (packed["labels"] != IGNORE_INDEX).sum() == trained  # the same targets, no more, no fewer


def _loss_and_grads(module, batch):
    module.zero_grad()
    loss = module.sft_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def _assert_packing_changes_nothing(module, batch):
    module.packing = None
    padded_loss, padded_grads = _loss_and_grads(module, batch)
    module.packing = 128
    packed_loss, packed_grads = _loss_and_grads(module, batch)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_loss_and_gradients_equal_the_padded_batch(tiny_data):
    torch.manual_seed(0)
    module = HFTModule(tiny_data.tokenizer, **TINY_MODEL)
    _assert_packing_changes_nothing(module, mixed_batch(tiny_data))


def test_attention_does_not_cross_examples(tiny_data):
    """The oracle above can fail: the same packed rows with positions that do not restart give other logits."""
    torch.manual_seed(0)
    module = HFTModule(tiny_data.tokenizer, **TINY_MODEL)
    packed = pack_batch(mixed_batch(tiny_data), tiny_data.tokenizer.pad_token_id, row_length=128)
    isolated = module.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False)
    leaking = module.model(input_ids=packed["input_ids"], use_cache=False)
    assert (isolated.logits - leaking.logits).abs().max() > 0.1


def test_a_longer_example_keeps_a_row_of_its_own_and_rows_are_trimmed():
    batch = {
        "input_ids": torch.arange(1, 19).reshape(3, 6),
        "attention_mask": torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 3 + [0] * 3]),
        "labels": torch.arange(1, 19).reshape(3, 6),
    }
    packed = pack_batch(batch, pad_token_id=0, row_length=4)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [13, 14, 15, 7, 8, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert packed["labels"].tolist() == [[-100, 2, 3, 4, 5, 6], [-100, 14, 15, -100, 8, -100]]
    assert pack_batch(batch, pad_token_id=0, row_length=100)["input_ids"].shape == (1, 11)


def test_packing_must_be_positive(tiny_data):
    with pytest.raises(ConfigError, match=r"model\.packing must be a positive number of tokens per row"):
        HFTModule(tiny_data.tokenizer, packing=0)


def test_packing_a_pretrained_model_with_lora(tiny_pretrained):
    data = tiny_datamodule(tokenizer_name_or_path=str(tiny_pretrained))
    torch.manual_seed(0)
    module = HFTModule(data.tokenizer, name_or_path=str(tiny_pretrained), lora=LoRA(r=4, alpha=8.0))
    for layer in module.model.get_base_model().model.layers:  # B starts at 0: make the adapters matter
        torch.nn.init.normal_(layer.self_attn.q_proj.lora_B.default.weight, std=0.1)
    _assert_packing_changes_nothing(module, mixed_batch(data))
