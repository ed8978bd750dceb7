-- 005_regions: operator fences, and what the gateway may read about replication.
--
-- A fence stops all traffic to one region (a drill, maintenance). It is written to every
-- reachable region so that every gateway instance sees it (their maintenance task reads it);
-- a fence is in force while any region still holds it.
SET LOCAL ROLE domicile_owner;

CREATE TABLE domicile.fences (
    region    text PRIMARY KEY,
    reason    text NOT NULL,
    fenced_by text NOT NULL,
    fenced_at timestamptz NOT NULL DEFAULT now()
);

RESET ROLE;
-- ListRegions shows replication state and lag: pg_stat_replication's LSN columns are visible
-- to members of pg_monitor only.
GRANT pg_monitor TO domicile_gateway;
