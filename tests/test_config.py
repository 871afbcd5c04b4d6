from __future__ import annotations

from pathlib import Path

import pytest

from kvtrap.config import Config, ConfigError, env_armed


def test_env_settings_and_overrides():
    env = {"KVTRAP_MODE": "LOG", "KVTRAP_DUMP_DIR": "/tmp/x", "KVTRAP_MAX_DUMPS": "3", "KVTRAP_INJECT": " sglang-26957, "}
    c = Config.from_env(env)
    assert (c.mode, c.dump_dir, c.max_dumps, c.inject) == ("log", Path("/tmp/x"), 3, ("sglang-26957",))
    assert Config.from_env(env, mode="raise").mode == "raise"
    assert Config.from_env({}).free_checks == "on"  # on by default when armed
    assert Config.from_env({"KVTRAP_FREE_CHECKS": "OFF"}).free_checks == "off"


@pytest.mark.parametrize("env, match", [
    ({"KVTRAP_MAX_DUMPS": "many"}, "KVTRAP_MAX_DUMPS must be a non-negative integer"),
    ({"KVTRAP_GUARD": "sometimes"}, "guard must be one of auto, on, off"),
    ({"KVTRAP_FIX": "yes"}, "fix must be one of auto, off"),
    ({"KVTRAP_FREE_CHECKS": "sometimes"}, "free_checks must be one of on, off"),
    ({"KVTRAP_INJECT": "sglang-26957,sglang-1"}, "unknown bug to inject 'sglang-1'; known: .*sglang-26957"),
])
def test_bad_env_is_a_clear_error(env, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_env(env)


def test_unknown_override():
    with pytest.raises(ConfigError, match="unknown kvtrap setting 'colour'"):
        Config.from_env({}, colour="red")


@pytest.mark.parametrize("value, armed", [(None, False), ("", False), ("0", False), ("1", True), ("true", True)])
def test_arm_variable(value, armed):
    env = {} if value is None else {"SGLANG_TRTLLM_MHA_DEBUG": value}
    assert env_armed(env) is armed
    with pytest.raises(ConfigError):
        env_armed({"SGLANG_TRTLLM_MHA_DEBUG": "maybe"})


def test_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().mode = "log"  # type: ignore[misc]
