/*
 * Transfer reports rendered for people and for tools: the TransfersService.Report answer as an
 * aligned text table, CSV (RFC 4180), JSON, Markdown, or one self-contained HTML file with an SVG
 * chart of transfers per month per route. Used by domicilectl; pure functions, no I/O.
 *
 * Every string of the report comes from ledger data and is treated as hostile: invalid UTF-8
 * and control characters become U+FFFD in the text, Markdown and HTML outputs (JSON and CSV keep
 * controls, escaped or quoted), and each format escapes its own special characters.
 */
#ifndef DOMICILE_REPORT_H
#define DOMICILE_REPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "domicile/clock.h" /* dm_time_iso: the report's times */
#include "domicile/mem.h"
#include "domicile/v1/transfers.pb-c.h"

/** Output formats of a transfer report. */
typedef enum dm_report_format {
    DM_REPORT_TABLE,    /* aligned columns for a terminal, then the ledger states */
    DM_REPORT_CSV,      /* RFC 4180, CRLF line ends, one header line, rows only */
    DM_REPORT_JSON,     /* one object: generated_at, from, to, complete, totals, rows, ledgers */
    DM_REPORT_MARKDOWN, /* pipe tables (GitHub / CommonMark) */
    DM_REPORT_HTML,     /* one file, inline CSS and SVG, well-formed XML (XHTML-compatible) */
} dm_report_format_t;

/** Parse "table", "csv", "json", "markdown" (or "md") or "html"; false when unknown. */
bool dm_report_format_parse(const char *name, dm_report_format_t *out) DM_WARN_UNUSED;

/**
 * Parse a UTC calendar date "YYYY-MM-DD" (years 1970..9999, real days only) into Unix
 * milliseconds at 00:00 UTC. False when `s` is anything else.
 */
bool dm_report_parse_date(const char *s, int64_t *ms) DM_WARN_UNUSED;

/**
 * A new string (the caller's to free): `s` with invalid UTF-8 and control characters (C0, DEL,
 * C1) replaced by U+FFFD, safe to print on a terminal. NULL gives "".
 */
char *dm_report_plain(const char *s);

/**
 * A new string (the caller's to free): `s` with invalid UTF-8 replaced by U+FFFD and control
 * characters kept, for an encoder that escapes them itself (JSON). NULL gives "".
 */
char *dm_report_utf8(const char *s);

/**
 * Lower-case name of a LedgerDamage value ("none", "edited", "deleted", "inserted", "reordered",
 * "checkpoint-invalid"); NULL for UNSPECIFIED, "unknown" for values this build does not know.
 * Static storage.
 */
const char *dm_report_damage_name(int damage);

/**
 * Render `rep` in `fmt`. Returns a new NUL-terminated text, the caller's to free(); never NULL
 * (out of memory aborts). `rep` is only read. Thread-safe.
 */
char *dm_report_render(const Domicile__V1__ReportResponse *rep, dm_report_format_t fmt);

#endif
