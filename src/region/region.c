/*
 * Region executors. See include/domicile/region.h and src/region/README.md.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>
#include <openssl/crypto.h>

#include "domicile/clock.h"
#include "domicile/log.h"
#include "domicile/region.h"

#define BACKOFF_MIN_MS         100
#define BACKOFF_MAX_MS         5000
#define MAX_BATCH_JOBS         64
#define MAX_BATCH_BYTES        (8 << 20)
#define MAX_BATCHES_RUNNING    2 /* write batches per region at once: group commit */
#define PURGE_INTERVAL_MS      60000
#define RESULT_TIMEOUT_MS      30000 /* a region that answers nothing for this long is dead */
#define MAINTENANCE_TIMEOUT_MS 10000

typedef enum {
    EX_CONNECTING_FIRST, /* first attempt since start: jobs may wait for it */
    EX_UP,               /* verified connection in pipeline mode */
    EX_DOWN,             /* no connection; retrying with backoff */
} exec_state_t;

struct dm_exec {
    struct executor *e;
};

typedef struct executor {
    dm_region_t *region;
    int index;
    pthread_t thread;
    bool started;
    PGconn *conn;
    exec_state_t state; /* region->mu */
    int backoff_ms;
    struct timespec last_activity;
    struct timespec last_purge;
    struct timespec last_idle_task;
    int wait_ms;   /* how long the current round may wait for the region */
    bool in_round; /* region->mu: running a round (pool use) */
} executor_t;

struct dm_region {
    dm_regions_t *set;
    const dm_region_config_t *cfg;
    char *password;
    char *hosts_csv;
    char *ports_csv;
    char *connect_timeout_s;
    char component[32];

    executor_t *execs;
    int n_execs;

    pthread_mutex_t mu; /* queue, exec states, last_error */
    pthread_cond_t cond;
    dm_job_t *q_head, *q_tail;
    int n_up, n_first;
    atomic_bool serving;
    bool reported;
    char last_error[256];
    int64_t last_error_ms;
    int queued, in_use;
    /* Group commit: batchable jobs queued, and write batches being run. While
     * batches_running is at the limit, executors leave batchable jobs queued (taking the
     * other jobs), so the writes that arrive during the commits go together in the next. */
    int queued_batchable, batches_running;
    int64_t write_batches, batched_writes;
    char primary[128]; /* host:port of the node the pool is connected to */
    /* Breaker: opened when the region stops answering (a round or probe times out); while
     * open, calls fail at once instead of waiting for their deadline; the next successful
     * connection closes it. */
    bool breaker_open;
    int64_t breaker_changed_ms;
    /* Fence: an operator stopped traffic. fence_rows[i]: what region i's table holds about
     * this region (has_row[i] false: nothing); [DM_MAX_REGIONS]: this gateway's own last
     * write. fenced and the three fields below follow the newest of them. */
    bool fenced;
    char fence_reason[DM_FENCE_REASON_MAX + 1], fenced_by[72];
    int64_t fenced_at_ms;
    dm_fence_t fence_rows[DM_MAX_REGIONS + 1];
    bool has_row[DM_MAX_REGIONS + 1];
    atomic_bool poked; /* run the maintenance task now */
    /* Held after a restore until reconciled (dm_region_hold): held_reason is non-empty. */
    char held_reason[DM_FENCE_REASON_MAX + 160];
};

struct dm_regions {
    const dm_config_t *cfg;
    dm_region_t *regions;
    size_t n;
    dm_region_change_fn on_change;
    void *on_change_arg;
    dm_idle_fn idle_fn;
    void *idle_arg;
    dm_remote_submit_fn remote_submit; /* jobs of regions served by other gateways */
    void *remote_arg;
    const dm_job_owner_ops_t *owner_ops; /* NULL: owners are never asked */
    int idle_interval_ms;
    atomic_bool stopping;
};

void dm_job_param_text(dm_job_t *job, int i, const char *v)
{
    if (i < 0 || i >= DM_JOB_MAX_PARAMS)
        abort(); /* a statement with more parameters than a job holds: a bug */
    job->values[i] = v;
    job->lengths[i] = 0;
    job->formats[i] = 0;
    if (i >= job->n_params)
        job->n_params = i + 1;
}

void dm_job_param_bin(dm_job_t *job, int i, const void *v, int len)
{
    if (i < 0 || i >= DM_JOB_MAX_PARAMS)
        abort();
    job->values[i] = v;
    job->lengths[i] = len;
    job->formats[i] = 1;
    if (i >= job->n_params)
        job->n_params = i + 1;
}

/* Empty the queue (region->mu held); returns what was in it. */
static dm_job_t *take_all_locked(dm_region_t *r)
{
    dm_job_t *list = r->q_head;
    r->q_head = r->q_tail = NULL;
    r->queued = 0;
    r->queued_batchable = 0;
    return list;
}

static int64_t elapsed_ms(const struct timespec *since)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)(now.tv_sec - since->tv_sec) * 1000 + (now.tv_nsec - since->tv_nsec) / 1000000;
}

/* Called with r->mu held. */
static void set_error_locked(dm_region_t *r, const char *msg)
{
    if (msg[0])
        r->last_error_ms = dm_now_ms();
    snprintf(r->last_error, sizeof(r->last_error), "%s", msg);
    /* libpq messages end with a newline and may span lines; keep log lines one line. */
    size_t n = strlen(r->last_error);
    while (n && (r->last_error[n - 1] == '\n' || r->last_error[n - 1] == ' '))
        r->last_error[--n] = '\0';
    for (char *p = r->last_error; *p; p++)
        if (*p == '\n' || *p == '\t')
            *p = ' ';
}

static void set_error(dm_region_t *r, const char *msg)
{
    pthread_mutex_lock(&r->mu);
    set_error_locked(r, msg);
    pthread_mutex_unlock(&r->mu);
}

static dm_status_t *unavailable(dm_region_t *r)
{
    char err[256];
    dm_region_last_error(r, err, sizeof(err));
    return dm_status_detail(
        dm_status_new(GRPC_STATUS_UNAVAILABLE, "region \"%s\" is unavailable", r->cfg->code), "%s",
        err);
}

