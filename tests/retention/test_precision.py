"""Retention under bf16 mixed precision: the model computes in bf16, retention state stays fp32 and accurate."""

import torch
from lightning.pytorch.callbacks import Callback

from hft_lightning.retention import EWC, GEM
from tests.retention.common import fit
from tests.retention.test_ewc import FisherOracle


class ForwardDtype(Callback):
    """Records the dtype of the LM head's output in the training steps."""

    def __init__(self):
        self.dtypes = set()
        self.in_step = False

    def on_fit_start(self, trainer, pl_module):
        pl_module.model.lm_head.register_forward_hook(self._record)

    def _record(self, module, args, output):
        if self.in_step:
            self.dtypes.add(output.dtype)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.in_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.in_step = False


def test_bf16_mixed_trains_in_bf16_and_keeps_fp32_retention_state(tmp_path):
    ewc, gem, oracle, forward = EWC(lam=100.0, fisher_samples=3), GEM(memory_size=2), FisherOracle(3), ForwardDtype()
    module, trainer = fit(tmp_path, [forward, ewc, gem, oracle], precision="bf16-mixed")
    assert forward.dtypes == {torch.bfloat16}  # the model ran under autocast
    assert trainer.global_step == 12 and all(p.dtype == torch.float32 for p in module.parameters())
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert [s["stage"] for s in ewc.consolidated] == [0, 1] and set(gem.references.refs) == {"math", "code"}
    for state, exact in zip(ewc.consolidated, oracle.fishers[:2], strict=True):
        for key in ("fisher", "anchor"):
            assert all(t.dtype == torch.float32 for t in state[key].values())
        # the Fisher from bf16 forward passes is close to the fp32 one computed on the same weights
        fisher = torch.cat([state["fisher"][name].flatten().double() for name in exact])
        reference = torch.cat([f.flatten() for f in exact.values()])
        assert (fisher - reference).norm() < 0.1 * reference.norm()
    assert all(t.dtype == torch.float32 for ref in gem.references.refs.values() for t in ref.values())
