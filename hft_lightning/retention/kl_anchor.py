"""KL anchor: keep the next-token distribution close to the model's own at the end of the last finished stage.

A loss term, not a gradient edit (Learning without Forgetting, Li and Hoiem 2016; the KL penalty to a reference
model of Ouyang et al. 2022). At each stage end that another stage follows, the trainable weights are snapshot as
the reference ``theta_ref``; every later training step adds, on the response tokens of the batch it trains on
(Replay's remembered examples included)::

    L = L_SFT + beta * strength_scale * 1/N sum_{n in response} KL(p_ref(. | x_<n) || p_theta(. | x_<n))
    p_ref = softmax(lm_head_ref(h_ref)),   h_ref = decoder_ref(x) (no gradient)

The reference forward runs the model's decoder once, without gradient, with ``theta_ref`` swapped in through
:func:`torch.func.functional_call`, in eval mode (no dropout). ``functional_call`` replaces the module's parameters
by the given tensors for that call only, leaving the parameters and the autograd graph of the training forward
untouched, and it runs under whatever autocast is active (bf16-mixed casts the fp32 snapshot as it casts the
weights). Copying the snapshot into the parameters in place and back instead would overwrite tensors that the
training forward saved for backward. Under FSDP2 the snapshot is sharded like the parameters, and for the
reference pass it is copied into the shards and back (:func:`~hft_lightning.sharding.computing_with`): the training
forward saved the gathered weights, not the shards, and the backward gathers them again. The KL is computed in
chunks of ``chunk_size`` response tokens from the reference's last hidden states (:func:`hft_kernels.linear_kl_div`),
so no ``[tokens, vocab]`` reference tensor exists whole; its gradient w.r.t. the trained logits,
``p_theta - p_ref``, is the only tensor of that size it adds.

Memory: one fp32 copy of the trainable parameters (the snapshot, replaced at every stage end; under FSDP2 each
process keeps its shards of it, plus a copy of its trainable shards during the reference pass). Under LoRA the
trainable parameters are the adapters: the reference is the adapter snapshot, swapped into the same base model,
whose frozen weights are shared, never copied. Cost: one forward pass without gradient per training step, plus
the reference's output layer on the response tokens.

The reference logits are ``lm_head(decoder(x))``: a model whose causal LM applies anything after its output layer
(Gemma 2's soft-capping, Cohere's logit scale) is refused at the start of training, when a four-token check finds
its logits differ from that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from hft_kernels import linear_kl_div
from hft_lightning.data.sft import IGNORE_INDEX
from hft_lightning.errors import ConfigError
from hft_lightning.retention.base import RetentionCallback
from hft_lightning.retention.contracts import HasCausalLM
from hft_lightning.retention.parameters import on_parameters, trainable
from hft_lightning.sharding import computing_with, gathered, is_sharded


class KLAnchor(RetentionCallback):
    """Adds ``beta * KL(p_ref || p_theta)`` per response token, ``p_ref`` the model at the last stage end.

    Args:
        beta: Weight of the KL term (>= 0; 0 trains exactly as plain SFT). Its effective value is
            ``beta * strength_scale`` (:meth:`~RetentionCallback.strengthen`).
        chunk_size: Response tokens per chunk of the KL (> 0): the reference's logits exist for that many tokens
            at a time, about four ``[chunk_size, vocab]`` fp32 tensors.

    Example::

        trainer = Trainer(callbacks=[Curriculum(), KLAnchor(beta=1.0), Report()])
    """

    works_sharded = True

    def __init__(self, beta: float = 1.0, chunk_size: int = 512):
        if not beta >= 0:
            raise ConfigError(f"KLAnchor(beta={beta}): beta must be >= 0")
        if chunk_size <= 0:
            raise ConfigError(f"KLAnchor(chunk_size={chunk_size}): chunk_size must be > 0")
        super().__init__(beta=beta)  # the chunk size changes how the term is computed, not the state or the value
        self.beta = beta
        self.chunk_size = chunk_size
        self.reference: dict[str, torch.Tensor] = {}
        self._split: _Split | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.require("module", pl_module, HasCausalLM)

    @override
    def consolidate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage_index: int) -> None:
        self.reference = {name: p.detach().float().clone() for name, p in trainable(pl_module).items()}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = trainable(pl_module)
        if self.reference:
            self.reference = on_parameters("KLAnchor reference", self.reference, params)
        self._split = _Split.of(pl_module.causal_lm, params)

    @override
    def loss_term(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        inputs: dict[str, torch.Tensor],
        logits: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor | None:
        weight = self.beta * self.strength_scale
        if not self.reference or weight == 0:
            return None
        rows = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # [N] response positions (a host sync)
        with self._split.reference(self.reference) as (decoder, head_weight, head_bias):
            hidden = decoder(inputs).flatten(0, 1).index_select(0, rows)  # [N, H]
            summed = linear_kl_div(
                logits.flatten(0, 1), hidden, head_weight, head_bias, rows=rows, chunk_size=self.chunk_size
            )
        kl = summed / max(rows.numel(), 1)
        pl_module.log("retention/kl", kl.detach())
        return weight * kl

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reference": gathered(self.reference)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict["reference"]


_Decoder = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""A decoder's forward pass: the inputs a causal LM takes -> last hidden states ``[R, L, H]``."""


