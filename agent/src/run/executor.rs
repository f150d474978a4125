//! Applying a run's steps on one shard connection: the hot path. Each query below is a
//! simple-query string: a transaction's steps (settings, up SQL, verify, journal row each)
//! and its COMMIT cost one round trip together; a non-transactional step a few.
//!
//! A run with a prepare gid (two-phase commit) runs as one transaction that ends in
//! `PREPARE TRANSACTION '<gid>'` instead: its steps report PREPARED, and the change and its
//! journal rows wait, invisible, for the plan's decision (see `two_phase`).
use std::time::{Duration, Instant};

use flotilla_core::pb;
use flotilla_core::protocol::sqlstate;
use futures::TryStreamExt;
use sqlx::postgres::{PgConnection, PgDatabaseError, PgErrorPosition, PgPool, PgRow};
use sqlx::{AssertSqlSafe, Column, Either, Row};
use tracing::{debug, info, instrument, warn};

use super::abort;
use super::conn::{execute, recover, wait_for_server};
use super::job::{Found, Halts, Job, PrepareGid, Report};
use super::lock_wait::{self, BlockerWatch, LOCK_RETRIES, retry_pause, with_attempts};
use super::sqlgen;
use super::statements::run_up_statements;
use super::two_phase::prepared_among;
use crate::data::{self, DataHooks};
use crate::error::{Failure, classify};
use crate::metrics::{self, StepMode, StepOutcome};
use crate::shard;
use crate::step::sql::{SESSION_RESET, STEP_DONE, VERIFY_CALL_PREFIX, verify_call};
use crate::step::{PreparedMigration, StepContext, checkpoint};

pub(crate) struct RunOutput {
    pub result: pb::RunResult,
    /// The connection must not go back to the pool.
    pub broken: bool,
}

/// A step group that failed: which member, why, and how long it ran.
pub(super) struct GroupFailure {
    pub position: usize,
    pub failure: Failure,
    /// The connection may still be inside the failed transaction.
    pub in_transaction: bool,
}

