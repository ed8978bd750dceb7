/*
 * Data-subject requests: the worker that runs legs in every region (the regions' idle task),
 * completion webhooks (src/dsr/webhook.c), and deadline arithmetic. The API side is
 * src/api/subject_rights.c.
 */
#ifndef DOMICILE_DSR_H
#define DOMICILE_DSR_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "domicile/region.h"

typedef struct dm_webhooks dm_webhooks_t;

/**
 * Start the webhook thread when webhook_url is set (*out NULL otherwise). `cfg` and `regions`
 * must outlive it.
 */
dm_status_t *dm_webhooks_create(const dm_config_t *cfg, dm_regions_t *regions,
                                dm_webhooks_t **out) DM_WARN_UNUSED;
/**
 * Load customer_webhooks_file (if set) as dm_webhooks_create() would, secrets included (read,
 * mode-checked, cleansed, never printed), and free it: what --check-config runs. Errors are
 * "file:line: key ...". *n_customers: the customers with their own receiver.
 */
dm_status_t *dm_webhooks_check(const dm_config_t *cfg, size_t *n_customers) DM_WARN_UNUSED;
/** Stop the thread (before the regions stop: it runs statements). Idempotent; NULL is ok. */
void dm_webhooks_stop(dm_webhooks_t *w);
void dm_webhooks_destroy(dm_webhooks_t *w);
/** Is a completion webhook configured for requests of `customer` ("" = every customer in
 * scope: only the global webhook applies)? False when w is NULL. */
bool dm_webhooks_apply(const dm_webhooks_t *w, const char *customer);
/** Hand a request whose webhook is due to the webhook thread; false when not queued. */
bool dm_webhooks_enqueue(dm_webhooks_t *w, const char *request_id, size_t region);

/** What this gateway's webhook thread has seen since it started (metrics). */
typedef struct dm_webhook_stats {
    int64_t delivered, failed; /* attempts by outcome */
    int64_t failing_receivers; /* receivers whose last attempt failed */
    int64_t failing_since_ms;  /* first failure of the one failing longest; 0: none */
} dm_webhook_stats_t;
/** Fill *out (zeros when `w` is NULL: no webhook configured). Any thread. */
void dm_webhooks_stats(dm_webhooks_t *w, dm_webhook_stats_t *out);

/** A request's legs being run at once by this gateway (dm_dsr_run_now). */
typedef struct dm_dsr_now dm_dsr_now_t;

/** What the worker needs; owned by the app. */
typedef struct dm_dsr_ctx {
    dm_regions_t *regions;
    dm_webhooks_t *webhooks; /* NULL: no webhook configured */
    char me[96];             /* claimant id: host, pid, random (leases name it) */
    int64_t last_run_ms[DM_MAX_REGIONS];
    int64_t last_count_ms[DM_MAX_REGIONS];
    atomic_int propagating[DM_MAX_REGIONS];
} dm_dsr_ctx_t;

/** Fill the claimant id. */
void dm_dsr_ctx_init(dm_dsr_ctx_t *ctx, dm_regions_t *regions);
/**
 * Idle work for region `r` (index `ri`): claim due legs here and run them, then copy requests
 * that other regions missed. Runs on the region's maintenance executor.
 */
void dm_dsr_idle(dm_dsr_ctx_t *ctx, dm_region_t *r, size_t ri, dm_exec_t *x);

/** Lease of a claimed leg, in seconds (a dead claimant's leg is taken over after it). */
#define DM_DSR_LEASE_S "30"

/**
 * Run the legs of a request this gateway has just stored, at once: per region in `stored`
 * (those that took it), jobs on whichever executor of the region is free rather than the
 * maintenance one, so a leg waits neither for the workers' next round nor behind a sealing
 * round. A leg is run as the workers run it, under this gateway's lease (it shows RUNNING
 * and is taken over if this gateway dies): claimed[i] when storing it claimed it already
 * (DM_SQL_DSR_RECEIVE_CLAIM), else it is claimed first, only if pending and nobody holds it
 * (domicile.dsr_claim_one). A failure is recorded with the workers' backoff and retried by
 * them; a leg that cannot be claimed here is left to them (they are poked). Never blocks;
 * any thread. `request_id` and `kind` are copied.
 */
void dm_dsr_run_now(dm_dsr_ctx_t *ctx, const char *request_id, const char *kind,
                    dm_region_t *const *stored, const bool *claimed, size_t n);

/** `ms` plus `months` calendar months (day clamped to the month's last: 31 Jan + 1 = 28/29 Feb). */
int64_t dm_add_months_ms(int64_t ms, int months);

#endif
