-- Flotilla's schema on a shard, version 4. Run by the agent at start, inside a transaction
-- that holds pg_advisory_xact_lock(hashtext('flotilla.schema')); every statement is idempotent.
CREATE TABLE IF NOT EXISTS flotilla.fence (
  id boolean PRIMARY KEY DEFAULT true CHECK (id),
  epoch bigint NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO flotilla.fence (id, epoch) VALUES (true, 0) ON CONFLICT DO NOTHING;

-- one row per (target, migration) currently applied; target '' = the shard itself
CREATE TABLE IF NOT EXISTS flotilla.journal (
  target text NOT NULL,
  migration_id text NOT NULL,
  checksum text NOT NULL,
  plan_id text NOT NULL,
  epoch bigint NOT NULL,
  started_at timestamptz NOT NULL,
  finished_at timestamptz NOT NULL,
  seq bigserial,
  PRIMARY KEY (target, migration_id)
);

-- rows moved here when a step is rolled back
CREATE TABLE IF NOT EXISTS flotilla.journal_history (
  target text NOT NULL,
  migration_id text NOT NULL,
  checksum text NOT NULL,
  plan_id text NOT NULL,
  epoch bigint NOT NULL,
  started_at timestamptz NOT NULL,
  finished_at timestamptz NOT NULL,
  rolled_back_at timestamptz NOT NULL,
  rolled_back_by_plan text NOT NULL,
  rolled_back_epoch bigint NOT NULL
);

-- Advances the shard's epoch to p_epoch (writing only when it advances, so concurrent steps
-- of one epoch do not queue on the row), then holds the row FOR SHARE until the caller's
-- transaction ends: a newer epoch cannot be written while a step of an older one is open,
-- and a step of an older epoch fails once a newer one was seen.
CREATE OR REPLACE FUNCTION flotilla.check_fence(p_epoch bigint) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  cur bigint;
BEGIN
  UPDATE flotilla.fence SET epoch = p_epoch, updated_at = now() WHERE id AND epoch < p_epoch;
  SELECT epoch INTO cur FROM flotilla.fence WHERE id FOR SHARE;
  IF cur > p_epoch THEN
    RAISE EXCEPTION USING ERRCODE = 'FL002',
      MESSAGE = format('fenced: epoch %s is older than the shard''s epoch %s', p_epoch, cur);
  END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION flotilla.check_verify(ok boolean, migration text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
  IF ok IS NOT TRUE THEN
    RAISE EXCEPTION USING ERRCODE = 'FL003',
      MESSAGE = format('verify of %s returned %s', migration, CASE WHEN ok IS NULL THEN 'NULL' ELSE 'false' END);
  END IF;
END
$fn$;

-- A step's journal row, written in the step's own transaction after its statements, with
-- its time by the server's clock (its start was set in `flotilla.step_started` before its
-- statements). Returns the step's seconds. A function rather than an INSERT in the step's
-- query text: that INSERT was parsed, analysed and planned at every step, about 17 us more
-- per step than this function's cached plan (one session, 15,000 steps, the backend's
-- CPU). The function's own search_path is fixed: a cached plan is planned again whenever
-- the search_path differs from the one it was made under, and each step sets its tenant's;
-- and nothing in a tenant's schema, or a temporary one (pg_temp named last), can stand in
-- for what it calls.
CREATE OR REPLACE FUNCTION flotilla.record_step(p_target text, p_migration text, p_checksum text,
                                                p_plan text, p_epoch bigint)
RETURNS double precision
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
  seconds double precision;
BEGIN
  INSERT INTO flotilla.journal (target, migration_id, checksum, plan_id, epoch, started_at, finished_at)
  VALUES (p_target, p_migration, p_checksum, p_plan, p_epoch,
          current_setting('flotilla.step_started')::timestamptz, clock_timestamp())
  RETURNING date_part('epoch', finished_at - started_at) INTO seconds;
  RETURN seconds;
