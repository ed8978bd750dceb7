/*
 * The gRPC server on the core C API: one completion queue per thread, a per-call state machine,
 * unary, server-streaming, client-streaming and bidirectional-streaming calls, graceful shutdown.
 *
 * A handler receives a call whose request is already decoded. It must eventually end the call
 * exactly once, with dm_call_reply() (unary) or dm_call_finish() (any kind), from any thread.
 * After that it must not touch the call. Server-streaming handlers send messages with
 * dm_call_send(); the server keeps one SEND_MESSAGE in flight and buffers the rest, and calls
 * the drain callback when its queue is empty so a producer can make more (flow control: a slow
 * reader slows the producer, memory stays bounded). Client-streaming and bidirectional handlers
 * read the client's messages with dm_call_recv(), one read at a time; bidirectional handlers
 * answer with dm_call_send() while they read.
 */
#ifndef DOMICILE_SERVER_H
#define DOMICILE_SERVER_H

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stdint.h>

#include "domicile/config.h"
#include "domicile/status.h"

typedef struct dm_server dm_server_t;
typedef struct dm_call dm_call_t;

typedef enum {
    DM_RPC_UNARY,
    DM_RPC_SERVER_STREAM,
    DM_RPC_CLIENT_STREAM,
    DM_RPC_BIDI_STREAM, /* client and server stream: dm_call_recv() and dm_call_send() */
} dm_rpc_kind_t;

typedef void (*dm_handler_fn)(dm_call_t *call);
typedef void (*dm_call_cb)(dm_call_t *call, void *arg);

/** One row of the method table: every rpc of proto/ has exactly one (checked by a unit test). */
typedef struct dm_method {
    const char *path; /* "/domicile.v1.RecordsService/GetRecord" */
    dm_rpc_kind_t kind;
    const ProtobufCMessageDescriptor *input;
    const ProtobufCMessageDescriptor *output;
    dm_handler_fn handler;     /* NULL: answered UNIMPLEMENTED, naming the method and issue */
    unsigned roles;            /* dm_role_t bits allowed to call it; 0 = public (health) */
    const char *pending_issue; /* when handler is NULL: the issue that builds it */
} dm_method_t;

/**
 * Create a server for `cfg` serving `methods` (the table must outlive the server). `app` is an
 * opaque pointer handed to handlers through dm_call_app(). Nothing listens until start.
 */
dm_status_t *dm_server_create(const dm_config_t *cfg, const dm_method_t *methods, size_t n_methods,
                              void *app, dm_server_t **out) DM_WARN_UNUSED;
/**
 * Serve `method` (a unary rpc, e.g. grpc.health.v1.Health/Check) and nothing else on a second,
 * plaintext listener at `listen` (host:port, port 0 = any), for callers that cannot speak the
 * main listener's TLS: Kubernetes' grpc probes. Its calls run on the same completion-queue
 * threads as every other call; they skip the authorizer, carry no trailing metadata, are held
 * to small fixed limits (message 1 KiB, metadata 2 KiB, 4 streams per connection, connection
 * age 60 s, handshake 5 s, 8 MiB of memory), and any other path answers UNIMPLEMENTED with
 * one message. It stays open until the main listener has drained on shutdown. `method` must
 * outlive the server. Call once, before dm_server_start().
 */
dm_status_t *dm_server_add_probe(dm_server_t *srv, const char *listen,
                                 const dm_method_t *method) DM_WARN_UNUSED;
/** The bound port of the probe listener (0 when there is none, or before start). */
int dm_server_probe_port(dm_server_t *srv);
/** Bind, start the threads, post the requests. *port receives the bound port. */
dm_status_t *dm_server_start(dm_server_t *srv, int *port) DM_WARN_UNUSED;
/**
 * Run `fn` on every call before its request is decoded; a non-NULL status ends the call with
 * it (the handler never runs). Set before start.
 */
typedef dm_status_t *(*dm_authorize_fn)(dm_call_t *call, void *arg);
void dm_server_set_authorizer(dm_server_t *srv, dm_authorize_fn fn, void *arg);
/** Register a function run once when shutdown begins (before in-flight calls drain). */
void dm_server_on_shutdown(dm_server_t *srv, void (*fn)(void *arg), void *arg);
/**
 * Stop accepting calls, let in-flight calls finish for up to `grace_ms`, then cancel the rest
 * and wait for them. Blocking; call from the main thread. Afterwards the app must stop every
 * thread of its own that could still touch a call, then call dm_server_destroy().
 */
void dm_server_shutdown(dm_server_t *srv, int grace_ms);
/** Shut down the completion queues, join the threads, free everything. */
void dm_server_destroy(dm_server_t *srv);
/** Calls alive right now (diagnostics, tests). */
int dm_server_live_calls(dm_server_t *srv);

