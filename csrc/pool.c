/* pool.c: see pool.h. */
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define MG_CPU_RELAX() __builtin_ia32_pause()
#else
#define MG_CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

static struct {
    pthread_mutex_t mu;     /* guards the sleeps (never taken on the spinning paths) */
    pthread_cond_t wake;    /* sleeping workers wait here for their ticket */
    pthread_cond_t done;    /* a sleeping caller waits here for the last part to finish */
    pthread_mutex_t busy;   /* held by the caller whose job is running */
    mg_pool_fn fn;          /* the job; written only while none of its parts is claimable */
    void* ctx;
    unsigned long job;      /* jobs posted */
    /* claim = (job & 0xffffffff) << 32 | n_parts << 16 | next part: a thread takes part `next`
     * with one compare-and-swap that also proves the job is still the one it was woken for. */
    unsigned long long claim;
    int finished;           /* parts of the current job that have returned */
    int sleepers;           /* workers asleep on wake (or about to be) */
    int caller_sleeping;    /* the caller is asleep on done (or about to be) */
    int n_threads;          /* workers started */
    /* ticket[w]: the last job worker w was asked to help with. Only the workers a job can use
     * get a ticket; a worker that arrives after every part was taken goes back to waiting, and
     * nobody waits for it. */
    unsigned long ticket[MG_POOL_MAX_THREADS];
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
       PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0, {0}};

#define MG_POOL_HOT_SPIN_NS 20000L   /* the first part of a spin, without yielding */

static __thread int in_part;   /* this thread is running a part: a nested call runs serially */
static int worker_parts;       /* parts the workers have run, over all jobs (mg_pool_run's count) */

static long elapsed_ns(const struct timespec* t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000000L + (t.tv_nsec - t0->tv_nsec);
}

/* Spin until *word != value or spin_ns have passed; 1 if it changed. After MG_POOL_HOT_SPIN_NS
 * the spinner yields every 64 polls: when more threads want the cores than there are (another
 * process, or this job's own threads while one is descheduled), the one that has work runs
 * instead of waiting for the spinner's time slice; on a quiet machine nobody takes the core. */
static int spin_while_equal(const unsigned long* word, unsigned long value, long spin_ns) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        for (int k = 0; k < 64; k++) {
            if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != value) return 1;
            MG_CPU_RELAX();
        }
        long ns = elapsed_ns(&t0);
        if (ns > spin_ns) return 0;
        if (ns > MG_POOL_HOT_SPIN_NS) sched_yield();
    }
}

static int spin_until_equal(const int* word, int value, long spin_ns) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        for (int k = 0; k < 64; k++) {
            if (__atomic_load_n(word, __ATOMIC_ACQUIRE) == value) return 1;
            MG_CPU_RELAX();
        }
        long ns = elapsed_ns(&t0);
        if (ns > spin_ns) return 0;
        if (ns > MG_POOL_HOT_SPIN_NS) sched_yield();
    }
}

#define CLAIM(job, n, next) (((unsigned long long)((job) & 0xffffffffUL) << 32) | ((unsigned long long)(n) << 16) | (unsigned long long)(next))
#define CLAIM_JOB(c) ((unsigned long)((c) >> 32))
#define CLAIM_N(c) ((int)(((c) >> 16) & 0xffff))
#define CLAIM_NEXT(c) ((int)((c) & 0xffff))

/* Take and run parts of job `job` until none is left; returns how many this thread ran (a
 * worker counts each in worker_parts before the part counts as finished). A part
 * is run only after a successful claim of it, and the job cannot end before that part returns,
 * so P.fn and P.ctx are the job's while it runs. The thread that finishes the last part wakes
 * the caller if it sleeps. */
