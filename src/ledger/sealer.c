/*
 * The sealer and the retention purge, run as the regions' idle task (one executor per
 * region, every ledger_seal_interval_ms): chain committed ledger entries in batches, and
 * purge entries past the retention window behind a signed checkpoint.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

#include "domicile/ledger.h"
#include "domicile/log.h"
#include "domicile/metrics.h"
#include "domicile/sql.h"

#define SEAL_BATCH     500
#define SEAL_ROUNDS    8 /* at most 4000 entries per tick, so one tick stays short */
#define PURGE_EVERY_MS 60000

static size_t region_index(dm_ledger_ctx_t *ctx, dm_region_t *r)
{
    for (size_t i = 0; i < dm_regions_count(ctx->regions); i++)
        if (dm_regions_at(ctx->regions, i) == r)
            return i;
    return 0;
}

/* The chain's head: the last link, or the last checkpoint after a purge, or the start. */
static bool chain_head(dm_exec_t *x, int64_t *seq, unsigned char hash[32])
{
    dm_status_t *err = NULL;
    PGresult *res = dm_region_exec(x, DM_SQL_LEDGER_HEAD, 0, NULL, NULL, NULL, &err);
    if (!res) {
        dm_status_free(err);
        return false;
    }
    *seq = 0;
    memset(hash, 0, 32);
    if (PQntuples(res) == 1) {
        int len;
        const char *h = dm_pg_bytes(res, 0, 1, &len);
        *seq = dm_pg_int8(res, 0, 0);
        if (len == 32)
            memcpy(hash, h, 32);
    }
    PQclear(res);
    return true;
}

static void append_array_item(char **buf, size_t *len, size_t *cap, const char *item)
{
    size_t n = strlen(item);
    if (*len + n + 2 >= *cap) {
        *cap = (*cap + n + 2) * 2;
        *buf = dm_realloc(*buf, *cap);
    }
    if (*len > 1)
        (*buf)[(*len)++] = ',';
    memcpy(*buf + *len, item, n);
    *len += n;
    (*buf)[*len] = '\0';
}

static void close_array(char **buf, size_t *len, size_t *cap)
{
    if (*len + 2 >= *cap)
        *buf = dm_realloc(*buf, *cap = *len + 2);
    (*buf)[(*len)++] = '}';
    (*buf)[*len] = '\0';
}

/* One batch: returns the number of links stored (0: nothing to do), -1 when it could not read
 * or seal; then the new head is in *head_seq, head_hash; *full says the queue gave a whole
 * batch (more may wait). */
static int seal_batch(dm_region_t *r, dm_exec_t *x, const unsigned char key[32], int64_t *head_seq,
                      unsigned char head_hash[32], bool *full)
{
    int64_t seq;
    unsigned char prev[32];
    dm_status_t *err = NULL;
    char limit[16];
    snprintf(limit, sizeof(limit), "%d", SEAL_BATCH);
    const char *lp = limit;

    *full = false;
    if (!chain_head(x, &seq, prev))
        return -1;
    PGresult *rows = dm_region_exec(x, DM_SQL_LEDGER_LOOSE, 1, &lp, NULL, NULL, &err);
    if (!rows) {
        dm_status_free(err);
        return -1;
    }
    int n = PQntuples(rows), linked = 0, rejected = 0;
    size_t cap = 64, sl = 1, el = 1, hl = 1, rl = 1;
    char *seqs = dm_malloc(cap), *ids = dm_malloc(cap), *hashes = dm_malloc(cap);
    char *bad = dm_malloc(cap);
    size_t scap = cap, ecap = cap, hcap = cap, rcap = cap;
    strcpy(seqs, "{");
    strcpy(ids, "{");
    strcpy(hashes, "{");
    strcpy(bad, "{");
    for (int i = 0; i < n; i++) {
        unsigned char h[32];
        int len;
        const unsigned char *mac = (const unsigned char *)dm_pg_bytes(rows, i, DM_LC_MAC, &len);
        int64_t entry_id = dm_pg_int8(rows, i, DM_LC_ENTRY_ID);
        if (!dm_ledger_entry_verifies(key, rows, i, 0)) {
            /* Not written by a gateway holding the key: never chain it. VerifyLedger
             * reports it as inserted. */
            dm_error("ledger", "region %s: ledger entry %lld has an invalid MAC; not chaining it",
                     dm_region_code(r), (long long)entry_id);
            char item[24];
            snprintf(item, sizeof(item), "%lld", (long long)entry_id);
            append_array_item(&bad, &rl, &rcap, item);
            rejected++;
            continue;
        }
        seq++;
        dm_ledger_chain_hash(key, prev, seq, entry_id, mac, h);
        memcpy(prev, h, 32);
        char item[80], hex[65];
        snprintf(item, sizeof(item), "%lld", (long long)seq);
        append_array_item(&seqs, &sl, &scap, item);
        snprintf(item, sizeof(item), "%lld", (long long)entry_id);
        append_array_item(&ids, &el, &ecap, item);
        dm_hex_encode(h, 32, hex);
        snprintf(item, sizeof(item), "\"\\\\x%s\"", hex);
        append_array_item(&hashes, &hl, &hcap, item);
        linked++;
    }
    PQclear(rows);
    if (linked > 0 || rejected > 0) {
        close_array(&seqs, &sl, &scap);
        close_array(&ids, &el, &ecap);
        close_array(&hashes, &hl, &hcap);
        close_array(&bad, &rl, &rcap);
        const char *vals[4] = {seqs, ids, hashes, bad};
        PGresult *res = dm_region_exec(x, DM_SQL_LEDGER_SEAL, 4, vals, NULL, NULL, &err);
        if (!res) {
            /* Another gateway sealed first (40001) or the region went away: next tick. */
            dm_debug("ledger", "region %s: sealing deferred: %s", dm_region_code(r),
                     err->detail ? err->detail : err->message);
            dm_status_free(err);
            linked = -1;
        } else if (linked > 0) {
            *head_seq = seq;
            memcpy(head_hash, prev, 32);
        }
        PQclear(res);
    }
    free(seqs);
    free(ids);
    free(hashes);
    free(bad);
    *full = n == SEAL_BATCH;
    return linked;
}

