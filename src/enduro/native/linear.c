/* y = x @ (q * scale)^T for weight-only int8 layers: x [M, K] bf16, q [N, K] int8 with one
 * bf16 scale per output row, y [M, N] bf16. Products are summed in float32 and scaled once.
 * The same loop serves bf16 weights (no scales), read in place: the native decode layer's
 * projections in an unquantized model (decode_layer.c).
 *
 * Why: a decode step multiplies a handful of rows by every weight of the model once, so it
 * is bound by the bytes of weight it reads. int8 halves them against bf16, but torch's CPU
 * int8 kernel (_weight_int8pack_mm) barely beats oneDNN's packed bf16 at one row and is 4x
 * slower than it at 16 (benchmarks/README.md). Here each block of weight rows is widened to
 * bf16 once, into a buffer that stays in L1, and every row of x is then multiplied by it
 * with AVX512-BF16 dot products (32 products an instruction): the conversion is paid once
 * per weight whatever M is. An int8 value is exact in bf16, so nothing is lost there.
 *
 * Threads split the output rows (N), each thread a contiguous range.
 */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "threads.h"
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define VECTOR 1
#endif

#define BLOCK_ROWS 4 /* weight rows widened together: 4 x 4 accumulators with 4 rows of x */

#ifdef VECTOR
/* 32 int8 weights -> 32 bf16, in the pair order _mm512_dpbf16_ps multiplies them in. */
static inline __m512i widen32(const int8_t *q) {
    __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
    __m512 high =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
    return (__m512i)_mm512_cvtne2ps_pbh(high, low);
}

/* rows [m0, m0 + mr) of x against `rows` widened weight rows; mr, rows <= 4; K % 32 == 0 */
static inline void tile(const uint16_t *x, int64_t K, int64_t m0, int64_t mr, const uint16_t *w,
                        int64_t rows, float sums[BLOCK_ROWS][BLOCK_ROWS], const char *ahead,
                        int64_t ahead_row, int64_t ahead_step) {
    __m512 acc[BLOCK_ROWS][BLOCK_ROWS];
    for (int i = 0; i < BLOCK_ROWS; i++)
        for (int j = 0; j < BLOCK_ROWS; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512i wv[BLOCK_ROWS];
        for (int j = 0; j < rows; j++) wv[j] = _mm512_loadu_si512(w + j * K + k);
        if (ahead)
            for (int j = 0; j < BLOCK_ROWS; j++)
                _mm_prefetch(ahead + j * ahead_row + k / 32 * ahead_step, _MM_HINT_T0);
        for (int i = 0; i < mr; i++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + i) * K + k);
            for (int j = 0; j < rows; j++)
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, (__m512bh)wv[j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < rows; j++) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}
#endif

static inline float weight_at(const void *weight, int is_int8, int64_t index) {
    return is_int8 ? (float)((const int8_t *)weight)[index]
                   : bf16_to_float(((const uint16_t *)weight)[index]);
}

static void scalar_rows(const uint16_t *x, int64_t M, int64_t K, const void *weight, int is_int8,
                        const uint16_t *scales, int64_t N, int64_t n0, int64_t n1, uint16_t *y) {
    for (int64_t n = n0; n < n1; n++) {
        const float scale = scales ? bf16_to_float(scales[n]) : 1.0f;
        for (int64_t m = 0; m < M; m++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++)
                s += bf16_to_float(x[m * K + k]) * weight_at(weight, is_int8, n * K + k);
            y[m * N + n] = float_to_bf16(s * scale);
        }
    }
}

/* y = x @ (weight * scales)^T: int8 weights with one scale per row, or bf16 weights (scales
 * NULL), which the dot products read in place. */
void enduro_linear(const uint16_t *x, int64_t M, int64_t K, const void *weight, int is_int8,
                   const uint16_t *scales, int64_t N, uint16_t *y) {
#pragma omp parallel
    {
        /* Each thread takes whole blocks of rows, so no two widen the same weights. */
        int64_t first, last;
        thread_share((N + BLOCK_ROWS - 1) / BLOCK_ROWS, &first, &last);
        const int64_t n0 = first * BLOCK_ROWS;
        const int64_t n1 = last * BLOCK_ROWS < N ? last * BLOCK_ROWS : N;
#ifdef VECTOR
        if (K % 32 == 0) {
            uint16_t *widened =
                is_int8 ? aligned_alloc(64, (size_t)(BLOCK_ROWS * K * 2 + 63) / 64 * 64) : 0;
            float sums[BLOCK_ROWS][BLOCK_ROWS];
            const int64_t bytes = is_int8 ? 1 : 2;
            for (int64_t n = n0; n < n1; n += BLOCK_ROWS) {
                const int64_t rows = n1 - n < BLOCK_ROWS ? n1 - n : BLOCK_ROWS;
                const uint16_t *w = (const uint16_t *)weight + n * K;
                if (is_int8) {
                    const int8_t *q = (const int8_t *)weight + n * K;
                    for (int64_t j = 0; j < rows; j++)
                        for (int64_t k = 0; k < K; k += 32)
                            _mm512_storeu_si512(widened + j * K + k, widen32(q + j * K + k));
                    w = widened;
                }
                for (int64_t m = 0; m < M; m += BLOCK_ROWS) {
                    const int64_t mr = M - m < BLOCK_ROWS ? M - m : BLOCK_ROWS;
                    /* From 5 rows of x on, the first pass over this block fetches the next
                     * block's weights into L1: at 16 rows the 72 decoder projections took
                     * 11.5 → 9.3 ms (bf16) and the int8 output projection 18.2 → 11.3 ms; with
                     * fewer rows the hardware prefetcher keeps up alone. */
                    const char *ahead = m == 0 && M > 4 && n + 2 * BLOCK_ROWS <= n1
                                            ? (const char *)weight + (n + BLOCK_ROWS) * K * bytes
                                            : 0;
                    const int64_t row = K * bytes, step = 32 * bytes;
                    /* constant sizes, so the accumulators stay in registers */
                    if (rows == BLOCK_ROWS && mr == 4) tile(x, K, m, 4, w, 4, sums, ahead, row, step);
                    else if (rows == BLOCK_ROWS && mr == 1) tile(x, K, m, 1, w, 4, sums, ahead, row, step);
                    else if (rows == BLOCK_ROWS && mr == 2) tile(x, K, m, 2, w, 4, sums, ahead, row, step);
                    else tile(x, K, m, mr, w, rows, sums, ahead, row, step);
                    for (int64_t i = 0; i < mr; i++)
                        for (int64_t j = 0; j < rows; j++)
                            y[(m + i) * N + n + j] = float_to_bf16(
                                sums[i][j] * (scales ? bf16_to_float(scales[n + j]) : 1.0f));
                }
            }
            free(widened);
        } else
#endif
            scalar_rows(x, M, K, weight, is_int8, scales, N, n0, n1, y);
    }
}

void enduro_linear_int8(const uint16_t *x, int64_t M, int64_t K, const int8_t *q,
                        const uint16_t *scales, int64_t N, uint16_t *y) {
    enduro_linear(x, M, K, q, 1, scales, N, y);
}

void enduro_linear_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *weight,
                        int64_t N, uint16_t *y) {
    enduro_linear(x, M, K, weight, 0, 0, N, y);
}
