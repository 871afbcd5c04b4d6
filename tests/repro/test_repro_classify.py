"""Classification rules on log lines as SGLang, PyTorch, FlashInfer and the CUDA tools print them.

Each sample's source is named next to it (public issues quoting real output, or the format strings in
the installed sglang 0.5.23 wheel)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvtrap.repro.classify import (
    EXIT_CODES,
    Outcome,
    RunFacts,
    bench_metrics,
    classify,
    crash_site,
    kernel_name,
    server_metrics,
)

HEALTHY_BENCH = RunFacts(healthy=True, bench_exit_code=0)

# PyTorch's CUDA check as raised in torch >= 2.8 (vLLM #27514; FlashInfer #1928).
TORCH_IMA = """\
  File "/usr/local/lib/python3.12/dist-packages/sglang/srt/layers/attention/trtllm_mha_backend.py", line 1012, in forward_decode
    o = flashinfer.decode.trtllm_batch_decode_with_kv_cache(
torch.AcceleratorError: CUDA error: an illegal memory access was encountered
Search for `cudaErrorIllegalAddress' in https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html for more information.
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
For debugging consider passing CUDA_LAUNCH_BLOCKING=1
Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.
"""

# Older PyTorch: RuntimeError, no "Search for" line (llm-awq #170 style tracebacks).
TORCH_IMA_OLD = """\
RuntimeError: CUDA error: an illegal memory access was encountered
Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.
"""

# FlashInfer's trtllm-gen FMHA launcher (FlashInfer #1928).
FLASHINFER_IMA = "CUDA Error: CUDA_ERROR_ILLEGAL_ADDRESS /workspace/include/flashinfer/trtllm/fmha/fmhaKernels.cuh 257"

# NCCL's process-group watchdog repeating the error (one line in the log).
NCCL_IMA = (
    "[rank1]:[E601 10:12:05.123456 ProcessGroupNCCL.cpp:1899] [PG ID 0 PG GUID 3 Rank 1] Process group watchdog "
    "thread terminated with exception: CUDA error: an illegal memory access was encountered"
)

# cuda-gdb on a CUDA core dump (FlashInfer #2704).
CUDA_GDB = """\
CUDA Exception: Warp Illegal Address
The exception was triggered at PC 0x7f42b04321a0  void tensorrt_llm::kernels::quantize_with_block_size_tma<(tensorrt_llm::BlockScaleQuantizationType)0, __nv_bfloat16, 16, false>(int, int, int, int, __nv_bfloat16 const*, float const*, unsigned int*, unsigned int*, flashinfer::QuantizationSFLayout, CUtensorMap_st)
"""

# cuda-gdb frame line (flash-attention #1311).
CUDA_GDB_FRAME = """\
CUDA Exception: Warp Illegal Address
0x00007ff9ac5f8fa0 in void flash_bwd_dot_do_o_kernel<true, Flash_bwd_kernel_traits<128, 64, 128, 8, 2, 4, 2, false, false, cutlass::half_t, Flash_kernel_traits<128, 64, 128, 8, cutlass::half_t> > >(Flash_bwd_params)
#0  0x00007ff9ac5f8fa0 in void flash_bwd_dot_do_o_kernel<true, Flash_bwd_kernel_traits<128> >(Flash_bwd_params)<<<(1,12288,16),(256,1,1)>>> ()
"""

# compute-sanitizer memcheck (three shapes of the "at" line).
SANITIZER_1 = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at scaleArray(float *, float)+0x70 in writeValidMem.cu:6
=========     by thread (255,0,0) in block (3,0,0)
=========     Address 0x74b834000ffc is out of bounds
"""
SANITIZER_2 = """\
========= Invalid __global__ read of size 4
=========     at 0x000001a0 in execute_drawing_rpn
"""
SANITIZER_3 = """\
========= Warp illegal address
=========     at bmm_Bfloat16_Bfloat16Bfloat16_Fp32_t128x8x128_s6_et128x8_m128x8x16_c1x1x1_16dp256b_rM_BN_transOut_schPd2x1x2x3+0x1b30
"""

# SGLang 0.5.23 (sglang/srt/utils/watchdog.py): f"{self.debug_name} watchdog timeout ({self.watchdog_timeout=}, {self.soft=})".
WATCHDOG = "[2026-06-01 10:30:00] Scheduler watchdog timeout (self.watchdog_timeout=300, self.soft=False)"

# SGLang 0.5.23 http_server.py health_generate().
HEALTH_FAILED = (
    "[2026-06-01 10:30:00] Health check failed. Server couldn't get a response from detokenizer for last 20 seconds."
    " tic start time: 10:29:40. last_heartbeat time: 10:25:02"
)

# SGLang 0.5.23 metrics_reporter.py + pool_stats_observer.py decode line for a hybrid-SWA model.
DECODE = (
    "[2026-06-01 10:12:03 TP0] Decode batch, #running-req: 64, #full token: 402112, full token usage: 0.61, "
    "#swa token: 98304, swa token usage: 0.86, accept len: 2.91, accept rate: 0.64, cuda graph: True, "
    "gen throughput (token/s): 4102.33, #queue-req: 16, "
)

# sglang/benchmark/serving.py (0.5.23) result rows, formatted with its own format strings.
BENCH = "\n".join(
    [
        "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
        "{:<40} {:<10}".format("Backend:", "sglang"),
        "{:<40} {:<10}".format("Successful requests:", 80),
        "{:<40} {:<10.2f}".format("Benchmark duration (s):", 95.31),
        "{:<40} {:<10.2f}".format("Output token throughput (tok/s):", 839.39),
        "{:<40} {:<10.2f}".format("Peak output token throughput (tok/s):", 1411.00),
        "{:<40} {:<10.2f}".format("Accept length:", 2.87),
        "{:<40} {:<10.2f}".format("Mean TTFT (ms):", 5123.40),
        "{:<40} {:<10.2f}".format("Mean TPOT (ms):", 62.95),
        "{:<40} {:<10.2f}".format("P99 TPOT (ms):", 88.02),
    ]
)


@pytest.mark.parametrize("text", [TORCH_IMA, TORCH_IMA_OLD, FLASHINFER_IMA, NCCL_IMA, CUDA_GDB, SANITIZER_1, SANITIZER_3])
def test_illegal_address_signatures_are_crashed(text: str) -> None:
    c = classify({"server": text}, facts=HEALTHY_BENCH)
    assert c.outcome is Outcome.CRASHED
    assert c.exit_code == 1


def test_headline_is_the_illegal_address_and_site_is_the_python_frame() -> None:
    c = classify({"server": SANITIZER_1 + TORCH_IMA}, facts=HEALTHY_BENCH)
    assert c.reason.startswith("CUDA illegal address: torch.AcceleratorError: CUDA error: an illegal memory access")
    assert c.kernel == "scaleArray"
    assert c.site["python"].endswith("trtllm_mha_backend.py:1012 in forward_decode")


def test_flashinfer_source_site() -> None:
    assert crash_site(FLASHINFER_IMA)["source"] == "/workspace/include/flashinfer/trtllm/fmha/fmhaKernels.cuh:257"


@pytest.mark.parametrize(
    ("text", "name"),
    [
        (SANITIZER_1, "scaleArray"),
        (SANITIZER_2, "execute_drawing_rpn"),
        (SANITIZER_3, "bmm_Bfloat16_Bfloat16Bfloat16_Fp32_t128x8x128_s6_et128x8_m128x8x16_c1x1x1_16dp256b_rM_BN_transOut_schPd2x1x2x3"),
        (CUDA_GDB, "tensorrt_llm::kernels::quantize_with_block_size_tma<(tensorrt_llm::BlockScaleQuantizationType)0, __nv_bfloat16, 16, false>"),
        (CUDA_GDB_FRAME, "flash_bwd_dot_do_o_kernel<true, Flash_bwd_kernel_traits<128> >"),
        # As SGLang #26957 quotes the faulting kernel.
        ("CUDA error: an illegal memory access was encountered\n  in fmhaSm100fKernel_*SlidingOrChunkedCausal*", "fmhaSm100fKernel_"),
        (TORCH_IMA, None),  # PyTorch never names the kernel
    ],
)  # fmt: skip
def test_kernel_names(text: str, name: str | None) -> None:
    assert kernel_name(text) == name


def test_rank_from_sglang_prefix() -> None:
    text = "[2026-06-01 10:12:04 TP3] Scheduler hit an exception: Traceback (most recent call last):\n" + TORCH_IMA
    assert crash_site(text)["rank"] == "TP3"


def test_other_cuda_errors() -> None:
    for line, name in [
        ("RuntimeError: CUDA error: misaligned address", "misaligned_address"),
        ("torch.AcceleratorError: CUDA error: unspecified launch failure", "launch_failure"),
        ("RuntimeError: CUDA error: device-side assert triggered", "device_assert"),
        ("torch.AcceleratorError: CUDA error: an illegal instruction was encountered", "illegal_instruction"),
    ]:
        c = classify({"server": line}, facts=HEALTHY_BENCH)
        assert c.outcome is Outcome.CRASHED
        assert c.matches[0].name == name


def test_kvtrap_error_wins_over_crash() -> None:
    text = (
        "kvtrap.record.violation.KVTrapError: kvtrap [index_space_mismatch] in TRTLLMHAAttnBackend.forward_decode: layer 0"
        " (swa) was handed the full-pool page table.\n" + TORCH_IMA
    )
    c = classify({"server": text}, facts=HEALTHY_BENCH)
    assert c.outcome is Outcome.TRAPPED
    assert c.trap_kinds == ("index_space_mismatch",)


def test_dumps_make_it_trapped(tmp_path: Path) -> None:
    c = classify({"server": "", "bench": BENCH}, [tmp_path / "d1"], RunFacts(healthy=True, bench_exit_code=0))
    assert c.outcome is Outcome.TRAPPED and c.exit_code == 1
    assert "1 kvtrap dump" in c.reason


def test_hangs() -> None:
    assert classify({"server": WATCHDOG}, facts=HEALTHY_BENCH).outcome is Outcome.HUNG
    assert classify({"server": HEALTH_FAILED}, facts=HEALTHY_BENCH).outcome is Outcome.HUNG
    c = classify({"server": ""}, facts=RunFacts(healthy=True, bench_timed_out=True))
    assert c.outcome is Outcome.HUNG and c.exit_code == 3


def test_unhealthy() -> None:
    c = classify({"server": ""}, facts=RunFacts(health_timed_out=True))
    assert c.outcome is Outcome.UNHEALTHY and c.exit_code == 3
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB."
    c = classify({"server": oom}, facts=RunFacts(server_exited_early=True, server_exit_code=1))
    assert c.outcome is Outcome.UNHEALTHY and "out of memory" in c.reason
    c = classify({"server": "", "bench": BENCH.replace("80", "79")}, facts=RunFacts(healthy=True, bench_exit_code=0, expected_requests=80))  # fmt: skip
    assert c.outcome is Outcome.UNHEALTHY and "79 of 80" in c.reason


def test_server_death_without_signature_is_crashed() -> None:
    c = classify({"server": ""}, facts=RunFacts(healthy=True, server_exited_early=True, server_exit_code=-11))
    assert c.outcome is Outcome.CRASHED and "SIGSEGV" in c.reason


def test_clean_and_metrics() -> None:
    c = classify({"server": DECODE, "bench": BENCH}, facts=RunFacts(healthy=True, bench_exit_code=0, expected_requests=80))
    assert c.outcome is Outcome.CLEAN and c.exit_code == 0
    assert c.metrics["output_throughput"] == pytest.approx(839.39)
    assert c.metrics["peak_output_throughput"] == pytest.approx(1411.0)
    assert c.metrics["max_swa_token_usage"] == pytest.approx(0.86)


def test_bench_metrics_exact_labels() -> None:
    m = bench_metrics(BENCH)
    assert m == {
        "completed": 80.0,
        "duration_s": 95.31,
        "output_throughput": 839.39,
        "peak_output_throughput": 1411.0,
        "accept_length": 2.87,
        "mean_ttft_ms": 5123.40,
        "mean_tpot_ms": 62.95,
        "p99_tpot_ms": 88.02,
    }


def test_server_metrics_peak() -> None:
    lines = DECODE + "\n" + DECODE.replace("swa token usage: 0.86", "swa token usage: 0.91").replace("accept len: 2.91", "accept len: 3.05")
    m = server_metrics(lines)
    assert m["max_swa_token_usage"] == pytest.approx(0.91)
    assert m["max_full_token_usage"] == pytest.approx(0.61)
    assert m["last_decode_accept_len"] == pytest.approx(3.05)
    assert m["decode_log_lines"] == 2


def test_interrupted_and_exit_codes() -> None:
    assert classify({"server": ""}, facts=RunFacts(interrupted=True)).exit_code == 130
    assert EXIT_CODES[Outcome.CLEAN] == 0 and EXIT_CODES[Outcome.TRAPPED] == 1 and EXIT_CODES[Outcome.CRASHED] == 1


# SGLang 0.5.23's scheduler death as logged on an H200 (#38269 injected, unarmed: SGLang's own allocator assert),
# trimmed to the frames that matter; and a start-up death in the MoE top-k (a mismatched triton_kernels package).
SCHED_ASSERT = """\
[2026-11-29 22:02:38] Scheduler hit an exception: Traceback (most recent call last):
  File "/venv/sglang/srt/managers/scheduler.py", line 5092, in process_batch_result
    self.batch_result_processor.process_batch_result_decode(batch, result)
  File "/venv/sglang/srt/mem_cache/allocator/swa.py", line 665, in free_group_end
    assert self.swa_attn_allocator.available_size() <= self.swa_attn_allocator.size
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
AssertionError

[2026-11-29 22:02:38] SIGQUIT received. signum=None, frame=None. It usually means one child failed.
"""
SCHED_NAMEERROR = """\
[2026-11-29 22:00:22] Scheduler hit an exception: Traceback (most recent call last):
  File "/venv/sglang/srt/layers/moe/topk.py", line 914, in forward_cuda
    ) = routing(
        ^^^^^^^
NameError: name 'routing' is not defined

[2026-11-29 22:00:22] Received sigquit from a child process. It usually means the child failed.
"""


def test_a_scheduler_exception_is_named_not_only_the_signal() -> None:
    c = classify({"server": SCHED_ASSERT}, facts=RunFacts(healthy=True, server_exited_early=True, server_exit_code=-9))
    assert c.outcome is Outcome.CRASHED and "SIGKILL" in c.reason
    assert "the scheduler raised AssertionError at swa.py:665 in free_group_end" in c.reason
    c = classify({"server": SCHED_NAMEERROR}, facts=RunFacts(server_exited_early=True, server_exit_code=-9))
    assert c.outcome is Outcome.UNHEALTHY
    assert "NameError: name 'routing' is not defined at topk.py:914 in forward_cuda" in c.reason
    # no traceback: the signal alone, as before
    c = classify({"server": "Scheduler hit an exception"}, facts=RunFacts(healthy=True, server_exited_early=True))
    assert c.outcome is Outcome.CRASHED and "raised" not in c.reason
