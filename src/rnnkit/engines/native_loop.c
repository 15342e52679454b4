/* The whole time loop of one layer and direction in one native call (issue 9): per step the
 * recurrent product and the pointwise step of cpu_kernels.c (same formulas, same saved tensors
 * as fused.py's FusedLayer), forward and backward, with no return to Python between steps.
 *
 * Threads split the hidden units: thread k owns units [j0, j1) of every gate, computes those
 * columns of the recurrent product and then the pointwise step of those units, so a step needs
 * one barrier (the next product reads every unit of h_{t-1}). h_{t-1} is read from the rows of
 * `out` written by the previous step (or h0), which are never written again, so no thread can
 * overwrite what another still reads. In backward the same split holds with dh's units.
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
};

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
#include __FILE__
#undef NL_T
#undef NL_SUF
#undef NL_EXP
#undef NL_BLAS

#define NL_T double
#define NL_SUF f64
#define NL_EXP exp_nonpos_f64
#define NL_BLAS blas_f64
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

/* Z[b, g*H + j] = x[b] . w[g*H + j] for b < nb, j in [j0, j1), every gate g: x (nb, H). */
static void FN(gates_product)(int64_t nb, const T *x, int64_t H, int64_t gates, const T *w,
                              int64_t j0, int64_t j1, T *Z, int64_t use_blas) {
    int64_t GW = gates * H;
    if (nb <= 0 || j1 <= j0) return;
    /* One thread owns every unit: the gates' rows of w are one block, so one product. */
    if (j0 == 0 && j1 == H) {
        j1 = GW;
        gates = 1;
    }
    for (int64_t g = 0; g < gates; g++) {
        const T *wg = w + (g * H + j0) * H;
        T *zg = Z + g * H + j0;
        if (use_blas) {
            /* Column-major: Z^T block (m, nb) = w block^T... i.e. op(A) = w rows as (m, H). */
            const int m = (int)(j1 - j0), n = (int)nb, k = (int)H, lda = (int)H, ldb = (int)H;
            const int ldc = (int)GW;
            const T one = 1, zero = 0;
            NL_BLAS("T", "N", &m, &n, &k, &one, wg, &lda, x, &ldb, &zero, zg, &ldc);
        } else {
            FN(dot_rows)(nb, x, H, wg, j1 - j0, zg, GW);
        }
    }
}

/* One layer and direction forward; see native_loop.py's `forward` for the contract.
 * G (N, GW) in: x W_ih^T + biases; out: the gate activations (as FusedLayer saves them).
 * h, c (B, H): the state, h0/c0 in, h_n/c_n out. C (N, H) the saved c_t or NULL; GH (N, 3H)
 * the saved Z_t + b_hh of GRU or NULL (then Z holds it); Z (B, GW) scratch. */
int64_t FN(nl_forward)(int64_t mode, int64_t reverse, int64_t T_, const int64_t *bs, int64_t N,
                       int64_t B, int64_t H, T *G, const T *w, const T *bhh, const T *h0, T *out,
                       T *h, T *c, T *C, T *GH, T *Z, int64_t *offsets, int64_t nthreads,
                       int64_t blas_min_rows) {
    if (mode < NL_LSTM || mode > NL_RNN_RELU) return NL_BAD_MODE;
    if (T_ < 0 || N < 0 || B < 1 || H < 1) return NL_BAD_SIZES;
    if (!G || !w || !h0 || !out || !h || !Z || !offsets || (mode == NL_LSTM && !c))
        return NL_MISSING_TENSOR;
    int64_t rc = check_batch_sizes(T_, bs, N, B, offsets);
    if (rc != NL_OK) return rc;
    const int64_t gates = mode == NL_LSTM ? 4 : mode == NL_GRU ? 3 : 1, GW = gates * H;
    const int64_t relu = mode == NL_RNN_RELU;
    const int blas_ok = NL_BLAS != 0 && fits_int(GW) && fits_int(B) && fits_int(N);
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int64_t j0, j1;
        split_units(H, &j0, &j1);
        const int blas_threads = blas_ok ? blas_threads_begin() : 0;
        for (int64_t s = 0; s < T_; s++) {
            const int64_t t = reverse ? T_ - 1 - s : s, tp = reverse ? t + 1 : t - 1;
            const int64_t n = bs[t], off = offsets[t];
            /* Rows [0, np) continue from the previous step's outputs, the rest start at h0. */
            int64_t np = tp >= 0 && tp < T_ ? bs[tp] : 0;
            if (np > n) np = n;
            const int64_t use_blas = blas_ok && n >= blas_min_rows;
            if (np > 0) FN(gates_product)(np, out + offsets[tp] * H, H, gates, w, j0, j1, Z,
                                          use_blas);
            FN(gates_product)(n - np, h0 + np * H, H, gates, w, j0, j1, Z + np * GW, use_blas);
            for (int64_t b = 0; b < n; b++) {
                T *gr = G + (off + b) * GW, *zr = Z + b * GW, *hr = h + b * H;
                T *outr = out + (off + b) * H;
                if (mode == NL_LSTM) {
                    T *cr = c + b * H, *csr = C ? C + (off + b) * H : cr;
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T i = FN(sigmoid)(gr[j] + zr[j]);
                        T f = FN(sigmoid)(gr[H + j] + zr[H + j]);
                        T gg = FN(tanh)(gr[2 * H + j] + zr[2 * H + j]);
                        T o = FN(sigmoid)(gr[3 * H + j] + zr[3 * H + j]);
                        gr[j] = i; gr[H + j] = f; gr[2 * H + j] = gg; gr[3 * H + j] = o;
                        T cn = f * cr[j] + i * gg;
                        cr[j] = cn; csr[j] = cn;
                        T hn = o * FN(tanh)(cn);
                        outr[j] = hn; hr[j] = hn;
                    }
                } else if (mode == NL_GRU) {
                    T *ghr = GH ? GH + (off + b) * GW : zr;
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T yr = zr[j] + (bhh ? bhh[j] : 0);
                        T yz = zr[H + j] + (bhh ? bhh[H + j] : 0);
                        T yn = zr[2 * H + j] + (bhh ? bhh[2 * H + j] : 0);
                        ghr[j] = yr; ghr[H + j] = yz; ghr[2 * H + j] = yn;
                        T rg = FN(sigmoid)(gr[j] + yr);
                        T z = FN(sigmoid)(gr[H + j] + yz);
                        T nn = FN(tanh)(gr[2 * H + j] + rg * yn);
                        gr[j] = rg; gr[H + j] = z; gr[2 * H + j] = nn;
                        T hn = nn + z * (hr[j] - nn);
                        outr[j] = hn; hr[j] = hn;
                    }
                } else {
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T x = gr[j] + zr[j];
                        T v = relu ? (x < 0 ? (T)0 : x) : FN(tanh)(x); /* NaN stays NaN */
                        outr[j] = v; hr[j] = v;
                    }
                }
            }
            barrier();
        }
        if (blas_ok) blas_threads_end(blas_threads);
    }
    return NL_OK;
}

