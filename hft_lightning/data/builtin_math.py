"""``builtin:math``: arithmetic word problems answered with one worked line and a final answer line.

Problems use small operands (addition, subtraction with a non-negative result, multiplication),
wrapped in a few story templates. The response shows the computation, then ``Answer: <n>``; a generation
is correct when the integer on its last ``Answer:`` line equals the reference (``exact_match`` with
:data:`ANSWER_PATTERN`, compared as integers, GSM8K style).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from hft_lightning.data.example import Example

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ivy", "Jon", "Kim", "Leo")
ITEMS = ("apples", "books", "coins", "pens", "stamps", "cards", "shells", "marbles", "cups", "kites")

_TEMPLATES = {
    "+": (
        "{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?",
        "{name} had {a} {item}. A friend gave {name} {b} {item}. How many {item} does {name} have?",
        "There are {a} {item} in a box and {b} {item} on the table. How many {item} are there in all?",
    ),
    "-": (
        "{name} has {a} {item} and gives away {b}. How many {item} are left?",
        "There were {a} {item} on a shelf. {name} took {b}. How many {item} remain on the shelf?",
    ),
    "*": (
        "{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?",
        "{name} buys {a} packs of {item}. Each pack holds {b} {item}. How many {item} did {name} buy?",
    ),
}

MAX_OPERAND = 5
"""Operands are drawn from 1..MAX_OPERAND: about 75 arithmetic facts, which a few-million-parameter model
memorises within one stage (with 1..9, 240 facts, it reached 0.5 exact match after 800 steps)."""

ANSWER_PATTERN = re.compile(r"Answer:\s*(-?\d+)")
"""The final answer: the first group of the pattern's last match."""


@dataclass(frozen=True)
class WordProblem:
    """A word problem over two operands: ``prompt`` asks for ``a <op> b``, which is ``result``."""

    prompt: str
    a: int
    op: str
    b: int
    result: int


def draw_problem(rng: random.Random) -> WordProblem:
    """Draws one word problem (shared with ``builtin:math_code``, which asks for it as a function).

    Args:
        rng: Seeded random source.
    """
    op = rng.choice(tuple(_TEMPLATES))
    a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    if op == "-":
        a = a + b  # a non-negative result: a in [b + 1, b + MAX_OPERAND]
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    template = rng.choice(_TEMPLATES[op])
    prompt = template.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b)
    return WordProblem(prompt, a, op, b, result)


def generate(rng: random.Random) -> Example:
    """Draws one word problem with its worked answer.

    Args:
        rng: Seeded random source.

    Returns:
        An example whose reference is ``{"answer": "<n>"}``.
    """
    problem = draw_problem(rng)
    response = f"{problem.a} {problem.op} {problem.b} = {problem.result}\nAnswer: {problem.result}"
    return Example(prompt=problem.prompt, response=response, reference={"answer": str(problem.result)})