static void fail_job(dm_job_t *job, dm_status_t *st)
{
    job->next = NULL;
    job->done(job, NULL, st);
}

/* Change an executor's state; report region up/down transitions. */
static void exec_set_state(executor_t *e, exec_state_t to)
{
    dm_region_t *r = e->region;
    dm_job_t *orphans = NULL;

    pthread_mutex_lock(&r->mu);
    if (e->state == EX_UP)
        r->n_up--;
    if (e->state == EX_CONNECTING_FIRST)
        r->n_first--;
    e->state = to;
    if (to == EX_UP)
        r->n_up++;
    bool serving = r->n_up > 0;
    if (!serving && r->n_first == 0) {
        /* Nobody can run what is queued: fail it now rather than at its deadline. */
        orphans = take_all_locked(r);
    }
    bool was = atomic_exchange(&r->serving, serving);
    bool report = was != serving || !r->reported;
    r->reported = r->reported || to != EX_CONNECTING_FIRST;
    char err[256];
    snprintf(err, sizeof(err), "%s", r->last_error);
    pthread_mutex_unlock(&r->mu);

    while (orphans) {
        dm_job_t *next = orphans->next;
        fail_job(orphans, unavailable(r));
        orphans = next;
    }
    if (report) {
        if (serving)
            dm_info(r->component, "region is serving");
        else
            dm_warn(r->component, "region is not serving: %s", err);
        if (was != serving && r->set->on_change)
            r->set->on_change(r->set->on_change_arg, r, serving);
    }
}

/* The region stopped answering: open the breaker and fail what waits for it. */
static void breaker_open(dm_region_t *r, const char *why)
{
    dm_job_t *orphans;
    pthread_mutex_lock(&r->mu);
    bool was = r->breaker_open;
    r->breaker_open = true;
    if (!was)
        r->breaker_changed_ms = dm_now_ms();
    set_error_locked(r, why);
    orphans = take_all_locked(r);
    pthread_mutex_unlock(&r->mu);
    if (!was)
        dm_warn(r->component, "circuit open: %s; calls fail at once until it answers again", why);
    while (orphans) {
        dm_job_t *next = orphans->next;
        fail_job(orphans, unavailable(r));
        orphans = next;
    }
}

/* Wait up to ms or until stop. Returns false when stopping. */
static bool pause_ms(dm_region_t *r, int ms)
{
    struct timespec until = dm_abstime_in_ms(ms);
    pthread_mutex_lock(&r->mu);
    while (!atomic_load(&r->set->stopping))
        if (pthread_cond_timedwait(&r->cond, &r->mu, &until) == ETIMEDOUT)
            break;
    pthread_mutex_unlock(&r->mu);
    return !atomic_load(&r->set->stopping);
}

/* Wait for the connection to become readable, up to timeout_ms. */
static bool wait_readable(PGconn *conn, int timeout_ms)
{
    struct pollfd pfd = {.fd = PQsocket(conn), .events = POLLIN};
    for (;;) {
        int rc = poll(&pfd, 1, timeout_ms);
        if (rc > 0)
            return true;
        if (rc == 0 || errno != EINTR)
            return false;
    }
}

/* Next result of the pipeline, waiting at most wait_ms. *timed_out tells a black-holed
 * server from a NULL separator. */
static PGresult *next_result(PGconn *conn, bool *timed_out, int wait_ms)
{
    *timed_out = false;
    while (PQisBusy(conn)) {
        if (!wait_readable(conn, wait_ms)) {
            *timed_out = true;
            return NULL;
        }
        if (!PQconsumeInput(conn))
            return NULL;
    }
    return PQgetResult(conn);
}

static void drop_conn(executor_t *e, const char *why)
{
    if (why)
        set_error(e->region, why);
    if (e->conn) {
        PQfinish(e->conn);
        e->conn = NULL;
    }
    exec_set_state(e, EX_DOWN);
}

static bool exec_connect(executor_t *e)
{
    dm_region_t *r = e->region;
    const char *keys[] = {"host",
                          "port",
                          "dbname",
                          "user",
                          "password",
                          "sslmode",
                          "sslrootcert",
                          "connect_timeout",
                          "target_session_attrs",
                          "application_name",
                          NULL};
    const char *vals[] = {r->hosts_csv,
                          r->ports_csv,
                          r->cfg->database,
                          r->cfg->user,
                          r->password,
                          r->cfg->ssl_mode,
                          r->cfg->ssl_root_cert,
                          r->connect_timeout_s,
                          "read-write",
                          "domiciled",
                          NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 0);
    PGresult *res = NULL;
    char msg[256];

    if (PQstatus(conn) != CONNECTION_OK) {
        snprintf(msg, sizeof(msg), "%s", PQerrorMessage(conn));
        goto fail;
    }
    res = PQexec(conn, "SELECT code FROM domicile.region_identity");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        snprintf(msg, sizeof(msg), "cannot read the region identity: %s",
                 PQresultErrorMessage(res));
        goto fail;
    }
    if (PQntuples(res) != 1 || strcmp(PQgetvalue(res, 0, 0), r->cfg->code) != 0) {
        snprintf(msg, sizeof(msg),
                 "database identifies as region \"%.16s\", not \"%s\": refusing it",
                 PQntuples(res) == 1 ? PQgetvalue(res, 0, 0) : "(none)", r->cfg->code);
        dm_error(r->component, "%s", msg);
        goto fail;
    }
    PQclear(res);
    /* A restore recorded in the database holds the region before this connection serves
     * anything (the maintenance task reconciles and releases it: src/restore). */
    res = PQexec(conn, "SELECT target, coalesce(to_char(restore_point AT TIME ZONE 'UTC', "
                       "'YYYY-MM-DD HH24:MI:SS+00'), '?') FROM domicile.restores "
                       "WHERE state <> 'reconciled'");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        snprintf(msg, sizeof(msg), "cannot read domicile.restores: %s (schema not migrated?)",
                 PQresultErrorMessage(res));
        goto fail;
    }
    if (PQntuples(res) > 0) {
        char why[sizeof(r->held_reason)];
        snprintf(why, sizeof(why),
                 "restored from a backup (to %s): reconciling with the other regions before it "
                 "serves again",
                 PQgetvalue(res, 0, 1));
        dm_region_hold(r, why);
    }
    PQclear(res);
    res = NULL;
    for (int i = 0; i < DM_SQL__COUNT; i++) {
        res = PQprepare(conn, dm_sql[i].name, dm_sql[i].text, dm_sql[i].n_params, NULL);
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            snprintf(msg, sizeof(msg), "cannot prepare %s: %s (schema not migrated?)",
                     dm_sql[i].name, PQresultErrorMessage(res));
            dm_error(r->component, "%s", msg);
            goto fail;
        }
        PQclear(res);
        res = NULL;
    }
    if (!PQenterPipelineMode(conn)) {
        snprintf(msg, sizeof(msg), "cannot enter pipeline mode: %s", PQerrorMessage(conn));
        goto fail;
    }
    e->conn = conn;
    e->backoff_ms = BACKOFF_MIN_MS;
    clock_gettime(CLOCK_MONOTONIC, &e->last_activity);
    pthread_mutex_lock(&r->mu);
    snprintf(r->primary, sizeof(r->primary), "%s:%s", PQhost(conn), PQport(conn));
    if (r->breaker_open) {
        r->breaker_open = false;
        r->breaker_changed_ms = dm_now_ms();
        dm_info(r->component, "circuit closed: connected to %s", r->primary);
    }
    set_error_locked(r, "");
    pthread_mutex_unlock(&r->mu);
    exec_set_state(e, EX_UP);
    return true;
