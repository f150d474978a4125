//! One plan in motion: its steps' desired and observed state, and the choice of which
//! runs to hand each shard next. Pure state, no I/O: the engine feeds it results and
//! sends what it returns, so everything here is unit-tested without a database.
//!
//! - [`step`]: a step's status;
//! - [`schedule`]: dependencies, lanes and the next runs of a shard;
//! - [`replies`]: what agents answer (run results, rollback replies, a lost shard);
//! - [`units`]: atomic units (an atomic plan, or its atomic parallel groups) and 2PC;
//! - [`settle`]: halting, and where the plan ends;
//! - [`status`]: the operator's view, from memory or from the store.
mod replies;
mod schedule;
mod settle;
pub(crate) use replies::GONE;
pub(crate) use settle::{ABORTING, ABORTING_GROUP, UNDOING};
pub mod status;
pub mod step;
#[cfg(test)]
pub(crate) mod tests;
pub mod timings;
mod units;
pub mod waves;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use flotilla_core::protocol::{Decision, LOCK_WAIT};
pub use flotilla_core::state::PlanState;
use flotilla_core::{FailurePolicy, PlanSpec, Target, TxMode, pb};

use crate::planner::PlannedStep;
use crate::store::StepUpdate;
pub use step::StepStatus;
pub use units::{forgotten_prefix, left_prefix};
pub use waves::StoredWave;

#[derive(Debug)]
pub struct Step {
    pub migration: usize,
    pub target: usize,
    pub deps: Vec<usize>,
    /// Private to the plan's modules, and changed only by `PlanRun::set_status`: it keeps
    /// the shard's count of steps to run, and a count left at 0 while a step is pending
    /// would give its shard no lanes (`rebalance_lanes`).
    status: StepStatus,
    pub transactional: bool,
}

