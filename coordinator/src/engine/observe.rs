//! What the engine holds, as gauges: recomputed from its whole state on every tick, and
//! when a plan starts, ends or reports data progress (a short plan may live less than a
//! tick), never kept in step with each change by hand, so they cannot drift; and the
//! expected duration a running plan is measured against.
use std::time::{Duration, Instant};

use flotilla_core::state::{PlanState, WaveState};

use super::Engine;
use crate::metrics::{self, ShardData, Snapshot};
use crate::plan::PlanRun;
use crate::store::now_ms;

/// Below this a plan is never "late": scheduling, locks and round trips cost seconds
/// whatever its steps take.
const MIN_EXPECTED: Duration = Duration::from_secs(60);

/// Weight of the newest applied step in the mean step time.
const STEP_TIME_WEIGHT: f64 = 0.05;

/// The mean step time before any step was seen.
pub(super) const INITIAL_STEP_SECONDS: f64 = 1.0;

impl Engine {
    /// Folds an applied step's duration into the mean step time (exponentially weighted,
    /// so it follows the fleet as it is now).
    pub(super) fn observe_step_time(&mut self, duration_ms: i64) {
        let s = (duration_ms.max(0) as f64) / 1000.0;
        self.step_seconds += STEP_TIME_WEIGHT * (s - self.step_seconds);
    }

    /// A shard this term knows of from now on, its step counters at 0 (a series that first
    /// appears already holding its value hides that step from `increase()`: a failure on a
    /// shard known late read 0 failures on the dashboard).
    fn know_shard(&mut self, shard: &str) {
        if self.known_agents.insert(shard.to_string()) {
            metrics::shard_known(shard);
        }
    }

    /// A shard's agent attached (`true`) or went away.
    pub(super) fn agent_seen(&mut self, shard: &str, attached: bool) {
        if attached {
            self.know_shard(shard);
            self.away_since.remove(shard);
        } else {
            self.away_since.insert(shard.to_string(), Instant::now());
        }
    }

    /// Sets every engine gauge from the state now.
    pub(super) fn publish_metrics(&mut self) {
        let now = Instant::now();
        let mut snap = Snapshot {
            epoch: self.leading.then_some(self.epoch),
            ..Snapshot::default()
        };
        if self.leading {
            // Shards whose agents are alive in etcd or have runs here are known too,
            // even if they never attached to this leader.
            let extra: Vec<String> = self
                .live
                .iter()
                .cloned()
                .chain(self.plans.values().flat_map(|r| r.shards.keys().cloned()))
                .filter(|s| !self.agents.contains_key(s))
                .collect();
            for shard in extra {
                self.know_shard(&shard);
                self.away_since.entry(shard).or_insert(now);
            }
            for shard in &self.known_agents {
                let away = if self.agents.contains_key(shard) {
                    None
                } else {
                    Some(
                        self.away_since
                            .get(shard)
                            .map_or(Duration::ZERO, |since| now.duration_since(*since)),
                    )
                };
                snap.agents.insert(shard.clone(), away);
            }
        }
        let now_ms = now_ms();
        for run in self.plans.values_mut() {
            if run.state.is_terminal() {
                continue;
            }
            let env = if run.spec.environment.is_empty() {
                metrics::NO_ENVIRONMENT.to_string()
            } else {
                run.spec.environment.clone()
            };
            *snap.plans.entry((shown_state(run), env)).or_default() += 1;
            if run.locked {
                snap.shards_locked += run.shards.len();
            }
            if run.lock_wait.is_some() {
                snap.waiting_for_locks += 1;
            }
            snap.prepared_targets += run.shards.values().map(|s| s.prepared.len()).sum::<usize>();
            // Measured by the time it ran, not its age: a wait for a person (at a manual
            // gate, paused, awaiting approval) or for another plan's locks is no part of
            // what is expected, and counted it fired the alert 5 minutes into the bake after
            // a promote half an hour later (a retry of a day-old plan started in the
            // thousands).
            let running = matches!(shown_state(run), "running") && run.lock_wait.is_none();
            if let Some(ran) = time_it_ran(run, running, now_ms) {
                let ratio =
                    ran.as_secs_f64() / expected_duration(run, self.step_seconds).as_secs_f64();
                snap.duration_ratio = snap.duration_ratio.max(ratio);
            }
            for p in run.progress.values() {
                let d: &mut ShardData = snap.data.entry(p.shard.clone()).or_default();
                d.rows_done += p.rows_done;
                d.rows_estimated += p.rows_total;
                match p.state.as_str() {
                    "running" | "throttled" | "paused" => {
                        d.rows_per_second += p.rows_per_second;
                        d.eta = d.eta.max(Duration::from_millis(p.eta_ms));
                    }
                    _ => {}
                }
                match p.state.as_str() {
                    "throttled" => d.throttled += 1,
                    "paused" => d.paused += 1,
                    flotilla_core::protocol::LOCK_WAIT => d.lock_waiting += 1,
                    _ => {}
                }
            }
        }
        metrics::publish(&snap, &mut self.published);
    }

    /// The shards the control store knows of, each with its agent's last sighting: those
    /// not attached now count as away since then (as `fleet list` says). Without it, a
    /// shard whose agent was down when this coordinator took over (a restart, a failover)
    /// had no series at all: `flotilla_shard_agent_disconnected_seconds` was gone, the
    /// alert on it resolved, and the dead agent went unalerted.
    pub(super) fn known_from_store(&mut self, last_seen_ms: Vec<(String, i64)>) {
        if !self.leading {
            return;
        }
        let (now, now_ms) = (Instant::now(), now_ms());
        for (shard, seen_ms) in last_seen_ms {
            // attached, or alive in etcd and about to attach (its row's last sighting may be
            // its attach days ago, under a leader that died without writing the detach):
            // counted from now by `publish_metrics`, not paged for at once
            if self.agents.contains_key(&shard) || self.live.contains(&shard) {
                continue;
            }
            let ago = Duration::from_millis((now_ms - seen_ms).max(0) as u64);
            self.know_shard(&shard);
            self.away_since
                .entry(shard)
                .or_insert_with(|| now.checked_sub(ago).unwrap_or(now));
        }
    }

