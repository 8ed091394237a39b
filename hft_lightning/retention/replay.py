"""Experience replay: remembered examples of earlier abilities mixed into every training batch.

At each stage end the per-ability memory takes in what the stage trained on (reservoir sampling,
:class:`~hft_lightning.retention.memory.ExampleMemory`). In every later training batch the last
``round(ratio * batch_size)`` rows (at least one) are replaced by remembered examples: an ability drawn uniformly
among the remembered ones, then an example uniformly within it, so each earlier ability gets an equal share
whatever its memory size. The draw is seeded by the data seed, the stage, the batch index and the process rank:
resumed runs replay exactly what the uninterrupted run replayed, and processes replay different examples.
The batch keeps its size, so a step costs what it cost without replay.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from hft_lightning.data.sft import concat_batches
from hft_lightning.errors import ConfigError
from hft_lightning.retention.base import RetentionCallback
from hft_lightning.retention.memory import ExampleMemory
from hft_lightning.seeds import derive_seed

MAX_RATIO = 0.75
"""The most strengthening raises Replay's ratio to: every batch keeps a quarter of the stage's own examples."""


class Replay(RetentionCallback):
    """Replaces a share of every training batch with remembered examples of the abilities learned so far.

    Args:
        memory_size: Examples remembered per ability (> 0).
        ratio: Share of every batch taken from the memory, in (0, 1). Strengthened
            (:meth:`~hft_lightning.retention.RetentionCallback.strengthen`), it acts as ``ratio * strength_scale``
            capped at :data:`MAX_RATIO`, never below ``ratio``.

    Example::

        trainer = Trainer(callbacks=[Curriculum(), Replay(memory_size=256, ratio=0.25), Report()])
    """

    def __init__(self, memory_size: int = 256, ratio: float = 0.25):
        if memory_size <= 0:
            raise ConfigError(f"Replay(memory_size={memory_size}): memory_size must be > 0")
        if not 0 < ratio < 1:
            raise ConfigError(f"Replay(ratio={ratio}): ratio must be in (0, 1)")
        super().__init__(memory_size=memory_size, ratio=ratio)
        self.ratio = ratio
        self.memory = ExampleMemory(memory_size)

    @override
    def consolidate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage_index: int) -> None:
        self.memory.observe_stage(trainer.datamodule, stage_index)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict[str, Any], batch_idx: int
    ) -> None:
        abilities = self.memory.abilities
        if not abilities:
            return
        size = len(batch["input_ids"])
        num_replayed = max(1, round(max(self.ratio, min(self.ratio * self.strength_scale, MAX_RATIO)) * size))
        stage_index = self.plan.stage_index(trainer.current_epoch)
        seed = derive_seed(trainer.datamodule.seed, "replay", stage_index, batch_idx, trainer.global_rank)
        generator = torch.Generator().manual_seed(seed)
        which = torch.randint(len(abilities), (num_replayed,), generator=generator).tolist()
        items = []
        for a in which:
            remembered = self.memory.items(abilities[a])
            items.append(remembered[int(torch.randint(len(remembered), (1,), generator=generator))])
        replayed = trainer.strategy.batch_to_device(trainer.datamodule.collate(items))
        kept = {key: batch[key][: size - num_replayed] for key in replayed}
        batch.update(concat_batches([kept, replayed], trainer.datamodule.tokenizer.pad_token_id))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.memory.load_state_dict(state_dict["memory"])
