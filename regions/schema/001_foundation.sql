-- 001_foundation: who owns what, and which region this database is.
--
-- Applied by deploy/local/domicile-local (or any runner that does the same) as superuser
-- into database "domicile", inside one transaction together with the insert of version 1
-- into domicile.schema_migrations, with the psql variable :region set to the region code.
-- Before it runs, the runner has created role domicile_owner (NOLOGIN), role
-- domicile_gateway, database domicile owned by domicile_owner, schema domicile owned by
-- domicile_owner and domicile.schema_migrations.

-- Everything below is created and owned by domicile_owner, not by the superuser. LOCAL:
-- the role ends with this migration's transaction.
SET LOCAL ROLE domicile_owner;

-- Nobody but the owner uses schema public in this database. (domicile_owner owns the
-- database, so as pg_database_owner it owns schema public.)
REVOKE ALL ON SCHEMA public FROM PUBLIC;

-- Which region this database is. The gateway reads it on every new connection and
-- refuses the connection if it is not the region it meant to reach (fail closed: a
-- mis-pointed hosts line must never place data in the wrong jurisdiction).
CREATE TABLE domicile.region_identity (
    code text PRIMARY KEY CHECK (code ~ '^[a-z][a-z0-9_-]*$'),
    singleton boolean NOT NULL DEFAULT true UNIQUE CHECK (singleton)
);
INSERT INTO domicile.region_identity (code) VALUES (:'region');

-- The gateway's role: it may use the schema and read the identity and the migration
-- history; it never owns or alters anything.
GRANT USAGE ON SCHEMA domicile TO domicile_gateway;
GRANT SELECT ON domicile.region_identity, domicile.schema_migrations TO domicile_gateway;

-- Tables and sequences that later migrations create (as domicile_owner) are usable by
-- the gateway. Append-only tables (the transfer ledger) REVOKE UPDATE, DELETE explicitly.
ALTER DEFAULT PRIVILEGES FOR ROLE domicile_owner IN SCHEMA domicile
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO domicile_gateway;
ALTER DEFAULT PRIVILEGES FOR ROLE domicile_owner IN SCHEMA domicile
    GRANT USAGE, SELECT ON SEQUENCES TO domicile_gateway;
