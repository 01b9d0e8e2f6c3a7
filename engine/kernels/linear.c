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
 * columns of y in 2 * MR AVX-512 registers and, for each k, loads two weight vectors and
 * broadcasts MR values of x. K is cut into slices so a panel slice stays in cache while every
 * row tile of x passes over it: short slices (SHORT_KC) at decode's few row tiles, so that the
 * tiles that reuse a slice from cache alternate quickly with the one that streams the next slice
 * from memory (with weights out of cache, 24 rows took 31 instead of 40 ms per step of the
 * default model); long ones (LONG_KC) for prefill, where reloading the accumulators per slice
 * would cost more. Threads split panels (and row tiles when there are few panels per thread).
 *
 * Built without AVX-512 the file compiles to pd_linear_supported() == 0 and the engine keeps
 * torch's linear layers.
 */
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define PANEL 32
#define MR 12
#define SHORT_KC 64
#define LONG_KC 1024
#define SHORT_KC_ROWS (3 * MR) /* work items of at most this many rows take short slices */
#define PREFETCH_ROWS 32       /* k rows of the panel ahead of the arithmetic (4 KiB), into L2 */

#ifdef __AVX512F__
#include <immintrin.h>

int pd_linear_supported(void) { return 1; }

/* rows x PANEL of y (+)= x[rows, k0:k1] . panel[k0:k1]; first: start from bias (or 0), else
 * from y. Stores only the valid columns (masks m0, m1). */
static inline __attribute__((always_inline)) void micro(
    const float *x, int64_t ldx, const float *panel, int64_t k0, int64_t k1, float *y,
    int64_t ldy, const float *bias, int first, const int rows, __mmask16 m0, __mmask16 m1) {
    __m512 a0[MR], a1[MR];
#pragma GCC unroll 12
    for (int i = 0; i < rows; i++) {
        if (!first) {
            a0[i] = _mm512_maskz_loadu_ps(m0, y + i * ldy);
            a1[i] = _mm512_maskz_loadu_ps(m1, y + i * ldy + 16);
        } else if (bias) {
            a0[i] = _mm512_maskz_loadu_ps(m0, bias);
            a1[i] = _mm512_maskz_loadu_ps(m1, bias + 16);
        } else {
            a0[i] = _mm512_setzero_ps();
            a1[i] = _mm512_setzero_ps();
        }
    }
    for (int64_t k = k0; k < k1; k++) {
        const float *w = panel + k * PANEL;
        _mm_prefetch((const char *)(w + PREFETCH_ROWS * PANEL), _MM_HINT_T1);
        _mm_prefetch((const char *)(w + PREFETCH_ROWS * PANEL + 16), _MM_HINT_T1);
        __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
#pragma GCC unroll 12
        for (int i = 0; i < rows; i++) {
            __m512 xb = _mm512_set1_ps(x[i * ldx + k]);
            a0[i] = _mm512_fmadd_ps(xb, w0, a0[i]);
            a1[i] = _mm512_fmadd_ps(xb, w1, a1[i]);
        }
    }
#pragma GCC unroll 12
    for (int i = 0; i < rows; i++) {
        _mm512_mask_storeu_ps(y + i * ldy, m0, a0[i]);
        _mm512_mask_storeu_ps(y + i * ldy + 16, m1, a1[i]);
    }
}

#define MICRO(r) micro(x + m * ldx, ldx, panel, k0, k1, y + m * ldy, ldy, bias, first, r, m0, m1)

/* Rows m_begin .. m_end of one panel's columns, over all of K. */
static void panel_rows(const float *x, int64_t ldx, const float *panel, const float *bias,
                       float *y, int64_t ldy, int64_t m_begin, int64_t m_end, int64_t K,
                       int64_t cols) {
    int64_t kc = m_end - m_begin <= SHORT_KC_ROWS ? SHORT_KC : LONG_KC;
    __mmask16 m0 = cols >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cols) - 1u);
    __mmask16 m1 = cols >= 32   ? (__mmask16)0xffff
                   : cols <= 16 ? (__mmask16)0
                                : (__mmask16)((1u << (cols - 16)) - 1u);
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        int64_t k1 = k0 + kc < K ? k0 + kc : K;
        int first = k0 == 0;
        int64_t m = m_begin;
        for (; m + MR <= m_end; m += MR) MICRO(MR);
        switch (m_end - m) {
            case 11: MICRO(11); break;
            case 10: MICRO(10); break;
            case 9: MICRO(9); break;
            case 8: MICRO(8); break;
            case 7: MICRO(7); break;
            case 6: MICRO(6); break;
            case 5: MICRO(5); break;
            case 4: MICRO(4); break;
            case 3: MICRO(3); break;
            case 2: MICRO(2); break;
            case 1: MICRO(1); break;
            default: break;
        }
    }
}

/* y (M, N; row stride ldy) = x (M, K; row stride ldx) . W^T + bias, W packed by pd_linear_pack.
 * threads 0: the calling thread's OpenMP thread count. Returns 0, or 1 on bad sizes. */
int pd_linear(const float *x, int64_t ldx, const float *packed, const float *bias, float *y,
              int64_t ldy, int64_t M, int64_t K, int64_t N, int threads) {
    if (M <= 0 || K <= 0 || N <= 0 || ldx < K || ldy < N) return 1;
#ifdef _OPENMP
    int team = threads > 0 ? threads : omp_get_max_threads();
#else
    int team = 1;
#endif
    int64_t panels = (N + PANEL - 1) / PANEL;
    int64_t tiles = (M + MR - 1) / MR;
    int64_t chunks = 1; /* row chunks: enough work items for every thread, few weight re-reads */
    while (panels * chunks < 4 * (int64_t)team && chunks < tiles) chunks++;
    int64_t chunk_rows = (tiles + chunks - 1) / chunks * MR;
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (int64_t item = 0; item < panels * chunks; item++) {
        int64_t p = item / chunks, c = item % chunks;
        int64_t m_begin = c * chunk_rows;
        int64_t m_end = m_begin + chunk_rows < M ? m_begin + chunk_rows : M;
        if (m_begin >= m_end) continue;
        int64_t n = p * PANEL;
        int64_t cols = N - n < PANEL ? N - n : PANEL;
        panel_rows(x, ldx, packed + p * K * PANEL, bias ? bias + n : 0, y + n, ldy, m_begin,
                   m_end, K, cols);
    }
    return 0;
}

#else /* no AVX-512: the engine keeps torch's linear layers */

int pd_linear_supported(void) { return 0; }

int pd_linear(const float *x, int64_t ldx, const float *packed, const float *bias, float *y,
              int64_t ldy, int64_t M, int64_t K, int64_t N, int threads) {
    (void)x, (void)ldx, (void)packed, (void)bias, (void)y, (void)ldy, (void)M, (void)K, (void)N;
    (void)threads;
    return 2;
}

#endif

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
