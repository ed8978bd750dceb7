/*
 * domicile.v1.Regions: ListRegions (each region's pool, breaker, fence and replication as
 * this gateway sees them), Fence and Unfence (written to every reachable region so that every
 * gateway instance applies them; see regions/schema/005_regions.sql).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "domicile/v1/regions.pb-c.h"

#include "domicile/clock.h"
#include "domicile/log.h"
#include "internal.h"

#define REASON_MAX 1024

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
        s->replication_state = "no standby";
    }
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
    bool fence;
    char reason[REASON_MAX + 1];
    char by[72];
} fence_ctx_t;

static void fence_done(dm_fanout_t *f, void *arg)
{
    fence_ctx_t *c = arg;
    unsigned stored = 0;
    for (size_t i = 0; i < f->n; i++)
        if (!f->err[i])
            stored |= 1u << i;
    dm_fanout_free(f);
    if (!stored) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                              "no region could record the %s; retry",
                                              c->fence ? "fence" : "unfence"));
        return;
    }
    if (c->fence)
        dm_region_fence(c->region, true, c->reason, c->by, dm_now_ms(), stored, false);
    else
        dm_region_fence(c->region, false, NULL, NULL, 0, 0, true);
    dm_info("regions", "region %s %s by %s", dm_region_code(c->region),
            c->fence ? "fenced" : "unfenced", c->by);
    status_view_t v;
    fill(&v, c->region, NULL);
    dm_call_reply(c->call, &v.st.base);
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
        (fence && (st = dm_check_text("reason", reason, 1, REASON_MAX)))) {
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
    c->fence = fence;
    snprintf(c->reason, sizeof(c->reason), "%s", fence ? reason : "");
    snprintf(c->by, sizeof(c->by), "%s", p ? p->name : "");
    dm_call_set_data(call, c, free);
    const char *vals[3] = {dm_region_code(r), c->reason, c->by};
    dm_fanout_start(call, app->regions, fence ? DM_SQL_FENCE_SET : DM_SQL_FENCE_CLEAR,
                    fence ? 3 : 1, vals, NULL, NULL, fence_done, c);
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
    fence_common(call, req->request_id, req->region, "", false);
}

void dm_regions_refresh_fences(dm_app_t *app, dm_region_t *src, dm_exec_t *x)
{
    /* What this region's fences table says, for every region: its bit in each fence. */
    dm_status_t *err = NULL;
    PGresult *res = dm_region_exec(x, DM_SQL_FENCE_LIST, 0, NULL, NULL, NULL, &err);
    if (!res) {
        dm_status_free(err);
        return;
    }
    unsigned bit = 1u << dm_app_region_index(app, src);
    for (size_t i = 0; i < dm_regions_count(app->regions); i++) {
        dm_region_t *r = dm_regions_at(app->regions, i);
        int row = -1, len;
        for (int k = 0; k < PQntuples(res); k++)
            if (strcmp(dm_pg_bytes(res, k, 0, &len), dm_region_code(r)) == 0)
                row = k;
        if (row >= 0)
            dm_region_fence(r, true, dm_pg_bytes(res, row, 1, &len), dm_pg_bytes(res, row, 2, &len),
                            dm_pg_time_ms(res, row, 3), bit, false);
        else
            dm_region_fence(r, false, NULL, NULL, 0, bit, false);
    }
    PQclear(res);
}
