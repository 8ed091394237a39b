import json

import pytest

from hft_lightning import StagedDataModule
from hft_lightning.data.files import JsonlFile, ParquetFile, open_data_files
from hft_lightning.data.shapes import to_example
from hft_lightning.data.source import AbilitySource
from hft_lightning.errors import ConfigError
from tests.data.files import FORMS, WRITERS, records, write_jsonl, write_parquet


def _load(train, **fields):
    source = AbilitySource(**{"name": "mine", "train": str(train), "scorer": "exact_match", **fields})
    return source.load(num_train=None, num_val=1000, seed=0)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("layout", ["file", "directory"])
def test_every_record_comes_back_as_its_example(tmp_path, kind, form, layout):
    data, shape = records(form, 40), FORMS[form]
    if layout == "file":
        path = WRITERS[kind](tmp_path / f"train.{kind}", data)
    else:
        path = tmp_path / "train"
        path.mkdir()
        WRITERS[kind](path / f"b.{kind}", data[25:])
        WRITERS[kind](path / f"a.{kind}", data[:25])  # files are read in name order, whatever their creation order
        (path / "notes.txt").write_text("not data")
    ability = _load(path, val_fraction=0.25)
    train, val = list(ability.train), list(ability.val)
    assert len(train) + len(val) == 40 and train and val
    assert {e.prompt for e in train}.isdisjoint(e.prompt for e in val)
    expected = [to_example(r, shape) for r in data]
    for example in (*train, *val):
        assert example.reference == {"answer": example.response}
        example.reference = {}
    assert sorted(train + val, key=repr) == sorted(expected, key=repr)
    assert [e.prompt for e in train] == [e.prompt for e in expected if e.prompt in {t.prompt for t in train}]


def test_a_directory_detects_the_shape_of_each_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", records("messages", 10))
    write_parquet(tmp_path / "b.parquet", records("alpaca", 10))
    ability = _load(tmp_path, val=str(tmp_path / "a.jsonl"))
    assert [e.history for e in ability.train[:10]] == [[{"role": "system", "content": "Be terse."}]] * 10
    assert ability.train[10].prompt == "Say the number.\n\n0"


def test_sharegpt_tags_configure_detection_and_conversion(tmp_path):
    openai = [
        {"chat": [{"role": "user", "text": f"Say {i}."}, {"role": "assistant", "text": f"{i}"}]} for i in range(10)
    ]
    path = write_jsonl(tmp_path / "openai.jsonl", openai)
    tags = {"conversations_key": "chat", "role_tag": "role", "content_tag": "text", "user_tag": "user",
            "assistant_tag": "assistant"}  # fmt: skip
    ability = _load(path, val=str(path), **tags)
    assert [(e.prompt, e.response) for e in ability.val[:2]] == [("Say 0.", "0"), ("Say 1.", "1")]
    with pytest.raises(ConfigError, match=r"openai\.jsonl:1: chat\[0\]\.role: unknown tag 'user'; allowed: sys"):
        _load(path, val=str(path), **{**tags, "user_tag": "human"})


def test_a_forced_shape_overrides_detection(tmp_path):
    both = [{"prompt": f"p{n}", "response": "r", "instruction": f"i{n}", "output": "o"} for n in range(20)]
    path = write_jsonl(tmp_path / "both.jsonl", both)
    assert {e.prompt for e in _load(path, val_fraction=0.5).train} <= {f"p{n}" for n in range(20)}
    assert {e.prompt for e in _load(path, shape="alpaca", val_fraction=0.5).train} <= {f"i{n}" for n in range(20)}


def test_jsonl_records_are_read_back_by_byte_offset(tmp_path):
    path = tmp_path / "data.jsonl"
    # multi-byte text, blank lines, no final newline
    raw = '{"a": "é"}\n\n   \n{"a": "naïve ☃"}\n{"a": 3}'.encode()
    path.write_bytes(raw)
    file = JsonlFile(path)
    scanned = list(file.scan())
    starts = [0, raw.index(b'{"a": "na'), raw.index(b'{"a": 3')]
    assert [key for key, _, _ in scanned] == starts
    assert [location for _, location, _ in scanned] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    assert [file.read(key) for key, _, _ in scanned] == [{"a": "é"}, {"a": "naïve ☃"}, {"a": 3}]


def test_parquet_records_are_read_back_by_row_across_row_groups(tmp_path):
    data = records("messages", 10)
    file = ParquetFile(write_parquet(tmp_path / "data.parquet", data, row_group_size=3))
    assert [(key, location) for key, location, _ in file.scan()] == [(r, f"{file.path}: row {r}") for r in range(10)]
    assert [file.read(key) for key in (9, 0, 4, 3, 8)] == [data[key] for key in (9, 0, 4, 3, 8)]


