/* int8 inference (rnnkit.quantize): weights stored as int8 with a float scale per output row,
 * activations quantized per row at run time, products accumulated exactly in int32, everything
 * after the product (biases, norms, gates, state) in float32. Included once by loop.c.
 *
 * Quantization is symmetric to [-127, 127] on both sides: a weight row w ~ sw * qw with
 * sw = max|w| / 127, an activation row a ~ sa * qa likewise (per row of the batch, per step).
 * Then sum_k w a ~ sw sa sum_k qw qa, and sum_k qw qa is exact in int32 for K <= Q8_MAX_K.
 * Every instruction set below computes that same integer, so the results are the same on every
 * CPU; only how fast differs:
 * - AVX-512 VNNI (vpdpbusd, u8 x s8 into int32, no intermediate saturation): the activations are
 *   stored as qa + 128 (Q8_OFFSET), and 128 sum_k qw, kept per row (wsum), is taken back off.
 * - AVX2, several rows (vpmaddwd): int16 products, which cannot saturate. The activations are
 *   stored as int16 (q8_act), and each 16-byte quarter of a panel's group is widened to int16
 *   once for all the rows of a tile. One multiply per 16 products, where the u8 x s8 form
 *   below needs a vpsignb besides its vpmaddubsw and vpmaddwd per 32, and these three share
 *   the multiply pipes (Zen 4): a (16, 256) x (256, 1024) product took 55 us against 62 on one
 *   core (75.6 against 67.3 GMAC/s).
 * - AVX2, one row (vpmaddubsw then vpmaddwd): vpmaddubsw adds two u8 x s8 products with signed
 *   saturation to 16 bits. Both operands within 127 in magnitude (|qa| as the unsigned side,
 *   qw with qa's sign as the signed one) bound a pair by 2 * 127 * 127 = 32258 < 32767: it
 *   never saturates. That is why -128 is never used. (One row would widen each panel for
 *   itself alone.)
 * - Anything else: plain C.
 *
 * Layout (nl_q8_pack): a matrix of `gates` blocks of H rows (W_ih, W_hh: gate g's unit j is row
 * g H + j) of K columns is cut into panels of 16 consecutive units of one gate, ordered unit
 * block by unit block and, within a block, gate by gate, so that a thread owning units
 * [j0, j1) (whole blocks of 16) reads one contiguous run of panels. A panel stores K/4 groups
 * (K rounded up to Kp, a multiple of 4, with zeros) of 16 rows x 4 columns: 64 bytes, one
 * AVX-512 register or two AVX2 ones, whose 16 int32 lanes are the 16 rows' sums. */

#include <stdint.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define Q8_ISA 2
#define Q8_OFFSET 128
#include <immintrin.h>
#elif defined(__AVX2__)
#define Q8_ISA 1
#include <immintrin.h>
#else
#define Q8_ISA 0
#endif
/* A quantized activation as the kernels read it: int16 on AVX2, else a byte (int8, or with
 * VNNI's offset u8). */
#if Q8_ISA == 1
typedef int16_t q8_act;
#else
typedef int8_t q8_act;
#endif
#ifndef Q8_OFFSET
#define Q8_OFFSET 0
#endif

/* Above this many columns the VNNI form's sum of (qa + 128) qw could leave int32. */
#define Q8_MAX_K 65536

/* One packed int8 matrix: panels w, per packed row (panel * 16 + lane) the sum of its int8
 * weights (wsum), and per original row (g H + j) its scale. */
typedef struct {
    const int8_t *w;
    const int32_t *wsum;
    const float *scale;
    int64_t gates, H, K;
} nl_q8_matrix;

/* The int8 weights of one layer and direction's loop: W_hh, and LSTM's W_hr (hr.w NULL: none).
 * With x (N, ih.K) set, the loop also computes its input side G = x W_ih^T + bias (bias NULL:
 * none) into G, each thread what it owns (its units, or where threads take rows its rows) a
 * few steps ahead of its walk (x NULL: G is given). */
