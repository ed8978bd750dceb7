#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <libconfig.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "domicile/config.h"
#include "domicile/log.h"

typedef enum {
    KT_STRING, /* free text, 1..max bytes */
    KT_PATH,   /* file path, relative to the config file's directory */
    KT_INT,    /* integer in [min, max] */
    KT_ENUM,   /* one of `choices`, separated by '|' */
    KT_LIST,   /* list of 1..max strings */
} key_type_t;

typedef struct {
    const char *name;
    key_type_t type;
    size_t off;       /* field in the target struct */
    size_t count_off; /* KT_LIST: its size_t count field */
    const char *def;  /* default as text; NULL = required */
    long long min, max;
    const char *choices;
    bool reloadable;
    const char *doc;
} key_desc_t;

#define F(type, field) offsetof(type, field)
#define NOCOUNT        0
#define STR_MAX        4096
#define GW(field)      F(dm_config_t, field)
#define RG(field)      F(dm_region_config_t, field)

/* The gateway file. Reloadable is informational until SIGHUP reload lands (issue 9). */
static const key_desc_t gateway_keys[] = {
    {"listen", KT_STRING, GW(listen), NOCOUNT, NULL, 1, 256, NULL, false,
     "address the gRPC server listens on, host:port (port 0 = any free port)"},
    {"transport", KT_ENUM, GW(transport), NOCOUNT, NULL, 0, 0, "plaintext|tls", false,
     "gRPC transport security; must be stated explicitly"},
    {"tls_cert_file", KT_PATH, GW(tls_cert_file), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "server certificate chain (PEM); required with transport = \"tls\""},
    {"tls_key_file", KT_PATH, GW(tls_key_file), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "secret (0600): the server's private key (PEM)"},
    {"mtls", KT_ENUM, GW(mtls), NOCOUNT, "off", 0, 0, "off|request|require", false,
     "client certificates: not asked, verified when sent, or required"},
    {"tls_client_ca_file", KT_PATH, GW(tls_client_ca_file), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "CA that signs client certificates; required when mtls is not off"},
    {"principals_file", KT_PATH, GW(principals_file), NOCOUNT, NULL, 1, STR_MAX, NULL, true,
     "who may call: names, roles, tenant scope, region, tokens (SHA-256) or cert subjects"},
    {"gateway_region", KT_STRING, GW(gateway_region), NOCOUNT, NULL, 1, DM_REGION_CODE_MAX, NULL,
     false, "region this gateway instance runs in (one of `regions`)"},
    {"regions_dir", KT_PATH, GW(regions_dir), NOCOUNT, NULL, 1, STR_MAX, NULL, false,
     "directory holding one <code>.conf per region"},
    {"regions", KT_LIST, GW(regions), GW(n_regions), NULL, 1, DM_MAX_REGIONS, NULL, false,
     "region codes to load from regions_dir"},
    {"subject_pepper_file", KT_PATH, GW(subject_pepper_file), NOCOUNT, NULL, 1, STR_MAX, NULL,
     false, "secret (0600) keying the HMAC of data subjects"},
    {"peer_listen", KT_STRING, GW(peer_listen), NOCOUNT, "", 0, 256, NULL, false,
     "host:port of the mutual-TLS listener for gateways of other regions (\"\" = none)"},
    {"peer_cert_file", KT_PATH, GW(peer_cert_file), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "this gateway's certificate (PEM) naming \"<region>.gateway.domicile\""},
    {"peer_key_file", KT_PATH, GW(peer_key_file), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "secret (0600): the private key of peer_cert_file"},
    {"peer_ca_file", KT_PATH, GW(peer_ca_file), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "CA (PEM) that signs every gateway's certificate (the federation)"},
    {"peer_deadline_margin_ms", KT_INT, GW(peer_deadline_margin_ms), NOCOUNT, "50", 0, 10000, NULL,
     false, "taken off a forwarded call's remaining deadline"},
    {"peer_timeout_ms", KT_INT, GW(peer_timeout_ms), NOCOUNT, "30000", 100, 600000, NULL, false,
     "deadline of a forwarded call whose client set none"},
    {"peer_health_interval_ms", KT_INT, GW(peer_health_interval_ms), NOCOUNT, "1000", 50, 60000,
     NULL, false, "how often each peer gateway is health-checked"},
    {"threads", KT_INT, GW(threads), NOCOUNT, "2", 1, 64, NULL, false,
     "completion-queue threads serving gRPC"},
    {"max_receive_message_bytes", KT_INT, GW(max_receive_message_bytes), NOCOUNT, "4194304", 1024,
     64 << 20, NULL, false, "largest request message accepted (RESOURCE_EXHAUSTED above)"},
    {"max_send_message_bytes", KT_INT, GW(max_send_message_bytes), NOCOUNT, "4194304", 1024,
     64 << 20, NULL, false, "largest response message sent"},
    {"max_metadata_bytes", KT_INT, GW(max_metadata_bytes), NOCOUNT, "16384", 1024, 1 << 20, NULL,
     false, "largest request metadata (headers) accepted"},
    {"max_concurrent_streams", KT_INT, GW(max_concurrent_streams), NOCOUNT, "1000", 1, 100000, NULL,
     false, "HTTP/2 concurrent streams per connection"},
    {"shutdown_grace_ms", KT_INT, GW(shutdown_grace_ms), NOCOUNT, "5000", 0, 600000, NULL, true,
     "time in-flight calls get to finish on SIGTERM before they are cancelled"},
    {"health_interval_ms", KT_INT, GW(health_interval_ms), NOCOUNT, "1000", 50, 60000, NULL, true,
     "how often each region is probed for health"},
    {"log_level", KT_ENUM, GW(log_level), NOCOUNT, "info", 0, 0, "debug|info|warn|error", true,
     "minimum level logged"},
    {"bases_file", KT_PATH, GW(bases_file), NOCOUNT, NULL, 1, STR_MAX, NULL, true,
     "catalogue of legal bases for transfers (regions/bases.conf)"},
    {"routes_file", KT_PATH, GW(routes_file), NOCOUNT, NULL, 1, STR_MAX, NULL, true,
     "transfer routes and forbidden purposes (regions/routes.conf)"},
    {"ledger_retention_days", KT_INT, GW(ledger_retention_days), NOCOUNT, "730", 0, 36500, NULL,
     true,
     "ledger entries older than this are purged behind a signed checkpoint (0 = keep; else "
     "at least 365)"},
    {"ledger_seal_interval_ms", KT_INT, GW(ledger_seal_interval_ms), NOCOUNT, "200", 10, 60000,
     NULL, true, "how often committed ledger entries are chained"},
    {"webhook_url", KT_STRING, GW(webhook_url), NOCOUNT, "", 0, 2048, NULL, false,
     "http(s) URL receiving a signed POST when a data-subject request is done (\"\" = none)"},
    {"webhook_secret_file", KT_PATH, GW(webhook_secret_file), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "secret (0600) keying the webhook's HMAC-SHA256 signature"},
    {"webhook_timeout_ms", KT_INT, GW(webhook_timeout_ms), NOCOUNT, "5000", 100, 60000, NULL, false,
     "time one webhook delivery may take"},
    {"customer_webhooks_file", KT_PATH, GW(customer_webhooks_file), NOCOUNT, "", 0, STR_MAX, NULL,
     false,
     "per-customer webhook URLs and secrets (libconfig: webhooks = ({customer; url; "
     "secret_file},...))"},
    {"probe_listen", KT_STRING, GW(probe_listen), NOCOUNT, "", 0, 256, NULL, false,
     "host:port of a plaintext listener serving grpc.health.v1.Health/Check only, for "
     "Kubernetes' grpc probes (\"\" = off; port 0 = any)"},
    {"metrics_listen", KT_STRING, GW(metrics_listen), NOCOUNT, "", 0, 64, NULL, false,
     "host:port serving Prometheus /metrics over HTTP (\"\" = off; port 0 = any)"},
    {"customer_retention_days", KT_INT, GW(customer_retention_days), NOCOUNT, "30", 0, 3650, NULL,
     true, "days a closed customer's data is kept before it is purged"},
    {"directory_cache_entries", KT_INT, GW(directory_cache_entries), NOCOUNT, "4000000", 1000,
     100000000, NULL, false, "customers whose region is kept in memory"},
    {"key_cache_entries", KT_INT, GW(key_cache_entries), NOCOUNT, "100000", 0, 10000000, NULL,
     false, "unwrapped data keys kept in memory (0 = none)"},
    {"key_cache_ttl_ms", KT_INT, GW(key_cache_ttl_ms), NOCOUNT, "300000", 0, 86400000, NULL, false,
     "how long an unwrapped data key stays in memory"},
    {"kek_rewrap_batch", KT_INT, GW(kek_rewrap_batch), NOCOUNT, "200", 1, 10000, NULL, false,
     "data keys re-wrapped per batch while a KEK rotation runs"},
    {"kek_rotation_lease_ms", KT_INT, GW(kek_rotation_lease_ms), NOCOUNT, "15000", 500, 600000,
     NULL, false,
     "a rotation's re-wrap is taken over from a gateway silent for this long (killed, hung)"},
    {"kek_rewrap_pause_ms", KT_INT, GW(kek_rewrap_pause_ms), NOCOUNT, "0", 0, 60000, NULL, false,
     "pause between two re-wrap batches (limits the rotation's share of the token)"},
    {"kek_rotate_every_s", KT_INT, GW(kek_rotate_every_s), NOCOUNT, "604800", 0, 2419200, NULL,
     false,
     "the KEK's crypto-period: a version current this long is rotated (0 = never: erased "
     "subjects stay readable in old data backups, docs/backups.md)"},
    {"kek_retire_after_s", KT_INT, GW(kek_retire_after_s), NOCOUNT, "86400", 0, 2419200, NULL,
     false,
     "a superseded KEK version no data key uses any more is retired (destroyed) this long "
     "after it stopped being current"},
};

