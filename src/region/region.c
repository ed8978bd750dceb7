#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>
#include <openssl/crypto.h>

#include "domicile/log.h"
#include "domicile/region.h"

#define BACKOFF_MAX_MS 5000

struct dm_region {
    dm_regions_t *set;
    const dm_region_config_t *cfg;
    char *password;
    char *hosts_csv;
    char *ports_csv;
    char *connect_timeout_s;
    char component[32];

    pthread_t thread;
    bool started;
    atomic_bool serving;
    bool reported;      /* monitor thread only */
    pthread_mutex_t mu; /* last_error */
    char last_error[256];
};

struct dm_regions {
    const dm_config_t *cfg;
    dm_region_t *regions;
    size_t n;
    dm_region_change_fn on_change;
    void *on_change_arg;

    pthread_mutex_t mu;
    pthread_cond_t cond;
    atomic_bool stopping;
};

static void set_error(dm_region_t *r, const char *msg)
{
    pthread_mutex_lock(&r->mu);
    snprintf(r->last_error, sizeof(r->last_error), "%s", msg);
    /* libpq messages end with a newline; keep log lines one line. */
    size_t n = strlen(r->last_error);
    while (n && (r->last_error[n - 1] == '\n' || r->last_error[n - 1] == ' '))
        r->last_error[--n] = '\0';
    for (char *p = r->last_error; *p; p++)
        if (*p == '\n')
            *p = ' ';
    pthread_mutex_unlock(&r->mu);
}

static void set_serving(dm_region_t *r, bool serving)
{
    bool was = atomic_exchange(&r->serving, serving);
    if (was == serving && r->reported)
        return;
    r->reported = true; /* the first probe is always logged, success or not */
    if (serving) {
        dm_info(r->component, "region is serving");
    } else {
        char err[256];
        dm_region_last_error(r, err, sizeof(err));
        dm_warn(r->component, "region is not serving: %s", err);
    }
    if (r->set->on_change)
        r->set->on_change(r->set->on_change_arg, r, serving);
}

/* Wait up to ms, or until stop. Returns false when stopping. */
static bool pause_ms(dm_regions_t *rs, int ms)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += ms / 1000;
    until.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&rs->mu);
    while (!atomic_load(&rs->stopping))
        if (pthread_cond_timedwait(&rs->cond, &rs->mu, &until) == ETIMEDOUT)
            break;
    bool go_on = !atomic_load(&rs->stopping);
    pthread_mutex_unlock(&rs->mu);
    return go_on;
}

static PGconn *connect_region(dm_region_t *r)
{
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
                          "domiciled-monitor",
                          NULL};
    return PQconnectdbParams(keys, vals, 0);
}

/* Run one query with a time limit; a black-holed server must not stall the monitor forever.
 * Returns the single result (caller clears) or NULL with the error recorded. */
static PGresult *query_timed(dm_region_t *r, PGconn *conn, const char *sql, int timeout_ms)
{
    if (!PQsendQueryParams(conn, sql, 0, NULL, NULL, NULL, NULL, 0)) {
        set_error(r, PQerrorMessage(conn));
        return NULL;
    }
    int sock = PQsocket(conn);
    struct pollfd pfd = {.fd = sock, .events = POLLIN};
    while (PQisBusy(conn)) {
        int rc = poll(&pfd, 1, timeout_ms);
        if (rc == 0) {
            set_error(r, "probe timed out");
            return NULL;
        }
        if (rc < 0 && errno != EINTR) {
            set_error(r, strerror(errno));
            return NULL;
        }
        if (!PQconsumeInput(conn)) {
            set_error(r, PQerrorMessage(conn));
            return NULL;
        }
    }
    PGresult *res = PQgetResult(conn);
    PGresult *extra;
    while ((extra = PQgetResult(conn)))
        PQclear(extra);
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        set_error(r, res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
        PQclear(res);
        return NULL;
    }
    return res;
}

