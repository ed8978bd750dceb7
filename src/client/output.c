/*
 * Records for people and scripts (include/domicile/output.h).
 */
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "domicile/output.h"
#include "domicile/report.h"

#define TABLE_HOLD 1000 /* rows that fix the table's column widths */
#define TABLE_GAP  3    /* blanks between columns, as kubectl */

/* ---- formats ------------------------------------------------------------------------------ */

static const char *const format_names[] = {
    [DM_OUTPUT_TABLE] = "table", [DM_OUTPUT_WIDE] = "wide",   [DM_OUTPUT_TSV] = "tsv",
    [DM_OUTPUT_JSON] = "json",   [DM_OUTPUT_JSONL] = "jsonl",
};

bool dm_output_format_parse(const char *name, dm_output_format_t *out)
{
    for (size_t i = 0; name && i < DM_ARRAY_LEN(format_names); i++) {
        if (strcmp(name, format_names[i]) == 0) {
            *out = (dm_output_format_t)i;
            return true;
        }
    }
    return false;
}

const char *dm_output_format_name(dm_output_format_t fmt)
{
    return (size_t)fmt < DM_ARRAY_LEN(format_names) ? format_names[fmt] : "?";
}

/* ---- values ------------------------------------------------------------------------------- */

json_t *dm_output_string(const char *s)
{
    char *c = dm_report_utf8(s);
    json_t *j = json_string(c); /* valid UTF-8 by construction: NULL only when out of memory */
    free(c);
    if (!j)
        abort();
    return j;
}

json_t *dm_output_time(int64_t unix_ms)
{
    char buf[40];
    if (unix_ms == 0)
        return json_null();
    return dm_output_string(dm_time_iso(unix_ms, buf, sizeof(buf)));
}

static json_t *base64(const uint8_t *data, size_t len)
{
    if (len > (size_t)INT32_MAX / 2)
        abort(); /* messages are limited far below this */
    char *out = dm_malloc(4 * ((len + 2) / 3) + 1);
    EVP_EncodeBlock((unsigned char *)out, data, (int)len);
    json_t *j = json_string(out);
    free(out);
    if (!j)
        abort();
    return j;
}

/* "DsrLegState" -> "DSR_LEG_STATE_" */
static char *enum_prefix(const char *short_name)
{
    size_t n = strlen(short_name);
    char *p = dm_malloc(2 * n + 2), *w = p;
    for (size_t i = 0; i < n; i++) {
        if (i && isupper((unsigned char)short_name[i]))
            *w++ = '_';
        *w++ = (char)toupper((unsigned char)short_name[i]);
    }
    *w++ = '_';
    *w = '\0';
    return p;
}

char *dm_output_enum_name(const ProtobufCEnumDescriptor *d, int value)
{
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(d, value);
    if (!v)
        return NULL;
    size_t n = strlen(v->name);
    if (n >= 12 && strcmp(v->name + n - 12, "_UNSPECIFIED") == 0)
        return NULL;
    char *prefix = enum_prefix(d->short_name);
    size_t skip = strncmp(v->name, prefix, strlen(prefix)) == 0 ? strlen(prefix) : 0;
    free(prefix);
    /* Enums without the buf-style prefix (grpc.health.v1's SERVING) keep their proto name. */
    char *s = dm_strdup(v->name + skip);
    for (char *c = s; skip && *c; c++)
        *c = (char)tolower((unsigned char)*c);
    return s;
}

static json_t *enum_json(const ProtobufCEnumDescriptor *d, int value)
{
    if (!protobuf_c_enum_descriptor_get_value(d, value))
        return json_integer(value); /* a value newer than this build: the number, as proto3 */
    char *s = dm_output_enum_name(d, value);
    if (!s)
        return json_null();
    json_t *j = dm_output_string(s);
    free(s);
    return j;
}

static size_t elem_size(ProtobufCType t)
{
    switch (t) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
    case PROTOBUF_C_TYPE_ENUM:
        return 4;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        return 8;
    case PROTOBUF_C_TYPE_FLOAT:
        return sizeof(float);
    case PROTOBUF_C_TYPE_DOUBLE:
        return sizeof(double);
    case PROTOBUF_C_TYPE_BOOL:
        return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_STRING:
        return sizeof(char *);
    case PROTOBUF_C_TYPE_BYTES:
        return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_MESSAGE:
        return sizeof(ProtobufCMessage *);
    }
    abort();
}