static const key_desc_t region_keys[] = {
    {"code", KT_STRING, RG(code), NOCOUNT, NULL, 2, DM_REGION_CODE_MAX, NULL, false,
     "region code, equals the file name"},
    {"name", KT_STRING, RG(name), NOCOUNT, NULL, 1, 128, NULL, false, "display name"},
    {"jurisdiction", KT_STRING, RG(jurisdiction), NOCOUNT, NULL, 1, 128, NULL, false,
     "legal jurisdiction"},
    {"gateways", KT_LIST, RG(gateways), RG(n_gateways), "", 1, DM_MAX_REGION_GATEWAYS, NULL, false,
     "peer addresses (host:port) of the region's gateways; required for another region"},
    {"gateway_identity", KT_STRING, RG(gateway_identity), NOCOUNT, "", 0, 253, NULL, false,
     "name the region's gateway certificates carry (default \"<code>.gateway.domicile\")"},
    {"hosts", KT_LIST, RG(hosts), RG(n_hosts), "", 1, DM_MAX_REGION_HOSTS, NULL, false,
     "own region only: PostgreSQL host:port list, primary first (libpq multi-host)"},
    {"database", KT_STRING, RG(database), NOCOUNT, "domicile", 1, 63, NULL, false, "database name"},
    {"user", KT_STRING, RG(user), NOCOUNT, "domicile_gateway", 1, 63, NULL, false,
     "database role of the gateway"},
    {"password_file", KT_PATH, RG(password_file), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "secret (0600): the role's password"},
    {"ssl_mode", KT_ENUM, RG(ssl_mode), NOCOUNT, "verify-full", 0, 0, "verify-full", false,
     "libpq sslmode; only verify-full is accepted"},
    {"ssl_root_cert", KT_PATH, RG(ssl_root_cert), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "CA certificate that signs the region's server certificates"},
    {"kek_source", KT_ENUM, RG(kek_source), NOCOUNT, "pkcs11", 0, 0, "pkcs11|file", false,
     "where the key-encryption keys live: a PKCS#11 token, or (unsafe, logged at every start) "
     "kek_file"},
    {"kek_file", KT_PATH, RG(kek_file), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "secret (0600): a 32-byte key-encryption key; with kek_source = \"pkcs11\" only to open "
     "data keys still wrapped by it (migration: rotate, then retire version 1)"},
    {"pkcs11_module", KT_PATH, RG(pkcs11_module), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "PKCS#11 library of the region's token (SoftHSM2, an HSM's or a cloud HSM's client)"},
    {"pkcs11_token", KT_STRING, RG(pkcs11_token), NOCOUNT, "", 0, 32, NULL, false,
     "label of the region's token"},
    {"pkcs11_slot", KT_INT, RG(pkcs11_slot), NOCOUNT, "-1", -1, 2147483647LL, NULL, false,
     "slot id of the token (-1 = any slot whose token has pkcs11_token's label)"},
    {"pkcs11_pin_file", KT_PATH, RG(pkcs11_pin_file), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "secret (0600): the token's user PIN"},
    {"pkcs11_env", KT_LIST, RG(pkcs11_env), RG(n_pkcs11_env), "", 1, 8, NULL, false,
     "NAME=value set in the environment before the module loads (e.g. SOFTHSM2_CONF=...)"},
    {"pkcs11_sessions", KT_INT, RG(pkcs11_sessions), NOCOUNT, "4", 1, 64, NULL, false,
     "token sessions kept open (each used by one thread at a time)"},
    {"kek_label", KT_STRING, RG(kek_label), NOCOUNT, "", 0, 64, NULL, false,
     "label prefix of the KEK versions in the token, <prefix>.v<N> (\"\" = domicile-kek-<code>)"},
    {"kek_test_extractable", KT_ENUM, RG(kek_test_extractable), NOCOUNT, "off", 0, 0,
     "off|on|accept", false,
     "TESTS ONLY: on = new KEK versions are made extractable; accept = extractable versions are "
     "used (both logged as unsafe); off = an extractable KEK fails the region closed"},
    {"ledger_key_file", KT_PATH, RG(ledger_key_file), NOCOUNT, "", 0, STR_MAX, NULL, false,
     "secret (0600): the 32-byte HMAC key of the region's transfer ledger (not in the database)"},
    {"pool_size", KT_INT, RG(pool_size), NOCOUNT, "3", 1, 16, NULL, false,
     "database connections per region"},
    {"connect_timeout_ms", KT_INT, RG(connect_timeout_ms), NOCOUNT, "2000", 100, 60000, NULL, false,
     "libpq connect timeout (rounded up to whole seconds)"},
};

