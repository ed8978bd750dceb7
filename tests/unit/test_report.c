/* Transfer report formatters on hand-built reports: empty, several months and routes, hostile
 * strings, an incomplete report with a damaged ledger. The real XML parse of the HTML is in
 * tests/integration/test_report_cli.py; here a small checker asserts it is well-formed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "domicile/report.h"

#define HOSTILE "<script>&\"'"

/* ---- building reports ----------------------------------------------------------------------- */

typedef struct fixture {
    Domicile__V1__ReportResponse rep;
    Domicile__V1__ReportRow rows[16];
    Domicile__V1__ReportRow *rowp[16];
    Domicile__V1__LedgerState states[4];
    Domicile__V1__LedgerState *statep[4];
} fixture_t;

static void add_row(fixture_t *f, const char *month, const char *from, const char *to,
                    const char *basis, const char *purpose, int64_t transfers, int64_t records,
                    int64_t bytes, int64_t refusals)
{
    Domicile__V1__ReportRow *r = &f->rows[f->rep.n_rows];
    domicile__v1__report_row__init(r);
    r->month = (char *)month;
    r->from_region = (char *)from;
    r->to_region = (char *)to;
    r->basis_id = (char *)basis;
    r->purpose = (char *)purpose;
    r->transfers = transfers;
    r->records = records;
    r->bytes = bytes;
    r->refusals = refusals;
    f->rowp[f->rep.n_rows++] = r;
}

static Domicile__V1__LedgerState *add_ledger(fixture_t *f, const char *region, bool reachable,
                                             bool verified, int64_t entries)
{
    Domicile__V1__LedgerState *s = &f->states[f->rep.n_ledgers];
    domicile__v1__ledger_state__init(s);
    s->region = (char *)region;
    s->reachable = reachable;
    s->verified = verified;
    s->entries = entries;
    s->damage = verified ? DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_NONE
                         : DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_UNSPECIFIED;
    f->statep[f->rep.n_ledgers++] = s;
    return s;
}

static void fixture_init(fixture_t *f)
{
    memset(f, 0, sizeof(*f));
    domicile__v1__report_response__init(&f->rep);
    f->rep.rows = f->rowp;
    f->rep.ledgers = f->statep;
    f->rep.generated_at_unix_ms = 1714566896789LL; /* 2024-05-01T12:34:56.789Z */
    f->rep.complete = true;
}

static void empty_report(fixture_t *f)
{
    fixture_init(f);
    add_ledger(f, "eu", true, true, 0);
    add_ledger(f, "in", true, true, 0);
    add_ledger(f, "us", true, true, 0);
}

/* Three months, four routes with transfers, one refusal-only route, hostile strings. */
static void busy_report(fixture_t *f)
{
    fixture_init(f);
    f->rep.from_unix_ms = 1704067200000LL; /* 2024-01-01 */
    f->rep.to_unix_ms = 1714521600000LL;   /* 2024-05-01 */
    add_row(f, "2024-01", "eu", "in", "scc-2021-914-m2", "support", 2, 3, 300, 0);
    add_row(f, "2024-01", "eu", "us", "eu-us-dpf-2023-1795", "support", 5, 5, 1000, 0);
    add_row(f, "2024-01", "eu", "us", HOSTILE, "a,b\"c", 1, 1, 10, 0);
    add_row(f, "2024-02", "eu", "us", "eu-us-dpf-2023-1795", "support", 1000, 1000, 123456, 0);
    add_row(f, "2024-02", "in", "us", "dpdp-s16", "support", 1, 2, 64, 0);
    add_row(f, "2024-02", "us", "in", "", "model-training", 0, 0, 0, 4);
    add_row(f, "2024-03", "us", "eu", "us-no-restriction", "term\x1b[31mred", 7, 7, 700, 1);
    add_row(f, "2024-03", "\xff", "eu", "x", "line\nbreak", 1, 1, 1, 0);
    add_ledger(f, "eu", true, true, 1010);
    add_ledger(f, "in", true, true, 3);
    add_ledger(f, "us", true, true, 12);
}

/* ---- helpers -------------------------------------------------------------------------------- */

static size_t count(const char *hay, const char *needle)
{
    size_t n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

static size_t lines(const char *s)
{
    return count(s, "\n");
}

/* Value of attribute `name` in the tag starting at `tag`, into `out`; false when absent. */
static bool attr(const char *tag, const char *name, char *out, size_t size)
{
    const char *end = strchr(tag, '>');
    char key[64];
    snprintf(key, sizeof(key), " %s=\"", name);
    const char *p = strstr(tag, key);
    if (!p || !end || p > end)
        return false;
    p += strlen(key);
    const char *q = strchr(p, '"');
    assert_non_null(q);
    snprintf(out, size, "%.*s", (int)(q - p), p);
    return true;
}

static bool name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == ':' || c == '_';
}

