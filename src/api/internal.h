/*
 * Helpers shared by the service handlers of src/api/ (src/api/common.c). Not a public header:
 * nothing outside src/api/ includes it (tests/layout/check-layout).
 */
#ifndef DOMICILE_API_INTERNAL_H
#define DOMICILE_API_INTERNAL_H

#include <protobuf-c/protobuf-c.h>

#include "domicile/api.h"
#include "domicile/app.h"
#include "domicile/crypto.h"
#include "domicile/peer.h"
#include "domicile/validate.h"

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

/** The own region `r`'s key custody (NULL for a peer region). */
dm_custody_t *dm_api_custody(dm_app_t *app, dm_region_t *r);
/**
 * The data key `key_id` of (customer, subject key `sk` of `sk_len` bytes, 0 for the customer's
 * own) in region `r`, wrapped as `w`: from the key cache when it holds that key, else unwrapped
 * by the region's key custody (the token) and cached. `dek` is the caller's (cleanse it).
 * Errors as dm_custody_unwrap().
 */
dm_status_t *dm_api_data_key(dm_app_t *app, dm_region_t *r, const char *customer,
                             const unsigned char *sk, size_t sk_len, int64_t key_id,
                             const unsigned char *w, size_t w_len,
                             unsigned char dek[DM_KEY_LEN]) DM_WARN_UNUSED;

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

/** "active" | "closed" | "purged" text -> enum. */
int dm_customer_state_enum(const char *s, size_t len);

#endif
