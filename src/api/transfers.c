/*
 * domicile.v1.Transfers: VerifyLedger (walk a region's chain from its last checkpoint),
 * ListTransfers (entries of one or every region's ledger, filtered, paged), Report (a fan-out
 * over every region: grouped by month x route x basis x purpose, plus each ledger's state).
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "domicile/v1/transfers.pb-c.h"

#include "domicile/log.h"
#include "internal.h"

#define VERIFY_PAGE  1000
#define LOOSE_LIMIT  100000
#define LIST_DEFAULT 100
#define LIST_MAX     1000
#define LIST_CHUNK   200
#define TOKEN_PREFIX "t1."

/* ---- verification -------------------------------------------------------------------- */

typedef struct verify verify_t;
typedef void (*verify_done_fn)(verify_t *v, dm_status_t *err);

struct verify {
    dm_call_t *call;
    dm_region_t *region;
    const unsigned char *key;
    dm_job_t job;
    verify_done_fn done;
    void *arg;
    char after_s[24], limit_s[16];
    /* result */
    unsigned char prev[32];
    int64_t expected; /* next seq the chain must show */
    int64_t checked;
    int64_t unsealed;
    int damage; /* Domicile__V1__LedgerDamage */
    int64_t bad_seq;
    char detail[256];
    bool has_checkpoint;
    Domicile__V1__LedgerCheckpoint cp;
    char cp_hash_hex[65];
};

static void verify_page(verify_t *v);

static void set_damage(verify_t *v, int kind, int64_t seq, const char *fmt, ...) DM_PRINTF(4, 5);

static void set_damage(verify_t *v, int kind, int64_t seq, const char *fmt, ...)
{
    if (v->damage != DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_NONE)
        return; /* the first damage is the one reported */
    va_list ap;
    v->damage = kind;
    v->bad_seq = seq;
    va_start(ap, fmt);
    vsnprintf(v->detail, sizeof(v->detail), fmt, ap);
    va_end(ap);
}

static void verify_loose_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    verify_t *v = job->arg;
    if (err) {
        v->done(v, err);
        return;
    }
    /* Rows outside the chain: committed but not sealed yet, or forged (no valid MAC). */
    int n = PQntuples(res);
    for (int i = 0; i < n; i++) {
        if (!dm_ledger_entry_verifies(v->key, res, i, 0))
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_INSERTED, v->expected,
                       "entry %lld carries no valid MAC: inserted outside the gateway",
                       (long long)dm_pg_int8(res, i, DM_LC_ENTRY_ID));
        else
            v->unsealed++;
    }
    v->done(v, NULL);
}

static void verify_chain_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    verify_t *v = job->arg;
    if (err) {
        v->done(v, err);
        return;
    }
    int n = PQntuples(res);
    for (int i = 0; i < n; i++) {
        int64_t seq = dm_pg_int8(res, i, 0);
        int64_t entry_id = dm_pg_int8(res, i, 1);
        int len;
        const unsigned char *link = (const unsigned char *)dm_pg_bytes(res, i, 2, &len);
        if (seq != v->expected) {
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED, v->expected,
                       "chain link %lld is missing", (long long)v->expected);
            v->expected = seq; /* carry on from what is there */
        }
        if (dm_pg_isnull(res, i, 3 + DM_LC_ENTRY_ID)) {
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED, seq,
                       "entry %lld (link %lld) was deleted", (long long)entry_id, (long long)seq);
        } else {
            unsigned char h[32];
            int mlen;
            const char *stored = dm_pg_bytes(res, i, 3 + DM_LC_MAC, &mlen);
            if (!dm_ledger_entry_verifies(v->key, res, i, 3))
                set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_EDITED, seq,
                           "entry %lld (link %lld) was changed after it was written",
                           (long long)entry_id, (long long)seq);
            dm_ledger_chain_hash(v->key, v->prev, seq, entry_id, (const unsigned char *)stored, h);
            if (len != 32 || CRYPTO_memcmp(h, link, 32) != 0)
                set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_REORDERED, seq,
                           "link %lld does not follow link %lld: entries were moved or the "
                           "chain was rewritten",
                           (long long)seq, (long long)seq - 1);
        }
        if (len == 32)
            memcpy(v->prev, link, 32); /* continue from the stored link */
        v->expected = seq + 1;
        v->checked++;
    }
    if (n == VERIFY_PAGE) {
        verify_page(v);
        return;
    }
    memset(&v->job, 0, sizeof(v->job));
    v->job.stmt = DM_SQL_LEDGER_LOOSE;
    v->job.done = verify_loose_done;
    v->job.arg = v;
    v->job.call = v->call;
    snprintf(v->limit_s, sizeof(v->limit_s), "%d", LOOSE_LIMIT);
    dm_job_param_text(&v->job, 0, v->limit_s);
    dm_region_submit(v->region, &v->job);
}

