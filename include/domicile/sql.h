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
    DM_SQL_GET_OR_CREATE_KEY, /* (customer, subject_key, candidate, kek_version) -> status,
                                 key_id, wrapped */
    DM_SQL_PUT_RECORD,        /* see regions/schema/002_records.sql */
    DM_SQL_GET_RECORD,        /* (customer, record_id, purpose) -> record, payload, key, objected */
    DM_SQL_LIST_RECORDS,      /* (customer, kind, subject_key, after, limit, with_payload, purpose,
                                 payload_budget) -> record columns, payload, wrapped, objected,
                                 within_budget */
    DM_SQL_DELETE_RECORD,     /* (customer, request_id, fingerprint, record_id, expected) */
    DM_SQL_LEDGER_APPEND,     /* 18 fields -> entry_id */
    DM_SQL_LEDGER_HEAD,       /* () -> seq, chain_hash of the chain's last link */
    DM_SQL_LEDGER_UNSEALED,   /* (limit) -> entry_id, entry_mac */
    DM_SQL_LEDGER_SEAL,       /* (seqs[], entry_ids[], hashes[]) */
    DM_SQL_LEDGER_CHECKPOINT, /* () -> upto_seq, chain_hash, purged_before, mac, at, n */
    DM_SQL_LEDGER_VERIFY,     /* (after_seq, limit, loose_limit) -> seq, entry_id, chain_hash,
                                 LEDGER_COLUMNS; then, if fewer links than limit, the unsealed
                                 rows (seq NULL), all read in one snapshot */
    DM_SQL_LEDGER_LOOSE,      /* (limit) -> LEDGER_COLUMNS of queued rows not chained yet */
    DM_SQL_LEDGER_LIST,       /* filters, after (at_ms, entry_id), limit -> LEDGER_COLUMNS, seq,
                                 by at, entry_id */
    DM_SQL_LEDGER_REPORT,     /* (from_ms, to_ms, basis, purpose) -> grouped rows */
    DM_SQL_LEDGER_PURGE_UPTO, /* (before_ms) -> seq, chain_hash of the last purgeable link */
    DM_SQL_LEDGER_PURGE,      /* (upto_seq, chain_hash, before_ms, mac) -> rows purged */
    DM_SQL_WITNESS_PUT,       /* (region, seq, chain_hash): raise the region's witnessed head */
    DM_SQL_WITNESS_GET,       /* (region) -> seq, chain_hash witnessed here, or no row */
    DM_SQL_DSR_RECEIVE,       /* header + this region's leg (13 fields) -> status */
    DM_SQL_DSR_SET_MISSING,   /* (request_id, regions[]) */
    DM_SQL_DSR_STATUS,        /* (request_id) -> DSR_COLUMNS */
    DM_SQL_DSR_LIST,          /* (kind, customer, limit) -> DSR_COLUMNS */
    DM_SQL_DSR_CLAIM,         /* (me, lease_s, limit) -> request_id, kind */
    DM_SQL_DSR_RUN,           /* (request_id, me) -> state, matched, deleted, keys */
    DM_SQL_DSR_FAIL,          /* (request_id, me, error, backoff_ms) */
    DM_SQL_DSR_MISSING,       /* () -> headers still missing somewhere */
    DM_SQL_DSR_DROP_MISSING,  /* (request_id, region) */
    DM_SQL_DSR_EXTEND,        /* (request_id, reason, until_ms) -> status */
    DM_SQL_DSR_FINISH_EXPORT, /* (request_id, records, ok, error) */
    DM_SQL_LOCATE,            /* (subject_key, customer) -> records, bytes */
    DM_SQL_EXPORT_RECORDS,    /* (subject_key, customer, after_customer, after_record, limit) */
    DM_SQL_DSR_WEBHOOK_DUE,   /* (notify_region, limit) -> request_id */
    DM_SQL_DSR_WEBHOOK_MARK,  /* (request_id, state, error, delay_ms, attempted) */
    DM_SQL_FENCE_PUT,         /* (region, reason, by, at_ms, lifted, version) */
    DM_SQL_FENCE_LIST,        /* () -> region, reason, fenced_by, fenced_at, lifted, version */
    DM_SQL_REPLICATION,       /* () -> standby, sync_state, lag bytes */
    DM_SQL_DSR_COUNTS,        /* () -> pending, running, done, failed, skipped, overdue, open
                                 due < 1, 5, 10, 30 days, later, next due (unix ms, or NULL) */
    DM_SQL_DSR_CLAIM_ONE,     /* (request_id, me, lease_s) -> request_id, kind, attempts */
    DM_SQL_DSR_RECEIVE_CLAIM, /* DM_SQL_DSR_RECEIVE's 13, claimant, lease_s -> DSR_COLUMNS,
                                 status */
    DM_SQL_REPLICATION_SUMMARY, /* () -> standbys, sync standbys, largest replay lag bytes */
    /* Restores (regions/schema/009_restores.sql, src/restore/) */
    DM_SQL_RESTORE_OPEN,     /* () -> restore_id, state, source, target, label, point_ms,
                                recorded_ms of the restore not reconciled yet, or no row */
    DM_SQL_RESTORE_RECORD,   /* (source, point_ms) -> restore_id: a restore found by a gateway */
    DM_SQL_RESTORE_FINISH,   /* (restore_id, me, report) */
    DM_SQL_RESTORE_LOCK,     /* () -> bool: this connection reconciles (session lock) */
    DM_SQL_RESTORE_UNLOCK,   /* () */
    DM_SQL_MARK_ADVANCE,     /* () -> mark, at_ms */
    DM_SQL_MARK_READ,        /* () -> mark, at_ms */
    DM_SQL_MARK_RAISE,       /* (above) -> mark */
    DM_SQL_MARK_WITNESS_PUT, /* (region, mark, mark_ms) -> mark, mark_ms stored */
    DM_SQL_DSR_HEADERS,      /* (after_ms, after_id, limit) -> headers (dsr_headers_after) */
    DM_SQL_RESTORE_REAPPLY,  /* header (12 fields), me -> status, state, stored */
    DM_SQL_CLOSURE_COPY_PUT, /* (customer, region, request_id, reason, closed_ms, purge_ms) */
    DM_SQL_CLOSURE_COPIES,   /* (region) -> customer, request_id, reason, closed_ms, purge_ms */
    DM_SQL_CLOSURE_REAPPLY,  /* (customer, request_id, reason, closed_ms, purge_ms) -> status */
    DM_SQL_LEDGER_CUT_PUT,   /* (restore_id, restored_seq, restored_hash, resumed_seq,
                                resumed_hash, witnessed_by, point_ms, mac) */
    DM_SQL_LEDGER_CUTS,      /* () -> restored_seq, restored_hash, resumed_seq, resumed_hash,
                                witnessed_by, point_ms, recorded_ms, mac, restore_id */
    /* Key custody (src/custody, regions/schema/008_key_custody.sql) */
    DM_SQL_KEK_VERSIONS,        /* () -> version, source, label, check_value, state */
    DM_SQL_KEK_BOOTSTRAP_FILE,  /* (check, me): version 1 = the key file */
    DM_SQL_KEK_CLAIM,           /* (me, kind, label_prefix, lease_ms, request_id) -> status,
                                   version, label, claimed_by */
    DM_SQL_KEK_ACTIVATE,        /* (version, check, me, by, rotate, lease_ms) -> status,
                                   rotation_id, keys_total */
    DM_SQL_KEK_SET_CHECK,       /* (version, check) */
    DM_SQL_KEK_ROTATION_CLAIM,  /* (me, lease_ms) -> rotation_id, target, total, rewrapped,
                                   taken_over */
    DM_SQL_KEK_REWRAP_BATCH,    /* (target, after_version, after_key, limit) -> key_id,
                                   customer_id, subject_key, wrapped, kek_version */
    DM_SQL_KEK_REWRAP,          /* (rotation, me, target, ids[], wrapped[], lease_ms) -> n */
    DM_SQL_KEK_ROTATION_FINISH, /* (rotation, me, error) -> done | more | lost */
    DM_SQL_KEK_STATUS,          /* () -> version, source, label, state, created, activated,
                                   retired, data_keys */
    DM_SQL_KEK_ROTATION_STATUS, /* () -> the latest rotation */
    DM_SQL_KEK_RETIRE,          /* (version, by) -> status, keys, label */
    DM_SQL_KEK_SCHEDULE,        /* () -> version, current, active_ms, superseded_ms, in_use,
                                   rotating (010_crypto_period.sql) */
    DM_SQL__COUNT
} dm_sql_id_t;

