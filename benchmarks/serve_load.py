"""Load test of `llamaforge serve`: N concurrent clients x M requests, then batching against serial decoding.

    python benchmarks/serve_load.py                                 # tiny model, 32 clients x 10 requests
    python benchmarks/serve_load.py --clients 64 --requests 5 --max-tokens 64 --json serve.json
    python benchmarks/serve_load.py --model runs/tiny               # an existing model directory

The server is the real command (`python -m llamaforge serve ... --no-ui`) in a subprocess on 127.0.0.1, so the
clients (asyncio + httpx, in this process) do not share its interpreter. Every request is a non-streamed
/v1/completions call with a different prompt, greedy, `ignore_eos` and exactly `--max-tokens` new tokens, so
tokens/s is well defined. Latency is per request, from sending to the full answer.

Phase `load`: --clients clients, each sending --requests requests back to back, against --max-batch rows.
Phase `speedup`: --speedup-clients clients x --speedup-requests requests, first against the same batched server
(its numbers reused when the workload matches), then against a server started with --max-batch 1 (requests decoded
one at a time: serial). Ratio = batched tokens/s / serial tokens/s (target >= 3 at 16 clients).
Without --model a random model with the `tiny` preset's shape and a small trained tokenizer is written to a
temporary directory. --time-limit bounds each phase (requests still running then count as errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

WORDS = "once upon a time there was a little fox who lived in a forest and liked to run jump play".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`llamaforge serve` in a subprocess on 127.0.0.1."""

    def __init__(self, model: str, max_batch: int, threads: int | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "llamaforge", "serve", model, "--port", str(self.port)]
        cmd += ["--max-batch", str(max_batch), "--no-ui", "--log-level", "warning", "--name", "bench"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not start in time")

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()["engine"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def run_load(url: str, clients: int, requests: int, max_tokens: int, time_limit: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for r in range(requests):
            words = [WORDS[(c * 7 + r * 3 + i) % len(WORDS)] for i in range(4 + (c + r) % 9)]
            body = {
                "model": "bench",
                "prompt": " ".join(words),
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            t0 = time.perf_counter()
            try:
                resp = await http.post(f"{url}/v1/completions", json=body)
                if resp.status_code != 200:
                    errors.append(f"HTTP {resp.status_code}: {resp.text[:200]}")
                    continue
                tokens += resp.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - t0)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=time_limit, limits=limits) as http:
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(client(c, http)) for c in range(clients)]
        _done, pending = await asyncio.wait(tasks, timeout=time_limit)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - t0
    unfinished = clients * requests - len(latencies) - len(errors)
    if unfinished > 0:
        errors.extend(["not finished within --time-limit"] * unfinished)
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": clients * requests,
        "ok": len(latencies),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "p50_latency_s": round(statistics.median(lat), 3) if lat else None,
        "p99_latency_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
    }


def phase(server: Server, clients: int, requests: int, max_tokens: int, time_limit: float) -> dict:
    # one short warm-up request (first-call allocations), not counted
    asyncio.run(run_load(server.url, 1, 1, 2, time_limit))
    before = server.stats()
    result = asyncio.run(run_load(server.url, clients, requests, max_tokens, time_limit))
    after = server.stats()
    steps = after["steps"] - before["steps"]
    result["mean_rows_per_decode_step"] = round((after["decoded_tokens"] - before["decoded_tokens"]) / max(steps, 1), 2)
    result["max_rows_in_step"] = after["max_rows_in_step"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: a random tiny-shaped model)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--speedup-clients", type=int, default=16)
    ap.add_argument("--speedup-requests", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per phase")
    ap.add_argument("--skip-serial", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from llamaforge.serve.testing import tiny_model_dir

            model = str(tiny_model_dir(Path(tmp) / "tiny", dim=192, n_layers=4, n_heads=6, n_kv_heads=2))
        out: dict = {"model": args.model or "random, tiny preset shape", "platform": platform.platform()}

        batched = Server(model, args.max_batch, args.threads)
        try:
            batched.wait()
            out["load"] = phase(batched, args.clients, args.requests, args.max_tokens, args.time_limit)
            print(f"load ({args.clients} clients x {args.requests} requests, --max-batch {args.max_batch}):")
            print(json.dumps(out["load"], indent=2))
            same = (args.speedup_clients, args.speedup_requests) == (args.clients, args.requests)
            out["batched"] = (
                out["load"]
                if same
                else phase(batched, args.speedup_clients, args.speedup_requests, args.max_tokens, args.time_limit)
            )
        finally:
            batched.stop()
        if not args.skip_serial:
            serial = Server(model, 1, args.threads)
            try:
                serial.wait()
                out["serial"] = phase(
                    serial, args.speedup_clients, args.speedup_requests, args.max_tokens, args.time_limit
                )
            finally:
                serial.stop()
            ratio = out["batched"]["tokens_per_s"] / max(out["serial"]["tokens_per_s"], 1e-9)
            out["speedup_batched_over_serial"] = round(ratio, 2)
            print(f"{args.speedup_clients} clients x {args.speedup_requests} requests:")
            for name in ("batched", "serial"):
                r = out[name]
                print(
                    f"  {name:8s} {r['tokens_per_s']:8.1f} tok/s  {r['requests_per_s']:6.2f} req/s  "
                    f"p50 {r['p50_latency_s']}s  p99 {r['p99_latency_s']}s  errors {r['errors']}  "
                    f"rows/step {r['mean_rows_per_decode_step']}"
                )
            print(f"  speedup of batching over serial decoding: {ratio:.2f}x (target >= 3x)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