fail:
    PQclear(res);
    PQfinish(conn);
    set_error(r, msg);
    exec_set_state(e, EX_DOWN);
    return false;
}

static dm_status_t *status_from_result(dm_region_t *r, const PGresult *res, PGconn *conn)
{
    const char *sqlstate = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *text = res ? PQresultErrorMessage(res) : PQerrorMessage(conn);
    grpc_status_code code = dm_status_code_from_sqlstate(sqlstate);
    dm_status_t *st;
    if (code == GRPC_STATUS_UNAVAILABLE)
        st = dm_status_new(code, "region \"%s\" is unavailable", r->cfg->code);
    else if (code == GRPC_STATUS_INTERNAL)
        st = dm_status_new(code, "internal error in region \"%s\"", r->cfg->code);
    else
        st = dm_status_new(code, "region \"%s\" refused the statement", r->cfg->code);
    if (sqlstate)
        snprintf(st->sqlstate, sizeof(st->sqlstate), "%s", sqlstate);
    return dm_status_detail(st, "%s%s", sqlstate ? sqlstate : "", text ? text : "");
}

static bool job_dead(const dm_regions_t *rs, dm_job_t *job, dm_status_t **why)
{
    const dm_job_owner_ops_t *ops = rs->owner_ops;
    if (!job->owner || !ops)
        return false;
    if (ops->cancelled(job->owner)) {
        *why = dm_status_new(GRPC_STATUS_CANCELLED, "call cancelled");
        return true;
    }
    if (ops->deadline_left_ms(job->owner) <= 0) {
        *why = dm_status_new(GRPC_STATUS_DEADLINE_EXCEEDED, "deadline exceeded before the "
                                                            "statement was sent");
        return true;
    }
    return false;
}

static bool send_job(executor_t *e, dm_job_t *job)
{
    return PQsendQueryPrepared(e->conn, dm_sql[job->stmt].name, job->n_params, job->values,
                               job->lengths, job->formats, 1) == 1;
}

/* Put jobs back at the head of the queue (to be run alone). */
static void requeue_front(dm_region_t *r, dm_job_t *list)
{
    if (!list)
        return;
    dm_job_t *tail = list;
    while (tail->next)
        tail = tail->next;
    pthread_mutex_lock(&r->mu);
    tail->next = r->q_head;
    r->q_head = list;
    for (dm_job_t *j = list; j; j = j->next) {
        r->queued++;
        if (j->batchable && !j->solo)
            r->queued_batchable++;
    }
    if (!r->q_tail)
        r->q_tail = tail;
    pthread_cond_signal(&r->cond);
    pthread_mutex_unlock(&r->mu);
}

/* Connection lost: every job not yet completed fails UNAVAILABLE. A write among them may
 * have committed before the connection broke; its client retries with the same request_id
 * and gets the stored result (never a duplicate). */
static void fail_all(executor_t *e, dm_job_t *list, const char *why)
{
    drop_conn(e, why);
    while (list) {
        dm_job_t *next = list->next;
        if (list->held) {
            PQclear(list->held);
            list->held = NULL;
        }
        fail_job(list, unavailable(e->region));
        list = next;
    }
}

/* Run one round: `alone` jobs each in their own implicit transaction, `batch` jobs together
 * in one (one commit, one wait for the synchronous standby). Results are delivered only
 * after the Sync that commits them arrived. */