/// Applies a run's steps in order. Transactional steps of a fused run share one transaction
/// (consecutive ones: a non-transactional step ends it); the first failure ends the run. A run
/// to prepare (every step transactional, checked by `Job::new`) is one transaction.
#[instrument(skip_all, fields(plan = %job.plan.plan_id, tenant = %job.tenant, run = job.run.run_id, epoch = job.epoch))]
pub(crate) async fn execute_run(conn: &mut PgConnection, pool: &PgPool, job: &Job) -> RunOutput {
    let n = job.steps.len();
    let mut reports: Vec<Option<Report>> = job
        .applied
        .iter()
        .map(|a| {
            a.as_ref()
                .map(|found| Report::already(found.clone(), Duration::ZERO))
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
        let group_started = Instant::now();
        let outcome = run_group(conn, pool, &cx, job, &group, &mut durations).await;
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
                        step = job.steps[idx].id(),
                        ms = durations[k].as_millis() as u64,
                        outcome = done.as_str(),
                        "step done"
                    );
                    reports[idx] = Some(Report {
                        outcome: done,
                        duration: durations[k],
                        error: None,
                        checksum: job.steps[idx].migration.checksum.clone(),
                        applied_by: String::new(),
                    });
                }
                i = next;
            }
            Err(gf) if gf.failure.error.phase == data::STOPPED => {
                // A data change halted at a batch boundary: every batch is done and
                // recorded, or not done; its checkpoint resumes it if it runs again.
                broken = recover(conn, gf.in_transaction).await || gf.failure.connection_lost;
                if gf.failure.connection_lost {
                    // the server went away: hand the step back once it answers again
                    wait_for_server(pool).await;
                }
                let idx = group[gf.position];
                info!(step = job.steps[idx].id(), "{}", gf.failure.error.message);
                end_progress(job, idx, "stopped", &gf.failure.error.message);
                reports[idx] = Some(Report {
                    outcome: StepOutcome::NotRun,
                    duration: durations[gf.position],
                    error: Some(gf.failure.error),
                    checksum: job.steps[idx].migration.checksum.clone(),
                    applied_by: String::new(),
                });
                break;
            }
            Err(gf) => {
                broken = recover(conn, gf.in_transaction).await || gf.failure.connection_lost;
                let failed = group[gf.position];
                let fenced = gf.failure.error.sqlstate == sqlstate::FENCED;
                let outcome = if fenced {
                    StepOutcome::Fenced
                } else {
                    StepOutcome::Failed
                };
                metrics::step_duration(mode, outcome, durations[gf.position]);
                if fenced {
                    // after every change of leader, for the runs the old one had out: no
                    // failure to page anyone for
                    info!(step = job.steps[failed].id(), error = %gf.failure.error.message,
                          "step refused by the shard's fence: a newer leader runs it again");
                } else {
                    warn!(step = job.steps[failed].id(), sqlstate = %gf.failure.error.sqlstate,
                          phase = %gf.failure.error.phase, error = %gf.failure.error.message, "step failed");
                }
                end_progress(job, failed, "failed", &gf.failure.error.message);
                if gf.failure.server_gone() {
                    // whether a COMMIT whose answer was lost committed is in the journal:
                    // read it once the server answers again (at most a minute)
                    wait_for_server(pool).await;
                }
                settle(
                    pool,
                    job,
                    (&group, group_started),
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
    let mut result = job.result(reports);
    if result
        .steps
        .iter()
        .any(|s| s.outcome == pb::StepOutcome::Prepared as i32)
    {
        // Just after its PREPARE TRANSACTION returned: the start of the lock hold the
        // coordinator reports for two-phase commits.
        result.prepared_at_us = crate::run::two_phase::now_us();
    }
    RunOutput { result, broken }
}
/// A data change's progress entry ends with its step, wherever the step ended (see
/// `ProgressBoard::end`).
fn end_progress(job: &Job, idx: usize, state: &str, reason: &str) {
    if let Some(h) = &job.hooks
        && job.steps[idx].migration.data.is_some()
    {
        h.board
            .end(&h.plan_id, job.steps[idx].id(), &job.tenant, state, reason);
    }
}

/// Runs one group of steps (one transaction, or one non-transactional step). A group
/// whose lock times out is tried again after a pause (see `lock_wait`).
async fn run_group(
    conn: &mut PgConnection,
    pool: &PgPool,
    cx: &StepContext<'_>,
    job: &Job,
    group: &[usize],
    durations: &mut [Duration],
) -> Result<(), GroupFailure> {
    let i = group[0];
    let transactional = job.steps[i].is_transactional();
    // a lock timeout is tried again after a pause (see `lock_wait`)
    let mut attempt = 0u32;
    let mut backend_pid: Option<i32> = None;
    // A data change (like any non-transactional step) is tried again from its checkpoint:
    // the statements and batches it recorded are not run twice, so a batch that timed out
    // on a row the application held waits out the pause and goes on where it stopped.
    // A halt since the run was queued (a cancel, a failure elsewhere, a rollback waiting for
    // the plan's runs) is not retried past: a lock timeout leaves nothing half-done (the
    // transaction is undone; a non-transactional step's statements and batches before it
    // are recorded), so the step stops there, NOT_RUN, to run again later from where it is.
    let halted = || job.halts.as_ref().is_some_and(Halts::halted);
    let halts_at_start = job.halts.as_ref().map(|h| h.at_queue);
    // A target of an atomic unit does not wait for its lock again: the unit's targets
    // that prepared meanwhile hold their locks (their tables, on every tenant of the unit)
    // through each pause and attempt, seconds of the application's traffic on all of them
    // for one contended table. It fails at once, the unit aborts, and they are released.
    let retries = if job.prepare.is_some() {
        0
    } else {
        LOCK_RETRIES
    };
    // (its one attempt is watched for who blocks it, as retries are; its session is what a
    // halt cancels: see `abort`)
    let mut session = None;
    if job.prepare.is_some() {
        session = abort::session_of(conn).await;
        backend_pid = session.as_ref().map(|s| s.pid);
    }
    // a non-transactional step's time is all of its attempts' (a backfill that waited on a
    // lock near its end took the hours before too)
    let started = Instant::now();
    // while it waits to try its lock again, the step shows so in its plan's status (gone
    // from the agent's board however the group ends)
    let mut shown: Option<LockWaitShown<'_>> = None;
    loop {
        durations.iter_mut().for_each(|d| *d = Duration::ZERO);
        let watch =
            backend_pid.map(|pid| BlockerWatch::start(pool, pid, &job.steps[i], attempt > 0));
        let outcome = if transactional {
            match (&job.prepare, &session, &job.halts) {
                // an atomic unit's run: cancelled if its plan halts (see `abort`)
                (Some(_), Some(session), Some(halts)) => {
                    let run = run_transaction(conn, cx, job, group, durations);
                    abort::cancel_on_halt(pool, session.clone(), halts, run).await
                }
                _ => run_transaction(conn, cx, job, group, durations).await,
            }
        } else {
            let attempt = data::Attempt {
                halts_at_start,
                retried_on_lock_timeout: attempt < retries,
            };
            let r =
                run_non_transactional(conn, cx, &job.steps[i], job.hooks.as_deref(), attempt).await;
            durations[0] = started.elapsed();
            r
        };
        let blocker = match watch {
            Some(w) => w.finish().await,
            None => None,
        };
        // (not one that may have left part of its work committed: see `Failure::part_way`)
        let lock_timeout =
            matches!(&outcome, Err(gf) if gf.failure.is_lock_timeout() && !gf.failure.part_way);
        match outcome {
            Err(gf) if lock_timeout && (attempt < retries || halted()) => {
                if halted() {
                    return Err(stopped_by_halt(gf, attempt + 1));
                }
                if recover(conn, gf.in_transaction).await {
                    return Err(gf);
                }
                let gf = GroupFailure {
                    in_transaction: false,
                    ..gf
                };
                attempt += 1;
                let pause = retry_pause(attempt);
                warn!(
                    step = job.steps[group[gf.position]].id(),
                    attempt,
                    ?pause,
                    blocked_by = blocker.as_deref().unwrap_or("?"),
                    "lock timeout; trying again after a pause"
                );
                if backend_pid.is_none() {
                    backend_pid = lock_wait::backend_pid(conn).await;
                }
                let step = &job.steps[group[gf.position]];
                let reason = format!(
                    "lock timeout (lock_timeout {}ms); attempt {} of {} in {:.1}s{}",
                    step.lock_timeout_ms,
                    attempt + 1,
                    retries + 1,
                    pause.as_secs_f64(),
                    blocker.map(|b| format!("; {b}")).unwrap_or_default()
                );
                LockWaitShown::show(&mut shown, job, step, reason);
                tokio::time::sleep(pause).await;
                if halted() {
                    return Err(stopped_by_halt(gf, attempt));
                }
            }
            Err(mut gf) if lock_timeout && (attempt > 0 || job.prepare.is_some()) => {
                let atomic = if job.prepare.is_some() {
                    "; not tried again: it is a target of an atomic unit, whose prepared \
                     targets hold their locks while it would wait (run the plan again once \
                     the lock is free)"
                } else {
                    ""
                };
                gf.failure.error.message = format!(
                    "{}{}{atomic}",
                    with_attempts(
                        &gf.failure,
                        attempt + 1,
                        job.steps[group[gf.position]].lock_timeout_ms
                    ),
                    blocker.map(|b| format!("; {b}")).unwrap_or_default()
                );
                return Err(gf);
            }
            other => return other,
        }
    }
}

/// A schema step that waits to try its lock again, on the agent's board as a change in state
/// `lock_wait` with why (the lock timeout, the attempt, who held the lock once watched): a
/// step waiting out minutes of lock retries showed only "running or queued". (A data change
/// shows `throttled` by its own progress instead.) The entry goes unsent when the group ends,
/// and the coordinator drops it with the step's result.
struct LockWaitShown<'a> {
    hooks: &'a DataHooks,
    /// Each step of the group shown waiting (a fused group's later attempt may time out on
    /// another of its steps).
    migrations: Vec<&'a str>,
    tenant: &'a str,
}

