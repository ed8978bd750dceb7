/*
 * domicile.v1.CustomersService. A customer's directory row lives only in its residency region.
 * Registration: (1) a pending row in the home region, (2) every other region asked at once
 * whether it holds the id, (3) commit or abort the pending row. Two gateways registering the
 * same id in two regions at once both see the other's pending row and both abort (ABORTED,
 * retryable); neither can succeed beside the other.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "domicile/v1/customers.pb-c.h"

#include "domicile/fanout.h"
#include "domicile/log.h"
#include "internal.h"

#define DISPLAY_NAME_MAX 256
#define REASON_MAX       1024

typedef struct cust_ctx {
    dm_call_t *call;
    dm_app_t *app;
    dm_region_t *region;
    const char *customer_id; /* points into the request */
    unsigned char fingerprint[32];
    char *labels_json;
    char retention_s[32];
    dm_status_t *pending_err; /* reported after the pending row is aborted */
    dm_job_t job;
    PGresult *closed;                 /* CloseCustomer: the closed row, answered once copied */
    char closed_ms[24], purge_ms[24]; /* its times, for the copies */
} cust_ctx_t;

static void ctx_free(void *p)
{
    cust_ctx_t *c = p;
    free(c->labels_json);
    dm_status_free(c->pending_err);
    PQclear(c->closed);
    free(c);
}

static cust_ctx_t *ctx_new(dm_call_t *call, const char *customer_id)
{
    cust_ctx_t *c = dm_calloc(1, sizeof(*c));
    c->call = call;
    c->app = APP(call);
    c->customer_id = customer_id;
    dm_call_set_data(call, c, ctx_free);
    return c;
}

static void job_init(cust_ctx_t *c, dm_sql_id_t stmt, dm_job_fn done)
{
    memset(&c->job, 0, sizeof(c->job));
    c->job.stmt = stmt;
    c->job.done = done;
    c->job.arg = c;
    c->job.owner = c->call;
}

static int has_status(const PGresult *res, const char *want)
{
    int len;
    return PQntuples(res) > 0 && strcmp(dm_pg_bytes(res, 0, 0, &len), want) == 0;
}

/* ---- GetCustomer (also the reply of Register and Close) ------------------------------ */

static void reply_customer(cust_ctx_t *c, const PGresult *res)
{
    int len;
    if (PQntuples(res) != 1) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_NOT_FOUND, "customer not found"));
        return;
    }
    Domicile__V1__Customer cu = DOMICILE__V1__CUSTOMER__INIT;
    const char *state = dm_pg_bytes(res, 0, 2, &len);
    /* A PURGED customer is answered too: the tombstone tells when its data went and why its
     * id cannot be registered again. */
    cu.state = dm_customer_state_enum(state, (size_t)len);
    cu.customer_id = (char *)dm_pg_bytes(res, 0, 0, &len);
    cu.residency = (char *)dm_pg_bytes(res, 0, 1, &len);
    cu.display_name = (char *)dm_pg_bytes(res, 0, 3, &len);
    const char *labels = dm_pg_jsonb(res, 0, 4, &len);
    size_t n = 0;
    void **entries = NULL;
    if (dm_labels_from_json(labels, (size_t)len, &domicile__v1__customer__labels_entry__descriptor,
                            &n, &entries)) {
        cu.n_labels = n;
        cu.labels = (Domicile__V1__Customer__LabelsEntry **)entries;
    }
    cu.created_at_unix_ms = dm_pg_time_ms(res, 0, 5);
    cu.closed_at_unix_ms = dm_pg_time_ms(res, 0, 6);
    cu.purge_after_unix_ms = dm_pg_time_ms(res, 0, 7);
    cu.close_reason = dm_pg_isnull(res, 0, 8) ? "" : (char *)dm_pg_bytes(res, 0, 8, &len);
    cu.purged_at_unix_ms = dm_pg_time_ms(res, 0, 9);
    dm_api_reply_wrapped(c->call, &cu.base);
    dm_labels_free(n, entries);
}

