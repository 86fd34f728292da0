"""Organism through its public API: speaking before warmup, held-out loss, schedule and telemetry,
bursts with exact rollback, fossils, growth, save/load, background training under concurrent
generation."""
from __future__ import annotations

import json
import math
import pathlib
import random
import threading
import time

import numpy as np
import pytest

import molecule_gpt as mg
from molecule_gpt.compat import load_original_checkpoint
from molecule_gpt.errors import CheckpointError, ConfigError, CorpusError, OrganismError, TrainingError
from molecule_gpt.organism import Organism
from molecule_gpt.trainer import lr_schedule


def make_lines(n=240, seed=0) -> list[str]:
    """Small synthetic English: a few templates over a small lexicon (learnable structure)."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "her brother"]
    verbs = ["sees", "likes", "finds", "follows", "watches", "helps", "calls"]
    objects = ["the ball", "a red car", "the garden", "a quiet river", "the market", "his sister", "the moon"]
    ends = [".", ".", "!", "?"]
    lines = []
    for _ in range(n):
        s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
        if rng.random() < 0.4:
            s += f" and {rng.choice(verbs)} {rng.choice(objects)}"
        lines.append(s[0].upper() + s[1:] + rng.choice(ends))
    return lines


LINES = make_lines()


def small_config(**kw) -> mg.Config:
    base = dict(n_layer=1, n_embd=32, n_head=4, block_size=48, head_types=("content", "content", "hybrid", "rrpram"),
                delta_rank=4, warmup_steps=120, eval_interval=40, micro_steps=8, batch_size=4, train_threads=1,
                delta_grow_prob=0.0, qb_cooldown_seconds=0.0, learning_rate=0.01, lr_warmup_steps=10)
    base.update(kw)
    return mg.Config(**base)


@pytest.fixture(scope="module")
def warmed():
    """An organism after a short warmup (shared read-only by several tests; they copy it via save/load)."""
    org = Organism(small_config(), LINES, seed=1)
    org.warmup()
    return org


def clone(org: Organism, tmp_path, name="clone.ckpt") -> Organism:
    path = tmp_path / name
    org.save(path)
    return Organism.load(path)


def all_state(org: Organism) -> dict:
    """Every parameter, Adam moment and step counter, by name."""
    out = {}
    for name, g in org.model.groups.items():
        out[name] = (g.flat.copy(), g.m.copy(), g.v.copy(), g.step)
    out["alphas"] = list(org.model.delta_alphas)
    out["trainable"] = dict(org.model.trainable)
    return out


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], tuple):
            for x, y in zip(a[k][:3], b[k][:3]):
                assert x.dtype == y.dtype and x.shape == y.shape
                assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), k
            assert a[k][3] == b[k][3], k
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------------------------------------
# construction and speaking


def test_construct_from_lines_and_path(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(LINES[:50]) + "\n\n   \n", encoding="utf-8")
    a = Organism(small_config(), str(path))
    b = Organism(small_config(), path)
    c = Organism(small_config(), LINES[:50])
    assert a.stats()["corpus"] == b.stats()["corpus"] == c.stats()["corpus"]
    assert a.stats()["corpus"]["lines"] + a.stats()["corpus"]["held_out_lines"] == 50
    assert a.stats()["corpus"]["held_out_lines"] == 5
    assert isinstance(a.model, mg.Model) and a.tokenizer.vocab_size == a.model.vocab_size
    assert a.config is a.model.config


def test_bad_corpus_raises_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="not an existing file"):
        Organism(small_config(), "no such file here.txt")
    with pytest.raises(CorpusError, match=r"corpus\[1\]"):
        Organism(small_config(), ["fine", 3])
    with pytest.raises(CorpusError, match="bytes"):
        Organism(small_config(), b"abc")
    with pytest.raises(CorpusError):
        Organism(small_config(), 42)
    with pytest.raises(TypeError):
        Organism("not a config", LINES)
    assert issubclass(CorpusError, mg.MoleculeError) and issubclass(CorpusError, ValueError)


def test_empty_organism_cannot_train_but_can_listen():
    org = Organism(small_config())
    with pytest.raises(TrainingError, match="nothing to train on"):
        org.warmup(5)
    with pytest.raises(TrainingError):
        org.train_burst()
    assert isinstance(org.generate("hi", max_gen_tokens=5, seed=0), str)
    assert org.observe("The cat sees the moon. A dog helps the teacher!") == 2
    org.warmup(3)
    assert org.stats()["steps"] == 3


def test_speaks_before_warmup():
    org = Organism(small_config(), LINES, seed=2)
    assert org.stats()["steps"] == 0 and org.model_alpha() == 0.0
    texts = [org.generate("", seed=s) for s in range(5)]
    assert all(t.strip() for t in texts)
    # the field speaks corpus vocabulary: most generated words are corpus words
    words = {w.strip(".!?").lower() for line in LINES for w in line.split()}
    gen_words = [w.strip(".!?").lower() for t in texts for w in t.split()]
    assert sum(w in words for w in gen_words) / len(gen_words) > 0.5
    assert "".join(org.stream("The cat", seed=3)) == org.generate("The cat", seed=3)


def test_heldout_loss_falls_and_blend_moves_to_model(warmed):
    org = Organism(small_config(), LINES, seed=1)
    val = org._val_ids
    before = org.model.loss(val)
    assert abs(before - math.log(org.model.vocab_size)) < 0.5  # untrained: about a uniform guess
    org.warmup()
    after = org.model.loss(val)
    st = org.stats()
    print(f"held-out loss {before:.3f} -> {after:.3f}, model_alpha {st['model_alpha']:.3f}")
    assert after < before - 1.0
    assert st["val_loss"] == org.heldout_loss()  # nats per character of the held-out lines
    assert 0.0 < st["model_alpha"] <= 1.0
    assert st["warmed_up"] and st["base_trainable"]  # bursts train the base too (freeze_base_after_warmup off)


def test_warmup_schedule_telemetry_and_jsonl(tmp_path):
    path = tmp_path / "telemetry.jsonl"
    org = Organism(small_config(), LINES, seed=3, telemetry_path=path)
    seen = []
    summary = org.warmup(60, progress=seen.append)
    assert summary["steps"] == 60 and len(seen) == 60
    steps = [r for r in org.telemetry if r["phase"] == "warmup"]
    assert len(steps) == 60
    c = org.config
    for i, r in enumerate(steps):
        assert r["lr"] == pytest.approx(lr_schedule(i, 60, c.learning_rate, c.lr_warmup_steps, c.lr_min_ratio))
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        assert set(r["grad_norm"]) == {"embeddings", "content_heads", "rrpram_heads", "hybrid_heads",
                                       "hybrid_alphas", "attn_out", "mlp", "active_delta"}
        assert r["grad_norm"]["embeddings"] > 0 and r["grad_norm"]["active_delta"] is None
    assert steps[0]["lr"] < steps[9]["lr"] and steps[10]["lr"] > steps[-1]["lr"]  # warmup, then decay
    assert steps[-1]["lr"] == pytest.approx(c.learning_rate * c.lr_min_ratio)
    evals = [r for r in org.telemetry if r["phase"] == "warmup_eval"]
    assert [r["step"] for r in evals] == [40, 60]
    assert all(isinstance(r["collapsed_layers"], list) and math.isfinite(r["val_loss"]) for r in evals)
    lines = path.read_text().splitlines()
    assert len(lines) == len(org.telemetry) and json.loads(lines[0])["phase"] == "warmup"
    org.close()


def test_early_stop_on_plateau():
    org = Organism(small_config(patience=2, min_delta=100.0, eval_interval=10), LINES, seed=4)
    summary = org.warmup(100)
    # the first evaluation sets the best; two more without a 100-nat improvement stop it
    assert summary["stopped_early"] and summary["steps"] == 30


def test_collapse_probe_reports_dead_layers():
    org = Organism(small_config(), LINES, seed=5)
    assert org._collapse_probe() == []
    org.config.collapse_std_bound = 1e9  # every layer is "collapsed" under this bound
    assert org._collapse_probe() == list(range(1, org.config.n_layer + 1))
    from molecule_gpt.trainer import ActivationCollapseWarning
    with pytest.warns(ActivationCollapseWarning, match="layer"):
        org.warmup(org.config.eval_interval)
    assert [r["layers"] for r in org.telemetry if r["phase"] == "warning"] == [[1]]


# ---------------------------------------------------------------------------------------------
# bursts, rollback, lifecycle


def test_poisoned_burst_rolled_back_bit_identical_clean_burst_accepted(warmed, tmp_path):
    org = clone(warmed, tmp_path)
    clean = org.train_burst()
    assert clean.accepted and clean.reason == "accepted" and clean.steps == org.config.micro_steps
    snap = all_state(org)
    cached = org._generator.weights.get()
    poisoned = org.train_burst(lr=1e3)
    assert not poisoned.accepted and poisoned.reason in ("val_loss_rose", "non_finite", "identity_drift")
    assert_bit_identical(all_state(org), snap)
    # the Adam step counts are back to their old values, but the rollback invalidated the
    # decoder's weight cache anyway (a later burst could reach the same counts)
    assert org._generator.weights.get() is not cached
    # the generation weights were refreshed: decoding matches the restored model
    ids = org.tokenizer.encode("The cat")[:-1]
    from molecule_gpt import _decode
    w = org._generator.weights.get()
    dec = _decode.Decoder(w, w.vocab_size, w.block_size)
    assert np.abs(dec.prefill(ids) - org.model.logits(ids)[-1]).max() < 1e-4
    again = org.train_burst()
    assert again.accepted
    st = org.stats()
    assert (st["bursts"], st["accepted_bursts"], st["rolled_back_bursts"]) == (3, 2, 1)


def test_non_finite_burst_is_rolled_back(warmed, tmp_path):
    org = clone(warmed, tmp_path)
    assert org.train_burst().accepted
    snap = all_state(org)
    report = org.train_burst(lr=1e30)  # parameters overflow to inf, then the loss is NaN
    assert not report.accepted and report.reason == "non_finite" and report.steps < org.config.micro_steps
    assert_bit_identical(all_state(org), snap)
    assert org.train_burst().accepted


def test_shuffled_text_burst_is_rejected(warmed, tmp_path):
    org = clone(warmed, tmp_path)
    rng = random.Random(0)
    noise = []
    for line in LINES[:120]:
        chars = list(line)
        rng.shuffle(chars)
        noise.append("".join(chars))
    assert org.train_burst().accepted  # module 0 exists and has trained once
    org.config.replay_ratio = 0.0
    org.config.micro_steps = 24
    org.observe("\n".join(noise))
    snap = all_state(org)
    report = org.train_burst(lr=0.05)
    assert not report.accepted, report
    assert_bit_identical(all_state(org), snap)


def test_rollback_streak_backs_off_learning_rate(warmed, tmp_path):
    org = clone(warmed, tmp_path)
    org.config.burst_learning_rate = 1e3
    org.config.max_consecutive_rollbacks = 2
    org.config.rollback_lr_backoff = 0.5
    lrs = []
    for _ in range(4):
        r = org.train_burst()
        assert not r.accepted
        lrs.append(r.lr)
    assert lrs == [1e3, 1e3, 500.0, 500.0]
    org.config.burst_learning_rate = 0.01
    r = org.train_burst()
    assert r.accepted and r.lr == pytest.approx(0.01 * 0.25) and org.stats()["lr_scale"] == 0.5


def test_fossils_stay_bit_identical_and_new_modules_start_as_noops(warmed, tmp_path):
    org = clone(warmed, tmp_path)
    org.config.delta_grow_prob = 1.0
    org.config.max_delta_modules = 4
    r = org.train_burst()
    assert r.module == 0 and r.retired_module == 0 and r.grew_module == 1
    fossil = {k: v.copy() for k, v in org.model.groups["delta0"].params.items()}
    fossil_alpha = org.model.delta_alphas[0]
    # a freshly grown module is an exact no-op: its A factors are zero
    assert all(not v.any() for k, v in org.model.groups["delta1"].params.items() if k.endswith(".A"))
    for _ in range(4):
        org.train_burst()
    st = org.stats()
    states = [m["state"] for m in st["delta_modules"]]
    assert len(states) == 4 and states[-1] == "active" and all(s in ("fossil", "dropped") for s in states[:-1])
    assert sum(m["trainable"] for m in st["delta_modules"]) == 1
    for k, v in fossil.items():
        assert np.array_equal(org.model.groups["delta0"].params[k], v), k
    assert org.model.delta_alphas[0] in (fossil_alpha, 0.0)
    # at the cap the last module keeps training
    before = org.model.groups["delta3"].step
    org.train_burst()
    assert org.model.n_delta == 4 and org.model.groups["delta3"].step > before


def test_counterfactual_drops_a_harmful_module(warmed, tmp_path):
    org = clone(warmed, tmp_path)
    org.train_burst()  # creates module 0 and trains it a little
    params = org.model.groups["delta0"].params
    rng = np.random.default_rng(0)
    for k in params:
        if k.startswith("lm_head"):
            params[k][...] = rng.normal(0, 1.0, params[k].shape)  # garbage on the output layer
    org._generator.weights.invalidate()
    org.config.delta_grow_prob = 1.0
    org.config.immune_max_rise = 1e9  # let the (zero-lr) burst pass so growth runs
    r = org.train_burst(lr=0.0)
    assert r.retired_module == 0 and r.retired_as == "dropped"
    mod0 = org.stats()["delta_modules"][0]
    assert mod0["state"] == "dropped" and mod0["alpha"] == 0.0
    cf = mod0["counterfactual"]
    assert cf["without"] < cf["with"]


def test_alpha_ramps_in_over_bursts(warmed, tmp_path):
    org = clone(warmed, tmp_path)
    org.config.delta_ramp_bursts = 4
    alphas = []
    for _ in range(5):
        r = org.train_burst()
        assert r.accepted
        alphas.append(org.model.delta_alphas[0])
    assert alphas == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_config_changes_take_effect_between_bursts(warmed, tmp_path):
    org = clone(warmed, tmp_path)
    org.config.freeze_base_after_warmup = True
    org.config.micro_steps = 3
    assert org.train_burst().steps == 3
    org.config.batch_size = 2
    org.train_burst()
    burst_steps = [r for r in org.telemetry if r["phase"] == "burst"]
    assert burst_steps[-1]["grad_norm"]["active_delta"] > 0
    assert burst_steps[-1]["grad_norm"]["embeddings"] is None  # base frozen


def test_vocabulary_and_module_growth_mid_run():
    # the growth check is switched off here: this test is about the mechanics of growing mid-run
    cfg = small_config(enable_bpe_after_chars=10 ** 9, bpe_num_merges=40, delta_grow_prob=1.0, max_delta_modules=3,
                       bpe_growth_max_rise=1e9)
    org = Organism(cfg, LINES, seed=6)
    org.warmup(40)
    org.train_burst()
    v0 = org.model.vocab_size
    org.config.enable_bpe_after_chars = 1000  # the reservoir now qualifies: BPE turns on at the next burst
    org.observe("The quiet river follows the moon. A small bird calls her brother!", speaker="H")
    r = org.train_burst()
    assert org.tokenizer.bpe_enabled and org.model.vocab_size > v0
    assert org.field.vocab_size == org.model.vocab_size
    assert math.isfinite(r.train_loss_last) and r.steps == org.config.micro_steps
    for _ in range(2):
        r = org.train_burst()
        assert math.isfinite(r.train_loss_last)
    assert org.model.n_delta == 3
    for name, g in org.model.groups.items():  # optimizer state aligned with every group
        assert g.m.shape == g.flat.shape == g.v.shape and np.isfinite(g.flat).all(), name
    assert any(r["phase"] == "tokenizer" for r in org.telemetry)
    text = org.generate("The cat", seed=0)
    assert isinstance(text, str)


def test_quantum_buffer_and_reservoir():
    cfg = small_config(max_corpus_lines=60, qb_min_bytes=10 ** 6, qb_min_novelty=0.9, qb_cooldown_seconds=0.0,
                       heard_val_fraction=0.0)
    org = Organism(cfg, LINES[:50], seed=7)
    assert not org.buffer.ready(cfg)
    n = org.observe("the cat sees the moon. THE CAT SEES THE MOON.")
    assert n == 1  # case-insensitive dedup
    assert org.buffer.novelty < 0.9 and not org.buffer.ready(cfg)
    cfg.qb_min_novelty = 0.1
    assert org.buffer.ready(cfg)
    cfg.qb_cooldown_seconds = 3600
    assert not org.buffer.ready(cfg)
    for i in range(30):
        org.observe(f"Line number {i} is new.", speaker="A")
    lines = org.reservoir.lines
    assert len(lines) == 60 and lines[-1] == "A: Line number 29 is new."
    assert lines[-30:] == [f"A: Line number {i} is new." for i in range(30)]  # the newest half is kept


def test_memory_log(tmp_path):
    org = Organism(small_config(), LINES[:60], seed=8, memory=tmp_path / "memory.sqlite")
    org.warmup(10)
    org.observe("Hello there.", speaker="H")
    reply = org.generate("Hello", max_gen_tokens=5, seed=0)
    org.observe(reply or "Hi.", speaker="A")
    org.observe("Plain text, no speaker.")
    org.train_burst()
    mem = org.memory
    assert [(m.role, m.text) for m in mem.messages()] == [("H", "Hello there."), ("A", reply or "Hi.")]
    assert [e.kind for e in mem.corpus_events()] == ["birth", "observe", "observe", "observe"]
    notes = [g.note for g in mem.snapshots()]
    assert notes[0] == "birth" and notes[1] == "warmup" and notes[2].startswith("burst")
    assert mem.snapshots()[-1].n_delta == org.model.n_delta
    org.close()
    assert mem.closed
    shared = mg.Memory()
    other = Organism(small_config(), LINES[:20], memory=shared)
    other.close()
    assert not shared.closed  # a Memory handed in belongs to the caller
    with pytest.raises(ValueError, match="speaker"):
        other.observe("x", speaker="B")


def test_forget_removes_chat_lines_and_messages(tmp_path):
    # nothing held out, so every chat line is in the reservoir
    org = Organism(small_config(heard_val_fraction=0.0), LINES[:60], seed=10, memory=tmp_path / "m.sqlite")
    org.observe("My cat is called Pixel. The weather is fine.", speaker="H")
    org.observe("Pixel is a fine name.", speaker="A")
    before = len(org.reservoir)
    context = org.tokenizer.encode("Pi")[:-1]  # "Pi" occurs only in the chat lines
    x_id = org.tokenizer.encode("x")[1]
    q, level = org.field.distribution(context)
    assert level == 3 and q[x_id] == 1.0
    counts = org.forget("pixel")
    assert (counts.messages, counts.reservoir_lines) == (2, 2)
    assert len(org.reservoir) == before - 2 and not any("pixel" in x.lower() for x in org.reservoir.lines)
    assert "H: The weather is fine." in org.reservoir.lines
    q, level = org.field.distribution(context)
    assert level < 3  # the field was recounted without the forgotten lines
    assert org.forget(None).reservoir_lines == 1  # the remaining chat line; the corpus stays
    assert len(org.reservoir) == before - 3
    org.close()


def test_interrupted_burst_leaves_the_model_as_before(warmed, tmp_path):
    org = clone(warmed, tmp_path)
    assert org.train_burst().accepted
    snap = all_state(org)
    calls = {"n": 0}
    real = org.model.train_step

    def interrupt_after_three(batch, lr):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(batch, lr)

    org.model.train_step = interrupt_after_three
    with pytest.raises(KeyboardInterrupt):
        org.train_burst()
    del org.model.train_step
    assert_bit_identical(all_state(org), snap)
    assert org.train_burst().accepted


def test_gamma_stats_and_immune_check(warmed):
    g = warmed.gamma_stats()
    assert 0.0 <= g["sparsity"] <= 1.0 and g["magnitude"] > 0 and len(g["top_tokens"]) == 10
    assert all(isinstance(t, str) for t, _ in g["top_tokens"])
    verdict = warmed.immune_check()
    assert verdict["passed"] and verdict["cosine"] == pytest.approx(1.0)
    flipped = warmed.projection()
    flipped.direction = -flipped.direction
    assert not warmed.immune_check(flipped)["passed"]


def test_stats_fields(warmed):
    st = warmed.stats()
    for key in ("steps", "loss", "val_loss", "vocab_size", "parameters", "delta_modules", "arena_high_water",
                "tokens_per_second", "model_alpha"):
        assert key in st
    assert st["parameters"] == warmed.model.num_params() and st["arena_high_water"] > 0


def test_logits_keeps_last_window(warmed):
    T = warmed.config.block_size
    ids = (warmed.tokenizer.encode(" ".join(LINES[:10])))
    assert len(ids) > T
    out = warmed.logits(ids)
    assert out.shape == (T, warmed.model.vocab_size)
    assert np.array_equal(out, warmed.model.logits(ids[-T:]))
    with pytest.raises(ValueError):
        warmed.logits([])


# ---------------------------------------------------------------------------------------------
# persistence


def test_save_load_continues_exactly(warmed, tmp_path):
    a = clone(warmed, tmp_path, "a.ckpt")
    a.train_burst()
    a.observe("A small bird watches the moon.")
    path = tmp_path / "org.ckpt"
    a.save(path)
    b = Organism.load(path)
    assert_bit_identical(all_state(a), all_state(b))
    assert b.stats()["steps"] == a.stats()["steps"] and b.reservoir.lines == a.reservoir.lines
    assert b.generate("The cat", seed=5) == a.generate("The cat", seed=5)
    ra, rb = a.train_burst(), b.train_burst()
    assert ra.to_dict() | {"seconds": 0} == rb.to_dict() | {"seconds": 0}
    assert_bit_identical(all_state(a), all_state(b))
    with pytest.raises(OrganismError, match="no organism state"):
        mg_path = tmp_path / "model_only.ckpt"
        from molecule_gpt.checkpoint import save_checkpoint
        save_checkpoint(mg_path, a.model, a.tokenizer)
        Organism.load(mg_path)


def test_untied_embeddings_identity_and_round_trip(tmp_path):
    org = Organism(small_config(tie_embeddings=False), LINES, seed=11)
    assert org.gamma_stats()["magnitude"] == 0.0  # identity is measured from birth
    org.warmup(30)
    org.train_burst()
    g = org.gamma_stats()
    assert g["magnitude"] > 0
    org.save(tmp_path / "untied.ckpt")
    back = Organism.load(tmp_path / "untied.ckpt")
    assert back.gamma_stats() == g
    assert back.generate("The cat", seed=1) == org.generate("The cat", seed=1)


# ---------------------------------------------------------------------------------------------
# background training and concurrency


def _concurrency_run(seconds: float, n_threads: int = 4, save_to=None):
    # BPE switches on (and retrains) while the threads run: vocabulary growth under load
    cfg = small_config(warmup_steps=60, train_tick_seconds=0.01, micro_steps=6, qb_min_bytes=1, delta_grow_prob=0.3,
                       max_delta_modules=4, enable_bpe_after_chars=11000, bpe_retrain_every_chars=2000,
                       bpe_num_merges=30, bpe_growth_max_rise=1e9,  # growth unchecked: it must happen here
                       freeze_base_after_warmup=True)  # so a save's base Adam steps equal the warmup's
    org = Organism(cfg, LINES, seed=9)
    errors, outputs = [], []
    stop = threading.Event()

    def talk(i):
        rng = random.Random(i)
        try:
            while not stop.is_set():
                prompt = rng.choice(LINES)[:rng.randint(0, 30)]
                pieces = list(org.stream(prompt, seed=rng.randint(0, 10 ** 6), max_gen_tokens=30))
                text = org.generate(prompt, seed=rng.randint(0, 10 ** 6), max_gen_tokens=30)
                assert isinstance(text, str) and all(isinstance(p, str) for p in pieces)
                text.encode("utf-8")
                outputs.append(text)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def listen():
        rng = random.Random(99)
        try:
            while not stop.is_set():
                org.observe(rng.choice(LINES) + " " + rng.choice(LINES), speaker=rng.choice("HA"))
                time.sleep(0.02)
        except BaseException as exc:
            errors.append(exc)

    with org.background():
        threads = [threading.Thread(target=talk, args=(i,)) for i in range(n_threads)] + [threading.Thread(target=listen)]
        for t in threads:
            t.start()
        if save_to is not None:
            time.sleep(seconds / 2)
            org.save(save_to)  # while everything runs
            time.sleep(seconds / 2)
        else:
            time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    st = org.stats()
    print(f"{seconds}s: {len(outputs)} generations, {st['steps']} steps, {st['bursts']} bursts, "
          f"{len(st['delta_modules'])} modules")
    assert outputs and st["warmed_up"] and st["bursts"] > 0 and st["bpe"]
    assert not st["background"]["running"] and st["background"]["error"] is None
    return org


def test_generation_does_not_wait_for_a_training_step_after_a_rebuild(warmed, tmp_path):
    """While a training step holds the model lock, a generation is served from the weights
    folded before it, also right after the organism rebuilt its data (a rollback's quarantine,
    a tokenizer growth: a new field and generator): the folded weights carry over. Only a
    vocabulary the weights have not caught up with waits for the lock."""
    org = clone(warmed, tmp_path)
    org.generate("the river", max_gen_tokens=4, seed=1)
    org._rebuild_data()
    done = threading.Event()
    with org.model.lock:  # what a training step holds
        t = threading.Thread(target=lambda: (org.generate("the river", max_gen_tokens=4, seed=1), done.set()))
        t.start()
        assert done.wait(30), "a generation waited for the model lock"
    t.join()
    org.model.grow_vocab(org.model.vocab_size + 2)  # weights now behind the model's vocabulary
    cache = org._generator.weights
    got = []
    with org.model.lock:
        t = threading.Thread(target=lambda: got.append(cache.get()))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not got  # stale by structure: it waits
    t.join(30)
    assert got and got[0].vocab_size == org.model.vocab_size


def test_background_training_with_concurrent_generation(tmp_path):
    _concurrency_run(3.0, save_to=tmp_path / "live.ckpt")
    loaded = Organism.load(tmp_path / "live.ckpt")
    # one consistent moment: the base trains only in warmup, so its Adam steps equal the
    # trainer's warmup count, and every module the trainer knows exists in the model
    assert loaded.model.groups["base"].step == loaded.trainer.warmup_steps_done
    assert len(loaded.trainer.modules) == loaded.model.n_delta
    assert isinstance(loaded.generate("The cat", seed=0), str)


@pytest.mark.slow
def test_background_training_with_concurrent_generation_soak():
    _concurrency_run(20.0)


def test_generation_does_not_wait_for_a_burst(warmed, tmp_path):
    """The trainer holds the model lock per step, not per burst: a generation started during a
    long burst finishes (on consistent weights) while the burst is still running."""
    org = clone(warmed, tmp_path)
    org.config.micro_steps = 400
    org.config.immune_max_rise = 1e9
    burst = threading.Thread(target=org.train_burst)
    burst.start()
    deadline = time.time() + 30
    while org.model.groups.get("delta0") is None or org.model.groups["delta0"].step < 5:
        assert time.time() < deadline
        time.sleep(0.001)
    text = org.generate("The cat", seed=0, max_gen_tokens=20)
    still_running = burst.is_alive()
    burst.join()
    assert isinstance(text, str) and still_running
    assert org._generator.weights.folds >= 1


def test_background_errors_surface_on_stop(warmed, tmp_path):
    org = clone(warmed, tmp_path)
    org.config.qb_cooldown_seconds = 0.0
    org.config.train_tick_seconds = 0.01

    def broken(*a, **k):
        raise RuntimeError("boom")

    org.trainer.burst = broken
    org.observe("Something new to learn from.")
    org.start_background()
    with pytest.raises(OrganismError):
        org.start_background()
    deadline = time.time() + 10
    while org.stats()["background"]["error"] is None and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(TrainingError, match="boom"):
        org.stop()


def test_interrupted_warmup_resumes_its_schedule_exactly():
    """A warmup cut short by should_stop stays unfinished; warmup() continues it, and the result
    equals one uninterrupted warmup bit for bit (same batches, same learning rates)."""
    cfg = small_config(warmup_steps=30, eval_interval=10)
    whole = Organism(cfg, LINES, seed=4)
    lrs_whole = []
    whole.warmup(progress=lambda r: lrs_whole.append((r["step"], r["lr"])))

    cut = Organism(small_config(warmup_steps=30, eval_interval=10), LINES, seed=4)
    lrs_cut = []
    first = cut.warmup(progress=lambda r: lrs_cut.append((r["step"], r["lr"])),
                       should_stop=lambda: len(lrs_cut) >= 11)
    assert first["steps"] == 11 and not first["finished"] and not cut.trainer.warmed_up
    assert cut.model.trainable["base"]
    second = cut.warmup(progress=lambda r: lrs_cut.append((r["step"], r["lr"])))
    assert second["steps"] == 19 and second["finished"] and cut.trainer.warmed_up
    assert lrs_cut == lrs_whole
    for name, value in whole.model.params().items():
        np.testing.assert_array_equal(cut.model.params()[name], value, err_msg=name)


def test_observe_a_list_of_lines_and_long_corpus_lines_are_split_not_cut():
    long_line = " ".join(f"word{i}" for i in range(200))  # about 1,300 chars
    org = Organism(small_config(max_line_chars=100), LINES[:40] + [long_line], seed=0)
    kept = org.reservoir.lines + org.val_lines
    pieces = [x for x in kept if x.startswith("word")]  # some pieces may be held out: compare as sets
    assert sorted(" ".join(pieces).split()) == sorted(long_line.split())
    assert all(len(x) <= 100 for x in kept)
    added = org.observe(["a fresh line about rivers", "another about stones", "a fresh LINE about rivers"])
    assert added == 2 and "another about stones" in org.reservoir.lines
    with pytest.raises(ValueError, match="speaker"):
        org.observe(["x"], speaker="H")
    with pytest.raises(TypeError, match="list of str"):
        org.observe(["ok", 3])


# ---------------------------------------------------------------------------------------------
# adopting an organism of the original program

ORIGINAL = pathlib.Path(__file__).resolve().parent / "fixtures" / "anchor-small"  # see fixtures/README.md


def test_adopted_original_has_its_weights_speaks_learns_and_round_trips(tmp_path):
    ckpt, corpus = ORIGINAL / "checkpoint.json", ORIGINAL / "corpus.txt"
    expected = json.loads((ORIGINAL / "expected.json").read_text())
    org = Organism.from_original(ckpt, corpus=corpus, seed=3, memory=tmp_path / "memory.sqlite")
    model, tok = load_original_checkpoint(ckpt)  # compat's import: the original's numbers
    V = model.vocab_size
    # its weights exactly: the original's rows, modules and alphas; rows for the byte tokens after them
    assert org.model.dtype == np.float64 and org.model.delta_alphas == model.delta_alphas
    assert org.tokenizer.byte_fallback and org.tokenizer.vocab_size == org.model.vocab_size > V
    for name, value in model.params().items():
        np.testing.assert_array_equal(org.model.params()[name][:len(value)], value, err_msg=name)
    for text, ids in zip(expected["probe_texts"], expected["ids"]):
        assert org.tokenizer.encode(text) == ids  # the original's ids for the text it knew
        n = min(org.config.block_size, len(ids) - 1)
        np.testing.assert_allclose(org.model.logits(ids[:n])[:, :V], model.logits(ids[:n]), rtol=1e-12, atol=1e-13)
    text = "Zebra! naïve ünïcode"  # characters the original never had: spelled in bytes, not dropped
    assert org.tokenizer.decode(org.tokenizer.encode(text)) == text
    # ready to chat: warmed up, the model has its share of the blend, its corpus is the file's
    assert org.trainer.warmed_up and org.model_alpha() > 0.0
    assert sorted(org.reservoir.lines) == sorted(corpus.read_text().splitlines())  # 8 lines: none held out
    assert isinstance(org.generate("The river", seed=1), str)
    assert "".join(org.stream("The lamp", seed=2)) == org.generate("The lamp", seed=2)
    # and to learn: what it hears (new characters too) trains in a checked burst
    assert org.observe("Zebras drink from the river at dawn!", speaker="H") == 1
    report = org.train_burst()
    assert report.steps == org.config.micro_steps and org.trainer.bursts == 1
    assert org.model.n_delta == model.n_delta + 1  # the original's modules are fossils; a new one learns
    assert [e.kind for e in org.memory.corpus_events()][:1] == ["adopt"]
    assert org.memory.snapshots()[0].note == "adopted from the original"
    # save/load round-trips: same weights, state and speech
    org.save(tmp_path / "adopted.ckpt")
    back = Organism.load(tmp_path / "adopted.ckpt")
    assert back.trainer.warmed_up and back.birth_vocab == org.birth_vocab == V
    assert back.tokenizer.to_dict() == org.tokenizer.to_dict()
    for name, value in org.model.params().items():
        np.testing.assert_array_equal(back.model.params()[name], value, err_msg=name)
    assert back.generate("The river", seed=4) == org.generate("The river", seed=4)
    a, b = back.train_burst().to_dict(), org.train_burst().to_dict()  # and learns on exactly as it would have
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    org.close()


def test_adopted_original_splits_its_corpus_as_a_newborn_and_takes_config_changes(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(LINES[:40]) + "\n", encoding="utf-8")
    org = Organism.from_original(ORIGINAL / "checkpoint.json", corpus=path, seed=5,
                                 config={"micro_steps": 3, "val_fraction": 0.25})
    newborn = Organism(small_config(val_fraction=0.25), path, seed=5)
    assert len(org.val_lines) == 10 and org.val_lines == newborn.val_lines
    assert org.reservoir.lines == newborn.reservoir.lines
    assert org.config.micro_steps == 3 and org.config.n_embd == 16  # the original's architecture, our change
    assert org.stats()["val_loss"] is not None  # measured at adoption: the first burst's check has its reference
    assert org.train_burst().steps == 3
    # no corpus: it starts empty and learns what it hears
    bare = Organism.from_original(ORIGINAL / "checkpoint.json", dtype="float32")
    assert bare.model.dtype == np.float32 and not bare.reservoir.lines and isinstance(bare.generate("A lamp"), str)
    with pytest.raises(ConfigError, match="n_embd"):
        Organism.from_original(ORIGINAL / "checkpoint.json", config={"n_embd": 32, "n_head": 4,
                                                                      "head_types": ("content",) * 4})
    with pytest.raises(CheckpointError, match="cannot read"):
        Organism.from_original(tmp_path / "missing.json")


def test_generations_in_flight_are_counted_until_they_finish(warmed, tmp_path):
    """A generation counts from its start to its end (closed, exhausted or collected unstarted),
    on whatever generator it began: the background trainer's pacing reads this count."""
    import gc

    org = clone(warmed, tmp_path)
    in_flight = org._generator.in_flight
    assert len(in_flight) == 0
    pieces = org.stream("The cat", seed=0, max_gen_tokens=30)
    next(pieces)
    assert len(in_flight) == 1
    org._rebuild_data(retokenize=False)  # a rebuilt generator shares the count
    assert org._generator.in_flight is in_flight and len(in_flight) == 1
    pieces.close()
    assert len(in_flight) == 0
    org.generate("The cat", seed=0, max_gen_tokens=5)
    org.generate("The cat", n=3, seed=0, max_gen_tokens=5)
    assert len(in_flight) == 0
    begun = org._begin("The cat", {"seed": 0})  # started, never run, dropped
    assert len(in_flight) == 1
    del begun
    gc.collect()
    assert len(in_flight) == 0


