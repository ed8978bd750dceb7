/*
 * The prepared statements every region connection carries (prepared once per connection,
 * executed by index through dm_job_t). Writes are single calls of the functions in
 * regions/schema/, so that they pipeline and batch.
 */
#ifndef DOMICILE_SQL_H
#define DOMICILE_SQL_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>

typedef enum {
    DM_SQL_PROBE,             /* () -> 1 */
    DM_SQL_REGISTER_BEGIN,    /* (customer, residency, request_id, fingerprint, name, labels) */
    DM_SQL_CUSTOMER_STATE,    /* (customer) -> state, residency */
    DM_SQL_REGISTER_FINISH,   /* (customer, request_id, commit) */
    DM_SQL_GET_CUSTOMER,      /* (customer) -> customer row */
    DM_SQL_CLOSE_CUSTOMER,    /* (customer, request_id, reason, retention) */
    DM_SQL_PURGE_DUE,         /* (limit) -> n */
    DM_SQL_GET_OR_CREATE_KEY, /* (customer, subject_key, candidate) -> status, key_id, wrapped */
    DM_SQL_PUT_RECORD,        /* see regions/schema/002_records.sql */
    DM_SQL_GET_RECORD,        /* (customer, record_id) -> record + wrapped key */
    DM_SQL_LIST_RECORDS,      /* (customer, kind, subject_key, after, limit, with_payload) */
    DM_SQL_DELETE_RECORD,     /* (customer, request_id, fingerprint, record_id, expected) */
    DM_SQL__COUNT
} dm_sql_id_t;

typedef struct dm_sql {
    const char *name;
    const char *text;
    int n_params;
} dm_sql_t;

/** The statement table, indexed by dm_sql_id_t. */
extern const dm_sql_t dm_sql[DM_SQL__COUNT];

/*
 * Readers of binary-format results (every statement returns binary: no hex round trip of
 * ciphertext). All take a valid row/column; NULL values read as 0/false/"".
 */
int64_t dm_pg_int8(const PGresult *res, int row, int col);
int32_t dm_pg_int4(const PGresult *res, int row, int col);
bool dm_pg_bool(const PGresult *res, int row, int col);
/** timestamptz -> Unix milliseconds. */
int64_t dm_pg_time_ms(const PGresult *res, int row, int col);
/** text/bytea: pointer to the bytes (NUL-terminated by libpq) and length. */
const char *dm_pg_bytes(const PGresult *res, int row, int col, int *len);
/** jsonb (binary format: version byte + text) -> pointer to the JSON text and length. */
const char *dm_pg_jsonb(const PGresult *res, int row, int col, int *len);
bool dm_pg_isnull(const PGresult *res, int row, int col);

#endif
