//! Every metric the agent exports. Names carry the `flotilla_agent_` prefix and a unit
//! suffix; label values come from the closed enums below, never from user input.
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use flotilla_core::pb;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

pub const STEPS_TOTAL: &str = "flotilla_agent_steps_total";
pub const STEP_DURATION_SECONDS: &str = "flotilla_agent_step_duration_seconds";
pub const RUNS_IN_FLIGHT: &str = "flotilla_agent_runs_in_flight";
pub const COORDINATOR_CONNECTED: &str = "flotilla_agent_coordinator_connected";
pub const RECONNECTS_TOTAL: &str = "flotilla_agent_reconnects_total";
pub const ETCD_LIVENESS_UP: &str = "flotilla_agent_etcd_liveness_up";
pub const SHARD_LOCK_HELD: &str = "flotilla_agent_shard_lock_held";
pub const PREPARED_TRANSACTIONS: &str = "flotilla_agent_prepared_transactions";
pub const PREPARED_OLDEST_AGE_SECONDS: &str = "flotilla_agent_prepared_oldest_age_seconds";
pub const PREPARED_RESOLUTIONS_TOTAL: &str = "flotilla_agent_prepared_resolutions_total";
pub const DATA_ROWS_TOTAL: &str = "flotilla_agent_data_rows_total";
pub const DATA_BATCHES_TOTAL: &str = "flotilla_agent_data_batches_total";
pub const DATA_BATCH_SIZE: &str = "flotilla_agent_data_batch_size";
pub const DATA_WAITING: &str = "flotilla_agent_data_waiting";

/// What became of one step (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Applied,
    AlreadyApplied,
    Failed,
    NotRun,
    RolledBack,
    /// In a prepared transaction, waiting for the plan's decision.
    Prepared,
    /// Refused by the shard's fence: a newer leader took the shard over, and runs the step
    /// again (reported failed to the leader that sent it; no failure of the plan's).
    Fenced,
}

impl StepOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            StepOutcome::Applied => "applied",
            StepOutcome::AlreadyApplied => "already_applied",
            StepOutcome::Failed => "failed",
            StepOutcome::NotRun => "not_run",
            StepOutcome::RolledBack => "rolled_back",
            StepOutcome::Prepared => "prepared",
            StepOutcome::Fenced => "fenced",
        }
    }

    /// The wire outcome; a rollback is reported in a `RollbackReply`, not as a step outcome.
    pub fn to_pb(self) -> pb::StepOutcome {
        match self {
            StepOutcome::Applied => pb::StepOutcome::Applied,
            StepOutcome::AlreadyApplied => pb::StepOutcome::AlreadyApplied,
            StepOutcome::Failed | StepOutcome::Fenced => pb::StepOutcome::Failed,
            StepOutcome::NotRun => pb::StepOutcome::NotRun,
            StepOutcome::RolledBack => pb::StepOutcome::Unspecified,
            StepOutcome::Prepared => pb::StepOutcome::Prepared,
        }
    }
}

/// How a step ran (the `mode` label of the duration histogram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepMode {
    Transactional,
    NonTransactional,
    Rollback,
}

impl StepMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StepMode::Transactional => "transactional",
            StepMode::NonTransactional => "non_transactional",
            StepMode::Rollback => "rollback",
        }
    }
}

