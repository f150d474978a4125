//! One plan in motion: its steps' desired and observed state, and the choice of
//! which runs to hand each shard next. Pure state, no I/O: the engine loop feeds
//! it results and sends what it returns.
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use flotilla_proto::{FailurePolicy, PlanSpec, Target, TxMode, pb};

use crate::planner::PlannedStep;
use crate::store::StepUpdate;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    Pending,
    Running(u64),
    Applied,
    AlreadyApplied,
    Failed,
    RolledBack,
    NotRun,
    /// In a prepared transaction on its shard, waiting for the plan's decision.
    Prepared,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running(_) => "running",
            StepStatus::Applied => "applied",
            StepStatus::AlreadyApplied => "already_applied",
            StepStatus::Failed => "failed",
            StepStatus::RolledBack => "rolled_back",
            StepStatus::NotRun => "not_run",
            StepStatus::Prepared => "prepared",
        }
    }
    pub fn parse(s: &str) -> StepStatus {
        match s {
            "applied" => StepStatus::Applied,
            "already_applied" => StepStatus::AlreadyApplied,
            "failed" => StepStatus::Failed,
            "rolled_back" => StepStatus::RolledBack,
            "not_run" => StepStatus::NotRun,
            "prepared" => StepStatus::Prepared,
            // "running" after a restart is unknown: the agent's journal decides.
            _ => StepStatus::Pending,
        }
    }
    /// Not settled: prepared, pending or running.
    fn open(self) -> bool {
        matches!(
            self,
            StepStatus::Prepared | StepStatus::Pending | StepStatus::Running(_)
        )
    }
    fn done(self) -> bool {
        matches!(
            self,
            StepStatus::Applied | StepStatus::AlreadyApplied | StepStatus::Prepared
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanState {
    Running,
    /// Stop policy: waiting for in-flight runs before ending failed.
    Stopping,
    /// Atomic plans: every target prepared; the commit decision is (being) written
    /// and agents commit their prepared transactions.
    Committing,
    /// Atomic plans: a step failed; in-flight runs finish, then the abort
    /// decision, ROLLBACK PREPARED everywhere, then the rollback of what committed.
    Aborting,
    /// Undoing applied steps; `final_state` is where it ends.
    RollingBack,
    Completed,
    Failed,
    RolledBack,
    RollbackFailed,
    Cancelled,
}

impl PlanState {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanState::Running => "running",
            PlanState::Stopping => "stopping",
            PlanState::RollingBack => "rolling_back",
            PlanState::Committing => "committing",
            PlanState::Aborting => "aborting",
            PlanState::Completed => "completed",
            PlanState::Failed => "failed",
            PlanState::RolledBack => "rolled_back",
            PlanState::RollbackFailed => "rollback_failed",
            PlanState::Cancelled => "cancelled",
        }
    }
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            PlanState::Completed
                | PlanState::Failed
                | PlanState::RolledBack
                | PlanState::RollbackFailed
                | PlanState::Cancelled
        )
    }
}

