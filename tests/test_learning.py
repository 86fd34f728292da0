"""Continual learning: the held-out measure, the checked tokenizer growth, quarantine of
rolled-back text, the ramp inside the check, config reaching the tokenizer and reservoir, and a
short run of benchmarks/bench_learning.py."""
from __future__ import annotations

import importlib
import json
import math
import pathlib
import sys

import numpy as np
import pytest

import molecule_gpt as mg
from molecule_gpt.heldout import HeldOut, line_chars, windows

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINES = [f"The {a} {v} the {b} near the {c}." for a in ("cat", "dog", "bird", "river", "teacher")
         for v in ("sees", "follows", "likes", "calls") for b in ("moon", "garden", "market")
         for c in ("old tree", "quiet road", "red house")]


def small_config(**kw) -> mg.Config:
    base = dict(n_layer=1, n_embd=32, n_head=4, block_size=48, head_types=("content", "content", "hybrid", "rrpram"),
                delta_rank=4, warmup_steps=80, eval_interval=40, micro_steps=6, batch_size=4, train_threads=1,
                delta_grow_prob=0.0, qb_cooldown_seconds=0.0, lr_warmup_steps=10, val_max_sequences=24)
    base.update(kw)
    return mg.Config(**base)


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    org = mg.Organism(small_config(), LINES, seed=3)
    org.warmup()
    path = tmp_path_factory.mktemp("learning") / "warm.ckpt"
    org.save(path)
    return path


def loaded(warmed, **fields) -> mg.Organism:
    """The warmed organism, loaded, with BPE due at once (enable_bpe_after_chars 100) and these
    Config fields set."""
    org = mg.Organism.load(warmed)
    for name, value in dict(enable_bpe_after_chars=100, **fields).items():
        setattr(org.config, name, value)
    return org


def test_heldout_loss_is_nats_per_character_over_every_target_once(warmed):
    org = mg.Organism.load(warmed)
    T = org.config.block_size
    long_line = " ".join(LINES[:6])  # longer than the block: scored in windows
    lines = [LINES[0], "  spaced   out  line ", long_line]
    ids = [org.tokenizer.encode(x) for x in lines]
    assert len(ids[2]) > 2 * T
    ws = [w for seq in ids for w in windows(seq, T)]
    # every target of every line exactly once
    assert sum(len(w) - 1 for w in ws) == sum(len(s) - 1 for s in ids)
    assert all(len(w) <= T + 1 for w in ws)
    total = 0.0
    for w in ws:  # one window at a time: -ln p summed from the logits
        logits = org.model.logits(w[:-1]).astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
        total -= sum(logp[t, w[t + 1]] for t in range(len(w) - 1))
    chars = sum(len(" ".join(x.split())) + 1 for x in lines)
    assert line_chars("  spaced   out  line ") == len("spaced out line") + 1
    got = org.heldout_loss(lines)
    assert got == pytest.approx(total / chars, rel=1e-5)
    held = HeldOut(lines, org.tokenizer.encode, lambda: org.tokenizer.version)
    assert held.loss(org.model) == got


def test_a_grown_heldout_set_scores_only_its_new_lines(warmed, monkeypatch):
    """The trainer keeps each window's nats under the current weights: a held-out set that gained
    lines (text heard since the last burst) evaluates only the new windows, and its loss equals
    a fresh evaluation bit for bit (an exact sum). A window's nats do not depend on the batch it
    is scored in (what the reuse rests on) on the kernels that promise it."""
    org = mg.Organism.load(warmed)
    t, m = org.trainer, org.model
    lines = [x for x in LINES if x.split()][:12]
    first = HeldOut(lines[:10], org.tokenizer.encode, lambda: org.tokenizer.version)
    grown = HeldOut(lines, org.tokenizer.encode, lambda: org.tokenizer.version)
    fresh = HeldOut(lines, org.tokenizer.encode, lambda: org.tokenizer.version).loss(m)
    scored = []
    real = type(m).token_nats
    monkeypatch.setattr(type(m), "token_nats", lambda self, ws: scored.extend(ws) or real(self, ws))
    t.evaluate(first)
    assert len(scored) == len(first.windows(m.config.block_size))
    scored.clear()
    assert t.evaluate(grown) == fresh
    new_windows = [w for line in lines[10:] for w in windows(org.tokenizer.encode(line), m.config.block_size)]
    if m.rows_independent:
        assert sorted(map(tuple, scored)) == sorted(map(tuple, new_windows))
        ws = grown.windows(m.config.block_size)
        for w, nats in zip(ws, real(m, ws)):  # each window as it would be alone
            assert np.array_equal(nats, real(m, [w])[0])
    else:  # the BLAS path: nothing is reused
        assert len(scored) == len(grown.windows(m.config.block_size))
    # other weights: nothing known, everything scored again
    m.train_step([org.tokenizer.encode(x) for x in lines[:4]], 1e-3)
    scored.clear()
    t.evaluate(grown)
    assert len(scored) == len(grown.windows(m.config.block_size))


