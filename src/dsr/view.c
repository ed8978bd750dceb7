/*
 * A data-subject request as every region describes it: the DSR_STATUS rows of a fan-out made
 * into one domicile.v1.DsrRequest (header, legs in region order, overall state, deadlines).
 * Read by the SubjectRightsService handlers (src/api/subject_rights.c) and the webhook thread
 * (src/dsr/webhook.c).
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "domicile/clock.h"
#include "domicile/crypto.h"
#include "domicile/dsr.h"
#include "domicile/dsr_view.h"
#include "domicile/mem.h"
#include "domicile/validate.h"

const char *const dm_dsr_kind_names[DM_DSR_KINDS] = {
    [DOMICILE__V1__DSR_KIND__DSR_KIND_ERASE] = "erase",
    [DOMICILE__V1__DSR_KIND__DSR_KIND_EXPORT] = "export",
    [DOMICILE__V1__DSR_KIND__DSR_KIND_RESTRICT] = "restrict",
    [DOMICILE__V1__DSR_KIND__DSR_KIND_UNRESTRICT] = "unrestrict",
    [DOMICILE__V1__DSR_KIND__DSR_KIND_OBJECT] = "object",
    [DOMICILE__V1__DSR_KIND__DSR_KIND_WITHDRAW] = "withdraw",
};

static int kind_from_name(const char *s, int len)
{
    for (size_t i = 1; i < (size_t)DM_DSR_KINDS; i++)
        if ((int)strlen(dm_dsr_kind_names[i]) == len &&
            memcmp(dm_dsr_kind_names[i], s, (size_t)len) == 0)
            return (int)i;
    return 0;
}

int64_t dm_add_months_ms(int64_t ms, int months)
{
    /* Calendar months (GDPR Art. 12(3)): 31 Jan + 1 month = 28/29 Feb, never 2/3 March. */
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    int day = tm.tm_mday;
    tm.tm_mday = 1;
    tm.tm_mon += months;
    time_t first = timegm(&tm);
    gmtime_r(&first, &tm);
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int y = tm.tm_year + 1900;
    int last =
        mdays[tm.tm_mon] + (tm.tm_mon == 1 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0));
    tm.tm_mday = day < last ? day : last;
    return (int64_t)timegm(&tm) * 1000 + ms % 1000;
}

/* ---- the status of a request, from every region ------------------------------------- */

static int leg_state(const char *s)
{
    if (strcmp(s, "pending") == 0)
        return DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_PENDING;
    if (strcmp(s, "running") == 0)
        return DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_RUNNING;
    if (strcmp(s, "done") == 0)
        return DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_DONE;
    if (strcmp(s, "failed") == 0)
        return DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_FAILED;
    return DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_SKIPPED;
}

