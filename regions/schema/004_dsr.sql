-- 004_dsr: data-subject requests. Every region holds a copy of each request's header and
-- its own leg of it; gateways' workers claim legs here (FOR UPDATE SKIP LOCKED + a lease
-- that expires if the claimant dies: the coordination lives in PostgreSQL), run them as one
-- transaction each, and retry failures with backoff. A region that was down when a request
-- arrived is listed in the header's `missing` of the regions that took it; workers copy the
-- header there when it returns.
SET LOCAL ROLE domicile_owner;

CREATE TABLE domicile.dsr_requests (
    request_id       text PRIMARY KEY,
    kind             text NOT NULL
        CHECK (kind IN ('erase', 'export', 'restrict', 'unrestrict', 'object', 'withdraw')),
    fingerprint      bytea NOT NULL,
    subject_key      bytea NOT NULL,
    customer_id      text NOT NULL DEFAULT '', -- '' = every customer of the caller's scope
    purpose          text NOT NULL DEFAULT '',
    reason           text NOT NULL DEFAULT '',
    principal        text NOT NULL,
    received_at      timestamptz NOT NULL,
    due_at           timestamptz NOT NULL,     -- policy: 30 days
    gdpr_due_at      timestamptz NOT NULL,     -- GDPR Art. 12(3): one calendar month
    extended_due_at  timestamptz,
    extension_reason text,
    extended_at      timestamptz,
    missing          text[] NOT NULL DEFAULT '{}', -- regions that have not received it yet
    -- Completion webhook, sent by the workers of notify_region (the receiving gateway's
    -- region) once every leg is done: 'none' when no webhook is configured.
    notify_region    text NOT NULL DEFAULT '',
    webhook_state    text NOT NULL DEFAULT 'none'
        CHECK (webhook_state IN ('none', 'pending', 'delivered', 'failed')),
    webhook_attempts integer NOT NULL DEFAULT 0,
    webhook_error    text NOT NULL DEFAULT '',
    webhook_next_at  timestamptz NOT NULL DEFAULT now(),
    webhook_delivered_at timestamptz
);
CREATE INDEX dsr_requests_webhook ON domicile.dsr_requests (notify_region, webhook_next_at)
    WHERE webhook_state IN ('pending', 'failed');
CREATE INDEX dsr_requests_missing ON domicile.dsr_requests (request_id)
    WHERE cardinality(missing) > 0;

CREATE TABLE domicile.dsr_legs (
    request_id       text PRIMARY KEY REFERENCES domicile.dsr_requests,
    state            text NOT NULL
        CHECK (state IN ('pending', 'running', 'done', 'failed', 'skipped')),
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text NOT NULL DEFAULT '',
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    claimed_by       text NOT NULL DEFAULT '',
    lease_expires_at timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    records_matched  bigint NOT NULL DEFAULT 0,
    records_deleted  bigint NOT NULL DEFAULT 0,
    keys_destroyed   bigint NOT NULL DEFAULT 0,
    receipt_sha256   bytea
);
CREATE INDEX dsr_legs_due ON domicile.dsr_legs (next_attempt_at)
    WHERE state IN ('pending', 'failed', 'running');

-- An erasure finds the subject's keys (one per customer holding the subject) by subject
-- alone; without this, every leg would read the whole data_keys table.
CREATE INDEX data_keys_by_subject ON domicile.data_keys (subject_key);

CREATE TABLE domicile.subject_restrictions (
    subject_key bytea NOT NULL,
    customer_id text NOT NULL, -- '' = every customer
    request_id  text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject_key, customer_id)
);

CREATE TABLE domicile.subject_objections (
    subject_key bytea NOT NULL,
    customer_id text NOT NULL, -- '' = every customer
    purpose     text NOT NULL,
    request_id  text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject_key, customer_id, purpose)
);

