/*
 * The calling side of gateway to gateway: one TLS channel per peer gateway (client certificate
 * of this gateway, the peer's name checked against its region's `gateway_identity`), one
 * completion queue and thread for every outgoing call, a health thread.
 *
 * A call attempt that fails before any gateway answered it (UNAVAILABLE without the
 * x-domicile-region trailer every gateway answer carries) is tried on the region's next
 * gateway when the caller said it is safe to repeat; an answer of a gateway is never retried.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <libpq-fe.h>
#include <openssl/crypto.h>

#include "domicile/clock.h"
#include "domicile/log.h"
#include "domicile/peer.h"

#include "domicile/peer/v1/peer.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"

#define HEALTH_PATH    "/grpc.health.v1.Health/Check"
#define EXEC_PATH      "/domicile.peer.v1.PeerService/Exec"
#define MAX_COUNTS     256
#define MAX_PEER_MSG   (80 << 20)
#define PRINCIPAL_MAX  (64 << 10)
#define EP_UNKNOWN     0
#define EP_DOWN        1 /* no answer */
#define EP_NOT_SERVING 2 /* answers; its region's database does not */
#define EP_SERVING     3

typedef struct tag {
    void (*fn)(struct tag *t, bool ok);
} tag_t;

typedef struct endpoint {
    char *addr;
    grpc_channel *ch;
    atomic_int state; /* EP_* */
} endpoint_t;

typedef struct peer_region {
    dm_region_t *region;
    const dm_region_config_t *cfg;
    endpoint_t *eps;
    size_t n;
    atomic_uint next; /* round robin among healthy gateways */
} peer_region_t;

typedef struct pcall pcall_t;

struct dm_peers {
    const dm_config_t *cfg;
    dm_regions_t *regions;
    peer_region_t pr[DM_MAX_REGIONS]; /* by region index; n == 0 for the own region */
    grpc_completion_queue *cq;
    pthread_t cq_thread, health_thread;
    bool started, cq_done;
    atomic_bool stopping;
    pthread_mutex_t mu; /* live list, counts, health sleep */
    pthread_cond_t cond;
    pcall_t *live;
    int n_live;
    uint64_t next_id;
    struct {
        char origin[96]; /* the public method served, "" for maintenance */
        char path[96];   /* what was called at the peer */
        char region[DM_REGION_CODE_MAX + 1];
        int64_t n;
    } counts[MAX_COUNTS];
    size_t n_counts;
};

typedef enum { PC_UNARY, PC_STREAM, PC_HEALTH } pc_kind_t;

struct pcall {
    tag_t tag;
    uint64_t id; /* to cancel by, from a callback that may outlive the call */
    dm_peers_t *p;
    peer_region_t *pr;
    pc_kind_t kind;
    size_t ep;        /* endpoint of the current attempt */
    size_t attempts;  /* attempts started */
    bool retry;       /* safe to repeat on another gateway */
    bool got_message; /* stream: a message came: never retried from then on */
    bool recv_status; /* stream: the status batch is the one in flight */
    grpc_call *call;
    char *path;
    char origin[96]; /* public method this call serves (metrics) */
    grpc_slice req;  /* packed request, kept for a retry */
    const ProtobufCMessageDescriptor *out;
    grpc_metadata md[5];
    size_t n_md;
    gpr_timespec deadline;
    grpc_metadata_array initial_md, trailing_md;
    grpc_byte_buffer *recv;
    grpc_status_code status;
    grpc_slice details;
    dm_peer_reply_fn reply_fn;
    dm_peer_msg_fn msg_fn;
    dm_peer_end_fn end_fn;
    void *arg;
    pcall_t *prev, *next; /* p->live */
    /* PC_HEALTH */
    endpoint_t *hep;
};

struct dm_peer_stream {
    pcall_t pc;
};

/* ---- small helpers ---- */

static grpc_byte_buffer *bb_from_slice(grpc_slice s)
{
    return grpc_raw_byte_buffer_create(&s, 1);
}

static ProtobufCMessage *unpack_bb(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *d)
{
    grpc_byte_buffer_reader r;
    if (!bb || !grpc_byte_buffer_reader_init(&r, bb))
        return NULL;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    ProtobufCMessage *m =
        protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    return m;
}

static grpc_slice pack_msg(const ProtobufCMessage *msg)
{
    size_t n = protobuf_c_message_get_packed_size(msg);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(s));
    return s;
}

static bool md_has(const grpc_metadata_array *a, const char *key)
{
    for (size_t i = 0; i < a->count; i++)
        if (grpc_slice_str_cmp(a->metadata[i].key, key) == 0)
            return true;
    return false;
}

static void count_call(dm_peers_t *p, const char *origin, const char *path, const char *region)
{
    pthread_mutex_lock(&p->mu);
    size_t i;
    for (i = 0; i < p->n_counts; i++)
        if (strcmp(p->counts[i].origin, origin) == 0 && strcmp(p->counts[i].path, path) == 0 &&
            strcmp(p->counts[i].region, region) == 0)
            break;
    if (i == p->n_counts && i < MAX_COUNTS) {
        snprintf(p->counts[i].origin, sizeof(p->counts[i].origin), "%s", origin);
        snprintf(p->counts[i].path, sizeof(p->counts[i].path), "%s", path);
        snprintf(p->counts[i].region, sizeof(p->counts[i].region), "%s", region);
        p->n_counts++;
    }
    if (i < MAX_COUNTS)
        p->counts[i].n++;
    pthread_mutex_unlock(&p->mu);
}

