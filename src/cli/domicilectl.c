/*
 * domicilectl: command-line client of the Domicile gateway. What it prints, its formats and
 * exit statuses: docs/cli.md.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "domicile/client.h"
#include "domicile/output.h"
#include "domicile/progress.h"
#include "domicile/report.h"
#include "domicile/v1/customers.pb-c.h"
#include "domicile/v1/records.pb-c.h"
#include "domicile/v1/regions.pb-c.h"
#include "domicile/v1/subject_rights.pb-c.h"
#include "domicile/v1/transfers.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#include "cli.h"

/* src/cli/keys.c: `keys status|rotate|retire`. */

#define HEALTH_CHECK "/grpc.health.v1.Health/Check"
#define HEALTH_WATCH "/grpc.health.v1.Health/Watch"

static void usage(FILE *f)
{
    fputs("usage: domicilectl [options] COMMAND [ARGS] [-o FORMAT]\n"
          "  --addr HOST:PORT   gateway address (default $DOMICILE_ADDR or 127.0.0.1:50051)\n"
          "  --timeout MS       deadline of each call (default 5000)\n"
          "  --token TOKEN      bearer token (default $DOMICILE_TOKEN); --token-file FILE\n"
          "  --purpose P        x-purpose of the calls (default: the principal's)\n"
          "  --cacert FILE      use TLS, verifying the gateway with this CA\n"
          "  --cert FILE --key FILE   client certificate (mTLS)\n"
          "  -o, --output FORMAT   table (default: aligned columns under a header line), wide\n"
          "                     (more columns), tsv (the table's cells, tab-separated, no\n"
          "                     header), json (a list as {\"items\": [...]}, one record as the\n"
          "                     object), jsonl (one object per line); before or after COMMAND\n"
          "  --no-headers       table and wide without the header line\n"
          "  JSON: proto field names; times RFC 3339 UTC with milliseconds, e.g.\n"
          "  2026-12-06T22:40:00.000Z (null when not set); int64 as numbers; bytes as base64.\n"
          "  Table: \"-\" for empty or not set. docs/cli.md describes every command's fields.\n"
          "commands:\n"
          "  health [SERVICE]   grpc.health.v1 Check: \"\" = gateway, domicile.region.<code>;\n"
          "      prints the status (SERVING ...) alone unless -o json|jsonl\n"
          "  watch [SERVICE]    grpc.health.v1 Watch: print every status change\n"
          "  customer register ID RESIDENCY [DISPLAY_NAME]\n"
          "  customer get ID\n"
          "  customer close ID REASON\n"
          "  regions list       per region: reachability, primary, replication, breaker,\n"
          "      pool, queued statements, fence\n"
          "  regions fence REGION REASON     stop all traffic to REGION (every gateway)\n"
          "  regions unfence REGION [REASON] lift it\n"
          "  record put CUSTOMER RECORD_ID KIND [SUBJECT]   payload read from stdin\n"
          "  record get CUSTOMER RECORD_ID   payload written to stdout; with -o, the record\n"
          "      (-o json|jsonl: with the payload in base64)\n"
          "  record list CUSTOMER [KIND] [--limit N]\n"
          "  record delete CUSTOMER RECORD_ID\n"
          "  transfers report [--from DATE] [--to DATE] [--basis ID] [--purpose P]\n"
          "                   [--from-region R] [--to-region R] [--output-file FILE]\n"
          "                   [-o table|json|jsonl|tsv|csv|markdown|html]\n"
          "      DATE is YYYY-MM-DD (UTC), --to exclusive; default: every entry. Warnings\n"
          "      (incomplete report, ledger not verified) also go to stderr. jsonl and tsv:\n"
          "      the rows only. --format is the old name of -o here\n"
          "  transfers list [--basis ID] [--region R] [--customer C] [--outcome allowed|refused]\n"
          "                 [--purpose P] [--from DATE] [--to DATE] [--from-region R]\n"
          "                 [--to-region R] [--principal NAME] [--direction read|write]\n"
          "                 [--subject S] [--limit N]\n"
          "      per entry: region seq time route basis purpose outcome records bytes method\n"
          "      principal (seq - while not sealed)\n"
          "  transfers verify REGION   exit status 4 when the ledger does not verify\n"
          "  dsr erase SUBJECT [--customer C] [--reason R] [--request-id ID]\n"
          "  dsr restrict|unrestrict SUBJECT [--customer C] [--reason R] [--request-id ID]\n"
          "  dsr object|withdraw SUBJECT PURPOSE [--customer C] [--reason R] [--request-id ID]\n"
          "      file a data-subject request (stored in every reachable region) and print it;\n"
          "      a new request id is generated unless --request-id repeats an earlier one\n"
          "  dsr export SUBJECT [--customer C] [--output-file FILE] [--allow-partial]\n"
          "                     [--reason R] [--request-id ID]\n"
          "      the subject's records from every region as JSON Lines to FILE (mode 0600) or\n"
          "      stdout, with a progress line on a terminal; then checks the manifest (SHA-256\n"
          "      and counts of the lines written): exit status 5 when they differ or no\n"
          "      manifest came (FILE removed), 6 when regions are missing (--allow-partial).\n"
          "      With FILE, the verified export's summary is printed (-o)\n"
          "  dsr status REQUEST_ID      the request and each region's leg\n"
          "  dsr list [--overdue] [--due-within DAYS] [--state received|in_progress|done|failed]\n"
          "           [--kind K] [--customer C] [--limit N]\n"
          "      per request: id kind state received_at effective_due overdue customer legs\n"
          "  dsr locate SUBJECT [--customer C]   records and payload bytes per region; exit\n"
          "      status 3 when a region could not answer\n"
          "  dsr extend REQUEST_ID REASON   extend the deadline once, by two months\n"
          "      SUBJECT \"-\" reads the subject from the first line of stdin\n"
          "  keys status REGION          KEK versions, data keys per version, the rotation\n"
          "  keys rotate REGION [--wait|--no-wait]   a new KEK version, current at once; older\n"
          "      data keys are re-wrapped in the background (followed with a progress line on\n"
          "      a terminal, or with --wait, until done)\n"
          "  keys retire REGION VERSION  destroy a KEK version that no data key uses any more\n"
          "  drill failover|gateway --region R [--duration 30s] [--state DIR] [--json FILE|-]\n"
          "                 [--clients N] [--rate N] [--gateway R=H:P]... [--victim N]\n"
          "                 [--victim-pid PID] [--domicile-local PATH] [-o table|json|jsonl]\n"
          "      drills against the deploy/local regions (state DIR) and their gateways: load\n"
          "      on every region through the federation; failover: SIGKILL of R's primary,\n"
          "      promotion, rejoin; gateway: SIGKILL of one of R's gateways (calls in flight\n"
          "      may fail, none after). Then checks that no acknowledged write was lost,\n"
          "      duplicated or misplaced, that the ledger has every cross-border read and\n"
          "      that the other regions saw no error. Uses the tokens of DIR (not --token);\n"
          "      --timeout is the call deadline (default 2000). More: drill --help\n"
          "  drill restore --region R [--state DIR] [--json FILE|-] [--rate N]\n"
          "      under load: backup of R, then writes, erasures, a restriction, an objection,\n"
          "      a closure; restore of R to the backup; checks that nothing erased comes back,\n"
          "      exactly the writes after the restore point are lost, the others see no error\n"
          "      (drill restore --help)\n"
          "  completion bash    print a bash completion script:\n"
          "      source <(domicilectl completion bash)\n"
          "(calls that read whole ledgers default to a 60 s deadline unless --timeout is given)\n"
          "Long commands (dsr export, drill, transfers report) draw a progress line on stderr\n"
          "when it is a terminal, nothing when it is a file or a pipe.\n"
          "exit status:\n"
          "  0   success\n"
          "  1   failed here: the output could not be written, a malformed answer, a drill\n"
          "      goal missed\n"
          "  2   usage: unknown command, option or value (drill: also the regions were not\n"
          "      healthy before it)\n"
          "  3   partial: dsr locate without some region; health not SERVING; a drill step\n"
          "      (kill, promote, rejoin) failed\n"
          "  4   transfers verify: the ledger does not verify\n"
          "  5   dsr export: the lines do not match the manifest, or no manifest (FILE removed)\n"
          "  6   dsr export: the manifest says regions are missing\n"
          "  10+N  the gateway answered gRPC status N: 13 INVALID_ARGUMENT, 14\n"
          "      DEADLINE_EXCEEDED, 15 NOT_FOUND, 16 ALREADY_EXISTS, 17 PERMISSION_DENIED,\n"
          "      18 RESOURCE_EXHAUSTED, 19 FAILED_PRECONDITION, 20 ABORTED, 23 INTERNAL,\n"
          "      24 UNAVAILABLE (also: gateway unreachable), 25 DATA_LOSS, 26 UNAUTHENTICATED\n"
          "      (11 CANCELLED, 12 UNKNOWN, 21 OUT_OF_RANGE, 22 UNIMPLEMENTED)\n",
          f);
}

static int timeout_g = 5000;
static bool timeout_explicit_g;
static dm_ctl_output_t out_g = {NULL, DM_OUTPUT_TABLE, false};

static int fail(dm_status_t *st)
{
    fprintf(stderr, "domicilectl: %s: %s\n", dm_status_code_name(st->code), st->message);
    int code = (int)st->code;
    dm_status_free(st);
    return code == 0 ? DM_EXIT_FAILURE : DM_EXIT_STATUS + code;
}

static int bad_usage(void)
{
    usage(stderr);
    return DM_EXIT_USAGE;
}

/* ---- output ------------------------------------------------------------------------------- */

static dm_output_t *out_open(dm_output_shape_t shape, const dm_output_column_t *cols, size_t n)
{
    return dm_output_create(stdout, out_g.fmt, shape, out_g.no_headers ? DM_OUTPUT_NO_HEADERS : 0,
                            cols, n);
}

/* Ends `o`; the exit status of a command whose records were all written (or not). */
static int out_close(dm_output_t *o, bool complete)
{
    if (dm_output_end(o, complete))
        return DM_EXIT_OK;
    fprintf(stderr, "domicilectl: cannot write the output: %s\n", strerror(errno));
    return DM_EXIT_FAILURE;
}

/* One record, printed and ended. */
static int out_one(dm_output_shape_t shape, const dm_output_column_t *cols, size_t n,
                   json_t *record)
{
    dm_output_t *o = out_open(shape, cols, n);
    dm_output_record(o, record);
    return out_close(o, true);
}

static bool is_json(void)
{
    return out_g.fmt == DM_OUTPUT_JSON || out_g.fmt == DM_OUTPUT_JSONL;
}

/* ---- health ------------------------------------------------------------------------------- */

static const dm_output_column_t health_cols[] = {
    {"STATUS", "status", NULL, 0},
    {"SERVICE", "service", NULL, DM_OUTPUT_COL_WIDE},
    {"OBSERVED_AT", "observed_at", NULL, DM_OUTPUT_COL_WIDE},
};

static json_t *health_json(const char *service, int status, bool observed)
{
    char *name = dm_output_enum_name(
        &grpc__health__v1__health_check_response__serving_status__descriptor, status);
    json_t *o = json_object();
    json_object_set_new(o, "service", dm_output_string(service));
    json_object_set_new(o, "status", name ? dm_output_string(name) : json_integer(status));
    if (observed) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        json_object_set_new(
            o, "observed_at",
            dm_output_time((int64_t)ts.tv_sec * 1000 + (int64_t)ts.tv_nsec / 1000000));
    }
    free(name);
    return o;
}

/* A probe's answer is the word alone, as grpc_health_probe prints it, so that scripts keep
 * comparing it: the table of health and watch has no header, wide has one. */
static dm_output_t *health_open(void)
{
    unsigned flags = out_g.no_headers || out_g.fmt == DM_OUTPUT_TABLE ? DM_OUTPUT_NO_HEADERS : 0;
    return dm_output_create(stdout, out_g.fmt, DM_OUTPUT_ONE, flags | DM_OUTPUT_FLUSH, health_cols,
                            DM_ARRAY_LEN(health_cols));
}

