/*
 * A data-subject request as every region describes it (src/dsr/view.c): the DSR_STATUS rows of
 * a fan-out made into one domicile.v1.DsrRequest. Used by the SubjectRightsService handlers and
 * by the webhook thread.
 */
#ifndef DOMICILE_DSR_VIEW_H
#define DOMICILE_DSR_VIEW_H

#include <stdint.h>

#include "domicile/fanout.h"
#include "domicile/region.h"

#include "domicile/v1/subject_rights.pb-c.h"

/** Number of request kinds (DsrKind values, UNSPECIFIED included). */
#define DM_DSR_KINDS (DOMICILE__V1__DSR_KIND__DSR_KIND_WITHDRAW + 1)
/** Kind -> its name as stored ("erase", ...); NULL for UNSPECIFIED. */
extern const char *const dm_dsr_kind_names[DM_DSR_KINDS];

typedef struct dm_dsr_leg_view {
    Domicile__V1__DsrLeg leg;
    Domicile__V1__Receipt receipt;
    char receipt_hex[65];
} dm_dsr_leg_view_t;

/** A request's view; its strings point into the results it was built from. */
typedef struct dm_dsr_view {
    Domicile__V1__DsrRequest req; /* first: a view is freed through &req */
    Domicile__V1__WebhookDelivery webhook;
    dm_dsr_leg_view_t legs[DM_MAX_REGIONS];
    Domicile__V1__DsrLeg *legp[DM_MAX_REGIONS];
    char sk_hex[65];
    int64_t effective_due;
} dm_dsr_view_t;

/** An empty view of a request in the `n` regions of `regions` (every leg pending). */
void dm_dsr_view_init(dm_dsr_view_t *v, size_t n, dm_regions_t *regions);
/** Fill the header from a DSR_COLUMNS row (pointers into `res`). */
void dm_dsr_view_header(dm_dsr_view_t *v, const PGresult *res, int row);
/** Fill a leg from its region's DSR_COLUMNS row (pointers into `res`). */
void dm_dsr_view_leg(dm_dsr_leg_view_t *l, const PGresult *res, int row);
/** Overall state, completion, overdue; legs in region code order. */
void dm_dsr_view_summarise(dm_dsr_view_t *v, size_t n);

/**
 * Build the request's view from a fan-out of DM_SQL_DSR_STATUS. NULL status: *v is filled;
 * else NOT_FOUND, or UNAVAILABLE when a region that did not answer might hold it.
 */
dm_status_t *dm_dsr_view_fill(dm_dsr_view_t *v, dm_fanout_t *f, dm_regions_t *regions);

/**
 * The same as a new view: *out (free with dm_dsr_view_free; it points into f's results, so
 * free it before f); *webhook_attempts the notify region's count.
 */
dm_status_t *dm_dsr_view(dm_fanout_t *f, dm_regions_t *regions, Domicile__V1__DsrRequest **out,
                         int *webhook_attempts);
void dm_dsr_view_free(Domicile__V1__DsrRequest *q);

#endif
