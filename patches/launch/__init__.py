"""Start-up: version pin, hooks table, plugin and platform entry points, server arguments,
capabilities, ``sglang_holes.Engine`` and the ``sglang-holes`` console script."""