END
$fn$;

-- The progress of a step that commits part by part on a target, deleted with the journal
-- row's insert when the step ends: a batched data change (written in each batch's own
-- transaction: exactly-once per batch) and a non-transactional step's up statements
-- (`statements`: how many are done, each committed with it or, one that cannot run in a
-- transaction, recorded right after it). last_key is the key's text form; the next batch
-- starts after it; NULL before the first batch. A plan's rollback undoes a step that has a
-- checkpoint and no journal row: it was left part-way.
CREATE TABLE IF NOT EXISTS flotilla.checkpoints (
  target text NOT NULL,
  migration_id text NOT NULL,
  checksum text NOT NULL,
  plan_id text NOT NULL,
  last_key text NOT NULL,
  rows bigint NOT NULL,
  batches bigint NOT NULL,
  started_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (target, migration_id)
);
-- version 2: last_key NULL (up statements done, no batch yet), `statements` and `undoing`.
-- Checked first: ALTER TABLE takes its lock even when there is nothing to change.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                  WHERE attrelid = 'flotilla.checkpoints'::regclass AND attname = 'statements'
                    AND NOT attisdropped) THEN
    ALTER TABLE flotilla.checkpoints ALTER COLUMN last_key DROP NOT NULL,
      ADD COLUMN statements integer NOT NULL DEFAULT 0;
  END IF;
  -- set (fenced) before a rollback undoes anything of the step: a rollback cut short leaves
  -- a checkpoint that no longer says what is done, which a run must not go on from
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                  WHERE attrelid = 'flotilla.checkpoints'::regclass AND attname = 'undoing'
                    AND NOT attisdropped) THEN
    ALTER TABLE flotilla.checkpoints ADD COLUMN undoing boolean NOT NULL DEFAULT false;
  END IF;
END $$;
-- version 3: `undone`, how many of a non-transactional step's down statements a rollback has
-- done (each committed with it or, one that cannot run in a transaction, recorded right after
-- it), counted for the version of the migration whose checksum the row holds while undoing:
-- a rollback cut short goes on after them instead of running them again (a decrement done
-- twice, a DROP INDEX CONCURRENTLY failing on the index it dropped).
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                  WHERE attrelid = 'flotilla.checkpoints'::regclass AND attname = 'undone'
                    AND NOT attisdropped) THEN
    ALTER TABLE flotilla.checkpoints ADD COLUMN undone integer NOT NULL DEFAULT 0;
  END IF;
END $$;

