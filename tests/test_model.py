"""The Model through its public API: the original's numbers, whole-model gradients, growth,
arena sizing and validation."""
import json
import pathlib
import sys

import numpy as np
import pytest

import molecule_gpt as mg
from molecule_gpt.compat import load_original_checkpoint, model_from_original

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "anchor-small"  # see fixtures/README.md
BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def original():
    doc = json.loads((FIXTURE / "checkpoint.json").read_text())
    expected = json.loads((FIXTURE / "expected.json").read_text())
    return doc, expected


def tiny_config(**overrides):
    base = dict(n_layer=2, n_embd=8, n_head=4, block_size=6, head_types=("content", "rrpram", "hybrid", "hybrid"),
                batch_size=3, delta_rank=2)
    base.update(overrides)
    return mg.Config(**base)


def random_batch(rng, V, lengths):
    return [rng.integers(0, V, size=n).tolist() for n in lengths]


# --------------------------------------------------------------------------------------------- the original


def test_fixture_losses_and_last_logits(original):
    doc, expected = original
    model = model_from_original(doc, dtype="float64")
    assert model.config.tie_embeddings and "lm_head" not in model.params()
    losses = model.sequence_losses(expected["ids"])
    for got, want in zip(losses, expected["loss_per_sequence"]):
        assert got == pytest.approx(want, rel=1e-9)
    T = model.config.block_size
    for ids, want in zip(expected["ids"], expected["last_logits"]):
        n = min(T, len(ids) - 1)  # the last position that has a target
        got = model.logits(ids[:n])[-1]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=0)


def test_fixture_batch_loss_and_every_gradient_norm(original):
    doc, expected = original
    model = model_from_original(doc, dtype="float64")
    model.config.batch_size = len(expected["ids"])  # takes effect at the next step
    loss, grads = model.loss_and_grads(expected["ids"])
    assert loss == pytest.approx(expected["batch_loss"], rel=1e-9)
    assert len(expected["grad_norms"]) == len(grads) + 1  # base.wte and base.lm_head are one matrix
    for name, want in expected["grad_norms"].items():
        ours = name.removeprefix("base.")
        ours = "wte" if ours == "lm_head" else ours
        assert np.linalg.norm(grads[ours]) == pytest.approx(want, rel=1e-7), name


def test_load_original_checkpoint_returns_model_and_char_tokenizer(original):
    _, expected = original
    pytest.importorskip("molecule_gpt.tokenizer")
    model, tok = load_original_checkpoint(FIXTURE / "checkpoint.json")
    for text, ids in zip(expected["probe_texts"], expected["ids"]):
        assert tok.encode(text) == ids
    assert tok.vocab_size == model.vocab_size  # the original's vocabulary, row for row
    with pytest.raises(mg.TokenizerError):
        tok.encode("Zebra!")  # 'Z' and '!' were never seen: an error, never a silent drop


def test_original_checkpoint_errors_name_the_problem(tmp_path, original):
    doc, _ = original
    bad = dict(doc, base={k: v for k, v in doc["base"].items() if k != "l0.wq"})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(mg.CheckpointError, match="l0.wq"):
        load_original_checkpoint(path)
    path.write_text("{not json")
    with pytest.raises(mg.CheckpointError, match="bad.json"):
        load_original_checkpoint(path)


def test_untied_original_imports_untied(original):
    doc, expected = original
    base = dict(doc["base"])
    base["lm_head"] = (np.asarray(base["lm_head"]) * 1.01).tolist()  # what the original's training does after load
    with pytest.warns(UserWarning, match="untied"):
        model = model_from_original(dict(doc, base=base))
    assert not model.config.tie_embeddings
    np.testing.assert_array_equal(model.params()["lm_head"], np.asarray(base["lm_head"]))


# --------------------------------------------------------------------------------------------- gradients


def numeric_param_grad(model, batch, name, eps=1e-5):
    # central differences: truncation error ~eps^2, roundoff ~loss * 1e-16 / eps, and a step small enough not to cross a relu kink
    p = model.params()[name]
    g = np.zeros_like(p)
    flat = p.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = model.loss(batch)
        flat[i] = old - eps
        minus = model.loss(batch)
        flat[i] = old
        g.reshape(-1)[i] = (plus - minus) / (2 * eps)
    return g


