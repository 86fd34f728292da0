"""Continual learning: does the organism learn a new domain without forgetting the old one?

    python benchmarks/bench_learning.py [--domain-a A.txt --domain-b B.txt] [--seeds 3]
        [--bursts 50] [--json OUT.json] [--plots DIR] [--quick] [--skip immune,heads,baselines,learn]
        [--set FIELD=JSON ...] [--ray [ADDRESS] [--ray-cpus N]]

With --ray (pip install "molecule-gpt[ray]"), every trial (one seed's learning run, immune
matrix or head types) is a Ray task on a local Ray instance (no ADDRESS) or a cluster
("HOST:PORT", "auto", "ray://HOST:10001"); all are submitted at once and the same report is
gathered in the same order. Each task reserves --ray-cpus CPUs (default 1) and trains with
that many threads (Config.train_threads, unless --set gives it).

The experiment, per seed:
1. Domain A (default: sentences of the stdlib's documentation) is shuffled and split into a
   birth corpus (`--birth-lines`, 2,000) and held-out test lines never trained on; domain B
   (default: lines of the stdlib's Python source) into 50 equal chunks and held-out test lines.
2. An organism is born on A's birth corpus with the default Config and warms up.
3. B is fed in `--bursts` chunks: observe(chunk), then train_burst(). After each burst: held-out
   loss of A and of B (nats per character, molecule_gpt.heldout: comparable across tokenizer
   changes), accepted or rolled back and why, vocabulary size, delta modules.
4. Baselines from the same warmed-up weights and tokenizer (frozen), the same steps, learning
   rate, batch and tokens per chunk as the organism's bursts: plain full fine-tuning of every
   weight without replay, and with 50% replay of A's birth corpus.
5. (`learn`) The same warmed-up organism given all of B's chunks at once through learn(), as
   `molecule-gpt train FILE` does: checked bursts over the text until its held-out slice stops
   improving (not the same steps as the others: its own stopping rule).

Each tokenizer growth the organism keeps is measured too: held-out A on the test lines right
before and right after it (the issue's bound: at most +0.5%).

Figures (medians over seeds): forgetting = held-out A after the last burst / after warmup - 1;
learning = held-out B after / before - 1. Targets: forgetting <= 2%, learning <= -35% and at
least 90% of the full fine-tuning with 50% replay in the same run.

Immune system (`immune`): from the organism after 10 clean bursts, candidate bursts of clean
text (new lines of A, lines of B) and of harmful kinds (shuffled characters of real text,
random symbols, a phrase repeated with a counter, the learning rate raised 1,000x, random
characters of a foreign script). Harm is judged by effect: each candidate is also run with the
immune system off, and it is harmful when, accepted, it raises held-out A by more than 1%. The
confusion matrix counts harmful/harmless x rejected/accepted; after every rejected burst the
next three clean bursts must be accepted and leave held-out A within 1% of where clean bursts
alone leave it (the damage left).

Head types (`heads`): held-out A loss after the default warmup for all-content, all-rrpram,
all-hybrid and the default mix, and the corpus field's held-out loss on the same lines.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import corpora  # noqa: E402
import molecule_gpt as mg  # noqa: E402
from molecule_gpt.heldout import HeldOut  # noqa: E402


# ---------------------------------------------------------------------------------------------
# data


def load_domains(args) -> tuple[list[str], list[str]]:
    def read(path):
        return mg.read_corpus(path).lines
    a = read(args.domain_a) if args.domain_a else corpora.doc_sentences()
    b = read(args.domain_b) if args.domain_b else corpora.code_lines()
    return a, b


class Split:
    """One seed's split of the two domains."""

    def __init__(self, a: list[str], b: list[str], seed: int, args):
        rng = np.random.default_rng(1000 + seed)
        a = [a[i] for i in rng.permutation(len(a))]
        b = [b[i] for i in rng.permutation(len(b))]
        n_test = args.test_lines
        self.a_test, rest = a[:n_test], a[n_test:]
        self.a_birth, self.a_more = rest[:args.birth_lines], rest[args.birth_lines:]
        self.b_test, rest = b[:n_test], b[n_test:]
        per = args.chunk_lines
        self.b_chunks = [rest[i * per:(i + 1) * per] for i in range(args.bursts)]
        self.b_more = rest[args.bursts * per:]
        if len(self.b_chunks[-1]) < per or len(self.a_birth) < args.birth_lines or len(self.b_more) < 6 * per:
            raise SystemExit(f"not enough text: domain A needs {n_test + args.birth_lines} lines, domain B "
                             f"{n_test + (args.bursts + 6) * per}")


