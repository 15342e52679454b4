/* rnnkit's native CPU engine: the whole time loop of one layer and direction in one call, forward
 * and backward, for LSTM, GRU, RNN_TANH and RNN_RELU, with LSTM's projection and the per-step
 * variants of nl_variants. engines/native/loop.py builds it, checks the tensors and calls it;
 * engines/native/op.py makes it a torch operator.
 *
 * Threads split the hidden units: thread k owns units [j0, j1) of every gate, computes those
 * columns of the recurrent product and then the cell of those units, so a step needs one
 * barrier (the next product reads every unit of h_{t-1}). h_{t-1} is read from the rows of
 * `out` written by the previous step (or h0), which are never written again, so no thread can
 * overwrite what another still reads. In backward the same split holds with dh's units.
 * A phase that reads every unit of a row (a layer norm's statistics, the projection) adds a
 * barrier before it; engines/README.md derives the backward.
 *
 * A step is a short sequence of phase functions (the recurrent product, its layer norm, the
 * cell, the projection, zoneout, the recurrent-dropout input of the next step), each on the
 * thread's units; the per-unit math of each cell is an inline function, so that forward and
 * backward share each formula and the loops around them still vectorise.
 *
 * The products (W_hh, and W_hr with a projection) of a step with at least `gemm_min_rows` rows
 * (in a call of at least 4 steps, which repays the packing) run on panels: each thread packs its
 * share of the weights once per call into a layout for a register-blocked kernel
 * (panel_product), which then stays in the core's L2 cache across the steps. Steps with fewer rows run the register-blocked dot products below, which at B=1 are a
 * GEMV over W_hh. No BLAS: MKL dispatches its AVX2 kernels on AMD CPUs, and its per-call
 * overhead and packing of the small per-step products cost more than the products.
 *
 * Built without -ffast-math (NaN and inf propagate as through torch's ops); sigmoid and tanh are
 * native_math.h's, written so that the pointwise loops vectorise. Every matrix is contiguous;
 * the Python side checks shapes, dtypes and strides, and the code below checks the sizes, the
 * batch sizes and the variants' pointers again.
 *
 * The type-generic part is this file included into itself twice, once per element type. */
#ifndef NL_T

#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

enum { NL_LSTM = 0, NL_GRU = 1, NL_RNN_TANH = 2, NL_RNN_RELU = 3 };
enum {
    NL_OK = 0,
    NL_BAD_MODE = -1,
    NL_BAD_SIZES = -2,
    NL_BAD_BATCH_SIZES = -3,
    NL_MISSING_TENSOR = -4,
    NL_BAD_VARIANTS = -5,
    NL_NO_MEMORY = -6,
};
/* How the threads of a float forward or backward share its work (see rows_pay). */
enum { NL_SPLIT_AUTO = 0, NL_SPLIT_UNITS = 1, NL_SPLIT_ROWS = 2 };

/* Bytes of one core's L2 cache as the C library reports it (0 where it does not), read once. */
static int64_t l2_bytes(void) {
    static int64_t cached = -1;
    int64_t bytes = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (bytes < 0) {
        long v = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
        v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        bytes = v > 0 ? v : 0;
        __atomic_store_n(&cached, bytes, __ATOMIC_RELAXED);
    }
    return bytes;
}

/* The per-step variants of one call (rnnkit.variants); NULL pointers are variants that are off,
 * and a NULL nl_variants is a plain layer. Element type: the call's. All rows contiguous.
 * - Layer norm of the recurrent product (LSTM, GRU): gain ln_hw and bias ln_hb (GW); for LSTM
 *   also of the cell, ln_cw and ln_cb (H). Forward saves Zr (N, GW), the product before its norm
 *   (may be NULL without saving), and stats (2 or 4, N): mean and 1/std of the product's norm,
 *   then (LSTM) of the cell's. Backward reads them and writes dZ (N, GW), the gradient of the
 *   product; dCN (B, H) is its scratch for the gradient of the cell norm's output (LSTM).
 *   ln_grads (float64 whatever the call's type; NULL: not computed): backward adds the gains'
 *   and biases' gradients, d ln_hw and d ln_hb (GW each), then (LSTM) d ln_cw and d ln_cb (H
 *   each), summed over every row; the caller zeroes it.
 * - Recurrent dropout: rmask (B, R) multiplies h_{t-1} where it enters W_hh.
 * - Zoneout (zoneout != 0): keep k = 1 keeps the previous value of a unit; k from the masks
 *   zh (N, R) and, for LSTM, zc (N, H), laid out like the rows, or zoneout_p for every unit
 *   where a mask is NULL (eval). LSTM forward saves CZ (N, H), the zoned c_t (C holds the
 *   cell's own c~), where it saves C.
 * - Projection (LSTM, proj = P > 0): h_t = r_t W_hr^T with w_hr (P, H), r_t = o tanh(c~ or its
 *   norm); h, h0, out, dh, dout, rmask, zh, W_hh's columns are then P wide (R = P, else R = H).
 *   Forward saves r_t in Rs (N, H) (NULL: not saved); backward writes dHt (N, P), the gradient
 *   of h_t before zoneout (for dW_hr = dHt^T Rs). r_scratch (B, H): r_t in a forward that
 *   saves nothing, dr_t in backward.
 * - scratch: (2, B, R) in forward (h_{t-1} * rmask, double-buffered), (B, R) in backward (the
 *   recurrent product before the mask); needed with rmask only. ln_scratch (B, GW): the normed
 *   product in a forward with a layer norm that saves nothing (Zr NULL). zo_scratch: (B, R)
 *   then (2, B, H) with zoneout. */
typedef struct {
    const void *ln_hw, *ln_hb, *ln_cw, *ln_cb, *rmask, *zh, *zc, *w_hr;
    void *Zr, *stats, *dZ, *dCN, *CZ, *Rs, *dHt, *scratch, *ln_scratch, *zo_scratch;
    void *r_scratch;
    double eps, zoneout_p;
    int64_t zoneout, proj;
    double *ln_grads;
} nl_variants;

