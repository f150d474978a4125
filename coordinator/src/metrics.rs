//! Every metric the coordinator exports, in one place: `flotilla_` prefix, unit
//! suffixes, a description each, label values from closed sets.
use std::net::SocketAddr;
use std::sync::Once;

pub use metrics_exporter_prometheus::BuildError;

use flotilla_core::pb;
use flotilla_core::protocol::Decision;
use flotilla_core::state::{PlanState, StepState};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

static DESCRIBE: Once = Once::new();

/// Serves `/metrics` on `addr` (Prometheus text format) and describes every metric.
pub fn install(addr: Option<SocketAddr>) -> Result<(), BuildError> {
    if let Some(addr) = addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()?;
    }
    DESCRIBE.call_once(|| {
        describe_counter!(
            "flotilla_plans_started_total",
            "Plans the coordinator started (or resumed)."
        );
        describe_counter!(
            "flotilla_plans_finished_total",
            "Plans that reached a final state, by state."
        );
        describe_counter!(
            "flotilla_steps_finished_total",
            "Step outcomes reported by agents, by outcome."
        );
        describe_histogram!(
            "flotilla_step_duration_seconds",
            "Time a step took on its shard."
        );
        describe_gauge!(
            "flotilla_agents_connected",
            "Agents attached to this coordinator."
        );
        describe_gauge!(
            "flotilla_leader",
            "1 while this coordinator leads, 0 while it follows."
        );
        describe_histogram!(
            "flotilla_two_phase_window_seconds",
            "Atomic plans: from the first PREPARE TRANSACTION to the last COMMIT PREPARED (locks held on every shard)."
        );
        describe_counter!(
            "flotilla_decisions_total",
            "Two-phase commit decisions written, by decision."
        );
        describe_gauge!(
            "flotilla_data_rows_done",
            "Data migrations: rows done over every target of a running plan, by plan."
        );
        describe_gauge!(
            "flotilla_data_rows_estimated",
            "Data migrations: rows estimated in all (done + the planner's estimate of the rest), by plan."
        );
        describe_gauge!(
            "flotilla_data_rows_per_second",
            "Data migrations: the plan's current rate over every target, by plan."
        );
        describe_gauge!(
            "flotilla_data_targets_waiting",
            "Data migrations: targets waiting at a batch boundary, by plan and why (throttled, paused)."
        );
    });
    Ok(())
}

pub fn plan_started() {
    counter!("flotilla_plans_started_total").increment(1);
}

pub fn plan_finished(state: PlanState) {
    counter!("flotilla_plans_finished_total", "state" => state.as_str()).increment(1);
}

pub fn step_finished(state: StepState, duration_ms: i64) {
    let outcome: &'static str = match state {
        StepState::Applied => "applied",
        StepState::AlreadyApplied => "already_applied",
        StepState::Failed => "failed",
        StepState::RolledBack => "rolled_back",
        // a run handed back (a halted batch, a resent run) goes again
        StepState::Pending => "retried",
        StepState::Prepared => "prepared",
        StepState::Running | StepState::NotRun => "not_run",
    };
    counter!("flotilla_steps_finished_total", "outcome" => outcome).increment(1);
    if state == StepState::Applied {
        histogram!("flotilla_step_duration_seconds").record(duration_ms as f64 / 1000.0);
    }
}

pub fn agents_connected(n: usize) {
    gauge!("flotilla_agents_connected").set(n as f64);
}

pub fn leader(leading: bool) {
    gauge!("flotilla_leader").set(if leading { 1.0 } else { 0.0 });
}

pub fn two_phase_window(window: std::time::Duration) {
    histogram!("flotilla_two_phase_window_seconds").record(window.as_secs_f64());
}

pub fn decision(decision: Decision) {
    counter!("flotilla_decisions_total", "decision" => decision.as_str()).increment(1);
}

/// A running plan's data changes, summed over its targets (the plan label is a generated id).
pub fn data_progress<'a>(plan_id: &str, progress: impl Iterator<Item = &'a pb::DataProgress>) {
    let plan = plan_id.to_string();
    let (mut done, mut total, mut rate, mut throttled, mut paused) = (0u64, 0u64, 0f64, 0u32, 0u32);
    for p in progress {
        done += p.rows_done;
        total += p.rows_total;
        if p.state == "running" || p.state == "throttled" || p.state == "paused" {
            rate += p.rows_per_second;
        }
        match p.state.as_str() {
            "throttled" => throttled += 1,
            "paused" => paused += 1,
            _ => {}
        }
    }
    gauge!("flotilla_data_rows_done", "plan" => plan.clone()).set(done as f64);
    gauge!("flotilla_data_rows_estimated", "plan" => plan.clone()).set(total as f64);
    gauge!("flotilla_data_rows_per_second", "plan" => plan.clone()).set(rate);
    gauge!("flotilla_data_targets_waiting", "plan" => plan.clone(), "why" => "throttled")
        .set(f64::from(throttled));
    gauge!("flotilla_data_targets_waiting", "plan" => plan, "why" => "paused")
        .set(f64::from(paused));
}

/// Targets whose schema is not their cohort's majority shape (`fleet drift`), by cohort (its
/// head migration; see `versions::cohort_labels`). A cohort no longer seen is set to 0: the
/// labels stay bounded by the cohorts the fleet has had.
pub fn drifted_targets(by_cohort: &[(String, u64)]) {
    static SEEN: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    static DESCRIBED: Once = Once::new();
    DESCRIBED.call_once(|| {
        describe_gauge!(
            "flotilla_drifted_targets",
            "Targets whose schema fingerprint differs from their cohort's majority, by cohort (head migration)."
        );
    });
    let mut seen = SEEN.lock().expect("drift metric lock");
    for gone in seen.iter() {
        if !by_cohort.iter().any(|(c, _)| c == gone) {
            gauge!("flotilla_drifted_targets", "cohort" => gone.clone()).set(0.0);
        }
    }
    for (cohort, drifted) in by_cohort {
        gauge!("flotilla_drifted_targets", "cohort" => cohort.clone()).set(*drifted as f64);
        seen.insert(cohort.clone());
    }
}
