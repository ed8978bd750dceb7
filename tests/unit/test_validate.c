/* Field limits, table-driven (curl's unit1302 style): edges of every checker. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "domicile/validate.h"

/* ---- dm_utf8_valid ------------------------------------------------------------------------ */

static const struct {
    const char *s;
    size_t len; /* 0: strlen */
    bool ok;
} utf8_cases[] = {
    {"", 0, true},
    {"plain ascii", 0, true},
    {"\xc2\x80", 0, true},                  /* U+0080, first 2-byte */
    {"\xdf\xbf", 0, true},                  /* U+07FF */
    {"\xe0\xa0\x80", 0, true},              /* U+0800, first 3-byte */
    {"\xed\x9f\xbf", 0, true},              /* U+D7FF, below the surrogates */
    {"\xee\x80\x80", 0, true},              /* U+E000, above them */
    {"\xef\xbf\xbf", 0, true},              /* U+FFFF */
    {"\xf0\x90\x80\x80", 0, true},          /* U+10000, first 4-byte */
    {"\xf4\x8f\xbf\xbf", 0, true},          /* U+10FFFF, the last */
    {"\xe2\x82\xac 10", 0, true},           /* "€ 10" */
    {"a\0b", 3, true},                      /* NUL is UTF-8 (checkers reject it) */
    {"\xc0\xaf", 0, false},                 /* overlong '/' */
    {"\xc1\xbf", 0, false},                 /* overlong */
    {"\xe0\x80\xaf", 0, false},             /* overlong '/' in 3 bytes */
    {"\xe0\x9f\xbf", 0, false},             /* overlong U+07FF */
    {"\xf0\x80\x80\xaf", 0, false},         /* overlong in 4 bytes */
    {"\xf0\x8f\xbf\xbf", 0, false},         /* overlong U+FFFF */
    {"\xed\xa0\x80", 0, false},             /* U+D800 high surrogate */
    {"\xed\xbf\xbf", 0, false},             /* U+DFFF low surrogate */
    {"\xed\xa0\xbd\xed\xb2\xa9", 0, false}, /* CESU-8 surrogate pair */
    {"\xf4\x90\x80\x80", 0, false},         /* U+110000 */
    {"\xf5\x80\x80\x80", 0, false},         /* lead byte F5 */
    {"\xff", 0, false},
    {"\xfe", 0, false},
    {"\x80", 0, false}, /* lone continuation */
    {"a\xbf", 0, false},
    {"\xe2\x82", 0, false}, /* truncated */
    {"\xc2", 0, false},
    {"\xf0\x9f\x98", 0, false},
    {"\xe2\x82\x41", 0, false}, /* bad continuation */
    {"\xe2\xac\x82\xac", 0, false},
    {"\xf0\x9f\x98\x80", 0, true}, /* U+1F600 */
};

static void test_utf8_valid(void **state)
{
    for (size_t i = 0; i < DM_ARRAY_LEN(utf8_cases); i++) {
        size_t len = utf8_cases[i].len ? utf8_cases[i].len : strlen(utf8_cases[i].s);
        if (dm_utf8_valid(utf8_cases[i].s, len) != utf8_cases[i].ok)
            fail_msg("utf8 case %zu: want %s", i, utf8_cases[i].ok ? "valid" : "invalid");
    }
    /* A valid sequence cut by the length is invalid. */
    assert_false(dm_utf8_valid("\xe2\x82\xac", 2));
    assert_true(dm_utf8_valid("\xe2\x82\xac", 3));
}

/* ---- string checkers ---------------------------------------------------------------------- */

typedef dm_status_t *(*check_fn)(const char *field, const char *v);

static dm_status_t *kind(const char *f, const char *v)
{
    return dm_check_kind(f, v, false);
}

static dm_status_t *kind_opt(const char *f, const char *v)
{
    return dm_check_kind(f, v, true);
}

static dm_status_t *purpose(const char *f, const char *v)
{
    return dm_check_purpose(f, v, false);
}

static dm_status_t *purpose_opt(const char *f, const char *v)
{
    return dm_check_purpose(f, v, true);
}

static dm_status_t *text_1_200(const char *f, const char *v)
{
    return dm_check_text(f, v, 1, 200);
}

