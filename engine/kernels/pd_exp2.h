/* 2^x in float, branch-free so that loops over it vectorize (shared by the kernels of
 * engine/kernels; the build copies this header beside each source and keys on it).
 *
 * x is clamped to [-126, 127] (float's normal range: 0-ish below, no infinity above; NaN stays
 * NaN); x = i + f
 * with i = round(x) (the 1.5 * 2^23 trick: exact), f in [-1/2, 1/2]; 2^f by its Taylor polynomial
 * of degree 6, relative error < 1.2e-7 there; 2^i by building the exponent bits. */
#ifndef PD_EXP2_H
#define PD_EXP2_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define PD_LOG2E 1.4426950408889634f

static inline float pd_exp2(float x) {
    float c = fmaxf(-126.0f, fminf(127.0f, x)); /* NaN -> 127: no undefined conversion below */
    float xi = (c + 12582912.0f) - 12582912.0f;
    float f = x != x ? x : c - xi;
    float p = 1.5403530393e-4f;
    p = p * f + 1.3333558146e-3f;
    p = p * f + 9.6181291076e-3f;
    p = p * f + 5.5504108665e-2f;
    p = p * f + 2.4022650696e-1f;
    p = p * f + 6.9314718056e-1f;
    p = p * f + 1.0f;
    int32_t e = ((int32_t)xi + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

#endif
