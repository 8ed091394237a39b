"""Resuming in the middle of a stage after a consolidation equals the uninterrupted run, retention state included."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from hft_lightning import Curriculum
from hft_lightning.retention import AGEM, EWC, GEM, KLAnchor, OnlineEWC, Replay, WeightAveraging
from tests.helpers import make_trainer, tiny_module
from tests.retention.common import THREE_STAGES


def _assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a.keys() - {"seconds"}:  # wall-clock time (WeightAveraging's probes) differs from run to run
            _assert_same_state(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_state(x, y)
    else:
        assert a == b


def _fit(data, root, callbacks, ckpt_path=None, checkpoint=None):
    trainer = make_trainer(
        root, [Curriculum(THREE_STAGES), *callbacks, *([checkpoint] if checkpoint else [])],
        enable_checkpointing=checkpoint is not None,
    )  # fmt: skip
    module = tiny_module(data)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize(
    "make_callbacks",
    [
        lambda: [EWC(lam=1e4, fisher_samples=2)],
        lambda: [OnlineEWC(lam=1e4, fisher_samples=2)],
        lambda: [GEM(memory_size=4, ref_every=3)],
        lambda: [AGEM(memory_size=4, batch_size=2)],
        lambda: [AGEM(memory_size=4, batch_size=2, ref_every=4)],
        lambda: [Replay(memory_size=4), EWC(lam=1e4, fisher_samples=2)],
        lambda: [KLAnchor(beta=1.0, chunk_size=16)],
        lambda: [Replay(memory_size=4), KLAnchor(beta=1.0), EWC(lam=1e4, fisher_samples=2)],
        lambda: [Replay(memory_size=4, share=0.3)],
        lambda: [WeightAveraging(alphas=(0.25, 0.5), probe_examples=2)],
    ],
    ids=[
        "ewc",
        "online_ewc",
        "gem_ref_every_3",
        "agem",
        "agem_ref_every_4",
        "replay+ewc",
        "kl_anchor",
        "replay+kl+ewc",
        "replay_share",
        "wa_grid",
    ],
)
def test_resume_mid_stage_after_consolidation_equals_uninterrupted(tiny_data, tmp_path, make_callbacks):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    uninterrupted_callbacks = make_callbacks()
    uninterrupted = _fit(tiny_data, tmp_path / "a", uninterrupted_callbacks, checkpoint=checkpoint)
    ckpt = next((tmp_path / "ckpt").glob("*step=10.ckpt"))  # third stage, two consolidations behind
    resumed_callbacks = make_callbacks()
    resumed = _fit(tiny_data, tmp_path / "b", resumed_callbacks, ckpt_path=str(ckpt))
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    for a, b in zip(uninterrupted_callbacks, resumed_callbacks, strict=True):
        _assert_same_state(a.state_dict(), b.state_dict())