static void verify_page(verify_t *v)
{
    memset(&v->job, 0, sizeof(v->job));
    v->job.stmt = DM_SQL_LEDGER_VERIFY;
    v->job.done = verify_chain_done;
    v->job.arg = v;
    v->job.call = v->call;
    snprintf(v->after_s, sizeof(v->after_s), "%lld", (long long)(v->expected - 1));
    snprintf(v->limit_s, sizeof(v->limit_s), "%d", VERIFY_PAGE);
    dm_job_param_text(&v->job, 0, v->after_s);
    dm_job_param_text(&v->job, 1, v->limit_s);
    dm_region_submit(v->region, &v->job);
}

static void verify_checkpoint_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    verify_t *v = job->arg;
    if (err) {
        v->done(v, err);
        return;
    }
    memset(v->prev, 0, sizeof(v->prev));
    v->expected = 1;
    if (PQntuples(res) == 1) {
        int len;
        int64_t upto = dm_pg_int8(res, 0, 0);
        const unsigned char *hash = (const unsigned char *)dm_pg_bytes(res, 0, 1, &len);
        int64_t before = dm_pg_time_ms(res, 0, 2);
        int mlen;
        const char *stored = dm_pg_bytes(res, 0, 3, &mlen);
        unsigned char mac[32];
        v->has_checkpoint = true;
        v->cp.seq = upto;
        v->cp.purged_before_unix_ms = before;
        if (len == 32) {
            dm_ledger_checkpoint_mac(v->key, upto, hash, before, mac);
            v->cp.valid = mlen == 32 && CRYPTO_memcmp(mac, stored, 32) == 0;
            memcpy(v->prev, hash, 32);
            dm_hex_encode(hash, 32, v->cp_hash_hex);
        }
        v->cp.chain_hash_hex = v->cp_hash_hex;
        if (!v->cp.valid)
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_CHECKPOINT_INVALID, upto,
                       "the retention checkpoint at link %lld is not signed by this region's "
                       "ledger key",
                       (long long)upto);
        v->expected = upto + 1;
    }
    verify_page(v);
}

static void verify_start(verify_t *v)
{
    v->damage = DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_NONE;
    domicile__v1__ledger_checkpoint__init(&v->cp);
    v->cp.chain_hash_hex = "";
    memset(&v->job, 0, sizeof(v->job));
    v->job.stmt = DM_SQL_LEDGER_CHECKPOINT;
    v->job.done = verify_checkpoint_done;
    v->job.arg = v;
    v->job.call = v->call;
    dm_region_submit(v->region, &v->job);
}

static void verify_reply(verify_t *v, dm_status_t *err)
{
    dm_call_t *call = v->call;
    if (err) {
        dm_call_finish(call, err);
        return;
    }
    Domicile__V1__VerifyLedgerResponse rep = DOMICILE__V1__VERIFY_LEDGER_RESPONSE__INIT;
    rep.region = (char *)dm_region_code(v->region);
    rep.ok = v->damage == DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_NONE;
    rep.entries_checked = v->checked;
    rep.sealed_up_to_seq = v->expected - 1;
    rep.first_bad_seq = rep.ok ? 0 : v->bad_seq;
    rep.damage = v->damage;
    rep.detail = v->detail;
    rep.checkpoint = v->has_checkpoint ? &v->cp : NULL;
    rep.unsealed_entries = v->unsealed;
    rep.verified_at_unix_ms = dm_now_ms();
    if (!rep.ok)
        dm_warn("transfers", "ledger of region %s does not verify: %s", rep.region, v->detail);
    dm_call_reply(call, &rep.base);
}

