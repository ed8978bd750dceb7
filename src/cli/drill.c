/*
 * domicilectl drill failover|gateway: drills against the deploy/local regions and their
 * federation of gateways (DESIGN.md §7, issues 7 and 15).
 *
 * failover: under a mixed load on every region it SIGKILLs one region's primary, promotes its
 * standby, rejoins the old primary as the new standby (all through deploy/local/domicile-local),
 * then proves that nothing was lost, written twice, misplaced or left out of the transfer
 * ledger, and that the other regions saw no error.
 *
 * gateway: the region has two gateways (or more); under the same load it SIGKILLs one of them
 * and proves that only calls in flight at that moment failed, none after; that no
 * acknowledged write was lost or written twice; that the surviving gateways serve; and that
 * the other regions saw no error.
 *
 * The load runs through the federation: each region's data is called both at the region's own
 * gateways and at another region's gateway (which forwards it), and each region's data is read
 * by a principal of another region at that principal's own gateway (cross-border, forwarded).
 *
 * Threads: `clients` load workers per region, each with its own dm_client per principal; the
 * main thread runs the drill steps. Workers share only atomics with the main thread until
 * they are joined; everything else a worker owns.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/crypto.h>

#include "domicile/client.h"
#include "domicile/progress.h"
#include "domicile/v1/customers.pb-c.h"
#include "domicile/v1/records.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#include "cli.h"
#include "drill_common.h"

#define PATH_REGISTER "/domicile.v1.CustomersService/RegisterCustomer"
#define PATH_HEALTH   "/grpc.health.v1.Health/Check"

#define DRAIN_MS       30000  /* retrying unacknowledged writes after the load */
#define VERIFY_MS      90000  /* reading every acknowledged write back, per worker */
#define RETRY_PAUSE_US 200000 /* between retries of a region that does not answer */
#define TAIL_AFTER_MS  2000   /* load kept running after the rejoin at least this long */
#define MAX_GW         8      /* gateways per region (a region file lists up to 8) */
#define MAX_FAILS      8      /* failures of the gateway drill kept per worker for the report */
#define SERVE_WAIT_MS  15000  /* gateway drill: until the survivors answer SERVING */

enum { MODE_FAILOVER, MODE_GATEWAY };

/* The deploy/local regions' demo principals (domicile-local's DEMO_PRINCIPALS). admin is in
 * us: its reads of eu and in records are cross-border, so are its writes. */
#define ADMIN_REGION 0
/* The cross-border reader of the drilled region's data (a principal of another region). */
static const int xb_region_of[DM_CTL_N_REGIONS] = {2, 2, 1};
static const char *const service_of[DM_CTL_N_REGIONS] = {"service-us", "service-eu", "service-in"};

/* ------------------------------------------------------------------------------------------
 * small helpers */

static uint64_t rng_next(uint64_t *s)
{
    /* splitmix64: enough for picking operations and payload bytes */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* "30s", "30", "1500ms", "2m" -> milliseconds; -1 if malformed. */
static int64_t parse_duration(const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || v < 0)
        return -1;
    double mult = 1000;
    if (strcmp(end, "ms") == 0)
        mult = 1;
    else if (strcmp(end, "m") == 0 || strcmp(end, "min") == 0)
        mult = 60000;
    else if (*end && strcmp(end, "s") != 0)
        return -1;
    return (int64_t)(v * mult);
}

typedef struct {
    int32_t *v; /* latencies in microseconds, owned */
    size_t n, cap;
} lat_t;

static void lat_add(lat_t *l, int64_t us)
{
    if (l->n == l->cap)
        l->v = dm_realloc(l->v, (l->cap = l->cap ? l->cap * 2 : 256) * sizeof(*l->v));
    l->v[l->n++] = (int32_t)(us > INT32_MAX ? INT32_MAX : us);
}