void dm_peers_counts(dm_peers_t *p, dm_peer_count_fn fn, void *arg)
{
    pthread_mutex_lock(&p->mu);
    for (size_t i = 0; i < p->n_counts; i++)
        fn(arg, p->counts[i].origin, p->counts[i].path, p->counts[i].region, p->counts[i].n);
    pthread_mutex_unlock(&p->mu);
}

void dm_peers_health(dm_peers_t *p, dm_peer_health_fn fn, void *arg)
{
    for (size_t i = 0; i < dm_regions_count(p->regions); i++)
        for (size_t k = 0; k < p->pr[i].n; k++)
            fn(arg, p->pr[i].cfg->code, p->pr[i].eps[k].addr,
               atomic_load(&p->pr[i].eps[k].state) >= EP_NOT_SERVING);
}

static peer_region_t *peer_region(dm_peers_t *p, dm_region_t *r)
{
    for (size_t i = 0; i < dm_regions_count(p->regions); i++)
        if (dm_regions_at(p->regions, i) == r)
            return p->pr[i].n ? &p->pr[i] : NULL;
    return NULL;
}

/* ---- the principal asserted to the peer ---- */

static void add_md(pcall_t *pc, const char *key, const void *v, size_t len)
{
    pc->md[pc->n_md].key = grpc_slice_from_static_string(key);
    pc->md[pc->n_md].value = grpc_slice_from_copied_buffer(v, len);
    pc->n_md++;
}

static void assert_principal(pcall_t *pc, dm_call_t *call)
{
    const dm_config_t *cfg = pc->p->cfg;
    Domicile__Peer__V1__Principal m = DOMICILE__PEER__V1__PRINCIPAL__INIT;
    char *roles[8], role_buf[8][32], gw_name[64];
    const dm_principal_t *pr = call ? dm_call_principal(call) : NULL;
    if (pr) {
        m.name = pr->name;
        m.region = pr->region;
        for (unsigned bit = 0; bit < 8; bit++) {
            if (!(pr->roles & (1u << bit)))
                continue;
            dm_roles_format(1u << bit, role_buf[m.n_roles], sizeof(role_buf[0]));
            if (role_buf[m.n_roles][0]) {
                roles[m.n_roles] = role_buf[m.n_roles];
                m.n_roles++;
            }
        }
        m.roles = roles;
        m.n_tenants = pr->n_tenants;
        m.tenants = pr->tenants;
        m.default_purpose = pr->default_purpose ? pr->default_purpose : "";
        m.purpose = (char *)dm_call_purpose(call);
    } else {
        /* The gateway's own maintenance (witnesses, request delivery): no roles at all, so
         * the callee lets it run maintenance statements only. */
        snprintf(gw_name, sizeof(gw_name), "gateway:%s", cfg->gateway_region);
        m.name = gw_name;
        m.region = cfg->gateway_region;
    }
    size_t n = protobuf_c_message_get_packed_size(&m.base);
    unsigned char *buf = dm_malloc(n ? n : 1);
    protobuf_c_message_pack(&m.base, buf);
    add_md(pc, DM_PEER_PRINCIPAL_MD, buf, n);
    free(buf);
    add_md(pc, DM_PEER_REGION_MD, cfg->gateway_region, strlen(cfg->gateway_region));
    /* The public method the call serves: a message of BulkPutRecords goes as a PutRecord,
     * and its ledger entry still names the method the client called. */
    if (call && dm_call_method(call))
        add_md(pc, DM_PEER_ORIGIN_MD, dm_call_method(call)->path,
               strlen(dm_call_method(call)->path));
    size_t len = 0;
    const char *rid = call ? dm_call_metadata(call, "x-request-id", &len) : NULL;
    if (rid && len > 0 && len <= 128)
        add_md(pc, "x-request-id", rid, len);
}

/* ---- call attempts ---- */

static void live_add(pcall_t *pc)
{
    dm_peers_t *p = pc->p;
    pthread_mutex_lock(&p->mu);
    pc->id = ++p->next_id;
    pc->next = p->live;
    if (p->live)
        p->live->prev = pc;
    p->live = pc;
    p->n_live++;
    pthread_mutex_unlock(&p->mu);
}

static void live_remove(pcall_t *pc)
{
    dm_peers_t *p = pc->p;
    pthread_mutex_lock(&p->mu);
    if (pc->prev)
        pc->prev->next = pc->next;
    else
        p->live = pc->next;
    if (pc->next)
        pc->next->prev = pc->prev;
    pc->prev = pc->next = NULL;
    p->n_live--;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->mu);
}

