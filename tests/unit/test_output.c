/* The CLI's output layer (include/domicile/output.h) and progress line (progress.h): the
 * generic proto -> JSON mapping, each format on hand-built records, hostile strings, and the
 * progress line on a pseudo-terminal and on a pipe. domicilectl itself against a real gateway:
 * tests/integration/test_cli_output.py. */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "domicile/output.h"
#include "domicile/progress.h"
#include "domicile/v1/customers.pb-c.h"
#include "domicile/v1/records.pb-c.h"
#include "domicile/v1/subject_rights.pb-c.h"
#include "domicile/v1/transfers.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

/* ---- helpers ------------------------------------------------------------------------------ */

typedef struct capture {
    FILE *f;
    char *text;
    size_t len;
} capture_t;

static void cap_open(capture_t *c)
{
    c->text = NULL;
    c->len = 0;
    c->f = open_memstream(&c->text, &c->len);
    assert_non_null(c->f);
}

static char *cap_close(capture_t *c)
{
    assert_int_equal(fclose(c->f), 0);
    return c->text;
}

static json_t *obj(const char *text)
{
    json_error_t e;
    json_t *j = json_loads(text, 0, &e);
    if (!j)
        fail_msg("not JSON (%s): %s", e.text, text);
    return j;
}

static char *render(dm_output_format_t fmt, dm_output_shape_t shape, unsigned flags,
                    const dm_output_column_t *cols, size_t ncols, json_t **records, size_t n,
                    bool complete)
{
    capture_t c;
    cap_open(&c);
    dm_output_t *o = dm_output_create(c.f, fmt, shape, flags, cols, ncols);
    for (size_t i = 0; i < n; i++)
        dm_output_record(o, records[i]);
    assert_true(dm_output_end(o, complete));
    return cap_close(&c);
}

/* ---- formats ------------------------------------------------------------------------------ */

static void test_format_names(void **state)
{
    static const struct {
        const char *name;
        bool ok;
        dm_output_format_t fmt;
    } cases[] = {
        {"table", true, DM_OUTPUT_TABLE},
        {"wide", true, DM_OUTPUT_WIDE},
        {"tsv", true, DM_OUTPUT_TSV},
        {"json", true, DM_OUTPUT_JSON},
        {"jsonl", true, DM_OUTPUT_JSONL},
        {"JSON", false, 0},
        {"yaml", false, 0},
        {"", false, 0},
        {"csv", false, 0},
        {NULL, false, 0},
    };
    for (size_t i = 0; i < DM_ARRAY_LEN(cases); i++) {
        dm_output_format_t f = DM_OUTPUT_TABLE;
        assert_int_equal(dm_output_format_parse(cases[i].name, &f), cases[i].ok);
        if (cases[i].ok) {
            assert_int_equal(f, cases[i].fmt);
            assert_string_equal(dm_output_format_name(f), cases[i].name);
        }
    }
}

/* ---- proto -> JSON ------------------------------------------------------------------------ */

