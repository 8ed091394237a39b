import pytest

from hft_lightning.data.example import Example
from hft_lightning.data.sft import IGNORE_INDEX, encode_example
from hft_lightning.data.tokenizer import CHAT_TEMPLATE, load_tokenizer
from hft_lightning.errors import ConfigError
from tests.helpers import CHATML, save_tiny_pretrained


def test_a_pretrained_tokenizer_keeps_its_template_and_pads_with_its_eos(tiny_pretrained):
    tokenizer = load_tokenizer(str(tiny_pretrained))
    assert tokenizer.is_fast and tokenizer.chat_template == CHATML
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id


def test_a_tokenizer_without_a_chat_template_gets_the_default_one(tmp_path, tiny_data):
    path = save_tiny_pretrained(tmp_path, tiny_data, chat_template=None)
    with pytest.warns(UserWarning, match="has no chat template; using hft_lightning's"):
        tokenizer = load_tokenizer(str(path))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    encoded = encode_example(tokenizer, Example("Say hi.", "Hi!"))
    assert tokenizer.decode(encoded["input_ids"]) == "<|user|>\nSay hi.<|im_end|>\n<|assistant|>\nHi!<|im_end|>\n"
    trained = encoded["labels"][encoded["labels"] != IGNORE_INDEX]
    assert trained.tolist() == tokenizer("Hi!<|im_end|>", add_special_tokens=False)["input_ids"]


def test_a_tokenizer_that_cannot_serve_names_the_model(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match=r"model\.name_or_path: cannot load the tokenizer of '/nonexistent/model'"):
        load_tokenizer("/nonexistent/model")
    path = save_tiny_pretrained(tmp_path, tiny_data)
    config = path / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"eos_token": "<|im_end|>"', '"eos_token": null'))
    with pytest.raises(ConfigError, match=rf"the tokenizer of '{path}' has no eos_token"):
        load_tokenizer(str(path))