-- Store a request here (header + this region's leg). Idempotent by request_id: the same
-- request again answers 'exists'; another request under the same id 'request_id_reused'.
-- A claimant (the receiving gateway, which runs the leg at once) gets the new leg claimed
-- in the same transaction, as dsr_claim would: RUNNING under its lease, attempt 1.
CREATE FUNCTION domicile.dsr_receive(p_request_id text, p_kind text, p_fingerprint bytea,
                                     p_subject_key bytea, p_customer text, p_purpose text,
                                     p_reason text, p_principal text, p_received_ms bigint,
                                     p_due_ms bigint, p_gdpr_due_ms bigint,
                                     p_notify_region text, p_webhook text,
                                     p_claimant text DEFAULT '', p_lease_s integer DEFAULT 0)
RETURNS TABLE (status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    fp bytea;
BEGIN
    INSERT INTO domicile.dsr_requests (request_id, kind, fingerprint, subject_key, customer_id,
                                       purpose, reason, principal, received_at, due_at,
                                       gdpr_due_at, notify_region, webhook_state)
    VALUES (p_request_id, p_kind, p_fingerprint, p_subject_key, p_customer, p_purpose, p_reason,
            p_principal, timestamptz 'epoch' + p_received_ms * interval '1 millisecond',
            timestamptz 'epoch' + p_due_ms * interval '1 millisecond',
            timestamptz 'epoch' + p_gdpr_due_ms * interval '1 millisecond', p_notify_region,
            p_webhook)
    ON CONFLICT (request_id) DO NOTHING;
    IF NOT FOUND THEN
        SELECT r.fingerprint INTO fp FROM domicile.dsr_requests r
        WHERE r.request_id = p_request_id;
        RETURN QUERY SELECT CASE WHEN fp = p_fingerprint THEN 'exists'
                                 ELSE 'request_id_reused' END;
        RETURN;
    END IF;
    -- An export's leg is run by the exporting call itself, not by workers.
    IF p_kind = 'export' THEN
        INSERT INTO domicile.dsr_legs (request_id, state, claimed_by, lease_expires_at)
        VALUES (p_request_id, 'running', 'export-stream', now() + interval '1 hour');
    ELSIF p_claimant <> '' THEN
        INSERT INTO domicile.dsr_legs (request_id, state, claimed_by, lease_expires_at,
                                       attempts, started_at)
        VALUES (p_request_id, 'running', p_claimant,
                now() + p_lease_s * interval '1 second', 1, now());
    ELSE
        INSERT INTO domicile.dsr_legs (request_id, state) VALUES (p_request_id, 'pending');
    END IF;
    RETURN QUERY SELECT 'created'::text;
END $$;

-- dsr_receive with a claimant, answering also with the request's header and leg as stored
-- (always one row; the row of another request under the same id when 'request_id_reused'):
-- the receiving gateway replies from it, without reading the request again.
CREATE FUNCTION domicile.dsr_receive_claim(p_request_id text, p_kind text, p_fingerprint bytea,
                                           p_subject_key bytea, p_customer text, p_purpose text,
                                           p_reason text, p_principal text, p_received_ms bigint,
                                           p_due_ms bigint, p_gdpr_due_ms bigint,
                                           p_notify_region text, p_webhook text,
                                           p_claimant text, p_lease_s integer)
RETURNS TABLE (status text, request domicile.dsr_requests, leg domicile.dsr_legs)
LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    SELECT d.status INTO st
    FROM domicile.dsr_receive(p_request_id, p_kind, p_fingerprint, p_subject_key, p_customer,
                              p_purpose, p_reason, p_principal, p_received_ms, p_due_ms,
                              p_gdpr_due_ms, p_notify_region, p_webhook, p_claimant,
                              p_lease_s) d;
    RETURN QUERY
        SELECT st, r, l
        FROM (SELECT 1) one
        LEFT JOIN domicile.dsr_requests r ON r.request_id = p_request_id
        LEFT JOIN domicile.dsr_legs l ON l.request_id = p_request_id;
END $$;

-- Remember which regions did not get the request, so workers copy it there later.
CREATE FUNCTION domicile.dsr_set_missing(p_request_id text, p_missing text[])
RETURNS void LANGUAGE sql AS $$
    UPDATE domicile.dsr_requests SET missing = p_missing WHERE request_id = p_request_id
$$;

-- Claim up to p_limit legs that are due: pending, failed and past their backoff, or running
-- with an expired lease (the claimant died). Claims do not block each other (SKIP LOCKED).
CREATE FUNCTION domicile.dsr_claim(p_me text, p_lease_s integer, p_limit integer)
RETURNS TABLE (request_id text, kind text, attempts integer)
LANGUAGE sql AS $$
    UPDATE domicile.dsr_legs l
    SET state = 'running', claimed_by = p_me, attempts = l.attempts + 1,
        lease_expires_at = now() + p_lease_s * interval '1 second',
        started_at = coalesce(l.started_at, now())
    FROM domicile.dsr_requests r
    WHERE r.request_id = l.request_id AND l.request_id IN (
        SELECT c.request_id FROM domicile.dsr_legs c
        JOIN domicile.dsr_requests q ON q.request_id = c.request_id
        WHERE q.kind <> 'export'
          AND ((c.state IN ('pending', 'failed') AND c.next_attempt_at <= now())
               OR (c.state = 'running' AND c.lease_expires_at < now()))
        ORDER BY c.next_attempt_at LIMIT p_limit
        FOR UPDATE OF c SKIP LOCKED)
    RETURNING l.request_id, r.kind, l.attempts
$$;

-- Run this region's leg of a claimed request in one transaction. Erasure deletes the
-- subject's records and destroys the subject's data keys (crypto-shredding: ciphertext left
-- in backups and WAL no longer decrypts), holding each (customer, subject) lock exclusively
-- so no write of that subject interleaves. Returns the leg's new state.
CREATE FUNCTION domicile.dsr_run_leg(p_request_id text, p_me text)
RETURNS TABLE (state text, records_matched bigint, records_deleted bigint, keys_destroyed bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    q domicile.dsr_requests;
    l domicile.dsr_legs;
    c text;
    matched bigint := 0;
    deleted bigint := 0;
    keys bigint := 0;
    n bigint;
    region text;
    final text;
    undone boolean := false;
    done_ms bigint := floor(extract(epoch FROM now()) * 1000)::bigint;
BEGIN
    SELECT * INTO l FROM domicile.dsr_legs WHERE request_id = p_request_id FOR UPDATE;
    IF NOT FOUND OR l.state <> 'running' OR l.claimed_by <> p_me THEN
        RETURN QUERY SELECT 'lost'::text, 0::bigint, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    SELECT * INTO q FROM domicile.dsr_requests WHERE request_id = p_request_id;
    SELECT code INTO region FROM domicile.region_identity;
    IF q.kind = 'erase' THEN
        -- The customers holding the subject: by its keys (a record is only written under
        -- its (customer, subject) key), and by its records with one index probe per
        -- customer (never per record), in case a record outlived its key. Their subject
        -- locks are taken in order (no deadlock between erasures), then each table is
        -- erased by one set-based statement: the leg costs what a plain DELETE costs.
        FOR c IN
            WITH RECURSIVE rc(customer_id) AS (
                (SELECT t.customer_id FROM domicile.records t
                 WHERE t.subject_key = q.subject_key ORDER BY t.customer_id LIMIT 1)
                UNION ALL
                SELECT (SELECT t.customer_id FROM domicile.records t
                        WHERE t.subject_key = q.subject_key AND t.customer_id > rc.customer_id
                        ORDER BY t.customer_id LIMIT 1)
                FROM rc WHERE rc.customer_id IS NOT NULL)
            SELECT x.customer_id FROM (
                SELECT rc.customer_id FROM rc WHERE rc.customer_id IS NOT NULL
                UNION SELECT k.customer_id FROM domicile.data_keys k
                      WHERE k.subject_key = q.subject_key) x
            WHERE q.customer_id = '' OR x.customer_id = q.customer_id
            ORDER BY 1
        LOOP
            PERFORM pg_advisory_xact_lock(domicile.subject_lock_key(c, q.subject_key));
        END LOOP;
        DELETE FROM domicile.records t
        WHERE t.subject_key = q.subject_key
          AND (q.customer_id = '' OR t.customer_id = q.customer_id);
        GET DIAGNOSTICS deleted = ROW_COUNT;
        DELETE FROM domicile.data_keys k
        WHERE k.subject_key = q.subject_key
          AND (q.customer_id = '' OR k.customer_id = q.customer_id);
        GET DIAGNOSTICS keys = ROW_COUNT;
        matched := deleted;
    ELSIF q.kind IN ('restrict', 'unrestrict') THEN
        IF q.kind = 'restrict' THEN
            INSERT INTO domicile.subject_restrictions (subject_key, customer_id, request_id)
            VALUES (q.subject_key, q.customer_id, q.request_id) ON CONFLICT DO NOTHING;
        ELSE
            DELETE FROM domicile.subject_restrictions
            WHERE subject_key = q.subject_key AND customer_id = q.customer_id;
            GET DIAGNOSTICS n = ROW_COUNT;
            undone := n > 0;
        END IF;
        -- A record is restricted while any restriction covers it (its customer, or all).
        UPDATE domicile.records t
        SET restricted = EXISTS (SELECT 1 FROM domicile.subject_restrictions s
                                 WHERE s.subject_key = t.subject_key
                                   AND s.customer_id IN ('', t.customer_id))
        WHERE t.subject_key = q.subject_key
          AND (q.customer_id = '' OR t.customer_id = q.customer_id);
        GET DIAGNOSTICS matched = ROW_COUNT;
    ELSIF q.kind = 'object' THEN
        INSERT INTO domicile.subject_objections (subject_key, customer_id, purpose, request_id)
        VALUES (q.subject_key, q.customer_id, q.purpose, q.request_id) ON CONFLICT DO NOTHING;
        SELECT count(*) INTO matched FROM domicile.records t
        WHERE t.subject_key = q.subject_key AND (q.customer_id = '' OR t.customer_id = q.customer_id);
    ELSIF q.kind = 'withdraw' THEN
        DELETE FROM domicile.subject_objections
        WHERE subject_key = q.subject_key AND customer_id = q.customer_id AND purpose = q.purpose;
        GET DIAGNOSTICS n = ROW_COUNT;
        undone := n > 0;
        SELECT count(*) INTO matched FROM domicile.records t
        WHERE t.subject_key = q.subject_key AND (q.customer_id = '' OR t.customer_id = q.customer_id);
    END IF;
    -- Nothing here to erase, or nothing to undo: the leg is skipped (its receipt says so).
    final := CASE WHEN q.kind = 'erase' AND deleted = 0 AND keys = 0 THEN 'skipped'
                  WHEN q.kind IN ('unrestrict', 'withdraw') AND NOT undone THEN 'skipped'
                  ELSE 'done' END;
    UPDATE domicile.dsr_legs SET
        state = final, finished_at = timestamptz 'epoch' + done_ms * interval '1 millisecond',
        claimed_by = '', lease_expires_at = NULL, last_error = '',
        records_matched = matched, records_deleted = deleted, keys_destroyed = keys,
        receipt_sha256 = sha256(convert_to(concat_ws('|', 'domicile-receipt-v1', p_request_id,
                                                     region, q.kind, matched, deleted, keys,
                                                     done_ms),
                                           'UTF8'))
    WHERE request_id = p_request_id;
    RETURN QUERY SELECT final, matched, deleted, keys;
END $$;

-- Claim one given leg if it is pending and nobody holds it (SKIP LOCKED): the gateway that
-- stored a request claims its legs at once instead of waiting for a worker's round. Same
-- lease as dsr_claim, so the leg shows RUNNING, and is taken over if the claimant dies.
CREATE FUNCTION domicile.dsr_claim_one(p_request_id text, p_me text, p_lease_s integer)
RETURNS TABLE (request_id text, kind text, attempts integer)
LANGUAGE sql AS $$
    UPDATE domicile.dsr_legs l
    SET state = 'running', claimed_by = p_me, attempts = l.attempts + 1,
        lease_expires_at = now() + p_lease_s * interval '1 second',
        started_at = coalesce(l.started_at, now())
    FROM domicile.dsr_requests r
    WHERE r.request_id = l.request_id AND r.kind <> 'export' AND l.request_id IN (
        SELECT c.request_id FROM domicile.dsr_legs c
        WHERE c.request_id = p_request_id AND c.state = 'pending'
        FOR UPDATE SKIP LOCKED)
    RETURNING l.request_id, r.kind, l.attempts
$$;

CREATE FUNCTION domicile.dsr_fail_leg(p_request_id text, p_me text, p_error text,
                                      p_backoff_ms bigint)
RETURNS void LANGUAGE sql AS $$
    UPDATE domicile.dsr_legs
    SET state = 'failed', last_error = p_error, claimed_by = '', lease_expires_at = NULL,
        next_attempt_at = now() + p_backoff_ms * interval '1 millisecond'
    WHERE request_id = p_request_id AND claimed_by = p_me AND state = 'running'
$$;

-- Export legs are finished by the exporting call.
CREATE FUNCTION domicile.dsr_finish_export(p_request_id text, p_records bigint, p_ok boolean,
                                           p_error text)
RETURNS void LANGUAGE sql AS $$
    UPDATE domicile.dsr_legs
    SET state = CASE WHEN p_ok THEN 'done' ELSE 'failed' END, finished_at = now(),
        records_matched = p_records, last_error = p_error, claimed_by = '',
        lease_expires_at = NULL,
        next_attempt_at = 'infinity'
    WHERE request_id = p_request_id
$$;

CREATE FUNCTION domicile.dsr_extend(p_request_id text, p_reason text, p_until_ms bigint)
RETURNS TABLE (status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    UPDATE domicile.dsr_requests
    SET extended_due_at = timestamptz 'epoch' + p_until_ms * interval '1 millisecond',
        extension_reason = p_reason, extended_at = now()
    WHERE request_id = p_request_id AND extended_at IS NULL;
    IF FOUND THEN
        RETURN QUERY SELECT 'ok'::text;
    ELSIF EXISTS (SELECT 1 FROM domicile.dsr_requests WHERE request_id = p_request_id) THEN
        RETURN QUERY SELECT 'already_extended'::text;
    ELSE
        RETURN QUERY SELECT 'missing'::text;
    END IF;
END $$;

-- Webhook bookkeeping of the requests this region notifies about.
CREATE FUNCTION domicile.dsr_webhook_mark(p_request_id text, p_state text, p_error text,
                                          p_delay_ms bigint, p_attempted boolean)
RETURNS void LANGUAGE sql AS $$
    UPDATE domicile.dsr_requests
    SET webhook_state = p_state, webhook_error = p_error,
        webhook_attempts = webhook_attempts + CASE WHEN p_attempted THEN 1 ELSE 0 END,
        webhook_next_at = now() + p_delay_ms * interval '1 millisecond',
        webhook_delivered_at = CASE WHEN p_state = 'delivered' THEN now() END
    WHERE request_id = p_request_id
$$;

GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA domicile TO domicile_gateway;

-- A record of a restricted subject is stored restricted, whoever writes it: the flag follows
-- the restrictions on every insert and on every change of the record's subject.
CREATE FUNCTION domicile.records_set_restricted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.restricted := NEW.subject_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM domicile.subject_restrictions s
        WHERE s.subject_key = NEW.subject_key AND s.customer_id IN ('', NEW.customer_id));
    RETURN NEW;
END $$;
CREATE TRIGGER records_restricted BEFORE INSERT OR UPDATE OF subject_key ON domicile.records
    FOR EACH ROW EXECUTE FUNCTION domicile.records_set_restricted();
