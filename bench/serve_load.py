"""Load test of `glasslab serve` on loopback: streaming clients against the server with batching on and off.

A server is started as its own process (`glasslab serve RUN --max-batch B`) on 127.0.0.1 for each setting; C
client threads each send streaming chat requests one after another until R requests have been answered in all.
Reported per setting: throughput (completion tokens per second of wall time, from the usage the server
returns), time to first token and time per output token after the first (p50, p99 over requests), errors, and
the server's CPU time (tokens per CPU-second: on a machine shared with other work, wall-clock throughput
measures the share of the CPU the server got as much as the server itself). A last phase sends
`--memory-requests` short requests to the batching server and samples its resident memory along the way, to
show it stays bounded.

Without `--run`, the model is the `tiny` preset's architecture with random weights and its BPE tokenizer trained
on the bundled corpus: serving cost does not depend on the weights, and a random model rarely ends an answer
early, so every request generates about `--max-tokens` tokens. Everything stays on 127.0.0.1, bounded in count
(R requests per setting) and time (`--timeout` per request).

    python bench/serve_load.py [--run runs/chat] [--clients 16] [--requests 96] [--max-tokens 64]
        [--memory-requests 1000] [--out bench/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from glasslab.config import resolve
from glasslab.data.corpus import load_documents
from glasslab.data.tokenizer import Tokenizer
from glasslab.model.gpt import GPT
from glasslab.track.atomic import write_text_atomic
from glasslab.track.checkpoint import save_checkpoint
from glasslab.track.rundir import RunDir

PROMPTS = ["Tell me a story.", "What is 12+30?", "Who are you?", "Say something about the sea."]


def random_tiny_run(path: Path) -> Path:
    cfg = resolve("tiny")
    tok = Tokenizer.train(load_documents(None)[:200], cfg.tokenizer.kind, cfg.tokenizer.vocab_size)
    cfg.model.vocab_size = tok.vocab_size
    run = RunDir.create(path)
    tok.save(run.tokenizer_path)
    write_text_atomic(run.config_path, cfg.to_toml())
    torch.manual_seed(0)
    model = GPT(cfg.model)
    extra = {"arch": cfg.model.model_dump()}
    save_checkpoint(
        run.checkpoints_dir, "sft", 1, model=model.state_dict(), optimizer={}, rng={}, extra=extra, keep_last=1
    )
    run.update_manifest(status="completed", stage="sft", stages_done=["sft"], last_step=1)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, run: Path, max_batch: int, threads: int) -> None:
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "glasslab", "serve", str(run), "--port", str(self.port)]
        cmd += ["--max-batch", str(max_batch), "--max-concurrent", "256"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not start")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        """CPU seconds the server has used (user + system, all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def stream_once(port: int, model: str, prompt: str, max_tokens: int, seed: int, timeout: float) -> dict:
    """One streaming chat request: time to its first token, time per output token after it (the stream's span
    over its tokens), completion tokens. Reads whatever has arrived at once, so the client costs little CPU."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        return {"error": f"HTTP {response.status}"}
    first = last = None
    tokens, buffer = 0, b""
    while chunk := response.read1(65536):
        now = time.perf_counter()
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"error": event["error"]["message"]}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"]:
                first, last = first or now, now
    conn.close()
    if first is None:
        return {"error": "no chunk"}
    return {"ttft": first - start, "tpot": (last - first) / max(1, tokens - 1), "tokens": tokens}


def load(port: int, model: str, clients: int, requests: int, max_tokens: int, timeout: float) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                r = stream_once(port, model, PROMPTS[i % len(PROMPTS)], max_tokens, i, timeout)
            except OSError as e:
                r = {"error": str(e)}
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft"] for r in ok)
    tpot = sorted(r["tpot"] for r in ok)

    def pct(xs: list[float], q: float) -> float | None:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2) if xs else None

    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": sorted({r["error"] for r in results if "error" in r})[:3],
        "completion_tokens": sum(r["tokens"] for r in ok),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "ttft_ms": {"p50": pct(ttft, 0.5), "p99": pct(ttft, 0.99)},
        "per_token_ms": {"p50": pct(tpot, 0.5), "p99": pct(tpot, 0.99)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a run to serve (default: a random-weight `tiny` model)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=96, help="requests per setting")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32, help="the batching server's decode batch")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--memory-requests", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or random_tiny_run(Path(tmp) / "runs" / "tiny")
        result: dict = {
            "clients": args.clients,
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0],
        }
        for name, max_batch in (("batching_off", 1), ("batching_on", args.max_batch)):
            server = Server(run, max_batch, args.threads)
            try:
                stream_once(server.port, run.name, PROMPTS[0], 4, 0, args.timeout)  # warm-up
                cpu = server.cpu_s()
                result[name] = load(server.port, run.name, args.clients, args.requests, args.max_tokens, args.timeout)
                cpu = server.cpu_s() - cpu
                result[name] |= {
                    "server_cpu_s": round(cpu, 2),
                    "tokens_per_cpu_s": round(result[name]["completion_tokens"] / cpu, 1),
                }
                print(name, json.dumps(result[name]), flush=True)
                if name == "batching_on" and args.memory_requests:
                    rss, errors = [round(server.rss_mb(), 1)], 0
                    step = max(1, args.memory_requests // 10)
                    for done in range(0, args.memory_requests, step):
                        n = min(step, args.memory_requests - done)
                        errors += load(server.port, run.name, args.clients, n, 16, args.timeout)["errors"]
                        rss.append(round(server.rss_mb(), 1))
                    result["memory"] = {"requests": args.memory_requests, "errors": errors, "rss_mb_every_tenth": rss}
                    print("memory", json.dumps(result["memory"]), flush=True)
            finally:
                server.stop()
        off, on = result["batching_off"]["tokens_per_s"], result["batching_on"]["tokens_per_s"]
        result["speedup"] = round(on / off, 2) if off else None
        off_cpu, on_cpu = result["batching_off"]["tokens_per_cpu_s"], result["batching_on"]["tokens_per_cpu_s"]
        result["speedup_per_cpu_s"] = round(on_cpu / off_cpu, 2)
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