#define cf_error dm_config_error

dm_status_t *dm_config_error(const char *file, int line, const char *key, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    if (line > 0 && key)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "%s:%d: key \"%s\": %s", file, line, key,
                             what);
    if (key)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "%s: key \"%s\": %s", file, key, what);
    if (line > 0)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "%s:%d: %s", file, line, what);
    return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "%s: %s", file, what);
}

static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return dm_strdup(".");
    if (slash == path)
        return dm_strdup("/");
    return dm_strndup(path, (size_t)(slash - path));
}

static char *resolve_path(const char *base_dir, const char *p)
{
    if (p[0] == '/')
        return dm_strdup(p);
    return dm_sprintf("%s/%s", base_dir, p);
}

static bool choice_ok(const char *choices, const char *v)
{
    size_t n = strlen(v);
    for (const char *c = choices; *c;) {
        const char *bar = strchr(c, '|');
        size_t len = bar ? (size_t)(bar - c) : strlen(c);
        if (len == n && strncmp(c, v, n) == 0)
            return true;
        if (!bar)
            break;
        c = bar + 1;
    }
    return false;
}

static bool text_ok(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p < 0x20 || *p == 0x7f)
            return false;
    return true;
}

static dm_status_t *store_string(const key_desc_t *k, void *target, const char *file, int line,
                                 const char *base_dir, const char *v)
{
    char **field = (char **)((char *)target + k->off);
    size_t n = strlen(v);
    if (k->type == KT_ENUM) {
        if (!choice_ok(k->choices, v))
            return cf_error(file, line, k->name, "must be one of %s (got \"%s\")", k->choices, v);
    } else if ((long long)n < k->min || (long long)n > k->max) {
        return cf_error(file, line, k->name, "length must be between %lld and %lld (got %zu)",
                        k->min, k->max, n);
    } else if (!text_ok(v)) {
        return cf_error(file, line, k->name, "must not contain control characters");
    }
    free(*field);
    *field = k->type == KT_PATH && *v ? resolve_path(base_dir, v) : dm_strdup(v);
    return NULL;
}