impl<'a> LockWaitShown<'a> {
    fn show(
        shown: &mut Option<LockWaitShown<'a>>,
        job: &'a Job,
        step: &'a PreparedMigration,
        reason: String,
    ) {
        let Some(hooks) = job.hooks.as_deref() else {
            return;
        };
        if step.migration.data.is_some() {
            return;
        }
        crate::data::Publish {
            plan_id: &hooks.plan_id,
            shard: &hooks.shard,
            board: &hooks.board,
        }
        .lock_wait(&job.tenant, step.id(), reason);
        // (the guard of an earlier attempt stays: replaced, or a second one made and
        // dropped, it would take the entry just set off the board)
        let guard = shown.get_or_insert_with(|| LockWaitShown {
            hooks,
            migrations: Vec::new(),
            tenant: &job.tenant,
        });
        if !guard.migrations.contains(&step.id()) {
            guard.migrations.push(step.id());
        }
    }
}

impl Drop for LockWaitShown<'_> {
    fn drop(&mut self) {
        for migration in &self.migrations {
            self.hooks
                .board
                .forget(&self.hooks.plan_id, migration, self.tenant);
        }
    }
}

/// A group whose lock timed out, not tried again because its plan was halted meanwhile:
/// stopped (NOT_RUN), as a data change halted at a batch boundary is.
fn stopped_by_halt(mut gf: GroupFailure, attempts: u32) -> GroupFailure {
    gf.failure.error.phase = data::STOPPED.into();
    gf.failure.error.message = format!(
        "{} ({attempts} attempt(s)); not tried again: the plan was halted meanwhile (a cancel, a \
         failure elsewhere, a rollback). A lock timeout leaves nothing half-done: what the \
         step did is undone or recorded in its checkpoint, and it runs again from there",
        gf.failure.error.message
    );
    gf
}