-- Fails (FL005) when the journal says the step is applied on the target: a copy of its run
-- that began before the first one committed (resent over a new stream while the first still
-- ran) must not apply a non-transactional step or a data change a second time. Called by the
-- first write of such a step's checkpoint, after it: in its own statement, so that under READ
-- COMMITTED it sees an epilogue that committed while that write waited on the checkpoint's
-- row (the epilogue deletes the checkpoint and writes the journal row in one transaction).
CREATE OR REPLACE FUNCTION flotilla.refuse_journaled(p_target text, p_migration text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
  IF EXISTS (SELECT 1 FROM flotilla.journal WHERE target = p_target AND migration_id = p_migration) THEN
    RAISE EXCEPTION USING ERRCODE = 'FL005',
      MESSAGE = format('%s is already applied on target %L (its journal row is there): this run does not apply it again',
                       p_migration, p_target);
  END IF;
END
$fn$;

-- Moves a checkpoint from p_prev (NULL: no batch yet; the checkpoint of the change's up
-- statements, if any, is taken over) to p_last, in the caller's batch transaction. Fails
-- (FL004) when the checkpoint is not where the caller found it: another run did this
-- batch, so this one must not commit it again.
CREATE OR REPLACE FUNCTION flotilla.advance_checkpoint(p_target text, p_migration text,
  p_checksum text, p_plan text, p_prev text, p_last text, p_rows bigint) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  n bigint;
  cp flotilla.checkpoints%ROWTYPE;
BEGIN
  IF p_prev IS NULL THEN
    -- Prior images left by an earlier run whose checkpoint is gone (deleted by hand after
    -- another version of the change stopped part-way) would be restored with this run's,
    -- batch numbers and columns mixed: the first batch refuses to begin over them.
    IF EXISTS (SELECT 1 FROM flotilla.prior_images
                WHERE target = p_target AND migration_id = p_migration) THEN
      RAISE EXCEPTION USING ERRCODE = 'FL004',
        MESSAGE = format('prior images of an earlier run of %s on target %L are still in flotilla.prior_images with no checkpoint of that run: restore or keep those rows by hand, delete them from flotilla.prior_images, then run it again',
                         p_migration, p_target);
    END IF;
    INSERT INTO flotilla.checkpoints AS c (target, migration_id, checksum, plan_id, last_key, rows, batches, updated_at)
      VALUES (p_target, p_migration, p_checksum, p_plan, p_last, p_rows, 1, clock_timestamp())
      ON CONFLICT (target, migration_id) DO UPDATE
        SET last_key = EXCLUDED.last_key, rows = EXCLUDED.rows, batches = 1,
            plan_id = EXCLUDED.plan_id, updated_at = EXCLUDED.updated_at
        WHERE c.last_key IS NULL AND c.checksum = EXCLUDED.checksum AND NOT c.undoing;
  ELSE
    UPDATE flotilla.checkpoints
       SET last_key = p_last, rows = rows + p_rows, batches = batches + 1, plan_id = p_plan,
           updated_at = clock_timestamp()
     WHERE target = p_target AND migration_id = p_migration AND checksum = p_checksum
       AND last_key = p_prev AND NOT undoing;
  END IF;
  GET DIAGNOSTICS n = ROW_COUNT;
  IF p_prev IS NULL THEN
    PERFORM flotilla.refuse_journaled(p_target, p_migration);
  END IF;
  IF n <> 1 THEN
    SELECT * INTO cp FROM flotilla.checkpoints WHERE target = p_target AND migration_id = p_migration;
    IF cp.undoing THEN
      RAISE EXCEPTION USING ERRCODE = 'FL004',
        MESSAGE = format('a rollback of plan %s began to undo %s on target %L (its checkpoint is marked undoing): this batch is not done',
                         cp.plan_id, p_migration, p_target);
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'FL004',
      MESSAGE = format('checkpoint of %s on target %L is no longer at %L: another run did this batch',
                       p_migration, p_target, coalesce(p_prev, '(start)'));
  END IF;
END
$fn$;

-- Records that the first p_done up statements of a step are done on a target (p_prev were
-- before), in the caller's transaction. Fails (FL004) when the checkpoint is not at p_prev:
-- another run did them, so this one must not commit them again.
CREATE OR REPLACE FUNCTION flotilla.advance_statements(p_target text, p_migration text,
  p_checksum text, p_plan text, p_prev integer, p_done integer) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  n bigint;
BEGIN
  IF p_prev = 0 THEN
    -- a checkpoint of nothing done yet (written before a first statement that cannot run
    -- in a transaction) is taken over
    INSERT INTO flotilla.checkpoints AS c (target, migration_id, checksum, plan_id, last_key, rows, batches, statements, updated_at)
      VALUES (p_target, p_migration, p_checksum, p_plan, NULL, 0, 0, p_done, clock_timestamp())
      ON CONFLICT (target, migration_id) DO UPDATE
        SET statements = EXCLUDED.statements, plan_id = EXCLUDED.plan_id,
            updated_at = EXCLUDED.updated_at
        WHERE c.statements = 0 AND c.last_key IS NULL AND c.checksum = EXCLUDED.checksum
          AND NOT c.undoing;
  ELSE
    UPDATE flotilla.checkpoints
       SET statements = p_done, plan_id = p_plan, updated_at = clock_timestamp()
     WHERE target = p_target AND migration_id = p_migration AND checksum = p_checksum
       AND statements = p_prev AND last_key IS NULL AND NOT undoing;
  END IF;
  GET DIAGNOSTICS n = ROW_COUNT;
  IF p_prev = 0 THEN
    PERFORM flotilla.refuse_journaled(p_target, p_migration);
  END IF;
  IF n <> 1 THEN
    RAISE EXCEPTION USING ERRCODE = 'FL004',
      MESSAGE = format('checkpoint of %s on target %L is no longer after %s of its up statements: another run did them',
                       p_migration, p_target, p_prev);
  END IF;
END
$fn$;

-- Records that the first p_done down statements of a step a rollback undoes are done on a
-- target (p_prev were before), in the caller's transaction. Fails (FL004) when the checkpoint
-- is not undoing, not this version's or not at p_prev: another rollback did them, so this one
-- must not commit them again.
CREATE OR REPLACE FUNCTION flotilla.advance_undone(p_target text, p_migration text,
  p_checksum text, p_prev integer, p_done integer) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  n bigint;
BEGIN
  UPDATE flotilla.checkpoints
     SET undone = p_done, updated_at = clock_timestamp()
   WHERE target = p_target AND migration_id = p_migration AND checksum = p_checksum
     AND undoing AND undone = p_prev;
  GET DIAGNOSTICS n = ROW_COUNT;
  IF n <> 1 THEN
    RAISE EXCEPTION USING ERRCODE = 'FL004',
      MESSAGE = format('checkpoint of %s on target %L is no longer after %s of its down statements: another rollback did them',
                       p_migration, p_target, p_prev);
  END IF;
END
$fn$;

-- Prior images of the data changes that ask for one: the key and the named columns of every
-- row a batch is about to change, as they were, written in the batch's own transaction.
-- Undoing the change restores them batch by batch, newest first, each batch's rows deleted
-- in the transaction that restores them (so an interrupted undo goes on where it stopped).
CREATE TABLE IF NOT EXISTS flotilla.prior_images (
  target text NOT NULL,
  migration_id text NOT NULL,
  batch bigint NOT NULL,
  image jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS prior_images_batch ON flotilla.prior_images (target, migration_id, batch);
-- version 2: `post`, the same columns as the batch left them (written after its statements,
-- in its transaction). Undoing the batch restores a row only while it still holds what the
-- batch wrote: a row the application changed since keeps the application's value.
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                  WHERE attrelid = 'flotilla.prior_images'::regclass AND attname = 'post'
                    AND NOT attisdropped) THEN
    ALTER TABLE flotilla.prior_images ADD COLUMN post boolean NOT NULL DEFAULT false;
  END IF;
END $$;

-- version 4: which schema each tenant's journal rows were written in (its OID, recorded when
-- the agent first saw the tenant, with the OID schema flotilla had then: a row recorded in
-- another database, restored or copied here with the journal, is recorded again, not
-- compared). The journal is keyed by the tenant's name: a schema of that name that is
-- another one (dropped and made again, or restored on its own) may or may not hold what
-- the journal says, and only an operator knows which: the agent runs nothing there and
-- refuses plans over it until one says, with flotilla.tenant_is_new (its former rows go to
-- the history, its migrations run again) or flotilla.tenant_kept_its_history (the schema
-- holds what the journal says: a restore). A gone tenant's rows stay (its history).
CREATE TABLE IF NOT EXISTS flotilla.tenant_schemas (
  target text PRIMARY KEY,
  schema_oid oid NOT NULL,
  recorded_in oid NOT NULL,
  seen_at timestamptz NOT NULL DEFAULT now()
);

