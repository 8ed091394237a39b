"""Fully sharded data parallel training (FSDP2) of the fine-tuned model.

Lightning's ``ModelParallelStrategy`` starts the processes, builds the device mesh and calls the module's
``configure_model``, where :func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to every decoder layer
(the classes a transformers model names in ``_no_split_modules``: ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...)
and then to the transformers causal LM, the root. Each process then keeps ``1/N`` of every parameter, gradient and
optimizer state (the parameters are ``DTensor``s sharded on dim 0); a layer's weights are all-gathered for its forward
and backward and freed after them, and gradients are reduce-scattered. What belongs to no layer (embeddings, the final
norm, the output layer, tied to the embeddings in the embedded model) is one group gathered with the root. Under LoRA
the root is still the causal LM, inside the peft wrapper: peft's ``generate`` calls the causal LM directly, so hooks on
the wrapper would not gather the embeddings for generation.

Under ``bf16-mixed`` precision FSDP2 gathers the parameters in bf16 and reduces gradients in fp32
(``MixedPrecisionPolicy``); the sharded parameters and the optimizer state stay fp32.

Generation needs no care: transformers sees an FSDP-managed model and keeps every process stepping until all are
done (``synced_gpus``), since each forward pass is a collective. The end-of-fit export gathers the full weights on
rank 0 (:func:`full_state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Placement, distribute_tensor

from hft_lightning.errors import ConfigError

PARAM_DTYPES = {"bf16-mixed": torch.bfloat16}
"""Trainer precision -> the dtype FSDP2 gathers parameters in; fp32 for every other supported precision."""
REFUSED_PRECISIONS = ("16-mixed", "16-true")
"""fp16 needs a sharded gradient scaler, which Lightning's ``ModelParallelStrategy`` does not set up."""


def decoder_layers(model: nn.Module, causal_lm: nn.Module) -> list[nn.Module]:
    """The decoder layers of ``model``: its submodules whose class ``causal_lm`` names in ``_no_split_modules``.

    Args:
        model: The trained model (the causal LM, or the peft model wrapping it under LoRA).
        causal_lm: The transformers causal LM inside ``model`` (``model`` itself without LoRA).

    Raises:
        ConfigError: Naming the model class, if it declares no layer classes or none of them is found.
    """
    names = set(getattr(causal_lm, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"trainer.strategy=ModelParallelStrategy shards a model layer by layer, but {type(causal_lm).__name__} "
            f"names no decoder layer class that it contains (_no_split_modules={sorted(names)}); train it with "
            "strategy=ddp or on one device"
        )
    return layers


def shard_model(model: nn.Module, causal_lm: nn.Module, mesh: DeviceMesh, precision: str) -> None:
    """Shards ``model`` in place over ``mesh``: each decoder layer, then the causal LM as the root.

    Args:
        model: The trained model (the causal LM, or the peft model wrapping it under LoRA).
        causal_lm: The transformers causal LM inside ``model``.
        mesh: The one-dimensional data-parallel mesh.
        precision: The trainer's precision (``"32-true"``, ``"bf16-mixed"``, ...).

    Raises:
        ConfigError: Under fp16 precision, or if no decoder layer is found (:func:`decoder_layers`).
    """
    if precision in REFUSED_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} is not supported with ModelParallelStrategy (fp16 needs a sharded "
            "gradient scaler); use bf16-mixed"
        )
    policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES.get(precision), reduce_dtype=torch.float32)
    for layer in decoder_layers(model, causal_lm):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(causal_lm, mesh=mesh, mp_policy=policy)


