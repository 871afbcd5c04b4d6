"""The weight-free #26957 repro: its armed check and explanation on CPU; the full run on a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kvtrap
from kvtrap.config import Config
from kvtrap.record.dumpfile import load_dump
from kvtrap.report.explain import explain

torch = pytest.importorskip("torch")
from kvtrap.repro import synthetic as syn  # noqa: E402

SMALL = syn.Shape(full_pages=512, swa_pages=40, bs=3, seq_len=1000, fill=0.85)


def _check(state, fixed, tmp_path):
    syn.check(state, SMALL, Config(dump_dir=tmp_path), fixed=fixed)


def test_state_has_full_pool_ids_beyond_the_swa_pool():
    state = syn.build(SMALL, device="cpu")
    pt = state["page_table"]
    assert int(pt.min()) > SMALL.swa_pages and int(pt.max()) < SMALL.full_pages
    assert int(state["swa_page_table"].max()) <= SMALL.swa_pages


def test_armed_check_traps_and_explain_names_26957(tmp_path):
    state = syn.build(SMALL, device="cpu")
    with pytest.raises(kvtrap.KVTrapError) as info:
        _check(state, False, tmp_path)
    v = info.value.violation
    assert v.kind == "index_space_mismatch" and v.fatal and v.layer_type == "swa"
    assert SMALL.swa_pages < v.value < SMALL.full_pages + 1
    findings = explain(load_dump(info.value.dump_path))
    assert findings and findings[0].rule == "sglang-26957" and findings[0].confidence == "high"


def test_fixed_state_passes(tmp_path):
    _check(syn.build(SMALL, device="cpu"), True, tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_no_gpu_is_a_clear_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvtrap", "repro", "synthetic", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "GPU" in (proc.stdout + proc.stderr)


@pytest.mark.gpu
def test_synthetic_end_to_end_on_gpu(tmp_path):
    """Unarmed child dies with an illegal address; armed run traps, dumps and explains #26957."""
    proc = subprocess.run([sys.executable, "-m", "kvtrap", "repro", "synthetic", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "an illegal memory access was encountered" in out
    assert "sglang-26957 (high)" in out
    fixed = subprocess.run([sys.executable, "-m", "kvtrap", "repro", "synthetic", "--fix", "--out", str(tmp_path / "f")],
                           capture_output=True, text=True, timeout=600)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