def test_tokenizer_growth_after_training_is_checked(warmed):
    # a growth that would raise old held-out loss by more than the bound is declined
    # untrained rows: the growth raises the loss
    org = loaded(warmed, bpe_num_merges=60, bpe_growth_max_rise=0.0, bpe_growth_steps=0)
    v0, version0, before = org.model.vocab_size, org.tokenizer.version, org.heldout_loss()
    org.train_burst(lr=0.0)
    events = [r for r in org.telemetry if r["phase"] == "tokenizer"]
    assert events and events[-1]["event"] == "enable_bpe declined", events
    assert events[-1]["loss_after"] > events[-1]["loss_before"]
    # the trial was scored with the candidate's segmentation on the grown copy of the model
    trial_tok = mg.EvolvingTokenizer.from_dict(org.tokenizer.to_dict())
    trial_tok.enable_bpe_after_chars = 100
    trial_tok.bpe_num_merges = 60
    update = trial_tok.maybe_enable_bpe(org.reservoir.lines)
    trial = mg.Model.from_state(*org.model.export_state())
    org._grow_model(trial, trial_tok, update)
    assert events[-1]["loss_after"] == HeldOut(org._old_heldout.lines, trial_tok.encode,
                                               lambda: trial_tok.version).loss(trial)
    assert org.model.vocab_size == v0 and org.tokenizer.version == version0 and not org.tokenizer.bpe_enabled
    assert org.heldout_loss() == before
    # allowed: the tokenizer grows; each new merged row starts as the mean of its parts (what
    # the organism keeps without row training) and is then trained
    rows = {}
    for steps in (0, 40):
        org = loaded(warmed, bpe_num_merges=60, bpe_growth_max_rise=1e9, bpe_growth_steps=steps)
        org.train_burst(lr=0.0)
        assert org.tokenizer.bpe_enabled and org.model.vocab_size > v0
        rows[steps] = org.model.params()["wte"][v0:].copy()
        if steps == 0:
            wte = org.model.params()["wte"]
            new = [(a, b, m) for a, b, m in org.tokenizer.merges if m >= v0]
            assert new
            for a, b, m in new:
                want = wte[a] if b < 0 else 0.5 * (wte[a] + wte[b])
                np.testing.assert_allclose(wte[m], want, rtol=1e-6)
    assert (np.abs(rows[40] - rows[0]).max(axis=1) > 0).all()  # every new row was trained
    growth = [r for r in org.telemetry if r["phase"] == "tokenizer"][-1]
    assert growth["event"] == "enable_bpe" and growth["loss_after"] < growth["loss_before"] * 1.5


def test_growth_after_training_appends_merges_with_trained_rows(warmed, tmp_path):
    """Once BPE is on, a growth keeps every merge and appends Config.bpe_growth_merges learned
    on the current segmentation; the new rows are trained on a copy before the check, and the
    accepted copy's rows are the organism's. No growth beyond Config.bpe_max_vocab."""
    org = loaded(warmed, bpe_num_merges=40, bpe_growth_max_rise=1e9, bpe_retrain_every_chars=300,
                 bpe_growth_merges=6, bpe_growth_steps=30)
    org.train_burst(lr=0.0)
    merges0, v1 = org.tokenizer.merges, org.model.vocab_size
    heard = [f"the lantern number {i} glows over the harbour wall" for i in range(12)]
    org.observe(heard)
    tok0, state0 = mg.EvolvingTokenizer.from_dict(org.tokenizer.to_dict()), org.model.export_state()
    n0 = len(org.telemetry)
    org.train_burst(lr=0.0)
    growth = [r for r in list(org.telemetry)[n0:] if r["phase"] == "tokenizer"]
    assert [r["event"] for r in growth] == ["extend_bpe"]
    tok = org.tokenizer
    assert tok.merges[:len(merges0)] == merges0 and len(tok.merges) == len(merges0) + 6
    assert org.model.vocab_size == tok.vocab_size > v1
    # the trial again, from the state before it: same rows, same score
    update = tok0.extend_bpe(list(org.reservoir.lines), 6)
    trial = mg.Model.from_state(*state0)
    org._grow_model(trial, tok0, update)
    org._fit_new_rows(trial, tok0, update, list(org.reservoir.lines))
    assert growth[0]["loss_after"] == HeldOut(org._old_heldout.lines, tok0.encode, lambda: tok0.version).loss(trial)
    np.testing.assert_array_equal(org.model.params()["wte"][v1:], trial.params()["wte"][v1:])
    np.testing.assert_array_equal(org.model.params()["wte"][:v1], state0[1]["wte"])
    assert org.field.vocab_size == org.model.vocab_size
    # the grown organism saves and loads, and goes on bit for bit
    org.save(tmp_path / "grown.ckpt")
    back = mg.Organism.load(tmp_path / "grown.ckpt")
    assert back.tokenizer.merges == tok.merges and back.tokenizer.encode(heard[0]) == tok.encode(heard[0])
    r1, r2 = org.train_burst(), back.train_burst()
    assert r1.loss_after == r2.loss_after
    np.testing.assert_array_equal(org.model.params()["wte"], back.model.params()["wte"])
    # at the cap: due, but no trial
    org.config.bpe_max_vocab = org.model.vocab_size
    org.observe([f"a second lantern number {i} hums along the quay" for i in range(12)])
    n0 = len(org.telemetry)
    org.train_burst(lr=0.0)
    assert not [r for r in list(org.telemetry)[n0:] if r["phase"] == "tokenizer"]
    assert org.tokenizer.merges == tok.merges


