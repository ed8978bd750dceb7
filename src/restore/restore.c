/*
 * A restored region: found, held, reconciled from the other regions' copies, released.
 * See src/restore/README.md and regions/schema/009_restores.sql.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <openssl/crypto.h>

#include "domicile/clock.h"
#include "domicile/ledger.h"
#include "domicile/log.h"
#include "domicile/mem.h"
#include "domicile/restore.h"
#include "domicile/sql.h"

#define MARK_EVERY_MS  1000
#define OPEN_EVERY_MS  1000
#define RETRY_MS       2000
#define HEADER_PAGE    1000
#define REPORT_IDS_MAX 200

enum { PJ_MARK, PJ_HEADERS, PJ_CLOSURES, PJ_WITNESS, PJ__COUNT };

typedef enum {
    RS_NORMAL,    /* serving; marks exchanged */
    RS_RESTORING, /* the restore tool is still at work: held, nothing to do yet */
    RS_GATHER,    /* held: reading the other regions' copies */
    RS_APPLY,     /* held: every copy read; re-apply on the next tick */
} rs_phase_t;

typedef struct peer_job {
    dm_job_t job;
    dm_restore_t *rst;
    size_t k;
    int kind;
    char p[3][48];
} peer_job_t;

/* What one other region answered (owned; rst->mu guards it while jobs are in flight). */
typedef struct peer_state {
    peer_job_t jobs[PJ__COUNT];
    bool answered[PJ__COUNT];
    char error[160];
    /* marks */
    int64_t mark_sent, mark_seen, mark_seen_ms;
    /* headers: pages read so far, and where the next one starts */
    PGresult **pages;
    size_t n_pages;
    bool headers_done;
    int64_t after_ms;
    char after_id[160];
    PGresult *closures;
    bool has_witness;
    int64_t witness_seq;
    unsigned char witness_hash[32];
} peer_state_t;

struct dm_restore {
    dm_regions_t *rs;
    dm_region_t *own;
    const unsigned char *key;
    char me[128];
    pthread_mutex_t mu;
    atomic_int inflight;
    rs_phase_t phase;
    bool round_open; /* a gather round's jobs were sent */
    int64_t next_mark_ms, next_open_ms, retry_at_ms;
    bool mark_round; /* a mark exchange is in flight or answered, not yet judged */
    peer_state_t peers[DM_MAX_REGIONS];
    /* the open restore */
    int64_t restore_id, point_ms, recorded_ms;
    char source[64], target[160], label[64], state[16];
    char reason[DM_FENCE_REASON_MAX];
};

static void fmt_time(int64_t ms, char *out, size_t len)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(out, len, "%Y-%m-%d %H:%M:%S+00", &tm);
}

dm_restore_t *dm_restore_create(dm_regions_t *regions, dm_region_t *own,
                                const unsigned char *ledger_key, const char *me)
{
    dm_restore_t *rst = dm_calloc(1, sizeof(*rst));
    rst->rs = regions;
    rst->own = own;
    rst->key = ledger_key;
    snprintf(rst->me, sizeof(rst->me), "%s", me);
    pthread_mutex_init(&rst->mu, NULL);
    return rst;
}

static void free_gathered(dm_restore_t *rst)
{
    for (size_t k = 0; k < DM_MAX_REGIONS; k++) {
        peer_state_t *ps = &rst->peers[k];
        for (size_t i = 0; i < ps->n_pages; i++)
            PQclear(ps->pages[i]);
        free(ps->pages);
        ps->pages = NULL;
        ps->n_pages = 0;
        PQclear(ps->closures);
        ps->closures = NULL;
        ps->headers_done = false;
        ps->after_ms = 0;
        ps->after_id[0] = '\0';
        ps->has_witness = false;
        ps->error[0] = '\0';
        memset(ps->answered, 0, sizeof(ps->answered));
    }
    rst->round_open = false;
}

void dm_restore_destroy(dm_restore_t *rst)
{
    if (!rst)
        return;
    /* A job still out with a peer would complete into freed memory: keep it, as at exit. */
    if (atomic_load(&rst->inflight) > 0)
        return;
    free_gathered(rst);
    pthread_mutex_destroy(&rst->mu);
    free(rst);
}

/* ---- jobs to the other regions ------------------------------------------------------- */