static void run_round(executor_t *e, dm_job_t *alone, dm_job_t *batch)
{
    dm_region_t *r = e->region;
    PGconn *conn = e->conn;
    bool timed_out = false;
    int n_batch = 0;

    /* Wait for the region no longer than the latest deadline among the jobs (+100 ms), so
     * a black-holed region costs a call its deadline, not more. */
    int64_t longest = 0;
    bool unbounded = false;
    const dm_job_owner_ops_t *ops = r->set->owner_ops;
    for (int pass = 0; pass < 2; pass++) {
        for (dm_job_t *j = pass ? batch : alone; j; j = j->next) {
            int64_t left = j->owner && ops ? ops->deadline_left_ms(j->owner) : INT64_MAX;
            if (left == INT64_MAX)
                unbounded = true;
            else if (left > longest)
                longest = left;
        }
    }
    e->wait_ms =
        unbounded || longest + 100 > RESULT_TIMEOUT_MS ? RESULT_TIMEOUT_MS : (int)longest + 100;

    for (dm_job_t *j = alone; j; j = j->next)
        if (!send_job(e, j) || !PQpipelineSync(conn))
            goto broken;
    for (dm_job_t *j = batch; j; j = j->next, n_batch++)
        if (!send_job(e, j))
            goto broken;
    if (batch && !PQpipelineSync(conn))
        goto broken;
    clock_gettime(CLOCK_MONOTONIC, &e->last_activity);

    while (alone) {
        dm_job_t *j = alone;
        PGresult *res = next_result(conn, &timed_out, e->wait_ms);
        if (!res)
            goto broken;
        ExecStatusType rs = PQresultStatus(res);
        if (rs == PGRES_FATAL_ERROR) {
            dm_status_t *st = status_from_result(r, res, conn);
            PQclear(res);
            if (st->code == GRPC_STATUS_UNAVAILABLE) {
                /* e.g. 25006: we reached a standby that was a primary; reconnect. */
                dm_status_free(st);
                goto broken;
            }
            j->held = NULL;
            if (next_result(conn, &timed_out, e->wait_ms) != NULL)
                goto broken_st;
            PGresult *sync = next_result(conn, &timed_out, e->wait_ms);
            if (!sync || PQresultStatus(sync) != PGRES_PIPELINE_SYNC) {
                PQclear(sync);
                goto broken_st;
            }
            PQclear(sync);
            alone = j->next;
            fail_job(j, st);
            continue;
        broken_st:
            dm_status_free(st);
            goto broken;
        }
        if (rs != PGRES_TUPLES_OK && rs != PGRES_COMMAND_OK) {
            PQclear(res);
            goto broken;
        }
        if (next_result(conn, &timed_out, e->wait_ms) != NULL) {
            PQclear(res);
            goto broken;
        }
        PGresult *sync = next_result(conn, &timed_out, e->wait_ms);
        if (!sync || PQresultStatus(sync) != PGRES_PIPELINE_SYNC) {
            PQclear(sync);
            PQclear(res);
            goto broken;
        }
        PQclear(sync);
        alone = j->next;
        j->next = NULL;
        j->done(j, res, NULL);
        PQclear(res);
    }

    if (batch) {
        bool failed = false;
        dm_status_t *first_err = NULL;
        for (dm_job_t *j = batch; j; j = j->next) {
            PGresult *res = next_result(conn, &timed_out, e->wait_ms);
            if (!res)
                goto broken;
            ExecStatusType rs = PQresultStatus(res);
            if (rs == PGRES_TUPLES_OK || rs == PGRES_COMMAND_OK) {
                j->held = res;
            } else {
                if (rs == PGRES_FATAL_ERROR && !first_err)
                    first_err = status_from_result(r, res, conn);
                PQclear(res);
                failed = true;
            }
            if (next_result(conn, &timed_out, e->wait_ms) != NULL) {
                dm_status_free(first_err);
                goto broken;
            }
        }
        PGresult *sync = next_result(conn, &timed_out, e->wait_ms);
        bool synced = sync && PQresultStatus(sync) == PGRES_PIPELINE_SYNC;
        PQclear(sync);
        if (!synced || (first_err && first_err->code == GRPC_STATUS_UNAVAILABLE)) {
            dm_status_free(first_err);
            goto broken;
        }
        if (failed) {
            /* One statement raised, so the whole transaction rolled back: results of the
             * others are void. Run each alone; the guilty one fails on its own. */
            dm_debug(r->component, "batch of %d rolled back (%s); retrying its jobs alone", n_batch,
                     first_err ? first_err->detail : "?");
            dm_status_free(first_err);
            for (dm_job_t *j = batch; j; j = j->next) {
                if (j->held) {
                    PQclear(j->held);
                    j->held = NULL;
                }
                j->solo = true;
            }
            requeue_front(r, batch);
            return;
        }
        while (batch) {
            dm_job_t *j = batch;
            batch = j->next;
            j->next = NULL;
            PGresult *res = j->held;
            j->held = NULL;
            j->done(j, res, NULL);
            PQclear(res);
        }
    }
    return;

broken:;
    char why[256];
    snprintf(why, sizeof(why), "%s",
             timed_out ? "region did not answer in time" : PQerrorMessage(conn));
    if (!why[0])
        snprintf(why, sizeof(why), "connection lost");
    dm_warn(r->component, "executor %d: connection lost: %s", e->index, why);
    if (timed_out)
        breaker_open(r, why);
    /* Join what is left of both lists and fail them. */
    if (alone) {
        dm_job_t *t = alone;
        while (t->next)
            t = t->next;
        t->next = batch;
        fail_all(e, alone, why);
    } else {
        fail_all(e, batch, why);
    }
}

static void probe(executor_t *e)
{
    PGresult *res;
    bool timed_out = false;
    int interval = e->region->set->cfg->health_interval_ms;
    e->wait_ms = interval * 2 < 1000 ? 1000 : interval * 2;
    if (!PQsendQueryPrepared(e->conn, dm_sql[DM_SQL_PROBE].name, 0, NULL, NULL, NULL, 1) ||
        !PQpipelineSync(e->conn))
        goto broken;
    res = next_result(e->conn, &timed_out, e->wait_ms);
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        PQclear(res);
        goto broken;
    }
    PQclear(res);
    if (next_result(e->conn, &timed_out, e->wait_ms) != NULL)
        goto broken;
    res = next_result(e->conn, &timed_out, e->wait_ms);
    bool ok = res && PQresultStatus(res) == PGRES_PIPELINE_SYNC;
    PQclear(res);
    if (!ok)
        goto broken;
    clock_gettime(CLOCK_MONOTONIC, &e->last_activity);
    return;
broken:
    dm_warn(e->region->component, "executor %d: probe failed: %s", e->index,
            timed_out ? "no answer in time" : PQerrorMessage(e->conn));
    if (timed_out)
        breaker_open(e->region, "region did not answer a probe in time");
    drop_conn(e, timed_out ? "region did not answer a probe in time" : PQerrorMessage(e->conn));
}

