/*
 * domicile.v1.RecordsService: validate -> resolve the customer's region -> one statement in that
 * region (and nowhere else) -> reply from the executor thread. Payloads are sealed here with
 * the customer's (or subject's) data key before they leave for the database, and opened here
 * after they come back.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "domicile/v1/records.pb-c.h"

#include "domicile/log.h"
#include "domicile/transfer.h"
#include "internal.h"

#define LIST_DEFAULT_PAGE 100
#define LIST_MAX_PAGE     1000
#define LIST_CHUNK        200 /* rows per query */
/* With payloads, a query's rows carry theirs while the payload before them is under this:
 * 200 small records a query, and at most 4 MiB plus one payload (1 MiB) per stream in memory
 * (16 rows of up to 1 MiB before). */
#define LIST_PAYLOAD_BUDGET "4194304"
#define PAGE_TOKEN_PREFIX   "r2."
#define PAGE_TOKEN_TAG      16 /* hex digits of the filters' digest in a token */
#define KEY_RETRIES         2

typedef Domicile__V1__PutRecordRequest put_req_t;

typedef struct bulk bulk_t;

typedef struct rec_ctx {
    dm_call_t *call;
    bulk_t *bulk; /* BulkPutRecords: this put is one message of the stream */
    int index;
    int slot;               /* bulk: its place in the stream's in-flight table */
    bool bulk_has_expected; /* bulk: the message's expected_version, kept while */
    int64_t bulk_expected;  /* it waits behind a message it conflicts with */
    put_req_t *put_req;     /* PutRecord: the call's request; bulk: owned by this context */
    dm_app_t *app;
    dm_region_t *region;
    const char *region_code;
    bool has_subject;
    unsigned char subject_key[DM_SUBJECT_KEY_LEN];
    unsigned char fingerprint[32];
    dm_job_t job;

    /* PutRecord */
    int64_t key_id;
    unsigned char dek[DM_KEY_LEN];
    unsigned char *wrapped;
    size_t wrapped_len;
    unsigned char *ct;
    size_t ct_len;
    char *labels_json;
    char key_id_s[24], size_s[16], expected_s[24];
    int32_t kek_version; /* of `wrapped` */
    char kek_version_s[16];
    int key_tries;

    /* Transfers: the gate's decision, and a read's result held until its entry commits */
    dm_xfer_t xfer;
    PGresult *held;
    Domicile__V1__Record rec; /* GetRecord: the decrypted record waiting for its entry */
    char sk_hex[2 * DM_SUBJECT_KEY_LEN + 1];
    unsigned char row_subject[DM_SUBJECT_KEY_LEN];

    /* ListRecords */
    char *after; /* last record id sent */
    char tag[PAGE_TOKEN_TAG + 1];
    int remaining;
    char limit_s[16];
    bool with_payload;
    atomic_bool awaiting_drain;
} rec_ctx_t;

static void record_dispose(Domicile__V1__Record *rec);

static void ctx_free(void *p)
{
    rec_ctx_t *c = p;
    record_dispose(&c->rec);
    PQclear(c->held);
    OPENSSL_cleanse(c->dek, sizeof(c->dek));
    free(c->wrapped);
    free(c->ct);
    free(c->labels_json);
    free(c->after);
    free(c);
}

static rec_ctx_t *ctx_new(dm_call_t *call)
{
    rec_ctx_t *c = dm_calloc(1, sizeof(*c));
    c->call = call;
    c->app = APP(call);
    dm_call_set_data(call, c, ctx_free);
    return c;
}

static void set_region(rec_ctx_t *c, dm_region_t *r)
{
    c->region = r;
    c->region_code = dm_region_code(r);
    if (!c->bulk)
        dm_call_set_region(c->call, c->region_code);
}

static dm_custody_t *custody_of(rec_ctx_t *c)
{
    return dm_api_custody(c->app, c->region);
}

static void job_init(rec_ctx_t *c, dm_sql_id_t stmt, dm_job_fn done, bool batchable)
{
    memset(&c->job, 0, sizeof(c->job));
    c->job.stmt = stmt;
    c->job.done = done;
    c->job.arg = c;
    c->job.owner = c->call;
    c->job.batchable = batchable;
}

static bool expected_of(int32_t has_case, int32_t want_case, int64_t v, int64_t *out,
                        dm_status_t **st)
{
    if (has_case != want_case)
        return false;
    if (v < 0) {
        *st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "expected_version: must be >= 0");
        return false;
    }
    *out = v;
    return true;
}

/* Fill a Record from a row of get_record/list_records (column order: sql.c RECORD_COLUMNS). */
static void record_from_row(Domicile__V1__Record *rec, const PGresult *res, int row,
                            const char *customer, const char *region, char *sk_hex)
{
    int len;
    rec->customer_id = (char *)customer;
    rec->record_id = (char *)dm_pg_bytes(res, row, 0, &len);
    rec->kind = (char *)dm_pg_bytes(res, row, 1, &len);
    if (!dm_pg_isnull(res, row, 2)) {
        const char *sk = dm_pg_bytes(res, row, 2, &len);
        if (len == DM_SUBJECT_KEY_LEN) {
            dm_hex_encode((const unsigned char *)sk, DM_SUBJECT_KEY_LEN, sk_hex);
            rec->has_subject = true;
            rec->subject_key_hex = sk_hex;
        }
    }
    rec->content_type = (char *)dm_pg_bytes(res, row, 3, &len);
    const char *labels = dm_pg_jsonb(res, row, 4, &len);
    size_t n = 0;
    void **entries = NULL;
    if (dm_labels_from_json(labels, (size_t)len, &domicile__v1__record__labels_entry__descriptor,
                            &n, &entries)) {
        rec->n_labels = n;
        rec->labels = (Domicile__V1__Record__LabelsEntry **)entries;
    }
    rec->version = dm_pg_int8(res, row, 5);
    rec->restricted = dm_pg_bool(res, row, 6);
    rec->created_at_unix_ms = dm_pg_time_ms(res, row, 7);
    rec->updated_at_unix_ms = dm_pg_time_ms(res, row, 8);
    rec->payload_size = dm_pg_int4(res, row, 9);
    rec->region = (char *)region;
}

static void record_dispose(Domicile__V1__Record *rec)
{
    dm_labels_free(rec->n_labels, (void **)rec->labels);
    rec->labels = NULL;
    rec->n_labels = 0;
    if (rec->payload.data) {
        OPENSSL_cleanse(rec->payload.data, rec->payload.len);
        free(rec->payload.data);
        rec->payload.data = NULL;
    }
}

