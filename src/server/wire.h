/* Wire-level checks of request messages (src/server internal). */
#ifndef DOMICILE_SERVER_WIRE_H
#define DOMICILE_SERVER_WIRE_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/**
 * True when every string field of the encoded message `buf` (of type `d`, nested messages
 * included) is valid UTF-8 without NUL. Otherwise false and *bad_field names the first
 * offending field, as a path for nested ones ("labels.key"; thread-local storage, valid
 * until the next call on this thread). Malformed encodings are not judged here.
 */
bool dm_wire_strings_ok(const ProtobufCMessageDescriptor *d, const uint8_t *buf, size_t len,
                        const char **bad_field);

#endif
