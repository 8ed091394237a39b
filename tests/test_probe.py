import pytest
import torch

from hft_lightning import StagedDataModule
from hft_lightning.errors import ConfigError
from hft_lightning.probe import Probe


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


@pytest.mark.parametrize("measure", ["loss", "gradient"])
def test_a_probe_sample_with_no_response_token_names_the_ability_and_max_length(sources, base_model, measure):
    truncated = StagedDataModule(abilities=sources, num_val=40, vocab_size=300, max_length=4)
    probe = Probe(base_model, truncated)
    with pytest.raises(ConfigError, match=r"abilities\['easy'\]\.val: none of the 8 probe examples .*max_length=4"):
        getattr(probe, measure)("easy", examples=8, batch_size=4)
    # the budget is capped by the validation split: the message counts what was measured
    with pytest.raises(ConfigError, match=r"none of the 40 probe examples"):
        getattr(probe, measure)("easy", examples=100, batch_size=16)


def test_the_score_judges_the_modules_generations_of_the_seeded_sample(easy_and_hard, base_model, monkeypatch):
    def generate(prompt_ids, prompt_attention_mask):  # "yes" to prompts with an odd token id sum, whatever the batching
        return [
            "yes" if int(ids[mask.bool()].sum()) % 2 else "no"
            for ids, mask in zip(prompt_ids, prompt_attention_mask, strict=True)
        ]

    monkeypatch.setattr(base_model, "generate", generate)
    probe = Probe(base_model, easy_and_hard)
    batch = next(probe.batches("easy", examples=10, batch_size=10))
    expected = generate(batch["prompt_ids"], batch["prompt_attention_mask"]).count("yes") / 10
    assert 0 < expected < 1
    assert probe.score("easy", examples=10, batch_size=3) == expected
    assert probe.score("hard", examples=10, batch_size=3) == 0  # its references are random letters
    assert base_model.training  # the probe restores the mode it found


def test_a_larger_sample_contains_a_smaller_one_and_abilities_draw_independently(easy_and_hard, base_model):
    probe = Probe(base_model, easy_and_hard)
    prompts = {
        (ability, size): [e.prompt for b in probe.batches(ability, size, batch_size=40) for e in b["examples"]]
        for ability in ("easy", "hard")
        for size in (5, 12)
    }
    assert prompts["easy", 12][:5] == prompts["easy", 5]
    assert prompts["easy", 12] != prompts["hard", 12]  # both splits hold prompts Q0? .. Q39?, drawn apart


def test_an_ability_without_scorer_cannot_be_scored(sources, base_model):
    from hft_lightning.data.source import AbilitySource

    unscored = AbilitySource("easy", sources[1].train, "none", sources[1].val)
    probe = Probe(base_model, StagedDataModule(abilities=[sources[0], unscored], num_val=40, vocab_size=300))
    with pytest.raises(ConfigError, match=r"abilities\['easy'\] has scorer 'none'"):
        probe.score("easy", examples=4, batch_size=4)
