/*
 * The custody thread of a region: opens the token (again, with backoff, after a failure),
 * follows the KEK versions in the database and checks each active one against its check
 * value, makes the first version, answers operator requests, and re-wraps data keys while a
 * rotation runs. It talks to the database through ordinary jobs of the region's executors and
 * waits for them; the token work it does never runs on an executor or a completion queue.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "domicile/clock.h"
#include "domicile/log.h"
#include "domicile/sql.h"
#include "state.h"

#define REFRESH_MS        1000
#define COUNT_MS          15000
#define ROTATION_CHECK_MS 1000
#define CLAIM_LEASE_MS    30000
#define BACKOFF_MIN_MS    500
#define BACKOFF_MAX_MS    10000
#define STUCK_RETRY_MS    30000
#define PERIOD_CHECK_MS   1000

typedef enum { REQ_ROTATE, REQ_STATUS, REQ_RETIRE } req_kind_t;

struct dm__req {
    dm__req_t *next;
    req_kind_t kind;
    int32_t version;
    char by[72];
    char request_id[136];
    dm_custody_done_fn done;
    void *arg;
};

/* The rotation this gateway runs (thread-private). */
typedef struct rotation {
    bool active;
    int64_t id;
    int32_t target;
    int64_t total, done;
    int32_t cursor_version;
    int64_t cursor_key;
    int64_t pass_failed;
    int64_t window_ms, window_keys;
} rotation_t;

typedef struct worker {
    dm_custody_t *c;
    char me[96];
    int64_t token_retry_at, backoff_ms;
    bool pin_refused;
    struct stat pin_seen;
    int64_t refresh_at, count_at, rotation_check_at, period_at;
    bool legacy_warned;
    bool period_failing; /* the crypto-period's last read failed (logged once) */
    bool last_ready;
    rotation_t rot;
} worker_t;

/* ---- statements, run from this thread and waited for ------------------------------------ */

typedef struct sync_job {
    dm_job_t job;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
    PGresult *res;
    dm_status_t *err;
} sync_job_t;

static void sync_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    sync_job_t *s = job->arg;
    pthread_mutex_lock(&s->mu);
    s->res = res ? PQcopyResult(res, PG_COPYRES_ATTRS | PG_COPYRES_TUPLES) : NULL;
    s->err = err;
    s->done = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* Run `stmt` with `n` parameters (text, or binary where lens[i] > 0) in the region; the
 * result (caller clears) or NULL with *err set. */
static PGresult *db(dm_custody_t *c, dm_sql_id_t stmt, int n, const char *const *vals,
                    const int *lens, dm_status_t **err)
{
    sync_job_t s;
    memset(&s, 0, sizeof(s));
    pthread_mutex_init(&s.mu, NULL);
    pthread_cond_init(&s.cv, NULL);
    s.job.stmt = stmt;
    s.job.done = sync_done;
    s.job.arg = &s;
    for (int i = 0; i < n; i++) {
        if (lens && lens[i] > 0)
            dm_job_param_bin(&s.job, i, vals[i], lens[i]);
        else
            dm_job_param_text(&s.job, i, vals[i]);
    }
    dm_region_submit(c->region, &s.job);
    pthread_mutex_lock(&s.mu);
    while (!s.done)
        pthread_cond_wait(&s.cv, &s.mu);
    pthread_mutex_unlock(&s.mu);
    pthread_mutex_destroy(&s.mu);
    pthread_cond_destroy(&s.cv);
    if (s.err) {
        PQclear(s.res);
        *err = s.err;
        return NULL;
    }
    return s.res;
}

static const char *text_of(const PGresult *res, int row, int col, char *buf, size_t len)
{
    int n = 0;
    const char *v = dm_pg_bytes(res, row, col, &n);
    snprintf(buf, len, "%.*s", n, v);
    return buf;
}

/* ---- check values ------------------------------------------------------------------------- */

static unsigned char *check_aad(dm_custody_t *c, int32_t version, size_t *len)
{
    char v[16];
    snprintf(v, sizeof(v), "%d", version);
    return DM_AAD(len, DM_AAD_STR("domicile-kek-check-v1"), DM_AAD_STR(c->code), DM_AAD_STR(v));
}

/* A new check value for version `v` (a wrap of random bytes bound to the region and version). */
static dm_status_t *make_check(dm_custody_t *c, dm__kver_t *v, unsigned char **out, size_t *len)
{
    unsigned char r[DM_KEY_LEN];
    size_t aad_len;
    dm_random_bytes(r, sizeof(r));
    unsigned char *aad = check_aad(c, v->version, &aad_len);
    dm_status_t *st = dm__custody_wrap_with(c, v, r, aad, aad_len, out, len);
    OPENSSL_cleanse(r, sizeof(r));
    free(aad);
    return st;
}

/* Does key `obj` (or the key file) open version `version`'s check value? */
static bool opens_check(dm_custody_t *c, int32_t version, bool is_file, dm_token_obj_t obj,
                        const unsigned char *check, size_t check_len, dm_status_t **err)
{
    unsigned char out[DM_KEY_LEN];
    size_t aad_len;
    unsigned char *aad = check_aad(c, version, &aad_len);
    dm_status_t *st;
    if (is_file) {
        st = dm_dek_unwrap(c->file_kek, check, check_len, aad, aad_len, out);
    } else if (dm_custody_version_of(check, check_len) != version ||
               check_len != DM_CUSTODY_WRAPPED_LEN) {
        st = dm_status_new(GRPC_STATUS_DATA_LOSS, "malformed check value");
    } else {
        size_t full_len = 5 + aad_len;
        unsigned char *full = dm_malloc(full_len);
        memcpy(full, check, 5);
        memcpy(full + 5, aad, aad_len);
        st = dm_token_gcm(c->token, false, obj, check + 5, full, full_len,
                          check + 5 + DM_SEAL_NONCE_LEN, DM_KEY_LEN + DM_SEAL_TAG_LEN, out);
        free(full);
    }
    free(aad);
    OPENSSL_cleanse(out, sizeof(out));
    if (!st)
        return true;
    if (st->code == GRPC_STATUS_DATA_LOSS) {
        dm_status_free(st);
        return false;
    }
    *err = st;
    return false;
}

