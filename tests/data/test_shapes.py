import pytest

from hft_lightning.data.example import Example
from hft_lightning.data.shapes import RecordError, ShareGPTTags, detect_shape, to_example

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
        ({"conversations": [], "system": "s"}, "sharegpt"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"prompt": [], "completion": []}, "prompt_completion"),
        # the first shape in order wins: a record with both TRL's and our keys is TRL's, one with both
        # conversation keys is a messages record
        ({"prompt": "p", "completion": "c", "response": "r"}, "prompt_completion"),
        ({"messages": [], "conversations": []}, "messages"),
    ],
)
def test_the_shape_is_detected_from_the_keys(record, shape):
    assert detect_shape(record) == shape


def test_a_configured_sharegpt_key_identifies_the_shape():
    assert detect_shape({"chat": []}, ShareGPTTags(key="chat")) == "sharegpt"
    with pytest.raises(RecordError, match="sharegpt: chat;"):
        detect_shape({"conversations": []}, ShareGPTTags(key="chat"))


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


SHAREGPT = [
    {"from": "human", "value": "Capital of France?"},
    {"from": "gpt", "value": "Paris."},
    {"from": "human", "value": "And of Italy?"},
    {"from": "gpt", "value": "Rome."},
]


@pytest.mark.parametrize(
    "record",
    [
        {"conversations": [{"from": "system", "value": "Be terse."}, *SHAREGPT]},
        {"conversations": SHAREGPT, "system": "Be terse.", "tools": ""},  # LLaMA-Factory's system column
    ],
)
def test_a_sharegpt_record_is_the_same_conversation_as_its_messages_record(record):
    assert to_example(record, "sharegpt") == to_example({"messages": CONVERSATION}, "messages")


def test_sharegpt_without_a_system_prompt_and_with_other_tags():
    tags = ShareGPTTags(key="dialog", role="speaker", content="text", user="Q", assistant="A", system="S")
    turns = [{"speaker": "Q", "text": "Hi?"}, {"speaker": "A", "text": "Hello."}]
    assert to_example({"dialog": turns}, "sharegpt", tags) == Example(prompt="Hi?", response="Hello.")


def test_a_conversational_prompt_completion_trains_the_completion_only():
    record = {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}
    example = to_example(record, "prompt_completion")
    assert example == Example(prompt="And of Italy?", response="Rome.", history=CONVERSATION[:3], train_history=False)
    assert example.messages == CONVERSATION
    # the same conversation as a messages record, whose earlier assistant turn is trained too
    assert to_example({"messages": CONVERSATION}, "messages").train_history


@pytest.mark.parametrize(
    ("record", "shape", "expected"),
    [
        ({"prompt": "Hi", "response": "Hello"}, "prompt_response", Example("Hi", "Hello")),
        ({"instruction": "Upper-case it.", "input": "abc", "output": "ABC"}, "alpaca",
         Example("Upper-case it.\n\nabc", "ABC")),
        ({"instruction": "Say hi.", "input": " ", "output": "hi"}, "alpaca", Example("Say hi.", "hi")),
        ({"instruction": "Say hi.", "output": "hi"}, "alpaca", Example("Say hi.", "hi")),
        ({"prompt": "Hi", "completion": "Hello"}, "prompt_completion", Example("Hi", "Hello", train_history=False)),
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
        # sharegpt
        ({"conversations": SHAREGPT[:3]}, "sharegpt",
         r"conversations\[2\].from: the conversation must end with an assistant turn"),
        ({"conversations": [{"from": "user", "value": "q"}]}, "sharegpt",
         r"conversations\[0\].from: unknown tag 'user'; allowed: system, human, gpt"),
        ({"conversations": [*SHAREGPT[:1], {"from": "observation", "value": "42"}]}, "sharegpt",
         r"conversations\[1\].from: tool turns are not supported yet; remove them or the records holding them"),
        ({"conversations": [{"from": "human"}]}, "sharegpt", r"conversations\[0\].value: missing"),
        ({"conversations": [{"role": "human", "value": "q"}]}, "sharegpt", r"conversations\[0\].from: missing"),
        ({"conversations": ["q"]}, "sharegpt",
         r"conversations\[0\]: must be an object with from and value, got string"),
        ({"conversations": [*SHAREGPT[:2], {"from": "system", "value": "s"}, *SHAREGPT[2:]]}, "sharegpt",
         r"conversations\[2\].from: a 'system' turn must be the first one"),
        ({"conversations": [{"from": "system", "value": "s"}, *SHAREGPT], "system": "t"}, "sharegpt",
         "system: given both as a field and as a first 'system' turn"),
        ({"conversations": SHAREGPT, "system": 3}, "sharegpt", "system: must be a string, got number"),
        ({"conversations": SHAREGPT, "tools": '[{"name": "f"}]'}, "sharegpt",
         "tools: tool definitions are not supported yet; leave the field out or empty"),
        ({"messages": CONVERSATION}, "sharegpt", "conversations: missing"),  # a forced shape that does not fit
        # prompt_completion
        ({"completion": "c"}, "prompt_completion", "prompt: missing"),
        ({"prompt": "p", "completion": ""}, "prompt_completion", "completion: the response is empty"),
        ({"prompt": "p", "completion": CONVERSATION[2:3]}, "prompt_completion",
         "completion: must be a string, got array"),
        ({"prompt": 3, "completion": "c"}, "prompt_completion",
         "prompt: must be a non-empty array of messages, got number"),
        ({"prompt": CONVERSATION[:3], "completion": CONVERSATION[4:]}, "prompt_completion",
         r"prompt\[2\].role: the prompt must end with a user turn"),
        ({"prompt": CONVERSATION[:4], "completion": "Rome."}, "prompt_completion",
         "completion: must be a non-empty array of messages, got string"),
        ({"prompt": CONVERSATION[:4], "completion": CONVERSATION[3:5]}, "prompt_completion",
         "completion: must hold exactly one message, an assistant one"),
        ({"prompt": CONVERSATION[:4], "completion": [{"role": "assistant", "content": " "}]}, "prompt_completion",
         r"completion\[0\].content: the response is empty"),
        ({"prompt": [{"role": "tool", "content": "x"}], "completion": CONVERSATION[2:3]}, "prompt_completion",
         r"prompt\[0\].role: unknown role 'tool'; allowed: system, user, assistant"),
    ],
)  # fmt: skip
def test_records_that_do_not_fit_name_the_field(record, shape, message):
    with pytest.raises(RecordError, match=f"^{message}$"):
        to_example(record, shape)
