//! The coordinator's one error enum, its typed refusals and conflicts, and how each
//! kind maps to a gRPC status (the only place that knows `tonic::Code`).
use flotilla_core::PlanError;
use flotilla_core::protocol::{LEADER_METADATA, REFUSAL_METADATA, REFUSAL_NOT_LEADER};
use flotilla_core::state::PlanState;

use crate::coordination::CoordinationError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The plan itself is wrong (file, graph, SQL, selector): nothing was stored.
    #[error("invalid plan: {0}")]
    InvalidPlan(#[from] PlanError),
    /// The plan (or command) is well formed but cannot run against this fleet as it is.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The lint found errors in the plan's SQL (each named: rule, migration, file and
    /// line; `flotilla plan lint` shows them all): nothing was stored or touched.
    #[error("the lint refuses the plan: {0}")]
    Lint(String),
    #[error("plan {0} not found")]
    PlanNotFound(String),
    /// `fleet show` of a name no shard knows (or one several shards know).
    #[error("{0}")]
    TargetNotFound(String),
    /// The command does not fit the plan's state (cancel a finished plan, ...).
    #[error(transparent)]
    Conflict(#[from] Conflict),
    #[error("shard {shard} is unreachable: {reason}")]
    Unreachable { shard: String, reason: String },
    /// A submit with this request id is being handled here already.
    #[error(
        "a submit with request id {0} is in progress here: send it again once it is answered \
         (it answers with the plan the first one stored)"
    )]
    SubmitInProgress(String),
    #[error("control store: {0}")]
    Store(#[from] StoreError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The one asking may not do this (approve their own plan, approve in a role the
    /// plan's approval rule does not accept).
    #[error("{0}")]
    NotAllowed(String),
    /// No valid operator credential (none, malformed, unknown or revoked).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("operator `{0}` exists already (revoke it first to give the name a new token)")]
    OperatorExists(String),
    #[error("no active operator `{0}`")]
    OperatorNotFound(String),
    #[error("coordinator is shutting down")]
    ShuttingDown,
    /// A request's writes were decided under a term that ended while it waited: the store
    /// refused them (this coordinator leads again, in a later term), so nothing it was to
    /// start is started.
    #[error(
        "this coordinator's term {epoch} ended while the request waited (it leads again, in term \
         {now}): nothing of it was stored; send it again"
    )]
    TermChanged { epoch: u64, now: u64 },
    /// A request's writes were flushed as its term ended, and the store could not be read
    /// to tell whether they landed (a later term continues from them if they did).
    #[error(
        "this coordinator's term ended while plan {plan_id} was being stored, and the control \
         store cannot be read to tell whether it was ({cause}): `flotilla plan status \
         {plan_id}` says; send the request again only if it did not take effect"
    )]
    TermEndedUnread { plan_id: String, cause: String },
    /// Only the leader schedules and decides; `leader` is where it is, when known.
    #[error("not the leader{}", match .leader {
        Some(l) => format!("; the leader is {l}"),
        None => "; no coordinator leads now (an election is under way, or etcd cannot be reached or has lost its quorum); try again".into(),
    })]
    NotLeader { leader: Option<String> },
    #[error("coordination: {0}")]
    Coordination(#[from] CoordinationError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    /// TLS material or the agent identity mapping cannot be used (names the flag and file).
    #[error("transport security: {0}")]
    Tls(String),
}

