//! `flotilla plan test`: a plan's migrations rehearsed on a scratch database, for a team's
//! CI, with no coordinator. For each migration in plan order: the target's schema
//! fingerprint, up, verify, down, the fingerprint again (it must equal the one before up:
//! the seed's up/down/up test), then up and verify again; a migration's `[test]` (setup
//! SQL, a query and its expected rows) is checked after each up.
//!
//! Every step runs the way an agent runs it on a shard, through the same code: the agent's
//! executor applies it (fence, `SET LOCAL search_path` to the tenant, timeouts, verify and
//! journal row in one transaction; non-transactional statements one by one; a data change
//! in keyset batches with its checkpoints) and the agent's undo takes it back (down SQL or
//! prior image, journal row moved). Fingerprints are the agent's (`shard::fingerprint`),
//! the same items `fleet drift` compares. Tenant-scoped migrations run in a scratch tenant
//! schema (or `--tenant`, an existing one), shard-scoped ones on the database itself.
//!
//! The database must be a scratch one: one holding a `flotilla` schema (a shard's) is
//! refused. What the rehearsal created is removed at the end: what stays applied is undone
//! newest first, then the scratch tenant schema and the `flotilla` schema are dropped.
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use flotilla_core::dag::MigrationGraph;
use flotilla_core::{PlanSpec, Scope, pb};
use sqlx::AssertSqlSafe;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use crate::error::sql_error_text;

mod compare;

use self::compare::{in_target, schema_difference, show_rows, sqlstate, test_rows};
use super::executor::execute_run;
use super::job::{Job, PlanDef};
use super::rollback::undo_step;
use crate::metrics::StepOutcome;
use crate::shard;
use crate::step::{PreparedMigration, StepContext, quote_ident, quote_literal};

/// The plan id journal rows of a rehearsal carry.
const PLAN_ID: &str = "plan-test";
/// The epoch the rehearsal's steps are fenced at (a fresh fence is at 0).
const EPOCH: u64 = 1;

/// Where and how to rehearse. `Debug` does not show the password.
#[derive(Clone, Default)]
pub struct RehearsalConfig {
    /// The scratch database, without a password.
    pub dsn: String,
    pub password: Option<String>,
    /// An existing schema to run tenant-scoped migrations in (kept afterwards); None: a
    /// scratch tenant schema is created, and dropped at the end.
    pub tenant: Option<String>,
    /// SQL run in the tenant schema (search_path set to it) before the first migration:
    /// the tables the migrations expect.
    pub seed: Option<String>,
}

impl std::fmt::Debug for RehearsalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RehearsalConfig")
            .field("dsn", &self.dsn)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tenant", &self.tenant)
            .field("seed", &self.seed)
            .finish()
    }
}

/// A migration's `[test]`: rows to set up before its first up, a query, the rows it must
/// return after each up (values as text; None = NULL), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationTest {
    pub setup: String,
    pub query: String,
    pub expect: Vec<Vec<Option<String>>>,
}

/// How one migration's rehearsal went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub migration: String,
    /// The schema it ran in ("" = the database itself).
    pub target: String,
    /// What held, in order: `up`, `verify`, `test`, `down`, `schema restored`, ...
    pub passed: Vec<String>,
    /// What did not (the rehearsal stops there).
    pub failure: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RehearsalError {
    #[error("--dsn: {0}")]
    Dsn(String),
    #[error("cannot connect to the scratch database {0}")]
    Connect(String),
    #[error(
        "the database has a `flotilla` schema: it is (or was) a shard; `plan test` needs a scratch database"
    )]
    NotScratch,
    #[error("--tenant `{0}`: no such schema in the scratch database")]
    NoTenant(String),
    #[error("{what}: {error}")]
    Setup { what: String, error: String },
}

