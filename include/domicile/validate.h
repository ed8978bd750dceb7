/*
 * Limits on every request field (DESIGN.md §3: INVALID_ARGUMENT names the field and the limit).
 *
 * Each dm_check_* returns NULL when the value is valid, else a new INVALID_ARGUMENT status (the
 * caller's) whose message is "<field>: <limit>", e.g.
 * `customer_id: must be 1..128 bytes of [A-Za-z0-9._:-]`. Messages never echo the offending
 * value, except label keys, which are escaped (see dm_check_labels). `field` is the caller's
 * constant field name; it is printed as given. String values are NUL-terminated (protobuf-c
 * strings, never NULL) and lengths are in bytes.
 *
 * "Control characters" below are bytes 0x00..0x1f and 0x7f.
 *
 * Thread-safety: all functions are pure and may be called from any thread.
 */
#ifndef DOMICILE_VALIDATE_H
#define DOMICILE_VALIDATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#include "domicile/status.h"

#define DM_CUSTOMER_ID_MAX    128
#define DM_RECORD_ID_MAX      256
#define DM_KIND_MAX           64
#define DM_REQUEST_ID_MAX     128
#define DM_PURPOSE_MAX        64
#define DM_CONTENT_TYPE_MAX   128
#define DM_PAYLOAD_MAX        1048576
#define DM_LABELS_MAX         32
#define DM_LABEL_KEY_MAX      63
#define DM_LABEL_VALUE_MAX    256
#define DM_LABEL_KEY_ECHO_MAX 64 /* bytes of an offending label key quoted in a message */

/**
 * True when `len` bytes at `s` are well-formed UTF-8 (Unicode Table 3-7): no overlong forms,
 * no surrogates (U+D800..U+DFFF), nothing above U+10FFFF, no truncated sequence. NUL bytes are
 * valid UTF-8 (U+0000); the checkers below reject them as control characters.
 */
bool dm_utf8_valid(const char *s, size_t len) DM_WARN_UNUSED;

/** 1..128 bytes of [A-Za-z0-9._:-]. */
dm_status_t *dm_check_customer_id(const char *field, const char *v) DM_WARN_UNUSED;
/** 1..256 bytes of UTF-8 without control characters. */
dm_status_t *dm_check_record_id(const char *field, const char *v) DM_WARN_UNUSED;
/** 1..64 bytes of [a-z0-9._-]; "" is also accepted when `allow_empty` (e.g. a list filter). */
dm_status_t *dm_check_kind(const char *field, const char *v, bool allow_empty) DM_WARN_UNUSED;
/** 1..128 bytes of printable ASCII without space (0x21..0x7e). */
dm_status_t *dm_check_request_id(const char *field, const char *v) DM_WARN_UNUSED;
/** 1..64 bytes of [a-z0-9-]; "" is also accepted when `allow_empty`. */
dm_status_t *dm_check_purpose(const char *field, const char *v, bool allow_empty) DM_WARN_UNUSED;
/** `min`..`max` bytes of UTF-8 without control characters (min 0 allows ""). */
dm_status_t *dm_check_text(const char *field, const char *v, size_t min, size_t max) DM_WARN_UNUSED;
/** 0..128 bytes of printable ASCII (0x20..0x7e). */
dm_status_t *dm_check_content_type(const char *field, const char *v) DM_WARN_UNUSED;
/** A payload of at most DM_PAYLOAD_MAX (1 MiB) bytes. */
dm_status_t *dm_check_payload(const char *field, size_t len) DM_WARN_UNUSED;

/** The layout protobuf-c generates for every map<string, string> entry. */
typedef struct dm_label_entry {
    ProtobufCMessage base;
    char *key;
    char *value;
} dm_label_entry_t;

/**
 * A labels map: at most 32 entries (else `labels: must have at most 32 entries`); keys 1..63
 * bytes of [a-z0-9._-] and unique; values 0..256 bytes of UTF-8 without control characters.
 * `entries` holds `n` dm_label_entry_t pointers (a protobuf-c `n_labels`/`labels` pair); it stays
 * the caller's. The message names the offending key, e.g.
 * `labels["Bad"]: key must be 1..63 bytes of [a-z0-9._-]`; the key is quoted safely: control
 * bytes and invalid UTF-8 become '?', '"' and '\' are backslash-escaped, and it is cut (on a
 * character boundary, marked "...") after DM_LABEL_KEY_ECHO_MAX bytes.
 */
dm_status_t *dm_check_labels(const char *field, size_t n, void *const *entries) DM_WARN_UNUSED;
/** 0 (the server's default) .. `max`; negative values are rejected. */
dm_status_t *dm_check_page_size(const char *field, int32_t v, int32_t max) DM_WARN_UNUSED;

#endif
