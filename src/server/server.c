/*
 * gRPC core server. See include/domicile/server.h for the contract and src/server/README.md for
 * the call state machine.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <openssl/crypto.h>
#include <stdio.h>

#include "domicile/clock.h"
#include "domicile/metrics.h"
#include "domicile/log.h"
#include "domicile/server.h"
#include "wire.h"

/* Requests kept posted per method per completion queue: enough that a burst of new calls does
 * not wait for a re-post, few enough that idle memory stays small. */
#define POSTED_PER_METHOD 4
#define POSTED_GENERIC    2

/* HPACK's per-entry overhead (RFC 7541 §4.1), which chttp2 also adds to every header when it
 * sums a header block against GRPC_ARG_MAX_METADATA_SIZE. */
#define METADATA_ENTRY_OVERHEAD 32

/* The transport's own limit on a request's header block: 8 times max_metadata_bytes, at least
 * 1 MiB. gRPC 1.51's chttp2 answers a block over its limit with a connection error that fails
 * every call on the connection, not only the offending one (hpack_parser.cc reports it without
 * a stream id, so parsing.cc cannot reset just that stream). So max_metadata_bytes is
 * enforced per call in start_call(), and this limit is only a far-away backstop. */
#define METADATA_BACKSTOP_MIN   (1 << 20)
#define METADATA_BACKSTOP_RATIO 8

/* The probe listener (dm_server_add_probe) is plaintext and unauthenticated, so everything a
 * caller can make it hold is small and bounded. A HealthCheckRequest whose service name is at
 * the health service's own limit (256 bytes) packs into 259 bytes; kubelet's request metadata
 * is its user-agent (about 40 bytes). Core 1.51 cannot count connections
 * (grpc.max_allowed_incoming_connections came later): each one is bounded instead by its age,
 * its streams and the listener's memory quota, and who may connect is the network's business
 * (deploy/kubernetes: the node only). */
#define PROBE_MAX_MESSAGE       1024
#define PROBE_MAX_METADATA      2048 /* per call, as max_metadata_bytes counts it */
#define PROBE_METADATA_BACKSTOP 8192 /* the transport's limit on a header block */
#define PROBE_MAX_STREAMS       4
#define PROBE_HANDSHAKE_MS      5000  /* HTTP/2 preface and settings (core's default: 120 s) */
#define PROBE_IDLE_MS           10000 /* no call in flight: closed */
#define PROBE_MAX_AGE_MS        60000 /* any connection, then 5 s to finish its calls */
#define PROBE_AGE_GRACE_MS      5000
#define PROBE_MEMORY_BYTES      (8 << 20)
#define POSTED_PROBE            1 /* per completion queue, for the method and for the rest */

typedef enum {
    TAG_NEW,            /* request_(registered_)call completed: a new call or shutdown */
    TAG_CLOSE,          /* RECV_CLOSE_ON_SERVER completed */
    TAG_SEND,           /* a send batch (message and/or status) completed */
    TAG_RECV,           /* RECV_MESSAGE completed (client and bidi streaming) */
    TAG_SHUTDOWN,       /* grpc_server_shutdown_and_notify completed */
    TAG_PROBE_SHUTDOWN, /* the same, for the probe listener's server */
} tag_kind_t;

typedef struct {
    tag_kind_t kind;
    dm_call_t *call;
} dm_tag_t;

typedef struct outmsg {
    grpc_byte_buffer *bb;
    struct outmsg *next;
} outmsg_t;

typedef struct {
    dm_server_t *srv;
    int index;
    grpc_completion_queue *cq;
    pthread_t thread;
} cq_worker_t;

struct dm_server {
    const dm_config_t *cfg;
    const dm_method_t *methods;
    size_t n_methods;
    void **registered; /* grpc handle per method */
    void *app;
    grpc_server *server;
    cq_worker_t *workers;
    int n_workers;
    pthread_rwlock_t post_lock; /* write-held while shutdown begins: no re-post after it */
    bool shutting_down;
    dm_tag_t shutdown_tag;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool shutdown_done;
    atomic_int live_calls;   /* posted requests + active calls */
    atomic_int active_calls; /* calls that arrived and have not been freed */
    struct hook {
        void (*fn)(void *);
        void *arg;
    } hooks[8];
    int n_hooks;
    dm_authorize_fn authorize;
    void *authorize_arg;
    grpc_metadata answered_md; /* x-domicile-region: on every status (src/peer) */
    size_t max_metadata_bytes; /* per call; cfg->max_metadata_bytes */

    /* dm_server_add_probe(): a second grpc_server on the same completion queues, so that a
     * probe's answer comes from the threads that serve every other call. NULL when off. */
    grpc_server *probe;
    const dm_method_t *probe_method; /* the one method it serves */
    void *probe_registered;
    char *probe_listen;
    int probe_port;
    bool probe_shutting_down; /* under post_lock, like shutting_down */
    bool probe_shutdown_done; /* under mu */
    dm_tag_t probe_shutdown_tag;
};

struct dm_call {
    dm_server_t *srv;
    cq_worker_t *worker;
    const dm_method_t *method; /* NULL for an unregistered (generic) call */
    size_t method_index;
    bool probe; /* arrived on the probe listener */
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_call_details details; /* generic calls only */
    grpc_byte_buffer *payload;
    ProtobufCMessage *request;

    dm_tag_t t_new, t_close, t_send, t_recv;
    grpc_byte_buffer *recv_bb;
    dm_recv_fn recv_fn;
    void *recv_arg;
    atomic_int refs; /* 1 owner (until finish) + 1 per batch in flight */
    int close_cancelled;

    pthread_mutex_t mu; /* guards everything below */
    atomic_bool cancelled;
    bool dead;         /* a batch failed: the transport is gone */
    bool send_pending; /* one send batch in flight */
    bool initial_md_sent;
    bool finish_requested;
    bool status_sent;
    grpc_status_code final_code;
    grpc_slice final_details;
    outmsg_t *q_head, *q_tail;
    size_t q_len;
    grpc_byte_buffer *inflight_bb;
    dm_call_cb on_drain, on_cancel, on_cancel2;
    void *drain_arg, *cancel_arg, *cancel_arg2;
    bool cancel_fired, cancel2_fired;

