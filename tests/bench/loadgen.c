/*
 * loadgen: gRPC load on the core C API, plus the same loop over libpq for the direct query.
 * Prints one JSON line: throughput, latency percentiles (from a log-linear histogram,
 * hist.h), errors by status code, CPU time of this process (getrusage).
 *
 *   loadgen --addr H:P --scenario S [--concurrency N | --rate R [--max-inflight M]]
 *           [--duration S] [--warmup S] [--threads T] [--token BEARER_TOKEN]
 *           [--customer ID] [--customers N] [--records K] [--prefix P] [--payload BYTES]
 *           [--page-size N]
 *   loadgen --scenario sql --pq CONNINFO [--purpose P] [--concurrency N] ...
 *   loadgen --addr H:P --scenario idle --connections N
 *   loadgen --print-sql[=NAME]   (the gateway's statement NAME of src/region/sql.c, default
 *                                 get_record, for pgbench)
 *
 * Scenarios (record "<prefix><i>", i in [0, K), customer "<customer>" or, with --customers N,
 * "<customer><i mod N>"):
 *   get     GetRecord of record i (i = a counter mod K)
 *   put     PutRecord of a new record each call (unique request and record id): acknowledged
 *           after the durable commit on the synchronous standby
 *   mixed   9 calls in 10 a get, the 10th a put (by the call counter: exactly 90 % / 10 %)
 *   list    ListRecords, first page of --page-size records (default 100), with payloads
 *   health  Health.Check(""): no database, the gRPC ceiling
 *   fill    PutRecord of records 0 .. K-1 once each, then exit (set-up for get and list)
 *   lookup  GetCustomer of customers "<customer>0" .. "<customer>K-1" once each, then exit
 *           (fills the gateway's directory cache)
 *   customer  GetCustomer of "<customer>" (or of "<customer><i mod N>") in a loop: for a customer
 *           of another region, one forwarded call with no ledger entry (the cost of the hop)
 *   sql     libpq, no gRPC: the gateway's own prepared get_record statement (the same text,
 *           taken from the library), same record ids, same result format
 *   idle    N channels, each on its own TCP connection, one Health call on each; prints a
 *           line once all are established and holds them until stdin is closed
 * A cross-border get is `get` with the token of a principal in another region.
 *
 * Closed loop (default): `--concurrency` calls in flight, each completion starts the next;
 * latency = completion - start. Open loop (`--rate R`): calls start on a fixed schedule of R
 * per second whatever the completions (at most --max-inflight outstanding; a slot missing
 * counts as "dropped"); latency = completion - scheduled start, so a stalled server shows up
 * in the percentiles instead of slowing the load (no coordinated omission).
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <libpq-fe.h>

#include "domicile/sql.h"
#include "domicile/v1/customers.pb-c.h"
#include "domicile/v1/records.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "args.h"
#include "hist.h"

#define N_CODES         17
#define MAX_THREADS     64
#define MAX_CONCURRENCY 100000
#define MAX_CONNECTIONS 100000

typedef enum {
    SC_GET,
    SC_PUT,
    SC_MIXED,
    SC_LIST,
    SC_HEALTH,
    SC_FILL,
    SC_LOOKUP,
    SC_SQL,
    SC_IDLE,
    SC_CUSTOMER,
} scenario_t;

static const char *const scenario_names[] = {
    [SC_GET] = "get",       [SC_PUT] = "put",           [SC_MIXED] = "mixed",   [SC_LIST] = "list",
    [SC_HEALTH] = "health", [SC_FILL] = "fill",         [SC_LOOKUP] = "lookup", [SC_SQL] = "sql",
    [SC_IDLE] = "idle",     [SC_CUSTOMER] = "customer",
};

static struct {
    const char *addr, *customer, *prefix, *token, *pq, *purpose;
    scenario_t sc;
    int concurrency, threads, records, customers, payload, page_size, connections, max_inflight;
    double duration, warmup, rate;
} opt = {
    .addr = "127.0.0.1:50051",
    .customer = "bench",
    .prefix = "r",
    .purpose = "support",
    .sc = SC_HEALTH,
    .concurrency = 8,
    .threads = 1,
    .records = 1000,
    .payload = 100,
    .page_size = 100,
    .connections = 1000,
    .max_inflight = 4096,
    .duration = 10,
    .warmup = 2,
};

static atomic_long seq;
static atomic_int phase;           /* 0 warm-up, 1 measuring, 2 stop */
static unsigned char *put_payload; /* opt.payload bytes of 'p', set once in main */

