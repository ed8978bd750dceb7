#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "domicile/directory.h"
#include "domicile/log.h"

typedef struct entry {
    struct entry *next;
    uint64_t hash;
    dm_region_t *region;
    char id[]; /* NUL-terminated customer id */
} entry_t;

struct dm_directory {
    dm_regions_t *regions;
    size_t max_entries;
    pthread_rwlock_t lock;
    entry_t **buckets;
    size_t n_buckets; /* power of two */
    size_t count;
};

static uint64_t hash_id(const char *s)
{
    /* FNV-1a: ids are short, and the map only routes (a collision costs a compare). */
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

dm_directory_t *dm_directory_create(dm_regions_t *regions, size_t max_entries)
{
    dm_directory_t *d = dm_calloc(1, sizeof(*d));
    d->regions = regions;
    d->max_entries = max_entries ? max_entries : 1;
    d->n_buckets = 1024;
    d->buckets = dm_calloc(d->n_buckets, sizeof(entry_t *));
    pthread_rwlock_init(&d->lock, NULL);
    return d;
}

void dm_directory_destroy(dm_directory_t *d)
{
    if (!d)
        return;
    for (size_t i = 0; i < d->n_buckets; i++) {
        for (entry_t *e = d->buckets[i]; e;) {
            entry_t *next = e->next;
            free(e);
            e = next;
        }
    }
    free(d->buckets);
    pthread_rwlock_destroy(&d->lock);
    free(d);
}

static dm_region_t *lookup(dm_directory_t *d, const char *id)
{
    uint64_t h = hash_id(id);
    dm_region_t *r = NULL;
    pthread_rwlock_rdlock(&d->lock);
    for (entry_t *e = d->buckets[h & (d->n_buckets - 1)]; e; e = e->next) {
        if (e->hash == h && strcmp(e->id, id) == 0) {
            r = e->region;
            break;
        }
    }
    pthread_rwlock_unlock(&d->lock);
    return r;
}

static void grow_locked(dm_directory_t *d)
{
    size_t n = d->n_buckets * 2;
    entry_t **b = dm_calloc(n, sizeof(entry_t *));
    for (size_t i = 0; i < d->n_buckets; i++) {
        for (entry_t *e = d->buckets[i]; e;) {
            entry_t *next = e->next;
            e->next = b[e->hash & (n - 1)];
            b[e->hash & (n - 1)] = e;
            e = next;
        }
    }
    free(d->buckets);
    d->buckets = b;
    d->n_buckets = n;
}

/* Full: drop one bucket's chain. Residency never changes, so an evicted entry only costs a
 * fan-out the next time; nothing can be routed wrongly. */
static void evict_locked(dm_directory_t *d)
{
    size_t start = (size_t)random() & (d->n_buckets - 1);
    for (size_t k = 0; k < d->n_buckets && d->count >= d->max_entries; k++) {
        size_t i = (start + k) & (d->n_buckets - 1);
        while (d->buckets[i]) {
            entry_t *e = d->buckets[i];
            d->buckets[i] = e->next;
            free(e);
            d->count--;
        }
    }
}

void dm_directory_remember(dm_directory_t *d, const char *id, dm_region_t *region)
{
    uint64_t h = hash_id(id);
    size_t len = strlen(id);
    pthread_rwlock_wrlock(&d->lock);
    for (entry_t *e = d->buckets[h & (d->n_buckets - 1)]; e; e = e->next) {
        if (e->hash == h && strcmp(e->id, id) == 0) {
            e->region = region;
            pthread_rwlock_unlock(&d->lock);
            return;
        }
    }
    if (d->count >= d->max_entries)
        evict_locked(d);
    if (d->count >= d->n_buckets)
        grow_locked(d);
    entry_t *e = dm_malloc(sizeof(*e) + len + 1);
    e->hash = h;
    e->region = region;
    memcpy(e->id, id, len + 1);
    e->next = d->buckets[h & (d->n_buckets - 1)];
    d->buckets[h & (d->n_buckets - 1)] = e;
    d->count++;
    pthread_rwlock_unlock(&d->lock);
}

size_t dm_directory_size(dm_directory_t *d)
{
    pthread_rwlock_rdlock(&d->lock);
    size_t n = d->count;
    pthread_rwlock_unlock(&d->lock);
    return n;
}

/* ---- fan-out ------------------------------------------------------------------------- */

typedef struct ask {
    dm_resolve_fn fn;
    void *arg;
    char *customer_id;
    atomic_int pending;
    pthread_mutex_t mu; /* below */
    dm_region_t *found;
    const char *found_state;
    int holders;
    bool answered; /* a region that holds the id answered first: fn has run */
    dm_status_t *err;
    int n_jobs;
    dm_region_t *regions[DM_MAX_REGIONS];
    dm_job_t jobs[DM_MAX_REGIONS];
} ask_t;

static const char *intern_state(const char *s, int len)
{
    static const char *const states[] = {"none", "pending", "active", "closed", "purged"};
    for (size_t i = 0; i < DM_ARRAY_LEN(states); i++)
        if ((int)strlen(states[i]) == len && memcmp(states[i], s, (size_t)len) == 0)
            return states[i];
    return NULL;
}

static void ask_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    ask_t *a = job->arg;
    dm_region_t *r = a->regions[job - a->jobs];

    pthread_mutex_lock(&a->mu);
    if (err) {
        if (!a->err)
            a->err = err;
        else
            dm_status_free(err);
    } else if (PQntuples(res) != 1) {
        if (!a->err)
            a->err = dm_status_new(GRPC_STATUS_INTERNAL, "unexpected directory answer");
    } else {
        int len;
        const char *v = dm_pg_bytes(res, 0, 0, &len);
        const char *state = intern_state(v, len);
        if (!state) {
            if (!a->err)
                a->err = dm_status_new(GRPC_STATUS_INTERNAL, "unexpected customer state");
        } else if (strcmp(state, "none") != 0) {
            a->holders++;
            if (!a->found) {
                a->found = r;
                a->found_state = state;
            }
        }
    }
    /* The first region that holds the customer wins (DESIGN.md §4): a slow or failing
     * region does not hold up the calls of customers elsewhere. NOT_FOUND still waits for
     * every region. A registration in flight ("pending") is not an answer yet. */
    bool early = a->found && !a->answered && strcmp(a->found_state, "pending") != 0;
    if (early)
        a->answered = true;
    dm_region_t *found = a->found;
    const char *found_state = a->found_state;
    pthread_mutex_unlock(&a->mu);
    if (early)
        a->fn(a->arg, found, found_state, NULL);
    if (atomic_fetch_sub(&a->pending, 1) != 1)
        return;
    if (a->answered) {
        if (a->holders > 1)
            dm_error("directory", "customer id held by %d regions (answered with the first)",
                     a->holders);
        dm_status_free(a->err);
        pthread_mutex_destroy(&a->mu);
        free(a->customer_id);
        free(a);
        return;
    }

    /* Last answer: decide. Another region holding the id outranks an unavailable one (the
     * answer is then certain); otherwise an unanswered region makes it UNAVAILABLE. */
    dm_status_t *out = NULL;
    if (a->holders > 1) {
        dm_error("directory", "customer id held by %d regions; refusing to route it", a->holders);
        out = dm_status_new(GRPC_STATUS_INTERNAL, "customer is registered in more than one "
                                                  "region; refusing to route it");
        dm_status_free(a->err);
    } else if (a->err && !a->found) {
        out = a->err;
    } else {
        dm_status_free(a->err);
    }
    a->fn(a->arg, out ? NULL : a->found, out ? NULL : (a->found ? a->found_state : "none"), out);
    pthread_mutex_destroy(&a->mu);
    free(a->customer_id);
    free(a);
}

