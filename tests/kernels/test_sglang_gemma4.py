"""``KVTRAP_GEMMA4_KERNELS=1`` inside SGLang 0.5.23's real Gemma 4 model, on the CPU (Triton interpreter).

One subprocess (``tests/helpers/gemma4_world.py``, about 30 s) builds SGLang's ``Gemma4TextModel`` for three
small variants with the released models' structure (E4B-like: PLE + KV-shared layers; 26B-A4B-like: MoE;
31B-like: dense), runs a prefill and a decode step with the switch off, on (all layers), on for one layer at a
time, and off again, and saves what every layer produced. The tests here compare those records.

Tolerances, per op. "Row ulps" are bf16 ulps of the largest magnitude in the token's row (1 ulp = 2^-7
relative to the leading power of two), the scale at which a residual stream's rounding happens. SGLang's path
on a CPU host is its ``forward_native`` code, which rounds to bf16 after every op; the kernels keep fp32 and
round once where SGLang's CUDA kernels do. The bounds are a few times the measured worst case (given in each
test) and two orders of magnitude below what a wrong weight, scalar, RoPE angle or residual produces.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from kvtrap.kernels import sglang_gemma4  # noqa: E402

WORLD = Path(__file__).resolve().parents[1] / "helpers" / "gemma4_world.py"
VARIANTS = {"e4b": dict(ple=True, moe=False), "moe": dict(ple=False, moe=True), "dense": dict(ple=False, moe=False)}
LAYERS = 4
STEPS = ("prefill", "decode")
# On a GPU where sglang.srt imports, the same comparisons run against SGLang's CUDA kernels (closer to ours).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Layer output (the residual stream a layer writes) against SGLang's layer on the same input: the layer's end
# rounds 3 times in SGLang's CPU path (norm, + residual, * layer scalar) and once in the kernels; q/k round
# twice (norm, RoPE) instead of once, and the triple norm's outputs are taken from fp32 instead of a rounded
# sum. Those half-ulp differences reach the output through the attention and MLP GEMMs. Measured: <= 5.
LAYER_ROW_ULPS = 8
# Attention output (o_proj) with q/k/v norm + RoPE fused: q and k differ by <= 1 ulp before attention, then
# softmax and two GEMMs. Measured: <= 3.
ATTN_ROW_ULPS = 8
# Next layer's input norm (or model.norm) written by the cross-layer kernel, against SGLang's norm of the same
# stream: both normalise the same bf16 stream in fp32 and round once; only the fp32 operation order differs.
# Per element. Measured: 1.
NEXT_NORM_ULPS = 1
# Routing weights against SGLang's CPU routing on the same logits: SGLang's softmax runs in bf16 (each
# weight rounded, then multiplied by the bf16-cast scale and rounded again), the kernel's in fp32.
ROUTING_RTOL = 2**-6
# A token's top-k may legitimately change when its k-th and (k+1)-th logits are closer than the logit
# difference that a one-ulp change of the router input makes through the router GEMM (bf16 logits; the error
# scales with the row's largest logit, not with the k-th one). Measured: <= 1.5 row ulps of the logits.
NEAR_TIE_ROW_ULPS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma4") / "world.pt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVTRAP_", "SGLANG_TRTLLM"))}
    with socket.socket() as sock:  # gloo's rendezvous port: a free one, so parallel runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env.update(KVTRAP_GEMMA4_KERNELS="1", KVTRAP_TEST_PORT=str(port), MASTER_PORT=str(port), KVTRAP_TEST_DEVICE=DEVICE)
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(WORLD), str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0 and "No module named 'sgl_kernel'" in proc.stderr and torch.cuda.is_available():
        pytest.skip("sglang.srt needs sgl_kernel, which is not installed here (a CUDA GPU without SGLang's full runtime)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def row_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    row_max = want.abs().amax(dim=-1, keepdim=True).clamp_min(2.0**-100)
    ulp = torch.exp2(torch.floor(torch.log2(row_max)) - 7)
    return ((got - want).abs() / ulp).max().item()


def elem_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0**-100))) - 7)
    return ((got - want).abs() / ulp).max().item()


def routed_alike(on: dict, off: dict, layer: int) -> torch.Tensor:
    """Tokens whose expert set is the same with the switch on and off (tie order aside). Every other token
    must be a near tie of SGLang's own logits (asserted here)."""
    ids_on, ids_off = on[f"topk{layer}"][1].sort(dim=-1).values, off[f"topk{layer}"][1].sort(dim=-1).values
    same = (ids_on == ids_off).all(dim=-1)
    logits = off[f"logits{layer}"].float()
    k = ids_off.shape[1]
    top = logits.sort(dim=-1, descending=True).values
    gap = top[:, k - 1] - top[:, k]
    row_ulp = torch.exp2(torch.floor(torch.log2(logits.abs().amax(dim=-1).clamp_min(2.0**-100))) - 7)
    near_tie = gap <= NEAR_TIE_ROW_ULPS * row_ulp
    assert bool((same | near_tie).all()), f"layer {layer}: tokens {(~same).nonzero().flatten().tolist()} re-routed"
    assert int(same.sum()) >= len(same) - 1, "more than one token re-routed: not bf16 noise"
    return same


