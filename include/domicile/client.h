/*
 * A small blocking gRPC client on the core API, for domicilectl and the benchmark. One client
 * per thread (calls are synchronous, each on its own completion queue).
 */
#ifndef DOMICILE_CLIENT_H
#define DOMICILE_CLIENT_H

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>

#include "domicile/status.h"

typedef struct dm_client dm_client_t;

typedef struct dm_client_md {
    const char *key;
    const char *value;
} dm_client_md_t;

/** Connect (lazily) to `target` ("host:port") over plaintext. */
dm_client_t *dm_client_create(const char *target);
/**
 * Connect over TLS: `ca_pem` verifies the server (NULL = system roots); `cert_pem` and
 * `key_pem` (both or neither) are the client certificate for mTLS. PEM texts are copied.
 */
dm_client_t *dm_client_create_tls(const char *target, const char *ca_pem, const char *cert_pem,
                                  const char *key_pem);
void dm_client_destroy(dm_client_t *c);
/** Extra metadata sent with every call (e.g. authorization); copied. */
void dm_client_add_metadata(dm_client_t *c, const char *key, const char *value);

/**
 * Unary call. On success *resp is a new message (free with protobuf_c_message_free_unpacked).
 * On failure the status carries the server's code and message.
 */
dm_status_t *dm_client_unary(dm_client_t *c, const char *path, const ProtobufCMessage *req,
                             const ProtobufCMessageDescriptor *resp_desc, int timeout_ms,
                             ProtobufCMessage **resp) DM_WARN_UNUSED;

/** Called per streamed message; return false to cancel the stream. Owns nothing. */
typedef bool (*dm_client_stream_fn)(const ProtobufCMessage *msg, void *arg);
/** Server-streaming call; `fn` sees each message in order. timeout_ms <= 0: no deadline. */
dm_status_t *dm_client_server_stream(dm_client_t *c, const char *path, const ProtobufCMessage *req,
                                     const ProtobufCMessageDescriptor *resp_desc, int timeout_ms,
                                     dm_client_stream_fn fn, void *arg) DM_WARN_UNUSED;

#endif
