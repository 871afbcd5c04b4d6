"""The weight-free GPT-OSS-like model: fa3 with the hybrid SWA pool in a real server, checked on the CPU against
SGLang 0.5.23's own config loader, server-argument resolution and model class (tests/helpers/gptoss_world.py, one
subprocess), its source (model_hook.py's backend list), and the scenario wiring (dry run, model dirs, report).

What only a GPU run shows (docs/repro.md): that the server starts and serves on fa3, armed and unarmed runs give the
same greedy outputs, and sglang-38269 traps on it."""

from __future__ import annotations

import ast
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kvtrap.repro import runner, scenarios
from kvtrap.repro.models import GptOssModel, variant, write_model_dirs
from kvtrap.repro.probe import ProbeSpec

from kvtrap.cli import main

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
WORLD = HELPERS / "gptoss_world.py"
STANDINS = HELPERS / "standins"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("sglang")
    tmp = tmp_path_factory.mktemp("gptoss")
    dirs = write_model_dirs(tmp / "models", variant("gptoss"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / "world.json"
    proc = subprocess.run([sys.executable, str(WORLD), str(dirs.target), str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "KVTRAP_TEST_PORT": str(port)}, check=False)  # fmt: skip
    if proc.returncode != 0 and "No module named 'sgl_kernel'" in proc.stderr:
        import torch

        if torch.cuda.is_available():  # the GPU machine's SGLang wheel without sgl_kernel (tests/helpers/srt.py)
            pytest.skip("sglang.srt needs sgl_kernel, which is not installed here")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"facts": json.loads(out.read_text()), "dirs": dirs}


def test_sglang_resolves_the_written_model_to_the_hybrid_swa_pool_on_fa3(world: dict[str, Any]) -> None:
    facts = world["facts"]
    m = variant("gptoss")
    mc = facts["model_config"]
    assert mc["architectures"] == ["GptOssForCausalLM"] and mc["config_class"] == "GptOssConfig"
    # SWA_SINK_ARCHS -> is_hybrid_swa_model; layers split by layer_types: the SWA pool's two sides
    assert mc["is_hybrid_swa"] is True and mc["is_hybrid_swa_compress"] is False
    assert mc["swa_attention_layer_ids"] == [0, 2, 4, 6] and mc["full_attention_layer_ids"] == [1, 3, 5, 7]
    assert mc["sliding_window_size"] == 128 and mc["has_attention_sinks"] is True
    assert (mc["head_dim"], mc["num_kv_heads"], mc["num_hidden_layers"]) == (64, 8, m.layers)
    assert mc["dtype"] == "torch.bfloat16" and mc["quantization"] is None  # bf16, no MXFP4
    assert mc["rope_parameters"]["rope_type"] == "yarn" and mc["rope_parameters"]["rope_theta"] == 150000.0
    r = facts["resolved"]
    # the whole pipeline ran (model_hook.py's GPT-OSS check included) and kept fa3 and the hybrid pool
    assert r["attention_backend"] == "fa3" and r["prefill_attention_backend"] is None
    assert r["disable_hybrid_swa_memory"] is False and r["disable_radix_cache"] is True
    assert r["page_size"] == 64 and r["load_format"] == "dummy" and r["quantization"] is None


def test_sglang_picks_fa3_for_it_on_sm90_and_refuses_flashinfer(world: dict[str, Any]) -> None:
    facts = world["facts"]
    default = facts["default"]
    assert default["sm90"] == "fa3"
    assert default["sm80"] not in ("fa3", None)  # the control: the pick follows the platform
    # unpatched, this host gets what its own platform says: fa3 on sm90 (the H200 machine), not on a CPU
    host = default["host"]
    assert (default["this_host"] == "fa3") == (host["is_sm90"] and not host["is_sm100"]), default
    refused = facts["refused"]
    assert refused is not None and refused.startswith("GptOssForCausalLM requires one of ")
    assert str(list(scenarios.GPTOSS_ATTENTION_BACKENDS)) in refused


def test_sglangs_model_class_builds_from_the_config(world: dict[str, Any]) -> None:
    model = world["facts"]["model"]
    m = variant("gptoss")
    assert model["class"] == "GptOssForCausalLM" and model["published_backend"] == "fa3"
    assert model["window"] == m.sliding_window - 1  # SGLang's window excludes the current token
    assert len(model["layers"]) == m.layers
    for i, layer in enumerate(model["layers"]):
        assert layer["window"] == (127 if i % 2 == 0 else -1), i
        # sinks in bf16 on fa3 (trtllm_mha would get fp32)
        assert layer["sinks"] == [m.q_heads] and layer["sinks_dtype"] == "torch.bfloat16"
        assert (layer["q_heads"], layer["kv_heads"], layer["head_dim"]) == (m.q_heads, m.kv_heads, m.head_dim)
        assert layer["experts"]["experts.w13_weight"] == [m.experts, 2 * m.intermediate, m.hidden]
        assert layer["experts"]["experts.w2_weight"] == [m.experts, m.hidden, m.intermediate]
        assert layer["experts"]["router.weight"] == [m.experts, m.hidden]


def _model_hook() -> tuple[str, ast.Module]:
    import importlib.util

    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs SGLang installed (pip install 'sglang==0.5.23')")
    source = (Path(list(spec.submodule_search_locations)[0]) / "srt" / "arg_groups" / "model_hook.py").read_text()
    return source, ast.parse(source)


def test_the_gptoss_backend_list_is_sglangs() -> None:
    source, tree = _model_hook()
    branches = [node for node in ast.walk(tree) if isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.comparators[0], ast.List | ast.Tuple)
                and "GptOssForCausalLM" in [ast.literal_eval(e) for e in node.test.comparators[0].elts]]  # fmt: skip
    assert len(branches) == 1, "model_hook.py has no `model_arch in ['GptOssForCausalLM']` branch any more"
    lists = [n.value for n in ast.walk(branches[0]) if isinstance(n, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == "supported_backends" for t in n.targets)]  # fmt: skip
    assert len(lists) == 1
    assert tuple(ast.literal_eval(lists[0])) == scenarios.GPTOSS_ATTENTION_BACKENDS
    assert "flashinfer" not in scenarios.GPTOSS_ATTENTION_BACKENDS and "fa3" in scenarios.GPTOSS_ATTENTION_BACKENDS


