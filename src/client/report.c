/*
 * Transfer report formatters (include/domicile/report.h).
 */
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

#include "domicile/report.h"

#define REPLACEMENT "\xef\xbf\xbd" /* U+FFFD */
#define ARROW       "\xe2\x86\x92" /* U+2192 */
#define DAY_MS      86400000LL

typedef struct sb {
    char *p; /* NUL-terminated; handed to the caller by sb_take */
    size_t len, cap;
} sb_t;

static void sb_init(sb_t *b)
{
    b->cap = 4096;
    b->len = 0;
    b->p = dm_malloc(b->cap);
    b->p[0] = '\0';
}

static void sb_putn(sb_t *b, const void *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        while (b->len + n + 1 > b->cap)
            b->cap *= 2;
        b->p = dm_realloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_puts(sb_t *b, const char *s)
{
    sb_putn(b, s, strlen(s));
}

static void sb_putc(sb_t *b, char c)
{
    sb_putn(b, &c, 1);
}

static void sb_printf(sb_t *b, const char *fmt, ...) DM_PRINTF(2, 3);

static void sb_printf(sb_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    if (n < 0)
        abort(); /* out of memory, as dm_malloc */
    sb_putn(b, s, (size_t)n);
    free(s);
}

static void sb_pad(sb_t *b, size_t n)
{
    while (n--)
        sb_putc(b, ' ');
}

/* ---- text cleaning and escaping ---------------------------------------------------------- */

typedef enum text_mode {
    TEXT_RAW,   /* invalid UTF-8 replaced, controls kept (JSON escapes them, CSV quotes them) */
    TEXT_PLAIN, /* also controls replaced: no terminal escape sequences, no broken lines */
    TEXT_MD,    /* also Markdown punctuation backslash-escaped */
    TEXT_XML,   /* also & < > " ' as character references: text and attribute values */
} text_mode_t;

/* Length of the strict UTF-8 sequence at `s` (1..4) and its code point; 0 when invalid. */
static size_t utf8_next(const unsigned char *s, uint32_t *cp)
{
    unsigned char c = s[0], lo = 0x80, hi = 0xbf;
    size_t n;
    uint32_t v;

    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xc2 && c <= 0xdf) {
        n = 2;
        v = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        v = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        v = c & 0x07;
    } else {
        return 0;
    }
    if (c == 0xe0)
        lo = 0xa0;
    else if (c == 0xed)
        hi = 0x9f;
    else if (c == 0xf0)
        lo = 0x90;
    else if (c == 0xf4)
        hi = 0x8f;
    /* A NUL fails every test below, so a truncated sequence never reads past the string. */
    if (s[1] < lo || s[1] > hi)
        return 0;
    v = v << 6 | (s[1] & 0x3f);
    for (size_t i = 2; i < n; i++) {
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
        v = v << 6 | (s[i] & 0x3f);
    }
    *cp = v;
    return n;
}

/* Appends `s` cleaned and escaped for `mode`; returns its width in code points. */
static size_t put_text(sb_t *b, const char *s, text_mode_t mode)
{
    static const char md_special[] = "\\`*_[]<>|&!~#";
    const unsigned char *p = (const unsigned char *)(s ? s : "");
    size_t chars = 0;

    while (*p) {
        uint32_t cp;
        size_t n = utf8_next(p, &cp);
        chars++;
        if (n == 0) {
            sb_puts(b, REPLACEMENT);
            p++;
            continue;
        }
        /* C1 controls included: some terminals take U+009B as CSI. U+FFFE/U+FFFF are not XML. */
        if (mode != TEXT_RAW &&
            (cp < 0x20 || (cp >= 0x7f && cp <= 0x9f) || cp == 0xfffe || cp == 0xffff)) {
            sb_puts(b, REPLACEMENT);
            p += n;
            continue;
        }
        const char *ref = NULL;
        if (mode == TEXT_XML) {
            switch (cp) {
            case '&':
                ref = "&amp;";
                break;
            case '<':
                ref = "&lt;";
                break;
            case '>':
                ref = "&gt;";
                break;
            case '"':
                ref = "&quot;";
                break;
            case '\'':
                ref = "&#39;";
                break;
            default:
                break;
            }
        } else if (mode == TEXT_MD && cp < 0x80 && strchr(md_special, (int)cp)) {
            sb_putc(b, '\\');
        }
        if (ref)
            sb_puts(b, ref);
        else
            sb_putn(b, p, n);
        p += n;
    }
    return chars;
}

/* A new string: `s` as put_text writes it; its width in code points in *chars when asked. */
static char *clean(const char *s, text_mode_t mode, size_t *chars)
{
    sb_t b;
    sb_init(&b);
    size_t n = put_text(&b, s, mode);
    if (chars)
        *chars = n;
    return b.p;
}

char *dm_report_plain(const char *s)
{
    return clean(s, TEXT_PLAIN, NULL);
}

char *dm_report_utf8(const char *s)
{
    return clean(s, TEXT_RAW, NULL);
}

/* ---- dates ------------------------------------------------------------------------------- */

bool dm_report_format_parse(const char *name, dm_report_format_t *out)
{
    static const struct {
        const char *name;
        dm_report_format_t fmt;
    } names[] = {
        {"table", DM_REPORT_TABLE},       {"csv", DM_REPORT_CSV},     {"json", DM_REPORT_JSON},
        {"markdown", DM_REPORT_MARKDOWN}, {"md", DM_REPORT_MARKDOWN}, {"html", DM_REPORT_HTML},
    };
    for (size_t i = 0; name && i < DM_ARRAY_LEN(names); i++) {
        if (strcmp(name, names[i].name) == 0) {
            *out = names[i].fmt;
            return true;
        }
    }
    return false;
}

