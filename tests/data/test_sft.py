import torch

from hft_lightning.data.example import Example
from hft_lightning.data.sft import IGNORE_INDEX, SFTCollator, SFTDataset, encode_example, encode_prompt


def test_only_the_assistant_turn_is_trained(tiny_data):
    tokenizer = tiny_data.tokenizer
    example = tiny_data.abilities[1].train[0]
    encoded = encode_example(tokenizer, example)
    trained = encoded["labels"][encoded["labels"] != IGNORE_INDEX]
    assert tokenizer.decode(trained) == example.response + tokenizer.eos_token
    prompt = encode_prompt(tokenizer, example)
    # the prompt (with the assistant header) is a prefix of the full sequence and entirely masked
    assert torch.equal(encoded["input_ids"][: len(prompt)], prompt)
    assert (encoded["labels"][: len(prompt)] == IGNORE_INDEX).all()
    assert (encoded["labels"][len(prompt) : len(prompt) + len(trained)] != IGNORE_INDEX).all()


def test_code_indentation_survives_the_tokenizer(tiny_data):
    tokenizer = tiny_data.tokenizer
    source = "def get_value(x):\n    return x + 3"
    assert tokenizer.decode(tokenizer(source, add_special_tokens=False)["input_ids"]) == source
    assert all(len(t.lstrip("Ġ")) <= 1 for t in tokenizer.tokenize("12345") if t.lstrip("Ġ").isdigit())


def test_collator_pads_training_right_and_prompts_left(tiny_data):
    tokenizer = tiny_data.tokenizer
    examples = [Example("Hi", "a"), Example("A much longer question here", "a much longer answer")]
    items = [SFTDataset(examples, tokenizer, with_prompt=True)[i] for i in range(2)]
    batch = SFTCollator(tokenizer.pad_token_id)(items)
    short = len(items[0]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0, :short].all() and not batch["attention_mask"][0, short:].any()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    short_prompt = len(items[0]["prompt_ids"])
    width = batch["prompt_ids"].shape[1]
    assert batch["prompt_attention_mask"][0, width - short_prompt :].all()
    assert not batch["prompt_attention_mask"][0, : width - short_prompt].any()
    assert batch["examples"] == examples


def _trained_spans(labels: torch.Tensor) -> list[list[int]]:
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels.tolist():
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return spans


def test_every_assistant_turn_of_a_conversation_is_trained_and_nothing_else(tiny_data):
    tokenizer = tiny_data.tokenizer
    history = [
        {"role": "system", "content": "Answer in capitals."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": " HI\n  THERE"},
        {"role": "user", "content": "Again?"},
    ]
    example = Example(prompt="Once more.", response="HI.", history=history)
    encoded = encode_example(tokenizer, example)
    # token by token: the trained tokens are exactly the template's rendering of each assistant turn, in order
    assistant = [m["content"] for m in example.messages if m["role"] == "assistant"]
    spans = _trained_spans(encoded["labels"])
    assert [tokenizer.decode(span) for span in spans] == [text + tokenizer.eos_token for text in assistant]
    for span, text in zip(spans, assistant, strict=True):
        assert span == tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    rendered = tokenizer.decode(encoded["input_ids"])
    assert rendered.startswith("<|system|>\nAnswer in capitals.<|end|>\n<|user|>\nSay hi.<|end|>\n<|assistant|>\n")
    # generation is prompted with the whole conversation before the last assistant turn
    prompt = encode_prompt(tokenizer, example)
    assert tokenizer.decode(prompt) == rendered[: rendered.rindex("HI.<|end|>")]
    assert torch.equal(encoded["input_ids"][: len(prompt)], prompt)
