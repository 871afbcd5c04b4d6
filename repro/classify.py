"""Classify a repro run from its logs and dump directories. Pure functions: no processes, no network.

Outcomes, in the order they win:

``TRAPPED``     kvtrap stopped a bad page table: a dump was found, or a ``KVTrapError`` was logged.
``CRASHED``     a CUDA fault signature (illegal address, sanitizer report, device assert, other CUDA
                error) in the logs, or the server died while serving the benchmark.
``INTERRUPTED`` the run was stopped by Ctrl-C / SIGTERM before it could decide.
``HUNG``        the server was healthy but stopped answering: benchmark timeout, SGLang's watchdog
                timeout or a failed health check.
``UNHEALTHY``   the server never became healthy (timeout, or it exited during start-up without a CUDA
                fault), or the benchmark failed while the server stayed up.
``CLEAN``       the benchmark finished, every request succeeded, nothing trapped or crashed.

Exit codes (see :data:`EXIT_CODES`): 0 clean, 1 trapped or crashed (the bug reproduced), 3 unhealthy,
hung (no answer either way: ``git bisect run`` should treat it as "skip"), 130 interrupted. 2 is kept for
usage and environment errors, raised before anything runs.

The log formats matched below are the ones SGLang, PyTorch, FlashInfer and the CUDA tools print; each
pattern cites where the format was read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class Outcome(str, Enum):
    CLEAN = "CLEAN"
    TRAPPED = "TRAPPED"
    CRASHED = "CRASHED"
    INTERRUPTED = "INTERRUPTED"
    HUNG = "HUNG"
    UNHEALTHY = "UNHEALTHY"


EXIT_CODES: dict[Outcome, int] = {
    Outcome.CLEAN: 0,
    Outcome.TRAPPED: 1,
    Outcome.CRASHED: 1,
    Outcome.HUNG: 3,
    Outcome.UNHEALTHY: 3,
    Outcome.INTERRUPTED: 130,
}
EXIT_USAGE = 2


# ------------------------------------------------------------------------------------------ signatures
@dataclass(frozen=True)
class Signature:
    name: str
    pattern: re.Pattern[str]
    meaning: str


def _sig(name: str, pattern: str, meaning: str, flags: int = 0) -> Signature:
    return Signature(name, re.compile(pattern, flags), meaning)


#: kvtrap's own exception. Message format from ``kvtrap.record.violation.KVTrapError._message``:
#: ``kvtrap [<kind>] in <where>: ...``; SGLang logs it inside "Scheduler hit an exception: ...".
TRAP_SIGNATURES: tuple[Signature, ...] = (
    _sig("kvtrap_error", r"\bKVTrapError\b", "kvtrap raised before the kernel ran"),
    _sig("kvtrap_message", r"\bkvtrap \[(?P<kind>[a-z_]+)\]", "kvtrap violation message"),
)

#: CUDA faults. A match makes the run CRASHED (unless kvtrap trapped first).
FAULT_SIGNATURES: tuple[Signature, ...] = (
    # PyTorch's c10_cuda_check message, raised as torch.AcceleratorError (torch >= 2.8) or RuntimeError:
    # "torch.AcceleratorError: CUDA error: an illegal memory access was encountered" (e.g. vLLM #27514,
    # FlashInfer #1928 tracebacks); NCCL's watchdog repeats it ("Process group watchdog thread
    # terminated with exception: CUDA error: an illegal memory access was encountered").
    _sig("illegal_address", r"an illegal memory access was encountered", "CUDA illegal address"),
    # FlashInfer's trtllm-gen FMHA launcher checks the driver result itself (FlashInfer #1928):
    # "CUDA Error: CUDA_ERROR_ILLEGAL_ADDRESS /workspace/include/flashinfer/trtllm/fmha/fmhaKernels.cuh 257".
    _sig("illegal_address", r"CUDA_ERROR_ILLEGAL_ADDRESS|cudaErrorIllegalAddress", "CUDA illegal address"),
    # cuda-gdb on a GPU core dump ("CUDA Exception: Warp Illegal Address", FlashInfer #2704/#3722) and
    # compute-sanitizer ("========= Warp illegal address", FlashInfer #3427).
    _sig("illegal_address", r"Warp Illegal Address", "CUDA illegal address", re.IGNORECASE),
    # compute-sanitizer memcheck: "========= Invalid __global__ read of size 16 bytes".
    _sig("sanitizer_oob", r"Invalid __global__ (?:read|write) of size", "out-of-bounds access (memcheck)"),
    _sig("misaligned_address", r"CUDA error: misaligned address", "CUDA misaligned address"),
    _sig("illegal_instruction", r"an illegal instruction was encountered", "CUDA illegal instruction"),
    _sig("launch_failure", r"unspecified launch failure", "CUDA unspecified launch failure"),
    _sig("device_assert", r"device-side assert(?:ion)? triggered", "device-side assert"),
    # Anything else PyTorch reports as "CUDA error: <text>" (checked last: the names above are sharper).
    _sig("cuda_error", r"CUDA error: (?P<msg>[^\n]+)", "CUDA error"),
)

#: The server stopped answering without a CUDA fault.
HANG_SIGNATURES: tuple[Signature, ...] = (
    # sglang/srt/utils/watchdog.py: logger.error(f"{self.debug_name} watchdog timeout (...)").
    _sig("watchdog_timeout", r"watchdog timeout \(", "SGLang watchdog: a forward step took too long"),
    # sglang/srt/entrypoints/http_server.py health_generate():
    # "Health check failed. Server couldn't get a response from detokenizer for last ... seconds."
    _sig("health_check_failed", r"Health check failed\. Server couldn't get a response", "health check failed"),
)

#: Context lines (reported, never decisive on their own).
CONTEXT_SIGNATURES: tuple[Signature, ...] = (
    # sglang/srt/managers/scheduler.py: logger.error(f"Scheduler hit an exception: {traceback}").
    _sig("scheduler_exception", r"Scheduler hit an exception", "a scheduler process raised"),
    # sglang/srt/entrypoints/engine.py and tokenizer_manager.py SIGQUIT handlers.
    _sig("child_failed", r"Received sigquit from a child process|SIGQUIT received\..*one child failed", "a child failed"),
    _sig("cuda_oom", r"CUDA out of memory|torch\.OutOfMemoryError", "CUDA out of memory"),
    _sig("graph_capture", r"operation not permitted when stream is capturing", "host sync during graph capture"),
)

# Kernel names. Where a kernel's name can appear in a log:
_KERNEL_PATTERNS: tuple[re.Pattern[str], ...] = (
    # compute-sanitizer: "=========     at fmhaSm100fKernel_...+0x1a0" / "at 0x000001a0 in my_kernel" /
    # "at add(const float *, ...)+0x80 in file.cu:16".
    re.compile(r"^=+\s+at\s+(?:0x[0-9a-fA-F]+\s+in\s+)?(?:void\s+)?(?P<k>[A-Za-z_][\w:]*)", re.M),
    # cuda-gdb on a core dump: "The exception was triggered at PC 0x7f42b04321a0  void ns::kernel<...>(...)".
    re.compile(r"triggered at PC 0x[0-9a-fA-F]+\s+(?:void\s+)?(?P<k>[A-Za-z_][\w:]*)"),
    # cuda-gdb frame: "#0  0x00007ff9ac5f8fa0 in void flash_bwd_kernel<...>(Flash_bwd_params)<<<...>>> ()".
    re.compile(r"#0\s+0x[0-9a-fA-F]+\s+in\s+(?:void\s+)?(?P<k>[A-Za-z_][\w:]*)"),
    # As SGLang #26957 quotes it: "in fmhaSm100fKernel_*SlidingOrChunkedCausal*" (trtllm-gen cubin names
    # start with fmhaSm<arch>); XQA (sm90 decode) and fmha_v2 (sm90 prefill) kernels by their prefixes.
    re.compile(r"\b(?P<k>fmhaSm\d+\w*Kernel\w*|fmha_v2_\w+|xqa_kernel\w*|kernel_mha\w*)"),
)

# FlashInfer's own CUDA check names the source file and line: "... CUDA_ERROR_ILLEGAL_ADDRESS <file> <line>".
_SOURCE_SITE = re.compile(r"CUDA_ERROR_\w+\s+(?P<file>\S+\.(?:cuh|cu|h|cpp))\s+(?P<line>\d+)")
# Python traceback frames: '  File "/x/trtllm_mha_backend.py", line 812, in forward_decode'.
_PY_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>[\w<>.]+)')
# A raised exception's last line: "torch.AcceleratorError: CUDA error: ...", "RuntimeError: CUDA error: ...".
_PY_EXC = re.compile(r"^\s*(?:\[[^\]]*\]\s*)?[A-Za-z_][\w.]*(?:Error|Exception):\s")
# SGLang's log prefix carries the rank: "[2026-06-01 10:00:00 TP0] ..." (also "DP0 TP0", "TP0 EP0").
_RANK_PREFIX = re.compile(r"^\[[^\]]*?\b(?P<rank>(?:DP\d+ )?TP\d+(?: EP\d+)?)\]")


@dataclass(frozen=True)
class Match:
    name: str
    meaning: str
    line_no: int  # 1-based line number in the text searched
    line: str
    log: str  # which log it came from ("server", "bench", ...)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "meaning": self.meaning, "line_no": self.line_no, "line": self.line, "log": self.log}


def find_signatures(text: str, signatures: Sequence[Signature], log: str = "server") -> list[Match]:
    """Every line of ``text`` that matches one of ``signatures`` (first matching signature per line)."""
    out: list[Match] = []
    for i, line in enumerate(text.splitlines(), start=1):
        for sig in signatures:
            if sig.pattern.search(line):
                out.append(Match(sig.name, sig.meaning, i, line.strip()[:500], log))
                break
    return out


def _with_template_args(text: str, end: int) -> str:
    """The template argument list starting at ``text[end]`` (balanced ``<...>``), or ''."""
    if end >= len(text) or text[end] != "<":
        return ""
    depth = 0
    for i in range(end, min(len(text), end + 2000)):
        ch = text[i]
        if ch == "\n":
            return ""
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
            if depth == 0:
                return text[end : i + 1]
    return ""


def kernel_name(text: str) -> str | None:
    """The faulting kernel's name when a log printed one (sanitizer, cuda-gdb, or a known kernel family).

    C++ template arguments are kept (balanced ``<...>``); the parameter list is dropped.
    """
    for pat in _KERNEL_PATTERNS:
        m = pat.search(text)
        if m:
            name = m.group("k").strip()
            if name:
                return (name + _with_template_args(text, m.end("k")))[:400]
    return None


def crash_site(text: str) -> dict[str, Any]:
    """Where the fault surfaced: FlashInfer's source check and the last Python frame before the error."""
    site: dict[str, Any] = {}
    m = _SOURCE_SITE.search(text)
    if m:
        site["source"] = f"{m.group('file')}:{m.group('line')}"
    lines = text.splitlines()
    faults = [i for i, line in enumerate(lines) if any(sig.pattern.search(line) for sig in FAULT_SIGNATURES)]
    if faults:
        # The Python frame above the raised exception ("torch.AcceleratorError: CUDA error: ..."), else
        # above the first fault line of any kind.
        raised = [i for i in faults if _PY_EXC.match(lines[i])]
        anchor = raised[0] if raised else faults[0]
        for line in reversed(lines[max(0, anchor - 200) : anchor]):
            fm = _PY_FRAME.search(line)
            if fm:
                site["python"] = f"{fm.group('file')}:{fm.group('line')} in {fm.group('func')}"
                break
        for line in reversed(lines[max(0, anchor - 200) : anchor + 1]):  # the log line that opened the traceback
            rm = _RANK_PREFIX.search(line)
            if rm:
                site["rank"] = rm.group("rank")
                break
    return site


