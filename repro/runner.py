"""Run a repro scenario: start the SGLang server, wait for health, drive the benchmark, classify, report.

The server and the benchmark each run in their own session (``start_new_session=True``), so each is a
process group the runner owns: SGLang's scheduler, detokenizer and any helper processes are in the
server's group. Whatever happens (normal end, an exception, a timeout, Ctrl-C or SIGTERM to the runner)
the runner ends both groups: SIGTERM to the group, then SIGKILL after a grace period. A process that
calls ``setsid()`` itself would escape; SGLang 0.5.23 does not.

Command builders are parameters so that tests can swap SGLang for short-lived stand-in processes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kvtrap.repro.classify import EXIT_USAGE, Classification, Outcome, RunFacts, classify, summarize_dumps
from kvtrap.repro.models import AnyDummyModel, ModelDirs
from kvtrap.repro.probe import ProbeSpec
from kvtrap.repro.scenarios import (
    BACKEND_RULES,
    EAGER_ARGS,
    ComponentContext,
    ComponentResult,
    Scenario,
    refusal,
    with_attention_backend,
)

HOST = "127.0.0.1"
ENV_ARM = "SGLANG_TRTLLM_MHA_DEBUG"  # same name as kvtrap.config.ENV_ARM; kept literal for --dry-run


class EnvironmentProblem(Exception):
    """The machine cannot run this scenario (no GPU, SGLang missing, model path missing). Exit code 2."""

    exit_code = EXIT_USAGE


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the runner."""


# --------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class RunOptions:
    scenario: Scenario
    out_dir: Path | None = None  # the run directory; default runs/<scenario>-<UTC stamp>
    eager: bool = False  # no CUDA graphs (kvtrap's host checks then see every step)
    inject: tuple[str, ...] = ()  # KVTRAP_INJECT
    fix: bool | None = None  # True: KVTRAP_FIX=auto, False: KVTRAP_FIX=off, None: leave unset
    model_path: str | None = None  # overrides the scenario's target model
    draft_model_path: str | None = None  # overrides the scenario's draft model
    extra_server_args: tuple[str, ...] = ()  # appended last, so they override the scenario's flags
    port: int | None = None  # default: a free loopback port
    health_timeout_s: float = 1800.0  # download + load + CUDA-graph capture of a 31B model can be long
    bench_timeout_s: float = 3600.0
    grace_s: float = 20.0  # SIGTERM -> SIGKILL
    server_gone_grace_s: float = 30.0  # how long the benchmark may go on after the server died
    python: str = sys.executable
    follow: bool = True  # echo the logs while running
    base_env: Mapping[str, str] | None = None  # default: os.environ
    armed: bool = True  # False: SGLANG_TRTLLM_MHA_DEBUG=0 (KVTRAP_INJECT still re-introduces the bug, untrapped)
    mode: str | None = None  # KVTRAP_MODE (raise|log); None: kvtrap's default (raise)
    dummy: AnyDummyModel | None = None  # weight-free model dirs written into the run dir, --load-format dummy
    probe: ProbeSpec | None = None  # greedy prompts sent one by one before the benchmark (outputs.json)
    attention_backend: str | None = None  # replaces the scenario's --attention-backend (None: the scenario's)


CommandBuilder = Callable[[Scenario, RunOptions, int, Path], list[str]]


def dummy_dirs(options: RunOptions, run_dir: Path) -> ModelDirs | None:
    """Where a ``--dummy-weights`` run's model dirs go: ``<run dir>/models/{target,draft}`` (no draft for a model
    without one)."""
    if options.dummy is None:
        return None
    draft = run_dir / "models" / "draft" if options.dummy.has_draft else None
    return ModelDirs(run_dir / "models" / "target", draft, options.dummy)


