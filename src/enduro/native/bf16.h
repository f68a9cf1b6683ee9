/* bfloat16 <-> float32 for the kernels: the scalar way (tails, non-AVX-512 paths), and 16 at a
 * time with AVX-512. */
#ifndef ENDURO_BF16_H
#define ENDURO_BF16_H
#include <stdint.h>

static inline float bf16_to_float(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

/* Round to nearest even, like torch's float -> bfloat16 cast; NaN stays NaN. */
static inline uint16_t float_to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)(v.u >> 16);
}

/* f rounded to bf16 and back: where enduro's eager ops round a float32 intermediate */
static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

#ifdef __AVX512F__
#include <immintrin.h>

/* 16 bf16 values → float32: each is the high half of its float32 */
static inline __m512 load16(const uint16_t *p) {
    __m256i half = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#endif

#endif