/* ---- following the versions --------------------------------------------------------------- */

typedef struct row_view {
    int32_t version;
    bool is_file, retired, creating;
    char label[96];
    const unsigned char *check;
    int check_len;
} row_view_t;

/* The token object of an active version that opens its check value; else a problem text. */
static bool resolve_version(worker_t *w, const row_view_t *rv, dm__kver_t *out, char *problem,
                            size_t plen)
{
    dm_custody_t *c = w->c;
    dm_status_t *err = NULL;
    memset(out, 0, sizeof(*out));
    out->version = rv->version;
    out->is_file = rv->is_file;
    out->data_keys = -1;
    if (rv->is_file) {
        if (!c->file_kek) {
            snprintf(problem, plen,
                     "data keys are wrapped by the key file (KEK version 1) and kek_file is not "
                     "set");
            return false;
        }
        if (rv->check_len == 0) {
            /* Migrated from a key file: its check value is made by the first gateway. */
            unsigned char *chk = NULL;
            size_t chk_len = 0;
            if ((err = make_check(c, out, &chk, &chk_len))) {
                snprintf(problem, plen, "%s", err->message);
                dm_status_free(err);
                return false;
            }
            char vs[16];
            snprintf(vs, sizeof(vs), "%d", rv->version);
            const char *vals[2] = {vs, (const char *)chk};
            int lens[2] = {0, (int)chk_len};
            PGresult *res = db(c, DM_SQL_KEK_SET_CHECK, 2, vals, lens, &err);
            PQclear(res);
            free(chk);
            if (err)
                dm_status_free(err);
            out->verified = true;
            return true;
        }
        if (!opens_check(c, rv->version, true, 0, rv->check, (size_t)rv->check_len, &err)) {
            snprintf(problem, plen,
                     "kek_file does not open KEK version 1's check value: the key file of "
                     "another region?");
            dm_status_free(err);
            return false;
        }
        out->verified = true;
        return true;
    }
    if (c->is_file) {
        snprintf(problem, plen,
                 "KEK version %d is in a token, and kek_source = \"file\" cannot open it",
                 rv->version);
        return false;
    }
    dm_token_obj_t objs[8];
    size_t n = 0;
    if ((err = dm_token_find(c->token, rv->label, c->allow_extractable, objs, 8, &n))) {
        snprintf(problem, plen, "%s", err->message);
        dm_status_free(err);
        return false;
    }
    if (n == 0) {
        snprintf(problem, plen, "KEK version %d (label \"%s\") is not in token \"%s\"", rv->version,
                 rv->label, c->rc->pkcs11_token);
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        if (opens_check(c, rv->version, false, objs[i], rv->check, (size_t)rv->check_len, &err)) {
            out->obj = objs[i];
            out->has_obj = true;
            out->verified = true;
            return true;
        }
        if (err) {
            snprintf(problem, plen, "%s", err->message);
            dm_status_free(err);
            return false;
        }
    }
    snprintf(problem, plen,
             "KEK version %d (label \"%s\") in token \"%s\" does not open the region's check "
             "value: a token or key of another region, or a key replaced since",
             rv->version, rv->label, c->rc->pkcs11_token);
    return false;
}

/* Destroy what is left in the token of a retired version. */
static void clean_retired(worker_t *w, const char *label)
{
    dm_custody_t *c = w->c;
    dm_token_obj_t objs[8];
    size_t n = 0;
    dm_status_t *st = dm_token_find(c->token, label, true, objs, 8, &n);
    for (size_t i = 0; !st && i < n; i++) {
        st = dm_token_destroy_obj(c->token, objs[i]);
        if (!st)
            dm_info("custody", "region %s: destroyed retired KEK \"%s\" in token \"%s\"", c->code,
                    label, c->rc->pkcs11_token);
    }
    if (st) {
        dm_warn("custody", "region %s: cannot destroy retired KEK \"%s\": %s", c->code, label,
                st->message);
        dm_status_free(st);
    }
}

static void set_ready(worker_t *w, bool ready)
{
    dm_custody_t *c = w->c;
    atomic_store(&c->ready, ready);
    bool now = dm_custody_ready(c);
    if (now == w->last_ready)
        return;
    w->last_ready = now;
    if (now) {
        dm_info("custody", "region %s: keys available (KEK version %d current%s)", c->code,
                c->current, c->is_file ? ", key file" : "");
    } else {
        dm_status_t *st = dm_custody_check(c);
        dm_error("custody", "region %s: keys unavailable, the region fails closed: %s", c->code,
                 st ? st->message : "?");
        dm_status_free(st);
    }
    if (c->on_change)
        c->on_change(c->on_change_arg, c->region, now);
}

static dm_status_t *make_version(worker_t *w, const char *kind, const char *by,
                                 const char *request_id, bool rotate, int32_t *made,
                                 int64_t *rotation_id, int64_t *keys_total, bool *replayed);

