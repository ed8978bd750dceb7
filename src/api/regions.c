/*
 * domicile.v1.RegionsService: ListRegions (each region's pool, breaker, fence and replication as
 * this gateway sees them), Fence and Unfence (a versioned row written to every reachable
 * region, so that every gateway instance applies it, and brought to the others when they
 * answer again; see regions/schema/005_regions.sql and 007_fence_versions.sql).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "domicile/v1/regions.pb-c.h"

#include "domicile/clock.h"
#include "domicile/log.h"
#include "internal.h"

typedef struct status_view {
    Domicile__V1__RegionStatus st;
    dm_region_info_t info;
    char state[32];
} status_view_t;

static void fill(status_view_t *v, dm_region_t *r, const PGresult *repl)
{
    const dm_region_config_t *c = dm_region_config(r);
    Domicile__V1__RegionStatus *s = &v->st;
    domicile__v1__region_status__init(s);
    dm_region_info(r, &v->info);
    s->code = c->code;
    s->name = c->name;
    s->jurisdiction = c->jurisdiction;
    s->reachable = v->info.reachable && !v->info.breaker_open;
    s->primary_host = v->info.primary;
    s->pool_size = v->info.pool_size;
    s->pool_in_use = v->info.pool_in_use;
    s->queued_statements = v->info.queued;
    s->breaker = v->info.breaker_open ? DOMICILE__V1__BREAKER_STATE__BREAKER_STATE_OPEN
                                      : DOMICILE__V1__BREAKER_STATE__BREAKER_STATE_CLOSED;
    s->breaker_changed_at_unix_ms = v->info.breaker_changed_ms;
    s->fenced = v->info.fenced;
    s->fence_reason = v->info.fenced ? v->info.fence_reason : "";
    s->fenced_by = v->info.fenced ? v->info.fenced_by : "";
    s->fenced_at_unix_ms = v->info.fenced ? v->info.fenced_at_ms : 0;
    s->last_error = v->info.last_error;
    s->last_error_at_unix_ms = v->info.last_error_ms;
    s->replication_state = "";
    if (repl && PQntuples(repl) == 1) {
        int len;
        snprintf(v->state, sizeof(v->state), "%s", dm_pg_bytes(repl, 0, 1, &len));
        s->replication_state = v->state;
        s->replication_lag_bytes = dm_pg_int8(repl, 0, 2);
    } else if (repl) {
        s->replication_state = "none"; /* regions.proto: no standby connected */
    }
}

static int by_code(const void *a, const void *b)
{
    return strcmp((*(Domicile__V1__RegionStatus *const *)a)->code,
                  (*(Domicile__V1__RegionStatus *const *)b)->code);
}

static void list_done(dm_fanout_t *f, void *arg)
{
    dm_call_t *call = arg;
    Domicile__V1__ListRegionsResponse rep = DOMICILE__V1__LIST_REGIONS_RESPONSE__INIT;
    status_view_t *v = dm_calloc(f->n, sizeof(*v));
    Domicile__V1__RegionStatus **sp = dm_calloc(f->n, sizeof(*sp));
    for (size_t i = 0; i < f->n; i++) {
        fill(&v[i], f->region[i], f->err[i] ? NULL : f->res[i]);
        sp[i] = &v[i].st;
    }
    qsort(sp, f->n, sizeof(*sp), by_code); /* regions.proto: in region code order */
    rep.n_regions = f->n;
    rep.regions = sp;
    dm_call_reply(call, &rep.base);
    free(sp);
    free(v);
    dm_fanout_free(f);
}

void dm_regions_list(dm_call_t *call)
{
    dm_fanout_start(call, APP(call)->regions, DM_SQL_REPLICATION, 0, NULL, NULL, NULL, list_done,
                    call);
}

typedef struct fence_ctx {
    dm_call_t *call;
    dm_region_t *region;
    dm_fence_t row;
    char at_s[24], version_s[24];
} fence_ctx_t;

static void fence_done(dm_fanout_t *f, void *arg)
{
    fence_ctx_t *c = arg;
    size_t stored = 0;
    for (size_t i = 0; i < f->n; i++)
        if (!f->err[i])
            stored++;
    if (!stored) {
        dm_fanout_free(f);
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                              "no region could record the %s; retry",
                                              c->row.lifted ? "unfence" : "fence"));
        return;
    }
    /* In force here at once; the regions that missed it get it from the maintenance task
     * of every gateway once they answer again (dm_regions_refresh_fences). */
    dm_region_fence_seen(c->region, -1, &c->row);
    for (size_t i = 0; i < f->n; i++)
        if (!f->err[i])
            dm_region_fence_seen(c->region, (int)i, &c->row);
    dm_fanout_free(f);
    dm_info("regions", "region %s %s by %s (stored in %zu of %zu regions)",
            dm_region_code(c->region), c->row.lifted ? "unfenced" : "fenced", c->row.by, stored,
            dm_regions_count(APP(c->call)->regions));
    status_view_t v;
    fill(&v, c->region, NULL);
    dm_api_reply_wrapped(c->call, &v.st.base);
}