static void lat_merge(lat_t *into, const lat_t *from)
{
    for (size_t i = 0; i < from->n; i++)
        lat_add(into, from->v[i]);
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* Percentile in milliseconds of a sorted list; 0 if empty. */
static double lat_pct(const lat_t *l, double p)
{
    if (!l->n)
        return 0;
    size_t i = (size_t)(p / 100.0 * (double)(l->n - 1) + 0.5);
    return l->v[i] / 1000.0;
}

/* ------------------------------------------------------------------------------------------
 * drill state */

/* One logical write: retried with the same request_id until acknowledged. */
typedef struct {
    char *record_id;  /* owned */
    char *request_id; /* owned */
    uint8_t *payload; /* owned */
    size_t len;
} dwrite_t;

typedef struct {
    dwrite_t *v; /* owned, with their contents */
    size_t n, cap;
} wlist_t;

static void wlist_push(wlist_t *l, dwrite_t w)
{
    if (l->n == l->cap)
        l->v = dm_realloc(l->v, (l->cap = l->cap ? l->cap * 2 : 64) * sizeof(*l->v));
    l->v[l->n++] = w;
}

static void dwrite_free(dwrite_t *w)
{
    free(w->record_id);
    free(w->request_id);
    free(w->payload);
}

static void wlist_free(wlist_t *l)
{
    for (size_t i = 0; i < l->n; i++)
        dwrite_free(&l->v[i]);
    free(l->v);
}

/* A failed call of the gateway drill, for the report (times: monotonic microseconds). */
typedef struct {
    int64_t started, ended;
    int code;
    bool at_target; /* called at the drilled region's gateways */
    bool unseen;    /* the first call of its client after the kill */
    const char *method;
    char message[160];
} fail_t;

/* Counts of one worker, later of one region. */
typedef struct {
    long calls, puts_ok, replays, reads_ok, xb_reads_ok;
    long forwarded;               /* calls made at a gateway of another region than the data's */
    long anomalies;               /* an acknowledged record read back missing or different */
    long err[DM_CTL_N_CODES];     /* non-OK statuses of the load (and the drain), by code */
    long errors_after_rec;        /* of those, in calls started after the first recovered write */
    long unresolved;              /* writes never acknowledged, not even by the drain */
    char *sample[DM_CTL_N_CODES]; /* the first error message of each code, owned */
    long verified, lost, mismatched, unverified, dup_readback;
    lat_t put_lat, get_lat;
    /* Gateway drill. "At the target": calls made at the drilled region's gateways; the others
     * reach the drilled region's data, if at all, forwarded by another region's gateway. */
    long in_flight;     /* calls at the target in flight at the kill (started before it ended,
                         * ended after it began) */
    long in_flight_fwd; /* forwarded calls on the drilled region's data in flight at the kill */
    long fail_in_flight, fail_after, fail_before; /* failed calls at the target, by window */
    long fail_unseen;  /* failed calls at the target started after the kill, each the first
                        * call of its client after it: sent on a connection to the dead
                        * gateway that the client had not yet seen closed */
    long fail_fwd;     /* failed forwarded calls on the drilled region's data */
    long ok_after;     /* calls at the target started after the kill that succeeded */
    long ok_after_fwd; /* forwarded calls on the drilled region's data, the same */
    fail_t fails[MAX_FAILS];
    int n_fails;
} counts_t;

struct drill;

/* A client of one principal at one gateway (or at a region's list of gateways). */
typedef struct {
    dm_client_t *c;
    int at;            /* region whose gateways it calls */
    bool at_target;    /* the drilled region's gateways (gateway drill) */
    bool called_after; /* a call of this client started after the kill */
    char *target;      /* gRPC target, owned */
} dclient_t;

typedef struct {
    struct drill *d;
    int region, idx;
    pthread_t thread;
    uint64_t rng;
    long seq;
    wlist_t acked, pending;
    counts_t c;
} worker_t;

typedef struct drill {
    dm_ctl_drill_env_t env; /* env.target: the drilled region */
    const char *addr;
    int mode; /* MODE_* */
    /* The federation: each region's gateways (public addresses), from --gateway, else from the
     * state's running gateways (domicile-local gateways start), else --addr for every region. */
    char *gw[DM_CTL_N_REGIONS][MAX_GW]; /* owned */
    int n_gw[DM_CTL_N_REGIONS];
    const char *gw_source;
    /* Gateway drill: the gateway killed (index into gw[target]) and its process. */
    int victim;
    long victim_pid; /* 0: from the state's pid file */
    int64_t duration_ms;
    int clients;
    const dm_ctl_output_t *out; /* -o: where the report goes and as what */
    dm_progress_t *progress;    /* NULL: stderr is no terminal */
    const char *phase;          /* what the progress line says the drill is doing */
    int64_t load_end_us;        /* 0 while the load runs */
    /* the service principals' tokens, owned, cleansed when freed */
    char *token_service[DM_CTL_N_REGIONS];
    char run_id[64];
    char customer[DM_CTL_N_REGIONS][96];

    atomic_bool stop;
    atomic_long calls_ended, calls_failed; /* the load's, for the progress line */
    atomic_llong kill_start_us;            /* 0 until the kill step began */
    atomic_llong kill_end_us;              /* 0 until the kill step returned */
    atomic_llong first_write_us;           /* end of the first OK write started after kill_end_us */
    int64_t t0_us;

    worker_t *workers; /* clients * DM_CTL_N_REGIONS, owned */
    int n_workers;
} drill_t;

/* "127.0.0.1:50051" and the like: an IPv4 literal with a port. */
static bool ipv4_literal(const char *a)
{
    unsigned x[5];
    char tail;
    return sscanf(a, "%u.%u.%u.%u:%u%c", &x[0], &x[1], &x[2], &x[3], &x[4], &tail) == 5;
}

/* The gRPC target of region r's gateways. One gateway: its address. Several: all of them in
 * one channel ("ipv4:a,b", pick_first), so that a client whose gateway dies moves to the next
 * (calls started after that find a connected gateway, or wait while the channel connects);
 * `first` is the index listed first, the one the channel connects to while it answers.
 * Addresses that are not IPv4 literals (or TLS, whose target name a list would not carry):
 * gateway `first` alone. */
static char *region_target(const drill_t *d, int r, int first)
{
    int n = d->n_gw[r];
    first = first % n;
    bool list = n > 1 && !d->env.ca_pem;
    for (int i = 0; i < n && list; i++)
        list = ipv4_literal(d->gw[r][i]);
    if (!list)
        return dm_strdup(d->gw[r][first]);
    size_t cap = 8;
    for (int i = 0; i < n; i++)
        cap += strlen(d->gw[r][i]) + 1;
    char *t = dm_malloc(cap);
    size_t len = (size_t)snprintf(t, cap, "ipv4:");
    for (int k = 0; k < n; k++)
        len +=
            (size_t)snprintf(t + len, cap - len, "%s%s", k ? "," : "", d->gw[r][(first + k) % n]);
    return t;
}

static dclient_t dclient(const drill_t *d, int at, int first, const char *token)
{
    dclient_t c;
    c.at = at;
    c.at_target = d->mode == MODE_GATEWAY && at == d->env.target;
    c.called_after = false;
    c.target = region_target(d, at, first);
    c.c = dm_ctl_drill_client(&d->env, c.target, token);
    return c;
}

static void dclient_free(dclient_t *c)
{
    dm_client_destroy(c->c);
    free(c->target);
    c->c = NULL;
    c->target = NULL;
}

/* Where worker w's main client calls: even workers at their data's own region, odd ones at
 * another region's gateway, which forwards (us for eu and in; for us, a region other than the
 * drilled one). */
static int main_gateway_region(const drill_t *d, int region, int idx)
{
    if (idx % 2 == 0)
        return region;
    if (region != 0)
        return 0;
    return d->env.target == 1 ? 2 : 1;
}

/* The principal reading a region's data across the border: for the drilled region the usual
 * one; for the others a principal of the third region (never of the drilled one, so that the
 * other regions' load does not call the drilled region's gateways). It calls at its own
 * region's gateways. */
static int xb_principal_region(const drill_t *d, int region)
{
    if (region == d->env.target)
        return xb_region_of[region];
    return DM_CTL_N_REGIONS - region - d->env.target; /* indices 0 + 1 + 2 = 3 */
}

/* Among the drilled region's gateways, which a worker's channel lists first: the victim for
 * every other direct worker (so that some clients lose their gateway), a survivor for the
 * rest. */
static int first_gateway(const drill_t *d, int region, int idx)
{
    if (d->mode != MODE_GATEWAY || region != d->env.target)
        return 0;
    int n = d->n_gw[region];
    return (idx / 2) % 2 == 0 ? d->victim : (d->victim + 1) % n;
}

/* What this drill retries: the transient statuses, and also RESOURCE_EXHAUSTED and INTERNAL
 * (the restore drill does not retry those). */
static bool retryable(grpc_status_code code)
{
    return dm_ctl_transient(code) || code == GRPC_STATUS_RESOURCE_EXHAUSTED ||
           code == GRPC_STATUS_INTERNAL;
}

/* ------------------------------------------------------------------------------------------
 * the load */

/* Every call of the load ends here: forwarded calls counted; for the gateway drill, where the
 * call stood relative to the kill. st NULL: it succeeded. */
static void call_end(worker_t *w, dclient_t *cl, const dm_status_t *st, const char *method,
                     int64_t started, int64_t ended)
{
    drill_t *d = w->d;
    atomic_fetch_add_explicit(&d->calls_ended, 1, memory_order_relaxed);
    if (st)
        atomic_fetch_add_explicit(&d->calls_failed, 1, memory_order_relaxed);
    if (cl->at != w->region)
        w->c.forwarded++;
    if (d->mode != MODE_GATEWAY)
        return;
    long long ks = atomic_load(&d->kill_start_us), ke = atomic_load(&d->kill_end_us);
    bool mine = w->region == d->env.target; /* the drilled region's data */
    bool in_flight = ks && ended >= ks && (!ke || started < ke);
    bool after = ke && started >= ke;
    /* A client learns that its gateway died from its first call after the kill: gRPC sees a
     * connection closed when it next reads it, and that call may already be on its way. */
    bool unseen = after && !cl->called_after;
    if (after)
        cl->called_after = true;
    if (cl->at_target && in_flight)
        w->c.in_flight++;
    else if (!cl->at_target && mine && in_flight)
        w->c.in_flight_fwd++;
    if (!st) {
        if (after && cl->at_target)
            w->c.ok_after++;
        else if (after && mine)
            w->c.ok_after_fwd++;
        return;
    }
    if (cl->at_target) {
        if (in_flight)
            w->c.fail_in_flight++;
        else if (unseen)
            w->c.fail_unseen++;
        else if (after)
            w->c.fail_after++;
        else
            w->c.fail_before++;
    } else if (mine) {
        w->c.fail_fwd++;
    }
    if (w->c.n_fails < MAX_FAILS) {
        fail_t *f = &w->c.fails[w->c.n_fails++];
        f->started = started;
        f->ended = ended;
        f->code = (int)st->code;
        f->at_target = cl->at_target;
        f->unseen = unseen;
        f->method = method;
        snprintf(f->message, sizeof(f->message), "%s", st->message);
    }
}

static void count_error(worker_t *w, dclient_t *cl, const dm_status_t *st, const char *method,
                        int64_t started)
{
    int k = dm_ctl_code_index(st->code);
    w->c.err[k]++;
    if (!w->c.sample[k])
        w->c.sample[k] = dm_sprintf("%s at %.1f s (at the %s gateway%s): %s", method,
                                    (double)(started - w->d->t0_us) / 1e6, dm_ctl_regions[cl->at],
                                    w->d->n_gw[cl->at] > 1 ? "s" : "", st->message);
    long long rec = atomic_load(&w->d->first_write_us);
    if (w->region == w->d->env.target && rec && started > rec)
        w->c.errors_after_rec++;
    call_end(w, cl, st, method, started, dm_ctl_mono_us());
}

/* One PutRecord attempt of `x`. Returns the status code; *replayed set on OK. (Versions are
 * checked where they are stored, after the load: check_regions.) */
static grpc_status_code put_once(worker_t *w, dclient_t *cl, const dwrite_t *x, bool *replayed,
                                 int64_t *started)
{
    drill_t *d = w->d;
    dm_ctl_put_t put = {d->customer[w->region],     x->record_id, x->request_id, NULL,
                        "application/octet-stream", x->payload,   x->len};
    *started = dm_ctl_mono_us();
    dm_status_t *st = dm_ctl_drill_put(&d->env, cl->c, &put, replayed);
    if (st) {
        grpc_status_code code = st->code;
        count_error(w, cl, st, "PutRecord", *started);
        dm_status_free(st);
        return code;
    }
    call_end(w, cl, NULL, "PutRecord", *started, dm_ctl_mono_us());
    return GRPC_STATUS_OK;
}

/* Tries the write once. Acknowledged: moved into w->acked (true). Otherwise the caller keeps
 * it for a retry if the status is retryable, or frees it. */
static bool try_write(worker_t *w, dclient_t *cl, dwrite_t *x, grpc_status_code *code_out)
{
    drill_t *d = w->d;
    bool replayed = false;
    int64_t started;
    w->c.calls++;
    grpc_status_code code = put_once(w, cl, x, &replayed, &started);
    *code_out = code;
    if (code != GRPC_STATUS_OK)
        return false;
    int64_t done = dm_ctl_mono_us();
    lat_add(&w->c.put_lat, done - started);
    w->c.puts_ok++;
    if (replayed)
        w->c.replays++;
    long long ke = atomic_load(&d->kill_end_us);
    if (w->region == d->env.target && ke && started >= ke) {
        long long cur = atomic_load(&d->first_write_us);
        while ((cur == 0 || done < cur) &&
               !atomic_compare_exchange_weak(&d->first_write_us, &cur, done))
            ;
    }
    wlist_push(&w->acked, *x);
    return true;
}

static dwrite_t new_write(worker_t *w)
{
    dwrite_t x;
    w->seq++;
    x.record_id = dm_sprintf("r%d-%ld", w->idx, w->seq);
    x.request_id =
        dm_sprintf("%s-%s-w%d-%ld", w->d->run_id, dm_ctl_regions[w->region], w->idx, w->seq);
    x.len = 32 + rng_next(&w->rng) % 480;
    x.payload = dm_malloc(x.len);
    for (size_t i = 0; i < x.len; i++)
        x.payload[i] = (uint8_t)rng_next(&w->rng);
    return x;
}

static void write_new(worker_t *w, dclient_t *cl)
{
    dwrite_t x = new_write(w);
    grpc_status_code code;
    if (try_write(w, cl, &x, &code))
        return;
    if (retryable(code))
        wlist_push(&w->pending, x);
    else
        dwrite_free(&x);
}

/* Retries the oldest unacknowledged write, with its request_id. */
static bool write_retry(worker_t *w, dclient_t *cl)
{
    dwrite_t x = w->pending.v[0];
    grpc_status_code code;
    bool ok = try_write(w, cl, &x, &code);
    if (ok || !retryable(code)) {
        if (!ok)
            dwrite_free(&x);
        memmove(&w->pending.v[0], &w->pending.v[1], (w->pending.n - 1) * sizeof(dwrite_t));
        w->pending.n--;
    }
    return ok;
}

static bool same_payload(const Domicile__V1__Record *rec, const dwrite_t *x)
{
    return rec && rec->payload.len == x->len && memcmp(rec->payload.data, x->payload, x->len) == 0;
}

/* GetRecord of one of this worker's acknowledged records as `principal_region`. */
static void read_one(worker_t *w, dclient_t *cl, int principal_region)
{
    drill_t *d = w->d;
    const dwrite_t *x = &w->acked.v[rng_next(&w->rng) % w->acked.n];
    Domicile__V1__GetRecordResponse *resp;
    w->c.calls++;
    int64_t started = dm_ctl_mono_us();
    dm_status_t *st = dm_ctl_drill_get(&d->env, cl->c, d->customer[w->region], x->record_id, &resp);
    if (st) {
        count_error(w, cl, st, "GetRecord", started);
        if (st->code == GRPC_STATUS_NOT_FOUND)
            w->c.anomalies++;
        dm_status_free(st);
        return;
    }
    int64_t ended = dm_ctl_mono_us();
    call_end(w, cl, NULL, "GetRecord", started, ended);
    lat_add(&w->c.get_lat, ended - started);
    if (!same_payload(resp->record, x))
        w->c.anomalies++;
    w->c.reads_ok++;
    if (principal_region != w->region)
        w->c.xb_reads_ok++;
    protobuf_c_message_free_unpacked(&resp->base, NULL);
}

/* Reads every acknowledged write back as a principal of the record's own region, at that
 * region's gateways (no transfer, so the ledger counts stay those of the load). */
static void verify(worker_t *w)
{
    drill_t *d = w->d;
    dclient_t own =
        dclient(d, w->region, first_gateway(d, w->region, w->idx), d->token_service[w->region]);
    dm_client_t *cl = own.c;
    int64_t deadline = dm_ctl_mono_us() + (int64_t)VERIFY_MS * 1000;
    for (size_t i = 0; i < w->acked.n; i++) {
        const dwrite_t *x = &w->acked.v[i];
        for (;;) {
            if (dm_ctl_mono_us() > deadline) {
                w->c.unverified++;
                break;
            }
            Domicile__V1__GetRecordResponse *resp;
            dm_status_t *st =
                dm_ctl_drill_get(&d->env, cl, d->customer[w->region], x->record_id, &resp);
            if (st && retryable(st->code)) {
                dm_status_free(st);
                dm_ctl_sleep_us(RETRY_PAUSE_US);
                continue;
            }
            if (st) {
                if (st->code == GRPC_STATUS_NOT_FOUND)
                    w->c.lost++;
                else
                    w->c.unverified++;
                dm_status_free(st);
                break;
            }
            const Domicile__V1__Record *rec = resp->record;
            if (!same_payload(rec, x))
                w->c.mismatched++;
            else
                w->c.verified++;
            if (rec && rec->version != 1)
                w->c.dup_readback++;
            protobuf_c_message_free_unpacked(&resp->base, NULL);
            break;
        }
    }
    dclient_free(&own);
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    drill_t *d = w->d;
    int at = main_gateway_region(d, w->region, w->idx);
    int xr = xb_principal_region(d, w->region);
    dclient_t main_cl = dclient(d, at, first_gateway(d, at, w->idx), d->env.token_admin);
    dclient_t xb_cl = dclient(d, xr, first_gateway(d, xr, w->idx), d->token_service[xr]);
    dclient_t *admin = &main_cl, *xb = &xb_cl;
    int64_t period = (int64_t)(1e6 / d->env.rate);
    /* Workers start out of step, so their calls spread over the period. */
    int64_t next = dm_ctl_mono_us() + (int64_t)(rng_next(&w->rng) % (uint64_t)period);
    while (!atomic_load(&d->stop)) {
        int64_t now = dm_ctl_mono_us();
        if (next > now)
            dm_ctl_sleep_us(next - now);
        else if (now - next > period)
            next = now; /* a call waited out its deadline: no burst to catch up */
        next += period;
        if (atomic_load(&d->stop))
            break;
        unsigned op = (unsigned)(rng_next(&w->rng) % 100);
        if (op < 25 && w->pending.n)
            write_retry(w, admin);
        else if (op < 50 || w->acked.n == 0)
            write_new(w, admin);
        else if (op < 75)
            read_one(w, admin, ADMIN_REGION);
        else
            read_one(w, xb, xr);
    }
    /* Drain: a write that was never acknowledged may still have committed; its retry (same
     * request_id) must then replay, not write again. */
    int64_t deadline = dm_ctl_mono_us() + (int64_t)DRAIN_MS * 1000;
    while (w->pending.n && dm_ctl_mono_us() < deadline) {
        if (!write_retry(w, admin))
            dm_ctl_sleep_us(RETRY_PAUSE_US);
    }
    w->c.unresolved = (long)w->pending.n;
    dclient_free(&main_cl);
    dclient_free(&xb_cl);
    verify(w);
    return NULL;
}

/* ------------------------------------------------------------------------------------------
 * domicile-local */

typedef struct {
    char primary[16]; /* node running as primary, "" if none */
    char repl[32];    /* sync_state of the other node on the primary, "" if none */
    bool healthy;     /* both nodes run, the other one is the primary's sync standby */
} region_state_t;

/* Every region's layout, from `domicile-local status --json` (rs: DM_CTL_N_REGIONS entries). */
static bool regions_state(const drill_t *d, region_state_t *rs)
{
    memset(rs, 0, DM_CTL_N_REGIONS * sizeof(*rs));
    char *out = NULL;
    const char *args[] = {"status", "--json", NULL};
    int rc = dm_ctl_drill_local(&d->env, &out, args);
    json_error_t jerr;
    json_t *arr = rc == 0 && out ? json_loads(out, 0, &jerr) : NULL;
    free(out);
    if (!json_is_array(arr)) {
        json_decref(arr);
        fprintf(stderr, "domicilectl: drill: cannot read `domicile-local status --json`\n");
        return false;
    }
    int running[DM_CTL_N_REGIONS] = {0};
    size_t i;
    json_t *e;
    json_array_foreach(arr, i, e)
    {
        const char *reg = json_string_value(json_object_get(e, "region"));
        const char *node = json_string_value(json_object_get(e, "node"));
        const char *role = json_string_value(json_object_get(e, "role"));
        int r = 0;
        while (r < DM_CTL_N_REGIONS && (!reg || strcmp(reg, dm_ctl_regions[r]) != 0))
            r++;
        if (r == DM_CTL_N_REGIONS || !json_is_true(json_object_get(e, "running")) || !node || !role)
            continue;
        running[r]++;
        if (strcmp(role, "primary") != 0)
            continue;
        snprintf(rs[r].primary, sizeof(rs[r].primary), "%s", node);
        const char *other = strcmp(node, "node1") == 0 ? "node2" : "node1";
        const char *st = json_string_value(json_object_get(json_object_get(e, "standbys"), other));
        snprintf(rs[r].repl, sizeof(rs[r].repl), "%s", st ? st : "");
    }
    json_decref(arr);
    for (int r = 0; r < DM_CTL_N_REGIONS; r++)
        rs[r].healthy = running[r] == 2 && rs[r].primary[0] && strcmp(rs[r].repl, "sync") == 0;
    return true;
}

/* ------------------------------------------------------------------------------------------
 * set-up */

static bool register_customers(drill_t *d)
{
    dm_client_t *c = dm_ctl_drill_client(&d->env, d->gw[0][0], d->env.token_admin);
    bool ok = true;
    for (int i = 0; i < DM_CTL_N_REGIONS && ok; i++) {
        Domicile__V1__RegisterCustomerRequest r = DOMICILE__V1__REGISTER_CUSTOMER_REQUEST__INIT;
        char *rid = dm_sprintf("%s-register-%s", d->run_id, dm_ctl_regions[i]);
        r.request_id = rid;
        r.customer_id = d->customer[i];
        r.residency = (char *)dm_ctl_regions[i];
        r.display_name = "failover drill";
        ProtobufCMessage *resp = NULL;
        dm_status_t *st = dm_ctl_drill_call(&d->env, c, PATH_REGISTER, &r.base,
                                            &domicile__v1__register_customer_response__descriptor,
                                            &resp, 15000, RETRY_PAUSE_US / 1000, retryable);
        if (st) {
            fprintf(stderr, "domicilectl: drill: cannot register customer %s: %s: %s\n",
                    d->customer[i], dm_status_code_name(st->code), st->message);
            ok = false;
            dm_status_free(st);
        } else {
            protobuf_c_message_free_unpacked(resp, NULL);
        }
        free(rid);
    }
    dm_client_destroy(c);
    return ok;
}

static bool load_tokens(drill_t *d)
{
    d->env.token_admin = dm_ctl_drill_token(&d->env, "admin");
    bool ok = d->env.token_admin != NULL;
    for (int i = 0; i < DM_CTL_N_REGIONS && ok; i++) {
        d->token_service[i] = dm_ctl_drill_token(&d->env, service_of[i]);
        ok = d->token_service[i] != NULL;
    }
    return ok;
}

/* ------------------------------------------------------------------------------------------
 * the federation's gateways */

/* The pid in `path` if that process runs and is a domiciled; 0 otherwise. */
static long gateway_pid(const char *path)
{
    char *text = dm_ctl_read_file(path, true);
    if (!text)
        return 0;
    char *end;
    long pid = strtol(text, &end, 10);
    bool ok = end != text && *end == '\0' && pid > 0;
    free(text);
    if (!ok)
        return 0;
    char exe[64], target[PATH_MAX];
    snprintf(exe, sizeof(exe), "/proc/%ld/exe", pid);
    ssize_t n = readlink(exe, target, sizeof(target) - 1);
    if (n <= 0)
        return 0;
    target[n] = '\0';
    const char *base = strrchr(target, '/');
    base = base ? base + 1 : target;
    return strncmp(base, "domiciled", 9) == 0 && (base[9] == '\0' || base[9] == ' ') ? pid : 0;
}

/* File of gateway k (0-based) of region r in the state: "listening", "listening-2", ... */
static char *state_gw_file(const drill_t *d, int r, int k, const char *what)
{
    return k == 0 ? dm_sprintf("%s/gw/%s/%s", d->env.state, dm_ctl_regions[r], what)
                  : dm_sprintf("%s/gw/%s/%s-%d", d->env.state, dm_ctl_regions[r], what, k + 1);
}

static char *state_pid_file(const drill_t *d, int r, int k)
{
    return k == 0 ? dm_sprintf("%s/gw/%s/domiciled.pid", d->env.state, dm_ctl_regions[r])
                  : dm_sprintf("%s/gw/%s/domiciled-%d.pid", d->env.state, dm_ctl_regions[r], k + 1);
}

/* Each region's gateways: --gateway given, else the state's running gateways (the addresses
 * `domicile-local gateways start` wrote, only of those whose process runs), else --addr. A
 * region some of whose gateways are stopped keeps its numbering in the pid files: the index
 * of gateway k is remembered for the kill (gw_num). */
static int gw_num[DM_CTL_N_REGIONS][MAX_GW];

static bool discover_gateways(drill_t *d)
{
    bool given = false;
    for (int r = 0; r < DM_CTL_N_REGIONS; r++)
        given = given || d->n_gw[r] > 0;
    if (given) {
        d->gw_source = "--gateway";
        for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
            if (d->n_gw[r] == 0) {
                fprintf(stderr, "domicilectl: drill: --gateway: no gateway of %s given\n",
                        dm_ctl_regions[r]);
                return false;
            }
            for (int k = 0; k < d->n_gw[r]; k++)
                gw_num[r][k] = k;
        }
        return true;
    }
    int found = 0;
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        for (int k = 0; k < MAX_GW; k++) {
            char *lf = state_gw_file(d, r, k, "listening");
            char *pf = state_pid_file(d, r, k);
            char *addr = gateway_pid(pf) ? dm_ctl_read_file(lf, true) : NULL;
            free(lf);
            free(pf);
            if (!addr || !addr[0]) {
                free(addr);
                continue;
            }
            gw_num[r][d->n_gw[r]] = k;
            d->gw[r][d->n_gw[r]++] = addr;
        }
        found += d->n_gw[r] > 0;
    }
    if (found == DM_CTL_N_REGIONS) {
        d->gw_source = "state";
        return true;
    }
    /* No federation of the state's (or only part of one): one gateway serves everything. */
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        for (int k = 0; k < d->n_gw[r]; k++)
            free(d->gw[r][k]);
        d->n_gw[r] = 1;
        d->gw[r][0] = dm_strdup(d->addr);
        gw_num[r][0] = 0;
    }
    d->gw_source = "--addr";
    return true;
}