typedef struct {
    nl_q8_matrix hh, hr, ih;
    const float *x, *bias;
} nl_q8;

static inline int64_t q8_kp(int64_t K) { return (K + 3) / 4 * 4; }
static inline int64_t q8_blocks(int64_t H) { return (H + 15) / 16; }

int64_t nl_q8_isa(void) { return Q8_ISA; }

/* Bytes of the panels of a (gates * H, K) matrix (wsum holds 16 int32 per panel). */
int64_t nl_q8_packed_size(int64_t gates, int64_t H, int64_t K) {
    if (gates < 1 || H < 1 || K < 1 || K > Q8_MAX_K || H > ((int64_t)1 << 30) || gates > 4)
        return -1;
    return q8_blocks(H) * gates * q8_kp(K) * 16;
}

/* Pack q (gates * H, K), row-major int8 in [-127, 127], into `packed` (nl_q8_packed_size bytes)
 * and `wsum` (that / Kp int32s). 0, or -1 for bad sizes or a -128. */
int64_t nl_q8_pack(int64_t gates, int64_t H, int64_t K, const int8_t *q, int8_t *packed,
                   int32_t *wsum) {
    if (!q || !packed || !wsum || nl_q8_packed_size(gates, H, K) < 0) return -1;
    for (int64_t i = 0; i < gates * H * K; i++)
        if (q[i] == -128) return -1;
    const int64_t Kp = q8_kp(K), nub = q8_blocks(H);
    for (int64_t u = 0; u < nub; u++)
        for (int64_t g = 0; g < gates; g++) {
            const int64_t p = u * gates + g;
            int8_t *panel = packed + p * Kp * 16;
            for (int64_t r = 0; r < 16; r++) {
                const int64_t j = u * 16 + r;
                const int8_t *row = j < H ? q + (g * H + j) * K : 0;
                int32_t sum = 0;
                for (int64_t k = 0; k < Kp; k++) {
                    const int8_t v = row && k < K ? row[k] : 0;
                    panel[(k / 4) * 64 + r * 4 + k % 4] = v;
                    sum += v;
                }
                wsum[p * 16 + r] = sum;
            }
        }
    return 0;
}

/* Row i of x (n rows, stride ldx, K values) as qa + Q8_OFFSET (Kp q8_acts, padded with the
 * offset: zero) and its scale
 * max|x_i| / 127 (0 for a zero row; NaN where the row holds a NaN or an infinity, whose qa is
 * then 0, so that the row's results come out NaN: a float product's would for a NaN, and an
 * infinity has no int8 scale, so NaN says so rather than a finite number that is wrong). */
static void q8_quantize_rows(int64_t n, const float *x, int64_t ldx, int64_t K, q8_act *qa,
                             float *sa) {
    const int64_t Kp = q8_kp(K);
    for (int64_t i = 0; i < n; i++) {
        const float *row = x + i * ldx;
        q8_act *q = qa + i * Kp;
        float m = 0, bad = 0;
#pragma omp simd reduction(max : m) reduction(+ : bad)
        for (int64_t k = 0; k < K; k++) {
            const float v = row[k] < 0 ? -row[k] : row[k];
            m = v > m ? v : m;
            bad += row[k] - row[k];
        }
        if (bad != 0 || m > 3.4e38f) {
            for (int64_t k = 0; k < Kp; k++) q[k] = (q8_act)(int8_t)(uint8_t)Q8_OFFSET;
            sa[i] = __builtin_nanf("");
            continue;
        }
        const float inv = m > 0 ? 127.0f / m : 0.0f;
        sa[i] = m / 127.0f;
#pragma omp simd
        for (int64_t k = 0; k < K; k++) {
            float v = __builtin_rintf(row[k] * inv);
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            q[k] = (q8_act)(int8_t)(uint8_t)((int32_t)v + Q8_OFFSET);
        }
        for (int64_t k = K; k < Kp; k++) q[k] = (q8_act)(int8_t)(uint8_t)Q8_OFFSET;
    }
}