/* Columns of DM_SQL_DSR_STATUS / DM_SQL_DSR_LIST. */
enum {
    DM_DC_KIND,
    DM_DC_SUBJECT,
    DM_DC_CUSTOMER,
    DM_DC_PURPOSE,
    DM_DC_REASON,
    DM_DC_PRINCIPAL,
    DM_DC_RECEIVED,
    DM_DC_DUE,
    DM_DC_GDPR_DUE,
    DM_DC_EXTENDED_DUE,
    DM_DC_EXTENSION_REASON,
    DM_DC_EXTENDED_AT,
    DM_DC_STATE,
    DM_DC_ATTEMPTS,
    DM_DC_LAST_ERROR,
    DM_DC_NEXT_ATTEMPT,
    DM_DC_STARTED,
    DM_DC_FINISHED,
    DM_DC_MATCHED,
    DM_DC_DELETED,
    DM_DC_KEYS,
    DM_DC_RECEIPT,
    DM_DC_CLAIMED_BY,
    DM_DC_LEASE,
    DM_DC_REQUEST_ID,
    DM_DC_WEBHOOK_STATE,
    DM_DC_WEBHOOK_ATTEMPTS,
    DM_DC_WEBHOOK_ERROR,
    DM_DC_WEBHOOK_NEXT,
    DM_DC_WEBHOOK_DELIVERED,
    DM_DC__COUNT
};

/* Column order of a ledger row in every ledger result (after any leading columns). */
enum {
    DM_LC_UUID,
    DM_LC_AT,
    DM_LC_REQUEST_ID,
    DM_LC_PRINCIPAL,
    DM_LC_METHOD,
    DM_LC_CUSTOMER,
    DM_LC_SUBJECT,
    DM_LC_RECORDS,
    DM_LC_BYTES,
    DM_LC_FROM,
    DM_LC_TO,
    DM_LC_DIRECTION,
    DM_LC_PURPOSE,
    DM_LC_BASIS,
    DM_LC_OUTCOME,
    DM_LC_REFUSAL,
    DM_LC_RECORD_IDS,
    DM_LC_MAC,
    DM_LC_ENTRY_ID,
    DM_LC__COUNT
};

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