typedef struct watch_state {
    const char *service;
    dm_output_t *out;
} watch_state_t;

static bool print_watch(const ProtobufCMessage *m, void *arg)
{
    watch_state_t *w = arg;
    const Grpc__Health__V1__HealthCheckResponse *r =
        (const Grpc__Health__V1__HealthCheckResponse *)m;
    dm_output_record(w->out, health_json(w->service, r->status, true));
    return true;
}

static int cmd_health(dm_client_t *c, int argc, char **argv, int timeout_ms, bool watch)
{
    if (argc > 1)
        return bad_usage();
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = argc > 0 ? argv[0] : "";
    if (watch) {
        watch_state_t w = {req.service, health_open()};
        dm_status_t *st = dm_client_server_stream(
            c, HEALTH_WATCH, &req.base, &grpc__health__v1__health_check_response__descriptor,
            timeout_ms, print_watch, &w);
        int rc = out_close(w.out, true);
        return st ? fail(st) : rc;
    }
    ProtobufCMessage *resp = NULL;
    dm_status_t *st =
        dm_client_unary(c, HEALTH_CHECK, &req.base,
                        &grpc__health__v1__health_check_response__descriptor, timeout_ms, &resp);
    if (st)
        return fail(st);
    int s = ((Grpc__Health__V1__HealthCheckResponse *)resp)->status;
    protobuf_c_message_free_unpacked(resp, NULL);
    dm_output_t *o = health_open();
    dm_output_record(o, health_json(req.service, s, false));
    int rc = out_close(o, true);
    if (rc)
        return rc;
    return s == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING ? DM_EXIT_OK
                                                                                 : DM_EXIT_PARTIAL;
}

static char *new_request_id(void)
{
    /* Unique per invocation: a retry of the same command is a new request by design. */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return dm_sprintf("ctl-%d-%lld%09ld", (int)getpid(), (long long)ts.tv_sec, ts.tv_nsec);
}

/* A response whose one message field (the customer, the region, the request) is missing. */
static int empty_response(ProtobufCMessage *resp, const char *what)
{
    fprintf(stderr, "domicilectl: the response carries no %s\n", what);
    protobuf_c_message_free_unpacked(resp, NULL);
    return DM_EXIT_FAILURE;
}

/* ---- customers ---------------------------------------------------------------------------- */

#define CUSTOMERS "/domicile.v1.CustomersService/"
#define REGIONS   "/domicile.v1.RegionsService/"
#define RECORDS   "/domicile.v1.RecordsService/"

static const dm_output_column_t customer_cols[] = {
    {"CUSTOMER_ID", "customer_id", NULL, 0},
    {"RESIDENCY", "residency", NULL, 0},
    {"STATE", "state", NULL, 0},
    {"CREATED_AT", "created_at", NULL, 0},
    {"DISPLAY_NAME", "display_name", NULL, DM_OUTPUT_COL_WIDE},
    {"CLOSED_AT", "closed_at", NULL, DM_OUTPUT_COL_WIDE},
    {"PURGE_AFTER", "purge_after", NULL, DM_OUTPUT_COL_WIDE},
    {"LABELS", "labels", NULL, DM_OUTPUT_COL_WIDE},
};

/* `resp` holds `c`; both freed here. */
static int print_customer(ProtobufCMessage *resp, const Domicile__V1__Customer *c)
{
    if (!c)
        return empty_response(resp, "customer");
    json_t *j = dm_output_message(&c->base);
    protobuf_c_message_free_unpacked(resp, NULL);
    return out_one(DM_OUTPUT_ONE, customer_cols, DM_ARRAY_LEN(customer_cols), j);
}

static int cmd_customer(dm_client_t *c, int argc, char **argv)
{
    ProtobufCMessage *resp = NULL;
    const Domicile__V1__Customer *cu = NULL;
    dm_status_t *st;
    if ((argc == 3 || argc == 4) && strcmp(argv[0], "register") == 0) {
        Domicile__V1__RegisterCustomerRequest r = DOMICILE__V1__REGISTER_CUSTOMER_REQUEST__INIT;
        char *rid = new_request_id();
        r.request_id = rid;
        r.customer_id = argv[1];
        r.residency = argv[2];
        r.display_name = argc > 3 ? argv[3] : "";
        st = dm_client_unary(c, CUSTOMERS "RegisterCustomer", &r.base,
                             &domicile__v1__register_customer_response__descriptor, timeout_g,
                             &resp);
        if (!st)
            cu = ((Domicile__V1__RegisterCustomerResponse *)resp)->customer;
        free(rid);
    } else if (argc == 2 && strcmp(argv[0], "get") == 0) {
        Domicile__V1__GetCustomerRequest r = DOMICILE__V1__GET_CUSTOMER_REQUEST__INIT;
        r.customer_id = argv[1];
        st = dm_client_unary(c, CUSTOMERS "GetCustomer", &r.base,
                             &domicile__v1__get_customer_response__descriptor, timeout_g, &resp);
        if (!st)
            cu = ((Domicile__V1__GetCustomerResponse *)resp)->customer;
    } else if (argc == 3 && strcmp(argv[0], "close") == 0) {
        Domicile__V1__CloseCustomerRequest r = DOMICILE__V1__CLOSE_CUSTOMER_REQUEST__INIT;
        char *rid = new_request_id();
        r.request_id = rid;
        r.customer_id = argv[1];
        r.reason = argv[2];
        st = dm_client_unary(c, CUSTOMERS "CloseCustomer", &r.base,
                             &domicile__v1__close_customer_response__descriptor, timeout_g, &resp);
        if (!st)
            cu = ((Domicile__V1__CloseCustomerResponse *)resp)->customer;
        free(rid);
    } else {
        return bad_usage();
    }
    return st ? fail(st) : print_customer(resp, cu);
}

/* ---- regions ------------------------------------------------------------------------------ */

static char *region_status_cell(const json_t *v, const json_t *rec)
{
    (void)v;
    return dm_strdup(json_is_true(json_object_get(rec, "reachable")) ? "reachable" : "unreachable");
}

static char *region_pool_cell(const json_t *v, const json_t *rec)
{
    (void)v;
    return dm_sprintf("%lld/%lld",
                      (long long)json_integer_value(json_object_get(rec, "pool_in_use")),
                      (long long)json_integer_value(json_object_get(rec, "pool_size")));
}

static char *region_fence_cell(const json_t *v, const json_t *rec)
{
    (void)v;
    if (!json_is_true(json_object_get(rec, "fenced")))
        return NULL;
    const json_t *at = json_object_get(rec, "fenced_at");
    return dm_sprintf("fenced:%s by:%s at:%s",
                      json_string_value(json_object_get(rec, "fence_reason")),
                      json_string_value(json_object_get(rec, "fenced_by")),
                      json_is_string(at) ? json_string_value(at) : "-");
}

static const dm_output_column_t region_cols[] = {
    {"REGION", "code", NULL, 0},
    {"STATUS", NULL, region_status_cell, 0},
    {"PRIMARY", "primary_host", NULL, 0},
    {"REPLICATION", "replication_state", NULL, 0},
    {"LAG_BYTES", "replication_lag_bytes", NULL, 0},
    {"BREAKER", "breaker", NULL, 0},
    {"POOL", NULL, region_pool_cell, 0},
    {"QUEUED", "queued_statements", NULL, 0},
    {"FENCE", NULL, region_fence_cell, 0},
    {"NAME", "name", NULL, DM_OUTPUT_COL_WIDE},
    {"JURISDICTION", "jurisdiction", NULL, DM_OUTPUT_COL_WIDE},
    {"LAST_ERROR", "last_error", NULL, DM_OUTPUT_COL_WIDE},
    {"LAST_ERROR_AT", "last_error_at", NULL, DM_OUTPUT_COL_WIDE},
};

static int cmd_regions(dm_client_t *c, int argc, char **argv)
{
    ProtobufCMessage *resp = NULL;
    const Domicile__V1__RegionStatus *one = NULL; /* fence, unfence */
    dm_status_t *st;
    char *rid = new_request_id();
    if (argc == 1 && strcmp(argv[0], "list") == 0) {
        Domicile__V1__ListRegionsRequest r = DOMICILE__V1__LIST_REGIONS_REQUEST__INIT;
        st = dm_client_unary(c, REGIONS "ListRegions", &r.base,
                             &domicile__v1__list_regions_response__descriptor, timeout_g, &resp);
    } else if (argc == 3 && strcmp(argv[0], "fence") == 0) {
        Domicile__V1__FenceRequest r = DOMICILE__V1__FENCE_REQUEST__INIT;
        r.request_id = rid;
        r.region = argv[1];
        r.reason = argv[2];
        st = dm_client_unary(c, REGIONS "Fence", &r.base, &domicile__v1__fence_response__descriptor,
                             timeout_g, &resp);
        if (!st)
            one = ((Domicile__V1__FenceResponse *)resp)->region;
    } else if ((argc == 2 || argc == 3) && strcmp(argv[0], "unfence") == 0) {
        Domicile__V1__UnfenceRequest r = DOMICILE__V1__UNFENCE_REQUEST__INIT;
        r.request_id = rid;
        r.region = argv[1];
        r.reason = argc == 3 ? argv[2] : "";
        st = dm_client_unary(c, REGIONS "Unfence", &r.base,
                             &domicile__v1__unfence_response__descriptor, timeout_g, &resp);
        if (!st)
            one = ((Domicile__V1__UnfenceResponse *)resp)->region;
    } else {
        free(rid);
        return bad_usage();
    }
    free(rid);
    if (st)
        return fail(st);
    int rc;
    if (strcmp(argv[0], "list") == 0) {
        const Domicile__V1__ListRegionsResponse *l =
            (const Domicile__V1__ListRegionsResponse *)resp;
        dm_output_t *o = out_open(DM_OUTPUT_LIST, region_cols, DM_ARRAY_LEN(region_cols));
        for (size_t i = 0; i < l->n_regions; i++)
            dm_output_record(o, dm_output_message(&l->regions[i]->base));
        rc = out_close(o, true);
    } else if (one) {
        rc = out_one(DM_OUTPUT_ONE, region_cols, DM_ARRAY_LEN(region_cols),
                     dm_output_message(&one->base));
    } else {
        return empty_response(resp, "region");
    }
    protobuf_c_message_free_unpacked(resp, NULL);
    return rc;
}

/* ---- paged listings ----------------------------------------------------------------------- */

typedef struct list_state {
    int64_t printed;
    char *next_token; /* owned; from the page's `end` */
    dm_output_t *out;
} list_state_t;

/* A record of a listing; counted. */
static void list_record(list_state_t *ls, json_t *record)
{
    dm_output_record(ls->out, record);
    ls->printed++;
}

static void list_page_end(list_state_t *ls, const char *next_page_token)
{
    free(ls->next_token);
    ls->next_token = dm_strdup(next_page_token);
}

/*
 * Call a paged server-streaming method until its last page or `limit` items (0: no limit),
 * 1000 per page, printing to `o` (ended here). `page_size` and `page_token` point into `req`;
 * `cb` prints an item with list_record and keeps the page's next token with list_page_end.
 * `what` names the items in the message shown when --limit cut the listing short.
 */
static int page_through(dm_client_t *c, const char *method, ProtobufCMessage *req,
                        int32_t *page_size, char **page_token,
                        const ProtobufCMessageDescriptor *desc, dm_client_stream_fn cb,
                        long long limit, const char *what, int timeout_ms, dm_output_t *o)
{
    list_state_t ls = {0, NULL, o};
    char *token = dm_strdup("");
    int rc = 0;
    for (;;) {
        long long left = limit ? limit - ls.printed : 1000;
        *page_size = (int32_t)(left < 1000 ? left : 1000);
        *page_token = token;
        dm_status_t *st = dm_client_server_stream(c, method, req, desc, timeout_ms, cb, &ls);
        if (st) {
            rc = fail(st);
            break;
        }
        if (!ls.next_token || !ls.next_token[0])
            break;
        if (limit && ls.printed >= limit) {
            fprintf(stderr, "domicilectl: more %s match: raise --limit to see them\n", what);
            break;
        }
        free(token);
        token = ls.next_token;
        ls.next_token = NULL;
    }
    free(token);
    free(ls.next_token);
    int wrc = out_close(o, rc == 0);
    return rc ? rc : wrc;
}

