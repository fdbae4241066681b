"""sglang_holes.patches: the only code in sglang-holes that imports sglang.

One module per SGLang surface, each wired through an official extension point; every
touch-point is listed in ``hooks`` and checked against the installed SGLang:

* ``hooks``          -- the table of SGLang targets, registries and fields we use; ``verify()``.
* ``version``        -- the pinned SGLang release and the start-up check.
* ``platform`` / ``cpu_platform`` -- out-of-tree CPU platform (entry-point group ``sglang.srt.platforms``).
* ``plugin``         -- general plugin entry point (group ``sglang.srt.plugins``), run by SGLang in
  every process it starts: registers the ``holes`` radix cache, the attention-backend
  wrappers and the hooks of ``hooks.HOOKS``.
* ``radix_cache`` / ``radix_cache_chunks`` / ``cache_factory`` -- ``HoleRadixCache`` (``BasePrefixCache``),
  its chunk mode, and its construction from SGLang's ``TreeCacheBuildContext``.
* ``request_holes``  -- ``RequestHoles``, the one record kept on a scheduler ``Req``.
* ``schedule_batch`` -- ``ScheduleBatch.prepare_for_extend`` hooks: plan, then commit.
* ``forward_batch``  -- ``ForwardBatch.init_new`` hook and the per-batch ``HolePlan``.
* ``torch_native_backend`` / ``flashinfer_backend`` -- hole-aware attention backends.
* ``kv_hints`` / ``tokenizer_manager`` -- chunk hints in SGLang's ``kv_hints``; entry validation.
* ``meta_info`` / ``metrics`` / ``internal_state`` -- what a request, ``/metrics`` and
  ``/get_server_info`` report.
* ``scheduler_rpc`` / ``http_server`` -- ``evict_span`` / ``chunk_kv`` over SGLang's RPC; ``POST /holes/evict``.
* ``server_args``    -- the one table of server-argument defaults for ``Engine`` and ``serve``.
* ``engine`` / ``cli`` -- ``sglang_holes.Engine`` and the ``sglang-holes`` console script.
"""
