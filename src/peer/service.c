/*
 * The called side of gateway to gateway: who is calling (a gateway of which region, by its
 * verified certificate), whom it speaks for (the asserted principal), and PeerService/Exec.
 *
 * The certificate is checked here against the federation's CA and names, whatever listener
 * the call came in on: a client certificate the public listener accepted from another CA
 * cannot pass for a gateway.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "domicile/api.h"
#include "domicile/app.h"
#include "domicile/log.h"
#include "domicile/peer.h"

#include "domicile/peer/v1/peer.pb-c.h"

#define PEER_CACHE 32

/* ---- authentication ---- */

static pthread_mutex_t auth_mu = PTHREAD_MUTEX_INITIALIZER;
static X509_STORE *ca_store;
static struct {
    unsigned char hash[32];
    char region[DM_REGION_CODE_MAX + 1];
} cache[PEER_CACHE];
static size_t cache_n, cache_next;

static X509_STORE *store_locked(const dm_config_t *cfg)
{
    if (ca_store || !cfg->peer_ca_file[0])
        return ca_store;
    X509_STORE *s = X509_STORE_new();
    if (X509_STORE_load_file(s, cfg->peer_ca_file) != 1) {
        X509_STORE_free(s);
        dm_error("peer", "cannot load peer_ca_file \"%s\"", cfg->peer_ca_file);
        return NULL;
    }
    ca_store = s;
    return s;
}

/* The region whose gateway identity the verified certificate names, or "" for none. */
static void region_of_cert(const dm_config_t *cfg, const char *pem, size_t len, char *out,
                           size_t out_len)
{
    out[0] = '\0';
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    X509 *cert = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    if (!cert)
        return;
    X509_STORE *store = store_locked(cfg);
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    bool ok = store && ctx && X509_STORE_CTX_init(ctx, store, cert, NULL) == 1 &&
              X509_verify_cert(ctx) == 1;
    X509_STORE_CTX_free(ctx);
    GENERAL_NAMES *names = ok ? X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL) : NULL;
    for (int i = 0; names && i < sk_GENERAL_NAME_num(names) && !out[0]; i++) {
        const GENERAL_NAME *gn = sk_GENERAL_NAME_value(names, i);
        if (gn->type != GEN_DNS)
            continue;
        const char *dns = (const char *)ASN1_STRING_get0_data(gn->d.dNSName);
        size_t dns_len = (size_t)ASN1_STRING_length(gn->d.dNSName);
        for (size_t r = 0; r < cfg->n_regions; r++) {
            const dm_region_config_t *rc = &cfg->region_cfgs[r];
            if (rc->local || strlen(rc->gateway_identity) != dns_len ||
                memcmp(rc->gateway_identity, dns, dns_len) != 0)
                continue;
            snprintf(out, out_len, "%s", rc->code);
            break;
        }
    }
    GENERAL_NAMES_free(names);
    X509_free(cert);
}

void dm_peer_auth_cleanup(void)
{
    pthread_mutex_lock(&auth_mu);
    X509_STORE_free(ca_store);
    ca_store = NULL;
    cache_n = cache_next = 0;
    pthread_mutex_unlock(&auth_mu);
}

dm_status_t *dm_peer_authenticate(dm_call_t *call, const dm_config_t *cfg, char *region, size_t len)
{
    char *pem = NULL;
    size_t pem_len = 0;
    size_t claim_len = 0;
    const char *claim = dm_call_metadata(call, DM_PEER_REGION_MD, &claim_len);
    if (!dm_call_auth_property(call, "x509_pem_cert", &pem, &pem_len))
        return dm_status_new(GRPC_STATUS_UNAUTHENTICATED,
                             "calls on behalf of a principal are accepted only from a gateway of "
                             "another region (no client certificate)");
    unsigned char hash[32];
    SHA256((const unsigned char *)pem, pem_len, hash);
    char found[DM_REGION_CODE_MAX + 1] = "";
    pthread_mutex_lock(&auth_mu);
    size_t i;
    for (i = 0; i < cache_n; i++)
        if (memcmp(cache[i].hash, hash, 32) == 0)
            break;
    if (i < cache_n) {
        snprintf(found, sizeof(found), "%s", cache[i].region);
    } else {
        region_of_cert(cfg, pem, pem_len, found, sizeof(found));
        if (found[0]) {
            memcpy(cache[cache_next].hash, hash, 32);
            snprintf(cache[cache_next].region, sizeof(cache[0].region), "%s", found);
            cache_next = (cache_next + 1) % PEER_CACHE;
            if (cache_n < PEER_CACHE)
                cache_n++;
        }
    }
    pthread_mutex_unlock(&auth_mu);
    free(pem);
    if (!found[0])
        return dm_status_new(GRPC_STATUS_UNAUTHENTICATED,
                             "the client certificate is not a gateway of another region");
    if (!claim || claim_len != strlen(found) || memcmp(claim, found, claim_len) != 0)
        return dm_status_new(GRPC_STATUS_UNAUTHENTICATED,
                             "the calling gateway's certificate is of region \"%s\", not of the "
                             "region it claims",
                             found);
    snprintf(region, len, "%s", found);
    return NULL;
}