def test_declined_growth_waits_longer_after_each_decline(warmed, tmp_path):
    """A growth trial that is declined is not repeated at every burst: the next waits for
    bpe_retrain_every_chars more characters, twice as many after each further decline, across a
    save and load; an accepted growth ends the back-off."""
    # with untrained rows, every trial declined
    org = loaded(warmed, bpe_retrain_every_chars=400, bpe_growth_max_rise=0.0, bpe_growth_steps=0)
    trials, chars = [], []
    for i in range(40):
        if i == 20:
            org.save(tmp_path / "mid.ckpt")
            org = mg.Organism.load(tmp_path / "mid.ckpt")
        org.observe([f"the {w} number {i} went by the {w} road" for w in ("first", "second", "third")])
        n0 = len(org.telemetry)
        chars.append(org.reservoir.chars)
        org.train_burst(lr=0.0)
        trials += [(i, r) for r in list(org.telemetry)[n0:] if r["phase"] == "tokenizer"]
    assert len(trials) >= 4 and all(r["event"] == "enable_bpe declined" for _, r in trials)
    # each trial at the first burst whose corpus reached the previous one's next_trial_chars,
    # which lies 400 * 2**(declines - 1) characters past the corpus it was tried on
    for k, (i, r) in enumerate(trials):
        assert r["next_trial_chars"] == chars[i] + (400 << k)
        if k + 1 < len(trials):
            j = trials[k + 1][0]
            assert chars[j] >= r["next_trial_chars"] and chars[j - 1] < r["next_trial_chars"]
    assert 20 in range(trials[1][0], trials[-1][0] + 1)  # the back-off outlived the save and load
    from molecule_gpt import status
    doc = status.status_document(org)
    assert doc["tokenizer_growth"] == {"declined_in_a_row": len(trials),
                                       "next_trial_chars": trials[-1][1]["next_trial_chars"]}
    assert f"declined {len(trials)} time(s) in a row" in status.status_text(doc)
    # the interval follows the config; an accepted growth ends the back-off
    org.config.bpe_growth_max_rise = 1e9
    org.config.bpe_retrain_every_chars = 1
    org.train_burst(lr=0.0)
    assert org.tokenizer.bpe_enabled and org._growth_retry is None
    assert org.field.vocab_size == org.model.vocab_size


def test_rolled_back_lines_are_quarantined_and_can_be_released(warmed):
    org = mg.Organism.load(warmed)
    spam = [f"buy cheap pills now number {i} buy cheap pills" for i in range(12)]
    org.config.heard_val_fraction = 0.0
    org.observe(spam)
    assert all(x in org.reservoir.lines for x in spam)
    r = org.train_burst(lr=50.0)
    assert not r.accepted and r.reason in ("val_loss_rose", "non_finite")
    assert not any(x in org.reservoir.lines for x in spam)  # replay never draws them again
    assert org.quarantine == spam and org.stats()["corpus"]["quarantine_lines"] == len(spam)
    r2 = org.train_burst()
    assert r2.accepted  # nothing of the rejected burst is left to damage the next one
    assert org.release_quarantine() == len(spam)
    assert org.quarantine == [] and org.buffer.lines == spam


