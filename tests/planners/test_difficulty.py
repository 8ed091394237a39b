import random

import lightning as L
import pytest
import torch

from hft_lightning import StagedDataModule
from hft_lightning.data.source import AbilitySource
from hft_lightning.errors import ConfigError
from hft_lightning.planners import Difficulty, Probe
from tests.data.files import write_jsonl
from tests.helpers import tiny_module

STEPS = 25


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two file abilities: ``easy`` always answers "yes", ``hard`` answers random letters."""
    root = tmp_path_factory.mktemp("abilities")
    letters = random.Random(0)
    sources = []
    for name, response in (("hard", lambda: "".join(letters.choices("abcdefghij", k=12))), ("easy", lambda: "yes")):
        for split in ("train", "val"):
            write_jsonl(
                root / f"{name}_{split}.jsonl", [{"prompt": f"Q{i}?", "response": response()} for i in range(40)]
            )
        sources.append(
            AbilitySource(name, str(root / f"{name}_train.jsonl"), "exact_match", str(root / f"{name}_val.jsonl"))
        )
    return sources


@pytest.fixture(scope="module")
def easy_and_hard(sources):
    return StagedDataModule(abilities=sources, num_val=40, batch_size=16, vocab_size=300)


@pytest.fixture(scope="module")
def base_model(easy_and_hard):
    """The tiny model after a few steps on both abilities: it has learned the easy one, not the random one."""
    L.seed_everything(0)
    module = tiny_module(easy_and_hard)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    items = [(a, i) for i in range(16) for a in ("easy", "hard")]
    for _ in range(STEPS):
        optimizer.zero_grad()
        module.sft_loss(easy_and_hard.collate(items)).backward()
        optimizer.step()
    return module


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


def test_the_loss_is_per_response_token_over_the_seeded_sample(easy_and_hard, base_model):
    module = base_model
    probe = Probe(module, easy_and_hard)
    batches = list(probe.batches("hard", examples=7, batch_size=3))
    assert [len(b["input_ids"]) for b in batches] == [3, 3, 1]
    with torch.no_grad():
        tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
        expected = sum(float(module.sft_loss(b)) * n for b, n in zip(batches, tokens, strict=True)) / sum(tokens)
    assert probe.loss("hard", examples=7, batch_size=3) == pytest.approx(expected, rel=1e-6)
    assert probe.loss("hard", examples=7, batch_size=7) == pytest.approx(expected, rel=1e-5)  # batching-invariant


def test_prerequisites_override_difficulty(easy_and_hard, base_model):
    decision = Difficulty(examples=4, prerequisites={"easy": ["hard"]}).order(
        ["hard", "easy"], Probe(base_model, easy_and_hard)
    )
    assert decision.order == ["hard", "easy"] and decision.why["easy"].endswith("; builds on hard")


@pytest.mark.parametrize(("field", "value"), [("examples", 0), ("batch_size", -1)])
def test_the_probe_budget_must_be_positive(field, value):
    with pytest.raises(ConfigError, match=rf"Curriculum\.planner\.{field} must be a positive number"):
        Difficulty(**{field: value})


@pytest.mark.parametrize("measure", ["loss", "gradient"])
def test_a_probe_sample_with_no_response_token_names_the_ability_and_max_length(sources, base_model, measure):
    truncated = StagedDataModule(abilities=sources, num_val=40, vocab_size=300, max_length=4)
    probe = Probe(base_model, truncated)
    with pytest.raises(ConfigError, match=r"abilities\['easy'\]\.val: none of the 8 probe examples .*max_length=4"):
        getattr(probe, measure)("easy", examples=8, batch_size=4)
    # the budget is capped by the validation split: the message counts what was measured
    with pytest.raises(ConfigError, match=r"none of the 40 probe examples"):
        getattr(probe, measure)("easy", examples=100, batch_size=16)