static void peer_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    peer_job_t *pj = job->arg;
    dm_restore_t *rst = pj->rst;
    peer_state_t *ps = &rst->peers[pj->k];
    pthread_mutex_lock(&rst->mu);
    if (err) {
        snprintf(ps->error, sizeof(ps->error), "%s", err->message);
    } else {
        ps->answered[pj->kind] = true;
        int n = PQntuples(res);
        switch (pj->kind) {
        case PJ_MARK:
            if (n == 1) {
                ps->mark_seen = dm_pg_int8(res, 0, 0);
                ps->mark_seen_ms = dm_pg_int8(res, 0, 1);
            }
            break;
        case PJ_HEADERS:
            if (n > 0) {
                ps->pages = dm_realloc(ps->pages, (ps->n_pages + 1) * sizeof(*ps->pages));
                ps->pages[ps->n_pages++] = PQcopyResult(res, PG_COPYRES_ATTRS | PG_COPYRES_TUPLES);
                int len;
                ps->after_ms = dm_pg_int8(res, n - 1, 8);
                snprintf(ps->after_id, sizeof(ps->after_id), "%s",
                         dm_pg_bytes(res, n - 1, 0, &len));
            }
            ps->headers_done = n < HEADER_PAGE;
            break;
        case PJ_CLOSURES:
            PQclear(ps->closures);
            ps->closures = PQcopyResult(res, PG_COPYRES_ATTRS | PG_COPYRES_TUPLES);
            break;
        case PJ_WITNESS:
            if (n == 1) {
                int len;
                const char *h = dm_pg_bytes(res, 0, 1, &len);
                if (len == 32) {
                    ps->has_witness = true;
                    ps->witness_seq = dm_pg_int8(res, 0, 0);
                    memcpy(ps->witness_hash, h, 32);
                }
            }
            break;
        }
    }
    pthread_mutex_unlock(&rst->mu);
    dm_status_free(err);
    if (atomic_fetch_sub(&rst->inflight, 1) == 1)
        dm_regions_poke(rst->rs);
}

static void send_job(dm_restore_t *rst, size_t k, int kind)
{
    peer_state_t *ps = &rst->peers[k];
    peer_job_t *pj = &ps->jobs[kind];
    memset(pj, 0, sizeof(*pj));
    pj->rst = rst;
    pj->k = k;
    pj->kind = kind;
    pj->job.done = peer_done;
    pj->job.arg = pj;
    const char *own = dm_region_code(rst->own);
    switch (kind) {
    case PJ_MARK:
        pj->job.stmt = DM_SQL_MARK_WITNESS_PUT;
        snprintf(pj->p[0], sizeof(pj->p[0]), "%lld", (long long)ps->mark_sent);
        snprintf(pj->p[1], sizeof(pj->p[1]), "%lld", (long long)dm_now_ms());
        dm_job_param_text(&pj->job, 0, own);
        dm_job_param_text(&pj->job, 1, pj->p[0]);
        dm_job_param_text(&pj->job, 2, pj->p[1]);
        break;
    case PJ_HEADERS:
        pj->job.stmt = DM_SQL_DSR_HEADERS;
        snprintf(pj->p[0], sizeof(pj->p[0]), "%lld", (long long)ps->after_ms);
        snprintf(pj->p[2], sizeof(pj->p[2]), "%d", HEADER_PAGE);
        dm_job_param_text(&pj->job, 0, pj->p[0]);
        dm_job_param_text(&pj->job, 1, ps->after_id);
        dm_job_param_text(&pj->job, 2, pj->p[2]);
        break;
    case PJ_CLOSURES:
        pj->job.stmt = DM_SQL_CLOSURE_COPIES;
        dm_job_param_text(&pj->job, 0, own);
        break;
    case PJ_WITNESS:
        pj->job.stmt = DM_SQL_WITNESS_GET;
        dm_job_param_text(&pj->job, 0, own);
        break;
    }
    atomic_fetch_add(&rst->inflight, 1);
    dm_region_submit(dm_regions_at(rst->rs, k), &pj->job);
}

static bool is_peer(dm_restore_t *rst, size_t k)
{
    return dm_regions_at(rst->rs, k) != rst->own;
}

/* ---- finding a restore --------------------------------------------------------------- */

