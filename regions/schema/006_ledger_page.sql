-- 006_ledger_page: one page of ListTransfers through an index, whatever the filter.
--
-- ListTransfers' subject and principal filters had no index: a page for one subject walked
-- the ledger in time order until it had found its rows, 113 ms a page at 1M entries (1.7 ms
-- with the index below). And every filter was written "($n = '' OR column = $n)" in one
-- prepared statement, which can use an index only while PostgreSQL keeps planning it per
-- call (custom plans); a generic plan of it scans and sorts the whole ledger on every page
-- (120-250 ms at 1M entries). ledger_page() writes the query with only the filters given,
-- and EXECUTE plans it for them on every call: each filter reads its page as one range of
-- its own index, in (at, entry_id) order, from where the previous page ended.
SET LOCAL ROLE domicile_owner;

-- Each filter's index ends in (at, entry_id): the filter, the window and the keyset of the
-- next page are one index range, read in the order of the page (no sort). These replace
-- 003's (at), (customer_id, at) and (basis_id, at). Building them locks the ledger against
-- appends for as long as it takes (1-2 s per index and million entries here): cross-border
-- transfers wait meanwhile; run this migration at a quiet time on a large ledger.
CREATE INDEX ledger_by_time_id ON domicile.ledger (at, entry_id);
DROP INDEX domicile.ledger_by_time;
DROP INDEX domicile.ledger_by_customer;
CREATE INDEX ledger_by_customer ON domicile.ledger (customer_id, at, entry_id);
DROP INDEX domicile.ledger_by_basis;
CREATE INDEX ledger_by_basis ON domicile.ledger (basis_id, at, entry_id);
CREATE INDEX ledger_by_subject ON domicile.ledger (subject_key, at, entry_id)
    WHERE subject_key IS NOT NULL;
CREATE INDEX ledger_by_principal ON domicile.ledger (principal, at, entry_id);

-- Entry ids of one page, in (at, entry_id) order. Empty text / zero / NULL = no filter, as
-- in transfers.proto. p_after_ms/p_after_id: the last entry of the previous page (NULL: the
-- first page). The values only ever travel as parameters ($n), never into the query text.
CREATE FUNCTION domicile.ledger_page(p_from_ms bigint, p_to_ms bigint, p_from_region text,
                                     p_to_region text, p_basis text, p_purpose text,
                                     p_outcome text, p_customer text, p_after_ms bigint,
                                     p_after_id bigint, p_limit bigint, p_direction text,
                                     p_principal text, p_subject bytea)
RETURNS TABLE (entry_id bigint)
LANGUAGE plpgsql STABLE ROWS 200 SET search_path = pg_catalog, domicile AS $$
DECLARE
    q text := 'SELECT l.entry_id FROM domicile.ledger l WHERE true';
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 10000 THEN
        RAISE EXCEPTION 'ledger_page: limit % out of 1..10000', p_limit;
    END IF;
    IF coalesce(p_from_ms, 0) <> 0 THEN
        q := q || ' AND l.at >= timestamptz ''epoch'' + $1 * interval ''1 millisecond''';
    END IF;
    IF coalesce(p_to_ms, 0) <> 0 THEN
        q := q || ' AND l.at < timestamptz ''epoch'' + $2 * interval ''1 millisecond''';
    END IF;
    IF coalesce(p_from_region, '') <> '' THEN q := q || ' AND l.from_region = $3'; END IF;
    IF coalesce(p_to_region, '') <> '' THEN q := q || ' AND l.to_region = $4'; END IF;
    IF coalesce(p_basis, '') <> '' THEN q := q || ' AND l.basis_id = $5'; END IF;
    IF coalesce(p_purpose, '') <> '' THEN q := q || ' AND l.purpose = $6'; END IF;
    IF coalesce(p_outcome, '') <> '' THEN q := q || ' AND l.outcome = $7'; END IF;
    IF coalesce(p_customer, '') <> '' THEN q := q || ' AND l.customer_id = $8'; END IF;
    IF p_after_ms IS NOT NULL THEN
        q := q || ' AND (l.at, l.entry_id) > '
                  '(timestamptz ''epoch'' + $9 * interval ''1 millisecond'', $10)';
    END IF;
    IF coalesce(p_direction, '') <> '' THEN q := q || ' AND l.direction = $12'; END IF;
    IF coalesce(p_principal, '') <> '' THEN q := q || ' AND l.principal = $13'; END IF;
    IF p_subject IS NOT NULL THEN
        q := q || ' AND l.subject_key = $14 AND l.subject_key IS NOT NULL';
    END IF;
    RETURN QUERY EXECUTE q || ' ORDER BY l.at, l.entry_id LIMIT $11'
        USING p_from_ms, p_to_ms, p_from_region, p_to_region, p_basis, p_purpose, p_outcome,
              p_customer, p_after_ms, p_after_id, p_limit, p_direction, p_principal, p_subject;
END
$$;

REVOKE ALL ON FUNCTION domicile.ledger_page(bigint, bigint, text, text, text, text, text, text,
                                            bigint, bigint, bigint, text, text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION domicile.ledger_page(bigint, bigint, text, text, text, text, text,
                                               text, bigint, bigint, bigint, text, text, bytea)
    TO domicile_gateway;
RESET ROLE;
