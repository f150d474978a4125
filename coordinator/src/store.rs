//! The control store: plans, steps, attempts, agents and the audit trail, through
//! sqlx's `Any` driver so the same SQL runs on the embedded SQLite file and on
//! PostgreSQL (`--store postgres://...`). Its own schema is migrated at start.
//!
//! The store is the coordinator's memory, not the truth about shards: after any
//! doubt the agents' journals win (DESIGN invariant 1).
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

use flotilla_proto::pb;
use prost::Message;

use crate::error::CoordinatorError;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS flotilla_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS plans (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, environment TEXT NOT NULL, state TEXT NOT NULL,
        policy TEXT NOT NULL, spec_hex TEXT NOT NULL, epoch BIGINT NOT NULL, message TEXT NOT NULL,
        submitted_by TEXT NOT NULL, created_at_ms BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL,
        targets BIGINT NOT NULL, steps BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS steps (
        plan_id TEXT NOT NULL, migration_id TEXT NOT NULL, shard TEXT NOT NULL, tenant TEXT NOT NULL,
        state TEXT NOT NULL, attempts BIGINT NOT NULL, sqlstate TEXT NOT NULL, message TEXT NOT NULL,
        duration_ms BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL,
        phase TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (plan_id, migration_id, shard, tenant))",
    "CREATE TABLE IF NOT EXISTS attempts (
        plan_id TEXT NOT NULL, migration_id TEXT NOT NULL, shard TEXT NOT NULL, tenant TEXT NOT NULL,
        run_id BIGINT NOT NULL, outcome TEXT NOT NULL, sqlstate TEXT NOT NULL, message TEXT NOT NULL,
        duration_ms BIGINT NOT NULL, at_ms BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS attempts_by_step ON attempts (plan_id, migration_id, shard, tenant)",
    "CREATE TABLE IF NOT EXISTS audit (
        id TEXT PRIMARY KEY, at_ms BIGINT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        plan_id TEXT NOT NULL, detail TEXT NOT NULL)",
    // the last progress of each data change of a finished plan (pb::DataProgress, hex)
    "CREATE TABLE IF NOT EXISTS data_progress (
        plan_id TEXT NOT NULL, migration_id TEXT NOT NULL, shard TEXT NOT NULL, tenant TEXT NOT NULL,
        progress_hex TEXT NOT NULL, PRIMARY KEY (plan_id, migration_id, shard, tenant))",
    "CREATE TABLE IF NOT EXISTS agents (
        shard TEXT PRIMARY KEY, labels TEXT NOT NULL, tenants TEXT NOT NULL, version TEXT NOT NULL,
        last_seen_ms BIGINT NOT NULL)",
];

#[derive(Debug, Clone)]
pub struct PlanRow {
    pub id: String,
    pub name: String,
    pub environment: String,
    pub state: String,
    pub policy: String,
    pub spec_hex: String,
    pub epoch: i64,
    pub message: String,
    pub submitted_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub targets: i64,
    pub steps: i64,
}

#[derive(Debug, Clone)]
pub struct StepRow {
    pub migration_id: String,
    pub shard: String,
    pub tenant: String,
    pub state: String,
    pub sqlstate: String,
    pub message: String,
    pub phase: String,
    pub detail: String,
}

/// One write the engine asks for; the writer applies them in order, many per transaction.
#[derive(Debug)]
pub enum StoreOp {
    InsertPlan {
        plan: PlanRow,
        steps: Vec<StepRow>,
    },
    PlanState {
        plan_id: String,
        state: String,
        message: String,
    },
    Steps {
        plan_id: String,
        updates: Vec<StepUpdate>,
    },
    Audit {
        actor: String,
        action: String,
        plan_id: String,
        detail: String,
    },
    Agent {
        shard: String,
        labels: String,
        tenants: String,
        version: String,
    },
    /// The last progress of a plan's data changes, kept for its status once it finished.
    DataProgress {
        plan_id: String,
        entries: Vec<pb::DataProgress>,
    },
    /// Answered once every op before it is applied.
    Flush(tokio::sync::oneshot::Sender<()>),
}