def _error(tmp_path, lines: list[str], **fields) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    source = AbilitySource(**{"name": "mine", "train": str(path), "scorer": "exact_match", **fields})
    with pytest.raises(ConfigError) as error:
        StagedDataModule(abilities=["builtin:math", source], num_train=10, num_val=2)
    return str(error.value).replace(str(path), "data.jsonl")


GOOD = json.dumps({"prompt": "p", "response": "r"})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([GOOD, GOOD, '{"prompt": "p", "response": "r"'],
         "data.jsonl:3: malformed JSON: Expecting ',' delimiter at column 32"),
        ([GOOD, '{"prompt": "p"}'], "data.jsonl:2: response: missing"),
        ([GOOD, "", '{"prompt": "p", "response": ""}'], "data.jsonl:3: response: the response is empty"),
        ([json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "a"}]})],
         "data.jsonl:1: messages[1].role: unknown role 'tool'; allowed: system, user, assistant"),
        (['{"text": "t"}'], "data.jsonl:1: the keys ['text'] match no shape; expected the keys of one of messages: "
                            "messages; sharegpt: conversations; prompt_completion: prompt, completion; "
                            "prompt_response: prompt, response; alpaca: instruction, output"),
        ([json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f"}]})],
         "data.jsonl:1: conversations[1].from: tool turns are not supported yet; remove them or the records holding "
         "them"),
        ([json.dumps({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant"}]})],
         "data.jsonl:1: completion[0].content: missing"),
        (["[1]"], "data.jsonl:1: a record must be a JSON object, got array"),
        ([GOOD, json.dumps({"instruction": "i", "output": "o"})], "data.jsonl:2: prompt: missing"),  # shape per file
        ([], "data.abilities['mine'].train: no training examples in data.jsonl"),
        ([GOOD], "data.abilities['mine'].val: no validation examples in data.jsonl; raise val_fraction=0.1 or "
                 "give a val file"),
    ],
)  # fmt: skip
def test_bad_data_names_the_file_line_and_field_at_construction(tmp_path, lines, message):
    assert _error(tmp_path, lines) == message


def test_a_line_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(ConfigError) as error:
        _load(path)
    assert str(error.value) == f"{path}:2: not UTF-8 text: invalid start byte at byte 12"


def test_a_bad_parquet_row_names_the_file_row_and_field(tmp_path):
    data = [{"prompt": "p", "response": "r"}] * 5 + [{"prompt": "p", "response": " "}]
    path = write_parquet(tmp_path / "data.parquet", data, row_group_size=4)
    with pytest.raises(ConfigError) as error:
        _load(path)
    assert str(error.value) == f"{path}: row 5: response: the response is empty"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.jsonl", "data.abilities['mine'].train: {d}/missing.jsonl does not exist"),
        (lambda d: d, "data.abilities['mine'].train: directory {d} holds no .jsonl or .parquet file"),
        (lambda d: write_jsonl(d / "data.json", []), "data.abilities['mine'].train: {d}/data.json is not a data file; "
                                                     "expected a .jsonl or .parquet file"),
    ],
)  # fmt: skip
def test_bad_paths_name_the_field(tmp_path, make, message):
    with pytest.raises(ConfigError) as error:
        _load(make(tmp_path))
    assert str(error.value) == message.format(d=tmp_path)


def test_an_unreadable_parquet_file_is_a_config_error(tmp_path):
    (tmp_path / "data.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match=r"abilities\['mine'\]\.train: .*data\.parquet is not a readable parquet"):
        open_data_files(str(tmp_path / "data.parquet"), "data.abilities['mine'].train")


def test_skip_bad_lines_keeps_every_valid_record_and_warns_with_the_count(tmp_path):
    lines = [json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) for i in range(10)]
    lines[3], lines[7] = "{oops", json.dumps({"prompt": "p", "response": ""})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines))
    with pytest.warns(UserWarning) as warnings:
        ability = _load(
            path, val=str(write_jsonl(tmp_path / "val.jsonl", records("prompt_response", 2))), skip_bad_lines=True
        )
    [message] = [str(w.message) for w in warnings]
    assert message.startswith(
        f"data.abilities['mine'].train: skipped 2 bad records (skip_bad_lines); the first: {path}:4: malformed JSON"
    )
    assert [e.prompt for e in ability.train] == [f"p{i}" for i in (0, 1, 2, 4, 5, 6, 8, 9)]
