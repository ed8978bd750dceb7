/*
 * Envelope encryption and subject keys (DESIGN.md §2).
 *
 * Payloads are sealed with AES-256-GCM under data keys (one per customer, one per
 * (customer, subject)). Data keys are stored wrapped by the region's key-encryption key (KEK).
 * The AAD binds region, customer and record id, so ciphertext moved between rows or regions does
 * not decrypt. Subjects are stored only as HMAC-SHA256(pepper, normalised subject).
 *
 * Sealed format (payloads and wrapped data keys alike):
 *     0x01 (format) || nonce (12, random) || ciphertext (same length as plaintext) || tag (16)
 *
 * Thread-safety: every function may be called from any thread; the only shared state is a
 * loaded dm_kek_t, which is read-only until dm_kek_free().
 */
#ifndef DOMICILE_CRYPTO_H
#define DOMICILE_CRYPTO_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

#include "domicile/status.h"

#define DM_KEY_LEN         32 /* AES-256 key */
#define DM_SUBJECT_KEY_LEN 32 /* HMAC-SHA256 output */
#define DM_SEAL_FORMAT     0x01
#define DM_SEAL_NONCE_LEN  12
#define DM_SEAL_TAG_LEN    16
/** Bytes a sealed value adds to its plaintext: format byte, nonce and tag (29). */
#define DM_SEAL_OVERHEAD (1 + DM_SEAL_NONCE_LEN + DM_SEAL_TAG_LEN)
/** Length of a wrapped data key (61). */
#define DM_WRAPPED_KEY_LEN (DM_SEAL_OVERHEAD + DM_KEY_LEN)
/** Longest subject accepted, in bytes after trimming. */
#define DM_SUBJECT_MAX 320

/** A region's key-encryption key. Opaque; the key bytes are never exposed. */
typedef struct dm_kek dm_kek_t;

/**
 * Load a KEK from `path`: a regular file, no group/other permission bits, exactly 32 raw bytes.
 * The key is kept in its own page, locked in memory where mlock() allows (failure is ignored)
 * and excluded from core dumps; dm_kek_free() cleanses it.
 * On success *out is a new KEK owned by the caller. On failure *out is untouched and the status
 * is FAILED_PRECONDITION naming the file and what is wrong (its mode, its size, open errors).
 */
dm_status_t *dm_kek_load(const char *path, dm_kek_t **out) DM_WARN_UNUSED;
/** Cleanse, unlock and free a KEK; NULL is allowed. */
void dm_kek_free(dm_kek_t *kek);

/** Fill `buf` with `n` bytes from the OpenSSL CSPRNG. Aborts the process if it fails. */
void dm_random_bytes(unsigned char *buf, size_t n);

/* HMAC-SHA256 of data under key (a keyed context is kept per distinct key, up to 16). */
void dm_hmac_sha256(const unsigned char *key, size_t key_len, const unsigned char *data, size_t len,
                    unsigned char out[32]);

/**
 * Wrap data key `dek` under `kek` (AES-256-GCM, random nonce). `aad` (may be NULL when
 * `aad_len` is 0) is the context the wrapped key is bound to; build it with DM_AAD() from
 * region, customer and subject key. On success *out (DM_WRAPPED_KEY_LEN bytes, the caller's,
 * free with free()) and *out_len are set. Errors: INTERNAL if OpenSSL fails.
 */
dm_status_t *dm_dek_wrap(const dm_kek_t *kek, const unsigned char dek[DM_KEY_LEN],
                         const unsigned char *aad, size_t aad_len, unsigned char **out,
                         size_t *out_len) DM_WARN_UNUSED;
/**
 * Unwrap a data key wrapped by dm_dek_wrap() with the same KEK and AAD into `dek` (the
 * caller's buffer; cleanse it after use). On any failure (wrong length, unknown format byte,
 * tag mismatch: a different KEK, a different AAD, or tampering) `dek` is untouched and the
 * status is DATA_LOSS "cannot unwrap data key: authentication failed".
 */
dm_status_t *dm_dek_unwrap(const dm_kek_t *kek, const unsigned char *wrapped, size_t len,
                           const unsigned char *aad, size_t aad_len,
                           unsigned char dek[DM_KEY_LEN]) DM_WARN_UNUSED;

/**
 * Seal `pt` (`pt_len` bytes; may be 0, `pt` may then be NULL) under `key` with `aad`.
 * On success *out (pt_len + DM_SEAL_OVERHEAD bytes, the caller's, free with free()) and
 * *out_len are set. Errors: INVALID_ARGUMENT if the sealed length would overflow size_t;
 * INTERNAL if OpenSSL fails.
 */
