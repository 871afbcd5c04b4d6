"""Greedy output probes: the same random-id prompts sent to a server, one at a time, and the token ids it
generates, so two runs (unarmed vs armed, bug fixed vs clean, kernels on vs off) can be compared token by token.

Prompts go one by one (concurrency 1) so that every request runs alone in its batch: the same kernels with
the same shapes run for it in every run, and a difference means the runs computed something different, not
that the scheduler batched them differently. ``ignore_eos`` keeps every output at full length.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROBE_FILE = "outputs.json"
PROBE_SCHEMA = "kvtrap.repro.outputs"


@dataclass(frozen=True)
class ProbeSpec:
    prompts: int = 8
    input_len: int = 256
    output_len: int = 64
    seed: int = 1
    first_id: int = 4  # ids below are the dummy tokenizer's specials (pad, eos, bos, unk)
    vocab: int = 262144

    def prompt_ids(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed)
        for _ in range(self.prompts):
            yield [rng.randrange(self.first_id, self.vocab) for _ in range(self.input_len)]

    def failed(self, probe: dict[str, Any]) -> list[str]:
        """The errors of the prompts that got no output (empty: every prompt answered)."""
        return [f"prompt {o['prompt']}: {o.get('error')}" for o in probe["outputs"] if o.get("output_ids") is None]

    def to_json(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "input_len": self.input_len, "output_len": self.output_len,
                "seed": self.seed, "first_id": self.first_id, "vocab": self.vocab}  # fmt: skip


#: Two runs whose greedy picks swap their top two candidates where those lie closer than this (in log-probability,
#: i.e. logit difference) differ by rounding, not by what they compute: bf16 keeps 8 significant bits, so a logit
#: of magnitude ~5 moves by up to ~0.02 when the same sum is reduced in another order (fused vs unfused kernels).
NEAR_TIE_NATS = 0.02


@dataclass(frozen=True)
class Generated:
    ids: list[int]
    margins: list[float | None] | None  # per position: log-probability of the pick minus the runner-up's
    runner_up: list[int | None] | None  # per position: the second candidate's id


def _top2(meta: Any, n: int) -> tuple[list[float | None], list[int | None]] | None:
    """Margins and runner-ups from SGLang's ``meta_info.output_top_logprobs`` (per position a list of
    ``[logprob, token_id, text]``, best first); None when the answer has no such list of ``n`` positions."""
    tops = meta.get("output_top_logprobs") if isinstance(meta, dict) else None
    if not isinstance(tops, list) or len(tops) != n:
        return None
    margins: list[float | None] = []
    runner: list[int | None] = []
    for pos in tops:
        ok = (isinstance(pos, list) and len(pos) >= 2 and all(isinstance(c, list) and len(c) >= 2 for c in pos[:2])
              and all(isinstance(c[0], (int, float)) and isinstance(c[1], int) for c in pos[:2]))  # fmt: skip
        margins.append(float(pos[0][0]) - float(pos[1][0]) if ok else None)
        runner.append(pos[1][1] if ok else None)
    return margins, runner


def generate(base_url: str, input_ids: Sequence[int], output_len: int, timeout_s: float = 300.0,
             top2: bool = True) -> Generated:  # fmt: skip
    """One greedy request to SGLang's native ``/generate``: the generated token ids, and (``top2``) per position
    how far the pick led its runner-up (``top_logprobs_num`` 2; only read, the greedy pick is the same argmax)."""
    body: dict[str, Any] = {
        "input_ids": list(input_ids),
        "sampling_params": {"temperature": 0.0, "max_new_tokens": output_len, "ignore_eos": True},
    }
    if top2:
        body.update(return_logprob=True, top_logprobs_num=2)
    req = urllib.request.Request(f"{base_url}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout_s) as resp:
        out = json.loads(resp.read())
    ids = out.get("output_ids") if isinstance(out, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"/generate answered without a list of output_ids: {str(out)[:200]}")
    top = _top2(out.get("meta_info"), len(ids))
    return Generated(ids, top[0] if top else None, top[1] if top else None)


def run_probe(base_url: str, spec: ProbeSpec, timeout_s: float = 300.0,
              alive: Callable[[], bool] = lambda: True) -> dict[str, Any]:  # fmt: skip
    """Send every prompt in order within ``timeout_s`` in all; a failed request is recorded (``error``) and the
    rest still go, unless ``alive()`` says the server is gone or the time is up (the remaining prompts are then
    recorded as not sent)."""
    import time

    deadline = time.monotonic() + timeout_s
    outputs: list[dict[str, Any]] = []
    top2 = True
    for i, ids in enumerate(spec.prompt_ids()):
        left = deadline - time.monotonic()
        if not alive() or left <= 0:
            why = "the server had exited" if not alive() else f"the probe's {timeout_s:g} s were up"
            outputs.append({"prompt": i, "output_ids": None, "error": f"not sent: {why}"})
            continue
        try:
            try:
                got = generate(base_url, ids, spec.output_len, left, top2=top2)
            except urllib.error.HTTPError:
                if not top2:
                    raise
                # a server that refuses log-probs (some speculative modes) still answers plain greedy requests:
                # drop the margins for this probe rather than the outputs
                top2 = False
                got = generate(base_url, ids, spec.output_len, max(deadline - time.monotonic(), 1.0), top2=False)
            entry: dict[str, Any] = {"prompt": i, "output_ids": got.ids}
            if got.margins is not None:
                entry.update(margins=got.margins, runner_up=got.runner_up)
            outputs.append(entry)
        except (OSError, ValueError, urllib.error.URLError) as exc:
            outputs.append({"prompt": i, "output_ids": None, "error": f"{type(exc).__name__}: {exc}"})
    return {"schema": PROBE_SCHEMA, "spec": spec.to_json(), "outputs": outputs}


def write_probe(run_dir: Path, data: dict[str, Any]) -> Path:
    path = Path(run_dir) / PROBE_FILE
    path.write_text(json.dumps(data) + "\n", encoding="utf-8")
    return path


class ProbeError(ValueError):
    """An outputs file that cannot be compared (missing, unreadable, not a probe, different prompts)."""


def load_probe(path: Path | str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / PROBE_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProbeError(f"{p}: no such file (was the run started with --probe N?)") from None
    except OSError as exc:
        raise ProbeError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ProbeError(f"{p}: not JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict) or data.get("schema") != PROBE_SCHEMA or not isinstance(data.get("outputs"), list):
        raise ProbeError(f"{p}: not a kvtrap outputs file (schema {PROBE_SCHEMA!r})")
    spec = data.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("prompts"), int) or isinstance(spec["prompts"], bool):
        raise ProbeError(f"{p}: the probe's spec is missing or malformed")
    outs = data["outputs"]
    if not outs:
        raise ProbeError(f"{p}: no prompts to compare")
    if len(outs) != spec["prompts"]:
        raise ProbeError(f"{p}: {len(outs)} outputs for a probe of {spec['prompts']} prompts")
    for i, o in enumerate(outs):
        ids = o.get("output_ids") if isinstance(o, dict) else None
        ok_ids = ids is None or isinstance(ids, list) and all(type(t) is int for t in ids)
        if not isinstance(o, dict) or o.get("prompt") != i or not ok_ids or not _ok_top2(o, ids):
            raise ProbeError(f"{p}: malformed output entry {i}: {str(o)[:80]}")
    return data


def _ok_top2(o: dict[str, Any], ids: list[int] | None) -> bool:
    """Margins and runner-ups are optional (older files, servers that return none); if there, one per id."""
    m, r = o.get("margins"), o.get("runner_up")
    if m is None and r is None:
        return True
    if ids is None or not isinstance(m, list) or not isinstance(r, list) or not len(m) == len(r) == len(ids):
        return False
    nums = all(x is None or type(x) in (int, float) for x in m)
    return nums and all(x is None or type(x) is int for x in r)


def _has_top2(o: dict[str, Any], n: int) -> bool:
    m, r = o.get("margins"), o.get("runner_up")
    return m is not None and r is not None and n < len(m) and m[n] is not None and r[n] is not None


def _swap_margin(oa: dict[str, Any], ob: dict[str, Any], n: int) -> float | None:
    """At a first difference at position ``n`` that both runs recorded top-2 log-probs for: the smaller margin
    over which they swapped their top two candidates (each run's pick is the other's runner-up there), or None
    when they did not swap."""
    if oa["runner_up"][n] != ob["output_ids"][n] or ob["runner_up"][n] != oa["output_ids"][n]:
        return None
    return min(float(oa["margins"][n]), float(ob["margins"][n]))


@dataclass(frozen=True)
class Comparison:
    prompts: int
    exact: int  # prompts whose whole output matched
    failed: int  # prompts without output in either run
    first_divergence: tuple[int, int] | None  # (prompt, token position) of the earliest mismatch
    matched_tokens: int  # tokens equal before each prompt's first mismatch, summed
    total_tokens: int
    # per differing prompt (in prompt order): the swap margin at its first difference (see _swap_margin), or None
    swap_margins: tuple[float | None, ...] = ()
    judged: int = 0  # differing prompts whose first difference both runs recorded top-2 log-probs for

    @property
    def near_ties(self) -> int:
        """Differing prompts whose first difference swaps the runs' top two candidates closer than NEAR_TIE_NATS."""
        return sum(1 for m in self.swap_margins if m is not None and m < NEAR_TIE_NATS)

    @property
    def identical(self) -> bool:
        return self.exact == self.prompts and self.failed == 0

    def to_json(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "exact": self.exact, "failed": self.failed,
                "exact_match_rate": self.exact / self.prompts if self.prompts else None,
                "first_divergence": list(self.first_divergence) if self.first_divergence else None,
                "matched_tokens": self.matched_tokens, "total_tokens": self.total_tokens,
                "identical": self.identical, "differing": len(self.swap_margins),
                "swap_margins": list(self.swap_margins), "near_ties": self.near_ties, "judged": self.judged,
                "near_tie_nats": NEAR_TIE_NATS}  # fmt: skip


