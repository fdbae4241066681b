"""Configurations the ``holes`` cache cannot serve exactly: refused at start, or served on SGLang's
stock path with the reason shown, never silently wrong (issue 13 item 4), and the GPU default
attention backend that runs hole batches (item 2). SGLang objects are stood in for where the
real ones need a GPU or a model of that kind; the functions under test are the ones the
engine calls."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from sglang_holes.patches.launch import server_args as launch
from sglang_holes.patches.launch.capabilities import check_runner, decide, quantized_kv
from sglang_holes.patches.scheduler.cache_factory import _neox_style


@pytest.mark.parametrize("settings, flag", [
    ({"speculative_algorithm": "NGRAM"}, "--speculative-algorithm NGRAM"),
    ({"speculative_algorithm": "STANDALONE"}, "--speculative-algorithm STANDALONE"),
    ({"speculative_algorithm": "EAGLE"}, "--speculative-algorithm EAGLE"),
    ({"cuda_graph_backend_prefill": "full"}, "--cuda-graph-backend-prefill full"),
    ({"enable_mis": True}, "--enable-mis"),
    ({"enable_mixed_chunk": True}, "--enable-mixed-chunk"),
    ({"disaggregation_mode": "prefill"}, "--disaggregation-mode prefill"),
    ({"disaggregation_mode": "decode"}, "--disaggregation-mode decode"),
    ({"pp_size": 2}, "--pp-size 2"),
    ({"enable_dp_attention": True}, "--enable-dp-attention"),
    ({"enable_two_batch_overlap": True}, "--enable-two-batch-overlap"),
    ({"enable_single_batch_overlap": True}, "--enable-single-batch-overlap"),
])
def test_refused_at_start(settings, flag):
    why = launch.refusal(settings)
    assert why is not None and flag in why, why
    assert launch.refusal({**settings, "radix_cache_backend": "radix"}) is None  # stock SGLang: not ours


def test_defaults_of_the_newly_refused_settings_pass():
    assert launch.refusal({"disaggregation_mode": "null", "pp_size": 1, "enable_dp_attention": False,
                           "enable_two_batch_overlap": False, "enable_single_batch_overlap": False}) is None


def test_prefill_cuda_graphs_through_the_config_are_refused():
    for config in ('{"prefill": {"backend": "full"}}', {"prefill": {"backend": "breakable"}},
                   SimpleNamespace(prefill=SimpleNamespace(backend="full"))):
        assert "prefill CUDA graphs" in launch.refusal({"cuda_graph_config": config})
    for config in ('{"prefill": {"backend": "disabled"}, "decode": {"backend": "full"}}', None, "not json",
                   SimpleNamespace(prefill=SimpleNamespace(backend="disabled"))):
        assert launch.refusal({"cuda_graph_config": config}) is None  # decode graphs are fine
    assert launch.refusal({"speculative_algorithm": None, "cuda_graph_backend_prefill": "disabled"}) is None


def test_engine_refuses_before_starting(monkeypatch):
    import sglang_holes

    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    with pytest.raises(ValueError, match="speculative decoding"):
        sglang_holes.Engine(speculative_algorithm="NGRAM", model_path="unused-model")


def _ctx(backend: str = "flashinfer", **model: object) -> SimpleNamespace:
    runner = SimpleNamespace(sliding_window_size=model.pop("runner_window", None))
    return SimpleNamespace(server_args=SimpleNamespace(attention_backend=backend, prefill_attention_backend=None,
                                                       kv_cache_dtype="auto", radix_cache_backend="holes"),
                           model_config=SimpleNamespace(**model), tp_worker=SimpleNamespace(model_runner=runner))


def why_no_hole_batches(ctx: SimpleNamespace, hf: SimpleNamespace) -> str | None:
    """The server's one capabilities decision, as the cache factory takes it (the runner's window included)."""
    ctx.model_config.hf_text_config = SimpleNamespace(**vars(hf), to_dict=lambda: {"num_hidden_layers": 2})
    caps = decide(ctx.server_args, ctx.model_config)
    check_runner(caps, ctx.tp_worker.model_runner)
    return caps.no_hole_batches


def test_models_whose_hole_batches_would_be_wrong_take_the_stock_path():
    hf = SimpleNamespace(sliding_window=None)
    assert why_no_hole_batches(_ctx(), hf) is None
    assert why_no_hole_batches(_ctx("torch_native"), hf) is None
    assert "mrope" in why_no_hole_batches(_ctx(model_is_mrope=True), hf)  # Qwen2/2.5/3-VL
    mla = SimpleNamespace(name="MLA")
    assert "MLA" in why_no_hole_batches(_ctx(attention_arch=mla), hf)
    assert "MLA" in why_no_hole_batches(_ctx("torch_native", attention_arch=mla), hf)
    # a window the runner has although the HF config does not say so: refused at start (entry could not
    # know it, and would accept hints the cache would serve without reuse)
    with pytest.raises(ValueError, match="sliding-window"):
        why_no_hole_batches(_ctx(runner_window=4096), hf)
    assert "cannot run hole batches" in why_no_hole_batches(_ctx("trtllm_mha"), hf)
    assert "cannot run hole batches" in why_no_hole_batches(_ctx("fa4"), hf)


def test_fa3_runs_hole_batches_except_where_its_extend_is_not_one_call():
    hf = SimpleNamespace(sliding_window=4096)
    assert why_no_hole_batches(_ctx("fa3", runner_window=4096), hf) is None  # FA3 windows are exact per run
    assert "local (chunked) attention" in why_no_hole_batches(_ctx("fa3", is_local_attention_model=True), hf)
    assert "encoder-decoder" in why_no_hole_batches(_ctx("fa3", is_encoder_decoder=True), hf)
    fp8 = _ctx("fa3")
    fp8.server_args.kv_cache_dtype = "fp8_e4m3"
    assert "quantized KV cache" in why_no_hole_batches(fp8, hf)
    cp = _ctx("fa3")
    cp.server_args.attn_cp_size = 2
    assert "context parallelism" in why_no_hole_batches(cp, hf)


def test_hole_requests_asking_for_hidden_states_take_the_stock_path():
    from sglang_holes.patches.scheduler.request_holes import stock_path_reason

    req = SimpleNamespace(multimodal_inputs=None, input_embeds=None, return_logprob=False, logprob_start_len=-1,
                          origin_input_ids=[1, 2, 3], return_hidden_states=True)
    assert stock_path_reason(req) == "hidden states"
    req.return_hidden_states = False
    assert stock_path_reason(req) is None


def test_chunk_reuse_needs_an_unquantized_kv_pool():
    for dtype in ("auto", "bfloat16", "float16", None):
        assert quantized_kv(SimpleNamespace(kv_cache_dtype=dtype)) is None
    for dtype in ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1"):
        assert dtype in quantized_kv(SimpleNamespace(kv_cache_dtype=dtype))


def test_chunk_hints_are_refused_where_chunk_reuse_cannot_run():
    from sglang_holes.chunks.hints import chunk_envelope
    from sglang_holes.patches.serving.entry import after_validate

    hf = SimpleNamespace(to_dict=lambda: {"rope_theta": 10000.0, "hidden_size": 64, "num_attention_heads": 4})
    obj = SimpleNamespace(kv_hints=chunk_envelope([(0, 4)], "none"))

    def manager(kv: str = "auto", **model: object) -> SimpleNamespace:
        return SimpleNamespace(server_args=SimpleNamespace(radix_cache_backend="holes", kv_cache_dtype=kv,
                                                           attention_backend="torch_native"),
                               model_config=SimpleNamespace(hf_text_config=hf, hf_config=hf, vocab_size=100,
                                                            **model))

    assert after_validate("ok", manager(), obj, [1, 2, 3, 4, 5]) == "ok"
    with pytest.raises(ValueError, match="quantized KV cache"):
        after_validate("ok", manager("fp8_e4m3"), obj, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match=r"3-D RoPE \(mrope\)"):
        after_validate("ok", manager(model_is_mrope=True), obj, [1, 2, 3, 4, 5])
    paged = manager()
    paged.server_args.page_size = 16
    with pytest.raises(ValueError, match="needs --page-size 1"):
        after_validate("ok", paged, obj, [1, 2, 3, 4, 5])
    trtllm = manager()
    trtllm.server_args.attention_backend = "trtllm_mha"
    with pytest.raises(ValueError, match=r"attention backend \['trtllm_mha'\] cannot run hole batches"):
        after_validate("ok", trtllm, obj, [1, 2, 3, 4, 5])



ENTRY_CASES = {  # server settings / model facts that keep hole batches (and so document reuse) off
    "no attention backend": ({"attention_backend": None}, {}, "default cannot run hole batches"),
    "trtllm_mha": ({"attention_backend": "trtllm_mha"}, {}, "cannot run hole batches"),
    "FlashInfer, sliding window": ({"attention_backend": "flashinfer"}, {"sliding_window_size": 4096},
                                   "sliding-window"),
    "FA3, local attention": ({"attention_backend": "fa3"}, {"is_local_attention_model": True}, "local"),
    "context parallelism": ({"attention_backend": "fa3", "attn_cp_size": 2}, {}, "context parallelism"),
    "FA3, fp8 KV": ({"attention_backend": "fa3", "kv_cache_dtype": "fp8_e4m3"}, {}, "quantized KV cache"),
    "MLA": ({"attention_backend": "torch_native"}, {"attention_arch": SimpleNamespace(name="MLA")}, "MLA"),
}


@pytest.mark.parametrize("case", list(ENTRY_CASES))
def test_entry_and_cache_factory_read_one_decision(case):
    """Every configuration where the cache cannot serve document hints refuses them at entry (HTTP 400)
    with the reason the cache factory logs: one decision, read by both (issue 21 item 3)."""
    from sglang_holes.chunks.hints import chunk_envelope
    from sglang_holes.patches.serving.entry import after_validate

    settings, model, reason = ENTRY_CASES[case]
    hf = SimpleNamespace(to_dict=lambda: {"rope_theta": 10000.0, "hidden_size": 64, "num_attention_heads": 4})
    args = SimpleNamespace(**{"radix_cache_backend": "holes", "kv_cache_dtype": "auto", **settings})
    manager = SimpleNamespace(server_args=args, model_config=SimpleNamespace(hf_text_config=hf, vocab_size=100,
                                                                             **model))
    caps = decide(args, manager.model_config)  # what the cache factory builds the cache from
    assert reason in caps.no_hole_batches and caps.no_chunk_reuse == caps.no_hole_batches
    with pytest.raises(ValueError, match="cannot be served here") as refused:
        after_validate("ok", manager, SimpleNamespace(kv_hints=chunk_envelope([(0, 4)], "none")), [1, 2, 3, 4, 5])
    assert caps.no_chunk_reuse in str(refused.value)

def test_interleaved_rope_is_detected_from_the_served_model():
    """Chunk re-rotation follows the model's own rotary layout (GPT-J style pairs when it says so)."""
    class Rotary(torch.nn.Module):
        def __init__(self, neox: bool) -> None:
            super().__init__()
            self.is_neox_style = neox

    def ctx(model):
        return SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)))

    assert _neox_style(ctx(torch.nn.Sequential(torch.nn.Linear(2, 2), Rotary(False)))) is False
    assert _neox_style(ctx(torch.nn.Sequential(Rotary(True)))) is True
    assert _neox_style(ctx(None)) is True


