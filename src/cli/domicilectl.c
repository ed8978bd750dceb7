/*
 * domicilectl: command-line client of the Domicile gateway.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/grpc.h>

#include "domicile/v1/customers.pb-c.h"
#include "domicile/v1/records.pb-c.h"
#include "domicile/v1/regions.pb-c.h"
#include "domicile/v1/subject_rights.pb-c.h"
#include "domicile/v1/transfers.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#include <errno.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "domicile/client.h"
#include "domicile/report.h"

/* src/cli/drill.c: `drill failover|gateway`. timeout_ms <= 0: the drill's own call deadline. */
int dm_ctl_drill(const char *addr, const char *cacert, const char *cert, const char *key,
                 int timeout_ms, int argc, char **argv);

/* src/cli/keys.c: `keys status|rotate|retire`. */
int dm_ctl_keys(dm_client_t *c, int timeout_ms, int argc, char **argv);

#define HEALTH_CHECK "/grpc.health.v1.Health/Check"
#define HEALTH_WATCH "/grpc.health.v1.Health/Watch"

static void usage(FILE *f)
{
    fputs("usage: domicilectl [options] COMMAND [ARGS]\n"
          "  --addr HOST:PORT   gateway address (default $DOMICILE_ADDR or 127.0.0.1:50051)\n"
          "  --timeout MS       deadline of each call (default 5000)\n"
          "  --token TOKEN      bearer token (default $DOMICILE_TOKEN); --token-file FILE\n"
          "  --purpose P        x-purpose of the calls (default: the principal's)\n"
          "  --cacert FILE      use TLS, verifying the gateway with this CA\n"
          "  --cert FILE --key FILE   client certificate (mTLS)\n"
          "commands:\n"
          "  health [SERVICE]   grpc.health.v1 Check: \"\" = gateway, domicile.region.<code>\n"
          "  watch [SERVICE]    grpc.health.v1 Watch: print every status change\n"
          "  customer register ID RESIDENCY [DISPLAY_NAME]\n"
          "  customer get ID\n"
          "  customer close ID REASON\n"
          "  regions list       one tab-separated line per region: code reachable primary\n"
          "      replication lag_bytes breaker pool_in_use/pool_size queued fence\n"
          "      (fence: - or fenced:REASON by:PRINCIPAL at:UNIX_MS)\n"
          "  regions fence REGION REASON     stop all traffic to REGION (every gateway)\n"
          "  regions unfence REGION [REASON] lift it\n"
          "  record put CUSTOMER RECORD_ID KIND [SUBJECT]   payload read from stdin\n"
          "  record get CUSTOMER RECORD_ID                  payload written to stdout\n"
          "  record list CUSTOMER [KIND]\n"
          "  record delete CUSTOMER RECORD_ID\n"
          "  transfers report [--from DATE] [--to DATE] [--basis ID] [--purpose P]\n"
          "                   [--from-region R] [--to-region R]\n"
          "                   [--format table|csv|json|markdown|html] [--output FILE]\n"
          "      DATE is YYYY-MM-DD (UTC), --to exclusive; default: every entry. Warnings\n"
          "      (incomplete report, ledger not verified) also go to stderr\n"
          "  transfers list [--basis ID] [--region R] [--customer C] [--outcome allowed|refused]\n"
          "                 [--purpose P] [--from DATE] [--to DATE] [--from-region R]\n"
          "                 [--to-region R] [--principal NAME] [--direction read|write]\n"
          "                 [--subject S] [--limit N]\n"
          "      one tab-separated line per entry: region seq time route basis purpose\n"
          "      outcome records bytes method principal (seq - while not sealed)\n"
          "  transfers verify REGION   exit status 4 when the ledger does not verify\n"
          "  dsr erase SUBJECT [--customer C] [--reason R] [--request-id ID]\n"
          "  dsr restrict|unrestrict SUBJECT [--customer C] [--reason R] [--request-id ID]\n"
          "  dsr object|withdraw SUBJECT PURPOSE [--customer C] [--reason R] [--request-id ID]\n"
          "      file a data-subject request (stored in every reachable region) and print it;\n"
          "      a new request id is generated unless --request-id repeats an earlier one\n"
          "  dsr export SUBJECT [--customer C] [--output FILE] [--allow-partial] [--reason R]\n"
          "                     [--request-id ID]\n"
          "      the subject's records from every region as JSON Lines to FILE (mode 0600) or\n"
          "      stdout, with a progress line on a terminal; then checks the manifest (SHA-256\n"
          "      and counts of the lines written): exit status 5 when they differ or no\n"
          "      manifest came (FILE removed), 6 when regions are missing (--allow-partial)\n"
          "  dsr status REQUEST_ID      the request and each region's leg\n"
          "  dsr list [--overdue] [--due-within DAYS] [--state received|in_progress|done|failed]\n"
          "           [--kind K] [--customer C] [--limit N]\n"
          "      one tab-separated line per request: id kind state received_at effective_due\n"
          "      overdue customer legs\n"
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
          "                 [--victim-pid PID] [--domicile-local PATH]\n"
          "      drills against the deploy/local regions (state DIR) and their gateways: load\n"
          "      on every region through the federation; failover: SIGKILL of R's primary,\n"
          "      promotion, rejoin; gateway: SIGKILL of one of R's gateways (calls in flight\n"
          "      may fail, none after). Then checks that no acknowledged write was lost,\n"
          "      duplicated or misplaced, that the ledger has every cross-border read and\n"
          "      that the other regions saw no error. Uses the tokens of DIR (not --token);\n"
          "      --timeout is the call deadline (default 2000).\n"
          "      Exit status 1 when a goal is missed, 3 when a step failed (drill --help)\n"
          "(calls that read whole ledgers default to a 60 s deadline unless --timeout is given)\n",
          f);
}

