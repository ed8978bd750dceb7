/*
 * A region restored from a backup: found, held, reconciled, released (src/restore/README.md).
 *
 * The own region's gateways find that their region went back in time — a restore record in
 * its database (written by the restore tool before any gateway can connect), or its
 * high-water mark lower than the mark another region witnessed — and hold it
 * (dm_region_hold: its calls fail UNAVAILABLE naming the restore). Reconciliation then reads
 * the other regions' copies (data-subject request headers, closures, the ledger head and the
 * mark they witnessed), re-applies in this region every request and closure the restore
 * undid, records the cut in the ledger (a signed restore cut, so VerifyLedger verifies across
 * it and names it), raises the mark above what was witnessed, stores a report, and releases
 * the region. Everything runs in the own region's maintenance task.
 */
#ifndef DOMICILE_RESTORE_H
#define DOMICILE_RESTORE_H

#include <stdbool.h>
#include <stddef.h>

#include "domicile/region.h"

typedef struct dm_restore dm_restore_t;

/**
 * Create the restore watch of the own region `own` of `regions`. `ledger_key` (32 bytes, the
 * own region's; must outlive it) signs the ledger's restore cut; `me` names this gateway in
 * leases and in the report (copied). Never fails; free with dm_restore_destroy().
 */
dm_restore_t *dm_restore_create(dm_regions_t *regions, dm_region_t *own,
                                const unsigned char *ledger_key, const char *me);
/** Free it once the regions have stopped (no maintenance task runs any more). */
void dm_restore_destroy(dm_restore_t *rst);
/**
 * The maintenance task's part (region `r`'s executor `x`; only the own region does
 * anything): exchange high-water marks with the other regions, find a restore, reconcile.
 * Returns true while the region is held: the ledger's sealer must then wait (links sealed
 * on the restored chain before the cut is recorded would collide with the witnessed ones).
 */
bool dm_restore_idle(dm_restore_t *rst, dm_region_t *r, dm_exec_t *x);

#endif