    void *data;
    void (*data_free)(void *);
    struct attached {
        void *p;
        void (*free_fn)(void *);
    } attached[4]; /* dm_call_attach() */
    int n_attached;
    bool active;
    const void *principal;
    void (*principal_free)(void *); /* an asserted principal is the call's own */
    char purpose[65];
    char principal_name[72]; /* for the access log */
    char region[DM_REGION_CODE_MAX + 1];
    struct timespec started;
};

static void post_request(cq_worker_t *w, size_t method_index, bool generic, bool probe);

/* Methods whose client sends a stream: no initial payload, the handler reads with
 * dm_call_recv() (GRPC_SRM_PAYLOAD_NONE + RECV_MESSAGE batches). */
static bool client_streams(const dm_method_t *m)
{
    return m->kind == DM_RPC_CLIENT_STREAM || m->kind == DM_RPC_BIDI_STREAM;
}

static void call_unref(dm_call_t *c)
{
    if (atomic_fetch_sub(&c->refs, 1) != 1)
        return;
    for (outmsg_t *m = c->q_head; m;) {
        outmsg_t *next = m->next;
        grpc_byte_buffer_destroy(m->bb);
        free(m);
        m = next;
    }
    if (c->inflight_bb)
        grpc_byte_buffer_destroy(c->inflight_bb);
    if (c->payload)
        grpc_byte_buffer_destroy(c->payload);
    if (c->recv_bb)
        grpc_byte_buffer_destroy(c->recv_bb);
    if (c->request)
        protobuf_c_message_free_unpacked(c->request, NULL);
    if (c->data_free)
        c->data_free(c->data);
    for (int i = 0; i < c->n_attached; i++)
        c->attached[i].free_fn(c->attached[i].p);
    if (c->principal_free)
        c->principal_free((void *)c->principal);
    grpc_slice_unref(c->final_details);
    grpc_metadata_array_destroy(&c->md);
    if (!c->method)
        grpc_call_details_destroy(&c->details);
    if (c->call)
        grpc_call_unref(c->call);
    pthread_mutex_destroy(&c->mu);
    atomic_fetch_sub(&c->srv->live_calls, 1);
    if (c->active)
        atomic_fetch_sub(&c->srv->active_calls, 1);
    free(c);
}

static dm_call_t *call_new(cq_worker_t *w, size_t method_index, bool generic, bool probe)
{
    dm_call_t *c = dm_calloc(1, sizeof(*c));
    c->srv = w->srv;
    c->worker = w;
    c->method_index = method_index;
    c->probe = probe;
    c->method = generic ? NULL : probe ? w->srv->probe_method : &w->srv->methods[method_index];
    c->t_new = (dm_tag_t){TAG_NEW, c};
    c->t_close = (dm_tag_t){TAG_CLOSE, c};
    c->t_send = (dm_tag_t){TAG_SEND, c};
    c->t_recv = (dm_tag_t){TAG_RECV, c};
    atomic_init(&c->refs, 1);
    atomic_init(&c->cancelled, false);
    c->final_details = grpc_empty_slice();
    pthread_mutex_init(&c->mu, NULL);
    grpc_metadata_array_init(&c->md);
    if (generic)
        grpc_call_details_init(&c->details);
    atomic_fetch_add(&w->srv->live_calls, 1);
    return c;
}

/* A failed start_batch leaves the call wedged (GRPC_CORE.md §4): cancel it and treat it as
 * dead. Called with c->mu held. */
static void batch_failed(dm_call_t *c, grpc_call_error err, const char *what)
{
    dm_error("server", "start_batch(%s) failed with %d; cancelling the call", what, (int)err);
    grpc_call_cancel_with_status(c->call, GRPC_STATUS_INTERNAL, "internal error", NULL);
    c->dead = true;
}

/* Start the next send batch if none is in flight. Called with c->mu held. */
static void pump_locked(dm_call_t *c)
{
    grpc_op ops[3];
    size_t n = 0;
    grpc_byte_buffer *bb = NULL;

    if (c->send_pending || c->dead || c->status_sent)
        return;
    memset(ops, 0, sizeof(ops));
    if (c->q_head) {
        outmsg_t *m = c->q_head;
        c->q_head = m->next;
        if (!c->q_head)
            c->q_tail = NULL;
        c->q_len--;
        bb = m->bb;
        free(m);
    } else if (!c->finish_requested) {
        return;
    }
    if (!c->initial_md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
    }
    if (bb) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = bb;
        /* More messages are queued behind this one: the transport may hold it and write them
         * together (the last one queued goes without the hint and flushes them all). */
        if (c->q_head)
            ops[n].flags = GRPC_WRITE_BUFFER_HINT;
        n++;
    }
    /* The status rides with the last message: a unary reply is one batch. */
    if (c->finish_requested && !c->q_head) {
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.status = c->final_code;
        ops[n].data.send_status_from_server.status_details = &c->final_details;
        /* Which region answered: a peer gateway tells an answer from a lost connection. Not
         * on the probe listener: it tells a stranger nothing it does not need. */
        ops[n].data.send_status_from_server.trailing_metadata_count = c->probe ? 0 : 1;
        ops[n].data.send_status_from_server.trailing_metadata = &c->srv->answered_md;
        n++;
        c->status_sent = true;
    }
    c->initial_md_sent = true;
    c->send_pending = true;
    c->inflight_bb = bb;
    atomic_fetch_add(&c->refs, 1);
    grpc_call_error err = grpc_call_start_batch(c->call, ops, n, &c->t_send, NULL);
    if (err != GRPC_CALL_OK) {
        batch_failed(c, err, "send");
        c->send_pending = false;
        c->inflight_bb = NULL;
        if (bb)
            grpc_byte_buffer_destroy(bb);
        atomic_fetch_sub(&c->refs, 1); /* never the last: the caller holds one */
    }
}

