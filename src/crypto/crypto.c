#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/core_names.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "domicile/crypto.h"
#include "domicile/config.h"
#include "domicile/validate.h"

/* Larger files are refused by dm_config_read_secret(); anything up to this size gets our own,
 * more precise "exactly 32 bytes" message (a hex-encoded key is the likely mistake). */
#define KEK_READ_MAX 4096

/* EVP lengths are int: feed longer inputs in pieces of this size. */
#define EVP_CHUNK (1 << 30)

#define DATA_LOSS_SEAL "stored ciphertext does not authenticate"
#define DATA_LOSS_KEK  "cannot unwrap data key: authentication failed"

struct dm_kek {
    unsigned char key[DM_KEY_LEN];
    bool locked;
};

static void fatal(const char *what)
{
    fprintf(stderr, "domicile: %s\n", what);
    abort();
}

static void openssl_detail(dm_status_t *st)
{
    char buf[256];
    unsigned long e = ERR_get_error();
    ERR_error_string_n(e, buf, sizeof(buf));
    dm_status_detail(st, "openssl: %s", e ? buf : "no error queued");
    ERR_clear_error();
}

void dm_random_bytes(unsigned char *buf, size_t n)
{
    while (n > 0) {
        int chunk = n > EVP_CHUNK ? EVP_CHUNK : (int)n;
        if (RAND_bytes(buf, chunk) != 1)
            fatal("RAND_bytes failed: refusing to continue without a working CSPRNG");
        buf += chunk;
        n -= (size_t)chunk;
    }
}

dm_status_t *dm_kek_load(const char *path, dm_kek_t **out)
{
    dm_status_t *st = NULL;
    dm_kek_t *kek = NULL;
    unsigned char *buf = NULL;
    size_t len = 0;

    st = dm_config_read_secret(path, KEK_READ_MAX, &buf, &len);
    if (st)
        goto out;
    if (len != DM_KEY_LEN) {
        st = dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                           "kek file \"%s\" must hold exactly %d raw bytes (has %zu)", path,
                           DM_KEY_LEN, len);
        goto out;
    }

    /* A page of its own, so that mlock() and MADV_DONTDUMP cover the key and nothing else,
     * and munlock() on free cannot unlock a neighbour's locked memory. */
    kek = mmap(NULL, sizeof(*kek), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (kek == MAP_FAILED)
        fatal("out of memory mapping the kek");
    (void)madvise(kek, sizeof(*kek), MADV_DONTDUMP);
    /* RLIMIT_MEMLOCK is often 64 KiB or less in containers: an unlocked key still works. */
    kek->locked = mlock(kek, sizeof(*kek)) == 0;
    memcpy(kek->key, buf, DM_KEY_LEN);
    *out = kek;

out:
    if (buf) {
        OPENSSL_cleanse(buf, len);
        free(buf);
    }
    return st;
}

void dm_kek_free(dm_kek_t *kek)
{
    if (!kek)
        return;
    OPENSSL_cleanse(kek->key, sizeof(kek->key));
    if (kek->locked)
        (void)munlock(kek, sizeof(*kek));
    (void)munmap(kek, sizeof(*kek));
}

static bool aad_update(EVP_CIPHER_CTX *ctx, bool enc, const unsigned char *aad, size_t aad_len)
{
    int n;
    while (aad_len > 0) {
        int chunk = aad_len > EVP_CHUNK ? EVP_CHUNK : (int)aad_len;
        if (!(enc ? EVP_EncryptUpdate(ctx, NULL, &n, aad, chunk)
                  : EVP_DecryptUpdate(ctx, NULL, &n, aad, chunk)))
            return false;
        aad += chunk;
        aad_len -= (size_t)chunk;
    }
    return true;
}

static bool data_update(EVP_CIPHER_CTX *ctx, bool enc, const unsigned char *in, size_t len,
                        unsigned char *out)
{
    int n;
    while (len > 0) {
        int chunk = len > EVP_CHUNK ? EVP_CHUNK : (int)len;
        if (!(enc ? EVP_EncryptUpdate(ctx, out, &n, in, chunk)
                  : EVP_DecryptUpdate(ctx, out, &n, in, chunk)) ||
            n != chunk)
            return false;
        in += chunk;
        out += chunk;
        len -= (size_t)chunk;
    }
    return true;
}

