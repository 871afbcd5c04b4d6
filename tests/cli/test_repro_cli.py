"""`kvtrap repro list`, `--dry-run`, environment checks (exit 2) and the component-scenario hook."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from kvtrap.repro import runner, scenarios
from kvtrap.repro.scenarios import ComponentContext, ComponentResult, Needs, Scenario

from kvtrap.cli.repro_cmd import repro

REQUIRED = ("e4b-summarize", "26b-summarize", "31b-summarize", "e4b-chat", "26b-chat")


def _cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(repro, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def test_registry_has_the_seed_scenarios() -> None:
    for name in REQUIRED:
        s = scenarios.get(name)
        assert s.kind == "server"
        args = " ".join(s.server_args)
        for flag in ("--speculative-algorithm NEXTN", "--speculative-num-steps 3", "--speculative-eagle-topk 1",
                     "--speculative-num-draft-tokens 4", "--attention-backend trtllm_mha"):  # fmt: skip
            assert flag in args, (name, flag)
        assert s.draft_model == s.model + "-assistant"
        assert s.workload is not None and s.workload.num_prompts == 80 and s.workload.max_concurrency == 64
        assert s.needs.min_gpu_mem_gib > 0
    assert scenarios.get("e4b-summarize").workload.input_len == 8000  # type: ignore[union-attr]
    assert scenarios.get("e4b-chat").workload.input_len == 1000  # type: ignore[union-attr]
    with pytest.raises(KeyError, match="known:"):
        scenarios.get("nope")


def test_list() -> None:
    code, out = _cli("list")
    assert code == 0
    for name in REQUIRED:
        assert name in out
    assert "google/gemma-4-31B-it-assistant" in out and "GiB" in out
    from kvtrap.capture.bugs import BUGS

    for name, entry in BUGS.items():  # the bug zoo, with links
        assert name in out and entry.links[0] in out
    assert "https://github.com/sgl-project/sglang/pull/27779" in out
    code, out = _cli("list", "--json")
    assert code == 0
    data = orjson.loads(out)
    assert {d["name"] for d in data} >= set(REQUIRED)


def test_dry_run_prints_exact_commands_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [])
    code, out = _cli("e4b-summarize", "--dry-run", "--eager", "--inject", "sglang-26957", "--no-fix",
                     "--out", str(tmp_path / "r"), "--port", "31234", "--mem-fraction-static", "0.8")  # fmt: skip
    assert code == 0, out
    assert "export SGLANG_TRTLLM_MHA_DEBUG=1" in out
    assert f"export KVTRAP_DUMP_DIR={tmp_path / 'r' / 'dumps'}" in out
    assert "export KVTRAP_INJECT=sglang-26957" in out and "export KVTRAP_FIX=off" in out
    server = next(line for line in out.splitlines() if "sglang.launch_server" in line)
    assert "--model-path google/gemma-4-E4B-it --speculative-draft-model-path google/gemma-4-E4B-it-assistant" in server
    # eager: both graph backends off, each flag once (e4b scenarios already turn prefill graphs off)
    assert "--cuda-graph-backend-decode disabled" in server and "--cuda-graph-backend-prefill disabled" in server
    assert server.count("--cuda-graph-backend-prefill") == 1 and server.count("--cuda-graph-backend-decode") == 1
    assert server.rstrip(" &").endswith("--host 127.0.0.1 --port 31234 --mem-fraction-static 0.8")
    bench = next(line for line in out.splitlines() if "sglang.bench_serving" in line)
    for part in ("--dataset-name random-ids", "--random-input-len 8000", "--random-output-len 1000",
                 "--random-range-ratio 1.0", "--num-prompts 80", "--max-concurrency 64", "--port 31234"):  # fmt: skip
        assert part in bench
    assert "a real run would stop here (exit 2): no CUDA GPU" in out
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_graphs_is_the_default_and_fix_unset(tmp_path: Path) -> None:
    code, out = _cli("26b-chat", "--dry-run", "--out", str(tmp_path))
    assert code == 0
    assert "cuda-graph-backend" not in out and "KVTRAP_FIX" not in out and "KVTRAP_INJECT" not in out
    code, out = _cli("26b-chat", "--dry-run", "--fix", "--graphs", "--model-path", "/models/g26", "--out", str(tmp_path))
    assert "export KVTRAP_FIX=auto" in out and "--model-path /models/g26" in out


def test_unknown_scenario_is_a_usage_error() -> None:
    code, out = _cli("no-such-scenario")
    assert code == 2


def test_environment_problems_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [])
    code, out = _cli("e4b-chat", "--out", str(tmp_path / "a"), "-q")
    assert code == 2 and "no CUDA GPU is visible" in out

    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [{"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.6}])
    monkeypatch.setattr(runner, "sglang_installed", lambda: False)
    code, out = _cli("e4b-chat", "--out", str(tmp_path / "b"), "-q")
    assert code == 2 and "SGLang is not importable" in out

    monkeypatch.setattr(runner, "sglang_installed", lambda: True)
    code, out = _cli("e4b-chat", "--out", str(tmp_path / "c"), "-q", "--model-path", str(tmp_path / "missing"))
    assert code == 2 and "no such file or directory" in out
    assert not (tmp_path / "c").exists()  # nothing started, nothing written


def test_memory_warning_is_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [{"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.6}])
    monkeypatch.setattr(runner, "sglang_installed", lambda: True)
    warns = runner.check_environment(runner.RunOptions(scenario=scenarios.get("31b-summarize")))
    assert warns and "96 GiB" in warns[0]
    assert runner.check_environment(runner.RunOptions(scenario=scenarios.get("e4b-summarize"))) == []


def test_cuda_visible_devices_empty_hides_gpus() -> None:
    assert runner.gpu_inventory({"CUDA_VISIBLE_DEVICES": ""}) == []


# ------------------------------------------------------------------------------------ component hook
def _trap_component(ctx: ComponentContext) -> ComponentResult:
    from kvtrap.config import Config
    from kvtrap.record.context import Context
    from kvtrap.record.dumpfile import reset_dump_count, write_dump
    from kvtrap.record.violation import Violation

    ctx.log(f"inject={','.join(ctx.inject)} fix={ctx.fix} dump_dir={ctx.env['KVTRAP_DUMP_DIR']}")
    reset_dump_count()
    v = Violation(kind="index_space_mismatch", summary="SWA layer handed the full table", layer_id=3, layer_type="swa")
    write_dump(v, Context(hook="test"), {}, Config.from_env(ctx.env))
    return ComponentResult(metrics={"steps": 1})


def _crash_component(ctx: ComponentContext) -> ComponentResult:
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.fixture
def components() -> Iterator[None]:
    added = [
        scenarios.register(Scenario(name="t-trap", description="test", kind="component",
                                    needs=Needs(gpu="none", requires_gpu=False), component=_trap_component)),
        scenarios.register(Scenario(name="t-crash", description="test", kind="component",
                                    needs=Needs(gpu="none", requires_gpu=False), component=_crash_component)),
    ]  # fmt: skip
    try:
        yield
    finally:
        for s in added:
            scenarios.REGISTRY.pop(s.name, None)


def test_component_scenario_trapped(tmp_path: Path, components: None) -> None:
    code, out = _cli("t-trap", "--out", str(tmp_path), "--inject", "sglang-26957", "--no-fix", "-q")
    assert code == 1, out
    assert "TRAPPED" in out and "kvtrap dump explain" in out
    data = orjson.loads((tmp_path / "report.json").read_bytes())
    assert data["outcome"] == "TRAPPED" and data["dumps"][0]["kind"] == "index_space_mismatch"
    assert data["metrics"]["steps"] == 1
    assert "inject=sglang-26957 fix=False" in (tmp_path / "component.log").read_text()


def test_component_scenario_crashed(tmp_path: Path, components: None) -> None:
    code, out = _cli("t-crash", "--out", str(tmp_path), "-q")
    assert code == 1, out
    assert "CRASHED" in out
    assert (tmp_path / "report.md").read_text().startswith("# kvtrap repro: t-crash -> **CRASHED**")


def test_component_needs_a_callable() -> None:
    with pytest.raises(ValueError, match="component callable"):
        Scenario(name="x", description="", kind="component", needs=Needs(gpu="none"))


# ------------------------------------------------------------------------------- --attention-backend
def test_attention_backend_replaces_the_scenarios_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [{"name": "H200", "memory_gib": 141}])
    code, out = _cli("e4b-chat", "--dry-run", "--attention-backend", "triton", "--dummy-weights", "--out",
                     str(tmp_path / "run"))
    assert code == 0, out
    launch = next(line for line in out.splitlines() if "sglang.launch_server" in line).split()
    assert launch.count("--attention-backend") == 1 and launch[launch.index("--attention-backend") + 1] == "triton"
    assert "trtllm_mha" not in launch
    # the rest of the scenario's flags are unchanged
    i = launch.index("--speculative-algorithm")
    assert launch[i:i + 8] == ["--speculative-algorithm", "NEXTN", "--speculative-num-steps", "3",
                               "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4"]
    assert "# note: --attention-backend triton: Gemma 4's default off sm100" in out
    assert out.count("Gemma 4's default off sm100") == 1  # said once, not again as an environment warning


# SGLang's own words (sglang/srt/arg_groups/model_hook.py), as the H200 server runs printed them
SGLANG_GEMMA4_ASSERT = "Gemma4 only supports trtllm_mha, triton, fa4, ascend, intel_xpu, intel_amx, or aiter attention backend"


@pytest.mark.parametrize("backend", ["fa3", "flashinfer"])
@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("weights", [("--dummy-weights",), ()])
def test_gemma4_on_fa3_or_flashinfer_is_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         backend: str, dry_run: bool, weights: tuple[str, ...]) -> None:  # fmt: skip
    def must_not_run(*args: object, **kw: object) -> None:
        raise AssertionError("the run was started")

    monkeypatch.setattr(runner, "run", must_not_run)
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [{"name": "H200", "memory_gib": 141}])
    res = CliRunner().invoke(repro, ["e4b-chat", "--attention-backend", backend, "--out", str(tmp_path / "run"),
                                     *weights, *(["--dry-run"] if dry_run else [])], catch_exceptions=False)  # fmt: skip
    assert res.exit_code == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("kvtrap repro: e4b-chat serves ")
    assert f"SGLang 0.5.23 refuses Gemma 4 on --attention-backend {backend} at start-up" in line
    assert SGLANG_GEMMA4_ASSERT in line and "model_hook.py" in line
    assert line.endswith("use --attention-backend trtllm_mha or triton (fa4 on sm100)")
    assert list(tmp_path.iterdir()) == []  # no run dir, no model dirs


def test_gemma4_refusal_covers_split_backends_passed_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [{"name": "H200", "memory_gib": 141}])
    res = CliRunner().invoke(repro, ["26b-chat", "--dry-run", "--decode-attention-backend", "flashinfer"])
    assert res.exit_code == 2 and "on --decode-attention-backend flashinfer at start-up" in res.stderr
    # SGLang resolves each phase: both split flags on accepted backends override --attention-backend fa3
    code, out = _cli("26b-chat", "--dry-run", "--attention-backend", "fa3", "--prefill-attention-backend", "triton",
                     "--decode-attention-backend", "trtllm_mha")  # fmt: skip
    assert code == 0, out


@pytest.mark.parametrize("backend", ["trtllm_mha", "triton", "fa4"])
def test_gemma4_accepted_backends_still_run(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [{"name": "H200", "memory_gib": 141}])
    code, out = _cli("e4b-chat", "--dry-run", "--dummy-weights", "--attention-backend", backend)
    assert code == 0, out


def test_fa3_with_a_non_gemma_model_path_is_left_to_sglang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [{"name": "H200", "memory_gib": 141}])
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    code, out = _cli("e4b-chat", "--dry-run", "--attention-backend", "fa3", "--model-path", str(other))
    assert code == 0, out
    assert "# note: --attention-backend fa3: SGLang 0.5.23 refuses Gemma 4 on fa3" in out
    assert "for a real fa3 server with the hybrid SWA pool use the GPT-OSS scenarios" in out
    # a local Gemma 4 checkpoint is recognised by its config, whatever its directory is called
    (other / "config.json").write_text('{"architectures": ["Gemma4ForConditionalGeneration"]}')
    code, out = _cli("e4b-chat", "--dry-run", "--attention-backend", "fa3", "--model-path", str(other))
    assert code == 2 and f"e4b-chat serves {other}, a Gemma 4 model" in out


def test_the_runner_refuses_gemma4_on_fa3_too(tmp_path: Path) -> None:
    options = runner.RunOptions(scenario=scenarios.get("e4b-chat"), out_dir=tmp_path / "run", attention_backend="fa3")
    with pytest.raises(runner.EnvironmentProblem, match="refuses Gemma 4 on --attention-backend fa3"):
        runner.check_environment(options, environ={"CUDA_VISIBLE_DEVICES": "0"})
    assert not (tmp_path / "run").exists()


def test_attention_backend_choice_is_validated() -> None:
    code, out = _cli("e4b-chat", "--dry-run", "--attention-backend", "flash")
    assert code == 2 and "'flash' is not one of" in out


def test_with_attention_backend_forms() -> None:
    assert scenarios.with_attention_backend(("--a", "1", "--attention-backend", "trtllm_mha", "--b"), "triton") == (
        "--a", "1", "--attention-backend", "triton", "--b")
    assert scenarios.with_attention_backend(("--attention-backend=trtllm_mha",), "fa3") == ("--attention-backend=fa3",)
    assert scenarios.with_attention_backend(("--tp-size", "2"), "fa3") == ("--tp-size", "2", "--attention-backend", "fa3")
    with pytest.raises(ValueError, match="not one of"):
        scenarios.with_attention_backend((), "nope")


def test_backend_notes_say_which_backends_kvtrap_covers() -> None:
    pytest.importorskip("torch")
    from kvtrap.capture.hooks import covered_attention_backends

    covered = set(covered_attention_backends()) | {"fa4"}  # fa4 is fa3's class
    for backend in scenarios.ATTENTION_BACKENDS:
        says_uncovered = "do not cover" in scenarios.BACKEND_NOTES[backend]
        assert says_uncovered == (backend not in covered), backend
