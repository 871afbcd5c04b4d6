"""Regenerate the sample dumps in ``dumps/samples/`` from real traps, and the goldens that render them.

    python dumps/make_samples.py            # rewrite dumps/samples/<name>/ and tests/golden/*.txt
    python dumps/make_samples.py NAME ...   # only those samples (and every golden)

Each sample is made by a real kvtrap trap firing on real sglang==0.5.23 objects (``tests/helpers/trapdumps.py``),
then copied to ``dumps/samples/<name>/`` (the directory *is* the dump: manifest.json +
tensors.safetensors). The goldens are ``kvtrap dump show`` / ``explain`` of those samples, as rendered
by ``tests/helpers/golden.py``, which ``tests/cli/test_cli_dump_golden.py`` compares against.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "dumps" / "samples"
GOLDEN = ROOT / "tests" / "golden"

# sample name -> trapdumps function
SCENARIOS = {
    "sglang-26957": "make_26957_dump",
    "swa-slot-out-of-range": "make_swa_slot_dump",
    "spec-rows-past-context": "make_spec_context_limit_dump",
    "sglang-38269": "make_38269_dump",
    "sglang-27779": "make_27779_dump",
    "sglang-25805": "make_25805_dump",
    "sglang-24394": "make_24394_dump",
    "sglang-27737": "make_27737_dump",
    "sglang-24402": "make_24402_dump",
}

KWARGS: dict[str, dict[str, object]] = {"sglang-26957": {"high_fill": True}}


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import trapdumps

    unknown = sorted(set(argv) - set(SCENARIOS))
    if unknown:
        print(f"unknown sample(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    SAMPLES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in SCENARIOS.items():
            if argv and name not in argv:
                continue
            made = getattr(trapdumps, fn)(Path(tmp) / name, **KWARGS.get(name, {}))
            made = Path(made[0] if isinstance(made, tuple) else made)  # (dump_path, KVTrapError)
            dst = SAMPLES / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(made, dst)
            print(f"{dst.relative_to(ROOT)}  <- {fn} ({made.name})")

    from helpers.golden import GOLDENS, render

    GOLDEN.mkdir(parents=True, exist_ok=True)
    for golden, (verb, sample) in GOLDENS.items():
        (GOLDEN / golden).write_text(render(verb, SAMPLES / sample))
        print(f"{(GOLDEN / golden).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