def test_the_background_trainer_gives_way_to_generations_in_flight(warmed, tmp_path, monkeypatch):
    """While a generation is in flight the background trainer pauses after each piece of its
    compute, for Config.train_share_while_generating of the wall time; a foreground burst never
    pauses, and the background trainer does not pause when nothing is in flight."""
    from molecule_gpt.generation import InFlight

    org = clone(warmed, tmp_path)
    org.config.train_share_while_generating = 0.2
    org.config.train_tick_seconds = 0.01
    pauses = []
    real_wait = InFlight.wait_until_idle

    def recorded(self, timeout):
        pauses.append((threading.current_thread().name, timeout))
        return real_wait(self, timeout)

    monkeypatch.setattr(InFlight, "wait_until_idle", recorded)
    pieces = org.stream("The cat", seed=0, max_gen_tokens=30)
    next(pieces)
    org.train_burst()  # foreground, with a generation in flight
    assert pauses == []
    org.observe("A quiet river follows the moon.")
    org.start_background()
    try:
        deadline = time.time() + 30
        while not pauses and time.time() < deadline:
            time.sleep(0.01)
        assert pauses and all(name == "molecule-gpt-trainer" and 0 < t <= 0.05 for name, t in pauses)
        pieces.close()  # nothing in flight: the next burst runs without pausing
        bursts = org.trainer.bursts
        org.observe("The teacher calls her brother.")
        while org.trainer.bursts < bursts + 2 and time.time() < deadline:
            time.sleep(0.01)
        paused = len(pauses)
        org.observe("A small bird finds the market.")
        while org.trainer.bursts < bursts + 3 and time.time() < deadline:
            time.sleep(0.01)
        assert org.trainer.bursts >= bursts + 3 and len(pauses) == paused
    finally:
        org.stop()