/* Where a tile's results go: row b (of nb) to dst[b] with activation scale sa[b]; panel q (of
 * np) to the columns col[q] .. col[q] + lanes[q] of every row (a panel's 16 rows are 16
 * consecutive units of one gate; lanes < 16 only in a block that crosses H), each scaled by its
 * weight row's scale (scale[col], the row of W is the column of z) and, with the VNNI offset,
 * less 128 times its row sum ws[q]. */
typedef struct {
    int nb, np;
    float *dst[4];
    float sa[4];
    int64_t col[8];
    int lanes[8];
    const int32_t *ws[8];
} q8_out;

/* The integer products of a tile: rows of qa (Kp q8_acts each) by panels of 16 weight rows,
 * lane i of each result the sum over k of a row's qa and panel row i's weights, then scaled
 * into floats as q8_out says: z = (float)sum * (sw * sa), the same float operations on every
 * path. The kernels take a fixed tile (4 rows x 4 panels, or 1 row x 8 panels) with one named
 * accumulator per pair, so that the compiler keeps them all in registers (arrays of vectors
 * were spilled and copied every iteration: half the speed); q8_tile fills a smaller tile with
 * repeats of its first row or panel and writes only what q8_out asks for. */
#if Q8_ISA == 2
#define Q8_V __m512i
#define Q8_ZERO _mm512_setzero_si512()
static inline __attribute__((always_inline)) __m512i q8_bcast(const int8_t *a) {
    int32_t a4;
    memcpy(&a4, a, 4);
    return _mm512_set1_epi32(a4);
}
#define Q8_LOAD(p) _mm512_loadu_si512(p)
#define Q8_DOT(c, a, w) c = _mm512_dpbusd_epi32(c, a, w)
/* Keeps a loaded panel in a register: without it the compiler folds the load into each of the
 * four products that read it, four loads instead of one. */
