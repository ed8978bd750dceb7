#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "domicile/log.h"

static atomic_int min_level = DM_LOG_INFO;
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static const char *const level_names[] = {"debug", "info", "warn", "error"};

void dm_log_set_level(dm_log_level_t level)
{
    atomic_store(&min_level, (int)level);
}

bool dm_log_level_parse(const char *s, dm_log_level_t *out)
{
    for (size_t i = 0; i < DM_ARRAY_LEN(level_names); i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (dm_log_level_t)i;
            return true;
        }
    }
    return false;
}

const char *dm_log_level_name(dm_log_level_t level)
{
    return (size_t)level < DM_ARRAY_LEN(level_names) ? level_names[level] : "?";
}

void dm_log(dm_log_level_t level, const char *component, const char *fmt, ...)
{
    if ((int)level < atomic_load(&min_level))
        return;
    struct timespec ts;
    struct tm tm;
    char when[32];
    char msg[2048];
    va_list ap;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    /* One fprintf under a lock so concurrent lines never interleave. */
    pthread_mutex_lock(&log_mu);
    fprintf(stderr, "%s.%03ldZ %s %s: %s\n", when, ts.tv_nsec / 1000000, dm_log_level_name(level),
            component, msg);
    fflush(stderr);
    pthread_mutex_unlock(&log_mu);
}
