/* A step's next tokens from its logits: a greedy row's first largest logit, and for a
 * sampled row a draw from softmax(logits / temperature), found by inverting the row's
 * cumulative weights at its uniform, as runner/sampler.py's inverse_cdf_draw does over
 * torch's softmax: block sums first, then the running sum inside the chosen block.
 *
 * Why: a row of the default model is 262,144 logits. On the torch path a 16-row step casts
 * the bf16 logits to float32 (16 MB written), runs softmax, sums blocks in float64 and
 * searches them: ≈4 ms of a 29 ms step. Here each row is read in its own dtype, twice (its
 * max, then its block sums) and its chosen block once more.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "vexp.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define VECTOR 1
#endif

#define BLOCK 512 /* logits whose weights are summed together before the search */

static inline float logit_at(const void *row, int is_bf16, int64_t i) {
    return is_bf16 ? bf16_to_float(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

#ifdef VECTOR
static inline __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
}

/* logits i .. i + 15 as float32; lanes at or past `end` are -inf */
static inline __m512 load_logits(const void *row, int is_bf16, int64_t i, int64_t end) {
    const __mmask16 mask = first_lanes(end - i);
    const __m512 none = _mm512_set1_ps(-INFINITY);
    if (is_bf16) {
        const __m256i half = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)row + i);
        const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
        return _mm512_mask_blend_ps(mask, none, x);
    }
    return _mm512_mask_loadu_ps(none, mask, (const float *)row + i);
}
#endif

static float row_max(const void *row, int is_bf16, int64_t vocab) {
    int64_t i = 0;
    float top = -INFINITY;
#ifdef VECTOR
    __m512 tops = _mm512_set1_ps(-INFINITY);
    for (; i < vocab; i += 16) tops = _mm512_max_ps(tops, load_logits(row, is_bf16, i, vocab));
    top = _mm512_reduce_max_ps(tops);
#endif
    for (; i < vocab; i++) top = logit_at(row, is_bf16, i) > top ? logit_at(row, is_bf16, i) : top;
    return top;
}

/* The first index holding `top` (0 if none does: a row of NaNs) */
static int64_t first_index_of(const void *row, int is_bf16, int64_t vocab, float top) {
    int64_t i = 0;
#ifdef VECTOR
    const __m512 target = _mm512_set1_ps(top);
    for (; i < vocab; i += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(load_logits(row, is_bf16, i, vocab), target, _CMP_EQ_OQ);
        if (hit) return i + __builtin_ctz(hit);
    }
    return 0;
#endif
    for (; i < vocab; i++)
        if (logit_at(row, is_bf16, i) == top) return i;
    return 0;
}

/* weights[0 : end - start] = e^((logit - top) / t) for logits start .. end - 1; their sum */
static double block_weights(const void *row, int is_bf16, int64_t start, int64_t end, float top,
                            float inverse_t, float *weights) {
    int64_t i = start;
    double total = 0.0;
#ifdef VECTOR
    const __m512 shift = _mm512_set1_ps(top), scale = _mm512_set1_ps(inverse_t);
    __m512 sums = _mm512_setzero_ps();
    for (; i < end; i += 16) {
        /* lanes past the end and -inf logits (masked tokens) weigh exactly 0 */
        const __m512 x = load_logits(row, is_bf16, i, end);
        const __mmask16 mask = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 w = _mm512_maskz_mov_ps(mask, exp16(_mm512_mul_ps(_mm512_sub_ps(x, shift), scale)));
        if (weights) _mm512_mask_storeu_ps(weights + (i - start), first_lanes(end - i), w);
        sums = _mm512_add_ps(sums, w);
    }
    total = _mm512_reduce_add_ps(sums);
#endif
    for (; i < end; i++) {
        const float w = expf((logit_at(row, is_bf16, i) - top) * inverse_t);
        if (weights) weights[i - start] = w;
        total += w;
    }
    return total;
}

static int64_t draw(const void *row, int is_bf16, int64_t vocab, float temperature,
                    double uniform, double *sums, float *weights) {
    const float top = row_max(row, is_bf16, vocab), inverse_t = 1.0f / temperature;
    const int64_t num_blocks = (vocab + BLOCK - 1) / BLOCK;
    double total = 0.0;
    for (int64_t b = 0; b < num_blocks; b++) {
        const int64_t end = (b + 1) * BLOCK < vocab ? (b + 1) * BLOCK : vocab;
        sums[b] = block_weights(row, is_bf16, b * BLOCK, end, top, inverse_t, NULL);
        total += sums[b];
    }
    /* The first block whose cumulative sum passes the target; where rounding leaves the
     * target past them all, the last block with weight. */
    const double target = uniform * total;
    double before = 0.0;
    int64_t block = -1, last = 0;
    for (int64_t b = 0; b < num_blocks; b++) {
        if (sums[b] > 0.0) last = b;
        if (block < 0 && sums[b] > 0.0 && before + sums[b] > target) block = b;
        if (block < 0) before += sums[b];
    }
    if (block < 0) {
        block = last;
        before = 0.0;
        for (int64_t b = 0; b < last; b++) before += sums[b];
    }
    const int64_t start = block * BLOCK, end = start + BLOCK < vocab ? start + BLOCK : vocab;
    block_weights(row, is_bf16, start, end, top, inverse_t, weights);
    double running = before;
    int64_t chosen = -1, last_weighted = start;
    for (int64_t i = start; i < end; i++) {
        const float w = weights[i - start];
        if (w > 0.0f) last_weighted = i;
        running += w;
        if (w > 0.0f && running > target) {
            chosen = i;
            break;
        }
    }
    return chosen >= 0 ? chosen : last_weighted;
}

/*
 * logits:       [R, V], bf16 (is_bf16) or float32
 * temperatures: [R] float32; <= 0: greedy
 * uniforms:     [R] float64 in [0, 1), one per row (unused by greedy rows)
 * tokens:       [R] int64, out
 * Returns 0, or -1 if scratch memory could not be allocated.
 */
int enduro_sample(const void *logits, int is_bf16, int64_t num_rows, int64_t vocab,
                  const float *temperatures, const double *uniforms, int64_t *tokens) {
    const size_t row_bytes = (size_t)vocab * (is_bf16 ? 2 : 4);
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed) if (num_rows > 1)
    for (int64_t r = 0; r < num_rows; r++) {
        const void *row = (const char *)logits + (size_t)r * row_bytes;
        if (!(temperatures[r] > 0.0f)) {
            tokens[r] = first_index_of(row, is_bf16, vocab, row_max(row, is_bf16, vocab));
            continue;
        }
        double *sums = malloc(sizeof(double) * (size_t)((vocab + BLOCK - 1) / BLOCK));
        float *weights = malloc(sizeof(float) * BLOCK);
        if (sums == NULL || weights == NULL) {
            failed = 1;
        } else {
            tokens[r] = draw(row, is_bf16, vocab, temperatures[r], uniforms[r], sums, weights);
        }
        free(sums);
        free(weights);
    }
    return failed ? -1 : 0;
}
