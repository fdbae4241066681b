"""``HoleRadixCache`` lock bookkeeping without an engine: SGLang's legacy inc/dec_lock_ref pair."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_holes.patches.scheduler.radix_cache import HoleRadixCache


def _cache() -> HoleRadixCache:
    params = SimpleNamespace(page_size=1, disable=False, req_to_token_pool=None, is_eagle=False,
                             token_to_kv_pool_allocator=SimpleNamespace(device="cpu", size=1000))
    return HoleRadixCache(params)


def test_dec_lock_ref_releases_only_what_inc_lock_ref_took():
    cache = _cache()
    tree = cache._tree()
    with cache.namespaces.tracked(tree):
        node = tree.insert([1, 2, 3, 4], torch.arange(4)).handle.node
    cache.inc_lock_ref(node)
    cache.inc_lock_ref(node)
    assert (node.lock_ref, tree.protected_size) == (2, 4)
    cache.dec_lock_ref(node)
    cache.dec_lock_ref(node)
    assert (node.lock_ref, tree.protected_size, tree.evictable_size) == (0, 0, 4)
    with pytest.raises(RuntimeError, match="without a matching inc_lock_ref"):
        cache.dec_lock_ref(node)  # a double unlock is refused, the tree unchanged
    assert node.lock_ref == 0
    cache.check_integrity()


def test_dec_lock_ref_cannot_release_a_request_lock():
    """A request's lock (``lock``/``unlock``) is not an inc_lock_ref: dec_lock_ref must not forge one."""
    cache = _cache()
    tree = cache._tree()
    with cache.namespaces.tracked(tree):
        node = tree.insert([5, 6], torch.arange(2)).handle.node
    receipt = cache.lock(node)
    with pytest.raises(RuntimeError):
        cache.dec_lock_ref(node)
    assert node.lock_ref == 1
    cache.unlock(receipt)
    assert node.lock_ref == 0
    cache.check_integrity()


def test_a_request_whose_planning_fails_is_served_without_reuse(caplog):
    """A failure while planning one request's reuse is that request's alone: logged with its rid, counted,
    matched with no reuse (it computes everything: always correct); the cache keeps serving others."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

    cache = _cache()
    tree = cache._tree()
    with cache.namespaces.tracked(tree):
        tree.insert([1, 2, 3, 4, 5, 6], torch.arange(1, 7))
        tree.evict_span([1, 2, 3, 4, 5, 6], 1, 3)  # a hole: [4, 6) lies beyond it
    cache.no_hole_batches = None  # the server's capabilities: hole batches run
    req = SimpleNamespace(rid="r-7", kv_hints=None, multimodal_inputs=None, input_embeds=None,
                          return_hidden_states=False, return_logprob=False, logprob_start_len=-1,
                          origin_input_ids=[1, 2, 3, 4, 5, 6, 7])
    class Key(list):
        extra_key = cache_salt = None

        @property
        def token_ids(self) -> list[int]:
            return list(self)

    key = Key([1, 2, 3, 4, 5, 6])
    ok = cache.match_prefix(MatchPrefixParams(key=key, req=req))
    assert (ok.device_prefix_len, ok.cache_protected_len) == (4, 1)  # [0, 1) and [3, 6): virtual order

    def broken(tokens):
        raise IndexError("planning bug")

    tree.match = broken
    with caplog.at_level("ERROR", logger="sglang_holes"):
        got = cache.match_prefix(MatchPrefixParams(key=key, req=req))
    assert got.device_prefix_len == 0 and req.holes.fill is None
    assert cache.stats["request_errors"] == 1
    assert "r-7" in caplog.text and "served without reuse" in caplog.text
    cache.check_integrity()


def test_a_failing_decay_duel_is_switched_off_not_fatal(caplog):
    """The decay duel only advises the eviction order: a failure while it observes a finished request is
    logged with the rid and counted, the duel is switched off (cost-aware keeps its decay) and the cache
    stays sound."""
    cache = _cache()
    tree = cache._tree()
    with cache.namespaces.tracked(tree):
        tree.insert([1, 2, 3, 4], torch.arange(1, 5))
    assert cache.duel is not None
    rec = SimpleNamespace(chunk_hints=None)
    finished = lambda rid, ids: SimpleNamespace(rid=rid, origin_input_ids=ids, finished=lambda: True)  # noqa: E731
    cache._feed_duel(finished("r-ok", [1, 2, 3, 4, 5]), rec, checkpointed=True)
    cache._feed_duel(finished("r-retracted", [1, 2]), rec, checkpointed=False)  # not a finish: not observed
    assert cache.duel.observed == 1
    cache.duel.shadows[1].serve = None  # a bug in the second shadow: it is not callable
    with caplog.at_level("ERROR", logger="sglang_holes"):
        cache._feed_duel(finished("r-9", [1, 2, 3]), rec, checkpointed=True)
    assert cache.duel is None and cache.stats["request_errors"] == 1
    assert "r-9" in caplog.text and "decay duel failed" in caplog.text
    assert cache.policy.decay == 2.0  # the decay it followed
    cache.check_integrity()

