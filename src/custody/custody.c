/*
 * A region's KEK versions, and wrapping and unwrapping data keys with them (the hot path).
 * The custody thread (worker.c) keeps the version table in step with the database and the
 * token.
 */
#include <arpa/inet.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

#include "domicile/log.h"
#include "state.h"

#define DATA_LOSS_KEK "cannot unwrap data key: authentication failed"

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

dm_status_t *dm_custody_create(const dm_config_t *cfg, const dm_region_config_t *rc, dm_region_t *r,
                               dm_custody_t **out)
{
    dm_custody_t *c = dm_calloc(1, sizeof(*c));
    dm_status_t *st;
    c->cfg = cfg;
    c->rc = rc;
    c->region = r;
    c->code = rc->code;
    c->is_file = strcmp(rc->kek_source, "file") == 0;
    c->extractable = strcmp(rc->kek_test_extractable, "on") == 0;
    c->allow_extractable = strcmp(rc->kek_test_extractable, "off") != 0;
    /* Writers first: the custody thread's rare updates must not starve behind a steady
     * stream of wraps and unwraps (none of which takes the lock twice). */
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&c->mu, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&c->qmu, NULL);
    pthread_mutex_init(&c->why_mu, NULL);
    pthread_cond_init(&c->qcv, NULL);
    snprintf(c->why, sizeof(c->why), "key custody is starting");
    if (rc->kek_file[0]) {
        if ((st = dm_kek_load(rc->kek_file, &c->file_kek))) {
            dm_custody_destroy(c);
            return dm_status_detail(st, "region \"%s\"", rc->code);
        }
    }
    if (c->is_file) {
        dm_warn("custody",
                "region %s: kek_source = \"file\": the key-encryption key is the file %s, which "
                "anyone who can read this gateway's disk can copy; UNSAFE outside tests, use a "
                "PKCS#11 token (kek_source = \"pkcs11\")",
                c->code, rc->kek_file);
    } else {
        /* Before the module loads (its configuration file, e.g. SOFTHSM2_CONF); before
         * the custody thread exists, on the thread that starts the gateway. */
        for (size_t i = 0; i < rc->n_pkcs11_env; i++) {
            char *name = dm_strdup(rc->pkcs11_env[i]);
            char *eq = strchr(name, '=');
            *eq = '\0';
            setenv(name, eq + 1, 1);
            free(name);
        }
        c->token = dm_token_create(rc, rc->pkcs11_sessions);
        if (c->allow_extractable)
            dm_warn("custody",
                    "region %s: kek_test_extractable = \"%s\": extractable KEK versions are %s "
                    "(tests only; never in production)",
                    c->code, rc->kek_test_extractable, c->extractable ? "MADE and used" : "used");
        if (c->file_kek)
            dm_warn("custody",
                    "region %s: kek_file is set next to the token: data keys wrapped by the file "
                    "(version 1) still open; rotate and retire version 1, then remove kek_file",
                    c->code);
    }
    *out = c;
    return NULL;
}

void dm_custody_destroy(dm_custody_t *c)
{
    if (!c)
        return;
    dm_custody_stop(c);
    dm_token_destroy(c->token);
    dm_kek_free(c->file_kek);
    pthread_rwlock_destroy(&c->mu);
    pthread_mutex_destroy(&c->qmu);
    pthread_mutex_destroy(&c->why_mu);
    pthread_cond_destroy(&c->qcv);
    free(c);
}

void dm_custody_on_change(dm_custody_t *c, dm_custody_change_fn fn, void *arg)
{
    c->on_change = fn;
    c->on_change_arg = arg;
}

bool dm_custody_ready(dm_custody_t *c)
{
    return atomic_load(&c->ready) && (c->is_file || dm_token_ok(c->token));
}

dm_status_t *dm_custody_check(dm_custody_t *c)
{
    if (dm_custody_ready(c))
        return NULL;
    char why[256];
    if (c->token && !dm_token_ok(c->token) && atomic_load(&c->ready)) {
        dm_token_error(c->token, why, sizeof(why));
    } else {
        pthread_mutex_lock(&c->why_mu);
        snprintf(why, sizeof(why), "%s", c->why);
        pthread_mutex_unlock(&c->why_mu);
    }
    return dm_status_new(GRPC_STATUS_UNAVAILABLE, "region \"%s\": keys unavailable: %s", c->code,
                         why);
}

void dm__custody_set_why(dm_custody_t *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&c->why_mu);
    vsnprintf(c->why, sizeof(c->why), fmt, ap);
    pthread_mutex_unlock(&c->why_mu);
    va_end(ap);
}

/* With `mu` held. */
dm__kver_t *dm__custody_find(dm_custody_t *c, int32_t version)
{
    for (size_t i = 0; i < c->n_vers; i++)
        if (c->vers[i].version == version)
            return &c->vers[i];
    return NULL;
}

