"""Segment streams (pipeline/data/streams.py) on real shards written with write_shard.

Every expectation is computed from the raw token array (stream b = raw[b*L : (b+1)*L + 1] with
L = (T - 1) // n), never from the stream code; resume tests compare against an uninterrupted run.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.data.shards import Manifest, ShardError, SplitInfo, write_shard
from pipeline.data.streams import StreamError, merge_states, open_streams, stream_ids


def make_split(root, raw: np.ndarray, dtype: str = "uint16", chunk_tokens: int = 64, shard_tokens=(700, 333, 1000),
               split: str = "train", sentence_starts: np.ndarray | None = None) -> str:
    """Write ``raw`` as shards of irregular sizes (chunks of each shard's last piece are short)."""
    infos, lo, i = [], 0, 0
    while lo < len(raw):
        hi = min(len(raw), lo + shard_tokens[i % len(shard_tokens)])
        if sentence_starts is not None:   # units end on sentence boundaries
            later = sentence_starts[sentence_starts >= hi]
            hi = int(later[0]) if len(later) else len(raw)
            starts = sentence_starts[(sentence_starts >= lo) & (sentence_starts < hi)] - lo
        else:
            starts = None
        infos.append(write_shard(root, split, i, raw[lo:hi], chunk_tokens, dtype, sentence_starts=starts))
        lo, i = hi, i + 1
    vocab = 1 << 16 if dtype == "uint16" else 1 << 20
    Manifest("test", {"kind": "test", "vocab_size": vocab}, dtype, chunk_tokens, sentence_starts is not None,
             {split: SplitInfo(infos)}).save(root)
    return str(root)


def random_tokens(n: int, seed: int = 0, high: int = 60000, dtype="uint16") -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, n).astype(dtype)


def collect(it, n_batches: int) -> dict[int, list]:
    """stream id -> [(inputs row, targets row, warmup, epoch)] over the next n_batches yields."""
    out: dict[int, list] = {}
    for _ in range(n_batches):
        batch = next(it)
        for row, sid in enumerate(batch.stream_ids):
            out.setdefault(sid, []).append((batch.inputs[row].numpy(), batch.targets[row].numpy(),
                                            batch.warmup, batch.epoch))
    return out


def stream_tokens(segments) -> np.ndarray:
    """A stream's tokens as read: all inputs then the last target."""
    return np.concatenate([s[0] for s in segments] + [segments[-1][1][-1:]])


# ----------------------------------------------------------------------------- contents


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_streams_are_contiguous_slices_of_the_split(tmp_path, dtype):
    T, n, t = 5003, 16, 7
    raw = random_tokens(T, dtype=dtype, high=70000 if dtype == "uint32" else 60000)
    it = open_streams(make_split(tmp_path, raw, dtype), "train", n_streams=n, tgt_len=t)
    L = (T - 1) // n
    S = L // t
    assert (it.tokens_per_stream, it.dropped_tokens, it.steps_per_epoch) == (L, T - 1 - n * L, S)
    assert it.scored_tokens == n * S * t

    prev = None
    for _ in range(S):
        batch = next(it)
        inputs, targets = batch                          # unpacks as a pair
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == (n, t)
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        if prev is not None:                             # batch k+1 continues batch k in every stream
            assert torch.equal(prev[1][:, -1], inputs[:, 0])
        prev = batch
    it2 = open_streams(tmp_path, "train", n_streams=n, tgt_len=t, read_ahead=10_000)
    for read in (collect(it2, S),):
        for b in range(n):
            assert np.array_equal(stream_tokens(read[b]), raw[b * L: b * L + S * t + 1].astype(np.int64))


@pytest.mark.parametrize("warm_tokens", [0, 15])
def test_epochs_restart_streams_and_every_target_is_owned_once(tmp_path, warm_tokens):
    T, n, t = 2000, 8, 10
    raw = random_tokens(T)
    it = open_streams(make_split(tmp_path, raw), "train", n_streams=n, tgt_len=t, warm_tokens=warm_tokens)
    L = (T - 1) // n
    S = L // t + math.ceil(warm_tokens / t)             # every epoch warms up again
    assert it.steps_per_epoch == S
    first = [next(it) for _ in range(S)]
    again = [next(it) for _ in range(S)]                 # epoch 1 without roll: same streams again
    assert all(b.epoch == 0 for b in first) and all(b.epoch == 1 for b in again)
    for a, b in zip(first, again):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and a.warmup == b.warmup
    assert sum(b.warmup for b in first) == math.ceil(warm_tokens / t)
    # Streams share boundary tokens: stream b's targets are raw[b*L+1 : (b+1)*L+1], disjoint over b.
    owned = np.concatenate([np.arange(b * L + 1, (b + 1) * L + 1) for b in range(n)])
    assert np.array_equal(owned, np.arange(1, n * L + 1))