/* Read the versions, check every active one in the token, install the table. */
static void refresh(worker_t *w)
{
    dm_custody_t *c = w->c;
    dm_status_t *err = NULL;
    /* A token that is not open: open_token() says why, and refreshes once it is. */
    if (!c->is_file && !dm_token_ok(c->token))
        return;
    PGresult *res = db(c, DM_SQL_KEK_VERSIONS, 0, NULL, NULL, &err);
    if (!res) {
        /* The region's database is down: its calls fail for that reason already. */
        dm_debug("custody", "region %s: cannot read KEK versions: %s", c->code, err->message);
        dm_status_free(err);
        return;
    }
    int n = PQntuples(res);
    if (n == 0) {
        PQclear(res);
        if (c->is_file) {
            dm__kver_t v = {.version = 1, .is_file = true};
            unsigned char *chk = NULL;
            size_t chk_len = 0;
            if ((err = make_check(c, &v, &chk, &chk_len))) {
                dm__custody_set_why(c, "%s", err->message);
                dm_status_free(err);
                set_ready(w, false);
                return;
            }
            const char *vals[2] = {(const char *)chk, w->me};
            int lens[2] = {(int)chk_len, 0};
            PQclear(db(c, DM_SQL_KEK_BOOTSTRAP_FILE, 2, vals, lens, &err));
            free(chk);
        } else if (dm_token_ok(c->token)) {
            int32_t made = 0;
            err = make_version(w, "bootstrap", "gateway", "", false, &made, NULL, NULL, NULL);
            if (!err && made)
                dm_info("custody", "region %s: made KEK version %d in token \"%s\"", c->code, made,
                        c->rc->pkcs11_token);
        } else {
            return;
        }
        if (err) {
            dm__custody_set_why(c, "cannot make the first KEK version: %s", err->message);
            dm_status_free(err);
            set_ready(w, false);
            return;
        }
        res = db(c, DM_SQL_KEK_VERSIONS, 0, NULL, NULL, &err);
        if (!res) {
            dm_status_free(err);
            return;
        }
        n = PQntuples(res);
    }

    dm__kver_t fresh[DM_CUSTODY_MAX_VERSIONS];
    size_t n_fresh = 0;
    char problem[256] = "";
    int32_t current = 0;
    bool token_usable = c->is_file || dm_token_ok(c->token);
    for (int i = 0; i < n && n_fresh < DM_CUSTODY_MAX_VERSIONS; i++) {
        row_view_t rv;
        char src[16], state[16];
        memset(&rv, 0, sizeof(rv));
        rv.version = dm_pg_int4(res, i, 0);
        rv.is_file = strcmp(text_of(res, i, 1, src, sizeof(src)), "file") == 0;
        text_of(res, i, 2, rv.label, sizeof(rv.label));
        if (!dm_pg_isnull(res, i, 3))
            rv.check = (const unsigned char *)dm_pg_bytes(res, i, 3, &rv.check_len);
        text_of(res, i, 4, state, sizeof(state));
        rv.retired = strcmp(state, "retired") == 0;
        rv.creating = strcmp(state, "creating") == 0;
        if (rv.creating)
            continue;
        dm__kver_t *v = &fresh[n_fresh];
        if (rv.retired) {
            memset(v, 0, sizeof(*v));
            v->version = rv.version;
            v->is_file = rv.is_file;
            v->retired = true;
            v->data_keys = 0;
            if (!rv.is_file && !c->is_file && token_usable)
                clean_retired(w, rv.label);
            n_fresh++;
            continue;
        }
        if (!token_usable) {
            snprintf(problem, sizeof(problem), "token is not open");
            break;
        }
        if (!resolve_version(w, &rv, v, problem, sizeof(problem)))
            break;
        n_fresh++;
        if (rv.version > current)
            current = rv.version;
    }
    PQclear(res);

    pthread_rwlock_wrlock(&c->mu);
    /* Keep the counts made earlier; the objects and states are the ones just checked. */
    for (size_t i = 0; i < n_fresh; i++) {
        dm__kver_t *old = dm__custody_find(c, fresh[i].version);
        if (old && fresh[i].data_keys < 0)
            fresh[i].data_keys = old->data_keys;
    }
    if (!problem[0]) {
        memcpy(c->vers, fresh, n_fresh * sizeof(fresh[0]));
        c->n_vers = n_fresh;
        c->current = current;
    }
    pthread_rwlock_unlock(&c->mu);
    if (problem[0]) {
        dm__custody_set_why(c, "%s", problem);
        set_ready(w, false);
        return;
    }
    if (current == 0) {
        dm__custody_set_why(c, "no active KEK version");
        set_ready(w, false);
        return;
    }
    if (!c->is_file && !w->legacy_warned) {
        pthread_rwlock_rdlock(&c->mu);
        dm__kver_t *cur = dm__custody_find(c, current);
        bool legacy = cur && cur->is_file;
        pthread_rwlock_unlock(&c->mu);
        if (legacy) {
            dm_warn("custody",
                    "region %s: the current KEK version is still the key file: run "
                    "`domicilectl keys rotate %s` to move every data key into the token",
                    c->code, c->code);
            w->legacy_warned = true;
        }
    }
    set_ready(w, true);
}

/* Data keys per version (a scan of the kek_version index). */
static void count_keys(worker_t *w)
{
    dm_custody_t *c = w->c;
    dm_status_t *err = NULL;
    PGresult *res = db(c, DM_SQL_KEK_STATUS, 0, NULL, NULL, &err);
    if (!res) {
        dm_status_free(err);
        return;
    }
    pthread_rwlock_wrlock(&c->mu);
    for (int i = 0; i < PQntuples(res); i++) {
        dm__kver_t *v = dm__custody_find(c, dm_pg_int4(res, i, 0));
        if (v)
            v->data_keys = dm_pg_int8(res, i, 7);
    }
    pthread_rwlock_unlock(&c->mu);
    PQclear(res);
}

/*
 * Make a version: claim it in the database, find or generate its key in the token, store its
 * check value and make it active. `kind` "bootstrap" (only when the region has none: *made
 * stays 0 when another gateway made it) or "rotate".
 */
