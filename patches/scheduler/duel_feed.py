"""What the ``holes`` cache shows ``cost-aware``'s decay duel: each finished request's prompt, once.

``DecayDuel`` (``sglang_holes/cache/decay_duel.py``) replays the stream in KV-less shadow caches,
one per decay, and moves the policy to the one that recently computed least (without its luckiest
request: ``DecayDuel.choice``); it only advises the eviction order, so a failure
inside it is logged, counted and ends the duel (the policy keeps its current decay) rather than the
scheduler.
"""

from __future__ import annotations

import logging
from typing import Any

from sglang_holes.cache.decay_duel import DecayDuel, make_duel

logger = logging.getLogger("sglang_holes")


class DuelFeed:
    """Mixin of ``HoleRadixCache`` (needs its ``policy``, ``namespaces``, ``page_size``,
    ``token_to_kv_pool_allocator`` and ``count``)."""

    duel: DecayDuel | None

    def _start_duel(self) -> None:
        """Fresh shadow caches of the pool's size (None: the policy has one decay or is not cost-aware)."""
        self.duel = make_duel(self.policy, int(self.token_to_kv_pool_allocator.size), self.page_size)

    def _feed_duel(self, req: Any, rec: Any, checkpointed: bool) -> None:
        """On release: a finished request once (a retracted one is released without a checkpoint); chunk-mode
        prompts keep approximate KV out of the exact tree the shadows model."""
        if self.duel is None or not checkpointed or not req.finished() or rec.chunk_hints is not None:
            return
        try:
            if self.duel.observe(list(req.origin_input_ids), self.namespaces.trees()):
                self.count("policy_switches")
        except Exception:
            logger.exception("sglang-holes: the eviction policy's decay duel failed on request %s; cost-aware "
                             "keeps decay %s from now on", req.rid, getattr(self.policy, "decay", None))
            self.count("request_errors")
            self.duel = None
            for tree in self.namespaces.trees():
                tree.reindex()