# --------------------------------------------------------------------------------------------- metrics
# sglang/benchmark/serving.py (0.5.23) prints "{:<40} {:<10.2f}".format("Mean TTFT (ms):", value) under
# "============ Serving Benchmark Result ============"; same labels since sglang.bench_serving 0.2.
_BENCH_LABELS: dict[str, str] = {
    "Successful requests": "completed",
    "Benchmark duration (s)": "duration_s",
    "Total input tokens": "total_input_tokens",
    "Total generated tokens": "total_output_tokens",
    "Request throughput (req/s)": "request_throughput",
    "Input token throughput (tok/s)": "input_throughput",
    "Output token throughput (tok/s)": "output_throughput",
    "Peak output token throughput (tok/s)": "peak_output_throughput",
    "Total token throughput (tok/s)": "total_throughput",
    "Concurrency": "concurrency",
    "Accept length": "accept_length",
    "Mean E2E Latency (ms)": "mean_e2e_latency_ms",
    "Median E2E Latency (ms)": "median_e2e_latency_ms",
    "Mean TTFT (ms)": "mean_ttft_ms",
    "Median TTFT (ms)": "median_ttft_ms",
    "P99 TTFT (ms)": "p99_ttft_ms",
    "Mean TPOT (ms)": "mean_tpot_ms",
    "Median TPOT (ms)": "median_tpot_ms",
    "P99 TPOT (ms)": "p99_tpot_ms",
    "Mean ITL (ms)": "mean_itl_ms",
    "Median ITL (ms)": "median_itl_ms",
    "P99 ITL (ms)": "p99_itl_ms",
}
_BENCH_LINE = re.compile(
    r"^(?P<label>" + "|".join(re.escape(k) for k in _BENCH_LABELS) + r"):\s+(?P<value>-?\d+(?:\.\d+)?)\s*$", re.M
)

