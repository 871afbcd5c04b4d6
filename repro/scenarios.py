"""The repro scenarios: what to run, on which models, with which flags, and what it needs.

Two kinds of scenario share one registry:

* ``server``: the real workload. The runner (:mod:`kvtrap.repro.runner`) starts ``sglang.launch_server``
  with :attr:`Scenario.server_args` and drives it with ``sglang.bench_serving`` (``random-ids``, no
  dataset download) at :attr:`Scenario.workload`.
* ``component``: a weight-free repro that runs in-process. It carries a callable
  (:attr:`Scenario.component`) that gets a :class:`ComponentContext` and returns a
  :class:`ComponentResult`; the runner classifies and reports it like a server run. Register one with
  :func:`register`, e.g. from ``repro/synthetic.py``::

      register(Scenario(name="synthetic", kind="component", description=..., needs=Needs(...),
                        component=run_synthetic))

Everything here is plain data (frozen dataclasses) so ``kvtrap repro list`` and ``--dry-run`` need
neither torch nor SGLang nor a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ScenarioKind = Literal["server", "component"]

#: The speculative settings of the seed workload (SGLang issue #26957): Gemma 4 target + its
#: "assistant" draft, NEXTN (promoted to FROZEN_KV_MTP for Gemma 4 assistant drafts), 3 steps, topk 1,
#: 4 draft tokens. trtllm_mha needs topk 1 and a page size of 16/32/64/128.
SPEC_ARGS: tuple[str, ...] = (
    "--speculative-algorithm", "NEXTN",
    "--speculative-num-steps", "3",
    "--speculative-eagle-topk", "1",
    "--speculative-num-draft-tokens", "4",
)  # fmt: skip

#: The attention settings of the seed workload. ``--max-running-requests 64`` matches the client's
#: ``--max-concurrency 64`` (frozen-KV MTP would default it to 48).
ATTN_ARGS: tuple[str, ...] = (
    "--attention-backend", "trtllm_mha",
    "--page-size", "64",
    "--max-running-requests", "64",
)  # fmt: skip

#: ``kvtrap repro NAME --attention-backend B``: the backends a server scenario may be switched to (SGLang
#: 0.5.23 ``--attention-backend`` choices that serve MHA models with a paged KV pool). Which of them kvtrap's
#: attention traps cover is ``kvtrap.capture.hooks.covered_attention_backends()``. For a Gemma 4 model only those in
#: :data:`GEMMA4_ATTENTION_BACKENDS` start, for a GPT-OSS model only those in :data:`GPTOSS_ATTENTION_BACKENDS`.
ATTENTION_BACKENDS: tuple[str, ...] = ("trtllm_mha", "fa3", "fa4", "flashinfer", "triton")

#: The attention backends SGLang 0.5.23 starts a Gemma 4 model on: ``handle_model_specific_adjustments`` in
#: sglang/srt/arg_groups/model_hook.py asserts, for the architectures in :data:`GEMMA4_ARCHITECTURES`, that both
#: the prefill and the decode backend are in this tuple ("Gemma4 only supports trtllm_mha, triton, fa4, ascend,
#: intel_xpu, intel_amx, or aiter attention backend"). A local variable there, so not importable: a CPU test
#: (tests/repro/test_gemma4_backends.py) reads SGLang's source and fails when the two disagree.
GEMMA4_ATTENTION_BACKENDS: tuple[str, ...] = (
    "trtllm_mha", "triton", "fa4", "ascend", "intel_xpu", "intel_amx", "aiter",
)  # fmt: skip
#: The ``architectures`` that branch of model_hook.py checks.
GEMMA4_ARCHITECTURES: tuple[str, ...] = (
    "Gemma4ForConditionalGeneration", "Gemma4ForCausalLM", "Gemma4UnifiedForConditionalGeneration",
)  # fmt: skip

_GEMMA4_REFUSED = (
    "SGLang 0.5.23 refuses Gemma 4 on {b} at start-up (sglang/srt/arg_groups/model_hook.py: \"Gemma4 only supports "
    "trtllm_mha, triton, fa4, ...\"), so kvtrap repro refuses it for the Gemma 4 scenarios before starting anything"
)

#: The attention backends SGLang 0.5.23 starts ``GptOssForCausalLM`` on: the ``supported_backends`` list of its
#: branch in ``handle_model_specific_adjustments`` (sglang/srt/arg_groups/model_hook.py, "GptOssForCausalLM requires
#: one of [...] attention backend"). A local variable there too; tests/repro/test_gptoss_model.py reads the source.
GPTOSS_ATTENTION_BACKENDS: tuple[str, ...] = (
    "triton", "trtllm_mha", "fa3", "fa4", "ascend", "intel_amx", "intel_xpu", "aiter",
)  # fmt: skip
GPTOSS_ARCHITECTURES: tuple[str, ...] = ("GptOssForCausalLM",)


@dataclass(frozen=True)
class BackendRule:
    """One architecture family's start-up check in SGLang 0.5.23's ``handle_model_specific_adjustments``
    (sglang/srt/arg_groups/model_hook.py): the attention backends it accepts, in its own words."""

    family: str  # "Gemma 4"
    architectures: tuple[str, ...]  # config.json "architectures" the branch checks
    id_pattern: str  # how a hub id of the family looks (regex, case-insensitive)
    accepted: tuple[str, ...]
    sglang_says: str  # the assertion's words
    advice: str  # what works on a CUDA GPU


BACKEND_RULES: tuple[BackendRule, ...] = (
    BackendRule("Gemma 4", GEMMA4_ARCHITECTURES, r"gemma-?4", GEMMA4_ATTENTION_BACKENDS,
                "Gemma4 only supports trtllm_mha, triton, fa4, ascend, intel_xpu, intel_amx, or aiter attention "
                "backend", "--attention-backend trtllm_mha or triton (fa4 on sm100)"),
    BackendRule("GPT-OSS", GPTOSS_ARCHITECTURES, r"gpt-?oss", GPTOSS_ATTENTION_BACKENDS,
                f"GptOssForCausalLM requires one of {list(GPTOSS_ATTENTION_BACKENDS)} attention backend",
                "--attention-backend fa3 (sm90), trtllm_mha (sm100) or triton"),
)  # fmt: skip


def refusal(rule: BackendRule, backends: dict[str, str], served: str) -> str | None:
    """Why SGLang 0.5.23 will not start a model of ``rule``'s family on these backends
    (``{"--attention-backend": "fa3", ...}``, the flags as the server gets them), or None when it will.
    ``served`` opens the sentence ("e4b-chat serves ...")."""
    bad = {flag: b for flag, b in backends.items() if b not in rule.accepted}
    if not bad:
        return None
    given = ", ".join(f"{flag} {b}" for flag, b in bad.items())
    return (f"{served}, and SGLang 0.5.23 refuses {rule.family} on {given} at start-up "
            f"(sglang/srt/arg_groups/model_hook.py asserts \"{rule.sglang_says}\"); on a CUDA GPU use {rule.advice}")


#: What SGLang 0.5.23 requires of a backend, read from its server-arg checks and backends; said by ``--dry-run`` and
#: written into the run report. The Gemma 4 and GPT-OSS refusals are enforced (:func:`refusal`); the rest is not: SGLang
#: refuses what it refuses at start-up, in its own words.
BACKEND_NOTES: dict[str, str] = {
    "trtllm_mha": "topk 1 and page size 16/32/64/128; Gemma 4's default on sm100 (sm90 runs FlashInfer XQA)",
    "fa3": (
        _GEMMA4_REFUSED.format(b="fa3") + "; kvtrap's fa3 traps are verified on SGLang's real FlashAttentionBackend "
        "(CPU and GPU tests); for a real fa3 server with the hybrid SWA pool use the GPT-OSS scenarios "
        "(gptoss-swa-chat, gptoss-swa-summarize; fa3 is SGLang's own pick for them on sm90). sm80/sm90 "
        "only (SGLang asserts at backend creation), FA3 compiles head sizes up to 256, sgl_kernel's FA3 ops "
        "(flash_ops) must be installed"
    ),
    "fa4": "the same FlashAttentionBackend class as fa3 (its page-table traps apply); sm100/sm120 builds",
    "flashinfer": (
        _GEMMA4_REFUSED.format(b="flashinfer") + " (and GPT-OSS, see GPTOSS_ATTENTION_BACKENDS); with another "
        "--model-path, kvtrap checks the ragged ids "
        "each wrapper was planned with on the host before each layer, and with the device guard after each decode / "
        "verify / draft-extend CUDA-graph replay's planning (not the multi-step draft's per-step wrappers: use "
        "--eager to check those)"
    ),
    "triton": (
        "Gemma 4's default off sm100; kvtrap checks its ragged kv_indptr / kv_indices on the host before each "
        "layer, and with the device guard after each CUDA-graph replay's metadata build (the EAGLE multi-step "
        "draft's per-step sets included)"
    ),
}


#: Run every step eagerly so kvtrap's host-side checks see every decode step (flag names checked
#: against ``python -m sglang.launch_server --help`` of 0.5.23: choices full|breakable|disabled).
EAGER_ARGS: tuple[str, ...] = (
    "--cuda-graph-backend-decode", "disabled",
    "--cuda-graph-backend-prefill", "disabled",
)  # fmt: skip


@dataclass(frozen=True)
class Needs:
    """What a scenario needs from the machine. Memory is per GPU, in GiB, and an honest estimate."""

    gpu: str  # human-readable GPU requirement, e.g. "B200 (sm100) or H100/H200 (sm90)"
    min_gpu_mem_gib: int = 0  # below this the weights + a useful KV pool do not fit (0: no GPU needed)
    gpus: int = 1
    weights_gib: float = 0.0  # bf16 weights of target + draft, downloaded once into the HF cache
    note: str = ""
    requires_gpu: bool = True  # False: the runner skips its CUDA check (a CPU-capable component repro)

    def to_json(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "min_gpu_mem_gib": self.min_gpu_mem_gib,
            "gpus": self.gpus,
            "weights_gib": self.weights_gib,
            "note": self.note,
            "requires_gpu": self.requires_gpu,
        }


@dataclass(frozen=True)
class Workload:
    """The ``sglang.bench_serving`` load: ``random-ids`` prompts of exact lengths (range ratio 1.0)."""

    input_len: int
    output_len: int
    num_prompts: int
    max_concurrency: int
    seed: int = 1
    range_ratio: float = 1.0
    request_rate: str = "inf"

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": "random-ids",
            "input_len": self.input_len,
            "output_len": self.output_len,
            "num_prompts": self.num_prompts,
            "max_concurrency": self.max_concurrency,
            "seed": self.seed,
            "range_ratio": self.range_ratio,
            "request_rate": self.request_rate,
        }


@dataclass(frozen=True)
class ComponentContext:
    """What a ``component`` scenario's callable gets.

    ``env`` holds the kvtrap variables the run asks for (``SGLANG_TRTLLM_MHA_DEBUG``, ``KVTRAP_DUMP_DIR``,
    ``KVTRAP_INJECT``, ``KVTRAP_FIX``...); the callable should arm kvtrap from them (for example
    ``kvtrap.Config.from_env(ctx.env)``) rather than from ``os.environ``. ``log`` writes one line to the
    run's log file (and the console when following). Dumps must go to ``dump_dir``: the runner looks
    there to decide TRAPPED.
    """

    run_dir: Path
    dump_dir: Path
    env: Mapping[str, str]
    inject: tuple[str, ...]
    fix: bool | None  # None: leave KVTRAP_FIX unset (kvtrap's default, auto)
    eager: bool
    extra_args: tuple[str, ...]
    log: Callable[[str], None]


@dataclass(frozen=True)
class ComponentResult:
    """What a ``component`` callable returns. The runner still looks for dumps and crash signatures.

    ``outcome`` may force one of the outcome names (``CLEAN``, ``TRAPPED``, ``CRASHED``...); ``None``
    lets the runner classify from the dumps, ``error`` and ``log_text``. ``error`` is the text of an
    exception the callable caught (e.g. ``torch.AcceleratorError: CUDA error: an illegal memory access
    was encountered``); an exception that escapes the callable is recorded the same way.
    """

    outcome: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    log_text: str = ""


ComponentFn = Callable[[ComponentContext], ComponentResult]


@dataclass(frozen=True)
class Scenario:
    """One named repro. ``server`` scenarios need ``model``, ``workload`` and ``server_args``;
    ``component`` scenarios need ``component``."""

    name: str
    description: str
    kind: ScenarioKind
    needs: Needs
    model: str | None = None  # target model id (Hugging Face) or local path
    draft_model: str | None = None  # the speculative draft (Gemma 4 "assistant")
    workload: Workload | None = None
    # Server flags other than --model-path, --speculative-draft-model-path, --host and --port.
    server_args: tuple[str, ...] = ()
    component: ComponentFn | None = None
    tags: tuple[str, ...] = ()
    dummy_variant: str | None = None  # the weight-free model (kvtrap.repro.models) --dummy-weights writes

    def __post_init__(self) -> None:
        if self.kind == "server":
            if not self.model or self.workload is None:
                raise ValueError(f"server scenario {self.name!r} needs a model and a workload")
        elif self.kind == "component":
            if self.component is None:
                raise ValueError(f"component scenario {self.name!r} needs a component callable")
        else:
            raise ValueError(f"scenario {self.name!r}: kind must be 'server' or 'component', not {self.kind!r}")
        if isinstance(self.server_args, list):
            object.__setattr__(self, "server_args", tuple(self.server_args))

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(m for m in (self.model, self.draft_model) if m)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "model": self.model,
            "draft_model": self.draft_model,
            "workload": None if self.workload is None else self.workload.to_json(),
            "server_args": list(self.server_args),
            "needs": self.needs.to_json(),
            "component": None if self.component is None else _qualname(self.component),
            "tags": list(self.tags),
            "dummy_variant": self.dummy_variant,
        }


def with_attention_backend(args: tuple[str, ...], backend: str) -> tuple[str, ...]:
    """``args`` with every ``--attention-backend X`` (or ``--attention-backend=X``) replaced by ``backend``;
    appended when ``args`` has none. Refuses a backend outside :data:`ATTENTION_BACKENDS`."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    out: list[str] = []
    found = False
    it = iter(args)
    for a in it:
        if a == "--attention-backend":
            next(it, None)
            out += [a, backend]
            found = True
        elif a.startswith("--attention-backend="):
            out.append(f"--attention-backend={backend}")
            found = True
        else:
            out.append(a)
    return tuple(out) if found else (*out, "--attention-backend", backend)


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# --------------------------------------------------------------------------------------------- registry
REGISTRY: dict[str, Scenario] = {}