/* `&` must start one of XML's own references: no HTML-only named entities. */
static void check_reference(const char *p)
{
    static const char *const named[] = {"&amp;", "&lt;", "&gt;", "&quot;", "&apos;"};
    if (p[1] == '#') {
        const char *q = p + 2;
        while (*q >= '0' && *q <= '9')
            q++;
        if (q > p + 2 && *q == ';')
            return;
    }
    for (size_t i = 0; i < DM_ARRAY_LEN(named); i++)
        if (strncmp(p, named[i], strlen(named[i])) == 0)
            return;
    fail_msg("bad character reference at: %.20s", p);
}

/*
 * A small well-formedness check: tags nest and close, attribute values are quoted and hold no
 * '<', references are XML's own, nothing follows the root. Enough for the markup we write; the
 * integration test parses the file with a real XML parser.
 */
static void check_well_formed(const char *s)
{
    const char *stack[512];
    size_t depth = 0, roots = 0;
    const char *p = s;
    if (strncmp(p, "<!DOCTYPE html>", 15) == 0)
        p += 15;
    while (*p) {
        if (*p == '&') {
            check_reference(p);
            p++;
            continue;
        }
        if (*p != '<') {
            if (depth == 0 && !(*p == ' ' || *p == '\n'))
                fail_msg("text outside the root element: %.20s", p);
            p++;
            continue;
        }
        bool closing = p[1] == '/';
        const char *name = p + (closing ? 2 : 1);
        const char *q = name;
        while (name_char(*q))
            q++;
        if (q == name)
            fail_msg("bad tag at: %.30s", p);
        size_t nlen = (size_t)(q - name);
        /* attributes: name="value" pairs */
        while (*q && *q != '>' && !(q[0] == '/' && q[1] == '>')) {
            if (*q == ' ' || *q == '\n') {
                q++;
                continue;
            }
            assert_false(closing);
            const char *an = q;
            while (name_char(*q))
                q++;
            if (q == an || q[0] != '=' || q[1] != '"')
                fail_msg("bad attribute at: %.30s", an);
            q += 2;
            while (*q && *q != '"') {
                assert_int_not_equal(*q, '<');
                if (*q == '&')
                    check_reference(q);
                q++;
            }
            assert_int_equal(*q, '"');
            q++;
        }
        if (!*q)
            fail_msg("unterminated tag at: %.30s", p);
        bool empty = *q == '/';
        if (closing) {
            if (depth == 0)
                fail_msg("close without open at: %.30s", p);
            depth--;
            if (strncmp(stack[depth], name, nlen) != 0 || name_char(stack[depth][nlen]))
                fail_msg("</%.*s> closes <%.20s", (int)nlen, name, stack[depth]);
        } else if (!empty) {
            if (depth == 0)
                roots++;
            assert_true(depth < DM_ARRAY_LEN(stack));
            stack[depth++] = name;
        } else if (depth == 0) {
            roots++;
        }
        p = q + (empty ? 2 : 1);
    }
    assert_int_equal(depth, 0);
    assert_int_equal(roots, 1);
}