@pytest.mark.parametrize("activation,tied", [("relu", True), ("silu", False)])
def test_whole_model_gradients_match_finite_differences(activation, tied):
    rng = np.random.default_rng(7)
    # larger init than the default: every gradient, alpha's included, well above the
    # finite-difference roundoff (loss * 1e-16 / eps)
    config = tiny_config(mlp_activation=activation, tie_embeddings=tied, init_std=0.5, delta_init_std=0.3)
    model = mg.Model(config, 11, dtype="float64", seed=3)
    model.add_delta_module(alpha=1.0)
    model.add_delta_module(alpha=0.5)
    for key, value in model.params().items():
        if key.endswith(".alpha"):
            value[...] = rng.normal()  # away from the init so sigmoid' is generic
    batch = random_batch(rng, 11, [9, 4, 2])  # longer than block_size, short, minimal
    _, grads = model.loss_and_grads(batch)
    assert set(grads) == set(model.params())
    kinds = set()
    for name in grads:
        numeric = numeric_param_grad(model, batch, name)
        err = np.linalg.norm(grads[name] - numeric) / max(np.linalg.norm(numeric), np.linalg.norm(grads[name]), 1e-12)
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
        kinds.add(name.split(".")[-1])
    assert {"wte", "wpe", "wq", "fc2", "w_pattern", "alpha", "A", "B"} <= kinds
    assert ("lm_head" in kinds) == (not tied)


def test_tied_gradient_is_the_sum_of_both_uses():
    rng = np.random.default_rng(0)
    tied = mg.Model(tiny_config(), 13, dtype="float64", seed=1)
    untied = mg.Model(tiny_config(tie_embeddings=False), 13, dtype="float64", seed=1)
    for name, value in tied.params().items():
        untied.params()[name][...] = value
    untied.params()["lm_head"][...] = tied.params()["wte"]
    batch = random_batch(rng, 13, [7, 5])
    loss_t, g_t = tied.loss_and_grads(batch)
    loss_u, g_u = untied.loss_and_grads(batch)
    assert loss_t == pytest.approx(loss_u, rel=1e-12)
    np.testing.assert_allclose(g_t["wte"], g_u["wte"] + g_u["lm_head"], rtol=1e-10, atol=1e-14)


def test_float32_and_float64_agree():
    rng = np.random.default_rng(5)
    m64 = mg.Model(mg.Config(), 90, dtype="float64", seed=11)
    m32 = mg.Model(mg.Config(), 90, dtype="float32", seed=11)
    for name, value in m64.params().items():
        value[...] = m32.params()[name]  # identical starting point
    batch = random_batch(rng, 90, [97, 50, 97, 20])
    l64, g64 = m64.loss_and_grads(batch)
    l32, g32 = m32.loss_and_grads(batch)
    assert l32 == pytest.approx(l64, rel=1e-5)
    for name in g64:
        err = np.linalg.norm(g32[name] - g64[name]) / max(np.linalg.norm(g64[name]), 1e-12)
        assert err < 1e-3, name


def test_worker_count_does_not_change_the_math():
    rng = np.random.default_rng(12)
    batch = random_batch(rng, 11, [9, 3, 7, 5, 2])
    results = []
    for n_threads in (1, 2, 3):
        model = mg.Model(tiny_config(batch_size=5), 11, dtype="float64", seed=6, n_threads=n_threads)
        model.add_delta_module()
        results.append(model.loss_and_grads(batch))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-13)
        for name, g in grads.items():
            np.testing.assert_allclose(g, results[0][1][name], rtol=1e-11, atol=1e-15)


def test_worker_count_does_not_change_training():
    """train_step on 1, 2 and 3 workers (gradients zeroed by each worker, summed inside Adam):
    same trajectory, and the groups' gradients hold the batch gradient afterwards."""
    rng = np.random.default_rng(14)
    batches = [random_batch(rng, 11, [9, 3, 7, 5, 2]) for _ in range(4)]
    runs = []
    for n_threads in (1, 2, 3):
        model = mg.Model(tiny_config(batch_size=5), 11, dtype="float64", seed=6, n_threads=n_threads)
        model.add_delta_module()
        losses = [model.train_step(b, 0.01) for b in batches]
        _, grads = model.loss_and_grads(batches[-1])
        model.train_step(batches[-1], 0.0)
        after = {k: v.copy() for k, v in model.groups["delta0"].grads.items()}
        runs.append((losses, grads, after, {k: v.copy() for k, v in model.params().items()}))
    for losses, grads, after, params in runs:
        np.testing.assert_allclose(losses, runs[0][0], rtol=1e-12)
        for k, v in params.items():
            np.testing.assert_allclose(v, runs[0][3][k], rtol=1e-10, atol=1e-14)
        for k, v in after.items():
            np.testing.assert_allclose(v, grads["delta0." + k], rtol=1e-11, atol=1e-15)


