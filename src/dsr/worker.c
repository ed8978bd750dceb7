/*
 * The data-subject request worker, in every gateway: for each region, on that region's
 * maintenance executor, claim due legs (SKIP LOCKED + a lease: several gateways never run one
 * leg at once, and a dead gateway's leg is taken over when its lease expires), run each in
 * one transaction, retry failures with exponential backoff; and copy requests to regions
 * that were down when they arrived, so their legs run when they return.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "domicile/clock.h"
#include "domicile/crypto.h"
#include "domicile/dsr.h"
#include "domicile/log.h"
#include "domicile/metrics.h"
#include "domicile/sql.h"

#define RUN_EVERY_MS       500
#define CLAIM_LIMIT        "5"
#define LEASE_S            "30"
#define BACKOFF_MAX_MS     300000
#define PROPAGATE_MAX      50
#define COUNT_EVERY_MS     5000
#define DSR_RECEIVE_PARAMS 13

void dm_dsr_ctx_init(dm_dsr_ctx_t *ctx, dm_regions_t *regions)
{
    char host[64] = "host";
    unsigned char r[4];
    char hex[9];
    gethostname(host, sizeof(host) - 1);
    dm_random_bytes(r, sizeof(r));
    dm_hex_encode(r, sizeof(r), hex);
    ctx->regions = regions;
    snprintf(ctx->me, sizeof(ctx->me), "%.40s:%d:%s", host, (int)getpid(), hex);
}

static void run_claimed(dm_region_t *r, dm_exec_t *x, const char *me, const char *id,
                        const char *kind, int attempts)
{
    dm_status_t *err = NULL;
    const char *vals[2] = {id, me};
    PGresult *res = dm_region_exec(x, DM_SQL_DSR_RUN, 2, vals, NULL, NULL, &err);
    if (res) {
        int len;
        const char *state = PQntuples(res) == 1 ? dm_pg_bytes(res, 0, 0, &len) : "?";
        if (strcmp(state, "lost") != 0)
            dm_info("dsr",
                    "region %s: %s leg of request %s %s (matched %lld, deleted %lld, "
                    "keys destroyed %lld)",
                    dm_region_code(r), kind, id, state, (long long)dm_pg_int8(res, 0, 1),
                    (long long)dm_pg_int8(res, 0, 2), (long long)dm_pg_int8(res, 0, 3));
        PQclear(res);
        return;
    }
    /* Failed: back off 1 s, 2 s, 4 s ... up to 5 min, then the next claim retries it. */
    int64_t backoff = 1000LL << (attempts < 18 ? attempts : 18);
    if (backoff > BACKOFF_MAX_MS)
        backoff = BACKOFF_MAX_MS;
    char b[24];
    snprintf(b, sizeof(b), "%lld", (long long)backoff);
    const char *why = err->detail ? err->detail : err->message;
    dm_warn("dsr", "region %s: %s leg of request %s failed (attempt %d, retry in %lld ms): %s",
            dm_region_code(r), kind, id, attempts, (long long)backoff, why);
    const char *fv[4] = {id, me, err->message, b};
    dm_status_t *err2 = NULL;
    PGresult *f = dm_region_exec(x, DM_SQL_DSR_FAIL, 4, fv, NULL, NULL, &err2);
    PQclear(f);
    dm_status_free(err2);
    dm_status_free(err);
}

/* ---- propagation ----------------------------------------------------------------------- */

typedef struct prop {
    dm_job_t job;
    dm_dsr_ctx_t *ctx;
    size_t src_i;
    dm_region_t *src;
    char *vals[DSR_RECEIVE_PARAMS];
    int lens[DSR_RECEIVE_PARAMS];
    int fmts[DSR_RECEIVE_PARAMS];
    char code[DM_REGION_CODE_MAX + 1];
} prop_t;

static void prop_free(prop_t *p)
{
    atomic_fetch_sub(&p->ctx->propagating[p->src_i], 1);
    for (int i = 0; i < DSR_RECEIVE_PARAMS; i++)
        free(p->vals[i]);
    free(p);
}

static void dropped(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    prop_t *p = job->arg;
    dm_status_free(err);
    prop_free(p);
}

static void delivered(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    prop_t *p = job->arg;
    if (err) {
        dm_status_free(err); /* still down: next time */
        prop_free(p);
        return;
    }
    dm_info("dsr", "request %s delivered to region %s, which was down when it arrived", p->vals[0],
            p->code);
    memset(&p->job, 0, sizeof(p->job));
    p->job.stmt = DM_SQL_DSR_DROP_MISSING;
    p->job.done = dropped;
    p->job.arg = p;
    dm_job_param_text(&p->job, 0, p->vals[0]);
    dm_job_param_text(&p->job, 1, p->code);
    dm_region_submit(p->src, &p->job);
}