static PGresult *run(dm_exec_t *x, dm_sql_id_t stmt, int n, const char *const *v, const int *lens,
                     const int *fmts, const char *what)
{
    dm_status_t *err = NULL;
    PGresult *res = dm_region_exec(x, stmt, n, v, lens, fmts, &err);
    if (!res) {
        dm_warn("restore", "%s: %s", what, err->detail ? err->detail : err->message);
        dm_status_free(err);
    }
    return res;
}

/* Read the open restore, if any; sets phase and the hold. False when it could not be read. */
static bool read_open(dm_restore_t *rst, dm_exec_t *x)
{
    PGresult *res = run(x, DM_SQL_RESTORE_OPEN, 0, NULL, NULL, NULL, "reading domicile.restores");
    if (!res)
        return false;
    if (PQntuples(res) == 0) {
        PQclear(res);
        if (rst->phase != RS_NORMAL) {
            /* Reconciled (by this gateway or another of the region). */
            free_gathered(rst);
            rst->phase = RS_NORMAL;
        }
        dm_region_hold(rst->own, NULL);
        return true;
    }
    int len;
    int64_t id = dm_pg_int8(res, 0, 0);
    if (id != rst->restore_id) {
        free_gathered(rst);
        rst->phase = RS_NORMAL;
    }
    rst->restore_id = id;
    snprintf(rst->state, sizeof(rst->state), "%s", dm_pg_bytes(res, 0, 1, &len));
    snprintf(rst->source, sizeof(rst->source), "%s", dm_pg_bytes(res, 0, 2, &len));
    snprintf(rst->target, sizeof(rst->target), "%s", dm_pg_bytes(res, 0, 3, &len));
    snprintf(rst->label, sizeof(rst->label), "%s", dm_pg_bytes(res, 0, 4, &len));
    rst->point_ms = dm_pg_int8(res, 0, 5);
    rst->recorded_ms = dm_pg_int8(res, 0, 6);
    PQclear(res);
    char when[40];
    fmt_time(rst->point_ms, when, sizeof(when));
    if (strcmp(rst->state, "restoring") == 0) {
        rst->phase = RS_RESTORING;
        snprintf(rst->reason, sizeof(rst->reason),
                 "restored from a backup (to %s): the restore is still running", when);
    } else {
        if (rst->phase == RS_NORMAL || rst->phase == RS_RESTORING) {
            rst->phase = RS_GATHER;
            dm_warn("restore",
                    "region %s was restored from a backup (%s, restore point %s, found by %s): "
                    "holding it until it is reconciled",
                    dm_region_code(rst->own), rst->target[0] ? rst->target : "unknown target", when,
                    rst->source);
        }
        if (rst->phase == RS_GATHER && !strstr(rst->reason, "waiting for region"))
            snprintf(rst->reason, sizeof(rst->reason),
                     "restored from a backup (to %s): reconciling with the other regions before "
                     "it serves again",
                     when);
    }
    dm_region_hold(rst->own, rst->reason);
    return true;
}

/* A mark exchange came back: did another region witness a higher mark than this database
 * holds now? (Read after the answers: every witnessed mark was committed here before it was
 * sent, so only a restore makes it higher.) */
