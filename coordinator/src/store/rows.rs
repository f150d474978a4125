//! Typed rows of the control store and the writes the engine asks for.
use std::collections::BTreeMap;

use flotilla_core::pb;
use flotilla_core::state::{PlanState, StepState, WaveState};

#[derive(Debug, Clone)]
pub struct PlanRow {
    pub id: String,
    pub name: String,
    pub environment: String,
    pub state: PlanState,
    /// Where a stopping plan ends (failed, cancelled, halted).
    pub ends: PlanState,
    pub policy: String,
    pub spec_hex: String,
    pub epoch: i64,
    pub message: String,
    pub submitted_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub targets: i64,
    pub steps: i64,
    /// Where an operator paused the plan (`Paused::stored`; empty: nowhere).
    pub paused: String,
}

#[derive(Debug, Clone)]
pub struct StepRow {
    pub migration_id: String,
    pub shard: String,
    pub tenant: String,
    pub state: StepState,
    pub sqlstate: String,
    pub message: String,
    pub phase: String,
    pub detail: String,
    /// The wave the step's target is in (0 for a plan without waves).
    pub wave: i64,
}

impl StepRow {
    /// The step's failure as a status lists it (a stored plan's, or one a new leader took
    /// over).
    pub fn failure(&self) -> pb::StepFailure {
        pb::StepFailure {
            migration_id: self.migration_id.clone(),
            target: Some(pb::TargetRef {
                shard: self.shard.clone(),
                tenant: self.tenant.clone(),
            }),
            error: Some(pb::StepError {
                sqlstate: self.sqlstate.clone(),
                message: self.message.clone(),
                detail: self.detail.clone(),
                phase: self.phase.clone(),
            }),
        }
    }
}

/// What a plan's status needs of its step rows, counted by the store: a finished plan of
/// 10,000 tenants has 30,000 rows, and reading each one for a status took about half a
/// second and 50 MB of the coordinator's memory.
#[derive(Debug, Clone, Default)]
pub struct StepSummary {
    /// Steps per migration and state.
    pub counts: Vec<(String, StepState, i64)>,
    /// The steps that carry an error (any state but not run), by target.
    pub failures: Vec<StepRow>,
    /// Each target of each wave, by wave and target (plans with waves only).
    pub wave_targets: Vec<WaveTarget>,
}

/// One target of a wave: whether every step of it is applied, whether any failed.
#[derive(Debug, Clone)]
pub struct WaveTarget {
    pub wave: i64,
    pub shard: String,
    pub tenant: String,
    pub applied: bool,
    pub failed: bool,
}

/// One wave of a plan, as stored (plans with waves only).
#[derive(Debug, Clone)]
pub struct WaveRow {
    pub idx: i64,
    pub name: String,
    pub state: WaveState,
    pub bake_until_ms: Option<i64>,
    /// What its SQL gates found, last.
    pub gate: String,
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
        state: PlanState,
        message: String,
        /// Where the plan ends if it is stopping or rolling back.
        ends: PlanState,
    },
    Steps {
        plan_id: String,
        updates: Vec<StepUpdate>,
    },
    Audit(Audit),
    Agent {
        shard: String,
        labels: String,
        tenants: String,
        version: String,
        /// When the agent was last heard (0: now, as the row is written): a detach
        /// records its last heartbeat, or `fleet list` said "last seen" at its attach or
        /// its tenants' last change, however long ago.
        seen_ms: i64,
    },
    /// Where a plan's waves are (each row replaces the one stored before).
    Waves {
        plan_id: String,
        waves: Vec<WaveRow>,
    },
    /// The last progress of a plan's data changes, kept for its status once it finished.
    DataProgress {
        plan_id: String,
        entries: Vec<pb::DataProgress>,
    },
    /// A client's id for the submission that stored `plan_id` (with the plan's row).
    Submission {
        request_id: String,
        plan_id: String,
    },
    /// A shard's agent row deleted (`fleet retire`): the fleet forgets the shard.
    RetireAgent {
        shard: String,
    },
    /// Where a plan is paused now (`Paused::stored`), after a pause or resume.
    Paused {
        plan_id: String,
        paused: String,
    },
    /// A plan's stored spec replaced (`plan rollback --down-from`: its down SQL fixed).
    PlanSpec {
        plan_id: String,
        spec_hex: String,
    },
    /// Tenants of a shard kept for the catch-up after the plans under way (`pb::Tenant`s,
    /// each row replacing the one kept before for the same tenant).
    CatchUpKept {
        shard: String,
        tenants: Vec<pb::Tenant>,
    },
    /// Kept tenants taken for a catch-up: (shard, tenant).
    CatchUpTaken {
        tenants: Vec<(String, String)>,
    },
    /// When a plan was asked to run again after its submit (a retry, an approval, a
    /// rollback of it ended): its place among the plans waiting for shard locks
    /// (`Store::queued_at`).
    Queued {
        plan_id: String,
        at_ms: i64,
    },
    /// Answered once every op before it is applied.
    Flush(tokio::sync::oneshot::Sender<()>),
    /// Ops that commit in one transaction or not at all, in order (a plan's submit: its
    /// row, waves and audit entry; a retry: its steps, waves, state and audit entry): one
    /// message to the writer, so no batch boundary falls between them.
    Together(Vec<StoreOp>),
}

