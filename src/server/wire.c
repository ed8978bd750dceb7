/*
 * A walk over the protobuf wire format of a request, checking what protobuf-c does not: that
 * every string field is valid UTF-8 (proto3 requires it) and holds no NUL. protobuf-c keeps a
 * string as a NUL-terminated char *, so "a\0b" would reach the handlers as "a" and pass every
 * later check; this catches it before the message is decoded.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "domicile/validate.h"
#include "wire.h"

#define MAX_DEPTH 32

/* The offending field's path ("labels.key"), per thread: the caller formats it at once. */
static __thread char bad_path[160];

static bool read_varint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return true;
        }
    }
    return false;
}

static bool walk(const ProtobufCMessageDescriptor *d, const uint8_t *p, const uint8_t *end,
                 int depth, const char **bad)
{
    if (depth > MAX_DEPTH) {
        *bad = "(nesting)";
        return false;
    }
    while (p < end) {
        uint64_t key, len;
        if (!read_varint(&p, end, &key))
            return true; /* malformed: left to protobuf-c's own decoding */
        unsigned wt = (unsigned)(key & 7);
        uint64_t num = key >> 3;
        switch (wt) {
        case 0:
            if (!read_varint(&p, end, &len))
                return true;
            break;
        case 1:
            p += 8;
            break;
        case 5:
            p += 4;
            break;
        case 2: {
            if (!read_varint(&p, end, &len) || len > (uint64_t)(end - p))
                return true;
            const ProtobufCFieldDescriptor *f =
                num <= UINT32_MAX ? protobuf_c_message_descriptor_get_field(d, (unsigned)num)
                                  : NULL;
            if (f && f->type == PROTOBUF_C_TYPE_STRING) {
                if (memchr(p, 0, len) || !dm_utf8_valid((const char *)p, len)) {
                    *bad = f->name;
                    return false;
                }
            } else if (f && f->type == PROTOBUF_C_TYPE_MESSAGE) {
                if (!walk(f->descriptor, p, p + len, depth + 1, bad)) {
                    /* Name the path from the outer field ("labels.key"), not the leaf. */
                    char inner[sizeof(bad_path)];
                    size_t n = strlen(f->name);
                    snprintf(inner, sizeof(inner), "%s", *bad);
                    if (n + 1 + strlen(inner) < sizeof(bad_path)) {
                        memcpy(bad_path, f->name, n);
                        bad_path[n] = '.';
                        memcpy(bad_path + n + 1, inner, strlen(inner) + 1);
                    }
                    *bad = bad_path;
                    return false;
                }
            }
            p += len;
            break;
        }
        default:
            return true; /* groups and garbage: protobuf-c refuses them */
        }
    }
    return true;
}

bool dm_wire_strings_ok(const ProtobufCMessageDescriptor *d, const uint8_t *buf, size_t len,
                        const char **bad_field)
{
    *bad_field = NULL;
    return walk(d, buf, buf + len, 0, bad_field);
}