    /// After leadership is lost: this coordinator knows no agent any more.
    pub(super) fn forget_agents(&mut self) {
        self.known_agents.clear();
        self.away_since.clear();
    }
}

/// The state label of a plan in motion ([`metrics::ACTIVE_STATES`]).
fn shown_state(run: &PlanRun) -> &'static str {
    if run.state == PlanState::Running {
        // (as its status says: see `plan::status::from_run`)
        if run.paused.plan || run.waits_on_paused_shards() {
            return "paused";
        }
        if run
            .current_wave()
            .is_some_and(|w| w.state == WaveState::Waiting)
        {
            return "waiting";
        }
    }
    run.state.as_str()
}

/// How long `run` has run (under this leader) as of a tick at `now_ms` that finds it
/// `running` or not: the time between ticks that both found it running. None while it does
/// not run.
fn time_it_ran(run: &mut PlanRun, running: bool, now_ms: i64) -> Option<Duration> {
    if !running {
        run.observed_at_ms = 0;
        return None;
    }
    if run.observed_at_ms > 0 {
        run.ran_ms += (now_ms - run.observed_at_ms).max(0) as u64;
    }
    run.observed_at_ms = now_ms;
    Some(Duration::from_millis(run.ran_ms))
}

/// How long a plan should take, roughly: its bakes, its steps over its parallelism at
/// the fleet's mean step time, and its data changes' time left; never under a minute.
fn expected_duration(run: &PlanRun, step_seconds: f64) -> Duration {
    let bakes: u64 = run.waves.iter().map(|w| w.bake_ms).sum();
    let rounds = run
        .steps
        .len()
        .div_ceil(run.spec.max_parallel.max(1) as usize);
    let data_left = run.progress.values().map(|p| p.eta_ms).max().unwrap_or(0);
    let expected = Duration::from_millis(bakes + data_left)
        + Duration::from_secs_f64(rounds as f64 * step_seconds.max(0.0));
    expected.max(MIN_EXPECTED)
}

#[cfg(test)]
mod tests {
    use flotilla_core::pb;

    use super::*;
    use crate::plan::tests::plan_of;

    /// 2 migrations x 10 tenants = 20 steps, 8 at a time: 3 rounds.
    fn twenty_steps() -> PlanRun {
        let targets: Vec<(String, String)> = (0..10)
            .map(|t| ("s0".to_string(), format!("t{t}")))
            .collect();
        let targets: Vec<(&str, &str)> = targets
            .iter()
            .map(|(s, t)| (s.as_str(), t.as_str()))
            .collect();
        plan_of(
            &["a", "b"],
            Vec::new(),
            &targets,
            pb::FailurePolicy::AllOrNothing,
        )
    }

    /// A plan's duration ratio counts the time it ran, not its age: a day-old plan retried
    /// (or promoted after a long manual gate) starts from nothing, and a wait between two
    /// ticks that found it running is left out.
    #[test]
    fn the_time_a_plan_ran_leaves_its_waits_out() {
        let mut run = plan_of(
            &["a"],
            Vec::new(),
            &[("s0", "t1")],
            pb::FailurePolicy::AllOrNothing,
        );
        run.created_at_ms = 1_000;
        let day = 86_400_000;
        assert_eq!(time_it_ran(&mut run, true, day), Some(Duration::ZERO));
        assert_eq!(
            time_it_ran(&mut run, true, day + 2_000),
            Some(Duration::from_secs(2))
        );
        // waiting (a manual gate, a pause, another plan's locks) for an hour
        assert_eq!(time_it_ran(&mut run, false, day + 3_000), None);
        assert_eq!(time_it_ran(&mut run, false, day + 3_600_000), None);
        assert_eq!(
            time_it_ran(&mut run, true, day + 3_601_000),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            time_it_ran(&mut run, true, day + 3_602_500),
            Some(Duration::from_millis(3_500))
        );
    }

    #[test]
    fn expected_duration_is_rounds_of_steps_at_the_mean_step_time_plus_data_left() {
        let mut run = twenty_steps();
        assert_eq!(run.steps.len(), 20);
        assert_eq!(expected_duration(&run, 100.0), Duration::from_secs(300));
        // Fast steps: never under a minute.
        assert_eq!(expected_duration(&run, 0.01), MIN_EXPECTED);
        // A data change with two minutes left adds them.
        run.record_progress(pb::DataProgress {
            plan_id: "p0".into(),
            migration_id: "b".into(),
            shard: "s0".into(),
            tenant: "t0".into(),
            eta_ms: 120_000,
            state: "running".into(),
            ..Default::default()
        });
        assert_eq!(expected_duration(&run, 100.0), Duration::from_secs(420));
    }

    #[test]
    fn a_plan_paused_as_a_whole_shows_paused_not_running() {
        let mut run = twenty_steps();
        assert_eq!(shown_state(&run), "running");
        run.paused.plan = true;
        assert_eq!(shown_state(&run), "paused");
        run.paused.plan = false;
        run.state = PlanState::RollingBack;
        assert_eq!(shown_state(&run), "rolling_back");
    }
}
