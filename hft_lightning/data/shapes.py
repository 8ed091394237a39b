"""The SFT record shapes a data file may hold, and their conversion to :class:`Example`.

Five shapes cover most public SFT data, in the order detection tries them:

- ``messages``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``, a
  conversation of any length (an optional system prompt, several turns) that ends with a user turn and
  the assistant's answer to it;
- ``sharegpt``: LLaMA-Factory's ShareGPT form, ``{"conversations": [{"from": "human" | "gpt" | "system", "value":
  "..."}, ...], "system": "..."}``, the same conversation with other names (the key and every tag configurable,
  :class:`ShareGPTTags`; ``system`` optional). Tool turns (``observation``, ``function_call``) and ``tools`` are
  refused until tools are supported;
- ``prompt_completion``: TRL's ``{"prompt": ..., "completion": ...}``, standard (two strings) or conversational
  (``prompt`` a list of messages ending with a user turn, ``completion`` a list of one assistant message). Only the
  completion is trained, as TRL's ``completion_only_loss`` does: assistant turns inside a conversational prompt are
  context. A standard record is rendered through the chat template like every example (TRL would concatenate the two
  texts raw);
- ``prompt_response``: ``{"prompt": "...", "response": "..."}``;
- ``alpaca``: ``{"instruction": "...", "input": "...", "output": "..."}``, ``input`` optional (the prompt is
  the instruction, then a blank line and the input when there is one).

A file's shape is detected from the keys of its first record (the first shape above whose keys it has, so
``prompt`` + ``completion`` is never read as ``prompt_response``) unless the configuration forces one. A record
that does not fit its shape raises :class:`RecordError` naming the field; the file reader adds the file and
line, so the user sees ``data/chat.jsonl:7: messages[2].role: unknown role 'tool'; ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from hft_lightning.data.example import ROLES, Example

Shape = Literal["messages", "sharegpt", "prompt_completion", "prompt_response", "alpaca"]


@dataclass(frozen=True)
class ShareGPTTags:
    """How a ShareGPT record names its parts (LLaMA-Factory's dataset ``columns`` and ``tags``, same defaults).

    Attributes:
        key: The record field holding the conversation.
        role: The field of a turn naming its speaker.
        content: The field of a turn holding its text.
        user: The speaker tag of a user turn.
        assistant: The speaker tag of an assistant turn.
        system: The speaker tag of a system turn (the first turn only).
    """

    key: str = "conversations"
    role: str = "from"
    content: str = "value"
    user: str = "human"
    assistant: str = "gpt"
    system: str = "system"

    @property
    def roles(self) -> dict[str, str]:
        """Speaker tag -> the role it maps to."""
        return {self.system: "system", self.user: "user", self.assistant: "assistant"}


TOOL_TAGS = ("observation", "function_call")
"""LLaMA-Factory's tags of tool turns, refused by name until tools are supported."""


def shape_keys(tags: ShareGPTTags = ShareGPTTags()) -> dict[str, tuple[str, ...]]:
    """Each shape and the keys that identify it, in the order detection checks them."""
    return {
        "messages": ("messages",),
        "sharegpt": (tags.key,),
        "prompt_completion": ("prompt", "completion"),
        "prompt_response": ("prompt", "response"),
        "alpaca": ("instruction", "output"),
    }


class RecordError(ValueError):
    """A record that does not fit its shape.

    Args:
        field: The offending field (``response``, ``messages[2].role``), or ``""`` for the record as a whole.
        problem: What is wrong with it.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages (``null``, ``string``, ``array``, ...)."""
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (str, "string"), ((int, float), "number"), (Mapping, "object")):
        if isinstance(value, kind):
            return name
    return "array" if isinstance(value, list | tuple) else type(value).__name__


def detect_shape(record: Any, tags: ShareGPTTags = ShareGPTTags()) -> Shape:
    """The first shape whose keys ``record`` has (``tags.key`` identifies ``sharegpt``).

    Raises:
        RecordError: If ``record`` is not an object or has the keys of no shape.
    """
    fields = _fields(record)
    keys_of = shape_keys(tags)
    for shape, keys in keys_of.items():
        if all(key in fields for key in keys):
            return shape  # type: ignore[return-value]
    expected = "; ".join(f"{shape}: {', '.join(keys)}" for shape, keys in keys_of.items())
    raise RecordError("", f"the keys {sorted(fields)} match no shape; expected the keys of one of {expected}")


def to_example(record: Any, shape: Shape, tags: ShareGPTTags = ShareGPTTags()) -> Example:
    """Converts one record of the given shape (its ``reference`` left empty: the ability's scorer fills it).

    Args:
        record: The decoded record.
        shape: Its shape.
        tags: The names of a ``sharegpt`` record's parts.

    Raises:
        RecordError: If a field is missing, of the wrong type, names an unknown role, if the response is empty, or
            if a conversation does not end with a user turn followed by an assistant turn.
    """
    fields = _fields(record)
    return _sharegpt(fields, tags) if shape == "sharegpt" else _CONVERTERS[shape](fields)


def _fields(record: Any) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise RecordError("", f"a record must be a JSON object, got {json_type(record)}")
    return record


