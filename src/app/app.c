#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "domicile/api.h"
#include "domicile/app.h"
#include "domicile/log.h"
#include "domicile/metrics.h"
#include "domicile/peer.h"
#include <stddef.h>

#define FENCE_REFRESH_MS       1000
#define REPLICATION_REFRESH_MS 5000

/* A job's owner, in the gateway, is the gRPC call it serves (or NULL). */
static bool owner_cancelled(void *owner)
{
    return dm_call_cancelled(owner);
}

static int64_t owner_deadline_left_ms(void *owner)
{
    return dm_call_deadline_left_ms(owner);
}

static const dm_job_owner_ops_t call_owner_ops = {
    .cancelled = owner_cancelled,
    .deadline_left_ms = owner_deadline_left_ms,
};

/* The regions' maintenance: seal the ledger, run data-subject request legs, read fences and
 * (for the metrics) the replication state. */
static void app_idle(dm_region_t *r, dm_exec_t *x, void *arg)
{
    dm_app_t *app = arg;
    size_t i = dm_app_region_index(app, r);
    /* A restored region is held until reconciled; its sealer waits meanwhile (the restore
     * cut must be recorded before any new link: src/restore). */
    bool held = dm_restore_idle(app->restore, r, x);
    /* Data-subject legs first: a poke means a request is waiting; sealing can follow. */
    dm_dsr_idle(&app->dsr, r, i, x);
    if (!held)
        dm_ledger_idle(r, x, &app->ledger);
    if (dm_mono_ms() - app->fences_read_ms[i] >= FENCE_REFRESH_MS) {
        app->fences_read_ms[i] = dm_mono_ms();
        dm_regions_poll_peer_fences(app->regions);
        dm_regions_refresh_fences(app->regions, r, x);
    }
    if (dm_mono_ms() - app->replication_read_ms[i] >= REPLICATION_REFRESH_MS) {
        app->replication_read_ms[i] = dm_mono_ms();
        dm_status_t *err = NULL;
        PGresult *res = dm_region_exec(x, DM_SQL_REPLICATION_SUMMARY, 0, NULL, NULL, NULL, &err);
        if (res && PQntuples(res) == 1)
            dm_metrics_replication(i, dm_pg_int8(res, 0, 0), dm_pg_int8(res, 0, 1),
                                   dm_pg_int8(res, 0, 2));
        else
            dm_metrics_replication(i, -1, 0, 0);
        PQclear(res);
        dm_status_free(err);
    }
}

dm_status_t *dm_app_check(const dm_config_t *cfg, FILE *out)
{
    dm_principals_t *principals = NULL;
    dm_policy_t *policy = NULL;
    size_t n_hooks = 0;
    dm_status_t *st;
    if ((st = dm_principals_load(cfg->principals_file, cfg, &principals)))
        return st;
    if ((st = dm_policy_load(cfg->bases_file, cfg->routes_file, cfg, &policy))) {
        dm_principals_free(principals);
        return st;
    }
    if ((st = dm_webhooks_check(cfg, &n_hooks)) == NULL && out) {
        fprintf(out, "# %zu principals from %s\n", principals->n, cfg->principals_file);
        fprintf(out, "# %zu bases from %s\n", policy->n_bases, cfg->bases_file);
        fprintf(out, "# %zu routes, %zu forbidden purposes from %s\n", policy->n_routes,
                policy->n_forbidden, cfg->routes_file);
        if (cfg->customer_webhooks_file[0])
            fprintf(out, "# %zu customer webhooks from %s\n", n_hooks, cfg->customer_webhooks_file);
    }
    dm_principals_free(principals);
    dm_policy_free(policy);
    return st;
}

