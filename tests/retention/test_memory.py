"""The reservoir memory: bounded, uniform over the stream, deterministic, and restored from its state."""

import torch

from hft_lightning.retention.memory import ExampleMemory


def _stream(n):
    return [("math", i) for i in range(n)] + [("code", i) for i in range(3)]


def test_memory_is_bounded_per_ability_and_keeps_short_streams_whole():
    memory = ExampleMemory(size=5)
    memory.observe(_stream(100), torch.Generator().manual_seed(0))
    assert memory.abilities == ["math", "code"]
    assert len(memory.items("math")) == 5 and len(set(memory.items("math"))) == 5
    assert memory.items("code") == [("code", 0), ("code", 1), ("code", 2)]


def test_reservoir_is_uniform_over_the_stream():
    counts = torch.zeros(40)
    for seed in range(2000):
        memory = ExampleMemory(size=4)
        memory.observe([("math", i) for i in range(40)], torch.Generator().manual_seed(seed))
        counts[[i for _, i in memory.items("math")]] += 1
    expected = 2000 * 4 / 40  # 200 per example; a first-k or last-k bias would give 0 or 2000
    assert (counts - expected).abs().max() < 0.25 * expected


def test_memory_continues_across_streams_and_round_trips_its_state():
    first, second = ExampleMemory(size=3), ExampleMemory(size=3)
    first.observe(_stream(10), torch.Generator().manual_seed(1))
    second.load_state_dict(first.state_dict())
    for memory in (first, second):
        memory.observe(_stream(10), torch.Generator().manual_seed(2))
    assert first.state_dict() == second.state_dict()
    assert first.state_dict()["seen"] == {"math": 20, "code": 6}