def test_own_products_train_like_the_blas_twin():
    """csrc/gemm.h's products (adapters, tails, patterns included) against BLAS over whole
    training steps: the same trajectory in float64; BLAS's thread count is restored after each."""
    from threadpoolctl import threadpool_info
    from molecule_gpt import _core

    rng = np.random.default_rng(21)
    batches = [random_batch(rng, 37, [97, 40, 97, 13]) for _ in range(3)]
    threads_before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    runs = []
    for blas in (False, True):
        _core._blas_linear(blas)
        try:
            model = mg.Model(mg.Config(), 37, dtype="float64", seed=8)
            model.add_delta_module()
            model.add_delta_module()
            runs.append(([model.train_step(b, 0.01) for b in batches], model.params()))
            assert _core.step_uses_blas() == blas or _core.attention_simd_path() == "portable"
        finally:
            _core._blas_linear(False)
        assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == threads_before
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-12)
    for name, value in runs[0][1].items():
        np.testing.assert_allclose(value, runs[1][1][name], rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not pathlib.Path("/proc/self/statm").exists(), reason="reads the RSS from /proc")
def test_threads_that_end_leave_no_scratch_behind():
    """Each thread that runs a step gets its own product scratch (csrc/gemm.h); it must go with
    the thread (the organism's trainer threads come and go). It used to stay: ~0.3 MB each."""
    import os
    import threading

    def rss_mb():
        return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    batch = random_batch(np.random.default_rng(3), 96, [97] * 4)
    model = mg.Model(mg.Config(), 96, dtype="float32", seed=0, n_threads=1)

    def in_new_threads(n):
        for _ in range(n):
            t = threading.Thread(target=model.loss_and_grads, args=(batch,))
            t.start()
            t.join()

    in_new_threads(20)
    before = rss_mb()
    in_new_threads(200)
    assert rss_mb() - before < 20  # leaking, 200 threads held about 57 MB


@pytest.mark.parametrize("activation,tied", [("relu", True), ("silu", True), ("relu", False)])
def test_leftover_gradients_of_a_previous_step_change_nothing(activation, tied):
    """Backward zeroes only the gradients that are accumulated; single-consumer outputs and
    parameter gradients of linears are written whole (no zeroing). A step after a different
    batch (its values left in the arena and the gradient buffers) must give bit-identical
    results to the same step on a fresh model."""
    rng = np.random.default_rng(15)
    first, second = random_batch(rng, 11, [7, 4, 6]), random_batch(rng, 11, [5, 7, 3])
    config = dict(mlp_activation=activation, tie_embeddings=tied)
    fresh = mg.Model(tiny_config(**config), 11, dtype="float64", seed=4, n_threads=1)
    used = mg.Model(tiny_config(**config), 11, dtype="float64", seed=4, n_threads=1)
    fresh.add_delta_module()
    used.add_delta_module()
    used.loss_and_grads(first)
    loss_a, grads_a = fresh.loss_and_grads(second)
    loss_b, grads_b = used.loss_and_grads(second)
    assert loss_a == loss_b
    for name, g in grads_a.items():
        assert np.array_equal(g, grads_b[name]), name


def test_equal_length_fast_path_validates_like_the_general_one():
    model = mg.Model(tiny_config(), 11, dtype="float64", seed=4)
    rng = np.random.default_rng(16)
    batch = random_batch(rng, 11, [7, 7, 7])
    as_arrays = [np.array(s) for s in batch]  # not a list of lists: the general path
    assert model.loss(batch) == model.loss(as_arrays)
    with pytest.raises(ValueError, match=r"batch\[1\] holds token id 11"):
        model.loss([[1, 2, 3], [4, 11, 5], [0, 1, 2]])
    with pytest.raises(TypeError, match=r"batch\[0\] must be a flat list of ints"):
        model.loss([[True, False], [1, 2]])
    with pytest.raises(TypeError, match=r"batch\[0\] must be a flat list of ints"):
        model.loss([[0.5, 1.0], [1.0, 2.0]])


