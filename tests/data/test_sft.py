import pytest
import torch

from hft_lightning.data.example import Example
from hft_lightning.data.sft import (
    IGNORE_INDEX,
    SFTCollator,
    SFTDataset,
    encode_example,
    encode_prompt,
    trained_tokens,
)


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


def _multi_turn() -> Example:
    history = [
        {"role": "system", "content": "Answer in capitals."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": " HI\n  THERE"},
        {"role": "user", "content": "Again?"},
    ]
    return Example(prompt="Once more.", response="HI.", history=history)


def _chatml(tokenizer, messages: list[dict[str, str]], trained: set[int]) -> tuple[list[int], list[int]]:
    """Oracle: ChatML's pieces tokenized one by one; trained are the content and ``<|im_end|>`` of turns ``trained``."""
    expected_ids, expected_labels = [], []
    for turn, message in enumerate(messages):
        header = tokenizer(f"<|im_start|>{message['role']}\n", add_special_tokens=False)["input_ids"]
        body = tokenizer(message["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        expected_ids += header + body + newline
        expected_labels += [IGNORE_INDEX] * len(header) + (body if turn in trained else [IGNORE_INDEX] * len(body))
        expected_labels += [IGNORE_INDEX] * len(newline)
    return expected_ids, expected_labels


def test_masking_follows_a_pretrained_template_without_generation_tags_token_by_token(tiny_pretrained):
    from hft_lightning.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_pretrained))  # ChatML, no {% generation %}: most real templates
    example = _multi_turn()
    encoded = encode_example(tokenizer, example)
    assistant = {turn for turn, message in enumerate(example.messages) if message["role"] == "assistant"}
    expected_ids, expected_labels = _chatml(tokenizer, example.messages, assistant)
    assert encoded["input_ids"].tolist() == expected_ids
    assert encoded["labels"].tolist() == expected_labels
    prompt = encode_prompt(tokenizer, example)
    assert tokenizer.decode(prompt).endswith("<|im_start|>user\nOnce more.<|im_end|>\n<|im_start|>assistant\n")
    assert torch.equal(encoded["input_ids"][: len(prompt)], prompt)


def test_prefix_masking_equals_the_generation_mask_of_the_embedded_template(tiny_data):
    tokenizer = tiny_data.tokenizer
    examples = [_multi_turn(), *(e for a in tiny_data.abilities for e in a.train[:20])]
    for example in examples:
        reference = tokenizer.apply_chat_template(example.messages, return_dict=True, return_assistant_tokens_mask=True)
        ids = torch.tensor(reference["input_ids"])
        labels = ids.masked_fill(torch.tensor(reference["assistant_masks"]) == 0, IGNORE_INDEX)
        encoded = encode_example(tokenizer, example)
        assert torch.equal(encoded["input_ids"], ids) and torch.equal(encoded["labels"], labels)


def test_a_template_that_rewrites_earlier_turns_cannot_be_masked(tiny_data):
    import copy

    from hft_lightning.errors import ConfigError

    tokenizer = copy.deepcopy(tiny_data.tokenizer)
    # renders only the last message: the conversation so far is not a prefix of the whole one
    tokenizer.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(ConfigError, match="renders the conversation before turn 2 differently"):
        encode_example(tokenizer, _multi_turn())


def test_long_examples_keep_their_first_tokens_and_prompts_their_last_and_are_counted(tiny_data):
    tokenizer = tiny_data.tokenizer
    examples = [
        Example("Hi", "a"),
        _multi_turn(),
        Example("A much longer question, far past the limit", "yes"),
        Example("Hi", "a much longer answer, far past the limit"),
    ]
    full = [encode_example(tokenizer, e) for e in examples]
    prompts = [encode_prompt(tokenizer, e) for e in examples]
    limit = len(full[0]["input_ids"]) + 1
    dataset = SFTDataset(examples, tokenizer, with_prompt=True, max_length=limit, name="data.abilities['x'].val")
    with pytest.warns(UserWarning, match=rf"data\.abilities\['x'\]\.val\[1\] has {len(full[1]['input_ids'])} tokens"):
        items = [dataset[i] for i in range(4)]
    # the last one keeps part of its response; the middle two keep none: their labels are all ignored
    assert (dataset.encoded, dataset.truncated, dataset.untrained) == (4, 3, 2)
    assert [int(trained_tokens(item["labels"])) for item in items] == [2, 0, 0, 4]
    for item, whole, prompt in zip(items, full, prompts, strict=True):
        for key in ("input_ids", "labels"):
            assert torch.equal(item[key], whole[key][:limit])
        assert torch.equal(item["prompt_ids"], prompt[-limit:])
    assert len(items[0]["input_ids"]) < limit and len(items[2]["input_ids"]) == limit


CAPITALS = [
    {"role": "system", "content": "Answer in capitals."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": " HI\n  THERE"},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "HI."},
]
SHARE_GPT = {"system": "system", "user": "human", "assistant": "gpt"}
SHAPED = {
    # LLaMA-Factory trains every assistant turn of a ShareGPT conversation, as the messages shape does
    "sharegpt": (
        {"conversations": [{"from": SHARE_GPT[m["role"]], "value": m["content"]} for m in CAPITALS]},
        CAPITALS,
        {2, 4},
    ),
    # TRL trains the completion only: an assistant turn inside the prompt is context
    "prompt_completion": ({"prompt": CAPITALS[:4], "completion": CAPITALS[4:]}, CAPITALS, {4}),
    "prompt_completion_standard": (
        {"prompt": "Say hi.", "completion": "HI."},
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "HI."}],
        {1},
    ),
}


@pytest.mark.parametrize("form", SHAPED)
def test_each_shape_read_from_a_file_trains_its_turns_token_by_token(form, tiny_data, tiny_pretrained, tmp_path):
    from hft_lightning.data.source import AbilitySource
    from hft_lightning.data.tokenizer import load_tokenizer
    from tests.data.files import write_jsonl

    record, messages, trained = SHAPED[form]
    path = str(write_jsonl(tmp_path / "data.jsonl", [record]))
    [example] = AbilitySource("mine", path, "none", val=path).load(num_train=None, num_val=1, seed=0).val
    assert example.messages == messages
    # a template without generation tags (ChatML): the rendering built piece by piece
    chatml = load_tokenizer(str(tiny_pretrained))
    encoded = encode_example(chatml, example)
    assert (encoded["input_ids"].tolist(), encoded["labels"].tolist()) == _chatml(chatml, messages, trained)
    # the embedded template, whose generation tags mark every assistant turn: the trained ones are kept
    embedded = tiny_data.tokenizer
    reference = embedded.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids = torch.tensor(reference["input_ids"])
    every_turn = _trained_spans(ids.masked_fill(torch.tensor(reference["assistant_masks"]) == 0, IGNORE_INDEX))
    assistant = [turn for turn, message in enumerate(messages) if message["role"] == "assistant"]
    encoded = encode_example(embedded, example)
    assert torch.equal(encoded["input_ids"], ids)
    kept = [span for span, turn in zip(every_turn, assistant, strict=True) if turn in trained]
    assert _trained_spans(encoded["labels"]) == kept
    # generation is prompted with everything before the last assistant turn, through the template
    assert chatml.decode(encode_prompt(chatml, example)).endswith(
        f"<|im_start|>user\n{messages[-2]['content']}<|im_end|>\n<|im_start|>assistant\n"
    )
