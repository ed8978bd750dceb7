/*
 * The transfer gate every data-moving call passes once its customer's region R is known:
 * the caller's own region C (its principal's), the purpose of the call, the policy.
 *   - a purpose the policy forbids: PERMISSION_DENIED on every route, same region included;
 *   - C == R: no transfer;
 *   - otherwise the first basis in force on the route, or a refusal that is itself logged
 *     in R's ledger (naming the route's basis that is not in force, if any) before
 *     PERMISSION_DENIED goes back;
 * and, for an allowed transfer, the ledger entry committed in R before the data leaves.
 * A call that a gateway of a third region V forwarded (V neither R nor C) passes through V in
 * plaintext: that transit is a transfer too (read R -> V, write C -> V), gated and logged the
 * same way, so that R's data exists outside R only where the ledger says it went.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "domicile/app.h"
#include "domicile/log.h"
#include "domicile/transfer.h"

void dm_xfer_request_id(dm_call_t *call, const char *given, char out[DM_XFER_ID_LEN])
{
    size_t len = 0;
    const char *md = dm_call_metadata(call, "x-request-id", &len);
    if (given && *given) {
        snprintf(out, DM_XFER_ID_LEN, "%s", given);
        return;
    }
    if (md && len > 0 && len < DM_XFER_ID_LEN) {
        bool ok = true;
        for (size_t i = 0; i < len; i++)
            ok = ok && md[i] > 0x20 && md[i] < 0x7f;
        if (ok) {
            memcpy(out, md, len);
            out[len] = '\0';
            return;
        }
    }
    unsigned char r[12];
    char hex[25];
    dm_random_bytes(r, sizeof(r));
    dm_hex_encode(r, sizeof(r), hex);
    snprintf(out, DM_XFER_ID_LEN, "gw-%s", hex);
}

typedef struct refusal {
    dm_xfer_fn fn;
    void *arg;
    dm_status_t *answer;
} refusal_t;

static void refusal_logged(void *arg, dm_status_t *err)
{
    refusal_t *r = arg;
    if (err) {
        /* Still refused: nothing is sent either way. The operator needs to know the refusal
         * did not reach the ledger. */
        dm_error("transfers", "a refused transfer could not be logged: %s",
                 err->detail ? err->detail : err->message);
        dm_status_free(err);
    }
    r->fn(r->arg, r->answer);
    free(r);
}

/* The ledger entry of one leg (from -> to under basis; basis NULL: refused, `why`). */
static dm_transfer_t leg_entry(dm_call_t *call, const dm_xfer_t *x, const char *from,
                               const char *to, const dm_basis_t *basis, const char *why)
{
    const dm_principal_t *p = dm_call_principal_of(call);
    return (dm_transfer_t){
        .request_id = x->request_id,
        .principal = p ? p->name : "",
        .method = x->method,
        .customer_id = x->customer_id,
        .subject_key = x->subject_key,
        .from = from,
        .to = to,
        .direction = x->dir,
        .purpose = dm_call_purpose(call),
        .basis_id = basis ? basis->id : "",
        .allowed = why == NULL,
        .refusal = why ? why : "",
        .record_ids = "",
    };
}

/* Refuse the call: the refusal of from -> to is logged in the data's region first. */
static void refuse(dm_call_t *call, const dm_xfer_t *x, const char *from, const char *to,
                   const char *why, dm_status_t *answer, dm_xfer_fn fn, void *arg)
{
    dm_app_t *app = dm_call_app(call);
    const char *purpose = dm_call_purpose(call);
    refusal_t *rf = dm_malloc(sizeof(*rf));
    rf->fn = fn;
    rf->arg = arg;
    rf->answer = answer;
    dm_transfer_t t =
        leg_entry(call, x, from, to,
                  dm_policy_considered(dm_app_policy(app), from, to, purpose, dm_now_ms()), why);
    /* What the call asked for: the one record it names; a listing or an export names none
     * before its records are read, and they are not read to count them. */
    t.record_count = x->record_id ? 1 : 0;
    t.record_ids = x->record_id ? x->record_id : "";
    dm_ledger_append(x->region, app->ledger_keys[dm_app_region_index(app, x->region)], &t, call,
                     refusal_logged, rf);
}