/* Open a row's payload: unwrap its key (columns 2 subject, 12 wrapped) and the ciphertext
 * (column 11) under the AAD of (region, customer, record id). */
static dm_status_t *open_payload(rec_ctx_t *c, const PGresult *res, int row, const char *customer,
                                 Domicile__V1__Record *rec)
{
    int sk_len = 0, w_len, ct_len;
    const unsigned char *sk = NULL;
    if (!dm_pg_isnull(res, row, 2))
        sk = (const unsigned char *)dm_pg_bytes(res, row, 2, &sk_len);
    const unsigned char *w = (const unsigned char *)dm_pg_bytes(res, row, 12, &w_len);
    const unsigned char *ct = (const unsigned char *)dm_pg_bytes(res, row, 11, &ct_len);
    unsigned char dek[DM_KEY_LEN];
    size_t aad_len;
    unsigned char *aad;
    dm_status_t *st = dm_api_data_key(c->app, c->region, customer, sk, (size_t)sk_len,
                                      dm_pg_int8(res, row, 10), w, (size_t)w_len, dek);
    if (st)
        return st;
    aad = dm_record_aad(c->region_code, customer, rec->record_id, &aad_len);
    unsigned char *pt = NULL;
    size_t pt_len = 0;
    st = dm_open(dek, aad, aad_len, ct, (size_t)ct_len, &pt, &pt_len);
    OPENSSL_cleanse(dek, sizeof(dek));
    free(aad);
    if (st)
        return st;
    rec->payload.data = pt;
    rec->payload.len = pt_len;
    return NULL;
}

static void log_data_loss(rec_ctx_t *c, const char *record_id)
{
    dm_error("records",
             "region %s: stored ciphertext of record %.64s does not authenticate: moved "
             "between rows or regions, or tampered with",
             c->region_code, record_id);
}

/* A read of region r's data: through the transfer gate, then `next`. */
static void read_gate(rec_ctx_t *c, dm_region_t *r, const char *method, const char *customer,
                      dm_xfer_fn next)
{
    set_region(c, r);
    c->xfer.dir = DM_TRANSFER_READ;
    c->xfer.method = method;
    c->xfer.customer_id = customer;
    c->xfer.subject_key = c->has_subject ? c->subject_key : NULL;
    dm_xfer_request_id(c->call, NULL, c->xfer.request_id);
    dm_xfer_gate(c->call, r, &c->xfer, next, c);
}

/* ---- PutRecord ----------------------------------------------------------------------- */

static void put_with_key(rec_ctx_t *c);
static void list_drained(dm_call_t *call, void *arg);
static void put_start(rec_ctx_t *c, bool has_expected, int64_t expected);
static void bulk_op_done(rec_ctx_t *op, dm_status_t *st, Domicile__V1__PutRecordResponse *rep);

static void put_fail(rec_ctx_t *c, dm_status_t *st)
{
    if (c->bulk)
        bulk_op_done(c, st, NULL);
    else
        dm_call_finish(c->call, st);
}

static void put_ok(rec_ctx_t *c, Domicile__V1__PutRecordResponse *rep)
{
    if (c->bulk)
        bulk_op_done(c, NULL, rep);
    else
        dm_call_reply(c->call, &rep->base);
}

static dm_status_t *validate_put(const put_req_t *r)
{
    dm_status_t *st;
    if ((st = dm_check_request_id("request_id", r->request_id)) ||
        (st = dm_check_customer_id("customer_id", r->customer_id)) ||
        (st = dm_check_record_id("record_id", r->record_id)) ||
        (st = dm_check_kind("kind", r->kind, false)) ||
        (st = dm_check_payload("payload", r->payload.len)) ||
        (st = dm_check_content_type("content_type", r->content_type)) ||
        (st = dm_check_labels("labels", r->n_labels, (void *const *)r->labels)))
        return st;
    if (r->subject[0] && !dm_utf8_valid(r->subject, strlen(r->subject)))
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "subject: must be 1..%d bytes of UTF-8 after trimming",
                             DM_SUBJECT_MAX);
    return NULL;
}

static void put_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    rec_ctx_t *c = job->arg;
    const put_req_t *req = c->put_req;
    if (err) {
        put_fail(c, err);
        return;
    }
    int len;
    const char *status = dm_pg_bytes(res, 0, 0, &len);
    if (strcmp(status, "ok") == 0 || strcmp(status, "replayed") == 0) {
        Domicile__V1__PutRecordResponse rep = DOMICILE__V1__PUT_RECORD_RESPONSE__INIT;
        Domicile__V1__Record rec = DOMICILE__V1__RECORD__INIT;
        char sk_hex[2 * DM_SUBJECT_KEY_LEN + 1];
        rec.customer_id = req->customer_id;
        rec.record_id = req->record_id;
        rec.kind = req->kind;
        if (c->has_subject) {
            dm_hex_encode(c->subject_key, DM_SUBJECT_KEY_LEN, sk_hex);
            rec.has_subject = true;
            rec.subject_key_hex = sk_hex;
        }
        rec.content_type = req->content_type;
        rec.n_labels = req->n_labels;
        rec.labels = (Domicile__V1__Record__LabelsEntry **)req->labels;
        rec.version = dm_pg_int8(res, 0, 1);
        rec.created_at_unix_ms = dm_pg_time_ms(res, 0, 3);
        rec.updated_at_unix_ms = dm_pg_time_ms(res, 0, 4);
        rec.restricted = dm_pg_bool(res, 0, 5);
        rec.payload_size = (int64_t)req->payload.len;
        rec.region = (char *)c->region_code;
        rep.record = &rec;
        rep.created = dm_pg_bool(res, 0, 2);
        rep.replayed = status[0] == 'r';
        put_ok(c, &rep);
    } else if (strcmp(status, "version_mismatch") == 0) {
        put_fail(c, dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                                  "record version is %lld, expected_version was %s",
                                  (long long)dm_pg_int8(res, 0, 1), c->expected_s));
    } else if (strcmp(status, "key_gone") == 0 && c->key_tries < KEY_RETRIES) {
        /* The data key was destroyed (an erasure) since we cached it: never write under a
         * key that no longer exists; fetch (or create) the current one and seal again. */
        dm_keycache_forget(c->app->keys, c->region_code, req->customer_id,
                           c->has_subject ? c->subject_key : NULL);
        put_with_key(c);
    } else if (strcmp(status, "customer_closed") == 0) {
        put_fail(c, dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                                  "customer is closed: records are read-only"));
    } else if (strcmp(status, "objected") == 0) {
        put_fail(c, dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                                  "the subject objected to processing for purpose \"%s\"",
                                  dm_call_purpose(c->call)));
    } else if (strcmp(status, "no_customer") == 0) {
        put_fail(c, dm_status_new(GRPC_STATUS_NOT_FOUND, "customer not found"));
    } else if (strcmp(status, "request_id_reused") == 0) {
        put_fail(c, dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                  "request_id: already used for a different request"));
    } else {
        put_fail(c, dm_status_new(GRPC_STATUS_INTERNAL, "unexpected put_record outcome \"%.32s\"",
                                  status));
    }
}