static void purge_due(executor_t *e)
{
    /* Closed customers past their retention window lose their records and keys. */
    const char *limit = "100";
    dm_exec_t x = {e};
    dm_status_t *err;
    clock_gettime(CLOCK_MONOTONIC, &e->last_purge);
    PGresult *res = dm_region_exec(&x, DM_SQL_PURGE_DUE, 1, &limit, NULL, NULL, &err);
    if (res && PQntuples(res) > 0 && dm_pg_int4(res, 0, 0) > 0)
        dm_info(e->region->component, "purged %d closed customers past retention",
                dm_pg_int4(res, 0, 0));
    else if (err)
        dm_warn(e->region->component, "purge failed: %s", err->message);
    PQclear(res);
    dm_status_free(err);
}

PGresult *dm_region_exec(dm_exec_t *x, dm_sql_id_t stmt, int n, const char *const *values,
                         const int *lengths, const int *formats, dm_status_t **err)
{
    executor_t *e = x->e;
    bool timed_out = false, synced;
    PGresult *res = NULL, *r;
    char why[256];
    *err = NULL;
    e->wait_ms = MAINTENANCE_TIMEOUT_MS;
    if (!e->conn) {
        *err = unavailable(e->region);
        return NULL;
    }
    if (!PQsendQueryPrepared(e->conn, dm_sql[stmt].name, n, values, lengths, formats, 1) ||
        !PQpipelineSync(e->conn))
        goto broken;
    res = next_result(e->conn, &timed_out, e->wait_ms);
    if (!res)
        goto broken;
    if (PQresultStatus(res) != PGRES_TUPLES_OK && PQresultStatus(res) != PGRES_COMMAND_OK) {
        *err = status_from_result(e->region, res, e->conn);
        PQclear(res);
        res = NULL;
        /* As in run_round: 57P01 (the server is shutting down), 25006 (a standby that was
         * the primary)... this connection cannot serve the region any more. */
        if ((*err)->code == GRPC_STATUS_UNAVAILABLE)
            goto broken;
    }
    /* The NULL that ends the statement's results, then the Sync that ends its transaction,
     * and nothing else. Not a loop until the Sync: once the server has closed the
     * connection libpq answers NULL at once, forever, without a timeout, so such a loop
     * spun and kept this executor counted as up while its region was down. */
    r = next_result(e->conn, &timed_out, e->wait_ms);
    if (r) {
        PQclear(r);
        goto broken;
    }
    r = next_result(e->conn, &timed_out, e->wait_ms);
    synced = r && PQresultStatus(r) == PGRES_PIPELINE_SYNC;
    PQclear(r);
    if (!synced)
        goto broken;
    clock_gettime(CLOCK_MONOTONIC, &e->last_activity);
    return res;
broken:
    PQclear(res);
    dm_status_free(*err);
    *err = dm_status_new(GRPC_STATUS_UNAVAILABLE, "region \"%s\" is unavailable",
                         e->region->cfg->code);
    snprintf(why, sizeof(why), "%s",
             timed_out ? "region did not answer in time" : PQerrorMessage(e->conn));
    if (!why[0])
        snprintf(why, sizeof(why), "connection lost");
    dm_warn(e->region->component, "executor %d: connection lost during %s: %s", e->index,
            dm_sql[stmt].name, why);
    drop_conn(e, why);
    return NULL;
}

void dm_regions_poke(dm_regions_t *rs)
{
    for (size_t i = 0; i < rs->n; i++) {
        dm_region_t *r = &rs->regions[i];
        atomic_store(&r->poked, true);
        pthread_mutex_lock(&r->mu);
        pthread_cond_broadcast(&r->cond);
        pthread_mutex_unlock(&r->mu);
    }
}

bool dm_region_take_poke(dm_region_t *r)
{
    return atomic_exchange(&r->poked, false);
}

void dm_regions_set_idle_task(dm_regions_t *rs, dm_idle_fn fn, void *arg, int interval_ms)
{
    rs->idle_fn = fn;
    rs->idle_arg = arg;
    rs->idle_interval_ms = interval_ms;
}

/* Is there a job an executor may take now (region->mu held)? */
static bool takeable_locked(const dm_region_t *r)
{
    return r->queued > r->queued_batchable ||
           (r->queued_batchable > 0 && r->batches_running < MAX_BATCHES_RUNNING);
}

static size_t job_bytes(const dm_job_t *j)
{
    size_t n = 0;
    for (int i = 0; i < j->n_params; i++)
        n += j->formats[i] ? (size_t)j->lengths[i] : 0;
    return n;
}

