/*
 * The data-subject request worker, in every gateway: for each region, on that region's
 * maintenance executor, claim due legs (SKIP LOCKED + a lease: several gateways never run one
 * leg at once, and a dead gateway's leg is taken over when its lease expires), run each in
 * one transaction, retry failures with exponential backoff; and copy requests to regions
 * that were down when they arrived, so their legs run when they return. The gateway that
 * stores a request runs its legs at once (dm_dsr_run_now) on the regions' free executors,
 * under the same claim and lease; the workers are the fallback for everything else.
 */
#include <pthread.h>
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
#include "domicile/validate.h"

#define RUN_EVERY_MS       500
#define CLAIM_LIMIT        "5"
#define LEASE_S            DM_DSR_LEASE_S
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

/* A leg's outcome (a dsr_run_leg row: state, matched, deleted, keys destroyed) to the log;
 * a leg lost to another claimant says nothing. */
static void log_leg_result(dm_region_t *r, const char *kind, const char *id, const PGresult *res)
{
    int len;
    const char *state = PQntuples(res) == 1 ? dm_pg_bytes(res, 0, 0, &len) : "?";
    if (strcmp(state, "lost") != 0)
        dm_info("dsr",
                "region %s: %s leg of request %s %s (matched %lld, deleted %lld, keys "
                "destroyed %lld)",
                dm_region_code(r), kind, id, state, (long long)dm_pg_int8(res, 0, 1),
                (long long)dm_pg_int8(res, 0, 2), (long long)dm_pg_int8(res, 0, 3));
}

