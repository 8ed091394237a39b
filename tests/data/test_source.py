import dataclasses
import re

import pytest

from hft_lightning import StagedDataModule
from hft_lightning.cli import main
from hft_lightning.data.source import AbilitySource
from hft_lightning.errors import ConfigError
from tests.data.files import records, write_jsonl
from tests.test_cli import TINY_FLAGS


def test_without_a_val_file_the_split_is_disjoint_deterministic_and_capped_at_num_val(tmp_path):
    path = str(write_jsonl(tmp_path / "data.jsonl", records("prompt_response", 200)))
    source = AbilitySource("mine", path, "exact_match", val_fraction=0.3)
    full = source.load(num_train=None, num_val=1000, seed=0)
    train, val = [e.prompt for e in full.train], [e.prompt for e in full.val]
    assert len(train) + len(val) == 200 and 40 <= len(val) <= 80
    assert set(train).isdisjoint(val)
    again = source.load(num_train=None, num_val=10, seed=0)
    assert [e.prompt for e in again.train] == train and [e.prompt for e in again.val] == val[:10]


def test_a_val_file_is_used_whole_for_validation_up_to_num_val(tmp_path):
    train = str(write_jsonl(tmp_path / "train.jsonl", records("alpaca", 8)))
    val = str(write_jsonl(tmp_path / "val.jsonl", records("prompt_response", 30)))
    ability = AbilitySource("mine", train, "contains", val=val).load(num_train=None, num_val=25, seed=0)
    assert len(ability.train) == 8 and [e.prompt for e in ability.val] == [f"Say {i}." for i in range(25)]


def test_num_train_keeps_the_first_training_records(tmp_path):
    path = str(write_jsonl(tmp_path / "data.jsonl", records("prompt_response", 30)))
    source = AbilitySource("mine", path, "contains", val=path)
    first = source.load(num_train=5, num_val=1, seed=0).train
    assert [e.prompt for e in first] == [e.prompt for e in source.load(num_train=None, num_val=1, seed=0).train[:5]]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "my ability"}, r"data\.abilities\['my ability'\]\.name must be letters, digits, '_' or '-'"),
        (
            {"shape": "openai"},
            r"\.shape: unknown shape 'openai'; allowed: auto, messages, sharegpt, prompt_completion, "
            r"prompt_response, alpaca",
        ),
        (
            {"user_tag": "user", "shape": "messages"},
            r"\.user_tag is used by the sharegpt shape only, but shape is 'messages'",
        ),
        ({"conversations_key": ""}, r"\.conversations_key must be a non-empty string"),
        ({"assistant_tag": "human"}, r"user_tag, assistant_tag and system_tag must differ, and so must role_tag and"),
        ({"content_tag": "from"}, r"user_tag, assistant_tag and system_tag must differ, and so must role_tag and"),
        ({"scorer": "bleu"}, r"\.scorer: unknown scorer 'bleu'; allowed: exact_match, code_exec, contains, none"),
        ({"val_fraction": 1.0}, r"\.val_fraction must be in \(0, 1\), got 1\.0"),
        ({"answer_pattern": "(x"}, r"\.answer_pattern '\(x' is not a regular expression: missing \)"),
        ({"answer_pattern": "x"}, r"\.answer_pattern 'x' needs a group around the answer"),
        ({"answer_pattern": "(x)", "scorer": "none"}, r"\.answer_pattern is used by the exact_match and contains"),
    ],
)
def test_bad_source_fields_are_named_before_any_file_is_read(fields, message):
    source = AbilitySource(**{"name": "mine", "train": "/nonexistent.jsonl", "scorer": "exact_match", **fields})
    with pytest.raises(ConfigError, match=message):
        StagedDataModule(abilities=["builtin:math", source])


def test_the_tokenizer_learns_the_system_prompts_and_earlier_turns(tmp_path):
    data = [
        {"messages": [{"role": "system", "content": "Zyxwvut " * 30}, {"role": "user", "content": "Hi."},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Qwertyuiop " * 30},
                      {"role": "assistant", "content": "Bye."}]}
    ] * 4  # fmt: skip
    path = str(write_jsonl(tmp_path / "chat.jsonl", data))
    tokenizer = StagedDataModule(["builtin:math", AbilitySource("chat", path, "none", val=path)], num_train=8).tokenizer
    assert len(tokenizer.tokenize(" Zyxwvut")) == 1 and len(tokenizer.tokenize(" Qwertyuiop")) == 1


def test_the_command_line_parses_file_abilities_from_yaml(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", records("messages", 20))
    openai = write_jsonl(tmp_path / "openai.jsonl", [{"chat": r["messages"]} for r in records("messages", 4)])
    config = tmp_path / "config.yaml"
    config.write_text(f"""
data:
  abilities:
    - builtin:math
    - name: chat
      train: {chat}
      val: {chat}
      scorer: contains
      answer_pattern: '(\\d+)'
    - {{name: words, train: {chat}, scorer: none, shape: messages, val_fraction: 0.5, skip_bad_lines: true}}
    - {{name: openai, train: {openai}, val: {openai}, scorer: none, conversations_key: chat, role_tag: role,
        content_tag: content, user_tag: user, assistant_tag: assistant}}
""")
    cli = main(["--config", str(config), *TINY_FLAGS], run=False)
    declared = cli.datamodule.abilities
    assert [a.name for a in declared] == ["math", "chat", "words", "openai"]
    assert declared[3].val[0].messages == records("messages", 1)[0]["messages"]
    assert [e.reference for e in declared[1].val[:2]] == [{"answer": "0"}, {"answer": "1"}]
    assert declared[2].scorer is None
    sources = cli.config.data.abilities
    assert sources[0] == "builtin:math"
    assert (sources[2].name, sources[2].shape, sources[2].val_fraction, sources[2].skip_bad_lines) == (
        "words",
        "messages",
        0.5,
        True,
    )


def test_help_documents_every_field_of_a_file_ability(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--data.abilities.help"])
    printed = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(AbilitySource):  # the flag, its metavar, then at least six words of text
        assert re.search(rf"--data\.abilities\.{field.name} \S+ ([^(\s]\S* ){{6,}}", printed), field.name