# sglang/srt/managers/scheduler_components/metrics_reporter.py + pool_stats_observer.py:
# "Decode batch, #running-req: 64, #full token: 81234, full token usage: 0.42, #swa token: 9000,
#  swa token usage: 0.85, accept len: 3.12, accept rate: 0.71, ..." (hybrid-SWA models).
_DECODE_FIELD = re.compile(r"(?P<key>full token usage|swa token usage|token usage|accept len): (?P<v>\d+(?:\.\d+)?)")


def bench_metrics(text: str) -> dict[str, float]:
    """Metrics from ``sglang.bench_serving``'s result table (the last table wins if there are several)."""
    out: dict[str, float] = {}
    for m in _BENCH_LINE.finditer(text):
        out[_BENCH_LABELS[m.group("label")]] = float(m.group("value"))
    return out


def server_metrics(text: str) -> dict[str, float]:
    """Peak pool usage and the last speculative accept length from SGLang's decode log lines."""
    out: dict[str, float] = {}
    decode_lines = 0
    for line in text.splitlines():
        if "Decode batch" not in line:
            continue
        decode_lines += 1
        for m in _DECODE_FIELD.finditer(line):
            key, v = m.group("key"), float(m.group("v"))
            if key == "accept len":
                out["last_decode_accept_len"] = v
            else:
                name = "max_" + key.replace(" ", "_")
                out[name] = max(out.get(name, 0.0), v)
    if decode_lines:
        out["decode_log_lines"] = float(decode_lines)
    return out


