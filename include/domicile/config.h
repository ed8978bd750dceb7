/*
 * Gateway configuration (one libconfig file) and region definitions (one file per region in
 * regions_dir). A key table drives parsing, validation, defaults and --check-config output.
 * Errors name the file, the line and the key. Unknown keys and out-of-range values are errors.
 *
 * Ownership: a dm_config_t and everything it points to is owned by the config; free it with
 * dm_config_free(). A loaded config is immutable, so it can be read from any thread.
 */
#ifndef DOMICILE_CONFIG_H
#define DOMICILE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "domicile/status.h"

#define DM_MAX_REGIONS         16
#define DM_MAX_REGION_HOSTS    8
#define DM_MAX_REGION_GATEWAYS 8
#define DM_REGION_CODE_MAX     16

/* kek_rotate_every_s + kek_retire_after_s at most: 28 days (docs/backups.md). */
#define DM_KEK_PERIOD_MAX_S (28 * 86400)

typedef struct dm_region_config {
    char *source; /* file it was read from */
    char *code;   /* [a-z][a-z0-9]{1,15}, equals the file's base name */
    char *name;
    char *jurisdiction;
    bool local;      /* the gateway's own region: the only one it holds secrets of */
    char **gateways; /* peer addresses of the region's gateways (host:port) */
    size_t n_gateways;
    char *gateway_identity; /* DNS name in their certificates, "<code>.gateway.domicile" */
    char **hosts; /* own region only */ /* "host:port" entries, in libpq failover order */
    size_t n_hosts;
    char *database;
    char *user;
    char *password_file; /* secret: mode 0600 checked, contents never printed */
    char *ssl_mode;      /* only "verify-full" is accepted */
    char *ssl_root_cert;
    char *kek_source;      /* "pkcs11" (default) | "file" (unsafe, logged at every start) */
    char *kek_file;        /* secret: mode 0600 checked; with pkcs11 only to migrate from it */
    char *pkcs11_module;   /* the token's PKCS#11 library (dlopen()ed) */
    char *pkcs11_token;    /* token label */
    int pkcs11_slot;       /* -1: any slot holding pkcs11_token */
    char *pkcs11_pin_file; /* secret: the user PIN */
    char **pkcs11_env;     /* NAME=value set before the module loads (e.g. SOFTHSM2_CONF) */
    size_t n_pkcs11_env;
    int pkcs11_sessions;        /* sessions in the pool */
    char *kek_label;            /* label prefix of the KEK versions ("" = domicile-kek-<code>) */
    char *kek_test_extractable; /* "off" | "on" | "accept": tests only (src/custody) */
    char *ledger_key_file;      /* secret: mode 0600 checked */
    int pool_size;
    int connect_timeout_ms;
} dm_region_config_t;

typedef struct dm_config {
    char *source;
    char *listen;    /* "host:port"; port 0 = ephemeral (tests) */
    char *transport; /* "plaintext" | "tls": required, never implied */
    char *tls_cert_file;
    char *tls_key_file; /* secret: mode 0600 checked */
    char *mtls;         /* "off" | "request" | "require" */
    char *tls_client_ca_file;
    char *principals_file;
    char *gateway_region;
    char *regions_dir;
    char **regions;
    size_t n_regions;
    char *subject_pepper_file;
    char *peer_listen; /* "" = none */
    char *peer_cert_file;
    char *peer_key_file; /* secret: mode 0600 checked */
    char *peer_ca_file;
    int peer_deadline_margin_ms;
    int peer_timeout_ms;
    int peer_health_interval_ms;
    int threads;
    int max_receive_message_bytes;
    int max_send_message_bytes;
    int max_metadata_bytes;
    int max_concurrent_streams;
    int shutdown_grace_ms;
    int health_interval_ms;
    char *log_level;
    char *bases_file;
    char *routes_file;
    int ledger_retention_days;
    int ledger_seal_interval_ms;
    char *webhook_url; /* "" = none */
    char *webhook_secret_file;
    char *customer_webhooks_file; /* "" = none; read by src/dsr/webhook.c */
    int webhook_timeout_ms;
    char *probe_listen;   /* "" = off: plaintext, grpc.health.v1.Health/Check only */
    char *metrics_listen; /* "" = off */
    int customer_retention_days;
    int directory_cache_entries;
    int key_cache_entries;
    int key_cache_ttl_ms;
    int kek_rewrap_batch;      /* data keys re-wrapped per batch during a rotation */
    int kek_rewrap_pause_ms;   /* pause between two batches */
    int kek_rotation_lease_ms; /* a silent rotation runner's claim expires after this */
    int kek_rotate_every_s;    /* crypto-period of a KEK version (0 = never rotated) */
    int kek_retire_after_s;    /* a superseded, unused version is destroyed after this */

    dm_region_config_t *region_cfgs; /* n_regions entries, in `regions` order */
} dm_config_t;

