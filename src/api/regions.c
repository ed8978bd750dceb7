/*
 * domicile.v1.RegionsService: ListRegions (each region's pool, breaker, fence and replication as
 * this gateway sees them), Fence and Unfence (a versioned row written to every reachable
 * region, so that every gateway instance applies it, and brought to the others when they
 * answer again; see regions/schema/005_regions.sql and 007_fence_versions.sql).
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "domicile/v1/regions.pb-c.h"

#include "domicile/clock.h"
#include "domicile/log.h"
#include "domicile/fanout.h"
#include "internal.h"

#include "domicile/peer/v1/peer.pb-c.h"

#define REGION_INFO_PATH "/domicile.peer.v1.PeerService/RegionInfo"

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

/* ListRegions: the own region from its database, each peer region from its own gateway
 * (PeerService/RegionInfo), all at once. */
typedef struct list_ctx {
    dm_call_t *call;
    dm_app_t *app;
    atomic_int pending;
    dm_job_t job;
    size_t local_i;
    status_view_t v[DM_MAX_REGIONS];
    Domicile__Peer__V1__RegionInfoResponse *remote[DM_MAX_REGIONS];
    size_t remote_i[DM_MAX_REGIONS];
} list_ctx_t;

static void list_ctx_free(void *arg)
{
    list_ctx_t *c = arg;
    for (size_t i = 0; i < DM_MAX_REGIONS; i++)
        if (c->remote[i])
            protobuf_c_message_free_unpacked(&c->remote[i]->base, NULL);
    free(c);
}

static void list_part_done(list_ctx_t *c)
{
    if (atomic_fetch_sub(&c->pending, 1) != 1)
        return;
    size_t n = dm_regions_count(c->app->regions);
    Domicile__V1__ListRegionsResponse rep = DOMICILE__V1__LIST_REGIONS_RESPONSE__INIT;
    Domicile__V1__RegionStatus *sp[DM_MAX_REGIONS], merged[DM_MAX_REGIONS];
    for (size_t i = 0; i < n; i++) {
        if (c->remote[i] && c->remote[i]->status) {
            /* Its gateway's view (a copy: the unpacked message owns its strings). A call is
             * refused where either gateway holds a fence: shown fenced while either does. */
            merged[i] = *c->remote[i]->status;
            if (c->v[i].st.fenced) {
                merged[i].fenced = true;
                merged[i].fence_reason = c->v[i].st.fence_reason;
                merged[i].fenced_by = c->v[i].st.fenced_by;
                merged[i].fenced_at_unix_ms = c->v[i].st.fenced_at_unix_ms;
            }
            sp[i] = &merged[i];
        } else {
            sp[i] = &c->v[i].st;
        }
    }
    qsort(sp, n, sizeof(*sp), by_code); /* regions.proto: in region code order */
    rep.n_regions = n;
    rep.regions = sp;
    dm_call_reply(c->call, &rep.base);
}

static void list_local_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    list_ctx_t *c = job->arg;
    fill(&c->v[c->local_i], dm_regions_at(c->app->regions, c->local_i), err ? NULL : res);
    dm_status_free(err);
    list_part_done(c);
}

typedef struct list_remote {
    list_ctx_t *c;
    size_t i;
} list_remote_t;

static void list_remote_done(void *arg, ProtobufCMessage *reply, dm_status_t *err)
{
    list_remote_t *lr = arg;
    list_ctx_t *c = lr->c;
    if (err) {
        /* Unreachable: this gateway's own view of it says so. */
        dm_status_free(err);
    } else {
        c->remote[lr->i] = (Domicile__Peer__V1__RegionInfoResponse *)reply;
    }
    free(lr);
    list_part_done(c);
}

void dm_regions_list(dm_call_t *call)
{
    dm_app_t *app = APP(call);
    list_ctx_t *c = dm_calloc(1, sizeof(*c));
    c->call = call;
    c->app = app;
    dm_call_set_data(call, c, list_ctx_free);
    size_t n = dm_regions_count(app->regions);
    for (size_t i = 0; i < n; i++)
        fill(&c->v[i], dm_regions_at(app->regions, i), NULL);
    atomic_init(&c->pending, (int)n + 1);
    for (size_t i = 0; i < n; i++) {
        dm_region_t *r = dm_regions_at(app->regions, i);
        if (dm_region_is_local(r)) {
            c->local_i = i;
            c->job.stmt = DM_SQL_REPLICATION;
            c->job.done = list_local_done;
            c->job.arg = c;
            c->job.owner = call;
            dm_region_submit(r, &c->job);
            continue;
        }
        list_remote_t *lr = dm_malloc(sizeof(*lr));
        lr->c = c;
        lr->i = i;
        Domicile__Peer__V1__RegionInfoRequest req = DOMICILE__PEER__V1__REGION_INFO_REQUEST__INIT;
        dm_peer_unary(app->peers, r, call, REGION_INFO_PATH, &req.base,
                      &domicile__peer__v1__region_info_response__descriptor, true, list_remote_done,
                      lr);
    }
    list_part_done(c);
}

typedef struct info_ctx {
    dm_call_t *call;
    dm_region_t *region;
    dm_job_t job;
} info_ctx_t;

static void info_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    info_ctx_t *c = job->arg;
    status_view_t v;
    fill(&v, c->region, err ? NULL : res);
    dm_status_free(err);
    Domicile__Peer__V1__RegionInfoResponse rep = DOMICILE__PEER__V1__REGION_INFO_RESPONSE__INIT;
    rep.status = &v.st;
    dm_call_reply(c->call, &rep.base);
}

void dm_peer_region_info(dm_call_t *call)
{
    dm_app_t *app = APP(call);
    const dm_principal_t *p = dm_call_principal_of(call);
    unsigned roles = 0;
    size_t n = 0;
    const dm_method_t *m = dm_api_methods(&n);
    for (size_t i = 0; i < n; i++)
        if (m[i].handler == dm_regions_list)
            roles = m[i].roles;
    if (!p || !(p->roles & roles)) {
        dm_call_finish(call, dm_status_new(GRPC_STATUS_PERMISSION_DENIED,
                                           "the asserted principal may not list regions"));
        return;
    }
    info_ctx_t *c = dm_calloc(1, sizeof(*c));
    c->call = call;
    dm_call_set_data(call, c, free);
    for (size_t i = 0; i < dm_regions_count(app->regions); i++)
        if (dm_region_is_local(dm_regions_at(app->regions, i)))
            c->region = dm_regions_at(app->regions, i);
    dm_call_set_region(call, dm_region_code(c->region));
    c->job.stmt = DM_SQL_REPLICATION;
    c->job.done = info_done;
    c->job.arg = c;
    c->job.owner = call;
    dm_region_submit(c->region, &c->job);
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