static void put_submit(rec_ctx_t *c)
{
    const put_req_t *req = c->put_req;
    size_t aad_len;
    unsigned char *aad = dm_record_aad(c->region_code, req->customer_id, req->record_id, &aad_len);
    free(c->ct);
    c->ct = NULL;
    dm_status_t *st =
        dm_seal(c->dek, aad, aad_len, req->payload.data, req->payload.len, &c->ct, &c->ct_len);
    free(aad);
    if (st) {
        put_fail(c, st);
        return;
    }
    job_init(c, DM_SQL_PUT_RECORD, put_done, true);
    snprintf(c->key_id_s, sizeof(c->key_id_s), "%lld", (long long)c->key_id);
    snprintf(c->size_s, sizeof(c->size_s), "%zu", req->payload.len);
    dm_job_param_text(&c->job, 0, req->customer_id);
    dm_job_param_text(&c->job, 1, req->request_id);
    dm_job_param_bin(&c->job, 2, c->fingerprint, sizeof(c->fingerprint));
    dm_job_param_text(&c->job, 3, req->record_id);
    dm_job_param_text(&c->job, 4, req->kind);
    if (c->has_subject)
        dm_job_param_bin(&c->job, 5, c->subject_key, DM_SUBJECT_KEY_LEN);
    else
        dm_job_param_text(&c->job, 5, NULL);
    dm_job_param_text(&c->job, 6, c->key_id_s);
    dm_job_param_bin(&c->job, 7, c->ct, (int)c->ct_len);
    dm_job_param_text(&c->job, 8, c->size_s);
    dm_job_param_text(&c->job, 9, req->content_type);
    dm_job_param_text(&c->job, 10, c->labels_json);
    dm_job_param_text(&c->job, 11, c->expected_s[0] ? c->expected_s : NULL);
    dm_job_param_text(&c->job, 12, dm_call_purpose(c->call));
    dm_region_submit(c->region, &c->job);
}

static void key_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    rec_ctx_t *c = job->arg;
    const put_req_t *req = c->put_req;
    if (err) {
        put_fail(c, err);
        return;
    }
    int len, w_len;
    const char *status = dm_pg_bytes(res, 0, 0, &len);
    if (strcmp(status, "kek_retired") == 0) {
        /* Our current KEK version was retired by a rotation we have not seen yet. */
        dm_custody_poke(custody_of(c));
        put_fail(c, dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                  "region \"%s\": the KEK version this gateway wraps with was "
                                  "just retired; retry",
                                  c->region_code));
        return;
    }
    if (strcmp(status, "ok") != 0) {
        put_fail(c, dm_status_new(GRPC_STATUS_NOT_FOUND, "customer not found"));
        return;
    }
    c->key_id = dm_pg_int8(res, 0, 1);
    const unsigned char *w = (const unsigned char *)dm_pg_bytes(res, 0, 2, &w_len);
    /* Our candidate was stored: its key is in c->dek already (one token call saved per new
     * key). Else the stored key is another gateway's: unwrap what came back (and cache it). */
    if ((size_t)w_len == c->wrapped_len && memcmp(w, c->wrapped, c->wrapped_len) == 0) {
        dm_keycache_put(c->app->keys, c->region_code, req->customer_id,
                        c->has_subject ? c->subject_key : NULL, c->key_id, c->dek);
        put_submit(c);
        return;
    }
    dm_status_t *st = dm_api_data_key(
        c->app, c->region, req->customer_id, c->has_subject ? c->subject_key : NULL,
        c->has_subject ? DM_SUBJECT_KEY_LEN : 0, c->key_id, w, (size_t)w_len, c->dek);
    if (st) {
        if (st->code == GRPC_STATUS_DATA_LOSS)
            dm_error("records", "region %s: a stored data key does not unwrap (wrong KEK?)",
                     c->region_code);
        put_fail(c, st);
        return;
    }
    put_submit(c);
}

static void put_with_key(rec_ctx_t *c)
{
    const put_req_t *req = c->put_req;
    const unsigned char *sk = c->has_subject ? c->subject_key : NULL;
    c->key_tries++;
    /* Fail closed: no write under a cached key while the region's KEK cannot be used. */
    dm_status_t *st = dm_custody_check(custody_of(c));
    if (st) {
        put_fail(c, st);
        return;
    }
    if (dm_keycache_get(c->app->keys, c->region_code, req->customer_id, sk, &c->key_id, c->dek)) {
        put_submit(c);
        return;
    }
    /* Miss: offer a fresh key; the region keeps whichever key it already had. */
    unsigned char cand[DM_KEY_LEN];
    size_t aad_len;
    dm_random_bytes(cand, sizeof(cand));
    unsigned char *aad =
        dm_key_aad(c->region_code, req->customer_id, sk, sk ? DM_SUBJECT_KEY_LEN : 0, &aad_len);
    free(c->wrapped);
    c->wrapped = NULL;
    st = dm_custody_wrap(custody_of(c), cand, aad, aad_len, &c->wrapped, &c->wrapped_len,
                         &c->kek_version);
    memcpy(c->dek, cand, sizeof(cand));
    OPENSSL_cleanse(cand, sizeof(cand));
    free(aad);
    if (st) {
        put_fail(c, st);
        return;
    }
    job_init(c, DM_SQL_GET_OR_CREATE_KEY, key_done, false);
    dm_job_param_text(&c->job, 0, req->customer_id);
    dm_job_param_bin(&c->job, 1, sk ? (const void *)sk : "", sk ? DM_SUBJECT_KEY_LEN : 0);
    dm_job_param_bin(&c->job, 2, c->wrapped, (int)c->wrapped_len);
    snprintf(c->kek_version_s, sizeof(c->kek_version_s), "%d", c->kek_version);
    dm_job_param_text(&c->job, 3, c->kek_version_s);
    dm_region_submit(c->region, &c->job);
}

static void put_logged(void *arg, dm_status_t *err)
{
    rec_ctx_t *c = arg;
    if (err) {
        put_fail(c, err); /* not logged: the payload is not sent */
        return;
    }
    put_with_key(c);
}

