/*
 * domicilectl drill failover: a region failover drill against the deploy/local regions
 * (DESIGN.md §7, issue 7). Under a mixed load on every region it SIGKILLs one region's
 * primary, promotes its standby, rejoins the old primary as the new standby (all through
 * deploy/local/domicile-local), then proves that nothing was lost, written twice, misplaced
 * or left out of the transfer ledger, and that the other regions saw no error.
 *
 * Threads: `clients` load workers per region, each with its own dm_client per principal; the
 * main thread runs the drill steps. Workers share only atomics with the main thread until
 * they are joined; everything else a worker owns.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/crypto.h>

#include "domicile/client.h"
#include "domicile/v1/customers.pb-c.h"
#include "domicile/v1/records.pb-c.h"

extern char **environ;

/* Entry point, called by domicilectl's main (src/cli/domicilectl.c). */
int dm_ctl_drill(const char *addr, const char *cacert, const char *cert, const char *key,
                 int timeout_ms, int argc, char **argv);

#define PATH_REGISTER "/domicile.v1.CustomersService/RegisterCustomer"
#define PATH_PUT      "/domicile.v1.RecordsService/PutRecord"
#define PATH_GET      "/domicile.v1.RecordsService/GetRecord"

#define N_REGIONS      3
#define N_CODES        17     /* gRPC status codes 0..16 */
#define DRAIN_MS       30000  /* retrying unacknowledged writes after the load */
#define VERIFY_MS      90000  /* reading every acknowledged write back, per worker */
#define RETRY_PAUSE_US 200000 /* between retries of a region that does not answer */
#define TAIL_AFTER_MS  2000   /* load kept running after the rejoin at least this long */
#define STATE_DEFAULT  "/var/lib/domicile-local"

/* The deploy/local regions and demo principals (domicile-local's DEMO_PRINCIPALS). */
static const char *const region_codes[N_REGIONS] = {"us", "eu", "in"};
/* admin is in us: its reads of eu and in records are cross-border, so are its writes. */
#define ADMIN_REGION 0
/* A second reader per region from another region, for cross-border reads on every route. */
static const int xb_region_of[N_REGIONS] = {2, 2, 1};
static const char *const service_of[N_REGIONS] = {"service-us", "service-eu", "service-in"};