static json_t *gateways_json(const drill_t *d)
{
    json_t *o = json_object();
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        json_t *a = json_array();
        for (int k = 0; k < d->n_gw[r]; k++)
            json_array_append_new(a, json_string(d->gw[r][k]));
        json_object_set_new(o, dm_ctl_regions[r], a);
    }
    return o;
}

/* Health of `service` at one gateway: the serving status, -1 if it did not answer. */
static int health_at(const drill_t *d, const char *addr, const char *service)
{
    dm_client_t *c = dm_ctl_drill_client(&d->env, addr, NULL);
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = (char *)service;
    ProtobufCMessage *resp = NULL;
    dm_status_t *st = dm_client_unary(c, PATH_HEALTH, &req.base,
                                      &grpc__health__v1__health_check_response__descriptor,
                                      d->env.call_ms, &resp);
    int out = -1;
    if (!st) {
        out = (int)((Grpc__Health__V1__HealthCheckResponse *)resp)->status;
        protobuf_c_message_free_unpacked(resp, NULL);
    }
    dm_status_free(st);
    dm_client_destroy(c);
    return out;
}

/* Until `service` is SERVING at `addr`, at most `ms`. */
static bool wait_serving(const drill_t *d, const char *addr, const char *service, int64_t ms)
{
    int64_t deadline = dm_ctl_mono_us() + ms * 1000;
    for (;;) {
        if (health_at(d, addr, service) ==
            GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING)
            return true;
        if (dm_ctl_mono_us() > deadline)
            return false;
        dm_ctl_sleep_us(100000);
    }
}

