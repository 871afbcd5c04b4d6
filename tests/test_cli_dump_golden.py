"""Golden renderings of ``kvtrap dump show`` / ``explain`` on the sample dumps kept in ``dumps/samples/``.

The samples were written by real traps (``dumps/make_samples.py`` regenerates samples and goldens).
Output is rendered at the fixed non-TTY width (120, no colour); the only volatile part is the path of
the sample, replaced by ``<dump>``, and trailing spaces are stripped. Volatile manifest fields (time,
host, pid, versions) are stored in the sample itself, so they are stable.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvtrap.cli.dump_cmd import dump

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "dumps" / "samples"
GOLDEN = Path(__file__).resolve().parent / "golden"

# golden file -> (verb, sample)
GOLDENS = {
    "show-sglang-26957.txt": ("show", "sglang-26957"),
    "explain-sglang-26957.txt": ("explain", "sglang-26957"),
    "show-swa-slot-out-of-range.txt": ("show", "swa-slot-out-of-range"),
    "explain-spec-rows-past-context.txt": ("explain", "spec-rows-past-context"),
}


def render(verb: str, sample: Path) -> str:
    res = CliRunner().invoke(dump, [verb, str(sample)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    text = res.stdout
    for p in {str(sample), str(sample.resolve())}:
        text = text.replace(os.path.relpath(p), "<dump>").replace(p, "<dump>")
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


@pytest.mark.parametrize("golden", sorted(GOLDENS))
def test_golden(golden: str) -> None:
    verb, sample = GOLDENS[golden]
    if not (SAMPLES / sample).is_dir():
        pytest.fail(f"sample dump {sample} missing: run python dumps/make_samples.py")
    got = render(verb, SAMPLES / sample)
    want = (GOLDEN / golden).read_text()
    assert got == want, f"{golden} changed; if intended, run python dumps/make_samples.py and review the diff"
