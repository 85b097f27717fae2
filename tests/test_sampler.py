import pytest

from data.sampler import ShardedEpochSampler


def shards(n, batch, ranks, epoch=0, seed=0):
    out = []
    for rank in range(ranks):
        sampler = ShardedEpochSampler(n, batch, num_replicas=ranks, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_ranks_get_disjoint_equal_shares():
    a, b = shards(10, 2, 2)
    assert len(a) == len(b) == 4  # 2 full batches each; the 2 left-over clips wait for the next epoch
    assert not set(a) & set(b)


def test_order_depends_only_on_seed_and_epoch():
    assert shards(20, 3, 1, epoch=1) == shards(20, 3, 1, epoch=1)
    assert shards(20, 3, 1, epoch=1) != shards(20, 3, 1, epoch=2)
    assert shards(20, 3, 1, seed=1) != shards(20, 3, 1, seed=2)


def test_start_batch_resumes_mid_epoch():
    sampler = ShardedEpochSampler(12, 2, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, start_batch=2)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4


def test_tiny_dataset_fills_one_global_batch():
    a, b = shards(3, 4, 2)
    assert len(a) == len(b) == 4 and set(a + b) == {0, 1, 2}


def test_empty_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        ShardedEpochSampler(0, 2)
