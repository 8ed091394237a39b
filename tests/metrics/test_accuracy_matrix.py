import doctest
import math

import pytest
import torch
from torch import nn

import hft_lightning.metrics.accuracy_matrix as accuracy_matrix_module
from hft_lightning.metrics import AccuracyMatrix

ABILITIES = ["math", "code", "general"]

# Three stages, one ability each (learned_at = [0, 1, 2]).
#              math  code  general
BEFORE_3 = [0.1, 0.0, 0.2]
STAGES_3 = [
    [0.8, 0.1, 0.3],  # after stage 0 (math)
    [0.5, 0.7, 0.3],  # after stage 1 (code)
    [0.4, 0.5, 0.9],  # after stage 2 (general)
]
# By hand, T = 2:
#   average  = (0.4 + 0.5 + 0.9) / 3                       = 0.6
#   forget   = math    max(0.8, 0.5) - 0.4                  = 0.4
#              code    max(0.1, 0.7) - 0.5                  = 0.2
#              general max(0.3, 0.3) - 0.9                  = -0.6  (not clamped)
#   bwt      = abilities learned before stage 2: math, code
#              ((0.4 - 0.8) + (0.5 - 0.7)) / 2              = -0.3
#   fwt      = abilities learned after stage 0: code, general
#              ((R[0][code] - 0.0) + (R[1][general] - 0.2)) / 2
#              = ((0.1 - 0.0) + (0.3 - 0.2)) / 2            = 0.1
EXPECTED_3 = {"average_accuracy": 0.6, "forgetting": [0.4, 0.2, -0.6], "bwt": -0.3, "fwt": 0.1}

# Three ability stages and a unified stage on a mixture of all three (learned_at = [0, 1, 2]).
BEFORE_4 = [0.0, 0.1, 0.2]
STAGES_4 = [
    [0.9, 0.2, 0.2],  # after stage 0 (math)
    [0.6, 0.8, 0.5],  # after stage 1 (code)
    [0.3, 0.5, 0.9],  # after stage 2 (general)
    [0.8, 0.8, 0.7],  # after stage 3 (unified mixture)
]
# By hand, T = 3:
#   average  = (0.8 + 0.8 + 0.7) / 3                        = 0.7666...
#   forget   = math    max(0.9, 0.6, 0.3) - 0.8             = 0.1
#              code    max(0.2, 0.8, 0.5) - 0.8             = 0.0
#              general max(0.2, 0.5, 0.9) - 0.7             = 0.2
#   bwt      = all three learned before stage 3
#              ((0.8 - 0.9) + (0.8 - 0.8) + (0.7 - 0.9)) / 3 = -0.1
#   fwt      = code, general
#              ((R[0][code] - 0.1) + (R[1][general] - 0.2)) / 2
#              = ((0.2 - 0.1) + (0.5 - 0.2)) / 2             = 0.2
EXPECTED_4 = {"average_accuracy": 2.3 / 3, "forgetting": [0.1, 0.0, 0.2], "bwt": -0.1, "fwt": 0.2}


def make(num_stages: int, before: list[float] | None, stages: list[list[float] | None], learned_at=(0, 1, 2)):
    metric = AccuracyMatrix(ABILITIES, num_stages=num_stages, learned_at=list(learned_at))
    if before is not None:
        metric.update(0, torch.tensor(before))
    for i, row in enumerate(stages):
        if row is not None:
            metric.update(i + 1, torch.tensor(row))
    return metric


def assert_derived(result: dict[str, torch.Tensor], expected: dict) -> None:
    assert set(result) == {"average_accuracy", "forgetting", "bwt", "fwt"}
    for key in ("average_accuracy", "bwt", "fwt"):
        assert result[key].shape == torch.Size([]), key
        assert result[key].dtype == torch.float32, key
    assert result["forgetting"].shape == torch.Size([len(ABILITIES)])
    for key, value in expected.items():
        torch.testing.assert_close(result[key], torch.tensor(value, dtype=torch.float32), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("num_stages", "before", "stages", "expected"),
    [(3, BEFORE_3, STAGES_3, EXPECTED_3), (4, BEFORE_4, STAGES_4, EXPECTED_4)],
    ids=["3-stages", "3-stages-plus-unified"],
)
def test_full_matrix_matches_hand_computation(num_stages, before, stages, expected):
    assert_derived(make(num_stages, before, stages).compute(), expected)


