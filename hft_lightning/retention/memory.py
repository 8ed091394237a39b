"""Episodic memory: a bounded sample of the training examples each ability was trained on.

The memory is filled at the end of a stage from :meth:`~hft_lightning.data.StagedDataModule.stage_stream`, the
exact sequence of examples that stage trained on, by reservoir sampling (Vitter's algorithm R) per ability:
every example drawn during training has the same chance to be remembered, whatever the stage length. The stream
and the sampling generator are pure functions of the plan and the data seed, so every process builds the same
memory with no communication and a resumed run builds what the uninterrupted run built.

Examples are remembered as ``(ability, index)`` references into the training data, so a memory of thousands of
examples costs a few kilobytes in a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from hft_lightning.retention.contracts import StageData
from hft_lightning.seeds import derive_seed

Item = tuple[str, int]
"""A training example: the ability's name and the example's index in that ability's training data."""


class ExampleMemory:
    """Per-ability reservoirs of training examples.

    Args:
        size: Examples remembered per ability.

    Example::

        memory = ExampleMemory(size=2)
        memory.observe([("math", 0), ("math", 5), ("code", 1)], torch.Generator().manual_seed(0))
        memory.items("math")  # [('math', 0), ('math', 5)]
    """

    def __init__(self, size: int):
        self.size = size
        self._items: dict[str, list[Item]] = {}
        self._seen: dict[str, int] = {}

    @property
    def abilities(self) -> list[str]:
        """Abilities with at least one remembered example, in the order they were first seen."""
        return list(self._items)

    def items(self, ability: str) -> list[Item]:
        """The remembered examples of ``ability``."""
        return self._items[ability]

    def all_items(self) -> list[Item]:
        """Every remembered example, ability by ability."""
        return [item for items in self._items.values() for item in items]

    def observe(self, stream: Iterable[Item], generator: torch.Generator) -> None:
        """Updates the reservoirs with a stream of trained examples (repeats count as draws)."""
        for item in stream:
            ability = item[0]
            items = self._items.setdefault(ability, [])
            seen = self._seen.get(ability, 0) + 1
            self._seen[ability] = seen
            if len(items) < self.size:
                if item not in items:
                    items.append(item)
                continue
            slot = int(torch.randint(seen, (1,), generator=generator))
            if slot < self.size and item not in items:
                items[slot] = item

    def observe_stage(self, datamodule: StageData, stage_index: int) -> None:
        """Updates the reservoirs with every example stage ``stage_index`` trained on.

        Args:
            datamodule: Its ``stage_stream`` and ``seed`` (a :class:`~hft_lightning.StagedDataModule`).
            stage_index: The finished stage.
        """
        generator = torch.Generator().manual_seed(derive_seed(datamodule.seed, "memory", stage_index))
        self.observe(datamodule.stage_stream(stage_index), generator)

    def state_dict(self) -> dict[str, Any]:
        """The remembered examples and the number of draws seen per ability."""
        return {"items": {a: [list(item) for item in items] for a, items in self._items.items()}, "seen": self._seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self._items = {a: [(name, int(i)) for name, i in items] for a, items in state["items"].items()}
        self._seen = dict(state["seen"])