-- Records the schemas of `p_targets` not recorded here yet; returns those whose schema is
-- not the one recorded. Changes nothing of theirs.
CREATE OR REPLACE FUNCTION flotilla.record_tenant_schemas(p_targets text[])
RETURNS SETOF text LANGUAGE sql AS $fn$
  WITH here AS (
    SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = 'flotilla'
  ), now_seen AS (
    SELECT n.nspname::text AS target, n.oid AS schema_oid
      FROM pg_catalog.pg_namespace n WHERE n.nspname = ANY (p_targets)
  ), unclaimed AS (
    -- Another schema under the name, but nothing of the one before to answer for (no
    -- journal row, checkpoint or prior image): recorded again, nothing said. A tenant made,
    -- dropped before any plan ran there, and made again was refused as changed, its
    -- message speaking of journal rows it did not have.
    SELECT c.target FROM now_seen c JOIN flotilla.tenant_schemas t ON t.target = c.target
     WHERE t.recorded_in = (SELECT oid FROM here) AND t.schema_oid <> c.schema_oid
       AND NOT EXISTS (SELECT 1 FROM flotilla.journal j WHERE j.target = c.target)
       AND NOT EXISTS (SELECT 1 FROM flotilla.checkpoints k WHERE k.target = c.target)
       AND NOT EXISTS (SELECT 1 FROM flotilla.prior_images p WHERE p.target = c.target)
  ), recorded AS (
    -- (only what is new, recorded elsewhere, or unclaimed: a pass over a recorded fleet
    -- writes nothing)
    INSERT INTO flotilla.tenant_schemas AS s (target, schema_oid, recorded_in)
    SELECT c.target, c.schema_oid, (SELECT oid FROM here) FROM now_seen c
     WHERE NOT EXISTS (SELECT 1 FROM flotilla.tenant_schemas t
                        WHERE t.target = c.target AND t.recorded_in = (SELECT oid FROM here))
        OR c.target IN (SELECT target FROM unclaimed)
    ON CONFLICT ON CONSTRAINT tenant_schemas_pkey DO UPDATE
      SET schema_oid = EXCLUDED.schema_oid, recorded_in = EXCLUDED.recorded_in, seen_at = now()
      WHERE s.recorded_in <> EXCLUDED.recorded_in OR s.schema_oid <> EXCLUDED.schema_oid
  )
  SELECT s.target FROM flotilla.tenant_schemas s JOIN now_seen c ON c.target = s.target
   WHERE s.recorded_in = (SELECT oid FROM here) AND s.schema_oid <> c.schema_oid
     AND s.target NOT IN (SELECT target FROM unclaimed)
