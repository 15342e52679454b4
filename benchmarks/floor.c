/* The machine's floor for bench_int8.py: how fast `threads` threads read a working set of a
 * given size that sits in their caches (each thread its own slice, read `reps` times). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

double read_seconds(int64_t bytes, int64_t reps, int64_t threads) {
    double elapsed = 0;
    int64_t per = bytes / threads / 64 * 64;
    if (per < 64) per = 64;
    uint64_t *buf = aligned_alloc(64, (size_t)(per * threads));
    if (!buf) return -1;
    memset(buf, 1, (size_t)(per * threads));
    volatile uint64_t sink = 0;
#pragma omp parallel num_threads((int)threads)
    {
        const uint64_t *mine = buf + omp_get_thread_num() * (per / 8);
        uint64_t acc[8] = {0};
        for (int64_t i = 0; i < per / 8; i += 8)
            for (int k = 0; k < 8; k++) acc[k] ^= mine[i + k];
#pragma omp barrier
        double t0 = omp_get_wtime();
        for (int64_t r = 0; r < reps; r++)
            for (int64_t i = 0; i < per / 8; i += 8)
                for (int k = 0; k < 8; k++) acc[k] += mine[i + k] ^ (uint64_t)r;
#pragma omp barrier
        double t1 = omp_get_wtime();
#pragma omp master
        elapsed = t1 - t0;
        uint64_t s = 0;
        for (int k = 0; k < 8; k++) s ^= acc[k];
#pragma omp atomic
        sink ^= s;
    }
    free(buf);
    return elapsed;
}