#define Q8_PIN(v) __asm__("" : "+v"(v))
/* Lanes past `lanes` are neither read (scales) nor written. */
static inline __attribute__((always_inline)) void q8_emit(__m512i c, const int32_t *ws,
                                                          const float *sw, float sa, float *dst,
                                                          int lanes) {
    c = _mm512_sub_epi32(c, _mm512_slli_epi32(_mm512_loadu_si512(ws), 7));
    const __m512 f = _mm512_cvtepi32_ps(c), s = _mm512_set1_ps(sa);
    if (lanes >= 16) {
        _mm512_storeu_ps(dst, _mm512_mul_ps(f, _mm512_mul_ps(_mm512_loadu_ps(sw), s)));
    } else {
        const __mmask16 k = (__mmask16)((1u << lanes) - 1);
        const __m512 w = _mm512_maskz_loadu_ps(k, sw);
        _mm512_mask_storeu_ps(dst, k, _mm512_mul_ps(f, _mm512_mul_ps(w, s)));
    }
}
#elif Q8_ISA == 1
/* Two registers per panel (rows 0-7, 8-15); one product is |qa| times qw with qa's sign. */
typedef struct {
    __m256i lo, hi;
} q8_pair;
#define Q8_V q8_pair
#define Q8_ZERO ((q8_pair){_mm256_setzero_si256(), _mm256_setzero_si256()})
static inline __attribute__((always_inline)) q8_pair q8_bcast(const int8_t *a) {
    int32_t a4;
    memcpy(&a4, a, 4);
    const __m256i v = _mm256_set1_epi32(a4);
    return (q8_pair){_mm256_sign_epi8(v, v), v};
}
static inline __attribute__((always_inline)) q8_pair q8_load(const int8_t *p) {
    return (q8_pair){_mm256_loadu_si256((const __m256i *)p),
                     _mm256_loadu_si256((const __m256i *)(p + 32))};
}
static inline __attribute__((always_inline)) __m256i q8_dot_half(__m256i c, q8_pair a,
                                                                  __m256i w) {
    const __m256i pairs = _mm256_maddubs_epi16(a.lo, _mm256_sign_epi8(w, a.hi));
    return _mm256_add_epi32(c, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#define Q8_LOAD(p) q8_load(p)
#define Q8_DOT(c, a, w) (c.lo = q8_dot_half(c.lo, a, w.lo), c.hi = q8_dot_half(c.hi, a, w.hi))
#define Q8_PIN(v) __asm__("" : "+x"(v.lo), "+x"(v.hi))
static inline __attribute__((always_inline)) void q8_emit_half(__m256i c, const float *sw,
                                                               __m256 s, float *dst, int lanes) {
    const __m256 f = _mm256_cvtepi32_ps(c);
    if (lanes >= 8) {
        _mm256_storeu_ps(dst, _mm256_mul_ps(f, _mm256_mul_ps(_mm256_loadu_ps(sw), s)));
    } else if (lanes > 0) {
        const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 w = _mm256_maskload_ps(sw, k);
        _mm256_maskstore_ps(dst, k, _mm256_mul_ps(f, _mm256_mul_ps(w, s)));
    }
}
static inline __attribute__((always_inline)) void q8_emit(q8_pair c, const int32_t *ws,
                                                          const float *sw, float sa, float *dst,
                                                          int lanes) {
    (void)ws;
    const __m256 s = _mm256_set1_ps(sa);
    q8_emit_half(c.lo, sw, s, dst, lanes);
    q8_emit_half(c.hi, sw + 8, s, dst + 8, lanes - 8);
}
#endif

#ifdef Q8_V
/* Accumulator c of row b and panel q of the tile, out, if the tile has them. */
#define Q8_EMIT(c, b, q)                                                                    \
    do {                                                                                    \
        if ((b) < o->nb && (q) < o->np)                                                     \
            q8_emit(c, o->ws[q], scale + o->col[q], o->sa[b], o->dst[b] + o->col[q],        \
                    o->lanes[q]);                                                           \
    } while (0)
#endif

#if Q8_ISA == 2
/* Tiles: Q8_TR rows by Q8_TP panels, or one row by Q8_TP1 panels (32 vector registers). */
#define Q8_TR 4
#define Q8_TP 4
#define Q8_TP1 8
/* 4 rows x 4 panels. */
static void q8_kernel_rows(const q8_act *const *a, int64_t Kp, const int8_t *const *w,
                           const float *scale, const q8_out *o) {
    Q8_V c00 = Q8_ZERO, c01 = Q8_ZERO, c02 = Q8_ZERO, c03 = Q8_ZERO;
    Q8_V c10 = Q8_ZERO, c11 = Q8_ZERO, c12 = Q8_ZERO, c13 = Q8_ZERO;
    Q8_V c20 = Q8_ZERO, c21 = Q8_ZERO, c22 = Q8_ZERO, c23 = Q8_ZERO;
    Q8_V c30 = Q8_ZERO, c31 = Q8_ZERO, c32 = Q8_ZERO, c33 = Q8_ZERO;
    const q8_act *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
    const int8_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    for (int64_t k = 0; k < Kp; k += 4) {
        Q8_V v0 = Q8_LOAD(w0 + k * 16), v1 = Q8_LOAD(w1 + k * 16);
        Q8_V v2 = Q8_LOAD(w2 + k * 16), v3 = Q8_LOAD(w3 + k * 16);
        Q8_PIN(v0); Q8_PIN(v1); Q8_PIN(v2); Q8_PIN(v3);
        Q8_V b = q8_bcast(a0 + k);
        Q8_DOT(c00, b, v0); Q8_DOT(c01, b, v1); Q8_DOT(c02, b, v2); Q8_DOT(c03, b, v3);
        b = q8_bcast(a1 + k);
        Q8_DOT(c10, b, v0); Q8_DOT(c11, b, v1); Q8_DOT(c12, b, v2); Q8_DOT(c13, b, v3);
        b = q8_bcast(a2 + k);
        Q8_DOT(c20, b, v0); Q8_DOT(c21, b, v1); Q8_DOT(c22, b, v2); Q8_DOT(c23, b, v3);
        b = q8_bcast(a3 + k);
        Q8_DOT(c30, b, v0); Q8_DOT(c31, b, v1); Q8_DOT(c32, b, v2); Q8_DOT(c33, b, v3);
    }
    Q8_EMIT(c00, 0, 0); Q8_EMIT(c01, 0, 1); Q8_EMIT(c02, 0, 2); Q8_EMIT(c03, 0, 3);
    Q8_EMIT(c10, 1, 0); Q8_EMIT(c11, 1, 1); Q8_EMIT(c12, 1, 2); Q8_EMIT(c13, 1, 3);
    Q8_EMIT(c20, 2, 0); Q8_EMIT(c21, 2, 1); Q8_EMIT(c22, 2, 2); Q8_EMIT(c23, 2, 3);
    Q8_EMIT(c30, 3, 0); Q8_EMIT(c31, 3, 1); Q8_EMIT(c32, 3, 2); Q8_EMIT(c33, 3, 3);
}

/* One row by the tile's panels, one panel at a time: 8 accumulators over consecutive groups of
 * k keep the products independent, and each panel is read as one stream. With one row the
 * weights come from L2 at its bandwidth; eight panels side by side, one accumulator each (eight
 * streams 4 KiB apart at K = 256) took 1.40 us against 1.21 for one thread's half of a
 * (1024, 256) matrix (2-core Zen 4, the two alternating in one process). The int32 sums are
 * the same in any order. */
static void q8_kernel_row(const q8_act *a0, int64_t Kp, const int8_t *const *w,
                          const float *scale, const q8_out *o) {
    for (int q = 0; q < o->np; q++) {
        const int8_t *p = w[q];
        Q8_V c0 = Q8_ZERO, c1 = Q8_ZERO, c2 = Q8_ZERO, c3 = Q8_ZERO;
        Q8_V c4 = Q8_ZERO, c5 = Q8_ZERO, c6 = Q8_ZERO, c7 = Q8_ZERO;
        int64_t k = 0;
        for (; k + 32 <= Kp; k += 32) {
            Q8_DOT(c0, q8_bcast(a0 + k), Q8_LOAD(p + k * 16));
            Q8_DOT(c1, q8_bcast(a0 + k + 4), Q8_LOAD(p + (k + 4) * 16));
            Q8_DOT(c2, q8_bcast(a0 + k + 8), Q8_LOAD(p + (k + 8) * 16));
            Q8_DOT(c3, q8_bcast(a0 + k + 12), Q8_LOAD(p + (k + 12) * 16));
            Q8_DOT(c4, q8_bcast(a0 + k + 16), Q8_LOAD(p + (k + 16) * 16));
            Q8_DOT(c5, q8_bcast(a0 + k + 20), Q8_LOAD(p + (k + 20) * 16));
            Q8_DOT(c6, q8_bcast(a0 + k + 24), Q8_LOAD(p + (k + 24) * 16));
            Q8_DOT(c7, q8_bcast(a0 + k + 28), Q8_LOAD(p + (k + 28) * 16));
            /* Each accumulator stays in its register (else gcc copies every one of them twice
             * an iteration). */
            __asm__("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5), "+v"(c6),
                    "+v"(c7));
        }
        for (; k < Kp; k += 4) Q8_DOT(c0, q8_bcast(a0 + k), Q8_LOAD(p + k * 16));
        c0 = _mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3));
        c4 = _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7));
        Q8_EMIT(_mm512_add_epi32(c0, c4), 0, q);
    }
}
#elif Q8_ISA == 1
/* AVX2, several rows: Q8_TR rows by one panel, in two passes over k of half a panel (8
 * weight rows) each: a pass widens its half's 32 bytes of a group into two int16 vectors of 4
 * rows x 4 columns, and multiplies each row's 4 activations (one 64-bit broadcast) with both,
 * so lane pair (2i, 2i + 1) of a product holds row i's two column pairs, added at the end.
 * 8 accumulators, 2 weights and a broadcast: 11 of the 16 registers. */
