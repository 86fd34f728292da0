"""Organism training costs: the default 1,200-step warmup, and a burst step with 12 delta modules
beside one with 1.

    python benchmarks/bench_organism.py --corpus CORPUS.txt [--repeats 5] [--quick]

warmup   wall seconds of Organism(Config(), corpus).warmup() at the default config (1,200 steps of
         4 lines, linear warmup + cosine decay, held-out loss every 100 steps), default thread
         count; target <= 10 s. Reported with the steps/s and trained tokens/s it implies.
modules  median seconds per optimizer step inside train_burst() after warmup (base frozen), with
         1 delta module (the active one) and with 12 (11 fossils + the active one); target
         ratio <= 1.15. For reference, the same 12 modules all trainable (what the original did:
         every burst trained every module) are timed with Model.train_step directly.
Timings come from the trainer's own per-step telemetry ("seconds": the Model.train_step call),
medians over `--repeats` bursts of micro_steps steps each; the burst lines also give the whole
burst's wall time (held-out evaluation, snapshot, immune check included).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import molecule_gpt as mg  # noqa: E402
from molecule_gpt.organism import Organism  # noqa: E402
from molecule_gpt.tokenizer import read_corpus  # noqa: E402

TARGET_WARMUP_S = 10.0
TARGET_RATIO = 1.15


def synthetic_corpus(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    words = ("the a cat dog river moon garden teacher market quiet small old red runs sees likes finds calls "
             "helps watches follows under over near with and but because when then later now").split()
    return [" ".join(rng.choice(words, rng.integers(5, 16))).capitalize() + "." for _ in range(n)]


def burst_step_times(org: Organism, bursts: int) -> tuple[float, float]:
    """(median seconds per step, median seconds per burst) over `bursts` bursts."""
    per_step, per_burst = [], []
    for _ in range(bursts):
        n0 = len(org.telemetry)
        t0 = time.perf_counter()
        org.train_burst()
        per_burst.append(time.perf_counter() - t0)
        recs = [r for r in list(org.telemetry)[n0:] if r["phase"] == "burst"]
        per_step.extend(r["seconds"] for r in recs)
    return statistics.median(per_step), statistics.median(per_burst)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", help="UTF-8 text, one line per line (default: a synthetic corpus)")
    ap.add_argument("--repeats", type=int, default=5, help="warmups timed / bursts per module case")
    ap.add_argument("--quick", action="store_true", help="one warmup of 200 steps, 3 bursts per case")
    args = ap.parse_args()
    lines = read_corpus(args.corpus).lines if args.corpus else synthetic_corpus()
    quick = args.quick
    print(f"# machine: {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
          f"python {platform.python_version()}, numpy {np.__version__}; corpus {len(lines)} lines")

    # ---- warmup
    steps = 200 if quick else mg.Config().warmup_steps
    runs = 1 if quick else max(1, args.repeats // 2)
    walls, orgs = [], []
    for r in range(runs):
        org = Organism(mg.Config(), lines, seed=r)
        t0 = time.perf_counter()
        summary = org.warmup(steps)
        walls.append(time.perf_counter() - t0)
        orgs.append((org, summary))
    wall = statistics.median(walls)
    org, summary = orgs[0]
    recs = [r for r in org.telemetry if r["phase"] == "warmup"]
    tok = sum(r["tokens_per_s"] * r["seconds"] for r in recs)
    print(f"warmup   {steps} steps, vocab {org.model.vocab_size}, {org.model.n_threads} threads: "
          f"{wall:.2f} s (median of {runs}: {', '.join(f'{w:.2f}' for w in walls)}), {steps / wall:.0f} steps/s, "
          f"{tok / sum(r['seconds'] for r in recs):.0f} trained tok/s; held-out loss {summary['val_loss']:.3f}")
    if not quick:
        print(f"# target warmup: <= {TARGET_WARMUP_S} s -> {wall:.2f} s")

    # ---- 1 vs 12 delta modules
    bursts = 3 if quick else args.repeats
    cfg = mg.Config(delta_grow_prob=0.0, immune_max_rise=1e9, freeze_base_after_warmup=True)  # every burst is kept
    one = Organism(cfg, lines, seed=0)
    one.warmup(40)
    one.train_burst()  # module 0 is born
    t1, b1 = burst_step_times(one, bursts)
    twelve = Organism(cfg, lines, seed=0)
    twelve.warmup(40)
    twelve.config.delta_grow_prob = 1.0
    while twelve.model.n_delta < 12:
        twelve.train_burst()
    twelve.config.delta_grow_prob = 0.0
    states = [m["state"] for m in twelve.stats()["delta_modules"]]
    t12, b12 = burst_step_times(twelve, bursts)
    print(f"modules  1 module:  {t1 * 1e3:7.2f} ms/step  ({b1 * 1e3:7.1f} ms/burst of {cfg.micro_steps} steps)")
    print(f"modules  12 modules: {t12 * 1e3:7.2f} ms/step  ({b12 * 1e3:7.1f} ms/burst); states "
          f"{states.count('fossil')} fossil, {states.count('dropped')} dropped, {states.count('active')} active")
    # reference: all 12 trainable, as the original trains them
    m = twelve.model
    for k in range(m.n_delta):
        m.set_trainable(f"delta{k}", True)
    rng = np.random.default_rng(0)
    data = [twelve.tokenizer.encode(x)[:cfg.block_size + 1] for x in lines[:400]]
    batch = lambda: [data[i] for i in rng.integers(0, len(data), cfg.batch_size)]  # noqa: E731
    m.train_step(batch(), 1e-4)
    ts = []
    for _ in range(bursts * cfg.micro_steps):
        b = batch()
        t0 = time.perf_counter()
        m.train_step(b, 1e-4)
        ts.append(time.perf_counter() - t0)
    t_all = statistics.median(ts)
    print(f"modules  12 modules all trainable (the original's way): {t_all * 1e3:7.2f} ms/step")
    print(f"# target modules: 12/1 <= {TARGET_RATIO} -> {t12 / t1:.2f} (all-trainable reference {t_all / t1:.2f})")


if __name__ == "__main__":
    main()
