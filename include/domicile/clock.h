/*
 * Time helpers shared by every module.
 */
#ifndef DOMICILE_CLOCK_H
#define DOMICILE_CLOCK_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

/**
 * Wall-clock now in ms, shifted by DOMICILE_TEST_CLOCK_OFFSET_MS when that variable is set
 * (tests only: it lets a test gateway live in the past or the future).
 */
int64_t dm_now_ms(void);
/** Milliseconds on the monotonic clock (durations, intervals). */
int64_t dm_mono_ms(void);
/** The CLOCK_REALTIME instant `ms` from now, for pthread_cond_timedwait(). */
struct timespec dm_abstime_in_ms(int64_t ms);
/**
 * `ms` since the epoch as RFC 3339 in UTC with milliseconds ("2026-01-31T09:05:00.250Z") into
 * `buf` (32 bytes suffice); "@<ms>" outside years 0-9999. Returns `buf`.
 */
char *dm_time_iso(int64_t ms, char *buf, size_t size);

#endif
