/*
 * Completion webhooks of data-subject requests. The workers of a request's notify region
 * hand due requests here; this thread (never a completion-queue thread) reads the request
 * from every region, and once every leg is done POSTs a JSON summary with
 *     X-Domicile-Timestamp: <unix seconds>
 *     X-Domicile-Signature: sha256=<hex HMAC-SHA256(secret, timestamp "." body)>
 * to the URL configured for the request's customer (customer_webhooks_file, each with its own
 * secret) or else to webhook_url, with libcurl. Failures are retried with backoff (the state
 * lives in the notify region's copy of the request, so another gateway or a restart carries
 * on).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <jansson.h>
#include <libconfig.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "domicile/v1/subject_rights.pb-c.h"

#include "domicile/clock.h"
#include "domicile/crypto.h"
#include "domicile/log.h"
#include "domicile/validate.h"
#include "domicile/dsr.h"
#include "domicile/dsr_view.h"
#include "domicile/fanout.h"

#define QUEUE_MAX   256
#define NOT_DONE_MS 2000
#define BACKOFF_MAX 600000
#define TARGETS_MAX 100000 /* customer webhooks in customer_webhooks_file */
#define SECRET_MAX  1024

/* Where a request's summary goes: a customer's own receiver, or the global one (""). */
typedef struct target {
    char customer[DM_CUSTOMER_ID_MAX + 1];
    char *url;
    unsigned char *secret;
    size_t secret_len;
    int line; /* of its entry in customer_webhooks_file (error messages) */
} target_t;

typedef struct item {
    char id[DM_REQUEST_ID_MAX + 1];
    size_t region;
} item_t;

struct dm_webhooks {
    const dm_config_t *cfg;
    dm_regions_t *regions;
    target_t global;   /* url NULL: none */
    target_t *targets; /* per customer, sorted by customer id */
    size_t n_targets;
    pthread_t thread;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    item_t q[QUEUE_MAX];
    size_t head, len;
    bool stopping;
    /* the fan-out answer the thread waits for */
    dm_fanout_t *answer;
    /* Metrics (under mu): attempts by outcome, and per receiver (targets in order, then the
     * global one) the first failure since its last delivery, 0 while it delivers. */
    int64_t delivered, failed;
    int64_t *failing_since_ms;
};

bool dm_webhooks_enqueue(dm_webhooks_t *w, const char *request_id, size_t region)
{
    if (!w)
        return false;
    pthread_mutex_lock(&w->mu);
    bool queued = false;
    for (size_t i = 0; i < w->len; i++) /* already waiting: once is enough */
        if (strcmp(w->q[(w->head + i) % QUEUE_MAX].id, request_id) == 0)
            queued = true;
    if (!queued && w->len < QUEUE_MAX && !w->stopping) {
        item_t *it = &w->q[(w->head + w->len) % QUEUE_MAX];
        snprintf(it->id, sizeof(it->id), "%s", request_id);
        it->region = region;
        w->len++;
        queued = true;
        pthread_cond_signal(&w->cond);
    }
    pthread_mutex_unlock(&w->mu);
    return queued;
}

static void got_answer(dm_fanout_t *f, void *arg)
{
    dm_webhooks_t *w = arg;
    pthread_mutex_lock(&w->mu);
    w->answer = f;
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mu);
}

/* Run one statement everywhere and wait for it (this thread may block). */
static dm_fanout_t *fanout_wait(dm_webhooks_t *w, dm_sql_id_t stmt, int n, const char *const *v)
{
    dm_fanout_start(NULL, w->regions, stmt, n, v, NULL, NULL, got_answer, w);
    pthread_mutex_lock(&w->mu);
    while (!w->answer)
        pthread_cond_wait(&w->cond, &w->mu);
    dm_fanout_t *f = w->answer;
    w->answer = NULL;
    pthread_mutex_unlock(&w->mu);
    return f;
}

static void mark(dm_webhooks_t *w, const item_t *it, const char *state, const char *error,
                 int64_t delay_ms, bool attempted)
{
    char delay[24];
    snprintf(delay, sizeof(delay), "%lld", (long long)delay_ms);
    const char *vals[5] = {it->id, state, error, delay, attempted ? "true" : "false"};
    /* Only the notify region's copy matters; writing it everywhere is harmless and simple. */
    dm_fanout_free(fanout_wait(w, DM_SQL_DSR_WEBHOOK_MARK, 5, vals));
}

static size_t discard(char *p, size_t size, size_t n, void *arg)
{
    return size * n;
}

static int cmp_target(const void *a, const void *b)
{
    return strcmp(((const target_t *)a)->customer, ((const target_t *)b)->customer);
}