static const char *serving_name(int s)
{
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(
        &grpc__health__v1__health_check_response__serving_status__descriptor, s);
    return v ? v->name : "?";
}

static bool print_watch(const ProtobufCMessage *m, void *arg)
{
    const Grpc__Health__V1__HealthCheckResponse *r =
        (const Grpc__Health__V1__HealthCheckResponse *)m;
    printf("%s\n", serving_name(r->status));
    fflush(stdout);
    return true;
}

static int fail(dm_status_t *st)
{
    fprintf(stderr, "domicilectl: %s: %s\n", dm_status_code_name(st->code), st->message);
    int code = (int)st->code;
    dm_status_free(st);
    return code == 0 ? 1 : 10 + code; /* distinct exit codes per status, for scripts */
}

static int cmd_health(dm_client_t *c, int argc, char **argv, int timeout_ms, bool watch)
{
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = argc > 0 ? argv[0] : "";
    if (watch) {
        dm_status_t *st = dm_client_server_stream(
            c, HEALTH_WATCH, &req.base, &grpc__health__v1__health_check_response__descriptor,
            timeout_ms, print_watch, NULL);
        return st ? fail(st) : 0;
    }
    ProtobufCMessage *resp = NULL;
    dm_status_t *st =
        dm_client_unary(c, HEALTH_CHECK, &req.base,
                        &grpc__health__v1__health_check_response__descriptor, timeout_ms, &resp);
    if (st)
        return fail(st);
    int s = ((Grpc__Health__V1__HealthCheckResponse *)resp)->status;
    printf("%s\n", serving_name(s));
    protobuf_c_message_free_unpacked(resp, NULL);
    return s == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING ? 0 : 3;
}

static int timeout_g = 5000;
static bool timeout_explicit_g;

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
    return 1;
}

/* `resp` holds `c`; both freed here. */
static int print_customer(ProtobufCMessage *resp, const Domicile__V1__Customer *c)
{
    if (!c)
        return empty_response(resp, "customer");
    const ProtobufCEnumValue *st =
        protobuf_c_enum_descriptor_get_value(&domicile__v1__customer_state__descriptor, c->state);
    printf("customer %s residency %s state %s created_at_ms %lld\n", c->customer_id, c->residency,
           st ? st->name : "?", (long long)c->created_at_unix_ms);
    protobuf_c_message_free_unpacked(resp, NULL);
    return 0;
}

#define CUSTOMERS "/domicile.v1.CustomersService/"
#define REGIONS   "/domicile.v1.RegionsService/"
#define RECORDS   "/domicile.v1.RecordsService/"

static int cmd_customer(dm_client_t *c, int argc, char **argv)
{
    ProtobufCMessage *resp = NULL;
    const Domicile__V1__Customer *cu = NULL;
    dm_status_t *st;
    if (argc >= 3 && strcmp(argv[0], "register") == 0) {
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
        usage(stderr);
        return 2;
    }
    return st ? fail(st) : print_customer(resp, cu);
}

static void print_region(const Domicile__V1__RegionStatus *r)
{
    printf("%s\t%s\t%s\t%s\t%lld\t%s\t%d/%d\t%d\t", r->code,
           r->reachable ? "reachable" : "unreachable", r->primary_host[0] ? r->primary_host : "-",
           r->replication_state[0] ? r->replication_state : "-",
           (long long)r->replication_lag_bytes,
           r->breaker == DOMICILE__V1__BREAKER_STATE__BREAKER_STATE_OPEN ? "open" : "closed",
           (int)r->pool_in_use, (int)r->pool_size, (int)r->queued_statements);
    if (r->fenced)
        printf("fenced:%s by:%s at:%lld\n", r->fence_reason, r->fenced_by,
               (long long)r->fenced_at_unix_ms);
    else
        printf("-\n");
}

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
        usage(stderr);
        return 2;
    }
    free(rid);
    if (st)
        return fail(st);
    if (strcmp(argv[0], "list") == 0) {
        const Domicile__V1__ListRegionsResponse *l =
            (const Domicile__V1__ListRegionsResponse *)resp;
        for (size_t i = 0; i < l->n_regions; i++)
            print_region(l->regions[i]);
    } else if (one) {
        print_region(one);
    } else {
        return empty_response(resp, "region");
    }
    protobuf_c_message_free_unpacked(resp, NULL);
    return 0;
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
    const Domicile__V1__ListRecordsResponse *r = (const Domicile__V1__ListRecordsResponse *)m;
    if (r->item_case == DOMICILE__V1__LIST_RECORDS_RESPONSE__ITEM_RECORD)
        printf("%s\t%s\tv%lld\t%lld bytes%s\n", r->record->record_id, r->record->kind,
               (long long)r->record->version, (long long)r->record->payload_size,
               r->record->restricted ? "\trestricted" : "");
    else if (r->item_case == DOMICILE__V1__LIST_RECORDS_RESPONSE__ITEM_END &&
             r->end->next_page_token[0])
        printf("# more: next page token %s\n", r->end->next_page_token);
    return true;
}