static void ask(dm_regions_t *regions, dm_region_t *skip, bool local_only, const char *customer_id,
                void *owner, dm_resolve_fn fn, void *arg)
{
    ask_t *a = dm_calloc(1, sizeof(*a));
    a->fn = fn;
    a->arg = arg;
    a->customer_id = dm_strdup(customer_id);
    pthread_mutex_init(&a->mu, NULL);
    for (size_t i = 0; i < dm_regions_count(regions); i++) {
        dm_region_t *r = dm_regions_at(regions, i);
        if (r != skip && (!local_only || dm_region_is_local(r)))
            a->regions[a->n_jobs++] = r;
    }
    if (a->n_jobs == 0) {
        pthread_mutex_destroy(&a->mu);
        free(a->customer_id);
        free(a);
        fn(arg, NULL, "none", NULL);
        return;
    }
    atomic_init(&a->pending, a->n_jobs);
    int n = a->n_jobs; /* `a` may be freed by the last completion inside the loop */
    for (int i = 0; i < n; i++) {
        dm_job_t *j = &a->jobs[i];
        j->stmt = DM_SQL_CUSTOMER_STATE;
        dm_job_param_text(j, 0, a->customer_id);
        j->done = ask_done;
        j->arg = a;
        /* The owner (a call) may end (first answer wins) while other regions' jobs are still
         * queued: a local job must not point at it. A peer's job uses it only while it is
         * submitted (the principal, the deadline). */
        j->owner = dm_region_is_local(a->regions[i]) ? NULL : owner;
    }
    dm_region_t *targets[DM_MAX_REGIONS];
    dm_job_t *jobs[DM_MAX_REGIONS];
    for (int i = 0; i < n; i++) {
        targets[i] = a->regions[i];
        jobs[i] = &a->jobs[i];
    }
    for (int i = 0; i < n; i++)
        dm_region_submit(targets[i], jobs[i]);
}