def heldout(org_or_tok, lines):
    tok = org_or_tok.tokenizer if hasattr(org_or_tok, "tokenizer") else org_or_tok
    return HeldOut(lines, tok.encode, lambda: tok.version)


def losses(org, split) -> tuple[float, float]:
    return heldout(org, split.a_test).loss(org.model), heldout(org, split.b_test).loss(org.model)


# ---------------------------------------------------------------------------------------------
# runs


def config_for(args, **changes) -> mg.Config:
    c = mg.Config(**dict(args.set, **changes))
    if args.quick:
        c = c.replace(warmup_steps=min(c.warmup_steps, 300))
    return c


def warmed_organism(split, seed, args, **changes) -> tuple[mg.Organism, dict]:
    org = mg.Organism(config_for(args, **changes), list(split.a_birth), seed=seed)
    t0 = time.perf_counter()
    summary = org.warmup()
    summary["wall_seconds"] = time.perf_counter() - t0
    return org, summary


def measure_growths(org, split, last_a: list) -> tuple[list[dict], list]:
    """Instrument the organism's tokenizer growth (a private hook, for measurement only): held-out
    A on the test lines right after each growth it keeps, against last_a[0] (the figure right
    before it: the last measured, nothing trains in between), so the issue's 0.5% bound is
    checked on text the organism never sees. Returns (the growths, [seconds spent measuring])."""
    growths, spent, grow = [], [0.0], org._maybe_grow_tokenizer

    def measured(*a, **kw):
        grew = grow(*a, **kw)
        if grew:
            t0 = time.perf_counter()
            after = heldout(org, split.a_test).loss(org.model)
            growths.append({"vocab": org.model.vocab_size, "a_before": last_a[0], "a_after": after,
                            "rise": after / last_a[0] - 1})
            spent[0] += time.perf_counter() - t0
        return grew

    org._maybe_grow_tokenizer = measured
    return growths, spent


def organism_run(org, split, args) -> dict:
    a0, b0 = losses(org, split)
    per_burst, last_a = [], [a0]
    growths, spent = measure_growths(org, split, last_a)
    for i, chunk in enumerate(split.b_chunks):
        org.observe(list(chunk))
        spent[0] = 0.0
        t0 = time.perf_counter()
        rep = org.train_burst()
        dt = time.perf_counter() - t0 - spent[0]
        a, b = losses(org, split)
        last_a[0] = a
        per_burst.append({"burst": i + 1, "a": a, "b": b, "accepted": rep.accepted, "reason": rep.reason,
                          "vocab": org.model.vocab_size, "modules": org.model.n_delta, "seconds": dt})
    a1, b1 = losses(org, split)
    return {"a_before": a0, "b_before": b0, "a_after": a1, "b_after": b1,
            "forgetting": a1 / a0 - 1, "learning": b1 / b0 - 1, "per_burst": per_burst, "growths": growths,
            "accepted": sum(r["accepted"] for r in per_burst),
            "burst_seconds": statistics.median(r["seconds"] for r in per_burst)}


def learn_run(org, split, args) -> dict:
    """The organism given all of B at once, as `molecule-gpt train FILE` does: learn() with its
    defaults (checked bursts over the text until the held-out slice stops improving)."""
    a0, b0 = losses(org, split)
    summary = org.learn([x for chunk in split.b_chunks for x in chunk])
    a1, b1 = losses(org, split)
    return {"a_before": a0, "b_before": b0, "a_after": a1, "b_after": b1,
            "forgetting": a1 / a0 - 1, "learning": b1 / b0 - 1, "bursts": summary["bursts"],
            "accepted": summary["accepted"], "vocab": org.model.vocab_size, "seconds": summary["seconds"]}


