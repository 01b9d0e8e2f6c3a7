/* The small float32 operations of a Llama-family decoder layer, one call each (CPU).
 *
 * Built at run time by engine/kernels (cc -O3 -march=native -fopenmp) and called through ctypes.
 * In torch, RMSNorm is six operators, RoPE over q and k five more, and every operator costs a
 * dispatch and an OpenMP fork and join: at decode's few rows the overhead is most of the time
 * (about 12 of a 30 ms step at one sequence, measured). Each function here does one of them in a
 * single pass, with the same arithmetic as transformers' modules (reductions in float32; the
 * order of a sum differs, so results can differ in the last bit).
 *
 * Rows are independent; large calls (prefill chunks) split rows between the calling thread's
 * OpenMP threads, small ones run on the calling thread alone.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "pd_exp2.h"

#define PARALLEL_ROWS 64 /* fewer rows than this: no threads (fork and join cost more) */

static inline void norm_row(const float *x, const float *w, float eps, float *out, int64_t dim) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < dim; i++) sum += x[i] * x[i];
    float r = 1.0f / sqrtf(sum / (float)dim + eps);
#pragma omp simd
    for (int64_t i = 0; i < dim; i++) out[i] = w[i] * (x[i] * r);
}

/* out[r] = w * x[r] / sqrt(mean(x[r]^2) + eps); with delta, x[r] += delta[r] first (in place). */
void pd_add_rms_norm(float *x, int64_t ldx, const float *delta, int64_t ldd, const float *w,
                     float eps, float *out, int64_t ldo, int64_t rows, int64_t dim) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * ldx;
        if (delta) {
            const float *d = delta + r * ldd;
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) row[i] += d[i];
        }
        norm_row(row, w, eps, out + r * ldo, dim);
    }
}

/* Rotary embedding in place, transformers' x * cos + rotate_half(x) * sin, for `heads` heads of
 * head_dim values per row (row stride ldx); cos and sin: one row of head_dim per token. */
void pd_rope(float *x, int64_t ldx, int64_t heads, int64_t head_dim, const float *cos,
             const float *sin, int64_t rows) {
    int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * head_dim, *s = sin + r * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + r * ldx + h * head_dim;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] + -b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* out[r] = silu(gate_up[r, :inter]) * gate_up[r, inter:2 inter], silu(g) = g / (1 + e^-g). */
void pd_silu_mul(const float *gate_up, int64_t ldg, int64_t inter, float *out, int64_t ldo,
                 int64_t rows) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate_up + r * ldg, *u = g + inter;
        float *o = out + r * ldo;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++)
            o[i] = g[i] / (1.0f + pd_exp2(-g[i] * PD_LOG2E)) * u[i];
    }
}
