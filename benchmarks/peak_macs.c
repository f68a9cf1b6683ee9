/* The CPU's peak multiply-accumulate rate per core for the three instructions enduro's or
 * llama.cpp's kernels multiply with: AVX512-BF16 dot products (bf16 pairs into float32, what
 * enduro and oneDNN run), AVX512-VNNI (uint8 x int8 quads into int32, what llama.cpp's
 * quantized kernels run) and float32 FMA. 16 independent accumulators, held in registers
 * (-O3 unrolls the inner loops; at -O2 the accumulators stay in memory and the loop measures
 * store forwarding instead), no memory traffic.
 *
 *   gcc -O3 -march=native benchmarks/peak_macs.c -o /tmp/peak_macs && /tmp/peak_macs
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 16
#define ROUNDS 12500000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(void) {
    __m512 bf[CHAINS], f32[CHAINS];
    __m512i u8[CHAINS];
    for (int j = 0; j < CHAINS; j++) {
        bf[j] = f32[j] = _mm512_setzero_ps();
        u8[j] = _mm512_setzero_si512();
    }
    __m512i ones16 = _mm512_set1_epi16(0x3f80), ones8 = _mm512_set1_epi8(1);
    __m512 one = _mm512_set1_ps(1.0f);

    double started = now();
    for (long i = 0; i < ROUNDS; i++) {
        for (int j = 0; j < CHAINS; j++)
            bf[j] = _mm512_dpbf16_ps(bf[j], (__m512bh)ones16, (__m512bh)ones16);
        __asm__ volatile("" : "+v"(ones16)); /* keeps the loop from being folded away */
    }
    double bf16_rate = ROUNDS * CHAINS * 32.0 / (now() - started) / 1e9;

    started = now();
    for (long i = 0; i < ROUNDS; i++) {
        for (int j = 0; j < CHAINS; j++) u8[j] = _mm512_dpbusd_epi32(u8[j], ones8, ones8);
        __asm__ volatile("" : "+v"(ones8));
    }
    double int8_rate = ROUNDS * CHAINS * 64.0 / (now() - started) / 1e9;

    started = now();
    for (long i = 0; i < ROUNDS; i++) {
        for (int j = 0; j < CHAINS; j++) f32[j] = _mm512_fmadd_ps(one, one, f32[j]);
        __asm__ volatile("" : "+v"(one));
    }
    double fp32_rate = ROUNDS * CHAINS * 16.0 / (now() - started) / 1e9;

    float check = 0.0f;
    long check_int = 0;
    for (int j = 0; j < CHAINS; j++) {
        check += _mm512_reduce_add_ps(bf[j]) + _mm512_reduce_add_ps(f32[j]);
        check_int += _mm512_reduce_add_epi32(u8[j]);
    }
    printf("per core: bf16 dot %.1f, int8 dot (VNNI) %.1f, fp32 FMA %.1f GMAC/s (%g %ld)\n",
           bf16_rate, int8_rate, fp32_rate, check, check_int);
    return 0;
}
