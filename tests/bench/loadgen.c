/*
 * loadgen: closed-loop gRPC load on the core C API. Each thread has its own channel and
 * completion queue and keeps `concurrency / threads` calls in flight; every completion starts
 * the next call at once. Prints one JSON line: throughput, latency percentiles, errors.
 *
 *   loadgen --addr H:P --scenario get|put|health --concurrency N --duration S
 *           [--threads T] [--warmup S] [--customer ID] [--records K] [--payload BYTES]
 *           [--prefix P] [--token BEARER_TOKEN]
 *
 * get: GetRecord of record "<prefix><i mod K>"; put: PutRecord of a new record each call
 * (unique request_id and record_id, durable on the synchronous standby when acknowledged);
 * health: Health.Check("") (no database: the gRPC ceiling); fill: PutRecord of records
 * "<prefix>0" .. "<prefix>K-1" once each, then exit (set-up for get).
 */
#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "domicile/v1/records.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#define MAX_LAT (1 << 22)

typedef enum { SC_GET, SC_PUT, SC_HEALTH, SC_FILL } scenario_t;

static struct {
    const char *addr;
    scenario_t sc;
    int concurrency, threads, records, payload;
    double duration, warmup;
    const char *customer, *prefix, *token;
} opt = {"127.0.0.1:50051", SC_HEALTH, 8, 1, 1000, 100, 10, 2, "bench", "r", NULL};

static atomic_long seq;
static atomic_int phase; /* 0 warm-up, 1 measuring, 2 stop */

typedef struct slot {
    struct worker *w;
    grpc_call *call;
    grpc_metadata_array md_in, md_trail;
    grpc_byte_buffer *send, *recv;
    grpc_status_code status;
    grpc_slice details;
    struct timespec t0;
} slot_t;

typedef struct worker {
    grpc_channel *ch;
    grpc_completion_queue *cq;
    pthread_t thread;
    int n_slots;
    long ops, errors;
    long *lat_us;
    long n_lat;
    long err_by_code[17];
    grpc_metadata md[1];
    size_t n_md;
} worker_t;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
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

static const char *method_path(void)
{
    switch (opt.sc) {
    case SC_GET:
        return "/domicile.v1.Records/GetRecord";
    case SC_PUT:
    case SC_FILL:
        return "/domicile.v1.Records/PutRecord";
    default:
        return "/grpc.health.v1.Health/Check";
    }
}

static grpc_byte_buffer *make_request(void)
{
    long n = atomic_fetch_add(&seq, 1);
    char rid[64], reqid[128];
    if (opt.sc == SC_HEALTH) {
        Grpc__Health__V1__HealthCheckRequest r = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
        return pack(&r.base);
    }
    if (opt.sc == SC_GET) {
        Domicile__V1__GetRecordRequest r = DOMICILE__V1__GET_RECORD_REQUEST__INIT;
        snprintf(rid, sizeof(rid), "%s%ld", opt.prefix, n % opt.records);
        r.customer_id = (char *)opt.customer;
        r.record_id = rid;
        return pack(&r.base);
    }
    static unsigned char *payload;
    if (!payload) {
        payload = malloc((size_t)opt.payload + 1);
        memset(payload, 'p', (size_t)opt.payload);
    }
    Domicile__V1__PutRecordRequest r = DOMICILE__V1__PUT_RECORD_REQUEST__INIT;
    if (opt.sc == SC_FILL)
        snprintf(rid, sizeof(rid), "%s%ld", opt.prefix, n);
    else
        snprintf(rid, sizeof(rid), "%sput-%d-%ld", opt.prefix, (int)getpid(), n);
    snprintf(reqid, sizeof(reqid), "req-%d-%s", (int)getpid(), rid);
    r.request_id = reqid;
    r.customer_id = (char *)opt.customer;
    r.record_id = rid;
    r.kind = "bench";
    r.payload.data = payload;
    r.payload.len = (size_t)opt.payload;
    return pack(&r.base);
}