/// A plan or command refused as it stands against this fleet: nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("waves `{first}` and `{second}` both select {targets}: a target belongs to one wave")]
    WavesOverlap {
        first: String,
        second: String,
        targets: String,
    },
    #[error("wave `{wave}` selects no target (say optional = true if that is expected)")]
    EmptyWave { wave: String },
    #[error("{count} targets are in no wave, e.g. {targets}; add a last wave with rest = true")]
    Unwaved { count: usize, targets: String },
    #[error(
        "empty target set: no target of the fleet ({shards}) matches the plan selector `{selector}` and a migration's scope and selector"
    )]
    NoTargets { shards: String, selector: String },
    #[error(
        "migration `{migration}` ({source_path}): the file's checksum {checksum} differs from the one the journal records on {targets}; {why}; nothing was changed"
    )]
    EditedAfterApplied {
        migration: String,
        source_path: String,
        /// The plan's checksum, shortened.
        checksum: String,
        /// Where it differs: a few targets, and how many more.
        targets: String,
        /// Which was edited, as far as the other targets say.
        why: String,
    },
    #[error(
        "data migration `{migration}` ({source_path}) cannot run on {targets}: {problem}; nothing was changed"
    )]
    DataProblem {
        migration: String,
        source_path: String,
        targets: String,
        problem: String,
    },
    /// A shard an atomic unit prepares on cannot prepare (max_prepared_transactions).
    #[error("atomic plan refused by preflight: {0}")]
    CannotPrepare(String),
    #[error(
        "atomic plan: `{migration}` on {target} depends on `{dependency}` on {dependency_target}; atomic plans order steps within a target only"
    )]
    CrossTargetDependency {
        migration: String,
        target: String,
        dependency: String,
        dependency_target: String,
    },
    /// A step of an atomic unit that depends on a transactional step of the same unit
    /// cannot run in its prepared transaction: it would not see that step's changes.
    #[error(
        "atomic plan: `{migration}` depends on `{dependency}` in the same atomic unit, but {why}: a step sees another step's changes within an atomic unit only in the one prepared transaction of its target, which holds the unit's transactional steps; run `{migration}` in a later parallel group (after the unit committed), or make its changes transactional"
    )]
    SplitUnitTransaction {
        migration: String,
        dependency: String,
        why: String,
    },
    #[error("plan {plan_id} has no target on shard `{shard}` (its shards: {shards})")]
    NoSuchShard {
        plan_id: String,
        shard: String,
        shards: String,
    },
    #[error("plan {plan_id} has no step on shard {shard}")]
    NoStepOnShard { plan_id: String, shard: String },
    #[error(
        "plan {plan_id} commits atomically: it cannot stop half-way with transactions prepared; cancel it (`flotilla plan cancel {plan_id}`), which aborts and undoes it"
    )]
    AtomicHalt { plan_id: String },
    #[error(
        "plan {plan_id} commits atomically: its runs go on to their PREPARE and the commit whatever a pause says (held there, its prepared transactions would keep their locks), so it is not paused; cancel it (`flotilla plan cancel {plan_id}`) to abort and undo it"
    )]
    AtomicPause { plan_id: String },
    /// A catch-up plan's every step is applied on its tenants already (not stored).
    #[error("nothing to catch up: every step is applied on its tenants already")]
    NothingToCatchUp,
    #[error(
        "plan {plan_id} commits atomically and its decisions stand: it is not retried; submit the plan again (what it applied is found in the journals and passed over)"
    )]
    AtomicRetry { plan_id: String },
    #[error("plan {plan_id} has no target `{target}` (give shard or shard/tenant)")]
    UnknownTarget { plan_id: String, target: String },
    #[error(
        "plan {plan_id} is all-or-nothing: it cannot finish without shard {shard}; cancel the whole plan (`flotilla plan cancel {plan_id}`), which undoes what it applied"
    )]
    ShardNeeded { plan_id: String, shard: String },
    #[error(
        "the plan names no environment; this coordinator promotes plans through {known}: set `environment` in plan.toml (or `plan submit --environment`)"
    )]
    NoEnvironment { known: String },
    #[error(
        "{count} target(s) of the plan have another schema than their journal: {said}; nothing was changed"
    )]
    SchemaChanged { count: usize, said: String },
    #[error("unknown environment `{environment}`: the coordinator knows {known}")]
    UnknownEnvironment { environment: String, known: String },
    #[error(
        "the plan is for {environment}, and {count} of its targets are labelled for another environment: {targets}; the approval matrix asks by the plan's environment, so name theirs (or narrow the plan with --selector); nothing was changed"
    )]
    OtherEnvironment {
        environment: String,
        count: usize,
        targets: String,
    },
    #[error(
        "no attached shard is in environment `{environment}` (a shard's label {label}={environment} puts it there)"
    )]
    EmptyEnvironment { environment: String, label: String },
    #[error(
        "promotion gate: a plan for `{environment}` carries {count} migration(s) that have not completed in `{before}`: {lacking}. Roll them out to `{before}` first, or override with `--skip-promotion-check --reason TEXT` (audited); nothing was changed"
    )]
    NotPromoted {
        environment: String,
        before: String,
        count: usize,
        /// Each migration and where it stands, `; `-separated.
        lacking: String,
    },
    #[error(
        "require_no_drift: the schema of {targets} differs from their cohort's (see `flotilla fleet drift`); nothing was changed"
    )]
    Drifted {
        /// A few targets, and how many more.
        targets: String,
    },
    #[error(
        "require_baseline: {tool}'s history {history}: already ran there, but Flotilla's journal lacks it (run `flotilla fleet baseline PATH` first); nothing was changed"
    )]
    NotBaselined {
        tool: String,
        /// `on TARGETS says MIGRATIONS`, for each set of targets alike, a few of them.
        history: String,
    },
    #[error("baseline refused, nothing was recorded: {problems}")]
    BaselineRefused {
        /// Each refused target with why, a few of them, and how many more.
        problems: String,
    },
}

