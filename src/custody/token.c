#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

#include <p11-kit/pkcs11.h>

#include "domicile/log.h"
#include "token.h"

#define PIN_MAX     256
#define MAX_SESSION 64
#define GCM_IV_LEN  12
#define GCM_TAG     16

struct dm_token {
    const dm_region_config_t *rc;
    int n_sessions;

    /* Held shared by every operation, exclusively by reopen and destroy. */
    pthread_rwlock_t life;
    void *dl; /* the module stays loaded once loaded: unloading it is not safe in general */
    CK_FUNCTION_LIST_PTR f;
    bool initialized; /* by us: C_Finalize on reopen and destroy */
    CK_SLOT_ID slot;
    atomic_bool ok;

    pthread_mutex_t mu; /* the free sessions and the error text */
    pthread_cond_t cv;
    CK_SESSION_HANDLE sessions[MAX_SESSION];
    int n_open, n_free;
    CK_SESSION_HANDLE free_list[MAX_SESSION];
    char error[256];

    atomic_llong encrypts, decrypts, failures, encrypt_us, decrypt_us;
};

static const struct {
    CK_RV rv;
    const char *name;
} rv_names[] = {
    {CKR_OK, "CKR_OK"},
    {CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR"},
    {CKR_HOST_MEMORY, "CKR_HOST_MEMORY"},
    {CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD"},
    {CKR_ATTRIBUTE_TYPE_INVALID, "CKR_ATTRIBUTE_TYPE_INVALID"},
    {CKR_ATTRIBUTE_VALUE_INVALID, "CKR_ATTRIBUTE_VALUE_INVALID"},
    {CKR_DEVICE_ERROR, "CKR_DEVICE_ERROR"},
    {CKR_DEVICE_MEMORY, "CKR_DEVICE_MEMORY"},
    {CKR_DEVICE_REMOVED, "CKR_DEVICE_REMOVED"},
    {CKR_ENCRYPTED_DATA_INVALID, "CKR_ENCRYPTED_DATA_INVALID"},
    {CKR_ENCRYPTED_DATA_LEN_RANGE, "CKR_ENCRYPTED_DATA_LEN_RANGE"},
    {CKR_FUNCTION_FAILED, "CKR_FUNCTION_FAILED"},
    {CKR_KEY_HANDLE_INVALID, "CKR_KEY_HANDLE_INVALID"},
    {CKR_KEY_TYPE_INCONSISTENT, "CKR_KEY_TYPE_INCONSISTENT"},
    {CKR_KEY_FUNCTION_NOT_PERMITTED, "CKR_KEY_FUNCTION_NOT_PERMITTED"},
    {CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID"},
    {CKR_MECHANISM_PARAM_INVALID, "CKR_MECHANISM_PARAM_INVALID"},
    {CKR_OBJECT_HANDLE_INVALID, "CKR_OBJECT_HANDLE_INVALID"},
    {CKR_OPERATION_ACTIVE, "CKR_OPERATION_ACTIVE"},
    {CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT"},
    {CKR_PIN_INVALID, "CKR_PIN_INVALID"},
    {CKR_PIN_LEN_RANGE, "CKR_PIN_LEN_RANGE"},
    {CKR_PIN_EXPIRED, "CKR_PIN_EXPIRED"},
    {CKR_PIN_LOCKED, "CKR_PIN_LOCKED"},
    {CKR_SESSION_CLOSED, "CKR_SESSION_CLOSED"},
    {CKR_SESSION_COUNT, "CKR_SESSION_COUNT"},
    {CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID"},
    {CKR_SLOT_ID_INVALID, "CKR_SLOT_ID_INVALID"},
    {CKR_TOKEN_NOT_PRESENT, "CKR_TOKEN_NOT_PRESENT"},
    {CKR_TOKEN_NOT_RECOGNIZED, "CKR_TOKEN_NOT_RECOGNIZED"},
    {CKR_TOKEN_WRITE_PROTECTED, "CKR_TOKEN_WRITE_PROTECTED"},
    {CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN"},
    {CKR_USER_PIN_NOT_INITIALIZED, "CKR_USER_PIN_NOT_INITIALIZED"},
    {CKR_TEMPLATE_INCONSISTENT, "CKR_TEMPLATE_INCONSISTENT"},
    {CKR_TEMPLATE_INCOMPLETE, "CKR_TEMPLATE_INCOMPLETE"},
    {CKR_BUFFER_TOO_SMALL, "CKR_BUFFER_TOO_SMALL"},
    {CKR_CRYPTOKI_NOT_INITIALIZED, "CKR_CRYPTOKI_NOT_INITIALIZED"},
    {CKR_CRYPTOKI_ALREADY_INITIALIZED, "CKR_CRYPTOKI_ALREADY_INITIALIZED"},
};

static const char *rv_name(CK_RV rv)
{
    static _Thread_local char buf[24];
    for (size_t i = 0; i < DM_ARRAY_LEN(rv_names); i++)
        if (rv_names[i].rv == rv)
            return rv_names[i].name;
    snprintf(buf, sizeof(buf), "CKR_0x%lx", (unsigned long)rv);
    return buf;
}

/* Failures after which the sessions (or the whole module) must be opened again. */
static bool rv_fatal(CK_RV rv)
{
    switch (rv) {
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_MEMORY:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
    case CKR_GENERAL_ERROR:
    case CKR_HOST_MEMORY:
        return true;
    default:
        return false;
    }
}

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static dm_status_t *unavailable(dm_token_t *t, const char *fmt, ...) DM_PRINTF(2, 3);

/* Marks the token failed, remembers why, and returns UNAVAILABLE saying it. */
static dm_status_t *unavailable(dm_token_t *t, const char *fmt, ...)
{
    char what[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    atomic_store(&t->ok, false);
    pthread_mutex_lock(&t->mu);
    snprintf(t->error, sizeof(t->error), "token \"%s\": %s", t->rc->pkcs11_token, what);
    pthread_mutex_unlock(&t->mu);
    return dm_status_new(GRPC_STATUS_UNAVAILABLE, "region \"%s\": key token \"%s\": %s",
                         t->rc->code, t->rc->pkcs11_token, what);
}

dm_token_t *dm_token_create(const dm_region_config_t *rc, int sessions)
{
    dm_token_t *t = dm_calloc(1, sizeof(*t));
    t->rc = rc;
    t->n_sessions = sessions < 1 ? 1 : sessions > MAX_SESSION ? MAX_SESSION : sessions;
    pthread_rwlock_init(&t->life, NULL);
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, NULL);
    snprintf(t->error, sizeof(t->error), "token \"%s\": not opened yet", rc->pkcs11_token);
    return t;
}

/* With `life` held exclusively. */
static void close_all(dm_token_t *t)
{
    atomic_store(&t->ok, false);
    if (t->f) {
        for (int i = 0; i < t->n_open; i++)
            (void)t->f->C_CloseSession(t->sessions[i]);
        if (t->initialized)
            (void)t->f->C_Finalize(NULL);
    }
    t->initialized = false;
    t->n_open = t->n_free = 0;
}

void dm_token_destroy(dm_token_t *t)
{
    if (!t)
        return;
    pthread_rwlock_wrlock(&t->life);
    close_all(t);
    pthread_rwlock_unlock(&t->life);
    pthread_rwlock_destroy(&t->life);
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
    free(t);
}

static bool label_is(const unsigned char *field, size_t n, const char *label)
{
    size_t len = strlen(label);
    if (len > n || memcmp(field, label, len) != 0)
        return false;
    for (size_t i = len; i < n; i++)
        if (field[i] != ' ' && field[i] != '\0')
            return false;
    return true;
}

static dm_status_t *read_pin(dm_token_t *t, char pin[PIN_MAX + 1], size_t *len)
{
    unsigned char *buf = NULL;
    size_t n = 0;
    dm_status_t *st = dm_config_read_secret(t->rc->pkcs11_pin_file, PIN_MAX, &buf, &n);
    if (st) {
        dm_status_t *u = unavailable(t, "%s", st->message);
        dm_status_free(st);
        return u;
    }
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        n--;
    memcpy(pin, buf, n);
    pin[n] = '\0';
    *len = n;
    OPENSSL_cleanse(buf, n);
    free(buf);
    return NULL;
}

static dm_status_t *open_locked(dm_token_t *t, bool *pin_refused)
{
    CK_RV rv;
    *pin_refused = false;
    if (!t->dl) {
        t->dl = dlopen(t->rc->pkcs11_module, RTLD_NOW | RTLD_LOCAL);
        if (!t->dl)
            return unavailable(t, "cannot load module \"%s\": %s", t->rc->pkcs11_module, dlerror());
        CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(t->dl, "C_GetFunctionList");
        if (!get || get(&t->f) != CKR_OK || !t->f) {
            t->f = NULL;
            return unavailable(t, "module \"%s\" has no usable C_GetFunctionList",
                               t->rc->pkcs11_module);
        }
    }
    /* The module makes its own locks (OS threads); we call it from many threads. */
    CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
    rv = t->f->C_Initialize(&args);
    if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED)
        return unavailable(t, "C_Initialize: %s", rv_name(rv));
    t->initialized = rv == CKR_OK;

    CK_ULONG n = 0;
    CK_SLOT_ID slots[64];
    rv = t->f->C_GetSlotList(CK_TRUE, NULL, &n);
    if (rv == CKR_OK) {
        n = n > 64 ? 64 : n;
        rv = t->f->C_GetSlotList(CK_TRUE, slots, &n);
    }
    if (rv != CKR_OK)
        return unavailable(t, "C_GetSlotList: %s", rv_name(rv));
    bool found = false;
    for (CK_ULONG i = 0; i < n && !found; i++) {
        CK_TOKEN_INFO ti;
        if (t->rc->pkcs11_slot >= 0 && slots[i] != (CK_SLOT_ID)t->rc->pkcs11_slot)
            continue;
        if (t->f->C_GetTokenInfo(slots[i], &ti) != CKR_OK)
            continue;
        if (label_is(ti.label, sizeof(ti.label), t->rc->pkcs11_token)) {
            t->slot = slots[i];
            found = true;
        }
    }
    if (!found)
        return unavailable(t, "no token with this label in module \"%s\"%s", t->rc->pkcs11_module,
                           t->rc->pkcs11_slot >= 0 ? " at pkcs11_slot" : "");
    for (int i = 0; i < t->n_sessions; i++) {
        rv = t->f->C_OpenSession(t->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
                                 &t->sessions[i]);
        if (rv != CKR_OK)
            return unavailable(t, "C_OpenSession: %s", rv_name(rv));
        t->n_open++;
        t->free_list[t->n_free++] = t->sessions[i];
    }
    char pin[PIN_MAX + 1];
    size_t pin_len = 0;
    dm_status_t *st = read_pin(t, pin, &pin_len);
    if (st)
        return st;
    /* Login is per application: one session logs all of ours in. */
    rv = t->f->C_Login(t->sessions[0], CKU_USER, (CK_UTF8CHAR_PTR)pin, pin_len);
    OPENSSL_cleanse(pin, sizeof(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        *pin_refused = rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LOCKED || rv == CKR_PIN_EXPIRED ||
                       rv == CKR_PIN_INVALID || rv == CKR_PIN_LEN_RANGE;
        return unavailable(t, "login refused: %s", rv_name(rv));
    }
    return NULL;
}

dm_status_t *dm_token_reopen(dm_token_t *t, bool *pin_refused)
{
    pthread_rwlock_wrlock(&t->life);
    close_all(t);
    dm_status_t *st = open_locked(t, pin_refused);
    if (st) {
        close_all(t);
    } else {
        pthread_mutex_lock(&t->mu);
        t->error[0] = '\0';
        pthread_mutex_unlock(&t->mu);
        atomic_store(&t->ok, true);
    }
    pthread_rwlock_unlock(&t->life);
    return st;
}

bool dm_token_ok(dm_token_t *t)
{
    return atomic_load(&t->ok);
}

void dm_token_error(dm_token_t *t, char *buf, size_t len)
{
    pthread_mutex_lock(&t->mu);
    snprintf(buf, len, "%s", atomic_load(&t->ok) ? "" : t->error);
    pthread_mutex_unlock(&t->mu);
}

const char *dm_token_label(const dm_token_t *t)
{
    return t->rc->pkcs11_token;
}

/* Borrow a session (with `life` held shared); NULL when the token is not open. */
static dm_status_t *borrow(dm_token_t *t, CK_SESSION_HANDLE *s)
{
    pthread_rwlock_rdlock(&t->life);
    if (!atomic_load(&t->ok) || t->n_open == 0) {
        pthread_rwlock_unlock(&t->life);
        char why[256];
        dm_token_error(t, why, sizeof(why));
        return dm_status_new(GRPC_STATUS_UNAVAILABLE, "region \"%s\": key %s", t->rc->code,
                             why[0] ? why : "token is not open");
    }
    pthread_mutex_lock(&t->mu);
    while (t->n_free == 0)
        pthread_cond_wait(&t->cv, &t->mu);
    *s = t->free_list[--t->n_free];
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

static void give_back(dm_token_t *t, CK_SESSION_HANDLE s)
{
    pthread_mutex_lock(&t->mu);
    t->free_list[t->n_free++] = s;
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
    pthread_rwlock_unlock(&t->life);
}

/* The status for a failed call `what` (the session is given back by the caller). */
static dm_status_t *failed(dm_token_t *t, const char *what, CK_RV rv)
{
    atomic_fetch_add(&t->failures, 1);
    if (rv_fatal(rv))
        return unavailable(t, "%s: %s", what, rv_name(rv));
    if (rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID)
        return dm_status_new(GRPC_STATUS_NOT_FOUND, "region \"%s\": key token \"%s\": %s: %s",
                             t->rc->code, t->rc->pkcs11_token, what, rv_name(rv));
    return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION, "region \"%s\": key token \"%s\": %s: %s",
                         t->rc->code, t->rc->pkcs11_token, what, rv_name(rv));
}

static dm_status_t *check_key(dm_token_t *t, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o,
                              const char *label, bool allow_extractable)
{
    CK_KEY_TYPE type = 0;
    CK_ULONG vlen = 0;
    CK_BBOOL extractable = CK_TRUE, sensitive = CK_FALSE, never = CK_FALSE, encrypt = CK_FALSE;
    CK_ATTRIBUTE a[] = {
        {CKA_KEY_TYPE, &type, sizeof(type)},
        {CKA_VALUE_LEN, &vlen, sizeof(vlen)},
        {CKA_EXTRACTABLE, &extractable, sizeof(extractable)},
        {CKA_SENSITIVE, &sensitive, sizeof(sensitive)},
        {CKA_NEVER_EXTRACTABLE, &never, sizeof(never)},
        {CKA_ENCRYPT, &encrypt, sizeof(encrypt)},
    };
    CK_RV rv = t->f->C_GetAttributeValue(s, o, a, DM_ARRAY_LEN(a));
    if (rv != CKR_OK)
        return failed(t, "C_GetAttributeValue", rv);
    const char *bad = NULL;
    if (type != CKK_AES || vlen != 32)
        bad = "is not an AES-256 key";
    else if (!encrypt)
        bad = "does not allow encryption (CKA_ENCRYPT false)";
    else if (!allow_extractable && (extractable || !sensitive || !never))
        bad = "is or was extractable (CKA_EXTRACTABLE, CKA_SENSITIVE, CKA_NEVER_EXTRACTABLE): a "
              "key-encryption key must never leave the token";
    if (bad)
        return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                             "region \"%s\": key \"%s\" in token \"%s\" %s", t->rc->code, label,
                             t->rc->pkcs11_token, bad);
    return NULL;
}

dm_status_t *dm_token_find(dm_token_t *t, const char *label, bool allow_extractable,
                           dm_token_obj_t *out, size_t max, size_t *n)
{
    CK_SESSION_HANDLE s;
    dm_status_t *st = borrow(t, &s);
    if (st)
        return st;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof(cls)},
                           {CKA_LABEL, (void *)label, strlen(label)}};
    CK_OBJECT_HANDLE found[16];
    CK_ULONG count = 0;
    CK_RV rv = t->f->C_FindObjectsInit(s, tmpl, DM_ARRAY_LEN(tmpl));
    if (rv == CKR_OK) {
        rv = t->f->C_FindObjects(s, found, DM_ARRAY_LEN(found), &count);
        CK_RV rv2 = t->f->C_FindObjectsFinal(s);
        if (rv == CKR_OK)
            rv = rv2;
    }
    if (rv != CKR_OK) {
        st = failed(t, "C_FindObjects", rv);
        goto out;
    }
    *n = 0;
    for (CK_ULONG i = 0; i < count && *n < max; i++) {
        if ((st = check_key(t, s, found[i], label, allow_extractable)))
            goto out;
        out[(*n)++] = found[i];
    }

out:
    give_back(t, s);
    return st;
}

dm_status_t *dm_token_generate(dm_token_t *t, const char *label, const char *id, bool extractable,
                               dm_token_obj_t *out)
{
    CK_SESSION_HANDLE s;
    dm_status_t *st = borrow(t, &s);
    if (st)
        return st;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_AES;
    CK_ULONG vlen = 32;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_BBOOL sens = extractable ? CK_FALSE : CK_TRUE, extr = extractable ? CK_TRUE : CK_FALSE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &type, sizeof(type)},
        {CKA_VALUE_LEN, &vlen, sizeof(vlen)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &sens, sizeof(sens)},
        {CKA_EXTRACTABLE, &extr, sizeof(extr)},
        {CKA_ENCRYPT, &yes, sizeof(yes)},
        {CKA_DECRYPT, &yes, sizeof(yes)},
        {CKA_WRAP, &no, sizeof(no)},
        {CKA_UNWRAP, &no, sizeof(no)},
        {CKA_SIGN, &no, sizeof(no)},
        {CKA_VERIFY, &no, sizeof(no)},
        {CKA_DERIVE, &no, sizeof(no)},
        {CKA_LABEL, (void *)label, strlen(label)},
        {CKA_ID, (void *)id, strlen(id)},
    };
    CK_MECHANISM mech = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_HANDLE h = 0;
    CK_RV rv = t->f->C_GenerateKey(s, &mech, tmpl, DM_ARRAY_LEN(tmpl), &h);
    if (rv != CKR_OK)
        st = failed(t, "C_GenerateKey", rv);
    else
        *out = h;
    give_back(t, s);
    return st;
}

dm_status_t *dm_token_destroy_obj(dm_token_t *t, dm_token_obj_t obj)
{
    CK_SESSION_HANDLE s;
    dm_status_t *st = borrow(t, &s);
    if (st)
        return st;
    CK_RV rv = t->f->C_DestroyObject(s, obj);
    if (rv != CKR_OK && rv != CKR_OBJECT_HANDLE_INVALID)
        st = failed(t, "C_DestroyObject", rv);
    give_back(t, s);
    return st;
}

dm_status_t *dm_token_gcm(dm_token_t *t, bool encrypt, dm_token_obj_t key, const unsigned char *iv,
                          const unsigned char *aad, size_t aad_len, const unsigned char *in,
                          size_t len, unsigned char *out)
{
    if (!encrypt && len < GCM_TAG)
        return dm_status_new(GRPC_STATUS_DATA_LOSS, "cannot unwrap data key: too short");
    CK_SESSION_HANDLE s;
    dm_status_t *st = borrow(t, &s);
    if (st)
        return st;
    int64_t t0 = mono_us();
    CK_GCM_PARAMS p = {
        .pIv = (CK_BYTE_PTR)iv,
        .ulIvLen = GCM_IV_LEN,
        .ulIvBits = GCM_IV_LEN * 8,
        .pAAD = (CK_BYTE_PTR)aad,
        .ulAADLen = aad_len,
        .ulTagBits = GCM_TAG * 8,
    };
    CK_MECHANISM mech = {CKM_AES_GCM, &p, sizeof(p)};
    /* Some modules (SoftHSM2) want room for the whole input when decrypting, tag included,
     * although the plaintext is shorter: decrypt into a buffer of that size. */
    unsigned char tmp[256];
    unsigned char *dst = encrypt ? out : len <= sizeof(tmp) ? tmp : dm_malloc(len);
    CK_ULONG out_len = encrypt ? len + GCM_TAG : len;
    CK_RV rv = encrypt ? t->f->C_EncryptInit(s, &mech, key) : t->f->C_DecryptInit(s, &mech, key);
    if (rv != CKR_OK) {
        st = failed(t, encrypt ? "C_EncryptInit" : "C_DecryptInit", rv);
        goto out;
    }
    rv = encrypt ? t->f->C_Encrypt(s, (CK_BYTE_PTR)in, len, dst, &out_len)
                 : t->f->C_Decrypt(s, (CK_BYTE_PTR)in, len, dst, &out_len);
    if (rv == CKR_OK && out_len != (encrypt ? len + GCM_TAG : len - GCM_TAG))
        rv = CKR_FUNCTION_FAILED;
    if (rv == CKR_OK && !encrypt)
        memcpy(out, dst, len - GCM_TAG);
    if (rv != CKR_OK) {
        /* A tag that does not verify is CKR_ENCRYPTED_DATA_INVALID in the standard, but
         * CKR_GENERAL_ERROR from SoftHSM2 (and CKR_FUNCTION_FAILED from others): once
         * C_DecryptInit has accepted the session and key, a failed C_Decrypt is the data's
         * fault, not the token's, and must not take the region out of service. */
        bool data = rv != CKR_SESSION_HANDLE_INVALID && rv != CKR_SESSION_CLOSED &&
                    rv != CKR_DEVICE_ERROR && rv != CKR_DEVICE_MEMORY && rv != CKR_DEVICE_REMOVED &&
                    rv != CKR_TOKEN_NOT_PRESENT && rv != CKR_USER_NOT_LOGGED_IN &&
                    rv != CKR_CRYPTOKI_NOT_INITIALIZED && rv != CKR_KEY_HANDLE_INVALID &&
                    rv != CKR_OBJECT_HANDLE_INVALID && rv != CKR_HOST_MEMORY;
        if (!encrypt && data) {
            /* A tag that does not verify: a different key, a different AAD, or tampering. */
            atomic_fetch_add(&t->failures, 1);
            st = dm_status_new(GRPC_STATUS_DATA_LOSS,
                               "cannot unwrap data key: authentication failed");
            dm_status_detail(st, "C_Decrypt: %s", rv_name(rv));
        } else {
            st = failed(t, encrypt ? "C_Encrypt" : "C_Decrypt", rv);
        }
        goto out;
    }
    int64_t us = mono_us() - t0;
    if (encrypt) {
        atomic_fetch_add(&t->encrypts, 1);
        atomic_fetch_add(&t->encrypt_us, us);
    } else {
        atomic_fetch_add(&t->decrypts, 1);
        atomic_fetch_add(&t->decrypt_us, us);
    }

out:
    if (dst != out) {
        OPENSSL_cleanse(dst, len);
        if (dst != tmp)
            free(dst);
    }
    give_back(t, s);
    return st;
}

void dm_token_stats(dm_token_t *t, dm_token_stats_t *out)
{
    out->encrypts = atomic_load(&t->encrypts);
    out->decrypts = atomic_load(&t->decrypts);
    out->failures = atomic_load(&t->failures);
    out->encrypt_us = atomic_load(&t->encrypt_us);
    out->decrypt_us = atomic_load(&t->decrypt_us);
}
