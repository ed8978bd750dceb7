/*
 * grpc.health.v1.Health. Service names:
 *   ""                        the gateway itself: SERVING until shutdown begins
 *   "grpc.health.v1.Health",
 *   "domicile.v1.<Service>"   the same as ""
 *   "domicile.gateway.ready"  ready for traffic: SERVING once the gateway's own region has
 *                             answered (a verified connection to its primary) since start,
 *                             and from then on until shutdown begins
 *   "domicile.region.<code>"  SERVING only while that region's primary answers
 * Anything else: Check -> NOT_FOUND, Watch -> SERVICE_UNKNOWN (per the health protocol).
 *
 * The probe listener (probe_listen) answers Check for "" and "domicile.gateway.ready" only
 * (dm_health_probe_check): what Kubernetes' liveness, startup and readiness probes ask.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "grpc/health/v1/health.pb-c.h"

#include "domicile/api.h"
#include "domicile/log.h"

#define REGION_PREFIX    "domicile.region."
#define MAX_SERVICE_NAME 256
#define MAX_WATCHERS     4096

typedef Grpc__Health__V1__HealthCheckResponse__ServingStatus serving_t;
#define ST_SERVING         GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
#define ST_NOT_SERVING     GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
#define ST_SERVICE_UNKNOWN GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN

typedef struct watcher {
    dm_call_t *call;
    char *service;
    serving_t last;
    struct watcher *next;
} watcher_t;

struct dm_health {
    dm_app_t *app;
    pthread_mutex_t mu; /* watchers, n_watchers, shutting_down, own_answered */
    watcher_t *watchers;
    int n_watchers;
    bool shutting_down;
    /* The own region has answered since start. Latched, on purpose: all of a region's
     * gateways share its database, so unreadying them when it fails would help no caller and
     * would withdraw the other regions' data they still serve (DESIGN.md promise 1); before
     * that first answer, a gateway is more likely misconfigured than unlucky, and a rollout
     * should stop at it. */
    bool own_answered;
};

dm_health_t *dm_health_create(dm_app_t *app)
{
    dm_health_t *h = dm_calloc(1, sizeof(*h));
    h->app = app;
    pthread_mutex_init(&h->mu, NULL);
    return h;
}

void dm_health_destroy(dm_health_t *h)
{
    if (!h)
        return;
    if (h->watchers)
        dm_error("health", "watchers left at destroy (bug)");
    pthread_mutex_destroy(&h->mu);
    free(h);
}

static bool is_gateway_service(const char *s)
{
    if (s[0] == '\0' || strcmp(s, "grpc.health.v1.Health") == 0)
        return true;
    size_t n;
    const dm_method_t *m = dm_api_methods(&n);
    for (size_t i = 0; i < n; i++) {
        /* path is "/<service>/<method>" */
        const char *svc = m[i].path + 1;
        const char *slash = strchr(svc, '/');
        if (slash && (size_t)(slash - svc) == strlen(s) && strncmp(svc, s, strlen(s)) == 0)
            return true;
    }
    return false;
}

/* Called with h->mu held. */
static bool own_region_answered(dm_health_t *h)
{
    if (!h->own_answered) {
        dm_region_t *own = dm_regions_find(h->app->regions, h->app->cfg->gateway_region);
        h->own_answered = own && dm_region_serving(own);
    }
    return h->own_answered;
}

/* Called with h->mu held (reads shutting_down). */
static serving_t status_of(dm_health_t *h, const char *service)
{
    if (strcmp(service, DM_HEALTH_READY_SERVICE) == 0)
        return !h->shutting_down && own_region_answered(h) ? ST_SERVING : ST_NOT_SERVING;
    if (strncmp(service, REGION_PREFIX, strlen(REGION_PREFIX)) == 0) {
        dm_region_t *r = dm_regions_find(h->app->regions, service + strlen(REGION_PREFIX));
        if (!r)
            return ST_SERVICE_UNKNOWN;
        /* The own region serves only while its keys can be used too (key custody). */
        bool keys = !dm_region_is_local(r) || !h->app->custody[dm_app_region_index(h->app, r)] ||
                    dm_custody_ready(h->app->custody[dm_app_region_index(h->app, r)]);
        return !h->shutting_down && dm_region_serving(r) && keys ? ST_SERVING : ST_NOT_SERVING;
    }
    if (is_gateway_service(service))
        return h->shutting_down ? ST_NOT_SERVING : ST_SERVING;
    return ST_SERVICE_UNKNOWN;
}

static bool send_status(dm_call_t *call, serving_t st)
{
    Grpc__Health__V1__HealthCheckResponse rep = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    rep.status = st;
    return dm_call_send(call, &rep.base);
}

static dm_status_t *check_service_name(const char *s)
{
    if (strlen(s) > MAX_SERVICE_NAME)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "service: must be at most %d bytes",
                             MAX_SERVICE_NAME);
    return NULL;
}

void dm_health_probe_check(dm_call_t *call)
{
    dm_health_t *h = ((dm_app_t *)dm_call_app(call))->health;
    const Grpc__Health__V1__HealthCheckRequest *req =
        (const Grpc__Health__V1__HealthCheckRequest *)dm_call_request(call);
    /* The same answer for every other name, known to the main listener or not: no list of
     * regions or services leaves through the probe listener. */
    if (req->service[0] != '\0' && strcmp(req->service, DM_HEALTH_READY_SERVICE) != 0) {
        dm_call_finish(call, dm_status_new(GRPC_STATUS_NOT_FOUND,
                                           "the probe listener answers services \"\" and "
                                           "\"" DM_HEALTH_READY_SERVICE "\" only"));
        return;
    }
    pthread_mutex_lock(&h->mu);
    serving_t st = status_of(h, req->service);
    pthread_mutex_unlock(&h->mu);
    Grpc__Health__V1__HealthCheckResponse rep = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    rep.status = st;
    dm_call_reply(call, &rep.base);
}