static const target_t *target_of(const dm_webhooks_t *w, const char *customer)
{
    if (customer && customer[0] && w->n_targets) {
        target_t key;
        snprintf(key.customer, sizeof(key.customer), "%s", customer);
        const target_t *t = bsearch(&key, w->targets, w->n_targets, sizeof(target_t), cmp_target);
        if (t)
            return t;
    }
    return w->global.url ? &w->global : NULL;
}

bool dm_webhooks_apply(const dm_webhooks_t *w, const char *customer)
{
    return w && target_of(w, customer) != NULL;
}

/* POST body to t; 0 on a 2xx answer, else a short reason in err. */
static int post(dm_webhooks_t *w, const target_t *t, const char *body, char *err, size_t err_len)
{
    char ts[24], sig[65], hdr_ts[64], hdr_sig[128];
    unsigned char mac[32];
    snprintf(ts, sizeof(ts), "%lld", (long long)(dm_now_ms() / 1000));
    char *signed_text = dm_sprintf("%s.%s", ts, body);
    dm_hmac_sha256(t->secret, t->secret_len, (const unsigned char *)signed_text,
                   strlen(signed_text), mac);
    free(signed_text);
    dm_hex_encode(mac, 32, sig);
    snprintf(hdr_ts, sizeof(hdr_ts), "X-Domicile-Timestamp: %s", ts);
    snprintf(hdr_sig, sizeof(hdr_sig), "X-Domicile-Signature: sha256=%s", sig);

    CURL *curl = curl_easy_init();
    struct curl_slist *h = NULL;
    h = curl_slist_append(h, "Content-Type: application/json");
    h = curl_slist_append(h, hdr_ts);
    h = curl_slist_append(h, hdr_sig);
    curl_easy_setopt(curl, CURLOPT_URL, t->url);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, (long)w->cfg->webhook_timeout_ms);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
    CURLcode rc = curl_easy_perform(curl);
    long status = 0;
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(h);
    curl_easy_cleanup(curl);
    if (rc != CURLE_OK) {
        snprintf(err, err_len, "%s", curl_easy_strerror(rc));
        return -1;
    }
    if (status < 200 || status > 299) {
        snprintf(err, err_len, "receiver answered HTTP %ld", status);
        return -1;
    }
    return 0;
}

static char *summary_json(const Domicile__V1__DsrRequest *q)
{
    json_t *o = json_object(), *legs = json_array();
    json_object_set_new(o, "request_id", json_string(q->request_id));
    const ProtobufCEnumValue *k =
        protobuf_c_enum_descriptor_get_value(&domicile__v1__dsr_kind__descriptor, q->kind);
    json_object_set_new(o, "kind", json_string(k ? k->name : "?"));
    json_object_set_new(o, "state", json_string("DSR_STATE_DONE"));
    json_object_set_new(o, "subject_key_hex", json_string(q->subject_key_hex));
    json_object_set_new(o, "customer_id", json_string(q->customer_id));
    json_object_set_new(o, "received_at_unix_ms", json_integer(q->received_at_unix_ms));
    json_object_set_new(o, "completed_at_unix_ms", json_integer(q->completed_at_unix_ms));
    for (size_t i = 0; i < q->n_legs; i++) {
        const Domicile__V1__DsrLeg *l = q->legs[i];
        json_t *lj = json_object();
        const ProtobufCEnumValue *s = protobuf_c_enum_descriptor_get_value(
            &domicile__v1__dsr_leg_state__descriptor, l->state);
        json_object_set_new(lj, "region", json_string(l->region));
        json_object_set_new(lj, "state", json_string(s ? s->name : "?"));
        if (l->receipt) {
            json_object_set_new(lj, "records_deleted", json_integer(l->receipt->records_deleted));
            json_object_set_new(lj, "keys_destroyed", json_integer(l->receipt->keys_destroyed));
            json_object_set_new(lj, "receipt_sha256_hex",
                                json_string(l->receipt->receipt_sha256_hex));
        }
        json_array_append_new(legs, lj);
    }
    json_object_set_new(o, "legs", legs);
    char *out = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    return out;
}

static void note_outcome(dm_webhooks_t *w, const target_t *t, bool delivered)
{
    size_t i = t == &w->global ? w->n_targets : (size_t)(t - w->targets);
    pthread_mutex_lock(&w->mu);
    if (delivered) {
        w->delivered++;
        w->failing_since_ms[i] = 0;
    } else {
        w->failed++;
        if (!w->failing_since_ms[i])
            w->failing_since_ms[i] = dm_now_ms();
    }
    pthread_mutex_unlock(&w->mu);
}

