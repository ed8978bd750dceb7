/*
 * Ledger entries: canonical encoding, MACs, chain hashes, and the write-ahead append.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "domicile/ledger.h"
#include "domicile/metrics.h"
#include "domicile/sql.h"

/* The fields a MAC covers, as byte strings, in a fixed order (the encoding is dm_aad's:
 * length-prefixed, so no two different entries encode alike). */
typedef struct {
    dm_aad_part_t part[DM_LC_MAC]; /* every column before the MAC */
} fields_t;

static void hmac(const unsigned char key[32], const unsigned char *data, size_t len,
                 unsigned char out[32])
{
    dm_hmac_sha256(key, 32, data, len, out);
}

static void mac_fields(const unsigned char key[32], const fields_t *f, unsigned char out[32])
{
    size_t len;
    dm_aad_part_t parts[DM_LC_MAC + 1];
    parts[0] = DM_AAD_STR("domicile-ledger-v1");
    memcpy(parts + 1, f->part, sizeof(f->part));
    unsigned char *enc = dm_aad(&len, DM_LC_MAC + 1, parts);
    hmac(key, enc, len, out);
    free(enc);
}

void dm_ledger_entry_mac(const unsigned char key[32], const PGresult *res, int row, int col0,
                         unsigned char out[32])
{
    fields_t f;
    char at[24], records[24], bytes[24];
    for (int c = 0; c < DM_LC_MAC; c++) {
        int len = 0;
        const char *v =
            dm_pg_isnull(res, row, col0 + c) ? "" : dm_pg_bytes(res, row, col0 + c, &len);
        f.part[c] = DM_AAD_BYTES(v, dm_pg_isnull(res, row, col0 + c) ? 0 : (size_t)len);
    }
    /* Numbers in their decimal text form, as the appender wrote them. */
    snprintf(at, sizeof(at), "%lld", (long long)dm_pg_time_ms(res, row, col0 + DM_LC_AT));
    snprintf(records, sizeof(records), "%lld",
             (long long)dm_pg_int8(res, row, col0 + DM_LC_RECORDS));
    snprintf(bytes, sizeof(bytes), "%lld", (long long)dm_pg_int8(res, row, col0 + DM_LC_BYTES));
    f.part[DM_LC_AT] = DM_AAD_STR(at);
    f.part[DM_LC_RECORDS] = DM_AAD_STR(records);
    f.part[DM_LC_BYTES] = DM_AAD_STR(bytes);
    mac_fields(key, &f, out);
}

bool dm_ledger_entry_verifies(const unsigned char key[32], const PGresult *res, int row, int col0)
{
    unsigned char mac[32];
    int len;
    const char *stored = dm_pg_bytes(res, row, col0 + DM_LC_MAC, &len);
    dm_ledger_entry_mac(key, res, row, col0, mac);
    return len == 32 && CRYPTO_memcmp(mac, stored, 32) == 0;
}

void dm_ledger_chain_hash(const unsigned char key[32], const unsigned char prev[32], int64_t seq,
                          int64_t entry_id, const unsigned char mac[32], unsigned char out[32])
{
    char s[24], e[24];
    size_t len;
    snprintf(s, sizeof(s), "%lld", (long long)seq);
    snprintf(e, sizeof(e), "%lld", (long long)entry_id);
    unsigned char *enc = DM_AAD(&len, DM_AAD_STR("domicile-chain-v1"), DM_AAD_BYTES(prev, 32),
                                DM_AAD_STR(s), DM_AAD_STR(e), DM_AAD_BYTES(mac, 32));
    hmac(key, enc, len, out);
    free(enc);
}

void dm_ledger_checkpoint_mac(const unsigned char key[32], int64_t upto_seq,
                              const unsigned char hash[32], int64_t before_ms,
                              unsigned char out[32])
{
    char s[24], b[24];
    size_t len;
    snprintf(s, sizeof(s), "%lld", (long long)upto_seq);
    snprintf(b, sizeof(b), "%lld", (long long)before_ms);
    unsigned char *enc = DM_AAD(&len, DM_AAD_STR("domicile-checkpoint-v1"), DM_AAD_STR(s),
                                DM_AAD_BYTES(hash, 32), DM_AAD_STR(b));
    hmac(key, enc, len, out);
    free(enc);
}