def register(scenario: Scenario, *, replace: bool = False) -> Scenario:
    """Add a scenario. Names are unique unless ``replace`` is true."""
    if scenario.name in REGISTRY and not replace:
        raise ValueError(f"scenario {scenario.name!r} is already registered")
    REGISTRY[scenario.name] = scenario
    return scenario


def get(name: str) -> Scenario:
    """The scenario called ``name``; ``KeyError`` with the known names otherwise."""
    _load_optional()
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def all_scenarios() -> list[Scenario]:
    _load_optional()
    return [REGISTRY[k] for k in sorted(REGISTRY)]


_optional_loaded = False


def _load_optional() -> None:
    """Import scenario modules that register themselves (``repro/synthetic.py``), once, if present."""
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    import importlib
    import importlib.util

    for mod in ("kvtrap.repro.synthetic",):
        try:
            if importlib.util.find_spec(mod) is None:
                continue
        except ModuleNotFoundError:
            continue
        importlib.import_module(mod)


# ------------------------------------------------------------------------------------------- the models
# Hugging Face ids. Targets: the instruction-tuned Gemma 4 checkpoints (SGLang's own tests use
# google/gemma-4-E4B-it and google/gemma-4-26B-A4B-it; google/gemma-4-31B-it is the dense 31B).
# Drafts: Google's "assistant" MTP checkpoints, named "<target>-assistant" (model_type
# gemma4_assistant; SGLang promotes NEXTN to FROZEN_KV_MTP for them).
E4B = "google/gemma-4-E4B-it"
E4B_DRAFT = "google/gemma-4-E4B-it-assistant"
A26B = "google/gemma-4-26B-A4B-it"
A26B_DRAFT = "google/gemma-4-26B-A4B-it-assistant"
D31B = "google/gemma-4-31B-it"
D31B_DRAFT = "google/gemma-4-31B-it-assistant"

