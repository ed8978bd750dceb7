/*
 * Helpers shared by the service files of src/api/. Not a public header.
 */
#ifndef DOMICILE_API_INTERNAL_H
#define DOMICILE_API_INTERNAL_H

#include <protobuf-c/protobuf-c.h>

#include "domicile/api.h"
#include "domicile/app.h"
#include "domicile/crypto.h"
#include "domicile/peer.h"
#include "domicile/validate.h"

#include "domicile/v1/subject_rights.pb-c.h"

#define APP(call) ((dm_app_t *)dm_call_app(call))

/** Labels (protobuf-c map entries) as a compact JSON object with sorted keys; caller frees. */
char *dm_labels_to_json(size_t n, void *const *entries);
/**
 * JSON object text (as stored) -> newly allocated map entries of `entry_desc` (all values
 * strings). Free with dm_labels_free(). Returns false when the text is not such an object.
 */
bool dm_labels_from_json(const char *json, size_t len, const ProtobufCMessageDescriptor *entry_desc,
                         size_t *n_out, void ***out);
void dm_labels_free(size_t n, void **entries);

/** SHA-256 over the unambiguous encoding of `parts` (request fingerprints). */
void dm_fingerprint(unsigned char out[32], size_t n_parts, const dm_aad_part_t *parts);
#define DM_FINGERPRINT(out, ...)                                                                   \
    dm_fingerprint((out), sizeof((dm_aad_part_t[]){__VA_ARGS__}) / sizeof(dm_aad_part_t),          \
                   (dm_aad_part_t[]){__VA_ARGS__})

/** Subject (may be empty) -> *has and its HMAC key; INVALID_ARGUMENT naming `field`. */
dm_status_t *dm_subject_to_key(dm_app_t *app, const char *field, const char *subject, bool *has,
                               unsigned char key[DM_SUBJECT_KEY_LEN]) DM_WARN_UNUSED;

/** AAD of a wrapped data key: region, customer, subject key (empty for the customer key). */
unsigned char *dm_key_aad(const char *region, const char *customer, const unsigned char *sk,
                          size_t sk_len, size_t *len);
/** AAD of a record payload: region, customer, record id. */
unsigned char *dm_record_aad(const char *region, const char *customer, const char *record_id,
                             size_t *len);

/**
 * Resolve `customer_id` for `call`, within the caller's tenant scope: a customer outside the
 * scope answers exactly like a missing one (NOT_FOUND "customer not found", after the same
 * directory work). `fn` as for dm_directory_resolve().
 */
void dm_api_resolve(dm_call_t *call, const char *customer_id, dm_resolve_fn fn, void *arg);

/**
 * dm_api_resolve(), and then, when the customer's region is served by other gateways, the
 * whole call is forwarded there (dm_peer_forward) and `fn` never runs: the handler's context
 * goes with the call. A forwarded call is never forwarded again.
 */
void dm_api_route(dm_call_t *call, const char *customer_id, dm_resolve_fn fn, void *arg);
/**
 * For calls naming a region: forward the call to `region`'s gateways and return true when it is
 * not this gateway's own (the call is then ended by the forwarder); false to go on locally.
 */
bool dm_api_forward_to(dm_call_t *call, dm_region_t *region);

/** Was this call forwarded by a peer gateway serving `handler`'s method there? */
bool dm_api_forwarded_from(dm_call_t *call, dm_handler_fn handler);

/**
 * Reply to a unary call with `inner` as the one field of the method's response type (the
 * `{ T x = 1; }` responses, e.g. GetCustomerResponse around Customer). `inner` stays the
 * caller's. A method whose response has another shape is answered INTERNAL (a bug).
 */
void dm_api_reply_wrapped(dm_call_t *call, const ProtobufCMessage *inner);

/* ---- transfers (src/api/transfer.c) ---- */

#define DM_XFER_ID_LEN 129

/** A call's transfer, filled by the caller (dir, method, customer, subject, record id, request
 * id) and by dm_xfer_gate() (the rest). Lives in the call's context. */