static dm_status_t *make_version(worker_t *w, const char *kind, const char *by,
                                 const char *request_id, bool rotate, int32_t *made,
                                 int64_t *rotation_id, int64_t *keys_total, bool *replayed)
{
    dm_custody_t *c = w->c;
    dm_status_t *err = NULL;
    char lease[16], status[16], label[96], holder[96];
    snprintf(lease, sizeof(lease), "%d", CLAIM_LEASE_MS);
    const char *vals[5] = {w->me, kind, c->rc->kek_label, lease, request_id};
    PGresult *res = db(c, DM_SQL_KEK_CLAIM, 5, vals, NULL, &err);
    if (!res)
        return err;
    text_of(res, 0, 0, status, sizeof(status));
    int32_t version = dm_pg_int4(res, 0, 1);
    text_of(res, 0, 2, label, sizeof(label));
    text_of(res, 0, 3, holder, sizeof(holder));
    PQclear(res);
    if (strcmp(status, "exists") == 0)
        return NULL;
    if (strcmp(status, "replayed") == 0) {
        *made = version;
        if (replayed)
            *replayed = true;
        return NULL;
    }
    if (strcmp(status, "busy") == 0)
        return dm_status_new(GRPC_STATUS_ABORTED,
                             "region \"%s\": KEK version %d is being made by gateway %s; try "
                             "again later",
                             c->code, version, holder);

    /* A gateway that died after generating the key left it in the token: use it. */
    dm_token_obj_t objs[8], key = 0;
    size_t n = 0;
    if ((err = dm_token_find(c->token, label, c->allow_extractable, objs, 8, &n)))
        return err;
    if (n == 0) {
        char id[16];
        snprintf(id, sizeof(id), "%d", version);
        if ((err = dm_token_generate(c->token, label, id, c->extractable, &key)))
            return err;
    } else {
        key = objs[0];
        for (size_t i = 1; i < n; i++) {
            dm_status_t *e = dm_token_destroy_obj(c->token, objs[i]);
            dm_status_free(e);
        }
    }
    dm__kver_t v = {.version = version, .obj = key, .has_obj = true};
    unsigned char *chk = NULL;
    size_t chk_len = 0;
    if ((err = make_check(c, &v, &chk, &chk_len)))
        return err;
    char vs[16];
    snprintf(vs, sizeof(vs), "%d", version);
    char rlease[16];
    snprintf(rlease, sizeof(rlease), "%d", c->cfg->kek_rotation_lease_ms);
    const char *avals[6] = {vs, (const char *)chk, w->me, by, rotate ? "true" : "false", rlease};
    int alens[6] = {0, (int)chk_len, 0, 0, 0, 0};
    res = db(c, DM_SQL_KEK_ACTIVATE, 6, avals, alens, &err);
    free(chk);
    if (!res)
        return err;
    text_of(res, 0, 0, status, sizeof(status));
    if (rotation_id)
        *rotation_id = dm_pg_int8(res, 0, 1);
    if (keys_total)
        *keys_total = dm_pg_int8(res, 0, 2);
    PQclear(res);
    if (strcmp(status, "ok") != 0)
        return dm_status_new(GRPC_STATUS_ABORTED,
                             "region \"%s\": lost the claim on KEK version %d (its lease expired "
                             "and another gateway took it over)",
                             c->code, version);
    *made = version;
    return NULL;
}

/* ---- operator requests -------------------------------------------------------------------- */

static void fill_report(worker_t *w, dm_custody_report_t *rep, dm_status_t **err)
{
    dm_custody_t *c = w->c;
    memset(rep, 0, sizeof(*rep));
    snprintf(rep->region, sizeof(rep->region), "%s", c->code);
    snprintf(rep->source, sizeof(rep->source), "%s", c->rc->kek_source);
    snprintf(rep->token, sizeof(rep->token), "%s", c->is_file ? "" : c->rc->pkcs11_token);
    rep->ready = dm_custody_ready(c);
    if (!rep->ready) {
        dm_status_t *st = dm_custody_check(c);
        snprintf(rep->why, sizeof(rep->why), "%s", st ? st->message : "");
        dm_status_free(st);
    }
    pthread_rwlock_rdlock(&c->mu);
    rep->current = c->current;
    pthread_rwlock_unlock(&c->mu);
    PGresult *res = db(c, DM_SQL_KEK_STATUS, 0, NULL, NULL, err);
    if (!res)
        return;
    for (int i = 0; i < PQntuples(res) && rep->n_versions < DM_CUSTODY_MAX_VERSIONS; i++) {
        dm_custody_version_t *v = &rep->versions[rep->n_versions++];
        v->version = dm_pg_int4(res, i, 0);
        text_of(res, i, 1, v->source, sizeof(v->source));
        text_of(res, i, 2, v->label, sizeof(v->label));
        text_of(res, i, 3, v->state, sizeof(v->state));
        v->created_ms = dm_pg_time_ms(res, i, 4);
        v->activated_ms = dm_pg_time_ms(res, i, 5);
        v->retired_ms = dm_pg_time_ms(res, i, 6);
        v->data_keys = dm_pg_int8(res, i, 7);
    }
    PQclear(res);
    res = db(c, DM_SQL_KEK_ROTATION_STATUS, 0, NULL, NULL, err);
    if (!res)
        return;
    if (PQntuples(res) == 1) {
        rep->rotation_id = dm_pg_int8(res, 0, 0);
        rep->target = dm_pg_int4(res, 0, 1);
        text_of(res, 0, 2, rep->rotation_state, sizeof(rep->rotation_state));
        rep->started_ms = dm_pg_time_ms(res, 0, 3);
        text_of(res, 0, 4, rep->started_by, sizeof(rep->started_by));
        rep->finished_ms = dm_pg_time_ms(res, 0, 5);
        rep->keys_total = dm_pg_int8(res, 0, 6);
        rep->keys_rewrapped = dm_pg_int8(res, 0, 7);
        text_of(res, 0, 8, rep->claimed_by, sizeof(rep->claimed_by));
        text_of(res, 0, 9, rep->last_error, sizeof(rep->last_error));
        rep->keys_remaining = dm_pg_int8(res, 0, 10);
    }
    PQclear(res);
    if (w->rot.active)
        rep->rewrap_per_s = atomic_load(&c->rewrap_rate);
}

static void answer(worker_t *w, dm__req_t *q, dm_status_t *err)
{
    if (err) {
        q->done(q->arg, NULL, err);
        return;
    }
    dm_custody_report_t *rep = dm_malloc(sizeof(*rep));
    fill_report(w, rep, &err);
    if (err)
        q->done(q->arg, NULL, err);
    else
        q->done(q->arg, rep, NULL);
    free(rep);
}

static void answer_replayed(worker_t *w, dm__req_t *q)
{
    dm_status_t *err = NULL;
    dm_custody_report_t *rep = dm_malloc(sizeof(*rep));
    fill_report(w, rep, &err);
    rep->replayed = true;
    if (err)
        q->done(q->arg, NULL, err);
    else
        q->done(q->arg, rep, NULL);
    free(rep);
}

