/*
 * Time helpers shared by every module.
 */
#ifndef DOMICILE_CLOCK_H
#define DOMICILE_CLOCK_H

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

#endif