static dm_status_t *find_region(dm_app_t *app, const char *code, dm_region_t **out)
{
    *out =
        code[0] && strlen(code) <= DM_REGION_CODE_MAX ? dm_regions_find(app->regions, code) : NULL;
    if (!*out)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "region: unknown region code");
    return NULL;
}

void dm_transfers_verify(dm_call_t *call)
{
    const Domicile__V1__VerifyLedgerRequest *req =
        (const Domicile__V1__VerifyLedgerRequest *)dm_call_request(call);
    dm_app_t *app = APP(call);
    dm_region_t *r;
    dm_status_t *st = find_region(app, req->region, &r);
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    verify_t *v = dm_calloc(1, sizeof(*v));
    v->call = call;
    v->region = r;
    v->key = app->ledger_keys[dm_app_region_index(app, r)];
    v->done = verify_reply;
    dm_call_set_data(call, v, free);
    verify_start(v);
}

/* ---- ListTransfers ------------------------------------------------------------------- */

typedef struct list_ctx {
    dm_call_t *call;
    dm_app_t *app;
    size_t region_i; /* index of the region being listed */
    size_t region_end;
    int64_t after; /* last entry id sent in this region */
    int remaining;
    char from_s[24], to_s[24], after_s[24], limit_s[16];
    const char *outcome;
    dm_job_t job;
    atomic_bool awaiting_drain;
} list_ctx_t;

static void list_next(list_ctx_t *c);

static void list_end(list_ctx_t *c, bool more)
{
    Domicile__V1__ListTransfersResponse msg = DOMICILE__V1__LIST_TRANSFERS_RESPONSE__INIT;
    Domicile__V1__ListTransfersPage end = DOMICILE__V1__LIST_TRANSFERS_PAGE__INIT;
    char tok[80] = "";
    if (more)
        snprintf(tok, sizeof(tok), TOKEN_PREFIX "%zu.%lld", c->region_i, (long long)c->after);
    end.next_page_token = tok;
    msg.item_case = DOMICILE__V1__LIST_TRANSFERS_RESPONSE__ITEM_END;
    msg.end = &end;
    dm_call_send(c->call, &msg.base);
    dm_call_finish(c->call, NULL);
}

static void list_maybe_next(list_ctx_t *c)
{
    if (dm_call_queued(c->call) == 0 && atomic_exchange(&c->awaiting_drain, false))
        list_next(c);
}

static void list_drained(dm_call_t *call, void *arg)
{
    list_maybe_next(arg);
}

