import math
import pickle

import pytest
import torch

from hft_lightning.schedule import StageSchedule


def test_every_stage_warms_up_then_decays_to_the_floor():
    schedule = StageSchedule([100, 50], warmup_steps=10, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(99) == pytest.approx(0.1)  # last step of stage 0
    assert schedule(100) == pytest.approx(0.1)  # stage 1 warms up again
    assert schedule(109) == pytest.approx(1.0)
    assert schedule(149) == pytest.approx(0.1)
    assert schedule(500) == pytest.approx(0.1)  # past the plan: stays at the floor of the last stage
    midpoint = 10 + (90 - 1) // 2  # halfway through stage 0's decay
    assert schedule(midpoint) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    values = [schedule(step) for step in range(10, 100)]
    assert values == sorted(values, reverse=True)


def test_warmup_longer_than_a_stage_is_capped():
    schedule = StageSchedule([3], warmup_steps=10)
    assert [schedule(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_the_schedule_is_saved_with_the_scheduler_state():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, StageSchedule([4, 4], warmup_steps=2))
    state = scheduler.state_dict()
    assert state["lr_lambdas"][0] == {"starts": [0, 4, 8], "warmup_steps": 2, "min_ratio": 0.1}
    assert pickle.loads(pickle.dumps(StageSchedule([4], 2)))(0) == 0.5
