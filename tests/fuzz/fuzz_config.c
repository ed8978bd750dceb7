/*
 * dm_config_load() on the input as the gateway file, in a directory holding valid region
 * files, secrets and principals (fz_fixture), so a config naming them is loaded to the end.
 * Text after a "\n%%\n" line becomes regions/fz.conf: a gateway file naming region "fz" takes
 * the region parser through it.
 */
#include <stdio.h>
#include <string.h>

#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static FILE *devnull;
    dm_config_t *cfg = NULL;
    const uint8_t *sep = memmem(data, size, "\n%%\n", 4);
    size_t gw_len = sep ? (size_t)(sep - data) + 1 : size;

    fz_fixture();
    if (!devnull)
        devnull = fopen("/dev/null", "w");
    fz_write("fuzz.conf", data, gw_len, 0644);
    fz_write("regions/fz.conf", sep ? sep + 4 : data, sep ? size - gw_len - 3 : 0, 0644);
    dm_status_t *st = dm_config_load(fz_path("fuzz.conf"), &cfg);
    if (st) {
        fz_status(st, false);
        return 0;
    }
    dm_config_print(cfg, devnull);
    dm_config_free(cfg);
    return 0;
}