# --------------------------------------------------------------------------------- the switch and the plan
PROBE = (
    "import sys, kvtrap.plugin as p; p.register(); from kvtrap.kernels import sglang_gemma4 as s; "
    "from kvtrap.capture import patching; print(s.enabled(), sorted(patching._pending), len(patching._installed), "
    "'torch' in sys.modules)"
)


def run_plugin(value: str | None) -> tuple[str, str]:
    """SGLang's plugin call in a fresh process, without SGLang: what would it patch?"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVTRAP_", "SGLANG_TRTLLM"))}
    if value is not None:
        env["KVTRAP_GEMMA4_KERNELS"] = value
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip(), proc.stderr.strip()


@pytest.mark.parametrize("value", [None, "", "0", "off"])
def test_switch_off_patches_nothing(value):
    assert run_plugin(value) == ("False [] 0 False", "")


def test_switch_on_waits_for_sglang_to_import_the_model():
    out, err = run_plugin("1")
    pending = "['sglang.srt.layers.layer_boundary.residual.access', 'sglang.srt.models.gemma4_causal']"
    assert out == f"True {pending} 0 False"  # nothing imported or patched yet, torch not even loaded
    assert err == ""


def test_bad_switch_value_is_one_clear_line_and_patches_nothing():
    out, err = run_plugin("maybe")
    assert out == "False [] 0 False"
    assert len(err.splitlines()) == 1
    assert err.endswith("ERROR Gemma 4 kernels are NOT enabled: KVTRAP_GEMMA4_KERNELS must be 1 or 0; got 'maybe'")


def test_expected_fusions_of_the_released_variants():
    f = sglang_gemma4.expected_fusions
    assert f(ple=True, moe=False) == ("qkv_norm_rope", "ple_tail", "pair_norm", "cross_layer")
    assert f(ple=False, moe=True) == ("qkv_norm_rope", "routing", "triple_norm", "cross_layer")
    assert f(ple=False, moe=False) == ("qkv_norm_rope", "pair_norm", "cross_layer")
    assert f(ple=False, moe=True, tp=2) == ("qkv_norm_rope", "routing")
    assert f(ple=True, moe=False, tp=2) == ("qkv_norm_rope", "ple_tail")


def test_plugin_switch_patches_gemma4_on_import_without_arming_the_trap(world):
    plugin = world["plugin"]
    assert plugin["lazy"], "the plugin must not import SGLang's model code itself"
    assert plugin["wrapped"] and all(plugin["wrapped"].values()), plugin["wrapped"]
    assert plugin["trap_armed"] is False  # KVTRAP_GEMMA4_KERNELS is independent of SGLANG_TRTLLM_MHA_DEBUG
    assert not any(plugin["after_disable"].values()), "disable() must put SGLang's methods back"


@pytest.mark.parametrize("variant", VARIANTS)
def test_plan_matches_the_variant_and_the_kernels_ran(world, variant):
    res = world[variant]
    expected = set(sglang_gemma4.expected_fusions(**VARIANTS[variant]))
    for fusions in res["plan"]:
        assert {name for name, status in fusions.items() if status == "on"} == expected, fusions
    # every layer, both steps: one launch per layer per fused op
    calls = res["calls"]
    per_layer = 2 * LAYERS
    assert calls["qkv_norm_rope"] == per_layer
    assert calls["gemma4_fused_routing"] == (per_layer if "routing" in expected else 0)
    ple, cross, moe = "ple_tail" in expected, "cross_layer" in expected, VARIANTS[variant]["moe"]
    for name in ("rmsnorm_add", "gelu_tanh_mul"):
        assert calls[name] == (per_layer if ple else 0)
    # a PLE layer's last kernel also writes the next input norm when the layer override runs
    assert calls["rmsnorm_residual_scalar"] == (per_layer if ple and not cross else 0)
    assert calls["rmsnorm_residual_scalar_next_norm"] == (per_layer if ple and cross else 0)
    assert calls["post_attn_pair_rmsnorm"] == (per_layer if "pair_norm" in expected else 0)
    assert calls["post_attn_triple_rmsnorm"] == (per_layer if "triple_norm" in expected else 0)
    assert calls["post_ffn_moe_next_norm"] == (per_layer if cross and moe else 0)
    assert calls["post_ffn_dense_next_norm"] == (per_layer if cross and not moe and not ple else 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_warning_once_per_model_names_layers_and_fallbacks(world, variant):
    log = world[variant]["log"]
    assert len(log) == 1, log  # three full runs and four single-layer runs with the switch on
    line = log[0]
    assert line.startswith("WARNING Gemma 4 fused kernels (KVTRAP_GEMMA4_KERNELS=1): qkv_norm_rope: layers 0-3")
    # what the plan cannot promise: per-call fallbacks even on layers listed as fused
    assert line.endswith(sglang_gemma4.PER_CALL_NOTE)
    for words in ("EAGLE3/DFLASH capture layers", "torch.compile or piecewise CUDA-graph", "never calls the custom"):
        assert words in sglang_gemma4.PER_CALL_NOTE
    if variant == "e4b":
        assert "ple_tail: layers 0-3 | pair_norm: layers 0-3 |" in line and "cross_layer: layers 0-3." in line
    if variant == "moe":
        assert "routing: layers 0-3" in line and "triple_norm: layers 0-3" in line
        assert "pair_norm: none; SGLang's path on layers 0-3 (MoE layer" in line
    if variant == "dense":
        assert "pair_norm: layers 0-3" in line and "cross_layer: layers 0-3." in line


@pytest.mark.parametrize("variant", VARIANTS)
def test_switch_off_is_bit_identical(world, variant):
    """After disable() the model (same object, plans and routing objects still attached) is SGLang's again."""
    res = world[variant]
    for step in STEPS:
        off, again = res["off"][step], res["off_again"][step]
        assert off.keys() == again.keys()
        for key in off:
            a, b = off[key], again[key]
            pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
            for x, y in pairs:
                assert torch.equal(x, y), (step, key)
        # and with the switch on, runs repeat exactly (no state carried between forwards)
        assert torch.equal(res["on"][step]["out"], res["on2"][step]["out"])


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU host without the interpreter is what disqualifies here")
def test_layers_that_do_not_qualify_run_sglangs_path_bit_identically(world):
    res = world["fallback"]
    assert not any(res["calls"].values()), res["calls"]
    why = "device cpu (needs CUDA, or TRITON_INTERPRET=1 on CPU)"
    for fusions in res["plan"]:
        assert fusions["qkv_norm_rope"] == fusions["routing"] == fusions["cross_layer"] == why, fusions
    assert len(res["log"]) == 1 and f"qkv_norm_rope: none; SGLang's path on layers 0-3 ({why})" in res["log"][0]
    for step in STEPS:
        for key, off in res["off"][step].items():
            on = res["on"][step][key]
            for x, y in zip(*((off, on) if isinstance(off, tuple) else ((off,), (on,))), strict=True):
                assert torch.equal(x, y), (step, key)