static grpc_byte_buffer *pack(const ProtobufCMessage *msg)
{
    size_t len = protobuf_c_message_get_packed_size(msg);
    grpc_slice s = grpc_slice_malloc(len);
    protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* Append a packed message to the send queue. Called with c->mu held. */
static void enqueue_locked(dm_call_t *c, grpc_byte_buffer *bb)
{
    outmsg_t *m = dm_malloc(sizeof(*m));
    m->bb = bb;
    m->next = NULL;
    if (c->q_tail)
        c->q_tail->next = m;
    else
        c->q_head = m;
    c->q_tail = m;
    c->q_len++;
}

bool dm_call_send(dm_call_t *c, const ProtobufCMessage *msg)
{
    grpc_byte_buffer *bb = pack(msg);
    pthread_mutex_lock(&c->mu);
    if (c->dead || c->finish_requested || atomic_load(&c->cancelled)) {
        pthread_mutex_unlock(&c->mu);
        grpc_byte_buffer_destroy(bb);
        return false;
    }
    enqueue_locked(c, bb);
    pump_locked(c);
    pthread_mutex_unlock(&c->mu);
    return true;
}

size_t dm_call_queued(dm_call_t *c)
{
    pthread_mutex_lock(&c->mu);
    size_t n = c->q_len;
    pthread_mutex_unlock(&c->mu);
    return n;
}

/* Access log and metrics of a finished call. OK calls are logged at debug level only:
 * one line per call would cost more than the call at full load. */
static void call_ended(dm_call_t *c, grpc_status_code code)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    int64_t us = (int64_t)(now.tv_sec - c->started.tv_sec) * 1000000 +
                 (now.tv_nsec - c->started.tv_nsec) / 1000;
    if (c->method && !c->probe) /* the counters are per method of the main table */
        dm_metrics_call(c->method_index, code, us);
    dm_log_level_t level = code == GRPC_STATUS_OK         ? DM_LOG_DEBUG
                           : code == GRPC_STATUS_INTERNAL ? DM_LOG_ERROR
                                                          : DM_LOG_INFO;
    if (!dm_log_enabled(level))
        return;
    size_t len = 0;
    const char *rid = dm_call_metadata(c, "x-request-id", &len);
    char request_id[129] = "";
    if (rid && len < sizeof(request_id)) {
        memcpy(request_id, rid, len);
        request_id[len] = '\0';
    }
    dm_log_field_t f[] = {
        DM_LOG_STR("method", c->method ? c->method->path : "(unknown)"),
        DM_LOG_STR("status", dm_status_code_name(code)),
        DM_LOG_NUM("duration_us", us),
        DM_LOG_STR("principal", c->principal_name),
        DM_LOG_STR("region", c->region),
        DM_LOG_STR("request_id", request_id),
        DM_LOG_STR("listener", "probe"), /* probe calls only */
    };
    dm_log_fields(level, "call", f, DM_ARRAY_LEN(f) - (c->probe ? 0 : 1), "call ended");
}

void dm_call_set_log_principal(dm_call_t *c, const char *name)
{
    snprintf(c->principal_name, sizeof(c->principal_name), "%s", name);
}

void dm_call_set_region(dm_call_t *c, const char *code)
{
    snprintf(c->region, sizeof(c->region), "%s", code);
}

void dm_call_finish(dm_call_t *c, dm_status_t *st)
{
    pthread_mutex_lock(&c->mu);
    if (c->finish_requested) {
        pthread_mutex_unlock(&c->mu);
        dm_error("server", "call finished twice (bug); ignoring the second status");
        dm_status_free(st);
        return;
    }
    c->finish_requested = true;
    c->final_code = st ? st->code : GRPC_STATUS_OK;
    if (st) {
        grpc_slice_unref(c->final_details);
        c->final_details = grpc_slice_from_copied_string(st->message);
    }
    pump_locked(c);
    pthread_mutex_unlock(&c->mu);
    call_ended(c, st ? st->code : GRPC_STATUS_OK);
    if (st && st->code == GRPC_STATUS_INTERNAL)
        dm_error("server", "%s: internal error: %s%s%s", c->method ? c->method->path : "?",
                 st->message, st->detail ? " | " : "", st->detail ? st->detail : "");
    else if (st && st->detail)
        dm_debug("server", "%s: %s: %s | %s", c->method ? c->method->path : "?",
                 dm_status_code_name(st->code), st->message, st->detail);
    dm_status_free(st);
    call_unref(c); /* the owner's reference */
}

void dm_call_reply(dm_call_t *c, const ProtobufCMessage *msg)
{
    grpc_byte_buffer *bb = pack(msg);
    pthread_mutex_lock(&c->mu);
    if (!c->dead && !c->finish_requested) {
        enqueue_locked(c, bb);
        bb = NULL;
    }
    pthread_mutex_unlock(&c->mu);
    if (bb)
        grpc_byte_buffer_destroy(bb);
    dm_call_finish(c, NULL);
}

void dm_call_on_drain(dm_call_t *c, dm_call_cb fn, void *arg)
{
    pthread_mutex_lock(&c->mu);
    c->on_drain = fn;
    c->drain_arg = arg;
    pthread_mutex_unlock(&c->mu);
}

void dm_call_on_cancel(dm_call_t *c, dm_call_cb fn, void *arg)
{
    bool fire_now = false;
    pthread_mutex_lock(&c->mu);
    c->on_cancel = fn;
    c->cancel_arg = arg;
    if (atomic_load(&c->cancelled) && !c->cancel_fired) {
        c->cancel_fired = true;
        fire_now = true;
    }
    pthread_mutex_unlock(&c->mu);
    if (fire_now)
        fn(c, arg);
}

static void mark_cancelled(dm_call_t *c)
{
    dm_call_cb fn = NULL, fn2 = NULL;
    void *arg = NULL, *arg2 = NULL;
    pthread_mutex_lock(&c->mu);
    atomic_store(&c->cancelled, true);
    /* After finish the handler has let go of the call: its cancel hook may be stale. */
    if (c->on_cancel && !c->cancel_fired && !c->finish_requested) {
        c->cancel_fired = true;
        fn = c->on_cancel;
        arg = c->cancel_arg;
    }
    if (c->on_cancel2 && !c->cancel2_fired && !c->finish_requested) {
        c->cancel2_fired = true;
        fn2 = c->on_cancel2;
        arg2 = c->cancel_arg2;
    }
    pthread_mutex_unlock(&c->mu);
    if (fn)
        fn(c, arg);
    if (fn2)
        fn2(c, arg2);
}

void dm_call_on_cancel_module(dm_call_t *c, dm_call_cb fn, void *arg)
{
    bool fire_now = false;
    pthread_mutex_lock(&c->mu);
    c->on_cancel2 = fn;
    c->cancel_arg2 = arg;
    if (atomic_load(&c->cancelled) && !c->cancel2_fired && !c->finish_requested) {
        c->cancel2_fired = true;
        fire_now = true;
    }
    pthread_mutex_unlock(&c->mu);
    if (fire_now)
        fn(c, arg);
}

