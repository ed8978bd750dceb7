/*
 * echo: the reference server of the benchmark (R3). As lean as a server on the gRPC core can
 * be while keeping the gateway's shape: one completion queue and one thread per core, requests
 * pre-posted per queue, every event of a call on the thread that owns its queue. It serves
 * grpc.health.v1.Health/Check (unpacks the request, answers SERVING for "" and NOT_FOUND
 * otherwise) and UNIMPLEMENTED for any other method. Plaintext only.
 *
 *   echo [--listen HOST:PORT] [--threads N] [--ready-fd FD]
 *
 * --ready-fd: "READY <port>\n" is written to FD once serving (like domiciled). SIGINT or
 * SIGTERM: graceful shutdown, in-flight calls are cancelled after 1 s.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "grpc/health/v1/health.pb-c.h"

#include "args.h"

#define MAX_THREADS      64
#define POSTED_PER_QUEUE 4 /* as the gateway (src/server/server.c POSTED_PER_METHOD) */

typedef struct server server_t;

typedef enum {
    T_NEW,  /* a requested call arrived (or the request came back at shutdown) */
    T_DONE, /* the reply batch completed */
} tag_kind_t;

typedef struct tag {
    struct call *c;
    tag_kind_t kind;
} tag_t;

typedef struct call {
    server_t *srv;
    grpc_completion_queue *cq;
    bool generic; /* requested with grpc_server_request_call: answer UNIMPLEMENTED */
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_call_details details;
    grpc_byte_buffer *payload, *reply;
    grpc_slice status_details;
    int cancelled;
    tag_t t_new, t_done;
} call_t;

struct server {
    grpc_server *server;
    void *m_check;
    int n_threads;
    grpc_completion_queue *cqs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    pthread_rwlock_t post_lock; /* write-held while shutdown starts: no post after it */
    bool shutting_down;
};

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (!p) {
        fprintf(stderr, "echo: out of memory\n");
        abort();
    }
    return p;
}

static void call_free(call_t *c)
{
    grpc_metadata_array_destroy(&c->md);
    if (c->generic)
        grpc_call_details_destroy(&c->details);
    if (c->payload)
        grpc_byte_buffer_destroy(c->payload);
    if (c->reply)
        grpc_byte_buffer_destroy(c->reply);
    grpc_slice_unref(c->status_details);
    if (c->call)
        grpc_call_unref(c->call);
    free(c);
}

static void post(server_t *srv, grpc_completion_queue *cq, bool generic)
{
    pthread_rwlock_rdlock(&srv->post_lock);
    if (srv->shutting_down) {
        pthread_rwlock_unlock(&srv->post_lock);
        return;
    }
    call_t *c = xcalloc(1, sizeof(*c));
    c->srv = srv;
    c->cq = cq;
    c->generic = generic;
    c->status_details = grpc_empty_slice();
    c->t_new.c = c;
    c->t_new.kind = T_NEW;
    c->t_done.c = c;
    c->t_done.kind = T_DONE;
    grpc_metadata_array_init(&c->md);
    grpc_call_error err;
    if (generic) {
        grpc_call_details_init(&c->details);
        err =
            grpc_server_request_call(srv->server, &c->call, &c->details, &c->md, cq, cq, &c->t_new);
    } else {
        err = grpc_server_request_registered_call(srv->server, srv->m_check, &c->call, &c->deadline,
                                                  &c->md, &c->payload, cq, cq, &c->t_new);
    }
    pthread_rwlock_unlock(&srv->post_lock);
    if (err != GRPC_CALL_OK) {
        fprintf(stderr, "echo: cannot post a request (error %d)\n", (int)err);
        call_free(c);
    }
}

/* The answer to Check: SERVING for the server as a whole, NOT_FOUND for any named service. */
static grpc_status_code check(call_t *c)
{
    grpc_byte_buffer_reader r;
    if (!c->payload || !grpc_byte_buffer_reader_init(&r, c->payload))
        return GRPC_STATUS_INVALID_ARGUMENT;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    Grpc__Health__V1__HealthCheckRequest *req = grpc__health__v1__health_check_request__unpack(
        NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    if (!req)
        return GRPC_STATUS_INVALID_ARGUMENT;
    bool whole = req->service[0] == '\0';
    grpc__health__v1__health_check_request__free_unpacked(req, NULL);
    if (!whole)
        return GRPC_STATUS_NOT_FOUND;

    Grpc__Health__V1__HealthCheckResponse rep = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    rep.status = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    size_t n = protobuf_c_message_get_packed_size(&rep.base);
    grpc_slice out = grpc_slice_malloc(n);
    protobuf_c_message_pack(&rep.base, GRPC_SLICE_START_PTR(out));
    c->reply = grpc_raw_byte_buffer_create(&out, 1);
    grpc_slice_unref(out);
    return GRPC_STATUS_OK;
}

static void handle(call_t *c)
{
    grpc_status_code code = c->generic ? GRPC_STATUS_UNIMPLEMENTED : check(c);
    const char *msg = code == GRPC_STATUS_OK              ? ""
                      : code == GRPC_STATUS_UNIMPLEMENTED ? "unknown method"
                      : code == GRPC_STATUS_NOT_FOUND     ? "unknown service"
                                                          : "cannot parse HealthCheckRequest";
    c->status_details = grpc_slice_from_static_string(msg);
    grpc_op ops[4];
    size_t n = 0;
    memset(ops, 0, sizeof(ops));
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (c->reply) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = c->reply;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n++].data.send_status_from_server.status_details = &c->status_details;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &c->cancelled;
    if (grpc_call_start_batch(c->call, ops, n, &c->t_done, NULL) != GRPC_CALL_OK) {
        grpc_call_cancel(c->call, NULL);
        call_free(c);
    }
}