int64_t nl_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Asks the kernel for transparent huge pages on the whole 2 MiB pages inside [p, p + bytes),
 * before anything touches them: a fresh buffer of tens of MiB otherwise takes one page fault
 * per 4 KiB inside the loop, where a fault on one thread stalls the other at the next barrier
 * (measured: about a fifth of a B=64 LSTM's backward). A hint only: where the kernel has no such
 * pages or refuses, nothing changes. Returns whether the kernel took it. */
int64_t nl_advise_huge_pages(void *p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t end = ((uintptr_t)p + (uintptr_t)(bytes > 0 ? bytes : 0)) & ~(huge - 1);
    return end > start && madvise((void *)start, end - start, MADV_HUGEPAGE) == 0;
#else
    (void)p; (void)bytes;
    return 0;
#endif
}

/* d[j * ldd + i] = s[i * lds + j] for i, j < 8: an 8 x 8 block of floats transposed through
 * registers (panels_make's transposing copy). */
#ifdef __AVX2__
#include <immintrin.h>
static inline void nl_transpose8(const float *s, int64_t lds, float *d, int64_t ldd) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(s + i * lds);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(d + i * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(d + (i + 4) * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
}
#endif

#include "native_math.h"

/* Batch sizes positive, at most B, non-increasing, summing to N; offsets[t] = first row of t. */
static int64_t check_batch_sizes(int64_t T, const int64_t *bs, int64_t N, int64_t B,
                                 int64_t *offsets) {
    int64_t sum = 0;
    for (int64_t t = 0; t < T; t++) {
        if (bs[t] < 1 || bs[t] > B || (t > 0 && bs[t] > bs[t - 1])) return NL_BAD_BATCH_SIZES;
        offsets[t] = sum;
        sum += bs[t];
    }
    return sum == N ? NL_OK : NL_BAD_BATCH_SIZES;
}

/* The calling thread's count of threads and index in its parallel region (1, 0 outside one). */
static inline void this_thread(int64_t *nth, int64_t *tid) {
    *nth = 1, *tid = 0;
#ifdef _OPENMP
    *nth = omp_get_num_threads();
    *tid = omp_get_thread_num();
#endif
}

/* More threads than any machine runs: a count past it (a caller's mistake, or 2^62) would make
 * the per-thread allocations' sizes wrap and OpenMP read it as 0 ("all cores"). */
#define NL_MAX_THREADS 1024

/* A caller's thread count within [1, NL_MAX_THREADS]. */
static inline int64_t sane_threads(int64_t n) {
    return n < 1 ? 1 : n > NL_MAX_THREADS ? NL_MAX_THREADS : n;
}

static void split_units(int64_t H, int64_t *j0, int64_t *j1) {
    int64_t nth, tid;
    this_thread(&nth, &tid);
    /* Whole cache lines per thread. */
    int64_t chunk = (H + nth - 1) / nth;
    chunk = (chunk + 15) / 16 * 16;
    *j0 = tid * chunk < H ? tid * chunk : H;
    *j1 = *j0 + chunk < H ? *j0 + chunk : H;
}

static inline void barrier(void) {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

/* A step barrier of its own for the forward: each thread publishes how many it has passed in
 * a cache line of its own and waits until every other thread has passed as many. On the
 * 2-core virtual machine of the benchmarks OpenMP's barrier took about 2 us, most of a B=1
 * step; this costs the cache-line transfers. After a long wait it yields the core (a thread
 * that is waiting for a core of its own would otherwise be spun against). */
typedef struct {
    _Alignas(64) int64_t passed;
    char pad[64 - sizeof(int64_t)];
} nl_flag;

/* Wait until flag->passed reaches at_least (acquire: what was written before it is seen). */
static void flag_wait(nl_flag *flag, int64_t at_least) {
    int64_t spins = 0;
    while (__atomic_load_n(&flag->passed, __ATOMIC_ACQUIRE) < at_least) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if (++spins > 20000) {
            sched_yield();
            spins = 0;
        }
    }
}

/* n zeroed flags, or NULL where memory ran out. */
static nl_flag *flags_new(int64_t n) {
    nl_flag *flags = aligned_alloc(64, (size_t)n * sizeof(nl_flag));
    if (flags) memset(flags, 0, (size_t)n * sizeof(nl_flag));
    return flags;
}

static void flag_barrier(nl_flag *flags, int64_t nth, int64_t tid, int64_t *passed) {
    const int64_t now = ++*passed;
    __atomic_store_n(&flags[tid].passed, now, __ATOMIC_RELEASE);
    for (int64_t k = 0; k < nth; k++) flag_wait(&flags[k], now);
}

#include "int8.h"

/* The vector width of the panel products (bytes) and their register tile: NL_MR rows by NL_NP
 * vectors of sums, 24 of AVX-512's 32 registers, 12 of AVX2's (and SSE's) 16. */
#if defined(__AVX512F__)
#define NL_VB 64
#define NL_MR 8
#elif defined(__AVX__)
#define NL_VB 32
#define NL_MR 4
#else
#define NL_VB 16
#define NL_MR 4
#endif
#define NL_NP 3


/* The steps of one call: T_ steps of bs[t] rows from offsets[t], walked in reverse or not;
 * steps of at least gemm_min_rows rows are wide: their products run on panels. */
typedef struct {
    int64_t T_, reverse;
    const int64_t *bs, *offsets;
    int64_t gemm_min_rows;
} nl_walk;

/* Step t, the s-th of the walk: its n rows from row off, of which the first np continue from
 * step tp (the one before t in the forward order, its rows from offp), the rest from h0. */
typedef struct {
    int64_t s, t, tp, n, off, np, offp;
    int wide;
} nl_step;

static inline nl_step step_at(const nl_walk *wk, int64_t s, int64_t t) {
    nl_step st = {s, t, wk->reverse ? t + 1 : t - 1, wk->bs[t], wk->offsets[t], 0, 0, 0};
    st.np = st.tp >= 0 && st.tp < wk->T_ ? wk->bs[st.tp] : 0;
    if (st.np > st.n) st.np = st.n;
    if (st.np > 0) st.offp = wk->offsets[st.tp];
    st.wide = st.n >= wk->gemm_min_rows;
    return st;
}

/* int8: the input side G = x W_ih^T + bias of x's rows [lo, hi) on units [j0, j1) of every
 * gate, the rows quantized into qa, sa (room for hi - lo rows). */
static void q8_input_rows(const nl_q8 *q8, int64_t lo, int64_t hi, int64_t j0, int64_t j1,
                          float *G, int64_t GW, q8_act *qa, float *sa) {
    const nl_q8_matrix *m = &q8->ih;
    const int64_t K = m->K, H = m->H;
    if (j1 <= j0 || hi <= lo) return;
    q8_quantize_rows(hi - lo, q8->x + lo * K, K, K, qa, sa);
    q8_product(hi - lo, qa, sa, m, j0, j1, G + lo * GW, GW);
    if (!q8->bias) return;
    for (int64_t i = lo; i < hi; i++)
        for (int64_t g = 0; g < m->gates; g++)
#pragma omp simd
            for (int64_t j = j0; j < j1; j++) G[i * GW + g * H + j] += q8->bias[g * H + j];
}

/* int8: the input side of the walk's steps [s, s + Q8_STEPS) on units [j0, j1), the steps' rows
 * (one run of x) quantized into qa, sa (room for Q8_STEPS * B rows). Where threads split the
 * units, each computes its own units' share, which only it reads, so the threads never wait
 * for each other's input side. */
#define Q8_STEPS 4
static void q8_input_side(const nl_walk *wk, const nl_q8 *q8, int64_t s, int64_t j0, int64_t j1,
                          float *G, int64_t GW, q8_act *qa, float *sa) {
    const int64_t T_ = wk->T_, e = s + Q8_STEPS < T_ ? s + Q8_STEPS : T_;
    /* The steps' rows are one run: [offsets of the last in walk order's t, ...). */
    const int64_t ta = wk->reverse ? T_ - e : s, tb = wk->reverse ? T_ - 1 - s : e - 1;
    q8_input_rows(q8, wk->offsets[ta], wk->offsets[tb] + wk->bs[tb], j0, j1, G, GW, qa, sa);
}

/* The rows [r0, r1) of a batch of B that thread tid of nth takes where threads take rows. */
static inline void rows_of_thread(int64_t B, int64_t nth, int64_t tid, int64_t *r0, int64_t *r1) {
    *r0 = B * tid / nth;
    *r1 = B * (tid + 1) / nth;
}

/* A step's rows as a thread that owns rows [r0, r1) of the batch sees them: those still
 * running, from row r0 on (n, np and the offsets moved to r0). */
static inline void own_rows(nl_step *at, int64_t r0, int64_t r1) {
    const int64_t n = at->n < r1 ? at->n : r1;
    const int64_t np = at->np < n ? at->np : n;
    at->n = n > r0 ? n - r0 : 0;
    at->np = np > r0 ? np - r0 : 0;
    at->off += r0;
    at->offp += r0;
}

static inline int64_t gates_of(int64_t mode) {
    return mode == NL_LSTM ? 4 : mode == NL_GRU ? 3 : 1;
}

/* Whether the threads of an int8 forward take rows of the batch (FN(rows_pay) below is the
 * float rule): always, unless split says units. int8 weights are a quarter of float32's, so each
 * thread reading all of them every step costs less than the barrier every step that threads
 * taking units need, and a barrier is what another program's threads on the same cores make
 * slow. `bench_int8.py --splits` (both splits forced, interleaved with torch and ONNX Runtime;
 * 2-core Zen 4, T=100, BENCHMARKS.md) put units at 0.72-1.10x rows' time at B=2-4 on the VNNI
 * build (I=H=256 and 512), at 1.0-1.33x on the AVX2 build (I=H=256), and at 1.2-2.4x from B=6
 * on both: no batch size where units won on both builds. */
static int q8_rows_pay(int64_t split) {
    return split != NL_SPLIT_UNITS;
}

#define NL_T float
#define NL_SUF f32
#define NL_SQRT sqrtf
#define NL_Q8 1
#include __FILE__
#undef NL_T
#undef NL_SUF
#undef NL_SQRT
#undef NL_Q8

#define NL_T double
#define NL_SUF f64
#define NL_SQRT sqrt
#define NL_Q8 0
#include __FILE__

#else /* the type-generic part: NL_T the element type, NL_SUF its suffix */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, NL_SUF)
#define T NL_T

/* z[b, k] = sum_j x[b, j] w[k, j] for b < nb, k < nk: x (nb, K) and w (nk, K) row-major.
 * Blocks of 4 rows of w by 4 (or 1) rows of x keep 16 accumulators in registers. */
static void FN(dot_rows)(int64_t nb, const T *x, int64_t K, const T *w, int64_t nk, T *z,
                         int64_t ldz) {
    int64_t k = 0;
    for (; k + 4 <= nk; k += 4) {
        const T *w0 = w + k * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        int64_t b = 0;
        for (; b + 4 <= nb; b += 4) {
            const T *x0 = x + b * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
            T a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
            T a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, \
                               a30, a31, a32, a33)
            for (int64_t j = 0; j < K; j++) {
                T v0 = w0[j], v1 = w1[j], v2 = w2[j], v3 = w3[j];
                a00 += x0[j] * v0; a01 += x0[j] * v1; a02 += x0[j] * v2; a03 += x0[j] * v3;
                a10 += x1[j] * v0; a11 += x1[j] * v1; a12 += x1[j] * v2; a13 += x1[j] * v3;
                a20 += x2[j] * v0; a21 += x2[j] * v1; a22 += x2[j] * v2; a23 += x2[j] * v3;
                a30 += x3[j] * v0; a31 += x3[j] * v1; a32 += x3[j] * v2; a33 += x3[j] * v3;
            }
            T *z0 = z + b * ldz + k, *z1 = z0 + ldz, *z2 = z1 + ldz, *z3 = z2 + ldz;
            z0[0] = a00; z0[1] = a01; z0[2] = a02; z0[3] = a03;
            z1[0] = a10; z1[1] = a11; z1[2] = a12; z1[3] = a13;
            z2[0] = a20; z2[1] = a21; z2[2] = a22; z2[3] = a23;
            z3[0] = a30; z3[1] = a31; z3[2] = a32; z3[3] = a33;
        }
        for (; b < nb; b++) {
            const T *x0 = x + b * K;
            T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (int64_t j = 0; j < K; j++) {
                a0 += x0[j] * w0[j]; a1 += x0[j] * w1[j];
                a2 += x0[j] * w2[j]; a3 += x0[j] * w3[j];
            }
            T *z0 = z + b * ldz + k;
            z0[0] = a0; z0[1] = a1; z0[2] = a2; z0[3] = a3;
        }
    }
    for (; k < nk; k++) {
        const T *w0 = w + k * K;
        for (int64_t b = 0; b < nb; b++) {
            const T *x0 = x + b * K;
            T a = 0;
#pragma omp simd reduction(+ : a)
            for (int64_t j = 0; j < K; j++) a += x0[j] * w0[j];
            z[b * ldz + k] = a;
        }
    }
}

/* Columns per register block of axpy_rows: 4 rows of it fit the vector registers. */
#define NL_CW (64 / (int64_t)sizeof(T) * 2)

/* y[b, :n] (+)= sum_k d[b, k] w[k, :n] for b < nb: d (nb, K) with row stride ldd, w (K, .) with
 * row stride ldw, y with row stride ldy; accumulate or overwrite. */
static void FN(axpy_rows)(int64_t nb, const T *d, int64_t ldd, int64_t K, const T *w,
                          int64_t ldw, int64_t n, T *y, int64_t ldy, int accumulate) {
    for (int64_t c = 0; c < n; c += NL_CW) {
        int64_t cw = n - c < NL_CW ? n - c : NL_CW;
        for (int64_t b = 0; b < nb; b += 4) {
            int64_t rb = nb - b < 4 ? nb - b : 4;
            T acc[4][NL_CW];
            for (int64_t r = 0; r < 4; r++)
                for (int64_t j = 0; j < NL_CW; j++)
                    acc[r][j] = accumulate && r < rb && j < cw ? y[(b + r) * ldy + c + j] : 0;
            const T *d0 = d + b * ldd;
            const T *d1 = rb > 1 ? d0 + ldd : d0, *d2 = rb > 2 ? d0 + 2 * ldd : d0;
            const T *d3 = rb > 3 ? d0 + 3 * ldd : d0;
            if (cw == NL_CW) {
                for (int64_t k = 0; k < K; k++) {
                    const T *wr = w + k * ldw + c;
                    T e0 = d0[k], e1 = d1[k], e2 = d2[k], e3 = d3[k];
#pragma omp simd
                    for (int64_t j = 0; j < NL_CW; j++) {
                        T v = wr[j];
                        acc[0][j] += e0 * v; acc[1][j] += e1 * v;
                        acc[2][j] += e2 * v; acc[3][j] += e3 * v;
                    }
                }
            } else {
                for (int64_t k = 0; k < K; k++) {
                    const T *wr = w + k * ldw + c;
                    T e0 = d0[k], e1 = d1[k], e2 = d2[k], e3 = d3[k];
                    for (int64_t j = 0; j < cw; j++) {
                        T v = wr[j];
                        acc[0][j] += e0 * v; acc[1][j] += e1 * v;
                        acc[2][j] += e2 * v; acc[3][j] += e3 * v;
                    }
                }
            }
            for (int64_t r = 0; r < rb; r++)
                for (int64_t j = 0; j < cw; j++) y[(b + r) * ldy + c + j] = acc[r][j];
        }
    }
}

/* Panels: the per-step recurrent product as a register-blocked GEMM over weights packed once
 * per call, which stay in the core's cache across the steps. A panel holds NL_VL output columns
 * (one vector register) of every k: p[k * NL_VL + l] is the weight of its column l at k; a
 * block's last panel may use fewer lanes (the rest are zeros). col[i]: the output column of
 * panel i's lane 0; lanes[i]: the lanes it uses. */
typedef T FN(vec) __attribute__((vector_size(NL_VB)));
/* The same vector at a T's alignment: the output rows' columns are not vector-aligned. */
typedef T FN(vecu) __attribute__((vector_size(NL_VB), aligned(sizeof(T))));
#define NL_VL ((int64_t)(NL_VB / sizeof(T)))
/* Keeps a vector in a register (AVX-512 builds: see panel_tile; the AVX2 build's code was
 * already as fast as it gets). */
#if defined(__AVX512F__)
#define NL_PIN(v) __asm__("" : "+v"(v))
#else
#define NL_PIN(v) (void)0
#endif

typedef struct {
    T *p;
    int64_t n, K, *col, *lanes;
} FN(panels);

static void FN(panels_free)(FN(panels) *pp) {
    free(pp->p);
    free(pp->col);
    pp->p = 0, pp->col = 0, pp->lanes = 0, pp->n = 0;
}

/* Packs nblocks blocks of m output columns each over k < K: block b's column c (c < m) at k is
 * w[b * sb + c * cs + k * ks] and goes to output column b * db + c. 0 on success (pp owns the
 * memory), -1 where memory ran out (pp empty). */
static int FN(panels_make)(FN(panels) *pp, const T *w, int64_t nblocks, int64_t m, int64_t K,
                           int64_t sb, int64_t cs, int64_t ks, int64_t db) {
    const int64_t per = (m + NL_VL - 1) / NL_VL, n = nblocks * per;
    *pp = (FN(panels)){0, n, K, 0, 0};
    if (n == 0 || K == 0) return 0;
    pp->col = malloc((size_t)(2 * n) * sizeof(int64_t));
    pp->p = aligned_alloc(64, (size_t)((n * K * NL_VL * (int64_t)sizeof(T) + 63) / 64 * 64));
    if (!pp->col || !pp->p) {
        FN(panels_free)(pp);
        return -1;
    }
    pp->lanes = pp->col + n;
    for (int64_t b = 0; b < nblocks; b++)
        for (int64_t i = 0; i < per; i++) {
            const int64_t at = b * per + i, c0 = i * NL_VL;
            const int64_t lanes = m - c0 < NL_VL ? m - c0 : NL_VL;
            const T *src = w + b * sb + c0 * cs;
            T *dst = pp->p + at * K * NL_VL;
            pp->col[at] = b * db + c0;
            pp->lanes[at] = lanes;
            int64_t k = 0;
#ifdef __AVX2__
            /* A full panel of float rows (the forward's W_hh): 8 x 8 blocks through registers,
             * where the plain loop below gathers one float at a time. */
            if (sizeof(T) == 4 && ks == 1 && lanes == NL_VL && NL_VL % 8 == 0)
                for (; k + 8 <= K; k += 8)
                    for (int64_t l = 0; l < NL_VL; l += 8)
                        nl_transpose8((const float *)(src + l * cs + k), cs,
                                      (float *)(dst + k * NL_VL + l), NL_VL);
#endif
            for (; k < K; k++)
                for (int64_t l = 0; l < NL_VL; l++)
                    dst[k * NL_VL + l] = l < lanes ? src[l * cs + k * ks] : 0;
        }
    return 0;
}

/* z[r, col(q) + l] (+)= sum_k x[r, k] p_q[k, l] for r < mr rows and q < np panels from p:
 * mr x np vectors of sums in registers, each weight vector loaded once for the mr rows. */
static inline __attribute__((always_inline)) void FN(panel_tile)(
    const int mr, const int np, int64_t K, const T *x, int64_t ldx, const T *p,
    const int64_t *col, const int64_t *lanes, T *z, int64_t ldz, int accumulate) {
    FN(vec) acc[NL_MR][NL_NP];
#pragma GCC unroll 8
    for (int r = 0; r < mr; r++)
#pragma GCC unroll 4
        for (int q = 0; q < np; q++) acc[r][q] = (FN(vec)){0};
    const int64_t stride = K * NL_VL;
    for (int64_t k = 0; k < K; k++) {
        FN(vec) wv[NL_NP];
#pragma GCC unroll 4
        for (int q = 0; q < np; q++) {
            wv[q] = *(const FN(vec) *)(p + q * stride + k * NL_VL);
            /* In a register: for tiles of up to 4 rows gcc (AVX-512) otherwise stored each
             * weight vector to the stack and read it back for every row's FMA, at half the
             * speed a row; larger tiles are as fast or faster without. */
            if (mr <= 4) NL_PIN(wv[q]);
        }
#pragma GCC unroll 8
        for (int r = 0; r < mr; r++) {
            const T xv = x[r * ldx + k];
#pragma GCC unroll 4
            for (int q = 0; q < np; q++) acc[r][q] += xv * wv[q];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < mr; r++)
#pragma GCC unroll 4
        for (int q = 0; q < np; q++) {
            T *zr = z + r * ldz + col[q];
            if (lanes[q] == NL_VL) {
                FN(vecu) *zv = (FN(vecu) *)zr;
                *zv = accumulate ? *zv + acc[r][q] : acc[r][q];
            } else {
                for (int64_t l = 0; l < lanes[q]; l++)
                    zr[l] = accumulate ? zr[l] + acc[r][q][l] : acc[r][q][l];
            }
        }
}

/* The rows of a tile, as a constant for panel_tile. */
static inline __attribute__((always_inline)) void FN(panel_rows)(
    int mr, const int np, int64_t K, const T *x, int64_t ldx, const T *p, const int64_t *col,
    const int64_t *lanes, T *z, int64_t ldz, int accumulate) {
    switch (mr) {
#define NL_TILE(R)                                                                            \
    case R:                                                                                   \
        FN(panel_tile)(R, np, K, x, ldx, p, col, lanes, z, ldz, accumulate);                  \
        break;
    NL_TILE(1) NL_TILE(2) NL_TILE(3) NL_TILE(4)
#if NL_MR > 4
    NL_TILE(5) NL_TILE(6) NL_TILE(7) NL_TILE(8)
#endif
#undef NL_TILE
    }
}

/* z[b, col] (+)= x[b] . (the panels' column col) for b < nb: x (nb, K) with row stride ldx, z
 * with row stride ldz. NL_NP panels at a time, their rows NL_MR at a time, so that the panels'
 * weights are read from the L1 and L2 caches once for every NL_MR rows. */
static void FN(panel_product)(int64_t nb, const T *x, int64_t ldx, const FN(panels) *pp, T *z,
                              int64_t ldz, int accumulate) {
    const int64_t K = pp->K;
    for (int64_t i = 0; i < pp->n; i += NL_NP) {
        const int64_t np = pp->n - i < NL_NP ? pp->n - i : NL_NP;
        const T *p = pp->p + i * K * NL_VL;
        const int64_t *col = pp->col + i, *lanes = pp->lanes + i;
        for (int64_t b = 0; b < nb; b += NL_MR) {
            const int mr = (int)(nb - b < NL_MR ? nb - b : NL_MR);
            const T *xb = x + b * ldx;
            T *zb = z + b * ldz;
            if (np == 3)
                FN(panel_rows)(mr, 3, K, xb, ldx, p, col, lanes, zb, ldz, accumulate);
            else if (np == 2)
                FN(panel_rows)(mr, 2, K, xb, ldx, p, col, lanes, zb, ldz, accumulate);
            else
                FN(panel_rows)(mr, 1, K, xb, ldx, p, col, lanes, zb, ldz, accumulate);
        }
    }
}

/* The blocks of w (G*H, H) that a thread owning units [j0, j1) multiplies: one per gate, or
 * one for all gates when it owns every unit. */
static inline int64_t FN(blocks)(int64_t H, int64_t gates, int64_t j0, int64_t j1,
                                 int64_t *rows) {
    if (j0 == 0 && j1 == H) {
        *rows = gates * H;
        return 1;
    }
    *rows = j1 - j0;
    return gates;
}

/* Whether a call packs panels: its steps can be wide, and there are enough of them to repay the
 * packing, which reads and writes the weights about as often as two steps' products read them. */
static inline int FN(worth_panels)(const nl_walk *wk, int64_t B) {
    return B >= wk->gemm_min_rows && wk->T_ >= 4;
}

/* Z[b, g*H + j] = x[b] . w[g*H + j] for b < nb, j in [j0, j1), every gate g: x (nb, K), w
 * (G*H, K); on the thread's panels of those rows of w where it has them (wide steps). */
static void FN(gates_product)(int64_t nb, const T *x, int64_t H, int64_t K, int64_t gates,
                              const T *w, int64_t j0, int64_t j1, T *Z, const FN(panels) *pp) {
    int64_t GW = gates * H, rows;
    if (nb <= 0 || j1 <= j0) return;
    if (pp && pp->n) {
        FN(panel_product)(nb, x, K, pp, Z + j0, GW, 0);
        return;
    }
    const int64_t nblocks = FN(blocks)(H, gates, j0, j1, &rows);
    for (int64_t g = 0; g < nblocks; g++)
        FN(dot_rows)(nb, x, K, w + (g * H + j0) * K, rows, Z + g * H + j0, GW);
}

/* Mean and 1/std of the n values of x: the statistics of one row's layer norm. */
static inline void FN(row_stats)(const T *x, int64_t n, T eps, T *mean, T *rstd) {
    T m = 0, var = 0;
#pragma omp simd reduction(+ : m)
    for (int64_t j = 0; j < n; j++) m += x[j];
    m /= (T)n;
#pragma omp simd reduction(+ : var)
    for (int64_t j = 0; j < n; j++) var += (x[j] - m) * (x[j] - m);
    *mean = m;
    *rstd = (T)1 / NL_SQRT(var / (T)n + eps);
}

/* The two means of a layer norm's input gradient over one row of n values (README): of
 * a = dy * w and of a * x^, with x^ = (x - m) r. */
static inline void FN(ln_grad_means)(const T *dy, const T *w, const T *x, int64_t n, T m, T r,
                                     T *mean_a, T *mean_ax) {
    T sa = 0, sax = 0;
#pragma omp simd reduction(+ : sa, sax)
    for (int64_t j = 0; j < n; j++) {
        T a = dy[j] * w[j];
        sa += a;
        sax += a * (x[j] - m) * r;
    }
    *mean_a = sa / (T)n;
    *mean_ax = sax / (T)n;
}

/* The per-unit math of the cells (engines/README.md): unit j of rows laid out gate by gate, i, f,
 * g, o for LSTM and r, z, n for GRU; x the input side (x W_ih^T + biases), y the recurrent one. */

/* What the LSTM cell leaves at a unit: c_t and h~ = o tanh(c_t). */
typedef struct {
    T c, h;
} FN(lstm_state);

/* h~ = o tanh(c), with c the cell or (layer norm) its norm. */
static inline T FN(lstm_out)(T o, T c) { return o * FN(tanh)(c); }

/* The gates, saved in a, and c_t = f c_{t-1} + i g. */
static inline FN(lstm_state) FN(lstm_fwd)(const T *x, const T *y, int64_t H, int64_t j, T c,
                                          T *a) {
    T i = FN(sigmoid)(x[j] + y[j]);
    T f = FN(sigmoid)(x[H + j] + y[H + j]);
    T g = FN(tanh)(x[2 * H + j] + y[2 * H + j]);
    T o = FN(sigmoid)(x[3 * H + j] + y[3 * H + j]);
    a[j] = i; a[H + j] = f; a[2 * H + j] = g; a[3 * H + j] = o;
    T cn = f * c + i * g;
    FN(lstm_state) s = {cn, FN(lstm_out)(o, cn)};
    return s;
}

/* Backward through h~ = o tc from d = dL/dh~: dG's o, and the gradient of the tanh's input. */
static inline T FN(lstm_bwd_out)(const T *a, int64_t H, int64_t j, T d, T tc, T *dg) {
    T o = a[3 * H + j];
    dg[3 * H + j] = d * tc * o * ((T)1 - o);
    return d * o * ((T)1 - tc * tc);
}

/* Backward through c_t = f c_{t-1} + i g from dct, all of dL/dc_t: dG's i, f, g, and the share
 * of dL/dc_{t-1} through the cell. */
static inline T FN(lstm_bwd_cell)(const T *a, int64_t H, int64_t j, T dct, T c_prev, T *dg) {
    T i = a[j], f = a[H + j], g = a[2 * H + j];
    dg[j] = dct * g * i * ((T)1 - i);
    dg[H + j] = dct * c_prev * f * ((T)1 - f);
    dg[2 * H + j] = dct * i * ((T)1 - g * g);
    return dct * f;
}

/* y + b_hh (zeros without a bias: a NULL here vectorised into masked loads from address 0,
 * which AMD CPUs take as a slow fault assist every time) saved in gh, which may be y itself; the
 * gates, saved in a; and
 * h_t = n + z (h_{t-1} - n). */
static inline T FN(gru_fwd)(const T *x, const T *y, const T *bhh, int64_t H, int64_t j, T h,
                            T *gh, T *a) {
    T yr = y[j] + bhh[j];
    T yz = y[H + j] + bhh[H + j];
    T yn = y[2 * H + j] + bhh[2 * H + j];
    gh[j] = yr; gh[H + j] = yz; gh[2 * H + j] = yn;
    T r = FN(sigmoid)(x[j] + yr);
    T z = FN(sigmoid)(x[H + j] + yz);
    T n = FN(tanh)(x[2 * H + j] + r * yn);
    a[j] = r; a[H + j] = z; a[2 * H + j] = n;
    return n + z * (h - n);
}

/* Backward from d = dL/dh_t and h_{t-1}: dG (input side) and dGH (recurrent side), and the share
 * of dL/dh_{t-1} past the gates, d z. */
static inline T FN(gru_bwd)(const T *a, const T *gh, int64_t H, int64_t j, T d, T h_prev, T *dg,
                            T *dgh) {
    T r = a[j], z = a[H + j], n = a[2 * H + j];
    T dn = d * ((T)1 - z) * ((T)1 - n * n);
    T dz = d * (h_prev - n) * z * ((T)1 - z);
    T dr = dn * gh[2 * H + j] * r * ((T)1 - r);
    dg[j] = dr; dg[H + j] = dz; dg[2 * H + j] = dn;
    dgh[j] = dr; dgh[H + j] = dz; dgh[2 * H + j] = dn * r;
    return d * z;
}

/* NaN stays NaN: x < 0 is false for it. */
static inline T FN(rnn_fwd)(T x, int64_t relu) {
    return relu ? (x < 0 ? (T)0 : x) : FN(tanh)(x);
}

/* From d = dL/dh_t and h_t. */
static inline T FN(rnn_bwd)(T d, T h, int64_t relu) {
    return relu ? (h > 0 ? d : (T)0) : d * ((T)1 - h * h);
}

/* One value's layer norm, with its row's mean m and 1/std r (row_stats), gain w and bias b. */
static inline T FN(ln_affine)(T x, T m, T r, T w, T b) { return (x - m) * r * w + b; }

/* The layer norm's input gradient at x, from dy, the gain w and the row's means ma and max of
 * ln_grad_means. */
static inline T FN(ln_input_grad)(T dy, T w, T x, T m, T r, T ma, T max) {
    return r * (dy * w - ma - (x - m) * r * max);
}

/* Zoneout keeps k of a unit's previous value. */
static inline T FN(zoneout_blend)(T k, T prev, T next) { return k * prev + ((T)1 - k) * next; }

/* A forward call as a thread holds it: nl_forward's arguments, the variants' pointers (see
 * nl_variants; NULL where off), sizes and flags, and the thread's units: [j0, j1) of the hidden
 * units, [q0, q1) of h's (the same without a projection). */
typedef struct {
    nl_walk walk;
    int64_t N, B, H, R, GW, gates, lstm, gru, relu, ln, zo, P;
    const T *G, *w, *bhh, *h0, *ln_hw, *ln_hb, *ln_cw, *ln_cb, *rmask, *w_hr, *zh, *zc;
    T *A, *out, *h, *c, *C, *GH, *Z, *Zr, *stats, *CZ, *Rs;
    /* Scratch: h_{t-1} times the mask (HM, 2 halves), the normed product (Y), r_t (RS); with
     * zoneout the step's h_{t-1} (PH), c_{t-1} (PC) and, where C is not saved, c~ (CS). */
    T *HM, *Y, *RS, *PH, *PC, *CS;
    T eps, zp;
    int64_t j0, j1, q0, q1;
    /* The thread's units of W_hh and its rows of W_hr as panels (panel_product), or none. */
    FN(panels) pp, ppr;
    /* int8 weights (float32 only; NULL: w and w_hr are the weights), and the thread's own
     * quantized rows of h_{t-1} or r_t with their scales. */
    const nl_q8 *q8;
    q8_act *qa;
    float *sa;
    /* Split by rows instead of units (int8 inference with B > 1): the thread owns rows
     * [r0, r1) of the batch and every unit, so that no step waits for another thread. */
    int rows;
    int64_t r0, r1;
    /* The step barrier's flags (nth of them), this thread's index and barriers passed. */
    nl_flag *flags;
    int64_t nth, tid, passed;
    /* int8 with x: each thread computes its share of G a few steps ahead of its walk
     * (q8_input_ahead), quantizing x's rows into qx, sx. */
    int q8_in;
    q8_act *qx;
    float *sx;
} FN(fwd_call);

/* A forward step and its rows: the product Zt, what the cell reads of it Yt (its norm, or Zt
 * itself), c~ Ct and r_t Rt. */
typedef struct {
    nl_step at;
    T *Zt, *Yt, *Ct, *Rt;
} FN(fwd_rows);

/* The variants' pointers of a forward call, and whether they fit together and the mode. */
static int64_t FN(fwd_variants)(FN(fwd_call) *cx, const nl_variants *v) {
    cx->R = cx->H;
    if (!v) return NL_OK;
    const int64_t lstm = cx->lstm, cells = cx->lstm || cx->gru;
    cx->ln_hw = v->ln_hw; cx->ln_hb = v->ln_hb; cx->ln_cw = v->ln_cw; cx->ln_cb = v->ln_cb;
    cx->rmask = v->rmask; cx->Zr = v->Zr; cx->stats = v->stats;
    cx->HM = v->scratch; cx->Y = v->ln_scratch;
    cx->ln = cx->ln_hw != 0;
    if (cx->ln && (!cx->ln_hb || !cells || (lstm && (!cx->ln_cw || !cx->ln_cb)) ||
                   (!cx->Zr != !cx->stats)))
        return NL_BAD_VARIANTS;
    if (cx->ln && !cx->Zr && !cx->Y) return NL_BAD_VARIANTS;
    cx->P = v->proj;
    cx->R = cx->P ? cx->P : cx->H;
    if (cx->P) {
        cx->w_hr = v->w_hr; cx->Rs = v->Rs; cx->RS = v->r_scratch;
    }
    const int q8_hr = cx->q8 && cx->q8->hr.w;
    if (cx->P < 0 || (cx->P && (!lstm || (!cx->w_hr && !q8_hr) || (!cx->Rs && !cx->RS))))
        return NL_BAD_VARIANTS;
    cx->zo = v->zoneout != 0;
    if (cx->zo) {
        cx->zh = v->zh; cx->zc = v->zc; cx->zp = (T)v->zoneout_p; cx->CZ = v->CZ;
        cx->PH = v->zo_scratch;
        cx->PC = cx->PH ? cx->PH + cx->B * cx->R : 0;
        cx->CS = cx->PH ? cx->PC + cx->B * cx->H : 0;
    }
    if (cx->zo && (!cx->PH || !cells || (cx->C && lstm && !cx->CZ))) return NL_BAD_VARIANTS;
    if (cx->rmask && !cx->HM) return NL_BAD_VARIANTS;
    cx->eps = (T)v->eps;
    return NL_OK;
}

static FN(fwd_rows) FN(fwd_rows_at)(const FN(fwd_call) *cx, int64_t s) {
    const nl_walk *wk = &cx->walk;
    FN(fwd_rows) st;
    st.at = step_at(wk, s, wk->reverse ? wk->T_ - 1 - s : s);
    if (cx->rows) own_rows(&st.at, cx->r0, cx->r1);
    const int64_t off = st.at.off;
    /* The product before its norm is saved where there is one. */
    st.Zt = cx->ln && cx->Zr ? cx->Zr + off * cx->GW : cx->Z;
    st.Yt = !cx->ln ? st.Zt : cx->Zr ? cx->Z : cx->Y;
    /* c~: saved, or (zoneout) apart from the state, or the state itself. */
    st.Ct = cx->C ? cx->C + off * cx->H : cx->zo ? cx->CS : cx->c;
    st.Rt = cx->P ? (cx->Rs ? cx->Rs + off * cx->H : cx->RS) : 0;
    return st;
}

/* Row b's gate activations: A's row, or Z's second half where A is not saved. */
static inline T *FN(acts_row)(const FN(fwd_call) *cx, int64_t off, int64_t b) {
    return cx->A ? cx->A + (off + b) * cx->GW : cx->Z + (cx->B + b) * cx->GW;
}

/* Z_t = h_{t-1} W_hh^T on the thread's units of every gate; with recurrent dropout h_{t-1}
 * times the mask, from HM. */
static void FN(fwd_product)(const FN(fwd_call) *cx, const FN(fwd_rows) *st) {
    const int64_t H = cx->H, R = cx->R, gates = cx->gates, j0 = cx->j0, j1 = cx->j1;
    const nl_step *a = &st->at;
#if NL_Q8
    if (cx->q8) {
        /* Every thread quantizes whole rows itself (each scale reads the whole row): no
         * barrier to share them. Eval only, so no recurrent-dropout mask. */
        const int64_t Kp = q8_kp(R);
        q8_quantize_rows(a->np, cx->out + a->offp * R, R, R, cx->qa, cx->sa);
        q8_quantize_rows(a->n - a->np, cx->h0 + a->np * R, R, R, cx->qa + a->np * Kp,
                         cx->sa + a->np);
        if (j1 > j0) q8_product(a->n, cx->qa, cx->sa, &cx->q8->hh, j0, j1, st->Zt, cx->GW);
        return;
    }
#endif
    if (cx->rmask) {
        FN(gates_product)(a->n, cx->HM + (a->s & 1) * cx->B * R, H, R, gates, cx->w, j0, j1,
                          st->Zt, a->wide ? &cx->pp : 0);
        return;
    }
    if (a->np > 0)
        FN(gates_product)(a->np, cx->out + a->offp * R, H, R, gates, cx->w, j0, j1, st->Zt,
                          a->wide ? &cx->pp : 0);
    FN(gates_product)(a->n - a->np, cx->h0 + a->np * R, H, R, gates, cx->w, j0, j1,
                      st->Zt + a->np * cx->GW, a->wide ? &cx->pp : 0);
}

/* Y_t = LN(Z_t) on the thread's units. Every thread computes each row's statistics itself (no
 * barrier to share them); the first saves them. */
static void FN(fwd_norm_product)(const FN(fwd_call) *cx, const FN(fwd_rows) *st) {
    const int64_t H = cx->H, GW = cx->GW, N = cx->N, j0 = cx->j0, j1 = cx->j1, off = st->at.off;
    const T *w = cx->ln_hw, *bias = cx->ln_hb;
    T *stats = cx->stats;
    for (int64_t b = 0; b < st->at.n; b++) {
        const T *zr = st->Zt + b * GW;
        T *yr = st->Yt + b * GW, m, r;
        FN(row_stats)(zr, GW, cx->eps, &m, &r);
        if (stats && j0 == 0) {
            stats[off + b] = m;
            stats[N + off + b] = r;
        }
        for (int64_t g = 0; g < cx->gates; g++) {
#pragma omp simd
            for (int64_t k = g * H + j0; k < g * H + j1; k++)
                yr[k] = FN(ln_affine)(zr[k], m, r, w[k], bias[k]);
        }
    }
}

/* Zoneout: the thread's units of h_{t-1} and c_{t-1}, kept before the cell overwrites them. */
static void FN(fwd_zoneout_keep)(const FN(fwd_call) *cx, const FN(fwd_rows) *st) {
    const int64_t H = cx->H, R = cx->R, j0 = cx->j0, j1 = cx->j1, q0 = cx->q0, q1 = cx->q1;
    for (int64_t b = 0; b < st->at.n; b++) {
        memcpy(cx->PH + b * R + q0, cx->h + b * R + q0, (size_t)(q1 - q0) * sizeof(T));
        if (cx->lstm)
            memcpy(cx->PC + b * H + j0, cx->c + b * H + j0, (size_t)(j1 - j0) * sizeof(T));
    }
}

/* The LSTM cell on the thread's units: c_t (and c~ where kept apart) and h~, or r_t with a
 * projection. With the cell's norm, fwd_norm_cell rewrites h~ once every unit of c_t is in. */
static void FN(fwd_lstm)(const FN(fwd_call) *cx, const FN(fwd_rows) *st) {
    const int64_t H = cx->H, GW = cx->GW, R = cx->R, j0 = cx->j0, j1 = cx->j1, off = st->at.off;
    for (int64_t b = 0; b < st->at.n; b++) {
        const T *gr = cx->G + (off + b) * GW, *yr = st->Yt + b * GW;
        T *ar = FN(acts_row)(cx, off, b), *cr = cx->c + b * H, *csr = st->Ct + b * H;
        T *h1 = cx->P ? st->Rt + b * H : cx->out + (off + b) * R;
        T *h2 = cx->P ? h1 : cx->h + b * R;
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            FN(lstm_state) s = FN(lstm_fwd)(gr, yr, H, j, cr[j], ar);
            cr[j] = s.c; csr[j] = s.c;
            h1[j] = s.h; h2[j] = s.h;
        }
    }
}

static void FN(fwd_gru)(const FN(fwd_call) *cx, const FN(fwd_rows) *st) {
    const int64_t H = cx->H, GW = cx->GW, R = cx->R, j0 = cx->j0, j1 = cx->j1, off = st->at.off;
    const T *bhh = cx->bhh;
    for (int64_t b = 0; b < st->at.n; b++) {
        const T *gr = cx->G + (off + b) * GW;
        T *yr = st->Yt + b * GW, *ar = FN(acts_row)(cx, off, b);
        /* Without GH, y + b_hh replaces y: no other thread reads these units. */
        T *ghr = cx->GH ? cx->GH + (off + b) * GW : yr;
        T *hr = cx->h + b * R, *outr = cx->out + (off + b) * R;
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            T hn = FN(gru_fwd)(gr, yr, bhh, H, j, hr[j], ghr, ar);
            outr[j] = hn; hr[j] = hn;
        }
    }
}

