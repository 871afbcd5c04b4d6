from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from kvtrap.cli import main
from kvtrap.cli.doctor import check_settings, parse_version

pytest.importorskip("sglang")


def test_doctor_proves_the_trap_here():
    from helpers.srt import import_srt

    import_srt("sglang.srt.mem_cache.swa_memory_pool")  # doctor needs SGLang's runtime (skipped on the GPU machine)
    proc = subprocess.run([sys.executable, "-m", "kvtrap", "doctor"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   allocator trap: injected SWA page" in proc.stdout
    assert "ok   hook TRTLLMHAAttnBackend.forward_decode" in proc.stdout
    assert proc.stdout.strip().endswith("all checks passed")


def test_doctor_fails_when_sglang_plugin_whitelist_excludes_kvtrap(monkeypatch):
    monkeypatch.setenv("SGLANG_PLUGINS", "someone-else")
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1
    assert "FAIL SGLANG_PLUGINS" in result.output


def test_usage_error_exit_code():
    assert CliRunner().invoke(main, ["doctor", "--bogus"]).exit_code == 2
    assert CliRunner().invoke(main, ["nonsense"]).exit_code == 2


def test_parse_version():
    assert parse_version("0.5.24.dev3+gabc") == (0, 5, 24)
    assert parse_version("0.5.13") >= (0, 5, 13) > parse_version("0.5.12.post1")


@pytest.mark.parametrize("env, message", [
    ({"KVTRAP_MODE": "loud"}, "mode must be one of raise, log; got 'loud'"),
    ({"KVTRAP_INJECT": "sglang-1"}, "unknown bug to inject 'sglang-1'"),
    ({"KVTRAP_MAX_DUMPS": "-1"}, "max_dumps must be a non-negative integer"),
    ({"KVTRAP_GUARD": "sometimes"}, "guard must be one of auto, on, off"),
])
def test_settings_check_fails_on_values_the_plugin_would_refuse(env, message):
    checks = check_settings(env)
    assert [c.status for c in checks] == ["fail"]
    assert message in checks[0].detail and "NOT armed" in checks[0].detail


def test_settings_check_names_what_it_would_arm_with(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ok = check_settings({"KVTRAP_MODE": "log", "KVTRAP_DUMP_DIR": str(tmp_path / "new" / "dir"), "KVTRAP_OTHER": "1"})
    assert [c.status for c in ok] == ["ok", "ok", "info"]
    assert "KVTRAP_MODE=log" in ok[0].detail and "mode=log" in ok[0].detail
    assert "made on the first dump" in ok[1].detail and "KVTRAP_OTHER" in ok[2].detail
    bad = check_settings({"KVTRAP_DUMP_DIR": str(blocker / "sub")})
    assert bad[1].status == "fail" and "is not a directory" in bad[1].detail


def test_doctor_exits_1_on_a_bad_setting(monkeypatch):
    monkeypatch.setenv("KVTRAP_FIX", "always")
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1
    assert "FAIL KVTRAP settings: fix must be one of auto, off; got 'always'" in result.output


# On a CUDA machine SGLang's paged allocators launch Triton kernels (supports_triton is True there), and
# the doctor's CPU pool then failed with "Pointer argument (at 0) cannot be accessed from Triton (cpu
# tensor?)". Here the platform is made to say what a CUDA machine's says, and Triton is left compiled (no
# interpreter), so the same failure is real on a CPU machine unless the doctor picks SGLang's torch path.
_AS_ON_A_GPU_MACHINE = """
import sys
import msgspec
from sglang.srt.platforms import current_platform
caps = msgspec.structs.replace(current_platform.capabilities, supports_triton=True)
try:
    current_platform.capabilities = caps
except AttributeError:
    object.__setattr__(current_platform, "capabilities", caps)
assert current_platform.capabilities.supports_triton
from kvtrap.cli import main
sys.argv = ["kvtrap", "doctor"] + sys.argv[1:]
main()
"""


def _doctor_as_on_a_gpu_machine(*args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", _AS_ON_A_GPU_MACHINE, *args], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def test_doctor_allocator_proof_takes_the_cpu_path_where_sglang_would_launch_triton():
    from helpers.srt import import_srt

    import_srt("sglang.srt.mem_cache.swa_memory_pool")
    proc = _doctor_as_on_a_gpu_machine()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   allocator trap: injected SWA page" in proc.stdout
    assert "CPU pool: SGLang's torch allocation path" in proc.stdout


def test_cpu_path_is_needed_where_sglang_would_launch_triton():
    """The choice above matters: without it the same allocation fails on this machine too."""
    from helpers.srt import import_srt

    import_srt("sglang.srt.mem_cache.swa_memory_pool")
    code = _AS_ON_A_GPU_MACHINE.replace(
        "from kvtrap.cli import main",
        "import kvtrap.cli.doctor as d; d.use_cpu_allocator_path = lambda a: False\nfrom kvtrap.cli import main",
    )
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # A Triton launch fails: on a GPU machine on the CPU pointers, on a CPU machine for want of a driver.
    assert "FAIL allocator trap" in proc.stdout, proc.stdout
    assert "cannot be accessed from Triton" in proc.stdout or "0 active drivers" in proc.stdout, proc.stdout



def test_doctor_names_sglangs_default_backend_and_whether_kvtrap_covers_it(monkeypatch):
    from helpers.srt import import_srt

    import_srt("sglang.srt.configs.model_config")
    import kvtrap.capture.hooks as hooks
    from kvtrap.cli.doctor import check_default_backend

    check = check_default_backend()
    assert check.status == "info" and check.detail.startswith("MHA: ")
    picked = check.detail.split()[1]  # SGLang's own answer on this machine (triton on a CPU-only one)
    assert "covered: trtllm_mha, fa3, triton, flashinfer" in check.detail  # each adapter's ATTENTION_BACKEND, as is
    covered = picked in ("trtllm_mha", "fa3", "triton", "flashinfer")
    assert f"MHA: {picked} ({'kvtrap checks its KV index tables' if covered else 'NOT covered'}" in check.detail
    monkeypatch.setattr(hooks, "covered_attention_backends", lambda: ("trtllm_mha",))
    if picked != "trtllm_mha":
        assert f"MHA: {picked} (NOT covered by the attention traps)" in check_default_backend().detail
    monkeypatch.setattr(hooks, "covered_attention_backends", lambda: ("trtllm_mha", picked))
    assert f"MHA: {picked} (kvtrap checks its KV index tables)" in check_default_backend().detail


def test_doctor_lists_fa3_as_covered_and_its_hooks_without_importing_them_on_cpu():
    # fa3's module needs sgl_kernel's CUDA op library: on a CPU-only machine doctor reads the method from
    # SGLang's source instead (a rename still fails), and says why it does not import
    import torch
    from helpers.srt import import_srt

    import_srt("sglang.srt.configs.model_config")
    from kvtrap.capture.hooks import covered_attention_backends
    from kvtrap.cli.doctor import _defined_in_source, check_targets

    assert covered_attention_backends() == ("trtllm_mha", "fa3", "triton", "flashinfer")
    module = "sglang.srt.layers.attention.flashattention_backend"
    assert _defined_in_source(module, "FlashAttentionBackend", "forward_decode")
    assert not _defined_in_source(module, "FlashAttentionBackend", "forward_decode_renamed")
    checks = {c.name: c for c in check_targets()}
    fa3 = checks["hook FlashAttentionBackend.forward_extend"]
    if torch.cuda.is_available():
        assert fa3.status == "ok"
    elif fa3.status != "ok":  # ok where another test put the op-library stand-in in place first
        assert fa3.status == "info" and "sgl_kernel's CUDA op library" in fa3.detail
