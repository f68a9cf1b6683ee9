/* Attention of prompt chunks (several new tokens per request) over enduro's paged KV cache,
 * causal and optionally windowed: bf16 in and out, float32 scores, softmax and sums.
 *
 * Why: torch's CPU path gathers each request's blocks into a padded copy, scatters the
 * queries into a padded layout, and runs scaled_dot_product_attention with a boolean mask,
 * which on this machine spends 6.4 ms a layer on a 512-token prompt of the default model
 * (4 heads of 256 sharing one KV head), ≈85 G multiply-adds/s, computing the masked half
 * too. Here keys and values are read from their blocks in place and only the keys a query
 * can see are scored.
 *
 * Layout: a task holds 16 query rows of one KV head (a row is a token and one of the query
 * heads that share the KV head), one row per vector lane, so that the online softmax
 * (running max, sum and rescaling) is lane-wise with no horizontal reductions:
 *   scores of key j = sum over d of q[row][d] * k[j][d], 16 rows at once: AVX512-BF16 dot
 *     products of the queries transposed into (d, d + 1) pairs by lane, against the key's
 *     pair broadcast;
 *   out[row][d] += p[row][j] * v[j][d]: for each d, AVX512-BF16 dot products of the 16 rows'
 *     weights of keys (j, j + 1) by the pair (v[j][d], v[j + 1][d]) broadcast, into a float32
 *     accumulator transposed the same way.
 * Keys go 16 at a time, from the first any row of the task sees to the last.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "paged.h"
#include "vexp.h"
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define VECTOR 1
#endif

#define LANES 16 /* query rows of a task */
#define CHUNK 16 /* keys scored between two softmax updates */

/* What a task's query rows are: where to read them, the positions they sit at and the first
 * key each one may see (int32 lanes: contexts are far below 2^31 tokens). Lanes past `rows`
 * are idle: position -1, so they see no key. */
typedef struct {
    const uint16_t *q[LANES];
    uint16_t *out[LANES];
    int32_t pos[LANES];
    int32_t first_key[LANES];
    int rows;
} Rows;

static void task_rows(Rows *t, const uint16_t *q, uint16_t *out, int64_t query_start,
                      int64_t query_len, int64_t seq_len, int64_t window, int64_t kv_head,
                      int64_t group, int64_t num_heads, int64_t head_dim, int64_t first_row) {
    t->rows = 0;
    for (int i = 0; i < LANES; i++) {
        t->pos[i] = -1;
        t->first_key[i] = 0;
    }
    for (int i = 0; i < LANES; i++) {
        const int64_t row = first_row + i;
        if (row >= query_len * group) break;
        const int64_t token = row / group, head = kv_head * group + row % group;
        const int64_t offset = ((query_start + token) * num_heads + head) * head_dim;
        const int64_t pos = seq_len - query_len + token;
        t->q[i] = q + offset;
        t->out[i] = out + offset;
        t->pos[i] = (int32_t)pos;
        t->first_key[i] = (int32_t)(window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0);
        t->rows++;
    }
}

#ifdef VECTOR
/* Scratch of a task, 64-byte aligned: queries as (d, d + 1) pairs by lane [D / 2][16], the
 * transposed accumulator [D][16], a chunk of values as (key j, key j + 1) pairs of each dim
 * [CHUNK / 2][D]. */
