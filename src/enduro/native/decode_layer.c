/* A whole decoder layer of a decode step (one new token per request) in one call.
 *
 * Why: with a few rows a step, a layer's arithmetic is small and torch's per-op dispatch and
 * the Python between ops are most of its time: ≈60 tensor ops a layer, ≈12 ms of a ≈35 ms
 * one-stream step of the default model (benchmarks/README.md). Here the layer is the other
 * kernels of this library (norms, projections, paged attention) chained in C, with the
 * elementwise work between them (q/k norms and rotary embedding, the cache write, the gated
 * activation, the residual adds) done in place on small buffers.
 *
 * Rounding follows enduro's eager layer (models/decoder_layers.py, models/fused.py): every
 * tensor between two ops is rounded to bf16 where the eager one is. The activations are
 * computed in float32 by another formula than torch's, so a value may round one bf16 step
 * apart; tests/models/test_native_layer.py compares the two paths.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "bf16.h"
#include "vexp.h"

void enduro_rms_norm(const uint16_t *x, int64_t rows, int64_t dim, int64_t inner,
                     int64_t outer_stride, const uint16_t *weight, float eps, int unit_offset,
                     const uint16_t *residual, uint16_t *out);
void enduro_linear(const uint16_t *x, int64_t M, int64_t K, const void *weight, int is_int8,
                   const uint16_t *scales, int64_t N, uint16_t *y);
int enduro_linear_w8a8(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w,
                       const float *wscales, int64_t group, int64_t N, uint16_t *y);
int enduro_decode_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                            const int64_t *tables, int64_t table_width,
                            const int64_t *table_starts, const int64_t *key_starts,
                            const int64_t *seq_lens, int64_t num_requests, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                            uint16_t *out);

/* Mirrored by ctypes Structures in enduro/models/native_layer.py: keep the two in step. */
typedef struct {
    const void *weight;   /* [out_features, in_features] int8 or bf16, or packed for w8a8 */
    const void *scales;   /* [out_features] bf16 for int8 weights, float32 for w8a8; NULL for bf16 */
    const uint16_t *bias; /* [out_features] bf16, or NULL */
    int64_t out_features;
    int64_t group; /* w8a8: inputs per activation scale (linear_w8a8.c); 0 for the others */
} Projection;

enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

typedef struct {
    int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate, rotary_dim;
    float eps, attn_scale;
    int32_t unit_offset, sandwich, activation, rope_interleaved;
    /* [hidden] bf16 each; post_attn_norm and post_mlp_norm only in sandwich layers */
    const uint16_t *input_norm, *post_attn_norm, *mlp_norm, *post_mlp_norm;
    const uint16_t *q_norm, *k_norm; /* [head_dim] bf16, or NULL without QK norm */
    Projection qkv, o, gate_up, down;
} DecodeLayer;

typedef struct {
    uint16_t *k_cache, *v_cache; /* [num_blocks, block_size, num_kv_heads, head_dim] bf16 */
    int64_t block_size;
    const int64_t *slot_mapping; /* [R] where each request's new K/V goes */
    const int64_t *tables;       /* [R, table_width], as in decode_attention.c */
    int64_t table_width;
    const int64_t *table_starts, *key_starts, *seq_lens; /* [R] each */
    const float *cos, *sin;                               /* [R, rotary_dim / 2] float32 */
} DecodeStep;

/* Returns 0, or -1 when the w8a8 kernel could not allocate its scratch memory. */
static int project(const uint16_t *x, int64_t rows, int64_t in_features, const Projection *p,
                   uint16_t *y) {
    if (p->group > 0) {
        if (enduro_linear_w8a8(x, rows, in_features, p->weight, p->scales, p->group,
                               p->out_features, y) != 0)
            return -1;
    } else {
        enduro_linear(x, rows, in_features, p->weight, p->scales != NULL, p->scales,
                      p->out_features, y);
    }
    if (p->bias == NULL) return 0;
    /* eager: the bf16 output, then + bias in bf16 */
    for (int64_t r = 0; r < rows; r++)
        for (int64_t n = 0; n < p->out_features; n++) {
            uint16_t *v = y + r * p->out_features + n;
            *v = float_to_bf16(bf16_to_float(*v) + bf16_to_float(p->bias[n]));
        }
    return 0;
}

