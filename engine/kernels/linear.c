/* Linear layers in float32 on CPU: y[m, n] = bias[n] + sum_k x[m, k] * w[n, k].
 *
 * Built at run time by engine/kernels (cc -O3 -march=native -fopenmp) and called through ctypes.
 * Why not MKL or oneDNN: at the row counts of decode (1-64 rows against weights of megabytes)
 * the product streams the weights from memory once and does little arithmetic on each byte; the
 * libraries' kernels stall on that stream (oneDNN at 24 rows ran at half the machine's peak
 * here). This kernel software-prefetches the weight stream ahead of the arithmetic, which keeps
 * it near the memory bound at a few rows and near the arithmetic peak at many (it matches MKL on
 * 2,048-row prefill chunks, so one kernel serves both tiers).
 *
 * Weights are packed once (pd_linear_pack): panels of PANEL output columns, each panel K rows of
 * PANEL floats (k-major), the last panel zero-padded. A micro-kernel keeps MR rows x PANEL
 * columns of y in 2 * MR vector registers and, for each k, loads two weight vectors and
 * broadcasts MR values of x. K is cut into slices so a panel slice stays in cache while every
 * row tile of x passes over it: short slices (SHORT_KC) at decode's few row tiles, so that the
 * tiles that reuse a slice from cache alternate quickly with the one that streams the next slice
 * from memory (with weights out of cache, 24 rows took 31 instead of 40 ms per step of the
 * default model); long ones (LONG_KC) for prefill, where reloading the accumulators per slice
 * would cost more. Threads split panels (and row tiles when there are few panels per thread).
 *
 * Vectors: AVX-512 intrinsics where the CPU has them (12 x 32 tiles, 24 of 32 registers), else
 * the compiler's generic vectors, 8 floats wide on x86 with AVX (AVX2 machines: 6 x 16 tiles in
 * 12 of 16 registers; 1.1-1.6x faster than oneDNN limited to AVX2 here) and 4 wide elsewhere
 * (NEON, SSE). The panel width follows (pd_linear_panel()).
 */
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
#define MR 12
typedef __m512 vec;
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vsplat(float s) { return _mm512_set1_ps(s); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
#else
#if defined(__GNUC__) && !defined(__clang__)
/* a * b + c as one FMA where the target has it (-std=c11 turns contraction off); for every
 * function below, so that they still inline into each other */
#pragma GCC optimize("fp-contract=fast")
#endif
#if defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
#define MR 6
typedef float vec __attribute__((vector_size(LANES * 4)));
static inline vec vload(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void vstore(float *p, vec v) { memcpy(p, &v, sizeof v); }
static inline vec vzero(void) { return (vec){0}; }
static inline vec vsplat(float s) {
#if LANES == 8
    return (vec){s, s, s, s, s, s, s, s};
#else
    return (vec){s, s, s, s};
#endif
}
static inline vec vfma(vec a, vec b, vec c) {
    return a * b + c;
}
#endif

#define PANEL (2 * LANES)
#define SHORT_KC 64
#define LONG_KC 1024
#define SHORT_KC_ROWS (3 * MR) /* work items of at most this many rows take short slices */
#define PREFETCH_ROWS 32       /* k rows of the panel ahead of the arithmetic, into L2 */
#define TAIL_ROWS 64           /* a partial panel's rows go through a scratch tile this tall */

/* rows x PANEL of y (+)= x[rows, k0:k1] . panel[k0:k1]; first: start from bias (or 0), else
 * from y. */
static inline __attribute__((always_inline)) void micro(const float *x, int64_t ldx,
                                                        const float *panel, int64_t k0,
                                                        int64_t k1, float *y, int64_t ldy,
                                                        const float *bias, int first,
                                                        const int rows) {
    vec a0[MR], a1[MR];
#pragma GCC unroll 12
    for (int i = 0; i < rows; i++) {
        if (!first) {
            a0[i] = vload(y + i * ldy);
            a1[i] = vload(y + i * ldy + LANES);
        } else if (bias) {
            a0[i] = vload(bias);
            a1[i] = vload(bias + LANES);
        } else {
            a0[i] = vzero();
            a1[i] = vzero();
        }
    }
    for (int64_t k = k0; k < k1; k++) {
        const float *w = panel + k * PANEL;
        __builtin_prefetch(w + PREFETCH_ROWS * PANEL, 0, 2);
#if PANEL > 16 /* a panel row spans two cache lines */
        __builtin_prefetch(w + PREFETCH_ROWS * PANEL + 16, 0, 2);
#endif
        vec w0 = vload(w), w1 = vload(w + LANES);
#pragma GCC unroll 12
        for (int i = 0; i < rows; i++) {
            vec xb = vsplat(x[i * ldx + k]);
            a0[i] = vfma(xb, w0, a0[i]);
            a1[i] = vfma(xb, w1, a1[i]);
        }
    }
#pragma GCC unroll 12
    for (int i = 0; i < rows; i++) {
        vstore(y + i * ldy, a0[i]);
        vstore(y + i * ldy + LANES, a1[i]);
    }
}

#define MICRO(r) \
    micro(x + m * ldx, ldx, panel, k0, k1, y + (m - m_begin) * ldy, ldy, bias, first, r)

/* Rows m_begin .. m_end of a full panel's PANEL columns (y points at row m_begin), all of K. */
static void full_panel(const float *x, int64_t ldx, const float *panel, const float *bias,
                       float *y, int64_t ldy, int64_t m_begin, int64_t m_end, int64_t K) {
    int64_t kc = m_end - m_begin <= SHORT_KC_ROWS ? SHORT_KC : LONG_KC;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        int64_t k1 = k0 + kc < K ? k0 + kc : K;
        int first = k0 == 0;
        int64_t m = m_begin;
        for (; m + MR <= m_end; m += MR) MICRO(MR);
        switch (m_end - m) {
#if MR > 6
            case 11: MICRO(11); break;
            case 10: MICRO(10); break;
            case 9: MICRO(9); break;
            case 8: MICRO(8); break;
            case 7: MICRO(7); break;
            case 6: MICRO(6); break;
#endif
            case 5: MICRO(5); break;
            case 4: MICRO(4); break;
            case 3: MICRO(3); break;
            case 2: MICRO(2); break;
            case 1: MICRO(1); break;
            default: break;
        }
    }
}

/* The last panel, cols < PANEL valid columns: computed into a scratch tile (its padding columns
 * of the packed weights are zero), then the valid columns copied out. */
static void partial_panel(const float *x, int64_t ldx, const float *panel, const float *bias,
                          float *y, int64_t ldy, int64_t m_begin, int64_t m_end, int64_t K,
                          int64_t cols) {
    float tile[TAIL_ROWS * PANEL], padded_bias[PANEL];
    if (bias) {
        memset(padded_bias, 0, sizeof padded_bias);
        memcpy(padded_bias, bias, (size_t)cols * sizeof(float));
    }
    for (int64_t start = m_begin; start < m_end; start += TAIL_ROWS) {
        int64_t end = start + TAIL_ROWS < m_end ? start + TAIL_ROWS : m_end;
        full_panel(x + start * ldx, ldx, panel, bias ? padded_bias : 0, tile, PANEL, 0,
                   end - start, K);
        for (int64_t r = start; r < end; r++)
            memcpy(y + r * ldy, tile + (r - start) * PANEL, (size_t)cols * sizeof(float));
    }
}

/* y (M, N; row stride ldy) = x (M, K; row stride ldx) . W^T + bias, W packed by pd_linear_pack.
 * Threads: the calling thread's OpenMP setting. Returns 0, or 1 on bad sizes. */
int pd_linear(const float *x, int64_t ldx, const float *packed, const float *bias, float *y,
              int64_t ldy, int64_t M, int64_t K, int64_t N) {
    if (M <= 0 || K <= 0 || N <= 0 || ldx < K || ldy < N) return 1;
#ifdef _OPENMP
    int team = omp_get_max_threads();
#else
    int team = 1;
#endif
    int64_t panels = (N + PANEL - 1) / PANEL;
    int64_t tiles = (M + MR - 1) / MR;
    int64_t chunks = 1; /* row chunks: enough work items for every thread, few weight re-reads */
    while (panels * chunks < 4 * (int64_t)team && chunks < tiles) chunks++;
    int64_t chunk_rows = (tiles + chunks - 1) / chunks * MR;
#pragma omp parallel for schedule(static) if (team > 1)
    for (int64_t item = 0; item < panels * chunks; item++) {
        int64_t p = item / chunks, c = item % chunks;
        int64_t m_begin = c * chunk_rows;
        int64_t m_end = m_begin + chunk_rows < M ? m_begin + chunk_rows : M;
        if (m_begin >= m_end) continue;
        int64_t n = p * PANEL;
        int64_t cols = N - n < PANEL ? N - n : PANEL;
        const float *panel = packed + p * K * PANEL;
        const float *b = bias ? bias + n : 0;
        if (cols == PANEL)
            full_panel(x, ldx, panel, b, y + m_begin * ldy + n, ldy, m_begin, m_end, K);
        else
            partial_panel(x, ldx, panel, b, y + n, ldy, m_begin, m_end, K, cols);
    }
    return 0;
}


/* packed[p][k][j] = w[p * PANEL + j][k] (w: N rows of K floats), 0 past row N. */
void pd_linear_pack(const float *w, int64_t N, int64_t K, float *packed) {
    int64_t panels = (N + PANEL - 1) / PANEL;
    for (int64_t p = 0; p < panels; p++) {
        float *out = packed + p * K * PANEL;
        for (int64_t j = 0; j < PANEL; j++) { /* reads rows of w in order */
            int64_t n = p * PANEL + j;
            for (int64_t k = 0; k < K; k++) out[k * PANEL + j] = n < N ? w[n * K + k] : 0.0f;
        }
    }
}

int pd_linear_panel(void) { return PANEL; }