void dm_health_check(dm_call_t *call)
{
    dm_health_t *h = ((dm_app_t *)dm_call_app(call))->health;
    const Grpc__Health__V1__HealthCheckRequest *req =
        (const Grpc__Health__V1__HealthCheckRequest *)dm_call_request(call);
    dm_status_t *bad = check_service_name(req->service);
    if (bad) {
        dm_call_finish(call, bad);
        return;
    }
    pthread_mutex_lock(&h->mu);
    serving_t st = status_of(h, req->service);
    pthread_mutex_unlock(&h->mu);
    if (st == ST_SERVICE_UNKNOWN) {
        dm_call_finish(
            call, dm_status_new(GRPC_STATUS_NOT_FOUND, "unknown service \"%s\"", req->service));
        return;
    }
    Grpc__Health__V1__HealthCheckResponse rep = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    rep.status = st;
    dm_call_reply(call, &rep.base);
}

static void free_watcher(watcher_t *w)
{
    free(w->service);
    free(w);
}

/* Remove `call` from the list; returns the watcher (caller frees) or NULL when it was already
 * taken by someone else (shutdown). Called with h->mu held. */
static watcher_t *unlink_locked(dm_health_t *h, dm_call_t *call)
{
    for (watcher_t **pp = &h->watchers; *pp; pp = &(*pp)->next) {
        if ((*pp)->call == call) {
            watcher_t *w = *pp;
            *pp = w->next;
            h->n_watchers--;
            return w;
        }
    }
    return NULL;
}

static void watch_cancelled(dm_call_t *call, void *arg)
{
    dm_health_t *h = arg;
    pthread_mutex_lock(&h->mu);
    watcher_t *w = unlink_locked(h, call);
    pthread_mutex_unlock(&h->mu);
    if (w) {
        free_watcher(w);
        dm_call_finish(call, dm_status_new(GRPC_STATUS_CANCELLED, "watch cancelled"));
    }
}

void dm_health_watch(dm_call_t *call)
{
    dm_health_t *h = ((dm_app_t *)dm_call_app(call))->health;
    const Grpc__Health__V1__HealthCheckRequest *req =
        (const Grpc__Health__V1__HealthCheckRequest *)dm_call_request(call);
    dm_status_t *bad = check_service_name(req->service);
    if (bad) {
        dm_call_finish(call, bad);
        return;
    }

    /* The hook goes on before the watcher is listed: if the cancel comes first, the hook
     * finds nothing to unlink and the check below (the flag is set before the hook runs)
     * ends the call; if it comes later, the hook ends it. Never both. */
    dm_call_on_cancel(call, watch_cancelled, h);
    pthread_mutex_lock(&h->mu);
    if (dm_call_cancelled(call)) {
        pthread_mutex_unlock(&h->mu);
        dm_call_finish(call, dm_status_new(GRPC_STATUS_CANCELLED, "watch cancelled"));
        return;
    }
    if (h->shutting_down) {
        pthread_mutex_unlock(&h->mu);
        send_status(call, ST_NOT_SERVING);
        dm_call_finish(call, NULL);
        return;
    }
    if (h->n_watchers >= MAX_WATCHERS) {
        pthread_mutex_unlock(&h->mu);
        dm_call_finish(call, dm_status_new(GRPC_STATUS_RESOURCE_EXHAUSTED,
                                           "too many health watchers (limit %d)", MAX_WATCHERS));
        return;
    }
    watcher_t *w = dm_calloc(1, sizeof(*w));
    w->call = call;
    w->service = dm_strdup(req->service);
    w->last = status_of(h, req->service);
    w->next = h->watchers;
    h->watchers = w;
    h->n_watchers++;
    /* Sent under the lock so a concurrent change cannot overtake the first message. */
    send_status(call, w->last);
    pthread_mutex_unlock(&h->mu);
}

void dm_health_region_changed(void *arg, dm_region_t *region, bool serving)
{
    dm_health_t *h = arg;
    pthread_mutex_lock(&h->mu);
    if (serving && dm_region_is_local(region))
        h->own_answered = true;
    for (watcher_t *w = h->watchers; w; w = w->next) {
        serving_t now = status_of(h, w->service);
        if (now != w->last) {
            w->last = now;
            send_status(w->call, now);
        }
    }
    pthread_mutex_unlock(&h->mu);
}

void dm_health_shutdown(void *arg)
{
    dm_health_t *h = arg;
    pthread_mutex_lock(&h->mu);
    h->shutting_down = true;
    watcher_t *list = h->watchers;
    h->watchers = NULL;
    h->n_watchers = 0;
    pthread_mutex_unlock(&h->mu);
    /* Tell every watcher, then end its stream cleanly: a Watch never ends by itself, so it
     * would otherwise hold shutdown for the whole grace period. */
    while (list) {
        watcher_t *next = list->next;
        if (list->last != ST_NOT_SERVING)
            send_status(list->call, ST_NOT_SERVING);
        dm_call_finish(list->call, NULL);
        free_watcher(list);
        list = next;
    }
}