/* OpenSSL 3 looks an algorithm up in its provider tables on every EVP_aes_256_gcm() init and
 * every one-shot HMAC(): 8-10 us each on this machine, against 1-3 us for an algorithm
 * fetched once (and a keyed HMAC context duplicated). A Get opens two seals and a
 * cross-border read computes three ledger HMACs, so both are fetched once here. */
static pthread_once_t algs_once = PTHREAD_ONCE_INIT;
static EVP_CIPHER *aes_gcm;
static EVP_MAC *hmac_alg;

static void algs_init(void)
{
    aes_gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    hmac_alg = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (!aes_gcm || !hmac_alg)
        fatal("OpenSSL: AES-256-GCM or HMAC not available");
}

static const EVP_CIPHER *gcm(void)
{
    pthread_once(&algs_once, algs_init);
    return aes_gcm;
}

/* Keyed HMAC-SHA256 contexts, one per key seen (ledger keys, the subject pepper): each MAC
 * duplicates one. Kept for the process's life; a key beyond the table is keyed each time. */
#define HMAC_KEYS 16
static struct {
    unsigned char key[64];
    size_t key_len;
    EVP_MAC_CTX *ctx;
} hmac_keys[HMAC_KEYS];
static int n_hmac_keys;
static pthread_mutex_t hmac_mu = PTHREAD_MUTEX_INITIALIZER;

static EVP_MAC_CTX *hmac_keyed(const unsigned char *key, size_t key_len)
{
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_end()};
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(hmac_alg);
    if (!ctx || !EVP_MAC_init(ctx, key, key_len, params))
        fatal("HMAC-SHA256: cannot key a context");
    return ctx;
}

void dm_hmac_sha256(const unsigned char *key, size_t key_len, const unsigned char *data, size_t len,
                    unsigned char out[32])
{
    EVP_MAC_CTX *base = NULL, *ctx;
    size_t olen = 0;

    pthread_once(&algs_once, algs_init);
    if (key_len <= sizeof(hmac_keys[0].key)) {
        pthread_mutex_lock(&hmac_mu);
        for (int i = 0; i < n_hmac_keys && !base; i++)
            if (hmac_keys[i].key_len == key_len &&
                CRYPTO_memcmp(hmac_keys[i].key, key, key_len) == 0)
                base = hmac_keys[i].ctx;
        if (!base && n_hmac_keys < HMAC_KEYS) {
            base = hmac_keyed(key, key_len);
            memcpy(hmac_keys[n_hmac_keys].key, key, key_len);
            hmac_keys[n_hmac_keys].key_len = key_len;
            hmac_keys[n_hmac_keys].ctx = base;
            n_hmac_keys++;
        }
        pthread_mutex_unlock(&hmac_mu);
    }
    /* Duplicating only reads the keyed context, so threads may do it at once. */
    ctx = base ? EVP_MAC_CTX_dup(base) : hmac_keyed(key, key_len);
    if (!ctx || !EVP_MAC_update(ctx, data, len) || !EVP_MAC_final(ctx, out, &olen, 32) ||
        olen != 32)
        fatal("HMAC-SHA256 failed");
    EVP_MAC_CTX_free(ctx);
}

/* Writes format || nonce || ct || tag (pt_len + DM_SEAL_OVERHEAD bytes) to `out`. */
static bool gcm_seal(const unsigned char key[DM_KEY_LEN], const unsigned char *aad, size_t aad_len,
                     const unsigned char *pt, size_t pt_len, unsigned char *out)
{
    bool ok = false;
    int n;
    unsigned char *nonce = out + 1, *ct = nonce + DM_SEAL_NONCE_LEN, *tag = ct + pt_len;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();

    if (!ctx)
        goto out;
    out[0] = DM_SEAL_FORMAT;
    /* Random 96-bit nonces: collision risk stays below 2^-32 for 2^32 seals under one key,
     * far above what a single customer or subject key will see. */
    dm_random_bytes(nonce, DM_SEAL_NONCE_LEN);
    if (!EVP_EncryptInit_ex(ctx, gcm(), NULL, key, nonce))
        goto out;
    if (!aad_update(ctx, true, aad, aad_len) || !data_update(ctx, true, pt, pt_len, ct))
        goto out;
    if (!EVP_EncryptFinal_ex(ctx, ct + pt_len, &n) || n != 0)
        goto out;
    if (!EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, DM_SEAL_TAG_LEN, tag))
        goto out;
    ok = true;

