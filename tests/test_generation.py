"""Generation: cached decoding vs the full forward, the sampling stack vs a numpy reference, stop
rules, streaming, overrides, the corpus field and the effective-weight cache."""
from __future__ import annotations

import collections
import gc
import math
import os
import threading

import numpy as np
import pytest

import molecule_gpt as mg
from molecule_gpt import _decode, _sampling
from molecule_gpt.errors import GenerationError
from molecule_gpt.data import seed_corpus_lines
from molecule_gpt.field import CorpusField, best_blend_weight
from molecule_gpt.generation import Generator, SamplingParams, WeightCache, fold_weights
from molecule_gpt.tokenizer import EvolvingTokenizer

LINES = [
    "the cat sat on the mat.",
    "a dog ran to the park!",
    "is the sun hot? yes it is.",
    "we like to read books at night.",
    "birds sing in the early morning.",
] * 4

ALL_HEADS = ("content", "rrpram", "hybrid", "hybrid")


def small_config(**kw) -> mg.Config:
    base = dict(n_layer=2, n_embd=16, n_head=4, block_size=8, head_types=ALL_HEADS, delta_rank=3)
    base.update(kw)
    return mg.Config(**base)


def make_model(dtype="float64", n_delta=2, V=23, seed=0, **kw) -> mg.Model:
    m = mg.Model(small_config(**kw), V, dtype=dtype, seed=seed, n_threads=1)
    for k in range(n_delta):
        m.add_delta_module(alpha=0.5 + 0.4 * k)
    return m


# ---------------------------------------------------------------------------------------------
# cached decoding == full forward


def reference_window(window: list, tok: int, T: int) -> list:
    """The window rule documented in _decode: full -> keep the last T//2, then append."""
    if len(window) < T:
        return window + [tok]
    return window[len(window) - T // 2:] + [tok]


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-4)])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_cached_decoding_matches_full_forward_every_step(dtype, tol, activation):
    m = make_model(dtype, mlp_activation=activation)
    dec = _decode.Decoder(fold_weights(m), m.vocab_size, m.config.block_size)
    rng = np.random.default_rng(1)
    seq = [int(t) for t in rng.integers(0, m.vocab_size, 40)]
    window = seq[:3]
    logits = dec.prefill(window)
    worst = np.abs(logits - m.logits(window)[-1]).max()
    refills = 0
    for tok in seq[3:]:  # 37 more tokens through a window of 8: several re-prefills
        refills += len(window) == m.config.block_size
        window = reference_window(window, tok, m.config.block_size)
        logits = dec.feed(tok)
        assert dec.window == window
        full = m.logits(window)[-1]
        worst = max(worst, np.abs(logits - full).max() / max(1.0, np.abs(full).max()))
    print(f"{dtype} {activation}: worst relative difference {worst:.3g} over {len(seq) - 2} steps, {refills} re-prefills")
    assert refills >= 4
    assert worst < tol


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_the_decoder_computes_the_training_forward_bit_for_bit(dtype, activation):
    """With every delta module frozen (both sides then read the same folded weights), a decode's
    logits at every step are exactly the training forward's (Model.logits of the window):
    the same products, attention rows, softmax and RMSNorm sums in the same order, in either
    precision, across window refills, with trained (not random-looking) weights."""
    from molecule_gpt import _core
    if _core.linear_simd_path() == "portable":
        pytest.skip("the training products run BLAS here (no AVX2): another order of the same sums")
    m = make_model(dtype, mlp_activation=activation, n_embd=32, block_size=12)
    for k in range(m.n_delta):
        m.set_trainable(f"delta{k}", False)
    rng = np.random.default_rng(4)
    for _ in range(5):
        m.train_step([[int(t) for t in rng.integers(0, m.vocab_size, 13)] for _ in range(4)], 0.01)
    dec = _decode.Decoder(fold_weights(m), m.vocab_size, m.config.block_size)
    seq = [int(t) for t in rng.integers(0, m.vocab_size, 50)]
    window = seq[:3]
    assert dec.prefill(window).tobytes() == m.logits(window)[-1].tobytes()
    for tok in seq[3:]:
        window = reference_window(window, tok, m.config.block_size)
        logits = dec.feed(tok)
        assert logits.tobytes() == m.logits(window)[-1].tobytes(), (len(window), tok)


PORTABLE_CHECK = """
import numpy as np, molecule_gpt as mg
from molecule_gpt import _decode, _sampling
from molecule_gpt.generation import fold_weights
assert _decode.simd_path() == "portable"
m = mg.Model(mg.Config(n_layer=2, n_embd=24, n_head=4, block_size=8, delta_rank=3,
                       head_types=("content", "rrpram", "hybrid", "hybrid")), 23, n_threads=1)
m.add_delta_module(alpha=0.5)
dec = _decode.Decoder(fold_weights(m), 23, 8)
seq = [int(t) for t in np.random.default_rng(2).integers(0, 23, 30)]
window, worst = seq[:3], np.abs(dec.prefill(seq[:3]) - m.logits(seq[:3])[-1]).max()
for t in seq[3:]:
    window = window + [t] if len(window) < 8 else window[4:] + [t]
    worst = max(worst, np.abs(dec.feed(t) - m.logits(window)[-1]).max())
ids, p = _sampling._sample_stack_memview(np.log([0.5, 0.25, 0.15, 0.06, 0.04]), None, 1.0, -1.0, 100.0, 1.0, 1.0,
                                        0.0, 1.0, 0.8, 0)
assert ids == [0, 1, 2], ids
print(worst)
print(MIN_P_CASES)
"""

