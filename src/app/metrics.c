#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "domicile/api.h"
#include "domicile/app.h"
#include "domicile/clock.h"
#include "domicile/dsr.h"
#include "domicile/peer.h"
#include "domicile/log.h"
#include "domicile/metrics.h"

#define N_CODES   17
#define N_BUCKETS 15
static const int64_t bucket_us[N_BUCKETS] = {100,    250,    500,     1000,    2500,
                                             5000,   10000,  25000,   50000,   100000,
                                             250000, 500000, 1000000, 2500000, 5000000};

typedef struct method_stats {
    atomic_llong calls[N_CODES];
    atomic_llong bucket[N_BUCKETS + 1]; /* last: +Inf */
    atomic_llong sum_us;
} method_stats_t;

typedef struct route_stats {
    char from[17], to[17], basis[65];
    bool allowed;
    long long count, bytes;
} route_stats_t;

static struct {
    method_stats_t *methods;
    size_t n_methods;
    pthread_mutex_t mu; /* routes, dsr, seal, verification, replication */
    route_stats_t routes[256];
    size_t n_routes;
    atomic_llong appends;
    long long sealed[DM_MAX_REGIONS], unsealed[DM_MAX_REGIONS];
    int64_t caught_up_ms[DM_MAX_REGIONS]; /* 0: not since start */
    bool verified[DM_MAX_REGIONS], verify_ok[DM_MAX_REGIONS];
    int64_t verified_ms[DM_MAX_REGIONS], verified_entries[DM_MAX_REGIONS];
    dm_dsr_counts_t dsr[DM_MAX_REGIONS];
    bool repl_known[DM_MAX_REGIONS];
    int64_t standbys[DM_MAX_REGIONS], sync_standbys[DM_MAX_REGIONS], lag_bytes[DM_MAX_REGIONS];
    struct MHD_Daemon *daemon;
} M = {.mu = PTHREAD_MUTEX_INITIALIZER};

void dm_metrics_init(size_t n_methods)
{
    free(M.methods);
    M.methods = dm_calloc(n_methods, sizeof(method_stats_t));
    M.n_methods = n_methods;
}

