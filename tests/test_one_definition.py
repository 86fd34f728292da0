"""Invariants of the native layer's structure (issue 13): each code, each op and each size is
defined in one place, and every path that needs it reads that one definition."""
import pathlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from molecule_gpt import _core, _decode

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "molecule_gpt"
CSRC = ROOT / "csrc"


def native_sources():
    """(path, text) of every hand-written native source: csrc/ and the Cython files."""
    files = sorted(CSRC.glob("*.[ch]")) + sorted(SRC.glob("*.pyx")) + sorted(SRC.glob("*.pxi")) + sorted(SRC.glob("*.pxd"))
    return [(f, f.read_text()) for f in files]


def test_codes_are_the_same_tables_in_both_extensions():
    assert _core.HEAD_TYPES == _decode.HEAD_TYPES == {"content": 0, "rrpram": 1, "hybrid": 2}
    assert _core.ACTIVATIONS == _decode.ACTIVATIONS == {"relu": 0, "silu": 1}
    assert set(_core.OP_CODES) == {"embed", "rmsnorm", "linear", "rope", "attention", "gate", "add",
                                   "cross_entropy"}
    assert len(set(_core.OP_CODES.values())) == len(_core.OP_CODES)


def test_codes_are_defined_once():
    """The head-type, activation and op codes have one definition (csrc/codes.h); no other file
    gives them a value, compares a head type with a bare number or maps names to codes itself."""
    definition = re.compile(r"\b(MG_)?(HEAD_(CONTENT|RRPRAM|HYBRID)|ACT_(RELU|SILU)|OP_[A-Z]+)\b\s*=\s*\d")
    define = re.compile(r"#define\s+MG_(HEAD|ACT|OP)_")
    bare_kind = re.compile(r"\bkind\s*[!=]=\s*\d")
    name_map = re.compile(r"""["'](content|rrpram|hybrid)["']\s*:\s*\d""")
    fused = re.compile(r"ctypedef\s+fused\s+floating")
    where = {"definition": [], "fused floating": []}
    for path, text in native_sources():
        if definition.search(text) or define.search(text):
            where["definition"].append(path.name)
        if fused.search(text):
            where["fused floating"].append(path.name)
        assert not bare_kind.search(text), f"{path.name} compares a head type with a bare number"
        assert not name_map.search(text), f"{path.name} maps head-type names to codes itself"
    assert where["definition"] == ["codes.h"]
    assert where["fused floating"] == ["_molecule.pxd"]


def test_decoder_cimports_the_shared_declarations():
    """_decode.pyx declares none of the shared C headers itself: it cimports _molecule.pxd."""
    text = (SRC / "_decode.pyx").read_text()
    for header in ("fastmath.h", "rows.h", "codes.h", "elementwise.h"):
        assert f'cdef extern from "{header}"' not in text
    assert "from ._molecule cimport" in text


def test_unknown_codes_are_named():
    with pytest.raises(ValueError, match="unknown head type 'sideways'"):
        _core.Engine(1, 8, 2, 4, 10, ["content", "sideways"], "relu", False, 2)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        _core.Engine(1, 8, 2, 4, 10, ["content", "content"], "gelu", False, 2)


# ---------------------------------------------------------------------------------------------
# one definition of each op

# op -> the one function (src/molecule_gpt/_ops.pxd) the tape, the prefill and a decode step call;
# the two ops with kernels in csrc/ are checked below: linear (one product, gemm.h) and attention
# (one set of kernels, attention.h)
FORWARD_OPS = {"embed": "embed_forward", "rmsnorm": "rmsnorm_forward", "rope": "rope_forward",
               "gate": "gate_forward", "add": "add_forward"}
# C helpers of attention (csrc/heads.h) that the training kernels and the decoder's both use
HEAD_HELPERS = ("mg_head_logits_", "mg_softmax_row_")


def function_body(text, header):
    """The source of the function starting at `header` (up to the next top-level definition)."""
    start = text.index(header)
    rest = text[start + len(header):]
    end = re.search(r"\n(cdef |def |cpdef |ctypedef |# -{20})", rest)
    return text[start:start + len(header) + (end.start() if end else len(rest))]


def defined_in(name):
    """Files (native sources) that define a Cython function `name`."""
    pattern = re.compile(r"^cdef\b[^\n(]*\b" + name + r"\(", re.M)
    return [p.name for p, text in native_sources() if pattern.search(text)]