static void attempt_reset(pcall_t *pc)
{
    if (pc->call) {
        grpc_call_unref(pc->call);
        pc->call = NULL;
    }
    grpc_metadata_array_destroy(&pc->initial_md);
    grpc_metadata_array_destroy(&pc->trailing_md);
    grpc_metadata_array_init(&pc->initial_md);
    grpc_metadata_array_init(&pc->trailing_md);
    if (pc->recv) {
        grpc_byte_buffer_destroy(pc->recv);
        pc->recv = NULL;
    }
    grpc_slice_unref(pc->details);
    pc->details = grpc_empty_slice();
    pc->status = GRPC_STATUS_OK;
}

static void pcall_free(pcall_t *pc)
{
    attempt_reset(pc);
    grpc_metadata_array_destroy(&pc->initial_md);
    grpc_metadata_array_destroy(&pc->trailing_md);
    grpc_slice_unref(pc->req);
    for (size_t i = 0; i < pc->n_md; i++)
        grpc_slice_unref(pc->md[i].value);
    free(pc->path);
    free(pc);
}

/* The server call a peer call serves was cancelled: cancel the peer call if still live. */
static void cancel_by_id(dm_peers_t *p, uint64_t id)
{
    pthread_mutex_lock(&p->mu);
    for (pcall_t *pc = p->live; pc; pc = pc->next)
        if (pc->id == id && pc->call)
            grpc_call_cancel(pc->call, NULL);
    pthread_mutex_unlock(&p->mu);
}

static void on_server_cancel(dm_call_t *call, void *arg)
{
    dm_app_peers_cancel(call, (uint64_t)(uintptr_t)arg);
}

void dm_peers_cancel(dm_peers_t *p, uint64_t id)
{
    cancel_by_id(p, id);
}

/* Which gateway next: a serving one in turn, else one that answers, else any. */
static size_t pick_endpoint(peer_region_t *pr, size_t attempt, size_t first)
{
    if (attempt > 0)
        return (first + attempt) % pr->n;
    unsigned start = atomic_fetch_add(&pr->next, 1);
    for (int want = EP_SERVING; want >= EP_UNKNOWN; want--) {
        for (size_t k = 0; k < pr->n; k++) {
            size_t i = (start + k) % pr->n;
            int st = atomic_load(&pr->eps[i].state);
            if (st == want || (want == EP_UNKNOWN && st == EP_DOWN))
                return i;
        }
    }
    return start % pr->n;
}

static dm_status_t *status_of(pcall_t *pc, bool answered)
{
    char *details = grpc_slice_to_c_string(pc->details);
    dm_status_t *st;
    if (!answered && pc->status == GRPC_STATUS_UNAVAILABLE)
        st = dm_status_new(GRPC_STATUS_UNAVAILABLE,
                           "region \"%s\" is unavailable: no gateway of the region answered",
                           pc->pr->cfg->code);
    else if (!answered && pc->status == GRPC_STATUS_DEADLINE_EXCEEDED)
        st = dm_status_new(GRPC_STATUS_DEADLINE_EXCEEDED,
                           "deadline exceeded waiting for region \"%s\"", pc->pr->cfg->code);
    else
        st = dm_status_new(pc->status == GRPC_STATUS_OK ? GRPC_STATUS_INTERNAL : pc->status, "%s",
                           details);
    if (!answered)
        dm_status_detail(st, "peer %s: %s", pc->pr->eps[pc->ep].addr, details);
    gpr_free(details);
    return st;
}

static void unary_done(tag_t *t, bool ok);
static void stream_first_done(tag_t *t, bool ok);

static bool start_attempt(pcall_t *pc)
{
    dm_peers_t *p = pc->p;
    size_t first = pc->ep;
    pc->ep = pick_endpoint(pc->pr, pc->attempts, first);
    pc->attempts++;
    attempt_reset(pc);
    endpoint_t *ep = &pc->pr->eps[pc->ep];
    grpc_slice method = grpc_slice_from_copied_string(pc->path);
    pc->call = grpc_channel_create_call(ep->ch, NULL, GRPC_PROPAGATE_DEFAULTS, p->cq, method, NULL,
                                        pc->deadline, NULL);
    grpc_slice_unref(method);
    if (pc->kind != PC_HEALTH)
        count_call(p, pc->origin, pc->path, pc->pr->cfg->code);

    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    size_t n = 0;
    grpc_byte_buffer *bb = bb_from_slice(pc->req);
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].data.send_initial_metadata.count = pc->n_md;
    ops[n].data.send_initial_metadata.metadata = pc->md;
    /* A gateway not health-checked yet (this one just started, or it did) is waited for
     * while the channel connects, within the deadline; one known to be down fails fast, so
     * that the call moves on to another gateway or answers UNAVAILABLE at once. */
    if (atomic_load(&ep->state) == EP_UNKNOWN)
        ops[n].flags = GRPC_INITIAL_METADATA_WAIT_FOR_READY |
                       GRPC_INITIAL_METADATA_WAIT_FOR_READY_EXPLICITLY_SET;
    n++;
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = bb;
    n++;
    ops[n].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    n++;
    ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[n].data.recv_initial_metadata.recv_initial_metadata = &pc->initial_md;
    n++;
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n].data.recv_message.recv_message = &pc->recv;
    n++;
    if (pc->kind != PC_STREAM) {
        ops[n].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
        ops[n].data.recv_status_on_client.trailing_metadata = &pc->trailing_md;
        ops[n].data.recv_status_on_client.status = &pc->status;
        ops[n].data.recv_status_on_client.status_details = &pc->details;
        n++;
        pc->tag.fn = unary_done;
    } else {
        pc->tag.fn = stream_first_done;
    }
    grpc_call_error e = grpc_call_start_batch(pc->call, ops, n, &pc->tag, NULL);
    grpc_byte_buffer_destroy(bb);
    return e == GRPC_CALL_OK;
}