void dm_webhooks_stats(dm_webhooks_t *w, dm_webhook_stats_t *out)
{
    memset(out, 0, sizeof(*out));
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    out->delivered = w->delivered;
    out->failed = w->failed;
    for (size_t i = 0; i <= w->n_targets; i++) {
        int64_t since = w->failing_since_ms[i];
        if (!since)
            continue;
        out->failing_receivers++;
        if (!out->failing_since_ms || since < out->failing_since_ms)
            out->failing_since_ms = since;
    }
    pthread_mutex_unlock(&w->mu);
}

static void deliver(dm_webhooks_t *w, const item_t *it)
{
    const char *vals[1] = {it->id};
    dm_fanout_t *f = fanout_wait(w, DM_SQL_DSR_STATUS, 1, vals);
    Domicile__V1__DsrRequest *q = NULL;
    int attempts = 0;
    dm_status_t *st = dm_dsr_view(f, w->regions, &q, &attempts);
    if (st || q->state != DOMICILE__V1__DSR_STATE__DSR_STATE_DONE) {
        /* Not done (or a region not answering): look again shortly, not an attempt. */
        dm_status_free(st);
        dm_dsr_view_free(q);
        dm_fanout_free(f);
        mark(w, it, "pending", "", NOT_DONE_MS, false);
        return;
    }
    const target_t *t = target_of(w, q->customer_id);
    if (!t) {
        /* The configuration changed since the request was received. */
        dm_warn("dsr", "no webhook configured for request %s any more; not sent", it->id);
        dm_dsr_view_free(q);
        dm_fanout_free(f);
        mark(w, it, "none", "no webhook configured for this request's customer", 0, false);
        return;
    }
    char *body = summary_json(q);
    dm_dsr_view_free(q);
    dm_fanout_free(f);
    char err[256] = "";
    bool ok = post(w, t, body, err, sizeof(err)) == 0;
    if (ok) {
        dm_info("dsr", "webhook for request %s delivered", it->id);
        mark(w, it, "delivered", "", 0, true);
    } else {
        int64_t backoff = 1000LL << (attempts < 9 ? attempts : 9);
        if (backoff > BACKOFF_MAX)
            backoff = BACKOFF_MAX;
        dm_warn("dsr", "webhook for request %s failed (attempt %d, retry in %lld ms): %s", it->id,
                attempts + 1, (long long)backoff, err);
        mark(w, it, "failed", err, backoff, true);
    }
    note_outcome(w, t, ok);
    free(body);
}

static void *webhook_main(void *arg)
{
    dm_webhooks_t *w = arg;
    for (;;) {
        pthread_mutex_lock(&w->mu);
        while (!w->stopping && w->len == 0)
            pthread_cond_wait(&w->cond, &w->mu);
        if (w->stopping) {
            pthread_mutex_unlock(&w->mu);
            break;
        }
        item_t it = w->q[w->head];
        w->head = (w->head + 1) % QUEUE_MAX;
        w->len--;
        pthread_mutex_unlock(&w->mu);
        deliver(w, &it);
    }
    return NULL;
}

static void target_clear(target_t *t)
{
    free(t->url);
    if (t->secret) {
        OPENSSL_cleanse(t->secret, t->secret_len);
        free(t->secret);
    }
    memset(t, 0, sizeof(*t));
}

static void webhooks_free(dm_webhooks_t *w)
{
    target_clear(&w->global);
    for (size_t i = 0; i < w->n_targets; i++)
        target_clear(&w->targets[i]);
    free(w->targets);
    free(w->failing_since_ms);
    free(w);
}

static bool url_ok(const char *url)
{
    size_t n = strlen(url);
    return n <= 2048 && ((n > 7 && strncmp(url, "http://", 7) == 0) ||
                         (n > 8 && strncmp(url, "https://", 8) == 0));
}

/*
 * customer_webhooks_file (libconfig):
 *     webhooks = ( { customer = "acme"; url = "https://hooks.acme.example/dsr";
 *                    secret_file = "acme.webhook-secret"; } );
 * secret_file relative to the file's directory, 0600 like every secret.
 */