static void *executor_main(void *arg)
{
    executor_t *e = arg;
    dm_region_t *r = e->region;
    int idle_ms = r->set->cfg->health_interval_ms;
    if (r->set->idle_fn && r->set->idle_interval_ms < idle_ms && e->index == r->n_execs - 1)
        idle_ms = r->set->idle_interval_ms;

    clock_gettime(CLOCK_MONOTONIC, &e->last_purge);
    while (!atomic_load(&r->set->stopping)) {
        if (!e->conn) {
            if (!exec_connect(e)) {
                if (!pause_ms(r, e->backoff_ms))
                    break;
                /* Exponential backoff with jitter, so the pool does not reconnect in step. */
                int next = e->backoff_ms * 2 + (int)(random() % BACKOFF_MIN_MS);
                e->backoff_ms = next > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : next;
                continue;
            }
        }

        dm_job_t *alone = NULL, **alone_tail = &alone;
        dm_job_t *batch = NULL, **batch_tail = &batch;
        dm_job_t *dead = NULL;
        int taken = 0;
        size_t bytes = 0;

        pthread_mutex_lock(&r->mu);
        if (!takeable_locked(r) && !atomic_load(&r->set->stopping)) {
            struct timespec until = dm_abstime_in_ms(idle_ms);
            pthread_cond_timedwait(&r->cond, &r->mu, &until);
        }
        bool take_batch = r->batches_running < MAX_BATCHES_RUNNING;
        dm_job_t **link = &r->q_head, *last = NULL;
        while (*link && taken < MAX_BATCH_JOBS && bytes < MAX_BATCH_BYTES) {
            dm_job_t *j = *link;
            bool batchable = j->batchable && !j->solo;
            if (batchable && !take_batch) {
                /* Left for the next write batch. */
                last = j;
                link = &j->next;
                continue;
            }
            *link = j->next;
            j->next = NULL;
            taken++;
            r->queued--;
            if (batchable)
                r->queued_batchable--;
            bytes += job_bytes(j);
            dm_status_t *why = NULL;
            if (job_dead(r->set, j, &why)) {
                j->next = dead;
                dead = j;
                dm_status_free(why);
            } else if (batchable) {
                *batch_tail = j;
                batch_tail = &j->next;
            } else {
                *alone_tail = j;
                alone_tail = &j->next;
            }
        }
        /* The tail may have been taken. */
        if (!*link)
            r->q_tail = last;
        bool has_batch = batch != NULL;
        if (has_batch) {
            r->batches_running++;
            r->write_batches++;
            for (dm_job_t *j = batch; j; j = j->next)
                r->batched_writes++;
        }
        /* More to do: wake a sibling to take the next round in parallel. */
        if (takeable_locked(r))
            pthread_cond_signal(&r->cond);
        if (alone || batch)
            r->in_use++;
        pthread_mutex_unlock(&r->mu);

        while (dead) {
            dm_job_t *next = dead->next;
            dm_status_t *why = NULL;
            job_dead(r->set, dead, &why);
            fail_job(dead, why ? why : dm_status_new(GRPC_STATUS_CANCELLED, "call ended"));
            dead = next;
        }
        if (alone || batch) {
            run_round(e, alone, batch);
            pthread_mutex_lock(&r->mu);
            r->in_use--;
            if (has_batch) {
                r->batches_running--;
                /* The writes that queued meanwhile are the next batch. */
                if (takeable_locked(r))
                    pthread_cond_signal(&r->cond);
            }
            pthread_mutex_unlock(&r->mu);
        } else if (!atomic_load(&r->set->stopping)) {
            if (e->conn && elapsed_ms(&e->last_activity) >= idle_ms)
                probe(e);
            if (e->conn && e->index == 0 && elapsed_ms(&e->last_purge) >= PURGE_INTERVAL_MS)
                purge_due(e);
        }
        /* The last executor does the periodic work (sealing the ledger), busy or not, so a
         * steady load never starves it; with a pool of two or more the first executor and
         * the purge are never delayed by it. */
        if (e->conn && e->index == r->n_execs - 1 && r->set->idle_fn &&
            !atomic_load(&r->set->stopping) &&
            (elapsed_ms(&e->last_idle_task) >= r->set->idle_interval_ms ||
             atomic_load(&r->poked))) {
            dm_exec_t x = {e};
            clock_gettime(CLOCK_MONOTONIC, &e->last_idle_task);
            r->set->idle_fn(r, &x, r->set->idle_arg);
        }
    }
    if (e->conn) {
        PQfinish(e->conn);
        e->conn = NULL;
    }
    return NULL;
}

static char *join_hosts(const dm_region_config_t *c, bool ports)
{
    size_t cap = 1;
    for (size_t i = 0; i < c->n_hosts; i++)
        cap += strlen(c->hosts[i]) + 1;
    char *out = dm_calloc(1, cap);
    for (size_t i = 0; i < c->n_hosts; i++) {
        const char *colon = strrchr(c->hosts[i], ':');
        if (i)
            strcat(out, ",");
        if (ports)
            strcat(out, colon + 1);
        else
            strncat(out, c->hosts[i], (size_t)(colon - c->hosts[i]));
    }
    return out;
}

dm_status_t *dm_regions_create(const dm_config_t *cfg, dm_regions_t **out)
{
    dm_regions_t *rs = dm_calloc(1, sizeof(*rs));
    rs->cfg = cfg;
    rs->n = cfg->n_regions;
    rs->regions = dm_calloc(rs->n, sizeof(dm_region_t));
    atomic_init(&rs->stopping, false);
    for (size_t i = 0; i < rs->n; i++) {
        dm_region_t *r = &rs->regions[i];
        unsigned char *pw = NULL;
        size_t len = 0;
        r->set = rs;
        r->cfg = &cfg->region_cfgs[i];
        pthread_mutex_init(&r->mu, NULL);
        pthread_cond_init(&r->cond, NULL);
        atomic_init(&r->serving, false);
        snprintf(r->component, sizeof(r->component), "region %s", r->cfg->code);
        r->hosts_csv = join_hosts(r->cfg, false);
        r->ports_csv = join_hosts(r->cfg, true);
        r->connect_timeout_s = dm_sprintf("%d", (r->cfg->connect_timeout_ms + 999) / 1000);
        if (!r->cfg->local) {
            /* Served by its own gateways: no connection, no secret here (src/peer). */
            snprintf(r->last_error, sizeof(r->last_error), "no gateway of the region answered yet");
            continue;
        }
        r->n_execs = r->cfg->pool_size;
        r->execs = dm_calloc((size_t)r->n_execs, sizeof(executor_t));
        for (int k = 0; k < r->n_execs; k++) {
            r->execs[k].region = r;
            r->execs[k].index = k;
            r->execs[k].backoff_ms = BACKOFF_MIN_MS;
            r->execs[k].state = EX_CONNECTING_FIRST;
        }
        r->n_first = r->n_execs;
        snprintf(r->last_error, sizeof(r->last_error), "not connected yet");
        dm_status_t *st = dm_config_read_secret(r->cfg->password_file, 1024, &pw, &len);
        if (st) {
            dm_regions_destroy(rs);
            return st;
        }
        while (len && (pw[len - 1] == '\n' || pw[len - 1] == '\r'))
            pw[--len] = '\0';
        r->password = (char *)pw;
    }
    *out = rs;
    return NULL;
}

void dm_regions_on_change(dm_regions_t *rs, dm_region_change_fn fn, void *arg)
{
    rs->on_change = fn;
    rs->on_change_arg = arg;
}

void dm_regions_start(dm_regions_t *rs)
{
    for (size_t i = 0; i < rs->n; i++) {
        dm_region_t *r = &rs->regions[i];
        for (int k = 0; k < r->n_execs; k++) {
            if (pthread_create(&r->execs[k].thread, NULL, executor_main, &r->execs[k]) != 0)
                abort();
            r->execs[k].started = true;
        }
    }
}

