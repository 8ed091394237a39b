"""The reference gradients GEM and A-GEM project against, refreshed every few steps and kept in the checkpoint.

The papers recompute them at every optimizer step (``every=1``), which costs forward/backward passes on the
memory at each step. ``every > 1`` reuses them for that many steps, trading exactness for speed (measured in
``benchmarks/bench_retention_overhead.py``). They are part of the checkpoint, so a resumed run projects exactly
as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from hft_kernels import gem_project_
from hft_lightning.retention.parameters import on_parameters
from hft_lightning.sharding import gathered, local, shard_group


class ReferenceGradients:
    """Reference gradients by key (an ability, or the whole memory), each a tensor per parameter name, in fp32.

    Args:
        every: Recompute the references every this many optimizer steps (> 0; 1 = every step).
    """

    def __init__(self, every: int):
        self.every = every
        self.refs: dict[str, dict[str, torch.Tensor]] = {}
        self.step = -1

    def refresh(self, step: int, compute: Callable[[], dict[str, dict[str, torch.Tensor]]]) -> None:
        """Recomputes the references with ``compute`` if they are due at optimizer step ``step``.

        The old references are dropped before ``compute`` runs, so a refresh holds the new ones only: k copies of
        the trainable parameters at its peak, not 2k.
        """
        if self.refs and step - self.step < self.every:
            return
        self.refs = {}
        self.refs, self.step = compute(), step

    def clear(self) -> None:
        """Drops the references (the memory changed): the next step recomputes them."""
        self.refs = {}

    def ordered(self, names: Iterable[str]) -> list[list[torch.Tensor]]:
        """The references as ``[k][num_params]`` tensors in ``names`` order, for :func:`hft_kernels.gem_project_`."""
        names = list(names)
        return [[ref[name] for name in names] for ref in self.refs.values()]

    def project_(self, params: Mapping[str, nn.Parameter]) -> torch.Tensor:
        """Projects the gradients of ``params`` (by name) against the references with :func:`hft_kernels.gem_project_`.

        Under FSDP2 each process projects its shards, the dot products summed over the shard group. Returns v*.
        """
        refs = [[local(ref) for ref in reference] for reference in self.ordered(params)]
        grads = [local(p.grad) for p in params.values()]
        return gem_project_(grads, refs, process_group=shard_group(params.values()))

    def restore(self, what: str, params: Mapping[str, nn.Parameter]) -> None:
        """Checks restored references against the trainable parameters and moves them to their devices.

        Call it in ``on_train_start``; ``what`` names the method in the error of a mismatch.
        """
        for key, ref in self.refs.items():
            self.refs[key] = on_parameters(f"{what} reference gradient of {key!r}", ref, params)

    def state_dict(self) -> dict[str, Any]:
        """The references (gathered under FSDP2) and the step they were computed at, for the owner's checkpoint."""
        return {"refs": gathered(self.refs), "step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; call :meth:`restore` once the model is on its device."""
        self.refs, self.step = state_dict["refs"], state_dict["step"]