def default_server_cmd(scenario: Scenario, options: RunOptions, port: int, run_dir: Path) -> list[str]:
    dirs = dummy_dirs(options, run_dir)
    model = options.model_path or (dirs.target if dirs else scenario.model)
    draft = options.draft_model_path or (dirs.draft if dirs else scenario.draft_model)
    cmd = [options.python, "-m", "sglang.launch_server", "--model-path", str(model)]
    if draft:
        cmd += ["--speculative-draft-model-path", str(draft)]
    server_args = scenario.server_args
    if options.attention_backend is not None:
        server_args = with_attention_backend(server_args, options.attention_backend)
    cmd += list(server_args)
    if dirs is not None:
        cmd += ["--load-format", "dummy"]  # SGLang initialises the weights itself; nothing is downloaded
        given = {a.split("=", 1)[0] for a in [*cmd, *options.extra_server_args]}
        extra = dirs.model.server_args  # flags the weight-free model needs (e.g. GPT-OSS's MoE runner)
        for flag, value in zip(extra[::2], extra[1::2], strict=True):
            if flag not in given:
                cmd += [flag, value]
    if options.eager:
        for flag, value in zip(EAGER_ARGS[::2], EAGER_ARGS[1::2], strict=True):
            if flag not in cmd:  # the scenario may already pass one of them (e4b: prefill graphs off)
                cmd += [flag, value]
    cmd += ["--host", HOST, "--port", str(port)]
    cmd += list(options.extra_server_args)
    return cmd


def default_bench_cmd(scenario: Scenario, options: RunOptions, port: int, run_dir: Path) -> list[str]:
    w = scenario.workload
    assert w is not None
    # `python -m sglang.bench_serving` (a deprecated alias of sglang.benchmark.serving in 0.5.23, kept
    # because older releases only have this path). random-ids needs no dataset download.
    return [
        options.python, "-m", "sglang.bench_serving",
        "--backend", "sglang",
        "--host", HOST, "--port", str(port),
        "--dataset-name", "random-ids",
        "--random-input-len", str(w.input_len),
        "--random-output-len", str(w.output_len),
        "--random-range-ratio", str(w.range_ratio),
        "--num-prompts", str(w.num_prompts),
        "--max-concurrency", str(w.max_concurrency),
        "--request-rate", w.request_rate,
        "--seed", str(w.seed),
        "--output-file", str(run_dir / "bench.jsonl"),
        "--disable-tqdm",
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Plan:
    scenario: Scenario
    run_dir: Path
    dump_dir: Path
    port: int
    env_changes: dict[str, str]  # on top of the base environment, for the server (and the component)
    server_cmd: tuple[str, ...] = ()
    bench_cmd: tuple[str, ...] = ()
    models: ModelDirs | None = None  # weight-free model dirs the run writes before starting the server

    @property
    def health_url(self) -> str:
        return f"http://{HOST}:{self.port}/health"

    def shell(self) -> str:
        """The run as shell commands a person can paste."""
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.env_changes.items()]
        if self.models is not None:
            m = self.models
            lines.append(f"kvtrap repro models write {shlex.quote(str(m.target.parent))} --variant {m.model.name}"
                         f" --layers {m.model.layers}")
        if self.scenario.kind == "server":
            lines.append(shlex.join(self.server_cmd) + " &")
            lines.append(f"# wait until {self.health_url} answers 200, then:")
            lines.append(shlex.join(self.bench_cmd))
        else:
            comp = self.scenario.component
            lines.append(f"# in-process: {getattr(comp, '__module__', '?')}.{getattr(comp, '__qualname__', comp)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.name,
            "run_dir": str(self.run_dir),
            "dump_dir": str(self.dump_dir),
            "port": self.port,
            "health_url": self.health_url,
            "env": dict(self.env_changes),
            "server_cmd": list(self.server_cmd),
            "bench_cmd": list(self.bench_cmd),
            "models": None if self.models is None else self.models.to_json(),
            "shell": self.shell(),
        }


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_run_dir(scenario: Scenario) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path("runs") / f"{scenario.name}-{stamp}"