static bool parse_limit(const char *v, long long *limit, const char *what)
{
    char *end;
    errno = 0;
    *limit = strtoll(v, &end, 10);
    if (errno || end == v || *end || *limit < 1) {
        fprintf(stderr, "domicilectl: --limit: a positive number of %s\n", what);
        return false;
    }
    return true;
}

/* ---- records ------------------------------------------------------------------------------ */

static const dm_output_column_t record_cols[] = {
    {"RECORD_ID", "record_id", NULL, 0},
    {"KIND", "kind", NULL, 0},
    {"VERSION", "version", NULL, 0},
    {"SIZE", "payload_size", NULL, 0},
    {"RESTRICTED", "restricted", NULL, 0},
    {"UPDATED_AT", "updated_at", NULL, 0},
    {"REGION", "region", NULL, DM_OUTPUT_COL_WIDE},
    {"CONTENT_TYPE", "content_type", NULL, DM_OUTPUT_COL_WIDE},
    {"HAS_SUBJECT", "has_subject", NULL, DM_OUTPUT_COL_WIDE},
    {"CREATED_AT", "created_at", NULL, DM_OUTPUT_COL_WIDE},
    {"LABELS", "labels", NULL, DM_OUTPUT_COL_WIDE},
};

static const dm_output_column_t put_cols[] = {
    {"RECORD_ID", "record.record_id", NULL, 0},
    {"VERSION", "record.version", NULL, 0},
    {"REGION", "record.region", NULL, 0},
    {"CREATED", "created", NULL, 0},
    {"REPLAYED", "replayed", NULL, DM_OUTPUT_COL_WIDE},
    {"KIND", "record.kind", NULL, DM_OUTPUT_COL_WIDE},
    {"SIZE", "record.payload_size", NULL, DM_OUTPUT_COL_WIDE},
    {"UPDATED_AT", "record.updated_at", NULL, DM_OUTPUT_COL_WIDE},
};

static const dm_output_column_t delete_cols[] = {
    {"CUSTOMER_ID", "customer_id", NULL, 0},
    {"RECORD_ID", "record_id", NULL, 0},
    {"DELETED", "deleted", NULL, 0},
    {"VERSION", "version", NULL, 0},
    {"REPLAYED", "replayed", NULL, DM_OUTPUT_COL_WIDE},
};

/* A record without its payload (listings and writes carry none: payload_size tells). */
static json_t *record_json(const Domicile__V1__Record *r)
{
    json_t *j = dm_output_message(&r->base);
    json_object_del(j, "payload");
    return j;
}

static unsigned char *read_stdin(size_t *len)
{
    size_t cap = 65536, n = 0;
    unsigned char *buf = dm_malloc(cap);
    for (;;) {
        if (n == cap)
            buf = dm_realloc(buf, cap *= 2);
        ssize_t r = read(0, buf + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        n += (size_t)r;
        if (n > (2u << 20))
            break; /* the gateway refuses more than 1 MiB anyway */
    }
    *len = n;
    return buf;
}

static bool print_listed(const ProtobufCMessage *m, void *arg)
{
    list_state_t *ls = arg;
    const Domicile__V1__ListRecordsResponse *r = (const Domicile__V1__ListRecordsResponse *)m;
    if (r->item_case == DOMICILE__V1__LIST_RECORDS_RESPONSE__ITEM_RECORD)
        list_record(ls, record_json(r->record));
    else if (r->item_case == DOMICILE__V1__LIST_RECORDS_RESPONSE__ITEM_END)
        list_page_end(ls, r->end->next_page_token);
    return true;
}

static int cmd_record_list(dm_client_t *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"limit", required_argument, NULL, 'n'},
        {NULL, 0, NULL, 0},
    };
    long long limit = 0;
    int opt;
    optind = 0;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (opt != 'n')
            return bad_usage();
        if (!parse_limit(optarg, &limit, "records"))
            return DM_EXIT_USAGE;
    }
    /* argv[0] is "list": getopt starts after it; the arguments are CUSTOMER [KIND]. */
    if (argc - optind != 1 && argc - optind != 2)
        return bad_usage();
    Domicile__V1__ListRecordsRequest r = DOMICILE__V1__LIST_RECORDS_REQUEST__INIT;
    r.customer_id = argv[optind];
    r.kind = argc - optind == 2 ? argv[optind + 1] : "";
    return page_through(c, RECORDS "ListRecords", &r.base, &r.page_size, &r.page_token,
                        &domicile__v1__list_records_response__descriptor, print_listed, limit,
                        "records", timeout_g,
                        out_open(DM_OUTPUT_LIST, record_cols, DM_ARRAY_LEN(record_cols)));
}

static int cmd_record(dm_client_t *c, int argc, char **argv)
{
    ProtobufCMessage *resp = NULL;
    dm_status_t *st;
    if (argc >= 1 && strcmp(argv[0], "list") == 0)
        return cmd_record_list(c, argc, argv);
    if ((argc == 4 || argc == 5) && strcmp(argv[0], "put") == 0) {
        Domicile__V1__PutRecordRequest r = DOMICILE__V1__PUT_RECORD_REQUEST__INIT;
        char *rid = new_request_id();
        size_t len;
        unsigned char *data = read_stdin(&len);
        r.request_id = rid;
        r.customer_id = argv[1];
        r.record_id = argv[2];
        r.kind = argv[3];
        r.subject = argc == 5 ? argv[4] : "";
        r.payload.data = data;
        r.payload.len = len;
        st = dm_client_unary(c, RECORDS "PutRecord", &r.base,
                             &domicile__v1__put_record_response__descriptor, timeout_g, &resp);
        free(rid);
        free(data);
        if (st)
            return fail(st);
        Domicile__V1__PutRecordResponse *p = (Domicile__V1__PutRecordResponse *)resp;
        if (!p->record)
            return empty_response(resp, "record");
        json_t *j = dm_output_message(&p->base);
        json_object_del(json_object_get(j, "record"), "payload");
        protobuf_c_message_free_unpacked(resp, NULL);
        return out_one(DM_OUTPUT_ONE, put_cols, DM_ARRAY_LEN(put_cols), j);
    }
    if (argc == 3 && strcmp(argv[0], "get") == 0) {
        Domicile__V1__GetRecordRequest r = DOMICILE__V1__GET_RECORD_REQUEST__INIT;
        r.customer_id = argv[1];
        r.record_id = argv[2];
        st = dm_client_unary(c, RECORDS "GetRecord", &r.base,
                             &domicile__v1__get_record_response__descriptor, timeout_g, &resp);
        if (st)
            return fail(st);
        const Domicile__V1__Record *rec = ((Domicile__V1__GetRecordResponse *)resp)->record;
        if (!rec)
            return empty_response(resp, "record");
        int rc = DM_EXIT_OK;
        if (!out_g.name) {
            /* No -o: the payload itself, as it was stored. */
            if (fwrite(rec->payload.data, 1, rec->payload.len, stdout) != rec->payload.len ||
                fflush(stdout) != 0) {
                fprintf(stderr, "domicilectl: cannot write the payload: %s\n", strerror(errno));
                rc = DM_EXIT_FAILURE;
            }
        } else {
            json_t *j = is_json() ? dm_output_message(&rec->base) : record_json(rec);
            rc = out_one(DM_OUTPUT_ONE, record_cols, DM_ARRAY_LEN(record_cols), j);
        }
        protobuf_c_message_free_unpacked(resp, NULL);
        return rc;
    }
    if (argc == 3 && strcmp(argv[0], "delete") == 0) {
        Domicile__V1__DeleteRecordRequest r = DOMICILE__V1__DELETE_RECORD_REQUEST__INIT;
        char *rid = new_request_id();
        r.request_id = rid;
        r.customer_id = argv[1];
        r.record_id = argv[2];
        st = dm_client_unary(c, RECORDS "DeleteRecord", &r.base,
                             &domicile__v1__delete_record_response__descriptor, timeout_g, &resp);
        free(rid);
        if (st)
            return fail(st);
        json_t *j = json_object();
        json_object_set_new(j, "customer_id", dm_output_string(argv[1]));
        json_object_set_new(j, "record_id", dm_output_string(argv[2]));
        json_t *d = dm_output_message(resp);
        json_object_update(j, d);
        json_decref(d);
        protobuf_c_message_free_unpacked(resp, NULL);
        return out_one(DM_OUTPUT_ONE, delete_cols, DM_ARRAY_LEN(delete_cols), j);
    }
    return bad_usage();
}

/* ---- transfers ---------------------------------------------------------------------------- */

#define TRANSFERS "/domicile.v1.TransfersService/"

/* Report and VerifyLedger walk whole ledger chains: more than the 5 s meant for single rows. */
static int ledger_timeout(void)
{
    return timeout_explicit_g ? timeout_g : 60000;
}

static bool date_opt(const char *name, const char *v, int64_t *ms)
{
    if (dm_report_parse_date(v, ms))
        return true;
    fprintf(stderr, "domicilectl: --%s: expected a UTC date YYYY-MM-DD, got \"%s\"\n", name, v);
    return false;
}

static bool window_ok(int64_t from, int64_t to)
{
    if (!to || to > from)
        return true;
    fprintf(stderr, "domicilectl: --to must be after --from (--to is exclusive)\n");
    return false;
}

/* Writes `text` to `path` ("-" or NULL: stdout). A file that could not be written whole is
 * removed rather than left truncated. */
static int write_output(const char *path, const char *text)
{
    size_t n = strlen(text);
    if (!path || strcmp(path, "-") == 0) {
        if (fwrite(text, 1, n, stdout) != n || fflush(stdout) != 0) {
            fprintf(stderr, "domicilectl: cannot write the report: %s\n", strerror(errno));
            return DM_EXIT_FAILURE;
        }
        return DM_EXIT_OK;
    }
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "domicilectl: cannot write %s: %s\n", path, strerror(errno));
        return DM_EXIT_FAILURE;
    }
    bool ok = fwrite(text, 1, n, f) == n;
    int err = errno;
    if (fclose(f) != 0 && ok) {
        ok = false;
        err = errno;
    }
    if (!ok) {
        fprintf(stderr, "domicilectl: cannot write %s: %s\n", path, strerror(err));
        unlink(path);
        return DM_EXIT_FAILURE;
    }
    return DM_EXIT_OK;
}

static void report_warnings(const Domicile__V1__ReportResponse *rep)
{
    for (size_t i = 0; i < rep->n_ledgers; i++) {
        const Domicile__V1__LedgerState *s = rep->ledgers[i];
        if (s->reachable && s->verified)
            continue;
        char *region = dm_report_plain(s->region), *detail = dm_report_plain(s->detail);
        if (!s->reachable)
            fprintf(stderr,
                    "domicilectl: warning: incomplete report: region %s could not be reached%s%s\n",
                    region, detail[0] ? ": " : "", detail);
        else
            fprintf(stderr,
                    "domicilectl: warning: the ledger of %s does not verify (first bad seq "
                    "%lld)%s%s\n",
                    region, (long long)s->first_bad_seq, detail[0] ? ": " : "", detail);
        free(region);
        free(detail);
    }
    if (!rep->complete && rep->n_ledgers == 0)
        fprintf(stderr, "domicilectl: warning: incomplete report\n");
}

static const dm_output_column_t report_row_cols[] = {
    {"MONTH", "month", NULL, 0},         {"FROM_REGION", "from_region", NULL, 0},
    {"TO_REGION", "to_region", NULL, 0}, {"BASIS_ID", "basis_id", NULL, 0},
    {"PURPOSE", "purpose", NULL, 0},     {"TRANSFERS", "transfers", NULL, 0},
    {"RECORDS", "records", NULL, 0},     {"BYTES", "bytes", NULL, 0},
    {"REFUSALS", "refusals", NULL, 0},
};

