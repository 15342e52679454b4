/* The whole time loop of one layer and direction in one native call (issue 9): per step the
 * recurrent product and the pointwise step of cpu_kernels.c (same formulas, same saved tensors
 * as fused.py's FusedLayer), forward and backward, with no return to Python between steps.
 *
 * Threads split the hidden units: thread k owns units [j0, j1) of every gate, computes those
 * columns of the recurrent product and then the pointwise step of those units, so a step needs
 * one barrier (the next product reads every unit of h_{t-1}). h_{t-1} is read from the rows of
 * `out` written by the previous step (or h0), which are never written again, so no thread can
 * overwrite what another still reads. In backward the same split holds with dh's units.
 * LSTM's projection, layer norm, recurrent dropout and zoneout (nl_variants) add a barrier where
 * a step reads every unit of a row (engines/README.md).
 *
 * The product runs through the BLAS that torch ships (MKL's Fortran sgemm_/dgemm_, resolved by
 * the Python side and handed over with nl_set_blas) when a step has at least `blas_min_rows`
 * rows, else through the register-blocked loops below, which at B=1 are a GEMV over W_hh that
 * stays in the cores' L2 caches.
 *
 * Built without -ffast-math (NaN and inf propagate as through torch's ops); the exponential is
 * cpu_kernels.c's own, so the pointwise loops vectorise. Every matrix is contiguous; the Python
 * side checks shapes, dtypes and strides, and the loops below check the batch sizes again.
 *
 * The type-generic part is this file included into itself twice, once per element type. */
#ifndef NL_T

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
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
};

/* The per-step variants of one call (rnnkit.variants); NULL pointers are variants that are off,
 * and a NULL nl_variants is a plain layer. Element type: the call's. All rows contiguous.
 * - Layer norm of the recurrent product (LSTM, GRU): gain ln_hw and bias ln_hb (GW); for LSTM
 *   also of the cell, ln_cw and ln_cb (H). Forward saves Zr (N, GW), the product before its norm
 *   (may be NULL without saving), and stats (2 or 4, N): mean and 1/std of the product's norm,
 *   then (LSTM) of the cell's. Backward reads them and writes dZ (N, GW), the gradient of the
 *   product, and (LSTM) dCN (N, H), the gradient of the cell norm's output.
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
} nl_variants;

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *, const int *,
                         const float *, float *, const int *);
typedef void (*dgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const double *, const double *, const int *, const double *,
                         const int *, const double *, double *, const int *);
typedef int (*set_threads_fn)(int);
static sgemm_fn blas_f32;
static dgemm_fn blas_f64;
static set_threads_fn blas_set_threads_local;

/* The BLAS (column-major, 32-bit integers) or NULL to use the loops below only; and MKL's
 * MKL_Set_Num_Threads_Local (or NULL), to keep each call single-threaded: the threads here
 * already split the work, and MKL's own threads would fight them for the cores. */
void nl_set_blas(void *sgemm, void *dgemm, void *set_threads_local) {
    blas_f32 = (sgemm_fn)sgemm;
    blas_f64 = (dgemm_fn)dgemm;
    blas_set_threads_local = (set_threads_fn)set_threads_local;
}

/* MKL's packed GEMM in float32 (Fortran interface; NULL where torch's MKL lacks it): the forward
 * packs each thread's block of W_hh once per call instead of sgemm_ packing it every step
 * (measured 0.8x of the loop's time at B=16 on one thread). */
typedef size_t (*pack_size_fn)(const char *, const int *, const int *, const int *);
typedef void (*pack_fn)(const char *, const char *, const int *, const int *, const int *,
                        const float *, const float *, const int *, float *);
typedef void (*compute_fn)(const char *, const char *, const int *, const int *, const int *,
                           const float *, const int *, const float *, const int *, const float *,
                           float *, const int *);
static pack_size_fn pack_size_f32;
static pack_fn pack_f32;
static compute_fn compute_f32;

void nl_set_packed_blas(void *size, void *pack, void *compute) {
    int all = size && pack && compute;
    pack_size_f32 = all ? (pack_size_fn)size : 0;
    pack_f32 = all ? (pack_fn)pack : 0;
    compute_f32 = all ? (compute_fn)compute : 0;
}

/* Per thread, around the loop: MKL single-threaded, then back to what it was. */
static inline int blas_threads_begin(void) {
    return blas_set_threads_local ? blas_set_threads_local(1) : 0;
}

static inline void blas_threads_end(int previous) {
    if (blas_set_threads_local) blas_set_threads_local(previous);
}

int64_t nl_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

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

static inline int fits_int(int64_t v) { return v >= 0 && v <= 2147483647; }