static void fail_now(pcall_t *pc, dm_status_t *st)
{
    if (pc->reply_fn)
        pc->reply_fn(pc->arg, NULL, st);
    else if (pc->end_fn)
        pc->end_fn(pc->arg, st);
    else
        dm_status_free(st);
    pcall_free(pc);
}

static pcall_t *pcall_new(dm_peers_t *p, dm_region_t *r, dm_call_t *call, const char *path,
                          const ProtobufCMessage *req, const ProtobufCMessageDescriptor *out,
                          pc_kind_t kind, dm_status_t **err)
{
    peer_region_t *pr = peer_region(p, r);
    if (!pr) {
        *err = dm_status_new(GRPC_STATUS_INTERNAL, "region \"%s\" has no peer gateways",
                             dm_region_code(r));
        return NULL;
    }
    pcall_t *pc = kind == PC_STREAM
                      ? &((dm_peer_stream_t *)dm_calloc(1, sizeof(dm_peer_stream_t)))->pc
                      : dm_calloc(1, sizeof(pcall_t));
    pc->p = p;
    pc->pr = pr;
    pc->kind = kind;
    pc->path = dm_strdup(path);
    pc->out = out;
    pc->req = pack_msg(req);
    pc->details = grpc_empty_slice();
    grpc_metadata_array_init(&pc->initial_md);
    grpc_metadata_array_init(&pc->trailing_md);
    int64_t left = call ? dm_call_deadline_left_ms(call) : INT64_MAX;
    int64_t ms =
        left == INT64_MAX ? p->cfg->peer_timeout_ms : left - p->cfg->peer_deadline_margin_ms;
    if (ms <= 0) {
        *err = dm_status_new(GRPC_STATUS_DEADLINE_EXCEEDED,
                             "deadline too close to reach region \"%s\"", pr->cfg->code);
        pcall_free(pc);
        return NULL;
    }
    pc->deadline =
        gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
    if (kind != PC_HEALTH)
        assert_principal(pc, call);
    if (call && dm_call_method(call))
        snprintf(pc->origin, sizeof(pc->origin), "%s", dm_call_method(call)->path);
    return pc;
}

static void launch(pcall_t *pc, dm_call_t *call)
{
    if (atomic_load(&pc->p->stopping)) {
        fail_now(pc, dm_status_new(GRPC_STATUS_UNAVAILABLE, "gateway is shutting down"));
        return;
    }
    live_add(pc);
    /* A call may have several peer calls in turn (a stream's chunks, a bulk's messages): the
     * last one registered is the one cancelled with it. */
    if (call && pc->kind != PC_HEALTH)
        dm_call_on_cancel_module(call, on_server_cancel, (void *)(uintptr_t)pc->id);
    if (!start_attempt(pc)) {
        live_remove(pc);
        fail_now(pc, dm_status_new(GRPC_STATUS_INTERNAL, "could not start a call to region \"%s\"",
                                   pc->pr->cfg->code));
    }
}

/* After a failed attempt: another gateway, when that is safe and one is left. */
static bool try_again(pcall_t *pc, bool answered)
{
    if (answered || pc->status != GRPC_STATUS_UNAVAILABLE)
        return false;
    atomic_store(&pc->pr->eps[pc->ep].state, EP_DOWN);
    if (!pc->retry || pc->got_message || pc->attempts >= pc->pr->n || atomic_load(&pc->p->stopping))
        return false;
    dm_warn("peer", "region %s: gateway %s did not answer; trying the next one", pc->pr->cfg->code,
            pc->pr->eps[pc->ep].addr);
    return start_attempt(pc);
}

static void unary_done(tag_t *t, bool ok)
{
    pcall_t *pc = (pcall_t *)t;
    bool answered = md_has(&pc->trailing_md, DM_PEER_ANSWERED_MD);
    if (pc->status != GRPC_STATUS_OK && try_again(pc, answered))
        return;
    live_remove(pc);
    if (pc->status == GRPC_STATUS_OK) {
        ProtobufCMessage *m = unpack_bb(pc->recv, pc->out);
        if (m)
            pc->reply_fn(pc->arg, m, NULL);
        else
            pc->reply_fn(pc->arg, NULL,
                         dm_status_new(GRPC_STATUS_INTERNAL,
                                       "region \"%s\" sent an answer that does not decode",
                                       pc->pr->cfg->code));
    } else {
        pc->reply_fn(pc->arg, NULL, status_of(pc, answered));
    }
    pcall_free(pc);
}

/* ---- streams ---- */

