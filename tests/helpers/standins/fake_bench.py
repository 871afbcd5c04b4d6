"""A short-lived stand-in for ``python -m sglang.bench_serving`` (tests only, loopback only).

Modes:
  ok     sends a few bounded GETs to /health, then prints a result table in the exact layout of
         sglang/benchmark/serving.py (0.5.23): "{:<40} {:<10}" / "{:<40} {:<10.2f}" rows.
  hang   sleeps (the runner's benchmark timeout must stop it).
  fail   prints an error and exits 1 while the server stays up.
  wait   polls /health until the server is gone, then reports failed requests (a crash mid-run).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

NUM = 80


def table(completed: int) -> str:
    rows = [
        "\n{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
        "{:<40} {:<10}".format("Backend:", "sglang"),
        "{:<40} {:<10}".format("Traffic request rate:", "inf"),
        "{:<40} {:<10}".format("Max request concurrency:", 64),
        "{:<40} {:<10}".format("Successful requests:", completed),
        "{:<40} {:<10.2f}".format("Benchmark duration (s):", 95.31),
        "{:<40} {:<10}".format("Total input tokens:", 640000),
        "{:<40} {:<10}".format("Total input text tokens:", 640000),
        "{:<40} {:<10}".format("Total generated tokens:", 80000),
        "{:<40} {:<10}".format("Total generated tokens (retokenized):", 79871),
        "{:<40} {:<10.2f}".format("Request throughput (req/s):", 0.84),
        "{:<40} {:<10.2f}".format("Input token throughput (tok/s):", 6715.14),
        "{:<40} {:<10.2f}".format("Output token throughput (tok/s):", 839.39),
        "{:<40} {:<10.2f}".format("Peak output token throughput (tok/s):", 1411.0),
        "{:<40} {:<10}".format("Peak concurrent requests:", 64),
        "{:<40} {:<10.2f}".format("Total token throughput (tok/s):", 7554.53),
        "{:<40} {:<10.2f}".format("Concurrency:", 57.12),
        "{:<40} {:<10.2f}".format("Accept length:", 2.87),
        "{s:{c}^{n}}".format(s="End-to-End Latency", n=50, c="-"),
        "{:<40} {:<10.2f}".format("Mean E2E Latency (ms):", 68012.55),
        "{:<40} {:<10.2f}".format("Median E2E Latency (ms):", 70101.02),
        "{s:{c}^{n}}".format(s="Time to First Token", n=50, c="-"),
        "{:<40} {:<10.2f}".format("Mean TTFT (ms):", 5123.40),
        "{:<40} {:<10.2f}".format("Median TTFT (ms):", 4200.11),
        "{:<40} {:<10.2f}".format("P99 TTFT (ms):", 15250.75),
        "{s:{c}^{n}}".format(s="Time per Output Token (excl. 1st token)", n=50, c="-"),
        "{:<40} {:<10.2f}".format("Mean TPOT (ms):", 62.95),
        "{:<40} {:<10.2f}".format("Median TPOT (ms):", 61.10),
        "{:<40} {:<10.2f}".format("P99 TPOT (ms):", 88.02),
        "{s:{c}^{n}}".format(s="Inter-Token Latency", n=50, c="-"),
        "{:<40} {:<10.2f}".format("Mean ITL (ms):", 180.41),
        "=" * 50,
    ]
    return "\n".join(rows)


def get(url: str) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", default="ok")
    args, _unknown = ap.parse_known_args()
    url = f"http://127.0.0.1:{args.port}/health"
    print("#Input tokens: 640000\n#Output tokens: 80000", flush=True)
    if args.mode == "ok":
        for _ in range(3):
            get(url)
        print(table(NUM), flush=True)
    elif args.mode == "hang":
        time.sleep(60)
    elif args.mode == "fail":
        print("Error running benchmark: ValueError('stand-in failure')", flush=True)
        sys.exit(1)
    elif args.mode == "wait":
        for _ in range(300):  # bounded: 30 s at most
            if get(url) is None:
                break
            time.sleep(0.1)
        print(table(0), flush=True)


if __name__ == "__main__":
    main()