typedef struct slot {
    struct worker *w;
    grpc_call *call;
    grpc_metadata_array md_in, md_trail;
    grpc_byte_buffer *send, *recv;
    grpc_status_code status;
    grpc_slice details;
    uint64_t t0_ns; /* start (closed loop) or scheduled start (open loop) */
    bool streaming, status_done, msgs_done;
    struct tag {
        struct slot *slot;
        bool msg; /* the stream's RECV_MESSAGE batch, else the call's main batch */
    } tag_call, tag_msg;
    struct slot *next_free;
} slot_t;

typedef struct worker {
    grpc_channel *ch;
    grpc_completion_queue *cq;
    pthread_t thread;
    int n_slots;
    double rate;        /* open loop: calls per second of this worker; 0 = closed loop */
    pthread_mutex_t mu; /* free_list, shared with the pacer in the open loop */
    slot_t *free_list;
    atomic_int live;        /* calls started and not yet accounted */
    atomic_bool pacer_done; /* no more calls will be started */
    long ops, ops_total, errors, dropped;
    long err_by_code[N_CODES];
    dm_hist_t hist;
    grpc_metadata md[1];
    size_t n_md;
    PGconn *pg;
    const char *error; /* fatal set-up error of this worker, or NULL */
} worker_t;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double now_s(void)
{
    return (double)now_ns() / 1e9;
}

