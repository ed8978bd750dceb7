/*
 * The transfer policy: legal bases (regions/bases.conf) and routes (regions/routes.conf).
 */
#include <libconfig.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "domicile/ledger.h"
#include "domicile/validate.h"

#define MAX_BASES     256
#define MAX_ROUTES    1024
#define MAX_FORBIDDEN 256
#define TEXT_MAX      2048

/* Every shape check below goes through src/config/setting.c: a member of the wrong type is an
 * error at its own line, never taken for an absent one (`revoked = 2031;` read as "no
 * revocation" would keep a fallen basis in force). */

/* A UTC calendar day, exactly YYYY-MM-DD and a real date (timegm() would turn 2021-02-30 into
 * 2 March without a word). */
static bool parse_day(const char *s, int64_t *ms)
{
    struct tm tm, back;
    if (strlen(s) != 10 || s[4] != '-' || s[7] != '-')
        return false;
    for (int i = 0; i < 10; i++)
        if (i != 4 && i != 7 && (s[i] < '0' || s[i] > '9'))
            return false;
    memset(&tm, 0, sizeof(tm));
    tm.tm_year = atoi(s) - 1900;
    tm.tm_mon = atoi(s + 5) - 1;
    tm.tm_mday = atoi(s + 8);
    time_t t = timegm(&tm);
    if (!gmtime_r(&t, &back) || back.tm_year != tm.tm_year || back.tm_mon != atoi(s + 5) - 1 ||
        back.tm_mday != atoi(s + 8))
        return false;
    *ms = (int64_t)t * 1000;
    return true;
}

