#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "domicile/log.h"
#include "domicile/v1/customers.pb-c.h"

#include "internal.h"

char *dm_labels_to_json(size_t n, void *const *entries)
{
    json_t *o = json_object();
    for (size_t i = 0; i < n; i++) {
        const dm_label_entry_t *e = entries[i];
        json_object_set_new(o, e->key, json_string(e->value));
    }
    char *s = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(o);
    if (!s)
        abort(); /* values were validated as UTF-8 */
    return s;
}

bool dm_labels_from_json(const char *text, size_t len, const ProtobufCMessageDescriptor *desc,
                         size_t *n_out, void ***out)
{
    json_error_t jerr;
    json_t *o = json_loadb(text, len, 0, &jerr);
    if (!o || !json_is_object(o)) {
        json_decref(o);
        return false;
    }
    size_t n = json_object_size(o), i = 0;
    void **entries = n ? dm_calloc(n, sizeof(void *)) : NULL;
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v)
    {
        dm_label_entry_t *e = dm_calloc(1, desc->sizeof_message);
        protobuf_c_message_init(desc, e);
        e->key = dm_strdup(k);
        e->value = dm_strdup(json_is_string(v) ? json_string_value(v) : "");
        entries[i++] = e;
    }
    json_decref(o);
    *n_out = n;
    *out = entries;
    return true;
}

void dm_labels_free(size_t n, void **entries)
{
    for (size_t i = 0; i < n; i++) {
        dm_label_entry_t *e = entries[i];
        free(e->key);
        free(e->value);
        free(e);
    }
    free(entries);
}

void dm_fingerprint(unsigned char out[32], size_t n_parts, const dm_aad_part_t *parts)
{
    size_t len;
    unsigned char *enc = dm_aad(&len, n_parts, parts);
    unsigned int olen = 32;
    if (!EVP_Digest(enc, len, out, &olen, EVP_sha256(), NULL))
        abort();
    OPENSSL_cleanse(enc, len); /* may hold a payload */
    free(enc);
}

dm_status_t *dm_subject_to_key(dm_app_t *app, const char *field, const char *subject, bool *has,
                               unsigned char key[DM_SUBJECT_KEY_LEN])
{
    char *norm = NULL;
    *has = false;
    if (subject[0] == '\0')
        return NULL;
    dm_status_t *st = dm_subject_normalize(subject, &norm);
    if (st) {
        dm_status_t *out =
            dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                          "%s: must be 1..%d bytes of UTF-8 after trimming", field, DM_SUBJECT_MAX);
        dm_status_free(st);
        return out;
    }
    dm_subject_key(app->pepper, app->pepper_len, norm, key);
    OPENSSL_cleanse(norm, strlen(norm));
    free(norm);
    *has = true;
    return NULL;
}

dm_custody_t *dm_api_custody(dm_app_t *app, dm_region_t *r)
{
    return app->custody[dm_app_region_index(app, r)];
}

dm_status_t *dm_api_data_key(dm_app_t *app, dm_region_t *r, const char *customer,
                             const unsigned char *sk, size_t sk_len, int64_t key_id,
                             const unsigned char *w, size_t w_len, unsigned char dek[DM_KEY_LEN])
{
    const char *code = dm_region_code(r);
    const unsigned char *subject = sk_len ? sk : NULL;
    int64_t cached_id = 0;
    dm_custody_t *c = dm_api_custody(app, r);
    if (!c)
        return dm_status_new(GRPC_STATUS_INTERNAL, "region \"%s\" holds no keys here", code);
    /* Fail closed: a region whose KEK is gone (or token down) serves no cached key either. */
    dm_status_t *st = dm_custody_check(c);
    if (st)
        return st;
    /* Hot reads stay off the token: a data key never changes (a rotation re-wraps it, and an
     * erasure deletes its row, which the read's join then no longer finds). */
    if (dm_keycache_get(app->keys, code, customer, subject, &cached_id, dek) && cached_id == key_id)
        return NULL;
    size_t aad_len;
    unsigned char *aad = dm_key_aad(code, customer, subject, subject ? sk_len : 0, &aad_len);
    st = dm_custody_unwrap(c, w, w_len, aad, aad_len, dek);
    free(aad);
    if (!st)
        dm_keycache_put(app->keys, code, customer, subject, key_id, dek);
    return st;
}

int dm_customer_state_enum(const char *s, size_t len)
{
    if (len == 6 && memcmp(s, "active", 6) == 0)
        return DOMICILE__V1__CUSTOMER_STATE__CUSTOMER_STATE_ACTIVE;
    if (len == 6 && memcmp(s, "closed", 6) == 0)
        return DOMICILE__V1__CUSTOMER_STATE__CUSTOMER_STATE_CLOSED;
    if (len == 6 && memcmp(s, "purged", 6) == 0)
        return DOMICILE__V1__CUSTOMER_STATE__CUSTOMER_STATE_PURGED;
    return DOMICILE__V1__CUSTOMER_STATE__CUSTOMER_STATE_UNSPECIFIED;
}

typedef struct scoped {
    dm_resolve_fn fn;
    void *arg;
} scoped_t;