# min-p candidates found by the vector scan (its lanes' ends and the tail past them) and by the
# portable loop alike: the ids of a few distributions, in the subprocess and here
MIN_P_CASES = """[_sampling._sample_stack_memview(np.where(np.arange(V) % 7 == 3, -np.inf, np.random.default_rng(V).normal(0, 3, V)),
                                 None, 0.85, 0.5, 1.5, 1.2, 0.8, 0.06, 1.0, 1.0, 0)[0] for V in (5, 16, 17, 40, 333)]"""
PORTABLE_CHECK = PORTABLE_CHECK.replace("print(MIN_P_CASES)", f"print({MIN_P_CASES})")


def test_portable_kernels_match_when_avx2_is_off():
    """The non-AVX2 kernels (what a CPU without AVX2 runs) decode the same logits."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, MOLECULE_GPT_NO_AVX2="1")
    out = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    worst, min_p_ids = out.stdout.splitlines()
    assert float(worst) < 2e-4
    assert min_p_ids == str(eval(MIN_P_CASES)) and len(eval(MIN_P_CASES)[-1]) > 1
    if _decode.simd_path() == "avx2":
        assert os.environ.get("MOLECULE_GPT_NO_AVX2") in (None, "", "0")


def test_untied_embeddings_and_content_only_heads():
    m = make_model("float64", tie_embeddings=False, head_types=("content",) * 4)
    dec = _decode.Decoder(fold_weights(m), m.vocab_size, m.config.block_size)
    ids = [1, 5, 2, 9]
    assert np.abs(dec.prefill(ids) - m.logits(ids)[-1]).max() < 1e-10
    assert np.abs(dec.feed(7) - m.logits(ids + [7])[-1]).max() < 1e-10


def test_long_prompt_keeps_last_window():
    m = make_model("float64")
    T = m.config.block_size
    dec = _decode.Decoder(fold_weights(m), m.vocab_size, T)
    prompt = list(range(3, 3 + 3 * T))
    prompt = [p % m.vocab_size for p in prompt]
    logits = dec.prefill(prompt)
    assert dec.window == prompt[-T:]
    assert np.abs(logits - m.logits(prompt[-T:])[-1]).max() < 1e-10


def test_prefill_equals_stepwise_feeding():
    m = make_model("float64")
    dec1 = _decode.Decoder(fold_weights(m), m.vocab_size, m.config.block_size)
    dec2 = _decode.Decoder(fold_weights(m), m.vocab_size, m.config.block_size)
    ids = [4, 8, 15, 16, 22, 3]
    a = dec1.prefill(ids).copy()
    dec2.prefill(ids[:1])
    for t in ids[1:]:
        b = dec2.feed(t)
    assert np.abs(a - b).max() < 1e-12


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_decoder_threads_split_large_products_with_the_same_numbers(dtype):
    """Products of >= 128k weights are split by rows over the worker pool (csrc/pool.c): each
    row's sum is computed as on one thread, so prefill and every step agree bit for bit."""
    m = make_model(dtype, n_delta=1, V=301, n_embd=256, n_head=4, head_types=("content", "rrpram", "hybrid", "hybrid"),
                   block_size=16)
    w = fold_weights(m)
    one = _decode.Decoder(w, m.vocab_size, m.config.block_size, 1)
    two = _decode.Decoder(w, m.vocab_size, m.config.block_size, 2)
    ids = [5, 17, 200, 3, 99, 42]
    assert np.array_equal(one.prefill(ids), two.prefill(ids))
    for t in [7, 250, 1, 300, 12, 8, 64, 9, 10, 11, 150, 13, 14]:  # past block_size: a re-prefill too
        assert np.array_equal(one.feed(t), two.feed(t))
    assert np.abs(two.prefill(ids) - m.logits(ids)[-1]).max() < (1e-10 if dtype == "float64" else 2e-4)


def test_fold_weights_skips_zero_alpha_modules_exactly():
    m = make_model("float64", n_delta=3)
    m.set_delta_alpha(1, 0.0)
    w = fold_weights(m)
    dec = _decode.Decoder(w, m.vocab_size, m.config.block_size)
    ids = [1, 2, 3]
    assert np.abs(dec.prefill(ids) - m.logits(ids)[-1]).max() < 1e-10


# ---------------------------------------------------------------------------------------------
# the sampling stack against a numpy reference


