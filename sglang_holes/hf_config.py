"""Attention shape of a Hugging Face model config dict, derived in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple


class AttentionDims(NamedTuple):
    num_heads: int
    num_kv_heads: int
    head_dim: int


def attention_dims(config: Mapping[str, Any]) -> AttentionDims:
    """``num_attention_heads``, ``num_key_value_heads`` (default: = heads) and ``head_dim``
    (default: ``hidden_size / num_attention_heads``). ``KeyError`` if the config lacks them."""
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return AttentionDims(heads, kv, head_dim)