static void test_message_json(void **state)
{
    Domicile__V1__Customer c = DOMICILE__V1__CUSTOMER__INIT;
    Domicile__V1__Customer__LabelsEntry l1 = DOMICILE__V1__CUSTOMER__LABELS_ENTRY__INIT;
    Domicile__V1__Customer__LabelsEntry *labels[] = {&l1};
    c.customer_id = "acme";
    c.residency = "eu";
    c.state = DOMICILE__V1__CUSTOMER_STATE__CUSTOMER_STATE_ACTIVE;
    c.created_at_unix_ms = 1796597999123; /* 2026-12-06T22:59:59.123Z */
    c.display_name = "Ac\xffme \xc3\xa9\x01";
    l1.key = "tier";
    l1.value = "gold";
    c.n_labels = 1;
    c.labels = labels;
    json_t *j = dm_output_message(&c.base);
    char *text = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER);
    /* every proto field, in proto order; times without _unix_ms, RFC 3339 UTC or null */
    assert_string_equal(text, "{\"customer_id\":\"acme\",\"residency\":\"eu\",\"state\":\"active\","
                              "\"created_at\":\"2026-12-06T22:59:59.123Z\",\"closed_at\":null,"
                              "\"purge_after\":null,\"display_name\":\"Ac\xef\xbf\xbdme "
                              "\xc3\xa9\\u0001\",\"labels\":{\"tier\":\"gold\"},"
                              "\"close_reason\":\"\",\"purged_at\":null}");
    free(text);
    json_decref(j);

    /* bytes as base64, int64 as numbers, bool, unknown enum values as their number */
    Domicile__V1__Record r = DOMICILE__V1__RECORD__INIT;
    uint8_t payload[] = {0, 1, 2, 0xff, 'x'};
    r.payload.data = payload;
    r.payload.len = sizeof(payload);
    r.version = INT64_MAX;
    r.restricted = 1;
    j = dm_output_message(&r.base);
    assert_string_equal(json_string_value(json_object_get(j, "payload")), "AAEC/3g=");
    assert_int_equal(json_integer_value(json_object_get(j, "version")), INT64_MAX);
    assert_true(json_is_true(json_object_get(j, "restricted")));
    assert_true(json_is_object(json_object_get(j, "labels")));
    assert_int_equal(json_object_size(json_object_get(j, "labels")), 0);
    json_decref(j);

    Domicile__V1__DsrRequest q = DOMICILE__V1__DSR_REQUEST__INIT;
    Domicile__V1__DsrLeg leg = DOMICILE__V1__DSR_LEG__INIT;
    Domicile__V1__DsrLeg *legs[] = {&leg};
    q.state = DOMICILE__V1__DSR_STATE__DSR_STATE_IN_PROGRESS;
    q.kind = 42; /* newer than this build */
    leg.region = "eu";
    leg.state = DOMICILE__V1__DSR_LEG_STATE__DSR_LEG_STATE_PENDING;
    leg.next_attempt_at_unix_ms = -1; /* before 1970: still a time */
    q.n_legs = 1;
    q.legs = legs;
    j = dm_output_message(&q.base);
    assert_string_equal(json_string_value(json_object_get(j, "state")), "in_progress");
    assert_int_equal(json_integer_value(json_object_get(j, "kind")), 42);
    assert_true(json_is_null(json_object_get(j, "webhook"))); /* unset message */
    json_t *l = json_array_get(json_object_get(j, "legs"), 0);
    assert_string_equal(json_string_value(json_object_get(l, "state")), "pending");
    assert_string_equal(json_string_value(json_object_get(l, "next_attempt_at")),
                        "1969-12-31T23:59:59.999Z");
    assert_true(json_is_null(json_object_get(l, "receipt")));
    assert_string_equal(json_string_value(dm_output_get(j, "legs.0.region")), "eu");
    assert_null(dm_output_get(j, "legs.1.region"));
    assert_null(dm_output_get(j, "legs.x"));
    json_decref(j);

    /* UNSPECIFIED is null; an enum without the buf prefix keeps its proto name */
    Domicile__V1__TransferEntry e = DOMICILE__V1__TRANSFER_ENTRY__INIT;
    j = dm_output_message(&e.base);
    assert_true(json_is_null(json_object_get(j, "outcome")));
    assert_true(json_is_null(json_object_get(j, "at")));
    assert_true(json_is_array(json_object_get(j, "record_ids")));
    json_decref(j);
    char *s =
        dm_output_enum_name(&grpc__health__v1__health_check_response__serving_status__descriptor,
                            GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING);
    assert_string_equal(s, "NOT_SERVING");
    free(s);
    s = dm_output_enum_name(&domicile__v1__ledger_damage__descriptor,
                            DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_CHECKPOINT_INVALID);
    assert_string_equal(s, "checkpoint_invalid");
    free(s);

    /* a oneof: only its set member */
    Domicile__V1__ListRecordsResponse lr = DOMICILE__V1__LIST_RECORDS_RESPONSE__INIT;
    Domicile__V1__ListRecordsPage page = DOMICILE__V1__LIST_RECORDS_PAGE__INIT;
    lr.item_case = DOMICILE__V1__LIST_RECORDS_RESPONSE__ITEM_END;
    lr.end = &page;
    j = dm_output_message(&lr.base);
    assert_int_equal(json_object_size(j), 1);
    assert_non_null(json_object_get(j, "end"));
    json_decref(j);
    assert_true(json_is_null(dm_output_message(NULL)));
}