void dm_metrics_call(size_t m, grpc_status_code code, int64_t us)
{
    if (m >= M.n_methods || (int)code < 0 || (int)code >= N_CODES)
        return;
    method_stats_t *s = &M.methods[m];
    atomic_fetch_add_explicit(&s->calls[code], 1, memory_order_relaxed);
    size_t b = 0;
    while (b < N_BUCKETS && us > bucket_us[b])
        b++;
    atomic_fetch_add_explicit(&s->bucket[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->sum_us, us, memory_order_relaxed);
}

void dm_metrics_transfer(const char *from, const char *to, const char *basis, bool allowed,
                         int64_t bytes)
{
    atomic_fetch_add(&M.appends, 1);
    pthread_mutex_lock(&M.mu);
    route_stats_t *r = NULL;
    for (size_t i = 0; i < M.n_routes && !r; i++)
        if (M.routes[i].allowed == allowed && strcmp(M.routes[i].from, from) == 0 &&
            strcmp(M.routes[i].to, to) == 0 && strcmp(M.routes[i].basis, basis) == 0)
            r = &M.routes[i];
    if (!r && M.n_routes < DM_ARRAY_LEN(M.routes)) {
        r = &M.routes[M.n_routes++];
        snprintf(r->from, sizeof(r->from), "%s", from);
        snprintf(r->to, sizeof(r->to), "%s", to);
        snprintf(r->basis, sizeof(r->basis), "%s", basis);
        r->allowed = allowed;
    }
    if (r) {
        r->count++;
        r->bytes += bytes;
    }
    pthread_mutex_unlock(&M.mu);
}

void dm_metrics_sealed(size_t r, int64_t n, int64_t unsealed, bool caught_up)
{
    if (r >= DM_MAX_REGIONS)
        return;
    pthread_mutex_lock(&M.mu);
    M.sealed[r] += n;
    M.unsealed[r] = unsealed;
    if (caught_up)
        M.caught_up_ms[r] = dm_now_ms();
    pthread_mutex_unlock(&M.mu);
}

void dm_metrics_ledger_verified(size_t r, bool ok, int64_t entries)
{
    if (r >= DM_MAX_REGIONS)
        return;
    pthread_mutex_lock(&M.mu);
    M.verified[r] = true;
    M.verify_ok[r] = ok;
    M.verified_ms[r] = dm_now_ms();
    M.verified_entries[r] = entries;
    pthread_mutex_unlock(&M.mu);
}

void dm_metrics_dsr(size_t r, const dm_dsr_counts_t *c)
{
    if (r >= DM_MAX_REGIONS)
        return;
    pthread_mutex_lock(&M.mu);
    M.dsr[r] = *c;
    pthread_mutex_unlock(&M.mu);
}

void dm_metrics_replication(size_t r, int64_t standbys, int64_t sync_standbys, int64_t lag_bytes)
{
    if (r >= DM_MAX_REGIONS)
        return;
    pthread_mutex_lock(&M.mu);
    M.repl_known[r] = standbys >= 0;
    M.standbys[r] = standbys;
    M.sync_standbys[r] = sync_standbys;
    M.lag_bytes[r] = lag_bytes;
    pthread_mutex_unlock(&M.mu);
}

typedef struct out {
    char *buf;
    size_t len, cap;
} out_t;

static void put(out_t *o, const char *fmt, ...) DM_PRINTF(2, 3);

static void put(out_t *o, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        if (n >= 0 && (size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        o->cap = o->cap * 2 + (size_t)(n > 0 ? n : 0);
        o->buf = dm_realloc(o->buf, o->cap);
    }
}

static void put_peer_count(void *arg, const char *origin, const char *path, const char *region,
                           int64_t calls)
{
    put(arg, "domicile_peer_calls_total{method=\"%s\",call=\"%s\",peer=\"%s\"} %lld\n",
        origin[0] ? origin : "maintenance", path, region, (long long)calls);
}

static void put_peer_gateway(void *arg, const char *region, const char *addr, bool answers)
{
    put(arg, "domicile_peer_gateway_up{peer=\"%s\",gateway=\"%s\"} %d\n", region, addr, answers);
}

static void put_help(out_t *o, const char *name, const char *type, const char *help)
{
    put(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* What the own region's database says (sealing, verification, replication, legs). */
static void render_local(out_t *o, size_t i, const char *code)
{
    static const char *const states[5] = {"pending", "running", "done", "failed", "skipped"};
    static const char *const due[DM_DSR_DUE_BUCKETS] = {"overdue", "1d",  "5d",
                                                        "10d",     "30d", "later"};
    put(o, "domicile_ledger_sealed_total{region=\"%s\"} %lld\n", code, M.sealed[i]);
    put(o, "domicile_ledger_unsealed_entries{region=\"%s\"} %lld\n", code, M.unsealed[i]);
    if (M.caught_up_ms[i])
        put(o, "domicile_ledger_sealed_up_to_timestamp_seconds{region=\"%s\"} %.3f\n", code,
            (double)M.caught_up_ms[i] / 1e3);
    if (M.verified[i]) {
        put(o, "domicile_ledger_verify_ok{region=\"%s\"} %d\n", code, M.verify_ok[i]);
        put(o, "domicile_ledger_verify_timestamp_seconds{region=\"%s\"} %.3f\n", code,
            (double)M.verified_ms[i] / 1e3);
        put(o, "domicile_ledger_verified_entries{region=\"%s\"} %lld\n", code,
            (long long)M.verified_entries[i]);
    }
    if (M.repl_known[i]) {
        put(o, "domicile_region_standbys{region=\"%s\"} %lld\n", code, (long long)M.standbys[i]);
        put(o, "domicile_region_sync_standbys{region=\"%s\"} %lld\n", code,
            (long long)M.sync_standbys[i]);
        put(o, "domicile_region_replication_lag_bytes{region=\"%s\"} %lld\n", code,
            (long long)M.lag_bytes[i]);
    }
    const dm_dsr_counts_t *c = &M.dsr[i];
    for (int s = 0; s < 5; s++)
        put(o, "domicile_dsr_legs{region=\"%s\",state=\"%s\"} %lld\n", code, states[s],
            (long long)c->legs[s]);
    put(o, "domicile_dsr_overdue_requests{region=\"%s\"} %lld\n", code, (long long)c->due[0]);
    for (int b = 0; b < DM_DSR_DUE_BUCKETS; b++)
        put(o, "domicile_dsr_open_legs{region=\"%s\",due=\"%s\"} %lld\n", code, due[b],
            (long long)c->due[b]);
    if (c->next_due_ms)
        put(o, "domicile_dsr_next_due_timestamp_seconds{region=\"%s\"} %.3f\n", code,
            (double)c->next_due_ms / 1e3);
}

char *dm_metrics_render(dm_app_t *app)
{
    out_t o = {dm_malloc(65536), 0, 65536};
    size_t n;
    const dm_method_t *methods = dm_api_methods(&n);
    put(&o, "# HELP domicile_calls_total gRPC calls by method and status.\n"
            "# TYPE domicile_calls_total counter\n");
    for (size_t m = 0; m < M.n_methods && m < n; m++)
        for (int c = 0; c < N_CODES; c++) {
            long long v = atomic_load(&M.methods[m].calls[c]);
            if (v)
                put(&o, "domicile_calls_total{method=\"%s\",status=\"%s\"} %lld\n", methods[m].path,
                    dm_status_code_name((grpc_status_code)c), v);
        }
    put(&o, "# HELP domicile_call_duration_seconds Call latency by method.\n"
            "# TYPE domicile_call_duration_seconds histogram\n");
    for (size_t m = 0; m < M.n_methods && m < n; m++) {
        long long cum = 0, total = 0;
        for (int b = 0; b <= N_BUCKETS; b++)
            total += atomic_load(&M.methods[m].bucket[b]);
        if (!total)
            continue;
        for (int b = 0; b < N_BUCKETS; b++) {
            cum += atomic_load(&M.methods[m].bucket[b]);
            put(&o, "domicile_call_duration_seconds_bucket{method=\"%s\",le=\"%g\"} %lld\n",
                methods[m].path, (double)bucket_us[b] / 1e6, cum);
        }
        put(&o, "domicile_call_duration_seconds_bucket{method=\"%s\",le=\"+Inf\"} %lld\n",
            methods[m].path, total);
        put(&o, "domicile_call_duration_seconds_sum{method=\"%s\"} %.6f\n", methods[m].path,
            (double)atomic_load(&M.methods[m].sum_us) / 1e6);
        put(&o, "domicile_call_duration_seconds_count{method=\"%s\"} %lld\n", methods[m].path,
            total);
    }
    put(&o, "# HELP domicile_region_up 1 while the region answers.\n# TYPE domicile_region_up "
            "gauge\n");
    for (size_t i = 0; app && i < dm_regions_count(app->regions); i++) {
        dm_region_t *r = dm_regions_at(app->regions, i);
        dm_region_info_t info;
        dm_region_info(r, &info);
        const char *code = dm_region_code(r);
        put(&o, "domicile_region_up{region=\"%s\"} %d\n", code, info.reachable);
        put(&o, "domicile_region_pool_size{region=\"%s\"} %d\n", code, info.pool_size);
        put(&o, "domicile_region_pool_in_use{region=\"%s\"} %d\n", code, info.pool_in_use);
        put(&o, "domicile_region_queued_statements{region=\"%s\"} %d\n", code, info.queued);
        /* Group commit: writes per batch = the second over the first. */
        put(&o, "domicile_region_write_batches_total{region=\"%s\"} %lld\n", code,
            (long long)info.write_batches);
        put(&o, "domicile_region_batched_writes_total{region=\"%s\"} %lld\n", code,
            (long long)info.batched_writes);
        put(&o, "domicile_region_breaker_open{region=\"%s\"} %d\n", code, info.breaker_open);
        put(&o, "domicile_region_fenced{region=\"%s\"} %d\n", code, info.fenced);
    }
    if (app && app->peers) {
        put(&o, "# HELP domicile_peer_calls_total Calls to gateways of other regions, by the "
                "method they serve.\n# TYPE domicile_peer_calls_total counter\n");
        dm_peers_counts(app->peers, put_peer_count, &o);
        put_help(&o, "domicile_peer_gateway_up", "gauge",
                 "1 while a gateway of another region answers this gateway's health checks.");
        dm_peers_health(app->peers, put_peer_gateway, &o);
    }
    dm_webhook_stats_t ws = {0};
    if (app)
        dm_webhooks_stats(app->webhooks, &ws);
    put_help(&o, "domicile_webhook_deliveries_total", "counter",
             "Completion webhook attempts by this gateway, by outcome.");
    put(&o, "domicile_webhook_deliveries_total{outcome=\"delivered\"} %lld\n",
        (long long)ws.delivered);
    put(&o, "domicile_webhook_deliveries_total{outcome=\"failed\"} %lld\n", (long long)ws.failed);
    put_help(&o, "domicile_webhook_failing_receivers", "gauge",
             "Webhook receivers whose last attempt failed.");
    put(&o, "domicile_webhook_failing_receivers %lld\n", (long long)ws.failing_receivers);
    put_help(&o, "domicile_webhook_failing_since_timestamp_seconds", "gauge",
             "Since when the receiver failing longest has failed every attempt; 0: none fails.");
    put(&o, "domicile_webhook_failing_since_timestamp_seconds %.3f\n",
        (double)ws.failing_since_ms / 1e3);
    pthread_mutex_lock(&M.mu);
    put(&o,
        "# HELP domicile_ledger_appends_total Ledger entries appended by this gateway.\n"
        "# TYPE domicile_ledger_appends_total counter\ndomicile_ledger_appends_total %lld\n",
        (long long)atomic_load(&M.appends));
    for (size_t i = 0; app && i < dm_regions_count(app->regions) && i < DM_MAX_REGIONS; i++) {
        dm_region_t *r = dm_regions_at(app->regions, i);
        if (dm_region_is_local(r))
            render_local(&o, i, dm_region_code(r));
    }
    for (size_t i = 0; app && i < DM_MAX_REGIONS; i++) {
        if (!app->custody[i])
            continue;
        /* Key custody (src/custody): the region's KEK versions and its token's work. The
         * rates (re-wraps, token operations per second) are rate() of the counters. */
        const char *code = dm_region_code(dm_regions_at(app->regions, i));
        dm_custody_stats_t cs;
        dm_custody_stats(app->custody[i], &cs);
        put(&o, "domicile_kek_ready{region=\"%s\"} %d\n", code, cs.ready ? 1 : 0);
        put(&o, "domicile_kek_current_version{region=\"%s\"} %d\n", code, cs.current);
        for (size_t v = 0; v < cs.n_versions; v++)
            if (cs.data_keys[v] >= 0)
                put(&o, "domicile_kek_data_keys{region=\"%s\",version=\"%d\"} %lld\n", code,
                    cs.version[v], (long long)cs.data_keys[v]);
        put(&o, "domicile_kek_rewrapped_total{region=\"%s\"} %lld\n", code,
            (long long)cs.rewrapped);
        put(&o, "domicile_kek_rotation_remaining_keys{region=\"%s\"} %lld\n", code,
            (long long)cs.rotation_remaining);
        /* The crypto-period (docs/backups.md): above 28 days, a data backup may still hold
         * an erased subject's key under a version that opens. */
        if (cs.oldest_active_ms >= 0)
            put(&o, "domicile_kek_oldest_version_age_seconds{region=\"%s\"} %.3f\n", code,
                (double)cs.oldest_active_ms / 1e3);
        put(&o, "domicile_kek_operations_total{region=\"%s\",op=\"wrap\"} %lld\n", code,
            (long long)cs.wraps);
        put(&o, "domicile_kek_operations_total{region=\"%s\",op=\"unwrap\"} %lld\n", code,
            (long long)cs.unwraps);
        put(&o, "domicile_kek_operation_seconds_total{region=\"%s\",op=\"wrap\"} %.6f\n", code,
            (double)cs.wrap_us / 1e6);
        put(&o, "domicile_kek_operation_seconds_total{region=\"%s\",op=\"unwrap\"} %.6f\n", code,
            (double)cs.unwrap_us / 1e6);
        put(&o, "domicile_kek_token_failures_total{region=\"%s\"} %lld\n", code,
            (long long)cs.token_failures);
    }
    put(&o, "# HELP domicile_transfers_total Cross-border transfers logged, by route and "
            "basis.\n# TYPE domicile_transfers_total counter\n");
    for (size_t i = 0; i < M.n_routes; i++) {
        route_stats_t *r = &M.routes[i];
        put(&o,
            "domicile_transfers_total{from=\"%s\",to=\"%s\",basis=\"%s\",outcome=\"%s\"} "
            "%lld\n",
            r->from, r->to, r->basis, r->allowed ? "allowed" : "refused", r->count);
        put(&o,
            "domicile_transfer_bytes_total{from=\"%s\",to=\"%s\",basis=\"%s\",outcome=\"%s\"} "
            "%lld\n",
            r->from, r->to, r->basis, r->allowed ? "allowed" : "refused", r->bytes);
    }
    pthread_mutex_unlock(&M.mu);
    return o.buf;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
                              const char *method, const char *version, const char *upload,
                              size_t *upload_size, void **state)
{
    struct MHD_Response *resp;
    enum MHD_Result ret;
    if (strcmp(method, "GET") != 0 || strcmp(url, "/metrics") != 0) {
        static const char nf[] = "not found: GET /metrics\n";
        resp = MHD_create_response_from_buffer(sizeof(nf) - 1, (void *)nf, MHD_RESPMEM_PERSISTENT);
        ret = MHD_queue_response(conn, MHD_HTTP_NOT_FOUND, resp);
        MHD_destroy_response(resp);
        return ret;
    }
    char *text = dm_metrics_render(cls);
    resp = MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(resp, "Content-Type", "text/plain; version=0.0.4");
    ret = MHD_queue_response(conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    return ret;
}

dm_status_t *dm_metrics_start(dm_app_t *app, const char *listen)
{
    if (!listen[0])
        return NULL;
    char host[64];
    int port = 0;
    const char *colon = strrchr(listen, ':');
    if (!colon || (size_t)(colon - listen) >= sizeof(host))
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "metrics_listen: must be host:port");
    memcpy(host, listen, (size_t)(colon - listen));
    host[colon - listen] = '\0';
    port = atoi(colon + 1);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, strcmp(host, "localhost") == 0 ? "127.0.0.1" : host, &sa.sin_addr) != 1)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "metrics_listen: host must be an IPv4 address");
    M.daemon = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, (uint16_t)port,
                                NULL, NULL, handle, app, MHD_OPTION_SOCK_ADDR,
                                (struct sockaddr *)&sa, MHD_OPTION_CONNECTION_LIMIT, 64u,
                                MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
    if (!M.daemon)
        return dm_status_new(GRPC_STATUS_UNAVAILABLE, "cannot serve metrics on %s", listen);
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(M.daemon, MHD_DAEMON_INFO_BIND_PORT);
    dm_info("metrics", "serving /metrics on %s:%u", host, info ? info->port : (unsigned)port);
    return NULL;
}

void dm_metrics_stop(void)
{
    if (M.daemon)
        MHD_stop_daemon(M.daemon);
    M.daemon = NULL;
    free(M.methods);
    M.methods = NULL;
    M.n_methods = 0;
}