@pytest.mark.parametrize("world_size,micro_batches", [(1, 1), (2, 1), (4, 1), (2, 2), (1, 4), (4, 2)])
def test_rank_and_micro_batch_partition(tmp_path, world_size, micro_batches):
    T, n, t = 3001, 16, 5
    raw = random_tokens(T)
    make_split(tmp_path, raw)
    L = (T - 1) // n
    seen, counts = [], []
    for rank in range(world_size):
        it = open_streams(tmp_path, "train", n_streams=n, tgt_len=t, rank=rank, world_size=world_size,
                          micro_batches=micro_batches)
        assert list(it.ids) == list(stream_ids(n, world_size, rank))
        got = collect(it, 3 * micro_batches)             # three steps, micro-batches in order
        rank_ids = []
        for m in range(micro_batches):
            ids = list(it.micro_batch_ids(m))
            rank_ids += ids
            assert len(ids) == n // (world_size * micro_batches)
        assert sorted(got) == rank_ids
        counts.append(len(rank_ids))
        seen += rank_ids
        for b in rank_ids:
            assert np.array_equal(stream_tokens(got[b]), raw[b * L: b * L + 3 * t + 1])
    assert sorted(seen) == list(range(n)) and len(set(seen)) == n     # disjoint and covering
    assert len(set(counts)) == 1                                       # equal per rank


def test_micro_batches_are_yielded_in_order(tmp_path):
    make_split(tmp_path, random_tokens(3001))
    it = open_streams(tmp_path, "train", n_streams=16, tgt_len=5, world_size=2, rank=1, micro_batches=4)
    batches = [next(it) for _ in range(8)]
    assert [b.micro_batch for b in batches] == [0, 1, 2, 3] * 2
    assert [b.stream_ids for b in batches[:4]] == [(8, 9), (10, 11), (12, 13), (14, 15)]


# ----------------------------------------------------------------------------- roll


def rotation_of(seq: np.ndarray, stream: np.ndarray) -> int:
    """The r with seq == stream rotated by r (cyclic over the stream's L+1 tokens), else -1."""
    doubled = np.concatenate([stream, stream])
    for r in range(len(stream)):
        if np.array_equal(doubled[r: r + len(seq)], seq):
            return r
    return -1


def test_roll_rotates_each_stream_deterministically_and_independent_of_world_size(tmp_path):
    T, n, t = 2401, 8, 6
    raw = np.arange(T, dtype=np.uint16)                  # distinct tokens: rotations are unambiguous
    make_split(tmp_path, raw)
    L, S = (T - 1) // n, ((T - 1) // n) // t

    def per_stream(world_size, micro_batches, seed):
        out: dict[int, list] = {}
        for rank in range(world_size):
            it = open_streams(tmp_path, "train", n_streams=n, tgt_len=t, rank=rank, world_size=world_size,
                              micro_batches=micro_batches, roll=True, seed=seed)
            out.update(collect(it, 2 * S * micro_batches))   # two epochs
        return out

    base = per_stream(1, 1, seed=3)
    assert base.keys() == set(range(n))
    rotations = {}
    for b in range(n):
        stream = raw[b * L: (b + 1) * L + 1].astype(np.int64)
        for epoch in (0, 1):
            segs = [s for s in base[b] if s[3] == epoch]
            assert len(segs) == S
            r = rotation_of(stream_tokens(segs), stream)
            assert r >= 0, f"stream {b} epoch {epoch} is not a rotation of raw[{b * L}:{(b + 1) * L + 1}]"
            rotations[b, epoch] = r
    assert len(set(rotations.values())) > n                 # offsets vary over streams and epochs
    for layout in [(2, 1), (4, 2), (1, 2)]:                  # same tokens per stream id on any layout
        other = per_stream(*layout, seed=3)
        for b in range(n):
            assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(base[b], other[b]))
    again, other_seed = per_stream(1, 1, seed=3), per_stream(1, 1, seed=4)
    assert all(np.array_equal(stream_tokens(again[b]), stream_tokens(base[b])) for b in range(n))
    assert any(not np.array_equal(stream_tokens(other_seed[b]), stream_tokens(base[b])) for b in range(n))


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("warm_tokens", [0, 12, 25, 300])
def test_eval_warm_start_and_every_token_scored_once(tmp_path, warm_tokens):
    T, n, t = 2003, 8, 10                                 # L = 250: the last segment is short
    raw = random_tokens(T)
    make_split(tmp_path, raw)
    L = (T - 1) // n
    it = open_streams(tmp_path, "train", n_streams=n, tgt_len=t, warm_tokens=warm_tokens, drop_last=False,
                      world_size=1, micro_batches=2)
    batches = list(it)                                   # one epoch, then StopIteration
    assert len(batches) == 2 * it.steps_per_epoch == 2 * (math.ceil(warm_tokens / t) + math.ceil(L / t))
    assert it.scored_tokens == n * L
    got: dict[int, list] = {}
    for batch in batches:
        for row, sid in enumerate(batch.stream_ids):
            got.setdefault(sid, []).append((batch.inputs[row].numpy(), batch.targets[row].numpy(), batch.warmup))
    scored = np.zeros(T, dtype=np.int64)
    for b in range(n):
        warm = [s for s in got[b] if s[2]]
        cold = [s for s in got[b] if not s[2]]
        assert [s[2] for s in got[b]] == [True] * len(warm) + [False] * len(cold)   # warm-up first
        context = raw[(b * L - warm_tokens + np.arange(warm_tokens)) % T]   # true context; stream 0 wraps
        if warm:
            assert np.array_equal(np.concatenate([s[0] for s in warm]), context)
            assert warm[-1][1][-1] == raw[b * L]         # warm-up ends right before the stream
        targets = np.concatenate([s[1] for s in cold])
        assert np.array_equal(np.concatenate([s[0] for s in cold]), raw[b * L: (b + 1) * L])
        assert np.array_equal(targets, raw[b * L + 1: (b + 1) * L + 1])
        scored[b * L + 1: (b + 1) * L + 1] += 1
    assert sum(len(s[1]) for b in got for s in got[b] if not s[2]) == n * L
    assert (scored[1: n * L + 1] == 1).all() and scored.sum() == n * L      # each scored exactly once