static dm_status_t *load_targets(dm_webhooks_t *w, const char *path)
{
    static const char *const roots[] = {"webhooks"};
    static const char *const known[] = {"customer", "url", "secret_file"};
    config_t cf;
    config_setting_t *list;
    dm_status_t *st = dm_config_read_file(path, &cf, "webhooks");
    if (st)
        return st;
    config_setting_t *root = config_root_setting(&cf);
    if ((st = dm_config_check_group(path, root, NULL, roots, DM_ARRAY_LEN(roots))) ||
        (st = dm_config_member_groups(path, root, "webhooks", 0, TARGETS_MAX, known,
                                      DM_ARRAY_LEN(known), &list)))
        goto out;
    int n = config_setting_length(list);
    const char *slash = strrchr(path, '/');
    char *dir = slash ? dm_strndup(path, (size_t)(slash - path) + 1) : dm_strdup("");
    w->targets = dm_calloc(n ? (size_t)n : 1, sizeof(target_t));
    for (int i = 0; i < n && !st; i++) {
        config_setting_t *e = config_setting_get_elem(list, (unsigned)i);
        const char *customer, *url, *secret;
        if ((st = dm_config_member_string(path, e, "customer", true, &customer)) ||
            (st = dm_config_member_string(path, e, "url", true, &url)) ||
            (st = dm_config_member_string(path, e, "secret_file", true, &secret)))
            break;
        dm_status_t *bad = dm_check_customer_id("customer", customer);
        if (bad) {
            dm_status_free(bad);
            st = dm_config_setting_error(path, config_setting_get_member(e, "customer"), "customer",
                                         "\"%s\" is not a customer id", customer);
            break;
        }
        if (!url_ok(url)) {
            st = dm_config_setting_error(path, config_setting_get_member(e, "url"), "url",
                                         "must be http:// or https://..., at most 2048 bytes");
            break;
        }
        if (!*secret) {
            st = dm_config_setting_error(path, config_setting_get_member(e, "secret_file"),
                                         "secret_file", "must name a file");
            break;
        }
        target_t *t = &w->targets[w->n_targets++];
        snprintf(t->customer, sizeof(t->customer), "%s", customer);
        t->url = dm_strdup(url);
        char *sp = secret[0] == '/' ? dm_strdup(secret) : dm_sprintf("%s%s", dir, secret);
        bad = dm_config_read_secret(sp, SECRET_MAX, &t->secret, &t->secret_len);
        free(sp);
        if (bad) {
            st = dm_config_setting_error(path, config_setting_get_member(e, "secret_file"),
                                         "secret_file", "%s", bad->message);
            dm_status_free(bad);
        }
        t->line = (int)config_setting_source_line(config_setting_get_member(e, "customer"));
    }
    free(dir);
    if (!st && w->n_targets > 1) {
        /* Sorted for bsearch; a customer listed twice ends up next to itself. */
        qsort(w->targets, w->n_targets, sizeof(target_t), cmp_target);
        for (size_t i = 1; i < w->n_targets && !st; i++) {
            const target_t *a = &w->targets[i - 1], *b = &w->targets[i];
            if (strcmp(a->customer, b->customer) == 0)
                st = dm_config_error(path, a->line > b->line ? a->line : b->line, "customer",
                                     "\"%s\" has two webhooks (the other at line %d)", b->customer,
                                     a->line < b->line ? a->line : b->line);
        }
    }
out:
    config_destroy(&cf);
    return st;
}

dm_status_t *dm_webhooks_check(const dm_config_t *cfg, size_t *n_customers)
{
    *n_customers = 0;
    if (!cfg->customer_webhooks_file[0])
        return NULL;
    dm_webhooks_t *w = dm_calloc(1, sizeof(*w));
    dm_status_t *st = load_targets(w, cfg->customer_webhooks_file);
    *n_customers = w->n_targets;
    webhooks_free(w);
    return st;
}

dm_status_t *dm_webhooks_create(const dm_config_t *cfg, dm_regions_t *regions, dm_webhooks_t **out)
{
    *out = NULL;
    if (!cfg->webhook_url[0] && !cfg->customer_webhooks_file[0])
        return NULL;
    dm_webhooks_t *w = dm_calloc(1, sizeof(*w));
    w->cfg = cfg;
    w->regions = regions;
    dm_status_t *st = NULL;
    if (cfg->webhook_url[0]) {
        w->global.url = dm_strdup(cfg->webhook_url);
        st = dm_config_read_secret(cfg->webhook_secret_file, SECRET_MAX, &w->global.secret,
                                   &w->global.secret_len);
    }
    if (!st && cfg->customer_webhooks_file[0])
        st = load_targets(w, cfg->customer_webhooks_file);
    if (st) {
        webhooks_free(w);
        return st;
    }
    if (w->n_targets)
        dm_info("dsr", "webhooks: %zu customers with their own receiver%s", w->n_targets,
                w->global.url ? ", the global one for the others" : "");
    w->failing_since_ms = dm_calloc(w->n_targets + 1, sizeof(int64_t));
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cond, NULL);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (pthread_create(&w->thread, NULL, webhook_main, w) != 0)
        abort();
    w->started = true;
    *out = w;
    return NULL;
}

void dm_webhooks_stop(dm_webhooks_t *w)
{
    if (!w || !w->started)
        return;
    pthread_mutex_lock(&w->mu);
    w->stopping = true;
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    w->started = false;
}

void dm_webhooks_destroy(dm_webhooks_t *w)
{
    if (!w)
        return;
    dm_webhooks_stop(w);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cond);
    curl_global_cleanup();
    webhooks_free(w);
}
