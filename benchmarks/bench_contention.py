"""Training step time on a quiet machine and beside one busy process, in the same run.

    python benchmarks/bench_contention.py [--rounds 5] [--steps 150] [--warmup-steps 300]
                                          [--python OTHER/bin/python ...]

The hog is one single-threaded busy loop (a second Python process), same priority, not pinned.
Each round times `--steps` default-config training steps quiet and `--steps` beside the hog, in
`--blocks` alternating blocks (quiet, hog, quiet, hog, ...: a drift of the shared machine's
speed lands on both), then the organism's warmup (`--warmup-steps` steps of Organism.warmup on
the shipped seed corpus) quiet and beside the hog. The figure: p90 of the steps beside the hog
over the median of the quiet steps (target <= 2), per round; also per block pair (the block
beside the hog against the quiet block before it), whose median is the least drift-prone. With `--python`, each round runs every interpreter in turn
(order alternating between rounds) in a fresh process, so two builds are compared paired: the
quiet medians give the A/B of quiet-machine speed. Run it with the machine otherwise quiet.

Beside every step it also times a reference job (`--reference-parts`, 32 by default): the quiet
step's CPU time (all threads, its Python included) cut into equal pieces of pure computation
that the same pool's threads take as they come. Nothing in it waits for memory or for a part
held by a thread the scheduler has parked, so its p90/quiet is what the scheduler leaves a
perfectly divisible job of the same size beside the hog: the floor the step's ratio can approach.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, subprocess, sys, time
import numpy as np
import molecule_gpt as mg
from molecule_gpt.model import Model

n_steps, warmup_steps, blocks, ref_parts = (int(a) for a in sys.argv[1:5])
from molecule_gpt import _core
cfg = mg.Config()
rng = np.random.default_rng(0)
model = Model(cfg, 96, seed=0)
batch = [rng.integers(0, 96, cfg.block_size + 1).tolist() for _ in range(cfg.batch_size)]

def steps(n):
    out, ref = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        model.train_step(batch, 1e-3)
        out.append(time.perf_counter() - t0)
        if ref_parts:
            t0 = time.perf_counter()
            _core._pool_busy(ref_parts, -1, 0.0, model.n_threads, ref_cpu / ref_parts)
            ref.append(time.perf_counter() - t0)
    return out, ref

def warmup():
    org = mg.Organism(cfg, mg.seed_corpus_lines(), seed=0)
    t0 = time.perf_counter()
    org.warmup(warmup_steps)
    seconds = time.perf_counter() - t0
    org.close()
    return seconds

def hog():
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # let it reach full speed
    return p

# the reference job: the CPU time of a quiet step (all threads, the step's Python included) cut
# into ref_parts equal pieces of pure computation, taken by the same pool's threads as they come
ref_parts_asked, ref_parts = ref_parts, 0
steps(20)
c0 = time.process_time()
steps(50)
ref_cpu, ref_parts = (time.process_time() - c0) / 50, ref_parts_asked
quiet, busy, pairs, ref_quiet, ref_busy = [], [], [], [], []
if not blocks:
    quiet = steps(n_steps)[0]
per_block = max(1, n_steps // max(blocks, 1))
for _ in range(blocks):
    q, rq = steps(per_block)
    h = hog()
    try:
        b, rb = steps(per_block)
    finally:
        h.kill(); h.wait()
    time.sleep(0.1)
    quiet += q
    busy += b
    ref_quiet += rq
    ref_busy += rb
    pairs.append(sorted(b)[min(len(b) - 1, int(0.9 * len(b)))] / statistics.median(q))
quiet_warmup = busy_warmup = None
if warmup_steps:
    quiet_warmup = warmup()
    h = hog()
    try:
        busy_warmup = warmup()
    finally:
        h.kill(); h.wait()
print(json.dumps({"quiet": quiet, "busy": busy, "pairs": pairs, "ref_quiet": ref_quiet, "ref_busy": ref_busy,
                  "ref_cpu": ref_cpu, "quiet_warmup": quiet_warmup, "busy_warmup": busy_warmup,
                  "threads": model.n_threads, "version": mg.__version__}))
"""


