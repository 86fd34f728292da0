"""The Model described once, seen from the rest of the package: one delta fold, one set of RoPE
tables, one weights version that changes when the weights do (and comes back on a rollback),
one name for a delta module's group."""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

import molecule_gpt as mg
from molecule_gpt import generation, model as model_mod, trainer as trainer_mod
from molecule_gpt.model import delta_group, fold_delta_terms

SRC = pathlib.Path(mg.__file__).resolve().parent
LINES = [f"The {a} {v} the {b}." for a in ("cat", "dog", "bird") for v in ("sees", "likes") for b in ("moon", "tree")]


def small_model(**kw) -> mg.Model:
    cfg = mg.Config(**dict(dict(n_layer=1, n_embd=16, n_head=2, block_size=12, head_types=("content", "hybrid"),
                                delta_rank=2, batch_size=4), **kw))
    return mg.Model(cfg, 20, dtype="float64", n_threads=1)


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 20, size=8).tolist() for _ in range(4)]


# --------------------------------------------------------------------------------------------- the fold


def test_fold_delta_terms_is_sum_of_alpha_a_b():
    rng = np.random.default_rng(0)
    mods = [(a, {"w.A": rng.normal(size=(5, 2)), "w.B": rng.normal(size=(2, 3)),
                 "v.A": rng.normal(size=(4, 2)), "v.B": rng.normal(size=(2, 4))}) for a in (0.5, 0.0, -2.0)]
    out = fold_delta_terms(mods, ["w", "v"])
    for name in ("w", "v"):
        want = sum(a * p[f"{name}.A"] @ p[f"{name}.B"] for a, p in mods)
        np.testing.assert_allclose(out[name], want, rtol=1e-14)
        assert out[name].dtype == np.float64
    assert fold_delta_terms([mods[1]], ["w"]) == {}  # alpha 0 contributes nothing
    assert fold_delta_terms([], ["w"]) == {}


def test_every_effective_weight_comes_from_the_one_fold(monkeypatch):
    """The Model's folded training weights, the decoder's weights and the trainer's output rows
    all call model.fold_delta_terms, and agree."""
    calls = []
    real = model_mod.fold_delta_terms

    def counting(modules, names):
        calls.append(tuple(names))
        return real(modules, names)

    for module in (model_mod, generation, trainer_mod):
        monkeypatch.setattr(module, "fold_delta_terms", counting)
    m = small_model()
    for k in range(3):
        m.add_delta_module(alpha=0.4 + 0.3 * k)
    m.set_trainable(delta_group(0), False)  # folded into the training weights
    m.set_trainable(delta_group(1), False)
    ids = [1, 2, 3, 4]
    m.logits(ids)
    assert calls, "the Model's fold of frozen modules"
    n = len(calls)
    w = generation.fold_weights(m)
    assert len(calls) > n, "generation's fold"
    n = len(calls)
    t = trainer_mod.Trainer(m, m.config, np.random.default_rng(0), np.zeros((20, 16)))
    rows = t.output_rows()
    assert len(calls) > n and calls[-1] == ("lm_head",), "the trainer's output rows"
    p = m.params()
    want = p["wte"] + sum(a * p[f"{delta_group(k)}.lm_head.A"] @ p[f"{delta_group(k)}.lm_head.B"]
                          for k, a in enumerate(m.delta_alphas))
    np.testing.assert_allclose(rows, want, rtol=1e-12, atol=1e-15)
    dec = mg._decode.Decoder(w, m.vocab_size, m.config.block_size)
    np.testing.assert_allclose(dec.prefill(ids), m.logits(ids)[-1], rtol=0, atol=1e-10)


def test_the_fold_and_the_rope_tables_are_written_once():
    fold = re.compile(r'\.A"\]\.astype\(np\.float64\)\s*@')
    rope = re.compile(r"10000\.0 \*\* \(2 \* i / d\)")
    files = sorted(SRC.glob("*.py"))
    assert [p.name for p in files if fold.search(p.read_text())] == ["model.py"]
    assert [p.name for p in files if rope.search(p.read_text())] == ["model.py"]
    assert generation._rope_tables is model_mod._rope_tables
    # the group name of a delta module is spelled in one place
    spelled = [p.name for p in files if re.search(r'f"delta\{', p.read_text())]
    assert spelled == ["model.py"] and delta_group(3) == "delta3"


