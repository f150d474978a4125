//! The flotilla schema on the shard (`schema.sql`): installing it, and the reads and fence
//! moves the agent makes outside a step's own transaction. What a step writes into it (its
//! journal row, the fence check) rides in the step's query: see `step::sql`.
use std::collections::BTreeMap;

use flotilla_core::pb;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnection, PgPool};
use tracing::{info, instrument};

use crate::error::AgentError;

/// The schema version this agent installs and understands.
pub const SCHEMA_VERSION: u32 = 4;
const SCHEMA_SQL: &str = include_str!("schema.sql");

/// One journal row, as the agent reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JournalRow {
    pub target: String,
    pub migration_id: String,
    pub checksum: String,
    /// The plan that applied it.
    pub plan_id: String,
}

/// Installs or upgrades the flotilla schema, once at a time across agents.
#[instrument(skip_all, fields(shard = %shard))]
pub(crate) async fn install_schema(pool: &PgPool, shard: &str) -> Result<(), AgentError> {
    let err = |what, error| AgentError::Shard {
        shard: shard.to_string(),
        what,
        error,
    };
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| err("opening the schema transaction", e))?;
    // CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema is
    // there: the least-privileged role (deploy/sql/agent-role.sql) owns schema flotilla but
    // may not create schemas, so it is created only when missing.
    sqlx::raw_sql(
        "SELECT pg_advisory_xact_lock(hashtext('flotilla.schema'));
         DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'flotilla') THEN
             CREATE SCHEMA flotilla;
           END IF;
         END $$;
         CREATE TABLE IF NOT EXISTS flotilla.meta (key text PRIMARY KEY, value text);",
    )
    .execute(&mut *tx)
    .await
    .map_err(|e| err("installing the flotilla schema", e))?;
    let found = newer_schema(&mut tx)
        .await
        .map_err(|e| err("reading the flotilla schema version", e))?;
    if let Some(found) = found {
        return Err(AgentError::SchemaTooNew {
            shard: shard.to_string(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    sqlx::raw_sql(SCHEMA_SQL)
        .execute(&mut *tx)
        .await
        .map_err(|e| err("installing the flotilla schema", e))?;
    claim_database(&mut tx, shard).await?;
    tx.commit()
        .await
        .map_err(|e| err("committing the flotilla schema", e))?;
    info!(version = SCHEMA_VERSION, "flotilla schema ready");
    Ok(())
}

/// The shard's flotilla schema version when it is newer than this agent's (an agent of a
/// newer release upgraded it): this agent must not serve the shard, since it would not heed
/// what the newer schema records (e.g. the down statements a rollback cut short has done).
pub(crate) async fn newer_schema(conn: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
    let found: Option<String> =
        sqlx::query_scalar("SELECT value FROM flotilla.meta WHERE key = 'schema_version'")
            .fetch_optional(&mut *conn)
            .await?
            .flatten();
    Ok(found.filter(|found| found.parse::<u32>().map_or(true, |v| v > SCHEMA_VERSION)))
}

/// Records which shard this database belongs to on the first start (`flotilla.meta` key
/// `shard`), and refuses a database recorded for another shard: its fence and journal are
/// that shard's, and a DSN copied from another agent must not move them.
async fn claim_database(conn: &mut PgConnection, shard: &str) -> Result<(), AgentError> {
    let err = |what, error| AgentError::Shard {
        shard: shard.to_string(),
        what,
        error,
    };
    let (recorded, database): (Option<String>, String) = sqlx::query_as(
        "SELECT (SELECT value FROM flotilla.meta WHERE key = 'shard'), current_database()::text",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| err("reading which shard the database belongs to", e))?;
    match recorded {
        Some(recorded) if recorded == shard => Ok(()),
        Some(recorded) => Err(AgentError::WrongShard {
            shard: shard.to_string(),
            recorded,
            database,
        }),
        None => {
            sqlx::query("INSERT INTO flotilla.meta (key, value) VALUES ('shard', $1)")
                .bind(shard)
                .execute(&mut *conn)
                .await
                .map_err(|e| err("recording which shard the database belongs to", e))?;
            info!(%database, "database recorded as this shard's");
            Ok(())
        }
    }
}

/// Before the agent takes the shard's lock: the shard this database was recorded for, if
/// any. A copied DSN is then refused as such, naming both shards, rather than as "another
/// agent is attached" (the lock is that shard's own agent's).
pub(crate) async fn check_claim(pool: &PgPool, shard: &str) -> Result<(), AgentError> {
    let err = |error| AgentError::Shard {
        shard: shard.to_string(),
        what: "reading which shard the database belongs to",
        error,
    };
    let (installed, database): (bool, String) =
        sqlx::query_as("SELECT to_regclass('flotilla.meta') IS NOT NULL, current_database()::text")
            .fetch_one(pool)
            .await
            .map_err(err)?;
    if !installed {
        return Ok(());
    }
    let recorded: Option<String> =
        sqlx::query_scalar("SELECT value FROM flotilla.meta WHERE key = 'shard'")
            .fetch_optional(pool)
            .await
            .map_err(err)?
            .flatten();
    match recorded {
        Some(recorded) if recorded != shard => Err(AgentError::WrongShard {
            shard: shard.to_string(),
            recorded,
            database,
        }),
        _ => Ok(()),
    }
}

/// Which database this is, as the Hello says it (`pb::Hello::database`): the server's
/// system identifier (set by initdb, the same on a physical replica that takes over) and
/// the database's name. pg_control_system() is executable by any role by default; revoked,
/// the identifier reads as `?`.
pub(crate) async fn database_identity(pool: &PgPool) -> String {
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await
        .unwrap_or_default();
    let server: Option<String> =
        sqlx::query_scalar("SELECT system_identifier::text FROM pg_catalog.pg_control_system()")
            .fetch_one(pool)
            .await
            .ok();
    format!("{}/{database}", server.as_deref().unwrap_or("?"))
}

/// Whether the agent's role is a superuser (it should not be: see deploy/sql/agent-role.sql).
pub(crate) async fn is_superuser(pool: &PgPool) -> Result<(String, bool), sqlx::Error> {
    sqlx::query_as(
        "SELECT current_user::text, rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
    )
    .fetch_one(pool)
    .await
}

/// How long advancing the fence waits for the fence row. A prepared transaction holds it
/// (FOR SHARE) until it is resolved, however long that takes: a newer epoch cannot be written
/// meanwhile, and the steps of that epoch fail on their own fence check until it is.
const FENCE_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '2s'";

/// Moves the shard's fence up to `epoch` in a transaction of its own. Step
/// transactions then only read the fence row (FOR SHARE); were the first step of
/// a new epoch to advance it, every other step would queue behind that one
/// step's whole transaction, however long it runs.
pub(crate) async fn advance_fence(pool: &PgPool, epoch: u64) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(FENCE_LOCK_TIMEOUT).execute(&mut *tx).await?;
    sqlx::query("SELECT flotilla.check_fence($1)")
        .bind(epoch as i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// The newest epoch the shard has seen, read without taking the row's lock.
/// Whether the shard's journal holds no row, applied or undone: a database no step of
/// Flotilla's ran on (or ran and was moved to the history of).
pub(crate) async fn journal_empty(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM flotilla.journal) \
            AND NOT EXISTS (SELECT 1 FROM flotilla.journal_history)",
    )
    .fetch_one(pool)
    .await
}

pub(crate) async fn read_fence(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM flotilla.fence")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(epoch).unwrap_or(0))
}

/// A journal row `j` whose step a rollback began to undo and did not finish (its checkpoint
/// marked undoing) is not the step applied: what it says is done was undone in part. No
/// reader takes it as applied: not a run (the step refuses to go on until a rollback
/// finishes), not a preflight (which would skip the step and call the plan done), not the
/// fleet view (which would show the target at a version it is not at).
const NOT_UNDOING: &str = "NOT EXISTS (SELECT 1 FROM flotilla.checkpoints c \
     WHERE c.target = j.target AND c.migration_id = j.migration_id AND c.undoing)";

/// The rows of `select` (a query on a table with a `target` column, ending in its WHERE
/// clause) on every target, or on those of `targets`, ordered by `order`.
async fn rows_of_targets<T>(
    conn: &mut PgConnection,
    select: &str,
    order: &str,
    targets: Option<&[String]>,
) -> Result<Vec<T>, sqlx::Error>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let only = if targets.is_some() {
        " AND target = ANY($1)"
    } else {
        ""
    };
    let query = sqlx::query_as(AssertSqlSafe(format!("{select}{only} ORDER BY {order}")));
    match targets {
        Some(targets) => query.bind(targets).fetch_all(conn).await,
        None => query.fetch_all(conn).await,
    }
}

/// The steps begun and not finished, from their checkpoints, on every target or those of
/// `targets`: those a rollback began to undo (marked undoing; the fleet view counts them as
/// not applied, see [`NOT_UNDOING`], and says why from these), and those a run began (a data
/// change between batches, a non-transactional step between statements: a checkpoint goes
/// with the step's journal row), which the fleet view shows part-way.
pub(crate) async fn read_cut_short(
    conn: &mut PgConnection,
    targets: Option<&[String]>,
) -> Result<Vec<pb::CutShort>, sqlx::Error> {
    type Row = (String, String, String, i64, i32, bool, i64, i64, i32);
    let rows: Vec<Row> = rows_of_targets(
        conn,
        "SELECT target, migration_id, plan_id, (extract(epoch FROM updated_at) * 1000)::bigint, \
         undone, undoing, rows, batches, statements FROM flotilla.checkpoints WHERE true",
        "updated_at",
        targets,
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(target, migration_id, plan_id, at_ms, undone, undoing, rows, batches, statements)| {
                pb::CutShort {
                    target,
                    migration_id,
                    plan_id,
                    at_ms,
                    undone: u32::try_from(undone).unwrap_or(0),
                    applying: !undoing,
                    rows,
                    batches,
                    statements: u32::try_from(statements).unwrap_or(0),
                }
            },
        )
        .collect())
}

