"""``HoleRadixCache`` lock bookkeeping without an engine: SGLang's legacy inc/dec_lock_ref pair."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_holes.patches.radix_cache import HoleRadixCache


def _cache() -> HoleRadixCache:
    params = SimpleNamespace(page_size=1, disable=False, req_to_token_pool=None, is_eagle=False,
                             token_to_kv_pool_allocator=SimpleNamespace(device="cpu"))
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