typedef struct dm_xfer {
    dm_transfer_dir_t dir;
    const char *method;
    const char *customer_id;
    const unsigned char *subject_key; /* NULL: none */
    const char *record_id;            /* the one record the call names, else NULL */
    char request_id[DM_XFER_ID_LEN];
    /* set by the gate */
    dm_region_t *region;
    bool cross;  /* dm_xfer_log() is due: `direct`, or a transit through a third region */
    bool direct; /* the principal's region is not the data's: from -> to under `basis` */
    const char *from, *to;
    const dm_basis_t *basis;
    /* A call a peer gateway forwarded from a region V that is neither the data's nor the
     * principal's: the plaintext passes through V's gateway, a transfer of its own
     * (read: region -> V; write: principal's region -> V) under `via_basis`. */
    const char *via, *via_from;
    const dm_basis_t *via_basis;
} dm_xfer_t;

typedef void (*dm_xfer_fn)(void *arg, dm_status_t *err);

/** The call's request id for the ledger: `given`, else x-request-id metadata, else generated. */
void dm_xfer_request_id(dm_call_t *call, const char *given, char out[DM_XFER_ID_LEN]);
/**
 * Decide whether the call may move data of `region` (DESIGN.md §5). `fn` gets NULL to go on
 * (x->cross tells whether dm_xfer_log() is due) or PERMISSION_DENIED; a refused cross-border
 * transfer is logged in the region's ledger before `fn` runs, with the record the call names
 * (x->record_id: count 1 and its id) or none (count 0).
 */
void dm_xfer_gate(dm_call_t *call, dm_region_t *region, dm_xfer_t *x, dm_xfer_fn fn, void *arg);
/** Log an allowed cross-border transfer (and its transit through a third region, if any: two
 * entries, same request id); `done` runs once both are committed (or one failed). */
void dm_xfer_log(dm_call_t *call, const dm_xfer_t *x, int64_t records, int64_t bytes,
                 const char *record_ids, dm_ledger_done_fn done, void *arg);

/* ---- fan-out (src/api/fanout.c) ---- */

/** Every region's answer to one statement: res[i] (owned) or err[i] (owned). */
typedef struct dm_fanout {
    size_t n;
    dm_region_t *region[DM_MAX_REGIONS];
    PGresult *res[DM_MAX_REGIONS];
    dm_status_t *err[DM_MAX_REGIONS];
    struct dm_fanout_priv *priv;
} dm_fanout_t;

typedef void (*dm_fanout_fn)(dm_fanout_t *f, void *arg);

/**
 * Run `stmt` with the given parameters (copied) in every region; `done` runs once with all
 * answers (on an executor thread, or this one) and must free `f` with dm_fanout_free().
 * `formats` may be NULL (all text).
 */
void dm_fanout_start(dm_call_t *call, dm_regions_t *regions, dm_sql_id_t stmt, int n,
                     const char *const *values, const int *lengths, const int *formats,
                     dm_fanout_fn done, void *arg);
void dm_fanout_free(dm_fanout_t *f);

/* ---- data-subject requests (src/api/subject_rights.c, webhook.c) ---- */

/**
 * The request as every region describes it (fan-out of DM_SQL_DSR_STATUS): *out is a new view
 * (free with dm_dsr_view_free; it points into f's results, so free it before f);
 * *webhook_attempts the notify region's count. NOT_FOUND / UNAVAILABLE when no region has it.
 */
dm_status_t *dm_dsr_view(dm_fanout_t *f, dm_regions_t *regions, Domicile__V1__DsrRequest **out,
                         int *webhook_attempts);
void dm_dsr_view_free(Domicile__V1__DsrRequest *q);

/** Is a completion webhook configured for requests of `customer` ("" = every customer in
 * scope: only the global webhook applies)? False when w is NULL. */
bool dm_webhooks_apply(const dm_webhooks_t *w, const char *customer);

/** Read the peer regions' fences tables through their gateways (asynchronously, at most one
 * read per region in flight); what they hold counts as for the own table. */
void dm_regions_poll_peer_fences(dm_app_t *app);
/** The regions' maintenance task: apply the fences that region `src` holds. */
void dm_regions_refresh_fences(dm_app_t *app, dm_region_t *src, dm_exec_t *x);

/** "active" | "closed" | "purged" text -> enum. */
int dm_customer_state_enum(const char *s, size_t len);

#endif