fn setup(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> RehearsalError {
    let what = what.into();
    move |e| RehearsalError::Setup {
        what,
        error: sql_error_text(&e, None),
    }
}

/// How long the first connection to the scratch database may take.
const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Rehearses the plan; returns each migration's outcome up to the first that failed.
pub async fn rehearse(
    config: &RehearsalConfig,
    spec: &PlanSpec,
    tests: &HashMap<String, MigrationTest>,
) -> Result<Vec<Outcome>, RehearsalError> {
    let mut options =
        PgConnectOptions::from_str(&config.dsn).map_err(|e| RehearsalError::Dsn(e.to_string()))?;
    if let Some(p) = &config.password {
        options = options.password(p);
    }
    let options = options
        .application_name("flotilla-plan-test")
        .options([("standard_conforming_strings", "on")]);
    let at = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    );
    let connect_failed =
        |e: sqlx::Error| RehearsalError::Connect(format!("{at}: {}", sql_error_text(&e, None)));
    // One connection first, to say why it fails (a pool's own connect only says it timed
    // out while waiting for a connection, after its 30 s).
    match tokio::time::timeout(CONNECT_WAIT, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
        }
        Ok(Err(e)) => return Err(connect_failed(e)),
        Err(_) => {
            return Err(RehearsalError::Connect(format!(
                "{at}: no answer within {}s",
                CONNECT_WAIT.as_secs()
            )));
        }
    }
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .connect_with(options)
        .await
        .map_err(connect_failed)?;
    let has_flotilla: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'flotilla')",
    )
    .fetch_one(&pool)
    .await
    .map_err(connect_failed)?;
    if has_flotilla {
        return Err(RehearsalError::NotScratch);
    }
    let (tenant, created) = match &config.tenant {
        Some(t) => {
            let exists: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
            )
            .bind(t)
            .fetch_one(&pool)
            .await
            .map_err(connect_failed)?;
            if !exists {
                return Err(RehearsalError::NoTenant(t.clone()));
            }
            (t.clone(), false)
        }
        None => {
            // unique enough for CI jobs sharing one scratch database
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            (
                format!("flotilla_test_{:x}_{nanos:x}", std::process::id()),
                true,
            )
        }
    };
    let mut scratch = Scratch {
        pool: pool.clone(),
        tenant: tenant.clone(),
        created_tenant: false,
        created_flotilla: false,
        applied: Vec::new(),
    };
    let result = async {
        shard::install_schema(&pool, PLAN_ID)
            .await
            .map_err(|e| RehearsalError::Setup {
                what: "installing the flotilla schema".into(),
                error: e.to_string(),
            })?;
        scratch.created_flotilla = true;
        if created {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "CREATE SCHEMA {}",
                quote_ident(&tenant)
            )))
            .execute(&pool)
            .await
            .map_err(setup(format!(
                "creating the scratch tenant schema {tenant}"
            )))?;
            scratch.created_tenant = true;
        }
        if let Some(seed) = &config.seed {
            in_target(&pool, &tenant, seed)
                .await
                .map_err(|e| RehearsalError::Setup {
                    what: "running the seed SQL".into(),
                    error: sql_error_text(&e, Some(seed)),
                })?;
        }
        scratch.run(spec, tests).await
    }
    .await;
    let left = scratch.clean_up().await;
    let mut result = result;
    // What could not be undone stays in the database: said with the failure it follows
    // (the next rehearsal would fail on it, `already exists`), not only in a log line.
    if !left.is_empty()
        && let Ok(outcomes) = &mut result
        && let Some(last) = outcomes.last_mut()
    {
        let said = format!(
            "not cleaned up, left in the database: {} (drop by hand before the next run)",
            left.join("; ")
        );
        last.failure = Some(match last.failure.take() {
            Some(failure) => format!("{failure}; {said}"),
            None => said,
        });
    }
    result
}

/// The rehearsal's database and what it created there.
struct Scratch {
    pool: PgPool,
    tenant: String,
    created_tenant: bool,
    created_flotilla: bool,
    /// (migration, target) still applied, oldest first.
    applied: Vec<(Arc<PreparedMigration>, String)>,
}