void dm_ledger_restore_mac(const unsigned char key[32], int64_t restored_seq,
                           const unsigned char restored_hash[32], int64_t resumed_seq,
                           const unsigned char resumed_hash[32], const char *witnessed_by,
                           int64_t point_ms, unsigned char out[32])
{
    char a[24], b[24], p[24];
    size_t len;
    snprintf(a, sizeof(a), "%lld", (long long)restored_seq);
    snprintf(b, sizeof(b), "%lld", (long long)resumed_seq);
    snprintf(p, sizeof(p), "%lld", (long long)point_ms);
    unsigned char *enc = DM_AAD(
        &len, DM_AAD_STR("domicile-restore-cut-v1"), DM_AAD_STR(a), DM_AAD_BYTES(restored_hash, 32),
        DM_AAD_STR(b), DM_AAD_BYTES(resumed_hash, 32), DM_AAD_STR(witnessed_by), DM_AAD_STR(p));
    hmac(key, enc, len, out);
    free(enc);
}

/* ---- append -------------------------------------------------------------------------- */

typedef struct append {
    dm_job_t job;
    dm_ledger_done_fn done;
    void *arg;
    unsigned char uuid[16];
    unsigned char subject[DM_SUBJECT_KEY_LEN];
    bool has_subject;
    unsigned char mac[32];
    char at[24], records[24], bytes[24];
    char *text[12]; /* copies of the string fields */
} append_t;

enum {
    T_REQ,
    T_PRINCIPAL,
    T_METHOD,
    T_CUSTOMER,
    T_FROM,
    T_TO,
    T_PURPOSE,
    T_BASIS,
    T_REFUSAL,
    T_IDS
};

static void append_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    append_t *a = job->arg;
    if (!err && PQntuples(res) == 1)
        dm_metrics_transfer(a->text[T_FROM], a->text[T_TO], a->text[T_BASIS],
                            a->text[T_REFUSAL][0] == '\0', atoll(a->bytes));
    if (!err && (PQntuples(res) != 1))
        err = dm_status_new(GRPC_STATUS_INTERNAL, "ledger append returned no entry");
    if (err && err->code != GRPC_STATUS_UNAVAILABLE) {
        /* Whatever went wrong, the data must not leave: say so plainly. */
        dm_status_t *st = dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                        "cannot log the transfer in the ledger: nothing sent");
        dm_status_detail(st, "%s", err->detail ? err->detail : err->message);
        dm_status_free(err);
        err = st;
    }
    a->done(a->arg, err);
    for (size_t i = 0; i < DM_ARRAY_LEN(a->text); i++)
        free(a->text[i]);
    free(a);
}

