#include <arpa/inet.h>
#include <string.h>

#include "domicile/sql.h"

#define RECORD_COLUMNS                                                                             \
    "r.record_id, r.kind, r.subject_key, r.content_type, r.labels, r.version, r.restricted, "      \
    "r.created_at, r.updated_at, r.payload_size, r.key_id"

#define LEDGER_COLUMNS                                                                             \
    "l.entry_uuid, l.at, l.request_id, l.principal, l.method, l.customer_id, l.subject_key, "      \
    "l.record_count, l.bytes, l.from_region, l.to_region, l.direction, l.purpose, l.basis_id, "    \
    "l.outcome, l.refusal_reason, l.record_ids, l.entry_mac, l.entry_id"
#define MS(p) "(timestamptz 'epoch' + " p "::bigint * interval '1 millisecond')"
/* The subject objected to this purpose ($n) for this customer, or for all. */
#define OBJECTED(p)                                                                                \
    "EXISTS (SELECT 1 FROM domicile.subject_objections o WHERE o.subject_key = r.subject_key "     \
    "AND o.customer_id IN ('', r.customer_id) AND o.purpose = " p ")"
#define DSR_COLUMNS                                                                                \
    "r.kind, r.subject_key, r.customer_id, r.purpose, r.reason, r.principal, r.received_at, "      \
    "r.due_at, r.gdpr_due_at, r.extended_due_at, r.extension_reason, r.extended_at, l.state, "     \
    "l.attempts, l.last_error, l.next_attempt_at, l.started_at, l.finished_at, "                   \
    "l.records_matched, l.records_deleted, l.keys_destroyed, l.receipt_sha256, l.claimed_by, "     \
    "l.lease_expires_at, r.request_id, r.webhook_state, r.webhook_attempts, r.webhook_error, "     \
    "r.webhook_next_at, r.webhook_delivered_at"
#define EPOCH_MS(c) "(extract(epoch FROM " c ") * 1000)::bigint"

