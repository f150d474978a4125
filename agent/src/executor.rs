//! Applying a run's steps on one shard connection: the hot path. Each query below is a
//! simple-query string, so a whole step (settings, up SQL, verify, journal row) costs one
//! round trip, and a fused run only one more for its COMMIT.
//!
//! A run with a prepare gid (two-phase commit) runs as one transaction that ends in
//! `PREPARE TRANSACTION '<gid>'` instead: its steps report PREPARED, and the change and its
//! journal rows wait, invisible, for the plan's decision (see `two_phase`).
use std::time::{Duration, Instant};

use flotilla_proto::pb;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnection, PgPool};
use tracing::{debug, info, instrument, warn};

use crate::error::{Failure, classify};
use crate::job::{Job, PrepareGid, Report};
use crate::metrics::{self, StepMode, StepOutcome};
use crate::sqlgen::{self, PreparedMigration, StepContext};
use crate::{shard, two_phase};

pub(crate) struct RunOutput {
    pub result: pb::RunResult,
    /// The connection must not go back to the pool.
    pub broken: bool,
}

/// A step group that failed: which member, why, and how long it ran.
struct GroupFailure {
    position: usize,
    failure: Failure,
    /// The connection may still be inside the failed transaction.
    in_transaction: bool,
}

/// Applies a run's steps in order. Transactional steps of a fused run share one transaction
/// (consecutive ones: a non-transactional step ends it); the first failure ends the run. A run
/// to prepare (every step transactional, checked by `Job::new`) is one transaction.
#[instrument(skip_all, fields(plan = %job.plan.plan_id, tenant = %job.tenant, run = job.run.run_id))]
pub(crate) async fn execute_run(conn: &mut PgConnection, pool: &PgPool, job: &Job) -> RunOutput {
    let n = job.steps.len();
    let mut reports: Vec<Option<Report>> = job
        .applied
        .iter()
        .map(|a| {
            a.as_ref()
                .map(|c| Report::already(c.clone(), Duration::ZERO))
        })
        .collect();
    let cx = StepContext {
        tenant: &job.tenant,
        tenant_lit: &job.tenant_lit,
        plan_lit: &job.plan.plan_lit,
        epoch: job.epoch,
    };
    let fuse = job.run.fused || job.prepare.is_some();
    let mut broken = false;
    let mut i = 0;
    while i < n {
        if reports[i].is_some() {
            i += 1;
            continue;
        }
        let mut group = vec![i];
        let transactional = job.steps[i].is_transactional();
        let mut next = i + 1;
        if transactional && fuse {
            while next < n && (reports[next].is_some() || job.steps[next].is_transactional()) {
                if reports[next].is_none() {
                    group.push(next);
                }
                next += 1;
            }
        }
        let mut durations = vec![Duration::ZERO; group.len()];
        // A schema change that cannot get its lock within lock_timeout gives up, so it never
        // queues in front of the table's traffic for longer; it is tried again after a pause
        // (the lock_timeout-with-retries pattern of GitLab and strong_migrations).
        let mut attempt = 0u32;
        let mut backend_pid: Option<i32> = None;
        // a data change keeps its batches and checkpoint; it is not retried whole
        let data = group.iter().any(|&g| job.steps[g].migration.data.is_some());
        let outcome = loop {
            durations.iter_mut().for_each(|d| *d = Duration::ZERO);
            let watch = backend_pid.map(|pid| BlockerWatch::start(pool, pid, &job.steps[i]));
            let outcome = if transactional {
                run_transaction(conn, &cx, job, &group, &mut durations).await
            } else {
                run_non_transactional(
                    conn,
                    &cx,
                    &job.steps[i],
                    job.hooks.as_deref(),
                    &mut durations[0],
                )
                .await
            };
            let blocker = match watch {
                Some(w) => w.finish().await,
                None => None,
            };
            let lock_timeout =
                matches!(&outcome, Err(gf) if gf.failure.error.sqlstate == LOCK_NOT_AVAILABLE);
            match outcome {
                Err(gf) if lock_timeout && !data && attempt < LOCK_RETRIES => {
                    if recover(conn, gf.in_transaction, !transactional).await {
                        break Err(gf);
                    }
                    attempt += 1;
                    let pause = LOCK_RETRY_PAUSE * 2u32.pow(attempt - 1);
                    warn!(
                        migration = job.steps[group[gf.position]].id(),
                        attempt,
                        ?pause,
                        blocked_by = blocker.as_deref().unwrap_or("?"),
                        "lock timeout; trying again after a pause"
                    );
                    if backend_pid.is_none() {
                        backend_pid = sqlx::query_scalar("SELECT pg_catalog.pg_backend_pid()")
                            .fetch_one(&mut *conn)
                            .await
                            .ok();
                    }
                    tokio::time::sleep(pause).await;
                }
                Err(mut gf) if lock_timeout && attempt > 0 => {
                    gf.failure.error.message = format!(
                        "{} ({} attempts, each within lock_timeout {}ms){}",
                        gf.failure.error.message,
                        attempt + 1,
                        job.steps[group[gf.position]].lock_timeout_ms,
                        blocker.map(|b| format!("; {b}")).unwrap_or_default()
                    );
                    break Err(gf);
                }
                other => break other,
            }
        };
        let mode = if transactional {
            StepMode::Transactional
        } else {
            StepMode::NonTransactional
        };
        match outcome {
            Ok(()) => {
                let done = if transactional && job.prepare.is_some() {
                    metrics::prepared_held_add(1.0);
                    after_prepare_failpoint();
                    StepOutcome::Prepared
                } else {
                    after_commit_failpoint();
                    StepOutcome::Applied
                };
                for (k, &idx) in group.iter().enumerate() {
                    metrics::step_duration(mode, done, durations[k]);
                    debug!(
                        migration = job.steps[idx].id(),
                        ms = durations[k].as_millis() as u64,
                        outcome = done.as_str(),
                        "step done"
                    );
                    reports[idx] = Some(Report {
                        outcome: done,
                        duration: durations[k],
                        error: None,
                        checksum: job.steps[idx].migration.checksum.clone(),
                    });
                }
                i = next;
            }
            Err(gf) if gf.failure.error.phase == crate::data::STOPPED => {
                // A data change halted at a batch boundary: every batch is done and
                // recorded, or not done; its checkpoint resumes it if it runs again.
                broken = recover(conn, gf.in_transaction, true).await || gf.failure.connection_lost;
                if gf.failure.connection_lost {
                    // the server went away: hand the step back once it answers again
                    wait_for_server(pool).await;
                }
                let idx = group[gf.position];
                info!(
                    migration = job.steps[idx].id(),
                    "{}", gf.failure.error.message
                );
                reports[idx] = Some(Report {
                    outcome: StepOutcome::NotRun,
                    duration: durations[gf.position],
                    error: Some(gf.failure.error),
                    checksum: job.steps[idx].migration.checksum.clone(),
                });
                break;
            }
            Err(gf) => {
                broken = recover(conn, gf.in_transaction, !transactional).await
                    || gf.failure.connection_lost;
                let failed = group[gf.position];
                metrics::step_duration(mode, StepOutcome::Failed, durations[gf.position]);
                warn!(migration = job.steps[failed].id(), sqlstate = %gf.failure.error.sqlstate,
                      phase = %gf.failure.error.phase, error = %gf.failure.error.message, "step failed");
                settle(
                    pool,
                    job,
                    &group,
                    gf.position,
                    gf.failure,
                    &durations,
                    &mut reports,
                )
                .await;
                break; // the rest of the run stays NOT_RUN
            }
        }
    }
    RunOutput {
        result: job.result(reports),
        broken,
    }
}

