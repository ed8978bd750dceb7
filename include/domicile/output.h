/*
 * What domicilectl prints: records as an aligned table for people, or as JSON, JSON Lines or
 * tab-separated cells for scripts (docs/cli.md is the reference of every format).
 *
 * A record is a JSON object, most often the generic mapping of the proto message it comes
 * from (dm_output_message). Table columns are views of that object (a key, or a function of
 * it), so the table, the tab-separated cells and the JSON of one command never disagree.
 *
 * Strings from the gateway are data, never markup: table and TSV cells have invalid UTF-8 and
 * control characters replaced by U+FFFD (no terminal escapes, no broken lines or columns);
 * JSON strings keep them, escaped by the encoder.
 *
 * Not thread-safe: one dm_output_t per thread.
 */
#ifndef DOMICILE_OUTPUT_H
#define DOMICILE_OUTPUT_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>
#include <protobuf-c/protobuf-c.h>

#include "domicile/mem.h"

/** Formats of --output. */
typedef enum dm_output_format {
    DM_OUTPUT_TABLE, /* aligned columns under one upper-case header line (the default) */
    DM_OUTPUT_WIDE,  /* the table with its wide columns too */
    DM_OUTPUT_TSV,   /* the table's cells, tab-separated, no header, no padding */
    DM_OUTPUT_JSON,  /* indented JSON: a list as {"items": [...]}, one record as the object */
    DM_OUTPUT_JSONL, /* JSON Lines: one compact object per record, one record per line */
} dm_output_format_t;

/** Parse "table", "wide", "tsv", "json" or "jsonl"; false when `name` is none of them. */
bool dm_output_format_parse(const char *name, dm_output_format_t *out) DM_WARN_UNUSED;

/** Name of a format, as dm_output_format_parse reads it. Static storage. */
const char *dm_output_format_name(dm_output_format_t fmt);

/** What one command prints. */
typedef enum dm_output_shape {
    DM_OUTPUT_LIST,   /* any number of records; JSON: {"items": [...]} */
    DM_OUTPUT_ONE,    /* one record; JSON: the object itself */
    DM_OUTPUT_DETAIL, /* one record; table: a "name  value" line per column; JSON: the object */
} dm_output_shape_t;

/** dm_output_create flags. */
enum {
    DM_OUTPUT_NO_HEADERS = 1 << 0, /* table, wide: no header line (kubectl --no-headers) */
    DM_OUTPUT_FLUSH = 1 << 1,      /* flush after every record (watch) */
};

/** dm_output_column_t flags. */
enum {
    DM_OUTPUT_COL_WIDE = 1 << 0, /* only in the wide table */
};

/**
 * Text of a computed cell: a new string (the caller's to free) or NULL for "-" (a DETAIL line
 * with NULL is left out). `value` is the record's value at the column's key (NULL when the
 * column has no key or the key is absent), `record` the whole record. The text is cleaned for
 * the terminal afterwards.
 */
typedef char *(*dm_output_cell_fn)(const json_t *value, const json_t *record);

/** One column of the table (and of TSV). */
typedef struct dm_output_column {
    const char *header;     /* "REQUEST_ID"; for DETAIL the line's name */
    const char *key;        /* path of the value, keys (or array indexes) joined by '.' */
    dm_output_cell_fn cell; /* NULL: the value's text, dm_output_text */
    unsigned flags;         /* DM_OUTPUT_COL_* */
} dm_output_column_t;

typedef struct dm_output dm_output_t;

/**
 * An output of records to `f` (not closed). `cols` (ncols entries) must outlive the output;
 * JSON formats ignore them. Returns a new output for dm_output_end.
 */
dm_output_t *dm_output_create(FILE *f, dm_output_format_t fmt, dm_output_shape_t shape,
                              unsigned flags, const dm_output_column_t *cols, size_t ncols);

/**
 * Print one record (an object; ownership passes to the output). Table rows are held until
 * 1000 of them fix the column widths (or dm_output_end); every other format streams.
 */
void dm_output_record(dm_output_t *o, json_t *record);

/**
 * A row of the table and of TSV that is no record (a total): `cells` holds ncols texts (NULL:
 * "-"), copied. JSON formats leave it out.
 */
void dm_output_extra(dm_output_t *o, const char *const *cells);

/**
 * Finish and free `o`. `complete` false (the listing failed half-way): the table shows the rows
 * it has, but a JSON list is left unclosed so that no parser takes it for the whole answer.
 * Returns false, with errno set, when writing to the stream failed.
 */
bool dm_output_end(dm_output_t *o, bool complete) DM_WARN_UNUSED;

/**
 * The JSON of a proto message (generic, from its descriptor): every field under its proto
 * name, also when it holds its default; int64 as numbers; bytes as base64; a `<name>_unix_ms`
 * field as `<name>`, an RFC 3339 UTC string with milliseconds ("2026-12-06T22:40:00.000Z") or
 * null when 0 (not set); enum values without their type prefix in lower case
 * (DSR_STATE_IN_PROGRESS: "in_progress"), null for *_UNSPECIFIED, the number when unknown;
 * maps as objects; unset messages as null; a oneof as its set member only. Strings are valid
 * UTF-8 (invalid bytes become U+FFFD). NULL gives JSON null. A new reference.
 */
json_t *dm_output_message(const ProtobufCMessage *m);

/** RFC 3339 UTC with milliseconds of Unix milliseconds; JSON null for 0. A new reference. */
json_t *dm_output_time(int64_t unix_ms);

/** A JSON string of `s` made valid UTF-8 (NULL: ""). A new reference. */
json_t *dm_output_string(const char *s);

/**
 * The cell text of a JSON value, uncleaned: null and "" give "-", strings themselves, numbers
 * in decimal, true "yes", false "no", arrays their elements joined by ",", objects "k=v"
 * joined by ",". A new string.
 */
char *dm_output_text(const json_t *v);

/**
 * The value at `path` in `record`: object keys and array indexes joined by '.' ("legs.0.state");
 * NULL when absent. Borrowed.
 */
const json_t *dm_output_get(const json_t *record, const char *path);

/**
 * Name of an enum value as dm_output_message writes it, a new string; NULL for *_UNSPECIFIED
 * and for values the descriptor does not know.
 */
char *dm_output_enum_name(const ProtobufCEnumDescriptor *d, int value);

#endif
