//! A plan's definition and a run as the agent holds it between Assign and result: validated
//! against its plan, with what the journal already holds, and how its outcome goes on the
//! wire. The types the executor, the scheduler, two-phase commit and undo share.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_core::{Migration, pb};

use super::two_phase::validate_gid;
use crate::data::DataHooks;
use crate::error::Failure;
use crate::metrics::StepOutcome;
use crate::step::{BuildError, PreparedMigration, quote_literal};

/// A run queued or running on this agent, by its key (`Job::claim_key`), and its steps
/// (`Job::step_keys`); released (dropped) with its run.
pub(crate) struct RunClaim {
    claims: Arc<ClaimSet>,
    key: String,
    steps: Vec<String>,
}

impl Drop for RunClaim {
    fn drop(&mut self) {
        {
            let mut held = self.claims.held.lock().expect("runs lock");
            held.runs.remove(&self.key);
            for step in &self.steps {
                if let Some(n) = held.steps.get_mut(step) {
                    *n -= 1;
                    if *n == 0 {
                        held.steps.remove(step);
                    }
                }
            }
        }
        self.claims.released.notify_waiters();
    }
}

#[derive(Default)]
struct ClaimSet {
    held: Mutex<Held>,
    /// Told when a run is released: copies waiting for its steps look again.
    released: tokio::sync::Notify,
}

#[derive(Default)]
struct Held {
    runs: HashSet<String>,
    /// The steps (plan, target, migration) of the runs held, with how many hold each.
    steps: HashMap<String, usize>,
}

/// What [`RunClaims::claim`] found.
pub(crate) enum Claimed {
    /// Claimed: the run is queued.
    Run(RunClaim),
    /// The same run (its key) is already queued or running here: its result answers.
    Copy,
    /// Another run holds one of its steps: a copy a leader before this one sent (under
    /// another epoch, another run id), still queued or running here. Queued once that one
    /// is released ([`RunClaims::claim_when_free`]), the lane reading the journal then.
    StepsBusy,
}

/// The runs queued or running on this agent. A coordinator sends its outstanding runs
/// again after every reconnect, while the first copies may still be queued or running
/// here: a second copy of a non-transactional step or a data change would apply it again
/// (the journal row is written only at its end), and a second copy of a run to prepare
/// would only wait for the first one's locks. The first copy's result answers both (the
/// outbox keeps it across streams). A new leader sends them under new run ids: its copy
/// of a step still running here waited on the fence row, then ran the step's statements
/// again once the first committed (an UPDATE ran twice before its journal row's conflict
/// undid it, and the agent reported a failure): the steps of its runs are claimed too.
#[derive(Default, Clone)]
pub(crate) struct RunClaims(Arc<ClaimSet>);

impl RunClaims {
    /// Claims a run about to be queued, and its steps.
    pub fn claim(&self, key: String, steps: Vec<String>) -> Claimed {
        let mut held = self.0.held.lock().expect("runs lock");
        if held.runs.contains(&key) {
            return Claimed::Copy;
        }
        if steps.iter().any(|s| held.steps.contains_key(s)) {
            return Claimed::StepsBusy;
        }
        held.runs.insert(key.clone());
        for step in &steps {
            *held.steps.entry(step.clone()).or_default() += 1;
        }
        Claimed::Run(RunClaim {
            claims: self.0.clone(),
            key,
            steps,
        })
    }

    /// Waits until no run holds any of `steps`, then claims them with `key` (None: the same
    /// run was claimed meanwhile, whose result answers).
    pub async fn claim_when_free(&self, key: String, steps: Vec<String>) -> Option<RunClaim> {
        loop {
            let released = self.0.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.claim(key.clone(), steps.clone()) {
                Claimed::Run(claim) => return Some(claim),
                Claimed::Copy => return None,
                Claimed::StepsBusy => released.await,
            }
        }
    }
}