out:
    EVP_CIPHER_CTX_free(ctx); /* cleanses the key schedule */
    return ok;
}

/* Decrypts `in` (as written by gcm_seal) into `pt` (in_len - DM_SEAL_OVERHEAD bytes). On false
 * `pt` may hold unauthenticated plaintext: the caller must cleanse it. */
static bool gcm_open(const unsigned char key[DM_KEY_LEN], const unsigned char *aad, size_t aad_len,
                     const unsigned char *in, size_t in_len, unsigned char *pt)
{
    bool ok = false;
    int n;
    unsigned char tag[DM_SEAL_TAG_LEN];
    const unsigned char *nonce, *ct;
    size_t ct_len;
    EVP_CIPHER_CTX *ctx = NULL;

    if (in_len < DM_SEAL_OVERHEAD || in[0] != DM_SEAL_FORMAT)
        goto out;
    nonce = in + 1;
    ct = nonce + DM_SEAL_NONCE_LEN;
    ct_len = in_len - DM_SEAL_OVERHEAD;
    /* EVP_CTRL_GCM_SET_TAG takes a non-const pointer. */
    memcpy(tag, ct + ct_len, DM_SEAL_TAG_LEN);

    ctx = EVP_CIPHER_CTX_new();
    if (!ctx)
        goto out;
    if (!EVP_DecryptInit_ex(ctx, gcm(), NULL, key, nonce))
        goto out;
    if (!aad_update(ctx, false, aad, aad_len) || !data_update(ctx, false, ct, ct_len, pt))
        goto out;
    if (!EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, DM_SEAL_TAG_LEN, tag))
        goto out;
    if (EVP_DecryptFinal_ex(ctx, pt + ct_len, &n) != 1 || n != 0)
        goto out;
    ok = true;

out:
    EVP_CIPHER_CTX_free(ctx);
    ERR_clear_error();
    return ok;
}

dm_status_t *dm_seal(const unsigned char key[DM_KEY_LEN], const unsigned char *aad, size_t aad_len,
                     const unsigned char *pt, size_t pt_len, unsigned char **out, size_t *out_len)
{
    dm_status_t *st = NULL;
    unsigned char *buf = NULL;

    if (pt_len > SIZE_MAX - DM_SEAL_OVERHEAD) {
        st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "plaintext too large to seal");
        goto out;
    }
    buf = dm_malloc(pt_len + DM_SEAL_OVERHEAD);
    if (!gcm_seal(key, aad, aad_len, pt, pt_len, buf)) {
        st = dm_status_new(GRPC_STATUS_INTERNAL, "cannot encrypt");
        openssl_detail(st);
        goto out;
    }
    *out = buf;
    *out_len = pt_len + DM_SEAL_OVERHEAD;
    buf = NULL;

out:
    free(buf); /* ciphertext only: nothing to cleanse */
    return st;
}

dm_status_t *dm_open(const unsigned char key[DM_KEY_LEN], const unsigned char *aad, size_t aad_len,
                     const unsigned char *ct, size_t ct_len, unsigned char **out, size_t *out_len)
{
    dm_status_t *st = NULL;
    unsigned char *pt = NULL;
    size_t pt_len = 0;

    if (ct_len < DM_SEAL_OVERHEAD) {
        st = dm_status_new(GRPC_STATUS_DATA_LOSS, DATA_LOSS_SEAL);
        goto out;
    }
    pt_len = ct_len - DM_SEAL_OVERHEAD;
    pt = dm_malloc(pt_len);
    if (!gcm_open(key, aad, aad_len, ct, ct_len, pt)) {
        st = dm_status_new(GRPC_STATUS_DATA_LOSS, DATA_LOSS_SEAL);
        goto out;
    }
    *out = pt;
    *out_len = pt_len;
    pt = NULL;

out:
    if (pt) {
        OPENSSL_cleanse(pt, pt_len);
        free(pt);
    }
    return st;
}

dm_status_t *dm_dek_wrap(const dm_kek_t *kek, const unsigned char dek[DM_KEY_LEN],
                         const unsigned char *aad, size_t aad_len, unsigned char **out,
                         size_t *out_len)
{
    return dm_seal(kek->key, aad, aad_len, dek, DM_KEY_LEN, out, out_len);
}