def finetune_run(org, split, args, replay_ratio: float, seed: int) -> dict:
    """Plain full fine-tuning of the warmed-up weights (every base weight trains, no modules,
    the tokenizer frozen): per chunk, micro_steps steps of batch_size sequences, each slot a
    line of A's birth corpus with probability replay_ratio, else a line of the chunk."""
    c = org.config
    model = org.model
    for k in range(model.n_delta):
        model.set_trainable(f"delta{k}", False)
    model.set_trainable("base", True)
    enc = org.tokenizer.encode
    T = c.block_size
    rng = np.random.default_rng(seed)
    a_ids = [enc(x) for x in split.a_birth]
    a0, b0 = losses(org, split)
    per_burst = []

    def window(seq):
        if len(seq) > T + 1:
            s = int(rng.integers(0, len(seq) - T))
            return seq[s:s + T + 1]
        return seq

    for i, chunk in enumerate(split.b_chunks):
        new = [enc(x) for x in chunk]
        for _ in range(c.micro_steps):
            n_replay = int(rng.binomial(c.batch_size, replay_ratio))
            batch = [window(a_ids[j]) for j in rng.integers(0, len(a_ids), n_replay)]
            batch += [window(new[j]) for j in rng.integers(0, len(new), c.batch_size - n_replay)]
            model.train_step(batch, c.burst_learning_rate)
        a, b = losses(org, split)
        per_burst.append({"burst": i + 1, "a": a, "b": b})
    a1, b1 = per_burst[-1]["a"], per_burst[-1]["b"]
    return {"a_before": a0, "b_before": b0, "a_after": a1, "b_after": b1,
            "forgetting": a1 / a0 - 1, "learning": b1 / b0 - 1, "per_burst": per_burst}


def clone(org) -> mg.Organism:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "o.ckpt")
        org.save(path)
        return mg.Organism.load(path)


def learning_experiment(a_lines, b_lines, seed, args) -> dict:
    split = Split(a_lines, b_lines, seed, args)
    org, summary = warmed_organism(split, seed, args)
    out = {"seed": seed, "warmup": {k: summary[k] for k in ("steps", "val_loss", "wall_seconds")},
           "model_alpha": org.model_alpha()}
    base = clone(org) if "baselines" not in args.skip else None
    learner = clone(org) if "learn" not in args.skip else None
    out["organism"] = organism_run(org, split, args)
    if learner is not None:
        out["organism_learn"] = learn_run(learner, split, args)
    if base is not None:
        for name, ratio in (("finetune_no_replay", 0.0), ("finetune_replay50", 0.5)):
            out[name] = finetune_run(clone(base), split, args, ratio, seed)
    return out


# ---------------------------------------------------------------------------------------------
# immune system


def harmful_texts(split, rng, n_lines: int) -> dict:
    """Candidate bursts that are not a language: name -> (lines, lr factor)."""
    real = list(split.a_more[:n_lines])
    shuffled = ["".join(rng.permutation(list(x))) for x in real]
    symbols = "!@#$%^&*()_+-=[]{};:,.<>/?|~`"
    sym = ["".join(rng.choice(list(symbols), int(rng.integers(30, 90)))) for _ in range(n_lines)]
    phrase = [f"buy cheap pills now number {i} buy cheap pills now" for i in range(n_lines)]
    script = [chr(c) for c in range(0x0900, 0x097F)]  # Devanagari letters, drawn at random
    foreign = ["".join(rng.choice(script, int(rng.integers(30, 90)))) for _ in range(n_lines)]
    return {"shuffled_chars": (shuffled, 1.0), "random_symbols": (sym, 1.0), "repeated_phrase": (phrase, 1.0),
            "lr_x1000": (list(split.b_more[5 * n_lines:6 * n_lines]), 1000.0), "foreign_noise": (foreign, 1.0)}