static void entry_from_row(Domicile__V1__TransferEntry *e, const PGresult *res, int i,
                           const char *region, char *sk_hex, char *hash_hex, char **ids_buf,
                           char ***ids)
{
    int len;
    e->region = (char *)region;
    e->entry_id = dm_pg_int8(res, i, DM_LC_ENTRY_ID);
    e->seq = dm_pg_isnull(res, i, DM_LC__COUNT) ? 0 : dm_pg_int8(res, i, DM_LC__COUNT);
    e->at_unix_ms = dm_pg_time_ms(res, i, DM_LC_AT);
    e->request_id = (char *)dm_pg_bytes(res, i, DM_LC_REQUEST_ID, &len);
    e->principal = (char *)dm_pg_bytes(res, i, DM_LC_PRINCIPAL, &len);
    e->method = (char *)dm_pg_bytes(res, i, DM_LC_METHOD, &len);
    e->customer_id = (char *)dm_pg_bytes(res, i, DM_LC_CUSTOMER, &len);
    if (!dm_pg_isnull(res, i, DM_LC_SUBJECT)) {
        const char *sk = dm_pg_bytes(res, i, DM_LC_SUBJECT, &len);
        if (len == DM_SUBJECT_KEY_LEN) {
            dm_hex_encode((const unsigned char *)sk, DM_SUBJECT_KEY_LEN, sk_hex);
            e->subject_key_hex = sk_hex;
        }
    }
    e->record_count = dm_pg_int8(res, i, DM_LC_RECORDS);
    e->bytes = dm_pg_int8(res, i, DM_LC_BYTES);
    e->from_region = (char *)dm_pg_bytes(res, i, DM_LC_FROM, &len);
    e->to_region = (char *)dm_pg_bytes(res, i, DM_LC_TO, &len);
    const char *dir = dm_pg_bytes(res, i, DM_LC_DIRECTION, &len);
    e->direction = dir[0] == 'r' ? DOMICILE__V1__TRANSFER_DIRECTION__TRANSFER_DIRECTION_READ
                                 : DOMICILE__V1__TRANSFER_DIRECTION__TRANSFER_DIRECTION_WRITE;
    e->purpose = (char *)dm_pg_bytes(res, i, DM_LC_PURPOSE, &len);
    e->basis_id = (char *)dm_pg_bytes(res, i, DM_LC_BASIS, &len);
    const char *outcome = dm_pg_bytes(res, i, DM_LC_OUTCOME, &len);
    e->outcome = outcome[0] == 'a' ? DOMICILE__V1__TRANSFER_OUTCOME__TRANSFER_OUTCOME_ALLOWED
                                   : DOMICILE__V1__TRANSFER_OUTCOME__TRANSFER_OUTCOME_REFUSED;
    e->refusal_reason = (char *)dm_pg_bytes(res, i, DM_LC_REFUSAL, &len);
    const char *mac = dm_pg_bytes(res, i, DM_LC_MAC, &len);
    if (len == 32) {
        dm_hex_encode((const unsigned char *)mac, 32, hash_hex);
        e->entry_hash_hex = hash_hex;
    }
    /* Record ids are stored joined by U+001F. */
    const char *joined = dm_pg_bytes(res, i, DM_LC_RECORD_IDS, &len);
    size_t n = 0;
    *ids_buf = NULL;
    *ids = NULL;
    if (len > 0) {
        *ids_buf = dm_strndup(joined, (size_t)len);
        for (const char *p = *ids_buf; *p; p++)
            n += *p == '\x1f';
        n++;
        *ids = dm_calloc(n, sizeof(char *));
        size_t k = 0;
        for (char *p = *ids_buf, *start = *ids_buf;; p++) {
            if (*p == '\x1f' || *p == '\0') {
                bool last = *p == '\0';
                *p = '\0';
                (*ids)[k++] = start;
                start = p + 1;
                if (last)
                    break;
            }
        }
    }
    e->n_record_ids = n;
    e->record_ids = *ids;
}

static void list_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    list_ctx_t *c = job->arg;
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    const char *code = dm_region_code(dm_regions_at(c->app->regions, c->region_i));
    int limit = atoi(c->limit_s) - 1;
    int rows = PQntuples(res);
    int to_send = rows > limit ? limit : rows;
    for (int i = 0; i < to_send; i++) {
        Domicile__V1__TransferEntry e = DOMICILE__V1__TRANSFER_ENTRY__INIT;
        Domicile__V1__ListTransfersResponse msg = DOMICILE__V1__LIST_TRANSFERS_RESPONSE__INIT;
        char sk_hex[65] = "", hash_hex[65] = "", *ids_buf, **ids;
        e.subject_key_hex = "";
        e.entry_hash_hex = "";
        entry_from_row(&e, res, i, code, sk_hex, hash_hex, &ids_buf, &ids);
        msg.item_case = DOMICILE__V1__LIST_TRANSFERS_RESPONSE__ITEM_ENTRY;
        msg.entry = &e;
        bool alive = dm_call_send(c->call, &msg.base);
        c->after = e.entry_id;
        free(ids);
        free(ids_buf);
        if (!alive) {
            dm_call_finish(c->call, dm_status_new(GRPC_STATUS_CANCELLED, "stream cancelled"));
            return;
        }
    }
    c->remaining -= to_send;
    bool more_here = rows > limit;
    if (!more_here) {
        /* This region is done: the next one, from its start. */
        c->region_i++;
        c->after = 0;
    }
    bool more = c->region_i < c->region_end;
    if (c->remaining == 0 || !more) {
        list_end(c, more);
        return;
    }
    atomic_store(&c->awaiting_drain, true);
    list_maybe_next(c);
}