static void test_text_of_values(void **state)
{
    static const struct {
        const char *json, *text;
    } cases[] = {
        {"null", "-"},
        {"\"\"", "-"},
        {"\"eu\"", "eu"},
        {"0", "0"},
        {"-12", "-12"},
        {"true", "yes"},
        {"false", "no"},
        {"[]", "-"},
        {"[\"eu\",\"in\"]", "eu,in"},
        {"{}", "-"},
        {"{\"a\":\"b\",\"c\":1}", "a=b,c=1"},
    };
    for (size_t i = 0; i < DM_ARRAY_LEN(cases); i++) {
        json_t *j = json_loads(cases[i].json, JSON_DECODE_ANY, NULL);
        assert_non_null(j);
        char *t = dm_output_text(j);
        assert_string_equal(t, cases[i].text);
        free(t);
        json_decref(j);
    }
    char *t = dm_output_text(NULL);
    assert_string_equal(t, "-");
    free(t);
}

/* ---- the formats on records --------------------------------------------------------------- */

static char *pool_cell(const json_t *v, const json_t *rec)
{
    (void)v;
    return dm_sprintf("%lld/3", (long long)json_integer_value(json_object_get(rec, "n")));
}

static const dm_output_column_t cols[] = {
    {"REGION", "code", NULL, 0},
    {"N", "n", NULL, 0},
    {"POOL", NULL, pool_cell, 0},
    {"NOTE", "note", NULL, 0},
    {"AT", "nested.at", NULL, DM_OUTPUT_COL_WIDE},
};

static json_t **sample(size_t *n)
{
    static json_t *r[3];
    r[0] = obj("{\"code\":\"eu\",\"n\":1,\"note\":\"ok\",\"nested\":{\"at\":\"T1\"}}");
    r[1] = obj("{\"code\":\"in-long-name\",\"n\":22,\"note\":\"\",\"nested\":{\"at\":null}}");
    /* hostile: an escape sequence, a tab and a newline, invalid UTF-8, and a wide char */
    r[2] = obj("{\"code\":\"u\\u001b[31ms\",\"n\":333,\"note\":\"a\\tb\\nc \\u00e9\"}");
    *n = 3;
    return r;
}

static void test_table(void **state)
{
    size_t n;
    json_t **r = sample(&n);
    char *t = render(DM_OUTPUT_TABLE, DM_OUTPUT_LIST, 0, cols, DM_ARRAY_LEN(cols), r, n, true);
    /* one header line, upper case; columns 3 blanks apart; "-" for empty; no trailing blank */
    assert_string_equal(t, "REGION         N     POOL    NOTE\n"
                           "eu             1     1/3     ok\n"
                           "in-long-name   22    22/3    -\n"
                           "u\xef\xbf\xbd[31ms        333   333/3   a\xef\xbf\xbd"
                           "b\xef\xbf\xbd"
                           "c \xc3\xa9\n");
    free(t);

    r = sample(&n);
    t = render(DM_OUTPUT_WIDE, DM_OUTPUT_LIST, DM_OUTPUT_NO_HEADERS, cols, DM_ARRAY_LEN(cols), r, n,
               true);
    assert_string_equal(t, "eu             1     1/3     ok        T1\n"
                           "in-long-name   22    22/3    -         -\n"
                           "u\xef\xbf\xbd[31ms        333   333/3   a\xef\xbf\xbd"
                           "b\xef\xbf\xbd"
                           "c \xc3\xa9   -\n");
    free(t);

    /* no records: the header alone */
    t = render(DM_OUTPUT_TABLE, DM_OUTPUT_LIST, 0, cols, DM_ARRAY_LEN(cols), NULL, 0, true);
    assert_string_equal(t, "REGION   N   POOL   NOTE\n");
    free(t);
}