def reference_stack(z, temperature, lo, hi, boost, focus, min_p, typical_p, top_p, top_k, q=None, alpha=1.0):
    """design.md §4 as documented in generation.py, written plainly."""
    z = np.asarray(z, float)
    ok = np.isfinite(z)

    def softmax(t):
        e = np.where(ok, np.exp((np.where(ok, z, 0) - z[ok].max()) / t), 0.0)
        return e / e.sum()

    p0 = softmax(temperature)
    H = -(p0[p0 > 0] * np.log(p0[p0 > 0])).sum()
    t = temperature * boost if H < lo else (temperature * focus if H > hi else temperature)
    p = softmax(t)
    if q is not None:
        p = alpha * p + (1 - alpha) * q
    idx = [i for i in range(len(p)) if p[i] > 0 and p[i] >= min_p * p.max()]
    order = sorted(idx, key=lambda i: (-p[i], i))
    if top_k and len(order) > top_k:
        order = order[:top_k]

    def prefix(seq, limit):
        mass = p[seq].sum()
        kept, cum = [], 0.0
        for i in seq:
            kept.append(i)
            cum += p[i] / mass
            if cum >= limit:
                break
        return kept

    if typical_p < 1 and len(order) > 1:
        by_typical = sorted(order, key=lambda i: (abs(-math.log(p[i]) - H), -p[i], i))
        order = sorted(prefix(by_typical, typical_p), key=lambda i: (-p[i], i))
    if top_p < 1 and len(order) > 1:
        order = prefix(order, top_p)
    probs = p[order] / p[order].sum()
    return order, probs, H, t


@pytest.mark.parametrize("case", range(40))
def test_sampling_stack_matches_reference(case):
    rng = np.random.default_rng(case)
    V = int(rng.integers(5, 300))
    z = rng.normal(0, rng.choice([0.3, 2.0, 6.0]), V)
    z[rng.integers(0, V, 2)] = -np.inf  # banned tokens
    kw = dict(temperature=float(rng.choice([0.3, 0.85, 1.5])), lo=0.5, hi=1.5, boost=1.2, focus=0.8,
              min_p=float(rng.choice([0.0, 0.06, 0.3])), typical_p=float(rng.choice([1.0, 0.95, 0.5])),
              top_p=float(rng.choice([1.0, 0.92, 0.5])), top_k=int(rng.choice([0, 1, 5, 40])))
    q = None
    alpha = 1.0
    if case % 3 == 0:
        q = rng.dirichlet(np.ones(V) * 0.3)
        q[~np.isfinite(z)] = 0
        q /= q.sum()
        alpha = float(rng.uniform(0.2, 0.9))
    ids, probs = _sampling._sample_stack_memview(z, q, kw["temperature"], kw["lo"], kw["hi"], kw["boost"], kw["focus"],
                                               kw["min_p"], kw["typical_p"], kw["top_p"], kw["top_k"], alpha)
    ref_ids, ref_probs, _, _ = reference_stack(z, **kw, q=q, alpha=alpha)
    assert ids == ref_ids
    # the kernel's exponentials are float32 (see softmax_t): agreement to float32 precision
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-12)


def test_entropy_adaptive_temperature_hand_cases():
    off = dict(min_p=0.0, typical_p=1.0, top_p=1.0, top_k=0)
    # a peaked distribution (H < 0.5): temperature is boosted by 1.2
    z = np.array([5.0, 0.0, 0.0, 0.0])
    p0 = np.exp(z / 0.85) / np.exp(z / 0.85).sum()
    assert -(p0 * np.log(p0)).sum() < 0.5
    ids, probs = _sampling._sample_stack_memview(z, None, 0.85, 0.5, 1.5, 1.2, 0.8, **off)
    want = np.exp(z / (0.85 * 1.2)) / np.exp(z / (0.85 * 1.2)).sum()
    np.testing.assert_allclose(probs, want[ids], rtol=1e-5)
    # a flat distribution over 8 tokens (H = ln 8 > 1.5): focused by 0.8
    z = np.linspace(0, 0.5, 8)
    ids, probs = _sampling._sample_stack_memview(z, None, 1.0, 0.5, 1.5, 1.2, 0.8, **off)
    want = np.exp(z / 0.8) / np.exp(z / 0.8).sum()
    np.testing.assert_allclose(probs, want[ids], rtol=1e-5)


def test_filters_hand_cases():
    p = np.array([0.5, 0.25, 0.15, 0.06, 0.04])
    z = np.log(p)
    common = dict(temperature=1.0, entropy_low=-1.0, entropy_high=100.0, boost=1.0, focus=1.0)
    ids, _ = _sampling._sample_stack_memview(z, None, **common, min_p=0.0, typical_p=1.0, top_p=1.0, top_k=2)
    assert ids == [0, 1]
    ids, _ = _sampling._sample_stack_memview(z, None, **common, min_p=0.2, typical_p=1.0, top_p=1.0, top_k=0)
    assert ids == [0, 1, 2]  # 0.06 < 0.2 * 0.5
    ids, _ = _sampling._sample_stack_memview(z, None, **common, min_p=0.0, typical_p=1.0, top_p=0.8, top_k=0)
    assert ids == [0, 1, 2]  # 0.5 + 0.25 < 0.8 <= 0.9
    ids, probs = _sampling._sample_stack_memview(z, None, **common, min_p=0.0, typical_p=1.0, top_p=1.0, top_k=0)
    np.testing.assert_allclose(probs, p, rtol=1e-5)
    # greedy
    ids, probs = _sampling._sample_stack_memview(z, None, 0.0, 0.5, 1.5, 1.2, 0.8, 0.0, 1.0, 1.0, 0)
    assert ids == [0] and probs.tolist() == [1.0]