static dm_status_t *store_int(const key_desc_t *k, void *target, const char *file, int line,
                              long long v)
{
    if (v < k->min || v > k->max)
        return cf_error(file, line, k->name, "must be between %lld and %lld (got %lld)", k->min,
                        k->max, v);
    *(int *)((char *)target + k->off) = (int)v;
    return NULL;
}

static dm_status_t *store_setting(const key_desc_t *k, void *target, const char *file,
                                  const char *base_dir, config_setting_t *s)
{
    int line = (int)config_setting_source_line(s);
    int t = config_setting_type(s);

    switch (k->type) {
    case KT_STRING:
    case KT_PATH:
    case KT_ENUM:
        if (t != CONFIG_TYPE_STRING)
            return cf_error(file, line, k->name, "must be a string in double quotes");
        return store_string(k, target, file, line, base_dir, config_setting_get_string(s));
    case KT_INT:
        if (t != CONFIG_TYPE_INT && t != CONFIG_TYPE_INT64)
            return cf_error(file, line, k->name, "must be an integer");
        return store_int(k, target, file, line, config_setting_get_int64(s));
    case KT_LIST: {
        if (t != CONFIG_TYPE_LIST && t != CONFIG_TYPE_ARRAY)
            return cf_error(file, line, k->name, "must be a list of strings: [ \"a\", \"b\" ]");
        int n = config_setting_length(s);
        if (n < k->min || n > k->max)
            return cf_error(file, line, k->name, "must have between %lld and %lld entries (got %d)",
                            k->min, k->max, n);
        char ***field = (char ***)((char *)target + k->off);
        size_t *count = (size_t *)((char *)target + k->count_off);
        char **items = dm_calloc((size_t)n, sizeof(char *));
        for (int i = 0; i < n; i++) {
            config_setting_t *e = config_setting_get_elem(s, (unsigned)i);
            const char *v = e ? config_setting_get_string(e) : NULL;
            if (!v || !*v || strlen(v) > 256 || !text_ok(v)) {
                for (int j = 0; j < i; j++)
                    free(items[j]);
                free(items);
                return cf_error(file, e ? (int)config_setting_source_line(e) : line, k->name,
                                "entry %d must be a non-empty string of at most 256 bytes", i + 1);
            }
            items[i] = dm_strdup(v);
        }
        for (size_t j = 0; j < *count; j++)
            free((*field)[j]);
        free(*field);
        *field = items;
        *count = (size_t)n;
        return NULL;
    }
    }
    return cf_error(file, line, k->name, "unsupported key type");
}

/*
 * Parse one libconfig file against a key table into `target`; lines[j] receives the line of
 * keys[j] (0: absent, the default applies; -1: present, line unknown), for the cross-checks'
 * messages.
 */
static dm_status_t *parse_file(const char *file, const key_desc_t *keys, size_t n_keys,
                               void *target, int *lines)
{
    config_t cf;
    char *base_dir = dir_of(file);
    dm_status_t *st = dm_config_read_file(file, &cf, keys[0].name);
    if (st) {
        free(base_dir);
        return st;
    }
    memset(lines, 0, n_keys * sizeof(int));
    config_setting_t *root = config_root_setting(&cf);
    int n = config_setting_length(root);
    for (int i = 0; i < n && !st; i++) {
        config_setting_t *s = config_setting_get_elem(root, (unsigned)i);
        const char *name = config_setting_name(s);
        size_t j = 0;
        while (name && j < n_keys && strcmp(keys[j].name, name) != 0)
            j++;
        if (!name || j == n_keys) {
            st = dm_config_setting_error(file, s, name, "unknown key");
            break;
        }
        /* libconfig keeps lines in 16 bits: line 65536 reads as 0, which must not mean "absent". */
        lines[j] = config_setting_source_line(s) ? (int)config_setting_source_line(s) : -1;
        /* A setting from an @include'd file is reported in that file. */
        const char *src = config_setting_source_file(s);
        char *inc = src && src[0] != '/' && strcmp(src, file) != 0
                        ? dm_sprintf("%s/%s", base_dir, src)
                        : NULL;
        st = store_setting(&keys[j], target, inc ? inc : src ? src : file, base_dir, s);
        free(inc);
    }
    for (size_t j = 0; j < n_keys && !st; j++) {
        if (lines[j])
            continue;
        const key_desc_t *k = &keys[j];
        if (!k->def) {
            st = cf_error(file, 0, k->name, "missing (required)");
        } else if (k->type == KT_LIST) {
            /* an optional list defaults to empty */
        } else if (k->type == KT_INT) {
            st = store_int(k, target, file, 0, strtoll(k->def, NULL, 10));
        } else {
            st = store_string(k, target, file, 0, base_dir, k->def);
        }
    }
    config_destroy(&cf);
    free(base_dir);
    return st;
}

/* The line of key `name` in a file parsed with `keys` (0 when absent: defaulted). */
static int line_of(const key_desc_t *keys, size_t n_keys, const int *lines, const char *name)
{
    for (size_t j = 0; j < n_keys; j++)
        if (strcmp(keys[j].name, name) == 0)
            return lines[j];
    return 0;
}

