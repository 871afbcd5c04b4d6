"""armed() installs and restores the real SGLang methods; the plugin arms lazily in SGLang processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import kvtrap
from kvtrap.capture.patching import ORIGINAL_ATTR

pytest.importorskip("sglang")
from helpers.srt import import_srt  # noqa: E402

TRTLLMHAAttnBackend = import_srt("sglang.srt.layers.attention.trtllm_mha_backend").TRTLLMHAAttnBackend
SWATokenToKVPoolAllocator = import_srt("sglang.srt.mem_cache.allocator.swa").SWATokenToKVPoolAllocator

METHODS = [
    (SWATokenToKVPoolAllocator, "alloc_extend"),
    (SWATokenToKVPoolAllocator, "alloc_decode"),
    (TRTLLMHAAttnBackend, "forward_decode"),
    (TRTLLMHAAttnBackend, "forward_extend"),
]


def snapshot():
    return {(cls.__name__, name): cls.__dict__[name] for cls, name in METHODS}


def test_armed_patches_and_restores_originals(tmp_path):
    before = snapshot()
    with kvtrap.armed(dump_dir=str(tmp_path)):
        during = snapshot()
        for key, fn in during.items():
            assert fn is not before[key] and getattr(fn, ORIGINAL_ATTR) is before[key]
    assert snapshot() == before


def test_armed_restores_on_exception_and_nesting_is_safe(tmp_path):
    before = snapshot()
    with pytest.raises(ZeroDivisionError):
        with kvtrap.armed(dump_dir=str(tmp_path)):
            raise ZeroDivisionError("inside the armed block")
    assert snapshot() == before
    from kvtrap.capture.session import current

    with kvtrap.armed(dump_dir=str(tmp_path), mode="raise") as outer:
        patched = snapshot()
        with kvtrap.armed(dump_dir=str(tmp_path), mode="log") as inner:
            assert current() is inner and snapshot() == patched
        assert current() is outer and snapshot() == patched
    assert current() is None and snapshot() == before


def test_bad_settings_are_clear_errors():
    with pytest.raises(kvtrap.ConfigError, match="mode must be one of raise, log"):
        with kvtrap.armed(mode="explode"):
            pass


# Whether kvtrap's register() initialises CUDA: importing SGLang may do so itself (on a CUDA machine its
# platform detection asks for the device name), so the probe counts what happens inside register() only:
# calls into torch.cuda._lazy_init (torch.cuda's API and the first CUDA tensor made from C++ go through it)
# and a context that appeared during the call. SGLang's loader resolves the entry point by name, so it
# runs the counting wrapper set on kvtrap.plugin.
PROBE = textwrap.dedent(
    """
    import sys, json
    import torch
    from sglang.srt.plugins import load_plugins
    import kvtrap.plugin
    inits = []
    ctx = []
    register, lazy_init = kvtrap.plugin.register, torch.cuda._lazy_init
    def counting_register():
        before = torch.cuda.is_initialized()
        torch.cuda._lazy_init = lambda: inits.append(1) or lazy_init()
        try:
            register()
        finally:
            torch.cuda._lazy_init = lazy_init
            ctx.append(torch.cuda.is_initialized() and not before)
    kvtrap.plugin.register = counting_register
    load_plugins()
    lazy = "sglang.srt.layers.attention.trtllm_mha_backend" not in sys.modules
    cuda_ctx = ctx != [False] or bool(inits)  # False only when register ran once and touched no CUDA
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator as A
    from sglang.srt.layers.attention.trtllm_mha_backend import TRTLLMHAAttnBackend as B
    print(json.dumps({
        "lazy": lazy, "cuda_ctx": cuda_ctx,
        "alloc": hasattr(A.__dict__["alloc_extend"], "__kvtrap_original__"),
        "backend": hasattr(B.__dict__["forward_decode"], "__kvtrap_original__"),
    }))
    """
)


def run_probe(env_extra: dict[str, str], tmp_path) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVTRAP_", "SGLANG_TRTLLM"))}
    env.update(env_extra)
    env["KVTRAP_DUMP_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_plugin_arms_every_hook_lazily_when_variable_set(tmp_path):
    out, err = run_probe({"SGLANG_TRTLLM_MHA_DEBUG": "1"}, tmp_path)
    assert out == {"lazy": True, "cuda_ctx": False, "alloc": True, "backend": True}
    assert "[kvtrap" in err and "armed in pid" in err


@pytest.mark.parametrize("value", [None, "0"])
def test_plugin_patches_nothing_when_unset_or_zero(tmp_path, value):
    env = {} if value is None else {"SGLANG_TRTLLM_MHA_DEBUG": value}
    out, err = run_probe(env, tmp_path)
    assert out["alloc"] is False and out["backend"] is False
    assert "armed in pid" not in err


def test_plugin_reports_bad_setting_and_stays_disarmed(tmp_path):
    out, err = run_probe({"SGLANG_TRTLLM_MHA_DEBUG": "1", "KVTRAP_MODE": "loud"}, tmp_path)
    assert out["alloc"] is False
    assert "kvtrap is NOT armed: mode must be one of raise, log; got 'loud'" in err


@pytest.mark.parametrize("value", [None, "0"])
def test_plugin_injects_without_traps_when_only_kvtrap_inject_is_set(tmp_path, value):
    """KVTRAP_INJECT alone re-introduces the bug (to see what it does unguarded) and arms no trap."""
    env = {"KVTRAP_INJECT": "sglang-26957"}
    if value is not None:
        env["SGLANG_TRTLLM_MHA_DEBUG"] = value
    probe = PROBE.replace(
        '"backend": hasattr(B.__dict__["forward_decode"], "__kvtrap_original__"),',
        '"backend": hasattr(B.__dict__["forward_decode"], "__kvtrap_original__"),\n'
        '        "resolver": hasattr(B.__dict__["_resolve_swa_kv_pool"], "__kvtrap_original__"),',
    )
    e = {k: v for k, v in os.environ.items() if not k.startswith(("KVTRAP_", "SGLANG_TRTLLM"))}
    e.update(env, KVTRAP_DUMP_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", probe], env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"lazy": True, "cuda_ctx": False, "alloc": False, "backend": False, "resolver": True}
    assert "NOT armed" in proc.stderr and "re-introduces sglang-26957 on purpose" in proc.stderr


def test_plugin_refuses_unknown_injection_without_raising(monkeypatch, capfd):
    import logging

    from kvtrap import plugin
    from kvtrap.capture.session import current

    log = logging.getLogger("kvtrap")  # register() gives it a stderr handler, as in an SGLang process
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "propagate", True)
    monkeypatch.setattr(log, "level", log.level)
    monkeypatch.setenv("SGLANG_TRTLLM_MHA_DEBUG", "1")
    monkeypatch.setenv("KVTRAP_INJECT", "sglang-1")
    plugin.register()  # SGLang swallows what a plugin raises: a bad setting must be said, not raised
    assert current() is None
    err = capfd.readouterr().err
    assert "kvtrap is NOT armed: unknown bug to inject 'sglang-1'; known: " in err and "sglang-26957" in err


def test_gemma4_kernels_stay_off_on_an_untested_sglang(monkeypatch, capfd):
    import logging

    from kvtrap.kernels import sglang_gemma4

    from kvtrap import plugin

    log = logging.getLogger("kvtrap")
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "propagate", True)
    monkeypatch.setattr(sglang_gemma4, "TESTED_SGLANG", ("9.9.9",))
    monkeypatch.setenv("KVTRAP_GEMMA4_KERNELS", "1")
    monkeypatch.delenv("SGLANG_TRTLLM_MHA_DEBUG", raising=False)
    monkeypatch.delenv("KVTRAP_INJECT", raising=False)
    plugin.register()
    assert not sglang_gemma4.enabled()
    assert "Gemma 4 kernels are NOT enabled: sglang 0.5.23 is not a tested release (9.9.9)" in capfd.readouterr().err