impl Scratch {
    async fn run(
        &mut self,
        spec: &PlanSpec,
        tests: &HashMap<String, MigrationTest>,
    ) -> Result<Vec<Outcome>, RehearsalError> {
        let graph = MigrationGraph::build(spec).map_err(|e| RehearsalError::Setup {
            what: "the plan's graph".into(),
            error: e.to_string(),
        })?;
        let def = PlanDef::from_pb(pb::PlanDefinition {
            plan_id: PLAN_ID.into(),
            migrations: spec.migrations.iter().map(pb::Migration::from).collect(),
            default_lock_timeout_ms: 10_000,
            default_statement_timeout_ms: 0,
            ..Default::default()
        })
        .map_err(|e| RehearsalError::Setup {
            what: "the plan's migrations".into(),
            error: e.to_string(),
        })?;
        let def = Arc::new(def);
        // the plan's scope (plan.toml or --scope) for migrations that say none, else tenant:
        // the scratch database always has the one tenant
        let default_scope = spec.default_scope.unwrap_or(Scope::Tenant);
        let mut outcomes = Vec::new();
        for &i in &graph.order {
            let m = &spec.migrations[i];
            let target = match m.scope.unwrap_or(default_scope) {
                Scope::Tenant => self.tenant.clone(),
                Scope::Shard => String::new(),
            };
            let prepared = def.migrations[m.id.as_str()].clone();
            let mut outcome = Outcome {
                migration: m.id.to_string(),
                target: target.clone(),
                passed: Vec::new(),
                failure: None,
            };
            if let Err(e) = self
                .one(
                    &def,
                    &prepared,
                    &target,
                    tests.get(m.id.as_str()),
                    &mut outcome,
                )
                .await
            {
                outcome.failure = Some(e);
            }
            let failed = outcome.failure.is_some();
            outcomes.push(outcome);
            if failed {
                break;
            }
        }
        Ok(outcomes)
    }

    /// up, verify, [test], down, fingerprint, up, verify, [test] on one target.
    async fn one(
        &mut self,
        def: &Arc<PlanDef>,
        m: &Arc<PreparedMigration>,
        target: &str,
        test: Option<&MigrationTest>,
        outcome: &mut Outcome,
    ) -> Result<(), String> {
        if let Some(t) = test.filter(|t| !t.setup.trim().is_empty()) {
            in_target(&self.pool, target, &t.setup).await.map_err(|e| {
                format!(
                    "[test] setup failed: {}",
                    sql_error_text(&e, Some(&t.setup))
                )
            })?;
        }
        let before = self.fingerprint(target).await?;
        self.up(def, m, target, outcome, "").await?;
        self.check(test, target, outcome, "").await?;
        let irreversible = m.down.is_empty() && !m.has_prior_image();
        if irreversible {
            outcome.passed.push("down not tested (irreversible)".into());
            return Ok(());
        }
        self.down(def, m, target).await?;
        outcome.passed.push("down".into());
        let after = self.fingerprint(target).await?;
        if after != before {
            return Err(schema_difference(&before, &after));
        }
        outcome.passed.push("schema restored".into());
        self.up(def, m, target, outcome, " again").await?;
        self.check(test, target, outcome, " again").await
    }

    /// Applies the step as the agent's executor does (verify and journal included).
    async fn up(
        &mut self,
        def: &Arc<PlanDef>,
        m: &Arc<PreparedMigration>,
        target: &str,
        outcome: &mut Outcome,
        again: &str,
    ) -> Result<(), String> {
        let run = pb::Run {
            run_id: self.applied.len() as u64 + 1,
            tenant: target.to_string(),
            migrations: vec![m.id().to_string()],
            ..Default::default()
        };
        let job = Job::new(def, run, EPOCH).map_err(|b| b.1.error.message)?;
        let mut conn = self.pool.acquire().await.map_err(|e| e.to_string())?;
        let out = execute_run(&mut conn, &self.pool, &job).await;
        if out.broken {
            conn.close_on_drop();
        }
        let step = out.result.steps.into_iter().next();
        match step {
            Some(s) if s.outcome == StepOutcome::Applied.to_pb() as i32 => {
                self.applied.push((m.clone(), target.to_string()));
                outcome.passed.push(format!("up{again}"));
                if m.migration.verify_sql.is_some() {
                    outcome.passed.push(format!("verify{again}"));
                }
                Ok(())
            }
            Some(s) => {
                let e = s.error.unwrap_or_default();
                let phase = if e.phase == "verify" || e.sqlstate == "FL003" {
                    "verify"
                } else {
                    "up"
                };
                Err(format!(
                    "{phase}{again} failed: {}{}",
                    e.message,
                    sqlstate(&e.sqlstate)
                ))
            }
            None => Err(format!("up{again}: the executor reported nothing")),
        }
    }