static int run_parts(unsigned long job, int on_worker) {
    int ran = 0;
    unsigned long long c = __atomic_load_n(&P.claim, __ATOMIC_ACQUIRE);
    for (;;) {
        if (CLAIM_JOB(c) != (job & 0xffffffffUL) || CLAIM_NEXT(c) >= CLAIM_N(c)) return ran;
        if (!__atomic_compare_exchange_n(&P.claim, &c, c + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
        int n = CLAIM_N(c);
        P.fn(P.ctx, CLAIM_NEXT(c));
        ran++;
        if (on_worker) __atomic_add_fetch(&worker_parts, 1, __ATOMIC_RELAXED);
        if (__atomic_add_fetch(&P.finished, 1, __ATOMIC_SEQ_CST) == n &&
            __atomic_load_n(&P.caller_sleeping, __ATOMIC_SEQ_CST)) {
            pthread_mutex_lock(&P.mu);
            pthread_cond_signal(&P.done);
            pthread_mutex_unlock(&P.mu);
        }
        c = __atomic_load_n(&P.claim, __ATOMIC_ACQUIRE);
    }
}

/* The sleeps pair a flag with the condition each side checks after setting its own (sequentially
 * consistent on both sides): either the sleeper sees the change, or the waker sees the sleeper
 * and signals under mu, which the sleeper holds until it waits. */
static void* worker_main(void* arg) {
    int w = (int)(intptr_t)arg;
    unsigned long seen = 0;
    for (;;) {
        if (!spin_while_equal(&P.ticket[w], seen, MG_POOL_WORKER_SPIN_NS)) {
            pthread_mutex_lock(&P.mu);
            __atomic_add_fetch(&P.sleepers, 1, __ATOMIC_SEQ_CST);
            while (__atomic_load_n(&P.ticket[w], __ATOMIC_SEQ_CST) == seen) pthread_cond_wait(&P.wake, &P.mu);
            __atomic_sub_fetch(&P.sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&P.mu);
        }
        seen = __atomic_load_n(&P.ticket[w], __ATOMIC_ACQUIRE);
        in_part = 1;
        run_parts(seen, 1);
        in_part = 0;
    }
    return NULL;
}

/* After fork() only the forking thread exists in the child: forget the workers. */
static void reset_in_child(void) {
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.wake, NULL);
    pthread_cond_init(&P.done, NULL);
    pthread_mutex_init(&P.busy, NULL);
    P.n_threads = 0;
    P.claim = 0;
    P.finished = 0;
    P.sleepers = 0;
    P.caller_sleeping = 0;
    for (int w = 0; w < MG_POOL_MAX_THREADS; w++) P.ticket[w] = 0;
    in_part = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, reset_in_child); }

/* Start workers until n - 1 exist (by the caller holding busy). Workers block every signal, so
 * signals reach the interpreter's threads. */
static void start_workers(int n) {
    sigset_t all, old;
    if (P.n_threads >= n - 1 || P.n_threads >= MG_POOL_MAX_THREADS - 1) return;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (P.n_threads < n - 1 && P.n_threads < MG_POOL_MAX_THREADS - 1) {
        int w = P.n_threads + 1;
        pthread_t t;
        __atomic_store_n(&P.ticket[w], 0, __ATOMIC_RELAXED);
        if (pthread_create(&t, NULL, worker_main, (void*)(intptr_t)w) != 0) break;
        pthread_detach(t);
        __atomic_store_n(&P.n_threads, w, __ATOMIC_RELAXED);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

int mg_pool_run_on(mg_pool_fn fn, void* ctx, int n, int n_threads) {
    int i, m, w, before;
    if (n > MG_POOL_MAX_PARTS) n_threads = 1;  /* more parts than a claim word counts: serially */
    if (n <= 1 || n_threads <= 1 || in_part || pthread_mutex_trylock(&P.busy) != 0) {
        for (i = 0; i < n; i++) fn(ctx, i);
        return 0;
    }
    pthread_once(&atfork_once, register_atfork);
    m = n < n_threads ? n : n_threads;
    start_workers(m);
    if (m > P.n_threads + 1) m = P.n_threads + 1;
    before = __atomic_load_n(&worker_parts, __ATOMIC_ACQUIRE);
    P.fn = fn;
    P.ctx = ctx;
    P.job++;
    __atomic_store_n(&P.finished, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&P.claim, CLAIM(P.job, n, 0), __ATOMIC_SEQ_CST);
    for (w = 1; w < m; w++) __atomic_store_n(&P.ticket[w], P.job, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&P.sleepers, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.wake);
        pthread_mutex_unlock(&P.mu);
    }

    in_part = 1;
    run_parts(P.job, 0);
    in_part = 0;

    if (!spin_until_equal(&P.finished, n, MG_POOL_CALLER_SPIN_NS)) {
        pthread_mutex_lock(&P.mu);
        __atomic_store_n(&P.caller_sleeping, 1, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&P.finished, __ATOMIC_SEQ_CST) != n) pthread_cond_wait(&P.done, &P.mu);
        __atomic_store_n(&P.caller_sleeping, 0, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&P.mu);
    }
    int on_workers = __atomic_load_n(&worker_parts, __ATOMIC_ACQUIRE) - before;
    pthread_mutex_unlock(&P.busy);
    return on_workers;
}

int mg_pool_run(mg_pool_fn fn, void* ctx, int n) {
    return mg_pool_run_on(fn, ctx, n, n);
}

int mg_pool_threads(void) {
    return __atomic_load_n(&P.n_threads, __ATOMIC_RELAXED);
}