#define Q8_TR 4
#define Q8_TP 1
#define Q8_TP1 4
static inline __attribute__((always_inline)) __m256i q8_w16(const int8_t *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}
static inline __attribute__((always_inline)) __m256i q8_a16(const int16_t *a) {
    int64_t a4;
    memcpy(&a4, a, 8);
    return _mm256_set1_epi64x(a4);
}
#define Q8_MADD(c, a, w) c = _mm256_add_epi32(c, _mm256_madd_epi16(a, w))
/* The 8 row sums of a half panel: x holds rows 0-3's pairs, y rows 4-7's. */
static inline __attribute__((always_inline)) __m256i q8_pairs(__m256i x, __m256i y) {
    return _mm256_permute4x64_epi64(_mm256_hadd_epi32(x, y), _MM_SHUFFLE(3, 1, 2, 0));
}
/* Four rows (four) or two by one panel; always inlined with a constant `four`, so that each
 * instance keeps only its own accumulators. */
static inline __attribute__((always_inline)) void
q8_rows_panel(const q8_act *const *a, int64_t Kp, const int8_t *const *w, const float *scale,
              const q8_out *o, const int four) {
    const int16_t *a0 = a[0], *a1 = a[1], *a2 = four ? a[2] : a0, *a3 = four ? a[3] : a0;
    for (int h = 0; h < 2; h++) {
        const int8_t *w0 = w[0] + h * 32;
        __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00;
        __m256i c20 = c00, c21 = c00, c30 = c00, c31 = c00;
        for (int64_t k = 0; k < Kp; k += 4) {
            const __m256i v0 = q8_w16(w0 + k * 16), v1 = q8_w16(w0 + k * 16 + 16);
            __m256i b = q8_a16(a0 + k);
            Q8_MADD(c00, b, v0); Q8_MADD(c01, b, v1);
            b = q8_a16(a1 + k);
            Q8_MADD(c10, b, v0); Q8_MADD(c11, b, v1);
            if (four) {
                b = q8_a16(a2 + k);
                Q8_MADD(c20, b, v0); Q8_MADD(c21, b, v1);
                b = q8_a16(a3 + k);
                Q8_MADD(c30, b, v0); Q8_MADD(c31, b, v1);
                /* Each accumulator stays in its register (else the compiler copies them
                 * around and spills one every iteration). */
                __asm__("" : "+x"(c00), "+x"(c01), "+x"(c10), "+x"(c11), "+x"(c20), "+x"(c21),
                        "+x"(c30), "+x"(c31));
            }
        }
        /* Each half out at once: kept for the second pass, they took registers it needs. */
        const __m256i r[4] = {q8_pairs(c00, c01), q8_pairs(c10, c11), q8_pairs(c20, c21),
                              q8_pairs(c30, c31)};
        const float *sw = scale + o->col[0] + 8 * h;
        for (int b = 0; b < o->nb && b < (four ? 4 : 2); b++)
            q8_emit_half(r[b], sw, _mm256_set1_ps(o->sa[b]), o->dst[b] + o->col[0] + 8 * h,
                         o->lanes[0] - 8 * h);
    }
}