/// Journal rows as the coordinator's fleet view takes them: every row, or those of
/// `targets`, in the order they were applied.
pub(crate) async fn read_entries(
    conn: &mut PgConnection,
    targets: Option<&[String]>,
) -> Result<Vec<pb::JournalEntry>, sqlx::Error> {
    type Row = (String, String, String, String, i64, i64, i64);
    let rows: Vec<Row> = rows_of_targets(
        conn,
        &format!(
            "SELECT target, migration_id, checksum, plan_id, \
             (extract(epoch FROM finished_at) * 1000)::bigint, \
             greatest((extract(epoch FROM finished_at - started_at) * 1000)::bigint, 0), seq \
             FROM flotilla.journal j WHERE {NOT_UNDOING}"
        ),
        "seq",
        targets,
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(target, migration_id, checksum, plan_id, at, duration, seq)| pb::JournalEntry {
                target,
                migration_id,
                checksum,
                plan_id,
                applied_at_ms: at,
                duration_ms: u64::try_from(duration).unwrap_or(0),
                seq,
            },
        )
        .collect())
}

/// Of `targets`, those whose schema is not the one their journal rows were written in
/// (dropped and made again, or restored on its own: `flotilla.record_tenant_schemas`);
/// the schemas not recorded yet are recorded. Nothing of theirs is changed: whether such a
/// schema holds what its journal says, only an operator knows ([`changed_schema`]).
pub(crate) async fn changed_schemas(
    pool: &PgPool,
    targets: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT flotilla.record_tenant_schemas($1)")
        .bind(targets)
        .fetch_all(pool)
        .await
}

