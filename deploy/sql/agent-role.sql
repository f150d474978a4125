-- The PostgreSQL role a Flotilla agent needs on its shard database, and nothing more.
--
-- Run it as a superuser (or the owner of the tenant schemas), once per shard database, and
-- again when tenant schemas were created by another role:
--
--   FLOTILLA_AGENT_PASSWORD="$(cat /etc/flotilla/shard-0.password)" \
--   psql -X -v ON_ERROR_STOP=1 -d shard_0 \
--        -v role=flotilla_agent_shard_0 -v tenant_pattern='tenant_%' \
--        -f deploy/sql/agent-role.sql
--
-- Variables (psql -v):
--   role             the agent's role (default flotilla_agent); one role per shard keeps a
--                    copied credential from reaching another shard's database
--   tenant_pattern   a LIKE pattern of the tenant schemas (default tenant_%)
--   restrict_connect on: REVOKE CONNECT ON DATABASE <this database> FROM PUBLIC, so only
--                    roles granted CONNECT (the agent's among them) reach it. Grant CONNECT
--                    to your application's roles first. Default off; see deploy/README.md
--                    for the pg_hba.conf lines that keep the agent out of other databases.
-- The password comes from the environment (FLOTILLA_AGENT_PASSWORD, read with psql's
-- \getenv, psql 15+), never from argv; without it the role keeps the password it has (set
-- one with `\password ROLE`, which sends only a SCRAM verifier to the server).
--
-- What the role gets: LOGIN; CONNECT on this database; ownership of schema
-- flotilla (created here when missing: the role may not create schemas) and of every tenant
-- schema and what is in it (tables, views, sequences, functions, types), because DDL on a
-- table needs its owner. What it does not get: SUPERUSER, CREATEDB, CREATEROLE,
-- REPLICATION, BYPASSRLS, ALTER SYSTEM, membership of any role. Two-phase commit needs
-- nothing more: COMMIT PREPARED of a transaction the same role prepared is allowed to it
-- (a transaction prepared by another role, e.g. a superuser agent before the switch,
-- must be resolved by that role or a superuser).
\set ON_ERROR_STOP on
\if :{?role}
\else
  \set role flotilla_agent
\endif
\if :{?tenant_pattern}
\else
  \set tenant_pattern 'tenant_%'
\endif
\if :{?restrict_connect}
\else
  \set restrict_connect off
\endif
\getenv password FLOTILLA_AGENT_PASSWORD

BEGIN;
-- DO blocks cannot see psql variables: they travel as settings of this transaction.
SELECT set_config('flotilla.agent_role', :'role', true),
       set_config('flotilla.tenant_pattern', :'tenant_pattern', true),
       set_config('flotilla.restrict_connect', :'restrict_connect', true) \gset ignored_

DO $flotilla$
DECLARE
  agent text := current_setting('flotilla.agent_role');
  pattern text := current_setting('flotilla.tenant_pattern');
  restrict boolean := current_setting('flotilla.restrict_connect')::boolean;
  nsp record;
  obj record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = agent) THEN
    EXECUTE format('CREATE ROLE %I LOGIN', agent);
  END IF;
  EXECUTE format('ALTER ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION '
                 'NOBYPASSRLS', agent);
  -- no membership of any role (pg_read_server_files, pg_signal_backend, an admin role...)
  FOR obj IN SELECT r.rolname FROM pg_catalog.pg_auth_members m
               JOIN pg_catalog.pg_roles r ON r.oid = m.roleid
              WHERE m.member = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = agent)
  LOOP
    EXECUTE format('REVOKE %I FROM %I', obj.rolname, agent);
  END LOOP;

  EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), agent);
  IF restrict THEN
    EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM PUBLIC', current_database());
  END IF;

  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'flotilla') THEN
    EXECUTE format('CREATE SCHEMA flotilla AUTHORIZATION %I', agent);
  END IF;

  FOR nsp IN SELECT oid, nspname FROM pg_catalog.pg_namespace
              WHERE nspname = 'flotilla' OR nspname LIKE pattern
              ORDER BY nspname
  LOOP
    EXECUTE format('ALTER SCHEMA %I OWNER TO %I', nsp.nspname, agent);
    -- tables, views, materialized views, foreign tables (a table's owned and identity
    -- sequences follow it)
    FOR obj IN SELECT c.oid::regclass AS name, c.relkind FROM pg_catalog.pg_class c
                WHERE c.relnamespace = nsp.oid AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
    LOOP
      EXECUTE format('ALTER %s %s OWNER TO %I',
        CASE obj.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                         WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
        obj.name, agent);
    END LOOP;
    -- sequences of their own
    FOR obj IN SELECT c.oid::regclass AS name FROM pg_catalog.pg_class c
                WHERE c.relnamespace = nsp.oid AND c.relkind = 'S'
                  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                                   WHERE d.classid = 'pg_catalog.pg_class'::regclass
                                     AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
    LOOP
      EXECUTE format('ALTER SEQUENCE %s OWNER TO %I', obj.name, agent);
    END LOOP;
    FOR obj IN SELECT p.oid::regprocedure AS name, p.prokind FROM pg_catalog.pg_proc p
                WHERE p.pronamespace = nsp.oid
    LOOP
      EXECUTE format('ALTER %s %s OWNER TO %I',
        CASE obj.prokind WHEN 'a' THEN 'AGGREGATE' WHEN 'p' THEN 'PROCEDURE'
                         ELSE 'FUNCTION' END,
        obj.name, agent);
    END LOOP;
    -- enums, domains, ranges, and composite types of their own
    FOR obj IN SELECT t.oid::regtype AS name FROM pg_catalog.pg_type t
                WHERE t.typnamespace = nsp.oid
                  AND (t.typtype IN ('e', 'd', 'r')
                       OR (t.typtype = 'c' AND (SELECT c.relkind FROM pg_catalog.pg_class c
                                                 WHERE c.oid = t.typrelid) = 'c'))
    LOOP
      EXECUTE format('ALTER TYPE %s OWNER TO %I', obj.name, agent);
    END LOOP;
  END LOOP;
END
$flotilla$;

\if :{?password}
ALTER ROLE :"role" PASSWORD :'password';
\endif

-- What the role ended up with; fails when it could do more than it needs.
DO $check$
DECLARE
  agent text := current_setting('flotilla.agent_role');
  r record;
BEGIN
  SELECT * INTO r FROM pg_catalog.pg_roles WHERE rolname = agent;
  IF r.rolsuper OR r.rolcreatedb OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls THEN
    RAISE EXCEPTION 'role % has more than an agent needs', agent;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members
              WHERE member = r.oid) THEN
    RAISE EXCEPTION 'role % is still a member of another role', agent;
  END IF;
END
$check$;
COMMIT;

SELECT format('role %s: owner of %s schema(s) in database %s', :'role',
              (SELECT count(*) FROM pg_catalog.pg_namespace n
                 JOIN pg_catalog.pg_roles r ON r.oid = n.nspowner
                WHERE r.rolname = :'role'),
              current_database()) AS flotilla_agent_role;
