/*
 * A PKCS#11 token as src/custody uses it (private to src/custody): the module is dlopen()ed
 * at run time, initialised with CKF_OS_LOCKING_OK, the token found by its label (or slot),
 * a small pool of sessions opened and the user logged in. Keys are AES-256 secret-key objects
 * found by label; data keys are sealed with CKM_AES_GCM by the token (C_Encrypt/C_Decrypt with
 * CK_GCM_PARAMS), so a key's bytes never leave it.
 *
 * Thread-safety: every function may be called from any thread. A session is used by one
 * thread at a time (PKCS#11 sessions are not thread-safe): operations borrow one from the
 * pool. dm_token_reopen() waits for the operations in progress.
 */
#ifndef DOMICILE_CUSTODY_TOKEN_H
#define DOMICILE_CUSTODY_TOKEN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "domicile/config.h"
#include "domicile/status.h"

typedef struct dm_token dm_token_t;
typedef unsigned long dm_token_obj_t; /* a CK_OBJECT_HANDLE */

/** A closed token for region `rc` (nothing is loaded yet). */
dm_token_t *dm_token_create(const dm_region_config_t *rc, int sessions);
/** Close the sessions, finalize the module (which stays loaded) and free. NULL allowed. */
void dm_token_destroy(dm_token_t *t);
/**
 * (Re)open: finalize what is open, load the module if needed, initialize, find the token,
 * open the sessions, log in with the PIN file's contents. UNAVAILABLE naming the token and
 * the cause (a CKR_ name) on failure; the token then stays closed. A wrong or locked PIN is
 * reported with `*pin_refused` set (a retry with the same PIN would count against it).
 */
dm_status_t *dm_token_reopen(dm_token_t *t, bool *pin_refused) DM_WARN_UNUSED;
/** True while the token is open and no operation has seen it fail since. */
bool dm_token_ok(dm_token_t *t);
/** Why the token is not usable ("" while it is), copied into buf. */
void dm_token_error(dm_token_t *t, char *buf, size_t len);
/** The configured token label (for messages). */
const char *dm_token_label(const dm_token_t *t);

/**
 * Secret-key objects labelled `label`: up to `max` handles into `out`, their number in *n.
 * With `checked`, each must be a 32-byte AES key usable for encryption that is neither
 * extractable nor readable (CKA_SENSITIVE), unless `allow_extractable`; a key that is not is
 * an error (FAILED_PRECONDITION naming the label and the attribute).
 */
dm_status_t *dm_token_find(dm_token_t *t, const char *label, bool allow_extractable,
                           dm_token_obj_t *out, size_t max, size_t *n) DM_WARN_UNUSED;
/**
 * Generate a token-resident AES-256 key labelled `label` with CKA_ID `id`: private,
 * sensitive, never extractable, encrypt/decrypt only (with `extractable`, for tests only:
 * extractable and not sensitive, so that a test can read it out and look for it).
 */
dm_status_t *dm_token_generate(dm_token_t *t, const char *label, const char *id, bool extractable,
                               dm_token_obj_t *out) DM_WARN_UNUSED;
/** Destroy an object (CKR_OBJECT_HANDLE_INVALID counts as done). */
dm_status_t *dm_token_destroy_obj(dm_token_t *t, dm_token_obj_t obj) DM_WARN_UNUSED;

/**
 * AES-256-GCM in the token under `key`: `iv` (12 bytes), `aad`, `in` (`len` bytes) -> `out`
 * (encrypt: len + 16 bytes, ciphertext then tag; decrypt: `in` is ciphertext then tag,
 * `out` gets len - 16 bytes). Errors: DATA_LOSS when a decryption does not authenticate;
 * NOT_FOUND when the key object no longer exists; UNAVAILABLE when the token failed (the
 * token is then marked failed and must be reopened).
 */
dm_status_t *dm_token_gcm(dm_token_t *t, bool encrypt, dm_token_obj_t key, const unsigned char *iv,
                          const unsigned char *aad, size_t aad_len, const unsigned char *in,
                          size_t len, unsigned char *out) DM_WARN_UNUSED;

/** Operations so far, and the microseconds they took in total (metrics). */
typedef struct dm_token_stats {
    int64_t encrypts, decrypts, failures;
    int64_t encrypt_us, decrypt_us;
} dm_token_stats_t;
void dm_token_stats(dm_token_t *t, dm_token_stats_t *out);

#endif
