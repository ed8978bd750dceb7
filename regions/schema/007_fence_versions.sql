-- 007_fence_versions: a lifted fence stays lifted when a region that missed the lift returns.
--
-- Until now Unfence deleted the row in every reachable region, and a fence was in force
-- while any region still held it: a region that was down during the Unfence brought the
-- fence back when it returned. Now every Fence and Unfence writes a row with a version
-- (the gateway's clock in 1/1024 ms, above every version it has seen); Unfence leaves the
-- row as lifted. A gateway follows the newest row any region holds (a fence over a lift of
-- the same version) and writes it back to a region that holds an older one.
SET LOCAL ROLE domicile_owner;

ALTER TABLE domicile.fences
    ADD COLUMN lifted boolean NOT NULL DEFAULT false,
    ADD COLUMN version bigint NOT NULL DEFAULT 0 CHECK (version >= 0);

RESET ROLE;