$fn$;

-- Fails (FL006) when the tenant's schema is not the one its journal rows were written in
-- (as flotilla.record_tenant_schemas says, with history of the one before): called with the
-- fence by every fenced step and undo of a tenant, so that a plan under way runs nothing
-- there once the schema changed under it (the agent's discovery said "nothing runs there",
-- and a running plan's steps went on there, its journal mixing two schemas' rows).
CREATE OR REPLACE FUNCTION flotilla.check_tenant_schema(p_target text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
  IF EXISTS (SELECT 1 FROM flotilla.tenant_schemas t, pg_catalog.pg_namespace n,
                           pg_catalog.pg_namespace f
              WHERE t.target = p_target AND n.nspname = p_target AND f.nspname = 'flotilla'
                AND t.recorded_in = f.oid AND t.schema_oid <> n.oid)
     AND (EXISTS (SELECT 1 FROM flotilla.journal j WHERE j.target = p_target)
          OR EXISTS (SELECT 1 FROM flotilla.checkpoints k WHERE k.target = p_target)
          OR EXISTS (SELECT 1 FROM flotilla.prior_images q WHERE q.target = p_target)) THEN
    RAISE EXCEPTION USING ERRCODE = 'FL006',
      MESSAGE = format('tenant %s: its schema is not the one its journal rows were written in (dropped and made again, or restored on its own), so what is applied there is not known; nothing runs there until an operator says which, on the shard: SELECT flotilla.tenant_is_new(%L) for a new tenant (its journal rows go to flotilla.journal_history, its migrations run again), or SELECT flotilla.tenant_kept_its_history(%L) if it holds what its journal says', p_target, p_target, p_target);
  END IF;
END
$fn$;

-- Refuses an operator's answer for a tenant whose recorded schema is on the shard under
-- another name (renamed away, a new schema made under this one): that tenant holds this
-- name's history, and an answer here would cut it off from it (its migrations then ran
-- again there). The names first.
CREATE OR REPLACE FUNCTION flotilla.refuse_renamed_away(p_target text) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  v_elsewhere name;
BEGIN
  IF EXISTS (SELECT 1 FROM flotilla.journal j WHERE j.target = p_target) THEN
    SELECT n.nspname INTO v_elsewhere FROM flotilla.tenant_schemas t
      JOIN pg_catalog.pg_namespace n ON n.oid = t.schema_oid
     WHERE t.target = p_target AND n.nspname <> p_target
       AND t.recorded_in = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'flotilla');
    IF v_elsewhere IS NOT NULL THEN
      RAISE EXCEPTION 'the schema recorded for % is on this shard as %, which holds its history (renamed): put the names back first (or move that history to %: see flotilla fleet show)',
        quote_ident(p_target), quote_ident(v_elsewhere), quote_ident(v_elsewhere);
    END IF;
  END IF;