def kvtrap_env(options: RunOptions, dump_dir: Path, base: Mapping[str, str]) -> dict[str, str]:
    """The variables the run sets for SGLang (and a component): arm kvtrap, dump into the run dir."""
    env = {ENV_ARM: "1" if options.armed else "0", "KVTRAP_DUMP_DIR": str(dump_dir)}
    if options.mode is not None:
        env["KVTRAP_MODE"] = options.mode
    if options.inject:
        env["KVTRAP_INJECT"] = ",".join(options.inject)
    if options.fix is not None:
        env["KVTRAP_FIX"] = "auto" if options.fix else "off"
    plugins = base.get("SGLANG_PLUGINS", "").strip()
    if plugins and "kvtrap" not in [p.strip() for p in plugins.split(",")]:
        env["SGLANG_PLUGINS"] = plugins + ",kvtrap"  # a whitelist without kvtrap would silently disarm it
    env["PYTHONUNBUFFERED"] = "1"
    no_proxy = [p for p in base.get("NO_PROXY", base.get("no_proxy", "")).split(",") if p]
    for h in (HOST, "localhost"):
        if h not in no_proxy:
            no_proxy.append(h)
    env["NO_PROXY"] = env["no_proxy"] = ",".join(no_proxy)  # loopback never through an HTTP proxy
    return env


def build_plan(
    options: RunOptions,
    *,
    server_cmd: CommandBuilder = default_server_cmd,
    bench_cmd: CommandBuilder = default_bench_cmd,
) -> Plan:
    scenario = options.scenario
    run_dir = Path(options.out_dir) if options.out_dir is not None else default_run_dir(scenario)
    run_dir = run_dir.expanduser().absolute()
    dump_dir = run_dir / "dumps"
    port = options.port or free_port()
    base = os.environ if options.base_env is None else options.base_env
    env = kvtrap_env(options, dump_dir, base)
    if scenario.kind == "server":
        return Plan(scenario, run_dir, dump_dir, port, env,
                    tuple(server_cmd(scenario, options, port, run_dir)),
                    tuple(bench_cmd(scenario, options, port, run_dir)), dummy_dirs(options, run_dir))  # fmt: skip
    return Plan(scenario, run_dir, dump_dir, port, env)


# ------------------------------------------------------------------------------------ environment check
def refuse_used_run_dir(run_dir: Path) -> None:
    """A run directory that already holds a run would mix its dumps and outputs into this one's verdict."""
    leftovers = [name for name in ("report.json", "outputs.json", "server.log", "component.log")
                 if (run_dir / name).exists()]  # fmt: skip
    dumps = run_dir / "dumps"
    if dumps.is_dir() and any(dumps.iterdir()):
        leftovers.append("dumps/")
    if leftovers:
        raise EnvironmentProblem(f"{run_dir} already holds a run ({', '.join(leftovers)}); choose a new --out")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.sep in path and path.count("/") != 1


def gpu_inventory(environ: Mapping[str, str] | None = None) -> list[dict[str, Any]] | None:
    """Visible CUDA GPUs as ``[{name, memory_gib}]``; ``[]`` when none; ``None`` when it cannot tell.

    Asks ``nvidia-smi`` (no CUDA context, no torch import). ``CUDA_VISIBLE_DEVICES`` set to empty or
    ``-1`` hides every GPU, as it does for CUDA itself.
    """
    env = os.environ if environ is None else environ
    if env.get("CUDA_VISIBLE_DEVICES") is not None and env["CUDA_VISIBLE_DEVICES"].strip() in ("", "-1"):
        return []
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0]:
            try:
                mem = round(float(parts[1]) / 1024, 1)
            except ValueError:
                mem = None
            gpus.append({"name": parts[0], "memory_gib": mem})
    return gpus


def torch_sees_cuda() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch  # only when nvidia-smi is missing

    return bool(torch.cuda.is_available())


def sglang_installed() -> bool:
    """SGLang importable here, checked without importing it (importing it pulls in torch and CUDA)."""
    import importlib.util

    return importlib.util.find_spec("sglang") is not None


