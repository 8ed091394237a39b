"""The LightningModule of a Hierarchical Fine-Tuning run.

A causal LM is trained on masked SFT batches and evaluated by generation on every ability. The model is any
``AutoModelForCausalLM`` checkpoint (``name_or_path``, loaded in fp32: mixed precision keeps fp32 master weights),
optionally with LoRA adapters (:class:`~hft_lightning.lora.LoRA`), or the embedded default: a tiny LLaMA-style
model built from a config, trained from scratch.

Evaluation runs greedy batched generation (KV cache) on each ability's validation split and scores it
with that ability's scorer; an ability scored by an lm-evaluation-harness task is scored on the whole model instead,
when the scores are computed (:meth:`HFTModule.compute_scores`: on global rank 0, the score broadcast to every
process). The scores of the validation that is ending are computed once, by whoever asks first
(:meth:`HFTModule.validation_scores`): Lightning runs a callback's ``on_validation_epoch_end`` before the module's.
The module is the model, its loss, generation and these scores: the accuracy matrix, the row before training,
the report and the exported model belong to :class:`~hft_lightning.callbacks.Report`.

The training loss is the SFT loss plus the loss terms pushed to the module (:meth:`HFTModule.add_loss_term`, by a
retention callback in its ``setup``): each training step runs the model once and hands every term the inputs it
fed the model, its logits and the targets. With no term, a step is exactly the SFT step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from typing_extensions import override

from hft_lightning.checks import refuse_sharded
from hft_lightning.data.packing import pack_batch
from hft_lightning.data.sft import IGNORE_INDEX, trained_tokens
from hft_lightning.errors import ConfigError
from hft_lightning.export import save_model
from hft_lightning.lora import LoRA
from hft_lightning.metrics.ability_score import AbilityScore
from hft_lightning.plan import Plan, require_plan
from hft_lightning.schedule import StageSchedule
from hft_lightning.scoring import ModelScorer
from hft_lightning.sharding import full_state_dict, is_sharded, shard_model

if TYPE_CHECKING:
    from hft_lightning.retention.contracts import LossTerm

CHECKPOINT_FORMAT = 2
"""Layout of what the module and the callbacks keep in a checkpoint: raise it whenever a state's layout changes."""