# --------------------------------------------------------------------------------- equivalence per layer
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layer", range(LAYERS))
def test_fused_layer_matches_sglang_layer(world, variant, layer):
    """Only ``layer`` fused: earlier layers are bit-identical, then attention output, the layer's stream and
    the norm its end writes for the next consumer match SGLang's within the stated tolerances."""
    res = world[variant]
    moe = VARIANTS[variant]["moe"]
    for step in STEPS:
        on, off = res["solo"][layer][step], res["off"][step]
        for earlier in range(layer):
            assert torch.equal(on[f"out{earlier}"], off[f"out{earlier}"]), (step, earlier)
        assert torch.equal(on[f"in{layer}"], off[f"in{layer}"])
        assert row_ulps(on[f"attn{layer}"], off[f"attn{layer}"]) <= ATTN_ROW_ULPS, step
        rows = routed_alike(on, off, layer) if moe else torch.ones(len(on["out"]), dtype=torch.bool, device=on["out"].device)
        assert row_ulps(on[f"out{layer}"][rows], off[f"out{layer}"][rows]) <= LAYER_ROW_ULPS, step
        if "cross_layer" in sglang_gemma4.expected_fusions(**VARIANTS[variant]):
            # the next layer's input norm (the model's final norm after the last layer) came from this layer
            written = on[f"stash{layer + 1}"] if layer + 1 < LAYERS else on["out"]
            assert elem_ulps(written, on["next_norm_ref"]) <= NEXT_NORM_ULPS, step
        else:
            assert f"stash{layer + 1}" not in on