static dm_status_t *load_bases(const char *file, dm_policy_t *p)
{
    static const char *const roots[] = {"bases"};
    static const char *const known[] = {"id",        "instrument", "citation", "kind",
                                        "effective", "revoked",    "notes"};
    static const char *const kinds[] = {"adequacy", "scc", "derogation", "domestic-law"};
    config_t cf;
    config_setting_t *list;
    dm_status_t *st = dm_config_read_file(file, &cf, "bases");
    if (st)
        return st;
    config_setting_t *root = config_root_setting(&cf);
    if ((st = dm_config_check_group(file, root, NULL, roots, DM_ARRAY_LEN(roots))) ||
        (st = dm_config_member_groups(file, root, "bases", 1, MAX_BASES, known, DM_ARRAY_LEN(known),
                                      &list)))
        goto out;
    p->n_bases = (size_t)config_setting_length(list);
    p->bases = dm_calloc(p->n_bases, sizeof(dm_basis_t));
    for (size_t i = 0; i < p->n_bases; i++) {
        config_setting_t *s = config_setting_get_elem(list, (unsigned)i);
        dm_basis_t *b = &p->bases[i];
        const char *id, *kind, *eff, *rev, *instrument, *citation, *notes;
        if ((st = dm_config_member_string(file, s, "id", true, &id)) ||
            (st = dm_config_member_string(file, s, "instrument", true, &instrument)) ||
            (st = dm_config_member_string(file, s, "citation", true, &citation)) ||
            (st = dm_config_member_string(file, s, "kind", true, &kind)) ||
            (st = dm_config_member_string(file, s, "effective", true, &eff)) ||
            (st = dm_config_member_string(file, s, "revoked", false, &rev)) ||
            (st = dm_config_member_string(file, s, "notes", false, &notes)))
            goto out;
        dm_status_t *bad = dm_check_kind("id", id, false);
        if (bad) {
            dm_status_free(bad);
            st = dm_config_setting_error(file, config_setting_get_member(s, "id"), "id",
                                         "must be 1..64 bytes of [a-z0-9._-] (got \"%s\")", id);
            goto out;
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(p->bases[j].id, id) == 0) {
                st = dm_config_setting_error(file, config_setting_get_member(s, "id"), "id",
                                             "\"%s\" is defined twice", id);
                goto out;
            }
        }
        size_t k = 0;
        while (k < DM_ARRAY_LEN(kinds) && strcmp(kind, kinds[k]) != 0)
            k++;
        if (k == DM_ARRAY_LEN(kinds)) {
            st = dm_config_setting_error(file, config_setting_get_member(s, "kind"), "kind",
                                         "must be adequacy, scc, derogation or domestic-law");
            goto out;
        }
        if (!parse_day(eff, &b->effective_ms)) {
            st = dm_config_setting_error(file, config_setting_get_member(s, "effective"),
                                         "effective", "must be a date YYYY-MM-DD");
            goto out;
        }
        if (rev && *rev && (!parse_day(rev, &b->revoked_ms) || b->revoked_ms <= b->effective_ms)) {
            st = dm_config_setting_error(file, config_setting_get_member(s, "revoked"), "revoked",
                                         "must be \"\" or a date YYYY-MM-DD after `effective`");
            goto out;
        }
        const char *texts[][2] = {
            {"instrument", instrument}, {"citation", citation}, {"notes", notes ? notes : ""}};
        for (size_t t = 0; t < DM_ARRAY_LEN(texts); t++) {
            size_t n = strlen(texts[t][1]);
            if ((t == 0 && n == 0) || n > TEXT_MAX) {
                st = dm_config_setting_error(file, config_setting_get_member(s, texts[t][0]),
                                             texts[t][0], "must be %d..%d bytes (got %zu)",
                                             t == 0 ? 1 : 0, TEXT_MAX, n);
                goto out;
            }
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
    return strcmp(v, "*") == 0 || dm_config_region(cfg, v);
}

static dm_status_t *load_routes(const char *file, const dm_config_t *cfg, dm_policy_t *p)
{
    static const char *const roots[] = {"routes", "forbidden_purposes"};
    static const char *const known[] = {"from", "to", "purpose", "bases"};
    config_t cf;
    config_setting_t *fp, *list;
    dm_status_t *st = dm_config_read_file(file, &cf, "routes");
    if (st)
        return st;
    config_setting_t *root = config_root_setting(&cf);
    if ((st = dm_config_check_group(file, root, NULL, roots, DM_ARRAY_LEN(roots))) ||
        (st = dm_config_member_strings(file, root, "forbidden_purposes", false, 0, MAX_FORBIDDEN,
                                       &fp)))
        goto out;
    if (fp) {
        p->n_forbidden = (size_t)config_setting_length(fp);
        p->forbidden = dm_calloc(p->n_forbidden + 1, sizeof(char *));
        for (size_t i = 0; i < p->n_forbidden; i++) {
            const char *v = config_setting_get_string_elem(fp, (int)i);
            dm_status_t *bad = dm_check_purpose("forbidden_purposes", v, false);
            if (bad) {
                dm_status_free(bad);
                st = dm_config_setting_error(
                    file, config_setting_get_elem(fp, (unsigned)i), "forbidden_purposes",
                    "entry %zu is not a purpose (1..64 bytes of [a-z0-9-])", i + 1);
                goto out;
            }
            p->forbidden[i] = dm_strdup(v);
        }
    }
    if ((st = dm_config_member_groups(file, root, "routes", 0, MAX_ROUTES, known,
                                      DM_ARRAY_LEN(known), &list)))
        goto out;
    p->n_routes = (size_t)config_setting_length(list);
    p->routes = dm_calloc(p->n_routes + 1, sizeof(dm_route_t));
    for (size_t i = 0; i < p->n_routes; i++) {
        config_setting_t *s = config_setting_get_elem(list, (unsigned)i), *bl;
        dm_route_t *r = &p->routes[i];
        const char *from, *to, *purpose;
        if ((st = dm_config_member_string(file, s, "from", true, &from)) ||
            (st = dm_config_member_string(file, s, "to", true, &to)) ||
            (st = dm_config_member_string(file, s, "purpose", true, &purpose)) ||
            (st = dm_config_member_strings(file, s, "bases", true, 1, MAX_BASES, &bl)))
            goto out;
        const char *ends[][2] = {{"from", from}, {"to", to}};
        for (size_t e = 0; e < DM_ARRAY_LEN(ends); e++) {
            if (!region_or_star(cfg, ends[e][1])) {
                st = dm_config_setting_error(
                    file, config_setting_get_member(s, ends[e][0]), ends[e][0],
                    "\"%s\" is not a configured region code or \"*\"", ends[e][1]);
                goto out;
            }
        }
        dm_status_t *bad =
            strcmp(purpose, "*") != 0 ? dm_check_purpose("purpose", purpose, false) : NULL;
        if (bad) {
            dm_status_free(bad);
            st = dm_config_setting_error(file, config_setting_get_member(s, "purpose"), "purpose",
                                         "must be a purpose (1..64 bytes of [a-z0-9-]) or \"*\"");
            goto out;
        }
        r->from = dm_strdup(from);
        r->to = dm_strdup(to);
        r->purpose = dm_strdup(purpose);
        r->n_bases = (size_t)config_setting_length(bl);
        r->bases = dm_calloc(r->n_bases, sizeof(dm_basis_t *));
        for (size_t k = 0; k < r->n_bases; k++) {
            const char *id = config_setting_get_string_elem(bl, (int)k);
            r->bases[k] = dm_policy_basis(p, id);
            if (!r->bases[k]) {
                st = dm_config_setting_error(file, config_setting_get_elem(bl, (unsigned)k),
                                             "bases", "\"%s\" is not in the basis catalogue", id);
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