/* Alive and not a zombie. */
static bool process_alive(long pid)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *rp = strrchr(buf, ')');
    return !(rp && rp[1] == ' ' && rp[2] == 'Z');
}

/* SIGKILL of the victim, then until it is dead (a zombie counts: its sockets are closed). */
static bool kill_gateway(const drill_t *d, long pid)
{
    if (kill((pid_t)pid, SIGKILL) != 0) {
        fprintf(stderr, "domicilectl: drill: kill -9 %ld: %s\n", pid, strerror(errno));
        return false;
    }
    int64_t deadline = dm_ctl_mono_us() + 30 * 1000000LL;
    while (process_alive(pid)) {
        if (dm_ctl_mono_us() > deadline) {
            fprintf(stderr, "domicilectl: drill: gateway pid %ld survives SIGKILL\n", pid);
            return false;
        }
        dm_ctl_sleep_us(500);
    }
    (void)d;
    return true;
}

/* ------------------------------------------------------------------------------------------
 * checks after the load and the report */

typedef struct {
    counts_t c;
    long stored, duplicates, misplaced, ledger, ledger_missing;
    bool sql_ok;
} region_result_t;

/* The run's records and customers in every region, and each region's ledger entries of
 * cross-border reads of its customer. */
static void check_regions(const drill_t *d, region_result_t *res)
{
    char ids[512];
    snprintf(ids, sizeof(ids), "'%s', '%s', '%s'", d->customer[0], d->customer[1], d->customer[2]);
    char *sql =
        dm_sprintf("select 'rec', customer_id, count(*), count(*) filter (where version > 1)"
                   " from domicile.records where customer_id in (%s) group by customer_id"
                   " union all select 'cust', customer_id, 1, 0 from domicile.customers"
                   " where customer_id in (%s)"
                   " union all select 'ledger', customer_id, count(*), 0 from domicile.ledger"
                   " where method = 'GetRecord' and direction = 'read' and outcome = 'allowed'"
                   " and customer_id in (%s) group by customer_id",
                   ids, ids, ids);
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        char *out = dm_ctl_drill_sql(&d->env, r, sql);
        res[r].sql_ok = out != NULL;
        if (!out) {
            fprintf(stderr, "domicilectl: drill: cannot query region %s\n", dm_ctl_regions[r]);
            continue;
        }
        char *save = NULL;
        for (char *line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
            char tag[16], cust[128];
            long n, dup;
            if (sscanf(line, "%15[^|]|%127[^|]|%ld|%ld", tag, cust, &n, &dup) != 4)
                continue;
            bool own = strcmp(cust, d->customer[r]) == 0;
            if (strcmp(tag, "rec") == 0) {
                if (own) {
                    res[r].stored = n;
                    res[r].duplicates = dup;
                } else {
                    res[r].misplaced += n;
                }
            } else if (strcmp(tag, "cust") == 0) {
                if (!own)
                    res[r].misplaced += n;
            } else if (strcmp(tag, "ledger") == 0 && own) {
                res[r].ledger = n;
            }
        }
        free(out);
        if (res[r].c.xb_reads_ok > res[r].ledger)
            res[r].ledger_missing = res[r].c.xb_reads_ok - res[r].ledger;
    }
    free(sql);
}

static double ms_since(int64_t t0, int64_t t)
{
    return t ? (double)(t - t0) / 1000.0 : -1;
}

static json_t *errors_json(const counts_t *c, bool samples)
{
    json_t *o = json_object();
    for (int k = 1; k < DM_CTL_N_CODES; k++) {
        if (!c->err[k])
            continue;
        const char *name = dm_status_code_name((grpc_status_code)k);
        if (samples)
            json_object_set_new(o, name, json_string(c->sample[k] ? c->sample[k] : ""));
        else
            json_object_set_new(o, name, json_integer(c->err[k]));
    }
    return o;
}

static void counts_free(counts_t *c)
{
    free(c->put_lat.v);
    free(c->get_lat.v);
    for (int k = 0; k < DM_CTL_N_CODES; k++)
        free(c->sample[k]);
}

static long errors_total(const counts_t *c)
{
    long n = 0;
    for (int k = 1; k < DM_CTL_N_CODES; k++)
        n += c->err[k];
    return n;
}

