/*
 * One status type for every fallible operation: a gRPC code, a message safe to show the client,
 * and log-only detail (SQLSTATE, libpq or OpenSSL text) that never leaves the process.
 *
 * Convention (curl's shape): a fallible function returns `dm_status_t *`; NULL means success,
 * anything else is an error the caller owns and must pass on or free with dm_status_free().
 */
#ifndef DOMICILE_STATUS_H
#define DOMICILE_STATUS_H

#include <grpc/status.h>
#include <stdbool.h>

#include "domicile/mem.h"

typedef struct dm_status {
    grpc_status_code code;
    char *message;    /* client-safe, lower case, no trailing period */
    char *detail;     /* log only; may be NULL */
    char sqlstate[6]; /* "" when the error did not come from PostgreSQL */
} dm_status_t;

/** A new error with a client-safe message. `code` must not be GRPC_STATUS_OK. */
dm_status_t *dm_status_new(grpc_status_code code, const char *fmt, ...) DM_PRINTF(2, 3);
/** Attach log-only detail (replaces any earlier detail). Returns `st` for chaining. */
dm_status_t *dm_status_detail(dm_status_t *st, const char *fmt, ...) DM_PRINTF(2, 3);
/** Free a status; NULL is allowed. */
void dm_status_free(dm_status_t *st);

/**
 * The one SQLSTATE -> gRPC mapping (STYLE.md): class 08, 57P01-57P03, 25006, 53300 ->
 * UNAVAILABLE; 40001/40P01 -> ABORTED; 57014 -> DEADLINE_EXCEEDED; 23505 -> ALREADY_EXISTS;
 * 23502/23503/23514 -> FAILED_PRECONDITION; class 22 -> INVALID_ARGUMENT; other class 53 ->
 * RESOURCE_EXHAUSTED; NULL/empty (connection failure without a SQLSTATE) -> UNAVAILABLE;
 * anything else -> INTERNAL.
 */
grpc_status_code dm_status_code_from_sqlstate(const char *sqlstate);
/** Canonical upper-case name of a gRPC code ("NOT_FOUND"); "UNKNOWN_CODE" when out of range. */
const char *dm_status_code_name(grpc_status_code code);
/** Parse a canonical name back to a code; false when unknown. */
bool dm_status_code_parse(const char *name, grpc_status_code *out);

#endif
