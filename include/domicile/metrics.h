/*
 * Prometheus metrics over HTTP (libmicrohttpd) on a separate listen address: calls by method
 * and status with latency histograms, regions (pool, queue, breaker, fence), ledger appends
 * and sealing, transfers by route and basis, data-subject legs by state and overdue requests.
 *
 * Counters are updated lock-free (atomics) on the hot path; the registry is process-wide.
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
/** The sealer of region index `r` chained `n` entries; `unsealed` remain after it. */
void dm_metrics_sealed(size_t r, int64_t n, int64_t unsealed);
/** DSR legs of region index `r` by state (pending, running, done, failed, skipped), overdue. */
void dm_metrics_dsr(size_t r, const int64_t legs[5], int64_t overdue);

/** Serve /metrics on `listen` ("host:port"); "" serves nothing. */
dm_status_t *dm_metrics_start(struct dm_app *app, const char *listen) DM_WARN_UNUSED;
void dm_metrics_stop(void);
/** The exposition text (caller frees); for tests and the HTTP handler. */
char *dm_metrics_render(struct dm_app *app);

#endif