static void purge(dm_ledger_ctx_t *ctx, dm_region_t *r, dm_exec_t *x, const unsigned char key[32])
{
    dm_status_t *err = NULL;
    int64_t before = dm_now_ms() - (int64_t)ctx->retention_days * 86400000LL;
    char before_s[24];
    snprintf(before_s, sizeof(before_s), "%lld", (long long)before);
    const char *v1 = before_s;
    PGresult *res = dm_region_exec(x, DM_SQL_LEDGER_PURGE_UPTO, 1, &v1, NULL, NULL, &err);
    if (!res) {
        dm_status_free(err);
        return;
    }
    if (PQntuples(res) != 1) {
        PQclear(res);
        return;
    }
    int64_t upto = dm_pg_int8(res, 0, 0);
    int len;
    unsigned char hash[32], mac[32];
    const char *h = dm_pg_bytes(res, 0, 1, &len);
    if (len != 32) {
        PQclear(res);
        return;
    }
    memcpy(hash, h, 32);
    PQclear(res);
    /* The link's hash is checked by ledger_purge() against the stored chain; the checkpoint
     * is signed here, with the key the database never sees. */
    dm_ledger_checkpoint_mac(key, upto, hash, before, mac);
    char upto_s[24];
    snprintf(upto_s, sizeof(upto_s), "%lld", (long long)upto);
    const char *vals[4] = {upto_s, (const char *)hash, before_s, (const char *)mac};
    int lens[4] = {0, 32, 0, 32};
    int fmts[4] = {0, 1, 0, 1};
    res = dm_region_exec(x, DM_SQL_LEDGER_PURGE, 4, vals, lens, fmts, &err);
    if (!res) {
        dm_warn("ledger", "region %s: retention purge failed: %s", dm_region_code(r),
                err->detail ? err->detail : err->message);
        dm_status_free(err);
        return;
    }
    dm_info("ledger",
            "region %s: purged %lld ledger entries older than %d days (checkpoint at "
            "link %lld)",
            dm_region_code(r), (long long)dm_pg_int8(res, 0, 0), ctx->retention_days,
            (long long)upto);
    PQclear(res);
}

typedef struct witness_job {
    dm_job_t job;
    char code[DM_REGION_CODE_MAX + 1], seq_s[24];
    unsigned char hash[32];
} witness_job_t;

static void witness_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    witness_job_t *w = job->arg;
    (void)res;
    if (err) {
        /* That region keeps an older witness (or none): VerifyLedger then claims less. */
        dm_debug("ledger", "region %s: chain head not witnessed in another region: %s", w->code,
                 err->detail ? err->detail : err->message);
        dm_status_free(err);
    }
    free(w);
}

/* Store the head this sealer just wrote in every other region's ledger_witness, so that
 * cutting the tail of this region's chain is found by VerifyLedger. Fire and forget: a
 * region that is down keeps its older witness. */
static void witness(dm_ledger_ctx_t *ctx, dm_region_t *r, int64_t seq, const unsigned char h[32])
{
    for (size_t k = 0; k < dm_regions_count(ctx->regions); k++) {
        dm_region_t *other = dm_regions_at(ctx->regions, k);
        if (other == r)
            continue;
        witness_job_t *w = dm_calloc(1, sizeof(*w));
        snprintf(w->code, sizeof(w->code), "%s", dm_region_code(r));
        snprintf(w->seq_s, sizeof(w->seq_s), "%lld", (long long)seq);
        memcpy(w->hash, h, 32);
        w->job.stmt = DM_SQL_WITNESS_PUT;
        w->job.done = witness_done;
        w->job.arg = w;
        dm_job_param_text(&w->job, 0, w->code);
        dm_job_param_text(&w->job, 1, w->seq_s);
        dm_job_param_bin(&w->job, 2, w->hash, 32);
        dm_region_submit(other, &w->job);
    }
}

void dm_ledger_idle(dm_region_t *r, dm_exec_t *x, void *arg)
{
    dm_ledger_ctx_t *ctx = arg;
    size_t i = region_index(ctx, r);
    const unsigned char *key = ctx->keys[i];
    int64_t sealed = 0;
    bool full = true, failed = false;
    int64_t head_seq = 0;
    unsigned char head_hash[32];
    for (int round = 0; round < SEAL_ROUNDS && full && !failed; round++) {
        int n = seal_batch(r, x, key, &head_seq, head_hash, &full);
        failed = n < 0;
        sealed += n > 0 ? n : 0;
    }
    if (head_seq > 0)
        witness(ctx, r, head_seq, head_hash);
    /* A full last batch means more wait: report what was left as at least one batch. Caught
     * up (seal lag zero) only when this round read the queue to its end and sealed it. */
    dm_metrics_sealed(i, sealed, full ? SEAL_BATCH : 0, !full && !failed);
    if (ctx->retention_days > 0 && dm_mono_ms() - ctx->last_purge_ms[i] >= PURGE_EVERY_MS) {
        ctx->last_purge_ms[i] = dm_mono_ms();
        /* Seal first, so that a purge never leaves old entries outside the chain. */
        purge(ctx, r, x, key);
    }
}
