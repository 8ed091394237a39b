"""The retention base: argument checks, state keyed by parameter name, state keys, refused strategies."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy

from hft_lightning import Curriculum, Stage
from hft_lightning.errors import ConfigError
from hft_lightning.module import mean_cross_entropy
from hft_lightning.retention import (
    AGEM,
    EWC,
    GEM,
    ForgettingBudget,
    KLAnchor,
    OnlineEWC,
    Replay,
    RetentionCallback,
    WeightAveraging,
    match_names,
    trainable,
)
from tests.helpers import make_trainer, tiny_datamodule, tiny_module
from tests.retention.common import fit


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: EWC(lam=-1.0), "lam"),
        (lambda: EWC(lam=0.0), "lam"),
        (lambda: EWC(fisher_samples=0), "fisher_samples"),
        (lambda: OnlineEWC(gamma=0.0), "gamma"),
        (lambda: OnlineEWC(gamma=1.5), "gamma"),
        (lambda: GEM(memory_size=0), "memory_size"),
        (lambda: GEM(ref_every=0), "ref_every"),
        (lambda: AGEM(memory_size=0), "memory_size"),
        (lambda: AGEM(batch_size=-2), "batch_size"),
        (lambda: AGEM(ref_every=0), "ref_every"),
        (lambda: Replay(memory_size=0), "memory_size"),
        (lambda: Replay(ratio=1.0), "ratio"),
        (lambda: KLAnchor(beta=-1.0), "beta"),
        (lambda: KLAnchor(beta=float("nan")), "beta"),
        (lambda: KLAnchor(chunk_size=0), "chunk_size"),
        (lambda: ForgettingBudget(tau=-1.0), "tau"),
        (lambda: ForgettingBudget(policy="retry"), "policy"),
        (lambda: Replay(share=0.0), "share"),
        (lambda: Replay(share=1.0), "share"),
        (lambda: WeightAveraging(alphas=()), "alphas"),
        (lambda: WeightAveraging(alphas=(0.5, 1.5)), "alphas"),
        (lambda: WeightAveraging(alphas=(-0.1,)), "alphas"),
        (lambda: WeightAveraging(probe_examples=0), "probe_examples"),
    ],
)
def test_bad_arguments_fail_in_init_naming_the_argument(make, argument):
    with pytest.raises(ConfigError, match=rf"\({argument}="):
        make()


def test_kl_anchor_arguments_name_the_allowed_values():
    with pytest.raises(ConfigError, match=r"^KLAnchor\(beta=-1.0\): beta must be >= 0$"):
        KLAnchor(beta=-1.0)
    with pytest.raises(ConfigError, match=r"^KLAnchor\(chunk_size=-3\): chunk_size must be > 0$"):
        KLAnchor(chunk_size=-3)
    assert KLAnchor(beta=0.0).beta == 0.0  # allowed: exactly plain SFT


def test_replay_takes_a_ratio_or_a_share_not_both():
    with pytest.raises(ConfigError, match=r"Replay\(ratio=0\.5, share=0\.1\): give ratio .* or share .*, not both"):
        Replay(ratio=0.5, share=0.1)
    assert Replay().ratio == 0.25 and Replay(share=0.1).ratio is None
    assert Replay().state_key == "Replay{'memory_size': 256, 'ratio': 0.25}"  # as before `share`: checkpoints load


def test_state_keys_separate_instances_with_different_arguments():
    assert EWC(lam=1.0).state_key != EWC(lam=2.0).state_key
    assert KLAnchor(beta=1.0).state_key != KLAnchor(beta=2.0).state_key
    assert EWC(lam=1.0).state_key == EWC(lam=1.0).state_key
    assert GEM().state_key != AGEM().state_key


def test_state_is_keyed_by_name_and_checked_on_load(tmp_path):
    ewc = EWC(lam=10.0, fisher_samples=2)
    module, _ = fit(tmp_path, [ewc])
    params = trainable(module)
    shuffled = {name: params[name] for name in reversed(list(params))}
    restored = EWC(lam=10.0, fisher_samples=2)
    restored.load_state_dict(ewc.state_dict())
    for state in restored.consolidated:
        match_names("EWC fisher", state["fisher"], shuffled)  # order does not matter
    renamed = {("renamed." + n if i == 0 else n): p for i, (n, p) in enumerate(params.items())}
    with pytest.raises(ConfigError, match=r"missing \['renamed\.model.*unexpected \['model\."):
        match_names("EWC fisher", restored.consolidated[0]["fisher"], renamed)


def test_only_trainable_parameters_are_protected(tmp_path):
    module = tiny_module(tiny_datamodule())
    module.model.model.embed_tokens.weight.requires_grad_(False)
    names = trainable(module)
    assert "model.model.embed_tokens.weight" not in names
    assert len(names) == sum(1 for p in module.parameters() if p.requires_grad)


def test_a_method_not_declared_to_work_sharded_is_refused_under_fsdp2():
    class Unsharded(RetentionCallback):
        pass

    trainer = SimpleNamespace(strategy=ModelParallelStrategy())
    with pytest.raises(ConfigError, match=r"Unsharded does not support trainer.strategy=ModelParallelStrategy"):
        Unsharded().setup(trainer, torch.nn.Module(), "fit")
    for built_in in (Replay(), WeightAveraging(), EWC(), OnlineEWC(), GEM(), AGEM(), KLAnchor(), ForgettingBudget()):
        built_in.setup(trainer, torch.nn.Module(), "validate")  # refused before any stage check, or not at all


def test_retention_must_come_after_the_curriculum(tmp_path):
    curriculum = Curriculum()
    trainer = make_trainer(tmp_path, [Replay(), curriculum])
    with pytest.raises(ConfigError, match="Curriculum before Replay"):
        curriculum.setup(trainer, torch.nn.Module(), "fit")


class _RecordingRetention(RetentionCallback):
    """Records the gradients it is given and the weights, then adds 1 to every gradient."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def edit_gradients(self, trainer, pl_module, params):
        grads = {name: p.grad.clone() for name, p in params.items()}
        self.events.append(("edit", grads, {name: p.detach().clone() for name, p in params.items()}))
        for p in params.values():
            p.grad.add_(1.0)