/* One layer and direction backward; see native_loop.py's `backward` for the contract.
 * dh, dc (B, H): d h_n / d c_n in, dh0 / dc0 out. dout (N, H) or NULL. dG (N, GW) out; dGH
 * (N, 3H) out for GRU. G, GH, out, C: what nl_forward saved. */
int64_t FN(nl_backward)(int64_t mode, int64_t reverse, int64_t T_, const int64_t *bs, int64_t N,
                        int64_t B, int64_t H, const T *G, const T *GH, const T *out, const T *C,
                        const T *h0, const T *c0, const T *w, const T *dout, T *dh, T *dc,
                        T *dG, T *dGH, int64_t *offsets, int64_t nthreads,
                        int64_t blas_min_rows) {
    if (mode < NL_LSTM || mode > NL_RNN_RELU) return NL_BAD_MODE;
    if (T_ < 0 || N < 0 || B < 1 || H < 1) return NL_BAD_SIZES;
    if (!G || !out || !h0 || !w || !dh || !dG || !offsets) return NL_MISSING_TENSOR;
    if (mode == NL_LSTM && (!C || !c0 || !dc)) return NL_MISSING_TENSOR;
    if (mode == NL_GRU && (!GH || !dGH)) return NL_MISSING_TENSOR;
    int64_t rc = check_batch_sizes(T_, bs, N, B, offsets);
    if (rc != NL_OK) return rc;
    const int64_t gates = mode == NL_LSTM ? 4 : mode == NL_GRU ? 3 : 1, GW = gates * H;
    const int64_t relu = mode == NL_RNN_RELU, gru = mode == NL_GRU;
    const int blas_ok = NL_BLAS != 0 && fits_int(GW) && fits_int(B) && fits_int(N);
    const T *D = gru ? dGH : dG; /* what multiplies W_hh */
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int64_t j0, j1;
        split_units(H, &j0, &j1);
        const int blas_threads = blas_ok ? blas_threads_begin() : 0;
        for (int64_t s = 0; s < T_; s++) {
            /* The forward order reversed. */
            const int64_t t = reverse ? s : T_ - 1 - s, tp = reverse ? t + 1 : t - 1;
            const int64_t n = bs[t], off = offsets[t];
            int64_t np = tp >= 0 && tp < T_ ? bs[tp] : 0;
            if (np > n) np = n;
            for (int64_t b = 0; b < n; b++) {
                const T *gr = G + (off + b) * GW, *doutr = dout ? dout + (off + b) * H : 0;
                T *dhr = dh + b * H, *dgr = dG + (off + b) * GW;
                if (mode == NL_LSTM) {
                    const T *cr = C + (off + b) * H;
                    const T *cpr = b < np ? C + (offsets[tp] + b) * H : c0 + b * H;
                    T *dcr = dc + b * H;
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++) {
                        T d = dhr[j] + (doutr ? doutr[j] : 0);
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
            barrier();
            /* dh[:n, j0:j1] (+)= D_t W_hh[:, j0:j1]; GRU adds to its carried d * z. */
            if (j1 > j0) {
                if (blas_ok && n >= blas_min_rows) {
                    const int m = (int)(j1 - j0), nn = (int)n, k = (int)GW, lda = (int)H;
                    const int ldb = (int)GW, ldc = (int)H;
                    const T one = 1, beta = gru ? 1 : 0;
                    NL_BLAS("N", "N", &m, &nn, &k, &one, w + j0, &lda, D + off * GW, &ldb, &beta,
                            dh + j0, &ldc);
                } else {
                    FN(axpy_rows)(n, D + off * GW, GW, GW, w + j0, H, j1 - j0, dh + j0, H,
                                  (int)gru);
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