static void get_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    cust_ctx_t *c = job->arg;
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    reply_customer(c, res);
}

static void submit_get(cust_ctx_t *c)
{
    job_init(c, DM_SQL_GET_CUSTOMER, get_done);
    dm_job_param_text(&c->job, 0, c->customer_id);
    dm_region_submit(c->region, &c->job);
}

static void get_resolved(void *arg, dm_region_t *r, const char *state, dm_status_t *err)
{
    cust_ctx_t *c = arg;
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    c->region = r;
    submit_get(c);
}

void dm_customers_get(dm_call_t *call)
{
    const Domicile__V1__GetCustomerRequest *req =
        (const Domicile__V1__GetCustomerRequest *)dm_call_request(call);
    dm_status_t *st = dm_check_customer_id("customer_id", req->customer_id);
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    cust_ctx_t *c = ctx_new(call, req->customer_id);
    dm_api_route(call, req->customer_id, get_resolved, c);
}

/* ---- RegisterCustomer ---------------------------------------------------------------- */

static void finish_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    cust_ctx_t *c = job->arg;
    if (c->pending_err) {
        /* We were aborting: whatever the abort did, report why we aborted. If the abort
         * itself failed, the row stays pending and is ignored after 30 s. */
        dm_status_t *why = c->pending_err;
        c->pending_err = NULL;
        dm_status_free(err);
        dm_call_finish(c->call, why);
        return;
    }
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    if (!has_status(res, "ok")) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_ABORTED,
                                              "registration was overtaken by another attempt "
                                              "for the same customer id; retry"));
        return;
    }
    dm_directory_remember(c->app->directory, c->customer_id, c->region);
    dm_info("customers", "registered a customer in region %s", dm_region_code(c->region));
    submit_get(c);
}

static void submit_finish(cust_ctx_t *c, bool commit, dm_status_t *why)
{
    const Domicile__V1__RegisterCustomerRequest *req =
        (const Domicile__V1__RegisterCustomerRequest *)dm_call_request(c->call);
    c->pending_err = why;
    job_init(c, DM_SQL_REGISTER_FINISH, finish_done);
    /* The abort must run even when the caller has gone away. */
    c->job.owner = commit ? c->call : NULL;
    dm_job_param_text(&c->job, 0, req->customer_id);
    dm_job_param_text(&c->job, 1, req->request_id);
    dm_job_param_text(&c->job, 2, commit ? "true" : "false");
    dm_region_submit(c->region, &c->job);
}

static void others_done(void *arg, dm_region_t *holder, const char *state, dm_status_t *err)
{
    cust_ctx_t *c = arg;
    if (err) {
        /* A region could not say whether it holds the id: never guess. */
        submit_finish(c, false, err);
    } else if (holder && strcmp(state, "pending") == 0) {
        submit_finish(c, false,
                      dm_status_new(GRPC_STATUS_ABORTED,
                                    "customer_id is being registered concurrently in region "
                                    "\"%s\"; retry",
                                    dm_region_code(holder)));
    } else if (holder) {
        submit_finish(c, false,
                      dm_status_new(GRPC_STATUS_ALREADY_EXISTS,
                                    "customer_id is already registered (in another region)"));
    } else {
        submit_finish(c, true, NULL);
    }
}

static void begin_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    cust_ctx_t *c = job->arg;
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    if (has_status(res, "begun")) {
        dm_directory_ask_all(c->app->regions, c->region, c->customer_id, c->call, others_done, c);
    } else if (has_status(res, "replayed")) {
        dm_directory_remember(c->app->directory, c->customer_id, c->region);
        submit_get(c);
    } else if (has_status(res, "exists")) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_ALREADY_EXISTS,
                                              "customer_id is already registered"));
    } else if (has_status(res, "concurrent")) {
        dm_call_finish(c->call,
                       dm_status_new(GRPC_STATUS_ABORTED,
                                     "customer_id is being registered concurrently; retry"));
    } else if (has_status(res, "request_id_reused")) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                              "request_id: already used for a different request"));
    } else {
        dm_error("customers",
                 "region %s refused a registration for its own residency "
                 "(region identity and config disagree)",
                 dm_region_code(c->region));
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_INTERNAL, "registration refused by "
                                                                    "the residency region"));
    }
}