/// A plan's migrations, validated and prepared on receipt.
#[derive(Debug)]
pub(crate) struct PlanDef {
    pub plan_id: String,
    pub plan_lit: String,
    pub migrations: HashMap<String, Arc<PreparedMigration>>,
    /// A failed run stops the plan's queued runs here (`pb::PlanDefinition`).
    pub stop_on_failure: bool,
    pub generation: u64,
}

/// Why a plan definition did not validate.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum DefinitionError {
    #[error(transparent)]
    Migration(#[from] flotilla_core::PlanError),
    #[error(transparent)]
    Sql(#[from] BuildError),
    /// The split of its SQL (on a blocking thread) panicked or was cancelled.
    #[error("reading its SQL ended abnormally: {0}")]
    Aborted(String),
}

/// Why a plan's runs cannot be run or undone here.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum PlanError {
    #[error("the definition of plan {plan} is invalid: {source}")]
    Invalid {
        plan: String,
        source: DefinitionError,
    },
    #[error("no definition of plan {0} was received")]
    Missing(String),
}

impl PlanDef {
    pub fn from_pb(def: pb::PlanDefinition) -> Result<PlanDef, DefinitionError> {
        let mut migrations = HashMap::with_capacity(def.migrations.len());
        for m in def.migrations {
            let id = m.id.clone();
            let m = Migration::try_from(m)?;
            let prepared = PreparedMigration::new(
                m,
                def.default_lock_timeout_ms,
                def.default_statement_timeout_ms,
            )?;
            migrations.insert(id, Arc::new(prepared));
        }
        Ok(PlanDef {
            plan_lit: quote_literal(&def.plan_id)?,
            plan_id: def.plan_id,
            migrations,
            stop_on_failure: def.stop_on_failure,
            generation: def.generation,
        })
    }
}

/// The gid a run's transaction is prepared under, as given and quoted.
pub(crate) struct PrepareGid {
    pub gid: String,
    pub lit: String,
}

/// A run, validated against its plan and ready to execute.
pub(crate) struct Job {
    pub run: pb::Run,
    pub plan: Arc<PlanDef>,
    pub tenant: String,
    pub tenant_lit: String,
    pub epoch: u64,
    /// The epoch of the leader that had welcomed this agent when the run was queued: a run
    /// queued before a newer leader's welcome is a deposed leader's, and is not started.
    pub queued_under: u64,
    pub steps: Vec<Arc<PreparedMigration>>,
    /// The journal's row for steps found applied before the run started.
    pub applied: Vec<Option<Found>>,
    /// Whether `applied` holds the journal's answer yet (a lane reads it, for a batch of
    /// queued runs at once, before it runs the first of them).
    pub checked: bool,
    /// Set when the run's transaction ends in PREPARE TRANSACTION instead of COMMIT (all its
    /// steps are transactional, and run as one transaction whether fused or not).
    pub prepare: Option<PrepareGid>,
    /// Held while the run is queued or running, so a resent copy does not run beside it.
    pub claim: Option<RunClaim>,
    /// For runs with a data change: pause/halt, the server's budget, the progress board.
    pub hooks: Option<Arc<DataHooks>>,
    /// The plan's halts as the run was queued (None: not watched, as in tests).
    pub halts: Option<Halts>,
}

/// The plan's halt count as a run was queued, and the plan's control to compare it with: a
/// halt since (a cancel, a failure elsewhere, a rollback, an atomic unit's abort) is the
/// run's to honour where it can stop cleanly. Taken once for the whole run, so a halt
/// during one of its steps is not taken as the next step's start.
#[derive(Clone)]
pub(crate) struct Halts {
    pub control: tokio::sync::watch::Receiver<crate::data::PlanControl>,
    pub at_queue: u64,
}

impl Halts {
    pub fn halted(&self) -> bool {
        self.control.borrow().halts != self.at_queue
    }
}

