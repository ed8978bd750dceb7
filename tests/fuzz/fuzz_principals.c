/*
 * dm_principals_load() on the input against the fixture's config (regions us, eu, in), then
 * the lookups the authorizer makes on what it loaded.
 */
#include <string.h>

#include "domicile/auth.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const dm_config_t *cfg = fz_config();
    dm_principals_t *ps = NULL;
    char roles[128];

    fz_write("fuzz-principals.conf", data, size, 0644);
    dm_status_t *st = dm_principals_load(fz_path("fuzz-principals.conf"), cfg, &ps);
    if (st) {
        fz_status(st, false);
        return 0;
    }
    for (size_t i = 0; i < ps->n; i++) {
        const dm_principal_t *p = &ps->items[i];
        if (!p->name[0] || !p->roles || !dm_config_region(cfg, p->region) ||
            (!p->has_token && !p->cert_subject))
            abort(); /* the loader accepted what it documents as an error */
        dm_roles_format(p->roles, roles, sizeof(roles));
        (void)dm_principal_in_scope(p, "acme");
        if (p->cert_subject && dm_principals_by_subject(ps, p->cert_subject) == NULL)
            abort();
    }
    (void)dm_principals_by_token(ps, "svc-token", strlen("svc-token"));
    dm_principals_free(ps);
    return 0;
}