_GPU_ANY = "B200 (sm100; where #26957 faulted) or H100/H200 (sm90: trtllm_mha runs XQA, kvtrap still traps)"

# Memory: bf16 weights + a KV pool large enough for 64 concurrent long requests. Weights: E4B ~8B
# parameters with its per-layer embeddings (~16 GiB), 26B-A4B ~26B (~49 GiB, all experts resident),
# 31B ~31B (~58 GiB); the assistants are <1 GiB. The SWA layers' pool is small, the full-attention
# layers' pool is what 64 x 9k tokens need. Estimates, not measurements.
NEEDS_E4B = Needs(
    gpu=_GPU_ANY,
    min_gpu_mem_gib=40,
    weights_gib=16.5,
    note="fits one H100 80GB with room for the KV pool; 40 GiB is the floor for 64 x 9k tokens",
)
NEEDS_26B = Needs(
    gpu=_GPU_ANY,
    min_gpu_mem_gib=80,
    weights_gib=50.0,
    note="one H100 80GB is tight (about 20 GiB left for KV after weights and graphs); H200/B200 preferred",
)
NEEDS_31B = Needs(
    gpu="B200 (180 GB) or H200 (141 GB); an 80 GB H100 does not fit it on one GPU",
    min_gpu_mem_gib=96,
    weights_gib=59.0,
    note="single GPU; on two GPUs use 31b-tp2-chat (--tp-size 2)",
)

