-- Flotilla's schema on a shard, version 1. Run by the agent at start, inside a transaction
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

-- the progress of a batched data change on a target: written in each batch's own transaction
-- (exactly-once per batch), deleted with the journal row's insert when the change ends.
-- last_key is the key's text form; the next batch starts after it.
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

-- Moves a checkpoint from p_prev (NULL: none yet) to p_last, in the caller's batch
-- transaction. Fails (FL004) when the checkpoint is not where the caller found it: another
-- run did this batch, so this one must not commit it again.
CREATE OR REPLACE FUNCTION flotilla.advance_checkpoint(p_target text, p_migration text,
  p_checksum text, p_plan text, p_prev text, p_last text, p_rows bigint) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
  n bigint;
BEGIN
  IF p_prev IS NULL THEN
    INSERT INTO flotilla.checkpoints AS c (target, migration_id, checksum, plan_id, last_key, rows, batches, updated_at)
      VALUES (p_target, p_migration, p_checksum, p_plan, p_last, p_rows, 1, clock_timestamp())
      ON CONFLICT (target, migration_id) DO NOTHING;
  ELSE
    UPDATE flotilla.checkpoints
       SET last_key = p_last, rows = rows + p_rows, batches = batches + 1, plan_id = p_plan,
           updated_at = clock_timestamp()
     WHERE target = p_target AND migration_id = p_migration AND checksum = p_checksum
       AND last_key = p_prev;
  END IF;
  GET DIAGNOSTICS n = ROW_COUNT;
  IF n <> 1 THEN
    RAISE EXCEPTION USING ERRCODE = 'FL004',
      MESSAGE = format('checkpoint of %s on target %L is no longer at %L: another run did this batch',
                       p_migration, p_target, coalesce(p_prev, '(start)'));
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

INSERT INTO flotilla.meta (key, value) VALUES ('schema_version', '1')
  ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