/* Fill the header from a DSR_COLUMNS row (pointers into `res`). */
void dm_dsr_view_header(dm_dsr_view_t *v, const PGresult *res, int row)
{
    Domicile__V1__DsrRequest *q = &v->req;
    int len;
    q->request_id = (char *)dm_pg_bytes(res, row, DM_DC_REQUEST_ID, &len);
    const char *kind = dm_pg_bytes(res, row, DM_DC_KIND, &len);
    q->kind = kind_from_name(kind, len);
    const char *sk = dm_pg_bytes(res, row, DM_DC_SUBJECT, &len);
    if (len == DM_SUBJECT_KEY_LEN)
        dm_hex_encode((const unsigned char *)sk, DM_SUBJECT_KEY_LEN, v->sk_hex);
    q->subject_key_hex = v->sk_hex;
    q->customer_id = (char *)dm_pg_bytes(res, row, DM_DC_CUSTOMER, &len);
    q->purpose = (char *)dm_pg_bytes(res, row, DM_DC_PURPOSE, &len);
    q->reason = (char *)dm_pg_bytes(res, row, DM_DC_REASON, &len);
    q->principal = (char *)dm_pg_bytes(res, row, DM_DC_PRINCIPAL, &len);
    q->received_at_unix_ms = dm_pg_time_ms(res, row, DM_DC_RECEIVED);
    q->due_at_unix_ms = dm_pg_time_ms(res, row, DM_DC_DUE);
    q->gdpr_due_at_unix_ms = dm_pg_time_ms(res, row, DM_DC_GDPR_DUE);
    q->extended = !dm_pg_isnull(res, row, DM_DC_EXTENDED_AT);
    q->extended_due_at_unix_ms = dm_pg_time_ms(res, row, DM_DC_EXTENDED_DUE);
    q->extended_at_unix_ms = dm_pg_time_ms(res, row, DM_DC_EXTENDED_AT);
    q->extension_reason = dm_pg_isnull(res, row, DM_DC_EXTENSION_REASON)
                              ? ""
                              : (char *)dm_pg_bytes(res, row, DM_DC_EXTENSION_REASON, &len);
    const char *wh = dm_pg_bytes(res, row, DM_DC_WEBHOOK_STATE, &len);
    domicile__v1__webhook_delivery__init(&v->webhook);
    v->webhook.state =
        strcmp(wh, "pending") == 0     ? DOMICILE__V1__WEBHOOK_STATE__WEBHOOK_STATE_PENDING
        : strcmp(wh, "delivered") == 0 ? DOMICILE__V1__WEBHOOK_STATE__WEBHOOK_STATE_DELIVERED
        : strcmp(wh, "failed") == 0    ? DOMICILE__V1__WEBHOOK_STATE__WEBHOOK_STATE_FAILED
                                       : DOMICILE__V1__WEBHOOK_STATE__WEBHOOK_STATE_NOT_CONFIGURED;
    v->webhook.attempts = dm_pg_int4(res, row, DM_DC_WEBHOOK_ATTEMPTS);
    v->webhook.last_error = (char *)dm_pg_bytes(res, row, DM_DC_WEBHOOK_ERROR, &len);
    /* The column keeps its last value; an attempt is planned only while pending or failed. */
    if (v->webhook.state == DOMICILE__V1__WEBHOOK_STATE__WEBHOOK_STATE_PENDING ||
        v->webhook.state == DOMICILE__V1__WEBHOOK_STATE__WEBHOOK_STATE_FAILED)
        v->webhook.next_attempt_at_unix_ms = dm_pg_time_ms(res, row, DM_DC_WEBHOOK_NEXT);
    v->webhook.delivered_at_unix_ms = dm_pg_time_ms(res, row, DM_DC_WEBHOOK_DELIVERED);
    q->webhook = &v->webhook;
}

void dm_dsr_view_leg(dm_dsr_leg_view_t *l, const PGresult *res, int row)
{
    int len;
    l->leg.state = leg_state(dm_pg_bytes(res, row, DM_DC_STATE, &len));
    l->leg.attempts = dm_pg_int4(res, row, DM_DC_ATTEMPTS);
    l->leg.last_error = (char *)dm_pg_bytes(res, row, DM_DC_LAST_ERROR, &len);
    /* The column keeps its last value (an export's finished leg: infinity); an attempt is
     * planned only for a leg that waits for a worker. */
    if (l->leg.state == DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_PENDING ||
        l->leg.state == DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_FAILED)
        l->leg.next_attempt_at_unix_ms = dm_pg_time_ms(res, row, DM_DC_NEXT_ATTEMPT);
    l->leg.started_at_unix_ms = dm_pg_time_ms(res, row, DM_DC_STARTED);
    l->leg.finished_at_unix_ms = dm_pg_time_ms(res, row, DM_DC_FINISHED);
    if (l->leg.state == DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_RUNNING) {
        l->leg.claimed_by = (char *)dm_pg_bytes(res, row, DM_DC_CLAIMED_BY, &len);
        l->leg.lease_expires_at_unix_ms = dm_pg_time_ms(res, row, DM_DC_LEASE);
    }
    if (l->leg.state == DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_DONE ||
        l->leg.state == DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_SKIPPED) {
        l->receipt.records_matched = dm_pg_int8(res, row, DM_DC_MATCHED);
        l->receipt.records_deleted = dm_pg_int8(res, row, DM_DC_DELETED);
        l->receipt.keys_destroyed = dm_pg_int8(res, row, DM_DC_KEYS);
        l->receipt.finished_at_unix_ms = l->leg.finished_at_unix_ms;
        const char *h = dm_pg_bytes(res, row, DM_DC_RECEIPT, &len);
        if (!dm_pg_isnull(res, row, DM_DC_RECEIPT) && len == 32)
            dm_hex_encode((const unsigned char *)h, 32, l->receipt_hex);
        l->receipt.receipt_sha256_hex = l->receipt_hex;
        l->leg.receipt = &l->receipt;
    }
}

static int cmp_leg_region(const void *a, const void *b)
{
    const Domicile__V1__DsrLeg *x = *(Domicile__V1__DsrLeg *const *)a;
    const Domicile__V1__DsrLeg *y = *(Domicile__V1__DsrLeg *const *)b;
    return strcmp(x->region, y->region);
}