def blend_nats(org: Organism, alpha: float) -> float:
    """Nats of every target of the organism's held-out lines (old and heard) under the blend
    generation samples at temperature 1, computed apart: the model's softmax from Model.logits,
    the field's from Field.distribution (trigram, else bigram; no blend without either)."""
    total = 0.0
    for held in (org._old_heldout, org._heard_heldout):
        for w in held.windows(org.config.block_size):
            z = org.model.logits(w[:-1]).astype(np.float64)
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            for t in range(len(w) - 1):
                q, level = org.field.distribution(w[max(0, t - 1):t + 1], 1.0, min_level=2)
                pt = p[t, w[t + 1]]
                total -= math.log(alpha * pt + (1 - alpha) * q[w[t + 1]] if level else pt)
    return total


def test_model_alpha_is_the_blend_weight_that_predicts_held_out_text_best(warmed, tmp_path):
    """model_alpha() is the model's weight under which the blend generation samples predicts the
    held-out lines (old and heard) best: no weight on a fine grid does better. It is what a
    generation uses, kept until the weights, the field or the lines change."""
    org = clone(warmed, tmp_path)
    org.observe([f"The {w} walks to the river at dawn and sees the {v} there." for w, v in
                 zip(("dog", "cat", "fox", "owl", "boy", "girl"), ("moon", "boat", "sun", "stars", "mill", "bridge"))]
                + [x.upper() for x in LINES[:30]])
    assert len(org._heard_heldout) > 0
    alpha = org.model_alpha()
    assert 0.0 < alpha < 1.0
    grid = min(blend_nats(org, a) for a in np.linspace(0.005, 1.0, 200))  # at 0 a target may get no chance
    assert blend_nats(org, alpha) <= grid * (1 + 1e-12)
    assert org._overrides({})["model_alpha"] == alpha
    measured = org._blend
    assert org.model_alpha() == alpha and org._blend is measured  # nothing changed: not measured again
    org.observe("The old man watches a quiet river.")
    org.model_alpha()
    assert org._blend is not measured
    # it is not measured between a tokenizer growth and the model's (lines encoded with ids the
    # model has no rows for yet): it waits for the change to end
    got = []
    with org._structure.write():
        asker = threading.Thread(target=lambda: got.append(org.model_alpha()))
        asker.start()
        asker.join(0.5)
        assert asker.is_alive() and not got
    asker.join(30)
    assert got and 0.0 < got[0] < 1.0


