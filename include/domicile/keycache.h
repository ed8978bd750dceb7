/*
 * Unwrapped data keys kept in memory for a short time, so a write does not unwrap (or fetch)
 * its key every time. Keyed by (region, customer, subject key). An erasure that destroys a
 * subject's key makes writes that still use a cached copy fail in the database ("key_gone":
 * the write re-checks that its key row exists), and the caller then forgets the entry; a
 * cached key therefore never outlives its row for more than one rejected write.
 *
 * Thread-safety: all functions may be called from any thread. Key bytes are cleansed when an
 * entry is dropped.
 */
#ifndef DOMICILE_KEYCACHE_H
#define DOMICILE_KEYCACHE_H

#include <stdbool.h>
#include <stdint.h>

#include "domicile/crypto.h"

typedef struct dm_keycache dm_keycache_t;

/** A cache of at most `max_entries` keys, each kept `ttl_ms`. max_entries 0 disables it. */
dm_keycache_t *dm_keycache_create(size_t max_entries, int ttl_ms);
void dm_keycache_destroy(dm_keycache_t *kc);
/** Copy the key of (region, customer, subject_key or NULL) into `dek`; false on a miss. */
bool dm_keycache_get(dm_keycache_t *kc, const char *region, const char *customer,
                     const unsigned char *subject_key, int64_t *key_id,
                     unsigned char dek[DM_KEY_LEN]);
void dm_keycache_put(dm_keycache_t *kc, const char *region, const char *customer,
                     const unsigned char *subject_key, int64_t key_id,
                     const unsigned char dek[DM_KEY_LEN]);
void dm_keycache_forget(dm_keycache_t *kc, const char *region, const char *customer,
                        const unsigned char *subject_key);

#endif