static void on_send_done(dm_call_t *c, bool ok)
{
    dm_call_cb drain = NULL;
    void *arg = NULL;
    bool fire_cancel = false;

    pthread_mutex_lock(&c->mu);
    c->send_pending = false;
    if (c->inflight_bb) {
        grpc_byte_buffer_destroy(c->inflight_bb);
        c->inflight_bb = NULL;
    }
    if (!ok) {
        /* The call is gone (cancel, deadline, reset): send nothing more. */
        c->dead = true;
        fire_cancel = !atomic_load(&c->cancelled);
        /* What is queued can never be sent: drop it, and wake a producer that waits for the
         * drain (its next dm_call_send() fails, so it finishes the call); else it would wait
         * forever and the call, its context and the queue would never be freed. */
        for (outmsg_t *m = c->q_head; m;) {
            outmsg_t *next = m->next;
            grpc_byte_buffer_destroy(m->bb);
            free(m);
            m = next;
        }
        c->q_head = c->q_tail = NULL;
        c->q_len = 0;
        if (!c->finish_requested && c->on_drain) {
            drain = c->on_drain;
            arg = c->drain_arg;
        }
    } else {
        pump_locked(c);
        if (!c->send_pending && !c->finish_requested && c->on_drain) {
            drain = c->on_drain;
            arg = c->drain_arg;
        }
    }
    pthread_mutex_unlock(&c->mu);
    if (fire_cancel)
        mark_cancelled(c);
    if (drain && !ok) {
        /* The cancel hook may have finished the call just now: then nobody waits. */
        pthread_mutex_lock(&c->mu);
        if (c->finish_requested)
            drain = NULL;
        pthread_mutex_unlock(&c->mu);
    }
    if (drain)
        drain(c, arg);
}

/* Bytes -> message: decompressed, strings checked on the wire (wire.c), then unpacked. */
static dm_status_t *decode_bb(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb,
                              ProtobufCMessage **out)
{
    grpc_byte_buffer_reader r;
    const char *bad = NULL;
    *out = NULL;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "cannot read request message (bad compression)");
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    if (!dm_wire_strings_ok(d, GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s), &bad)) {
        grpc_slice_unref(s);
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "%s: must be valid UTF-8 without NUL characters", bad);
    }
    *out = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    if (!*out)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "cannot parse request: not a valid %s message", d->name);
    return NULL;
}

void dm_call_recv(dm_call_t *c, dm_recv_fn fn, void *arg)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_bb;
    c->recv_fn = fn;
    c->recv_arg = arg;
    atomic_fetch_add(&c->refs, 1);
    /* Receive batches are serialised among themselves by the one-read-at-a-time rule and
     * may run beside send batches (grpc.h). */
    grpc_call_error err = grpc_call_start_batch(c->call, &op, 1, &c->t_recv, NULL);
    if (err != GRPC_CALL_OK) {
        atomic_fetch_sub(&c->refs, 1);
        fn(c, NULL, dm_status_new(GRPC_STATUS_INTERNAL, "cannot read the request stream"), arg);
    }
}

static void on_recv_done(dm_call_t *c, bool ok)
{
    grpc_byte_buffer *bb = c->recv_bb;
    c->recv_bb = NULL;
    if (!ok) {
        if (bb)
            grpc_byte_buffer_destroy(bb);
        c->recv_fn(c, NULL, dm_status_new(GRPC_STATUS_CANCELLED, "request stream broken"),
                   c->recv_arg);
        return;
    }
    if (!bb) {
        c->recv_fn(c, NULL, NULL, c->recv_arg); /* half-close: end of the client stream */
        return;
    }
    ProtobufCMessage *msg = NULL;
    dm_status_t *st = decode_bb(c->method->input, bb, &msg);
    grpc_byte_buffer_destroy(bb);
    if (st) {
        c->recv_fn(c, NULL, st, c->recv_arg);
        return;
    }
    c->recv_fn(c, msg, NULL, c->recv_arg);
}

void *dm_call_app(dm_call_t *c)
{
    return c->srv->app;
}

const dm_method_t *dm_call_method(dm_call_t *c)
{
    return c->method;
}

const ProtobufCMessage *dm_call_request(dm_call_t *c)
{
    return c->request;
}

const char *dm_call_metadata(dm_call_t *c, const char *key, size_t *len)
{
    for (size_t i = 0; i < c->md.count; i++) {
        if (grpc_slice_str_cmp(c->md.metadata[i].key, key) == 0) {
            *len = GRPC_SLICE_LENGTH(c->md.metadata[i].value);
            return (const char *)GRPC_SLICE_START_PTR(c->md.metadata[i].value);
        }
    }
    *len = 0;
    return NULL;
}

int64_t dm_call_deadline_left_ms(dm_call_t *c)
{
    if (gpr_time_cmp(c->deadline, gpr_inf_future(c->deadline.clock_type)) == 0)
        return INT64_MAX;
    return gpr_time_to_millis(gpr_time_sub(c->deadline, gpr_now(c->deadline.clock_type)));
}

bool dm_call_cancelled(dm_call_t *c)
{
    return atomic_load(&c->cancelled);
}

void dm_call_set_data(dm_call_t *c, void *data, void (*free_fn)(void *))
{
    c->data = data;
    c->data_free = free_fn;
}

void dm_call_attach(dm_call_t *c, void *p, void (*free_fn)(void *))
{
    pthread_mutex_lock(&c->mu);
    if (c->n_attached == (int)DM_ARRAY_LEN(c->attached))
        abort(); /* a bug: more than a call ever needs */
    c->attached[c->n_attached].p = p;
    c->attached[c->n_attached].free_fn = free_fn;
    c->n_attached++;
    pthread_mutex_unlock(&c->mu);
}

void *dm_call_data(dm_call_t *c)
{
    return c->data;
}

const void *dm_call_principal(dm_call_t *c)
{
    return c->principal;
}

void dm_call_set_principal(dm_call_t *c, const void *p)
{
    c->principal = p;
}

void dm_call_set_principal_owned(dm_call_t *c, void *p, void (*free_fn)(void *))
{
    if (c->principal_free)
        c->principal_free((void *)c->principal);
    c->principal = p;
    c->principal_free = free_fn;
}