def _unknown_bugs(names: tuple[str, ...]) -> str | None:
    """A typo in --inject would otherwise leave the server unarmed and the run CLEAN: say it before starting."""
    if not names:
        return None
    from kvtrap.capture.bugs import BUGS

    known = set(BUGS)
    bad = [n for n in names if n not in known]
    return f"unknown bug to inject {', '.join(map(repr, bad))}; known: {', '.join(sorted(known))}" if bad else None


def backend_warnings(options: RunOptions) -> list[str]:
    """What to know about a run switched to another attention backend (``--attention-backend``)."""
    backend = options.attention_backend
    if backend is None:
        return []
    from kvtrap.repro.scenarios import BACKEND_NOTES  # plain data: a dry run imports neither torch nor SGLang

    return [f"--attention-backend {backend}: {BACKEND_NOTES[backend]}"]


_BACKEND_FLAGS = ("--attention-backend", "--prefill-attention-backend", "--decode-attention-backend")


def _last_values(args: Sequence[str], flags: tuple[str, ...]) -> dict[str, str]:
    """The last value each of ``flags`` gets in ``args`` (``--flag v`` or ``--flag=v``): the one argparse keeps."""
    out: dict[str, str] = {}
    for i, a in enumerate(args):
        flag, eq, value = a.partition("=")
        if flag in flags:
            if eq:
                out[flag] = value
            elif i + 1 < len(args):
                out[flag] = args[i + 1]
    return out


def _served_model_is(options: RunOptions, architectures: tuple[str, ...], id_pattern: str) -> bool:
    """Whether the run serves one of ``architectures``: its --dummy-weights model's, a local ``--model-path`` whose
    config.json names one, or (a hub id, or a dir without a readable config) a model id matching ``id_pattern``."""
    import re

    if options.dummy is not None:
        return options.dummy.architecture in architectures
    model = options.model_path or options.scenario.model
    if not model:
        return False
    config = Path(model).expanduser() / "config.json"
    if _looks_local(model) and config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except (OSError, ValueError):
            cfg = {}
        if isinstance(cfg, dict) and isinstance(cfg.get("architectures"), list):
            return any(a in architectures for a in cfg["architectures"])
    return re.search(id_pattern, str(model), re.IGNORECASE) is not None


def backend_refusal(options: RunOptions) -> str | None:
    """Why SGLang would refuse this run's attention backend(s) at start-up for its model, said before anything is
    written or started; None when nothing is known against them. Gemma 4's and GPT-OSS's checks (model_hook.py)."""
    if options.scenario.kind != "server":
        return None
    args = options.scenario.server_args
    if options.attention_backend is not None:
        args = with_attention_backend(args, options.attention_backend)
    given = _last_values([*args, *options.extra_server_args], _BACKEND_FLAGS)
    if not given:
        return None
    rule = next((r for r in BACKEND_RULES if _served_model_is(options, r.architectures, r.id_pattern)), None)
    if rule is None:
        return None
    # SGLang's resolution: prefill = --prefill-attention-backend or --attention-backend; decode likewise.
    effective: dict[str, str] = {}
    for phase in ("--prefill-attention-backend", "--decode-attention-backend"):
        if phase in given:
            effective[phase] = given[phase]
        elif "--attention-backend" in given:
            effective["--attention-backend"] = given["--attention-backend"]
    model = (f"a weight-free {options.dummy.name}-like {rule.family} model" if options.dummy is not None
             else f"{options.model_path or options.scenario.model}, a {rule.family} model")  # fmt: skip
    return refusal(rule, effective, f"{options.scenario.name} serves {model}")