@pytest.mark.parametrize("gpu, cuda, backend", [
    (9, (12, 4), "fa3"),  # Hopper: SGLang's own FA3, which runs hole batches
    (9, (12, 2), "flashinfer"),  # Hopper with an old CUDA: SGLang would not pick FA3 either
    (10, (12, 8), "flashinfer"),  # Blackwell: SGLang's trtllm_mha runs none
    (8, (12, 4), "flashinfer"),  # Ampere / Ada
])
def test_gpu_default_attention_backend_runs_hole_batches(monkeypatch, tmp_path, gpu, cuda, backend):
    """With CUDA and the holes cache the default backend runs hole batches on that GPU, unless the
    user chose; MLA models keep SGLang's MLA backends."""
    monkeypatch.setattr(launch, "has_cuda", lambda: True)
    monkeypatch.setattr(launch, "gpu_generation", lambda: (gpu, cuda))
    assert launch.apply_engine_defaults({})["attention_backend"] == backend
    assert launch.flag_value(launch.apply_cli_defaults([]), "--attention-backend")[1] == backend
    assert launch.apply_engine_defaults({"attention_backend": "triton"})["attention_backend"] == "triton"
    assert "attention_backend" not in launch.apply_engine_defaults({"prefill_attention_backend": "fa3"})
    assert "attention_backend" not in launch.apply_engine_defaults({"radix_cache_backend": None})
    (tmp_path / "config.json").write_text(json.dumps({"kv_lora_rank": 512}))
    assert "attention_backend" not in launch.apply_engine_defaults({"model_path": str(tmp_path)})
    assert "attention_backend" not in launch.missing_defaults(launch._given_flags(["--model-path", str(tmp_path)]))
    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    monkeypatch.setattr(launch, "prepare_cpu_environment", lambda: None)
    assert launch.apply_engine_defaults({})["attention_backend"] == "torch_native"