static void put_gated(void *arg, dm_status_t *err)
{
    rec_ctx_t *c = arg;
    if (err) {
        put_fail(c, err);
        return;
    }
    if (!c->xfer.cross) {
        put_with_key(c);
        return;
    }
    /* Write-ahead: the write's entry is committed in the customer's region first. */
    dm_xfer_log(c->call, &c->xfer, 1, (int64_t)c->put_req->payload.len, c->put_req->record_id,
                put_logged, c);
}

static void bulk_remote_done(void *arg, ProtobufCMessage *reply, dm_status_t *err)
{
    rec_ctx_t *c = arg;
    if (err) {
        put_fail(c, err);
        return;
    }
    put_ok(c, (Domicile__V1__PutRecordResponse *)reply);
    protobuf_c_message_free_unpacked(reply, NULL);
}

static void put_resolved(void *arg, dm_region_t *r, const char *state, dm_status_t *err)
{
    rec_ctx_t *c = arg;
    if (err) {
        put_fail(c, err);
        return;
    }
    if (c->bulk && !dm_region_is_local(r)) {
        /* One message of the stream for another region: a PutRecord at its gateway, which
         * decides, logs and writes it there (promise 10). Safe to repeat with a request id. */
        dm_peer_unary(c->app->peers, r, c->call, dm_api_method_path(dm_records_put),
                      &c->put_req->base, &domicile__v1__put_record_response__descriptor,
                      c->put_req->request_id[0] != '\0', bulk_remote_done, c);
        return;
    }
    set_region(c, r);
    c->xfer.dir = DM_TRANSFER_WRITE;
    c->xfer.method = c->bulk || dm_api_forwarded_from(c->call, dm_records_bulk_put)
                         ? "BulkPutRecords"
                         : "PutRecord";
    c->xfer.customer_id = c->put_req->customer_id;
    c->xfer.subject_key = c->has_subject ? c->subject_key : NULL;
    c->xfer.record_id = c->put_req->record_id;
    dm_xfer_request_id(c->call, c->put_req->request_id, c->xfer.request_id);
    dm_xfer_gate(c->call, r, &c->xfer, put_gated, c);
}

/* Validate a put and its expected_version. */
static dm_status_t *check_put(const put_req_t *req, bool *has_expected, int64_t *expected)
{
    dm_status_t *st = validate_put(req);
    *has_expected = !st && expected_of(req->expected_case,
                                       DOMICILE__V1__PUT_RECORD_REQUEST__EXPECTED_EXPECTED_VERSION,
                                       req->expected_version, expected, &st);
    return st;
}

/* Subject key, fingerprint, then resolution; completes through put_ok/put_fail. */
static void put_start(rec_ctx_t *c, bool has_expected, int64_t expected)
{
    const put_req_t *req = c->put_req;
    dm_status_t *st =
        dm_subject_to_key(c->app, "subject", req->subject, &c->has_subject, c->subject_key);
    if (st) {
        put_fail(c, st);
        return;
    }
    if (has_expected)
        snprintf(c->expected_s, sizeof(c->expected_s), "%lld", (long long)expected);
    c->labels_json = dm_labels_to_json(req->n_labels, (void *const *)req->labels);
    /* Same request_id with other content must not replay: fingerprint every field. */
    DM_FINGERPRINT(c->fingerprint, DM_AAD_STR("PutRecord"), DM_AAD_STR(req->customer_id),
                   DM_AAD_STR(req->record_id), DM_AAD_STR(req->kind),
                   DM_AAD_BYTES(c->subject_key, c->has_subject ? DM_SUBJECT_KEY_LEN : 0),
                   DM_AAD_BYTES(req->payload.data, req->payload.len), DM_AAD_STR(req->content_type),
                   DM_AAD_STR(c->labels_json), DM_AAD_STR(c->expected_s));
    if (c->bulk)
        dm_api_resolve(c->call, req->customer_id, put_resolved, c);
    else
        dm_api_route(c->call, req->customer_id, put_resolved, c);
}

void dm_records_put(dm_call_t *call)
{
    put_req_t *req = (put_req_t *)dm_call_request(call);
    bool has_expected;
    int64_t expected = 0;
    dm_status_t *st = check_put(req, &has_expected, &expected);
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    rec_ctx_t *c = ctx_new(call);
    c->put_req = req;
    put_start(c, has_expected, expected);
}

/* ---- BulkPutRecords ------------------------------------------------------------------ */

#define BULK_MAX_MESSAGES 10000
#define BULK_WINDOW       64   /* puts in flight per stream: enough to fill a batch */
#define BULK_MAX_FAILURES 1000 /* failures reported in detail; the rest are counted */

struct bulk {
    dm_call_t *call;
    dm_app_t *app;
    pthread_mutex_t mu; /* everything below */
    int received, in_flight;
    int64_t written, replayed, created, failed;
    bool eof, reading, done;
    dm_status_t *fatal;
    size_t n_failures;
    Domicile__V1__BulkPutFailure **failures;
    /* Messages in flight. One that names the same record or request_id as one of them waits
     * (`parked`, and reading stops) until they have all ended, so such messages take effect
     * in stream order whatever connection each write travels on. */
    rec_ctx_t *slots[BULK_WINDOW];
    rec_ctx_t *parked;
};

static void op_free(rec_ctx_t *op);

static void bulk_free(void *p)
{
    bulk_t *b = p;
    if (b->parked)
        op_free(b->parked);
    for (size_t i = 0; i < b->n_failures; i++) {
        free(b->failures[i]->record_id);
        free(b->failures[i]->message);
        free(b->failures[i]);
    }
    free(b->failures);
    dm_status_free(b->fatal);
    pthread_mutex_destroy(&b->mu);
    free(b);
}

static void bulk_on_message(dm_call_t *call, ProtobufCMessage *msg, dm_status_t *err, void *arg);

/* Called with b->mu held; returns true when the call should end now. */
static bool bulk_should_end(bulk_t *b)
{
    return !b->done && b->in_flight == 0 && !b->reading && !b->parked && (b->eof || b->fatal);
}

static int cmp_failure(const void *a, const void *b)
{
    const Domicile__V1__BulkPutFailure *x = *(Domicile__V1__BulkPutFailure *const *)a;
    const Domicile__V1__BulkPutFailure *y = *(Domicile__V1__BulkPutFailure *const *)b;
    return (x->index > y->index) - (x->index < y->index);
}