/* ---- the asserted principal ---- */

void dm_peer_principal_free(void *arg)
{
    dm_principal_t *p = arg;
    if (!p)
        return;
    dm_principal_dispose(p);
    free(p->via);
    free(p);
}

dm_status_t *dm_peer_principal(dm_call_t *call, const char *via, dm_principal_t **out,
                               char purpose[DM_PURPOSE_MAX_LEN + 1])
{
    size_t len = 0;
    const char *v = dm_call_metadata(call, DM_PEER_PRINCIPAL_MD, &len);
    if (!v)
        return dm_status_new(GRPC_STATUS_UNAUTHENTICATED,
                             "a gateway's call must assert its principal (%s)",
                             DM_PEER_PRINCIPAL_MD);
    Domicile__Peer__V1__Principal *m =
        domicile__peer__v1__principal__unpack(NULL, len, (const uint8_t *)v);
    if (!m)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "%s: does not decode",
                             DM_PEER_PRINCIPAL_MD);
    dm_status_t *st = NULL;
    dm_principal_t *p = dm_calloc(1, sizeof(*p));
    p->name = dm_strdup(m->name);
    p->region = dm_strdup(m->region);
    p->default_purpose = dm_strdup(m->default_purpose);
    p->via = dm_strdup(via);
    if (!m->name[0] || strlen(m->name) > 64)
        st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "asserted principal: name");
    for (size_t i = 0; i < m->n_roles && !st; i++) {
        unsigned bit;
        if (!dm_role_parse(m->roles[i], &bit))
            st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                               "asserted principal: \"%s\" is not a role", m->roles[i]);
        else
            p->roles |= bit;
    }
    if (!st && m->n_tenants > 10000)
        st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "asserted principal: too many tenants");
    if (!st) {
        p->n_tenants = m->n_tenants;
        p->tenants = dm_calloc(m->n_tenants ? m->n_tenants : 1, sizeof(char *));
        for (size_t i = 0; i < m->n_tenants; i++) {
            p->tenants[i] = dm_strdup(m->tenants[i]);
            p->all_tenants = p->all_tenants || strcmp(m->tenants[i], "*") == 0;
        }
    }
    if (!st && m->purpose[0])
        st = dm_auth_parse_purpose(m->purpose, strlen(m->purpose), purpose);
    else if (!st)
        snprintf(purpose, DM_PURPOSE_MAX_LEN + 1, "%s", p->default_purpose);
    domicile__peer__v1__principal__free_unpacked(m, NULL);
    if (st) {
        dm_peer_principal_free(p);
        return st;
    }
    *out = p;
    return NULL;
}

/* ---- Exec ---- */

/*
 * Statements a gateway of another region may run here. None returns a payload, a data key or
 * a ledger MAC key; none appends to the ledger, runs a data-subject leg or changes a record
 * (those are done by this region's gateways alone, on forwarded calls or by their workers).
 * `maint`: also open to the other gateway's own maintenance (no principal behind it).
 */
static const struct {
    dm_sql_id_t stmt;
    bool maint;
} open_to_peers[] = {
    {DM_SQL_PROBE, true},
    {DM_SQL_CUSTOMER_STATE, true},
    {DM_SQL_LEDGER_LIST, false},
    {DM_SQL_LEDGER_REPORT, false},
    {DM_SQL_LEDGER_HEAD, false},
    {DM_SQL_LEDGER_CHECKPOINT, false},
    {DM_SQL_WITNESS_PUT, true},
    {DM_SQL_WITNESS_GET, true},
    {DM_SQL_DSR_RECEIVE, true},
    {DM_SQL_DSR_RECEIVE_CLAIM, false},
    {DM_SQL_DSR_SET_MISSING, false},
    {DM_SQL_DSR_STATUS, true},
    {DM_SQL_DSR_LIST, false},
    {DM_SQL_DSR_EXTEND, false},
    {DM_SQL_DSR_DROP_MISSING, true},
    {DM_SQL_DSR_WEBHOOK_MARK, true},
    {DM_SQL_DSR_COUNTS, false},
    {DM_SQL_LOCATE, false},
    {DM_SQL_FENCE_PUT, true},
    {DM_SQL_FENCE_LIST, true},
    {DM_SQL_REPLICATION, false},
    /* A restored region's reconciliation (src/restore) and the copies it reads. */
    {DM_SQL_MARK_WITNESS_PUT, true},
    {DM_SQL_DSR_HEADERS, true},
    {DM_SQL_CLOSURE_COPIES, true},
    {DM_SQL_CLOSURE_COPY_PUT, true},
};