/// What a run, a preflight and the log say of a tenant whose schema changed, with the two
/// answers an operator can give on the shard.
pub(crate) fn changed_schema(shard: &str, tenant: &str) -> String {
    let literal = format!("'{}'", tenant.replace('\'', "''"));
    format!(
        "tenant {tenant:?} of shard {shard}: its schema is not the one its journal rows were written in (dropped and made again, or restored on its own), so what is applied there is not known; nothing runs there until an operator says which, on the shard: SELECT flotilla.tenant_is_new({literal}) for a new tenant (its journal rows go to flotilla.journal_history, its migrations run again), or SELECT flotilla.tenant_kept_its_history({literal}) if it holds what its journal says"
    )
}

/// Those of the tenants `$1` whose schema is one recorded for another tenant with journal
/// rows (or checkpoints) there: renamed (`ALTER SCHEMA ... RENAME`), or swapped with it (two
/// renames through a third name), whichever name the other has now. Columns `target`,
/// `renamed_from`. What is applied there is in the other name's rows: taken for a new tenant
/// it ran its migrations again (a catch-up ran them over the renamed tenant's own columns);
/// taken for a changed schema, `tenant_kept_its_history` put the wrong history on it. Not a
/// tenant served as itself since: rows of its own, under the schema recorded for it (one
/// renamed before this check, caught up since, is left as it is).
const RENAMED: &str = "SELECT c.nspname::text AS target, t.target AS renamed_from \
     FROM pg_catalog.pg_namespace c JOIN flotilla.tenant_schemas t \
       ON t.schema_oid = c.oid AND t.target <> c.nspname::text \
      AND t.recorded_in = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'flotilla') \
    WHERE c.nspname = ANY($1) \
      AND (EXISTS (SELECT 1 FROM flotilla.journal j WHERE j.target = t.target) \
        OR EXISTS (SELECT 1 FROM flotilla.checkpoints k WHERE k.target = t.target)) \
      AND NOT (EXISTS (SELECT 1 FROM flotilla.journal j WHERE j.target = c.nspname::text) \
        AND EXISTS (SELECT 1 FROM flotilla.tenant_schemas own WHERE own.target = c.nspname::text \
              AND own.schema_oid = c.oid \
              AND own.recorded_in = t.recorded_in))";