static int vector_task(const Rows *t, const uint16_t *k_cache, const uint16_t *v_cache,
                       const int64_t *table, int64_t table_start, int64_t kv_head,
                       int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale) {
    const int64_t pairs = head_dim / 2;
    float *scratch = aligned_alloc(64, sizeof(float) * (size_t)(pairs * LANES + head_dim * LANES +
                                                                CHUNK / 2 * head_dim));
    if (scratch == NULL) return -1;
    uint32_t *qt = (uint32_t *)scratch;
    float *acc = scratch + pairs * LANES;
    uint32_t *values = (uint32_t *)(acc + head_dim * LANES);
    memset(scratch, 0, sizeof(float) * (size_t)(pairs * LANES + head_dim * LANES));
    int64_t lowest = INT64_MAX, highest = -1;
    for (int i = 0; i < t->rows; i++) {
        const uint32_t *row = (const uint32_t *)t->q[i];
        for (int64_t d = 0; d < pairs; d++) qt[d * LANES + i] = row[d];
        lowest = t->first_key[i] < lowest ? t->first_key[i] : lowest;
        highest = t->pos[i] > highest ? t->pos[i] : highest;
    }
    const __m512i last_seen = _mm512_loadu_si512(t->pos), first_seen = _mm512_loadu_si512(t->first_key);
    __m512 top = _mm512_set1_ps(-1e30f), total = _mm512_setzero_ps();
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY), scale16 = _mm512_set1_ps(scale);
    for (int64_t start = lowest; start <= highest; start += CHUNK) {
        const int keys = highest - start + 1 < CHUNK ? (int)(highest - start + 1) : CHUNK;
        const uint32_t *k_rows[CHUNK];
        const uint16_t *v_rows[CHUNK];
        for (int j = 0; j < keys; j++) {
            const int64_t slot = slot_of(table, table_start, start + j, block_size);
            k_rows[j] = (const uint32_t *)(k_cache + (slot * num_kv_heads + kv_head) * head_dim);
            v_rows[j] = v_cache + (slot * num_kv_heads + kv_head) * head_dim;
        }
        /* values of keys j and j + 1 side by side in each dim's 32 bits (an odd last key's
         * partner is 0, as is its weight) */
        for (int j = 0; j < keys; j += 2) {
            for (int64_t d = 0; d < head_dim; d += 16) {
                const __m512i low = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v_rows[j] + d)));
                const __m512i high = j + 1 < keys ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                                        (const __m256i *)(v_rows[j + 1] + d)))
                                                  : _mm512_setzero_si512();
                _mm512_store_si512(values + j / 2 * head_dim + d,
                                   _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
            }
        }
        __m512 score[CHUNK];
        int j = 0;
        /* 8 keys at a time, each summed in two halves of the pairs (even, odd): 16
         * independent chains of dot products, enough to cover their latency (4 chains held
         * this loop to a third of the unit's throughput). */
        for (; j + 8 <= keys; j += 8) {
            __m512 even[8], odd[8];
            for (int u = 0; u < 8; u++) even[u] = odd[u] = _mm512_setzero_ps();
            for (int64_t d = 0; d < pairs; d += 2) {
                const __m512bh q0 = (__m512bh)_mm512_load_si512(qt + d * LANES);
                const __m512bh q1 = (__m512bh)_mm512_load_si512(qt + (d + 1) * LANES);
                for (int u = 0; u < 8; u++) {
                    even[u] = _mm512_dpbf16_ps(even[u], q0, (__m512bh)_mm512_set1_epi32((int)k_rows[j + u][d]));
                    odd[u] = _mm512_dpbf16_ps(odd[u], q1, (__m512bh)_mm512_set1_epi32((int)k_rows[j + u][d + 1]));
                }
            }
            for (int u = 0; u < 8; u++) score[j + u] = _mm512_add_ps(even[u], odd[u]);
        }
        for (; j < keys; j++) {
            __m512 s = _mm512_setzero_ps();
            for (int64_t d = 0; d < pairs; d++)
                s = _mm512_dpbf16_ps(s, (__m512bh)_mm512_load_si512(qt + d * LANES),
                                     (__m512bh)_mm512_set1_epi32((int)k_rows[j][d]));
            score[j] = s;
        }
        /* Keys a row may not see (after it, or before its window) weigh exactly 0. */
        __mmask16 seen[CHUNK];
        __m512 new_top = top;
        for (j = 0; j < keys; j++) {
            const __m512i key = _mm512_set1_epi32((int32_t)(start + j));
            seen[j] = _mm512_cmple_epi32_mask(key, last_seen) & _mm512_cmpge_epi32_mask(key, first_seen);
            score[j] = _mm512_mask_mul_ps(minus_inf, seen[j], score[j], scale16);
            new_top = _mm512_max_ps(new_top, score[j]);
        }
        const __m512 rescale = exp16(_mm512_sub_ps(top, new_top));
        top = new_top;
        total = _mm512_mul_ps(total, rescale);
        for (j = 0; j < keys; j++) {
            score[j] = _mm512_maskz_mov_ps(seen[j], exp16(_mm512_sub_ps(score[j], top)));
            total = _mm512_add_ps(total, score[j]);
        }
        /* The weights of keys j and j + 1 as a bf16 pair per lane, so that the sums of
         * values are AVX512-BF16 dot products too (32 products an instruction, not 16): the
         * weights are rounded to bf16 for them, as torch's CPU flash attention rounds its
         * probabilities before their product with bf16 values; the sum that divides them
         * stays float32. */
        __m512bh weights[CHUNK / 2];
        for (j = 0; j < keys; j += 2) {
            const __m512 next = j + 1 < keys ? score[j + 1] : _mm512_setzero_ps();
            const __m512i low = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(score[j]));
            const __m512i high = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(next));
            weights[j / 2] = (__m512bh)_mm512_or_si512(low, _mm512_slli_epi32(high, 16));
        }
        const int key_pairs = (keys + 1) / 2;
        for (int64_t d0 = 0; d0 < head_dim; d0 += 16) {
            __m512 a[16];
            for (int e = 0; e < 16; e++) a[e] = _mm512_mul_ps(_mm512_load_ps(acc + (d0 + e) * LANES), rescale);
            for (int jp = 0; jp < key_pairs; jp++) {
                const uint32_t *v = values + jp * head_dim + d0;
                for (int e = 0; e < 16; e++)
                    a[e] = _mm512_dpbf16_ps(a[e], weights[jp], (__m512bh)_mm512_set1_epi32((int)v[e]));
            }
            for (int e = 0; e < 16; e++) _mm512_store_ps(acc + (d0 + e) * LANES, a[e]);
        }
    }
    float sums[LANES];
    _mm512_storeu_ps(sums, total);
    for (int i = 0; i < t->rows; i++) {
        const float inverse = 1.0f / sums[i];
        for (int64_t d = 0; d < head_dim; d++) t->out[i][d] = float_to_bf16(acc[d * LANES + i] * inverse);
    }
    free(scratch);
    return 0;
}
#endif