/// A command that does not fit the plan's state now.
#[derive(Debug, thiserror::Error)]
pub enum Conflict {
    #[error(
        "shard {shard} is served by an attached agent of database {attached}; this agent \
         serves database {database}: two agents are given one shard name (each shard \
         database needs a name of its own, `--shard`)"
    )]
    ShardServedElsewhere {
        shard: String,
        attached: String,
        database: String,
    },
    #[error(
        "shard {shard}: this agent's database {database} has no Flotilla journal, and this \
         coordinator's plans applied {applied} step(s) on the shard: its --dsn names another \
         database than the shard's (a copy, a new one, another shard's before Flotilla ran \
         there), or the shard's was restored from before them. Point it at the shard's \
         database; if the shard's database was replaced on \
         purpose, `flotilla fleet retire {shard}` first (the fleet forgets it), and it joins \
         as a new shard"
    )]
    ShardDatabaseWithoutJournal {
        shard: String,
        database: String,
        applied: i64,
    },
    #[error(
        "shard {shard} has seen epoch {fence} (its fence), and this coordinator leads under epoch {epoch}: every step it sent would be refused as fenced. Its control store is not the one that led this fleet (a new or restored store, another fleet's){remedy}"
    )]
    FenceAhead {
        shard: String,
        fence: u64,
        epoch: u64,
        remedy: String,
    },
    #[error(
        "plan {plan_id} holds shard {shard}'s lock and is in motion here, and cannot be halted ({why}); its lock goes when it ends: {remedy}"
    )]
    LockHolderInMotion {
        plan_id: String,
        shard: String,
        why: String,
        /// What ends it, by its state (a committing plan cannot be cancelled).
        remedy: &'static str,
    },
    #[error("plan {plan_id} is not running; nothing to {action}")]
    NotRunning {
        plan_id: String,
        action: &'static str,
    },
    #[error("plan {plan_id} already ended {state}")]
    Ended { plan_id: String, state: PlanState },
    #[error(
        "plan {plan_id} is {state}: a pause holds a running plan's steps and data changes \
         between batches, and would not hold its {what}"
    )]
    NotPausable {
        plan_id: String,
        state: PlanState,
        what: &'static str,
    },
    /// A new leader has not yet read its atomic unit's decision (it waits for the unit's
    /// shards' agents): an abort asked now could find a commit already decided.
    #[error(
        "plan {plan_id} was taken over by this leader in an atomic unit whose decision it has \
         not read yet (etcd has not answered): a {action} now could meet a commit the leader \
         before decided; try again in a moment"
    )]
    UnitUnverified {
        plan_id: String,
        action: &'static str,
    },
    #[error("plan {plan_id} is not paused (nothing of it is): there is nothing to resume")]
    PlanNotPaused { plan_id: String },
    #[error("{what}: there is nothing to pause (`plan resume` resumes it)")]
    AlreadyPaused { what: String },
    #[error("cannot resume shard {shard} of plan {plan_id} alone: {why}")]
    NotPaused {
        plan_id: String,
        shard: String,
        why: String,
    },
    #[error("plan {plan_id} already ended {state}; use `plan rollback` to undo it")]
    EndedUseRollback { plan_id: String, state: PlanState },
    #[error("plan {plan_id} is already rolling back")]
    RollingBack { plan_id: String },
    #[error(
        "plan {plan_id} is committing {unit} (its decision is commit; not yet committed on {waiting}): \
         it cannot be undone before it has committed; run the {action} again once it has (a \
         shard whose agent is gone for good: `flotilla plan forget-shard`)"
    )]
    Committing {
        plan_id: String,
        unit: String,
        waiting: String,
        action: &'static str,
    },
    #[error(
        "plan {plan_id} is {state} in the control store and not taken over by this coordinator \
         yet (a new leader resumes it first); run the rollback again in a moment"
    )]
    NotTakenOver { plan_id: String, state: PlanState },
    #[error("plan {plan_id} is already rolled back")]
    RolledBack { plan_id: String },
    #[error(
        "plan {plan_id}: later plans applied migrations on its targets after it ({later}): its down SQL may take their changes with it (a column of a table this plan made, and its rows); roll them back first, newest first, or pass --ignore-later-plans (audited) when they do not rest on this plan"
    )]
    LaterPlans { plan_id: String, later: String },
    #[error(
        "plan {plan_id}: tenants that appeared after it completed got its migrations from catch-up plans ({caught_up}): its rollback undoes its own steps, and would leave them there; roll those catch-up plans back first, newest first (each undoes every migration it gave its tenants), or pass --ignore-later-plans (audited) to leave them"
    )]
    CaughtUp { plan_id: String, caught_up: String },
    #[error(
        "plan {plan_id}: later plans applied migrations on the targets it would run again on ({later}): its steps would apply older migrations over theirs; roll them back first, newest first, or pass --ignore-later-plans (audited) when they do not touch what it changes"
    )]
    LaterPlansRetry { plan_id: String, later: String },
    #[error("plan {plan_id} is {state}; only a running plan's shard can be cancelled")]
    ShardOfStoppedPlan { plan_id: String, state: PlanState },
    #[error("shard {shard} of plan {plan_id} is already cancelled")]
    ShardCancelled { plan_id: String, shard: String },
    #[error("plan {plan_id} is not waiting at a manual gate ({now}); nothing to promote")]
    NotAtGate { plan_id: String, now: String },
    #[error(
        "plan {plan_id} is {now}, not committing or rolling back: `plan forget-shard` is for a \
         shard that will not come back to commit an atomic plan's decision, or to undo a plan \
         rolling back"
    )]
    NotCommitting { plan_id: String, now: String },
    #[error("shard {shard} of plan {plan_id} {what}; nothing to forget")]
    ShardResolved {
        plan_id: String,
        shard: String,
        what: &'static str,
    },
    #[error(
        "the agent of shard {shard} is {how}: it commits its part of plan {plan_id} by itself; \
         forget a shard only once its agent is gone for good"
    )]
    AgentPresent {
        plan_id: String,
        shard: String,
        how: &'static str,
    },
    #[error("plan {plan_id} is {state}; only a running plan can be halted")]
    NotHaltable { plan_id: String, state: PlanState },
    #[error(
        "plan {plan_id} is {state}; retry runs again the failed steps of a failed, halted or completed_with_failures plan"
    )]
    NotRetryable { plan_id: String, state: PlanState },
    #[error("plan {plan_id} is {state}, not awaiting approval; nothing to {action}")]
    NotAwaitingApproval {
        plan_id: String,
        state: String,
        action: &'static str,
    },
    #[error("plan {plan_id} has no failed or not-run step left to retry there")]
    NothingToRetry { plan_id: String },
}

