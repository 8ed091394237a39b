import itertools

import pytest
import torch

from hft_lightning.planners import Affinity
from hft_lightning.planners.affinity import EXACT_SEARCH_MAX, best_chain, cosine_matrix, greedy_chain


class FixedGradients:
    """A probe whose gradients are given: two tensors per ability, like a model with two parameters."""

    def __init__(self, gradients):
        self.gradients = gradients

    def gradient(self, ability, examples, batch_size):
        return self.gradients[ability]


def _twins_and_opposite():
    g = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([[3.0, 0.0], [1.0, 2.0]])]
    return {"a": g, "c": [-t for t in g], "b": [2 * t for t in g]}  # b: a's direction, twice as long


def test_same_gradients_have_affinity_one_and_opposite_ones_minus_one():
    decision = Affinity().order(["a", "c", "b"], FixedGradients(_twins_and_opposite()))
    expected = [[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]
    torch.testing.assert_close(torch.tensor(decision.measurements["affinity"]["matrix"]), torch.tensor(expected))
    assert decision.measurements["affinity"]["abilities"] == ["a", "c", "b"]
    assert decision.measurements["affinity"]["search"] == "exact"
    # a-b-c and c-a-b both sum to 0 (a-c-b: -2); the tie goes to the order closest to the config's
    assert decision.order == ["a", "b", "c"]
    assert decision.why == {"a": "first of the chain", "b": "affinity +1.000 with a", "c": "affinity -1.000 with b"}


def test_prerequisites_are_hard_constraints():
    decision = Affinity(prerequisites={"a": ["c"]}).order(["a", "c", "b"], FixedGradients(_twins_and_opposite()))
    assert decision.order == ["c", "a", "b"]
    assert decision.why["a"] == "affinity -1.000 with c; builds on c"


def test_cosine_matrix_matches_a_flattened_reference():
    generator = torch.Generator().manual_seed(0)
    gradients = [[torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator)] for _ in range(4)]
    flat = torch.stack([torch.cat([t.reshape(-1) for t in g]) for g in gradients])
    normed = flat / flat.norm(dim=1, keepdim=True)
    torch.testing.assert_close(cosine_matrix(gradients), normed @ normed.T)
    zero = [[torch.zeros(2)], [torch.ones(2)]]
    torch.testing.assert_close(cosine_matrix(zero), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def _score(matrix, chain):
    return sum(matrix[a][b] for a, b in itertools.pairwise(chain))


@pytest.mark.parametrize("seed", range(5))
def test_exact_search_is_the_best_allowed_chain_and_greedy_is_allowed(seed):
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.rand(6, 6, generator=generator)
    matrix = ((matrix + matrix.T) / 2).tolist()
    items, prerequisites = list(range(6)), {3: [5], 0: [1, 2]}
    allowed = [
        c
        for c in itertools.permutations(items)
        if all(set(prerequisites.get(x, [])) <= set(c[:i]) for i, x in enumerate(c))
    ]
    best = best_chain(matrix, items, prerequisites)
    assert tuple(best) in allowed
    assert _score(matrix, best) == pytest.approx(max(_score(matrix, c) for c in allowed))
    greedy = greedy_chain(matrix, items, prerequisites)
    assert tuple(greedy) in allowed and _score(matrix, greedy) <= _score(matrix, best) + 1e-12


def test_more_abilities_than_the_exact_limit_use_the_greedy_chain():
    names = [f"s{i}" for i in range(EXACT_SEARCH_MAX + 1)]
    gradients = {n: [torch.tensor([float(i), 1.0])] for i, n in enumerate(reversed(names))}
    decision = Affinity().order(names, FixedGradients(gradients))
    assert decision.measurements["affinity"]["search"] == "greedy"
    assert sorted(decision.order) == sorted(names)


@pytest.mark.parametrize("search", [best_chain, greedy_chain], ids=["exact", "greedy"])
def test_a_chain_and_its_reverse_tie_whatever_the_last_bits_and_the_config_order_wins(search):
    # 0-1-2 and 2-1-0 are the best chains; a rounding difference of 1e-9 favours the reverse one
    matrix = [[1.0, 0.5, -0.3], [0.5, 1.0, 0.4], [-0.3, 0.4 + 1e-9, 1.0]]
    assert search(matrix, [0, 1, 2], {}) == [0, 1, 2]
    assert search(matrix, [2, 1, 0], {}) == [2, 1, 0]
    matrix[2][1] += 1e-3  # a real difference decides
    assert search(matrix, [0, 1, 2], {}) == [2, 1, 0]


def test_the_measured_matrix_is_exactly_symmetric():
    generator = torch.Generator().manual_seed(1)
    gradients = [[torch.randn(1000, generator=generator) * 10 ** (i - 2)] for i in range(5)]
    matrix = cosine_matrix(gradients)
    assert torch.equal(matrix, matrix.T)