static void errors_text(const counts_t *c, char *buf, size_t size)
{
    size_t len = 0;
    buf[0] = '\0';
    for (int k = 1; k < DM_CTL_N_CODES && len < size; k++)
        if (c->err[k])
            len += (size_t)snprintf(buf + len, size - len, "%s%s=%ld", len ? "," : "",
                                    dm_status_code_name((grpc_status_code)k), c->err[k]);
    if (!buf[0])
        snprintf(buf, size, "-");
}

/* ------------------------------------------------------------------------------------------
 * the command */

static void drill_usage(FILE *f)
{
    fputs("usage: domicilectl [--addr H:P] [--timeout MS] drill failover|gateway --region REGION\n"
          "         [--duration 30s] [--state DIR] [--json FILE|-] [--clients N] [--rate N]\n"
          "         [--gateway REGION=H:P]... [--victim N] [--victim-pid PID]\n"
          "         [--domicile-local PATH] [-o table|json|jsonl]\n"
          "  Against the deploy/local regions (state DIR, default $DOMICILE_LOCAL_STATE or\n"
          "  " DM_CTL_LOCAL_STATE ") and their gateways: a mixed load on every region (N client\n"
          "  threads per region, default 2, each N calls per second, default 20; call deadline\n"
          "  --timeout, default 2000 ms) through the federation: each region's data at its own\n"
          "  gateways and at another region's (forwarded), read across the border at a third.\n"
          "  Gateways: --gateway REGION=H:P, repeated (a region's gateways in order), else the\n"
          "  state's running gateways (domicile-local gateways start), else --addr for all.\n"
          "  failover: SIGKILL of REGION's primary at a third of the duration, promotion of its\n"
          "  standby, rejoin of the old primary.\n"
          "  gateway: REGION has two gateways or more; SIGKILL of gateway N (--victim, 1-based,\n"
          "  default the last) at a third of the duration: its pid from the state's pid file,\n"
          "  or --victim-pid. Calls in flight at the kill may fail, none after; the survivors\n"
          "  must serve. Restart it afterwards: domicile-local gateways start.\n"
          "  Then every acknowledged write is read back and every region checked. Tokens:\n"
          "  DIR/secrets/tokens/{admin,service-*}.token.\n"
          "  Output: the report as a table on stdout; -o json|jsonl (or --json -) prints its\n"
          "  JSON there instead (indented, or on one line) and the table on stderr; --json FILE\n"
          "  also writes the JSON to FILE. On a terminal, a progress line on stderr.\n"
          "  Exit status: 0 every zero-goal met, 1 a goal missed or the report not written,\n"
          "  2 usage or the regions are not healthy before the drill, 3 a drill step (kill,\n"
          "  promote, rejoin) failed.\n",
          f);
}

static int parse_args(drill_t *d, int argc, char **argv)
{
    /* The drill's own first: getopt lists an ambiguous abbreviation's candidates in this
     * order (--d: --duration, --domicile-local). */
    static const struct option opts[] = {
        {"duration", required_argument, NULL, 'd'},
        {"clients", required_argument, NULL, 'c'},
        {"victim", required_argument, NULL, 'v'},
        {"victim-pid", required_argument, NULL, 'p'},
        DM_CTL_DRILL_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    const char *region = NULL;
    int opt, victim = 0;
    optind = 0; /* GNU getopt: start over on this sub-argv */
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        int rc = dm_ctl_drill_option(&d->env, opt, optarg, &region, 1000, drill_usage);
        if (rc != 1) {
            if (rc)
                return rc;
            continue;
        }
        switch (opt) {
        case 'd':
            d->duration_ms = parse_duration(optarg);
            if (d->duration_ms < 3000 || d->duration_ms > 3600000) {
                fprintf(stderr, "domicilectl: --duration must be 3s..1h\n");
                return 2;
            }
            break;
        case 'c':
            d->clients = atoi(optarg);
            if (d->clients < 1 || d->clients > 32) {
                fprintf(stderr, "domicilectl: --clients must be 1..32\n");
                return 2;
            }
            break;
        case DM_CTL_DRILL_OPT_GATEWAY: {
            const char *addr;
            int r = dm_ctl_drill_gateway_arg(optarg, &addr);
            if (r < 0) {
                fprintf(stderr,
                        "domicilectl: --gateway wants REGION=HOST:PORT (us, eu, in), not "
                        "\"%s\"\n",
                        optarg);
                return 2;
            }
            if (d->n_gw[r] == MAX_GW) {
                fprintf(stderr, "domicilectl: --gateway: at most %d gateways per region\n", MAX_GW);
                return 2;
            }
            d->gw[r][d->n_gw[r]++] = dm_strdup(addr);
            break;
        }
        case 'v':
            victim = atoi(optarg);
            if (victim < 1 || victim > MAX_GW) {
                fprintf(stderr, "domicilectl: --victim must be 1..%d\n", MAX_GW);
                return 2;
            }
            break;
        case 'p':
            d->victim_pid = atol(optarg);
            if (d->victim_pid <= 1) {
                fprintf(stderr, "domicilectl: --victim-pid must be a process id\n");
                return 2;
            }
            break;
        default:
            drill_usage(stderr);
            return 2;
        }
    }
    int rc = dm_ctl_drill_args_end(&d->env, argc, region, drill_usage);
    if (rc)
        return rc;
    if (d->mode != MODE_GATEWAY && (victim || d->victim_pid)) {
        fprintf(stderr, "domicilectl: --victim and --victim-pid are options of drill gateway\n");
        return 2;
    }
    d->victim = victim - 1; /* -1: the last, once the gateways are known */
    return 0;
}

/* The progress line: phase, time into the load, calls and failures so far. */
static void drill_progress(const drill_t *d)
{
    if (!d->progress)
        return;
    double at = (double)((d->load_end_us ? d->load_end_us : dm_ctl_mono_us()) - d->t0_us) / 1e6;
    dm_progress_status(d->progress, "%s %s, %s; load %.0f/%.0f s, %ld calls, %ld failed",
                       d->mode == MODE_GATEWAY ? "gateway" : "failover",
                       dm_ctl_regions[d->env.target], d->phase, at < 0 ? 0 : at,
                       (double)d->duration_ms / 1000, atomic_load(&d->calls_ended),
                       atomic_load(&d->calls_failed));
}

static void main_wait_until(const drill_t *d, int64_t t)
{
    /* Awake every 200 ms for the progress line only when there is one. */
    for (int64_t left = t - dm_ctl_mono_us(); left > 0; left = t - dm_ctl_mono_us()) {
        dm_ctl_sleep_us(d->progress && left > 200000 ? 200000 : left);
        drill_progress(d);
    }
}

/* A drill step through domicile-local; its start and end go to *t0 and *t1. */
static bool step(drill_t *d, const char *what, const char *node, int64_t *t0, int64_t *t1)
{
    const char *args[] = {what, dm_ctl_regions[d->env.target], node, NULL};
    dm_progress_note(d->progress, "domicilectl: drill: %s %s%s%s at %.1f s", what,
                     dm_ctl_regions[d->env.target], node ? " " : "", node ? node : "",
                     (double)(dm_ctl_mono_us() - d->t0_us) / 1e6);
    d->phase = what;
    drill_progress(d);
    *t0 = dm_ctl_mono_us();
    int rc = dm_ctl_drill_local(&d->env, NULL, args);
    *t1 = dm_ctl_mono_us();
    if (rc != 0)
        dm_progress_note(d->progress, "domicilectl: drill: `domicile-local %s %s` failed (exit %d)",
                         what, dm_ctl_regions[d->env.target], rc);
    return rc == 0;
}

/* Gateway drill, before the load: the victim (index and process) and that the region has a
 * gateway left. */
static bool choose_victim(drill_t *d)
{
    int t = d->env.target, n = d->n_gw[t];
    if (n < 2) {
        fprintf(stderr,
                "domicilectl: drill gateway: %s has %d gateway(s) (from %s); it needs two or "
                "more: domicile-local up --replicas %s=2, then gateways start (or --gateway "
                "%s=H:P twice)\n",
                dm_ctl_regions[t], n, d->gw_source, dm_ctl_regions[t], dm_ctl_regions[t]);
        return false;
    }
    if (d->victim < 0)
        d->victim = n - 1;
    if (d->victim >= n) {
        fprintf(stderr, "domicilectl: drill gateway: --victim %d, but %s has %d gateways\n",
                d->victim + 1, dm_ctl_regions[t], n);
        return false;
    }
    if (!d->victim_pid) {
        char *pf = state_pid_file(d, t, gw_num[t][d->victim]);
        d->victim_pid = gateway_pid(pf);
        if (!d->victim_pid)
            fprintf(stderr,
                    "domicilectl: drill gateway: no running domiciled in %s (give --victim-pid)\n",
                    pf);
        free(pf);
        if (!d->victim_pid)
            return false;
    }
    if (!process_alive(d->victim_pid)) {
        fprintf(stderr, "domicilectl: drill gateway: process %ld is not running\n", d->victim_pid);
        return false;
    }
    return true;
}