static void do_rotate(worker_t *w, dm__req_t *q)
{
    dm_custody_t *c = w->c;
    if (c->is_file) {
        answer(w, q,
               dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                             "region \"%s\": kek_source = \"file\": a KEK in a file is not "
                             "rotated; configure a PKCS#11 token",
                             c->code));
        return;
    }
    dm_status_t *st = dm_custody_check(c);
    if (st) {
        answer(w, q, st);
        return;
    }
    int32_t made = 0;
    int64_t rid = 0, total = 0;
    bool replayed = false;
    st = make_version(w, "rotate", q->by, q->request_id, true, &made, &rid, &total, &replayed);
    if (st) {
        answer(w, q, st);
        return;
    }
    if (replayed) {
        answer_replayed(w, q);
        return;
    }
    dm_info("custody",
            "region %s: KEK version %d made by %s and current; rotation %lld re-wraps %lld data "
            "keys in the background",
            c->code, made, q->by, (long long)rid, (long long)total);
    refresh(w);
    w->rotation_check_at = 0;
    answer(w, q, NULL);
}

/* Retire `version` (by `by`): NULL when it is retired now or was before (its token object is
 * then destroyed), else why not. */
static dm_status_t *retire_version(worker_t *w, int32_t version, const char *by)
{
    dm_custody_t *c = w->c;
    dm_status_t *err = NULL;
    char vs[16], status[16], label[96];
    snprintf(vs, sizeof(vs), "%d", version);
    const char *vals[2] = {vs, by};
    PGresult *res = db(c, DM_SQL_KEK_RETIRE, 2, vals, NULL, &err);
    if (!res)
        return err;
    text_of(res, 0, 0, status, sizeof(status));
    int64_t keys = dm_pg_int8(res, 0, 1);
    text_of(res, 0, 2, label, sizeof(label));
    PQclear(res);
    if (strcmp(status, "no_version") == 0)
        return dm_status_new(GRPC_STATUS_NOT_FOUND, "region \"%s\" has no KEK version %d", c->code,
                             version);
    if (strcmp(status, "current") == 0 || strcmp(status, "creating") == 0)
        return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                             "region \"%s\": KEK version %d is the current one (rotate first)",
                             c->code, version);
    if (strcmp(status, "in_use") == 0)
        return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                             "region \"%s\": KEK version %d still wraps %lld data keys (a "
                             "rotation re-wraps them: see `keys status`)",
                             c->code, version, (long long)keys);
    if (strcmp(status, "ok") == 0)
        dm_info("custody", "region %s: KEK version %d retired by %s", c->code, version, by);
    /* ok, or retired before: make sure nothing of it is left in the token. */
    if (!c->is_file && label[0] && dm_token_ok(c->token))
        clean_retired(w, label);
    refresh(w);
    return NULL;
}

static void do_retire(worker_t *w, dm__req_t *q)
{
    answer(w, q, retire_version(w, q->version, q->by));
}

/* ---- the crypto-period (regions/schema/010_crypto_period.sql, docs/backups.md) ------------- */

#define PERIOD_BY "domicile (crypto-period)"

/*
 * Rotate the current version once it has been current kek_rotate_every_s, and retire a
 * superseded version kek_retire_after_s after it stopped being current, once no data key uses
 * it. Every gateway of the region runs this; the database decides: a rotation's request id
 * names the version it supersedes (a second gateway's is a replay), and a retirement re-checks
 * under the lock that key creation takes.
 */
static void period_step(worker_t *w)
{
    dm_custody_t *c = w->c;
    const dm_config_t *cfg = c->cfg;
    if (c->is_file || cfg->kek_rotate_every_s <= 0 || dm_mono_ms() < w->period_at)
        return;
    w->period_at = dm_mono_ms() + PERIOD_CHECK_MS;
    dm_status_t *err = NULL;
    PGresult *res = db(c, DM_SQL_KEK_SCHEDULE, 0, NULL, NULL, &err);
    if (!res) {
        if (!w->period_failing)
            dm_warn("custody", "region %s: crypto-period: cannot read the KEK versions: %s",
                    c->code, err ? err->message : "?");
        w->period_failing = true;
        dm_status_free(err);
        return;
    }
    w->period_failing = false;
    int32_t rotate_after = 0, retire[8];
    size_t n_retire = 0;
    int64_t oldest_ms = -1;
    for (int i = 0; i < PQntuples(res); i++) {
        int32_t v = dm_pg_int4(res, i, 0);
        bool current = dm_pg_bool(res, i, 1), in_use = dm_pg_bool(res, i, 4);
        bool rotating = dm_pg_bool(res, i, 5);
        int64_t active_ms = PQgetisnull(res, i, 2) ? 0 : dm_pg_int8(res, i, 2);
        int64_t superseded_ms = PQgetisnull(res, i, 3) ? -1 : dm_pg_int8(res, i, 3);
        if (active_ms > oldest_ms)
            oldest_ms = active_ms;
        if (current && !rotating && active_ms >= (int64_t)cfg->kek_rotate_every_s * 1000)
            rotate_after = v;
        else if (!current && !in_use && superseded_ms >= (int64_t)cfg->kek_retire_after_s * 1000 &&
                 n_retire < DM_ARRAY_LEN(retire))
            retire[n_retire++] = v;
    }
    PQclear(res);
    atomic_store(&c->oldest_active_ms, oldest_ms);
    for (size_t i = 0; i < n_retire; i++) {
        dm_status_t *st = retire_version(w, retire[i], PERIOD_BY);
        if (st) {
            dm_warn("custody", "region %s: crypto-period: KEK version %d not retired: %s", c->code,
                    retire[i], st->message);
            dm_status_free(st);
        }
    }
    if (rotate_after == 0)
        return;
    char request_id[64];
    snprintf(request_id, sizeof(request_id), "crypto-period:after-v%d", rotate_after);
    int32_t made = 0;
    int64_t rid = 0, total = 0;
    bool replayed = false;
    dm_status_t *st =
        make_version(w, "rotate", PERIOD_BY, request_id, true, &made, &rid, &total, &replayed);
    if (st) {
        /* ABORTED: another gateway of the region is making it. */
        if (st->code != GRPC_STATUS_ABORTED)
            dm_warn("custody", "region %s: crypto-period: rotation after KEK version %d: %s",
                    c->code, rotate_after, st->message);
        dm_status_free(st);
        return;
    }
    if (!replayed && made > 0)
        dm_info("custody",
                "region %s: KEK version %d was current for %d s (kek_rotate_every_s): version "
                "%d made and current; rotation %lld re-wraps %lld data keys in the background",
                c->code, rotate_after, cfg->kek_rotate_every_s, made, (long long)rid,
                (long long)total);
    refresh(w);
    w->rotation_check_at = 0;
}