/* The bars of the SVG chart: count, each height > 0, their data-transfers summed. */
static size_t bars(const char *html, int64_t *sum)
{
    size_t n = 0;
    *sum = 0;
    for (const char *p = strstr(html, "<rect class=\"bar\""); p;
         p = strstr(p + 1, "<rect class=\"bar\"")) {
        char h[32], t[32], m[32], r[64];
        assert_true(attr(p, "height", h, sizeof(h)));
        assert_true(attr(p, "data-transfers", t, sizeof(t)));
        assert_true(attr(p, "data-month", m, sizeof(m)));
        assert_true(attr(p, "data-route", r, sizeof(r)));
        assert_true(atof(h) > 0.0);
        *sum = (int64_t)((uint64_t)*sum + (uint64_t)atoll(t)); /* no UB on huge counts */
        n++;
    }
    return n;
}

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_empty_report(void **state)
{
    fixture_t f;
    empty_report(&f);

    char *table = dm_report_render(&f.rep, DM_REPORT_TABLE);
    assert_non_null(strstr(table, "generated 2024-05-01 12:34:56 UTC; window: all time"));
    assert_non_null(strstr(table, "(no transfers in this window)"));
    assert_null(strstr(table, "warning"));
    free(table);

    char *csv = dm_report_render(&f.rep, DM_REPORT_CSV);
    assert_string_equal(
        csv, "month,from_region,to_region,basis_id,purpose,transfers,records,bytes,refusals\r\n");
    free(csv);

    char *js = dm_report_render(&f.rep, DM_REPORT_JSON);
    json_error_t err;
    json_t *j = json_loads(js, 0, &err);
    assert_non_null(j);
    assert_int_equal(json_array_size(json_object_get(j, "rows")), 0);
    assert_int_equal(json_array_size(json_object_get(j, "ledgers")), 3);
    assert_true(json_is_null(json_object_get(j, "from")));
    assert_true(json_is_null(json_object_get(j, "to")));
    assert_true(json_is_true(json_object_get(j, "complete")));
    assert_string_equal(json_string_value(json_object_get(j, "generated_at")),
                        "2024-05-01T12:34:56.789Z");
    assert_int_equal(json_integer_value(json_object_get(json_object_get(j, "totals"), "bytes")), 0);
    json_decref(j);
    free(js);

    char *md = dm_report_render(&f.rep, DM_REPORT_MARKDOWN);
    assert_non_null(
        strstr(md, "| Month | Route | Basis | Purpose | Transfers | Records | Bytes | Refusals |\n"
                   "|---|---|---|---|--:|--:|--:|--:|\n"));
    assert_non_null(strstr(md, "| Region | Reachable | Verified |"));
    free(md);

    char *html = dm_report_render(&f.rep, DM_REPORT_HTML);
    int64_t sum;
    check_well_formed(html);
    assert_int_equal(count(html, "<svg"), 1);
    assert_int_equal(count(html, "</svg>"), 1);
    assert_int_equal(bars(html, &sum), 0);
    assert_non_null(strstr(html, "No allowed transfers in this window"));
    assert_non_null(strstr(html, "No transfers in this window"));
    assert_int_equal(count(html, "&#10003; verified"), 3);
    assert_null(strstr(html, "<script"));
    assert_null(strstr(html, "http://example")); /* no external assets */
    assert_null(strstr(html, " src=\""));
    assert_null(strstr(html, "<link"));
    free(html);
}

static void test_csv_quoting(void **state)
{
    fixture_t f;
    busy_report(&f);
    char *csv = dm_report_render(&f.rep, DM_REPORT_CSV);
    assert_int_equal(lines(csv), 1 + f.rep.n_rows + 1); /* one quoted field holds a newline */
    assert_int_equal(count(csv, "\r\n"), 1 + f.rep.n_rows);
    assert_non_null(strstr(csv, "\r\n2024-01,eu,us,\"<script>&\"\"'\",\"a,b\"\"c\",1,1,10,0\r\n"));
    assert_non_null(strstr(csv, "\r\n2024-02,us,in,,model-training,0,0,0,4\r\n"));
    assert_non_null(strstr(csv, ",\"line\nbreak\",1,1,1,0\r\n"));
    /* invalid UTF-8 becomes U+FFFD, never raw */
    assert_non_null(strstr(csv, "\r\n2024-03,\xef\xbf\xbd,eu,x,"));
    assert_null(strstr(csv, "\xff"));
    free(csv);
}