def test_partial_matrix_uses_last_recorded_stage_as_final():
    # Only stages 0 and 1 of the 3-stage example, T = 1:
    #   average = (0.5 + 0.7 + 0.3) / 3 = 0.5
    #   forget  = [0.8 - 0.5, 0.1 - 0.7, 0.3 - 0.3] = [0.3, -0.6, 0.0]
    #   bwt     = math only: 0.5 - 0.8 = -0.3
    #   fwt     = code only (general is learned at stage 2 > T): 0.1 - 0.0 = 0.1
    metric = make(3, BEFORE_3, STAGES_3[:2])
    assert_derived(metric.compute(), {"average_accuracy": 0.5, "forgetting": [0.3, -0.6, 0.0], "bwt": -0.3, "fwt": 0.1})


def test_first_stage_only_gives_zero_forgetting_and_transfers():
    # T = 0: average = (0.8 + 0.1 + 0.3) / 3 = 0.4, no earlier stage row, nothing learned before or after it yet.
    metric = make(3, BEFORE_3, STAGES_3[:1])
    assert_derived(metric.compute(), {"average_accuracy": 0.4, "forgetting": [0.0, 0.0, 0.0], "bwt": 0.0, "fwt": 0.0})


def test_missing_rows_leave_their_terms_out():
    # Stage 1 was never validated, T = 2:
    #   forget = [0.8 - 0.4, 0.1 - 0.5, 0.3 - 0.9] = [0.4, -0.4, -0.6]  (max over the recorded stage 0 only)
    #   bwt    = math: 0.4 - 0.8 = -0.4  (code needs R[1], missing)
    #   fwt    = code: 0.1 - 0.0 = 0.1   (general needs R[1], missing)
    metric = make(3, BEFORE_3, [STAGES_3[0], None, STAGES_3[2]])
    assert_derived(
        metric.compute(), {"average_accuracy": 0.6, "forgetting": [0.4, -0.4, -0.6], "bwt": -0.4, "fwt": 0.1}
    )
    # Without the "before" row no FWT term is defined: 0.0, not NaN.
    assert make(3, None, STAGES_3).compute()["fwt"].item() == 0.0


def test_abilities_no_stage_trains_count_in_average_and_forgetting_only():
    # learned_at = [0, None, 1] over the first two rows of the 3-stage example, T = 1:
    #   bwt = math: 0.5 - 0.8 = -0.3          (code is never trained)
    #   fwt = general, learned at 1: R[0][general] - 0.2 = 0.3 - 0.2 = 0.1
    metric = make(2, BEFORE_3, STAGES_3[:2], learned_at=(0, None, 1))
    assert_derived(metric.compute(), {"average_accuracy": 0.5, "forgetting": [0.3, -0.6, 0.0], "bwt": -0.3, "fwt": 0.1})


def test_compute_before_any_stage_row_raises():
    metric = make(3, BEFORE_3, [])
    with pytest.raises(RuntimeError, match="at least one stage row"):
        metric.compute()


def test_update_overwrites_the_row():
    metric = make(3, BEFORE_3, [[0.2, 0.2, 0.2]])  # an early validation inside stage 0
    metric.update(1, torch.tensor(STAGES_3[0]))  # the validation at the end of stage 0 replaces it
    metric.update(2, torch.tensor(STAGES_3[1]))
    metric.update(3, torch.tensor([0.0, 0.0, 0.0]))
    metric.update(3, torch.tensor(STAGES_3[2]))
    torch.testing.assert_close(metric.stage_rows, torch.tensor(STAGES_3))
    assert_derived(metric.compute(), EXPECTED_3)


def test_before_and_stage_rows_are_read_only_copies():
    metric = make(3, BEFORE_3, STAGES_3[:1])
    torch.testing.assert_close(metric.before, torch.tensor(BEFORE_3))
    stage_rows = metric.stage_rows
    assert stage_rows.shape == (3, 3)
    torch.testing.assert_close(stage_rows[0], torch.tensor(STAGES_3[0]))
    assert stage_rows[1:].isnan().all()
    stage_rows[0] = 0.0
    metric.before[0] = 1.0
    torch.testing.assert_close(metric.stage_rows[0], torch.tensor(STAGES_3[0]))
    torch.testing.assert_close(metric.before, torch.tensor(BEFORE_3))
    with pytest.raises(AttributeError):
        metric.before = torch.zeros(3)


