/*
 * Gateway to gateway (DESIGN.md promise 10, src/peer/README.md). A gateway serves one region;
 * a call on another region's data goes to one of that region's gateways over mutual TLS, with
 * the caller's principal asserted in the metadata, and the answer comes back unchanged. The
 * statements of fan-out calls that a peer region must run (request headers, directory lookups,
 * fences, ledger listings) go as PeerService/Exec, one call per region, all at once.
 *
 * Each peer region has a list of gateways (its region file's `gateways`); they are
 * health-checked, and a call that fails before any gateway answered it is tried on the next
 * one when it is safe to repeat (reads, writes carrying a request id, Exec).
 *
 * Thread-safety: every function may be called from any thread between start and stop.
 * Completions run on the peer module's own completion-queue thread.
 */
#ifndef DOMICILE_PEER_H
#define DOMICILE_PEER_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stdint.h>

#include "domicile/auth.h"
#include "domicile/config.h"
#include "domicile/region.h"
#include "domicile/server.h"

typedef struct dm_peers dm_peers_t;

/** Metadata carrying the asserted principal (a domicile.peer.v1.Principal). */
#define DM_PEER_PRINCIPAL_MD "x-domicile-principal-bin"
/** Metadata naming the calling gateway's region (must match its certificate). */
#define DM_PEER_REGION_MD "x-domicile-peer-region"
/** Metadata naming the public method the peer call serves at the caller. */
#define DM_PEER_ORIGIN_MD "x-domicile-origin"
/** Trailing metadata every answer of a gateway carries: the region that answered. */
#define DM_PEER_ANSWERED_MD "x-domicile-region"

/** Channels to every peer region of `cfg` (reads the peer certificate and key). */
dm_status_t *dm_peers_create(const dm_config_t *cfg, dm_regions_t *regions,
                             dm_peers_t **out) DM_WARN_UNUSED;
/** Start the completion-queue and health-check threads. */
void dm_peers_start(dm_peers_t *p);
/** Cancel calls in flight, stop and join the threads (their callbacks have run). */
void dm_peers_stop(dm_peers_t *p);
void dm_peers_destroy(dm_peers_t *p);

/** dm_remote_submit_fn for dm_regions_set_remote(): run `job` in r as PeerService/Exec. */
void dm_peers_submit(void *peers, dm_region_t *r, dm_job_t *job);

/**
 * Forward the whole of `call` (unary or server-streaming; its decoded request is packed again)
 * to a gateway of `r` and relay its messages and status. Ends the call.
 */
void dm_peer_forward(dm_peers_t *p, dm_region_t *r, dm_call_t *call);

/** A unary peer call's answer: `reply` (owned, free_unpacked) or `err` (owned). */
typedef void (*dm_peer_reply_fn)(void *arg, ProtobufCMessage *reply, dm_status_t *err);
/**
 * One unary call to `path` at a gateway of `r` for `call` (its principal asserted). `retry`:
 * safe to repeat on another gateway. `fn` runs exactly once.
 */
void dm_peer_unary(dm_peers_t *p, dm_region_t *r, dm_call_t *call, const char *path,
                   const ProtobufCMessage *req, const ProtobufCMessageDescriptor *out, bool retry,
                   dm_peer_reply_fn fn, void *arg);

typedef struct dm_peer_stream dm_peer_stream_t;
/** A message of a peer stream (owned by the callback); call dm_peer_stream_next() for more. */
typedef void (*dm_peer_msg_fn)(void *arg, dm_peer_stream_t *s, ProtobufCMessage *msg);
/** The stream ended: NULL = OK, else the error (owned). The stream is freed after this. */
typedef void (*dm_peer_end_fn)(void *arg, dm_status_t *err);
/**
 * A server-streaming call to `path` at a gateway of `r` for `call`. The first message is read
 * at once; each later one after dm_peer_stream_next(). `end` runs exactly once, last.
 */
void dm_peer_stream(dm_peers_t *p, dm_region_t *r, dm_call_t *call, const char *path,
                    const ProtobufCMessage *req, const ProtobufCMessageDescriptor *out,
                    dm_peer_msg_fn on_msg, dm_peer_end_fn on_end, void *arg);
void dm_peer_stream_next(dm_peer_stream_t *s);
/** Cancel the stream (its `end` still runs, with CANCELLED). */
void dm_peer_stream_cancel(dm_peer_stream_t *s);

/** Cancel the peer call with this id if it is still in flight (server call cancelled). */
void dm_peers_cancel(dm_peers_t *p, uint64_t id);
/** The app's hook for the above: the peers of `call`'s app (src/app/app.c). */
void dm_app_peers_cancel(dm_call_t *call, uint64_t id);

/**
 * Gateway-to-gateway calls started so far (attempts: a retry counts again), per public method
 * served (`origin`, "" for the gateway's own maintenance), path called at the peer, and peer
 * region (metrics, tests). Health checks are not counted.
 */
typedef void (*dm_peer_count_fn)(void *arg, const char *origin, const char *path,
                                 const char *region, int64_t calls);
void dm_peers_counts(dm_peers_t *p, dm_peer_count_fn fn, void *arg);
/**
 * Each peer gateway's last health check (metrics): its region, address, and whether it
 * answered (serving or not: a gateway whose database is down still answers). A gateway not
 * checked yet has not answered.
 */
typedef void (*dm_peer_health_fn)(void *arg, const char *region, const char *addr, bool answers);
void dm_peers_health(dm_peers_t *p, dm_peer_health_fn fn, void *arg);

/* ---- the callee side (src/peer/service.c) ---- */

/**
 * Is this call from a gateway of another region? On success *region receives that region
 * (from its verified certificate, checked against DM_PEER_REGION_MD). Errors: UNAUTHENTICATED.
 */
dm_status_t *dm_peer_authenticate(dm_call_t *call, const dm_config_t *cfg, char *region,
                                  size_t len) DM_WARN_UNUSED;
/**
 * The principal asserted in the call's metadata (a new principal, free with
 * dm_peer_principal_free), its purpose in *purpose. INVALID_ARGUMENT when malformed.
 */
dm_status_t *dm_peer_principal(dm_call_t *call, const char *via, dm_principal_t **out,
                               char purpose[DM_PURPOSE_MAX_LEN + 1]) DM_WARN_UNUSED;
void dm_peer_principal_free(void *p);
/** Free what dm_peer_authenticate() keeps (the federation CA's store), at exit. */
void dm_peer_auth_cleanup(void);

/** PeerService/Exec handler. */
void dm_peer_exec(dm_call_t *call);

#endif
