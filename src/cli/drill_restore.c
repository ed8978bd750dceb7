/*
 * domicilectl drill restore --region R: a restore from backup under load (issue 16).
 *
 * Under a write/read load on every region: take a backup of R; then register a customer in R,
 * write, erase two data subjects, restrict one, object for another, close an account; restore
 * R to the backup (deploy/local/domicile-local restore). Then prove what an operator must show
 * a regulator: no erased subject's record is readable through any gateway, and none is left
 * (records or keys) in the restored data; restrictions and objections are refused again; the
 * closed account is closed; the report lists exactly the acknowledged writes the restore lost
 * (those that started after the restore point) and nothing else is missing; the other regions
 * saw no error; the ledger of R verifies and names the cut. And it measures the time from the
 * restore to R serving again.
 *
 * Threads: one load worker per region (shares only atomics and its own lists with the main
 * thread until joined), one prober of R during the restore; the main thread runs the steps.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "domicile/client.h"
#include "domicile/clock.h"
#include "domicile/v1/customers.pb-c.h"
#include "domicile/v1/records.pb-c.h"
#include "domicile/v1/subject_rights.pb-c.h"
#include "domicile/v1/transfers.pb-c.h"

#include "cli.h"
#include "drill_common.h"

#define SVC_CUST    "/domicile.v1.CustomersService/"
#define SVC_DSR     "/domicile.v1.SubjectRightsService/"
#define SVC_XFER    "/domicile.v1.TransfersService/"
#define SERVE_MS    120000 /* from the restore until R must serve again */
#define DSR_WAIT_MS 30000
#define LOST_MAX    500 /* lost writes listed in the report */
#define N_SUBJECTS  4   /* erase, erase, restrict, object */

typedef struct {
    char *record_id, *request_id, *payload;
    int64_t started_ms, acked_ms; /* wall clock (the restore point is the database's) */
} ack_t;

typedef struct {
    ack_t *v;
    size_t n, cap;
} acks_t;

typedef struct rdrill rdrill_t;

typedef struct {
    rdrill_t *d;
    int region;
    pthread_t thread;
    uint64_t rng;
    long seq;
    acks_t acked;
    long calls, errors, err[DM_CTL_N_CODES];
    char *first_error; /* owned */
} lworker_t;

struct rdrill {
    dm_ctl_drill_env_t env; /* env.token_admin: the principal of every call */
    char *gw[DM_CTL_N_REGIONS];
    char run_id[64], customer[DM_CTL_N_REGIONS][96], c_new[96], c_close[96];
    char subject[N_SUBJECTS][96], subject_key[N_SUBJECTS][65], dsr_id[N_SUBJECTS][96];
    atomic_bool stop, restoring;
    lworker_t w[DM_CTL_N_REGIONS];
    /* the prober during the restore */
    pthread_t prober;
    atomic_bool probing;
    char held_message[512];
    long probe_unavailable;
};

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The admin at region r's gateway. */
static dm_client_t *client(const rdrill_t *d, int r)
{
    return dm_ctl_drill_client(&d->env, d->gw[r], d->env.token_admin);
}

static char *sql(const rdrill_t *d, const char *q)
{
    return dm_ctl_drill_sql(&d->env, d->env.target, q);
}

/* "2026-12-06 23:02:37.019586+00" -> ms since the epoch; -1 if it is not that. */
static int64_t parse_point(const char *s)
{
    struct tm tm;
    memset(&tm, 0, sizeof(tm));
    const char *rest = strptime(s, "%Y-%m-%d %H:%M:%S", &tm);
    if (!rest)
        return -1;
    int64_t ms = (int64_t)timegm(&tm) * 1000;
    if (*rest == '.') {
        int64_t scale = 100;
        for (rest++; *rest >= '0' && *rest <= '9'; rest++, scale /= 10)
            ms += scale > 0 ? (*rest - '0') * scale : 0;
    }
    return ms;
}

/* A call repeated while it fails transiently, for up to `ms`. */
static dm_status_t *call(dm_client_t *c, const rdrill_t *d, const char *path,
                         const ProtobufCMessage *req, const ProtobufCMessageDescriptor *desc,
                         ProtobufCMessage **resp, int64_t ms)
{
    return dm_ctl_drill_call(&d->env, c, path, req, desc, resp, ms, 100, dm_ctl_transient);
}

