/*
 * Fences kept in step across regions: a fence (or its lift) is a versioned row in every
 * region's `fences` table (regions/schema/005_regions.sql, 007_fence_versions.sql); the
 * regions' maintenance task reads the own table and the peers' (through their gateways),
 * applies the newest row known about each region, and writes it back where the own table
 * holds an older one. Fence and Unfence themselves are src/api/regions.c.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "domicile/log.h"
#include "domicile/region.h"

/* Index of r in the set (0 when absent, as dm_app_region_index). */
static int region_index(dm_regions_t *rs, dm_region_t *r)
{
    for (size_t i = 0; i < dm_regions_count(rs); i++)
        if (dm_regions_at(rs, i) == r)
            return (int)i;
    return 0;
}

static bool put_row(dm_exec_t *x, dm_region_t *src, dm_region_t *r, const dm_fence_t *f)
{
    char at_s[24], version_s[24];
    snprintf(at_s, sizeof(at_s), "%lld", (long long)f->at_ms);
    snprintf(version_s, sizeof(version_s), "%lld", (long long)f->version);
    const char *vals[6] = {dm_region_code(r),     f->reason, f->by, at_s,
                           f->lifted ? "t" : "f", version_s};
    dm_status_t *err = NULL;
    PGresult *res = dm_region_exec(x, DM_SQL_FENCE_PUT, 6, vals, NULL, NULL, &err);
    if (res)
        dm_info("regions", "region %s: brought its row about %s's fence up to date (%s)",
                dm_region_code(src), dm_region_code(r), f->lifted ? "lifted" : "fenced");
    else
        dm_warn("regions", "region %s: cannot update its row about %s's fence: %s",
                dm_region_code(src), dm_region_code(r), err ? err->message : "?");
    bool ok = res != NULL;
    PQclear(res);
    dm_status_free(err);
    return ok;
}

/* What a fences table (region src_i's) says about region r: *row, or NULL for no row. */
static const dm_fence_t *row_about(const PGresult *res, dm_region_t *r, dm_fence_t *row)
{
    const dm_fence_t *held = NULL;
    int len;
    for (int k = 0; k < PQntuples(res); k++) {
        if (strcmp(dm_pg_bytes(res, k, 0, &len), dm_region_code(r)) != 0)
            continue;
        memset(row, 0, sizeof(*row));
        snprintf(row->reason, sizeof(row->reason), "%s", dm_pg_bytes(res, k, 1, &len));
        snprintf(row->by, sizeof(row->by), "%s", dm_pg_bytes(res, k, 2, &len));
        row->at_ms = dm_pg_time_ms(res, k, 3);
        row->lifted = dm_pg_bool(res, k, 4);
        row->version = dm_pg_int8(res, k, 5);
        held = row;
    }
    return held;
}

void dm_regions_refresh_fences(dm_regions_t *rs, dm_region_t *src, dm_exec_t *x)
{
    /* What this region's fences table says about every region; then the newest row known
     * from any region (the peers' tables are read through their gateways, below) is written
     * back here where this table holds an older one (a region that was down while a fence
     * was set or lifted). Each gateway writes its own region's table only. */
    dm_status_t *err = NULL;
    PGresult *res = dm_region_exec(x, DM_SQL_FENCE_LIST, 0, NULL, NULL, NULL, &err);
    if (!res) {
        dm_status_free(err);
        return;
    }
    int src_i = region_index(rs, src);
    for (size_t i = 0; i < dm_regions_count(rs); i++) {
        dm_region_t *r = dm_regions_at(rs, i);
        dm_fence_t row;
        const dm_fence_t *held = row_about(res, r, &row);
        dm_region_fence_seen(r, src_i, held);
        dm_fence_t newest;
        if (dm_region_fence_newest(r, &newest) && dm_fence_cmp(&newest, held) > 0 &&
            put_row(x, src, r, &newest))
            dm_region_fence_seen(r, src_i, &newest);
    }
    PQclear(res);
}

typedef struct peer_fences {
    dm_job_t job;
    dm_regions_t *rs;
    size_t src_i;
    atomic_bool in_flight;
} peer_fences_t;

static peer_fences_t peer_fences[DM_MAX_REGIONS];

static void peer_fences_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    peer_fences_t *pf = job->arg;
    if (err) {
        dm_status_free(err); /* unreachable: what it said last still counts */
    } else {
        for (size_t i = 0; i < dm_regions_count(pf->rs); i++) {
            dm_region_t *r = dm_regions_at(pf->rs, i);
            dm_fence_t row;
            dm_region_fence_seen(r, (int)pf->src_i, row_about(res, r, &row));
        }
    }
    atomic_store(&pf->in_flight, false);
}

void dm_regions_poll_peer_fences(dm_regions_t *rs)
{
    for (size_t i = 0; i < dm_regions_count(rs) && i < DM_MAX_REGIONS; i++) {
        dm_region_t *r = dm_regions_at(rs, i);
        peer_fences_t *pf = &peer_fences[i];
        if (dm_region_is_local(r) || atomic_exchange(&pf->in_flight, true))
            continue;
        memset(&pf->job, 0, sizeof(pf->job));
        pf->rs = rs;
        pf->src_i = i;
        pf->job.stmt = DM_SQL_FENCE_LIST;
        pf->job.done = peer_fences_done;
        pf->job.arg = pf;
        dm_region_submit(r, &pf->job);
    }
}