def check_environment(options: RunOptions, *, environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings (returned) and blocking problems (raised as :class:`EnvironmentProblem`)."""
    scenario = options.scenario
    problems: list[str] = []
    warnings: list[str] = []
    if scenario.kind == "server" and not sglang_installed():
        problems.append(
            f"SGLang is not importable from {options.python}; install it (pip install 'sglang==0.5.23') "
            "or run kvtrap from the environment that has it"
        )
    if scenario.needs.requires_gpu:
        gpus = gpu_inventory(environ)
        if gpus is None:
            visible = torch_sees_cuda()
            gpus = [{"name": "CUDA device", "memory_gib": None}] if visible else []
        if not gpus:
            problems.append(
                f"no CUDA GPU is visible; scenario {scenario.name!r} needs {scenario.needs.gpu}"
                f" with >= {scenario.needs.min_gpu_mem_gib} GiB"
            )
        elif len(gpus) < scenario.needs.gpus:
            problems.append(f"{len(gpus)} CUDA GPU(s) visible; scenario {scenario.name!r} needs {scenario.needs.gpus}"
                            f" ({scenario.needs.gpu})")  # fmt: skip
        else:
            mems = [g["memory_gib"] for g in gpus if g.get("memory_gib")]
            if mems and max(mems) < scenario.needs.min_gpu_mem_gib:
                warnings.append(
                    f"the largest visible GPU has {max(mems)} GiB; {scenario.name!r} is estimated to need "
                    f">= {scenario.needs.min_gpu_mem_gib} GiB per GPU ({scenario.needs.note})"
                )
    unknown = _unknown_bugs(options.inject)
    if unknown:
        problems.append(unknown)
    refused = backend_refusal(options)
    if refused:
        problems.append(refused)
    warnings += backend_warnings(options)
    for label, path in (("--model-path", options.model_path), ("--draft-model-path", options.draft_model_path)):
        if path and _looks_local(path) and not Path(path).expanduser().exists():
            problems.append(f"{label} {path}: no such file or directory")
    if problems:
        raise EnvironmentProblem("; ".join(problems))
    return warnings


# ------------------------------------------------------------------------------------ process groups
def _group_members(pgid: int) -> list[int] | None:
    """Live (non-zombie) pids whose process group is ``pgid``; ``None`` where /proc is unavailable."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()
        # fields after "(comm)": state ppid pgrp ...
        if len(rest) >= 3 and rest[2] == str(pgid) and rest[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def group_alive(pgid: int) -> bool:
    members = _group_members(pgid)
    if members is not None:
        return bool(members)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, proc: subprocess.Popen[bytes] | None, grace_s: float) -> str:
    """SIGTERM the group, wait up to ``grace_s``, then SIGKILL what is left. Returns what it took."""
    how = "gone"
    try:
        os.killpg(pgid, signal.SIGTERM)
        how = "SIGTERM"
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()  # reap the leader so it does not count as alive
        if not group_alive(pgid):
            break
        time.sleep(0.05)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
            how = "SIGKILL"
        except ProcessLookupError:
            pass
        end = time.monotonic() + 10
        while time.monotonic() < end and group_alive(pgid):
            if proc is not None:
                proc.poll()
            time.sleep(0.05)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return how


class Child:
    """One command in its own process group, stdout+stderr into a log file."""

    def __init__(self, name: str, cmd: list[str] | tuple[str, ...], env: Mapping[str, str], log_path: Path,
                 cwd: Path) -> None:  # fmt: skip
        self.name = name
        self.cmd = list(cmd)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.pgid: int | None = None
        self.stopped_by_runner = False
        self.stop_how: str | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=self.env, cwd=str(self.cwd), start_new_session=True,
        )  # fmt: skip
        self.pgid = self.proc.pid  # a new session's leader leads its own process group

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def stop(self, grace_s: float) -> None:
        if self.pgid is None:
            return
        if self.poll() is None:
            self.stopped_by_runner = True
        self.stop_how = kill_group(self.pgid, self.proc, grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None


# ---------------------------------------------------------------------------------------------- health
def wait_healthy(url: str, timeout_s: float, alive: Callable[[], bool], *, interval_s: float = 0.5,
                 request_timeout_s: float = 5.0) -> str:  # fmt: skip
    """Poll ``url`` until it answers 200: ``"healthy"``, ``"exited"`` (``alive()`` went false) or ``"timeout"``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    deadline = time.monotonic() + timeout_s
    while True:
        if not alive():
            return "exited"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        try:
            with opener.open(url, timeout=max(0.1, min(request_timeout_s, remaining))) as resp:
                if resp.status == 200:
                    return "healthy"
        except urllib.error.HTTPError:
            pass  # 503 while starting
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, reset, timeout
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


# ------------------------------------------------------------------------------------------ following
class LogFollower:
    """Echo new lines of some log files to ``sink`` from a background thread, until stopped."""

    def __init__(self, logs: Mapping[str, Path], sink: Callable[[str], None], interval_s: float = 0.2) -> None:
        self.logs = dict(logs)
        self.sink = sink
        self.interval_s = interval_s
        self._offsets = {name: 0 for name in self.logs}
        self._partial = {name: "" for name in self.logs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvtrap-repro-follow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._drain(final=False)

    def _drain(self, final: bool) -> None:
        for name, path in self.logs.items():
            try:
                with open(path, "rb") as fh:
                    fh.seek(self._offsets[name])
                    data = fh.read(1 << 20)
                    self._offsets[name] += len(data)
            except OSError:
                continue
            text = self._partial[name] + data.decode("utf-8", errors="replace")
            lines = text.split("\n")
            self._partial[name] = "" if final else lines.pop()
            for line in lines:
                if line or final:
                    try:
                        self.sink(f"[{name}] {line.rstrip()}")
                    except Exception:  # a broken console must not break the run
                        pass


def tail(path: Path, lines: int = 80, max_bytes: int = 256 * 1024) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def read_log(path: Path, max_bytes: int = 64 * 1024 * 1024) -> str:
    """A whole log (its last ``max_bytes`` if larger) for classification."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------- result
@dataclass
class RunResult:
    plan: Plan
    options: RunOptions
    classification: Classification
    facts: RunFacts
    dumps: list[dict[str, Any]]
    logs: dict[str, str]  # name -> path
    log_tails: dict[str, str]
    timings: dict[str, float]
    started: float
    ended: float
    warnings: list[str] = field(default_factory=list)
    cleanup: dict[str, str | None] = field(default_factory=dict)
    component_details: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] | None = None  # outputs.json of a --probe run (see kvtrap.repro.probe)

    @property
    def outcome(self) -> Outcome:
        return self.classification.outcome

    @property
    def exit_code(self) -> int:
        return self.classification.exit_code


