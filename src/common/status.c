#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "domicile/status.h"

static char *vformat(const char *fmt, va_list ap)
{
    char *out = NULL;
    if (vasprintf(&out, fmt, ap) < 0)
        abort();
    return out;
}

dm_status_t *dm_status_new(grpc_status_code code, const char *fmt, ...)
{
    dm_status_t *st = dm_calloc(1, sizeof(*st));
    va_list ap;
    st->code = code == GRPC_STATUS_OK ? GRPC_STATUS_INTERNAL : code;
    va_start(ap, fmt);
    st->message = vformat(fmt, ap);
    va_end(ap);
    return st;
}

dm_status_t *dm_status_detail(dm_status_t *st, const char *fmt, ...)
{
    va_list ap;
    free(st->detail);
    va_start(ap, fmt);
    st->detail = vformat(fmt, ap);
    va_end(ap);
    return st;
}

void dm_status_free(dm_status_t *st)
{
    if (!st)
        return;
    free(st->message);
    free(st->detail);
    free(st);
}

grpc_status_code dm_status_code_from_sqlstate(const char *s)
{
    if (!s || strlen(s) != 5)
        return GRPC_STATUS_UNAVAILABLE; /* libpq connection failures carry no SQLSTATE */
    if (strncmp(s, "08", 2) == 0 || strcmp(s, "57P01") == 0 || strcmp(s, "57P02") == 0 ||
        strcmp(s, "57P03") == 0 || strcmp(s, "25006") == 0 || strcmp(s, "53300") == 0)
        return GRPC_STATUS_UNAVAILABLE;
    if (strcmp(s, "40001") == 0 || strcmp(s, "40P01") == 0)
        return GRPC_STATUS_ABORTED;
    if (strcmp(s, "57014") == 0)
        return GRPC_STATUS_DEADLINE_EXCEEDED;
    if (strcmp(s, "23505") == 0)
        return GRPC_STATUS_ALREADY_EXISTS;
    if (strcmp(s, "23502") == 0 || strcmp(s, "23503") == 0 || strcmp(s, "23514") == 0)
        return GRPC_STATUS_FAILED_PRECONDITION;
    if (strncmp(s, "22", 2) == 0)
        return GRPC_STATUS_INVALID_ARGUMENT;
    if (strncmp(s, "53", 2) == 0)
        return GRPC_STATUS_RESOURCE_EXHAUSTED;
    return GRPC_STATUS_INTERNAL;
}

static const char *const code_names[] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *dm_status_code_name(grpc_status_code code)
{
    if ((int)code < 0 || (size_t)code >= DM_ARRAY_LEN(code_names))
        return "UNKNOWN_CODE";
    return code_names[code];
}

bool dm_status_code_parse(const char *name, grpc_status_code *out)
{
    for (size_t i = 0; i < DM_ARRAY_LEN(code_names); i++) {
        if (strcmp(name, code_names[i]) == 0) {
            *out = (grpc_status_code)i;
            return true;
        }
    }
    return false;
}
