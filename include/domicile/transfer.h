/*
 * The transfer gate (src/transfer/gate.c) every data-moving call passes once its customer's
 * region is known: the policy's decision for the call's route and purpose (DESIGN.md §5), and
 * the ledger entry of the transfer, committed in the data's region before the data leaves.
 *
 * Thread-safety: any thread; callbacks run on an executor thread, or on the calling thread.
 */
#ifndef DOMICILE_TRANSFER_H
#define DOMICILE_TRANSFER_H

#include <stdbool.h>
#include <stdint.h>

#include "domicile/ledger.h"
#include "domicile/region.h"
#include "domicile/server.h"

#define DM_XFER_ID_LEN 129

/** A call's transfer, filled by the caller (dir, method, customer, subject, record id, request
 * id) and by dm_xfer_gate() (the rest). Lives in the call's context. */
typedef struct dm_xfer {
    dm_transfer_dir_t dir;
    const char *method;
    const char *customer_id;
    const unsigned char *subject_key; /* NULL: none */
    const char *record_id;            /* the one record the call names, else NULL */
    char request_id[DM_XFER_ID_LEN];
    /* set by the gate */
    dm_region_t *region;
    bool cross;  /* dm_xfer_log() is due: `direct`, or a transit through a third region */
    bool direct; /* the principal's region is not the data's: from -> to under `basis` */
    const char *from, *to;
    const dm_basis_t *basis;
    /* A call a peer gateway forwarded from a region V that is neither the data's nor the
     * principal's: the plaintext passes through V's gateway, a transfer of its own
     * (read: region -> V; write: principal's region -> V) under `via_basis`. */
    const char *via, *via_from;
    const dm_basis_t *via_basis;
} dm_xfer_t;

typedef void (*dm_xfer_fn)(void *arg, dm_status_t *err);

/** The call's request id for the ledger: `given`, else x-request-id metadata, else generated. */
void dm_xfer_request_id(dm_call_t *call, const char *given, char out[DM_XFER_ID_LEN]);
/**
 * Decide whether the call may move data of `region` (DESIGN.md §5). `fn` gets NULL to go on
 * (x->cross tells whether dm_xfer_log() is due) or PERMISSION_DENIED; a refused cross-border
 * transfer is logged in the region's ledger before `fn` runs, with the record the call names
 * (x->record_id: count 1 and its id) or none (count 0).
 */
void dm_xfer_gate(dm_call_t *call, dm_region_t *region, dm_xfer_t *x, dm_xfer_fn fn, void *arg);
/** Log an allowed cross-border transfer (and its transit through a third region, if any: two
 * entries, same request id); `done` runs once both are committed (or one failed). */
void dm_xfer_log(dm_call_t *call, const dm_xfer_t *x, int64_t records, int64_t bytes,
                 const char *record_ids, dm_ledger_done_fn done, void *arg);

#endif