@dataclass
class _Signals:
    """SIGINT/SIGTERM -> RunInterrupted once; while cleaning up they are only noted."""

    interrupted: bool = False
    cleaning: bool = False
    previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        self.previous.clear()

    def _handler(self, signum: int, frame: Any) -> None:
        first = not self.interrupted
        self.interrupted = True
        if first and not self.cleaning:
            raise RunInterrupted(f"received {signal.Signals(signum).name}")


def _sleep_until(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.1) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step_s)
    return cond()


def run(
    options: RunOptions,
    *,
    server_cmd: CommandBuilder = default_server_cmd,
    bench_cmd: CommandBuilder = default_bench_cmd,
    check_env: bool = True,
    echo: Callable[[str], None] | None = None,
    plan: Plan | None = None,
) -> RunResult:
    """Run one scenario end to end and write ``report.md`` / ``report.json`` into the run directory.

    Raises :class:`EnvironmentProblem` (exit code 2) before starting anything when the machine cannot
    run it. Never leaves a child process group behind.
    """
    from kvtrap.repro.report import write_reports

    warnings = check_environment(options) if check_env else []
    plan = plan or build_plan(options, server_cmd=server_cmd, bench_cmd=bench_cmd)
    refuse_used_run_dir(plan.run_dir)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    plan.dump_dir.mkdir(parents=True, exist_ok=True)
    if plan.models is not None:
        from kvtrap.repro.models import write_model_dirs

        write_model_dirs(plan.models.target.parent, plan.models.model)
    sink = echo if (echo is not None and options.follow) else None
    for w in warnings:
        if echo is not None:
            echo(f"warning: {w}")
    if plan.scenario.kind == "component":
        result = _run_component(plan, options, sink, warnings)
    else:
        result = _run_server(plan, options, sink, warnings)
    write_reports(result)
    return result


