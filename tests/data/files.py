"""Writers of small SFT data files for the data tests."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, records: list[dict], row_group_size: int = 4) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


WRITERS = {"jsonl": write_jsonl, "parquet": write_parquet}


FORMS = {
    "messages": "messages",
    "sharegpt": "sharegpt",
    "prompt_completion": "prompt_completion",
    "prompt_completion_conversational": "prompt_completion",
    "prompt_response": "prompt_response",
    "alpaca": "alpaca",
}
"""Each record form :func:`records` writes -> its shape."""


def records(form: str, count: int) -> list[dict]:
    """``count`` distinct records of one form (a shape, or TRL's conversational ``prompt_completion``)."""
    if form == "messages":
        return [
            {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": f"Say {i}."},
                          {"role": "assistant", "content": f"{i}"}]}
            for i in range(count)
        ]  # fmt: skip
    if form == "sharegpt":
        return [
            {"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}"}],
             "system": "Be terse."}
            for i in range(count)
        ]  # fmt: skip
    if form == "prompt_completion":
        return [{"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(count)]
    if form == "prompt_completion_conversational":
        return [
            {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": f"Say {i}."}],
             "completion": [{"role": "assistant", "content": f"{i}"}]}
            for i in range(count)
        ]  # fmt: skip
    if form == "prompt_response":
        return [{"prompt": f"Say {i}.", "response": f"{i}"} for i in range(count)]
    return [{"instruction": "Say the number.", "input": f"{i}", "output": f"{i}"} for i in range(count)]