static void test_json_round_trip(void **state)
{
    fixture_t f;
    busy_report(&f);
    char *js = dm_report_render(&f.rep, DM_REPORT_JSON);
    json_error_t err;
    json_t *j = json_loads(js, 0, &err);
    if (!j)
        fail_msg("json does not parse: %s (line %d)", err.text, err.line);
    assert_string_equal(json_string_value(json_object_get(j, "from")), "2024-01-01");
    assert_string_equal(json_string_value(json_object_get(j, "to")), "2024-05-01");
    json_t *rows = json_object_get(j, "rows");
    assert_int_equal(json_array_size(rows), f.rep.n_rows);
    int64_t t = 0, rec = 0, by = 0, ref = 0;
    for (size_t i = 0; i < f.rep.n_rows; i++) {
        json_t *r = json_array_get(rows, i);
        const Domicile__V1__ReportRow *w = f.rep.rows[i];
        assert_string_equal(json_string_value(json_object_get(r, "month")), w->month);
        if (strcmp(w->from_region, "\xff") != 0)
            assert_string_equal(json_string_value(json_object_get(r, "from_region")),
                                w->from_region);
        assert_string_equal(json_string_value(json_object_get(r, "to_region")), w->to_region);
        assert_string_equal(json_string_value(json_object_get(r, "basis_id")), w->basis_id);
        assert_string_equal(json_string_value(json_object_get(r, "purpose")), w->purpose);
        assert_int_equal(json_integer_value(json_object_get(r, "transfers")), w->transfers);
        assert_int_equal(json_integer_value(json_object_get(r, "records")), w->records);
        assert_int_equal(json_integer_value(json_object_get(r, "bytes")), w->bytes);
        assert_int_equal(json_integer_value(json_object_get(r, "refusals")), w->refusals);
        t += w->transfers;
        rec += w->records;
        by += w->bytes;
        ref += w->refusals;
    }
    assert_string_equal(json_string_value(json_object_get(json_array_get(rows, 7), "from_region")),
                        "\xef\xbf\xbd");
    json_t *tot = json_object_get(j, "totals");
    assert_int_equal(json_integer_value(json_object_get(tot, "transfers")), t);
    assert_int_equal(json_integer_value(json_object_get(tot, "records")), rec);
    assert_int_equal(json_integer_value(json_object_get(tot, "bytes")), by);
    assert_int_equal(json_integer_value(json_object_get(tot, "refusals")), ref);
    json_t *led = json_array_get(json_object_get(j, "ledgers"), 0);
    assert_string_equal(json_string_value(json_object_get(led, "region")), "eu");
    assert_true(json_is_true(json_object_get(led, "verified")));
    assert_int_equal(json_integer_value(json_object_get(led, "entries")), 1010);
    assert_string_equal(json_string_value(json_object_get(led, "damage")), "none");
    json_decref(j);
    free(js);
}

static void test_markdown(void **state)
{
    fixture_t f;
    busy_report(&f);
    char *md = dm_report_render(&f.rep, DM_REPORT_MARKDOWN);
    assert_non_null(
        strstr(md, "| Month | Route | Basis | Purpose | Transfers | Records | Bytes | Refusals |"));
    assert_non_null(strstr(md, "| 2024-01 | eu\xe2\x86\x92us | eu-us-dpf-2023-1795 | support | 5 "
                               "| 5 | 1000 | 0 |\n"));
    /* the hostile id cannot open a tag or an entity, nor split the cells */
    assert_non_null(strstr(md, "| \\<script\\>\\&\"' |"));
    for (const char *lt = strchr(md, '<'); lt; lt = strchr(lt + 1, '<'))
        assert_int_equal(lt[-1], '\\'); /* every '<' escaped: no raw HTML reaches a renderer */
    assert_null(strstr(md, "\x1b"));
    assert_non_null(strstr(md, "| **Total** | | | | **1017** | **1019** | **125531** | **5** |"));
    /* every table line has the same number of cells: 9 pipes in the first table */
    const char *t = strstr(md, "| Month");
    for (const char *l = t; l && *l == '|'; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
        size_t pipes = 0;
        for (const char *c = l; *c && *c != '\n'; c++)
            if (*c == '|' && (c == l || c[-1] != '\\'))
                pipes++;
        assert_int_equal(pipes, 9);
    }
    free(md);
}

static void test_table(void **state)
{
    fixture_t f;
    busy_report(&f);
    char *table = dm_report_render(&f.rep, DM_REPORT_TABLE);
    assert_non_null(strstr(table, "window: 2024-01-01 to 2024-05-01 (end exclusive)"));
    assert_non_null(strstr(table, "month    route  basis                purpose"));
    assert_non_null(
        strstr(table, "2024-02  us\xe2\x86\x92in  -                    model-training"));
    assert_null(strstr(table, "\x1b")); /* no terminal escapes from the data */
    assert_null(strstr(table, "line\nbreak"));
    assert_null(strstr(table, "warning"));
    /* columns aligned: every data line of the first table has the same length in code points */
    free(table);
}

