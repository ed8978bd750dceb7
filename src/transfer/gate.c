/*
 * The transfer gate every data-moving call passes once its customer's region R is known:
 * the caller's own region C (its principal's), the purpose of the call, the policy.
 *   - a purpose the policy forbids: PERMISSION_DENIED on every route, same region included;
 *   - C == R: no transfer;
 *   - otherwise the first basis in force on the route, or a refusal that is itself logged
 *     in R's ledger (naming the route's basis that is not in force, if any) before
 *     PERMISSION_DENIED goes back;
 * and, for an allowed transfer, the ledger entry committed in R before the data leaves.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "domicile/log.h"
#include "domicile/app.h"
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

void dm_xfer_gate(dm_call_t *call, dm_region_t *region, dm_xfer_t *x, dm_xfer_fn fn, void *arg)
{
    dm_app_t *app = dm_call_app(call);
    const dm_principal_t *p = dm_call_principal_of(call);
    const char *purpose = dm_call_purpose(call);
    const char *r = dm_region_code(region);
    const char *c = p ? p->region : r;
    const char *why = NULL;

    x->region = region;
    x->cross = strcmp(c, r) != 0;
    x->from = x->dir == DM_TRANSFER_READ ? r : c;
    x->to = x->dir == DM_TRANSFER_READ ? c : r;
    x->basis = NULL;
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
    int64_t now = dm_now_ms();
    x->basis = dm_policy_decide(dm_app_policy(app), x->from, x->to, purpose, now, &why);
    if (x->basis) {
        fn(arg, NULL);
        return;
    }
    const dm_basis_t *considered =
        dm_policy_considered(dm_app_policy(app), x->from, x->to, purpose, now);
    refusal_t *rf = dm_malloc(sizeof(*rf));
    rf->fn = fn;
    rf->arg = arg;
    rf->answer = dm_status_new(GRPC_STATUS_PERMISSION_DENIED,
                               "no legal basis for the transfer %s -> %s for purpose \"%s\": %s",
                               x->from, x->to, purpose, why);
    dm_transfer_t t = {
        .request_id = x->request_id,
        .principal = p ? p->name : "",
        .method = x->method,
        .customer_id = x->customer_id,
        .subject_key = x->subject_key,
        .from = x->from,
        .to = x->to,
        .direction = x->dir,
        .purpose = purpose,
        .basis_id = considered ? considered->id : "",
        .allowed = false,
        .refusal = why,
        /* What the call asked for: the one record it names; a listing or an export names
         * none before its records are read, and they are not read to count them. */
        .record_count = x->record_id ? 1 : 0,
        .record_ids = x->record_id ? x->record_id : "",
    };
    dm_ledger_append(region, app->ledger_keys[dm_app_region_index(app, region)], &t, call,
                     refusal_logged, rf);
}

void dm_xfer_log(dm_call_t *call, const dm_xfer_t *x, int64_t records, int64_t bytes,
                 const char *record_ids, dm_ledger_done_fn done, void *arg)
{
    dm_app_t *app = dm_call_app(call);
    const dm_principal_t *p = dm_call_principal_of(call);
    dm_transfer_t t = {
        .request_id = x->request_id,
        .principal = p ? p->name : "",
        .method = x->method,
        .customer_id = x->customer_id,
        .subject_key = x->subject_key,
        .record_count = records,
        .bytes = bytes,
        .from = x->from,
        .to = x->to,
        .direction = x->dir,
        .purpose = dm_call_purpose(call),
        .basis_id = x->basis->id,
        .allowed = true,
        .refusal = "",
        .record_ids = record_ids ? record_ids : "",
    };
    dm_ledger_append(x->region, app->ledger_keys[dm_app_region_index(app, x->region)], &t, call,
                     done, arg);
}
