"""bfloat16 decode weights (Config.decode_precision, an opt-in): the rounding, the products on
both instruction paths, decoding that follows the rounded model, batched rows that keep their
single-row arithmetic, the organism's report of what it costs, and refusals that say why."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import molecule_gpt as mg
from molecule_gpt import _decode, cli, status
from molecule_gpt.errors import ConfigError
from molecule_gpt.generation import Generator, decoded_nats, fold_weights
from molecule_gpt.heldout import HeldOut
from molecule_gpt.tokenizer import EvolvingTokenizer

LINES = ["the cat sat on the mat.", "a dog ran to the park!", "is the sun hot? yes it is.",
         "we like to read books at night.", "birds sing in the early morning."] * 4
MATRICES = ("wq", "wk", "wv", "wo", "fc_g", "fc_v", "fc2")


def nearest_bfloat16(x: np.ndarray) -> np.ndarray:
    """Reference rounding: of the two bfloat16 values around each float32 (truncated, and the
    next one up in magnitude), the nearer, ties to the even one; computed in float64."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    lo = (u >> 16).astype(np.uint32)
    hi = lo + 1

    def as_float(b):
        return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)

    with np.errstate(invalid="ignore"):  # infinities: inf - inf is NaN, and NaN never picks hi
        d_lo = np.abs(x.astype(np.float64) - as_float(lo))
        d_hi = np.abs(as_float(hi) - x.astype(np.float64))
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (lo % 2 == 1))
    return np.where(pick_hi, hi, lo).astype(np.uint16)


def test_rounding_is_to_nearest_even_and_exact_back():
    rng = np.random.default_rng(0)
    x = np.concatenate([(rng.standard_normal(20000) * 10.0 ** rng.integers(-30, 30, 20000)).astype(np.float32),
                        # exact ties between two bfloat16 values, both parities of the lower one
                        (np.arange(0x3F800000, 0x3F800000 + 64 * 0x10000, 0x10000, dtype=np.uint32)
                         + 0x8000).view(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -3e38], np.float32)])
    bits = _decode.bfloat16_bits(x)
    assert bits.dtype == np.uint16 and bits.shape == x.shape
    assert (bits == nearest_bfloat16(x)).all()
    back = _decode.bfloat16_values(bits)
    assert (_decode.bfloat16_bits(back) == bits).all()  # bfloat16 values round to themselves
    normal = np.isfinite(x) & (np.abs(x) >= np.finfo(np.float32).tiny)
    assert np.all(np.abs(back[normal] - x[normal]) <= np.abs(x[normal]) * 2.0 ** -8)
    assert (back[np.isinf(x)] == x[np.isinf(x)]).all()
    assert np.isnan(_decode.bfloat16_values(_decode.bfloat16_bits(np.array([np.nan], np.float32))))[0]


def product_cases():
    rng = np.random.default_rng(1)
    for nin in (20, 72, 256, 13):
        for nout in (37, 216):
            yield rng.standard_normal((nout, nin)).astype(np.float32), rng.standard_normal((7, nin)).astype(np.float32)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_bfloat16_products_are_the_widened_weights_products_and_rows_keep_their_arithmetic(n_threads):
    """A product on bfloat16 panels is, bit for bit, the float32 product of the rounded weights
    (widening is exact and the arithmetic is the same), and each row of it is the row alone."""
    for W, X in product_cases():
        rounded = _decode.bfloat16_values(_decode.bfloat16_bits(W))
        want = X.astype(np.float64) @ rounded.astype(np.float64).T
        for rows in (1, 2, 3, 7):
            Y = _decode._linear_rows(W, X[:rows].copy(), n_threads, bf16=True)
            assert Y.dtype == np.float32
            np.testing.assert_allclose(Y, want[:rows], rtol=1e-5, atol=1e-5)
            assert Y.tobytes() == _decode._linear_rows(rounded, X[:rows].copy(), n_threads).tobytes()
            for i in range(rows):
                assert Y[i].tobytes() == _decode._linear_rows(W, X[i:i + 1].copy(), 1, bf16=True)[0].tobytes()
    with pytest.raises(TypeError, match="float32 weights"):
        _decode._linear_rows(W.astype(np.float64), X.astype(np.float64), bf16=True)