def test_loss_before_is_measured_before_the_alpha_ramp(warmed):
    org = mg.Organism.load(warmed)
    org.config.delta_ramp_bursts = 4
    org.config.freeze_base_after_warmup = True
    org.observe([f"the river number {i} follows the moon" for i in range(10)])
    first = org.train_burst()
    assert first.accepted
    before = org.heldout_loss()
    second = org.train_burst()
    assert second.loss_before == before  # the ramp 0.25 -> 0.5 is inside the checked burst
    assert org.model.delta_alphas[0] == (0.5 if second.accepted else 0.25)


def test_heard_text_is_partly_held_out_and_measured(warmed):
    org = mg.Organism.load(warmed)
    org.config.heard_val_fraction = 0.5
    lines = [f"a new line of text number {i} about the sea" for i in range(40)]
    assert org.observe(lines) == 40
    held = org.heard_val_lines
    assert 5 < len(held) <= org.config.heard_val_max_lines
    assert not set(held) & set(org.reservoir.lines) and not set(held) & set(org.buffer.lines)
    r = org.train_burst(lr=0.0)  # accepted: nothing changes
    assert r.accepted and r.new_loss_before == r.new_loss_after == org.heldout_loss(held)
    assert org.stats()["corpus"]["heard_held_out_lines"] == len(held)


def test_generation_goes_on_during_a_tokenizer_growth_trial(warmed, monkeypatch):
    """The checked growth's trial (a retrained copy scored on a grown copy of the model) runs
    beside generation: a generation started while the trial is scoring finishes before it;
    only the change itself (tokenizer swap, model growth, rebuild) excludes generation."""
    import threading

    org = loaded(warmed, bpe_num_merges=60, bpe_growth_max_rise=1e9)
    scoring, release = threading.Event(), threading.Event()
    real_loss = HeldOut.loss

    def slow_loss(self, model, pace=None, known=None):
        if model is not org.model:  # the trial's grown copy
            scoring.set()
            assert release.wait(60)
        return real_loss(self, model, pace, known)

    monkeypatch.setattr(HeldOut, "loss", slow_loss)
    burst = threading.Thread(target=org.train_burst, kwargs={"lr": 0.0})
    burst.start()
    assert scoring.wait(60), "no growth trial started"
    try:
        done = threading.Event()
        talk = threading.Thread(target=lambda: (org.generate("the old tree", max_gen_tokens=5, seed=1), done.set()))
        talk.start()
        assert done.wait(30), "a generation waited for the tokenizer growth's trial"
        assert not org.tokenizer.bpe_enabled  # nothing changed yet
    finally:
        release.set()
        burst.join(60)
    assert org.tokenizer.bpe_enabled and org.field.vocab_size == org.model.vocab_size
    assert org.generate("the old tree", max_gen_tokens=5, seed=1) is not None


def test_config_reaches_tokenizer_and_reservoir_of_a_loaded_organism(warmed):
    org = mg.Organism.load(warmed)
    org.config.max_corpus_lines = 50
    org.config.bpe_retrain_every_chars = 123
    org.config.enable_bpe_after_chars = 10 ** 8
    org.train_burst()
    assert len(org.reservoir) == 50 and org.reservoir.max_lines == 50
    assert org.tokenizer.bpe_retrain_every_chars == 123 and org.tokenizer.enable_bpe_after_chars == 10 ** 8


def benchmark_with_domains(name: str, tmp_path, a_lines: int, b_lines: int):
    """(the benchmark script `name` imported, a file of stdlib documentation sentences, one of
    stdlib source lines), the files in tmp_path."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        bench = importlib.import_module(name)
        import corpora
    finally:
        sys.path.pop(0)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(corpora.doc_sentences(max_lines=a_lines)), encoding="utf-8")
    b.write_text("\n".join(corpora.code_lines(max_lines=b_lines)), encoding="utf-8")
    return bench, a, b


def test_bench_blend_short_run(tmp_path):
    """bench_blend.py measures the blend on unseen lines of the birth corpus and of a new text,
    after the warmup and after bursts of the new text, at model_alpha(), the earlier rule's
    weight and the grid's best."""
    bench_blend, a, b = benchmark_with_domains("bench_blend", tmp_path, 400, 200)
    rows = bench_blend.main(["--corpus", str(a), "--lines", "300", "--test-lines", "40", "--seeds", "1",
                             "--new", str(b), "--bursts", "2", "--chunk-lines", "12"])
    assert list(rows) == ["after warmup, corpus", "after warmup, new text", "after 2 bursts, corpus",
                          "after 2 bursts, new text"]
    for (row,) in rows.values():
        assert all(0.0 <= a <= 1.0 and math.isfinite(loss) for a, loss in row.values())
        assert row["best"][1] <= row["alone"][1]  # a = 1 is on the grid