static dm_status_t *unknown_residency(dm_app_t *app, const char *residency)
{
    char known[DM_MAX_REGIONS * (DM_REGION_CODE_MAX + 2) + 1] = "";
    for (size_t i = 0; i < dm_regions_count(app->regions); i++) {
        if (i)
            strcat(known, ", ");
        strcat(known, dm_region_code(dm_regions_at(app->regions, i)));
    }
    bool printable = strlen(residency) <= DM_REGION_CODE_MAX;
    for (const char *p = residency; *p && printable; p++)
        printable = *p > 0x20 && *p < 0x7f && *p != '"';
    return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                         "residency: unknown region \"%s\" (known regions: %s)",
                         printable ? residency : "?", known);
}

void dm_customers_register(dm_call_t *call)
{
    const Domicile__V1__RegisterCustomerRequest *req =
        (const Domicile__V1__RegisterCustomerRequest *)dm_call_request(call);
    dm_app_t *app = APP(call);
    dm_status_t *st;
    if ((st = dm_check_request_id("request_id", req->request_id)) ||
        (st = dm_check_customer_id("customer_id", req->customer_id)) ||
        (st = dm_check_text("display_name", req->display_name, 0, DISPLAY_NAME_MAX)) ||
        (st = dm_check_labels("labels", req->n_labels, (void *const *)req->labels))) {
        dm_call_finish(call, st);
        return;
    }
    const dm_principal_t *p = dm_call_principal_of(call);
    if (p && !dm_principal_in_scope(p, req->customer_id)) {
        dm_call_finish(call, dm_status_new(GRPC_STATUS_PERMISSION_DENIED,
                                           "customer_id: outside the caller's tenant scope"));
        return;
    }
    dm_region_t *home = req->residency[0] ? dm_regions_find(app->regions, req->residency) : NULL;
    if (!home) {
        dm_call_finish(call, req->residency[0]
                                 ? unknown_residency(app, req->residency)
                                 : dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                                 "residency: required (a region code)"));
        return;
    }
    /* The residency region's gateway registers it (and checks the other regions). */
    if (dm_api_forward_to(call, home))
        return;
    cust_ctx_t *c = ctx_new(call, req->customer_id);
    c->region = home;
    c->labels_json = dm_labels_to_json(req->n_labels, (void *const *)req->labels);
    DM_FINGERPRINT(c->fingerprint, DM_AAD_STR("RegisterCustomer"), DM_AAD_STR(req->customer_id),
                   DM_AAD_STR(req->residency), DM_AAD_STR(req->display_name),
                   DM_AAD_STR(c->labels_json));
    job_init(c, DM_SQL_REGISTER_BEGIN, begin_done);
    dm_job_param_text(&c->job, 0, req->customer_id);
    dm_job_param_text(&c->job, 1, req->residency);
    dm_job_param_text(&c->job, 2, req->request_id);
    dm_job_param_bin(&c->job, 3, c->fingerprint, sizeof(c->fingerprint));
    dm_job_param_text(&c->job, 4, req->display_name);
    dm_job_param_text(&c->job, 5, c->labels_json);
    dm_region_submit(home, &c->job);
}

/* ---- CloseCustomer ------------------------------------------------------------------- */

/* The copies of the closure are stored (or could not be: a region down keeps none, and a
 * restore of this region while it is down cannot re-apply the closure from it). */
