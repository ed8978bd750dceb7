-- 008_key_custody: versions of the region's key-encryption key (KEK) and their rotation.
--
-- A KEK version is a non-extractable AES-256 key in the region's PKCS#11 token (source
-- 'pkcs11', object label `label`), or the legacy key file (source 'file', version 1 only).
-- The database holds no key: only which versions exist, a check value per version (a wrap of
-- random bytes under that version, bound to the region and the version: a gateway proves it
-- has the right key, and not another region's, by opening it), and the rotation's progress.
-- The current version (for new data keys) is the highest active one.
--
-- Every data key records the version that wrapped it (data_keys.kek_version); a rotation
-- re-wraps the older ones in the background, claimed by one gateway at a time with a lease
-- (a killed gateway's rotation is taken over when the lease expires, by itself or a replica).
SET LOCAL ROLE domicile_owner;

CREATE TABLE domicile.kek_versions (
    version          integer PRIMARY KEY CHECK (version >= 1),
    source           text NOT NULL CHECK (source IN ('file', 'pkcs11')),
    label            text NOT NULL DEFAULT '',
    check_value      bytea,
    -- creating: claimed by a gateway that is making the key in the token (claimed_by, lease);
    -- active: wraps and unwraps; retired: no data key uses it, its token object is destroyed.
    state            text NOT NULL CHECK (state IN ('creating', 'active', 'retired')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    created_by       text NOT NULL DEFAULT '',
    activated_at     timestamptz,
    retired_at       timestamptz,
    retired_by       text,
    claimed_by       text,
    lease_expires_at timestamptz,
    request_id       text UNIQUE, -- of the RotateKey call that made it (idempotency)
    CHECK (source = 'pkcs11' OR version = 1)
);

-- Rows written before this migration were wrapped by the key file: version 1 of source
-- 'file' (its check value is stored by the first gateway that opens it).
ALTER TABLE domicile.data_keys ADD COLUMN kek_version integer NOT NULL DEFAULT 1;
ALTER TABLE domicile.data_keys ALTER COLUMN kek_version DROP DEFAULT;
INSERT INTO domicile.kek_versions (version, source, state, activated_at, created_by)
SELECT 1, 'file', 'active', now(), 'migration 008'
WHERE EXISTS (SELECT 1 FROM domicile.data_keys);

-- Rotation batches read the oldest versions first; status counts keys per version.
CREATE INDEX data_keys_by_kek_version ON domicile.data_keys (kek_version, key_id);

CREATE TABLE domicile.kek_rotations (
    rotation_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target_version   integer NOT NULL REFERENCES domicile.kek_versions,
    started_at       timestamptz NOT NULL DEFAULT now(),
    started_by       text NOT NULL,
    -- done: every data key is under target_version; superseded: a newer rotation took over.
    state            text NOT NULL DEFAULT 'running'
                     CHECK (state IN ('running', 'done', 'superseded')),
    finished_at      timestamptz,
    keys_total       bigint NOT NULL,
    keys_rewrapped   bigint NOT NULL DEFAULT 0,
    claimed_by       text,
    lease_expires_at timestamptz,
    last_error       text
);

-- Key creation takes this lock shared, retirement exclusively: a version is never retired
-- while a data key wrapped by it is being stored.
CREATE FUNCTION domicile.kek_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT 7011617181910 $$;

-- Claim the making of a new version: for 'bootstrap' only when the region has none yet,
-- for 'rotate' always the next one. A version left 'creating' by a gateway whose lease
-- expired is taken over (the key it may have made is found by its label and reused).
CREATE FUNCTION domicile.kek_claim_version(p_me text, p_kind text, p_label_prefix text,
                                           p_lease_ms integer, p_request_id text)
RETURNS TABLE (status text, version integer, label text, claimed_by text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v domicile.kek_versions;
    n integer;
BEGIN
    PERFORM pg_advisory_xact_lock(domicile.kek_lock_key());
    -- A retry of a RotateKey that made its version already.
    SELECT * INTO v FROM domicile.kek_versions k
    WHERE p_request_id <> '' AND k.request_id = p_request_id AND k.state <> 'creating';
    IF FOUND THEN
        RETURN QUERY SELECT 'replayed'::text, v.version, v.label, v.created_by;
        RETURN;
    END IF;
    SELECT * INTO v FROM domicile.kek_versions k WHERE k.state = 'creating'
    ORDER BY k.version LIMIT 1;
    IF FOUND THEN
        IF v.claimed_by IS DISTINCT FROM p_me AND v.lease_expires_at > now() THEN
            RETURN QUERY SELECT 'busy'::text, v.version, v.label, v.claimed_by;
            RETURN;
        END IF;
        UPDATE domicile.kek_versions k SET claimed_by = p_me,
               lease_expires_at = now() + p_lease_ms * interval '1 millisecond'
        WHERE k.version = v.version;
        RETURN QUERY SELECT 'claimed'::text, v.version, v.label, p_me;
        RETURN;
    END IF;
    IF p_kind = 'bootstrap' AND EXISTS (SELECT 1 FROM domicile.kek_versions) THEN
        RETURN QUERY SELECT 'exists'::text, NULL::integer, NULL::text, NULL::text;
        RETURN;
    END IF;
    SELECT coalesce(max(k.version), 0) + 1 INTO n FROM domicile.kek_versions k;
    INSERT INTO domicile.kek_versions (version, source, label, state, created_by, claimed_by,
                                       lease_expires_at, request_id)
    VALUES (n, 'pkcs11', p_label_prefix || '.v' || n, 'creating', p_me, p_me,
            now() + p_lease_ms * interval '1 millisecond', nullif(p_request_id, ''));
    RETURN QUERY SELECT 'claimed'::text, n, p_label_prefix || '.v' || n, p_me;
END $$;

-- The claimed version's key exists in the token and opens `p_check`: make it active (the
-- current one, being the highest) and, for a rotation, start re-wrapping every older data key
-- (an unfinished rotation is superseded: the new one re-wraps its keys too). The gateway that
-- made the version holds the rotation first.
CREATE FUNCTION domicile.kek_activate(p_version integer, p_check bytea, p_me text, p_by text,
                                      p_rotate boolean, p_lease_ms integer)
RETURNS TABLE (status text, rotation_id bigint, keys_total bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    rid bigint;
    n bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(domicile.kek_lock_key());
    UPDATE domicile.kek_versions k SET state = 'active', check_value = p_check,
           activated_at = now(), claimed_by = NULL, lease_expires_at = NULL
    WHERE k.version = p_version AND k.state = 'creating' AND k.claimed_by = p_me;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'lost'::text, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    IF NOT p_rotate THEN
        RETURN QUERY SELECT 'ok'::text, NULL::bigint, 0::bigint;
        RETURN;
    END IF;
    UPDATE domicile.kek_rotations r SET state = 'superseded', finished_at = now()
    WHERE r.state = 'running';
    SELECT count(*) INTO n FROM domicile.data_keys k WHERE k.kek_version < p_version;
    INSERT INTO domicile.kek_rotations (target_version, started_by, keys_total, claimed_by,
                                        lease_expires_at)
    VALUES (p_version, p_by, n, p_me, now() + p_lease_ms * interval '1 millisecond')
    RETURNING kek_rotations.rotation_id INTO rid;
    RETURN QUERY SELECT 'ok'::text, rid, n;
END $$;

-- The running rotation, claimed (or its lease renewed) by p_me; no row when there is none or
-- another gateway holds it.
CREATE FUNCTION domicile.kek_rotation_claim(p_me text, p_lease_ms integer)
RETURNS TABLE (rotation_id bigint, target_version integer, keys_total bigint,
               keys_rewrapped bigint, taken_over boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r domicile.kek_rotations;
BEGIN
    SELECT * INTO r FROM domicile.kek_rotations x WHERE x.state = 'running'
    ORDER BY x.rotation_id DESC LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND OR (r.claimed_by IS DISTINCT FROM p_me AND r.lease_expires_at > now()) THEN
        RETURN;
    END IF;
    UPDATE domicile.kek_rotations x SET claimed_by = p_me,
           lease_expires_at = now() + p_lease_ms * interval '1 millisecond'
    WHERE x.rotation_id = r.rotation_id;
    RETURN QUERY SELECT r.rotation_id, r.target_version, r.keys_total, r.keys_rewrapped,
                        r.claimed_by IS NOT NULL AND r.claimed_by <> p_me;
END $$;

-- Store one batch of re-wrapped keys (ids[i] gets wrapped[i] under p_target) while p_me still
-- holds the rotation; renews the lease. Returns the keys updated, or -1 when the rotation is
-- no longer p_me's (nothing written). A key erased meanwhile is simply not updated.
CREATE FUNCTION domicile.kek_rewrap(p_rotation bigint, p_me text, p_target integer,
                                    p_ids bigint[], p_wrapped bytea[], p_lease_ms integer)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM 1 FROM domicile.kek_rotations x
    WHERE x.rotation_id = p_rotation AND x.state = 'running' AND x.claimed_by = p_me FOR UPDATE;
    IF NOT FOUND THEN
        RETURN -1;
    END IF;
    UPDATE domicile.data_keys k SET wrapped = u.w, kek_version = p_target
    FROM unnest(p_ids, p_wrapped) AS u(id, w)
    WHERE k.key_id = u.id AND k.kek_version < p_target;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE domicile.kek_rotations x SET keys_rewrapped = x.keys_rewrapped + n,
           lease_expires_at = now() + p_lease_ms * interval '1 millisecond', last_error = NULL
    WHERE x.rotation_id = p_rotation;
    RETURN n;
END $$;

-- Done when no data key is under an older version any more; else 'more'.
CREATE FUNCTION domicile.kek_rotation_finish(p_rotation bigint, p_me text, p_error text)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    t integer;
BEGIN
    SELECT x.target_version INTO t FROM domicile.kek_rotations x
    WHERE x.rotation_id = p_rotation AND x.state = 'running' AND x.claimed_by = p_me FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'lost';
    END IF;
    IF p_error IS NOT NULL THEN
        UPDATE domicile.kek_rotations x SET last_error = p_error WHERE x.rotation_id = p_rotation;
        RETURN 'more';
    END IF;
    IF EXISTS (SELECT 1 FROM domicile.data_keys k WHERE k.kek_version < t) THEN
        RETURN 'more';
    END IF;
    UPDATE domicile.kek_rotations x SET state = 'done', finished_at = now(),
           claimed_by = NULL, lease_expires_at = NULL
    WHERE x.rotation_id = p_rotation;
    RETURN 'done';
END $$;

-- Retire a version: refused while it is being made or is the current one, and while any data
-- key uses it (a rotation that still re-wraps leaves keys under it). The token object is destroyed
-- by the gateway after this commits (and by any gateway that finds it still there later).
CREATE FUNCTION domicile.kek_retire(p_version integer, p_by text)
RETURNS TABLE (status text, keys bigint, label text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v domicile.kek_versions;
    n bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(domicile.kek_lock_key());
    SELECT * INTO v FROM domicile.kek_versions k WHERE k.version = p_version FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_version'::text, 0::bigint, ''::text;
        RETURN;
    END IF;
    IF v.state = 'retired' THEN
        RETURN QUERY SELECT 'retired'::text, 0::bigint, v.label;
        RETURN;
    END IF;
    IF v.state = 'creating' THEN
        RETURN QUERY SELECT 'creating'::text, 0::bigint, v.label;
        RETURN;
    END IF;
    IF v.version = (SELECT max(k.version) FROM domicile.kek_versions k
                                           WHERE k.state = 'active') THEN
        RETURN QUERY SELECT 'current'::text, 0::bigint, v.label;
        RETURN;
    END IF;
    SELECT count(*) INTO n FROM domicile.data_keys k WHERE k.kek_version = p_version;
    IF n > 0 THEN
        RETURN QUERY SELECT 'in_use'::text, n, v.label;
        RETURN;
    END IF;
    UPDATE domicile.kek_versions k SET state = 'retired', retired_at = now(), retired_by = p_by,
           check_value = NULL
    WHERE k.version = p_version;
    RETURN QUERY SELECT 'ok'::text, 0::bigint, v.label;
END $$;

-- A data key is stored only under a version that is not retired ('kek_retired' otherwise:
-- the gateway learns of the newer version and wraps again).
DROP FUNCTION domicile.get_or_create_key(text, bytea, bytea);
CREATE FUNCTION domicile.get_or_create_key(p_customer text, p_subject_key bytea,
                                           p_candidate bytea, p_kek_version integer)
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
    SELECT k.key_id, k.wrapped INTO key_id, wrapped FROM domicile.data_keys k
    WHERE k.customer_id = p_customer AND k.subject_key = p_subject_key;
    IF FOUND THEN
        status := 'ok';
        RETURN NEXT;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(domicile.kek_lock_key());
    IF NOT EXISTS (SELECT 1 FROM domicile.kek_versions v
                   WHERE v.version = p_kek_version AND v.state = 'active') THEN
        RETURN QUERY SELECT 'kek_retired'::text, NULL::bigint, NULL::bytea;
        RETURN;
    END IF;
    INSERT INTO domicile.data_keys AS k (customer_id, subject_key, wrapped, kek_version)
    VALUES (p_customer, p_subject_key, p_candidate, p_kek_version)
    ON CONFLICT (customer_id, subject_key) DO NOTHING
    RETURNING k.key_id, k.wrapped INTO key_id, wrapped;
    IF NOT FOUND THEN
        SELECT k.key_id, k.wrapped INTO key_id, wrapped FROM domicile.data_keys k
        WHERE k.customer_id = p_customer AND k.subject_key = p_subject_key;
    END IF;
    status := 'ok';
    RETURN NEXT;
END $$;

GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA domicile TO domicile_gateway;

RESET ROLE;