/* A step's call whose answer is only that it succeeded; on failure "cannot WHAT ID". */
static bool call_done(dm_client_t *c, const rdrill_t *d, const char *path,
                      const ProtobufCMessage *req, const ProtobufCMessageDescriptor *desc,
                      const char *what, const char *id)
{
    ProtobufCMessage *resp = NULL;
    dm_status_t *st = call(c, d, path, req, desc, &resp, 15000);
    if (st) {
        fprintf(stderr, "domicilectl: drill: cannot %s %s: %s\n", what, id, st->message);
        dm_status_free(st);
        return false;
    }
    protobuf_c_message_free_unpacked(resp, NULL);
    return true;
}

/* ---- the load ------------------------------------------------------------------------ */

static grpc_status_code put(dm_client_t *c, const rdrill_t *d, const char *customer,
                            const char *record_id, const char *request_id, const char *subject,
                            const char *payload, char **why)
{
    dm_ctl_put_t w = {customer, record_id, request_id,     subject ? subject : "",
                      NULL,     payload,   strlen(payload)};
    dm_status_t *st = dm_ctl_drill_put(&d->env, c, &w, NULL);
    if (!st)
        return GRPC_STATUS_OK;
    grpc_status_code code = st->code;
    if (why)
        *why = dm_sprintf("PutRecord: %s: %s", dm_status_code_name(code), st->message);
    dm_status_free(st);
    return code;
}

/* GetRecord: OK with the payload (caller frees *payload), or the status code and message. */
static grpc_status_code get(dm_client_t *c, const rdrill_t *d, const char *customer,
                            const char *record_id, char **payload, char *msg, size_t msg_len)
{
    Domicile__V1__GetRecordResponse *resp;
    dm_status_t *st = dm_ctl_drill_get(&d->env, c, customer, record_id, &resp);
    if (st) {
        grpc_status_code code = st->code;
        if (msg)
            snprintf(msg, msg_len, "%s", st->message);
        dm_status_free(st);
        return code;
    }
    const Domicile__V1__Record *rec = resp->record;
    if (payload)
        *payload = rec ? dm_strndup((const char *)rec->payload.data, rec->payload.len) : NULL;
    protobuf_c_message_free_unpacked(&resp->base, NULL);
    return GRPC_STATUS_OK;
}

static void count_error(lworker_t *w, grpc_status_code code, char *why)
{
    w->errors++;
    w->err[dm_ctl_code_index(code)]++;
    if (!w->first_error)
        w->first_error = why;
    else
        free(why);
}

/* Writes go on until acknowledged (same request id: a retry after UNAVAILABLE never writes
 * twice); the drilled region's errors while it is being restored are expected, and counted
 * apart from the other regions'. */
static void *worker_main(void *arg)
{
    lworker_t *w = arg;
    rdrill_t *d = w->d;
    dm_client_t *c = client(d, w->region);
    int64_t period = (int64_t)(1000.0 / d->env.rate);
    if (period < 1)
        period = 1;
    while (!atomic_load(&d->stop)) {
        unsigned op =
            (unsigned)(w->rng = w->rng * 6364136223846793005ULL + 1442695040888963407ULL) >> 20;
        if (op % 100 < 60 || w->acked.n == 0) {
            w->seq++;
            ack_t a;
            a.record_id = dm_sprintf("w-%ld", w->seq);
            a.request_id = dm_sprintf("%s-%s-%ld", d->run_id, dm_ctl_regions[w->region], w->seq);
            a.payload = dm_sprintf("payload %s %ld", dm_ctl_regions[w->region], w->seq);
            a.started_ms = wall_ms();
            for (;;) {
                char *why = NULL;
                int64_t started = wall_ms();
                w->calls++;
                grpc_status_code code = put(c, d, d->customer[w->region], a.record_id, a.request_id,
                                            NULL, a.payload, &why);
                if (code == GRPC_STATUS_OK) {
                    /* The attempt that committed started at `started` at the earliest. */
                    a.started_ms = started;
                    a.acked_ms = wall_ms();
                    if (w->acked.n == w->acked.cap)
                        w->acked.v = dm_realloc(
                            w->acked.v,
                            (w->acked.cap = w->acked.cap ? w->acked.cap * 2 : 256) * sizeof(ack_t));
                    w->acked.v[w->acked.n++] = a;
                    free(why);
                    break;
                }
                count_error(w, code, why);
                if (!dm_ctl_transient(code) || atomic_load(&d->stop)) {
                    free(a.record_id);
                    free(a.request_id);
                    free(a.payload);
                    break;
                }
                dm_ctl_sleep_ms(100);
            }
        } else {
            const ack_t *a = &w->acked.v[(w->rng >> 33) % w->acked.n];
            char msg[256];
            w->calls++;
            grpc_status_code code =
                get(c, d, d->customer[w->region], a->record_id, NULL, msg, sizeof(msg));
            /* A read of a write the restore took away is NOT_FOUND: not a load error. */
            if (code != GRPC_STATUS_OK && code != GRPC_STATUS_NOT_FOUND)
                count_error(w, code,
                            dm_sprintf("GetRecord: %s: %s", dm_status_code_name(code), msg));
        }
        dm_ctl_sleep_ms(period);
    }
    dm_client_destroy(c);
    return NULL;
}

