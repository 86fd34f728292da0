"""Checkpoint save/load time and file size: molecule-gpt's safetensors checkpoint against the
original implementation's JSON checkpoint, same parameters, same run.

Usage (from the repo root):
    PYTHONPATH=src python benchmarks/bench_checkpoint.py [--repeats 7] [--json-repeats 3]
        [--cases default,large] [--dtypes float32,float64] [--dir DIR]

Cases (3 delta modules each, one training step taken so every Adam moment is set):
    default  Config() defaults (2 layers, C 72, 4 heads, block 96), vocabulary 90 (char mode)
    large    6 layers, C 256, 8 heads, block 256, 4 content + 4 hybrid heads, vocabulary ~2000 (BPE)

Rows, one per format (times are medians over repeats, after one untimed warm-up):
    ckpt full    save_checkpoint (params + Adam moments + snapshot + tokenizer; temp file,
                 fsync, .prev link, os.replace, directory fsync) / load_checkpoint (header
                 validation, sha256 of every tensor, a ready Model and tokenizer)
    ckpt params  the same with optimizer_state=False: exactly the content of the JSON form
    JSON         the original's way: json.dump of nested float64 lists into the file (no fsync,
                 as the original writes) / compat.load_original_checkpoint (json.load, arrays,
                 a ready Model and tokenizer)
Two diagnostic columns: "no fsync" is the same save with os.fsync replaced by a no-op (the
share of the two fsyncs; never how we save), "+1st" is the load followed by the loaded model's
first forward pass (16 tokens), timed within the same runs: neither loader binds the model's
engines, its first use does. Ratios are JSON over ours, against the issue's targets: load >= 50x,
file >= 4x smaller, save >= 20x. They are printed for the same content (ckpt params vs JSON) and for the full resumable
checkpoint, which holds three times the numbers the JSON form can hold. Results are checked
after timing (the loaded models equal the saved ones; the JSON import gives identical logits).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

import molecule_gpt as mg
from molecule_gpt.checkpoint import load_checkpoint, save_checkpoint
from molecule_gpt.compat import load_original_checkpoint, original_document
from molecule_gpt.tokenizer import EvolvingTokenizer

TARGETS = {"load": 50.0, "size": 4.0, "save": 20.0}


# ---------------------------------------------------------------------------------------------
# organisms


def synthetic_corpus(n_lines: int, seed: int = 0) -> list[str]:
    """Deterministic text over 85 printable characters plus space (86 + "\\n" at birth = 87
    characters, 90 tokens with the specials), words Zipf-distributed so BPE finds real merges."""
    rng = np.random.default_rng(seed)
    alphabet = np.array([c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-[]{}<>/@#$%&*+="][:85])
    letter_p = 1.0 / np.arange(1, len(alphabet) + 1) ** 0.9
    letter_p /= letter_p.sum()
    words = ["".join(rng.choice(alphabet, size=int(rng.integers(2, 9)), p=letter_p)) for _ in range(6000)]
    word_p = 1.0 / np.arange(1, len(words) + 1)
    word_p /= word_p.sum()
    lines = []
    for _ in range(n_lines):
        lines.append(" ".join(rng.choice(words, size=int(rng.integers(6, 16)), p=word_p)))
    lines.append("".join(alphabet))  # every character at birth
    return lines


def make_organism(case: str, dtype: str):
    corpus = synthetic_corpus(3000)
    tok = EvolvingTokenizer(corpus, byte_fallback=False)
    if case == "default":
        config = mg.Config()
    else:
        config = mg.Config(n_layer=6, n_embd=256, n_head=8, block_size=256,
                           head_types=("content",) * 4 + ("hybrid",) * 4)
        tok.train_bpe(corpus, num_merges=2000 - tok.vocab_size)
    model = mg.Model(config, tok.vocab_size, dtype=dtype, seed=1)
    for _ in range(3):
        model.add_delta_module()
    rng = np.random.default_rng(2)
    batch = [tok.encode(corpus[int(i)])[: config.block_size + 1] for i in rng.integers(0, len(corpus), config.batch_size)]
    model.train_step(batch, 0.01)
    return model, tok


# ---------------------------------------------------------------------------------------------
# timing


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: page cache, allocator, imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_load(load, ids, repeats: int) -> tuple[float, float]:
    """Medians of (load time, load + first forward pass), from the same runs."""
    def once():
        t0 = time.perf_counter()
        model = load()
        t1 = time.perf_counter()
        model.logits(ids)
        return t1 - t0, time.perf_counter() - t0

    once()  # warm-up
    runs = [once() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def without_fsync(fn):
    """fn with os.fsync a no-op (diagnostic: how much of a save the fsyncs are)."""
    def run():
        real = os.fsync
        os.fsync = lambda fd: None
        try:
            fn()
        finally:
            os.fsync = real
    return run


def json_save(path: str, model, tok) -> None:
    """The original's save: its object of nested lists, json.dump into the file."""
    doc = original_document(model, tok)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)