def test_drop_last_false_yields_a_final_short_batch(tmp_path):
    T, n, t = 1001, 4, 32                                # L = 250 = 7*32 + 26
    raw = random_tokens(T)
    it = open_streams(make_split(tmp_path, raw), "train", n_streams=n, tgt_len=t, drop_last=False)
    lengths = [b.inputs.shape[1] for b in it]
    assert lengths == [32] * 7 + [26]
    with pytest.raises(StopIteration):
        next(it)


# ----------------------------------------------------------------------------- resume


def run_layout(root, world_size, micro_batches, n_yields, state=None, **kw):
    """Every rank yields n_yields batches (after loading ``state``); returns (per-stream segments, merged state)."""
    out, states = {}, []
    for rank in range(world_size):
        it = open_streams(root, "train", rank=rank, world_size=world_size, micro_batches=micro_batches, **kw)
        if state is not None:
            it.load_state_dict(state)
        out.update(collect(it, n_yields))
        states.append(it.state_dict())
    return out, merge_states(states)


@pytest.mark.parametrize("save,load", [((1, 1), (1, 1)), ((2, 1), (1, 1)), ((2, 1), (4, 1)), ((2, 2), (1, 1)),
                                       ((1, 2), (2, 4)), ((4, 1), (1, 2))])
@pytest.mark.parametrize("n_saved", [5, 7])              # 7 micro-batches: saved mid-step when M > 1
def test_resume_continues_every_stream_exactly(tmp_path, save, load, n_saved):
    T, n, t = 3001, 16, 7
    make_split(tmp_path, random_tokens(T))
    kw = dict(n_streams=n, tgt_len=t, roll=True, seed=11)
    steps = 3 * ((T - 1) // n // t)                      # three epochs of the uninterrupted run
    full, _ = run_layout(tmp_path, 1, 1, steps, **kw)
    first, state = run_layout(tmp_path, *save, n_saved, **kw)
    state = torch.load(_roundtrip(tmp_path, state), weights_only=True)
    k = 40                                               # crosses the epoch boundary (S = 26)
    resumed, _ = run_layout(tmp_path, *load, k, state=state, **kw)
    assert resumed.keys() == set(range(n))
    for b in range(n):
        done = len(first.get(b, []))
        expect = full[b][done: done + len(resumed[b])]
        assert len(expect) == len(resumed[b]) > 0
        for x, y in zip(expect, resumed[b]):             # rolled tokens differ per epoch: equality checks it
            assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])


def _roundtrip(tmp_path, state):
    path = tmp_path / "streams_state.pt"
    torch.save(state, path)
    return path


