//! Undoing a plan on this shard: every journal row it wrote, newest first per target, each
//! with its migration's down SQL and the row's move to the history in one fenced transaction.
use std::sync::Arc;
use std::time::Instant;

use flotilla_core::pb;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{Instrument, info, instrument, warn};

use super::conn::recover;
use super::job::{PlanDef, PlanError};
use super::lock_wait::{
    UndoWaitShown, retry_lock_timeouts, retry_lock_timeouts_watched, with_attempts,
};
use super::sqlgen;
use super::statements::{replay_session_settings, run_down_statements};
use crate::data::prior_image::{prior_image_batches, restore_prior_image};
use crate::error::{Failure, classify};
use crate::metrics::{self, StepMode, StepOutcome};
use crate::step::sql::SESSION_RESET;
use crate::step::{PreparedMigration, StepContext, checkpoint, quote_literal};
use crate::{Agent, shard};

impl Agent {
    /// Halts the plan, waits for its runs in flight, then undoes what it applied here.
    #[instrument(skip_all, fields(shard = %self.config.shard, plan = %req.plan_id, epoch = req.epoch))]
    pub(crate) async fn rollback(self: Arc<Self>, req: pb::RollbackRequest) -> pb::RollbackReply {
        let plan = self.plan(&req.plan_id);
        let _undoing = plan.undoing.lock().await;
        self.halt(&plan);
        plan.wait_idle().await;
        self.advance_fence(req.epoch).await;
        let incomplete = |steps| pb::RollbackReply {
            plan_id: req.plan_id.clone(),
            steps,
            complete: false,
            request: req.request,
        };
        if !self.may_apply().await {
            warn!("stopping before the shard's agent lock was held again; nothing undone");
            return incomplete(Vec::new());
        }
        let by_target = match shard::read_plan_rows(&self.pool, &req.plan_id).await {
            Ok(rows) => rows,
            Err(error) => {
                warn!(%error, "reading the plan's journal rows failed; nothing undone");
                return incomplete(Vec::new());
            }
        };
        if by_target.is_empty() {
            info!("nothing of the plan is applied here");
            return pb::RollbackReply {
                plan_id: req.plan_id,
                steps: Vec::new(),
                complete: true,
                request: req.request,
            };
        }
        // A tenant whose schema changed since its rows were written: its down SQL would run
        // on another schema (a new tenant's objects of the same names). Nothing is undone
        // there; its newest step says why, and the plan's rollback is not complete until an
        // operator answers (see `shard::changed_schema`).
        let names: Vec<String> = by_target
            .keys()
            .filter(|t| !t.is_empty())
            .cloned()
            .collect();
        let changed = shard::changed_schemas(&self.pool, &names)
            .await
            .unwrap_or_default();
        // A tenant dropped since (by hand, or by the application's offboarding): nothing of
        // the plan is left there to undo, and its down SQL failed for ever on its tables
        // ("relation does not exist"), the plan stuck in rollback_failed. Passed over, said
        // (phase `gone`). One renamed (its schema, by OID, is there under another name) is
        // not undone under the other name, and says so.
        let missing = match shard::gone_or_renamed(&self.pool, &names).await {
            Ok(missing) => missing,
            Err(error) => {
                warn!(%error, "reading which tenants are gone failed; nothing undone");
                return incomplete(Vec::new());
            }
        };
        let mut steps = Vec::new();
        let definition = plan.definition().await;
        let lanes = Arc::new(Semaphore::new(req.lanes.max(1) as usize));
        // The shard's own steps are undone after its tenants': a tenant's steps use what the
        // shard's made (an extension in public, a shared table), and undone side by side the
        // shard's DROP EXTENSION failed on the tenants' columns not yet dropped (2BP01).
        let mut by_target = by_target;
        let shard_own = by_target.remove("");
        let mut targets = JoinSet::new();
        for (target, migrations) in by_target {
            if let Some((_, renamed)) = missing.iter().find(|(t, _)| *t == target) {
                let (message, phase) = match renamed {
                    None => (shard::gone_in_rollback(&target), shard::GONE),
                    Some(now) => (
                        shard::renamed_in_rollback(&self.config.shard, &target, now),
                        "down",
                    ),
                };
                warn!(tenant = %target, "not undone: {message}");
                // every step of a gone tenant (each taken as undone: nothing of it is
                // there); a renamed one's newest, as a failed undo names its step
                let named = if renamed.is_none() {
                    &migrations[..]
                } else {
                    &migrations[..migrations.len().min(1)]
                };
                steps.extend(named.iter().map(|m| pb::RolledBackStep {
                    tenant: target.clone(),
                    migration_id: m.clone(),
                    error: Some(pb::StepError {
                        message: message.clone(),
                        phase: phase.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }));
                continue;
            }
            if changed.contains(&target) {
                warn!(tenant = %target, "not undone: its schema changed since its journal rows were written");
                steps.push(pb::RolledBackStep {
                    tenant: target.clone(),
                    migration_id: migrations.first().cloned().unwrap_or_default(),
                    error: Some(pb::StepError {
                        message: shard::changed_schema(&self.config.shard, &target),
                        phase: "down".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                continue;
            }
            let agent = self.clone();
            let definition = definition.clone();
            let lanes = lanes.clone();
            let span = tracing::info_span!("undo", tenant = %target);
            targets.spawn(
                async move {
                    let _lane = lanes.acquire_owned().await;
                    let _slot = agent.slots.clone().acquire_owned().await;
                    tokio::select! {
                        steps = agent.undo_target(definition, req.epoch, &target, &migrations) => steps,
                        () = agent.abort.cancelled() => Vec::new(),
                    }
                }
                .instrument(span),
            );
        }
        while let Some(done) = targets.join_next().await {
            match done {
                Ok(s) => steps.extend(s),
                Err(e) => warn!(error = %e, "an undo task ended abnormally"),
            }
        }
        if let Some(migrations) = shard_own {
            let _slot = self.slots.clone().acquire_owned().await;
            let undone = tokio::select! {
                steps = self
                    .undo_target(definition.clone(), req.epoch, "", &migrations)
                    .instrument(tracing::info_span!("undo", tenant = ""))
                    => steps,
                () = self.abort.cancelled() => Vec::new(),
            };
            steps.extend(undone);
        }
        steps.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        let complete = match shard::count_plan_rows(&self.pool, &req.plan_id).await {
            Ok(left) => left == 0,
            Err(error) => {
                warn!(%error, "counting the plan's journal rows after the undo failed");
                false
            }
        };
        let failed = steps.iter().filter(|s| s.error.is_some()).count();
        info!(
            undone = steps.len() - failed,
            failed, complete, "rollback finished"
        );
        pb::RollbackReply {
            plan_id: req.plan_id,
            steps,
            complete,
            request: req.request,
        }
    }

    /// Undoes one target's steps, newest first, stopping at the first failure (the steps
    /// before it in the journal stay applied, and are not listed).
    async fn undo_target(
        &self,
        definition: Result<Arc<PlanDef>, PlanError>,
        epoch: u64,
        target: &str,
        migrations: &[String],
    ) -> Vec<pb::RolledBackStep> {
        let mut steps = Vec::new();
        let step = |migration: &str, failure: Option<Failure>| pb::RolledBackStep {
            tenant: target.to_string(),
            migration_id: migration.to_string(),
            error: failure.map(|f| f.error),
            rows_kept: 0,
        };
        let Some(first) = migrations.first() else {
            return steps;
        };
        let def = match definition {
            Ok(def) => def,
            Err(message) => {
                let failure = Failure::agent("down", format!("cannot undo `{first}`: {message}"));
                return vec![step(first, Some(failure))];
            }
        };
        let tenant_lit = match quote_literal(target) {
            Ok(lit) => lit,
            Err(reason) => {
                return vec![step(
                    first,
                    Some(Failure::agent("down", reason.to_string())),
                )];
            }
        };
        let mut conn = match self.pool.acquire().await {
            Ok(c) => c,
            Err(e) => return vec![step(first, Some(classify(&e, "down")))],
        };
        let cx = StepContext {
            tenant: target,
            tenant_lit: &tenant_lit,
            plan_lit: &def.plan_lit,
            epoch,
        };
        // undos handed back for a server that went away (see below), on this target
        let mut server_gone = 0u32;
        for migration in migrations {
            let started = Instant::now();
            let mut attempt_began = started;
            let rows_kept = std::sync::atomic::AtomicU64::new(0);
            // Gone on from only when each of its transactions holds its own record: a
            // transactional undo (down SQL and journal move in one), or a prior image's
            // restore alone (each batch with its record). A down statement run on its own
            // may have run and its record not committed: run again, it would run twice.
            let retry_safe = def
                .migrations
                .get(migration)
                .is_some_and(|m| m.is_transactional() || m.down.is_empty());
            let result = loop {
                let result = match def.migrations.get(migration) {
                    None => Err((
                        Failure::agent(
                            "down",
                            format!(
                                "plan {} has no migration `{migration}`, so its down SQL is unknown",
                                def.plan_id
                            ),
                        ),
                        false,
                    )),
                    Some(m) if m.down.is_empty() && !m.has_prior_image() => Err((
                        Failure::agent(
                            "down",
                            if m.migration.data.is_some() {
                                format!(
                                    "migration `{migration}` has no down SQL and no prior image: \
                                 the rows its batches changed stay as they are"
                                )
                            } else {
                                // (irreversible: said so, with what stays and how to undo it)
                                format!(
                                    "migration `{migration}` has no down SQL (irreversible): it \
                                 stays applied on this target, and so do the steps before it \
                                 (undone newest first, the undo stops here); the steps after it \
                                 were undone. To undo it, give its down SQL: `flotilla plan \
                                 rollback {} --down-from DIR`",
                                    def.plan_id
                                )
                            },
                        ),
                        false,
                    )),
                    Some(m) => {
                        let shared = crate::data::UndoShared {
                            publish: crate::data::Publish {
                                plan_id: &def.plan_id,
                                shard: &self.config.shard,
                                board: &self.progress,
                            },
                            buckets: &self.buckets,
                            pool: &self.pool,
                            rows_kept: &rows_kept,
                        };
                        undo_step(&mut conn, &cx, m, Some(shared)).await
                    }
                };
                // The server restarted under the undo (a restart for a minor upgrade, a
                // crash): every session of it went with it, so nothing of the attempt can
                // commit later, and what it did is undone with its transaction or recorded (a
                // prior image's restored batches, the down statements done). Once the server
                // answers, the journal says whether the attempt's last transaction committed
                // before the cut (nothing left to undo: undone) or where to go on from, as a
                // forward step does. Before, a routine restart left an all-or-nothing rollback
                // failed on every target, half undone. A session ended on its own
                // (`pg_terminate_backend`, a lost connection whose backend may live on) fails
                // the undo, as it fails a step.
                match &result {
                    Err((failure, _))
                        if retry_safe
                            && server_gone < UNDO_SERVER_GONE_RETRIES
                            && restarted_under(&self.pool, failure, attempt_began).await =>
                    {
                        server_gone += 1;
                        conn.close_on_drop();
                        drop(conn);
                        let to_undo =
                            still_to_undo(&self.pool, target, migration, &def.plan_id).await;
                        conn = match self.pool.acquire().await {
                            Ok(c) => c,
                            Err(e) => {
                                steps.push(step(migration, Some(classify(&e, "down"))));
                                return steps;
                            }
                        };
                        match to_undo {
                            Ok(false) => {
                                info!(step = %migration, "the server restarted under the undo, after it committed");
                                break Ok(());
                            }
                            Ok(true) => warn!(step = %migration, error = %failure.error.message,
                                              "the shard's server restarted under the undo; going on from what it undid"),
                            Err(e) => break Err((classify(&e, "down"), false)),
                        }
                        attempt_began = Instant::now();
                    }
                    _ => break result,
                }
            };
            match result {
                Ok(()) => {
                    metrics::step_duration(
                        StepMode::Rollback,
                        StepOutcome::RolledBack,
                        started.elapsed(),
                    );
                    metrics::step_finished(StepOutcome::RolledBack);
                    info!(step = %migration, "step undone");
                    steps.push(pb::RolledBackStep {
                        rows_kept: rows_kept.load(std::sync::atomic::Ordering::Relaxed),
                        ..step(migration, None)
                    });
                }
                Err((failure, broken)) => {
                    // refused by the fence (a new leader's epoch on the shard): not a
                    // failure of the undo, which the new leader runs again (it counted six
                    // failures on a shard whose plan had none)
                    let outcome =
                        if failure.error.sqlstate == flotilla_core::protocol::sqlstate::FENCED {
                            StepOutcome::Fenced
                        } else {
                            StepOutcome::Failed
                        };
                    metrics::step_duration(StepMode::Rollback, outcome, started.elapsed());
                    metrics::step_finished(outcome);
                    warn!(step = %migration, sqlstate = %failure.error.sqlstate,
                          error = %failure.error.message, "undoing step failed; stopping this target");
                    if broken || failure.connection_lost {
                        conn.close_on_drop();
                    }
                    steps.push(step(migration, Some(failure)));
                    // An irreversible data change stays, but does not keep the steps before
                    // it from being undone (nothing of theirs depends on its rows' values).
                    let irreversible_data = def.migrations.get(migration).is_some_and(|m| {
                        m.migration.data.is_some() && m.down.is_empty() && !m.has_prior_image()
                    });
                    if irreversible_data && !broken {
                        continue;
                    }
                    break;
                }
            }
        }
        steps
    }
}

/// How often one target's undo goes on after its server restarted under it.
const UNDO_SERVER_GONE_RETRIES: u32 = 3;

/// Whether the shard's server restarted (or reset every session after a crash) since
/// `began`, `failure` being what the undo saw of it: no session of the attempt is left.
/// Waits for the server to answer (at most 30 s).
async fn restarted_under(pool: &sqlx::PgPool, failure: &Failure, began: Instant) -> bool {
    // (crash recovery, or a restart, may take longer than a pool's connection attempt)
    let within = std::time::Duration::from_secs(120);
    match shard::server_start::restarted_since(pool, failure, began, within).await {
        None => false,
        // a crash's reset is said at once: the server is waited for here, in its recovery
        Some(_) if failure.error.sqlstate == flotilla_core::protocol::sqlstate::CRASH_SHUTDOWN => {
            shard::server_start::once_back(pool, within).await.is_some()
        }
        Some(_) => true,
    }
}

/// Whether a step of `plan_id` is still to undo on `target`: its journal row is there, or a
/// checkpoint of it (an undo cut short, or a change part-way).
async fn still_to_undo(
    pool: &sqlx::PgPool,
    target: &str,
    migration: &str,
    plan_id: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM flotilla.journal \
                         WHERE target = $1 AND migration_id = $2 AND plan_id = $3) \
             OR EXISTS (SELECT 1 FROM flotilla.checkpoints \
                         WHERE target = $1 AND migration_id = $2 AND plan_id = $3)",
    )
    .bind(target)
    .bind(migration)
    .bind(plan_id)
    .fetch_one(pool)
    .await
}

/// An undo that failed after `attempts`: the connection out of its transaction and reset
/// (true when that failed: it must not be pooled), and the error.
async fn undo_failed(
    conn: &mut PgConnection,
    m: &PreparedMigration,
    e: &sqlx::Error,
    attempts: u32,
) -> (Failure, bool) {
    let broken = recover(conn, true).await;
    let mut failure = classify(e, "down");
    failure.error.message = with_attempts(&failure, attempts, m.lock_timeout_ms);
    (failure, broken)
}

/// Runs one down migration. On failure: the error, and whether the connection is unusable.
pub(super) async fn undo_step(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    shared: Option<crate::data::UndoShared<'_>>,
) -> Result<(), (Failure, bool)> {
    fail::fail_point!("agent::before_rollback_step", |arg: Option<String>| Err((
        Failure::agent(
            "down",
            format!(
                "failpoint agent::before_rollback_step{}",
                arg.map(|a| format!(": {a}")).unwrap_or_default()
            )
        ),
        false
    )));
    let run = |sql: String| sqlx::raw_sql(AssertSqlSafe(sql));
    // A lock timeout undid what timed out: that alone is tried again after a pause, as a
    // step's is (a rollback runs while the application runs).
    if m.is_transactional() {
        let undo = sqlgen::transactional_undo(cx, m);
        let what = format!("the undo of step {}", m.id());
        // (a rollback's last attempt is watched for who blocks it, as a step's is, and its
        // waits are shown as a step's are)
        let watch = shared.as_ref().map(|s| (s.pool, m));
        let mut shown = shared.map(|s| UndoWaitShown::new(s.publish, cx.tenant, m));
        if let Err((e, attempts, blocker)) =
            retry_lock_timeouts_watched(conn, &undo, true, &what, watch, shown.as_mut()).await
        {
            let (mut failure, broken) = undo_failed(conn, m, &e, attempts).await;
            if let Some(b) = blocker {
                failure.error.message = format!("{}; {b}", failure.error.message);
            }
            return Err((failure, broken));
        }
        return Ok(());
    }
    let statements = async {
        let once = |e: sqlx::Error| classify(&e, "down");
        run(sqlgen::non_transactional_prologue(cx, m))
            .execute(&mut *conn)
            .await
            .map_err(once)?;
        run(sqlgen::non_transactional_undo_prologue(cx, m))
            .execute(&mut *conn)
            .await
            .map_err(once)?;
        let undone = checkpoint::undone(conn, cx, m).await?;
        let undone = super::statements::pass_over_never_run(conn, cx, m, undone).await?;
        let batches = prior_image_batches(conn, cx, m).await.map_err(once)?;
        if !batches.is_empty() {
            // The batches ran after the up SQL, under its session settings, and saved their
            // post images as text of that session: the restore compares under the same (a
            // `SET TimeZone` there, and a timestamptz read back in another zone was taken
            // for a row the application changed since, and kept). Not its role: the restore
            // runs as the undo does (it deletes images, which the up's role need not be
            // allowed to). Then the session goes back to what the down statements expect.
            let settings = m.up.iter().filter(|s| !flotilla_core::sql::changes_role(s));
            replay_session_settings(conn, settings)
                .await
                .map_err(once)?;
            // and floats exact, as the batches had them (`data::EXACT_FLOATS`)
            run(crate::data::EXACT_FLOATS.to_string())
                .execute(&mut *conn)
                .await
                .map_err(once)?;
            restore_prior_image(conn, cx, m, batches, shared)
                .await
                .map_err(once)?;
            run(format!(
                "{SESSION_RESET}{}",
                sqlgen::non_transactional_prologue(cx, m)
            ))
            .execute(&mut *conn)
            .await
            .map_err(once)?;
        }
        run_down_statements(conn, cx, m, undone, shared.as_ref().map(|s| s.pool)).await
    }
    .await;
    if let Err(failure) = statements {
        // the undo's prologue or a down statement may have failed inside its transaction
        // (ROLLBACK outside one only warns)
        let broken = recover(conn, true).await;
        return Err((failure, broken));
    }
    // The down statements are done: a lock timeout here is waited out by the record alone,
    // under the step's lock_timeout (the session is reset after it).
    let epilogue = format!(
        "{}{SESSION_RESET}",
        sqlgen::non_transactional_undo_epilogue(cx, m)
    );
    let what = format!("the record of the undo of step {}", m.id());
    if let Err((e, attempts)) = retry_lock_timeouts(conn, &epilogue, true, &what).await {
        let broken = recover(conn, true).await;
        let mut failure = classify(&e, "down");
        if attempts > 1 {
            failure.error.message = format!(
                "the undo of step {} ran, and its record (the journal row's move) did not \
                 commit in {attempts} attempts: {}; the next rollback makes only the record \
                 (its down statements are recorded done)",
                m.id(),
                failure.error.message
            );
        }
        return Err((failure, broken));
    }
    Ok(())
}