static void stream_status_done(tag_t *t, bool ok)
{
    pcall_t *pc = (pcall_t *)t;
    bool answered = md_has(&pc->trailing_md, DM_PEER_ANSWERED_MD);
    if (pc->status != GRPC_STATUS_OK && try_again(pc, answered))
        return;
    live_remove(pc);
    pc->end_fn(pc->arg, pc->status == GRPC_STATUS_OK ? NULL : status_of(pc, answered));
    pcall_free(pc); /* the stream's pcall_t is its first member */
}

static void stream_got(pcall_t *pc)
{
    if (!pc->recv) {
        /* End of the messages: the status tells how the stream ended. */
        grpc_op op;
        memset(&op, 0, sizeof(op));
        op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
        op.data.recv_status_on_client.trailing_metadata = &pc->trailing_md;
        op.data.recv_status_on_client.status = &pc->status;
        op.data.recv_status_on_client.status_details = &pc->details;
        pc->tag.fn = stream_status_done;
        if (grpc_call_start_batch(pc->call, &op, 1, &pc->tag, NULL) != GRPC_CALL_OK)
            abort();
        return;
    }
    ProtobufCMessage *m = unpack_bb(pc->recv, pc->out);
    grpc_byte_buffer_destroy(pc->recv);
    pc->recv = NULL;
    if (!m) {
        grpc_call_cancel_with_status(pc->call, GRPC_STATUS_INTERNAL, "message does not decode",
                                     NULL);
        pc->recv = NULL;
        stream_got(pc);
        return;
    }
    pc->got_message = true;
    pc->msg_fn(pc->arg, (dm_peer_stream_t *)pc, m);
}

static void stream_next_done(tag_t *t, bool ok)
{
    stream_got((pcall_t *)t);
}

static void stream_first_done(tag_t *t, bool ok)
{
    stream_got((pcall_t *)t);
}

void dm_peer_stream_next(dm_peer_stream_t *s)
{
    pcall_t *pc = &s->pc;
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &pc->recv;
    pc->tag.fn = stream_next_done;
    if (grpc_call_start_batch(pc->call, &op, 1, &pc->tag, NULL) != GRPC_CALL_OK)
        abort();
}

void dm_peer_stream_cancel(dm_peer_stream_t *s)
{
    grpc_call_cancel(s->pc.call, NULL);
}

/* ---- public entry points ---- */

void dm_peer_unary(dm_peers_t *p, dm_region_t *r, dm_call_t *call, const char *path,
                   const ProtobufCMessage *req, const ProtobufCMessageDescriptor *out, bool retry,
                   dm_peer_reply_fn fn, void *arg)
{
    dm_status_t *err = NULL;
    pcall_t *pc = pcall_new(p, r, call, path, req, out, PC_UNARY, &err);
    if (!pc) {
        fn(arg, NULL, err);
        return;
    }
    pc->retry = retry;
    pc->reply_fn = fn;
    pc->arg = arg;
    launch(pc, call);
}

void dm_peer_stream(dm_peers_t *p, dm_region_t *r, dm_call_t *call, const char *path,
                    const ProtobufCMessage *req, const ProtobufCMessageDescriptor *out,
                    dm_peer_msg_fn on_msg, dm_peer_end_fn on_end, void *arg)
{
    dm_status_t *err = NULL;
    pcall_t *pc = pcall_new(p, r, call, path, req, out, PC_STREAM, &err);
    if (!pc) {
        on_end(arg, err);
        return;
    }
    pc->retry = true; /* only until the first message: reads */
    pc->msg_fn = on_msg;
    pc->end_fn = on_end;
    pc->arg = arg;
    launch(pc, call);
}

/* ---- Exec: a job of a peer region ---- */

typedef struct exec_ctx {
    dm_job_t *job;
} exec_ctx_t;

static PGresult *result_from(const Domicile__Peer__V1__ExecResponse *m)
{
    PGresult *res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
    if (m->n_columns) {
        PGresAttDesc *att = dm_calloc(m->n_columns, sizeof(PGresAttDesc));
        for (size_t i = 0; i < m->n_columns; i++) {
            att[i].name = m->columns[i]->name;
            att[i].typid = m->columns[i]->type_oid;
            att[i].format = m->columns[i]->format;
            att[i].typlen = m->columns[i]->type_len;
            att[i].atttypmod = m->columns[i]->type_mod;
        }
        int ok = PQsetResultAttrs(res, (int)m->n_columns, att);
        free(att);
        if (!ok) {
            PQclear(res);
            return NULL;
        }
    }
    for (size_t row = 0; row < m->n_rows; row++) {
        const Domicile__Peer__V1__ExecRow *rw = m->rows[row];
        if (rw->n_values != m->n_columns) {
            PQclear(res);
            return NULL;
        }
        for (size_t col = 0; col < rw->n_values; col++) {
            const Domicile__Peer__V1__ExecValue *v = rw->values[col];
            /* PQsetvalue copies; an empty non-NULL value needs a non-NULL pointer. */
            if (!PQsetvalue(res, (int)row, (int)col,
                            v->is_null ? NULL : (char *)(v->data.data ? (char *)v->data.data : ""),
                            v->is_null ? -1 : (int)v->data.len)) {
                PQclear(res);
                return NULL;
            }
        }
    }
    return res;
}