/// Waits (at most a minute, backing off up to 2s) until the shard's server answers again.
async fn wait_for_server(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut backoff = Duration::from_millis(100);
    while Instant::now() < deadline {
        if sqlx::query("SELECT 1").execute(pool).await.is_ok() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    warn!("the shard's server did not answer again within a minute");
}

/// `lock_not_available`: a lock_timeout (or NOWAIT) gave up.
const LOCK_NOT_AVAILABLE: &str = "55P03";
/// Attempts after the first when a schema step's lock times out.
const LOCK_RETRIES: u32 = 3;
/// The pause before the first retry; it doubles after each.
const LOCK_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The table waited for, then the blocking session's pid, user, application, state, seconds
/// its transaction is open, and its last query.
type BlockerRow = (Option<String>, i32, String, String, String, f64, String);

/// Watches a step's backend from another connection while it may wait for a lock: shortly
/// before its lock_timeout runs out, it records which table the step waits for and which
/// sessions block it, for the error that names them.
struct BlockerWatch {
    task: tokio::task::JoinHandle<Option<String>>,
}

impl BlockerWatch {
    fn start(pool: &PgPool, pid: i32, m: &PreparedMigration) -> BlockerWatch {
        let pool = pool.clone();
        let wait = Duration::from_millis(m.lock_timeout_ms.max(10) * 3 / 4);
        let task = tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let rows: Vec<BlockerRow> = sqlx::query_as(
                "SELECT w.relation::pg_catalog.regclass::text, a.pid, coalesce(a.usename::text, ''), \
                   coalesce(a.application_name, ''), coalesce(a.state, ''), \
                   coalesce(extract(epoch FROM pg_catalog.clock_timestamp() - a.xact_start), 0)::float8, \
                   pg_catalog.left(coalesce(a.query, ''), 120) \
                 FROM pg_catalog.pg_locks w \
                 CROSS JOIN LATERAL pg_catalog.unnest(pg_catalog.pg_blocking_pids(w.pid)) AS b(pid) \
                 JOIN pg_catalog.pg_stat_activity a ON a.pid = b.pid \
                 WHERE w.pid = $1 AND NOT w.granted ORDER BY a.xact_start",
            )
            .bind(pid)
            .fetch_all(&pool)
            .await
            .ok()?;
            let (table, ..) = rows.first()?;
            let blockers: Vec<String> = rows
                .iter()
                .map(|(_, pid, user, app, state, secs, query)| {
                    format!(
                        "pid {pid} (user {user}{}, {state}, transaction open {secs:.0}s, last query: {query})",
                        if app.is_empty() { String::new() } else { format!(", application {app}") }
                    )
                })
                .collect();
            Some(format!(
                "waiting for a lock on {} held by {}",
                table.clone().unwrap_or_else(|| "an object".into()),
                blockers.join("; ")
            ))
        });
        BlockerWatch { task }
    }

    /// What it saw, if the step was still waiting when it looked.
    async fn finish(self) -> Option<String> {
        if !self.task.is_finished() {
            self.task.abort();
        }
        self.task.await.ok().flatten()
    }
}