typedef struct exec_ctx {
    dm_call_t *call;
    dm_app_t *app;
    dm_region_t *region;
    dm_job_t job;
    char *values[DM_JOB_MAX_PARAMS];
    char me[128];
} exec_ctx_t;

static void exec_free(void *arg)
{
    exec_ctx_t *x = arg;
    for (int i = 0; i < DM_JOB_MAX_PARAMS; i++)
        free(x->values[i]);
    free(x);
}

static dm_region_t *own_region(dm_app_t *app)
{
    for (size_t i = 0; i < dm_regions_count(app->regions); i++)
        if (dm_region_is_local(dm_regions_at(app->regions, i)))
            return dm_regions_at(app->regions, i);
    return NULL;
}

static void exec_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    exec_ctx_t *x = job->arg;
    if (err) {
        dm_call_finish(x->call, err);
        return;
    }
    int nf = PQnfields(res), nt = PQntuples(res);
    Domicile__Peer__V1__ExecResponse r = DOMICILE__PEER__V1__EXEC_RESPONSE__INIT;
    Domicile__Peer__V1__ExecColumn *cols = dm_calloc((size_t)nf + 1, sizeof(*cols));
    Domicile__Peer__V1__ExecColumn **colp = dm_calloc((size_t)nf + 1, sizeof(*colp));
    Domicile__Peer__V1__ExecRow *rows = dm_calloc((size_t)nt + 1, sizeof(*rows));
    Domicile__Peer__V1__ExecRow **rowp = dm_calloc((size_t)nt + 1, sizeof(*rowp));
    Domicile__Peer__V1__ExecValue *vals = dm_calloc((size_t)nt * (size_t)nf + 1, sizeof(*vals));
    Domicile__Peer__V1__ExecValue **valp = dm_calloc((size_t)nt * (size_t)nf + 1, sizeof(*valp));
    for (int c = 0; c < nf; c++) {
        domicile__peer__v1__exec_column__init(&cols[c]);
        cols[c].name = PQfname(res, c);
        cols[c].type_oid = PQftype(res, c);
        cols[c].format = PQfformat(res, c);
        cols[c].type_len = PQfsize(res, c);
        cols[c].type_mod = PQfmod(res, c);
        colp[c] = &cols[c];
    }
    for (int t = 0; t < nt; t++) {
        domicile__peer__v1__exec_row__init(&rows[t]);
        rows[t].n_values = (size_t)nf;
        rows[t].values = &valp[(size_t)t * (size_t)nf];
        for (int c = 0; c < nf; c++) {
            Domicile__Peer__V1__ExecValue *v = &vals[(size_t)t * (size_t)nf + (size_t)c];
            domicile__peer__v1__exec_value__init(v);
            v->is_null = PQgetisnull(res, t, c);
            if (!v->is_null) {
                v->data.data = (uint8_t *)PQgetvalue(res, t, c);
                v->data.len = (size_t)PQgetlength(res, t, c);
            }
            valp[(size_t)t * (size_t)nf + (size_t)c] = v;
        }
        rowp[t] = &rows[t];
    }
    r.n_columns = (size_t)nf;
    r.columns = colp;
    r.n_rows = (size_t)nt;
    r.rows = rowp;
    /* A leg this gateway claimed as it stored the request runs here at once, as it would
     * have on the caller's gateway before regions were sovereign. */
    if (x->job.stmt == DM_SQL_DSR_RECEIVE_CLAIM && nt == 1 && nf > DM_DC__COUNT) {
        const char *s = PQgetvalue(res, 0, DM_DC__COUNT); /* the store's status */
        if (strcmp(s, "created") == 0) {
            dm_region_t *stored[1] = {x->region};
            bool claimed[1] = {true};
            dm_dsr_run_now(&x->app->dsr, x->values[0], x->values[1], stored, claimed, 1);
        }
    }
    /* A fence (or a lift) a peer records here is in force here at once. */
    if (x->job.stmt == DM_SQL_FENCE_PUT && x->values[0] && x->values[5]) {
        dm_region_t *fr = dm_regions_find(x->app->regions, x->values[0]);
        if (fr) {
            dm_fence_t row;
            memset(&row, 0, sizeof(row));
            snprintf(row.reason, sizeof(row.reason), "%s", x->values[1] ? x->values[1] : "");
            snprintf(row.by, sizeof(row.by), "%s", x->values[2] ? x->values[2] : "");
            row.at_ms = x->values[3] ? strtoll(x->values[3], NULL, 10) : 0;
            row.lifted = x->values[4] && x->values[4][0] == 't';
            row.version = strtoll(x->values[5], NULL, 10);
            dm_region_fence_seen(fr, (int)dm_app_region_index(x->app, x->region), &row);
        }
    }
    dm_call_reply(x->call, &r.base);
    free(cols);
    free(colp);
    free(rows);
    free(rowp);
    free(vals);
    free(valp);
}

