/* Decode attention over enduro's paged KV cache: one query token per request, bf16 in and
 * out, float32 inside. Built at run time by enduro/native/__init__.py with the machine's C
 * compiler (-O3 -march=native -fopenmp) and called through ctypes.
 *
 * Why: torch has no paged attention on CPU, so the eager path copies every request's blocks
 * into one padded tensor (index_select) and then runs scaled_dot_product_attention on the
 * copy: each K/V byte is read twice and written once. Here each is read once, straight from
 * its block.
 *
 * With AVX512-BF16 and a head dim that is a multiple of 32 (the default model's 256), the
 * scores are bf16 dot products (32 products an instruction, no float32 copy of each key),
 * the softmax runs 16 keys at a time, and the weighted sum of values keeps every query head
 * of the group in registers while each value row is read once. Otherwise one float32 dot
 * product and one axpy per key and head.
 *
 * The OpenMP runtime is the one torch already loaded (the soname libgomp.so.1 resolves to
 * the library in the process), so these threads are torch's intra-op threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "bf16.h"
#include "paged.h"
#include "vexp.h"
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define VECTOR 1
#endif
/* Keys ahead whose K (or V) lines are fetched while this one is scored. A request's blocks
 * lie anywhere in the pool (each request grows a block at a time, interleaved with the
 * others), so the hardware prefetcher finds no stream longer than a block: without this, 18
 * layers of 16 requests x 192 keys took 5.6 ms; with it 2.4 ms (benchmarks/README.md). */
#define AHEAD 16

/* row[0:n] = bf16 src as float32; n is the head dim. */
static inline void load_row(float *row, const uint16_t *src, int64_t n) {
    int64_t d = 0;
#ifdef __AVX512F__
    /* bf16 is the high half of a float32: widen each 16-bit lane and shift it up. */
    for (; d + 16 <= n; d += 16) {
        __m256i half = _mm256_loadu_si256((const __m256i *)(src + d));
        __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16);
        _mm512_storeu_ps(row + d, _mm512_castsi512_ps(wide));
    }
#endif
    for (; d < n; d++) row[d] = bf16_to_float(src[d]);
}

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t d = 0;
    float s = 0.0f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; d < n; d++) s += a[d] * b[d];
    return s;
}

/* acc[0:n] += w * row[0:n] */
static inline void axpy(float *acc, float w, const float *row, int64_t n) {
    int64_t d = 0;
#ifdef __AVX512F__
    __m512 weight = _mm512_set1_ps(w);
    for (; d + 16 <= n; d += 16)
        _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(weight, _mm512_loadu_ps(row + d), _mm512_loadu_ps(acc + d)));
#endif
    for (; d < n; d++) acc[d] += w * row[d];
}

#ifdef VECTOR
/* One task (a request, a KV head and its `group` query heads) with AVX512-BF16, for head
 * dims that are a multiple of 32: scores by bf16 dot products of each key against the
 * group's queries (read as bf16, scaled after), a vectorised softmax, then the weighted sum
 * of values with the group's accumulators in registers, 64 dims at a time. */
static int vector_task(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                       const int64_t *table, int64_t table_start, int64_t start, int64_t n,
                       int64_t kv_head, int64_t num_kv_heads, int64_t group, int64_t head_dim,
                       int64_t block_size, float scale, uint16_t *out) {
    const int64_t padded = (n + 15) / 16 * 16;
    float *scores = aligned_alloc(64, sizeof(float) * (size_t)(group * padded));
    if (scores == NULL) return -1;
    const int64_t row_bytes = head_dim * (int64_t)sizeof(uint16_t);
    for (int64_t i = 0; i < n; i++) {
        const int64_t slot = slot_of(table, table_start, start + i, block_size);
        const uint16_t *k = k_cache + (slot * num_kv_heads + kv_head) * head_dim;
        if (i + AHEAD < n) {
            const int64_t next = slot_of(table, table_start, start + i + AHEAD, block_size);
            const char *line = (const char *)(k_cache + (next * num_kv_heads + kv_head) * head_dim);
            for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(line + b, _MM_HINT_T0);
        }
        for (int64_t g = 0; g < group; g++) {
            const uint16_t *qg = q + g * head_dim;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t d = 0; d < head_dim; d += 32)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qg + d),
                                       (__m512bh)_mm512_loadu_si512(k + d));
            scores[g * padded + i] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    /* softmax of each head's scores, 16 at a time; the padding weighs 0 */
    for (int64_t g = 0; g < group; g++) {
        float *sg = scores + g * padded;
        for (int64_t i = n; i < padded; i++) sg[i] = -INFINITY;
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int64_t i = 0; i < padded; i += 16) top = _mm512_max_ps(top, _mm512_load_ps(sg + i));
        const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        __m512 total = _mm512_setzero_ps();
        for (int64_t i = 0; i < padded; i += 16) {
            const __m512 x = _mm512_load_ps(sg + i);
            const __mmask16 real = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            const __m512 w = _mm512_maskz_mov_ps(real, exp16(_mm512_sub_ps(x, shift)));
            _mm512_store_ps(sg + i, w);
            total = _mm512_add_ps(total, w);
        }
        const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
        for (int64_t i = 0; i < padded; i += 16)
            _mm512_store_ps(sg + i, _mm512_mul_ps(_mm512_load_ps(sg + i), inverse));
    }
    /* out[g] = sum of weights x values: 64 dims of up to 4 heads in 16 registers */
    for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const int64_t heads = group - g0 < 4 ? group - g0 : 4;
        for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
            const int64_t width = head_dim - d0 < 64 ? (head_dim - d0) / 16 : 4;
            __m512 acc[4][4];
            for (int h = 0; h < 4; h++)
                for (int c = 0; c < 4; c++) acc[h][c] = _mm512_setzero_ps();
            for (int64_t i = 0; i < n; i++) {
                const int64_t slot = slot_of(table, table_start, start + i, block_size);
                const uint16_t *v = v_cache + (slot * num_kv_heads + kv_head) * head_dim + d0;
                if (i + AHEAD < n) {
                    const int64_t next = slot_of(table, table_start, start + i + AHEAD, block_size);
                    const char *line =
                        (const char *)(v_cache + (next * num_kv_heads + kv_head) * head_dim + d0);
                    for (int64_t b = 0; b < 32 * width; b += 64) _mm_prefetch(line + b, _MM_HINT_T0);
                }
                __m512 values[4];
                for (int c = 0; c < width; c++) values[c] = load16(v + 16 * c);
                for (int h = 0; h < heads; h++) {
                    const __m512 w = _mm512_set1_ps(scores[(g0 + h) * padded + i]);
                    for (int c = 0; c < width; c++) acc[h][c] = _mm512_fmadd_ps(w, values[c], acc[h][c]);
                }
            }
            for (int h = 0; h < heads; h++) {
                uint16_t *og = out + (g0 + h) * head_dim + d0;
                float row[64];
                for (int c = 0; c < width; c++) _mm512_storeu_ps(row + 16 * c, acc[h][c]);
                for (int64_t d = 0; d < 16 * width; d++) og[d] = float_to_bf16(row[d]);
            }
        }
    }
    free(scores);
    return 0;
}
#endif