bool dm_call_auth_property(dm_call_t *c, const char *name, char **out, size_t *len)
{
    grpc_auth_context *ctx = grpc_call_auth_context(c->call);
    bool found = false;
    if (!ctx)
        return false;
    grpc_auth_property_iterator it = grpc_auth_context_find_properties_by_name(ctx, name);
    const grpc_auth_property *prop = grpc_auth_property_iterator_next(&it);
    if (prop) {
        *out = dm_strndup(prop->value, prop->value_length);
        *len = prop->value_length;
        found = true;
    }
    grpc_auth_context_release(ctx);
    return found;
}

const char *dm_call_purpose(dm_call_t *c)
{
    return c->purpose;
}

void dm_call_set_purpose(dm_call_t *c, const char *purpose)
{
    snprintf(c->purpose, sizeof(c->purpose), "%s", purpose);
}

bool dm_call_peer_subject(dm_call_t *c, char *buf, size_t len)
{
    grpc_auth_context *ctx = grpc_call_auth_context(c->call);
    bool found = false;
    if (!ctx)
        return false;
    grpc_auth_property_iterator it =
        grpc_auth_context_find_properties_by_name(ctx, GRPC_X509_SUBJECT_PROPERTY_NAME);
    const grpc_auth_property *prop = grpc_auth_property_iterator_next(&it);
    if (prop && prop->value_length < len) {
        memcpy(buf, prop->value, prop->value_length);
        buf[prop->value_length] = '\0';
        found = true;
    }
    grpc_auth_context_release(ctx);
    return found;
}

void dm_server_set_authorizer(dm_server_t *srv, dm_authorize_fn fn, void *arg)
{
    srv->authorize = fn;
    srv->authorize_arg = arg;
}

static bool decode_request(dm_call_t *c)
{
    if (!c->payload) {
        /* HEADERS arrived but the stream was reset (or carried no message) before DATA. */
        dm_call_finish(c, dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "missing request message %s",
                                        c->method->input->name));
        return false;
    }
    dm_status_t *st = decode_bb(c->method->input, c->payload, &c->request);
    grpc_byte_buffer_destroy(c->payload);
    c->payload = NULL;
    if (st) {
        dm_call_finish(c, st);
        return false;
    }
    return true;
}

/* Request metadata as max_metadata_bytes counts it: over the entries the call received (the
 * headers gRPC consumes itself, such as :path, :authority, content-type, te and
 * grpc-timeout, are not among them), key length + value length + METADATA_ENTRY_OVERHEAD
 * each; a -bin value counts decoded, as it arrives here. */
static size_t metadata_bytes(const grpc_metadata_array *md)
{
    size_t n = 0;
    for (size_t i = 0; i < md->count; i++)
        n += GRPC_SLICE_LENGTH(md->metadata[i].key) + GRPC_SLICE_LENGTH(md->metadata[i].value) +
             METADATA_ENTRY_OVERHEAD;
    return n;
}

static void start_call(dm_call_t *c)
{
    grpc_op op;

    /* RECV_CLOSE first, in its own batch, so cancellation is seen while we work. */
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->close_cancelled;
    atomic_fetch_add(&c->refs, 1);
    grpc_call_error err = grpc_call_start_batch(c->call, &op, 1, &c->t_close, NULL);
    if (err != GRPC_CALL_OK) {
        pthread_mutex_lock(&c->mu);
        batch_failed(c, err, "recv_close");
        pthread_mutex_unlock(&c->mu);
        atomic_fetch_sub(&c->refs, 1);
        dm_call_finish(c, NULL);
        return;
    }

    /* First, so that a refused call is neither authorised nor routed and writes nothing. */
    size_t md_bytes = metadata_bytes(&c->md);
    size_t md_limit = c->probe ? PROBE_MAX_METADATA : c->srv->max_metadata_bytes;
    if (md_bytes > md_limit) {
        dm_call_finish(c, dm_status_new(GRPC_STATUS_RESOURCE_EXHAUSTED,
                                        "request metadata is %zu bytes, limit %zu", md_bytes,
                                        md_limit));
        return;
    }
    if (c->probe) {
        /* One answer for every other path, whether or not the main listener serves it: the
         * probe listener is no oracle of the API, and it authenticates nobody. */
        if (!c->method) {
            dm_call_finish(c, dm_status_new(GRPC_STATUS_UNIMPLEMENTED,
                                            "the probe listener serves %s only",
                                            c->srv->probe_method->path));
            return;
        }
        if (decode_request(c))
            c->method->handler(c);
        return;
    }
    if (!c->method) {
        char *method = dm_strndup((const char *)GRPC_SLICE_START_PTR(c->details.method),
                                  GRPC_SLICE_LENGTH(c->details.method));
        dm_call_finish(c, dm_status_new(GRPC_STATUS_UNIMPLEMENTED,
                                        "unknown method %.200s: not part of the domicile API",
                                        method));
        free(method);
        return;
    }
    if (c->srv->authorize) {
        dm_status_t *denied = c->srv->authorize(c, c->srv->authorize_arg);
        if (denied) {
            dm_call_finish(c, denied);
            return;
        }
    }
    if (!c->method->handler) {
        dm_call_finish(
            c, dm_status_new(GRPC_STATUS_UNIMPLEMENTED, "method %s is not implemented yet (%s)",
                             c->method->path,
                             c->method->pending_issue ? c->method->pending_issue : "planned"));
        return;
    }
    if (!client_streams(c->method) && !decode_request(c))
        return;
    c->method->handler(c);
}

static void handle_new(cq_worker_t *w, dm_call_t *c, bool ok)
{
    if (!ok) {
        /* Shutdown: the posted request is returned unused. Do not re-post. */
        call_unref(c);
        return;
    }
    c->active = true;
    clock_gettime(CLOCK_MONOTONIC, &c->started);
    atomic_fetch_add(&w->srv->active_calls, 1);
    if (!c->method)
        c->deadline = c->details.deadline;
    post_request(w, c->method_index, c->method == NULL, c->probe);
    start_call(c);
}