impl Step {
    /// Whether the plan may hold something to undo at this step, as its state says:
    /// applied, prepared, running or pending, or a non-transactional step that failed
    /// (part-way). Not: undone, not run, another plan's, or a transactional step that failed
    /// (its transaction rolled back).
    pub fn may_hold_undo(&self) -> bool {
        match self.status {
            StepStatus::RolledBack | StepStatus::NotRun | StepStatus::AlreadyApplied => false,
            StepStatus::Failed => !self.transactional,
            _ => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackState {
    NotAsked,
    /// Asked on the stream `conn_id`, as request `request` (its reply tells it back).
    Asked {
        conn_id: u64,
        request: u64,
    },
    Done,
}

#[derive(Debug)]
pub struct ShardRun {
    pub targets: Vec<usize>,
    ready: VecDeque<usize>,
    queued: BTreeSet<usize>,
    pub outstanding: BTreeMap<u64, Vec<usize>>,
    pub lanes: u32,
    /// How many of the shard's steps are pending or running, whatever their wave: kept by
    /// `PlanRun::set_status`, so that a shard with none is passed over at each hand-out
    /// without looking at its targets (at 64 shards, looking at every finished shard's
    /// steps each time was a twentieth of the coordinator's CPU).
    to_run: usize,
    /// The connection the plan's definition was sent on.
    pub defined_on: Option<u64>,
    pub rollback: RollbackState,
    /// Prepared transactions of this plan on the shard, by gid, with their steps.
    pub prepared: BTreeMap<String, Vec<usize>>,
    /// Gids handed out with runs still out (a PREPARED answer moves them above).
    pub gids: BTreeMap<u64, String>,
    /// Whether the shard has confirmed the decision for every prepared gid.
    pub resolved: bool,
    /// An aborting unit's shard whose agent was lost with transactions of it prepared there
    /// (`PlanRun::leave_abort_to_etcd`): the other shards' rollback does not wait for it;
    /// its agent back, it is told the abort (and only then asked for its undo).
    pub left: bool,
    /// The connection the Resolve was sent on.
    pub resolve_sent_on: Option<u64>,
    /// After a Resolve the shard could not carry out (e.g. it could not read the
    /// decision from etcd), when to send it again.
    pub resolve_retry_at: Option<std::time::Instant>,
}

impl ShardRun {
    /// Targets ready to run here, within lanes the shard has.
    /// Steps of the plan on the shard still pending or running.
    pub fn steps_left(&self) -> bool {
        self.to_run > 0
    }

    pub fn has_ready(&self) -> bool {
        self.lanes > 0 && !self.ready.is_empty()
    }
}

/// When a plan's steps found applied were read from the agents' journals, which says
/// whether another plan's rollback may have undone them before this plan took its locks
/// (it would report those targets applied and end `completed` with them unmigrated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppliedRead {
    /// By this plan's submit, when agents had sent this many rollback replies: read again
    /// if one arrived since (or the plan waited for another's locks).
    AtSubmit { undo_replies: u64 },
    /// By a submit whose plan then waited for approvals (any length of time, across
    /// leaders): read again.
    BeforeApproval,
    /// Otherwise (a retry, a plan a new leader rebuilt): read again only if the plan waited
    /// for another's locks.
    Before,
}

/// The end of a `continue` plan's message while it goes on after a failure (replaced when
/// it ends).
pub const GOING_ON: &str = "; other targets go on";

/// The start of a retry's message: an operator's note while the steps run again, not how the
/// plan went (its first failure under `continue`, and its end, replace it: a retried plan
/// that failed again said only "retry of 12 steps requested by ..."; see
/// `PlanRun::retry_note`).
pub const RETRY_NOTE: &str = "retry of ";

impl PlanRun {
    /// Whether the message is a retry's note and nothing since.
    pub fn message_is_retry_note(&self) -> bool {
        !self.retry_note.is_empty() && self.message == self.retry_note
    }
}

pub struct PlanRun {
    pub id: String,
    pub spec: Arc<PlanSpec>,
    pub definition: pb::PlanDefinition,
    pub targets: Vec<Target>,
    pub steps: Vec<Step>,
    per_target: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    remaining: Vec<usize>,
    pub state: PlanState,
    /// Where a rollback or a stop ends: rolled_back (or failed), cancelled when an
    /// operator cancelled, halted when the plan was halted.
    pub rollback_ends: PlanState,
    /// Whether an operator's command (rollback, cancel, halt) is what ends it: its end is
    /// counted `by="operator"`, and the failure alert is not for it.
    pub by_operator: bool,
    pub message: String,
    pub shards: BTreeMap<String, ShardRun>,
    pub failures: Vec<pb::StepFailure>,
    index: HashMap<(String, String, String), usize>,
    pub created_at_ms: i64,
    pub epoch: u64,
    pub rollback_errors: usize,
    /// By data change: the rows its undo's prior image left with their newer values
    /// (changed or deleted since their batch), and on how many targets. Said at the plan's
    /// end: a rollback that restored 10 rows of 200,000 read as a plain success.
    pub rows_kept: BTreeMap<String, (u64, usize)>,
    /// The message a retry set ("retry of 3 steps requested by ..."): while the message is
    /// still that note alone, the first failure under `continue` and the plan's end replace
    /// it (a cancel of a shard since added to it, and it is kept).
    pub retry_note: String,
    /// Shards a plan rolling back knows undone before it (a new leader's rebuild: their
    /// agents confirmed their undo, and they let go of their locks): not asked again, nor
    /// locked again (another plan may hold them now).
    pub undone_before: BTreeSet<String>,
    /// Whether the plan holds its shard locks; nothing is sent to agents before.
    pub locked: bool,
    /// Why it waits for its locks (which plan holds which shard), if it does.
    pub lock_wait: Option<String>,
    /// How long it has run under this leader (running, not waiting for a person or for
    /// another plan's locks), as the metrics' ticks saw it; and when a tick last saw it
    /// running (0: not running then). Its duration ratio is measured by it.
    pub ran_ms: u64,
    pub observed_at_ms: i64,
    /// When the steps found applied were read from the journals: whether to read them
    /// again once the locks are taken ([`PlanRun::recheck_applied`]).
    pub applied_read: AppliedRead,
    /// Atomic plans: when the first target prepared (start of the window in
    /// which every shard holds locks).
    pub first_prepared: Option<std::time::Instant>,
    /// Atomic units: the agents' PREPARE and COMMIT PREPARED times of the unit in progress.
    pub two_phase_clock: timings::TwoPhaseClock,
    /// Atomic units: the decision of the unit in progress, once written.
    pub decision: Option<Decision>,
    /// Each step's atomic unit (0 for every step of an atomic plan, the parallel
    /// group's index in an atomic group), if it has one.
    unit_of: Vec<Option<usize>>,
    /// Per migration: it adds an enum value, which no later step may use in the same
    /// transaction (55P04): a step that depends on it is not fused with it.
    adds_enum_value: Vec<bool>,
    /// The plan's atomic units in the order they commit.
    units: Vec<usize>,
    /// Index into `units` of the unit now running, preparing or deciding
    /// (`units.len()` once every unit committed).
    unit_pos: usize,
    /// Where the plan is paused.
    pub paused: Paused,
    /// Shards an operator cancelled (policies stop and continue): their steps not done by
    /// then are not run, the other shards go on, and the plan ends cancelled.
    pub cancelled: BTreeSet<String>,
    /// Targets whose tenant is gone from its shard (its schema dropped during the plan, as
    /// the agent found): their steps are not run, and that is no failure of the plan.
    pub gone: BTreeSet<usize>,
    /// Rebuilt by a new leader: the one before may have started units that the store
    /// does not show (its last writes can be lost with it).
    pub inherited: bool,
    /// A unit entered on an inherited plan, not yet checked against etcd and the agents'
    /// in-doubt transactions: nothing of it is handed out until it is.
    pub unit_unverified: bool,
    /// With `unit_unverified`: its decision was read, and there was none (a cancel may
    /// then decide the abort: the leader before, deposed, can write none any more).
    pub decision_absent: bool,
    /// A shard answered a commit's Resolve that etcd holds no decision for the unit (its
    /// data lost, or restored from an older snapshot, while this leader carried it out):
    /// the leader writes it again (`two_phase`).
    pub decision_lost: bool,
    /// Data changes' latest progress, by (migration, shard, tenant).
    pub progress: BTreeMap<(String, String, String), pb::DataProgress>,
    /// The plan's waves in order (one of every target for a plan without waves).
    pub waves: Vec<waves::WaveRun>,
    /// Each target's wave.
    wave_of: Vec<usize>,
    /// Index into `waves` of the wave running, baking or waiting (`waves.len()` once every
    /// wave passed).
    wave_pos: usize,
}

/// Where a plan is paused: no run is handed out there until it is resumed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paused {
    /// The whole plan.
    pub plan: bool,
    /// Single shards.
    pub shards: BTreeSet<String>,
}

impl Paused {
    /// How the status lists it: `*` for the whole plan, then the shards.
    pub fn listed(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if self.plan {
            out.push(flotilla_core::protocol::ALL_SHARDS.to_string());
        }
        out.extend(self.shards.iter().cloned());
        out
    }

