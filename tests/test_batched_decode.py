"""Batched decoding (_decode.Batch, Generator.run_many, Organism.run(n=)): every sequence of a
batch produces exactly what it produces alone -- bit-identical logits at every step, the same
tokens, texts and stop reasons -- whatever the other sequences do; bad input is refused with a
clear exception; a dropped batch frees itself and its decoders."""
from __future__ import annotations

import gc
import threading
import time
import os
import subprocess
import sys

import numpy as np
import pytest

import molecule_gpt as mg
from molecule_gpt import _decode
from molecule_gpt.errors import GenerationError
from molecule_gpt.field import CorpusField
from molecule_gpt.generation import Generator, SamplingParams, fold_weights
from molecule_gpt.tokenizer import EvolvingTokenizer

LINES = [
    "the cat sat on the mat.",
    "a dog ran to the park!",
    "is the sun hot? yes it is.",
    "we like to read books at night.",
    "birds sing in the early morning.",
] * 4


def make_model(dtype, n_embd, V=37, block_size=8, seed=0):
    heads = ("content", "rrpram", "hybrid", "hybrid") if n_embd % 8 == 0 else ("content", "hybrid")
    cfg = mg.Config(n_layer=2, n_embd=n_embd, n_head=len(heads), block_size=block_size, head_types=heads,
                    delta_rank=3)
    m = mg.Model(cfg, V, dtype=dtype, seed=seed, n_threads=1)
    m.add_delta_module(alpha=0.7)
    return m


def begin_kwargs(V, k, **over):
    """Sampling settings that differ per sequence k: greedy and hot, top-k/top-p/min-p/typical-p
    on and off, a frequency penalty, and different token limits."""
    banned = np.zeros(V, np.uint8)
    banned[[0, 1]] = 1
    ends = np.zeros(V, np.uint8)
    kw = dict(temperature=(0.0, 0.9, 1.4)[k % 3], entropy_low=0.5, entropy_high=1.5, boost=1.2, focus=0.8,
              min_p=(0.0, 0.05)[k % 2], typical_p=(1.0, 0.9)[k % 2], top_p=(0.9, 1.0)[k % 2],
              top_k=(0, 5, 11)[k % 3], freq_penalty=(0.0, 0.6)[k % 2], model_alpha=1.0, field=None,
              max_new=(3, 25, 13, 7, 19)[k % 5], min_new=2, rep_guard=0, eos=2, banned=banned, sentence_end=ends,
              seed=1000 + k)
    kw.update(over)
    return kw


def started(w, V, T, prompts, **over):
    decs = []
    for k, p in enumerate(prompts):
        d = _decode.Decoder(w, V, T)
        d.begin(p, **begin_kwargs(V, k, **over))
        decs.append(d)
    return decs


def _mask_even_tokens(ids, logits):
    out = np.array(logits, copy=True)
    out[::2] = -np.inf
    out[3] = 0.0  # never everything masked
    return out


def prompts_for(V, B, seed=0, longest=12):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, V, int(rng.integers(1, longest + 1)))) for _ in range(B)]


