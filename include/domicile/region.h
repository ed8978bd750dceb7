/*
 * Runtime regions: one per region file. For now each region has a monitor thread that keeps
 * one libpq connection (verify-full TLS, multi-host, read-write target) and probes it; it knows
 * whether the region answers and checks that the database really is the region it claims to
 * be (domicile.region_identity), so a misconfigured host list fails closed instead of placing
 * data in the wrong jurisdiction.
 *
 * Thread-safety: every function may be called from any thread after dm_regions_start().
 */
#ifndef DOMICILE_REGION_H
#define DOMICILE_REGION_H

#include <stdbool.h>
#include <stddef.h>

#include "domicile/config.h"
#include "domicile/status.h"

typedef struct dm_region dm_region_t;
typedef struct dm_regions dm_regions_t;

/** Called on a monitor thread when a region starts or stops answering. Must not block. */
typedef void (*dm_region_change_fn)(void *arg, dm_region_t *region, bool serving);

/** Build the regions of `cfg` (reads the password files). `cfg` must outlive the set. */
dm_status_t *dm_regions_create(const dm_config_t *cfg, dm_regions_t **out) DM_WARN_UNUSED;
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
/** True when the last probe reached the region's primary and its identity matched. */
bool dm_region_serving(dm_region_t *r);
/** Copy of the last connection or probe error ("" when none) into buf. */
void dm_region_last_error(dm_region_t *r, char *buf, size_t len);

#endif