@dataclass
class _Split:
    """The causal LM as decoder + output layer, and which trainable parameter (by name) each of their tensors is."""

    causal_lm: nn.Module
    decoder: nn.Module
    head: nn.Linear
    params: dict[str, nn.Parameter]  # the trainable parameters, by their name in the trained module
    decoder_names: dict[str, str]  # the decoder's own parameter name -> the trainable parameter's name
    head_names: dict[str, str]  # "weight" / "bias" -> the trainable parameter's name, where the head is trained
    sharded: bool  # FSDP2 (ModelParallelStrategy) has sharded the causal LM

    @classmethod
    def of(cls, causal_lm: nn.Module, params: dict[str, nn.Parameter]) -> _Split:
        """Splits ``causal_lm`` and checks that the reference built from its own weights gives its logits.

        Raises:
            ConfigError: If the output layer is not a ``torch.nn.Linear``, a trainable parameter is in neither
                part, or the model's logits are more than its output layer's (soft-capping, scaling).
        """
        name = type(causal_lm).__name__
        decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"KLAnchor needs an output layer that is a torch.nn.Linear; {name} has {type(head)}")
        by_id = {id(p): n for n, p in params.items()}

        def names(module: nn.Module) -> dict[str, str]:
            found = module.named_parameters(remove_duplicate=False)
            return {own: by_id[id(p)] for own, p in found if id(p) in by_id}

        split = cls(causal_lm, decoder, head, params, names(decoder), names(head), is_sharded(causal_lm))
        outside = sorted(set(params) - set(split.decoder_names.values()) - set(split.head_names.values()))
        if outside:
            raise ConfigError(f"KLAnchor: trainable parameters outside {name}'s decoder and output layer: {outside}")
        ids = torch.arange(min(4, head.out_features), device=head.weight.device)[None]
        with torch.no_grad(), _eval_mode(causal_lm):
            logits = causal_lm(input_ids=ids, use_cache=False).logits
            with split.reference({n: p.detach() for n, p in params.items()}) as (run_decoder, weight, bias):
                rebuilt = nn.functional.linear(run_decoder({"input_ids": ids}), weight, bias)
        if not torch.allclose(logits, rebuilt, rtol=1e-4, atol=1e-5):
            raise ConfigError(
                f"KLAnchor computes the reference's logits as its output layer applied to its decoder's last hidden "
                f"state, but {name} transforms its logits after the output layer (soft-capping or scaling)"
            )
        return split

    @contextmanager
    def reference(
        self, snapshot: dict[str, torch.Tensor]
    ) -> Iterator[tuple[_Decoder, torch.Tensor, torch.Tensor | None]]:
        """The model with ``snapshot`` as its trainable weights, for the duration: decoder, output layer ``(W, b)``.

        The decoder runs without gradient, in eval mode. Unsharded, each of its calls swaps the snapshot in with
        ``functional_call``, and the output layer is the snapshot's where it trains, the model's where it is frozen.
        Under FSDP2 the snapshot sits in the shards for the duration (:func:`~hft_lightning.sharding.computing_with`)
        and the output layer is the gathered one.
        """
        if self.sharded:
            with computing_with(self.causal_lm, self.params, snapshot):
                yield (lambda inputs: self._hidden(inputs, None)), self.head.weight, self.head.bias
            return
        decoder_parameters = self._decoder_parameters(snapshot)
        yield (lambda inputs: self._hidden(inputs, decoder_parameters)), *self._head_parameters(snapshot)

    @torch.no_grad()
    def _hidden(self, inputs: dict[str, torch.Tensor], parameters: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """The decoder's last hidden states for ``inputs``, with ``parameters`` swapped in (``None``: its own)."""
        kwargs = {**inputs, "use_cache": False}
        with _eval_mode(self.decoder):
            if parameters is None:
                return self.decoder(**kwargs).last_hidden_state
            return torch.func.functional_call(self.decoder, parameters, args=(), kwargs=kwargs).last_hidden_state

    def _decoder_parameters(self, snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The snapshot's tensors under the decoder's own names, in the dtype of the parameters they replace."""
        own = dict(self.decoder.named_parameters(remove_duplicate=False))
        return {n: _like(own[n], snapshot[full]) for n, full in self.decoder_names.items()}

    def _head_parameters(self, snapshot: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output layer ``(weight, bias)``: the snapshot's where the layer trains, else the layer's."""
        weight, bias = self.head.weight, self.head.bias
        if "weight" in self.head_names:
            weight = _like(weight, snapshot[self.head_names["weight"]])
        if bias is not None and "bias" in self.head_names:
            bias = _like(bias, snapshot[self.head_names["bias"]])
        return weight, bias


def _like(param: torch.Tensor, snapshot: torch.Tensor) -> torch.Tensor:
    """``snapshot`` (fp32) in ``param``'s dtype: a copy only when the model's weights are not fp32 (bf16-true)."""
    return snapshot if snapshot.dtype == param.dtype else snapshot.to(param.dtype)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (no dropout, no random draws) for the duration; each submodule's mode restored."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