dm_status_t *dm_config_read_secret(const char *path, size_t max, unsigned char **buf, size_t *len)
{
    struct stat sb;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION, "cannot open secret file \"%s\": %s",
                             path, strerror(errno));
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                             "secret file \"%s\" is not a regular file", path);
    }
    if (sb.st_mode & (S_IRWXG | S_IRWXO)) {
        close(fd);
        return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                             "secret file \"%s\" must not be accessible by group or others "
                             "(mode %03o, want 0600)",
                             path, (unsigned)(sb.st_mode & 0777));
    }
    if ((size_t)sb.st_size > max || sb.st_size == 0) {
        close(fd);
        return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION,
                             "secret file \"%s\" must hold 1 to %zu bytes (has %lld)", path, max,
                             (long long)sb.st_size);
    }
    unsigned char *b = dm_malloc((size_t)sb.st_size + 1);
    size_t got = 0;
    while (got < (size_t)sb.st_size) {
        ssize_t r = read(fd, b + got, (size_t)sb.st_size - got);
        if (r <= 0) {
            OPENSSL_cleanse(b, (size_t)sb.st_size);
            free(b);
            close(fd);
            return dm_status_new(GRPC_STATUS_FAILED_PRECONDITION, "cannot read secret file \"%s\"",
                                 path);
        }
        got += (size_t)r;
    }
    close(fd);
    b[got] = '\0';
    *buf = b;
    *len = got;
    return NULL;
}

/* The secret must exist, be 0600 (no group/other bits) and hold min..max bytes; its contents
 * are read, then cleansed, never printed. */
static dm_status_t *check_secret(const char *file, int line, const char *key, const char *path,
                                 size_t min, size_t max)
{
    unsigned char *buf = NULL;
    size_t len = 0;
    /* Read a little more than allowed, so that "exactly 32 bytes" can say what it found. */
    dm_status_t *st = dm_config_read_secret(path, max < 4096 ? 4096 : max, &buf, &len);
    if (st) {
        dm_status_t *e = cf_error(file, line, key, "%s", st->message);
        dm_status_free(st);
        return e;
    }
    OPENSSL_cleanse(buf, len);
    free(buf);
    if (len < min || len > max) {
        if (min == max)
            return cf_error(file, line, key,
                            "secret file \"%s\" must hold exactly %zu bytes (has %zu)", path, min,
                            len);
        return cf_error(file, line, key, "secret file \"%s\" must hold %zu to %zu bytes (has %zu)",
                        path, min, max, len);
    }
    return NULL;
}

static bool code_ok(const char *c)
{
    if (!(c[0] >= 'a' && c[0] <= 'z'))
        return false;
    for (const char *p = c; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9')))
            return false;
    return true;
}

static dm_status_t *check_host_port(const char *file, int line, const char *key, const char *hp,
                                    bool allow_zero)
{
    const char *colon = strrchr(hp, ':');
    char *end = NULL;
    if (!colon || colon == hp)
        return cf_error(file, line, key, "\"%s\" must be host:port", hp);
    errno = 0;
    long port = strtol(colon + 1, &end, 10);
    if (errno || *end || end == colon + 1 || port < (allow_zero ? 0 : 1) || port > 65535)
        return cf_error(file, line, key, "\"%s\": port must be %d..65535", hp, allow_zero ? 0 : 1);
    return NULL;
}

static long port_of(const char *hp)
{
    const char *colon = strrchr(hp, ':');
    return colon ? strtol(colon + 1, NULL, 10) : 0;
}

/* The probe listener must be a port of its own: it serves one method, without TLS and without
 * authentication, and sharing a port with another listener would fail at bind time anyway. */
static dm_status_t *check_probe_listen(const char *path, int line, const dm_config_t *cfg)
{
    dm_status_t *st = check_host_port(path, line, "probe_listen", cfg->probe_listen, true);
    if (st)
        return st;
    long port = port_of(cfg->probe_listen);
    const struct {
        const char *key, *value;
    } others[] = {{"listen", cfg->listen},
                  {"peer_listen", cfg->peer_listen},
                  {"metrics_listen", cfg->metrics_listen}};
    for (size_t i = 0; port != 0 && i < DM_ARRAY_LEN(others); i++)
        if (others[i].value[0] && port_of(others[i].value) == port)
            return cf_error(path, line, "probe_listen",
                            "\"%s\": port %ld is also %s's (\"%s\"); the probe listener needs a "
                            "port of its own",
                            cfg->probe_listen, port, others[i].key, others[i].value);
    return NULL;
}

#define KEY_LEN 32 /* kek_file and ledger_key_file: AES-256 and HMAC-SHA256 keys, raw bytes */

static int key_index(const key_desc_t *keys, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(keys[i].name, name) == 0)
            return (int)i;
    return -1;
}

/*
 * Sovereign regions (DESIGN.md promise 10): a gateway loads the database and the secrets of its
 * own region only. Another region's file may say where that region's gateways are and how to
 * recognise them, nothing else; a secret or a database address in it is refused, naming the
 * line, so that a misplaced file is found before it is used.
 */