static bool all_digits(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return true;
}

bool dm_report_parse_date(const char *s, int64_t *ms)
{
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (!s || strlen(s) != 10 || s[4] != '-' || s[7] != '-' || !all_digits(s, 4) ||
        !all_digits(s + 5, 2) || !all_digits(s + 8, 2))
        return false;
    int y = atoi(s), m = (s[5] - '0') * 10 + (s[6] - '0'), d = (s[8] - '0') * 10 + (s[9] - '0');
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (y < 1970 || m < 1 || m > 12 || d < 1 || d > mdays[m - 1] + (m == 2 && leap))
        return false;
    /* Days from the civil date (Howard Hinnant's algorithm): no timegm, no TZ dependence. */
    int yy = m <= 2 ? y - 1 : y;
    int era = yy / 400, yoe = yy - era * 400;
    int doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    int doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    int64_t days = (int64_t)era * 146097 + doe - 719468;
    *ms = days * DAY_MS;
    return true;
}

/* A window bound: the date alone at midnight UTC, else the full time. */
static char *bound_text(int64_t ms, char *buf, size_t size)
{
    dm_time_iso(ms, buf, size);
    if (ms % DAY_MS == 0 && buf[0] != '@')
        buf[10] = '\0';
    return buf;
}

/* "2024-05-01 12:34:56 UTC" */
static char *generated_text(int64_t ms, char *buf, size_t size)
{
    dm_time_iso(ms, buf, size);
    if (buf[0] != '@') {
        buf[10] = ' ';
        strcpy(buf + 19, " UTC");
    }
    return buf;
}

static char *window_text(const Domicile__V1__ReportResponse *r)
{
    char a[32], b[32];
    if (r->from_unix_ms && r->to_unix_ms)
        return dm_sprintf("%s to %s (end exclusive)", bound_text(r->from_unix_ms, a, sizeof(a)),
                          bound_text(r->to_unix_ms, b, sizeof(b)));
    if (r->from_unix_ms)
        return dm_sprintf("from %s", bound_text(r->from_unix_ms, a, sizeof(a)));
    if (r->to_unix_ms)
        return dm_sprintf("before %s", bound_text(r->to_unix_ms, b, sizeof(b)));
    return dm_strdup("all time");
}

/* ---- shared pieces ----------------------------------------------------------------------- */

typedef struct totals {
    int64_t transfers, records, bytes, refusals;
} totals_t;

/* Sums of counts a server sent: saturate rather than overflow (UB) on absurd values. */
static int64_t sat_add(int64_t a, int64_t b)
{
    int64_t r;
    if (__builtin_add_overflow(a, b, &r))
        return b > 0 ? INT64_MAX : INT64_MIN;
    return r;
}

static totals_t totals_of(const Domicile__V1__ReportResponse *r)
{
    totals_t t = {0, 0, 0, 0};
    for (size_t i = 0; i < r->n_rows; i++) {
        t.transfers = sat_add(t.transfers, r->rows[i]->transfers);
        t.records = sat_add(t.records, r->rows[i]->records);
        t.bytes = sat_add(t.bytes, r->rows[i]->bytes);
        t.refusals = sat_add(t.refusals, r->rows[i]->refusals);
    }
    return t;
}

const char *dm_report_damage_name(int damage)
{
    static const char *const names[] = {
        [DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_NONE] = "none",
        [DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_EDITED] = "edited",
        [DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED] = "deleted",
        [DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_INSERTED] = "inserted",
        [DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_REORDERED] = "reordered",
        [DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_CHECKPOINT_INVALID] = "checkpoint-invalid",
    };
    if (damage == DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_UNSPECIFIED)
        return NULL;
    if (damage < 0 || (size_t)damage >= DM_ARRAY_LEN(names) || !names[damage])
        return "unknown";
    return names[damage];
}

/* Warnings shared by the table, Markdown and HTML outputs, as plain text lines. */
static char **warnings_of(const Domicile__V1__ReportResponse *r, size_t *n)
{
    char **w = dm_calloc(r->n_ledgers + 1, sizeof(*w));
    size_t k = 0;
    if (!r->complete) {
        sb_t b;
        sb_init(&b);
        sb_puts(&b, "incomplete report: the ledger of");
        size_t down = 0;
        for (size_t i = 0; i < r->n_ledgers; i++) {
            if (r->ledgers[i]->reachable)
                continue;
            sb_puts(&b, down++ ? ", " : " ");
            put_text(&b, r->ledgers[i]->region, TEXT_RAW);
        }
        if (down == 0)
            sb_puts(&b, " a region");
        sb_puts(&b, " could not be reached; its transfers are missing from the rows");
        w[k++] = b.p;
    }
    for (size_t i = 0; i < r->n_ledgers && k < r->n_ledgers + 1; i++) {
        const Domicile__V1__LedgerState *s = r->ledgers[i];
        if (s->reachable && !s->verified)
            w[k++] = dm_sprintf("the ledger of %s does not verify (first bad seq %lld)", s->region,
                                (long long)s->first_bad_seq);
    }
    *n = k;
    return w;
}