@pytest.mark.parametrize("op", sorted(FORWARD_OPS))
def test_each_forward_op_is_one_function_that_every_path_calls(op):
    fn = FORWARD_OPS[op]
    assert defined_in(fn) == ["_ops.pxd"]
    core = (SRC / "_core.pyx").read_text()
    decode = (SRC / "_decode.pyx").read_text()
    tape = function_body(core, "cdef void run_forward(")
    rows = function_body(decode, "cdef void forward_rows(")
    assert fn + "(" in tape, f"the training tape does not call {fn}"
    assert fn + "(" in rows, f"the decoder's forward does not call {fn}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_decoders_linear_product_is_the_training_steps(dtype):
    """One product for the linear layers: the decoder's (the weight packed once, any number of
    rows, split over threads by weight panels) gives bit for bit what the training step's
    (csrc/gemm.h's NT form, packing as it goes) gives, below and above one pass of K; and
    neither the decoder's header nor its module defines a product of its own."""
    if _core.linear_simd_path() == "portable":
        pytest.skip("the training products run BLAS here (no AVX2): another order of the same sums")
    rng = np.random.default_rng(0)
    for nout, nin in ((37, 20), (216, 72), (72, 288), (300, 600), (1000, 256)):
        W = rng.standard_normal((nout, nin)).astype(dtype)
        X = rng.standard_normal((16, nin)).astype(dtype)
        for rows in (1, 2, 3, 8, 9, 16):
            want = np.zeros((rows, nout), dtype)
            _core._matmul_memview("nt", X[:rows], W, want, 1.0, False)
            for n_threads in (1, 2):
                got = _decode._linear_rows(W, X[:rows].copy(), n_threads)
                assert got.tobytes() == want.tobytes(), (nout, nin, rows, n_threads)
    kernels = (CSRC / "decode_kernels.h").read_text()
    decoder = (SRC / "_decode.pyx").read_text()
    assert not re.search(r"matvec|mg_gemm\w*\s*\(", kernels)
    assert "mg_gemm_packed_" in decoder and not re.search(r"cdef extern from \"gemm.h\"", decoder)
    gemm = (CSRC / "gemm.h").read_text()
    # the packed products are built from the training's register blocks (AVX2 and AVX-512)
    assert "mg_gemm_packed_avx2_f, mg_gemm_block_f," in gemm and "mg_gemm_packed_avx512_f, mg_gemm512_block_f," in gemm


PRODUCTS_HASH = """
import hashlib, numpy as np
from molecule_gpt import _core, _decode
h = hashlib.sha256()
rng = np.random.default_rng(0)
for dt in (np.float32, np.float64):
    for nout, nin in ((37, 20), (216, 72), (72, 288), (300, 600), (17, 13)):
        W = rng.standard_normal((nout, nin)).astype(dt)
        X = rng.standard_normal((13, nin)).astype(dt)
        for rows in (1, 2, 3, 13):
            for nt in (1, 2):
                h.update(_decode._linear_rows(W, X[:rows].copy(), nt).tobytes())
                if dt == np.float32:
                    h.update(_decode._linear_rows(W, X[:rows].copy(), nt, bf16=True).tobytes())
print(_core.linear_simd_path(), h.hexdigest())
"""


def test_the_decoders_products_give_the_same_bits_at_either_vector_width():
    """The decoder's products run the training's AVX-512 blocks where its probe chose them
    (MOLECULE_GPT_AVX512=1 forces it) and the AVX2 ones otherwise: the same sums, the same bits
    (float32, float64, bfloat16 panels; one, two and many rows; split over threads)."""
    assert_same_digest_at_both_widths(PRODUCTS_HASH)


def assert_same_digest_at_both_widths(script):
    """Run `script` (it prints the products' path and a digest) with the AVX-512 kernels forced off
    and on: both digests must be equal (skipped on a CPU with one width)."""
    runs = {}
    for force in ("0", "1"):
        env = dict(os.environ, MOLECULE_GPT_AVX512=force)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        path, digest = proc.stdout.split()
        runs[path] = digest
    if "avx512" not in runs:
        pytest.skip("this CPU has no AVX-512 (or no AVX2): one vector width only")
    assert runs["avx512"] == runs["avx2"]


