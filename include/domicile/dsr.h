/*
 * Data-subject requests: the worker that runs legs in every region (the regions' idle task),
 * and deadline arithmetic. The API side is src/api/subject_rights.c.
 */
#ifndef DOMICILE_DSR_H
#define DOMICILE_DSR_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "domicile/region.h"

typedef struct dm_webhooks dm_webhooks_t;

struct dm_app;
/** Start the webhook thread when webhook_url is set (*out NULL otherwise). */
dm_status_t *dm_webhooks_create(struct dm_app *app, dm_webhooks_t **out) DM_WARN_UNUSED;
/** Stop the thread (before the regions stop: it runs statements). Idempotent; NULL is ok. */
void dm_webhooks_stop(dm_webhooks_t *w);
void dm_webhooks_destroy(dm_webhooks_t *w);
/** Hand a request whose webhook is due to the webhook thread; false when not queued. */
bool dm_webhooks_enqueue(dm_webhooks_t *w, const char *request_id, size_t region);

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

/** `ms` plus `months` calendar months (day clamped to the month's last: 31 Jan + 1 = 28/29 Feb). */
int64_t dm_add_months_ms(int64_t ms, int months);

#endif