/// One transaction for the group, its steps and COMMIT in one query: `BEGIN` and the fence
/// ride with the first step. A run to prepare sends its PREPARE TRANSACTION on its own.
///
/// Each step's journal row returns `STEP_DONE` with its position and the step's time by the
/// server's clock: the marks say which steps are done (a failure is the next one's) and how
/// long each took (what is left of the round trip goes to the last, or the failing, step).
/// One round trip per
/// run instead of one per step and one for the COMMIT: each costs the agent and the server
/// a send, a receive and the switches between them.
async fn run_transaction(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    job: &Job,
    group: &[usize],
    durations: &mut [Duration],
) -> Result<(), GroupFailure> {
    let last = group.len() - 1;
    let fail = |position: usize, failure| GroupFailure {
        position: position.min(last),
        failure,
        in_transaction: true,
    };
    // The commit failpoint acts between the steps and the COMMIT (a `sleep` or `pause` holds
    // the transaction open there): while it is configured, the COMMIT goes on its own.
    let fused_commit = job.prepare.is_none() && !commit_failpoint_configured();
    let steps: Vec<&PreparedMigration> = group.iter().map(|&i| &*job.steps[i]).collect();
    // shared, not copied: a failure is placed in the text (`place_in_verify`)
    let sql = std::sync::Arc::new(sqlgen::transaction(cx, &steps, fused_commit));
    let started = Instant::now();
    // the steps' own times so far
    let mut marked = Duration::ZERO;
    let mut done = 0usize;
    {
        let mut results =
            sqlx::raw_sql(AssertSqlSafe(std::sync::Arc::clone(&sql))).fetch_many(&mut *conn);
        loop {
            match results.try_next().await {
                // (a migration's own row could only fake a mark by naming its column so)
                Ok(Some(Either::Right(row))) if done <= last && is_step_done(&row, done) => {
                    let seconds = row.try_get::<f64, _>(1).unwrap_or(0.0).max(0.0);
                    durations[done] = Duration::from_secs_f64(seconds);
                    marked += durations[done];
                    done += 1;
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    durations[done.min(last)] += started.elapsed().saturating_sub(marked);
                    let mut failure = classify(&e, "up");
                    place_in_verify(&mut failure, &e, &sql, steps[done.min(last)]);
                    return Err(fail(done, failure));
                }
            }
        }
    }
    if done != group.len() {
        // every step's journal row returns its mark: a query that ends without them all did
        // not run what it was sent for
        return Err(fail(
            done,
            Failure::agent(
                "up",
                format!(
                    "the run's transaction ended after {done} of its {} steps marked done",
                    group.len()
                ),
            ),
        ));
    }
    // the COMMIT's own time (fused) and the round trip go to the last step, as its
    // PREPARE's does
    durations[last] += started.elapsed().saturating_sub(marked);
    if fused_commit {
        return Ok(());
    }
    if let Some(failure) = commit_failpoint() {
        return Err(fail(last, failure));
    }
    // A halt since the run was queued aborts its atomic unit: preparing now would only hold
    // the run's locks until the abort's Resolve rolls it back.
    if job.prepare.is_some() && job.halts.as_ref().is_some_and(Halts::halted) {
        return Err(fail(0, abort::not_prepared()));
    }
    let committing = Instant::now();
    let r = commit(conn, job.prepare.as_ref()).await;
    durations[last] += committing.elapsed();
    r.map_err(|failure| fail(last, failure))
}

