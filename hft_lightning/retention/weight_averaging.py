"""Weight averaging of each stage's end with its start (WiSE-FT, Wortsman et al. 2022, "Robust fine-tuning").

When stage ``i`` (every stage after the first) has taken its last optimizer step, its trainable parameters are set to

    theta = (1 - alpha) * theta_start + alpha * theta_end

``theta_start`` being the weights when the stage began (an fp32 snapshot) and ``theta_end`` the weights it ended
with. ``alpha = 1`` keeps the stage's weights, smaller values pull them back toward what the earlier stages left. The
mixing weight is fixed (a grid of one) or chosen from a grid, as the one whose weights score best on average, under a
:class:`~hft_lightning.probe.Probe` of held-out examples, over the abilities trained so far (ties: the largest
alpha). The first stage is not merged: its start is the model before the curriculum, which holds no ability a stage
learned, so averaging with it could only undo the first ability; the last stage is merged, since the final model's
forgetting happens there too.

When, relative to the rest of the run: Lightning runs the end-of-epoch validation after the epoch's last
``on_train_batch_end`` and before ``on_train_epoch_end``, where the curriculum announces the stage end to the other
retention methods. The merge therefore runs in ``on_train_batch_end`` of the stage's last optimizer step, so the
stage's validation (its row of the accuracy matrix) and every other method's consolidation (EWC's anchors and
Fisher, GEM's references) see the merged weights. ``ModelCheckpoint`` runs after every other callback (Lightning
moves it last), so a checkpoint of that step holds them too; a checkpoint taken between the step and the merge is
caught up in ``on_train_start`` of the resumed run, before the report measures the row Lightning skips there.

What it keeps: one fp32 copy of the trainable parameters during every stage after the first (1x params), and one more
while a grid is probed. The optimizer state is kept across the merge, as it is across any stage boundary, so the
merge changes nothing but the weights (and ``alphas=(1.0,)`` is exactly a run without the callback). Its cost is the
grid's probes at the stage ends, ``len(alphas)`` generation passes over ``probe_examples`` examples of every trained
ability, logged as ``retention/weight_averaging/seconds``; nothing runs per step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from hft_lightning.errors import ConfigError
from hft_lightning.plan import Stage, markdown_cell
from hft_lightning.probe import Probe
from hft_lightning.report import Section
from hft_lightning.retention.base import RetentionCallback
from hft_lightning.retention.parameters import on_parameters, trainable
from hft_lightning.sharding import gathered

LOG = "retention/weight_averaging"


class WeightAveraging(RetentionCallback):
    """Sets each stage's final weights to a mix of its start and its end, the mixing weight fixed or probed.

    With several ``alphas``, each is tried at the stage end and scored by greedy generation on a fixed seeded sample
    of ``probe_examples`` validation examples of every ability some stage so far has trained (the sample a
    forgetting budget probes); the best mean score wins, ties going to the largest alpha. The choice is broadcast from
    rank 0, so every process merges alike. One alpha needs no probe.

    Strength (:meth:`~hft_lightning.retention.RetentionCallback.strengthen`): every alpha is read as
    ``alpha ** strength_scale``, so a stronger method pulls further toward the stage's start; ``alpha = 1`` (no
    averaging) stays 1 at any strength.

    Under LoRA the adapters are the trainable parameters, and ``A`` and ``B`` are averaged each on its own: the merged
    update ``B A`` is then not the average of the two updates (it is bilinear), but the weights stay on the segment
    between two adapter states the model actually reached.

    Args:
        alphas: The mixing weights to choose from, each in [0, 1] (1: the stage's own weights). One value fixes it.
        probe_examples: Validation examples per ability that score each alpha (> 0).

    Example::

        trainer = Trainer(callbacks=[Curriculum(), WeightAveraging(alphas=(0.25, 0.5, 0.75, 1.0)), Report()])
    """

    works_sharded = True

    def __init__(self, alphas: Sequence[float] = (0.25, 0.5, 0.75, 1.0), probe_examples: int = 32):
        alphas = tuple(float(a) for a in alphas)
        if not alphas:
            raise ConfigError("WeightAveraging(alphas=()): give at least one mixing weight in [0, 1], e.g. [0.5]")
        if not all(0.0 <= a <= 1.0 for a in alphas):
            raise ConfigError(f"WeightAveraging(alphas={list(alphas)}): every alpha must be in [0, 1]")
        if probe_examples <= 0:
            raise ConfigError(f"WeightAveraging(probe_examples={probe_examples}): probe_examples must be > 0")
        super().__init__(alphas=alphas, probe_examples=probe_examples)
        self.alphas = alphas
        self.probe_examples = probe_examples
        self.start: dict[str, torch.Tensor] | None = None
        self.start_index: int | None = None
        self.merges: list[dict[str, Any]] = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(self.alphas) > 1:
            self._check_probe_abilities(trainer)
        if self.start is not None:
            self.start = on_parameters("WeightAveraging start", self.start, trainable(pl_module))
        self._merge_if_due(trainer, pl_module)  # a checkpoint taken between the stage's last step and its merge

    def _check_probe_abilities(self, trainer: pl.Trainer) -> None:
        for index in range(1, len(self.plan.stages)):
            if not self._probed(trainer, index):
                raise ConfigError(
                    f"WeightAveraging(alphas={list(self.alphas)}) chooses alpha by probe scores, but no ability "
                    f"trained up to stage {index} ({self.plan.stages[index].name!r}) has a scorer; give one alpha"
                )

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, index: int) -> None:
        """Snapshots the weights stage ``index`` starts from (every stage after the first)."""
        if index == 0:
            return
        self.start = {name: p.detach().to(torch.float32, copy=True) for name, p in trainable(pl_module).items()}
        self.start_index = index

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._merge_if_due(trainer, pl_module)

    def _merge_if_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Merges the snapshotted stage once it has taken its last optimizer step."""
        if self.start is None or trainer.global_step < self.plan.steps_before(self.start_index + 1):
            return
        started = time.perf_counter()
        index, params = self.start_index, trainable(pl_module)
        candidates = [alpha**self.strength_scale for alpha in self.alphas]
        abilities, scores = [], None
        if len(candidates) == 1:
            [alpha] = candidates
            self._mix(params, None, alpha)
        else:
            abilities = self._probed(trainer, index)
            end = {name: p.detach().to(torch.float32, copy=True) for name, p in params.items()}
            probe = Probe(pl_module, trainer.datamodule, trainer.precision_plugin.train_step_context)
            scores = []
            for candidate in candidates:
                self._mix(params, end, candidate)
                scores.append(
                    statistics.fmean(
                        probe.score(a, self.probe_examples, trainer.datamodule.val_batch_size) for a in abilities
                    )
                )
            best = max(zip(scores, candidates, strict=True))[1]  # the best score; among equals, the largest alpha
            # one choice for all processes, whatever rounding another device does
            alpha, scores = trainer.strategy.broadcast((best, scores))
            self._mix(params, end, alpha)
        seconds = time.perf_counter() - started
        name = self.plan.stages[index].name
        self.merges.append(
            {"stage": name, "index": index, "abilities": abilities, "alphas": candidates, "scores": scores,
             "alpha": alpha, "seconds": seconds}
        )  # fmt: skip
        self.start, self.start_index = None, None
        metrics = {f"{LOG}/alpha": alpha, f"{LOG}/seconds": seconds}
        if scores is not None:
            metrics.update({f"{LOG}/score/alpha={a:g}": s for a, s in zip(candidates, scores, strict=True)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"WeightAveraging: stage {name!r} merged with its start at alpha={alpha:g} ({seconds:.1f} s)")

    @torch.no_grad()
    def _mix(self, params: dict[str, nn.Parameter], end: dict[str, torch.Tensor] | None, alpha: float) -> None:
        """Sets ``params`` to ``(1 - alpha) * start + alpha * end`` (``end``: the parameters themselves if ``None``)."""
        for name, p in params.items():
            theta_end = p.detach() if end is None else end[name]
            if alpha == 1.0:  # exactly the end: no rounding, no -0.0 turned into 0.0
                if end is not None:
                    p.copy_(theta_end)
                continue
            p.copy_(self.start[name] * (1 - alpha) + theta_end.float() * alpha)

    def _probed(self, trainer: pl.Trainer, index: int) -> list[str]:
        """The abilities with a scorer that some stage up to ``index`` trains, in declaration order."""
        trained = {a for stage in self.plan.stages[: index + 1] for a, weight in stage.mixture.items() if weight > 0}
        return [a.name for a in trainer.datamodule.abilities if a.name in trained and a.scorer is not None]

    def report_section(self) -> Section | None:
        """The alpha chosen at each stage end, with the grid's mean probe scores and the seconds they took."""
        if not self.merges:
            return None
        how = (
            "a fixed alpha"
            if len(self.alphas) == 1
            else f"the alpha of the grid with the best mean probe score ({self.probe_examples} validation examples per "
            "ability) over the abilities trained so far, ties to the largest"
        )
        rows = []
        for m in self.merges:
            scores = zip(m["alphas"], m["scores"] or [], strict=False)
            grid = ", ".join(f"{a:g}: {s:.3f}" for a, s in scores) or "-"
            cells = [markdown_cell(m["stage"]), ", ".join(m["abilities"]) or "-", grid, f"**{m['alpha']:g}**"]
            rows.append(f"| {' | '.join(cells)} | {m['seconds']:.1f} |")
        return Section(
            key="weight_averaging",
            data={"alphas": list(self.alphas), "probe_examples": self.probe_examples, "merges": self.merges},
            markdown=[
                "## Weight averaging",
                "",
                "At the end of every stage after the first the weights were set to "
                f"`(1 - alpha) * start + alpha * end`, with {how}.",
                "",
                "| stage | probed abilities | alpha: mean score | chosen alpha | seconds |",
                "| --- | --- | --- | ---: | ---: |",
                *rows,
            ],
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start": gathered(self.start), "start_index": self.start_index, "merges": self.merges}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start = state_dict["start"]
        self.start_index = state_dict["start_index"]
        self.merges = state_dict["merges"]
