"""Server-argument defaults of `sglang-holes serve` and `sglang_holes.Engine`."""

from __future__ import annotations

import pytest

from sglang_holes.patches.launch import server_args as launch


def test_cpu_defaults_yield_to_explicit_flags(monkeypatch):
    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    monkeypatch.setattr(launch, "prepare_cpu_environment", lambda: None)
    out = launch.apply_cli_defaults(["--dtype", "bfloat16", "--max-total-tokens=1000"])
    assert out[:3] == ["--dtype", "bfloat16", "--max-total-tokens=1000"]
    assert out.count("--dtype") == 1 and not any(a.startswith("--max-total-tokens") for a in out[3:])
    for flag in ("--device", "--attention-backend", "--sleep-on-idle", "--disable-cuda-graph"):
        assert flag in out
    kw = launch.apply_engine_defaults({"dtype": "bfloat16"})
    assert kw["dtype"] == "bfloat16" and kw["sleep_on_idle"] is True and kw["attention_backend"] == "torch_native"


@pytest.mark.parametrize("argv, added", [
    (["--radix-cache-backend", "holes"], True),
    (["--radix-cache-backend=holes"], True),
    (["--radix-cache-backend", "holes", "--cuda-graph-backend-prefill", "full"], False),
    (["--radix-cache-backend", "radix"], False),
])
def test_gpu_holes_server_disables_the_prefill_graph(monkeypatch, argv, added):
    """Hole batches are planned per batch: a captured prefill graph cannot replay them."""
    monkeypatch.setattr(launch, "has_cuda", lambda: True)
    monkeypatch.setattr(launch, "gpu_generation", lambda: (8, (12, 4)))
    out = launch.apply_cli_defaults(argv)
    assert ("--disable-prefill-cuda-graph" in out) == added
    assert "--device" not in out  # SGLang's GPU defaults stand
    kw = launch.apply_engine_defaults({"radix_cache_backend": "holes"})
    assert kw == {"radix_cache_backend": "holes", "disable_prefill_cuda_graph": True,
                  "radix_eviction_policy": "cost-aware", "attention_backend": "flashinfer"}


def test_flag_value():
    assert launch.flag_value(["--port", "80", "--host=h"], "--host") == (2, "h")
    assert launch.flag_value(["--port", "80"], "--port") == (1, "80")
    assert launch.flag_value(["--port"], "--port") is None


@pytest.mark.parametrize("argv", [["--device=cpu"], ["--device", "cpu"], []])
def test_cpu_defaults_apply_however_cpu_is_spelled(monkeypatch, argv):
    """One table drives Engine and serve: ``--device=cpu`` gets the same CPU defaults as no flag."""
    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    monkeypatch.setattr(launch, "prepare_cpu_environment", lambda: None)
    out = launch.apply_cli_defaults(argv)
    assert launch.flag_value(out, "--attention-backend") is not None and "--sleep-on-idle" in out
    assert launch.flag_value(out, "--radix-cache-backend")[1] == "holes"
    assert out.count("--device") + sum(a.startswith("--device=") for a in out) == 1


def test_engine_and_serve_get_the_same_defaults(monkeypatch):
    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    monkeypatch.setattr(launch, "prepare_cpu_environment", lambda: None)
    kw = launch.apply_engine_defaults({})
    argv = launch.apply_cli_defaults([])
    for field, value in kw.items():
        flag = "--" + field.replace("_", "-")
        assert (flag in argv) if value is True else launch.flag_value(argv, flag)[1] == str(value)
    assert launch.apply_engine_defaults({"radix_cache_backend": None})["radix_cache_backend"] is None


def test_another_device_gets_no_cpu_defaults(monkeypatch):
    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    monkeypatch.setattr(launch, "prepare_cpu_environment", lambda: pytest.fail("CPU platform selected"))
    assert launch.apply_cli_defaults(["--device", "xpu"]) == ["--device", "xpu", "--radix-cache-backend", "holes",
                                                             "--radix-eviction-policy", "cost-aware"]


def test_eviction_policy_through_sglangs_flag(monkeypatch):
    """cost-aware by default with the holes cache; SGLang's lru is stock behaviour; its other
    policies have no hole-aware version and are refused; ours need the holes cache."""
    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    monkeypatch.setattr(launch, "prepare_cpu_environment", lambda: None)
    assert launch.flag_value(launch.apply_cli_defaults([]), "--radix-eviction-policy")[1] == "cost-aware"
    out = launch.apply_cli_defaults(["--radix-eviction-policy", "lru"])
    assert out.count("--radix-eviction-policy") == 1
    assert launch.apply_engine_defaults({"radix_cache_backend": None}).get("radix_eviction_policy") is None
    assert launch.refusal({"radix_eviction_policy": "lru"}) is None
    for policy in ("lfu", "slru", "priority"):  # SGLang's own policies run with holes (leaves only)
        assert launch.refusal({"radix_eviction_policy": policy}) is None
    assert "unified radix cache" in launch.refusal({"radix_eviction_policy": "tlru"})
    assert "needs --radix-cache-backend holes" in launch.refusal({"radix_cache_backend": "radix",
                                                                  "radix_eviction_policy": "cost-aware"})


def test_cpu_defaults_start_with_a_large_chunk_size(monkeypatch):
    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    monkeypatch.setattr(launch, "prepare_cpu_environment", lambda: None)
    assert launch.apply_engine_defaults({"chunked_prefill_size": 16384})["mem_fraction_static"] == 0.8


def test_mixed_chunk_is_refused_with_the_holes_cache():
    assert "--enable-mixed-chunk" in launch.refusal({"enable_mixed_chunk": True})
    assert launch.refusal({"enable_mixed_chunk": True, "radix_cache_backend": "radix"}) is None
    assert launch.refusal({"enable_mixed_chunk": False}) is None


def test_engine_refuses_mixed_chunk_before_starting():
    import sglang_holes

    with pytest.raises(ValueError, match="--enable-mixed-chunk"):
        sglang_holes.Engine(enable_mixed_chunk=True)