/// Describes every metric once per process (the recorder may be installed later; the
/// `metrics` facade keeps descriptions only if a recorder is there, so `start` calls this).
pub fn describe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        describe_counter!(
            STEPS_TOTAL,
            Unit::Count,
            "Steps this agent finished, by outcome (fenced: refused by the shard's fence after a change of leader, run again by the new one; not a failure)."
        );
        describe_histogram!(
            STEP_DURATION_SECONDS,
            Unit::Seconds,
            "Time a step (or the undo of one) spent on the shard, by mode and outcome."
        );
        describe_gauge!(
            RUNS_IN_FLIGHT,
            Unit::Count,
            "Runs executing on the shard right now."
        );
        describe_gauge!(
            COORDINATOR_CONNECTED,
            Unit::Count,
            "1 while the agent's stream to the coordinator is open, else 0."
        );
        describe_counter!(
            RECONNECTS_TOTAL,
            Unit::Count,
            "Times the agent reconnected to the coordinator after losing its stream."
        );
        describe_gauge!(
            ETCD_LIVENESS_UP,
            Unit::Count,
            "1 while the agent's liveness key is in etcd under a lease it keeps alive, else 0."
        );
        describe_gauge!(
            SHARD_LOCK_HELD,
            Unit::Count,
            "1 while the agent holds its shard's agent lock (and so may apply steps), else 0."
        );
        describe_gauge!(
            PREPARED_TRANSACTIONS,
            Unit::Count,
            "Flotilla's prepared transactions held on the shard, waiting for their plan's decision \
             (counted as this agent prepares and resolves them, recounted from pg_prepared_xacts \
             every few seconds and at each in-doubt scan)."
        );
        describe_gauge!(
            PREPARED_OLDEST_AGE_SECONDS,
            Unit::Seconds,
            "Age of the oldest of Flotilla's prepared transactions on the shard (pg_prepared_xacts' \
             `prepared`), read every few seconds; 0 with none."
        );
        describe_counter!(
            DATA_ROWS_TOTAL,
            Unit::Count,
            "Rows changed by data migrations' batches (committed with their checkpoint)."
        );
        describe_counter!(
            DATA_BATCHES_TOTAL,
            Unit::Count,
            "Data migration batches committed."
        );
        describe_gauge!(
            DATA_BATCH_SIZE,
            Unit::Count,
            "The batch size of the last data migration batch (adaptive sizing moves it)."
        );
        describe_gauge!(
            DATA_WAITING,
            Unit::Count,
            "Data changes waiting at a batch boundary right now, by why (throttled, paused)."
        );
        describe_counter!(
            PREPARED_RESOLUTIONS_TOTAL,
            Unit::Count,
            "Prepared transactions this agent committed or rolled back, by decision (commit, abort)."
        );
    });
}

/// Series that exist before their first event, so dashboards and alerts see 0, not
/// nothing (and `rate()` counts the first event).
pub fn initialise() {
    for outcome in [
        StepOutcome::Applied,
        StepOutcome::AlreadyApplied,
        StepOutcome::Failed,
        StepOutcome::NotRun,
        StepOutcome::RolledBack,
        StepOutcome::Prepared,
        StepOutcome::Fenced,
    ] {
        counter!(STEPS_TOTAL, "outcome" => outcome.as_str()).absolute(0);
    }
    counter!(RECONNECTS_TOTAL).absolute(0);
    for decision in ["commit", "abort"] {
        counter!(PREPARED_RESOLUTIONS_TOTAL, "decision" => decision).absolute(0);
    }
    counter!(DATA_ROWS_TOTAL).absolute(0);
    counter!(DATA_BATCHES_TOTAL).absolute(0);
    for why in ["throttled", "paused"] {
        gauge!(DATA_WAITING, "why" => why).increment(0.0);
    }
    gauge!(RUNS_IN_FLIGHT).increment(0.0);
    gauge!(PREPARED_TRANSACTIONS).increment(0.0);
    gauge!(PREPARED_OLDEST_AGE_SECONDS).increment(0.0);
    gauge!(COORDINATOR_CONNECTED).increment(0.0);
    gauge!(ETCD_LIVENESS_UP).increment(0.0);
    gauge!(SHARD_LOCK_HELD).increment(0.0);
}

pub fn step_finished(outcome: StepOutcome) {
    counter!(STEPS_TOTAL, "outcome" => outcome.as_str()).increment(1);
}

pub fn step_duration(mode: StepMode, outcome: StepOutcome, elapsed: Duration) {
    histogram!(STEP_DURATION_SECONDS, "mode" => mode.as_str(), "outcome" => outcome.as_str())
        .record(elapsed.as_secs_f64());
}

