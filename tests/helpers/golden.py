"""Golden renderings of ``kvtrap dump show`` / ``explain`` on the sample dumps in ``dumps/samples/``.

Used by ``tests/cli/test_cli_dump_golden.py`` (compare) and ``dumps/make_samples.py`` (rewrite). Output is
rendered at the fixed non-TTY width (120, no colour); the only volatile part is the path of the sample,
replaced by ``<dump>``, and trailing spaces are stripped. Volatile manifest fields (time, host, pid,
versions) are stored in the sample itself, so they are stable.
"""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner

from kvtrap.cli.dump_cmd import dump

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "dumps" / "samples"
GOLDEN = ROOT / "tests" / "golden"

# golden file -> (verb, sample)
GOLDENS = {
    "show-sglang-26957.txt": ("show", "sglang-26957"),
    "explain-sglang-26957.txt": ("explain", "sglang-26957"),
    "show-swa-slot-out-of-range.txt": ("show", "swa-slot-out-of-range"),
    "explain-spec-rows-past-context.txt": ("explain", "spec-rows-past-context"),
    "explain-sglang-38269.txt": ("explain", "sglang-38269"),
    "explain-sglang-27779.txt": ("explain", "sglang-27779"),
    "explain-sglang-25805.txt": ("explain", "sglang-25805"),
    "explain-sglang-24394.txt": ("explain", "sglang-24394"),
    "explain-sglang-27737.txt": ("explain", "sglang-27737"),
    "explain-sglang-24402.txt": ("explain", "sglang-24402"),
}


def render(verb: str, sample: Path) -> str:
    res = CliRunner().invoke(dump, [verb, str(sample)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    text = res.stdout
    for p in {str(sample), str(sample.resolve())}:
        text = text.replace(os.path.relpath(p), "<dump>").replace(p, "<dump>")
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
