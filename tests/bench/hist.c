#include <math.h>
#include <string.h>

#include "hist.h"

#define SUB  (1u << DM_HIST_SUB_BITS)
#define HALF (SUB / 2)

void dm_hist_init(dm_hist_t *h)
{
    memset(h, 0, sizeof(*h));
}

static unsigned bucket_of(uint64_t v)
{
    if (v < SUB)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v); /* >= DM_HIST_SUB_BITS */
    unsigned shift = msb - (DM_HIST_SUB_BITS - 1);
    /* v >> shift is in [HALF, SUB): the linear position inside this power of two */
    return SUB + (msb - DM_HIST_SUB_BITS) * HALF + (unsigned)((v >> shift) - HALF);
}

/* Lowest value of bucket `b` and its width. */
static void bucket_range(unsigned b, uint64_t *lo, uint64_t *width)
{
    if (b < SUB) {
        *lo = b;
        *width = 1;
        return;
    }
    unsigned k = (b - SUB) / HALF, pos = (b - SUB) % HALF;
    unsigned shift = k + 1;
    *lo = ((uint64_t)HALF + pos) << shift;
    *width = (uint64_t)1 << shift;
}

void dm_hist_record(dm_hist_t *h, uint64_t v)
{
    uint64_t top = ((uint64_t)1 << DM_HIST_MAX_BITS) - 1;
    if (v > top)
        v = top;
    h->buckets[bucket_of(v)]++;
    h->count++;
    h->sum += v;
    if (v > h->max)
        h->max = v;
}

void dm_hist_merge(dm_hist_t *into, const dm_hist_t *from)
{
    for (unsigned i = 0; i < DM_HIST_BUCKETS; i++)
        into->buckets[i] += from->buckets[i];
    into->count += from->count;
    into->sum += from->sum;
    if (from->max > into->max)
        into->max = from->max;
}

uint64_t dm_hist_quantile(const dm_hist_t *h, double q)
{
    if (h->count == 0)
        return 0;
    if (q >= 1.0)
        return h->max;
    if (q < 0.0)
        q = 0.0;
    uint64_t rank = (uint64_t)ceil(q * (double)h->count);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned b = 0; b < DM_HIST_BUCKETS; b++) {
        seen += h->buckets[b];
        if (seen >= rank) {
            uint64_t lo, width;
            bucket_range(b, &lo, &width);
            uint64_t mid = lo + width / 2;
            return mid > h->max ? h->max : mid;
        }
    }
    return h->max;
}

double dm_hist_mean(const dm_hist_t *h)
{
    return h->count ? (double)h->sum / (double)h->count : 0.0;
}
