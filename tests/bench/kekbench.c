/*
 * kekbench: what a region's token costs the gateway (issue 17). Measures, for 1 and for
 * --threads threads, each for --seconds:
 *
 *   token-wrap / token-unwrap   a data key sealed and opened by the token (CKM_AES_GCM through
 *                               src/custody/token.c: the gateway's own session pool)
 *   file-wrap / file-unwrap     the same with a key in memory (OpenSSL, kek_source = "file")
 *   token-hmac / file-hmac      HMAC-SHA256 of a 200-byte ledger entry in the token
 *                               (CKM_SHA256_HMAC) or in memory: the ledger key's question
 *
 * and prints ops/s and latency (p50, p99, µs) per line. The token keys it uses are session
 * objects made for the run (never a KEK version).
 *
 *   kekbench --module /usr/lib/softhsm/libsofthsm2.so --token domicile-us --pin-file PIN
 *            [--conf SOFTHSM2_CONF] [--seconds 3] [--threads 4]
 */
#include <dlfcn.h>
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#include "domicile/crypto.h"
#include "hist.h"
#include "../../src/custody/token.h"

typedef enum { T_WRAP, T_UNWRAP, F_WRAP, F_UNWRAP, T_HMAC, F_HMAC } op_t;
static const char *const op_names[] = {"token-wrap",  "token-unwrap", "file-wrap",
                                       "file-unwrap", "token-hmac",   "file-hmac"};

static dm_token_t *tok;
static dm_token_obj_t aes_key;
static CK_FUNCTION_LIST_PTR f;
static CK_SLOT_ID hmac_slot;
static CK_OBJECT_HANDLE hmac_key;
static unsigned char file_key[32], ledger_key[32];
static double seconds = 3;

typedef struct worker {
    pthread_t th;
    op_t op;
    dm_hist_t h;
    uint64_t n;
    CK_SESSION_HANDLE s;
} worker_t;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "kekbench: %s\n", what);
    exit(1);
}

static void *run(void *arg)
{
    worker_t *w = arg;
    unsigned char dek[32] = {1}, iv[12] = {2}, aad[80] = {3}, ct[48], back[32], entry[200] = {4};
    unsigned char *wrapped = NULL, *pt = NULL;
    size_t wl = 0, pl = 0;
    dm_hist_init(&w->h);
    if (dm_token_gcm(tok, true, aes_key, iv, aad, sizeof(aad), dek, 32, ct))
        die("token encrypt failed");
    if (dm_seal(file_key, aad, sizeof(aad), dek, 32, &wrapped, &wl))
        die("seal failed");
    uint64_t end = now_ns() + (uint64_t)(seconds * 1e9);
    for (;;) {
        uint64_t t0 = now_ns();
        if (t0 >= end)
            break;
        dm_status_t *st = NULL;
        switch (w->op) {
        case T_WRAP:
            st = dm_token_gcm(tok, true, aes_key, iv, aad, sizeof(aad), dek, 32, ct);
            break;
        case T_UNWRAP:
            st = dm_token_gcm(tok, false, aes_key, iv, aad, sizeof(aad), ct, 48, back);
            break;
        case F_WRAP: {
            unsigned char *o = NULL;
            size_t ol = 0;
            st = dm_seal(file_key, aad, sizeof(aad), dek, 32, &o, &ol);
            free(o);
            break;
        }
        case F_UNWRAP:
            st = dm_open(file_key, aad, sizeof(aad), wrapped, wl, &pt, &pl);
            free(pt);
            break;
        case T_HMAC: {
            CK_MECHANISM m = {CKM_SHA256_HMAC, NULL, 0};
            CK_BYTE mac[32];
            CK_ULONG ml = sizeof(mac);
            if (f->C_SignInit(w->s, &m, hmac_key) != CKR_OK ||
                f->C_Sign(w->s, entry, sizeof(entry), mac, &ml) != CKR_OK)
                die("token HMAC failed");
            break;
        }
        case F_HMAC: {
            unsigned char mac[32];
            dm_hmac_sha256(ledger_key, 32, entry, sizeof(entry), mac);
            break;
        }
        }
        if (st)
            die(st->message);
        dm_hist_record(&w->h, (now_ns() - t0) / 100); /* in 0.1 µs */
        w->n++;
    }
    free(wrapped);
    return NULL;
}

