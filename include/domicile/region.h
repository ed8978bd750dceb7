/*
 * Runtime regions: one per region file. Each region has an executor pool: pool_size threads,
 * each owning one libpq connection (verify-full TLS, multi-host, read-write target) in
 * pipeline mode. Jobs (one prepared statement each) are queued to the region; an executor
 * takes what is queued, sends it as one pipeline and completes the jobs from the results.
 * Batchable writes taken together share one transaction, hence one durable commit.
 * Completion-queue threads only queue jobs; they never wait on a database.
 *
 * Every new connection checks that the database identifies as the region it meant to reach
 * (domicile.region_identity): a mis-pointed host list fails closed instead of placing data in
 * the wrong jurisdiction. A region with no live connection fails its jobs at once with
 * UNAVAILABLE; the other regions are untouched.
 *
 * Thread-safety: every function may be called from any thread after dm_regions_start().
 */
#ifndef DOMICILE_REGION_H
#define DOMICILE_REGION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "domicile/config.h"
#include "domicile/sql.h"
#include "domicile/status.h"

typedef struct dm_region dm_region_t;
typedef struct dm_regions dm_regions_t;
typedef struct dm_job dm_job_t;

#define DM_JOB_MAX_PARAMS 24

/**
 * Job completion: exactly one of `res` (the statement's result, owned by the executor and
 * cleared after the callback returns) and `err` (owned by the callback) is set. Runs on an
 * executor thread, or on the submitting thread when the region fails the job at once. The
 * callback may submit further jobs, and may free the job.
 */
typedef void (*dm_job_fn)(dm_job_t *job, PGresult *res, dm_status_t *err);

/**
 * One statement for a region. Owned by the submitter (usually embedded in a per-call
 * context); parameter buffers must stay valid until `done` runs. Results are binary format.
 */
struct dm_job {
    dm_sql_id_t stmt;
    int n_params;
    const char *values[DM_JOB_MAX_PARAMS];
    int lengths[DM_JOB_MAX_PARAMS];
    int formats[DM_JOB_MAX_PARAMS]; /* 0 text, 1 binary */
    bool batchable; /* may share a transaction with other batchable jobs: the statement must
                       report expected failures in its result, never raise them */
    dm_job_fn done;
    void *arg;
    void *owner; /* optional: what the job is for (dm_job_owner_ops_t); a job whose owner
                    is cancelled or past its deadline is not sent */

    /* executor-private */
    dm_job_t *next;
    bool solo;
    PGresult *held;
};

/**
 * What the regions may ask of a job's owner (opaque here; for the gateway, the gRPC call the
 * job serves: src/app/app.c registers the ops, src/peer reads the owner as a call).
 */
typedef struct dm_job_owner_ops {
    /** True once the owner no longer wants the answer (cancelled, deadline passed). */
    bool (*cancelled)(void *owner);
    /** Milliseconds left before the owner's deadline; INT64_MAX when it has none. */
    int64_t (*deadline_left_ms)(void *owner);
} dm_job_owner_ops_t;

/** Set parameter i (text, NUL-terminated; NULL = SQL NULL). */
void dm_job_param_text(dm_job_t *job, int i, const char *v);
/** Set parameter i (binary bytes, e.g. bytea). */
void dm_job_param_bin(dm_job_t *job, int i, const void *v, int len);

/** Called on a monitor thread when a region starts or stops answering. Must not block. */
typedef void (*dm_region_change_fn)(void *arg, dm_region_t *region, bool serving);

/** Build the regions of `cfg` (reads the password files). `cfg` must outlive the set. */
dm_status_t *dm_regions_create(const dm_config_t *cfg, dm_regions_t **out) DM_WARN_UNUSED;
/**
 * Maintenance work run on one executor of every region when it is idle and `interval_ms` has
 * passed: it may run statements synchronously with dm_region_exec(). Set before start.
 */
typedef struct dm_exec dm_exec_t;
typedef void (*dm_idle_fn)(dm_region_t *r, dm_exec_t *x, void *arg);
void dm_regions_set_idle_task(dm_regions_t *rs, dm_idle_fn fn, void *arg, int interval_ms);
/** Run every region's maintenance task as soon as its executor is free (new work for it). */
void dm_regions_poke(dm_regions_t *rs);
/** True once after dm_regions_poke() for region `r` (the maintenance task's own check). */
bool dm_region_take_poke(dm_region_t *r);
/**
 * Inside an idle task: run one prepared statement in its own transaction and wait for it.
 * Returns the result (caller clears) or NULL when the statement failed (*err set, caller
 * frees) — after a connection failure the connection is dropped and later calls fail too.
 */
PGresult *dm_region_exec(dm_exec_t *x, dm_sql_id_t stmt, int n, const char *const *values,
                         const int *lengths, const int *formats, dm_status_t **err);

/**
 * Jobs for a region served by other gateways (not the own region) go to `fn` (src/peer), which
 * must complete each exactly once like an executor would. Set before start.
 */
typedef void (*dm_remote_submit_fn)(void *arg, dm_region_t *r, dm_job_t *job);
void dm_regions_set_remote(dm_regions_t *rs, dm_remote_submit_fn fn, void *arg);
/**
 * How to ask jobs' owners whether they still want their answer and how long they may wait
 * (`ops` static storage). Without it, owners are never asked. Set before start.
 */