static void exec_reply(void *arg, ProtobufCMessage *reply, dm_status_t *err)
{
    dm_job_t *job = arg;
    if (err) {
        job->done(job, NULL, err);
        return;
    }
    PGresult *res = result_from((Domicile__Peer__V1__ExecResponse *)reply);
    protobuf_c_message_free_unpacked(reply, NULL);
    if (!res) {
        job->done(job, NULL,
                  dm_status_new(GRPC_STATUS_INTERNAL, "a peer region's result does not decode"));
        return;
    }
    job->done(job, res, NULL);
    PQclear(res);
}

void dm_peers_submit(void *peers, dm_region_t *r, dm_job_t *job)
{
    dm_peers_t *p = peers;
    Domicile__Peer__V1__ExecRequest req = DOMICILE__PEER__V1__EXEC_REQUEST__INIT;
    Domicile__Peer__V1__ExecParam params[DM_JOB_MAX_PARAMS], *pp[DM_JOB_MAX_PARAMS];
    req.statement = (char *)dm_sql[job->stmt].name;
    dm_call_t *call = job->owner; /* in the gateway, a job's owner is the call it serves */
    req.method = call ? (char *)dm_call_method(call)->path : "";
    for (int i = 0; i < job->n_params; i++) {
        domicile__peer__v1__exec_param__init(&params[i]);
        params[i].is_null = job->values[i] == NULL;
        params[i].binary = job->formats[i] == 1;
        if (job->values[i]) {
            params[i].value.data = (uint8_t *)job->values[i];
            params[i].value.len =
                job->formats[i] == 1 ? (size_t)job->lengths[i] : strlen(job->values[i]);
        }
        pp[i] = &params[i];
    }
    req.n_params = (size_t)job->n_params;
    req.params = pp;
    /* Every allow-listed statement is safe to repeat: reads, or writes keyed by a request id
     * or a version. */
    dm_peer_unary(p, r, call, EXEC_PATH, &req.base, &domicile__peer__v1__exec_response__descriptor,
                  true, exec_reply, job);
}

/* ---- forwarding a whole call ---- */

typedef struct fwd {
    dm_call_t *call;
    dm_peer_stream_t *stream;
    atomic_bool awaiting_drain;
} fwd_t;

static void fwd_reply(void *arg, ProtobufCMessage *reply, dm_status_t *err)
{
    dm_call_t *call = arg;
    if (err) {
        dm_call_finish(call, err);
        return;
    }
    dm_call_reply(call, reply);
    protobuf_c_message_free_unpacked(reply, NULL);
}

static void fwd_drained(dm_call_t *call, void *arg)
{
    fwd_t *f = arg;
    if (dm_call_queued(call) == 0 && atomic_exchange(&f->awaiting_drain, false))
        dm_peer_stream_next(f->stream);
}

static void fwd_msg(void *arg, dm_peer_stream_t *s, ProtobufCMessage *msg)
{
    fwd_t *f = arg;
    f->stream = s;
    bool alive = dm_call_send(f->call, msg);
    protobuf_c_message_free_unpacked(msg, NULL);
    if (!alive) {
        dm_peer_stream_cancel(s);
        dm_peer_stream_next(s);
        return;
    }
    atomic_store(&f->awaiting_drain, true);
    if (dm_call_queued(f->call) == 0 && atomic_exchange(&f->awaiting_drain, false))
        dm_peer_stream_next(s);
}

static void fwd_end(void *arg, dm_status_t *err)
{
    fwd_t *f = arg; /* freed with the call: a drain callback may still be on its way */
    dm_call_finish(f->call, err);
}

void dm_peer_forward(dm_peers_t *p, dm_region_t *r, dm_call_t *call)
{
    const dm_method_t *m = dm_call_method(call);
    const ProtobufCMessage *req = dm_call_request(call);
    dm_call_set_region(call, dm_region_code(r)); /* the access log names the data's region */
    if (m->kind == DM_RPC_UNARY) {
        /* Reads, and writes that carry a request id, are safe on another gateway. */
        const ProtobufCFieldDescriptor *fd =
            protobuf_c_message_descriptor_get_field_by_name(req->descriptor, "request_id");
        bool retry = !fd || (fd->type == PROTOBUF_C_TYPE_STRING &&
                             **(char **)((const char *)req + fd->offset) != '\0');
        dm_peer_unary(p, r, call, m->path, req, m->output, retry, fwd_reply, call);
        return;
    }
    if (m->kind != DM_RPC_SERVER_STREAM) {
        dm_call_finish(call, dm_status_new(GRPC_STATUS_INTERNAL,
                                           "%s cannot be forwarded to another region", m->path));
        return;
    }
    fwd_t *f = dm_calloc(1, sizeof(*f));
    f->call = call;
    dm_call_attach(call, f, free);
    dm_call_on_drain(call, fwd_drained, f);
    dm_peer_stream(p, r, call, m->path, req, m->output, fwd_msg, fwd_end, f);
}

/* ---- health ---- */

