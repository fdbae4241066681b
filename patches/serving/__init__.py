"""What clients see: entry validation, kv_hints, meta_info, metrics, internal state, RPC, HTTP, OpenAI chat."""