static int cmd_record(dm_client_t *c, int argc, char **argv)
{
    ProtobufCMessage *resp = NULL;
    dm_status_t *st;
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
        printf("record %s version %lld in region %s%s\n", p->record->record_id,
               (long long)p->record->version, p->record->region, p->created ? " (created)" : "");
        protobuf_c_message_free_unpacked(resp, NULL);
        return 0;
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
        fwrite(rec->payload.data, 1, rec->payload.len, stdout);
        protobuf_c_message_free_unpacked(resp, NULL);
        return 0;
    }
    if ((argc == 2 || argc == 3) && strcmp(argv[0], "list") == 0) {
        Domicile__V1__ListRecordsRequest r = DOMICILE__V1__LIST_RECORDS_REQUEST__INIT;
        r.customer_id = argv[1];
        r.kind = argc == 3 ? argv[2] : "";
        r.page_size = 1000;
        st = dm_client_server_stream(c, RECORDS "ListRecords", &r.base,
                                     &domicile__v1__list_records_response__descriptor, timeout_g,
                                     print_listed, NULL);
        return st ? fail(st) : 0;
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
        printf("%s\n",
               ((Domicile__V1__DeleteRecordResponse *)resp)->deleted ? "deleted" : "not found");
        protobuf_c_message_free_unpacked(resp, NULL);
        return 0;
    }
    usage(stderr);
    return 2;
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
            return 1;
        }
        return 0;
    }
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "domicilectl: cannot write %s: %s\n", path, strerror(errno));
        return 1;
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
        return 1;
    }
    return 0;
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
        {"output", required_argument, NULL, 'O'},
        {NULL, 0, NULL, 0},
    };
    Domicile__V1__ReportRequest r = DOMICILE__V1__REPORT_REQUEST__INIT;
    dm_report_format_t fmt = DM_REPORT_TABLE;
    const char *output = NULL;
    int opt;

    optind = 0; /* GNU getopt: start over on this sub-argv */
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'f':
            if (!date_opt("from", optarg, &r.from_unix_ms))
                return 2;
            break;
        case 't':
            if (!date_opt("to", optarg, &r.to_unix_ms))
                return 2;
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
            if (!dm_report_format_parse(optarg, &fmt)) {
                fprintf(stderr, "domicilectl: --format: one of table, csv, json, markdown, "
                                "html\n");
                return 2;
            }
            break;
        case 'O':
            output = optarg;
            break;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }
    if (!window_ok(r.from_unix_ms, r.to_unix_ms))
        return 2;
    ProtobufCMessage *resp = NULL;
    dm_status_t *st =
        dm_client_unary(c, TRANSFERS "Report", &r.base, &domicile__v1__report_response__descriptor,
                        ledger_timeout(), &resp);
    if (st)
        return fail(st);
    const Domicile__V1__ReportResponse *rep = (const Domicile__V1__ReportResponse *)resp;
    char *text = dm_report_render(rep, fmt);
    int rc = write_output(output, text);
    /* The table on a terminal already shows them; files and pipes need them said too. */
    if (fmt != DM_REPORT_TABLE || output)
        report_warnings(rep);
    free(text);
    protobuf_c_message_free_unpacked(resp, NULL);
    return rc;
}

typedef struct list_state {
    int64_t printed;
    char *next_token; /* owned; from the page's `end` */
} list_state_t;

/*
 * Call a paged server-streaming method until its last page or `limit` items (0: no limit),
 * 1000 per page. `page_size` and `page_token` point into `req`; `cb` prints an item, counts
 * it in ls->printed and keeps the page's next token in ls->next_token. `what` names the items
 * in the message shown when --limit cut the listing short.
 */