static void FN(fwd_rnn)(const FN(fwd_call) *cx, const FN(fwd_rows) *st) {
    const int64_t H = cx->H, relu = cx->relu, j0 = cx->j0, j1 = cx->j1, off = st->at.off;
    for (int64_t b = 0; b < st->at.n; b++) {
        const T *gr = cx->G + (off + b) * H, *yr = st->Yt + b * H;
        T *hr = cx->h + b * H, *outr = cx->out + (off + b) * H;
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            T hn = FN(rnn_fwd)(gr[j] + yr[j], relu);
            outr[j] = hn; hr[j] = hn;
        }
    }
}

/* The layer-norm LSTM's h~ = o tanh(LN(c_t)) on the thread's units. */
static void FN(fwd_norm_cell)(const FN(fwd_call) *cx, const FN(fwd_rows) *st) {
    const int64_t H = cx->H, R = cx->R, N = cx->N, j0 = cx->j0, j1 = cx->j1, off = st->at.off;
    const T *w = cx->ln_cw, *bias = cx->ln_cb;
    T *stats = cx->stats;
    for (int64_t b = 0; b < st->at.n; b++) {
        const T *cr = st->Ct + b * H, *o = FN(acts_row)(cx, off, b) + 3 * H;
        T *h1 = cx->P ? st->Rt + b * H : cx->out + (off + b) * R;
        T *h2 = cx->P ? h1 : cx->h + b * R;
        T m, r;
        FN(row_stats)(cr, H, cx->eps, &m, &r);
        if (stats && j0 == 0) {
            stats[2 * N + off + b] = m;
            stats[3 * N + off + b] = r;
        }
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            T hn = FN(lstm_out)(o[j], FN(ln_affine)(cr[j], m, r, w[j], bias[j]));
            h1[j] = hn; h2[j] = hn;
        }
    }
}