def test_flashinfer_subclass_keeps_sglangs_kv_format_check(monkeypatch):
    """SGLang checks that the KV cache format can be read by FlashInfer only when the backend's
    class is its own; the holes subclass runs the same check (SGLang's method) itself."""
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    from sglang_holes.patches.attention.flashinfer import HoleFlashInferAttnBackend

    quant = SimpleNamespace(name="fp4-test", describe_attention_accesses=lambda phase: [])

    def stock_init(self, runner, *args, **kwargs):  # SGLang's __init__ needs CUDA workspaces
        self.kv_cache_quant_method = quant
        self.prefill_kv_access, self.decode_kv_access = runner.access

    monkeypatch.setattr(FlashInferAttnBackend, "__init__", stock_init)

    def runner(prefill: object, decode: object, backend: str = "flashinfer") -> SimpleNamespace:
        return SimpleNamespace(access=(prefill, decode), prefill_attention_backend_str=backend,
                               decode_attention_backend_str=backend)

    HoleFlashInferAttnBackend(runner(object(), object()))  # readable: builds
    with pytest.raises(ValueError, match="does not support prefill with flashinfer"):
        HoleFlashInferAttnBackend(runner(None, object()))
    with pytest.raises(ValueError, match="does not support decode with flashinfer"):
        HoleFlashInferAttnBackend(runner(object(), None))
    HoleFlashInferAttnBackend(runner(None, None, backend="triton"))  # FlashInfer not used for either phase