/* The report's rows as JSON Lines or TSV: a new text. */
static char *report_rows(const Domicile__V1__ReportResponse *rep, dm_output_format_t fmt)
{
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    if (!mem)
        abort();
    dm_output_t *o = dm_output_create(mem, fmt, DM_OUTPUT_LIST, 0, report_row_cols,
                                      DM_ARRAY_LEN(report_row_cols));
    for (size_t i = 0; i < rep->n_rows; i++)
        dm_output_record(o, dm_output_message(&rep->rows[i]->base));
    if (!dm_output_end(o, true) || fclose(mem) != 0)
        abort(); /* a memory stream fails only when out of memory */
    return text;
}

static int cmd_transfers_report(dm_client_t *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"from", required_argument, NULL, 'f'},
        {"to", required_argument, NULL, 't'},
        {"basis", required_argument, NULL, 'b'},
        {"purpose", required_argument, NULL, 'p'},
        {"from-region", required_argument, NULL, 'F'},
        {"to-region", required_argument, NULL, 'R'},
        {"format", required_argument, NULL, 'o'},
        {"output-file", required_argument, NULL, 'O'},
        /* The old name of --output-file: main() left it here because FILE is no format. */
        {"output", required_argument, NULL, 'O'},
        {NULL, 0, NULL, 0},
    };
    Domicile__V1__ReportRequest r = DOMICILE__V1__REPORT_REQUEST__INIT;
    const char *output = NULL, *format = NULL;
    int opt;

    optind = 0; /* GNU getopt: start over on this sub-argv */
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'f':
            if (!date_opt("from", optarg, &r.from_unix_ms))
                return DM_EXIT_USAGE;
            break;
        case 't':
            if (!date_opt("to", optarg, &r.to_unix_ms))
                return DM_EXIT_USAGE;
            break;
        case 'b':
            r.basis_id = optarg;
            break;
        case 'p':
            r.purpose = optarg;
            break;
        case 'F':
            r.from_region = optarg;
            break;
        case 'R':
            r.to_region = optarg;
            break;
        case 'o':
            format = optarg;
            break;
        case 'O':
            output = optarg;
            break;
        default:
            return bad_usage();
        }
    }
    if (optind != argc)
        return bad_usage();
    if (format && out_g.name && strcmp(format, out_g.name) != 0) {
        fprintf(stderr, "domicilectl: --format %s and --output %s disagree\n", format, out_g.name);
        return DM_EXIT_USAGE;
    }
    const char *name = format ? format : out_g.name ? out_g.name : "table";
    dm_report_format_t rfmt = DM_REPORT_TABLE;
    dm_output_format_t ofmt = DM_OUTPUT_TABLE;
    bool rows_only = false;
    if (strcmp(name, "wide") == 0) {
        rfmt = DM_REPORT_TABLE;
    } else if (strcmp(name, "jsonl") == 0 || strcmp(name, "tsv") == 0) {
        rows_only = dm_output_format_parse(name, &ofmt);
    } else if (!dm_report_format_parse(name, &rfmt)) {
        fprintf(stderr, "domicilectl: --output: one of table, json, jsonl, tsv, csv, markdown, "
                        "html\n");
        return DM_EXIT_USAGE;
    }
    if (!window_ok(r.from_unix_ms, r.to_unix_ms))
        return DM_EXIT_USAGE;

    /* A report over a long window walks whole ledger chains in every region: say that it is
     * waiting, on a terminal only. */
    dm_progress_t *progress = dm_progress_start("report", DM_PROGRESS_TICK);
    char from[32], to[32];
    dm_progress_status(progress, "waiting for the gateway (%s to %s)",
                       r.from_unix_ms ? dm_time_iso(r.from_unix_ms, from, sizeof(from))
                                      : "the first entry",
                       r.to_unix_ms ? dm_time_iso(r.to_unix_ms, to, sizeof(to)) : "now");
    ProtobufCMessage *resp = NULL;
    dm_status_t *st =
        dm_client_unary(c, TRANSFERS "Report", &r.base, &domicile__v1__report_response__descriptor,
                        ledger_timeout(), &resp);
    dm_progress_end(progress, false);
    if (st)
        return fail(st);
    const Domicile__V1__ReportResponse *rep = (const Domicile__V1__ReportResponse *)resp;
    char *text = rows_only ? report_rows(rep, ofmt) : dm_report_render(rep, rfmt);
    int rc = write_output(output, text);
    /* The table on a terminal already shows them; files and pipes need them said too. */
    if (rfmt != DM_REPORT_TABLE || rows_only || output)
        report_warnings(rep);
    free(text);
    protobuf_c_message_free_unpacked(resp, NULL);
    return rc;
}

static char *transfer_seq_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    return json_integer_value(v) > 0 ? dm_output_text(v) : NULL;
}

static char *transfer_route_cell(const json_t *v, const json_t *rec)
{
    (void)v;
    return dm_sprintf("%s\xe2\x86\x92%s", json_string_value(json_object_get(rec, "from_region")),
                      json_string_value(json_object_get(rec, "to_region")));
}

static const dm_output_column_t transfer_cols[] = {
    {"REGION", "region", NULL, 0},
    {"SEQ", "seq", transfer_seq_cell, 0},
    {"TIME", "at", NULL, 0},
    {"ROUTE", NULL, transfer_route_cell, 0},
    {"BASIS", "basis_id", NULL, 0},
    {"PURPOSE", "purpose", NULL, 0},
    {"OUTCOME", "outcome", NULL, 0},
    {"RECORDS", "record_count", NULL, 0},
    {"BYTES", "bytes", NULL, 0},
    {"METHOD", "method", NULL, 0},
    {"PRINCIPAL", "principal", NULL, 0},
    {"DIRECTION", "direction", NULL, DM_OUTPUT_COL_WIDE},
    {"CUSTOMER_ID", "customer_id", NULL, DM_OUTPUT_COL_WIDE},
    {"REQUEST_ID", "request_id", NULL, DM_OUTPUT_COL_WIDE},
    {"ENTRY_ID", "entry_id", NULL, DM_OUTPUT_COL_WIDE},
    {"REFUSAL_REASON", "refusal_reason", NULL, DM_OUTPUT_COL_WIDE},
};

static bool print_transfer(const ProtobufCMessage *m, void *arg)
{
    list_state_t *ls = arg;
    const Domicile__V1__ListTransfersResponse *r = (const Domicile__V1__ListTransfersResponse *)m;
    if (r->item_case == DOMICILE__V1__LIST_TRANSFERS_RESPONSE__ITEM_END)
        list_page_end(ls, r->end->next_page_token);
    else if (r->item_case == DOMICILE__V1__LIST_TRANSFERS_RESPONSE__ITEM_ENTRY)
        list_record(ls, dm_output_message(&r->entry->base));
    return true;
}

static int cmd_transfers_list(dm_client_t *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"basis", required_argument, NULL, 'b'},       {"region", required_argument, NULL, 'r'},
        {"customer", required_argument, NULL, 'c'},    {"outcome", required_argument, NULL, 'o'},
        {"purpose", required_argument, NULL, 'p'},     {"from", required_argument, NULL, 'f'},
        {"to", required_argument, NULL, 't'},          {"limit", required_argument, NULL, 'n'},
        {"from-region", required_argument, NULL, 'F'}, {"to-region", required_argument, NULL, 'R'},
        {"principal", required_argument, NULL, 'P'},   {"direction", required_argument, NULL, 'd'},
        {"subject", required_argument, NULL, 's'},     {NULL, 0, NULL, 0},
    };
    Domicile__V1__ListTransfersRequest r = DOMICILE__V1__LIST_TRANSFERS_REQUEST__INIT;
    long long limit = 0; /* 0: every matching entry */
    int opt;

    optind = 0;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'b':
            r.basis_id = optarg;
            break;
        case 'r':
            r.region = optarg;
            break;
        case 'c':
            r.customer_id = optarg;
            break;
        case 'o':
            if (strcmp(optarg, "allowed") == 0) {
                r.outcome = DOMICILE__V1__TRANSFER_OUTCOME__TRANSFER_OUTCOME_ALLOWED;
            } else if (strcmp(optarg, "refused") == 0) {
                r.outcome = DOMICILE__V1__TRANSFER_OUTCOME__TRANSFER_OUTCOME_REFUSED;
            } else {
                fprintf(stderr, "domicilectl: --outcome: allowed or refused\n");
                return DM_EXIT_USAGE;
            }
            break;
        case 'p':
            r.purpose = optarg;
            break;
        case 'f':
            if (!date_opt("from", optarg, &r.from_unix_ms))
                return DM_EXIT_USAGE;
            break;
        case 't':
            if (!date_opt("to", optarg, &r.to_unix_ms))
                return DM_EXIT_USAGE;
            break;
        case 'n':
            if (!parse_limit(optarg, &limit, "entries"))
                return DM_EXIT_USAGE;
            break;
        case 'F':
            r.from_region = optarg;
            break;
        case 'R':
            r.to_region = optarg;
            break;
        case 'P':
            r.principal = optarg;
            break;
        case 'd':
            if (strcmp(optarg, "read") == 0) {
                r.direction = DOMICILE__V1__TRANSFER_DIRECTION__TRANSFER_DIRECTION_READ;
            } else if (strcmp(optarg, "write") == 0) {
                r.direction = DOMICILE__V1__TRANSFER_DIRECTION__TRANSFER_DIRECTION_WRITE;
            } else {
                fprintf(stderr, "domicilectl: --direction: read or write\n");
                return DM_EXIT_USAGE;
            }
            break;
        case 's':
            r.subject = optarg;
            break;
        default:
            return bad_usage();
        }
    }
    if (optind != argc)
        return bad_usage();
    if (!window_ok(r.from_unix_ms, r.to_unix_ms))
        return DM_EXIT_USAGE;
    return page_through(c, TRANSFERS "ListTransfers", &r.base, &r.page_size, &r.page_token,
                        &domicile__v1__list_transfers_response__descriptor, print_transfer, limit,
                        "entries", ledger_timeout(),
                        out_open(DM_OUTPUT_LIST, transfer_cols, DM_ARRAY_LEN(transfer_cols)));
}

static char *verify_ok_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    return dm_strdup(json_is_true(v) ? "yes" : "NO");
}

static char *verify_checkpoint_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    if (!json_is_object(v))
        return dm_strdup("none");
    const json_t *before = json_object_get(v, "purged_before");
    return dm_sprintf("seq %lld, %lld entries purged before %s, signature %s",
                      (long long)json_integer_value(json_object_get(v, "seq")),
                      (long long)json_integer_value(json_object_get(v, "entries_purged")),
                      json_is_string(before) ? json_string_value(before) : "-",
                      json_is_true(json_object_get(v, "valid")) ? "valid" : "INVALID");
}

static char *verify_cuts_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    if (!json_is_array(v) || json_array_size(v) == 0)
        return dm_strdup("none");
    char *out = NULL;
    size_t i;
    const json_t *cut;
    json_array_foreach(v, i, cut)
    {
        const json_t *note = json_object_get(cut, "note");
        char *next = dm_sprintf("%s%s%s (signature %s)", out ? out : "", out ? "; " : "",
                                json_is_string(note) ? json_string_value(note) : "-",
                                json_is_true(json_object_get(cut, "valid")) ? "valid" : "INVALID");
        free(out);
        out = next;
    }
    return out;
}

static const dm_output_column_t verify_cols[] = {
    {"REGION", "region", NULL, 0},
    {"OK", "ok", verify_ok_cell, 0},
    {"DAMAGE", "damage", NULL, 0},
    {"FIRST_BAD_SEQ", "first_bad_seq", NULL, 0},
    {"ENTRIES_CHECKED", "entries_checked", NULL, 0},
    {"SEALED_UP_TO_SEQ", "sealed_up_to_seq", NULL, 0},
    {"UNSEALED", "unsealed_entries", NULL, 0},
    {"VERIFIED_AT", "verified_at", NULL, 0},
    {"CHECKPOINT", "checkpoint", verify_checkpoint_cell, DM_OUTPUT_COL_WIDE},
    {"DETAIL", "detail", NULL, DM_OUTPUT_COL_WIDE},
    {"RESTORE_CUTS", "restore_cuts", verify_cuts_cell, DM_OUTPUT_COL_WIDE},
};