def reshard(module: nn.Module) -> None:
    """Frees the gathered parameters of every sharded group in ``module``: its parameters are its shards again.

    FSDP2 keeps the root's parameters gathered after a forward pass until the next backward (it expects one). Code
    that reads or edits parameters outside a training step (after validation, between probes) calls this first, so
    it sees the shards the optimizer steps, and the next forward pass gathers what it wrote. Not a collective; a
    no-op on an unsharded module.
    """
    for group in module.modules():
        if isinstance(group, FSDPModule):
            group.reshard()


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard_model` (or any ``fully_shard``) has sharded ``model`` or a module inside it."""
    return any(isinstance(module, FSDPModule) for module in model.modules())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict of a sharded ``model`` on global rank 0, in CPU memory; ``{}`` elsewhere.

    A collective: every process must call it. Rank 0 holds one full fp32 copy of the weights in CPU memory while the
    caller keeps the dict.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The process's shard of ``tensor`` (a view: writing to it writes the ``DTensor``); ``tensor`` if not sharded."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_group(params: Iterable[torch.Tensor]) -> torch.distributed.ProcessGroup | None:
    """The process group ``params`` are sharded over, or ``None`` when none of them is a ``DTensor``."""
    for param in params:
        if isinstance(param, DTensor):
            return param.device_mesh.get_group()
    return None


def shard_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped like ``param``) on ``param``'s device, sharded as ``param`` is when it is a ``DTensor``.

    Every process passes the same full ``tensor`` (restored from a checkpoint) and keeps its own chunk: no
    communication. A ``tensor`` that is already a ``DTensor`` is returned as it is.
    """
    if isinstance(tensor, DTensor):
        return tensor
    tensor = tensor.to(param.device)
    if not isinstance(param, DTensor):
        return tensor
    return distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)


@contextmanager
def computing_with(
    root: nn.Module, params: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Inside, the sharded ``root`` computes with ``values`` in place of ``params``, its own group gathered.

    For a pass without gradient between a training step's forward and its backward (a reference model's forward):
    the process's shards of ``params`` (``DTensor`` parameters of ``root``, by name) hold those of ``values``
    (sharded like them) until the exit, when the saved shards are copied back. Every group is resharded on entry,
    so the pass gathers ``values`` and not what the training forward left gathered, and again on exit, so the
    backward gathers the trained weights: FSDP2 re-gathers what was freed, as it does for each layer between forward
    and backward. The training forward saved the gathered copies, never the shards, so autograd sees no in-place
    change. ``root``'s own group (embeddings, final norm, output layer) stays gathered inside, so its submodules can
    be called directly (the decoder without the output layer). A collective: every process enters it. Costs one
    more copy of the process's shards of ``params`` for the duration.
    """
    reshard(root)
    with torch.no_grad():
        saved = {name: local(param).clone() for name, param in params.items()}
    try:
        with torch.no_grad():
            for name, param in params.items():
                local(param).copy_(local(values[name]))
        root.unshard()
        yield
    finally:
        reshard(root)
        with torch.no_grad():
            for name, param in params.items():
                local(param).copy_(saved[name])


@dataclass(frozen=True)
class CPUShard:
    """A process's shard of a ``DTensor``, copied to CPU memory, with the layout to gather it again."""

    local: torch.Tensor
    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    def full_tensor(self) -> torch.Tensor:
        """The full tensor in CPU memory (a collective: every process calls it with its own shard)."""
        on_mesh = DTensor.from_local(  # moves the shard to the mesh's device
            self.local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )
        return on_mesh.full_tensor().cpu()


def to_cpu(tensor: torch.Tensor) -> torch.Tensor | CPUShard:
    """A copy of ``tensor`` in CPU memory; of a ``DTensor``, the process's shard only, as a :class:`CPUShard`."""
    if isinstance(tensor, DTensor):
        shard = tensor.to_local().detach().to("cpu", copy=True)
        return CPUShard(shard, tensor.device_mesh, tensor.placements, tensor.shape, tensor.stride())
    return tensor.detach().to("cpu", copy=True)


def copy_into(target: torch.Tensor, source: torch.Tensor | CPUShard) -> None:
    """Writes ``source`` into ``target`` in place, without gradient.

    ``source`` is what :func:`to_cpu` made of a tensor like ``target`` (a :class:`CPUShard` goes into the process's
    shard), or the full tensor restored from a checkpoint (each process writes its chunk, :func:`shard_like`).
    """
    if isinstance(source, CPUShard):
        source = source.local
    elif isinstance(target, DTensor):
        source = shard_like(source, target).to_local()
    with torch.no_grad():
        local(target).copy_(source)


def gathered(state: Any) -> Any:
    """``state`` (dicts and lists walked) with every ``DTensor`` and :class:`CPUShard` replaced by its full tensor.

    The full tensors are in CPU memory. Retention callbacks return it from ``state_dict``: Lightning's
    ``ModelParallelStrategy`` writes callback state once, from rank 0, so each sharded tensor is all-gathered (a
    collective: every process calls it, as Lightning does when saving) and the checkpoint holds what a single process
    would hold. One tensor is gathered at a time.
    """
    if isinstance(state, DTensor | CPUShard):
        return state.full_tensor().cpu()
    if isinstance(state, dict):
        return {key: gathered(value) for key, value in state.items()}
    if isinstance(state, list):
        return [gathered(value) for value in state]
    return state