def test_the_variant_keeps_the_pattern_and_says_why() -> None:
    m = variant("gptoss")
    assert isinstance(m, GptOssModel) and not m.has_draft and m.architecture == "GptOssForCausalLM"
    assert (m.layers, m.experts, m.top_k, m.head_dim, m.sliding_window) == (8, 8, 4, 64, 128)
    assert m.layer_types() == ["sliding_attention", "full_attention"] * 4
    assert any("8 layers instead of 24" in d for d in m.deviations)
    assert any("8 experts instead of 32" in d for d in m.deviations)
    assert any("MXFP4" in d for d in m.deviations)
    m12 = variant("gptoss", 12)
    assert m12.layer_types()[10:] == ["sliding_attention", "full_attention"]
    assert any("12 layers instead of 24" in d for d in m12.deviations)
    assert not any("8 layers instead" in d for d in m12.deviations) and len(m12.deviations) == len(m.deviations)
    assert not any("layers instead" in d for d in variant("gptoss", 24).deviations)  # the real count
    with pytest.raises(ValueError, match="at least 2 layers"):
        m.with_layers(1)
    cfg = m.target_config()
    assert "quantization_config" not in cfg and cfg["num_local_experts"] == 8 and cfg["experts_per_token"] == 4
    assert cfg["tie_word_embeddings"] is False and cfg["swiglu_limit"] == 7.0