static void merge_counts(counts_t *t, const counts_t *c)
{
    t->calls += c->calls;
    t->puts_ok += c->puts_ok;
    t->replays += c->replays;
    t->reads_ok += c->reads_ok;
    t->xb_reads_ok += c->xb_reads_ok;
    t->forwarded += c->forwarded;
    t->anomalies += c->anomalies;
    t->errors_after_rec += c->errors_after_rec;
    t->unresolved += c->unresolved;
    t->verified += c->verified;
    t->lost += c->lost;
    t->mismatched += c->mismatched;
    t->unverified += c->unverified;
    t->dup_readback += c->dup_readback;
    t->in_flight += c->in_flight;
    t->in_flight_fwd += c->in_flight_fwd;
    t->fail_in_flight += c->fail_in_flight;
    t->fail_after += c->fail_after;
    t->fail_unseen += c->fail_unseen;
    t->fail_before += c->fail_before;
    t->fail_fwd += c->fail_fwd;
    t->ok_after += c->ok_after;
    t->ok_after_fwd += c->ok_after_fwd;
    for (int k = 0; k < DM_CTL_N_CODES; k++) {
        t->err[k] += c->err[k];
        if (!t->sample[k] && c->sample[k])
            t->sample[k] = dm_strdup(c->sample[k]);
    }
    for (int i = 0; i < c->n_fails && t->n_fails < MAX_FAILS; i++)
        t->fails[t->n_fails++] = c->fails[i];
    lat_merge(&t->put_lat, &c->put_lat);
    lat_merge(&t->get_lat, &c->get_lat);
}

static int cmp_fail(const void *a, const void *b)
{
    const fail_t *x = a, *y = b;
    return (x->started > y->started) - (x->started < y->started);
}