/// Tenants among `targets` renamed from another ([`RENAMED`]): (tenant, its name before).
pub(crate) async fn renamed_tenants(
    pool: &PgPool,
    targets: &[String],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(RENAMED).bind(targets).fetch_all(pool).await
}

/// What a run, a preflight and the log say of a tenant renamed from `before`, with the two
/// answers an operator can give.
pub(crate) fn renamed_tenant(shard: &str, tenant: &str, before: &str) -> String {
    let (now_lit, before_lit) = (tenant.replace('\'', "''"), before.replace('\'', "''"));
    format!(
        "tenant {tenant:?} of shard {shard} is tenant {before:?} renamed (the same schema): what \
         is applied there is in {before:?}'s journal rows, so nothing runs there (its migrations \
         would run again) until it is renamed back (ALTER SCHEMA {} RENAME TO {}; through a \
         third name if that name is in use, as after a swap), or, with no journal rows of its \
         own, its history is moved to its new name, on the shard: UPDATE flotilla.journal SET target = \
         '{now_lit}' WHERE target = '{before_lit}'; UPDATE flotilla.checkpoints SET target = \
         '{now_lit}' WHERE target = '{before_lit}'; UPDATE flotilla.prior_images SET target = \
         '{now_lit}' WHERE target = '{before_lit}'",
        flotilla_core::sql::quote_ident(tenant),
        flotilla_core::sql::quote_ident(before),
    )
}

/// What [`read_applied`] found.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub rows: Vec<JournalRow>,
    /// Targets whose schema changed ([`changed_schemas`]), of which nothing is read.
    pub changed: Vec<String>,
    /// Tenants renamed from another ([`RENAMED`]): (tenant, its name before).
    pub renamed: Vec<(String, String)>,
    /// Tenants whose schema is not on the shard (dropped since the plan was submitted).
    pub gone: Vec<String>,
}

/// What a run says of a tenant gone from its shard (its schema dropped during the plan).
pub(crate) fn gone_tenant(tenant: &str) -> String {
    format!(
        "tenant {tenant:?} is gone from its shard (its schema was dropped after the plan was \
         submitted): the step did not run there"
    )
}

/// The error phase of a step not run on a tenant gone from its shard ([`gone_tenant`]).
pub(crate) const GONE: &str = "gone";

