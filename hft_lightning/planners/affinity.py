"""Neighbours that agree: order abilities so consecutive stages have the most similar gradients.

The affinity of two abilities is the cosine of the gradients of their losses on a held-out sample, measured on the
base model: ``A[i, j] = <g_i, g_j> / (|g_i| |g_j|)``, all k x k inner products from one pass over the k gradients
with :func:`hft_kernels.gem_dots` (the Gram matrix GEM uses). Stages whose gradients point the same way interfere least
(GEM's premise, Lopez-Paz & Ranzato 2017), so the plan maximises the summed affinity of consecutive stages:

- exact, over every order the prerequisites allow, for up to :data:`EXACT_SEARCH_MAX` abilities (8! = 40320
  orders, well under a second);
- above that, a greedy chain: from each possible first ability, append the allowed ability most similar to the
  last one; the best of these chains wins.

Ties go to the order closest to the config's: a chain and its reverse always tie (the matrix is symmetric), and
chain scores within :data:`TIE_TOLERANCE` of each other count as equal, so rounding in the last bits of a
measurement does not pick between near-equal plans (it still can at the edge of the tolerance; under DDP every
process follows rank 0's plan whatever it measured). The probe keeps the k gradients (k x the trainable
parameters in fp32) until the matrix is computed. The matrix is kept on the plan
(:attr:`hft_lightning.plan.Plan.affinity`), for example to scale retention strength by how much two abilities
interfere.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from typing_extensions import override

from hft_kernels import gem_dots
from hft_lightning.planners.base import Decision, Planner, PrerequisiteMap, check_budget, ready
from hft_lightning.probe import Probe

EXACT_SEARCH_MAX = 8
"""Up to this many single-ability stages every allowed order is tried; above it, the greedy chain."""
TIE_TOLERANCE = 1e-6
"""Chains whose summed affinities differ by less than this are equally good (cosines are measured in fp32)."""


class Affinity(Planner):
    """Orders the single-ability stages so that consecutive stages have the highest gradient affinity.

    Args:
        examples: Held-out examples per ability whose loss gradient is measured (the probe budget; each is one
            forward and backward pass).
        batch_size: Examples per forward and backward pass of the probe.
        prerequisites: Ability -> abilities it builds on; they stay before it whatever the affinities.

    Example::

        Curriculum(stages, planner=Affinity(examples=64))
    """

    measures = True

    def __init__(self, examples: int = 32, batch_size: int = 8, prerequisites: dict[str, list[str]] | None = None):
        super().__init__(prerequisites)
        check_budget(examples, batch_size)
        self.examples = examples
        self.batch_size = batch_size

    @override
    def order(self, abilities: list[str], probe: Probe | None) -> Decision:
        gradients = [probe.gradient(a, self.examples, self.batch_size) for a in abilities]
        matrix = cosine_matrix(gradients).tolist()
        exact = len(abilities) <= EXACT_SEARCH_MAX
        search = best_chain if exact else greedy_chain
        positions = search(matrix, list(range(len(abilities))), self._prerequisites_by_index(abilities))
        order = [abilities[i] for i in positions]
        why = {order[0]: self.reason(order[0], "first of the chain")}
        for before, after in itertools.pairwise(positions):
            measured = f"affinity {matrix[before][after]:+.3f} with {abilities[before]}"
            why[abilities[after]] = self.reason(abilities[after], measured)
        measured = {"abilities": list(abilities), "matrix": matrix, "search": "exact" if exact else "greedy"}
        return Decision(order, why, {"affinity": measured})

    def _prerequisites_by_index(self, abilities: list[str]) -> dict[int, list[int]]:
        return {abilities.index(a): [abilities.index(b) for b in before] for a, before in self.prerequisites.items()}


def cosine_matrix(gradients: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """The k x k cosine similarities of k gradients (each a list of tensors shaped like the parameters), fp32.

    A zero gradient has cosine 0 with everything, itself included. The matrix is exactly symmetric (``<g_i, g_j>``
    and ``<g_j, g_i>`` are accumulated separately, so their mean is taken).
    """
    _, gram = gem_dots(gradients[0], gradients)
    gram = (gram + gram.T) / 2
    norms = gram.diagonal().sqrt()
    return (gram / (norms[:, None] * norms[None, :]).clamp_min(torch.finfo(torch.float32).tiny)).cpu()


def _score(matrix: list[list[float]], chain: Sequence[int]) -> float:
    return sum(matrix[a][b] for a, b in itertools.pairwise(chain))


def _allowed(chain: Sequence[int], prerequisites: PrerequisiteMap) -> bool:
    return all(ready(item, chain[:i], prerequisites) for i, item in enumerate(chain))


def best_chain(matrix: list[list[float]], items: list[int], prerequisites: PrerequisiteMap) -> list[int]:
    """The allowed order of ``items`` with the highest summed affinity of neighbours, by trying them all.

    Orders are tried in lexicographic order of ``items`` and only one better by more than :data:`TIE_TOLERANCE`
    replaces the best, so ties go to the order closest to ``items``.
    """
    best, best_score = list(items), float("-inf")
    for chain in itertools.permutations(items):
        if _allowed(chain, prerequisites) and _score(matrix, chain) > best_score + TIE_TOLERANCE:
            best, best_score = list(chain), _score(matrix, chain)
    return best


def greedy_chain(matrix: list[list[float]], items: list[int], prerequisites: PrerequisiteMap) -> list[int]:
    """From each allowed first item, append the allowed item most similar to the last; the best chain wins.

    Ties, within :data:`TIE_TOLERANCE`, go to the chain started from the earliest item of ``items``.
    """
    best, best_score = list(items), float("-inf")
    for first in (i for i in items if ready(i, [], prerequisites)):
        chain = [first]
        while len(chain) < len(items):
            candidates = [i for i in items if i not in chain and ready(i, chain, prerequisites)]
            chain.append(max(candidates, key=lambda i: matrix[chain[-1]][i]))  # max keeps the first of equals
        if _score(matrix, chain) > best_score + TIE_TOLERANCE:
            best, best_score = chain, _score(matrix, chain)
    return best