SUMMARIZE = Workload(input_len=8000, output_len=1000, num_prompts=80, max_concurrency=64)
CHAT = Workload(input_len=1000, output_len=1000, num_prompts=80, max_concurrency=64)

_SERVER_ARGS = SPEC_ARGS + ATTN_ARGS

#: SGLang 0.5.23's piecewise CUDA-graph capture of prefill stops server start-up on Gemma 4 configs with
#: KV-shared layers ("ValueError: invalid or duplicate attention layer_id"), with or without kvtrap (seen on an
#: H200 with the weight-free E4B-like model; docs/repro.md). Prefill then runs eagerly; decode keeps its graphs.
KV_SHARED_ARGS: tuple[str, ...] = ("--cuda-graph-backend-prefill", "disabled")


#: Tensor parallelism over two GPUs: every rank's scheduler runs its own backend, allocator and CUDA graphs,
#: and each rank dumps on its own (issue: first failing rank first).
TP2_ARGS: tuple[str, ...] = ("--tp-size", "2")

NEEDS_31B_TP2 = Needs(
    gpu="2 x H100/H200/B200 of one host (NVLink or PCIe)",
    min_gpu_mem_gib=48,
    gpus=2,
    weights_gib=59.0,
    note="31B split over two GPUs (~30 GiB of weights each); weight-free with --dummy-weights",
)
NEEDS_26B_TP2 = Needs(
    gpu="2 x H100/H200/B200 of one host (NVLink or PCIe)",
    min_gpu_mem_gib=40,
    gpus=2,
    weights_gib=50.0,
    note="26B-A4B (MoE) split over two GPUs; weight-free with --dummy-weights",
)