    /// How the store keeps it (`plans.paused`): `listed`, comma-separated (shard names
    /// hold no comma; `*` is no shard's name).
    pub fn stored(&self) -> String {
        self.listed().join(",")
    }

    /// Back from `stored`.
    pub fn from_stored(s: &str) -> Paused {
        let mut paused = Paused::default();
        for name in s.split(',').filter(|n| !n.is_empty()) {
            if name == flotilla_core::protocol::ALL_SHARDS {
                paused.plan = true;
            } else {
                paused.shards.insert(name.to_string());
            }
        }
        paused
    }
}

/// How many steps of `targets` are pending or running (what `ShardRun::to_run` keeps).
fn count_to_run(steps: &[Step], per_target: &[Vec<usize>], targets: &[usize]) -> usize {
    targets
        .iter()
        .flat_map(|&t| &per_target[t])
        .filter(|&&s| steps[s].status.to_run())
        .count()
}

impl PlanRun {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        spec: Arc<PlanSpec>,
        definition: pb::PlanDefinition,
        targets: Vec<Target>,
        planned: Vec<PlannedStep>,
        statuses: Vec<StepStatus>,
        created_at_ms: i64,
        epoch: u64,
    ) -> PlanRun {
        let n = planned.len();
        let mut per_target = vec![Vec::new(); targets.len()];
        let mut dependents = vec![Vec::new(); n];
        let mut steps = Vec::with_capacity(n);
        let mut index = HashMap::with_capacity(n);
        for (i, (p, status)) in planned.into_iter().zip(statuses).enumerate() {
            per_target[p.target].push(i);
            for &d in &p.deps {
                dependents[d].push(i);
            }
            let t = &targets[p.target];
            index.insert(
                (
                    spec.migrations[p.migration].id.to_string(),
                    t.shard.clone(),
                    t.tenant.clone(),
                ),
                i,
            );
            steps.push(Step {
                migration: p.migration,
                target: p.target,
                transactional: spec.migrations[p.migration].tx_mode == TxMode::Transactional,
                deps: p.deps,
                status,
            });
        }
        let unit_of: Vec<Option<usize>> = steps
            .iter()
            .map(|s| spec.atomic_unit(&spec.migrations[s.migration].id))
            .collect();
        let adds_enum_value = spec
            .migrations
            .iter()
            .map(|m| {
                flotilla_core::sql::split_statements(&m.up_sql)
                    .is_ok_and(|up| flotilla_core::sql::adds_enum_value(&up))
            })
            .collect();
        let units: Vec<usize> = unit_of
            .iter()
            .flatten()
            .copied()
            .collect::<BTreeSet<usize>>()
            .into_iter()
            .collect();
        let mut shards: BTreeMap<String, ShardRun> = BTreeMap::new();
        for (ti, t) in targets.iter().enumerate() {
            shards
                .entry(t.shard.clone())
                .or_insert_with(|| ShardRun {
                    targets: Vec::new(),
                    ready: VecDeque::new(),
                    queued: BTreeSet::new(),
                    outstanding: BTreeMap::new(),
                    lanes: 0,
                    to_run: 0,
                    defined_on: None,
                    rollback: RollbackState::NotAsked,
                    prepared: BTreeMap::new(),
                    gids: BTreeMap::new(),
                    resolved: false,
                    left: false,
                    resolve_sent_on: None,
                    resolve_retry_at: None,
                })
                .targets
                .push(ti);
        }
        let mut run = PlanRun {
            id,
            spec,
            definition,
            targets,
            steps,
            per_target,
            dependents,
            remaining: vec![0; n],
            state: PlanState::Running,
            rollback_ends: PlanState::RolledBack,
            by_operator: false,
            message: String::new(),
            shards,
            failures: Vec::new(),
            index,
            created_at_ms,
            epoch,
            rollback_errors: 0,
            rows_kept: BTreeMap::new(),
            retry_note: String::new(),
            undone_before: BTreeSet::new(),
            locked: false,
            lock_wait: None,
            ran_ms: 0,
            observed_at_ms: 0,
            applied_read: AppliedRead::Before,
            first_prepared: None,
            two_phase_clock: timings::TwoPhaseClock::default(),
            decision: None,
            unit_of,
            adds_enum_value,
            units,
            unit_pos: 0,
            paused: Paused::default(),
            cancelled: BTreeSet::new(),
            gone: BTreeSet::new(),
            progress: BTreeMap::new(),
            inherited: false,
            unit_unverified: false,
            decision_absent: false,
            decision_lost: false,
            waves: Vec::new(),
            wave_of: Vec::new(),
            wave_pos: 0,
        };
        // Units that committed before (a rebuild) are behind the plan.
        while !run.spec.atomic && run.current_unit().is_some() && run.unit_committed() {
            run.unit_pos += 1;
        }
        run.recount_remaining();
        for sr in run.shards.values_mut() {
            sr.to_run = count_to_run(&run.steps, &run.per_target, &sr.targets);
        }
        // One wave of every target until `set_waves` says otherwise; it queues what is ready.
        let all = vec![0; run.targets.len()];
        run.set_waves(all, &[]);
        run
    }

