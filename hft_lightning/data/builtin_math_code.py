"""``builtin:math_code``: a word problem of ``builtin:math`` answered by a Python function that computes it.

The ability composes the two others: reading the problem into an expression is math's, writing it as a function is
code's. The prompt asks for ``solve()`` returning the answer to one of math's word problems; the response is the
function (``def solve():`` / ``return 3 + 4``). A generation is correct when ``solve()`` returns the answer
(``code_exec``, run in the sandbox: :mod:`hft_lightning.sandbox`). A curriculum that declares its prerequisites,
``Prerequisites(prerequisites={"math_code": ["math", "code"]})``, trains it after both.
"""

from __future__ import annotations

import random

from hft_lightning.data.builtin_math import draw_problem
from hft_lightning.data.example import Example


def generate(rng: random.Random) -> Example:
    """Draws one word problem to answer with a function.

    Args:
        rng: Seeded random source.

    Returns:
        An example whose reference is ``{"tests": ["assert solve() == <n>"]}``.
    """
    problem = draw_problem(rng)
    prompt = f"Write a Python function solve() that returns the answer. {problem.prompt}"
    response = f"def solve():\n    return {problem.a} {problem.op} {problem.b}"
    return Example(prompt=prompt, response=response, reference={"tests": [f"assert solve() == {problem.result}"]})