def _server(name: str, model: str, draft: str, workload: Workload, needs: Needs, what: str,
            dummy: str, extra: tuple[str, ...] = ()) -> Scenario:  # fmt: skip
    return Scenario(
        name=name,
        description=(
            f"{what}: random {workload.input_len} in / {workload.output_len} out x {workload.num_prompts} "
            f"prompts, concurrency {workload.max_concurrency}; trtllm_mha + frozen-KV MTP"
        ),
        kind="server",
        needs=needs,
        model=model,
        draft_model=draft,
        workload=workload,
        server_args=_SERVER_ARGS + extra,
        tags=("sglang-26957",),
        dummy_variant=dummy,
    )


for _s in (
    _server("e4b-summarize", E4B, E4B_DRAFT, SUMMARIZE, NEEDS_E4B, "Gemma 4 E4B, the #26957 seed workload",
            "e4b", KV_SHARED_ARGS),
    _server("26b-summarize", A26B, A26B_DRAFT, SUMMARIZE, NEEDS_26B, "Gemma 4 26B-A4B (MoE), long prompts",
            "26b-a4b"),
    _server("31b-summarize", D31B, D31B_DRAFT, SUMMARIZE, NEEDS_31B, "Gemma 4 31B (dense), long prompts", "31b"),
    _server("e4b-chat", E4B, E4B_DRAFT, CHAT, NEEDS_E4B, "Gemma 4 E4B, short prompts (slow SWA fill)", "e4b",
            KV_SHARED_ARGS),
    _server("26b-chat", A26B, A26B_DRAFT, CHAT, NEEDS_26B, "Gemma 4 26B-A4B (MoE), short prompts", "26b-a4b"),
    _server("31b-tp2-chat", D31B, D31B_DRAFT, CHAT, NEEDS_31B_TP2, "Gemma 4 31B (dense), TP=2, short prompts", "31b",
            TP2_ARGS),
    _server("26b-tp2-chat", A26B, A26B_DRAFT, CHAT, NEEDS_26B_TP2, "Gemma 4 26B-A4B (MoE), TP=2, short prompts",
            "26b-a4b", TP2_ARGS),
):
    register(_s)