static void bulk_end(bulk_t *b)
{
    if (b->fatal) {
        dm_status_t *st = b->fatal;
        b->fatal = NULL;
        dm_call_finish(b->call, st);
        return;
    }
    if (dm_call_deadline_left_ms(b->call) <= 0) {
        /* The caller has given up (or is about to): say so rather than OK, as for every other
         * call past its deadline. What was written stays; a retry with the same request_ids
         * gets those replayed, not written twice. */
        dm_info("records", "bulk put past its deadline: %d messages, %lld written, %lld failed",
                b->received, (long long)b->written, (long long)b->failed);
        dm_call_finish(b->call,
                       dm_status_new(GRPC_STATUS_DEADLINE_EXCEEDED,
                                     "deadline exceeded before the stream ended: %lld of %d "
                                     "messages written; retry with the same request_ids",
                                     (long long)b->written, b->received));
        return;
    }
    Domicile__V1__BulkPutRecordsResponse rep = DOMICILE__V1__BULK_PUT_RECORDS_RESPONSE__INIT;
    /* Failures are noted as they happen (invalid ones at once, others when their write
     * ends): report them in stream order. */
    if (b->n_failures > 1) /* qsort(NULL, 0, ...) is undefined (UBSan nonnull-attribute) */
        qsort(b->failures, b->n_failures, sizeof(*b->failures), cmp_failure);
    rep.written = b->written;
    rep.replayed = b->replayed;
    rep.created = b->created;
    rep.n_failures = b->n_failures;
    rep.failures = b->failures;
    dm_info("records", "bulk put: %d messages, %lld written, %lld replayed, %lld failed",
            b->received, (long long)b->written, (long long)b->replayed, (long long)b->failed);
    dm_call_reply(b->call, &rep.base);
}

static char *safe_id(const char *id)
{
    /* Decoded ids are valid UTF-8 (the wire check); an over-long one is cut at a character
     * boundary so the response stays parseable. */
    size_t n = strnlen(id, DM_RECORD_ID_MAX);
    while (n > 0 && !dm_utf8_valid(id, n))
        n--;
    return dm_strndup(id, n);
}

static void bulk_note_failure_locked(bulk_t *b, int index, const char *record_id,
                                     const dm_status_t *st)
{
    b->failed++;
    if (b->n_failures >= BULK_MAX_FAILURES)
        return;
    Domicile__V1__BulkPutFailure *f = dm_malloc(sizeof(*f));
    domicile__v1__bulk_put_failure__init(f);
    f->index = index;
    f->record_id = safe_id(record_id);
    f->code = (int32_t)st->code;
    f->message = dm_strdup(st->message);
    b->failures = dm_realloc(b->failures, (b->n_failures + 1) * sizeof(*b->failures));
    b->failures[b->n_failures++] = f;
}

/* Read more while the window has room. Called with b->mu held; returns whether to read. */
static bool bulk_want_read_locked(bulk_t *b)
{
    if (b->reading || b->eof || b->fatal || b->parked || b->in_flight >= BULK_WINDOW)
        return false;
    b->reading = true;
    return true;
}

static void op_free(rec_ctx_t *op)
{
    protobuf_c_message_free_unpacked(&op->put_req->base, NULL);
    ctx_free(op);
}

/* Does `op` name the record or the request of a message in flight? Called with b->mu held. */
static bool bulk_conflicts_locked(bulk_t *b, const rec_ctx_t *op)
{
    const put_req_t *r = op->put_req;
    for (int i = 0; i < BULK_WINDOW; i++) {
        const rec_ctx_t *o = b->slots[i];
        if (o && strcmp(o->put_req->customer_id, r->customer_id) == 0 &&
            (strcmp(o->put_req->record_id, r->record_id) == 0 ||
             strcmp(o->put_req->request_id, r->request_id) == 0))
            return true;
    }
    return false;
}

/* Put `op` in flight. Called with b->mu held (a free slot exists: in_flight < BULK_WINDOW). */
static void bulk_fly_locked(bulk_t *b, rec_ctx_t *op)
{
    for (int i = 0; i < BULK_WINDOW; i++) {
        if (!b->slots[i]) {
            b->slots[i] = op;
            op->slot = i;
            break;
        }
    }
    b->in_flight++;
}

static void bulk_op_done(rec_ctx_t *op, dm_status_t *st, Domicile__V1__PutRecordResponse *rep)
{
    bulk_t *b = op->bulk;
    rec_ctx_t *start = NULL;
    pthread_mutex_lock(&b->mu);
    b->slots[op->slot] = NULL;
    b->in_flight--;
    if (b->in_flight == 0 && b->parked) {
        start = b->parked;
        b->parked = NULL;
        bulk_fly_locked(b, start);
    }
    if (st) {
        bulk_note_failure_locked(b, op->index, op->put_req->record_id, st);
    } else if (rep->replayed) {
        b->replayed++;
    } else {
        b->written++;
        b->created += rep->created;
    }
    bool read = bulk_want_read_locked(b);
    bool end = bulk_should_end(b);
    if (end)
        b->done = true;
    pthread_mutex_unlock(&b->mu);
    dm_status_free(st);
    op_free(op);
    if (read)
        dm_call_recv(b->call, bulk_on_message, b);
    if (start)
        put_start(start, start->bulk_has_expected, start->bulk_expected);
    else if (!read && end)
        bulk_end(b);
}

static void bulk_on_message(dm_call_t *call, ProtobufCMessage *msg, dm_status_t *err, void *arg)
{
    bulk_t *b = arg;
    pthread_mutex_lock(&b->mu);
    b->reading = false;
    if (err && err->code == GRPC_STATUS_INVALID_ARGUMENT && b->received < BULK_MAX_MESSAGES) {
        /* One undecodable message (bad UTF-8, garbage) is that message's failure, not the
         * stream's: note it and read on. */
        bulk_note_failure_locked(b, b->received++, "", err);
        dm_status_free(err);
        b->reading = true;
        pthread_mutex_unlock(&b->mu);
        dm_call_recv(call, bulk_on_message, b);
        return;
    }
    if (err) {
        if (!b->fatal)
            b->fatal = err;
        else
            dm_status_free(err);
    } else if (!msg) {
        b->eof = true;
    } else if (b->received >= BULK_MAX_MESSAGES) {
        protobuf_c_message_free_unpacked(msg, NULL);
        msg = NULL;
        if (!b->fatal)
            b->fatal = dm_status_new(GRPC_STATUS_RESOURCE_EXHAUSTED,
                                     "stream: at most %d messages per BulkPutRecords call "
                                     "(the first %d were processed)",
                                     BULK_MAX_MESSAGES, BULK_MAX_MESSAGES);
    }
    if (!msg || b->fatal) {
        if (msg)
            protobuf_c_message_free_unpacked(msg, NULL);
        bool end = bulk_should_end(b);
        if (end)
            b->done = true;
        pthread_mutex_unlock(&b->mu);
        if (end)
            bulk_end(b);
        return;
    }
    int index = b->received++;
    /* The put goes on alone (owned by its context): the message around it is freed here. */
    Domicile__V1__BulkPutRecordsRequest *wrap = (Domicile__V1__BulkPutRecordsRequest *)msg;
    put_req_t *req = wrap->put;
    wrap->put = NULL;
    protobuf_c_message_free_unpacked(msg, NULL);
    bool has_expected = false;
    int64_t expected = 0;
    dm_status_t *st = req ? check_put(req, &has_expected, &expected)
                          : dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "put: required");
    if (st) {
        bulk_note_failure_locked(b, index, req ? req->record_id : "", st);
        dm_status_free(st);
        if (req)
            protobuf_c_message_free_unpacked(&req->base, NULL);
        b->reading = true; /* next message at once */
        pthread_mutex_unlock(&b->mu);
        dm_call_recv(call, bulk_on_message, b);
        return;
    }
    rec_ctx_t *op = dm_calloc(1, sizeof(*op));
    op->call = call;
    op->app = b->app;
    op->bulk = b;
    op->index = index;
    op->put_req = req;
    op->bulk_has_expected = has_expected;
    op->bulk_expected = expected;
    bool park = bulk_conflicts_locked(b, op);
    if (park)
        b->parked = op; /* reading stops until the messages in flight end */
    else
        bulk_fly_locked(b, op);
    bool read = bulk_want_read_locked(b);
    pthread_mutex_unlock(&b->mu);

    if (read)
        dm_call_recv(call, bulk_on_message, b);
    if (!park)
        put_start(op, has_expected, expected);
}

