/* Paged attention for query tokens that read their context from the KV pool in place (CPU).
 *
 * Built at run time by engine/kernels/__init__.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes, one call per layer per step. It replaces "gather every sequence's blocks into a
 * padded tensor, then scaled-dot-product attention": each K and V slot is read once, straight
 * from its block, and nothing is padded.
 *
 * Pool layout of one layer, K and V each:  (num_blocks, block_size, kv_heads, head_dim)
 * Query token t attends slots 0 .. context_len[t] - 1 of its sequence, whose blocks are row t of
 * the block table (block_table[t * max_blocks + p / block_size] holds position p).
 *
 * Work item: one query token (threads split the tokens). Two passes over its context: scores
 * q.k into a scratch row per head, then softmax weights times V, accumulated in float. Softmax
 * uses exp2 with a degree-6 polynomial (relative error < 1.2e-7), branch-free so that the loop
 * vectorizes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pd_exp2.h"


#define MAX_HEAD_DIM 256
#define MAX_HEADS 256

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}


/* Rows of n scores, in place: exp(s - max) (unnormalized); inv_sum[h] = 1 / row h's sum. */
static void softmax_rows(float *scores, int64_t n, int64_t heads, float *inv_sum) {
    for (int64_t h = 0; h < heads; h++) {
        float *row = scores + h * n;
        float m = row[0];
#pragma omp simd reduction(max : m)
        for (int64_t p = 1; p < n; p++) m = row[p] > m ? row[p] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t p = 0; p < n; p++) {
            row[p] = pd_exp2((row[p] - m) * PD_LOG2E); /* arguments <= 0 */
            sum += row[p];
        }
        inv_sum[h] = 1.0f / sum;
    }
}

/* One query token, all heads; q/out rows are H * D floats, scores has room for H * n.
 * Block by block (no division per slot; the block's K or V of every KV head is one contiguous
 * run of memory), then KV head by KV head and query head by query head, so that one head's query
 * or output row stays in registers while the block's slots stream through L1 (grouped-query
 * attention: the G query heads of a KV head read the same slots). D is a compile-time constant
 * for the common head sizes (the loops over it unroll) and a variable otherwise. */
