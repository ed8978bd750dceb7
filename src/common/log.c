/*
 * One JSON object per line on stderr: {"time","level","component","msg", ...fields}.
 * Callers never pass tokens, payloads or subjects (they log ids, counts and subject keys).
 */
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

bool dm_log_enabled(dm_log_level_t level)
{
    return (int)level >= atomic_load(&min_level);
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

/* Append `s` as the body of a JSON string (no quotes) to buf. */
static size_t json_escape(char *buf, size_t cap, size_t at, const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p && at + 7 < cap; p++) {
        switch (*p) {
        case '"':
        case '\\':
            buf[at++] = '\\';
            buf[at++] = (char)*p;
            break;
        case '\n':
            buf[at++] = '\\';
            buf[at++] = 'n';
            break;
        case '\t':
            buf[at++] = '\\';
            buf[at++] = 't';
            break;
        default:
            if (*p < 0x20)
                at += (size_t)snprintf(buf + at, cap - at, "\\u%04x", *p);
            else
                buf[at++] = (char)*p;
        }
    }
    buf[at] = '\0';
    return at;
}

void dm_log_fields(dm_log_level_t level, const char *component, const dm_log_field_t *fields,
                   size_t n_fields, const char *fmt, ...)
{
    if (!dm_log_enabled(level))
        return;
    struct timespec ts;
    struct tm tm;
    char when[32], msg[2048], line[4096];
    va_list ap;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    size_t at = (size_t)snprintf(line, sizeof(line),
                                 "{\"time\":\"%s.%03ldZ\",\"level\":\"%s\",\"component\":\"", when,
                                 ts.tv_nsec / 1000000, dm_log_level_name(level));
    at = json_escape(line, sizeof(line), at, component);
    at += (size_t)snprintf(line + at, sizeof(line) - at, "\",\"msg\":\"");
    at = json_escape(line, sizeof(line), at, msg);
    at += (size_t)snprintf(line + at, sizeof(line) - at, "\"");
    for (size_t i = 0; i < n_fields && at + 8 < sizeof(line); i++) {
        at += (size_t)snprintf(line + at, sizeof(line) - at, ",\"%s\":", fields[i].key);
        if (fields[i].is_number) {
            at +=
                (size_t)snprintf(line + at, sizeof(line) - at, "%lld", (long long)fields[i].number);
        } else {
            at += (size_t)snprintf(line + at, sizeof(line) - at, "\"");
            at = json_escape(line, sizeof(line), at, fields[i].text ? fields[i].text : "");
            at += (size_t)snprintf(line + at, sizeof(line) - at, "\"");
        }
    }
    if (at + 3 > sizeof(line))
        at = sizeof(line) - 3;
    line[at++] = '}';
    line[at++] = '\n';
    line[at] = '\0';
    /* One write under a lock so concurrent lines never interleave. */
    pthread_mutex_lock(&log_mu);
    fputs(line, stderr);
    fflush(stderr);
    pthread_mutex_unlock(&log_mu);
}

void dm_log(dm_log_level_t level, const char *component, const char *fmt, ...)
{
    if (!dm_log_enabled(level))
        return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    dm_log_fields(level, component, NULL, 0, "%s", msg);
}
