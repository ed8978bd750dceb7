/*
 * Allocation helpers. Out of memory aborts the process (as Redis' zmalloc does), so call sites
 * never check for NULL. Everything returned is freed with free().
 */
#ifndef DOMICILE_MEM_H
#define DOMICILE_MEM_H

#include <stddef.h>

#define DM_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define DM_WARN_UNUSED  __attribute__((warn_unused_result))
#define DM_PRINTF(f, a) __attribute__((format(printf, f, a)))

/** malloc() that aborts on failure. */
void *dm_malloc(size_t n);
/** calloc() that aborts on failure. */
void *dm_calloc(size_t count, size_t size);
/** realloc() that aborts on failure. */
void *dm_realloc(void *p, size_t n);
/** strdup(); NULL in gives NULL out. */
char *dm_strdup(const char *s);
/** strndup() that aborts on failure. */
char *dm_strndup(const char *s, size_t n);
/** asprintf() that aborts on failure; the result is the caller's to free. */
char *dm_sprintf(const char *fmt, ...) DM_PRINTF(1, 2);
/**
 * The whole of a small file (PEM files and the like) as a NUL-terminated string; NULL when it
 * cannot be read or holds more than `max` bytes (never a silently shortened copy).
 */
char *dm_read_small_file(const char *path, size_t max);
/** Limit for certificate, key and CA files (chains stay far below it). */
#define DM_PEM_MAX ((size_t)1 << 20)

#endif