def p90(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--blocks", type=int, default=5, help="alternating quiet / hog blocks per round")
    ap.add_argument("--warmup-steps", type=int, default=300, help="0 skips the warmup timing")
    ap.add_argument("--reference-parts", type=int, default=32,
                    help="also time, after every step, the step's CPU time cut into this many equal "
                         "pieces of pure computation on the same pool (0: off): what the scheduler "
                         "allows a perfectly divisible job of the same size")
    ap.add_argument("--python", nargs="*", default=[], help="other interpreters to compare, paired")
    ap.add_argument("--quiet-only", action="store_true",
                    help="no hog, no warmup: the paired quiet-step A/B of the interpreters alone")
    args = ap.parse_args(argv)
    if args.quiet_only:
        args.blocks, args.warmup_steps = 0, 0
    pythons = [sys.executable] + args.python
    rows = {p: [] for p in pythons}
    print(f"# {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; {args.rounds} rounds of {args.steps} steps")
    for r in range(args.rounds):
        order = pythons if r % 2 == 0 else pythons[::-1]
        for py in order:
            out = subprocess.run([py, "-c", CHILD, str(args.steps), str(args.warmup_steps), str(args.blocks),
                                  str(0 if args.quiet_only else args.reference_parts)],
                                 capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
            if out.returncode:
                sys.exit(f"{py} failed:\n{out.stderr}")
            d = json.loads(out.stdout.strip().splitlines()[-1])
            q = statistics.median(d["quiet"])
            rows[py].append({"quiet_median": q})
            if args.quiet_only:
                print(f"round {r} {py}: step quiet median {q * 1e3:.2f} ms", flush=True)
                continue
            b = p90(d["busy"])
            rows[py][-1].update({"busy_median": statistics.median(d["busy"]), "busy_p90": b, "ratio": b / q,
                                 "pair_ratio": statistics.median(d["pairs"]), "quiet_warmup": d["quiet_warmup"],
                                 "busy_warmup": d["busy_warmup"]})
            if d["ref_busy"]:
                rq, rb = statistics.median(d["ref_quiet"]), p90(d["ref_busy"])
                rows[py][-1]["ref_ratio"] = rb / rq
                print(f"round {r} {py}: reference job ({args.reference_parts} equal pieces, "
                      f"{d['ref_cpu'] * 1e3:.2f} ms of CPU) quiet median {rq * 1e3:.2f} ms, beside the hog "
                      f"p90 {rb * 1e3:.2f} ms: p90/quiet {rb / rq:.2f}", flush=True)
            w = (f"; warmup {d['quiet_warmup']:.2f} s quiet, {d['busy_warmup']:.2f} s beside the hog"
                 if d["quiet_warmup"] is not None else "")
            print(f"round {r} {py}: step quiet median {q * 1e3:.2f} ms, beside the hog median "
                  f"{statistics.median(d['busy']) * 1e3:.2f} p90 {b * 1e3:.2f} ms: p90/quiet {b / q:.2f} "
                  f"(per block pair {', '.join(f'{x:.2f}' for x in d['pairs'])}){w}",
                  flush=True)
    print("\nsummary (median over rounds)")
    base = statistics.median(r["quiet_median"] for r in rows[pythons[0]])
    for py in pythons:
        rs = rows[py]
        med = lambda k: statistics.median(r[k] for r in rs if r[k] is not None)  # noqa: E731
        if args.quiet_only:
            print(f"{py}: quiet step {med('quiet_median') * 1e3:.2f} ms ({med('quiet_median') / base:.3f}x the first)")
            continue
        line = (f"{py}: quiet step {med('quiet_median') * 1e3:.2f} ms ({med('quiet_median') / base:.3f}x the "
                f"first), beside the hog p90 {med('busy_p90') * 1e3:.2f} ms, p90/quiet {med('ratio'):.2f} "
                f"(worst round {max(r['ratio'] for r in rs):.2f}; per block pair, median of rounds' medians "
                f"{med('pair_ratio'):.2f})")
        if any("ref_ratio" in r for r in rs):
            line += (f"; the reference job p90/quiet {statistics.median(r['ref_ratio'] for r in rs):.2f} "
                     f"(worst round {max(r['ref_ratio'] for r in rs):.2f})")
        if args.warmup_steps:
            line += f"; warmup {med('quiet_warmup'):.2f} s quiet, {med('busy_warmup'):.2f} s beside the hog"
        print(line)
    if len(pythons) > 1:
        for py in pythons[1:]:
            pairs = [a["quiet_median"] / b["quiet_median"] for a, b in zip(rows[pythons[0]], rows[py])]
            print(f"paired quiet-step ratio {pythons[0]} / {py}: median {statistics.median(pairs):.3f} "
                  f"(rounds: {', '.join(f'{x:.3f}' for x in pairs)})")


if __name__ == "__main__":
    main()