/* h~[:, q0:q1] = r_t W_hr[q0:q1]^T, and without zoneout h_t = h~. */
static void FN(fwd_project)(const FN(fwd_call) *cx, const FN(fwd_rows) *st) {
    const int64_t H = cx->H, R = cx->R, q0 = cx->q0, q1 = cx->q1, off = st->at.off;
#if NL_Q8
    if (cx->q8 && cx->q8->hr.w) {
        q8_quantize_rows(st->at.n, st->Rt, H, H, cx->qa, cx->sa);
        if (q1 > q0) q8_product(st->at.n, cx->qa, cx->sa, &cx->q8->hr, q0, q1, cx->out + off * R, R);
    } else
#endif
    if (st->at.wide && cx->ppr.n)
        FN(panel_product)(st->at.n, st->Rt, H, &cx->ppr, cx->out + off * R + q0, R, 0);
    else if (q1 > q0)
        FN(dot_rows)(st->at.n, st->Rt, H, cx->w_hr + q0 * H, q1 - q0, cx->out + off * R + q0, R);
    if (cx->zo) return;
    for (int64_t b = 0; b < st->at.n; b++)
        memcpy(cx->h + b * R + q0, cx->out + (off + b) * R + q0, (size_t)(q1 - q0) * sizeof(T));
}