static long cpu_us(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return -1;
    return (long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000L + ru.ru_utime.tv_usec +
           ru.ru_stime.tv_usec;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (!p) {
        fprintf(stderr, "loadgen: out of memory\n");
        abort();
    }
    return p;
}

static grpc_byte_buffer *pack(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* The customer of record i. */
static void customer_of(long i, char *buf, size_t size)
{
    if (opt.customers > 0)
        snprintf(buf, size, "%s%ld", opt.customer, i % opt.customers);
    else
        snprintf(buf, size, "%s", opt.customer);
}

typedef enum { OP_GET, OP_PUT, OP_FILL, OP_LIST, OP_HEALTH, OP_LOOKUP, OP_CUSTOMER } op_t;

static op_t op_of(long n)
{
    switch (opt.sc) {
    case SC_GET:
        return OP_GET;
    case SC_PUT:
        return OP_PUT;
    case SC_MIXED:
        return n % 10 == 9 ? OP_PUT : OP_GET;
    case SC_LIST:
        return OP_LIST;
    case SC_FILL:
        return OP_FILL;
    case SC_LOOKUP:
        return OP_LOOKUP;
    case SC_CUSTOMER:
        return OP_CUSTOMER;
    default:
        return OP_HEALTH;
    }
}

static const char *method_of(op_t op)
{
    switch (op) {
    case OP_GET:
        return "/domicile.v1.RecordsService/GetRecord";
    case OP_PUT:
    case OP_FILL:
        return "/domicile.v1.RecordsService/PutRecord";
    case OP_LIST:
        return "/domicile.v1.RecordsService/ListRecords";
    case OP_LOOKUP:
    case OP_CUSTOMER:
        return "/domicile.v1.CustomersService/GetCustomer";
    default:
        return "/grpc.health.v1.Health/Check";
    }
}

static grpc_byte_buffer *make_request(op_t op, long n)
{
    char rid[160], reqid[200], cid[160];
    switch (op) {
    case OP_HEALTH: {
        Grpc__Health__V1__HealthCheckRequest r = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
        return pack(&r.base);
    }
    case OP_LOOKUP: {
        Domicile__V1__GetCustomerRequest r = DOMICILE__V1__GET_CUSTOMER_REQUEST__INIT;
        snprintf(cid, sizeof(cid), "%s%ld", opt.customer, n);
        r.customer_id = cid;
        return pack(&r.base);
    }
    case OP_CUSTOMER: {
        Domicile__V1__GetCustomerRequest r = DOMICILE__V1__GET_CUSTOMER_REQUEST__INIT;
        customer_of(n, cid, sizeof(cid));
        r.customer_id = cid;
        return pack(&r.base);
    }
    case OP_GET: {
        Domicile__V1__GetRecordRequest r = DOMICILE__V1__GET_RECORD_REQUEST__INIT;
        long i = n % opt.records;
        snprintf(rid, sizeof(rid), "%s%ld", opt.prefix, i);
        customer_of(i, cid, sizeof(cid));
        r.customer_id = cid;
        r.record_id = rid;
        return pack(&r.base);
    }
    case OP_LIST: {
        Domicile__V1__ListRecordsRequest r = DOMICILE__V1__LIST_RECORDS_REQUEST__INIT;
        customer_of(n, cid, sizeof(cid));
        r.customer_id = cid;
        r.page_size = opt.page_size;
        r.include_payload = 1;
        return pack(&r.base);
    }
    default:
        break;
    }
    Domicile__V1__PutRecordRequest r = DOMICILE__V1__PUT_RECORD_REQUEST__INIT;
    if (op == OP_FILL) {
        snprintf(rid, sizeof(rid), "%s%ld", opt.prefix, n);
        customer_of(n, cid, sizeof(cid));
    } else {
        snprintf(rid, sizeof(rid), "%sput-%d-%ld", opt.prefix, (int)getpid(), n);
        customer_of(n % opt.records, cid, sizeof(cid));
    }
    snprintf(reqid, sizeof(reqid), "req-%d-%s", (int)getpid(), rid);
    r.request_id = reqid;
    r.customer_id = cid;
    r.record_id = rid;
    r.kind = "bench";
    r.payload.data = put_payload;
    r.payload.len = (size_t)opt.payload;
    return pack(&r.base);
}

static void die(const char *what)
{
    fprintf(stderr, "loadgen: %s\n", what);
    exit(1);
}

static void start_batch(grpc_call *call, const grpc_op *ops, size_t n, void *tag)
{
    if (grpc_call_start_batch(call, ops, n, tag, NULL) != GRPC_CALL_OK)
        die("grpc_call_start_batch failed");
}

static void start_call(slot_t *s, uint64_t t0_ns)
{
    worker_t *w = s->w;
    long n = atomic_fetch_add(&seq, 1);
    op_t op = op_of(n);
    grpc_op ops[6];
    gpr_timespec deadline =
        gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_seconds(30, GPR_TIMESPAN));
    s->call = grpc_channel_create_call(w->ch, NULL, GRPC_PROPAGATE_DEFAULTS, w->cq,
                                       grpc_slice_from_static_string(method_of(op)), NULL, deadline,
                                       NULL);
    if (!s->call)
        die("grpc_channel_create_call failed");
    grpc_metadata_array_init(&s->md_in);
    grpc_metadata_array_init(&s->md_trail);
    s->send = make_request(op, n);
    s->recv = NULL;
    s->details = grpc_empty_slice();
    s->streaming = op == OP_LIST;
    s->status_done = false;
    s->msgs_done = !s->streaming;
    s->t0_ns = t0_ns;
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = w->n_md;
    ops[0].data.send_initial_metadata.metadata = w->md;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = s->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &s->md_in;
    ops[4].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[4].data.recv_status_on_client.trailing_metadata = &s->md_trail;
    ops[4].data.recv_status_on_client.status = &s->status;
    ops[4].data.recv_status_on_client.status_details = &s->details;
    if (s->streaming) {
        start_batch(s->call, ops, 5, &s->tag_call);
        grpc_op rm;
        memset(&rm, 0, sizeof(rm));
        rm.op = GRPC_OP_RECV_MESSAGE;
        rm.data.recv_message.recv_message = &s->recv;
        start_batch(s->call, &rm, 1, &s->tag_msg);
        return;
    }
    ops[5].op = GRPC_OP_RECV_MESSAGE;
    ops[5].data.recv_message.recv_message = &s->recv;
    start_batch(s->call, ops, 6, &s->tag_call);
}

static void end_call(slot_t *s)
{
    grpc_byte_buffer_destroy(s->send);
    if (s->recv)
        grpc_byte_buffer_destroy(s->recv);
    s->recv = NULL;
    grpc_slice_unref(s->details);
    grpc_metadata_array_destroy(&s->md_in);
    grpc_metadata_array_destroy(&s->md_trail);
    grpc_call_unref(s->call);
    s->call = NULL;
}

static bool one_shot(void)
{
    return opt.sc == SC_FILL || opt.sc == SC_LOOKUP;
}

/* One completion event; returns the slot when its call is over, else NULL. */
static slot_t *on_event(void *tag)
{
    struct tag *t = tag;
    slot_t *s = t->slot;
    if (!t->msg) {
        s->status_done = true;
    } else if (s->recv) { /* one more message of the stream: read on */
        grpc_byte_buffer_destroy(s->recv);
        s->recv = NULL;
        grpc_op rm;
        memset(&rm, 0, sizeof(rm));
        rm.op = GRPC_OP_RECV_MESSAGE;
        rm.data.recv_message.recv_message = &s->recv;
        start_batch(s->call, &rm, 1, &s->tag_msg);
        return NULL;
    } else {
        s->msgs_done = true;
    }
    return s->status_done && s->msgs_done ? s : NULL;
}

static void slot_init(slot_t *s, worker_t *w)
{
    s->w = w;
    s->tag_call.slot = s;
    s->tag_msg.slot = s;
    s->tag_msg.msg = true;
}

/* One-shot scenarios stop starting calls once every item has been started. */
static bool may_start(void)
{
    return atomic_load(&phase) != 2 && (!one_shot() || atomic_load(&seq) < opt.records);
}

static void account(worker_t *w, slot_t *s, uint64_t t1_ns)
{
    if (s->status == GRPC_STATUS_OK)
        w->ops_total++;
    int ph = atomic_load(&phase);
    if (ph != 1 && !(ph == 2 && one_shot()))
        return;
    if (s->status == GRPC_STATUS_OK) {
        w->ops++;
        dm_hist_record(&w->hist, t1_ns > s->t0_ns ? (t1_ns - s->t0_ns) / 1000 : 0);
    } else {
        w->errors++;
        if ((int)s->status >= 0 && (int)s->status < N_CODES)
            w->err_by_code[s->status]++;
    }
}

static slot_t *pop_free(worker_t *w)
{
    pthread_mutex_lock(&w->mu);
    slot_t *s = w->free_list;
    if (s)
        w->free_list = s->next_free;
    pthread_mutex_unlock(&w->mu);
    return s;
}

static void push_free(worker_t *w, slot_t *s)
{
    pthread_mutex_lock(&w->mu);
    s->next_free = w->free_list;
    w->free_list = s;
    pthread_mutex_unlock(&w->mu);
}

/*
 * Open loop: starts the calls on schedule. A thread of its own because the completion queue's
 * own deadline wakes up a millisecond late, which the latency (counted from the scheduled
 * start) would report as the server's; clock_nanosleep wakes up within tens of µs.
 */
static void *pacer_main(void *arg)
{
    worker_t *w = arg;
    uint64_t interval_ns = (uint64_t)(1e9 / w->rate);
    uint64_t next_due = now_ns();
    while (atomic_load(&phase) != 2) {
        struct timespec ts = {(time_t)(next_due / 1000000000u), (long)(next_due % 1000000000u)};
        int rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        if (rc != 0 && rc != EINTR)
            die("clock_nanosleep failed");
        uint64_t t = now_ns();
        while (next_due <= t && atomic_load(&phase) != 2) {
            slot_t *s = pop_free(w);
            if (s) {
                atomic_fetch_add(&w->live, 1);
                start_call(s, next_due);
            } else if (atomic_load(&phase) == 1) {
                w->dropped++;
            }
            next_due += interval_ns;
        }
    }
    atomic_store(&w->pacer_done, true);
    return NULL;
}

static void *grpc_worker_main(void *arg)
{
    worker_t *w = arg;
    slot_t *slots = xcalloc((size_t)w->n_slots, sizeof(slot_t));
    for (int i = w->n_slots - 1; i >= 0; i--) {
        slot_init(&slots[i], w);
        push_free(w, &slots[i]);
    }
    pthread_t pacer;
    if (w->rate > 0) {
        if (pthread_create(&pacer, NULL, pacer_main, w) != 0)
            die("pthread_create failed");
    } else {
        atomic_store(&w->pacer_done, true);
        slot_t *s;
        while (may_start() && (s = pop_free(w))) {
            atomic_fetch_add(&w->live, 1);
            start_call(s, now_ns());
        }
    }
    for (;;) {
        bool stopping = atomic_load(&phase) == 2 || (one_shot() && !may_start());
        if (stopping && atomic_load(&w->pacer_done) && atomic_load(&w->live) == 0) {
            if (one_shot())
                atomic_store(&phase, 2);
            break;
        }
        gpr_timespec until = gpr_inf_future(GPR_CLOCK_MONOTONIC);
        if (w->rate > 0 || atomic_load(&w->live) == 0) /* look at `phase` again soon */
            until =
                gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(10, GPR_TIMESPAN));
        grpc_event ev = grpc_completion_queue_next(w->cq, until, NULL);
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        slot_t *s = on_event(ev.tag);
        if (!s)
            continue;
        account(w, s, now_ns());
        end_call(s);
        if (w->rate <= 0 && may_start()) {
            start_call(s, now_ns());
        } else {
            atomic_fetch_sub(&w->live, 1);
            push_free(w, s);
        }
    }
    if (w->rate > 0)
        pthread_join(pacer, NULL);
    free(slots);
    return NULL;
}