void dm__custody_label(const dm_custody_t *c, int32_t version, char *buf, size_t len)
{
    snprintf(buf, len, "%s.v%d", c->rc->kek_label, version);
}

int32_t dm_custody_version_of(const unsigned char *w, size_t len)
{
    if (len == DM_WRAPPED_KEY_LEN && w[0] == DM_SEAL_FORMAT)
        return 1;
    if (len == DM_CUSTODY_WRAPPED_LEN && w[0] == DM_CUSTODY_FORMAT) {
        uint32_t v;
        memcpy(&v, w + 1, 4);
        v = ntohl(v);
        return v >= 1 && v <= INT32_MAX ? (int32_t)v : 0;
    }
    return 0;
}

/* header || aad: the version is authenticated with the key. */
static unsigned char *token_aad(const unsigned char header[5], const unsigned char *aad,
                                size_t aad_len, size_t *out_len)
{
    unsigned char *b = dm_malloc(5 + aad_len);
    memcpy(b, header, 5);
    if (aad_len)
        memcpy(b + 5, aad, aad_len);
    *out_len = 5 + aad_len;
    return b;
}

/* The token's NOT_FOUND (the key object is gone) and failures take the region out of service
 * until the custody thread has looked again. */
static dm_status_t *token_trouble(dm_custody_t *c, dm_status_t *st, int32_t version)
{
    if (st->code == GRPC_STATUS_NOT_FOUND) {
        dm__custody_set_why(c, "KEK version %d is gone from token \"%s\"", version,
                            c->rc->pkcs11_token);
        atomic_store(&c->ready, false);
        dm_status_t *u = dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                       "region \"%s\": keys unavailable: KEK version %d is gone "
                                       "from token \"%s\"",
                                       c->code, version, c->rc->pkcs11_token);
        dm_status_detail(u, "%s", st->message);
        dm_status_free(st);
        st = u;
    }
    if (st->code == GRPC_STATUS_UNAVAILABLE || st->code == GRPC_STATUS_FAILED_PRECONDITION)
        dm_custody_poke(c);
    return st;
}

dm_status_t *dm__custody_wrap_with(dm_custody_t *c, dm__kver_t *v, const unsigned char *dek,
                                   const unsigned char *aad, size_t aad_len, unsigned char **out,
                                   size_t *out_len)
{
    if (v->is_file) {
        if (!c->file_kek)
            return dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                 "region \"%s\": keys unavailable: KEK version 1 is the key file, "
                                 "and kek_file is not set",
                                 c->code);
        int64_t t0 = mono_us();
        dm_status_t *st = dm_dek_wrap(c->file_kek, dek, aad, aad_len, out, out_len);
        if (!st) {
            atomic_fetch_add(&c->wrap_us, mono_us() - t0);
            atomic_fetch_add(&c->wraps, 1);
        }
        return st;
    }
    unsigned char *w = dm_malloc(DM_CUSTODY_WRAPPED_LEN);
    uint32_t be = htonl((uint32_t)v->version);
    w[0] = DM_CUSTODY_FORMAT;
    memcpy(w + 1, &be, 4);
    dm_random_bytes(w + 5, DM_SEAL_NONCE_LEN);
    size_t full_len;
    unsigned char *full = token_aad(w, aad, aad_len, &full_len);
    dm_status_t *st = dm_token_gcm(c->token, true, v->obj, w + 5, full, full_len, dek, DM_KEY_LEN,
                                   w + 5 + DM_SEAL_NONCE_LEN);
    free(full);
    if (st) {
        free(w);
        return token_trouble(c, st, v->version);
    }
    *out = w;
    *out_len = DM_CUSTODY_WRAPPED_LEN;
    return NULL;
}

dm_status_t *dm_custody_wrap(dm_custody_t *c, const unsigned char dek[DM_KEY_LEN],
                             const unsigned char *aad, size_t aad_len, unsigned char **out,
                             size_t *out_len, int32_t *version)
{
    dm_status_t *st = dm_custody_check(c);
    if (st)
        return st;
    pthread_rwlock_rdlock(&c->mu);
    dm__kver_t *v = dm__custody_find(c, c->current);
    if (!v) {
        pthread_rwlock_unlock(&c->mu);
        return dm_status_new(GRPC_STATUS_UNAVAILABLE,
                             "region \"%s\": keys unavailable: no current KEK version yet",
                             c->code);
    }
    st = dm__custody_wrap_with(c, v, dek, aad, aad_len, out, out_len);
    if (!st)
        *version = v->version;
    pthread_rwlock_unlock(&c->mu);
    return st;
}

/* A version this gateway has not seen yet (made by a replica a moment ago): its object is
 * looked up in the token by label. The custody thread checks it against the database's check
 * value on its next pass. */