DECODING_HASH = """
import hashlib, sys, numpy as np
sys.path.insert(0, %r)
import test_batched_decode as t
from molecule_gpt import _core, _decode, _sampling
h = hashlib.sha256()
rng = np.random.default_rng(1)
for V in (5, 8, 15, 16, 17, 23, 31, 32, 33, 100, 636):  # every remainder of 8 and 16 lanes
    z = (3 * rng.standard_normal(V)).astype(np.float32)
    for temperature in (0.7, 1.0, 1.6):
        ids, p = _sampling._sample_stack_memview(z, None, temperature, 0.5, 4.0, 1.2, 0.8, 0.01, 0.95, 0.95, 40)
        h.update(np.asarray(ids, np.int64).tobytes() + p.tobytes())
for n_embd, V, T in ((32, 37, 8), (48, 61, 40), (24, 100, 70)):  # windows past 16, 32 and 64 keys
    m = t.make_model("float32", n_embd, V=V, block_size=T, seed=n_embd)
    w = t.fold_weights(m)
    d = _decode.Decoder(w, V, T)
    seq = [int(x) for x in rng.integers(0, V, 3 * T)]
    h.update(d.prefill(seq[:5]).tobytes())
    for x in seq[5:]:  # the logits of every step, across window refills
        h.update(d.feed(x).tobytes())
    for d in t.started(w, V, T, t.prompts_for(V, 3, seed=V, longest=T), max_new=2 * T, min_new=2 * T):
        got, reason = d.run(3 * T)  # every window refilled at least once
        assert len(got) == 2 * T
        h.update(np.asarray(got, np.int64).tobytes() + str(reason).encode())
print(_core.linear_simd_path(), h.hexdigest())
"""


def test_decoding_gives_the_same_tokens_at_either_vector_width():
    """The decoder's attention rows (the causal softmax on 16 lanes where the AVX-512 products run)
    and its sampling softmax (the same) keep the 8-lane kernels' bits: the sampled candidates and
    their probabilities, the logits of every step and whole generations are the same at either
    width."""
    assert_same_digest_at_both_widths(DECODING_HASH % str(pathlib.Path(__file__).parent))


def test_prefill_and_step_are_one_forward():
    """A prefill and a decode step both run forward_rows (rows after the cache): there is no
    second forward in the decoder."""
    decode = (SRC / "_decode.pyx").read_text()
    prefill = function_body(decode, "cdef void _prefill(")
    feed = function_body(decode, "cdef void _feed(")
    assert "forward_rows(" in prefill and "forward_rows(" in feed
    assert "step_forward" not in decode and "prefill_forward" not in decode
    forwards = re.findall(r"^cdef void (\w+_forward\w*|forward\w*)\(", decode, re.M)
    assert forwards == ["forward_rows"]


def test_formulas_are_written_once():
    """RMSNorm's epsilon and the hybrid mix each appear in one file; the training softmax reaches
    the head's logits and the softmax row through csrc/heads.h."""
    eps = [p.name for p, text in native_sources() if re.search(r"\b1e-5\b", text)]
    assert eps == ["_ops.pxd"]
    mix = re.compile(r"\(1 - \w+\) \* \w+(\[j\])? \+ \w+ \* \w+")
    assert [p.name for p, text in native_sources() if mix.search(text)] == ["heads.h"]
    attention = (CSRC / "attention.h").read_text()
    for helper in HEAD_HELPERS:
        defs = [p.name for p, text in native_sources() if re.search(r"static inline \w+ " + helper + r"##", text)]
        assert defs == ["heads.h"], helper
        assert helper in attention


# the causal attention kernels (csrc/attention.h) the decoder's query row runs: content logits and
# the causal softmax of the head's logits (the training block's rows kernels), the weighted values
# of every head at once (the training block's one-row chains, interleaved across heads)
DECODER_ATTENTION_KERNELS = ("mg_tri_nt_rows_", "mg_causal_softmax_", "mg_tri_nn_heads_")