static void free_strings(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

/* ---- table ------------------------------------------------------------------------------- */

typedef struct grid {
    size_t ncols, nrows, cap;
    char **cells;      /* nrows * ncols cleaned strings; NULL = a separator row */
    size_t *width;     /* per column, in code points */
    size_t *cellw;     /* per cell */
    const bool *right; /* per column: right-aligned */
} grid_t;

static void grid_init(grid_t *g, size_t ncols, const bool *right)
{
    memset(g, 0, sizeof(*g));
    g->ncols = ncols;
    g->right = right;
    g->width = dm_calloc(ncols, sizeof(*g->width));
}

static void grid_row(grid_t *g, const char *const *values)
{
    if (g->nrows == g->cap) {
        g->cap = g->cap ? g->cap * 2 : 16;
        g->cells = dm_realloc(g->cells, g->cap * g->ncols * sizeof(*g->cells));
        g->cellw = dm_realloc(g->cellw, g->cap * g->ncols * sizeof(*g->cellw));
    }
    for (size_t c = 0; c < g->ncols; c++) {
        size_t k = g->nrows * g->ncols + c;
        g->cells[k] = values ? clean(values[c], TEXT_PLAIN, &g->cellw[k]) : NULL;
        if (!values)
            g->cellw[k] = 0;
        if (g->cellw[k] > g->width[c])
            g->width[c] = g->cellw[k];
    }
    g->nrows++;
}

static void grid_put(sb_t *b, grid_t *g)
{
    size_t total = 0;
    for (size_t c = 0; c < g->ncols; c++)
        total += g->width[c] + (c ? 2 : 0);
    for (size_t r = 0; r < g->nrows; r++) {
        if (!g->cells[r * g->ncols]) {
            for (size_t i = 0; i < total; i++)
                sb_putc(b, '-');
            sb_putc(b, '\n');
            continue;
        }
        for (size_t c = 0; c < g->ncols; c++) {
            size_t k = r * g->ncols + c, pad = g->width[c] - g->cellw[k];
            bool last = c + 1 == g->ncols;
            if (c)
                sb_puts(b, "  ");
            if (g->right[c])
                sb_pad(b, pad);
            sb_puts(b, g->cells[k]);
            if (!g->right[c] && !last)
                sb_pad(b, pad);
        }
        /* No trailing blanks when the last column is short or empty. */
        while (b->len && b->p[b->len - 1] == ' ')
            b->p[--b->len] = '\0';
        sb_putc(b, '\n');
    }
}

static void grid_dispose(grid_t *g)
{
    for (size_t i = 0; i < g->nrows * g->ncols; i++)
        free(g->cells[i]);
    free(g->cells);
    free(g->cellw);
    free(g->width);
}

static const char *yes_no(bool v)
{
    return v ? "yes" : "no";
}

static void render_table(sb_t *b, const Domicile__V1__ReportResponse *r)
{
    static const bool rright[] = {false, false, false, false, true, true, true, true};
    static const bool lright[] = {false, false, false, true, true, false, false};
    char gen[40], *win = window_text(r);
    size_t nw;
    char **warn = warnings_of(r, &nw);
    totals_t t = totals_of(r);

    sb_printf(b, "Cross-border transfer report\ngenerated %s; window: %s\n",
              generated_text(r->generated_at_unix_ms, gen, sizeof(gen)), win);
    for (size_t i = 0; i < nw; i++) {
        sb_puts(b, "warning: ");
        put_text(b, warn[i], TEXT_PLAIN);
        sb_putc(b, '\n');
    }
    sb_putc(b, '\n');

    grid_t g;
    grid_init(&g, 8, rright);
    const char *head[] = {"month",     "route",   "basis", "purpose",
                          "transfers", "records", "bytes", "refusals"};
    grid_row(&g, head);
    grid_row(&g, NULL);
    for (size_t i = 0; i < r->n_rows; i++) {
        const Domicile__V1__ReportRow *w = r->rows[i];
        char *route = dm_sprintf("%s" ARROW "%s", w->from_region, w->to_region);
        char *n[4] = {
            dm_sprintf("%lld", (long long)w->transfers),
            dm_sprintf("%lld", (long long)w->records),
            dm_sprintf("%lld", (long long)w->bytes),
            dm_sprintf("%lld", (long long)w->refusals),
        };
        const char *v[] = {w->month,   route, w->basis_id[0] ? w->basis_id : "-",
                           w->purpose, n[0],  n[1],
                           n[2],       n[3]};
        grid_row(&g, v);
        free(route);
        for (size_t k = 0; k < 4; k++)
            free(n[k]);
    }
    if (r->n_rows == 0) {
        const char *v[] = {"(no transfers in this window)", "", "", "", "", "", "", ""};
        grid_row(&g, v);
    }
    grid_row(&g, NULL);
    char *tn[4] = {
        dm_sprintf("%lld", (long long)t.transfers),
        dm_sprintf("%lld", (long long)t.records),
        dm_sprintf("%lld", (long long)t.bytes),
        dm_sprintf("%lld", (long long)t.refusals),
    };
    const char *tv[] = {"total", "", "", "", tn[0], tn[1], tn[2], tn[3]};
    grid_row(&g, tv);
    for (size_t k = 0; k < 4; k++)
        free(tn[k]);
    grid_put(b, &g);
    grid_dispose(&g);

    sb_puts(b, "\nledgers\n");
    grid_init(&g, 7, lright);
    const char *lhead[] = {"region",        "reachable", "verified", "entries",
                           "first bad seq", "damage",    "detail"};
    grid_row(&g, lhead);
    grid_row(&g, NULL);
    for (size_t i = 0; i < r->n_ledgers; i++) {
        const Domicile__V1__LedgerState *s = r->ledgers[i];
        char *entries = dm_sprintf("%lld", (long long)s->entries);
        char *bad = dm_sprintf("%lld", (long long)s->first_bad_seq);
        const char *dmg = dm_report_damage_name(s->damage);
        const char *v[] = {s->region,
                           yes_no(s->reachable),
                           !s->reachable ? "-"
                           : s->verified ? "yes"
                                         : "NO",
                           s->reachable ? entries : "-",
                           s->reachable && !s->verified ? bad : "-",
                           dmg && s->reachable ? dmg : "-",
                           s->detail};
        grid_row(&g, v);
        free(entries);
        free(bad);
    }
    grid_put(b, &g);
    grid_dispose(&g);
    free_strings(warn, nw);
    free(win);
}

/* ---- CSV --------------------------------------------------------------------------------- */

static void put_csv_field(sb_t *b, const char *s, bool last)
{
    char *c = clean(s, TEXT_RAW, NULL);
    if (c[strcspn(c, ",\"\r\n")] == '\0') {
        sb_puts(b, c);
    } else {
        sb_putc(b, '"');
        for (const char *p = c; *p; p++) {
            if (*p == '"')
                sb_putc(b, '"');
            sb_putc(b, *p);
        }
        sb_putc(b, '"');
    }
    sb_puts(b, last ? "\r\n" : ",");
    free(c);
}

static void render_csv(sb_t *b, const Domicile__V1__ReportResponse *r)
{
    sb_puts(b, "month,from_region,to_region,basis_id,purpose,transfers,records,bytes,refusals\r\n");
    for (size_t i = 0; i < r->n_rows; i++) {
        const Domicile__V1__ReportRow *w = r->rows[i];
        put_csv_field(b, w->month, false);
        put_csv_field(b, w->from_region, false);
        put_csv_field(b, w->to_region, false);
        put_csv_field(b, w->basis_id, false);
        put_csv_field(b, w->purpose, false);
        sb_printf(b, "%lld,%lld,%lld,%lld\r\n", (long long)w->transfers, (long long)w->records,
                  (long long)w->bytes, (long long)w->refusals);
    }
}

/* ---- JSON -------------------------------------------------------------------------------- */

static json_t *jstr(const char *s)
{
    char *c = clean(s, TEXT_RAW, NULL);
    json_t *j = json_string(c); /* valid UTF-8 by construction: NULL only when out of memory */
    free(c);
    if (!j)
        abort();
    return j;
}

static json_t *jbound(int64_t ms)
{
    char buf[32];
    return ms ? jstr(bound_text(ms, buf, sizeof(buf))) : json_null();
}

static void render_json(sb_t *b, const Domicile__V1__ReportResponse *r)
{
    char gen[32];
    totals_t t = totals_of(r);
    json_t *o = json_object(), *rows = json_array(), *ledgers = json_array();
    json_t *tot = json_object();

    json_object_set_new(o, "generated_at",
                        jstr(dm_time_iso(r->generated_at_unix_ms, gen, sizeof(gen))));
    json_object_set_new(o, "generated_at_unix_ms", json_integer(r->generated_at_unix_ms));
    json_object_set_new(o, "from", jbound(r->from_unix_ms));
    json_object_set_new(o, "to", jbound(r->to_unix_ms));
    json_object_set_new(o, "from_unix_ms", json_integer(r->from_unix_ms));
    json_object_set_new(o, "to_unix_ms", json_integer(r->to_unix_ms));
    json_object_set_new(o, "complete", json_boolean(r->complete));
    json_object_set_new(tot, "transfers", json_integer(t.transfers));
    json_object_set_new(tot, "records", json_integer(t.records));
    json_object_set_new(tot, "bytes", json_integer(t.bytes));
    json_object_set_new(tot, "refusals", json_integer(t.refusals));
    json_object_set_new(o, "totals", tot);
    for (size_t i = 0; i < r->n_rows; i++) {
        const Domicile__V1__ReportRow *w = r->rows[i];
        json_t *j = json_object();
        json_object_set_new(j, "month", jstr(w->month));
        json_object_set_new(j, "from_region", jstr(w->from_region));
        json_object_set_new(j, "to_region", jstr(w->to_region));
        json_object_set_new(j, "basis_id", jstr(w->basis_id));
        json_object_set_new(j, "purpose", jstr(w->purpose));
        json_object_set_new(j, "transfers", json_integer(w->transfers));
        json_object_set_new(j, "records", json_integer(w->records));
        json_object_set_new(j, "bytes", json_integer(w->bytes));
        json_object_set_new(j, "refusals", json_integer(w->refusals));
        json_array_append_new(rows, j);
    }
    json_object_set_new(o, "rows", rows);
    for (size_t i = 0; i < r->n_ledgers; i++) {
        const Domicile__V1__LedgerState *s = r->ledgers[i];
        const char *dmg = dm_report_damage_name(s->damage);
        json_t *j = json_object();
        /* Unknown values of an unreachable region are null, not zero. */
        json_object_set_new(j, "region", jstr(s->region));
        json_object_set_new(j, "reachable", json_boolean(s->reachable));
        json_object_set_new(j, "verified", s->reachable ? json_boolean(s->verified) : json_null());
        json_object_set_new(j, "entries", s->reachable ? json_integer(s->entries) : json_null());
        json_object_set_new(j, "first_bad_seq",
                            s->reachable ? json_integer(s->first_bad_seq) : json_null());
        json_object_set_new(j, "sealed_up_to_seq",
                            s->reachable ? json_integer(s->sealed_up_to_seq) : json_null());
        json_object_set_new(j, "damage", dmg && s->reachable ? jstr(dmg) : json_null());
        json_object_set_new(j, "detail", jstr(s->detail));
        json_array_append_new(ledgers, j);
    }
    json_object_set_new(o, "ledgers", ledgers);
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (!text)
        abort();
    sb_puts(b, text);
    sb_putc(b, '\n');
    free(text);
    json_decref(o);
}

/* ---- Markdown ---------------------------------------------------------------------------- */

static void md_cell(sb_t *b, const char *s)
{
    sb_puts(b, " ");
    put_text(b, s, TEXT_MD);
    sb_puts(b, " |");
}

static void render_markdown(sb_t *b, const Domicile__V1__ReportResponse *r)
{
    char gen[40], *win = window_text(r);
    size_t nw;
    char **warn = warnings_of(r, &nw);
    totals_t t = totals_of(r);

    sb_puts(b, "# Cross-border transfer report\n\nGenerated ");
    put_text(b, generated_text(r->generated_at_unix_ms, gen, sizeof(gen)), TEXT_MD);
    sb_puts(b, ". Window: ");
    put_text(b, win, TEXT_MD);
    sb_puts(b, ".\n\n");
    for (size_t i = 0; i < nw; i++) {
        sb_puts(b, "> **Warning:** ");
        put_text(b, warn[i], TEXT_MD);
        sb_puts(b, "\n\n");
    }
    sb_puts(b, "## Transfers by month, route, basis and purpose\n\n"
               "| Month | Route | Basis | Purpose | Transfers | Records | Bytes | Refusals |\n"
               "|---|---|---|---|--:|--:|--:|--:|\n");
    for (size_t i = 0; i < r->n_rows; i++) {
        const Domicile__V1__ReportRow *w = r->rows[i];
        char *route = dm_sprintf("%s" ARROW "%s", w->from_region, w->to_region);
        sb_putc(b, '|');
        md_cell(b, w->month);
        md_cell(b, route);
        md_cell(b, w->basis_id[0] ? w->basis_id : "-");
        md_cell(b, w->purpose);
        sb_printf(b, " %lld | %lld | %lld | %lld |\n", (long long)w->transfers,
                  (long long)w->records, (long long)w->bytes, (long long)w->refusals);
        free(route);
    }
    if (r->n_rows == 0)
        sb_puts(b, "| *no transfers in this window* | | | | | | | |\n");
    sb_printf(b, "| **Total** | | | | **%lld** | **%lld** | **%lld** | **%lld** |\n\n",
              (long long)t.transfers, (long long)t.records, (long long)t.bytes,
              (long long)t.refusals);

    sb_puts(b, "## Ledger verification\n\n"
               "| Region | Reachable | Verified | Entries | First bad seq | Detail |\n"
               "|---|---|---|--:|--:|---|\n");
    for (size_t i = 0; i < r->n_ledgers; i++) {
        const Domicile__V1__LedgerState *s = r->ledgers[i];
        sb_putc(b, '|');
        md_cell(b, s->region);
        md_cell(b, yes_no(s->reachable));
        sb_puts(b, !s->reachable ? " unknown |" : s->verified ? " yes |" : " **NO** |");
        if (s->reachable)
            sb_printf(b, " %lld |", (long long)s->entries);
        else
            sb_puts(b, " - |");
        if (s->reachable && !s->verified)
            sb_printf(b, " %lld |", (long long)s->first_bad_seq);
        else
            sb_puts(b, " - |");
        md_cell(b, s->detail);
        sb_putc(b, '\n');
    }
    free_strings(warn, nw);
    free(win);
}

/* ---- HTML and its SVG chart -------------------------------------------------------------- */

typedef struct route {
    const char *from, *to; /* owned by the report */
} route_t;

static int cmp_route(const void *a, const void *b)
{
    const route_t *x = a, *y = b;
    int c = strcmp(x->from, y->from);
    return c ? c : strcmp(x->to, y->to);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

typedef struct chart {
    const char **months; /* sorted, unique; strings owned by the report */
    size_t nmonths;
    route_t *routes; /* sorted, unique; routes with at least one allowed transfer */
    size_t nroutes;
    int64_t *value; /* nmonths * nroutes: allowed transfers */
} chart_t;

static ssize_t find_route(const chart_t *c, const char *from, const char *to)
{
    route_t key = {from, to};
    route_t *hit =
        c->nroutes ? bsearch(&key, c->routes, c->nroutes, sizeof(*c->routes), cmp_route) : NULL;
    return hit ? hit - c->routes : -1;
}

static void chart_init(chart_t *c, const Domicile__V1__ReportResponse *r)
{
    size_t n = r->n_rows;
    c->months = dm_calloc(n + 1, sizeof(*c->months));
    c->routes = dm_calloc(n + 1, sizeof(*c->routes));
    c->nmonths = c->nroutes = 0;
    for (size_t i = 0; i < n; i++) {
        c->months[c->nmonths++] = r->rows[i]->month;
        if (r->rows[i]->transfers > 0)
            c->routes[c->nroutes++] = (route_t){r->rows[i]->from_region, r->rows[i]->to_region};
    }
    qsort(c->months, c->nmonths, sizeof(*c->months), cmp_str);
    qsort(c->routes, c->nroutes, sizeof(*c->routes), cmp_route);
    size_t k = 0;
    for (size_t i = 0; i < c->nmonths; i++)
        if (k == 0 || strcmp(c->months[k - 1], c->months[i]) != 0)
            c->months[k++] = c->months[i];
    c->nmonths = k;
    k = 0;
    for (size_t i = 0; i < c->nroutes; i++)
        if (k == 0 || cmp_route(&c->routes[k - 1], &c->routes[i]) != 0)
            c->routes[k++] = c->routes[i];
    c->nroutes = k;
    c->value = dm_calloc(c->nmonths * c->nroutes + 1, sizeof(*c->value));
    for (size_t i = 0; i < n; i++) {
        const Domicile__V1__ReportRow *w = r->rows[i];
        ssize_t ri = find_route(c, w->from_region, w->to_region);
        const char **m = bsearch(&w->month, c->months, c->nmonths, sizeof(*c->months), cmp_str);
        if (ri >= 0 && m && w->transfers > 0) {
            int64_t *v = &c->value[(size_t)(m - c->months) * c->nroutes + (size_t)ri];
            *v = sat_add(*v, w->transfers);
        }
    }
}

static void chart_dispose(chart_t *c)
{
    free(c->months);
    free(c->routes);
    free(c->value);
}

/* Colour of route i: a colour-blind-friendly palette, then golden-angle hues. */
static void route_colour(size_t i, char *buf, size_t size)
{
    static const char *const palette[] = {"#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1",
                                          "#76b7b2", "#edc948", "#9c755f", "#ff9da7", "#bab0ac"};
    if (i < DM_ARRAY_LEN(palette))
        snprintf(buf, size, "%s", palette[i]);
    else
        snprintf(buf, size, "hsl(%u,55%%,45%%)", (unsigned)((i * 137) % 360));
}

/* Smallest step of 1, 2, 5 x 10^k that covers `max` (>= 1) in at most 5 ticks. Written so
 * that no intermediate overflows, whatever the counts: base stays <= 10^18. */
static int64_t tick_step(int64_t max)
{
    static const int64_t mult[] = {1, 2, 5};
    for (int64_t base = 1;; base *= 10) {
        for (size_t i = 0; i < DM_ARRAY_LEN(mult); i++) {
            int64_t s = base * mult[i];
            if ((max - 1) / s + 1 <= 5)
                return s;
        }
    }
}

#define SVG_ML   72.0  /* left margin: tick labels and the y axis title */
#define SVG_MT   16.0  /* top margin */
#define SVG_PH   240.0 /* plot height */
#define SVG_MINW 400.0 /* minimum plot width */
#define SVG_CHAR 7.0   /* approximate width of one character at font-size 12 */

static void render_svg(sb_t *b, const chart_t *c)
{
    /* Bars are packed per month, so the busiest month sets the width of the groups. */
    size_t most = 0;
    for (size_t m = 0; m < c->nmonths; m++) {
        size_t present = 0;
        for (size_t ri = 0; ri < c->nroutes; ri++)
            present += c->value[m * c->nroutes + ri] > 0;
        most = present > most ? present : most;
    }
    double bw = most <= 4 ? 24.0 : (most <= 10 ? 14.0 : 8.0);
    double gw = (double)most * bw + 24.0;
    size_t groups = c->nmonths ? c->nmonths : 1;
    if (gw < 64.0)
        gw = 64.0;
    if (gw * (double)groups < SVG_MINW)
        gw = SVG_MINW / (double)groups;
    double pw = gw * (double)groups, width = SVG_ML + pw + 24.0;
    double base = SVG_MT + SVG_PH;

    /* Legend items laid out in rows under the x axis title. */
    double lx = SVG_ML, ly = base + 64.0;
    double *ix = dm_calloc(c->nroutes + 1, sizeof(*ix)),
           *iy = dm_calloc(c->nroutes + 1, sizeof(*iy));
    char **label = dm_calloc(c->nroutes + 1, sizeof(*label));
    for (size_t i = 0; i < c->nroutes; i++) {
        size_t chars;
        char *raw = dm_sprintf("%s" ARROW "%s", c->routes[i].from, c->routes[i].to);
        label[i] = clean(raw, TEXT_XML, NULL);
        free(clean(raw, TEXT_PLAIN, &chars));
        free(raw);
        double w = 18.0 + SVG_CHAR * (double)chars + 24.0;
        if (lx > SVG_ML && lx + w > width - 8.0) {
            lx = SVG_ML;
            ly += 20.0;
        }
        ix[i] = lx;
        iy[i] = ly;
        lx += w;
    }
    double height = (c->nroutes ? ly : base + 48.0) + 20.0;

    int64_t vmax = 0;
    for (size_t i = 0; i < c->nmonths * c->nroutes; i++)
        if (c->value[i] > vmax)
            vmax = c->value[i];
    int64_t step = tick_step(vmax > 0 ? vmax : 1);
    int64_t ticks = vmax > 0 ? (vmax - 1) / step + 1 : 1;
    double ymax = (double)ticks * (double)step; /* in double: 5 x 2*10^18 overflows int64 */

    sb_printf(b,
              "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\" width=\"%.0f\" "
              "height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" role=\"img\" "
              "aria-labelledby=\"chart-title\" font-family=\"sans-serif\" font-size=\"12\">\n",
              width, height, width, height);
    sb_puts(b, "<title id=\"chart-title\">Allowed transfers per month and route</title>\n");
    sb_printf(b,
              "<rect class=\"plot\" x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
              "fill=\"#fafafa\"/>\n",
              SVG_ML, SVG_MT, pw, SVG_PH);
    for (int64_t k = 0; k <= ticks; k++) {
        double v = (double)k * (double)step, y = base - v * SVG_PH / ymax;
        sb_printf(b,
                  "<line class=\"grid\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
                  "stroke=\"#dddddd\"/>\n<text class=\"tick\" x=\"%.1f\" y=\"%.1f\" "
                  "text-anchor=\"end\">%.0f</text>\n",
                  SVG_ML, y, SVG_ML + pw, y, SVG_ML - 6.0, y + 4.0, v);
    }
    for (size_t m = 0; m < c->nmonths; m++) {
        double gx = SVG_ML + (double)m * gw;
        size_t present = 0, slot = 0;
        for (size_t ri = 0; ri < c->nroutes; ri++)
            present += c->value[m * c->nroutes + ri] > 0;
        /* A month's bars sit together, centred: the colour, not the slot, names the route. */
        double x0 = gx + (gw - (double)present * bw) / 2.0;
        for (size_t ri = 0; ri < c->nroutes; ri++) {
            int64_t v = c->value[m * c->nroutes + ri];
            if (v <= 0)
                continue;
            double h = (double)v * SVG_PH / ymax;
            if (h < 1.0)
                h = 1.0; /* a small count against a large one stays visible */
            char colour[32];
            route_colour(ri, colour, sizeof(colour));
            sb_printf(b,
                      "<rect class=\"bar\" x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
                      "fill=\"%s\" data-month=\"",
                      x0 + (double)slot++ * bw + 1.0, base - h, bw - 2.0, h, colour);
            put_text(b, c->months[m], TEXT_XML);
            sb_printf(b, "\" data-route=\"%s\" data-transfers=\"%lld\"><title>", label[ri],
                      (long long)v);
            put_text(b, c->months[m], TEXT_XML);
            sb_printf(b, " %s: %lld transfer%s</title></rect>\n", label[ri], (long long)v,
                      v == 1 ? "" : "s");
            char num[24];
            int digits = snprintf(num, sizeof(num), "%lld", (long long)v);
            if ((double)digits * 6.0 <= bw) /* the count over its bar, where it fits */
                sb_printf(b,
                          "<text class=\"value\" x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" "
                          "font-size=\"10\">%s</text>\n",
                          x0 + (double)(slot - 1) * bw + bw / 2.0, base - h - 3.0, num);
        }
        sb_printf(b, "<text class=\"month\" x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">",
                  gx + gw / 2.0, base + 18.0);
        put_text(b, c->months[m], TEXT_XML);
        sb_puts(b, "</text>\n");
    }
    if (c->nmonths == 0 || c->nroutes == 0)
        sb_printf(b,
                  "<text class=\"empty\" x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" "
                  "fill=\"#666666\">No allowed transfers in this window</text>\n",
                  SVG_ML + pw / 2.0, SVG_MT + SVG_PH / 2.0);
    sb_printf(b,
              "<line class=\"axis\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
              "stroke=\"#333333\"/>\n<line class=\"axis\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" "
              "y2=\"%.1f\" stroke=\"#333333\"/>\n",
              SVG_ML, base, SVG_ML + pw, base, SVG_ML, SVG_MT, SVG_ML, base);
    sb_printf(b,
              "<text class=\"axis-label\" x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">Month "
              "(UTC)</text>\n<text class=\"axis-label\" x=\"16\" y=\"%.1f\" "
              "text-anchor=\"middle\" transform=\"rotate(-90 16 %.1f)\">Transfers "
              "(allowed)</text>\n",
              SVG_ML + pw / 2.0, base + 40.0, SVG_MT + SVG_PH / 2.0, SVG_MT + SVG_PH / 2.0);
    if (c->nroutes)
        sb_puts(b, "<g class=\"legend\">\n");
    for (size_t i = 0; i < c->nroutes; i++) {
        char colour[32];
        route_colour(i, colour, sizeof(colour));
        sb_printf(b,
                  "<rect class=\"swatch\" x=\"%.1f\" y=\"%.1f\" width=\"12\" height=\"12\" "
                  "fill=\"%s\"/><text x=\"%.1f\" y=\"%.1f\">%s</text>\n",
                  ix[i], iy[i] - 10.0, colour, ix[i] + 18.0, iy[i], label[i]);
    }
    if (c->nroutes)
        sb_puts(b, "</g>\n");
    sb_puts(b, "</svg>\n");
    free_strings(label, c->nroutes);
    free(ix);
    free(iy);
}

static void html_td(sb_t *b, const char *cls, const char *s)
{
    if (cls)
        sb_printf(b, "<td class=\"%s\">", cls);
    else
        sb_puts(b, "<td>");
    put_text(b, s, TEXT_XML);
    sb_puts(b, "</td>");
}

static const char html_css[] =
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;"
    "max-width:1100px;padding:0 1em;color:#222222;line-height:1.4}"
    "h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em}"
    ".meta{color:#555555;margin-top:0}"
    ".warn{background:#fff4e5;border-left:4px solid #e67e22;padding:.5em .8em}"
    "table{border-collapse:collapse;margin:.5em 0}"
    "th,td{border:1px solid #d0d0d0;padding:.3em .6em;text-align:left;vertical-align:top}"
    "th{background:#f0f0f0}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}"
    "tfoot th{background:#f7f7f7}td.empty{color:#666666;font-style:italic}"
    ".sw{display:inline-block;width:.8em;height:.8em;margin-right:.4em;vertical-align:baseline}"
    ".ok{color:#1b7a33;font-weight:600}.bad{color:#b00020;font-weight:700;background:#fdecee}"
    ".unknown{color:#8a5a00;font-weight:600;background:#fff4e5}"
    "svg.chart{max-width:100%;height:auto;display:block}";

static void render_html(sb_t *b, const Domicile__V1__ReportResponse *r)
{
    char gen[40], iso[32], *win = window_text(r);
    size_t nw;
    char **warn = warnings_of(r, &nw);
    totals_t t = totals_of(r);
    chart_t c;
    chart_init(&c, r);

    /* Well-formed XML as well as HTML5: the only entities used are XML's own. The CSP keeps
     * any script out even if an escape were ever missed. */
    sb_puts(b, "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n"
               "<head>\n<meta charset=\"utf-8\"/>\n"
               "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
               "style-src 'unsafe-inline'\"/>\n"
               "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\n"
               "<meta name=\"generator\" content=\"domicilectl\"/>\n<title>");
    sb_puts(b, "Domicile transfer report, ");
    put_text(b, win, TEXT_XML);
    sb_printf(b, "</title>\n<style>%s</style>\n</head>\n<body>\n", html_css);
    sb_puts(b, "<h1>Cross-border transfer report</h1>\n<p class=\"meta\">Generated <time "
               "datetime=\"");
    put_text(b, dm_time_iso(r->generated_at_unix_ms, iso, sizeof(iso)), TEXT_XML);
    sb_puts(b, "\">");
    put_text(b, generated_text(r->generated_at_unix_ms, gen, sizeof(gen)), TEXT_XML);
    sb_puts(b, "</time> &#183; window: ");
    put_text(b, win, TEXT_XML);
    sb_printf(b,
              " &#183; %lld transfer%s, %lld records, %lld bytes, %lld refusal%s"
              "</p>\n",
              (long long)t.transfers, t.transfers == 1 ? "" : "s", (long long)t.records,
              (long long)t.bytes, (long long)t.refusals, t.refusals == 1 ? "" : "s");
    for (size_t i = 0; i < nw; i++) {
        sb_puts(b, "<p class=\"warn\"><strong>Warning:</strong> ");
        put_text(b, warn[i], TEXT_XML);
        sb_puts(b, "</p>\n");
    }

    sb_puts(b, "<section>\n<h2>Allowed transfers per month and route</h2>\n");
    render_svg(b, &c);
    sb_puts(b, "</section>\n");

    sb_puts(b, "<section>\n<h2>Transfers by month, route, basis and purpose</h2>\n"
               "<table class=\"rows\">\n<thead><tr><th>Month</th><th>Route</th><th>Basis</th>"
               "<th>Purpose</th><th class=\"num\">Transfers</th><th class=\"num\">Records</th>"
               "<th class=\"num\">Bytes</th><th class=\"num\">Refusals</th></tr></thead>\n"
               "<tbody>\n");
    for (size_t i = 0; i < r->n_rows; i++) {
        const Domicile__V1__ReportRow *w = r->rows[i];
        sb_puts(b, "<tr>");
        html_td(b, NULL, w->month);
        sb_puts(b, "<td>");
        ssize_t ri = find_route(&c, w->from_region, w->to_region);
        if (ri >= 0) {
            char colour[32];
            route_colour((size_t)ri, colour, sizeof(colour));
            sb_printf(b, "<span class=\"sw\" style=\"background:%s\"></span>", colour);
        }
        put_text(b, w->from_region, TEXT_XML);
        sb_puts(b, ARROW);
        put_text(b, w->to_region, TEXT_XML);
        sb_puts(b, "</td>");
        html_td(b, NULL, w->basis_id[0] ? w->basis_id : "-");
        html_td(b, NULL, w->purpose);
        sb_printf(b,
                  "<td class=\"num\">%lld</td><td class=\"num\">%lld</td><td "
                  "class=\"num\">%lld</td><td class=\"num\">%lld</td></tr>\n",
                  (long long)w->transfers, (long long)w->records, (long long)w->bytes,
                  (long long)w->refusals);
    }
    if (r->n_rows == 0)
        sb_puts(b, "<tr><td colspan=\"8\" class=\"empty\">No transfers in this window</td></tr>\n");
    sb_printf(b,
              "</tbody>\n<tfoot><tr><th colspan=\"4\">Total</th><th class=\"num\">%lld</th>"
              "<th class=\"num\">%lld</th><th class=\"num\">%lld</th><th "
              "class=\"num\">%lld</th></tr></tfoot>\n</table>\n</section>\n",
              (long long)t.transfers, (long long)t.records, (long long)t.bytes,
              (long long)t.refusals);

    sb_puts(b, "<section>\n<h2>Ledger verification</h2>\n<table class=\"ledgers\">\n"
               "<thead><tr><th>Region</th><th>State</th><th class=\"num\">Entries</th>"
               "<th class=\"num\">Sealed up to</th><th class=\"num\">First bad seq</th>"
               "<th>Detail</th></tr></thead>\n<tbody>\n");
    for (size_t i = 0; i < r->n_ledgers; i++) {
        const Domicile__V1__LedgerState *s = r->ledgers[i];
        sb_puts(b, "<tr>");
        html_td(b, NULL, s->region);
        if (!s->reachable) {
            sb_puts(b, "<td class=\"unknown\">&#9888; unreachable: not verified</td>"
                       "<td class=\"num\">-</td><td class=\"num\">-</td><td class=\"num\">-</td>");
        } else {
            const char *dmg = dm_report_damage_name(s->damage);
            if (s->verified)
                sb_puts(b, "<td class=\"ok\">&#10003; verified</td>");
            else if (dmg)
                sb_printf(b, "<td class=\"bad\">&#10007; NOT verified (%s)</td>", dmg);
            else
                sb_puts(b, "<td class=\"bad\">&#10007; NOT verified</td>");
            sb_printf(b, "<td class=\"num\">%lld</td><td class=\"num\">%lld</td>",
                      (long long)s->entries, (long long)s->sealed_up_to_seq);
            if (s->verified)
                sb_puts(b, "<td class=\"num\">-</td>");
            else
                sb_printf(b, "<td class=\"num\">%lld</td>", (long long)s->first_bad_seq);
        }
        html_td(b, NULL, s->detail);
        sb_puts(b, "</tr>\n");
    }
    sb_puts(b, "</tbody>\n</table>\n</section>\n</body>\n</html>\n");
    chart_dispose(&c);
    free_strings(warn, nw);
    free(win);
}

char *dm_report_render(const Domicile__V1__ReportResponse *rep, dm_report_format_t fmt)
{
    sb_t b;
    sb_init(&b);
    switch (fmt) {
    case DM_REPORT_TABLE:
        render_table(&b, rep);
        break;
    case DM_REPORT_CSV:
        render_csv(&b, rep);
        break;
    case DM_REPORT_JSON:
        render_json(&b, rep);
        break;
    case DM_REPORT_MARKDOWN:
        render_markdown(&b, rep);
        break;
    case DM_REPORT_HTML:
        render_html(&b, rep);
        break;
    }
    return b.p;
}
