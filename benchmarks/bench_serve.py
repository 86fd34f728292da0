"""Load benchmark of `molecule-gpt serve` on loopback: concurrent streaming chat clients against
the real command, with the organism learning (background bursts) and without, in paired rounds.

    PYTHONPATH=src python benchmarks/bench_serve.py                    # 16 clients x 60 s, 3 rounds
    PYTHONPATH=src python benchmarks/bench_serve.py --clients 4 --duration 5 --rounds 1 --quick

What one round does, for each mode (training off: `--no-learn`; training on: learning with a
config that fires a checked burst whenever anything new was heard, every train tick, so the
trainer is busy most of the run), in alternating order from round to round:
  - copies one warmed-up home (made once, at the start) and starts `molecule-gpt serve` on it in
    a subprocess on a free loopback port;
  - runs N clients for D seconds in this process (asyncio + httpx): each holds one conversation,
    sends it whole with a new user line (from the seed corpus) as a streamed chat completion
    (max_tokens 64, a 30 s timeout, usage included), and keeps the reply;
  - measures per request the time to first token (request sent -> first content piece) and the
    tokens (the usage chunk); any status other than 200, a timeout, an error event or a stream
    without `data: [DONE]` is an error;
  - reads the organism's status before and after (steps, bursts), stops the server with SIGINT
    (it saves) and checks that it exited 0.
The load generator's CPU share is this process's CPU time over wall time during the load.

Printed: per round and mode, requests, errors, tokens/s in total, TTFT p50/p99 (ms), bursts and
training steps during the load, the mean number of requests one decode step advanced (the
server decodes concurrent requests together), load-generator CPU; then the medians over rounds and the paired
ratio TTFT p99 (training on / off) per round and its median (target: at most 1.5).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

import molecule_gpt as mg

TRAINING_CONFIG = {"qb_cooldown_seconds": 0.0, "qb_min_bytes": 1, "train_tick_seconds": 0.25}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def make_home(path: pathlib.Path, warmup_steps: int | None) -> None:
    """A warmed-up home, as `molecule-gpt train` leaves it."""
    args = [sys.executable, "-m", "molecule_gpt", "--home", str(path)]
    if warmup_steps is not None:
        cfg = path.parent / "warmup.json"
        cfg.write_text(json.dumps({"warmup_steps": warmup_steps}))
        args += ["--config", str(cfg)]
    proc = subprocess.run(args + ["train"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"could not make the home: {proc.stderr}")


class Server:
    """`molecule-gpt serve` on a copy of the template home."""

    def __init__(self, template: pathlib.Path, workdir: pathlib.Path, learn: bool):
        self.home = workdir / ("learn" if learn else "frozen")
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.copytree(template, self.home, ignore=shutil.ignore_patterns(".lock"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "molecule_gpt", "serve", "--home", str(self.home), "--port", str(self.port)]
        if learn:
            cfg = workdir / "training.json"
            cfg.write_text(json.dumps(TRAINING_CONFIG))
            cmd += ["--config", str(cfg)]
        else:
            cmd += ["--no-learn"]
        self.log = open(workdir / f"server-{'learn' if learn else 'frozen'}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.name = self.home.name

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/v1/organisms/{self.name}/status", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit("the server did not become ready")

    def status(self) -> dict:
        return httpx.get(f"{self.url}/v1/organisms/{self.name}/status", timeout=30).json()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=120)
        finally:
            self.log.close()
        return code


async def client(i: int, url: str, model: str, lines: list[str], until: float, max_tokens: int,
                 timeout: float, results: list) -> None:
    rng = random.Random(i)
    history: list[dict] = []
    async with httpx.AsyncClient(timeout=timeout) as http:
        while time.monotonic() < until:
            history.append({"role": "user", "content": rng.choice(lines)})
            body = {"model": model, "messages": history[-7:], "stream": True, "max_tokens": max_tokens,
                    "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            ttft, tokens, reply, error = None, 0, [], None
            try:
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                    if resp.status_code != 200:
                        error = f"status {resp.status_code}: {(await resp.aread())[:200]!r}"
                    else:
                        done = False
                        async for line in resp.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            data = line[6:]
                            if data == "[DONE]":
                                done = True
                                break
                            chunk = json.loads(data)
                            if "error" in chunk:
                                error = chunk["error"]["message"]
                                break
                            if chunk.get("usage"):
                                tokens = chunk["usage"]["completion_tokens"]
                            for choice in chunk["choices"]:
                                piece = choice["delta"].get("content")
                                if piece:
                                    if ttft is None:
                                        ttft = time.perf_counter() - t0
                                    reply.append(piece)
                        if not done and error is None:
                            error = "the stream ended without [DONE]"
            except (httpx.HTTPError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            results.append({"client": i, "ttft": ttft, "tokens": tokens, "seconds": time.perf_counter() - t0,
                            "error": error})
            history.append({"role": "assistant", "content": "".join(reply)})


async def load(url: str, model: str, clients: int, duration: float, max_tokens: int, timeout: float,
               lines: list[str]) -> tuple[list, float, float]:
    results: list = []
    until = time.monotonic() + duration
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(i, url, model, lines, until, max_tokens, timeout, results)
                           for i in range(clients)))
    return results, time.perf_counter() - t0, time.process_time() - cpu0


def run_mode(template, workdir, learn: bool, args, lines) -> dict:
    srv = Server(template, workdir, learn)
    try:
        srv.wait_ready()
        before = srv.status()
        results, wall, cpu = asyncio.run(load(srv.url, srv.name, args.clients, args.duration, args.max_tokens,
                                              args.timeout, lines))
        after = srv.status()
    finally:
        code = srv.stop()
    errors = [r for r in results if r["error"]]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None and not r["error"]]
    return {
        "mode": "training on" if learn else "training off",
        "requests": len(results), "errors": len(errors), "first_errors": [r["error"] for r in errors[:3]],
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_ms": 1e3 * percentile(ttfts, 0.5), "ttft_p99_ms": 1e3 * percentile(ttfts, 0.99),
        "bursts": after["bursts"]["total"] - before["bursts"]["total"],
        "accepted": after["bursts"]["accepted"] - before["bursts"]["accepted"],
        "train_steps": after["steps"] - before["steps"],
        "mean_batch": ((after["decoding"]["tokens"] - before["decoding"]["tokens"])
                       / max(1, after["decoding"]["steps"] - before["decoding"]["steps"])),
        "loadgen_cpu_share": cpu / wall, "wall_s": wall, "server_exit": code,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per mode and round")
    p.add_argument("--rounds", type=int, default=3, help="paired rounds (off/on, alternating order)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=30.0, help="each request's timeout (s)")
    p.add_argument("--quick", action="store_true", help="a short warmup (200 steps) for the template home")
    p.add_argument("--json", metavar="FILE", help="also write every figure here")
    args = p.parse_args(argv)
    # a SIGTERM ends the run like Ctrl-C: the servers are stopped and the temporary homes removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    lines = mg.seed_corpus_lines()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = pathlib.Path(tmp)
        template = workdir / "pet"
        t0 = time.perf_counter()
        make_home(template, 200 if args.quick else None)
        print(f"template home warmed up in {time.perf_counter() - t0:.1f} s; {args.clients} clients x "
              f"{args.duration:g} s per mode, max_tokens {args.max_tokens}, {args.rounds} round(s)", flush=True)
        for rnd in range(args.rounds):
            for learn in ((False, True) if rnd % 2 == 0 else (True, False)):
                row = run_mode(template, workdir, learn, args, lines)
                row["round"] = rnd
                rows.append(row)
                print(f"round {rnd} {row['mode']:>12}: {row['requests']} requests, {row['errors']} errors, "
                      f"{row['tokens_per_s']:,.0f} tokens/s, TTFT p50 {row['ttft_p50_ms']:.1f} ms p99 "
                      f"{row['ttft_p99_ms']:.1f} ms, {row['bursts']} bursts ({row['accepted']} kept, "
                      f"{row['train_steps']} steps), mean decode batch {row['mean_batch']:.1f}, load generator CPU {100 * row['loadgen_cpu_share']:.0f}% "
                      f"of a core" + (f"; errors: {row['first_errors']}" if row["errors"] else ""), flush=True)
    print()
    print("medians over rounds:")
    for mode in ("training off", "training on"):
        mine = [r for r in rows if r["mode"] == mode]
        med = {k: statistics.median(r[k] for r in mine)
               for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "bursts", "loadgen_cpu_share")}
        print(f"  {mode:>12}: errors {sum(r['errors'] for r in mine)} of {sum(r['requests'] for r in mine)} requests, "
              f"{med['tokens_per_s']:,.0f} tokens/s, TTFT p50 {med['ttft_p50_ms']:.1f} ms, p99 "
              f"{med['ttft_p99_ms']:.1f} ms, {med['bursts']:.0f} bursts, load generator CPU "
              f"{100 * med['loadgen_cpu_share']:.0f}% of a core")
    ratios = []
    for rnd in range(args.rounds):
        off = next(r for r in rows if r["round"] == rnd and r["mode"] == "training off")
        on = next(r for r in rows if r["round"] == rnd and r["mode"] == "training on")
        ratios.append(on["ttft_p99_ms"] / off["ttft_p99_ms"])
    print(f"TTFT p99 training on / off, per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"median {statistics.median(ratios):.2f} (target <= 1.5)")
    errors = sum(r["errors"] for r in rows)
    bad_exit = [r for r in rows if r["server_exit"] != 0]
    print(f"errors in all: {errors}; server exits: {sorted({r['server_exit'] for r in rows})}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "ratios": ratios}, indent=2))
    return 1 if errors or bad_exit else 0


if __name__ == "__main__":
    sys.exit(main())