/* ---- libpq: the gateway's statement, straight to the region ----------------------------- */

static void *sql_worker_main(void *arg)
{
    worker_t *w = arg;
    const dm_sql_t *q = &dm_sql[DM_SQL_GET_RECORD];
    while (atomic_load(&phase) != 2) {
        long n = atomic_fetch_add(&seq, 1);
        long i = n % opt.records;
        char rid[160], cid[160];
        snprintf(rid, sizeof(rid), "%s%ld", opt.prefix, i);
        customer_of(i, cid, sizeof(cid));
        const char *values[3] = {cid, rid, opt.purpose};
        uint64_t t0 = now_ns();
        /* Same as the gateway: text parameters, binary results. */
        PGresult *res = PQexecPrepared(w->pg, q->name, 3, values, NULL, NULL, 1);
        uint64_t t1 = now_ns();
        bool ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
        if (!ok && PQstatus(w->pg) != CONNECTION_OK) {
            fprintf(stderr, "loadgen: sql: %s", PQerrorMessage(w->pg));
            PQclear(res);
            w->error = "connection lost";
            break;
        }
        PQclear(res);
        slot_t s = {.status = ok ? GRPC_STATUS_OK : GRPC_STATUS_UNKNOWN, .t0_ns = t0};
        account(w, &s, t1);
    }
    return NULL;
}

