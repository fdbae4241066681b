"""Every SGLang target in ``patches/launch/hooks.py`` resolves and has the shape the hooks unpack.

SGLang's ``HookRegistry`` only logs a target it cannot find, which would silently turn
sglang-holes back into stock SGLang; this test (and ``verify()`` at start-up) fails instead.
"""

from __future__ import annotations

import pytest

from sglang_holes.patches.launch import hooks
from tests.sgl_kernel_standin import fa3_backend_module


@pytest.fixture(scope="module", autouse=True)
def _fa3_importable():
    """SGLang's FA3 backend module loads CUDA kernels at import: check its entries through the stand-in."""
    with fa3_backend_module():
        yield


@pytest.mark.parametrize("spec", hooks.HOOKS, ids=lambda s: f"{s.kind}:{s.target.rsplit('.', 2)[-2]}")
def test_hook_target_and_signature(spec):
    hooks.check_hook(spec)


@pytest.mark.parametrize("entry", hooks.REGISTRY_ENTRIES, ids=lambda e: e.key)
def test_registry_entry(entry):
    hooks.check_registry(entry)


@pytest.mark.parametrize("sub", hooks.SUBCLASSED, ids=lambda s: s.cls.rsplit(".", 1)[-1])
def test_subclassed_methods(sub):
    hooks.check_subclassed(sub)


@pytest.mark.parametrize("attrs", hooks.ATTRIBUTES, ids=lambda a: a.cls.rsplit(".", 1)[-1])
def test_attributes_we_read(attrs):
    hooks.check_attributes(attrs)


@pytest.mark.parametrize("inv", hooks.INVARIANTS, ids=lambda i: i.target.rsplit(".", 1)[-1])
def test_scheduler_invariants_hole_fills_rely_on(inv):
    hooks.check_invariant(inv)


def test_a_changed_invariant_fails():
    with pytest.raises(hooks.ContractError, match="relies on"):
        hooks.check_invariant(hooks.Invariant("sglang.srt.mem_cache.common.checkpoint_kv_cache",
                                              "req.prefix_len = req.extend_end + 1", "test"))


def test_verify_passes_on_the_pinned_sglang():
    hooks.verify(cuda_only=True)


@pytest.mark.parametrize("broken, message", [
    (hooks.HookSpec("sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend_v2", "after",
                    "scheduler.extend:after_prepare_for_extend", ("self",)), "is gone"),
    (hooks.HookSpec("sglang.srt.managers.schedulerx.Scheduler.handle_rpc_request", "around",
                    "serving.rpc:around_rpc", ("self", "recv_req")), "is gone"),
    (hooks.HookSpec("sglang.srt.managers.scheduler.Scheduler.handle_rpc_request", "around",
                    "serving.rpc:around_rpc", ("self", "request")), "expects it to start with"),
    # An AROUND hook registered as AFTER would receive (result, ...) where it expects (original, ...):
    # the bind check cannot see that, but a hook taking fewer arguments than the target is caught.
    (hooks.HookSpec("sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info",
                    "before", "serving.meta_info:around_is_request_level", ("self",)), "cannot take the arguments"),
])
def test_a_moved_or_reshaped_target_fails(broken, message):
    with pytest.raises(hooks.ContractError, match=message):
        hooks.check_hook(broken)


def test_missing_registry_key_subclass_method_and_attribute_fail():
    with pytest.raises(hooks.ContractError, match="no 'holes_fast'"):
        hooks.check_registry(hooks.RegistryEntry(
            "sglang.srt.layers.attention.attention_registry.ATTENTION_BACKENDS", "holes_fast"))
    with pytest.raises(hooks.ContractError, match="no longer has"):
        hooks.check_subclassed(hooks.Subclassed("sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache",
                                                ("match_prefix_v2",)))
    with pytest.raises(hooks.ContractError, match="no longer sets"):
        hooks.check_attributes(hooks.Attributes("sglang.srt.managers.schedule_batch.Req", ("prefix_len_v2",)))


def test_every_hook_module_registers_through_the_table_only():
    """No module registers a hook of its own: the table is the complete list."""
    import pathlib

    root = pathlib.Path(hooks.__file__).parent
    others = [p.name for p in root.glob("*.py") if p.name != "hooks.py" and "HookRegistry.register" in p.read_text()]
    assert others == []


def test_hole_backends_keep_the_coarse_overlap_barrier():
    """The overlap scheduler fences chunk copies and probes (schedule stream) behind the whole forward
    only while an extend's shared reads end at UNKNOWN: neither SGLang's backends we subclass nor ours
    may declare an earlier read end (see the WAR-barrier entries of ``INVARIANTS``)."""
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from sglang_holes.patches.attention.flashinfer import HoleFlashInferAttnBackend
    from sglang_holes.patches.attention.torch_native import HoleTorchNativeAttnBackend

    for cls in (FlashInferAttnBackend, TorchNativeAttnBackend, HoleFlashInferAttnBackend, HoleTorchNativeAttnBackend):
        for name in ("shared_read_ends", "resolve_prefill_shared_read_ends"):
            assert getattr(cls, name) is getattr(AttentionBackend, name), (cls.__name__, name)
