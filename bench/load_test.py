"""Load test of `ds4py serve` on loopback: requests/s and generated tokens/s at 1, 4 and 16 concurrent
clients, each sending chat requests for a fixed number of rounds. Bounded: it makes a tiny model (or
uses --model), starts the server itself on 127.0.0.1, and stops it at the end.

    python bench/load_test.py [--model PATH] [--clients 1,4,16] [--requests 3] [--max-tokens 32] [--parallel 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_client(url: str, i: int, rounds: int, max_tokens: int, out: list) -> None:
    with httpx.Client(timeout=600) as http:
        for r in range(rounds):
            body = {"messages": [{"role": "user", "content": f"Client {i}, request {r}: tell me something."}],
                    "max_tokens": max_tokens, "temperature": 0.7, "seed": i * 100 + r, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first, usage = None, None
            with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - t0
                    usage = chunk.get("usage") or usage
            out.append({"seconds": time.perf_counter() - t0, "ttft": first or 0.0,
                        "tokens": usage["completion_tokens"]})


def run_level(url: str, clients: int, rounds: int, max_tokens: int) -> dict:
    results: list[dict] = []
    threads = [threading.Thread(target=one_client, args=(url, i, rounds, max_tokens, results)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "seconds": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": tokens / wall, "ttft_median_s": statistics.median(r["ttft"] for r in results),
            "latency_median_s": statistics.median(r["seconds"] for r in results)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: a tiny generated model)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=4, help="the server's --parallel")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="the server's --threads (default: all cores but one, which the clients use)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "tiny.gguf")
            subprocess.run([sys.executable, "-m", "ds4py.cli", "make-model", model, "--preset", "tiny"], check=True,
                           capture_output=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "ds4py.cli", "serve", model, "--port", str(port),
                                   "--parallel", str(args.parallel), "--prefix-cache", "0",
                                   "--threads", str(args.threads)],
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline or server.poll() is not None:
                    print("the server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            print(f"model {model}, server --parallel {args.parallel} --threads {args.threads}, {args.requests} "
                  f"requests per client, "
                  f"{args.max_tokens} tokens each")
            print("| clients | requests | req/s | gen tok/s | median TTFT s | median latency s |")
            print("|--------:|---------:|------:|----------:|--------------:|-----------------:|")
            for n in (int(x) for x in args.clients.split(",")):
                r = run_level(url, n, args.requests, args.max_tokens)
                print(f"| {n} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                      f"{r['ttft_median_s']:.3f} | {r['latency_median_s']:.3f} |", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
