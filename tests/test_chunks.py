"""Chunk hints: validation of the wire payload, and the recompute sets of each policy."""

from __future__ import annotations

import pytest
import torch

from sglang_holes.chunks.hints import (
    ChunkHints,
    Sink,
    chunk_boundaries,
    parse_chunk_action,
    recompute_mask,
    reused_count,
)


def test_parse_valid_payload():
    h = parse_chunk_action("1", {"chunks": [[0, 10], [10, 25]], "policy": "first_k", "k": 4})
    assert h == ChunkHints(((0, 10), (10, 25)), "first_k", 4)
    assert chunk_boundaries([10, 15]) == [(0, 10), (10, 25)]


@pytest.mark.parametrize("version, payload, msg", [
    ("2", {"chunks": [[0, 4]]}, "version '2' is not supported"),
    ("1", {"chunks": [[5, 9], [0, 4]]}, "sorted"),
    ("1", {"chunks": [[0, 6], [4, 9]]}, "overlap"),
    ("1", {"chunks": [[4, 4]]}, "empty or reversed"),
    ("1", {"chunks": [[6, 2]]}, "empty or reversed"),
    ("1", {"chunks": [[-1, 2]]}, "non-negative integer"),
    ("1", {"chunks": [[0, 2.5]]}, "non-negative integer"),
    ("1", {"chunks": []}, "non-empty list"),
    ("1", {"chunks": [[0, 4]], "policy": "cacheblend"}, "unknown chunk policy"),
    ("1", {"chunks": [[0, 4]], "k": -1}, "k must be"),
    ("1", {"chunks": [[0, 4]], "ratio": 1.5}, "ratio must be"),
    ("1", {"chunks": [[0, 4]], "boundaries": [0]}, "unknown fields"),
])
def test_malformed_payloads_are_rejected(version, payload, msg):
    with pytest.raises(ValueError, match=msg):
        parse_chunk_action(version, payload)


def test_out_of_range_chunk_is_rejected():
    h = parse_chunk_action("1", {"chunks": [[0, 4], [4, 30]]})
    with pytest.raises(ValueError, match="out of range for a prompt of 20 tokens"):
        recompute_mask(20, h, [True, True])


def test_policies():
    n = 30  # chunks [0,10) [10,22), question [22,30)
    chunks = ((0, 10), (10, 22))
    none = recompute_mask(n, ChunkHints(chunks, "none"), [True, True])
    assert none.nonzero().flatten().tolist() == list(range(22, 30))
    first = recompute_mask(n, ChunkHints(chunks, "first_k", k=3), [True, False])
    assert first.nonzero().flatten().tolist() == [0, 1, 2, *range(10, 30)]  # chunk 1 not in the store
    big_k = recompute_mask(n, ChunkHints(chunks, "first_k", k=50), [True, True])
    assert big_k.all()  # k >= chunk length: full recompute
    scores = torch.zeros(n)
    scores[[4, 15, 16]] = torch.tensor([3.0, 2.0, 1.0])
    dev = recompute_mask(n, ChunkHints(chunks, "deviation", ratio=2 / 22), [True, True], scores)
    assert dev.nonzero().flatten().tolist() == [4, 15, *range(22, 30)]
    with pytest.raises(ValueError, match="one score per prompt token"):
        recompute_mask(n, ChunkHints(chunks, "deviation"), [True, True])
    last = recompute_mask(10, ChunkHints(((0, 10),), "none"), [True])
    assert last.nonzero().flatten().tolist() == [9]  # the last token always runs


def test_the_attention_sink_is_recomputed_under_every_policy():
    """Positions [0, sink) inside a reused chunk are recomputed unless that chunk is exact in place;
    scored policies draw their ratio from what is left (the count is known before any score)."""
    n, chunks = 30, ((0, 10), (10, 22))
    moved = Sink(4, (False, False))
    for hints in (ChunkHints(chunks, "none"), ChunkHints(chunks, "first_k", k=2),
                  ChunkHints(chunks, "explicit", recompute=((12, 13),))):
        plain = recompute_mask(n, hints, [True, True])
        sunk = recompute_mask(n, hints, [True, True], sink=moved)
        assert sunk[:4].all() and (sunk[4:] == plain[4:]).all(), hints.policy
    exact = recompute_mask(n, ChunkHints(chunks, "none"), [True, True], sink=Sink(4, (True, False)))
    assert not exact[:4].any()  # stored at offset 0 after nothing: its KV is the sink's own
    late = recompute_mask(n, ChunkHints(((2, 10), (10, 22)), "none"), [True, True], sink=moved)
    assert late.nonzero().flatten().tolist()[:4] == [0, 1, 2, 3]  # [0, 2) outside chunks, [2, 4) the sink
    big = recompute_mask(n, ChunkHints(chunks, "none"), [True, True], sink=Sink(12, (False, False)))
    assert big[:12].all() and not big[12:22].any()  # a sink longer than the first chunk reaches the next
    hints = ChunkHints(chunks, "query", ratio=0.5)
    assert reused_count(n, hints, [True, True], sink=moved) == round(0.5 * 18)  # 22 reusable - 4 in the sink
    scores = torch.arange(n, dtype=torch.float32).flip(0)  # the sink positions score highest
    q = recompute_mask(n, hints, [True, True], scores, sink=moved)
    assert int((~q).sum()) == 9 and q[:4].all()
    with pytest.raises(ValueError, match=r"sink\.exact has 1 entries for 2 chunks"):
        recompute_mask(n, ChunkHints(chunks, "none"), [True, True], sink=Sink(4, (True,)))


