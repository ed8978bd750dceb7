#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

#include "domicile/keycache.h"

#define N_BUCKETS 4096

typedef struct kentry {
    struct kentry *next;
    int64_t key_id;
    int64_t expires_ms;
    unsigned char dek[DM_KEY_LEN];
    char name[]; /* region \x1f customer \x1f hex(subject_key) */
} kentry_t;

struct dm_keycache {
    size_t max;
    int ttl_ms;
    size_t count;
    pthread_mutex_t mu;
    kentry_t *buckets[N_BUCKETS];
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char *make_name(const char *region, const char *customer, const unsigned char *sk)
{
    char hex[2 * DM_SUBJECT_KEY_LEN + 1] = "";
    if (sk)
        dm_hex_encode(sk, DM_SUBJECT_KEY_LEN, hex);
    return dm_sprintf("%s\x1f%s\x1f%s", region, customer, hex);
}

static size_t bucket_of(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return (size_t)(h % N_BUCKETS);
}

static void drop(kentry_t *e)
{
    OPENSSL_cleanse(e->dek, sizeof(e->dek));
    free(e);
}

dm_keycache_t *dm_keycache_create(size_t max_entries, int ttl_ms)
{
    dm_keycache_t *kc = dm_calloc(1, sizeof(*kc));
    kc->max = max_entries;
    kc->ttl_ms = ttl_ms;
    pthread_mutex_init(&kc->mu, NULL);
    return kc;
}

void dm_keycache_destroy(dm_keycache_t *kc)
{
    if (!kc)
        return;
    for (size_t i = 0; i < N_BUCKETS; i++) {
        for (kentry_t *e = kc->buckets[i]; e;) {
            kentry_t *next = e->next;
            drop(e);
            e = next;
        }
    }
    pthread_mutex_destroy(&kc->mu);
    free(kc);
}

bool dm_keycache_get(dm_keycache_t *kc, const char *region, const char *customer,
                     const unsigned char *subject_key, int64_t *key_id,
                     unsigned char dek[DM_KEY_LEN])
{
    if (kc->max == 0)
        return false;
    char *name = make_name(region, customer, subject_key);
    size_t b = bucket_of(name);
    bool hit = false;
    int64_t now = now_ms();
    pthread_mutex_lock(&kc->mu);
    for (kentry_t **pp = &kc->buckets[b]; *pp; pp = &(*pp)->next) {
        kentry_t *e = *pp;
        if (strcmp(e->name, name) != 0)
            continue;
        if (e->expires_ms <= now) {
            *pp = e->next;
            drop(e);
            kc->count--;
        } else {
            *key_id = e->key_id;
            memcpy(dek, e->dek, DM_KEY_LEN);
            hit = true;
        }
        break;
    }
    pthread_mutex_unlock(&kc->mu);
    free(name);
    return hit;
}

void dm_keycache_forget(dm_keycache_t *kc, const char *region, const char *customer,
                        const unsigned char *subject_key)
{
    char *name = make_name(region, customer, subject_key);
    size_t b = bucket_of(name);
    pthread_mutex_lock(&kc->mu);
    for (kentry_t **pp = &kc->buckets[b]; *pp; pp = &(*pp)->next) {
        if (strcmp((*pp)->name, name) == 0) {
            kentry_t *e = *pp;
            *pp = e->next;
            drop(e);
            kc->count--;
            break;
        }
    }
    pthread_mutex_unlock(&kc->mu);
    free(name);
}

void dm_keycache_put(dm_keycache_t *kc, const char *region, const char *customer,
                     const unsigned char *subject_key, int64_t key_id,
                     const unsigned char dek[DM_KEY_LEN])
{
    if (kc->max == 0)
        return;
    dm_keycache_forget(kc, region, customer, subject_key);
    char *name = make_name(region, customer, subject_key);
    size_t len = strlen(name);
    kentry_t *e = dm_malloc(sizeof(*e) + len + 1);
    memcpy(e->name, name, len + 1);
    free(name);
    e->key_id = key_id;
    e->expires_ms = now_ms() + kc->ttl_ms;
    memcpy(e->dek, dek, DM_KEY_LEN);
    size_t b = bucket_of(e->name);
    pthread_mutex_lock(&kc->mu);
    if (kc->count >= kc->max) {
        /* Full: empty this bucket (cheap, and keys are refetched on demand). */
        while (kc->buckets[b]) {
            kentry_t *x = kc->buckets[b];
            kc->buckets[b] = x->next;
            drop(x);
            kc->count--;
        }
    }
    e->next = kc->buckets[b];
    kc->buckets[b] = e;
    kc->count++;
    pthread_mutex_unlock(&kc->mu);
}