def run_candidate(base_path, split, lines, lr_factor, immune: bool, follow: list[list[str]]) -> dict:
    """Load the organism, run one burst on `lines`, then the clean bursts of `follow`;
    held-out A after each (and the decision of each burst)."""
    org = mg.Organism.load(base_path)
    if not immune:
        org.config.immune_max_rise = 1e9
    a0 = heldout(org, split.a_test).loss(org.model)
    out = {"a_before": a0, "a_after": a0, "accepted": None, "reason": None, "follow": []}
    if lines:
        org.observe(list(lines))
        rep = org.train_burst(lr=org.config.burst_learning_rate * lr_factor)
        seen = rep.loss_after / rep.loss_before - 1 if rep.loss_after is not None and rep.loss_before else None
        seen_all = rep.second_look[1] / rep.second_look[0] - 1 if rep.second_look else None
        out.update(a_after=heldout(org, split.a_test).loss(org.model), accepted=rep.accepted, reason=rep.reason,
                   drift_cosine=rep.drift_cosine, organism_saw=seen, organism_saw_all=seen_all)
    for chunk in follow:
        org.observe(list(chunk))
        r = org.train_burst()
        out["follow"].append({"accepted": r.accepted, "a": heldout(org, split.a_test).loss(org.model)})
    return out


def immune_experiment(a_lines, b_lines, seed, args) -> dict:
    """The confusion matrix of the immune system over clean and harmful candidate bursts, harm
    judged by effect (held-out A +1% with the immune system off)."""
    split = Split(a_lines, b_lines, seed, args)
    org, _ = warmed_organism(split, seed, args)
    for chunk in split.b_chunks[:min(10, args.bursts)]:
        org.observe(list(chunk))
        org.train_burst()
    rng = np.random.default_rng(seed)
    n = args.chunk_lines
    more = split.b_more
    candidates = {"clean_a": (list(split.a_more[n:2 * n]), 1.0), "clean_b": (list(more[:n]), 1.0),
                  "clean_b2": (list(more[n:2 * n]), 1.0)}
    candidates.update(harmful_texts(split, rng, n))
    follow = [list(more[i * n:(i + 1) * n]) for i in (2, 3, 4)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "base.ckpt")
        org.save(path)
        clean_only = run_candidate(path, split, [], 1.0, True, follow)
        for name, (lines, lr_factor) in candidates.items():
            on = run_candidate(path, split, lines, lr_factor, True, follow)
            off = run_candidate(path, split, lines, lr_factor, False, [])
            effect = off["a_after"] / off["a_before"] - 1
            harmful = effect > 0.01
            # what a rejected burst leaves: held-out A after the next clean bursts, against those
            # clean bursts alone (an accepted burst's change is its effect, not damage left)
            left = on["follow"][-1]["a"] / clean_only["follow"][-1]["a"] - 1 if not on["accepted"] else None
            # the identity-drift check, measured on the burst as accepted: would it have caught it?
            cos = off.get("drift_cosine")
            rows.append({"candidate": name, "effect": effect, "organism_saw": on["organism_saw"],
                         "organism_saw_all": on.get("organism_saw_all"),
                         "harmful": harmful, "accepted": on["accepted"],
                         "drift_cosine": cos, "drift_check_fails": cos is not None and cos < org.config.noise_drift_threshold,
                         "reason": on["reason"], "follow_accepted": [f["accepted"] for f in on["follow"]],
                         "damage_left": left})
    matrix = {"harmful_rejected": 0, "harmful_accepted": 0, "harmless_accepted": 0, "harmless_rejected": 0}
    for r in rows:
        matrix[("harmful_" if r["harmful"] else "harmless_") + ("accepted" if r["accepted"] else "rejected")] += 1
    return {"seed": seed, "rows": rows, "matrix": matrix}


# ---------------------------------------------------------------------------------------------
# head types


