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