void dm_xfer_gate(dm_call_t *call, dm_region_t *region, dm_xfer_t *x, dm_xfer_fn fn, void *arg)
{
    dm_app_t *app = dm_call_app(call);
    const dm_principal_t *p = dm_call_principal_of(call);
    const char *purpose = dm_call_purpose(call);
    const char *r = dm_region_code(region);
    const char *c = p ? p->region : r;
    const char *why = NULL;
    int64_t now = dm_now_ms();

    x->region = region;
    x->direct = strcmp(c, r) != 0;
    x->from = x->dir == DM_TRANSFER_READ ? r : c;
    x->to = x->dir == DM_TRANSFER_READ ? c : r;
    x->basis = NULL;
    x->via = p && p->via && strcmp(p->via, r) != 0 && strcmp(p->via, c) != 0 ? p->via : NULL;
    x->via_from = x->dir == DM_TRANSFER_READ ? r : c;
    x->via_basis = NULL;
    x->cross = x->direct || x->via;
    if (!x->cross) {
        if (dm_policy_forbidden(dm_app_policy(app), purpose)) {
            fn(arg,
               dm_status_new(GRPC_STATUS_PERMISSION_DENIED,
                             "purpose \"%s\" is forbidden for customer data by policy", purpose));
            return;
        }
        fn(arg, NULL);
        return;
    }
    if (x->direct &&
        !(x->basis = dm_policy_decide(dm_app_policy(app), x->from, x->to, purpose, now, &why))) {
        refuse(call, x, x->from, x->to, why,
               dm_status_new(GRPC_STATUS_PERMISSION_DENIED,
                             "no legal basis for the transfer %s -> %s for purpose \"%s\": %s",
                             x->from, x->to, purpose, why),
               fn, arg);
        return;
    }
    if (x->via && !(x->via_basis = dm_policy_decide(dm_app_policy(app), x->via_from, x->via,
                                                    purpose, now, &why))) {
        refuse(call, x, x->via_from, x->via, why,
               dm_status_new(GRPC_STATUS_PERMISSION_DENIED,
                             "no legal basis for the transfer %s -> %s for purpose \"%s\" (the "
                             "call came through a gateway in %s; call a gateway of %s or %s): %s",
                             x->via_from, x->via, purpose, x->via, r, c, why),
               fn, arg);
        return;
    }
    fn(arg, NULL);
}

typedef struct legs {
    dm_ledger_done_fn done;
    void *arg;
    int pending;
    dm_status_t *err;
    pthread_mutex_t mu;
} legs_t;

static void leg_logged(void *arg, dm_status_t *err)
{
    legs_t *l = arg;
    pthread_mutex_lock(&l->mu);
    if (err && !l->err)
        l->err = err;
    else
        dm_status_free(err);
    bool last = --l->pending == 0;
    pthread_mutex_unlock(&l->mu);
    if (!last)
        return;
    pthread_mutex_destroy(&l->mu);
    l->done(l->arg, l->err);
    free(l);
}

void dm_xfer_log(dm_call_t *call, const dm_xfer_t *x, int64_t records, int64_t bytes,
                 const char *record_ids, dm_ledger_done_fn done, void *arg)
{
    dm_app_t *app = dm_call_app(call);
    const unsigned char *key = app->ledger_keys[dm_app_region_index(app, x->region)];
    dm_transfer_t t[2];
    int n = 0;
    if (x->direct)
        t[n++] = leg_entry(call, x, x->from, x->to, x->basis, NULL);
    if (x->via)
        t[n++] = leg_entry(call, x, x->via_from, x->via, x->via_basis, NULL);
    for (int i = 0; i < n; i++) {
        t[i].record_count = records;
        t[i].bytes = bytes;
        t[i].record_ids = record_ids ? record_ids : "";
    }
    if (n == 1) {
        dm_ledger_append(x->region, key, &t[0], call, done, arg);
        return;
    }
    /* Both entries go to the region's ledger at once; the data waits for both. */
    legs_t *l = dm_calloc(1, sizeof(*l));
    l->done = done;
    l->arg = arg;
    l->pending = n;
    pthread_mutex_init(&l->mu, NULL);
    for (int i = 0; i < n; i++)
        dm_ledger_append(x->region, key, &t[i], call, leg_logged, l);
}