static void *monitor_main(void *arg)
{
    dm_region_t *r = arg;
    dm_regions_t *rs = r->set;
    PGconn *conn = NULL;
    int backoff = 100;
    int probe_timeout = r->cfg->connect_timeout_ms;

    while (!atomic_load(&rs->stopping)) {
        if (!conn) {
            conn = connect_region(r);
            if (PQstatus(conn) != CONNECTION_OK) {
                set_error(r, PQerrorMessage(conn));
                PQfinish(conn);
                conn = NULL;
                set_serving(r, false);
                if (!pause_ms(rs, backoff))
                    break;
                backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
                continue;
            }
            PGresult *res =
                query_timed(r, conn, "SELECT code FROM domicile.region_identity", probe_timeout);
            bool ok =
                res && PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), r->cfg->code) == 0;
            if (res && !ok) {
                char msg[200];
                snprintf(msg, sizeof(msg),
                         "database identifies as region \"%.16s\", not \"%s\": refusing it",
                         PQntuples(res) == 1 ? PQgetvalue(res, 0, 0) : "(none)", r->cfg->code);
                set_error(r, msg);
                dm_error(r->component, "%s", msg);
            }
            PQclear(res);
            if (!ok) {
                PQfinish(conn);
                conn = NULL;
                set_serving(r, false);
                if (!pause_ms(rs, backoff))
                    break;
                backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
                continue;
            }
            backoff = 100;
            set_error(r, "");
            set_serving(r, true);
        } else {
            PGresult *res = query_timed(r, conn, "SELECT 1", probe_timeout);
            if (!res) {
                PQfinish(conn);
                conn = NULL;
                set_serving(r, false);
                continue; /* reconnect at once: the standby may already be promoted */
            }
            PQclear(res);
        }
        if (!pause_ms(rs, rs->cfg->health_interval_ms))
            break;
    }
    if (conn)
        PQfinish(conn);
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
    pthread_mutex_init(&rs->mu, NULL);
    pthread_cond_init(&rs->cond, NULL);
    for (size_t i = 0; i < rs->n; i++) {
        dm_region_t *r = &rs->regions[i];
        unsigned char *pw = NULL;
        size_t len = 0;
        r->set = rs;
        r->cfg = &cfg->region_cfgs[i];
        pthread_mutex_init(&r->mu, NULL);
        atomic_init(&r->serving, false);
        snprintf(r->component, sizeof(r->component), "region %s", r->cfg->code);
        r->hosts_csv = join_hosts(r->cfg, false);
        r->ports_csv = join_hosts(r->cfg, true);
        r->connect_timeout_s = dm_sprintf("%d", (r->cfg->connect_timeout_ms + 999) / 1000);
        dm_status_t *st = dm_config_read_secret(r->cfg->password_file, 1024, &pw, &len);
        if (st) {
            dm_regions_destroy(rs);
            return st;
        }
        while (len && (pw[len - 1] == '\n' || pw[len - 1] == '\r'))
            pw[--len] = '\0';
        r->password = (char *)pw;
        set_error(r, "not probed yet");
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
        if (pthread_create(&rs->regions[i].thread, NULL, monitor_main, &rs->regions[i]) != 0)
            abort();
        rs->regions[i].started = true;
    }
}

void dm_regions_stop(dm_regions_t *rs)
{
    pthread_mutex_lock(&rs->mu);
    atomic_store(&rs->stopping, true);
    pthread_cond_broadcast(&rs->cond);
    pthread_mutex_unlock(&rs->mu);
    for (size_t i = 0; i < rs->n; i++) {
        if (rs->regions[i].started) {
            pthread_join(rs->regions[i].thread, NULL);
            rs->regions[i].started = false;
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
        pthread_mutex_destroy(&r->mu);
    }
    free(rs->regions);
    pthread_mutex_destroy(&rs->mu);
    pthread_cond_destroy(&rs->cond);
    free(rs);
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
