"""sglang_holes.patches: the only code in sglang-holes that imports sglang.

One subpackage per concern, mirroring where the code sits in SGLang; every SGLang
touch-point is listed in ``launch/hooks.py`` and checked against the installed SGLang:

* ``launch``    -- start-up: the pinned version, the hooks table, the plugin and platform entry
  points, server-argument defaults and refusals, the one capabilities decision, ``Engine``, the CLI.
* ``scheduler`` -- the scheduler process: the ``holes`` radix cache (match, locks, checkpoint,
  release, eviction), RAG document reuse, the extend hook (plan, then commit), the pool audit.
* ``attention`` -- the forward: the ``ForwardBatch`` hook and the three hole-aware backends.
* ``serving``   -- what a client sees: entry validation, ``kv_hints``, ``meta_info``, metrics,
  internal state, the RPC methods, ``POST /holes/evict``, the OpenAI chat content parts.

Module by module: ``docs/design.md`` ("The SGLang side").
"""
