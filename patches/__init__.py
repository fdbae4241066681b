"""sglang_holes.patches: the only code in sglang-holes that imports sglang.

One module per SGLang surface, each wired through an official extension point:

* ``version``   -- the pinned SGLang release and the start-up check.
* ``platform``  -- out-of-tree CPU platform (entry-point group ``sglang.srt.platforms``).
* ``plugin``    -- general plugin entry point (group ``sglang.srt.plugins``), run by
  SGLang in every process it starts; registers hooks with ``HookRegistry``.
* ``internal_state`` -- reports the plugin in the scheduler's internal state.
* ``launch``    -- server-argument defaults shared by ``Engine`` and ``serve``.
* ``engine``    -- ``sglang_holes.Engine``, a drop-in ``sglang.Engine``.
* ``cli``       -- the ``sglang-holes`` console script (``serve``, ``prepare-model``).
"""