END
$fn$;

-- An operator's answer for a tenant whose schema changed: a new tenant. The journal rows of
-- the schema before go to the history (rolled_back_by_plan 'flotilla:tenant-is-new'), with
-- its checkpoints and prior images (of objects gone with it); the schema there now is
-- recorded. Returns how many journal rows moved.
CREATE OR REPLACE FUNCTION flotilla.tenant_is_new(p_target text) RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
  v_oid oid := (SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = p_target);
  v_moved bigint;
BEGIN
  IF v_oid IS NULL THEN
    RAISE EXCEPTION 'no schema % on this shard', quote_ident(p_target);
  END IF;
  PERFORM flotilla.refuse_renamed_away(p_target);
  WITH gone AS (
    DELETE FROM flotilla.journal j WHERE j.target = p_target RETURNING j.*
  ), kept AS (
    INSERT INTO flotilla.journal_history (target, migration_id, checksum, plan_id, epoch,
        started_at, finished_at, rolled_back_at, rolled_back_by_plan, rolled_back_epoch)
    SELECT g.target, g.migration_id, g.checksum, g.plan_id, g.epoch, g.started_at,
           g.finished_at, now(), 'flotilla:tenant-is-new', g.epoch
      FROM gone g
    RETURNING 1
  )
  SELECT count(*) INTO v_moved FROM kept;
  DELETE FROM flotilla.checkpoints c WHERE c.target = p_target;
  DELETE FROM flotilla.prior_images i WHERE i.target = p_target;
  PERFORM flotilla.tenant_kept_its_history(p_target);
  RETURN v_moved;
END
$fn$;

-- An operator's answer for a tenant whose schema changed: it holds what its journal says
-- (restored on its own, renamed into place). The schema there now is recorded.
CREATE OR REPLACE FUNCTION flotilla.tenant_kept_its_history(p_target text) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  v_oid oid := (SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = p_target);
BEGIN
  IF v_oid IS NULL THEN
    RAISE EXCEPTION 'no schema % on this shard', quote_ident(p_target);
  END IF;
  PERFORM flotilla.refuse_renamed_away(p_target);
  INSERT INTO flotilla.tenant_schemas (target, schema_oid, recorded_in)
  VALUES (p_target, v_oid, (SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = 'flotilla'))
  ON CONFLICT (target) DO UPDATE
    SET schema_oid = EXCLUDED.schema_oid, recorded_in = EXCLUDED.recorded_in, seen_at = now();
END
$fn$;

INSERT INTO flotilla.meta (key, value) VALUES ('schema_version', '4')
  ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
