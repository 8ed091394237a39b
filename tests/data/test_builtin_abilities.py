import pytest

from hft_lightning.data import builtin_code, builtin_general, builtin_math
from hft_lightning.data.builtin import BUILTIN_ABILITIES, load_ability
from hft_lightning.data.example import Example


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
    example = Example("Q", "", {"answer": 7})
    assert builtin_math.score(["3 + 4 = 7\nAnswer: 7"], [example]) == [True]
    assert builtin_math.score(["Answer: 6\nAnswer: 7"], [example]) == [True]
    assert builtin_math.score(["3 + 4 = 7"], [example]) == [False]  # no answer line
    assert builtin_math.score(["Answer: 8"], [example]) == [False]
    assert builtin_math.extract_answer("Answer: -3") == -3


def test_code_scores_by_executing_the_tests():
    example = Example("Q", "", {"tests": ["assert get_value(2) == 5", "assert get_value(-3) == 0"]})
    right = "def get_value(x):\n    return x + 3"
    wrong = "def get_value(x):\n    return x + 4"
    broken = "def get_value(x)\n    return x + 3"
    assert builtin_code.score([right, wrong, broken], [example] * 3) == [True, False, False]


def test_general_checks_every_constraint():
    repeat_upper = Example(
        "Q", "", {"constraints": [{"type": "repeat", "word": "RIVER", "count": 3}, {"type": "uppercase"}]}
    )
    order = Example("Q", "", {"constraints": [{"type": "order", "words": ["fig", "apple", "kiwi"]}]})
    contains = Example("Q", "", {"constraints": [{"type": "contains", "words": ["winter", "stone"]}]})
    assert builtin_general.score(["RIVER RIVER RIVER"], [repeat_upper]) == [True]
    assert builtin_general.score(["RIVER RIVER"], [repeat_upper]) == [False]  # count
    assert builtin_general.score(["river river river"], [repeat_upper]) == [False]  # casing
    assert builtin_general.score(["fig, apple, kiwi"], [order]) == [True]
    assert builtin_general.score(["apple, fig, kiwi"], [order]) == [False]
    assert builtin_general.score(["In winter a stone."], [contains]) == [True]
    assert builtin_general.score(["In winter a rock."], [contains]) == [False]
