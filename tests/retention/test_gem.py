"""GEM and A-GEM on the tiny model: the projected gradient satisfies every constraint and equals a QP solution."""

import numpy as np
import quadprog
import torch

from hft_lightning.retention import AGEM, GEM
from hft_lightning.seeds import derive_seed
from tests.retention.common import GradientProbe, fit


def _flat(grads: dict[str, torch.Tensor], names) -> np.ndarray:
    return torch.cat([grads[n].double().flatten() for n in names]).numpy()


def _qp_projection(g: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """argmin_x 1/2 ||x - g||^2 s.t. refs @ x >= 0, through its dual solved by quadprog (min 1/2 v'Av - b'v)."""
    gram = refs @ refs.T + 1e-12 * np.eye(len(refs))
    v = quadprog.solve_qp(gram, -(refs @ g), np.eye(len(refs)), np.zeros(len(refs)))[0]
    return g + refs.T @ v


def _last_step(tmp_path, method):
    before, after = GradientProbe(), GradientProbe()
    fit(tmp_path, [before, method, after])
    return before.steps[-1], after.steps[-1]


def test_gem_projection_matches_an_independent_qp_solution(tmp_path):
    gem = GEM(memory_size=8)
    g, projected = _last_step(tmp_path, gem)
    assert gem.memory.abilities == ["math", "code"]  # last stage: k = 2 remembered abilities
    names = list(g)
    refs = np.stack([_flat(ref, names) for ref in gem.references.refs.values()])
    x = _flat(projected, names)
    assert (refs @ x >= -1e-6 * np.linalg.norm(refs, axis=1) * np.linalg.norm(x)).all()
    np.testing.assert_allclose(x, _qp_projection(_flat(g, names), refs), rtol=1e-4, atol=1e-7)


def test_gem_keeps_a_gradient_that_violates_nothing(tmp_path):
    gem = GEM(memory_size=8)
    before, after = GradientProbe(), GradientProbe()
    fit(tmp_path, [before, gem, after])
    unchanged = 0
    for g, projected in zip(before.steps, after.steps, strict=True):
        if all(torch.equal(g[n], projected[n]) for n in g):
            unchanged += 1
    assert 4 <= unchanged < len(before.steps)  # stage 1 has no memory; later steps project only when violated


class AGEMOracle(GradientProbe):
    """Before A-GEM: records g and recomputes A-GEM's reference gradient directly with autograd."""

    def __init__(self, agem: AGEM):
        super().__init__()
        self.agem = agem
        self.refs: list[dict[str, torch.Tensor] | None] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        items = self.agem.memory.all_items()
        if not items:
            self.refs.append(None)
            return
        generator = torch.Generator().manual_seed(derive_seed(trainer.datamodule.seed, "agem", trainer.global_step))
        drawn = [items[i] for i in torch.randperm(len(items), generator=generator)[:4].tolist()]
        params = dict(pl_module.named_parameters())
        with torch.enable_grad():
            loss = pl_module.sft_loss(trainer.datamodule.collate(drawn))
        self.refs.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)))


def test_agem_matches_the_closed_form(tmp_path):
    agem = AGEM(memory_size=8, batch_size=4)
    oracle, after = AGEMOracle(agem), GradientProbe()
    fit(tmp_path, [oracle, agem, after])
    projected = 0
    for g_named, ref, x_named in zip(oracle.steps, oracle.refs, after.steps, strict=True):
        names = list(g_named)
        g, x = _flat(g_named, names), _flat(x_named, names)
        if ref is None:  # first stage: nothing remembered yet
            np.testing.assert_array_equal(x, g)
            continue
        r = _flat(ref, names)
        expected = g - min(0.0, g @ r) / (r @ r) * r
        np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-7)
        projected += bool(g @ r < 0)
    assert projected > 0


class UsedReference(GradientProbe):
    """After A-GEM: records the projected gradient and the reference A-GEM projected it against, with its step."""

    def __init__(self, agem: AGEM):
        super().__init__()
        self.agem = agem
        self.used: list[tuple[int, dict[str, torch.Tensor]] | None] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        refs = self.agem.references
        self.used.append((refs.step, {n: t.clone() for n, t in refs.refs["memory"].items()}) if refs.refs else None)


def test_agem_ref_every_reuses_the_reference_until_due_and_after_each_consolidation(tmp_path):
    agem = AGEM(memory_size=8, batch_size=4, ref_every=3)
    oracle, after = AGEMOracle(agem), UsedReference(agem)
    fit(tmp_path, [oracle, agem, after])  # 3 stages of 4 steps: nothing remembered in steps 0-3
    assert [u and u[0] for u in after.used] == [None] * 4 + [4, 4, 4, 7, 8, 8, 8, 11]
    recorded = zip(oracle.steps, oracle.refs, after.steps, after.used, strict=True)
    for step, (g_named, fresh, x_named, used) in enumerate(recorded):
        if used is None:
            continue
        names = list(g_named)
        g, x, r = _flat(g_named, names), _flat(x_named, names), _flat(used[1], names)
        if used[0] == step:  # refreshed now: the reference is the one the oracle computes from this step's draw
            np.testing.assert_allclose(r, _flat(fresh, names), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(x, g - min(0.0, g @ r) / (r @ r) * r, rtol=1e-4, atol=1e-7)


def test_references_refresh_every_n_steps_dropping_the_old_ones_before_computing():
    from hft_lightning.retention.references import ReferenceGradients

    references = ReferenceGradients(every=2)
    held_while_computing = []

    def compute(value):
        held_while_computing.append(dict(references.refs))
        return {"math": {"w": torch.full((3,), value)}}

    for step in range(5):
        references.refresh(step, lambda step=step: compute(float(step)))
    assert len(held_while_computing) == 3 and all(held == {} for held in held_while_computing)  # steps 0, 2, 4
    assert references.step == 4 and torch.equal(references.refs["math"]["w"], torch.full((3,), 4.0))