/* Zoneout on the thread's units: h_t from h_{t-1} and h~, LSTM's c_t from c_{t-1} and c~ (and
 * saved in CZ where C is saved); k from the masks, or p where they are NULL. */
static void FN(fwd_zoneout)(const FN(fwd_call) *cx, const FN(fwd_rows) *st) {
    const int64_t H = cx->H, R = cx->R, j0 = cx->j0, j1 = cx->j1, q0 = cx->q0, q1 = cx->q1;
    const T zp = cx->zp, *zh = cx->zh, *zc = cx->zc;
    for (int64_t b = 0; b < st->at.n; b++) {
        const int64_t row = st->at.off + b;
        const T *khr = zh ? zh + row * R : 0, *phr = cx->PH + b * R;
        T *outr = cx->out + row * R, *hr = cx->h + b * R;
#pragma omp simd
        for (int64_t q = q0; q < q1; q++) {
            T hn = FN(zoneout_blend)(khr ? khr[q] : zp, phr[q], outr[q]);
            outr[q] = hn; hr[q] = hn;
        }
        if (!cx->lstm) continue;
        const T *kcr = zc ? zc + row * H : 0, *pcr = cx->PC + b * H, *ctr = st->Ct + b * H;
        T *cr = cx->c + b * H, *czr = cx->CZ ? cx->CZ + row * H : cr;
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            T cn = FN(zoneout_blend)(kcr ? kcr[j] : zp, pcr[j], ctr[j]);
            cr[j] = cn; czr[j] = cn;
        }
    }
}

/* Recurrent dropout: the next step's product reads h_t times the mask, from HM's other half. */
static void FN(fwd_mask)(const FN(fwd_call) *cx, const FN(fwd_rows) *st) {
    const int64_t R = cx->R, q0 = cx->q0, q1 = cx->q1, off = st->at.off;
    const T *rmask = cx->rmask;
    T *next = cx->HM + ((st->at.s + 1) & 1) * cx->B * R;
    for (int64_t b = 0; b < st->at.n; b++)
        for (int64_t q = q0; q < q1; q++)
            next[b * R + q] = cx->out[(off + b) * R + q] * rmask[b * R + q];
}

/* Both halves of HM start as h0 times the mask: a row that starts late (reverse, packed) reads
 * h0's from whichever half its first step reads. */
static void FN(fwd_mask_h0)(const FN(fwd_call) *cx) {
    const int64_t B = cx->B, R = cx->R, q0 = cx->q0, q1 = cx->q1;
    const T *h0 = cx->h0, *rmask = cx->rmask;
    T *HM = cx->HM;
    for (int64_t b = 0; b < B; b++)
        for (int64_t q = q0; q < q1; q++)
            HM[b * R + q] = HM[(B + b) * R + q] = h0[b * R + q] * rmask[b * R + q];
}

/* A barrier, where threads split the units (threads that split the rows share nothing). */
static inline void FN(fwd_sync)(FN(fwd_call) *cx) {
    if (!cx->rows && cx->nth > 1) flag_barrier(cx->flags, cx->nth, cx->tid, &cx->passed);
}

/* One forward step on the thread's units, with a barrier before each phase that reads units
 * other threads wrote. */
static void FN(fwd_step)(FN(fwd_call) *cx, int64_t s) {
    const FN(fwd_rows) st = FN(fwd_rows_at)(cx, s);
    if (cx->rows && st.at.n == 0) return;
    FN(fwd_product)(cx, &st);
    if (cx->ln) {
        FN(fwd_sync)(cx);
        FN(fwd_norm_product)(cx, &st);
    }
    if (cx->zo) FN(fwd_zoneout_keep)(cx, &st);
    if (cx->lstm)
        FN(fwd_lstm)(cx, &st);
    else if (cx->gru)
        FN(fwd_gru)(cx, &st);
    else
        FN(fwd_rnn)(cx, &st);
    if (cx->ln && cx->lstm) {
        FN(fwd_sync)(cx);
        FN(fwd_norm_cell)(cx, &st);
    }
    if (cx->P) {
        FN(fwd_sync)(cx);
        FN(fwd_project)(cx, &st);
    }
    if (cx->zo) FN(fwd_zoneout)(cx, &st);
    if (cx->rmask) FN(fwd_mask)(cx, &st);
    /* The next product reads every unit of h_t. */
    FN(fwd_sync)(cx);
}

/* The thread's rows [r0, r1) of B, and every row-indexed pointer of the call moved to r0. */
static void FN(fwd_own_rows)(FN(fwd_call) *cx) {
    int64_t nth, tid;
    this_thread(&nth, &tid);
    const int64_t R = cx->R, H = cx->H, GW = cx->GW;
    rows_of_thread(cx->B, nth, tid, &cx->r0, &cx->r1);
    cx->j0 = 0; cx->j1 = H; cx->q0 = 0; cx->q1 = R;
    const int64_t r = cx->r0;
    cx->h0 += r * R; cx->h += r * R; cx->Z += r * GW;
    if (cx->c) cx->c += r * H;
    if (cx->Y) cx->Y += r * GW;
    if (cx->RS) cx->RS += r * H;
    if (cx->PH) {
        cx->PH += r * R; cx->PC += r * H; cx->CS += r * H;
    }
}

/* Bytes of one thread's quantized rows of h_{t-1} or (projection) r_t: B rows. */
static int64_t FN(q8_h_scratch)(const FN(fwd_call) *cx) {
    const int64_t K = cx->P ? (cx->R > cx->H ? cx->R : cx->H) : cx->R;
    return (cx->B * q8_kp(K) * (int64_t)sizeof(q8_act) + 63) / 64 * 64;
}

/* One thread's quantized rows: B of h_{t-1}, then (q8_in) Q8_STEPS * B of x; their scales
 * rounded up to whole cache lines (the threads write theirs every step). */
static int64_t FN(q8_rows)(const FN(fwd_call) *cx) {
    return (cx->B + (cx->q8_in ? Q8_STEPS * cx->B : 0) + 15) / 16 * 16;
}

/* Bytes of one thread's quantized rows (a multiple of 64). */
static int64_t FN(q8_scratch)(const FN(fwd_call) *cx) {
    const int64_t x =
        cx->q8_in ? Q8_STEPS * cx->B * q8_kp(cx->q8->ih.K) * (int64_t)sizeof(q8_act) : 0;
    return (FN(q8_h_scratch)(cx) + x + 63) / 64 * 64;
}

/* Whether int8 weights fit the call (float32 only: the double instantiation takes none). */
static int FN(q8_fits)(const FN(fwd_call) *cx, const nl_q8 *q) {
    if (!NL_Q8) return 0;
    if (!q8_matrix_ok(&q->hh, cx->gates, cx->H, cx->R)) return 0;
    return cx->P ? !q->hr.w || q8_matrix_ok(&q->hr, 1, cx->P, cx->H) : !q->hr.w;
}

/* int8 with x: the input side of the next Q8_STEPS steps from s, just before the walk reads it
 * (while it is still in this core's cache), on what the thread owns: its units of every row
 * (only it reads them), or where threads take rows every unit of its rows, a step at a time
 * (its rows of a step are one run of x). No other thread reads what it writes. */
static void FN(q8_input_ahead)(const FN(fwd_call) *cx, int64_t s) {
#if NL_Q8
    const nl_walk *wk = &cx->walk;
    if (!cx->rows) {
        q8_input_side(wk, cx->q8, s, cx->j0, cx->j1, (float *)cx->G, cx->GW, cx->qx, cx->sx);
        return;
    }
    for (int64_t i = s; i < s + Q8_STEPS && i < wk->T_; i++) {
        nl_step at = step_at(wk, i, wk->reverse ? wk->T_ - 1 - i : i);
        own_rows(&at, cx->r0, cx->r1);
        q8_input_rows(cx->q8, at.off, at.off + at.n, 0, cx->H, (float *)cx->G, cx->GW, cx->qx,
                      cx->sx);
    }
#else
    (void)cx;
    (void)s;
#endif
}