def test_chunk_envelope_and_chunked_prompt():
    from sglang_holes.chunks.hints import ACTION_TYPE, build_chunked_prompt, chunk_envelope

    env = chunk_envelope([(0, 3), (3, 5)], "deviation", ratio=0.2)
    (action,) = env["actions"]
    assert action["action_type"] == ACTION_TYPE and action["action_version"] == "1"
    assert parse_chunk_action("1", action["payload"]) == ChunkHints(((0, 3), (3, 5)), "deviation", ratio=0.2)
    with pytest.raises(ValueError, match="overlap"):
        chunk_envelope([(0, 3), (2, 5)])

    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    p = build_chunked_prompt(["ab", [7, 8, 9], "c"], encode, prefix=[1], policy="none")
    assert p.input_ids == [1, 97, 98, 7, 8, 9, 99]
    assert p.chunks == [(1, 3), (3, 6), (6, 7)]
    assert p.kv_hints["actions"][0]["payload"] == {"chunks": [[1, 3], [3, 6], [6, 7]], "policy": "none"}
    for bad in ([], "text", ["ok", ""], ["ok", [1, -2]]):
        with pytest.raises(ValueError):
            build_chunked_prompt(bad, encode)


def test_query_and_explicit_policies():
    n = 30  # chunks [0,10) [10,22), question [22,30)
    chunks = ((0, 10), (10, 22))
    scores = torch.zeros(n)
    scores[[4, 15, 16]] = torch.tensor([3.0, 2.0, 1.0])
    query = recompute_mask(n, ChunkHints(chunks, "query", ratio=2 / 22), [True, True], scores)
    assert query.nonzero().flatten().tolist() == [4, 15, *range(22, 30)]
    # + each reused chunk's first k tokens; the ratio applies to the reused tokens left after them
    sinks = recompute_mask(n, ChunkHints(chunks, "query", k=2, ratio=1 / 18), [True, True], scores)
    assert sinks.nonzero().flatten().tolist() == [0, 1, 4, 10, 11, *range(22, 30)]
    assert reused_count(n, ChunkHints(chunks, "query", k=2, ratio=1 / 18), [True, True]) == 17
    full = recompute_mask(n, ChunkHints(chunks, "query", ratio=1.0), [True, True], scores)
    assert full.all()  # ratio 1: every reused token recomputed
    with pytest.raises(ValueError, match="query policy needs one score"):
        recompute_mask(n, ChunkHints(chunks, "query"), [True, True])
    explicit = parse_chunk_action("1", {"chunks": [[0, 10], [10, 22]], "policy": "explicit",
                                        "recompute": [[3, 5], [12, 13]]})
    assert recompute_mask(n, explicit, [True, True]).nonzero().flatten().tolist() == [3, 4, 12, *range(22, 30)]
    assert ChunkHints(chunks, "first_k").k == 16 and ChunkHints(chunks, "query").k == 0


@pytest.mark.parametrize("payload, msg", [
    ({"chunks": [[0, 4]], "policy": "query", "layers": 0}, "layers must be"),
    ({"chunks": [[0, 4]], "policy": "query", "layers": 2.5}, "layers must be"),
    ({"chunks": [[0, 4]], "policy": "explicit"}, "goes with policy explicit"),
    ({"chunks": [[0, 4]], "policy": "none", "recompute": [[0, 1]]}, "goes with policy explicit"),
    ({"chunks": [[0, 4]], "policy": "explicit", "recompute": [[2, 1]]}, "empty or reversed"),
    ({"chunks": [[0, 4]], "policy": "explicit", "recompute": [[0, "a"]]}, "non-negative integer"),
])
def test_malformed_query_and_explicit_payloads(payload, msg):
    with pytest.raises(ValueError, match=msg):
        parse_chunk_action("1", payload)


def test_chunk_fill_with_an_exact_prefix():
    """A shared leading prefix read in place from the exact tree: borrowed, first in the virtual order's prefix."""
    from sglang_holes.cache.node import Segment
    from sglang_holes.chunks.placement import ChunkFill

    base = ChunkFill.computing_all(8)
    assert base.order.tolist() == list(range(8)) and base.reused == 0
    fill = base.with_prefix(Segment(0, 3, torch.tensor([40, 41, 42])))
    assert fill.borrowed.nonzero().flatten().tolist() == [0, 1, 2]
    assert fill.order.tolist() == [3, 4, 5, 6, 7]
    assert [(g.start, g.end, g.slots.tolist()) for g in fill.segments()] == [(0, 3, [40, 41, 42])]
    assert base.recompute.all()  # the base is unchanged
    with pytest.raises(ValueError, match="computed positions"):
        fill.with_prefix(Segment(0, 2, torch.tensor([1, 2])))  # [0, 2) is no longer computed
    with pytest.raises(ValueError, match="slots"):
        base.with_prefix(Segment(0, 3, torch.tensor([1, 2])))