class _Batches(Callback):
    def __init__(self, events):
        self.events = events

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.events.append(("batch", {k: batch[k].clone() for k in ("input_ids", "attention_mask", "labels")}))


def test_the_gradient_edit_runs_once_per_optimizer_step_on_the_accumulated_gradient_before_clipping(tmp_path):
    events, clip_val = [], 0.5
    data = tiny_datamodule()
    module = tiny_module(data)

    def record_clipping(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        type(module).configure_gradient_clipping(module, optimizer, gradient_clip_val, gradient_clip_algorithm)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))
        events.append(("clip", grads, norm))

    module.configure_gradient_clipping = record_clipping
    callbacks = [Curriculum([Stage("math", 3, {"math": 1.0})]), _Batches(events), _RecordingRetention(events)]
    trainer = make_trainer(tmp_path, callbacks, accumulate_grad_batches=2, gradient_clip_val=clip_val)
    trainer.fit(module, datamodule=data)
    assert [kind for kind, *_ in events] == ["batch", "batch", "edit", "clip"] * 3
    for step in range(3):
        (_, first), (_, second), (_, accumulated, weights), (_, clipped, norm) = events[4 * step : 4 * step + 4]
        # the edit sees the mean of the two micro-batches' loss gradients, computed here independently
        leaves = {name.removeprefix("model."): w.clone().requires_grad_() for name, w in weights.items()}
        losses = [torch.func.functional_call(module.model, leaves, args=(), kwargs=b).loss for b in (first, second)]
        expected = torch.autograd.grad(sum(losses) / 2, list(leaves.values()))
        for (name, grad), oracle in zip(accumulated.items(), expected, strict=True):
            torch.testing.assert_close(grad, oracle, rtol=1e-4, atol=1e-6, msg=name)
        # clipping sees the edited gradient, once edited, and brings it down to the clipping norm
        for name, grad in accumulated.items():
            torch.testing.assert_close(clipped[name], grad + 1.0, rtol=0, atol=0)
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in clipped.values()])) > 10 * clip_val
        torch.testing.assert_close(norm, torch.tensor(clip_val), rtol=1e-4, atol=0)


def test_retention_names_what_it_needs_from_the_datamodule_and_the_module(tiny_data):
    partial = SimpleNamespace(seed=0, tokenizer=tiny_data.tokenizer)
    message = r"EWC needs a datamodule that provides StageData; SimpleNamespace has no stage_stream, collate$"
    with pytest.raises(ConfigError, match=message):
        EWC().setup(SimpleNamespace(strategy=None, datamodule=partial), tiny_module(tiny_data), "fit")
    with pytest.raises(ConfigError, match=r"EWC needs a module that provides HasLoss; Module has no sft_loss$"):
        EWC().setup(SimpleNamespace(strategy=None, datamodule=tiny_data), torch.nn.Module(), "fit")
    EWC().setup(SimpleNamespace(strategy=None, datamodule=tiny_data), tiny_module(tiny_data), "fit")
    no_terms = SimpleNamespace(sft_loss=None)
    message = r"_RecordingTerm needs a module that provides TakesLossTerms; SimpleNamespace has no add_loss_term, "
    with pytest.raises(ConfigError, match=message + "remove_loss_term$"):
        _RecordingTerm([]).setup(SimpleNamespace(strategy=None, datamodule=tiny_data), no_terms, "fit")


class _RecordingTerm(RetentionCallback):
    """A loss term of 0.5 * the SFT loss and a gradient edit, each recording when it runs."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def loss_term(self, trainer, pl_module, inputs, logits, targets):
        term = 0.5 * mean_cross_entropy(logits, targets)
        self.events.append(("term", float(term.detach())))
        return term

    def edit_gradients(self, trainer, pl_module, params):
        self.events.append(("edit", None))


class _Backward(Callback):
    def __init__(self, events):
        self.events = events

    def on_before_backward(self, trainer, pl_module, loss):
        self.events.append(("backward", float(loss.detach())))


def test_loss_terms_run_in_every_micro_batch_before_backward_and_edits_once_after_accumulation(tmp_path):
    events = []
    data = tiny_datamodule()
    module = tiny_module(data)

    def record_clipping(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        events.append(("clip", None))

    module.configure_gradient_clipping = record_clipping
    callbacks = [Curriculum([Stage("math", 2, {"math": 1.0})]), _Backward(events), _RecordingTerm(events)]
    trainer = make_trainer(tmp_path, callbacks, accumulate_grad_batches=2, gradient_clip_val=1.0)
    trainer.fit(module, datamodule=data)
    assert [kind for kind, _ in events] == ["term", "backward", "term", "backward", "edit", "clip"] * 2
    assert module.loss_terms == []  # the term is taken off the module when fit ends
    for (_, term), (_, loss) in zip(events[0::6] + events[2::6], events[1::6] + events[3::6], strict=True):
        torch.testing.assert_close(loss, 3 * term / 2, rtol=1e-5, atol=0)  # (SFT + 0.5 SFT) / 2 micro-batches