static void *worker_main(void *arg)
{
    cq_worker_t *w = arg;
    for (;;) {
        grpc_event ev =
            grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        dm_tag_t *t = ev.tag;
        dm_call_t *c = t->call;
        switch (t->kind) {
        case TAG_NEW:
            handle_new(w, c, ev.success);
            break;
        case TAG_CLOSE:
            if (c->close_cancelled)
                mark_cancelled(c);
            call_unref(c);
            break;
        case TAG_SEND:
            on_send_done(c, ev.success);
            call_unref(c);
            break;
        case TAG_RECV:
            on_recv_done(c, ev.success);
            call_unref(c);
            break;
        case TAG_SHUTDOWN:
        case TAG_PROBE_SHUTDOWN: {
            dm_server_t *srv = w->srv;
            pthread_mutex_lock(&srv->mu);
            if (t->kind == TAG_SHUTDOWN)
                srv->shutdown_done = true;
            else
                srv->probe_shutdown_done = true;
            pthread_cond_broadcast(&srv->cond);
            pthread_mutex_unlock(&srv->mu);
            break;
        }
        }
    }
    return NULL;
}

static void post_request(cq_worker_t *w, size_t method_index, bool generic, bool probe)
{
    dm_server_t *srv = w->srv;
    grpc_call_error err;

    pthread_rwlock_rdlock(&srv->post_lock);
    if (probe ? srv->probe_shutting_down : srv->shutting_down) {
        pthread_rwlock_unlock(&srv->post_lock);
        return;
    }
    dm_call_t *c = call_new(w, method_index, generic, probe);
    grpc_server *gs = probe ? srv->probe : srv->server;
    if (generic) {
        err = grpc_server_request_call(gs, &c->call, &c->details, &c->md, w->cq, w->cq, &c->t_new);
    } else if (probe) {
        err = grpc_server_request_registered_call(gs, srv->probe_registered, &c->call, &c->deadline,
                                                  &c->md, &c->payload, w->cq, w->cq, &c->t_new);
    } else {
        bool with_payload = !client_streams(&srv->methods[method_index]);
        err = grpc_server_request_registered_call(
            srv->server, srv->registered[method_index], &c->call, &c->deadline, &c->md,
            with_payload ? &c->payload : NULL, w->cq, w->cq, &c->t_new);
    }
    pthread_rwlock_unlock(&srv->post_lock);
    if (err != GRPC_CALL_OK) {
        dm_error("server", "cannot post a request (error %d)", (int)err);
        call_unref(c);
    }
}

dm_status_t *dm_server_create(const dm_config_t *cfg, const dm_method_t *methods, size_t n_methods,
                              void *app, dm_server_t **out)
{
    dm_server_t *srv = dm_calloc(1, sizeof(*srv));
    grpc_arg args[4];

    srv->cfg = cfg;
    srv->methods = methods;
    srv->n_methods = n_methods;
    srv->app = app;
    srv->n_workers = cfg->threads;
    srv->max_metadata_bytes = (size_t)cfg->max_metadata_bytes;
    pthread_rwlock_init(&srv->post_lock, NULL);
    pthread_mutex_init(&srv->mu, NULL);
    pthread_cond_init(&srv->cond, NULL);
    atomic_init(&srv->live_calls, 0);
    atomic_init(&srv->active_calls, 0);
    srv->shutdown_tag = (dm_tag_t){TAG_SHUTDOWN, NULL};
    srv->probe_shutdown_tag = (dm_tag_t){TAG_PROBE_SHUTDOWN, NULL};
    srv->answered_md.key = grpc_slice_from_static_string("x-domicile-region");
    srv->answered_md.value = grpc_slice_from_copied_string(cfg->gateway_region);

    memset(args, 0, sizeof(args));
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = cfg->max_receive_message_bytes;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = cfg->max_send_message_bytes;
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = GRPC_ARG_MAX_METADATA_SIZE;
    args[2].value.integer =
        cfg->max_metadata_bytes > METADATA_BACKSTOP_MIN / METADATA_BACKSTOP_RATIO
            ? cfg->max_metadata_bytes * METADATA_BACKSTOP_RATIO
            : METADATA_BACKSTOP_MIN;
    args[3].type = GRPC_ARG_INTEGER;
    args[3].key = GRPC_ARG_MAX_CONCURRENT_STREAMS;
    args[3].value.integer = cfg->max_concurrent_streams;
    grpc_channel_args chargs = {DM_ARRAY_LEN(args), args};
    srv->server = grpc_server_create(&chargs, NULL);

    srv->workers = dm_calloc((size_t)srv->n_workers, sizeof(cq_worker_t));
    for (int i = 0; i < srv->n_workers; i++) {
        srv->workers[i].srv = srv;
        srv->workers[i].index = i;
        srv->workers[i].cq = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(srv->server, srv->workers[i].cq, NULL);
    }
    srv->registered = dm_calloc(n_methods, sizeof(void *));
    for (size_t i = 0; i < n_methods; i++) {
        grpc_server_register_method_payload_handling ph =
            client_streams(&methods[i]) ? GRPC_SRM_PAYLOAD_NONE
                                        : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER;
        srv->registered[i] = grpc_server_register_method(srv->server, methods[i].path, NULL, ph, 0);
        if (!srv->registered[i]) {
            dm_status_t *st =
                dm_status_new(GRPC_STATUS_INTERNAL, "cannot register method %s", methods[i].path);
            dm_server_destroy(srv);
            return st;
        }
    }
    *out = srv;
    return NULL;
}