/*
 * q:            [R, Hq, D] bf16, the step's queries (one per request)
 * k_cache:      [num_blocks, block_size, Hkv, D] bf16 (v_cache alike)
 * tables:       [R, table_width] int64 block ids; slot 0 holds position table_starts[r]
 * key_starts:   [R] first key position each request attends (0, or the window's start)
 * seq_lens:     [R] keys in each request's context, this step's token included
 * out:          [R, Hq, D] bf16
 * Query head i reads KV head i / (Hq / Hkv), as torch's enable_gqa does.
 * Returns 0, or -1 if a request's scratch could not be allocated.
 */
int enduro_decode_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                            const int64_t *tables, int64_t table_width,
                            const int64_t *table_starts, const int64_t *key_starts,
                            const int64_t *seq_lens, int64_t num_requests, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                            uint16_t *out) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t num_tasks = num_requests * num_kv_heads;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int64_t task = 0; task < num_tasks; task++) {
        const int64_t r = task / num_kv_heads, h = task % num_kv_heads;
        const int64_t start = key_starts[r], n = seq_lens[r] - key_starts[r];
#ifdef VECTOR
        if (head_dim % 32 == 0) {
            const int64_t first = r * num_heads + h * group;
            failed |= vector_task(q + first * head_dim, k_cache, v_cache, tables + r * table_width,
                                  table_starts[r], start, n, h, num_kv_heads, group, head_dim,
                                  block_size, scale, out + first * head_dim) != 0;
            continue;
        }
#endif
        /* queries (scaled), one K/V row, the group's accumulators, then its scores */
        float *scratch = malloc(sizeof(float) * (size_t)(group * head_dim * 2 + head_dim + group * n));
        if (scratch == NULL) {
            failed = 1;
            continue;
        }
        float *qf = scratch, *row = qf + group * head_dim, *acc = row + head_dim;
        float *scores = acc + group * head_dim;
        for (int64_t g = 0; g < group; g++) {
            const uint16_t *qg = q + (r * num_heads + h * group + g) * head_dim;
            for (int64_t d = 0; d < head_dim; d++) qf[g * head_dim + d] = bf16_to_float(qg[d]) * scale;
        }
        const int64_t *table = tables + r * table_width;
        for (int64_t i = 0; i < n; i++) {
            const int64_t slot = slot_of(table, table_starts[r], start + i, block_size);
            const uint16_t *k = k_cache + (slot * num_kv_heads + h) * head_dim;
            load_row(row, k, head_dim);
            for (int64_t g = 0; g < group; g++) scores[g * n + i] = dot(qf + g * head_dim, row, head_dim);
        }
        for (int64_t g = 0; g < group; g++) {
            float *sg = scores + g * n, top = sg[0], total = 0.0f;
            for (int64_t i = 1; i < n; i++) top = sg[i] > top ? sg[i] : top;
            for (int64_t i = 0; i < n; i++) {
                sg[i] = expf(sg[i] - top);
                total += sg[i];
            }
            for (int64_t i = 0; i < n; i++) sg[i] /= total;
        }
        for (int64_t j = 0; j < group * head_dim; j++) acc[j] = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const int64_t slot = slot_of(table, table_starts[r], start + i, block_size);
            const uint16_t *v = v_cache + (slot * num_kv_heads + h) * head_dim;
            load_row(row, v, head_dim);
            for (int64_t g = 0; g < group; g++) axpy(acc + g * head_dim, scores[g * n + i], row, head_dim);
        }
        for (int64_t g = 0; g < group; g++) {
            uint16_t *og = out + (r * num_heads + h * group + g) * head_dim;
            for (int64_t d = 0; d < head_dim; d++) og[d] = float_to_bf16(acc[g * head_dim + d]);
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}