static dm_status_t *text_0_10(const char *f, const char *v)
{
    return dm_check_text(f, v, 0, 10);
}

#define CUSTOMER "customer_id", dm_check_customer_id, "must be 1..128 bytes of [A-Za-z0-9._:-]"
#define RECORD                                                                                     \
    "record_id", dm_check_record_id, "must be 1..256 bytes of UTF-8 without control characters"
#define KIND     "kind", kind, "must be 1..64 bytes of [a-z0-9._-]"
#define KIND_OPT "filter.kind", kind_opt, "must be empty or 1..64 bytes of [a-z0-9._-]"
#define REQUEST                                                                                    \
    "request_id", dm_check_request_id, "must be 1..128 bytes of printable ASCII (0x21..0x7e)"
#define PURPOSE     "purpose", purpose, "must be 1..64 bytes of [a-z0-9-]"
#define PURPOSE_OPT "filter.purpose", purpose_opt, "must be empty or 1..64 bytes of [a-z0-9-]"
#define TEXT        "reason", text_1_200, "must be 1..200 bytes of UTF-8 without control characters"
#define TEXT0       "note", text_0_10, "must be 0..10 bytes of UTF-8 without control characters"
#define CTYPE                                                                                      \
    "content_type", dm_check_content_type, "must be 0..128 bytes of printable ASCII (0x20..0x7e)"

static const struct {
    const char *field;
    check_fn fn;
    const char *limit; /* the message is "<field>: <limit>" */
    const char *v;     /* NULL: `fill` repeated `n` times */
    char fill;
    size_t n;
    bool ok;
} cases[] = {
    {CUSTOMER, "a", 0, 0, true},
    {CUSTOMER, "Acme-Corp_2.eu:x", 0, 0, true},
    {CUSTOMER, NULL, 'c', 128, true},
    {CUSTOMER, NULL, 'c', 129, false},
    {CUSTOMER, "", 0, 0, false},
    {CUSTOMER, "acme corp", 0, 0, false},
    {CUSTOMER, "acme/corp", 0, 0, false},
    {CUSTOMER, "acm\xc3\xa9", 0, 0, false}, /* non-ASCII */
    {CUSTOMER, "a\tb", 0, 0, false},

    {RECORD, "r", 0, 0, true},
    {RECORD, "order #42 / \xe2\x82\xac 10 \xf0\x9f\x98\x80", 0, 0, true},
    {RECORD, NULL, 'r', 256, true},
    {RECORD, NULL, 'r', 257, false},
    {RECORD, "", 0, 0, false},
    {RECORD, "\xc0\xaf", 0, 0, false},
    {RECORD, "\xed\xa0\x80", 0, 0, false},
    {RECORD, "\xf4\x90\x80\x80", 0, 0, false},
    {RECORD, "abc\xe2\x82", 0, 0, false},
    {RECORD, "a\nb", 0, 0, false},
    {RECORD, "a\x1f", 0, 0, false},
    {RECORD, "a\x7f", 0, 0, false},

    {KIND, "k", 0, 0, true},
    {KIND, "invoice.v2_draft-1", 0, 0, true},
    {KIND, NULL, 'k', 64, true},
    {KIND, NULL, 'k', 65, false},
    {KIND, "", 0, 0, false},
    {KIND, "Invoice", 0, 0, false},
    {KIND, "a:b", 0, 0, false},
    {KIND, "a\x01", 0, 0, false},
    {KIND, "\xc3\xa9", 0, 0, false},
    {KIND_OPT, "", 0, 0, true},
    {KIND_OPT, NULL, 'k', 64, true},
    {KIND_OPT, NULL, 'k', 65, false},
    {KIND_OPT, "A", 0, 0, false},

    {REQUEST, "!", 0, 0, true},
    {REQUEST, "req-1/{~}", 0, 0, true},
    {REQUEST, NULL, '~', 128, true},
    {REQUEST, NULL, '~', 129, false},
    {REQUEST, "", 0, 0, false},
    {REQUEST, "a b", 0, 0, false},
    {REQUEST, "a\x7f", 0, 0, false},
    {REQUEST, "a\n", 0, 0, false},
    {REQUEST, "\xc3\xa9", 0, 0, false},

    {PURPOSE, "p", 0, 0, true},
    {PURPOSE, "direct-marketing-2", 0, 0, true},
    {PURPOSE, NULL, 'p', 64, true},
    {PURPOSE, NULL, 'p', 65, false},
    {PURPOSE, "", 0, 0, false},
    {PURPOSE, "direct_marketing", 0, 0, false},
    {PURPOSE, "a.b", 0, 0, false},
    {PURPOSE, "Analytics", 0, 0, false},
    {PURPOSE_OPT, "", 0, 0, true},
    {PURPOSE_OPT, NULL, 'p', 65, false},

    {TEXT, "x", 0, 0, true},
    {TEXT, NULL, 'x', 200, true},
    {TEXT, NULL, 'x', 201, false},
    {TEXT, "", 0, 0, false},
    {TEXT, "caf\xc3\xa9 \xe2\x82\xac", 0, 0, true},
    {TEXT, "\xc0\xaf", 0, 0, false},
    {TEXT, "\xed\xa0\x80", 0, 0, false},
    {TEXT, "\xf4\x90\x80\x80", 0, 0, false},
    {TEXT, "\xe2\x82", 0, 0, false},
    {TEXT, "line\r\n", 0, 0, false},
    {TEXT, "tab\there", 0, 0, false},
    {TEXT0, "", 0, 0, true},
    {TEXT0, NULL, 'x', 10, true},
    {TEXT0, NULL, 'x', 11, false},
    {TEXT0, "\xe2\x82\xac\xe2\x82\xac\xe2\x82\xac", 0, 0, true},              /* 9 bytes */
    {TEXT0, "\xe2\x82\xac\xe2\x82\xac\xe2\x82\xac\xe2\x82\xac", 0, 0, false}, /* 12 bytes */

    {CTYPE, "", 0, 0, true},
    {CTYPE, "application/json; charset=utf-8", 0, 0, true},
    {CTYPE, NULL, ' ', 128, true},
    {CTYPE, NULL, 't', 129, false},
    {CTYPE, "text/plain\n", 0, 0, false},
    {CTYPE, "text/\x7f", 0, 0, false},
    {CTYPE, "text/pl\xc3\xa4in", 0, 0, false},
};

