"""`molecule-gpt bench`: a quick look at how fast this machine runs the organism (a few seconds).

Each case is timed `repeats` times after one untimed run and reported as the median; the
organism and the model are built from the shipped seed corpus at the default config, so the
figures compare across machines. The head-to-head suites (PyTorch, HuggingFace tokenizers,
tiktoken, the original JSON checkpoint) are in the repository's benchmarks/ directory; this
one measures only molecule-gpt and needs nothing beyond the package.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Callable

import numpy as np

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .data import seed_corpus_lines
from .model import Model
from .organism import Organism
from .tokenizer import EvolvingTokenizer

__all__ = ["run_quick_bench"]


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_quick_bench(repeats: int = 5, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Rows {"case", "figure", "unit", "detail"} for training, generation, tokenizer, checkpoint."""
    note = progress or (lambda name: None)
    rows = []
    cfg = Config()
    lines = seed_corpus_lines()

    note("training step")
    rng = np.random.default_rng(0)
    model = Model(cfg, 96, seed=0)
    batch = [rng.integers(0, 96, cfg.block_size + 1).tolist() for _ in range(cfg.batch_size)]
    steps = 10
    t = _median_time(lambda: [model.train_step(batch, 1e-3) for _ in range(steps)], repeats) / steps
    tokens = cfg.batch_size * cfg.block_size
    rows.append({"case": "train step (default config)", "figure": round(tokens / t), "unit": "tokens/s",
                 "detail": f"{t * 1e3:.2f} ms per step of {cfg.batch_size} x {cfg.block_size} tokens, "
                           f"{model.n_threads} worker thread(s)"})

    note("generation")
    org = Organism(cfg, lines, seed=0)
    n_tok = cfg.max_gen_tokens
    kwargs = dict(model_alpha=1.0, max_gen_tokens=n_tok, min_gen_tokens=n_tok, repetition_guard=0, seed=1)
    result = org.run("the organism", **kwargs)
    t = _median_time(lambda: org.run("the organism", **kwargs), repeats)
    rows.append({"case": "generation (default config, batch 1)", "figure": round(len(result.ids) / t),
                 "unit": "tokens/s", "detail": f"{len(result.ids)} tokens with the KV cache, sampling in Cython"})

    note("tokenizer")
    text_lines = lines * max(1, (1 << 20) // max(1, sum(len(x) + 1 for x in lines)))
    tok = EvolvingTokenizer(text_lines)
    t_train = _median_time(lambda: EvolvingTokenizer(text_lines).train_bpe(text_lines, 384), max(1, repeats // 2))
    tok.train_bpe(text_lines, 384)
    text = " ".join(text_lines)
    mb = len(text.encode("utf-8")) / 1e6
    tok.encode(text)
    t_enc = _median_time(lambda: tok.encode(text), repeats)
    rows.append({"case": "BPE encode (384 merges)", "figure": round(mb / t_enc, 1), "unit": "MB/s",
                 "detail": f"the seed corpus repeated to {mb:.1f} MB, one thread"})
    rows.append({"case": "BPE training (384 merges)", "figure": round(t_train * 1e3, 1), "unit": "ms",
                 "detail": f"on the same {mb:.1f} MB (birth included)"})

    note("checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "organism.ckpt")
        t_save = _median_time(lambda: save_checkpoint(path, org.model, org.tokenizer, org.state_dict()), repeats)
        t_load = _median_time(lambda: load_checkpoint(path), repeats)
        size = os.path.getsize(path)
    rows.append({"case": "checkpoint save", "figure": round(t_save * 1e3, 1), "unit": "ms",
                 "detail": f"{size / 1e6:.2f} MB with optimizer state, fsync'd, atomic"})
    rows.append({"case": "checkpoint load", "figure": round(t_load * 1e3, 1), "unit": "ms",
                 "detail": "validated, sha256 of every tensor checked"})
    org.close()
    return rows