#define DEFINE_ITEM(NAME, T, LOAD, D)                                                           \
    static void NAME(const float *restrict q, float *restrict out, const T *restrict k_cache,    \
                     const T *restrict v_cache, const int64_t *table, int64_t n, int64_t kvh,    \
                     int64_t d, int64_t bs, int64_t g_heads, float *restrict scores) {           \
        (void)d;                                                                                 \
        const int64_t stride = kvh * (D);                                                        \
        const int64_t heads = kvh * g_heads;                                                     \
        for (int64_t start = 0; start < n; start += bs) {                                        \
            const int64_t count = n - start < bs ? n - start : bs;                               \
            const T *block = k_cache + table[start / bs] * bs * stride;                          \
            for (int64_t h = 0; h < heads; h++) {                                                \
                const T *k = block + (h / g_heads) * (D);                                        \
                const float *qh = q + h * (D);                                                   \
                float *row = scores + h * n + start;                                             \
                for (int64_t j = 0; j < count; j++) {                                            \
                    const T *kj = k + j * stride;                                                \
                    float s = 0.0f;                                                              \
                    _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < (D); i++) s += \
                        qh[i] * LOAD(kj[i]);                                                     \
                    row[j] = s;                                                                  \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        float inv_sum[MAX_HEADS];                                                                \
        softmax_rows(scores, n, heads, inv_sum);                                                 \
        memset(out, 0, (size_t)(heads * (D)) * sizeof(float));                                   \
        for (int64_t start = 0; start < n; start += bs) {                                        \
            const int64_t count = n - start < bs ? n - start : bs;                               \
            const T *block = v_cache + table[start / bs] * bs * stride;                          \
            for (int64_t h = 0; h < heads; h++) {                                                \
                const T *v = block + (h / g_heads) * (D);                                        \
                const float *w = scores + h * n + start;                                         \
                float acc[(D)];                                                                  \
                float *o = out + h * (D);                                                        \
                _Pragma("omp simd") for (int64_t i = 0; i < (D); i++) acc[i] = o[i];             \
                for (int64_t j = 0; j < count; j++) {                                            \
                    const T *vj = v + j * stride;                                                \
                    const float wj = w[j];                                                       \
                    _Pragma("omp simd") for (int64_t i = 0; i < (D); i++) acc[i] += wj *         \
                        LOAD(vj[i]);                                                             \
                }                                                                                \
                _Pragma("omp simd") for (int64_t i = 0; i < (D); i++) o[i] = acc[i];             \
            }                                                                                    \
        }                                                                                        \
        for (int64_t h = 0; h < heads; h++) {                                                    \
            float *o = out + h * (D);                                                            \
            _Pragma("omp simd") for (int64_t i = 0; i < (D); i++) o[i] *= inv_sum[h];           \
        }                                                                                        \
    }

#if defined(__AVX512F__)
#include <immintrin.h>

/* AVX-512 versions for D a multiple of 16 known at compile time: a head's query or output row is
 * D / 16 registers; one score is D / 16 fused multiply-adds and one horizontal sum. */
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }

static inline __m512 load16_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

#define DEFINE_ITEM_AVX512(NAME, T, LOAD16, D)                                                  \
    static void NAME(const float *restrict q, float *restrict out, const T *restrict k_cache,    \
                     const T *restrict v_cache, const int64_t *table, int64_t n, int64_t kvh,    \
                     int64_t d, int64_t bs, int64_t g_heads, float *restrict scores) {           \
        (void)d;                                                                                 \
        enum { C = (D) / 16 };                                                                   \
        const int64_t stride = kvh * (D);                                                        \
        const int64_t heads = kvh * g_heads;                                                     \
        for (int64_t start = 0; start < n; start += bs) {                                        \
            const int64_t count = n - start < bs ? n - start : bs;                               \
            const T *block = k_cache + table[start / bs] * bs * stride;                          \
            for (int64_t h = 0; h < heads; h++) {                                                \
                const T *k = block + (h / g_heads) * (D);                                        \
                __m512 qv[C];                                                                    \
                for (int c = 0; c < C; c++) qv[c] = _mm512_loadu_ps(q + h * (D) + 16 * c);       \
                float *row = scores + h * n + start;                                             \
                for (int64_t j = 0; j < count; j++) {                                            \
                    const T *kj = k + j * stride;                                                \
                    __m512 acc = _mm512_mul_ps(qv[0], LOAD16(kj));                               \
                    for (int c = 1; c < C; c++)                                                  \
                        acc = _mm512_fmadd_ps(qv[c], LOAD16(kj + 16 * c), acc);                  \
                    row[j] = _mm512_reduce_add_ps(acc);                                          \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        float inv_sum[MAX_HEADS];                                                                \
        softmax_rows(scores, n, heads, inv_sum);                                                 \
        enum { U = C <= 4 ? 4 : 2 }; /* slots per step: U * C independent accumulators */      \
        for (int64_t h = 0; h < heads; h++) {                                                    \
            __m512 acc[U][C];                                                                    \
            for (int u = 0; u < U; u++)                                                          \
                for (int c = 0; c < C; c++) acc[u][c] = _mm512_setzero_ps();                     \
            const float *w = scores + h * n;                                                     \
            for (int64_t start = 0; start < n; start += bs) {                                    \
                const int64_t count = n - start < bs ? n - start : bs;                           \
                const T *v = v_cache + table[start / bs] * bs * stride + (h / g_heads) * (D);    \
                int64_t j = 0;                                                                   \
                for (; j + U <= count; j += U)                                                   \
                    for (int u = 0; u < U; u++) {                                                \
                        const __m512 wj = _mm512_set1_ps(w[start + j + u]);                      \
                        const T *vj = v + (j + u) * stride;                                      \
                        for (int c = 0; c < C; c++)                                              \
                            acc[u][c] = _mm512_fmadd_ps(wj, LOAD16(vj + 16 * c), acc[u][c]);     \
                    }                                                                            \
                for (; j < count; j++) {                                                         \
                    const __m512 wj = _mm512_set1_ps(w[start + j]);                              \
                    const T *vj = v + j * stride;                                                \
                    for (int c = 0; c < C; c++)                                                  \
                        acc[0][c] = _mm512_fmadd_ps(wj, LOAD16(vj + 16 * c), acc[0][c]);         \
                }                                                                                \
            }                                                                                    \
            const __m512 inv = _mm512_set1_ps(inv_sum[h]);                                       \
            for (int c = 0; c < C; c++) {                                                        \
                __m512 sum = acc[0][c];                                                          \
                for (int u = 1; u < U; u++) sum = _mm512_add_ps(sum, acc[u][c]);                 \
                _mm512_storeu_ps(out + h * (D) + 16 * c, _mm512_mul_ps(sum, inv));               \
            }                                                                                    \
        }                                                                                        \
    }
#endif

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
DEFINE_ITEM(item_f32_64, float, LOAD_F32, 64)
DEFINE_ITEM(item_f32_128, float, LOAD_F32, 128)
DEFINE_ITEM(item_f32_any, float, LOAD_F32, d)
DEFINE_ITEM(item_bf16_64, uint16_t, LOAD_BF16, 64)
DEFINE_ITEM(item_bf16_128, uint16_t, LOAD_BF16, 128)
DEFINE_ITEM(item_bf16_any, uint16_t, LOAD_BF16, d)

typedef void (*item_fn)(const float *, float *, const void *, const void *, const int64_t *,
                        int64_t, int64_t, int64_t, int64_t, int64_t, float *);

#if defined(__AVX512F__)
DEFINE_ITEM_AVX512(item_f32_64_avx512, float, load16_f32, 64)
DEFINE_ITEM_AVX512(item_f32_128_avx512, float, load16_f32, 128)
DEFINE_ITEM_AVX512(item_bf16_64_avx512, uint16_t, load16_bf16, 64)
DEFINE_ITEM_AVX512(item_bf16_128_avx512, uint16_t, load16_bf16, 128)
#endif

static item_fn pick_item(int dtype, int64_t head_dim) {
#if defined(__AVX512F__)
    if (dtype == 0 && head_dim == 64) return (item_fn)item_f32_64_avx512;
    if (dtype == 0 && head_dim == 128) return (item_fn)item_f32_128_avx512;
    if (dtype == 1 && head_dim == 64) return (item_fn)item_bf16_64_avx512;
    if (dtype == 1 && head_dim == 128) return (item_fn)item_bf16_128_avx512;
#endif
    if (dtype == 0)
        return head_dim == 64 ? (item_fn)item_f32_64
             : head_dim == 128 ? (item_fn)item_f32_128 : (item_fn)item_f32_any;
    return head_dim == 64 ? (item_fn)item_bf16_64
         : head_dim == 128 ? (item_fn)item_bf16_128 : (item_fn)item_bf16_any;
}

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };

/* Returns 0, or -1 when a size is out of range (the caller checks shapes before calling).
 *
 * q:            element (t, h, i) at q[t * q_token_stride + h * q_head_stride + i]
 * out:          (tokens, heads, head_dim), contiguous, same dtype as the pool
 * k_cache, v_cache: one layer's K and V, (num_blocks, block_size, kv_heads, head_dim)
 * block_table:  (tokens, max_blocks) int64: row t holds token t's sequence's blocks
 * context_len:  (tokens,) int64
 * Threads: the calling thread's OpenMP setting (torch.set_num_threads made on that thread).
 */
int pd_paged_attention(const void *q, int64_t q_token_stride, int64_t q_head_stride, void *out,
                       const void *k_cache, const void *v_cache, const int64_t *block_table,
                       int64_t max_blocks, const int64_t *context_len,
                       int64_t tokens, int64_t heads, int64_t kv_heads, int64_t head_dim,
                       int64_t block_size, float scale, int dtype) {
    if (kv_heads <= 0 || heads % kv_heads != 0 || heads > MAX_HEADS || head_dim <= 0 ||
        head_dim > MAX_HEAD_DIM || block_size <= 0)
        return -1;
    int64_t max_len = 0;
    for (int64_t t = 0; t < tokens; t++) {
        if (context_len[t] <= 0 || context_len[t] > max_blocks * block_size) return -1;
        max_len = context_len[t] > max_len ? context_len[t] : max_len;
    }
    const int64_t g_heads = heads / kv_heads;
    const item_fn run_item = pick_item(dtype, head_dim);
    const size_t row_floats = (size_t)(heads * head_dim);
    int failed = 0;
#pragma omp parallel if (tokens > 1)
    {
        float *scores = malloc((size_t)(heads * max_len) * sizeof(float));
        float *q_row = malloc(row_floats * sizeof(float));
        float *o_row = malloc(row_floats * sizeof(float));
        const int ok = scores != NULL && q_row != NULL && o_row != NULL;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tokens; t++) {
            if (!ok) continue;
            for (int64_t h = 0; h < heads; h++)
                for (int64_t i = 0; i < head_dim; i++) {
                    int64_t at = t * q_token_stride + h * q_head_stride + i;
                    float x = dtype == DTYPE_F32 ? ((const float *)q)[at]
                                                 : bf16_to_f32(((const uint16_t *)q)[at]);
                    q_row[h * head_dim + i] = x * scale;
                }
            run_item(q_row, o_row, k_cache, v_cache, block_table + t * max_blocks,
                     context_len[t], kv_heads, head_dim, block_size, g_heads, scores);
            if (dtype == DTYPE_F32)
                memcpy((float *)out + t * row_floats, o_row, row_floats * sizeof(float));
            else
                for (size_t i = 0; i < row_floats; i++)
                    ((uint16_t *)out)[t * row_floats + i] = f32_to_bf16(o_row[i]);
        }
        free(scores);
        free(q_row);
        free(o_row);
    }
    return failed ? -2 : 0;
}
