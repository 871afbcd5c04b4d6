"""kvtrap's copy of the attention backends SGLang 0.5.23 starts Gemma 4 on, checked against SGLang's own source.

The list is a local variable in ``handle_model_specific_adjustments`` (sglang/srt/arg_groups/model_hook.py), so it
cannot be imported; this reads the installed file (without importing SGLang) and fails when SGLang and
:data:`kvtrap.repro.scenarios.GEMMA4_ATTENTION_BACKENDS` disagree."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from kvtrap.repro import scenarios

ROOT = Path(__file__).resolve().parents[2]
ASSERTION = "Gemma4 only supports trtllm_mha, triton, fa4, ascend, intel_xpu, intel_amx, or aiter attention backend"


def _model_hook() -> tuple[str, ast.Module]:
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs SGLang installed (pip install 'sglang==0.5.23')")
    path = Path(list(spec.submodule_search_locations)[0]) / "srt" / "arg_groups" / "model_hook.py"
    source = path.read_text()
    return source, ast.parse(source)


def _strings(node: ast.AST) -> tuple[str, ...]:
    assert isinstance(node, ast.Tuple | ast.List), ast.dump(node)
    return tuple(ast.literal_eval(e) for e in node.elts)


def _gemma4_branch() -> tuple[str, ast.If]:
    source, tree = _model_hook()
    for node in ast.walk(tree):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.ops[0], ast.In) and isinstance(node.test.comparators[0], ast.Tuple | ast.List)
                and "Gemma4ForCausalLM" in _strings(node.test.comparators[0])):  # fmt: skip
            return source, node
    raise AssertionError("model_hook.py has no `model_arch in (... 'Gemma4ForCausalLM' ...)` branch any more")


def test_the_gemma4_backend_list_is_sglangs() -> None:
    source, branch = _gemma4_branch()
    assert _strings(branch.test.comparators[0]) == scenarios.GEMMA4_ARCHITECTURES  # type: ignore[attr-defined]
    accepted = [n.value for n in branch.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "accepted_backends" for t in n.targets)]  # fmt: skip
    assert len(accepted) == 1, "the Gemma 4 branch no longer assigns accepted_backends"
    assert _strings(accepted[0]) == scenarios.GEMMA4_ATTENTION_BACKENDS
    # both phases are checked (so kvtrap checks --prefill/--decode-attention-backend too), and the words kvtrap
    # quotes in its refusal are SGLang's
    segment = "".join(ast.get_source_segment(source, n) or "" for n in branch.body if isinstance(n, ast.Assert))
    assert "prefill_backend in accepted_backends and decode_backend in accepted_backends" in segment
    assert '"Gemma4 only supports trtllm_mha, triton, fa4, ascend, intel_xpu, intel_amx, or "' in segment
    assert '"aiter attention backend, got prefill=' in segment


def test_the_refusal_quotes_what_the_h200_servers_printed() -> None:
    evidence = sorted((ROOT / "benchmarks/results/server-runs-backends-nvidia-h200").glob("*-assert.txt"))
    assert len(evidence) == 2
    for f in evidence:
        assert f"AssertionError: {ASSERTION}, got prefill=" in f.read_text()
    gemma4 = next(r for r in scenarios.BACKEND_RULES if r.family == "Gemma 4")
    line = scenarios.refusal(gemma4, {"--attention-backend": "fa3"}, "x serves y")
    assert line is not None and ASSERTION in line
    ok = {"--attention-backend": "triton", "--decode-attention-backend": "fa4"}
    assert scenarios.refusal(gemma4, ok, "x") is None
    for backend in ("fa3", "flashinfer"):
        assert backend in scenarios.ATTENTION_BACKENDS and backend not in scenarios.GEMMA4_ATTENTION_BACKENDS
