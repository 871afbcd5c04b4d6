from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from kvtrap.cli import main
from kvtrap.cli.doctor import parse_version

pytest.importorskip("sglang")


def test_doctor_proves_the_trap_here():
    from srt import import_srt

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
    from srt import import_srt

    import_srt("sglang.srt.mem_cache.swa_memory_pool")
    proc = _doctor_as_on_a_gpu_machine()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   allocator trap: injected SWA page" in proc.stdout
    assert "CPU pool: SGLang's torch allocation path" in proc.stdout


def test_cpu_path_is_needed_where_sglang_would_launch_triton():
    """The choice above matters: without it the same allocation fails on this machine too."""
    from srt import import_srt

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
