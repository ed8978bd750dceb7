/*
 * dm_config_load() on the input as the gateway file, in a directory holding valid region
 * files, secrets and principals (fz_fixture), so a config naming them is loaded to the end.
 * Text after a "\n%%\n" line becomes regions/fz.conf: a gateway file naming region "fz" takes
 * the region parser through it. Text after a second such line becomes hooks.conf: a gateway
 * file naming it as customer_webhooks_file takes the webhooks loader through it.
 */
#include <stdio.h>
#include <string.h>

#include "domicile/dsr.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static FILE *devnull;
    dm_config_t *cfg = NULL;
    const uint8_t *end = data + size;
    const uint8_t *sep = memmem(data, size, "\n%%\n", 4);
    const uint8_t *region = sep ? sep + 4 : end;
    const uint8_t *sep2 = sep ? memmem(region, (size_t)(end - region), "\n%%\n", 4) : NULL;
    const uint8_t *hooks = sep2 ? sep2 + 4 : end;

    fz_fixture();
    if (!devnull)
        devnull = fopen("/dev/null", "w");
    fz_write("fuzz.conf", data, sep ? (size_t)(sep - data) + 1 : size, 0644);
    fz_write("regions/fz.conf", region, sep2 ? (size_t)(sep2 - region) + 1 : (size_t)(end - region),
             0644);
    fz_write("hooks.conf", hooks, (size_t)(end - hooks), 0644);
    dm_status_t *st = dm_config_load(fz_path("fuzz.conf"), &cfg);
    if (st) {
        fz_status(st, false);
        return 0;
    }
    dm_config_print(cfg, devnull);
    size_t n_hooks;
    fz_status(dm_webhooks_check(cfg, &n_hooks), false);
    dm_config_free(cfg);
    return 0;
}