    /// Every change of a step's status goes through here: it keeps its shard's count of
    /// steps to run.
    pub(crate) fn set_status(&mut self, s: usize, status: StepStatus) {
        let before = std::mem::replace(&mut self.steps[s].status, status).to_run();
        if before != status.to_run()
            && let Some(sr) = self
                .shards
                .get_mut(&self.targets[self.steps[s].target].shard)
        {
            if before {
                sr.to_run -= 1;
            } else {
                sr.to_run += 1;
            }
        }
    }

    pub fn is_paused(&self, shard: &str) -> bool {
        self.paused.plan || self.paused.shards.contains(shard)
    }

    /// Whether all that is left of the plan is on shards paused one by one (nothing runs or
    /// waits to run on the others): it waits for `plan resume` as a plan paused as a whole
    /// does, and a script's `--wait` comes back (it hung).
    pub fn waits_on_paused_shards(&self) -> bool {
        // (asked at every status a watch is sent: nothing to look at without a paused shard)
        if self.paused.shards.is_empty() {
            return false;
        }
        let left = |sr: &ShardRun| !sr.outstanding.is_empty() || sr.to_run > 0;
        let (paused, others): (Vec<_>, Vec<_>) = self
            .shards
            .iter()
            .partition(|(name, _)| self.paused.shards.contains(name.as_str()));
        paused.iter().any(|(_, sr)| left(sr)) && !others.iter().any(|(_, sr)| left(sr))
    }