/* The rotary embedding of `heads` heads of one token, in place, with the eager bf16 rounding
 * of each product and sum (models/fused.py apply_rotary): pairs (i, i + rotary_dim / 2), or
 * (2i, 2i + 1) interleaved; dims past rotary_dim pass through. */
static void rotate(uint16_t *x, int64_t heads, int64_t head_dim, int64_t rotary_dim,
                   int interleaved, const float *cos, const float *sin) {
    const int64_t half = rotary_dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        uint16_t *head = x + h * head_dim;
        for (int64_t i = 0; i < half; i++) {
            const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
            const float c = round_bf16(cos[i]), s = round_bf16(sin[i]);
            const float x1 = bf16_to_float(head[a]), x2 = bf16_to_float(head[b]);
            head[a] = float_to_bf16(round_bf16(x1 * c) - round_bf16(x2 * s));
            head[b] = float_to_bf16(round_bf16(x2 * c) + round_bf16(x1 * s));
        }
    }
}

/* q [R, Hq, D] and k [R, Hkv, D] from the fused projection's output, normed per head when
 * the model has QK norms, then rotated; k and v written into the cache. */
static void queries_and_cache(const DecodeLayer *L, const DecodeStep *S, int64_t rows,
                              const uint16_t *qkv, uint16_t *q, uint16_t *k) {
    const int64_t D = L->head_dim, width = L->qkv.out_features;
    const int64_t q_size = L->num_heads * D, kv_size = L->num_kv_heads * D;
    if (L->q_norm != NULL) {
        enduro_rms_norm(qkv, rows * L->num_heads, D, L->num_heads, width, L->q_norm, L->eps,
                        L->unit_offset, NULL, q);
        enduro_rms_norm(qkv + q_size, rows * L->num_kv_heads, D, L->num_kv_heads, width,
                        L->k_norm, L->eps, L->unit_offset, NULL, k);
    } else {
        for (int64_t r = 0; r < rows; r++) {
            memcpy(q + r * q_size, qkv + r * width, sizeof(uint16_t) * q_size);
            memcpy(k + r * kv_size, qkv + r * width + q_size, sizeof(uint16_t) * kv_size);
        }
    }
    const int64_t half = L->rotary_dim / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *cos = S->cos + r * half, *sin = S->sin + r * half;
        rotate(q + r * q_size, L->num_heads, D, L->rotary_dim, L->rope_interleaved, cos, sin);
        rotate(k + r * kv_size, L->num_kv_heads, D, L->rotary_dim, L->rope_interleaved, cos, sin);
        const int64_t slot = S->slot_mapping[r];
        memcpy(S->k_cache + slot * kv_size, k + r * kv_size, sizeof(uint16_t) * kv_size);
        memcpy(S->v_cache + slot * kv_size, qkv + r * width + q_size + kv_size,
               sizeof(uint16_t) * kv_size);
    }
}

#ifdef __AVX512F__
static inline __m512 round16(__m512 v) {
    /* float32 → bf16 → float32, round to nearest even (NaN-free inputs here) */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}
#endif

/* act(g) in float32: silu g / (1 + e^-g); gelu (tanh) g * e^2y / (1 + e^2y) with
 * y = sqrt(2 / pi) (g + 0.044715 g^3), which is 0.5 g (1 + tanh y) without its cancellation. */
static inline float activate(float g, int activation) {
    if (activation == ACT_SILU) return g / (1.0f + expf(-g));
    const float y = 0.7978845608f * (g + 0.044715f * g * g * g);
    const float e = expf(fminf(2.0f * y, 80.0f));
    return g * e / (1.0f + e);
}

