import pytest

from hft_lightning import Curriculum, Stage
from hft_lightning.errors import ConfigError
from hft_lightning.planners import Prerequisites
from hft_lightning.planners.base import topological_order

STAGES = [
    Stage("foundation", 2, {"math": 1.0, "code": 1.0, "general": 1.0}),
    Stage("math", 3, {"math": 1.0}),
    Stage("code", 4, {"code": 1.0}),
    Stage("general", 5, {"general": 1.0}),
    Stage("unified", 2, {"math": 1.0, "code": 1.0, "general": 1.0}),
]


def test_topological_order_breaks_ties_in_config_order():
    abilities = ["a", "b", "c", "d"]
    prerequisites = {"a": ["c"], "d": ["b"]}  # first ready: b and c; then c and d; then a and d
    assert topological_order(abilities, prerequisites, key=abilities.index) == ["b", "c", "a", "d"]
    assert topological_order(abilities, {}, key=abilities.index) == abilities


def test_the_plan_trains_prerequisites_first_and_keeps_mixture_stages_in_place():
    curriculum = Curriculum(STAGES, planner=Prerequisites({"math": ["general"]}))
    assert [s.name for s in curriculum.plan.stages] == ["foundation", "code", "general", "math", "unified"]
    assert curriculum.planned  # decided from the config alone, when the curriculum is built
    assert [s.name for s in curriculum.configured] == [s.name for s in STAGES]
    why = {s.name: why for s, why in zip(curriculum.plan.stages, curriculum.plan.why, strict=True)}
    assert why["math"] == "builds on general" and why["code"] == "no prerequisites"
    assert why["foundation"] == why["unified"] == "mixture: keeps its configured position"
    assert curriculum.plan.learned_at("math") == 0 and curriculum.plan.steps_before(3) == 2 + 4 + 5


@pytest.mark.parametrize(
    ("prerequisites", "message"),
    [
        ({"math": ["code"], "code": ["general"], "general": ["math"]},
         r"form a cycle: math -> code -> general -> math .*\['code', 'general', 'math'\]"),
        ({"code": ["code"]}, r"form a cycle: code -> code"),
        ({"code": ["maths"]}, r"prerequisites\['code'\] names 'maths', which no single-ability stage trains; "
                              r"abilities with their own stage: \['math', 'code', 'general'\]"),
        ({"poetry": ["math"]}, r"prerequisites names 'poetry', which no single-ability stage trains"),
    ],
)  # fmt: skip
def test_bad_prerequisites_are_config_errors_naming_the_abilities(prerequisites, message):
    with pytest.raises(ConfigError, match=message):
        Curriculum(STAGES, planner=Prerequisites(prerequisites))


def test_an_ability_with_two_single_ability_stages_cannot_be_ordered_by_ability():
    stages = [Stage("math", 1, {"math": 1.0}), Stage("code", 1, {"code": 1.0}), Stage("math2", 1, {"math": 1.0})]
    with pytest.raises(ConfigError, match=r"\['math'\] each train alone in more than one stage"):
        Curriculum(stages, planner=Prerequisites({}))
    assert [s.name for s in Curriculum(stages).plan.stages] == ["math", "code", "math2"]  # explicit: as configured