def _run_server(plan: Plan, options: RunOptions, sink: Callable[[str], None] | None,
                warnings: list[str]) -> RunResult:  # fmt: skip
    base = dict(os.environ if options.base_env is None else options.base_env)
    server_env = {**base, **plan.env_changes}
    bench_env = {**base, "PYTHONUNBUFFERED": "1", "NO_PROXY": plan.env_changes["NO_PROXY"],
                 "no_proxy": plan.env_changes["no_proxy"]}  # fmt: skip
    logs = {"server": plan.run_dir / "server.log", "bench": plan.run_dir / "bench.log"}
    for p in logs.values():
        p.write_bytes(b"")
    server = Child("server", plan.server_cmd, server_env, logs["server"], plan.run_dir)
    bench = Child("bench", plan.bench_cmd, bench_env, logs["bench"], plan.run_dir)
    follower = LogFollower(logs, sink) if sink is not None else None
    sigs = _Signals()
    timings: dict[str, float] = {}
    healthy = health_timed_out = bench_timed_out = server_exited_early = False
    interrupted = False
    error: str | None = None
    probe: dict[str, Any] | None = None
    started = time.time()
    sigs.install()
    try:
        try:
            if follower is not None:
                follower.start()
            t0 = time.monotonic()
            server.start()
            state = wait_healthy(plan.health_url, options.health_timeout_s, lambda: server.poll() is None)
            timings["health_wait_s"] = round(time.monotonic() - t0, 3)
            if state == "healthy":
                healthy = True
            elif state == "timeout":
                health_timed_out = True
            else:
                server_exited_early = True
            if healthy and options.probe is not None:
                from kvtrap.repro.probe import run_probe, write_probe

                tp = time.monotonic()
                probe = run_probe(f"http://{HOST}:{plan.port}", options.probe, timeout_s=options.bench_timeout_s,
                                  alive=lambda: server.poll() is None)  # fmt: skip
                write_probe(plan.run_dir, probe)
                timings["probe_s"] = round(time.monotonic() - tp, 3)
                if server.poll() is not None:
                    server_exited_early = True
            if healthy and not server_exited_early:
                t1 = time.monotonic()
                bench.start()
                deadline = t1 + options.bench_timeout_s
                server_gone_at: float | None = None
                while bench.poll() is None:
                    now = time.monotonic()
                    if server_gone_at is None and server.poll() is not None:
                        server_gone_at = now
                        server_exited_early = True
                    if server_gone_at is not None and now - server_gone_at > options.server_gone_grace_s:
                        break
                    if now > deadline:
                        bench_timed_out = True
                        break
                    time.sleep(0.1)
                if server.poll() is not None and not server.stopped_by_runner:
                    server_exited_early = True
                timings["bench_s"] = round(time.monotonic() - t1, 3)
        except RunInterrupted:
            interrupted = True
        except Exception:
            error = traceback.format_exc()
        finally:
            sigs.cleaning = True
            bench.stop(options.grace_s)
            server.stop(options.grace_s)
            if follower is not None:
                follower.stop()
            interrupted = interrupted or sigs.interrupted
    finally:
        sigs.restore()
    ended = time.time()
    texts = {name: read_log(p) for name, p in logs.items()}
    dump_paths = _find_dumps(plan.dump_dir)
    facts = RunFacts(
        healthy=healthy,
        health_timed_out=health_timed_out,
        server_exit_code=server.returncode if not server.stopped_by_runner else None,
        server_exited_early=server_exited_early,
        bench_exit_code=bench.returncode if not bench.stopped_by_runner else None,
        bench_timed_out=bench_timed_out,
        interrupted=interrupted,
        expected_requests=plan.scenario.workload.num_prompts if plan.scenario.workload else None,
        error=error,
    )
    verdict = classify(texts, dump_paths, facts)
    failed = options.probe.failed(probe) if (options.probe is not None and probe is not None) else []
    if failed and verdict.outcome == Outcome.CLEAN:
        # The benchmark passed but the output probe did not: the outputs a comparison needs are missing.
        from kvtrap.repro.classify import EXIT_CODES

        reason = f"{len(failed)} of {options.probe.prompts} probe prompts got no output ({failed[0]})"  # type: ignore[union-attr]
        verdict = Classification(Outcome.UNHEALTHY, reason, EXIT_CODES[Outcome.UNHEALTHY], verdict.kernel,
                                 verdict.site, verdict.trap_kinds, verdict.matches, verdict.metrics)  # fmt: skip
    return RunResult(
        plan=plan, options=options, classification=verdict, facts=facts, dumps=summarize_dumps(dump_paths),
        logs={k: str(v) for k, v in logs.items()}, log_tails={k: tail(v) for k, v in logs.items()},
        timings=timings, started=started, ended=ended, warnings=warnings,
        cleanup={"server": server.stop_how, "bench": bench.stop_how}, probe=probe,
    )  # fmt: skip