/* Overall state, completion, overdue; legs in region code order. */
void dm_dsr_view_summarise(dm_dsr_view_t *v, size_t n)
{
    Domicile__V1__DsrRequest *q = &v->req;
    int done = 0, started = 0, failed = 0;
    int64_t completed = 0;
    for (size_t i = 0; i < n; i++) {
        const Domicile__V1__DsrLeg *l = &v->legs[i].leg;
        if (l->state == DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_DONE ||
            l->state == DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_SKIPPED) {
            done++;
            if (l->finished_at_unix_ms > completed)
                completed = l->finished_at_unix_ms;
        }
        if (l->state != DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_PENDING)
            started++;
        failed += l->state == DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_FAILED;
    }
    if ((size_t)done == n) {
        q->state = DOMICILE__V1__DSR_STATE__DSR_STATE_DONE;
        q->completed_at_unix_ms = completed;
    } else if (failed && q->kind == DOMICILE__V1__DSR_KIND__DSR_KIND_EXPORT) {
        q->state = DOMICILE__V1__DSR_STATE__DSR_STATE_FAILED; /* an export is not retried */
    } else {
        q->state = started ? DOMICILE__V1__DSR_STATE__DSR_STATE_IN_PROGRESS
                           : DOMICILE__V1__DSR_STATE__DSR_STATE_RECEIVED;
    }
    /* The deadline that binds: the stricter of the policy's 30 days and the GDPR month,
     * or the extended one. */
    v->effective_due = q->extended                                  ? q->extended_due_at_unix_ms
                       : q->due_at_unix_ms < q->gdpr_due_at_unix_ms ? q->due_at_unix_ms
                                                                    : q->gdpr_due_at_unix_ms;
    q->overdue =
        q->state != DOMICILE__V1__DSR_STATE__DSR_STATE_DONE && dm_now_ms() > v->effective_due;
    for (size_t i = 0; i < n; i++)
        v->legp[i] = &v->legs[i].leg;
    qsort(v->legp, n, sizeof(v->legp[0]), cmp_leg_region);
    q->n_legs = n;
    q->legs = v->legp;
}

void dm_dsr_view_init(dm_dsr_view_t *v, size_t n, dm_regions_t *regions)
{
    domicile__v1__dsr_request__init(&v->req);
    v->sk_hex[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        domicile__v1__dsr_leg__init(&v->legs[i].leg);
        domicile__v1__receipt__init(&v->legs[i].receipt);
        v->legs[i].leg.region = (char *)dm_region_code(dm_regions_at(regions, i));
        v->legs[i].leg.state = DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_PENDING;
        v->legs[i].leg.last_error = "not received yet: the region was unreachable; a worker "
                                    "delivers it when the region is back";
        v->legs[i].receipt_hex[0] = '\0';
        v->legp[i] = &v->legs[i].leg;
    }
}

/* Build the request's view from a fan-out of DSR_STATUS. NULL status: *v is filled. */
dm_status_t *dm_dsr_view_fill(dm_dsr_view_t *v, dm_fanout_t *f, dm_regions_t *regions)
{
    bool found = false, unanswered = false;
    dm_dsr_view_init(v, f->n, regions);
    for (size_t i = 0; i < f->n; i++) {
        if (f->err[i]) {
            unanswered = true;
            v->legs[i].leg.last_error = "region unreachable: state unknown until it answers";
            continue;
        }
        if (PQntuples(f->res[i]) != 1)
            continue;
        if (!found)
            dm_dsr_view_header(v, f->res[i], 0);
        found = true;
        dm_dsr_view_leg(&v->legs[i], f->res[i], 0);
    }
    if (!found)
        return unanswered ? dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                          "a region could not be asked about the request")
                          : dm_status_new(GRPC_STATUS_NOT_FOUND, "request not found");
    dm_dsr_view_summarise(v, f->n);
    return NULL;
}

dm_status_t *dm_dsr_view(dm_fanout_t *f, dm_regions_t *regions, Domicile__V1__DsrRequest **out,
                         int *webhook_attempts)
{
    dm_dsr_view_t *v = dm_calloc(1, sizeof(*v));
    dm_status_t *st = dm_dsr_view_fill(v, f, regions);
    *out = &v->req;
    *webhook_attempts = st ? 0 : v->webhook.attempts;
    return st;
}

void dm_dsr_view_free(Domicile__V1__DsrRequest *q)
{
    free(q); /* the view's first member */
}
