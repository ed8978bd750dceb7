#include <ctype.h>
#include <libconfig.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "domicile/auth.h"
#include "domicile/crypto.h"
#include "domicile/validate.h"

#define MAX_PRINCIPALS 1024
#define MAX_TENANTS    4096
#define NAME_MAX_LEN   64
#define SUBJECT_MAX    512

static const char *const role_names[] = {"service", "reader",   "privacy-officer",
                                         "auditor", "operator", "admin"};

bool dm_role_parse(const char *name, unsigned *bit)
{
    for (size_t i = 0; i < DM_ARRAY_LEN(role_names); i++) {
        if (strcmp(name, role_names[i]) == 0) {
            *bit = 1u << i;
            return true;
        }
    }
    return false;
}

void dm_roles_format(unsigned mask, char *buf, size_t len)
{
    size_t used = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < DM_ARRAY_LEN(role_names); i++) {
        if (!(mask & (1u << i)))
            continue;
        int n = snprintf(buf + used, len - used, "%s%s", used ? ", " : "", role_names[i]);
        if (n < 0 || (size_t)n >= len - used)
            break;
        used += (size_t)n;
    }
}

void dm_principal_dispose(dm_principal_t *p)
{
    free(p->name);
    for (size_t i = 0; i < p->n_tenants; i++)
        free(p->tenants[i]);
    free(p->tenants);
    free(p->region);
    free(p->default_purpose);
    free(p->cert_subject);
    OPENSSL_cleanse(p->token_sha256, sizeof(p->token_sha256));
}

void dm_principals_free(dm_principals_t *ps)
{
    if (!ps)
        return;
    for (size_t i = 0; i < ps->n; i++)
        dm_principal_dispose(&ps->items[i]);
    free(ps->items);
    free(ps->source);
    free(ps);
}

/* Shapes are checked by src/config/setting.c: a member of the wrong type is an error at its
 * line, never taken for an absent one (a `token_sha256 = 5;` must not leave a principal that
 * silently has no token), and roles and tenants must be lists, not groups. */
static dm_status_t *parse_principal(const char *file, config_setting_t *s, const dm_config_t *cfg,
                                    dm_principal_t *p)
{
    const char *name, *region, *purpose, *tok, *subj;
    config_setting_t *roles, *ten;
    dm_status_t *st;

    if ((st = dm_config_member_string(file, s, "name", true, &name)) ||
        (st = dm_config_member_strings(file, s, "roles", true, 1, 64, &roles)) ||
        (st = dm_config_member_strings(file, s, "tenants", true, 1, MAX_TENANTS, &ten)) ||
        (st = dm_config_member_string(file, s, "region", true, &region)) ||
        (st = dm_config_member_string(file, s, "default_purpose", true, &purpose)) ||
        (st = dm_config_member_string(file, s, "token_sha256", false, &tok)) ||
        (st = dm_config_member_string(file, s, "cert_subject", false, &subj)))
        return st;
    config_setting_t *at_name = config_setting_get_member(s, "name");
    if (!*name || strlen(name) > NAME_MAX_LEN)
        return dm_config_setting_error(file, at_name, "name", "must be 1..%d bytes", NAME_MAX_LEN);
    for (const char *c = name; *c; c++)
        if (!isalnum((unsigned char)*c) && !strchr("._-@", *c))
            return dm_config_setting_error(file, at_name, "name", "must be of [A-Za-z0-9._@-]");
    p->name = dm_strdup(name);

    for (int i = 0; i < config_setting_length(roles); i++) {
        const char *r = config_setting_get_string_elem(roles, i);
        unsigned bit;
        if (!dm_role_parse(r, &bit))
            return dm_config_setting_error(file, config_setting_get_elem(roles, (unsigned)i),
                                           "roles",
                                           "\"%s\" is not a role (service, reader, "
                                           "privacy-officer, auditor, operator, admin)",
                                           r);
        p->roles |= bit;
    }

    p->n_tenants = (size_t)config_setting_length(ten);
    p->tenants = dm_calloc(p->n_tenants, sizeof(char *));
    for (size_t i = 0; i < p->n_tenants; i++) {
        const char *t = config_setting_get_string_elem(ten, (int)i);
        if (strcmp(t, "*") == 0) {
            p->all_tenants = true;
        } else if ((st = dm_check_customer_id("tenants", t))) {
            dm_status_free(st);
            return dm_config_setting_error(file, config_setting_get_elem(ten, (unsigned)i),
                                           "tenants", "entry %zu is not a customer id or \"*\"",
                                           i + 1);
        }
        p->tenants[i] = dm_strdup(t);
    }

    if (!dm_config_region(cfg, region))
        return dm_config_setting_error(file, config_setting_get_member(s, "region"), "region",
                                       "\"%s\" is not one of the configured regions (where the "
                                       "principal runs)",
                                       region);
    p->region = dm_strdup(region);

    if ((st = dm_check_purpose("default_purpose", purpose, false))) {
        dm_status_free(st);
        return dm_config_setting_error(file, config_setting_get_member(s, "default_purpose"),
                                       "default_purpose", "must be 1..64 bytes of [a-z0-9-]");
    }
    p->default_purpose = dm_strdup(purpose);

    if (tok) {
        if (strlen(tok) != 64 || !dm_hex_decode(tok, p->token_sha256, sizeof(p->token_sha256)))
            return dm_config_setting_error(file, config_setting_get_member(s, "token_sha256"),
                                           "token_sha256",
                                           "must be 64 hex digits: the SHA-256 of the token, "
                                           "never the token itself");
        p->has_token = true;
    }
    if (subj) {
        if (!*subj || strlen(subj) > SUBJECT_MAX)
            return dm_config_setting_error(file, config_setting_get_member(s, "cert_subject"),
                                           "cert_subject", "must be 1..%d bytes", SUBJECT_MAX);
        p->cert_subject = dm_strdup(subj);
    }
    if (!p->has_token && !p->cert_subject)
        return dm_config_setting_error(file, s, "token_sha256",
                                       "a principal needs token_sha256, cert_subject, or both");
    return NULL;
}

