/*
 * Key custody (src/custody/README.md): a region's key-encryption keys (KEKs), versioned, in a
 * PKCS#11 token, and their online rotation.
 *
 * A KEK version is a non-extractable AES-256 key in the region's token; data keys are wrapped
 * and unwrapped by the token (CKM_AES_GCM with the data key's AAD), so a KEK's bytes never
 * enter the gateway. Which versions exist, the current one, and a rotation's progress live in
 * the region's database (regions/schema/008_key_custody.sql). Every wrapped data key names
 * its version:
 *
 *     0x02 || version (4, big-endian) || nonce (12) || ciphertext (32) || tag (16)   (65 bytes)
 *
 * with the first five bytes in the AAD as well. The legacy format of dm_dek_wrap() (0x01,
 * 61 bytes) is version 1 when that version is the key file (kek_source = "file", or
 * kek_file kept to migrate from it).
 *
 * A custody thread per region (re)opens the token, follows the versions in the database,
 * makes the first version when there is none, runs operator requests (rotate, status,
 * retire) and re-wraps data keys in batches while a rotation runs (one gateway of the region
 * at a time holds the rotation's lease; a killed gateway's rotation is resumed).
 *
 * Thread-safety: every function may be called from any thread between create and destroy.
 */
#ifndef DOMICILE_CUSTODY_H
#define DOMICILE_CUSTODY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "domicile/config.h"
#include "domicile/crypto.h"
#include "domicile/region.h"
#include "domicile/status.h"

#define DM_CUSTODY_FORMAT       0x02
#define DM_CUSTODY_WRAPPED_LEN  (1 + 4 + DM_SEAL_NONCE_LEN + DM_KEY_LEN + DM_SEAL_TAG_LEN)
#define DM_CUSTODY_MAX_VERSIONS 64

typedef struct dm_custody dm_custody_t;

/**
 * The custody of region `r` (the gateway's own) configured by `rc`. Loads the key file when
 * there is one (kek_source = "file", or kek_file kept for migration; a file that cannot be
 * read is an error, FAILED_PRECONDITION), sets pkcs11_env. The token is opened by the custody
 * thread: until then, and whenever it fails, the region's key operations fail UNAVAILABLE.
 * `cfg` and `rc` must outlive the custody. On success *out is the caller's.
 */
dm_status_t *dm_custody_create(const dm_config_t *cfg, const dm_region_config_t *rc, dm_region_t *r,
                               dm_custody_t **out) DM_WARN_UNUSED;
/** Start the custody thread (after the regions started). */
void dm_custody_start(dm_custody_t *c);
/** Stop and join the custody thread; requests still queued are answered UNAVAILABLE. */
void dm_custody_stop(dm_custody_t *c);
/** Stop if needed and free; the token is closed and the key file cleansed. NULL allowed. */
void dm_custody_destroy(dm_custody_t *c);

/** Told (on the custody thread) when the region's keys become usable or stop being usable. */
typedef void (*dm_custody_change_fn)(void *arg, dm_region_t *r, bool ready);
/** Set the listener (before start). */
void dm_custody_on_change(dm_custody_t *c, dm_custody_change_fn fn, void *arg);

/** True while data keys can be wrapped and unwrapped. */
bool dm_custody_ready(dm_custody_t *c);
/** NULL when ready, else UNAVAILABLE naming the region and the cause (caller frees). */
dm_status_t *dm_custody_check(dm_custody_t *c) DM_WARN_UNUSED;
/** Ask the custody thread to read the versions again soon (a write found its version retired). */
void dm_custody_poke(dm_custody_t *c);

/**
 * Wrap `dek` under the current version with `aad` (dm_key_aad()). On success *out
 * (DM_CUSTODY_WRAPPED_LEN bytes, or DM_WRAPPED_KEY_LEN for the legacy key file; free()) and
 * *version are set. Errors: UNAVAILABLE (token down or not ready, naming region and cause).
 */
dm_status_t *dm_custody_wrap(dm_custody_t *c, const unsigned char dek[DM_KEY_LEN],
                             const unsigned char *aad, size_t aad_len, unsigned char **out,
                             size_t *out_len, int32_t *version) DM_WARN_UNUSED;