/* ------------------------------------------------------------------------------------------
 * small helpers */

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void sleep_us(int64_t us)
{
    if (us <= 0)
        return;
    struct timespec ts = {(time_t)(us / 1000000), (long)(us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static uint64_t rng_next(uint64_t *s)
{
    /* splitmix64: enough for picking operations and payload bytes */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Reads a whole file; NULL (errno set) if it cannot. Caller frees. */
static char *read_file(const char *path, bool strip)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0, r;
    char *buf = dm_malloc(cap);
    while ((r = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += r;
        if (n + 1 >= cap)
            buf = dm_realloc(buf, cap *= 2);
    }
    fclose(f);
    buf[n] = '\0';
    while (strip && n && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
        buf[--n] = '\0';
    return buf;
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

/* Counts of one worker, later of one region. */
typedef struct {
    long calls, puts_ok, replays, reads_ok, xb_reads_ok;
    long anomalies;        /* an acknowledged record read back missing or different */
    long err[N_CODES];     /* non-OK statuses of the load (and the drain), by code */
    long errors_after_rec; /* of those, in calls started after the first recovered write */
    long unresolved;       /* writes never acknowledged, not even by the drain */
    char *sample[N_CODES]; /* the first error message of each code, owned */
    long verified, lost, mismatched, unverified, dup_readback;
    lat_t put_lat, get_lat;
} counts_t;

struct drill;

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
    const char *addr;
    char *ca_pem, *cert_pem, *key_pem; /* owned; NULL for plaintext */
    int call_ms;
    int target; /* drilled region */
    int64_t duration_ms;
    int clients;
    double rate;
    const char *state, *json_path;
    char *local; /* domicile-local, owned */
    char *token_admin, *token_service[N_REGIONS];
    char run_id[64];
    char customer[N_REGIONS][96];

    atomic_bool stop;
    atomic_llong kill_end_us;    /* 0 until the kill step returned */
    atomic_llong first_write_us; /* end of the first OK write started after kill_end_us */
    int64_t t0_us;

    worker_t *workers; /* clients * N_REGIONS, owned */
    int n_workers;
} drill_t;

static dm_client_t *drill_client(const drill_t *d, const char *token)
{
    dm_client_t *c = d->ca_pem ? dm_client_create_tls(d->addr, d->ca_pem, d->cert_pem, d->key_pem)
                               : dm_client_create(d->addr);
    char *h = dm_sprintf("Bearer %s", token);
    dm_client_add_metadata(c, "authorization", h);
    free(h);
    return c;
}

static bool retryable(grpc_status_code code)
{
    switch (code) {
    case GRPC_STATUS_UNAVAILABLE:
    case GRPC_STATUS_DEADLINE_EXCEEDED:
    case GRPC_STATUS_ABORTED:
    case GRPC_STATUS_RESOURCE_EXHAUSTED:
    case GRPC_STATUS_CANCELLED:
    case GRPC_STATUS_UNKNOWN:
    case GRPC_STATUS_INTERNAL:
        return true;
    default:
        return false;
    }
}

/* ------------------------------------------------------------------------------------------
 * the load */

static void count_error(worker_t *w, const dm_status_t *st, const char *method, int64_t started)
{
    int k = (int)st->code >= 0 && (int)st->code < N_CODES ? (int)st->code : GRPC_STATUS_UNKNOWN;
    w->c.err[k]++;
    if (!w->c.sample[k])
        w->c.sample[k] = dm_sprintf("%s at %.1f s: %s", method,
                                    (double)(started - w->d->t0_us) / 1e6, st->message);
    long long rec = atomic_load(&w->d->first_write_us);
    if (w->region == w->d->target && rec && started > rec)
        w->c.errors_after_rec++;
}

/* One PutRecord attempt of `x`. Returns the status code; *replayed set on OK. (Versions are
 * checked where they are stored, after the load: check_regions.) */
static grpc_status_code put_once(worker_t *w, dm_client_t *cl, const dwrite_t *x, bool *replayed,
                                 int64_t *started)
{
    drill_t *d = w->d;
    Domicile__V1__PutRecordRequest r = DOMICILE__V1__PUT_RECORD_REQUEST__INIT;
    r.request_id = x->request_id;
    r.customer_id = d->customer[w->region];
    r.record_id = x->record_id;
    r.kind = "drill";
    r.payload.data = x->payload;
    r.payload.len = x->len;
    r.content_type = "application/octet-stream";
    ProtobufCMessage *resp = NULL;
    *started = now_us();
    dm_status_t *st = dm_client_unary(
        cl, PATH_PUT, &r.base, &domicile__v1__put_record_response__descriptor, d->call_ms, &resp);
    if (st) {
        grpc_status_code code = st->code;
        count_error(w, st, "PutRecord", *started);
        dm_status_free(st);
        return code;
    }
    Domicile__V1__PutRecordResponse *pr = (Domicile__V1__PutRecordResponse *)resp;
    *replayed = pr->replayed;
    protobuf_c_message_free_unpacked(resp, NULL);
    return GRPC_STATUS_OK;
}

/* Tries the write once. Acknowledged: moved into w->acked (true). Otherwise the caller keeps
 * it for a retry if the status is retryable, or frees it. */
static bool try_write(worker_t *w, dm_client_t *cl, dwrite_t *x, grpc_status_code *code_out)
{
    drill_t *d = w->d;
    bool replayed = false;
    int64_t started;
    w->c.calls++;
    grpc_status_code code = put_once(w, cl, x, &replayed, &started);
    *code_out = code;
    if (code != GRPC_STATUS_OK)
        return false;
    int64_t done = now_us();
    lat_add(&w->c.put_lat, done - started);
    w->c.puts_ok++;
    if (replayed)
        w->c.replays++;
    long long ke = atomic_load(&d->kill_end_us);
    if (w->region == d->target && ke && started >= ke) {
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
        dm_sprintf("%s-%s-w%d-%ld", w->d->run_id, region_codes[w->region], w->idx, w->seq);
    x.len = 32 + rng_next(&w->rng) % 480;
    x.payload = dm_malloc(x.len);
    for (size_t i = 0; i < x.len; i++)
        x.payload[i] = (uint8_t)rng_next(&w->rng);
    return x;
}

static void write_new(worker_t *w, dm_client_t *cl)
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
static bool write_retry(worker_t *w, dm_client_t *cl)
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

/* GetRecord of one of this worker's acknowledged records as `principal_region`. */
static void read_one(worker_t *w, dm_client_t *cl, int principal_region)
{
    drill_t *d = w->d;
    const dwrite_t *x = &w->acked.v[rng_next(&w->rng) % w->acked.n];
    Domicile__V1__GetRecordRequest r = DOMICILE__V1__GET_RECORD_REQUEST__INIT;
    r.customer_id = d->customer[w->region];
    r.record_id = x->record_id;
    ProtobufCMessage *resp = NULL;
    w->c.calls++;
    int64_t started = now_us();
    dm_status_t *st = dm_client_unary(
        cl, PATH_GET, &r.base, &domicile__v1__get_record_response__descriptor, d->call_ms, &resp);
    if (st) {
        count_error(w, st, "GetRecord", started);
        if (st->code == GRPC_STATUS_NOT_FOUND)
            w->c.anomalies++;
        dm_status_free(st);
        return;
    }
    lat_add(&w->c.get_lat, now_us() - started);
    const Domicile__V1__Record *rec = ((Domicile__V1__GetRecordResponse *)resp)->record;
    if (!rec || rec->payload.len != x->len || memcmp(rec->payload.data, x->payload, x->len) != 0)
        w->c.anomalies++;
    w->c.reads_ok++;
    if (principal_region != w->region)
        w->c.xb_reads_ok++;
    protobuf_c_message_free_unpacked(resp, NULL);
}

/* Reads every acknowledged write back as a principal of the record's own region (no
 * transfer, so the ledger counts stay those of the load). */
static void verify(worker_t *w)
{
    drill_t *d = w->d;
    dm_client_t *cl = drill_client(d, d->token_service[w->region]);
    int64_t deadline = now_us() + (int64_t)VERIFY_MS * 1000;
    for (size_t i = 0; i < w->acked.n; i++) {
        const dwrite_t *x = &w->acked.v[i];
        Domicile__V1__GetRecordRequest r = DOMICILE__V1__GET_RECORD_REQUEST__INIT;
        r.customer_id = d->customer[w->region];
        r.record_id = x->record_id;
        for (;;) {
            if (now_us() > deadline) {
                w->c.unverified++;
                break;
            }
            ProtobufCMessage *resp = NULL;
            dm_status_t *st =
                dm_client_unary(cl, PATH_GET, &r.base,
                                &domicile__v1__get_record_response__descriptor, d->call_ms, &resp);
            if (st && retryable(st->code)) {
                dm_status_free(st);
                sleep_us(RETRY_PAUSE_US);
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
            const Domicile__V1__Record *rec = ((Domicile__V1__GetRecordResponse *)resp)->record;
            if (!rec || rec->payload.len != x->len ||
                memcmp(rec->payload.data, x->payload, x->len) != 0)
                w->c.mismatched++;
            else
                w->c.verified++;
            if (rec && rec->version != 1)
                w->c.dup_readback++;
            protobuf_c_message_free_unpacked(resp, NULL);
            break;
        }
    }
    dm_client_destroy(cl);
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    drill_t *d = w->d;
    dm_client_t *admin = drill_client(d, d->token_admin);
    dm_client_t *xb = drill_client(d, d->token_service[xb_region_of[w->region]]);
    int64_t period = (int64_t)(1e6 / d->rate);
    /* Workers start out of step, so their calls spread over the period. */
    int64_t next = now_us() + (int64_t)(rng_next(&w->rng) % (uint64_t)period);
    while (!atomic_load(&d->stop)) {
        int64_t now = now_us();
        if (next > now)
            sleep_us(next - now);
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
            read_one(w, xb, xb_region_of[w->region]);
    }
    /* Drain: a write that was never acknowledged may still have committed; its retry (same
     * request_id) must then replay, not write again. */
    int64_t deadline = now_us() + (int64_t)DRAIN_MS * 1000;
    while (w->pending.n && now_us() < deadline) {
        if (!write_retry(w, admin))
            sleep_us(RETRY_PAUSE_US);
    }
    w->c.unresolved = (long)w->pending.n;
    dm_client_destroy(admin);
    dm_client_destroy(xb);
    verify(w);
    return NULL;
}

/* ------------------------------------------------------------------------------------------
 * domicile-local */

/* Runs `domicile-local --state STATE args...`; its stderr goes to ours, its stdout into *out
 * (caller frees; may be NULL to discard). Returns the exit status (-1: could not run). */
static int run_local(const drill_t *d, char **out, const char *const *args)
{
    const char *argv[24];
    int n = 0;
    argv[n++] = d->local;
    argv[n++] = "--state";
    argv[n++] = d->state;
    for (int i = 0; args[i] && n < 23; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    if (out)
        *out = NULL;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0)
        return -1;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
    pid_t pid;
    int rc = posix_spawn(&pid, d->local, &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(fds[1]);
    if (rc != 0) {
        close(fds[0]);
        fprintf(stderr, "domicilectl: cannot run %s: %s\n", d->local, strerror(rc));
        return -1;
    }
    size_t cap = 4096, len = 0;
    char *buf = dm_malloc(cap);
    for (;;) {
        if (len + 1 >= cap)
            buf = dm_realloc(buf, cap *= 2);
        ssize_t r = read(fds[0], buf + len, cap - len - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    buf[len] = '\0';
    close(fds[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (out)
        *out = buf;
    else
        free(buf);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* The script next to this build (build/ or build-x/ in the repository), else on PATH. */
static char *find_local(void)
{
    char exe[PATH_MAX], buf[PATH_MAX + 64], real[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash)
            *slash = '\0';
        static const char *const rel[] = {"../deploy/local/domicile-local",
                                          "../../deploy/local/domicile-local", "domicile-local"};
        for (size_t i = 0; i < DM_ARRAY_LEN(rel); i++) {
            snprintf(buf, sizeof(buf), "%s/%s", exe, rel[i]);
            if (realpath(buf, real) && access(real, X_OK) == 0)
                return dm_strdup(real);
        }
    }
    const char *path = getenv("PATH");
    while (path && *path) {
        size_t len = strcspn(path, ":");
        snprintf(buf, sizeof(buf), "%.*s/domicile-local", (int)len, path);
        if (len && access(buf, X_OK) == 0)
            return dm_strdup(buf);
        path += len + (path[len] == ':');
    }
    return NULL;
}

typedef struct {
    char primary[16]; /* node running as primary, "" if none */
    char repl[32];    /* sync_state of the other node on the primary, "" if none */
    bool healthy;     /* both nodes run, the other one is the primary's sync standby */
} region_state_t;

/* Every region's layout, from `domicile-local status --json` (rs: N_REGIONS entries). */
static bool regions_state(const drill_t *d, region_state_t *rs)
{
    memset(rs, 0, N_REGIONS * sizeof(*rs));
    char *out = NULL;
    const char *args[] = {"status", "--json", NULL};
    int rc = run_local(d, &out, args);
    json_error_t jerr;
    json_t *arr = rc == 0 && out ? json_loads(out, 0, &jerr) : NULL;
    free(out);
    if (!json_is_array(arr)) {
        json_decref(arr);
        fprintf(stderr, "domicilectl: drill: cannot read `domicile-local status --json`\n");
        return false;
    }
    int running[N_REGIONS] = {0};
    size_t i;
    json_t *e;
    json_array_foreach(arr, i, e)
    {
        const char *reg = json_string_value(json_object_get(e, "region"));
        const char *node = json_string_value(json_object_get(e, "node"));
        const char *role = json_string_value(json_object_get(e, "role"));
        int r = 0;
        while (r < N_REGIONS && (!reg || strcmp(reg, region_codes[r]) != 0))
            r++;
        if (r == N_REGIONS || !json_is_true(json_object_get(e, "running")) || !node || !role)
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
    for (int r = 0; r < N_REGIONS; r++)
        rs[r].healthy = running[r] == 2 && rs[r].primary[0] && strcmp(rs[r].repl, "sync") == 0;
    return true;
}

/* Runs one SQL query in `region` (psql -At, '|' separated); caller frees. NULL on failure. */
static char *region_sql(const drill_t *d, int region, const char *sql)
{
    char *out = NULL;
    const char *args[] = {"psql", region_codes[region], "-At", "-c", sql, NULL};
    if (run_local(d, &out, args) != 0) {
        free(out);
        return NULL;
    }
    return out;
}

/* ------------------------------------------------------------------------------------------
 * set-up */

static bool register_customers(drill_t *d)
{
    dm_client_t *c = drill_client(d, d->token_admin);
    bool ok = true;
    for (int i = 0; i < N_REGIONS && ok; i++) {
        Domicile__V1__RegisterCustomerRequest r = DOMICILE__V1__REGISTER_CUSTOMER_REQUEST__INIT;
        char *rid = dm_sprintf("%s-register-%s", d->run_id, region_codes[i]);
        r.request_id = rid;
        r.customer_id = d->customer[i];
        r.residency = (char *)region_codes[i];
        r.display_name = "failover drill";
        int64_t deadline = now_us() + 15 * 1000000LL;
        for (;;) {
            ProtobufCMessage *resp = NULL;
            dm_status_t *st = dm_client_unary(c, PATH_REGISTER, &r.base,
                                              &domicile__v1__register_customer_response__descriptor,
                                              d->call_ms, &resp);
            if (!st) {
                protobuf_c_message_free_unpacked(resp, NULL);
                break;
            }
            if (!retryable(st->code) || now_us() > deadline) {
                fprintf(stderr, "domicilectl: drill: cannot register customer %s: %s: %s\n",
                        d->customer[i], dm_status_code_name(st->code), st->message);
                ok = false;
                dm_status_free(st);
                break;
            }
            dm_status_free(st);
            sleep_us(RETRY_PAUSE_US);
        }
        free(rid);
    }
    dm_client_destroy(c);
    return ok;
}

static bool load_tokens(drill_t *d)
{
    char *path = dm_sprintf("%s/secrets/tokens/admin.token", d->state);
    d->token_admin = read_file(path, true);
    bool ok = d->token_admin != NULL;
    if (!ok)
        fprintf(stderr, "domicilectl: drill: cannot read %s: %s\n", path, strerror(errno));
    free(path);
    for (int i = 0; i < N_REGIONS && ok; i++) {
        path = dm_sprintf("%s/secrets/tokens/%s.token", d->state, service_of[i]);
        d->token_service[i] = read_file(path, true);
        if (!d->token_service[i]) {
            fprintf(stderr, "domicilectl: drill: cannot read %s: %s\n", path, strerror(errno));
            ok = false;
        }
        free(path);
    }
    return ok;
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
    for (int r = 0; r < N_REGIONS; r++) {
        char *out = region_sql(d, r, sql);
        res[r].sql_ok = out != NULL;
        if (!out) {
            fprintf(stderr, "domicilectl: drill: cannot query region %s\n", region_codes[r]);
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
    for (int k = 1; k < N_CODES; k++) {
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
    for (int k = 0; k < N_CODES; k++)
        free(c->sample[k]);
}

static long errors_total(const counts_t *c)
{
    long n = 0;
    for (int k = 1; k < N_CODES; k++)
        n += c->err[k];
    return n;
}

static void errors_text(const counts_t *c, char *buf, size_t size)
{
    size_t len = 0;
    buf[0] = '\0';
    for (int k = 1; k < N_CODES && len < size; k++)
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
    fputs("usage: domicilectl [--addr H:P] [--timeout MS] drill failover --region REGION\n"
          "         [--duration 30s] [--state DIR] [--json FILE|-] [--clients N] [--rate N]\n"
          "         [--domicile-local PATH]\n"
          "  Against the deploy/local regions (state DIR, default $DOMICILE_LOCAL_STATE or\n"
          "  " STATE_DEFAULT "): a mixed load on every region (N client threads per region,\n"
          "  default 2, each N calls per second, default 20; call deadline --timeout, default\n"
          "  2000 ms), SIGKILL of REGION's primary at a third of the duration, promotion of its\n"
          "  standby, rejoin of the old primary; then every acknowledged write is read back and\n"
          "  every region checked. Tokens: DIR/secrets/tokens/{admin,service-*}.token.\n"
          "  Exit status: 0 every zero-goal met, 1 a goal missed, 2 usage or the regions are\n"
          "  not healthy before the drill, 3 a drill step (kill, promote, rejoin) failed.\n",
          f);
}

static int parse_args(drill_t *d, int argc, char **argv)
{
    static const struct option opts[] = {
        {"region", required_argument, NULL, 'r'},
        {"duration", required_argument, NULL, 'd'},
        {"state", required_argument, NULL, 's'},
        {"json", required_argument, NULL, 'j'},
        {"clients", required_argument, NULL, 'c'},
        {"rate", required_argument, NULL, 'R'},
        {"domicile-local", required_argument, NULL, 'L'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *region = NULL;
    int opt;
    optind = 0; /* GNU getopt: start over on this sub-argv */
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'r':
            region = optarg;
            break;
        case 'd':
            d->duration_ms = parse_duration(optarg);
            if (d->duration_ms < 3000 || d->duration_ms > 3600000) {
                fprintf(stderr, "domicilectl: --duration must be 3s..1h\n");
                return 2;
            }
            break;
        case 's':
            d->state = optarg;
            break;
        case 'j':
            d->json_path = optarg;
            break;
        case 'c':
            d->clients = atoi(optarg);
            if (d->clients < 1 || d->clients > 32) {
                fprintf(stderr, "domicilectl: --clients must be 1..32\n");
                return 2;
            }
            break;
        case 'R':
            d->rate = atof(optarg);
            if (!(d->rate >= 1 && d->rate <= 1000)) {
                fprintf(stderr, "domicilectl: --rate must be 1..1000 calls per second\n");
                return 2;
            }
            break;
        case 'L':
            free(d->local);
            d->local = dm_strdup(optarg);
            break;
        case 'h':
            drill_usage(stdout);
            return -1;
        default:
            drill_usage(stderr);
            return 2;
        }
    }
    if (optind != argc || !region) {
        drill_usage(stderr);
        return 2;
    }
    d->target = -1;
    for (int i = 0; i < N_REGIONS; i++)
        if (strcmp(region, region_codes[i]) == 0)
            d->target = i;
    if (d->target < 0) {
        fprintf(stderr, "domicilectl: unknown region \"%s\" (us, eu, in)\n", region);
        return 2;
    }
    return 0;
}

static void main_wait_until(int64_t t)
{
    sleep_us(t - now_us());
}

/* A drill step through domicile-local; its start and end go to *t0 and *t1. */
static bool step(const drill_t *d, const char *what, const char *node, int64_t *t0, int64_t *t1)
{
    const char *args[] = {what, region_codes[d->target], node, NULL};
    fprintf(stderr, "domicilectl: drill: %s %s%s%s at %.1f s\n", what, region_codes[d->target],
            node ? " " : "", node ? node : "", (double)(now_us() - d->t0_us) / 1e6);
    *t0 = now_us();
    int rc = run_local(d, NULL, args);
    *t1 = now_us();
    if (rc != 0)
        fprintf(stderr, "domicilectl: drill: `domicile-local %s %s` failed (exit %d)\n", what,
                region_codes[d->target], rc);
    return rc == 0;
}

static int drill_failover(drill_t *d)
{
    region_state_t all[N_REGIONS], before, after;
    if (!regions_state(d, all))
        return 2;
    before = all[d->target];
    for (int r = 0; r < N_REGIONS; r++) {
        const region_state_t *s = &all[r];
        if (!s->healthy) {
            fprintf(stderr,
                    "domicilectl: drill: region %s is not healthy (primary \"%s\", standby "
                    "\"%s\"): run domicile-local start %s, or rejoin %s\n",
                    region_codes[r], s->primary, s->repl, region_codes[r], region_codes[r]);
            return 2;
        }
    }
    if (!register_customers(d))
        return 2;

    fprintf(stderr,
            "domicilectl: drill: run %s, %d clients per region, %.0f s, primary of %s: %s\n",
            d->run_id, d->clients, (double)d->duration_ms / 1000, region_codes[d->target],
            before.primary);
    d->n_workers = d->clients * N_REGIONS;
    d->workers = dm_calloc((size_t)d->n_workers, sizeof(worker_t));
    d->t0_us = now_us();
    for (int i = 0; i < d->n_workers; i++) {
        worker_t *w = &d->workers[i];
        w->d = d;
        w->region = i % N_REGIONS;
        w->idx = i / N_REGIONS;
        w->rng = (uint64_t)d->t0_us * 2654435761u + (uint64_t)i * 0x9e3779b97f4a7c15ULL;
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            fprintf(stderr, "domicilectl: drill: cannot start a thread\n");
            abort();
        }
    }

    int64_t t_kill0 = 0, t_kill1 = 0, t_prom0 = 0, t_prom1 = 0, t_rej0 = 0, t_rej1 = 0;
    bool steps_ok;
    main_wait_until(d->t0_us + d->duration_ms * 1000 / 3);
    steps_ok = step(d, "kill", before.primary, &t_kill0, &t_kill1);
    atomic_store(&d->kill_end_us, t_kill1);
    steps_ok = steps_ok && step(d, "promote", NULL, &t_prom0, &t_prom1);
    steps_ok = steps_ok && step(d, "rejoin", NULL, &t_rej0, &t_rej1);
    int64_t end = d->t0_us + d->duration_ms * 1000;
    if (t_rej1 && t_rej1 + TAIL_AFTER_MS * 1000 > end)
        end = t_rej1 + TAIL_AFTER_MS * 1000;
    main_wait_until(end);
    int64_t load_end = now_us();
    atomic_store(&d->stop, true);
    fprintf(stderr, "domicilectl: drill: load stopped at %.1f s; draining and reading back\n",
            (double)(load_end - d->t0_us) / 1e6);
    for (int i = 0; i < d->n_workers; i++)
        pthread_join(d->workers[i].thread, NULL);

    region_result_t res[N_REGIONS];
    memset(res, 0, sizeof(res));
    for (int i = 0; i < d->n_workers; i++) {
        const counts_t *c = &d->workers[i].c;
        counts_t *t = &res[d->workers[i].region].c;
        t->calls += c->calls;
        t->puts_ok += c->puts_ok;
        t->replays += c->replays;
        t->reads_ok += c->reads_ok;
        t->xb_reads_ok += c->xb_reads_ok;
        t->anomalies += c->anomalies;
        t->errors_after_rec += c->errors_after_rec;
        t->unresolved += c->unresolved;
        t->verified += c->verified;
        t->lost += c->lost;
        t->mismatched += c->mismatched;
        t->unverified += c->unverified;
        t->dup_readback += c->dup_readback;
        for (int k = 0; k < N_CODES; k++) {
            t->err[k] += c->err[k];
            if (!t->sample[k] && c->sample[k])
                t->sample[k] = dm_strdup(c->sample[k]);
        }
        lat_merge(&t->put_lat, &c->put_lat);
        lat_merge(&t->get_lat, &c->get_lat);
    }
    check_regions(d, res);
    bool after_ok = regions_state(d, all);
    after = all[d->target];

    /* Goals. */
    long lost = 0, dups = 0, misplaced = 0, ledger_missing = 0, other_errors = 0, anomalies = 0;
    long unresolved = 0;
    bool sql_ok = true;
    for (int r = 0; r < N_REGIONS; r++) {
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
        if (r != d->target)
            other_errors += errors_total(c);
        sql_ok = sql_ok && res[r].sql_ok;
    }
    long long fw = atomic_load(&d->first_write_us);
    double kill_to_write = fw ? (double)(fw - t_kill0) / 1000.0 : -1;
    double promote_to_write = fw && t_prom1 ? (double)(fw - t_prom1) / 1000.0 : -1;
    if (fw && t_prom1 && promote_to_write < 0)
        promote_to_write = 0; /* the gateway wrote through before the promote step returned */
    bool switched = after_ok && before.primary[0] && after.primary[0] &&
                    strcmp(before.primary, after.primary) != 0;
    bool recovered = fw != 0;
    bool goals = lost == 0 && dups == 0 && misplaced == 0 && ledger_missing == 0 &&
                 other_errors == 0 && anomalies == 0 && sql_ok && recovered;
    /* A write never acknowledged, even after the drain, leaves its fate open: not a loss, but
     * the region did not fully recover. */
    bool passed = goals && steps_ok && switched && after.healthy && unresolved == 0;

    /* JSON. */
    json_t *j = json_object();
    json_object_set_new(j, "drill", json_string("failover"));
    json_object_set_new(j, "region", json_string(region_codes[d->target]));
    json_object_set_new(j, "run_id", json_string(d->run_id));
    json_object_set_new(j, "passed", json_boolean(passed));
    json_object_set_new(j, "duration_ms", json_integer(d->duration_ms));
    json_object_set_new(j, "load_ms", json_real(ms_since(d->t0_us, load_end)));
    json_object_set_new(j, "clients_per_region", json_integer(d->clients));
    json_object_set_new(j, "rate_per_client", json_real(d->rate));
    json_object_set_new(j, "call_timeout_ms", json_integer(d->call_ms));
    json_object_set_new(j, "primary_before", json_string(before.primary));
    json_object_set_new(j, "primary_after", json_string(after.primary));
    json_object_set_new(j, "replication_after", json_string(after.repl));
    json_object_set_new(j, "steps_ok", json_boolean(steps_ok));
    json_t *steps = json_object();
    json_object_set_new(steps, "kill_at_ms", json_real(ms_since(d->t0_us, t_kill0)));
    json_object_set_new(steps, "kill_ms", json_real(t_kill1 ? ms_since(t_kill0, t_kill1) : -1));
    json_object_set_new(steps, "promote_at_ms", json_real(ms_since(d->t0_us, t_prom0)));
    json_object_set_new(steps, "promote_ms", json_real(t_prom1 ? ms_since(t_prom0, t_prom1) : -1));
    json_object_set_new(steps, "rejoin_at_ms", json_real(ms_since(d->t0_us, t_rej0)));
    json_object_set_new(steps, "rejoin_ms", json_real(t_rej1 ? ms_since(t_rej0, t_rej1) : -1));
    json_object_set_new(steps, "first_write_at_ms", json_real(fw ? ms_since(d->t0_us, fw) : -1));
    json_object_set_new(j, "steps", steps);
    json_object_set_new(j, "kill_to_first_write_ms", json_real(kill_to_write));
    json_object_set_new(j, "promote_to_first_write_ms", json_real(promote_to_write));
    json_t *regions = json_array();
    for (int r = 0; r < N_REGIONS; r++) {
        const counts_t *c = &res[r].c;
        json_t *o = json_object();
        json_object_set_new(o, "region", json_string(region_codes[r]));
        json_object_set_new(o, "drilled", json_boolean(r == d->target));
        json_object_set_new(o, "customer", json_string(d->customer[r]));
        json_object_set_new(o, "calls", json_integer(c->calls));
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

    /* Table: on stdout, unless the JSON goes there. */
    bool json_stdout = d->json_path && strcmp(d->json_path, "-") == 0;
    FILE *tf = json_stdout ? stderr : stdout;
    fprintf(tf, "failover drill of %s, run %s: %s\n", region_codes[d->target], d->run_id,
            passed ? "PASSED" : "FAILED");
    fprintf(tf, "  primary %s -> %s (standby %s); kill %.0f ms, promote %.0f ms, rejoin %.0f ms\n",
            before.primary, after.primary[0] ? after.primary : "?",
            after.repl[0] ? after.repl : "?", t_kill1 ? ms_since(t_kill0, t_kill1) : -1,
            t_prom1 ? ms_since(t_prom0, t_prom1) : -1, t_rej1 ? ms_since(t_rej0, t_rej1) : -1);
    fprintf(tf, "  first write after the kill: %.0f ms; after the promotion: %.0f ms\n",
            kill_to_write, promote_to_write);
    fprintf(tf, "  %-6s %7s %7s %8s %7s %5s %4s %9s %8s %8s %8s  %s\n", "REGION", "WRITES", "READS",
            "XB-READS", "LEDGER", "LOST", "DUP", "MISPLACED", "LEDG-MISS", "W-P50ms", "W-P99ms",
            "ERRORS");
    for (int r = 0; r < N_REGIONS; r++) {
        const counts_t *c = &res[r].c;
        char errs[256], label[8];
        errors_text(c, errs, sizeof(errs));
        snprintf(label, sizeof(label), "%s%s", region_codes[r], r == d->target ? "*" : "");
        fprintf(tf, "  %-6s %7ld %7ld %8ld %7ld %5ld %4ld %9ld %8ld %8.1f %8.1f  %s\n", label,
                c->puts_ok, c->reads_ok, c->xb_reads_ok, res[r].ledger,
                c->lost + c->mismatched + c->unverified, res[r].duplicates, res[r].misplaced,
                res[r].ledger_missing, lat_pct(&c->put_lat, 50), lat_pct(&c->put_lat, 99), errs);
    }
    fprintf(tf,
            "  goals: lost %ld, duplicates %ld, misplaced %ld, ledger_missing %ld, "
            "other_region_errors %ld, read_anomalies %ld; writes never acknowledged %ld\n",
            lost, dups, misplaced, ledger_missing, other_errors, anomalies, unresolved);

    int rc = 0;
    if (d->json_path) {
        char *text = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9));
        if (json_stdout) {
            printf("%s\n", text);
        } else {
            FILE *f = fopen(d->json_path, "w");
            if (!f || fprintf(f, "%s\n", text) < 0 || fclose(f) != 0) {
                fprintf(stderr, "domicilectl: cannot write %s\n", d->json_path);
                rc = 2;
            }
        }
        free(text);
    }
    json_decref(j);
    for (int r = 0; r < N_REGIONS; r++)
        counts_free(&res[r].c);
    if (rc)
        return rc;
    if (!steps_ok)
        return 3;
    return passed ? 0 : 1;
}

int dm_ctl_drill(const char *addr, const char *cacert, const char *cert, const char *key,
                 int timeout_ms, int argc, char **argv)
{
    if (argc >= 1 && (strcmp(argv[0], "--help") == 0 || strcmp(argv[0], "-h") == 0)) {
        drill_usage(stdout);
        return 0;
    }
    if (argc < 1 || strcmp(argv[0], "failover") != 0) {
        drill_usage(stderr);
        return 2;
    }
    drill_t *d = dm_calloc(1, sizeof(*d));
    d->addr = addr;
    d->call_ms = timeout_ms > 0 ? timeout_ms : 2000;
    d->duration_ms = 30000;
    d->clients = 2;
    d->rate = 20;
    d->state = getenv("DOMICILE_LOCAL_STATE") ? getenv("DOMICILE_LOCAL_STATE") : STATE_DEFAULT;
    int rc = parse_args(d, argc, argv);
    if (rc)
        goto out;
    rc = 2;
    if (!d->local)
        d->local = find_local();
    if (!d->local || access(d->local, X_OK) != 0) {
        fprintf(stderr, "domicilectl: drill: domicile-local not found (give --domicile-local)\n");
        goto out;
    }
    if (cacert) {
        d->ca_pem = read_file(cacert, false);
        d->cert_pem = cert ? read_file(cert, false) : NULL;
        d->key_pem = key ? read_file(key, false) : NULL;
        if (!d->ca_pem || (cert && !d->cert_pem) || (key && !d->key_pem)) {
            fprintf(stderr, "domicilectl: drill: cannot read the TLS files\n");
            goto out;
        }
    }
    if (!load_tokens(d))
        goto out;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char stamp[32];
    strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%S", &tm);
    snprintf(d->run_id, sizeof(d->run_id), "drill-%s-%d-%04lx", stamp, (int)getpid(),
             (unsigned long)(ts.tv_nsec / 1000) & 0xffff);
    for (int i = 0; i < N_REGIONS; i++)
        snprintf(d->customer[i], sizeof(d->customer[i]), "%s-%s", d->run_id, region_codes[i]);
    rc = drill_failover(d);
out:
    if (d->workers) {
        for (int i = 0; i < d->n_workers; i++) {
            wlist_free(&d->workers[i].acked);
            wlist_free(&d->workers[i].pending);
            counts_free(&d->workers[i].c);
        }
        free(d->workers);
    }
    free(d->local);
    free(d->ca_pem);
    free(d->cert_pem);
    free(d->key_pem);
    if (d->token_admin)
        OPENSSL_cleanse(d->token_admin, strlen(d->token_admin));
    free(d->token_admin);
    for (int i = 0; i < N_REGIONS; i++) {
        if (d->token_service[i])
            OPENSSL_cleanse(d->token_service[i], strlen(d->token_service[i]));
        free(d->token_service[i]);
    }
    free(d);
    return rc < 0 ? 0 : rc;
}