static bool sql_connect(worker_t *w)
{
    const dm_sql_t *q = &dm_sql[DM_SQL_GET_RECORD];
    w->pg = PQconnectdb(opt.pq);
    if (PQstatus(w->pg) != CONNECTION_OK) {
        fprintf(stderr, "loadgen: cannot connect: %s", PQerrorMessage(w->pg));
        return false;
    }
    PGresult *res = PQprepare(w->pg, q->name, q->text, q->n_params, NULL);
    bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    if (!ok)
        fprintf(stderr, "loadgen: cannot prepare %s: %s", q->name, PQresultErrorMessage(res));
    PQclear(res);
    return ok;
}

/* ---- idle connections ---------------------------------------------------------------- */

static void raise_nofile(rlim_t want)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    if (rl.rlim_cur >= want)
        return;
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want ? want : rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        fprintf(stderr, "loadgen: setrlimit(RLIMIT_NOFILE, %lu): %s\n", (unsigned long)rl.rlim_cur,
                strerror(errno));
}

static int run_idle(grpc_channel_credentials *cr)
{
    int n = opt.connections;
    raise_nofile((rlim_t)n * 2 + 64);
    grpc_arg arg = {.type = GRPC_ARG_INTEGER,
                    .key = (char *)GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL,
                    .value.integer = 1};
    grpc_channel_args args = {.num_args = 1, .args = &arg};
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    grpc_channel **chs = xcalloc((size_t)n, sizeof(*chs));
    slot_t *slots = xcalloc((size_t)n, sizeof(slot_t));
    worker_t w = {0};
    w.cq = cq;
    double t0 = now_s();
    for (int i = 0; i < n; i++) {
        chs[i] = grpc_channel_create(opt.addr, cr, &args);
        w.ch = chs[i];
        slot_init(&slots[i], &w);
        start_call(&slots[i], now_ns());
    }
    int ok = 0, failed = 0;
    for (int done = 0; done < n;) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        slot_t *s = on_event(ev.tag);
        if (!s)
            continue;
        if (s->status == GRPC_STATUS_OK)
            ok++;
        else
            failed++;
        end_call(s);
        done++;
    }
    printf("{\"scenario\":\"idle\",\"connections\":%d,\"ok\":%d,\"errors\":%d,\"secs\":%.3f}\n", n,
           ok, failed, now_s() - t0);
    fflush(stdout);
    for (;;) { /* hold the connections until stdin is closed */
        char buf[256];
        ssize_t r = read(STDIN_FILENO, buf, sizeof(buf));
        if (r == 0 || (r < 0 && errno != EINTR))
            break;
    }
    for (int i = 0; i < n; i++)
        grpc_channel_destroy(chs[i]);
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(cq);
    free(chs);
    free(slots);
    return ok == n ? 0 : 1;
}