static void judge_marks(dm_restore_t *rst, dm_exec_t *x)
{
    int64_t seen = -1, seen_ms = 0;
    const char *who = "";
    pthread_mutex_lock(&rst->mu);
    for (size_t k = 0; k < dm_regions_count(rst->rs); k++) {
        peer_state_t *ps = &rst->peers[k];
        if (is_peer(rst, k) && ps->answered[PJ_MARK] && ps->mark_seen > ps->mark_sent &&
            ps->mark_seen > seen) {
            seen = ps->mark_seen;
            seen_ms = ps->mark_seen_ms;
            who = dm_region_code(dm_regions_at(rst->rs, k));
        }
        ps->answered[PJ_MARK] = false;
    }
    pthread_mutex_unlock(&rst->mu);
    if (seen < 0)
        return;
    PGresult *res = run(x, DM_SQL_MARK_READ, 0, NULL, NULL, NULL, "reading the mark");
    if (!res)
        return;
    int64_t mine = PQntuples(res) == 1 ? dm_pg_int8(res, 0, 0) : 0;
    int64_t mine_ms = PQntuples(res) == 1 ? dm_pg_int8(res, 0, 1) : 0;
    PQclear(res);
    if (seen <= mine)
        return;
    char a[40], b[40];
    fmt_time(mine_ms, a, sizeof(a));
    dm_time_iso(seen_ms, b, sizeof(b));
    dm_error("restore",
             "region %s went back in time: its high-water mark is %lld (%s) but region %s "
             "witnessed %lld (%s); recording a restore and holding the region",
             dm_region_code(rst->own), (long long)mine, a, who, (long long)seen, b);
    /* The restore point lies before the witnessed mark was written (its content is older):
     * that time is what is known of it, an upper bound. */
    char point[24], target[320];
    snprintf(point, sizeof(point), "%lld", (long long)seen_ms);
    snprintf(target, sizeof(target),
             "found by the marks: mark %lld here, %lld witnessed by region %s at %s; restored "
             "to a point before that",
             (long long)mine, (long long)seen, who, b);
    const char *v[3] = {"witness", point, target};
    PQclear(run(x, DM_SQL_RESTORE_RECORD, 3, v, NULL, NULL, "recording the restore"));
    rst->next_open_ms = 0;
}

static void exchange_marks(dm_restore_t *rst, dm_exec_t *x)
{
    if (atomic_load(&rst->inflight) > 0)
        return;
    if (rst->mark_round) {
        judge_marks(rst, x);
        rst->mark_round = false;
    }
    PGresult *res = run(x, DM_SQL_MARK_ADVANCE, 0, NULL, NULL, NULL, "raising the mark");
    if (!res || PQntuples(res) != 1) {
        PQclear(res);
        return;
    }
    int64_t mark = dm_pg_int8(res, 0, 0);
    PQclear(res);
    rst->mark_round = true;
    for (size_t k = 0; k < dm_regions_count(rst->rs); k++) {
        if (!is_peer(rst, k))
            continue;
        rst->peers[k].mark_sent = mark;
        send_job(rst, k, PJ_MARK);
    }
}

/* ---- gathering the other regions' copies --------------------------------------------- */

static void start_round(dm_restore_t *rst, dm_exec_t *x)
{
    free_gathered(rst);
    PGresult *res = run(x, DM_SQL_MARK_READ, 0, NULL, NULL, NULL, "reading the mark");
    int64_t mark = res && PQntuples(res) == 1 ? dm_pg_int8(res, 0, 0) : 0;
    PQclear(res);
    rst->round_open = true;
    rst->mark_round = false;
    for (size_t k = 0; k < dm_regions_count(rst->rs); k++) {
        if (!is_peer(rst, k))
            continue;
        rst->peers[k].mark_sent = mark;
        rst->peers[k].mark_seen = 0;
        rst->peers[k].mark_seen_ms = 0;
        for (int kind = 0; kind < PJ__COUNT; kind++)
            send_job(rst, k, kind);
    }
}

/* Every answer is in (inflight 0): next pages, a retry, or on to re-applying. */
static void round_answered(dm_restore_t *rst)
{
    const char *failed = NULL, *why = "";
    bool more = false;
    for (size_t k = 0; k < dm_regions_count(rst->rs); k++) {
        peer_state_t *ps = &rst->peers[k];
        if (!is_peer(rst, k))
            continue;
        if (ps->error[0] || !ps->answered[PJ_HEADERS] || !ps->answered[PJ_CLOSURES] ||
            !ps->answered[PJ_WITNESS] || !ps->answered[PJ_MARK]) {
            failed = dm_region_code(dm_regions_at(rst->rs, k));
            why = ps->error[0] ? ps->error : "no answer";
            break;
        }
        if (!ps->headers_done)
            more = true;
    }
    if (failed) {
        char when[40];
        fmt_time(rst->point_ms, when, sizeof(when));
        snprintf(rst->reason, sizeof(rst->reason),
                 "restored from a backup (to %s): reconciliation is waiting for region %s, whose "
                 "copies of data-subject requests and closures it needs (%.120s)",
                 when, failed, why);
        dm_region_hold(rst->own, rst->reason);
        dm_warn("restore", "region %s: %s", dm_region_code(rst->own), rst->reason);
        free_gathered(rst);
        rst->retry_at_ms = dm_mono_ms() + RETRY_MS;
        return;
    }
    if (more) {
        for (size_t k = 0; k < dm_regions_count(rst->rs); k++)
            if (is_peer(rst, k) && !rst->peers[k].headers_done) {
                rst->peers[k].answered[PJ_HEADERS] = false;
                send_job(rst, k, PJ_HEADERS);
            }
        return;
    }
    rst->phase = RS_APPLY;
}

