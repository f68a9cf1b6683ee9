/* Addressing enduro's paged KV cache from the kernels. */
#ifndef ENDURO_PAGED_H
#define ENDURO_PAGED_H
#include <stdint.h>

/* The cache slot of the key at `position` in a request's table, whose slot 0 is position
 * `table_start` (a multiple of block_size). */
static inline int64_t slot_of(const int64_t *table, int64_t table_start, int64_t position,
                              int64_t block_size) {
    const int64_t index = position - table_start;
    return table[index / block_size] * block_size + index % block_size;
}

#endif
