#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "domicile/client.h"

struct dm_client {
    grpc_channel *channel;
    grpc_metadata *md;
    size_t n_md;
};

dm_client_t *dm_client_create(const char *target)
{
    dm_client_t *c = dm_calloc(1, sizeof(*c));
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    c->channel = grpc_channel_create(target, creds, NULL);
    grpc_channel_credentials_release(creds);
    return c;
}

dm_client_t *dm_client_create_tls(const char *target, const char *ca_pem, const char *cert_pem,
                                  const char *key_pem)
{
    dm_client_t *c = dm_calloc(1, sizeof(*c));
    grpc_ssl_pem_key_cert_pair pair = {key_pem, cert_pem};
    grpc_channel_credentials *creds =
        grpc_ssl_credentials_create_ex(ca_pem, cert_pem && key_pem ? &pair : NULL, NULL, NULL);
    c->channel = grpc_channel_create(target, creds, NULL);
    grpc_channel_credentials_release(creds);
    return c;
}

void dm_client_destroy(dm_client_t *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < c->n_md; i++) {
        grpc_slice_unref(c->md[i].key);
        grpc_slice_unref(c->md[i].value);
    }
    free(c->md);
    grpc_channel_destroy(c->channel);
    free(c);
}

void dm_client_add_metadata(dm_client_t *c, const char *key, const char *value)
{
    c->md = dm_realloc(c->md, (c->n_md + 1) * sizeof(grpc_metadata));
    memset(&c->md[c->n_md], 0, sizeof(grpc_metadata));
    c->md[c->n_md].key = grpc_slice_from_copied_string(key);
    c->md[c->n_md].value = grpc_slice_from_copied_string(value);
    c->n_md++;
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

static ProtobufCMessage *unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *d)
{
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return NULL;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    ProtobufCMessage *m =
        protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    return m;
}

/* Run one batch and wait for it on the call's own queue. */
static bool run_batch(grpc_call *call, grpc_completion_queue *cq, grpc_op *ops, size_t n)
{
    void *tag = ops;
    if (grpc_call_start_batch(call, ops, n, tag, NULL) != GRPC_CALL_OK)
        return false;
    grpc_event ev = grpc_completion_queue_pluck(cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    return ev.type == GRPC_OP_COMPLETE && ev.success;
}

typedef struct {
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_metadata_array initial, trailing;
    grpc_status_code code;
    grpc_slice details;
} call_state_t;

static void call_begin(dm_client_t *c, call_state_t *s, const char *path, int timeout_ms)
{
    memset(s, 0, sizeof(*s));
    s->cq = grpc_completion_queue_create_for_pluck(NULL);
    gpr_timespec deadline = timeout_ms > 0
                                ? gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                                               gpr_time_from_millis(timeout_ms, GPR_TIMESPAN))
                                : gpr_inf_future(GPR_CLOCK_REALTIME);
    grpc_slice method = grpc_slice_from_copied_string(path);
    s->call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, s->cq, method,
                                       NULL, deadline, NULL);
    grpc_slice_unref(method);
    grpc_metadata_array_init(&s->initial);
    grpc_metadata_array_init(&s->trailing);
}

static dm_status_t *call_end(call_state_t *s)
{
    dm_status_t *st = NULL;
    if (s->code != GRPC_STATUS_OK) {
        char *d = grpc_slice_to_c_string(s->details);
        st = dm_status_new(s->code, "%s", d);
        gpr_free(d);
    }
    grpc_slice_unref(s->details);
    grpc_metadata_array_destroy(&s->initial);
    grpc_metadata_array_destroy(&s->trailing);
    grpc_call_unref(s->call);
    grpc_completion_queue_shutdown(s->cq);
    while (
        grpc_completion_queue_pluck(s->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
        GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(s->cq);
    return st;
}

static void send_ops(dm_client_t *c, grpc_op *ops, grpc_byte_buffer *req_bb)
{
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = c->n_md;
    ops[0].data.send_initial_metadata.metadata = c->md;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = req_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
}

dm_status_t *dm_client_unary(dm_client_t *c, const char *path, const ProtobufCMessage *req,
                             const ProtobufCMessageDescriptor *resp_desc, int timeout_ms,
                             ProtobufCMessage **resp)
{
    call_state_t s;
    grpc_op ops[6];
    grpc_byte_buffer *req_bb = pack(req), *resp_bb = NULL;

    call_begin(c, &s, path, timeout_ms);
    memset(ops, 0, sizeof(ops));
    send_ops(c, ops, req_bb);
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &s.initial;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &resp_bb;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &s.trailing;
    ops[5].data.recv_status_on_client.status = &s.code;
    ops[5].data.recv_status_on_client.status_details = &s.details;
    if (!run_batch(s.call, s.cq, ops, 6)) {
        s.code = GRPC_STATUS_INTERNAL;
        s.details = grpc_slice_from_static_string("client batch failed");
    }
    grpc_byte_buffer_destroy(req_bb);
    dm_status_t *st = call_end(&s);
    if (!st && resp_bb) {
        *resp = unpack(resp_bb, resp_desc);
        if (!*resp)
            st = dm_status_new(GRPC_STATUS_INTERNAL, "cannot parse the response as %s",
                               resp_desc->name);
    } else if (!st) {
        st = dm_status_new(GRPC_STATUS_INTERNAL, "server sent no response message");
    }
    if (resp_bb)
        grpc_byte_buffer_destroy(resp_bb);
    return st;
}

dm_status_t *dm_client_server_stream(dm_client_t *c, const char *path, const ProtobufCMessage *req,
                                     const ProtobufCMessageDescriptor *resp_desc, int timeout_ms,
                                     dm_client_stream_fn fn, void *arg)
{
    call_state_t s;
    grpc_op ops[4];
    grpc_byte_buffer *req_bb = pack(req);
    bool ok;

    call_begin(c, &s, path, timeout_ms);
    memset(ops, 0, sizeof(ops));
    send_ops(c, ops, req_bb);
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &s.initial;
    ok = run_batch(s.call, s.cq, ops, 4);
    grpc_byte_buffer_destroy(req_bb);
    while (ok) {
        grpc_byte_buffer *bb = NULL;
        grpc_op rop;
        memset(&rop, 0, sizeof(rop));
        rop.op = GRPC_OP_RECV_MESSAGE;
        rop.data.recv_message.recv_message = &bb;
        if (!run_batch(s.call, s.cq, &rop, 1) || !bb)
            break;
        ProtobufCMessage *m = unpack(bb, resp_desc);
        grpc_byte_buffer_destroy(bb);
        bool more = m && fn(m, arg);
        if (m)
            protobuf_c_message_free_unpacked(m, NULL);
        if (!more) {
            grpc_call_cancel(s.call, NULL);
            break;
        }
    }
    grpc_op st_op;
    memset(&st_op, 0, sizeof(st_op));
    st_op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    st_op.data.recv_status_on_client.trailing_metadata = &s.trailing;
    st_op.data.recv_status_on_client.status = &s.code;
    st_op.data.recv_status_on_client.status_details = &s.details;
    if (!run_batch(s.call, s.cq, &st_op, 1)) {
        s.code = GRPC_STATUS_INTERNAL;
        s.details = grpc_slice_from_static_string("client batch failed");
    }
    return call_end(&s);
}