def test_portable_bfloat16_products_too():
    code = ("import sys; sys.path.insert(0, %r); import test_decode_precision as t; "
            "from molecule_gpt import _decode; assert _decode.simd_path() == 'portable'; "
            "t.test_bfloat16_products_are_the_widened_weights_products_and_rows_keep_their_arithmetic(2); "
            "t.test_a_batch_of_bfloat16_sequences_equals_their_single_runs(); print('ok')") % os.path.dirname(__file__)
    env = dict(os.environ, MOLECULE_GPT_NO_AVX2="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.fixture(scope="module")
def tok():
    return EvolvingTokenizer(LINES, mg.Config())


def trained_model(tok, precision="model", dtype="float32", delta=True):
    cfg = mg.Config(n_layer=2, n_embd=32, n_head=4, block_size=16, head_types=("content", "content", "hybrid", "rrpram"),
                    decode_precision=precision)
    m = mg.Model(cfg, tok.vocab_size, dtype=dtype, seed=3, n_threads=1)
    if delta:
        m.add_delta_module(alpha=0.6)
    rng = np.random.default_rng(0)
    data = [tok.encode(line) for line in LINES]
    for _ in range(30):
        m.train_step([data[i] for i in rng.integers(0, len(data), 4)], 0.01)
    return m


def round_matrices_in_place(m):
    """Round the base product matrices (and wte, which lm_head ties to) to bfloat16 values."""
    base = m.groups["base"].params
    for name in ["wte"] + [f"l{i}.{k}" for i in range(m.config.n_layer) for k in MATRICES]:
        base[name][...] = _decode.bfloat16_values(_decode.bfloat16_bits(base[name]))
    m.refresh()


def test_bfloat16_decoding_is_the_rounded_models_function_at_every_step(tok):
    """A bfloat16 decode (prefill, steps across a window refill) computes, bit for bit, what a
    float32 decode of the weights rounded to bfloat16 computes (the same numbers, widened
    exactly, the same arithmetic), and what the training forward of that rounded model computes;
    the unrounded model differs by the rounding's small amount."""
    m = trained_model(tok, delta=False)
    V, T = m.vocab_size, m.config.block_size
    d_orig = _decode.Decoder(fold_weights(m, "model"), V, T)
    round_matrices_in_place(m)
    w16, w32 = fold_weights(m, "bfloat16"), fold_weights(m, "model")
    assert w16.bf16 and not w32.bf16
    d16, d32 = _decode.Decoder(w16, V, T), _decode.Decoder(w32, V, T)
    rng = np.random.default_rng(2)
    window = [int(t) for t in rng.integers(3, V, 5)]
    outs = [d.prefill(window).copy() for d in (d16, d32, d_orig)]
    worst_rounding = 0.0
    for step in range(T + 6):  # crosses a window refill
        ref = m.logits(window)[-1]
        scale = max(1.0, float(np.abs(ref).max()))
        assert outs[0].tobytes() == outs[1].tobytes(), step  # the same arithmetic on the same numbers
        assert np.abs(outs[0] - ref).max() / scale < 1e-4, step
        worst_rounding = max(worst_rounding, float(np.abs(outs[2] - outs[0]).max()) / scale)
        t = int(rng.integers(3, V))
        outs = [d.feed(t).copy() for d in (d16, d32, d_orig)]
        window = window + [t] if len(window) < T else window[T - T // 2:] + [t]
    assert 1e-5 < worst_rounding < 5e-2


def test_a_batch_of_bfloat16_sequences_equals_their_single_runs(tok=None):
    tok = tok or EvolvingTokenizer(LINES, mg.Config())
    m = trained_model(tok, precision="bfloat16")
    g = Generator(m, tok)
    prompts = ["the cat", "a", "we like to read", "birds", "is the sun", "the park"]
    params = [g.params(seed=k, temperature=(0.0, 0.9)[k % 2], max_gen_tokens=40) for k in range(len(prompts))]
    many = g.run_many(prompts, params)
    single = [g.run_begun(g.begin(p, pk), pk) for p, pk in zip(prompts, params)]
    assert [r.ids for r in many] == [r.ids for r in single]
    assert g.weights.get().bf16


def test_generator_config_and_model_config_choose_the_weights(tok):
    m = trained_model(tok)
    g32 = Generator(m, tok)
    g16 = Generator(m, tok, config=m.config.replace(decode_precision="bfloat16"))
    assert not g32.weights.get().bf16 and g16.weights.get().bf16
    m.config.decode_precision = "bfloat16"  # the model's config: its generators follow at the next fold
    assert g32.weights.get().bf16
    m.config.decode_precision = "model"
    assert not g32.weights.get().bf16


def test_weights_count_the_bytes_a_token_streams(tok):
    """matrix_bytes: the packed matrices a batch-1 token reads through the products (q/k/v,
    output, gate/value and down projections per layer, the pattern matrices of rrpram and
    hybrid heads, the output matrix): panels of 16 columns, zero-padded, in the weights' type
    (bfloat16: half of float32). Benchmarks divide the read probe's rate by it."""
    m = trained_model(tok)
    c, V = m.config, m.vocab_size
    C, F, T, d = c.n_embd, 4 * c.n_embd, c.block_size, c.head_dim

    def panels(nout, nin):
        return -(-nout // 16) * 16 * nin

    patterns = sum(kind != "content" for kind in c.head_types)
    per_layer = panels(3 * C, C) + panels(C, C) + panels(2 * F, C) + panels(C, F) + patterns * panels(T, d)
    elements = c.n_layer * per_layer + panels(V, C)
    w32 = Generator(m, tok).weights.get()
    w16 = Generator(m, tok, config=c.replace(decode_precision="bfloat16")).weights.get()
    assert w32.matrix_bytes == 4 * elements
    # the pattern matrices stay float32 (they are not rounded); every other matrix halves
    assert w16.matrix_bytes == 2 * (elements - c.n_layer * patterns * panels(T, d)) + \
        4 * c.n_layer * patterns * panels(T, d)


def test_decoded_nats_is_the_heldout_definition(tok):
    """The decoder's held-out loss a token at a time equals the training engine's on the same
    windows (molecule_gpt.heldout), with float32 weights."""
    m = trained_model(tok)
    held = HeldOut(LINES[:5], tok.encode, lambda: tok.version)
    windows = held.windows(m.config.block_size)
    assert decoded_nats(fold_weights(m, "model"), windows) == pytest.approx(held.total_nats(m), rel=1e-5)


def test_refusals_name_the_problem(tok):
    with pytest.raises(ConfigError, match="decode_precision"):
        mg.Config(decode_precision="half")
    m64 = trained_model(tok, dtype="float64")
    with pytest.raises(ConfigError, match="needs a float32 model"):
        fold_weights(m64, "bfloat16")
    m64.config.decode_precision = "bfloat16"
    with pytest.raises(ConfigError, match="needs a float32 model"):
        Generator(m64, tok).generate("the cat", seed=0)
    m = trained_model(tok)
    w = fold_weights(m, "model")
    with pytest.raises(TypeError, match="float32 model"):
        _decode.Weights(1, 8, 2, 4, ["content"] * 2, "relu", np.zeros((5, 8)), np.zeros((4, 8)),
                        np.zeros((5, 8)), np.zeros((4, 2)), np.zeros((4, 2)), [None], bf16=True)
    with pytest.raises(ValueError, match="float32 array"):
        _decode.Weights(1, 8, 2, 4, ["content"] * 2, "relu", np.zeros((5, 8), np.float32),
                        np.zeros((4, 8), np.float32), np.zeros((5, 8), np.uint16), np.zeros((4, 2), np.float32),
                        np.zeros((4, 2), np.float32), [None], bf16=True)
    assert not w.bf16
    for bad in (np.zeros(5, np.float32), np.zeros((4, 6), np.int64), np.zeros((6, 4), np.float32).T, [[1.0]]):
        with pytest.raises(ValueError, match="2-D C-contiguous float32 or float64"):
            _decode.pack_weight(bad)
    with pytest.raises(TypeError, match="float32 weights"):
        _decode.pack_weight(np.zeros((4, 6)), bf16=True)


def test_the_organism_reports_what_bfloat16_costs(tmp_path):
    org = mg.Organism(mg.Config(warmup_steps=150), corpus=LINES * 3, seed=1)
    org.warmup()
    assert status.status_document(org)["decode_weights"] == {"precision": "model", "heldout_change": None,
                                                                 "measured_at_step": None}
    org.config.decode_precision = "bfloat16"
    text = status.status_text(status.status_document(org))
    assert "decode weights bfloat16 (not measured yet)" in text
    report = org.decode_precision_report()
    assert report["decode_precision"] == "bfloat16"
    assert report["heldout_model"] == pytest.approx(org.heldout_loss(), rel=1e-5)
    assert report["change"] == pytest.approx(report["heldout_decode"] / report["heldout_model"] - 1)
    assert 0 < abs(report["change"]) < 0.01
    doc = status.status_document(org)
    assert doc["decode_weights"] == {"precision": "bfloat16", "heldout_change": report["change"],
                                     "measured_at_step": org.trainer.steps}
    assert "held-out loss" in status.status_text(doc)
    assert any(r.get("phase") == "decode_precision" for r in org.telemetry)
    assert org.generate("the cat", seed=1)  # generation runs on the bfloat16 weights
    assert org._generator.weights.get().bf16
    assert org.decode_precision_report(lines=["a line nobody heard before."])["heldout_model"] > 0


def test_generate_on_the_command_line_reports_the_cost(tmp_path, capsys):
    home = str(tmp_path / "h")
    assert cli.main(["train", "--home", home, "--steps", "40"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--home", home, "the sea", "--seed", "1", "--max-tokens", "12",
                     "--decode-precision", "bfloat16"]) == 0
    out, err = capsys.readouterr()
    assert "bfloat16 decode weights: held-out loss" in err and "nats/char" in err
    assert out.strip()


def test_a_float64_organism_refuses_bfloat16_where_it_is_set(tmp_path, capsys):
    """Born (Python or a home's config file) or told by a config file on an existing home: a
    float64 organism with decode_precision "bfloat16" is refused with the reason before anything
    is generated; the command line says it in one line and exits 1."""
    with pytest.raises(ConfigError, match="needs a float32 model"):
        mg.Organism(mg.Config(decode_precision="bfloat16"), corpus=LINES, dtype="float64")

    def config(name, text):
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    home = str(tmp_path / "h")
    bad = config("bad.json", '{"decode_precision": "bfloat16", "dtype": "float64"}')
    assert cli.main(["train", "--home", home, "--steps", "5", "--config", bad]) == 1
    assert "needs a float32 model" in capsys.readouterr().err
    f64 = config("f64.json", '{"dtype": "float64"}')
    assert cli.main(["train", "--home", home, "--steps", "5", "--config", f64]) == 0
    capsys.readouterr()
    switch = config("switch.json", '{"decode_precision": "bfloat16"}')
    assert cli.main(["generate", "--home", home, "the", "--config", switch]) == 1
    err = capsys.readouterr().err
    assert "needs a float32 model" in err and len(err.strip().splitlines()) <= 2
    assert cli.main(["generate", "--home", home, "the", "--decode-precision", "bfloat16"]) == 1
    assert "needs a float32 model" in capsys.readouterr().err
