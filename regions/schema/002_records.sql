-- 002_records: the directory rows of this region's customers, their data keys, their records
-- and the idempotency log of mutating calls.
--
-- Every write the gateway makes is ONE call of a function below, so that the gateway can
-- pipeline many of them over one connection and commit a batch of them in one transaction.
-- Expected outcomes (version mismatch, closed customer, replay) are returned as a `status`
-- column, never raised: an exception would abort every other write of the batch.
SET LOCAL ROLE domicile_owner;

-- Directory: one row per customer resident HERE, and only here (DESIGN.md §4).
-- state 'pending' is a registration in progress (see register_begin); it is never served.
CREATE TABLE domicile.customers (
    customer_id      text PRIMARY KEY CHECK (customer_id ~ '^[A-Za-z0-9._:-]{1,128}$'),
    residency        text NOT NULL,
    state            text NOT NULL CHECK (state IN ('pending', 'active', 'closed', 'purged')),
    display_name     text NOT NULL DEFAULT '',
    labels           jsonb NOT NULL DEFAULT '{}',
    request_id       text NOT NULL,
    fingerprint      bytea NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    closed_at        timestamptz,
    close_reason     text,
    close_request_id text,
    purge_after      timestamptz,
    purged_at        timestamptz
);

-- Data keys, wrapped by the region's key-encryption key (which the database never sees).
-- subject_key '' is the customer's own key; otherwise the key of one data subject of the
-- customer. Deleting a subject's key row is crypto-shredding: the ciphertext left in
-- backups and WAL can no longer be decrypted.
CREATE TABLE domicile.data_keys (
    key_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id text NOT NULL REFERENCES domicile.customers,
    subject_key bytea NOT NULL,
    wrapped     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (customer_id, subject_key)
);

-- Records: the payload is ciphertext (AES-256-GCM, AAD = region, customer, record id).
-- No foreign keys here on purpose: an FK check locks the referenced row FOR KEY SHARE, and
-- every write of a customer would lock the same customers and data_keys rows (multixacts,
-- WAL for the lock). Writers instead take shared advisory locks on the customer and the
-- subject (domicile.lock_*), which purges and erasures take exclusively: same exclusion,
-- no row locks, nothing written.
CREATE TABLE domicile.records (
    customer_id  text NOT NULL,
    record_id    text COLLATE "C" NOT NULL,
    kind         text NOT NULL,
    subject_key  bytea,
    key_id       bigint NOT NULL,
    payload      bytea NOT NULL,
    payload_size integer NOT NULL CHECK (payload_size >= 0),
    content_type text NOT NULL DEFAULT '',
    labels       jsonb NOT NULL DEFAULT '{}',
    version      bigint NOT NULL CHECK (version >= 1),
    restricted   boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (customer_id, record_id)
);
-- kind leads, so that the planner can never take this index for a (customer, record id)
-- lookup (with customer_id leading, a generic plan sometimes did, and then scanned every
-- index entry of the customer).
CREATE INDEX records_by_kind ON domicile.records (kind, customer_id, record_id);
CREATE INDEX records_by_subject ON domicile.records (subject_key, customer_id, record_id)
    WHERE subject_key IS NOT NULL;

-- Idempotency: the first result of every mutating call, by (customer, request_id).
-- fingerprint = SHA-256 of the request's canonical fields: the same request_id with other
-- content is refused instead of silently replayed.
CREATE TABLE domicile.idempotency (
    customer_id text NOT NULL,
    request_id  text NOT NULL,
    method      text NOT NULL,
    fingerprint bytea NOT NULL,
    result      jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, request_id)
);

-- Advisory lock keys: writers share them, purges and erasures hold them exclusively.
CREATE FUNCTION domicile.customer_lock_key(p_customer text) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT hashtextextended('domicile.customer:' || p_customer, 0) $$;
CREATE FUNCTION domicile.subject_lock_key(p_customer text, p_subject_key bytea) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended('domicile.subject:' || p_customer || ':' || encode(p_subject_key, 'hex'), 0)
$$;

-- ---------------------------------------------------------------------------------------
-- Registration, in three steps so that two gateways registering the same id in two regions
-- at once cannot both succeed: begin (a pending row here), check every other region
-- (customer_state), then commit or abort here. A pending row older than 30 s is an
-- abandoned attempt (its gateway died) and is ignored / taken over.

CREATE FUNCTION domicile.register_begin(p_customer text, p_residency text, p_request_id text,
                                        p_fingerprint bytea, p_display_name text,
                                        p_labels jsonb)
