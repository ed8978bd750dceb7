/*
 * Shared by the files of src/custody only.
 */
#ifndef DOMICILE_CUSTODY_STATE_H
#define DOMICILE_CUSTODY_STATE_H

#include <pthread.h>
#include <stdatomic.h>

#include "domicile/custody.h"
#include "token.h"

/* One KEK version as this gateway knows it. */
typedef struct dm__kver {
    int32_t version;
    bool is_file;  /* the key file (version 1 only) */
    bool retired;  /* the database says so: it opens nothing any more */
    bool verified; /* its key opened the database's check value */
    bool has_obj;
    dm_token_obj_t obj;
    int64_t data_keys; /* -1: not counted yet */
} dm__kver_t;

typedef struct dm__req dm__req_t; /* an operator request queued for the custody thread */

struct dm_custody {
    const dm_config_t *cfg;
    const dm_region_config_t *rc;
    dm_region_t *region;
    const char *code;
    bool is_file;           /* kek_source = "file" */
    bool extractable;       /* kek_test_extractable = "on": make extractable versions */
    bool allow_extractable; /* "on" or "accept": use them */
    dm_kek_t *file_kek;
    dm_token_t *token; /* NULL with kek_source = "file" */

    /* The version table: written by the custody thread, read by every wrap and unwrap (which
     * hold it shared while they use a version's object). */
    pthread_rwlock_t mu;
    dm__kver_t vers[DM_CUSTODY_MAX_VERSIONS];
    size_t n_vers;
    int32_t current;

    atomic_bool ready; /* the versions are known and verified (and the token open) */
    pthread_mutex_t why_mu;
    char why[256]; /* why not ready */

    dm_custody_change_fn on_change;
    void *on_change_arg;

    /* The custody thread. */
    pthread_t thread;
    bool started;
    pthread_mutex_t qmu;
    pthread_cond_t qcv;
    bool stopping, poked;
    dm__req_t *queue, *queue_tail;

    /* Key-file operations only (the token counts its own): /metrics adds the two. */
    atomic_llong wraps, unwraps, wrap_us, unwrap_us;
    atomic_llong rewrapped;
    atomic_llong rotation_remaining;
    atomic_llong oldest_active_ms; /* age of the oldest version not retired (-1: not read) */
    _Atomic double rewrap_rate;
};

dm__kver_t *dm__custody_find(dm_custody_t *c, int32_t version);
void dm__custody_label(const dm_custody_t *c, int32_t version, char *buf, size_t len);
void dm__custody_set_why(dm_custody_t *c, const char *fmt, ...) DM_PRINTF(2, 3);
/* Wrap under version `v` (with `mu` held, shared or not). */
dm_status_t *dm__custody_wrap_with(dm_custody_t *c, dm__kver_t *v, const unsigned char *dek,
                                   const unsigned char *aad, size_t aad_len, unsigned char **out,
                                   size_t *out_len) DM_WARN_UNUSED;

#endif
