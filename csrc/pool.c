/* pool.c: see pool.h. */
#include "pool.h"

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define MG_CPU_RELAX() __builtin_ia32_pause()
#else
#define MG_CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

static struct {
    pthread_mutex_t mu;     /* guards the job fields, gen and the sleeps */
    pthread_cond_t wake;    /* workers sleep here until gen changes */
    pthread_cond_t done;    /* the caller sleeps here until pending reaches 0 */
    pthread_mutex_t busy;   /* held by the caller whose job is running */
    unsigned long gen;      /* job number: bumped under mu when a job is posted */
    mg_pool_fn fn;          /* the job: parts 1 .. n_parts-1 run on workers 1 .. n_parts-1 */
    void* ctx;
    int n_parts;
    int pending;            /* worker parts not finished yet */
    int n_threads;          /* workers started */
    unsigned long start_gen[MG_POOL_MAX_THREADS];
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
       PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, 0, 0, {0}};

static __thread int in_part;   /* this thread is running a part: a nested call runs serially */

static long elapsed_ns(const struct timespec* t0) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000000L + (t.tv_nsec - t0->tv_nsec);
}

/* Spin until *word != value or MG_POOL_SPIN_NS have passed; 1 if it changed. */
static int spin_while_ulong(const unsigned long* word, unsigned long value) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        for (int k = 0; k < 64; k++) {
            if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != value) return 1;
            MG_CPU_RELAX();
        }
        if (elapsed_ns(&t0) > MG_POOL_SPIN_NS) return 0;
    }
}

static int spin_while_nonzero(const int* word) {
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        for (int k = 0; k < 64; k++) {
            if (__atomic_load_n(word, __ATOMIC_ACQUIRE) == 0) return 1;
            MG_CPU_RELAX();
        }
        if (elapsed_ns(&t0) > MG_POOL_SPIN_NS) return 0;
    }
}

static void* worker_main(void* arg) {
    int w = (int)(intptr_t)arg;
    unsigned long seen = P.start_gen[w];
    for (;;) {
        mg_pool_fn fn;
        void* ctx;
        int n_parts;
        spin_while_ulong(&P.gen, seen);
        /* the job is read under mu, so fn, ctx and n_parts belong to the gen read with them */
        pthread_mutex_lock(&P.mu);
        while (P.gen == seen) pthread_cond_wait(&P.wake, &P.mu);
        seen = P.gen;
        fn = P.fn;
        ctx = P.ctx;
        n_parts = P.n_parts;
        pthread_mutex_unlock(&P.mu);
        if (w >= n_parts) continue;
        in_part = 1;
        fn(ctx, w);
        in_part = 0;
        if (__atomic_sub_fetch(&P.pending, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&P.mu);
            pthread_cond_signal(&P.done);
            pthread_mutex_unlock(&P.mu);
        }
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
    P.pending = 0;
    in_part = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, reset_in_child); }

/* Start workers until n - 1 exist (called under mu, before gen is bumped). Workers block every
 * signal, so signals reach the interpreter's threads. */
static void start_workers(int n) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (P.n_threads < n - 1) {
        int w = P.n_threads + 1;
        pthread_t t;
        P.start_gen[w] = P.gen;
        if (pthread_create(&t, NULL, worker_main, (void*)(intptr_t)w) != 0) break;
        pthread_detach(t);
        P.n_threads = w;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

int mg_pool_run(mg_pool_fn fn, void* ctx, int n) {
    int i, m;
    if (n > MG_POOL_MAX_THREADS) n = MG_POOL_MAX_THREADS;
    if (n <= 1 || in_part || pthread_mutex_trylock(&P.busy) != 0) {
        for (i = 0; i < n; i++) fn(ctx, i);
        return 0;
    }
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&P.mu);
    start_workers(n);
    m = n < P.n_threads + 1 ? n : P.n_threads + 1;
    P.fn = fn;
    P.ctx = ctx;
    P.n_parts = m;
    __atomic_store_n(&P.pending, m - 1, __ATOMIC_RELAXED);
    __atomic_store_n(&P.gen, P.gen + 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.mu);

    in_part = 1;
    fn(ctx, 0);
    for (i = m; i < n; i++) fn(ctx, i);   /* parts without a worker thread */
    in_part = 0;

    if (!spin_while_nonzero(&P.pending)) {
        pthread_mutex_lock(&P.mu);
        while (__atomic_load_n(&P.pending, __ATOMIC_ACQUIRE) != 0) pthread_cond_wait(&P.done, &P.mu);
        pthread_mutex_unlock(&P.mu);
    }
    pthread_mutex_unlock(&P.busy);
    return m - 1;
}

int mg_pool_threads(void) {
    int n;
    pthread_mutex_lock(&P.mu);
    n = P.n_threads;
    pthread_mutex_unlock(&P.mu);
    return n;
}