static int page_through(dm_client_t *c, const char *method, ProtobufCMessage *req,
                        int32_t *page_size, char **page_token,
                        const ProtobufCMessageDescriptor *desc, dm_client_stream_fn cb,
                        long long limit, const char *what)
{
    list_state_t ls = {0, NULL};
    char *token = dm_strdup("");
    int rc = 0;
    for (;;) {
        long long left = limit ? limit - ls.printed : 1000;
        *page_size = (int32_t)(left < 1000 ? left : 1000);
        *page_token = token;
        dm_status_t *st = dm_client_server_stream(c, method, req, desc, ledger_timeout(), cb, &ls);
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
    return rc;
}

static bool print_transfer(const ProtobufCMessage *m, void *arg)
{
    list_state_t *ls = arg;
    const Domicile__V1__ListTransfersResponse *r = (const Domicile__V1__ListTransfersResponse *)m;
    if (r->item_case == DOMICILE__V1__LIST_TRANSFERS_RESPONSE__ITEM_END) {
        free(ls->next_token);
        ls->next_token = dm_strdup(r->end->next_page_token);
        return true;
    }
    if (r->item_case != DOMICILE__V1__LIST_TRANSFERS_RESPONSE__ITEM_ENTRY)
        return true;
    const Domicile__V1__TransferEntry *e = r->entry;
    char when[32], seq[24];
    const char *outcome =
        e->outcome == DOMICILE__V1__TRANSFER_OUTCOME__TRANSFER_OUTCOME_ALLOWED   ? "allowed"
        : e->outcome == DOMICILE__V1__TRANSFER_OUTCOME__TRANSFER_OUTCOME_REFUSED ? "refused"
                                                                                 : "?";
    if (e->seq > 0)
        snprintf(seq, sizeof(seq), "%lld", (long long)e->seq);
    else
        snprintf(seq, sizeof(seq), "-");
    /* Ledger strings are data: no terminal escapes, no tabs or newlines breaking the columns. */
    char *f[] = {
        dm_report_plain(e->region),    dm_report_plain(e->from_region),
        dm_report_plain(e->to_region), dm_report_plain(e->basis_id[0] ? e->basis_id : "-"),
        dm_report_plain(e->purpose),   dm_report_plain(e->method),
        dm_report_plain(e->principal),
    };
    printf("%s\t%s\t%s\t%s\xe2\x86\x92%s\t%s\t%s\t%s\t%lld\t%lld\t%s\t%s\n", f[0], seq,
           dm_report_time_iso(e->at_unix_ms, when, sizeof(when)), f[1], f[2], f[3], f[4], outcome,
           (long long)e->record_count, (long long)e->bytes, f[5], f[6]);
    for (size_t i = 0; i < DM_ARRAY_LEN(f); i++)
        free(f[i]);
    ls->printed++;
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
                return 2;
            }
            break;
        case 'p':
            r.purpose = optarg;
            break;
        case 'f':
            if (!date_opt("from", optarg, &r.from_unix_ms))
                return 2;
            break;
        case 't':
            if (!date_opt("to", optarg, &r.to_unix_ms))
                return 2;
            break;
        case 'n': {
            char *end;
            errno = 0;
            limit = strtoll(optarg, &end, 10);
            if (errno || end == optarg || *end || limit < 1) {
                fprintf(stderr, "domicilectl: --limit: a positive number of entries\n");
                return 2;
            }
            break;
        }
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
                return 2;
            }
            break;
        case 's':
            r.subject = optarg;
            break;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }
    if (!window_ok(r.from_unix_ms, r.to_unix_ms))
        return 2;
    return page_through(c, TRANSFERS "ListTransfers", &r.base, &r.page_size, &r.page_token,
                        &domicile__v1__list_transfers_response__descriptor, print_transfer, limit,
                        "entries");
}

static int cmd_transfers_verify(dm_client_t *c, int argc, char **argv)
{
    if (argc != 2) {
        usage(stderr);
        return 2;
    }
    Domicile__V1__VerifyLedgerRequest r = DOMICILE__V1__VERIFY_LEDGER_REQUEST__INIT;
    r.region = argv[1];
    ProtobufCMessage *resp = NULL;
    dm_status_t *st =
        dm_client_unary(c, TRANSFERS "VerifyLedger", &r.base,
                        &domicile__v1__verify_ledger_response__descriptor, ledger_timeout(), &resp);
    if (st)
        return fail(st);
    const Domicile__V1__VerifyLedgerResponse *v = (const Domicile__V1__VerifyLedgerResponse *)resp;
    const char *damage = dm_report_damage_name(v->damage);
    char when[32], *region = dm_report_plain(v->region), *detail = dm_report_plain(v->detail);
    printf("region            %s\n"
           "ok                %s\n"
           "damage            %s\n"
           "first_bad_seq     %lld\n"
           "entries_checked   %lld\n"
           "sealed_up_to_seq  %lld\n"
           "unsealed_entries  %lld\n",
           region, v->ok ? "yes" : "NO", damage ? damage : "-", (long long)v->first_bad_seq,
           (long long)v->entries_checked, (long long)v->sealed_up_to_seq,
           (long long)v->unsealed_entries);
    if (v->checkpoint)
        printf("checkpoint        seq %lld, %lld entries purged before %s, signature %s\n",
               (long long)v->checkpoint->seq, (long long)v->checkpoint->entries_purged,
               dm_report_time_iso(v->checkpoint->purged_before_unix_ms, when, sizeof(when)),
               v->checkpoint->valid ? "valid" : "INVALID");
    else
        printf("checkpoint        none\n");
    printf("verified_at       %s\n",
           dm_report_time_iso(v->verified_at_unix_ms, when, sizeof(when)));
    if (detail[0])
        printf("detail            %s\n", detail);
    int rc = v->ok ? 0 : 4;
    free(region);
    free(detail);
    protobuf_c_message_free_unpacked(resp, NULL);
    return rc;
}

