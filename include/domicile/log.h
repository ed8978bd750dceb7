/*
 * Process log: one JSON object per line on stderr ({"time","level","component","msg",...}).
 * Thread-safe. Never log tokens, payloads or subjects: callers pass only identifiers, counts
 * and subject keys.
 */
#ifndef DOMICILE_LOG_H
#define DOMICILE_LOG_H

#include <stdbool.h>

#include "domicile/mem.h"

typedef enum {
    DM_LOG_DEBUG,
    DM_LOG_INFO,
    DM_LOG_WARN,
    DM_LOG_ERROR,
} dm_log_level_t;

/** Set the minimum level written (default INFO). */
void dm_log_set_level(dm_log_level_t level);
/** Parse "debug" | "info" | "warn" | "error"; false when unknown. */
bool dm_log_level_parse(const char *s, dm_log_level_t *out);
const char *dm_log_level_name(dm_log_level_t level);
/** One extra field of a log line: text, or a number when is_number. */
typedef struct dm_log_field {
    const char *key;
    const char *text;
    long long number;
    bool is_number;
} dm_log_field_t;

#define DM_LOG_STR(k, v) ((dm_log_field_t){(k), (v), 0, false})
#define DM_LOG_NUM(k, v) ((dm_log_field_t){(k), NULL, (long long)(v), true})

bool dm_log_enabled(dm_log_level_t level);
/** Write one line with extra fields (the access log of calls uses this). */
void dm_log_fields(dm_log_level_t level, const char *component, const dm_log_field_t *fields,
                   size_t n_fields, const char *fmt, ...) DM_PRINTF(5, 6);
/** Write one line. `component` is a short module name ("server", "region eu"). */
void dm_log(dm_log_level_t level, const char *component, const char *fmt, ...) DM_PRINTF(3, 4);

#define dm_debug(c, ...) dm_log(DM_LOG_DEBUG, c, __VA_ARGS__)
#define dm_info(c, ...)  dm_log(DM_LOG_INFO, c, __VA_ARGS__)
#define dm_warn(c, ...)  dm_log(DM_LOG_WARN, c, __VA_ARGS__)
#define dm_error(c, ...) dm_log(DM_LOG_ERROR, c, __VA_ARGS__)

#endif
