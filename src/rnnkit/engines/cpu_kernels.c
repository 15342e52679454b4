/* CPU pointwise kernels of the fused engine: the C twins of pointwise.py, same contract.
 * Every matrix is (bs, width) with contiguous rows and a row stride given in elements.
 * Activations are written so that no intermediate overflows (exp of a non-positive number only),
 * which keeps them exact under -ffast-math. */
#include <math.h>
#include <stdint.h>

#define KERNELS(T, SUF, EXP)                                                                     \
static inline T sigmoid_##SUF(T x) {                                                              \
    T e = EXP(-(x < 0 ? -x : x));                                                                 \
    T s = (T)1 / ((T)1 + e);                                                                      \
    return x >= 0 ? s : e * s;                                                                    \
}                                                                                                 \
static inline T tanh_##SUF(T x) {                                                                 \
    T e = EXP((T)-2 * (x < 0 ? -x : x));                                                          \
    T t = ((T)1 - e) / ((T)1 + e);                                                                \
    return x >= 0 ? t : -t;                                                                       \
}                                                                                                 \
void lstm_forward_##SUF(int64_t bs, int64_t H, T *g, int64_t sg, const T *gh, int64_t sgh, T *c,  \
                        int64_t sc, T *cs, int64_t scs, T *h, int64_t sh, T *out, int64_t so) {   \
    for (int64_t r = 0; r < bs; r++) {                                                            \
        T *gr = g + r * sg, *cr = c + r * sc, *csr = cs + r * scs, *outr = out + r * so;          \
        const T *ghr = gh + r * sgh;                                                              \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T i = sigmoid_##SUF(gr[j] + ghr[j]), f = sigmoid_##SUF(gr[H + j] + ghr[H + j]);       \
            T gg = tanh_##SUF(gr[2 * H + j] + ghr[2 * H + j]);                                    \
            T o = sigmoid_##SUF(gr[3 * H + j] + ghr[3 * H + j]);                                  \
            gr[j] = i; gr[H + j] = f; gr[2 * H + j] = gg; gr[3 * H + j] = o;                      \
            T cn = f * cr[j] + i * gg;                                                            \
            cr[j] = cn; csr[j] = cn;                                                              \
            outr[j] = o * tanh_##SUF(cn);                                                         \
        }                                                                                         \
        if (h) for (int64_t j = 0; j < H; j++) h[r * sh + j] = outr[j];                           \
    }                                                                                             \
}                                                                                                 \
void lstm_backward_##SUF(int64_t bs, int64_t H, const T *g, int64_t sg, const T *c, int64_t sc,  \
                         const T *cp, int64_t scp, const T *dh, int64_t sdh, T *dc, int64_t sdc,  \
                         T *dg, int64_t sdg) {                                                    \
    for (int64_t r = 0; r < bs; r++) {                                                            \
        const T *gr = g + r * sg, *cr = c + r * sc, *cpr = cp + r * scp, *dhr = dh + r * sdh;     \
        T *dcr = dc + r * sdc, *dgr = dg + r * sdg;                                               \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T i = gr[j], f = gr[H + j], gg = gr[2 * H + j], o = gr[3 * H + j];                    \
            T tc = tanh_##SUF(cr[j]);                                                             \
            T dct = dcr[j] + dhr[j] * o * ((T)1 - tc * tc);                                       \
            dgr[j] = dct * gg * i * ((T)1 - i);                                                   \
            dgr[H + j] = dct * cpr[j] * f * ((T)1 - f);                                           \
            dgr[2 * H + j] = dct * i * ((T)1 - gg * gg);                                          \
            dgr[3 * H + j] = dhr[j] * tc * o * ((T)1 - o);                                        \
            dcr[j] = dct * f;                                                                     \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
void gru_forward_##SUF(int64_t bs, int64_t H, T *g, int64_t sg, const T *gh, int64_t sgh, T *h,  \
                       int64_t sh, T *out, int64_t so) {                                          \
    for (int64_t r = 0; r < bs; r++) {                                                            \
        T *gr = g + r * sg, *hr = h + r * sh, *outr = out + r * so;                               \
        const T *ghr = gh + r * sgh;                                                              \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T rg = sigmoid_##SUF(gr[j] + ghr[j]);                                                 \
            T z = sigmoid_##SUF(gr[H + j] + ghr[H + j]);                                          \
            T n = tanh_##SUF(gr[2 * H + j] + rg * ghr[2 * H + j]);                                \
            gr[j] = rg; gr[H + j] = z; gr[2 * H + j] = n;                                         \
            T hn = n + z * (hr[j] - n);                                                           \
            outr[j] = hn; hr[j] = hn;                                                             \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
void gru_backward_##SUF(int64_t bs, int64_t H, const T *g, int64_t sg, const T *gh, int64_t sgh, \
                        const T *hp, int64_t shp, const T *dh, int64_t sdh, T *dg, int64_t sdg,   \
                        T *dgh, int64_t sdgh, T *dhp, int64_t sdhp) {                             \
    for (int64_t r = 0; r < bs; r++) {                                                            \
        const T *gr = g + r * sg, *ghr = gh + r * sgh, *hpr = hp + r * shp, *dhr = dh + r * sdh;  \
        T *dgr = dg + r * sdg, *dghr = dgh + r * sdgh, *dhpr = dhp + r * sdhp;                    \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T rg = gr[j], z = gr[H + j], n = gr[2 * H + j], d = dhr[j];                           \
            T dn = d * ((T)1 - z) * ((T)1 - n * n);                                               \
            T dz = d * (hpr[j] - n) * z * ((T)1 - z);                                             \
            T dr = dn * ghr[2 * H + j] * rg * ((T)1 - rg);                                        \
            dgr[j] = dr; dgr[H + j] = dz; dgr[2 * H + j] = dn;                                    \
            dghr[j] = dr; dghr[H + j] = dz; dghr[2 * H + j] = dn * rg;                            \
            dhpr[j] = d * z;                                                                      \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
void rnn_forward_##SUF(int64_t bs, int64_t H, const T *g, int64_t sg, const T *gh, int64_t sgh,   \
                       T *h, int64_t sh, T *out, int64_t so, int64_t relu) {                      \
    for (int64_t r = 0; r < bs; r++) {                                                            \
        const T *gr = g + r * sg, *ghr = gh + r * sgh;                                            \
        T *hr = h + r * sh, *outr = out + r * so;                                                 \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T x = gr[j] + ghr[j];                                                                 \
            T v = relu ? (x > 0 ? x : (T)0) : tanh_##SUF(x);                                      \
            outr[j] = v; hr[j] = v;                                                               \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
void rnn_backward_##SUF(int64_t bs, int64_t H, const T *h, int64_t sh, const T *dh, int64_t sdh, \
                        T *dg, int64_t sdg, int64_t relu) {                                       \
    for (int64_t r = 0; r < bs; r++) {                                                            \
        const T *hr = h + r * sh, *dhr = dh + r * sdh;                                            \
        T *dgr = dg + r * sdg;                                                                    \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < H; j++)                                                           \
            dgr[j] = relu ? (hr[j] > 0 ? dhr[j] : (T)0) : dhr[j] * ((T)1 - hr[j] * hr[j]);        \
    }                                                                                             \
}

KERNELS(float, f32, expf)
KERNELS(double, f64, exp)