static void run_claimed(dm_region_t *r, dm_exec_t *x, const char *me, const char *id,
                        const char *kind, int attempts)
{
    dm_status_t *err = NULL;
    const char *vals[2] = {id, me};
    PGresult *res = dm_region_exec(x, DM_SQL_DSR_RUN, 2, vals, NULL, NULL, &err);
    if (res) {
        log_leg_result(r, kind, id, res);
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

/* ---- legs run at once by the gateway that stored the request ---------------------------- */

typedef struct now_leg {
    dm_job_t job;
    struct dm_dsr_now *set;
    dm_region_t *region;
    int attempts;
    char backoff[24];
    char error[256];
} now_leg_t;

/* One request's legs run at once, until the last is done. */
struct dm_dsr_now {
    dm_dsr_ctx_t *ctx;
    atomic_int left;   /* legs not finished yet; the last one frees the set */
    atomic_bool retry; /* a leg could not be claimed here: the workers must look */
    char request_id[DM_REQUEST_ID_MAX + 1];
    char kind[16];
    now_leg_t legs[DM_MAX_REGIONS];
};

/* This region is through with its leg (done, failed and recorded, or left to others). */
static void leg_finished(now_leg_t *l)
{
    dm_dsr_now_t *s = l->set;
    dm_dsr_ctx_t *ctx = s->ctx;
    if (atomic_fetch_sub(&s->left, 1) != 1)
        return;
    /* The workers look at once when a leg could not even be claimed here, or when a webhook
     * may now be due (only after the last leg, so the notifier does not look too early). */
    if (atomic_load(&s->retry) || ctx->webhooks)
        dm_regions_poke(ctx->regions);
    free(s);
}

static void now_submit(now_leg_t *l, dm_sql_id_t stmt, dm_job_fn done)
{
    memset(&l->job, 0, sizeof(l->job));
    l->job.stmt = stmt;
    l->job.done = done;
    l->job.arg = l;
    dm_job_param_text(&l->job, 0, l->set->request_id);
    dm_job_param_text(&l->job, 1, l->set->ctx->me);
    if (stmt == DM_SQL_DSR_CLAIM_ONE) {
        dm_job_param_text(&l->job, 2, LEASE_S);
    } else if (stmt == DM_SQL_DSR_FAIL) {
        dm_job_param_text(&l->job, 2, l->error);
        dm_job_param_text(&l->job, 3, l->backoff);
    }
    /* No call: the leg runs to its end even when the caller has gone. */
    dm_region_submit(l->region, &l->job);
}

static void now_recorded(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    (void)res;
    dm_status_free(err); /* not recorded: the lease expires and a worker takes the leg over */
    leg_finished(job->arg);
}

static void now_ran(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    now_leg_t *l = job->arg;
    dm_dsr_now_t *s = l->set;
    if (res) {
        log_leg_result(l->region, s->kind, s->request_id, res);
        leg_finished(l);
        return;
    }
    /* Failed: recorded with the workers' backoff, then retried by them. */
    int64_t backoff = 1000LL << (l->attempts < 18 ? l->attempts : 18);
    if (backoff > BACKOFF_MAX_MS)
        backoff = BACKOFF_MAX_MS;
    snprintf(l->backoff, sizeof(l->backoff), "%lld", (long long)backoff);
    snprintf(l->error, sizeof(l->error), "%s", err->message);
    dm_warn("dsr", "region %s: %s leg of request %s failed (attempt %d, retry in %lld ms): %s",
            dm_region_code(l->region), s->kind, s->request_id, l->attempts, (long long)backoff,
            err->detail ? err->detail : err->message);
    dm_status_free(err);
    now_submit(l, DM_SQL_DSR_FAIL, now_recorded);
}

static void now_claimed(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    now_leg_t *l = job->arg;
    if (err) {
        dm_debug("dsr", "region %s: leg of request %s not claimed at once: %s",
                 dm_region_code(l->region), l->set->request_id,
                 err->detail ? err->detail : err->message);
        atomic_store(&l->set->retry, true);
        dm_status_free(err);
        leg_finished(l);
        return;
    }
    if (PQntuples(res) != 1) {
        leg_finished(l); /* held by a worker (here or elsewhere), or not pending any more */
        return;
    }
    /* Claimed and committed (the leg shows RUNNING, under a lease): now run it. */
    l->attempts = dm_pg_int4(res, 0, 2);
    now_submit(l, DM_SQL_DSR_RUN, now_ran);
}

void dm_dsr_run_now(dm_dsr_ctx_t *ctx, const char *request_id, const char *kind,
                    dm_region_t *const *stored, const bool *claimed, size_t n)
{
    /* Only this gateway's own region: another region's leg is run by its own gateways. */
    dm_region_t *local[DM_MAX_REGIONS];
    bool local_claimed[DM_MAX_REGIONS];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (!dm_region_is_local(stored[i]))
            continue;
        local[k] = stored[i];
        local_claimed[k++] = claimed[i];
    }
    stored = local;
    claimed = local_claimed;
    n = k;
    if (n == 0)
        return;
    dm_dsr_now_t *s = dm_calloc(1, sizeof(*s));
    s->ctx = ctx;
    snprintf(s->request_id, sizeof(s->request_id), "%s", request_id);
    snprintf(s->kind, sizeof(s->kind), "%s", kind);
    /* Every leg counted before the first submit: a region that fails its job at once runs
     * the callback on this thread. */
    atomic_init(&s->left, (int)n);
    atomic_init(&s->retry, false);
    for (size_t i = 0; i < n; i++) {
        s->legs[i].set = s;
        s->legs[i].region = stored[i];
    }
    for (size_t i = 0; i < n; i++) {
        now_leg_t *l = &s->legs[i];
        if (claimed[i]) {
            l->attempts = 1;
            now_submit(l, DM_SQL_DSR_RUN, now_ran);
        } else {
            now_submit(l, DM_SQL_DSR_CLAIM_ONE, now_claimed);
        }
    }
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
    /* A poke: a leg this gateway meant to run at once could not be claimed, or a request's
     * legs are all done here (its webhook may be due). */
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
            dm_dsr_counts_t c;
            for (int i = 0; i < 5; i++)
                c.legs[i] = dm_pg_int8(res, 0, i);
            for (int b = 0; b < DM_DSR_DUE_BUCKETS; b++)
                c.due[b] = dm_pg_int8(res, 0, 5 + b);
            c.next_due_ms = dm_pg_int8(res, 0, 5 + DM_DSR_DUE_BUCKETS);
            dm_metrics_dsr(ri, &c);
        }
        PQclear(res);
        dm_status_free(err);
    }
}