def _find_dumps(dump_dir: Path) -> list[Path]:
    from kvtrap.record.dumpfile import find_dumps

    return find_dumps([dump_dir]) if dump_dir.exists() else []


def _run_component(plan: Plan, options: RunOptions, sink: Callable[[str], None] | None,
                   warnings: list[str]) -> RunResult:  # fmt: skip
    comp = plan.scenario.component
    assert comp is not None
    log_path = plan.run_dir / "component.log"
    log_fh = open(log_path, "w", encoding="utf-8")

    def log(line: str) -> None:
        log_fh.write(line.rstrip("\n") + "\n")
        log_fh.flush()
        if sink is not None:
            sink(f"[{plan.scenario.name}] {line.rstrip()}")

    base = dict(os.environ if options.base_env is None else options.base_env)
    ctx = ComponentContext(
        run_dir=plan.run_dir, dump_dir=plan.dump_dir, env={**base, **plan.env_changes}, inject=options.inject,
        fix=options.fix, eager=options.eager, extra_args=options.extra_server_args, log=log,
    )  # fmt: skip
    sigs = _Signals()
    result: ComponentResult | None = None
    error: str | None = None
    interrupted = False
    started = time.time()
    t0 = time.monotonic()
    sigs.install()
    try:
        result = comp(ctx)
    except RunInterrupted:
        interrupted = True
    except BaseException as exc:  # noqa: BLE001 - a component's crash is the thing being classified
        if isinstance(exc, KeyboardInterrupt):
            interrupted = True
        else:
            error = traceback.format_exc()
            log(error)
    finally:
        sigs.cleaning = True
        sigs.restore()
        log_fh.close()
    ended = time.time()
    if result is not None and result.error:
        error = (error or "") + result.error
    text = read_log(log_path) + ("\n" + result.log_text if result is not None and result.log_text else "")
    dump_paths = _find_dumps(plan.dump_dir)
    facts = RunFacts(healthy=True, interrupted=interrupted or sigs.interrupted, error=error)
    verdict = classify({"component": text}, dump_paths, facts)
    if result is not None and result.metrics:
        verdict.metrics.update({k: float(v) for k, v in result.metrics.items()})
    if result is not None and result.outcome:
        forced = Outcome(result.outcome.upper())
        from kvtrap.repro.classify import EXIT_CODES

        verdict = Classification(forced, verdict.reason if forced == verdict.outcome else
                                 f"set by the component (runner saw {verdict.outcome.value}: {verdict.reason})",
                                 EXIT_CODES[forced], verdict.kernel, verdict.site, verdict.trap_kinds,
                                 verdict.matches, verdict.metrics)  # fmt: skip
    return RunResult(
        plan=plan, options=options, classification=verdict, facts=facts, dumps=summarize_dumps(dump_paths),
        logs={"component": str(log_path)}, log_tails={"component": tail(log_path)},
        timings={"component_s": round(time.monotonic() - t0, 3)}, started=started, ended=ended,
        warnings=warnings, component_details=dict(result.details) if result is not None else {},
    )  # fmt: skip