static void list_next(list_ctx_t *c)
{
    const Domicile__V1__ListTransfersRequest *req =
        (const Domicile__V1__ListTransfersRequest *)dm_call_request(c->call);
    int chunk = c->remaining < LIST_CHUNK ? c->remaining : LIST_CHUNK;
    snprintf(c->limit_s, sizeof(c->limit_s), "%d", chunk + 1);
    snprintf(c->after_s, sizeof(c->after_s), "%lld", (long long)c->after);
    memset(&c->job, 0, sizeof(c->job));
    c->job.stmt = DM_SQL_LEDGER_LIST;
    c->job.done = list_done;
    c->job.arg = c;
    c->job.call = c->call;
    dm_job_param_text(&c->job, 0, c->from_s);
    dm_job_param_text(&c->job, 1, c->to_s);
    dm_job_param_text(&c->job, 2, req->from_region);
    dm_job_param_text(&c->job, 3, req->to_region);
    dm_job_param_text(&c->job, 4, req->basis_id);
    dm_job_param_text(&c->job, 5, req->purpose);
    dm_job_param_text(&c->job, 6, c->outcome);
    dm_job_param_text(&c->job, 7, req->customer_id);
    dm_job_param_text(&c->job, 8, c->after_s);
    dm_job_param_text(&c->job, 9, c->limit_s);
    dm_region_submit(dm_regions_at(c->app->regions, c->region_i), &c->job);
}

static dm_status_t *check_filters(const char *from_region, const char *to_region, const char *basis,
                                  const char *purpose, int64_t from_ms, int64_t to_ms)
{
    dm_status_t *st;
    if (strlen(from_region) > DM_REGION_CODE_MAX || strlen(to_region) > DM_REGION_CODE_MAX)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "from_region/to_region: at most %d bytes", DM_REGION_CODE_MAX);
    if ((st = dm_check_kind("basis_id", basis, true)) ||
        (st = dm_check_purpose("purpose", purpose, true)))
        return st;
    if (from_ms < 0 || to_ms < 0 || (to_ms && from_ms > to_ms))
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "from_unix_ms/to_unix_ms: must be >= 0 and from <= to");
    return NULL;
}

void dm_transfers_list(dm_call_t *call)
{
    const Domicile__V1__ListTransfersRequest *req =
        (const Domicile__V1__ListTransfersRequest *)dm_call_request(call);
    dm_app_t *app = APP(call);
    dm_status_t *st = check_filters(req->from_region, req->to_region, req->basis_id, req->purpose,
                                    req->from_unix_ms, req->to_unix_ms);
    if (!st && req->customer_id[0])
        st = dm_check_customer_id("customer_id", req->customer_id);
    if (!st)
        st = dm_check_page_size("page_size", req->page_size, LIST_MAX);
    if (!st && (req->subject[0] || req->principal[0] ||
                req->direction != DOMICILE__V1__TRANSFER_DIRECTION__TRANSFER_DIRECTION_UNSPECIFIED))
        st = dm_status_new(GRPC_STATUS_UNIMPLEMENTED,
                           "filters subject, principal and direction are not implemented yet; "
                           "filter by customer, route, basis, purpose, outcome or time");
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    list_ctx_t *c = dm_calloc(1, sizeof(*c));
    c->call = call;
    c->app = app;
    dm_call_set_data(call, c, free);
    c->remaining = req->page_size ? req->page_size : LIST_DEFAULT;
    snprintf(c->from_s, sizeof(c->from_s), "%lld", (long long)req->from_unix_ms);
    snprintf(c->to_s, sizeof(c->to_s), "%lld", (long long)req->to_unix_ms);
    c->outcome =
        req->outcome == DOMICILE__V1__TRANSFER_OUTCOME__TRANSFER_OUTCOME_ALLOWED   ? "allowed"
        : req->outcome == DOMICILE__V1__TRANSFER_OUTCOME__TRANSFER_OUTCOME_REFUSED ? "refused"
                                                                                   : "";
    c->region_i = 0;
    c->region_end = dm_regions_count(app->regions);
    if (req->region[0]) {
        dm_region_t *r;
        if ((st = find_region(app, req->region, &r))) {
            dm_call_finish(call, st);
            return;
        }
        c->region_i = dm_app_region_index(app, r);
        c->region_end = c->region_i + 1;
    }
    if (req->page_token[0]) {
        size_t ri;
        long long after;
        char extra;
        if (strlen(req->page_token) > 64 ||
            sscanf(req->page_token, TOKEN_PREFIX "%zu.%lld%c", &ri, &after, &extra) != 2 ||
            ri < c->region_i || ri >= c->region_end || after < 0) {
            dm_call_finish(call, dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                               "page_token: not a token returned by "
                                               "ListTransfers with these filters"));
            return;
        }
        c->region_i = ri;
        c->after = after;
    }
    dm_call_on_drain(call, list_drained, c);
    list_next(c);
}