typedef struct {
    server_t *srv;
    int index;
} thread_arg_t;

static void *worker_main(void *arg)
{
    thread_arg_t *ta = arg;
    server_t *srv = ta->srv;
    grpc_completion_queue *cq = srv->cqs[ta->index];
    free(ta);
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE || !ev.tag)
            continue;
        tag_t *t = ev.tag;
        call_t *c = t->c;
        if (t->kind == T_DONE) {
            call_free(c);
            continue;
        }
        if (!ev.success) { /* shutdown: the posted request came back unused */
            call_free(c);
            continue;
        }
        post(srv, cq, c->generic);
        handle(c);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"listen", required_argument, NULL, 'l'},
        {"threads", required_argument, NULL, 't'},
        {"ready-fd", required_argument, NULL, 'r'},
        {NULL, 0, NULL, 0},
    };
    const char *listen_addr = "127.0.0.1:0";
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = ncpu < 1 ? 1 : ncpu > MAX_THREADS ? MAX_THREADS : (int)ncpu;
    int ready_fd = -1, o;
    bool ok = true;
    while (ok && (o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'l':
            listen_addr = optarg;
            ok = strlen(optarg) <= 256;
            break;
        case 't':
            ok = parse_int(optarg, 1, MAX_THREADS, &threads);
            break;
        case 'r':
            ok = parse_int(optarg, 0, 1 << 20, &ready_fd);
            break;
        default:
            ok = false;
        }
    }
    if (!ok || optind != argc) {
        fprintf(stderr, "usage: echo [--listen HOST:PORT] [--threads N] [--ready-fd FD]\n");
        return 2;
    }

    /* Before grpc_init: gRPC's threads inherit the mask, sigwait below gets the signals. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    grpc_init();

    static server_t srv;
    srv.n_threads = threads;
    pthread_rwlock_init(&srv.post_lock, NULL);
    srv.server = grpc_server_create(NULL, NULL);
    for (int i = 0; i < threads; i++) {
        srv.cqs[i] = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(srv.server, srv.cqs[i], NULL);
    }
    srv.m_check = grpc_server_register_method(srv.server, "/grpc.health.v1.Health/Check", NULL,
                                              GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    grpc_server_credentials *cr = grpc_insecure_server_credentials_create();
    int port = grpc_server_add_http2_port(srv.server, listen_addr, cr);
    grpc_server_credentials_release(cr);
    if (!srv.m_check || port == 0) {
        fprintf(stderr, "echo: cannot %s\n", port == 0 ? "listen" : "register Health/Check");
        return 1;
    }
    grpc_server_start(srv.server);
    for (int i = 0; i < threads; i++) {
        for (int k = 0; k < POSTED_PER_QUEUE; k++)
            post(&srv, srv.cqs[i], false);
        post(&srv, srv.cqs[i], true);
        thread_arg_t *ta = xcalloc(1, sizeof(*ta));
        ta->srv = &srv;
        ta->index = i;
        if (pthread_create(&srv.threads[i], NULL, worker_main, ta) != 0) {
            fprintf(stderr, "echo: cannot start a thread\n");
            return 1;
        }
    }
    if (ready_fd >= 0) {
        char line[32];
        int n = snprintf(line, sizeof(line), "READY %d\n", port);
        if (write(ready_fd, line, (size_t)n) != n)
            fprintf(stderr, "echo: cannot write to the ready fd: %s\n", strerror(errno));
        close(ready_fd);
    }
    fprintf(stderr, "echo: serving on port %d, %d threads\n", port, threads);

    int sig;
    while (sigwait(&sigs, &sig) != 0)
        ;

    /* The shutdown tag goes to a queue of its own so no worker takes it for a call. */
    grpc_completion_queue *done_cq = grpc_completion_queue_create_for_pluck(NULL);
    pthread_rwlock_wrlock(&srv.post_lock);
    srv.shutting_down = true;
    grpc_server_shutdown_and_notify(srv.server, done_cq, &srv);
    pthread_rwlock_unlock(&srv.post_lock);
    grpc_event ev = grpc_completion_queue_pluck(
        done_cq, &srv,
        gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_seconds(1, GPR_TIMESPAN)), NULL);
    if (ev.type == GRPC_QUEUE_TIMEOUT) {
        grpc_server_cancel_all_calls(srv.server);
        grpc_completion_queue_pluck(done_cq, &srv, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    }
    for (int i = 0; i < threads; i++)
        grpc_completion_queue_shutdown(srv.cqs[i]);
    for (int i = 0; i < threads; i++) {
        pthread_join(srv.threads[i], NULL);
        grpc_completion_queue_destroy(srv.cqs[i]);
    }
    grpc_completion_queue_shutdown(done_cq);
    grpc_completion_queue_pluck(done_cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    grpc_completion_queue_destroy(done_cq);
    grpc_server_destroy(srv.server);
    pthread_rwlock_destroy(&srv.post_lock);
    grpc_shutdown();
    return 0;
}