/* One thread's share of nl_forward: its units, MKL on one thread, its blocks of W_hh packed
 * once, then every step. */
static void FN(fwd_thread)(const FN(fwd_call) *call) {
    FN(fwd_call) cx = *call;
    split_units(cx.H, &cx.j0, &cx.j1);
    split_units(cx.R, &cx.q0, &cx.q1);
    cx.passed = 0;
    this_thread(&cx.nth, &cx.tid);
    if (cx.rows) FN(fwd_own_rows)(&cx);
    if (cx.q8) {
        cx.qa = (q8_act *)((int8_t *)cx.qa + cx.tid * FN(q8_scratch)(&cx));
        cx.sa += cx.tid * FN(q8_rows)(&cx);
        cx.qx = (q8_act *)((int8_t *)cx.qa + FN(q8_h_scratch)(&cx));
        cx.sx = cx.sa + cx.B;
    }
    /* Panels where a step can be wide; where memory runs out, the own loops instead. */
    cx.pp = cx.ppr = (FN(panels)){0};
    if (!cx.q8 && FN(worth_panels)(&cx.walk, cx.B)) {
        FN(panels_make)(&cx.pp, cx.w + cx.j0 * cx.R, cx.gates, cx.j1 - cx.j0, cx.R,
                        cx.H * cx.R, cx.R, 1, cx.H);
        if (cx.P) FN(panels_make)(&cx.ppr, cx.w_hr + cx.q0 * cx.H, 1, cx.q1 - cx.q0, cx.H, 0,
                                  cx.H, 1, 0);
    }
    if (cx.rmask) {
        FN(fwd_mask_h0)(&cx);
        barrier();
    }
    for (int64_t s = 0; s < cx.walk.T_; s++) {
        if (cx.q8_in && s % Q8_STEPS == 0) FN(q8_input_ahead)(&cx, s);
        FN(fwd_step)(&cx, s);
    }
    FN(panels_free)(&cx.pp);
    FN(panels_free)(&cx.ppr);
}

/* Whether the threads of a float forward or backward take rows of the batch rather than units
 * (split: NL_SPLIT_AUTO, _UNITS or _ROWS; int8: q8_rows_pay above). Every row's
 * walk is its own, so threads that take rows never wait for each other; but each then reads all
 * of the recurrent weights every step where a thread that takes units reads its share.
 * Automatic: rows where every thread has at least 4 rows (from 4 rows a tile's product runs
 * within a tenth of a full tile's speed a row, so it is bound by its multiply-adds whichever way
 * the threads split) and all the weights fit in one core's L2 cache, so that each core keeps its
 * copy there.
 * Measured on the 2-core Zen 4 (1 MiB L2, I=H=256 forward, BENCHMARKS.md): 0.81-0.93x the time
 * at B=16, 32 and 64, 0.6-0.7x at B=12, level at B=8 (GRU 0.7-0.9x); at H=512 (4 MiB of LSTM
 * weights) level, at H=1024 1.3-1.8x, hence the cache bound. Not with recurrent dropout (its
 * masked h_{t-1} is a buffer shared by the threads). */
static int FN(rows_pay)(int64_t B, int64_t GW, int64_t R, int64_t proj_weights,
                       const nl_walk *wk, int64_t nthreads, int64_t split, int rmask) {
    if (split == NL_SPLIT_UNITS || rmask) return 0;
    if (split == NL_SPLIT_ROWS) return 1;
    const int64_t bytes = (GW * R + proj_weights) * (int64_t)sizeof(T);
    return B >= 4 * nthreads && FN(worth_panels)(wk, B) && bytes <= l2_bytes();
}

/* One layer and direction forward; see engines/native/loop.py's `forward` for the contract.
 * G (N, GW): x W_ih^T + biases, read only. A (N, GW): the gate activations that backward reads
 * (may be G itself), or NULL to keep only each step's, in the second half of Z.
 * h (B, R), c (B, H): the state, copied from h0, c0 first (c0 NULL: c holds it already), h_n
 * and c_n at the end; R = H, or P with a projection (then w is (GW, P) and h0, out are P wide).
 * C (N, H) the saved c_t or NULL; GH (N, 3H) the saved Z_t + b_hh of GRU or NULL (then Z holds
 * it); Z (B, GW) scratch, (2, B, GW) when A is NULL;
 * offsets (T_ + 1) scratch; either NULL: allocated here (see loop.py's `forward` for why).
 * v: the variants or NULL (see nl_variants). q8: int8 weights for W_hh (w unread, may be
 * NULL) and LSTM's W_hr (variants' w_hr unread), or NULL; float32 inference only (A, C, GH,
 * and the variants' saved tensors NULL). */
static int64_t FN(forward_in)(int64_t mode, int64_t reverse, int64_t T_, const int64_t *bs,
                              int64_t N, int64_t B, int64_t H, const T *G, T *A, const T *w,
                              const T *bhh, const T *h0, const T *c0, T *out, T *h, T *c, T *C,
                              T *GH, T *Z, int64_t *offsets, int64_t nthreads,
                              int64_t gemm_min_rows, int64_t split, const nl_variants *v,
                              const nl_q8 *q8);

int64_t FN(nl_forward)(int64_t mode, int64_t reverse, int64_t T_, const int64_t *bs, int64_t N,
                       int64_t B, int64_t H, const T *G, T *A, const T *w, const T *bhh,
                       const T *h0, const T *c0, T *out, T *h, T *c, T *C, T *GH, T *Z,
                       int64_t *offsets, int64_t nthreads, int64_t gemm_min_rows,
                       int64_t split, const nl_variants *v, const nl_q8 *q8) {
    if (mode < NL_LSTM || mode > NL_RNN_RELU) return NL_BAD_MODE;
    if (split < NL_SPLIT_AUTO || split > NL_SPLIT_ROWS) return NL_BAD_SIZES;
    if (T_ < 0 || N < 0 || B < 1 || H < 1 || B > INT64_MAX / 4 || H > INT64_MAX / 4)
        return NL_BAD_SIZES;
    const int64_t zrows = A ? B : 2 * B, GW = gates_of(mode) * H;
    if (GW > INT64_MAX / 64 / zrows || T_ > INT64_MAX / 8 - 1) return NL_BAD_SIZES;
    const int64_t zbytes = (zrows * GW * (int64_t)sizeof(T) + 63) / 64 * 64;
    T *own_z = Z ? 0 : aligned_alloc(64, (size_t)zbytes);
    int64_t *own_offsets = offsets ? 0 : malloc((size_t)(T_ + 1) * sizeof(int64_t));
    int64_t rc = NL_NO_MEMORY;
    if ((Z || own_z) && (offsets || own_offsets))
        rc = FN(forward_in)(mode, reverse, T_, bs, N, B, H, G, A, w, bhh, h0, c0, out, h, c, C,
                            GH, Z ? Z : own_z, offsets ? offsets : own_offsets, nthreads,
                            gemm_min_rows, split, v, q8);
    free(own_z);
    free(own_offsets);
    return rc;
}

static int64_t FN(forward_in)(int64_t mode, int64_t reverse, int64_t T_, const int64_t *bs,
                              int64_t N, int64_t B, int64_t H, const T *G, T *A, const T *w,
                              const T *bhh, const T *h0, const T *c0, T *out, T *h, T *c, T *C,
                              T *GH, T *Z, int64_t *offsets, int64_t nthreads,
                              int64_t gemm_min_rows, int64_t split, const nl_variants *v,
                              const nl_q8 *q8) {
    if (!G || (!w && !q8) || !h0 || !out || !h || !Z || !offsets || (mode == NL_LSTM && !c))
        return NL_MISSING_TENSOR;
    FN(fwd_call) cx = {
        .N = N, .B = B, .H = H, .gates = gates_of(mode), .GW = gates_of(mode) * H,
        .lstm = mode == NL_LSTM, .gru = mode == NL_GRU, .relu = mode == NL_RNN_RELU,
        .G = G, .A = A, .w = w, .bhh = bhh, .h0 = h0, .out = out, .h = h, .c = c, .C = C,
        .GH = GH, .Z = Z, .q8 = q8,
    };
    int64_t rc = FN(fwd_variants)(&cx, v);
    if (rc == NL_OK) rc = check_batch_sizes(T_, bs, N, B, offsets);
    if (rc != NL_OK) return rc;
    if (q8 && (!FN(q8_fits)(&cx, q8) || A || C || GH || cx.rmask || cx.Zr || cx.CZ || cx.Rs))
        return NL_BAD_VARIANTS;
    if (q8 && q8->x && (!q8_matrix_ok(&q8->ih, cx.gates, H, q8->ih.K) || cx.ln))
        return NL_BAD_VARIANTS;
    nthreads = sane_threads(nthreads);
    cx.walk = (nl_walk){T_, reverse, bs, offsets, gemm_min_rows};
    cx.rows = nthreads > 1 && B > 1 &&
              (q8 ? q8_rows_pay(split)
                  : FN(rows_pay)(B, cx.GW, cx.R, cx.P * H, &cx.walk, nthreads, split,
                                 cx.rmask != 0));
    if (cx.rows && nthreads > B) nthreads = B;
    /* The input side: each thread its own share, a few steps ahead of its walk (q8_in). */
    cx.q8_in = q8 && q8->x;
    void *scratch = 0;
    if (q8) {
        const int64_t per = FN(q8_scratch)(&cx), rows = FN(q8_rows)(&cx);
        scratch = aligned_alloc(64, (size_t)(nthreads * (per + rows * (int64_t)sizeof(float))));
        if (!scratch) return NL_NO_MEMORY;
        cx.qa = scratch;
        cx.sa = (float *)((int8_t *)scratch + nthreads * per);
    }
    cx.flags = flags_new(nthreads);
    T *zeros = cx.gru && !bhh ? calloc((size_t)cx.GW, sizeof(T)) : 0;
    if (!cx.flags || (cx.gru && !bhh && !zeros)) {
        free(cx.flags);
        free(scratch);
        return NL_NO_MEMORY;
    }
    if (zeros) cx.bhh = zeros;
    /* The state starts as h0, c0 (here, not a copy the caller makes: one torch operator less). */
    if (h != h0) memmove(h, h0, (size_t)(B * cx.R) * sizeof(T));
    if (c && c0 && c != c0) memmove(c, c0, (size_t)(B * H) * sizeof(T));
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    FN(fwd_thread)(&cx);
    free(zeros);
    free(cx.flags);
    free(scratch);
    return NL_OK;
}

/* A backward call as a thread holds it: nl_backward's arguments, the variants' pointers, sizes
 * and flags, and the thread's units, as in fwd_call. */
typedef struct {
    nl_walk walk;
    int64_t N, B, H, R, GW, gates, lstm, gru, relu, ln, zo, P;
    const T *G, *GH, *out, *C, *h0, *c0, *w, *dout, *ln_hw, *ln_cw, *ln_cb, *rmask, *Zr, *stats;
    const T *w_hr, *zh, *zc, *CZ;
    /* c_{t-1}'s rows (the zoned ones under zoneout); what multiplies W_hh (the gradient of the
     * product, before its norm if any). */
    const T *Cprev, *D;
    T *dh, *dc, *dG, *dGH, *dZ, *dCN, *dHt;
    /* Scratch: the product before the mask (S), dr = dh~ W_hr (DR); with zoneout the shares of
     * dL/dh_t and dL/dc_t that pass to step t-1 past the cell (CH, CC). */
    T *S, *DR, *CH, *CC;
    /* The layer norms' parameter gradients, summed here (nl_variants' ln_grads) or NULL; where
     * threads take rows, each sums its own lng_n of them in lng_rows, added up at the end. */
    double *lng, *lng_rows;
    int64_t lng_n;
    T zp;
    int64_t j0, j1, q0, q1;
    /* The thread's columns of W_hh and of W_hr as panels (panel_product), or none. */
    FN(panels) pp, ppr;
    /* Split by rows instead of units (as in fwd_call): rows [r0, r1) of the batch. */
    int rows;
    int64_t r0, r1;
    /* The step barrier's flags (nth of them), this thread's index and barriers passed. */
    nl_flag *flags;
    int64_t nth, tid, passed;
} FN(bwd_call);

