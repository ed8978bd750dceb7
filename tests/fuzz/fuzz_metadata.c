/*
 * Request metadata as the authorizer (src/auth/authorize.c) reads it: the input is the value
 * of `authorization` (not NUL-terminated, as gRPC hands it over: a header value may hold any
 * byte, NUL included) and of `x-purpose`. Tokens are looked up in the fixture's principals
 * ("svc-token" and "ro-token" are known).
 */
#include <stdio.h>
#include <string.h>

#include "domicile/auth.h"
#include "domicile/validate.h"
#include "fuzz_util.h"

static dm_principals_t *principals(void)
{
    static dm_principals_t *ps;
    dm_status_t *st;
    const dm_config_t *cfg = fz_config(); /* first: it writes the fixture (fz_path) */
    if (!ps && (st = dm_principals_load(fz_path("principals.conf"), cfg, &ps))) {
        fprintf(stderr, "fuzz fixture: %s\n", st->message);
        abort();
    }
    return ps;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *v = (const char *)data, *tok;
    size_t tok_len;
    char buf[DM_PURPOSE_MAX_LEN + 1];

    if (dm_auth_parse_bearer(v, size, &tok, &tok_len)) {
        if (tok < v || tok + tok_len > v + size || tok_len == 0 || tok_len > 512)
            abort();
        const dm_principal_t *p = dm_principals_by_token(principals(), tok, tok_len);
        const char *want = p ? (strcmp(p->name, "svc") == 0 ? "svc-token" : "ro-token") : NULL;
        if (p && (tok_len != strlen(want) || memcmp(tok, want, tok_len) != 0))
            abort(); /* a token matched that is not the principal's */
    }
    dm_status_t *st = dm_auth_parse_purpose(v, size, buf);
    if (!st &&
        (strlen(buf) != size || strspn(buf, "abcdefghijklmnopqrstuvwxyz0123456789-") != size))
        abort(); /* the call would run with a purpose other than the one sent */
    fz_status(st, true);
    return 0;
}
