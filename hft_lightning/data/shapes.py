"""The SFT record shapes a data file may hold, and their conversion to :class:`Example`.

Three shapes cover most public SFT data:

- ``messages``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``, a
  conversation of any length (an optional system prompt, several turns) that ends with a user turn and
  the assistant's answer to it;
- ``prompt_response``: ``{"prompt": "...", "response": "..."}``;
- ``alpaca``: ``{"instruction": "...", "input": "...", "output": "..."}``, ``input`` optional (the prompt is
  the instruction, then a blank line and the input when there is one).

A file's shape is detected from the keys of its first record unless the configuration forces one. A record
that does not fit its shape raises :class:`RecordError` naming the field; the file reader adds the file and
line, so the user sees ``data/chat.jsonl:7: messages[2].role: unknown role 'tool'; ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from hft_lightning.data.example import ROLES, Example

Shape = Literal["messages", "prompt_response", "alpaca"]

SHAPE_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_response": ("prompt", "response"),
    "alpaca": ("instruction", "output"),
}
"""Each shape and the keys that identify it (detection checks them in this order)."""


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


def detect_shape(record: Any) -> Shape:
    """The shape whose keys ``record`` has.

    Raises:
        RecordError: If ``record`` is not an object or has the keys of no shape.
    """
    fields = _fields(record)
    for shape, keys in SHAPE_KEYS.items():
        if all(key in fields for key in keys):
            return shape  # type: ignore[return-value]
    expected = "; ".join(f"{shape}: {', '.join(keys)}" for shape, keys in SHAPE_KEYS.items())
    raise RecordError("", f"the keys {sorted(fields)} match no shape; expected the keys of one of {expected}")


def to_example(record: Any, shape: Shape) -> Example:
    """Converts one record of the given shape (its ``reference`` left empty: the ability's scorer fills it).

    Raises:
        RecordError: If a field is missing, of the wrong type, names an unknown role, if the response is empty, or
            if a conversation does not end with a user turn followed by an assistant turn.
    """
    return _CONVERTERS[shape](_fields(record))


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


def _messages(fields: Mapping[str, Any]) -> Example:
    if "messages" not in fields:
        raise RecordError("messages", "missing")
    messages = fields["messages"]
    if not isinstance(messages, list | tuple) or not messages:
        got = "an empty array" if isinstance(messages, list | tuple) else json_type(messages)
        raise RecordError("messages", f"must be a non-empty array of messages, got {got}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RecordError(f"messages[{i}]", f"must be an object with role and content, got {json_type(message)}")
        role = _text(message, "role", f"messages[{i}].role")
        if role not in ROLES:
            raise RecordError(f"messages[{i}].role", f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
        turns.append({"role": role, "content": _text(message, "content", f"messages[{i}].content")})
    last = len(turns) - 1
    if turns[last]["role"] != "assistant":
        raise RecordError(f"messages[{last}].role", "the conversation must end with an assistant turn")
    if last == 0 or turns[last - 1]["role"] != "user":
        raise RecordError(f"messages[{last}]", "the last assistant turn must answer a user turn")
    response = _response(turns[last], "content", f"messages[{last}].content")
    return Example(prompt=turns[last - 1]["content"], response=response, history=turns[: last - 1])


def _prompt_response(fields: Mapping[str, Any]) -> Example:
    return Example(prompt=_text(fields, "prompt"), response=_response(fields, "response"))


def _alpaca(fields: Mapping[str, Any]) -> Example:
    instruction, extra = _text(fields, "instruction"), _text(fields, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(prompt=prompt, response=_response(fields, "output"))


_CONVERTERS: dict[str, Callable[[Mapping[str, Any]], Example]] = {
    "messages": _messages,
    "prompt_response": _prompt_response,
    "alpaca": _alpaca,
}