/** The app pointer given to dm_server_create(). */
void *dm_call_app(dm_call_t *call);
/** The method being called. */
const dm_method_t *dm_call_method(dm_call_t *call);
/** The decoded request (owned by the call). NULL for client- and bidi-streaming methods. */
const ProtobufCMessage *dm_call_request(dm_call_t *call);
/**
 * First value of request metadata `key` (lower case). Returns a pointer into the call's own
 * storage, valid until the call ends, NOT NUL-terminated; *len receives its length. NULL when
 * absent.
 */
const char *dm_call_metadata(dm_call_t *call, const char *key, size_t *len);
/** Milliseconds left before the client's deadline; INT64_MAX when it set none. */
int64_t dm_call_deadline_left_ms(dm_call_t *call);
/** True once the client cancelled, the deadline passed, or the transport broke. */
bool dm_call_cancelled(dm_call_t *call);
/**
 * Queue one message of a server stream. Returns false (and sends nothing) when the call is
 * already dead; the handler should then stop producing and call dm_call_finish().
 */
bool dm_call_send(dm_call_t *call, const ProtobufCMessage *msg);
/** Messages queued and not yet handed to the transport. */
size_t dm_call_queued(dm_call_t *call);
/**
 * Run `fn` on a completion-queue thread whenever the send queue becomes empty, so a producer
 * can queue more. Set before the first send. Also run once when the call dies with a send in
 * flight (what was queued is dropped), so a producer waiting for the drain learns it: its next
 * dm_call_send() returns false.
 */
void dm_call_on_drain(dm_call_t *call, dm_call_cb fn, void *arg);
/**
 * A second cancel hook, for a module serving the call beside its handler (src/peer: the peer
 * call in flight for it), so that neither replaces the other's. Same rules as below.
 */
void dm_call_on_cancel_module(dm_call_t *call, dm_call_cb fn, void *arg);
/** Run `fn` once if the call is cancelled (now, on this thread, if it already was). */
void dm_call_on_cancel(dm_call_t *call, dm_call_cb fn, void *arg);
/** End the call with `st` (NULL = OK). Takes ownership of `st`. Exactly once per call. */
void dm_call_finish(dm_call_t *call, dm_status_t *st);
/** Unary success: send `msg` and OK in one batch (same as send + finish(NULL)). */
void dm_call_reply(dm_call_t *call, const ProtobufCMessage *msg);
/**
 * Client- and bidi-streaming: called with the next client message (owned by the callback: free with
 * protobuf_c_message_free_unpacked), or msg NULL and err NULL at the end of the stream, or
 * err set (INVALID_ARGUMENT for an undecodable message, CANCELLED when the call broke).
 * Runs on a completion-queue thread.
 */
typedef void (*dm_recv_fn)(dm_call_t *call, ProtobufCMessage *msg, dm_status_t *err, void *arg);
/** Read the next client message; one read at a time. */
void dm_call_recv(dm_call_t *call, dm_recv_fn fn, void *arg);
/** The authenticated caller (set by the authorizer; opaque to the server), or NULL. */
const void *dm_call_principal(dm_call_t *call);
void dm_call_set_principal(dm_call_t *call, const void *principal);
/** Set a principal the call owns: `free_fn(p)` runs when the call is destroyed. */
void dm_call_set_principal_owned(dm_call_t *call, void *p, void (*free_fn)(void *));
/**
 * The first value of auth-context property `name` (e.g. "x509_pem_cert") as a new string
 * (*out, caller frees) of *len bytes; false when the call has none.
 */
bool dm_call_auth_property(dm_call_t *call, const char *name, char **out, size_t *len);
/** Purpose of access of this call (x-purpose or the principal's default); "" when none. */
const char *dm_call_purpose(dm_call_t *call);
/** Set the purpose (copied; at most 64 bytes). */
void dm_call_set_purpose(dm_call_t *call, const char *purpose);
/** The verified client certificate's subject ("CN=…") into buf; false when none. */
bool dm_call_peer_subject(dm_call_t *call, char *buf, size_t len);
/** Names written in the call's access log line: the caller and the region it touched. */
void dm_call_set_log_principal(dm_call_t *call, const char *name);
void dm_call_set_region(dm_call_t *call, const char *code);
/** Attach data freed with `free_fn` when the call is destroyed. */
void dm_call_set_data(dm_call_t *call, void *data, void (*free_fn)(void *));
void *dm_call_data(dm_call_t *call);
/**
 * Attach more data freed with `free_fn` when the call is destroyed (after every callback of the
 * call has run), for a module that serves a call whose data slot a handler holds. At most 4.
 */
void dm_call_attach(dm_call_t *call, void *p, void (*free_fn)(void *));

#endif