def test_typical_filter_hand_case():
    # H of p; surprisals -log p; the token closest to H first
    p = np.array([0.4, 0.3, 0.2, 0.1])
    H = -(p * np.log(p)).sum()  # 1.2799
    dist = np.abs(-np.log(p) - H)  # [0.364, 0.076, 0.330, 1.023]
    assert list(np.argsort(dist)) == [1, 2, 0, 3]
    ids, _ = _sampling._sample_stack_memview(np.log(p), None, 1.0, -1.0, 100.0, 1.0, 1.0, 0.0, 0.45, 1.0, 0)
    assert ids == [1, 2]  # 0.3 < 0.45 <= 0.5, returned by probability


# ---------------------------------------------------------------------------------------------
# the Generator


@pytest.fixture(scope="module")
def tok():
    return EvolvingTokenizer(LINES, mg.Config())


@pytest.fixture(scope="module")
def trained(tok):
    """A small model trained a little on LINES (float64 for exact comparisons)."""
    cfg = mg.Config(n_layer=1, n_embd=32, n_head=4, block_size=32, head_types=("content", "content", "hybrid", "rrpram"))
    m = mg.Model(cfg, tok.vocab_size, dtype="float64", seed=3, n_threads=1)
    rng = np.random.default_rng(0)
    data = [tok.encode(line) for line in LINES]
    for _ in range(60):
        m.train_step([data[i] for i in rng.integers(0, len(data), 4)], 0.01)
    return m


def test_greedy_matches_argmax_of_full_forward(tok, trained):
    g = Generator(trained, tok)
    res = g.run("the cat", temperature=0.0, max_gen_tokens=20, min_gen_tokens=20, repetition_guard=0)
    ids = g.encode_prompt("the cat")
    banned = {tok.bos_id, tok.pad_id, tok.eos_id}
    for t in res.ids:
        logits = trained.logits(ids[-trained.config.block_size:])[-1].copy()
        logits[list(banned)] = -np.inf
        assert t == int(np.argmax(logits))
        ids.append(t)
    assert len(res.ids) == 20 and res.stop_reason == "max_tokens"


def test_seed_reproducible_and_stream_equals_generate(tok, trained):
    g = Generator(trained, tok)
    a = g.run("we like", seed=123)
    b = g.run("we like", seed=123)
    assert a == b
    loose = dict(temperature=1.5, top_k=0, min_p=0.0, top_p=1.0, typical_p=1.0, min_gen_tokens=5)
    outs = {g.generate("we like", seed=s, **loose) for s in range(8)}
    assert len(outs) > 1
    for s in range(6):
        for stop in ((), ("e",), ("the", "at")):
            text = g.generate("the", seed=s, stop=stop)
            assert "".join(g.stream("the", seed=s, stop=stop)) == text
            assert not any(x in text for x in stop)
    assert tok.decode(a.ids) == a.text


def test_sampling_frequencies_follow_the_distribution(tok, trained):
    """First-token frequencies over many seeds match the stack's distribution (chi-square)."""
    g = Generator(trained, tok)
    params = dict(temperature=1.0, max_gen_tokens=1, min_gen_tokens=1)
    ids = g.encode_prompt("the")
    z = trained.logits(ids)[-1].copy()
    z[[tok.bos_id, tok.pad_id, tok.eos_id]] = -np.inf
    cfg = trained.config
    ref_ids, ref_p, _, _ = reference_stack(z, 1.0, cfg.entropy_low, cfg.entropy_high, cfg.entropy_temp_boost,
                                           cfg.entropy_temp_focus, cfg.min_p, cfg.typical_p, cfg.top_p, cfg.top_k)
    n = 3000
    counts = {}
    for s in range(n):
        t = g.run("the", seed=s, **params).ids[0]
        counts[t] = counts.get(t, 0) + 1
    assert set(counts) <= set(ref_ids)
    obs = np.array([counts.get(i, 0) for i in ref_ids])
    exp = ref_p * n
    chi2 = ((obs - exp) ** 2 / exp).sum()
    dof = max(1, len(ref_ids) - 1)
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def force(token_id, fallback=None):
    """A logits processor that makes token_id the only (or the preferred) choice."""
    def proc(ids, logits):
        out = np.full_like(logits, -np.inf)
        if fallback is not None:
            out[fallback] = -1.0
        out[token_id] = 0.0
        return out
    return proc


def test_generated_text_is_valid_unicode_whatever_bytes_the_tokens_spell(tok, trained):
    """Byte tokens can spell the UTF-8-style encoding of a lone surrogate (ED B1 94 for U+DC54),
    which no UTF-8 writer accepts. Generated text has U+FFFD there instead (run, stream, a batch,
    a stop string), as for invalid bytes, and encodes as UTF-8; the tokenizer itself still
    decodes what it encodes."""
    g = Generator(trained, tok)
    spelled = tok.encode("a\udc54b")[1:-1]
    assert tok.decode(spelled) == "a\udc54b" and len(spelled) >= 5

    def forced():
        step = iter(spelled)
        return [lambda ids, lg: force(next(step))(ids, lg)]

    kw = dict(max_gen_tokens=len(spelled), min_gen_tokens=len(spelled), repetition_guard=0)
    r = g.run("the", logits_processors=forced(), **kw)
    assert r.ids == spelled and r.text == "a\ufffdb"
    assert r.text.encode("utf-8") == b"a\xef\xbf\xbdb"
    assert "".join(g.stream("the", logits_processors=forced(), **kw)) == "a\ufffdb"
    many = g.run_many(["the", "the"], [g.params(logits_processors=forced(), **kw) for _ in range(2)])
    assert [m.text for m in many] == ["a\ufffdb"] * 2
    assert g.run("the", stop=["zz"], logits_processors=forced(), **kw).text == "a\ufffdb"


