/*
 * One statement run in every region at once; the callback sees every region's result (or
 * error) together. Used where an answer needs all regions: data-subject requests, Locate.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "domicile/fanout.h"
#include "domicile/mem.h"

struct fanout_job {
    dm_job_t job;
    dm_fanout_t *f;
    size_t i;
};

struct dm_fanout_priv {
    atomic_int pending;
    dm_fanout_each_fn each;
    dm_fanout_fn done;
    void *arg;
    char *values[DM_JOB_MAX_PARAMS];
    struct fanout_job jobs[DM_MAX_REGIONS];
};

static void fanout_job_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    struct fanout_job *fj = job->arg;
    dm_fanout_t *f = fj->f;
    if (err)
        f->err[fj->i] = err;
    else
        f->res[fj->i] = PQcopyResult(res, PG_COPYRES_ATTRS | PG_COPYRES_TUPLES);
    if (f->priv->each)
        f->priv->each(f, fj->i, f->priv->arg);
    if (atomic_fetch_sub(&f->priv->pending, 1) == 1)
        f->priv->done(f, f->priv->arg);
}

void dm_fanout_start(void *owner, dm_regions_t *regions, dm_sql_id_t stmt, int n,
                     const char *const *values, const int *lengths, const int *formats,
                     dm_fanout_fn done, void *arg)
{
    dm_fanout_start_each(owner, regions, stmt, n, values, lengths, formats, NULL, done, arg);
}

void dm_fanout_start_each(void *owner, dm_regions_t *regions, dm_sql_id_t stmt, int n,
                          const char *const *values, const int *lengths, const int *formats,
                          dm_fanout_each_fn each, dm_fanout_fn done, void *arg)
{
    dm_fanout_t *f = dm_calloc(1, sizeof(*f));
    f->priv = dm_calloc(1, sizeof(*f->priv));
    f->n = dm_regions_count(regions);
    f->priv->each = each;
    f->priv->done = done;
    f->priv->arg = arg;
    for (int k = 0; k < n; k++) {
        if (!values[k])
            continue;
        size_t len = formats && formats[k] ? (size_t)lengths[k] : strlen(values[k]);
        f->priv->values[k] = dm_malloc(len + 1);
        memcpy(f->priv->values[k], values[k], len);
        f->priv->values[k][len] = '\0';
    }
    /* One extra count while submitting: a region failing at once must not run `done`
     * before the others are queued. */
    atomic_init(&f->priv->pending, (int)f->n + 1);
    for (size_t i = 0; i < f->n; i++) {
        struct fanout_job *fj = &f->priv->jobs[i];
        f->region[i] = dm_regions_at(regions, i);
        fj->f = f;
        fj->i = i;
        fj->job.stmt = stmt;
        fj->job.done = fanout_job_done;
        fj->job.arg = fj;
        fj->job.owner = owner;
        for (int k = 0; k < n; k++) {
            if (formats && formats[k])
                dm_job_param_bin(&fj->job, k, f->priv->values[k], lengths[k]);
            else
                dm_job_param_text(&fj->job, k, f->priv->values[k]);
        }
    }
    for (size_t i = 0; i < f->n; i++)
        dm_region_submit(f->region[i], &f->priv->jobs[i].job);
    if (atomic_fetch_sub(&f->priv->pending, 1) == 1)
        done(f, arg);
}

void dm_fanout_free(dm_fanout_t *f)
{
    if (!f)
        return;
    for (size_t i = 0; i < f->n; i++) {
        PQclear(f->res[i]);
        dm_status_free(f->err[i]);
    }
    for (int k = 0; k < DM_JOB_MAX_PARAMS; k++)
        free(f->priv->values[k]);
    free(f->priv);
    free(f);
}
