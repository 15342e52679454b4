/* CPU pointwise kernels of the fused engine: the C twins of pointwise.py, same contract.
 * Every matrix is (bs, width) with contiguous rows and a row stride given in elements.
 *
 * Built without -ffast-math, so NaN and inf propagate exactly as through torch's ops. The
 * exponential is our own (below) so that the loops still vectorise: libm's exp is a scalar
 * call without -ffast-math. Activations take exp of a non-positive number only, so nothing
 * overflows. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "native_math.h"

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
            T v = relu ? (x < 0 ? (T)0 : x) : tanh_##SUF(x); /* NaN stays NaN */              \
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

KERNELS(float, f32, exp_nonpos_f32)
KERNELS(double, f64, exp_nonpos_f64)

/* Layer-norm LSTM (rnnkit.variants): gates = g + LN(z) with z = W_hh h, h = o * tanh(LN(c)).
 * mu/rs are (bs, 1) with row strides smu/srs. */
#define LN_KERNELS(T, SUF, SQRT)                                                                  \
void ln_lstm_forward_##SUF(int64_t bs, int64_t H, T eps, T *g, int64_t sg, const T *z,           \
                           int64_t sz, const T *wh, const T *bh, T *muh, int64_t smuh, T *rsh,    \
                           int64_t srsh, T *c, int64_t sc, T *cs, int64_t scs, T *cn, int64_t scn,\
                           T *muc, int64_t smuc, T *rsc, int64_t srsc, const T *wc, const T *bc,  \
                           T *out, int64_t so) {                                                  \
    int64_t W = 4 * H;                                                                            \
    for (int64_t r = 0; r < bs; r++) {                                                            \
        T *gr = g + r * sg, *cr = c + r * sc, *csr = cs + r * scs, *cnr = cn + r * scn;           \
        T *outr = out + r * so;                                                                   \
        const T *zr = z + r * sz;                                                                 \
        T m = 0, v = 0;                                                                           \
        _Pragma("omp simd reduction(+:m)")                                                        \
        for (int64_t j = 0; j < W; j++) m += zr[j];                                               \
        m /= (T)W;                                                                                \
        _Pragma("omp simd reduction(+:v)")                                                        \
        for (int64_t j = 0; j < W; j++) v += (zr[j] - m) * (zr[j] - m);                           \
        T rs = (T)1 / SQRT(v / (T)W + eps);                                                       \
        muh[r * smuh] = m; rsh[r * srsh] = rs;                                                    \
        T mc = 0;                                                                                 \
        _Pragma("omp simd reduction(+:mc)")                                                       \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T a_i = gr[j] + (zr[j] - m) * rs * wh[j] + bh[j];                                     \
            T a_f = gr[H + j] + (zr[H + j] - m) * rs * wh[H + j] + bh[H + j];                     \
            T a_g = gr[2 * H + j] + (zr[2 * H + j] - m) * rs * wh[2 * H + j] + bh[2 * H + j];     \
            T a_o = gr[3 * H + j] + (zr[3 * H + j] - m) * rs * wh[3 * H + j] + bh[3 * H + j];     \
            T i = sigmoid_##SUF(a_i), f = sigmoid_##SUF(a_f);                                     \
            T gg = tanh_##SUF(a_g), o = sigmoid_##SUF(a_o);                                       \
            gr[j] = i; gr[H + j] = f; gr[2 * H + j] = gg; gr[3 * H + j] = o;                      \
            T cv = f * cr[j] + i * gg;                                                            \
            cr[j] = cv; csr[j] = cv; mc += cv;                                                    \
        }                                                                                         \
        mc /= (T)H;                                                                               \
        T vc = 0;                                                                                 \
        _Pragma("omp simd reduction(+:vc)")                                                       \
        for (int64_t j = 0; j < H; j++) vc += (cr[j] - mc) * (cr[j] - mc);                        \
        T rc = (T)1 / SQRT(vc / (T)H + eps);                                                      \
        muc[r * smuc] = mc; rsc[r * srsc] = rc;                                                   \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T n = (cr[j] - mc) * rc * wc[j] + bc[j];                                              \
            cnr[j] = n;                                                                           \
            outr[j] = gr[3 * H + j] * tanh_##SUF(n);                                              \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
void ln_lstm_backward_##SUF(int64_t bs, int64_t H, const T *g, int64_t sg, const T *c,           \
                            int64_t sc, const T *cp, int64_t scp, const T *cn, int64_t scn,       \
                            const T *muc, int64_t smuc, const T *rsc, int64_t srsc, const T *wc,  \
                            const T *z, int64_t sz, const T *muh, int64_t smuh, const T *rsh,     \
                            int64_t srsh, const T *wh, const T *dh, int64_t sdh, T *dc,           \
                            int64_t sdc, T *dg, int64_t sdg, T *dcn, int64_t sdcn, T *dz,         \
                            int64_t sdz) {                                                        \
    int64_t W = 4 * H;                                                                            \
    for (int64_t r = 0; r < bs; r++) {                                                            \
        const T *gr = g + r * sg, *cr = c + r * sc, *cpr = cp + r * scp, *cnr = cn + r * scn;     \
        const T *dhr = dh + r * sdh, *zr = z + r * sz;                                            \
        T *dcr = dc + r * sdc, *dgr = dg + r * sdg, *dcnr = dcn + r * sdcn, *dzr = dz + r * sdz;  \
        T mc = muc[r * smuc], rc = rsc[r * srsc];                                                 \
        T sa = 0, sax = 0;                                                                        \
        _Pragma("omp simd reduction(+:sa, sax)")                                                  \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T o = gr[3 * H + j], t = tanh_##SUF(cnr[j]);                                          \
            T d = dhr[j] * o * ((T)1 - t * t);                                                    \
            dcnr[j] = d;                                                                          \
            T a = d * wc[j], xh = (cr[j] - mc) * rc;                                              \
            sa += a; sax += a * xh;                                                               \
            dgr[3 * H + j] = dhr[j] * t * o * ((T)1 - o);                                         \
        }                                                                                         \
        sa /= (T)H; sax /= (T)H;                                                                  \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T i = gr[j], f = gr[H + j], gg = gr[2 * H + j];                                       \
            T xh = (cr[j] - mc) * rc;                                                             \
            T dct = dcr[j] + rc * (dcnr[j] * wc[j] - sa - xh * sax);                              \
            dgr[j] = dct * gg * i * ((T)1 - i);                                                   \
            dgr[H + j] = dct * cpr[j] * f * ((T)1 - f);                                           \
            dgr[2 * H + j] = dct * i * ((T)1 - gg * gg);                                          \
            dcr[j] = dct * f;                                                                     \
        }                                                                                         \
        T mh = muh[r * smuh], rh = rsh[r * srsh], sb = 0, sbx = 0;                                \
        _Pragma("omp simd reduction(+:sb, sbx)")                                                  \
        for (int64_t j = 0; j < W; j++) {                                                         \
            T b = dgr[j] * wh[j];                                                                 \
            sb += b; sbx += b * (zr[j] - mh) * rh;                                                \
        }                                                                                         \
        sb /= (T)W; sbx /= (T)W;                                                                  \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < W; j++)                                                           \
            dzr[j] = rh * (dgr[j] * wh[j] - sb - (zr[j] - mh) * rh * sbx);                        \
    }                                                                                             \
}