static void split_units(int64_t H, int64_t *j0, int64_t *j1) {
    int64_t nth = 1, tid = 0;
#ifdef _OPENMP
    nth = omp_get_num_threads();
    tid = omp_get_thread_num();
#endif
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

#define NL_T float
#define NL_SUF f32
#define NL_EXP exp_nonpos_f32
#define NL_BLAS blas_f32
#define NL_SQRT sqrtf
#define NL_PACKED 1
#include __FILE__
#undef NL_T
#undef NL_SUF
#undef NL_EXP
#undef NL_BLAS
#undef NL_SQRT
#undef NL_PACKED

#define NL_T double
#define NL_SUF f64
#define NL_EXP exp_nonpos_f64
#define NL_BLAS blas_f64
#define NL_SQRT sqrt
#define NL_PACKED 0
#include __FILE__

#else /* the type-generic part: NL_T the element type, NL_SUF its suffix */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, NL_SUF)
#define T NL_T

static inline T FN(sigmoid)(T x) {
    T e = NL_EXP(-(x < 0 ? -x : x));
    T s = (T)1 / ((T)1 + e);
    return x >= 0 ? s : e * s;
}

static inline T FN(tanh)(T x) {
    T e = NL_EXP((T)-2 * (x < 0 ? -x : x));
    T t = ((T)1 - e) / ((T)1 + e);
    return x >= 0 ? t : -t;
}

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

/* op(src) (m, k), column-major with leading dimension ld, packed as the A of MKL's packed GEMM
 * for products with up to n columns; NULL where there is no packed GEMM (float64, or torch's
 * MKL lacks it) or no memory. The caller frees it. */
static void *FN(pack_a)(const char *trans, int64_t m, int64_t n, int64_t k, const T *src,
                        int64_t ld) {
#if NL_PACKED
    if (!pack_size_f32 || !fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(m * k))
        return 0;
    const int mi = (int)m, ni = (int)n, ki = (int)k, ldi = (int)ld;
    const float one = 1;
    size_t size = pack_size_f32("A", &mi, &ni, &ki);
    void *buf = size ? malloc(size) : 0;
    if (buf) pack_f32("A", trans, &mi, &ni, &ki, &one, src, &ldi, (float *)buf);
    return buf;
#else
    (void)trans; (void)m; (void)n; (void)k; (void)src; (void)ld;
    return 0;
#endif
}

/* This thread's blocks of w (G*H, K) packed (pack_a) for the forward's products with up to B
 * rows: the count packed, 0 (and nothing allocated) where any block could not be. */
static int64_t FN(pack_blocks)(const T *w, int64_t H, int64_t K, int64_t gates, int64_t j0,
                               int64_t j1, int64_t B, void **packs) {
    int64_t rows, nblocks = FN(blocks)(H, gates, j0, j1, &rows);
    if (j1 <= j0) return 0;
    for (int64_t g = 0; g < nblocks; g++) {
        packs[g] = FN(pack_a)("T", rows, B, K, w + (g * H + j0) * K, K);
        if (!packs[g]) {
            while (g-- > 0) free(packs[g]);
            return 0;
        }
    }
    return nblocks;
}

/* Z[b, g*H + j] = x[b] . w[g*H + j] for b < nb, j in [j0, j1), every gate g: x (nb, K), w
 * (G*H, K). packs: what pack_blocks made (nb at most its B), or NULL. */
static void FN(gates_product)(int64_t nb, const T *x, int64_t H, int64_t K, int64_t gates,
                              const T *w, int64_t j0, int64_t j1, T *Z, int64_t use_blas,
                              void *const *packs) {
    int64_t GW = gates * H, rows;
#if !NL_PACKED
    (void)packs;
#endif
    if (nb <= 0 || j1 <= j0) return;
    const int64_t nblocks = FN(blocks)(H, gates, j0, j1, &rows);
    for (int64_t g = 0; g < nblocks; g++) {
        const T *wg = w + (g * H + j0) * K;
        T *zg = Z + g * H + j0;
        if (use_blas) {
            /* Column-major: Z^T block (m, nb) = w block^T... i.e. op(A) = w rows as (m, K). */
            const int m = (int)rows, n = (int)nb, k = (int)K, lda = (int)K, ldb = (int)K;
            const int ldc = (int)GW;
            const T one = 1, zero = 0;
#if NL_PACKED
            if (packs) {
                compute_f32("P", "N", &m, &n, &k, (const float *)packs[g], &lda, x, &ldb, &zero,
                            zg, &ldc);
                continue;
            }
#endif
            NL_BLAS("T", "N", &m, &n, &k, &one, wg, &lda, x, &ldb, &zero, zg, &ldc);
        } else {
            FN(dot_rows)(nb, x, K, wg, rows, zg, GW);
        }
    }
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

/* y[b, :m] = x[b] . w[:m] for b < n: x (n, K), w (m, K), y with row stride ldy (the forward's
 * projection, h~ = r W_hr^T, on a block of W_hr's rows). */
static void FN(rows_times_wt)(int64_t n, const T *x, int64_t K, const T *w, int64_t m, T *y,
                              int64_t ldy, int use_blas) {
    if (n <= 0 || m <= 0) return;
    if (use_blas) {
        const int mi = (int)m, ni = (int)n, ki = (int)K, ld = (int)ldy;
        const T one = 1, zero = 0;
        NL_BLAS("T", "N", &mi, &ni, &ki, &one, w, &ki, x, &ki, &zero, y, &ld);
    } else {
        FN(dot_rows)(n, x, K, w, m, y, ldy);
    }
}

/* y[b, :m] = sum_k d[b, k] w[k, :m] for b < n: d (n, K) with row stride ldd, w with row stride
 * ldw (the backward's dr = dh~ W_hr on a block of W_hr's columns). */
static void FN(rows_times_w)(int64_t n, const T *d, int64_t ldd, int64_t K, const T *w,
                             int64_t ldw, int64_t m, T *y, int64_t ldy, int use_blas) {
    if (n <= 0 || m <= 0) return;
    if (use_blas) {
        const int mi = (int)m, ni = (int)n, ki = (int)K, lda = (int)ldw, ldb = (int)ldd;
        const int ldc = (int)ldy;
        const T one = 1, zero = 0;
        NL_BLAS("N", "N", &mi, &ni, &ki, &one, w, &lda, d, &ldb, &zero, y, &ldc);
    } else {
        FN(axpy_rows)(n, d, ldd, K, w, ldw, m, y, ldy, 0);
    }
}

/* One layer and direction forward; see native_loop.py's `forward` for the contract.
 * G (N, GW): x W_ih^T + biases, read only. A (N, GW): the gate activations (as FusedLayer saves
 * them; may be G itself), or NULL to keep only each step's, in the second half of Z.
 * h (B, R), c (B, H): the state, h0/c0 in, h_n/c_n out; R = H, or P with a projection (then
 * w is (GW, P) and h0, out are P wide). C (N, H) the saved c_t or NULL; GH (N, 3H) the saved
 * Z_t + b_hh of GRU or NULL (then Z holds it); Z (B, GW) scratch, (2, B, GW) when A is NULL.
 * v: the variants or NULL (see nl_variants). Threads own hidden units [j0, j1) and units
 * [q0, q1) of h (the same without a projection). A layer norm needs every unit of a row, so it
 * adds a barrier before it (and the cell's another): each thread then computes the row's
 * statistics itself; a projection needs every unit of r_t: one more. */
int64_t FN(nl_forward)(int64_t mode, int64_t reverse, int64_t T_, const int64_t *bs, int64_t N,
                       int64_t B, int64_t H, const T *G, T *A, const T *w, const T *bhh,
                       const T *h0, T *out, T *h, T *c, T *C, T *GH, T *Z, int64_t *offsets,
                       int64_t nthreads, int64_t blas_min_rows, const nl_variants *v) {
    if (mode < NL_LSTM || mode > NL_RNN_RELU) return NL_BAD_MODE;
    if (T_ < 0 || N < 0 || B < 1 || H < 1) return NL_BAD_SIZES;
    if (!G || !w || !h0 || !out || !h || !Z || !offsets || (mode == NL_LSTM && !c))
        return NL_MISSING_TENSOR;
    const T *ln_hw = v ? (const T *)v->ln_hw : 0, *ln_hb = v ? (const T *)v->ln_hb : 0;
    const T *ln_cw = v ? (const T *)v->ln_cw : 0, *ln_cb = v ? (const T *)v->ln_cb : 0;
    const T *rmask = v ? (const T *)v->rmask : 0;
    T *Zr = v ? (T *)v->Zr : 0, *stats = v ? (T *)v->stats : 0, *HM = v ? (T *)v->scratch : 0;
    T *Y = v ? (T *)v->ln_scratch : 0;
    const int ln = ln_hw != 0, lstm = mode == NL_LSTM;
    if (ln && (!ln_hb || mode > NL_GRU || (lstm && (!ln_cw || !ln_cb)) || (!Zr != !stats)))
        return NL_BAD_VARIANTS;
    if (ln && !Zr && !Y) return NL_BAD_VARIANTS;
    /* Projection (LSTM): h~ = r W_hr^T with r = o tanh(c~ or its norm), saved in Rs (N, H) or
     * kept per step in r_scratch (B, H). */
    const int64_t P = v ? v->proj : 0, R = P ? P : H;
    const T *w_hr = P ? (const T *)v->w_hr : 0;
    T *Rs = P ? (T *)v->Rs : 0, *RS = P ? (T *)v->r_scratch : 0;
    if (P < 0 || (P && (!lstm || !w_hr || (!Rs && !RS)))) return NL_BAD_VARIANTS;
    /* Zoneout: the previous h and c of the step's rows (PH (B, R), PC (B, H)) and, when C is
     * not saved, the cell's own c~ (CS (B, H)), in zo_scratch. */
    const int zo = v && v->zoneout;
    const T *zh = zo ? (const T *)v->zh : 0, *zc = zo ? (const T *)v->zc : 0;
    const T zp = zo ? (T)v->zoneout_p : 0;
    T *CZ = zo ? (T *)v->CZ : 0, *PH = zo ? (T *)v->zo_scratch : 0;
    T *PC = PH ? PH + B * R : 0, *CS = PH ? PC + B * H : 0;
    if (zo && (!PH || mode > NL_GRU || (C && lstm && !CZ))) return NL_BAD_VARIANTS;
    if (rmask && !HM) return NL_BAD_VARIANTS;
    const T eps = v ? (T)v->eps : 0;
    int64_t rc = check_batch_sizes(T_, bs, N, B, offsets);
    if (rc != NL_OK) return rc;
    const int64_t gates = lstm ? 4 : mode == NL_GRU ? 3 : 1, GW = gates * H;
    const int64_t relu = mode == NL_RNN_RELU;
    const int blas_ok = NL_BLAS != 0 && fits_int(GW) && fits_int(B) && fits_int(N) &&
                        fits_int(R);
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int64_t j0, j1, q0, q1;
        split_units(H, &j0, &j1);
        split_units(R, &q0, &q1);
        const int blas_threads = blas_ok ? blas_threads_begin() : 0;
        void *packs[4] = {0, 0, 0, 0};
        const int64_t npacks = blas_ok && B >= blas_min_rows
                                   ? FN(pack_blocks)(w, H, R, gates, j0, j1, B, packs) : 0;
        void *const *pk = npacks ? packs : 0;
        if (rmask) {
            /* Both buffers: a row that starts late (reverse, packed) reads h0 * mask. */
            for (int64_t b = 0; b < B; b++)
                for (int64_t q = q0; q < q1; q++)
                    HM[b * R + q] = HM[(B + b) * R + q] = h0[b * R + q] * rmask[b * R + q];
            barrier();
        }
        for (int64_t s = 0; s < T_; s++) {
            const int64_t t = reverse ? T_ - 1 - s : s, tp = reverse ? t + 1 : t - 1;
            const int64_t n = bs[t], off = offsets[t];
            /* Rows [0, np) continue from the previous step's outputs, the rest start at h0. */
            int64_t np = tp >= 0 && tp < T_ ? bs[tp] : 0;
            if (np > n) np = n;
            const int64_t use_blas = blas_ok && n >= blas_min_rows;
            /* The product before its norm is saved where there is one. */
            T *Zt = ln && Zr ? Zr + off * GW : Z;
            if (rmask) {
                FN(gates_product)(n, HM + (s & 1) * B * R, H, R, gates, w, j0, j1, Zt, use_blas,
                                  pk);
            } else {
                if (np > 0) FN(gates_product)(np, out + offsets[tp] * R, H, R, gates, w, j0, j1,
                                              Zt, use_blas, pk);
                FN(gates_product)(n - np, h0 + np * R, H, R, gates, w, j0, j1, Zt + np * GW,
                                  use_blas, pk);
            }
            /* The recurrent side that the steps below read: the product, or its norm in Y. */
            T *Yt = Zt;
            if (ln) {
                barrier();
                Yt = Zr ? Z : Y;
                for (int64_t b = 0; b < n; b++) {
                    const T *zr = Zt + b * GW;
                    T *yr = Yt + b * GW, mh, rh;
                    FN(row_stats)(zr, GW, eps, &mh, &rh);
                    if (stats && j0 == 0) {
                        stats[off + b] = mh;
                        stats[N + off + b] = rh;
                    }
                    for (int64_t g = 0; g < gates; g++) {
#pragma omp simd
                        for (int64_t k = g * H + j0; k < g * H + j1; k++)
                            yr[k] = (zr[k] - mh) * rh * ln_hw[k] + ln_hb[k];
                    }
                }
            }
            /* The rows of c~: saved, or (zoneout) apart from the state, or the state itself. */
            T *Ct = C ? C + off * H : zo ? CS : c;
            /* The rows of r_t (projection). */
            T *Rt = P ? (Rs ? Rs + off * H : RS) : 0;
            if (zo) {
                for (int64_t b = 0; b < n; b++) {
                    memcpy(PH + b * R + q0, h + b * R + q0, (size_t)(q1 - q0) * sizeof(T));
                    if (lstm)
                        memcpy(PC + b * H + j0, c + b * H + j0, (size_t)(j1 - j0) * sizeof(T));
                }
            }
            for (int64_t b = 0; b < n; b++) {
                const T *gr = G + (off + b) * GW;
                T *ar = A ? A + (off + b) * GW : Z + (B + b) * GW;
                T *zr = Yt + b * GW, *hr = h + b * R, *outr = out + (off + b) * R;
                if (lstm) {
                    T *cr = c + b * H, *csr = Ct + b * H;
                    /* The cell's h~, or with a projection its r. */
                    T *h1 = P ? Rt + b * H : outr, *h2 = P ? Rt + b * H : hr;
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T i = FN(sigmoid)(gr[j] + zr[j]);
                        T f = FN(sigmoid)(gr[H + j] + zr[H + j]);
                        T gg = FN(tanh)(gr[2 * H + j] + zr[2 * H + j]);
                        T o = FN(sigmoid)(gr[3 * H + j] + zr[3 * H + j]);
                        ar[j] = i; ar[H + j] = f; ar[2 * H + j] = gg; ar[3 * H + j] = o;
                        T cn = f * cr[j] + i * gg;
                        cr[j] = cn; csr[j] = cn;
                        /* With the cell's norm, rewritten below once every unit of c_t is. */
                        T hn = o * FN(tanh)(cn);
                        h1[j] = hn; h2[j] = hn;
                    }
                } else if (mode == NL_GRU) {
                    T *ghr = GH ? GH + (off + b) * GW : zr; /* no other thread reads zr */
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T yr = zr[j] + (bhh ? bhh[j] : 0);
                        T yz = zr[H + j] + (bhh ? bhh[H + j] : 0);
                        T yn = zr[2 * H + j] + (bhh ? bhh[2 * H + j] : 0);
                        ghr[j] = yr; ghr[H + j] = yz; ghr[2 * H + j] = yn;
                        T rg = FN(sigmoid)(gr[j] + yr);
                        T z = FN(sigmoid)(gr[H + j] + yz);
                        T nn = FN(tanh)(gr[2 * H + j] + rg * yn);
                        ar[j] = rg; ar[H + j] = z; ar[2 * H + j] = nn;
                        T hn = nn + z * (hr[j] - nn);
                        outr[j] = hn; hr[j] = hn;
                    }
                } else {
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T x = gr[j] + zr[j];
                        T y = relu ? (x < 0 ? (T)0 : x) : FN(tanh)(x); /* NaN stays NaN */
                        outr[j] = y; hr[j] = y;
                    }
                }
            }
            if (ln && lstm) {
                barrier();
                for (int64_t b = 0; b < n; b++) {
                    const T *cr = Ct + b * H;
                    const T *o = (A ? A + (off + b) * GW : Z + (B + b) * GW) + 3 * H;
                    T *h1 = P ? Rt + b * H : out + (off + b) * R, *h2 = P ? h1 : h + b * R;
                    T mc, rs;
                    FN(row_stats)(cr, H, eps, &mc, &rs);
                    if (stats && j0 == 0) {
                        stats[2 * N + off + b] = mc;
                        stats[3 * N + off + b] = rs;
                    }
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T hn = o[j] * FN(tanh)((cr[j] - mc) * rs * ln_cw[j] + ln_cb[j]);
                        h1[j] = hn; h2[j] = hn;
                    }
                }
            }
            if (P) {
                /* h~[:, q0:q1] = r_t W_hr[q0:q1]^T, which reads every unit of r_t. */
                barrier();
                FN(rows_times_wt)(n, Rt, H, w_hr + q0 * H, q1 - q0, out + off * R + q0, R,
                                  blas_ok && n >= blas_min_rows);
                if (!zo) {
                    for (int64_t b = 0; b < n; b++)
                        memcpy(h + b * R + q0, out + (off + b) * R + q0,
                               (size_t)(q1 - q0) * sizeof(T));
                }
            }
            if (zo) {
                /* h_t = k h_{t-1} + (1 - k) h~, and c alike: units of this thread only. */
                for (int64_t b = 0; b < n; b++) {
                    const int64_t row = off + b;
                    const T *khr = zh ? zh + row * R : 0, *kcr = zc ? zc + row * H : 0;
                    const T *phr = PH + b * R, *pcr = PC + b * H, *ctr = Ct + b * H;
                    T *outr = out + row * R, *hr = h + b * R, *cr = c + b * H;
                    T *czr = CZ ? CZ + row * H : cr;
#pragma omp simd
                    for (int64_t q = q0; q < q1; q++) {
                        T k = khr ? khr[q] : zp;
                        T hn = k * phr[q] + ((T)1 - k) * outr[q];
                        outr[q] = hn; hr[q] = hn;
                    }
                    if (lstm) {
#pragma omp simd
                        for (int64_t j = j0; j < j1; j++) {
                            T k = kcr ? kcr[j] : zp;
                            T cn = k * pcr[j] + ((T)1 - k) * ctr[j];
                            cr[j] = cn; czr[j] = cn;
                        }
                    }
                }
            }
            if (rmask) {
                T *next = HM + ((s + 1) & 1) * B * R;
                for (int64_t b = 0; b < n; b++)
                    for (int64_t q = q0; q < q1; q++)
                        next[b * R + q] = out[(off + b) * R + q] * rmask[b * R + q];
            }
            barrier();
        }
        for (int64_t g = 0; g < npacks; g++) free(packs[g]);
        if (blas_ok) blas_threads_end(blas_threads);
    }
    return NL_OK;
}