@pytest.mark.parametrize("variant", ["moe", "e4b"])
@pytest.mark.parametrize("layer", range(1, LAYERS))
def test_fused_layer_on_the_stashed_input_norm_matches_sglang_layer(world, variant, layer):
    """Layers ``layer - 1`` and ``layer`` fused: ``layer`` takes the normed input its predecessor's end wrote
    (it does not run its own input norm) and still matches SGLang's layer on the same input (the run with
    only ``layer - 1`` fused), on the tokens whose routing did not change (MoE), within the per-layer
    tolerances; the last layer's end is taken up by the final norm. E4B-like: the predecessor's stash comes
    from the PLE tail's last kernel. Prefill only (8 tokens): the decode step adds nothing to the hand-off and
    costs interpreter time."""
    res = world[variant]
    for step in ("prefill",):
        pair, ref = res["pair"][layer][step], res["solo"][layer - 1][step]
        assert torch.equal(pair[f"in{layer}"], ref[f"in{layer}"]), step  # layer - 1 ran the same in both
        assert f"stash{layer}" in pair, step  # handed over on the very stream tensor
        assert f"own_norm{layer}" not in pair, step  # ... and used: the layer's own input norm did not run
        assert f"own_norm{layer}" in res["solo"][layer][step], step  # (it does when nothing was handed over)
        assert row_ulps(pair[f"attn{layer}"], ref[f"attn{layer}"]) <= ATTN_ROW_ULPS, step
        if variant == "moe":
            rows = routed_alike(pair, ref, layer)
        else:
            rows = torch.ones(len(pair["out"]), dtype=torch.bool, device=pair["out"].device)
        assert row_ulps(pair[f"out{layer}"][rows], ref[f"out{layer}"][rows]) <= LAYER_ROW_ULPS, step
        written = pair[f"stash{layer + 1}"] if layer + 1 < LAYERS else pair["out"]
        assert elem_ulps(written, pair["next_norm_ref"]) <= NEXT_NORM_ULPS, step