static int drill_run(drill_t *d)
{
    bool gw_mode = d->mode == MODE_GATEWAY;
    const char *mode_name = gw_mode ? "gateway" : "failover";
    region_state_t all[DM_CTL_N_REGIONS], before, after;
    if (!regions_state(d, all))
        return 2;
    before = all[d->env.target];
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        const region_state_t *s = &all[r];
        if (!s->healthy) {
            fprintf(stderr,
                    "domicilectl: drill: region %s is not healthy (primary \"%s\", standby "
                    "\"%s\"): run domicile-local start %s, or rejoin %s\n",
                    dm_ctl_regions[r], s->primary, s->repl, dm_ctl_regions[r], dm_ctl_regions[r]);
            return 2;
        }
    }
    if (gw_mode && !choose_victim(d))
        return 2;
    /* Every gateway sees every region serving before the load: a gateway learns a peer
     * region's state from its health checks, so one just started may not yet. */
    for (int g = 0; g < DM_CTL_N_REGIONS; g++)
        for (int k = 0; k < d->n_gw[g]; k++)
            for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
                char service[64];
                snprintf(service, sizeof(service), "domicile.region.%s", dm_ctl_regions[r]);
                if (!wait_serving(d, d->gw[g][k], service, SERVE_WAIT_MS)) {
                    fprintf(stderr,
                            "domicilectl: drill: the %s gateway %s does not see %s serving\n",
                            dm_ctl_regions[g], d->gw[g][k], dm_ctl_regions[r]);
                    return 2;
                }
            }
    if (!register_customers(d))
        return 2;

    /* From here to the report, on a terminal: a progress line under the step messages. */
    d->phase = "load";
    d->progress = dm_progress_start("drill", DM_PROGRESS_TICK);
    if (gw_mode)
        dm_progress_note(d->progress,
                         "domicilectl: drill: run %s, %d clients per region, %.0f s, %s gateway "
                         "%d of %d (%s, pid %ld) to be killed",
                         d->run_id, d->clients, (double)d->duration_ms / 1000,
                         dm_ctl_regions[d->env.target], d->victim + 1, d->n_gw[d->env.target],
                         d->gw[d->env.target][d->victim], d->victim_pid);
    else
        dm_progress_note(d->progress,
                         "domicilectl: drill: run %s, %d clients per region, %.0f s, primary of "
                         "%s: %s",
                         d->run_id, d->clients, (double)d->duration_ms / 1000,
                         dm_ctl_regions[d->env.target], before.primary);
    d->n_workers = d->clients * DM_CTL_N_REGIONS;
    d->workers = dm_calloc((size_t)d->n_workers, sizeof(worker_t));
    d->t0_us = dm_ctl_mono_us();
    for (int i = 0; i < d->n_workers; i++) {
        worker_t *w = &d->workers[i];
        w->d = d;
        w->region = i % DM_CTL_N_REGIONS;
        w->idx = i / DM_CTL_N_REGIONS;
        w->rng = (uint64_t)d->t0_us * 2654435761u + (uint64_t)i * 0x9e3779b97f4a7c15ULL;
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            fprintf(stderr, "domicilectl: drill: cannot start a thread\n");
            abort();
        }
    }

    int64_t t_kill0 = 0, t_kill1 = 0, t_prom0 = 0, t_prom1 = 0, t_rej0 = 0, t_rej1 = 0;
    bool steps_ok;
    main_wait_until(d, d->t0_us + d->duration_ms * 1000 / 3);
    if (gw_mode) {
        dm_progress_note(d->progress,
                         "domicilectl: drill: kill -9 of %s gateway %d (pid %ld) at %.1f s",
                         dm_ctl_regions[d->env.target], d->victim + 1, d->victim_pid,
                         (double)(dm_ctl_mono_us() - d->t0_us) / 1e6);
        d->phase = "kill";
        t_kill0 = dm_ctl_mono_us();
        atomic_store(&d->kill_start_us, t_kill0);
        steps_ok = kill_gateway(d, d->victim_pid);
        t_kill1 = dm_ctl_mono_us();
        atomic_store(&d->kill_end_us, t_kill1);
    } else {
        steps_ok = step(d, "kill", before.primary, &t_kill0, &t_kill1);
        atomic_store(&d->kill_start_us, t_kill0);
        atomic_store(&d->kill_end_us, t_kill1);
        steps_ok = steps_ok && step(d, "promote", NULL, &t_prom0, &t_prom1);
        steps_ok = steps_ok && step(d, "rejoin", NULL, &t_rej0, &t_rej1);
    }
    int64_t end = d->t0_us + d->duration_ms * 1000;
    if (t_rej1 && t_rej1 + TAIL_AFTER_MS * 1000 > end)
        end = t_rej1 + TAIL_AFTER_MS * 1000;
    if (t_kill1 && t_kill1 + TAIL_AFTER_MS * 1000 > end)
        end = t_kill1 + TAIL_AFTER_MS * 1000;
    d->phase = "load after the kill";
    main_wait_until(d, end);
    int64_t load_end = dm_ctl_mono_us();
    d->load_end_us = load_end;
    atomic_store(&d->stop, true);
    dm_progress_note(d->progress,
                     "domicilectl: drill: load stopped at %.1f s; draining and reading back",
                     (double)(load_end - d->t0_us) / 1e6);
    d->phase = "draining and reading back";
    drill_progress(d);
    for (int i = 0; i < d->n_workers; i++)
        pthread_join(d->workers[i].thread, NULL);

    region_result_t res[DM_CTL_N_REGIONS];
    memset(res, 0, sizeof(res));
    for (int i = 0; i < d->n_workers; i++)
        merge_counts(&res[d->workers[i].region].c, &d->workers[i].c);
    d->phase = "checking the regions";
    drill_progress(d);
    check_regions(d, res);
    bool after_ok = regions_state(d, all);
    after = all[d->env.target];

    /* Gateway drill: the survivors serve the region, and every other region's gateways see it
     * serving through them. */
    bool survivors_serving = true;
    if (gw_mode) {
        char service[64];
        snprintf(service, sizeof(service), "domicile.region.%s", dm_ctl_regions[d->env.target]);
        for (int g = 0; g < DM_CTL_N_REGIONS; g++)
            for (int k = 0; k < d->n_gw[g]; k++) {
                if (g == d->env.target && k == d->victim)
                    continue;
                if (!wait_serving(d, d->gw[g][k], service, SERVE_WAIT_MS)) {
                    dm_progress_note(d->progress,
                                     "domicilectl: drill: %s is not SERVING at the %s gateway %s",
                                     service, dm_ctl_regions[g], d->gw[g][k]);
                    survivors_serving = false;
                }
            }
    }

    /* Goals. */
    long lost = 0, dups = 0, misplaced = 0, ledger_missing = 0, other_errors = 0, anomalies = 0;
    long unresolved = 0;
    bool sql_ok = true;
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        counts_t *c = &res[r].c;
        qsort(c->put_lat.v, c->put_lat.n, sizeof(int32_t), cmp_i32);
        qsort(c->get_lat.v, c->get_lat.n, sizeof(int32_t), cmp_i32);
        lost += c->lost + c->mismatched + c->unverified;
        long dr = res[r].duplicates > c->dup_readback ? res[r].duplicates : c->dup_readback;
        dups += dr;
        res[r].duplicates = dr;
        misplaced += res[r].misplaced;
        ledger_missing += res[r].ledger_missing;
        anomalies += c->anomalies;
        unresolved += c->unresolved;
        if (r != d->env.target)
            other_errors += errors_total(c);
        sql_ok = sql_ok && res[r].sql_ok;
    }
    const counts_t *tc = &res[d->env.target].c;
    long long fw = atomic_load(&d->first_write_us);
    double kill_to_write = fw ? (double)(fw - t_kill0) / 1000.0 : -1;
    double promote_to_write = fw && t_prom1 ? (double)(fw - t_prom1) / 1000.0 : -1;
    if (fw && t_prom1 && promote_to_write < 0)
        promote_to_write = 0; /* the gateway wrote through before the promote step returned */
    bool switched = after_ok && before.primary[0] && after.primary[0] &&
                    strcmp(before.primary, after.primary) != 0;
    bool unchanged = after_ok && strcmp(before.primary, after.primary) == 0;
    bool recovered = fw != 0;
    bool goals = lost == 0 && dups == 0 && misplaced == 0 && ledger_missing == 0 &&
                 other_errors == 0 && anomalies == 0 && sql_ok && recovered;
    if (gw_mode)
        goals = goals && tc->fail_after == 0 && tc->fail_before == 0 && tc->fail_fwd == 0 &&
                survivors_serving && tc->ok_after > 0;
    /* A write never acknowledged, even after the drain, leaves its fate open: not a loss, but
     * the region did not fully recover. */
    bool passed =
        goals && steps_ok && after.healthy && unresolved == 0 && (gw_mode ? unchanged : switched);

    /* The gateway drill's failures, in order, relative to the kill. */
    fail_t fails[MAX_FAILS * 4];
    int n_fails = 0;
    for (int i = 0; i < d->n_workers && gw_mode; i++)
        for (int k = 0; k < d->workers[i].c.n_fails && n_fails < (int)DM_ARRAY_LEN(fails); k++)
            fails[n_fails++] = d->workers[i].c.fails[k];
    qsort(fails, (size_t)n_fails, sizeof(fail_t), cmp_fail);

    /* JSON. */
    json_t *j = json_object();
    json_object_set_new(j, "drill", json_string(mode_name));
    json_object_set_new(j, "region", json_string(dm_ctl_regions[d->env.target]));
    json_object_set_new(j, "run_id", json_string(d->run_id));
    json_object_set_new(j, "passed", json_boolean(passed));
    json_object_set_new(j, "duration_ms", json_integer(d->duration_ms));
    json_object_set_new(j, "load_ms", json_real(ms_since(d->t0_us, load_end)));
    json_object_set_new(j, "clients_per_region", json_integer(d->clients));
    json_object_set_new(j, "rate_per_client", json_real(d->env.rate));
    json_object_set_new(j, "call_timeout_ms", json_integer(d->env.call_ms));
    json_object_set_new(j, "gateways", gateways_json(d));
    json_object_set_new(j, "gateways_from", json_string(d->gw_source));
    json_object_set_new(j, "primary_before", json_string(before.primary));
    json_object_set_new(j, "primary_after", json_string(after.primary));
    json_object_set_new(j, "replication_after", json_string(after.repl));
    json_object_set_new(j, "steps_ok", json_boolean(steps_ok));
    json_t *steps = json_object();
    json_object_set_new(steps, "kill_at_ms", json_real(ms_since(d->t0_us, t_kill0)));
    json_object_set_new(steps, "kill_ms", json_real(t_kill1 ? ms_since(t_kill0, t_kill1) : -1));
    if (!gw_mode) {
        json_object_set_new(steps, "promote_at_ms", json_real(ms_since(d->t0_us, t_prom0)));
        json_object_set_new(steps, "promote_ms",
                            json_real(t_prom1 ? ms_since(t_prom0, t_prom1) : -1));
        json_object_set_new(steps, "rejoin_at_ms", json_real(ms_since(d->t0_us, t_rej0)));
        json_object_set_new(steps, "rejoin_ms", json_real(t_rej1 ? ms_since(t_rej0, t_rej1) : -1));
    }
    json_object_set_new(steps, "first_write_at_ms", json_real(fw ? ms_since(d->t0_us, fw) : -1));
    json_object_set_new(j, "steps", steps);
    json_object_set_new(j, "kill_to_first_write_ms", json_real(kill_to_write));
    if (!gw_mode)
        json_object_set_new(j, "promote_to_first_write_ms", json_real(promote_to_write));
    if (gw_mode) {
        json_t *v = json_object();
        json_object_set_new(v, "index", json_integer(d->victim + 1));
        json_object_set_new(v, "address", json_string(d->gw[d->env.target][d->victim]));
        json_object_set_new(v, "pid", json_integer(d->victim_pid));
        json_object_set_new(j, "victim", v);
        json_object_set_new(j, "calls_in_flight_at_kill", json_integer(tc->in_flight));
        json_object_set_new(j, "forwarded_in_flight_at_kill", json_integer(tc->in_flight_fwd));
        json_object_set_new(j, "failed_in_flight", json_integer(tc->fail_in_flight));
        json_object_set_new(j, "failed_first_call_after_kill", json_integer(tc->fail_unseen));
        json_object_set_new(j, "failed_after_kill", json_integer(tc->fail_after));
        json_object_set_new(j, "failed_before_kill", json_integer(tc->fail_before));
        json_object_set_new(j, "forwarded_errors", json_integer(tc->fail_fwd));
        json_object_set_new(j, "calls_after_kill_ok", json_integer(tc->ok_after));
        json_object_set_new(j, "forwarded_after_kill_ok", json_integer(tc->ok_after_fwd));
        json_object_set_new(j, "survivors_serving", json_boolean(survivors_serving));
        json_t *fa = json_array();
        for (int i = 0; i < n_fails; i++) {
            const fail_t *f = &fails[i];
            json_t *o = json_object();
            json_object_set_new(o, "start_ms", json_real((double)(f->started - t_kill0) / 1000.0));
            json_object_set_new(o, "end_ms", json_real((double)(f->ended - t_kill0) / 1000.0));
            json_object_set_new(o, "method", json_string(f->method));
            json_object_set_new(o, "code", json_string(dm_status_code_name(f->code)));
            json_object_set_new(o, "at",
                                json_string(f->at_target ? "drilled region's gateways"
                                                         : "another region's gateway"));
            json_object_set_new(o, "window",
                                json_string(f->started < t_kill1 && f->ended >= t_kill0
                                                ? "in flight"
                                            : f->unseen ? "first call of its client after the kill"
                                            : f->started >= t_kill1 ? "after the kill"
                                                                    : "before the kill"));
            json_object_set_new(o, "message", json_string(f->message));
            json_array_append_new(fa, o);
        }
        json_object_set_new(j, "failures", fa);
    }
    json_t *regions = json_array();
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        const counts_t *c = &res[r].c;
        json_t *o = json_object();
        json_object_set_new(o, "region", json_string(dm_ctl_regions[r]));
        json_object_set_new(o, "drilled", json_boolean(r == d->env.target));
        json_object_set_new(o, "customer", json_string(d->customer[r]));
        json_object_set_new(o, "calls", json_integer(c->calls));
        json_object_set_new(o, "forwarded_calls", json_integer(c->forwarded));
        json_object_set_new(o, "writes_acked", json_integer(c->puts_ok));
        json_object_set_new(o, "writes_replayed", json_integer(c->replays));
        json_object_set_new(o, "writes_unresolved", json_integer(c->unresolved));
        json_object_set_new(o, "records_stored", json_integer(res[r].stored));
        json_object_set_new(o, "reads", json_integer(c->reads_ok));
        json_object_set_new(o, "cross_border_reads", json_integer(c->xb_reads_ok));
        json_object_set_new(o, "ledger_cross_border_reads", json_integer(res[r].ledger));
        json_object_set_new(o, "errors", errors_json(c, false));
        json_object_set_new(o, "first_errors", errors_json(c, true));
        json_object_set_new(o, "errors_after_recovery", json_integer(c->errors_after_rec));
        json_object_set_new(o, "read_anomalies", json_integer(c->anomalies));
        json_object_set_new(o, "verified", json_integer(c->verified));
        json_object_set_new(o, "lost", json_integer(c->lost + c->mismatched + c->unverified));
        json_object_set_new(o, "lost_not_found", json_integer(c->lost));
        json_object_set_new(o, "lost_mismatch", json_integer(c->mismatched));
        json_object_set_new(o, "unverified", json_integer(c->unverified));
        json_object_set_new(o, "duplicates", json_integer(res[r].duplicates));
        json_object_set_new(o, "misplaced", json_integer(res[r].misplaced));
        json_object_set_new(o, "ledger_missing", json_integer(res[r].ledger_missing));
        json_object_set_new(o, "write_ms",
                            json_pack("{s:f,s:f,s:f}", "p50", lat_pct(&c->put_lat, 50), "p99",
                                      lat_pct(&c->put_lat, 99), "max", lat_pct(&c->put_lat, 100)));
        json_object_set_new(o, "read_ms",
                            json_pack("{s:f,s:f,s:f}", "p50", lat_pct(&c->get_lat, 50), "p99",
                                      lat_pct(&c->get_lat, 99), "max", lat_pct(&c->get_lat, 100)));
        json_array_append_new(regions, o);
    }
    json_object_set_new(j, "regions", regions);
    json_object_set_new(j, "lost", json_integer(lost));
    json_object_set_new(j, "duplicates", json_integer(dups));
    json_object_set_new(j, "misplaced", json_integer(misplaced));
    json_object_set_new(j, "ledger_missing", json_integer(ledger_missing));
    json_object_set_new(j, "other_region_errors", json_integer(other_errors));
    json_object_set_new(j, "read_anomalies", json_integer(anomalies));
    json_object_set_new(j, "writes_unresolved", json_integer(unresolved));
    json_object_set_new(j, "region_checks_ok", json_boolean(sql_ok));
    json_object_set_new(j, "recovered", json_boolean(recovered));
    json_object_set_new(j, "primary_changed", json_boolean(switched));

    dm_progress_end(d->progress, false);
    d->progress = NULL;
    /* Table: on stdout, unless the JSON goes there (-o json|jsonl, or --json -). */
    bool jsonl = d->out->fmt == DM_OUTPUT_JSONL;
    bool json_stdout = (d->env.json_path && strcmp(d->env.json_path, "-") == 0) || jsonl ||
                       d->out->fmt == DM_OUTPUT_JSON;
    FILE *tf = json_stdout ? stderr : stdout;
    fprintf(tf, "%s drill of %s, run %s: %s\n", mode_name, dm_ctl_regions[d->env.target], d->run_id,
            passed ? "PASSED" : "FAILED");
    fprintf(tf, "  gateways (%s):", d->gw_source);
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        fprintf(tf, " %s", dm_ctl_regions[r]);
        for (int k = 0; k < d->n_gw[r]; k++)
            fprintf(tf, "%c%s", k ? ',' : '=', d->gw[r][k]);
    }
    fputc('\n', tf);
    if (gw_mode) {
        fprintf(tf,
                "  killed %s gateway %d of %d (%s, pid %ld) at %.1f s, dead after %.0f ms; primary "
                "%s -> %s (standby %s)\n",
                dm_ctl_regions[d->env.target], d->victim + 1, d->n_gw[d->env.target],
                d->gw[d->env.target][d->victim], d->victim_pid,
                ms_since(d->t0_us, t_kill0) / 1000.0, t_kill1 ? ms_since(t_kill0, t_kill1) : -1,
                before.primary, after.primary[0] ? after.primary : "?",
                after.repl[0] ? after.repl : "?");
        fprintf(tf,
                "  at the %s gateways: %ld calls in flight at the kill, %ld of them failed; %ld "
                "failed as their client's first call after the kill; later calls failed %ld "
                "(before the kill %ld); succeeded after the kill %ld\n",
                dm_ctl_regions[d->env.target], tc->in_flight, tc->fail_in_flight, tc->fail_unseen,
                tc->fail_after, tc->fail_before, tc->ok_after);
        fprintf(tf,
                "  forwarded by the other regions' gateways: %ld in flight at the kill, %ld "
                "failed, %ld succeeded after it; survivors serving: %s\n",
                tc->in_flight_fwd, tc->fail_fwd, tc->ok_after_fwd,
                survivors_serving ? "yes" : "NO");
        for (int i = 0; i < n_fails; i++) {
            const fail_t *f = &fails[i];
            fprintf(tf,
                    "    %s %s at the %s, started %+.1f ms, ended %+.1f ms from the kill%s: %s\n",
                    f->method, dm_status_code_name(f->code),
                    f->at_target ? "drilled region's gateways" : "another region's gateway",
                    (double)(f->started - t_kill0) / 1000.0, (double)(f->ended - t_kill0) / 1000.0,
                    f->started < t_kill1 && f->ended >= t_kill0 ? " (in flight)"
                    : f->unseen                                 ? " (its client's first call after)"
                                                                : "",
                    f->message);
        }
        fprintf(tf, "  first write after the kill: %.0f ms\n", kill_to_write);
    } else {
        fprintf(tf,
                "  primary %s -> %s (standby %s); kill %.0f ms, promote %.0f ms, rejoin %.0f ms\n",
                before.primary, after.primary[0] ? after.primary : "?",
                after.repl[0] ? after.repl : "?", t_kill1 ? ms_since(t_kill0, t_kill1) : -1,
                t_prom1 ? ms_since(t_prom0, t_prom1) : -1, t_rej1 ? ms_since(t_rej0, t_rej1) : -1);
        fprintf(tf, "  first write after the kill: %.0f ms; after the promotion: %.0f ms\n",
                kill_to_write, promote_to_write);
    }
    fprintf(tf, "  %-6s %7s %7s %8s %7s %7s %5s %4s %9s %8s %8s %8s  %s\n", "REGION", "WRITES",
            "READS", "XB-READS", "LEDGER", "FWD", "LOST", "DUP", "MISPLACED", "LEDG-MISS",
            "W-P50ms", "W-P99ms", "ERRORS");
    for (int r = 0; r < DM_CTL_N_REGIONS; r++) {
        const counts_t *c = &res[r].c;
        char errs[256], label[8];
        errors_text(c, errs, sizeof(errs));
        snprintf(label, sizeof(label), "%s%s", dm_ctl_regions[r], r == d->env.target ? "*" : "");
        fprintf(tf, "  %-6s %7ld %7ld %8ld %7ld %7ld %5ld %4ld %9ld %8ld %8.1f %8.1f  %s\n", label,
                c->puts_ok, c->reads_ok, c->xb_reads_ok, res[r].ledger, c->forwarded,
                c->lost + c->mismatched + c->unverified, res[r].duplicates, res[r].misplaced,
                res[r].ledger_missing, lat_pct(&c->put_lat, 50), lat_pct(&c->put_lat, 99), errs);
    }
    fprintf(tf,
            "  goals: lost %ld, duplicates %ld, misplaced %ld, ledger_missing %ld, "
            "other_region_errors %ld, read_anomalies %ld",
            lost, dups, misplaced, ledger_missing, other_errors, anomalies);
    if (gw_mode)
        fprintf(tf, ", failed_after_kill %ld, forwarded_errors %ld", tc->fail_after, tc->fail_fwd);
    fprintf(tf, "; writes never acknowledged %ld\n", unresolved);
    if (gw_mode && strcmp(d->gw_source, "state") == 0)
        fprintf(tf, "  restart the killed gateway: domicile-local --state %s gateways start\n",
                d->env.state);

    int rc = 0;
    size_t flags = JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9);
    if (json_stdout) {
        char *text = json_dumps(j, flags | (jsonl ? JSON_COMPACT : JSON_INDENT(2)));
        if (printf("%s\n", text) < 0 || fflush(stdout) != 0) {
            fprintf(stderr, "domicilectl: cannot write the output: %s\n", strerror(errno));
            rc = DM_EXIT_FAILURE;
        }
        free(text);
    }
    if (d->env.json_path && strcmp(d->env.json_path, "-") != 0) {
        char *text = json_dumps(j, flags | JSON_INDENT(2));
        FILE *f = fopen(d->env.json_path, "w");
        if (!f || fprintf(f, "%s\n", text) < 0 || fclose(f) != 0) {
            fprintf(stderr, "domicilectl: cannot write %s\n", d->env.json_path);
            rc = DM_EXIT_FAILURE;
        }
        free(text);
    }
    json_decref(j);
    for (int r = 0; r < DM_CTL_N_REGIONS; r++)
        counts_free(&res[r].c);
    if (rc)
        return rc;
    if (!steps_ok)
        return 3;
    return passed ? 0 : 1;
}

