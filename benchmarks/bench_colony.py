"""Many organisms: `molecule-gpt serve --ray` (molecule_gpt.colony on a local Ray instance, behind
Ray Serve) against the single-process `molecule-gpt serve --homes DIR` holding the same organisms;
the cost of loading an idle organism; what a node failure costs on a local multi-node Ray cluster.

    PYTHONPATH=src python benchmarks/bench_colony.py                      # 1, 4, 16, 64 organisms
    PYTHONPATH=src python benchmarks/bench_colony.py --organisms 1,4 --duration 5 --quick

What it does:
  - makes one warmed-up home (the default Config; --warmup-steps shortens its warmup) and copies
    its checkpoint into 64 organisms: homes for the single-process server, and organisms of a
    colony (Colony.create(checkpoint=...)) in a shared directory;
  - for each count N: `molecule-gpt serve --homes DIR --no-learn` on N homes in a subprocess,
    and the colony (--hosts hosts of one CPU each, learning off) served through Ray Serve with
    the same N organisms; against each, C concurrent streaming chat clients (asyncio + httpx,
    max_tokens --max-tokens, a 30 s timeout) for D seconds, request k of client i going to
    organism (i + k*C) mod N, so every organism is asked; per request the time to first token and
    the completion tokens; any non-200, timeout, error event or stream without [DONE] is an error;
  - idle load: an organism of the colony released from its host, then asked for one token: that
    first call against a call to the loaded organism (medians of --repeats), beside
    Organism.load of the same checkpoint in this process;
  - node failure (--multinode): a Ray cluster of two nodes on this machine (ray.cluster_utils),
    a colony of two hosts spread over them, an organism on the second node told 6 turns with a
    save every 4; the node is removed (its raylet and workers killed), and the time until the
    organism answers again (its host restarted on the head node, the organism loaded from the
    shared storage) and the turns it lost are measured.

Learning is off in the throughput runs: they measure serving (routing, HTTP, generation), not
training, which the single-process server runs as one background trainer per organism (64
trainers compete for the cores) and the colony in one slot per host.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import molecule_gpt as mg  # noqa: E402
from bench_serve import free_port, make_home, percentile  # noqa: E402


async def client(i: int, url: str, names: list[str], clients: int, lines: list[str], until: float,
                 max_tokens: int, timeout: float, results: list) -> None:
    rng = random.Random(i)
    k = 0
    async with httpx.AsyncClient(timeout=timeout) as http:
        while time.monotonic() < until:
            model = names[(i + k * clients) % len(names)]
            k += 1
            body = {"model": model, "messages": [{"role": "user", "content": rng.choice(lines)}], "stream": True,
                    "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            ttft, tokens, error = None, 0, None
            try:
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                    if resp.status_code != 200:
                        error = f"status {resp.status_code}: {(await resp.aread())[:200]!r}"
                    else:
                        done = False
                        async for line in resp.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            if line[6:] == "[DONE]":
                                done = True
                                break
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                error = chunk["error"]["message"]
                                break
                            if chunk.get("usage"):
                                tokens = chunk["usage"]["completion_tokens"]
                            for choice in chunk["choices"]:
                                if choice["delta"].get("content") and ttft is None:
                                    ttft = time.perf_counter() - t0
                        if not done and error is None:
                            error = "the stream ended without [DONE]"
            except (httpx.HTTPError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            results.append({"ttft": ttft, "tokens": tokens, "error": error, "model": model})


def run_load(url: str, names: list[str], args, lines: list[str]) -> dict:
    async def go():
        results: list = []
        until = time.monotonic() + args.duration
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client(i, url, names, args.clients, lines, until, args.max_tokens, 30.0, results)
                               for i in range(args.clients)))
        return results, time.perf_counter() - t0, time.process_time() - cpu0
    # a short warm-up round (first requests load code paths and, in the colony, route to hosts)
    warm = argparse.Namespace(**{**vars(args), "duration": min(3.0, args.duration)})
    asyncio.run(_warm(url, names, warm, lines))
    results, wall, cpu = asyncio.run(go())
    errors = [r for r in results if r["error"]]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None and not r["error"]]
    return {"requests": len(results), "errors": len(errors), "first_errors": [r["error"] for r in errors[:3]],
            "requests_per_s": len(results) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_ms": 1e3 * percentile(ttfts, 0.5), "ttft_p99_ms": 1e3 * percentile(ttfts, 0.99),
            "organisms_asked": len({r["model"] for r in results}), "loadgen_cpu_share": cpu / wall}


async def _warm(url, names, args, lines):
    results: list = []
    until = time.monotonic() + args.duration
    await asyncio.gather(*(client(i, url, names, args.clients, lines, until, args.max_tokens, 60.0, results)
                           for i in range(args.clients)))


class SingleProcess:
    """`molecule-gpt serve --homes DIR --no-learn` on N copies of the template home."""

    def __init__(self, template: pathlib.Path, workdir: pathlib.Path, names: list[str]):
        self.root = workdir / f"homes-{len(names)}"
        shutil.rmtree(self.root, ignore_errors=True)
        for name in names:
            (self.root / name).mkdir(parents=True)
            shutil.copyfile(template, self.root / name / "organism.ckpt")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.names = names
        self.log = open(workdir / f"single-{len(names)}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "molecule_gpt", "serve", "--homes", str(self.root),
                                      "--no-learn", "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/v1/organisms/{self.names[-1]}/status", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("the single-process server did not become ready")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=300)
        finally:
            self.log.close()


def idle_load_cost(colony, template: pathlib.Path, repeats: int) -> dict:
    """A released organism's first call against a loaded one's (one token each); Organism.load."""
    pet = colony.get("o0")
    pet.run("x", max_gen_tokens=1, seed=0)
    cold, warm = [], []
    for _ in range(repeats):
        pet.release()
        t0 = time.perf_counter()
        pet.run("x", max_gen_tokens=1, seed=0)
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pet.run("x", max_gen_tokens=1, seed=0)
        warm.append(time.perf_counter() - t0)
    local = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mg.Organism.load(template).close()
        local.append(time.perf_counter() - t0)
    return {"first_call_after_release_ms": 1e3 * statistics.median(cold),
            "call_when_loaded_ms": 1e3 * statistics.median(warm),
            "load_cost_ms": 1e3 * (statistics.median(cold) - statistics.median(warm)),
            "organism_load_in_process_ms": 1e3 * statistics.median(local),
            "checkpoint_bytes": template.stat().st_size}


def multinode(template: pathlib.Path, workdir: pathlib.Path) -> dict:
    """Two Ray nodes on this machine; the node holding an organism's host dies."""
    import ray
    from ray.cluster_utils import Cluster
    from molecule_gpt.colony import Colony, host_for
    # (on this machine's own address, as ray.cluster_utils runs its nodes: Ray's test clusters do
    # not bind their GCS to loopback)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, namespace="molecule-gpt", log_to_driver=False)
        store = workdir / "multinode-shared"
        colony = Colony(store, address=cluster.address, hosts=2, host_cpus=0.5, settings={"autosave_turns": 4},
                        name="bench-multi", timeout=600)
        hosts = colony.hosts_info()
        on_worker = [h["index"] for h in hosts if h["node_id"] == worker.node_id]
        if not on_worker:
            return {"skipped": "both hosts were placed on the head node", "hosts": hosts}
        name = next(f"m{i}" for i in range(100) if host_for(f"m{i}", 2) == on_worker[0])
        colony.create(name, checkpoint=template)
        pet = colony.get(name)
        for i in range(6):
            msgs = [("user", f"turn {i}: the buoy number is {i * 7}.")]
            reply = pet.generate(msgs[0][1], max_gen_tokens=8, seed=i)
            pet.chat(msgs, reply)
        info = pet.info()
        cluster.remove_node(worker, allow_graceful=False)
        t_killed = time.perf_counter()
        # the node is dead once Ray says so (its workers go with their raylet)
        while any(n["NodeID"] == worker.node_id and n["Alive"] for n in ray.nodes()):
            if time.perf_counter() - t_killed > 600:
                raise SystemExit("the removed node is still alive after 600 s")
            time.sleep(0.1)
        dead = time.perf_counter() - t_killed
        while True:  # answered by a host on the surviving node
            try:
                pet.generate("back?", max_gen_tokens=2, seed=1)
                if all(h["node_id"] != worker.node_id for h in colony.hosts_info()):
                    break
            except Exception:
                pass
            if time.perf_counter() - t_killed > 600:
                raise SystemExit("the organism did not come back within 600 s")
            time.sleep(0.2)
        back = time.perf_counter() - t_killed
        kept = [m for m in pet.memory_and_corpus()["messages"] if m[1].startswith("turn ")]
        after = colony.hosts_info()
        return {"nodes": 2, "hosts_before": [(h["index"], h["node_id"][:8]) for h in hosts],
                "hosts_after": [(h["index"], h["node_id"][:8]) for h in after],
                "organism": name, "turns_told": 6, "turns_since_save_at_kill": info["turns_since_save"],
                "turns_kept": len(kept), "turns_lost": 6 - len(kept),
                "seconds_until_node_declared_dead": dead, "seconds_until_it_answers_again": back}
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organisms", default="1,4,16,64", help="comma-separated organism counts")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per measurement")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hosts", type=int, default=2, help="colony host actors (one CPU each)")
    ap.add_argument("--warmup-steps", type=int, default=300, help="the template organism's warmup")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a 60-step warmup")
    ap.add_argument("--skip", default="", help="comma-separated: single,colony,idle,multinode")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.organisms.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"# machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}; {args.clients} clients x {args.duration:g} s, max_tokens {args.max_tokens}",
          flush=True)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-colony-"))
    lines = mg.seed_corpus_lines()
    out: dict = {"args": vars(args), "single": {}, "colony": {}}
    try:
        t0 = time.perf_counter()
        make_home(workdir / "template", 60 if args.quick else args.warmup_steps)
        template = workdir / "template" / "organism.ckpt"
        print(f"# template organism warmed up in {time.perf_counter() - t0:.1f} s "
              f"({template.stat().st_size:,} bytes)", flush=True)
        names = [f"o{i}" for i in range(max(counts))]
        if "single" not in skip:
            for n in counts:
                srv = SingleProcess(template, workdir, names[:n])
                try:
                    t0 = time.perf_counter()
                    srv.wait_ready()
                    ready = time.perf_counter() - t0
                    r = run_load(srv.url, names[:n], args, lines)
                finally:
                    code = srv.stop()
                r.update(startup_s=ready, exit=code)
                out["single"][n] = r
                print(f"single process, {n:>2} organisms: {r['requests_per_s']:6.1f} req/s, "
                      f"{r['tokens_per_s']:7.0f} tok/s, TTFT p50 {r['ttft_p50_ms']:6.1f} ms p99 {r['ttft_p99_ms']:7.1f} ms, "
                      f"errors {r['errors']}, {r['organisms_asked']} asked, load generator CPU "
                      f"{100 * r['loadgen_cpu_share']:.0f}%, ready in {ready:.1f} s", flush=True)
        if not {"colony", "idle"} <= skip:
            import ray
            from ray import serve
            from molecule_gpt.colony import Colony
            t0 = time.perf_counter()
            colony = Colony(workdir / "shared", hosts=args.hosts, host_cpus=1, learn=False, num_cpus=args.hosts,
                            name="bench", timeout=600)
            for name in names:
                colony.create(name, checkpoint=template)
            print(f"# colony: {args.hosts} hosts, {len(names)} organisms created in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            try:
                if "colony" not in skip:
                    url = colony.serve(port=free_port())
                    for n in counts:
                        r = run_load(url, names[:n], args, lines)
                        out["colony"][n] = r
                        print(f"colony (Ray), {n:>2} organisms: {r['requests_per_s']:6.1f} req/s, "
                              f"{r['tokens_per_s']:7.0f} tok/s, TTFT p50 {r['ttft_p50_ms']:6.1f} ms p99 "
                              f"{r['ttft_p99_ms']:7.1f} ms, errors {r['errors']}, {r['organisms_asked']} asked, "
                              f"load generator CPU {100 * r['loadgen_cpu_share']:.0f}%", flush=True)
                    serve.shutdown()
                if "idle" not in skip:
                    out["idle"] = idle_load_cost(colony, template, args.repeats)
                    i = out["idle"]
                    print(f"idle organism: first call after release {i['first_call_after_release_ms']:.0f} ms, "
                          f"loaded {i['call_when_loaded_ms']:.1f} ms: loading costs {i['load_cost_ms']:.0f} ms "
                          f"(Organism.load in process {i['organism_load_in_process_ms']:.0f} ms; checkpoint "
                          f"{i['checkpoint_bytes']:,} bytes)", flush=True)
            finally:
                ray.shutdown()
        if "multinode" not in skip:
            out["multinode"] = m = multinode(template, workdir)
            print(f"multi-node: {json.dumps(m)}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
