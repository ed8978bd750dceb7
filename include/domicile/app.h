/*
 * The process-wide objects every handler reaches through dm_call_app(). Created by the daemon
 * (src/daemon/main.c) before the server starts; destroyed after it has stopped.
 */
#ifndef DOMICILE_APP_H
#define DOMICILE_APP_H

#include "domicile/auth.h"
#include "domicile/config.h"
#include "domicile/crypto.h"
#include "domicile/directory.h"
#include "domicile/dsr.h"
#include "domicile/keycache.h"
#include "domicile/ledger.h"
#include "domicile/region.h"
#include "domicile/server.h"

typedef struct dm_health dm_health_t;

typedef struct dm_app {
    dm_config_t *cfg;
    dm_regions_t *regions;
    dm_directory_t *directory;
    dm_keycache_t *keys;
    dm_kek_t *keks[DM_MAX_REGIONS]; /* by region index */
    unsigned char *pepper;          /* subject pepper (cleansed at exit) */
    size_t pepper_len;
    dm_principals_t *principals;
    dm_policy_t *policy;
    unsigned char ledger_keys[DM_MAX_REGIONS][32]; /* by region index (cleansed at exit) */
    dm_ledger_ctx_t ledger;                        /* the sealer's view of the above */
    dm_dsr_ctx_t dsr;                              /* the data-subject request worker */
    dm_webhooks_t *webhooks;                       /* NULL without webhook_url */
    int64_t fences_read_ms[DM_MAX_REGIONS];        /* maintenance: last read of each region */
    dm_health_t *health;
    dm_server_t *server;
} dm_app_t;

/** The server's authorizer (src/auth/authorize.c); `arg` is the dm_app_t. */
dm_status_t *dm_authorize(dm_call_t *call, void *arg);
/** The principal of an authorised call (never NULL for a non-public method). */
static inline const dm_principal_t *dm_call_principal_of(dm_call_t *call)
{
    return (const dm_principal_t *)dm_call_principal(call);
}

/** Load the secrets and build the directory and caches (before the server starts). */
dm_status_t *dm_app_init(dm_app_t *app) DM_WARN_UNUSED;
/** Free what dm_app_init() built (after the server and regions stopped). */
void dm_app_dispose(dm_app_t *app);
/** Index of region `r` in the configuration (for keks[]). */
size_t dm_app_region_index(dm_app_t *app, dm_region_t *r);

#endif