async fn execute(conn: &mut PgConnection, sql: String) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await
        .map(|_| ())
}

/// One transaction for the group: `BEGIN` + fence ride with the first step's query; it ends
/// in COMMIT, or in PREPARE TRANSACTION for a run to prepare.
async fn run_transaction(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    job: &Job,
    group: &[usize],
    durations: &mut [Duration],
) -> Result<(), GroupFailure> {
    let fail = |position, e: &sqlx::Error| GroupFailure {
        position,
        failure: classify(e, "up"),
        in_transaction: true,
    };
    for (k, &idx) in group.iter().enumerate() {
        let sql = if k == 0 {
            sqlgen::first_transactional_step(cx, &job.steps[idx])
        } else {
            sqlgen::transactional_step(cx, &job.steps[idx])
        };
        let started = Instant::now();
        let r = execute(conn, sql).await;
        durations[k] = started.elapsed();
        r.map_err(|e| fail(k, &e))?;
    }
    let last = group.len() - 1;
    let started = Instant::now();
    let r = commit(conn, job.prepare.as_ref()).await;
    durations[last] += started.elapsed();
    r.map_err(|failure| GroupFailure {
        position: last,
        failure,
        in_transaction: true,
    })
}

async fn commit(conn: &mut PgConnection, prepare: Option<&PrepareGid>) -> Result<(), Failure> {
    fail::fail_point!("agent::before_step_commit", |arg: Option<String>| Err(
        Failure::agent(
            "up",
            format!(
                "failpoint agent::before_step_commit{}",
                arg.map(|a| format!(": {a}")).unwrap_or_default()
            )
        )
    ));
    match prepare {
        None => execute(conn, "COMMIT".into())
            .await
            .map_err(|e| classify(&e, "up")),
        // a PREPARE that fails rolls the transaction back
        Some(p) => execute(conn, format!("PREPARE TRANSACTION {}", p.lit))
            .await
            .map_err(|e| classify(&e, "prepare")),
    }
}

