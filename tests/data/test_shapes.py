import pytest

from hft_lightning.data.example import Example
from hft_lightning.data.shapes import RecordError, detect_shape, to_example

SYSTEM = {"role": "system", "content": "Be terse."}
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.mark.parametrize(
    ("record", "shape"),
    [
        ({"messages": CONVERSATION, "id": 3}, "messages"),
        ({"prompt": "p", "response": "r"}, "prompt_response"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"instruction": "i", "output": "o", "response": "r"}, "alpaca"),  # prompt is missing: not prompt_response
    ],
)
def test_the_shape_is_detected_from_the_keys(record, shape):
    assert detect_shape(record) == shape


def test_a_record_of_no_shape_names_the_keys_it_has():
    with pytest.raises(RecordError, match=r"the keys \['question', 'text'\] match no shape; expected the keys of one"):
        detect_shape({"text": "t", "question": "q"})


def test_a_conversation_keeps_its_history_and_answers_its_last_user_turn():
    example = to_example({"messages": CONVERSATION}, "messages")
    assert example == Example(prompt="And of Italy?", response="Rome.", history=CONVERSATION[:3])
    assert example.messages == CONVERSATION
    assert example.prompt_messages == CONVERSATION[:4]


def test_a_single_turn_conversation_has_no_history():
    example = to_example({"messages": CONVERSATION[1:3]}, "messages")
    assert example == Example(prompt="Capital of France?", response="Paris.")


@pytest.mark.parametrize(
    ("record", "shape", "expected"),
    [
        ({"prompt": "Hi", "response": "Hello"}, "prompt_response", Example("Hi", "Hello")),
        ({"instruction": "Upper-case it.", "input": "abc", "output": "ABC"}, "alpaca",
         Example("Upper-case it.\n\nabc", "ABC")),
        ({"instruction": "Say hi.", "input": " ", "output": "hi"}, "alpaca", Example("Say hi.", "hi")),
        ({"instruction": "Say hi.", "output": "hi"}, "alpaca", Example("Say hi.", "hi")),
    ],
)  # fmt: skip
def test_flat_shapes(record, shape, expected):
    assert to_example(record, shape) == expected


@pytest.mark.parametrize(
    ("record", "shape", "message"),
    [
        ([1, 2], "messages", "a record must be a JSON object, got array"),
        ({"prompt": "p"}, "prompt_response", "response: missing"),
        ({"prompt": "p", "response": 3}, "prompt_response", "response: must be a string, got number"),
        ({"prompt": "p", "response": "  \n"}, "prompt_response", "response: the response is empty"),
        ({"instruction": "i", "output": ""}, "alpaca", "output: the response is empty"),
        ({"instruction": None, "output": "o"}, "alpaca", "instruction: must be a string, got null"),
        ({"prompt": "p", "response": "r"}, "alpaca", "instruction: missing"),  # a forced shape that does not fit
        ({"messages": []}, "messages", "messages: must be a non-empty array of messages, got an empty array"),
        ({"messages": "hi"}, "messages", "messages: must be a non-empty array of messages, got string"),
        ({"messages": [SYSTEM, "hi"]}, "messages",
         r"messages\[1\]: must be an object with role and content, got string"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages",
         r"messages\[0\].role: unknown role 'tool'; allowed: system, user, assistant"),
        ({"messages": [{"role": "user"}]}, "messages", r"messages\[0\].content: missing"),
        ({"messages": CONVERSATION[:4]}, "messages",
         r"messages\[3\].role: the conversation must end with an assistant turn"),
        ({"messages": [SYSTEM, {"role": "assistant", "content": "a"}]}, "messages",
         r"messages\[1\]: the last assistant turn must answer a user turn"),
        ({"messages": [*CONVERSATION[:4], {"role": "assistant", "content": ""}]}, "messages",
         r"messages\[4\].content: the response is empty"),
    ],
)  # fmt: skip
def test_records_that_do_not_fit_name_the_field(record, shape, message):
    with pytest.raises(RecordError, match=f"^{message}$"):
        to_example(record, shape)