dm_status_t *dm_dek_unwrap(const dm_kek_t *kek, const unsigned char *wrapped, size_t len,
                           const unsigned char *aad, size_t aad_len, unsigned char dek[DM_KEY_LEN])
{
    dm_status_t *st = NULL;
    unsigned char tmp[DM_KEY_LEN];

    if (len != DM_WRAPPED_KEY_LEN || !gcm_open(kek->key, aad, aad_len, wrapped, len, tmp)) {
        st = dm_status_new(GRPC_STATUS_DATA_LOSS, DATA_LOSS_KEK);
        goto out;
    }
    memcpy(dek, tmp, DM_KEY_LEN);

out:
    OPENSSL_cleanse(tmp, sizeof(tmp));
    return st;
}

unsigned char *dm_aad(size_t *out_len, size_t n_parts, const dm_aad_part_t *parts)
{
    size_t total = 0;
    for (size_t i = 0; i < n_parts; i++) {
        if (parts[i].len > UINT32_MAX || parts[i].len > SIZE_MAX - 4 - total)
            fatal("dm_aad: part too long");
        total += 4 + parts[i].len;
    }
    unsigned char *buf = dm_malloc(total), *p = buf;
    for (size_t i = 0; i < n_parts; i++) {
        uint32_t l = (uint32_t)parts[i].len;
        *p++ = (unsigned char)(l >> 24);
        *p++ = (unsigned char)(l >> 16);
        *p++ = (unsigned char)(l >> 8);
        *p++ = (unsigned char)l;
        if (l) {
            memcpy(p, parts[i].data, l);
            p += l;
        }
    }
    *out_len = total;
    return buf;
}

unsigned char *dm_key_aad(const char *region, const char *customer, const unsigned char *sk,
                          size_t sk_len, size_t *len)
{
    return DM_AAD(len, DM_AAD_STR("domicile-dek-v1"), DM_AAD_STR(region), DM_AAD_STR(customer),
                  DM_AAD_BYTES(sk ? (const void *)sk : "", sk ? sk_len : 0));
}

unsigned char *dm_record_aad(const char *region, const char *customer, const char *record_id,
                             size_t *len)
{
    return DM_AAD(len, DM_AAD_STR("domicile-record-v1"), DM_AAD_STR(region), DM_AAD_STR(customer),
                  DM_AAD_STR(record_id));
}

static bool ascii_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

dm_status_t *dm_subject_normalize(const char *subject, char **out)
{
    const unsigned char *s = (const unsigned char *)subject;
    size_t start = 0, end = strlen(subject);

    while (start < end && ascii_space(s[start]))
        start++;
    while (end > start && ascii_space(s[end - 1]))
        end--;
    size_t len = end - start;
    if (len == 0 || len > DM_SUBJECT_MAX || !dm_utf8_valid(subject + start, len))
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "subject: must be 1..%d bytes of UTF-8 after trimming",
                             DM_SUBJECT_MAX);

    char *n = dm_malloc(len + 1);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = s[start + i];
        n[i] = (char)(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
    }
    n[len] = '\0';
    *out = n;
    return NULL;
}

void dm_subject_key(const unsigned char *pepper, size_t pepper_len, const char *normalized,
                    unsigned char out[DM_SUBJECT_KEY_LEN])
{
    _Static_assert(DM_SUBJECT_KEY_LEN == 32, "subject keys are HMAC-SHA256 values");
    dm_hmac_sha256(pepper, pepper_len, (const unsigned char *)normalized, strlen(normalized), out);
}

void dm_hex_encode(const unsigned char *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 0x0f];
    }
    out[2 * n] = '\0';
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

bool dm_hex_decode(const char *hex, unsigned char *out, size_t out_len)
{
    /* Validate everything first so that `out` is untouched on failure. */
    for (size_t i = 0; i < 2 * out_len; i++)
        if (hex[i] == '\0' || hex_value(hex[i]) < 0)
            return false;
    if (hex[2 * out_len] != '\0')
        return false;
    for (size_t i = 0; i < out_len; i++)
        out[i] = (unsigned char)(hex_value(hex[2 * i]) << 4 | hex_value(hex[2 * i + 1]));
    return true;
}