/* ---- rotation ----------------------------------------------------------------------------- */

static void append_item(char **buf, size_t *len, size_t *cap, const char *item)
{
    size_t n = strlen(item);
    while (*len + n + 3 >= *cap)
        *buf = dm_realloc(*buf, *cap *= 2);
    if ((*buf)[*len - 1] != '{')
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

/* One step of the rotation this gateway holds (or the claim of one). True when there is more
 * to do at once. */
static bool rotation_step(worker_t *w)
{
    dm_custody_t *c = w->c;
    rotation_t *r = &w->rot;
    dm_status_t *err = NULL;
    char lease[16];
    snprintf(lease, sizeof(lease), "%d", c->cfg->kek_rotation_lease_ms);
    if (!r->active) {
        if (dm_mono_ms() < w->rotation_check_at)
            return false;
        w->rotation_check_at = dm_mono_ms() + ROTATION_CHECK_MS;
        const char *vals[2] = {w->me, lease};
        PGresult *res = db(c, DM_SQL_KEK_ROTATION_CLAIM, 2, vals, NULL, &err);
        if (!res) {
            dm_status_free(err);
            return false;
        }
        if (PQntuples(res) == 0) {
            PQclear(res);
            atomic_store(&c->rotation_remaining, -1);
            return false;
        }
        memset(r, 0, sizeof(*r));
        r->active = true;
        r->id = dm_pg_int8(res, 0, 0);
        r->target = dm_pg_int4(res, 0, 1);
        r->total = dm_pg_int8(res, 0, 2);
        r->done = dm_pg_int8(res, 0, 3);
        r->window_ms = dm_mono_ms();
        bool taken = dm_pg_bool(res, 0, 4);
        PQclear(res);
        dm_info("custody",
                "region %s: %s rotation %lld to KEK version %d (%lld of %lld data keys "
                "re-wrapped so far)",
                c->code,
                taken         ? "taking over"
                : r->done > 0 ? "resuming"
                              : "running",
                (long long)r->id, r->target, (long long)r->done, (long long)r->total);
    }
    pthread_rwlock_rdlock(&c->mu);
    dm__kver_t *tv = dm__custody_find(c, r->target);
    bool usable = tv && !tv->retired && tv->verified;
    pthread_rwlock_unlock(&c->mu);
    if (!usable) {
        r->active = false; /* the version table catches up on the next refresh */
        return false;
    }

    char target_s[16], cv[16], ck[24], limit[16];
    snprintf(target_s, sizeof(target_s), "%d", r->target);
    snprintf(cv, sizeof(cv), "%d", r->cursor_version);
    snprintf(ck, sizeof(ck), "%lld", (long long)r->cursor_key);
    snprintf(limit, sizeof(limit), "%d", c->cfg->kek_rewrap_batch);
    const char *bvals[4] = {target_s, cv, ck, limit};
    PGresult *rows = db(c, DM_SQL_KEK_REWRAP_BATCH, 4, bvals, NULL, &err);
    if (!rows) {
        dm_status_free(err);
        r->active = false;
        return false;
    }
    int n = PQntuples(rows);
    char rid[24];
    snprintf(rid, sizeof(rid), "%lld", (long long)r->id);
    if (n == 0) {
        PQclear(rows);
        char msg[160] = "";
        if (r->pass_failed > 0)
            snprintf(msg, sizeof(msg),
                     "%lld data keys under older KEK versions do not unwrap: they stay as they are",
                     (long long)r->pass_failed);
        const char *fvals[3] = {rid, w->me, msg[0] ? msg : NULL};
        PGresult *res = db(c, DM_SQL_KEK_ROTATION_FINISH, 3, fvals, NULL, &err);
        if (!res) {
            dm_status_free(err);
            r->active = false;
            return false;
        }
        char status[16];
        text_of(res, 0, 0, status, sizeof(status));
        PQclear(res);
        if (strcmp(status, "done") == 0) {
            dm_info("custody",
                    "region %s: rotation %lld done: every data key is under KEK "
                    "version %d",
                    c->code, (long long)r->id, r->target);
            r->active = false;
            atomic_store(&c->rotation_remaining, 0);
            w->count_at = 0;
            return false;
        }
        if (strcmp(status, "more") == 0 && !msg[0]) {
            /* Keys stored under an older version by a gateway that had not seen the new one
             * yet: another pass. */
            r->cursor_version = 0;
            r->cursor_key = 0;
            return true;
        }
        if (msg[0])
            dm_error("custody", "region %s: rotation %lld: %s", c->code, (long long)r->id, msg);
        r->active = false;
        w->rotation_check_at = dm_mono_ms() + (msg[0] ? STUCK_RETRY_MS : ROTATION_CHECK_MS);
        return false;
    }

    size_t icap = 256, il = 1, wcap = 1024, wl = 1;
    char *ids = dm_malloc(icap), *blobs = dm_malloc(wcap);
    strcpy(ids, "{");
    strcpy(blobs, "{");
    int good = 0;
    for (int i = 0; i < n; i++) {
        int64_t key_id = dm_pg_int8(rows, i, 0);
        int cl = 0, sl = 0, wlen = 0;
        const char *cust = dm_pg_bytes(rows, i, 1, &cl);
        const unsigned char *sk = (const unsigned char *)dm_pg_bytes(rows, i, 2, &sl);
        const unsigned char *wr = (const unsigned char *)dm_pg_bytes(rows, i, 3, &wlen);
        r->cursor_version = dm_pg_int4(rows, i, 4);
        r->cursor_key = key_id;
        char *customer = dm_strndup(cust, (size_t)cl);
        size_t aad_len;
        unsigned char *aad = dm_key_aad(c->code, customer, sl ? sk : NULL, (size_t)sl, &aad_len);
        unsigned char dek[DM_KEY_LEN], *nw = NULL;
        size_t nw_len = 0;
        dm_status_t *st = dm_custody_unwrap(c, wr, (size_t)wlen, aad, aad_len, dek);
        if (!st) {
            pthread_rwlock_rdlock(&c->mu);
            tv = dm__custody_find(c, r->target);
            st = tv ? dm__custody_wrap_with(c, tv, dek, aad, aad_len, &nw, &nw_len)
                    : dm_status_new(GRPC_STATUS_UNAVAILABLE, "target version gone");
            pthread_rwlock_unlock(&c->mu);
        }
        OPENSSL_cleanse(dek, sizeof(dek));
        free(aad);
        free(customer);
        if (st) {
            if (st->code == GRPC_STATUS_DATA_LOSS) {
                r->pass_failed++;
                dm_error("custody",
                         "region %s: data key %lld (KEK version %d) does not unwrap; "
                         "not re-wrapped",
                         c->code, (long long)key_id, dm_custody_version_of(wr, (size_t)wlen));
                dm_status_free(st);
                continue;
            }
            /* The token failed: stop here, the claim's lease lets us (or another) resume. */
            dm_warn("custody", "region %s: rotation %lld paused: %s", c->code, (long long)r->id,
                    st->message);
            dm_status_free(st);
            free(nw);
            PQclear(rows);
            free(ids);
            free(blobs);
            r->active = false;
            return false;
        }
        char item[24], hex[2 * DM_CUSTODY_WRAPPED_LEN + 1], bitem[2 * DM_CUSTODY_WRAPPED_LEN + 8];
        snprintf(item, sizeof(item), "%lld", (long long)key_id);
        append_item(&ids, &il, &icap, item);
        dm_hex_encode(nw, nw_len, hex);
        snprintf(bitem, sizeof(bitem), "\"\\\\x%s\"", hex);
        append_item(&blobs, &wl, &wcap, bitem);
        free(nw);
        good++;
    }
    PQclear(rows);
    close_array(&ids, &il, &icap);
    close_array(&blobs, &wl, &wcap);
    int64_t applied = 0;
    if (good > 0) {
        const char *avals[6] = {rid, w->me, target_s, ids, blobs, lease};
        PGresult *res = db(c, DM_SQL_KEK_REWRAP, 6, avals, NULL, &err);
        if (!res) {
            dm_status_free(err);
            r->active = false;
        } else {
            applied = dm_pg_int8(res, 0, 0);
            PQclear(res);
            if (applied < 0) {
                dm_warn("custody", "region %s: rotation %lld was taken over by another gateway",
                        c->code, (long long)r->id);
                r->active = false;
                applied = 0;
            }
        }
    }
    free(ids);
    free(blobs);
    r->done += applied;
    atomic_fetch_add(&c->rewrapped, applied);
    int64_t remaining = r->total - r->done;
    atomic_store(&c->rotation_remaining, remaining > 0 ? remaining : 0);
    r->window_keys += applied;
    int64_t now = dm_mono_ms();
    if (now - r->window_ms >= 1000) {
        atomic_store(&c->rewrap_rate,
                     (double)r->window_keys * 1000.0 / (double)(now - r->window_ms));
        r->window_ms = now;
        r->window_keys = 0;
    }
    return r->active;
}

/* ---- the thread --------------------------------------------------------------------------- */

static bool pin_file_changed(worker_t *w)
{
    struct stat sb;
    if (stat(w->c->rc->pkcs11_pin_file, &sb) != 0)
        return false;
    return sb.st_ino != w->pin_seen.st_ino || sb.st_size != w->pin_seen.st_size ||
           sb.st_mtim.tv_sec != w->pin_seen.st_mtim.tv_sec ||
           sb.st_mtim.tv_nsec != w->pin_seen.st_mtim.tv_nsec;
}

static void open_token(worker_t *w)
{
    dm_custody_t *c = w->c;
    if (w->pin_refused && !pin_file_changed(w)) {
        w->token_retry_at = dm_mono_ms() + BACKOFF_MAX_MS;
        return;
    }
    atomic_store(&c->ready, false);
    set_ready(w, false);
    bool pin_refused = false;
    dm_status_t *st = dm_token_reopen(c->token, &pin_refused);
    if (!st) {
        dm_info("custody", "region %s: token \"%s\" open (%d sessions)", c->code,
                c->rc->pkcs11_token, c->rc->pkcs11_sessions);
        w->backoff_ms = BACKOFF_MIN_MS;
        w->pin_refused = false;
        refresh(w);
        w->refresh_at = dm_mono_ms() + REFRESH_MS;
        return;
    }
    dm__custody_set_why(c, "%s", st->message);
    if (pin_refused) {
        /* Trying the same PIN again would count against it (an HSM locks the user out): wait
         * for the PIN file to change. */
        w->pin_refused = true;
        stat(c->rc->pkcs11_pin_file, &w->pin_seen);
        dm_error("custody", "%s; not retrying until %s changes", st->message,
                 c->rc->pkcs11_pin_file);
    } else if (w->backoff_ms <= BACKOFF_MIN_MS) {
        dm_error("custody", "%s; retrying", st->message);
    }
    dm_status_free(st);
    w->token_retry_at = dm_mono_ms() + w->backoff_ms;
    w->backoff_ms = w->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : w->backoff_ms * 2;
    set_ready(w, false);
}

static void *run(void *arg)
{
    dm_custody_t *c = arg;
    /* Named for top -H, gdb and the tests (15 characters at most). */
    char name[16];
    snprintf(name, sizeof(name), "dm-custody-%.4s", c->code);
    pthread_setname_np(pthread_self(), name);
    worker_t *w = dm_calloc(1, sizeof(*w));
    char host[64] = "";
    unsigned char rnd[4];
    w->c = c;
    gethostname(host, sizeof(host) - 1);
    dm_random_bytes(rnd, sizeof(rnd));
    snprintf(w->me, sizeof(w->me), "%s:%d:%02x%02x%02x%02x", host, (int)getpid(), rnd[0], rnd[1],
             rnd[2], rnd[3]);
    w->backoff_ms = BACKOFF_MIN_MS;
    atomic_store(&c->rotation_remaining, -1);
    atomic_store(&c->oldest_active_ms, -1);
    if (!c->is_file && c->cfg->kek_rotate_every_s == 0)
        dm_warn("custody",
                "region %s: kek_rotate_every_s = 0: the KEK is never rotated, so a data backup "
                "taken before an erasure keeps the erased subject's records readable to whoever "
                "holds it and the token (docs/backups.md)",
                c->code);
    bool busy = false;
    for (;;) {
        pthread_mutex_lock(&c->qmu);
        if (!busy && !c->stopping && !c->queue && !c->poked) {
            int64_t due = w->refresh_at;
            if (c->token && !dm_token_ok(c->token) && w->token_retry_at < due)
                due = w->token_retry_at;
            /* A key file is never rotated (rotation_step does not run, so rotation_check_at
             * stays 0): waking for it would spin this thread. */
            if (!c->is_file && w->rotation_check_at < due && atomic_load(&c->ready))
                due = w->rotation_check_at;
            int64_t wait_ms = due - dm_mono_ms();
            if (wait_ms > 0) {
                struct timespec ts;
                clock_gettime(CLOCK_MONOTONIC, &ts);
                ts.tv_sec += wait_ms / 1000;
                ts.tv_nsec += (wait_ms % 1000) * 1000000;
                if (ts.tv_nsec >= 1000000000) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000;
                }
                pthread_cond_timedwait(&c->qcv, &c->qmu, &ts);
            }
        }
        if (c->stopping) {
            pthread_mutex_unlock(&c->qmu);
            break;
        }
        dm__req_t *q = c->queue;
        if (q) {
            c->queue = q->next;
            if (!c->queue)
                c->queue_tail = NULL;
        }
        bool poked = c->poked;
        c->poked = false;
        pthread_mutex_unlock(&c->qmu);

        int64_t now = dm_mono_ms();
        if (c->token && !dm_token_ok(c->token) && now >= w->token_retry_at)
            open_token(w);
        if (poked || now >= w->refresh_at) {
            refresh(w);
            w->refresh_at = dm_mono_ms() + REFRESH_MS;
        }
        if (dm_custody_ready(c) && dm_mono_ms() >= w->count_at) {
            count_keys(w);
            w->count_at = dm_mono_ms() + COUNT_MS;
        }
        if (q) {
            if (q->kind == REQ_ROTATE)
                do_rotate(w, q);
            else if (q->kind == REQ_RETIRE)
                do_retire(w, q);
            else
                answer(w, q, NULL);
            free(q);
        }
        if (dm_custody_ready(c))
            period_step(w);
        busy = dm_custody_ready(c) && !c->is_file && rotation_step(w);
        if (busy && c->cfg->kek_rewrap_pause_ms > 0) {
            /* A pause between batches, cut short by a request or by stop. */
            pthread_mutex_lock(&c->qmu);
            if (!c->stopping && !c->queue) {
                struct timespec ts;
                clock_gettime(CLOCK_MONOTONIC, &ts);
                int64_t ms = c->cfg->kek_rewrap_pause_ms;
                ts.tv_sec += ms / 1000;
                ts.tv_nsec += (ms % 1000) * 1000000;
                if (ts.tv_nsec >= 1000000000) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000;
                }
                pthread_cond_timedwait(&c->qcv, &c->qmu, &ts);
            }
            pthread_mutex_unlock(&c->qmu);
        }
    }
    free(w);
    return NULL;
}

