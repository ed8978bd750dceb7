/*
 * One statement run in every region at once; the callback sees every region's result (or
 * error) together. Used where an answer needs all regions: data-subject requests, Locate,
 * fences, webhooks (src/region/fanout.c).
 *
 * Thread-safety: any thread; `done` runs on an executor thread, or on the starting thread.
 */
#ifndef DOMICILE_FANOUT_H
#define DOMICILE_FANOUT_H

#include "domicile/region.h"

/** Every region's answer to one statement: res[i] (owned) or err[i] (owned). */
typedef struct dm_fanout {
    size_t n;
    dm_region_t *region[DM_MAX_REGIONS];
    PGresult *res[DM_MAX_REGIONS];
    dm_status_t *err[DM_MAX_REGIONS];
    struct dm_fanout_priv *priv;
} dm_fanout_t;

typedef void (*dm_fanout_fn)(dm_fanout_t *f, void *arg);

/**
 * Run `stmt` with the given parameters (copied) in every region; `done` runs once with all
 * answers (on an executor thread, or this one) and must free `f` with dm_fanout_free().
 * `formats` may be NULL (all text). `owner` (may be NULL) is every job's owner (dm_job_t).
 */
void dm_fanout_start(void *owner, dm_regions_t *regions, dm_sql_id_t stmt, int n,
                     const char *const *values, const int *lengths, const int *formats,
                     dm_fanout_fn done, void *arg);
/**
 * Called as region i's answer (f->res[i] or f->err[i]) arrives, before `done`, on the thread
 * that completed it: it may read that answer only (the others are still being written).
 */
typedef void (*dm_fanout_each_fn)(dm_fanout_t *f, size_t i, void *arg);
/** dm_fanout_start() that also calls `each` per region as its answer arrives. */
void dm_fanout_start_each(void *owner, dm_regions_t *regions, dm_sql_id_t stmt, int n,
                          const char *const *values, const int *lengths, const int *formats,
                          dm_fanout_each_fn each, dm_fanout_fn done, void *arg);
void dm_fanout_free(dm_fanout_t *f);

#endif
