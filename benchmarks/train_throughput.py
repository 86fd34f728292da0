"""Trained tokens/s (forward + backward + clipped Adam) of molecule_gpt beside the baselines.

One line per (config, dtype, implementation), all measured in this run, plus the ratio to
PyTorch eager and the achieved GFLOP/s as a fraction of what numpy.matmul reaches here.

    python benchmarks/train_throughput.py [--steps 20] [--repeats 5] [--quick]

FLOPs per trained token = 6 x (parameters used in matrix products) + attention (QK^T and AV
over the causal keys: 2 d per key per head, forward 2 of them, backward 4).

Timing: the implementations take turns, round by round (each round, for each implementation: a
pause of IDLE_SECONDS, two untimed steps, then `steps` timed ones), so a drift in the machine's
speed (it is shared) lands on all of them alike; the pause lets the worker threads of the
previous implementation's libraries stop spinning (OpenBLAS's wait about 0.1 s before they
sleep: without it, PyTorch timed right after the numpy baseline lost a core). ms/step is the median over rounds; "vs torch" is the
median over rounds of that round's ratio (a paired comparison).
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
sys.path.insert(0, str(HERE))

import molecule_gpt as mg  # noqa: E402
from numpy_model import NumpyGPT  # noqa: E402

try:
    import torch
    from torch_model import TorchGPT
except ImportError:  # torch is optional: pip install torch==2.13.0
    torch = None

CONFIGS = {
    "default": dict(config=mg.Config(), vocab=96, batch=4, seq_len=96),
    "larger": dict(config=mg.Config(n_layer=6, n_embd=256, n_head=8, block_size=256, batch_size=8,
                                    head_types=("content",) * 4 + ("hybrid",) * 4),
                   vocab=2000, batch=8, seq_len=256),
}
TARGETS = {"default": (3.0, 0.35), "larger": (1.5, 0.50)}  # (x PyTorch eager, fraction of matmul)


def flops_per_token(config: mg.Config, vocab: int, seq_len: int) -> float:
    C, T, d = config.n_embd, config.block_size, config.head_dim
    matmul_params = config.n_layer * 16 * C * C + vocab * C
    n_pattern = sum(t != "content" for t in config.head_types)
    matmul_params += config.n_layer * n_pattern * T * d
    mean_keys = (seq_len + 1) / 2
    n_qk = sum(t != "rrpram" for t in config.head_types)  # heads that compute QK^T
    attention = config.n_layer * 6 * 2 * d * mean_keys * (n_qk + config.n_head)
    return 6 * matmul_params + attention


def matmul_gflops(dtype, threads: int) -> float:
    """What numpy.matmul reaches on a 1024^3 product with `threads` BLAS threads."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).normal(size=(1024, 1024)).astype(dtype)
    b = a.T.copy()
    with threadpool_limits(threads):
        a @ b
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * 1024 ** 3 / statistics.median(times) / 1e9


def batches(vocab, batch, seq_len, n, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, vocab, size=seq_len + 1).tolist() for _ in range(batch)] for _ in range(n)]


IDLE_SECONDS = 0.3


def time_rounds(impls, data, steps, repeats):
    """Per implementation, seconds per step in each of `repeats` rounds; in every round each
    implementation idles, runs two untimed steps, then `steps` timed ones (impl -> count)."""
    per_step = {impl: [] for impl in impls}
    for r in range(repeats):
        for impl, step in impls.items():
            time.sleep(IDLE_SECONDS)
            for i in range(2):
                step(data[i])
            t0 = time.perf_counter()
            for i in range(steps[impl]):
                step(data[(r * steps[impl] + i) % len(data)])
            per_step[impl].append((time.perf_counter() - t0) / steps[impl])
    return per_step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="default config, float32 only, few steps")
    ap.add_argument("--configs", default="default,larger")
    args = ap.parse_args()
    names = ["default"] if args.quick else args.configs.split(",")
    dtypes = ["float32"] if args.quick else ["float32", "float64"]
    steps, repeats = (3, 3) if args.quick else (args.steps, args.repeats)

    print(f"# machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
          f"numpy {np.__version__}, torch {torch.__version__ if torch else 'not installed'}, "
          f"torch threads {torch.get_num_threads() if torch else '-'}")
    mm1 = matmul_gflops(np.float32, 1)
    mm_all = matmul_gflops(np.float32, os.cpu_count() or 1)
    print(f"# numpy.matmul float32 1024^3: {mm1:.1f} GFLOP/s single-threaded, {mm_all:.1f} GFLOP/s all cores")
    print(f"{'config':8} {'dtype':8} {'impl':12} {'ms/step':>9} {'tok/s':>10} {'GFLOP/s':>8} {'%mm1':>6} {'vs torch':>9}")
    for name in names:
        spec = CONFIGS[name]
        config, V, B, L = spec["config"], spec["vocab"], spec["batch"], spec["seq_len"]
        tokens = B * L
        fpt = flops_per_token(config, V, L)
        data = batches(V, B, L, 8)
        for dtype in dtypes:
            model = mg.Model(config, V, dtype=dtype, seed=0)
            init = {k: v.astype(np.float64) for k, v in model.params().items()}
            impls = {"molecule": lambda b, m=model: m.train_step(b, 1e-3)}
            cfg = config.to_dict()
            if name == "default" or not args.quick:
                ref = NumpyGPT(cfg, {k: v.copy() for k, v in init.items()}, [], dtype=np.dtype(dtype))
                impls["numpy"] = lambda b, m=ref: m.train_step(b, 1e-3)
            if torch is not None:
                tm = TorchGPT(cfg, {k: v.copy() for k, v in init.items()}, [], dtype=np.dtype(dtype))
                impls["torch-eager"] = lambda b, m=tm: m.train_step(b, 1e-3)
            n_steps = {impl: max(1, steps // 4) if (impl == "numpy" and name == "larger") else steps
                       for impl in impls}
            rounds = time_rounds(impls, data, n_steps, repeats)
            results = {impl: statistics.median(secs) for impl, secs in rounds.items()}
            ratio = {impl: statistics.median(t / s for t, s in zip(rounds["torch-eager"], secs))
                     for impl, secs in rounds.items()} if "torch-eager" in rounds else {}
            for impl, sec in results.items():
                gflops = fpt * tokens / sec / 1e9
                vs = f"{ratio[impl]:8.2f}x" if ratio else "       -"
                print(f"{name:8} {dtype:8} {impl:12} {sec * 1e3:9.2f} {tokens / sec:10.0f} {gflops:8.1f} "
                      f"{100 * gflops / mm1:5.0f}% {vs}")
            if dtype == "float32":
                want_torch, want_frac = TARGETS[name]
                frac = fpt * tokens / results["molecule"] / 1e9 / mm1
                line = f"# target {name}: >= {want_frac:.0%} of matmul -> {frac:.0%}"
                if "torch-eager" in results:
                    line += f"; >= {want_torch}x torch eager -> {ratio['molecule']:.2f}x"
                print(line)


if __name__ == "__main__":
    main()