# ---------------------------------------------------------------------------------------------
# the native batch against single decoders


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_embd", [20, 64])  # K = 20 runs the kernels' tails; 64 the cache blocks
@pytest.mark.parametrize("n_threads", [1, 2])
def test_batched_logits_are_bit_identical_to_single_decoding_at_every_step(dtype, n_embd, n_threads):
    """Every sequence's logits after every step equal, bit for bit, those of the same sequence
    decoded alone: different prompt lengths (some longer than the window), window refills (block 8),
    sequences ending at different steps (then the batch shrinks: 7, 6, ... rows, down to the one-
    and two-row blocks of the product)."""
    m = make_model(dtype, n_embd)
    w, V, T = fold_weights(m), m.vocab_size, m.config.block_size
    prompts = prompts_for(V, 7)
    solo = started(w, V, T, prompts)
    want = []  # want[k][s]: (tokens, reason, logits bytes) of sequence k after step s
    for d in solo:
        steps = []
        while True:
            ids, reason = d.run(1)
            steps.append((ids, reason, d.logits.tobytes()))
            if reason is not None:
                break
        want.append(steps)
    decs = started(w, V, T, prompts)
    batch = _decode.Batch(decs, n_threads)
    assert batch.size == 7 and batch.n_threads == n_threads
    lengths = {len(s) for s in want}
    assert len(lengths) > 2  # the sequences really end at different steps
    for s in range(max(lengths)):
        out = batch.run(1)
        for k, d in enumerate(decs):
            if s < len(want[k]):
                ids, reason, logits = want[k][s]
                assert out[k] == (ids, reason), (k, s)
                if reason is None:
                    assert d.logits.tobytes() == logits, f"sequence {k} step {s}: logits differ"
            else:
                assert out[k] == ([], None)  # finished: left the batch
    assert all(d.is_finished for d in decs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_batched_product_rows_equal_single_row_products(dtype, n_threads):
    """The product of a batched step (split by weight rows over the threads, cache-blocked):
    row i of X W^T is bit-identical to the product of row i alone, for widths with and without
    8-float tails, row counts with 4-row tails and blocks, and 1 .. 17 input rows (every tile
    shape of the AVX-512 path: rows dealt over tiles of up to 8, several panels at once)."""
    rng = np.random.default_rng(0)
    for nin in (20, 64, 72, 288):
        for nout in (37, 216, 576):
            W = rng.standard_normal((nout, nin)).astype(dtype)
            X = rng.standard_normal((17, nin)).astype(dtype)
            for rows in range(1, 18):
                Y = _decode._linear_rows(W, X[:rows].copy(), n_threads)
                for i in range(rows):
                    assert Y[i].tobytes() == _decode._linear_rows(W, X[i:i + 1].copy(), 1)[0].tobytes(), \
                        (nin, nout, rows, i)
                assert np.allclose(Y, X[:rows] @ W.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        _decode._linear_rows(W, X.astype(np.float32 if dtype == np.float64 else np.float64))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batch_run_to_the_end_equals_single_runs(dtype):
    """One run() call to the end: each sequence's tokens and stop reason (EOS, max tokens, a
    sentence end, a repetition) are those of its own Decoder.run, in a batch of 12 whose members
    stop at different steps."""
    m = make_model(dtype, 32, V=29, block_size=16)
    w, V, T = fold_weights(m), m.vocab_size, m.config.block_size
    prompts = prompts_for(V, 12, seed=1, longest=20)
    ends = np.zeros(V, np.uint8)
    ends[[5, 9]] = 1
    over = dict(sentence_end=ends, rep_guard=2, max_new=40, min_new=3)
    want = [d.run(1000) for d in started(w, V, T, prompts, **over)]
    got = _decode.Batch(started(w, V, T, prompts, **over)).run(1000)
    assert got == want
    assert {r for _, r in want} >= {"eos", "sentence"}  # the stops differ between sequences


def test_rows_count_the_positions_the_model_runs():
    """Decoder.rows: the prompt's positions, one a token, and a window refill's (the last T // 2
    tokens and the new one) each time the window is full; a batch's sequences count as they do
    alone."""
    m = make_model("float32", 32, V=29, block_size=8)
    w, V, T = fold_weights(m), m.vocab_size, m.config.block_size
    dec = _decode.Decoder(w, V, T)
    dec.prefill([3, 4, 5])
    n, want = 3, 3
    assert dec.rows == want
    for tok in [int(t) for t in np.random.default_rng(0).integers(3, V, 25)]:
        dec.feed(tok)
        n, want = (n + 1, want + 1) if n < T else (T // 2 + 1, want + T // 2 + 1)
        assert dec.rows == want and len(dec.window) == n
    prompts = prompts_for(V, 5, seed=3, longest=12)
    over = dict(max_new=30, min_new=30)
    alone = started(w, V, T, prompts, **over)
    for d in alone:
        d.run(1000)
    together = started(w, V, T, prompts, **over)
    _decode.Batch(together, 2).run(1000)
    assert [d.rows for d in together] == [d.rows for d in alone]
    assert all(d.rows > min(len(p), T) + 30 for d, p in zip(alone, prompts))  # each refilled its window


@pytest.mark.parametrize("path, env", [("portable", {"MOLECULE_GPT_NO_AVX2": "1"}),
                                       ("avx2", {"MOLECULE_GPT_AVX512": "0"})])
def test_narrower_kernels_batch_identically(path, env):
    """The portable path (no AVX2) and the AVX2 one (on a CPU that would pick AVX-512's tiles) also
    give each row of a batch its single-row arithmetic, in float32 and float64."""
    if path == "avx2" and not _decode.simd_path().startswith("avx"):
        pytest.skip("this CPU has no AVX2")
    code = ("import sys; sys.path.insert(0, %r); import test_batched_decode as t; "
            "from molecule_gpt import _core; assert _core.linear_simd_path() == %r, _core.linear_simd_path(); "
            "t.test_batch_run_to_the_end_equals_single_runs('float32'); "
            "t.test_batch_run_to_the_end_equals_single_runs('float64'); "
            "t.test_batched_product_rows_equal_single_row_products(t.np.float32, 2); print('ok')"
            ) % (os.path.dirname(__file__), path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_processors_and_thread_groups_keep_single_results(n_threads):
    """With logits processors on some sequences (the groups then sample under the GIL) and
    without (each group on its own pool thread), every sequence equals its single run."""
    m = make_model("float32", 32, V=31, block_size=12)
    w, V, T = fold_weights(m), m.vocab_size, m.config.block_size
    prompts = prompts_for(V, 5, seed=2, longest=15)
    procs = [None, (_mask_even_tokens,), None, (_mask_even_tokens, _mask_even_tokens), None]
    want = [d.run(1000, p) for d, p in zip(started(w, V, T, prompts), procs)]
    assert _decode.Batch(started(w, V, T, prompts), n_threads).run(1000, procs) == want
    plain = [d.run(1000) for d in started(w, V, T, prompts)]
    assert _decode.Batch(started(w, V, T, prompts), n_threads).run(1000, [None] * 5) == plain


@pytest.mark.parametrize("n_threads", [1, 2])
def test_no_sampleable_token_raises_generation_error(n_threads):
    m = make_model("float32", 20)
    w, V, T = fold_weights(m), m.vocab_size, m.config.block_size
    decs = started(w, V, T, prompts_for(V, 3), banned=np.ones(V, np.uint8))
    with pytest.raises(GenerationError, match="no token can be sampled"):
        _decode.Batch(decs, n_threads).run(5)


def test_a_finished_decoder_is_skipped_and_limit_is_per_call():
    m = make_model("float32", 20)
    w, V, T = fold_weights(m), m.vocab_size, m.config.block_size
    prompts = prompts_for(V, 3)
    over = dict(max_new=30, min_new=30)
    alone = [d.run(30) for d in started(w, V, T, prompts, **over)]
    decs = started(w, V, T, prompts, **over)
    decs[1].finish()
    batch = _decode.Batch(decs)
    first = batch.run(4)
    assert first[1] == ([], None)
    assert [ids for ids, _ in (first[0], first[2])] == [alone[0][0][:4], alone[2][0][:4]]
    rest = batch.run(100)
    assert first[0][0] + rest[0][0] == alone[0][0] and rest[0][1] == alone[0][1]
    assert batch.run(5) == [([], None)] * 3


def test_bad_batches_are_refused():
    m = make_model("float32", 20)
    w, V, T = fold_weights(m), m.vocab_size, m.config.block_size
    d1, d2 = started(w, V, T, prompts_for(V, 2))
    with pytest.raises(TypeError):
        _decode.Batch([])
    with pytest.raises(TypeError):
        _decode.Batch([d1, "not a decoder"])
    with pytest.raises(ValueError, match="only once"):
        _decode.Batch([d1, d1])
    with pytest.raises(ValueError, match="n_threads"):
        _decode.Batch([d1], 0)
    with pytest.raises(ValueError, match="started"):
        _decode.Batch([d1, _decode.Decoder(w, V, T)])
    other = _decode.Decoder(fold_weights(m), V, T)  # the same model, another Weights object
    other.begin([3, 4], **begin_kwargs(V, 0))
    with pytest.raises(ValueError, match="share one Weights"):
        _decode.Batch([d1, other])
    with pytest.raises(ValueError, match="one entry per decoder"):
        _decode.Batch([d1, d2]).run(3, processors=[None])


def _live(kind) -> int:
    return sum(type(o) is kind for o in gc.get_objects())


def test_a_dropped_batch_frees_itself_and_its_decoders():
    """No reference cycle: dropping the last reference frees the Batch and its Decoders at once
    (without the cycle collector)."""
    m = make_model("float32", 20)
    w, V, T = fold_weights(m), m.vocab_size, m.config.block_size
    gc.collect()
    before = (_live(_decode.Batch), _live(_decode.Decoder))
    gc.disable()
    try:
        batch = _decode.Batch(started(w, V, T, prompts_for(V, 4)))
        batch.run(5)
        assert (_live(_decode.Batch), _live(_decode.Decoder)) == (before[0] + 1, before[1] + 4)
        del batch
        assert (_live(_decode.Batch), _live(_decode.Decoder)) == before
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------
# the public API


@pytest.fixture(scope="module")
def tok():
    return EvolvingTokenizer(LINES, mg.Config())


@pytest.fixture(scope="module", params=["float32", "float64"])
def trained(request, tok):
    cfg = mg.Config(n_layer=2, n_embd=32, n_head=4, block_size=24, head_types=("content", "content", "hybrid", "rrpram"))
    m = mg.Model(cfg, tok.vocab_size, dtype=request.param, seed=3, n_threads=1)
    rng = np.random.default_rng(0)
    data = [tok.encode(line) for line in LINES]
    for _ in range(40):
        m.train_step([data[i] for i in rng.integers(0, len(data), 4)], 0.01)
    return m


KINDS = [
    dict(temperature=0.0, max_gen_tokens=30, min_gen_tokens=30, repetition_guard=0),
    dict(temperature=0.9, top_k=5, seed=1),
    dict(temperature=1.3, top_k=0, top_p=0.8, min_p=0.0, typical_p=1.0, seed=2),
    dict(temperature=1.0, min_p=0.2, frequency_penalty=1.5, seed=3, max_gen_tokens=50),
    dict(seed=4, stop=("e",)),
    dict(seed=5, stop=("the", "at"), temperature=1.2, min_gen_tokens=0),
    dict(seed=6, logits_processors=(_mask_even_tokens,)),
    dict(seed=7, model_alpha=0.5),
    dict(seed=8, model_alpha=0.0, max_gen_tokens=20),
    dict(seed=9, max_gen_tokens=0),
    dict(seed=10, min_gen_tokens=0, max_gen_tokens=200),
]
KIND_PROMPTS = ["the cat", "a", "we like to read books at night and then", None, "is the sun hot?",
                "birds", "the", "a dog", "the cat", "x", "the park"]


def _prompts(tok):
    return [p if p is not None else [tok.bos_id] for p in KIND_PROMPTS]


def test_run_many_equals_single_runs_for_every_kind_of_sequence(tok, trained):
    """run_many with one SamplingParams per prompt: greedy and sampled, top-k/top-p/min-p,
    frequency penalty, stop strings, logits processors, field blending and the field alone, a
    zero token budget -- each result equals run() with the same params."""
    field = CorpusField(tok.vocab_size, [tok.encode(line) for line in LINES])
    g = Generator(trained, tok, field)
    kinds, prompts = KINDS, _prompts(tok)
    params = [g.params(**k) for k in kinds]
    want = [g.run(p, **k) for p, k in zip(prompts, kinds)]
    got = g.run_many(prompts, params)
    assert got == want
    reasons = {r.stop_reason for r in want}
    assert "stop_string" in reasons and "max_tokens" in reasons and len(reasons) >= 3
    assert len({len(r.ids) for r in want}) > 4  # the sequences end at different steps
    # the same prompt and params with seeds side by side: distinct continuations, each its own
    same = g.run_many(["the"] * 4, [g.params(seed=s, temperature=1.2) for s in range(4)])
    assert same == [g.run("the", seed=s, temperature=1.2) for s in range(4)]
    assert len({r.text for r in same}) > 1


def test_run_many_overrides_and_validation(tok, trained):
    g = Generator(trained, tok)
    assert g.run_many(["the", "a"], seed=3, max_gen_tokens=10) == [g.run(p, seed=3, max_gen_tokens=10)
                                                                  for p in ("the", "a")]
    p2 = SamplingParams(seed=2, temperature=1.1)  # one SamplingParams for every prompt
    assert g.run_many(["the", "a"], p2) == [g.run_begun(g.begin(p, p2), p2) for p in ("the", "a")]
    with pytest.raises(GenerationError, match="non-empty list"):
        g.run_many([])
    with pytest.raises(GenerationError, match="non-empty list"):
        g.run_many("the cat")
    with pytest.raises(GenerationError, match="either params or keyword"):
        g.run_many(["a"], g.params(), seed=1)
    with pytest.raises(GenerationError, match="one per prompt"):
        g.run_many(["a", "b"], [g.params()])
    with pytest.raises(GenerationError, match="unknown generation parameter"):
        g.run_many(["a"], tempreature=1.0)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        g.run_many(["a", [10 ** 6]])
    assert len(g._pool) <= 8  # decoders begun before the bad prompt went back to the pool


def test_organism_n_equals_single_calls_with_consecutive_seeds():
    org = mg.Organism(mg.Config(n_layer=1, n_embd=32, n_head=4, block_size=32,
                                head_types=("content", "content", "hybrid", "rrpram")), corpus=LINES)
    try:
        for over in (dict(seed=5), dict(seed=9, stop=("e",)), dict(seed=2, temperature=0.0),
                     dict(seed=7, top_k=3, frequency_penalty=0.7, max_gen_tokens=12)):
            many = org.run("the cat", n=4, **over)
            assert isinstance(many, list) and len(many) == 4
            assert many == [org.run("the cat", **{**over, "seed": over["seed"] + k}) for k in range(4)]
        texts = org.generate("a dog", n=3, seed=1, max_gen_tokens=15)
        assert texts == [org.generate("a dog", seed=1 + k, max_gen_tokens=15) for k in range(3)]
        assert len(org.run("the", n=2)) == 2  # no seed: fresh entropy per continuation
        for bad in (0, -2, 1.5, True, "3"):
            with pytest.raises(GenerationError, match="n must be a positive int"):
                org.run("the", n=bad)
    finally:
        org.close()


# ---------------------------------------------------------------------------------------------
# the decode loop: generations from many callers decoded together


def test_a_failed_sequence_is_reported_without_raising_when_asked():
    m = make_model("float32", 20)
    w, V, T = fold_weights(m), m.vocab_size, m.config.block_size
    prompts = prompts_for(V, 3)
    alone = [d.run(1) for d in started(w, V, T, prompts)]
    decs = started(w, V, T, prompts)
    decs[1].begin(prompts[1], **begin_kwargs(V, 1, banned=np.ones(V, np.uint8)))
    got = _decode.Batch(decs).run(1, raise_failed=False)
    assert got[1] == ([], "no_token") and decs[1].is_finished
    assert [got[0], got[2]] == [alone[0], alone[2]]


def test_the_decode_loop_gives_every_generation_its_own_result(tok, trained):
    """Generations of every kind joined at once: each result and each stream of pieces equals
    the generator's own run() and stream(); those on the model's weights share their steps."""
    field = CorpusField(tok.vocab_size, [tok.encode(line) for line in LINES])
    g = Generator(trained, tok, field)
    prompts = _prompts(tok)
    want = [g.run(p, **k) for p, k in zip(prompts, KINDS)]
    pieces = [list(g.stream(p, **k)) for p, k in zip(prompts, KINDS)]
    loop = mg.DecodeLoop()
    try:
        params = [g.params(**k) for k in KINDS]
        joined = loop.join_all([(g, g.begin(p, q), q) for p, q in zip(prompts, params)])
        assert [j.result(timeout=60) for j in joined] == want
        # sequences on the model alone (not the processor's, not the field-only one, not the empty one)
        assert loop.largest == len(KINDS) - 3
        assert loop.rows > loop.steps
        joined = loop.join_all([(g, g.begin(p, q), q) for p, q in zip(prompts, params)])
        assert [list(j) for j in joined] == pieces
        assert len(g.in_flight) == 0  # every decoder was given back
    finally:
        loop.close()


def test_threads_submitting_at_once_share_steps_and_keep_their_results():
    org = mg.Organism(mg.Config(n_layer=1, n_embd=32, n_head=4, block_size=24,
                                head_types=("content", "content", "hybrid", "rrpram")), corpus=LINES)
    try:
        over = dict(max_gen_tokens=150, min_gen_tokens=150, repetition_guard=0, model_alpha=1.0)
        want = [org.run("the cat", seed=s, **over) for s in range(8)]
        barrier = threading.Barrier(8)
        got = [None] * 8

        def client(s):
            barrier.wait()
            got[s] = org.submit("the cat", seed=s, **over).result(timeout=60)

        threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == want
        loop = org._decode_loop
        assert loop.rows > loop.steps  # some steps advanced several requests in one forward
        three = org.submit("the cat", n=3, seed=4, **over)
        assert [j.result(timeout=60) for j in three] == org.run("the cat", n=3, seed=4, **over)
    finally:
        org.close()


def test_generations_on_older_weights_keep_them(tok):
    """A generation begun before a training step finishes on the weights it began with, in a
    step of its own; one begun after uses the new weights."""
    cfg = mg.Config(n_layer=1, n_embd=32, n_head=4, block_size=24, head_types=("content", "content", "hybrid", "rrpram"))
    m = mg.Model(cfg, tok.vocab_size, seed=3, n_threads=1)
    g = Generator(m, tok)
    over = dict(seed=2, max_gen_tokens=40, min_gen_tokens=40, repetition_guard=0)
    before = g.run("the cat", **over)
    params = g.params(**over)
    first = g.begin("the cat", params)
    data = [tok.encode(line) for line in LINES[:4]]
    m.train_step(data, 0.05)
    after = g.run("the cat", **over)
    assert after != before
    second = g.begin("the cat", params)
    loop = mg.DecodeLoop()
    try:
        joined = loop.join_all([(g, first, params), (g, second, params)])
        assert [j.result(timeout=60) for j in joined] == [before, after]
        assert loop.largest == 1
    finally:
        loop.close()


def test_one_failing_generation_does_not_disturb_the_others(tok, trained):
    g = Generator(trained, tok)
    over = dict(seed=1, max_gen_tokens=30, min_gen_tokens=30, repetition_guard=0)
    want = g.run("the cat", **over)
    calls = []

    def fails_on_the_fifth_token(ids, logits):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("processor broke")
        return logits

    good, broken = g.params(**over), g.params(**over, logits_processors=(fails_on_the_fifth_token,))
    w, V, T = g.weights.get(), trained.vocab_size, trained.config.block_size
    no_token = _decode.Decoder(w, V, T)  # every token banned: nothing can be sampled
    no_token.begin([tok.bos_id], **begin_kwargs(V, 0, banned=np.ones(V, np.uint8)))
    loop = mg.DecodeLoop()
    try:
        a, b, c = loop.join_all([(g, g.begin("the cat", good), good), (g, g.begin("a", broken), broken),
                                 (g, no_token, good)])
        assert a.result(timeout=60) == want
        with pytest.raises(RuntimeError, match="processor broke"):
            b.result(timeout=60)
        with pytest.raises(GenerationError, match="no token can be sampled"):
            c.result(timeout=60)
        with pytest.raises(RuntimeError, match="processor broke"):
            list(b)
    finally:
        loop.close()


def test_listen_cancel_close_and_the_idle_thread(tok, trained):
    g = Generator(trained, tok)
    loop = mg.DecodeLoop(idle_seconds=0.05)
    try:
        short = g.params(seed=3, max_gen_tokens=20)
        j = loop.join(g, g.begin("the", short), short)
        result = j.result(timeout=60)
        heard = []
        j.listen(heard.append)  # pieces that came before are replayed, then the end
        assert heard[-1] is None and "".join(heard[:-1]) == result.text == g.generate("the", seed=3, max_gen_tokens=20)
        with pytest.raises(GenerationError, match="already has a listener"):
            j.listen(print)
        with pytest.raises(GenerationError, match="go to its listener"):
            list(j)

        endless = g.params(seed=1, max_gen_tokens=10 ** 6, min_gen_tokens=10 ** 6, repetition_guard=0)
        j = loop.join(g, g.begin("the", endless), endless)
        first = next(iter(j))
        assert first
        j.cancel()
        r = j.result(timeout=60)
        assert r.stop_reason == "cancelled" and 0 < len(r.ids) < 10 ** 6
        assert len(g.in_flight) == 0

        deadline = time.monotonic() + 10
        while loop._thread is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop._thread is None  # idle: the thread ended
        assert loop.join(g, g.begin("the", short), short).result(timeout=60) == result  # and starts again

        j = loop.join(g, g.begin("the", endless), endless)
        next(iter(j))
        loop.close()
        with pytest.raises(GenerationError, match="closed before this generation finished"):
            j.result(timeout=60)
        with pytest.raises(GenerationError, match="closed"):
            loop.join(g, g.begin("the", short), short).result(timeout=60)
        never_joined = mg.SubmittedGeneration(g, g.begin("the", short), short)
        with pytest.raises(GenerationError, match="did not finish within"):
            never_joined.result(timeout=0.01)
    finally:
        loop.close()


def test_a_failing_decode_loop_ends_its_generations_and_the_next_join_starts_anew(tok, trained, monkeypatch):
    g = Generator(trained, tok)
    p = g.params(seed=1, max_gen_tokens=10)
    loop = mg.DecodeLoop()
    real = mg.DecodeLoop._step

    def broken(self, members, cached):
        raise RuntimeError("step broke")

    try:
        monkeypatch.setattr(mg.DecodeLoop, "_step", broken)
        j = loop.join(g, g.begin("the", p), p)
        with pytest.raises(GenerationError, match="decode loop failed.*step broke"):
            j.result(timeout=60)
        monkeypatch.setattr(mg.DecodeLoop, "_step", real)
        assert loop.join(g, g.begin("the", p), p).result(timeout=60) == g.run("the", seed=1, max_gen_tokens=10)
        assert len(g.in_flight) == 0
    finally:
        loop.close()
