"""Golden renderings of ``kvtrap dump show`` / ``explain`` on the sample dumps kept in ``dumps/samples/``.

The samples were written by real traps (``dumps/make_samples.py`` regenerates samples and goldens); the
rendering and its normalisation are in ``tests/helpers/golden.py``.
"""

from __future__ import annotations

import pytest
from helpers.golden import GOLDEN, GOLDENS, SAMPLES, render


@pytest.mark.parametrize("golden", sorted(GOLDENS))
def test_golden(golden: str) -> None:
    verb, sample = GOLDENS[golden]
    if not (SAMPLES / sample).is_dir():
        pytest.fail(f"sample dump {sample} missing: run python dumps/make_samples.py")
    got = render(verb, SAMPLES / sample)
    want = (GOLDEN / golden).read_text()
    assert got == want, f"{golden} changed; if intended, run python dumps/make_samples.py and review the diff"