/* m = bf16(bf16(act(gate)) * up) over [rows, intermediate], gate | up side by side. */
static void act_and_mul(const uint16_t *gate_up, int64_t rows, int64_t inter, int activation,
                        uint16_t *m) {
#pragma omp parallel for if (rows * inter >= (1 << 14))
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * inter, *up = gate + inter;
        uint16_t *out = m + r * inter;
        int64_t i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= inter; i += 16) {
            const __m512 g = load16(gate + i);
            __m512 a;
            if (activation == ACT_SILU) {
                a = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                   exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            } else {
                const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
                const __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f),
                                               _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), g3, g));
                const __m512 e = exp16(_mm512_min_ps(_mm512_add_ps(y, y), _mm512_set1_ps(80.0f)));
                a = _mm512_div_ps(_mm512_mul_ps(g, e), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            }
            const __m512 product = _mm512_mul_ps(round16(a), load16(up + i));
            const __m512i bits = _mm512_castps_si512(round16(product));
            _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
        }
#endif
        for (; i < inter; i++)
            out[i] = float_to_bf16(round_bf16(activate(bf16_to_float(gate[i]), activation)) *
                                   bf16_to_float(up[i]));
    }
}

/* The same for any number of rows, for the prompt path (models/fused.py): activation 0 is
 * silu, 1 gelu (tanh). */
void enduro_act_and_mul(const uint16_t *gate_up, int64_t rows, int64_t inter, int activation,
                        uint16_t *m) {
    act_and_mul(gate_up, rows, inter, activation, m);
}

/* out = bf16(a + b), elementwise over n values */
static void add(const uint16_t *a, const uint16_t *b, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}

/* x [rows, hidden] → out [rows, hidden], the layer's output; the step's K/V written into the
 * cache. Returns 0, or -1 when scratch memory could not be allocated (nothing written then
 * but, possibly, this step's cache slots). */
int enduro_decode_layer(const DecodeLayer *L, const DecodeStep *S, int64_t rows, const uint16_t *x,
                        uint16_t *out) {
    const int64_t H = L->hidden, I = L->intermediate, D = L->head_dim;
    const int64_t q_size = L->num_heads * D, kv_size = L->num_kv_heads * D;
    const int64_t per_row = H * 4 + L->qkv.out_features + q_size * 2 + kv_size + I * 3;
    uint16_t *scratch = malloc(sizeof(uint16_t) * (size_t)(rows * per_row));
    if (scratch == NULL) return -1;
    uint16_t *normed = scratch, *qkv = normed + rows * H, *q = qkv + rows * L->qkv.out_features;
    uint16_t *k = q + rows * q_size, *attended = k + rows * kv_size, *o = attended + rows * q_size;
    uint16_t *h = o + rows * H, *gate_up = h + rows * H, *m = gate_up + rows * 2 * I;
    uint16_t *down = m + rows * I;

    int status = -1;
    enduro_rms_norm(x, rows, H, 1, H, L->input_norm, L->eps, L->unit_offset, NULL, normed);
    if (project(normed, rows, H, &L->qkv, qkv) != 0) goto done;
    queries_and_cache(L, S, rows, qkv, q, k);
    if (enduro_decode_attention(q, S->k_cache, S->v_cache, S->tables, S->table_width,
                                S->table_starts, S->key_starts, S->seq_lens, rows, L->num_heads,
                                L->num_kv_heads, D, S->block_size, L->attn_scale, attended) != 0)
        goto done;
    if (project(attended, rows, q_size, &L->o, o) != 0) goto done;
    if (L->sandwich)
        enduro_rms_norm(o, rows, H, 1, H, L->post_attn_norm, L->eps, L->unit_offset, x, h);
    else
        add(x, o, rows * H, h);
    enduro_rms_norm(h, rows, H, 1, H, L->mlp_norm, L->eps, L->unit_offset, NULL, normed);
    if (project(normed, rows, H, &L->gate_up, gate_up) != 0) goto done;
    act_and_mul(gate_up, rows, I, L->activation, m);
    if (project(m, rows, I, &L->down, down) != 0) goto done;
    if (L->sandwich)
        enduro_rms_norm(down, rows, H, 1, H, L->post_mlp_norm, L->eps, L->unit_offset, h, out);
    else
        add(h, down, rows * H, out);
    status = 0;
done:
    free(scratch);
    return status;
}