/* One row at a time, for CPUs without AVX512-BF16 (and head dims the vector path does not
 * take): the same sums in the same order of keys. */
static int scalar_task(const Rows *t, const uint16_t *k_cache, const uint16_t *v_cache,
                       const int64_t *table, int64_t table_start, int64_t kv_head,
                       int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale) {
    float *scratch = malloc(sizeof(float) * (size_t)(2 * head_dim));
    if (scratch == NULL) return -1;
    float *qf = scratch, *acc = scratch + head_dim;
    for (int i = 0; i < t->rows; i++) {
        for (int64_t d = 0; d < head_dim; d++) {
            qf[d] = bf16_to_float(t->q[i][d]);
            acc[d] = 0.0f;
        }
        float top = -1e30f, total = 0.0f;
        for (int64_t p = t->first_key[i]; p <= t->pos[i]; p++) {
            const int64_t slot = slot_of(table, table_start, p, block_size);
            const uint16_t *k = k_cache + (slot * num_kv_heads + kv_head) * head_dim;
            const uint16_t *v = v_cache + (slot * num_kv_heads + kv_head) * head_dim;
            float s = 0.0f;
            for (int64_t d = 0; d < head_dim; d++) s += qf[d] * bf16_to_float(k[d]);
            s *= scale;
            if (s > top) {
                const float rescale = expf(top - s);
                total *= rescale;
                for (int64_t d = 0; d < head_dim; d++) acc[d] *= rescale;
                top = s;
            }
            const float w = expf(s - top);
            total += w;
            for (int64_t d = 0; d < head_dim; d++) acc[d] += w * bf16_to_float(v[d]);
        }
        for (int64_t d = 0; d < head_dim; d++) t->out[i][d] = float_to_bf16(acc[d] / total);
    }
    free(scratch);
    return 0;
}

/*
 * q:            [T, Hq, D] bf16, the step's new tokens, request after request
 * k_cache:      [num_blocks, block_size, Hkv, D] bf16 (v_cache alike), this step's K/V written
 * tables:       [R, table_width] int64 block ids; slot 0 holds position table_starts[r]
 * query_starts: [R + 1] int64, request r's tokens are query_starts[r] .. query_starts[r + 1] - 1
 * seq_lens:     [R] int64 keys in each request's context, this step's tokens included
 * window:       a token at position p sees keys p - window + 1 .. p; 0: keys 0 .. p
 * out:          [T, Hq, D] bf16
 * Query head i reads KV head i / (Hq / Hkv), as torch's enable_gqa does.
 * Returns 0, or -1 if a task's scratch could not be allocated.
 */
int enduro_prefill_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                             const int64_t *tables, int64_t table_width,
                             const int64_t *table_starts, const int64_t *query_starts,
                             const int64_t *seq_lens, int64_t window, int64_t num_requests,
                             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t block_size, float scale, uint16_t *out) {
    const int64_t group = num_heads / num_kv_heads;
    /* tasks of request r: first_task[r] .. first_task[r + 1] - 1, each KV head's rows in
     * tiles of LANES */
    int64_t *first_task = malloc(sizeof(int64_t) * (size_t)(num_requests + 1));
    if (first_task == NULL) return -1;
    first_task[0] = 0;
    for (int64_t r = 0; r < num_requests; r++) {
        const int64_t rows = (query_starts[r + 1] - query_starts[r]) * group;
        first_task[r + 1] = first_task[r] + num_kv_heads * ((rows + LANES - 1) / LANES);
    }
    const int64_t num_tasks = first_task[num_requests];
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int64_t task = 0; task < num_tasks; task++) {
        int64_t r = 0;
        while (first_task[r + 1] <= task) r++;
        const int64_t query_len = query_starts[r + 1] - query_starts[r];
        const int64_t tiles = (query_len * group + LANES - 1) / LANES;
        const int64_t kv_head = (task - first_task[r]) / tiles, tile = (task - first_task[r]) % tiles;
        Rows rows;
        task_rows(&rows, q, out, query_starts[r], query_len, seq_lens[r], window, kv_head, group,
                  num_heads, head_dim, tile * LANES);
        const int64_t *table = tables + r * table_width;
#ifdef VECTOR
        if (head_dim % 16 == 0) {
            failed |= vector_task(&rows, k_cache, v_cache, table, table_starts[r], kv_head,
                                  num_kv_heads, head_dim, block_size, scale) != 0;
            continue;
        }
#endif
        failed |= scalar_task(&rows, k_cache, v_cache, table, table_starts[r], kv_head,
                              num_kv_heads, head_dim, block_size, scale) != 0;
    }
    free(first_task);
    return failed ? -1 : 0;
}
