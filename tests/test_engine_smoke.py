"""Smoke tests of the real SGLang 0.5.23 engine on CPU with the embedded SmolLM2 and the plugin."""

from __future__ import annotations

import os

import psutil
import pytest

pytestmark = pytest.mark.engine

GREEDY = {"max_new_tokens": 16, "temperature": 0.0}


def _chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def test_capital_of_france(engine, tokenizer):
    out = engine.generate(prompt=_chat(tokenizer, "What is the capital of France?"), sampling_params=GREEDY)
    assert "Paris" in out["text"], out["text"]


def test_shared_prefix_is_cached(engine, tokenizer):
    doc = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
        "from 1887 to 1889. Locally nicknamed 'La dame de fer', it was constructed as the centerpiece "
        "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution. "
    ) * 3
    first = engine.generate(prompt=_chat(tokenizer, doc + "Who designed the tower?"), sampling_params=GREEDY)
    second = engine.generate(prompt=_chat(tokenizer, doc + "When was it built?"), sampling_params=GREEDY)
    shared = len(tokenizer(_chat(tokenizer, doc))["input_ids"]) - 10  # the template's tail differs
    assert first["meta_info"]["prompt_tokens"] > 200
    assert second["meta_info"]["cached_tokens"] >= shared, (second["meta_info"], shared)


def test_plugin_loaded_in_scheduler_process(engine):
    """The plugin's hook runs inside the spawned scheduler and reports that process's pid."""
    info = engine.get_server_info()
    state = info["internal_states"][0]["sglang_holes"]
    assert state["pid"] != os.getpid()
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    assert state["pid"] in children
    import torch

    if not torch.cuda.is_available():
        assert state["platform"] == "HolesCpuPlatform"


def test_holes_server_reports_that_it_runs_hole_batches(holes_engine):
    """``/get_server_info`` says whether hole batches run here (and why not, when they do not)."""
    cache = holes_engine.get_server_info()["internal_states"][0]["sglang_holes"]["cache"]
    assert cache["hole_batches"] == "on" and cache["policy"] == "cost-aware", cache


def test_entry_decided_the_same_capabilities_at_start(holes_engine, engine):
    """The tokenizer manager decided the server's capabilities when it was built (not per request), the
    same decision the scheduler's cache was built from: hole batches on, document reuse on."""
    from sglang_holes.patches.launch.capabilities import Capabilities
    from sglang_holes.patches.serving.entry import CAPABILITIES_ATTR

    caps = getattr(holes_engine.tokenizer_manager, CAPABILITIES_ATTR)
    assert isinstance(caps, Capabilities) and caps.hole_batches and caps.chunk_reuse, caps
    assert caps.prefill_backend == "torch_native" and caps.num_layers > 0
    stock = getattr(engine.tokenizer_manager, CAPABILITIES_ATTR)  # SGLang's own cache: no hints served
    assert stock.no_holes_cache is not None and not stock.chunk_reuse