/* ---- re-applying --------------------------------------------------------------------- */

typedef struct hdr {
    const PGresult *res;
    int row;
    int64_t received_ms;
    const char *id;
} hdr_t;

static int hdr_cmp(const void *a, const void *b)
{
    const hdr_t *x = a, *y = b;
    if (x->received_ms != y->received_ms)
        return x->received_ms < y->received_ms ? -1 : 1;
    return strcmp(x->id, y->id);
}

static void int_text(char *buf, size_t len, int64_t v)
{
    snprintf(buf, len, "%lld", (long long)v);
}

/* Re-apply every request header the other regions hold, oldest first. */
static bool reapply_requests(dm_restore_t *rst, dm_exec_t *x, json_t *report)
{
    size_t n = 0;
    for (size_t k = 0; k < DM_MAX_REGIONS; k++)
        for (size_t p = 0; p < rst->peers[k].n_pages; p++)
            n += (size_t)PQntuples(rst->peers[k].pages[p]);
    hdr_t *h = dm_calloc(n ? n : 1, sizeof(*h));
    size_t m = 0;
    int len;
    for (size_t k = 0; k < DM_MAX_REGIONS; k++)
        for (size_t p = 0; p < rst->peers[k].n_pages; p++) {
            const PGresult *res = rst->peers[k].pages[p];
            for (int i = 0; i < PQntuples(res); i++) {
                h[m].res = res;
                h[m].row = i;
                h[m].received_ms = dm_pg_int8(res, i, 8);
                h[m].id = dm_pg_bytes(res, i, 0, &len);
                m++;
            }
        }
    qsort(h, m, sizeof(*h), hdr_cmp);
    json_int_t examined = 0, present = 0, reapplied = 0, restored = 0, failed = 0;
    json_t *ids = json_array(), *by_kind = json_object();
    for (size_t i = 0; i < m; i++) {
        if (i > 0 && strcmp(h[i].id, h[i - 1].id) == 0)
            continue;
        examined++;
        const PGresult *res = h[i].res;
        int row = h[i].row;
        char rec[24], due[24], gdpr[24];
        int_text(rec, sizeof(rec), dm_pg_int8(res, row, 8));
        int_text(due, sizeof(due), dm_pg_int8(res, row, 9));
        int_text(gdpr, sizeof(gdpr), dm_pg_int8(res, row, 10));
        int fl = 0, sl = 0;
        const char *fp = dm_pg_bytes(res, row, 2, &fl);
        const char *sk = dm_pg_bytes(res, row, 3, &sl);
        const char *kind = dm_pg_bytes(res, row, 1, &len);
        const char *v[13] = {h[i].id,
                             kind,
                             fp,
                             sk,
                             dm_pg_bytes(res, row, 4, &len),
                             dm_pg_bytes(res, row, 5, &len),
                             dm_pg_bytes(res, row, 6, &len),
                             dm_pg_bytes(res, row, 7, &len),
                             rec,
                             due,
                             gdpr,
                             dm_pg_bytes(res, row, 11, &len),
                             rst->me};
        int lens[13] = {0, 0, fl, sl};
        int fmts[13] = {0, 0, 1, 1};
        PGresult *r = run(x, DM_SQL_RESTORE_REAPPLY, 13, v, lens, fmts, "re-applying a request");
        if (!r || PQntuples(r) != 1) {
            PQclear(r);
            failed++;
            continue;
        }
        const char *status = dm_pg_bytes(r, 0, 0, &len);
        if (strcmp(status, "present") == 0) {
            present++;
        } else if (strcmp(status, "reapplied") == 0) {
            reapplied++;
            bool stored = dm_pg_bool(r, 0, 2);
            restored += stored;
            json_t *c = json_object_get(by_kind, kind);
            json_object_set_new(by_kind, kind, json_integer(c ? json_integer_value(c) + 1 : 1));
            if (json_array_size(ids) < REPORT_IDS_MAX)
                json_array_append_new(
                    ids, json_pack("{s:s, s:s, s:s, s:b}", "request_id", h[i].id, "kind", kind,
                                   "leg", dm_pg_bytes(r, 0, 1, &len), "header_lost", stored));
        } else {
            dm_warn("restore", "request %s: %s (not re-applied)", h[i].id, status);
        }
        PQclear(r);
    }
    free(h);
    json_object_set_new(report, "requests",
                        json_pack("{s:I, s:I, s:I, s:I, s:I, s:o, s:o}", "examined", examined,
                                  "finished_before_restore_point", present, "reapplied", reapplied,
                                  "headers_lost", restored, "failed", failed, "by_kind", by_kind,
                                  "reapplied_requests", ids));
    return failed == 0;
}

