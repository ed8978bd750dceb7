/*
 * The directory: which region holds a customer. Each region's database holds the directory
 * rows of its own customers only; the gateway keeps an in-memory map (customer id -> region)
 * and, on a miss, asks every region at once (DESIGN.md §4). NOT_FOUND needs every region to
 * answer "no"; a region that cannot answer makes the result UNAVAILABLE, never a guess.
 * Lookups cost O(1) whatever the number of customers.
 *
 * Thread-safety: all functions may be called from any thread.
 */
#ifndef DOMICILE_DIRECTORY_H
#define DOMICILE_DIRECTORY_H

#include "domicile/region.h"

typedef struct dm_directory dm_directory_t;

/**
 * Resolution result: on success `region` and the customer's `state` ("active", "closed",
 * "purged"; static strings); otherwise `err` (owned by the callback): NOT_FOUND,
 * UNAVAILABLE, or INTERNAL when two regions claim the id. Runs on the calling thread (cache
 * hit) or on an executor thread.
 */
typedef void (*dm_resolve_fn)(void *arg, dm_region_t *region, const char *state, dm_status_t *err);

/** A directory over `regions` caching at most `max_entries` customers. */
dm_directory_t *dm_directory_create(dm_regions_t *regions, size_t max_entries);
void dm_directory_destroy(dm_directory_t *d);
/** Resolve `customer_id` (valid id) and call `fn` exactly once. `owner` (may be NULL) is
 * the owner of the jobs it runs (dm_job_t). */
void dm_directory_resolve(dm_directory_t *d, const char *customer_id, void *owner, dm_resolve_fn fn,
                          void *arg);
/**
 * The same, asking only the gateway's own region on a miss: for a call a gateway of another
 * region forwarded here because the customer is ours (no second wide-area round).
 */
void dm_directory_resolve_local(dm_directory_t *d, const char *customer_id, void *owner,
                                dm_resolve_fn fn, void *arg);
/** Record that `customer_id` lives in `region` (after registration). */
void dm_directory_remember(dm_directory_t *d, const char *customer_id, dm_region_t *region);
/** Number of cached entries (tests, metrics). */
size_t dm_directory_size(dm_directory_t *d);

/**
 * Ask every region in `regions` except `skip` (may be NULL) for `customer_id` at once.
 * `fn` receives the state held by each region: called once at the end with the first region
 * that holds the id in a state other than "none" (and its state), or region NULL and state
 * "none" when none does; err UNAVAILABLE if any region could not answer. Used by the
 * directory and by registration.
 */
void dm_directory_ask_all(dm_regions_t *regions, dm_region_t *skip, const char *customer_id,
                          void *owner, dm_resolve_fn fn, void *arg);

#endif