/* The variants' pointers of a backward call, and whether they fit together and the mode. */
static int64_t FN(bwd_variants)(FN(bwd_call) *cx, const nl_variants *v) {
    cx->R = cx->H;
    if (!v) return NL_OK;
    const int64_t lstm = cx->lstm, cells = cx->lstm || cx->gru;
    cx->ln_hw = v->ln_hw; cx->ln_cw = v->ln_cw; cx->ln_cb = v->ln_cb; cx->rmask = v->rmask;
    cx->Zr = v->Zr; cx->stats = v->stats; cx->dZ = v->dZ; cx->dCN = v->dCN; cx->S = v->scratch;
    cx->ln = cx->ln_hw != 0;
    cx->lng = cx->ln ? v->ln_grads : 0;
    if (cx->ln && (!cx->Zr || !cx->stats || !cx->dZ || !cells ||
                   (lstm && (!cx->ln_cw || !cx->ln_cb || !cx->dCN))))
        return NL_BAD_VARIANTS;
    if (cx->rmask && !cx->S) return NL_BAD_VARIANTS;
    cx->P = v->proj;
    cx->R = cx->P ? cx->P : cx->H;
    if (cx->P) {
        cx->w_hr = v->w_hr; cx->dHt = v->dHt; cx->DR = v->r_scratch;
    }
    if (cx->P < 0 || (cx->P && (!lstm || !cx->w_hr || !cx->dHt || !cx->DR)))
        return NL_BAD_VARIANTS;
    cx->zo = v->zoneout != 0;
    if (cx->zo) {
        cx->zh = v->zh; cx->zc = v->zc; cx->zp = (T)v->zoneout_p; cx->CZ = v->CZ;
        cx->CH = v->zo_scratch;
        cx->CC = cx->CH ? cx->CH + cx->B * cx->R : 0;
    }
    if (cx->zo && (!cx->CH || !cells || (lstm && !cx->CZ))) return NL_BAD_VARIANTS;
    return NL_OK;
}

/* The row of dout that the cell adds to dL/dh_t itself: NULL where there is none or where
 * bwd_split has folded it in already. */
static inline const T *FN(dout_row)(const FN(bwd_call) *cx, int64_t row) {
    return cx->dout && !cx->zo && !cx->P ? cx->dout + row * cx->R : 0;
}

/* Row b's c_{t-1}: the previous step's, or c0 where the row starts. */
static inline const T *FN(c_prev_row)(const FN(bwd_call) *cx, const nl_step *st, int64_t b) {
    return b < st->np ? cx->Cprev + (st->offp + b) * cx->H : cx->c0 + b * cx->H;
}

/* dL/dh_t with dout folded in, for zoneout or a projection: zoneout sets k of it aside, past the
 * cell (CH; LSTM's dc alike, CC); the cell's share goes to dh, or with a projection to dHt. */
static void FN(bwd_split)(const FN(bwd_call) *cx, const nl_step *st) {
    const int64_t H = cx->H, R = cx->R, j0 = cx->j0, j1 = cx->j1, q0 = cx->q0, q1 = cx->q1;
    const int64_t zo = cx->zo;
    const T zp = cx->zp, *zh = cx->zh, *zc = cx->zc, *dout = cx->dout;
    for (int64_t b = 0; b < st->n; b++) {
        const int64_t row = st->off + b;
        const T *khr = zh ? zh + row * R : 0, *doutr = dout ? dout + row * R : 0;
        T *dhr = cx->dh + b * R, *chr = zo ? cx->CH + b * R : 0;
        T *cell = cx->P ? cx->dHt + row * R : dhr;
#pragma omp simd
        for (int64_t q = q0; q < q1; q++) {
            T d = dhr[q] + (doutr ? doutr[q] : 0);
            T k = zo ? (khr ? khr[q] : zp) : 0;
            if (chr) chr[q] = k * d;
            cell[q] = d - k * d;
        }
        if (!zo || !cx->lstm) continue;
        const T *kcr = zc ? zc + row * H : 0;
        T *dcr = cx->dc + b * H, *ccr = cx->CC + b * H;
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            T k = kcr ? kcr[j] : zp;
            ccr[j] = k * dcr[j];
            dcr[j] -= k * dcr[j];
        }
    }
}

/* dr[:, j0:j1] = dh~ W_hr[:, j0:j1], into DR. */
static void FN(bwd_project)(const FN(bwd_call) *cx, const nl_step *st) {
    const int64_t H = cx->H, R = cx->R, j0 = cx->j0, j1 = cx->j1;
    if (j1 <= j0) return;
    if (st->wide && cx->ppr.n)
        FN(panel_product)(st->n, cx->dHt + st->off * R, R, &cx->ppr, cx->DR + j0, H, 0);
    else
        FN(axpy_rows)(st->n, cx->dHt + st->off * R, R, R, cx->w_hr + j0, H, j1 - j0, cx->DR + j0,
                      H, 0);
}

/* The LSTM cell backward on the thread's units: dG of every gate, dL/dc_t to dL/dc_{t-1}. The
 * cell's dL/dh~ (dsr) is dr with a projection. */
static void FN(bwd_lstm)(const FN(bwd_call) *cx, const nl_step *st) {
    const int64_t H = cx->H, GW = cx->GW, j0 = cx->j0, j1 = cx->j1, off = st->off;
    for (int64_t b = 0; b < st->n; b++) {
        const T *doutr = FN(dout_row)(cx, off + b), *dsr = cx->P ? cx->DR + b * H : cx->dh + b * H;
        const T *gr = cx->G + (off + b) * GW, *cr = cx->C + (off + b) * H;
        const T *cpr = FN(c_prev_row)(cx, st, b);
        T *dcr = cx->dc + b * H, *dgr = cx->dG + (off + b) * GW;
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            T d = dsr[j] + (doutr ? doutr[j] : 0);
            T tc = FN(tanh)(cr[j]);
            T dct = dcr[j] + FN(lstm_bwd_out)(gr, H, j, d, tc, dgr);
            dcr[j] = FN(lstm_bwd_cell)(gr, H, j, dct, cpr[j], dgr);
        }
    }
}

/* The layer-norm LSTM's output gate and dCN, the gradient of the cell norm's output; the rest
 * waits for the norm's row means (bwd_norm_cell). */
static void FN(bwd_lstm_out)(const FN(bwd_call) *cx, const nl_step *st) {
    const int64_t H = cx->H, GW = cx->GW, N = cx->N, j0 = cx->j0, j1 = cx->j1, off = st->off;
    const T *w = cx->ln_cw, *bias = cx->ln_cb;
    for (int64_t b = 0; b < st->n; b++) {
        const T *doutr = FN(dout_row)(cx, off + b), *dsr = cx->P ? cx->DR + b * H : cx->dh + b * H;
        const T *gr = cx->G + (off + b) * GW, *cr = cx->C + (off + b) * H;
        const T m = cx->stats[2 * N + off + b], r = cx->stats[3 * N + off + b];
        T *dcnr = cx->dCN + b * H, *dgr = cx->dG + (off + b) * GW;
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            T d = dsr[j] + (doutr ? doutr[j] : 0);
            T tc = FN(tanh)(FN(ln_affine)(cr[j], m, r, w[j], bias[j]));
            dcnr[j] = FN(lstm_bwd_out)(gr, H, j, d, tc, dgr);
        }
    }
}

/* A layer norm's gain and bias gradients over a step's n rows, on units [k0, k1): dw += sum_b
 * dy x^ and db += sum_b dy, with x^ = (x - mean[b]) rstd[b]; dy and x with row strides ldy, ldx.
 * A block of columns sums the rows in registers and adds to the float64 totals once a step. */
static void FN(ln_param_grads)(int64_t n, const T *dy, int64_t ldy, const T *x, int64_t ldx,
                               const T *mean, const T *rstd, int64_t k0, int64_t k1, double *dw,
                               double *db) {
    for (int64_t k = k0; k < k1; k += NL_CW) {
        const int64_t kw = k1 - k < NL_CW ? k1 - k : NL_CW;
        T sw[NL_CW], sb[NL_CW];
        for (int64_t j = 0; j < NL_CW; j++) sw[j] = sb[j] = 0;
        for (int64_t b = 0; b < n; b++) {
            const T *dyr = dy + b * ldy + k, *xr = x + b * ldx + k, m = mean[b], r = rstd[b];
#pragma omp simd
            for (int64_t j = 0; j < kw; j++) {
                sw[j] += dyr[j] * ((xr[j] - m) * r);
                sb[j] += dyr[j];
            }
        }
        for (int64_t j = 0; j < kw; j++) {
            dw[k + j] += (double)sw[j];
            db[k + j] += (double)sb[j];
        }
    }
}

/* The layer-norm LSTM's cell: dL/dc_t through the norm (which reads every unit of dCN's row),
 * then the input, forget and cell gates; the cell norm's gain and bias gradients on the
 * thread's units. */
static void FN(bwd_norm_cell)(const FN(bwd_call) *cx, const nl_step *st) {
    const int64_t H = cx->H, GW = cx->GW, N = cx->N, j0 = cx->j0, j1 = cx->j1, off = st->off;
    const T *w = cx->ln_cw;
    double *dw = cx->lng ? cx->lng + 2 * GW : 0, *db = dw ? dw + H : 0;
    for (int64_t b = 0; b < st->n; b++) {
        const T *gr = cx->G + (off + b) * GW, *cr = cx->C + (off + b) * H;
        const T *cpr = FN(c_prev_row)(cx, st, b), *dcnr = cx->dCN + b * H;
        const T m = cx->stats[2 * N + off + b], r = cx->stats[3 * N + off + b];
        T *dcr = cx->dc + b * H, *dgr = cx->dG + (off + b) * GW;
        T ma, max;
        FN(ln_grad_means)(dcnr, w, cr, H, m, r, &ma, &max);
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            T dct = dcr[j] + FN(ln_input_grad)(dcnr[j], w[j], cr[j], m, r, ma, max);
            dcr[j] = FN(lstm_bwd_cell)(gr, H, j, dct, cpr[j], dgr);
        }
    }
    if (dw)
        FN(ln_param_grads)(st->n, cx->dCN, H, cx->C + off * H, H, cx->stats + 2 * N + off,
                           cx->stats + 3 * N + off, j0, j1, dw, db);
}

/* The GRU cell backward on the thread's units; dh keeps the share past the gates, d z. */
static void FN(bwd_gru)(const FN(bwd_call) *cx, const nl_step *st) {
    const int64_t H = cx->H, GW = cx->GW, j0 = cx->j0, j1 = cx->j1, off = st->off;
    for (int64_t b = 0; b < st->n; b++) {
        const T *doutr = FN(dout_row)(cx, off + b), *gr = cx->G + (off + b) * GW;
        const T *ghr = cx->GH + (off + b) * GW;
        const T *hpr = b < st->np ? cx->out + (st->offp + b) * H : cx->h0 + b * H;
        T *dhr = cx->dh + b * H, *dgr = cx->dG + (off + b) * GW, *dghr = cx->dGH + (off + b) * GW;
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            T d = dhr[j] + (doutr ? doutr[j] : 0);
            dhr[j] = FN(gru_bwd)(gr, ghr, H, j, d, hpr[j], dgr, dghr);
        }
    }
}