static bool holds_closure(const PGresult *res, const char *customer)
{
    int len;
    for (int i = 0; res && i < PQntuples(res); i++)
        if (strcmp(dm_pg_bytes(res, i, 0, &len), customer) == 0)
            return true;
    return false;
}

static bool reapply_closures(dm_restore_t *rst, dm_exec_t *x, json_t *report)
{
    json_int_t reapplied = 0, failed = 0, gone = 0;
    json_t *ids = json_array();
    int len;
    for (size_t k = 0; k < DM_MAX_REGIONS; k++) {
        const PGresult *res = rst->peers[k].closures;
        for (int i = 0; res && i < PQntuples(res); i++) {
            char closed[24], purge[24];
            int_text(closed, sizeof(closed), dm_pg_int8(res, i, 3));
            int_text(purge, sizeof(purge), dm_pg_int8(res, i, 4));
            const char *customer = dm_pg_bytes(res, i, 0, &len);
            /* Every other region holds a copy: each closure once. */
            bool seen = false;
            for (size_t j = 0; j < k && !seen; j++)
                seen = holds_closure(rst->peers[j].closures, customer);
            if (seen)
                continue;
            const char *v[5] = {customer, dm_pg_bytes(res, i, 1, &len),
                                dm_pg_bytes(res, i, 2, &len), closed, purge};
            PGresult *r = run(x, DM_SQL_CLOSURE_REAPPLY, 5, v, NULL, NULL, "re-applying a closure");
            if (!r || PQntuples(r) != 1) {
                PQclear(r);
                failed++;
                continue;
            }
            const char *st = dm_pg_bytes(r, 0, 0, &len);
            if (strcmp(st, "reapplied") == 0) {
                reapplied++;
                if (json_array_size(ids) < REPORT_IDS_MAX)
                    json_array_append_new(ids, json_string(customer));
            } else if (strcmp(st, "no_customer") == 0) {
                gone++;
            }
            PQclear(r);
        }
    }
    const char *lim = "1000";
    PGresult *r = run(x, DM_SQL_PURGE_DUE, 1, &lim, NULL, NULL, "purging closed customers");
    bool purge_ok = r != NULL;
    json_int_t purged = r && PQntuples(r) == 1 ? dm_pg_int4(r, 0, 0) : 0;
    PQclear(r);
    json_object_set_new(report, "closures",
                        json_pack("{s:I, s:I, s:I, s:o, s:I}", "reapplied", reapplied,
                                  "registration_lost", gone, "failed", failed, "customers", ids,
                                  "purged_now", purged));
    return failed == 0 && purge_ok;
}

/* The ledger: the restored chain's head, the highest head the other regions witnessed, and
 * the signed cut between them. */