def test_models_write_and_list_cli(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["repro", "models", "write", str(tmp_path / "m"), "--variant", "gptoss",
                                    "--layers", "6"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "draft:  none" in res.output and "--speculative-draft-model-path" not in res.output
    cfg = json.loads((tmp_path / "m" / "target" / "config.json").read_text())
    assert cfg["architectures"] == ["GptOssForCausalLM"] and cfg["num_hidden_layers"] == 6
    assert not (tmp_path / "m" / "draft").exists()
    record = json.loads((tmp_path / "m" / "kvtrap-model.json").read_text())
    assert record["draft"] is None and record["model"]["architecture"] == "GptOssForCausalLM"
    res = CliRunner().invoke(main, ["repro", "models", "list"])
    assert res.exit_code == 0 and "gptoss: like openai/gpt-oss-20b: 8 layers" in res.output


def test_dummy_tokenizer_covers_the_gptoss_vocab(tmp_path: Path) -> None:
    pytest.importorskip("sglang")
    from helpers.srt import import_srt

    utils = import_srt("sglang.srt.utils.hf_transformers_utils")
    dirs = write_model_dirs(tmp_path, variant("gptoss", 6))
    tok = utils.get_tokenizer(str(dirs.target))
    rng = random.Random(0)
    ids = [rng.randrange(4, 201088) for _ in range(300)] + [201087]
    assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids


def _launch(out: str) -> list[str]:
    return next(line for line in out.splitlines() if "sglang.launch_server" in line).split()


def test_the_dry_run_serves_the_dummy_model_without_a_draft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [{"name": "H200", "memory_gib": 141}])
    res = CliRunner().invoke(main, ["repro", "gptoss-swa-summarize", "--dummy-weights", "--attention-backend", "fa3",
                                    "--inject", "sglang-38269", "--out", str(tmp_path / "run"), "--dry-run",
                                    "--disable-radix-cache"])  # fmt: skip
    assert res.exit_code == 0, res.output
    launch = _launch(res.output)
    assert launch[launch.index("--model-path") + 1] == str(tmp_path / "run" / "models" / "target")
    assert "--speculative-draft-model-path" not in launch and "--speculative-algorithm" not in launch
    assert launch.count("--attention-backend") == 1 and launch[launch.index("--attention-backend") + 1] == "fa3"
    assert launch[-2:] == ["--disable-radix-cache", "&"] and "--load-format" in launch
    assert f"kvtrap repro models write {tmp_path / 'run' / 'models'} --variant gptoss --layers 8" in res.output
    assert "export KVTRAP_INJECT=sglang-38269" in res.output and "--random-input-len 8000" in res.output
    assert "# environment: ok" in res.output
    assert not (tmp_path / "run").exists()
    # the weight-free model brings its MoE runner (GPTOSS_MOE_WHY), once
    assert launch.count("--moe-runner-backend") == 1
    assert launch[launch.index("--moe-runner-backend") + 1] == "triton"
    # the scenario's own flags leave the backend to SGLang (fa3 on sm90)
    res = CliRunner().invoke(main, ["repro", "gptoss-swa-chat", "--dummy-weights", "--dry-run"])
    assert res.exit_code == 0 and "--attention-backend" not in _launch(res.output)


@pytest.mark.parametrize("given", [["--moe-runner-backend", "triton_kernel"], ["--moe-runner-backend=triton_kernel"]])
def test_a_users_moe_runner_wins_over_the_dummy_models(given: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [{"name": "H200", "memory_gib": 141}])
    res = CliRunner().invoke(main, ["repro", "gptoss-swa-chat", "--dummy-weights", "--dry-run", *given])
    assert res.exit_code == 0, res.output
    launch = " ".join(_launch(res.output))
    assert launch.count("--moe-runner-backend") == 1 and "triton_kernel" in launch
    # and without weight-free models nothing is added (a real checkpoint gets SGLang's own pick)
    res = CliRunner().invoke(main, ["repro", "gptoss-swa-chat", "--dry-run"])
    assert res.exit_code == 0 and "--moe-runner-backend" not in _launch(res.output)


@pytest.mark.parametrize("weights", [("--dummy-weights",), ()])
def test_flashinfer_is_refused_up_front_for_gptoss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   weights: tuple[str, ...]) -> None:  # fmt: skip
    def must_not_run(*args: object, **kw: object) -> None:
        raise AssertionError("the run was started")

    monkeypatch.setattr(runner, "run", must_not_run)
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [{"name": "H200", "memory_gib": 141}])
    res = CliRunner().invoke(main, ["repro", "gptoss-swa-chat", "--attention-backend", "flashinfer", "--out",
                                    str(tmp_path / "run"), *weights])  # fmt: skip
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvtrap repro: gptoss-swa-chat serves ")
    assert "refuses GPT-OSS on --attention-backend flashinfer at start-up" in lines[0]
    assert list(tmp_path.iterdir()) == []
    # and a Gemma 4 model path given to a GPT-OSS scenario is judged as Gemma 4
    gemma = tmp_path / "g"
    gemma.mkdir()
    (gemma / "config.json").write_text('{"architectures": ["Gemma4ForCausalLM"]}')
    res = CliRunner().invoke(main, ["repro", "gptoss-swa-chat", "--attention-backend", "fa3", "--model-path",
                                    str(gemma), "--dry-run"])  # fmt: skip
    assert res.exit_code == 2 and "refuses Gemma 4 on --attention-backend fa3" in res.stderr


def test_a_run_writes_the_target_dir_only_and_reports_no_draft(tmp_path: Path) -> None:
    def server_cmd(sc, o, port, rd):  # noqa: ANN001, ANN202
        return [sys.executable, str(STANDINS / "fake_server.py"), "--port", str(port), "--mode", "healthy",
                "--pid-dir", str(rd / "pids"), "--delay", "0.2"]  # fmt: skip

    def bench_cmd(sc, o, port, rd):  # noqa: ANN001, ANN202
        return [sys.executable, str(STANDINS / "fake_bench.py"), "--port", str(port), "--mode", "ok"]

    options = runner.RunOptions(
        scenario=scenarios.get("gptoss-swa-chat"), out_dir=tmp_path / "run", dummy=variant("gptoss", 6),
        probe=ProbeSpec(prompts=2, input_len=16, output_len=4, vocab=201088), health_timeout_s=15.0,
        bench_timeout_s=20.0, grace_s=3.0, follow=False, base_env={**os.environ, "FAKE_SERVER_SALT": "0"},
    )  # fmt: skip
    plan = runner.build_plan(options, server_cmd=server_cmd, bench_cmd=bench_cmd)
    assert plan.models is not None and plan.models.draft is None
    real_cmd = runner.default_server_cmd(options.scenario, options, 1234, tmp_path / "run")
    assert "--speculative-draft-model-path" not in real_cmd
    res = runner.run(options, server_cmd=server_cmd, bench_cmd=bench_cmd, check_env=False)
    assert res.outcome.value == "CLEAN", res.classification.reason
    assert (tmp_path / "run" / "models" / "target" / "config.json").is_file()
    assert not (tmp_path / "run" / "models" / "draft").exists()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["models"]["draft"] is None and report["models"]["model"]["name"] == "gptoss"
    md = (tmp_path / "run" / "report.md").read_text()
    assert "gptoss-like, shapes of `openai/gpt-oss-20b`" in md and "no draft" in md and "MXFP4" in md
    assert "--moe-runner-backend triton" in md  # the deviation says why the weight-free server gets it