static int cmd_transfers_verify(dm_client_t *c, int argc, char **argv)
{
    if (argc != 2)
        return bad_usage();
    Domicile__V1__VerifyLedgerRequest r = DOMICILE__V1__VERIFY_LEDGER_REQUEST__INIT;
    r.region = argv[1];
    ProtobufCMessage *resp = NULL;
    dm_status_t *st =
        dm_client_unary(c, TRANSFERS "VerifyLedger", &r.base,
                        &domicile__v1__verify_ledger_response__descriptor, ledger_timeout(), &resp);
    if (st)
        return fail(st);
    const Domicile__V1__VerifyLedgerResponse *v = (const Domicile__V1__VerifyLedgerResponse *)resp;
    bool ok = v->ok;
    int rc =
        out_one(DM_OUTPUT_ONE, verify_cols, DM_ARRAY_LEN(verify_cols), dm_output_message(&v->base));
    protobuf_c_message_free_unpacked(resp, NULL);
    return rc ? rc : ok ? DM_EXIT_OK : DM_EXIT_LEDGER;
}

static int cmd_transfers(dm_client_t *c, int argc, char **argv)
{
    if (argc >= 1 && strcmp(argv[0], "report") == 0)
        return cmd_transfers_report(c, argc, argv);
    if (argc >= 1 && strcmp(argv[0], "list") == 0)
        return cmd_transfers_list(c, argc, argv);
    if (argc >= 1 && strcmp(argv[0], "verify") == 0)
        return cmd_transfers_verify(c, argc, argv);
    return bad_usage();
}

/* ---- data-subject requests ---------------------------------------------------------------- */

#define DSR "/domicile.v1.SubjectRightsService/"

static int name_index(const char *const *names, size_t n, const char *s)
{
    for (size_t i = 1; i < n; i++)
        if (strcmp(names[i], s) == 0)
            return (int)i;
    return -1;
}

/* The deadline that binds: the extended one, else the stricter of policy and GDPR month. */
static int64_t dsr_effective_due(const Domicile__V1__DsrRequest *q)
{
    if (q->extended)
        return q->extended_due_at_unix_ms;
    return q->due_at_unix_ms < q->gdpr_due_at_unix_ms ? q->due_at_unix_ms : q->gdpr_due_at_unix_ms;
}

static int cmp_leg_region(const void *a, const void *b)
{
    return strcmp((*(Domicile__V1__DsrLeg *const *)a)->region,
                  (*(Domicile__V1__DsrLeg *const *)b)->region);
}

static int cmp_count_region(const void *a, const void *b)
{
    return strcmp((*(Domicile__V1__RegionCount *const *)a)->region,
                  (*(Domicile__V1__RegionCount *const *)b)->region);
}

/* The request as JSON: its legs in region code order, whatever order the gateway sent them in
 * (sorted in place), and the deadline that binds, effective_due_at. */
static json_t *dsr_json(Domicile__V1__DsrRequest *q)
{
    qsort(q->legs, q->n_legs, sizeof(*q->legs), cmp_leg_region);
    json_t *j = dm_output_message(&q->base);
    json_object_set_new(j, "effective_due_at", dm_output_time(dsr_effective_due(q)));
    return j;
}

static const char *str_at(const json_t *rec, const char *path)
{
    const char *s = json_string_value(dm_output_get(rec, path));
    return s ? s : "";
}

static const char *time_at(const json_t *rec, const char *path)
{
    const char *s = json_string_value(dm_output_get(rec, path));
    return s ? s : "-";
}

static char *nonempty_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    return json_string_length(v) ? dm_strdup(json_string_value(v)) : NULL;
}

static char *dsr_customer_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    return dm_strdup(json_string_length(v) ? json_string_value(v) : "* (every customer in scope)");
}

static char *dsr_customer_short_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    return dm_strdup(json_string_length(v) ? json_string_value(v) : "*");
}

static char *dsr_due_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    return dm_sprintf("%s (policy: 30 days)", json_is_string(v) ? json_string_value(v) : "-");
}

static char *dsr_gdpr_due_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    return dm_sprintf("%s (one calendar month)", json_is_string(v) ? json_string_value(v) : "-");
}

static char *dsr_extended_cell(const json_t *v, const json_t *rec)
{
    (void)v;
    if (!json_is_true(json_object_get(rec, "extended")))
        return dm_strdup("- (not extended)");
    return dm_sprintf("%s (extended at %s: %s)", time_at(rec, "extended_due_at"),
                      time_at(rec, "extended_at"), str_at(rec, "extension_reason"));
}

static char *dsr_effective_cell(const json_t *v, const json_t *rec)
{
    return dm_sprintf("%s%s", json_is_string(v) ? json_string_value(v) : "-",
                      json_is_true(json_object_get(rec, "overdue")) ? " OVERDUE" : "");
}

static char *dsr_webhook_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    if (!json_is_object(v))
        return NULL;
    const char *state = json_string_value(json_object_get(v, "state"));
    char *s = dm_sprintf("%s, %lld attempts", state ? state : "-",
                         (long long)json_integer_value(json_object_get(v, "attempts"))),
         *n;
    if (json_is_string(json_object_get(v, "delivered_at"))) {
        n = dm_sprintf("%s, delivered %s", s, time_at(v, "delivered_at"));
        free(s);
        s = n;
    }
    if (str_at(v, "last_error")[0]) {
        n = dm_sprintf("%s, last error: %s", s, str_at(v, "last_error"));
        free(s);
        s = n;
    }
    return s;
}

static char *dsr_leg_cell(const json_t *l, const json_t *rec)
{
    (void)rec;
    const char *state = json_string_value(json_object_get(l, "state"));
    char *s = dm_sprintf("%s, %lld attempts", state ? state : "-",
                         (long long)json_integer_value(json_object_get(l, "attempts"))),
         *n = NULL;
    const json_t *r = json_object_get(l, "receipt");
    if (json_is_object(r)) {
        const char *sha = str_at(r, "receipt_sha256_hex");
        n = dm_sprintf("%s, matched %lld, deleted %lld, keys destroyed %lld, finished %s, "
                       "receipt %s",
                       s, (long long)json_integer_value(json_object_get(r, "records_matched")),
                       (long long)json_integer_value(json_object_get(r, "records_deleted")),
                       (long long)json_integer_value(json_object_get(r, "keys_destroyed")),
                       time_at(r, "finished_at"), sha[0] ? sha : "-");
        free(s);
        s = n;
    }
    bool running = state && strcmp(state, "running") == 0;
    bool failed = state && strcmp(state, "failed") == 0;
    bool over = state && (strcmp(state, "done") == 0 || strcmp(state, "skipped") == 0);
    if (running && str_at(l, "claimed_by")[0]) {
        n = dm_sprintf("%s, claimed by %s until %s", s, str_at(l, "claimed_by"),
                       time_at(l, "lease_expires_at"));
        free(s);
        s = n;
    }
    if (failed && json_is_string(json_object_get(l, "next_attempt_at"))) {
        n = dm_sprintf("%s, next attempt %s", s, time_at(l, "next_attempt_at"));
        free(s);
        s = n;
    }
    if (!over && str_at(l, "last_error")[0]) {
        n = dm_sprintf("%s, last error: %s", s, str_at(l, "last_error"));
        free(s);
        s = n;
    }
    return s;
}

/* `dsr status` and the filing commands: one request in detail, a line per field and per leg. */
static const dm_output_column_t dsr_detail_cols[] = {
    {"request_id", "request_id", NULL, 0},
    {"kind", "kind", NULL, 0},
    {"state", "state", NULL, 0},
    {"subject_key", "subject_key_hex", NULL, 0},
    {"customer", "customer_id", dsr_customer_cell, 0},
    {"purpose", "purpose", nonempty_cell, 0},
    {"reason", "reason", nonempty_cell, 0},
    {"principal", "principal", NULL, 0},
    {"received_at", "received_at", NULL, 0},
    {"due_at", "due_at", dsr_due_cell, 0},
    {"gdpr_due_at", "gdpr_due_at", dsr_gdpr_due_cell, 0},
    {"extended_due_at", NULL, dsr_extended_cell, 0},
    {"effective_due", "effective_due_at", dsr_effective_cell, 0},
    {"completed_at", "completed_at", NULL, 0},
    {"webhook", "webhook", dsr_webhook_cell, 0},
};

static int print_dsr(Domicile__V1__DsrRequest *q)
{
    json_t *j = dsr_json(q);
    size_t n = DM_ARRAY_LEN(dsr_detail_cols);
    /* One line per leg: columns of their own, made for this request. */
    dm_output_column_t *cols = dm_calloc(n + q->n_legs, sizeof(*cols));
    char **labels = dm_calloc(q->n_legs + 1, 2 * sizeof(char *));
    memcpy(cols, dsr_detail_cols, sizeof(dsr_detail_cols));
    for (size_t i = 0; i < q->n_legs; i++) {
        char *region = dm_report_plain(q->legs[i]->region);
        labels[2 * i] = dm_sprintf("leg %s", region);
        labels[2 * i + 1] = dm_sprintf("legs.%zu", i);
        cols[n + i] = (dm_output_column_t){labels[2 * i], labels[2 * i + 1], dsr_leg_cell, 0};
        free(region);
    }
    int rc = out_one(DM_OUTPUT_DETAIL, cols, n + q->n_legs, j);
    for (size_t i = 0; i < 2 * q->n_legs; i++)
        free(labels[i]);
    free(labels);
    free(cols);
    return rc;
}

/* `out`: the method's response type, each `{ DsrRequest request = 1; }`. */
static int dsr_unary(dm_client_t *c, const char *method, const ProtobufCMessage *req,
                     const ProtobufCMessageDescriptor *out)
{
    ProtobufCMessage *resp = NULL;
    char *path = dm_sprintf(DSR "%s", method);
    dm_status_t *st = dm_client_unary(c, path, req, out, timeout_g, &resp);
    free(path);
    if (st)
        return fail(st);
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field_by_name(out, "request");
    Domicile__V1__DsrRequest *q =
        f ? *(Domicile__V1__DsrRequest **)((char *)resp + f->offset) : NULL;
    if (!q)
        return empty_response(resp, "request");
    int rc = print_dsr(q);
    protobuf_c_message_free_unpacked(resp, NULL);
    return rc;
}

/* SUBJECT "-": the first line of stdin, so that the subject stays out of the process list. */
static char *subject_arg(const char *arg)
{
    if (strcmp(arg, "-") != 0)
        return dm_strdup(arg);
    char *line = NULL;
    size_t cap = 0;
    ssize_t n = getline(&line, &cap, stdin);
    if (n < 0) {
        free(line);
        fprintf(stderr, "domicilectl: SUBJECT \"-\": nothing on stdin\n");
        return NULL;
    }
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    return line;
}

typedef struct dsr_opts {
    const char *customer, *reason, *request_id, *output;
    bool allow_partial;
    char *generated_id; /* owned */
} dsr_opts_t;

/* Parses --customer, --reason, --request-id (and, for export, --output-file and
 * --allow-partial); the positional arguments end up in argv[optind..]. Returns false after a
 * usage error. */