static void start_call(slot_t *s)
{
    worker_t *w = s->w;
    grpc_op ops[6];
    grpc_slice method = grpc_slice_from_static_string(method_path());
    gpr_timespec deadline =
        gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_seconds(30, GPR_TIMESPAN));
    s->call = grpc_channel_create_call(w->ch, NULL, GRPC_PROPAGATE_DEFAULTS, w->cq, method, NULL,
                                       deadline, NULL);
    grpc_metadata_array_init(&s->md_in);
    grpc_metadata_array_init(&s->md_trail);
    s->send = make_request();
    s->recv = NULL;
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = w->n_md;
    ops[0].data.send_initial_metadata.metadata = w->md;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = s->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &s->md_in;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &s->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &s->md_trail;
    ops[5].data.recv_status_on_client.status = &s->status;
    ops[5].data.recv_status_on_client.status_details = &s->details;
    clock_gettime(CLOCK_MONOTONIC, &s->t0);
    if (grpc_call_start_batch(s->call, ops, 6, s, NULL) != GRPC_CALL_OK) {
        fprintf(stderr, "loadgen: start_batch failed\n");
        exit(1);
    }
}

static void end_call(slot_t *s)
{
    grpc_byte_buffer_destroy(s->send);
    if (s->recv)
        grpc_byte_buffer_destroy(s->recv);
    grpc_slice_unref(s->details);
    grpc_metadata_array_destroy(&s->md_in);
    grpc_metadata_array_destroy(&s->md_trail);
    grpc_call_unref(s->call);
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    slot_t *slots = calloc((size_t)w->n_slots, sizeof(slot_t));
    int live = w->n_slots;
    for (int i = 0; i < w->n_slots; i++) {
        slots[i].w = w;
        start_call(&slots[i]);
    }
    while (live > 0) {
        grpc_event ev = grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        slot_t *s = ev.tag;
        struct timespec t1;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        long us = (t1.tv_sec - s->t0.tv_sec) * 1000000L + (t1.tv_nsec - s->t0.tv_nsec) / 1000;
        if (atomic_load(&phase) == 1) {
            if (s->status == GRPC_STATUS_OK) {
                w->ops++;
                if (w->n_lat < MAX_LAT)
                    w->lat_us[w->n_lat++] = us;
            } else {
                w->errors++;
                if ((int)s->status >= 0 && (int)s->status < 17)
                    w->err_by_code[s->status]++;
            }
        }
        end_call(s);
        if (opt.sc == SC_FILL && atomic_load(&seq) >= opt.records)
            atomic_store(&phase, 2);
        if (atomic_load(&phase) == 2)
            live--;
        else
            start_call(s);
    }
    free(slots);
    return NULL;
}

