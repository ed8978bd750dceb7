/*
 * grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo: what the gateway serves, as
 * protobuf descriptors, so that grpcurl-style tools can list and call the services without the
 * .proto files. The descriptors come from the descriptor database (src/server/reflection.c).
 *
 * One stream answers its requests in order, one at a time: read a request, queue its response,
 * read the next once the response has left (the drain callback), so a client that does not
 * read its responses stops being read (memory stays bounded).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "grpc/reflection/v1alpha/reflection.pb-c.h"

#include "domicile/api.h"
#include "domicile/auth.h"
#include "domicile/log.h"
#include "domicile/reflection.h"

#define MAX_REQUESTS      100         /* per stream */
#define MAX_REQUEST_BYTES (64 * 1024) /* per request */

/* ---- the rpc ---------------------------------------------------------------------------- */

typedef Grpc__Reflection__V1alpha__ServerReflectionRequest req_t;
typedef Grpc__Reflection__V1alpha__ServerReflectionResponse rep_t;
typedef Grpc__Reflection__V1alpha__ServiceResponse svc_t;

#define REQ(x) GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_##x
#define REP(x) GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_##x

/*
 * Who ends the call: READING, the receive callback (a read is pending: it completes, with an
 * error if the call breaks); WORKING, the receive callback still (it is answering); SENDING,
 * the cancel hook (no read is pending; a response is on its way, and the drain callback
 * starts the next read); DONE, nobody (it has been ended).
 */
typedef enum { PH_READING, PH_WORKING, PH_SENDING, PH_DONE } phase_t;

typedef struct {
    pthread_mutex_t mu;
    phase_t phase;
    int requests;
} stream_t;

static void on_request(dm_call_t *call, ProtobufCMessage *msg, dm_status_t *err, void *arg);

