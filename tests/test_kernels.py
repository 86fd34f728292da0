"""Each native kernel against finite differences (float64) and float32 against float64.

Every backward is checked the same way: pick a random upstream gradient R, define the scalar
L = sum(R * f(inputs)), and compare the kernel's gradient of L with central differences of L.
"""
import subprocess
import sys

import numpy as np
import pytest

from molecule_gpt import _core

RTOL = {np.float32: 2e-5, np.float64: 1e-12}
FD_TOL = 1e-6


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b), 1e-12)
    return np.linalg.norm(a - b) / scale


def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to every element of x (in place)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        minus = f()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * eps)
    return g


def assert_grad(analytic, f, x, what):
    numeric = numeric_grad(f, x)
    err = rel_err(analytic, numeric)
    assert err < FD_TOL, f"{what}: relative error {err:.3e} (first analytic {analytic.ravel()[:5]}, numeric {numeric.ravel()[:5]})"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------------------------


def test_rmsnorm_matches_formula_and_gradient(rng):
    x = rng.normal(size=(5, 12))
    y, rstd = _core._rmsnorm_forward_memview(x)
    expected = x / np.sqrt((x ** 2).mean(axis=1, keepdims=True) + 1e-5)
    assert rel_err(y, expected) < 1e-14
    R = rng.normal(size=y.shape)
    dx = _core._rmsnorm_backward_memview(R, y, rstd)
    assert_grad(dx, lambda: float((R * _core._rmsnorm_forward_memview(x)[0]).sum()), x, "rmsnorm dx")


def test_rmsnorm_backward_tiny_and_large_inputs(rng):
    # rstd is dominated by eps for tiny rows and by x for large ones: both regimes must hold
    for scale in (1e-4, 1e3):
        x = rng.normal(size=(3, 8)) * scale
        y, rstd = _core._rmsnorm_forward_memview(x)
        R = rng.normal(size=y.shape)
        dx = _core._rmsnorm_backward_memview(R, y, rstd)
        eps = 1e-6 * scale
        numeric = np.zeros_like(x)
        for i in range(x.size):
            xp, xm = x.copy().reshape(-1), x.copy().reshape(-1)
            xp[i] += eps
            xm[i] -= eps
            fp = (R * _core._rmsnorm_forward_memview(xp.reshape(x.shape))[0]).sum()
            fm = (R * _core._rmsnorm_forward_memview(xm.reshape(x.shape))[0]).sum()
            numeric.reshape(-1)[i] = (fp - fm) / (2 * eps)
        assert rel_err(dx, numeric) < FD_TOL, scale


