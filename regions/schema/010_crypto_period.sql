-- 010_crypto_period: the key-encryption key's crypto-period (docs/backups.md, "Keys outside
-- the data's backups").
--
-- A data backup holds every data key as it was wrapped then, under the KEK version current
-- then. The gateways rotate the KEK every kek_rotate_every_s and destroy a superseded version
-- kek_retire_after_s after no data key uses it any more: from then on, the keys in every
-- backup taken under it open nothing, and a subject's records in those backups can be read
-- only with the subject's key from the live database, where an erasure has deleted it.
SET LOCAL ROLE domicile_owner;

-- The versions that are not retired, as the custody threads act on them (ages by the
-- database's clock, the same for every gateway of the region): `current`, milliseconds since
-- it became active, milliseconds since a newer version became active (NULL for the current one),
-- whether any data key still uses it, and whether a rotation is running.
CREATE FUNCTION domicile.kek_schedule()
RETURNS TABLE (version integer, current boolean, active_ms bigint, superseded_ms bigint,
               in_use boolean, rotating boolean)
LANGUAGE sql STABLE AS $$
    WITH cur AS (SELECT max(k.version) AS v FROM domicile.kek_versions k WHERE k.state = 'active')
    SELECT k.version, k.version = cur.v,
           (extract(epoch FROM now() - k.activated_at) * 1000)::bigint,
           (SELECT (extract(epoch FROM now() - min(n.activated_at)) * 1000)::bigint
              FROM domicile.kek_versions n
             WHERE n.version > k.version AND n.activated_at IS NOT NULL),
           EXISTS (SELECT 1 FROM domicile.data_keys d WHERE d.kek_version = k.version),
           EXISTS (SELECT 1 FROM domicile.kek_rotations r WHERE r.state = 'running')
      FROM domicile.kek_versions k, cur
     WHERE k.state = 'active'
     ORDER BY k.version
$$;

GRANT EXECUTE ON FUNCTION domicile.kek_schedule() TO domicile_gateway;

RESET ROLE;