static void fence_common(dm_call_t *call, const char *request_id, const char *region,
                         const char *reason, bool fence)
{
    dm_app_t *app = APP(call);
    const dm_principal_t *p = dm_call_principal_of(call);
    dm_status_t *st;
    dm_region_t *r = region[0] && strlen(region) <= DM_REGION_CODE_MAX
                         ? dm_regions_find(app->regions, region)
                         : NULL;
    if ((st = dm_check_request_id("request_id", request_id)) ||
        (st = dm_check_text("reason", reason, fence ? 1 : 0, DM_FENCE_REASON_MAX))) {
        dm_call_finish(call, st);
        return;
    }
    if (!r) {
        dm_call_finish(call,
                       dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "region: unknown region code"));
        return;
    }
    fence_ctx_t *c = dm_calloc(1, sizeof(*c));
    c->call = call;
    c->region = r;
    dm_fence_t newest;
    bool known = dm_region_fence_newest(r, &newest);
    if (fence && known && !newest.lifted) {
        c->row = newest; /* fencing a fenced region keeps the first reason */
    } else {
        c->row.lifted = !fence;
        snprintf(c->row.reason, sizeof(c->row.reason), "%s", reason); /* a lift's: logged */
        snprintf(c->row.by, sizeof(c->row.by), "%s", p ? p->name : "");
        c->row.at_ms = dm_now_ms();
    }
    /* Newer than every row seen; clock-based so that gateways which have not seen each
     * other's rows yet still order them by time (the low bits tell equal times apart). */
    c->row.version = dm_now_ms() * 1024 + (random() & 1023);
    if (known && c->row.version <= newest.version)
        c->row.version = newest.version + 1;
    snprintf(c->at_s, sizeof(c->at_s), "%lld", (long long)c->row.at_ms);
    snprintf(c->version_s, sizeof(c->version_s), "%lld", (long long)c->row.version);
    dm_call_set_data(call, c, free);
    const char *vals[6] = {dm_region_code(r),         c->row.reason, c->row.by, c->at_s,
                           c->row.lifted ? "t" : "f", c->version_s};
    dm_fanout_start(call, app->regions, DM_SQL_FENCE_PUT, 6, vals, NULL, NULL, fence_done, c);
}

void dm_regions_fence(dm_call_t *call)
{
    const Domicile__V1__FenceRequest *req =
        (const Domicile__V1__FenceRequest *)dm_call_request(call);
    fence_common(call, req->request_id, req->region, req->reason, true);
}

void dm_regions_unfence(dm_call_t *call)
{
    const Domicile__V1__UnfenceRequest *req =
        (const Domicile__V1__UnfenceRequest *)dm_call_request(call);
    fence_common(call, req->request_id, req->region, req->reason, false);
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

void dm_regions_refresh_fences(dm_app_t *app, dm_region_t *src, dm_exec_t *x)
{
    /* What this region's fences table says about every region; then the newest row known
     * from any region is written back here where this table holds an older one (a region
     * that was down while a fence was set or lifted). */
    dm_status_t *err = NULL;
    PGresult *res = dm_region_exec(x, DM_SQL_FENCE_LIST, 0, NULL, NULL, NULL, &err);
    if (!res) {
        dm_status_free(err);
        return;
    }
    int src_i = (int)dm_app_region_index(app, src);
    for (size_t i = 0; i < dm_regions_count(app->regions); i++) {
        dm_region_t *r = dm_regions_at(app->regions, i);
        int len;
        dm_fence_t row, *held = NULL;
        for (int k = 0; k < PQntuples(res); k++) {
            if (strcmp(dm_pg_bytes(res, k, 0, &len), dm_region_code(r)) != 0)
                continue;
            memset(&row, 0, sizeof(row));
            snprintf(row.reason, sizeof(row.reason), "%s", dm_pg_bytes(res, k, 1, &len));
            snprintf(row.by, sizeof(row.by), "%s", dm_pg_bytes(res, k, 2, &len));
            row.at_ms = dm_pg_time_ms(res, k, 3);
            row.lifted = dm_pg_bool(res, k, 4);
            row.version = dm_pg_int8(res, k, 5);
            held = &row;
        }
        dm_region_fence_seen(r, src_i, held);
        dm_fence_t newest;
        if (dm_region_fence_newest(r, &newest) && dm_fence_cmp(&newest, held) > 0 &&
            put_row(x, src, r, &newest))
            dm_region_fence_seen(r, src_i, &newest);
    }
    PQclear(res);
}
