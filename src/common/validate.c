#include <string.h>

#include "domicile/validate.h"

#define INVALID(...) dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, __VA_ARGS__)

/* Length of the well-formed UTF-8 sequence at s (at most `len` bytes), or 0 if there is none.
 * Byte ranges from Unicode Table 3-7: the narrowed second-byte ranges after E0, ED, F0 and F4
 * are what exclude overlongs, surrogates and code points above U+10FFFF. */
static size_t utf8_seq(const unsigned char *s, size_t len)
{
    unsigned char c = s[0];
    size_t n;
    unsigned char lo = 0x80, hi = 0xbf;

    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        n = 2;
    else if (c >= 0xe0 && c <= 0xef)
        n = 3;
    else if (c >= 0xf0 && c <= 0xf4)
        n = 4;
    else
        return 0;
    if (c == 0xe0)
        lo = 0xa0;
    else if (c == 0xed)
        hi = 0x9f;
    else if (c == 0xf0)
        lo = 0x90;
    else if (c == 0xf4)
        hi = 0x8f;
    if (len < n || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    return n;
}

bool dm_utf8_valid(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    while (len > 0) {
        size_t n = utf8_seq(p, len);
        if (n == 0)
            return false;
        p += n;
        len -= n;
    }
    return true;
}

static bool is_control(unsigned char c)
{
    return c < 0x20 || c == 0x7f;
}

static bool is_lower_digit(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

static bool customer_char(unsigned char c)
{
    return is_lower_digit(c) || (c >= 'A' && c <= 'Z') || c == '.' || c == '_' || c == ':' ||
           c == '-';
}

static bool kind_char(unsigned char c)
{
    return is_lower_digit(c) || c == '.' || c == '_' || c == '-';
}

static bool purpose_char(unsigned char c)
{
    return is_lower_digit(c) || c == '-';
}

static bool request_id_char(unsigned char c)
{
    return c >= 0x21 && c <= 0x7e;
}

static bool printable_char(unsigned char c)
{
    return c >= 0x20 && c <= 0x7e;
}

/* strnlen() bounded by max + 1, so an oversized value costs at most max + 1 bytes to measure. */
static size_t bounded_len(const char *v, size_t max)
{
    return max == SIZE_MAX ? strlen(v) : strnlen(v, max + 1);
}

static bool charset_ok(const char *v, size_t min, size_t max, bool (*allowed)(unsigned char))
{
    size_t len = bounded_len(v, max);
    if (len < min || len > max)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!allowed((unsigned char)v[i]))
            return false;
    return true;
}

static bool text_ok(const char *v, size_t min, size_t max)
{
    size_t len = bounded_len(v, max);
    if (len < min || len > max)
        return false;
    for (size_t i = 0; i < len; i++)
        if (is_control((unsigned char)v[i]))
            return false;
    return dm_utf8_valid(v, len);
}

dm_status_t *dm_check_customer_id(const char *field, const char *v)
{
    if (!charset_ok(v, 1, DM_CUSTOMER_ID_MAX, customer_char))
        return INVALID("%s: must be 1..%d bytes of [A-Za-z0-9._:-]", field, DM_CUSTOMER_ID_MAX);
    return NULL;
}

dm_status_t *dm_check_record_id(const char *field, const char *v)
{
    if (!text_ok(v, 1, DM_RECORD_ID_MAX))
        return INVALID("%s: must be 1..%d bytes of UTF-8 without control characters", field,
                       DM_RECORD_ID_MAX);
    return NULL;
}

dm_status_t *dm_check_kind(const char *field, const char *v, bool allow_empty)
{
    if (allow_empty && v[0] == '\0')
        return NULL;
    if (!charset_ok(v, 1, DM_KIND_MAX, kind_char))
        return INVALID("%s: must be %s1..%d bytes of [a-z0-9._-]", field,
                       allow_empty ? "empty or " : "", DM_KIND_MAX);
    return NULL;
}

dm_status_t *dm_check_request_id(const char *field, const char *v)
{
    if (!charset_ok(v, 1, DM_REQUEST_ID_MAX, request_id_char))
        return INVALID("%s: must be 1..%d bytes of printable ASCII (0x21..0x7e)", field,
                       DM_REQUEST_ID_MAX);
    return NULL;
}

dm_status_t *dm_check_purpose(const char *field, const char *v, bool allow_empty)
{
    if (allow_empty && v[0] == '\0')
        return NULL;
    if (!charset_ok(v, 1, DM_PURPOSE_MAX, purpose_char))
        return INVALID("%s: must be %s1..%d bytes of [a-z0-9-]", field,
                       allow_empty ? "empty or " : "", DM_PURPOSE_MAX);
    return NULL;
}

dm_status_t *dm_check_text(const char *field, const char *v, size_t min, size_t max)
{
    if (!text_ok(v, min, max))
        return INVALID("%s: must be %zu..%zu bytes of UTF-8 without control characters", field, min,
                       max);
    return NULL;
}

dm_status_t *dm_check_content_type(const char *field, const char *v)
{
    if (!charset_ok(v, 0, DM_CONTENT_TYPE_MAX, printable_char))
        return INVALID("%s: must be 0..%d bytes of printable ASCII (0x20..0x7e)", field,
                       DM_CONTENT_TYPE_MAX);
    return NULL;
}

dm_status_t *dm_check_payload(const char *field, size_t len)
{
    if (len > DM_PAYLOAD_MAX)
        return INVALID("%s: must be at most %d bytes", field, DM_PAYLOAD_MAX);
    return NULL;
}

/* Quote a client-supplied key for a message: printable ASCII and well-formed UTF-8 are kept
 * (C1 controls U+0080..U+009F too are replaced: terminals act on them), '"' and '\' escaped,
 * everything else becomes '?'. At most DM_LABEL_KEY_ECHO_MAX bytes of output, then "...". */
static void escape_key(const char *key, char out[DM_LABEL_KEY_ECHO_MAX + 4])
{
    const unsigned char *s = (const unsigned char *)key;
    size_t len = strlen(key), i = 0, o = 0;

    while (i < len) {
        size_t n = utf8_seq(s + i, len - i);
        size_t need = (n == 1 && (s[i] == '"' || s[i] == '\\')) ? 2 : (n == 0 ? 1 : n);
        if (o + need > DM_LABEL_KEY_ECHO_MAX) {
            memcpy(out + o, "...", 3);
            o += 3;
            break;
        }
        if (n == 0 || (n == 1 && is_control(s[i])) || (n == 2 && s[i] == 0xc2 && s[i + 1] < 0xa0)) {
            out[o++] = '?';
            i += n ? n : 1;
            continue;
        }
        if (need == 2 && n == 1)
            out[o++] = '\\';
        memcpy(out + o, s + i, n);
        o += n;
        i += n;
    }
    out[o] = '\0';
}

static const char *entry_str(const char *s)
{
    return s ? s : "";
}

dm_status_t *dm_check_labels(const char *field, size_t n, void *const *entries)
{
    char quoted[DM_LABEL_KEY_ECHO_MAX + 4];

    if (n > DM_LABELS_MAX)
        return INVALID("%s: must have at most %d entries", field, DM_LABELS_MAX);
    for (size_t i = 0; i < n; i++) {
        const dm_label_entry_t *e = entries[i];
        const char *key = entry_str(e->key);
        if (!charset_ok(key, 1, DM_LABEL_KEY_MAX, kind_char)) {
            escape_key(key, quoted);
            return INVALID("%s[\"%s\"]: key must be 1..%d bytes of [a-z0-9._-]", field, quoted,
                           DM_LABEL_KEY_MAX);
        }
        for (size_t j = 0; j < i; j++) {
            const dm_label_entry_t *prev = entries[j];
            if (strcmp(key, entry_str(prev->key)) == 0) {
                escape_key(key, quoted);
                return INVALID("%s[\"%s\"]: duplicate key", field, quoted);
            }
        }
        if (!text_ok(entry_str(e->value), 0, DM_LABEL_VALUE_MAX)) {
            escape_key(key, quoted);
            return INVALID("%s[\"%s\"]: value must be 0..%d bytes of UTF-8 without control "
                           "characters",
                           field, quoted, DM_LABEL_VALUE_MAX);
        }
    }
    return NULL;
}

dm_status_t *dm_check_page_size(const char *field, int32_t v, int32_t max)
{
    if (v < 0 || v > max)
        return INVALID("%s: must be 0..%d (0 = default)", field, (int)max);
    return NULL;
}