dm_status_t *dm_seal(const unsigned char key[DM_KEY_LEN], const unsigned char *aad, size_t aad_len,
                     const unsigned char *pt, size_t pt_len, unsigned char **out,
                     size_t *out_len) DM_WARN_UNUSED;
/**
 * Open a value sealed by dm_seal() with the same key and AAD. On success *out (plaintext,
 * *out_len bytes, possibly 0) belongs to the caller, who must OPENSSL_cleanse() it before
 * free(). On any failure (too short, unknown format byte, tag mismatch) *out is untouched, no
 * plaintext is released, and the status is DATA_LOSS "stored ciphertext does not authenticate".
 */
dm_status_t *dm_open(const unsigned char key[DM_KEY_LEN], const unsigned char *aad, size_t aad_len,
                     const unsigned char *ct, size_t ct_len, unsigned char **out,
                     size_t *out_len) DM_WARN_UNUSED;

/** One part of an AAD: `len` bytes at `data` (`data` may be NULL when `len` is 0). */
typedef struct dm_aad_part {
    const void *data;
    size_t len;
} dm_aad_part_t;

/** A part from a pointer and a length. */
#define DM_AAD_BYTES(p, n) ((dm_aad_part_t){(p), (n)})
/** A part from a NUL-terminated string (the NUL is not included). */
#define DM_AAD_STR(s) ((dm_aad_part_t){(s), strlen(s)})

/**
 * Encode `n_parts` byte strings unambiguously: each as a 4-byte big-endian length followed by
 * its bytes, so ("ab", "c") and ("a", "bc") differ. Returns a new buffer (the caller's, free with
 * free()) and its length in *out_len. A part longer than UINT32_MAX bytes is a programming error
 * and aborts. Prefer the DM_AAD() macro, which counts the parts for you.
 */
unsigned char *dm_aad(size_t *out_len, size_t n_parts, const dm_aad_part_t *parts);
/**
 * DM_AAD(&len, DM_AAD_STR(region), DM_AAD_STR(customer_id), DM_AAD_BYTES(rec, rec_len)):
 * dm_aad() over the listed parts. Type-checked (unlike a variadic), the count is derived.
 */
#define DM_AAD(out_len, ...)                                                                       \
    dm_aad((out_len), sizeof((dm_aad_part_t[]){__VA_ARGS__}) / sizeof(dm_aad_part_t),              \
           (dm_aad_part_t[]){__VA_ARGS__})

/** AAD of a wrapped data key: region, customer, subject key (empty for the customer key).
 * A new buffer (the caller's, free with free()). */
unsigned char *dm_key_aad(const char *region, const char *customer, const unsigned char *sk,
                          size_t sk_len, size_t *len);
/** AAD of a record payload: region, customer, record id. A new buffer (free with free()). */
unsigned char *dm_record_aad(const char *region, const char *customer, const char *record_id,
                             size_t *len);

/**
 * Normalise a subject before keying it: trim ASCII whitespace (space, \t, \n, \v, \f, \r) at
 * both ends and lower-case ASCII letters. Bytes >= 0x80 are left as they are: Unicode case
 * folding and normalisation (NFC/NFKC) are NOT done, so callers must send one consistent form of
 * a non-ASCII subject. The result must be valid UTF-8 of 1..DM_SUBJECT_MAX bytes.
 * On success *out is a new NUL-terminated string (the caller's; it is personal data, so
 * OPENSSL_cleanse() it before free()). On failure *out is untouched and the status is
 * INVALID_ARGUMENT "subject: must be 1..320 bytes of UTF-8 after trimming".
 */
dm_status_t *dm_subject_normalize(const char *subject, char **out) DM_WARN_UNUSED;
/**
 * out = HMAC-SHA256(pepper, normalized). `normalized` should come from dm_subject_normalize().
 * `pepper` stays the caller's. Aborts if OpenSSL fails (it cannot, short of memory).
 */
void dm_subject_key(const unsigned char *pepper, size_t pepper_len, const char *normalized,
                    unsigned char out[DM_SUBJECT_KEY_LEN]);

/** Lower-case hex of `n` bytes into `out`, which must hold 2n+1 bytes (NUL-terminated). */
void dm_hex_encode(const unsigned char *in, size_t n, char *out);
/**
 * Decode `hex` (either case) into exactly `out_len` bytes. False, with `out` untouched, unless
 * `hex` is exactly 2*out_len hex digits.
 */
bool dm_hex_decode(const char *hex, unsigned char *out, size_t out_len) DM_WARN_UNUSED;

#endif