/// A failure the server places (its error's position) within the step's verify query is
/// the verify's: a typo in verify.sql (a column that does not exist, say) read as `up`
/// failed. Errors the server gives no position (raised while the query runs) stay `up`.
fn place_in_verify(failure: &mut Failure, e: &sqlx::Error, sql: &str, m: &PreparedMigration) {
    if failure.error.phase != "up" {
        return;
    }
    let Some(verify) = &m.migration.verify_sql else {
        return;
    };
    let Some(PgErrorPosition::Original(at)) = e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<PgDatabaseError>())
        .and_then(PgDatabaseError::position)
    else {
        return;
    };
    // the position counts characters, from 1
    let Some((byte, _)) = sql.char_indices().nth(at.saturating_sub(1)) else {
        return;
    };
    // Within the verify's own parentheses only (the inner `(` too: "subquery must return
    // only one column" points there), not the rest of the agent's call: a failure of the
    // call itself (the flotilla schema gone) is no fault of the verify query.
    let call = verify_call(verify, &m.id_lit);
    let (from, to) = (
        VERIFY_CALL_PREFIX.len(),
        VERIFY_CALL_PREFIX.len() + verify.len() + 3,
    );
    if sql
        .match_indices(call.as_str())
        .any(|(start, _)| (start + from..start + to).contains(&byte))
    {
        failure.error.phase = "verify".into();
        failure.error.message = format!("verify query: {}", failure.error.message);
    }
}

/// Whether a row of a run's results is the journal row of the step at `position`.
fn is_step_done(row: &PgRow, position: usize) -> bool {
    row.columns().first().is_some_and(|c| c.name() == STEP_DONE)
        && row
            .try_get::<i32, _>(0)
            .is_ok_and(|p| usize::try_from(p).ok() == Some(position))
}

const COMMIT_FAILPOINT: &str = "agent::before_step_commit";

/// Whether the commit failpoint has an action (only a build with failpoints has any).
fn commit_failpoint_configured() -> bool {
    cfg!(feature = "testing")
        && fail::list()
            .iter()
            .any(|(name, _)| name == COMMIT_FAILPOINT)
}

/// The commit failpoint (`agent::before_step_commit`): its failure, if it returns one.
fn commit_failpoint() -> Option<Failure> {
    fail::fail_point!(COMMIT_FAILPOINT, |arg: Option<String>| Some(
        Failure::agent(
            "up",
            format!(
                "failpoint agent::before_step_commit{}",
                arg.map(|a| format!(": {a}")).unwrap_or_default()
            )
        )
    ));
    None
}

/// The transaction's end when it did not ride with its steps: PREPARE TRANSACTION for a run
/// to prepare, or COMMIT while the commit failpoint is configured.
async fn commit(conn: &mut PgConnection, prepare: Option<&PrepareGid>) -> Result<(), Failure> {
    match prepare {
        None => execute(conn, format!("COMMIT;\n{SESSION_RESET}"))
            .await
            .map_err(|e| classify(&e, "up")),
        // a PREPARE that fails rolls the transaction back (and what it set with it)
        Some(p) => execute(
            conn,
            format!("PREPARE TRANSACTION {};\n{SESSION_RESET}", p.lit),
        )
        .await
        .map_err(|e| classify(&e, "prepare")),
    }
}