LN_KERNELS(float, f32, sqrtf)
LN_KERNELS(double, f64, sqrt)

/* Zoneout (rnnkit.variants) inside the LSTM and GRU steps: k = mask (1 keeps the previous
 * value) from zh/zc, or the probability p where the mask pointer is NULL (eval). */
#define ZONEOUT_KERNELS(T, SUF)                                                                   \
void lstm_forward_zoneout_##SUF(int64_t bs, int64_t H, T *g, int64_t sg, const T *gh,            \
                                int64_t sgh, T *c, int64_t sc, T *cs, int64_t scs, T *cz,         \
                                int64_t scz, T *h, int64_t sh, T *out, int64_t so, const T *zh,   \
                                int64_t szh, const T *zc, int64_t szc, T p) {                     \
    for (int64_t r = 0; r < bs; r++) {                                                            \
        T *gr = g + r * sg, *cr = c + r * sc, *csr = cs + r * scs, *czr = cz + r * scz;           \
        T *hr = h + r * sh, *outr = out + r * so;                                                 \
        const T *ghr = gh + r * sgh, *zhr = zh ? zh + r * szh : 0, *zcr = zc ? zc + r * szc : 0;  \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T i = sigmoid_##SUF(gr[j] + ghr[j]), f = sigmoid_##SUF(gr[H + j] + ghr[H + j]);       \
            T gg = tanh_##SUF(gr[2 * H + j] + ghr[2 * H + j]);                                    \
            T o = sigmoid_##SUF(gr[3 * H + j] + ghr[3 * H + j]);                                  \
            gr[j] = i; gr[H + j] = f; gr[2 * H + j] = gg; gr[3 * H + j] = o;                      \
            T kh = zhr ? zhr[j] : p, kc = zcr ? zcr[j] : p;                                       \
            T cn = f * cr[j] + i * gg;                                                            \
            csr[j] = cn;                                                                          \
            T cnew = kc * cr[j] + ((T)1 - kc) * cn;                                               \
            cr[j] = cnew; czr[j] = cnew;                                                          \
            T hnew = kh * hr[j] + ((T)1 - kh) * o * tanh_##SUF(cn);                               \
            hr[j] = hnew; outr[j] = hnew;                                                         \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
void lstm_backward_zoneout_##SUF(int64_t bs, int64_t H, const T *g, int64_t sg, const T *c,      \
                                 int64_t sc, const T *cp, int64_t scp, const T *dh, int64_t sdh,  \
                                 T *dc, int64_t sdc, T *dg, int64_t sdg, T *dhc, int64_t sdhc,    \
                                 const T *zh, int64_t szh, const T *zc, int64_t szc, T p) {       \
    for (int64_t r = 0; r < bs; r++) {                                                            \
        const T *gr = g + r * sg, *cr = c + r * sc, *cpr = cp + r * scp, *dhr = dh + r * sdh;     \
        const T *zhr = zh ? zh + r * szh : 0, *zcr = zc ? zc + r * szc : 0;                       \
        T *dcr = dc + r * sdc, *dgr = dg + r * sdg, *dhcr = dhc + r * sdhc;                       \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T i = gr[j], f = gr[H + j], gg = gr[2 * H + j], o = gr[3 * H + j];                    \
            T kh = zhr ? zhr[j] : p, kc = zcr ? zcr[j] : p;                                       \
            T d = ((T)1 - kh) * dhr[j], dcz = dcr[j];                                             \
            T tc = tanh_##SUF(cr[j]);                                                             \
            T dct = ((T)1 - kc) * dcz + d * o * ((T)1 - tc * tc);                                 \
            dgr[j] = dct * gg * i * ((T)1 - i);                                                   \
            dgr[H + j] = dct * cpr[j] * f * ((T)1 - f);                                           \
            dgr[2 * H + j] = dct * i * ((T)1 - gg * gg);                                          \
            dgr[3 * H + j] = d * tc * o * ((T)1 - o);                                             \
            dcr[j] = dct * f + kc * dcz;                                                          \
            dhcr[j] = kh * dhr[j];                                                                \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
void gru_forward_zoneout_##SUF(int64_t bs, int64_t H, T *g, int64_t sg, const T *gh,             \
                               int64_t sgh, T *h, int64_t sh, T *out, int64_t so, const T *zh,    \
                               int64_t szh, T p) {                                                \
    for (int64_t r = 0; r < bs; r++) {                                                            \
        T *gr = g + r * sg, *hr = h + r * sh, *outr = out + r * so;                               \
        const T *ghr = gh + r * sgh, *zhr = zh ? zh + r * szh : 0;                                \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T rg = sigmoid_##SUF(gr[j] + ghr[j]);                                                 \
            T z = sigmoid_##SUF(gr[H + j] + ghr[H + j]);                                          \
            T n = tanh_##SUF(gr[2 * H + j] + rg * ghr[2 * H + j]);                                \
            gr[j] = rg; gr[H + j] = z; gr[2 * H + j] = n;                                         \
            T kh = zhr ? zhr[j] : p;                                                              \
            T hnew = kh * hr[j] + ((T)1 - kh) * (n + z * (hr[j] - n));                            \
            outr[j] = hnew; hr[j] = hnew;                                                         \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
void gru_backward_zoneout_##SUF(int64_t bs, int64_t H, const T *g, int64_t sg, const T *gh,      \
                                int64_t sgh, const T *hp, int64_t shp, const T *dh, int64_t sdh,  \
                                T *dg, int64_t sdg, T *dgh, int64_t sdgh, T *dhp, int64_t sdhp,   \
                                const T *zh, int64_t szh, T p) {                                  \
    for (int64_t r = 0; r < bs; r++) {                                                            \
        const T *gr = g + r * sg, *ghr = gh + r * sgh, *hpr = hp + r * shp, *dhr = dh + r * sdh;  \
        const T *zhr = zh ? zh + r * szh : 0;                                                     \
        T *dgr = dg + r * sdg, *dghr = dgh + r * sdgh, *dhpr = dhp + r * sdhp;                    \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < H; j++) {                                                         \
            T rg = gr[j], z = gr[H + j], n = gr[2 * H + j];                                       \
            T kh = zhr ? zhr[j] : p, d = ((T)1 - kh) * dhr[j];                                    \
            T dn = d * ((T)1 - z) * ((T)1 - n * n);                                               \
            T dz = d * (hpr[j] - n) * z * ((T)1 - z);                                             \
            T dr = dn * ghr[2 * H + j] * rg * ((T)1 - rg);                                        \
            dgr[j] = dr; dgr[H + j] = dz; dgr[2 * H + j] = dn;                                    \
            dghr[j] = dr; dghr[H + j] = dz; dghr[2 * H + j] = dn * rg;                            \
            dhpr[j] = d * z + kh * dhr[j];                                                        \
        }                                                                                         \
    }                                                                                             \
}

ZONEOUT_KERNELS(float, f32)
ZONEOUT_KERNELS(double, f64)