/* While the restore runs: what R's gateways answer (the hold's message). */
static void *prober_main(void *arg)
{
    rdrill_t *d = arg;
    dm_client_t *c = client(d, d->env.target);
    while (atomic_load(&d->probing)) {
        char msg[512];
        grpc_status_code code =
            get(c, d, d->customer[d->env.target], "base-1", NULL, msg, sizeof(msg));
        if (code == GRPC_STATUS_UNAVAILABLE) {
            d->probe_unavailable++;
            if (strstr(msg, "restored from a backup") && !d->held_message[0])
                snprintf(d->held_message, sizeof(d->held_message), "%s", msg);
        }
        dm_ctl_sleep_ms(50);
    }
    dm_client_destroy(c);
    return NULL;
}

/* ---- the steps ----------------------------------------------------------------------- */

static bool register_customer(dm_client_t *c, const rdrill_t *d, const char *id, int region)
{
    Domicile__V1__RegisterCustomerRequest r = DOMICILE__V1__REGISTER_CUSTOMER_REQUEST__INIT;
    char *rid = dm_sprintf("%s-reg", id);
    r.request_id = rid;
    r.customer_id = (char *)id;
    r.residency = (char *)dm_ctl_regions[region];
    r.display_name = "restore drill";
    bool ok = call_done(c, d, SVC_CUST "RegisterCustomer", &r.base,
                        &domicile__v1__register_customer_response__descriptor, "register", id);
    free(rid);
    return ok;
}

/* File a data-subject request (kind 0 erase, 1 restrict, 2 object "support") and wait until
 * it is done in every region. */
static bool file_dsr(dm_client_t *c, rdrill_t *d, int i, int kind)
{
    ProtobufCMessage *resp = NULL;
    dm_status_t *st;
    snprintf(d->dsr_id[i], sizeof(d->dsr_id[i]), "%s-dsr-%d", d->run_id, i);
    if (kind == 0) {
        Domicile__V1__EraseRequest r = DOMICILE__V1__ERASE_REQUEST__INIT;
        r.request_id = d->dsr_id[i];
        r.subject = d->subject[i];
        r.customer_id = d->customer[d->env.target];
        r.reason = "restore drill";
        st = call(c, d, SVC_DSR "Erase", &r.base, &domicile__v1__erase_response__descriptor, &resp,
                  15000);
    } else if (kind == 1) {
        Domicile__V1__RestrictProcessingRequest r = DOMICILE__V1__RESTRICT_PROCESSING_REQUEST__INIT;
        r.request_id = d->dsr_id[i];
        r.subject = d->subject[i];
        r.customer_id = d->customer[d->env.target];
        r.reason = "restore drill";
        st = call(c, d, SVC_DSR "RestrictProcessing", &r.base,
                  &domicile__v1__restrict_processing_response__descriptor, &resp, 15000);
    } else {
        Domicile__V1__ObjectRequest r = DOMICILE__V1__OBJECT_REQUEST__INIT;
        r.request_id = d->dsr_id[i];
        r.subject = d->subject[i];
        r.customer_id = d->customer[d->env.target];
        r.purpose = "support";
        r.reason = "restore drill";
        st = call(c, d, SVC_DSR "Object", &r.base, &domicile__v1__object_response__descriptor,
                  &resp, 15000);
    }
    if (st) {
        fprintf(stderr, "domicilectl: drill: request %d: %s\n", i, st->message);
        dm_status_free(st);
        return false;
    }
    protobuf_c_message_free_unpacked(resp, NULL);
    int64_t until = dm_mono_ms() + DSR_WAIT_MS;
    while (dm_mono_ms() < until) {
        Domicile__V1__GetRequestRequest g = DOMICILE__V1__GET_REQUEST_REQUEST__INIT;
        g.request_id = d->dsr_id[i];
        st =
            dm_client_unary(c, SVC_DSR "GetRequest", &g.base,
                            &domicile__v1__get_request_response__descriptor, d->env.call_ms, &resp);
        if (!st) {
            const Domicile__V1__DsrRequest *q = ((Domicile__V1__GetRequestResponse *)resp)->request;
            bool done = q && q->state == DOMICILE__V1__DSR_STATE__DSR_STATE_DONE;
            if (q)
                snprintf(d->subject_key[i], sizeof(d->subject_key[i]), "%s", q->subject_key_hex);
            protobuf_c_message_free_unpacked(resp, NULL);
            if (done)
                return true;
        }
        dm_status_free(st);
        dm_ctl_sleep_ms(100);
    }
    fprintf(stderr, "domicilectl: drill: request %s not done after %d ms\n", d->dsr_id[i],
            DSR_WAIT_MS);
    return false;
}