/// A step that cannot run in a transaction: fence, session settings, then its up
/// statements after those its checkpoint says are done, each committed with the checkpoint
/// (see `statements`), a data change's batches, then verify + journal in one short fenced
/// transaction that also deletes the checkpoint and resets the session.
async fn run_non_transactional(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    hooks: Option<&DataHooks>,
    attempt: data::Attempt,
) -> Result<(), GroupFailure> {
    let fail = |e: &sqlx::Error, in_transaction| GroupFailure {
        position: 0,
        failure: classify(e, "up"),
        in_transaction,
    };
    let failed = |failure| GroupFailure {
        position: 0,
        failure,
        in_transaction: false,
    };
    async {
        execute(conn, sqlgen::non_transactional_prologue(cx, m))
            .await
            .map_err(|e| fail(&e, false))?;
        let is_data = m.migration.data.is_some();
        let phase = if is_data { "batch" } else { "up" };
        let checkpoint = checkpoint::read(conn, cx, m, phase).await.map_err(failed)?;
        let done = checkpoint.as_ref().map_or(0, |c| c.statements_done(m));
        // a key no batch would cover refuses the change before any of it runs
        let key = if is_data && checkpoint.as_ref().is_none_or(|c| c.last_key.is_none()) {
            Some(data::refuse_uncovered_keys(conn, m).await.map_err(failed)?)
        } else {
            None
        };
        run_up_statements(conn, cx, m, done, checkpoint.is_none())
            .await
            .map_err(|f| GroupFailure {
                position: 0,
                failure: f.failure,
                in_transaction: f.in_transaction,
            })?;
        if is_data {
            data::run_batches(conn, cx, m, hooks, attempt, checkpoint, key)
                .await
                .map_err(failed)?;
        }
        commit_failpoint_non_transactional()?;
        let mut epilogue = sqlgen::non_transactional_epilogue(cx, m);
        epilogue.push_str(SESSION_RESET);
        execute(conn, epilogue.clone()).await.map_err(|e| {
            let mut f = fail(&e, true);
            place_in_verify(&mut f.failure, &e, &epilogue, m);
            f
        })
    }
    .await
}

/// Why a step whose connection went with the server (`failure`) was cut short by the server
/// rather than by someone ending its session (`pg_terminate_backend`, which fails the step):
/// the server reset every session after another process crashed (57P02); the server that
/// answers now is one this agent first saw after the step's group began (restarted, or
/// another took its place: a failover), also when the lane's connection sat idle across the
/// restart; or it has been up for less time than the group has run (durations both, so the
/// two clocks need not agree; a second's margin). None when neither, when the server cannot
/// say. Err (why) when the server went down under this step [`RESTARTS_UNDER_A_STEP`]
/// times: the step is taken for the cause (a statement that crashes the server), and fails.
async fn restarted_under(
    pool: &PgPool,
    failure: &Failure,
    (job, migration): (&Job, &str),
    started: Instant,
) -> Option<Result<String, String>> {
    let why = shard::server_start::restarted_since(pool, failure, started, Duration::from_secs(30))
        .await?;
    let key = format!("{}\n{}\n{migration}", job.plan.plan_id, job.tenant);
    let times = {
        let mut cut = CUT_BY_RESTARTS.lock().expect("restarts lock");
        let n = cut.entry(key).or_insert(0);
        *n += 1;
        *n
    };
    if times >= RESTARTS_UNDER_A_STEP {
        warn!(step = migration, tenant = %job.tenant, times, "the shard's server went down under this step again: taking the step for the cause");
        return Some(Err(format!(
            "{why}; the server went down under this step {times} times: taken for its cause, the step fails"
        )));
    }
    Some(Ok(why))
}

/// How many times the shard's server may go down under one step (plan, target, migration)
/// before the step is taken for the cause and fails: a statement that crashes the server
/// would otherwise be run again, and crash it again, for good.
const RESTARTS_UNDER_A_STEP: u32 = 3;

/// Times the server went down under each step, by plan, target and migration.
static CUT_BY_RESTARTS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, u32>>,
> = std::sync::LazyLock::new(Default::default);

