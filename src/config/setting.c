/*
 * Shape checks of libconfig settings, shared by every loader of a libconfig file: the gateway
 * and region files (config.c), bases and routes (src/ledger/policy.c), principals
 * (src/auth/principals.c) and customer webhooks (src/dsr/webhook.c).
 *
 * libconfig accepts any nesting of groups, lists and arrays, and its accessors answer NULL or
 * 0 for a setting of another type than asked. A loader that reads "the member `revoked`, if it
 * is a string" treats `revoked = 2031;` as absent (never revoked) and a list element, which has
 * no name, as a NULL name. These helpers tell "absent" from "present with the wrong shape" and
 * say which, where.
 */
#include <errno.h>
#include <libconfig.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "domicile/config.h"

static const char *type_name(const config_setting_t *s)
{
    switch (config_setting_type(s)) {
    case CONFIG_TYPE_GROUP:
        return "a group { ... }";
    case CONFIG_TYPE_LIST:
        return "a list ( ... )";
    case CONFIG_TYPE_ARRAY:
        return "an array [ ... ]";
    case CONFIG_TYPE_INT:
    case CONFIG_TYPE_INT64:
        return "an integer";
    case CONFIG_TYPE_FLOAT:
        return "a number with a fraction";
    case CONFIG_TYPE_STRING:
        return "a string";
    case CONFIG_TYPE_BOOL:
        return "a boolean";
    }
    return "a setting of unknown type";
}

dm_status_t *dm_config_setting_error(const char *file, const config_setting_t *s, const char *key,
                                     const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    /* A setting from an @include'd file is reported in that file; libconfig keeps the name
     * as written, relative to the include directory (the including file's, see below). */
    const char *src = s ? config_setting_source_file(s) : NULL;
    char *resolved = NULL;
    if (src && src[0] != '/' && strcmp(src, file) != 0) {
        const char *slash = strrchr(file, '/');
        if (slash)
            src = resolved = dm_sprintf("%.*s/%s", (int)(slash - file), file, src);
    }
    dm_status_t *st = dm_config_error(src ? src : file, s ? (int)config_setting_source_line(s) : 0,
                                      key, "%s", what);
    free(resolved);
    return st;
}

/* A syntax error, in an @include'd file too (libconfig names it as written: relative to the
 * include directory `dir`). */
static dm_status_t *syntax_error(const char *file, const char *dir, const config_t *cf)
{
    const char *where = config_error_file(cf) ? config_error_file(cf) : file;
    char *resolved =
        where[0] != '/' && strcmp(where, file) != 0 && dir ? dm_sprintf("%s/%s", dir, where) : NULL;
    dm_status_t *st =
        dm_config_error(resolved ? resolved : where, config_error_line(cf), NULL,
                        "syntax error: %s", config_error_text(cf) ? config_error_text(cf) : "?");
    free(resolved);
    return st;
}

dm_status_t *dm_config_read_file(const char *file, config_t *cf, const char *first_key)
{
    dm_status_t *st = NULL;
    const char *slash = strrchr(file, '/');
    char *dir = slash ? dm_strndup(file, slash == file ? 1 : (size_t)(slash - file)) : NULL;

    config_init(cf);
    config_set_include_dir(cf, dir ? dir : ".");
    errno = 0;
    if (config_read_file(cf, file) != CONFIG_TRUE) {
        if (config_error_type(cf) == CONFIG_ERR_FILE_IO)
            st = dm_config_error(file, 0, NULL, "cannot read file: %s",
                                 strerror(errno ? errno : ENOENT));
        else
            st = syntax_error(file, dir, cf);
    } else if (config_setting_length(config_root_setting(cf)) == 0) {
        /* An empty file (or only comments): a truncated write or the wrong path, never what
         * the operator meant; say so rather than "key missing". */
        st = dm_config_error(file, 1, first_key, "missing: the file has no settings");
    }
    free(dir);
    if (st)
        config_destroy(cf);
    return st;
}