static void scoped_done(void *arg, dm_region_t *region, const char *state, dm_status_t *err)
{
    scoped_t sc = *(scoped_t *)arg;
    free(arg);
    /* An error (NOT_FOUND, UNAVAILABLE) is what a missing customer would get too. */
    if (!err)
        err = dm_status_new(GRPC_STATUS_NOT_FOUND, "customer not found");
    sc.fn(sc.arg, NULL, NULL, err);
}

static void directory_resolve(dm_app_t *app, const dm_principal_t *p, const char *customer_id,
                              dm_call_t *call, dm_resolve_fn fn, void *arg)
{
    if (p && p->via)
        dm_directory_resolve_local(app->directory, customer_id, call, fn, arg);
    else
        dm_directory_resolve(app->directory, customer_id, call, fn, arg);
}

void dm_api_resolve(dm_call_t *call, const char *customer_id, dm_resolve_fn fn, void *arg)
{
    const dm_principal_t *p = dm_call_principal_of(call);
    dm_app_t *app = APP(call);
    if (!p || dm_principal_in_scope(p, customer_id)) {
        directory_resolve(app, p, customer_id, call, fn, arg);
        return;
    }
    /* Outside the scope: do the same directory work, then answer as for a missing customer,
     * so neither the status, the message nor the kind of work done tells them apart. */
    scoped_t *sc = dm_malloc(sizeof(*sc));
    sc->fn = fn;
    sc->arg = arg;
    directory_resolve(app, p, customer_id, call, scoped_done, sc);
}

typedef struct routed {
    dm_call_t *call;
    dm_resolve_fn fn;
    void *arg;
} routed_t;

static void routed_done(void *arg, dm_region_t *region, const char *state, dm_status_t *err)
{
    routed_t rt = *(routed_t *)arg;
    free(arg);
    if (!err && region && !dm_region_is_local(region)) {
        const dm_principal_t *p = dm_call_principal_of(rt.call);
        if (!p || !p->via) {
            /* Promise 10: the customer's region decides and does the rest; a fence seen
             * here stops the call here, as it would stop a local one. */
            dm_status_t *fenced = dm_region_fence_check(region);
            if (fenced)
                dm_call_finish(rt.call, fenced);
            else
                dm_peer_forward(APP(rt.call)->peers, region, rt.call);
            return;
        }
        /* Forwarded here, yet not ours: never forwarded twice. */
        err = dm_status_new(GRPC_STATUS_UNAVAILABLE,
                            "customer is served by region \"%s\", not by this gateway's",
                            dm_region_code(region));
        region = NULL;
    }
    rt.fn(rt.arg, region, state, err);
}

void dm_api_route(dm_call_t *call, const char *customer_id, dm_resolve_fn fn, void *arg)
{
    routed_t *rt = dm_malloc(sizeof(*rt));
    rt->call = call;
    rt->fn = fn;
    rt->arg = arg;
    dm_api_resolve(call, customer_id, routed_done, rt);
}

bool dm_api_forward_to(dm_call_t *call, dm_region_t *region)
{
    const dm_principal_t *p = dm_call_principal_of(call);
    if (!region || dm_region_is_local(region))
        return false;
    if (p && p->via) {
        dm_call_finish(call, dm_status_new(GRPC_STATUS_UNAVAILABLE,
                                           "region \"%s\" is not served by this gateway",
                                           dm_region_code(region)));
        return true;
    }
    dm_status_t *fenced = dm_region_fence_check(region);
    if (fenced)
        dm_call_finish(call, fenced);
    else
        dm_peer_forward(APP(call)->peers, region, call);
    return true;
}

bool dm_api_forwarded_from(dm_call_t *call, dm_handler_fn handler)
{
    const dm_principal_t *p = dm_call_principal_of(call);
    size_t len = 0;
    const char *origin = p && p->via ? dm_call_metadata(call, DM_PEER_ORIGIN_MD, &len) : NULL;
    const char *path = dm_api_method_path(handler);
    return origin && len == strlen(path) && memcmp(origin, path, len) == 0;
}

void dm_api_reply_wrapped(dm_call_t *call, const ProtobufCMessage *inner)
{
    /* Several rpcs answer with the same resource (a customer, a data-subject request), each
     * in a response type of its own so that one of them can grow a field alone. */
    const ProtobufCMessageDescriptor *d = dm_call_method(call)->output;
    if (d->n_fields != 1 || d->fields[0].type != PROTOBUF_C_TYPE_MESSAGE ||
        d->fields[0].label == PROTOBUF_C_LABEL_REPEATED ||
        d->fields[0].descriptor != inner->descriptor) {
        dm_error("api", "%s: response %s does not wrap a %s", dm_call_method(call)->path, d->name,
                 inner->descriptor->name);
        dm_call_finish(call, dm_status_new(GRPC_STATUS_INTERNAL, "internal error"));
        return;
    }
    ProtobufCMessage *out = dm_calloc(1, d->sizeof_message);
    d->message_init(out);
    memcpy((char *)out + d->fields[0].offset, &inner, sizeof(inner));
    dm_call_reply(call, out);
    free(out);
}