    /// The agent of `shard` went away: its data changes' last reports no longer say how
    /// they go (a line read "1500/6667 rows 2494 rows/s ETA 3s" for as long as it was gone).
    /// Their rate and ETA are cleared and the reason says why; the agent's next report,
    /// once it is back, replaces each. Whether any changed.
    pub fn agent_away(&mut self, shard: &str) -> bool {
        let mut changed = false;
        for ((_, s, _), p) in self.progress.iter_mut() {
            if s != shard || matches!(p.state.as_str(), "done" | "failed" | "stopped") {
                continue;
            }
            p.rows_per_second = 0.0;
            p.eta_ms = 0;
            p.reason = "its agent is away: no report since it detached".into();
            changed = true;
        }
        changed
    }

    /// Keeps a data change's last progress, for a step of the plan: what an agent reports of
    /// a migration or target the plan does not have on its shard is dropped (kept, it would
    /// grow the map with whatever the messages name until the plan ends).
    pub fn record_progress(&mut self, mut p: pb::DataProgress) {
        // (an undo's last report can come after the rollback's reply, which dropped it)
        match self.step_of(&p.migration_id, &p.shard, &p.tenant) {
            None => return,
            // a schema step's lock wait is shown only while its step runs, or its undo (one
            // that came after the step's result, or the rollback's reply, would stay until
            // the plan ends)
            Some(s)
                if p.state == LOCK_WAIT
                    && !matches!(self.steps[s].status, StepStatus::Running(_))
                    && !(self.state == PlanState::RollingBack
                        && self.steps[s].status == StepStatus::Applied
                        && self
                            .shards
                            .get(&p.shard)
                            .is_some_and(|sr| sr.rollback != RollbackState::Done)) =>
            {
                return;
            }
            Some(s) if self.steps[s].status == StepStatus::RolledBack => return,
            // (a report of a change still running that comes after its step's result; an
            // undo's reports, of a step applied, are taken)
            Some(s)
                if matches!(
                    self.steps[s].status,
                    StepStatus::Applied | StepStatus::AlreadyApplied
                ) && matches!(p.state.as_str(), "running" | "throttled" | "paused")
                    && self.state != PlanState::RollingBack =>
            {
                return;
            }
            // A run of a step that another run applied first (its journal row there: the
            // copy a new coordinator sent again after the old one was killed mid-change)
            // failed, and said so in its last report; the step is applied, and its line
            // said "failed" on a completed plan for good.
            // (not an undo's: a restore that failed during a rollback, its step applied
            // until the rollback's reply, is a failure)
            Some(s)
                if matches!(
                    self.steps[s].status,
                    StepStatus::Applied | StepStatus::AlreadyApplied
                ) && p.state == "failed"
                    && !matches!(
                        self.state,
                        PlanState::RollingBack | PlanState::RolledBack | PlanState::RollbackFailed
                    ) =>
            {
                applied_elsewhere(&mut p);
            }
            Some(_) => {}
        }
        self.progress.insert(
            (p.migration_id.clone(), p.shard.clone(), p.tenant.clone()),
            p,
        );
    }

