#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

#include "domicile/clock.h"

int64_t dm_now_ms(void)
{
    static int64_t offset;
    static bool loaded;
    struct timespec ts;
    if (!__atomic_load_n(&loaded, __ATOMIC_ACQUIRE)) {
        const char *v = getenv("DOMICILE_TEST_CLOCK_OFFSET_MS");
        __atomic_store_n(&offset, v ? strtoll(v, NULL, 10) : 0, __ATOMIC_RELAXED);
        __atomic_store_n(&loaded, true, __ATOMIC_RELEASE);
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000 +
           __atomic_load_n(&offset, __ATOMIC_RELAXED);
}

int64_t dm_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

struct timespec dm_abstime_in_ms(int64_t ms)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += (time_t)(ms / 1000);
    t.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

char *dm_time_iso(int64_t ms, char *buf, size_t size)
{
    int64_t sec = ms / 1000, frac = ms % 1000;
    if (frac < 0) {
        frac += 1000;
        sec -= 1;
    }
    time_t t = (time_t)sec;
    struct tm tm;
    if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 > 9999 || tm.tm_year + 1900 < 0)
        snprintf(buf, size, "@%lld", (long long)ms);
    else
        snprintf(buf, size, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)frac);
    return buf;
}
