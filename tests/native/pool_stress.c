/* pool_stress.c: csrc/pool.c under ThreadSanitizer (tests/test_pool.py builds and runs it).
 *
 * Three threads post jobs to the one pool at once (the pool serves one, the others run their
 * parts serially), with random part counts (1-40), thread counts (1-4), part lengths and pauses
 * longer than the workers' spin (so they also go through the sleeping path). Every part of
 * every job must run exactly once; ThreadSanitizer reports any data race in the claim protocol.
 * Exit 0 and "ok" on success. */
#include "pool.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    int *count;
    int spin;
} Job;

static void part(void *ctx, int i) {
    Job *j = ctx;
    for (volatile int k = 0; k < j->spin; k++) {
    }
    __atomic_add_fetch(&j->count[i], 1, __ATOMIC_RELAXED);
}

static void *caller(void *arg) {
    unsigned seed = (unsigned)(size_t)arg;
    int count[64];
    for (int it = 0; it < 20000; it++) {
        Job j = {count, (int)(rand_r(&seed) % 200)};
        int n = 1 + (int)(rand_r(&seed) % 40), threads = 1 + (int)(rand_r(&seed) % 4);
        memset(count, 0, sizeof count);
        if (rand_r(&seed) % 50 == 0) {
            struct timespec pause = {0, 1500000};
            nanosleep(&pause, NULL);
        }
        mg_pool_run_on(part, &j, n, threads);
        for (int i = 0; i < n; i++)
            if (count[i] != 1) {
                printf("job %d: part %d of %d ran %d times\n", it, i, n, count[i]);
                exit(1);
            }
    }
    return NULL;
}

int main(void) {
    pthread_t t[3];
    for (int k = 0; k < 3; k++) pthread_create(&t[k], NULL, caller, (void *)(size_t)(k + 1));
    for (int k = 0; k < 3; k++) pthread_join(t[k], NULL);
    printf("ok\n");
    return 0;
}
