"""The batch loader: deterministic, resumable, rank-aware; eval windows cover every token once."""

import json

import numpy as np
import pytest
import torch

from burrow.data import IGNORE_INDEX, BatchLoader, ShardWriter, TokenDataset, eval_batches
from burrow.data.shards import write_manifest
from burrow.errors import UserError

NUM_TOKENS = 1_000


def position_dataset(directory, num_tokens=NUM_TOKENS, fingerprint="data-a") -> TokenDataset:
    """Token i is i + 1 (the last one is </s> = 0), spread over several shards, so that a
    window's first input names its start."""
    directory.mkdir(exist_ok=True)
    writer = ShardWriter(directory, "train", vocab_size=4096, eos_id=0, shard_tokens=97)
    writer.add_document(np.arange(1, num_tokens), num_bytes=num_tokens - 1)
    manifest = {
        "fingerprint": fingerprint,
        "dtype": "uint16",
        "vocab_size": 4096,
        "eos_id": 0,
        "splits": {"train": writer.close()},
    }
    write_manifest(directory, manifest)
    return TokenDataset(directory, "train")


@pytest.fixture
def dataset(tmp_path) -> TokenDataset:
    return position_dataset(tmp_path)


def starts_of(batch) -> list[int]:
    inputs, _ = batch
    return (inputs[:, 0] - 1).tolist()


def take(loader, n) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def assert_same(batches, others):
    assert len(batches) == len(others)
    for (x, y), (x2, y2) in zip(batches, others):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_batches_are_shifted_windows_of_the_data(dataset):
    loader = BatchLoader(dataset, batch_size=4, seq_len=16, seed=3)
    for inputs, targets in take(loader, 30):
        assert inputs.shape == targets.shape == (4, 16)
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.is_contiguous() and targets.is_contiguous()
        for row, start in enumerate(starts_of((inputs, targets))):
            window = dataset.window(start, 17).astype(np.int64)
            assert inputs[row].tolist() == window[:-1].tolist()
            assert targets[row].tolist() == window[1:].tolist()


def test_each_epoch_is_a_permutation_with_its_own_offset(dataset):
    seq_len = 16
    loader = BatchLoader(dataset, batch_size=1, seq_len=seq_len, seed=0)
    offsets = set()
    for epoch in range(4):
        starts = [starts_of(loader.next_batch())[0]]
        offset = starts[0] % seq_len
        count = (NUM_TOKENS - 1 - offset) // seq_len
        starts += [starts_of(loader.next_batch())[0] for _ in range(count - 1)]
        assert loader.epoch == epoch
        assert sorted(starts) == [offset + i * seq_len for i in range(count)]
        assert starts != sorted(starts)
        offsets.add(offset)
    assert len(offsets) > 1


def test_aligned_windows_start_at_whole_chunks_and_cover_each_epoch(dataset):
    seq_len, chunk = 32, 8
    loader = BatchLoader(dataset, batch_size=1, seq_len=seq_len, seed=0, align=chunk)
    offsets = set()
    for _ in range(6):
        starts = [starts_of(loader.next_batch())[0]]
        offset = starts[0] % seq_len
        count = (NUM_TOKENS - 1 - offset) // seq_len
        starts += [starts_of(loader.next_batch())[0] for _ in range(count - 1)]
        assert sorted(starts) == [offset + i * seq_len for i in range(count)]
        offsets.add(offset)
    assert offsets <= {0, 8, 16, 24} and len(offsets) > 1
    # align=1 draws what an unaligned loader always drew
    assert_same(take(BatchLoader(dataset, 4, 16, seed=5, align=1), 20),
                take(BatchLoader(dataset, 4, 16, seed=5), 20))
    with pytest.raises(UserError, match="multiple of the chunk length 8"):
        BatchLoader(dataset, 4, 20, align=8)
    state = loader.state_dict()
    with pytest.raises(UserError, match="multiples of 8"):
        BatchLoader(dataset, 1, seq_len).load_state_dict(state)


def test_same_seed_same_batches_other_seed_other_batches(dataset):
    batches = take(BatchLoader(dataset, 4, 16, seed=7), 20)
    assert_same(batches, take(BatchLoader(dataset, 4, 16, seed=7), 20))
    assert starts_of(batches[0]) != starts_of(BatchLoader(dataset, 4, 16, seed=8).next_batch())


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_gives_exactly_the_same_batches(dataset, world_size):
    # 12 batches of 8 windows of 32 tokens on 3 ranks cross several epochs of ~31 windows
    for rank in range(world_size):
        loader = BatchLoader(dataset, 8, 32, seed=1, rank=rank, world_size=world_size)
        take(loader, 7)
        state = json.loads(json.dumps(loader.state_dict()))  # plain, serialisable values
        expected = take(loader, 5)
        assert loader.epoch > 0
        fresh = BatchLoader(dataset, 8, 32, seed=99, rank=rank, world_size=world_size)
        fresh.load_state_dict(state)
        assert_same(take(fresh, 5), expected)