def test_attention_is_one_set_of_kernels_that_every_path_runs():
    """The training's (head, sequence) block and the decoder's row (a prefill's rows, a step's,
    a batch's) run the same attention kernels; the block is rows 0 .. n of them. The decoder
    defines no attention of its own."""
    attention = (CSRC / "attention.h").read_text()
    assert re.search(r"NT##_rows\(S, lds, A, lda, BT, np, 0, n, d, alpha\)", attention)
    assert re.search(r"NN##_rows\(Y, ldy, P, ldp, Bp, dp, 0, n, d, alpha, accumulate\)", attention)
    kernels = (SRC / "_kernels.pxi").read_text()
    task = function_body(kernels, "cdef void attention_task_forward(")
    assert "tri_nt(" in task and "tri_nn(" in task and "mg_causal_softmax_" in task
    decode = (SRC / "_decode.pyx").read_text()
    row = function_body(decode, "cdef inline void attend_row(")
    # NN##_heads: each head's chains are NN##_row's, the one-row case of NN##_rows (its bits are
    # tested against mg_tri_nn_rows in test_kernels.py)
    for kernel in DECODER_ATTENTION_KERNELS:
        assert kernel + "f(" in row and kernel + "d(" in row, kernel
    assert re.search(r"NN##_row\(4, Y, P, Bp, ldbp, t0, c0, d, alpha, accumulate\)", attention)
    heads = attention[attention.index("ATTR static inline void NN##_row_heads("):attention.index("ATTR static void NN##_heads(")]
    assert "acc[g * NV + v] += q * b;" in heads and "for (ptrdiff_t j = 0; j <= t; j++)" in heads
    assert "attend_row(" in function_body(decode, "cdef void attend_rows(")
    decoder_kernels = (CSRC / "decode_kernels.h").read_text()
    assert not re.search(r"attend|sumrows|softmax_row|head_logits", decoder_kernels)


def test_rope_tables_have_one_layout():
    """Both extensions lay RoPE's tables out per head with the same function."""
    for name in ("_core.pyx", "_decode.pyx"):
        text = (SRC / name).read_text()
        assert "rope_tables_per_head(" in text
        assert "np.tile(" not in text


# ---------------------------------------------------------------------------------------------
# one description of the arena's sizes

def arena_figures(cfg, vocab_size, n_delta):
    """(bytes a full step's tape took, Engine.plan's bytes, the checkpoint's bound / 2) for a
    model of cfg with n_delta delta modules, one worker."""
    import molecule_gpt as mg
    from molecule_gpt import checkpoint as ck
    model = mg.Model(cfg, vocab_size, n_threads=1)
    for _ in range(n_delta):
        model.add_delta_module(alpha=0.5)
    T = cfg.block_size
    batch = [[(7 * i + 3 * j) % vocab_size for j in range(T + 1)] for i in range(cfg.batch_size)]
    model.loss_and_grads(batch)  # the largest step the arena is planned for
    engine = model._engines[0]
    used = engine.high_water[0]
    planned = engine.plan(*model._max_step())[0]
    assert model.planned_arena_bytes == 2 * planned
    bound = ck._arena_bytes_bound(cfg, vocab_size, n_delta, model.dtype.itemsize, 1)
    return used, planned, bound // 2


def test_record_plan_and_checkpoint_bound_read_one_description():
    """record (what a step takes), plan (what the arena is sized to) and the checkpoint's bound
    are one computation: change any one size and all three follow, equal."""
    import molecule_gpt as mg
    base = dict(n_layer=1, n_embd=16, n_head=2, block_size=6, batch_size=2, delta_rank=2,
                head_types=("content", "hybrid"))
    changes = [{}, {"block_size": 7}, {"n_embd": 20}, {"batch_size": 3}, {"n_layer": 2}, {"delta_rank": 3},
               {"head_types": ("rrpram", "hybrid")}, {"n_head": 4, "head_types": ("content", "rrpram", "hybrid", "hybrid")}]
    seen = set()
    for change in changes:
        for n_delta in (0, 2):
            cfg = mg.Config(**{**base, **change})
            used, planned, bound = arena_figures(cfg, 13, n_delta)
            assert used == planned == bound, (change, n_delta, used, planned, bound)
            seen.add((n_delta, planned))
    assert len({p for n, p in seen if n == 2}) == len(changes)  # every size moved the figure


def test_a_plan_too_large_for_size_t_is_refused():
    with pytest.raises(OverflowError, match="too large to plan"):
        _core.plan_arena(2, 72, 4, 96, 600, ("content",) * 4, 4, 1, False, 1 << 50, 1 << 60)