static void test_string_checkers(void **state)
{
    for (size_t i = 0; i < DM_ARRAY_LEN(cases); i++) {
        char *v = cases[i].v ? strdup(cases[i].v) : malloc(cases[i].n + 1);
        if (!cases[i].v) {
            memset(v, cases[i].fill, cases[i].n);
            v[cases[i].n] = '\0';
        }
        dm_status_t *st = cases[i].fn(cases[i].field, v);
        if (cases[i].ok && st)
            fail_msg("case %zu (%s, %zu bytes): unexpected \"%s\"", i, cases[i].field, strlen(v),
                     st->message);
        if (!cases[i].ok) {
            if (!st)
                fail_msg("case %zu (%s, %zu bytes): accepted", i, cases[i].field, strlen(v));
            assert_int_equal(st->code, GRPC_STATUS_INVALID_ARGUMENT);
            char *want = malloc(strlen(cases[i].field) + strlen(cases[i].limit) + 3);
            sprintf(want, "%s: %s", cases[i].field, cases[i].limit);
            if (strcmp(st->message, want) != 0)
                fail_msg("case %zu: message \"%s\", want \"%s\"", i, st->message, want);
            free(want);
            dm_status_free(st);
        }
        free(v);
    }
}

/* ---- numeric checkers --------------------------------------------------------------------- */

static void test_payload(void **state)
{
    assert_null(dm_check_payload("payload", 0));
    assert_null(dm_check_payload("payload", DM_PAYLOAD_MAX));
    assert_int_equal(DM_PAYLOAD_MAX, 1048576);
    dm_status_t *st = dm_check_payload("record.payload", DM_PAYLOAD_MAX + 1);
    assert_non_null(st);
    assert_int_equal(st->code, GRPC_STATUS_INVALID_ARGUMENT);
    assert_string_equal(st->message, "record.payload: must be at most 1048576 bytes");
    dm_status_free(st);
    st = dm_check_payload("payload", SIZE_MAX);
    assert_non_null(st);
    dm_status_free(st);
}