dm_status_t *dm_app_init(dm_app_t *app)
{
    dm_status_t *st;
    dm_regions_set_owner_ops(app->regions, &call_owner_ops);
    /* Only the own region's keys: another region's are held by its own gateways alone. */
    for (size_t i = 0; i < app->cfg->n_regions; i++) {
        if (!app->cfg->region_cfgs[i].local)
            continue;
        /* A token that cannot be opened does not stop the gateway: the region's key
         * operations fail UNAVAILABLE until the custody thread opens it. */
        st = dm_custody_create(app->cfg, &app->cfg->region_cfgs[i], dm_regions_at(app->regions, i),
                               &app->custody[i]);
        if (st)
            return st;
    }
    st = dm_config_read_secret(app->cfg->subject_pepper_file, 1024, &app->pepper, &app->pepper_len);
    if (st)
        return st;
    if (app->pepper_len < 16)
        return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                             "subject pepper \"%s\" must hold at least 16 bytes",
                             app->cfg->subject_pepper_file);
    dm_principals_t *principals = NULL;
    dm_policy_t *policy = NULL;
    if ((st = dm_principals_load(app->cfg->principals_file, app->cfg, &principals)))
        return st;
    atomic_store(&app->principals, principals);
    if ((st = dm_policy_load(app->cfg->bases_file, app->cfg->routes_file, app->cfg, &policy)))
        return st;
    atomic_store(&app->policy, policy);
    for (size_t i = 0; i < app->cfg->n_regions; i++) {
        if (!app->cfg->region_cfgs[i].local)
            continue;
        unsigned char *k = NULL;
        size_t len = 0;
        st = dm_config_read_secret(app->cfg->region_cfgs[i].ledger_key_file, 32, &k, &len);
        if (st)
            return st;
        if (len != 32) {
            OPENSSL_cleanse(k, len);
            free(k);
            return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                                 "ledger key \"%s\" must hold exactly 32 bytes",
                                 app->cfg->region_cfgs[i].ledger_key_file);
        }
        memcpy(app->ledger_keys[i], k, 32);
        OPENSSL_cleanse(k, len);
        free(k);
    }
    app->ledger.regions = app->regions;
    app->ledger.keys = (const unsigned char(*)[32])app->ledger_keys;
    app->ledger.retention_days = app->cfg->ledger_retention_days;
    dm_dsr_ctx_init(&app->dsr, app->regions);
    for (size_t i = 0; i < dm_regions_count(app->regions); i++) {
        dm_region_t *r = dm_regions_at(app->regions, i);
        if (dm_region_is_local(r) && !app->restore)
            app->restore = dm_restore_create(app->regions, r, app->ledger_keys[i], app->dsr.me);
    }
    if ((st = dm_webhooks_create(app->cfg, app->regions, &app->webhooks)))
        return st;
    app->dsr.webhooks = app->webhooks;
    dm_regions_set_idle_task(app->regions, app_idle, app, app->cfg->ledger_seal_interval_ms);
    app->directory = dm_directory_create(app->regions, (size_t)app->cfg->directory_cache_entries);
    app->keys = dm_keycache_create((size_t)app->cfg->key_cache_entries, app->cfg->key_cache_ttl_ms);
    return NULL;
}

void dm_app_start(dm_app_t *app)
{
    for (size_t i = 0; i < DM_MAX_REGIONS; i++) {
        if (!app->custody[i])
            continue;
        if (app->health)
            dm_custody_on_change(app->custody[i], dm_health_region_changed, app->health);
        dm_custody_start(app->custody[i]);
    }
}

void dm_app_stop(dm_app_t *app)
{
    for (size_t i = 0; i < DM_MAX_REGIONS; i++)
        if (app->custody[i])
            dm_custody_stop(app->custody[i]);
}

void dm_app_dispose(dm_app_t *app)
{
    for (size_t i = 0; i < DM_MAX_REGIONS; i++) {
        dm_custody_destroy(app->custody[i]);
        app->custody[i] = NULL;
    }
    if (app->pepper) {
        OPENSSL_cleanse(app->pepper, app->pepper_len);
        free(app->pepper);
        app->pepper = NULL;
    }
    dm_webhooks_destroy(app->webhooks);
    app->webhooks = NULL;
    dm_principals_free(atomic_exchange(&app->principals, NULL));
    dm_policy_free(atomic_exchange(&app->policy, NULL));
    for (int i = 0; i < app->n_retired; i += 2) {
        dm_principals_free(app->retired[i]);
        dm_policy_free(app->retired[i + 1]);
    }
    app->n_retired = 0;
    OPENSSL_cleanse(app->ledger_keys, sizeof(app->ledger_keys));
    dm_directory_destroy(app->directory);
    app->directory = NULL;
    dm_keycache_destroy(app->keys);
    app->keys = NULL;
    dm_restore_destroy(app->restore);
    app->restore = NULL;
}