def test_resume_same_layout_mid_step_gives_identical_batches(tmp_path):
    make_split(tmp_path, random_tokens(3001))
    kw = dict(n_streams=16, tgt_len=7, world_size=2, rank=1, micro_batches=4, roll=True, seed=5)
    ref = open_streams(tmp_path, "train", **kw)
    ref_batches = [next(ref) for _ in range(130)]
    it = open_streams(tmp_path, "train", **kw)
    for _ in range(50):                                  # 12 steps + 2 micro-batches
        next(it)
    state = it.state_dict()
    assert state["next_micro_batch"] == 2
    resumed = open_streams(tmp_path, "train", **kw)
    resumed.load_state_dict(state)
    for a, b in zip(ref_batches[50:], (next(resumed) for _ in range(80))):
        assert (a.micro_batch, a.stream_ids, a.epoch) == (b.micro_batch, b.stream_ids, b.epoch)
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


def test_resume_errors_name_the_problem(tmp_path):
    make_split(tmp_path, random_tokens(3001))
    it = open_streams(tmp_path, "train", n_streams=16, tgt_len=7, world_size=2, rank=0)
    next(it)
    state = it.state_dict()                              # rank 0 only: streams 0-7
    single = open_streams(tmp_path, "train", n_streams=16, tgt_len=7)
    with pytest.raises(StreamError, match=r"lacks stream ids 8-15"):
        single.load_state_dict(state)
    for key, value in [("n_streams", 32), ("tgt_len", 8), ("split_tokens", 3000), ("split", "valid")]:
        with pytest.raises(StreamError, match=rf"{key}={value!r}"):
            single.load_state_dict({**state, key: value})
    with pytest.raises(StreamError, match="more than one state"):
        merge_states([state, state])


# ----------------------------------------------------------------------------- lm1b mode


def sentence_corpus(n_sentences: int, seed: int = 0):
    """Sentence i is ``lens[i]`` copies of the token i+1, so runs identify sentences."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 30, n_sentences)
    raw = np.repeat(np.arange(1, n_sentences + 1), lens).astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return raw, starts, lens


def runs(seq: np.ndarray) -> list[tuple[int, int]]:
    cut = np.flatnonzero(np.diff(seq)) + 1
    bounds = np.concatenate([[0], cut, [len(seq)]])
    return [(int(seq[a]), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]


def epoch_sequences(it, n, L, S, epochs):
    """Each epoch's whole token sequence, rebuilt from the streams (neighbours share one token)."""
    got = collect(it, epochs * S)
    out = []
    for e in range(epochs):
        parts = [stream_tokens([s for s in got[b] if s[3] == e]) for b in range(n)]
        assert all(len(p) == L + 1 for p in parts)
        for b in range(n - 1):
            assert parts[b][-1] == parts[b + 1][0]
        out.append(np.concatenate([parts[0]] + [p[1:] for p in parts[1:]]))
    return out


def test_shuffled_sentences_every_sentence_once_per_epoch(tmp_path):
    n, t, S = 8, 9, 4
    raw, starts, lens = sentence_corpus(300)
    L = S * t
    # Cut the corpus to T = n*L + 1 tokens (shortening the last sentence), so no token is dropped.
    T = n * L + 1
    cum = np.cumsum(lens)
    keep = int(np.searchsorted(cum, T))                  # first sentence reaching T
    lens = lens[: keep + 1].copy()
    lens[-1] -= cum[keep] - T
    raw = np.repeat(np.arange(1, keep + 2), lens)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    make_split(tmp_path, raw.astype(np.uint16), chunk_tokens=40, shard_tokens=(150, 90), sentence_starts=starts)
    kw = dict(n_streams=n, tgt_len=t, mode="shuffled_sentences", seed=7)
    it = open_streams(tmp_path, "train", **kw)
    assert it.tokens_per_stream == L and it.dropped_tokens == 0
    seqs = epoch_sequences(it, n, L, S, epochs=3)
    expected = sorted((i + 1, int(lens[i])) for i in range(len(lens)))
    for seq in seqs:
        assert sorted(runs(seq)) == expected             # every sentence, whole, exactly once
    assert not np.array_equal(seqs[0], seqs[1]) and not np.array_equal(seqs[1], seqs[2])
    for seq in seqs:                                     # sentences are shuffled inside chunks too:
        ids = np.array([v for v, _ in runs(seq)])        # originally every neighbour is id + 1
        assert np.mean(np.diff(ids) == 1) < 0.3
    same = epoch_sequences(open_streams(tmp_path, "train", **kw), n, L, S, epochs=2)
    other = epoch_sequences(open_streams(tmp_path, "train", **{**kw, "seed": 8}), n, L, S, epochs=1)
    assert all(np.array_equal(a, b) for a, b in zip(same, seqs))
    assert not np.array_equal(other[0], seqs[0])


