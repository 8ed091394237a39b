"""``builtin:code``: small Python functions written from a one-line specification.

Each example names the function and its parameters and states what it returns; the response is the
function. A generation is correct when it passes the example's unit tests (``code_exec``: executed in the
sandbox, :mod:`hft_lightning.sandbox`, never in the training process).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from hft_lightning.data.example import Example

VERBS = ("calc", "get", "make", "find", "compute")
NOUNS = ("value", "result", "number", "total", "score")


@dataclass(frozen=True)
class _Spec:
    params: str
    description: str
    body: str
    function: Callable[..., object]
    inputs: Callable[[random.Random], tuple]


def _specs(k: int) -> tuple[_Spec, ...]:
    ints = lambda rng: (rng.randint(-20, 20),)  # noqa: E731
    pairs = lambda rng: (rng.randint(-20, 20), rng.randint(-20, 20))  # noqa: E731
    lists = lambda rng: ([rng.randint(-9, 9) for _ in range(rng.randint(1, 5))],)  # noqa: E731
    words = lambda rng: (rng.choice(("ab", "xyz", "q", "hi")),)  # noqa: E731
    return (
        _Spec("x", f"returns x plus {k}", f"return x + {k}", lambda x: x + k, ints),
        _Spec("x", f"returns x minus {k}", f"return x - {k}", lambda x: x - k, ints),
        _Spec("x", f"returns x times {k}", f"return x * {k}", lambda x: x * k, ints),
        _Spec("x", f"returns True when x is divisible by {k}", f"return x % {k} == 0", lambda x: x % k == 0, ints),
        _Spec("s", f"returns the string s repeated {k} times", f"return s * {k}", lambda s: s * k, words),
        _Spec("a, b", "returns the larger of a and b", "return max(a, b)", max, pairs),
        _Spec("a, b", "returns the smaller of a and b", "return min(a, b)", min, pairs),
        _Spec("xs", "returns the sum of the list xs", "return sum(xs)", sum, lists),
        _Spec("xs", "returns the length of the list xs", "return len(xs)", len, lists),
        _Spec("xs", "returns the last element of the list xs", "return xs[-1]", lambda xs: xs[-1], lists),
    )


def generate(rng: random.Random) -> Example:
    """Draws one function specification with three unit tests.

    Args:
        rng: Seeded random source.

    Returns:
        An example whose reference is ``{"tests": [<assert statement>, ...]}``.
    """
    spec = rng.choice(_specs(rng.randint(2, 9)))
    name = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
    prompt = f"Write a Python function {name}({spec.params}) that {spec.description}."
    response = f"def {name}({spec.params}):\n    {spec.body}"
    tests = []
    for _ in range(3):
        args = spec.inputs(rng)
        call = ", ".join(repr(a) for a in args)
        tests.append(f"assert {name}({call}) == {spec.function(*args)!r}")
    return Example(prompt=prompt, response=response, reference={"tests": tests})