static bool close_customer(dm_client_t *c, const rdrill_t *d, const char *id)
{
    Domicile__V1__CloseCustomerRequest r = DOMICILE__V1__CLOSE_CUSTOMER_REQUEST__INIT;
    char *rid = dm_sprintf("%s-close", id);
    r.request_id = rid;
    r.customer_id = (char *)id;
    r.reason = "restore drill";
    bool ok = call_done(c, d, SVC_CUST "CloseCustomer", &r.base,
                        &domicile__v1__close_customer_response__descriptor, "close", id);
    free(rid);
    return ok;
}

/* The customer's state (a Customer.state value), -code on failure. */
static int customer_state(dm_client_t *c, const rdrill_t *d, const char *id)
{
    Domicile__V1__GetCustomerRequest r = DOMICILE__V1__GET_CUSTOMER_REQUEST__INIT;
    r.customer_id = (char *)id;
    ProtobufCMessage *resp = NULL;
    dm_status_t *st = call(c, d, SVC_CUST "GetCustomer", &r.base,
                           &domicile__v1__get_customer_response__descriptor, &resp, 10000);
    if (st) {
        int code = -(int)st->code;
        dm_status_free(st);
        return code;
    }
    const Domicile__V1__Customer *cu = ((Domicile__V1__GetCustomerResponse *)resp)->customer;
    int s = cu ? (int)cu->state : 0;
    protobuf_c_message_free_unpacked(resp, NULL);
    return s;
}

static const char *subject_record(int i)
{
    static const char *const ids[N_SUBJECTS] = {"erase-1", "erase-2", "restrict-1", "object-1"};
    return ids[i];
}

static void usage(FILE *f)
{
    fputs("usage: domicilectl [--addr H:P] [--timeout MS] drill restore --region REGION\n"
          "         [--state DIR] [--json FILE|-] [--rate N] [--gateway REGION=H:P]...\n"
          "         [--domicile-local PATH]\n"
          "  Against the deploy/local regions (state DIR) and their running gateways (the\n"
          "  state's, or --gateway for each region): under a load on every region (N calls per\n"
          "  second each, default 20), take a backup of REGION, then register a customer there,\n"
          "  write, erase two subjects, restrict one, object for one, close an account;\n"
          "  restore REGION to the backup, and check that no erased subject is readable or left\n"
          "  in the restored data, that the restriction and the objection hold, that the\n"
          "  account is closed, that exactly the writes after the restore point were lost, that\n"
          "  the other regions saw no error and that the ledger verifies across the cut.\n"
          "  Exit status: 0 passed, 1 a goal missed, 2 usage or set-up, 3 a step failed.\n",
          f);
}

static int parse(rdrill_t *d, int argc, char **argv)
{
    static const struct option opts[] = {DM_CTL_DRILL_OPTIONS, {NULL, 0, NULL, 0}};
    const char *region = NULL;
    int opt;
    optind = 0;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        int rc = dm_ctl_drill_option(&d->env, opt, optarg, &region, 500, usage);
        if (rc != 1) {
            if (rc)
                return rc;
            continue;
        }
        if (opt != DM_CTL_DRILL_OPT_GATEWAY) {
            usage(stderr);
            return DM_EXIT_USAGE;
        }
        const char *addr;
        int r = dm_ctl_drill_gateway_arg(optarg, &addr);
        if (r < 0) {
            fprintf(stderr, "domicilectl: --gateway wants REGION=HOST:PORT, not \"%s\"\n", optarg);
            return DM_EXIT_USAGE;
        }
        if (!d->gw[r])
            d->gw[r] = dm_strdup(addr);
    }
    return dm_ctl_drill_args_end(&d->env, argc, region, usage);
}

/* Ack classes against the restore point P (wall clock ms): an attempt acknowledged before P
 * committed before it and must be there; one that started after P committed after it and
 * must be lost (unless it ran after the restore); one that straddles P may be either. */
