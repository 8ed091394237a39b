import copy
import json
import pickle

import pytest
from lightning.pytorch import Trainer

from hft_lightning import Report, StageProgressBar
from hft_lightning.errors import ConfigError
from hft_lightning.plan import DEFAULT_STAGES, ORDER_RULE, Plan, Stage, arrange
from tests.helpers import tiny_module

STAGES = (
    Stage("warmup", 2, {"math": 1.0, "code": 1.0}),
    Stage("math", 3, {"math": 1.0}),
    Stage("code", 4, {"code": 1.0, "general": 0.0}),
)
PLAN = Plan(
    stages=STAGES,
    why=("mixture: keeps its configured position", "loss 1.2", "loss | 2.0"),
    planner="Difficulty",
    settings={"examples": 4},
    configured_order=("warmup", "code", "math"),
    measurements={"affinity": {"abilities": ["math", "code"], "matrix": [[1.0, -0.5], [-0.5, 1.0]]}},
    probe={"examples": 8, "seconds": 0.25},
)


def test_a_plan_round_trips_through_json_and_pickle():
    data = json.loads(json.dumps(PLAN.to_dict()))
    assert Plan.from_dict(data) == PLAN
    assert pickle.loads(pickle.dumps(PLAN)) == PLAN
    assert data["rule"] == ORDER_RULE
    code = {"name": "code", "steps": 4, "mixture": {"code": 1.0, "general": 0.0}, "why": "loss | 2.0"}
    assert data["stages"][2] == code


def test_positions_steps_and_first_stage_of_each_ability():
    assert [PLAN.stage_index(epoch) for epoch in range(5)] == [0, 1, 2, 2, 2]
    assert [PLAN.steps_before(i) for i in range(4)] == [0, 2, 5, 9] and PLAN.total_steps == 9
    assert PLAN.stage_steps == [2, 3, 4]
    assert [PLAN.learned_at(a) for a in ("math", "code", "general")] == [0, 0, None]  # weight 0 trains nothing
    assert PLAN.affinity == {"math": {"math": 1.0, "code": -0.5}, "code": {"math": -0.5, "code": 1.0}}


def test_the_terminal_and_markdown_tables_show_every_stage_and_why():
    table = PLAN.table().splitlines()
    assert table[0] == f"Curriculum plan (planner: Difficulty; probe: 8 examples in 0.25 s; {ORDER_RULE})"
    assert table[1].split() == ["#", "stage", "trains", "steps", "why"]
    assert table[2].split()[:4] == ["1", "warmup", "mixture", "2"] and table[4].endswith("loss | 2.0")
    markdown = PLAN.markdown()
    assert markdown[0].startswith("Order decided by the **Difficulty** planner (probe: 8 examples, 0.25 s)")
    assert markdown[-1] == "| code | code 1, general 0 | 4 | loss \\| 2.0 |"  # a pipe in a cell is escaped


def test_arrange_orders_single_ability_stages_and_keeps_mixtures_in_place():
    names = [s.name for s in arrange(DEFAULT_STAGES, ["general", "math", "code"])]
    assert names == ["foundation", "general", "math", "code", "unified"]


def test_every_follower_refuses_to_run_without_a_plan(tiny_data, tmp_path):
    data = copy.copy(tiny_data)  # the session's datamodule may hold another test's plan
    data.plan = None
    module = tiny_module(data)
    bar = StageProgressBar()
    trainer = Trainer(callbacks=[bar], logger=False, accelerator="cpu", default_root_dir=tmp_path)
    bar.setup(trainer, module, "fit")
    runs = {
        "StagedDataModule": lambda: data.stage_sampler(0),
        "HFTModule": module.configure_optimizers,
        "Report": lambda: Report().setup(trainer, module, "fit"),
        "StageProgressBar": lambda: bar.on_train_start(trainer, module),
    }
    for follower, run in runs.items():
        with pytest.raises(ConfigError, match=rf"^{follower} has no plan: trainer\.callbacks must contain exactly one"):
            run()
