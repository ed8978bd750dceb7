/*
 * The transfer policy: legal bases (regions/bases.conf) and routes (regions/routes.conf).
 */
#include <libconfig.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "domicile/ledger.h"
#include "domicile/validate.h"

#define MAX_BASES  256
#define MAX_ROUTES 1024
#define TEXT_MAX   2048

static const char *member(config_setting_t *s, const char *key)
{
    config_setting_t *m = config_setting_get_member(s, key);
    return m && config_setting_type(m) == CONFIG_TYPE_STRING ? config_setting_get_string(m) : NULL;
}

static bool parse_day(const char *s, int64_t *ms)
{
    struct tm tm;
    memset(&tm, 0, sizeof(tm));
    const char *end = strptime(s, "%Y-%m-%d", &tm);
    if (!end || *end || strlen(s) != 10)
        return false;
    *ms = (int64_t)timegm(&tm) * 1000;
    return true;
}

static dm_status_t *check_keys(const char *file, const char *what, config_setting_t *s,
                               const char *const *known, size_t n)
{
    /* A list or array element has no name (bases = ( ( {...} ) )): only a group is an entry. */
    if (config_setting_type(s) != CONFIG_TYPE_GROUP)
        return dm_config_error(file, (int)config_setting_source_line(s), what,
                               "each entry must be a group { ... }");
    for (int i = 0; i < config_setting_length(s); i++) {
        config_setting_t *m = config_setting_get_elem(s, (unsigned)i);
        const char *name = config_setting_name(m);
        bool ok = false;
        for (size_t k = 0; name && k < n; k++)
            ok = ok || strcmp(name, known[k]) == 0;
        if (!ok)
            return dm_config_error(file, (int)config_setting_source_line(m), name ? name : what,
                                   "unknown key");
    }
    return NULL;
}

static dm_status_t *read_file(const char *file, config_t *cf)
{
    config_init(cf);
    if (config_read_file(cf, file) == CONFIG_TRUE)
        return NULL;
    dm_status_t *st = config_error_type(cf) == CONFIG_ERR_FILE_IO
                          ? dm_config_error(file, 0, NULL, "cannot read file")
                          : dm_config_error(file, config_error_line(cf), NULL, "syntax error: %s",
                                            config_error_text(cf));
    config_destroy(cf);
    return st;
}

static dm_status_t *load_bases(const char *file, dm_policy_t *p)
{
    static const char *const known[] = {"id",        "instrument", "citation", "kind",
                                        "effective", "revoked",    "notes"};
    static const char *const kinds[] = {"adequacy", "scc", "derogation", "domestic-law"};
    config_t cf;
    dm_status_t *st = read_file(file, &cf);
    if (st)
        return st;
    config_setting_t *list = config_lookup(&cf, "bases");
    if (!list || config_setting_type(list) != CONFIG_TYPE_LIST ||
        config_setting_length(list) == 0 || config_setting_length(list) > MAX_BASES) {
        st = dm_config_error(file, 0, "bases", "required: a list ( { ... }, ... ) of 1..%d",
                             MAX_BASES);
        goto out;
    }
    p->n_bases = (size_t)config_setting_length(list);
    p->bases = dm_calloc(p->n_bases, sizeof(dm_basis_t));
    for (size_t i = 0; i < p->n_bases; i++) {
        config_setting_t *s = config_setting_get_elem(list, (unsigned)i);
        int line = (int)config_setting_source_line(s);
        dm_basis_t *b = &p->bases[i];
        if ((st = check_keys(file, "bases", s, known, DM_ARRAY_LEN(known))))
            goto out;
        const char *id = member(s, "id"), *kind = member(s, "kind");
        const char *eff = member(s, "effective"), *rev = member(s, "revoked");
        dm_status_t *bad = id ? dm_check_kind("id", id, false) : NULL;
        if (!id || bad) {
            dm_status_free(bad);
            st = dm_config_error(file, line, "id", "required: 1..64 bytes of [a-z0-9._-]");
            goto out;
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(p->bases[j].id, id) == 0) {
                st = dm_config_error(file, line, "id", "\"%s\" is defined twice", id);
                goto out;
            }
        }
        bool kind_ok = false;
        for (size_t k = 0; kind && k < DM_ARRAY_LEN(kinds); k++)
            kind_ok = kind_ok || strcmp(kind, kinds[k]) == 0;
        if (!kind_ok) {
            st = dm_config_error(file, line, "kind",
                                 "must be adequacy, scc, derogation or domestic-law");
            goto out;
        }
        if (!eff || !parse_day(eff, &b->effective_ms)) {
            st = dm_config_error(file, line, "effective", "required: a date YYYY-MM-DD");
            goto out;
        }
        if (rev && *rev && (!parse_day(rev, &b->revoked_ms) || b->revoked_ms <= b->effective_ms)) {
            st = dm_config_error(file, line, "revoked",
                                 "must be \"\" or a date YYYY-MM-DD after `effective`");
            goto out;
        }
        const char *instrument = member(s, "instrument"), *citation = member(s, "citation");
        const char *notes = member(s, "notes");
        if (!instrument || !*instrument || strlen(instrument) > TEXT_MAX || !citation ||
            strlen(citation) > TEXT_MAX || (notes && strlen(notes) > TEXT_MAX)) {
            st = dm_config_error(file, line, "instrument",
                                 "instrument and citation are required (at most %d bytes)",
                                 TEXT_MAX);
            goto out;
        }
        b->id = dm_strdup(id);
        b->kind = dm_strdup(kind);
        b->instrument = dm_strdup(instrument);
        b->citation = dm_strdup(citation);
        b->notes = dm_strdup(notes ? notes : "");
    }
