/* Linear layers over quantized weights on CPU: y[m, n] = bias[n] + sum_k x[m, k] * w[n, k],
 * with w de-quantized on the fly from GGUF blocks (Q8_0, Q4_0, Q4_1) and x in float32.
 *
 * Built at run time by engine/kernels (cc -O3 -march=native -fopenmp -std=c11) and called
 * through ctypes. Needs AVX2, FMA and F16C (pd_quant_available() says; the Python side keeps
 * float weights where it returns 0).
 *
 * Why: at decode's few rows a linear layer streams its weights from memory once per step, so
 * its time is the weights' bytes over the memory bandwidth. GGUF Q4_1 is 5 bits per weight and
 * Q8_0 8.5, against float32's 32: the same product reads 6.4x / 3.8x fewer bytes.
 *
 * Exactness (the invariant the tests hold): each weight is de-quantized to the float32 value
 * gguf's reference de-quantization gives (Q8_0: d * q; Q4_0: d * (q - 8); Q4_1: d * q + m, a
 * multiply then an add, never fused: this file is compiled without FP contraction and every
 * FMA below is explicit), and each output column is summed in the order of the float32 kernel
 * (linear.c): y starts at the bias (or 0) and takes one fused multiply-add per k, in k order. So
 * the result is bit for bit what linear.c computes from the de-quantized weights.
 *
 * Layout (pd_quant_pack): panels of 16 output columns; for each block of 32 k, the 16 columns'
 * scales as float16 (then, for Q4_1, their minimums), then 32 k-rows of the 16 columns' quants:
 * 16 int8 per k-row for Q8_0, 8 bytes for Q4_x (byte j: column j in the low nibble, column j + 8
 * in the high one). The last panel is padded with zero scales and quants (weights 0).
 *
 * Work: threads split (panels, row chunk) items as linear.c does. Up to FUSED_MAX_ROWS rows go in
 * chunks of at most 4 rows that de-quantize each k-row into registers and multiply at once, in
 * one pass over K (at 1-2 rows an item spans 2-4 panels, so that several independent FMA chains
 * are in flight); more rows de-quantize a K slice of the panel into a float tile in cache and run
 * linear.c's register tiling over it, so prefill pays the de-quantization once per slice. At 9 to
 * 24 rows on AVX2 the de-quantization costs about what the smaller weight stream saves (see
 * BENCHMARKS.md): with float32 activations, decode at small batches is where this kernel wins.
 */
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

enum { FMT_Q8_0 = 0, FMT_Q4_0 = 1, FMT_Q4_1 = 2 };

#define PANEL 16
#define QK 32 /* weights per block along k */

/* Bytes of one (panel, k-block) record, and of one GGUF block (one row, 32 weights). */
static int64_t record_bytes(int fmt) {
    switch (fmt) {
        case FMT_Q8_0: return PANEL * 2 + QK * PANEL;
        case FMT_Q4_0: return PANEL * 2 + QK * PANEL / 2;
        case FMT_Q4_1: return PANEL * 4 + QK * PANEL / 2;
        default: return 0;
    }
}

static int64_t gguf_block_bytes(int fmt) {
    switch (fmt) {
        case FMT_Q8_0: return 2 + QK;
        case FMT_Q4_0: return 2 + QK / 2;
        case FMT_Q4_1: return 4 + QK / 2;
        default: return 0;
    }
}

int64_t pd_quant_record_bytes(int fmt) { return record_bytes(fmt); }

/* out: (ceil(N / 16) panels) x (K / 32 records) from GGUF rows (N rows of K / 32 blocks).
 * Returns 0, or 1 on bad arguments. */