static bool is_time(const ProtobufCFieldDescriptor *f)
{
    size_t n = strlen(f->name);
    return f->type == PROTOBUF_C_TYPE_INT64 && f->label != PROTOBUF_C_LABEL_REPEATED && n > 8 &&
           strcmp(f->name + n - 8, "_unix_ms") == 0;
}

/* One value of field `f` at `p`. */
static json_t *value_json(const ProtobufCFieldDescriptor *f, const void *p)
{
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        return json_integer(*(const int32_t *)p);
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        return json_integer(*(const uint32_t *)p);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        if (is_time(f))
            return dm_output_time(*(const int64_t *)p);
        return json_integer(*(const int64_t *)p);
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        return json_integer((json_int_t) * (const uint64_t *)p);
    case PROTOBUF_C_TYPE_FLOAT:
        return json_real(*(const float *)p);
    case PROTOBUF_C_TYPE_DOUBLE:
        return json_real(*(const double *)p);
    case PROTOBUF_C_TYPE_BOOL:
        return json_boolean(*(const protobuf_c_boolean *)p);
    case PROTOBUF_C_TYPE_ENUM:
        return enum_json(f->descriptor, *(const int *)p);
    case PROTOBUF_C_TYPE_STRING:
        return dm_output_string(*(char *const *)p);
    case PROTOBUF_C_TYPE_BYTES: {
        const ProtobufCBinaryData *b = p;
        return base64(b->data, b->len);
    }
    case PROTOBUF_C_TYPE_MESSAGE:
        return dm_output_message(*(const ProtobufCMessage *const *)p);
    }
    abort();
}

/* protobuf-c gives a map<K, V> as a repeated message XxxEntry { key = 1; value = 2; }. */
static bool is_map(const ProtobufCFieldDescriptor *f)
{
    if (f->label != PROTOBUF_C_LABEL_REPEATED || f->type != PROTOBUF_C_TYPE_MESSAGE)
        return false;
    const ProtobufCMessageDescriptor *d = f->descriptor;
    size_t n = strlen(d->short_name);
    return n > 5 && strcmp(d->short_name + n - 5, "Entry") == 0 && d->n_fields == 2 &&
           strcmp(d->fields[0].name, "key") == 0 && strcmp(d->fields[1].name, "value") == 0 &&
           d->fields[0].type == PROTOBUF_C_TYPE_STRING;
}

json_t *dm_output_message(const ProtobufCMessage *m)
{
    if (!m)
        return json_null();
    const ProtobufCMessageDescriptor *d = m->descriptor;
    json_t *o = json_object();
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        const char *base = (const char *)m;
        const void *p = base + f->offset;
        json_t *v;
        if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            if (*(const uint32_t *)(base + f->quantifier_offset) != f->id)
                continue;
            v = value_json(f, p);
        } else if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)(base + f->quantifier_offset);
            const char *arr = *(char *const *)p;
            if (is_map(f)) {
                const ProtobufCMessageDescriptor *ed = f->descriptor;
                const ProtobufCFieldDescriptor *kf = &ed->fields[0], *vf = &ed->fields[1];
                v = json_object();
                for (size_t k = 0; k < n; k++) {
                    const char *e = ((const char *const *)arr)[k];
                    char *key = dm_report_utf8(*(char *const *)(e + kf->offset));
                    json_object_set_new(v, key, value_json(vf, e + vf->offset));
                    free(key);
                }
            } else {
                v = json_array();
                for (size_t k = 0; k < n; k++)
                    json_array_append_new(v, value_json(f, arr + k * elem_size(f->type)));
            }
        } else if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset &&
                   f->type != PROTOBUF_C_TYPE_MESSAGE && f->type != PROTOBUF_C_TYPE_STRING &&
                   !*(const protobuf_c_boolean *)(base + f->quantifier_offset)) {
            v = json_null(); /* proto3 `optional` without a value */
        } else {
            v = value_json(f, p);
        }
        if (is_time(f)) {
            char *key = dm_strndup(f->name, strlen(f->name) - 8);
            json_object_set_new(o, key, v);
            free(key);
        } else {
            json_object_set_new(o, f->name, v);
        }
    }
    return o;
}

