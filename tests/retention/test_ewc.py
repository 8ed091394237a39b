"""EWC and online EWC: the Fisher is the per-example empirical Fisher, the gradient edit is exactly the penalty's."""

import torch
from lightning.pytorch.callbacks import Callback

from hft_lightning.retention import EWC, OnlineEWC
from hft_lightning.retention.memory import ExampleMemory
from tests.retention.common import GradientProbe, fit


def _direct_fisher(trainer, pl_module, stage_index, samples):
    """1/N sum_n g_n^2 with one autograd call per example, independent of the retention code."""
    memory = ExampleMemory(samples)
    memory.observe_stage(trainer.datamodule, stage_index)
    items = memory.all_items()
    params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for item in items:
        with torch.enable_grad():
            loss = pl_module.sft_loss(trainer.datamodule.collate([item]))
        for fisher_n, g in zip(fisher.values(), torch.autograd.grad(loss, list(params.values())), strict=True):
            fisher_n += g.double() ** 2 / len(items)
    return fisher


class FisherOracle(Callback):
    def __init__(self, samples):
        self.samples = samples
        self.fishers = []

    def on_stage_end(self, trainer, pl_module, stage, index):
        self.fishers.append(_direct_fisher(trainer, pl_module, trainer.current_epoch, self.samples))


def _check_gradient_edit(before, after, lam, pairs, logged_penalty):
    """At the last step g' - g = lam * sum F (theta - theta*), and the logged penalty is lam/2 sum F (theta - theta*)^2.

    The edit is compared to 1e-7 absolute (g is stored in fp32), so it must be far larger than that to mean anything.
    """
    theta = before.weights[-1]
    penalty, largest = 0.0, 0.0
    for name, g in before.steps[-1].items():
        step = lam * sum(f[name].double() * (theta[name].double() - anchor[name].double()) for f, anchor in pairs)
        torch.testing.assert_close(after.steps[-1][name].double() - g.double(), step, rtol=1e-4, atol=1e-7)
        largest = max(largest, step.abs().max().item())
        penalty += sum(
            (f[name].double() * (theta[name].double() - anchor[name].double()) ** 2).sum() for f, anchor in pairs
        )
    torch.testing.assert_close(float(logged_penalty), lam / 2 * float(penalty), rtol=1e-4, atol=1e-12)
    assert largest > 1e-4


def test_ewc_fisher_anchors_and_gradient_edit(tmp_path):
    ewc = EWC(lam=1e4, fisher_samples=3)
    before, oracle, after = GradientProbe(), FisherOracle(3), GradientProbe()
    _, trainer = fit(tmp_path, [before, ewc, oracle, after])
    assert [s["stage"] for s in ewc.consolidated] == [0, 1]  # nothing after the last stage
    for state, fisher, step in zip(ewc.consolidated, oracle.fishers, (3, 7), strict=False):
        for name, f in fisher.items():
            torch.testing.assert_close(state["fisher"][name].double(), f, rtol=1e-4, atol=1e-12)
        # anchors: the weights at the stage end, i.e. after that stage's last optimizer step
        for name, w in before.weights[step + 1].items():
            torch.testing.assert_close(state["anchor"][name], w)
    pairs = [(s["fisher"], s["anchor"]) for s in ewc.consolidated]
    _check_gradient_edit(before, after, 1e4, pairs, trainer.callback_metrics["retention/ewc_penalty"])


def test_online_ewc_decays_one_running_fisher(tmp_path):
    online = OnlineEWC(lam=1e4, gamma=0.5, fisher_samples=3)
    before, oracle, after = GradientProbe(), FisherOracle(3), GradientProbe()
    _, trainer = fit(tmp_path, [before, online, oracle, after])
    first, second = oracle.fishers[:2]
    for name, f in online.fisher.items():
        torch.testing.assert_close(f.double(), 0.5 * first[name] + second[name], rtol=1e-4, atol=1e-12)
    for name, w in before.weights[8].items():  # anchors: the end of the second stage
        torch.testing.assert_close(online.anchor[name], w)
    _check_gradient_edit(
        before, after, 1e4, [(online.fisher, online.anchor)], trainer.callback_metrics["retention/ewc_penalty"]
    )
