"""Wall time of one burst at the default Config, evaluations and checks included, as a chat or
`train` sees it: observe a chunk of new text, then train_burst().

    python benchmarks/bench_burst.py [--bursts 20] [--corpus A.txt --new B.txt]

It imports the installed molecule_gpt (not the source tree), so two builds can be compared by
running this file with each one's Python, alternating: the figure is the median seconds per
burst, with the share spent in optimizer steps (the trainer's own telemetry) beside it.
Defaults: domain A = stdlib documentation sentences (birth corpus, 2,000 lines), new text =
stdlib source lines in chunks of 24 (see corpora.py).
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import corpora  # noqa: E402

import molecule_gpt as mg  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bursts", type=int, default=20)
    ap.add_argument("--corpus", help="birth corpus (default: stdlib documentation sentences)")
    ap.add_argument("--new", help="new text fed in chunks (default: stdlib source lines)")
    ap.add_argument("--chunk-lines", type=int, default=24)
    args = ap.parse_args(argv)
    a = mg.read_corpus(args.corpus).lines if args.corpus else corpora.doc_sentences(max_lines=2400)
    b = mg.read_corpus(args.new).lines if args.new else corpora.code_lines(max_lines=args.bursts * args.chunk_lines)
    rng = np.random.default_rng(0)
    a = [a[i] for i in rng.permutation(len(a))][:2000]
    org = mg.Organism(mg.Config(), a, seed=0)
    org.warmup()
    walls, steps, growths = [], [], 0
    for i in range(args.bursts):
        org.observe(b[i * args.chunk_lines:(i + 1) * args.chunk_lines])
        org.telemetry.clear()  # a bounded deque: what follows is this burst's
        t0 = time.perf_counter()
        org.train_burst()
        walls.append(time.perf_counter() - t0)
        records = list(org.telemetry)
        steps.append(sum(r["seconds"] for r in records if r.get("phase") == "burst"))
        growths += sum(1 for r in records if r.get("phase") == "tokenizer")
    print(f"# molecule_gpt {mg.__version__} from {pathlib.Path(mg.__file__).parent}; {platform.machine()} "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print(f"burst wall {statistics.median(walls) * 1000:.1f} ms (median of {len(walls)}), optimizer steps "
          f"{statistics.median(steps) * 1000:.1f} ms of it; mean {statistics.mean(walls) * 1000:.1f} ms with "
          f"{growths} tokenizer growth trial(s) inside")


if __name__ == "__main__":
    main()
