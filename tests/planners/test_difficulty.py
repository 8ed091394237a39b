import pytest

from hft_lightning.errors import ConfigError
from hft_lightning.planners import Difficulty, Probe


def test_the_easy_ability_trains_first_and_the_probe_is_deterministic(easy_and_hard, base_model):
    module = base_model
    planner = Difficulty(examples=12, batch_size=5)
    probe = Probe(module, easy_and_hard)
    first, second = planner.order(["hard", "easy"], probe), planner.order(["hard", "easy"], probe)
    losses = first.measurements["difficulty"]["loss_per_token"]
    assert first.order == ["easy", "hard"] and losses["easy"] < 0.5 * losses["hard"]
    assert second.measurements == first.measurements  # same sample, same model: bit-identical
    assert probe.examples_used == 2 * 2 * 12
    assert first.why["easy"].startswith(f"loss {losses['easy']:.3f} nats/token (easiest 1 of 2)")
    assert module.training  # the probe restores the mode it found


def test_prerequisites_override_difficulty(easy_and_hard, base_model):
    decision = Difficulty(examples=4, prerequisites={"easy": ["hard"]}).order(
        ["hard", "easy"], Probe(base_model, easy_and_hard)
    )
    assert decision.order == ["hard", "easy"] and decision.why["easy"].endswith("; builds on hard")


@pytest.mark.parametrize(("field", "value"), [("examples", 0), ("batch_size", -1)])
def test_the_probe_budget_must_be_positive(field, value):
    with pytest.raises(ConfigError, match=rf"Curriculum\.planner\.{field} must be a positive number"):
        Difficulty(**{field: value})