static void test_tsv_and_extra_rows(void **state)
{
    size_t n;
    json_t **r = sample(&n);
    capture_t c;
    cap_open(&c);
    dm_output_t *o =
        dm_output_create(c.f, DM_OUTPUT_TSV, DM_OUTPUT_LIST, 0, cols, DM_ARRAY_LEN(cols));
    for (size_t i = 0; i < n; i++)
        dm_output_record(o, r[i]);
    const char *total[] = {"total", "356", NULL, "", "wide"};
    dm_output_extra(o, total);
    assert_true(dm_output_end(o, true));
    char *t = cap_close(&c);
    /* no header, no padding; cells never hold a tab or a newline */
    assert_string_equal(t, "eu\t1\t1/3\tok\n"
                           "in-long-name\t22\t22/3\t-\n"
                           "u\xef\xbf\xbd[31ms\t333\t333/3\ta\xef\xbf\xbd"
                           "b\xef\xbf\xbd"
                           "c \xc3\xa9\n"
                           "total\t356\t-\t\n");
    free(t);

    /* the extra row is not a record: JSON leaves it out */
    cap_open(&c);
    o = dm_output_create(c.f, DM_OUTPUT_JSONL, DM_OUTPUT_LIST, 0, cols, DM_ARRAY_LEN(cols));
    dm_output_extra(o, total);
    assert_true(dm_output_end(o, true));
    t = cap_close(&c);
    assert_string_equal(t, "");
    free(t);
}

static void test_json_and_jsonl(void **state)
{
    size_t n;
    json_t **r = sample(&n);
    char *t = render(DM_OUTPUT_JSON, DM_OUTPUT_LIST, 0, cols, DM_ARRAY_LEN(cols), r, n, true);
    json_t *j = obj(t);
    json_t *items = json_object_get(j, "items");
    assert_int_equal(json_object_size(j), 1);
    assert_int_equal(json_array_size(items), 3);
    /* strings are the data itself: escapes kept (escaped by JSON), UTF-8 passed through */
    assert_string_equal(json_string_value(json_object_get(json_array_get(items, 2), "code")),
                        "u\x1b[31ms");
    assert_non_null(strstr(t, "\\u001B[31m"));
    assert_non_null(strstr(t, "\xc3\xa9"));
    assert_non_null(strstr(t, "\n    {\n      \"code\": \"eu\",")); /* indented */
    json_decref(j);
    free(t);

    t = render(DM_OUTPUT_JSON, DM_OUTPUT_LIST, 0, cols, DM_ARRAY_LEN(cols), NULL, 0, true);
    j = obj(t);
    assert_int_equal(json_array_size(json_object_get(j, "items")), 0);
    json_decref(j);
    free(t);

    /* a listing that failed half-way is no valid document */
    r = sample(&n);
    t = render(DM_OUTPUT_JSON, DM_OUTPUT_LIST, 0, cols, DM_ARRAY_LEN(cols), r, 2, false);
    assert_null(json_loads(t, 0, NULL));
    assert_true(strlen(t) > 0);
    json_decref(r[2]);
    free(t);

    /* one record: the object itself */
    r = sample(&n);
    t = render(DM_OUTPUT_JSON, DM_OUTPUT_ONE, 0, cols, DM_ARRAY_LEN(cols), r, 1, true);
    j = obj(t);
    assert_string_equal(json_string_value(json_object_get(j, "code")), "eu");
    json_decref(j);
    json_decref(r[1]);
    json_decref(r[2]);
    free(t);

    /* JSON Lines: one compact object per line */
    r = sample(&n);
    t = render(DM_OUTPUT_JSONL, DM_OUTPUT_LIST, 0, cols, DM_ARRAY_LEN(cols), r, n, true);
    size_t lines = 0;
    for (char *line = strtok(t, "\n"); line; line = strtok(NULL, "\n")) {
        json_decref(obj(line));
        lines++;
    }
    assert_int_equal(lines, 3);
    free(t);
}

static char *maybe_cell(const json_t *v, const json_t *rec)
{
    (void)rec;
    return json_string_length(v) ? dm_strdup(json_string_value(v)) : NULL;
}

static void test_detail(void **state)
{
    static const dm_output_column_t dcols[] = {
        {"request_id", "id", NULL, 0},
        {"purpose", "purpose", maybe_cell, 0},
        {"leg eu", "legs.0", NULL, 0},
    };
    json_t *r = obj("{\"id\":\"r1\",\"purpose\":\"\",\"legs\":[\"done\"]}");
    char *t = render(DM_OUTPUT_TABLE, DM_OUTPUT_DETAIL, 0, dcols, DM_ARRAY_LEN(dcols), &r, 1, true);
    /* a line per column, the names aligned; a NULL cell leaves its line out */
    assert_string_equal(t, "request_id  r1\nleg eu      done\n");
    free(t);
    r = obj("{\"id\":\"r1\",\"purpose\":\"p\",\"legs\":[]}");
    t = render(DM_OUTPUT_TSV, DM_OUTPUT_DETAIL, 0, dcols, DM_ARRAY_LEN(dcols), &r, 1, true);
    assert_string_equal(t, "request_id\tr1\npurpose\tp\nleg eu\t-\n");
    free(t);
}