int dm_ctl_drill(const dm_ctl_output_t *out, const char *addr, const char *cacert, const char *cert,
                 const char *key, int timeout_ms, int argc, char **argv)
{
    if (argc >= 1 && (strcmp(argv[0], "--help") == 0 || strcmp(argv[0], "-h") == 0)) {
        drill_usage(stdout);
        return 0;
    }
    if (argc >= 1 && strcmp(argv[0], "restore") == 0)
        return dm_ctl_drill_restore(addr, cacert, cert, key, timeout_ms, argc, argv);
    if (argc < 1 || (strcmp(argv[0], "failover") != 0 && strcmp(argv[0], "gateway") != 0)) {
        drill_usage(stderr);
        return 2;
    }
    drill_t *d = dm_calloc(1, sizeof(*d));
    d->mode = strcmp(argv[0], "gateway") == 0 ? MODE_GATEWAY : MODE_FAILOVER;
    d->out = out;
    d->addr = addr;
    dm_ctl_drill_env_init(&d->env, timeout_ms > 0 ? timeout_ms : 2000, 20);
    d->duration_ms = 30000;
    d->clients = 2;
    int rc = parse_args(d, argc, argv);
    if (rc)
        goto out;
    rc = 2;
    if (!dm_ctl_drill_find_local(&d->env))
        goto out;
    if (!dm_ctl_drill_read_tls(&d->env, "drill", cacert, cert, key))
        goto out;
    if (!load_tokens(d) || !discover_gateways(d))
        goto out;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char stamp[32];
    strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%S", &tm);
    snprintf(d->run_id, sizeof(d->run_id), "drill-%s-%d-%04lx", stamp, (int)getpid(),
             (unsigned long)(ts.tv_nsec / 1000) & 0xffff);
    for (int i = 0; i < DM_CTL_N_REGIONS; i++)
        snprintf(d->customer[i], sizeof(d->customer[i]), "%s-%s", d->run_id, dm_ctl_regions[i]);
    rc = drill_run(d);
out:
    if (d->workers) {
        for (int i = 0; i < d->n_workers; i++) {
            wlist_free(&d->workers[i].acked);
            wlist_free(&d->workers[i].pending);
            counts_free(&d->workers[i].c);
        }
        free(d->workers);
    }
    for (int r = 0; r < DM_CTL_N_REGIONS; r++)
        for (int k = 0; k < d->n_gw[r]; k++)
            free(d->gw[r][k]);
    dm_ctl_drill_env_dispose(&d->env);
    for (int i = 0; i < DM_CTL_N_REGIONS; i++) {
        if (d->token_service[i])
            OPENSSL_cleanse(d->token_service[i], strlen(d->token_service[i]));
        free(d->token_service[i]);
    }
    free(d);
    return rc < 0 ? 0 : rc;
}