void dm_regions_stop(dm_regions_t *rs)
{
    atomic_store(&rs->stopping, true);
    for (size_t i = 0; i < rs->n; i++) {
        dm_region_t *r = &rs->regions[i];
        pthread_mutex_lock(&r->mu);
        pthread_cond_broadcast(&r->cond);
        pthread_mutex_unlock(&r->mu);
    }
    for (size_t i = 0; i < rs->n; i++) {
        dm_region_t *r = &rs->regions[i];
        for (int k = 0; k < r->n_execs; k++) {
            if (r->execs[k].started) {
                pthread_join(r->execs[k].thread, NULL);
                r->execs[k].started = false;
            }
        }
        /* Jobs still queued belong to calls the server already cancelled: end them. */
        pthread_mutex_lock(&r->mu);
        dm_job_t *left = take_all_locked(r);
        pthread_mutex_unlock(&r->mu);
        while (left) {
            dm_job_t *next = left->next;
            fail_job(left, dm_status_new(GRPC_STATUS_UNAVAILABLE, "gateway is shutting down"));
            left = next;
        }
    }
}

void dm_regions_destroy(dm_regions_t *rs)
{
    if (!rs)
        return;
    dm_regions_stop(rs);
    for (size_t i = 0; i < rs->n; i++) {
        dm_region_t *r = &rs->regions[i];
        if (r->password) {
            OPENSSL_cleanse(r->password, strlen(r->password));
            free(r->password);
        }
        free(r->hosts_csv);
        free(r->ports_csv);
        free(r->connect_timeout_s);
        free(r->execs);
        pthread_mutex_destroy(&r->mu);
        pthread_cond_destroy(&r->cond);
    }
    free(rs->regions);
    free(rs);
}

/* While a restored region is held, the other regions' gateways still keep the federation in
 * step with it: fences, ledger and mark witnesses, delivery of requests it missed, and the
 * copies a restored region reads to reconcile. Nothing that reads or writes its data. */
static bool passes_hold(dm_sql_id_t stmt)
{
    switch (stmt) {
    case DM_SQL_PROBE:
    case DM_SQL_FENCE_PUT:
    case DM_SQL_FENCE_LIST:
    case DM_SQL_REPLICATION:
    case DM_SQL_WITNESS_PUT:
    case DM_SQL_WITNESS_GET:
    case DM_SQL_MARK_WITNESS_PUT:
    case DM_SQL_DSR_RECEIVE:
    case DM_SQL_DSR_DROP_MISSING:
    case DM_SQL_DSR_HEADERS:
    case DM_SQL_CLOSURE_COPY_PUT:
    case DM_SQL_CLOSURE_COPIES:
        return true;
    default:
        return false;
    }
}

void dm_region_hold(dm_region_t *r, const char *reason)
{
    pthread_mutex_lock(&r->mu);
    bool was = r->held_reason[0] != '\0';
    snprintf(r->held_reason, sizeof(r->held_reason), "%s", reason ? reason : "");
    bool now = r->held_reason[0] != '\0';
    pthread_mutex_unlock(&r->mu);
    if (now != was)
        dm_warn(r->component, "region %s %s%s", r->cfg->code, now ? "held: " : "released",
                now ? reason : "");
}

bool dm_region_held(dm_region_t *r, char *reason, size_t len)
{
    pthread_mutex_lock(&r->mu);
    bool held = r->held_reason[0] != '\0';
    if (reason && len)
        snprintf(reason, len, "%s", r->held_reason);
    pthread_mutex_unlock(&r->mu);
    return held;
}

void dm_region_submit(dm_region_t *r, dm_job_t *job)
{
    job->next = NULL;
    job->held = NULL;
    pthread_mutex_lock(&r->mu);
    /* Statements about the fence itself (and the replication view) pass it: an operator
     * must be able to lift a fence from the fenced region too. */
    bool control = job->stmt == DM_SQL_FENCE_PUT || job->stmt == DM_SQL_REPLICATION;
    if (r->fenced && !control) {
        dm_status_t *st = dm_status_new(GRPC_STATUS_UNAVAILABLE, "region \"%s\" is fenced: %s",
                                        r->cfg->code, r->fence_reason);
        pthread_mutex_unlock(&r->mu);
        fail_job(job, st);
        return;
    }
    if (r->held_reason[0] && job->owner && !passes_hold(job->stmt)) {
        dm_status_t *st = dm_status_new(GRPC_STATUS_UNAVAILABLE, "region \"%s\" is unavailable: %s",
                                        r->cfg->code, r->held_reason);
        pthread_mutex_unlock(&r->mu);
        fail_job(job, st);
        return;
    }
    if (!r->cfg->local) {
        pthread_mutex_unlock(&r->mu);
        if (atomic_load(&r->set->stopping) || !r->set->remote_submit)
            fail_job(job, dm_status_new(GRPC_STATUS_UNAVAILABLE, "gateway is shutting down"));
        else
            r->set->remote_submit(r->set->remote_arg, r, job);
        return;
    }
    if (atomic_load(&r->set->stopping) || r->breaker_open || (r->n_up == 0 && r->n_first == 0)) {
        bool open = r->breaker_open;
        pthread_mutex_unlock(&r->mu);
        fail_job(job, atomic_load(&r->set->stopping)
                          ? dm_status_new(GRPC_STATUS_UNAVAILABLE, "gateway is shutting down")
                      : open ? dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                             "region \"%s\" is not answering (circuit open)",
                                             r->cfg->code)
                             : unavailable(r));
        return;
    }
    r->queued++;
    if (job->batchable && !job->solo)
        r->queued_batchable++;
    if (r->q_tail)
        r->q_tail->next = job;
    else
        r->q_head = job;
    r->q_tail = job;
    pthread_cond_signal(&r->cond);
    pthread_mutex_unlock(&r->mu);
}

dm_status_t *dm_region_fence_check(dm_region_t *r)
{
    dm_status_t *st = NULL;
    pthread_mutex_lock(&r->mu);
    if (r->fenced)
        st = dm_status_new(GRPC_STATUS_UNAVAILABLE, "region \"%s\" is fenced: %s", r->cfg->code,
                           r->fence_reason);
    else if (r->held_reason[0])
        st = dm_status_new(GRPC_STATUS_UNAVAILABLE, "region \"%s\" is unavailable: %s",
                           r->cfg->code, r->held_reason);
    pthread_mutex_unlock(&r->mu);
    return st;
}

