"""fasttrain.data.Batches: shapes and shift, random and sequential windows, exact resume, and bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fasttrain.data import Batches


@pytest.fixture
def tokens():
    # Distinct values, so every window tells where it came from.
    return np.random.default_rng(0).permutation(5_000).astype(np.uint16)


@pytest.mark.parametrize("mode", ["random", "sequential"])
@pytest.mark.parametrize("batch_size, seq_len", [(1, 1), (3, 97), (8, 64)])
def test_windows_are_shifted_slices_of_the_tokens(tokens, mode, batch_size, seq_len):
    b = Batches(tokens, batch_size, seq_len, seed=1, mode=mode)
    for _ in range(3):
        x, y = b.next()
        assert x.shape == y.shape == (batch_size, seq_len) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            start = int(np.flatnonzero(tokens == row_x[0])[0])
            assert np.array_equal(row_x, tokens[start : start + seq_len])
            assert np.array_equal(row_y, tokens[start + 1 : start + seq_len + 1])


def test_random_windows_cover_the_split_and_depend_on_the_seed(tokens):
    where = np.argsort(tokens)  # tokens is a permutation: where[v] is the position of value v
    b = Batches(tokens, 16, 32, seed=5)
    starts = np.concatenate([where[b.next()[0][:, 0].numpy()] for _ in range(50)])  # (800,)
    assert starts.min() < 200 and len(tokens) - 33 - 200 < starts.max() <= len(tokens) - 33
    assert not torch.equal(Batches(tokens, 16, 32, seed=5).next()[0], Batches(tokens, 16, 32, seed=6).next()[0])


def test_sequential_walks_the_windows_in_order_and_counts_epochs(tokens):
    b = Batches(tokens, 4, 100, mode="sequential")
    assert b.windows == 49  # (5000 - 1) // 100
    where = np.argsort(tokens)
    firsts = np.concatenate([where[b.next()[0][:, 0].numpy()] for _ in range(13)]).tolist()
    assert firsts[:49] == [w * 100 for w in range(49)] and firsts[49:] == [w * 100 for w in range(3)]
    assert b.epoch == pytest.approx(52 / 49)
    r = Batches(tokens, 4, 100)
    for _ in range(10):
        r.next()
    assert r.epoch == pytest.approx(10 * 4 * 100 / 4999)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_yields_exactly_the_batches_of_an_uninterrupted_run(tokens, mode):
    straight = Batches(tokens, 4, 50, seed=7, mode=mode)
    expected = [straight.next() for _ in range(30)]
    first = Batches(tokens, 4, 50, seed=7, mode=mode)
    for _ in range(12):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = Batches(tokens, 4, 50, seed=7, mode=mode)
    resumed.load_state_dict(state)
    assert resumed.epoch == first.epoch
    for x_expected, y_expected in expected[12:]:
        x, y = resumed.next()
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_loading_a_state_of_other_batches_raises(tokens):
    state = Batches(tokens, 4, 50, seed=7).state_dict()
    with pytest.raises(ValueError, match=r"batch_size=4 but these batches have 8"):
        Batches(tokens, 8, 50, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match=r"the data changed"):
        Batches(tokens[:-1], 4, 50, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match=r"mode='random'"):
        Batches(tokens, 4, 50, seed=7, mode="sequential").load_state_dict(state)


@pytest.mark.parametrize(
    "args, kw, error, match",
    [
        ((np.arange(10), 2, 10), {}, ValueError, r"tokens has 10 tokens; seq_len=10 needs at least 11"),
        ((np.arange(100), 0, 8), {}, ValueError, r"batch_size must be a positive int"),
        ((np.arange(100), 2, 0), {}, ValueError, r"seq_len must be a positive int"),
        ((np.arange(100), 2, 8), {"mode": "shuffle"}, ValueError, r"mode must be one of"),
        ((np.arange(100), 2, 8), {"seed": -1}, ValueError, r"seed must be an int >= 0, got -1"),
        ((np.arange(100), 2, 8), {"seed": 1.5}, ValueError, r"seed must be an int >= 0, got 1.5"),
        ((torch.arange(100), 2, 8), {}, TypeError, r"tokens must be a 1-D numpy array"),
        ((np.zeros((4, 100)), 2, 8), {}, TypeError, r"tokens must be a 1-D numpy array"),
    ],
)
def test_bad_arguments(args, kw, error, match):
    with pytest.raises(error, match=match):
        Batches(*args, **kw)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_ranks_take_disjoint_strides_of_one_stream(tokens, mode):
    # 3 ranks of batch 2 take, step by step, the batches of one process, rank r the job's batches r, r + 3, ...
    one = Batches(tokens, 2, 7, seed=5, mode=mode)
    ranks = [Batches(tokens, 2, 7, seed=5, mode=mode, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        for r in ranks:
            x, y = r.next()
            want_x, want_y = one.next()
            assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert {r.step for r in ranks} == {one.step} and ranks[1].epoch == one.epoch  # positions count the job's batches
    # a position saved by 3 ranks resumes at another world size: 2 ranks go on where the job stopped
    two = [Batches(tokens, 2, 7, seed=5, mode=mode, rank=r, world_size=2) for r in range(2)]
    for b in two:
        b.load_state_dict(ranks[0].state_dict())
    for b in two:
        assert torch.equal(b.next()[0], one.next()[0])


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2), (0, 0), (0, True)])
def test_bad_rank_or_world_size(tokens, rank, world_size):
    with pytest.raises(ValueError, match="rank must be|world_size must be"):
        Batches(tokens, 2, 7, rank=rank, world_size=world_size)