static void close_copied(dm_fanout_t *f, void *arg)
{
    cust_ctx_t *c = arg;
    for (size_t i = 0; i < f->n; i++)
        if (f->err[i])
            dm_warn("customers",
                    "customer %s: no copy of its closure in region %s (%s): a restore of region "
                    "%s cannot re-apply the closure from there",
                    c->customer_id, dm_region_code(f->region[i]), f->err[i]->message,
                    dm_region_code(c->region));
    dm_fanout_free(f);
    reply_customer(c, c->closed);
}

/* The closed row: copy the closure into every other region before answering (a restore of
 * this region re-applies it from there: src/restore). */
static void close_got(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    cust_ctx_t *c = job->arg;
    const Domicile__V1__CloseCustomerRequest *req =
        (const Domicile__V1__CloseCustomerRequest *)dm_call_request(c->call);
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    if (PQntuples(res) != 1 || dm_pg_isnull(res, 0, 6)) {
        reply_customer(c, res);
        return;
    }
    c->closed = PQcopyResult(res, PG_COPYRES_ATTRS | PG_COPYRES_TUPLES);
    snprintf(c->closed_ms, sizeof(c->closed_ms), "%lld", (long long)dm_pg_time_ms(res, 0, 6));
    snprintf(c->purge_ms, sizeof(c->purge_ms), "%lld", (long long)dm_pg_time_ms(res, 0, 7));
    int len;
    const char *reason = dm_pg_isnull(res, 0, 8) ? "" : dm_pg_bytes(res, 0, 8, &len);
    const char *v[6] = {c->customer_id,  dm_region_code(c->region),
                        req->request_id, reason,
                        c->closed_ms,    c->purge_ms};
    dm_fanout_start(c->call, c->app->regions, DM_SQL_CLOSURE_COPY_PUT, 6, v, NULL, NULL,
                    close_copied, c);
}

static void close_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    cust_ctx_t *c = job->arg;
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    if (has_status(res, "ok") || has_status(res, "replayed")) {
        job_init(c, DM_SQL_GET_CUSTOMER, close_got);
        dm_job_param_text(&c->job, 0, c->customer_id);
        dm_region_submit(c->region, &c->job);
    } else if (has_status(res, "not_active")) {
        dm_call_finish(
            c->call, dm_status_new(GRPC_STATUS_FAILED_PRECONDITION, "customer is already closed"));
    } else {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_NOT_FOUND, "customer not found"));
    }
}

static void close_resolved(void *arg, dm_region_t *r, const char *state, dm_status_t *err)
{
    cust_ctx_t *c = arg;
    const Domicile__V1__CloseCustomerRequest *req =
        (const Domicile__V1__CloseCustomerRequest *)dm_call_request(c->call);
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    c->region = r;
    snprintf(c->retention_s, sizeof(c->retention_s), "%d days",
             c->app->cfg->customer_retention_days);
    job_init(c, DM_SQL_CLOSE_CUSTOMER, close_done);
    dm_job_param_text(&c->job, 0, req->customer_id);
    dm_job_param_text(&c->job, 1, req->request_id);
    dm_job_param_text(&c->job, 2, req->reason);
    dm_job_param_text(&c->job, 3, c->retention_s);
    dm_region_submit(r, &c->job);
}

void dm_customers_close(dm_call_t *call)
{
    const Domicile__V1__CloseCustomerRequest *req =
        (const Domicile__V1__CloseCustomerRequest *)dm_call_request(call);
    dm_status_t *st;
    if ((st = dm_check_request_id("request_id", req->request_id)) ||
        (st = dm_check_customer_id("customer_id", req->customer_id)) ||
        (st = dm_check_text("reason", req->reason, 1, REASON_MAX))) {
        dm_call_finish(call, st);
        return;
    }
    cust_ctx_t *c = ctx_new(call, req->customer_id);
    dm_api_route(call, req->customer_id, close_resolved, c);
}
