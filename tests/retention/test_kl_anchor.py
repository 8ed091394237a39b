"""KLAnchor: the term equals the one-shot KL to the reference model, composes with gradient edits in the
documented order, is exactly plain SFT at beta = 0, and under LoRA swaps adapter snapshots into the shared base."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn import functional as F

from hft_lightning import Stage
from hft_lightning.errors import ConfigError
from hft_lightning.lora import LoRA
from hft_lightning.module import mean_cross_entropy
from hft_lightning.retention import EWC, KLAnchor, trainable
from hft_lightning.retention.kl_anchor import _Split
from tests.helpers import tiny_module
from tests.retention.common import GradientProbe, fit
from tests.test_export import fit_tiny

SHORT = [Stage("math", 2, {"math": 1.0}), Stage("code", 3, {"code": 1.0})]
QUICK = {"max_new_tokens": 2}  # validation generates two tokens: the scores do not matter here


def _own(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors keyed by the module's names (``model.…``) keyed by the names inside ``module.model``."""
    return {name.removeprefix("model."): t for name, t in named.items()}


def _oracle_kl(module, reference, inputs, logits, targets) -> torch.Tensor:
    """Mean over response tokens of KL(p_ref || p), p_ref from a full forward of the model holding ``reference``.

    Independent of the code under test: the whole causal LM (not decoder + head), all logits at once, ``kl_div``.
    """
    module.eval()
    with torch.no_grad():
        ref_logits = torch.func.functional_call(module.model, _own(reference), kwargs={**inputs, "use_cache": False})
    module.train()
    mask = targets != -100
    log_p = torch.log_softmax(logits[mask].float(), -1)
    log_ref = torch.log_softmax(ref_logits.logits[mask].float(), -1)
    return F.kl_div(log_p, log_ref, reduction="sum", log_target=True) / mask.sum()


def _term(anchor, module, inputs, logits, targets, logged=None):
    """``anchor``'s loss term outside a training step: what it logs goes to ``logged``."""
    module.log = lambda name, value, **kwargs: (logged if logged is not None else {}).update({name: value})
    return anchor.loss_term(None, module, inputs, logits, targets)


def _perturbed(module, scale=0.05, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: p.detach().float() + scale * torch.randn(p.shape, generator=gen) for n, p in trainable(module).items()}


@pytest.mark.parametrize("packing", [None, 48], ids=["padded", "packed"])
def test_term_and_gradient_equal_the_one_shot_kl_to_the_reference_model(tiny_data, packing):
    module = tiny_module(tiny_data, packing=packing)
    anchor = KLAnchor(beta=0.7, chunk_size=5)
    anchor.reference = _perturbed(module)
    anchor.on_train_start(None, module)
    anchor.strengthen(2.0)  # the effective weight is beta * strength_scale
    inputs, logits, targets = module.forward_logits(tiny_data.collate([("math", i) for i in range(3)]))
    logged = {}
    term = _term(anchor, module, inputs, logits, targets, logged)
    oracle = 1.4 * _oracle_kl(module, anchor.reference, inputs, logits, targets)
    torch.testing.assert_close(logged["retention/kl"], oracle / 1.4)  # logged: the KL itself, unweighted
    assert oracle > 1e-3  # the perturbation is large enough to mean something
    torch.testing.assert_close(term, oracle, rtol=1e-5, atol=1e-7)
    params = list(trainable(module).values())
    grads = torch.autograd.grad(term, params, retain_graph=True)
    expected = torch.autograd.grad(oracle, params)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-8)


def test_beta_zero_trains_exactly_as_plain_sft(tmp_path):
    plain, _ = fit(tmp_path / "plain", [], stages=SHORT, module_overrides=QUICK)
    anchored, _ = fit(tmp_path / "anchored", [KLAnchor(beta=0.0)], stages=SHORT, module_overrides=QUICK)
    for (name, a), b in zip(plain.state_dict().items(), anchored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class _Batches(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: batch[k].clone() for k in ("input_ids", "attention_mask", "labels")})