    /// The data changes this plan applied on targets (at least one) whose last progress
    /// says no row was changed on any of them, every target's progress known.
    pub(crate) fn data_changes_that_changed_nothing(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (m, migration) in self.spec.migrations.iter().enumerate() {
            if migration.data.is_none() {
                continue;
            }
            let applied: Vec<usize> = (0..self.steps.len())
                .filter(|&s| {
                    self.steps[s].migration == m && self.steps[s].status == StepStatus::Applied
                })
                .collect();
            let none_changed = !applied.is_empty()
                && applied.iter().all(|&s| {
                    let t = &self.targets[self.steps[s].target];
                    self.progress
                        .get(&(migration.id.to_string(), t.shard.clone(), t.tenant.clone()))
                        .is_some_and(|p| p.rows_done == 0 && p.state == "done")
                });
            if none_changed {
                out.push(migration.id.to_string());
            }
        }
        out
    }

    /// A step's result came: a lock wait it showed is over, whatever the result.
    pub(crate) fn end_lock_wait(&mut self, s: usize) {
        let t = &self.targets[self.steps[s].target];
        let key = (
            self.spec.migrations[self.steps[s].migration].id.to_string(),
            t.shard.clone(),
            t.tenant.clone(),
        );
        if self
            .progress
            .get(&key)
            .is_some_and(|p| p.state == LOCK_WAIT)
        {
            self.progress.remove(&key);
        }
    }

    /// A step ended without its data change's last report (lost with the agent's stream,
    /// or the step answered from the journal when it ran again): the progress it showed
    /// running is not left so under a plan that ended (`done 80/100 rows, running`).
    pub(crate) fn end_progress(&mut self, s: usize) {
        let t = &self.targets[self.steps[s].target];
        let key = (
            self.spec.migrations[self.steps[s].migration].id.to_string(),
            t.shard.clone(),
            t.tenant.clone(),
        );
        let applied = matches!(
            self.steps[s].status,
            StepStatus::Applied | StepStatus::AlreadyApplied
        );
        if applied
            && let Some(p) = self.progress.get_mut(&key)
            && p.state == "failed"
        {
            applied_elsewhere(p);
            return;
        }
        if let Some(p) = self.progress.get_mut(&key)
            && matches!(p.state.as_str(), "running" | "throttled" | "paused")
        {
            p.rows_per_second = 0.0;
            p.eta_ms = 0;
            if applied {
                p.state = "done".into();
                p.reason =
                    "its last progress report was lost; the journal says the step applied".into();
            } else {
                p.state = "stopped".into();
                p.reason.clear();
            }
        }
    }

    pub fn step_of(&self, migration: &str, shard: &str, tenant: &str) -> Option<usize> {
        self.index
            .get(&(migration.to_string(), shard.to_string(), tenant.to_string()))
            .copied()
    }

    pub fn update_of(&self, s: usize, error: Option<&pb::StepError>) -> StepUpdate {
        let t = &self.targets[self.steps[s].target];
        StepUpdate {
            migration_id: self.spec.migrations[self.steps[s].migration].id.to_string(),
            shard: t.shard.clone(),
            tenant: t.tenant.clone(),
            state: self.steps[s].status.state(),
            sqlstate: error.map(|e| e.sqlstate.clone()).unwrap_or_default(),
            message: error.map(|e| e.message.clone()).unwrap_or_default(),
            phase: error.map(|e| e.phase.clone()).unwrap_or_default(),
            detail: error.map(|e| e.detail.clone()).unwrap_or_default(),
            duration_ms: 0,
            run_id: None,
        }
    }

    pub fn outstanding(&self) -> usize {
        self.shards.values().map(|s| s.outstanding.len()).sum()
    }

    pub fn policy(&self) -> FailurePolicy {
        self.spec.policy
    }
}

/// The progress of a run that failed because another run of its step applied it first: the
/// step is applied (the journal says so), which is what its line says.
fn applied_elsewhere(p: &mut pb::DataProgress) {
    p.state = "done".into();
    p.reason = "applied by another run of the step (its journal row is there)".into();
    p.rows_per_second = 0.0;
    p.eta_ms = 0;
}
