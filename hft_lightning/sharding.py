"""Fully sharded data parallel training (FSDP2) of the fine-tuned model.

Lightning's ``ModelParallelStrategy`` starts the processes, builds the device mesh and calls the module's
``configure_model``, where :func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to every decoder layer
(the classes a transformers model names in ``_no_split_modules``: ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...)
and then to the whole model. Each process then keeps ``1/N`` of every parameter, gradient and optimizer state (the
parameters are ``DTensor``s sharded on dim 0); a layer's weights are all-gathered for its forward and backward and
freed after them, and gradients are reduce-scattered. What belongs to no layer (embeddings, the final norm, the
output layer, tied to the embeddings in the embedded model) is one group gathered with the root.

Under ``bf16-mixed`` precision FSDP2 gathers the parameters in bf16 and reduces gradients in fp32
(``MixedPrecisionPolicy``); the sharded parameters and the optimizer state stay fp32.

Generation needs no care: transformers sees an FSDP-managed model and keeps every process stepping until all are
done (``synced_gpus``), since each forward pass is a collective. The end-of-fit export gathers the full weights on
rank 0 (:func:`full_state_dict`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

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
    """Shards ``model`` in place over ``mesh``: each decoder layer, then the root.

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
    fully_shard(model, mesh=mesh, mp_policy=policy)


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
    """Whether :func:`shard_model` (or any ``fully_shard``) has sharded ``model``."""
    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict of a sharded ``model`` on global rank 0, in CPU memory; ``{}`` elsewhere.

    A collective: every process must call it. Rank 0 holds one full fp32 copy of the weights in CPU memory while the
    caller keeps the dict.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