static void q8_kernel_rows(const q8_act *const *a, int64_t Kp, const int8_t *const *w,
                           const float *scale, const q8_out *o) {
    q8_rows_panel(a, Kp, w, scale, o, 1);
}

/* Two rows by one panel (a 4-row tile would spend half its work on repeats). */
#define Q8_ROWS2 1
static void q8_kernel_rows2(const q8_act *const *a, int64_t Kp, const int8_t *const *w,
                            const float *scale, const q8_out *o) {
    q8_rows_panel(a, Kp, w, scale, o, 0);
}

/* One row by 4 panels, through vpmaddubsw with the sign trick (above), its activations
 * narrowed back to bytes (exactly: all within [-127, 127]) Q8_ROW_CHUNK at a time. */
#define Q8_ROW_CHUNK 1024
static void q8_kernel_row(const q8_act *a0, int64_t Kp, const int8_t *const *w,
                          const float *scale, const q8_out *o) {
    Q8_V c0 = Q8_ZERO, c1 = Q8_ZERO, c2 = Q8_ZERO, c3 = Q8_ZERO;
    const int8_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    int8_t a8[Q8_ROW_CHUNK];
    for (int64_t k0 = 0; k0 < Kp; k0 += Q8_ROW_CHUNK) {
        const int64_t n = Kp - k0 < Q8_ROW_CHUNK ? Kp - k0 : Q8_ROW_CHUNK;
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            const __m128i lo = _mm_loadu_si128((const __m128i *)(a0 + k0 + i));
            const __m128i hi = _mm_loadu_si128((const __m128i *)(a0 + k0 + i + 8));
            _mm_storeu_si128((__m128i *)(a8 + i), _mm_packs_epi16(lo, hi));
        }
        for (; i < n; i++) a8[i] = (int8_t)a0[k0 + i];
        for (int64_t k = 0; k < n; k += 4) {
            const int64_t kw = (k0 + k) * 16;
            const Q8_V b = q8_bcast(a8 + k);
            Q8_DOT(c0, b, Q8_LOAD(w0 + kw)); Q8_DOT(c1, b, Q8_LOAD(w1 + kw));
            Q8_DOT(c2, b, Q8_LOAD(w2 + kw)); Q8_DOT(c3, b, Q8_LOAD(w3 + kw));
        }
    }
    Q8_EMIT(c0, 0, 0); Q8_EMIT(c1, 0, 1); Q8_EMIT(c2, 0, 2); Q8_EMIT(c3, 0, 3);
}
#else
#define Q8_TR 4
#define Q8_TP 4
#define Q8_TP1 8
#endif
_Static_assert(Q8_TR <= 4 && Q8_TP <= Q8_TP1 && Q8_TP1 <= 8, "q8_out holds 4 rows, 8 panels");

