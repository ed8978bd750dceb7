/*
 * domicile.v1.KeysService: RotateKey, GetKeyStatus, RetireKeyVersion. A region's KEK versions
 * live in its token, which only its own gateways open: a call naming another region is
 * forwarded there. The work runs on the region's custody thread (src/custody), which answers
 * through done(): the call's context lives until then.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "domicile/v1/keys.pb-c.h"

#include "internal.h"

typedef enum { OP_ROTATE, OP_STATUS, OP_RETIRE } op_t;

typedef struct keys_call {
    dm_call_t *call;
    op_t op;
} keys_call_t;

static dm_status_t *region_of(dm_call_t *call, const char *code, dm_region_t **out)
{
    *out = code[0] && strlen(code) <= DM_REGION_CODE_MAX ? dm_regions_find(APP(call)->regions, code)
                                                         : NULL;
    if (!*out)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "region: unknown region code");
    return NULL;
}

/* The report as a KeyStatus; its strings stay the report's. */
static void fill_status(Domicile__V1__KeyStatus *s, const dm_custody_report_t *rep,
                        Domicile__V1__KeyVersion *vs, Domicile__V1__KeyVersion **vp,
                        Domicile__V1__KeyRotation *rot)
{
    domicile__v1__key_status__init(s);
    s->region = (char *)rep->region;
    s->kek_source = (char *)rep->source;
    s->token = (char *)rep->token;
    s->available = rep->ready;
    s->unavailable_reason = (char *)rep->why;
    s->current_version = rep->current;
    for (size_t i = 0; i < rep->n_versions; i++) {
        const dm_custody_version_t *v = &rep->versions[i];
        domicile__v1__key_version__init(&vs[i]);
        vs[i].version = v->version;
        vs[i].source = (char *)v->source;
        vs[i].state = (char *)v->state;
        vs[i].label = (char *)v->label;
        vs[i].data_keys = v->data_keys;
        vs[i].created_at_unix_ms = v->created_ms;
        vs[i].activated_at_unix_ms = v->activated_ms;
        vs[i].retired_at_unix_ms = v->retired_ms;
        vs[i].current = v->version == rep->current;
        vp[i] = &vs[i];
    }
    s->n_versions = rep->n_versions;
    s->versions = vp;
    if (rep->rotation_id) {
        domicile__v1__key_rotation__init(rot);
        rot->rotation_id = rep->rotation_id;
        rot->target_version = rep->target;
        rot->state = (char *)rep->rotation_state;
        rot->keys_total = rep->keys_total;
        rot->keys_rewrapped = rep->keys_rewrapped;
        rot->keys_remaining = rep->keys_remaining;
        rot->started_at_unix_ms = rep->started_ms;
        rot->finished_at_unix_ms = rep->finished_ms;
        rot->started_by = (char *)rep->started_by;
        rot->claimed_by = (char *)rep->claimed_by;
        rot->last_error = (char *)rep->last_error;
        rot->rewrap_per_second = rep->rewrap_per_s;
        s->rotation = rot;
    }
}

/* On the custody thread. */
static void done(void *arg, const dm_custody_report_t *rep, dm_status_t *err)
{
    keys_call_t *k = arg;
    dm_call_t *call = k->call;
    op_t op = k->op;
    free(k);
    if (err) {
        dm_call_finish(call, err);
        return;
    }
    Domicile__V1__KeyStatus s;
    Domicile__V1__KeyVersion vs[DM_CUSTODY_MAX_VERSIONS], *vp[DM_CUSTODY_MAX_VERSIONS];
    Domicile__V1__KeyRotation rot;
    fill_status(&s, rep, vs, vp, &rot);
    if (op == OP_ROTATE) {
        Domicile__V1__RotateKeyResponse r = DOMICILE__V1__ROTATE_KEY_RESPONSE__INIT;
        r.status = &s;
        r.replayed = rep->replayed;
        dm_call_reply(call, &r.base);
    } else if (op == OP_RETIRE) {
        Domicile__V1__RetireKeyVersionResponse r = DOMICILE__V1__RETIRE_KEY_VERSION_RESPONSE__INIT;
        r.status = &s;
        dm_call_reply(call, &r.base);
    } else {
        Domicile__V1__GetKeyStatusResponse r = DOMICILE__V1__GET_KEY_STATUS_RESPONSE__INIT;
        r.status = &s;
        dm_call_reply(call, &r.base);
    }
}

/* Validate, forward to the region's gateways or find its custody here. */
static dm_custody_t *start(dm_call_t *call, const char *request_id, const char *region)
{
    dm_region_t *r = NULL;
    dm_status_t *st = NULL;
    if (request_id && (st = dm_check_request_id("request_id", request_id))) {
        dm_call_finish(call, st);
        return NULL;
    }
    if ((st = region_of(call, region, &r))) {
        dm_call_finish(call, st);
        return NULL;
    }
    /* Only the region's own gateways open its token. */
    if (dm_api_forward_to(call, r))
        return NULL;
    dm_custody_t *c = dm_api_custody(APP(call), r);
    if (!c)
        dm_call_finish(call, dm_status_new(GRPC_STATUS_INTERNAL,
                                           "region \"%s\" has no key custody here", region));
    return c;
}

static keys_call_t *ctx(dm_call_t *call, op_t op)
{
    keys_call_t *k = dm_calloc(1, sizeof(*k));
    k->call = call;
    k->op = op;
    return k;
}

static const char *principal_name(dm_call_t *call)
{
    const dm_principal_t *p = dm_call_principal_of(call);
    return p ? p->name : "";
}

void dm_keys_rotate(dm_call_t *call)
{
    const Domicile__V1__RotateKeyRequest *req =
        (const Domicile__V1__RotateKeyRequest *)dm_call_request(call);
    dm_custody_t *c = start(call, req->request_id, req->region);
    if (c)
        dm_custody_rotate(c, principal_name(call), req->request_id, done, ctx(call, OP_ROTATE));
}

void dm_keys_status(dm_call_t *call)
{
    const Domicile__V1__GetKeyStatusRequest *req =
        (const Domicile__V1__GetKeyStatusRequest *)dm_call_request(call);
    dm_custody_t *c = start(call, NULL, req->region);
    if (c)
        dm_custody_status(c, done, ctx(call, OP_STATUS));
}

void dm_keys_retire(dm_call_t *call)
{
    const Domicile__V1__RetireKeyVersionRequest *req =
        (const Domicile__V1__RetireKeyVersionRequest *)dm_call_request(call);
    if (req->version < 1) {
        dm_call_finish(call, dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "version: must be >= 1"));
        return;
    }
    dm_custody_t *c = start(call, req->request_id, req->region);
    if (c)
        dm_custody_retire(c, req->version, principal_name(call), done, ctx(call, OP_RETIRE));
}