# ----------------------------------------------------------------------------------------------- dumps
def summarize_dumps(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """One line of facts per dump directory (manifest only, no tensors). Unreadable dumps say why."""
    from kvtrap.record.dumpfile import DumpError, load_dump

    out: list[dict[str, Any]] = []
    for p in paths:
        entry: dict[str, Any] = {"path": str(p)}
        try:
            d = load_dump(p, tensors=False)
        except DumpError as exc:
            entry["error"] = str(exc)
        else:
            rec, v = d.record, d.violation
            entry.update(
                kind=d.kind,
                summary=v.summary,
                where=v.where,
                layer_id=v.layer_id,
                layer_type=v.layer_type,
                fatal=v.fatal,
                time_iso=rec.time_iso,
                pid=rec.pid,
                rank=rec.rank,
            )
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------ the verdict
@dataclass(frozen=True)
class RunFacts:
    """What the runner observed, besides the logs."""

    healthy: bool = False  # /health answered 200 at least once
    health_timed_out: bool = False
    server_exit_code: int | None = None  # None: still running when the runner stopped it
    server_exited_early: bool = False  # the server exited on its own (not stopped by the runner)
    bench_exit_code: int | None = None  # None: never started, or killed by the runner
    bench_timed_out: bool = False
    interrupted: bool = False
    expected_requests: int | None = None
    error: str | None = None  # a component callable's exception text, or a runner-side error


@dataclass(frozen=True)
class Classification:
    outcome: Outcome
    reason: str
    exit_code: int
    kernel: str | None = None
    site: dict[str, Any] = field(default_factory=dict)
    trap_kinds: tuple[str, ...] = ()
    matches: tuple[Match, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "kernel": self.kernel,
            "site": self.site,
            "trap_kinds": list(self.trap_kinds),
            "matches": [m.to_json() for m in self.matches[:50]],
            "metrics": self.metrics,
        }


def _signal_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def scheduler_exception(text: str) -> str | None:
    """What the first "Scheduler hit an exception" traceback raised, and where: ``AssertionError at swa.py:665
    in free_group_end``. Used when a server died without a CUDA fault or a trap (SGLang's own asserts, a missing
    kernel package), so the report names the exception instead of only the signal SGLang's teardown sent."""
    at = text.find("Scheduler hit an exception")
    if at < 0:
        return None
    frame: re.Match[str] | None = None
    for line in text[at:].splitlines()[1:200]:
        f = _PY_FRAME.search(line)
        if f:
            frame = f
            continue
        body = line.strip()
        if frame is None or not body or line[:1].isspace() or body.startswith("Traceback") or set(body) <= set("^~ "):
            continue
        where = f" at {Path(frame['file']).name}:{frame['line']} in {frame['func']}"
        return f"{body[:200]}{where}"
    return None


def classify(
    logs: dict[str, str],
    dumps: Sequence[Path] = (),
    facts: RunFacts | None = None,
) -> Classification:
    """Decide the outcome of a run. ``logs`` maps a log's name (``server``, ``bench``...) to its text."""
    facts = facts or RunFacts()
    all_text = "\n".join(logs.values()) + ("\n" + facts.error if facts.error else "")
    matches: list[Match] = []
    for name, text in logs.items():
        matches += find_signatures(text, TRAP_SIGNATURES + FAULT_SIGNATURES + HANG_SIGNATURES + CONTEXT_SIGNATURES, name)
    if facts.error:
        matches += find_signatures(facts.error, TRAP_SIGNATURES + FAULT_SIGNATURES, "error")
    trap_names = {s.name for s in TRAP_SIGNATURES}
    fault_names = {s.name for s in FAULT_SIGNATURES}
    hang_names = {s.name for s in HANG_SIGNATURES}
    traps = [m for m in matches if m.name in trap_names]
    faults = [m for m in matches if m.name in fault_names]
    hangs = [m for m in matches if m.name in hang_names]

    metrics = bench_metrics(logs.get("bench", ""))
    metrics.update(server_metrics(logs.get("server", "")))
    trap_kinds = tuple(sorted({k for k in re.findall(r"\bkvtrap \[([a-z_]+)\]", all_text)}))

    def done(outcome: Outcome, reason: str, **kw: Any) -> Classification:
        return Classification(outcome, reason, EXIT_CODES[outcome], matches=tuple(matches), metrics=metrics,
                              trap_kinds=trap_kinds, **kw)  # fmt: skip

    if dumps or traps:
        what = f"{len(dumps)} kvtrap dump(s) written" if dumps else "kvtrap raised (no dump found)"
        if trap_kinds:
            what += f"; violation: {', '.join(trap_kinds)}"
        return done(Outcome.TRAPPED, what, kernel=None, site=crash_site(all_text) if faults else {})
    if faults:
        # Headline: the sharpest signature (earliest in FAULT_SIGNATURES), then the earliest line.
        order = {s.name: i for i, s in enumerate(FAULT_SIGNATURES)}
        first = min(faults, key=lambda m: (order[m.name], m.log != "server", m.line_no))
        kern = kernel_name(all_text)
        reason = f"{first.meaning}: {first.line}"
        if kern:
            reason += f" (kernel {kern})"
        return done(Outcome.CRASHED, reason, kernel=kern, site=crash_site(all_text))
    if facts.interrupted:
        return done(Outcome.INTERRUPTED, "interrupted (Ctrl-C or SIGTERM) before the run finished")
    if hangs:
        return done(Outcome.HUNG, f"{hangs[0].meaning}: {hangs[0].line}")
    if facts.bench_timed_out:
        return done(Outcome.HUNG, "the benchmark did not finish within its timeout while the server was up")
    if not facts.healthy:
        if facts.health_timed_out:
            return done(Outcome.UNHEALTHY, "the server did not answer /health with 200 within the timeout")
        if facts.server_exited_early:
            ctx = [m for m in matches if m.name == "cuda_oom"]
            raised = scheduler_exception(all_text)
            extra = f" ({ctx[0].line})" if ctx else f": the scheduler raised {raised}" if raised else ""
            return done(Outcome.UNHEALTHY, f"the server exited during start-up ({_signal_text(facts.server_exit_code)}){extra}")
        if facts.error:
            return done(Outcome.UNHEALTHY, f"the run failed: {facts.error.strip().splitlines()[-1][:300]}")
        return done(Outcome.UNHEALTHY, "the server never became healthy")
    if facts.server_exited_early:
        raised = scheduler_exception(all_text)
        said = f": the scheduler raised {raised}" if raised else ""
        return done(
            Outcome.CRASHED,
            f"the server died during the benchmark ({_signal_text(facts.server_exit_code)}){said}; no CUDA error was "
            "logged",
        )
    if facts.error:
        return done(Outcome.UNHEALTHY, f"the run failed: {facts.error.strip().splitlines()[-1][:300]}")
    if facts.bench_exit_code not in (0, None):
        return done(Outcome.UNHEALTHY, f"the benchmark failed ({_signal_text(facts.bench_exit_code)})")
    completed = metrics.get("completed")
    if facts.expected_requests is not None:
        if completed is None:
            return done(Outcome.UNHEALTHY, "the benchmark printed no result table")
        if int(completed) < facts.expected_requests:
            return done(
                Outcome.UNHEALTHY,
                f"only {int(completed)} of {facts.expected_requests} requests succeeded while the server stayed up",
            )
    return done(Outcome.CLEAN, "the workload finished; no trap, no CUDA error")