dm_status_t *dm_principals_load(const char *path, const dm_config_t *cfg, dm_principals_t **out)
{
    static const char *const roots[] = {"principals"};
    static const char *const known[] = {
        "name", "roles", "tenants", "region", "default_purpose", "token_sha256", "cert_subject"};
    config_t cf;
    config_setting_t *list;
    dm_principals_t *ps = dm_calloc(1, sizeof(*ps));
    ps->source = dm_strdup(path);

    dm_status_t *st = dm_config_read_file(path, &cf, "principals");
    if (st) {
        dm_principals_free(ps);
        return st;
    }
    config_setting_t *root = config_root_setting(&cf);
    if ((st = dm_config_check_group(path, root, NULL, roots, DM_ARRAY_LEN(roots))) ||
        (st = dm_config_member_groups(path, root, "principals", 1, MAX_PRINCIPALS, known,
                                      DM_ARRAY_LEN(known), &list)))
        goto out;
    ps->n = (size_t)config_setting_length(list);
    ps->items = dm_calloc(ps->n, sizeof(dm_principal_t));
    for (size_t i = 0; i < ps->n && !st; i++) {
        config_setting_t *e = config_setting_get_elem(list, (unsigned)i);
        st = parse_principal(path, e, cfg, &ps->items[i]);
        for (size_t j = 0; j < i && !st; j++) {
            if (strcmp(ps->items[j].name, ps->items[i].name) == 0)
                st = dm_config_setting_error(path, config_setting_get_member(e, "name"), "name",
                                             "\"%s\" is defined twice", ps->items[i].name);
            else if (ps->items[i].has_token && ps->items[j].has_token &&
                     CRYPTO_memcmp(ps->items[i].token_sha256, ps->items[j].token_sha256, 32) == 0)
                st = dm_config_setting_error(path, config_setting_get_member(e, "token_sha256"),
                                             "token_sha256",
                                             "principals \"%s\" and \"%s\" share a token",
                                             ps->items[j].name, ps->items[i].name);
        }
    }
out:
    config_destroy(&cf);
    if (st) {
        dm_principals_free(ps);
        return st;
    }
    *out = ps;
    return NULL;
}

const dm_principal_t *dm_principals_by_token(const dm_principals_t *ps, const char *token,
                                             size_t len)
{
    unsigned char h[32];
    unsigned int hl = sizeof(h);
    const dm_principal_t *found = NULL;
    if (!EVP_Digest(token, len, h, &hl, EVP_sha256(), NULL))
        return NULL;
    for (size_t i = 0; i < ps->n; i++) {
        /* No early exit: every entry costs the same compare. */
        int same = ps->items[i].has_token & (CRYPTO_memcmp(h, ps->items[i].token_sha256, 32) == 0);
        if (same && !found)
            found = &ps->items[i];
    }
    OPENSSL_cleanse(h, sizeof(h));
    return found;
}

const dm_principal_t *dm_principals_by_subject(const dm_principals_t *ps, const char *subject)
{
    for (size_t i = 0; i < ps->n; i++)
        if (ps->items[i].cert_subject && strcmp(ps->items[i].cert_subject, subject) == 0)
            return &ps->items[i];
    return NULL;
}

bool dm_auth_parse_bearer(const char *v, size_t len, const char **token, size_t *token_len)
{
    if (len < 8 || strncasecmp(v, "bearer ", 7) != 0)
        return false;
    *token = v + 7;
    *token_len = len - 7;
    if (*token_len == 0 || *token_len > 512)
        return false;
    for (size_t i = 0; i < *token_len; i++)
        if ((unsigned char)(*token)[i] <= 0x20 || (unsigned char)(*token)[i] >= 0x7f)
            return false;
    return true;
}

dm_status_t *dm_auth_parse_purpose(const char *v, size_t len, char out[DM_PURPOSE_MAX_LEN + 1])
{
    if (len == 0 || len > DM_PURPOSE_MAX_LEN || memchr(v, '\0', len))
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "x-purpose: must be 1..64 bytes of [a-z0-9-]");
    memcpy(out, v, len);
    out[len] = '\0';
    return dm_check_purpose("x-purpose", out, false);
}

bool dm_principal_in_scope(const dm_principal_t *p, const char *customer_id)
{
    if (p->all_tenants)
        return true;
    for (size_t i = 0; i < p->n_tenants; i++)
        if (strcmp(p->tenants[i], customer_id) == 0)
            return true;
    return false;
}
