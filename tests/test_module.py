import copy

import pytest
import torch
from torch.nn import functional as F

from hft_lightning import HFTModule
from hft_lightning.errors import ConfigError


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 32, "num_heads": 3}, r"model\.hidden_size=32 must be divisible by model\.num_heads=3"),
        ({"num_layers": 0}, r"model\.num_layers must be positive"),
        ({"max_new_tokens": 0}, r"model\.max_new_tokens must be positive"),
        ({"warmup_steps": -1}, r"model\.warmup_steps and model\.weight_decay must be >= 0"),
    ],
)
def test_bad_model_arguments_name_the_field(tiny_data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        HFTModule(tiny_data.tokenizer, **overrides)


def test_greedy_generation_returns_one_decoded_response_per_prompt(tiny_data):
    from hft_lightning.data.sft import SFTCollator, SFTDataset

    module = HFTModule(tiny_data.tokenizer, hidden_size=32, num_layers=1, num_heads=2, max_new_tokens=5)
    dataset = SFTDataset(tiny_data.abilities[0].val[:3], tiny_data.tokenizer, with_prompt=True)
    batch = SFTCollator(tiny_data.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    responses = module.generate(batch["prompt_ids"], batch["prompt_attention_mask"])
    assert len(responses) == 3 and all(isinstance(r, str) for r in responses)
    assert all(tiny_data.tokenizer.eos_token not in r for r in responses)


def test_a_pretrained_checkpoint_is_loaded_in_fp32_train_mode_with_its_stop_tokens(tiny_pretrained):
    from transformers import AutoModelForCausalLM

    from hft_lightning.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_pretrained))
    module = HFTModule(tokenizer, name_or_path=str(tiny_pretrained))
    reference = AutoModelForCausalLM.from_pretrained(tiny_pretrained)
    assert type(module.model) is type(reference) and module.model.training
    for (name, param), expected in zip(module.model.named_parameters(), reference.parameters(), strict=True):
        assert param.dtype == torch.float32 and torch.equal(param, expected), name
    assert module.generation_config.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_a_checkpoint_that_cannot_serve_names_the_model(tiny_data, tiny_pretrained):
    with pytest.raises(ConfigError, match=r"model\.name_or_path: cannot load a causal LM from '/nonexistent'"):
        HFTModule(tiny_data.tokenizer, name_or_path="/nonexistent")
    tokenizer = copy.deepcopy(tiny_data.tokenizer)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(100)])
    with pytest.raises(ConfigError, match=r"has 448 token embeddings but its tokenizer has 500 tokens"):
        HFTModule(tokenizer, name_or_path=str(tiny_pretrained))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_generation_is_plain_greedy_whatever_the_checkpoint_generation_config_sets(tiny_data, tmp_path, lora):
    from transformers import GenerationConfig

    from hft_lightning.data.sft import encode_prompt
    from hft_lightning.data.tokenizer import load_tokenizer
    from hft_lightning.lora import LoRA
    from tests.helpers import save_tiny_pretrained

    folder = save_tiny_pretrained(tmp_path, tiny_data)
    tokenizer = load_tokenizer(str(folder))
    prompt = encode_prompt(tokenizer, tiny_data.abilities[0].val[0])[None]
    plain = HFTModule(tokenizer, name_or_path=str(folder), max_new_tokens=6)
    expected = []  # argmax step by step: greedy decoding with nothing else
    with torch.no_grad():
        ids = prompt
        for _ in range(6):
            token = plain.model(input_ids=ids).logits[0, -1].argmax()
            if token in plain.generation_config.eos_token_id:
                break
            expected.append(int(token))
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    # a checkpoint shipping sampling-time settings that would change every greedy token
    GenerationConfig(repetition_penalty=1e4, no_repeat_ngram_size=1, suppress_tokens=expected[:1]).save_pretrained(
        folder
    )
    module = HFTModule(
        tokenizer, name_or_path=str(folder), max_new_tokens=6, lora=LoRA(target_modules=["q_proj"]) if lora else None
    )
    assert module.model.generation_config.repetition_penalty == 1e4  # kept for the saved model
    leaked = module.model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=module.generation_config
    )
    assert leaked[0, prompt.shape[1]] != expected[0]  # what transformers does with the checkpoint's config
    responses = module.generate(prompt, torch.ones_like(prompt))
    assert responses == [tokenizer.decode(expected, skip_special_tokens=True)]
    assert module.model.generation_config.repetition_penalty == 1e4


@pytest.mark.parametrize("packing", [None, 64], ids=["padded", "packed"])
def test_the_loss_is_the_mean_over_response_tokens_and_zero_when_a_batch_has_none(tiny_data, packing):
    module = HFTModule(tiny_data.tokenizer, hidden_size=32, num_layers=1, num_heads=2, packing=packing)
    batch = tiny_data.collate([("math", 0), ("code", 1), ("general", 2)])
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    torch.testing.assert_close(module.sft_loss(batch), module.model(**inputs).loss)  # transformers' own mean
    # every example truncated before its response: nothing to train, and nothing NaN reaches the weights
    untrained = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    loss = module.sft_loss(untrained)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())


def test_without_a_term_the_training_step_is_the_sft_loss_bit_for_bit(tiny_data):
    """The training step computes exactly what it computed before loss terms existed (the formula below)."""
    module = HFTModule(tiny_data.tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    batch = tiny_data.collate([("code", i) for i in range(4)])
    module.log = lambda *args, **kwargs: None  # no trainer
    loss = module.training_step(batch, 0)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = logits.logits.float()
    targets = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    summed = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    expected = summed / (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
    assert torch.equal(loss, expected) and torch.equal(module.sft_loss(batch), expected)
    for g, e in zip(grads, torch.autograd.grad(expected, list(module.parameters())), strict=True):
        assert torch.equal(g, e)