dm_status_t *dm_server_add_probe(dm_server_t *srv, const char *listen, const dm_method_t *method)
{
    if (srv->probe || method->kind != DM_RPC_UNARY || !method->handler)
        return dm_status_new(GRPC_STATUS_INTERNAL, "probe listener: one unary method, once");
    grpc_resource_quota *quota = grpc_resource_quota_create("domicile-probe");
    grpc_resource_quota_resize(quota, PROBE_MEMORY_BYTES);
    grpc_arg args[11];
    memset(args, 0, sizeof(args));
    static const struct {
        const char *key;
        int value;
    } ints[] = {
        {GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, PROBE_MAX_MESSAGE},
        {GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, PROBE_MAX_MESSAGE},
        {GRPC_ARG_MAX_METADATA_SIZE, PROBE_METADATA_BACKSTOP},
        {GRPC_ARG_MAX_CONCURRENT_STREAMS, PROBE_MAX_STREAMS},
        {GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS, PROBE_HANDSHAKE_MS},
        {GRPC_ARG_MAX_CONNECTION_IDLE_MS, PROBE_IDLE_MS},
        {GRPC_ARG_MAX_CONNECTION_AGE_MS, PROBE_MAX_AGE_MS},
        {GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, PROBE_AGE_GRACE_MS},
        /* A probe is one small message: nothing to decompress into something larger. */
        {GRPC_ARG_ENABLE_PER_MESSAGE_DECOMPRESSION, 0},
        /* Core sets SO_REUSEPORT by default: another process of the same user could then bind
         * the port too and answer some of the probes. A taken port must fail the start. */
        {GRPC_ARG_ALLOW_REUSEPORT, 0},
    };
    size_t n = 0;
    for (; n < DM_ARRAY_LEN(ints); n++) {
        args[n].type = GRPC_ARG_INTEGER;
        args[n].key = (char *)ints[n].key;
        args[n].value.integer = ints[n].value;
    }
    args[n].type = GRPC_ARG_POINTER;
    args[n].key = GRPC_ARG_RESOURCE_QUOTA;
    args[n].value.pointer.p = quota;
    args[n].value.pointer.vtable = grpc_resource_quota_arg_vtable();
    n++;
    grpc_channel_args chargs = {n, args};
    srv->probe = grpc_server_create(&chargs, NULL);
    grpc_resource_quota_unref(quota); /* the server holds its own reference */
    for (int i = 0; i < srv->n_workers; i++)
        grpc_server_register_completion_queue(srv->probe, srv->workers[i].cq, NULL);
    srv->probe_method = method;
    srv->probe_registered = grpc_server_register_method(
        srv->probe, method->path, NULL, GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    srv->probe_listen = dm_strdup(listen);
    if (!srv->probe_registered)
        return dm_status_new(GRPC_STATUS_INTERNAL, "cannot register method %s (probe listener)",
                             method->path);
    return NULL;
}

int dm_server_probe_port(dm_server_t *srv)
{
    return srv->probe_port;
}

static grpc_server_credentials *make_credentials(const dm_config_t *cfg, dm_status_t **st)
{
    if (strcmp(cfg->transport, "tls") != 0) {
        dm_warn("server", "transport is plaintext (config says transport = \"plaintext\"): use "
                          "only on a trusted network");
        return grpc_insecure_server_credentials_create();
    }
    char *cert = dm_read_small_file(cfg->tls_cert_file, DM_PEM_MAX),
         *key = dm_read_small_file(cfg->tls_key_file, DM_PEM_MAX);
    char *ca = strcmp(cfg->mtls, "off") != 0
                   ? dm_read_small_file(cfg->tls_client_ca_file, DM_PEM_MAX)
                   : NULL;
    grpc_server_credentials *creds = NULL;
    if (!cert || !key || (strcmp(cfg->mtls, "off") != 0 && !ca)) {
        *st = dm_status_new(GRPC_STATUS_FAILED_PRECONDITION, "cannot read the TLS files");
        goto out;
    }
    grpc_ssl_pem_key_cert_pair pair = {key, cert};
    grpc_ssl_client_certificate_request_type req =
        strcmp(cfg->mtls, "require") == 0
            ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
        : strcmp(cfg->mtls, "request") == 0 ? GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY
                                            : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
    /* gRPC's SSL credentials negotiate TLS 1.2 at least (1.0/1.1 are never offered); the
     * test suite checks that with openssl s_client -tls1_1. */
    creds = grpc_ssl_server_credentials_create_ex(ca, &pair, 1, req, NULL);
    if (!creds)
        *st = dm_status_new(GRPC_STATUS_FAILED_PRECONDITION, "TLS credentials refused by gRPC");
    else
        dm_info("server", "transport is TLS (1.2 or newer), client certificates: %s", cfg->mtls);
out:
    if (key) {
        OPENSSL_cleanse(key, strlen(key));
        free(key);
    }
    free(cert);
    free(ca);
    return creds;
}

dm_status_t *dm_server_start(dm_server_t *srv, int *port)
{
    dm_status_t *st = NULL;
    grpc_server_credentials *creds = make_credentials(srv->cfg, &st);
    if (!creds)
        return st;
    int bound = grpc_server_add_http2_port(srv->server, srv->cfg->listen, creds);
    grpc_server_credentials_release(creds);
    if (bound == 0)
        return dm_status_new(GRPC_STATUS_UNAVAILABLE, "cannot listen on %s", srv->cfg->listen);
    if (srv->cfg->peer_listen[0]) {
        /* Gateways of the other regions: mutual TLS with the federation's CA, always. */
        char *cert = dm_read_small_file(srv->cfg->peer_cert_file, DM_PEM_MAX),
             *key = dm_read_small_file(srv->cfg->peer_key_file, DM_PEM_MAX);
        char *ca = dm_read_small_file(srv->cfg->peer_ca_file, DM_PEM_MAX);
        grpc_server_credentials *pc = NULL;
        if (cert && key && ca) {
            grpc_ssl_pem_key_cert_pair pair = {key, cert};
            pc = grpc_ssl_server_credentials_create_ex(
                ca, &pair, 1, GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY, NULL);
        }
        if (key) {
            OPENSSL_cleanse(key, strlen(key));
            free(key);
        }
        free(cert);
        free(ca);
        if (!pc)
            return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                                 "cannot read the peer TLS files (peer_cert_file, peer_key_file, "
                                 "peer_ca_file)");
        int pport = grpc_server_add_http2_port(srv->server, srv->cfg->peer_listen, pc);
        grpc_server_credentials_release(pc);
        if (pport == 0)
            return dm_status_new(GRPC_STATUS_UNAVAILABLE, "cannot listen on %s (peer_listen)",
                                 srv->cfg->peer_listen);
        dm_info("server", "peer listener (mutual TLS) on port %d", pport);
    }
    if (srv->probe) {
        grpc_server_credentials *ic = grpc_insecure_server_credentials_create();
        srv->probe_port = grpc_server_add_http2_port(srv->probe, srv->probe_listen, ic);
        grpc_server_credentials_release(ic);
        if (srv->probe_port == 0)
            return dm_status_new(GRPC_STATUS_UNAVAILABLE, "cannot listen on %s (probe_listen)",
                                 srv->probe_listen);
        dm_info("server", "probe listener (plaintext, %s only) on port %d", srv->probe_method->path,
                srv->probe_port);
    }
    grpc_server_start(srv->server);
    if (srv->probe)
        grpc_server_start(srv->probe);
    for (int i = 0; i < srv->n_workers; i++) {
        cq_worker_t *w = &srv->workers[i];
        for (size_t m = 0; m < srv->n_methods; m++)
            for (int k = 0; k < POSTED_PER_METHOD; k++)
                post_request(w, m, false, false);
        for (int k = 0; k < POSTED_GENERIC; k++)
            post_request(w, 0, true, false);
        for (int k = 0; srv->probe && k < POSTED_PROBE; k++) {
            post_request(w, 0, false, true);
            post_request(w, 0, true, true);
        }
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0)
            abort();
    }
    *port = bound;
    return NULL;
}

