import pickle

import pytest
import torch

from hft_lightning.schedule import StageSchedule


def test_every_stage_warms_up_then_holds_the_peak():
    schedule = StageSchedule([100, 50], warmup_steps=10)
    assert schedule(0) == pytest.approx(0.1)  # (0 + 1) / 10
    assert schedule(9) == schedule(10) == schedule(99) == 1.0
    assert schedule(100) == pytest.approx(0.1)  # stage 1 warms up again
    assert [schedule(s) for s in range(100, 110)] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert schedule(149) == schedule(500) == 1.0  # past the plan: the last stage's rate


def test_warmup_longer_than_a_stage_is_capped():
    schedule = StageSchedule([3], warmup_steps=10)
    assert [schedule(s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_the_schedule_is_saved_with_the_scheduler_state():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, StageSchedule([4, 4], warmup_steps=2))
    assert scheduler.state_dict()["lr_lambdas"][0] == {"starts": [0, 4, 8], "warmup_steps": 2}
    assert pickle.loads(pickle.dumps(StageSchedule([4], 2)))(0) == 0.5