def test_state_is_saved_and_restored_through_a_parent_module():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 2)
            self.cl = AccuracyMatrix(ABILITIES, num_stages=3, learned_at=[0, 1, 2])

    trained = Parent()
    trained.cl.update(0, torch.tensor(BEFORE_3))
    trained.cl.update(1, torch.tensor(STAGES_3[0]))
    state = trained.state_dict()
    assert "cl.matrix" in state
    assert state["cl.matrix"].dtype == torch.float32
    assert state["cl.matrix"].shape == (4, 3)

    resumed = Parent()
    assert resumed.cl.matrix.isnan().all()
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.cl.matrix, trained.cl.matrix, equal_nan=True)
    # The resumed run goes on recording the later stages into the restored matrix.
    resumed.cl.update(2, torch.tensor(STAGES_3[1]))
    resumed.cl.update(3, torch.tensor(STAGES_3[2]))
    assert_derived(resumed.cl.compute(), EXPECTED_3)


def test_reset_clears_every_row():
    metric = make(3, BEFORE_3, STAGES_3)
    metric.reset()
    assert metric.matrix.isnan().all()


def test_ddp_reduction_of_identical_ranks_is_exact_and_keeps_missing_rows():
    def gather_two_identical_ranks(tensor, group=None):
        return [tensor.clone(), tensor.clone()]

    metric = AccuracyMatrix(
        ABILITIES,
        num_stages=3,
        learned_at=[0, 1, 2],
        dist_sync_fn=gather_two_identical_ranks,
        distributed_available_fn=lambda: True,
    )
    metric.update(0, torch.tensor(BEFORE_3))
    metric.update(1, torch.tensor(STAGES_3[0]))
    metric.update(2, torch.tensor(STAGES_3[1]))
    local = metric.matrix.clone()
    with metric.sync_context(dist_sync_fn=gather_two_identical_ranks, distributed_available=lambda: True):
        assert torch.equal(metric.matrix[:3], local[:3])
        assert metric.matrix[3].isnan().all()
    assert_derived(metric.compute(), {"average_accuracy": 0.5, "forgetting": [0.3, -0.6, 0.0], "bwt": -0.3, "fwt": 0.1})


def test_forward_is_refused():
    metric = make(3, None, [])
    with pytest.raises(NotImplementedError, match="update"):
        metric(1, torch.tensor(STAGES_3[0]))


def test_docstring_example_runs():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(accuracy_matrix_module.AccuracyMatrix, globs={"AccuracyMatrix": AccuracyMatrix}):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0
    assert results.failed == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"abilities": []}, "abilities"),
        ({"abilities": ["math", "math", "code"]}, "abilities must be unique"),
        ({"num_stages": 0}, "num_stages"),
        ({"num_stages": 2.0}, "num_stages"),
        ({"learned_at": [0, 1]}, "learned_at"),
        ({"learned_at": [0, 1, 3]}, r"learned_at for ability 'general'.*\[0, 2\]"),
        ({"learned_at": [-1, 1, 2]}, "learned_at for ability 'math'"),
        ({"learned_at": [0, 1.0, 2]}, "learned_at for ability 'code'"),
    ],
)
def test_constructor_argument_errors(kwargs, match):
    arguments = {"abilities": ABILITIES, "num_stages": 3, "learned_at": [0, 1, 2], **kwargs}
    with pytest.raises(ValueError, match=match):
        AccuracyMatrix(**arguments)


@pytest.mark.parametrize(
    ("row", "scores", "match"),
    [
        (-1, [0.5, 0.5, 0.5], r"row must be an int in \[0, 3\]"),
        (4, [0.5, 0.5, 0.5], "row"),
        (1.0, [0.5, 0.5, 0.5], "row"),
        (1, [0.5, 0.5], r"scores must have shape \[3\]"),
        (1, [[0.5, 0.5, 0.5]], "scores must have shape"),
        (1, [0.5, 1.5, 0.5], r"scores must lie in \[0, 1\]"),
        (1, [0.5, -0.1, 0.5], r"scores must lie in \[0, 1\]"),
        (1, [0.5, math.nan, 0.5], r"scores must lie in \[0, 1\]"),
    ],
)
def test_update_argument_errors(row, scores, match):
    metric = make(3, None, [])
    with pytest.raises(ValueError, match=match):
        metric.update(row, torch.tensor(scores))
    assert metric.matrix.isnan().all()
