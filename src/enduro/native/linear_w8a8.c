/* y = x @ W^T with int8 weights and int8 activations (`--quantization w8a8`).
 *
 * Why: a 16-row decode step of a small model is the output projection and 72 decoder
 * projections, and with int8 weights widened to bf16 (linear.c) their arithmetic, not the
 * weight reads, sets the time: AVX512-BF16 does 32 products an instruction. AVX512-VNNI's
 * vpdpbusd does 64 (bytes, summed into int32 lanes), so with the activations in int8 too the
 * same step needs half the instructions and no widening.
 *
 * Quantization: weights are symmetric int8 with one scale per output row (the int8 mode's
 * exactly); each row of x is quantized when it arrives, q = round(x * 127 / max|x|), with its
 * own scale per group of `group` inputs: one scale per whole row cost 5 % perplexity on the
 * reference text, one per 128 inputs 0.6 % (benchmarks/README.md, "Int8 activations").
 *
 * Layout: vpdpbusd multiplies unsigned by signed bytes, so weights are stored as w + 128
 * (unsigned) and the activations stay signed; sum (w + 128) q = sum w q + 128 sum q, and the
 * second term is known per row and group when x is quantized. Weights are packed so that
 * one 64-byte vector holds 4 consecutive inputs of 16 consecutive outputs: [N / 16][K / 4][16][4].
 * Each output stays in its own int32 lane from the first input to the last, so no horizontal
 * sums, and a block's weights are read in one sequential stream.
 *
 * Threads split the blocks of 16 outputs, each thread a contiguous range.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "threads.h"
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define VECTOR 1
#endif

#define LANES 16          /* outputs per block, one lane each */
#define ROW_TILE 8        /* rows of x per pass over a block: 8 int + 8 float accumulators */
#define OFFSET 128        /* weights are stored as w + OFFSET */
#define CHUNK_BYTES 131072 /* blocks that stay in L2 while every row tile passes over them */

/* 1 when this build has the VNNI path; the scalar one is exact but slow. */
int enduro_w8a8_vectorized(void) {
#ifdef VECTOR
    return 1;
#else
    return 0;
#endif
}

/* One row's group of G values: q = round(x * 127 / max|x|), its scale max|x| / 127, and
 * -OFFSET * sum(q), the correction for the weights' offset. Round half to even, as torch. */
static void quantize_group(const uint16_t *x, int64_t G, int8_t *q, float *scale,
                           int32_t *correction) {
    float amax = 0.0f;
    int64_t k = 0;
#ifdef VECTOR
    __m512 vmax = _mm512_setzero_ps();
    for (; k + 16 <= G; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(x + k)));
    amax = _mm512_reduce_max_ps(vmax);
#endif
    for (; k < G; k++) amax = fmaxf(amax, fabsf(bf16_to_float(x[k])));
    const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    k = 0;
#ifdef VECTOR
    __m512i vsum = _mm512_setzero_si512();
    const __m512 vinverse = _mm512_set1_ps(inverse);
    for (; k + 16 <= G; k += 16) {
        /* cvtps_epi32 rounds in the default mode: to nearest, ties to even */
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x + k), vinverse));
        vsum = _mm512_add_epi32(vsum, v);
        _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(v));
    }
    sum = _mm512_reduce_add_epi32(vsum);
#endif
    for (; k < G; k++) {
        const int32_t v = (int32_t)nearbyintf(bf16_to_float(x[k]) * inverse);
        q[k] = (int8_t)v;
        sum += v;
    }
    *scale = amax / 127.0f;
    *correction = -OFFSET * sum;
}

static void quantize_rows(const uint16_t *x, int64_t M, int64_t K, int64_t G, int8_t *q,
                          float *scales, int32_t *corrections) {
    const int64_t groups = K / G;
#pragma omp parallel for if (M * K >= (1 << 16))
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++)
            quantize_group(x + m * K + g * G, G, q + m * K + g * G, scales + m * groups + g,
                           corrections + m * groups + g);
}

#ifdef VECTOR
/* *acc += the products of 4 activation bytes at x (broadcast to every lane) with wv's.
 * Written in assembly because with the intrinsic GCC 12 copies each accumulator to another
 * register and back around every vpdpbusd and spills the weight vector to the stack: the
 * output projection at 16 rows took 6.6 ms that way, 5.6 ms this way (benchmarks/README.md,
 * "Int8 activations"). */
static inline void dot4(__m512i *acc, __m512i wv, const int8_t *x) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(*acc) : "v"(wv), "m"(*(const int32_t *)x));
}

/* f[r] (16 outputs of row r) = sum over groups of scale[r, g] * (int dot of the group) */
static inline void tile(const uint8_t *w, const int8_t *q, const float *scales,
                        const int32_t *corrections, int64_t K, int64_t G, int mr,
                        __m512 f[ROW_TILE]) {
    const int64_t groups = K / G;
    for (int r = 0; r < mr; r++) f[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i acc[ROW_TILE];
        for (int r = 0; r < mr; r++) acc[r] = _mm512_set1_epi32(corrections[r * groups + g]);
        for (int64_t k = g * G; k < (g + 1) * G; k += 4) {
            const __m512i wv = _mm512_loadu_si512(w + k * LANES);
            for (int r = 0; r < mr; r++) dot4(&acc[r], wv, q + r * K + k);
        }
        for (int r = 0; r < mr; r++)
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]),
                                   _mm512_set1_ps(scales[r * groups + g]), f[r]);
    }
}