#[derive(Debug, Clone)]
pub struct StepUpdate {
    pub migration_id: String,
    pub shard: String,
    pub tenant: String,
    pub state: String,
    pub sqlstate: String,
    pub message: String,
    pub phase: String,
    pub detail: String,
    pub duration_ms: i64,
    /// Set when the update is the outcome of an attempt (a run came back).
    pub run_id: Option<i64>,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    is_pg: bool,
}

impl Store {
    /// Opens the store: a PostgreSQL URL, or a SQLite file path / `sqlite://` URL.
    pub async fn open(location: &str) -> Result<Store, CoordinatorError> {
        install_default_drivers();
        let is_pg = location.starts_with("postgres://") || location.starts_with("postgresql://");
        let url = if is_pg || location.starts_with("sqlite:") {
            location.to_string()
        } else {
            format!("sqlite://{location}?mode=rwc")
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if is_pg { 8 } else { 4 })
            .connect(&url)
            .await
            .map_err(|e| CoordinatorError::Store(format!("cannot open {}: {e}", flotilla_proto::secrets::redact_url(&url))))?;
        if !is_pg {
            // WAL lets status reads run beside the writer; NORMAL keeps commits cheap
            // (the shard journal, not this file, is the truth about what is applied).
            for pragma in ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL"] {
                sqlx::query(pragma)
                    .execute(&pool)
                    .await
                    .map_err(store_err)?;
            }
        }
        let store = Store { pool, is_pg };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), CoordinatorError> {
        let mut tx = self.pool.begin().await.map_err(store_err)?;
        if self.is_pg {
            // Coordinators of one HA group start together on one store: one
            // migrates, the others wait (CREATE ... IF NOT EXISTS is not safe
            // against a concurrent CREATE).
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('flotilla.control-store'))")
                .execute(&mut *tx)
                .await
                .map_err(store_err)?;
        }
        for ddl in SCHEMA {
            sqlx::query(*ddl)
                .execute(&mut *tx)
                .await
                .map_err(store_err)?;
        }
        let found: Option<String> =
            sqlx::query("SELECT value FROM flotilla_meta WHERE key = 'schema_version'")
                .fetch_optional(&mut *tx)
                .await
                .map_err(store_err)?
                .map(|r| r.get(0));
        match found.and_then(|v| v.parse::<i64>().ok()) {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(CoordinatorError::Store(format!(
                    "control store schema version {v} is newer than this coordinator's ({SCHEMA_VERSION})"
                )));
            }
            Some(_) => {}
            None => {
                sqlx::query("INSERT INTO flotilla_meta (key, value) VALUES ('schema_version', $1)")
                    .bind(SCHEMA_VERSION.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(store_err)?;
            }
        }
        tx.commit().await.map_err(store_err)
    }

    /// The embedded coordination backend's epoch: one more than any before it.
    pub async fn next_epoch(&self) -> Result<u64, CoordinatorError> {
        let mut tx = self.pool.begin().await.map_err(store_err)?;
        let cur: Option<String> =
            sqlx::query("SELECT value FROM flotilla_meta WHERE key = 'epoch'")
                .fetch_optional(&mut *tx)
                .await
                .map_err(store_err)?
                .map(|r| r.get(0));
        let next = cur.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + 1;
        sqlx::query(
            "INSERT INTO flotilla_meta (key, value) VALUES ('epoch', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(next.to_string())
        .execute(&mut *tx)
        .await
        .map_err(store_err)?;
        tx.commit().await.map_err(store_err)?;
        Ok(next)
    }

    /// Applies ops in one transaction (answers flushes after it commits).
    pub async fn apply(&self, ops: Vec<StoreOp>) -> Result<(), CoordinatorError> {
        let mut flushes = Vec::new();
        let mut tx = self.pool.begin().await.map_err(store_err)?;
        for op in ops {
            match op {
                StoreOp::Flush(done) => flushes.push(done),
                StoreOp::InsertPlan { plan, steps } => {
                    sqlx::query(
                        "INSERT INTO plans (id, name, environment, state, policy, spec_hex, epoch, message,
                            submitted_by, created_at_ms, updated_at_ms, targets, steps)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                    )
                    .bind(&plan.id)
                    .bind(&plan.name)
                    .bind(&plan.environment)
                    .bind(&plan.state)
                    .bind(&plan.policy)
                    .bind(&plan.spec_hex)
                    .bind(plan.epoch)
                    .bind(&plan.message)
                    .bind(&plan.submitted_by)
                    .bind(plan.created_at_ms)
                    .bind(plan.updated_at_ms)
                    .bind(plan.targets)
                    .bind(plan.steps)
                    .execute(&mut *tx)
                    .await
                    .map_err(store_err)?;
                    let now = now_ms();
                    for chunk in steps.chunks(100) {
                        let mut sql = String::from(
                            "INSERT INTO steps (plan_id, migration_id, shard, tenant, state, attempts, sqlstate,
                                message, duration_ms, updated_at_ms) VALUES ",
                        );
                        for i in 0..chunk.len() {
                            let b = i * 7;
                            if i > 0 {
                                sql.push(',');
                            }
                            sql.push_str(&format!(
                                "(${}, ${}, ${}, ${}, ${}, 0, ${}, ${}, 0, ${})",
                                b + 1,
                                b + 2,
                                b + 3,
                                b + 4,
                                b + 5,
                                b + 6,
                                b + 7,
                                // every row shares the timestamp, bound last
                                chunk.len() * 7 + 1
                            ));
                        }
                        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                        for s in chunk {
                            q = q
                                .bind(plan.id.clone())
                                .bind(s.migration_id.clone())
                                .bind(s.shard.clone())
                                .bind(s.tenant.clone())
                                .bind(s.state.clone())
                                .bind(s.sqlstate.clone())
                                .bind(s.message.clone());
                        }
                        q.bind(now).execute(&mut *tx).await.map_err(store_err)?;
                    }
                }
                StoreOp::PlanState {
                    plan_id,
                    state,
                    message,
                } => {
                    sqlx::query(
                        "UPDATE plans SET state = $1, message = $2, updated_at_ms = $3 WHERE id = $4",
                    )
                    .bind(state)
                    .bind(message)
                    .bind(now_ms())
                    .bind(plan_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(store_err)?;
                }
                StoreOp::Steps { plan_id, updates } => {
                    write_steps(&mut tx, &plan_id, updates).await?;
                }
                StoreOp::Audit {
                    actor,
                    action,
                    plan_id,
                    detail,
                } => {
                    sqlx::query(
                        "INSERT INTO audit (id, at_ms, actor, action, plan_id, detail)
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(uuid::Uuid::now_v7().to_string())
                    .bind(now_ms())
                    .bind(actor)
                    .bind(action)
                    .bind(plan_id)
                    .bind(detail)
                    .execute(&mut *tx)
                    .await
                    .map_err(store_err)?;
                }
                StoreOp::DataProgress { plan_id, entries } => {
                    for p in entries {
                        sqlx::query(
                            "INSERT INTO data_progress (plan_id, migration_id, shard, tenant, progress_hex)
                             VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT (plan_id, migration_id, shard, tenant)
                             DO UPDATE SET progress_hex = excluded.progress_hex",
                        )
                        .bind(&plan_id)
                        .bind(&p.migration_id)
                        .bind(&p.shard)
                        .bind(&p.tenant)
                        .bind(hex::encode(p.encode_to_vec()))
                        .execute(&mut *tx)
                        .await
                        .map_err(store_err)?;
                    }
                }
                StoreOp::Agent {
                    shard,
                    labels,
                    tenants,
                    version,
                } => {
                    sqlx::query(
                        "INSERT INTO agents (shard, labels, tenants, version, last_seen_ms)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (shard) DO UPDATE SET labels = excluded.labels,
                            tenants = excluded.tenants, version = excluded.version,
                            last_seen_ms = excluded.last_seen_ms",
                    )
                    .bind(shard)
                    .bind(labels)
                    .bind(tenants)
                    .bind(version)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await
                    .map_err(store_err)?;
                }
            }
        }
        tx.commit().await.map_err(store_err)?;
        for done in flushes {
            let _ = done.send(());
        }
        Ok(())
    }

    pub async fn plan(&self, id: &str) -> Result<Option<PlanRow>, CoordinatorError> {
        let row = sqlx::query(
            "SELECT id, name, environment, state, policy, spec_hex, epoch, message, submitted_by,
                created_at_ms, updated_at_ms, targets, steps FROM plans WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_err)?;
        Ok(row.map(|r| plan_row(&r)))
    }

    pub async fn plans(&self, limit: i64) -> Result<Vec<PlanRow>, CoordinatorError> {
        let rows = sqlx::query(
            "SELECT id, name, environment, state, policy, spec_hex, epoch, message, submitted_by,
                created_at_ms, updated_at_ms, targets, steps FROM plans
             ORDER BY created_at_ms DESC, id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(store_err)?;
        Ok(rows.iter().map(plan_row).collect())
    }

    /// Plans that were running (or rolling back) when the coordinator stopped.
    pub async fn unfinished_plans(&self) -> Result<Vec<PlanRow>, CoordinatorError> {
        let rows = sqlx::query(
            "SELECT id, name, environment, state, policy, spec_hex, epoch, message, submitted_by,
                created_at_ms, updated_at_ms, targets, steps FROM plans
             WHERE state IN ('running', 'rolling_back', 'cancelling', 'stopping', 'committing', 'aborting')
             ORDER BY created_at_ms",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(store_err)?;
        Ok(rows.iter().map(plan_row).collect())
    }

    /// The last progress of a finished plan's data changes.
    pub async fn data_progress(
        &self,
        plan_id: &str,
    ) -> Result<Vec<pb::DataProgress>, CoordinatorError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT progress_hex FROM data_progress WHERE plan_id = $1 \
             ORDER BY migration_id, shard, tenant",
        )
        .bind(plan_id)
        .fetch_all(&self.pool)
        .await
        .map_err(store_err)?;
        Ok(rows
            .into_iter()
            .filter_map(|(h,)| hex::decode(h).ok())
            .filter_map(|b| pb::DataProgress::decode(b.as_slice()).ok())
            .collect())
    }

    pub async fn steps(&self, plan_id: &str) -> Result<Vec<StepRow>, CoordinatorError> {
        let rows = sqlx::query(
            "SELECT migration_id, shard, tenant, state, sqlstate, message, phase, detail FROM steps
             WHERE plan_id = $1 ORDER BY shard, tenant, migration_id",
        )
        .bind(plan_id)
        .fetch_all(&self.pool)
        .await
        .map_err(store_err)?;
        Ok(rows
            .iter()
            .map(|r| StepRow {
                migration_id: r.get(0),
                shard: r.get(1),
                tenant: r.get(2),
                state: r.get(3),
                sqlstate: r.get(4),
                message: r.get(5),
                phase: r.get(6),
                detail: r.get(7),
            })
            .collect())
    }

    /// Agents seen before: (shard, labels json, tenants json, version, last seen).
    pub async fn agents(
        &self,
    ) -> Result<Vec<(String, String, String, String, i64)>, CoordinatorError> {
        let rows = sqlx::query(
            "SELECT shard, labels, tenants, version, last_seen_ms FROM agents ORDER BY shard",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(store_err)?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect())
    }

    pub async fn audit(
        &self,
        plan_id: &str,
    ) -> Result<Vec<(i64, String, String, String)>, CoordinatorError> {
        let rows = sqlx::query(
            "SELECT at_ms, actor, action, detail FROM audit WHERE plan_id = $1 ORDER BY at_ms, id",
        )
        .bind(plan_id)
        .fetch_all(&self.pool)
        .await
        .map_err(store_err)?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }
}

