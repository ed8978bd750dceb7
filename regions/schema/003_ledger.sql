-- 003_ledger: the transfer ledger of this region. Every cross-border movement of this region's
-- data (reads by principals elsewhere, writes from elsewhere) and every refused attempt has one
-- row, appended (committed) before the data leaves the gateway.
--
-- Tamper evidence without a database-held secret: each row carries entry_mac =
-- HMAC(ledger key, canonical fields), computed by the gateway before the insert; a sealer
-- (in the gateway) chains committed rows in batches into ledger_chain:
--     chain_hash[seq] = HMAC(key, chain_hash[seq-1] || seq || entry_id || entry_mac).
-- Appends are plain inserts (no lock, nothing serialised); only sealing is sequential.
-- VerifyLedger recomputes both: an edited row fails its MAC, a forged row has no valid MAC,
-- a deleted row leaves a chain link without its row, a reordering breaks the chain hashes.
-- The gateway's role can only INSERT and SELECT here; purging old rows goes through
-- ledger_purge(), which first stores a signed checkpoint so the rest still verifies.
SET LOCAL ROLE domicile_owner;

CREATE TABLE domicile.ledger (
    entry_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entry_uuid     bytea NOT NULL UNIQUE,
    at             timestamptz NOT NULL,
    request_id     text NOT NULL,
    principal      text NOT NULL,
    method         text NOT NULL,
    customer_id    text NOT NULL,
    subject_key    bytea,
    record_count   bigint NOT NULL CHECK (record_count >= 0),
    bytes          bigint NOT NULL CHECK (bytes >= 0),
    from_region    text NOT NULL,
    to_region      text NOT NULL,
    direction      text NOT NULL CHECK (direction IN ('read', 'write')),
    purpose        text NOT NULL,
    basis_id       text NOT NULL,
    outcome        text NOT NULL CHECK (outcome IN ('allowed', 'refused')),
    refusal_reason text NOT NULL DEFAULT '',
    record_ids     text NOT NULL DEFAULT '', -- record ids joined by U+001F (ids hold no control characters)
    entry_mac      bytea NOT NULL
);
CREATE INDEX ledger_by_time ON domicile.ledger (at);
CREATE INDEX ledger_by_basis ON domicile.ledger (basis_id, at);
CREATE INDEX ledger_by_customer ON domicile.ledger (customer_id, at);

-- The entries not chained yet, as the appends queued them (each append inserts its entry_id
-- here in the same statement): the sealer reads this small table instead of anti-joining the
-- whole ledger against the chain on every tick, which costs O(ledger) and grew to most of a
-- core at 50,000 entries. ledger_seal() removes what it chains. A row a superuser slips into
-- the ledger without a queue entry is never chained: VerifyLedger, which still anti-joins
-- the whole ledger (ledger_unsealed), reports it.
CREATE TABLE domicile.ledger_seal_queue (
    entry_id bigint PRIMARY KEY
);
-- A queue: every row is deleted soon after it is inserted. Vacuum it after every thousand
-- dead rows (not 20% of a size that swings) so scans do not wade through dead index entries.
ALTER TABLE domicile.ledger_seal_queue SET (autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_threshold = 1000, autovacuum_analyze_scale_factor = 0);

CREATE TABLE domicile.ledger_chain (
    seq        bigint PRIMARY KEY CHECK (seq >= 1),
    entry_id   bigint NOT NULL UNIQUE,
    chain_hash bytea NOT NULL,
    sealed_at  timestamptz NOT NULL DEFAULT now()
);

-- A purge keeps the chain verifiable: the checkpoint says "the chain up to upto_seq ended in
-- chain_hash", signed with the ledger key (mac), so verification resumes from there.
-- `at` and `entries_purged` are informational (set here, not covered by the mac: the gateway
-- signs before the purge counts).
CREATE TABLE domicile.ledger_checkpoints (
    checkpoint_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    upto_seq       bigint NOT NULL,
    chain_hash     bytea NOT NULL,
    purged_before  timestamptz NOT NULL,
    at             timestamptz NOT NULL DEFAULT now(),
    mac            bytea NOT NULL,
    entries_purged bigint NOT NULL DEFAULT 0 CHECK (entries_purged >= 0)
);