void dm_peer_exec(dm_call_t *call)
{
    const Domicile__Peer__V1__ExecRequest *req =
        (const Domicile__Peer__V1__ExecRequest *)dm_call_request(call);
    dm_app_t *app = dm_call_app(call);
    const dm_principal_t *p = dm_call_principal(call);
    int id = -1;
    for (int i = 0; i < DM_SQL__COUNT; i++)
        if (strcmp(dm_sql[i].name, req->statement) == 0)
            id = i;
    size_t k;
    for (k = 0; id >= 0 && k < DM_ARRAY_LEN(open_to_peers); k++)
        if ((int)open_to_peers[k].stmt == id)
            break;
    if (id < 0 || k == DM_ARRAY_LEN(open_to_peers)) {
        dm_call_finish(call, dm_status_new(GRPC_STATUS_PERMISSION_DENIED,
                                           "statement \"%.64s\" is not open to other regions",
                                           req->statement));
        return;
    }
    if (req->method[0]) {
        /* The principal must be one that may call the method the statement serves. */
        size_t n = 0;
        const dm_method_t *methods = dm_api_methods(&n), *m = NULL;
        for (size_t i = 0; i < n; i++)
            if (strcmp(methods[i].path, req->method) == 0)
                m = &methods[i];
        if (!m || m->roles == DM_ROLES_PUBLIC || !p || !(p->roles & m->roles)) {
            dm_call_finish(call, dm_status_new(GRPC_STATUS_PERMISSION_DENIED,
                                               "%.128s: the asserted principal may not call it",
                                               req->method));
            return;
        }
    } else if (!open_to_peers[k].maint) {
        dm_call_finish(call,
                       dm_status_new(GRPC_STATUS_PERMISSION_DENIED,
                                     "statement \"%s\" needs a principal's call", req->statement));
        return;
    }
    if (req->n_params > DM_JOB_MAX_PARAMS) {
        dm_call_finish(call, dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "params: at most %d",
                                           DM_JOB_MAX_PARAMS));
        return;
    }
    dm_region_t *own = own_region(app);
    exec_ctx_t *x = dm_calloc(1, sizeof(*x));
    x->call = call;
    x->app = app;
    x->region = own;
    dm_call_set_data(call, x, exec_free);
    dm_call_set_region(call, dm_region_code(own));
    x->job.stmt = (dm_sql_id_t)id;
    x->job.done = exec_done;
    x->job.arg = x;
    x->job.owner = call;
    for (size_t i = 0; i < req->n_params; i++) {
        const Domicile__Peer__V1__ExecParam *pp = req->params[i];
        if (pp->is_null) {
            dm_job_param_text(&x->job, (int)i, NULL);
            continue;
        }
        x->values[i] = dm_malloc(pp->value.len + 1);
        if (pp->value.len)
            memcpy(x->values[i], pp->value.data, pp->value.len);
        x->values[i][pp->value.len] = '\0';
        if (pp->binary)
            dm_job_param_bin(&x->job, (int)i, x->values[i], (int)pp->value.len);
        else
            dm_job_param_text(&x->job, (int)i, x->values[i]);
    }
    /* A leg is claimed by a worker of this region, never by the calling gateway's. */
    if (id == DM_SQL_DSR_RECEIVE_CLAIM && req->n_params > 13)
        dm_job_param_text(&x->job, 13, app->dsr.me);
    dm_region_submit(own, &x->job);
}
