/*
 * Authentication and authorisation: principals (loaded from the principals file), bearer
 * tokens (stored only as SHA-256, compared in constant time) and client-certificate
 * subjects, roles per method, tenant scope, purpose of access.
 *
 * Thread-safety: a loaded dm_principals_t is immutable; every function may be called from
 * any thread.
 */
#ifndef DOMICILE_AUTH_H
#define DOMICILE_AUTH_H

#include <stdbool.h>
#include <stddef.h>

#include "domicile/config.h"
#include "domicile/status.h"

typedef enum {
    DM_ROLE_SERVICE = 1 << 0,         /* customers and records within its tenant scope */
    DM_ROLE_READER = 1 << 1,          /* read-only records */
    DM_ROLE_PRIVACY_OFFICER = 1 << 2, /* subject rights */
    DM_ROLE_AUDITOR = 1 << 3,         /* transfers, ledger verification, reports */
    DM_ROLE_OPERATOR = 1 << 4,        /* regions, fencing, drills */
    DM_ROLE_ADMIN = 1 << 5,           /* everything */
} dm_role_t;

#define DM_ROLES_PUBLIC 0 /* a method anyone may call (health) */
/* A method only gateways of other regions may call (src/peer): the caller's certificate is
 * checked, then the asserted principal's roles for the method it serves. */
#define DM_ROLES_GATEWAY   (1u << 30)
#define DM_PURPOSE_MAX_LEN 64

typedef struct dm_principal {
    char *name;
    unsigned roles; /* dm_role_t bits */
    char **tenants; /* customer ids; "*" = every customer */
    size_t n_tenants;
    bool all_tenants;
    char *region; /* where the principal runs: destination of its reads */
    char *default_purpose;
    bool has_token;
    unsigned char token_sha256[32];
    char *cert_subject; /* x509 subject to match, or NULL */
    char *via; /* asserted by a gateway of this region (src/peer); NULL: authenticated here */
} dm_principal_t;

typedef struct dm_principals {
    char *source;
    dm_principal_t *items;
    size_t n;
} dm_principals_t;

/**
 * Load the principals file. Every principal's region must be one of `cfg`'s regions.
 * Errors: INVALID_ARGUMENT "file:line: …" naming the key.
 */
dm_status_t *dm_principals_load(const char *path, const dm_config_t *cfg,
                                dm_principals_t **out) DM_WARN_UNUSED;
void dm_principals_free(dm_principals_t *p);
/** Free what a principal owns (names, tenants, region, purpose, certificate subject; the
 * token hash is wiped), not the struct itself. */
void dm_principal_dispose(dm_principal_t *p);

/**
 * The principal whose token hashes to SHA-256(token), or NULL. Every principal is compared
 * (in constant time), so the time does not depend on which one matched, or whether one did.
 */
const dm_principal_t *dm_principals_by_token(const dm_principals_t *p, const char *token,
                                             size_t len);
/** The principal whose cert_subject equals `subject`, or NULL. */
const dm_principal_t *dm_principals_by_subject(const dm_principals_t *p, const char *subject);

/** Parse "Bearer <token>" (scheme case-insensitive, one space). False when malformed. */
bool dm_auth_parse_bearer(const char *value, size_t len, const char **token, size_t *token_len);
/**
 * Check an x-purpose metadata value (`len` bytes, not NUL-terminated) and copy it, terminated,
 * into `out`. NULL when valid; else INVALID_ARGUMENT "x-purpose: …" (a NUL byte inside is
 * refused: the call must not run as the value's prefix).
 */
dm_status_t *dm_auth_parse_purpose(const char *value, size_t len,
                                   char out[DM_PURPOSE_MAX_LEN + 1]) DM_WARN_UNUSED;
/** Role name <-> bit; names are service, reader, privacy-officer, auditor, operator, admin. */
bool dm_role_parse(const char *name, unsigned *bit);
/** "service, admin" style list of the roles in `mask`, into buf. */
void dm_roles_format(unsigned mask, char *buf, size_t len);
/** Does the principal's tenant scope include `customer_id`? */
bool dm_principal_in_scope(const dm_principal_t *p, const char *customer_id);

#endif