def test_a_generation_does_not_wait_for_another_threads_measurement_or_fold(warmed, tmp_path):
    """While one thread measures the blend weight (model_alpha) or refolds
    the weights, a generation starting in another thread takes the previous result instead of
    queueing behind it; alone, a generation always sees fresh ones."""
    org = clone(warmed, tmp_path)
    org.generate("The cat", seed=0, max_gen_tokens=5)  # weights folded, the field measured
    alpha = org.model_alpha()
    org.observe("The old man watches a quiet river.")  # the field changed: measured again
    org.model.train_step([org._reservoir_ids()[0]], 1e-3)  # the weights changed: folded again
    measured = org._blend
    done = threading.Event()
    with org._blend_lock, org._generator.weights._lock:  # another thread is at both
        talk = threading.Thread(target=lambda: (org.generate("The cat", seed=0, max_gen_tokens=5), done.set()))
        talk.start()
        assert done.wait(30), "a generation waited for another thread's measurement or fold"
    talk.join()
    assert org._blend is measured  # that generation did not measure
    folds = org._generator.weights.folds
    org.generate("The cat", seed=0, max_gen_tokens=5)
    assert org._generator.weights.folds == folds + 1 and org._blend is not measured
    assert math.isfinite(alpha)


def test_observe_turns_equals_observing_each_turn(tmp_path):
    """observe_turns stores and learns chat turns as observe(text, speaker) for each in order
    would (reservoir, held-out lines, quantum buffer, field counts, memory); a turn the memory
    refuses stores and learns none of them."""
    rng = random.Random(5)
    turns = [("H" if i % 2 == 0 else "A", rng.choice(LINES) + (" Again." if i % 3 else "")) for i in range(40)]
    cfg = small_config(heard_val_fraction=0.3)
    one = Organism(cfg, LINES, seed=2, memory=tmp_path / "one.sqlite")
    many = Organism(cfg, LINES, seed=2, memory=tmp_path / "many.sqlite")
    for speaker, text in turns:
        one.observe(text, speaker=speaker)
    assert many.observe_turns(turns[:15]) + many.observe_turns(turns[15:]) > 0
    assert one.reservoir.lines == many.reservoir.lines and one.heard_val_lines == many.heard_val_lines
    assert (one.buffer.lines, one.buffer.held) == (many.buffer.lines, many.buffer.held)
    for name in ("unigrams", "bigram_keys", "bigram_counts", "trigram_keys", "trigram_counts"):
        assert np.array_equal(getattr(one.field, name), getattr(many.field, name))
    assert [(m.role, m.text) for m in one.memory.messages()] == [(m.role, m.text) for m in many.memory.messages()]
    before = (list(many.reservoir.lines), len(many.memory.messages()))
    with pytest.raises(ValueError):
        many.observe_turns([("H", "A brand new line about the moon."), ("Q", "who speaks?")])
    with pytest.raises(TypeError):
        many.observe_turns([("H", "A brand new line about the moon."), ("A", None)])
    assert (list(many.reservoir.lines), len(many.memory.messages())) == before
    one.close()
    many.close()