/// `($1, ..., $n), (...)` for `rows` rows of `cols` parameters.
fn values_list(rows: usize, cols: usize) -> String {
    let mut sql = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", r * cols + c + 1));
        }
        sql.push(')');
    }
    sql
}

/// Step updates and their attempts, many rows per statement: a rollout of
/// 1,000 tenants reports thousands of steps, and a statement per row would make
/// the store, not the shards, the slow part.
async fn write_steps(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    plan_id: &str,
    updates: Vec<StepUpdate>,
) -> Result<(), CoordinatorError> {
    let now = now_ms();
    // One row per step in a statement (an upsert may not touch a row twice):
    // the last update wins, attempts add up.
    let mut merged: Vec<(StepUpdate, i64)> = Vec::with_capacity(updates.len());
    let mut at: std::collections::HashMap<(String, String, String), usize> = Default::default();
    for u in &updates {
        let tries = i64::from(u.run_id.is_some());
        let key = (u.migration_id.clone(), u.shard.clone(), u.tenant.clone());
        match at.get(&key) {
            Some(&i) => {
                let n = merged[i].1 + tries;
                merged[i] = (u.clone(), n);
            }
            None => {
                at.insert(key, merged.len());
                merged.push((u.clone(), tries));
            }
        }
    }
    for chunk in merged.chunks(64) {
        let sql = format!(
            "INSERT INTO steps (plan_id, migration_id, shard, tenant, state, attempts, sqlstate, message,
                duration_ms, updated_at_ms, phase, detail) VALUES {}
             ON CONFLICT (plan_id, migration_id, shard, tenant) DO UPDATE SET
                state = excluded.state, attempts = steps.attempts + excluded.attempts,
                sqlstate = excluded.sqlstate, message = excluded.message,
                duration_ms = excluded.duration_ms, updated_at_ms = excluded.updated_at_ms,
                phase = excluded.phase, detail = excluded.detail",
            values_list(chunk.len(), 12)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (u, tries) in chunk {
            q = q
                .bind(plan_id.to_string())
                .bind(u.migration_id.clone())
                .bind(u.shard.clone())
                .bind(u.tenant.clone())
                .bind(u.state.clone())
                .bind(*tries)
                .bind(u.sqlstate.clone())
                .bind(u.message.clone())
                .bind(u.duration_ms)
                .bind(now)
                .bind(u.phase.clone())
                .bind(u.detail.clone());
        }
        q.execute(&mut **tx).await.map_err(store_err)?;
    }
    let attempts: Vec<&StepUpdate> = updates.iter().filter(|u| u.run_id.is_some()).collect();
    for chunk in attempts.chunks(64) {
        let sql = format!(
            "INSERT INTO attempts (plan_id, migration_id, shard, tenant, run_id, outcome, sqlstate,
                message, duration_ms, at_ms) VALUES {}",
            values_list(chunk.len(), 10)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for u in chunk {
            q = q
                .bind(plan_id.to_string())
                .bind(u.migration_id.clone())
                .bind(u.shard.clone())
                .bind(u.tenant.clone())
                .bind(u.run_id.unwrap_or_default())
                .bind(u.state.clone())
                .bind(u.sqlstate.clone())
                .bind(u.message.clone())
                .bind(u.duration_ms)
                .bind(now);
        }
        q.execute(&mut **tx).await.map_err(store_err)?;
    }
    Ok(())
}

fn plan_row(r: &sqlx::any::AnyRow) -> PlanRow {
    PlanRow {
        id: r.get(0),
        name: r.get(1),
        environment: r.get(2),
        state: r.get(3),
        policy: r.get(4),
        spec_hex: r.get(5),
        epoch: r.get(6),
        message: r.get(7),
        submitted_by: r.get(8),
        created_at_ms: r.get(9),
        updated_at_ms: r.get(10),
        targets: r.get(11),
        steps: r.get(12),
    }
}

fn store_err(e: sqlx::Error) -> CoordinatorError {
    CoordinatorError::Store(e.to_string())
}