static void test_html(void **state)
{
    fixture_t f;
    busy_report(&f);
    char *html = dm_report_render(&f.rep, DM_REPORT_HTML);
    check_well_formed(html);
    assert_int_equal(count(html, "<svg xmlns=\"http://www.w3.org/2000/svg\""), 1);
    assert_null(strstr(html, "<script"));
    assert_null(strstr(html, HOSTILE));
    assert_non_null(strstr(html, "&lt;script&gt;&amp;&quot;&#39;"));
    assert_null(strstr(html, "\x1b"));
    assert_null(strstr(html, "\xff"));
    /* one bar per (month, route) with allowed transfers: 2024-01 eu>in, eu>us; 2024-02 eu>us,
     * in>us; 2024-03 us>eu, ?>eu. The refusal-only route us>in gets none. */
    int64_t sum;
    assert_int_equal(bars(html, &sum), 6);
    assert_int_equal(sum, 1017);
    assert_non_null(strstr(html, "data-month=\"2024-01\" data-route=\"eu\xe2\x86\x92us\" "
                                 "data-transfers=\"6\""));
    assert_null(strstr(html, "data-route=\"us\xe2\x86\x92in\""));
    /* the tallest bar fills the plot: 1000 transfers on a 0..1000 axis */
    assert_non_null(strstr(html, "height=\"240.0\" fill=\"#f28e2b\" data-month=\"2024-02\""));
    /* a legend entry per route with bars, one colour each */
    assert_int_equal(count(html, "<rect class=\"swatch\""), 5);
    assert_int_equal(count(html, "fill=\"#4e79a7\"/>"), 1);
    assert_int_equal(count(html, "fill=\"#f28e2b\"/>"), 1);
    assert_non_null(strstr(html, ">Month (UTC)</text>"));
    assert_non_null(strstr(html, ">Transfers (allowed)</text>"));
    /* the table: one row per report row */
    assert_int_equal(count(html, "<tr><td>2024-"), f.rep.n_rows);
    assert_non_null(strstr(html, "<td>eu-us-dpf-2023-1795</td>"));
    assert_int_equal(count(html, "&#10003; verified"), 3);
    free(html);
}

static void test_incomplete_and_damaged(void **state)
{
    fixture_t f;
    fixture_init(&f);
    add_row(&f, "2024-04", "eu", "us", "eu-us-dpf-2023-1795", "support", 3, 3, 30, 0);
    add_ledger(&f, "eu", true, true, 3);
    Domicile__V1__LedgerState *in = add_ledger(&f, "in", true, false, 9);
    in->first_bad_seq = 7;
    in->damage = DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_EDITED;
    in->detail = "entry 7 does not match its hash <b>";
    Domicile__V1__LedgerState *us = add_ledger(&f, "us", false, false, 0);
    us->detail = "could not reach region \"us\"";
    f.rep.complete = false;

    char *table = dm_report_render(&f.rep, DM_REPORT_TABLE);
    assert_non_null(strstr(table, "warning: incomplete report: the ledger of us could not be "
                                  "reached"));
    assert_non_null(strstr(table, "warning: the ledger of in does not verify (first bad seq 7)"));
    assert_non_null(strstr(table, "in      yes        NO              9              7  edited"));
    assert_non_null(strstr(table, "us      no         -               -              -  -"));
    free(table);

    char *js = dm_report_render(&f.rep, DM_REPORT_JSON);
    json_t *j = json_loads(js, 0, NULL);
    assert_non_null(j);
    assert_true(json_is_false(json_object_get(j, "complete")));
    json_t *l = json_object_get(j, "ledgers");
    assert_true(json_is_false(json_object_get(json_array_get(l, 1), "verified")));
    assert_int_equal(json_integer_value(json_object_get(json_array_get(l, 1), "first_bad_seq")), 7);
    assert_string_equal(json_string_value(json_object_get(json_array_get(l, 1), "damage")),
                        "edited");
    assert_true(json_is_null(json_object_get(json_array_get(l, 2), "verified")));
    assert_true(json_is_null(json_object_get(json_array_get(l, 2), "entries")));
    json_decref(j);
    free(js);

    char *md = dm_report_render(&f.rep, DM_REPORT_MARKDOWN);
    assert_non_null(strstr(md, "> **Warning:** incomplete report"));
    assert_non_null(strstr(md, "| in | yes | **NO** | 9 | 7 |"));
    free(md);

    char *html = dm_report_render(&f.rep, DM_REPORT_HTML);
    check_well_formed(html);
    assert_int_equal(count(html, "<p class=\"warn\">"), 2);
    assert_non_null(strstr(html, "<td class=\"bad\">&#10007; NOT verified (edited)</td>"));
    assert_non_null(strstr(html, "<td class=\"unknown\">"));
    assert_non_null(strstr(html, "<td>entry 7 does not match its hash &lt;b&gt;</td>"));
    assert_int_equal(count(html, "&#10003; verified"), 1);
    free(html);
}