HEAD_MIXES = {"default": None, "all_content": ("content",) * 4, "all_rrpram": ("rrpram",) * 4,
              "all_hybrid": ("hybrid",) * 4}


def model_against_field(org, held: HeldOut) -> tuple[float, float, float]:
    """(the model's held-out loss, the corpus field's (CorpusField.heldout_loss's interpolation),
    the share of the way from a uniform guess to the field's loss that the model's covers: 1 as
    good as the field), in nats per character of `held`'s lines, on the same windows."""
    ws = held.windows(org.config.block_size)
    targets = sum(len(w) - 1 for w in ws)
    field = float(np.dot(org.field.sequence_losses(ws), [len(w) - 1 for w in ws])) / held.chars
    uniform = math.log(org.model.vocab_size) * targets / held.chars
    model = held.loss(org.model)
    return model, field, (uniform - model) / (uniform - field)


def heads_experiment(a_lines, b_lines, seed, args) -> dict:
    """Held-out A (nats/char) after the default warmup per head mix, beside the corpus field's
    loss on the same lines (CorpusField.heldout_loss's interpolation) and the issue's measure of
    the model against the field, (uniform - L_model) / (uniform - L_field) (1: as good as the
    field); model_alpha() is the model's weight in the blend the organism speaks with."""
    split = Split(a_lines, b_lines, seed, args)
    out = {}
    for name, heads in HEAD_MIXES.items():
        changes = {} if heads is None else {"head_types": heads, "n_head": len(heads)}
        org, summary = warmed_organism(split, seed, args, **changes)
        a, field, vs_field = model_against_field(org, heldout(org, split.a_test))
        out[name] = {"a": a, "field": field, "vs_field": vs_field,
                     "model_alpha": org.model_alpha(), "warmup_seconds": summary["wall_seconds"],
                     "head_types": list(org.config.head_types)}
    return out


# ---------------------------------------------------------------------------------------------
# plots


