"""The scheduler process: the ``holes`` radix cache and the ``prepare_for_extend`` hook."""
