"""The blend the organism speaks with: how well it predicts text it never saw, at model_alpha()
and at other weights.

Generation samples from a p_model + (1 - a) q, q the corpus field's trigram (else bigram)
distribution, the model alone where the field knows neither context (design.md §4 step 3).
model_alpha() chooses a on the organism's own held-out lines. This script checks that choice on
test lines neither the organism nor that choice saw: per seed, an Organism is born on `--lines`
lines of the corpus (a random draw; it holds out its own slice) and warmed up as by default;
then, on `--test-lines` other lines, the blend's cross-entropy at temperature 1 in nats per
character (molecule_gpt.heldout's definition):

  model alone      a = 1
  model_alpha()    the weight the organism speaks with
  earlier rule     a = (uniform - L_model) / (uniform - L_field) on the organism's held-out
                   lines, L_field the field's interpolated loss (CorpusField.heldout_loss), the
                   rule model_alpha() followed before it was chosen by held-out prediction
  best on a grid   the best a for the test lines themselves (a bound: it has seen them)

    python benchmarks/bench_blend.py --corpus FILE [--lines 2000] [--test-lines 200] [--seeds 3]
    python benchmarks/bench_blend.py                  # the shipped seed corpus (half of it tested)
    python benchmarks/bench_blend.py --corpus A --new B   # and again after 50 bursts of B

With --new, the same is measured again after the organism learned another text in checked
bursts (observe + train_burst, 24 lines each), on the corpus's test lines and on test lines of
the new text that it never heard: model_alpha() is chosen on the organism's held-out lines of
both (the birth corpus's and the slice it holds out of what it hears).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import molecule_gpt as mg  # noqa: E402
from bench_learning import model_against_field  # noqa: E402
from molecule_gpt.data import seed_corpus_lines  # noqa: E402
from molecule_gpt.heldout import HeldOut  # noqa: E402


def blend_loss(a: float, model_nats: np.ndarray, field_probs: np.ndarray, chars: int) -> float:
    """Nats per character of the blend at weight a (the model alone where field_probs is NaN)."""
    p = np.exp(-model_nats)
    part = ~np.isnan(field_probs)
    mixed = np.where(part, a * p + (1 - a) * np.nan_to_num(field_probs), p)
    with np.errstate(divide="ignore"):
        return float(-np.log(mixed).sum() / chars)


def earlier_rule(org: mg.Organism) -> float:
    """The earlier rule's weight: the share of the way from a uniform guess to the interpolated
    field's loss that the model's loss covers on the organism's held-out lines, in [0, 1]."""
    return min(1.0, max(0.0, model_against_field(org, org._old_heldout)[2]))


def measure(org: mg.Organism, test: list[str]) -> dict:
    """The blend's loss on `test` at 1, model_alpha(), the earlier rule's weight and the best
    weight on a grid: {name: (weight, nats per character)}."""
    held = HeldOut(test, org.tokenizer.encode, lambda: org.tokenizer.version)
    nats = held.target_nats(org.model)
    q = org.field.blend_probs(held.windows(org.config.block_size))
    grid = np.linspace(0.01, 1.0, 100)
    losses = [blend_loss(a, nats, q, held.chars) for a in grid]
    k = int(np.argmin(losses))
    weights = {"alone": 1.0, "alpha": org.model_alpha(), "rule": earlier_rule(org)}
    row = {name: (a, blend_loss(a, nats, q, held.chars)) for name, a in weights.items()}
    row["best"] = (float(grid[k]), losses[k])
    return row


COLUMNS = ("alone", "alpha", "rule", "best")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="UTF-8 text, one line per line (default: the shipped seed corpus)")
    ap.add_argument("--lines", type=int, default=2000, help="lines the organism is born on")
    ap.add_argument("--test-lines", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--new", metavar="FILE", help="then feed the organism this text in --bursts checked bursts of "
                                                  "--chunk-lines lines and measure again, on both texts' test lines")
    ap.add_argument("--bursts", type=int, default=50)
    ap.add_argument("--chunk-lines", type=int, default=24)
    args = ap.parse_args(argv)
    lines = mg.read_corpus(args.corpus).lines if args.corpus else seed_corpus_lines()
    lines = [x for x in lines if x.split()]
    new = [x for x in mg.read_corpus(args.new).lines if x.split()] if args.new else []
    if args.corpus:
        n_test, n_birth = args.test_lines, args.lines
    else:  # a small corpus: half to be born on, half to test
        n_test = n_birth = len(lines) // 2
    if len(lines) < n_test + n_birth:
        raise SystemExit(f"{args.corpus} has {len(lines)} lines; --lines {n_birth} and --test-lines {n_test} need more")
    if args.new and len(new) < n_test + args.bursts * args.chunk_lines:
        raise SystemExit(f"{args.new} has {len(new)} lines; {n_test + args.bursts * args.chunk_lines} needed")
    print(f"# corpus {args.corpus or 'the shipped seed corpus'}: born on {n_birth} lines, tested on {n_test} others; "
          f"nats per character of the test lines, temperature 1")
    print(f"{'seed':>4} {'when, test lines':32} {'model alone':>12} {'model_alpha()':>20} {'earlier rule':>20} "
          f"{'best on a grid':>20}")
    rows: dict = {}
    for seed in range(args.seeds):
        order = np.random.default_rng(seed).permutation(len(lines))
        test = [lines[i] for i in order[:n_test]]
        birth = [lines[i] for i in order[n_test:n_test + n_birth]]
        org = mg.Organism(corpus=birth, seed=seed)
        org.warmup()
        stages = [("after warmup, corpus", test)]
        if args.new:
            order = np.random.default_rng(seed).permutation(len(new))
            new_test = [new[i] for i in order[:n_test]]
            feed = [new[i] for i in order[n_test:n_test + args.bursts * args.chunk_lines]]
            stages.append(("after warmup, new text", new_test))
        for label, test_lines in stages:
            rows.setdefault(label, []).append(measure(org, test_lines))
        if args.new:
            for b in range(args.bursts):
                org.observe(feed[b * args.chunk_lines:(b + 1) * args.chunk_lines])
                org.train_burst()
            for label, test_lines in ((f"after {args.bursts} bursts, corpus", test),
                                      (f"after {args.bursts} bursts, new text", new_test)):
                rows.setdefault(label, []).append(measure(org, test_lines))
        for label, got in rows.items():
            r = got[-1]
            print(f"{seed:>4} {label:32} {r['alone'][1]:12.4f} " +
                  " ".join(f"{r[k][1]:11.4f} (a {r[k][0]:.2f})" for k in COLUMNS[1:]), flush=True)
        org.close()
    for label, got in rows.items():
        med = {k: statistics.median(r[k][1] for r in got) for k in COLUMNS}
        print(f"# medians, {label}: model alone {med['alone']:.4f}, model_alpha() {med['alpha']:.4f}, earlier rule "
              f"{med['rule']:.4f} ({med['alpha'] / med['rule'] - 1:+.1%} at model_alpha()), best {med['best']:.4f}")
    return rows


if __name__ == "__main__":
    main()