/* The tile of q8_out o: its rows from qa (stride Kp) by its panels from w, the same floats on
 * every path. */
static void q8_tile(const q8_act *qa, int64_t Kp, const int8_t *w, const float *scale,
                    const q8_out *o) {
#ifdef Q8_V
    const q8_act *rows[Q8_TR];
    const int8_t *panels[Q8_TP1];
    for (int b = 0; b < Q8_TR; b++) rows[b] = qa + (b < o->nb ? b : 0) * Kp;
    for (int p = 0; p < Q8_TP1; p++) panels[p] = w + (p < o->np ? p : 0) * Kp * 16;
    if (o->nb == 1)
        q8_kernel_row(rows[0], Kp, panels, scale, o);
#ifdef Q8_ROWS2
    else if (o->nb == 2)
        q8_kernel_rows2(rows, Kp, panels, scale, o);
#endif
    else
        q8_kernel_rows(rows, Kp, panels, scale, o);
#else
    for (int b = 0; b < o->nb; b++)
        for (int p = 0; p < o->np; p++) {
            int32_t s[16] = {0};
            const q8_act *a = qa + b * Kp;
            const int8_t *panel = w + p * Kp * 16;
            for (int64_t k = 0; k < Kp; k += 4)
                for (int r = 0; r < 16; r++)
                    for (int i = 0; i < 4; i++)
                        s[r] += (int32_t)a[k + i] * (int32_t)panel[k * 16 + r * 4 + i];
            const float *sw = scale + o->col[p];
            float *dst = o->dst[b] + o->col[p];
            for (int i = 0; i < o->lanes[p]; i++) dst[i] = (float)s[i] * (sw[i] * o->sa[b]);
        }
#endif
}

/* z[b, g H + j] = sw[g H + j] sa[b] sum_k qw qa for b < n rows of qa (scales sa) and the units
 * j in [j0, j1) of every gate (j0 a multiple of 16): the int8 product of rows and matrix m,
 * written into z (row stride ldz). */
