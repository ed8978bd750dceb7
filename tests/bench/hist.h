/*
 * A latency histogram with log-linear buckets (the HdrHistogram layout): values below
 * 2^DM_HIST_SUB_BITS are counted exactly; above, every power-of-two range is split into
 * 2^(DM_HIST_SUB_BITS - 1) equal buckets, so a recorded value is known to within 1/128 of
 * itself (0.8 %) whatever its size. Fixed size (about 34 KiB), no allocation, mergeable.
 *
 * Thread-safety: none; one histogram per thread, merged at the end.
 */
#ifndef DM_BENCH_HIST_H
#define DM_BENCH_HIST_H

#include <stdint.h>

#define DM_HIST_SUB_BITS 8
#define DM_HIST_MAX_BITS 40 /* values up to 2^40 - 1 (µs: 12 days); larger ones are clamped */
#define DM_HIST_BUCKETS                                                                            \
    ((1 << DM_HIST_SUB_BITS) +                                                                     \
     (DM_HIST_MAX_BITS - DM_HIST_SUB_BITS) * (1 << (DM_HIST_SUB_BITS - 1)))

typedef struct dm_hist {
    uint64_t count, max, sum;
    uint64_t buckets[DM_HIST_BUCKETS];
} dm_hist_t;

/** Zero `h`. */
void dm_hist_init(dm_hist_t *h);
/** Count one value. */
void dm_hist_record(dm_hist_t *h, uint64_t v);
/** Add every count of `from` to `into`. */
void dm_hist_merge(dm_hist_t *into, const dm_hist_t *from);
/**
 * The value at quantile `q` (0..1): the middle of the bucket holding the ceil(q * count)-th
 * smallest value (the exact maximum for q = 1); 0 when empty.
 */
uint64_t dm_hist_quantile(const dm_hist_t *h, double q);
/** Mean of the recorded values (exact); 0 when empty. */
double dm_hist_mean(const dm_hist_t *h);

#endif
