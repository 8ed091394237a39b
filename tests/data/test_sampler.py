import pytest

from hft_lightning.data.sampler import StageBatchSampler


def make(start_batch=0, weights=(1.0, 0.0, 3.0)):
    return StageBatchSampler([10, 20, 30], weights, batch_size=8, num_batches=12, seed=5, start_batch=start_batch)


def test_batches_are_deterministic_and_resumable():
    full = list(make())
    assert len(full) == len(make()) == 12
    assert full == list(make())
    assert list(make(start_batch=7)) == full[7:]


def test_mixture_weights_are_respected():
    indices = [i for batch in make() for i in batch]
    assert not [i for i in indices if 10 <= i < 30]  # weight 0: the second dataset is never sampled
    first, third = sum(i < 10 for i in indices), sum(i >= 30 for i in indices)
    assert 0 < first < third  # 1 : 3
    assert all(0 <= i < 60 for i in indices)


def test_mismatched_weights_are_an_error():
    with pytest.raises(ValueError, match="weights"):
        StageBatchSampler([10, 20], [1.0], 8, 2, 0)


def test_processes_split_the_global_batch_of_one_process_with_a_larger_batch():
    sizes, weights = [10, 20, 30], (1.0, 2.0, 3.0)
    single = StageBatchSampler(sizes, weights, batch_size=24, num_batches=5, seed=3)
    ranks = [StageBatchSampler(sizes, weights, 8, 5, 3, rank=r, num_replicas=3) for r in range(3)]
    per_rank = [list(sampler) for sampler in ranks]
    for index, batch in enumerate(single):
        assert [i for rank in per_rank for i in rank[index]] == batch == ranks[1].global_batch(index)
    assert list(StageBatchSampler(sizes, weights, 8, 5, 3, start_batch=2, rank=2, num_replicas=3)) == per_rank[2][2:]


def test_rank_outside_the_processes_is_an_error():
    with pytest.raises(ValueError, match="rank=2 is outside the 2 processes"):
        StageBatchSampler([10], [1.0], 8, 2, 0, rank=2, num_replicas=2)