impl Job {
    /// A run that does not fit its plan comes back with the reason.
    pub fn new(
        plan: &Arc<PlanDef>,
        run: pb::Run,
        epoch: u64,
    ) -> Result<Job, Box<(pb::Run, Failure)>> {
        let fail = |run, msg: String| Err(Box::new((run, Failure::agent("definition", msg))));
        if !run.tenant.is_empty()
            && let Err(reason) = flotilla_core::validate_tenant_name(&run.tenant)
        {
            return fail(run, reason);
        }
        let mut steps = Vec::with_capacity(run.migrations.len());
        for id in &run.migrations {
            match plan.migrations.get(id) {
                Some(m) => steps.push(m.clone()),
                None => {
                    let msg = format!("plan {} has no migration `{id}`", plan.plan_id);
                    return fail(run, msg);
                }
            }
        }
        let tenant_lit = match quote_literal(&run.tenant) {
            Ok(lit) => lit,
            Err(reason) => return fail(run, reason.to_string()),
        };
        let prepare = if run.prepare_gid.is_empty() {
            None
        } else {
            let fail = |run, msg: String| Err(Box::new((run, Failure::agent("prepare", msg))));
            let lit = match validate_gid(&run.prepare_gid, &plan.plan_id) {
                Ok(lit) => lit,
                Err(reason) => return fail(run, reason.to_string()),
            };
            if let Some(m) = steps.iter().find(|m| !m.is_transactional()) {
                let msg = format!(
                    "migration `{}` cannot run in a transaction, so it cannot take part in two-phase commit",
                    m.id()
                );
                return fail(run, msg);
            }
            Some(PrepareGid {
                gid: run.prepare_gid.clone(),
                lit,
            })
        };
        Ok(Job {
            plan: plan.clone(),
            tenant: run.tenant.clone(),
            tenant_lit,
            epoch,
            queued_under: 0,
            applied: vec![None; steps.len()],
            checked: false,
            steps,
            run,
            prepare,
            claim: None,
            hooks: None,
            halts: None,
        })
    }

    /// What keeps one copy of this run queued or running here (`RunClaims`): its prepare
    /// gid (which names the plan's unit, run, epoch and target), else its plan and run id
    /// (a run id is unique in a plan: the epoch is in its high bits). A new leader's runs
    /// of the same steps have other ids, and run beside an old epoch's only until the
    /// fence stops the old one.
    /// The steps of the run, each as (plan, target, migration): what two copies of a run
    /// under different run ids share.
    pub fn step_keys(&self) -> Vec<String> {
        self.steps
            .iter()
            .map(|m| format!("{}\0{}\0{}", self.plan.plan_id, self.tenant, m.id()))
            .collect()
    }

    /// The step keys a run claims: none for a run to prepare (a second copy of one waits
    /// for the first's locks, and its gid says which it is).
    pub fn claimed_steps(&self) -> Vec<String> {
        if self.prepare.is_some() {
            Vec::new()
        } else {
            self.step_keys()
        }
    }

    pub fn claim_key(&self) -> String {
        match &self.prepare {
            Some(p) => p.gid.clone(),
            None => format!("run:{}:{}", self.plan.plan_id, self.run.run_id),
        }
    }

    /// Takes the journal's word for steps already applied on this run's target.
    pub fn mark_applied(&mut self, journal: &mut HashMap<(String, String), Found>) {
        for (slot, step) in self.applied.iter_mut().zip(&self.steps) {
            if let Some(found) = journal.get(&(self.tenant.clone(), step.id().to_string())) {
                *slot = Some(found.clone());
            }
        }
    }

    pub fn fully_applied(&self) -> bool {
        self.applied.iter().all(Option::is_some)
    }

    pub fn already_applied_result(&self) -> pb::RunResult {
        let reports = self.applied.iter().map(|a| {
            Some(Report::already(
                a.clone().unwrap_or_default(),
                Duration::ZERO,
            ))
        });
        self.result(reports.collect())
    }

