/* The native loop's per-step product kernel (panel_product in src/rnnkit/engines/native/loop.c)
 * on one core: GMAC/s of one step's product, weights packed once, best of 5 runs of 2000 calls.
 *
 *     cc -O3 -march=native -fopenmp -I. -o /tmp/panel_kernel benchmarks/panel_kernel.c -lm
 *     /tmp/panel_kernel                     # the forward and backward products of I=H=256
 *     /tmp/panel_kernel 16 256 512 1        # rows, K, output columns, blocks
 *
 * From the repository root; -march=x86-64-v3 for the baseline build's AVX2 kernel. The forward
 * product of an LSTM step on one of two threads is rows=B, K=H, columns=2H in 4 blocks (its
 * half of every gate); the backward one is K=4H, columns=H/2 in 1 block. Compare with floor.c's FMA peak per core. */
#include "../src/rnnkit/engines/native/loop.c"

#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void run(int64_t rows, int64_t K, int64_t cols, int64_t blocks) {
    const int64_t m = cols / blocks, reps = 2000;
    float *w = malloc(sizeof(float) * (size_t)(blocks * m * K));
    float *x = malloc(sizeof(float) * (size_t)(rows * K));
    float *z = malloc(sizeof(float) * (size_t)(rows * blocks * m));
    panels_f32 pp;
    if (!w || !x || !z) return;
    for (int64_t i = 0; i < blocks * m * K; i++) w[i] = (float)(i % 7) * 0.1f;
    for (int64_t i = 0; i < rows * K; i++) x[i] = (float)(i % 5) * 0.1f;
    if (panels_make_f32(&pp, w, blocks, m, K, m * K, K, 1, m) != 0) return;
    double best = 1e9;
    for (int r = 0; r < 5; r++) {
        double t0 = now();
        for (int64_t i = 0; i < reps; i++) panel_product_f32(rows, x, K, &pp, z, blocks * m, 0);
        double t = (now() - t0) / (double)reps;
        if (t < best) best = t;
    }
    printf("rows=%ld K=%ld columns=%ld (%ld blocks): %.2f us a product, %.1f GMAC/s\n",
           (long)rows, (long)K, (long)(blocks * m), (long)blocks, best * 1e6,
           (double)(rows * K * blocks * m) / best * 1e-9);
    panels_free_f32(&pp);
    free(w), free(x), free(z);
}

int main(int argc, char **argv) {
    if (argc == 5) {
        run(atol(argv[1]), atol(argv[2]), atol(argv[3]), atol(argv[4]));
        return 0;
    }
    for (int64_t B = 16; B <= 64; B *= 4) {
        run(B, 256, 512, 4);
        run(B, 1024, 128, 1);
    }
    return 0;
}