def tensors(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize(("variant", "end_kernel"),
                         [("dense", "post_ffn_dense_next_norm"), ("e4b", "rmsnorm_residual_scalar_next_norm")])
def test_stash_on_another_tensor_is_ignored_and_cleared(world, variant, end_kernel):
    """Layer 2 entered with a copy of the stream layer 1 left its normed tensor for (poisoned with NaN by the
    test): the fused layer ignores and clears it and applies SGLang's input norm itself, exactly as when no
    stash was left; the control shows the poisoned stash is used when the tensor is the same."""
    copy, dropped, poisoned = (world["handoff"][variant][k] for k in ("copy", "dropped", "poisoned"))
    assert copy["seen"] == {"stash_in": True, "stash_left": False}
    assert copy["calls"][end_kernel] == 2  # layers 1 and 2 fused (0 and 3 held off): layer 2
    # ran fused, not SGLang's layer
    assert copy["calls"]["post_attn_pair_rmsnorm"] == 2
    assert "own_norm2" in copy and "own_norm2" not in poisoned
    assert tensors(copy).keys() == tensors(dropped).keys()
    for key, value in tensors(copy).items():
        assert torch.equal(value, dropped[key]), key
    assert not copy["out"].isnan().any()
    assert poisoned["out2"].isnan().all(), "control: a used stash must show in the layer output"


def test_router_scale_is_folded_before_a_fused_layer_first_runs(world):
    """The switch on before any run with it off, router scale not sqrt(hidden): the fused layer folds the
    scale itself (SGLang does it in ``Gemma4Router.forward``, which the fused layer does not call), giving
    exactly what a model folded beforehand gives; the unfolded weight would route differently."""
    lazy, prefolded, unfolded = (world["router_fold"][k] for k in ("lazy", "prefolded", "unfolded"))
    assert lazy["calls"]["post_attn_triple_rmsnorm"] == 1  # layer 0 (the others run SGLang's layer)
    assert lazy["folded"] == [True] * LAYERS and not unfolded["folded"][0]
    for key, value in tensors(lazy).items():
        assert torch.equal(value, prefolded[key]), key
    assert not torch.allclose(lazy["logits0"].float(), unfolded["logits0"].float(), atol=0.05)


def test_aux_hidden_state_capture_layer_takes_sglangs_path(world):
    """Layer 2 of the fused dense model captures aux hidden states (an EAGLE3/DFLASH capture layer): it runs
    SGLang's layer (bit-identical to the run with its layer override held off), the capture holds its input,
    and the stash layer 1 left for it is dropped."""
    cap, held = world["capture"]["capture"], world["capture"]["held"]
    assert cap["calls"]["post_ffn_dense_next_norm"] == 1  # layer 1 (0 and 3 held off by the test)
    assert tensors(cap).keys() == tensors(held).keys()
    for key, value in tensors(cap).items():
        assert torch.equal(value, held[key]), key
    assert len(cap["aux"]) == 1 and torch.equal(cap["aux"][0], cap["in2"])


def test_ple_layer_without_its_per_layer_input_takes_sglangs_path(world):
    """Layer 2 of the fused E4B-like model called with ``per_layer_input=None``: SGLang's layer runs
    (bit-identical to the run with layer 2's override and PLE tail held off), the normed input layer 1 left
    is dropped, and only layer 1 launched the override's kernels."""
    none, held = world["ple_input"]["none"], world["ple_input"]["held"]
    assert none["seen"] == {"stash_in": True, "stash_left": False}
    assert none["calls"]["post_attn_pair_rmsnorm"] == none["calls"]["rmsnorm_residual_scalar_next_norm"] == 1
    # layer 2's PLE tail is SGLang's too (nothing to fuse without the per-layer input)
    assert none["calls"]["rmsnorm_add"] == 1 and none["calls"]["rmsnorm_residual_scalar"] == 0
    assert "own_norm2" in none
    assert tensors(none).keys() == tensors(held).keys()
    for key, value in tensors(none).items():
        assert torch.equal(value, held[key]), key


def test_deterministic_inference_falls_back_everywhere_and_says_why(world):
    """SGLang's batch-invariant mode: no kernel launches (their launch shape, and so their reduction order,
    depends on the token count), SGLang's path bit for bit, and the WARNING says why."""
    det = world["deterministic"]
    assert not any(det["calls"].values()), det["calls"]
    for key, value in tensors(det["off"]).items():
        assert torch.equal(value, det["on"][key]), key
    why = "SGLang's deterministic inference (batch-invariant mode)"
    for fusions in det["plan"]:
        assert fusions["ple_tail"] == "no PLE in this model"
        assert fusions["pair_norm"] == "MoE layer (its post-attention norms are triple_norm's)"
        assert all(fusions[n].startswith(why) for n in ("qkv_norm_rope", "routing", "triple_norm", "cross_layer"))
    assert len(det["log"]) == 1 and f"cross_layer: none; SGLang's path on layers 0-3 ({why}" in det["log"][0]
    # the server flags alone (published config, flag not set): E4B-like plans
    e4b_fusions = ("qkv_norm_rope", "ple_tail", "pair_norm", "cross_layer")
    for fusions in det["plan_flag"]:
        assert all(fusions[n].startswith(why) for n in e4b_fusions), fusions
    for fusions in det["plan_rl"]:
        assert all(fusions[n].startswith("--rl-on-policy-target fsdp") for n in e4b_fusions), fusions
    for fusions in det["plan_none"]:
        assert all(fusions[n] == "on" for n in e4b_fusions), fusions


def test_routing_kernel_matches_sglang_routing_on_the_same_logits(world):
    """The kernel on the router logits SGLang's own layer produced, against SGLang's routing of them."""
    from kvtrap.kernels.routing import gemma4_fused_routing

    res = world["moe"]
    for layer in range(LAYERS):
        for step in STEPS:
            off = res["off"][step]
            weights_off, ids_off = off[f"topk{layer}"]
            logits = off[f"logits{layer}"]
            k = ids_off.shape[1]
            weights, ids = gemma4_fused_routing(logits, res["per_expert_scale"][layer], k)
            by_id_off, by_id = ids_off.sort(dim=-1), ids.sort(dim=-1)
            # an exact tie at the k-th place may pick either expert (SGLang's CPU topk: unspecified order)
            top = logits.float().sort(dim=-1, descending=True).values
            rows = top[:, k - 1] != top[:, k]
            assert torch.equal(by_id.values[rows], by_id_off.values[rows]), (layer, step)
            torch.testing.assert_close(
                weights.gather(1, by_id.indices)[rows], weights_off.gather(1, by_id_off.indices)[rows],
                rtol=ROUTING_RTOL, atol=0,
            )  # fmt: skip


@pytest.mark.parametrize("variant", ["e4b", "dense"])
def test_all_layers_fused_model_output_close(world, variant):
    """Every layer fused: a few row ulps per layer compound through 4 layers of random GEMMs (measured relative
    Frobenius error 2.5-3.0%, cosine >= 0.9995). The MoE variant is left to the per-layer test: a bf16 near
    tie that re-routes one token changes that token's later layers entirely."""
    res = world[variant]
    for step in STEPS:
        on, off = res["on"][step]["out"].float(), res["off"][step]["out"].float()
        assert torch.nn.functional.cosine_similarity(on.flatten(), off.flatten(), dim=0) > 0.998
        assert (on - off).norm() / off.norm() < 0.06


@pytest.mark.parametrize("value", [None, "0"])
def test_doctor_says_off_in_one_line_when_the_switch_is_off(monkeypatch, value):
    from kvtrap.cli.doctor import check_gemma4_kernels

    monkeypatch.delenv("KVTRAP_GEMMA4_KERNELS", raising=False)
    if value is not None:
        monkeypatch.setenv("KVTRAP_GEMMA4_KERNELS", value)
    (check,) = check_gemma4_kernels()
    assert (check.name, check.status) == ("KVTRAP_GEMMA4_KERNELS", "info")
    assert check.detail.startswith("unset/0: off")


def test_doctor_rejects_a_bad_switch_value(monkeypatch):
    from kvtrap.cli.doctor import check_gemma4_kernels

    monkeypatch.setenv("KVTRAP_GEMMA4_KERNELS", "maybe")
    (check,) = check_gemma4_kernels()
    assert check.status == "fail"
    assert check.detail == "KVTRAP_GEMMA4_KERNELS must be 1 or 0; got 'maybe'"


def test_doctor_reports_the_routes_and_the_fusions_when_on(monkeypatch):
    from kvtrap.cli.doctor import check_gemma4_kernels

    monkeypatch.setenv("KVTRAP_GEMMA4_KERNELS", "1")
    checks = {c.name: c for c in check_gemma4_kernels()}
    assert "need a CUDA GPU and Triton" in checks["KVTRAP_GEMMA4_KERNELS"].detail
    routes = checks["gemma4 routes"]
    if routes.status == "fail" and "No module named 'sgl_kernel'" in routes.detail and torch.cuda.is_available():
        pytest.skip("sglang.srt needs sgl_kernel, which is not installed here (a CUDA GPU without SGLang's full runtime)")
    assert routes.status == "ok", routes.detail
    fusions = checks["gemma4 fusions"].detail
    assert "26B-A4B-it: qkv_norm_rope, routing, triple_norm, cross_layer" in fusions
    assert "E2B-it/E4B-it: qkv_norm_rope, ple_tail, pair_norm, cross_layer" in fusions
    assert "31B-it: qkv_norm_rope, pair_norm, cross_layer" in fusions
    assert "TP>1: pair_norm, triple_norm and cross_layer fall back" in fusions
    assert "--enable-deterministic-inference: all fall back" in fusions


def test_doctor_names_the_module_of_a_missing_target(monkeypatch):
    """A method SGLang renamed (here: one 0.5.23 does not have) fails the check with its full dotted name."""
    from kvtrap.capture.patching import MethodTarget, module_function
    from kvtrap.cli.doctor import check_gemma4_kernels

    real = sglang_gemma4.targets
    fake_names = [
        MethodTarget(sglang_gemma4.MODEL_MODULE, "Gemma4DecoderLayer", "forward_renamed", lambda f: f),
        module_function(sglang_gemma4.ACCESS_MODULE, "final_norm_pair_renamed", lambda f: f),
    ]
    monkeypatch.setattr(sglang_gemma4, "targets", lambda: [*real(), *fake_names])
    monkeypatch.setenv("KVTRAP_GEMMA4_KERNELS", "1")
    routes = {c.name: c for c in check_gemma4_kernels()}["gemma4 routes"]
    if "No module named 'sgl_kernel'" in routes.detail and torch.cuda.is_available():
        pytest.skip("sglang.srt needs sgl_kernel, which is not installed here (a CUDA GPU without SGLang's full runtime)")
    assert routes.status == "fail"
    assert routes.detail == (
        "sglang.srt.models.gemma4_causal.Gemma4DecoderLayer.forward_renamed: Gemma4DecoderLayer has no method "
        "forward_renamed; sglang.srt.layers.layer_boundary.residual.access.final_norm_pair_renamed: "
        "sglang.srt.layers.layer_boundary.residual.access has no function final_norm_pair_renamed"
    )