/// A step that cannot run in a transaction: fence, session settings, each statement on its
/// own, then verify + journal in one short fenced transaction that also resets the session.
async fn run_non_transactional(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    hooks: Option<&crate::control::DataHooks>,
    duration: &mut Duration,
) -> Result<(), GroupFailure> {
    let started = Instant::now();
    let fail = |e: &sqlx::Error, in_transaction| GroupFailure {
        position: 0,
        failure: classify(e, "up"),
        in_transaction,
    };
    let r = async {
        execute(conn, sqlgen::non_transactional_prologue(cx, m))
            .await
            .map_err(|e| fail(&e, false))?;
        if m.migration.data.is_some() {
            // its up SQL (if any) runs inside, before the first batch
            crate::data::run_batches(conn, cx, m, hooks)
                .await
                .map_err(|failure| GroupFailure {
                    position: 0,
                    failure,
                    in_transaction: false,
                })?;
        }
        let up: &[String] = if m.migration.data.is_some() {
            &[]
        } else {
            &m.up
        };
        for statement in up {
            if let Err(e) = execute(conn, statement.clone()).await {
                drop_invalid_index(conn, statement).await;
                return Err(fail(&e, false));
            }
        }
        commit_failpoint_non_transactional()?;
        let mut epilogue = sqlgen::non_transactional_epilogue(cx, m);
        epilogue.push_str("RESET ALL;\n");
        execute(conn, epilogue).await.map_err(|e| fail(&e, true))
    }
    .await;
    *duration = started.elapsed();
    r
}

fn commit_failpoint_non_transactional() -> Result<(), GroupFailure> {
    fail::fail_point!("agent::before_step_commit", |arg: Option<String>| Err(
        GroupFailure {
            position: 0,
            failure: Failure::agent(
                "up",
                format!(
                    "failpoint agent::before_step_commit{}",
                    arg.map(|a| format!(": {a}")).unwrap_or_default()
                )
            ),
            in_transaction: false,
        }
    ));
    Ok(())
}

/// With `return`, the agent exits right after a commit, before reporting it: the crash that
/// the journal must make harmless.
fn after_commit_failpoint() {
    fail::fail_point!("agent::after_step_commit_before_report", |_| {
        tracing::error!("failpoint agent::after_step_commit_before_report: exiting");
        std::process::exit(86)
    });
}

/// With `return`, the agent exits right after a PREPARE TRANSACTION, before reporting it: the
/// crash that leaves a prepared transaction in doubt, for the restarted agent to resolve.
fn after_prepare_failpoint() {
    fail::fail_point!("agent::after_prepare_before_report", |_| {
        tracing::error!("failpoint agent::after_prepare_before_report: exiting");
        std::process::exit(86)
    });
}

/// Brings the connection back to a clean session after a failure. True when that failed
/// (the connection must be closed, not pooled).
pub(crate) async fn recover(
    conn: &mut PgConnection,
    in_transaction: bool,
    reset_session: bool,
) -> bool {
    let sql = match (in_transaction, reset_session) {
        (true, true) => "ROLLBACK; RESET ALL",
        (true, false) => "ROLLBACK",
        (false, true) => "RESET ALL",
        (false, false) => return false,
    };
    match sqlx::raw_sql(sql).execute(&mut *conn).await {
        Ok(_) => false,
        Err(error) => {
            warn!(%error, "cleaning up after a failed step failed; dropping the connection");
            true
        }
    }
}

/// After a failure, the journal says what happened: a step found there was applied (by a
/// concurrent session, or by a COMMIT whose answer was lost). One read for the group.
///
/// A run to prepare asks `pg_prepared_xacts` first: when its gid is prepared (the answer to
/// its PREPARE was lost, or a copy of the run prepared it), the group is PREPARED, never
/// FAILED. First, so a COMMIT PREPARED in between shows in the journal read that follows.
async fn settle(
    pool: &PgPool,
    job: &Job,
    group: &[usize],
    failed_position: usize,
    failure: Failure,
    durations: &[Duration],
    reports: &mut [Option<Report>],
) {
    if let Some(p) = &job.prepare {
        match two_phase::prepared_among(pool, std::slice::from_ref(&p.gid)).await {
            Ok(found) if found.contains(&p.gid) => {
                warn!(gid = %p.gid, error = %failure.error.message, "the run failed, but its transaction is prepared: reporting it PREPARED");
                for (k, &idx) in group.iter().enumerate() {
                    let checksum = job.steps[idx].migration.checksum.clone();
                    reports[idx] = Some(Report::prepared(checksum, durations[k]));
                }
                return;
            }
            Ok(_) => {}
            Err(error) => {
                warn!(%error, gid = %p.gid, "reading the prepared transactions after a failure failed")
            }
        }
    }
    let migrations: Vec<String> = group
        .iter()
        .map(|&i| job.steps[i].id().to_string())
        .collect();
    let journal =
        match shard::read_applied(pool, std::slice::from_ref(&job.tenant), &migrations).await {
            Ok(rows) => rows,
            Err(error) => {
                warn!(%error, "re-reading the journal after a failure failed");
                Vec::new()
            }
        };
    let mut failure = Some(failure);
    for (k, &idx) in group.iter().enumerate() {
        let m = &job.steps[idx];
        let found = journal
            .iter()
            .find(|r| r.migration_id == m.id())
            .map(|r| r.checksum.clone());
        reports[idx] = Some(match found {
            Some(checksum) => Report::already(checksum, durations[k]),
            None if k == failed_position => {
                let f = failure.take().expect("one failure");
                if f.concurrent_apply {
                    Report::already(m.migration.checksum.clone(), durations[k])
                } else {
                    Report {
                        outcome: StepOutcome::Failed,
                        duration: durations[k],
                        error: Some(f.error),
                        checksum: String::new(),
                    }
                }
            }
            None => Report::not_run(),
        });
    }
}