@pytest.mark.parametrize("load", [(1, 1), (1, 4)])
def test_shuffled_sentences_resume_across_layouts(tmp_path, load):
    raw, starts, _ = sentence_corpus(400, seed=1)
    make_split(tmp_path, raw, chunk_tokens=50, shard_tokens=(200, 120), sentence_starts=starts)
    kw = dict(n_streams=8, tgt_len=6, mode="shuffled_sentences", seed=3, roll=True)
    S = (len(raw) - 1) // 8 // 6
    full, _ = run_layout(tmp_path, 1, 1, 2 * S + 5, **kw)
    # Saved mid-step on the last step of epoch 0: micro-batch 0's streams have finished it, 1's have not.
    first, state = run_layout(tmp_path, 2, 2, 2 * (S - 1) + 1, **kw)
    assert {state["epochs"][b] for b in range(8)} == {0} and len({state["streams"][b] for b in range(8)}) == 2
    resumed, _ = run_layout(tmp_path, *load, 6 * load[1], state=state, **kw)
    for b in range(8):
        done = len(first[b])
        assert len(resumed[b]) == 6
        for x, y in zip(full[b][done:], resumed[b]):
            assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_values(tmp_path):
    make_split(tmp_path, random_tokens(1000))
    with pytest.raises(StreamError, match=r"n_streams=12 is not divisible by world_size=2 × micro_batches=4 = 8"):
        open_streams(tmp_path, "train", n_streams=12, tgt_len=4, world_size=2, micro_batches=4)
    too_short = r"split 'train' has 1000 tokens; n_streams=8 × tgt_len=200 needs at least 1601"
    with pytest.raises(StreamError, match=too_short):
        open_streams(tmp_path, "train", n_streams=8, tgt_len=200)
    with pytest.raises(ShardError, match=r"split 'test' is not in the manifest; it has \['train'\]"):
        open_streams(tmp_path, "test", n_streams=8, tgt_len=4)
    with pytest.raises(StreamError, match="sentences=false"):
        open_streams(tmp_path, "train", n_streams=8, tgt_len=4, mode="shuffled_sentences")
    with pytest.raises(StreamError, match="rank=2"):
        open_streams(tmp_path, "train", n_streams=8, tgt_len=4, rank=2, world_size=2)
    with pytest.raises(StreamError, match="mode='lm1b'"):
        open_streams(tmp_path, "train", n_streams=8, tgt_len=4, mode="lm1b")


def test_manifest_of_another_version_or_unreadable_is_refused_by_name(tmp_path):
    make_split(tmp_path, random_tokens(1000))
    path = tmp_path / "manifest.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "version": raw["version"] + 1}))
    with pytest.raises(ShardError, match=rf"{path}: format 'xlpipe-shards' version {raw['version'] + 1}; "
                                         rf"this code reads 'xlpipe-shards' version {raw['version']}"):
        open_streams(tmp_path, "train", n_streams=8, tgt_len=4)
    path.write_text('{"format": ')
    with pytest.raises(ShardError, match=rf"cannot read {path}"):
        open_streams(tmp_path, "train", n_streams=8, tgt_len=4)


@pytest.mark.parametrize("edit, named", [
    (lambda m: m["splits"]["train"].update(total_tokens=m["splits"]["train"]["total_tokens"] + 1),
     r"split 'train' states total_tokens=1001 but its shards hold 1000"),
    (lambda m: m["splits"]["train"]["shards"][1].update(tokens=7),
     r"split 'train' shard train/shard-000001.tar states 7 tokens but its chunks hold 90"),
    (lambda m: m["splits"]["train"]["shards"][0].update(samples=9),
     r"shard train/shard-000000.tar lists 3 chunk sizes and 3 CRC32s for 9 samples"),
    (lambda m: m["tokenizer"].update(vocab_size=70000), r"dtype 'uint16' does not hold the ids of vocab_size 70000"),
])
def test_an_inconsistent_manifest_is_refused_on_open_naming_what_disagrees(tmp_path, edit, named):
    from pipeline.data.shards import MANIFEST

    make_split(tmp_path, random_tokens(1000), chunk_tokens=50, shard_tokens=(150, 90))
    Manifest.load(tmp_path)                                   # as written: consistent
    raw = json.loads((tmp_path / MANIFEST).read_text())
    edit(raw)
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ShardError, match=named + r".*rebuild it with `python -m pipeline.prepare"):
        Manifest.load(tmp_path)
