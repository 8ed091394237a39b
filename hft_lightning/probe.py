"""Measurements of the model on a small, fixed, held-out sample of each ability.

A measured planner sees each ability through a :class:`Probe` before training: the validation loss per response
token (how hard the ability is for the base model) and the gradient of that loss (where training on it would move
the weights). Retention sees abilities through it during training: the score of greedy generations under the
ability's scorer (:meth:`Probe.score`), as validation scores them. The sample of an ability is its first
``examples`` validation examples in an order drawn with ``derive_seed(data.seed, "probe", ability)``, so the same
model gives the same measurements on every run, and a larger sample contains a smaller one; nothing draws from the
global random state, so training after a probe is the same as without it. Every measurement runs in eval mode;
losses and scores under ``torch.no_grad``, gradients through ``torch.autograd.grad``, so ``p.grad`` is never touched
(the same quantity as :func:`hft_lightning.retention.gradients.loss_gradient`, on held-out examples, with no trainer
needed, which lets ``fit --plan_only`` measure before any trainer is attached).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch

from hft_lightning.data.sft import trained_tokens
from hft_lightning.errors import ConfigError
from hft_lightning.seeds import derive_seed


class Probe:
    """Measures the model on held-out examples of each ability.

    Args:
        module: The :class:`~hft_lightning.HFTModule` (its ``sft_loss``), on the device to measure on.
        datamodule: The :class:`~hft_lightning.StagedDataModule` (its validation splits and ``seed``).
        context: Entered around every forward pass: the trainer's precision context (autocast under
            ``bf16-mixed``); none by default.

    Attributes:
        examples_used: Examples measured so far (an example measured twice counts twice): the probe's cost.

    Example::

        probe = Probe(module, data)
        probe.loss("math", examples=32, batch_size=8)  # nats per response token
    """

    def __init__(
        self,
        module: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.module = module
        self.datamodule = datamodule
        self.context = context
        self.examples_used = 0

    def batches(self, ability: str, examples: int, batch_size: int) -> Iterator[dict[str, Any]]:
        """Batches of a seeded sample of ``examples`` validation examples of ``ability``, on the module's device."""
        loader = self.datamodule.val_dataloader()[self.datamodule.val_ability_names.index(ability)]
        generator = torch.Generator().manual_seed(derive_seed(self.datamodule.seed, "probe", ability))
        sample = torch.randperm(len(loader.dataset), generator=generator)[:examples].tolist()
        for start in range(0, len(sample), batch_size):
            batch = loader.collate_fn([loader.dataset[i] for i in sample[start : start + batch_size]])
            self.examples_used += len(batch["input_ids"])
            yield self.module.transfer_batch_to_device(batch, self.module.device, 0)

    @torch.no_grad()
    def loss(self, ability: str, examples: int, batch_size: int) -> float:
        """The model's mean cross-entropy per response token on the sample of ``ability``, in nats.

        Raises:
            ConfigError: If no example of the sample keeps a response token (all truncated), naming the ability.
        """
        total, tokens, measured = 0.0, 0, 0
        with self._eval_mode():
            for batch in self.batches(ability, examples, batch_size):
                count = int(trained_tokens(batch["labels"]))
                with self.context():
                    total += float(self.module.sft_loss(batch)) * count
                tokens += count
                measured += len(batch["input_ids"])
        self._require_tokens(ability, tokens, measured)
        return total / tokens

    @torch.no_grad()
    def score(self, ability: str, examples: int, batch_size: int) -> float:
        """Share of the sample of ``ability`` whose greedy generation its scorer judges correct, in [0, 1].

        Every process scores the whole sample (no collective), so under DDP every rank gets the same score.

        Raises:
            ConfigError: If ``ability`` has no scorer (it is followed through its validation loss only).
        """
        scorer = self.datamodule.abilities[self.datamodule.ability_names.index(ability)].scorer
        if scorer is None:
            raise ConfigError(f"data.abilities[{ability!r}] has scorer 'none': it cannot be probed by its score")
        verdicts: list[bool] = []
        with self._eval_mode():
            for batch in self.batches(ability, examples, batch_size):
                with self.context():
                    predictions = self.module.generate(batch["prompt_ids"], batch["prompt_attention_mask"])
                verdicts.extend(scorer(predictions, batch["examples"]))
        return sum(verdicts) / max(len(verdicts), 1)

    def gradient(self, ability: str, examples: int, batch_size: int) -> list[torch.Tensor]:
        """The gradient of the loss on the sample of ``ability``, fp32, one tensor per trainable parameter.

        Each batch's mean-token loss gradient is weighted by its share of the examples.

        Raises:
            ConfigError: If no example of the sample keeps a response token (all truncated), naming the ability.
        """
        params = [p for p in self.module.parameters() if p.requires_grad]
        total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        count, tokens = 0, 0
        with self._eval_mode():
            for batch in self.batches(ability, examples, batch_size):
                with torch.enable_grad(), self.context():
                    loss = self.module.sft_loss(batch)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                size = len(batch["input_ids"])
                for acc, grad in zip(total, grads, strict=True):
                    if grad is not None:
                        acc.add_(grad.float(), alpha=size)
                count += size
                tokens += int(trained_tokens(batch["labels"]))
        self._require_tokens(ability, tokens, count)
        torch._foreach_div_(total, count)
        return total

    def _require_tokens(self, ability: str, tokens: int, examples: int) -> None:
        if not tokens:
            raise ConfigError(
                f"data.abilities[{ability!r}].val: none of the {examples} probe examples keeps a response token within "
                f"data.max_length={self.datamodule.max_length}; raise data.max_length"
            )

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        training = self.module.training
        self.module.eval()
        try:
            yield
        finally:
            self.module.train(training)
