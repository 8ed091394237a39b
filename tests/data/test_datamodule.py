import re

import pytest

from hft_lightning import StagedDataModule
from hft_lightning.errors import ConfigError


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vocab_size": 10}, r"data\.vocab_size must be >= 261"),
        ({"num_val": 0}, r"data\.num_val must be positive"),
        ({"batch_size": -1}, r"data\.batch_size must be positive"),
        ({"abilities": []}, r"data\.abilities is empty"),
        ({"abilities": ["builtin:math", "builtin:math"]}, "ability names must be unique"),
        ({"num_val": 5000}, r"data\.num_val=5000: ability 'math' could not draw"),
        ({"num_train": {"math": 0}}, r"data\.num_train\['math'\] must be positive, got 0"),
        ({"num_train": {"poetry": 5}}, r"data\.num_train names undeclared abilities \['poetry'\]; declared: \['math'"),
    ],
)
def test_bad_data_arguments_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        StagedDataModule(**{"num_train": 10, "num_val": 4, **overrides})


def test_num_train_can_size_each_ability_apart():
    data = StagedDataModule(num_train={"math": 7, "general": 30}, num_val=4)
    assert [len(a.train) for a in data.abilities] == [7, 4000, 30]  # code keeps the built-in default
    same = StagedDataModule(num_train=30, num_val=4)
    assert data.abilities[2].train == same.abilities[2].train  # a pool's examples do not depend on the others'


def test_validation_has_one_loader_per_ability_in_declaration_order(tiny_data):
    loaders = tiny_data.val_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [6, 6, 6]
    for loader, ability in zip(loaders, tiny_data.abilities, strict=True):
        assert next(iter(loader))["examples"] == list(ability.val)


def test_bad_max_length_names_the_field():
    with pytest.raises(ConfigError, match=r"data\.max_length must be positive, got 0"):
        StagedDataModule(num_train=10, num_val=4, max_length=0)


def test_a_pretrained_tokenizer_replaces_the_trained_one_and_bounds_the_length(tiny_pretrained):
    data = StagedDataModule(num_train=10, num_val=4, tokenizer_name_or_path=str(tiny_pretrained))
    assert data.tokenizer.name_or_path == str(tiny_pretrained) and data.tokenizer.eos_token == "<|im_end|>"
    assert data.max_length == 256  # the tokenizer's model_max_length
    assert StagedDataModule(num_train=10, num_val=4).max_length is None  # the trained tokenizer declares none


@pytest.mark.parametrize(("max_length", "untrained"), [(12, " (3 kept no response token)"), (64, "")])
def test_truncated_examples_are_counted_per_split_at_teardown(max_length, untrained):
    data = StagedDataModule(abilities=["builtin:math"], num_train=10, num_val=4, vocab_size=300, max_length=max_length)
    with pytest.warns(UserWarning, match=f"more than max_length={max_length}"):
        batch = data.collate([("math", 0), ("math", 2), ("math", 0)])  # both longer than 64 tokens
    assert batch["input_ids"].shape[1] == max_length
    expected = rf"max_length={max_length} tokens: data\.abilities\['math'\]\.train: 3 of 3{re.escape(untrained)}$"
    with pytest.warns(UserWarning, match=expected):
        data.teardown("fit")