int pd_quant_pack(int fmt, const uint8_t *rows, int64_t N, int64_t K, uint8_t *out) {
    int64_t rb = record_bytes(fmt), gb = gguf_block_bytes(fmt);
    if (!rb || N <= 0 || K <= 0 || K % QK) return 1;
    int64_t panels = (N + PANEL - 1) / PANEL, blocks = K / QK;
    int scales = fmt == FMT_Q4_1 ? 2 : 1;
    memset(out, 0, (size_t)(panels * blocks * rb));
    for (int64_t p = 0; p < panels; p++)
        for (int64_t b = 0; b < blocks; b++) {
            uint8_t *rec = out + (p * blocks + b) * rb;
            uint8_t *quants = rec + scales * PANEL * 2;
            for (int j = 0; j < PANEL; j++) {
                int64_t n = p * PANEL + j;
                if (n >= N) break;
                const uint8_t *blk = rows + (n * blocks + b) * gb;
                memcpy(rec + j * 2, blk, 2); /* d */
                if (fmt == FMT_Q4_1) memcpy(rec + PANEL * 2 + j * 2, blk + 2, 2); /* m */
                const uint8_t *qs = blk + 2 * scales;
                for (int k = 0; k < QK; k++) {
                    if (fmt == FMT_Q8_0) {
                        quants[k * PANEL + j] = qs[k];
                    } else { /* weight k: low nibble of byte k (k < 16), else high of k - 16 */
                        uint8_t q = k < 16 ? qs[k] & 0x0F : qs[k - 16] >> 4;
                        uint8_t *byte = quants + k * (PANEL / 2) + (j & 7);
                        *byte |= (uint8_t)(j < 8 ? q : q << 4);
                    }
                }
            }
        }
    return 0;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

int pd_quant_available(void) { return 1; }

#define MR 6
#ifndef FUSED_MAX_ROWS
#define FUSED_MAX_ROWS 8
#endif
#define SHORT_BLOCKS 2 /* k-blocks per slice at few rows (64 k), as linear.c's SHORT_KC */
#define LONG_BLOCKS 32 /* 1,024 k for prefill; its float tile (64 KB) stays in L2 */
#define PREFETCH_RECORDS 4

typedef struct {
    __m256 d0, d1, m0, m1;
} scales;

static inline __attribute__((always_inline)) scales load_scales(int fmt, const uint8_t *rec) {
    scales s;
    s.d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)rec));
    s.d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 16)));
    if (fmt == FMT_Q4_1) {
        s.m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 32)));
        s.m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 48)));
    } else {
        s.m0 = s.m1 = _mm256_setzero_ps();
    }
    return s;
}

/* The 16 columns' weights at k-row k of a record (quants: the record's quants). */
static inline __attribute__((always_inline)) void dequant(int fmt, const uint8_t *quants, int k,
                                                          const scales *s, __m256 *w0,
                                                          __m256 *w1) {
    if (fmt == FMT_Q8_0) {
        __m128i q = _mm_loadu_si128((const __m128i *)(quants + k * PANEL));
        __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
        __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
        *w0 = _mm256_mul_ps(lo, s->d0);
        *w1 = _mm256_mul_ps(hi, s->d1);
        return;
    }
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(quants + k * 8)));
    __m256i lo = _mm256_and_si256(v, _mm256_set1_epi32(0x0F));
    __m256i hi = _mm256_srli_epi32(v, 4);
    if (fmt == FMT_Q4_0) {
        lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(8));
        hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(8));
        *w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(lo), s->d0);
        *w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(hi), s->d1);
    } else {
        *w0 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(lo), s->d0), s->m0);
        *w1 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hi), s->d1), s->m1);
    }
}

static inline __m256i lane_mask(int cols) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* GROUP panels side by side at one to four rows: registers for rows x GROUP x 2 accumulators. */
#define GROUP(rows) ((rows) == 1 ? 4 : (rows) == 2 ? 2 : 1)

/* rows (<= 4) x (g x 16) columns of y = bias + x[rows, :] . panels p .. p + g, one pass over K
 * with the accumulators in registers throughout; `cols` valid columns in the group's last panel.
 * Several panels at one row keep several independent FMA chains in flight (each column's own
 * chain must stay in k order, see the top of the file). */