/// Those of `targets` (tenants) whose schema is not on the shard under their name, each with
/// the name its schema has now when it was renamed (the schema recorded for it, by OID, is
/// there under another name), or None when it is gone (dropped).
pub(crate) async fn gone_or_renamed(
    pool: &PgPool,
    targets: &[String],
) -> Result<Vec<(String, Option<String>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT g.target, (SELECT n.nspname::text FROM flotilla.tenant_schemas t \
              JOIN pg_catalog.pg_namespace n ON n.oid = t.schema_oid \
             WHERE t.target = g.target \
               AND t.recorded_in = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'flotilla')) \
           FROM unnest($1::text[]) AS g(target) \
          WHERE g.target <> '' AND NOT EXISTS \
            (SELECT 1 FROM pg_catalog.pg_namespace n WHERE n.nspname = g.target::name)",
    )
    .bind(targets)
    .fetch_all(pool)
    .await
}

/// What a rollback says of a tenant gone from its shard: nothing to undo there.
pub(crate) fn gone_in_rollback(tenant: &str) -> String {
    format!(
        "tenant {tenant:?} is gone from its shard (its schema was dropped): nothing of the plan \
         is left there to undo; its journal rows stay, as its history"
    )
}

/// What a rollback says of a tenant whose schema was renamed: its down SQL is not run under
/// another name.
pub(crate) fn renamed_in_rollback(shard: &str, tenant: &str, now: &str) -> String {
    format!(
        "tenant {tenant:?} of shard {shard} was renamed to {now:?} (the same schema): its steps \
         are not undone under another name; rename it back (ALTER SCHEMA {} RENAME TO {}) and \
         roll back again",
        flotilla_core::sql::quote_ident(now),
        flotilla_core::sql::quote_ident(tenant)
    )
}

/// Journal rows for any of `targets` × `migrations`: one read for a whole batch of runs
/// (not those a rollback cut short: see [`NOT_UNDOING`]); those of `targets` whose schema
/// changed ([`changed_schemas`]), of which nothing is read; and the tenants among `targets`
/// whose schema is gone.
pub(crate) async fn read_applied(
    conn: &mut PgConnection,
    targets: &[String],
    migrations: &[String],
) -> Result<Applied, sqlx::Error> {
    // One round trip (a batch of runs waits on it): the changed schemas come as rows of
    // their own, flagged. Read, not recorded: the schemas are recorded at each discovery
    // (a tenant is run on only once discovered), and `record_tenant_schemas` is planned
    // again at each call (a function whose statement writes): 3 ms a batch, against half
    // a millisecond for this read. Its test of what is changed, the same.
    let rows: Vec<(String, String, String, String, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT j.target, j.migration_id, j.checksum, j.plan_id, 'row' FROM flotilla.journal j \
         WHERE j.target = ANY($1) AND j.migration_id = ANY($2) AND {NOT_UNDOING} \
         UNION ALL SELECT g.target, '', '', '', 'gone' FROM unnest($1::text[]) AS g(target) \
          WHERE g.target <> '' AND NOT EXISTS \
            (SELECT 1 FROM pg_catalog.pg_namespace n WHERE n.nspname = g.target::name) \
         UNION ALL SELECT r.target, '', '', r.renamed_from, 'renamed' FROM ({RENAMED}) r \
         UNION ALL SELECT t.target, '', '', '', 'changed' FROM flotilla.tenant_schemas t \
           JOIN pg_catalog.pg_namespace n ON n.nspname = t.target::name \
          WHERE t.target = ANY($1) AND t.schema_oid <> n.oid \
            AND t.recorded_in = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'flotilla') \
            AND (EXISTS (SELECT 1 FROM flotilla.journal j WHERE j.target = t.target) \
              OR EXISTS (SELECT 1 FROM flotilla.checkpoints k WHERE k.target = t.target) \
              OR EXISTS (SELECT 1 FROM flotilla.prior_images p WHERE p.target = t.target))"
    )))
    .bind(targets)
    .bind(migrations)
    .fetch_all(&mut *conn)
    .await?;
    let of = |kind: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| r.4 == kind)
            .map(|r| r.0.clone())
            .collect()
    };
    let (changed, gone) = (of("changed"), of("gone"));
    let renamed: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r.4 == "renamed")
        .map(|r| (r.0.clone(), r.3.clone()))
        .collect();
    let rows = rows
        .into_iter()
        .filter(|(target, _, _, _, kind)| kind == "row" && !changed.contains(target))
        .map(|(target, migration_id, checksum, plan_id, _)| JournalRow {
            target,
            migration_id,
            checksum,
            plan_id,
        })
        .collect();
    Ok(Applied {
        rows,
        changed,
        renamed,
        gone,
    })
}