typedef struct {
    long present_ok, lost, unexplained_missing, unexpectedly_present, straddling, after_restore;
    json_t *lost_list;
} classes_t;

static bool drill_run(rdrill_t *d, json_t *rep)
{
    dm_client_t *c = client(d, 0);
    bool ok = true;
    int t = d->env.target;
    char buf[512];

    /* set-up: customers, and the subjects' records that the backup will hold */
    for (int r = 0; r < DM_CTL_N_REGIONS && ok; r++)
        ok = register_customer(c, d, d->customer[r], r);
    ok = ok && register_customer(c, d, d->c_close, t);
    for (int i = 0; i < N_SUBJECTS && ok; i++) {
        char *rid = dm_sprintf("%s-subj-%d", d->run_id, i);
        ok = put(c, d, d->customer[t], subject_record(i), rid, d->subject[i], "personal data",
                 NULL) == GRPC_STATUS_OK;
        free(rid);
    }
    char *rid = dm_sprintf("%s-base-1", d->run_id);
    ok = ok && put(c, d, d->customer[t], "base-1", rid, NULL, "base", NULL) == GRPC_STATUS_OK;
    free(rid);
    if (!ok) {
        dm_client_destroy(c);
        return false;
    }

    /* the load */
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        d->w[r].d = d;
        d->w[r].region = r;
        d->w[r].rng = (uint64_t)wall_ms() * 2654435761u + (uint64_t)r;
        pthread_create(&d->w[r].thread, NULL, worker_main, &d->w[r]);
    }
    dm_ctl_sleep_ms(1500);

    /* the backup */
    int64_t t0 = dm_mono_ms();
    char *label = NULL;
    const char *bargs[] = {"backup", dm_ctl_regions[t], NULL};
    int rc = dm_ctl_drill_local(&d->env, &label, bargs);
    int64_t backup_ms = dm_mono_ms() - t0;
    json_object_set_new(rep, "backup_ms", json_integer(backup_ms));
    json_object_set_new(rep, "backup_label", json_string(label ? label : ""));
    free(label);
    if (rc != 0) {
        fprintf(stderr, "domicilectl: drill: domicile-local backup %s failed (%d)\n",
                dm_ctl_regions[t], rc);
        ok = false;
    }

    /* after the backup: what the restore must not undo, and what it will lose */
    ok = ok && register_customer(c, d, d->c_new, t);
    for (int i = 0; i < N_SUBJECTS && ok; i++)
        ok = file_dsr(c, d, i, i < 2 ? 0 : i - 1);
    ok = ok && close_customer(c, d, d->c_close);
    /* the marks and the ledger heads of this activity reach the other regions (every second) */
    dm_ctl_sleep_ms(2500);

    /* the restore, under load */
    atomic_store(&d->probing, true);
    pthread_create(&d->prober, NULL, prober_main, d);
    t0 = dm_mono_ms();
    char *point_s = NULL;
    const char *rargs[] = {"restore", dm_ctl_regions[t], NULL};
    rc = dm_ctl_drill_local(&d->env, &point_s, rargs);
    int64_t restored_at = dm_mono_ms(), restored_wall = wall_ms();
    int64_t restore_ms = restored_at - t0;
    int64_t point = point_s ? parse_point(point_s) : -1;
    /* R serves again: a record of the backup read back at R's gateway */
    dm_client_t *rc_cl = client(d, t);
    int64_t serving_ms = -1;
    while (rc == 0 && dm_mono_ms() - restored_at < SERVE_MS) {
        if (get(rc_cl, d, d->customer[t], "base-1", NULL, buf, sizeof(buf)) == GRPC_STATUS_OK) {
            serving_ms = dm_mono_ms() - restored_at;
            break;
        }
        dm_ctl_sleep_ms(20);
    }
    atomic_store(&d->probing, false);
    pthread_join(d->prober, NULL);
    json_object_set_new(rep, "restore_ms", json_integer(restore_ms));
    json_object_set_new(rep, "restore_to_serving_ms", json_integer(serving_ms));
    json_object_set_new(rep, "restore_point", json_string(point_s ? point_s : ""));
    json_object_set_new(rep, "held_message", json_string(d->held_message));
    json_object_set_new(rep, "unavailable_answers_while_held", json_integer(d->probe_unavailable));
    free(point_s);
    if (rc != 0 || point < 0 || serving_ms < 0) {
        fprintf(stderr, "domicilectl: drill: restore of %s failed (exit %d) or it does not serve\n",
                dm_ctl_regions[t], rc);
        ok = false;
    }
    dm_ctl_sleep_ms(1500); /* load after the restore */
    atomic_store(&d->stop, true);
    for (int r = 0; r < DM_CTL_N_REGIONS; r++)
        pthread_join(d->w[r].thread, NULL);
    if (!ok) {
        dm_client_destroy(rc_cl);
        dm_client_destroy(c);
        return false;
    }

    /* erased: readable through no gateway, and nothing of them in the restored data */
    long readable = 0, in_data = 0;
    json_t *erased = json_array();
    for (int i = 0; i < 2; i++) {
        for (int g = 0; g < DM_CTL_N_REGIONS; g++) {
            dm_client_t *gc = client(d, g);
            grpc_status_code code =
                get(gc, d, d->customer[t], subject_record(i), NULL, buf, sizeof(buf));
            if (code != GRPC_STATUS_NOT_FOUND)
                readable++;
            json_array_append_new(erased, json_pack("{s:s, s:s, s:s}", "record", subject_record(i),
                                                    "gateway", dm_ctl_regions[g], "status",
                                                    dm_status_code_name(code)));
            dm_client_destroy(gc);
        }
        char *q = dm_sprintf("select (select count(*) from domicile.records where subject_key = "
                             "'\\x%s') + (select count(*) from domicile.data_keys where "
                             "subject_key = '\\x%s')",
                             d->subject_key[i], d->subject_key[i]);
        char *n = strlen(d->subject_key[i]) == 64 ? sql(d, q) : NULL;
        in_data += n ? atol(n) : 1;
        free(n);
        free(q);
    }
    json_object_set_new(rep, "erased_reads", erased);
    json_object_set_new(rep, "erased_readable", json_integer(readable));
    json_object_set_new(rep, "erased_in_restored_data", json_integer(in_data));
    grpc_status_code rcode =
        get(rc_cl, d, d->customer[t], subject_record(2), NULL, buf, sizeof(buf));
    json_object_set_new(rep, "restricted_refused",
                        json_boolean(rcode == GRPC_STATUS_FAILED_PRECONDITION));
    grpc_status_code ocode =
        get(rc_cl, d, d->customer[t], subject_record(3), NULL, buf, sizeof(buf));
    json_object_set_new(rep, "objected_refused",
                        json_boolean(ocode == GRPC_STATUS_FAILED_PRECONDITION));
    int cs = customer_state(c, d, d->c_close);
    json_object_set_new(rep, "closed_account_closed",
                        json_boolean(cs == DOMICILE__V1__CUSTOMER_STATE__CUSTOMER_STATE_CLOSED));
    int ns = customer_state(c, d, d->c_new);

    /* every acknowledged write read back */
    classes_t k = {0};
    k.lost_list = json_array();
    long other_lost = 0, other_errors = 0;
    json_t *regions = json_array();
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        lworker_t *w = &d->w[r];
        dm_client_t *gc = client(d, r);
        long missing = 0;
        for (size_t i = 0; i < w->acked.n; i++) {
            ack_t *a = &w->acked.v[i];
            char *payload = NULL;
            grpc_status_code code = GRPC_STATUS_UNAVAILABLE;
            int64_t until = dm_mono_ms() + 15000;
            while ((code = get(gc, d, d->customer[r], a->record_id, &payload, buf, sizeof(buf))) !=
                       GRPC_STATUS_OK &&
                   code != GRPC_STATUS_NOT_FOUND && dm_mono_ms() < until)
                dm_ctl_sleep_ms(100);
            bool present = code == GRPC_STATUS_OK && payload && strcmp(payload, a->payload) == 0;
            free(payload);
            missing += !present;
            if (r != t) {
                other_lost += !present;
                continue;
            }
            if (a->acked_ms > restored_wall) {
                /* Committed once the restore had finished (the region was held until then). */
                k.after_restore++;
                if (!present)
                    k.unexplained_missing++;
            } else if (a->acked_ms < point) {
                if (present)
                    k.present_ok++;
                else
                    k.unexplained_missing++;
            } else if (a->started_ms > point) {
                if (present) {
                    k.unexpectedly_present++;
                } else {
                    k.lost++;
                    if (json_array_size(k.lost_list) < LOST_MAX) {
                        char s[40], e[40];
                        dm_time_iso(a->started_ms, s, sizeof(s));
                        dm_time_iso(a->acked_ms, e, sizeof(e));
                        json_array_append_new(k.lost_list,
                                              json_pack("{s:s, s:s, s:s, s:s, s:s}", "method",
                                                        "PutRecord", "customer", d->customer[r],
                                                        "record", a->record_id, "started", s,
                                                        "acknowledged", e));
                    }
                }
            } else {
                k.straddling++;
                if (!present) {
                    k.lost++;
                    json_array_append_new(k.lost_list,
                                          json_pack("{s:s, s:s, s:s}", "method", "PutRecord",
                                                    "record", a->record_id, "note",
                                                    "in flight at the restore point"));
                }
            }
        }
        dm_client_destroy(gc);
        if (r != t)
            other_errors += w->errors;
        json_array_append_new(
            regions, json_pack("{s:s, s:I, s:I, s:I, s:I, s:s?}", "region", dm_ctl_regions[r],
                               "calls", (json_int_t)w->calls, "writes_acked",
                               (json_int_t)w->acked.n, "missing", (json_int_t)missing, "errors",
                               (json_int_t)w->errors, "first_error", w->first_error));
    }
    /* the registration after the backup is a lost write too */
    if (ns == -(int)GRPC_STATUS_NOT_FOUND) {
        k.lost++;
        json_array_append_new(k.lost_list, json_pack("{s:s, s:s}", "method", "RegisterCustomer",
                                                     "customer", d->c_new));
    } else {
        k.unexpectedly_present++;
    }
    json_object_set_new(rep, "regions", regions);
    json_object_set_new(rep, "lost_writes", k.lost_list);
    json_object_set_new(rep, "lost_writes_count", json_integer(k.lost));
    json_object_set_new(rep, "writes_before_restore_point_present", json_integer(k.present_ok));
    json_object_set_new(rep, "writes_straddling_restore_point", json_integer(k.straddling));
    json_object_set_new(rep, "writes_after_restore", json_integer(k.after_restore));
    json_object_set_new(rep, "unexplained_missing", json_integer(k.unexplained_missing));
    json_object_set_new(rep, "unexpectedly_present", json_integer(k.unexpectedly_present));
    json_object_set_new(rep, "other_region_errors", json_integer(other_errors));
    json_object_set_new(rep, "other_regions_lost", json_integer(other_lost));

    /* what the gateways reconciled, and the ledger across the cut */
    char *report = sql(d, "select report from domicile.restores where state = 'reconciled' "
                          "order by restore_id desc limit 1");
    json_error_t jerr;
    json_t *rj = report && report[0] ? json_loads(report, 0, &jerr) : NULL;
    json_object_set_new(rep, "reconciliation", rj ? rj : json_null());
    free(report);
    Domicile__V1__VerifyLedgerRequest vr = DOMICILE__V1__VERIFY_LEDGER_REQUEST__INIT;
    vr.region = (char *)dm_ctl_regions[t];
    ProtobufCMessage *resp = NULL;
    dm_status_t *st = call(c, d, SVC_XFER "VerifyLedger", &vr.base,
                           &domicile__v1__verify_ledger_response__descriptor, &resp, 15000);
    bool verifies = false;
    json_t *cuts = json_array();
    if (!st) {
        const Domicile__V1__VerifyLedgerResponse *v = (Domicile__V1__VerifyLedgerResponse *)resp;
        verifies = v->ok;
        for (size_t i = 0; i < v->n_restore_cuts; i++)
            json_array_append_new(cuts, json_string(v->restore_cuts[i]->note));
        if (!v->ok)
            json_object_set_new(rep, "ledger_detail", json_string(v->detail));
        protobuf_c_message_free_unpacked(resp, NULL);
    }
    dm_status_free(st);
    json_object_set_new(rep, "ledger_verifies", json_boolean(verifies));
    json_object_set_new(rep, "ledger_restore_cuts", cuts);
    dm_client_destroy(rc_cl);
    dm_client_destroy(c);
    return true;
}

