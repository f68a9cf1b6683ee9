/* RMSNorm of bf16 rows in one pass, with the rounding points of enduro's eager version
 * (models/fused.py) so the two agree to one bf16 step:
 *   unit_offset (Gemma): n = bf16(x * rstd * (1 + w)), all in float32;
 *   otherwise (Llama):   n = bf16(w * bf16(x * rstd));
 *   with a residual:     out = bf16(residual + n).
 * Why: eagerly a norm is ≈6 tensor ops (casts, the fused norm, the weight, the add), 35-55 µs
 * at decode sizes, 109 calls in a step of the default model; this is one call of a few µs.
 *
 * Row r of x starts at (r / inner) * outer_stride + (r % inner) * dim elements: inner = 1,
 * outer_stride = dim for a contiguous [rows, dim] tensor; inner = heads, outer_stride = the
 * fused projection's width for per-head q/k norms read in place. out is [rows, dim].
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define VECTOR 1
#endif

#ifdef VECTOR
/* float32 → bf16, round to nearest even (the instruction's rounding, as torch's cast) */
static inline __m256i pack16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

static inline __m512 round16(__m512 v) {
    __m256i half = pack16(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* One row, dim a multiple of 16: the same arithmetic as the scalar loop below. */
static void norm_row_vector(const uint16_t *row, int64_t dim, const uint16_t *weight, float eps,
                            int unit_offset, const uint16_t *res, uint16_t *o) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
        __m512 v = load16(row + d);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    const float rstd = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)dim + eps);
    const __m512 scale = _mm512_set1_ps(rstd), one = _mm512_set1_ps(1.0f);
    for (int64_t d = 0; d < dim; d += 16) {
        __m512 w = load16(weight + d);
        __m512 v = _mm512_mul_ps(load16(row + d), scale);
        __m512 n = unit_offset ? round16(_mm512_mul_ps(v, _mm512_add_ps(one, w)))
                               : round16(_mm512_mul_ps(w, round16(v)));
        if (res) n = _mm512_add_ps(n, load16(res + d));
        _mm256_storeu_si256((__m256i *)(o + d), pack16(n));
    }
}
#endif

void enduro_rms_norm(const uint16_t *x, int64_t rows, int64_t dim, int64_t inner,
                     int64_t outer_stride, const uint16_t *weight, float eps, int unit_offset,
                     const uint16_t *residual, uint16_t *out) {
#pragma omp parallel for if (rows * dim >= (1 << 17))
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + (r / inner) * outer_stride + (r % inner) * dim;
        uint16_t *o = out + r * dim;
        const uint16_t *res = residual ? residual + r * dim : 0;
#ifdef VECTOR
        if (dim % 16 == 0) {
            norm_row_vector(row, dim, weight, eps, unit_offset, res, o);
            continue;
        }
#endif
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t d = 0; d < dim; d++) {
            const float v = bf16_to_float(row[d]);
            squares += v * v;
        }
        const float rstd = 1.0f / sqrtf(squares / (float)dim + eps);
#pragma omp simd
        for (int64_t d = 0; d < dim; d++) {
            const float w = bf16_to_float(weight[d]);
            const float v = bf16_to_float(row[d]) * rstd;
            float n = unit_offset ? round_bf16(v * (1.0f + w)) : round_bf16(w * round_bf16(v));
            if (res) n = n + bf16_to_float(res[d]);
            o[d] = float_to_bf16(n);
        }
    }
}
