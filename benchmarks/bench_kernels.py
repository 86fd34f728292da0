"""pytest-benchmark suite: each native kernel at the default config's per-worker sizes.

    python -m pytest benchmarks/bench_kernels.py --benchmark-only --benchmark-columns=median,ops

Sizes: N = 192 packed positions (two 96-token sequences: one worker's half of a 4 x 96 batch),
C = 72, H = 4 (d = 18), F = 288, V = 96, r = 8, T = 96. Each case also checks its result
against numpy once, after timing (as safetensors' benches do), so a fast wrong kernel fails.
"""
import numpy as np
import pytest

from molecule_gpt import _core

N, C, H, F, V, R, T = 192, 72, 4, 288, 96, 8, 96
D = C // H
DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True)
def serial_blas():
    """Kernels run with single-threaded BLAS inside a model step; time them the same way."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param


def rand(rng, *shape, dtype=np.float64):
    return rng.normal(size=shape).astype(dtype)


@pytest.fixture(params=["own", "blas"])
def products(request):
    """The linear layers' products: csrc/gemm.h (the default on AVX2 CPUs) or their BLAS twin."""
    _core._blas_linear(request.param == "blas")
    yield request.param
    _core._blas_linear(False)


def test_linear_forward(benchmark, dtype, products):
    rng = np.random.default_rng(0)
    x, W = rand(rng, N, C, dtype=dtype), rand(rng, F, C, dtype=dtype)
    A, B = rand(rng, F, R, dtype=dtype), rand(rng, R, C, dtype=dtype)
    y, _ = benchmark(_core._linear_forward_memview, x, W, [A], [B], [0.5])
    ref = x.astype(np.float64) @ W.T + 0.5 * (x @ B.T) @ A.T
    np.testing.assert_allclose(y, ref, rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-4)


def test_linear_backward(benchmark, dtype, products):
    rng = np.random.default_rng(1)
    x, W, g = rand(rng, N, C, dtype=dtype), rand(rng, F, C, dtype=dtype), rand(rng, N, F, dtype=dtype)
    A, B = rand(rng, F, R, dtype=dtype), rand(rng, R, C, dtype=dtype)
    _, U = _core._linear_forward_memview(x, W, [A], [B], [0.5])
    dx, dW, _, _ = benchmark(_core._linear_backward_memview, g, x, W, [A], [B], [0.5], U)
    np.testing.assert_allclose(dW, g.astype(np.float64).T @ x, rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-3)


def test_rmsnorm_forward_backward(benchmark, dtype):
    rng = np.random.default_rng(2)
    x, dy = rand(rng, N, C, dtype=dtype), rand(rng, N, C, dtype=dtype)

    def both():
        y, rstd = _core._rmsnorm_forward_memview(x)
        return _core._rmsnorm_backward_memview(dy, y, rstd)

    benchmark(both)


def test_rope_forward_backward(benchmark, dtype):
    rng = np.random.default_rng(3)
    x = rand(rng, N, C, dtype=dtype)
    pos = np.tile(np.arange(T, dtype=np.intc), N // T)
    ang = np.arange(T)[:, None] / 10000.0 ** (2 * np.arange(D // 2) / D)
    cos_t, sin_t = np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)

    def both():
        y = _core._rope_forward_memview(x, pos, cos_t, sin_t, H)
        return _core._rope_backward_memview(y, pos, cos_t, sin_t, H)

    back = benchmark(both)
    np.testing.assert_allclose(back, x, rtol=1e-4, atol=1e-4)  # rotating back recovers x


@pytest.mark.parametrize("types", [("content",) * 4, ("content", "content", "hybrid", "hybrid"), ("rrpram",) * 4])
def test_attention_forward(benchmark, dtype, types):
    rng = np.random.default_rng(4)
    q, k, v = (rand(rng, N, C, dtype=dtype) for _ in range(3))
    P = [rand(rng, N, T, dtype=dtype) if t != "content" else None for t in types]
    benchmark(_core._attention_forward_memview, q, k, v, P, types, [0.4] * H, [T] * (N // T), T)


@pytest.mark.parametrize("path", ["triangle", "blas"])
def test_attention_backward(benchmark, dtype, path):
    """csrc/attention.h's lower-triangle kernels against the BLAS twin (full products)."""
    rng = np.random.default_rng(5)
    types = ("content", "content", "hybrid", "hybrid")
    q, k, v, dy = (rand(rng, N, C, dtype=dtype) for _ in range(4))
    P = [rand(rng, N, T, dtype=dtype) if t != "content" else None for t in types]
    _, att = _core._attention_forward_memview(q, k, v, P, types, [0.4] * H, [T] * (N // T), T)
    try:
        _core._blas_attention(path == "blas")
        grads = benchmark(_core._attention_backward_memview, dy, att, q, k, v, P, types, [0.4] * H,
                          [T] * (N // T), T)
    finally:
        _core._blas_attention(False)
    assert np.all(np.isfinite(grads[0]))


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_gate_forward_backward(benchmark, dtype, act):
    rng = np.random.default_rng(6)
    g, u, dout = (rand(rng, N * F, dtype=dtype) for _ in range(3))

    def both():
        _core._gate_forward_memview(g, u, act)
        return _core._gate_backward_memview(dout, g, u, act)

    benchmark(both)


def test_cross_entropy(benchmark, dtype):
    rng = np.random.default_rng(7)
    z = rand(rng, N, V, dtype=dtype)
    t = rng.integers(0, V, size=N).astype(np.intc)
    w = np.full(N, 1.0 / N)

    def both():
        losses, probs = _core._xent_forward_memview(z, t)
        return losses, _core._xent_backward_memview(probs, t, w)

    losses, _ = benchmark(both)
    z64 = z.astype(np.float64)
    ref = np.log(np.exp(z64).sum(axis=1)) - z64[np.arange(N), t]
    np.testing.assert_allclose(losses, ref, rtol=1e-5 if dtype == np.float32 else 1e-13)


def test_embedding_gather_scatter(benchmark, dtype):
    rng = np.random.default_rng(8)
    wte, wpe, dx = rand(rng, V, C, dtype=dtype), rand(rng, T, C, dtype=dtype), rand(rng, N, C, dtype=dtype)
    ids = rng.integers(0, V, size=N).astype(np.intc)
    pos = np.tile(np.arange(T, dtype=np.intc), N // T)

    def both():
        _core._embed_forward_memview(wte, wpe, ids, pos)
        return _core._embed_backward_memview(dx, ids, pos, V, T)

    benchmark(both)


def test_adam_step(benchmark, dtype):
    rng = np.random.default_rng(9)
    n = 16 * C * C * 2 + V * C  # the default model's parameter count, about
    p, g = rand(rng, n, dtype=dtype), rand(rng, n, dtype=dtype)
    m, v = np.zeros(n, dtype), np.zeros(n, dtype)
    benchmark(_core.adam_update, p, g, m, v, 1e-3, 0.9, 0.99, 1e-8, 1.0, 1)