-- Witnesses: the chain head (region, seq, chain_hash) of ANOTHER region's ledger, as that
-- region's sealer last stored it (written here after each sealed batch). A region's own
-- tables can be cut at the tail (newest entry and link deleted) without a gap; VerifyLedger
-- checks that the region's chain still reaches the highest head witnessed in the other
-- regions. The gateway can only raise a witness (ledger_witness_put), never lower it.
CREATE TABLE domicile.ledger_witness (
    region     text PRIMARY KEY,
    seq        bigint NOT NULL CHECK (seq >= 1),
    chain_hash bytea NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON domicile.ledger, domicile.ledger_chain, domicile.ledger_checkpoints,
    domicile.ledger_witness, domicile.ledger_seal_queue FROM domicile_gateway;
GRANT SELECT ON domicile.ledger_witness TO domicile_gateway;
GRANT SELECT, INSERT ON domicile.ledger, domicile.ledger_chain, domicile.ledger_checkpoints
    TO domicile_gateway;
GRANT SELECT, INSERT, DELETE ON domicile.ledger_seal_queue TO domicile_gateway;

-- Sealing: the unsealed rows in entry order, with the last link to chain from.
CREATE FUNCTION domicile.ledger_unsealed(p_limit integer)
RETURNS SETOF domicile.ledger
LANGUAGE sql STABLE AS $$
    SELECT l.* FROM domicile.ledger l
    WHERE NOT EXISTS (SELECT 1 FROM domicile.ledger_chain c WHERE c.entry_id = l.entry_id)
    ORDER BY l.entry_id LIMIT p_limit
$$;

-- What the sealer chains next: queued entries in entry order, by an index scan of the queue
-- and one primary-key probe of the ledger per entry, whatever the ledger's size. (Left to
-- itself the planner picks a merge join, which walks the ledger's index from its first entry
-- to the first queued one: the whole ledger again.)
CREATE FUNCTION domicile.ledger_to_seal(p_limit integer)
RETURNS SETOF domicile.ledger
LANGUAGE sql STABLE
SET enable_mergejoin = off SET enable_hashjoin = off AS $$
    SELECT l.* FROM (SELECT entry_id FROM domicile.ledger_seal_queue
                     ORDER BY entry_id LIMIT p_limit) q
    JOIN domicile.ledger l USING (entry_id)
    ORDER BY q.entry_id
$$;

-- Store a batch of links computed by the sealer (arrays of equal length, seq consecutive
-- after the current head). Two sealers racing: the second fails on the primary key and
-- tries again later. Refuses links that do not continue the chain. Dequeues the chained
-- entries and `p_rejected` (queued entries whose MAC is not the gateway's: never chained,
-- reported by VerifyLedger; dequeued so they cannot fill every batch).
CREATE FUNCTION domicile.ledger_seal(p_seqs bigint[], p_entry_ids bigint[], p_hashes bytea[],
                                     p_rejected bigint[])
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    head bigint;
BEGIN
    SELECT coalesce(max(seq), (SELECT coalesce(max(upto_seq), 0) FROM domicile.ledger_checkpoints))
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

-- Retention: delete rows sealed before `p_before`, up to link `p_upto_seq`, after storing the
-- gateway-signed checkpoint of that link. Runs with the owner's rights (the gateway cannot
-- delete ledger rows itself) and refuses anything but a prefix of old, sealed rows: the
-- cut-off must be at least 365 days old, so whoever holds the gateway's role cannot erase
-- recent entries through it (the gateway's ledger_retention_days is 0 or >= 365 to match).
CREATE FUNCTION domicile.ledger_purge(p_upto_seq bigint, p_chain_hash bytea,
                                      p_before timestamptz, p_mac bytea)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, domicile AS $$
DECLARE
    n bigint;
BEGIN
    IF p_before IS NULL OR p_before > now() - interval '365 days' THEN
        RAISE EXCEPTION 'ledger_purge: cut-off % is less than 365 days old', p_before
            USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM domicile.ledger_chain c JOIN domicile.ledger l USING (entry_id)
               WHERE c.seq <= p_upto_seq AND l.at >= p_before) THEN
        RAISE EXCEPTION 'ledger_purge: entries up to % are not all older than %',
            p_upto_seq, p_before;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM domicile.ledger_chain
                   WHERE seq = p_upto_seq AND chain_hash = p_chain_hash) THEN
        RAISE EXCEPTION 'ledger_purge: link % does not have the given hash', p_upto_seq;
    END IF;
    DELETE FROM domicile.ledger l USING domicile.ledger_chain c
    WHERE c.entry_id = l.entry_id AND c.seq <= p_upto_seq;
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM domicile.ledger_chain WHERE seq <= p_upto_seq;
    INSERT INTO domicile.ledger_checkpoints (upto_seq, chain_hash, purged_before, mac,
                                             entries_purged)
    VALUES (p_upto_seq, p_chain_hash, p_before, p_mac, n);
    RETURN n;
END $$;
REVOKE ALL ON FUNCTION domicile.ledger_purge(bigint, bytea, timestamptz, bytea) FROM PUBLIC;

CREATE FUNCTION domicile.ledger_witness_put(p_region text, p_seq bigint, p_hash bytea)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, domicile AS $$
    INSERT INTO domicile.ledger_witness AS w (region, seq, chain_hash)
    VALUES (p_region, p_seq, p_hash)
    ON CONFLICT (region) DO UPDATE SET seq = excluded.seq, chain_hash = excluded.chain_hash,
                                       at = now()
    WHERE w.seq < excluded.seq
$$;
REVOKE ALL ON FUNCTION domicile.ledger_witness_put(text, bigint, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION domicile.ledger_unsealed(integer),
                          domicile.ledger_to_seal(integer),
                          domicile.ledger_seal(bigint[], bigint[], bytea[], bigint[]),
                          domicile.ledger_purge(bigint, bytea, timestamptz, bytea),
                          domicile.ledger_witness_put(text, bigint, bytea)
    TO domicile_gateway;