/* One layer and direction backward; see native_loop.py's `backward` for the contract.
 * dh (B, R), dc (B, H): d h_n / d c_n in, dh0 / dc0 out. dout (N, R) or NULL. dG (N, GW) out;
 * dGH (N, 3H) out for GRU. G the activations (nl_forward's A; unread for RNN), GH, out, C:
 * what nl_forward saved; v: its variants (nl_variants). The layer norms' input gradients need
 * every unit of a row, and so does the projection's dr = dh~ W_hr: a barrier before each. */
int64_t FN(nl_backward)(int64_t mode, int64_t reverse, int64_t T_, const int64_t *bs, int64_t N,
                        int64_t B, int64_t H, const T *G, const T *GH, const T *out, const T *C,
                        const T *h0, const T *c0, const T *w, const T *dout, T *dh, T *dc,
                        T *dG, T *dGH, int64_t *offsets, int64_t nthreads,
                        int64_t blas_min_rows, const nl_variants *v) {
    if (mode < NL_LSTM || mode > NL_RNN_RELU) return NL_BAD_MODE;
    if (T_ < 0 || N < 0 || B < 1 || H < 1) return NL_BAD_SIZES;
    if (!G || !out || !h0 || !w || !dh || !dG || !offsets) return NL_MISSING_TENSOR;
    if (mode == NL_LSTM && (!C || !c0 || !dc)) return NL_MISSING_TENSOR;
    if (mode == NL_GRU && (!GH || !dGH)) return NL_MISSING_TENSOR;
    const T *ln_hw = v ? (const T *)v->ln_hw : 0;
    const T *ln_cw = v ? (const T *)v->ln_cw : 0, *ln_cb = v ? (const T *)v->ln_cb : 0;
    const T *rmask = v ? (const T *)v->rmask : 0;
    const T *Zr = v ? (const T *)v->Zr : 0, *stats = v ? (const T *)v->stats : 0;
    T *dZ = v ? (T *)v->dZ : 0, *dCN = v ? (T *)v->dCN : 0, *S = v ? (T *)v->scratch : 0;
    const int ln = ln_hw != 0, lstm = mode == NL_LSTM;
    if (ln && (!Zr || !stats || !dZ || mode > NL_GRU || (lstm && (!ln_cw || !ln_cb || !dCN))))
        return NL_BAD_VARIANTS;
    if (rmask && !S) return NL_BAD_VARIANTS;
    /* Projection: dHt (N, P) receives the gradient of h~ (for dW_hr), DR (B, H) in
     * r_scratch holds each step's dr = dh~ W_hr. */
    const int64_t P = v ? v->proj : 0, R = P ? P : H;
    const T *w_hr = P ? (const T *)v->w_hr : 0;
    T *dHt = P ? (T *)v->dHt : 0, *DR = P ? (T *)v->r_scratch : 0;
    if (P < 0 || (P && (!lstm || !w_hr || !dHt || !DR))) return NL_BAD_VARIANTS;
    /* Zoneout: the shares of dL/dh_t and dL/dc_t that pass to step t-1 past the cell (CH
     * (B, R), CC (B, H)), in zo_scratch; the LSTM's c_{t-1} is the zoned one, CZ. */
    const int zo = v && v->zoneout;
    const T *zh = zo ? (const T *)v->zh : 0, *zc = zo ? (const T *)v->zc : 0;
    const T zp = zo ? (T)v->zoneout_p : 0, *CZ = zo ? (const T *)v->CZ : 0;
    T *CH = zo ? (T *)v->zo_scratch : 0, *CC = CH ? CH + B * R : 0;
    if (zo && (!CH || mode > NL_GRU || (lstm && !CZ))) return NL_BAD_VARIANTS;
    const T *Cprev = zo ? CZ : C;
    int64_t rc = check_batch_sizes(T_, bs, N, B, offsets);
    if (rc != NL_OK) return rc;
    const int64_t gates = lstm ? 4 : mode == NL_GRU ? 3 : 1, GW = gates * H;
    const int64_t relu = mode == NL_RNN_RELU, gru = mode == NL_GRU;
    const int blas_ok = NL_BLAS != 0 && fits_int(GW) && fits_int(B) && fits_int(N) &&
                        fits_int(R);
    /* What multiplies W_hh: the gradient of the product (before its norm, if any). */
    const T *D = ln ? dZ : gru ? dGH : dG;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int64_t j0, j1, q0, q1;
        split_units(H, &j0, &j1);
        split_units(R, &q0, &q1);
        const int blas_threads = blas_ok ? blas_threads_begin() : 0;
        for (int64_t s = 0; s < T_; s++) {
            /* The forward order reversed. */
            const int64_t t = reverse ? s : T_ - 1 - s, tp = reverse ? t + 1 : t - 1;
            const int64_t n = bs[t], off = offsets[t];
            int64_t np = tp >= 0 && tp < T_ ? bs[tp] : 0;
            if (np > n) np = n;
            const int use_blas = blas_ok && n >= blas_min_rows;
            if (zo || P) {
                /* dL/dh_t with dout folded in; zoneout sets k of it aside, past the cell. The
                 * cell's share goes to dh (or, with a projection, to dHt). */
                for (int64_t b = 0; b < n; b++) {
                    const int64_t row = off + b;
                    const T *khr = zh ? zh + row * R : 0, *doutr = dout ? dout + row * R : 0;
                    T *dhr = dh + b * R, *chr = zo ? CH + b * R : 0;
                    T *cell = P ? dHt + row * R : dhr;
#pragma omp simd
                    for (int64_t q = q0; q < q1; q++) {
                        T d = dhr[q] + (doutr ? doutr[q] : 0);
                        T k = zo ? (khr ? khr[q] : zp) : 0;
                        if (chr) chr[q] = k * d;
                        cell[q] = d - k * d;
                    }
                    if (zo && lstm) {
                        const T *kcr = zc ? zc + row * H : 0;
                        T *dcr = dc + b * H, *ccr = CC + b * H;
#pragma omp simd
                        for (int64_t j = j0; j < j1; j++) {
                            T k = kcr ? kcr[j] : zp;
                            ccr[j] = k * dcr[j];
                            dcr[j] -= k * dcr[j];
                        }
                    }
                }
            }
            if (P) {
                /* dr[:, j0:j1] = dh~ W_hr[:, j0:j1], which reads every unit of dh~. */
                barrier();
                FN(rows_times_w)(n, dHt + off * R, R, R, w_hr + j0, H, j1 - j0, DR + j0, H,
                                 use_blas);
            }
            for (int64_t b = 0; b < n; b++) {
                /* dL/dh_t as the cell sees it: dout folded in above when set aside. */
                const T *doutr = dout && !zo && !P ? dout + (off + b) * R : 0;
                const T *gr = G + (off + b) * GW;
                T *dhr = dh + b * R, *dgr = dG + (off + b) * GW;
                const T *dsr = P ? DR + b * H : dhr;
                if (lstm && ln) {
                    /* The output gate and the cell norm's output; the rest waits for the
                     * norm's row means. */
                    const T *cr = C + (off + b) * H;
                    const T mc = stats[2 * N + off + b], rs = stats[3 * N + off + b];
                    T *dcnr = dCN + (off + b) * H;
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T d = dsr[j] + (doutr ? doutr[j] : 0);
                        T o = gr[3 * H + j];
                        T tc = FN(tanh)((cr[j] - mc) * rs * ln_cw[j] + ln_cb[j]);
                        dcnr[j] = d * o * ((T)1 - tc * tc);
                        dgr[3 * H + j] = d * tc * o * ((T)1 - o);
                    }
                } else if (lstm) {
                    const T *cr = C + (off + b) * H;
                    const T *cpr = b < np ? Cprev + (offsets[tp] + b) * H : c0 + b * H;
                    T *dcr = dc + b * H;
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T d = dsr[j] + (doutr ? doutr[j] : 0);
                        T i = gr[j], f = gr[H + j], gg = gr[2 * H + j], o = gr[3 * H + j];
                        T tc = FN(tanh)(cr[j]);
                        T dct = dcr[j] + d * o * ((T)1 - tc * tc);
                        dgr[j] = dct * gg * i * ((T)1 - i);
                        dgr[H + j] = dct * cpr[j] * f * ((T)1 - f);
                        dgr[2 * H + j] = dct * i * ((T)1 - gg * gg);
                        dgr[3 * H + j] = d * tc * o * ((T)1 - o);
                        dcr[j] = dct * f;
                    }
                } else if (gru) {
                    const T *ghr = GH + (off + b) * GW;
                    const T *hpr = b < np ? out + (offsets[tp] + b) * H : h0 + b * H;
                    T *dghr = dGH + (off + b) * GW;
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T d = dhr[j] + (doutr ? doutr[j] : 0);
                        T rg = gr[j], z = gr[H + j], nn = gr[2 * H + j];
                        T dn = d * ((T)1 - z) * ((T)1 - nn * nn);
                        T dz = d * (hpr[j] - nn) * z * ((T)1 - z);
                        T dr = dn * ghr[2 * H + j] * rg * ((T)1 - rg);
                        dgr[j] = dr; dgr[H + j] = dz; dgr[2 * H + j] = dn;
                        dghr[j] = dr; dghr[H + j] = dz; dghr[2 * H + j] = dn * rg;
                        dhr[j] = d * z;
                    }
                } else {
                    const T *hr = out + (off + b) * H;
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T d = dhr[j] + (doutr ? doutr[j] : 0);
                        dgr[j] = relu ? (hr[j] > 0 ? d : (T)0) : d * ((T)1 - hr[j] * hr[j]);
                    }
                }
            }
            if (lstm && ln) {
                barrier();
                for (int64_t b = 0; b < n; b++) {
                    const T *gr = G + (off + b) * GW, *cr = C + (off + b) * H;
                    const T *cpr = b < np ? Cprev + (offsets[tp] + b) * H : c0 + b * H;
                    const T *dcnr = dCN + (off + b) * H;
                    const T mc = stats[2 * N + off + b], rs = stats[3 * N + off + b];
                    T *dcr = dc + b * H, *dgr = dG + (off + b) * GW;
                    T ma, max;
                    FN(ln_grad_means)(dcnr, ln_cw, cr, H, mc, rs, &ma, &max);
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T i = gr[j], f = gr[H + j], gg = gr[2 * H + j];
                        T xh = (cr[j] - mc) * rs;
                        T dct = dcr[j] + rs * (dcnr[j] * ln_cw[j] - ma - xh * max);
                        dgr[j] = dct * gg * i * ((T)1 - i);
                        dgr[H + j] = dct * cpr[j] * f * ((T)1 - f);
                        dgr[2 * H + j] = dct * i * ((T)1 - gg * gg);
                        dcr[j] = dct * f;
                    }
                }
            }
            if (zo) {
                /* What went past the cell: dc to c_{t-1}; dh's share is what the product adds
                 * to below. */
                for (int64_t b = 0; b < n; b++) {
                    const T *chr = CH + b * R, *ccr = CC + b * H;
                    T *dhr = dh + b * R, *dcr = lstm ? dc + b * H : 0;
#pragma omp simd
                    for (int64_t q = q0; q < q1; q++) dhr[q] = (gru ? dhr[q] : 0) + chr[q];
                    if (lstm) {
#pragma omp simd
                        for (int64_t j = j0; j < j1; j++) dcr[j] += ccr[j];
                    }
                }
            }
            if (ln) {
                barrier();
                for (int64_t b = 0; b < n; b++) {
                    const int64_t row = off + b;
                    const T *dyr = (gru ? dGH : dG) + row * GW, *zr = Zr + row * GW;
                    const T mh = stats[row], rs = stats[N + row];
                    T *dzr = dZ + row * GW;
                    T ma, max;
                    FN(ln_grad_means)(dyr, ln_hw, zr, GW, mh, rs, &ma, &max);
                    for (int64_t g = 0; g < gates; g++) {
#pragma omp simd
                        for (int64_t k = g * H + j0; k < g * H + j1; k++)
                            dzr[k] = rs * (dyr[k] * ln_hw[k] - ma - (zr[k] - mh) * rs * max);
                    }
                }
            }
            barrier();
            /* dh[:n, q0:q1] (+)= D_t W_hh[:, q0:q1]; GRU adds to its carried d * z, zoneout
             * to what it carries. With recurrent dropout the product goes to S first and
             * enters dh times the mask. */
            if (q1 > q0) {
                T *target = rmask ? S : dh;
                const int carried = gru || zo, accumulate = carried && !rmask;
                if (use_blas) {
                    const int m = (int)(q1 - q0), nn = (int)n, k = (int)GW, lda = (int)R;
                    const int ldb = (int)GW, ldc = (int)R;
                    const T one = 1, beta = accumulate ? 1 : 0;
                    /* Not MKL's packed GEMM: packing W_hh measured slower here (1.06x). */
                    NL_BLAS("N", "N", &m, &nn, &k, &one, w + q0, &lda, D + off * GW, &ldb, &beta,
                            target + q0, &ldc);
                } else {
                    FN(axpy_rows)(n, D + off * GW, GW, GW, w + q0, R, q1 - q0, target + q0, R,
                                  accumulate);
                }
                if (rmask) {
                    for (int64_t b = 0; b < n; b++) {
                        const T *sr = S + b * R, *mr = rmask + b * R;
                        T *dhr = dh + b * R;
#pragma omp simd
                        for (int64_t q = q0; q < q1; q++)
                            dhr[q] = (carried ? dhr[q] : 0) + sr[q] * mr[q];
                    }
                }
            }
        }
        if (blas_ok) blas_threads_end(blas_threads);
    }
    return NL_OK;
}

#undef T
#undef FN
#undef CAT
#undef CAT_
#undef NL_CW
#endif