static int cmp_long(const void *a, const void *b)
{
    long x = *(const long *)a, y = *(const long *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"addr", required_argument, NULL, 'a'},        {"scenario", required_argument, NULL, 's'},
        {"concurrency", required_argument, NULL, 'c'}, {"threads", required_argument, NULL, 't'},
        {"duration", required_argument, NULL, 'd'},    {"warmup", required_argument, NULL, 'w'},
        {"customer", required_argument, NULL, 'u'},    {"records", required_argument, NULL, 'r'},
        {"payload", required_argument, NULL, 'p'},     {"prefix", required_argument, NULL, 'x'},
        {"token", required_argument, NULL, 'k'},       {NULL, 0, NULL, 0},
    };
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'a':
            opt.addr = optarg;
            break;
        case 's':
            opt.sc = strcmp(optarg, "get") == 0    ? SC_GET
                     : strcmp(optarg, "put") == 0  ? SC_PUT
                     : strcmp(optarg, "fill") == 0 ? SC_FILL
                                                   : SC_HEALTH;
            break;
        case 'c':
            opt.concurrency = atoi(optarg);
            break;
        case 't':
            opt.threads = atoi(optarg);
            break;
        case 'd':
            opt.duration = atof(optarg);
            break;
        case 'w':
            opt.warmup = atof(optarg);
            break;
        case 'u':
            opt.customer = optarg;
            break;
        case 'r':
            opt.records = atoi(optarg);
            break;
        case 'p':
            opt.payload = atoi(optarg);
            break;
        case 'x':
            opt.prefix = optarg;
            break;
        case 'k':
            opt.token = optarg;
            break;
        default:
            fprintf(stderr, "usage: see the comment at the top of tests/bench/loadgen.c\n");
            return 2;
        }
    }
    if (opt.concurrency < 1 || opt.threads < 1 || opt.threads > opt.concurrency ||
        opt.records < 1 || opt.duration <= 0) {
        fprintf(stderr, "loadgen: bad options\n");
        return 2;
    }
    grpc_init();
    worker_t *ws = calloc((size_t)opt.threads, sizeof(worker_t));
    grpc_channel_credentials *cr = grpc_insecure_credentials_create();
    for (int i = 0; i < opt.threads; i++) {
        ws[i].ch = grpc_channel_create(opt.addr, cr, NULL);
        ws[i].cq = grpc_completion_queue_create_for_next(NULL);
        ws[i].n_slots = opt.concurrency / opt.threads + (i < opt.concurrency % opt.threads);
        ws[i].lat_us = malloc(sizeof(long) * MAX_LAT);
        if (opt.token) {
            char hdr[600];
            snprintf(hdr, sizeof(hdr), "Bearer %s", opt.token);
            ws[i].md[0].key = grpc_slice_from_static_string("authorization");
            ws[i].md[0].value = grpc_slice_from_copied_string(hdr);
            ws[i].n_md = 1;
        }
        pthread_create(&ws[i].thread, NULL, worker_main, &ws[i]);
    }
    grpc_channel_credentials_release(cr);
    double t0 = now_s();
    while (now_s() - t0 < opt.warmup)
        nanosleep(&(struct timespec){0, 10000000}, NULL);
    atomic_store(&phase, 1);
    double m0 = now_s();
    while (now_s() - m0 < opt.duration && atomic_load(&phase) == 1)
        nanosleep(&(struct timespec){0, 10000000}, NULL);
    atomic_store(&phase, 2);
    double secs = now_s() - m0;
    long ops = 0, errors = 0, n = 0, by_code[17] = {0};
    for (int i = 0; i < opt.threads; i++) {
        pthread_join(ws[i].thread, NULL);
        ops += ws[i].ops;
        errors += ws[i].errors;
        n += ws[i].n_lat;
        for (int k = 0; k < 17; k++)
            by_code[k] += ws[i].err_by_code[k];
    }
    long *all = malloc(sizeof(long) * (size_t)(n ? n : 1));
    long k = 0;
    for (int i = 0; i < opt.threads; i++) {
        memcpy(all + k, ws[i].lat_us, sizeof(long) * (size_t)ws[i].n_lat);
        k += ws[i].n_lat;
    }
    qsort(all, (size_t)n, sizeof(long), cmp_long);
    long p50 = n ? all[n / 2] : 0, p99 = n ? all[(n * 99) / 100] : 0;
    printf("{\"scenario\":\"%s\",\"concurrency\":%d,\"ops\":%ld,\"secs\":%.3f,\"ops_per_s\":%.1f,"
           "\"p50_us\":%ld,\"p99_us\":%ld,\"errors\":%ld",
           opt.sc == SC_GET    ? "get"
           : opt.sc == SC_PUT  ? "put"
           : opt.sc == SC_FILL ? "fill"
                               : "health",
           opt.concurrency, ops, secs, (double)ops / secs, p50, p99, errors);
    for (int c = 0; c < 17; c++)
        if (by_code[c])
            printf(",\"code_%d\":%ld", c, by_code[c]);
    printf("}\n");
    for (int i = 0; i < opt.threads; i++) {
        grpc_channel_destroy(ws[i].ch);
        grpc_completion_queue_shutdown(ws[i].cq);
        while (
            grpc_completion_queue_next(ws[i].cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
            GRPC_QUEUE_SHUTDOWN)
            ;
        grpc_completion_queue_destroy(ws[i].cq);
        free(ws[i].lat_us);
    }
    free(ws);
    free(all);
    grpc_shutdown();
    return errors && !ops ? 1 : 0;
}
