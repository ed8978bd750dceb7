/*
 * Data-subject requests: the worker that runs legs in every region (the regions' idle task),
 * and deadline arithmetic. The API side is src/api/subject_rights.c.
 */
#ifndef DOMICILE_DSR_H
#define DOMICILE_DSR_H

#include <stdatomic.h>
#include <stdint.h>

#include "domicile/region.h"

/** What the worker needs; owned by the app. */
typedef struct dm_dsr_ctx {
    dm_regions_t *regions;
    char me[96]; /* claimant id: host, pid, random (leases name it) */
    int64_t last_run_ms[DM_MAX_REGIONS];
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
