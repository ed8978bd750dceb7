/*
 * Process log: one line per event on stderr, "time level component: message". Thread-safe.
 * Never log tokens, payloads or subjects: callers pass only identifiers and counts.
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
/** Write one line. `component` is a short module name ("server", "region eu"). */
void dm_log(dm_log_level_t level, const char *component, const char *fmt, ...) DM_PRINTF(3, 4);

#define dm_debug(c, ...) dm_log(DM_LOG_DEBUG, c, __VA_ARGS__)
#define dm_info(c, ...)  dm_log(DM_LOG_INFO, c, __VA_ARGS__)
#define dm_warn(c, ...)  dm_log(DM_LOG_WARN, c, __VA_ARGS__)
#define dm_error(c, ...) dm_log(DM_LOG_ERROR, c, __VA_ARGS__)

#endif
