/*
 * Cross-border transfers: the policy (legal bases and routes, loaded from regions/), the
 * decision for one transfer, and the ledger of each region (append, seal, verify).
 *
 * A transfer is a read of region R's data by a principal whose own region is C != R (R -> C)
 * or a write by a principal in C into R (C -> R). Its ledger entry is committed in R before
 * the data leaves the gateway; a refused transfer is logged too.
 *
 * Thread-safety: a loaded policy is immutable; every function may be called from any thread.
 */
#ifndef DOMICILE_LEDGER_H
#define DOMICILE_LEDGER_H

#include <stdbool.h>
#include <stdint.h>

#include "domicile/clock.h"
#include "domicile/config.h"
#include "domicile/crypto.h"
#include "domicile/region.h"
#include "domicile/status.h"

typedef struct dm_basis {
    char *id;
    char *instrument;
    char *citation;
    char *kind; /* adequacy | scc | derogation | domestic-law */
    char *notes;
    int64_t effective_ms; /* first day in force, 00:00 UTC */
    int64_t revoked_ms;   /* first day no longer in force; 0 = in force */
} dm_basis_t;

typedef struct dm_route {
    char *from, *to, *purpose; /* region code or "*"; purpose or "*" */
    const dm_basis_t **bases;  /* in order of preference */
    size_t n_bases;
} dm_route_t;

typedef struct dm_policy {
    dm_basis_t *bases;
    size_t n_bases;
    dm_route_t *routes;
    size_t n_routes;
    char **forbidden; /* purposes refused on every route */
    size_t n_forbidden;
} dm_policy_t;

/** Load bases and routes; every region code must be configured or "*". file:line errors. */
dm_status_t *dm_policy_load(const char *bases_file, const char *routes_file, const dm_config_t *cfg,
                            dm_policy_t **out) DM_WARN_UNUSED;
void dm_policy_free(dm_policy_t *p);
bool dm_policy_forbidden(const dm_policy_t *p, const char *purpose);
/**
 * The basis for a transfer (from -> to, purpose) at `now_ms`, or NULL when refused, with a
 * client-safe reason in *why (static storage).
 */
const dm_basis_t *dm_policy_decide(const dm_policy_t *p, const char *from, const char *to,
                                   const char *purpose, int64_t now_ms, const char **why);
/**
 * For a transfer dm_policy_decide() refused: the basis of the matching route that was
 * considered but is not in force at `now_ms` (the first revoked one in order of preference,
 * else the route's first), or NULL when no basis was considered (forbidden purpose, no route,
 * or a route with no bases). Logged as the refusal's basis_id.
 */
const dm_basis_t *dm_policy_considered(const dm_policy_t *p, const char *from, const char *to,
                                       const char *purpose, int64_t now_ms);
const dm_basis_t *dm_policy_basis(const dm_policy_t *p, const char *id);

typedef enum {
    DM_TRANSFER_READ,  /* R -> C */
    DM_TRANSFER_WRITE, /* C -> R */
} dm_transfer_dir_t;

/** One ledger entry as the gateway writes it. Strings are borrowed for the call. */
typedef struct dm_transfer {
    const char *request_id; /* the call's request id, or a generated one for reads */
    const char *principal;
    const char *method; /* "GetRecord", ... */
    const char *customer_id;
    const unsigned char *subject_key; /* NULL: none */
    int64_t record_count;
    int64_t bytes;
    const char *from, *to;
    dm_transfer_dir_t direction;
    const char *purpose;
    const char *basis_id; /* refused: the basis not in force, or "" */
    bool allowed;
    const char *refusal;    /* "" when allowed */
    const char *record_ids; /* joined by \x1f; "" when none */
} dm_transfer_t;

/** The ledger key of each region (HMAC), loaded at start. */
typedef struct dm_ledger_keys {
    unsigned char key[DM_MAX_REGIONS][32];
} dm_ledger_keys_t;

typedef void (*dm_ledger_done_fn)(void *arg, dm_status_t *err);

/**
 * Append `t` to region `r`'s ledger (MAC computed here) and call `done` once the entry is
 * committed (err NULL) or could not be (err: the data must not be sent). `t` is copied.
 * `owner` (may be NULL: the job's owner, dm_job_t) only bounds the wait by its deadline.
 */
void dm_ledger_append(dm_region_t *r, const unsigned char key[32], const dm_transfer_t *t,
                      void *owner, dm_ledger_done_fn done, void *arg);

/** MAC of a stored entry (columns in the order of DM_SQL_LEDGER_* results, see sql.c). */
void dm_ledger_entry_mac(const unsigned char key[32], const PGresult *res, int row, int col0,
                         unsigned char out[32]);
/** True when the stored entry_mac of the row verifies under `key`. */
bool dm_ledger_entry_verifies(const unsigned char key[32], const PGresult *res, int row, int col0);
/** chain_hash[seq] = HMAC(key, prev || seq || entry_id || entry_mac). */
void dm_ledger_chain_hash(const unsigned char key[32], const unsigned char prev[32], int64_t seq,
                          int64_t entry_id, const unsigned char mac[32], unsigned char out[32]);
/** MAC of a checkpoint (upto_seq, chain_hash, purged_before_ms). */
void dm_ledger_checkpoint_mac(const unsigned char key[32], int64_t upto_seq,
                              const unsigned char hash[32], int64_t before_ms,
                              unsigned char out[32]);
/**
 * MAC of a restore cut (regions/schema/009_restores.sql): the restored chain ended at
 * restored_seq with restored_hash; it continues after resumed_seq from resumed_hash (the head
 * region `witnessed_by` witnessed); point_ms is the restore point.
 */
void dm_ledger_restore_mac(const unsigned char key[32], int64_t restored_seq,
                           const unsigned char restored_hash[32], int64_t resumed_seq,
                           const unsigned char resumed_hash[32], const char *witnessed_by,
                           int64_t point_ms, unsigned char out[32]);

/** What the sealer needs (the app owns it). last_purge_ms is touched by executor threads,
 * one region each. */
typedef struct dm_ledger_ctx {
    dm_regions_t *regions;
    const unsigned char (*keys)[32]; /* by region index */
    int retention_days;              /* 0 = keep forever */
    int64_t last_purge_ms[DM_MAX_REGIONS];
} dm_ledger_ctx_t;

/**
 * The regions' idle task: seal committed entries, store the new chain head as a witness in
 * every other region (asynchronously; a region down keeps its older witness), purge past
 * retention. arg: dm_ledger_ctx_t.
 */
void dm_ledger_idle(dm_region_t *r, dm_exec_t *x, void *arg);

#endif
