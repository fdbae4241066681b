"""The quality benchmark's oracle: recompute the reused tokens whose KV deviates most from full
recompute over ALL layers (``bench_quality.py``'s ``oracle`` configs; a diagnostic, it reads KV a
server never has)."""

from __future__ import annotations

import json
from pathlib import Path


class Oracle:
    """Per prompt position, how far the placed chunk KV is from full-recompute KV over ALL layers."""

    def __init__(self, model_dir: str) -> None:
        import torch
        from safetensors.torch import load_file

        from sglang_holes.chunks.llama_stack import LlamaStack

        config = json.loads((Path(model_dir) / "config.json").read_text())
        state = load_file(str(Path(model_dir) / "model.safetensors"))
        self.stack = LlamaStack.from_state(state, config, int(config["num_hidden_layers"]))
        self.torch = torch

    def deviation(self, ids1: list[int], chunks1: list[tuple], order1: list[int], ids: list[int],
                  chunks: list[tuple], order: list[int]):
        """``[n]``: sum over layers of ||K_full - K_placed||² + ||V_full - V_placed||² (0 outside chunks).

        The store holds each passage's KV as computed in ``ids1`` (the first request computed it
        all); the request places it at its offset in ``ids``, K re-rotated.
        """
        from sglang_holes.chunks.rope import rerotate

        torch = self.torch
        with torch.no_grad():
            first = self.stack.run(torch.tensor(ids1))
            full = self.stack.run(torch.tensor(ids))
        dev = torch.zeros(len(ids))
        for passage, (s, e) in zip(order, chunks, strict=True):
            s1, e1 = chunks1[order1.index(passage)]
            for k1, v1, k, v in zip(first.k, first.v, full.k, full.v, strict=True):
                placed = rerotate(k1[s1:e1], s - s1, self.stack.rope)
                dev[s:e] += (k[s:e] - placed).pow(2).flatten(1).sum(1) + (v[s:e] - v1[s1:e1]).pow(2).flatten(1).sum(1)
        return dev

    @staticmethod
    def recompute_spans(dev, chunks: list[tuple], ratio: float, reused: list[bool], sink) -> list[tuple]:
        """The ``ratio`` fraction of reusable tokens with the largest ``dev``, as spans: the count the
        scored policies take for the same hints, ``reused`` chunks and attention ``sink`` (``Sink``)."""
        from sglang_holes.attention.plan import spans_from_positions
        from sglang_holes.chunks.hints import ChunkHints, unscored_mask

        keep = ~unscored_mask(len(dev), ChunkHints(tuple(chunks), "none"), reused, sink=sink)
        cand = keep.nonzero().flatten()
        take = round(ratio * cand.numel())
        chosen = sorted(cand[dev[cand].topk(take).indices].tolist()) if take else []
        return spans_from_positions(chosen)
