/* This OpenMP thread's share of `count` items: [*first, *last), contiguous, the shares of all
 * threads in order covering every item once. Outside a parallel region, all of them. */
#ifndef ENDURO_THREADS_H
#define ENDURO_THREADS_H
#include <stdint.h>

static inline void thread_share(int64_t count, int64_t *first, int64_t *last) {
#ifdef _OPENMP
    extern int omp_get_thread_num(void), omp_get_num_threads(void);
    const int64_t thread = omp_get_thread_num(), threads = omp_get_num_threads();
#else
    const int64_t thread = 0, threads = 1;
#endif
    *first = count * thread / threads;
    *last = count * (thread + 1) / threads;
}

#endif