void dm_ledger_append(dm_region_t *r, const unsigned char key[32], const dm_transfer_t *t,
                      void *owner, dm_ledger_done_fn done, void *arg)
{
    append_t *a = dm_calloc(1, sizeof(*a));
    fields_t f;

    a->done = done;
    a->arg = arg;
    dm_random_bytes(a->uuid, sizeof(a->uuid));
    snprintf(a->at, sizeof(a->at), "%lld", (long long)dm_now_ms());
    snprintf(a->records, sizeof(a->records), "%lld", (long long)t->record_count);
    snprintf(a->bytes, sizeof(a->bytes), "%lld", (long long)t->bytes);
    a->text[T_REQ] = dm_strdup(t->request_id);
    a->text[T_PRINCIPAL] = dm_strdup(t->principal);
    a->text[T_METHOD] = dm_strdup(t->method);
    a->text[T_CUSTOMER] = dm_strdup(t->customer_id);
    a->text[T_FROM] = dm_strdup(t->from);
    a->text[T_TO] = dm_strdup(t->to);
    a->text[T_PURPOSE] = dm_strdup(t->purpose);
    a->text[T_BASIS] = dm_strdup(t->basis_id ? t->basis_id : "");
    a->text[T_REFUSAL] = dm_strdup(t->refusal ? t->refusal : "");
    a->text[T_IDS] = dm_strdup(t->record_ids ? t->record_ids : "");
    if (t->subject_key) {
        memcpy(a->subject, t->subject_key, sizeof(a->subject));
        a->has_subject = true;
    }
    const char *dir = t->direction == DM_TRANSFER_READ ? "read" : "write";
    const char *outcome = t->allowed ? "allowed" : "refused";

    f.part[DM_LC_UUID] = DM_AAD_BYTES(a->uuid, sizeof(a->uuid));
    f.part[DM_LC_AT] = DM_AAD_STR(a->at);
    f.part[DM_LC_REQUEST_ID] = DM_AAD_STR(a->text[T_REQ]);
    f.part[DM_LC_PRINCIPAL] = DM_AAD_STR(a->text[T_PRINCIPAL]);
    f.part[DM_LC_METHOD] = DM_AAD_STR(a->text[T_METHOD]);
    f.part[DM_LC_CUSTOMER] = DM_AAD_STR(a->text[T_CUSTOMER]);
    f.part[DM_LC_SUBJECT] = DM_AAD_BYTES(a->subject, a->has_subject ? sizeof(a->subject) : 0);
    f.part[DM_LC_RECORDS] = DM_AAD_STR(a->records);
    f.part[DM_LC_BYTES] = DM_AAD_STR(a->bytes);
    f.part[DM_LC_FROM] = DM_AAD_STR(a->text[T_FROM]);
    f.part[DM_LC_TO] = DM_AAD_STR(a->text[T_TO]);
    f.part[DM_LC_DIRECTION] = DM_AAD_STR(dir);
    f.part[DM_LC_PURPOSE] = DM_AAD_STR(a->text[T_PURPOSE]);
    f.part[DM_LC_BASIS] = DM_AAD_STR(a->text[T_BASIS]);
    f.part[DM_LC_OUTCOME] = DM_AAD_STR(outcome);
    f.part[DM_LC_REFUSAL] = DM_AAD_STR(a->text[T_REFUSAL]);
    f.part[DM_LC_RECORD_IDS] = DM_AAD_STR(a->text[T_IDS]);
    mac_fields(key, &f, a->mac);

    dm_job_t *j = &a->job;
    j->stmt = DM_SQL_LEDGER_APPEND;
    j->done = append_done;
    j->arg = a;
    j->owner = owner;
    /* A plain insert: batched with other writes, one commit for many entries. */
    j->batchable = true;
    dm_job_param_bin(j, 0, a->uuid, sizeof(a->uuid));
    dm_job_param_text(j, 1, a->at);
    dm_job_param_text(j, 2, a->text[T_REQ]);
    dm_job_param_text(j, 3, a->text[T_PRINCIPAL]);
    dm_job_param_text(j, 4, a->text[T_METHOD]);
    dm_job_param_text(j, 5, a->text[T_CUSTOMER]);
    if (a->has_subject)
        dm_job_param_bin(j, 6, a->subject, sizeof(a->subject));
    else
        dm_job_param_text(j, 6, NULL);
    dm_job_param_text(j, 7, a->records);
    dm_job_param_text(j, 8, a->bytes);
    dm_job_param_text(j, 9, a->text[T_FROM]);
    dm_job_param_text(j, 10, a->text[T_TO]);
    dm_job_param_text(j, 11, dir);
    dm_job_param_text(j, 12, a->text[T_PURPOSE]);
    dm_job_param_text(j, 13, a->text[T_BASIS]);
    dm_job_param_text(j, 14, outcome);
    dm_job_param_text(j, 15, a->text[T_REFUSAL]);
    dm_job_param_text(j, 16, a->text[T_IDS]);
    dm_job_param_bin(j, 17, a->mac, sizeof(a->mac));
    dm_region_submit(r, j);
}
