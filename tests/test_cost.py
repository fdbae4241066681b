"""The cost model behind backend="auto": its documented worked examples and trade-off."""

from __future__ import annotations

import pytest

from sglang_holes import CostModel, HolePlan, choose_path
from sglang_holes.attention.path_cost import estimate

LLAMA8B = {"num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128}


def test_many_one_token_holes_pick_custom_mask():
    n = 32768
    holes = [(p, p + 1) for p in range(n // 200, n, n // 100)][:100]
    plan = HolePlan.from_holes([n], [holes])
    spans, mask = estimate(plan, "spans", **LLAMA8B), estimate(plan, "custom_mask", **LLAMA8B)
    assert spans.bytes > 10 * mask.bytes  # the span path re-reads the prefix once per hole
    assert 5e9 < spans.bytes < 8e9  # ~6.6 GB per layer, as the docstring says
    assert choose_path(plan, **LLAMA8B) == "custom_mask"


def test_few_large_holes_pick_spans():
    n = 32768
    plan = HolePlan.from_holes([n], [[(k * 8192, k * 8192 + 2048) for k in range(4)]])
    spans, mask = estimate(plan, "spans", **LLAMA8B), estimate(plan, "custom_mask", **LLAMA8B)
    assert spans.flops < mask.flops  # exact causal work vs dense m x L
    assert choose_path(plan, **LLAMA8B) == "spans"


def test_without_fa3_the_span_path_loses_its_speed_edge():
    plan = HolePlan.from_holes([4096], [[(0, 4096)]])
    fast = estimate(plan, "spans", **LLAMA8B)
    slow = estimate(plan, "spans", **LLAMA8B, model=CostModel(fa3_available=False))
    assert slow.seconds > fast.seconds


def test_cost_model_validates_itself():
    with pytest.raises(ValueError, match="bandwidth"):
        CostModel(bandwidth=0)
    with pytest.raises(ValueError, match="per_request_s"):
        CostModel(per_request_s=-1)
    with pytest.raises(ValueError, match="no cost model"):
        estimate(HolePlan.from_holes([4], [[(0, 1)]]), "per_span", **LLAMA8B)