def test_stop_rules(tok, trained):
    g = Generator(trained, tok)
    a_id = tok.encode("a")[1]
    dot_id = tok.encode(".")[1]
    # EOS is not sampled before min_gen_tokens, then stops without being included
    r = g.run("the", temperature=0.0, min_gen_tokens=7, logits_processors=[force(tok.eos_id, fallback=a_id)])
    assert r.ids == [a_id] * 7 and r.stop_reason == "eos"
    # max tokens
    r = g.run("the", max_gen_tokens=5, min_gen_tokens=0, repetition_guard=0, logits_processors=[force(a_id)])
    assert r.ids == [a_id] * 5 and r.stop_reason == "max_tokens"
    # sentence end after min tokens
    r = g.run("the", temperature=0.0, min_gen_tokens=3, repetition_guard=0,
              logits_processors=[force(dot_id)])
    assert r.ids == [dot_id] * 3 and r.stop_reason == "sentence"
    # repetition: the last 2 equal the 2 before them
    r = g.run("the", min_gen_tokens=50, repetition_guard=2, logits_processors=[force(a_id)])
    assert r.ids == [a_id] * 4 and r.stop_reason == "repetition"
    # stop string: cut before it
    seq = tok.encode("xyz")[1:-1]
    step = iter(seq * 20)
    r = g.run("the", min_gen_tokens=50, repetition_guard=0, stop=["yz"],
              logits_processors=[lambda ids, lg: force(next(step))(ids, lg)])
    assert r.text == "x" and r.stop_reason == "stop_string"
    # max_gen_tokens=0 generates nothing
    assert g.run("the", max_gen_tokens=0).ids == []


def test_processors_see_ids_and_run_in_order(tok, trained):
    g = Generator(trained, tok)
    seen = []

    def first(ids, logits):
        seen.append(("first", list(ids)))
        return logits

    def second(ids, logits):
        seen.append(("second", len(ids)))
        return logits

    r = g.run("the", seed=0, max_gen_tokens=3, min_gen_tokens=3, repetition_guard=0, logits_processors=[first, second])
    prompt = g.encode_prompt("the")
    assert [s[0] for s in seen] == ["first", "second"] * 3
    assert seen[0][1] == prompt and seen[2][1] == prompt + r.ids[:1]
    assert seen[1][1] == len(prompt)


def test_frequency_penalty_discourages_repeats(tok, trained):
    g = Generator(trained, tok)
    r = g.run("the", temperature=0.0, frequency_penalty=1e3, max_gen_tokens=15, min_gen_tokens=15, repetition_guard=0)
    assert len(set(r.ids)) == len(r.ids) == 15


def test_bad_overrides_raise_generation_error(tok, trained):
    g = Generator(trained, tok)
    for kw in (dict(temprature=1.0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=1.5),
               dict(min_p=float("nan")), dict(max_gen_tokens=2.5), dict(entropy_low=3.0),
               dict(stop=[""]), dict(seed="x"), dict(logits_processors=[1]), dict(model_alpha=2.0),
               dict(entropy_temp_boost=0.0)):
        with pytest.raises(GenerationError):
            g.generate("the", **kw)
    with pytest.raises(GenerationError, match="shape"):
        g.generate("the", logits_processors=[lambda ids, lg: lg[:3]])
    with pytest.raises(GenerationError, match="NaN"):
        g.generate("the", logits_processors=[lambda ids, lg: lg * np.nan])
    with pytest.raises(GenerationError, match="no token"):
        g.generate("the", logits_processors=[force(tok.bos_id)])
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        g.generate([10 ** 6])
    with pytest.raises(GenerationError):
        g.generate(b"bytes")
    with pytest.raises(GenerationError, match="field"):
        g.generate("the", model_alpha=0.0)
    assert isinstance(GenerationError("x"), mg.MoleculeError) and isinstance(GenerationError("x"), ValueError)


def test_sampling_params_from_config_and_overrides():
    cfg = mg.Config(temperature=0.5, top_k=7)
    p = SamplingParams.from_config(cfg, top_p=0.5, stop="END")
    assert (p.temperature, p.top_k, p.top_p, p.stop) == (0.5, 7, 0.5, ("END",))


def test_generation_never_crashes_on_long_prompts(tok, trained):
    g = Generator(trained, tok)
    prompt = " ".join(LINES)  # far longer than block_size 32
    for s in range(3):
        text = g.generate(prompt, seed=s, max_gen_tokens=80, min_gen_tokens=80, repetition_guard=0)
        assert isinstance(text, str)


def test_threads_generate_the_same_as_serial(tok, trained):
    g = Generator(trained, tok)
    want = [g.generate("the", seed=s, max_gen_tokens=40) for s in range(8)]
    got = [None] * 8
    errors = []

    def work(i):
        try:
            got[i] = g.generate("the", seed=i, max_gen_tokens=40)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == want


