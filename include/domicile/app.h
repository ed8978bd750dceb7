/*
 * The process-wide objects every handler reaches through dm_call_app(). Created by the daemon
 * (src/daemon/main.c) before the server starts; destroyed after it has stopped.
 */
#ifndef DOMICILE_APP_H
#define DOMICILE_APP_H

#include "domicile/auth.h"
#include "domicile/config.h"
#include "domicile/crypto.h"
#include "domicile/custody.h"
#include "domicile/directory.h"
#include "domicile/dsr.h"
#include "domicile/keycache.h"
#include "domicile/ledger.h"
#include "domicile/region.h"
#include "domicile/restore.h"
#include "domicile/server.h"

#include <stdatomic.h>
#include <stdio.h>

typedef struct dm_health dm_health_t;
typedef struct dm_peers dm_peers_t;

typedef struct dm_app {
    dm_config_t *cfg;
    dm_regions_t *regions;
    dm_directory_t *directory;
    dm_keycache_t *keys;
    dm_custody_t *custody[DM_MAX_REGIONS]; /* by region index: the own region's KEKs only */
    unsigned char *pepper;                 /* subject pepper (cleansed at exit) */
    size_t pepper_len;
    /* Replaced whole on SIGHUP; calls may still hold the old ones, which are kept (in
     * `retired`) until exit: a reload never frees what a call in flight points into. */
    _Atomic(dm_principals_t *) principals;
    _Atomic(dm_policy_t *) policy;
    void *retired[64];
    int n_retired;
    unsigned char ledger_keys[DM_MAX_REGIONS][32]; /* by region index (cleansed at exit) */
    dm_ledger_ctx_t ledger;                        /* the sealer's view of the above */
    dm_dsr_ctx_t dsr;                              /* the data-subject request worker */
    dm_webhooks_t *webhooks;                       /* NULL without webhook_url */
    int64_t fences_read_ms[DM_MAX_REGIONS];        /* maintenance: last read of each region */
    int64_t replication_read_ms[DM_MAX_REGIONS];   /* maintenance: pg_stat_replication */
    dm_restore_t *restore; /* the own region's restore watch (src/restore) */
    dm_health_t *health;
    dm_server_t *server;
    dm_peers_t *peers; /* gateways of the other regions (src/peer) */
} dm_app_t;

/** The server's authorizer (src/auth/authorize.c); `arg` is the dm_app_t. */
dm_status_t *dm_authorize(dm_call_t *call, void *arg);
/** The principal of an authorised call (never NULL for a non-public method). */
static inline const dm_principal_t *dm_call_principal_of(dm_call_t *call)
{
    return (const dm_principal_t *)dm_call_principal(call);
}

/**
 * Load, check and free every file the gateway reads beyond the gateway and region files
 * (dm_config_load() checks those and every secret's presence, mode and size): principals,
 * bases and routes, customer webhooks and their secrets. What `--check-config` runs, and what
 * domiciled runs before it starts anything. Errors are "file:line: key ...: what"; no secret
 * is printed. With `out`, one summary line per file is printed there.
 */
dm_status_t *dm_app_check(const dm_config_t *cfg, FILE *out) DM_WARN_UNUSED;
/** Load the secrets and build the directory and caches (before the server starts). */
dm_status_t *dm_app_init(dm_app_t *app) DM_WARN_UNUSED;
/** Start the key custody threads and tell health of their changes (after the regions
 * started). */
void dm_app_start(dm_app_t *app);
/** Stop the key custody threads (before the regions stop: they run statements). */
void dm_app_stop(dm_app_t *app);
/** Free what dm_app_init() built (after the server and regions stopped). */
void dm_app_dispose(dm_app_t *app);
static inline dm_principals_t *dm_app_principals(dm_app_t *app)
{
    return atomic_load(&app->principals);
}

static inline dm_policy_t *dm_app_policy(dm_app_t *app)
{
    return atomic_load(&app->policy);
}

/**
 * SIGHUP: read the config file again and apply what can change at run time (principals,
 * bases and routes, log level, retention windows, grace and intervals). Restart-only keys
 * that changed are named in the log. A failed reload keeps everything as it was and says why.
 * Returns the reason of a failure (caller frees) or NULL.
 */
dm_status_t *dm_app_reload(dm_app_t *app, const char *config_path) DM_WARN_UNUSED;

/** Index of region `r` in the configuration (for custody[]). */
size_t dm_app_region_index(dm_app_t *app, dm_region_t *r);

#endif