static void FN(bwd_rnn)(const FN(bwd_call) *cx, const nl_step *st) {
    const int64_t H = cx->H, relu = cx->relu, j0 = cx->j0, j1 = cx->j1, off = st->off;
    for (int64_t b = 0; b < st->n; b++) {
        const T *doutr = FN(dout_row)(cx, off + b), *hr = cx->out + (off + b) * H;
        const T *dhr = cx->dh + b * H;
        T *dgr = cx->dG + (off + b) * H;
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) {
            T d = dhr[j] + (doutr ? doutr[j] : 0);
            dgr[j] = FN(rnn_bwd)(d, hr[j], relu);
        }
    }
}

/* Zoneout: what went past the cell joins dL/dc_{t-1} and dL/dh_{t-1} (GRU's d z too; the product
 * adds to it in bwd_product). */
static void FN(bwd_zoneout)(const FN(bwd_call) *cx, const nl_step *st) {
    const int64_t H = cx->H, R = cx->R, j0 = cx->j0, j1 = cx->j1, q0 = cx->q0, q1 = cx->q1;
    const int64_t gru = cx->gru;
    for (int64_t b = 0; b < st->n; b++) {
        const T *chr = cx->CH + b * R;
        T *dhr = cx->dh + b * R;
#pragma omp simd
        for (int64_t q = q0; q < q1; q++) dhr[q] = (gru ? dhr[q] : 0) + chr[q];
        if (!cx->lstm) continue;
        const T *ccr = cx->CC + b * H;
        T *dcr = cx->dc + b * H;
#pragma omp simd
        for (int64_t j = j0; j < j1; j++) dcr[j] += ccr[j];
    }
}

/* dZ: the gradient of the product through its norm (which reads every unit of the row); the
 * norm's gain and bias gradients on the thread's units of every gate. */
static void FN(bwd_norm_product)(const FN(bwd_call) *cx, const nl_step *st) {
    const int64_t H = cx->H, GW = cx->GW, N = cx->N, j0 = cx->j0, j1 = cx->j1;
    const T *w = cx->ln_hw, *dy = cx->gru ? cx->dGH : cx->dG;
    double *dw = cx->lng, *db = dw ? dw + GW : 0;
    for (int64_t b = 0; b < st->n; b++) {
        const int64_t row = st->off + b;
        const T *dyr = dy + row * GW, *zr = cx->Zr + row * GW;
        const T m = cx->stats[row], r = cx->stats[N + row];
        T *dzr = cx->dZ + row * GW;
        T ma, max;
        FN(ln_grad_means)(dyr, w, zr, GW, m, r, &ma, &max);
        for (int64_t g = 0; g < cx->gates; g++) {
#pragma omp simd
            for (int64_t k = g * H + j0; k < g * H + j1; k++)
                dzr[k] = FN(ln_input_grad)(dyr[k], w[k], zr[k], m, r, ma, max);
        }
    }
    if (!dw) return;
    for (int64_t g = 0; g < cx->gates; g++)
        FN(ln_param_grads)(st->n, dy + st->off * GW, GW, cx->Zr + st->off * GW, GW,
                           cx->stats + st->off, cx->stats + N + st->off, g * H + j0, g * H + j1,
                           dw, db);
}

/* dh[:n, q0:q1] (+)= D_t W_hh[:, q0:q1]: GRU adds to its carried d z, zoneout to what it
 * carries. With recurrent dropout the product goes to S first and enters dh times the mask. */
static void FN(bwd_product)(const FN(bwd_call) *cx, const nl_step *st) {
    const int64_t R = cx->R, GW = cx->GW, q0 = cx->q0, q1 = cx->q1, n = st->n, off = st->off;
    if (q1 <= q0) return;
    T *target = cx->rmask ? cx->S : cx->dh;
    const int carried = cx->gru || cx->zo, accumulate = carried && !cx->rmask;
    if (st->wide && cx->pp.n) {
        FN(panel_product)(n, cx->D + off * GW, GW, &cx->pp, target + q0, R, accumulate);
    } else {
        FN(axpy_rows)(n, cx->D + off * GW, GW, GW, cx->w + q0, R, q1 - q0, target + q0, R,
                      accumulate);
    }
    if (!cx->rmask) return;
    for (int64_t b = 0; b < n; b++) {
        const T *sr = cx->S + b * R, *mr = cx->rmask + b * R;
        T *dhr = cx->dh + b * R;
#pragma omp simd
        for (int64_t q = q0; q < q1; q++) dhr[q] = (carried ? dhr[q] : 0) + sr[q] * mr[q];
    }
}

/* One backward step, the forward's phases in reverse order, with a barrier before each phase
 * that reads units other threads wrote. */
/* The step barrier (flag_barrier, as in forward). */
static inline void FN(bwd_sync)(FN(bwd_call) *cx) {
    if (!cx->rows && cx->nth > 1) flag_barrier(cx->flags, cx->nth, cx->tid, &cx->passed);
}

static void FN(bwd_step)(FN(bwd_call) *cx, int64_t s) {
    const nl_walk *wk = &cx->walk;
    nl_step st = step_at(wk, s, wk->reverse ? s : wk->T_ - 1 - s);
    if (cx->rows) {
        own_rows(&st, cx->r0, cx->r1);
        if (st.n == 0) return;
    }
    if (cx->zo || cx->P) FN(bwd_split)(cx, &st);
    if (cx->P) {
        FN(bwd_sync)(cx);
        FN(bwd_project)(cx, &st);
    }
    if (cx->lstm && cx->ln)
        FN(bwd_lstm_out)(cx, &st);
    else if (cx->lstm)
        FN(bwd_lstm)(cx, &st);
    else if (cx->gru)
        FN(bwd_gru)(cx, &st);
    else
        FN(bwd_rnn)(cx, &st);
    if (cx->lstm && cx->ln) {
        FN(bwd_sync)(cx);
        FN(bwd_norm_cell)(cx, &st);
    }
    if (cx->zo) FN(bwd_zoneout)(cx, &st);
    if (cx->ln) {
        FN(bwd_sync)(cx);
        FN(bwd_norm_product)(cx, &st);
    }
    /* The product reads every unit of D_t's row. */
    FN(bwd_sync)(cx);
    FN(bwd_product)(cx, &st);
}

/* The thread's rows [r0, r1) of B, and every row-indexed pointer of the call moved to r0 (the
 * steps' rows move in bwd_step). */
static void FN(bwd_own_rows)(FN(bwd_call) *cx) {
    const int64_t R = cx->R, H = cx->H;
    rows_of_thread(cx->B, cx->nth, cx->tid, &cx->r0, &cx->r1);
    cx->j0 = 0; cx->j1 = H; cx->q0 = 0; cx->q1 = R;
    if (cx->lng) cx->lng = cx->lng_rows + cx->tid * cx->lng_n;
    const int64_t r = cx->r0;
    cx->h0 += r * R; cx->dh += r * R;
    if (cx->c0) cx->c0 += r * H;
    if (cx->dc) cx->dc += r * H;
    if (cx->DR) cx->DR += r * H;
    if (cx->dCN) cx->dCN += r * H;
    if (cx->CH) cx->CH += r * R;
    if (cx->CC) cx->CC += r * H;
}

static void FN(bwd_thread)(const FN(bwd_call) *call) {
    FN(bwd_call) cx = *call;
    split_units(cx.H, &cx.j0, &cx.j1);
    split_units(cx.R, &cx.q0, &cx.q1);
    cx.passed = 0;
    this_thread(&cx.nth, &cx.tid);
    if (cx.rows) FN(bwd_own_rows)(&cx);
    /* Panels where a step can be wide; where memory runs out, the own loops instead. */
    cx.pp = cx.ppr = (FN(panels)){0};
    if (FN(worth_panels)(&cx.walk, cx.B)) {
        FN(panels_make)(&cx.pp, cx.w + cx.q0, 1, cx.q1 - cx.q0, cx.GW, 0, 1, cx.R, 0);
        if (cx.P) FN(panels_make)(&cx.ppr, cx.w_hr + cx.j0, 1, cx.j1 - cx.j0, cx.R, 0, 1, cx.H, 0);
    }
    for (int64_t s = 0; s < cx.walk.T_; s++) FN(bwd_step)(&cx, s);
    FN(panels_free)(&cx.pp);
    FN(panels_free)(&cx.ppr);
}

/* One layer and direction backward; see engines/native/loop.py's `backward` for the contract.
 * dh (B, R), dc (B, H): d h_n / d c_n in, dh0 / dc0 out. dout (N, R) or NULL. dG (N, GW) out;
 * dGH (N, 3H) out for GRU. G the activations (nl_forward's A; unread for RNN), GH, out, C:
 * what nl_forward saved; v: its variants (nl_variants). */
int64_t FN(nl_backward)(int64_t mode, int64_t reverse, int64_t T_, const int64_t *bs, int64_t N,
                        int64_t B, int64_t H, const T *G, const T *GH, const T *out, const T *C,
                        const T *h0, const T *c0, const T *w, const T *dout, T *dh, T *dc,
                        T *dG, T *dGH, int64_t *offsets, int64_t nthreads,
                        int64_t gemm_min_rows, int64_t split, const nl_variants *v) {
    if (mode < NL_LSTM || mode > NL_RNN_RELU) return NL_BAD_MODE;
    if (split < NL_SPLIT_AUTO || split > NL_SPLIT_ROWS) return NL_BAD_SIZES;
    if (T_ < 0 || N < 0 || B < 1 || H < 1) return NL_BAD_SIZES;
    if (!G || !out || !h0 || !w || !dh || !dG || !offsets) return NL_MISSING_TENSOR;
    if (mode == NL_LSTM && (!C || !c0 || !dc)) return NL_MISSING_TENSOR;
    if (mode == NL_GRU && (!GH || !dGH)) return NL_MISSING_TENSOR;
    FN(bwd_call) cx = {
        .N = N, .B = B, .H = H, .gates = gates_of(mode), .GW = gates_of(mode) * H,
        .lstm = mode == NL_LSTM, .gru = mode == NL_GRU, .relu = mode == NL_RNN_RELU,
        .G = G, .GH = GH, .out = out, .C = C, .h0 = h0, .c0 = c0, .w = w, .dout = dout,
        .dh = dh, .dc = dc, .dG = dG, .dGH = dGH,
    };
    int64_t rc = FN(bwd_variants)(&cx, v);
    if (rc == NL_OK) rc = check_batch_sizes(T_, bs, N, B, offsets);
    if (rc != NL_OK) return rc;
    cx.Cprev = cx.zo ? cx.CZ : C;
    cx.D = cx.ln ? cx.dZ : cx.gru ? dGH : dG;
    cx.walk = (nl_walk){T_, reverse, bs, offsets, gemm_min_rows};
    nthreads = sane_threads(nthreads);
    /* Rows as in the forward (rows_pay); then each thread sums the layer norms' parameter
     * gradients over its own rows, and they are added up after the walk. */
    cx.rows = nthreads > 1 && B > 1 &&
              FN(rows_pay)(B, cx.GW, cx.R, cx.P * H, &cx.walk, nthreads, split, cx.rmask != 0);
    if (cx.rows && nthreads > B) nthreads = B;
    cx.lng_n = 2 * cx.GW + (cx.lstm ? 2 * H : 0);
    cx.lng_rows = cx.rows && cx.lng ? calloc((size_t)(nthreads * cx.lng_n), sizeof(double)) : 0;
    cx.flags = flags_new(nthreads);
    if (!cx.flags || (cx.rows && cx.lng && !cx.lng_rows)) {
        free(cx.flags);
        free(cx.lng_rows);
        return NL_NO_MEMORY;
    }
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    FN(bwd_thread)(&cx);
    for (int64_t k = 0; cx.lng_rows && k < nthreads; k++)
        for (int64_t i = 0; i < cx.lng_n; i++) cx.lng[i] += cx.lng_rows[k * cx.lng_n + i];
    free(cx.lng_rows);
    free(cx.flags);
    return NL_OK;
}

#undef T
#undef FN
#undef CAT
#undef CAT_
#undef NL_CW
#undef NL_VL
#undef NL_PIN
#endif
