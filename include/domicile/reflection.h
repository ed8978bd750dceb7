/*
 * gRPC server reflection (grpc.reflection.v1alpha.ServerReflection) and the descriptor
 * database behind it: the FileDescriptorSet of every proto of proto/, made by protoc at build
 * time (CMakeLists.txt) and embedded in the library.
 */
#ifndef DOMICILE_REFLECTION_H
#define DOMICILE_REFLECTION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "domicile/mem.h"
#include "domicile/status.h"

/** The embedded FileDescriptorSet (generated: build/gen/descriptors.c). */
extern const unsigned char dm_descriptor_set[];
extern const size_t dm_descriptor_set_len;

/**
 * A parsed FileDescriptorSet: its files, their dependencies, and every symbol they declare
 * (packages' messages, nested messages, fields, oneofs, enums, enum values, services, methods),
 * fully qualified.
 */
typedef struct dm_descdb dm_descdb_t;

/**
 * Parse a serialized FileDescriptorSet (copied: `buf` need not outlive the result). Rejects,
 * with INVALID_ARGUMENT, anything malformed: truncated or overlong fields, groups, nesting
 * deeper than 32, a file without a name, a file named twice, a dependency that is not in the
 * set, a symbol declared twice.
 */
dm_status_t *dm_descdb_parse(const uint8_t *buf, size_t len, dm_descdb_t **out) DM_WARN_UNUSED;
void dm_descdb_free(dm_descdb_t *db);

/** The database of the embedded set, parsed once; NULL (logged) if it cannot be parsed. */
const dm_descdb_t *dm_descdb_builtin(void);

size_t dm_descdb_n_files(const dm_descdb_t *db);
/** File `i`'s name ("domicile/v1/records.proto"). */
const char *dm_descdb_file_name(const dm_descdb_t *db, size_t i);
/**
 * File `i` as a serialized FileDescriptorProto, as protoc embeds it in generated code and as
 * reflection serves it: the set's bytes without the json_name values protoc's
 * --descriptor_set_out adds to every field (only names set explicitly in the .proto are kept).
 */
const uint8_t *dm_descdb_file_proto(const dm_descdb_t *db, size_t i, size_t *len);
/** Index of the file named `name`, or -1. */
long dm_descdb_find_file(const dm_descdb_t *db, const char *name);
/** Index of the file declaring the fully-qualified `symbol` (a leading '.' is allowed), or -1. */
long dm_descdb_find_symbol(const dm_descdb_t *db, const char *symbol);
/**
 * File `i` and its transitive dependencies, each once, `i` first: indices into `out`, which has
 * room for dm_descdb_n_files() entries. Returns how many.
 */
size_t dm_descdb_closure(const dm_descdb_t *db, size_t i, size_t *out);
/** Number of services the set declares, and service `i`'s full name ("domicile.v1.RecordsService").
 */
size_t dm_descdb_n_services(const dm_descdb_t *db);
const char *dm_descdb_service(const dm_descdb_t *db, size_t i);

#endif