static dm_status_t *check_foreign_region(const char *file, const char *code, const char *mine,
                                         const int *lines)
{
    static const char *const secrets[] = {
        "password_file", "kek_file",        "ledger_key_file", "pkcs11_module",
        "pkcs11_token",  "pkcs11_pin_file", "pkcs11_env",      "pkcs11_slot",
        "kek_label",     "kek_source",      "pkcs11_sessions", "kek_test_extractable"};
    static const char *const database[] = {
        "hosts",     "database",          "user", "ssl_mode", "ssl_root_cert",
        "pool_size", "connect_timeout_ms"};
    for (size_t i = 0; i < DM_ARRAY_LEN(secrets); i++) {
        int k = key_index(region_keys, DM_ARRAY_LEN(region_keys), secrets[i]);
        if (lines[k] != 0)
            return cf_error(file, lines[k] > 0 ? lines[k] : 0, secrets[i],
                            "a secret of region \"%s\": only that region's own gateways may hold "
                            "it (this gateway serves \"%s\")",
                            code, mine);
    }
    for (size_t i = 0; i < DM_ARRAY_LEN(database); i++) {
        int k = key_index(region_keys, DM_ARRAY_LEN(region_keys), database[i]);
        if (lines[k] != 0)
            return cf_error(file, lines[k] > 0 ? lines[k] : 0, database[i],
                            "the database of region \"%s\" is reached only through its own "
                            "gateways (this gateway serves \"%s\"): list them in `gateways`",
                            code, mine);
    }
    return NULL;
}

static dm_status_t *check_kek(const char *file, const int *lines, dm_region_config_t *r);

static dm_status_t *load_region(const dm_config_t *cfg, const char *code, dm_region_config_t *r)
{
    dm_status_t *st;
    int lines[DM_ARRAY_LEN(region_keys)];
    char *file = dm_sprintf("%s/%s.conf", cfg->regions_dir, code);
    r->source = file;
    st = parse_file(file, region_keys, DM_ARRAY_LEN(region_keys), r, lines);
    if (st)
        return st;
#define RL(key) line_of(region_keys, DM_ARRAY_LEN(region_keys), lines, key)
    if (strcmp(r->code, code) != 0)
        return cf_error(file, RL("code"), "code",
                        "must equal the file's region \"%s\" (got \"%s\")", code, r->code);
    if (!r->gateway_identity[0]) {
        free(r->gateway_identity);
        r->gateway_identity = dm_sprintf("%s.gateway.domicile", code);
    }
    for (size_t i = 0; i < r->n_gateways; i++)
        if ((st = check_host_port(file, RL("gateways"), "gateways", r->gateways[i], false)))
            return st;
    r->local = strcmp(code, cfg->gateway_region) == 0;
    if (!r->local) {
        if ((st = check_foreign_region(file, code, cfg->gateway_region, lines)))
            return st;
        if (r->n_gateways == 0)
            return cf_error(file, 0, "gateways",
                            "missing: region \"%s\" is served by its own gateways; list their "
                            "peer addresses",
                            code);
        return NULL;
    }
    static const char *const required[] = {"password_file", "ssl_root_cert", "ledger_key_file"};
    if (r->n_hosts == 0)
        return cf_error(file, 0, "hosts", "missing (required for the gateway's own region)");
    for (size_t i = 0; i < DM_ARRAY_LEN(required); i++)
        if (lines[key_index(region_keys, DM_ARRAY_LEN(region_keys), required[i])] == 0)
            return cf_error(file, 0, required[i],
                            "missing (required for the gateway's own region)");
    for (size_t i = 0; i < r->n_hosts; i++)
        if ((st = check_host_port(file, RL("hosts"), "hosts", r->hosts[i], false)))
            return st;
    if ((st = check_secret(file, RL("password_file"), "password_file", r->password_file, 1, 1024)))
        return st;
    if ((st = check_kek(file, lines, r)))
        return st;
    if ((st = check_secret(file, RL("ledger_key_file"), "ledger_key_file", r->ledger_key_file,
                           KEY_LEN, KEY_LEN)))
        return st;
    if (access(r->ssl_root_cert, R_OK) != 0)
        return cf_error(file, RL("ssl_root_cert"), "ssl_root_cert", "cannot read \"%s\": %s",
                        r->ssl_root_cert, strerror(errno));
#undef RL
    return NULL;
}

/*
 * The own region's key custody: a token (module, token label, PIN file; the token itself is
 * opened by the gateway at run time, and a token that cannot be opened makes only this region
 * unavailable), or, explicitly, a key file.
 */
static dm_status_t *check_kek(const char *file, const int *lines, dm_region_config_t *r)
{
    dm_status_t *st;
#define RL(key) line_of(region_keys, DM_ARRAY_LEN(region_keys), lines, key)
    if (strcmp(r->kek_source, "file") == 0) {
        if (!r->kek_file[0])
            return cf_error(file, RL("kek_source"), "kek_file",
                            "missing (required with kek_source = \"file\")");
        return check_secret(file, RL("kek_file"), "kek_file", r->kek_file, KEY_LEN, KEY_LEN);
    }
    static const char *const token_keys[] = {"pkcs11_module", "pkcs11_token", "pkcs11_pin_file"};
    for (size_t i = 0; i < DM_ARRAY_LEN(token_keys); i++)
        if (lines[key_index(region_keys, DM_ARRAY_LEN(region_keys), token_keys[i])] == 0)
            return cf_error(file, 0, token_keys[i],
                            "missing (required with kek_source = \"pkcs11\", the default; "
                            "kek_source = \"file\" keeps the key in a file, unsafely)");
    if (!r->pkcs11_token[0])
        return cf_error(file, RL("pkcs11_token"), "pkcs11_token", "must not be empty");
    for (size_t i = 0; i < r->n_pkcs11_env; i++) {
        const char *eq = strchr(r->pkcs11_env[i], '=');
        if (!eq || eq == r->pkcs11_env[i])
            return cf_error(file, RL("pkcs11_env"), "pkcs11_env",
                            "entry %zu must be NAME=value (got \"%s\")", i + 1, r->pkcs11_env[i]);
    }
    if (r->kek_file[0] &&
        (st = check_secret(file, RL("kek_file"), "kek_file", r->kek_file, KEY_LEN, KEY_LEN)))
        return st;
    if (!r->kek_label[0]) {
        free(r->kek_label);
        r->kek_label = dm_sprintf("domicile-kek-%s", r->code);
    }
    for (const char *p = r->kek_label; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '-' || *p == '_' || *p == '.'))
            return cf_error(file, RL("kek_label"), "kek_label", "must be of [A-Za-z0-9._-]");