/// The index a `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name ON ...` names, if any.
pub(crate) fn concurrent_index_name(statement: &str) -> Option<String> {
    // Words, with a double-quoted identifier (spaces and "" inside) as one word.
    let mut words: Vec<(String, bool)> = Vec::new();
    let mut chars = statement.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut w = String::new();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        w.push('"');
                    } else {
                        break;
                    }
                } else {
                    w.push(c);
                }
            }
            words.push((w, true));
        } else {
            let mut w = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '"' || c == '(' {
                    break;
                }
                w.push(c);
                chars.next();
            }
            if w.is_empty() {
                chars.next();
            } else {
                words.push((w, false));
            }
        }
        if words.len() > 8 {
            break;
        }
    }
    let mut it = words.into_iter();
    let mut seen_concurrently = false;
    for (w, quoted) in it.by_ref() {
        let up = w.to_ascii_uppercase();
        if quoted {
            return seen_concurrently.then_some(w);
        }
        if !seen_concurrently {
            match up.as_str() {
                "CONCURRENTLY" => seen_concurrently = true,
                "CREATE" | "UNIQUE" | "INDEX" => {}
                _ => return None,
            }
            continue;
        }
        match up.as_str() {
            "IF" | "NOT" | "EXISTS" => continue,
            "ON" => return None, // unnamed: PostgreSQL picks the name
            _ => return Some(w.to_ascii_lowercase()),
        }
    }
    None
}

/// A failed CREATE INDEX CONCURRENTLY leaves an INVALID index behind (it still
/// costs every write to the table): find it in the step's schemas and drop it, so
/// the shard is as it was and the step can be retried.
async fn drop_invalid_index(conn: &mut PgConnection, statement: &str) {
    let Some(name) = concurrent_index_name(statement) else {
        return;
    };
    let found: Result<Option<(String, String)>, sqlx::Error> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_index i
           JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE NOT i.indisvalid AND c.relname = $1 AND n.nspname = ANY (current_schemas(false))
          LIMIT 1",
    )
    .bind(&name)
    .fetch_optional(&mut *conn)
    .await;
    let Ok(Some((schema, index))) = found else {
        return;
    };
    let drop = format!(
        "DROP INDEX CONCURRENTLY IF EXISTS {}.{}",
        flotilla_proto::sql::quote_ident(&schema),
        flotilla_proto::sql::quote_ident(&index)
    );
    match execute(conn, drop).await {
        Ok(()) => {
            warn!(schema = %schema, index = %index, "dropped the INVALID index a failed CREATE INDEX CONCURRENTLY left")
        }
        Err(e) => {
            warn!(schema = %schema, index = %index, error = %e, "could not drop an INVALID index left by a failed CREATE INDEX CONCURRENTLY")
        }
    }
}

#[cfg(test)]
mod index_name_tests {
    use super::concurrent_index_name;

    #[test]
    fn names_of_concurrent_indexes() {
        assert_eq!(
            concurrent_index_name("CREATE INDEX CONCURRENTLY idx_a ON t (a)").as_deref(),
            Some("idx_a")
        );
        assert_eq!(
            concurrent_index_name(
                "create unique index concurrently if not exists \"Idx B\" on t (b)"
            )
            .as_deref(),
            Some("Idx B")
        );
        assert_eq!(
            concurrent_index_name("CREATE INDEX CONCURRENTLY ON t (a)"),
            None
        );
        assert_eq!(concurrent_index_name("DROP INDEX CONCURRENTLY idx_a"), None);
    }
}