del _s


# ------------------------------------------------------------------------------ GPT-OSS: fa3 + the SWA pool
#: The MXFP4 checkpoint (~13 GiB) a run without --dummy-weights serves; the weight-free model is the bf16 "gptoss"
#: variant of kvtrap.repro.models (why GPT-OSS: see GptOssModel's docstring).
GPTOSS = "openai/gpt-oss-20b"

NEEDS_GPTOSS = Needs(
    gpu="H100/H200 (sm90: SGLang picks fa3 for GPT-OSS) or B200 (sm100: it picks trtllm_mha)",
    min_gpu_mem_gib=40,
    weights_gib=13.0,
    note=(
        "no --attention-backend: SGLang 0.5.23 picks fa3 for GptOssForCausalLM on sm90 and trtllm_mha on sm100 "
        "(arg_groups/model_overrides/gpt_oss.py), so on an H100/H200 this is kvtrap's fa3 guard in a real server; "
        "hybrid SWA pool (SWAKVPool + SWATokenToKVPoolAllocator, window 128), page size 64 (the free-path checks "
        "need pages), no MTP draft. The checkpoint is MXFP4 (~13 GiB); --dummy-weights writes an 8-layer bf16 "
        "GPT-OSS-like model (about 6 GiB) instead, served with --moe-runner-backend triton; run that way on an H200 "
        "(fa3: armed and unarmed clean with identical outputs, #38269 trapped)"
    ),
)


def _gptoss(name: str, workload: Workload, what: str) -> Scenario:
    return Scenario(
        name=name,
        description=(
            f"{what}: random {workload.input_len} in / {workload.output_len} out x {workload.num_prompts} "
            f"prompts, concurrency {workload.max_concurrency}; SGLang's default backend (fa3 on sm90), hybrid SWA "
            "pool, no draft"
        ),
        kind="server",
        needs=NEEDS_GPTOSS,
        model=GPTOSS,
        workload=workload,
        # pages as the Gemma scenarios use: kvtrap's free-path checks (and #38269's page 0) need page_size > 1
        server_args=("--page-size", "64"),
        tags=("fa3", "swa", "sglang-38269"),
        dummy_variant="gptoss",
    )


for _s in (
    _gptoss("gptoss-swa-chat", CHAT, "GPT-OSS-20B (sliding window 128 / full, sinks, MoE), short prompts"),
    _gptoss("gptoss-swa-summarize", SUMMARIZE, "GPT-OSS-20B, long prompts (the SWA window slides every request)"),
):
    register(_s)
del _s