#[derive(Debug)]
pub struct Step {
    pub migration: usize,
    pub target: usize,
    pub deps: Vec<usize>,
    pub status: StepStatus,
    pub transactional: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackState {
    NotAsked,
    Asked(u64),
    Done,
}

#[derive(Debug)]
pub struct ShardRun {
    pub targets: Vec<usize>,
    ready: VecDeque<usize>,
    queued: BTreeSet<usize>,
    pub outstanding: BTreeMap<u64, Vec<usize>>,
    pub lanes: u32,
    /// The connection the plan's definition was sent on.
    pub defined_on: Option<u64>,
    pub rollback: RollbackState,
    /// Prepared transactions of this plan on the shard, by gid, with their steps.
    pub prepared: BTreeMap<String, Vec<usize>>,
    /// Gids handed out with runs still out (a PREPARED answer moves them above).
    pub gids: BTreeMap<u64, String>,
    /// Whether the shard has confirmed the decision for every prepared gid.
    pub resolved: bool,
    /// The connection the Resolve was sent on.
    pub resolve_sent_on: Option<u64>,
    /// After a Resolve the shard could not carry out (e.g. it could not read the
    /// decision from etcd), when to send it again.
    pub resolve_retry_at: Option<std::time::Instant>,
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
    /// Where a rollback ends: rolled_back, or cancelled when an operator asked.
    pub rollback_ends: PlanState,
    pub message: String,
    pub shards: BTreeMap<String, ShardRun>,
    pub failures: Vec<pb::StepFailure>,
    index: HashMap<(String, String, String), usize>,
    pub created_at_ms: i64,
    pub epoch: u64,
    rollback_errors: usize,
    /// Whether the plan holds its shard locks; nothing is sent to agents before.
    pub locked: bool,
    /// Why it waits for its locks (which plan holds which shard), if it does.
    pub lock_wait: Option<String>,
    /// Atomic plans: when the first target prepared (start of the window in
    /// which every shard holds locks).
    pub first_prepared: Option<std::time::Instant>,
    /// Atomic plans: the decision, once written (true = commit).
    pub decision: Option<bool>,
    /// Each step's atomic unit (0 for every step of an atomic plan, the parallel
    /// group's index in an atomic group), if it has one.
    unit_of: Vec<Option<usize>>,
    /// The plan's atomic units in the order they commit.
    units: Vec<usize>,
    /// Index into `units` of the unit now running, preparing or deciding
    /// (`units.len()` once every unit committed).
    unit_pos: usize,
    /// Paused shards ([`ALL_SHARDS`]: the whole plan): no run is handed out there.
    pub paused: BTreeSet<String>,
    /// Shards an operator cancelled (policies stop and continue): their steps not done by
    /// then are not run, the other shards go on, and the plan ends cancelled.
    pub cancelled: BTreeSet<String>,
    /// Rebuilt by a new leader: the one before may have started units that the store
    /// does not show (its last writes can be lost with it).
    pub inherited: bool,
    /// A unit entered on an inherited plan, not yet checked against etcd and the agents'
    /// in-doubt transactions: nothing of it is handed out until it is.
    pub unit_unverified: bool,
    /// Data changes' latest progress, by (migration, shard, tenant).
    pub progress: BTreeMap<(String, String, String), pb::DataProgress>,
}

/// In `PlanRun::paused`: every shard of the plan.
pub const ALL_SHARDS: &str = "*";

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
                    defined_on: None,
                    rollback: RollbackState::NotAsked,
                    prepared: BTreeMap::new(),
                    gids: BTreeMap::new(),
                    resolved: false,
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
            message: String::new(),
            shards,
            failures: Vec::new(),
            index,
            created_at_ms,
            epoch,
            rollback_errors: 0,
            locked: false,
            lock_wait: None,
            first_prepared: None,
            decision: None,
            unit_of,
            units,
            unit_pos: 0,
            paused: BTreeSet::new(),
            cancelled: BTreeSet::new(),
            progress: BTreeMap::new(),
            inherited: false,
            unit_unverified: false,
        };
        // Units that committed before (a rebuild) are behind the plan.
        while !run.spec.atomic && run.current_unit().is_some() && run.unit_committed() {
            run.unit_pos += 1;
        }
        run.recount_remaining();
        for t in 0..run.targets.len() {
            run.enqueue_if_ready(t);
        }
        run
    }

    pub fn is_paused(&self, shard: &str) -> bool {
        self.paused.contains(ALL_SHARDS) || self.paused.contains(shard)
    }

    pub fn record_progress(&mut self, p: pb::DataProgress) {
        self.progress.insert(
            (p.migration_id.clone(), p.shard.clone(), p.tenant.clone()),
            p,
        );
    }

    /// The atomic unit now in progress, if any is left.
    pub fn current_unit(&self) -> Option<usize> {
        self.units.get(self.unit_pos).copied()
    }

    /// The decision key of the current unit: the plan id for an atomic plan,
    /// `<plan>.g<N>` for its atomic parallel group N (plan ids hold no dot).
    pub fn unit_key(&self) -> String {
        match self.current_unit() {
            Some(g) if !self.spec.atomic => format!("{}.g{}", self.id, g + 1),
            _ => self.id.clone(),
        }
    }

    /// Whether step `s` belongs to the unit in progress.
    pub fn in_unit(&self, s: usize) -> bool {
        self.unit_of[s].is_some() && self.unit_of[s] == self.current_unit()
    }

    /// The steps of the unit in progress (none when no unit is left).
    fn unit_steps(&self) -> impl Iterator<Item = usize> + '_ {
        let any = self.current_unit().is_some();
        (0..self.steps.len()).filter(move |&s| any && self.in_unit(s))
    }

    /// A step of a later atomic unit: it waits until the units before it committed.
    fn waits_for_unit(&self, s: usize) -> bool {
        self.unit_of[s].is_some() && !self.in_unit(s)
    }

    /// Every step of the current unit committed (or was there already).
    fn unit_committed(&self) -> bool {
        self.unit_steps().all(|s| {
            matches!(
                self.steps[s].status,
                StepStatus::Applied | StepStatus::AlreadyApplied
            )
        })
    }

    /// Whether a step of the current unit could have been handed out: one is past
    /// pending, or one waits for nothing.
    pub fn unit_reachable(&self) -> bool {
        self.unit_steps()
            .any(|s| self.steps[s].status != StepStatus::Pending || self.remaining[s] == 0)
    }

    /// Whether the finished dependency `d` lets `s` go: a prepared step lets
    /// only steps of its own unit go (they ride in the same prepared transaction);
    /// others wait for the commit.
    fn releases(&self, d: usize, s: usize) -> bool {
        match self.steps[d].status {
            StepStatus::Applied | StepStatus::AlreadyApplied => true,
            StepStatus::Prepared => self.unit_of[d].is_some() && self.unit_of[d] == self.unit_of[s],
            _ => false,
        }
    }

    fn recount_remaining(&mut self) {
        self.remaining = (0..self.steps.len())
            .map(|s| {
                self.steps[s]
                    .deps
                    .iter()
                    .filter(|&&d| !self.releases(d, s))
                    .count()
            })
            .collect();
    }

    /// Group-atomic plans: moves past a unit that committed (its decision resolved on
    /// every shard, or nothing of it needed one) and lets the next steps go. Returns
    /// the message to record when a unit was left behind.
    pub fn advance_unit(&mut self) -> Option<String> {
        if self.spec.atomic || self.current_unit().is_none() {
            return None;
        }
        let decided = self.state == PlanState::Committing && self.all_resolved();
        let clean = self.state == PlanState::Running && self.unit_committed();
        if !decided && !clean {
            return None;
        }
        let g = self.current_unit().expect("unit");
        let message = if decided {
            format!(
                "parallel group {} committed atomically on {} shards ({})",
                g + 1,
                self.shards_of_unit(),
                self.window_report()
            )
        } else {
            format!(
                "parallel group {}: nothing to prepare (already applied)",
                g + 1
            )
        };
        self.unit_pos += 1;
        self.unit_unverified = self.inherited && self.current_unit().is_some();
        self.state = PlanState::Running;
        self.decision = None;
        self.first_prepared = None;
        for sr in self.shards.values_mut() {
            sr.prepared.clear();
            sr.resolved = false;
            sr.resolve_sent_on = None;
            sr.resolve_retry_at = None;
        }
        self.recount_remaining();
        for t in 0..self.targets.len() {
            self.enqueue_if_ready(t);
        }
        self.message = message.clone();
        Some(message)
    }

    /// The window in which every shard held the unit's locks (first PREPARE to last
    /// COMMIT PREPARED), recorded as a metric; unknown when the coordinator changed
    /// during it (the new one never saw the first PREPARE).
    fn window_report(&self) -> String {
        match self.first_prepared {
            Some(t) => {
                let window = t.elapsed();
                crate::metrics::two_phase_window(window);
                format!(
                    "first PREPARE to last COMMIT PREPARED: {:.3}s",
                    window.as_secs_f64()
                )
            }
            None => "the prepare window is not known: the coordinator changed during it".into(),
        }
    }

    fn shards_of_unit(&self) -> usize {
        self.unit_steps()
            .map(|s| self.targets[self.steps[s].target].shard.as_str())
            .collect::<BTreeSet<_>>()
            .len()
    }

    pub fn step_of(&self, migration: &str, shard: &str, tenant: &str) -> Option<usize> {
        self.index
            .get(&(migration.to_string(), shard.to_string(), tenant.to_string()))
            .copied()
    }

    fn enqueue_if_ready(&mut self, t: usize) {
        let ready = self.per_target[t].iter().any(|&s| {
            self.steps[s].status == StepStatus::Pending
                && self.remaining[s] == 0
                && !self.waits_for_unit(s)
        });
        let shard = &self.targets[t].shard;
        if let Some(sr) = self.shards.get_mut(shard)
            && ready
            && sr.queued.insert(t)
        {
            sr.ready.push_back(t);
        }
    }

    /// Shards that still have steps to finish, each with the lanes it may use:
    /// `max_parallel` split over them, at least one each while there is room.
    pub fn rebalance_lanes(&mut self, agent_lanes: &dyn Fn(&str) -> u32) {
        let busy: Vec<String> = self
            .shards
            .iter()
            .filter(|(_, sr)| {
                sr.targets.iter().any(|&t| {
                    self.per_target[t].iter().any(|&s| {
                        matches!(
                            self.steps[s].status,
                            StepStatus::Pending | StepStatus::Running(_)
                        )
                    })
                })
            })
            .map(|(k, _)| k.clone())
            .collect();
        let max = self.spec.max_parallel.max(1) as usize;
        for sr in self.shards.values_mut() {
            sr.lanes = 0;
        }
        let k = busy.len();
        for (i, shard) in busy.iter().enumerate() {
            let share = if max >= k {
                max / k + usize::from(i < max % k)
            } else {
                usize::from(i < max)
            };
            let cap = agent_lanes(shard).max(1) as usize;
            if let Some(sr) = self.shards.get_mut(shard) {
                sr.lanes = share.min(cap) as u32;
            }
        }
    }

    /// Forms the next runs for a shard, up to its prefetch window.
    pub fn next_runs(&mut self, shard: &str, next_run_id: &mut u64) -> Vec<pb::Run> {
        if self.state != PlanState::Running || self.is_paused(shard) || self.unit_unverified {
            return Vec::new();
        }
        let Some(sr) = self.shards.get(shard) else {
            return Vec::new();
        };
        if sr.lanes == 0 {
            return Vec::new();
        }
        let window = (sr.lanes as usize * 8).max(32);
        let mut out = Vec::new();
        loop {
            let sr = self.shards.get_mut(shard).expect("shard exists");
            if sr.outstanding.len() >= window {
                break;
            }
            let Some(t) = sr.ready.pop_front() else { break };
            sr.queued.remove(&t);
            for steps in self.form_runs(t) {
                let run_id = *next_run_id;
                *next_run_id += 1;
                let fused = steps.len() > 1;
                for &s in &steps {
                    self.steps[s].status = StepStatus::Running(run_id);
                }
                let prepare_gid = if steps
                    .iter()
                    .all(|&s| self.in_unit(s) && self.steps[s].transactional)
                {
                    gid(&self.unit_key(), run_id, self.epoch, &self.targets[t])
                } else {
                    String::new()
                };
                if !prepare_gid.is_empty() {
                    self.shards
                        .get_mut(shard)
                        .expect("shard")
                        .gids
                        .insert(run_id, prepare_gid.clone());
                }
                out.push(pb::Run {
                    prepare_gid,
                    run_id,
                    tenant: self.targets[t].tenant.clone(),
                    migrations: steps
                        .iter()
                        .map(|&s| self.spec.migrations[self.steps[s].migration].id.to_string())
                        .collect(),
                    fused,
                });
                self.shards
                    .get_mut(shard)
                    .expect("shard exists")
                    .outstanding
                    .insert(run_id, steps);
            }
        }
        out
    }

    /// The runs a target can start now: its ready transactional steps fused into
    /// one shard transaction (dependency order), others one run each.
    fn form_runs(&self, t: usize) -> Vec<Vec<usize>> {
        let mut fused: Vec<usize> = Vec::new();
        let mut singles: Vec<Vec<usize>> = Vec::new();
        for &s in &self.per_target[t] {
            let step = &self.steps[s];
            if step.status != StepStatus::Pending {
                continue;
            }
            // A step of a later atomic unit waits for the units before it to commit.
            if self.waits_for_unit(s) {
                continue;
            }
            let deps_ok = step
                .deps
                .iter()
                .all(|&d| self.releases(d, s) || fused.contains(&d));
            if !deps_ok {
                continue;
            }
            if self.spec.fuse && step.transactional {
                fused.push(s);
            } else if self.remaining[s] == 0 {
                singles.push(vec![s]);
            }
        }
        if !fused.is_empty() {
            singles.insert(0, fused);
        }
        singles
    }

    /// Applies one run's results; returns store updates and whether a step failed.
    pub fn apply_run_result(
        &mut self,
        shard: &str,
        result: &pb::RunResult,
    ) -> (Vec<StepUpdate>, bool) {
        let Some(steps) = self
            .shards
            .get_mut(shard)
            .and_then(|sr| sr.outstanding.remove(&result.run_id))
        else {
            // A run resent after a reconnect may come back twice; the first answer counts.
            return (Vec::new(), false);
        };
        let gid = self
            .shards
            .get_mut(shard)
            .and_then(|sr| sr.gids.remove(&result.run_id));
        let mut updates = Vec::new();
        let mut failed = false;
        let mut prepared = Vec::new();
        for s in steps {
            let spec = self.spec.clone();
            let mig = &spec.migrations[self.steps[s].migration];
            let r = result
                .steps
                .iter()
                .find(|r| r.migration_id == mig.id.as_str());
            let outcome = r
                .map(|r| pb::StepOutcome::try_from(r.outcome).unwrap_or_default())
                .unwrap_or(pb::StepOutcome::NotRun);
            let mut error = r.and_then(|r| r.error.clone());
            let status = match outcome {
                pb::StepOutcome::Applied => StepStatus::Applied,
                pb::StepOutcome::AlreadyApplied => {
                    let journal = r.map(|r| r.checksum.as_str()).unwrap_or("");
                    if !journal.is_empty() && journal != mig.checksum {
                        error = Some(pb::StepError {
                            sqlstate: String::new(),
                            message: format!(
                                "checksum mismatch: the shard's journal holds {journal} for {}, the plan has {}",
                                mig.id, mig.checksum
                            ),
                            detail: String::new(),
                            phase: "journal".into(),
                        });
                        StepStatus::Failed
                    } else {
                        StepStatus::AlreadyApplied
                    }
                }
                pb::StepOutcome::Failed => StepStatus::Failed,
                pb::StepOutcome::Prepared => StepStatus::Prepared,
                pb::StepOutcome::NotRun | pb::StepOutcome::Unspecified => {
                    let target = &self.targets[self.steps[s].target];
                    if self.state == PlanState::Running
                        && !self.failed_target(self.steps[s].target)
                        && !self.cancelled.contains(&target.shard)
                    {
                        StepStatus::Pending
                    } else {
                        StepStatus::NotRun
                    }
                }
            };
            self.steps[s].status = status;
            let target = self.targets[self.steps[s].target].clone();
            if status == StepStatus::Failed {
                failed = true;
                self.failures.push(pb::StepFailure {
                    migration_id: mig.id.to_string(),
                    target: Some(pb::TargetRef {
                        shard: target.shard.clone(),
                        tenant: target.tenant.clone(),
                    }),
                    error: error.clone(),
                });
            }
            if status.done() {
                for i in 0..self.dependents[s].len() {
                    let d = self.dependents[s][i];
                    if !self.releases(s, d) {
                        continue;
                    }
                    self.remaining[d] -= 1;
                    if self.remaining[d] == 0 {
                        let dt = self.steps[d].target;
                        self.enqueue_if_ready(dt);
                    }
                }
            }
            if status == StepStatus::Pending {
                self.enqueue_if_ready(self.steps[s].target);
            }
            let e = error.unwrap_or_default();
            updates.push(StepUpdate {
                migration_id: mig.id.to_string(),
                shard: target.shard,
                tenant: target.tenant,
                state: status.as_str().into(),
                sqlstate: e.sqlstate,
                message: e.message,
                phase: e.phase,
                detail: e.detail,
                duration_ms: r.map(|r| r.duration_ms as i64).unwrap_or(0),
                run_id: Some(result.run_id as i64),
            });
            if status == StepStatus::Prepared {
                prepared.push(s);
            }
        }
        if let (Some(gid), false) = (gid, prepared.is_empty()) {
            self.first_prepared
                .get_or_insert_with(std::time::Instant::now);
            if let Some(sr) = self.shards.get_mut(shard) {
                sr.prepared.insert(gid, prepared);
            }
        }
        (updates, failed)
    }

    fn failed_target(&self, t: usize) -> bool {
        self.per_target[t]
            .iter()
            .any(|&s| self.steps[s].status == StepStatus::Failed)
    }

    /// Stops scheduling: every step not started yet will not run.
    /// Cancels one shard of the plan: its pending steps will not run (those in flight end at
    /// their next batch boundary or when done).
    pub fn halt_shard(&mut self, shard: &str) -> Vec<StepUpdate> {
        self.cancelled.insert(shard.to_string());
        let mut updates = Vec::new();
        for s in 0..self.steps.len() {
            if self.steps[s].status == StepStatus::Pending
                && self.targets[self.steps[s].target].shard == shard
            {
                self.steps[s].status = StepStatus::NotRun;
                updates.push(self.update_of(s, None));
            }
        }
        if let Some(sr) = self.shards.get_mut(shard) {
            sr.ready.clear();
            sr.queued.clear();
        }
        updates
    }

    pub fn halt_pending(&mut self) -> Vec<StepUpdate> {
        let mut updates = Vec::new();
        for s in 0..self.steps.len() {
            if self.steps[s].status == StepStatus::Pending {
                self.steps[s].status = StepStatus::NotRun;
                updates.push(self.update_of(s, None));
            }
        }
        for sr in self.shards.values_mut() {
            sr.ready.clear();
            sr.queued.clear();
        }
        updates
    }

    pub fn update_of(&self, s: usize, error: Option<&pb::StepError>) -> StepUpdate {
        let t = &self.targets[self.steps[s].target];
        StepUpdate {
            migration_id: self.spec.migrations[self.steps[s].migration].id.to_string(),
            shard: t.shard.clone(),
            tenant: t.tenant.clone(),
            state: self.steps[s].status.as_str().into(),
            sqlstate: error.map(|e| e.sqlstate.clone()).unwrap_or_default(),
            message: error.map(|e| e.message.clone()).unwrap_or_default(),
            phase: error.map(|e| e.phase.clone()).unwrap_or_default(),
            detail: error.map(|e| e.detail.clone()).unwrap_or_default(),
            duration_ms: 0,
            run_id: None,
        }
    }

    /// Records a shard's rollback reply; returns store updates.
    pub fn apply_rollback_reply(
        &mut self,
        shard: &str,
        reply: &pb::RollbackReply,
    ) -> Vec<StepUpdate> {
        let mut updates = Vec::new();
        for rb in &reply.steps {
            let s = self.step_of(&rb.migration_id, shard, &rb.tenant);
            match (&rb.error, s) {
                (Some(e), _) => {
                    self.rollback_errors += 1;
                    self.failures.push(pb::StepFailure {
                        migration_id: rb.migration_id.clone(),
                        target: Some(pb::TargetRef {
                            shard: shard.into(),
                            tenant: rb.tenant.clone(),
                        }),
                        error: Some(pb::StepError {
                            phase: "down".into(),
                            ..e.clone()
                        }),
                    });
                    if let Some(s) = s {
                        updates.push(self.update_of(s, Some(e)));
                    }
                }
                (None, Some(s)) => {
                    self.steps[s].status = StepStatus::RolledBack;
                    updates.push(self.update_of(s, None));
                }
                (None, None) => {}
            }
        }
        if let Some(sr) = self.shards.get_mut(shard) {
            if reply.complete {
                sr.rollback = RollbackState::Done;
                // The agent finished every run of the plan before undoing it.
                let lost: Vec<usize> = std::mem::take(&mut sr.outstanding)
                    .into_values()
                    .flatten()
                    .collect();
                for s in lost {
                    if matches!(self.steps[s].status, StepStatus::Running(_)) {
                        self.steps[s].status = StepStatus::NotRun;
                        updates.push(self.update_of(s, None));
                    }
                }
            } else {
                // Something could not be undone: the operator has to look.
                sr.rollback = RollbackState::Done;
                self.rollback_errors = self.rollback_errors.max(1);
            }
        }
        updates
    }

    /// A shard whose agent is gone past the grace: its runs in flight fail, so
    /// the plan's policy decides (the journal still tells, when it returns,
    /// what those runs really did).
    pub fn fail_lost_shard(&mut self, shard: &str, reason: &str) -> (Vec<StepUpdate>, bool) {
        let Some(sr) = self.shards.get_mut(shard) else {
            return (Vec::new(), false);
        };
        let lost: Vec<usize> = std::mem::take(&mut sr.outstanding)
            .into_values()
            .flatten()
            .collect();
        let mut updates = Vec::new();
        let error = pb::StepError {
            sqlstate: String::new(),
            message: reason.to_string(),
            detail: String::new(),
            phase: "agent".into(),
        };
        for s in &lost {
            self.steps[*s].status = StepStatus::Failed;
            let t = &self.targets[self.steps[*s].target];
            self.failures.push(pb::StepFailure {
                migration_id: self.spec.migrations[self.steps[*s].migration]
                    .id
                    .to_string(),
                target: Some(pb::TargetRef {
                    shard: t.shard.clone(),
                    tenant: t.tenant.clone(),
                }),
                error: Some(error.clone()),
            });
            updates.push(self.update_of(*s, Some(&error)));
        }
        (updates, !lost.is_empty())
    }

    /// Atomic plans: every step prepared or applied, nothing out, nothing failed.
    pub fn ready_to_commit(&self) -> bool {
        // "any prepared" also says the unit is not empty
        self.state == PlanState::Running
            && self.unit_steps().all(|s| self.steps[s].status.done())
            && self
                .unit_steps()
                .any(|s| self.steps[s].status == StepStatus::Prepared)
    }

    /// The Resolve message for a shard's prepared transactions, if it has any left.
    pub fn resolve_for(&self, shard: &str, commit: bool) -> Option<pb::Resolve> {
        let sr = self.shards.get(shard)?;
        (!sr.prepared.is_empty() && !sr.resolved).then(|| pb::Resolve {
            plan_id: self.id.clone(),
            commit,
            epoch: self.epoch,
            gids: sr.prepared.keys().cloned().collect(),
        })
    }

    /// Records a shard's answer to a Resolve: its prepared steps are applied
    /// (commit) or not run (abort).
    pub fn apply_resolve_reply(
        &mut self,
        shard: &str,
        reply: &pb::ResolveReply,
    ) -> Vec<StepUpdate> {
        let mut updates = Vec::new();
        let Some(sr) = self.shards.get_mut(shard) else {
            return updates;
        };
        let mut done_steps = Vec::new();
        for gid in &reply.resolved {
            if let Some(steps) = sr.prepared.remove(gid) {
                done_steps.extend(steps);
            }
        }
        let all_done = sr.prepared.is_empty();
        if !all_done && !reply.failed.is_empty() {
            // Not final (the shard's etcd member down, say): asked again a little later,
            // on the engine's tick.
            sr.resolve_sent_on = None;
            sr.resolve_retry_at = Some(std::time::Instant::now() + RESOLVE_RETRY);
        }
        if all_done {
            sr.resolved = true;
            // After a takeover the gid -> steps mapping is gone: the shard's
            // answer covers every prepared step on it, and every step whose PREPARED
            // never reached the store (rebuilt pending: a decision is only written
            // once every step is prepared or applied).
            for s in 0..self.steps.len() {
                if self.steps[s].status.open()
                    && self.in_unit(s)
                    && self.targets[self.steps[s].target].shard == shard
                    && !done_steps.contains(&s)
                {
                    done_steps.push(s);
                }
            }
        }
        let status = if reply.commit {
            StepStatus::Applied
        } else {
            StepStatus::NotRun
        };
        for s in done_steps {
            self.steps[s].status = status;
            updates.push(self.update_of(s, None));
        }
        if all_done {
            // What failed on earlier attempts is resolved now.
            self.failures.retain(|f| {
                !(f.migration_id.is_empty()
                    && f.target.as_ref().is_some_and(|t| t.shard == shard)
                    && f.error
                        .as_ref()
                        .is_some_and(|e| e.message.starts_with(RESOLVE_FAILED)))
            });
        }
        for f in &reply.failed {
            let message = format!("{RESOLVE_FAILED}{f}");
            let known = self.failures.iter().any(|x| {
                x.target.as_ref().is_some_and(|t| t.shard == shard)
                    && x.error.as_ref().is_some_and(|e| e.message == message)
            });
            if known {
                continue;
            }
            self.failures.push(pb::StepFailure {
                migration_id: String::new(),
                target: Some(pb::TargetRef {
                    shard: shard.to_string(),
                    tenant: String::new(),
                }),
                error: Some(pb::StepError {
                    sqlstate: String::new(),
                    message,
                    detail: String::new(),
                    phase: if reply.commit {
                        "commit".into()
                    } else {
                        "abort".into()
                    },
                }),
            });
        }
        updates
    }

    /// Whether every shard confirmed the decision for its prepared transactions. A
    /// shard with steps still open (prepared, or pending after a rebuild whose store
    /// missed their PREPARED) has to be heard from first.
    pub fn all_resolved(&self) -> bool {
        self.shards
            .iter()
            .all(|(name, s)| s.resolved || (s.prepared.is_empty() && !self.shard_has_open(name)))
    }

    /// A shard with no prepared transaction of the plan left: under a commit
    /// decision its unfinished steps committed, under abort they did not.
    pub fn settle_shard_without_prepared(&mut self, shard: &str, commit: bool) -> Vec<StepUpdate> {
        let mut updates = Vec::new();
        if let Some(sr) = self.shards.get_mut(shard) {
            sr.resolved = true;
        }
        for s in 0..self.steps.len() {
            if self.steps[s].status.open()
                && self.in_unit(s)
                && self.targets[self.steps[s].target].shard == shard
            {
                self.steps[s].status = if commit {
                    StepStatus::Applied
                } else {
                    StepStatus::NotRun
                };
                updates.push(self.update_of(s, None));
            }
        }
        updates
    }

    /// Whether a step on `shard` is not settled yet (prepared, pending or running).
    pub fn shard_has_open(&self, shard: &str) -> bool {
        (0..self.steps.len()).any(|s| {
            self.steps[s].status.open()
                && self.in_unit(s)
                && self.targets[self.steps[s].target].shard == shard
        })
    }

    pub fn outstanding(&self) -> usize {
        self.shards.values().map(|s| s.outstanding.len()).sum()
    }

    /// Whether the plan reached its end; sets the final state when it did.
    pub fn settle(&mut self) -> Option<Vec<StepUpdate>> {
        match self.state {
            PlanState::Running => {
                if self.outstanding() > 0 || self.shards.values().any(|s| !s.ready.is_empty()) {
                    return None;
                }
                // Prepared steps wait for the decision (the engine writes it).
                if self.steps.iter().any(|s| s.status == StepStatus::Prepared) {
                    return None;
                }
                let mut updates = Vec::new();
                let any_failed = self.steps.iter().any(|s| s.status == StepStatus::Failed);
                // Steps waiting on a failed one (continue policy) will never run.
                for s in 0..self.steps.len() {
                    if self.steps[s].status == StepStatus::Pending {
                        self.steps[s].status = StepStatus::NotRun;
                        updates.push(self.update_of(s, None));
                    }
                }
                self.state = if any_failed {
                    PlanState::Failed
                } else if !self.cancelled.is_empty() {
                    PlanState::Cancelled
                } else {
                    PlanState::Completed
                };
                if self.message.is_empty() {
                    self.message = if any_failed {
                        format!("{} step(s) failed", self.failures.len())
                    } else {
                        "every step applied".into()
                    };
                }
                Some(updates)
            }
            // A group-atomic plan goes on after its unit commits (`advance_unit`).
            PlanState::Committing if !self.spec.atomic => None,
            PlanState::Committing => self.all_resolved().then(|| {
                self.state = PlanState::Completed;
                self.message = format!(
                    "every step applied, committed atomically on {} shards ({})",
                    self.shards.len(),
                    self.window_report()
                );
                Vec::new()
            }),
            PlanState::Stopping => (self.outstanding() == 0).then(|| {
                // an operator's cancel ends cancelled, a failure under `stop` failed
                self.state = if self.rollback_ends == PlanState::Cancelled {
                    PlanState::Cancelled
                } else {
                    PlanState::Failed
                };
                Vec::new()
            }),
            PlanState::RollingBack => {
                if self
                    .shards
                    .values()
                    .all(|s| s.rollback == RollbackState::Done)
                {
                    self.state = if self.rollback_errors > 0 {
                        PlanState::RollbackFailed
                    } else {
                        self.rollback_ends
                    };
                    if self.rollback_errors > 0 {
                        self.message = format!(
                            "{}; rollback could not undo every step: see failures",
                            self.message
                        );
                    }
                    Some(Vec::new())
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    pub fn policy(&self) -> FailurePolicy {
        self.spec.policy
    }
}

/// How long after a failed Resolve a shard is asked again.
const RESOLVE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// How a failure to resolve a prepared transaction starts.
const RESOLVE_FAILED: &str = "resolving a prepared transaction: ";

/// The gid of a run's prepared transaction: Flotilla's prefix, the plan, the run
/// (its steps), the epoch and the target, under PostgreSQL's 200-byte limit.
pub fn gid(plan: &str, run_id: u64, epoch: u64, target: &Target) -> String {
    let mut g = format!("flotilla:{plan}:{run_id}:{epoch}:{target}");
    if g.len() > 199 {
        let mut cut = 199;
        while !g.is_char_boundary(cut) {
            cut -= 1;
        }
        g.truncate(cut);
    }
    g
}

/// The plan a Flotilla gid belongs to.
pub fn plan_of_gid(gid: &str) -> Option<&str> {
    let mut parts = gid.split(':');
    (parts.next() == Some("flotilla"))
        .then(|| parts.next())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::dag::MigrationGraph;
    use flotilla_proto::{Scope, pb};

    /// Two shards, one target each; `a` then `b` (group order), each group atomic.
    fn grouped_run() -> PlanRun {
        let migration = |id: &str| pb::Migration {
            id: id.into(),
            up_sql: format!("CREATE TABLE {id} (x int)"),
            down_sql: format!("DROP TABLE {id}"),
            ..Default::default()
        };
        let raw = pb::PlanSpec {
            name: "grouped".into(),
            migrations: vec![migration("a"), migration("b")],
            parallel_groups: vec![
                pb::ParallelGroup {
                    migrations: vec!["a".into()],
                    atomic: true,
                },
                pb::ParallelGroup {
                    migrations: vec!["b".into()],
                    atomic: true,
                },
            ],
            default_scope: pb::Scope::Shard as i32,
            ..Default::default()
        };
        let spec = PlanSpec::try_from(raw).expect("valid plan");
        let graph = MigrationGraph::build(&spec).expect("graph");
        let targets: Vec<Target> = ["s0", "s1"]
            .iter()
            .map(|s| Target {
                shard: s.to_string(),
                tenant: String::new(),
            })
            .collect();
        let planned =
            crate::planner::plan_steps(&spec, &graph, &targets, Scope::Shard, |_, _| true);
        let n = planned.len();
        let mut run = PlanRun::new(
            "p0".into(),
            Arc::new(spec),
            pb::PlanDefinition::default(),
            targets,
            planned,
            vec![StepStatus::Pending; n],
            0,
            7,
        );
        run.rebalance_lanes(&|_| 4);
        run
    }

    fn answer(run: &mut PlanRun, shard: &str, r: &pb::Run, outcome: pb::StepOutcome) {
        let result = pb::RunResult {
            run_id: r.run_id,
            steps: r
                .migrations
                .iter()
                .map(|m| pb::StepResult {
                    migration_id: m.clone(),
                    outcome: outcome as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        run.apply_run_result(shard, &result);
    }

    #[test]
    fn a_later_atomic_group_waits_for_the_commit_of_the_one_before() {
        let mut run = grouped_run();
        let mut next = 1u64;
        let mut runs = BTreeMap::new();
        for shard in ["s0", "s1"] {
            let out = run.next_runs(shard, &mut next);
            assert_eq!(out.len(), 1, "{shard}: one run of group 1");
            assert_eq!(out[0].migrations, ["a"]);
            assert!(out[0].prepare_gid.starts_with("flotilla:p0.g1:"), "{out:?}");
            runs.insert(shard, out[0].clone());
        }
        answer(&mut run, "s0", &runs["s0"], pb::StepOutcome::Prepared);
        // Prepared is not committed: group 2 may not start on s0.
        assert!(run.next_runs("s0", &mut next).is_empty());
        assert!(!run.ready_to_commit(), "s1 has not voted");
        answer(&mut run, "s1", &runs["s1"], pb::StepOutcome::Prepared);
        assert!(run.ready_to_commit());
        let st = super::super::status::from_run(&run, Vec::new());
        assert_eq!(st.migrations[0].prepared, 2, "{st:?}");
        assert_eq!(st.migrations[1].pending, 2, "{st:?}");
        assert_eq!(run.unit_key(), "p0.g1");

        // The commit decision, confirmed by both shards: group 2 goes, under its own key.
        run.decision = Some(true);
        run.state = PlanState::Committing;
        for shard in ["s0", "s1"] {
            let gids: Vec<String> = run.shards[shard].prepared.keys().cloned().collect();
            run.apply_resolve_reply(
                shard,
                &pb::ResolveReply {
                    plan_id: "p0".into(),
                    commit: true,
                    resolved: gids,
                    failed: Vec::new(),
                },
            );
        }
        assert!(run.advance_unit().is_some());
        assert_eq!(run.state, PlanState::Running);
        assert_eq!(run.unit_key(), "p0.g2");
        let out = run.next_runs("s0", &mut next);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].migrations, ["b"]);
        assert!(out[0].prepare_gid.starts_with("flotilla:p0.g2:"), "{out:?}");
    }
}
