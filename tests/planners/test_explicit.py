from hft_lightning import Curriculum, Stage
from hft_lightning.curriculum import DEFAULT_STAGES
from hft_lightning.planners import Explicit


def test_the_default_planner_keeps_the_configured_order():
    curriculum = Curriculum()
    assert isinstance(curriculum.planner, Explicit)
    assert curriculum.plan.stages == DEFAULT_STAGES and curriculum.planned
    assert curriculum.plan.probe is None and curriculum.plan.affinity is None


def test_reverse_reverses_the_single_ability_stages_only():
    stages = [*DEFAULT_STAGES, Stage("poetry", 7, {"poetry": 1.0, "code": 0.0})]  # one ability with weight > 0
    curriculum = Curriculum(stages, planner=Explicit(reverse=True))
    assert [s.name for s in curriculum.plan.stages] == ["foundation", "poetry", "general", "code", "unified", "math"]
    assert curriculum.plan.why[1] == "configured order, reversed"
