"""The benchmark baselines (benchmarks/numpy_model.py, benchmarks/torch_model.py) are right.

1. float64 numpy reproduces the original's numbers in fixtures/anchor-small/expected.json.
2. numpy's hand-written backward matches central finite differences on tiny random models
   (every head type, an implicit content head, relu and silu, tied and untied, 2 layers,
   2 delta modules, sequences shorter and longer than block_size).
3. torch eager (autograd) matches numpy: loss, gradients, logits and 3 clipped-Adam steps.

Imports the baselines by path; does not need the molecule_gpt package to be built.
"""
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from numpy_model import NumpyGPT  # noqa: E402
from original_ckpt import init_params, load_original  # noqa: E402


def _fixture_dir():
    return ROOT / "tests" / "fixtures" / "anchor-small"  # see tests/fixtures/README.md


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


# ---------------------------------------------------------------------------------------------
# 1. fixture


@pytest.fixture(scope="module")
def anchor():
    fx = _fixture_dir()
    cfg, params, alphas = load_original(fx / "checkpoint.json")
    with open(fx / "expected.json", encoding="utf-8") as f:
        expected = json.load(f)
    return cfg, params, alphas, expected


def test_loader_names_and_tie(anchor):
    cfg, params, alphas, _ = anchor
    assert cfg["tie_embeddings"] and "lm_head" not in params
    assert alphas == [1.0, 0.5]
    C, V = cfg["n_embd"], params["wte"].shape[0]
    assert params["wpe"].shape == (cfg["block_size"], C)
    assert params["l0.h2.alpha"].shape == (1, 1)
    assert params["l0.h2.w_pattern"].shape == (cfg["block_size"], C // cfg["n_head"])
    assert params["delta1.lm_head.A"].shape == (V, cfg["delta_rank"])
    assert params["delta0.l0.fc2.B"].shape == (cfg["delta_rank"], 4 * C)
    assert "l0.h0.w_pattern" not in params  # content heads have no pattern


def test_fixture_losses(anchor):
    cfg, params, alphas, exp = anchor
    m = NumpyGPT(cfg, params, alphas, dtype=np.float64)
    assert rel(m.sequence_losses(exp["ids"]), exp["loss_per_sequence"]) < 1e-9
    for ids, want in zip(exp["ids"], exp["loss_per_sequence"]):
        assert rel(m.loss([ids]), want) < 1e-9
    assert rel(m.loss(exp["ids"]), exp["batch_loss"]) < 1e-9


def test_fixture_last_logits(anchor):
    # last_logits[b] = logits at the last loss position t = n-1 (n = min(block_size, L-1)),
    # i.e. the prediction of ids[n] from ids[0..n-1]; the fixture's sequences exceed block_size
    cfg, params, alphas, exp = anchor
    m = NumpyGPT(cfg, params, alphas, dtype=np.float64)
    for ids, want in zip(exp["ids"], exp["last_logits"]):
        n = min(cfg["block_size"], len(ids) - 1)
        assert rel(m.logits(ids[:n])[n - 1], want) < 1e-9


def test_fixture_grad_norms(anchor):
    cfg, params, alphas, exp = anchor
    m = NumpyGPT(cfg, params, alphas, dtype=np.float64)
    loss, grads = m.loss_and_grads(exp["ids"])
    assert rel(loss, exp["batch_loss"]) < 1e-9
    seen = set()
    for key, want in exp["grad_norms"].items():
        name = key[len("base."):] if key.startswith("base.") else key
        name = "wte" if name == "lm_head" else name  # tied: one matrix, one summed gradient
        seen.add(name)
        assert rel(np.linalg.norm(grads[name]), want) < 1e-7, key
    assert seen == set(grads)


# ---------------------------------------------------------------------------------------------
# 2. finite differences on tiny random models


def tiny_cfg(act, tied):
    return dict(n_layer=2, n_embd=16, n_head=4, block_size=8, tie_embeddings=tied,
                head_types=["content", "rrpram", "hybrid"],  # head 3: content (implicit)
                delta_rank=2, hybrid_alpha_init=0.5, mlp_activation=act, grad_clip=1.0,
                init_std=0.3, delta_init_std=0.2)


def tiny_model(act, tied, seed, cls=NumpyGPT):
    cfg = tiny_cfg(act, tied)
    V = 11
    params = init_params(cfg, V, n_delta=2, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name in params:  # move hybrid alphas off their init value
        if name.endswith(".alpha"):
            params[name] = params[name] + rng.normal(0, 0.7, size=(1, 1))
    batch = [list(rng.integers(0, V, size=L)) for L in (12, 5, 9)]  # 12, 9 > block_size + 1
    return cfg, params, [1.0, 0.7], batch, cls(cfg, params, [1.0, 0.7])


@pytest.mark.parametrize("act,tied", [("relu", True), ("silu", False)])
def test_finite_differences(act, tied):
    cfg, params, alphas, batch, m = tiny_model(act, tied, seed=3)
    loss, grads = m.loss_and_grads(batch)
    assert set(grads) == set(m.params)
    assert "lm_head" in grads or tied
    rng = np.random.default_rng(7)
    eps = 1e-5
    worst = (0.0, None)
    for name in sorted(m.params):
        p, g = m.params[name], grads[name]
        assert g.shape == p.shape
        gn = np.linalg.norm(g)
        assert gn > 0, name
        # direction: the gradient's own plus a shorter random one, so errors in any component
        # show and the directional derivative stays away from 0 (>= gn / 2)
        u = g / gn + 0.5 * (r := rng.normal(size=p.shape)) / np.linalg.norm(r)
        orig = p.copy()
        p[...] = orig + eps * u
        lp = m.loss(batch)
        p[...] = orig - eps * u
        lm = m.loss(batch)
        p[...] = orig
        num, ana = (lp - lm) / (2 * eps), float(np.sum(g * u))
        err = abs(num - ana) / max(abs(num), abs(ana))
        worst = max(worst, (err, name), key=lambda t: t[0])
    print(f"worst finite-difference relative error {worst[0]:.2e} ({worst[1]})")
    assert worst[0] < 1e-6, worst


# ---------------------------------------------------------------------------------------------
# 3. torch eager matches numpy


@pytest.mark.parametrize("act,tied", [("relu", True), ("silu", False)])
def test_torch_matches_numpy(act, tied):
    pytest.importorskip("torch")
    from torch_model import TorchGPT

    cfg, params, alphas, batch, mn = tiny_model(act, tied, seed=5)
    mt = TorchGPT(cfg, params, alphas, dtype=np.float64)
    ln, gn = mn.loss_and_grads(batch)
    lt, gt = mt.loss_and_grads(batch)
    assert rel(lt, ln) < 1e-12
    assert set(gt) == set(gn)
    for name in gn:
        scale = np.max(np.abs(gn[name]))
        assert np.max(np.abs(gt[name] - gn[name])) <= 1e-10 * scale, name
    assert rel(mt.logits(batch[1][:4]), mn.logits(batch[1][:4])) < 1e-10
    for step in range(3):
        lr = 0.01 * (step + 1)
        assert rel(mt.train_step(batch, lr), mn.train_step(batch, lr)) < 1e-10
    pt = mt.numpy_params()
    for name, p in mn.params.items():
        assert np.max(np.abs(pt[name] - p)) < 1e-10, name
    assert rel(mt.loss(batch), mn.loss(batch)) < 1e-10


def test_torch_matches_fixture(anchor):
    pytest.importorskip("torch")
    from torch_model import TorchGPT

    cfg, params, alphas, exp = anchor
    m = TorchGPT(cfg, params, alphas, dtype=np.float64)
    assert rel(m.loss(exp["ids"]), exp["batch_loss"]) < 1e-9
    _, grads = m.loss_and_grads(exp["ids"])
    assert rel(np.linalg.norm(grads["wte"]), exp["grad_norms"]["base.wte"]) < 1e-7


def test_float32_close_to_float64(anchor):
    cfg, params, alphas, exp = anchor
    m32 = NumpyGPT(cfg, params, alphas, dtype=np.float32)
    assert m32.params["wte"].dtype == np.float32
    assert rel(m32.loss(exp["ids"]), exp["batch_loss"]) < 1e-5