/* ---- Report ---------------------------------------------------------------------------- */

typedef struct report report_t;

typedef struct report_part {
    report_t *rep;
    dm_region_t *region;
    dm_job_t job;
    verify_t verify;
    PGresult *rows;
    bool reachable;
} report_part_t;

struct report {
    dm_call_t *call;
    dm_app_t *app;
    atomic_int pending;
    char from_s[24], to_s[24];
    size_t n;
    size_t order[DM_MAX_REGIONS]; /* ledgers are reported in region code order */
    report_part_t parts[DM_MAX_REGIONS];
};

static int cmp_code(const void *a, const void *b, void *arg)
{
    report_t *r = arg;
    return strcmp(dm_region_code(r->parts[*(const size_t *)a].region),
                  dm_region_code(r->parts[*(const size_t *)b].region));
}

static void report_free(void *p)
{
    report_t *r = p;
    for (size_t i = 0; i < r->n; i++)
        PQclear(r->parts[i].rows);
    free(r);
}

static int cmp_row(const void *a, const void *b)
{
    const Domicile__V1__ReportRow *x = *(Domicile__V1__ReportRow *const *)a;
    const Domicile__V1__ReportRow *y = *(Domicile__V1__ReportRow *const *)b;
    int c;
    if ((c = strcmp(x->month, y->month)) || (c = strcmp(x->from_region, y->from_region)) ||
        (c = strcmp(x->to_region, y->to_region)) || (c = strcmp(x->basis_id, y->basis_id)))
        return c;
    return strcmp(x->purpose, y->purpose);
}

static void report_finish(report_t *r)
{
    const Domicile__V1__ReportRequest *req =
        (const Domicile__V1__ReportRequest *)dm_call_request(r->call);
    Domicile__V1__TransferReport out = DOMICILE__V1__TRANSFER_REPORT__INIT;
    size_t total = 0;
    for (size_t i = 0; i < r->n; i++)
        total += r->parts[i].rows ? (size_t)PQntuples(r->parts[i].rows) : 0;
    Domicile__V1__ReportRow *rows = dm_calloc(total + 1, sizeof(*rows));
    Domicile__V1__ReportRow **rowp = dm_calloc(total + 1, sizeof(*rowp));
    Domicile__V1__LedgerState *states = dm_calloc(r->n, sizeof(*states));
    Domicile__V1__LedgerState **statep = dm_calloc(r->n, sizeof(*statep));
    size_t k = 0;
    bool complete = true;
    for (size_t o = 0; o < r->n; o++) {
        size_t i = r->order[o];
        report_part_t *p = &r->parts[i];
        Domicile__V1__LedgerState *s = &states[o];
        domicile__v1__ledger_state__init(s);
        s->region = (char *)dm_region_code(p->region);
        s->reachable = p->reachable;
        complete = complete && p->reachable;
        if (p->reachable) {
            s->verified = p->verify.damage == DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_NONE;
            s->damage = p->verify.damage;
            s->entries = p->verify.checked + p->verify.unsealed;
            s->first_bad_seq = s->verified ? 0 : p->verify.bad_seq;
            s->sealed_up_to_seq = p->verify.expected - 1;
            s->detail = p->verify.detail;
        }
        statep[o] = s;
        for (int j = 0; p->rows && j < PQntuples(p->rows); j++) {
            Domicile__V1__ReportRow *row = &rows[k];
            int len;
            domicile__v1__report_row__init(row);
            row->month = (char *)dm_pg_bytes(p->rows, j, 0, &len);
            row->from_region = (char *)dm_pg_bytes(p->rows, j, 1, &len);
            row->to_region = (char *)dm_pg_bytes(p->rows, j, 2, &len);
            row->basis_id = (char *)dm_pg_bytes(p->rows, j, 3, &len);
            row->purpose = (char *)dm_pg_bytes(p->rows, j, 4, &len);
            row->transfers = dm_pg_int8(p->rows, j, 5);
            row->records = dm_pg_int8(p->rows, j, 6);
            row->bytes = dm_pg_int8(p->rows, j, 7);
            row->refusals = dm_pg_int8(p->rows, j, 8);
            if ((req->from_region[0] && strcmp(req->from_region, row->from_region) != 0) ||
                (req->to_region[0] && strcmp(req->to_region, row->to_region) != 0))
                continue;
            rowp[k] = row;
            k++;
        }
    }
    qsort(rowp, k, sizeof(*rowp), cmp_row);
    out.n_rows = k;
    out.rows = rowp;
    out.n_ledgers = r->n;
    out.ledgers = statep;
    out.generated_at_unix_ms = dm_now_ms();
    out.from_unix_ms = req->from_unix_ms;
    out.to_unix_ms = req->to_unix_ms;
    out.complete = complete;
    dm_call_reply(r->call, &out.base);
    free(rows);
    free(rowp);
    free(states);
    free(statep);
}