size_t dm_app_region_index(dm_app_t *app, dm_region_t *r)
{
    for (size_t i = 0; i < dm_regions_count(app->regions); i++)
        if (dm_regions_at(app->regions, i) == r)
            return i;
    return 0;
}

/* Keys that need a restart: listen address, transport, threads, message limits, regions. */
static void name_restart_only(const dm_config_t *old, const dm_config_t *new)
{
    static const struct {
        const char *name;
        size_t off;
    } strs[] = {{"listen", offsetof(dm_config_t, listen)},
                {"transport", offsetof(dm_config_t, transport)},
                {"mtls", offsetof(dm_config_t, mtls)},
                {"gateway_region", offsetof(dm_config_t, gateway_region)},
                {"metrics_listen", offsetof(dm_config_t, metrics_listen)},
                {"probe_listen", offsetof(dm_config_t, probe_listen)},
                {"webhook_url", offsetof(dm_config_t, webhook_url)}};
    for (size_t i = 0; i < DM_ARRAY_LEN(strs); i++) {
        const char *a = *(char *const *)((const char *)old + strs[i].off);
        const char *b = *(char *const *)((const char *)new + strs[i].off);
        if (strcmp(a, b) != 0)
            dm_warn("config",
                    "reload: key \"%s\" changed but needs a restart; still using the "
                    "old value",
                    strs[i].name);
    }
    if (old->threads != new->threads ||
        old->max_receive_message_bytes != new->max_receive_message_bytes ||
        old->max_send_message_bytes != new->max_send_message_bytes ||
        old->max_metadata_bytes != new->max_metadata_bytes || old->n_regions != new->n_regions)
        dm_warn("config", "reload: threads, message limits or the region list changed; they "
                          "need a restart");
}

dm_status_t *dm_app_reload(dm_app_t *app, const char *config_path)
{
    dm_config_t *cfg = NULL;
    dm_principals_t *principals = NULL;
    dm_policy_t *policy = NULL;
    dm_status_t *st;
    if ((st = dm_config_load(config_path, &cfg)))
        return st;
    if ((st = dm_principals_load(cfg->principals_file, app->cfg, &principals)) ||
        (st = dm_policy_load(cfg->bases_file, cfg->routes_file, app->cfg, &policy))) {
        dm_principals_free(principals);
        dm_config_free(cfg);
        return st;
    }
    if (app->n_retired + 2 > (int)DM_ARRAY_LEN(app->retired)) {
        dm_principals_free(principals);
        dm_policy_free(policy);
        dm_config_free(cfg);
        return dm_status_new(GRPC_STATUS_RESOURCE_EXHAUSTED,
                             "too many reloads since start (32): restart the gateway");
    }
    name_restart_only(app->cfg, cfg);
    dm_log_level_t level = DM_LOG_INFO;
    dm_log_level_parse(cfg->log_level, &level);
    dm_log_set_level(level);
    /* Reloadable numbers are read where they are used; update them in place. */
    app->cfg->shutdown_grace_ms = cfg->shutdown_grace_ms;
    app->cfg->customer_retention_days = cfg->customer_retention_days;
    app->ledger.retention_days = cfg->ledger_retention_days;
    app->retired[app->n_retired++] = atomic_exchange(&app->principals, principals);
    app->retired[app->n_retired++] = atomic_exchange(&app->policy, policy);
    dm_info("config", "reloaded %s: %zu principals, %zu bases, %zu routes, log level %s",
            config_path, principals->n, policy->n_bases, policy->n_routes, cfg->log_level);
    dm_config_free(cfg);
    return NULL;
}

void dm_app_peers_cancel(dm_call_t *call, uint64_t id)
{
    dm_app_t *app = dm_call_app(call);
    if (app && app->peers)
        dm_peers_cancel(app->peers, id);
}