/* ---- text of values ----------------------------------------------------------------------- */

char *dm_output_text(const json_t *v)
{
    switch (v ? json_typeof(v) : JSON_NULL) {
    case JSON_STRING:
        return dm_strdup(json_string_length(v) ? json_string_value(v) : "-");
    case JSON_INTEGER:
        return dm_sprintf("%lld", (long long)json_integer_value(v));
    case JSON_REAL:
        return dm_sprintf("%g", json_real_value(v));
    case JSON_TRUE:
        return dm_strdup("yes");
    case JSON_FALSE:
        return dm_strdup("no");
    case JSON_ARRAY: {
        if (json_array_size(v) == 0)
            return dm_strdup("-");
        char *s = dm_strdup("");
        size_t i;
        const json_t *e;
        json_array_foreach(v, i, e)
        {
            char *t = dm_output_text(e), *n = dm_sprintf("%s%s%s", s, i ? "," : "", t);
            free(t);
            free(s);
            s = n;
        }
        return s;
    }
    case JSON_OBJECT: {
        if (json_object_size(v) == 0)
            return dm_strdup("-");
        char *s = dm_strdup("");
        const char *k;
        const json_t *e;
        bool first = true;
        json_object_foreach((json_t *)v, k, e)
        {
            char *t = dm_output_text(e), *n = dm_sprintf("%s%s%s=%s", s, first ? "" : ",", k, t);
            free(t);
            free(s);
            s = n;
            first = false;
        }
        return s;
    }
    case JSON_NULL:
        break;
    }
    return dm_strdup("-");
}

const json_t *dm_output_get(const json_t *record, const char *path)
{
    const json_t *v = record;
    while (v && path && *path) {
        const char *dot = strchr(path, '.');
        size_t n = dot ? (size_t)(dot - path) : strlen(path);
        char *key = dm_strndup(path, n), *end;
        if (json_is_object(v)) {
            v = json_object_get(v, key);
        } else if (json_is_array(v) && n) {
            unsigned long i = strtoul(key, &end, 10);
            v = *end ? NULL : json_array_get(v, i);
        } else {
            v = NULL;
        }
        free(key);
        path = dot ? dot + 1 : NULL;
    }
    return v;
}

/* ---- the output --------------------------------------------------------------------------- */

struct dm_output {
    FILE *f;
    dm_output_format_t fmt;
    dm_output_shape_t shape;
    unsigned flags;
    const dm_output_column_t *base;     /* the command's columns */
    const dm_output_column_t *cols[64]; /* those this format shows */
    size_t ncols;
    size_t records;
    bool failed; /* a write failed; errno kept in err */
    int err;
    /* table */
    char **held; /* held rows * ncols cleaned cells */
    size_t nheld, capheld;
    size_t width[64];
    bool widths_fixed;
};

dm_output_t *dm_output_create(FILE *f, dm_output_format_t fmt, dm_output_shape_t shape,
                              unsigned flags, const dm_output_column_t *cols, size_t ncols)
{
    dm_output_t *o = dm_calloc(1, sizeof(*o));
    o->f = f;
    o->fmt = fmt;
    o->shape = shape;
    o->flags = flags;
    o->base = cols;
    for (size_t i = 0; i < ncols && o->ncols < DM_ARRAY_LEN(o->cols); i++)
        if (fmt == DM_OUTPUT_WIDE || !(cols[i].flags & DM_OUTPUT_COL_WIDE))
            o->cols[o->ncols++] = &cols[i];
    return o;
}

static void put(dm_output_t *o, const char *s, size_t n)
{
    if (!o->failed && n && fwrite(s, 1, n, o->f) != n) {
        o->failed = true;
        o->err = errno ? errno : EIO;
    }
}

static void puts_(dm_output_t *o, const char *s)
{
    put(o, s, strlen(s));
}