/**
 * Unwrap a data key wrapped by any version still in the token. Errors: DATA_LOSS when it does
 * not authenticate (another AAD, region or key) or when its version was retired;
 * UNAVAILABLE when the token is down.
 */
dm_status_t *dm_custody_unwrap(dm_custody_t *c, const unsigned char *wrapped, size_t len,
                               const unsigned char *aad, size_t aad_len,
                               unsigned char dek[DM_KEY_LEN]) DM_WARN_UNUSED;
/** The version a wrapped key names (0 when malformed). */
int32_t dm_custody_version_of(const unsigned char *wrapped, size_t len);

/** One KEK version as the region's database has it. */
typedef struct dm_custody_version {
    int32_t version;
    char source[8]; /* "pkcs11" | "file" */
    char state[12]; /* "creating" | "active" | "retired" */
    char label[96]; /* the token object's label */
    int64_t data_keys;
    int64_t created_ms, activated_ms, retired_ms;
} dm_custody_version_t;

/** What the operator requests answer. */
typedef struct dm_custody_report {
    char region[DM_REGION_CODE_MAX + 1];
    char source[8]; /* kek_source */
    char token[64];
    bool ready;
    char why[256]; /* when not ready */
    int32_t current;
    size_t n_versions;
    dm_custody_version_t versions[DM_CUSTODY_MAX_VERSIONS];
    /* The latest rotation (rotation_id 0: none ever). */
    int64_t rotation_id;
    int32_t target;
    char rotation_state[16]; /* running | done | superseded */
    int64_t keys_total, keys_rewrapped, keys_remaining;
    int64_t started_ms, finished_ms;
    char started_by[72], claimed_by[96], last_error[256];
    double rewrap_per_s; /* this gateway's recent rate, while it runs the rotation */
    bool replayed;       /* rotate: the request id had made its version before */
} dm_custody_report_t;

/** An operator request's answer, on the custody thread: `rep` (valid during the call) or `err`
 * (the callee's to free). */
typedef void (*dm_custody_done_fn)(void *arg, const dm_custody_report_t *rep, dm_status_t *err);
/**
 * Make a new version (C_GenerateKey in the token), make it current for new data keys at once,
 * and start re-wrapping the older ones in the background. `by` names the principal;
 * `request_id` (may be "") makes a retry answer the version it made (replayed). Errors:
 * FAILED_PRECONDITION with kek_source = "file"; ABORTED while another gateway of the region is
 * making a version; UNAVAILABLE token or database down.
 */
void dm_custody_rotate(dm_custody_t *c, const char *by, const char *request_id,
                       dm_custody_done_fn done, void *arg);
/** Versions, data keys per version and the latest rotation. */
void dm_custody_status(dm_custody_t *c, dm_custody_done_fn done, void *arg);
/**
 * Retire `version`: refused (FAILED_PRECONDITION, saying why) while it is the current one or
 * any data key uses it; NOT_FOUND for an unknown version. Then its token object is destroyed.
 */
void dm_custody_retire(dm_custody_t *c, int32_t version, const char *by, dm_custody_done_fn done,
                       void *arg);

/** Counters and gauges for /metrics. */
typedef struct dm_custody_stats {
    bool ready, token; /* token: kek_source = pkcs11 */
    int32_t current;
    int64_t wraps, unwraps, token_failures, wrap_us, unwrap_us;
    int64_t rewrapped;          /* data keys re-wrapped by this gateway since start */
    int64_t rotation_remaining; /* -1 when no rotation runs */
    int64_t oldest_active_ms;   /* since the oldest version not retired became active; -1 */
    size_t n_versions;
    int32_t version[DM_CUSTODY_MAX_VERSIONS];
    int64_t data_keys[DM_CUSTODY_MAX_VERSIONS]; /* -1 while not counted yet */
} dm_custody_stats_t;
void dm_custody_stats(dm_custody_t *c, dm_custody_stats_t *out);

#endif