int dm_ctl_drill_restore(const char *addr, const char *cacert, const char *cert, const char *key,
                         int timeout_ms, int argc, char **argv)
{
    rdrill_t *d = dm_calloc(1, sizeof(*d));
    dm_ctl_drill_env_init(&d->env, timeout_ms > 0 ? timeout_ms : 3000, 20);
    int rc = parse(d, argc, argv);
    json_t *rep = NULL;
    if (rc)
        goto out;
    rc = 2;
    if (!dm_ctl_drill_find_local(&d->env))
        goto out;
    if (!dm_ctl_drill_read_tls(&d->env, "drill restore", cacert, cert, key))
        goto out;
    d->env.token_admin = dm_ctl_drill_token(&d->env, "admin");
    if (!d->env.token_admin)
        goto out;
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        if (d->gw[r])
            continue;
        char *path = dm_sprintf("%s/gw/%s/listening", d->env.state, dm_ctl_regions[r]);
        d->gw[r] = dm_ctl_read_file(path, true);
        free(path);
        if (!d->gw[r] || !d->gw[r][0]) {
            free(d->gw[r]);
            d->gw[r] = dm_strdup(addr);
        }
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(d->run_id, sizeof(d->run_id), "rdrill-%lld-%d", (long long)ts.tv_sec, (int)getpid());
    for (int r = 0; r < DM_CTL_N_REGIONS; r++)
        snprintf(d->customer[r], sizeof(d->customer[r]), "%s-%s", d->run_id, dm_ctl_regions[r]);
    snprintf(d->c_new, sizeof(d->c_new), "%s-new", d->run_id);
    snprintf(d->c_close, sizeof(d->c_close), "%s-close", d->run_id);
    for (int i = 0; i < N_SUBJECTS; i++)
        snprintf(d->subject[i], sizeof(d->subject[i]), "%s-person-%d@example.com", d->run_id, i);
    rep = json_pack("{s:s, s:s, s:s}", "drill", "restore", "region", dm_ctl_regions[d->env.target],
                    "run_id", d->run_id);
    if (!drill_run(d, rep)) {
        rc = 3;
    } else {
        /* the goals */
        bool passed = json_integer_value(json_object_get(rep, "erased_readable")) == 0 &&
                      json_integer_value(json_object_get(rep, "erased_in_restored_data")) == 0 &&
                      json_is_true(json_object_get(rep, "restricted_refused")) &&
                      json_is_true(json_object_get(rep, "objected_refused")) &&
                      json_is_true(json_object_get(rep, "closed_account_closed")) &&
                      json_integer_value(json_object_get(rep, "unexplained_missing")) == 0 &&
                      json_integer_value(json_object_get(rep, "unexpectedly_present")) == 0 &&
                      json_integer_value(json_object_get(rep, "other_region_errors")) == 0 &&
                      json_integer_value(json_object_get(rep, "other_regions_lost")) == 0 &&
                      json_is_true(json_object_get(rep, "ledger_verifies")) &&
                      json_array_size(json_object_get(rep, "ledger_restore_cuts")) > 0;
        json_object_set_new(rep, "passed", json_boolean(passed));
        rc = passed ? 0 : 1;
    }
    fprintf(stderr,
            "restore drill of %s: %s; backup %lld ms, restore %lld ms, restore to serving %lld "
            "ms; lost writes %lld (unexplained missing %lld, unexpectedly present %lld); erased "
            "readable %lld, in restored data %lld; other regions' errors %lld\n",
            dm_ctl_regions[d->env.target],
            rc == 0   ? "passed"
            : rc == 1 ? "FAILED"
                      : "step failed",
            (long long)json_integer_value(json_object_get(rep, "backup_ms")),
            (long long)json_integer_value(json_object_get(rep, "restore_ms")),
            (long long)json_integer_value(json_object_get(rep, "restore_to_serving_ms")),
            (long long)json_integer_value(json_object_get(rep, "lost_writes_count")),
            (long long)json_integer_value(json_object_get(rep, "unexplained_missing")),
            (long long)json_integer_value(json_object_get(rep, "unexpectedly_present")),
            (long long)json_integer_value(json_object_get(rep, "erased_readable")),
            (long long)json_integer_value(json_object_get(rep, "erased_in_restored_data")),
            (long long)json_integer_value(json_object_get(rep, "other_region_errors")));
    if (d->env.json_path) {
        char *text = json_dumps(rep, JSON_INDENT(2) | JSON_SORT_KEYS);
        if (strcmp(d->env.json_path, "-") == 0) {
            printf("%s\n", text);
        } else {
            FILE *f = fopen(d->env.json_path, "w");
            if (f) {
                fprintf(f, "%s\n", text);
                fclose(f);
            } else {
                fprintf(stderr, "domicilectl: drill: cannot write %s\n", d->env.json_path);
            }
        }
        free(text);
    }
out:
    json_decref(rep);
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        free(d->gw[r]);
        for (size_t i = 0; i < d->w[r].acked.n; i++) {
            free(d->w[r].acked.v[i].record_id);
            free(d->w[r].acked.v[i].request_id);
            free(d->w[r].acked.v[i].payload);
        }
        free(d->w[r].acked.v);
        free(d->w[r].first_error);
    }
    dm_ctl_drill_env_dispose(&d->env);
    free(d);
    return rc < 0 ? 0 : rc;
}
