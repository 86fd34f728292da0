/* pool.h: the worker threads that run the parts of one training step at once.
 *
 * mg_pool_run_on(fn, ctx, n, n_threads) calls fn(ctx, i) for every i in [0, n) on up to n_threads
 * threads (the caller and n_threads - 1 workers) and returns when all calls have returned.
 * Parts are taken in order by whichever of those threads is free, so fn(ctx, i) must compute
 * the same whichever thread runs it (each part writes its own outputs): results are then
 * bit-reproducible, and a thread that lost its core to another process does not hold the job
 * up, since the others take the parts it has not started. A worker that wakes after every part
 * was taken goes back to waiting; nobody waits for it. A waiting thread spins for a short
 * while (below) and then sleeps on a condition variable: on a quiet machine the next region's
 * wake-up is a spin away; beside another busy process a waiting thread soon gives its core
 * away instead of burning it.
 *
 * Why C: threads, atomics with explicit memory order and pthread_atfork are not expressible in
 * portable Cython. OpenMP's runtime spins for a fixed count (and forever under
 * OMP_WAIT_POLICY=active) and is tuned only through environment variables read at load time.
 *
 * One pool per process (per extension that links this file). A call that finds the pool in use
 * by another thread, or inside one of its own parts, runs its parts one after another on the
 * calling thread: same results, no deadlock. If a worker thread cannot be started the parts it
 * would run are run by the caller too.
 */
#ifndef MG_POOL_H
#define MG_POOL_H

#ifdef __cplusplus
extern "C" {
#endif

#define MG_POOL_MAX_THREADS 256
#define MG_POOL_MAX_PARTS 0xffff   /* a job of more parts runs serially on the caller */
/* How long a waiting thread spins before it sleeps. A worker waits between the parallel
 * regions of consecutive steps (the step's Python and serial parts: well under a millisecond at
 * the default config), so it spins that long; waking a sleeping thread costs tens of
 * microseconds (on a virtual machine, an idle vCPU's wake-up). The caller waits only for the
 * other parts of its own job, which take as long as its own unless a core is busy: a short spin,
 * then it sleeps and gives its core to the thread that still works. */
#ifndef MG_POOL_WORKER_SPIN_NS
#define MG_POOL_WORKER_SPIN_NS 1000000L
#endif
#ifndef MG_POOL_CALLER_SPIN_NS
#define MG_POOL_CALLER_SPIN_NS 200000L
#endif

typedef void (*mg_pool_fn)(void* ctx, int part);

/* Run fn(ctx, i) for i in [0, n) on at most n_threads threads (at most MG_POOL_MAX_THREADS).
 * Returns how many parts ran on worker threads (the rest ran on the caller). Callable without
 * the GIL. */
int mg_pool_run_on(mg_pool_fn fn, void* ctx, int n, int n_threads);

/* mg_pool_run_on with as many threads as parts (a product split into one part per thread). */
int mg_pool_run(mg_pool_fn fn, void* ctx, int n);

/* Worker threads started so far (tests). */
int mg_pool_threads(void);

#ifdef __cplusplus
}
#endif
#endif
