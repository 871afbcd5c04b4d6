"""A short-lived stand-in for ``python -m sglang.launch_server`` (tests only, loopback only).

Modes:
  healthy        /health answers 503 for --delay seconds, then 200, until SIGTERM.
  never          /health answers 503 forever.
  crash          healthy, then after --after seconds logs a CUDA illegal-address traceback the way
                 SGLang's scheduler logs it, and dies like SGLang's parent does (SIGKILL to itself).
  crash-startup  logs a CUDA out-of-memory error during start-up and exits 1 before /health is up.
  trap           healthy, then writes a real kvtrap dump into $KVTRAP_DUMP_DIR, logs the KVTrapError
                 inside "Scheduler hit an exception", and dies.
  die            healthy, then exits with SIGSEGV after --after seconds and prints nothing.
  stubborn       healthy and ignores SIGTERM (the runner must escalate to SIGKILL).

With --grandchild the server starts a child that starts a grandchild (both sleep), all in the server's
process group, and writes their pids to --pid-dir; the runner must end all of them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STATE = {"ready": False}

# The lines below follow the formats SGLang 0.5.23 and PyTorch print (see repro/classify.py for where
# each format was read). The kernel line follows compute-sanitizer's "at <kernel>+0x<offset>" shape with
# a trtllm-gen FMHA kernel name of the family SGLang #26957 quotes ("fmhaSm100fKernel_*SlidingOrChunkedCausal*").
CRASH_LOG = """\
[2026-06-01 10:12:03 TP0] Decode batch, #running-req: 64, #full token: 402112, full token usage: 0.61, #swa token: 98304, swa token usage: 0.86, accept len: 2.91, accept rate: 0.64, cuda graph: True, gen throughput (token/s): 4102.33, #queue-req: 16,
========= Invalid __global__ read of size 16 bytes
=========     at fmhaSm100fKernel_QkvBfloat16OBfloat16H256PagedKvSlidingOrChunkedCausalP64VarSeqQ8Kv128PersistentSwapsAbForGen+0x2a70
=========     by thread (96,0,0) in block (3,7,0)
[2026-06-01 10:12:04 TP0] Scheduler hit an exception: Traceback (most recent call last):
  File "/usr/local/lib/python3.12/dist-packages/sglang/srt/managers/scheduler.py", line 6366, in run_scheduler_process
    scheduler.run_event_loop()
  File "/usr/local/lib/python3.12/dist-packages/sglang/srt/speculative/frozen_kv_mtp_worker.py", line 412, in draft
    logits_output = self.draft_runner.forward(forward_batch)
  File "/usr/local/lib/python3.12/dist-packages/sglang/srt/layers/attention/trtllm_mha_backend.py", line 1012, in forward_decode
    o = flashinfer.decode.trtllm_batch_decode_with_kv_cache(
torch.AcceleratorError: CUDA error: an illegal memory access was encountered
Search for `cudaErrorIllegalAddress' in https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html for more information.
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
For debugging consider passing CUDA_LAUNCH_BLOCKING=1
Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.

[2026-06-01 10:12:04] Received sigquit from a child process. It usually means the child failed.
"""

OOM_LOG = """\
[2026-06-01 10:00:41 TP0] Load weight end. type=Gemma4ForConditionalGeneration, dtype=torch.bfloat16, avail mem=3.10 GB
[2026-06-01 10:00:42 TP0] Scheduler hit an exception: Traceback (most recent call last):
  File "/usr/local/lib/python3.12/dist-packages/sglang/srt/model_executor/model_runner.py", line 2210, in init_memory_pool
    self.token_to_kv_pool = SWAKVPool(
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.02 GiB is free.
[2026-06-01 10:00:42] Received sigquit from a child process. It usually means the child failed.
"""


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        if self.path in ("/health", "/health_generate"):
            self.send_response(200 if STATE["ready"] else 503)
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def do_POST(self) -> None:  # noqa: N802 - SGLang's native /generate, greedy and deterministic here
        if self.path != "/generate" or not STATE["ready"] or os.environ.get("FAKE_SERVER_GENERATE_FAILS"):
            self.send_response(404 if self.path != "/generate" else 503)
            self.end_headers()
            return
        import json

        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if body.get("return_logprob") and os.environ.get("FAKE_SERVER_REFUSES_LOGPROBS"):
            self.send_response(400)
            self.end_headers()
            return
        ids = body["input_ids"]
        n = body["sampling_params"]["max_new_tokens"]
        salt = int(os.environ.get("FAKE_SERVER_SALT", "0"))  # a "different computation" for compare tests
        out = [(sum(ids) + 7 * i + (salt if i >= n // 2 else 0)) % 262144 for i in range(n)]
        meta: dict = {}
        if body.get("return_logprob") and body.get("top_logprobs_num", 0) >= 2:
            # SGLang's shape: per position [[logprob, id, text], ...], best first, FAKE_SERVER_MARGIN nats apart.
            # Runner-up: the unsalted pick + 1, so a salt of 1 swaps the two runs' top two candidates (a near tie
            # when the margin is small); a salted position's runner-up is the unsalted pick.
            margin = float(os.environ.get("FAKE_SERVER_MARGIN", "1.0"))
            second = [(t - salt if salt and i >= n // 2 else t + 1) % 262144 for i, t in enumerate(out)]
            meta["output_top_logprobs"] = [[[-12.0, t, f"t{t}"], [-12.0 - margin, r, f"t{r}"]]
                                           for t, r in zip(out, second, strict=True)]
        data = json.dumps({"text": " ".join(f"t{i}" for i in out), "output_ids": out, "meta_info": meta}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def say(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def spawn_family(pid_dir: Path) -> None:
    # The child starts the grandchild and records both pids; neither leaves the process group.
    code = (
        "import subprocess, sys, time, pathlib;"
        "d = pathlib.Path(sys.argv[1]);"
        "g = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.2)']);"
        "(d / 'grandchild.pid').write_text(str(g.pid));"
        "time.sleep(3600)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(pid_dir)])
    (pid_dir / "child.pid").write_text(str(child.pid))


def write_trap_dump() -> str:
    from kvtrap.config import Config
    from kvtrap.record.context import Context
    from kvtrap.record.dumpfile import write_dump
    from kvtrap.record.violation import KVTrapError, Violation

    violation = Violation(
        kind="swa_state_drift",
        summary="draft backend cached use_sliding_window_kv_pool=False but the live pool is an SWAKVPool",
        where="TRTLLMHAAttnBackend.forward_decode",
        layer_id=0,
        layer_type="swa",
        fatal=False,
    )
    cfg = Config.from_env()
    path = write_dump(violation, Context(hook="TRTLLMHAAttnBackend.forward_decode", forward_mode="DECODE"), {}, cfg)
    return str(KVTrapError(violation, path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", default="healthy")
    ap.add_argument("--delay", type=float, default=0.3)
    ap.add_argument("--after", type=float, default=0.5)
    ap.add_argument("--pid-dir", type=Path, default=None)
    ap.add_argument("--grandchild", action="store_true")
    args, _unknown = ap.parse_known_args()

    if args.mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.pid_dir is not None:
        args.pid_dir.mkdir(parents=True, exist_ok=True)
        (args.pid_dir / "server.pid").write_text(str(os.getpid()))
        if args.grandchild:
            spawn_family(args.pid_dir)

    say(f"[2026-06-01 10:00:00] server_args=ServerArgs(model_path='stand-in', port={args.port})")
    if args.mode == "crash-startup":
        time.sleep(args.delay)
        say(OOM_LOG)
        sys.exit(1)

    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    if args.mode != "never":
        time.sleep(args.delay)
        STATE["ready"] = True
        say("[2026-06-01 10:00:05] The server is fired up and ready to roll!")

    if args.mode == "crash":
        time.sleep(args.after)
        say(CRASH_LOG)
        os.kill(os.getpid(), signal.SIGKILL)
    elif args.mode == "trap":
        time.sleep(args.after)
        message = write_trap_dump()
        say(
            "[2026-06-01 10:12:04 TP0] Scheduler hit an exception: Traceback (most recent call last):\n"
            '  File "/x/sglang/srt/layers/attention/trtllm_mha_backend.py", line 1012, in forward_decode\n'
            f"kvtrap.record.violation.KVTrapError: {message}\n"
            "[2026-06-01 10:12:04] Received sigquit from a child process. It usually means the child failed."
        )
        os.kill(os.getpid(), signal.SIGKILL)
    elif args.mode == "die":
        time.sleep(args.after)
        os.kill(os.getpid(), signal.SIGSEGV)

    deadline = time.monotonic() + 120  # bounded: a stand-in never outlives a test run
    while time.monotonic() < deadline:
        time.sleep(0.1)


if __name__ == "__main__":
    main()