static bool dsr_parse(int argc, char **argv, dsr_opts_t *o, bool export)
{
    static const struct option opts[] = {
        {"customer", required_argument, NULL, 'c'},
        {"reason", required_argument, NULL, 'r'},
        {"request-id", required_argument, NULL, 'i'},
        {"output-file", required_argument, NULL, 'o'},
        /* The old name of --output-file: main() left it here because FILE is no format. */
        {"output", required_argument, NULL, 'o'},
        {"allow-partial", no_argument, NULL, 'p'},
        {NULL, 0, NULL, 0},
    };
    int opt;
    memset(o, 0, sizeof(*o));
    o->customer = "";
    o->reason = "";
    optind = 0;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            o->customer = optarg;
            break;
        case 'r':
            o->reason = optarg;
            break;
        case 'i':
            o->request_id = optarg;
            break;
        case 'o':
            if (!export)
                goto bad;
            o->output = optarg;
            break;
        case 'p':
            if (!export)
                goto bad;
            o->allow_partial = true;
            break;
        default:
            goto bad;
        }
    }
    if (!o->request_id)
        o->request_id = o->generated_id = new_request_id();
    return true;
bad:
    usage(stderr);
    return false;
}

/* erase | restrict | unrestrict SUBJECT; object | withdraw SUBJECT PURPOSE */
static int cmd_dsr_file(dm_client_t *c, int argc, char **argv)
{
    const char *what = argv[0];
    bool with_purpose = strcmp(what, "object") == 0 || strcmp(what, "withdraw") == 0;
    dsr_opts_t o;
    if (!dsr_parse(argc, argv, &o, false))
        return DM_EXIT_USAGE;
    if (argc - optind != (with_purpose ? 2 : 1)) {
        free(o.generated_id);
        return bad_usage();
    }
    char *subject = subject_arg(argv[optind]);
    if (!subject) {
        free(o.generated_id);
        return DM_EXIT_USAGE;
    }
    const char *purpose = with_purpose ? argv[optind + 1] : "";
    char *rid = (char *)o.request_id, *customer = (char *)o.customer, *reason = (char *)o.reason;
    int rc;
    if (strcmp(what, "erase") == 0) {
        Domicile__V1__EraseRequest r = DOMICILE__V1__ERASE_REQUEST__INIT;
        r.request_id = rid;
        r.subject = subject;
        r.customer_id = customer;
        r.reason = reason;
        rc = dsr_unary(c, "Erase", &r.base, &domicile__v1__erase_response__descriptor);
    } else if (strcmp(what, "restrict") == 0) {
        Domicile__V1__RestrictProcessingRequest r = DOMICILE__V1__RESTRICT_PROCESSING_REQUEST__INIT;
        r.request_id = rid;
        r.subject = subject;
        r.customer_id = customer;
        r.reason = reason;
        rc = dsr_unary(c, "RestrictProcessing", &r.base,
                       &domicile__v1__restrict_processing_response__descriptor);
    } else if (strcmp(what, "unrestrict") == 0) {
        Domicile__V1__UnrestrictProcessingRequest r =
            DOMICILE__V1__UNRESTRICT_PROCESSING_REQUEST__INIT;
        r.request_id = rid;
        r.subject = subject;
        r.customer_id = customer;
        r.reason = reason;
        rc = dsr_unary(c, "UnrestrictProcessing", &r.base,
                       &domicile__v1__unrestrict_processing_response__descriptor);
    } else if (strcmp(what, "object") == 0) {
        Domicile__V1__ObjectRequest r = DOMICILE__V1__OBJECT_REQUEST__INIT;
        r.request_id = rid;
        r.subject = subject;
        r.customer_id = customer;
        r.purpose = (char *)purpose;
        r.reason = reason;
        rc = dsr_unary(c, "Object", &r.base, &domicile__v1__object_response__descriptor);
    } else {
        Domicile__V1__WithdrawRequest r = DOMICILE__V1__WITHDRAW_REQUEST__INIT;
        r.request_id = rid;
        r.subject = subject;
        r.customer_id = customer;
        r.purpose = (char *)purpose;
        r.reason = reason;
        rc = dsr_unary(c, "Withdraw", &r.base, &domicile__v1__withdraw_response__descriptor);
    }
    OPENSSL_cleanse(subject, strlen(subject));
    free(subject);
    free(o.generated_id);
    return rc;
}

static int cmd_dsr_status(dm_client_t *c, int argc, char **argv)
{
    if (argc != 2)
        return bad_usage();
    Domicile__V1__GetRequestRequest r = DOMICILE__V1__GET_REQUEST_REQUEST__INIT;
    r.request_id = argv[1];
    return dsr_unary(c, "GetRequest", &r.base, &domicile__v1__get_request_response__descriptor);
}

static int cmd_dsr_extend(dm_client_t *c, int argc, char **argv)
{
    if (argc != 3)
        return bad_usage();
    Domicile__V1__ExtendDeadlineRequest r = DOMICILE__V1__EXTEND_DEADLINE_REQUEST__INIT;
    r.request_id = argv[1];
    r.reason = argv[2];
    return dsr_unary(c, "ExtendDeadline", &r.base,
                     &domicile__v1__extend_deadline_response__descriptor);
}

static char *dsr_overdue_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    return json_is_true(v) ? dm_strdup("overdue") : NULL;
}

static char *dsr_legs_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    char *s = dm_strdup("");
    size_t i;
    const json_t *l;
    json_array_foreach(v, i, l)
    {
        const char *state = json_string_value(json_object_get(l, "state"));
        char *n =
            dm_sprintf("%s%s%s:%s", s, i ? "," : "", str_at(l, "region"), state ? state : "-");
        free(s);
        s = n;
    }
    return s;
}

static const dm_output_column_t dsr_list_cols[] = {
    {"REQUEST_ID", "request_id", NULL, 0},
    {"KIND", "kind", NULL, 0},
    {"STATE", "state", NULL, 0},
    {"RECEIVED_AT", "received_at", NULL, 0},
    {"DUE", "effective_due_at", NULL, 0},
    {"OVERDUE", "overdue", dsr_overdue_cell, 0},
    {"CUSTOMER", "customer_id", dsr_customer_short_cell, 0},
    {"LEGS", "legs", dsr_legs_cell, 0},
    {"PRINCIPAL", "principal", NULL, DM_OUTPUT_COL_WIDE},
    {"PURPOSE", "purpose", NULL, DM_OUTPUT_COL_WIDE},
    {"COMPLETED_AT", "completed_at", NULL, DM_OUTPUT_COL_WIDE},
};

static bool print_dsr_line(const ProtobufCMessage *m, void *arg)
{
    list_state_t *ls = arg;
    const Domicile__V1__ListRequestsResponse *r = (const Domicile__V1__ListRequestsResponse *)m;
    if (r->item_case == DOMICILE__V1__LIST_REQUESTS_RESPONSE__ITEM_END)
        list_page_end(ls, r->end->next_page_token);
    else if (r->item_case == DOMICILE__V1__LIST_REQUESTS_RESPONSE__ITEM_REQUEST)
        list_record(ls, dsr_json(r->request)); /* sorts the legs of a message freed after */
    return true;
}

static const char *const dsr_kind_names[] = {"-",          "erase",  "export",  "restrict",
                                             "unrestrict", "object", "withdraw"};
static const char *const dsr_state_names[] = {"-", "received", "in_progress", "done", "failed"};

static int cmd_dsr_list(dm_client_t *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"overdue", no_argument, NULL, 'o'},
        {"due-within", required_argument, NULL, 'd'},
        {"state", required_argument, NULL, 's'},
        {"kind", required_argument, NULL, 'k'},
        {"customer", required_argument, NULL, 'c'},
        {"limit", required_argument, NULL, 'n'},
        {NULL, 0, NULL, 0},
    };
    Domicile__V1__ListRequestsRequest r = DOMICILE__V1__LIST_REQUESTS_REQUEST__INIT;
    long long limit = 0;
    int opt, v;
    char *end;
    optind = 0;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'o':
            r.overdue_only = true;
            break;
        case 'd':
            errno = 0;
            r.due_within_days = (int32_t)strtol(optarg, &end, 10);
            if (errno || end == optarg || *end || r.due_within_days < 1 ||
                r.due_within_days > 366) {
                fprintf(stderr, "domicilectl: --due-within: a number of days, 1..366\n");
                return DM_EXIT_USAGE;
            }
            break;
        case 's':
            if ((v = name_index(dsr_state_names, DM_ARRAY_LEN(dsr_state_names), optarg)) < 0) {
                fprintf(stderr, "domicilectl: --state: received, in_progress, done or failed\n");
                return DM_EXIT_USAGE;
            }
            r.state = v;
            break;
        case 'k':
            if ((v = name_index(dsr_kind_names, DM_ARRAY_LEN(dsr_kind_names), optarg)) < 0) {
                fprintf(stderr, "domicilectl: --kind: erase, export, restrict, unrestrict, "
                                "object or withdraw\n");
                return DM_EXIT_USAGE;
            }
            r.kind = v;
            break;
        case 'c':
            r.customer_id = optarg;
            break;
        case 'n':
            if (!parse_limit(optarg, &limit, "requests"))
                return DM_EXIT_USAGE;
            break;
        default:
            return bad_usage();
        }
    }
    if (optind != argc)
        return bad_usage();
    return page_through(c, DSR "ListRequests", &r.base, &r.page_size, &r.page_token,
                        &domicile__v1__list_requests_response__descriptor, print_dsr_line, limit,
                        "requests", ledger_timeout(),
                        out_open(DM_OUTPUT_LIST, dsr_list_cols, DM_ARRAY_LEN(dsr_list_cols)));
}

static char *locate_status_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    return dm_strdup(json_is_true(v) ? "reachable" : "unreachable");
}

static const dm_output_column_t locate_cols[] = {
    {"REGION", "region", NULL, 0},
    {"RECORDS", "records", NULL, 0},
    {"BYTES", "bytes", NULL, 0},
    {"STATUS", "reachable", locate_status_cell, 0},
};

static int cmd_dsr_locate(dm_client_t *c, int argc, char **argv)
{
    static const struct option opts[] = {
        {"customer", required_argument, NULL, 'c'},
        {NULL, 0, NULL, 0},
    };
    const char *customer = "";
    int opt;
    optind = 0;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (opt != 'c')
            return bad_usage();
        customer = optarg;
    }
    if (argc - optind != 1)
        return bad_usage();
    char *subject = subject_arg(argv[optind]);
    if (!subject)
        return DM_EXIT_USAGE;
    Domicile__V1__LocateRequest r = DOMICILE__V1__LOCATE_REQUEST__INIT;
    r.subject = subject;
    r.customer_id = (char *)customer;
    ProtobufCMessage *resp = NULL;
    dm_status_t *st = dm_client_unary(c, DSR "Locate", &r.base,
                                      &domicile__v1__locate_response__descriptor, timeout_g, &resp);
    OPENSSL_cleanse(subject, strlen(subject));
    free(subject);
    if (st)
        return fail(st);
    Domicile__V1__LocateResponse *l = (Domicile__V1__LocateResponse *)resp;
    qsort(l->counts, l->n_counts, sizeof(*l->counts), cmp_count_region);
    long long records = 0, bytes = 0;
    dm_output_t *o = out_open(DM_OUTPUT_LIST, locate_cols, DM_ARRAY_LEN(locate_cols));
    for (size_t i = 0; i < l->n_counts; i++) {
        json_t *j = dm_output_message(&l->counts[i]->base);
        json_object_set_new(j, "reachable", json_true());
        dm_output_record(o, j);
        records += l->counts[i]->records;
        bytes += l->counts[i]->bytes;
    }
    for (size_t i = 0; i < l->n_unreachable_regions; i++) {
        json_t *j = json_object();
        json_object_set_new(j, "region", dm_output_string(l->unreachable_regions[i]));
        json_object_set_new(j, "records", json_null());
        json_object_set_new(j, "bytes", json_null());
        json_object_set_new(j, "reachable", json_false());
        dm_output_record(o, j);
        char *region = dm_report_plain(l->unreachable_regions[i]);
        fprintf(stderr,
                "domicilectl: warning: region %s could not be asked: its count is "
                "unknown\n",
                region);
        free(region);
    }
    char tr[24], tb[24];
    snprintf(tr, sizeof(tr), "%lld", records);
    snprintf(tb, sizeof(tb), "%lld", bytes);
    const char *total[] = {"total", tr, tb, l->n_unreachable_regions ? "partial" : "complete"};
    dm_output_extra(o, total);
    int rc = out_close(o, true);
    if (!rc && l->n_unreachable_regions)
        rc = DM_EXIT_PARTIAL;
    protobuf_c_message_free_unpacked(resp, NULL);
    return rc;
}