# --------------------------------------------------------------------------------------------- versions


def test_version_changes_when_the_weights_change_and_only_then():
    m = small_model()
    v = m.version
    m.loss(batch())
    m.logits([1, 2, 3])
    m.sequence_losses(batch())
    m.n_threads = 2  # other workers, the same weights
    assert m.version == v  # reading changes nothing
    seen = {v}

    def changed():
        assert m.version not in seen
        seen.add(m.version)

    base_v = m.groups["base"].version
    m.train_step(batch(), 0.01)
    changed()
    assert m.groups["base"].version != base_v
    m.add_delta_module()
    changed()
    m.set_trainable("base", False)
    changed()
    base_v, d0 = m.groups["base"].version, m.groups[delta_group(0)].version
    m.train_step(batch(1), 0.01)
    changed()
    assert m.groups["base"].version == base_v and m.groups[delta_group(0)].version != d0  # only what trained
    m.set_delta_alpha(0, 0.5)
    changed()
    m.grow_vocab(25)
    changed()
    m.refresh()
    changed()
    versions = m.versions()
    assert versions[0] == m.version and set(versions[1]) == set(m.groups)


def test_a_rollback_restores_the_version_and_an_accepted_burst_does_not():
    org = mg.Organism(mg.Config(n_layer=1, n_embd=16, n_head=2, block_size=24, head_types=("content", "hybrid"),
                                delta_rank=2, warmup_steps=10, micro_steps=3, batch_size=2, train_threads=1,
                                delta_grow_prob=0.0, qb_cooldown_seconds=0.0, heard_val_fraction=0.0),
                      LINES * 2, seed=1)
    org.warmup()
    org.train_burst()  # the first burst creates module 0
    m = org.model
    before, loss_calls = m.versions(), []
    held = org._old_heldout
    real_loss = held.loss
    held.loss = lambda model, pace=None, known=None: loss_calls.append(1) or real_loss(model, pace, known)
    org.observe([f"zz{i}qq !!## ~~ {i * 7919 % 1000} zz" for i in range(8)])
    report = org.train_burst(lr=50.0)
    assert not report.accepted
    assert m.versions() == before  # model and every group: as before the burst
    n = len(loss_calls)
    assert org.trainer.evaluate(held) == report.loss_before and len(loss_calls) == n  # cached value valid again
    report = org.train_burst(lr=0.0)
    assert report.accepted and m.version != before[0]


def test_the_decoder_cache_follows_the_model_version():
    m = small_model()
    cache = generation.WeightCache(m)
    w = cache.get()
    assert cache.get() is w
    m.refresh()  # after writing parameters in place: refolds without invalidate()
    assert cache.get() is not w


# --------------------------------------------------------------------------------------------- the checkpoint's side


def test_the_checkpoint_uses_the_model_boundary_not_its_internals():
    for name in ("checkpoint.py", "compat.py"):
        assert not re.search(r"model\._|\.groups\b|\._lock", (SRC / name).read_text()), name


def test_state_spans_are_the_model_memory_of_export_state():
    m = small_model()
    m.add_delta_module()
    m.train_step(batch(), 0.01)
    meta, tensors = m.export_state()
    spans = m.state_spans()
    assert set(spans) == set(tensors) == set(m.state_layout())
    for name, (flat, start, shape) in spans.items():
        n = int(np.prod(shape))
        np.testing.assert_array_equal(flat[start:start + n].reshape(shape), tensors[name], err_msg=name)
    assert set(m.state_spans(optimizer_state=False)) == {k for k in tensors if not k.startswith("adam.")}
    flat, start, shape = spans["l0.wq"]
    flat[start] += 1.0  # spans are the model's memory, not copies
    assert m.params()["l0.wq"].flat[0] == tensors["l0.wq"].flat[0] + 1.0
    m.set_adam_steps({name: 7 for name in meta["adam_steps"]})
    assert set(m.export_state()[0]["adam_steps"].values()) == {7}
    with pytest.raises(KeyError):
        m.set_adam_steps({"base": 1})