def _text(fields: Mapping[str, Any], key: str, label: str | None = None, required: bool = True) -> str:
    label = label or key
    if key not in fields:
        if required:
            raise RecordError(label, "missing")
        return ""
    value = fields[key]
    if not isinstance(value, str):
        raise RecordError(label, f"must be a string, got {json_type(value)}")
    return value


def _response(fields: Mapping[str, Any], key: str, label: str | None = None) -> str:
    response = _text(fields, key, label)
    if not response.strip():
        raise RecordError(label or key, "the response is empty")
    return response


_MESSAGE_ROLES = {role: role for role in ROLES}


def _turns(
    fields: Mapping[str, Any],
    key: str,
    role_key: str = "role",
    content_key: str = "content",
    roles: Mapping[str, str] = _MESSAGE_ROLES,
    noun: str = "role",
) -> list[dict[str, str]]:
    """The messages of ``fields[key]`` as ``{"role", "content"}`` dicts, speakers mapped by ``roles``."""
    if key not in fields:
        raise RecordError(key, "missing")
    messages = fields[key]
    if not isinstance(messages, list | tuple) or not messages:
        got = "an empty array" if isinstance(messages, list | tuple) else json_type(messages)
        raise RecordError(key, f"must be a non-empty array of messages, got {got}")
    turns = []
    for i, message in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(message, Mapping):
            raise RecordError(where, f"must be an object with {role_key} and {content_key}, got {json_type(message)}")
        speaker = _text(message, role_key, f"{where}.{role_key}")
        if speaker not in roles:
            problem = (
                "tool turns are not supported yet; remove them or the records holding them"
                if speaker in TOOL_TAGS
                else f"unknown {noun} {speaker!r}; allowed: {', '.join(roles)}"
            )
            raise RecordError(f"{where}.{role_key}", problem)
        turns.append({"role": roles[speaker], "content": _text(message, content_key, f"{where}.{content_key}")})
    return turns


def _conversation(turns: list[dict[str, str]], key: str, role_key: str = "role") -> Example:
    """The example of a conversation that ends with a user turn and its answer (``key[i].role_key`` in errors)."""
    last = len(turns) - 1
    if turns[last]["role"] != "assistant":
        raise RecordError(f"{key}[{last}].{role_key}", "the conversation must end with an assistant turn")
    if last == 0 or turns[last - 1]["role"] != "user":
        raise RecordError(f"{key}[{last}]", "the last assistant turn must answer a user turn")
    response = _response(turns[last], "content", f"{key}[{last}].content")
    return Example(prompt=turns[last - 1]["content"], response=response, history=turns[: last - 1])


def _messages(fields: Mapping[str, Any]) -> Example:
    return _conversation(_turns(fields, "messages"), "messages")


def _sharegpt(fields: Mapping[str, Any], tags: ShareGPTTags) -> Example:
    if fields.get("tools") not in (None, "", "[]", []):  # LLaMA-Factory keeps tools as a JSON string
        raise RecordError("tools", "tool definitions are not supported yet; leave the field out or empty")
    turns = _turns(fields, tags.key, tags.role, tags.content, tags.roles, noun="tag")
    for i, turn in enumerate(turns[1:], start=1):
        if turn["role"] == "system":
            raise RecordError(f"{tags.key}[{i}].{tags.role}", f"a {tags.system!r} turn must be the first one")
    system = _text(fields, "system", required=False) if fields.get("system") is not None else ""
    if system and turns[0]["role"] == "system":
        raise RecordError("system", f"given both as a field and as a first {tags.system!r} turn")
    example = _conversation(turns, tags.key, tags.role)
    if system:
        example.history.insert(0, {"role": "system", "content": system})
    return example


def _prompt_completion(fields: Mapping[str, Any]) -> Example:
    if "prompt" not in fields:
        raise RecordError("prompt", "missing")
    if isinstance(fields["prompt"], str):
        return Example(prompt=fields["prompt"], response=_response(fields, "completion"), train_history=False)
    # conversational: the prompt is a conversation ending with a user turn, the completion one assistant message
    context, completion = _turns(fields, "prompt"), _turns(fields, "completion")
    last = len(context) - 1
    if context[last]["role"] != "user":
        raise RecordError(f"prompt[{last}].role", "the prompt must end with a user turn")
    if [turn["role"] for turn in completion] != ["assistant"]:
        raise RecordError("completion", "must hold exactly one message, an assistant one")
    response = _response(completion[0], "content", "completion[0].content")
    return Example(prompt=context[last]["content"], response=response, history=context[:last], train_history=False)


def _prompt_response(fields: Mapping[str, Any]) -> Example:
    return Example(prompt=_text(fields, "prompt"), response=_response(fields, "response"))


def _alpaca(fields: Mapping[str, Any]) -> Example:
    instruction, extra = _text(fields, "instruction"), _text(fields, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(prompt=prompt, response=_response(fields, "output"))


_CONVERTERS: dict[str, Callable[[Mapping[str, Any]], Example]] = {
    "messages": _messages,
    "prompt_completion": _prompt_completion,
    "prompt_response": _prompt_response,
    "alpaca": _alpaca,
}
