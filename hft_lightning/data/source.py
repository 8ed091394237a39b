r"""Abilities declared from the user's own SFT data files, or scored by an lm-evaluation-harness task.

An :class:`AbilitySource` names the files of one ability and how to score it, or a harness task that scores it
(``lm_eval``: evaluated only, or paired with the ability's training files); the datamodule accepts it next to the
``builtin:<name>`` strings, and LightningCLI parses it from YAML::

    data:
      abilities:
        - builtin:math
        - {name: chat, train: data/chat.jsonl, scorer: none}
        - {name: gsm8k, train: data/gsm8k/, val: data/gsm8k_test.jsonl, scorer: exact_match,
           answer_pattern: '#### (\S+)'}
        - {name: support, train: data/sharegpt.jsonl, scorer: none, user_tag: user, assistant_tag: assistant}
        - {name: arc, lm_eval: {task: arc_easy, limit: 200, num_fewshot: 0}}

Loading checks every record once, in file order, and keeps only its key (see :mod:`hft_lightning.data.files`):
a mistake anywhere in the data stops the run before training, with the file, the line and the field. Without a
``val`` file the records are split by a hash of each prompt conversation, so train and validation never share a
prompt and the split is the same on every run and every machine.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, Literal, get_args

from lightning.pytorch.utilities import rank_zero_warn

from hft_lightning.data.ability import Ability, in_validation_bucket
from hft_lightning.data.example import Example
from hft_lightning.data.files import DataFile, open_data_files
from hft_lightning.data.shapes import RecordError, Shape, ShareGPTTags, detect_shape, json_type, to_example
from hft_lightning.errors import ConfigError
from hft_lightning.scoring import build_scorer, extract_answer
from hft_lightning.scoring.harness import LMEvalTask, load_harness_task

ShapeName = Literal["auto", "messages", "sharegpt", "prompt_completion", "prompt_response", "alpaca"]
FileScorerName = Literal["exact_match", "code_exec", "contains", "none"]
"""The scorers of :func:`hft_lightning.scoring.build_scorer` whose reference a record provides."""

_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class AbilitySource:
    """An ability whose examples come from JSONL or parquet files, or whose score comes from a harness task.

    Attributes:
        name: The ability's name in stage mixtures, logs (``val/<name>/score``) and the report; letters, digits,
            ``_`` and ``-``.
        train: A ``.jsonl`` or ``.parquet`` file, or a directory of them, relative to the working directory.
            ``None``: an ability evaluated only, by ``lm_eval`` (no stage may train it).
        scorer: How validation generations are judged: ``exact_match`` (the extracted answer equals the
            reference's), ``contains`` (the reference answer appears in the generation), ``code_exec`` (the program
            passes the record's unit tests in the sandbox) or ``none`` (validation loss only; the ability is left
            out of the accuracy matrix). Required with ``train``, unless ``lm_eval`` scores the ability.
        val: Validation data, like ``train``. Without it, ``val_fraction`` of ``train`` is held out by hashing each
            prompt. At most ``data.num_val`` validation examples are used, the first in file order.
        lm_eval: An lm-evaluation-harness task whose primary metric scores the ability (``pip install
            'hft_lightning[eval]'``), measured on the model being trained before training and at every validation.
            Alone, the ability is evaluated only; with ``train``, the files train it (and give its validation loss)
            and the task scores it. Fields (:class:`~hft_lightning.scoring.harness.LMEvalTask`): ``task`` (a harness
            task, or one defined under ``include_path``), ``include_path`` (a folder of your own task YAML files),
            ``limit`` (its first documents only), ``num_fewshot`` (default: the task's), ``apply_chat_template``
            (default true), ``metric`` (``name`` or ``name,filter``; default: the task's first metric under its first
            filter), ``batch_size`` (default 16). Example: ``{task: gsm8k, limit: 200, num_fewshot: 0}``.
        shape: Record shape: ``messages`` (a conversation of role/content messages), ``sharegpt`` (LLaMA-Factory's
            ``conversations`` of from/value turns), ``prompt_completion`` (TRL's, strings or lists of messages; only
            the completion is trained), ``prompt_response`` or ``alpaca`` (``instruction``/``input``/``output``);
            ``auto`` detects it per file from the first record's keys, trying them in this order.
        answer_pattern: For ``exact_match`` and ``contains``: a regular expression whose first group is the answer,
            taken from its last match in the reference response and in the generation. Without it, the whole
            stripped response is the answer.
        tests_field: For ``code_exec``: the record field holding the unit tests, a list of Python statements.
        val_fraction: Share of ``train`` held out for validation when no ``val`` is given, in (0, 1).
        skip_bad_lines: Skip records that do not fit their shape (with a warning giving their count and the
            first error) instead of stopping at the first one.
        conversations_key: For ``sharegpt``: the record field holding the conversation (it also identifies the
            shape when detecting it). A ``system`` field, if any, is the system prompt.
        role_tag: For ``sharegpt``: the field of a turn that names its speaker (LLaMA-Factory's ``role_tag``).
        content_tag: For ``sharegpt``: the field of a turn that holds its text (LLaMA-Factory's ``content_tag``).
        user_tag: For ``sharegpt``: the speaker of a user turn. Tool turns (``observation``, ``function_call``) are
            refused until tools are supported.
        assistant_tag: For ``sharegpt``: the speaker of an assistant turn, the one trained and scored.
        system_tag: For ``sharegpt``: the speaker of a system prompt turn, allowed as the first turn only.
    """

    name: str
    train: str | None = None
    scorer: FileScorerName | None = None
    val: str | None = None
    lm_eval: LMEvalTask | None = None
    shape: ShapeName = "auto"
    answer_pattern: str | None = None
    tests_field: str = "tests"
    val_fraction: float = 0.1
    skip_bad_lines: bool = False
    # LLaMA-Factory's names by default, kept in one place: the class attributes of ShareGPTTags
    conversations_key: str = ShareGPTTags.key
    role_tag: str = ShareGPTTags.role
    content_tag: str = ShareGPTTags.content
    user_tag: str = ShareGPTTags.user
    assistant_tag: str = ShareGPTTags.assistant
    system_tag: str = ShareGPTTags.system

    @cached_property  # frozen, so computed once, not per record
    def tags(self) -> ShareGPTTags:
        """The names of a ``sharegpt`` record's parts."""
        return ShareGPTTags(
            self.conversations_key, self.role_tag, self.content_tag, self.user_tag, self.assistant_tag, self.system_tag
        )

    def load(self, num_train: int | None, num_val: int, seed: int) -> Ability:
        """Checks every record, splits them, and returns the ability; examples are read from disk on access.

        The harness task, if any, is resolved and its data loaded here too, so its mistakes also stop the run before
        training.

        Args:
            num_train: The most training examples to keep, the first in file order (``None``: all of them).
            num_val: The most validation examples to keep.
            seed: Unused: the split is a hash of each prompt, the same on every run (the signature of every source).

        Raises:
            ConfigError: If a field of this source is invalid, a path is missing, a record is malformed (naming
                the file, the line or row, and the field), or the harness task cannot be used.
        """
        field = f"data.abilities[{self.name!r}]"
        pattern = self._check(field)
        evaluator = None if self.lm_eval is None else load_harness_task(self.lm_eval, f"{field}.lm_eval")
        if self.train is None:
            return Ability(name=self.name, train=[], val=[], scorer=None, evaluator=evaluator)
        convert = partial(self._example, pattern=pattern)
        train_files = open_data_files(self.train, f"{field}.train")
        if self.val is None:
            train, val = self._scan(train_files, convert, f"{field}.train", self.val_fraction)
        else:
            train, _ = self._scan(train_files, convert, f"{field}.train")
            val, _ = self._scan(open_data_files(self.val, f"{field}.val"), convert, f"{field}.val")
        if not len(train):
            raise ConfigError(f"{field}.train: no training examples in {self.train}")
        if not len(val):
            hint = f"; raise val_fraction={self.val_fraction} or give a val file" if self.val is None else ""
            raise ConfigError(f"{field}.val: no validation examples in {self.val or self.train}{hint}")
        if num_train is not None:
            train = train.head(num_train)
        scorer = None if self.scorer is None else build_scorer(self.scorer, pattern)
        return Ability(name=self.name, train=train, val=val.head(num_val), scorer=scorer, evaluator=evaluator)

    def _check(self, field: str) -> re.Pattern[str] | None:
        """Validates the fields that do not depend on the data; returns the compiled answer pattern."""
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"{field}.name must be letters, digits, '_' or '-', got {self.name!r}")
        self._check_roles(field)
        for key, value, allowed in (("scorer", self.scorer, FileScorerName), ("shape", self.shape, ShapeName)):
            if value is not None and value not in get_args(allowed):
                raise ConfigError(f"{field}.{key}: unknown {key} {value!r}; allowed: {', '.join(get_args(allowed))}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{field}.val_fraction must be in (0, 1), got {self.val_fraction}")
        self._check_tags(field)
        if self.answer_pattern is None:
            return None
        if self.scorer not in ("exact_match", "contains"):
            raise ConfigError(f"{field}.answer_pattern is used by the exact_match and contains scorers only")
        try:
            pattern = re.compile(self.answer_pattern)
        except re.error as error:
            message = f"{field}.answer_pattern {self.answer_pattern!r} is not a regular expression: {error}"
            raise ConfigError(message) from None
        if pattern.groups < 1:
            raise ConfigError(f"{field}.answer_pattern {self.answer_pattern!r} needs a group around the answer")
        return pattern

    def _check_roles(self, field: str) -> None:
        """Training files need a scorer, or a harness task scoring the ability; a harness task alone needs neither."""
        allowed = ", ".join(get_args(FileScorerName))
        if self.train is None and self.lm_eval is None:
            raise ConfigError(f"{field}: give train (data files) or lm_eval (a harness task), or both")
        if self.train is None and self.val is not None:
            raise ConfigError(f"{field}.val needs train: an ability with lm_eval alone is evaluated by its task only")
        if self.lm_eval is not None and self.scorer is not None:
            raise ConfigError(f"{field}.scorer: the lm_eval task scores this ability; remove scorer")
        if self.train is not None and self.lm_eval is None and self.scorer is None:
            raise ConfigError(f"{field}.scorer: missing; give one of {allowed}, or lm_eval (a harness task)")

    def _check_tags(self, field: str) -> None:
        """The sharegpt fields: set only for a shape that may be sharegpt, non-empty, three distinct speakers."""
        tags, default = self.tags, ShareGPTTags()
        names = {"conversations_key": "key", "role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant", "system_tag": "system"}  # fmt: skip
        for name, attribute in names.items():
            value = getattr(tags, attribute)
            if not value:
                raise ConfigError(f"{field}.{name} must be a non-empty string")
            if value != getattr(default, attribute) and self.shape not in ("auto", "sharegpt"):
                raise ConfigError(f"{field}.{name} is used by the sharegpt shape only, but shape is {self.shape!r}")
        if len(tags.roles) < 3 or tags.role == tags.content:
            message = "user_tag, assistant_tag and system_tag must differ, and so must role_tag and content_tag"
            raise ConfigError(f"{field}: {message}; got {tags}")

    def _example(self, record: Any, shape: Shape, pattern: re.Pattern[str] | None) -> Example:
        """Converts one record and attaches what the scorer checks against.

        Raises:
            RecordError: If the record does not fit its shape or lacks what the scorer needs.
        """
        example = to_example(record, shape, self.tags)
        if self.scorer == "code_exec":
            tests = record.get(self.tests_field)
            if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
                problem = "missing" if self.tests_field not in record else f"got {json_type(tests)}"
                raise RecordError(self.tests_field, f"must be a non-empty list of test statements; {problem}")
            example.reference = {"tests": list(tests)}
        elif self.scorer in ("exact_match", "contains"):
            answer = extract_answer(example.response, pattern)
            if answer is None:
                raise RecordError("answer_pattern", f"{pattern.pattern!r} does not match the response")
            example.reference = {"answer": answer}
        return example

    def _scan(
        self, files: list[DataFile], convert: Callable[..., Example], field: str, val_fraction: float | None = None
    ) -> tuple[FileExamples, FileExamples]:
        """Checks every record of ``files`` and routes its key to train or, with ``val_fraction``, validation."""
        train: list[tuple[Callable[[int], Example], array]] = []
        val: list[tuple[Callable[[int], Example], array]] = []
        skipped, first_error = 0, ""
        for file in files:
            shape = None if self.shape == "auto" else self.shape
            train_keys, val_keys = array("q"), array("q")
            for key, location, raw in file.scan():
                try:
                    record = file.parse(raw)
                    shape = shape or detect_shape(record, self.tags)
                    example = convert(record, shape)
                except RecordError as error:
                    if not self.skip_bad_lines:
                        raise ConfigError(f"{location}: {error}") from None
                    skipped, first_error = skipped + 1, first_error or f"{location}: {error}"
                    continue
                prompt = json.dumps(example.prompt_messages, ensure_ascii=False)
                to_val = val_fraction is not None and in_validation_bucket(prompt, val_fraction)
                (val_keys if to_val else train_keys).append(key)
            read = partial(_read, file=file, convert=partial(convert, shape=shape))
            train.append((read, train_keys))
            val.append((read, val_keys))
        if skipped:
            rank_zero_warn(f"{field}: skipped {skipped} bad records (skip_bad_lines); the first: {first_error}")
        return FileExamples(train), FileExamples(val)


def _read(key: int, file: DataFile, convert: Callable[[Any], Example]) -> Example:
    return convert(file.read(key))


class FileExamples(Sequence[Example]):
    """One split of a file ability: the keys of its records, each read from disk and converted on access.

    Args:
        parts: Per data file, a function reading the example at a key, and the keys of this split's records.
    """

    def __init__(self, parts: Sequence[tuple[Callable[[int], Example], array]]):
        self._parts = [(read, keys) for read, keys in parts if len(keys)]
        self._starts = [0, *itertools.accumulate(len(keys) for _, keys in self._parts)]

    def __len__(self) -> int:
        """Number of examples."""
        return self._starts[-1]

    def __getitem__(self, index: int | slice) -> Example | list[Example]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        index %= len(self)
        part = bisect.bisect_right(self._starts, index) - 1
        read, keys = self._parts[part]
        return read(keys[index - self._starts[part]])

    def head(self, count: int) -> FileExamples:
        """The first ``count`` examples (all of them if there are fewer)."""
        parts = []
        for read, keys in self._parts:
            parts.append((read, keys[: count - sum(len(k) for _, k in parts)]))
        return FileExamples(parts)