static void learn_version(dm_custody_t *c, int32_t version)
{
    char label[128];
    dm_token_obj_t objs[2];
    size_t n = 0;
    dm__custody_label(c, version, label, sizeof(label));
    dm_status_t *st = dm_token_find(c->token, label, c->allow_extractable, objs, 2, &n);
    if (st) {
        dm_status_free(st);
        return;
    }
    if (n != 1)
        return;
    pthread_rwlock_wrlock(&c->mu);
    if (!dm__custody_find(c, version) && c->n_vers < DM_CUSTODY_MAX_VERSIONS) {
        dm__kver_t *v = &c->vers[c->n_vers++];
        memset(v, 0, sizeof(*v));
        v->version = version;
        v->obj = objs[0];
        v->has_obj = true;
        v->data_keys = -1;
    }
    pthread_rwlock_unlock(&c->mu);
    dm_custody_poke(c);
}

dm_status_t *dm_custody_unwrap(dm_custody_t *c, const unsigned char *w, size_t len,
                               const unsigned char *aad, size_t aad_len,
                               unsigned char dek[DM_KEY_LEN])
{
    int32_t version = dm_custody_version_of(w, len);
    if (version == 0)
        return dm_status_new(GRPC_STATUS_DATA_LOSS, DATA_LOSS_KEK);
    dm_status_t *st = dm_custody_check(c);
    if (st)
        return st;
    bool legacy = w[0] == DM_SEAL_FORMAT;
    pthread_rwlock_rdlock(&c->mu);
    dm__kver_t *v = dm__custody_find(c, version);
    if (!v && !legacy && !c->is_file) {
        pthread_rwlock_unlock(&c->mu);
        learn_version(c, version);
        pthread_rwlock_rdlock(&c->mu);
        v = dm__custody_find(c, version);
    }
    if (!v || v->retired || (legacy != v->is_file)) {
        bool retired = v && v->retired;
        pthread_rwlock_unlock(&c->mu);
        st = dm_status_new(GRPC_STATUS_DATA_LOSS, DATA_LOSS_KEK);
        dm_status_detail(st, "region %s: KEK version %d %s", c->code, version,
                         retired ? "is retired" : "is not in the token");
        /* A key row from before a retirement (a restored backup?) or tampering. */
        dm_error("custody",
                 "region %s: a data key wrapped by KEK version %d does not open: the "
                 "version %s",
                 c->code, version, retired ? "is retired" : "is not in the token");
        return st;
    }
    if (v->is_file) {
        int64_t t0 = mono_us();
        st = c->file_kek ? dm_dek_unwrap(c->file_kek, w, len, aad, aad_len, dek)
                         : dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                         "region \"%s\": keys unavailable: data key wrapped by "
                                         "the key file (KEK version 1), and kek_file is not set",
                                         c->code);
        pthread_rwlock_unlock(&c->mu);
        if (!st) {
            atomic_fetch_add(&c->unwrap_us, mono_us() - t0);
            atomic_fetch_add(&c->unwraps, 1);
        }
        return st;
    }
    size_t full_len;
    unsigned char *full = token_aad(w, aad, aad_len, &full_len);
    st = dm_token_gcm(c->token, false, v->obj, w + 5, full, full_len, w + 5 + DM_SEAL_NONCE_LEN,
                      DM_KEY_LEN + DM_SEAL_TAG_LEN, dek);
    free(full);
    pthread_rwlock_unlock(&c->mu);
    if (st)
        return st->code == GRPC_STATUS_DATA_LOSS ? st : token_trouble(c, st, version);
    return NULL;
}

void dm_custody_stats(dm_custody_t *c, dm_custody_stats_t *out)
{
    memset(out, 0, sizeof(*out));
    out->ready = dm_custody_ready(c);
    out->token = !c->is_file;
    out->rewrapped = atomic_load(&c->rewrapped);
    out->rotation_remaining = atomic_load(&c->rotation_remaining);
    out->oldest_active_ms = atomic_load(&c->oldest_active_ms);
    if (c->token) {
        dm_token_stats_t ts;
        dm_token_stats(c->token, &ts);
        out->wraps = ts.encrypts;
        out->unwraps = ts.decrypts;
        out->token_failures = ts.failures;
        out->wrap_us = ts.encrypt_us;
        out->unwrap_us = ts.decrypt_us;
    }
    /* The key file's (kek_source = "file", or version 1 of a region moving into a token). */
    out->wraps += atomic_load(&c->wraps);
    out->unwraps += atomic_load(&c->unwraps);
    out->wrap_us += atomic_load(&c->wrap_us);
    out->unwrap_us += atomic_load(&c->unwrap_us);
    pthread_rwlock_rdlock(&c->mu);
    out->current = c->current;
    for (size_t i = 0; i < c->n_vers; i++) {
        if (c->vers[i].retired)
            continue;
        out->version[out->n_versions] = c->vers[i].version;
        out->data_keys[out->n_versions] = c->vers[i].data_keys;
        out->n_versions++;
    }
    pthread_rwlock_unlock(&c->mu);
}