out:
    config_destroy(&cf);
    return st;
}

static bool region_or_star(const dm_config_t *cfg, const char *v)
{
    return v && (strcmp(v, "*") == 0 || dm_config_region(cfg, v));
}

static dm_status_t *load_routes(const char *file, const dm_config_t *cfg, dm_policy_t *p)
{
    static const char *const known[] = {"from", "to", "purpose", "bases"};
    config_t cf;
    dm_status_t *st = read_file(file, &cf);
    if (st)
        return st;
    config_setting_t *root = config_root_setting(&cf);
    for (int i = 0; i < config_setting_length(root); i++) {
        config_setting_t *m = config_setting_get_elem(root, (unsigned)i);
        const char *n = config_setting_name(m);
        if (strcmp(n, "routes") != 0 && strcmp(n, "forbidden_purposes") != 0) {
            st = dm_config_error(file, (int)config_setting_source_line(m), n, "unknown key");
            goto out;
        }
    }
    config_setting_t *fp = config_lookup(&cf, "forbidden_purposes");
    if (fp) {
        if (!config_setting_is_aggregate(fp)) {
            st = dm_config_error(file, (int)config_setting_source_line(fp), "forbidden_purposes",
                                 "must be a list of purposes");
            goto out;
        }
        p->n_forbidden = (size_t)config_setting_length(fp);
        p->forbidden = dm_calloc(p->n_forbidden + 1, sizeof(char *));
        for (size_t i = 0; i < p->n_forbidden; i++) {
            const char *v = config_setting_get_string_elem(fp, (int)i);
            dm_status_t *bad = v ? dm_check_purpose("forbidden_purposes", v, false) : NULL;
            if (!v || bad) {
                dm_status_free(bad);
                st = dm_config_error(file, (int)config_setting_source_line(fp),
                                     "forbidden_purposes", "entry %zu is not a purpose", i + 1);
                goto out;
            }
            p->forbidden[i] = dm_strdup(v);
        }
    }
    config_setting_t *list = config_lookup(&cf, "routes");
    if (!list || config_setting_type(list) != CONFIG_TYPE_LIST ||
        config_setting_length(list) > MAX_ROUTES) {
        st = dm_config_error(file, 0, "routes", "required: a list ( { ... }, ... ) of 0..%d",
                             MAX_ROUTES);
        goto out;
    }
    p->n_routes = (size_t)config_setting_length(list);
    p->routes = dm_calloc(p->n_routes + 1, sizeof(dm_route_t));
    for (size_t i = 0; i < p->n_routes; i++) {
        config_setting_t *s = config_setting_get_elem(list, (unsigned)i);
        int line = (int)config_setting_source_line(s);
        dm_route_t *r = &p->routes[i];
        if ((st = check_keys(file, "routes", s, known, DM_ARRAY_LEN(known))))
            goto out;
        const char *from = member(s, "from"), *to = member(s, "to");
        const char *purpose = member(s, "purpose");
        if (!region_or_star(cfg, from) || !region_or_star(cfg, to)) {
            st = dm_config_error(file, line, "from",
                                 "from and to must be configured region codes or \"*\"");
            goto out;
        }
        dm_status_t *bad = purpose && strcmp(purpose, "*") != 0
                               ? dm_check_purpose("purpose", purpose, false)
                               : NULL;
        if (!purpose || bad) {
            dm_status_free(bad);
            st = dm_config_error(file, line, "purpose", "required: a purpose or \"*\"");
            goto out;
        }
        config_setting_t *bl = config_setting_get_member(s, "bases");
        if (!bl || !config_setting_is_aggregate(bl) || config_setting_length(bl) == 0) {
            st = dm_config_error(file, line, "bases", "required: a non-empty list of basis ids");
            goto out;
        }
        r->from = dm_strdup(from);
        r->to = dm_strdup(to);
        r->purpose = dm_strdup(purpose);
        r->n_bases = (size_t)config_setting_length(bl);
        r->bases = dm_calloc(r->n_bases, sizeof(dm_basis_t *));
        for (size_t k = 0; k < r->n_bases; k++) {
            const char *id = config_setting_get_string_elem(bl, (int)k);
            r->bases[k] = id ? dm_policy_basis(p, id) : NULL;
            if (!r->bases[k]) {
                st = dm_config_error(file, (int)config_setting_source_line(bl), "bases",
                                     "\"%s\" is not in the basis catalogue", id ? id : "?");
                goto out;
            }
        }
    }
out:
    config_destroy(&cf);
    return st;
}