class HFTModule(pl.LightningModule):
    """A causal LM fine-tuned stage by stage: a pretrained checkpoint, or a small LLaMA-style model from a config.

    Args:
        tokenizer: Tokenizer with a chat template (linked from ``data.tokenizer`` by the CLI).
        name_or_path: A Hugging Face Hub name or a local ``save_pretrained`` folder of any causal LM; the CLI loads
            its tokenizer into the data module. ``None``: the embedded tiny model, shaped by the arguments below.
        lora: Train LoRA adapters instead of every weight (needs ``name_or_path`` and peft).
        hidden_size: Width of the embedded model's transformer.
        num_layers: Number of the embedded model's decoder layers.
        num_heads: The embedded model's attention heads (also key/value heads).
        intermediate_size: Width of the embedded model's MLP.
        max_position_embeddings: Longest sequence the embedded model handles.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps at the start of every stage, constant afterwards
            (:class:`~hft_lightning.schedule.StageSchedule`).
        max_new_tokens: Generation budget per validation response.
        packing: Tokens per row when each batch's examples are packed end to end before the forward pass,
            attention kept within each example (:mod:`~hft_lightning.data.packing`): the same examples, tokens and
            loss in fewer, longer rows. ``None``: one padded row per example.

    Example::

        from hft_lightning import StagedDataModule
        module = HFTModule(StagedDataModule(num_train=100, num_val=8).tokenizer, hidden_size=64, num_layers=1)
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        name_or_path: str | None = None,
        lora: LoRA | None = None,
        hidden_size: int = 192,
        num_layers: int = 3,
        num_heads: int = 4,
        intermediate_size: int = 512,
        max_position_embeddings: int = 256,
        learning_rate: float = 3e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        max_new_tokens: int = 48,
        packing: int | None = None,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"model.hidden_size={hidden_size} must be divisible by model.num_heads={num_heads}")
        for name, value in {"num_layers": num_layers, "intermediate_size": intermediate_size,
                            "learning_rate": learning_rate, "max_new_tokens": max_new_tokens}.items():  # fmt: skip
            if value <= 0:
                raise ConfigError(f"model.{name} must be positive, got {value}")
        if warmup_steps < 0 or weight_decay < 0:
            raise ConfigError(
                f"model.warmup_steps and model.weight_decay must be >= 0, got {warmup_steps} and {weight_decay}"
            )
        if packing is not None and packing <= 0:
            raise ConfigError(f"model.packing must be a positive number of tokens per row (or null), got {packing}")
        if lora is not None and name_or_path is None:
            raise ConfigError("model.lora adapts a pretrained model: set model.name_or_path too")
        if name_or_path is not None and Path(name_or_path).is_dir():
            # a local folder (which from_pretrained prefers over a hub name) is recorded as an absolute path, in the
            # hyperparameters and in a saved adapter's config, so both load from any working directory
            name_or_path = str(Path(name_or_path).resolve())
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.lora = lora
        self.packing = packing
        if name_or_path is None:
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                num_key_value_heads=num_heads,
                intermediate_size=intermediate_size,
                max_position_embeddings=max_position_embeddings,
                tie_word_embeddings=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None,
            )
            model = LlamaForCausalLM(config)
        else:
            model = _load_pretrained(name_or_path, tokenizer)
        # Generation stops at the tokenizer's end of sequence and at the checkpoint's own stop tokens (an
        # instruct model's end of turn). Evaluation decodes greedily; the saved model keeps its own config.
        stop = model.generation_config.eos_token_id
        stop = [] if stop is None else [stop] if isinstance(stop, int) else list(stop)
        self.generation_config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=list(dict.fromkeys([tokenizer.eos_token_id, *stop])),
        )
        self.model = model if lora is None else lora.wrap(model)
        self.val_ability_names: list[str] = []
        self.scored_names: list[str] = []
        self.ability_scores = nn.ModuleDict()
        self.evaluators: dict[str, ModelScorer] = {}
        self._validation_scores: torch.Tensor | None = None
        self.plan: Plan | None = None
        self.loss_terms: list[LossTerm] = []

    def set_plan(self, plan: Plan) -> None:
        """Follows ``plan`` (pushed by the curriculum): the learning-rate schedule restarts at each of its stages."""
        self.plan = plan

    @override
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        self.val_ability_names = datamodule.val_ability_names
        # An ability with neither scorer nor evaluator (validation loss only) is left out of the scores and the
        # accuracy matrix.
        scored = [a for a in datamodule.abilities if a.scored]
        self.scored_names = [a.name for a in scored]
        self.ability_scores = nn.ModuleDict({a.name: AbilityScore(a.scorer) for a in scored if a.scorer is not None})
        self.evaluators = {a.name: a.evaluator for a in scored if a.evaluator is not None}
        if self.evaluators:
            names = ", ".join(f"data.abilities[{name!r}].lm_eval" for name in self.evaluators)
            refuse_sharded(self.trainer, names, "the harness runs the whole model on global rank 0")

    @override
    def configure_model(self) -> None:
        """Shards the model over the processes (FSDP2, :mod:`~hft_lightning.sharding`) under ``ModelParallelStrategy``.

        Raises:
            ConfigError: If the strategy asks for tensor parallelism, or the model cannot be sharded.
        """
        # load_from_checkpoint calls this hook with no trainer attached: nothing to shard over then
        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        if is_sharded(self.model):
            return
        mesh = self.device_mesh
        if mesh["tensor_parallel"].size() > 1:
            raise ConfigError(
                f"trainer.strategy: ModelParallelStrategy(tensor_parallel_size={mesh['tensor_parallel'].size()}) "
                "asks for tensor parallelism; hft_lightning shards with FSDP2 only: set tensor_parallel_size: 1"
            )
        shard_model(self.model, self.causal_lm, mesh["data_parallel"], self.trainer.precision)

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The transformers causal LM: :attr:`model`, or under LoRA the model peft injected its adapters into."""
        return self.model.get_base_model() if self.lora is not None else self.model

    def add_loss_term(self, term: LossTerm) -> None:
        """Adds ``term``'s value to the loss of every later training step (once, however often it is added).

        Retention callbacks that add a term push themselves here in their ``setup``
        (:meth:`~hft_lightning.retention.RetentionCallback.loss_term`); terms are added in the order they came.
        """
        if not any(t is term for t in self.loss_terms):
            self.loss_terms.append(term)

    def remove_loss_term(self, term: LossTerm) -> None:
        """Stops adding ``term`` (its callback's ``teardown``)."""
        self.loss_terms = [t for t in self.loss_terms if t is not term]

    def forward_logits(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Runs the model on a batch, packed first if :attr:`packing` is set.

        Returns:
            ``(inputs, logits, targets)``: what the model was fed (``input_ids`` and ``attention_mask``, or after
            packing ``input_ids`` and ``position_ids``, shape ``[R, L]``), its logits in fp32 (``[R, L, V]``,
            the causal LM loss's precision whatever the model's), and the token each position predicts
            (``[R, L]``, labels shifted by one, ``-100`` where nothing is trained).
        """
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
        if self.packing is not None:
            inputs = pack_batch(inputs, self.tokenizer.pad_token_id, self.packing)
        labels = inputs.pop("labels")
        logits = self.model(**inputs, use_cache=False).logits.float()
        targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # token t predicts token t + 1
        return inputs, logits, targets

    def sft_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean cross-entropy over the batch's response tokens (the loss every stage trains and retention protects).

        The loss is computed here, from the logits, as transformers' causal LM loss does (fp32 logits, labels shifted
        by one, ``-100`` ignored), for any model class, and divided by at least one token: a batch whose examples
        were all truncated before their response has a loss of 0 and zero gradients, not NaN.
        """
        _, logits, targets = self.forward_logits(batch)
        return mean_cross_entropy(logits, targets)

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The SFT loss (logged as ``train/loss``) plus every loss term's value, from one forward pass."""
        inputs, logits, targets = self.forward_logits(batch)
        loss = mean_cross_entropy(logits, targets)
        self.log("train/loss", loss, prog_bar=True)
        for term in self.loss_terms:
            value = term.loss_term(self.trainer, self, inputs, logits, targets)
            if value is not None:
                loss = loss + value
        return loss

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_attention_mask: torch.Tensor) -> list[str]:
        """Greedy batched generation from left-padded prompts; returns the decoded responses.

        transformers fills every field a passed ``GenerationConfig`` leaves unset from the model's own one (a
        checkpoint's repetition penalty, n-gram ban, suppressed or forced tokens), so the model carries the greedy
        config for the duration of the call: scores measure plain greedy decoding, whatever the checkpoint ships.
        """
        causal_lm = self.causal_lm
        checkpoint_config = causal_lm.generation_config
        causal_lm.generation_config = self.generation_config
        try:
            output = self.model.generate(
                input_ids=prompt_ids, attention_mask=prompt_attention_mask, generation_config=self.generation_config
            )
        finally:
            causal_lm.generation_config = checkpoint_config
        return self.tokenizer.batch_decode(output[:, prompt_ids.shape[1] :], skip_special_tokens=True)

    def score_batch(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        """Generates responses to a validation batch of dataloader ``dataloader_idx`` and scores them."""
        name = self.val_ability_names[dataloader_idx]
        if name not in self.ability_scores:  # no scorer: followed through its validation loss only
            return
        predictions = self.generate(batch["prompt_ids"], batch["prompt_attention_mask"])
        self.ability_scores[name].update(predictions, batch["examples"])

    def _evaluation_step(self, split: str, batch: dict[str, Any], dataloader_idx: int) -> None:
        name = self.val_ability_names[dataloader_idx]
        loss = self.sft_loss(batch)
        tokens = int(trained_tokens(batch["labels"]))  # weights the mean: the epoch's loss is per response token
        self.log(f"{split}/{name}/loss", loss, add_dataloader_idx=False, batch_size=tokens, sync_dist=True)
        self.score_batch(batch, dataloader_idx)

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step("val", batch, dataloader_idx)

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step("test", batch, dataloader_idx)

    def compute_scores(self) -> torch.Tensor:
        """Scores of every scored ability, shape ``[num_scored]``, in the order of :attr:`scored_names`.

        The generations scored since the last call give each scorer's score (the per-ability metrics are reset);
        each evaluator scores the model as it is now. A collective under DDP.
        """
        evaluated = self._evaluate()
        scores = [
            self.ability_scores[name].compute() if name in self.ability_scores else evaluated[name]
            for name in self.scored_names
        ]
        for metric in self.ability_scores.values():
            metric.reset()
        return torch.stack(scores)

    def _evaluate(self) -> dict[str, torch.Tensor]:
        """Each evaluator's score of the model, measured on global rank 0 and broadcast to every process.

        Evaluation runs in the trainer's precision context (autocast under ``bf16-mixed``), as validation does.
        An evaluator that fails on rank 0 fails every process: its error is broadcast in place of the scores, so no
        process is left waiting at the broadcast.

        Raises:
            RuntimeError: Naming the ability and rank 0's error, on every process.
        """
        if not self.evaluators:
            return {}
        outcome: tuple[dict[str, float], str | None] = ({}, None)
        cause: Exception | None = None
        if self.trainer.is_global_zero:
            name = ""
            try:
                with self.trainer.precision_plugin.val_step_context():
                    scores = {}
                    for name, evaluate in self.evaluators.items():
                        scores[name] = evaluate(self.model, self.tokenizer)
                outcome = (scores, None)
            except Exception as error:  # every process must learn of it, or the others wait at the broadcast
                if self.trainer.world_size == 1:
                    raise
                outcome = ({}, f"data.abilities[{name!r}].lm_eval failed on global rank 0: {error!r}")
                cause = error
        scores, failure = self.trainer.strategy.broadcast(outcome)
        if failure is not None:
            raise RuntimeError(failure) from cause
        return {name: torch.tensor(score, dtype=torch.float32, device=self.device) for name, score in scores.items()}

    def _log_scores(self, split: str, scores: torch.Tensor) -> None:
        for name, score in zip(self.scored_names, scores, strict=True):
            self.log(f"{split}/{name}/score", score, add_dataloader_idx=False, sync_dist=True)

    def validation_scores(self) -> torch.Tensor:
        """Scores of every scored ability in the validation that is ending, computed on the first call of its end.

        A callback (:class:`~hft_lightning.callbacks.Report`) reads them in its ``on_validation_epoch_end``, which
        Lightning runs before the module's; later calls return the same scores until the next validation starts.
        """
        if self._validation_scores is None:
            self._validation_scores = self.compute_scores()
        return self._validation_scores

    @override
    def on_validation_epoch_start(self) -> None:
        self._validation_scores = None

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_scores("val", self.validation_scores())

    @override
    def on_test_epoch_end(self) -> None:
        self._log_scores("test", self.compute_scores())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Saves the fine-tuned model and its tokenizer with transformers' ``save_pretrained``, from global rank 0.

        Under several processes every one must call it: a sharded model's full weights are gathered first.

        Returns:
            The folder (:func:`~hft_lightning.export.save_model`).
        """
        directory = Path(directory)
        state_dict = full_state_dict(self.model) if is_sharded(self.model) else None
        if self.global_rank == 0:
            save_model(directory, self.model, self.tokenizer, self.lora, self.name_or_path, state_dict)
        return directory

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hft_lightning_format"] = CHECKPOINT_FORMAT

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning restores the module before the callbacks: a resume from another layout stops here, before a
        # callback meets keys it does not know.
        if self._trainer is not None and self.trainer.state.fn == "fit":
            check_checkpoint_format(checkpoint)
        # Format 1 kept the accuracy matrix in the module's state (now the Report callback's): weights still load.
        # A distributed (FSDP2) checkpoint has no "state_dict": Lightning loads its weights shard by shard.
        if "state_dict" in checkpoint:
            state = checkpoint["state_dict"]
            checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith("accuracy_matrix.")}

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay, betas=(0.9, 0.95)
        )
        schedule = StageSchedule(require_plan(self.plan, "HFTModule").stage_steps, self.hparams.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the trained targets (not ``-100``) and divided by their number (at least 1).

    Args:
        logits: Shape ``[R, L, V]``, fp32.
        targets: Shape ``[R, L]``.
    """
    summed = nn.functional.cross_entropy(
        logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return summed / (targets != IGNORE_INDEX).sum().clamp(min=1)


def check_checkpoint_format(checkpoint: dict[str, Any]) -> None:
    """Checks that a loaded checkpoint holds the state layout this version resumes (:data:`CHECKPOINT_FORMAT`).

    Raises:
        ConfigError: Naming ``ckpt_path``, the checkpoint's format and this version's.
    """
    found = checkpoint.get("hft_lightning_format")
    if found != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"ckpt_path: the checkpoint holds hft_lightning state in format {found} (None: written before formats "
            f"were numbered); this version resumes format {CHECKPOINT_FORMAT} only. Start the run again; "
            "HFTModule.load_from_checkpoint(path, tokenizer=...) still loads its weights"
        )


def _load_pretrained(name_or_path: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Loads a causal LM in fp32 and checks that its embeddings cover the tokenizer.

    Raises:
        ConfigError: Naming ``model.name_or_path``, if the model cannot be loaded or has fewer embeddings than
            the tokenizer has tokens.
    """
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path).float().train()  # loaded in eval mode
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.name_or_path: cannot load a causal LM from {name_or_path!r}: {error}") from None
    embeddings = model.get_input_embeddings().num_embeddings
    if embeddings < len(tokenizer):
        raise ConfigError(
            f"model.name_or_path: {name_or_path!r} has {embeddings} token embeddings but its tokenizer has "
            f"{len(tokenizer)} tokens; the tokenizer does not belong to this model"
        )
    return model
