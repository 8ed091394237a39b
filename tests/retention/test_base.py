"""The retention base: argument checks, state keyed by parameter name, state keys, refused strategies."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from hft_lightning import Curriculum
from hft_lightning.errors import ConfigError
from hft_lightning.retention import AGEM, EWC, GEM, OnlineEWC, Replay, RetentionCallback
from tests.helpers import make_trainer
from tests.retention.common import fit


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: EWC(lam=-1.0), "lam"),
        (lambda: EWC(lam=0.0), "lam"),
        (lambda: EWC(fisher_samples=0), "fisher_samples"),
        (lambda: OnlineEWC(gamma=0.0), "gamma"),
        (lambda: OnlineEWC(gamma=1.5), "gamma"),
        (lambda: GEM(memory_size=0), "memory_size"),
        (lambda: GEM(ref_every=0), "ref_every"),
        (lambda: AGEM(memory_size=0), "memory_size"),
        (lambda: AGEM(batch_size=-2), "batch_size"),
        (lambda: AGEM(ref_every=0), "ref_every"),
        (lambda: Replay(memory_size=0), "memory_size"),
        (lambda: Replay(ratio=1.0), "ratio"),
    ],
)
def test_bad_arguments_fail_in_init_naming_the_argument(make, argument):
    with pytest.raises(ConfigError, match=rf"\({argument}="):
        make()


def test_state_keys_separate_instances_with_different_arguments():
    assert EWC(lam=1.0).state_key != EWC(lam=2.0).state_key
    assert EWC(lam=1.0).state_key == EWC(lam=1.0).state_key
    assert GEM().state_key != AGEM().state_key


def test_state_is_keyed_by_name_and_checked_on_load(tmp_path):
    ewc = EWC(lam=10.0, fisher_samples=2)
    module, _ = fit(tmp_path, [ewc])
    params = RetentionCallback.trainable(module)
    shuffled = {name: params[name] for name in reversed(list(params))}
    restored = EWC(lam=10.0, fisher_samples=2)
    restored.load_state_dict(ewc.state_dict())
    for state in restored.consolidated:
        RetentionCallback.match_names("EWC fisher", state["fisher"], shuffled)  # order does not matter
    renamed = {("renamed." + n if i == 0 else n): p for i, (n, p) in enumerate(params.items())}
    with pytest.raises(ConfigError, match=r"missing \['renamed\.model.*unexpected \['model\."):
        RetentionCallback.match_names("EWC fisher", restored.consolidated[0]["fisher"], renamed)


def test_only_trainable_parameters_are_protected(tmp_path):
    from tests.helpers import tiny_datamodule, tiny_module

    module = tiny_module(tiny_datamodule())
    module.model.model.embed_tokens.weight.requires_grad_(False)
    names = RetentionCallback.trainable(module)
    assert "model.model.embed_tokens.weight" not in names
    assert len(names) == sum(1 for p in module.parameters() if p.requires_grad)


def test_sharded_strategies_are_refused_in_setup():
    trainer = SimpleNamespace(strategy=FSDPStrategy())  # a Trainer refuses FSDP without a GPU before we could
    with pytest.raises(ConfigError, match="FSDPStrategy"):
        EWC().setup(trainer, torch.nn.Module(), "fit")


def test_replay_must_come_after_the_curriculum(tmp_path):
    replay = Replay()
    trainer = make_trainer(tmp_path, [replay, Curriculum()])
    with pytest.raises(ConfigError, match="Curriculum before Replay"):
        replay.setup(trainer, torch.nn.Module(), "fit")