#undef RL
    return NULL;
}

/* Gateways of other regions are called, and call us, over mutual TLS only. */
static dm_status_t *check_peers(const char *path, const dm_config_t *cfg, const int *lines)
{
#define PL(key) line_of(gateway_keys, DM_ARRAY_LEN(gateway_keys), lines, key)
    if (cfg->n_regions < 2)
        return NULL;
    if (!cfg->peer_listen[0])
        return cf_error(path, PL("peer_listen"), "peer_listen",
                        "required: gateways of the other regions forward their calls here");
    if (!cfg->peer_cert_file[0] || access(cfg->peer_cert_file, R_OK) != 0)
        return cf_error(path, PL("peer_cert_file"), "peer_cert_file",
                        "required and readable (\"%s\")", cfg->peer_cert_file);
    if (!cfg->peer_ca_file[0] || access(cfg->peer_ca_file, R_OK) != 0)
        return cf_error(path, PL("peer_ca_file"), "peer_ca_file", "required and readable (\"%s\")",
                        cfg->peer_ca_file);
    if (!cfg->peer_key_file[0])
        return cf_error(path, PL("peer_key_file"), "peer_key_file", "required");
    return check_secret(path, PL("peer_key_file"), "peer_key_file", cfg->peer_key_file, 1, 1 << 16);
#undef PL
}

dm_status_t *dm_config_load(const char *path, dm_config_t **out)
{
    dm_status_t *st;
    dm_config_t *cfg = dm_calloc(1, sizeof(*cfg));
    cfg->source = dm_strdup(path);

    int lines[DM_ARRAY_LEN(gateway_keys)];
    st = parse_file(path, gateway_keys, DM_ARRAY_LEN(gateway_keys), cfg, lines);
    if (st)
        goto fail;
#define GL(key) line_of(gateway_keys, DM_ARRAY_LEN(gateway_keys), lines, key)
    if ((st = check_host_port(path, GL("listen"), "listen", cfg->listen, true)))
        goto fail;
    if (cfg->ledger_retention_days > 0 && cfg->ledger_retention_days < 365) {
        /* ledger_purge() refuses cut-offs younger than 365 days (so that the gateway's role
         * cannot erase recent entries); a shorter window would only fail every purge. */
        st = cf_error(path, GL("ledger_retention_days"), "ledger_retention_days",
                      "must be 0 (keep forever) or at least 365 (got %d)",
                      cfg->ledger_retention_days);
        goto fail;
    }
    if (cfg->kek_rotate_every_s > 0 &&
        (int64_t)cfg->kek_rotate_every_s + cfg->kek_retire_after_s > DM_KEK_PERIOD_MAX_S) {
        /* A data backup taken just before an erasure holds the subject's key under the
         * version current then; it must be destroyed within the erasure deadline (30 days),
         * with two left for the re-wrap and the token's own backups (docs/backups.md). */
        st = cf_error(path, GL("kek_rotate_every_s"), "kek_rotate_every_s",
                      "kek_rotate_every_s + kek_retire_after_s must be at most %d s (28 days) "
                      "to destroy an erased subject's key within the erasure deadline (got %d + "
                      "%d)",
                      DM_KEK_PERIOD_MAX_S, cfg->kek_rotate_every_s, cfg->kek_retire_after_s);
        goto fail;
    }
    if (strcmp(cfg->transport, "tls") == 0) {
        if (!cfg->tls_cert_file[0] || !cfg->tls_key_file[0]) {
            st = cf_error(path, GL("transport"), "tls_cert_file",
                          "transport = \"tls\" needs tls_cert_file and tls_key_file");
            goto fail;
        }
        if (access(cfg->tls_cert_file, R_OK) != 0) {
            st = cf_error(path, GL("tls_cert_file"), "tls_cert_file", "cannot read \"%s\": %s",
                          cfg->tls_cert_file, strerror(errno));
            goto fail;
        }
        if ((st = check_secret(path, GL("tls_key_file"), "tls_key_file", cfg->tls_key_file, 1,
                               1 << 16)))
            goto fail;
        if (strcmp(cfg->mtls, "off") != 0 &&
            (!cfg->tls_client_ca_file[0] || access(cfg->tls_client_ca_file, R_OK) != 0)) {
            st = cf_error(path, GL("mtls"), "tls_client_ca_file",
                          "mtls = \"%s\" needs a readable tls_client_ca_file", cfg->mtls);
            goto fail;
        }
    } else if (strcmp(cfg->mtls, "off") != 0) {
        st = cf_error(path, GL("mtls"), "mtls", "client certificates need transport = \"tls\"");
        goto fail;
    }
    if (cfg->webhook_url[0]) {
        if (strncmp(cfg->webhook_url, "http://", 7) != 0 &&
            strncmp(cfg->webhook_url, "https://", 8) != 0) {
            st = cf_error(path, GL("webhook_url"), "webhook_url",
                          "must start with http:// or https://");
            goto fail;
        }
        if (!cfg->webhook_secret_file[0]) {
            st = cf_error(path, GL("webhook_url"), "webhook_secret_file",
                          "required with webhook_url");
            goto fail;
        }
        if ((st = check_secret(path, GL("webhook_secret_file"), "webhook_secret_file",
                               cfg->webhook_secret_file, 1, 1024)))
            goto fail;
    }
    if (access(cfg->principals_file, R_OK) != 0) {
        st = cf_error(path, GL("principals_file"), "principals_file", "cannot read \"%s\": %s",
                      cfg->principals_file, strerror(errno));
        goto fail;
    }
    /* The pepper keys HMAC-SHA256 of subjects: fewer than 16 bytes would make them guessable
     * (dm_app_init() refuses it too; --check-config must say so first). */
    if ((st = check_secret(path, GL("subject_pepper_file"), "subject_pepper_file",
                           cfg->subject_pepper_file, 16, 1024)))
        goto fail;
    if (cfg->peer_listen[0] &&
        (st = check_host_port(path, GL("peer_listen"), "peer_listen", cfg->peer_listen, true)))
        goto fail;
    if (cfg->probe_listen[0] && (st = check_probe_listen(path, GL("probe_listen"), cfg)))
        goto fail;
    cfg->region_cfgs = dm_calloc(cfg->n_regions, sizeof(dm_region_config_t));
    for (size_t i = 0; i < cfg->n_regions; i++) {
        const char *code = cfg->regions[i];
        if (!code_ok(code) || strlen(code) < 2 || strlen(code) > DM_REGION_CODE_MAX) {
            st = cf_error(path, GL("regions"), "regions",
                          "\"%s\" is not a region code (2-16 of [a-z0-9], starting with a letter)",
                          code);
            goto fail;
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(cfg->regions[j], code) == 0) {
                st = cf_error(path, GL("regions"), "regions", "\"%s\" is listed twice", code);
                goto fail;
            }
        }
        if ((st = load_region(cfg, code, &cfg->region_cfgs[i])))
            goto fail;
    }
    if (!dm_config_region(cfg, cfg->gateway_region)) {
        st = cf_error(path, GL("gateway_region"), "gateway_region",
                      "\"%s\" is not one of the configured regions", cfg->gateway_region);
        goto fail;
    }
    if ((st = check_peers(path, cfg, lines)))
        goto fail;