def test_ragged_ids_takes_only_lists_of_plain_ints():
    """The Cython fast path: lists of plain ints in range become one int32 array of the ids
    back to back and their lengths; anything else is None (the general checks then accept it
    or name the problem)."""
    from molecule_gpt import _core
    flat, lengths = _core.ragged_ids([[0, 1, 10], [3], [], [4, 5]], 11)
    assert flat.dtype == np.intc and flat.tolist() == [0, 1, 10, 3, 4, 5]
    assert lengths.tolist() == [3, 1, 0, 2]
    for batch in ([], [[1, 2], (3, 4)], ([1, 2],), [[1, 11]], [[-1, 2]], [[1, True]], [[1, np.int64(2)]],
                  [[1, 2.0]], [[1, 2 ** 70]], [np.array([1, 2])], [[1, [2]]]):
        assert _core.ragged_ids(batch, 11) is None, batch
    # bools and numpy ints inside rows still train, through the general path; ragged batches
    # through the fast path score as their sequences do one by one
    model = mg.Model(tiny_config(), 11, dtype="float64", seed=4)
    assert model.loss([[1, True, 3], [4, 5, 6]]) == model.loss([[1, 1, 3], [4, 5, 6]])
    assert model.loss([[1, np.int64(2), 3]]) == model.loss([[1, 2, 3]])
    ragged = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    assert model.sequence_losses(ragged) == [model.loss([s]) for s in ragged]
    assert model.sequence_losses(ragged) == model.sequence_losses([np.array(s) for s in ragged])


