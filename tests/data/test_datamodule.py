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
    ],
)
def test_bad_data_arguments_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        StagedDataModule(**{"num_train": 10, "num_val": 4, **overrides})


def test_validation_has_one_loader_per_ability_in_declaration_order(tiny_data):
    loaders = tiny_data.val_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [6, 6, 6]
    for loader, ability in zip(loaders, tiny_data.abilities, strict=True):
        assert next(iter(loader))["examples"] == list(ability.val)