void dm_records_bulk_put(dm_call_t *call)
{
    bulk_t *b = dm_calloc(1, sizeof(*b));
    b->call = call;
    b->app = APP(call);
    pthread_mutex_init(&b->mu, NULL);
    b->reading = true;
    dm_call_set_data(call, b, bulk_free);
    dm_call_recv(call, bulk_on_message, b);
}

/* ---- GetRecord ----------------------------------------------------------------------- */

static void reply_record(dm_call_t *call, Domicile__V1__Record *rec)
{
    Domicile__V1__GetRecordResponse rep = DOMICILE__V1__GET_RECORD_RESPONSE__INIT;
    rep.record = rec;
    dm_call_reply(call, &rep.base);
}

static void get_logged(void *arg, dm_status_t *err)
{
    rec_ctx_t *c = arg;
    if (err) {
        dm_call_finish(c->call, err); /* not logged: not sent */
        return;
    }
    reply_record(c->call, &c->rec);
}

static void get_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    rec_ctx_t *c = job->arg;
    const Domicile__V1__GetRecordRequest *req =
        (const Domicile__V1__GetRecordRequest *)dm_call_request(c->call);
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    if (PQntuples(res) != 1) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_NOT_FOUND, "record not found"));
        return;
    }
    if (dm_pg_bool(res, 0, 6)) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                                              "record is restricted: processing of its data "
                                              "subject's data is restricted"));
        return;
    }
    if (dm_pg_bool(res, 0, 13)) {
        dm_call_finish(c->call,
                       dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                                     "the record's data subject objected to processing for "
                                     "purpose \"%s\"",
                                     dm_call_purpose(c->call)));
        return;
    }
    /* The record (pointing into the result) waits in the context until it may leave. */
    c->held = PQcopyResult(res, PG_COPYRES_ATTRS | PG_COPYRES_TUPLES);
    Domicile__V1__Record *rec = &c->rec;
    domicile__v1__record__init(rec);
    record_from_row(rec, c->held, 0, req->customer_id, c->region_code, c->sk_hex);
    dm_status_t *st = open_payload(c, c->held, 0, req->customer_id, rec);
    if (st) {
        log_data_loss(c, rec->record_id);
        dm_call_finish(c->call, st);
        return;
    }
    if (!c->xfer.cross) {
        reply_record(c->call, rec);
        return;
    }
    if (rec->has_subject) {
        int len;
        memcpy(c->row_subject, dm_pg_bytes(c->held, 0, 2, &len), DM_SUBJECT_KEY_LEN);
        c->xfer.subject_key = c->row_subject;
    }
    /* Write-ahead: the entry is committed in the record's region before the reply leaves. */
    dm_xfer_log(c->call, &c->xfer, 1, (int64_t)rec->payload.len, rec->record_id, get_logged, c);
}

static void get_gated(void *arg, dm_status_t *err)
{
    rec_ctx_t *c = arg;
    const Domicile__V1__GetRecordRequest *req =
        (const Domicile__V1__GetRecordRequest *)dm_call_request(c->call);
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    job_init(c, DM_SQL_GET_RECORD, get_done, false);
    dm_job_param_text(&c->job, 0, req->customer_id);
    dm_job_param_text(&c->job, 1, req->record_id);
    dm_job_param_text(&c->job, 2, dm_call_purpose(c->call));
    dm_region_submit(c->region, &c->job);
}

static void get_resolved(void *arg, dm_region_t *r, const char *state, dm_status_t *err)
{
    rec_ctx_t *c = arg;
    const Domicile__V1__GetRecordRequest *req =
        (const Domicile__V1__GetRecordRequest *)dm_call_request(c->call);
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    c->xfer.record_id = req->record_id;
    read_gate(c, r, "GetRecord", req->customer_id, get_gated);
}

void dm_records_get(dm_call_t *call)
{
    const Domicile__V1__GetRecordRequest *req =
        (const Domicile__V1__GetRecordRequest *)dm_call_request(call);
    dm_status_t *st;
    if ((st = dm_check_customer_id("customer_id", req->customer_id)) ||
        (st = dm_check_record_id("record_id", req->record_id))) {
        dm_call_finish(call, st);
        return;
    }
    rec_ctx_t *c = ctx_new(call);
    dm_api_route(call, req->customer_id, get_resolved, c);
}

/* ---- ListRecords --------------------------------------------------------------------- */

static void list_next(rec_ctx_t *c);

static bool send_end(rec_ctx_t *c, const char *token)
{
    Domicile__V1__ListRecordsResponse msg = DOMICILE__V1__LIST_RECORDS_RESPONSE__INIT;
    Domicile__V1__ListRecordsPage end = DOMICILE__V1__LIST_RECORDS_PAGE__INIT;
    end.next_page_token = (char *)token;
    msg.item_case = DOMICILE__V1__LIST_RECORDS_RESPONSE__ITEM_END;
    msg.end = &end;
    return dm_call_send(c->call, &msg.base);
}

/* The filters a token belongs to (customer, kind, subject): a token is valid only with the
 * listing it came from, so one used with other filters is refused instead of being read as a
 * position in another listing. */