static void vector_blocks(const int8_t *q, const float *scales, const int32_t *corrections,
                          int64_t M, int64_t K, int64_t G, const uint8_t *w,
                          const float *wscales, int64_t N, int64_t b0, int64_t b1, uint16_t *y) {
    const int64_t block_bytes = K * LANES, groups = K / G;
    int64_t chunk = CHUNK_BYTES / block_bytes;
    if (chunk < 1) chunk = 1;
    for (int64_t c0 = b0; c0 < b1; c0 += chunk) {
        const int64_t c1 = c0 + chunk < b1 ? c0 + chunk : b1;
        for (int64_t m = 0; m < M; m += ROW_TILE) {
            const int mr = M - m < ROW_TILE ? (int)(M - m) : ROW_TILE;
            const int8_t *qm = q + m * K;
            const float *sm = scales + m * groups;
            const int32_t *cm = corrections + m * groups;
            for (int64_t b = c0; b < c1; b++) {
                const uint8_t *wb = w + b * block_bytes;
                __m512 f[ROW_TILE];
                /* constant row counts, so the accumulators stay in registers */
                switch (mr) {
                case 8: tile(wb, qm, sm, cm, K, G, 8, f); break;
                case 4: tile(wb, qm, sm, cm, K, G, 4, f); break;
                case 2: tile(wb, qm, sm, cm, K, G, 2, f); break;
                case 1: tile(wb, qm, sm, cm, K, G, 1, f); break;
                default: tile(wb, qm, sm, cm, K, G, mr, f); break;
                }
                const int64_t n = b * LANES, valid = N - n < LANES ? N - n : LANES;
                const __mmask16 mask = (__mmask16)((1u << valid) - 1u);
                const __m512 ws = _mm512_loadu_ps(wscales + n);
                for (int r = 0; r < mr; r++) {
                    const __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(f[r], ws));
                    _mm256_mask_storeu_epi16(y + (m + r) * N + n, mask, out);
                }
            }
        }
    }
}
#endif

static void scalar_blocks(const int8_t *q, const float *scales, const int32_t *corrections,
                          int64_t M, int64_t K, int64_t G, const uint8_t *w,
                          const float *wscales, int64_t N, int64_t b0, int64_t b1, uint16_t *y) {
    const int64_t groups = K / G;
    for (int64_t b = b0; b < b1; b++)
        for (int64_t lane = 0; lane < LANES && b * LANES + lane < N; lane++) {
            const int64_t n = b * LANES + lane;
            for (int64_t m = 0; m < M; m++) {
                float f = 0.0f;
                for (int64_t g = 0; g < groups; g++) {
                    int32_t acc = corrections[m * groups + g];
                    for (int64_t k = g * G; k < (g + 1) * G; k++)
                        acc += (int32_t)w[b * K * LANES + k / 4 * 64 + lane * 4 + k % 4] *
                               q[m * K + k];
                    f = fmaf((float)acc, scales[m * groups + g], f);
                }
                y[m * N + n] = float_to_bf16(f * wscales[n]);
            }
        }
}

static int linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w,
                  const float *wscales, int64_t group, int64_t N, uint16_t *y, int vector) {
    if (M <= 0 || N <= 0) return 0; /* nothing to compute (and malloc(0) may return NULL) */
    const int64_t groups = K / group;
    int8_t *q = malloc((size_t)(M * K));
    float *scales = malloc(sizeof(float) * (size_t)(M * groups));
    int32_t *corrections = malloc(sizeof(int32_t) * (size_t)(M * groups));
    if (q == NULL || scales == NULL || corrections == NULL) {
        free(q);
        free(scales);
        free(corrections);
        return -1;
    }
    quantize_rows(x, M, K, group, q, scales, corrections);
    const int64_t blocks = (N + LANES - 1) / LANES;
#pragma omp parallel
    {
        int64_t b0, b1;
        thread_share(blocks, &b0, &b1);
#ifdef VECTOR
        if (vector)
            vector_blocks(q, scales, corrections, M, K, group, w, wscales, N, b0, b1, y);
        else
#endif
            scalar_blocks(q, scales, corrections, M, K, group, w, wscales, N, b0, b1, y);
    }
    (void)vector;
    free(q);
    free(scales);
    free(corrections);
    return 0;
}

/* x [M, K] bf16; w packed as above from [N, K] int8 (N padded to a multiple of 16 with
 * zero rows); wscales [N padded] float32; group divides K and is a multiple of 4 (K too).
 * y [M, N] bf16. Returns 0, or -1 when scratch memory could not be allocated. */
int enduro_linear_w8a8(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w,
                       const float *wscales, int64_t group, int64_t N, uint16_t *y) {
    return linear(x, M, K, w, wscales, group, N, y, 1);
}

/* The same with the scalar loops whatever the CPU: what other CPUs run, for tests. */
int enduro_linear_w8a8_scalar(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w,
                              const float *wscales, int64_t group, int64_t N, uint16_t *y) {
    return linear(x, M, K, w, wscales, group, N, y, 0);
}

/* The same activations' quantization, exported so tests can check it against torch's:
 * q [M, K] int8, scales and corrections [M, K / group]. */
void enduro_quantize_rows(const uint16_t *x, int64_t M, int64_t K, int64_t group, int8_t *q,
                          float *scales, int32_t *corrections) {
    quantize_rows(x, M, K, group, q, scales, corrections);
}
