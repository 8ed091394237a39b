"""The data side of a staged run: every ability's train and validation split, and the tokenizer.

The tokenizer is the pretrained model's own when ``tokenizer_name_or_path`` is set (the CLI links it from
``model.name_or_path``, so the user names the model once), and a BPE tokenizer trained on the abilities otherwise.

Training sees one stage at a time: the curriculum pushes its :class:`~hft_lightning.plan.Plan` here
(:meth:`StagedDataModule.set_plan`), and :meth:`StagedDataModule.train_dataloader`, called again at every epoch (one
epoch per stage), samples from the mixture of the epoch's stage. Validation always covers every ability, one
dataloader per ability with validation examples in declaration order, whatever stage is training (an ability scored
by an lm-evaluation-harness task alone has none: the module scores it on the whole model).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import ConcatDataset, DataLoader
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from hft_lightning.data.ability import Ability
from hft_lightning.data.builtin import BuiltinSource
from hft_lightning.data.sampler import StageBatchSampler
from hft_lightning.data.sft import SFTCollator, SFTDataset
from hft_lightning.data.source import AbilitySource
from hft_lightning.data.tokenizer import build_tokenizer, load_tokenizer
from hft_lightning.errors import ConfigError
from hft_lightning.plan import Plan, require_plan
from hft_lightning.seeds import derive_seed

DEFAULT_ABILITIES = ("builtin:math", "builtin:code", "builtin:general")
MIN_VOCAB_SIZE = 261
TOKENIZER_EXAMPLES = 20_000
"""The tokenizer is trained on at most this many training examples of each ability (and all validation ones)."""


class StagedDataModule(pl.LightningDataModule):
    """Abilities, tokenizer and the per-stage training data of a curriculum.

    Args:
        abilities: Ability sources: ``builtin:math``, ``builtin:code`` and ``builtin:general`` are generated
            locally and named after the part after ``builtin:`` (used in stage mixtures); an
            :class:`~hft_lightning.data.source.AbilitySource` reads the user's JSONL or parquet files, or names an
            lm-evaluation-harness task that scores the ability (with no files: evaluated only, trained by no stage).
            At least one ability must be scored.
        num_train: Training examples per ability: generated for a built-in one (``None``: 4000), the first
            ``num_train`` records of a file one (``None``: all of them). A mapping gives each named ability its own
            count (``{math: 500, general: 4000}``: a real SFT mix is far from equal), the others keep their default.
        num_val: Validation examples per ability (disjoint from training), scored at every validation.
        batch_size: Training batch size.
        val_batch_size: Validation (generation) batch size.
        vocab_size: Size of the BPE tokenizer trained on the abilities' data (unused with a pretrained tokenizer).
        seed: Seed of data generation and of every stage's data order.
        tokenizer_name_or_path: A pretrained model's tokenizer (hub name or local folder) instead of a trained BPE
            one. The CLI sets it from ``model.name_or_path``.
        max_length: Longest sequence in tokens: a longer training example keeps its first ``max_length`` tokens
            (the end of its response is not trained), a longer generation prompt its last ones; each ability's
            count is reported at the end. ``None``: the tokenizer's ``model_max_length`` if it declares one,
            otherwise no limit.

    Example::

        data = StagedDataModule(num_train=100, num_val=8)
        data.ability_names  # ['math', 'code', 'general']
    """

    def __init__(
        self,
        abilities: Sequence[str | AbilitySource] = DEFAULT_ABILITIES,
        num_train: int | dict[str, int] | None = None,
        num_val: int = 100,
        batch_size: int = 32,
        val_batch_size: int = 100,
        vocab_size: int = 1024,
        seed: int = 0,
        tokenizer_name_or_path: str | None = None,
        max_length: int | None = None,
    ):
        super().__init__()
        counts = dict(num_val=num_val, batch_size=batch_size, val_batch_size=val_batch_size)
        if isinstance(num_train, dict):
            counts.update({f"num_train[{name!r}]": value for name, value in num_train.items()})
        else:
            counts["num_train"] = num_train
        for name, value in counts.items():
            if value is not None and value <= 0:  # num_train None: each source's own default
                raise ConfigError(f"data.{name} must be positive, got {value}")
        if vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"data.vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes and 5 special tokens), got {vocab_size}"
            )
        if max_length is not None and max_length <= 0:
            raise ConfigError(f"data.max_length must be positive, got {max_length}")
        if not abilities:
            raise ConfigError("data.abilities is empty; declare at least one ability, e.g. builtin:math")
        sources = [BuiltinSource.parse(s) if isinstance(s, str) else s for s in abilities]
        per_ability = num_train if isinstance(num_train, dict) else {s.name: num_train for s in sources}
        unknown = sorted(set(per_ability) - {s.name for s in sources})
        if unknown:
            raise ConfigError(
                f"data.num_train names undeclared abilities {unknown}; declared: {[s.name for s in sources]}"
            )
        self.abilities: list[Ability] = [s.load(per_ability.get(s.name), num_val, seed) for s in sources]
        names = self.ability_names
        if len(set(names)) != len(names):
            raise ConfigError(f"data.abilities: ability names must be unique, got {names}")
        if not any(a.scored for a in self.abilities):
            raise ConfigError(f"data.abilities: every ability has scorer 'none' {names}; the accuracy matrix needs one")
        if tokenizer_name_or_path is None:
            examples = (e for a in self.abilities for e in (*itertools.islice(a.train, TOKENIZER_EXAMPLES), *a.val))
            self.tokenizer = build_tokenizer((m["content"] for e in examples for m in e.messages), vocab_size)
        else:
            self.tokenizer = load_tokenizer(tokenizer_name_or_path)
        declared = self.tokenizer.model_max_length
        self.max_length = max_length or (declared if declared < VERY_LARGE_INTEGER else None)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.seed = seed
        self._collate = SFTCollator(self.tokenizer.pad_token_id)
        self._train_sets = [self._dataset(a, "train") for a in self.abilities]
        self._val_sets = [self._dataset(a, "val") for a in self.abilities if len(a.val)]
        self.plan: Plan | None = None

    def set_plan(self, plan: Plan) -> None:
        """Trains the stages of ``plan`` (pushed by the curriculum)."""
        self.plan = plan

    def _dataset(self, ability: Ability, split: str) -> SFTDataset:
        examples = ability.train if split == "train" else ability.val
        name = f"data.abilities[{ability.name!r}].{split}"
        return SFTDataset(examples, self.tokenizer, split == "val", self.max_length, name)

    @property
    def ability_names(self) -> list[str]:
        """Names of the abilities, in declaration order."""
        return [a.name for a in self.abilities]

    @property
    def val_ability_names(self) -> list[str]:
        """Names of the abilities with validation examples, in declaration order: one validation dataloader each."""
        return [a.name for a in self.abilities if len(a.val)]

    @property
    def evaluated_only(self) -> list[str]:
        """Names of the abilities with no training data (scored by an lm-evaluation-harness task only)."""
        return [a.name for a in self.abilities if not len(a.train)]

    def stage_sampler(self, index: int, start_batch: int = 0) -> StageBatchSampler:
        """The deterministic batch order of stage ``index``, starting at batch ``start_batch``."""
        stage = require_plan(self.plan, "StagedDataModule").stages[index]
        return StageBatchSampler(
            dataset_sizes=[len(a.train) for a in self.abilities],
            weights=[stage.mixture.get(name, 0.0) for name in self.ability_names],
            batch_size=self.batch_size,
            num_batches=stage.steps * self.trainer.accumulate_grad_batches,
            seed=derive_seed(self.seed, "stage", index),
            start_batch=start_batch,
            rank=self.trainer.global_rank,
            num_replicas=self.trainer.world_size,
        )

    def stage_stream(self, index: int) -> Iterator[tuple[str, int]]:
        """Every training example stage ``index`` trains on, in training order, as ``(ability, example index)``.

        This is what the retention methods sample their memories from: a pure function of the plan and the seed,
        the same on every process (all processes' examples of each global batch) and after a resume.
        """
        sampler = self.stage_sampler(index)
        offsets = list(itertools.accumulate((len(a.train) for a in self.abilities), initial=0))
        for batch in range(sampler.num_batches):
            for flat in sampler.global_batch(batch):
                ability = bisect.bisect_right(offsets, flat) - 1
                yield self.ability_names[ability], flat - offsets[ability]

    def collate(self, examples: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        """A training batch (CPU tensors) of the given ``(ability, example index)`` training examples."""
        by_name = dict(zip(self.ability_names, self._train_sets, strict=True))
        return self._collate([by_name[name][i] for name, i in examples])

    def train_dataloader(self) -> DataLoader:
        """Batches of the current stage, resuming at the right batch after a checkpoint restore."""
        plan = require_plan(self.plan, "StagedDataModule")
        index = plan.stage_index(self.trainer.current_epoch)
        start_batch = (self.trainer.global_step - plan.steps_before(index)) * self.trainer.accumulate_grad_batches
        dataset = ConcatDataset(self._train_sets)
        return DataLoader(dataset, batch_sampler=self.stage_sampler(index, start_batch), collate_fn=self._collate)

    def val_dataloader(self) -> list[DataLoader]:
        """One dataloader per ability with validation examples (:attr:`val_ability_names`): prompts and examples."""
        return [DataLoader(d, batch_size=self.val_batch_size, collate_fn=self._collate) for d in self._val_sets]

    def test_dataloader(self) -> list[DataLoader]:
        """The validation splits: the built-in abilities have no separate test split."""
        return self.val_dataloader()

    def teardown(self, stage: str) -> None:
        """Reports how many encoded examples of each split were truncated to ``max_length``, if any were.

        Each count says how many of the truncated examples kept no response token at all (their prompt alone
        reaches ``max_length``): they train nothing, and raising ``data.max_length`` is the fix.
        """
        cut = [
            f"{d.name}: {d.truncated} of {d.encoded}"
            + (f" ({d.untrained} kept no response token)" if d.untrained else "")
            for d in (*self._train_sets, *self._val_sets)
            if d.truncated
        ]
        if cut:
            rank_zero_warn(f"examples truncated to data.max_length={self.max_length} tokens: {'; '.join(cut)}")