static int cmd_transfers(dm_client_t *c, int argc, char **argv)
{
    if (argc >= 1 && strcmp(argv[0], "report") == 0)
        return cmd_transfers_report(c, argc, argv);
    if (argc >= 1 && strcmp(argv[0], "list") == 0)
        return cmd_transfers_list(c, argc, argv);
    if (argc >= 1 && strcmp(argv[0], "verify") == 0)
        return cmd_transfers_verify(c, argc, argv);
    usage(stderr);
    return 2;
}

/* ---- data-subject requests ---------------------------------------------------------------- */

#define DSR "/domicile.v1.SubjectRightsService/"

enum {
    DSR_EXIT_PARTIAL = 3,    /* an answer without some regions (locate) */
    DSR_EXIT_MISMATCH = 5,   /* the export does not match its manifest, or has none */
    DSR_EXIT_INCOMPLETE = 6, /* the manifest says regions are missing */
};

static const char *const dsr_kind_names[] = {"-",          "erase",  "export",  "restrict",
                                             "unrestrict", "object", "withdraw"};
static const char *const dsr_state_names[] = {"-", "received", "in_progress", "done", "failed"};
static const char *const dsr_leg_names[] = {"-", "pending", "running", "done", "failed", "skipped"};
static const char *const dsr_webhook_names[] = {"-", "not_configured", "pending", "delivered",
                                                "failed"};

static const char *name_of(const char *const *names, size_t n, int v)
{
    return v >= 0 && (size_t)v < n ? names[v] : "?";
}
#define NAME_OF(names, v) name_of(names, DM_ARRAY_LEN(names), (int)(v))

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

