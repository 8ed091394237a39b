"""A small staged problem for the retention tests: tiny model, built-in abilities, a quiet CPU trainer."""

from collections.abc import Callable
from typing import ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from hft_lightning import Curriculum, Stage
from tests.helpers import make_trainer, tiny_datamodule, tiny_module

THREE_STAGES = [
    Stage("math", 4, {"math": 1.0}),
    Stage("code", 4, {"code": 1.0}),
    Stage("general", 4, {"general": 1.0}),
]


class ScriptedProbe:
    """Stands in for :class:`hft_lightning.probe.Probe`: scores from ``script(global_step, ability)``.

    Installed as ``hft_lightning.retention.forgetting_budget.Probe``, so a ForgettingBudget's drops are where a test
    puts them.
    """

    script: ClassVar[Callable[[int, str], float]]
    calls: ClassVar[list[tuple[int, str]]] = []

    def __init__(self, module, datamodule, context=None):
        self.module = module

    def score(self, ability, examples, batch_size):
        step = self.module.trainer.global_step
        type(self).calls.append((step, ability))
        return type(self).script(step, ability)


class GradientProbe(Callback):
    """Records the gradients and weights (by name) at each optimizer step, where it sits in the callback list."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        self.steps.append({n: p.grad.detach().clone() for n, p in named})
        self.weights.append({n: p.detach().clone() for n, p in named})


def fit(
    root, callbacks, data=None, stages=THREE_STAGES, planner=None, module_overrides=None, ckpt_path=None, **overrides
):
    """Fits the tiny model through ``stages`` with ``callbacks`` after the curriculum; returns module, trainer.

    ``overrides`` are the trainer's (:func:`tests.helpers.make_trainer`).
    """
    L.seed_everything(0)
    data = data or tiny_datamodule()
    module = tiny_module(data, **(module_overrides or {}))
    trainer = make_trainer(root, [Curriculum(stages, planner), *callbacks], **overrides)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer
