/*
 * domicile.v1.SubjectRightsService. A request is stored in every reachable region (header + that
 * region's leg) before it is acknowledged; workers (src/dsr/worker.c) run the legs in each
 * region and copy requests to regions that were down when they arrived. Status is read from
 * every region at once: a leg shows what its own region says about it.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "domicile/v1/subject_rights.pb-c.h"

#include "domicile/clock.h"
#include "domicile/dsr.h"
#include "domicile/dsr_view.h"
#include "domicile/fanout.h"
#include "domicile/transfer.h"
#include "domicile/log.h"
#include "internal.h"

#include "domicile/peer/v1/peer.pb-c.h"

#define EXPORT_PART_PATH "/domicile.peer.v1.PeerService/ExportPart"

#define REASON_MAX      1024
#define POLICY_DAYS     30
#define EXTENSION_MONTH 2
#define LIST_MAX        1000
#define DAY_MS          86400000LL

typedef struct status_ctx {
    dm_call_t *call;
    dm_app_t *app;
    char request_id[DM_REQUEST_ID_MAX + 1];
    /* creation */
    int kind;
    unsigned char sk[DM_SUBJECT_KEY_LEN];
    char customer[DM_CUSTOMER_ID_MAX + 1];
    char purpose[DM_PURPOSE_MAX + 1];
    char *reason;
    unsigned char fp[32];
    int64_t received, due, gdpr_due;
    char missing[DM_MAX_REGIONS * (DM_REGION_CODE_MAX + 1) + 3];
    dm_dsr_view_t *view; /* the reply, built from `stored` (the receive's answers); both owned */
    dm_fanout_t *stored;
    bool started[DM_MAX_REGIONS]; /* the own region's leg, run as soon as it was stored */
    /* extension */
    char until_s[24];
} status_ctx_t;

static void status_ctx_free(void *p)
{
    status_ctx_t *c = p;
    free(c->reason);
    free(c->view);
    dm_fanout_free(c->stored);
    free(c);
}

/* Tenant scope: a request about one customer is seen by principals whose scope holds that
 * customer; one about every customer by its filer and by scope `*`. Others are answered as
 * for a request that does not exist. */
static bool visible(dm_call_t *call, const Domicile__V1__DsrRequest *q)
{
    const dm_principal_t *p = dm_call_principal_of(call);
    return !p || p->all_tenants ||
           (q->customer_id[0] ? dm_principal_in_scope(p, q->customer_id)
                              : strcmp(q->principal, p->name) == 0);
}

static void status_done(dm_fanout_t *f, void *arg)
{
    status_ctx_t *c = arg;
    dm_dsr_view_t *v = dm_calloc(1, sizeof(*v));
    dm_status_t *st = dm_dsr_view_fill(v, f, c->app->regions);
    if (!st && !visible(c->call, &v->req))
        st = dm_status_new(GRPC_STATUS_NOT_FOUND, "request not found");
    if (st)
        dm_call_finish(c->call, st);
    else
        dm_api_reply_wrapped(c->call, &v->req.base);
    free(v);
    dm_fanout_free(f);
}

static void start_status(status_ctx_t *c)
{
    const char *vals[1] = {c->request_id};
    dm_fanout_start(c->call, c->app->regions, DM_SQL_DSR_STATUS, 1, vals, NULL, NULL, status_done,
                    c);
}

void dm_dsr_get(dm_call_t *call)
{
    const Domicile__V1__GetRequestRequest *req =
        (const Domicile__V1__GetRequestRequest *)dm_call_request(call);
    dm_status_t *st = dm_check_request_id("request_id", req->request_id);
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    status_ctx_t *c = dm_calloc(1, sizeof(*c));
    c->call = call;
    c->app = APP(call);
    snprintf(c->request_id, sizeof(c->request_id), "%s", req->request_id);
    dm_call_set_data(call, c, status_ctx_free);
    start_status(c);
}

/* ---- creating a request -------------------------------------------------------------- */

/* Reply with the request as the regions stored it (c->view, built from c->stored). */
static void reply_stored(status_ctx_t *c)
{
    /* The call may end, and `c` with it, as soon as the reply is queued. */
    dm_dsr_view_t *v = c->view;
    dm_fanout_t *f = c->stored;
    c->view = NULL;
    c->stored = NULL;
    dm_api_reply_wrapped(c->call, &v->req.base);
    free(v);
    dm_fanout_free(f);
}

static void missing_done(dm_fanout_t *f, void *arg)
{
    /* Regions that took the request now know where it is still missing; then reply. */
    dm_fanout_free(f);
    reply_stored(arg);
}

/* Each region's answer to DM_SQL_DSR_RECEIVE_CLAIM: the request as stored there, then the
 * status of the store. */
static void receive_done(dm_fanout_t *f, void *arg)
{
    status_ctx_t *c = arg;
    size_t stored = 0;
    bool reused = false;
    dm_status_t *first_err = NULL;
    dm_region_t *took[DM_MAX_REGIONS];
    bool claimed[DM_MAX_REGIONS];
    size_t n_took = 0;
    c->missing[0] = '{';
    size_t ml = 1;
    for (size_t i = 0; i < f->n; i++) {
        if (f->err[i]) {
            const char *code = dm_region_code(f->region[i]);
            ml += (size_t)snprintf(c->missing + ml, sizeof(c->missing) - ml, "%s%s",
                                   ml > 1 ? "," : "", code);
            if (!first_err) {
                first_err = f->err[i];
                f->err[i] = NULL;
            }
            continue;
        }
        if (PQntuples(f->res[i]) != 1)
            continue;
        int len;
        const char *s = dm_pg_bytes(f->res[i], 0, DM_DC__COUNT, &len);
        if (strcmp(s, "request_id_reused") == 0) {
            reused = true;
        } else {
            stored++;
            if (c->started[i])
                continue; /* running since it was stored (leg_stored) */
            claimed[n_took] = strcmp(s, "created") == 0; /* by this gateway, as it stored it */
            took[n_took++] = f->region[i];
        }
    }
    snprintf(c->missing + ml, sizeof(c->missing) - ml, "}");
    /* `c` may be gone once the call is answered: the legs get copies. */
    dm_dsr_ctx_t *dsr = &c->app->dsr;
    char id[DM_REQUEST_ID_MAX + 1];
    snprintf(id, sizeof(id), "%s", c->request_id);
    const char *kind = dm_dsr_kind_names[c->kind];
    if (reused) {
        dm_fanout_free(f);
        dm_status_free(first_err);
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                              "request_id: already used for a different "
                                              "request"));
        /* What some regions stored anyway is run, as the workers would (not left claimed). */
        dm_dsr_run_now(dsr, id, kind, took, claimed, n_took);
        return;
    }
    if (stored == 0) {
        /* Not stored anywhere: not acknowledged. */
        dm_fanout_free(f);
        dm_status_t *st =
            dm_status_new(GRPC_STATUS_UNAVAILABLE, "no region could store the request; retry");
        if (first_err)
            dm_status_detail(st, "%s", first_err->detail ? first_err->detail : first_err->message);
        dm_status_free(first_err);
        dm_call_finish(c->call, st);
        return;
    }
    dm_status_free(first_err);
    c->view = dm_calloc(1, sizeof(*c->view));
    c->stored = f;
    dm_status_t *st = dm_dsr_view_fill(c->view, f, c->app->regions);
    if (st) {
        dm_call_finish(c->call, st); /* c->view and c->stored go with the call */
        dm_dsr_run_now(dsr, id, kind, took, claimed, n_took);
        return;
    }
    /* The other legs start once the reply is on its way, on the regions' free executors (a
     * region that missed the request gets it, and runs its leg, from the workers); the own
     * region's is running since it was stored (leg_stored), the peers' since they stored. */
    if (ml > 1) {
        dm_info("dsr", "request stored in %zu regions; missing %s (delivered when they return)",
                stored, c->missing);
        const char *vals[2] = {c->request_id, c->missing};
        dm_fanout_start(c->call, c->app->regions, DM_SQL_DSR_SET_MISSING, 2, vals, NULL, NULL,
                        missing_done, c);
    } else {
        reply_stored(c);
    }
    dm_dsr_run_now(dsr, id, kind, took, claimed, n_took);
}

/* The own region's answer to DM_SQL_DSR_RECEIVE_CLAIM: a leg this gateway created and claimed
 * there runs at once, as the peer regions' gateways run theirs on receipt, instead of after
 * the slowest region (a wide-area round trip away) has stored the request too. */
static void leg_stored(dm_fanout_t *f, size_t i, void *arg)
{
    status_ctx_t *c = arg;
    if (f->err[i] || !dm_region_is_local(f->region[i]) || PQntuples(f->res[i]) != 1)
        return;
    int len;
    if (strcmp(dm_pg_bytes(f->res[i], 0, DM_DC__COUNT, &len), "created") != 0)
        return;
    bool claimed = true;
    c->started[i] = true;
    dm_dsr_run_now(&c->app->dsr, c->request_id, dm_dsr_kind_names[c->kind], &f->region[i], &claimed,
                   1);
}

/* Store the request (header + leg) in every region; `done` sees each region's answer. With
 * `claim`, a leg created there is claimed by this gateway's worker in the same transaction. */
static void receive_fanout(status_ctx_t *c, bool claim, dm_fanout_fn done, void *arg)
{
    const dm_principal_t *p = dm_call_principal_of(c->call);
    const dm_config_t *cfg = c->app->cfg;
    char received[24], due[24], gdpr[24];
    snprintf(received, sizeof(received), "%lld", (long long)c->received);
    snprintf(due, sizeof(due), "%lld", (long long)c->due);
    snprintf(gdpr, sizeof(gdpr), "%lld", (long long)c->gdpr_due);
    /* The receiving gateway's region notifies (webhook) when every leg is done. */
    const char *vals[15] = {c->request_id,
                            dm_dsr_kind_names[c->kind],
                            (const char *)c->fp,
                            (const char *)c->sk,
                            c->customer,
                            c->purpose,
                            c->reason ? c->reason : "",
                            p ? p->name : "",
                            received,
                            due,
                            gdpr,
                            cfg->gateway_region,
                            dm_webhooks_apply(c->app->webhooks, c->customer) ? "pending" : "none",
                            c->app->dsr.me,
                            DM_DSR_LEASE_S};
    int lens[15] = {0, 0, 32, DM_SUBJECT_KEY_LEN};
    int fmts[15] = {0, 0, 1, 1};
    if (claim)
        dm_fanout_start_each(c->call, c->app->regions, DM_SQL_DSR_RECEIVE_CLAIM, 15, vals, lens,
                             fmts, leg_stored, done, arg);
    else
        dm_fanout_start(c->call, c->app->regions, DM_SQL_DSR_RECEIVE, 13, vals, lens, fmts, done,
                        arg);
}

static void start_receive(status_ctx_t *c)
{
    receive_fanout(c, true, receive_done, c);
}

/* Validate and store a request of `kind`; replies with its status. */
static void customer_resolved(void *arg, dm_region_t *region, const char *state, dm_status_t *err)
{
    status_ctx_t *c = arg;
    (void)region;
    (void)state;
    if (err)
        dm_call_finish(c->call, err);
    else
        start_receive(c);
}

static void create(dm_call_t *call, int kind, const char *request_id, const char *subject,
                   const char *customer, const char *purpose, const char *reason)
{
    dm_app_t *app = APP(call);
    const dm_principal_t *p = dm_call_principal_of(call);
    dm_status_t *st;
    bool has;
    status_ctx_t *c = dm_calloc(1, sizeof(*c));
    c->call = call;
    c->app = app;
    c->kind = kind;
    dm_call_set_data(call, c, status_ctx_free);

    if ((st = dm_check_request_id("request_id", request_id)) ||
        (st = dm_check_text("reason", reason, 0, REASON_MAX)) ||
        (customer[0] && (st = dm_check_customer_id("customer_id", customer))) ||
        (purpose && (st = dm_check_purpose("purpose", purpose, false))) ||
        (st = dm_subject_to_key(app, "subject", subject, &has, c->sk))) {
        dm_call_finish(call, st);
        return;
    }
    if (!has) {
        dm_call_finish(call,
                       dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                     "subject: required (1..%d bytes of UTF-8)", DM_SUBJECT_MAX));
        return;
    }
    if (p && !p->all_tenants && !customer[0]) {
        dm_call_finish(call, dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                           "customer_id: required for a principal whose scope "
                                           "is limited to some customers"));
        return;
    }
    snprintf(c->request_id, sizeof(c->request_id), "%s", request_id);
    snprintf(c->customer, sizeof(c->customer), "%s", customer);
    snprintf(c->purpose, sizeof(c->purpose), "%s", purpose ? purpose : "");
    c->reason = dm_strdup(reason);
    c->received = dm_now_ms();
    c->due = c->received + POLICY_DAYS * DAY_MS;
    c->gdpr_due = dm_add_months_ms(c->received, 1);
    DM_FINGERPRINT(c->fp, DM_AAD_STR("dsr"), DM_AAD_STR(dm_dsr_kind_names[kind]),
                   DM_AAD_BYTES(c->sk, sizeof(c->sk)), DM_AAD_STR(c->customer),
                   DM_AAD_STR(c->purpose));
    /* A request about one customer names a customer that exists (and is in scope). */
    if (customer[0])
        dm_api_resolve(call, c->customer, customer_resolved, c);
    else
        start_receive(c);
}

void dm_dsr_erase(dm_call_t *call)
{
    const Domicile__V1__EraseRequest *r = (const Domicile__V1__EraseRequest *)dm_call_request(call);
    create(call, DOMICILE__V1__DSR_KIND__DSR_KIND_ERASE, r->request_id, r->subject, r->customer_id,
           NULL, r->reason);
}

void dm_dsr_restrict(dm_call_t *call)
{
    const Domicile__V1__RestrictProcessingRequest *r =
        (const Domicile__V1__RestrictProcessingRequest *)dm_call_request(call);
    create(call, DOMICILE__V1__DSR_KIND__DSR_KIND_RESTRICT, r->request_id, r->subject,
           r->customer_id, NULL, r->reason);
}

void dm_dsr_unrestrict(dm_call_t *call)
{
    const Domicile__V1__UnrestrictProcessingRequest *r =
        (const Domicile__V1__UnrestrictProcessingRequest *)dm_call_request(call);
    create(call, DOMICILE__V1__DSR_KIND__DSR_KIND_UNRESTRICT, r->request_id, r->subject,
           r->customer_id, NULL, r->reason);
}

void dm_dsr_object(dm_call_t *call)
{
    const Domicile__V1__ObjectRequest *r =
        (const Domicile__V1__ObjectRequest *)dm_call_request(call);
    create(call, DOMICILE__V1__DSR_KIND__DSR_KIND_OBJECT, r->request_id, r->subject, r->customer_id,
           r->purpose, r->reason);
}

void dm_dsr_withdraw(dm_call_t *call)
{
    const Domicile__V1__WithdrawRequest *r =
        (const Domicile__V1__WithdrawRequest *)dm_call_request(call);
    create(call, DOMICILE__V1__DSR_KIND__DSR_KIND_WITHDRAW, r->request_id, r->subject,
           r->customer_id, r->purpose, r->reason);
}

/* ---- ExtendDeadline -------------------------------------------------------------------- */

static void extend_done(dm_fanout_t *f, void *arg)
{
    status_ctx_t *c = arg;
    bool ok = false, already = false;
    for (size_t i = 0; i < f->n; i++) {
        if (f->err[i] || PQntuples(f->res[i]) != 1)
            continue;
        int len;
        const char *s = dm_pg_bytes(f->res[i], 0, 0, &len);
        ok = ok || strcmp(s, "ok") == 0;
        already = already || strcmp(s, "already_extended") == 0;
    }
    dm_fanout_free(f);
    if (!ok && already) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                                              "the deadline was already extended once"));
        return;
    }
    if (!ok) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                              "no region could record the extension; retry"));
        return;
    }
    start_status(c);
}

static void extend_found(dm_fanout_t *f, void *arg)
{
    status_ctx_t *c = arg;
    dm_dsr_view_t *v = dm_calloc(1, sizeof(*v));
    dm_status_t *st = dm_dsr_view_fill(v, f, c->app->regions);
    if (!st && !visible(c->call, &v->req))
        st = dm_status_new(GRPC_STATUS_NOT_FOUND, "request not found");
    if (!st && v->req.extended && strcmp(v->req.extension_reason, c->reason) == 0) {
        /* A retry of the extension (its answer was lost): the request as it stands. */
        free(v);
        dm_fanout_free(f);
        start_status(c);
        return;
    }
    if (!st && v->req.extended)
        st = dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                           "the deadline was already extended once");
    if (!st && v->req.state == DOMICILE__V1__DSR_STATE__DSR_STATE_DONE)
        st = dm_status_new(GRPC_STATUS_FAILED_PRECONDITION, "the request is already done");
    if (!st && dm_now_ms() > v->req.gdpr_due_at_unix_ms)
        st = dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                           "the first month has passed: GDPR Art. 12(3) allows the extension "
                           "only within it");
    int64_t until = st ? 0 : dm_add_months_ms(v->req.gdpr_due_at_unix_ms, EXTENSION_MONTH);
    free(v);
    dm_fanout_free(f);
    if (st) {
        dm_call_finish(c->call, st);
        return;
    }
    /* GDPR Art. 12(3): two further months on top of the first month. */
    snprintf(c->until_s, sizeof(c->until_s), "%lld", (long long)until);
    const char *vals[3] = {c->request_id, c->reason, c->until_s};
    dm_fanout_start(c->call, c->app->regions, DM_SQL_DSR_EXTEND, 3, vals, NULL, NULL, extend_done,
                    c);
}

void dm_dsr_extend(dm_call_t *call)
{
    const Domicile__V1__ExtendDeadlineRequest *req =
        (const Domicile__V1__ExtendDeadlineRequest *)dm_call_request(call);
    dm_status_t *st;
    if ((st = dm_check_request_id("request_id", req->request_id)) ||
        (st = dm_check_text("reason", req->reason, 1, REASON_MAX))) {
        dm_call_finish(call, st);
        return;
    }
    status_ctx_t *c = dm_calloc(1, sizeof(*c));
    c->call = call;
    c->app = APP(call);
    c->reason = dm_strdup(req->reason);
    snprintf(c->request_id, sizeof(c->request_id), "%s", req->request_id);
    dm_call_set_data(call, c, status_ctx_free);
    const char *vals[1] = {c->request_id};
    dm_fanout_start(call, c->app->regions, DM_SQL_DSR_STATUS, 1, vals, NULL, NULL, extend_found, c);
}

/* ---- ListRequests ---------------------------------------------------------------------- */

typedef struct row_ref {
    int64_t received;
    const char *id;
    size_t region;
    const PGresult *res;
    int row;
} row_ref_t;

static int cmp_ref(const void *a, const void *b)
{
    const row_ref_t *x = a, *y = b;
    if (x->received != y->received)
        return x->received < y->received ? -1 : 1;
    int c = strcmp(x->id, y->id);
    return c ? c : (x->region > y->region) - (x->region < y->region);
}

typedef struct list_ctx {
    dm_call_t *call;
    dm_app_t *app;
    char limit_s[16];
    char tag[17]; /* the filters, in the page token */
} list_ctx_t;

static void list_done(dm_fanout_t *f, void *arg)
{
    list_ctx_t *c = arg;
    const Domicile__V1__ListRequestsRequest *req =
        (const Domicile__V1__ListRequestsRequest *)dm_call_request(c->call);
    size_t total = 0, unanswered = 0;
    for (size_t i = 0; i < f->n; i++) {
        if (f->err[i])
            unanswered++;
        else
            total += (size_t)PQntuples(f->res[i]);
    }
    if (unanswered == f->n) {
        dm_fanout_free(f);
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                              "no region could be asked for requests"));
        return;
    }
    row_ref_t *refs = dm_calloc(total + 1, sizeof(*refs));
    size_t k = 0;
    for (size_t i = 0; i < f->n; i++) {
        for (int r = 0; !f->err[i] && r < PQntuples(f->res[i]); r++) {
            int len;
            refs[k].received = dm_pg_time_ms(f->res[i], r, DM_DC_RECEIVED);
            refs[k].id = dm_pg_bytes(f->res[i], r, DM_DC_REQUEST_ID, &len);
            refs[k].region = i;
            refs[k].res = f->res[i];
            refs[k].row = r;
            k++;
        }
    }
    qsort(refs, k, sizeof(*refs), cmp_ref);
    int64_t skip = 0, sent = 0;
    if (req->page_token[0]) {
        char tag[17], extra;
        long long at;
        skip = strlen(req->page_token) <= 64 &&
                       sscanf(req->page_token, "o2.%16[0-9a-f].%lld%c", tag, &at, &extra) == 2 &&
                       strcmp(tag, c->tag) == 0
                   ? at
                   : -1;
    }
    if (skip < 0) {
        free(refs);
        dm_fanout_free(f);
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                              "page_token: not a token returned by "
                                              "ListRequests with these filters"));
        return;
    }
    int64_t page = req->page_size ? req->page_size : 100, matched = 0;
    bool more = false;
    int64_t now = dm_now_ms();
    dm_dsr_view_t *v = dm_calloc(1, sizeof(*v));
    for (size_t a = 0; a < k && !more;) {
        size_t b = a;
        while (b < k && strcmp(refs[b].id, refs[a].id) == 0)
            b++;
        dm_dsr_view_init(v, f->n, c->app->regions);
        for (size_t i = 0; i < f->n; i++)
            if (f->err[i])
                v->legs[i].leg.last_error = "region unreachable: state unknown";
        dm_dsr_view_header(v, refs[a].res, refs[a].row);
        for (size_t j = a; j < b; j++)
            dm_dsr_view_leg(&v->legs[refs[j].region], refs[j].res, refs[j].row);
        dm_dsr_view_summarise(v, f->n);
        a = b;
        Domicile__V1__DsrRequest *q = &v->req;
        if (!visible(c->call, q) || (req->state && (int)q->state != (int)req->state) ||
            (req->overdue_only && !q->overdue) ||
            (req->due_within_days > 0 &&
             (q->state == DOMICILE__V1__DSR_STATE__DSR_STATE_DONE ||
              v->effective_due > now + (int64_t)req->due_within_days * DAY_MS)))
            continue;
        if (matched++ < skip)
            continue;
        if (sent == page) {
            more = true;
            break;
        }
        Domicile__V1__ListRequestsResponse msg = DOMICILE__V1__LIST_REQUESTS_RESPONSE__INIT;
        msg.item_case = DOMICILE__V1__LIST_REQUESTS_RESPONSE__ITEM_REQUEST;
        msg.request = q;
        if (!dm_call_send(c->call, &msg.base))
            break;
        sent++;
    }
    free(v);
    free(refs);
    dm_fanout_free(f);
    Domicile__V1__ListRequestsResponse msg = DOMICILE__V1__LIST_REQUESTS_RESPONSE__INIT;
    Domicile__V1__ListRequestsPage end = DOMICILE__V1__LIST_REQUESTS_PAGE__INIT;
    char tok[48] = "";
    if (more)
        snprintf(tok, sizeof(tok), "o2.%s.%lld", c->tag, (long long)(skip + sent));
    end.next_page_token = tok;
    msg.item_case = DOMICILE__V1__LIST_REQUESTS_RESPONSE__ITEM_END;
    msg.end = &end;
    dm_call_send(c->call, &msg.base);
    dm_call_finish(c->call, NULL);
}

void dm_dsr_list(dm_call_t *call)
{
    const Domicile__V1__ListRequestsRequest *req =
        (const Domicile__V1__ListRequestsRequest *)dm_call_request(call);
    dm_status_t *st = dm_check_page_size("page_size", req->page_size, LIST_MAX);
    if (!st && req->customer_id[0])
        st = dm_check_customer_id("customer_id", req->customer_id);
    if (!st && (req->due_within_days < 0 || req->due_within_days > 366))
        st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "due_within_days: must be 0..366");
    if (!st && ((size_t)req->kind >= (size_t)DM_DSR_KINDS || (int)req->state < 0 ||
                (int)req->state > DOMICILE__V1__DSR_STATE__DSR_STATE_FAILED))
        st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "kind/state: unknown value");
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    list_ctx_t *c = dm_calloc(1, sizeof(*c));
    c->call = call;
    c->app = APP(call);
    dm_call_set_data(call, c, free);
    /* A token is valid only with the filters of the listing it came from (it is a position
     * in that listing): they are in it, so one used with others is refused. */
    unsigned char h[32];
    char state_s[12], due_s[12];
    snprintf(state_s, sizeof(state_s), "%d", (int)req->state);
    snprintf(due_s, sizeof(due_s), "%d", (int)req->due_within_days);
    DM_FINGERPRINT(h, DM_AAD_STR("ListRequests"), DM_AAD_STR(state_s),
                   DM_AAD_STR(req->overdue_only ? "overdue" : ""), DM_AAD_STR(due_s),
                   DM_AAD_STR(req->kind ? dm_dsr_kind_names[req->kind] : ""),
                   DM_AAD_STR(req->customer_id));
    dm_hex_encode(h, 8, c->tag);
    /* Each region answers its newest 10000: enough for any page a privacy office reads. */
    snprintf(c->limit_s, sizeof(c->limit_s), "%d", 10000);
    const char *vals[3] = {req->kind ? dm_dsr_kind_names[req->kind] : "", req->customer_id,
                           c->limit_s};
    dm_fanout_start(call, c->app->regions, DM_SQL_DSR_LIST, 3, vals, NULL, NULL, list_done, c);
}

/* ---- Locate ---------------------------------------------------------------------------- */

static int cmp_region_code(const void *a, const void *b, void *arg)
{
    dm_regions_t *rs = arg;
    return strcmp(dm_region_code(dm_regions_at(rs, *(const size_t *)a)),
                  dm_region_code(dm_regions_at(rs, *(const size_t *)b)));
}

static void locate_done(dm_fanout_t *f, void *arg)
{
    dm_call_t *call = arg;
    Domicile__V1__LocateResponse rep = DOMICILE__V1__LOCATE_RESPONSE__INIT;
    Domicile__V1__RegionCount counts[DM_MAX_REGIONS], *cp[DM_MAX_REGIONS];
    char *unreachable[DM_MAX_REGIONS];
    size_t order[DM_MAX_REGIONS];
    for (size_t i = 0; i < f->n; i++)
        order[i] = i;
    qsort_r(order, f->n, sizeof(size_t), cmp_region_code, APP(call)->regions);
    for (size_t o = 0; o < f->n; o++) {
        size_t i = order[o];
        if (f->err[i]) {
            unreachable[rep.n_unreachable_regions++] = (char *)dm_region_code(f->region[i]);
            continue;
        }
        Domicile__V1__RegionCount *c = &counts[rep.n_counts];
        domicile__v1__region_count__init(c);
        c->region = (char *)dm_region_code(f->region[i]);
        c->records = dm_pg_int8(f->res[i], 0, 0);
        c->bytes = dm_pg_int8(f->res[i], 0, 1);
        cp[rep.n_counts++] = c;
    }
    rep.counts = cp;
    rep.unreachable_regions = unreachable;
    dm_call_reply(call, &rep.base);
    dm_fanout_free(f);
}

typedef struct locate_ctx {
    dm_call_t *call;
    unsigned char sk[DM_SUBJECT_KEY_LEN];
} locate_ctx_t;

static void locate_start(locate_ctx_t *c)
{
    const Domicile__V1__LocateRequest *req =
        (const Domicile__V1__LocateRequest *)dm_call_request(c->call);
    const char *vals[2] = {(const char *)c->sk, req->customer_id};
    int lens[2] = {DM_SUBJECT_KEY_LEN, 0};
    int fmts[2] = {1, 0};
    dm_fanout_start(c->call, APP(c->call)->regions, DM_SQL_LOCATE, 2, vals, lens, fmts, locate_done,
                    c->call);
}

static void locate_resolved(void *arg, dm_region_t *region, const char *state, dm_status_t *err)
{
    locate_ctx_t *c = arg;
    (void)region;
    (void)state;
    if (err)
        dm_call_finish(c->call, err);
    else
        locate_start(c);
}

void dm_dsr_locate(dm_call_t *call)
{
    const Domicile__V1__LocateRequest *req =
        (const Domicile__V1__LocateRequest *)dm_call_request(call);
    const dm_principal_t *p = dm_call_principal_of(call);
    unsigned char sk[DM_SUBJECT_KEY_LEN];
    bool has;
    dm_status_t *st = dm_subject_to_key(APP(call), "subject", req->subject, &has, sk);
    if (!st && !has)
        st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "subject: required");
    if (!st && req->customer_id[0])
        st = dm_check_customer_id("customer_id", req->customer_id);
    if (!st && p && !p->all_tenants && !req->customer_id[0])
        st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                           "customer_id: required for a principal whose scope is limited");
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    locate_ctx_t *c = dm_calloc(1, sizeof(*c));
    c->call = call;
    memcpy(c->sk, sk, sizeof(sk));
    dm_call_set_data(call, c, free);
    /* One customer: one that exists and is in scope (else NOT_FOUND, as for every request),
     * so that a mistyped id is not answered "nothing anywhere". */
    if (req->customer_id[0])
        dm_api_resolve(call, req->customer_id, locate_resolved, c);
    else
        locate_start(c);
}

/* ---- Export -------------------------------------------------------------------------- */

#define EXPORT_CHUNK   16 /* records per query: with payloads, at most 16 MiB in memory */
#define EXPORT_PURPOSE "dsr-export"

typedef struct export_ctx {
    dm_call_t *call;
    dm_app_t *app;
    const Domicile__V1__ExportRequest *req;
    status_ctx_t st;              /* the request as stored (kind export) */
    size_t order[DM_MAX_REGIONS]; /* region indexes in region code order */
    size_t n, pos;                /* position in `order` */
    bool unreachable[DM_MAX_REGIONS];
    int64_t records[DM_MAX_REGIONS], bytes[DM_MAX_REGIONS];
    EVP_MD_CTX *sha;
    dm_job_t job;
    dm_xfer_t xfer;
    PGresult *held;
    char after_customer[DM_CUSTOMER_ID_MAX + 1];
    char after_record[DM_RECORD_ID_MAX + 1];
    char limit_s[16];
    atomic_bool awaiting_drain;
    char count_s[24];
    bool part;                  /* PeerService/ExportPart: this region's part, for a peer */
    struct export_parts *parts; /* the peer regions' parts, all started at once */
    bool relaying;              /* the region at `pos` is a peer's part being relayed */
    pthread_mutex_t log_mu;     /* a chunk's ledger entries, one per customer */
    int log_pending;
    dm_status_t *log_err;
} export_ctx_t;

/*
 * The peer regions' parts of an export run at once (one wide-area round for all of them),
 * each stream holding at most one message until its turn comes: the lines still go out in
 * region order. Shared by the export and the streams (refs), so that a stream that ends after
 * the call is gone finds its state.
 */
typedef struct export_part {
    struct export_parts *set;
    size_t i;                       /* region index */
    dm_peer_stream_t *s;            /* set with the first message */
    ProtobufCMessage *held;         /* the next line, waiting for its turn */
    bool started, ended, end_taken; /* end_taken: the relay moved past it (once) */
    dm_status_t *err;
} export_part_t;

struct export_parts {
    pthread_mutex_t mu;
    atomic_int refs;
    export_ctx_t *e; /* NULL once the export is gone */
    export_part_t part[DM_MAX_REGIONS];
};

static void parts_unref(struct export_parts *ps)
{
    if (!ps || atomic_fetch_sub(&ps->refs, 1) != 1)
        return;
    for (size_t i = 0; i < DM_MAX_REGIONS; i++) {
        if (ps->part[i].held)
            protobuf_c_message_free_unpacked(ps->part[i].held, NULL);
        dm_status_free(ps->part[i].err);
    }
    pthread_mutex_destroy(&ps->mu);
    free(ps);
}

static void export_free(void *p)
{
    export_ctx_t *e = p;
    pthread_mutex_destroy(&e->log_mu);
    dm_status_free(e->log_err);
    if (e->parts) {
        /* Streams still running end on their own (cancelled with the call). */
        pthread_mutex_lock(&e->parts->mu);
        e->parts->e = NULL;
        for (size_t i = 0; i < DM_MAX_REGIONS; i++)
            if (e->parts->part[i].s && !e->parts->part[i].ended)
                dm_peer_stream_cancel(e->parts->part[i].s);
        pthread_mutex_unlock(&e->parts->mu);
        parts_unref(e->parts);
    }
    EVP_MD_CTX_free(e->sha);
    PQclear(e->held);
    free(e->st.reason);
    free(e);
}

static void export_region(export_ctx_t *e);
static void export_next_chunk(export_ctx_t *e);

static char *b64(const unsigned char *in, size_t n)
{
    char *out = dm_malloc(4 * ((n + 2) / 3) + 1);
    EVP_EncodeBlock((unsigned char *)out, in, (int)n);
    return out;
}

static bool textual(const char *content_type, const unsigned char *p, size_t n)
{
    bool text_type = strncmp(content_type, "text/", 5) == 0 ||
                     strncmp(content_type, "application/json", 16) == 0;
    return text_type && dm_utf8_valid((const char *)p, n);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* One JSON Lines line for a record (keys in the order the proto states). Caller frees. */
static char *export_line(const char *region, const char *customer, const char *record_id,
                         const char *kind, const char *content_type, const char *labels_json,
                         size_t labels_len, int64_t version, int64_t created, int64_t updated,
                         bool restricted, const unsigned char *payload, size_t payload_len)
{
    json_t *o = json_object(), *labels = json_object();
    json_error_t jerr;
    json_t *stored = json_loadb(labels_json, labels_len, 0, &jerr);
    if (stored && json_is_object(stored)) {
        size_t n = json_object_size(stored), k = 0;
        const char **keys = dm_calloc(n + 1, sizeof(char *));
        const char *key;
        json_t *val;
        json_object_foreach(stored, key, val) keys[k++] = key;
        qsort(keys, n, sizeof(char *), cmp_str);
        for (size_t i = 0; i < n; i++)
            json_object_set(labels, keys[i], json_object_get(stored, keys[i]));
        free(keys);
    }
    json_decref(stored);
    json_object_set_new(o, "region", json_string(region));
    json_object_set_new(o, "customer_id", json_string(customer));
    json_object_set_new(o, "record_id", json_string(record_id));
    json_object_set_new(o, "kind", json_string(kind));
    json_object_set_new(o, "content_type", json_string(content_type));
    json_object_set_new(o, "labels", labels);
    json_object_set_new(o, "version", json_integer(version));
    json_object_set_new(o, "created_at_unix_ms", json_integer(created));
    json_object_set_new(o, "updated_at_unix_ms", json_integer(updated));
    json_object_set_new(o, "restricted", json_boolean(restricted));
    if (textual(content_type, payload, payload_len)) {
        json_object_set_new(o, "payload_text", json_stringn((const char *)payload, payload_len));
    } else {
        char *enc = b64(payload, payload_len);
        json_object_set_new(o, "payload_base64", json_string(enc));
        free(enc);
    }
    char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    char *line = dm_sprintf("%s\n", s);
    free(s);
    return line;
}

static void export_manifest(export_ctx_t *e)
{
    Domicile__V1__ExportManifest m = DOMICILE__V1__EXPORT_MANIFEST__INIT;
    Domicile__V1__RegionCount counts[DM_MAX_REGIONS], *cp[DM_MAX_REGIONS];
    char *unreachable[DM_MAX_REGIONS];
    unsigned char digest[32];
    char hex[65];
    unsigned int dl = 32;
    EVP_DigestFinal_ex(e->sha, digest, &dl);
    dm_hex_encode(digest, 32, hex);
    for (size_t k = 0; k < e->n; k++) {
        size_t i = e->order[k];
        const char *code = dm_region_code(dm_regions_at(e->app->regions, i));
        if (e->unreachable[i]) {
            unreachable[m.n_unreachable_regions++] = (char *)code;
            continue;
        }
        Domicile__V1__RegionCount *c = &counts[m.n_regions];
        domicile__v1__region_count__init(c);
        c->region = (char *)code;
        c->records = e->records[i];
        c->bytes = e->bytes[i];
        m.total_records += c->records;
        m.total_bytes += c->bytes;
        cp[m.n_regions++] = c;
    }
    m.request_id = e->st.request_id;
    m.regions = cp;
    m.unreachable_regions = unreachable;
    m.sha256_hex = hex;
    m.generated_at_unix_ms = dm_now_ms();
    m.complete = m.n_unreachable_regions == 0;
    Domicile__V1__ExportResponse chunk = DOMICILE__V1__EXPORT_RESPONSE__INIT;
    chunk.item_case = DOMICILE__V1__EXPORT_RESPONSE__ITEM_MANIFEST;
    chunk.manifest = &m;
    dm_call_send(e->call, &chunk.base);
    dm_call_finish(e->call, NULL);
}

/* A region could not deliver its part: fail the stream, or note it and go on. */
static void export_region_failed(export_ctx_t *e, dm_status_t *err)
{
    size_t i = e->order[e->pos];
    if (e->part) {
        dm_call_finish(e->call, err); /* the peer that asked decides about a partial export */
        return;
    }
    if (!e->req->allow_partial || err->code == GRPC_STATUS_PERMISSION_DENIED ||
        err->code == GRPC_STATUS_CANCELLED || err->code == GRPC_STATUS_DEADLINE_EXCEEDED) {
        dm_status_t *st = err->code == GRPC_STATUS_UNAVAILABLE
                              ? dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                              "region \"%s\" is unavailable: its part of the "
                                              "export cannot be sent (retry, or set "
                                              "allow_partial)",
                                              dm_region_code(dm_regions_at(e->app->regions, i)))
                              : NULL;
        if (st)
            dm_status_free(err);
        dm_call_finish(e->call, st ? st : err);
        return;
    }
    dm_status_free(err);
    e->unreachable[i] = true;
    e->pos++;
    export_region(e);
}

static void export_leg_finished(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    export_ctx_t *e = job->arg;
    dm_status_free(err); /* the part was sent; a lost leg update only leaves it RUNNING */
    e->pos++;
    export_region(e);
}

static void export_emit(export_ctx_t *e)
{
    size_t i = e->order[e->pos];
    dm_region_t *r = dm_regions_at(e->app->regions, i);
    const char *code = dm_region_code(r);
    PGresult *res = e->held;
    int rows = PQntuples(res), to_send = rows > EXPORT_CHUNK ? EXPORT_CHUNK : rows;
    for (int k = 0; k < to_send; k++) {
        int len, sk_len, w_len, ct_len, labels_len;
        const char *customer = dm_pg_bytes(res, k, 0, &len);
        const char *record_id = dm_pg_bytes(res, k, 1, &len);
        const unsigned char *sk = (const unsigned char *)dm_pg_bytes(res, k, 3, &sk_len);
        const unsigned char *w = (const unsigned char *)dm_pg_bytes(res, k, 13, &w_len);
        const unsigned char *ct = (const unsigned char *)dm_pg_bytes(res, k, 12, &ct_len);
        unsigned char dek[DM_KEY_LEN], *pt = NULL;
        size_t aad_len, pt_len = 0;
        unsigned char *aad;
        dm_status_t *st = dm_api_data_key(e->app, r, customer, sk, (size_t)sk_len,
                                          dm_pg_int8(res, k, 11), w, (size_t)w_len, dek);
        if (!st) {
            aad = dm_record_aad(code, customer, record_id, &aad_len);
            st = dm_open(dek, aad, aad_len, ct, (size_t)ct_len, &pt, &pt_len);
            free(aad);
        }
        OPENSSL_cleanse(dek, sizeof(dek));
        if (st) {
            dm_error("dsr", "region %s: a record of the export does not decrypt", code);
            dm_call_finish(e->call, st);
            return;
        }
        const char *labels = dm_pg_jsonb(res, k, 5, &labels_len);
        char *line = export_line(code, customer, record_id, dm_pg_bytes(res, k, 2, &len),
                                 dm_pg_bytes(res, k, 4, &len), labels, (size_t)labels_len,
                                 dm_pg_int8(res, k, 6), dm_pg_time_ms(res, k, 8),
                                 dm_pg_time_ms(res, k, 9), dm_pg_bool(res, k, 7), pt, pt_len);
        OPENSSL_cleanse(pt, pt_len);
        free(pt);
        size_t line_len = strlen(line);
        EVP_DigestUpdate(e->sha, line, line_len);
        e->records[i]++;
        e->bytes[i] += (int64_t)line_len;
        if (e->part) {
            Domicile__Peer__V1__ExportPartResponse pr =
                DOMICILE__PEER__V1__EXPORT_PART_RESPONSE__INIT;
            pr.line.data = (uint8_t *)line;
            pr.line.len = line_len;
            pr.record_id = (char *)record_id;
            pr.customer_id = (char *)customer;
            bool sent = dm_call_send(e->call, &pr.base);
            OPENSSL_cleanse(line, line_len);
            free(line);
            if (k == to_send - 1) {
                snprintf(e->after_customer, sizeof(e->after_customer), "%s", customer);
                snprintf(e->after_record, sizeof(e->after_record), "%s", record_id);
            }
            if (!sent) {
                dm_call_finish(e->call, dm_status_new(GRPC_STATUS_CANCELLED, "stream cancelled"));
                return;
            }
            continue;
        }
        Domicile__V1__ExportLine el = DOMICILE__V1__EXPORT_LINE__INIT;
        Domicile__V1__ExportResponse chunk = DOMICILE__V1__EXPORT_RESPONSE__INIT;
        el.line.data = (uint8_t *)line;
        el.line.len = line_len;
        el.region = (char *)code;
        el.record_id = (char *)record_id;
        el.customer_id = (char *)customer;
        chunk.item_case = DOMICILE__V1__EXPORT_RESPONSE__ITEM_LINE;
        chunk.line = &el;
        bool alive = dm_call_send(e->call, &chunk.base);
        OPENSSL_cleanse(line, line_len);
        free(line);
        if (k == to_send - 1) {
            snprintf(e->after_customer, sizeof(e->after_customer), "%s", customer);
            snprintf(e->after_record, sizeof(e->after_record), "%s", record_id);
        }
        if (!alive) {
            dm_call_finish(e->call, dm_status_new(GRPC_STATUS_CANCELLED, "stream cancelled"));
            return;
        }
    }
    PQclear(e->held);
    e->held = NULL;
    if (rows > EXPORT_CHUNK) {
        atomic_store(&e->awaiting_drain, true);
        if (dm_call_queued(e->call) == 0 && atomic_exchange(&e->awaiting_drain, false))
            export_next_chunk(e);
        return;
    }
    /* This region's part is complete: finish its leg there. */
    snprintf(e->count_s, sizeof(e->count_s), "%lld", (long long)e->records[i]);
    memset(&e->job, 0, sizeof(e->job));
    e->job.stmt = DM_SQL_DSR_FINISH_EXPORT;
    e->job.done = export_leg_finished;
    e->job.arg = e;
    dm_job_param_text(&e->job, 0, e->st.request_id);
    dm_job_param_text(&e->job, 1, e->count_s);
    dm_job_param_text(&e->job, 2, "true");
    dm_job_param_text(&e->job, 3, "");
    dm_region_submit(r, &e->job);
}

static void export_logged(void *arg, dm_status_t *err)
{
    export_ctx_t *e = arg;
    if (err) {
        export_region_failed(e, err); /* not logged: this part is not sent */
        return;
    }
    export_emit(e);
}

/* One customer's entry of a chunk is committed (or failed); the chunk goes on when all are,
 * and is not sent if any failed. */
static void export_group_logged(void *arg, dm_status_t *err)
{
    export_ctx_t *e = arg;
    pthread_mutex_lock(&e->log_mu);
    if (err && !e->log_err)
        e->log_err = err;
    else
        dm_status_free(err);
    bool last = --e->log_pending == 0;
    dm_status_t *first = last ? e->log_err : NULL;
    if (last)
        e->log_err = NULL;
    pthread_mutex_unlock(&e->log_mu);
    if (last)
        export_logged(e, first);
}

static void export_chunk_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    export_ctx_t *e = job->arg;
    if (err) {
        export_region_failed(e, err);
        return;
    }
    e->held = PQcopyResult(res, PG_COPYRES_ATTRS | PG_COPYRES_TUPLES);
    int rows = PQntuples(res), to_send = rows > EXPORT_CHUNK ? EXPORT_CHUNK : rows;
    if (!e->xfer.cross || to_send == 0) {
        export_emit(e);
        return;
    }
    /* The part leaves its region: one ledger entry per customer whose records are in the
     * chunk (rows come in customer order), all committed before any line is sent, so that
     * "every transfer of customer C's data" is one indexed query, exports included. */
    pthread_mutex_lock(&e->log_mu);
    e->log_pending = 1;
    pthread_mutex_unlock(&e->log_mu);
    for (int first = 0; first < to_send;) {
        int len, clen;
        const char *customer = dm_pg_bytes(res, first, 0, &clen);
        int end = first + 1;
        while (end < to_send && PQgetlength(res, end, 0) == clen &&
               memcmp(dm_pg_bytes(res, end, 0, &len), customer, (size_t)clen) == 0)
            end++;
        int64_t bytes = 0;
        size_t ids_len = 1;
        for (int k = first; k < end; k++) {
            bytes += dm_pg_int4(res, k, 10);
            ids_len += (size_t)PQgetlength(res, k, 1) + 1;
        }
        char *ids = dm_calloc(1, ids_len), *p = ids;
        for (int k = first; k < end; k++) {
            const char *id = dm_pg_bytes(res, k, 1, &len);
            if (k > first)
                *p++ = '\x1f';
            memcpy(p, id, (size_t)len);
            p += len;
        }
        dm_xfer_t x = e->xfer;
        x.customer_id = customer;
        pthread_mutex_lock(&e->log_mu);
        e->log_pending++;
        pthread_mutex_unlock(&e->log_mu);
        dm_xfer_log(e->call, &x, end - first, bytes, ids, export_group_logged, e);
        free(ids);
        first = end;
    }
    export_group_logged(e, NULL);
}

static void export_next_chunk(export_ctx_t *e)
{
    dm_region_t *r = dm_regions_at(e->app->regions, e->order[e->pos]);
    memset(&e->job, 0, sizeof(e->job));
    e->job.stmt = DM_SQL_EXPORT_RECORDS;
    e->job.done = export_chunk_done;
    e->job.arg = e;
    e->job.owner = e->call;
    snprintf(e->limit_s, sizeof(e->limit_s), "%d", EXPORT_CHUNK + 1);
    dm_job_param_bin(&e->job, 0, e->st.sk, DM_SUBJECT_KEY_LEN);
    dm_job_param_text(&e->job, 1, e->st.customer);
    dm_job_param_text(&e->job, 2, e->after_customer);
    dm_job_param_text(&e->job, 3, e->after_record);
    dm_job_param_text(&e->job, 4, e->limit_s);
    dm_region_submit(r, &e->job);
}

static void relay_part(export_ctx_t *e);

static void export_drained(dm_call_t *call, void *arg)
{
    export_ctx_t *e = arg;
    if (dm_call_queued(call) == 0 && atomic_exchange(&e->awaiting_drain, false)) {
        if (e->relaying) {
            export_part_t *pt = &e->parts->part[e->order[e->pos]];
            dm_peer_stream_next(pt->s);
        } else {
            export_next_chunk(e);
        }
    }
}

/* The region at `pos` is a peer's: relay what its stream holds, or move on once it ended. */
static void relay_part(export_ctx_t *e)
{
    struct export_parts *ps = e->parts;
    size_t i = e->order[e->pos];
    export_part_t *pt = &ps->part[i];
    pthread_mutex_lock(&ps->mu);
    ProtobufCMessage *msg = pt->held;
    pt->held = NULL;
    bool ended = !msg && pt->ended && !pt->end_taken;
    dm_status_t *err = ended ? pt->err : NULL;
    if (ended) {
        pt->err = NULL;
        pt->end_taken = true;
        e->relaying = false;
    }
    pthread_mutex_unlock(&ps->mu);
    if (ended) {
        if (err) {
            export_region_failed(e, err);
            return;
        }
        e->pos++;
        export_region(e);
        return;
    }
    if (!msg)
        return; /* its next message, or its end, calls again */
    const Domicile__Peer__V1__ExportPartResponse *m =
        (const Domicile__Peer__V1__ExportPartResponse *)msg;
    EVP_DigestUpdate(e->sha, m->line.data, m->line.len);
    e->records[i]++;
    e->bytes[i] += (int64_t)m->line.len;
    Domicile__V1__ExportLine el = DOMICILE__V1__EXPORT_LINE__INIT;
    Domicile__V1__ExportResponse chunk = DOMICILE__V1__EXPORT_RESPONSE__INIT;
    el.line = m->line;
    el.region = (char *)dm_region_code(dm_regions_at(e->app->regions, i));
    el.record_id = m->record_id;
    el.customer_id = m->customer_id;
    chunk.item_case = DOMICILE__V1__EXPORT_RESPONSE__ITEM_LINE;
    chunk.line = &el;
    bool alive = dm_call_send(e->call, &chunk.base);
    OPENSSL_cleanse(m->line.data, m->line.len);
    protobuf_c_message_free_unpacked(msg, NULL);
    if (!alive) {
        /* Its end (CANCELLED) comes next and finishes the call. */
        dm_peer_stream_cancel(pt->s);
        dm_peer_stream_next(pt->s);
        return;
    }
    atomic_store(&e->awaiting_drain, true);
    if (dm_call_queued(e->call) == 0 && atomic_exchange(&e->awaiting_drain, false))
        dm_peer_stream_next(pt->s);
}

static void part_msg(void *arg, dm_peer_stream_t *s, ProtobufCMessage *msg)
{
    export_part_t *pt = arg;
    struct export_parts *ps = pt->set;
    pthread_mutex_lock(&ps->mu);
    export_ctx_t *e = ps->e;
    pt->s = s;
    if (!e) {
        pthread_mutex_unlock(&ps->mu);
        protobuf_c_message_free_unpacked(msg, NULL);
        dm_peer_stream_cancel(s);
        dm_peer_stream_next(s);
        return;
    }
    pt->held = msg;
    bool turn = e->relaying && e->order[e->pos] == pt->i;
    pthread_mutex_unlock(&ps->mu);
    if (turn)
        relay_part(e);
}

static void part_end(void *arg, dm_status_t *err)
{
    export_part_t *pt = arg;
    struct export_parts *ps = pt->set;
    pthread_mutex_lock(&ps->mu);
    export_ctx_t *e = ps->e;
    pt->ended = true;
    pt->err = err;
    bool turn = e && e->relaying && e->order[e->pos] == pt->i;
    pthread_mutex_unlock(&ps->mu);
    if (turn)
        relay_part(e);
    parts_unref(ps);
}

/* Start every peer region's part now: they are gated, logged and read in their regions at
 * once, while the parts before them are relayed. */
static void export_start_parts(export_ctx_t *e)
{
    struct export_parts *ps = dm_calloc(1, sizeof(*ps));
    pthread_mutex_init(&ps->mu, NULL);
    atomic_init(&ps->refs, 1);
    ps->e = e;
    e->parts = ps;
    Domicile__Peer__V1__ExportPartRequest pr = DOMICILE__PEER__V1__EXPORT_PART_REQUEST__INIT;
    pr.request_id = e->st.request_id;
    pr.subject_key.data = e->st.sk;
    pr.subject_key.len = DM_SUBJECT_KEY_LEN;
    pr.customer_id = e->st.customer;
    for (size_t k = 0; k < e->n; k++) {
        size_t i = e->order[k];
        dm_region_t *r = dm_regions_at(e->app->regions, i);
        if (dm_region_is_local(r) || e->unreachable[i])
            continue;
        export_part_t *pt = &ps->part[i];
        pt->set = ps;
        pt->i = i;
        pt->started = true;
        atomic_fetch_add(&ps->refs, 1);
        dm_peer_stream(e->app->peers, r, e->call, EXPORT_PART_PATH, &pr.base,
                       &domicile__peer__v1__export_part_response__descriptor, part_msg, part_end,
                       pt);
    }
}

static void export_gated(void *arg, dm_status_t *err)
{
    export_ctx_t *e = arg;
    if (err) {
        export_region_failed(e, err);
        return;
    }
    export_next_chunk(e);
}

static void export_region(export_ctx_t *e)
{
    while (e->pos < e->n && e->unreachable[e->order[e->pos]])
        e->pos++;
    if (e->pos == e->n) {
        if (e->part)
            dm_call_finish(e->call, NULL);
        else
            export_manifest(e);
        return;
    }
    dm_region_t *r = dm_regions_at(e->app->regions, e->order[e->pos]);
    if (!dm_region_is_local(r) && !e->part) {
        pthread_mutex_lock(&e->parts->mu);
        e->relaying = true;
        pthread_mutex_unlock(&e->parts->mu);
        relay_part(e);
        return;
    }
    e->after_customer[0] = '\0';
    e->after_record[0] = '\0';
    memset(&e->xfer, 0, sizeof(e->xfer));
    e->xfer.dir = DM_TRANSFER_READ;
    e->xfer.method = "Export";
    e->xfer.customer_id = e->st.customer[0] ? e->st.customer : "*";
    e->xfer.subject_key = e->st.sk;
    snprintf(e->xfer.request_id, sizeof(e->xfer.request_id), "%s", e->st.request_id);
    dm_xfer_gate(e->call, r, &e->xfer, export_gated, e);
}

static void export_received(dm_fanout_t *f, void *arg)
{
    export_ctx_t *e = arg;
    size_t stored = 0;
    bool reused = false;
    for (size_t i = 0; i < f->n; i++) {
        if (f->err[i]) {
            e->unreachable[i] = true;
            continue;
        }
        int len;
        reused = reused || strcmp(dm_pg_bytes(f->res[i], 0, 0, &len), "request_id_reused") == 0;
        stored++;
    }
    dm_fanout_free(f);
    if (reused) {
        dm_call_finish(e->call, dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                              "request_id: already used for a different "
                                              "request"));
        return;
    }
    if (stored == 0) {
        dm_call_finish(e->call, dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                              "no region could store the request; retry"));
        return;
    }
    for (size_t i = 0; i < e->n && !e->req->allow_partial; i++) {
        if (e->unreachable[i]) {
            dm_call_finish(e->call,
                           dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                         "region \"%s\" is unavailable: the export would be "
                                         "incomplete (retry, or set allow_partial)",
                                         dm_region_code(dm_regions_at(e->app->regions, i))));
            return;
        }
    }
    dm_call_on_drain(e->call, export_drained, e);
    export_start_parts(e);
    export_region(e);
}

static void export_resolved(void *arg, dm_region_t *region, const char *state, dm_status_t *err)
{
    export_ctx_t *e = arg;
    (void)region;
    (void)state;
    if (err)
        dm_call_finish(e->call, err);
    else
        receive_fanout(&e->st, false, export_received, e);
}

/* The export's context, owned by the call from here on. */
static export_ctx_t *export_new(dm_call_t *call, dm_app_t *app)
{
    export_ctx_t *e = dm_calloc(1, sizeof(*e));
    pthread_mutex_init(&e->log_mu, NULL);
    e->call = call;
    e->app = app;
    e->st.call = call;
    e->st.app = app;
    e->st.kind = DOMICILE__V1__DSR_KIND__DSR_KIND_EXPORT;
    e->sha = EVP_MD_CTX_new();
    EVP_DigestInit_ex(e->sha, EVP_sha256(), NULL);
    dm_call_set_data(call, e, export_free);
    return e;
}

void dm_dsr_export(dm_call_t *call)
{
    const Domicile__V1__ExportRequest *req =
        (const Domicile__V1__ExportRequest *)dm_call_request(call);
    dm_app_t *app = APP(call);
    const dm_principal_t *p = dm_call_principal_of(call);
    dm_status_t *st;
    bool has;
    export_ctx_t *e = export_new(call, app);
    e->req = req;
    if ((st = dm_check_request_id("request_id", req->request_id)) ||
        (st = dm_check_text("reason", req->reason, 0, REASON_MAX)) ||
        (req->customer_id[0] && (st = dm_check_customer_id("customer_id", req->customer_id))) ||
        (st = dm_subject_to_key(app, "subject", req->subject, &has, e->st.sk))) {
        dm_call_finish(call, st);
        return;
    }
    if (!has || (p && !p->all_tenants && !req->customer_id[0])) {
        dm_call_finish(call, !has ? dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "subject: required")
                                  : dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                                  "customer_id: required for a principal whose "
                                                  "scope is limited"));
        return;
    }
    /* Each part that leaves its region is a transfer for the purpose of the export. */
    dm_call_set_purpose(call, EXPORT_PURPOSE);
    snprintf(e->st.request_id, sizeof(e->st.request_id), "%s", req->request_id);
    snprintf(e->st.customer, sizeof(e->st.customer), "%s", req->customer_id);
    e->st.reason = dm_strdup(req->reason);
    e->st.received = dm_now_ms();
    e->st.due = e->st.received + POLICY_DAYS * DAY_MS;
    e->st.gdpr_due = dm_add_months_ms(e->st.received, 1);
    DM_FINGERPRINT(e->st.fp, DM_AAD_STR("dsr"), DM_AAD_STR("export"),
                   DM_AAD_BYTES(e->st.sk, sizeof(e->st.sk)), DM_AAD_STR(e->st.customer),
                   DM_AAD_STR(""));
    e->n = dm_regions_count(app->regions);
    for (size_t i = 0; i < e->n; i++)
        e->order[i] = i;
    qsort_r(e->order, e->n, sizeof(size_t), cmp_region_code, app->regions);
    /* One customer: one that exists and is in scope (else NOT_FOUND, nothing stored), so that
     * a mistyped id is not exported as "no data anywhere". */
    if (e->st.customer[0])
        dm_api_resolve(call, e->st.customer, export_resolved, e);
    else
        receive_fanout(&e->st, false, export_received, e);
}

void dm_peer_export_part(dm_call_t *call)
{
    const Domicile__Peer__V1__ExportPartRequest *req =
        (const Domicile__Peer__V1__ExportPartRequest *)dm_call_request(call);
    dm_app_t *app = APP(call);
    const dm_principal_t *p = dm_call_principal_of(call);
    dm_status_t *st = NULL;
    size_t n = 0;
    const dm_method_t *methods = dm_api_methods(&n);
    unsigned roles = 0;
    for (size_t i = 0; i < n; i++)
        if (methods[i].handler == dm_dsr_export)
            roles = methods[i].roles;
    if (!p || !(p->roles & roles))
        st = dm_status_new(GRPC_STATUS_PERMISSION_DENIED, "the asserted principal may not export");
    else if ((st = dm_check_request_id("request_id", req->request_id)) ||
             (req->customer_id[0] && (st = dm_check_customer_id("customer_id", req->customer_id))))
        ;
    else if (req->subject_key.len != DM_SUBJECT_KEY_LEN)
        st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "subject_key: must be %d bytes",
                           DM_SUBJECT_KEY_LEN);
    else if ((!p->all_tenants && !req->customer_id[0]) ||
             (req->customer_id[0] && !dm_principal_in_scope(p, req->customer_id)))
        st = req->customer_id[0]
                 ? dm_status_new(GRPC_STATUS_NOT_FOUND, "customer not found")
                 : dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                 "customer_id: required for a principal whose scope is limited");
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    export_ctx_t *e = export_new(call, app);
    e->part = true;
    dm_call_set_purpose(call, EXPORT_PURPOSE);
    snprintf(e->st.request_id, sizeof(e->st.request_id), "%s", req->request_id);
    snprintf(e->st.customer, sizeof(e->st.customer), "%s", req->customer_id);
    memcpy(e->st.sk, req->subject_key.data, DM_SUBJECT_KEY_LEN);
    for (size_t i = 0; i < dm_regions_count(app->regions); i++)
        if (dm_region_is_local(dm_regions_at(app->regions, i)))
            e->order[e->n++] = i;
    dm_call_on_drain(call, export_drained, e);
    export_region(e);
}