/* ---- options ------------------------------------------------------------------------- */

static bool parse_double(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        return false;
    *out = v;
    return true;
}

static bool parse_scenario(const char *s)
{
    for (size_t i = 0; i < sizeof(scenario_names) / sizeof(scenario_names[0]); i++) {
        if (strcmp(s, scenario_names[i]) == 0) {
            opt.sc = (scenario_t)i;
            return true;
        }
    }
    return false;
}

static bool bounded_string(const char *s, size_t max)
{
    return strlen(s) <= max;
}

static void usage(FILE *out)
{
    fputs("usage: loadgen --addr H:P --scenario get|put|mixed|list|health|fill|lookup|customer\n"
          "               [--concurrency N | --rate CALLS_PER_S [--max-inflight M]]\n"
          "               [--duration S] [--warmup S] [--threads T] [--token TOKEN]\n"
          "               [--customer ID] [--customers N] [--records K] [--prefix P]\n"
          "               [--payload BYTES] [--page-size N]\n"
          "       loadgen --scenario sql --pq CONNINFO [--purpose P] [--concurrency N] ...\n"
          "       loadgen --addr H:P --scenario idle --connections N   (holds them until EOF)\n"
          "       loadgen --print-sql[=NAME]   (default get_record)\n"
          "One JSON line on stdout. Details: the comment at the top of tests/bench/loadgen.c.\n",
          out);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"addr", required_argument, NULL, 'a'},
        {"scenario", required_argument, NULL, 's'},
        {"concurrency", required_argument, NULL, 'c'},
        {"threads", required_argument, NULL, 't'},
        {"duration", required_argument, NULL, 'd'},
        {"warmup", required_argument, NULL, 'w'},
        {"customer", required_argument, NULL, 'u'},
        {"customers", required_argument, NULL, 'U'},
        {"records", required_argument, NULL, 'r'},
        {"payload", required_argument, NULL, 'p'},
        {"prefix", required_argument, NULL, 'x'},
        {"token", required_argument, NULL, 'k'},
        {"rate", required_argument, NULL, 'R'},
        {"max-inflight", required_argument, NULL, 'm'},
        {"page-size", required_argument, NULL, 'P'},
        {"pq", required_argument, NULL, 'q'},
        {"purpose", required_argument, NULL, 'o'},
        {"connections", required_argument, NULL, 'n'},
        {"print-sql", optional_argument, NULL, 'S'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int o;
    bool ok = true;
    while (ok && (o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'a':
            opt.addr = optarg;
            ok = bounded_string(optarg, 256);
            break;
        case 's':
            ok = parse_scenario(optarg);
            break;
        case 'c':
            ok = parse_int(optarg, 1, MAX_CONCURRENCY, &opt.concurrency);
            break;
        case 't':
            ok = parse_int(optarg, 1, MAX_THREADS, &opt.threads);
            break;
        case 'd':
            ok = parse_double(optarg, 0.001, 86400, &opt.duration);
            break;
        case 'w':
            ok = parse_double(optarg, 0, 3600, &opt.warmup);
            break;
        case 'u':
            opt.customer = optarg;
            ok = bounded_string(optarg, 100);
            break;
        case 'U':
            ok = parse_int(optarg, 0, INT_MAX, &opt.customers);
            break;
        case 'r':
            ok = parse_int(optarg, 1, INT_MAX, &opt.records);
            break;
        case 'p':
            ok = parse_int(optarg, 0, 64 << 20, &opt.payload);
            break;
        case 'x':
            opt.prefix = optarg;
            ok = bounded_string(optarg, 100);
            break;
        case 'k':
            opt.token = optarg;
            ok = bounded_string(optarg, 4096);
            break;
        case 'R':
            ok = parse_double(optarg, 0.1, 10e6, &opt.rate);
            break;
        case 'm':
            ok = parse_int(optarg, 1, MAX_CONCURRENCY, &opt.max_inflight);
            break;
        case 'P':
            ok = parse_int(optarg, 1, 1000, &opt.page_size);
            break;
        case 'q':
            opt.pq = optarg;
            break;
        case 'o':
            opt.purpose = optarg;
            ok = bounded_string(optarg, 256);
            break;
        case 'n':
            ok = parse_int(optarg, 1, MAX_CONNECTIONS, &opt.connections);
            break;
        case 'S':
            for (int i = 0; i < DM_SQL__COUNT; i++) {
                if (strcmp(dm_sql[i].name, optarg ? optarg : "get_record") == 0) {
                    printf("%s\n", dm_sql[i].text);
                    return 0;
                }
            }
            fprintf(stderr, "loadgen: no statement %s in src/region/sql.c\n", optarg);
            return 2;
        case 'h':
            usage(stdout);
            return 0;
        default:
            ok = false;
            break;
        }
    }
    if (!ok || optind != argc) {
        fprintf(stderr, "loadgen: bad option or value\n");
        usage(stderr);
        return 2;
    }
    if (opt.sc == SC_SQL && (!opt.pq || opt.rate > 0)) {
        fprintf(stderr, "loadgen: sql needs --pq and runs closed loop only\n");
        return 2;
    }
    int threads = opt.sc == SC_SQL ? opt.concurrency : opt.threads;
    if (opt.sc == SC_SQL && threads > MAX_THREADS) {
        fprintf(stderr, "loadgen: sql: at most %d clients\n", MAX_THREADS);
        return 2;
    }
    if (opt.rate <= 0 && opt.threads > opt.concurrency) {
        fprintf(stderr, "loadgen: more threads than concurrent calls\n");
        return 2;
    }
    put_payload = xcalloc((size_t)opt.payload + 1, 1);
    memset(put_payload, 'p', (size_t)opt.payload);

    grpc_init();
    grpc_channel_credentials *cr = grpc_insecure_credentials_create();
    if (opt.sc == SC_IDLE) {
        int rc = run_idle(cr);
        grpc_channel_credentials_release(cr);
        free(put_payload);
        grpc_shutdown();
        return rc;
    }
    raise_nofile((rlim_t)opt.max_inflight + 1024);
    /* Each worker its own TCP connection: channels with equal arguments would otherwise share
     * one subchannel (one connection) through the global pool. */
    grpc_arg arg = {.type = GRPC_ARG_INTEGER,
                    .key = (char *)GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL,
                    .value.integer = 1};
    grpc_channel_args args = {.num_args = 1, .args = &arg};
    worker_t *ws = xcalloc((size_t)threads, sizeof(worker_t));
    for (int i = 0; i < threads; i++) {
        worker_t *w = &ws[i];
        dm_hist_init(&w->hist);
        pthread_mutex_init(&w->mu, NULL);
        if (opt.sc == SC_SQL) {
            if (!sql_connect(w))
                return 1;
            continue;
        }
        w->ch = grpc_channel_create(opt.addr, cr, &args);
        w->cq = grpc_completion_queue_create_for_next(NULL);
        if (opt.rate > 0) {
            w->rate = opt.rate / threads;
            w->n_slots = opt.max_inflight / threads + 1;
        } else {
            w->n_slots = opt.concurrency / threads + (i < opt.concurrency % threads);
        }
        if (opt.token) {
            size_t len = strlen(opt.token) + sizeof("Bearer ");
            char *hdr = xcalloc(len, 1);
            snprintf(hdr, len, "Bearer %s", opt.token);
            w->md[0].key = grpc_slice_from_static_string("authorization");
            w->md[0].value = grpc_slice_from_copied_string(hdr);
            free(hdr);
            w->n_md = 1;
        }
    }
    grpc_channel_credentials_release(cr);
    for (int i = 0; i < threads; i++) {
        if (pthread_create(&ws[i].thread, NULL,
                           opt.sc == SC_SQL ? sql_worker_main : grpc_worker_main, &ws[i]) != 0)
            die("pthread_create failed");
    }
    double t0 = now_s();
    while (now_s() - t0 < opt.warmup && atomic_load(&phase) == 0)
        nanosleep(&(struct timespec){0, 10000000}, NULL);
    int expected = 0;
    atomic_compare_exchange_strong(&phase, &expected, 1);
    long cpu0 = cpu_us();
    double m0 = now_s();
    while (now_s() - m0 < opt.duration && atomic_load(&phase) == 1)
        nanosleep(&(struct timespec){0, 10000000}, NULL);
    atomic_store(&phase, 2);
    double secs = now_s() - m0;
    long cpu1 = cpu_us();

    long ops = 0, ops_total = 0, errors = 0, dropped = 0, by_code[N_CODES] = {0};
    static dm_hist_t all;
    dm_hist_init(&all);
    const char *error = NULL;
    for (int i = 0; i < threads; i++) {
        pthread_join(ws[i].thread, NULL);
        ops += ws[i].ops;
        ops_total += ws[i].ops_total;
        errors += ws[i].errors;
        dropped += ws[i].dropped;
        if (ws[i].error)
            error = ws[i].error;
        for (int k = 0; k < N_CODES; k++)
            by_code[k] += ws[i].err_by_code[k];
        dm_hist_merge(&all, &ws[i].hist);
    }
    printf("{\"scenario\":\"%s\",\"mode\":\"%s\",\"concurrency\":%d,\"rate\":%.1f,"
           "\"ops\":%ld,\"secs\":%.3f,\"ops_per_s\":%.1f,\"p50_us\":%llu,\"p90_us\":%llu,"
           "\"p99_us\":%llu,\"p999_us\":%llu,\"max_us\":%llu,\"mean_us\":%.1f,\"errors\":%ld,"
           "\"dropped\":%ld,\"cpu_us\":%ld,\"ops_total\":%ld",
           scenario_names[opt.sc], opt.rate > 0 ? "open" : "closed",
           opt.rate > 0 ? 0 : opt.concurrency, opt.rate, ops, secs, (double)ops / secs,
           (unsigned long long)dm_hist_quantile(&all, 0.50),
           (unsigned long long)dm_hist_quantile(&all, 0.90),
           (unsigned long long)dm_hist_quantile(&all, 0.99),
           (unsigned long long)dm_hist_quantile(&all, 0.999),
           (unsigned long long)dm_hist_quantile(&all, 1.0), dm_hist_mean(&all), errors, dropped,
           cpu1 - cpu0, ops_total);
    for (int c = 0; c < N_CODES; c++)
        if (by_code[c])
            printf(",\"code_%d\":%ld", c, by_code[c]);
    for (int i = 0; i < threads; i++) {
        if (ws[i].pg) {
            PQfinish(ws[i].pg);
            continue;
        }
        if (ws[i].n_md)
            grpc_slice_unref(ws[i].md[0].value);
        grpc_channel_destroy(ws[i].ch);
        grpc_completion_queue_shutdown(ws[i].cq);
        while (
            grpc_completion_queue_next(ws[i].cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
            GRPC_QUEUE_SHUTDOWN)
            ;
        grpc_completion_queue_destroy(ws[i].cq);
    }
    free(ws);
    free(put_payload);
    grpc_shutdown();
    /* after grpc_shutdown: the whole run's CPU, connection set-up and tear-down included */
    printf(",\"cpu_us_total\":%ld}\n", cpu_us());
    if (error)
        return 1;
    if (one_shot())
        return errors ? 1 : 0;
    return errors && !ops ? 1 : 0;
}