/* Display width in code points: cleaned text is valid UTF-8. */
static size_t width_of(const char *s)
{
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        n += (*p & 0xc0) != 0x80;
    return n;
}

static char *cell_of(const dm_output_column_t *c, const json_t *record)
{
    const json_t *v = c->key ? dm_output_get(record, c->key) : NULL;
    char *raw = c->cell ? c->cell(v, record) : dm_output_text(v);
    char *clean = dm_report_plain(raw ? raw : "-");
    free(raw);
    return clean;
}

/* A row: tab-separated (TSV) or padded to the column widths (table). */
static void table_line(dm_output_t *o, char *const *cells)
{
    static const char blanks[] = "                                ";
    for (size_t c = 0; c < o->ncols; c++) {
        if (c && o->fmt == DM_OUTPUT_TSV)
            put(o, "\t", 1);
        put(o, cells[c], strlen(cells[c]));
        if (o->fmt == DM_OUTPUT_TSV || c + 1 == o->ncols)
            continue;
        /* No trailing blanks: pad only when a later cell of the row has text. */
        bool more = false;
        for (size_t k = c + 1; k < o->ncols && !more; k++)
            more = cells[k][0] != '\0';
        if (!more)
            break;
        size_t w = width_of(cells[c]);
        size_t pad = (o->width[c] > w ? o->width[c] - w : 0) + TABLE_GAP;
        while (pad) {
            size_t n = pad < sizeof(blanks) - 1 ? pad : sizeof(blanks) - 1;
            put(o, blanks, n);
            pad -= n;
        }
    }
    put(o, "\n", 1);
}

static void hold(dm_output_t *o, char **cells)
{
    if (o->nheld == o->capheld) {
        o->capheld = o->capheld ? o->capheld * 2 : 16;
        o->held = dm_realloc(o->held, o->capheld * sizeof(char *) * (o->ncols ? o->ncols : 1));
    }
    memcpy(o->held + o->nheld * o->ncols, cells, o->ncols * sizeof(char *));
    o->nheld++;
}

/* Writes the header and the held rows, and fixes the widths for later rows. */
static void flush_table(dm_output_t *o)
{
    if (!o->widths_fixed) {
        for (size_t c = 0; c < o->ncols; c++) {
            size_t w = o->flags & DM_OUTPUT_NO_HEADERS ? 0 : width_of(o->cols[c]->header);
            for (size_t r = 0; r < o->nheld; r++) {
                size_t cw = width_of(o->held[r * o->ncols + c]);
                w = cw > w ? cw : w;
            }
            o->width[c] = w;
        }
        o->widths_fixed = true;
        if (!(o->flags & DM_OUTPUT_NO_HEADERS) && o->fmt != DM_OUTPUT_TSV && o->ncols) {
            char *head[DM_ARRAY_LEN(o->cols)];
            for (size_t c = 0; c < o->ncols; c++)
                head[c] = (char *)o->cols[c]->header;
            table_line(o, head);
        }
    }
    for (size_t r = 0; r < o->nheld; r++) {
        table_line(o, o->held + r * o->ncols);
        for (size_t c = 0; c < o->ncols; c++)
            free(o->held[r * o->ncols + c]);
    }
    o->nheld = 0;
}

static void detail(dm_output_t *o, const json_t *record)
{
    size_t w = 0;
    for (size_t c = 0; c < o->ncols; c++)
        w = width_of(o->cols[c]->header) > w ? width_of(o->cols[c]->header) : w;
    for (size_t c = 0; c < o->ncols; c++) {
        const dm_output_column_t *col = o->cols[c];
        const json_t *v = col->key ? dm_output_get(record, col->key) : NULL;
        char *raw = col->cell ? col->cell(v, record) : dm_output_text(v);
        if (!raw)
            continue;
        char *clean = dm_report_plain(raw), *line;
        if (o->fmt == DM_OUTPUT_TSV)
            line = dm_sprintf("%s\t%s\n", col->header, clean);
        else
            line = dm_sprintf("%-*s  %s\n", (int)w, col->header, clean);
        puts_(o, line);
        free(line);
        free(raw);
        free(clean);
    }
}

