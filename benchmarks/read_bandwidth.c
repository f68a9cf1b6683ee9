/* How fast this machine streams memory it only reads: the bound on a decode step that reads
 * every weight once. Sums 1 GiB of int32 with AVX-512 loads, both cores (OpenMP), best of 10.
 *   gcc -O3 -march=native -fopenmp benchmarks/read_bandwidth.c -o /tmp/bw && /tmp/bw
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BYTES (1L << 30)

int main(void) {
    int32_t *data = aligned_alloc(64, BYTES);
    memset(data, 1, BYTES); /* resident, not the zero page */
    const long n = BYTES / sizeof(int32_t);
    double best = 1e30;
    long check = 0;
    for (int round = 0; round < 10; round++) {
        const double start = omp_get_wtime();
        long total = 0;
#pragma omp parallel reduction(+ : total)
        {
            __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
#pragma omp for schedule(static)
            for (long i = 0; i < n; i += 64) {
                acc0 = _mm512_add_epi32(acc0, _mm512_load_si512(data + i));
                acc1 = _mm512_add_epi32(acc1, _mm512_load_si512(data + i + 16));
                acc2 = _mm512_add_epi32(acc2, _mm512_load_si512(data + i + 32));
                acc3 = _mm512_add_epi32(acc3, _mm512_load_si512(data + i + 48));
            }
            total += _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(acc0, acc1),
                                                              _mm512_add_epi32(acc2, acc3)));
        }
        const double seconds = omp_get_wtime() - start;
        best = seconds < best ? seconds : best;
        check += total;
    }
    printf("read bandwidth, %d threads: %.1f GB/s (best of 10 passes over 1 GiB; %ld)\n",
           omp_get_max_threads(), BYTES / best / 1e9, check);
    free(data);
    return 0;
}