def test_bench_learning_short_run(tmp_path):
    bench_learning, a, b = benchmark_with_domains("bench_learning", tmp_path, 700, 700)
    out = tmp_path / "r.json"
    res = bench_learning.main(["--domain-a", str(a), "--domain-b", str(b), "--seeds", "1", "--bursts", "3",
                               "--birth-lines", "400", "--test-lines", "40", "--quick", "--json", str(out),
                               "--set", "warmup_steps=60", "--set", "micro_steps=8", "--set", "val_max_sequences=24",
                               "--chunk-lines", "12", "--plots", str(tmp_path / "plots")])
    saved = json.loads(out.read_text())
    r = saved["seeds"][0]
    assert len(r["organism"]["per_burst"]) == 3 and r == json.loads(json.dumps(res["seeds"][0]))
    for name in ("organism", "organism_learn", "finetune_no_replay", "finetune_replay50"):
        assert math.isfinite(r[name]["forgetting"]) and math.isfinite(r[name]["learning"])
    assert r["organism_learn"]["bursts"] >= 1 and "organism_learn" in saved["summary"]
    for g in r["organism"]["growths"]:
        assert g["rise"] == g["a_after"] / g["a_before"] - 1
    assert saved["immune"][0]["rows"] and sum(saved["immune"][0]["matrix"].values()) == len(saved["immune"][0]["rows"])
    assert set(saved["heads"][0]) == {"default", "all_content", "all_rrpram", "all_hybrid"}
    assert saved["heads"][0]["all_rrpram"]["head_types"] == ["rrpram"] * 4
    for name in ("learning_curves.png", "forgetting_vs_learning.png", "immune_matrix.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learn_takes_every_line_in_checked_bursts(warmed):
    org = mg.Organism.load(warmed)
    text = [f"note {i}: the lantern number {i} hangs over the harbour wall." for i in range(150)]
    records = []
    summary = org.learn(text, max_passes=2, patience=1, progress=records.append)
    c = org.config
    per_burst = int(c.micro_steps * c.batch_size * (1 - c.replay_ratio))
    held = set(org.heard_val_lines)
    trained = [x for x in text if x not in held]
    assert summary["lines"] == len(text) - len([x for x in text if x in held])
    # every line was taken by a burst before the stop rule could end it: a full pass at least
    assert summary["bursts"] >= -(-len(trained) // per_burst)
    assert summary["bursts"] == len(records) and records[-1]["of"] == 2 * -(-len(trained) // per_burst)
    assert summary["accepted"] + summary["rolled_back"] == summary["bursts"]
    h0, h1 = summary["heard_val_loss"]
    assert h1 < h0  # it learned the held-out slice of the text
    kept = set(org.reservoir.lines) | set(org.quarantine) | held
    assert all(x in kept for x in text) and org.buffer.lines == []


def test_learn_replays_and_grows_from_text_it_has_trained_on(warmed, monkeypatch):
    """learn() hears the whole text at once, but a burst's replay draws only from what the
    organism knew before it (not from the lines later bursts take), and a tokenizer growth is
    due after, and learned from, text already trained on."""
    org = loaded(warmed, bpe_num_merges=40, bpe_growth_max_rise=1e9, bpe_growth_steps=4)
    org.train_burst(lr=0.0)
    assert org.tokenizer.bpe_enabled
    org.config.bpe_retrain_every_chars = 600
    text = [f"note {i}: the lantern number {i} hangs over the harbour wall." for i in range(150)]
    seen, grown_on = [], []
    real_burst = org.trainer.burst
    c = org.config
    per_burst = int(c.micro_steps * c.batch_size * (1 - c.replay_ratio))

    def burst(new, replay, *a, **kw):
        order = [x for x in text if x not in set(org.heard_val_lines)]
        later = order[(len(seen) + 1) * per_burst:]  # what the next bursts take
        replayed = {tuple(x) for x in replay}
        seen.append(len(new))
        assert replayed and not replayed & {tuple(org.tokenizer.encode(x)) for x in later}
        assert not replayed & {tuple(x) for x in new}
        return real_burst(new, replay, *a, **kw)

    monkeypatch.setattr(org.trainer, "burst", burst)
    real_extend = mg.EvolvingTokenizer.extend_bpe
    monkeypatch.setattr(mg.EvolvingTokenizer, "extend_bpe",
                        lambda self, lines, k: grown_on.append(list(lines)) or real_extend(self, lines, k))
    summary = org.learn(text, max_passes=1)
    order = [x for x in text if x not in set(org.heard_val_lines)]
    assert summary["bursts"] == len(seen) == -(-len(order) // per_burst) and sum(seen) == len(order)
    # a growth learned from the trained part only: at the first, some lines were still to come
    assert grown_on
    text_in = [x for x in grown_on[0] if x in set(order)]
    assert 0 < len(text_in) < len(order) and text_in == order[:len(text_in)]


def test_learn_stops_on_request_and_keeps_the_rest_for_later(warmed):
    org = mg.Organism.load(warmed)
    text = [f"row {i} of the table lists a small blue cup" for i in range(120)]
    calls = []
    summary = org.learn(text, should_stop=lambda: len(calls) >= 2, progress=calls.append)
    assert summary["stopped"] and summary["bursts"] == 2
    assert org.buffer.lines  # what no burst took waits for the next bursts
    assert not set(org.buffer.lines) & set(org.heard_val_lines)


def test_a_rejected_burst_leaves_no_trace(warmed):
    """After a rolled-back burst the organism trains on as if it never ran: same batches, same
    weights as an organism that never saw the rejected text."""
    clean = [f"the harbour lamp number {i} shines on the water" for i in range(16)]
    a, b = mg.Organism.load(warmed), mg.Organism.load(warmed)
    for org in (a, b):
        org.config.heard_val_fraction = 0.0
    a.observe([f"zz{i}qq !!## ~~ {i * 7919 % 1000} zz" for i in range(16)])
    assert not a.train_burst(lr=50.0).accepted
    reports = []
    for org in (a, b):
        org.observe(clean)
        reports.append(org.train_burst().to_dict() | {"seconds": 0})
    assert reports[0] == reports[1]
    for name, g in a.model.groups.items():
        np.testing.assert_array_equal(g.flat, b.model.groups[name].flat, err_msg=name)
    assert a.reservoir.lines == b.reservoir.lines


def test_held_out_lines_of_rejected_text_are_quarantined_and_forget_reaches_every_store(warmed, tmp_path):
    org = mg.Organism.load(warmed)
    org.config.heard_val_fraction = 0.5
    spam = [f"buy cheap pills now number {i} buy cheap pills" for i in range(16)]
    org.observe(spam)
    assert any(x in spam for x in org.heard_val_lines)
    assert not org.train_burst(lr=50.0).accepted
    assert not set(org.heard_val_lines) & set(spam) and sorted(org.quarantine) == sorted(spam)
    # the same after a save and load between hearing and the burst
    again = mg.Organism.load(warmed)
    again.config.heard_val_fraction = 0.5
    again.observe(spam)
    again.save(tmp_path / "mid.ckpt")
    again = mg.Organism.load(tmp_path / "mid.ckpt")
    assert not again.train_burst(lr=50.0).accepted
    assert not set(again.heard_val_lines) & set(spam) and sorted(again.quarantine) == sorted(spam)
    # forget reaches the held-out lines and the quarantine too (chat lines only by default)
    org.observe("the secret word is marmalade. nothing else.", speaker="H")
    org.quarantine.append("H: marmalade again")
    org.forget("marmalade")
    everywhere = org.reservoir.lines + org.heard_val_lines + org.quarantine + org.buffer.lines + org.buffer.held
    assert not any("marmalade" in x for x in everywhere)
    assert org.forget("cheap pills", chat_only=False).reservoir_lines == 0 and org.quarantine == []


def test_an_organism_saved_by_the_previous_format_loads_and_learns_on(tmp_path, recwarn):
    """tests/fixtures/organism-v1.ckpt was written by the previous release (state version 1)."""
    path = ROOT / "tests" / "fixtures" / "organism-v1.ckpt"
    org = mg.Organism.load(path)
    assert not [w for w in recwarn.list if "molecule_gpt" in str(w.filename) or "Config" in str(w.message)]
    st = org.stats()
    assert st["warmed_up"] and st["bursts"] == 1 and st["corpus"]["quarantine_lines"] == 0
    assert org.heard_val_lines == [] and org.quarantine == []
    assert org.config.freeze_base_after_warmup  # its saved config keeps the policy it was born with
    assert "A: A small bird watches the quiet road." in org.buffer.lines
    assert isinstance(org.generate("The cat", seed=1), str)
    assert org.heldout_loss() is not None and math.isfinite(org.heldout_loss())
    assert st["val_loss"] == org.heldout_loss()  # version 1 stored it per token: measured again per character
    org.train_burst()
    org.save(tmp_path / "v2.ckpt")
    back = mg.Organism.load(tmp_path / "v2.ckpt")
    assert back.state_dict()["format_version"] == 2 and back.stats()["bursts"] == 2


def _resave(tmp_path, org, name, **state_changes):
    """A validly signed checkpoint of `org` whose organism state was changed (the checksums
    cover what is written, so only validation at load can catch the disagreement)."""
    from molecule_gpt.checkpoint import save_checkpoint
    state = org.state_dict()
    for key, value in state_changes.items():
        target = state
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    path = tmp_path / name
    save_checkpoint(path, org.model, org.tokenizer, state)
    return path


_DELETE = object()


@pytest.mark.parametrize("change", [
    {"config.block_size": 64}, {"config.n_layer": 2}, {"config.head_types": ["content"] * 4},
    {"config.mlp_activation": "silu"}, {"config.tie_embeddings": False}, {"trainer.last_val": _DELETE},
    {"trainer.modules": []}, {"val_lines": [1, 2]}, {"birth_vocab": 10 ** 6}, {"reservoir.lines": "x"},
    {"buffer": None}, {"seed": _DELETE}, {"growth_retry": [0, 10]}, {"growth_retry": [1, -1]},
    {"growth_retry": [2.0, 10]}, {"growth_retry": 5},
    # numpy raises OverflowError for a generator state out of its integer range (found by tests/fuzz)
    {"trainer.rng.state.state": -1}, {"organism_rng.uinteger": 2 ** 40},
])
def test_a_state_that_disagrees_with_its_model_is_a_checkpoint_error(warmed, tmp_path, change):
    org = mg.Organism.load(warmed)
    org.train_burst()  # a module exists
    path = _resave(tmp_path, org, "bad.ckpt", **change)
    with pytest.raises(mg.CheckpointError, match="intact copy"):
        mg.Organism.load(path, memory=tmp_path / "m.sqlite")
    # the memory it opened was closed again: another process (or this one) can take it
    mg.Memory(tmp_path / "m.sqlite").close()


@pytest.mark.parametrize("keep_best", [True, False])
def test_warmup_ends_on_its_best_evaluation(keep_best):
    """A small corpus trained too long overfits: held-out loss bottoms out and rises. With
    warmup_keep_best the finished warmup is back on the best evaluation's weights (held-out
    loss recomputed from them equals it); without, it ends where training stopped."""
    org = mg.Organism(small_config(warmup_steps=600, eval_interval=50, learning_rate=0.03, lr_warmup_steps=10,
                                   warmup_keep_best=keep_best), LINES[:40], seed=5)
    org.warmup()
    evals = [r["val_loss"] for r in org.telemetry if r["phase"] == "warmup_eval"]
    assert min(evals) < evals[-1], "the run did not overfit: the test needs a later evaluation worse than the best"
    restored = [r for r in org.telemetry if r["phase"] == "warmup_best"]
    # a fresh held-out set: its loss is computed from the weights now, not taken from a cache
    now = HeldOut(org._old_heldout.lines, org.tokenizer.encode, lambda: org.tokenizer.version).loss(org.model)
    if keep_best:
        assert restored and restored[-1]["val_loss"] == min(evals)
        assert now == pytest.approx(min(evals), rel=1e-12) and org.trainer.last_val == min(evals)
    else:
        assert not restored
        assert now == pytest.approx(evals[-1], rel=1e-12)
    assert org.trainer.warmed_up
    assert org.generate("the old tree", max_gen_tokens=5, seed=1) is not None


def test_a_resumed_warmup_does_not_restore_a_best_of_other_arrays():
    """A warmup interrupted after its best evaluation, the vocabulary grown (the parameter arrays
    reallocated), then resumed: it finishes without going back to the snapshot of the old arrays."""
    org = mg.Organism(small_config(warmup_steps=400, eval_interval=50, learning_rate=0.03, lr_warmup_steps=10),
                      LINES[:40], seed=5)
    calls = {"n": 0}

    def stop_after_250():
        calls["n"] += 1
        return calls["n"] > 250

    first = org.warmup(should_stop=stop_after_250)
    assert not first["finished"]
    org.model.grow_vocab(org.model.vocab_size + 3)
    org._rebuild_data()
    org.config.learning_rate = 0.3  # the rest only gets worse: the best stays the old arrays' snapshot
    second = org.warmup()
    evals = [r["val_loss"] for r in org.telemetry if r["phase"] == "warmup_eval"]
    assert second["finished"] and min(evals) < evals[-1]
    assert not [r for r in org.telemetry if r["phase"] == "warmup_best"]


def test_growth_with_nothing_left_to_merge_waits_like_a_declined_one(warmed):
    # 2000 merges: every word of the corpus becomes one token
    org = loaded(warmed, bpe_num_merges=2000, bpe_growth_max_rise=1e9, bpe_retrain_every_chars=300)
    org.train_burst(lr=0.0)
    merges = org.tokenizer.merges
    # new sentences of the corpus's own words
    org.observe([f"The {b} {v} the {a} near the {c}." for b in ("moon", "garden", "market")
                 for v in ("sees", "likes") for a in ("cat", "river") for c in ("old tree", "red house")])
    n0 = len(org.telemetry)
    org.train_burst(lr=0.0)
    growth = [r for r in list(org.telemetry)[n0:] if r["phase"] == "tokenizer"]
    assert [(r["event"], r["reason"]) for r in growth] == [("extend_bpe declined", "nothing to merge")]
    assert org.tokenizer.merges == merges
    assert org._growth_retry == (1, org.reservoir.chars)


def test_growth_trial_trains_rows_through_the_folded_weights(warmed, monkeypatch):
    """Frozen delta modules on lm_head are folded into a cached copy of the tied embedding:
    every row-training step of a growth trial must compute with the rows it just wrote, as a
    model built fresh from the same state does."""
    from molecule_gpt.model import delta_group
    org = loaded(warmed, bpe_num_merges=40, bpe_growth_max_rise=1e9, delta_grow_prob=1.0)
    org.train_burst(lr=0.0)
    for i in range(3):
        org.observe([f"the {w} lantern {i} glows over the harbour" for w in ("red", "green", "blue")])
        org.train_burst()
    m = org.model
    assert any(not m.trainable[delta_group(k)] for k in range(m.n_delta))  # fossils are folded
    org.config.bpe_retrain_every_chars = 100
    org.config.bpe_growth_steps = 5
    org.config.bpe_growth_merges = 4
    org.observe([f"the lantern number {i} hums along the quay wall" for i in range(12)])
    gaps = []
    real = mg.Model.loss_and_grads

    def checked(self, batch, *a, **kw):
        if self is not org.model:  # the trial
            seq = batch[0][:-1]
            fresh = mg.Model.from_state(*self.export_state())
            gaps.append(float(np.abs(self.logits(seq) - fresh.logits(seq)).max()))
        return real(self, batch, *a, **kw)

    monkeypatch.setattr(mg.Model, "loss_and_grads", checked)
    v0 = org.model.vocab_size
    org.train_burst(lr=0.0)
    assert org.model.vocab_size > v0
    assert len(gaps) == 5 and max(gaps) == 0.0, gaps


def test_a_close_call_is_judged_again_on_every_held_out_line(tmp_path):
    """A burst whose rise on the val_max_sequences lines lies at most immune_second_look below
    the bound is decided by the rise on every held-out line of the old text, measured under the
    weights before the burst and under its own (put aside and written back exactly)."""
    org = mg.Organism(small_config(val_max_sequences=6, warmup_steps=40), LINES, seed=3)
    org.warmup()
    assert len(org.val_lines) > 6 and len(org._old_heldout_all) == len(org.val_lines)
    org.save(tmp_path / "w.ckpt")
    heard = [f"the {w} lantern number {i} glows" for i in range(8) for w in ("red", "blue")]

    def run(**fields):
        o = mg.Organism.load(tmp_path / "w.ckpt")
        for k, v in fields.items():
            setattr(o.config, k, v)
        o.observe(heard)
        all_before = HeldOut(o.val_lines, o.tokenizer.encode, lambda: o.tokenizer.version).loss(o.model)
        return o, all_before, o.train_burst(lr=0.01)

    # no check at all: the burst's own weights and figures
    free, _, r_free = run(immune_max_rise=1e9, immune_second_look=0.0)
    assert r_free.accepted and r_free.second_look is None
    few = r_free.loss_after / r_free.loss_before - 1
    # every burst a close call: the second look's figures are the all-lines losses
    o, all_before, r = run(immune_max_rise=1e9, immune_second_look=1e10)
    assert r.accepted and r.second_look[0] == all_before
    assert r.second_look[1] == HeldOut(o.val_lines, o.tokenizer.encode, lambda: o.tokenizer.version).loss(o.model)
    for name, w in o.model.params().items():  # the burst's weights, written back exactly
        np.testing.assert_array_equal(w, free.model.params()[name], err_msg=name)
    every = r.second_look[1] / r.second_look[0] - 1
    assert few < every  # the few lines judge this burst more kindly than all of them
    # a bound between the two rises: the few lines accept, all of them reject, when the few
    # lines' rise lies within immune_second_look below the bound
    bound = (few + every) / 2
    _, _, judged = run(immune_max_rise=bound, immune_second_look=(bound - few) * 1.01)
    assert judged.second_look is not None and not judged.accepted and judged.reason == "val_loss_rose"
    _, _, unjudged = run(immune_max_rise=bound, immune_second_look=(bound - few) * 0.99)
    assert unjudged.second_look is None and unjudged.accepted
    # a rise above the bound is rejected without a second look
    _, _, above = run(immune_max_rise=few - 1e-6, immune_second_look=1e10)
    assert above.second_look is None and not above.accepted
