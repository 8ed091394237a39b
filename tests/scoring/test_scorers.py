import json
import math
import re

import pytest

from hft_lightning import Curriculum, Stage, StagedDataModule
from hft_lightning.data.example import Example
from hft_lightning.data.source import AbilitySource
from hft_lightning.errors import ConfigError
from hft_lightning.scoring import ExactMatch, code_exec, contains, extract_answer, extract_program
from tests.data.files import records, write_jsonl
from tests.helpers import make_trainer, tiny_module

GSM8K = re.compile(r"####\s*(\S+)")


def _answer(answer: str) -> Example:
    return Example("q", "r", {"answer": answer})


def test_extract_answer_takes_the_first_group_of_the_last_match_or_the_stripped_text():
    assert extract_answer("so 3 + 4 = 7\n#### 7\n", GSM8K) == "7"
    assert extract_answer("#### 6 no wait #### 7", GSM8K) == "7"
    assert extract_answer("no answer line", GSM8K) is None
    assert extract_answer("  Paris.\n", None) == "Paris."


def test_exact_match_compares_extracted_answers():
    examples = [_answer("7"), _answer("7"), _answer("7")]
    assert ExactMatch(GSM8K)(["#### 7", "it is 7", "#### 70"], examples) == [True, False, False]
    assert ExactMatch()([" 7\n", "7.", "#### 7"], examples) == [True, False, False]


def test_exact_match_normalizes_both_answers_before_comparing():
    examples = [_answer("7")] * 3
    assert ExactMatch(GSM8K, normalize=int)(["#### 07", "#### 8", "no answer"], examples) == [True, False, False]
    assert ExactMatch(GSM8K)(["#### 07"], examples[:1]) == [False]


def test_contains_looks_for_the_reference_answer_in_the_generation():
    assert contains(["The capital is Paris.", "paris", "Rome"], [_answer("Paris")] * 3) == [True, False, False]


def test_code_exec_runs_the_tests_in_the_sandbox_and_unwraps_a_code_fence():
    tests = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
    programs = [
        "def add(a, b):\n    return a + b",
        "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
        "def add(a, b):\n    return a - b",
        "```\nimport os\nos._exit(0)\n```",
    ]
    assert code_exec(programs, [Example("q", "r", tests)] * 4) == [True, True, False, False]
    assert extract_program("```py\nx = 1\n") == "x = 1"  # an unclosed fence runs to the end


@pytest.mark.parametrize("scorer", ["exact_match", "contains"])
def test_the_answer_pattern_extracts_the_reference_answer_of_every_record(tmp_path, scorer):
    data = [{"prompt": f"{i} + 1?", "response": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(10)]
    path = write_jsonl(tmp_path / "math.jsonl", data)
    source = AbilitySource("sums", str(path), scorer, val=str(path), answer_pattern=r"####\s*(\S+)")
    ability = source.load(num_train=None, num_val=10, seed=0)
    assert [e.reference for e in ability.val] == [{"answer": str(i + 1)} for i in range(10)]
    assert ability.scorer(["1 + 1 = 2\n#### 2", "3, I think"], ability.val[1:3]) == [True, scorer == "contains"]


def test_a_response_the_answer_pattern_does_not_match_names_the_line(tmp_path):
    data = [{"prompt": "p", "response": "#### 1"}, {"prompt": "p", "response": "1"}]
    path = write_jsonl(tmp_path / "math.jsonl", data)
    source = AbilitySource("sums", str(path), "exact_match", answer_pattern=r"####\s*(\S+)")
    with pytest.raises(ConfigError) as error:
        source.load(num_train=None, num_val=10, seed=0)
    assert str(error.value) == rf"{path}:2: answer_pattern: '####\\s*(\\S+)' does not match the response"


def test_code_exec_reads_the_tests_field_of_every_record(tmp_path):
    data = [{"prompt": "add", "response": "def add(a, b): return a + b", "checks": ["assert add(1, 2) == 3"]}]
    path = write_jsonl(tmp_path / "code.jsonl", [*data, {"prompt": "p", "response": "r", "checks": "assert f()"}])
    source = AbilitySource("code", str(path), "code_exec", val=str(path), tests_field="checks")
    with pytest.raises(ConfigError) as error:
        source.load(num_train=None, num_val=10, seed=0)
    assert str(error.value) == f"{path}:2: checks: must be a non-empty list of test statements; got string"
    write_jsonl(path, [*data, {"prompt": "p", "response": "r"}])
    with pytest.raises(ConfigError, match=r"code\.jsonl:2: checks: must be a non-empty list of test .*; missing$"):
        source.load(num_train=None, num_val=10, seed=0)
    write_jsonl(path, data)
    ability = source.load(num_train=None, num_val=10, seed=0)
    assert ability.val[0].reference == {"tests": ["assert add(1, 2) == 3"]}
    assert ability.scorer(["def add(a, b):\n    return a + b"], ability.val) == [True]


def test_an_ability_with_no_scorer_is_trained_and_logged_by_loss_with_a_null_report_column(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", records("messages", 12))
    data = StagedDataModule(
        abilities=["builtin:math", AbilitySource("chat", str(chat), "none", val=str(chat))],
        num_train=32, num_val=4, batch_size=4, val_batch_size=4, vocab_size=300,
    )  # fmt: skip
    assert data.abilities[1].scorer is None
    stages = [Stage("chat", 2, {"chat": 1.0}), Stage("unified", 2, {"math": 1.0, "chat": 1.0})]
    trainer = make_trainer(tmp_path, [Curriculum(stages)])
    trainer.fit(tiny_module(data), datamodule=data)
    assert "val/chat/loss" in trainer.callback_metrics and "val/math/score" in trainer.callback_metrics
    assert "val/chat/score" not in trainer.callback_metrics
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["abilities"] == ["math", "chat"]
    assert metrics["before"][1] is None and [row[1] for row in metrics["accuracy_matrix"]] == [None, None]
    assert all(row[0] is not None for row in metrics["accuracy_matrix"]) and metrics["forgetting"]["chat"] is None
    assert not math.isnan(metrics["average_accuracy"])  # over the scored abilities only
    assert metrics["plan"][0]["mixture"] == {"chat": 1.0}


def test_every_ability_without_a_scorer_is_a_config_error(tmp_path):
    chat = str(write_jsonl(tmp_path / "chat.jsonl", records("messages", 4)))
    with pytest.raises(ConfigError, match=r"every ability has scorer 'none' \['chat'\]; the accuracy matrix needs one"):
        StagedDataModule(abilities=[AbilitySource("chat", chat, "none", val=chat)])