/* ---- export ---- */

#define EXPORT_MAX_REGIONS 32

typedef struct export_region_count {
    char *region; /* owned */
    int64_t records, bytes;
} export_region_count_t;

typedef struct export_state {
    FILE *out;
    const char *path; /* NULL: stdout */
    EVP_MD_CTX *sha;
    export_region_count_t regions[EXPORT_MAX_REGIONS];
    size_t n_regions;
    int64_t records, bytes;
    Domicile__V1__ExportManifest *manifest; /* a copy of the manifest; owned */
    int manifests;
    bool line_after_manifest, bad_line;
    int write_errno;         /* non-zero: writing failed */
    dm_progress_t *progress; /* NULL: stderr is no terminal, or the lines go to it */
} export_state_t;

static export_region_count_t *export_region_of(export_state_t *e, const char *region)
{
    for (size_t i = 0; i < e->n_regions; i++)
        if (strcmp(e->regions[i].region, region) == 0)
            return &e->regions[i];
    if (e->n_regions == EXPORT_MAX_REGIONS)
        return NULL;
    export_region_count_t *r = &e->regions[e->n_regions++];
    r->region = dm_strdup(region);
    r->records = r->bytes = 0;
    return r;
}

/* "eu 2, in 2, us 2 — 6 records, 1234 bytes" */
static void export_progress(export_state_t *e)
{
    if (!e->progress)
        return;
    char *text = dm_strdup("");
    for (size_t i = 0; i < e->n_regions; i++) {
        char *n = dm_sprintf("%s%s%s %lld", text, i ? ", " : "", e->regions[i].region,
                             (long long)e->regions[i].records);
        free(text);
        text = n;
    }
    dm_progress_status(e->progress, "%s%s%lld records, %lld bytes", text,
                       e->n_regions ? " \xe2\x80\x94 " : "", (long long)e->records,
                       (long long)e->bytes);
    free(text);
}

static bool export_chunk(const ProtobufCMessage *m, void *arg)
{
    export_state_t *e = arg;
    const Domicile__V1__ExportResponse *ch = (const Domicile__V1__ExportResponse *)m;
    if (ch->item_case == DOMICILE__V1__EXPORT_RESPONSE__ITEM_MANIFEST) {
        if (e->manifests++ == 0) {
            /* Keep a copy: the message is freed when this returns. */
            size_t n = protobuf_c_message_get_packed_size(&ch->manifest->base);
            uint8_t *buf = dm_malloc(n ? n : 1);
            protobuf_c_message_pack(&ch->manifest->base, buf);
            e->manifest = domicile__v1__export_manifest__unpack(NULL, n, buf);
            free(buf);
        }
        return true;
    }
    if (ch->item_case != DOMICILE__V1__EXPORT_RESPONSE__ITEM_LINE)
        return true;
    const Domicile__V1__ExportLine *l = ch->line;
    if (e->manifests)
        e->line_after_manifest = true;
    export_region_count_t *r = export_region_of(e, l->region);
    if (!r) {
        e->bad_line = true;
        return false;
    }
    if (fwrite(l->line.data, 1, l->line.len, e->out) != l->line.len) {
        e->write_errno = errno ? errno : EIO;
        return false;
    }
    EVP_DigestUpdate(e->sha, l->line.data, l->line.len);
    r->records++;
    r->bytes += (int64_t)l->line.len;
    e->records++;
    e->bytes += (int64_t)l->line.len;
    export_progress(e);
    return true;
}
/* Checks what was written against the manifest; prints every difference. */
static bool export_verify(export_state_t *e, const char *sha_hex)
{
    const Domicile__V1__ExportManifest *m = e->manifest;
    bool ok = true;
    if (e->line_after_manifest) {
        fprintf(stderr, "domicilectl: export: lines came after the manifest\n");
        ok = false;
    }
    if (e->manifests > 1) {
        fprintf(stderr, "domicilectl: export: %d manifests in one stream\n", e->manifests);
        ok = false;
    }
    if (strcmp(m->sha256_hex, sha_hex) != 0) {
        char *theirs = dm_report_plain(m->sha256_hex);
        fprintf(stderr,
                "domicilectl: export: SHA-256 of the lines written is %s, the manifest says %s\n",
                sha_hex, theirs);
        free(theirs);
        ok = false;
    }
    if (m->total_records != e->records || m->total_bytes != e->bytes) {
        fprintf(stderr,
                "domicilectl: export: %lld records / %lld bytes written, the manifest says %lld "
                "/ %lld\n",
                (long long)e->records, (long long)e->bytes, (long long)m->total_records,
                (long long)m->total_bytes);
        ok = false;
    }
    /* Per region, both ways: every region of the manifest, every region that sent lines. */
    for (size_t i = 0; i < m->n_regions; i++) {
        const Domicile__V1__RegionCount *rc = m->regions[i];
        int64_t records = 0, bytes = 0;
        for (size_t k = 0; k < e->n_regions; k++)
            if (strcmp(e->regions[k].region, rc->region) == 0) {
                records = e->regions[k].records;
                bytes = e->regions[k].bytes;
            }
        if (records != rc->records || bytes != rc->bytes) {
            char *region = dm_report_plain(rc->region);
            fprintf(stderr,
                    "domicilectl: export: region %s: %lld records / %lld bytes written, the "
                    "manifest says %lld / %lld\n",
                    region, (long long)records, (long long)bytes, (long long)rc->records,
                    (long long)rc->bytes);
            free(region);
            ok = false;
        }
    }
    for (size_t k = 0; k < e->n_regions; k++) {
        bool listed = false;
        for (size_t i = 0; i < m->n_regions; i++)
            listed = listed || strcmp(e->regions[k].region, m->regions[i]->region) == 0;
        if (!listed) {
            char *region = dm_report_plain(e->regions[k].region);
            fprintf(stderr,
                    "domicilectl: export: region %s sent %lld records the manifest does "
                    "not list\n",
                    region, (long long)e->regions[k].records);
            free(region);
            ok = false;
        }
    }
    return ok;
}

static void export_free(export_state_t *e)
{
    for (size_t i = 0; i < e->n_regions; i++)
        free(e->regions[i].region);
    if (e->manifest)
        domicile__v1__export_manifest__free_unpacked(e->manifest, NULL);
    EVP_MD_CTX_free(e->sha);
}

/* Streams of personal data: no deadline unless --timeout says so. */
static int export_timeout(void)
{
    return timeout_explicit_g ? timeout_g : 0;
}

static char *export_regions_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    char *s = dm_strdup("");
    size_t i;
    const json_t *r;
    json_array_foreach(v, i, r)
    {
        char *n = dm_sprintf("%s%s%s:%lld", s, i ? "," : "", str_at(r, "region"),
                             (long long)json_integer_value(json_object_get(r, "records")));
        free(s);
        s = n;
    }
    return s;
}

/* The summary of an export written to a file: its manifest, verified. */
static const dm_output_column_t export_cols[] = {
    {"REQUEST_ID", "request_id", NULL, 0},
    {"RECORDS", "total_records", NULL, 0},
    {"BYTES", "total_bytes", NULL, 0},
    {"SHA256", "sha256_hex", NULL, 0},
    {"COMPLETE", "complete", NULL, 0},
    {"REGIONS", "regions", export_regions_cell, DM_OUTPUT_COL_WIDE},
    {"UNREACHABLE", "unreachable_regions", NULL, DM_OUTPUT_COL_WIDE},
    {"FILE", "output_file", NULL, DM_OUTPUT_COL_WIDE},
};

static int cmd_dsr_export(dm_client_t *c, int argc, char **argv)
{
    dsr_opts_t o;
    if (!dsr_parse(argc, argv, &o, true))
        return DM_EXIT_USAGE;
    if (argc - optind != 1) {
        free(o.generated_id);
        return bad_usage();
    }
    export_state_t e;
    memset(&e, 0, sizeof(e));
    e.path = o.output && strcmp(o.output, "-") != 0 ? o.output : NULL;
    if (!e.path && out_g.name) {
        fprintf(stderr,
                "domicilectl: dsr export: --output %s formats the export's summary, "
                "printed when the records go to --output-file FILE (without it they go "
                "to stdout as JSON Lines)\n",
                out_g.name);
        free(o.generated_id);
        return DM_EXIT_USAGE;
    }
    char *subject = subject_arg(argv[optind]);
    if (!subject) {
        free(o.generated_id);
        return DM_EXIT_USAGE;
    }
    if (e.path) {
        /* Personal data: readable by the owner only. */
        int fd = open(e.path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0 || !(e.out = fdopen(fd, "w"))) {
            fprintf(stderr, "domicilectl: cannot write %s: %s\n", e.path, strerror(errno));
            if (fd >= 0)
                close(fd);
            free(subject);
            free(o.generated_id);
            return DM_EXIT_FAILURE;
        }
    } else {
        e.out = stdout;
    }
    e.sha = EVP_MD_CTX_new();
    EVP_DigestInit_ex(e.sha, EVP_sha256(), NULL);
    /* The progress line goes to a terminal, unless the lines themselves go to that terminal. */
    if (e.path || isatty(STDOUT_FILENO) != 1)
        e.progress = dm_progress_start("export", 0);

    Domicile__V1__ExportRequest r = DOMICILE__V1__EXPORT_REQUEST__INIT;
    r.request_id = (char *)o.request_id;
    r.subject = subject;
    r.customer_id = (char *)o.customer;
    r.reason = (char *)o.reason;
    r.allow_partial = o.allow_partial;
    dm_status_t *st = dm_client_server_stream(c, DSR "Export", &r.base,
                                              &domicile__v1__export_response__descriptor,
                                              export_timeout(), export_chunk, &e);
    OPENSSL_cleanse(subject, strlen(subject));
    free(subject);
    export_progress(&e);
    dm_progress_end(e.progress, true);

    int rc = DM_EXIT_OK;
    bool keep = true;
    if (fflush(e.out) != 0 && !e.write_errno)
        e.write_errno = errno;
    if (e.path && fclose(e.out) != 0 && !e.write_errno)
        e.write_errno = errno;
    char *id = dm_report_plain(o.request_id);
    if (e.write_errno) {
        fprintf(stderr, "domicilectl: cannot write %s: %s\n", e.path ? e.path : "stdout",
                strerror(e.write_errno));
        dm_status_free(st);
        rc = DM_EXIT_FAILURE;
        keep = false;
    } else if (e.bad_line) {
        fprintf(stderr, "domicilectl: export: lines from more than %d regions\n",
                EXPORT_MAX_REGIONS);
        dm_status_free(st);
        rc = DM_EXIT_MISMATCH;
        keep = false;
    } else if (st) {
        rc = fail(st);
        keep = false;
    } else if (!e.manifest) {
        fprintf(stderr,
                "domicilectl: export %s: the stream ended without a manifest: the "
                "export cannot be verified\n",
                id);
        rc = DM_EXIT_MISMATCH;
        keep = false;
    } else {
        unsigned char digest[EVP_MAX_MD_SIZE];
        unsigned int dl = 0;
        char hex[2 * EVP_MAX_MD_SIZE + 1];
        EVP_DigestFinal_ex(e.sha, digest, &dl);
        for (unsigned int i = 0; i < dl; i++)
            snprintf(hex + 2 * i, 3, "%02x", digest[i]);
        hex[2 * dl] = '\0';
        if (!export_verify(&e, hex)) {
            fprintf(stderr, "domicilectl: export %s does NOT match its manifest%s\n", id,
                    e.path ? ": output removed" : "");
            rc = DM_EXIT_MISMATCH;
            keep = false;
        } else if (!e.manifest->complete || e.manifest->n_unreachable_regions) {
            fprintf(stderr,
                    "domicilectl: export %s is INCOMPLETE: %lld records, %lld bytes "
                    "verified; regions not exported:",
                    id, (long long)e.records, (long long)e.bytes);
            for (size_t i = 0; i < e.manifest->n_unreachable_regions; i++) {
                char *region = dm_report_plain(e.manifest->unreachable_regions[i]);
                fprintf(stderr, " %s", region);
                free(region);
            }
            fprintf(stderr, "\n");
            rc = DM_EXIT_INCOMPLETE;
        } else {
            fprintf(stderr,
                    "domicilectl: export %s: %lld records, %lld bytes, sha256 %s: "
                    "verified against the manifest\n",
                    id, (long long)e.records, (long long)e.bytes, hex);
        }
    }
    if (!keep && e.path)
        unlink(e.path);
    if (keep && e.path) {
        /* What was verified, for the script that filed the export. */
        json_t *j = dm_output_message(&e.manifest->base);
        json_object_set_new(j, "output_file", dm_output_string(e.path));
        int wrc = out_one(DM_OUTPUT_ONE, export_cols, DM_ARRAY_LEN(export_cols), j);
        rc = rc ? rc : wrc;
    }
    free(id);
    export_free(&e);
    free(o.generated_id);
    return rc;
}