void dm_regions_set_remote(dm_regions_t *rs, dm_remote_submit_fn fn, void *arg)
{
    rs->remote_submit = fn;
    rs->remote_arg = arg;
}

void dm_regions_set_owner_ops(dm_regions_t *rs, const dm_job_owner_ops_t *ops)
{
    rs->owner_ops = ops;
}

bool dm_region_is_local(const dm_region_t *r)
{
    return r->cfg->local;
}

void dm_region_set_remote_state(dm_region_t *r, bool serving, const char *where, const char *error)
{
    pthread_mutex_lock(&r->mu);
    bool was = atomic_exchange(&r->serving, serving);
    r->n_up = serving ? 1 : 0;
    snprintf(r->primary, sizeof(r->primary), "%s", where ? where : "");
    if (error && *error)
        set_error_locked(r, error);
    bool report = was != serving || !r->reported;
    r->reported = true;
    pthread_mutex_unlock(&r->mu);
    if (report && serving)
        dm_info(r->component, "region is serving (through its gateway %s)", where ? where : "");
    else if (report)
        dm_warn(r->component, "region is not serving: %s", error && *error ? error : "?");
    if (report && r->set->on_change)
        r->set->on_change(r->set->on_change_arg, r, serving);
}

size_t dm_regions_count(const dm_regions_t *rs)
{
    return rs->n;
}

dm_region_t *dm_regions_at(dm_regions_t *rs, size_t i)
{
    return i < rs->n ? &rs->regions[i] : NULL;
}

dm_region_t *dm_regions_find(dm_regions_t *rs, const char *code)
{
    for (size_t i = 0; i < rs->n; i++)
        if (strcmp(rs->regions[i].cfg->code, code) == 0)
            return &rs->regions[i];
    return NULL;
}

const char *dm_region_code(const dm_region_t *r)
{
    return r->cfg->code;
}

const dm_region_config_t *dm_region_config(const dm_region_t *r)
{
    return r->cfg;
}

bool dm_region_serving(dm_region_t *r)
{
    return atomic_load(&r->serving);
}

void dm_region_last_error(dm_region_t *r, char *buf, size_t len)
{
    pthread_mutex_lock(&r->mu);
    snprintf(buf, len, "%s", r->last_error);
    pthread_mutex_unlock(&r->mu);
}

void dm_region_info(dm_region_t *r, dm_region_info_t *out)
{
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&r->mu);
    out->reachable = r->n_up > 0;
    snprintf(out->primary, sizeof(out->primary), "%s", r->n_up > 0 ? r->primary : "");
    out->pool_size = r->n_execs;
    out->pool_in_use = r->in_use;
    out->queued = r->queued;
    out->write_batches = r->write_batches;
    out->batched_writes = r->batched_writes;
    out->breaker_open = r->breaker_open;
    out->breaker_changed_ms = r->breaker_changed_ms;
    out->fenced = r->fenced;
    snprintf(out->fence_reason, sizeof(out->fence_reason), "%s", r->fence_reason);
    snprintf(out->fenced_by, sizeof(out->fenced_by), "%s", r->fenced_by);
    out->fenced_at_ms = r->fenced_at_ms;
    snprintf(out->last_error, sizeof(out->last_error), "%s", r->last_error);
    out->last_error_ms = r->last_error_ms;
    pthread_mutex_unlock(&r->mu);
}

int dm_fence_cmp(const dm_fence_t *a, const dm_fence_t *b)
{
    if (!a || !b)
        return (a != NULL) - (b != NULL);
    if (a->version != b->version)
        return a->version < b->version ? -1 : 1;
    return (int)b->lifted - (int)a->lifted; /* at the same version a fence is the newer */
}

static const dm_fence_t *newest_locked(const dm_region_t *r)
{
    const dm_fence_t *best = NULL;
    for (size_t i = 0; i <= DM_MAX_REGIONS; i++)
        if (r->has_row[i] && dm_fence_cmp(&r->fence_rows[i], best) > 0)
            best = &r->fence_rows[i];
    return best;
}

bool dm_region_fence_newest(dm_region_t *r, dm_fence_t *out)
{
    pthread_mutex_lock(&r->mu);
    const dm_fence_t *best = newest_locked(r);
    if (best)
        *out = *best;
    pthread_mutex_unlock(&r->mu);
    return best != NULL;
}

void dm_region_fence_seen(dm_region_t *r, int src, const dm_fence_t *f)
{
    size_t slot = src < 0 ? DM_MAX_REGIONS : (size_t)src;
    if (slot > DM_MAX_REGIONS)
        return;
    dm_job_t *orphans = NULL;
    pthread_mutex_lock(&r->mu);
    r->has_row[slot] = f != NULL;
    if (f)
        r->fence_rows[slot] = *f;
    const dm_fence_t *best = newest_locked(r);
    bool now_fenced = best && !best->lifted;
    bool was = r->fenced;
    r->fenced = now_fenced;
    if (now_fenced) {
        snprintf(r->fence_reason, sizeof(r->fence_reason), "%s", best->reason);
        snprintf(r->fenced_by, sizeof(r->fenced_by), "%s", best->by);
        r->fenced_at_ms = best->at_ms;
    } else {
        r->fence_reason[0] = r->fenced_by[0] = '\0';
        r->fenced_at_ms = 0;
    }
    if (now_fenced && !was)
        orphans = take_all_locked(r); /* traffic stops now, queued calls included */
    char why[sizeof(r->fence_reason)];
    snprintf(why, sizeof(why), "%s", r->fence_reason);
    pthread_mutex_unlock(&r->mu);
    if (now_fenced != was)
        dm_warn(r->component, "region %s%s", now_fenced ? "fenced: " : "unfenced", why);
    while (orphans) {
        dm_job_t *next = orphans->next;
        fail_job(orphans,
                 dm_status_new(GRPC_STATUS_UNAVAILABLE, "region \"%s\" is fenced", r->cfg->code));
        orphans = next;
    }
}