static void test_many_rows_stream(void **state)
{
    /* past the rows held for the widths, the table goes on with the same widths */
    static const dm_output_column_t c2[] = {{"N", "n", NULL, 0}, {"X", "x", NULL, 0}};
    capture_t c;
    cap_open(&c);
    dm_output_t *o = dm_output_create(c.f, DM_OUTPUT_TABLE, DM_OUTPUT_LIST, 0, c2, 2);
    for (int i = 0; i < 2500; i++)
        dm_output_record(o, json_pack("{s:i,s:s}", "n", i, "x", "x"));
    assert_true(dm_output_end(o, true));
    char *t = cap_close(&c);
    assert_true(strncmp(t, "N     X\n0     x\n", 16) == 0);
    assert_non_null(strstr(t, "\n2499   x\n"));
    size_t lines = 0;
    for (const char *p = t; *p; p++)
        lines += *p == '\n';
    assert_int_equal(lines, 2501);
    free(t);
}

static void test_write_error(void **state)
{
    FILE *f = fopen("/dev/full", "w");
    if (!f)
        skip();
    setvbuf(f, NULL, _IONBF, 0);
    dm_output_t *o = dm_output_create(f, DM_OUTPUT_JSONL, DM_OUTPUT_LIST, 0, cols, 1);
    dm_output_record(o, obj("{\"code\":\"eu\"}"));
    assert_false(dm_output_end(o, true));
    fclose(f);
}

/* ---- progress ----------------------------------------------------------------------------- */

/* Runs a progress line with stderr on `fd`; returns what was written to the other end. */
static char *progress_on(int fd, int read_fd)
{
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    dup2(fd, STDERR_FILENO);
    dm_progress_t *p = dm_progress_start("rotate", 0);
    dm_progress_steps(p, 40, 100, "%s", "eu");
    dm_progress_note(p, "region %s done", "eu");
    dm_progress_end(p, true);
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    char *buf = dm_calloc(1, 4096);
    size_t n = 0;
    ssize_t r;
    while (n < 4095 && (r = read(read_fd, buf + n, 4095 - n)) > 0)
        n += (size_t)r;
    return buf;
}

static void test_progress(void **state)
{
    unsetenv("TERM");
    /* a pipe: the note alone, no progress line */
    int pfd[2];
    assert_int_equal(pipe(pfd), 0);
    fcntl(pfd[0], F_SETFL, O_NONBLOCK);
    char *out = progress_on(pfd[1], pfd[0]);
    assert_string_equal(out, "region eu done\n");
    free(out);
    close(pfd[0]);
    close(pfd[1]);

    /* a terminal: the line, redrawn in place, the note above it, the last state kept */
    int m = posix_openpt(O_RDWR | O_NOCTTY);
    if (m < 0 || grantpt(m) != 0 || unlockpt(m) != 0)
        skip();
    int s = open(ptsname(m), O_RDWR | O_NOCTTY);
    assert_true(s >= 0);
    fcntl(m, F_SETFL, O_NONBLOCK);
    out = progress_on(s, m);
    assert_non_null(strstr(out, "\rrotate: "));
    assert_non_null(strstr(out, "\r\033[Kregion eu done"));
    assert_non_null(strstr(out, "\rrotate: eu 40/100 (40%)\033[K"));
    free(out);

    /* TERM=dumb: no escape sequences at all */
    setenv("TERM", "dumb", 1);
    out = progress_on(s, m);
    assert_null(strchr(out, '\033'));
    free(out);
    unsetenv("TERM");
    close(s);
    close(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_format_names),
        cmocka_unit_test(test_message_json),
        cmocka_unit_test(test_text_of_values),
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_tsv_and_extra_rows),
        cmocka_unit_test(test_json_and_jsonl),
        cmocka_unit_test(test_detail),
        cmocka_unit_test(test_many_rows_stream),
        cmocka_unit_test(test_write_error),
        cmocka_unit_test(test_progress),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