impl StoreOp {
    /// A copy for another attempt of a write that failed (the writer's attempt consumes
    /// it). A flush has no copy: its answer is the writer's, not a write; one inside ops
    /// that go together (none is) is left out.
    pub fn duplicate(&self) -> StoreOp {
        match self {
            StoreOp::InsertPlan { plan, steps } => StoreOp::InsertPlan {
                plan: plan.clone(),
                steps: steps.clone(),
            },
            StoreOp::PlanState {
                plan_id,
                state,
                message,
                ends,
            } => StoreOp::PlanState {
                plan_id: plan_id.clone(),
                state: *state,
                message: message.clone(),
                ends: *ends,
            },
            StoreOp::Steps { plan_id, updates } => StoreOp::Steps {
                plan_id: plan_id.clone(),
                updates: updates.clone(),
            },
            StoreOp::Audit(a) => StoreOp::Audit(a.clone()),
            StoreOp::CatchUpKept { shard, tenants } => StoreOp::CatchUpKept {
                shard: shard.clone(),
                tenants: tenants.clone(),
            },
            StoreOp::CatchUpTaken { tenants } => StoreOp::CatchUpTaken {
                tenants: tenants.clone(),
            },
            StoreOp::Queued { plan_id, at_ms } => StoreOp::Queued {
                plan_id: plan_id.clone(),
                at_ms: *at_ms,
            },
            StoreOp::Agent {
                shard,
                labels,
                tenants,
                version,
                seen_ms,
            } => StoreOp::Agent {
                shard: shard.clone(),
                labels: labels.clone(),
                tenants: tenants.clone(),
                version: version.clone(),
                seen_ms: *seen_ms,
            },
            StoreOp::Waves { plan_id, waves } => StoreOp::Waves {
                plan_id: plan_id.clone(),
                waves: waves.clone(),
            },
            StoreOp::Submission {
                request_id,
                plan_id,
            } => StoreOp::Submission {
                request_id: request_id.clone(),
                plan_id: plan_id.clone(),
            },
            StoreOp::RetireAgent { shard } => StoreOp::RetireAgent {
                shard: shard.clone(),
            },
            StoreOp::Paused { plan_id, paused } => StoreOp::Paused {
                plan_id: plan_id.clone(),
                paused: paused.clone(),
            },
            StoreOp::PlanSpec { plan_id, spec_hex } => StoreOp::PlanSpec {
                plan_id: plan_id.clone(),
                spec_hex: spec_hex.clone(),
            },
            StoreOp::DataProgress { plan_id, entries } => StoreOp::DataProgress {
                plan_id: plan_id.clone(),
                entries: entries.clone(),
            },
            StoreOp::Together(inner) => StoreOp::Together(
                inner
                    .iter()
                    .filter(|op| !matches!(op, StoreOp::Flush(_)))
                    .map(StoreOp::duplicate)
                    .collect(),
            ),
            StoreOp::Flush(_) => StoreOp::Together(Vec::new()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StepUpdate {
    pub migration_id: String,
    pub shard: String,
    pub tenant: String,
    pub state: StepState,
    pub sqlstate: String,
    pub message: String,
    pub phase: String,
    pub detail: String,
    pub duration_ms: i64,
    /// Set when the update is the outcome of an attempt (a run came back).
    pub run_id: Option<i64>,
}

/// One entry of the audit trail: who did what to which plan.
#[derive(Debug, Clone)]
pub struct Audit {
    pub actor: String,
    /// `submit`, `approve`, `reject`, `cancel`, `rollback`, `pause`, `resume`, `break-lock`, ...
    pub action: &'static str,
    pub plan_id: String,
    pub detail: String,
}

/// An agent seen before, as the store remembers it.
#[derive(Debug, Clone)]
pub struct AgentRow {
    pub shard: String,
    /// Labels as JSON (`{"k": "v"}`).
    pub labels: String,
    /// Tenants as JSON (`[["name", {"k": "v"}]]`).
    pub tenants: String,
    pub version: String,
    pub last_seen_ms: i64,
}

impl AgentRow {
    pub fn labels(&self) -> BTreeMap<String, String> {
        serde_json::from_str(&self.labels).unwrap_or_default()
    }

    pub fn tenants(&self) -> Vec<(String, BTreeMap<String, String>)> {
        serde_json::from_str(&self.tenants).unwrap_or_default()
    }

    /// What the planner needs of the shard.
    pub fn view(&self) -> crate::planner::ShardView {
        crate::planner::ShardView {
            labels: self.labels(),
            tenants: self.tenants(),
        }
    }
}