void dm_custody_start(dm_custody_t *c)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_destroy(&c->qcv);
    pthread_cond_init(&c->qcv, &ca);
    pthread_condattr_destroy(&ca);
    c->started = true;
    if (pthread_create(&c->thread, NULL, run, c) != 0) {
        fprintf(stderr, "domicile: cannot start the custody thread\n");
        abort();
    }
}

void dm_custody_stop(dm_custody_t *c)
{
    if (!c->started)
        return;
    pthread_mutex_lock(&c->qmu);
    c->stopping = true;
    pthread_cond_broadcast(&c->qcv);
    pthread_mutex_unlock(&c->qmu);
    pthread_join(c->thread, NULL);
    c->started = false;
    for (dm__req_t *q = c->queue; q;) {
        dm__req_t *next = q->next;
        q->done(q->arg, NULL,
                dm_status_new(GRPC_STATUS_UNAVAILABLE, "region \"%s\": the gateway is stopping",
                              c->code));
        free(q);
        q = next;
    }
    c->queue = c->queue_tail = NULL;
}

void dm_custody_poke(dm_custody_t *c)
{
    pthread_mutex_lock(&c->qmu);
    c->poked = true;
    pthread_cond_signal(&c->qcv);
    pthread_mutex_unlock(&c->qmu);
}