static void list_tag(const char *customer, const char *kind, const unsigned char *sk,
                     char out[PAGE_TOKEN_TAG + 1])
{
    unsigned char h[32];
    DM_FINGERPRINT(h, DM_AAD_STR("ListRecords"), DM_AAD_STR(customer), DM_AAD_STR(kind),
                   DM_AAD_BYTES(sk ? (const void *)sk : "", sk ? DM_SUBJECT_KEY_LEN : 0));
    dm_hex_encode(h, PAGE_TOKEN_TAG / 2, out);
}

static char *make_token(const char *tag, const char *last)
{
    size_t n = strlen(last);
    char *hex = dm_malloc(2 * n + 1);
    dm_hex_encode((const unsigned char *)last, n, hex);
    char *tok = dm_sprintf(PAGE_TOKEN_PREFIX "%s%s", tag, hex);
    free(hex);
    return tok;
}

static dm_status_t *parse_token(const char *tok, const char *tag, char **after)
{
    size_t n = strlen(tok);
    *after = NULL;
    if (n == 0) {
        *after = dm_strdup("");
        return NULL;
    }
    size_t plen = strlen(PAGE_TOKEN_PREFIX) + PAGE_TOKEN_TAG;
    size_t hlen = n - plen;
    if (n > 1024 || n <= plen || strncmp(tok, PAGE_TOKEN_PREFIX, strlen(PAGE_TOKEN_PREFIX)) != 0 ||
        hlen % 2 != 0 || hlen / 2 > DM_RECORD_ID_MAX)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "page_token: not a token returned by ListRecords");
    if (memcmp(tok + strlen(PAGE_TOKEN_PREFIX), tag, PAGE_TOKEN_TAG) != 0)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "page_token: valid only with the customer_id, kind and subject of "
                             "the listing it came from");
    char *id = dm_calloc(1, hlen / 2 + 1);
    if (!dm_hex_decode(tok + plen, (unsigned char *)id, hlen / 2) || strlen(id) != hlen / 2) {
        free(id);
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "page_token: not a token returned by ListRecords");
    }
    *after = id;
    return NULL;
}

static void list_maybe_next(rec_ctx_t *c)
{
    /* Flow control: the next query runs only when what we queued has been taken by the
     * transport, so a slow reader slows the database reads and memory stays bounded. */
    if (dm_call_queued(c->call) == 0 && atomic_exchange(&c->awaiting_drain, false))
        list_next(c);
}

static void list_drained(dm_call_t *call, void *arg)
{
    list_maybe_next(arg);
}

/* How many rows of a chunk's result go out: we asked for one more row than we send (is there
 * a next chunk?), and with payloads only the rows within the payload budget (column 14; the
 * first row always is). */
static int chunk_rows(const rec_ctx_t *c, const PGresult *res)
{
    int chunk = atoi(c->limit_s) - 1;
    int rows = PQntuples(res);
    int n = rows > chunk ? chunk : rows;
    if (c->with_payload)
        for (int i = 1; i < n; i++)
            if (!dm_pg_bool(res, i, 14))
                return i;
    return n;
}

/* Send the rows of one chunk (c->held), then the end or the next chunk. */
static void list_emit(rec_ctx_t *c)
{
    const Domicile__V1__ListRecordsRequest *req =
        (const Domicile__V1__ListRecordsRequest *)dm_call_request(c->call);
    PGresult *res = c->held;
    int rows = PQntuples(res);
    int to_send = chunk_rows(c, res);
    for (int i = 0; i < to_send; i++) {
        Domicile__V1__Record rec = DOMICILE__V1__RECORD__INIT;
        Domicile__V1__ListRecordsResponse msg = DOMICILE__V1__LIST_RECORDS_RESPONSE__INIT;
        char sk_hex[2 * DM_SUBJECT_KEY_LEN + 1];
        record_from_row(&rec, res, i, req->customer_id, c->region_code, sk_hex);
        rec.purpose_objected = dm_pg_bool(res, i, 13);
        if (c->with_payload && !rec.restricted && !rec.purpose_objected) {
            dm_status_t *st = open_payload(c, res, i, req->customer_id, &rec);
            if (st) {
                log_data_loss(c, rec.record_id);
                record_dispose(&rec);
                dm_call_finish(c->call, st);
                return;
            }
        }
        msg.item_case = DOMICILE__V1__LIST_RECORDS_RESPONSE__ITEM_RECORD;
        msg.record = &rec;
        bool alive = dm_call_send(c->call, &msg.base);
        if (i == to_send - 1) {
            free(c->after);
            c->after = dm_strdup(rec.record_id);
        }
        record_dispose(&rec);
        if (!alive) {
            dm_call_finish(c->call, dm_status_new(GRPC_STATUS_CANCELLED, "stream cancelled"));
            return;
        }
    }
    PQclear(c->held);
    c->held = NULL;
    c->remaining -= to_send;
    bool more = rows > to_send;
    if (!more || c->remaining == 0) {
        char *tok = more ? make_token(c->tag, c->after) : dm_strdup("");
        send_end(c, tok);
        free(tok);
        dm_call_finish(c->call, NULL);
        return;
    }
    atomic_store(&c->awaiting_drain, true);
    list_maybe_next(c);
}

static void list_logged(void *arg, dm_status_t *err)
{
    rec_ctx_t *c = arg;
    if (err) {
        dm_call_finish(c->call, err); /* not logged: this chunk is not sent */
        return;
    }
    list_emit(c);
}

static void list_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    rec_ctx_t *c = job->arg;
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    c->held = PQcopyResult(res, PG_COPYRES_ATTRS | PG_COPYRES_TUPLES);
    int to_send = chunk_rows(c, res);
    if (!c->xfer.cross || to_send == 0) {
        list_emit(c);
        return;
    }
    /* One entry per chunk, committed before the chunk is sent: its records, their payload
     * bytes (when payloads go out) and their ids. */
    int64_t bytes = 0;
    size_t ids_len = 0;
    for (int i = 0; i < to_send; i++) {
        if (c->with_payload && !dm_pg_bool(res, i, 6) && !dm_pg_bool(res, i, 13))
            bytes += dm_pg_int4(res, i, 9);
        ids_len += (size_t)PQgetlength(res, i, 0) + 1;
    }
    char *ids = dm_malloc(ids_len + 1), *p = ids;
    for (int i = 0; i < to_send; i++) {
        int len;
        const char *id = dm_pg_bytes(res, i, 0, &len);
        if (i)
            *p++ = '\x1f';
        memcpy(p, id, (size_t)len);
        p += len;
    }
    *p = '\0';
    dm_xfer_log(c->call, &c->xfer, to_send, bytes, ids, list_logged, c);
    free(ids);
}