const dm_sql_t dm_sql[DM_SQL__COUNT] = {
    [DM_SQL_PROBE] = {"probe", "SELECT 1", 0},
    [DM_SQL_REGISTER_BEGIN] = {"register_begin",
                               "SELECT * FROM domicile.register_begin($1, $2, $3, $4, $5, $6)", 6},
    [DM_SQL_CUSTOMER_STATE] = {"customer_state", "SELECT * FROM domicile.customer_state($1)", 1},
    [DM_SQL_REGISTER_FINISH] = {"register_finish",
                                "SELECT * FROM domicile.register_finish($1, $2, $3)", 3},
    [DM_SQL_GET_CUSTOMER] = {"get_customer",
                             "SELECT customer_id, residency, state, display_name, labels, "
                             "created_at, closed_at, purge_after, close_reason, purged_at "
                             "FROM domicile.customers WHERE customer_id = $1 "
                             "AND state <> 'pending'",
                             1},
    [DM_SQL_CLOSE_CUSTOMER] = {"close_customer",
                               "SELECT * FROM domicile.close_customer($1, $2, $3, $4)", 4},
    [DM_SQL_PURGE_DUE] = {"purge_due", "SELECT domicile.purge_due_customers($1)", 1},
    [DM_SQL_GET_OR_CREATE_KEY] = {"get_or_create_key",
                                  "SELECT * FROM domicile.get_or_create_key($1, $2, $3, $4)", 4},
    [DM_SQL_PUT_RECORD] = {"put_record",
                           "SELECT * FROM domicile.put_record($1, $2, $3, $4, $5, $6, $7, $8, "
                           "$9, $10, $11, $12, $13)",
                           13},
    [DM_SQL_GET_RECORD] =
        {"get_record",
         "SELECT " RECORD_COLUMNS ", r.payload, k.wrapped, " OBJECTED(
             "$3") " FROM domicile.records r JOIN domicile.data_keys k USING (key_id) "
                   "WHERE r.customer_id = $1 AND r.record_id = $2",
         3},
    /* The payload and key are fetched only when asked for ($6): a listing without payloads
     * moves no ciphertext. */
    /* Up to $5 rows; with payloads ($6), only the rows that start within $8 bytes of
     * payload carry theirs (and column 14 is true): the payload of a row past the budget is
     * never read (a TOASTed value is fetched only when it is output). */
    [DM_SQL_LIST_RECORDS] =
        {"list_records",
         "SELECT " RECORD_COLUMNS ", "
         "CASE WHEN $6::boolean AND r.before < $8 THEN r.payload END, "
         "CASE WHEN $6::boolean AND r.before < $8 THEN k.wrapped END, " OBJECTED(
             "$7") ", r.before < $8 "
                   "FROM (SELECT r.*, coalesce(sum(r.payload_size) OVER (ORDER BY "
                   "r.record_id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) "
                   "AS before FROM domicile.records r "
                   "WHERE r.customer_id = $1 AND ($2 = '' OR r.kind = $2) "
                   "AND ($3::bytea IS NULL OR r.subject_key = $3) "
                   "AND r.record_id > $4 ORDER BY r.record_id LIMIT $5) r "
                   "JOIN domicile.data_keys k USING (key_id) ORDER BY r.record_id",
         8},
    /* The entry, and its place in the sealer's queue, in one statement. */
    [DM_SQL_LEDGER_APPEND] = {"ledger_append",
                              "WITH e AS (INSERT INTO domicile.ledger (entry_uuid, at, request_id, "
                              "principal, "
                              "method, customer_id, subject_key, record_count, bytes, from_region, "
                              "to_region, direction, purpose, basis_id, outcome, refusal_reason, "
                              "record_ids, entry_mac) VALUES ($1, " MS(
                                  "$2") ", $3, $4, $5, $6, "
                                        "$7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) "
                                        "RETURNING entry_id) INSERT INTO "
                                        "domicile.ledger_seal_queue SELECT entry_id FROM e "
                                        "RETURNING entry_id",
                              18},
    /* The last link, or the last retention checkpoint, or the last restore cut (the chain
     * continues after the head the other regions witnessed: 009_restores.sql). */
    [DM_SQL_LEDGER_HEAD] = {"ledger_head",
                            "SELECT seq, chain_hash FROM (SELECT seq, chain_hash FROM "
                            "domicile.ledger_chain ORDER BY seq DESC LIMIT 1) c UNION ALL "
                            "SELECT upto_seq, chain_hash FROM (SELECT upto_seq, chain_hash FROM "
                            "domicile.ledger_checkpoints ORDER BY upto_seq DESC LIMIT 1) k "
                            "UNION ALL SELECT resumed_seq, resumed_hash FROM (SELECT "
                            "resumed_seq, resumed_hash FROM domicile.ledger_restores ORDER BY "
                            "resumed_seq DESC LIMIT 1) x "
                            "ORDER BY 1 DESC LIMIT 1",
                            0},
    [DM_SQL_LEDGER_UNSEALED] = {"ledger_unsealed",
                                "SELECT entry_id, entry_mac FROM domicile.ledger_unsealed($1)", 1},
    [DM_SQL_LEDGER_SEAL] = {"ledger_seal",
                            "SELECT domicile.ledger_seal($1::bigint[], $2::bigint[], "
                            "$3::bytea[], $4::bigint[])",
                            4},
    [DM_SQL_LEDGER_CHECKPOINT] = {"ledger_checkpoint",
                                  "SELECT upto_seq, chain_hash, purged_before, mac, at, "
                                  "entries_purged FROM domicile.ledger_checkpoints "
                                  "ORDER BY upto_seq DESC LIMIT 1",
                                  0},
    [DM_SQL_LEDGER_VERIFY] = {"ledger_verify",
                              "WITH ch AS (SELECT c.seq, c.entry_id, c.chain_hash, " LEDGER_COLUMNS
                              " FROM domicile.ledger_chain c LEFT JOIN domicile.ledger l "
                              "ON l.entry_id = c.entry_id WHERE c.seq > $1 ORDER BY c.seq "
                              "LIMIT $2) SELECT * FROM ch UNION ALL "
                              "SELECT NULL::bigint, l.entry_id, NULL::bytea, " LEDGER_COLUMNS
                              " FROM domicile.ledger_unsealed($3) l "
                              "WHERE (SELECT count(*) FROM ch) < $2 ORDER BY 1 NULLS LAST, 2",
                              3},
    [DM_SQL_LEDGER_LOOSE] = {"ledger_loose",
                             "SELECT " LEDGER_COLUMNS " FROM domicile.ledger_to_seal($1) l", 1},
    /* The filters are applied by ledger_page() (regions/schema/006_ledger_page.sql), which
     * plans the query with only the filters given, so each one can use its index. */
    [DM_SQL_LEDGER_LIST] = {"ledger_list",
                            "SELECT " LEDGER_COLUMNS ", c.seq "
                            "FROM domicile.ledger_page($1, $2, $3, $4, $5, $6, $7, $8, $9, "
                            "$10, $11, $12, $13, $14) p "
                            "JOIN domicile.ledger l ON l.entry_id = p.entry_id "
                            "LEFT JOIN domicile.ledger_chain c ON c.entry_id = l.entry_id "
                            "ORDER BY l.at, l.entry_id",
                            14},
    [DM_SQL_LEDGER_REPORT] =
        {"ledger_report",
         "SELECT to_char(l.at AT TIME ZONE 'UTC', 'YYYY-MM'), l.from_region, "
         "l.to_region, l.basis_id, l.purpose, "
         "count(*) FILTER (WHERE l.outcome = 'allowed'), "
         "coalesce(sum(l.record_count) FILTER (WHERE l.outcome = 'allowed'), "
         "0)::bigint, coalesce(sum(l.bytes) FILTER (WHERE l.outcome = "
         "'allowed'), 0)::bigint, count(*) FILTER (WHERE l.outcome = "
         "'refused') FROM domicile.ledger l "
         "WHERE ($1::bigint = 0 OR l.at >= " MS(
             "$1") ") "
                   "AND ($2::bigint = 0 OR l.at < " MS(
                       "$2") ") "
                             "AND ($3 = '' OR l.basis_id = $3) AND ($4 = '' OR l.purpose = $4) "
                             "GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5",
         4},
    [DM_SQL_LEDGER_PURGE_UPTO] = {"ledger_purge_upto",
                                  "SELECT c.seq, c.chain_hash FROM domicile.ledger_chain c "
                                  "WHERE c.seq < coalesce((SELECT min(y.seq) FROM "
                                  "domicile.ledger_chain y JOIN domicile.ledger l "
                                  "ON l.entry_id = y.entry_id WHERE l.at >= " MS(
                                      "$1") "), "
                                            "9223372036854775807) ORDER BY c.seq DESC LIMIT 1",
                                  1},
    [DM_SQL_LEDGER_PURGE] = {"ledger_purge",
                             "SELECT domicile.ledger_purge($1, $2, " MS("$3") ", $4)", 4},
    [DM_SQL_WITNESS_PUT] = {"ledger_witness_put", "SELECT domicile.ledger_witness_put($1, $2, $3)",
                            3},
    [DM_SQL_WITNESS_GET] = {"ledger_witness_get",
                            "SELECT seq, chain_hash FROM domicile.ledger_witness "
                            "WHERE region = $1",
                            1},
    [DM_SQL_DSR_RECEIVE] = {"dsr_receive",
                            "SELECT * FROM domicile.dsr_receive($1, $2, $3, $4, $5, $6, $7, $8, "
                            "$9, $10, $11, $12, $13)",
                            13},
    [DM_SQL_DSR_SET_MISSING] = {"dsr_set_missing",
                                "SELECT domicile.dsr_set_missing($1, $2::text[])", 2},
    [DM_SQL_DSR_STATUS] = {"dsr_status",
                           "SELECT " DSR_COLUMNS " FROM domicile.dsr_requests r "
                           "JOIN domicile.dsr_legs l USING (request_id) WHERE r.request_id = $1",
                           1},
    [DM_SQL_DSR_LIST] = {"dsr_list",
                         "SELECT " DSR_COLUMNS " FROM domicile.dsr_requests r "
                         "JOIN domicile.dsr_legs l USING (request_id) "
                         "WHERE ($1 = '' OR r.kind = $1) AND ($2 = '' OR r.customer_id = $2) "
                         "ORDER BY r.received_at DESC, r.request_id LIMIT $3",
                         3},
    [DM_SQL_DSR_CLAIM] = {"dsr_claim", "SELECT * FROM domicile.dsr_claim($1, $2, $3)", 3},
    [DM_SQL_DSR_RUN] = {"dsr_run", "SELECT * FROM domicile.dsr_run_leg($1, $2)", 2},
    [DM_SQL_DSR_FAIL] = {"dsr_fail", "SELECT domicile.dsr_fail_leg($1, $2, $3, $4)", 4},
    /* The dsr_receive parameters (8..10 as ms), then the regions still missing it. */
    [DM_SQL_DSR_MISSING] =
        {"dsr_missing",
         "SELECT request_id, kind, fingerprint, subject_key, customer_id, "
         "purpose, reason, principal, " EPOCH_MS("received_at") ", " EPOCH_MS(
             "due_at") ", " EPOCH_MS("gdpr_due_at") ", notify_region, "
                                                    "webhook_state, array_to_string(missing, ',') "
                                                    "FROM "
                                                    "domicile.dsr_requests WHERE "
                                                    "cardinality(missing) > 0 "
                                                    "ORDER BY received_at LIMIT 50",
         0},
    [DM_SQL_DSR_DROP_MISSING] = {"dsr_drop_missing",
                                 "UPDATE domicile.dsr_requests SET missing = "
                                 "array_remove(missing, $2) WHERE request_id = $1",
                                 2},
    [DM_SQL_DSR_EXTEND] = {"dsr_extend", "SELECT * FROM domicile.dsr_extend($1, $2, $3)", 3},
    [DM_SQL_DSR_FINISH_EXPORT] = {"dsr_finish_export",
                                  "SELECT domicile.dsr_finish_export($1, $2, $3, $4)", 4},
    [DM_SQL_LOCATE] = {"locate",
                       "SELECT count(*), coalesce(sum(payload_size), 0)::bigint FROM "
                       "domicile.records WHERE subject_key = $1 AND ($2 = '' OR customer_id = $2)",
                       2},
    [DM_SQL_EXPORT_RECORDS] = {"export_records",
                               "SELECT r.customer_id, " RECORD_COLUMNS ", r.payload, k.wrapped "
                               "FROM domicile.records r JOIN domicile.data_keys k USING (key_id) "
                               "WHERE r.subject_key = $1 AND ($2 = '' OR r.customer_id = $2) "
                               "AND (r.customer_id, r.record_id) > ($3, $4::text COLLATE \"C\") "
                               "ORDER BY r.customer_id, r.record_id LIMIT $5",
                               5},
    [DM_SQL_DSR_WEBHOOK_DUE] = {"dsr_webhook_due",
                                "SELECT request_id FROM domicile.dsr_requests WHERE "
                                "notify_region = $1 AND webhook_state IN ('pending', 'failed') "
                                "AND webhook_next_at <= now() ORDER BY webhook_next_at LIMIT $2",
                                2},
    [DM_SQL_DSR_WEBHOOK_MARK] = {"dsr_webhook_mark",
                                 "SELECT domicile.dsr_webhook_mark($1, $2, $3, $4, $5)", 5},
    /* A row replaces an older version only; at the same version a fence beats a lift. */
    [DM_SQL_FENCE_PUT] =
        {"fence_put",
         "INSERT INTO domicile.fences AS f (region, reason, fenced_by, fenced_at, "
         "lifted, version) VALUES ($1, $2, $3, " MS(
             "$4") ", $5, $6) "
                   "ON CONFLICT (region) DO UPDATE SET reason = EXCLUDED.reason, "
                   "fenced_by = EXCLUDED.fenced_by, fenced_at = EXCLUDED.fenced_at, "
                   "lifted = EXCLUDED.lifted, version = EXCLUDED.version "
                   "WHERE f.version < EXCLUDED.version OR (f.version = EXCLUDED.version "
                   "AND f.lifted AND NOT EXCLUDED.lifted)",
         6},
    [DM_SQL_FENCE_LIST] = {"fence_list",
                           "SELECT region, reason, fenced_by, fenced_at, lifted, version "
                           "FROM domicile.fences",
                           0},
    [DM_SQL_REPLICATION] = {"replication",
                            "SELECT application_name, sync_state, coalesce(pg_wal_lsn_diff("
                            "pg_current_wal_lsn(), replay_lsn), 0)::bigint FROM "
                            "pg_stat_replication ORDER BY application_name LIMIT 1",
                            0},
    /* Open legs by time to due: the buckets of dm_dsr_counts_t.due (metrics.h). */
    [DM_SQL_DSR_COUNTS] = {"dsr_counts",
                           "SELECT count(*) FILTER (WHERE state = 'pending'), "
                           "count(*) FILTER (WHERE state = 'running'), "
                           "count(*) FILTER (WHERE state = 'done'), "
                           "count(*) FILTER (WHERE state = 'failed'), "
                           "count(*) FILTER (WHERE state = 'skipped'), "
                           "count(*) FILTER (WHERE open AND due < now()), "
                           "count(*) FILTER (WHERE open AND due >= now() "
                           "AND due < now() + interval '1 day'), "
                           "count(*) FILTER (WHERE open AND due >= now() + interval '1 day' "
                           "AND due < now() + interval '5 days'), "
                           "count(*) FILTER (WHERE open AND due >= now() + interval '5 days' "
                           "AND due < now() + interval '10 days'), "
                           "count(*) FILTER (WHERE open AND due >= now() + interval '10 days' "
                           "AND due < now() + interval '30 days'), "
                           "count(*) FILTER (WHERE open AND due >= now() + interval '30 days'), "
                           "(extract(epoch FROM min(due) FILTER (WHERE open)) * 1000)::bigint "
                           "FROM (SELECT l.state, l.state NOT IN ('done', 'skipped') AS open, "
                           "CASE WHEN r.extended_at IS NOT NULL THEN r.extended_due_at "
                           "ELSE least(r.due_at, r.gdpr_due_at) END AS due "
                           "FROM domicile.dsr_legs l JOIN domicile.dsr_requests r "
                           "USING (request_id)) x",
                           0},
    [DM_SQL_DELETE_RECORD] = {"delete_record",
                              "SELECT * FROM domicile.delete_record($1, $2, $3, $4, $5)", 5},
    [DM_SQL_DSR_CLAIM_ONE] = {"dsr_claim_one", "SELECT * FROM domicile.dsr_claim_one($1, $2, $3)",
                              3},
    /* DSR_COLUMNS of the request as stored, then the status. */
    [DM_SQL_DSR_RECEIVE_CLAIM] = {"dsr_receive_claim",
                                  "SELECT " DSR_COLUMNS
                                  ", x.status FROM domicile.dsr_receive_claim("
                                  "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, "
                                  "$15) x CROSS JOIN LATERAL (SELECT (x.request).*) r "
                                  "CROSS JOIN LATERAL (SELECT (x.leg).*) l",
                                  15},
    /* Metrics: a synchronous standby is what promise 9 (nothing lost) stands on. */
    [DM_SQL_REPLICATION_SUMMARY] = {"replication_summary",
                                    "SELECT count(*), count(*) FILTER (WHERE state = 'streaming' "
                                    "AND sync_state IN ('sync', 'quorum')), "
                                    "coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), "
                                    "replay_lsn)), 0)::bigint FROM pg_stat_replication",
                                    0},
    [DM_SQL_RESTORE_OPEN] = {"restore_open",
                             "SELECT restore_id, state, source, target, backup_label, "
                             "coalesce(" EPOCH_MS("restore_point") ", 0), " EPOCH_MS(
                                 "recorded_at") " FROM domicile.restores "
                                                "WHERE state <> 'reconciled'",
                             0},
    [DM_SQL_RESTORE_RECORD] = {"restore_record",
                               "INSERT INTO domicile.restores (state, source, restore_point, "
                               "target) VALUES ('fenced', $1, " MS("$2") ", $3) "
                                                                         "ON CONFLICT DO NOTHING "
                                                                         "RETURNING restore_id",
                               3},
    [DM_SQL_RESTORE_FINISH] = {"restore_finish",
                               "UPDATE domicile.restores SET state = 'reconciled', "
                               "reconciled_at = now(), reconciled_by = $2, report = $3::jsonb "
                               "WHERE restore_id = $1 AND state = 'fenced'",
                               3},
    /* One gateway of the region reconciles at a time: a session lock on the connection of
     * the executor that runs it (released by RESTORE_UNLOCK, or when the connection goes). */
    [DM_SQL_RESTORE_LOCK] = {"restore_lock", "SELECT pg_try_advisory_lock(7011617181912)", 0},
    [DM_SQL_RESTORE_UNLOCK] = {"restore_unlock", "SELECT pg_advisory_unlock(7011617181912)", 0},
    [DM_SQL_MARK_ADVANCE] = {"mark_advance",
                             "SELECT mark, " EPOCH_MS("at") " FROM domicile.region_mark_advance()",
                             0},
    [DM_SQL_MARK_READ] = {"mark_read", "SELECT mark, " EPOCH_MS("at") " FROM domicile.region_mark",
                          0},
    [DM_SQL_MARK_RAISE] = {"mark_raise", "SELECT domicile.region_mark_raise($1)", 1},
    [DM_SQL_MARK_WITNESS_PUT] = {"mark_witness_put",
                                 "SELECT mark, " EPOCH_MS(
                                     "mark_at") " FROM domicile.mark_witness_put($1, $2, $3)",
                                 3},
    [DM_SQL_DSR_HEADERS] = {"dsr_headers", "SELECT * FROM domicile.dsr_headers_after($1, $2, $3)",
                            3},
    [DM_SQL_RESTORE_REAPPLY] = {"restore_reapply",
                                "SELECT * FROM domicile.restore_reapply($1, $2, $3, $4, $5, $6, "
                                "$7, $8, $9, $10, $11, $12, $13)",
                                13},
    [DM_SQL_CLOSURE_COPY_PUT] = {"closure_copy_put",
                                 "SELECT domicile.closure_copy_put($1, $2, $3, $4, $5, $6)", 6},
    [DM_SQL_CLOSURE_COPIES] = {"closure_copies",
                               "SELECT customer_id, request_id, reason, " EPOCH_MS(
                                   "closed_at") ", " EPOCH_MS("purge_after") " FROM "
                                                                             "domicile.closure_"
                                                                             "copies WHERE "
                                                                             "region = $1",
                               1},
    [DM_SQL_CLOSURE_REAPPLY] = {"closure_reapply",
                                "SELECT domicile.restore_reapply_closure($1, $2, $3, $4, $5)", 5},
    [DM_SQL_LEDGER_CUT_PUT] = {"ledger_cut_put",
                               "INSERT INTO domicile.ledger_restores (restore_id, restored_seq, "
                               "restored_hash, resumed_seq, resumed_hash, witnessed_by, "
                               "restore_point, mac) VALUES ($1, $2, $3, $4, $5, $6, " MS(
                                   "$7") ", $8) ON CONFLICT (restore_id) DO NOTHING",
                               8},
    [DM_SQL_LEDGER_CUTS] = {"ledger_cuts",
                            "SELECT restored_seq, restored_hash, resumed_seq, resumed_hash, "
                            "witnessed_by, " EPOCH_MS("restore_point") ", " EPOCH_MS(
                                "recorded_at") ", mac, restore_id FROM domicile.ledger_restores "
                                               "ORDER BY restored_seq, cut_id",
                            0},
    [DM_SQL_KEK_VERSIONS] = {"kek_versions",
                             "SELECT version, source, label, check_value, state "
                             "FROM domicile.kek_versions ORDER BY version",
                             0},
    [DM_SQL_KEK_BOOTSTRAP_FILE] = {"kek_bootstrap_file",
                                   "INSERT INTO domicile.kek_versions (version, source, state, "
                                   "check_value, activated_at, created_by) VALUES (1, 'file', "
                                   "'active', $1, now(), $2) ON CONFLICT DO NOTHING",
                                   2},
    [DM_SQL_KEK_CLAIM] = {"kek_claim",
                          "SELECT * FROM domicile.kek_claim_version($1, $2, $3, $4, $5)", 5},
    [DM_SQL_KEK_ACTIVATE] = {"kek_activate",
                             "SELECT * FROM domicile.kek_activate($1, $2, $3, $4, $5, $6)", 6},
    [DM_SQL_KEK_SET_CHECK] = {"kek_set_check",
                              "UPDATE domicile.kek_versions SET check_value = $2 "
                              "WHERE version = $1 AND check_value IS NULL AND state = 'active'",
                              2},
    [DM_SQL_KEK_ROTATION_CLAIM] = {"kek_rotation_claim",
                                   "SELECT * FROM domicile.kek_rotation_claim($1, $2)", 2},
    /* Oldest versions first, in index order (data_keys_by_kek_version), after a cursor. */
    [DM_SQL_KEK_REWRAP_BATCH] = {"kek_rewrap_batch",
                                 "SELECT key_id, customer_id, subject_key, wrapped, kek_version "
                                 "FROM domicile.data_keys WHERE kek_version < $1 "
                                 "AND (kek_version, key_id) > ($2::integer, $3::bigint) "
                                 "ORDER BY kek_version, key_id LIMIT $4",
                                 4},
    [DM_SQL_KEK_REWRAP] = {"kek_rewrap",
                           "SELECT domicile.kek_rewrap($1, $2, $3, $4::bigint[], $5::bytea[], $6)",
                           6},
    [DM_SQL_KEK_ROTATION_FINISH] = {"kek_rotation_finish",
                                    "SELECT domicile.kek_rotation_finish($1, $2, $3)", 3},
    [DM_SQL_KEK_STATUS] = {"kek_status",
                           "SELECT v.version, v.source, v.label, v.state, v.created_at, "
                           "v.activated_at, v.retired_at, coalesce(c.n, 0)::bigint "
                           "FROM domicile.kek_versions v LEFT JOIN (SELECT kek_version, "
                           "count(*) AS n FROM domicile.data_keys GROUP BY kek_version) c "
                           "ON c.kek_version = v.version ORDER BY v.version",
                           0},
    [DM_SQL_KEK_ROTATION_STATUS] = {"kek_rotation_status",
                                    "SELECT r.rotation_id, r.target_version, r.state, "
                                    "r.started_at, r.started_by, r.finished_at, r.keys_total, "
                                    "r.keys_rewrapped, coalesce(r.claimed_by, ''), "
                                    "coalesce(r.last_error, ''), CASE WHEN r.state = 'running' "
                                    "THEN (SELECT count(*) FROM domicile.data_keys k WHERE "
                                    "k.kek_version < r.target_version) ELSE 0 END "
                                    "FROM domicile.kek_rotations r "
                                    "ORDER BY r.rotation_id DESC LIMIT 1",
                                    0},
    [DM_SQL_KEK_RETIRE] = {"kek_retire", "SELECT * FROM domicile.kek_retire($1, $2)", 2},
    [DM_SQL_KEK_SCHEDULE] = {"kek_schedule", "SELECT * FROM domicile.kek_schedule()", 0},
};

