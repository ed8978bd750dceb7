/*
 * The authorizer every call passes before its request is decoded: who is calling
 * (bearer token, else client certificate), may that role call this method, and for which
 * purpose. Tokens are never logged or echoed.
 */
#include <string.h>

#include "domicile/app.h"
#include "domicile/auth.h"
#include "domicile/log.h"
#include "domicile/peer.h"
#include "domicile/validate.h"

dm_status_t *dm_authorize(dm_call_t *call, void *arg)
{
    dm_app_t *app = arg;
    const dm_method_t *m = dm_call_method(call);
    const dm_principal_t *p = NULL;
    size_t len = 0;

    if (!m || m->roles == DM_ROLES_PUBLIC)
        return NULL;
    bool peer_method = strncmp(m->path, "/domicile.peer.", 15) == 0;
    if (peer_method || dm_call_metadata(call, DM_PEER_PRINCIPAL_MD, &len)) {
        /* A gateway of another region speaks for the principal it authenticated (promise
         * 10); roles and tenant scope are checked here again, as for any caller. */
        char via[DM_REGION_CODE_MAX + 1], purpose[DM_PURPOSE_MAX_LEN + 1];
        dm_principal_t *ap = NULL;
        dm_status_t *st = dm_peer_authenticate(call, app->cfg, via, sizeof(via));
        if (!st)
            st = dm_peer_principal(call, via, &ap, purpose);
        if (st)
            return st;
        dm_call_set_principal_owned(call, ap, dm_peer_principal_free);
        dm_call_set_log_principal(call, ap->name);
        dm_call_set_purpose(call, purpose);
        if (!peer_method && !(ap->roles & m->roles)) {
            char need[128];
            dm_roles_format(m->roles, need, sizeof(need));
            return dm_status_new(GRPC_STATUS_PERMISSION_DENIED,
                                 "%s needs one of the roles: %s (principal \"%s\" has none of "
                                 "them)",
                                 m->path, need, ap->name);
        }
        return NULL;
    }
    const char *auth = dm_call_metadata(call, "authorization", &len);
    if (auth) {
        const char *tok;
        size_t tok_len;
        if (!dm_auth_parse_bearer(auth, len, &tok, &tok_len))
            return dm_status_new(GRPC_STATUS_UNAUTHENTICATED,
                                 "authorization: expected \"Bearer <token>\"");
        p = dm_principals_by_token(dm_app_principals(app), tok, tok_len);
        if (!p)
            return dm_status_new(GRPC_STATUS_UNAUTHENTICATED, "unknown token");
    } else {
        char subject[600];
        if (dm_call_peer_subject(call, subject, sizeof(subject))) {
            p = dm_principals_by_subject(dm_app_principals(app), subject);
            if (!p)
                return dm_status_new(GRPC_STATUS_UNAUTHENTICATED,
                                     "client certificate is not a known principal");
        }
    }
    if (!p)
        return dm_status_new(GRPC_STATUS_UNAUTHENTICATED,
                             "no credentials: send \"authorization: Bearer <token>\" or a client "
                             "certificate");
    if (!(p->roles & m->roles)) {
        char need[128];
        dm_roles_format(m->roles, need, sizeof(need));
        return dm_status_new(GRPC_STATUS_PERMISSION_DENIED,
                             "%s needs one of the roles: %s (principal \"%s\" has none of them)",
                             m->path, need, p->name);
    }
    const char *purpose = dm_call_metadata(call, "x-purpose", &len);
    if (purpose) {
        char buf[DM_PURPOSE_MAX_LEN + 1];
        dm_status_t *st = dm_auth_parse_purpose(purpose, len, buf);
        if (st)
            return st;
        dm_call_set_purpose(call, buf);
    } else {
        dm_call_set_purpose(call, p->default_purpose);
    }
    dm_call_set_principal(call, p);
    dm_call_set_log_principal(call, p->name);
    return NULL;
}
