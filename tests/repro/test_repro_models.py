"""Weight-free server repros: the model writer against SGLang 0.5.23's own config loader and server-argument
resolution (on CPU), the scenario wiring (--dummy-weights, --unarmed, --probe), and `kvtrap repro compare`."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from kvtrap.repro import runner, scenarios
from kvtrap.repro.models import (
    DUMMY_RMS_NORM_EPS,
    NORM_EPS_WHY,
    VARIANTS,
    DummyModel,
    variant,
    write_model_dirs,
)
from kvtrap.repro.probe import ProbeSpec, compare, load_probe

from kvtrap.cli import main

pytest.importorskip("sglang")

STANDINS = Path(__file__).resolve().parents[1] / "helpers" / "standins"


@pytest.mark.parametrize("name,layers", [("e4b", 12), ("26b-a4b", 6), ("31b", 6)])
def test_written_models_load_with_sglangs_config_loader_and_server_args(tmp_path, name, layers):
    from helpers.srt import import_srt

    import_srt("sglang.srt.configs.model_config")
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.server_args import ServerArgs

    model = variant(name, layers)
    dirs = write_model_dirs(tmp_path, model)
    args = ServerArgs(
        model_path=str(dirs.target), speculative_draft_model_path=str(dirs.draft), load_format="dummy",
        speculative_algorithm="NEXTN", speculative_num_steps=3, speculative_eagle_topk=1,
        speculative_num_draft_tokens=4, attention_backend="trtllm_mha", page_size=64, device="cpu",
    )  # fmt: skip
    target = ModelConfig.from_server_args(args)
    hf = target.hf_config
    assert hf.architectures == ["Gemma4ForCausalLM"] and target.num_hidden_layers == layers
    assert target.is_hybrid_swa  # SWA and full layers: SGLang builds the SWA pool the traps guard
    assert hf.head_dim == 256 and hf.swa_head_dim == 256
    assert hf.num_key_value_heads == model.kv_heads_full and hf.swa_num_key_value_heads == model.kv_heads_sliding
    assert hf.layer_types[-1] == "full_attention" and hf.layer_types.count("full_attention") == layers // 6
    assert hf.num_kv_shared_layers == model.kv_shared_layers
    assert bool(getattr(hf, "enable_moe_block", False)) == (model.moe is not None)
    draft = ModelConfig.from_server_args(args, model_path=str(dirs.draft), is_draft_model=True)
    assert draft.hf_config.architectures == ["Gemma4AssistantForCausalLM"]
    text = draft.hf_config.text_config
    # Frozen-KV MTP: the draft reads the target's KV, so its attention shapes are the target's.
    assert (text.num_attention_heads, text.head_dim) == (hf.num_attention_heads, hf.head_dim)
    # ... per layer type, as SGLang's loader resolves them for the assistant's nested text_config (the sliding
    # layers read the target's SWA pool: a draft with the full layers' KV heads failed there on a real server)
    assert (text.swa_num_key_value_heads, text.swa_head_dim) == (hf.swa_num_key_value_heads, hf.swa_head_dim)
    assert text.num_key_value_heads == hf.num_key_value_heads
    assert draft.hf_config.backbone_hidden_size == hf.hidden_size
    # The tiny norm epsilon (NORM_EPS_WHY) survives SGLang's config loader, in the target and in the draft.
    assert hf.rms_norm_eps == text.rms_norm_eps == DUMMY_RMS_NORM_EPS


def test_dummy_tokenizer_round_trips_random_ids_through_sglangs_tokenizer(tmp_path):
    from helpers.srt import import_srt

    utils = import_srt("sglang.srt.utils.hf_transformers_utils")
    dirs = write_model_dirs(tmp_path, variant("e4b", 6))
    tok = utils.get_tokenizer(str(dirs.target))
    rng = random.Random(0)
    ids = [rng.randrange(4, 262144) for _ in range(500)]
    text = tok.decode(ids)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0


def test_layer_count_keeps_the_pattern_and_says_why():
    m = variant("e4b", 12)
    assert m.layers == 12 and m.kv_shared_layers == 5
    types = m.layer_types()
    assert types[5] == types[11] == "full_attention" and types.count("full_attention") == 2
    # the non-shared prefix keeps a layer of each type for the shared layers to read
    assert "full_attention" in types[: 12 - m.kv_shared_layers]
    assert any("12 layers instead of 42" in d for d in m.deviations)
    assert variant("e4b").deviations == VARIANTS["e4b"].deviations and len(variant("e4b").deviations) == 2
    with pytest.raises(ValueError, match="at least 6 layers"):
        variant("e4b", 4)
    with pytest.raises(ValueError, match="unknown dummy model"):
        variant("70b")


def test_gemma4_dummy_models_use_the_tiny_norm_eps_and_say_why():
    for m in VARIANTS.values():
        if isinstance(m, DummyModel):
            assert m.target_config()["rms_norm_eps"] == DUMMY_RMS_NORM_EPS
            assert m.draft_config()["text_config"]["rms_norm_eps"] == DUMMY_RMS_NORM_EPS
            assert NORM_EPS_WHY in m.deviations and NORM_EPS_WHY in m.with_layers(12).deviations


@pytest.mark.parametrize("eps,alive", [(1e-6, False), (DUMMY_RMS_NORM_EPS, True)])
def test_dummy_init_residual_stream_survives_12_layers_only_with_the_tiny_eps(eps, alive):
    """The collapse NORM_EPS_WHY describes, in miniature, with SGLang 0.5.23's own RMSNorm (weight w, not 1+w):
    what the dummy loader gives every norm weight and Gemma 4's per-layer ``layer_scalar`` (U(-1e-3, 1e-3),
    seed 1234), and each layer's output is (norm(branch(norm(h))) + h) * layer_scalar, in bf16. The branch
    here is a plain dummy-weight linear map (attention and MLP are linear-or-smaller at these magnitudes)."""
    import torch
    from helpers.srt import import_srt

    RMSNorm = import_srt("sglang.srt.layers.layernorm").RMSNorm
    hidden, dt = 256, torch.bfloat16

    def dummy(*shape):  # initialize_dummy_weights: one generator per tensor, same seed
        return torch.empty(*shape, dtype=dt).uniform_(-1e-3, 1e-3, generator=torch.Generator().manual_seed(1234))

    norm = RMSNorm(hidden, eps=eps).to(dt)
    norm.weight.data.copy_(dummy(hidden))
    w, layer_scalar = dummy(hidden, hidden), dummy(1)
    torch.manual_seed(0)
    h = dummy(16, hidden)[torch.randperm(16)] * hidden**0.5  # scaled embeddings (embed_scale = sqrt(hidden))
    for _ in range(12):
        branch = norm.forward_native(norm.forward_native(h) @ w.T)
        h = (branch + h) * layer_scalar
    logits = norm.forward_native(h).float() @ dummy(1000, hidden).float().T
    if alive:
        assert 1e-9 < h.float().abs().max() < 1e-2 and logits.abs().max() > 1e-9
    else:
        assert h.float().abs().max() < 1e-30 and logits.abs().max() < 1e-30  # bf16/fp32 denormals or zero


def test_models_write_cli(tmp_path):
    res = CliRunner().invoke(main, ["repro", "models", "write", str(tmp_path / "m"), "--variant", "26b-a4b",
                                    "--layers", "6"])  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "m" / "target" / "config.json").read_text())
    assert cfg["num_experts"] == 128 and cfg["num_hidden_layers"] == 6
    assert (tmp_path / "m" / "draft" / "tokenizer.json").is_file()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(main, ["repro", "models", "write", str(blocker / "sub")])
    assert res.exit_code == 2 and "cannot write" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["repro", "models", "write", str(tmp_path / "n"), "--layers", "3"])
    assert res.exit_code == 2 and "6<=x<=256" in res.output


def test_dummy_weights_dry_run_and_usage_errors():
    res = CliRunner().invoke(main, ["repro", "e4b-chat", "--dummy-weights", "--dummy-layers", "12", "--unarmed",
                                    "--inject", "sglang-26957", "--probe", "4", "--dry-run"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = res.output
    assert "--load-format dummy" in out and "models/target" in out and "models/draft" in out
    assert "kvtrap repro models write" in out and "--layers 12" in out
    assert "export SGLANG_TRTLLM_MHA_DEBUG=0" in out and "export KVTRAP_INJECT=sglang-26957" in out
    assert "--cuda-graph-backend-prefill disabled" in out  # SGLang's piecewise prefill capture fails on KV sharing
    assert "4 greedy prompts" in out
    for bad, msg in ((["--dummy-layers", "12"], "--dummy-layers needs --dummy-weights"),
                     (["--dummy-weights", "--model-path", "/x"], "leave out --model-path"),
                     (["--dummy-weights", "--dummy-layers", "2"], "6<=x<=256")):  # fmt: skip
        res = CliRunner().invoke(main, ["repro", "e4b-chat", *bad, "--dry-run"])
        assert res.exit_code == 2 and msg in res.output, res.output


def _probe_run(tmp_path: Path, salt: str, *, armed: bool, **env: str) -> runner.RunResult:
    def server_cmd(sc, o, port, rd):
        return [sys.executable, str(STANDINS / "fake_server.py"), "--port", str(port), "--mode", "healthy",
                "--pid-dir", str(rd / "pids"), "--delay", "0.2"]  # fmt: skip

    def bench_cmd(sc, o, port, rd):
        return [sys.executable, str(STANDINS / "fake_bench.py"), "--port", str(port), "--mode", "ok"]

    import os

    options = runner.RunOptions(
        scenario=scenarios.get("e4b-chat"), out_dir=tmp_path, dummy=variant("e4b", 6), armed=armed,
        probe=ProbeSpec(prompts=3, input_len=16, output_len=10), health_timeout_s=15.0, bench_timeout_s=20.0,
        grace_s=3.0, follow=False, base_env={**os.environ, "FAKE_SERVER_SALT": salt, **env},
    )  # fmt: skip
    return runner.run(options, server_cmd=server_cmd, bench_cmd=bench_cmd, check_env=False)


def test_probe_runs_before_the_benchmark_and_compare_reads_two_runs(tmp_path):
    a = _probe_run(tmp_path / "a", "0", armed=False)
    b = _probe_run(tmp_path / "b", "0", armed=True)
    c = _probe_run(tmp_path / "c", "5", armed=True)
    for r in (a, b, c):
        assert r.outcome.value == "CLEAN", r.classification.reason
    assert (tmp_path / "a" / "models" / "target" / "config.json").is_file()  # the run wrote its model dirs
    assert a.plan.env_changes["SGLANG_TRTLLM_MHA_DEBUG"] == "0" and b.plan.env_changes["SGLANG_TRTLLM_MHA_DEBUG"] == "1"
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["probe"]["answered"] == 3 and report["models"]["model"]["name"] == "e4b"
    assert "output probe: 3/3 prompts answered" in (tmp_path / "a" / "report.md").read_text()
    assert compare(load_probe(tmp_path / "a"), load_probe(tmp_path / "b")).identical
    diff = compare(load_probe(tmp_path / "a"), load_probe(tmp_path / "c"))
    assert diff.exact == 0 and diff.first_divergence == (0, 5) and diff.matched_tokens == 15

    cli = CliRunner()
    same = cli.invoke(main, ["repro", "compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert same.exit_code == 0 and "3/3 prompts identical" in same.output
    other = cli.invoke(main, ["repro", "compare", str(tmp_path / "a"), str(tmp_path / "c")])
    assert other.exit_code == 1 and "first divergence: prompt 0, token 5" in other.output
    as_json = cli.invoke(main, ["repro", "compare", "--json", str(tmp_path / "a"), str(tmp_path / "c")])
    assert json.loads(as_json.output)["exact_match_rate"] == 0.0
    # salt 5: the other run's pick is not this run's runner-up: not a swap, so not a near tie
    assert json.loads(as_json.output)["near_ties"] == 0 and diff.swap_margins == (None, None, None)
    assert json.loads(as_json.output)["judged"] == 3  # both runs recorded top-2 log-probs there
    assert "near ties: 0 of 3 differing prompts" in other.output and "3 do not (a wider margin or a third" in other.output


@pytest.mark.parametrize(("margin", "ties"), [("0.001", 3), ("0.5", 0)])
def test_compare_judges_a_swap_of_the_top_two_by_its_margin(tmp_path, margin, ties):
    a = _probe_run(tmp_path / "a", "0", armed=False, FAKE_SERVER_MARGIN=margin)
    b = _probe_run(tmp_path / "b", "1", armed=True, FAKE_SERVER_MARGIN=margin)  # picks = a's runner-ups from token 5
    pa = load_probe(tmp_path / "a")
    assert len(pa["outputs"][0]["margins"]) == 10 and pa["outputs"][0]["runner_up"][0] == pa["outputs"][0]["output_ids"][0] + 1
    assert a.outcome.value == b.outcome.value == "CLEAN"
    diff = compare(pa, load_probe(tmp_path / "b"))
    assert diff.first_divergence == (0, 5) and not diff.identical
    assert diff.swap_margins == pytest.approx((float(margin),) * 3) and diff.near_ties == ties
    out = CliRunner().invoke(main, ["repro", "compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert out.exit_code == 1  # different is different; the near-tie line says how to read it
    assert f"near ties: {ties} of 3 differing prompts" in out.output


def test_a_server_that_refuses_logprobs_still_gets_probed(tmp_path):
    res = _probe_run(tmp_path / "a", "0", armed=True, FAKE_SERVER_REFUSES_LOGPROBS="1")
    assert res.outcome.value == "CLEAN", res.classification.reason
    outs = load_probe(tmp_path / "a")["outputs"]
    assert all(len(o["output_ids"]) == 10 and "margins" not in o for o in outs)
    _probe_run(tmp_path / "b", "5", armed=True)  # with log-probs: still nothing to judge against run a
    out = CliRunner().invoke(main, ["repro", "compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert out.exit_code == 1 and "3 cannot be judged (no top-2 log-probs recorded there)" in out.output


def test_a_probe_file_with_malformed_margins_is_refused(tmp_path):
    from kvtrap.repro.probe import ProbeError

    good = {"schema": "kvtrap.repro.outputs", "spec": {"prompts": 1},
            "outputs": [{"prompt": 0, "output_ids": [5, 6], "margins": [0.1, None], "runner_up": [7, None]}]}
    (tmp_path / "ok.json").write_text(json.dumps(good))
    assert load_probe(tmp_path / "ok.json")["outputs"][0]["margins"] == [0.1, None]
    for bad in ({"margins": [0.1]}, {"margins": ["x", 1.0], "runner_up": [1, 2]}, {"margins": [0.1, 0.2], "runner_up": [1.5, 2]}):
        entry = {**good["outputs"][0], "runner_up": [7, 8], **bad}
        (tmp_path / "bad.json").write_text(json.dumps({**good, "outputs": [entry]}))
        with pytest.raises(ProbeError, match="malformed output entry 0"):
            load_probe(tmp_path / "bad.json")


def test_probe_without_answers_makes_the_run_unhealthy_and_a_used_run_dir_is_refused(tmp_path):
    res = _probe_run(tmp_path / "a", "0", armed=True, FAKE_SERVER_GENERATE_FAILS="1")
    assert res.outcome.value == "UNHEALTHY" and "3 of 3 probe prompts got no output" in res.classification.reason
    with pytest.raises(runner.EnvironmentProblem, match="already holds a run"):
        _probe_run(tmp_path / "a", "0", armed=True)


def _outputs(n: int, **over: object) -> str:
    data = {"schema": "kvtrap.repro.outputs", "spec": {"prompts": n, "seed": 1},
            "outputs": [{"prompt": i, "output_ids": [1, 2, 3]} for i in range(n)]}  # fmt: skip
    data.update(over)
    return json.dumps(data)


@pytest.mark.parametrize("content,msg", [
    (None, "no such file"), ("{not json", "not JSON"), ("[" * 100000 + "]" * 100000, "not JSON"),
    ('{"schema": "x"}', "not a kvtrap outputs file"),
    (_outputs(2, outputs=[{"prompt": 0, "output_ids": "abc"}, {"prompt": 1, "output_ids": []}]), "malformed output"),
    (_outputs(1, outputs=[{"prompt": 0, "output_ids": [True, 2]}]), "malformed output"),
    (_outputs(2, outputs=[{"prompt": 1, "output_ids": [1]}, {"prompt": 0, "output_ids": [1]}]), "malformed output"),
    (_outputs(0), "no prompts to compare"), (_outputs(2, spec=None), "spec is missing"),
    (_outputs(3, outputs=[{"prompt": 0, "output_ids": [1]}]), "1 outputs for a probe of 3 prompts"),
])  # fmt: skip
def test_compare_bad_input_is_one_line_exit_2(tmp_path, content, msg):
    good = tmp_path / "good.json"
    good.write_text(_outputs(2))
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    res = CliRunner().invoke(main, ["repro", "compare", str(good), str(bad)])
    assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output


def test_compare_refuses_runs_that_probed_different_prompts(tmp_path):
    (tmp_path / "a.json").write_text(_outputs(2))
    (tmp_path / "b.json").write_text(_outputs(2, spec={"prompts": 2, "seed": 2}))
    res = CliRunner().invoke(main, ["repro", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert res.exit_code == 2 and "different prompts" in res.output


@pytest.mark.parametrize("args,msg", [
    (["synthetic", "--probe", "4"], "only for server scenarios"),
    (["synthetic", "--unarmed"], "only for server scenarios"),
    (["e4b-chat", "--unarmed", "--fix"], "--fix and --mode need it armed"),
    (["e4b-chat", "--unarmed", "--mode", "log"], "--fix and --mode need it armed"),
    (["e4b-chat", "--out", " "], "--out needs a directory name"),
    (["e4b-chat", "--dummy-weights", "--dummy-layers", "100000"], "100000"),
    (["e4b-chat", "--probe", "99999999999"], "99999999999"),
])  # fmt: skip
def test_repro_options_that_make_no_sense_are_usage_errors(args, msg):
    res = CliRunner().invoke(main, ["repro", *args, "--dry-run"])
    assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, res.output


def test_unknown_bug_name_stops_a_real_run_before_starting():
    options = runner.RunOptions(scenario=scenarios.get("e4b-chat"), inject=("sglang-26975",))
    with pytest.raises(runner.EnvironmentProblem, match="unknown bug to inject 'sglang-26975'; known: .*sglang-26957"):
        runner.check_environment(options, environ={"CUDA_VISIBLE_DEVICES": ""})


def test_tp2_scenarios_pass_tp_size_and_need_two_gpus(monkeypatch):
    res = CliRunner().invoke(main, ["repro", "31b-tp2-chat", "--dummy-weights", "--dummy-layers", "6", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "--tp-size 2" in res.output and "--load-format dummy" in res.output
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [{"name": "NVIDIA H200", "memory_gib": 139.8}])
    for name in ("31b-tp2-chat", "26b-tp2-chat"):
        with pytest.raises(runner.EnvironmentProblem, match="1 CUDA GPU\\(s\\) visible; scenario .* needs 2"):
            runner.check_environment(runner.RunOptions(scenario=scenarios.get(name)))
    monkeypatch.setattr(runner, "gpu_inventory", lambda environ=None: [{"name": "NVIDIA H200", "memory_gib": 139.8}] * 2)
    monkeypatch.setattr(runner, "sglang_installed", lambda: True)
    assert runner.check_environment(runner.RunOptions(scenario=scenarios.get("26b-tp2-chat"))) == []