static void propagate(dm_dsr_ctx_t *ctx, dm_region_t *r, size_t ri, dm_exec_t *x)
{
    if (atomic_load(&ctx->propagating[ri]) > 0)
        return; /* the last round is still in flight */
    dm_status_t *err = NULL;
    PGresult *res = dm_region_exec(x, DM_SQL_DSR_MISSING, 0, NULL, NULL, NULL, &err);
    if (!res) {
        dm_status_free(err);
        return;
    }
    /* Columns: the dsr_receive parameters (received, due, gdpr_due as ms), then missing. */
    for (int row = 0; row < PQntuples(res) && row < PROPAGATE_MAX; row++) {
        int len;
        char *missing = dm_strdup(dm_pg_bytes(res, row, DSR_RECEIVE_PARAMS, &len));
        for (char *save = NULL, *code = strtok_r(missing, ",", &save); code;
             code = strtok_r(NULL, ",", &save)) {
            dm_region_t *dst = dm_regions_find(ctx->regions, code);
            if (!dst || dst == r)
                continue;
            prop_t *p = dm_calloc(1, sizeof(*p));
            p->ctx = ctx;
            p->src_i = ri;
            p->src = r;
            snprintf(p->code, sizeof(p->code), "%s", code);
            for (int c = 0; c < DSR_RECEIVE_PARAMS; c++) {
                char num[24];
                const char *v;
                int l;
                if (c >= 8 && c <= 10) {
                    snprintf(num, sizeof(num), "%lld", (long long)dm_pg_int8(res, row, c));
                    v = num;
                    l = (int)strlen(num);
                } else {
                    v = dm_pg_bytes(res, row, c, &l);
                }
                p->vals[c] = dm_malloc((size_t)l + 1);
                memcpy(p->vals[c], v, (size_t)l);
                p->vals[c][l] = '\0';
                p->lens[c] = l;
                p->fmts[c] = c == 2 || c == 3; /* fingerprint, subject key: bytea */
                if (p->fmts[c])
                    dm_job_param_bin(&p->job, c, p->vals[c], l);
                else
                    dm_job_param_text(&p->job, c, p->vals[c]);
            }
            p->job.stmt = DM_SQL_DSR_RECEIVE;
            p->job.done = delivered;
            p->job.arg = p;
            atomic_fetch_add(&ctx->propagating[ri], 1);
            dm_region_submit(dst, &p->job);
        }
        free(missing);
    }
    PQclear(res);
}

/* Requests this region notifies about whose webhook is due: to the webhook thread. */
static void webhooks_due(dm_dsr_ctx_t *ctx, dm_region_t *r, size_t ri, dm_exec_t *x)
{
    dm_status_t *err = NULL;
    const char *vals[2] = {dm_region_code(r), "20"};
    PGresult *res = dm_region_exec(x, DM_SQL_DSR_WEBHOOK_DUE, 2, vals, NULL, NULL, &err);
    if (!res) {
        dm_status_free(err);
        return;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        int len;
        dm_webhooks_enqueue(ctx->webhooks, dm_pg_bytes(res, i, 0, &len), ri);
    }
    PQclear(res);
}

void dm_dsr_idle(dm_dsr_ctx_t *ctx, dm_region_t *r, size_t ri, dm_exec_t *x)
{
    int64_t now = dm_mono_ms();
    /* A request stored by this gateway pokes the regions: its legs start at once. */
    if (!dm_region_take_poke(r) && now - ctx->last_run_ms[ri] < RUN_EVERY_MS)
        return;
    ctx->last_run_ms[ri] = now;

    dm_status_t *err = NULL;
    const char *vals[3] = {ctx->me, LEASE_S, CLAIM_LIMIT};
    PGresult *res = dm_region_exec(x, DM_SQL_DSR_CLAIM, 3, vals, NULL, NULL, &err);
    if (!res) {
        dm_status_free(err);
        return;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        int len;
        char *id = dm_strdup(dm_pg_bytes(res, i, 0, &len));
        char *kind = dm_strdup(dm_pg_bytes(res, i, 1, &len));
        run_claimed(r, x, ctx->me, id, kind, dm_pg_int4(res, i, 2));
        free(id);
        free(kind);
    }
    PQclear(res);
    propagate(ctx, r, ri, x);
    if (ctx->webhooks)
        webhooks_due(ctx, r, ri, x);
    if (now - ctx->last_count_ms[ri] >= COUNT_EVERY_MS) {
        ctx->last_count_ms[ri] = now;
        res = dm_region_exec(x, DM_SQL_DSR_COUNTS, 0, NULL, NULL, NULL, &err);
        if (res && PQntuples(res) == 1) {
            int64_t legs[5];
            for (int i = 0; i < 5; i++)
                legs[i] = dm_pg_int8(res, 0, i);
            dm_metrics_dsr(ri, legs, dm_pg_int8(res, 0, 5));
        }
        PQclear(res);
        dm_status_free(err);
    }
}