/// Journal rows of the given migrations, on every target, for a preflight: those applied,
/// and apart those a rollback cut short (not applied: see [`NOT_UNDOING`]; but Flotilla's,
/// so no baseline is missing there).
pub(crate) async fn read_for_preflight(
    pool: &PgPool,
    migrations: &[String],
) -> Result<(Vec<pb::AppliedStep>, Vec<pb::AppliedStep>), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let rows: Vec<(String, String, String, String, bool)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT target, migration_id, checksum, plan_id, {NOT_UNDOING} \
             FROM flotilla.journal j WHERE migration_id = ANY($1) ORDER BY target, seq"
    )))
    .bind(migrations)
    .fetch_all(&mut *conn)
    .await?;
    let mut applied = Vec::with_capacity(rows.len());
    let mut undoing = Vec::new();
    for (tenant, migration_id, checksum, plan_id, not_undoing) in rows {
        let step = pb::AppliedStep {
            tenant,
            migration_id,
            checksum,
            plan_id,
        };
        if not_undoing {
            applied.push(step);
        } else {
            undoing.push(step);
        }
    }
    Ok((applied, undoing))
}

/// A journal or checkpoint row (`o`) whose target is the shard itself, or a tenant on it,
/// under its name or renamed (its recorded schema there under another name: not undone, the
/// rollback says so); one whose schema was dropped is gone ([`gone_or_renamed`]).
const TARGET_THERE: &str = "(o.target = '' OR EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n \
     WHERE n.nspname = o.target::name) OR EXISTS (SELECT 1 FROM flotilla.tenant_schemas t \
     JOIN pg_catalog.pg_namespace n ON n.oid = t.schema_oid WHERE t.target = o.target \
       AND t.recorded_in = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'flotilla')))";

/// The journal rows a plan applied, per target in reverse order of application.
pub(crate) async fn read_plan_rows(
    pool: &PgPool,
    plan_id: &str,
) -> Result<BTreeMap<String, Vec<String>>, sqlx::Error> {
    // A step the plan left part-way (a data change or a non-transactional step that failed
    // or halted) has a checkpoint of the plan and no journal row: it is the newest change on
    // its target, so it is undone first (newest first, should there be several).
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT target, migration_id FROM ( \
           SELECT target, migration_id, 0 AS part, 0::bigint AS seq, started_at FROM flotilla.checkpoints c \
            WHERE plan_id = $1 AND NOT EXISTS (SELECT 1 FROM flotilla.journal j \
              WHERE j.target = c.target AND j.migration_id = c.migration_id) \
           UNION ALL \
           SELECT target, migration_id, 1, seq, NULL FROM flotilla.journal WHERE plan_id = $1) r \
         ORDER BY target, part, seq DESC, started_at DESC",
    )
    .bind(plan_id)
    .fetch_all(pool)
    .await?;
    let mut by_target: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (target, migration) in rows {
        by_target.entry(target).or_default().push(migration);
    }
    Ok(by_target)
}

/// How many journal rows of a plan are left on the shard, with the checkpoints of data
/// changes it left part-way.
pub(crate) async fn count_plan_rows(pool: &PgPool, plan_id: &str) -> Result<i64, sqlx::Error> {
    // (not those of tenants gone from the shard: nothing of the plan is left there, and
    // their rows stay as their history)
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT (SELECT count(*) FROM flotilla.journal o WHERE o.plan_id = $1 AND {TARGET_THERE}) \
              + (SELECT count(*) FROM flotilla.checkpoints o WHERE o.plan_id = $1 AND {TARGET_THERE})"
    )))
    .bind(plan_id)
    .fetch_one(pool)
    .await
}
