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
#include "domicile/v1/transfers.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#include <errno.h>
#include <time.h>
#include <unistd.h>

#include "domicile/client.h"
#include "domicile/report.h"

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
          "                 [--to-region R] [--limit N]\n"
          "      one tab-separated line per entry: region seq time route basis purpose\n"
          "      outcome records bytes method principal (seq - while not sealed)\n"
          "  transfers verify REGION   exit status 4 when the ledger does not verify\n"
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

static int print_customer(ProtobufCMessage *m)
{
    Domicile__V1__Customer *c = (Domicile__V1__Customer *)m;
    const ProtobufCEnumValue *st =
        protobuf_c_enum_descriptor_get_value(&domicile__v1__customer_state__descriptor, c->state);
    printf("customer %s residency %s state %s created_at_ms %lld\n", c->customer_id, c->residency,
           st ? st->name : "?", (long long)c->created_at_unix_ms);
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}

static int cmd_customer(dm_client_t *c, int argc, char **argv)
{
    ProtobufCMessage *resp = NULL;
    dm_status_t *st;
    if (argc >= 3 && strcmp(argv[0], "register") == 0) {
        Domicile__V1__RegisterCustomerRequest r = DOMICILE__V1__REGISTER_CUSTOMER_REQUEST__INIT;
        char *rid = new_request_id();
        r.request_id = rid;
        r.customer_id = argv[1];
        r.residency = argv[2];
        r.display_name = argc > 3 ? argv[3] : "";
        st = dm_client_unary(c, "/domicile.v1.Customers/RegisterCustomer", &r.base,
                             &domicile__v1__customer__descriptor, timeout_g, &resp);
        free(rid);
    } else if (argc == 2 && strcmp(argv[0], "get") == 0) {
        Domicile__V1__GetCustomerRequest r = DOMICILE__V1__GET_CUSTOMER_REQUEST__INIT;
        r.customer_id = argv[1];
        st = dm_client_unary(c, "/domicile.v1.Customers/GetCustomer", &r.base,
                             &domicile__v1__customer__descriptor, timeout_g, &resp);
    } else if (argc == 3 && strcmp(argv[0], "close") == 0) {
        Domicile__V1__CloseCustomerRequest r = DOMICILE__V1__CLOSE_CUSTOMER_REQUEST__INIT;
        char *rid = new_request_id();
        r.request_id = rid;
        r.customer_id = argv[1];
        r.reason = argv[2];
        st = dm_client_unary(c, "/domicile.v1.Customers/CloseCustomer", &r.base,
                             &domicile__v1__customer__descriptor, timeout_g, &resp);
        free(rid);
    } else {
        usage(stderr);
        return 2;
    }
    return st ? fail(st) : print_customer(resp);
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
        st = dm_client_unary(c, "/domicile.v1.Records/PutRecord", &r.base,
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
        st = dm_client_unary(c, "/domicile.v1.Records/GetRecord", &r.base,
                             &domicile__v1__record__descriptor, timeout_g, &resp);
        if (st)
            return fail(st);
        Domicile__V1__Record *rec = (Domicile__V1__Record *)resp;
        fwrite(rec->payload.data, 1, rec->payload.len, stdout);
        protobuf_c_message_free_unpacked(resp, NULL);
        return 0;
    }
    if ((argc == 2 || argc == 3) && strcmp(argv[0], "list") == 0) {
        Domicile__V1__ListRecordsRequest r = DOMICILE__V1__LIST_RECORDS_REQUEST__INIT;
        r.customer_id = argv[1];
        r.kind = argc == 3 ? argv[2] : "";
        r.page_size = 1000;
        st = dm_client_server_stream(c, "/domicile.v1.Records/ListRecords", &r.base,
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
        st = dm_client_unary(c, "/domicile.v1.Records/DeleteRecord", &r.base,
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

#define TRANSFERS "/domicile.v1.Transfers/"

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

static void report_warnings(const Domicile__V1__TransferReport *rep)
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
        dm_client_unary(c, TRANSFERS "Report", &r.base, &domicile__v1__transfer_report__descriptor,
                        ledger_timeout(), &resp);
    if (st)
        return fail(st);
    const Domicile__V1__TransferReport *rep = (const Domicile__V1__TransferReport *)resp;
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
        {"basis", required_argument, NULL, 'b'},
        {"region", required_argument, NULL, 'r'},
        {"customer", required_argument, NULL, 'c'},
        {"outcome", required_argument, NULL, 'o'},
        {"purpose", required_argument, NULL, 'p'},
        {"from", required_argument, NULL, 'f'},
        {"to", required_argument, NULL, 't'},
        {"limit", required_argument, NULL, 'n'},
        {"from-region", required_argument, NULL, 'F'},
        {"to-region", required_argument, NULL, 'R'},
        {NULL, 0, NULL, 0},
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
    list_state_t ls = {0, NULL};
    char *token = dm_strdup("");
    int rc = 0;
    for (;;) {
        long long left = limit ? limit - ls.printed : 1000;
        r.page_size = (int32_t)(left < 1000 ? left : 1000);
        r.page_token = token;
        dm_status_t *st =
            dm_client_server_stream(c, TRANSFERS "ListTransfers", &r.base,
                                    &domicile__v1__list_transfers_response__descriptor,
                                    ledger_timeout(), print_transfer, &ls);
        if (st) {
            rc = fail(st);
            break;
        }
        if (!ls.next_token || !ls.next_token[0])
            break;
        if (limit && ls.printed >= limit) {
            fprintf(stderr, "domicilectl: more entries match: raise --limit to see them\n");
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
    } else if (strcmp(cmd, "transfers") == 0) {
        rc = cmd_transfers(c, argc - optind, argv + optind);
    } else {
        fprintf(stderr, "domicilectl: unknown command \"%s\"\n", cmd);
        usage(stderr);
        rc = 2;
    }
    dm_client_destroy(c);
    grpc_shutdown();
    return rc;
}