static void list_next(rec_ctx_t *c)
{
    const Domicile__V1__ListRecordsRequest *req =
        (const Domicile__V1__ListRecordsRequest *)dm_call_request(c->call);
    int chunk = LIST_CHUNK;
    if (chunk > c->remaining)
        chunk = c->remaining;
    snprintf(c->limit_s, sizeof(c->limit_s), "%d", chunk + 1);
    job_init(c, DM_SQL_LIST_RECORDS, list_done, false);
    dm_job_param_text(&c->job, 0, req->customer_id);
    dm_job_param_text(&c->job, 1, req->kind);
    if (c->has_subject)
        dm_job_param_bin(&c->job, 2, c->subject_key, DM_SUBJECT_KEY_LEN);
    else
        dm_job_param_text(&c->job, 2, NULL);
    dm_job_param_text(&c->job, 3, c->after);
    dm_job_param_text(&c->job, 4, c->limit_s);
    dm_job_param_text(&c->job, 5, c->with_payload ? "true" : "false");
    dm_job_param_text(&c->job, 6, dm_call_purpose(c->call));
    dm_job_param_text(&c->job, 7, LIST_PAYLOAD_BUDGET);
    dm_region_submit(c->region, &c->job);
}

static void list_gated(void *arg, dm_status_t *err)
{
    rec_ctx_t *c = arg;
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    dm_call_on_drain(c->call, list_drained, c);
    list_next(c);
}

static void list_resolved(void *arg, dm_region_t *r, const char *state, dm_status_t *err)
{
    rec_ctx_t *c = arg;
    const Domicile__V1__ListRecordsRequest *req =
        (const Domicile__V1__ListRecordsRequest *)dm_call_request(c->call);
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    read_gate(c, r, "ListRecords", req->customer_id, list_gated);
}

void dm_records_list(dm_call_t *call)
{
    const Domicile__V1__ListRecordsRequest *req =
        (const Domicile__V1__ListRecordsRequest *)dm_call_request(call);
    dm_status_t *st;
    if ((st = dm_check_customer_id("customer_id", req->customer_id)) ||
        (st = dm_check_kind("kind", req->kind, true)) ||
        (st = dm_check_page_size("page_size", req->page_size, LIST_MAX_PAGE))) {
        dm_call_finish(call, st);
        return;
    }
    rec_ctx_t *c = ctx_new(call);
    c->remaining = req->page_size ? req->page_size : LIST_DEFAULT_PAGE;
    c->with_payload = req->include_payload;
    if ((st =
             dm_subject_to_key(c->app, "subject", req->subject, &c->has_subject, c->subject_key))) {
        dm_call_finish(call, st);
        return;
    }
    list_tag(req->customer_id, req->kind, c->has_subject ? c->subject_key : NULL, c->tag);
    if ((st = parse_token(req->page_token, c->tag, &c->after))) {
        dm_call_finish(call, st);
        return;
    }
    dm_api_route(call, req->customer_id, list_resolved, c);
}

/* ---- DeleteRecord -------------------------------------------------------------------- */

static void delete_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    rec_ctx_t *c = job->arg;
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    int len;
    const char *status = dm_pg_bytes(res, 0, 0, &len);
    if (strcmp(status, "ok") == 0 || strcmp(status, "replayed") == 0) {
        Domicile__V1__DeleteRecordResponse rep = DOMICILE__V1__DELETE_RECORD_RESPONSE__INIT;
        rep.deleted = dm_pg_bool(res, 0, 1);
        rep.version = dm_pg_int8(res, 0, 2);
        rep.replayed = status[0] == 'r';
        dm_call_reply(c->call, &rep.base);
    } else if (strcmp(status, "version_mismatch") == 0) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                                              "record version is %lld, expected_version was %s",
                                              (long long)dm_pg_int8(res, 0, 2), c->expected_s));
    } else if (strcmp(status, "customer_closed") == 0) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                                              "customer is closed: records are read-only"));
    } else if (strcmp(status, "no_customer") == 0) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_NOT_FOUND, "customer not found"));
    } else if (strcmp(status, "request_id_reused") == 0) {
        dm_call_finish(c->call, dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                              "request_id: already used for a different request"));
    } else {
        dm_call_finish(c->call,
                       dm_status_new(GRPC_STATUS_INTERNAL,
                                     "unexpected delete_record outcome \"%.32s\"", status));
    }
}

static void delete_resolved(void *arg, dm_region_t *r, const char *state, dm_status_t *err)
{
    rec_ctx_t *c = arg;
    const Domicile__V1__DeleteRecordRequest *req =
        (const Domicile__V1__DeleteRecordRequest *)dm_call_request(c->call);
    if (err) {
        dm_call_finish(c->call, err);
        return;
    }
    set_region(c, r);
    job_init(c, DM_SQL_DELETE_RECORD, delete_done, true);
    dm_job_param_text(&c->job, 0, req->customer_id);
    dm_job_param_text(&c->job, 1, req->request_id);
    dm_job_param_bin(&c->job, 2, c->fingerprint, sizeof(c->fingerprint));
    dm_job_param_text(&c->job, 3, req->record_id);
    dm_job_param_text(&c->job, 4, c->expected_s[0] ? c->expected_s : NULL);
    dm_region_submit(r, &c->job);
}

void dm_records_delete(dm_call_t *call)
{
    const Domicile__V1__DeleteRecordRequest *req =
        (const Domicile__V1__DeleteRecordRequest *)dm_call_request(call);
    dm_status_t *st;
    int64_t expected = 0;
    if ((st = dm_check_request_id("request_id", req->request_id)) ||
        (st = dm_check_customer_id("customer_id", req->customer_id)) ||
        (st = dm_check_record_id("record_id", req->record_id))) {
        dm_call_finish(call, st);
        return;
    }
    bool has_expected = expected_of(req->expected_case,
                                    DOMICILE__V1__DELETE_RECORD_REQUEST__EXPECTED_EXPECTED_VERSION,
                                    req->expected_version, &expected, &st);
    if (!st && has_expected && expected == 0)
        st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                           "expected_version: must be >= 1 when set (a record that does not "
                           "exist cannot be deleted)");
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    rec_ctx_t *c = ctx_new(call);
    if (has_expected)
        snprintf(c->expected_s, sizeof(c->expected_s), "%lld", (long long)expected);
    DM_FINGERPRINT(c->fingerprint, DM_AAD_STR("DeleteRecord"), DM_AAD_STR(req->customer_id),
                   DM_AAD_STR(req->record_id), DM_AAD_STR(c->expected_s));
    dm_api_route(call, req->customer_id, delete_resolved, c);
}
