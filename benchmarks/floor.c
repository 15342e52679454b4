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

/* Multiply-adds a second at the machine's peak, from registers only: int8 (the instructions
 * rnnkit's int8 kernel uses on this build for several rows: AVX-512 VNNI, else AVX2's int16
 * vpmaddwd and vpaddd, else scalar) or float32 FMA. */
#include <immintrin.h>
#define ACCS 12

double peak_macs(int64_t int8, int64_t threads) {
    const int64_t iters = 20000000;
    double elapsed = 0, per_iter = 0;
    volatile int64_t sink = 0;
#pragma omp parallel num_threads((int)threads)
    {
        int64_t s = 0;
#pragma omp barrier
        double t0 = omp_get_wtime();
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        if (int8) {
            __m512i c[ACCS], a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
            for (int k = 0; k < ACCS; k++) c[k] = _mm512_set1_epi32(k);
            for (int64_t i = 0; i < iters; i++)
                for (int k = 0; k < ACCS; k++) c[k] = _mm512_dpbusd_epi32(c[k], a, b);
            for (int k = 0; k < ACCS; k++) s += _mm512_reduce_add_epi32(c[k]);
            per_iter = ACCS * 64;
        }
#elif defined(__AVX2__)
        if (int8) {
            /* The kernel's form for several rows: int16 products (vpmaddwd) added into int32
             * (vpaddd). Six weights and an activation the compiler cannot see through: with
             * constant operands it computed the products once, outside the loop, and this
             * measured vpaddd alone. */
            __m256i a = _mm256_set1_epi16(3), c0 = a, c1 = a, c2 = a, c3 = a, c4 = a, c5 = a;
            const __m256i b0 = _mm256_set1_epi16(-2), b1 = _mm256_set1_epi16(-3),
                          b2 = _mm256_set1_epi16(-4), b3 = _mm256_set1_epi16(-5),
                          b4 = _mm256_set1_epi16(-6), b5 = _mm256_set1_epi16(-7);
#define FLOOR_MADD(c, b) c = _mm256_add_epi32(c, _mm256_madd_epi16(a, b))
            for (int64_t i = 0; i < iters; i++) {
                __asm__("" : "+x"(a));
                FLOOR_MADD(c0, b0); FLOOR_MADD(c1, b1); FLOOR_MADD(c2, b2);
                FLOOR_MADD(c3, b3); FLOOR_MADD(c4, b4); FLOOR_MADD(c5, b5);
            }
            const __m256i t = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(
                _mm256_add_epi32(c2, c3), _mm256_add_epi32(c4, c5)));
            s += _mm256_extract_epi32(t, 0);
            per_iter = 6 * 16;
        }
#endif
#if defined(__AVX512F__)
        if (!int8) {
            __m512 c[ACCS], a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(1e-9f);
            for (int k = 0; k < ACCS; k++) c[k] = _mm512_set1_ps((float)k);
            for (int64_t i = 0; i < iters; i++)
                for (int k = 0; k < ACCS; k++) c[k] = _mm512_fmadd_ps(a, b, c[k]);
            for (int k = 0; k < ACCS; k++) s += (int64_t)_mm512_reduce_add_ps(c[k]);
            per_iter = ACCS * 16;
        }
#elif defined(__AVX2__) && defined(__FMA__)
        if (!int8) {
            __m256 c[ACCS], a = _mm256_set1_ps(1.0f), b = _mm256_set1_ps(1e-9f);
            for (int k = 0; k < ACCS; k++) c[k] = _mm256_set1_ps((float)k);
            for (int64_t i = 0; i < iters; i++)
                for (int k = 0; k < ACCS; k++) c[k] = _mm256_fmadd_ps(a, b, c[k]);
            float tmp[8];
            for (int k = 0; k < ACCS; k++) { _mm256_storeu_ps(tmp, c[k]); s += (int64_t)tmp[0]; }
            per_iter = ACCS * 8;
        }
#endif
#pragma omp barrier
        double t1 = omp_get_wtime();
#pragma omp master
        elapsed = t1 - t0;
#pragma omp atomic
        sink += s;
    }
    return per_iter > 0 ? (double)iters * per_iter * (double)threads / elapsed : -1;
}