static void region_state(dm_peers_t *p, peer_region_t *pr)
{
    int best = EP_UNKNOWN;
    size_t at = 0;
    for (size_t i = 0; i < pr->n; i++) {
        int st = atomic_load(&pr->eps[i].state);
        if (st > best) {
            best = st;
            at = i;
        }
    }
    char err[160] = "";
    if (best == EP_NOT_SERVING)
        snprintf(err, sizeof(err), "the region's gateways answer; its database does not");
    else if (best != EP_SERVING)
        snprintf(err, sizeof(err), "no gateway of the region answers");
    dm_region_set_remote_state(pr->region, best == EP_SERVING,
                               best >= EP_NOT_SERVING ? pr->eps[at].addr : "", err);
}

static void health_done(tag_t *t, bool ok)
{
    pcall_t *pc = (pcall_t *)t;
    int st = EP_DOWN;
    if (pc->status == GRPC_STATUS_OK) {
        Grpc__Health__V1__HealthCheckResponse *r =
            (Grpc__Health__V1__HealthCheckResponse *)unpack_bb(
                pc->recv, &grpc__health__v1__health_check_response__descriptor);
        st = r && r->status == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                 ? EP_SERVING
                 : EP_NOT_SERVING;
        if (r)
            protobuf_c_message_free_unpacked(&r->base, NULL);
    } else if (md_has(&pc->trailing_md, DM_PEER_ANSWERED_MD)) {
        st = EP_NOT_SERVING;
    }
    atomic_store(&pc->hep->state, st);
    live_remove(pc);
    region_state(pc->p, pc->pr);
    pcall_free(pc);
}

static void health_round(dm_peers_t *p)
{
    for (size_t i = 0; i < dm_regions_count(p->regions); i++) {
        peer_region_t *pr = &p->pr[i];
        for (size_t k = 0; k < pr->n; k++) {
            Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
            char service[64];
            snprintf(service, sizeof(service), "domicile.region.%s", pr->cfg->code);
            req.service = service;
            pcall_t *pc = dm_calloc(1, sizeof(*pc));
            pc->p = p;
            pc->pr = pr;
            pc->kind = PC_HEALTH;
            pc->hep = &pr->eps[k];
            pc->path = dm_strdup(HEALTH_PATH);
            pc->req = pack_msg(&req.base);
            pc->details = grpc_empty_slice();
            grpc_metadata_array_init(&pc->initial_md);
            grpc_metadata_array_init(&pc->trailing_md);
            int ms =
                p->cfg->peer_health_interval_ms < 1000 ? 1000 : p->cfg->peer_health_interval_ms;
            pc->deadline =
                gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
            live_add(pc);
            /* pick_endpoint is not used: each gateway is checked. */
            pc->attempts = 0;
            pc->ep = k;
            attempt_reset(pc);
            grpc_slice method = grpc_slice_from_static_string(HEALTH_PATH);
            pc->call = grpc_channel_create_call(pr->eps[k].ch, NULL, GRPC_PROPAGATE_DEFAULTS, p->cq,
                                                method, NULL, pc->deadline, NULL);
            grpc_op ops[6];
            memset(ops, 0, sizeof(ops));
            grpc_byte_buffer *bb = bb_from_slice(pc->req);
            ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
            ops[1].op = GRPC_OP_SEND_MESSAGE;
            ops[1].data.send_message.send_message = bb;
            ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
            ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
            ops[3].data.recv_initial_metadata.recv_initial_metadata = &pc->initial_md;
            ops[4].op = GRPC_OP_RECV_MESSAGE;
            ops[4].data.recv_message.recv_message = &pc->recv;
            ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
            ops[5].data.recv_status_on_client.trailing_metadata = &pc->trailing_md;
            ops[5].data.recv_status_on_client.status = &pc->status;
            ops[5].data.recv_status_on_client.status_details = &pc->details;
            pc->tag.fn = health_done;
            grpc_call_error e = grpc_call_start_batch(pc->call, ops, 6, &pc->tag, NULL);
            grpc_byte_buffer_destroy(bb);
            if (e != GRPC_CALL_OK) {
                live_remove(pc);
                pcall_free(pc);
            }
        }
    }
}

static void *health_main(void *arg)
{
    dm_peers_t *p = arg;
    while (!atomic_load(&p->stopping)) {
        health_round(p);
        pthread_mutex_lock(&p->mu);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        int64_t ns = ts.tv_nsec + (int64_t)p->cfg->peer_health_interval_ms * 1000000;
        ts.tv_sec += ns / 1000000000;
        ts.tv_nsec = ns % 1000000000;
        /* p->cond is also broadcast whenever a peer call ends: sleep the whole interval. */
        while (!atomic_load(&p->stopping) &&
               pthread_cond_timedwait(&p->cond, &p->mu, &ts) != ETIMEDOUT)
            ;
        pthread_mutex_unlock(&p->mu);
    }
    return NULL;
}