static void stream_free(void *p)
{
    stream_t *s = p;
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* End the call with `st` unless it has been ended (then `st` is dropped). */
static void stream_end(dm_call_t *call, stream_t *s, dm_status_t *st)
{
    pthread_mutex_lock(&s->mu);
    bool mine = s->phase != PH_DONE;
    s->phase = PH_DONE;
    pthread_mutex_unlock(&s->mu);
    if (mine)
        dm_call_finish(call, st); /* may free s: not touched after */
    else
        dm_status_free(st);
}

static void on_drain(dm_call_t *call, void *arg)
{
    stream_t *s = arg;
    pthread_mutex_lock(&s->mu);
    bool read = s->phase == PH_SENDING;
    if (read)
        s->phase = PH_READING;
    pthread_mutex_unlock(&s->mu);
    if (read)
        dm_call_recv(call, on_request, s);
}

static void on_cancel(dm_call_t *call, void *arg)
{
    stream_t *s = arg;
    pthread_mutex_lock(&s->mu);
    bool end = s->phase == PH_SENDING;
    pthread_mutex_unlock(&s->mu);
    /* READING: the pending read fails and ends the call; WORKING: dm_call_send() refuses. */
    if (end)
        stream_end(call, s, dm_status_new(GRPC_STATUS_CANCELLED, "call cancelled"));
}

static void set_error(rep_t *rep, Grpc__Reflection__V1alpha__ErrorResponse *er,
                      grpc_status_code code, const char *message)
{
    er->error_code = (int32_t)code;
    er->error_message = (char *)message;
    rep->message_response_case = REP(ERROR_RESPONSE);
    rep->error_response = er;
}

/* The file and its transitive dependencies, into fdr (protos[] has room for every file). */
static void set_files(rep_t *rep, Grpc__Reflection__V1alpha__FileDescriptorResponse *fdr,
                      const dm_descdb_t *db, size_t file, ProtobufCBinaryData *protos)
{
    size_t *idx = dm_malloc(dm_descdb_n_files(db) * sizeof(size_t));
    size_t n = dm_descdb_closure(db, file, idx);
    for (size_t i = 0; i < n; i++)
        protos[i].data = (uint8_t *)dm_descdb_file_proto(db, idx[i], &protos[i].len);
    free(idx);
    fdr->n_file_descriptor_proto = n;
    fdr->file_descriptor_proto = protos;
    rep->message_response_case = REP(FILE_DESCRIPTOR_RESPONSE);
    rep->file_descriptor_response = fdr;
}

/* Answer one request: queue its response. Returns false when the call is dead. */
static bool answer(dm_call_t *call, stream_t *s, req_t *req)
{
    const dm_descdb_t *db = dm_descdb_builtin();
    rep_t rep = GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__INIT;
    Grpc__Reflection__V1alpha__FileDescriptorResponse fdr =
        GRPC__REFLECTION__V1ALPHA__FILE_DESCRIPTOR_RESPONSE__INIT;
    Grpc__Reflection__V1alpha__ListServiceResponse lsr =
        GRPC__REFLECTION__V1ALPHA__LIST_SERVICE_RESPONSE__INIT;
    Grpc__Reflection__V1alpha__ErrorResponse er = GRPC__REFLECTION__V1ALPHA__ERROR_RESPONSE__INIT;
    ProtobufCBinaryData *protos = NULL;
    svc_t *svcs = NULL;
    svc_t **svcp = NULL;
    char **names = NULL;
    size_t n_names = 0;

    rep.valid_host = req->host;
    rep.original_request = req;
    switch (req->message_request_case) {
    case REQ(LIST_SERVICES): {
        /* Every service of the method table, in its order, each once; not the
         * gateway-to-gateway one, which no client can call (its descriptor still resolves). */
        size_t n_methods;
        const dm_method_t *m = dm_api_methods(&n_methods);
        names = dm_calloc(n_methods, sizeof(char *));
        for (size_t i = 0; i < n_methods; i++) {
            if (m[i].roles == DM_ROLES_GATEWAY)
                continue;
            const char *svc = m[i].path + 1; /* "/<service>/<method>" */
            const char *slash = strchr(svc, '/');
            size_t len = slash ? (size_t)(slash - svc) : strlen(svc);
            bool seen = false;
            for (size_t j = 0; j < n_names && !seen; j++)
                seen = strlen(names[j]) == len && strncmp(names[j], svc, len) == 0;
            if (!seen)
                names[n_names++] = dm_strndup(svc, len);
        }
        svcs = dm_calloc(n_names ? n_names : 1, sizeof(svc_t));
        svcp = dm_calloc(n_names ? n_names : 1, sizeof(svc_t *));
        for (size_t i = 0; i < n_names; i++) {
            grpc__reflection__v1alpha__service_response__init(&svcs[i]);
            svcs[i].name = names[i];
            svcp[i] = &svcs[i];
        }
        lsr.n_service = n_names;
        lsr.service = svcp;
        rep.message_response_case = REP(LIST_SERVICES_RESPONSE);
        rep.list_services_response = &lsr;
        break;
    }
    case REQ(FILE_BY_FILENAME):
    case REQ(FILE_CONTAINING_SYMBOL): {
        bool by_name = req->message_request_case == REQ(FILE_BY_FILENAME);
        long f = !db       ? -1
                 : by_name ? dm_descdb_find_file(db, req->file_by_filename)
                           : dm_descdb_find_symbol(db, req->file_containing_symbol);
        if (!db) {
            set_error(&rep, &er, GRPC_STATUS_INTERNAL, "descriptors unavailable");
        } else if (f < 0) {
            set_error(&rep, &er, GRPC_STATUS_NOT_FOUND,
                      by_name ? "file not found" : "symbol not found");
        } else {
            protos = dm_calloc(dm_descdb_n_files(db), sizeof(ProtobufCBinaryData));
            set_files(&rep, &fdr, db, (size_t)f, protos);
        }
        break;
    }
    case REQ(FILE_CONTAINING_EXTENSION):
    case REQ(ALL_EXTENSION_NUMBERS_OF_TYPE):
        set_error(&rep, &er, GRPC_STATUS_UNIMPLEMENTED,
                  "extensions are not supported: the API declares none");
        break;
    default:
        set_error(&rep, &er, GRPC_STATUS_INVALID_ARGUMENT, "empty request: set message_request");
        break;
    }

    /* Under s->mu: the cancel hook must not end the call between the phase change and the
     * send (it would be freed under us). */
    pthread_mutex_lock(&s->mu);
    s->phase = PH_SENDING;
    bool ok = dm_call_send(call, &rep.base);
    if (!ok)
        s->phase = PH_WORKING; /* nothing in flight: the caller ends the call */
    pthread_mutex_unlock(&s->mu);

    for (size_t i = 0; i < n_names; i++)
        free(names[i]);
    free(names);
    free(svcs);
    free(svcp);
    free(protos);
    return ok;
}

static void on_request(dm_call_t *call, ProtobufCMessage *msg, dm_status_t *err, void *arg)
{
    stream_t *s = arg;
    if (err || !msg) {
        /* The client's end of the stream (OK), or a broken call or undecodable request. */
        stream_end(call, s, err);
        return;
    }
    pthread_mutex_lock(&s->mu);
    s->phase = PH_WORKING;
    int n = ++s->requests;
    pthread_mutex_unlock(&s->mu);

    dm_status_t *st = NULL;
    if (n > MAX_REQUESTS)
        st = dm_status_new(GRPC_STATUS_RESOURCE_EXHAUSTED,
                           "at most %d requests per ServerReflectionInfo stream", MAX_REQUESTS);
    else if (protobuf_c_message_get_packed_size(msg) > MAX_REQUEST_BYTES)
        st = dm_status_new(GRPC_STATUS_RESOURCE_EXHAUSTED,
                           "a reflection request may not exceed %d bytes", MAX_REQUEST_BYTES);
    else if (!answer(call, s, (req_t *)msg))
        st = dm_status_new(GRPC_STATUS_CANCELLED, "call cancelled");
    protobuf_c_message_free_unpacked(msg, NULL);
    if (st)
        stream_end(call, s, st);
}

void dm_reflection_info(dm_call_t *call)
{
    stream_t *s = dm_calloc(1, sizeof(*s));
    pthread_mutex_init(&s->mu, NULL);
    s->phase = PH_READING;
    dm_call_set_data(call, s, stream_free);
    dm_call_on_drain(call, on_drain, s);
    dm_call_on_cancel(call, on_cancel, s);
    dm_call_recv(call, on_request, s);
}
