"""The step's worker pool (csrc/pool.c): waiting threads sleep, results do not depend on timing,
concurrent callers and fork() are safe."""
import multiprocessing
import os
import pathlib
import sys
import threading
import time

import numpy as np
import pytest

import molecule_gpt as mg
from molecule_gpt import _core


def small_batch(rng, vocab, n_seq, length):
    return [rng.integers(0, vocab, length).tolist() for _ in range(n_seq)]


@pytest.mark.parametrize("slow_part", [0, 1])
def test_a_waiting_thread_sleeps_instead_of_spinning(slow_part):
    """One part computes for 0.3 s of CPU time while the other takes 0.05 s: each thread takes
    one (the first taker is busy long after the other wakes), and the process spends about
    0.35 s of CPU in all, because the thread with nothing left to do (the caller waiting for the
    worker, or the worker waiting for the next job) sleeps after a short spin. A pool that spins
    while it waits (OpenMP's active policy) spends about twice that."""
    _core._pool_busy(2, 1, 0.001)  # start the worker
    cpu0, wall0 = time.process_time(), time.perf_counter()
    on_workers, ran = _core._pool_busy(2, slow_part, 0.3, others=0.05)
    time.sleep(0.2)  # the worker, idle again, must not burn this either
    cpu = time.process_time() - cpu0
    assert on_workers == 1 and ran == 2 and _core.pool_threads() >= 1
    assert cpu < 0.35 + 0.08, f"{cpu:.3f} s of CPU for 0.35 s of work in {time.perf_counter() - wall0:.3f} s"


def test_a_held_up_thread_holds_up_only_its_own_part():
    """Eight parts on two threads, one part held up for 0.3 s (as a thread that lost its core
    would be): the other thread takes all seven others (5 ms each) instead of waiting for a
    fixed share. A static split gives each thread four parts."""
    _core._pool_busy(2, 1, 0.001)  # start the worker
    wall0 = time.perf_counter()
    on_workers, ran = _core._pool_busy(8, 0, 0.0, n_threads=2, others=0.005, nap=0.3)
    wall = time.perf_counter() - wall0
    assert ran == 8
    assert on_workers in (1, 7), f"the worker ran {on_workers} of 8 parts in {wall:.3f} s"
    assert _core._pool_busy(8, 0, 0.0, n_threads=1) == (0, 8)  # one thread: all on the caller


def test_every_part_runs_however_many_are_asked():
    """One part runs on the caller; a job of more parts than the pool has threads runs them all."""
    assert _core._pool_busy(1, 0, 0.0) == (0, 1)
    on_workers, ran = _core._pool_busy(3, 2, 0.01, others=0.01)
    assert ran == 3 and 1 <= on_workers <= 2
    on_workers, ran = _core._pool_busy(300, 299, 0.0)
    assert ran == 300 and _core.pool_threads() <= 255


def run_steps(n_threads, batches, results, key):
    model = mg.Model(mg.Config(n_layer=1, n_embd=32, n_head=4, block_size=16, batch_size=4), 29,
                     dtype="float64", seed=3, n_threads=n_threads)
    losses = [model.train_step(b, 0.01) for b in batches]
    results[key] = (losses, {k: v.copy() for k, v in model.params().items()})


def test_steps_from_two_threads_at_once_equal_steps_run_alone():
    """Two models training in two Python threads share the pool (one of them runs its parts
    on its own thread while the pool is busy): each ends bit-identical to a run alone."""
    rng = np.random.default_rng(5)
    batches = [small_batch(rng, 29, 4, 17) for _ in range(30)]
    alone = {}
    run_steps(2, batches, alone, "a")
    together = {}
    threads = [threading.Thread(target=run_steps, args=(2, batches, together, k)) for k in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in "xy":
        assert together[key][0] == alone["a"][0]
        for name, value in alone["a"][1].items():
            assert np.array_equal(together[key][1][name], value), name


def _train_in_child(queue):
    rng = np.random.default_rng(5)
    out = {}
    run_steps(2, [small_batch(rng, 29, 4, 17) for _ in range(3)], out, "c")
    queue.put(out["c"][0])


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_starts_its_own_workers():
    """fork() copies only the forking thread: the child must not wait for the parent's workers."""
    rng = np.random.default_rng(5)
    out = {}
    run_steps(2, [small_batch(rng, 29, 4, 17) for _ in range(3)], out, "parent")
    assert _core.pool_threads() >= 1
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_train_in_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == out["parent"][0]


def test_training_is_bit_reproducible_on_the_pool():
    rng = np.random.default_rng(8)
    batches = [small_batch(rng, 29, 4, 17) for _ in range(20)]
    a, b = {}, {}
    run_steps(2, batches, a, "r")
    run_steps(2, batches, b, "r")
    assert a["r"][0] == b["r"][0]
    for name, value in a["r"][1].items():
        assert np.array_equal(b["r"][1][name], value)


@pytest.mark.skipif(os.cpu_count() is None, reason="needs the core count")
def test_the_pool_starts_no_more_workers_than_asked():
    n = _core.pool_threads()
    assert _core._pool_busy(2, 0, 0.01, others=0.01) == (1, 2)
    assert _core.pool_threads() == max(n, 1)


def test_a_batch_smaller_than_the_threads_trains():
    """batch_size 1 on 2 threads (one part gets nothing) and on 4 threads a batch of 3: both
    train and give the losses the single-threaded model gives."""
    rng = np.random.default_rng(2)
    for batch_size, threads in ((1, 2), (3, 4)):
        batch = small_batch(rng, 29, batch_size, 17)
        losses = []
        for n_threads in (1, threads):
            model = mg.Model(mg.Config(n_layer=1, n_embd=32, n_head=4, block_size=16, batch_size=batch_size), 29,
                             dtype="float64", seed=3, n_threads=n_threads)
            losses.append([model.train_step(batch, 0.01) for _ in range(3)])
        np.testing.assert_allclose(losses[0], losses[1], rtol=1e-12)


def test_the_claim_protocol_under_thread_sanitizer(tmp_path):
    """tests/native/pool_stress.c: three threads post random jobs to csrc/pool.c at once; every
    part runs exactly once and ThreadSanitizer finds no data race."""
    import shutil
    import subprocess

    root = pathlib.Path(__file__).resolve().parent.parent
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "pool_stress"
    # a sanitizer run of this suite preloads ASan into every child: TSan must not have it
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    build = subprocess.run([cc, "-O1", "-g", "-fsanitize=thread", "-I", str(root / "csrc"),
                            str(root / "tests" / "native" / "pool_stress.c"), str(root / "csrc" / "pool.c"),
                            "-o", str(exe), "-lpthread"], capture_output=True, text=True, env=env)
    if build.returncode != 0:
        pytest.skip(f"cannot build with -fsanitize=thread: {build.stderr.strip()[:200]}")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                         env={**env, "TSAN_OPTIONS": "halt_on_error=1"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