RETURNS TABLE (status text, state text, created_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c domicile.customers;
BEGIN
    IF p_residency <> (SELECT code FROM domicile.region_identity) THEN
        RETURN QUERY SELECT 'wrong_region'::text, NULL::text, NULL::timestamptz;
        RETURN;
    END IF;
    INSERT INTO domicile.customers AS t (customer_id, residency, state, display_name, labels,
                                         request_id, fingerprint)
    VALUES (p_customer, p_residency, 'pending', p_display_name, p_labels, p_request_id,
            p_fingerprint)
    ON CONFLICT (customer_id) DO UPDATE
        SET request_id = EXCLUDED.request_id, fingerprint = EXCLUDED.fingerprint,
            display_name = EXCLUDED.display_name, labels = EXCLUDED.labels,
            created_at = now()
        WHERE t.state = 'pending' AND t.created_at < now() - interval '30 seconds'
    RETURNING * INTO c;
    IF FOUND THEN
        RETURN QUERY SELECT 'begun'::text, c.state, c.created_at;
        RETURN;
    END IF;
    SELECT * INTO c FROM domicile.customers t WHERE t.customer_id = p_customer;
    IF c.request_id = p_request_id AND c.fingerprint = p_fingerprint THEN
        -- A retry of the registration that created (or is creating) this row.
        RETURN QUERY SELECT CASE WHEN c.state = 'pending' THEN 'begun' ELSE 'replayed' END,
                            c.state, c.created_at;
    ELSIF c.request_id = p_request_id THEN
        RETURN QUERY SELECT 'request_id_reused'::text, c.state, c.created_at;
    ELSIF c.state = 'pending' THEN
        RETURN QUERY SELECT 'concurrent'::text, c.state, c.created_at;
    ELSE
        RETURN QUERY SELECT 'exists'::text, c.state, c.created_at;
    END IF;
END $$;

-- Does this region hold the id? 'none', 'pending' (fresh attempt) or the state.
CREATE FUNCTION domicile.customer_state(p_customer text)
RETURNS TABLE (state text, residency text)
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN c.state = 'pending' AND c.created_at < now() - interval '30 seconds'
                THEN 'none' ELSE c.state END,
           c.residency
    FROM domicile.customers c WHERE c.customer_id = p_customer
    UNION ALL
    SELECT 'none', NULL WHERE NOT EXISTS
        (SELECT 1 FROM domicile.customers c WHERE c.customer_id = p_customer)
$$;

CREATE FUNCTION domicile.register_finish(p_customer text, p_request_id text, p_commit boolean)
RETURNS TABLE (status text, created_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c domicile.customers;
BEGIN
    IF p_commit THEN
        UPDATE domicile.customers t SET state = 'active', created_at = now()
        WHERE t.customer_id = p_customer AND t.request_id = p_request_id AND t.state = 'pending'
        RETURNING * INTO c;
        IF FOUND THEN
            RETURN QUERY SELECT 'ok'::text, c.created_at;
            RETURN;
        END IF;
        SELECT * INTO c FROM domicile.customers t
        WHERE t.customer_id = p_customer AND t.request_id = p_request_id;
        RETURN QUERY SELECT CASE WHEN c.state = 'active' THEN 'ok' ELSE 'lost' END,
                            c.created_at;
    ELSE
        DELETE FROM domicile.customers t
        WHERE t.customer_id = p_customer AND t.request_id = p_request_id AND t.state = 'pending';
        RETURN QUERY SELECT 'aborted'::text, NULL::timestamptz;
    END IF;
END $$;

CREATE FUNCTION domicile.close_customer(p_customer text, p_request_id text, p_reason text,
                                        p_retention interval)
RETURNS TABLE (status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c domicile.customers;
BEGIN
    SELECT * INTO c FROM domicile.customers t WHERE t.customer_id = p_customer FOR UPDATE;
    IF NOT FOUND OR c.state = 'pending' THEN
        RETURN QUERY SELECT 'no_customer'::text;
    ELSIF c.state = 'active' THEN
        UPDATE domicile.customers t
        SET state = 'closed', closed_at = now(), close_reason = p_reason,
            close_request_id = p_request_id, purge_after = now() + p_retention
        WHERE t.customer_id = p_customer;
        RETURN QUERY SELECT 'ok'::text;
    ELSIF c.close_request_id = p_request_id THEN
        RETURN QUERY SELECT 'replayed'::text;
    ELSE
        RETURN QUERY SELECT 'not_active'::text;
    END IF;
END $$;

-- Purge closed customers whose retention window is over: records and keys go, the
-- directory row stays as a tombstone (state purged) so the id is never reused.
CREATE FUNCTION domicile.purge_due_customers(p_limit integer)
RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n integer := 0;
    c text;
BEGIN
    FOR c IN SELECT customer_id FROM domicile.customers
             WHERE state = 'closed' AND purge_after <= now()
             ORDER BY purge_after LIMIT p_limit FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM pg_advisory_xact_lock(domicile.customer_lock_key(c));
        DELETE FROM domicile.records WHERE customer_id = c;
        DELETE FROM domicile.data_keys WHERE customer_id = c;
        DELETE FROM domicile.idempotency WHERE customer_id = c;
        UPDATE domicile.customers SET state = 'purged', purged_at = now(), labels = '{}',
               display_name = ''
        WHERE customer_id = c;
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;

-- ---------------------------------------------------------------------------------------
-- Data keys: return the existing key of (customer, subject), or store the candidate the
-- gateway generated and wrapped. Concurrent callers converge on one key.
CREATE FUNCTION domicile.get_or_create_key(p_customer text, p_subject_key bytea,
                                           p_candidate bytea)
RETURNS TABLE (status text, key_id bigint, wrapped bytea)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    st text;
BEGIN
    SELECT c.state INTO st FROM domicile.customers c WHERE c.customer_id = p_customer;
    IF st IS NULL OR st IN ('pending', 'purged') THEN
        RETURN QUERY SELECT 'no_customer'::text, NULL::bigint, NULL::bytea;
        RETURN;
    END IF;
    INSERT INTO domicile.data_keys AS k (customer_id, subject_key, wrapped)
    VALUES (p_customer, p_subject_key, p_candidate)
    ON CONFLICT (customer_id, subject_key) DO NOTHING
    RETURNING k.key_id, k.wrapped INTO key_id, wrapped;
    IF NOT FOUND THEN
        SELECT k.key_id, k.wrapped INTO key_id, wrapped FROM domicile.data_keys k
        WHERE k.customer_id = p_customer AND k.subject_key = p_subject_key;
    END IF;
    status := 'ok';
    RETURN NEXT;
END $$;

-- ---------------------------------------------------------------------------------------
-- Records.

CREATE FUNCTION domicile.put_record(p_customer text, p_request_id text, p_fingerprint bytea,
                                    p_record_id text, p_kind text, p_subject_key bytea,
                                    p_key_id bigint, p_payload bytea, p_payload_size integer,
                                    p_content_type text, p_labels jsonb, p_expected bigint,
                                    p_purpose text)
RETURNS TABLE (status text, version bigint, created boolean, created_at timestamptz,
               updated_at timestamptz, restricted boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    idem domicile.idempotency;
    cst text;
    cur domicile.records;
    r domicile.records;
BEGIN
    -- A retry: replay the first result, write nothing. (A duplicate racing the first call
    -- fails the final INSERT below with a unique violation instead; the gateway then retries
    -- it alone, and it replays.)
    SELECT * INTO idem FROM domicile.idempotency i
    WHERE i.customer_id = p_customer AND i.request_id = p_request_id;
    IF FOUND THEN
        IF idem.method <> 'PutRecord' OR idem.fingerprint <> p_fingerprint THEN
            RETURN QUERY SELECT 'request_id_reused'::text, NULL::bigint, NULL::boolean,
                                NULL::timestamptz, NULL::timestamptz, NULL::boolean;
        ELSE
            RETURN QUERY SELECT 'replayed'::text, (idem.result->>'version')::bigint,
                                (idem.result->>'created')::boolean,
                                (idem.result->>'created_at')::timestamptz,
                                (idem.result->>'updated_at')::timestamptz,
                                (idem.result->>'restricted')::boolean;
        END IF;
        RETURN;
    END IF;

    PERFORM pg_advisory_xact_lock_shared(domicile.customer_lock_key(p_customer));
    IF p_subject_key IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock_shared(domicile.subject_lock_key(p_customer, p_subject_key));
    END IF;
    SELECT c.state INTO cst FROM domicile.customers c WHERE c.customer_id = p_customer;
    IF cst IS DISTINCT FROM 'active' THEN
        RETURN QUERY SELECT CASE WHEN cst = 'closed' THEN 'customer_closed'
                                 ELSE 'no_customer' END,
                            NULL::bigint, NULL::boolean, NULL::timestamptz,
                            NULL::timestamptz, NULL::boolean;
        RETURN;
    END IF;
    -- The subject objected to processing for the call's purpose (GDPR Art. 21): no write
    -- for it. (domicile.subject_objections comes with 004_dsr; plpgsql resolves it at run
    -- time.)
    IF p_subject_key IS NOT NULL AND EXISTS (
            SELECT 1 FROM domicile.subject_objections o
            WHERE o.subject_key = p_subject_key AND o.customer_id IN ('', p_customer)
              AND o.purpose = p_purpose) THEN
        RETURN QUERY SELECT 'objected'::text, NULL::bigint, NULL::boolean, NULL::timestamptz,
                            NULL::timestamptz, NULL::boolean;
        RETURN;
    END IF;
    -- The key the gateway encrypted with must still exist: an erasure may have destroyed it
    -- since the gateway cached it (the subject lock keeps it from going away now).
    PERFORM 1 FROM domicile.data_keys k
    WHERE k.key_id = p_key_id AND k.customer_id = p_customer
      AND k.subject_key = coalesce(p_subject_key, '\x'::bytea);
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'key_gone'::text, NULL::bigint, NULL::boolean, NULL::timestamptz,
                            NULL::timestamptz, NULL::boolean;
        RETURN;
    END IF;

    -- Create or replace. Two writes racing to create the same record: the one that loses
    -- the INSERT finds the row on its next turn and replaces it.
    LOOP
        SELECT * INTO cur FROM domicile.records t
        WHERE t.customer_id = p_customer AND t.record_id = p_record_id FOR UPDATE;
        IF p_expected IS NOT NULL AND coalesce(cur.version, 0) <> p_expected THEN
            RETURN QUERY SELECT 'version_mismatch'::text, coalesce(cur.version, 0), NULL::boolean,
                                NULL::timestamptz, NULL::timestamptz, NULL::boolean;
            RETURN;
        END IF;
        IF cur.record_id IS NULL THEN
            INSERT INTO domicile.records (customer_id, record_id, kind, subject_key, key_id,
                                          payload, payload_size, content_type, labels, version,
                                          created_at, updated_at)
            VALUES (p_customer, p_record_id, p_kind, p_subject_key, p_key_id, p_payload,
                    p_payload_size, p_content_type, p_labels, 1, now(), now())
            ON CONFLICT (customer_id, record_id) DO NOTHING
            RETURNING * INTO r;
            EXIT WHEN FOUND;
        ELSE
            UPDATE domicile.records t
            SET kind = p_kind, subject_key = p_subject_key, key_id = p_key_id,
                payload = p_payload, payload_size = p_payload_size,
                content_type = p_content_type, labels = p_labels, version = t.version + 1,
                updated_at = now()
            WHERE t.customer_id = p_customer AND t.record_id = p_record_id
            RETURNING * INTO r;
            EXIT;
        END IF;
    END LOOP;
    INSERT INTO domicile.idempotency (customer_id, request_id, method, fingerprint, result)
    VALUES (p_customer, p_request_id, 'PutRecord', p_fingerprint,
            jsonb_build_object('version', r.version, 'created', cur.record_id IS NULL,
                               'created_at', r.created_at, 'updated_at', r.updated_at,
                               'restricted', r.restricted));
    RETURN QUERY SELECT 'ok'::text, r.version, cur.record_id IS NULL, r.created_at,
                        r.updated_at, r.restricted;
END $$;

CREATE FUNCTION domicile.delete_record(p_customer text, p_request_id text, p_fingerprint bytea,
                                       p_record_id text, p_expected bigint)
RETURNS TABLE (status text, deleted boolean, version bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    idem domicile.idempotency;
    cst text;
    cur domicile.records;
BEGIN
    SELECT * INTO idem FROM domicile.idempotency i
    WHERE i.customer_id = p_customer AND i.request_id = p_request_id;
    IF FOUND THEN
        IF idem.method <> 'DeleteRecord' OR idem.fingerprint <> p_fingerprint THEN
            RETURN QUERY SELECT 'request_id_reused'::text, NULL::boolean, NULL::bigint;
        ELSE
            RETURN QUERY SELECT 'replayed'::text, (idem.result->>'deleted')::boolean,
                                (idem.result->>'version')::bigint;
        END IF;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(domicile.customer_lock_key(p_customer));
    SELECT c.state INTO cst FROM domicile.customers c WHERE c.customer_id = p_customer;
    IF cst IS DISTINCT FROM 'active' THEN
        RETURN QUERY SELECT CASE WHEN cst = 'closed' THEN 'customer_closed'
                                 ELSE 'no_customer' END, NULL::boolean, NULL::bigint;
        RETURN;
    END IF;
    SELECT * INTO cur FROM domicile.records t
    WHERE t.customer_id = p_customer AND t.record_id = p_record_id FOR UPDATE;
    IF p_expected IS NOT NULL AND coalesce(cur.version, 0) <> p_expected THEN
        RETURN QUERY SELECT 'version_mismatch'::text, NULL::boolean, coalesce(cur.version, 0);
        RETURN;
    END IF;
    DELETE FROM domicile.records t
    WHERE t.customer_id = p_customer AND t.record_id = p_record_id;
    INSERT INTO domicile.idempotency (customer_id, request_id, method, fingerprint, result)
    VALUES (p_customer, p_request_id, 'DeleteRecord', p_fingerprint,
            jsonb_build_object('deleted', cur.record_id IS NOT NULL,
                               'version', coalesce(cur.version, 0)));
    RETURN QUERY SELECT 'ok'::text, cur.record_id IS NOT NULL, coalesce(cur.version, 0);
END $$;

GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA domicile TO domicile_gateway;