dm_status_t *dm_config_check_group(const char *file, config_setting_t *s, const char *what,
                                   const char *const *known, size_t n)
{
    if (!config_setting_is_group(s))
        return dm_config_setting_error(file, s, what, "must be a group { ... } (got %s)",
                                       type_name(s));
    for (int i = 0; i < config_setting_length(s); i++) {
        config_setting_t *m = config_setting_get_elem(s, (unsigned)i);
        const char *name = config_setting_name(m);
        size_t k = 0;
        while (name && k < n && strcmp(name, known[k]) != 0)
            k++;
        if (!name || k == n)
            return dm_config_setting_error(file, m, name ? name : what, "unknown key");
    }
    return NULL;
}

dm_status_t *dm_config_member_string(const char *file, config_setting_t *g, const char *key,
                                     bool required, const char **out)
{
    config_setting_t *m = config_setting_get_member(g, key);
    *out = NULL;
    if (!m)
        return required ? dm_config_setting_error(file, g, key, "missing (required)") : NULL;
    if (config_setting_type(m) != CONFIG_TYPE_STRING)
        return dm_config_setting_error(file, m, key, "must be a string in double quotes (got %s)",
                                       type_name(m));
    /* Never NULL for a string setting in the libconfig we build with; "" if one ever is. */
    *out = config_setting_get_string(m) ? config_setting_get_string(m) : "";
    return NULL;
}

/* `m` (the value of `key`) must be a list or array of min..max entries. */
static dm_status_t *check_count(const char *file, config_setting_t *m, const char *key, size_t min,
                                size_t max, const char *shape)
{
    if (!config_setting_is_list(m) && !config_setting_is_array(m))
        return dm_config_setting_error(file, m, key, "must be %s (got %s)", shape, type_name(m));
    size_t len = (size_t)config_setting_length(m);
    if (len < min || len > max)
        return dm_config_setting_error(file, m, key, "must have %zu to %zu entries (got %zu)", min,
                                       max, len);
    return NULL;
}

dm_status_t *dm_config_member_strings(const char *file, config_setting_t *g, const char *key,
                                      bool required, size_t min, size_t max, config_setting_t **out)
{
    config_setting_t *m = config_setting_get_member(g, key);
    dm_status_t *st;
    *out = NULL;
    if (!m)
        return required ? dm_config_setting_error(file, g, key, "missing (required)") : NULL;
    if ((st = check_count(file, m, key, min, max, "a list of strings [ \"a\", \"b\" ]")))
        return st;
    for (int i = 0; i < config_setting_length(m); i++) {
        config_setting_t *e = config_setting_get_elem(m, (unsigned)i);
        if (config_setting_type(e) != CONFIG_TYPE_STRING || !config_setting_get_string(e))
            return dm_config_setting_error(file, e, key, "entry %d must be a string (got %s)",
                                           i + 1, type_name(e));
    }
    *out = m;
    return NULL;
}

dm_status_t *dm_config_member_groups(const char *file, config_setting_t *g, const char *key,
                                     size_t min, size_t max, const char *const *known, size_t n,
                                     config_setting_t **out)
{
    config_setting_t *m = config_setting_get_member(g, key);
    dm_status_t *st;
    *out = NULL;
    if (!m)
        return dm_config_setting_error(file, g, key, "missing (required)");
    if ((st = check_count(file, m, key, min, max, "a list of groups ( { ... }, ... )")))
        return st;
    for (int i = 0; i < config_setting_length(m); i++) {
        config_setting_t *e = config_setting_get_elem(m, (unsigned)i);
        if (!config_setting_is_group(e))
            return dm_config_setting_error(
                file, e, key, "entry %d must be a group { ... } (got %s)", i + 1, type_name(e));
        if ((st = dm_config_check_group(file, e, key, known, n)))
            return st;
    }
    *out = m;
    return NULL;
}