# ---------------------------------------------------------------------------------------------
# effective weights cache


def test_weight_cache_refolds_only_when_the_model_changes(tok):
    cfg = mg.Config(n_layer=1, n_embd=16, n_head=2, block_size=16, head_types=("content", "hybrid"))
    m = mg.Model(cfg, tok.vocab_size, dtype="float64", n_threads=1)
    m.add_delta_module()
    cache = WeightCache(m)
    w1 = cache.get()
    assert cache.get() is w1 and cache.folds == 1
    data = [tok.encode(line) for line in LINES[:4]]
    m.train_step(data, 0.01)
    w2 = cache.get()
    assert w2 is not w1 and cache.folds == 2
    ids = tok.encode("the cat")[:-1]
    dec = _decode.Decoder(w2, m.vocab_size, cfg.block_size)
    assert np.abs(dec.prefill(ids) - m.logits(ids)[-1]).max() < 1e-10
    m.set_delta_alpha(0, 0.3)
    assert cache.get() is not w2
    w3 = cache.get()
    cache.invalidate()
    assert cache.get() is not w3


def test_weight_cache_keeps_the_fossils_term(tok):
    """Frozen modules are folded once; refolds after steps reuse their summed term; decoding
    matches the model at every stage."""
    cfg = mg.Config(n_layer=1, n_embd=16, n_head=2, block_size=16, head_types=("content", "hybrid"), delta_rank=2)
    m = mg.Model(cfg, tok.vocab_size, dtype="float64", n_threads=1)
    for k in range(3):
        m.add_delta_module(alpha=0.6 + 0.2 * k)
    m.set_trainable("delta0", False)
    m.set_trainable("delta1", False)
    m.set_trainable("base", False)
    cache = WeightCache(m)
    ids = tok.encode("the cat sat")[:-1]

    def check():
        w = cache.get()
        dec = _decode.Decoder(w, m.vocab_size, cfg.block_size)
        assert np.abs(dec.prefill(ids) - m.logits(ids)[-1]).max() < 1e-10

    check()
    terms = cache._frozen_terms
    data = [tok.encode(line) for line in LINES[:4]]
    for _ in range(3):
        m.train_step(data, 0.05)
        check()
        assert cache._frozen_terms is terms  # the fossils were not refolded
    m.set_delta_alpha(0, 0.1)  # a frozen module's alpha changed: its term is recomputed
    check()
    assert cache._frozen_terms is not terms


# ---------------------------------------------------------------------------------------------
# corpus field