def bench_case(case: str, dtype: str, directory: str, repeats: int, json_repeats: int) -> dict:
    model, tok = make_organism(case, dtype)
    state = {"step": 1, "note": "benchmark"}
    full, lite, orig = (os.path.join(directory, f"{case}-{dtype}.{ext}") for ext in ("ckpt", "params.ckpt", "json"))
    ids = tok.encode("the quick brown fox jumps")[:16]
    save_full = lambda: save_checkpoint(full, model, tok, state)  # noqa: E731
    save_lite = lambda: save_checkpoint(lite, model, tok, state, optimizer_state=False)  # noqa: E731
    r = {
        "full_save": median_time(save_full, repeats),
        "full_save_nofsync": median_time(without_fsync(save_full), repeats),
        "full_size": os.path.getsize(full),
        "lite_save": median_time(save_lite, repeats),
        "lite_save_nofsync": median_time(without_fsync(save_lite), repeats),
        "lite_size": os.path.getsize(lite),
        "json_save": median_time(lambda: json_save(orig, model, tok), json_repeats),
        "json_size": os.path.getsize(orig),
        "params": model.num_params(),
        "vocab": model.vocab_size,
    }
    r["full_load"], r["full_first"] = median_load(lambda: load_checkpoint(full).model, ids, repeats)
    r["lite_load"], r["lite_first"] = median_load(lambda: load_checkpoint(lite).model, ids, repeats)
    r["json_load"], r["json_first"] = median_load(lambda: load_original_checkpoint(orig, dtype=dtype)[0], ids,
                                                  json_repeats)
    # ---- check the results after timing
    meta, tensors = model.export_state()
    got_meta, got = load_checkpoint(full).model.export_state()
    assert got_meta == meta and all(got[k].tobytes() == v.tobytes() for k, v in tensors.items()), "full round trip"
    lite_model = load_checkpoint(lite).model
    assert all(lite_model.params()[k].tobytes() == v.tobytes() for k, v in model.params().items()), "params round trip"
    back, back_tok = load_original_checkpoint(orig, dtype=dtype)
    ids = tok.encode("the quick brown fox")[: model.config.block_size]
    assert back.logits(ids).tobytes() == model.logits(ids).tobytes(), "JSON import logits"
    assert load_checkpoint(full).model.logits(ids).tobytes() == model.logits(ids).tobytes(), "checkpoint logits"
    for path in (full, lite, orig, full + ".prev", lite + ".prev"):
        if os.path.exists(path):
            os.unlink(path)
    return r


def report(case: str, dtype: str, r: dict) -> None:
    mb = 1e6
    print(f"\n{case} config, {dtype}: {r['params']:,} parameters, vocab {r['vocab']}")
    print(f"  {'format':<12} {'save ms':>10} {'no fsync':>10} {'load ms':>10} {'+1st ms':>10} {'file MB':>10}")
    for key, label in (("full", "ckpt full"), ("lite", "ckpt params"), ("json", "JSON")):
        nofsync = f"{1e3 * r[key + '_save_nofsync']:>10.1f}" if key + "_save_nofsync" in r else f"{'-':>10}"
        print(f"  {label:<12} {1e3 * r[key + '_save']:>10.1f} {nofsync} {1e3 * r[key + '_load']:>10.1f} "
              f"{1e3 * r[key + '_first']:>10.1f} {r[key + '_size'] / mb:>10.2f}")
    for key, label in (("lite", "same content (params)"), ("full", "full resumable ckpt")):
        ratios = {"load": r["json_load"] / r[key + "_load"], "size": r["json_size"] / r[key + "_size"],
                  "save": r["json_save"] / r[key + "_save"]}
        parts = [f"{name} {value:6.1f}x ({'meets' if value >= TARGETS[name] else 'MISSES'} >= {TARGETS[name]:.0f}x)"
                 for name, value in ratios.items()]
        print(f"  JSON / {label:<22} " + "   ".join(parts))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats of our save/load (median)")
    ap.add_argument("--json-repeats", type=int, default=3, help="timed repeats of the JSON save/load (median)")
    ap.add_argument("--cases", default="default,large")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--dir", default=None, help="directory for the files (default: a temporary one)")
    args = ap.parse_args(argv)
    import safetensors

    print(f"molecule-gpt {mg.__version__}, safetensors {safetensors.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"medians of {args.repeats} (ours) / {args.json_repeats} (JSON) runs")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for case in args.cases.split(","):
            for dtype in args.dtypes.split(","):
                report(case, dtype, bench_case(case, dtype, directory, args.repeats, args.json_repeats))
                sys.stdout.flush()


if __name__ == "__main__":
    main()