void dm_directory_ask_all(dm_regions_t *regions, dm_region_t *skip, const char *customer_id,
                          void *owner, dm_resolve_fn fn, void *arg)
{
    ask(regions, skip, false, customer_id, owner, fn, arg);
}

typedef struct resolve {
    dm_directory_t *d;
    char *customer_id;
    dm_resolve_fn fn;
    void *arg;
} resolve_t;

static void resolve_done(void *arg, dm_region_t *region, const char *state, dm_status_t *err)
{
    resolve_t *rv = arg;
    if (!err && (!region || strcmp(state, "pending") == 0)) {
        err = dm_status_new(GRPC_STATUS_NOT_FOUND, "customer not found");
        region = NULL;
    }
    if (!err)
        dm_directory_remember(rv->d, rv->customer_id, region);
    rv->fn(rv->arg, region, state, err);
    free(rv->customer_id);
    free(rv);
}

static void resolve(dm_directory_t *d, const char *customer_id, void *owner, bool local_only,
                    dm_resolve_fn fn, void *arg)
{
    dm_region_t *r = lookup(d, customer_id);
    if (r) {
        /* State is checked by the region's statements themselves. */
        fn(arg, r, "active", NULL);
        return;
    }
    resolve_t *rv = dm_malloc(sizeof(*rv));
    rv->d = d;
    rv->customer_id = dm_strdup(customer_id);
    rv->fn = fn;
    rv->arg = arg;
    ask(d->regions, NULL, local_only, customer_id, owner, resolve_done, rv);
}

void dm_directory_resolve(dm_directory_t *d, const char *customer_id, void *owner, dm_resolve_fn fn,
                          void *arg)
{
    resolve(d, customer_id, owner, false, fn, arg);
}

void dm_directory_resolve_local(dm_directory_t *d, const char *customer_id, void *owner,
                                dm_resolve_fn fn, void *arg)
{
    resolve(d, customer_id, owner, true, fn, arg);
}