void dm_server_on_shutdown(dm_server_t *srv, void (*fn)(void *arg), void *arg)
{
    if (srv->n_hooks < (int)DM_ARRAY_LEN(srv->hooks))
        srv->hooks[srv->n_hooks++] = (struct hook){fn, arg};
}

/* Wait for *flag (shutdown_done or probe_shutdown_done, set under srv->mu). */
static bool wait_flag(dm_server_t *srv, const bool *flag, int timeout_ms)
{
    struct timespec until = dm_abstime_in_ms(timeout_ms);
    pthread_mutex_lock(&srv->mu);
    while (!*flag) {
        if (pthread_cond_timedwait(&srv->cond, &srv->mu, &until) == ETIMEDOUT)
            break;
    }
    bool done = *flag;
    pthread_mutex_unlock(&srv->mu);
    return done;
}

static bool wait_shutdown_tag(dm_server_t *srv, int timeout_ms)
{
    return wait_flag(srv, &srv->shutdown_done, timeout_ms);
}

/* After the main listener: until then a probe learns that the gateway is going (NOT_SERVING)
 * instead of finding the port closed. Its calls are answered at once, so none is waited for;
 * cancelling releases the idle connections that would hold the tag back. */
static void shutdown_probe(dm_server_t *srv)
{
    if (!srv->probe)
        return;
    pthread_rwlock_wrlock(&srv->post_lock);
    srv->probe_shutting_down = true;
    grpc_server_shutdown_and_notify(srv->probe, srv->workers[0].cq, &srv->probe_shutdown_tag);
    pthread_rwlock_unlock(&srv->post_lock);
    grpc_server_cancel_all_calls(srv->probe);
    while (!wait_flag(srv, &srv->probe_shutdown_done, 1000))
        dm_warn("server", "still waiting for the probe listener to stop");
}

void dm_server_shutdown(dm_server_t *srv, int grace_ms)
{
    pthread_rwlock_wrlock(&srv->post_lock);
    srv->shutting_down = true;
    grpc_server_shutdown_and_notify(srv->server, srv->workers[0].cq, &srv->shutdown_tag);
    pthread_rwlock_unlock(&srv->post_lock);
    dm_info("server", "shutting down: no new calls; %d in flight get %d ms to finish",
            atomic_load(&srv->active_calls), grace_ms);
    for (int i = 0; i < srv->n_hooks; i++)
        srv->hooks[i].fn(srv->hooks[i].arg);
    /* Wait for in-flight calls in short slices: once none is left, idle connections are all
     * that holds the shutdown tag back, and cancelling nothing releases them at once. */
    int64_t waited = 0;
    bool done = false;
    while (!done && waited < grace_ms) {
        int slice = grace_ms - waited < 100 ? (int)(grace_ms - waited) : 100;
        done = wait_shutdown_tag(srv, slice);
        waited += slice;
        if (!done && atomic_load(&srv->active_calls) == 0) {
            grpc_server_cancel_all_calls(srv->server);
            done = wait_shutdown_tag(srv, 1000);
        }
    }
    if (!done) {
        dm_warn("server", "grace period over: cancelling the calls still in flight");
        grpc_server_cancel_all_calls(srv->server);
        while (!wait_shutdown_tag(srv, 1000))
            dm_warn("server", "still waiting for %d calls to end", atomic_load(&srv->active_calls));
    }
    shutdown_probe(srv);
    dm_info("server", "server stopped");
}

void dm_server_destroy(dm_server_t *srv)
{
    if (!srv)
        return;
    bool started = false;
    for (int i = 0; i < srv->n_workers; i++)
        if (srv->workers[i].thread)
            started = true;
    if (started) {
        for (int i = 0; i < srv->n_workers; i++)
            grpc_completion_queue_shutdown(srv->workers[i].cq);
        for (int i = 0; i < srv->n_workers; i++)
            pthread_join(srv->workers[i].thread, NULL);
    } else if (srv->workers) {
        /* Never started (a listener could not bind): core still wants a shutdown before it
         * destroys a server that has listeners; then drain what is there. */
        if (srv->server)
            grpc_server_shutdown_and_notify(srv->server, srv->workers[0].cq, &srv->shutdown_tag);
        if (srv->probe)
            grpc_server_shutdown_and_notify(srv->probe, srv->workers[0].cq,
                                            &srv->probe_shutdown_tag);
        for (int i = 0; i < srv->n_workers; i++) {
            grpc_completion_queue_shutdown(srv->workers[i].cq);
            while (grpc_completion_queue_next(srv->workers[i].cq,
                                              gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL)
                       .type != GRPC_QUEUE_SHUTDOWN)
                ;
        }
    }
    if (atomic_load(&srv->live_calls) != 0)
        dm_error("server", "%d calls still alive at destroy (bug)", atomic_load(&srv->live_calls));
    if (srv->server)
        grpc_server_destroy(srv->server);
    if (srv->probe)
        grpc_server_destroy(srv->probe);
    for (int i = 0; i < srv->n_workers; i++)
        grpc_completion_queue_destroy(srv->workers[i].cq);
    free(srv->workers);
    free(srv->registered);
    free(srv->probe_listen);
    grpc_slice_unref(srv->answered_md.value);
    pthread_rwlock_destroy(&srv->post_lock);
    pthread_mutex_destroy(&srv->mu);
    pthread_cond_destroy(&srv->cond);
    free(srv);
}

int dm_server_live_calls(dm_server_t *srv)
{
    return atomic_load(&srv->live_calls);
}