/* `text` with every line after the first indented by `indent` blanks (JSON strings hold no
 * raw newline, so this only moves the encoder's own lines). */
static void put_indented(dm_output_t *o, const char *text, int indent)
{
    for (const char *p = text; *p;) {
        const char *nl = strchr(p, '\n');
        size_t n = nl ? (size_t)(nl - p) + 1 : strlen(p);
        put(o, p, n);
        p += n;
        if (nl && *p)
            put(o, "        ", (size_t)indent);
    }
}

void dm_output_record(dm_output_t *o, json_t *record)
{
    o->records++;
    switch (o->fmt) {
    case DM_OUTPUT_JSON: {
        char *text = json_dumps(record, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        if (!text)
            abort();
        if (o->shape == DM_OUTPUT_LIST) {
            puts_(o, o->records == 1 ? "{\n  \"items\": [\n    " : ",\n    ");
            put_indented(o, text, 4);
        } else {
            puts_(o, text);
            puts_(o, "\n");
        }
        free(text);
        break;
    }
    case DM_OUTPUT_JSONL: {
        char *text = json_dumps(record, JSON_COMPACT | JSON_PRESERVE_ORDER);
        if (!text)
            abort();
        puts_(o, text);
        puts_(o, "\n");
        free(text);
        break;
    }
    case DM_OUTPUT_TABLE:
    case DM_OUTPUT_WIDE:
    case DM_OUTPUT_TSV:
        if (o->shape == DM_OUTPUT_DETAIL) {
            detail(o, record);
            break;
        }
        char *cells[DM_ARRAY_LEN(o->cols)];
        for (size_t c = 0; c < o->ncols; c++)
            cells[c] = cell_of(o->cols[c], record);
        if (o->fmt == DM_OUTPUT_TSV) {
            table_line(o, cells);
            for (size_t c = 0; c < o->ncols; c++)
                free(cells[c]);
            break;
        }
        hold(o, cells);
        if (o->widths_fixed || o->nheld >= TABLE_HOLD)
            flush_table(o);
        break;
    }
    json_decref(record);
    if (o->flags & DM_OUTPUT_FLUSH && fflush(o->f) != 0 && !o->failed) {
        o->failed = true;
        o->err = errno;
    }
}

void dm_output_extra(dm_output_t *o, const char *const *cells)
{
    if (o->fmt == DM_OUTPUT_JSON || o->fmt == DM_OUTPUT_JSONL || o->shape == DM_OUTPUT_DETAIL)
        return;
    char *row[DM_ARRAY_LEN(o->cols)];
    /* `cells` follows the command's columns: keep those this format shows. */
    for (size_t c = 0; c < o->ncols; c++) {
        const char *v = cells[o->cols[c] - o->base];
        row[c] = dm_report_plain(v ? v : "-");
    }
    if (o->fmt == DM_OUTPUT_TSV) {
        table_line(o, row);
        for (size_t c = 0; c < o->ncols; c++)
            free(row[c]);
        return;
    }
    hold(o, row);
    if (o->widths_fixed)
        flush_table(o);
}

bool dm_output_end(dm_output_t *o, bool complete)
{
    switch (o->fmt) {
    case DM_OUTPUT_JSON:
        if (o->shape == DM_OUTPUT_LIST && complete)
            puts_(o, o->records ? "\n  ]\n}\n" : "{\n  \"items\": []\n}\n");
        break;
    case DM_OUTPUT_TABLE:
    case DM_OUTPUT_WIDE:
        if (o->shape != DM_OUTPUT_DETAIL && (complete || o->nheld))
            flush_table(o);
        break;
    case DM_OUTPUT_TSV:
    case DM_OUTPUT_JSONL:
        break;
    }
    if (fflush(o->f) != 0 && !o->failed) {
        o->failed = true;
        o->err = errno;
    }
    bool ok = !o->failed;
    int err = o->err;
    for (size_t i = 0; i < o->nheld * o->ncols; i++)
        free(o->held[i]);
    free(o->held);
    free(o);
    if (!ok)
        errno = err;
    return ok;
}