/* Counts no real ledger reaches must still render, without overflow (UBSan runs this too). */
static void test_huge_counts(void **state)
{
    fixture_t f;
    fixture_init(&f);
    add_row(&f, "2024-01", "eu", "us", "b", "p", INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX);
    add_row(&f, "2024-01", "eu", "us", "c", "p", INT64_MAX, 1, 1, 1);
    add_row(&f, "2024-02", "eu", "us", "c", "p", 1, 1, 1, 1);
    add_ledger(&f, "eu", true, true, INT64_MAX);
    char *js = dm_report_render(&f.rep, DM_REPORT_JSON);
    json_t *j = json_loads(js, 0, NULL);
    assert_non_null(j);
    json_t *tot = json_object_get(j, "totals");
    assert_true(json_integer_value(json_object_get(tot, "transfers")) == INT64_MAX);
    json_decref(j);
    free(js);
    char *html = dm_report_render(&f.rep, DM_REPORT_HTML);
    int64_t sum;
    check_well_formed(html);
    assert_int_equal(bars(html, &sum), 2);
    free(html);
    for (int fmt = DM_REPORT_TABLE; fmt <= DM_REPORT_MARKDOWN; fmt++)
        free(dm_report_render(&f.rep, (dm_report_format_t)fmt));
}

static const struct {
    const char *s;
    bool ok;
    int64_t ms;
} dates[] = {
    {"1970-01-01", true, 0},
    {"2024-01-01", true, 1704067200000LL},
    {"2024-02-29", true, 1709164800000LL},
    {"2000-02-29", true, 951782400000LL},
    {"2024-12-31", true, 1735603200000LL},
    {"9999-12-31", true, 253402214400000LL},
    {"2023-02-29", false, 0},
    {"2100-02-29", false, 0},
    {"2024-04-31", false, 0},
    {"2024-13-01", false, 0},
    {"2024-00-10", false, 0},
    {"2024-01-00", false, 0},
    {"1969-12-31", false, 0},
    {"2024-1-01", false, 0},
    {"2024-01-01x", false, 0},
    {"2024/01/01", false, 0},
    {" 2024-01-01", false, 0},
    {"+024-01-01", false, 0},
    {"", false, 0},
    {NULL, false, 0},
};

static void test_parse_date(void **state)
{
    for (size_t i = 0; i < DM_ARRAY_LEN(dates); i++) {
        int64_t ms = -1;
        bool ok = dm_report_parse_date(dates[i].s, &ms);
        if (ok != dates[i].ok || (ok && ms != dates[i].ms))
            fail_msg("\"%s\": got %d %lld, want %d %lld", dates[i].s ? dates[i].s : "NULL", ok,
                     (long long)ms, dates[i].ok, (long long)dates[i].ms);
    }
}

static void test_time_and_names(void **state)
{
    char buf[32];
    assert_string_equal(dm_time_iso(0, buf, sizeof(buf)), "1970-01-01T00:00:00.000Z");
    assert_string_equal(dm_time_iso(1704067200123LL, buf, sizeof(buf)), "2024-01-01T00:00:00.123Z");
    assert_string_equal(dm_time_iso(-1, buf, sizeof(buf)), "1969-12-31T23:59:59.999Z");

    dm_report_format_t fmt;
    assert_true(dm_report_format_parse("html", &fmt) && fmt == DM_REPORT_HTML);
    assert_true(dm_report_format_parse("md", &fmt) && fmt == DM_REPORT_MARKDOWN);
    assert_true(dm_report_format_parse("csv", &fmt) && fmt == DM_REPORT_CSV);
    assert_false(dm_report_format_parse("HTML", &fmt));
    assert_false(dm_report_format_parse("pdf", &fmt));

    assert_null(dm_report_damage_name(0));
    assert_string_equal(dm_report_damage_name(DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED),
                        "deleted");
    assert_string_equal(dm_report_damage_name(99), "unknown");

    char *p = dm_report_plain("a\x1b[2Jb\tc\xc2\x9b\xff");
    assert_string_equal(p, "a\xef\xbf\xbd[2Jb\xef\xbf\xbd"
                           "c\xef\xbf\xbd\xef\xbf\xbd");
    free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty_report),
        cmocka_unit_test(test_csv_quoting),
        cmocka_unit_test(test_json_round_trip),
        cmocka_unit_test(test_markdown),
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_html),
        cmocka_unit_test(test_incomplete_and_damaged),
        cmocka_unit_test(test_huge_counts),
        cmocka_unit_test(test_parse_date),
        cmocka_unit_test(test_time_and_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