dm_status_t *dm_policy_load(const char *bases_file, const char *routes_file, const dm_config_t *cfg,
                            dm_policy_t **out)
{
    dm_policy_t *p = dm_calloc(1, sizeof(*p));
    dm_status_t *st = load_bases(bases_file, p);
    if (!st)
        st = load_routes(routes_file, cfg, p);
    if (st) {
        dm_policy_free(p);
        return st;
    }
    *out = p;
    return NULL;
}

void dm_policy_free(dm_policy_t *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->n_bases; i++) {
        free(p->bases[i].id);
        free(p->bases[i].instrument);
        free(p->bases[i].citation);
        free(p->bases[i].kind);
        free(p->bases[i].notes);
    }
    free(p->bases);
    for (size_t i = 0; i < p->n_routes; i++) {
        free(p->routes[i].from);
        free(p->routes[i].to);
        free(p->routes[i].purpose);
        free(p->routes[i].bases);
    }
    free(p->routes);
    for (size_t i = 0; i < p->n_forbidden; i++)
        free(p->forbidden[i]);
    free(p->forbidden);
    free(p);
}

const dm_basis_t *dm_policy_basis(const dm_policy_t *p, const char *id)
{
    for (size_t i = 0; i < p->n_bases; i++)
        if (p->bases[i].id && strcmp(p->bases[i].id, id) == 0)
            return &p->bases[i];
    return NULL;
}

bool dm_policy_forbidden(const dm_policy_t *p, const char *purpose)
{
    for (size_t i = 0; i < p->n_forbidden; i++)
        if (strcmp(p->forbidden[i], purpose) == 0)
            return true;
    return false;
}

static bool match(const char *pattern, const char *v)
{
    return strcmp(pattern, "*") == 0 || strcmp(pattern, v) == 0;
}

const dm_basis_t *dm_policy_decide(const dm_policy_t *p, const char *from, const char *to,
                                   const char *purpose, int64_t now_ms, const char **why)
{
    if (dm_policy_forbidden(p, purpose)) {
        *why = "the purpose is forbidden for customer data by policy";
        return NULL;
    }
    for (size_t i = 0; i < p->n_routes; i++) {
        const dm_route_t *r = &p->routes[i];
        if (!match(r->from, from) || !match(r->to, to) || !match(r->purpose, purpose))
            continue;
        for (size_t k = 0; k < r->n_bases; k++) {
            const dm_basis_t *b = r->bases[k];
            if (b->effective_ms <= now_ms && (b->revoked_ms == 0 || now_ms < b->revoked_ms))
                return b;
        }
        *why = "no basis of the route is in force";
        return NULL;
    }
    *why = "no route allows it";
    return NULL;
}

const dm_basis_t *dm_policy_considered(const dm_policy_t *p, const char *from, const char *to,
                                       const char *purpose, int64_t now_ms)
{
    if (dm_policy_forbidden(p, purpose))
        return NULL;
    for (size_t i = 0; i < p->n_routes; i++) {
        const dm_route_t *r = &p->routes[i];
        if (!match(r->from, from) || !match(r->to, to) || !match(r->purpose, purpose))
            continue;
        for (size_t k = 0; k < r->n_bases; k++)
            if (r->bases[k]->revoked_ms != 0 && r->bases[k]->revoked_ms <= now_ms)
                return r->bases[k];
        return r->n_bases > 0 ? r->bases[0] : NULL;
    }
    return NULL;
}