    /// Undoes the step as the agent's rollback does.
    async fn down(
        &mut self,
        def: &Arc<PlanDef>,
        m: &Arc<PreparedMigration>,
        target: &str,
    ) -> Result<(), String> {
        let tenant_lit = quote_literal(target).map_err(|e| e.to_string())?;
        let cx = StepContext {
            tenant: target,
            tenant_lit: &tenant_lit,
            plan_lit: &def.plan_lit,
            epoch: EPOCH,
        };
        let mut conn = self.pool.acquire().await.map_err(|e| e.to_string())?;
        match undo_step(&mut conn, &cx, m, None).await {
            Ok(()) => {
                self.applied
                    .retain(|(a, t)| !(a.id() == m.id() && t == target));
                Ok(())
            }
            Err((failure, broken)) => {
                if broken {
                    conn.close_on_drop();
                }
                let e = failure.error;
                Err(format!(
                    "down failed: {}{}",
                    e.message,
                    sqlstate(&e.sqlstate)
                ))
            }
        }
    }

    /// The `[test]` query's rows against the expected ones.
    async fn check(
        &self,
        test: Option<&MigrationTest>,
        target: &str,
        outcome: &mut Outcome,
        again: &str,
    ) -> Result<(), String> {
        let Some(t) = test else { return Ok(()) };
        let rows = test_rows(&self.pool, target, &t.query)
            .await
            .map_err(|e| format!("[test] query{again} failed: {}", sql_error_text(&e, None)))?;
        if rows != t.expect {
            return Err(format!(
                "[test]{again}: the query returned {} but {} was expected",
                show_rows(&rows),
                show_rows(&t.expect)
            ));
        }
        outcome.passed.push(format!("test{again}"));
        Ok(())
    }

    /// The target's schema items (the agent's fingerprint query).
    async fn fingerprint(&self, target: &str) -> Result<Vec<String>, String> {
        let mut conn = self.pool.acquire().await.map_err(|e| e.to_string())?;
        let tenants = [self.tenant.clone()];
        let read = if target.is_empty() {
            shard::read_fingerprints(&mut conn, &[], true, &tenants).await
        } else {
            shard::read_fingerprints(&mut conn, &tenants, false, &tenants).await
        };
        let mut found = read.map_err(|e| format!("reading the schema fingerprint: {e}"))?;
        Ok(found
            .remove(target)
            .map(|(_, items)| items)
            .unwrap_or_default())
    }

    /// Undoes what is still applied (newest first), then drops what the rehearsal created.
    /// Returns what it could not undo: the migration, where, and why.
    async fn clean_up(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        let plan_lit = quote_literal(PLAN_ID).expect("a plain literal");
        while let Some((m, target)) = self.applied.pop() {
            let Ok(tenant_lit) = quote_literal(&target) else {
                continue;
            };
            if self.created_tenant && target == self.tenant {
                continue; // dropped with its schema below
            }
            let cx = StepContext {
                tenant: &target,
                tenant_lit: &tenant_lit,
                plan_lit: &plan_lit,
                epoch: EPOCH,
            };
            let Ok(mut conn) = self.pool.acquire().await else {
                break;
            };
            if let Err((f, _)) = undo_step(&mut conn, &cx, &m, None).await {
                tracing::warn!(
                    migration = m.id(),
                    "cleaning up: undoing it failed: {}",
                    f.error.message
                );
                let at = if target.is_empty() {
                    String::new()
                } else {
                    format!(" in schema {target}")
                };
                left.push(format!(
                    "what `{}` applied{at} (its down failed: {})",
                    m.id(),
                    f.error.message
                ));
            }
        }
        if self.created_tenant {
            let sql = format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote_ident(&self.tenant)
            );
            if let Err(e) = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&self.pool).await {
                tracing::warn!("cleaning up: dropping schema {}: {e}", self.tenant);
                left.push(format!("schema {} ({e})", self.tenant));
            }
        }
        if self.created_flotilla
            && let Err(e) = sqlx::raw_sql("DROP SCHEMA IF EXISTS flotilla CASCADE")
                .execute(&self.pool)
                .await
        {
            tracing::warn!("cleaning up: dropping schema flotilla: {e}");
            left.push(format!("schema flotilla ({e})"));
        }
        self.pool.close().await;
        left
    }
}

#[cfg(test)]
mod tests {
    use super::RehearsalConfig;

    #[test]
    fn debug_hides_the_password() {
        let config = RehearsalConfig {
            dsn: "postgres://ci@db/scratch".into(),
            password: Some("hunter2".into()),
            ..Default::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("postgres://ci@db/scratch"), "{shown}");
    }
}