static void measure(op_t op, int threads)
{
    worker_t *ws = calloc((size_t)threads, sizeof(*ws));
    dm_hist_t all;
    dm_hist_init(&all);
    uint64_t n = 0;
    for (int i = 0; i < threads; i++) {
        ws[i].op = op;
        if (op == T_HMAC &&
            f->C_OpenSession(hmac_slot, CKF_SERIAL_SESSION, NULL, NULL, &ws[i].s) != CKR_OK)
            die("C_OpenSession");
        pthread_create(&ws[i].th, NULL, run, &ws[i]);
    }
    for (int i = 0; i < threads; i++) {
        pthread_join(ws[i].th, NULL);
        dm_hist_merge(&all, &ws[i].h);
        n += ws[i].n;
        if (op == T_HMAC)
            f->C_CloseSession(ws[i].s);
    }
    printf("%-13s threads %d  %9.0f ops/s  p50 %7.1f us  p99 %7.1f us\n", op_names[op], threads,
           (double)n / seconds, (double)dm_hist_quantile(&all, 0.5) / 10.0,
           (double)dm_hist_quantile(&all, 0.99) / 10.0);
    free(ws);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"module", required_argument, NULL, 'm'},
                                         {"token", required_argument, NULL, 't'},
                                         {"pin-file", required_argument, NULL, 'p'},
                                         {"conf", required_argument, NULL, 'c'},
                                         {"seconds", required_argument, NULL, 's'},
                                         {"threads", required_argument, NULL, 'n'},
                                         {NULL, 0, NULL, 0}};
    dm_region_config_t rc;
    memset(&rc, 0, sizeof(rc));
    rc.code = "bench";
    rc.pkcs11_slot = -1;
    int threads = 4, opt;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'm':
            rc.pkcs11_module = optarg;
            break;
        case 't':
            rc.pkcs11_token = optarg;
            break;
        case 'p':
            rc.pkcs11_pin_file = optarg;
            break;
        case 'c':
            setenv("SOFTHSM2_CONF", optarg, 1);
            break;
        case 's':
            seconds = atof(optarg);
            break;
        case 'n':
            threads = atoi(optarg);
            break;
        default:
            return 2;
        }
    }
    if (!rc.pkcs11_module || !rc.pkcs11_token || !rc.pkcs11_pin_file || threads < 1)
        die("--module, --token and --pin-file are required");
    tok = dm_token_create(&rc, threads);
    bool pin_refused;
    dm_status_t *st = dm_token_reopen(tok, &pin_refused);
    if (st)
        die(st->message);
    /* A session key for the run, made like a KEK version (never extractable). */
    char label[64];
    snprintf(label, sizeof(label), "kekbench.%d", (int)getpid());
    if ((st = dm_token_generate(tok, label, "bench", false, &aes_key)))
        die(st->message);
    dm_random_bytes(file_key, sizeof(file_key));
    dm_random_bytes(ledger_key, sizeof(ledger_key));

    /* The HMAC key: a generic secret in the token, through the module's own function list
     * (already initialised and logged in by the token above). */
    void *dl = dlopen(rc.pkcs11_module, RTLD_NOW | RTLD_LOCAL);
    CK_C_GetFunctionList get = dl ? (CK_C_GetFunctionList)dlsym(dl, "C_GetFunctionList") : NULL;
    if (!get || get(&f) != CKR_OK)
        die("C_GetFunctionList");
    CK_SLOT_ID slots[32];
    CK_ULONG ns = 32;
    f->C_GetSlotList(CK_TRUE, slots, &ns);
    for (CK_ULONG i = 0; i < ns; i++) {
        CK_TOKEN_INFO ti;
        if (f->C_GetTokenInfo(slots[i], &ti) == CKR_OK &&
            strncmp((char *)ti.label, rc.pkcs11_token, strlen(rc.pkcs11_token)) == 0)
            hmac_slot = slots[i];
    }
    CK_SESSION_HANDLE s;
    if (f->C_OpenSession(hmac_slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s) != CKR_OK)
        die("C_OpenSession");
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
    CK_ULONG vl = 32;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof(cls)},     {CKA_KEY_TYPE, &kt, sizeof(kt)},
                        {CKA_VALUE_LEN, &vl, sizeof(vl)},   {CKA_TOKEN, &no, sizeof(no)},
                        {CKA_SENSITIVE, &yes, sizeof(yes)}, {CKA_EXTRACTABLE, &no, sizeof(no)},
                        {CKA_SIGN, &yes, sizeof(yes)},      {CKA_VERIFY, &yes, sizeof(yes)}};
    CK_MECHANISM gen = {CKM_GENERIC_SECRET_KEY_GEN, NULL, 0};
    if (f->C_GenerateKey(s, &gen, t, sizeof(t) / sizeof(t[0]), &hmac_key) != CKR_OK)
        die("cannot make the HMAC key");

    printf("# kekbench: token \"%s\" (%s), %.1f s per line\n", rc.pkcs11_token, rc.pkcs11_module,
           seconds);
    for (op_t op = T_WRAP; op <= F_HMAC; op++) {
        measure(op, 1);
        measure(op, threads);
    }
    if ((st = dm_token_destroy_obj(tok, aes_key)))
        die(st->message);
    f->C_CloseSession(s);
    dm_token_destroy(tok);
    return 0;
}