static void test_page_size(void **state)
{
    static const struct {
        int32_t v, max;
        bool ok;
    } pcases[] = {
        {0, 1000, true},          {1, 1000, true},
        {1000, 1000, true},       {1001, 1000, false},
        {-1, 1000, false},        {INT32_MIN, 1000, false},
        {INT32_MAX, 1000, false}, {INT32_MAX, INT32_MAX, true},
    };
    for (size_t i = 0; i < DM_ARRAY_LEN(pcases); i++) {
        dm_status_t *st = dm_check_page_size("page_size", pcases[i].v, pcases[i].max);
        if (pcases[i].ok != (st == NULL))
            fail_msg("page size case %zu: %d of max %d", i, pcases[i].v, pcases[i].max);
        if (st) {
            assert_int_equal(st->code, GRPC_STATUS_INVALID_ARGUMENT);
            char want[64];
            snprintf(want, sizeof(want), "page_size: must be 0..%d (0 = default)", pcases[i].max);
            assert_string_equal(st->message, want);
            dm_status_free(st);
        }
    }
}

/* ---- labels ------------------------------------------------------------------------------- */

#define MAX_ENTRIES 40

typedef struct {
    dm_label_entry_t e[MAX_ENTRIES];
    void *p[MAX_ENTRIES];
    char keys[MAX_ENTRIES][16];
    size_t n;
} labels_t;

static void labels_add(labels_t *l, const char *k, const char *v)
{
    memset(&l->e[l->n], 0, sizeof(l->e[l->n]));
    l->e[l->n].key = (char *)k;
    l->e[l->n].value = (char *)v;
    l->p[l->n] = &l->e[l->n];
    l->n++;
}

