-- 009_restores: a region restored from a backup is fenced and reconciled before it serves.
-- (Version 9: 008 is issue 17's key custody, on branch keys.)
--
-- A restore takes a region back in time: every data-subject request whose leg here finished
-- after the restore point is undone, and so are closures and purges of its customers. The
-- gateways of the region find out (a restore record written by the restore tool, or this
-- region's high-water mark lower than what the other regions witnessed), refuse the region's
-- calls, re-apply those requests from the copies the other regions hold, record the cut in the
-- ledger (a signed restore checkpoint), and only then serve again. See src/restore/README.md.
SET LOCAL ROLE domicile_owner;

-- Restores of this region. 'restoring': the restore tool is still at work (the standby is
-- being re-created); 'fenced': the gateways refuse the region's calls and reconcile it;
-- 'reconciled': done, `report` says what the restore lost and what was re-applied.
CREATE TABLE domicile.restores (
    restore_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state         text NOT NULL CHECK (state IN ('restoring', 'fenced', 'reconciled')),
    source        text NOT NULL,          -- 'domicile-local', 'witness' (found by a gateway), ...
    target        text NOT NULL DEFAULT '',
    backup_label  text NOT NULL DEFAULT '',
    restore_point timestamptz,            -- the newest commit the restored database holds
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    reconciled_at timestamptz,
    reconciled_by text NOT NULL DEFAULT '',
    report        jsonb
);
CREATE UNIQUE INDEX restores_one_open ON domicile.restores ((true)) WHERE state <> 'reconciled';

-- This region's high-water mark: raised by its gateways every second, and witnessed by the
-- other regions (mark_witness there). A restored database holds an older mark than the other
-- regions witnessed: it went back in time.
CREATE TABLE domicile.region_mark (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    mark      bigint NOT NULL CHECK (mark >= 0),
    at        timestamptz NOT NULL DEFAULT now()
);
INSERT INTO domicile.region_mark (mark) VALUES (0);

-- The other regions' marks, as they last stored them here. Only ever raised.
CREATE TABLE domicile.mark_witness (
    region  text PRIMARY KEY,
    mark    bigint NOT NULL CHECK (mark >= 0),
    mark_at timestamptz NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION domicile.region_mark_advance()
RETURNS TABLE (mark bigint, at timestamptz)
LANGUAGE sql AS $$
    UPDATE domicile.region_mark m SET mark = m.mark + 1, at = now() RETURNING m.mark, m.at
$$;

-- Raise the witness of p_region's mark (never lower it); answers with what is stored now.
-- A region that gets back a higher mark than it sent went back in time.
CREATE FUNCTION domicile.mark_witness_put(p_region text, p_mark bigint, p_mark_ms bigint)
RETURNS TABLE (mark bigint, mark_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, domicile AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO domicile.mark_witness AS w (region, mark, mark_at)
    VALUES (p_region, p_mark, timestamptz 'epoch' + p_mark_ms * interval '1 millisecond')
    ON CONFLICT (region) DO UPDATE SET mark = excluded.mark, mark_at = excluded.mark_at, at = now()
    WHERE w.mark < excluded.mark;
    RETURN QUERY SELECT w.mark, w.mark_at FROM domicile.mark_witness w WHERE w.region = p_region;
END $$;

-- After a reconciliation: the mark goes above everything the other regions witnessed.
CREATE FUNCTION domicile.region_mark_raise(p_above bigint)
RETURNS bigint
LANGUAGE sql AS $$
    UPDATE domicile.region_mark m SET mark = greatest(m.mark, p_above) + 1, at = now()
    RETURNING m.mark
$$;

-- ---------------------------------------------------------------------------------------
-- Closures: the customer's region stores a copy of each closure in every other region (the
-- customer's id, the times and the request id: no personal data), so that a restore of the
-- customer's region cannot bring a closed (or purged) account back.
CREATE TABLE domicile.closure_copies (
    customer_id text PRIMARY KEY,
    region      text NOT NULL,
    request_id  text NOT NULL,
    reason      text NOT NULL DEFAULT '',
    closed_at   timestamptz NOT NULL,
    purge_after timestamptz NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX closure_copies_by_region ON domicile.closure_copies (region, closed_at);

CREATE FUNCTION domicile.closure_copy_put(p_customer text, p_region text, p_request_id text,
                                          p_reason text, p_closed_ms bigint, p_purge_ms bigint)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO domicile.closure_copies (customer_id, region, request_id, reason, closed_at,
                                         purge_after)
    VALUES (p_customer, p_region, p_request_id, p_reason,
            timestamptz 'epoch' + p_closed_ms * interval '1 millisecond',
            timestamptz 'epoch' + p_purge_ms * interval '1 millisecond')
    ON CONFLICT (customer_id) DO NOTHING
$$;

-- Re-apply a closure a restore undid: the customer is closed again with its original times
-- (and purged by the next purge if its retention is over). 'reapplied', 'present' (closed or
-- purged here already) or 'no_customer' (its registration was lost too).
CREATE FUNCTION domicile.restore_reapply_closure(p_customer text, p_request_id text,
                                                 p_reason text, p_closed_ms bigint,
                                                 p_purge_ms bigint)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    SELECT c.state INTO st FROM domicile.customers c WHERE c.customer_id = p_customer FOR UPDATE;
    IF st IS NULL OR st = 'pending' THEN
        RETURN 'no_customer';
    ELSIF st <> 'active' THEN
        RETURN 'present';
    END IF;
    UPDATE domicile.customers
    SET state = 'closed', close_request_id = p_request_id, close_reason = p_reason,
        closed_at = timestamptz 'epoch' + p_closed_ms * interval '1 millisecond',
        purge_after = timestamptz 'epoch' + p_purge_ms * interval '1 millisecond'
    WHERE customer_id = p_customer;
    RETURN 'reapplied';
END $$;

-- ---------------------------------------------------------------------------------------
-- Data-subject requests: re-apply one request (a header another region holds) here. Stores
-- the header if the restore lost it; runs the leg unless it is done (or skipped) here. In
-- one transaction: returns 'present' (the leg had finished before the restore point),
-- 'reapplied' (with the leg's new state) or 'request_id_reused'. The completion webhook of
-- a re-applied request is not sent again (webhook_state 'none').
CREATE FUNCTION domicile.restore_reapply(p_request_id text, p_kind text, p_fingerprint bytea,
                                         p_subject_key bytea, p_customer text, p_purpose text,
                                         p_reason text, p_principal text, p_received_ms bigint,
                                         p_due_ms bigint, p_gdpr_due_ms bigint,
                                         p_notify_region text, p_me text)
RETURNS TABLE (status text, state text, stored boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    st text;
    leg domicile.dsr_legs;
    result text;
BEGIN
    SELECT d.status INTO st
    FROM domicile.dsr_receive(p_request_id, p_kind, p_fingerprint, p_subject_key, p_customer,
                              p_purpose, p_reason, p_principal, p_received_ms, p_due_ms,
                              p_gdpr_due_ms, p_notify_region,
                              'none', p_me, 300) d;
    IF st = 'request_id_reused' THEN
        RETURN QUERY SELECT st, ''::text, false;
        RETURN;
    END IF;
    SELECT * INTO leg FROM domicile.dsr_legs l WHERE l.request_id = p_request_id FOR UPDATE;
    IF st = 'exists' AND leg.state IN ('done', 'skipped') THEN
        RETURN QUERY SELECT 'present'::text, leg.state, false;
        RETURN;
    END IF;
    IF st = 'exists' THEN
        -- Taken over whoever held it: the restore undid that claimant's work.
        UPDATE domicile.dsr_legs l SET state = 'running', claimed_by = p_me,
               lease_expires_at = now() + interval '300 seconds', attempts = l.attempts + 1,
               started_at = coalesce(l.started_at, now())
        WHERE l.request_id = p_request_id;
    END IF;
    SELECT r.state INTO result FROM domicile.dsr_run_leg(p_request_id, p_me) r;
    RETURN QUERY SELECT 'reapplied'::text, result, st = 'created';
END $$;

-- The headers a restored region asks the others for: every request but exports, in
-- (received_at, request_id) order after the given key, one page at a time.
CREATE FUNCTION domicile.dsr_headers_after(p_after_ms bigint, p_after_id text, p_limit integer)
RETURNS TABLE (request_id text, kind text, fingerprint bytea, subject_key bytea,
               customer_id text, purpose text, reason text, principal text,
               received_ms bigint, due_ms bigint, gdpr_due_ms bigint, notify_region text)
LANGUAGE sql STABLE AS $$
    SELECT r.request_id, r.kind, r.fingerprint, r.subject_key, r.customer_id, r.purpose,
           r.reason, r.principal,
           (extract(epoch FROM r.received_at) * 1000)::bigint,
           (extract(epoch FROM r.due_at) * 1000)::bigint,
           (extract(epoch FROM r.gdpr_due_at) * 1000)::bigint, r.notify_region
    FROM domicile.dsr_requests r
    WHERE r.kind <> 'export'
      AND (r.received_at, r.request_id) >
          (timestamptz 'epoch' + p_after_ms * interval '1 millisecond', p_after_id)
    ORDER BY r.received_at, r.request_id
    LIMIT p_limit
$$;

-- ---------------------------------------------------------------------------------------
-- The ledger across a restore. The restored chain ends at restored_seq; the other regions
-- witnessed it up to resumed_seq (>= restored_seq) with resumed_hash: the links in between
-- were lost with the restore. The gateway signs the record with the ledger key, and the
-- chain continues after resumed_seq from resumed_hash, so the heads the other regions
-- witnessed still match and VerifyLedger verifies across the cut, naming it.
CREATE TABLE domicile.ledger_restores (
    cut_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    restore_id    bigint NOT NULL UNIQUE,
    restored_seq  bigint NOT NULL CHECK (restored_seq >= 0),
    restored_hash bytea NOT NULL,
    resumed_seq   bigint NOT NULL,
    resumed_hash  bytea NOT NULL,
    witnessed_by  text NOT NULL DEFAULT '',
    restore_point timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    mac           bytea NOT NULL,
    CHECK (resumed_seq >= restored_seq)
);
REVOKE ALL ON domicile.ledger_restores FROM domicile_gateway;
GRANT SELECT, INSERT ON domicile.ledger_restores TO domicile_gateway;

-- The sealer continues after a restore cut as it does after a retention checkpoint.
CREATE OR REPLACE FUNCTION domicile.ledger_seal(p_seqs bigint[], p_entry_ids bigint[],
                                                p_hashes bytea[], p_rejected bigint[])
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    head bigint;
BEGIN
    SELECT greatest(coalesce(max(seq), 0),
                    (SELECT coalesce(max(upto_seq), 0) FROM domicile.ledger_checkpoints),
                    (SELECT coalesce(max(resumed_seq), 0) FROM domicile.ledger_restores))
    INTO head FROM domicile.ledger_chain;
    IF cardinality(p_seqs) > 0 AND p_seqs[1] <> head + 1 THEN
        RAISE EXCEPTION 'ledger_seal: chain head is %, links start at %', head, p_seqs[1]
            USING ERRCODE = '40001';
    END IF;
    IF cardinality(p_seqs) > 0 THEN
        INSERT INTO domicile.ledger_chain (seq, entry_id, chain_hash)
        SELECT * FROM unnest(p_seqs, p_entry_ids, p_hashes);
    END IF;
    DELETE FROM domicile.ledger_seal_queue
    WHERE entry_id = ANY (p_entry_ids) OR entry_id = ANY (p_rejected);
    RETURN coalesce(cardinality(p_seqs), 0);
END $$;

GRANT EXECUTE ON FUNCTION domicile.region_mark_advance(), domicile.region_mark_raise(bigint),
    domicile.closure_copy_put(text, text, text, text, bigint, bigint),
    domicile.restore_reapply_closure(text, text, text, bigint, bigint),
    domicile.restore_reapply(text, text, bytea, bytea, text, text, text, text, bigint, bigint,
                             bigint, text, text),
    domicile.dsr_headers_after(bigint, text, integer)
    TO domicile_gateway;
REVOKE ALL ON FUNCTION domicile.mark_witness_put(text, bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION domicile.mark_witness_put(text, bigint, bigint) TO domicile_gateway;
RESET ROLE;