def write_plots(results: dict, out_dir: str) -> list[str]:
    """PNG files: learning and forgetting curves (per burst, every seed and run), forgetting
    against learning, and the immune system's confusion matrix."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    written = []
    runs = ("organism", "finetune_no_replay", "finetune_replay50")
    colors = dict(zip(runs, ("tab:blue", "tab:red", "tab:green")))
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for r in results["seeds"]:
        for name in runs:
            if name not in r:
                continue
            pb = r[name]["per_burst"]
            xs = [0] + [p["burst"] for p in pb]
            label = name if r["seed"] == 0 else None
            ax_a.plot(xs, [100 * (v / r[name]["a_before"] - 1) for v in [r[name]["a_before"]] + [p["a"] for p in pb]],
                      color=colors[name], lw=1, alpha=0.8, label=label)
            ax_b.plot(xs, [100 * (v / r[name]["b_before"] - 1) for v in [r[name]["b_before"]] + [p["b"] for p in pb]],
                      color=colors[name], lw=1, alpha=0.8, label=label)
    ax_a.axhline(2, color="gray", ls="--", lw=0.8)
    ax_a.set(title="old domain A: forgetting", xlabel="burst", ylabel="held-out loss change (%)")
    ax_b.axhline(-35, color="gray", ls="--", lw=0.8)
    ax_b.set(title="new domain B: learning", xlabel="burst", ylabel="held-out loss change (%)")
    ax_a.legend(fontsize=8)
    path = os.path.join(out_dir, "learning_curves.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(5.5, 4.5), constrained_layout=True)
    for name in runs:
        pts = [(100 * r[name]["learning"], 100 * r[name]["forgetting"]) for r in results["seeds"] if name in r]
        if pts:
            ax.scatter([x for x, _ in pts], [y for _, y in pts], color=colors[name], label=name)
    ax.axhline(2, color="gray", ls="--", lw=0.8)
    ax.set(title="forgetting vs learning (each point a seed)", xlabel="held-out B change (%)",
           ylabel="held-out A change (%)")
    ax.legend(fontsize=8)
    path = os.path.join(out_dir, "forgetting_vs_learning.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

    if results.get("immune"):
        m = {k: sum(im["matrix"][k] for im in results["immune"]) for k in results["immune"][0]["matrix"]}
        grid = np.array([[m["harmful_rejected"], m["harmful_accepted"]], [m["harmless_rejected"], m["harmless_accepted"]]])
        fig, ax = plt.subplots(figsize=(4.5, 3.8), constrained_layout=True)
        ax.imshow(grid, cmap="Blues")
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(grid[i, j]), ha="center", va="center", fontsize=14)
        ax.set_xticks([0, 1], ["rejected", "accepted"])
        ax.set_yticks([0, 1], ["harmful (A +1%)", "harmless"])
        ax.set_title(f"immune system, {len(results['immune'])} seed(s)")
        path = os.path.join(out_dir, "immune_matrix.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# report


def pct(x):
    return f"{100 * x:+.1f}%"


# ---------------------------------------------------------------------------------------------
# trials: one after the other here, or as Ray tasks (--ray)


class Trials:
    """Runs fn(a_lines, b_lines, seed, args) for each seed of each part. Without --ray, lazily
    in this process (results stream as each finishes); with --ray, every part's tasks are
    submitted when added, so all trials run at once across the cluster, and results are
    gathered in seed order."""

    def __init__(self, args, a_lines, b_lines):
        self.args = args
        self.lines = (a_lines, b_lines)
        self.ray = None
        if args.ray is not None:
            from molecule_gpt.colony import init_ray
            import ray
            from ray import cloudpickle
            init_ray(args.ray or None)
            # this script and its helper module are not installed on the workers: ship them by value
            cloudpickle.register_pickle_by_value(sys.modules[__name__])
            cloudpickle.register_pickle_by_value(corpora)
            self.ray = ray
            self.lines = (ray.put(a_lines), ray.put(b_lines))
            args.set.setdefault("train_threads", max(1, int(args.ray_cpus)))

    def run(self, fn, seeds):
        if self.ray is None:
            return (fn(*self.lines, seed, self.args) for seed in seeds)
        task = self.ray.remote(num_cpus=self.args.ray_cpus, max_retries=1)(fn)
        refs = [task.remote(*self.lines, seed, self.args) for seed in seeds]
        return (self.ray.get(ref) for ref in refs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain-a", help="old domain, UTF-8 text, one line per line (default: stdlib docs)")
    ap.add_argument("--domain-b", help="new domain (default: stdlib source lines)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--bursts", type=int, default=50)
    ap.add_argument("--chunk-lines", type=int, default=24, help="lines of B per burst")
    ap.add_argument("--birth-lines", type=int, default=2000)
    ap.add_argument("--test-lines", type=int, default=200)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: baselines,learn,immune,heads")
    ap.add_argument("--quick", action="store_true", help="a 300-step warmup (for tests)")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--plots", metavar="DIR", help="write PNG plots (needs matplotlib) into DIR")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="a Config field for every organism, e.g. --set burst_learning_rate=0.003")
    ap.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run the trials as Ray tasks: a local Ray instance, or the cluster at ADDRESS")
    ap.add_argument("--ray-cpus", type=float, default=1.0, metavar="N", help="CPUs each Ray task reserves")
    args = ap.parse_args(argv)
    if args.ray is None and args.ray_cpus != 1.0:
        ap.error("--ray-cpus needs --ray")
    if not args.ray_cpus > 0:
        ap.error("--ray-cpus must be > 0")
    args.set = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    args.skip = set(filter(None, args.skip.split(",")))
    a_lines, b_lines = load_domains(args)
    print(f"# machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}; "
          f"domain A {len(a_lines)} lines, domain B {len(b_lines)} lines")
    trials = Trials(args, a_lines, b_lines)
    if trials.ray is not None:
        print(f"# trials as Ray tasks of {args.ray_cpus:g} CPU(s) on {trials.ray.cluster_resources().get('CPU', 0):g} "
              f"CPUs in {len(trials.ray.nodes())} node(s)")
    results = {"args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()}, "seeds": []}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    # with --ray, every part is submitted now (all trials run at once); locally they run as read
    learning = trials.run(learning_experiment, seeds)
    immune = trials.run(immune_experiment, seeds) if "immune" not in args.skip else None
    heads = trials.run(heads_experiment, seeds) if "heads" not in args.skip else None
    for seed, r in zip(seeds, learning):
        results["seeds"].append(r)
        o = r["organism"]
        rises = [g["rise"] for g in o["growths"]]
        line = (f"seed {seed}: warmup {r['warmup']['wall_seconds']:.1f} s, model_alpha {r['model_alpha']:.3f}; "
                f"organism A {pct(o['forgetting'])} B {pct(o['learning'])} ({o['accepted']}/{len(o['per_burst'])} "
                f"accepted, burst {o['burst_seconds'] * 1000:.0f} ms, {len(rises)} tokenizer growths"
                + (f", test A right after each {pct(min(rises))} to {pct(max(rises))})" if rises else ")"))
        if "organism_learn" in r:
            o = r["organism_learn"]
            line += (f"; organism_learn A {pct(o['forgetting'])} B {pct(o['learning'])} ({o['accepted']}/{o['bursts']} "
                     f"accepted, vocab {o['vocab']})")
        for name in ("finetune_no_replay", "finetune_replay50"):
            if name in r:
                line += f"; {name} A {pct(r[name]['forgetting'])} B {pct(r[name]['learning'])}"
        print(line, flush=True)
    if immune is not None:
        results["immune"] = []
        for seed, im in zip(seeds, immune):
            results["immune"].append(im)
            print(f"immune, seed {seed}: {im['matrix']}")
            for r in im["rows"]:
                saw = f" (its own held-out: {pct(r['organism_saw'])}" if r["organism_saw"] is not None else ""
                if r.get("organism_saw_all") is not None:
                    saw += f", all its held-out lines: {pct(r['organism_saw_all'])}"
                saw += ")" if saw else ""
                print(f"  {r['candidate']:<16} effect {pct(r['effect']):>8}{saw} {'harmful' if r['harmful'] else 'harmless':<8} "
                      f"{'accepted' if r['accepted'] else 'rejected (' + r['reason'] + ')'}; next clean bursts "
                      f"{''.join('+' if x else '-' for x in r['follow_accepted'])}"
                      + (f", damage left {pct(r['damage_left'])}" if r["damage_left"] is not None else "")
                      + (f"; drift cosine {r['drift_cosine']:.2f}" if r["drift_cosine"] is not None else ""),
                      flush=True)
    if heads is not None:
        results["heads"] = list(heads)
        for name in HEAD_MIXES:
            a = statistics.median(h[name]["a"] for h in results["heads"])
            field = statistics.median(h[name]["field"] for h in results["heads"])
            vs = statistics.median(h[name]["vs_field"] for h in results["heads"])
            alpha = statistics.median(h[name]["model_alpha"] for h in results["heads"])
            print(f"heads {name:<12} held-out A {a:.4f} nats/char (the field {field:.4f}: model against field "
                  f"{vs:.3f}), model_alpha {alpha:.3f} (medians over seeds)")
    summary = {}
    for name in ("organism", "organism_learn", "finetune_no_replay", "finetune_replay50"):
        runs = [r[name] for r in results["seeds"] if name in r]
        if runs:
            summary[name] = {"forgetting": statistics.median(r["forgetting"] for r in runs),
                             "learning": statistics.median(r["learning"] for r in runs)}
    results["summary"] = summary
    for name, v in summary.items():
        print(f"median over {args.seeds} seed(s): {name:<20} A {pct(v['forgetting'])}  B {pct(v['learning'])}")
    if "finetune_replay50" in summary:
        share = summary["organism"]["learning"] / summary["finetune_replay50"]["learning"]
        print(f"organism learns {100 * share:.0f}% of what full fine-tuning with 50% replay learns")
    if args.plots:
        for path in write_plots(results, args.plots):
            print(f"wrote {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