static void enqueue(dm_custody_t *c, req_kind_t kind, int32_t version, const char *by,
                    const char *request_id, dm_custody_done_fn done, void *arg)
{
    dm__req_t *q = dm_calloc(1, sizeof(*q));
    snprintf(q->request_id, sizeof(q->request_id), "%s", request_id ? request_id : "");
    q->kind = kind;
    q->version = version;
    snprintf(q->by, sizeof(q->by), "%s", by ? by : "");
    q->done = done;
    q->arg = arg;
    pthread_mutex_lock(&c->qmu);
    if (!c->started || c->stopping) {
        pthread_mutex_unlock(&c->qmu);
        free(q);
        done(arg, NULL,
             dm_status_new(GRPC_STATUS_UNAVAILABLE, "region \"%s\": key custody is not running",
                           c->code));
        return;
    }
    if (c->queue_tail)
        c->queue_tail->next = q;
    else
        c->queue = q;
    c->queue_tail = q;
    pthread_cond_signal(&c->qcv);
    pthread_mutex_unlock(&c->qmu);
}

void dm_custody_rotate(dm_custody_t *c, const char *by, const char *request_id,
                       dm_custody_done_fn done, void *arg)
{
    enqueue(c, REQ_ROTATE, 0, by, request_id, done, arg);
}

void dm_custody_status(dm_custody_t *c, dm_custody_done_fn done, void *arg)
{
    enqueue(c, REQ_STATUS, 0, NULL, NULL, done, arg);
}

void dm_custody_retire(dm_custody_t *c, int32_t version, const char *by, dm_custody_done_fn done,
                       void *arg)
{
    enqueue(c, REQ_RETIRE, version, by, NULL, done, arg);
}
