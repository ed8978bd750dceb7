/*
 * dm_policy_load() (src/ledger/policy.c): the input is regions/bases.conf, text after a
 * "\n%%\n" line is regions/routes.conf (else the fixture's routes). A loaded policy then
 * decides a few transfers; a decision must name a basis of the catalogue in force.
 */
#include <string.h>

#include "domicile/ledger.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const purposes[] = {"analytics", "sale", "service-delivery", "*"};
    static const int64_t days[] = {0, 1624752000000, 1700000000000, 1924992000000};
    const dm_config_t *cfg = fz_config();
    const uint8_t *sep = memmem(data, size, "\n%%\n", 4);
    size_t b_len = sep ? (size_t)(sep - data) + 1 : size;
    dm_policy_t *p = NULL;
    const char *why;

    fz_write("fuzz-bases.conf", data, b_len, 0644);
    if (sep)
        fz_write("fuzz-routes.conf", sep + 4, size - b_len - 3, 0644);
    dm_status_t *st = dm_policy_load(fz_path("fuzz-bases.conf"),
                                     fz_path(sep ? "fuzz-routes.conf" : "routes.conf"), cfg, &p);
    if (st) {
        fz_status(st, false);
        return 0;
    }
    for (size_t i = 0; i < cfg->n_regions * cfg->n_regions * 16; i++) {
        const char *from = cfg->regions[i % cfg->n_regions];
        const char *to = cfg->regions[i / cfg->n_regions % cfg->n_regions];
        int64_t now = days[i / 9 % 4];
        const dm_basis_t *b = dm_policy_decide(p, from, to, purposes[i / 36 % 4], now, &why);
        if (b ? dm_policy_basis(p, b->id) != b || now < b->effective_ms ||
                    (b->revoked_ms && now >= b->revoked_ms)
              : !why || !why[0])
            abort();
    }
    dm_policy_free(p);
    return 0;
}