static char *rep(char c, size_t n)
{
    char *s = malloc(n + 1);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

/* NULL want: valid. Otherwise the exact message. */
static void expect_labels(const labels_t *l, const char *want)
{
    dm_status_t *st = dm_check_labels("labels", l->n, l->p);
    if (!want) {
        if (st)
            fail_msg("unexpected \"%s\"", st->message);
        return;
    }
    if (!st)
        fail_msg("accepted, want \"%s\"", want);
    assert_int_equal(st->code, GRPC_STATUS_INVALID_ARGUMENT);
    assert_string_equal(st->message, want);
    dm_status_free(st);
}

static void test_labels(void **state)
{
    labels_t l = {.n = 0};
    char *k63 = rep('k', 63), *k64 = rep('k', 64), *v256 = rep('v', 256), *v257 = rep('v', 257);

    expect_labels(&l, NULL); /* no labels */
    assert_null(dm_check_labels("labels", 0, NULL));

    labels_add(&l, "env", "prod");
    labels_add(&l, "team.name_1-x", "");
    labels_add(&l, k63, v256);
    labels_add(&l, "unicode", "caf\xc3\xa9 \xe2\x82\xac");
    expect_labels(&l, NULL);

    /* 32 entries pass, 33 do not. */
    l.n = 0;
    for (int i = 0; i < 33; i++) {
        snprintf(l.keys[i], sizeof(l.keys[i]), "k%d", i);
        labels_add(&l, l.keys[i], "v");
    }
    l.n = 32;
    expect_labels(&l, NULL);
    l.n = 33;
    expect_labels(&l, "labels: must have at most 32 entries");

    static const struct {
        const char *key, *value, *want;
    } bad[] = {
        {"Bad", "v", "labels[\"Bad\"]: key must be 1..63 bytes of [a-z0-9._-]"},
        {"", "v", "labels[\"\"]: key must be 1..63 bytes of [a-z0-9._-]"},
        {"a b", "v", "labels[\"a b\"]: key must be 1..63 bytes of [a-z0-9._-]"},
        {"a:b", "v", "labels[\"a:b\"]: key must be 1..63 bytes of [a-z0-9._-]"},
        /* Control bytes and invalid UTF-8 are never echoed. */
        {"a\nb\x1b[0m", "v", "labels[\"a?b?[0m\"]: key must be 1..63 bytes of [a-z0-9._-]"},
        {"\xff\xc0\xaf", "v", "labels[\"???\"]: key must be 1..63 bytes of [a-z0-9._-]"},
        {"\xed\xa0\x80", "v", "labels[\"???\"]: key must be 1..63 bytes of [a-z0-9._-]"},
        {"x\xe2\x82", "v", "labels[\"x??\"]: key must be 1..63 bytes of [a-z0-9._-]"},
        {"\xc2\x9b"
         "31m",
         "v", "labels[\"?31m\"]: key must be 1..63 bytes of [a-z0-9._-]"},
        /* Valid UTF-8 is kept; quotes and backslashes are escaped. */
        {"caf\xc3\xa9", "v", "labels[\"caf\xc3\xa9\"]: key must be 1..63 bytes of [a-z0-9._-]"},
        {"a\"]\\", "v", "labels[\"a\\\"]\\\\\"]: key must be 1..63 bytes of [a-z0-9._-]"},
        /* Values. */
        {"ok", "a\tb",
         "labels[\"ok\"]: value must be 0..256 bytes of UTF-8 without control "
         "characters"},
        {"ok", "\xc0\xaf",
         "labels[\"ok\"]: value must be 0..256 bytes of UTF-8 without control "
         "characters"},
        {"ok", "\xed\xa0\x80",
         "labels[\"ok\"]: value must be 0..256 bytes of UTF-8 without "
         "control characters"},
        {"ok", "\xf4\x90\x80\x80",
         "labels[\"ok\"]: value must be 0..256 bytes of UTF-8 without "
         "control characters"},
        {"ok", "\xe2\x82",
         "labels[\"ok\"]: value must be 0..256 bytes of UTF-8 without control "
         "characters"},
    };
    for (size_t i = 0; i < DM_ARRAY_LEN(bad); i++) {
        l.n = 0;
        labels_add(&l, "first", "v");
        labels_add(&l, bad[i].key, bad[i].value);
        expect_labels(&l, bad[i].want);
    }

    l.n = 0;
    labels_add(&l, k64, "v");
    char want[256];
    snprintf(want, sizeof(want), "labels[\"%s\"]: key must be 1..63 bytes of [a-z0-9._-]", k64);
    expect_labels(&l, want);

    l.n = 0;
    labels_add(&l, "big", v257);
    expect_labels(&l, "labels[\"big\"]: value must be 0..256 bytes of UTF-8 without control "
                      "characters");

    l.n = 0;
    labels_add(&l, "env", "prod");
    labels_add(&l, "tier", "1");
    labels_add(&l, "env", "dev");
    expect_labels(&l, "labels[\"env\"]: duplicate key");

    /* Long keys are cut at 64 bytes, on a character boundary. */
    char *k100 = rep('K', 100);
    l.n = 0;
    labels_add(&l, k100, "v");
    snprintf(want, sizeof(want), "labels[\"%.64s...\"]: key must be 1..63 bytes of [a-z0-9._-]",
             k100);
    expect_labels(&l, want);

    char euros[3 * 30 + 1] = "";
    for (int i = 0; i < 30; i++)
        strcat(euros, "\xe2\x82\xac");
    euros[0] = 'E'; /* "E" + 2 continuation bytes: two '?' and then 29 euro signs */
    l.n = 0;
    labels_add(&l, euros, "v");
    dm_status_t *st = dm_check_labels("labels", l.n, l.p);
    assert_non_null(st);
    /* 3 + 20 * 3 = 63 bytes fit; the 21st euro sign would make 66. */
    char quoted[128] = "E??";
    for (int i = 0; i < 20; i++)
        strcat(quoted, "\xe2\x82\xac");
    snprintf(want, sizeof(want), "labels[\"%s...\"]: key must be 1..63 bytes of [a-z0-9._-]",
             quoted);
    assert_string_equal(st->message, want);
    assert_true(dm_utf8_valid(st->message, strlen(st->message)));
    dm_status_free(st);

    /* The field name is the caller's. */
    l.n = 0;
    labels_add(&l, "X", "v");
    st = dm_check_labels("record.labels", l.n, l.p);
    assert_non_null(st);
    assert_true(strncmp(st->message, "record.labels[\"X\"]: ", 20) == 0);
    dm_status_free(st);

    free(k63);
    free(k64);
    free(k100);
    free(v256);
    free(v257);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_utf8_valid), cmocka_unit_test(test_string_checkers),
        cmocka_unit_test(test_payload),    cmocka_unit_test(test_page_size),
        cmocka_unit_test(test_labels),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