static void *cq_main(void *arg)
{
    dm_peers_t *p = arg;
    for (;;) {
        grpc_event ev =
            grpc_completion_queue_next(p->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
        if (ev.type == GRPC_OP_COMPLETE)
            ((tag_t *)ev.tag)->fn(ev.tag, ev.success != 0);
    }
    return NULL;
}

/* ---- lifecycle ---- */

dm_status_t *dm_peers_create(const dm_config_t *cfg, dm_regions_t *regions, dm_peers_t **out)
{
    dm_peers_t *p = dm_calloc(1, sizeof(*p));
    p->cfg = cfg;
    p->regions = regions;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cond, NULL);
    atomic_init(&p->stopping, false);
    p->cq = grpc_completion_queue_create_for_next(NULL);
    bool any = false;
    for (size_t i = 0; i < cfg->n_regions; i++)
        any = any || !cfg->region_cfgs[i].local;
    char *ca = NULL, *cert = NULL, *key = NULL;
    grpc_channel_credentials *creds = NULL;
    if (any) {
        ca = dm_read_small_file(cfg->peer_ca_file, DM_PEM_MAX);
        cert = dm_read_small_file(cfg->peer_cert_file, DM_PEM_MAX);
        key = dm_read_small_file(cfg->peer_key_file, DM_PEM_MAX);
        if (!ca || !cert || !key) {
            free(ca);
            free(cert);
            if (key) {
                OPENSSL_cleanse(key, strlen(key));
                free(key);
            }
            dm_peers_destroy(p);
            return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                                 "cannot read the peer TLS files (peer_ca_file, peer_cert_file, "
                                 "peer_key_file)");
        }
        grpc_ssl_pem_key_cert_pair pair = {key, cert};
        creds = grpc_ssl_credentials_create_ex(ca, &pair, NULL, NULL);
        OPENSSL_cleanse(key, strlen(key));
        free(key);
        free(cert);
        free(ca);
    }
    for (size_t i = 0; i < cfg->n_regions; i++) {
        const dm_region_config_t *rc = &cfg->region_cfgs[i];
        if (rc->local)
            continue;
        peer_region_t *pr = &p->pr[i];
        pr->region = dm_regions_at(regions, i);
        pr->cfg = rc;
        pr->n = rc->n_gateways;
        pr->eps = dm_calloc(pr->n, sizeof(endpoint_t));
        for (size_t k = 0; k < pr->n; k++) {
            grpc_arg args[6];
            memset(args, 0, sizeof(args));
            args[0].type = GRPC_ARG_STRING;
            args[0].key = GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
            args[0].value.string = rc->gateway_identity;
            args[1].type = GRPC_ARG_INTEGER;
            args[1].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
            args[1].value.integer = MAX_PEER_MSG;
            args[2].type = GRPC_ARG_INTEGER;
            args[2].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
            args[2].value.integer = MAX_PEER_MSG;
            args[3].type = GRPC_ARG_INTEGER;
            args[3].key = GRPC_ARG_ENABLE_RETRIES;
            args[3].value.integer = 0;
            args[4].type = GRPC_ARG_INTEGER;
            args[4].key = GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS;
            args[4].value.integer = 100;
            args[5].type = GRPC_ARG_INTEGER;
            args[5].key = GRPC_ARG_MAX_RECONNECT_BACKOFF_MS;
            args[5].value.integer = 1000;
            grpc_channel_args ca_args = {6, args};
            pr->eps[k].addr = dm_strdup(rc->gateways[k]);
            pr->eps[k].ch = grpc_channel_create(rc->gateways[k], creds, &ca_args);
            atomic_init(&pr->eps[k].state, EP_UNKNOWN);
        }
    }
    if (creds)
        grpc_channel_credentials_release(creds);
    *out = p;
    return NULL;
}

void dm_peers_start(dm_peers_t *p)
{
    if (pthread_create(&p->cq_thread, NULL, cq_main, p) != 0 ||
        pthread_create(&p->health_thread, NULL, health_main, p) != 0)
        abort();
    p->started = true;
}

void dm_peers_stop(dm_peers_t *p)
{
    if (!p || !p->started)
        return;
    atomic_store(&p->stopping, true);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->health_thread, NULL);
    pthread_mutex_lock(&p->mu);
    for (pcall_t *pc = p->live; pc; pc = pc->next)
        if (pc->call)
            grpc_call_cancel(pc->call, NULL);
    while (p->n_live > 0)
        pthread_cond_wait(&p->cond, &p->mu);
    pthread_mutex_unlock(&p->mu);
    grpc_completion_queue_shutdown(p->cq);
    pthread_join(p->cq_thread, NULL);
    p->started = false;
    p->cq_done = true;
}

void dm_peers_destroy(dm_peers_t *p)
{
    if (!p)
        return;
    dm_peers_stop(p);
    for (size_t i = 0; i < DM_MAX_REGIONS; i++) {
        for (size_t k = 0; k < p->pr[i].n; k++) {
            grpc_channel_destroy(p->pr[i].eps[k].ch);
            free(p->pr[i].eps[k].addr);
        }
        free(p->pr[i].eps);
    }
    if (p->cq) {
        if (!p->cq_done) {
            grpc_completion_queue_shutdown(p->cq);
            while (
                grpc_completion_queue_next(p->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
                GRPC_QUEUE_SHUTDOWN)
                ;
        }
        grpc_completion_queue_destroy(p->cq);
    }
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cond);
    free(p);
    dm_peer_auth_cleanup();
}
