"""Could the model beat the corpus field after the default warmup if it learned on top of it?

Issue 11 asks that after the default warmup the model predict held-out text better than the
corpus field it was born with (model_alpha() 1). On a corpus of ~2,000 lines the field's
interpolated trigram counts predict held-out lines better than the model learns to in any
budget tried (RESULTS.md, "After warmup: model against the corpus field"). This experiment
measures what other ways of training the same model, the same steps on the same data, would
give, so the choice of what to build rests on figures:

  model           the organism's model as it trains now (cross-entropy on the next token)
  field-prior     the model's logits added to the field's log-probabilities (a product of
                  the two): the model learns what the field gets wrong. Training positions see
                  the field with their own occurrence left out of the counts (leave-one-out),
                  as a held-out line sees it; held-out lines see the field as it is.
  field-prior-in  the same with the field's counts as they are on training positions too
  distill-L       cross-entropy against (1 - L) the next token + L the field's leave-one-out
                  distribution (the field as a teacher); held-out as the model alone
  and, for the model as it trains now, the blend a p_model + (1 - a) p_field (this interpolated
  field) at a = the model's alpha (below; the organism's blend weight before it was chosen on
  held-out text) and at the best a for these held-out lines.

Each seed: an Organism born on the corpus and warmed up as by default (its tokenizer, its
held-out slice, its field, and its model_alpha() for reference); then each variant trains a
fresh copy of the same initial weights in PyTorch (benchmarks/torch_model.py: the same model,
float32) with the warmup's batches, learning-rate schedule, clipping and Adam, evaluating every
eval_interval steps and keeping the best (warmup_keep_best). Losses are nats per character of
the held-out lines (molecule_gpt.heldout's definition); "alpha" is the issue's measure of the
model against the field, (uniform - L) / (uniform - L_field) (1: the field's loss; the rule
model_alpha() followed before it became the blend weight that predicts held-out text best).

Needs torch (a comparison benchmark, never a dependency):
    python benchmarks/bench_field_prior.py --corpus FILE [--lines 2000] [--seeds 3]
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import molecule_gpt as mg  # noqa: E402
from molecule_gpt.heldout import line_chars, windows  # noqa: E402
from molecule_gpt.trainer import lr_schedule  # noqa: E402
from torch_model import TorchGPT  # noqa: E402

LAMBDAS = (0.6, 0.3, 0.1)  # the field's interpolation (molecule_gpt/field.py, heldout_loss)


class FieldRows:
    """The field's next-token distribution at every position of a sequence, as
    CorpusField.sequence_losses interpolates it (trigram, bigram, add-one unigram; a level
    whose context is unseen passes its weight down), optionally with the position's own
    occurrence taken out of the counts (leave-one-out)."""

    def __init__(self, field: mg.CorpusField):
        self.V = field.vocab_size
        self.uni = np.asarray(field.unigrams, np.float64)
        self.tables = [(np.asarray(field.bigram_keys), np.asarray(field.bigram_counts, np.float64)),
                       (np.asarray(field.trigram_keys), np.asarray(field.trigram_counts, np.float64))]
        self._rows: dict = {}

    def _row(self, level: int, ctx: int) -> np.ndarray:
        key = (level, ctx)
        row = self._rows.get(key)
        if row is None:
            keys, counts = self.tables[level]
            lo, hi = np.searchsorted(keys, [ctx * self.V, ctx * self.V + self.V])
            row = np.zeros(self.V)
            row[keys[lo:hi] - ctx * self.V] = counts[lo:hi]
            self._rows[key] = row
        return row

    def __call__(self, seq, n: int, leave_one_out: bool) -> np.ndarray:
        """(n, V): the distribution predicting seq[t + 1] from seq[:t + 1], t < n."""
        V, out = self.V, np.empty((n, self.V))
        l3, l2, _ = LAMBDAS
        for t in range(n):
            tgt = seq[t + 1]
            own = np.zeros(V)
            if leave_one_out:
                own[tgt] = 1.0
            uni = self.uni - own
            p = (uni + 1.0) / (uni.sum() + V)
            r2 = self._row(0, seq[t]) - own
            r3 = self._row(1, seq[t - 1] * V + seq[t]) - own if t > 0 else None
            s2, s3 = r2.sum(), (r3.sum() if r3 is not None else 0.0)
            w3 = l3 if s3 > 0 else 0.0
            w2 = l2 + (l3 - w3) if s2 > 0 else 0.0
            p = (1.0 - w3 - w2) * p
            if w2:
                p = p + w2 * r2 / s2
            if w3:
                p = p + w3 * r3 / s3
            out[t] = p
        return out


def train_variant(variant: str, cfg: mg.Config, init: dict, train: list, held: list, held_q: list,
                  rows: FieldRows, seed: int, steps: int) -> tuple[float, list, list | None]:
    """One variant trained from `init`: its best held-out nats (summed over held's windows),
    the nats of every evaluation, and for "model" each held window's next-token probabilities
    at the best evaluation (for the blends; None otherwise)."""
    tm = TorchGPT(cfg.to_dict(), {k: v.copy() for k, v in init.items()}, [], dtype=np.float32, fast=True)
    prior = variant.startswith("field-prior")
    leave_one_out = variant != "field-prior-in"
    lam = float(variant.split("-", 1)[1]) if variant.startswith("distill") else 0.0
    T = cfg.block_size
    held_t = [(torch.tensor([w[:-1]]), torch.tensor(w[1:]), torch.tensor(np.log(q), dtype=torch.float32))
              for w, q in zip(held, held_q)]
    cache: dict = {}

    def field_q(i, ids):
        key = (i, len(ids))
        if key not in cache:
            cache[key] = torch.tensor(rows(ids, len(ids) - 1, leave_one_out), dtype=torch.float32)
        return cache[key]

    def evaluate():
        total, probs = 0.0, []
        with torch.no_grad():
            for inp, tgt, logq in held_t:
                z = tm._forward(inp)[0]
                total += float(F.cross_entropy(z + logq if prior else z, tgt, reduction="sum"))
                if variant == "model":
                    probs.append(F.softmax(z, -1).double().numpy())
        return total, probs

    rng = np.random.default_rng(seed)
    curve, best, best_probs = [], math.inf, None
    for step in range(steps):
        lr = lr_schedule(step, steps, cfg.learning_rate, cfg.lr_warmup_steps, cfg.lr_min_ratio)
        tm.opt.zero_grad(set_to_none=True)
        picks = rng.integers(0, len(train), cfg.batch_size)
        loss = 0.0
        for i in picks:
            ids = train[int(i)]
            if len(ids) > T + 1:
                start = int(rng.integers(0, len(ids) - T))
                ids = ids[start:start + T + 1]
            z = tm._forward(torch.tensor([ids[:-1]]))[0]
            tgt = torch.tensor(ids[1:])
            if prior:
                one = F.cross_entropy(z + torch.log(field_q(int(i), ids)), tgt)
            elif lam:
                logp = F.log_softmax(z, -1)
                one = (1 - lam) * F.nll_loss(logp, tgt) - lam * (field_q(int(i), ids) * logp).sum(-1).mean()
            else:
                one = F.cross_entropy(z, tgt)
            loss = loss + one / len(picks)
        loss.backward()
        for p in tm.params.values():
            if p.grad is not None:
                p.grad.clamp_(-tm.clip, tm.clip)
        for group in tm.opt.param_groups:
            group["lr"] = lr
        tm.opt.step()
        if (step + 1) % cfg.eval_interval == 0 or step == steps - 1:
            nats, probs = evaluate()
            curve.append(nats)
            if nats < best:
                best, best_probs = nats, probs
    return best, curve, best_probs if variant == "model" else None


def blend_nats(a: float, probs: list, field_q: list, held: list) -> float:
    return float(-sum(np.log(a * p[np.arange(len(p)), w[1:]] + (1 - a) * q[np.arange(len(q)), w[1:]]).sum()
                      for p, q, w in zip(probs, field_q, held)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", help="UTF-8 text, one line per line (default: the shipped seed corpus)")
    ap.add_argument("--lines", type=int, default=2000, help="the corpus's first N lines")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, help="warmup steps (default: Config.warmup_steps)")
    ap.add_argument("--variants", default="model,field-prior,field-prior-in,distill-0.3")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = pathlib.Path(args.corpus) if args.corpus else pathlib.Path(mg.__file__).parent / "data" / "seed_corpus.txt"
    lines = mg.read_corpus(path).lines[:args.lines]
    cfg = mg.Config()
    steps = args.steps or cfg.warmup_steps
    variants = args.variants.split(",")
    print(f"# corpus {path.name}: {len(lines)} lines; {steps} steps a variant; torch {torch.__version__}")
    print(f"{'seed':>4} {'variant':16} {'held-out':>9} {'alpha':>7}   (nats/char; field and uniform per seed)")
    results = []
    for seed in range(args.seeds):
        org = mg.Organism(cfg, lines, seed=seed)
        org.warmup()
        tok, V, T = org.tokenizer, org.tokenizer.vocab_size, cfg.block_size
        held_lines = [x for x in org.val_lines[:cfg.val_max_sequences] if x.split()]
        chars = sum(line_chars(x) for x in held_lines)
        held = [w for x in held_lines for w in windows(tok.encode(x), T)]
        held = [w for w in held if len(w) >= 2]
        rows = FieldRows(org.field)
        held_q = [rows(w, len(w) - 1, False) for w in held]
        field_nats = float(np.dot(org.field.sequence_losses(held, T), [len(w) - 1 for w in held]))
        uniform = math.log(V) * sum(len(w) - 1 for w in held) / chars
        L_field = field_nats / chars

        def alpha(L):
            return (uniform - L) / (uniform - L_field)

        org_L = org.heldout_loss()
        row = {"seed": seed, "field": L_field, "uniform": uniform, "vocab": V,
               "organism": {"heldout": org_L, "model_alpha": org.model_alpha()}}
        print(f"{seed:>4} {'field':16} {L_field:9.4f} {1.0:7.3f}   uniform {uniform:.4f}, V {V}")
        print(f"{seed:>4} {'organism':16} {org_L:9.4f} {alpha(org_L):7.3f}   its own warmup (model_alpha() "
              f"{row['organism']['model_alpha']:.3f})", flush=True)
        train = [tok.encode(x) for x in org.reservoir.lines]
        train = [s for s in train if len(s) >= 2]
        init = {k: v.astype(np.float32) for k, v in mg.Model(cfg, V, seed=seed).params().items()}
        probs = None
        for variant in variants:
            t0 = time.perf_counter()
            nats, curve, got = train_variant(variant, cfg, init, train, held, held_q, rows, seed, steps)
            probs = got if got is not None else probs
            L = nats / chars
            row[variant] = {"heldout": L, "alpha": alpha(L), "curve": [c / chars for c in curve]}
            print(f"{seed:>4} {variant:16} {L:9.4f} {alpha(L):7.3f}   ({time.perf_counter() - t0:.0f} s)", flush=True)
        if probs is not None:
            a_org = min(1.0, max(0.0, row["model"]["alpha"]))
            grid = np.linspace(0, 1, 41)
            blends = [blend_nats(a, probs, held_q, held) / chars for a in grid]
            k = int(np.argmin(blends))
            at_org = blend_nats(a_org, probs, held_q, held) / chars
            row["blend"] = {"at_alpha": {"a": a_org, "heldout": at_org, "alpha": alpha(at_org)},
                            "best": {"a": float(grid[k]), "heldout": blends[k], "alpha": alpha(blends[k])}}
            print(f"{seed:>4} {'blend a=%.2f' % a_org:16} {at_org:9.4f} {alpha(at_org):7.3f}   "
                  f"the model's blend with the field at a = its alpha")
            print(f"{seed:>4} {'blend a=%.2f' % grid[k]:16} {blends[k]:9.4f} {alpha(blends[k]):7.3f}   "
                  f"the best a for these lines", flush=True)
        results.append(row)
    print("# medians over seeds (held-out nats/char, alpha):")
    for name in ["organism"] + variants:
        Ls = [r[name]["heldout"] for r in results]
        As = [r[name].get("alpha", r[name].get("model_alpha")) if name != "organism"
              else (r["uniform"] - r[name]["heldout"]) / (r["uniform"] - r["field"]) for r in results]
        print(f"#   {name:16} {statistics.median(Ls):.4f} {statistics.median(As):.3f}")
    print(f"#   {'field':16} {statistics.median(r['field'] for r in results):.4f} 1.000")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"corpus": str(path), "lines": len(lines), "steps": steps,
                                                       "seeds": results}, indent=1))


if __name__ == "__main__":
    main()
