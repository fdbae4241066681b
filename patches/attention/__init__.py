"""The forward: ``ForwardBatch.init_new`` hook and the hole-aware attention backends."""