#undef GL
    *out = cfg;
    return NULL;
fail:
    dm_config_free(cfg);
    return st;
}

const dm_region_config_t *dm_config_region(const dm_config_t *cfg, const char *code)
{
    if (!cfg->region_cfgs)
        return NULL;
    for (size_t i = 0; i < cfg->n_regions; i++)
        if (cfg->region_cfgs[i].code && strcmp(cfg->region_cfgs[i].code, code) == 0)
            return &cfg->region_cfgs[i];
    return NULL;
}

static void print_keys(FILE *f, const key_desc_t *keys, size_t n, const void *target)
{
    for (size_t i = 0; i < n; i++) {
        const key_desc_t *k = &keys[i];
        const char *p = (const char *)target + k->off;
        fprintf(f, "%s = ", k->name);
        switch (k->type) {
        case KT_INT:
            fprintf(f, "%d;", *(const int *)p);
            break;
        case KT_LIST: {
            char *const *items = *(char *const *const *)p;
            size_t cnt = *(const size_t *)((const char *)target + k->count_off);
            fputs("[ ", f);
            for (size_t j = 0; j < cnt; j++)
                fprintf(f, "%s\"%s\"", j ? ", " : "", items[j]);
            fputs(" ];", f);
            break;
        }
        default:
            fprintf(f, "\"%s\";", *(char *const *)p ? *(char *const *)p : "");
            break;
        }
        fprintf(f, "%s  # %s%s\n", "", k->doc, k->reloadable ? " (reloadable)" : "");
    }
}

void dm_config_print(const dm_config_t *cfg, FILE *f)
{
    fprintf(f,
            "# effective gateway configuration from %s (secret files are named, never read "
            "out)\n",
            cfg->source);
    print_keys(f, gateway_keys, DM_ARRAY_LEN(gateway_keys), cfg);
    for (size_t i = 0; i < cfg->n_regions; i++) {
        fprintf(f, "\n# region \"%s\" from %s\n", cfg->region_cfgs[i].code,
                cfg->region_cfgs[i].source);
        print_keys(f, region_keys, DM_ARRAY_LEN(region_keys), &cfg->region_cfgs[i]);
    }
}

static void free_fields(const key_desc_t *keys, size_t n, void *target)
{
    for (size_t i = 0; i < n; i++) {
        char *p = (char *)target + keys[i].off;
        if (keys[i].type == KT_INT)
            continue;
        if (keys[i].type == KT_LIST) {
            char **items = *(char ***)p;
            size_t cnt = *(size_t *)((char *)target + keys[i].count_off);
            for (size_t j = 0; j < cnt; j++)
                free(items[j]);
            free(items);
            continue;
        }
        free(*(char **)p);
    }
}

void dm_config_free(dm_config_t *cfg)
{
    if (!cfg)
        return;
    if (cfg->region_cfgs) {
        for (size_t i = 0; i < cfg->n_regions; i++) {
            free_fields(region_keys, DM_ARRAY_LEN(region_keys), &cfg->region_cfgs[i]);
            free(cfg->region_cfgs[i].source);
        }
        free(cfg->region_cfgs);
    }
    free_fields(gateway_keys, DM_ARRAY_LEN(gateway_keys), cfg);
    free(cfg->source);
    free(cfg);
}
