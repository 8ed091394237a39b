"""Checks of a run's settings before training: the configured stages, the trainer, the callbacks' order and hooks.

Each raises :class:`~hft_lightning.errors.ConfigError` naming the field and what to do instead, in ``__init__`` or
``setup``, before any step is taken.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from hft_lightning.errors import ConfigError
from hft_lightning.plan import Stage


def validate_stages(stages: Sequence[Stage]) -> None:
    """Checks the configured stages.

    Raises:
        ConfigError: Naming the stage and the field.
    """
    if not stages:
        raise ConfigError("Curriculum.stages: the stage plan is empty; give at least one stage")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"Curriculum.stages: stage names must be unique, got {names}")
    for i, stage in enumerate(stages):
        field = f"Curriculum.stages[{i}] ({stage.name!r})"
        if stage.steps <= 0:
            raise ConfigError(f"{field}.steps must be a positive number of optimizer steps, got {stage.steps}")
        if not stage.mixture:
            raise ConfigError(f"{field}.mixture is empty; give ability -> weight, e.g. {{math: 1.0}}")
        for ability, weight in stage.mixture.items():
            if not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"{field}.mixture[{ability!r}] must be a finite weight >= 0, got {weight}")
        if sum(stage.mixture.values()) <= 0:
            raise ConfigError(f"{field}.mixture weights are all zero; at least one must be positive")


def check_trainer(trainer: pl.Trainer) -> None:
    """Refuses trainer settings under which a stage would not run exactly its planned steps.

    Raises:
        ConfigError: Naming the trainer setting and what to do instead.
    """
    # The one private read: Lightning has no public accessor for this flag, and with it set Lightning would try to
    # wrap the stage sampler in a DistributedSampler (and fail with a TypeError that hides the fix).
    if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
        raise ConfigError(
            f"set trainer.use_distributed_sampler: false with {trainer.world_size} processes: the curriculum's "
            "stage sampler shards each batch across the processes itself"
        )
    if isinstance(trainer.strategy, FSDPStrategy | DeepSpeedStrategy):
        raise ConfigError(
            f"trainer.strategy={type(trainer.strategy).__name__} is not supported: shard the model with FSDP2 "
            "instead, strategy=ModelParallelStrategy (see configs/fsdp.yaml)"
        )
    if trainer.max_steps != -1:
        raise ConfigError(
            f"trainer.max_steps={trainer.max_steps} conflicts with the curriculum, which sets the length of "
            "training through Curriculum.stages[*].steps; leave trainer.max_steps unset"
        )
    for flag, value, default in [
        ("limit_train_batches", trainer.limit_train_batches, 1.0),
        ("overfit_batches", trainer.overfit_batches, 0),
        ("fast_dev_run", trainer.fast_dev_run, False),
    ]:
        if value != default:
            raise ConfigError(
                f"trainer.{flag}={value} would cut stages short of their planned steps; shorten "
                "Curriculum.stages[*].steps instead"
            )
    if trainer.limit_val_batches == 0 or trainer.check_val_every_n_epoch not in (1, None):
        raise ConfigError(
            "the accuracy matrix needs an evaluation after every stage: keep trainer.check_val_every_n_epoch=1 "
            f"and trainer.limit_val_batches > 0 (got {trainer.check_val_every_n_epoch} and {trainer.limit_val_batches})"
        )


def check_callback_order(callbacks: Sequence[Callback], curriculum: Callback) -> None:
    """Refuses a callback that follows the stages (``on_stage_start``/``on_stage_end``) placed before the curriculum.

    Callbacks run in list order, and the curriculum announces a boundary in its ``on_train_batch_start``: a callback
    before it would run that batch's hooks in the stage that just ended (Replay would miss the stage's examples).
    """
    for callback in callbacks[: callbacks.index(curriculum)]:
        if hasattr(callback, "on_stage_start") or hasattr(callback, "on_stage_end"):
            name = type(callback).__name__
            raise ConfigError(
                f"trainer.callbacks: put hft_lightning.Curriculum before {name} (callbacks run in list order, and "
                f"{name} must see the stage the Curriculum has switched to)"
            )


STAGE_HOOKS = ("on_stage_start", "on_stage_end")
"""The hooks the curriculum calls at a stage boundary, as ``hook(trainer, pl_module, stage, index)``."""


def check_stage_hooks(callbacks: Sequence[Callback]) -> None:
    """Refuses a stage hook that cannot be called as ``hook(trainer, pl_module, stage, index)``.

    Checked before training, so a hook written for another signature fails here rather than at the first stage
    boundary, after training has started.

    Raises:
        ConfigError: Naming the callback class, the hook and the signature it must have.
    """
    for callback in callbacks:
        for hook in STAGE_HOOKS:
            method = getattr(callback, hook, None)
            if not callable(method):
                continue
            signature = inspect.signature(method)
            try:
                signature.bind("trainer", "pl_module", "stage", 0)
            except TypeError:
                raise ConfigError(
                    f"trainer.callbacks: {type(callback).__name__}.{hook}{signature} cannot be called as "
                    f"{hook}(trainer, pl_module, stage, index): the curriculum passes the stage and its index in "
                    "the plan"
                ) from None


def refuse_sharded(trainer: pl.Trainer, name: str, why: str = "its state is not sharded") -> None:
    """Refuses FSDP2 (``ModelParallelStrategy``), whose sharded parameters ``name`` cannot work with (``why``).

    Raises:
        ConfigError: Naming ``name`` and ``trainer.strategy``.
    """
    if isinstance(trainer.strategy, ModelParallelStrategy):
        raise ConfigError(
            f"{name} does not support trainer.strategy=ModelParallelStrategy (FSDP2) yet ({why}); use a single "
            "device or strategy=ddp"
        )