static uint64_t be64(const char *p)
{
    uint32_t hi, lo;
    memcpy(&hi, p, 4);
    memcpy(&lo, p + 4, 4);
    return ((uint64_t)ntohl(hi) << 32) | ntohl(lo);
}

bool dm_pg_isnull(const PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col);
}

int64_t dm_pg_int8(const PGresult *res, int row, int col)
{
    if (PQgetisnull(res, row, col))
        return 0;
    const char *v = PQgetvalue(res, row, col);
    if (PQgetlength(res, row, col) == 4) {
        uint32_t x;
        memcpy(&x, v, 4);
        return (int32_t)ntohl(x);
    }
    return (int64_t)be64(v);
}

int32_t dm_pg_int4(const PGresult *res, int row, int col)
{
    return (int32_t)dm_pg_int8(res, row, col);
}

bool dm_pg_bool(const PGresult *res, int row, int col)
{
    return !PQgetisnull(res, row, col) && PQgetvalue(res, row, col)[0] != 0;
}

int64_t dm_pg_time_ms(const PGresult *res, int row, int col)
{
    /* Binary timestamptz: microseconds since 2000-01-01 UTC (integer datetimes). */
    if (PQgetisnull(res, row, col))
        return 0;
    int64_t us = (int64_t)be64(PQgetvalue(res, row, col));
    return us / 1000 + 946684800000LL;
}

const char *dm_pg_bytes(const PGresult *res, int row, int col, int *len)
{
    *len = PQgetlength(res, row, col);
    return PQgetvalue(res, row, col);
}

const char *dm_pg_jsonb(const PGresult *res, int row, int col, int *len)
{
    int n = PQgetlength(res, row, col);
    const char *v = PQgetvalue(res, row, col);
    if (PQgetisnull(res, row, col) || n < 1) {
        *len = 0;
        return "";
    }
    *len = n - 1; /* skip the jsonb format version byte */
    return v + 1;
}