    /// A resent run whose transaction is already prepared: its steps PREPARED again (those
    /// the journal held before it, ALREADY_APPLIED), nothing run.
    pub fn prepared_result(&self) -> pb::RunResult {
        let reports = self.applied.iter().zip(&self.steps).map(|(a, m)| {
            Some(match a {
                Some(found) => Report::already(found.clone(), Duration::ZERO),
                None => Report::prepared(m.migration.checksum.clone(), Duration::ZERO),
            })
        });
        self.result(reports.collect())
    }

    pub(crate) fn result(&self, reports: Vec<Option<Report>>) -> pb::RunResult {
        pb::RunResult {
            run_id: self.run.run_id,
            tenant: self.tenant.clone(),
            steps: self
                .steps
                .iter()
                .zip(reports)
                .map(|(m, r)| r.unwrap_or_else(Report::not_run).into_pb(m.id()))
                .collect(),
            prepared_at_us: 0,
        }
    }
}

/// A step's row in the journal: its checksum, and the plan that applied it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Found {
    pub checksum: String,
    pub plan_id: String,
}

impl From<crate::shard::JournalRow> for Found {
    fn from(row: crate::shard::JournalRow) -> Found {
        Found {
            checksum: row.checksum,
            plan_id: row.plan_id,
        }
    }
}

/// What became of one step, before it goes on the wire.
pub(crate) struct Report {
    pub outcome: StepOutcome,
    pub duration: Duration,
    pub error: Option<pb::StepError>,
    pub checksum: String,
    /// ALREADY_APPLIED: the plan whose journal row it is.
    pub applied_by: String,
}

impl Report {
    pub fn already(found: Found, duration: Duration) -> Report {
        Report {
            outcome: StepOutcome::AlreadyApplied,
            duration,
            error: None,
            checksum: found.checksum,
            applied_by: found.plan_id,
        }
    }
    pub fn prepared(checksum: String, duration: Duration) -> Report {
        Report {
            outcome: StepOutcome::Prepared,
            duration,
            error: None,
            checksum,
            applied_by: String::new(),
        }
    }
    pub fn not_run() -> Report {
        Report {
            outcome: StepOutcome::NotRun,
            duration: Duration::ZERO,
            error: None,
            checksum: String::new(),
            applied_by: String::new(),
        }
    }
    pub fn into_pb(self, migration_id: &str) -> pb::StepResult {
        pb::StepResult {
            migration_id: migration_id.to_string(),
            outcome: self.outcome.to_pb() as i32,
            duration_ms: u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            error: self.error,
            checksum: self.checksum,
            applied_by: self.applied_by,
        }
    }
}

/// Every step of a run NOT_RUN (the plan halted before it started).
pub(crate) fn not_run(run: &pb::Run) -> pb::RunResult {
    every_step(run, StepOutcome::NotRun, None)
}

/// Every step of a run NOT_RUN on a tenant gone from its shard (`shard::GONE`), saying so.
pub(crate) fn all_gone(run: &pb::Run, why: String) -> pb::RunResult {
    let error = pb::StepError {
        message: why,
        phase: crate::shard::GONE.into(),
        ..Default::default()
    };
    every_step(run, StepOutcome::NotRun, Some(error))
}

/// Every step of a run FAILED with the same error (bad definition, no connection).
pub(crate) fn all_failed(run: &pb::Run, failure: &Failure) -> pb::RunResult {
    every_step(run, StepOutcome::Failed, Some(failure.error.clone()))
}

/// Every step of a run with the same outcome (and error), nothing of it run.
fn every_step(run: &pb::Run, outcome: StepOutcome, error: Option<pb::StepError>) -> pb::RunResult {
    let steps = run
        .migrations
        .iter()
        .map(|m| {
            Report {
                outcome,
                duration: Duration::ZERO,
                error: error.clone(),
                checksum: String::new(),
                applied_by: String::new(),
            }
            .into_pb(m)
        })
        .collect();
    pb::RunResult {
        run_id: run.run_id,
        tenant: run.tenant.clone(),
        steps,
        prepared_at_us: 0,
    }
}
