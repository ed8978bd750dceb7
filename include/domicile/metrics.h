/*
 * Prometheus metrics over HTTP (libmicrohttpd) on a separate listen address: calls by method
 * and status with latency histograms, regions (pool, queue, breaker, fence, replication), peer
 * gateways' health, ledger appends, sealing and verification, transfers by route and basis,
 * data-subject legs by state and by time to their due date, completion webhooks.
 * deploy/monitoring/ (dashboard, alerting rules) reads these names: keep them in step.
 *
 * What is read from a region's own database (sealing, verification, replication, legs) is
 * exported for the gateway's own region only: another region's is its own gateways' to say.
 *
 * Counters are updated lock-free (atomics) on the hot path; the registry is process-wide.
 * Every function may be called from any thread.
 */
#ifndef DOMICILE_METRICS_H
#define DOMICILE_METRICS_H

#include <grpc/status.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "domicile/status.h"

struct dm_app;

/** Size the call counters for `n_methods` (before the server starts). */
void dm_metrics_init(size_t n_methods);
/** A call of method index `m` ended with `code` after `us` microseconds. */
void dm_metrics_call(size_t m, grpc_status_code code, int64_t us);
/** A ledger entry was appended (allowed or refused) on a route, with its basis ("" refused). */
void dm_metrics_transfer(const char *from, const char *to, const char *basis, bool allowed,
                         int64_t bytes);
/**
 * The sealer of region index `r` chained `n` entries; `unsealed` remain after it. `caught_up`:
 * every entry committed before this round is chained now (the seal lag is zero).
 */
void dm_metrics_sealed(size_t r, int64_t n, int64_t unsealed, bool caught_up);
/** A verification of region index `r`'s ledger (VerifyLedger, Report) found it `ok` or not. */
void dm_metrics_ledger_verified(size_t r, bool ok, int64_t entries);

/** Open legs by time left to their due date: overdue, < 1 day, < 5, < 10, < 30, later. */
#define DM_DSR_DUE_BUCKETS 6
/** Data-subject legs in a region's database (domicile.dsr_legs with their requests). */
typedef struct dm_dsr_counts {
    int64_t legs[5];                 /* by state: pending, running, done, failed, skipped */
    int64_t due[DM_DSR_DUE_BUCKETS]; /* open legs (not done, not skipped) by time to due */
    int64_t next_due_ms;             /* earliest due date of an open leg; 0: none open */
} dm_dsr_counts_t;
/** The legs of region index `r`, as counted by its maintenance (copied). */
void dm_metrics_dsr(size_t r, const dm_dsr_counts_t *c);
/**
 * Replication of region index `r`'s primary (pg_stat_replication): standbys connected, those
 * that are synchronous (sync or quorum) and the largest replay lag in bytes. `standbys` < 0:
 * unknown (the query failed), not exported until known again.
 */
void dm_metrics_replication(size_t r, int64_t standbys, int64_t sync_standbys, int64_t lag_bytes);

/** Serve /metrics on `listen` ("host:port"); "" serves nothing. */
dm_status_t *dm_metrics_start(struct dm_app *app, const char *listen) DM_WARN_UNUSED;
void dm_metrics_stop(void);
/** The exposition text (caller frees); for tests and the HTTP handler. */
char *dm_metrics_render(struct dm_app *app);

#endif