static const char *iso_or_dash(int64_t ms, char *buf, size_t size)
{
    if (ms <= 0)
        return "-";
    return dm_report_time_iso(ms, buf, size);
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

/* Legs in region code order, whatever order the gateway sent them in (a copy of the
 * pointers; the caller frees it). */
static Domicile__V1__DsrLeg **sorted_legs(const Domicile__V1__DsrRequest *q)
{
    Domicile__V1__DsrLeg **l = dm_calloc(q->n_legs + 1, sizeof(*l));
    if (q->n_legs)
        memcpy(l, q->legs, q->n_legs * sizeof(*l));
    qsort(l, q->n_legs, sizeof(*l), cmp_leg_region);
    return l;
}

static void print_dsr(const Domicile__V1__DsrRequest *q)
{
    char t[32];
    char *id = dm_report_plain(q->request_id), *customer = dm_report_plain(q->customer_id),
         *purpose = dm_report_plain(q->purpose), *reason = dm_report_plain(q->reason),
         *principal = dm_report_plain(q->principal), *sk = dm_report_plain(q->subject_key_hex);
    printf("request_id       %s\n"
           "kind             %s\n"
           "state            %s\n"
           "subject_key      %s\n"
           "customer         %s\n",
           id, NAME_OF(dsr_kind_names, q->kind), NAME_OF(dsr_state_names, q->state), sk,
           customer[0] ? customer : "* (every customer in scope)");
    if (purpose[0])
        printf("purpose          %s\n", purpose);
    if (reason[0])
        printf("reason           %s\n", reason);
    printf("principal        %s\n", principal);
    printf("received_at      %s\n", iso_or_dash(q->received_at_unix_ms, t, sizeof(t)));
    printf("due_at           %s (policy: 30 days)\n", iso_or_dash(q->due_at_unix_ms, t, sizeof(t)));
    printf("gdpr_due_at      %s (one calendar month)\n",
           iso_or_dash(q->gdpr_due_at_unix_ms, t, sizeof(t)));
    if (q->extended) {
        char *why = dm_report_plain(q->extension_reason), at[32];
        printf("extended_due_at  %s (extended at %s: %s)\n",
               iso_or_dash(q->extended_due_at_unix_ms, t, sizeof(t)),
               iso_or_dash(q->extended_at_unix_ms, at, sizeof(at)), why);
        free(why);
    } else {
        printf("extended_due_at  - (not extended)\n");
    }
    printf("effective_due    %s%s\n", iso_or_dash(dsr_effective_due(q), t, sizeof(t)),
           q->overdue ? " OVERDUE" : "");
    printf("completed_at     %s\n", iso_or_dash(q->completed_at_unix_ms, t, sizeof(t)));
    if (q->webhook) {
        const Domicile__V1__WebhookDelivery *w = q->webhook;
        char *err = dm_report_plain(w->last_error);
        printf("webhook          %s, %d attempts", NAME_OF(dsr_webhook_names, w->state),
               (int)w->attempts);
        if (w->delivered_at_unix_ms > 0)
            printf(", delivered %s", iso_or_dash(w->delivered_at_unix_ms, t, sizeof(t)));
        if (err[0])
            printf(", last error: %s", err);
        printf("\n");
        free(err);
    }
    Domicile__V1__DsrLeg **sorted = sorted_legs(q);
    for (size_t i = 0; i < q->n_legs; i++) {
        const Domicile__V1__DsrLeg *l = sorted[i];
        char *region = dm_report_plain(l->region), *err = dm_report_plain(l->last_error),
             *by = dm_report_plain(l->claimed_by);
        printf("leg %-12s %s, %d attempts", region, NAME_OF(dsr_leg_names, l->state),
               (int)l->attempts);
        if (l->receipt) {
            const Domicile__V1__Receipt *r = l->receipt;
            printf(", matched %lld, deleted %lld, keys destroyed %lld, finished %s, receipt %s",
                   (long long)r->records_matched, (long long)r->records_deleted,
                   (long long)r->keys_destroyed, iso_or_dash(r->finished_at_unix_ms, t, sizeof(t)),
                   r->receipt_sha256_hex[0] ? r->receipt_sha256_hex : "-");
        }
        if (l->state == DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_RUNNING && by[0])
            printf(", claimed by %s until %s", by,
                   iso_or_dash(l->lease_expires_at_unix_ms, t, sizeof(t)));
        if (l->next_attempt_at_unix_ms > 0 &&
            l->state == DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_FAILED)
            printf(", next attempt %s", iso_or_dash(l->next_attempt_at_unix_ms, t, sizeof(t)));
        if (err[0] && l->state != DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_DONE &&
            l->state != DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_SKIPPED)
            printf(", last error: %s", err);
        printf("\n");
        free(region);
        free(err);
        free(by);
    }
    free(sorted);
    free(id);
    free(customer);
    free(purpose);
    free(reason);
    free(principal);
    free(sk);
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
    const Domicile__V1__DsrRequest *q =
        f ? *(const Domicile__V1__DsrRequest *const *)((const char *)resp + f->offset) : NULL;
    if (!q)
        return empty_response(resp, "request");
    print_dsr(q);
    protobuf_c_message_free_unpacked(resp, NULL);
    return 0;
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

/* Parses --customer, --reason, --request-id (and, for export, --output and --allow-partial);
 * the positional arguments end up in argv[optind..]. Returns false after a usage error. */
static bool dsr_parse(int argc, char **argv, dsr_opts_t *o, bool export)
{
    static const struct option opts[] = {
        {"customer", required_argument, NULL, 'c'},   {"reason", required_argument, NULL, 'r'},
        {"request-id", required_argument, NULL, 'i'}, {"output", required_argument, NULL, 'o'},
        {"allow-partial", no_argument, NULL, 'p'},    {NULL, 0, NULL, 0},
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
        return 2;
    if (argc - optind != (with_purpose ? 2 : 1)) {
        free(o.generated_id);
        usage(stderr);
        return 2;
    }
    char *subject = subject_arg(argv[optind]);
    if (!subject) {
        free(o.generated_id);
        return 2;
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
    free(subject);
    free(o.generated_id);
    return rc;
}

static int cmd_dsr_status(dm_client_t *c, int argc, char **argv)
{
    if (argc != 2) {
        usage(stderr);
        return 2;
    }
    Domicile__V1__GetRequestRequest r = DOMICILE__V1__GET_REQUEST_REQUEST__INIT;
    r.request_id = argv[1];
    return dsr_unary(c, "GetRequest", &r.base, &domicile__v1__get_request_response__descriptor);
}

static int cmd_dsr_extend(dm_client_t *c, int argc, char **argv)
{
    if (argc != 3) {
        usage(stderr);
        return 2;
    }
    Domicile__V1__ExtendDeadlineRequest r = DOMICILE__V1__EXTEND_DEADLINE_REQUEST__INIT;
    r.request_id = argv[1];
    r.reason = argv[2];
    return dsr_unary(c, "ExtendDeadline", &r.base,
                     &domicile__v1__extend_deadline_response__descriptor);
}

static bool print_dsr_line(const ProtobufCMessage *m, void *arg)
{
    list_state_t *ls = arg;
    const Domicile__V1__ListRequestsResponse *r = (const Domicile__V1__ListRequestsResponse *)m;
    if (r->item_case == DOMICILE__V1__LIST_REQUESTS_RESPONSE__ITEM_END) {
        free(ls->next_token);
        ls->next_token = dm_strdup(r->end->next_page_token);
        return true;
    }
    if (r->item_case != DOMICILE__V1__LIST_REQUESTS_RESPONSE__ITEM_REQUEST)
        return true;
    const Domicile__V1__DsrRequest *q = r->request;
    char received[32], due[32];
    char *id = dm_report_plain(q->request_id), *customer = dm_report_plain(q->customer_id);
    printf("%s\t%s\t%s\t%s\t%s\t%s\t%s\t", id, NAME_OF(dsr_kind_names, q->kind),
           NAME_OF(dsr_state_names, q->state),
           iso_or_dash(q->received_at_unix_ms, received, sizeof(received)),
           iso_or_dash(dsr_effective_due(q), due, sizeof(due)), q->overdue ? "overdue" : "-",
           customer[0] ? customer : "*");
    Domicile__V1__DsrLeg **sorted = sorted_legs(q);
    for (size_t i = 0; i < q->n_legs; i++) {
        char *region = dm_report_plain(sorted[i]->region);
        printf("%s%s:%s", i ? "," : "", region, NAME_OF(dsr_leg_names, sorted[i]->state));
        free(region);
    }
    free(sorted);
    printf("\n");
    free(id);
    free(customer);
    ls->printed++;
    return true;
}

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
                return 2;
            }
            break;
        case 's':
            if ((v = name_index(dsr_state_names, DM_ARRAY_LEN(dsr_state_names), optarg)) < 0) {
                fprintf(stderr, "domicilectl: --state: received, in_progress, done or failed\n");
                return 2;
            }
            r.state = v;
            break;
        case 'k':
            if ((v = name_index(dsr_kind_names, DM_ARRAY_LEN(dsr_kind_names), optarg)) < 0) {
                fprintf(stderr, "domicilectl: --kind: erase, export, restrict, unrestrict, "
                                "object or withdraw\n");
                return 2;
            }
            r.kind = v;
            break;
        case 'c':
            r.customer_id = optarg;
            break;
        case 'n':
            errno = 0;
            limit = strtoll(optarg, &end, 10);
            if (errno || end == optarg || *end || limit < 1) {
                fprintf(stderr, "domicilectl: --limit: a positive number of requests\n");
                return 2;
            }
            break;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }
    return page_through(c, DSR "ListRequests", &r.base, &r.page_size, &r.page_token,
                        &domicile__v1__list_requests_response__descriptor, print_dsr_line, limit,
                        "requests");
}

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
        if (opt != 'c') {
            usage(stderr);
            return 2;
        }
        customer = optarg;
    }
    if (argc - optind != 1) {
        usage(stderr);
        return 2;
    }
    char *subject = subject_arg(argv[optind]);
    if (!subject)
        return 2;
    Domicile__V1__LocateRequest r = DOMICILE__V1__LOCATE_REQUEST__INIT;
    r.subject = subject;
    r.customer_id = (char *)customer;
    ProtobufCMessage *resp = NULL;
    dm_status_t *st = dm_client_unary(c, DSR "Locate", &r.base,
                                      &domicile__v1__locate_response__descriptor, timeout_g, &resp);
    free(subject);
    if (st)
        return fail(st);
    Domicile__V1__LocateResponse *l = (Domicile__V1__LocateResponse *)resp;
    qsort(l->counts, l->n_counts, sizeof(*l->counts), cmp_count_region);
    long long records = 0, bytes = 0;
    for (size_t i = 0; i < l->n_counts; i++) {
        char *region = dm_report_plain(l->counts[i]->region);
        printf("%s\t%lld\t%lld\n", region, (long long)l->counts[i]->records,
               (long long)l->counts[i]->bytes);
        records += l->counts[i]->records;
        bytes += l->counts[i]->bytes;
        free(region);
    }
    for (size_t i = 0; i < l->n_unreachable_regions; i++) {
        char *region = dm_report_plain(l->unreachable_regions[i]);
        printf("%s\t-\t-\tunreachable\n", region);
        fprintf(stderr,
                "domicilectl: warning: region %s could not be asked: its count is "
                "unknown\n",
                region);
        free(region);
    }
    printf("total\t%lld\t%lld%s\n", records, bytes, l->n_unreachable_regions ? "\tpartial" : "");
    int rc = l->n_unreachable_regions ? DSR_EXIT_PARTIAL : 0;
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
    int write_errno; /* non-zero: writing failed */
    bool progress;   /* stderr is a terminal */
    int64_t last_progress_ms;
    int progress_len;
} export_state_t;

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

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