void dm_regions_set_owner_ops(dm_regions_t *rs, const dm_job_owner_ops_t *ops);
/** UNAVAILABLE naming the reason while r is fenced or held (as its jobs fail), else NULL. */
dm_status_t *dm_region_fence_check(dm_region_t *r) DM_WARN_UNUSED;
/**
 * Hold the own region r: a restore took it back in time (src/restore). While held, every job
 * that serves a call (a job with an owner) fails UNAVAILABLE naming `reason`, except the
 * statements the federation's own upkeep needs (fences, witnesses, marks, request delivery);
 * the gateway's maintenance (jobs without an owner) goes on. `reason` NULL or "" releases it.
 * Thread-safe.
 */
void dm_region_hold(dm_region_t *r, const char *reason);
/** Whether r is held, and why (into reason, when given). Thread-safe. */
bool dm_region_held(dm_region_t *r, char *reason, size_t len);
/** True for the gateway's own region (database and secrets here); false for a peer region. */
bool dm_region_is_local(const dm_region_t *r);
/**
 * A peer region's reachability as its gateways' health checks see it (`where`: the gateway
 * that answered; `error`: why none did). Reported to the change listener like a local one.
 */
void dm_region_set_remote_state(dm_region_t *r, bool serving, const char *where, const char *error);

/** Set the change listener (before start). */
void dm_regions_on_change(dm_regions_t *rs, dm_region_change_fn fn, void *arg);
/** Start the monitor threads. */
void dm_regions_start(dm_regions_t *rs);
/** Stop and join the monitor threads (closes their connections). Idempotent. */
void dm_regions_stop(dm_regions_t *rs);
/** Free the set; stops it first if needed. NULL is allowed. */
void dm_regions_destroy(dm_regions_t *rs);

size_t dm_regions_count(const dm_regions_t *rs);
dm_region_t *dm_regions_at(dm_regions_t *rs, size_t i);
/** The region with this code, or NULL when no such region is loaded. */
dm_region_t *dm_regions_find(dm_regions_t *rs, const char *code);

const char *dm_region_code(const dm_region_t *r);
const dm_region_config_t *dm_region_config(const dm_region_t *r);
/** True while at least one executor holds a verified connection to the region's primary. */
bool dm_region_serving(dm_region_t *r);
/**
 * Queue a job. When the region has no live connection the job fails at once (UNAVAILABLE,
 * naming the region) on this thread.
 */
void dm_region_submit(dm_region_t *r, dm_job_t *job);
/** Copy of the last connection or probe error ("" when none) into buf. */
void dm_region_last_error(dm_region_t *r, char *buf, size_t len);

/** Bytes of UTF-8 in a fence's (or a lift's) reason. */
#define DM_FENCE_REASON_MAX 1024

/** A snapshot of a region's state for ListRegions (and metrics). */
typedef struct dm_region_info {
    bool reachable;
    char primary[128];
    int pool_size, pool_in_use, queued;
    int64_t write_batches, batched_writes; /* committed write batches, the jobs in them */
    bool breaker_open;
    int64_t breaker_changed_ms;
    bool fenced;
    char fence_reason[DM_FENCE_REASON_MAX + 1], fenced_by[72];
    int64_t fenced_at_ms;
    char last_error[256];
    int64_t last_error_ms;
} dm_region_info_t;

void dm_region_info(dm_region_t *r, dm_region_info_t *out);
/**
 * One row of a region's `fences` table about region r: a fence, or a lift of one (lifted).
 * Rows are versioned; the newest one any region holds decides, a fence beating a lift of the
 * same version (regions/schema/007_fence_versions.sql).
 */
typedef struct dm_fence {
    int64_t version;
    bool lifted;
    char reason[DM_FENCE_REASON_MAX + 1], by[72];
    int64_t at_ms;
} dm_fence_t;

/** -1 < 0 < 1 when a is older than, the same as, or newer than b (NULL: no row, the oldest). */
int dm_fence_cmp(const dm_fence_t *a, const dm_fence_t *b);
/**
 * What region `src` (its index) holds about r's fence, NULL for no row; `src` = -1 for what
 * this gateway has just written. r is fenced when the newest of these is a fence; from then
 * on its calls fail at once with UNAVAILABLE naming the reason (queued ones included).
 */
void dm_region_fence_seen(dm_region_t *r, int src, const dm_fence_t *f);
/** The newest row known about r's fence into *out; false when none is known. */
bool dm_region_fence_newest(dm_region_t *r, dm_fence_t *out);

/* ---- fences kept in step across regions (src/region/fences.c) ---- */

/** Read the peer regions' fences tables through their gateways (asynchronously, at most one
 * read per region in flight); what they hold counts as for the own table. */
void dm_regions_poll_peer_fences(dm_regions_t *rs);
/** The regions' maintenance task: apply the fences that region `src` holds (and bring its
 * table up to date with the newest row known). */
void dm_regions_refresh_fences(dm_regions_t *rs, dm_region_t *src, dm_exec_t *x);

#endif