def test_field_counts_and_backoff_by_hand():
    f = CorpusField(6, [[0, 1, 2, 3], [0, 1, 4], [1, 2, 3]])
    assert f.unigrams.tolist() == [2, 3, 2, 2, 1, 0]
    bigrams = {(int(k) // 6, int(k) % 6): c for k, c in zip(f.bigram_keys, f.bigram_counts)}
    assert bigrams == {(0, 1): 2, (1, 2): 2, (2, 3): 2, (1, 4): 1}
    q, level = f.distribution([0, 1])  # trigram context (0, 1): 2 -> 1 time, 4 -> 1 time
    assert level == 3 and q.tolist() == [0, 0, 0.5, 0, 0.5, 0]
    q, level = f.distribution([3, 1])  # unseen trigram context: bigram after 1: 2 (x2), 4 (x1)
    assert level == 2 and np.allclose(q, [0, 0, 2 / 3, 0, 1 / 3, 0])
    q, level = f.distribution([1, 2], temperature=0.5)  # (1,2) -> 3 twice
    assert level == 3 and q[3] == 1.0
    q, level = f.distribution([5])  # unseen everything: unigram ∝ count^(1/T)
    assert level == 1 and np.allclose(q, np.array([2, 3, 2, 2, 1, 0]) / 10)
    q, level = f.distribution([0, 1], min_level=2, temperature=0.5)
    assert level == 3
    q, level = f.distribution([5], temperature=0.5)  # count^2
    assert np.allclose(q, np.array([4, 9, 4, 4, 1, 0]) / 22)


def test_field_add_merges_and_grow_vocab_preserves():
    f = CorpusField(6, [[0, 1, 2]])
    f.add([[0, 1, 2], [0, 1, 3]])
    q, level = f.distribution([0, 1])
    assert level == 3 and np.allclose(q[[2, 3]], [2 / 3, 1 / 3])
    f.grow_vocab(50)
    q2, level2 = f.distribution([0, 1])
    assert level2 == 3 and q2.shape == (50,) and np.allclose(q2[:6], q) and not q2[6:].any()
    f.add([[40, 41, 42]])
    assert f.distribution([40, 41])[0][42] == 1.0


def test_field_heldout_loss_by_hand():
    f = CorpusField(4, [[0, 1, 2], [0, 1, 3]])
    # held-out [0, 1, 2]: t=0 predicts 1 after (0): bigram 1, no trigram context
    #   p = 0.9 * 1 + 0.1 * (2 + 1) / (6 + 4)
    # t=1 predicts 2 after (0, 1): trigram 1/2, bigram 1/2, unigram (1+1)/10
    p1 = 0.9 * 1.0 + 0.1 * 3 / 10
    p2 = 0.6 * 0.5 + 0.3 * 0.5 + 0.1 * 2 / 10
    want = -(math.log(p1) + math.log(p2)) / 2
    assert abs(f.heldout_loss([[0, 1, 2]]) - want) < 1e-12


def test_field_sequence_losses_score_each_sequence_alone():
    """sequence_losses looks every position of every sequence up in one pass: each value equals
    the sequence scored alone, block_size cuts included, and heldout_loss is their mean."""
    rng = np.random.default_rng(4)
    f = CorpusField(9, [rng.integers(0, 9, int(rng.integers(2, 30))).tolist() for _ in range(40)])
    held = [rng.integers(0, 9, int(n)).tolist() for n in (2, 3, 17, 40, 5)]
    for block in (None, 8):
        got = f.sequence_losses(held, block)
        want = [f.heldout_loss([s], block) for s in held]
        np.testing.assert_allclose(got, want, rtol=1e-13)
        assert f.heldout_loss(held, block) == pytest.approx(float(np.mean(want)), rel=1e-13)
        # sequences too short to predict anything are left out; arrays (the general path) and
        # lists of ints (one native pass) give the same values
        np.testing.assert_array_equal(f.sequence_losses([[], held[0], [3]] + held[1:], block), got)
        np.testing.assert_array_equal(f.sequence_losses([np.array(s, np.int16) for s in held], block), got)
    tables = ("unigrams", "bigram_keys", "bigram_counts", "trigram_keys", "trigram_counts")
    g = CorpusField(9, [np.array(s) for s in held] + [[]])
    h = CorpusField(9, held)
    assert all(np.array_equal(getattr(g, n), getattr(h, n)) for n in tables)
    with pytest.raises(ValueError, match="sequence 1 holds ids outside"):
        f.sequence_losses([[1, 2], [3, 9]])


def test_field_blend_probs_are_what_the_blend_samples_from():
    """blend_probs gives, for every position sequence_losses scores, the field's probability of
    the target in generation's blend at temperature 1 (Field.distribution with min_level 2:
    trigram, else bigram, else no blend = NaN); leave_one_out takes the position's own n-gram
    and context out of the counts, as counted by hand."""
    rng = np.random.default_rng(7)
    train = [rng.integers(0, 7, int(rng.integers(2, 25))).tolist() for _ in range(30)]
    f = CorpusField(9, train)  # ids 7 and 8 never counted: contexts the field has not seen
    held = [rng.integers(0, 9, int(n)).tolist() for n in (2, 3, 12, 30)]
    for block in (None, 8):
        got = f.blend_probs(held, block)
        want = []
        for s in held:
            for t in range(min(block or len(s), len(s) - 1)):
                q, level = f.distribution(s[max(0, t - 1):t + 1], 1.0, min_level=2)
                want.append(q[s[t + 1]] if level else np.nan)
        np.testing.assert_allclose(got, want, rtol=1e-13)
        assert np.isnan(got).any() and not np.isnan(got).all()
    # leave one out, on sequences the field counted
    tri, bi = collections.Counter(), collections.Counter()
    for s in train:
        tri.update(zip(s, s[1:], s[2:]))
        bi.update(zip(s, s[1:]))
    tri_ctx, bi_ctx = collections.Counter(), collections.Counter()
    for (a, b, c), n in tri.items():
        tri_ctx[a, b] += n
    for (a, b), n in bi.items():
        bi_ctx[a] += n
    want = []
    for s in train[:10]:
        for t in range(len(s) - 1):
            if t > 0 and tri_ctx[s[t - 1], s[t]] > 1:
                want.append((tri[s[t - 1], s[t], s[t + 1]] - 1) / (tri_ctx[s[t - 1], s[t]] - 1))
            elif bi_ctx[s[t]] > 1:
                want.append((bi[s[t], s[t + 1]] - 1) / (bi_ctx[s[t]] - 1))
            else:
                want.append(np.nan)
    np.testing.assert_allclose(f.blend_probs(train[:10], leave_one_out=True), want, rtol=1e-13)


def test_best_blend_weight_minimizes_the_blends_loss():
    """best_blend_weight returns the weight a of a p_model + (1 - a) p_field with the least total
    nats on the targets (checked against a fine grid), skipping targets the field does not take
    part in; 1 when the field takes part nowhere or the model is better everywhere, 0 when the
    field is."""
    rng = np.random.default_rng(3)

    def loss(a, p, q):
        part = ~np.isnan(q)
        return -np.sum(np.log(a * p[part] + (1 - a) * q[part]))

    grid = np.linspace(0, 1, 2001)
    for trial in range(30):
        n = int(rng.integers(1, 300))
        p = rng.uniform(0, 1, n) ** rng.uniform(0.2, 4)
        q = rng.uniform(0, 1, n) ** rng.uniform(0.2, 4)
        q[rng.uniform(size=n) < 0.2] = np.nan
        q[rng.uniform(size=n) < 0.05] = 0.0  # the field cannot say these
        if not (~np.isnan(q)).any():
            continue
        a = best_blend_weight(-np.log(p), q)
        assert 0.0 <= a <= 1.0
        with np.errstate(divide="ignore"):
            best_on_grid = min(loss(g, p, q) for g in grid)
        assert loss(a, p, q) <= best_on_grid + 1e-9 * abs(best_on_grid)
    p = rng.uniform(0.1, 1, 50)
    assert best_blend_weight(-np.log(p), np.full(50, np.nan)) == 1.0
    assert best_blend_weight(-np.log(p), p / 2) == 1.0
    assert best_blend_weight(-np.log(p / 2), p) == 0.0
    with pytest.raises(ValueError, match="one of each per target"):
        best_blend_weight(np.zeros(3), np.zeros(4))


def test_generator_field_only_and_blend(tok):
    cfg = mg.Config(n_layer=1, n_embd=16, n_head=2, block_size=16, head_types=("content", "hybrid"))
    m = mg.Model(cfg, tok.vocab_size, n_threads=1)
    field = CorpusField(tok.vocab_size, [tok.encode(line) for line in LINES])
    g = Generator(m, tok, field)
    seen = {(int(k) // tok.vocab_size, int(k) % tok.vocab_size) for k in field.bigram_keys}
    for s in range(5):
        # min_gen_tokens=0: EOS is never banned, so no back-off to unigrams is needed and every
        # adjacent pair of the output is a pair of the corpus
        r = g.run("", model_alpha=0.0, seed=s, min_gen_tokens=0, max_gen_tokens=500, repetition_guard=0)
        ids = [tok.bos_id] + r.ids
        assert r.text and all(pair in seen for pair in zip(ids, ids[1:]))
    # greedy field generation takes the most frequent continuation at every step
    r = g.run("the cat", model_alpha=0.0, temperature=0.0, min_gen_tokens=0, repetition_guard=0, max_gen_tokens=30)
    ctx = g.encode_prompt("the cat")
    for t in r.ids + ([tok.eos_id] if r.stop_reason == "eos" else []):
        q, level = field.distribution(ctx)
        assert level == 3 and t == int(np.argmax(q))
        ctx.append(t)
    blended = g.run("the", model_alpha=0.5, seed=1)
    assert blended.text == g.run("the", model_alpha=0.5, seed=1).text


# ---------------------------------------------------------------------------------------------
# memory: decoders dropped from the pool are freed


def _live_decoders() -> int:
    return sum(type(o) is _decode.Decoder for o in gc.get_objects())


def test_a_dropped_decoder_is_freed_and_its_logits_stay_valid():
    """Regression: the logits array was a view whose base held the decoder (a reference cycle
    numpy hides from the collector), so no Decoder was ever freed. Now dropping the last
    reference frees it at once, without gc, and a logits array kept by the caller stays valid."""
    m = make_model()
    w = fold_weights(m)
    ids = [1, 2, 3]
    gc.collect()
    before = _live_decoders()
    gc.disable()
    try:
        dec = _decode.Decoder(w, m.vocab_size, m.config.block_size)
        logits = dec.prefill(ids)
        want = logits.copy()
        assert _live_decoders() == before + 1
        del dec
        assert _live_decoders() == before  # refcounting alone freed it: no cycle
    finally:
        gc.enable()
    assert logits.tobytes() == want.tobytes()
    assert np.abs(logits - m.logits(ids)[-1]).max() < 1e-10


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc")
def test_chat_turns_do_not_leak_decoders():
    """Regression (the chat loop): every generate() after a training burst folds new weights,
    so the pooled decoders are stale and dropped; each used to stay alive with its weights and
    scratch (101 decoders and about 216 MB after 100 turns at the default config)."""
    org = mg.Organism(mg.Config(warmup_steps=20), corpus=seed_corpus_lines())
    org.warmup()

    def turn(i: int) -> None:
        org.generate("hello")
        org.observe(f"line {i} about rivers and trees", speaker="H")
        org.train_burst()

    for i in range(5):  # warm-up turns: pools, caches and allocator arenas reach their size
        turn(i)
    gc.collect()
    rss_before = _rss_bytes()
    for i in range(5, 105):
        turn(i)
    gc.collect()
    pooled = len(org._generator._pool)
    assert pooled <= 8
    assert _live_decoders() <= pooled
    grown = (_rss_bytes() - rss_before) / 1e6
    assert grown < 25, f"resident memory grew by {grown:.1f} MB over 100 chat turns"


def test_a_field_counted_in_pieces_equals_one_counted_at_once():
    """CorpusField.add merges new n-grams into its sorted tables: after any sequence of adds the
    tables equal those of one field built from all the sequences together."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        V = int(rng.integers(2, 12))
        seqs = [list(rng.integers(0, V, int(rng.integers(0, 9)))) for _ in range(int(rng.integers(1, 25)))]
        whole = CorpusField(V, seqs)
        pieces = CorpusField(V)
        cut = sorted(rng.integers(0, len(seqs) + 1, 3))
        for a, b in zip([0, *cut], [*cut, len(seqs)]):
            pieces.add(seqs[a:b])
        for name in ("unigrams", "bigram_keys", "bigram_counts", "trigram_keys", "trigram_counts"):
            x, y = getattr(pieces, name), getattr(whole, name)
            assert x.dtype == y.dtype and np.array_equal(x, y), (trial, name)
