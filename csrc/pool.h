/* pool.h: the worker threads that run the parts of one training step at once.
 *
 * mg_pool_run(fn, ctx, n) calls fn(ctx, i) for every i in [0, n) and returns when all calls
 * have returned: part 0 on the calling thread, part i on worker thread i (the same thread for
 * the same i every time, so which thread computes what never depends on timing and results are
 * bit-reproducible). A waiting thread spins for a short while (below) and then sleeps on a
 * condition variable: on a quiet machine the next region's wake-up is a spin away; beside
 * another busy process a waiting thread soon gives its core away instead of burning it.
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

/* Run fn(ctx, i) for i in [0, n). Returns how many parts ran on worker threads (at most
 * MG_POOL_MAX_THREADS - 1; the rest ran on the caller). Callable without the GIL. */
int mg_pool_run(mg_pool_fn fn, void* ctx, int n);

/* Worker threads started so far (tests). */
int mg_pool_threads(void);

#ifdef __cplusplus
}
#endif
#endif