/**
 * Load and validate the gateway config at `path` and every region file it names.
 * On success *out is a new config owned by the caller. On failure *out is untouched and the
 * status (INVALID_ARGUMENT) says "file:line: key \"k\": what is wrong".
 */
dm_status_t *dm_config_load(const char *path, dm_config_t **out) DM_WARN_UNUSED;
/** Print the effective configuration (every key, defaults included, no secrets). */
void dm_config_print(const dm_config_t *cfg, FILE *f);
/**
 * A configuration error: INVALID_ARGUMENT "file:line: key \"k\": what" (line <= 0 or key
 * NULL leave those parts out). For every loader of config-like files.
 */
dm_status_t *dm_config_error(const char *file, int line, const char *key, const char *fmt, ...)
    DM_PRINTF(4, 5);

/*
 * Shape checks for loaders of libconfig files (gateway and region files, bases, routes,
 * principals, customer webhooks). Each returns NULL or an INVALID_ARGUMENT status
 * "file:line: key \"k\": what is wrong" with the line (and, for an @include'd file, the file)
 * of the offending setting. A setting of the wrong type is never taken for an absent one.
 */
struct config_t;
struct config_setting_t;

/**
 * config_init() `cf` and read `file` into it (@include relative to the file's directory).
 * I/O and syntax errors, and a file without any setting (an error at line 1 naming
 * `first_key`, the key the file must have), return a status; `cf` is then already destroyed.
 * On success the caller config_destroy()s `cf`.
 */
dm_status_t *dm_config_read_file(const char *file, struct config_t *cf,
                                 const char *first_key) DM_WARN_UNUSED;
/** dm_config_error() at the file and line of setting `s` (NULL: no line). */
dm_status_t *dm_config_setting_error(const char *file, const struct config_setting_t *s,
                                     const char *key, const char *fmt, ...) DM_PRINTF(4, 5);
/**
 * `s` must be a group { ... } (`what` names it in the error) whose members are all among the
 * `n` names of `known`.
 */
dm_status_t *dm_config_check_group(const char *file, struct config_setting_t *s, const char *what,
                                   const char *const *known, size_t n) DM_WARN_UNUSED;
/**
 * Member `key` of group `g` as a string (owned by the config): *out = NULL when absent and not
 * `required`; absent and required, or of another type, is an error.
 */
dm_status_t *dm_config_member_string(const char *file, struct config_setting_t *g, const char *key,
                                     bool required, const char **out) DM_WARN_UNUSED;
/**
 * Member `key` of `g` must be a list or array of `min`..`max` strings; *out is that setting
 * (NULL when absent and not `required`). Its elements are then safe to read with
 * config_setting_get_string_elem().
 */
dm_status_t *dm_config_member_strings(const char *file, struct config_setting_t *g, const char *key,
                                      bool required, size_t min, size_t max,
                                      struct config_setting_t **out) DM_WARN_UNUSED;
/**
 * Member `key` of `g` (required) must be a list ( { ... }, ... ) of `min`..`max` groups, each
 * with members among the `n` names of `known`; *out is the list.
 */
dm_status_t *dm_config_member_groups(const char *file, struct config_setting_t *g, const char *key,
                                     size_t min, size_t max, const char *const *known, size_t n,
                                     struct config_setting_t **out) DM_WARN_UNUSED;

/** Free a config; NULL is allowed. */
void dm_config_free(dm_config_t *cfg);
/** The region config with this code, or NULL. */
const dm_region_config_t *dm_config_region(const dm_config_t *cfg, const char *code);
/**
 * Read a secret file of at most `max` bytes that must be a regular file with no group/other
 * permission bits. *buf (caller frees, cleanse first) and *len receive its contents.
 */
dm_status_t *dm_config_read_secret(const char *path, size_t max, unsigned char **buf,
                                   size_t *len) DM_WARN_UNUSED;

#endif
