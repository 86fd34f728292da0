"""Trained tokens/s (forward + backward + clipped Adam) of molecule_gpt beside the baselines.

One line per (config, dtype, implementation), all measured in this run, plus the ratio to
PyTorch eager and to torch.compile, and the achieved GFLOP/s as a fraction of the cores' FMA
peak measured in this run by a probe (`_core.fma_peak`: 12 independent FMA chains on one core,
512-bit and 256-bit vectors; the peak of the step's threads is threads x the faster) and of what
numpy.matmul reaches on one thread.

    python benchmarks/train_throughput.py [--steps 20] [--repeats 5] [--quick] [--no-compile]

Peers at their fastest (benchmarks/torch_model.py, fast=True): PyTorch with as many threads as
our step uses, q/k/v and gate/value weights fused, heads batched, gradients clamped with
_foreach ops, Adam's fused CPU kernel; "torch-compile" runs the same loss function through
torch.compile (inductor, default mode), its compile time reported apart (first steps, untimed).

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
from molecule_gpt import _core  # noqa: E402
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
# (x PyTorch eager, x torch.compile, fraction of the threads' FMA peak)
TARGETS = {"default": (4.0, 3.0, 0.50), "larger": (2.5, 2.0, 0.60)}


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
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (compiles take ~40 s each)")
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
    widths = {w: _core.fma_peak(w) for w in ("avx512", "avx2") if _supported(w)}
    threads = mg.Model(mg.Config(), 96).n_threads
    peak = threads * max(widths.values()) if widths else float("nan")
    print("# FMA peak per core (float32, 12 chains): " + ", ".join(f"{w} {g:.1f}" for w, g in widths.items())
          + f" GFLOP/s; the step's {threads} threads: {peak:.1f} GFLOP/s; products run {_core.linear_simd_path()}")
    if torch is not None:
        torch.set_num_threads(threads)
    print(f"{'config':8} {'dtype':8} {'impl':14} {'ms/step':>9} {'tok/s':>10} {'GFLOP/s':>8} {'%peak':>6} "
          f"{'%mm1':>6} {'vs eager':>9} {'vs compile':>11}")
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
            compile_seconds = None
            if torch is not None:
                tm = TorchGPT(cfg, {k: v.copy() for k, v in init.items()}, [], dtype=np.dtype(dtype), fast=True)
                impls["torch-eager"] = lambda b, m=tm: m.train_step(b, 1e-3)
                if not args.no_compile:
                    tc = TorchGPT(cfg, {k: v.copy() for k, v in init.items()}, [], dtype=np.dtype(dtype), compile=True)
                    t0 = time.perf_counter()
                    tc.train_step(data[0], 1e-3)  # compiles forward and backward
                    compile_seconds = time.perf_counter() - t0
                    impls["torch-compile"] = lambda b, m=tc: m.train_step(b, 1e-3)
            n_steps = {impl: max(1, steps // 4) if (impl == "numpy" and name == "larger") else steps
                       for impl in impls}
            rounds = time_rounds(impls, data, n_steps, repeats)
            results = {impl: statistics.median(secs) for impl, secs in rounds.items()}

            def paired(peer):
                if peer not in rounds:
                    return {}
                return {impl: statistics.median(t / s for t, s in zip(rounds[peer], secs))
                        for impl, secs in rounds.items()}

            vs_eager, vs_compile = paired("torch-eager"), paired("torch-compile")
            for impl, sec in results.items():
                gflops = fpt * tokens / sec / 1e9
                e = f"{vs_eager[impl]:8.2f}x" if vs_eager else "        -"
                c = f"{vs_compile[impl]:10.2f}x" if vs_compile else "          -"
                print(f"{name:8} {dtype:8} {impl:14} {sec * 1e3:9.2f} {tokens / sec:10.0f} {gflops:8.1f} "
                      f"{100 * gflops / peak:5.0f}% {100 * gflops / mm1:5.0f}% {e} {c}")
            if compile_seconds is not None:
                print(f"# torch.compile: first step (compiling) {compile_seconds:.1f} s")
            if dtype == "float32":
                want_eager, want_compile, want_frac = TARGETS[name]
                frac = fpt * tokens / results["molecule"] / 1e9 / peak
                line = f"# target {name}: >= {want_frac:.0%} of the FMA peak -> {frac:.0%}"
                if vs_eager:
                    line += f"; >= {want_eager}x torch eager -> {vs_eager['molecule']:.2f}x"
                if vs_compile:
                    line += f"; >= {want_compile}x torch.compile -> {vs_compile['molecule']:.2f}x"
                print(line, flush=True)


def _supported(width: str) -> bool:
    try:
        _core.fma_peak(width, trials=1)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