static void export_progress(export_state_t *e, bool last)
{
    if (!e->progress)
        return;
    int64_t now = mono_ms();
    if (!last && now - e->last_progress_ms < 100)
        return;
    e->last_progress_ms = now;
    fputs("\rexport:", stderr);
    for (size_t i = 0; i < e->n_regions; i++) {
        char *region = dm_report_plain(e->regions[i].region);
        fprintf(stderr, "%s %s %lld", i ? "," : "", region, (long long)e->regions[i].records);
        free(region);
    }
    fprintf(stderr, "%s %lld records, %lld bytes\033[K%s", e->n_regions ? " \xe2\x80\x94" : "",
            (long long)e->records, (long long)e->bytes, last ? "\n" : "");
    fflush(stderr);
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
    export_progress(e, false);
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

static int cmd_dsr_export(dm_client_t *c, int argc, char **argv)
{
    dsr_opts_t o;
    if (!dsr_parse(argc, argv, &o, true))
        return 2;
    if (argc - optind != 1) {
        free(o.generated_id);
        usage(stderr);
        return 2;
    }
    char *subject = subject_arg(argv[optind]);
    if (!subject) {
        free(o.generated_id);
        return 2;
    }
    export_state_t e;
    memset(&e, 0, sizeof(e));
    e.path = o.output && strcmp(o.output, "-") != 0 ? o.output : NULL;
    /* The progress line goes to a terminal, unless the lines themselves go to that terminal. */
    e.progress = isatty(STDERR_FILENO) == 1 && (e.path || isatty(STDOUT_FILENO) != 1);
    if (e.path) {
        /* Personal data: readable by the owner only. */
        int fd = open(e.path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0 || !(e.out = fdopen(fd, "w"))) {
            fprintf(stderr, "domicilectl: cannot write %s: %s\n", e.path, strerror(errno));
            if (fd >= 0)
                close(fd);
            free(subject);
            free(o.generated_id);
            return 1;
        }
    } else {
        e.out = stdout;
    }
    e.sha = EVP_MD_CTX_new();
    EVP_DigestInit_ex(e.sha, EVP_sha256(), NULL);

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
    export_progress(&e, true);

    int rc = 0;
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
        rc = 1;
        keep = false;
    } else if (e.bad_line) {
        fprintf(stderr, "domicilectl: export: lines from more than %d regions\n",
                EXPORT_MAX_REGIONS);
        dm_status_free(st);
        rc = DSR_EXIT_MISMATCH;
        keep = false;
    } else if (st) {
        rc = fail(st);
        keep = false;
    } else if (!e.manifest) {
        fprintf(stderr,
                "domicilectl: export %s: the stream ended without a manifest: the "
                "export cannot be verified\n",
                id);
        rc = DSR_EXIT_MISMATCH;
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
            rc = DSR_EXIT_MISMATCH;
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
            rc = DSR_EXIT_INCOMPLETE;
        } else {
            fprintf(stderr,
                    "domicilectl: export %s: %lld records, %lld bytes, sha256 %s: "
                    "verified against the manifest\n",
                    id, (long long)e.records, (long long)e.bytes, hex);
        }
    }
    if (!keep && e.path)
        unlink(e.path);
    free(id);
    export_free(&e);
    free(o.generated_id);
    return rc;
}