static bool record_cut(dm_restore_t *rst, dm_exec_t *x, json_t *report)
{
    PGresult *res = run(x, DM_SQL_LEDGER_HEAD, 0, NULL, NULL, NULL, "reading the ledger head");
    if (!res)
        return false;
    int64_t rseq = 0;
    unsigned char rhash[32] = {0};
    int len;
    if (PQntuples(res) == 1) {
        rseq = dm_pg_int8(res, 0, 0);
        const char *h = dm_pg_bytes(res, 0, 1, &len);
        if (len == 32)
            memcpy(rhash, h, 32);
    }
    PQclear(res);
    int64_t wseq = rseq;
    unsigned char whash[32];
    memcpy(whash, rhash, 32);
    const char *who = "";
    for (size_t k = 0; k < dm_regions_count(rst->rs); k++) {
        peer_state_t *ps = &rst->peers[k];
        if (is_peer(rst, k) && ps->has_witness && ps->witness_seq > wseq) {
            wseq = ps->witness_seq;
            memcpy(whash, ps->witness_hash, 32);
            who = dm_region_code(dm_regions_at(rst->rs, k));
        }
    }
    unsigned char mac[32];
    dm_ledger_restore_mac(rst->key, rseq, rhash, wseq, whash, who, rst->point_ms, mac);
    char id_s[24], rseq_s[24], wseq_s[24], point_s[24];
    int_text(id_s, sizeof(id_s), rst->restore_id);
    int_text(rseq_s, sizeof(rseq_s), rseq);
    int_text(wseq_s, sizeof(wseq_s), wseq);
    int_text(point_s, sizeof(point_s), rst->point_ms);
    const char *v[8] = {id_s, rseq_s,  (const char *)rhash, wseq_s, (const char *)whash,
                        who,  point_s, (const char *)mac};
    int lens[8] = {0, 0, 32, 0, 32, 0, 0, 32};
    int fmts[8] = {0, 0, 1, 0, 1, 0, 0, 1};
    res = run(x, DM_SQL_LEDGER_CUT_PUT, 8, v, lens, fmts, "recording the ledger's restore cut");
    if (!res)
        return false;
    PQclear(res);
    json_object_set_new(report, "ledger",
                        json_pack("{s:I, s:I, s:I, s:s}", "restored_head", (json_int_t)rseq,
                                  "witnessed_head", (json_int_t)wseq, "links_lost",
                                  (json_int_t)(wseq - rseq), "witnessed_by", who));
    return true;
}

static bool raise_mark(dm_restore_t *rst, dm_exec_t *x, json_t *report)
{
    int64_t seen = 0, seen_ms = 0;
    const char *who = "";
    for (size_t k = 0; k < dm_regions_count(rst->rs); k++) {
        peer_state_t *ps = &rst->peers[k];
        if (is_peer(rst, k) && ps->mark_seen > seen) {
            seen = ps->mark_seen;
            seen_ms = ps->mark_seen_ms;
            who = dm_region_code(dm_regions_at(rst->rs, k));
        }
    }
    PGresult *res = run(x, DM_SQL_MARK_READ, 0, NULL, NULL, NULL, "reading the mark");
    if (!res)
        return false;
    int64_t mine = PQntuples(res) == 1 ? dm_pg_int8(res, 0, 0) : 0;
    int64_t mine_ms = PQntuples(res) == 1 ? dm_pg_int8(res, 0, 1) : 0;
    PQclear(res);
    char above[24];
    int_text(above, sizeof(above), seen);
    const char *v = above;
    res = run(x, DM_SQL_MARK_RAISE, 1, &v, NULL, NULL, "raising the mark");
    if (!res)
        return false;
    PQclear(res);
    char a[40], b[40], p[40];
    dm_time_iso(mine_ms, a, sizeof(a));
    dm_time_iso(seen_ms, b, sizeof(b));
    dm_time_iso(rst->point_ms, p, sizeof(p));
    json_object_set_new(report, "marks",
                        json_pack("{s:I, s:s, s:I, s:s, s:s}", "restored_mark", (json_int_t)mine,
                                  "restored_mark_at", a, "witnessed_mark", (json_int_t)seen,
                                  "witnessed_mark_at", seen > 0 ? b : "", "witnessed_by", who));
    /* What was lost lies between the restore point and the last time another region saw the
     * region alive: its writes there exist nowhere else (placement), so the window is what
     * the other regions can witness, not the writes themselves. */
    json_object_set_new(report, "lost_window",
                        json_pack("{s:s, s:s}", "from", p, "to", seen > mine ? b : p));
    return true;
}

static void apply_locked(dm_restore_t *rst, dm_exec_t *x);

/*
 * Every gateway of the region gathers on its own, but one at a time applies: two that
 * re-applied the same requests side by side would each report half of them (the second finds
 * the first's work "present"). The one that waited finds the restore closed (read_open) or,
 * if the first failed, applies with what it gathered.
 */