def rope_tables(T, d):
    inv = 1.0 / 10000.0 ** (2 * np.arange(d // 2) / d)
    ang = np.arange(T)[:, None] * inv[None, :]
    return np.ascontiguousarray(np.cos(ang)), np.ascontiguousarray(np.sin(ang))


def test_rope_rotates_pairs_and_backward_is_inverse_rotation(rng):
    N, H, d, T = 7, 2, 6, 9
    x = rng.normal(size=(N, H * d))
    pos = rng.integers(0, T, size=N).astype(np.intc)
    cos_t, sin_t = rope_tables(T, d)
    y = _core._rope_forward_memview(x, pos, cos_t, sin_t, H)
    # reference: complex multiplication of interleaved pairs
    xc = x.reshape(N, H, d // 2, 2)
    z = (xc[..., 0] + 1j * xc[..., 1]) * np.exp(1j * np.arange(T)[pos][:, None, None] / 10000.0 ** (2 * np.arange(d // 2) / d))
    expected = np.stack([z.real, z.imag], axis=-1).reshape(N, H * d)
    assert rel_err(y, expected) < 1e-14
    R = rng.normal(size=y.shape)
    dx = _core._rope_backward_memview(R, pos, cos_t, sin_t, H)
    assert_grad(dx, lambda: float((R * _core._rope_forward_memview(x, pos, cos_t, sin_t, H)).sum()), x, "rope dx")


@pytest.mark.parametrize("n_adapters", [0, 1, 3])
def test_linear_with_adapters_forward_and_gradients(rng, n_adapters):
    N, nin, nout, r = 6, 5, 7, 2
    x = rng.normal(size=(N, nin))
    W = rng.normal(size=(nout, nin))
    As = [rng.normal(size=(nout, r)) for _ in range(n_adapters)]
    Bs = [rng.normal(size=(r, nin)) for _ in range(n_adapters)]
    alphas = [1.0, 0.5, -0.25][:n_adapters]
    y, U = _core._linear_forward_memview(x, W, As, Bs, alphas)
    expected = x @ W.T + sum(a * (x @ B.T) @ A.T for A, B, a in zip(As, Bs, alphas))
    assert rel_err(y, expected) < 1e-14
    R = rng.normal(size=y.shape)
    dx, dW, dAs, dBs = _core._linear_backward_memview(R, x, W, As, Bs, alphas, U)

    def loss():
        return float((R * _core._linear_forward_memview(x, W, As, Bs, alphas)[0]).sum())

    assert_grad(dx, loss, x, "linear dx")
    assert_grad(dW, loss, W, "linear dW")
    for k in range(n_adapters):
        assert_grad(dAs[k], loss, As[k], f"linear dA[{k}]")
        assert_grad(dBs[k], loss, Bs[k], f"linear dB[{k}]")


def attention_reference(q, k, v, P, types, mix, lengths, T):
    """Per-sequence, per-head dense reference of attention_forward."""
    N, C = q.shape
    H = len(types)
    d = C // H
    y = np.zeros_like(q)
    o = 0
    for n in lengths:
        for h, kind in enumerate(types):
            sl = slice(h * d, (h + 1) * d)
            content = q[o:o + n, sl] @ k[o:o + n, sl].T / np.sqrt(d)
            rr = P[h][o:o + n, :n] if P[h] is not None else 0
            logits = {"content": content, "rrpram": rr, "hybrid": (1 - mix[h]) * content + mix[h] * rr}[kind]
            logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
            w = np.exp(logits - logits.max(axis=1, keepdims=True))
            w /= w.sum(axis=1, keepdims=True)
            y[o:o + n, sl] = w @ v[o:o + n, sl]
        o += n
    return y


@pytest.mark.parametrize("types", [("content", "rrpram", "hybrid"), ("hybrid", "hybrid", "content")])
def test_attention_forward_and_gradients(rng, types):
    H, d, T = len(types), 4, 6
    lengths = [4, 1, 6]  # a one-token sequence and a full window
    N = sum(lengths)
    q, k, v = (rng.normal(size=(N, H * d)) for _ in range(3))
    P = [rng.normal(size=(N, T)) if t != "content" else None for t in types]
    alpha = rng.normal(size=H)
    mix = 1 / (1 + np.exp(-alpha))

    def run(mix_values):
        return _core._attention_forward_memview(q, k, v, P, types, mix_values, lengths, T)

    y, att = run(mix)
    assert rel_err(y, attention_reference(q, k, v, P, types, mix, lengths, T)) < 1e-13
    R = rng.normal(size=y.shape)
    dq, dk, dv, dP, dalpha = _core._attention_backward_memview(R, att, q, k, v, P, types, mix, lengths, T)

    def loss():
        return float((R * run(1 / (1 + np.exp(-alpha)))[0]).sum())

    assert_grad(dq, loss, q, "attention dq")
    assert_grad(dk, loss, k, "attention dk")
    assert_grad(dv, loss, v, "attention dv")
    for h, t in enumerate(types):
        if t != "content":
            assert_grad(dP[h], loss, P[h], f"attention dP[{h}]")
    numeric_alpha = numeric_grad(loss, alpha)
    for h, t in enumerate(types):
        if t == "hybrid":
            assert abs(dalpha[h] - numeric_alpha[h]) <= FD_TOL * max(abs(numeric_alpha[h]), 1e-8), (h, dalpha[h], numeric_alpha[h])
        else:
            assert dalpha[h] == 0 and abs(numeric_alpha[h]) < 1e-9


def test_attention_never_crosses_sequences(rng):
    types = ("content", "hybrid")
    H, d, T = 2, 4, 5
    lengths = [3, 5]
    N = sum(lengths)
    q, k, v = (rng.normal(size=(N, H * d)) for _ in range(3))
    P = [None, rng.normal(size=(N, T))]
    y, _ = _core._attention_forward_memview(q, k, v, P, types, [0.0, 0.4], lengths, T)
    v2 = v.copy()
    v2[:3] += 100.0  # change only the first sequence's values
    y2, _ = _core._attention_forward_memview(q, k, v2, P, types, [0.0, 0.4], lengths, T)
    assert np.array_equal(y[3:], y2[3:])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("portable", [False, True])
def test_an_attention_row_alone_is_the_same_row_of_a_block(rng, dtype, portable):
    """The decoder computes attention one query row at a time (its own column blocks: four
    vectors of values a pass); the training computes blocks of rows. Each element is one chain
    of FMAs in the same order either way, so a row alone equals that row of a block bit for bit,
    for head dims that leave every remainder of a vector."""
    try:
        _core._force_portable_attention(portable)
        for d in (4, 6, 8, 16, 18, 24, 32, 40, 64):
            for n in (1, 3, 4, 5, 9, 37):
                ldbt = (n + 31) // 32 * 32
                A = rng.normal(size=(n, d)).astype(dtype)
                BT = rng.normal(size=(d, ldbt)).astype(dtype)
                block = _core._tri_nt_rows_memview(A, BT, 0, n, 0.25)
                P = np.tril(rng.random(size=(n, n))).astype(dtype)  # zero above the diagonal
                B = rng.normal(size=(n, (d + 15) // 16 * 16)).astype(dtype)
                values = _core._tri_nn_rows_memview(P, B, d, 0, n, 0.5)
                for t in range(n):
                    alone = _core._tri_nt_rows_memview(A[t:t + 1].copy(), BT, t, t + 1, 0.25)
                    assert alone[0, :t + 1].tobytes() == block[t, :t + 1].tobytes(), ("nt", d, n, t)
                    row = _core._tri_nn_rows_memview(P[t:t + 1].copy(), B, d, t, t + 1, 0.5)
                    assert row.tobytes() == values[t:t + 1].tobytes(), ("nn", d, n, t)
                want = 0.5 * (P.astype(np.float64) @ B[:, :d].astype(np.float64))
                assert rel_err(values, want) < RTOL[dtype]
    finally:
        _core._force_portable_attention(False)
    with pytest.raises(ValueError):
        _core._tri_nn_rows_memview(np.zeros((1, 4)), np.zeros((4, 15)), 6, 3, 4, 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("d", [6, 18])
def test_attention_triangle_kernels_match_the_blas_twin(rng, dtype, portable, d):
    """csrc/attention.h (lower-triangle products, padded softmax rows; AVX2 or baseline build)
    against the BLAS path, on lengths that leave every kind of remainder (rows past a 4-row
    block, columns past a vector)."""
    types = ("content", "rrpram", "hybrid")
    H, T = len(types), 37
    lengths = [1, 2, 3, 5, 8, 9, 16, 17, 37]
    N = sum(lengths)
    q, k, v, R = (rng.normal(size=(N, H * d)).astype(dtype) for _ in range(4))
    P = [rng.normal(size=(N, T)).astype(dtype) if t != "content" else None for t in types]
    mix = [0.0, 0.0, 0.3]
    out = {}
    try:
        _core._force_portable_attention(portable)
        for blas in (False, True):
            _core._blas_attention(blas)
            y, att = _core._attention_forward_memview(q, k, v, P, types, mix, lengths, T)
            out[blas] = (y,) + _core._attention_backward_memview(R, att, q, k, v, P, types, mix, lengths, T)
    finally:
        _core._blas_attention(False)
        _core._force_portable_attention(False)
    tol = 1e-13 if dtype == np.float64 else RTOL[dtype]
    names = ("y", "dq", "dk", "dv", "dP", "dalpha")
    for name, ours, twin in zip(names, out[False], out[True]):
        if name == "dP":
            for h in (1, 2):
                assert rel_err(ours[h], twin[h]) < tol, (name, h)
        else:
            assert rel_err(ours, twin) < tol, name
    assert _core.attention_simd_path() in ("avx2", "portable")


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_gate_forward_and_gradients(rng, act):
    g = rng.normal(size=40)
    g[np.abs(g) < 1e-3] = 0.5  # keep relu's kink away from the finite-difference step
    u = rng.normal(size=40)
    out = _core._gate_forward_memview(g, u, act)
    actg = np.maximum(g, 0) if act == "relu" else g / (1 + np.exp(-g))
    assert rel_err(out, actg * u) < 1e-14
    R = rng.normal(size=40)
    dg, du = _core._gate_backward_memview(R, g, u, act)

    def loss():
        return float((R * _core._gate_forward_memview(g, u, act)).sum())

    assert_grad(dg, loss, g, f"{act} dg")
    assert_grad(du, loss, u, f"{act} du")
    set_dg, set_du = _core._gate_backward_memview(R, g, u, act, True)  # writing form, over NaN
    assert np.array_equal(set_dg, dg) and np.array_equal(set_du, du)


def test_cross_entropy_forward_and_gradient(rng):
    N, V = 6, 9
    z = rng.normal(size=(N, V)) * 3
    t = rng.integers(0, V, size=N).astype(np.intc)
    w = rng.uniform(0.1, 1.0, size=N)
    losses, probs = _core._xent_forward_memview(z, t)
    ref = np.log(np.exp(z).sum(axis=1)) - z[np.arange(N), t]
    assert rel_err(losses, ref) < 1e-14
    dz = _core._xent_backward_memview(probs, t, w)
    assert_grad(dz, lambda: float(w @ _core._xent_forward_memview(z, t)[0]), z, "xent dlogits")


@pytest.mark.parametrize("V", [1, 5, 8, 9, 636])
def test_cross_entropy_float32_on_every_path(rng, V):
    """float32 cross-entropy: its exponentials run 8 lanes at a time where AVX2 runs (the last
    vector through a padded copy) and mg_expf elsewhere; both within float32 rounding of float64,
    and the probabilities of each row sum to 1."""
    N = 7
    z = (rng.normal(size=(N, V)) * 4).astype(np.float32)
    t = rng.integers(0, V, size=N).astype(np.intc)
    z64 = z.astype(np.float64)
    ref = np.log(np.exp(z64 - z64.max(axis=1, keepdims=True)).sum(axis=1)) + z64.max(axis=1) - z64[np.arange(N), t]
    for level in ([0, 1] if simd_levels() != ["portable"] else [0]):
        _core._force_simd(level)
        try:
            losses, probs = _core._xent_forward_memview(z.copy(), t)
        finally:
            _core._force_simd(None)
        assert np.abs(losses - ref).max() < 1e-5 * max(1.0, np.abs(ref).max()), level
        assert np.abs(probs.astype(np.float64).sum(axis=1) - 1).max() < 1e-5, level


def test_cross_entropy_is_stable_for_huge_logits():
    z = np.array([[1e4, 0.0, -1e4]], dtype=np.float32)
    losses, probs = _core._xent_forward_memview(z, np.array([1], np.intc))
    assert np.isfinite(losses).all() and np.isfinite(probs).all()
    assert losses[0] == pytest.approx(1e4)


def test_embedding_gather_and_scatter_add(rng):
    V, T, C, N = 5, 4, 3, 8
    wte, wpe = rng.normal(size=(V, C)), rng.normal(size=(T, C))
    ids = rng.integers(0, V, size=N).astype(np.intc)
    pos = rng.integers(0, T, size=N).astype(np.intc)
    x = _core._embed_forward_memview(wte, wpe, ids, pos)
    assert np.array_equal(x, wte[ids] + wpe[pos])
    R = rng.normal(size=x.shape)
    dwte, dwpe = _core._embed_backward_memview(R, ids, pos, V, T)
    loss = lambda: float((R * _core._embed_forward_memview(wte, wpe, ids, pos)).sum())  # noqa: E731
    assert_grad(dwte, loss, wte, "embed dwte")
    assert_grad(dwpe, loss, wpe, "embed dwpe")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_step_matches_formula(rng, dtype):
    p = rng.normal(size=50).astype(dtype)
    g = (rng.normal(size=50) * 3).astype(dtype)  # some beyond the clip
    m = rng.normal(size=50).astype(dtype) * 0.1
    v = np.abs(rng.normal(size=50)).astype(dtype) * 0.1
    lr, b1, b2, eps, clip, step = 0.01, 0.9, 0.99, 1e-8, 1.0, 3
    gc = np.clip(g.astype(np.float64), -clip, clip)
    m_ref = b1 * m + (1 - b1) * gc
    v_ref = b2 * v + (1 - b2) * gc ** 2
    p_ref = p - lr * (m_ref / (1 - b1 ** step)) / (np.sqrt(v_ref / (1 - b2 ** step)) + eps)
    _core.adam_update(p, g, m, v, lr, b1, b2, eps, clip, step)
    assert rel_err(p, p_ref) < RTOL[dtype]
    assert rel_err(m, m_ref) < RTOL[dtype]
    assert rel_err(v, v_ref) < RTOL[dtype]


def test_adam_update_groups_bumps_each_step_after_its_update(rng):
    class Group:
        def __init__(self, n, step):
            self.flat, self.grad = rng.normal(size=n), rng.normal(size=n)
            self.m, self.v = rng.normal(size=n) * 0.1, np.abs(rng.normal(size=n)) * 0.1
            self.step = step
    groups = [Group(7, 0), Group(5, 4)]
    expected = []
    for grp in groups:
        p, m, v = grp.flat.copy(), grp.m.copy(), grp.v.copy()
        _core.adam_update(p, grp.grad, m, v, 0.01, 0.9, 0.99, 1e-8, 1.0, grp.step + 1)
        expected.append((p, m, v))
    _core.adam_update_groups(groups, 0.01, 0.9, 0.99, 1e-8, 1.0)
    assert [grp.step for grp in groups] == [1, 5]
    for grp, (p, m, v) in zip(groups, expected):
        assert np.array_equal(grp.flat, p) and np.array_equal(grp.m, m) and np.array_equal(grp.v, v)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_adam_update_groups_sums_other_workers_gradients(rng, n_threads):
    """extra_grads are summed into grad in Adam's pass (grad keeps the sum), threads split a
    large group: both give exactly what summing first and one plain update give."""
    class Group:
        pass
    n = 3 * _core.ADAM_CHUNK_MIN + 5  # large enough to split across threads
    grp = Group()
    grp.flat, grp.grad = rng.normal(size=n), rng.normal(size=n)
    grp.m, grp.v, grp.step = rng.normal(size=n) * 0.1, np.abs(rng.normal(size=n)) * 0.1, 2
    extras = [rng.normal(size=n), rng.normal(size=n), rng.normal(size=n)]
    total = grp.grad + extras[0] + extras[1] + extras[2]
    p, m, v = grp.flat.copy(), grp.m.copy(), grp.v.copy()
    _core.adam_update(p, total, m, v, 0.01, 0.9, 0.99, 1e-8, 1.0, 3)
    _core.adam_update_groups([grp], 0.01, 0.9, 0.99, 1e-8, 1.0, [extras], n_threads)
    assert grp.step == 3 and np.array_equal(grp.grad, total)
    assert np.array_equal(grp.flat, p) and np.array_equal(grp.m, m) and np.array_equal(grp.v, v)


def test_float32_kernels_agree_with_float64(rng):
    x = rng.normal(size=(9, 16))
    W = rng.normal(size=(12, 16))
    A, B = rng.normal(size=(12, 3)), rng.normal(size=(3, 16))
    y64, _ = _core._linear_forward_memview(x, W, [A], [B], [0.5])
    y32, _ = _core._linear_forward_memview(x.astype(np.float32), W.astype(np.float32),
                                           [A.astype(np.float32)], [B.astype(np.float32)], [0.5])
    assert rel_err(y32, y64) < RTOL[np.float32]
    n64, _ = _core._rmsnorm_forward_memview(x)
    n32, _ = _core._rmsnorm_forward_memview(x.astype(np.float32))
    assert rel_err(n32, n64) < RTOL[np.float32]


# ---- the linear layers' products (csrc/gemm.h) against numpy and against their BLAS twin

GEMM_SHAPES = [  # (M, N, K): register-block tails in every dimension, K past one 256 pass, empty K
    (192, 216, 72), (192, 72, 576), (576, 72, 192), (7, 5, 3), (1, 1, 1), (13, 47, 300),
    (6, 16, 1), (4, 24, 257), (25, 8, 72), (192, 96, 18), (3, 40, 0),
    (601, 40, 300),  # a transposed A spanning > 512 KB: copied into tiles first (csrc/gemm.h)
    (30, 80, 72), (37, 33, 19), (12, 48, 5), (25, 17, 40), (130, 100, 9),  # AVX-512's 16-, 32-, 48-wide panels
]

SIMD_LEVELS = {"avx2": 1, "avx512": 2}


def simd_levels():
    """The kernel levels this CPU can run (csrc/gemm.h chooses among them; tests force each)."""
    _core._force_simd(2)  # capped at what the CPU supports
    try:
        best = ("portable", "avx2", "avx512").index(_core.linear_simd_path())
    finally:
        _core._force_simd(None)
    return [name for name, level in SIMD_LEVELS.items() if level <= best] or ["portable"]


def _product(form, A, B):
    return {"nt": lambda: A @ B.T, "nn": lambda: A @ B, "tn": lambda: A.T @ B}[form]()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("form", ["nt", "nn", "tn"])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("simd", ["avx2", "avx512"])
def test_linear_products_match_numpy_and_blas(rng, dtype, form, accumulate, simd):
    if simd not in simd_levels():
        pytest.skip(f"this CPU has no {simd}")
    _core._force_simd(SIMD_LEVELS[simd])
    try:
        _check_products(rng, dtype, form, accumulate)
        assert _core.linear_simd_path() == simd
    finally:
        _core._force_simd(None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_avx512_products_equal_avx2_bit_for_bit(rng, dtype):
    """Every output element is the same FMA chain over k at either width (only the blocking of
    columns differs), so the run-time choice between them never changes a result."""
    if "avx512" not in simd_levels():
        pytest.skip("this CPU has no AVX-512")
    for form in ("nt", "nn", "tn"):
        for M, N, K in GEMM_SHAPES:
            A = rng.normal(size=(K, M) if form == "tn" else (M, K)).astype(dtype)
            B = rng.normal(size=(N, K) if form == "nt" else (K, N)).astype(dtype)
            C0 = rng.normal(size=(M, N)).astype(dtype)
            outs = []
            for level in (1, 2):
                _core._force_simd(level)
                try:
                    C = C0.copy()
                    _core._matmul_memview(form, A, B, C, 0.75, True)
                    outs.append(C)
                finally:
                    _core._force_simd(None)
            assert np.array_equal(outs[0], outs[1]), (form, M, N, K)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weighted_values_of_every_head_at_once_equal_each_heads_row(rng, dtype):
    """The decoder's weighted values for all heads of one query row at once (mg_tri_nn_heads, the
    heads' sums interleaved to hide their latency) give each head exactly its own row's bits
    (mg_tri_nn_rows, which the training's block runs), at every vector width this CPU has; head
    counts and dims that leave every group of heads and every vector remainder."""
    for level in [0] + [SIMD_LEVELS[name] for name in simd_levels() if name in SIMD_LEVELS]:
        _core._force_simd(level)
        try:
            for H, d in [(1, 5), (3, 18), (4, 18), (9, 8), (8, 32), (5, 40), (3, 64), (2, 70)]:
                for t in (0, 1, 6, 37):
                    P = rng.random((H, t + 1)).astype(dtype)
                    B = rng.normal(size=(H, t + 1, (d + 15) // 16 * 16 + 16)).astype(dtype)
                    got = _core._tri_nn_heads_memview(P, B, d, t, 0.5)
                    for h in range(H):
                        want = _core._tri_nn_rows_memview(P[h:h + 1].copy(), B[h], d, t, t + 1, 0.5)[0]
                        assert np.array_equal(got[h], want), (level, H, d, t, h)
                    exact = 0.5 * np.einsum("hj,hjc->hc", P.astype(np.float64), B[:, :, :d].astype(np.float64))
                    assert np.allclose(got, exact, rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-5)
        finally:
            _core._force_simd(None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [6, 18, 32])
def test_avx512_attention_products_equal_avx2_bit_for_bit(rng, dtype, d):
    """Attention's whole-block products on 512-bit vectors give the AVX2 kernels' bits (each
    output element is the same FMA chain over the head dimension or the positions; lanes are
    output columns), forward and backward, on lengths that leave every remainder of a 32-column
    block and of a 4-row block."""
    if "avx512" not in simd_levels():
        pytest.skip("this CPU has no AVX-512")
    types = ("content", "rrpram", "hybrid")
    H, T = len(types), 40
    lengths = [1, 2, 3, 5, 15, 16, 17, 31, 32, 33, 40]
    N = sum(lengths)
    q, k, v, R = (rng.normal(size=(N, H * d)).astype(dtype) for _ in range(4))
    P = [rng.normal(size=(N, T)).astype(dtype) if t != "content" else None for t in types]
    mix = [0.0, 0.0, 0.3]
    out = {}
    for level in (1, 2):
        _core._force_simd(level)
        try:
            y, att = _core._attention_forward_memview(q, k, v, P, types, mix, lengths, T)
            out[level] = (y, att) + _core._attention_backward_memview(R, att, q, k, v, P, types, mix, lengths, T)
        finally:
            _core._force_simd(None)
    # att: the weights, then the content logits, each (H, sequences' n x n blocks); above the
    # diagonal the logits are unspecified (mg_tri_nt fills whole column blocks there)
    SS = sum(n * n for n in lengths)
    lower = np.concatenate([np.tril(np.ones((n, n), bool)).ravel() for n in lengths])
    keep = np.concatenate([np.ones(H * SS, bool), np.tile(lower, H)])
    for level in (1, 2):  # the rows entry points (the decoder's), one row and a block of rows
        _core._force_simd(level)
        try:
            A, BT = q[:37, :d].copy(), np.ascontiguousarray(k[:64, :d].T)
            Pr = np.tril(rng.random(size=(37, 37))).astype(dtype) if level == 1 else Pr
            B = np.ascontiguousarray(np.pad(v[:37, :d], ((0, 0), (0, 32 - d % 32 if d % 32 else 0))))
            out[level] += (_core._tri_nt_rows_memview(A, BT, 0, 37, 0.25),
                           _core._tri_nt_rows_memview(A[36:].copy(), BT, 36, 37, 0.25),
                           _core._tri_nn_rows_memview(Pr, B, d, 0, 37, 0.5),
                           _core._tri_nn_rows_memview(Pr[36:].copy(), B, d, 36, 37, 0.5))
        finally:
            _core._force_simd(None)
    lower37 = np.tril(np.ones((37, 64), bool))
    nt_block, nt_row, nn_block, nn_row = out[1][-4:]
    assert np.array_equal(nt_block[lower37[:, :64]], out[2][-4][lower37]), "nt rows"
    assert np.array_equal(nt_row[0, :37], out[2][-3][0, :37]), "nt one row"
    assert np.array_equal(nn_block, out[2][-2]) and np.array_equal(nn_row, out[2][-1]), "nn rows"
    for name, a, b in zip(("y", "att", "dq", "dk", "dv", "dP", "dalpha"), out[1][:-4], out[2][:-4]):
        if name == "dP":
            for h in (1, 2):
                assert np.array_equal(a[h], b[h]), (name, h)
        elif name == "att":
            assert np.array_equal(a[keep], b[keep]), name
        else:
            assert np.array_equal(a, b), name


def test_avx512_training_step_equals_avx2_bit_for_bit(rng):
    """A whole float32 step (forward with the cross-entropy's exponentials, backward) gives the
    same loss and gradients with the AVX-512 kernels as with the AVX2 ones: rows of 1 to 40
    keys, and a vocabulary of 53 that ends in a partial vector at both widths."""
    if "avx512" not in simd_levels():
        pytest.skip("this CPU has no AVX-512")
    import molecule_gpt as mg
    cfg = mg.Config(n_layer=1, n_embd=32, n_head=4, block_size=40, batch_size=6,
                    head_types=("content", "rrpram", "hybrid", "hybrid"))
    model = mg.Model(cfg, 53, seed=1, n_threads=1)
    batch = [rng.integers(0, 53, n).tolist() for n in (2, 9, 17, 24, 33, 41)]
    out = {}
    for level in (1, 2):
        _core._force_simd(level)
        try:
            out[level] = model.loss_and_grads(batch)
        finally:
            _core._force_simd(None)
    assert out[1][0] == out[2][0]
    assert out[1][1].keys() == out[2][1].keys()
    for name, grad in out[1][1].items():
        assert np.array_equal(grad, out[2][1][name]), name


def test_fma_peak_probe():
    peak = _core.fma_peak("avx2", trials=5)
    assert 1.0 < peak < 10_000.0
    with pytest.raises(ValueError, match="width must be"):
        _core.fma_peak("sse")
    if "avx512" in simd_levels():
        assert _core.fma_peak("avx512", trials=5) > 1.0
    else:
        with pytest.raises(ValueError, match="no avx512"):
            _core.fma_peak("avx512")


def test_read_bandwidth_probe():
    """The memory ceiling benchmarks compare a decode with: GB/s of reading a buffer again, on
    one thread and on two; bad arguments are refused with ValueError. Two threads are measured
    in a fresh process, as a benchmark measures them: here other tests' threads may hold the
    worker pool, and then no pass runs on two threads (RuntimeError, by design)."""
    assert 0.5 < _core.read_bandwidth(1 << 20, 1, trials=3) < 10_000.0
    code = "from molecule_gpt import _core; print(_core.read_bandwidth(1 << 20, 2, trials=3))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 0.5 < float(out.stdout) < 10_000.0
    for bad in ((100, 1, 1), (1 << 20, 0, 1), (1 << 20, 1, 0), (1 << 20, 100_000, 1)):
        with pytest.raises(ValueError, match="nbytes"):
            _core.read_bandwidth(*bad)


def _check_products(rng, dtype, form, accumulate):
    for M, N, K in GEMM_SHAPES:
        a_shape = (K, M) if form == "tn" else (M, K)
        b_shape = (N, K) if form == "nt" else (K, N)
        # operands are views into wider arrays: leading dimensions differ from their widths
        A = rng.normal(size=(a_shape[0], a_shape[1] + 3)).astype(dtype)[:, 1:a_shape[1] + 1]
        B = rng.normal(size=(b_shape[0], b_shape[1] + 5)).astype(dtype)[:, 2:b_shape[1] + 2]
        C0 = rng.normal(size=(M, N + 2)).astype(dtype)
        if not accumulate:
            C0[:] = np.nan  # a write-only output must never be read
        want = 0.75 * _product(form, A.astype(np.float64), B.astype(np.float64))
        if accumulate:
            want = want + C0[:, :N]
        outs = {}
        for blas in (False, True):
            C = C0.copy()
            _core._blas_linear(blas)
            try:
                _core._matmul_memview(form, A, B, C[:, :N], 0.75, accumulate)
            finally:
                _core._blas_linear(False)
            assert np.array_equal(C[:, N:], C0[:, N:], equal_nan=True), "wrote past the view"
            outs[blas] = C[:, :N]
        tol = 1e-13 if dtype == np.float64 else 1e-5
        assert rel_err(outs[False], want) < tol, (M, N, K)
        assert rel_err(outs[False], outs[True]) < tol, (M, N, K)


def test_linear_products_refuse_bad_operands():
    A, B = np.ones((4, 3)), np.ones((5, 3))
    with pytest.raises(ValueError, match=r"nt: A must be \(4, 3\) and B \(6, 3\)"):
        _core._matmul_memview("nt", A, B, np.zeros((4, 6)), 1.0, False)
    with pytest.raises(ValueError, match="form must be"):
        _core._matmul_memview("tt", A, B, np.zeros((4, 5)), 1.0, False)
    with pytest.raises(ValueError, match="unit stride"):
        _core._matmul_memview("nt", A[:, ::2], B[:, ::2], np.zeros((4, 5)), 1.0, False)


ARENA_PROBE = r"""
#include <stdio.h>
#include <stdlib.h>
#include "molecule.h"
int main(int argc, char **argv) {
    mg_arena ar;
    if (mg_arena_init(&ar, 4096, 8) != 0) return 2;
    char *a = mg_arena_alloc(&ar, 100), *b = mg_arena_alloc(&ar, 64);
    for (int i = 0; i < 100; i++) a[i] = 1, ((char *)mg_grad_of(&ar, a))[i] = 1;
    for (int i = 0; i < 64; i++) b[i] = 1;
    volatile char *p = argv[1][0] == 'p' ? a + 100          /* the padding after a buffer */
                     : argv[1][0] == 'g' ? (char *)mg_grad_of(&ar, a) + 100
                     : argv[1][0] == 't' ? b + 64           /* past the last buffer */
                     : argv[1][0] == 'r' ? (mg_arena_reset(&ar), a)   /* a buffer of before the reset */
                     : a + 99;                               /* in bounds: no report */
    printf("%d\n", *p);
    mg_arena_free(&ar);
    return 0;
}
"""


@pytest.mark.parametrize("where", ["padding", "grad padding", "tail", "reset"])
def test_arena_buffers_are_fenced_under_asan(tmp_path, where):
    """The training tape is one malloc, so AddressSanitizer sees its buffers only through the
    arena's poisoning (csrc/arena.c): a read past a buffer or of a buffer from before the last
    reset must be reported, and a read in bounds must not."""
    import os
    import pathlib
    import shutil
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / "csrc" / "arena.c").exists() or shutil.which("gcc") is None:
        pytest.skip("needs the source tree and gcc")
    (tmp_path / "probe.c").write_text(ARENA_PROBE)
    exe = tmp_path / "probe"
    build = subprocess.run(["gcc", "-fsanitize=address", "-g", "-O0", "-I", str(root / "csrc"), str(tmp_path / "probe.c"),
                            str(root / "csrc" / "arena.c"), "-o", str(exe)], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip("gcc cannot build with -fsanitize=address here: " + build.stderr[-300:])
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
    env["ASAN_OPTIONS"] = "detect_leaks=0"
    ok = subprocess.run([str(exe), "inside"], capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0 and "ERROR: AddressSanitizer" not in ok.stderr, ok.stderr[-2000:]
    bad = subprocess.run([str(exe), where[0]], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode != 0 and "use-after-poison" in bad.stderr, (bad.returncode, bad.stderr[-2000:])