fn commit_failpoint_non_transactional() -> Result<(), GroupFailure> {
    fail::fail_point!(COMMIT_FAILPOINT, |arg: Option<String>| Err(GroupFailure {
        position: 0,
        failure: Failure::agent(
            "up",
            format!(
                "failpoint agent::before_step_commit{}",
                arg.map(|a| format!(": {a}")).unwrap_or_default()
            )
        ),
        in_transaction: false,
    }));
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

/// After a failure, the journal says what happened: a step found there was applied (by a
/// concurrent session, or by a COMMIT whose answer was lost). One read for the group.
///
/// A run to prepare asks `pg_prepared_xacts` first: when its gid is prepared (the answer to
/// its PREPARE was lost, or a copy of the run prepared it), the group is PREPARED, never
/// FAILED. First, so a COMMIT PREPARED in between shows in the journal read that follows.
async fn settle(
    pool: &PgPool,
    job: &Job,
    (group, group_started): (&[usize], Instant),
    failed_position: usize,
    failure: Failure,
    durations: &[Duration],
    reports: &mut [Option<Report>],
) {
    if let Some(p) = &job.prepare {
        match prepared_among(pool, std::slice::from_ref(&p.gid)).await {
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
    let read = async || {
        fail::fail_point!("agent::settle_journal_read", |_| Err(
            sqlx::Error::Protocol("failpoint agent::settle_journal_read".into())
        ));
        let mut conn = pool.acquire().await?;
        shard::read_applied(&mut conn, std::slice::from_ref(&job.tenant), &migrations).await
    };
    // A read that fails is tried again twice, after a pause: a step it leaves unknown goes
    // back to the coordinator NOT_RUN and runs again, and that must not be at once, again
    // and again, while the shard cannot be read.
    let mut read_result = read().await;
    for pause in [100, 400] {
        if read_result.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(pause)).await;
        read_result = read().await;
    }
    let (journal, unread, gone) = match read_result {
        Ok(found) => (found.rows, None, !found.gone.is_empty()),
        Err(error) => {
            warn!(%error, "re-reading the journal after a failure failed");
            (Vec::new(), Some(error.to_string()), false)
        }
    };
    let mut failure = Some(failure);
    for (k, &idx) in group.iter().enumerate() {
        let m = &job.steps[idx];
        let found = journal
            .iter()
            .find(|r| r.migration_id == m.id())
            .map(|r| Found::from(r.clone()));
        reports[idx] = Some(match found {
            Some(found) => Report::already(found, durations[k]),
            None if k == failed_position => {
                let mut f = failure.take().expect("one failure");
                let outcome = if gone {
                    // The tenant's schema was dropped under the plan (its SQL failed for
                    // want of its tables, or of a schema to create in): not a failure of the
                    // step, and nothing to run there any more.
                    f.error.message =
                        format!("{} ({})", shard::gone_tenant(&job.tenant), f.error.message);
                    f.error.phase = shard::GONE.into();
                    StepOutcome::NotRun
                } else if f.server_gone() && unread.is_some() {
                    // The connection went with the server (or the server with it) and the
                    // journal cannot be read: whether the step committed is unknown, and
                    // its SQL did not fail. Not a failure of the plan (under all-or-nothing
                    // one lost connection rolled the whole plan back): not run, and the
                    // journal decides when it runs again.
                    f.error.message = format!(
                        "{}: the connection to the shard was lost, and its journal could not be read to say whether the step committed; it runs again, and the journal decides",
                        f.error.message
                    );
                    StepOutcome::NotRun
                } else if let Some(cut) =
                    restarted_under(pool, &f, (job, m.id()), group_started).await
                {
                    // The server went down and up again (or reset every session after a
                    // crash elsewhere) while the step ran: its transaction was undone with
                    // the server, as the journal says, and its SQL did not fail. Not a
                    // failure of the plan (a restart for a minor upgrade rolled an
                    // all-or-nothing plan back): not run, and it runs again. Unless it
                    // happened under this step too often: failed, the step its cause.
                    let (why, outcome) = match cut {
                        Ok(why) => (
                            format!(
                                "{why}; the journal says the step did not commit: it runs again"
                            ),
                            StepOutcome::NotRun,
                        ),
                        Err(why) => (why, StepOutcome::Failed),
                    };
                    f.error.message = format!("{}: {why}", f.error.message);
                    outcome
                } else if f.concurrent_apply {
                    // Another session applied it first, but its journal row did not read:
                    // which version of the migration it applied, and whether it still is
                    // applied, is unknown. Not this version's already_applied, nor a
                    // failure of the plan: not run, so the coordinator runs it again, and
                    // that run's journal read says.
                    let why = match &unread {
                        Some(error) => format!("re-reading the journal failed ({error})"),
                        None => "its journal row was gone when read again".to_string(),
                    };
                    f.error.message = format!(
                        "{}: another session applied it first, and {why}",
                        f.error.message
                    );
                    StepOutcome::NotRun
                } else {
                    StepOutcome::Failed
                };
                Report {
                    outcome,
                    duration: durations[k],
                    error: Some(f.error),
                    checksum: String::new(),
                    applied_by: String::new(),
                }
            }
            None => Report::not_run(),
        });
    }
}
