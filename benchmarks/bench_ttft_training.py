"""Time to first token of Organism.run while the organism trains in another thread, against the
same with no training, alternating in one process (the in-process half of bench_serve.py's
TTFT comparison, without HTTP; about a minute).

    python benchmarks/bench_ttft_training.py [--rounds 3] [--requests 300]

An organism is born on the shipped seed corpus and warmed up (default Config, except that its
background trainer starts a burst as soon as anything new was heard, every 0.05 s tick: the
worst case, as in bench_serve.py). A training round runs the organism's own background trainer
(`Organism.background()`: Config.train_threads, i.e. all cores but one) while a thread observes
24 new lines every 50 ms; the main thread times `run(prompt, max_gen_tokens=1)` (encode,
locks, weights, prefill, one token) every 10 ms. The figures: median and p99 per mode, and
the p99 ratio training / not.
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import molecule_gpt as mg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args(argv)
    config = mg.Config(qb_min_bytes=1, qb_cooldown_seconds=0.0, train_tick_seconds=0.05)
    org = mg.Organism(config, mg.seed_corpus_lines(), seed=0)
    org.warmup()
    lines = mg.seed_corpus_lines()
    print(f"# {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; {args.rounds} rounds of {args.requests} requests")

    def probe():
        t = []
        for i in range(args.requests):
            t0 = time.perf_counter()
            org.run("hello there", max_gen_tokens=1, seed=i)
            t.append(time.perf_counter() - t0)
            time.sleep(0.01)
        t.sort()
        return t[len(t) // 2], t[min(len(t) - 1, int(0.99 * len(t)))]

    rows = {"off": [], "on": []}
    for r in range(args.rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            if mode == "off":
                rows[mode].append(probe())
                continue
            stop = threading.Event()

            def listen():
                k = 0
                while not stop.is_set():
                    org.observe([f"{lines[(k + i) % len(lines)]} ({r}.{k}.{i})" for i in range(24)])
                    k += 24
                    time.sleep(0.05)

            th = threading.Thread(target=listen)
            with org.background():
                th.start()
                time.sleep(0.5)
                try:
                    rows[mode].append(probe())
                finally:
                    stop.set()
                    th.join()
        off, on = rows["off"][-1], rows["on"][-1]
        print(f"round {r}: off p50 {off[0] * 1e3:.2f} p99 {off[1] * 1e3:.2f} ms; "
              f"training p50 {on[0] * 1e3:.2f} p99 {on[1] * 1e3:.2f} ms; p99 ratio {on[1] / off[1]:.2f}", flush=True)
    ratios = [on[1] / off[1] for on, off in zip(rows["on"], rows["off"])]
    med = {m: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for m, v in rows.items()}
    print(f"median: off p50 {med['off'][0] * 1e3:.2f} p99 {med['off'][1] * 1e3:.2f} ms; training p50 "
          f"{med['on'][0] * 1e3:.2f} p99 {med['on'][1] * 1e3:.2f} ms; p99 ratio (paired) {statistics.median(ratios):.2f}; "
          f"{org.stats()['bursts']} bursts")
    org.close()


if __name__ == "__main__":
    main()