static inline __attribute__((always_inline)) void fused(const int fmt, const float *x,
                                                        int64_t ldx, const uint8_t *panel,
                                                        int64_t rb, int64_t blocks, float *y,
                                                        int64_t ldy, const float *bias,
                                                        int cols, const int rows, const int g) {
    __m256 a0[4][4], a1[4][4]; /* [panel][row] */
    __m256i full = _mm256_set1_epi32(-1);
    int64_t pstride = blocks * rb;
#pragma GCC unroll 4
    for (int j = 0; j < g; j++)
#pragma GCC unroll 4
        for (int i = 0; i < rows; i++) {
            a0[j][i] = bias ? _mm256_loadu_ps(bias + j * PANEL) : _mm256_setzero_ps();
            a1[j][i] = bias ? _mm256_loadu_ps(bias + j * PANEL + 8) : _mm256_setzero_ps();
        }
    const int scale_bytes = fmt == FMT_Q4_1 ? 4 * PANEL : 2 * PANEL;
    for (int64_t b = 0; b < blocks; b++) {
        scales s[4];
#pragma GCC unroll 4
        for (int j = 0; j < g; j++) {
            const uint8_t *rec = panel + j * pstride + b * rb;
            for (int64_t off = 0; off < rb; off += 64)
                _mm_prefetch((const char *)(rec + PREFETCH_RECORDS * rb + off), _MM_HINT_T1);
            s[j] = load_scales(fmt, rec);
        }
        const float *xk = x + b * QK;
#pragma GCC unroll 2
        for (int k = 0; k < QK; k++) {
#pragma GCC unroll 4
            for (int j = 0; j < g; j++) {
                __m256 w0, w1;
                dequant(fmt, panel + j * pstride + b * rb + scale_bytes, k, &s[j], &w0, &w1);
#pragma GCC unroll 4
                for (int i = 0; i < rows; i++) {
                    __m256 xb = _mm256_broadcast_ss(xk + i * ldx + k);
                    a0[j][i] = _mm256_fmadd_ps(xb, w0, a0[j][i]);
                    a1[j][i] = _mm256_fmadd_ps(xb, w1, a1[j][i]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < g; j++) {
        __m256i m0 = j == g - 1 ? lane_mask(cols) : full;
        __m256i m1 = j == g - 1 ? lane_mask(cols - 8) : full;
#pragma GCC unroll 4
        for (int i = 0; i < rows; i++) {
            _mm256_maskstore_ps(y + i * ldy + j * PANEL, m0, a0[j][i]);
            _mm256_maskstore_ps(y + i * ldy + j * PANEL + 8, m1, a1[j][i]);
        }
    }
}

/* rows (<= MR) x 16 columns of y (+)= x[rows, k0..k1] . tile (float, (k1 - k0) x 16): y starts
 * at the bias (or 0) when first, else at what y holds. */
static inline __attribute__((always_inline)) void tiled(const float *x, int64_t ldx,
                                                        const float *tile, int64_t k0,
                                                        int64_t k1, float *y, int64_t ldy,
                                                        const float *bias, int first, int cols,
                                                        const int rows) {
    __m256 a0[MR], a1[MR];
    __m256i m0 = lane_mask(cols), m1 = lane_mask(cols - 8);
#pragma GCC unroll 6
    for (int i = 0; i < rows; i++) {
        if (!first) {
            a0[i] = _mm256_maskload_ps(y + i * ldy, m0);
            a1[i] = _mm256_maskload_ps(y + i * ldy + 8, m1);
        } else if (bias) {
            a0[i] = _mm256_loadu_ps(bias);
            a1[i] = _mm256_loadu_ps(bias + 8);
        } else {
            a0[i] = a1[i] = _mm256_setzero_ps();
        }
    }
    for (int64_t k = k0; k < k1; k++) {
        const float *w = tile + (k - k0) * PANEL;
        __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
#pragma GCC unroll 6
        for (int i = 0; i < rows; i++) {
            __m256 xb = _mm256_broadcast_ss(x + i * ldx + k);
            a0[i] = _mm256_fmadd_ps(xb, w0, a0[i]);
            a1[i] = _mm256_fmadd_ps(xb, w1, a1[i]);
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < rows; i++) {
        _mm256_maskstore_ps(y + i * ldy, m0, a0[i]);
        _mm256_maskstore_ps(y + i * ldy + 8, m1, a1[i]);
    }
}

#define TILED(r)                                                                              \
    tiled(x + m * ldx, ldx, tile, b0 * QK, b1 * QK, y + m * ldy, ldy, bias, first, cols, r)

/* Rows 0 .. rows of one panel (cols valid columns; x, y and bias at its first row / column),
 * more than 4 rows: K slices de-quantized into a float tile, then register tiles of MR rows. */
static inline __attribute__((always_inline)) void tiled_panel(const int fmt, const float *x,
                                                              int64_t ldx, const uint8_t *panel,
                                                              int64_t rb, const float *bias,
                                                              float *y, int64_t ldy,
                                                              int64_t rows, int64_t blocks,
                                                              int cols) {
    float tile[LONG_BLOCKS * QK * PANEL]; /* 64 KB on the thread's stack, in L2 */
    int64_t step = rows <= 3 * MR ? SHORT_BLOCKS : LONG_BLOCKS;
    const int scale_bytes = fmt == FMT_Q4_1 ? 4 * PANEL : 2 * PANEL;
    for (int64_t b0 = 0; b0 < blocks; b0 += step) {
        int64_t b1 = b0 + step < blocks ? b0 + step : blocks;
        int first = b0 == 0;
        for (int64_t b = b0; b < b1; b++) { /* the slice as floats: k-rows of 16 columns */
            const uint8_t *rec = panel + b * rb;
            scales s = load_scales(fmt, rec);
            float *t = tile + (b - b0) * QK * PANEL;
            for (int k = 0; k < QK; k++) {
                __m256 w0, w1;
                dequant(fmt, rec + scale_bytes, k, &s, &w0, &w1);
                _mm256_storeu_ps(t + k * PANEL, w0);
                _mm256_storeu_ps(t + k * PANEL + 8, w1);
            }
        }
        int64_t m = 0;
        for (; m + MR <= rows; m += MR) TILED(MR);
        switch (rows - m) {
            case 5: TILED(5); break;
            case 4: TILED(4); break;
            case 3: TILED(3); break;
            case 2: TILED(2); break;
            case 1: TILED(1); break;
            default: break;
        }
    }
}

/* One work item: rows [m_begin, m_end) of g panels from panel p. */
static inline __attribute__((always_inline)) void item(const int fmt, const float *x,
                                                       int64_t ldx, const uint8_t *packed,
                                                       const float *bias, float *y, int64_t ldy,
                                                       int64_t m_begin, int64_t m_end, int64_t p,
                                                       int g, int64_t K, int64_t N) {
    int64_t rb = record_bytes(fmt), blocks = K / QK, n = p * PANEL;
    int64_t width = N - n < g * PANEL ? N - n : g * PANEL;
    int cols = (int)(width - (g - 1) * PANEL); /* valid columns of the last panel */
    float padded[4 * PANEL] = {0};
    const float *b = 0;
    if (bias) {
        memcpy(padded, bias + n, (size_t)width * sizeof(float));
        b = padded;
    }
    const uint8_t *panel = packed + p * blocks * rb;
    x += m_begin * ldx;
    y += m_begin * ldy + n;
    switch (m_end - m_begin) {
        case 1:
            if (g == 4) fused(fmt, x, ldx, panel, rb, blocks, y, ldy, b, cols, 1, 4);
            else fused(fmt, x, ldx, panel, rb, blocks, y, ldy, b, cols, 1, 1);
            break;
        case 2:
            if (g == 2) fused(fmt, x, ldx, panel, rb, blocks, y, ldy, b, cols, 2, 2);
            else fused(fmt, x, ldx, panel, rb, blocks, y, ldy, b, cols, 2, 1);
            break;
        case 3: fused(fmt, x, ldx, panel, rb, blocks, y, ldy, b, cols, 3, 1); break;
        case 4: fused(fmt, x, ldx, panel, rb, blocks, y, ldy, b, cols, 4, 1); break;
        default: tiled_panel(fmt, x, ldx, panel, rb, b, y, ldy, m_end - m_begin, blocks, cols);
    }
}

static void item_q8_0(const float *x, int64_t ldx, const uint8_t *packed, const float *bias,
                      float *y, int64_t ldy, int64_t m0, int64_t m1, int64_t p, int g,
                      int64_t K, int64_t N) {
    item(FMT_Q8_0, x, ldx, packed, bias, y, ldy, m0, m1, p, g, K, N);
}
static void item_q4_0(const float *x, int64_t ldx, const uint8_t *packed, const float *bias,
                      float *y, int64_t ldy, int64_t m0, int64_t m1, int64_t p, int g,
                      int64_t K, int64_t N) {
    item(FMT_Q4_0, x, ldx, packed, bias, y, ldy, m0, m1, p, g, K, N);
}
static void item_q4_1(const float *x, int64_t ldx, const uint8_t *packed, const float *bias,
                      float *y, int64_t ldy, int64_t m0, int64_t m1, int64_t p, int g,
                      int64_t K, int64_t N) {
    item(FMT_Q4_1, x, ldx, packed, bias, y, ldy, m0, m1, p, g, K, N);
}

/* y (M, N; row stride ldy) = x (M, K; row stride ldx) . W^T + bias, W packed by pd_quant_pack.
 * Threads: the calling thread's OpenMP setting. Returns 0, or 1 on bad arguments. */
int pd_quant_linear(int fmt, const float *x, int64_t ldx, const uint8_t *packed,
                    const float *bias, float *y, int64_t ldy, int64_t M, int64_t K, int64_t N) {
    if (!record_bytes(fmt) || M <= 0 || K <= 0 || N <= 0 || K % QK || ldx < K || ldy < N)
        return 1;
    void (*run)(const float *, int64_t, const uint8_t *, const float *, float *, int64_t,
                int64_t, int64_t, int64_t, int, int64_t, int64_t) =
        fmt == FMT_Q8_0 ? item_q8_0 : fmt == FMT_Q4_0 ? item_q4_0 : item_q4_1;
#ifdef _OPENMP
    int team = omp_get_max_threads();
#else
    int team = 1;
#endif
    int64_t panels = (N + PANEL - 1) / PANEL;
    int g = M <= 4 ? GROUP(M) : 1; /* panels per item; the tail beyond full groups goes singly */
    int64_t groups = panels / g, singles = panels - groups * g;
    int64_t chunks = 1, chunk_rows;
    if (M <= FUSED_MAX_ROWS) { /* chunks of at most 4 rows, each fused */
        chunks = (M + 3) / 4;
        chunk_rows = 4;
    } else { /* as linear.c: enough items for every thread, few weight re-reads */
        int64_t tiles = (M + MR - 1) / MR;
        while ((groups + singles) * chunks < 4 * (int64_t)team && chunks < tiles) chunks++;
        chunk_rows = (tiles + chunks - 1) / chunks * MR;
    }
#pragma omp parallel for schedule(static) if (team > 1)
    for (int64_t it = 0; it < (groups + singles) * chunks; it++) {
        int64_t u = it / chunks, c = it % chunks;
        int64_t m_begin = c * chunk_rows;
        int64_t m_end = m_begin + chunk_rows < M ? m_begin + chunk_rows : M;
        if (m_begin >= m_end) continue;
        if (u < groups) run(x, ldx, packed, bias, y, ldy, m_begin, m_end, u * g, g, K, N);
        else run(x, ldx, packed, bias, y, ldy, m_begin, m_end, groups * g + (u - groups), 1, K, N);
    }
    return 0;
}

#else /* no AVX2 + FMA + F16C: the Python side keeps float weights */

int pd_quant_available(void) { return 0; }

int pd_quant_linear(int fmt, const float *x, int64_t ldx, const uint8_t *packed,
                    const float *bias, float *y, int64_t ldy, int64_t M, int64_t K, int64_t N) {
    (void)fmt, (void)x, (void)ldx, (void)packed, (void)bias, (void)y, (void)ldy;
    (void)M, (void)K, (void)N;
    return 2;
}

#endif