static void apply(dm_restore_t *rst, dm_exec_t *x)
{
    PGresult *res = run(x, DM_SQL_RESTORE_LOCK, 0, NULL, NULL, NULL, "locking the reconciliation");
    bool locked = res && PQntuples(res) == 1 && dm_pg_bool(res, 0, 0);
    PQclear(res);
    if (locked && read_open(rst, x) && rst->phase == RS_APPLY)
        apply_locked(rst, x);
    else if (rst->phase == RS_APPLY) {
        free_gathered(rst);
        rst->phase = RS_GATHER;
        rst->retry_at_ms = dm_mono_ms() + RETRY_MS;
    }
    if (locked) {
        res = run(x, DM_SQL_RESTORE_UNLOCK, 0, NULL, NULL, NULL, "unlocking the reconciliation");
        PQclear(res);
    }
}

static void apply_locked(dm_restore_t *rst, dm_exec_t *x)
{
    int64_t t0 = dm_mono_ms();
    char point[40], rec[40];
    dm_time_iso(rst->point_ms, point, sizeof(point));
    dm_time_iso(rst->recorded_ms, rec, sizeof(rec));
    json_t *report =
        json_pack("{s:s, s:I, s:s, s:s, s:s, s:s, s:s, s:s}", "region", dm_region_code(rst->own),
                  "restore_id", (json_int_t)rst->restore_id, "source", rst->source, "target",
                  rst->target, "backup_label", rst->label, "restore_point", point, "recorded_at",
                  rec, "reconciled_by", rst->me);
    bool ok = reapply_requests(rst, x, report) && reapply_closures(rst, x, report) &&
              record_cut(rst, x, report) && raise_mark(rst, x, report);
    if (!ok) {
        json_decref(report);
        free_gathered(rst);
        rst->phase = RS_GATHER;
        rst->retry_at_ms = dm_mono_ms() + RETRY_MS;
        dm_warn("restore", "region %s: reconciliation did not finish; trying again",
                dm_region_code(rst->own));
        return;
    }
    json_object_set_new(report, "reconcile_ms", json_integer((json_int_t)(dm_mono_ms() - t0)));
    char *text = json_dumps(report, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(report);
    char id_s[24];
    int_text(id_s, sizeof(id_s), rst->restore_id);
    const char *v[3] = {id_s, rst->me, text};
    PGresult *res = run(x, DM_SQL_RESTORE_FINISH, 3, v, NULL, NULL, "closing the restore");
    if (res && strcmp(PQcmdTuples(res), "1") != 0) {
        /* Closed meanwhile by another gateway (it did not hold the lock: an older version). */
        PQclear(res);
        res = NULL;
    }
    if (res) {
        dm_warn("restore", "region %s reconciled after its restore; serving again. Report: %s",
                dm_region_code(rst->own), text);
        PQclear(res);
        free_gathered(rst);
        rst->phase = RS_NORMAL;
        rst->next_mark_ms = 0;
        dm_region_hold(rst->own, NULL);
    } else {
        free_gathered(rst);
        rst->phase = RS_GATHER;
        rst->retry_at_ms = dm_mono_ms() + RETRY_MS;
    }
    free(text);
}

bool dm_restore_idle(dm_restore_t *rst, dm_region_t *r, dm_exec_t *x)
{
    if (!rst || r != rst->own)
        return false;
    int64_t now = dm_mono_ms();
    if (now >= rst->next_open_ms) {
        rst->next_open_ms = now + OPEN_EVERY_MS;
        if (!read_open(rst, x))
            return dm_region_held(r, NULL, 0);
    }
    switch (rst->phase) {
    case RS_NORMAL:
        if (now >= rst->next_mark_ms) {
            rst->next_mark_ms = now + MARK_EVERY_MS;
            exchange_marks(rst, x);
        }
        break;
    case RS_RESTORING:
        break;
    case RS_GATHER:
        if (atomic_load(&rst->inflight) > 0 || now < rst->retry_at_ms)
            break;
        if (!rst->round_open)
            start_round(rst, x);
        else
            round_answered(rst);
        if (rst->phase != RS_APPLY)
            break;
        /* fall through */
    case RS_APPLY:
        apply(rst, x);
        break;
    }
    return dm_region_held(r, NULL, 0);
}