def compare(a: dict[str, Any], b: dict[str, Any]) -> Comparison:
    if a.get("spec") != b.get("spec"):
        raise ProbeError(f"the runs probed different prompts: {a.get('spec')} vs {b.get('spec')}")
    exact = failed = matched = total = 0
    first: tuple[int, int] | None = None
    swaps: list[float | None] = []
    judged = 0
    if len(a["outputs"]) != len(b["outputs"]):
        raise ProbeError(f"the runs hold {len(a['outputs'])} and {len(b['outputs'])} outputs")
    pairs = list(zip(a["outputs"], b["outputs"], strict=True))
    for i, (oa, ob) in enumerate(pairs):
        xa, xb = oa.get("output_ids"), ob.get("output_ids")
        if xa is None or xb is None:
            failed += 1
            continue
        total += max(len(xa), len(xb))
        n = 0
        while n < min(len(xa), len(xb)) and xa[n] == xb[n]:
            n += 1
        matched += n
        if xa == xb:
            exact += 1
            continue
        both = n < min(len(xa), len(xb)) and _has_top2(oa, n) and _has_top2(ob, n)
        judged += both
        swaps.append(_swap_margin(oa, ob, n) if both else None)
        if first is None or n < first[1]:
            first = (i, n)
    return Comparison(len(pairs), exact, failed, first, matched, total, tuple(swaps), judged)