pub fn run_started() {
    gauge!(RUNS_IN_FLIGHT).increment(1.0);
}

pub fn run_finished() {
    gauge!(RUNS_IN_FLIGHT).decrement(1.0);
}

pub fn coordinator_connected(connected: bool) {
    ATTACHED.store(connected, Ordering::Relaxed);
    gauge!(COORDINATOR_CONNECTED).set(if connected { 1.0 } else { 0.0 });
}

pub fn reconnected() {
    counter!(RECONNECTS_TOTAL).increment(1);
}

pub fn etcd_liveness_up(up: bool) {
    ETCD_LIVENESS.store(if up { ETCD_UP } else { ETCD_DOWN }, Ordering::Relaxed);
    gauge!(ETCD_LIVENESS_UP).set(if up { 1.0 } else { 0.0 });
}

/// Whether the agent's stream to the leader is up (welcomed), for [`readiness`].
static ATTACHED: AtomicBool = AtomicBool::new(false);
/// Whether the agent holds its shard's agent lock (it takes runs only then), for
/// [`readiness`].
static LOCK_HELD: AtomicBool = AtomicBool::new(false);
/// The agent's etcd liveness key: never kept (no etcd), kept, or lost.
static ETCD_LIVENESS: AtomicU8 = AtomicU8::new(ETCD_UNUSED);
const ETCD_UNUSED: u8 = 0;
const ETCD_UP: u8 = 1;
const ETCD_DOWN: u8 = 2;

/// What the agent's `/readyz` answers: ready while attached to the leader, holding its
/// shard's agent lock (it takes no runs without: its database does not answer it, or
/// another agent holds the lock; it said ready with its database down) and, with etcd,
/// keeping its liveness key (without it the leader counts the shard away, and an atomic
/// plan cannot decide on it).
pub fn readiness() -> Result<(), String> {
    if !ATTACHED.load(Ordering::Relaxed) {
        return Err("not attached to the leading coordinator".into());
    }
    if !LOCK_HELD.load(Ordering::Relaxed) {
        return Err(
            "it does not hold its shard's agent lock, and takes no runs (its database does \
             not answer it, or another agent holds the lock: its log says which)"
                .into(),
        );
    }
    if ETCD_LIVENESS.load(Ordering::Relaxed) == ETCD_DOWN {
        return Err("its liveness key in etcd is not kept (etcd out of reach)".into());
    }
    Ok(())
}

pub fn shard_lock_held(held: bool) {
    LOCK_HELD.store(held, Ordering::Relaxed);
    gauge!(SHARD_LOCK_HELD).set(if held { 1.0 } else { 0.0 });
}

pub fn prepared_held_add(delta: f64) {
    gauge!(PREPARED_TRANSACTIONS).increment(delta);
}

pub fn prepared_held_set(held: f64) {
    gauge!(PREPARED_TRANSACTIONS).set(held);
}

/// What pg_prepared_xacts says: how many of Flotilla's, and the oldest one's age.
pub fn prepared_census(held: i64, oldest: Duration) {
    gauge!(PREPARED_TRANSACTIONS).set(held as f64);
    gauge!(PREPARED_OLDEST_AGE_SECONDS).set(oldest.as_secs_f64());
}

/// `decision`: `commit` or `abort`.
pub fn prepared_resolved(decision: &'static str) {
    counter!(PREPARED_RESOLUTIONS_TOTAL, "decision" => decision).increment(1);
}

pub fn data_batch(rows: u64, batch_size: u32) {
    counter!(DATA_ROWS_TOTAL).increment(rows);
    counter!(DATA_BATCHES_TOTAL).increment(1);
    gauge!(DATA_BATCH_SIZE).set(f64::from(batch_size));
}

/// `why`: `throttled` or `paused`; +1 when a change starts waiting, -1 when it goes on.
pub fn data_waiting(why: &'static str, delta: f64) {
    gauge!(DATA_WAITING, "why" => why).increment(delta);
}
