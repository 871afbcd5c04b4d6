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