def test_kl_anchor_and_ewc_compose_loss_term_first_then_gradient_edit(tmp_path):
    """EWC's edit acts on the gradient of SFT + beta * KL: both checked at the last step against autograd."""
    beta, lam = 3.0, 1e4
    anchor, ewc = KLAnchor(beta=beta, chunk_size=16), EWC(lam=lam, fisher_samples=3)
    batches, before, after = _Batches(), GradientProbe(), GradientProbe()
    module, trainer = fit(tmp_path, [batches, before, anchor, ewc, after], stages=SHORT, module_overrides=QUICK)
    assert trainer.callback_metrics["retention/kl"] > 1e-5
    weights = {n: w.clone().requires_grad_() for n, w in before.weights[-1].items()}
    batch = batches.batches[-1]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    logits = torch.func.functional_call(module.model, _own(weights), kwargs=inputs).logits.float()
    targets = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    objective = mean_cross_entropy(logits, targets) + beta * _oracle_kl(
        module, anchor.reference, {k: v for k, v in inputs.items() if k != "use_cache"}, logits, targets
    )
    expected = dict(zip(weights, torch.autograd.grad(objective, list(weights.values())), strict=True))
    largest = 0.0
    for name, grad in before.steps[-1].items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)
        theta = before.weights[-1][name]
        pull = lam * sum(s["fisher"][name] * (theta - s["anchor"][name]) for s in ewc.consolidated)
        torch.testing.assert_close(after.steps[-1][name] - grad, pull, rtol=1e-4, atol=1e-6, msg=name)
        largest = max(largest, float(pull.abs().max()))
    assert largest > 1e-4  # EWC's edit is far above the comparison's tolerance


def test_bf16_mixed_reference_matches_the_model_at_the_stage_end(tmp_path):
    """Under autocast the swapped-in fp32 snapshot gives the trained model's own bf16 logits: KL ~ 0 right after."""

    class FirstKL(Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(trainer.callback_metrics.get("retention/kl", float("nan"))))

    anchor, first = KLAnchor(beta=1.0), FirstKL()
    module, _ = fit(tmp_path, [anchor, first], stages=SHORT, precision="bf16-mixed", module_overrides=QUICK)
    assert all(t.dtype == torch.float32 for t in anchor.reference.values())
    assert all(torch.isfinite(p).all() for p in module.parameters())
    kl = first.values
    assert kl[:2] == [pytest.approx(float("nan"), nan_ok=True)] * 2  # no reference during the first stage
    assert abs(kl[2]) < 1e-5  # the first step after the stage end: the same model, the same bf16 logits
    assert min(kl[3:]) > 100 * abs(kl[2])


def test_under_lora_the_reference_is_the_adapter_snapshot_on_the_shared_base_model(tmp_path, tiny_pretrained):
    anchor = KLAnchor(beta=1.0, chunk_size=8)
    lora = LoRA(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    module, data = fit_tiny(tmp_path, tiny_pretrained, [anchor], lora=lora)
    adapters = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert set(anchor.reference) == set(adapters) and all(".lora_" in n for n in adapters)
    kept = sum(t.numel() * t.element_size() for t in anchor.reference.values())
    assert kept == sum(p.numel() * 4 for p in adapters.values()) < sum(p.numel() for p in module.parameters()) / 10
    # The reference forward runs the module's own base weights with the snapshot adapters swapped in.
    anchor.on_train_start(None, module)
    q_proj = module.causal_lm.model.layers[0].self_attn.q_proj
    seen = []
    hooks = [
        q_proj.base_layer.register_forward_pre_hook(lambda m, a: seen.append(m.weight is q_proj.base_layer.weight)),
        q_proj.lora_A.default.register_forward_pre_hook(lambda m, a: seen.append(m.weight)),
    ]
    name_a = next(n for n in adapters if "layers.0.self_attn.q_proj.lora_A" in n)
    inputs, logits, targets = module.forward_logits(data.collate([("code", i) for i in range(3)]))
    seen.clear()
    term = _term(anchor, module, inputs, logits, targets)
    for hook in hooks:
        hook.remove()
    assert seen[0] is True and seen[1] is anchor.reference[name_a]
    oracle = _oracle_kl(module, anchor.reference, inputs, logits, targets)
    torch.testing.assert_close(term, oracle, rtol=1e-5, atol=1e-8)


def test_a_model_whose_logits_are_more_than_its_output_layer_is_refused(tiny_data):
    module = tiny_module(tiny_data)
    forward = module.model.forward
    module.model.forward = lambda **kw: type(forward(**kw))(logits=2.0 * forward(**kw).logits)  # a logit scale
    with pytest.raises(ConfigError, match="transforms its logits after the output layer"):
        _Split.of(module.causal_lm, trainable(module))