static void part_done(report_part_t *p)
{
    if (atomic_fetch_sub(&p->rep->pending, 1) == 1)
        report_finish(p->rep);
}

static void part_verified(verify_t *v, dm_status_t *err)
{
    report_part_t *p = v->arg;
    if (err) {
        p->reachable = false;
        dm_status_free(err);
    }
    part_done(p);
}

static void part_rows(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    report_part_t *p = job->arg;
    if (err) {
        /* A region that cannot answer is reported as such (complete = false), not hidden. */
        p->reachable = false;
        dm_status_free(err);
        part_done(p);
        return;
    }
    p->rows = PQcopyResult(res, PG_COPYRES_ATTRS | PG_COPYRES_TUPLES);
    verify_start(&p->verify);
}

void dm_transfers_report(dm_call_t *call)
{
    const Domicile__V1__ReportRequest *req =
        (const Domicile__V1__ReportRequest *)dm_call_request(call);
    dm_app_t *app = APP(call);
    dm_status_t *st = check_filters(req->from_region, req->to_region, req->basis_id, req->purpose,
                                    req->from_unix_ms, req->to_unix_ms);
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    report_t *r = dm_calloc(1, sizeof(*r));
    r->call = call;
    r->app = app;
    r->n = dm_regions_count(app->regions);
    dm_call_set_data(call, r, report_free);
    snprintf(r->from_s, sizeof(r->from_s), "%lld", (long long)req->from_unix_ms);
    snprintf(r->to_s, sizeof(r->to_s), "%lld", (long long)req->to_unix_ms);
    /* One extra count held while submitting: a part that completes at once (its region
     * down) must not finish the call while later parts are still being set up. */
    atomic_init(&r->pending, (int)r->n + 1);
    for (size_t i = 0; i < r->n; i++) {
        report_part_t *p = &r->parts[i];
        p->rep = r;
        p->region = dm_regions_at(app->regions, i);
        p->reachable = true;
        p->verify.call = call;
        p->verify.region = p->region;
        p->verify.key = app->ledger_keys[i];
        p->verify.done = part_verified;
        p->verify.arg = p;
        p->job.stmt = DM_SQL_LEDGER_REPORT;
        p->job.done = part_rows;
        p->job.arg = p;
        p->job.call = call;
        dm_job_param_text(&p->job, 0, r->from_s);
        dm_job_param_text(&p->job, 1, r->to_s);
        dm_job_param_text(&p->job, 2, req->basis_id);
        dm_job_param_text(&p->job, 3, req->purpose);
    }
    for (size_t i = 0; i < r->n; i++)
        r->order[i] = i;
    qsort_r(r->order, r->n, sizeof(size_t), cmp_code, r);
    /* Submitting may complete parts at once (a region down): count first, then submit. */
    for (size_t i = 0; i < r->n; i++)
        dm_region_submit(r->parts[i].region, &r->parts[i].job);
    if (atomic_fetch_sub(&r->pending, 1) == 1)
        report_finish(r);
}