static int cmd_dsr(dm_client_t *c, int argc, char **argv)
{
    if (argc < 1) {
        usage(stderr);
        return 2;
    }
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
    usage(stderr);
    return 2;
}

static char *slurp(const char *path, bool strip)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "domicilectl: cannot read %s: %s\n", path, strerror(errno));
        exit(2);
    }
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

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"addr", required_argument, NULL, 'a'},    {"timeout", required_argument, NULL, 't'},
        {"token", required_argument, NULL, 'T'},   {"token-file", required_argument, NULL, 'F'},
        {"purpose", required_argument, NULL, 'P'}, {"cacert", required_argument, NULL, 'C'},
        {"cert", required_argument, NULL, 'c'},    {"key", required_argument, NULL, 'k'},
        {"help", no_argument, NULL, 'h'},          {NULL, 0, NULL, 0},
    };
    const char *addr = getenv("DOMICILE_ADDR") ? getenv("DOMICILE_ADDR") : "127.0.0.1:50051";
    int timeout_ms = 5000, opt, rc;
    char *token = getenv("DOMICILE_TOKEN") ? dm_strdup(getenv("DOMICILE_TOKEN")) : NULL;
    const char *purpose = NULL, *cacert = NULL, *cert = NULL, *key = NULL;

    while ((opt = getopt_long(argc, argv, "+a:t:h", opts, NULL)) != -1) {
        switch (opt) {
        case 'a':
            addr = optarg;
            break;
        case 't':
            timeout_ms = atoi(optarg);
            timeout_explicit_g = true;
            if (timeout_ms < 0 || timeout_ms > 3600000) {
                fprintf(stderr, "domicilectl: --timeout must be 0..3600000 ms\n");
                return 2;
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
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if ((cert != NULL) != (key != NULL) || (cert && !cacert)) {
        fprintf(stderr, "domicilectl: --cert and --key go together, with --cacert\n");
        return 2;
    }
    timeout_g = timeout_ms;
    if (optind >= argc) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[optind++];
    grpc_init();
    if (strcmp(cmd, "drill") == 0) {
        /* Its own clients, one per thread and principal; --token does not apply. */
        free(token);
        rc = dm_ctl_drill(addr, cacert, cert, key, timeout_explicit_g ? timeout_ms : 0,
                          argc - optind, argv + optind);
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
        free(h);
        free(token);
    }
    if (purpose)
        dm_client_add_metadata(c, "x-purpose", purpose);
    if (strcmp(cmd, "health") == 0) {
        rc = cmd_health(c, argc - optind, argv + optind, timeout_ms, false);
    } else if (strcmp(cmd, "watch") == 0) {
        rc = cmd_health(c, argc - optind, argv + optind, 0, true);
    } else if (strcmp(cmd, "customer") == 0) {
        rc = cmd_customer(c, argc - optind, argv + optind);
    } else if (strcmp(cmd, "record") == 0) {
        rc = cmd_record(c, argc - optind, argv + optind);
    } else if (strcmp(cmd, "regions") == 0) {
        rc = cmd_regions(c, argc - optind, argv + optind);
    } else if (strcmp(cmd, "transfers") == 0) {
        rc = cmd_transfers(c, argc - optind, argv + optind);
    } else if (strcmp(cmd, "dsr") == 0) {
        rc = cmd_dsr(c, argc - optind, argv + optind);
    } else if (strcmp(cmd, "keys") == 0) {
        rc = dm_ctl_keys(c, timeout_ms, argc - optind, argv + optind);
    } else {
        fprintf(stderr, "domicilectl: unknown command \"%s\"\n", cmd);
        usage(stderr);
        rc = 2;
    }
    dm_client_destroy(c);
    grpc_shutdown();
    return rc;
}
