import random

import pytest

from hft_lightning.data.builtin import BUILTIN_ABILITIES, BuiltinSource
from hft_lightning.data.example import Example


def load_ability(source, num_train, num_val, seed):
    return BuiltinSource.parse(source).load(num_train, num_val, seed)


def scorer(name):
    return load_ability(f"builtin:{name}", num_train=1, num_val=1, seed=0).scorer


@pytest.mark.parametrize("name", sorted(BUILTIN_ABILITIES))
def test_generation_is_seeded_and_splits_are_disjoint(name):
    first = load_ability(f"builtin:{name}", num_train=300, num_val=40, seed=3)
    again = load_ability(f"builtin:{name}", num_train=300, num_val=40, seed=3)
    other = load_ability(f"builtin:{name}", num_train=300, num_val=40, seed=4)
    assert first.train == again.train and first.val == again.val
    assert first.train != other.train
    assert len(first.train) == 300 and len(first.val) == 40
    assert len({e.prompt for e in first.val}) == 40
    assert not {e.prompt for e in first.train} & {e.prompt for e in first.val}


@pytest.mark.parametrize("name", sorted(BUILTIN_ABILITIES))
def test_reference_responses_score_perfectly(name):
    ability = load_ability(f"builtin:{name}", num_train=10, num_val=60, seed=0)
    assert all(ability.scorer([e.response for e in ability.val], ability.val))


def test_unknown_ability_names_the_allowed_sources():
    with pytest.raises(ValueError, match=r"unknown ability source 'builtin:poetry'.*builtin:math"):
        load_ability("builtin:poetry", 1, 1, 0)
    with pytest.raises(ValueError, match=r"data\.abilities"):
        load_ability("math", 1, 1, 0)


def test_math_scores_the_last_final_answer_line():
    example = Example("Q", "", {"answer": "7"})
    score = scorer("math")
    assert score(["3 + 4 = 7\nAnswer: 7"], [example]) == [True]
    assert score(["Answer: 6\nAnswer: 7"], [example]) == [True]
    assert score(["3 + 4 = 7"], [example]) == [False]  # no answer line
    assert score(["Answer: 8"], [example]) == [False]
    assert score(["Answer: -3"], [Example("Q", "", {"answer": "-3"})]) == [True]


def test_math_compares_answers_as_integers():
    score = scorer("math")
    assert score(["Answer: 05"], [Example("Q", "", {"answer": "5"})]) == [True]
    assert score(["Answer: -0"], [Example("Q", "", {"answer": "0"})]) == [True]
    assert score(["Answer: 50"], [Example("Q", "", {"answer": "5"})]) == [False]


def test_code_scores_by_executing_the_tests():
    example = Example("Q", "", {"tests": ["assert get_value(2) == 5", "assert get_value(-3) == 0"]})
    right = "def get_value(x):\n    return x + 3"
    wrong = "def get_value(x):\n    return x + 4"
    broken = "def get_value(x)\n    return x + 3"
    fenced = f"```python\n{right}\n```"  # one code_exec for built-in and file abilities: fences are unwrapped
    assert scorer("code")([right, wrong, broken, fenced], [example] * 4) == [True, False, False, True]


def test_math_code_runs_solve_against_the_word_problems_answer():
    ability = load_ability("builtin:math_code", num_train=50, num_val=5, seed=0)
    example = ability.val[0]
    answer = int(example.reference["tests"][0].removeprefix("assert solve() == "))
    assert example.prompt.startswith("Write a Python function solve() that returns the answer. ")
    right, wrong = f"def solve():\n    return {answer}", f"def solve():\n    return {answer + 1}"
    assert ability.scorer([right, wrong, "solve = 3"], [example] * 3) == [True, False, False]


def test_math_code_asks_maths_word_problem_and_answers_with_its_computation():
    from hft_lightning.data import builtin_math, builtin_math_code

    for seed in range(20):
        problem, composite = builtin_math.generate(random.Random(seed)), builtin_math_code.generate(random.Random(seed))
        assert composite.prompt == f"Write a Python function solve() that returns the answer. {problem.prompt}"
        computation = problem.response.split(" = ")[0]  # "3 + 4 = 7\nAnswer: 7"
        assert composite.response == f"def solve():\n    return {computation}"
        assert composite.reference == {"tests": [f"assert solve() == {problem.reference['answer']}"]}


def test_general_checks_every_constraint():
    repeat_upper = Example(
        "Q", "", {"constraints": [{"type": "repeat", "word": "RIVER", "count": 3}, {"type": "uppercase"}]}
    )
    order = Example("Q", "", {"constraints": [{"type": "order", "words": ["fig", "apple", "kiwi"]}]})
    contains = Example("Q", "", {"constraints": [{"type": "contains", "words": ["winter", "stone"]}]})
    score = scorer("general")
    assert score(["RIVER RIVER RIVER"], [repeat_upper]) == [True]
    assert score(["RIVER RIVER"], [repeat_upper]) == [False]  # count
    assert score(["river river river"], [repeat_upper]) == [False]  # casing
    assert score(["fig, apple, kiwi"], [order]) == [True]
    assert score(["apple, fig, kiwi"], [order]) == [False]
    assert score(["In winter a stone."], [contains]) == [True]
    assert score(["In winter a rock."], [contains]) == [False]


def test_num_train_counts_the_generated_training_examples():
    assert len(load_ability("builtin:math", num_train=None, num_val=1, seed=0).train) == 4000
    assert len(load_ability("builtin:math", num_train=7, num_val=1, seed=0).train) == 7
