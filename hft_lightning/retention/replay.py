"""Experience replay: remembered examples of earlier abilities mixed into every training batch.

At each stage end the per-ability memory takes in what the stage trained on (reservoir sampling,
:class:`~hft_lightning.retention.memory.ExampleMemory`). In every later training batch the last rows are replaced by
remembered examples: an ability drawn uniformly among the remembered ones, then an example uniformly within it, so
each earlier ability gets an equal share whatever its memory size. How many rows:

- ``ratio``: ``round(ratio * batch_size)`` rows (at least one) of every batch;
- ``share``: a share of the stage's examples, for shares too small for a batch (Dong et al. 2023's DMT keeps 1/256
  of the specialised data; at batch 32 that is 1/8 of a row). The stage replays ``n = round(share * B * batch_size)``
  rows over its ``B`` batches, spread evenly: batch ``b`` replaces ``floor((b + 1) n / B) - floor(b n / B)`` rows,
  a function of ``b`` alone, so a resumed run replays where the uninterrupted one did. Under DDP every process
  replays that share of its own rows.

The draw is seeded by the data seed, the stage, the batch index and the process rank: resumed runs replay exactly
what the uninterrupted run replayed, and processes replay different examples. The batch keeps its size, so a step
costs what it cost without replay.
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

    Strength (:meth:`~hft_lightning.retention.RetentionCallback.strengthen`): ``ratio`` acts as
    ``ratio * strength_scale`` capped at :data:`MAX_RATIO`, never below ``ratio``; ``share`` as
    ``min(share * strength_scale, MAX_RATIO)``, never below ``share``.

    Args:
        memory_size: Examples remembered per ability (> 0).
        ratio: Share of every batch taken from the memory, in (0, 1). Default 0.25 when ``share`` is not given.
        share: Share of each stage's examples taken from the memory, spread evenly over its batches, in (0, 1).
            Give ``ratio`` or ``share``, not both.

    Example::

        trainer = Trainer(callbacks=[Curriculum(), Replay(memory_size=256, ratio=0.25), Report()])
        Replay(memory_size=256, share=1 / 256)  # DMT's k = 1/256: one replayed row in 256 of each stage
    """

    works_sharded = True

    def __init__(self, memory_size: int = 256, ratio: float | None = None, share: float | None = None):
        if memory_size <= 0:
            raise ConfigError(f"Replay(memory_size={memory_size}): memory_size must be > 0")
        if ratio is not None and share is not None:
            raise ConfigError(
                f"Replay(ratio={ratio}, share={share}): give ratio (of every batch) or share (of each stage's "
                "examples), not both"
            )
        if share is None:
            ratio = 0.25 if ratio is None else ratio
            if not 0 < ratio < 1:
                raise ConfigError(f"Replay(ratio={ratio}): ratio must be in (0, 1)")
            super().__init__(memory_size=memory_size, ratio=ratio)  # the state key of checkpoints before `share`
        else:
            if not 0 < share < 1:
                raise ConfigError(f"Replay(share={share}): share must be in (0, 1)")
            super().__init__(memory_size=memory_size, share=share)
        self.ratio = ratio
        self.share = share
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
        stage_index = self.plan.stage_index(trainer.current_epoch)
        if self.share is None:
            num_replayed = max(1, round(self._strengthened(self.ratio) * size))
        else:
            num_batches = self.plan.stages[stage_index].steps * trainer.accumulate_grad_batches
            num_replayed = self._rows_from_share(num_batches, size, batch_idx)
            if not num_replayed:
                return
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

    def _rows_from_share(self, num_batches: int, size: int, batch_idx: int) -> int:
        """Rows of batch ``batch_idx`` to replace, so the stage's ``num_batches`` batches replace ``n`` rows evenly."""
        n = round(self._strengthened(self.share) * num_batches * size)
        return (batch_idx + 1) * n // num_batches - batch_idx * n // num_batches

    def _strengthened(self, value: float) -> float:
        return max(value, min(value * self.strength_scale, MAX_RATIO))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.memory.load_state_dict(state_dict["memory"])
