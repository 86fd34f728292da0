"""Soak: a chat-like loop (observe, generate, observe the reply, a checked burst, a save now and
then) run with every store already at its cap, checking what a long chat must not do: keep
native decoders alive beyond the generator's pool, grow the process's resident memory, or let
a store outgrow its cap (reservoir lines, memory messages/events/snapshots, the telemetry
file, the quarantine, the held-out lines of heard text).

The slow version runs 150 turns after the warm-up (RSS growth <= 25 MB); the short one, for
CI, 50 turns with the bound scaled to its length (plus a floor for allocator noise)."""
from __future__ import annotations

import gc
import os
import random

import pytest

import molecule_gpt as mg
from molecule_gpt import _decode
from molecule_gpt.organism import Organism

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc/self/statm")

ANIMALS = ["cat", "dog", "heron", "fox", "otter", "crow", "hare", "mole"]
VERBS = ["watches", "follows", "finds", "calls", "hears", "misses", "greets"]
THINGS = ["the river", "a red kite", "the old mill", "the market", "a quiet lane", "the lamp", "the moon"]

# small caps, so that a short run fills every store and then lives at its caps
CAPS = dict(max_corpus_lines=60, max_messages=24, max_events=30, max_snapshots=30, telemetry_max_bytes=8192,
            max_quarantine_lines=12, heard_val_max_lines=6)


def sentence(rng: random.Random, i: int) -> str:
    """A new line every call (the number makes it unique), from a small learnable language."""
    return (f"The {rng.choice(ANIMALS)} {rng.choice(VERBS)} {rng.choice(THINGS)} "
            f"at hour {i}{rng.choice('.!?')}")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def decoders_alive() -> int:
    gc.collect()
    return sum(isinstance(o, _decode.Decoder) for o in gc.get_objects())


def make_organism(tmp_path) -> tuple[Organism, mg.Memory]:
    config = mg.Config(n_layer=1, n_embd=32, n_head=4, block_size=48,
                       head_types=("content", "content", "hybrid", "rrpram"), delta_rank=4, warmup_steps=60, eval_interval=30, micro_steps=4, batch_size=4, train_threads=1,
                       lr_warmup_steps=10, val_max_sequences=16, qb_cooldown_seconds=0.0, max_gen_tokens=24,
                       max_delta_modules=4, delta_grow_prob=0.3,  # modules are born and retired along the way
                       enable_bpe_after_chars=1500, bpe_num_merges=48, bpe_retrain_every_chars=1500,
                       # a strict immune check: about half the bursts roll back, so the quarantine fills too
                       immune_max_rise=0.003, max_corpus_lines=CAPS["max_corpus_lines"],
                       max_quarantine_lines=CAPS["max_quarantine_lines"],
                       heard_val_max_lines=CAPS["heard_val_max_lines"], heard_val_fraction=0.2)
    rng = random.Random(0)
    corpus = [sentence(rng, i) for i in range(2 * CAPS["max_corpus_lines"])]  # past the cap from birth
    memory = mg.Memory(tmp_path / "memory.sqlite", max_messages=CAPS["max_messages"], max_events=CAPS["max_events"],
                       max_snapshots=CAPS["max_snapshots"])
    org = Organism(config, corpus, seed=1, memory=memory, telemetry_path=tmp_path / "telemetry.jsonl",
                   telemetry_max_bytes=CAPS["telemetry_max_bytes"])
    return org, memory


def check_caps(org: Organism, memory: mg.Memory, tmp_path) -> None:
    c = org.config
    assert len(org.reservoir.lines) <= c.max_corpus_lines
    counts = memory.counts()
    assert counts["messages"] <= CAPS["max_messages"] and counts["index_rows"] <= CAPS["max_messages"]
    assert counts["corpus_events"] <= CAPS["max_events"] and counts["snapshots"] <= CAPS["max_snapshots"]
    assert (tmp_path / "telemetry.jsonl").stat().st_size <= CAPS["telemetry_max_bytes"]
    assert len(org.quarantine) <= c.max_quarantine_lines
    assert len(org.heard_val_lines) <= c.heard_val_max_lines


def soak(tmp_path, turns: int, warmup_turns: int = 30) -> dict:
    org, memory = make_organism(tmp_path)
    rng = random.Random(1)
    ckpt = tmp_path / "organism.ckpt"
    org.warmup()
    step = 0

    def turn() -> None:
        nonlocal step
        step += 1
        text = sentence(rng, 1000 + step)
        org.observe(text, speaker="H")
        reply = org.generate(text, seed=step, stop=("H:", "A:"))
        if step % 3 == 0:  # a stream left unfinished must give its decoder back too
            pieces = org.stream(text, seed=step)
            next(pieces, None)
            pieces.close()
        if reply.strip():
            org.observe(reply, speaker="A")
        org.train_burst()
        if step % 5 == 0:
            org.save(ckpt)

    try:
        for _ in range(warmup_turns):  # every store reaches its cap, caches and pools fill
            turn()
        check_caps(org, memory, tmp_path)
        assert memory.counts()["messages"] == CAPS["max_messages"]  # really at the cap
        assert len(org.reservoir.lines) >= CAPS["max_corpus_lines"] - 12  # the held-out share of heard lines aside
        gc.collect()
        base = rss_mb()
        peak = base
        for _ in range(turns):
            turn()
            peak = max(peak, rss_mb())
            check_caps(org, memory, tmp_path)
        pool = len(org._generator._pool)
        stats = org.stats()
        return {"rss_growth_mb": rss_mb() - base, "peak_growth_mb": peak - base, "decoders": decoders_alive(),
                "pool": pool, "bursts": stats["bursts"], "rolled_back": stats["rolled_back_bursts"],
                "quarantine": len(org.quarantine), "vocab": stats["vocab_size"]}
    finally:
        org.close()
        memory.close()


def report(figures: dict) -> None:
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


def test_soak_short(tmp_path):
    turns = 50
    figures = soak(tmp_path, turns)
    report(figures)
    assert figures["decoders"] <= figures["pool"], figures  # none alive beyond the generator's pool
    # both verdicts came up, and the quarantine was used
    assert 0 < figures["rolled_back"] < figures["bursts"] and figures["quarantine"] > 0
    # 25 MB per 150 turns, scaled to this run, plus 4 MB for the allocator's granularity
    assert figures["rss_growth_mb"] <= 25 * turns / 150 + 4, figures


@pytest.mark.slow
def test_soak_150_turns(tmp_path):
    figures = soak(tmp_path, 150)
    report(figures)
    assert figures["decoders"] <= figures["pool"], figures
    assert figures["rss_growth_mb"] <= 25, figures