static int cmd_dsr(dm_client_t *c, int argc, char **argv)
{
    if (argc < 1)
        return bad_usage();
    const char *s = argv[0];
    if (strcmp(s, "erase") == 0 || strcmp(s, "restrict") == 0 || strcmp(s, "unrestrict") == 0 ||
        strcmp(s, "object") == 0 || strcmp(s, "withdraw") == 0)
        return cmd_dsr_file(c, argc, argv);
    if (strcmp(s, "export") == 0)
        return cmd_dsr_export(c, argc, argv);
    if (strcmp(s, "status") == 0)
        return cmd_dsr_status(c, argc, argv);
    if (strcmp(s, "list") == 0)
        return cmd_dsr_list(c, argc, argv);
    if (strcmp(s, "locate") == 0)
        return cmd_dsr_locate(c, argc, argv);
    if (strcmp(s, "extend") == 0)
        return cmd_dsr_extend(c, argc, argv);
    return bad_usage();
}

char *dm_ctl_read_file(const char *path, bool strip)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    size_t cap = 8192, n = 0;
    char *buf = dm_malloc(cap);
    size_t r;
    while ((r = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += r;
        if (n + 1 >= cap)
            buf = dm_realloc(buf, cap *= 2);
    }
    fclose(f);
    buf[n] = '\0';
    while (strip && n && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
        buf[--n] = '\0';
    return buf;
}

/* A file the command line names: one that cannot be read ends the command. */
static char *slurp(const char *path, bool strip)
{
    char *buf = dm_ctl_read_file(path, strip);
    if (!buf) {
        fprintf(stderr, "domicilectl: cannot read %s: %s\n", path, strerror(errno));
        exit(DM_EXIT_USAGE);
    }
    return buf;
}

/* ---- the command line --------------------------------------------------------------------- */

static bool is_report(const char *cmd, const char *sub)
{
    return strcmp(cmd, "transfers") == 0 && sub && strcmp(sub, "report") == 0;
}

/* A name --output takes in some command. */
static bool any_format(const char *name)
{
    dm_output_format_t f;
    dm_report_format_t rf;
    return dm_output_format_parse(name, &f) || dm_report_format_parse(name, &rf);
}

/*
 * Takes -o/--output FORMAT and --no-headers out of the command's arguments, wherever they are
 * (kubectl takes them before and after the command), up to "--". In transfers report and dsr
 * export, --output with a value that is no format name is their old spelling of --output-file
 * and stays. Answers --help (drill has its own). Returns -1 to go on, else an exit status.
 */
static int take_output_options(const char *cmd, int *argc, char **argv)
{
    const char *sub = *argc > 0 ? argv[0] : NULL;
    bool old_file =
        is_report(cmd, sub) || (strcmp(cmd, "dsr") == 0 && sub && strcmp(sub, "export") == 0);
    int w = 0, i;
    for (i = 0; i < *argc; i++) {
        const char *a = argv[i], *v;
        if (strcmp(a, "--") == 0)
            break;
        if (strcmp(a, "--no-headers") == 0) {
            out_g.no_headers = true;
            continue;
        }
        if ((strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) && strcmp(cmd, "drill") != 0) {
            usage(stdout);
            return DM_EXIT_OK;
        }
        if (strcmp(a, "-o") == 0 || strcmp(a, "--output") == 0) {
            if (i + 1 == *argc) {
                fprintf(stderr, "domicilectl: %s needs a format: table, wide, tsv, json, jsonl\n",
                        a);
                return DM_EXIT_USAGE;
            }
            v = argv[i + 1];
            if (a[1] == '-' && old_file && !any_format(v)) {
                argv[w++] = argv[i++];
                argv[w++] = argv[i];
                continue;
            }
            i++;
        } else if (strncmp(a, "--output=", 9) == 0) {
            v = a + 9;
            if (old_file && !any_format(v)) {
                argv[w++] = argv[i];
                continue;
            }
        } else if (strncmp(a, "-o", 2) == 0 && any_format(a + 2)) {
            v = a + 2; /* -ojson */
        } else {
            argv[w++] = argv[i];
            continue;
        }
        out_g.name = v;
    }
    while (i < *argc)
        argv[w++] = argv[i++];
    *argc = w;
    return -1;
}

/* Checks out_g.name against what `cmd` prints. Returns -1 to go on, else an exit status. */
static int check_format(const char *cmd, const char *sub)
{
    dm_report_format_t rf;
    if (!out_g.name)
        return -1;
    if (dm_output_format_parse(out_g.name, &out_g.fmt)) {
        if (strcmp(cmd, "drill") == 0 && out_g.fmt == DM_OUTPUT_TSV) {
            fprintf(stderr, "domicilectl: drill: --output table, wide, json or jsonl\n");
            return DM_EXIT_USAGE;
        }
        return -1;
    }
    if (dm_report_format_parse(out_g.name, &rf)) {
        if (is_report(cmd, sub)) {
            out_g.fmt = DM_OUTPUT_TABLE; /* the report renders it itself */
            return -1;
        }
        fprintf(stderr, "domicilectl: --output %s: only transfers report writes it\n", out_g.name);
        return DM_EXIT_USAGE;
    }
    fprintf(stderr, "domicilectl: --output: table, wide, tsv, json or jsonl, not \"%s\"\n",
            out_g.name);
    return DM_EXIT_USAGE;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"addr", required_argument, NULL, 'a'},    {"timeout", required_argument, NULL, 't'},
        {"token", required_argument, NULL, 'T'},   {"token-file", required_argument, NULL, 'F'},
        {"purpose", required_argument, NULL, 'P'}, {"cacert", required_argument, NULL, 'C'},
        {"cert", required_argument, NULL, 'c'},    {"key", required_argument, NULL, 'k'},
        {"output", required_argument, NULL, 'o'},  {"no-headers", no_argument, NULL, 'N'},
        {"help", no_argument, NULL, 'h'},          {NULL, 0, NULL, 0},
    };
    const char *addr = getenv("DOMICILE_ADDR") ? getenv("DOMICILE_ADDR") : "127.0.0.1:50051";
    int timeout_ms = 5000, opt, rc;
    char *token = getenv("DOMICILE_TOKEN") ? dm_strdup(getenv("DOMICILE_TOKEN")) : NULL;
    const char *purpose = NULL, *cacert = NULL, *cert = NULL, *key = NULL;

    while ((opt = getopt_long(argc, argv, "+a:t:ho:", opts, NULL)) != -1) {
        switch (opt) {
        case 'a':
            addr = optarg;
            break;
        case 't':
            timeout_ms = atoi(optarg);
            timeout_explicit_g = true;
            if (timeout_ms < 0 || timeout_ms > 3600000) {
                fprintf(stderr, "domicilectl: --timeout must be 0..3600000 ms\n");
                free(token);
                return DM_EXIT_USAGE;
            }
            break;
        case 'T':
            free(token);
            token = dm_strdup(optarg);
            break;
        case 'F':
            free(token);
            token = slurp(optarg, true);
            break;
        case 'P':
            purpose = optarg;
            break;
        case 'C':
            cacert = optarg;
            break;
        case 'c':
            cert = optarg;
            break;
        case 'k':
            key = optarg;
            break;
        case 'o':
            out_g.name = optarg;
            break;
        case 'N':
            out_g.no_headers = true;
            break;
        case 'h':
            usage(stdout);
            free(token);
            return DM_EXIT_OK;
        default:
            usage(stderr);
            free(token);
            return DM_EXIT_USAGE;
        }
    }
    if ((cert != NULL) != (key != NULL) || (cert && !cacert)) {
        fprintf(stderr, "domicilectl: --cert and --key go together, with --cacert\n");
        free(token);
        return DM_EXIT_USAGE;
    }
    timeout_g = timeout_ms;
    if (optind >= argc) {
        free(token);
        return bad_usage();
    }
    const char *cmd = argv[optind++];
    if (strcmp(cmd, "completion") == 0) {
        free(token);
        return dm_ctl_completion(argc - optind + 1, argv + optind - 1);
    }
    if (strcmp(cmd, "help") == 0) {
        free(token);
        usage(stdout);
        return DM_EXIT_OK;
    }
    int sub_argc = argc - optind;
    char **sub_argv = argv + optind;
    if ((rc = take_output_options(cmd, &sub_argc, sub_argv)) >= 0 ||
        (rc = check_format(cmd, sub_argc > 0 ? sub_argv[0] : NULL)) >= 0) {
        free(token);
        return rc;
    }
    grpc_init();
    if (strcmp(cmd, "drill") == 0) {
        /* Its own clients, one per thread and principal; --token does not apply. */
        free(token);
        rc = dm_ctl_drill(&out_g, addr, cacert, cert, key, timeout_explicit_g ? timeout_ms : 0,
                          sub_argc, sub_argv);
        grpc_shutdown();
        return rc;
    }
    dm_client_t *c;
    if (cacert) {
        char *ca = slurp(cacert, false), *crt = cert ? slurp(cert, false) : NULL;
        char *k = key ? slurp(key, false) : NULL;
        c = dm_client_create_tls(addr, ca, crt, k);
        free(ca);
        free(crt);
        free(k);
    } else {
        c = dm_client_create(addr);
    }
    if (token) {
        char *h = dm_sprintf("Bearer %s", token);
        dm_client_add_metadata(c, "authorization", h);
        OPENSSL_cleanse(h, strlen(h));
        OPENSSL_cleanse(token, strlen(token));
        free(h);
        free(token);
    }
    if (purpose)
        dm_client_add_metadata(c, "x-purpose", purpose);
    if (strcmp(cmd, "health") == 0) {
        rc = cmd_health(c, sub_argc, sub_argv, timeout_ms, false);
    } else if (strcmp(cmd, "watch") == 0) {
        rc = cmd_health(c, sub_argc, sub_argv, 0, true);
    } else if (strcmp(cmd, "customer") == 0) {
        rc = cmd_customer(c, sub_argc, sub_argv);
    } else if (strcmp(cmd, "record") == 0) {
        rc = cmd_record(c, sub_argc, sub_argv);
    } else if (strcmp(cmd, "regions") == 0) {
        rc = cmd_regions(c, sub_argc, sub_argv);
    } else if (strcmp(cmd, "transfers") == 0) {
        rc = cmd_transfers(c, sub_argc, sub_argv);
    } else if (strcmp(cmd, "dsr") == 0) {
        rc = cmd_dsr(c, sub_argc, sub_argv);
    } else if (strcmp(cmd, "keys") == 0) {
        rc = dm_ctl_keys(&out_g, c, timeout_ms, sub_argc, sub_argv);
    } else {
        fprintf(stderr, "domicilectl: unknown command \"%s\"\n", cmd);
        rc = bad_usage();
    }
    dm_client_destroy(c);
    grpc_shutdown();
    return rc;
}