/// Names a few of `items` and says how many more there are: `a, b and 3 more targets`.
pub fn some_of(items: &[String], shown: usize) -> String {
    let mut out = items
        .iter()
        .take(shown)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > shown {
        out.push_str(&format!(" and {} more targets", items.len() - shown));
    }
    out
}

/// The later plans a refusal or an audit names, newest first (the order to roll them back
/// in): the first few, and how many more. All of them made a message of 11 KB after a few
/// hundred plans, and one past the gRPC status's room broke the call (an HTTP/2 protocol
/// error, exit 3, "try again") with the reason lost.
pub fn later_shown(later: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut out = later
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("; ");
    if later.len() > SHOWN {
        out.push_str(&format!(
            "; and {} more, older (rolled back newest first, the next are named then)",
            later.len() - SHOWN
        ));
    }
    out
}

impl CoordinatorError {
    /// A refusal that may not hold a moment later (no leader, a shard between two streams,
    /// etcd or the control store out of reach): what is sent without an operator (a
    /// catch-up plan) is sent again.
    pub fn is_passing(&self) -> bool {
        match self {
            CoordinatorError::Unreachable { .. }
            | CoordinatorError::TermChanged { .. }
            | CoordinatorError::NotLeader { .. }
            | CoordinatorError::Store(_) => true,
            CoordinatorError::Coordination(e) => e.is_transient(),
            _ => false,
        }
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            CoordinatorError::InvalidPlan(_)
            | CoordinatorError::InvalidRequest(_)
            | CoordinatorError::Lint(_) => tonic::Status::invalid_argument(msg),
            CoordinatorError::Refused(_) | CoordinatorError::Conflict(_) => {
                tonic::Status::failed_precondition(msg)
            }
            CoordinatorError::NotAllowed(_) => tonic::Status::permission_denied(msg),
            CoordinatorError::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            CoordinatorError::OperatorExists(_) => tonic::Status::already_exists(msg),
            CoordinatorError::OperatorNotFound(_) => tonic::Status::not_found(msg),
            CoordinatorError::PlanNotFound(_) | CoordinatorError::TargetNotFound(_) => {
                tonic::Status::not_found(msg)
            }
            CoordinatorError::Unreachable { .. }
            | CoordinatorError::ShuttingDown
            | CoordinatorError::TermChanged { .. }
            | CoordinatorError::SubmitInProgress(_)
            | CoordinatorError::TermEndedUnread { .. } => tonic::Status::unavailable(msg),
            CoordinatorError::NotLeader { leader } => {
                let mut status = tonic::Status::unavailable(msg);
                // Programs read the refusal from metadata, never from the message.
                status
                    .metadata_mut()
                    .insert(REFUSAL_METADATA, REFUSAL_NOT_LEADER.parse().expect("ascii"));
                if let Some(l) = leader.and_then(|l| l.parse().ok()) {
                    status.metadata_mut().insert(LEADER_METADATA, l);
                }
                status
            }
            CoordinatorError::Coordination(e) if e.is_transient() => {
                tonic::Status::unavailable(msg)
            }
            CoordinatorError::Coordination(_)
            | CoordinatorError::Store(_)
            | CoordinatorError::Listen { .. }
            | CoordinatorError::Tls(_) => tonic::Status::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_newest_later_plans_and_counts_the_rest() {
        let later: Vec<String> = (0..300)
            .map(|i| {
                format!("plan p{i:010}: 2026.06.01_{i:06}_add_a_column on shard_1/tenant_1_05")
            })
            .collect();
        let shown = later_shown(&later);
        assert!(
            shown.starts_with("plan p0000000000: ")
                && shown.contains("plan p0000000004: ")
                && !shown.contains("p0000000005")
                && shown.ends_with(
                    "; and 295 more, older (rolled back newest first, the next are named then)"
                ),
            "{shown}"
        );
        // the refusal stays far below a gRPC status's room, however long the history
        let refusal = Conflict::LaterPlans {
            plan_id: "p1".into(),
            later: shown,
        }
        .to_string();
        assert!(refusal.len() < 1_000, "{} bytes: {refusal}", refusal.len());
        assert_eq!(
            later_shown(&later[..2]),
            format!("{}; {}", later[0], later[1])
        );
    }
}