static void q8_product(int64_t n, const q8_act *qa, const float *sa, const nl_q8_matrix *m,
                       int64_t j0, int64_t j1, float *z, int64_t ldz) {
    const int64_t Kp = q8_kp(m->K), gates = m->gates, H = m->H;
    const int64_t p0 = j0 / 16 * gates, p1 = q8_blocks(j1) * gates;
    q8_out o;
    for (int64_t b = 0; b < n; b += o.nb) {
        o.nb = (int)(n - b < Q8_TR ? n - b : Q8_TR);
#ifdef Q8_ROWS2
        /* Three rows as two and one: a 4-row tile would repeat one. */
        if (o.nb == 3) o.nb = 2;
#endif
        for (int i = 0; i < o.nb; i++) {
            o.dst[i] = z + (b + i) * ldz;
            o.sa[i] = sa[b + i];
        }
        const int64_t step = o.nb == 1 ? Q8_TP1 : Q8_TP;
        /* Panel p is gate g of unit block u (p = u gates + g). */
        int64_t u = j0 / 16, g = 0;
        for (int64_t p = p0; p < p1; p += step) {
            o.np = (int)(p1 - p < step ? p1 - p : step);
            for (int q = 0; q < o.np; q++) {
                const int64_t jb = u * 16, je = jb + 16 < j1 ? jb + 16 : j1;
                o.col[q] = g * H + jb;
                o.lanes[q] = (int)(je - jb);
                o.ws[q] = m->wsum + (p + q) * 16;
                if (++g == gates) g = 0, u++;
            }
            q8_tile(qa + b * Kp, Kp, m->w + p * Kp * 16, m->scale, &o);
        }
    }
}

/* Whether m fits a product with K columns into gates * H outputs. */
static int q8_matrix_ok(const nl_q8_matrix *m, int64_t gates, int64_t H, int64_t K) {
    return m->w && m->wsum && m->scale && m->gates == gates && m->H == H && m->K == K &&
           nl_q8_packed_size(gates, H, K) > 0;
}

/* Rows of x a thread quantizes at a time in nl_q8_linear (its own copy: no barrier). */
#define Q8_CHUNK 64

/* out (n, gates * H) = x (n, K) W^T (+ bias): the int8 product of every row with the whole
 * matrix (a layer's input side, all steps at once), the units split over nthreads threads.
 * Each thread quantizes the rows itself, a chunk at a time (a K-th of its products), so the
 * threads never wait for each other: on a busy machine a barrier can cost a time slice.
 * 0, -2 for bad sizes, -4 for a missing tensor, -6 out of memory. */
int64_t nl_q8_linear(int64_t n, const float *x, const nl_q8_matrix *m, const float *bias,
                     float *out, int64_t nthreads) {
    if (!x || !m || !out) return -4;
    if (n < 0 || !q8_matrix_ok(m, m->gates, m->H, m->K)) return -2;
    if (n == 0) return 0;
    const int64_t Kp = q8_kp(m->K), GW = m->gates * m->H, K = m->K;
    nthreads = sane_threads(nthreads);
    const int64_t act = Q8_CHUNK * Kp * (int64_t)sizeof(q8_act);
    const int64_t per = (act + Q8_CHUNK * (int64_t)sizeof(float) + 63) / 64 * 64;
    int8_t *scratch = malloc((size_t)(nthreads * per));
    if (!scratch) return -6;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int64_t tid = 0, j0, j1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        split_units(m->H, &j0, &j1);
        q8_act *qa = (q8_act *)(scratch + tid * per);
        float *sa = (float *)(scratch + tid * per + act);
        for (int64_t r = 0; r < n && j1 > j0; r += Q8_CHUNK) {
            const int64_t rows = n - r < Q8_CHUNK ? n - r : Q8_CHUNK;
            q8_quantize_rows(rows, x + r * K, K, K, qa, sa);
            q8_product(rows, qa, sa, m, j0, j1, out + r * GW, GW);
            if (!bias) continue;
            for (int64_t i = r; i < r + rows; i++)
                for (int64_t g = 0; g < m->gates; g++)
#pragma omp simd
                    for (int64_t j = j0; j < j1; j++)
                        out[i * GW + g * m->H + j] += bias[g * m->H + j];
        }
    }
    free(scratch);
    return 0;
}