def test_ranks_read_disjoint_windows(dataset):
    seq_len, world_size = 16, 3
    per_rank = [
        BatchLoader(dataset, 1, seq_len, seed=5, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    # the first epoch has at least (1000 - 16) // 16 = 61 windows: 20 per rank
    seen = [{starts_of(loader.next_batch())[0] for _ in range(20)} for loader in per_rank]
    assert all(len(s) == 20 for s in seen)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert all(loader.epoch == 0 for loader in per_rank)
    single = BatchLoader(dataset, 1, seq_len, seed=5)
    assert set().union(*seen) == {starts_of(single.next_batch())[0] for _ in range(60)}


def test_any_rank_resumes_from_rank_zero_state(dataset):
    rank0 = BatchLoader(dataset, 4, 16, seed=2, rank=0, world_size=2)
    rank1 = BatchLoader(dataset, 4, 16, seed=2, rank=1, world_size=2)
    take(rank0, 3)
    take(rank1, 3)
    resumed = BatchLoader(dataset, 4, 16, seed=2, rank=1, world_size=2)
    resumed.load_state_dict(rank0.state_dict())
    assert_same(take(resumed, 4), take(rank1, 4))


def test_resuming_on_other_data_is_an_error_unless_allowed(dataset, tmp_path):
    state = BatchLoader(dataset, 4, 16).state_dict()
    other = position_dataset(tmp_path / "other", fingerprint="data-b")
    with pytest.raises(UserError, match=r"fingerprint data-a/train, this data data-b/train"):
        BatchLoader(other, 4, 16).load_state_dict(state)
    loader = BatchLoader(other, 4, 16)
    loader.load_state_dict(state, allow_data_change=True)
    loader.next_batch()
    with pytest.raises(UserError, match="sequence length 16, this run uses 32"):
        BatchLoader(dataset, 4, 32).load_state_dict(state)


def test_bad_settings_and_too_little_data(tmp_path, dataset):
    with pytest.raises(UserError, match="too few"):
        BatchLoader(position_dataset(tmp_path / "small", num_tokens=40), 2, 16, world_size=2)
    with pytest.raises(UserError, match="rank"):
        BatchLoader(dataset, 2, 16, rank=2, world_size=2)
    with pytest.raises(UserError, match="batch_size=0"):
        BatchLoader(dataset, 0, 16)


@pytest.mark.parametrize(
    ("batch_size", "seq_len", "max_tokens"),
    [(3, 16, None), (4, 37, None), (4, 40, None), (2, 10, 95), (8, 999, None)],
)
def test_eval_batches_predict_every_token_once(dataset, batch_size, seq_len, max_tokens):
    batches = list(eval_batches(dataset, batch_size, seq_len, max_tokens=max_tokens))
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    assert all(x.shape[0] <= batch_size and x.shape[1] == seq_len for x, _ in batches)
    tokens = torch.from_numpy(dataset.tokens[:].astype(np.int64))
    predicted = targets[targets != IGNORE_INDEX]
    expected = tokens[1:] if max_tokens is None else tokens[1 : max_tokens + 1]
    assert torch.equal(predicted, expected)
    # each target follows its input: targets[i, j] is the token after inputs[i, j]
    flat_inputs, flat_targets = inputs.flatten(), targets.flatten()
    mask = flat_targets != IGNORE_INDEX
    assert torch.equal(flat_inputs[mask], tokens[: len(predicted)])
    # only the final window is padded
    assert (targets[:-1] != IGNORE_INDEX).all()


def test_eval_batches_of_an_empty_split(tmp_path):
    writer = ShardWriter(tmp_path, "val", vocab_size=10, eos_id=2)
    manifest = {"fingerprint": "x", "dtype": "uint16", "vocab_size": 10, "eos_id": 2}
    write_manifest(tmp_path, {**manifest, "splits": {"val": writer.close()}})
    empty = TokenDataset(tmp_path, "val")
    assert empty.num_tokens == 0 and empty.num_documents == 0
    assert list(eval_batches(empty, 4, 16)) == []