def test_pack_batch_lays_sequences_back_to_back():
    """_core.pack_batch against the layout written out in numpy: each sequence's first
    min(block, len - 1) positions, targets shifted by one, weights 1 / (n_s * total)."""
    from molecule_gpt import _core
    rng = np.random.default_rng(5)
    for block in (1, 4, 9):
        seqs = [rng.integers(0, 50, int(k)).astype(np.intc) for k in rng.integers(2, 15, 6)]
        ids, pos, targets, weights, off, n, sq_off, SS = _core.pack_batch(seqs, block, 7)
        ns = [min(block, len(a) - 1) for a in seqs]
        assert n.tolist() == ns and off.tolist() == np.concatenate([[0], np.cumsum(ns)[:-1]]).tolist()
        assert ids.tolist() == [int(x) for a, k in zip(seqs, ns) for x in a[:k]]
        assert targets.tolist() == [int(x) for a, k in zip(seqs, ns) for x in a[1:k + 1]]
        assert pos.tolist() == [t for k in ns for t in range(k)]
        assert weights.tolist() == [1.0 / (k * 7) for k in ns for _ in range(k)]
        sq = [k * k for k in ns]
        assert sq_off.tolist() == np.concatenate([[0], np.cumsum(sq)[:-1]]).tolist() and SS == sum(sq)
        assert ids.dtype == pos.dtype == targets.dtype == off.dtype == n.dtype == np.intc and sq_off.dtype == np.intp
    with pytest.raises(ValueError):  # the caller converts: another dtype is refused, not misread
        _core.pack_batch([np.arange(4, dtype=np.int64)], 4, 1)
    with pytest.raises(ValueError, match="sequence 1 has fewer than 2 ids"):
        _core.pack_batch([np.arange(3, dtype=np.intc), np.arange(1, dtype=np.intc)], 4, 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        _core.pack_batch([np.arange(3, dtype=np.intc)], 4, 0)


def test_batch_loss_is_mean_of_independent_sequence_losses():
    rng = np.random.default_rng(2)
    model = mg.Model(tiny_config(), 11, dtype="float64", seed=4)
    batch = random_batch(rng, 11, [8, 3, 6])
    singles = [model.loss([s]) for s in batch]
    assert model.loss(batch) == pytest.approx(np.mean(singles), rel=1e-13)
    assert model.sequence_losses(batch) == pytest.approx(singles, rel=1e-13)
    # larger-than-arena batches are evaluated in chunks with the same value
    assert model.loss(batch * 3) == pytest.approx(np.mean(singles), rel=1e-13)


def test_token_nats_are_each_targets_cross_entropy():
    """token_nats: -ln softmax(logits)[next id] at every position (a sequence longer than the
    window scores its first block_size targets), in order, also for batches larger than the
    arenas; sequence_losses is each one's mean."""
    rng = np.random.default_rng(5)
    model = mg.Model(tiny_config(), 11, dtype="float64", seed=4)
    T = model.config.block_size
    batch = random_batch(rng, 11, [8, 3, T + 5, 2]) * 3
    got = model.token_nats(batch)
    for seq, nats in zip(batch, got):
        n = min(len(seq) - 1, T)
        z = model.logits(seq[:n])
        logp = z - z.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        assert nats.dtype == np.float64 and nats.shape == (n,)
        np.testing.assert_allclose(nats, -logp[np.arange(n), seq[1:n + 1]], rtol=1e-12)
    assert model.sequence_losses(batch) == [float(x.mean()) for x in got]


# --------------------------------------------------------------------------------------------- training


def test_train_step_returns_pre_update_loss_and_learns():
    rng = np.random.default_rng(9)
    model = mg.Model(tiny_config(), 11, dtype="float64", seed=2)
    batch = random_batch(rng, 11, [7, 7, 7])
    before = model.loss(batch)
    assert model.train_step(batch, 0.01) == pytest.approx(before, rel=1e-13)
    for _ in range(60):
        model.train_step(batch, 0.01)
    assert model.loss(batch) < 0.6 * before


def numpy_reference(config, params, alphas):
    """The independent plain-numpy implementation kept in benchmarks/ (no shared code)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from numpy_model import NumpyGPT
    finally:
        sys.path.remove(str(BENCHMARKS))
    return NumpyGPT(config.to_dict(), {k: v.copy() for k, v in params.items()}, list(alphas), dtype=np.float64)


def test_ten_step_trajectory_matches_the_numpy_reference():
    rng = np.random.default_rng(4)
    config = tiny_config()
    model = mg.Model(config, 11, dtype="float64", seed=8)
    model.add_delta_module(alpha=0.7)
    ref = numpy_reference(config, model.params(), [0.7])
    batches = [random_batch(rng, 11, [7, 5, 3]) for _ in range(10)]
    ours = [model.train_step(b, 0.01) for b in batches]
    theirs = [ref.train_step(b, 0.01) for b in batches]
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)
    assert ours[-1] < ours[0]


def test_frozen_group_does_not_move():
    rng = np.random.default_rng(3)
    model = mg.Model(tiny_config(), 11, dtype="float64", seed=2)
    model.add_delta_module()
    model.set_trainable("base", False)
    base_before = {k: v.copy() for k, v in model.groups["base"].params.items()}
    batch = random_batch(rng, 11, [7, 7])
    _, grads = model.loss_and_grads(batch)
    assert all(k.startswith("delta0.") for k in grads)
    model.train_step(batch, 0.05)
    for k, v in model.groups["base"].params.items():
        assert np.array_equal(v, base_before[k]), k


def test_frozen_groups_keep_zero_gradients_across_workers():
    """Steps zero and sum only trainable groups' gradients; a frozen group's buffer is cleared
    on freezing and stays zero, and the trainable gradients match a one-worker model."""
    rng = np.random.default_rng(13)
    batch = random_batch(rng, 11, [7, 4, 6])
    models = []
    for n_threads in (1, 2):
        model = mg.Model(tiny_config(), 11, dtype="float64", seed=3, n_threads=n_threads)
        model.add_delta_module()
        model.train_step(batch, 0.01)  # delta0 and base now hold nonzero gradients
        model.set_trainable("delta0", False)
        model.set_trainable("base", False)
        model.add_delta_module()
        models.append((model, model.loss_and_grads(batch)))
        model.train_step(batch, 0.01)
        assert not model.groups["delta0"].grad.any() and not model.groups["base"].grad.any()
    (_, (loss1, grads1)), (_, (loss2, grads2)) = models
    assert sorted(grads1) == sorted(grads2) and all(k.startswith("delta1.") for k in grads1)
    assert loss2 == pytest.approx(loss1, rel=1e-13)
    for name, g in grads1.items():
        np.testing.assert_allclose(grads2[name], g, rtol=1e-11, atol=1e-15)


def test_growth_mid_run_keeps_training_and_old_state():
    rng = np.random.default_rng(6)
    model = mg.Model(tiny_config(), 11, dtype="float32", seed=2)
    batch = random_batch(rng, 11, [7, 7, 5])
    for _ in range(3):
        model.train_step(batch, 0.01)
    wte_before = model.params()["wte"].copy()
    m_before = model.groups["base"].moments()[0]["wte"].copy()
    model.add_delta_module(zero_output=True)
    assert model.loss(batch) == pytest.approx(model.loss(batch))
    model.grow_vocab(15)
    assert np.array_equal(model.params()["wte"][:11], wte_before)
    assert np.array_equal(model.groups["base"].moments()[0]["wte"][:11], m_before)
    assert not model.groups["base"].moments()[0]["wte"][11:].any()
    assert model.init_embed_snapshot.shape == (15, 8)
    assert not model.init_embed_snapshot[11:].any()  # rows born later count whole in gamma (design.md §6)
    batch = random_batch(rng, 15, [7, 7, 5])
    losses = [model.train_step(batch, 0.01) for _ in range(5)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    model.add_delta_module()
    assert np.isfinite(model.train_step(batch, 0.01))


def test_zero_output_module_is_an_exact_no_op():
    rng = np.random.default_rng(1)
    model = mg.Model(tiny_config(), 11, dtype="float64", seed=5)
    batch = random_batch(rng, 11, [7, 4])
    before = model.loss(batch)
    model.add_delta_module(zero_output=True)
    assert model.loss(batch) == before


# --------------------------------------------------------------------------------------------- arena


@pytest.mark.parametrize("n_threads", [1, 2])
def test_arena_is_exactly_full_at_the_largest_batch(n_threads):
    rng = np.random.default_rng(0)
    config = tiny_config(batch_size=4)
    model = mg.Model(config, 11, dtype="float32", n_threads=n_threads)
    model.add_delta_module()
    model.loss_and_grads(random_batch(rng, 11, [config.block_size + 1] * config.batch_size))
    assert model.arena_high_water == model.arena_capacity


@pytest.mark.parametrize("n_threads", [1, 2])
def test_batch_larger_than_the_arena_runs_in_chunks_with_the_same_numbers(n_threads):
    """More sequences than Config.batch_size: loss, gradients and the Adam step are those of one
    run with arenas large enough (float64, up to the order of the additions)."""
    rng = np.random.default_rng(0)
    small = mg.Model(tiny_config(batch_size=2), 11, dtype="float64", seed=3, n_threads=n_threads)
    big = mg.Model(tiny_config(batch_size=5), 11, dtype="float64", seed=3, n_threads=n_threads)
    for m in (small, big):
        m.add_delta_module()
    batch = random_batch(rng, 11, [7, 5, 7, 3, 6])
    (l1, g1), (l2, g2) = small.loss_and_grads(batch), big.loss_and_grads(batch)
    assert l1 == pytest.approx(l2, rel=1e-13)
    assert g1.keys() == g2.keys()
    for k in g2:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-10, atol=1e-15, err_msg=k)
    assert small.train_step(batch, 0.01) == pytest.approx(big.train_step(batch, 0.01), rel=1e-13)
    for name, group in big.groups.items():
        np.testing.assert_allclose(small.groups[name].flat, group.flat, rtol=1e-10, atol=1e-15, err_msg=name)
    assert small.loss(batch) == pytest.approx(big.loss(batch), rel=1e-13)


@pytest.mark.parametrize("n_threads", [2, 3])
def test_sequences_are_dealt_to_the_least_loaded_worker_and_a_batch_always_fits(n_threads):
    """A run deals its sequences longest first, each to the worker with the fewest positions so
    far: every sequence exactly once, a long line alone beside short ones, equal lengths in
    turn; and any batch of Config.batch_size sequences of at most block_size + 1 tokens still
    runs at once (the arenas are sized for it)."""
    from molecule_gpt.model import _deal
    assert _deal([5, 90, 7, 6], 2) == [[1], [2, 3, 0]]
    assert _deal([9, 9, 9, 9], 2) == [[0, 2], [1, 3]]
    assert _deal([4], 3) == [[0]]
    rng = np.random.default_rng(1)
    config = tiny_config(batch_size=5)
    model = mg.Model(config, 11, dtype="float32", n_threads=n_threads)
    model.loss(random_batch(rng, 11, [3, 4]))  # the workers exist from the first run on
    T = config.block_size
    for _ in range(300):
        lengths = rng.integers(2, T + 2, config.batch_size)
        shares = _deal([min(T, k - 1) for k in lengths], n_threads)
        assert sorted(i for share in shares for i in share) == list(range(config.batch_size))
        seqs = model._validate(random_batch(rng, 11, list(lengths)))
        assert list(model._arena_chunks(seqs)) == [(0, config.batch_size)], lengths
    loss = model.train_step(random_batch(rng, 11, [T + 1, 2, 3, T, 2]), 0.01)
    assert np.isfinite(loss) and model.arena_high_water <= model.arena_capacity


def test_arena_grows_with_vocabulary_and_modules():
    model = mg.Model(tiny_config(), 11)
    cap = model.arena_capacity
    model.grow_vocab(40)
    assert model.arena_capacity > cap
    cap = model.arena_capacity
    model.add_delta_module()
    assert model.arena_capacity > cap


# --------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fields,match", [
    (dict(n_embd=30, n_head=4), "n_embd .* divisible by Config.n_head"),
    (dict(head_types=("content",) * 3), "head_types has 3 entries but n_head is 4"),
    (dict(head_types=("content", "content", "weird", "hybrid")), r"head_types\[2\] is 'weird'"),
    (dict(n_layer=0), "n_layer must be a positive int"),
    (dict(block_size=-5), "block_size must be a positive int"),
    (dict(n_embd=12, n_head=4), "head dim .* must be even"),
    (dict(mlp_activation="gelu"), "mlp_activation"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(bpe_growth_merges=0), "bpe_growth_merges must be a positive int"),
    (dict(bpe_max_vocab=True), "bpe_max_vocab must be a positive int"),
    (dict(bpe_growth_steps=-1), "bpe_growth_steps must be a non-negative int"),
])
def test_config_validation_names_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        mg.Config(**fields)


def test_shape_fields_cannot_change_on_a_built_model():
    model = mg.Model(tiny_config(), 11)
    model.config.n_embd = 16
    with pytest.raises(mg.ConfigError, match="n_embd"):
        model.loss([[1, 2, 3]])


@pytest.mark.parametrize("batch,error,match", [
    ([[1, 2, 99]], ValueError, r"token id 99, outside the vocabulary \[0, 11\)"),
    ([[1, -1, 2]], ValueError, "token id -1"),
    ([[1]], ValueError, "at least 2"),
    ([], ValueError, "empty"),
    ([[1.5, 2.0]], TypeError, "flat list of ints"),
    ("hello", TypeError, "list of token-id lists"),
])
def test_bad_batches_raise_clear_errors(batch, error, match):
    model = mg.Model(tiny_config(), 11)
    with pytest.raises(error, match=match):
        model.loss_and_grads(batch)


def test_logits_rejects_bad_input():
    model = mg.Model(tiny_config(), 11)
    with pytest.raises(ValueError, match="at most block_size=6"):
        model.logits(list(range(7)))
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        model.logits([0, 11])
    assert model.logits([1, 2, 3]).shape == (3, 11)


# --------------------------------------------------------------------------------------------- folding


@pytest.mark.parametrize("base_trainable", [False, True])
def test_frozen_modules_fold_without_changing_the_math(base_trainable):
    rng = np.random.default_rng(21)
    batch = random_batch(rng, 11, [7, 6, 5])
    folded = mg.Model(tiny_config(), 11, dtype="float64", seed=9, n_threads=1)
    plain = mg.Model(tiny_config(), 11, dtype="float64", seed=9, n_threads=1)
    for m in (folded, plain):
        for alpha in (1.0, 0.5, 0.25):
            m.add_delta_module(alpha=alpha)
    for name, value in plain.params().items():
        value[...] = folded.params()[name]
    for k in (0, 1):
        folded.set_trainable(f"delta{k}", False)
    folded.set_trainable("base", base_trainable)
    plain.set_trainable("base", base_trainable)
    before = {k: v.copy() for k, v in folded.params().items()}
    assert folded.loss(batch) == pytest.approx(plain.loss(batch), rel=1e-13)
    lf, gf = folded.loss_and_grads(batch)
    lp, gp = plain.loss_and_grads(batch)
    assert lf == pytest.approx(lp, rel=1e-13)
    assert set(gf) == {k for k in gp if not k.startswith(("delta0.", "delta1."))}
    for name in gf:
        np.testing.assert_allclose(gf[name], gp[name], rtol=1e-10, atol=1e-14)
    # training: only the live module (and the base, when it trains) moves; the numpy reference
    # updates exactly those parameters without any folding
    ref = numpy_reference(tiny_config(), before, [1.0, 0.5, 0.25])
    live = [k for k in before if k.startswith("delta2.") or (base_trainable and not k.startswith("delta"))]
    for _ in range(3):
        ours = folded.train_step(batch, 0.01)
        theirs = ref.train_step(batch, 0.01, trainable=live)
        assert ours == pytest.approx(theirs, rel=1e-10)
    for name, value in folded.params().items():
        np.testing.assert_allclose(value, ref.params[name], rtol=1e-9, atol=1e-13)
        if name not in live:  # fossils (and a frozen base) are bit-identical
            assert np.array_equal(value, before[name]), name


def test_folding_shrinks_the_arena_to_the_trainable_adapters():
    model = mg.Model(tiny_config(), 11, n_threads=1)
    for _ in range(6):
        model.add_delta_module()
    full = model.arena_capacity
    for k in range(5):
        model.set_trainable(f"delta{k}", False)
    assert model.arena_capacity < full
    one = mg.Model(tiny_config(), 11, n_threads=1)
    one.add_delta_module()
    assert model.arena_capacity == one.arena_capacity
    model.set_trainable("delta0", True)  # unfreezing grows it back: no overflow on the next step
    rng = np.random.default_rng(0)
    assert np.isfinite(model.train_step(random_batch(rng, 11, [7, 7, 7]), 0.01))


def test_many_modules_fold_but_trainable_ones_are_bounded():
    model = mg.Model(tiny_config(), 11, n_threads=1)
    limit = model.MAX_TRAINABLE_MODULES
    for k in range(limit + 5):  # far more modules than can train at once: older ones fossilize
        model.add_delta_module(zero_output=True)
        if k >= 1:
            model.set_trainable(f"delta{k - 1}", False)
    rng = np.random.default_rng(0)
    assert np.isfinite(model.train_step(random_batch(rng, 11, [7, 7]), 0.01))
    for k in range(limit - 1):
        model.set_trainable(f"delta{k}", True)
    with pytest.raises(mg.ConfigError, match=f"at most {limit} delta modules can train at once"):
        model.set_trainable(f"delta{limit}", True)
    assert not model.trainable[f"delta{limit}"]  # refused before any change


def test_tape_records_one_node_per_op_in_topological_order():
    config = tiny_config(n_layer=2)
    model = mg.Model(config, 11, n_threads=1)
    model.loss_and_grads([[1, 2, 3, 4, 5]])
    ops = model._engines[0].tape_ops()
    n_pattern = sum(t != "content" for t in config.head_types)
    layer = (["rmsnorm", "linear", "rope", "rope"] + ["linear"] * n_pattern
             + ["attention", "linear", "add", "rmsnorm", "linear", "gate", "linear", "add"])
    assert ops == ["embed"] + layer * config.n_layer + ["rmsnorm", "linear", "cross_entropy"]
    assert len(ops) == model._engines[0].plan(4, 16)[1]  # the plan counts exactly these nodes


@pytest.mark.parametrize("tied", [True, False])
def test_write_rows_keeps_folded_copies_in_step(tied):
    """write_rows changes rows of a base matrix as writing through params() and refresh() do,
    also where frozen delta modules fold it into a cached copy (lm_head, which is wte when
    tied): the model computes what a model built fresh from its state computes."""
    rng = np.random.default_rng(5)
    model = mg.Model(tiny_config(tie_embeddings=tied, delta_init_std=0.3), 13, dtype="float64", seed=2)
    for k in range(3):
        model.add_delta_module(alpha=0.7)
    for k in range(2):
        model.set_trainable(f"delta{k}", False)  # fossils: folded
    seq = [1, 4, 7, 2, 9]
    model.logits(seq)  # bound and folded
    head = "wte" if tied else "lm_head"
    for name in ("wte", head):
        v0 = model.version
        values = rng.normal(size=(4, model.config.n_embd))
        model.write_rows(name, slice(7, 11), values)
        np.testing.assert_array_equal(model.params()[name][7:11], values)
        assert model.version != v0
        fresh = mg.Model.from_state(*model.export_state())
        np.testing.assert_array_equal(model.logits(seq), fresh.logits(seq))
    model.grow_vocab(16)  # a rebind is pending: the next bind folds from the base
    model.write_rows(head, slice(13, 16), np.ones((3, model.config.n_embd)))
    fresh = mg.Model.from_state(*model.export_state())
    np.testing.assert_array_equal(model.logits(seq), fresh.logits(seq))
    with pytest.raises(ValueError, match="base matrix"):
        model.write_rows("delta0.l0.wq.A", slice(0, 1), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="base matrix"):
        model.write_rows("no_such_matrix", slice(0, 1), np.zeros(1))
