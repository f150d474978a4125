//! Waves of a plan in motion: only the current wave's targets get runs; a wave whose
//! targets are done bakes, then passes its gate (at once, or at `plan promote` for a
//! manual one), and the next wave starts. A plan without waves is one wave of every
//! target with no bake and no gate, which is how plans ran before waves.
use flotilla_core::FailurePolicy;
use flotilla_core::pb;
use flotilla_core::state::WaveState;
use flotilla_core::waves::{Budget, Check, PromGate};

use super::{PlanRun, StepStatus};

/// One wave of a plan in motion.
#[derive(Debug, Clone)]
pub struct WaveRun {
    pub name: String,
    pub targets: Vec<usize>,
    pub state: WaveState,
    /// While baking: when the bake ends (milliseconds since the epoch, so that it means
    /// the same to a new leader).
    pub bake_until_ms: Option<i64>,
    pub bake_ms: u64,
    pub manual_gate: bool,
    pub max_parallel: Option<u32>,
    pub max_parallel_per_shard: Option<u32>,
    pub budget: Option<Budget>,
    /// SQL gates run on its targets after the bake.
    pub checks: Vec<Check>,
    /// A Prometheus gate, during the bake and after it.
    pub prometheus: Option<PromGate>,
    /// What its gates found, last.
    pub gate: String,
}

/// Where a wave was left (by the store, or by a retry): its state, a bake's end, and what
/// its gates found, which `plan status` goes on showing.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredWave {
    pub state: WaveState,
    pub bake_until_ms: Option<i64>,
    pub gate: String,
}

impl StoredWave {
    pub fn new(state: WaveState, bake_until_ms: Option<i64>) -> StoredWave {
        StoredWave {
            state,
            bake_until_ms,
            gate: String::new(),
        }
    }
}

/// A wave that moved, for the store and the log.
#[derive(Debug, Clone, PartialEq)]
pub struct WaveChange {
    pub wave: usize,
    pub state: WaveState,
    pub bake_until_ms: Option<i64>,
    pub message: String,
}

impl PlanRun {
    /// Sets which wave each target is in and where each wave is (a rebuild passes the
    /// stored states; a new plan passes none: the first wave runs). Only the current
    /// wave's targets stay queued.
    pub fn set_waves(&mut self, wave_of: Vec<usize>, stored: &[StoredWave]) {
        let spec = self.spec.clone();
        let mut waves: Vec<WaveRun> = if spec.rollout.waves.is_empty() {
            vec![WaveRun {
                name: "all".into(),
                targets: Vec::new(),
                state: WaveState::Pending,
                bake_until_ms: None,
                bake_ms: 0,
                manual_gate: false,
                max_parallel: None,
                max_parallel_per_shard: None,
                budget: None,
                checks: Vec::new(),
                prometheus: None,
                gate: String::new(),
            }]
        } else {
            spec.rollout
                .waves
                .iter()
                .map(|w| WaveRun {
                    name: w.name.clone(),
                    targets: Vec::new(),
                    state: WaveState::Pending,
                    bake_until_ms: None,
                    bake_ms: w.bake.as_millis() as u64,
                    manual_gate: w.manual_gate,
                    max_parallel: w.max_parallel,
                    max_parallel_per_shard: w.max_parallel_per_shard,
                    budget: w.budget,
                    checks: w.checks.clone(),
                    prometheus: w.prometheus.clone(),
                    gate: String::new(),
                })
                .collect()
        };
        // Post-deploy monitoring: a last stage with no targets that bakes for the watch,
        // probing the last Prometheus gate; a breach there rolls the plan back.
        if !spec.rollout.watch.is_zero() {
            waves.push(WaveRun {
                name: flotilla_core::waves::WATCH.into(),
                targets: Vec::new(),
                state: WaveState::Pending,
                bake_until_ms: None,
                bake_ms: spec.rollout.watch.as_millis() as u64,
                manual_gate: false,
                max_parallel: None,
                max_parallel_per_shard: None,
                budget: None,
                checks: Vec::new(),
                prometheus: spec
                    .rollout
                    .waves
                    .iter()
                    .rev()
                    .find_map(|w| w.prometheus.clone()),
                gate: String::new(),
            });
        }
        for (t, &w) in wave_of.iter().enumerate() {
            if let Some(wave) = waves.get_mut(w) {
                wave.targets.push(t);
            }
        }
        for (wave, stored) in waves.iter_mut().zip(stored) {
            wave.state = stored.state;
            wave.bake_until_ms = stored.bake_until_ms;
            wave.gate = stored.gate.clone();
        }
        self.wave_pos = waves
            .iter()
            .position(|w| w.state != WaveState::Done)
            .unwrap_or(waves.len());
        if let Some(w) = waves.get_mut(self.wave_pos)
            && w.state == WaveState::Pending
        {
            w.state = WaveState::Running;
        }
        self.waves = waves;
        self.wave_of = wave_of;
        self.requeue_ready();
    }

    /// Every shard's queue of ready targets made again from the steps' states and the
    /// open wave (after the waves or the steps' states changed wholesale).
    pub(super) fn requeue_ready(&mut self) {
        for sr in self.shards.values_mut() {
            sr.ready.clear();
            sr.queued.clear();
        }
        for t in 0..self.targets.len() {
            self.enqueue_if_ready(t);
        }
    }

    /// The wave now running, baking or waiting, if any is left.
    pub fn current_wave(&self) -> Option<&WaveRun> {
        self.waves.get(self.wave_pos)
    }

    /// What a plan waiting at its current wave's manual gate says, if it waits there.
    pub fn waiting_at_gate(&self) -> Option<String> {
        self.current_wave()
            .filter(|w| w.state == WaveState::Waiting)
            .map(|w| gate_wait(&w.name, &self.id))
    }

    /// Where the wave named `name` is: behind the plan (passed), the current one, or ahead.
    /// None when the plan has no wave of that name.
    pub fn wave_place(&self, name: &str) -> Option<std::cmp::Ordering> {
        let i = self.waves.iter().position(|w| w.name == name)?;
        Some(i.cmp(&self.wave_pos))
    }

    /// Whether target `t` may get runs now: its wave is the one running.
    pub(super) fn wave_open(&self, t: usize) -> bool {
        self.wave_of.get(t).is_none_or(|&w| w == self.wave_pos)
            && self
                .current_wave()
                .is_some_and(|w| w.state == WaveState::Running)
    }

    /// Every wave passed (a plan may end).
    pub fn waves_done(&self) -> bool {
        self.wave_pos >= self.waves.len()
    }

    /// The current wave's parallelism, over the plan's, and its limit per shard.
    pub(super) fn wave_lanes(&self) -> (u32, Option<u32>) {
        let wave = self.current_wave();
        (
            wave.and_then(|w| w.max_parallel)
                .unwrap_or(self.spec.max_parallel),
            wave.and_then(|w| w.max_parallel_per_shard),
        )
    }

    fn target_failed(&self, t: usize) -> bool {
        self.per_target[t]
            .iter()
            .any(|&s| self.steps[s].status == StepStatus::Failed)
    }

    fn target_open(&self, t: usize) -> bool {
        let queued = self
            .shards
            .get(&self.targets[t].shard)
            .is_some_and(|sr| sr.queued.contains(&t));
        queued
            || self.per_target[t].iter().any(|&s| {
                matches!(
                    self.steps[s].status,
                    StepStatus::Running(_) | StepStatus::Prepared
                )
            })
    }

    /// Moves the waves along at `now_ms`: a running wave with nothing in flight or ready
    /// starts its bake; a bake that ended passes the gate, or waits at a manual one; a
    /// passed wave lets the next one run.
    pub fn advance_waves(&mut self, now_ms: i64) -> Vec<WaveChange> {
        let mut changes = Vec::new();
        while let Some(w) = self.waves.get(self.wave_pos) {
            let i = self.wave_pos;
            let next = match w.state {
                // Only the current wave's targets are queued or out, so anything queued or out
                // means it is not done: checked first, it spares the scan of its targets on
                // every result while the wave runs.
                WaveState::Running
                    if self.outstanding() == 0
                        && self.shards.values().all(|sr| sr.ready.is_empty())
                        && w.targets.iter().all(|&t| !self.target_open(t)) =>
                {
                    let until = now_ms + w.bake_ms as i64;
                    Some((
                        WaveState::Baking,
                        Some(until),
                        format!(
                            "wave `{}` finished on its {} targets; baking for {:.1}s",
                            w.name,
                            w.targets.len(),
                            w.bake_ms as f64 / 1000.0
                        ),
                    ))
                }
                WaveState::Baking if w.bake_until_ms.is_none_or(|u| now_ms >= u) => {
                    if !w.checks.is_empty() || w.prometheus.is_some() {
                        Some((
                            WaveState::Checking,
                            None,
                            format!("wave `{}` baked; its gates are checked", w.name),
                        ))
                    } else if w.manual_gate {
                        Some((WaveState::Waiting, None, gate_wait(&w.name, &self.id)))
                    } else {
                        Some((WaveState::Done, None, format!("wave `{}` passed", w.name)))
                    }
                }
                _ => None,
            };
            let Some((state, until, message)) = next else {
                break;
            };
            self.waves[i].state = state;
            self.waves[i].bake_until_ms = until;
            changes.push(WaveChange {
                wave: i,
                state,
                bake_until_ms: until,
                message,
            });
            if state == WaveState::Done {
                changes.extend(self.next_wave());
            }
        }
        changes
    }

    /// The current wave passed its gate: the next one runs.
    fn next_wave(&mut self) -> Option<WaveChange> {
        self.wave_pos += 1;
        let w = self.waves.get_mut(self.wave_pos)?;
        w.state = WaveState::Running;
        let change = WaveChange {
            wave: self.wave_pos,
            state: WaveState::Running,
            bake_until_ms: None,
            message: format!("wave `{}` started on {} targets", w.name, w.targets.len()),
        };
        for t in 0..self.targets.len() {
            self.enqueue_if_ready(t);
        }
        Some(change)
    }

    /// What the current wave's SQL gates found: passed (a summary), or breached (why).
    /// The wave waits at its manual gate, or passes, or halts. None when the wave is not
    /// (or no longer) checking.
    pub fn gate_result(
        &mut self,
        wave: usize,
        found: Result<String, String>,
    ) -> Option<Vec<WaveChange>> {
        if wave != self.wave_pos {
            return None;
        }
        let w = self.waves.get_mut(wave)?;
        if w.state != WaveState::Checking {
            return None;
        }
        let (state, message) = match &found {
            Ok(summary) if w.manual_gate => (
                WaveState::Waiting,
                format!(
                    "wave `{}` passed its gates ({summary}); waiting for `flotilla plan promote {}`",
                    w.name, self.id
                ),
            ),
            Ok(summary) => (
                WaveState::Done,
                format!("wave `{}` passed its gates ({summary})", w.name),
            ),
            Err(why) => (
                WaveState::Halted,
                format!("wave `{}` failed its gate: {why}", w.name),
            ),
        };
        w.gate = match found {
            Ok(s) => s,
            Err(e) => e,
        };
        w.state = state;
        let mut changes = vec![WaveChange {
            wave,
            state,
            bake_until_ms: None,
            message,
        }];
        if state == WaveState::Done {
            changes.extend(self.next_wave());
        }
        Some(changes)
    }

    /// A Prometheus probe during the current wave's bake: the latest value is kept; a breach
    /// halts the wave. None when the wave is not (or no longer) baking.
    pub fn bake_probe(
        &mut self,
        wave: usize,
        found: Result<String, String>,
    ) -> Option<Vec<WaveChange>> {
        if wave != self.wave_pos {
            return None;
        }
        let w = self.waves.get_mut(wave)?;
        if w.state != WaveState::Baking {
            return None;
        }
        match found {
            Ok(value) => {
                w.gate = value;
                Some(Vec::new())
            }
            Err(why) => {
                w.state = WaveState::Halted;
                w.gate = why.clone();
                Some(vec![WaveChange {
                    wave,
                    state: WaveState::Halted,
                    bake_until_ms: None,
                    message: format!("wave `{}` failed its gate: {why}", w.name),
                }])
            }
        }
    }

    /// `plan promote`: the wave waiting at its manual gate passes. None when no wave waits.
    pub fn promote(&mut self) -> Option<Vec<WaveChange>> {
        let i = self.wave_pos;
        let w = self.waves.get_mut(i)?;
        if w.state != WaveState::Waiting {
            return None;
        }
        w.state = WaveState::Done;
        let mut changes = vec![WaveChange {
            wave: i,
            state: WaveState::Done,
            bake_until_ms: None,
            message: format!("wave `{}` promoted", w.name),
        }];
        changes.extend(self.next_wave());
        Some(changes)
    }

    /// The plan stopped (halt, budget, rollback): the wave in progress is halted.
    pub fn halt_wave(&mut self) -> Option<WaveChange> {
        let i = self.wave_pos;
        let w = self.waves.get_mut(i)?;
        if matches!(w.state, WaveState::Done | WaveState::Halted) {
            return None;
        }
        w.state = WaveState::Halted;
        Some(WaveChange {
            wave: i,
            state: WaveState::Halted,
            bake_until_ms: None,
            message: format!("wave `{}` halted", w.name),
        })
    }

    /// Under `continue`, whether failures went past a budget: the current wave's (or the
    /// plan's budget applied to the wave when it has none) or the plan's over all targets.
    /// The message names the wave (none for a plan without waves), the budget, and the
    /// failures when it was passed (more may follow from runs then under way: the plan's
    /// failures list them all).
    pub fn budget_exhausted(&self) -> Option<String> {
        if self.spec.policy != FailurePolicy::Continue {
            return None;
        }
        let rollout = &self.spec.rollout;
        if let Some(w) = self.current_wave()
            && let Some(budget) = w.budget.or(rollout.budget)
        {
            let failed = w.targets.iter().filter(|&&t| self.target_failed(t)).count();
            let allowed = budget.allowed(w.targets.len());
            if failed > allowed {
                // (a plan without waves runs as one wave of its own, named by no file)
                let whose = if rollout.waves.is_empty() {
                    "the plan: its".to_string()
                } else {
                    format!("wave `{}`: its", w.name)
                };
                return Some(format!(
                    "{whose} error budget of {allowed} (max_failures = \"{budget}\") was passed when {failed} of its {} targets had failed",
                    w.targets.len()
                ));
            }
        }
        if let Some(budget) = rollout.budget {
            let failed = (0..self.targets.len())
                .filter(|&t| self.target_failed(t))
                .count();
            let allowed = budget.allowed(self.targets.len());
            if failed > allowed {
                return Some(format!(
                    "the plan: its error budget of {allowed} (max_failures = \"{budget}\") was passed when {failed} of its {} targets had failed",
                    self.targets.len()
                ));
            }
        }
        None
    }

    /// The waves as operators see them (none for a plan without waves).
    pub fn wave_status(&self, now_ms: i64) -> Vec<pb::WaveStatus> {
        if self.spec.rollout.waves.is_empty() {
            return Vec::new();
        }
        let budgeted = self.spec.policy == FailurePolicy::Continue;
        self.waves
            .iter()
            .map(|w| {
                let failed = w.targets.iter().filter(|&&t| self.target_failed(t)).count();
                let applied = w
                    .targets
                    .iter()
                    .filter(|&&t| {
                        self.per_target[t].iter().all(|&s| {
                            matches!(
                                self.steps[s].status,
                                StepStatus::Applied | StepStatus::AlreadyApplied
                            )
                        })
                    })
                    .count();
                let budget = w.budget.or(self.spec.rollout.budget);
                pb::WaveStatus {
                    name: w.name.clone(),
                    state: w.state.as_str().into(),
                    // by (shard, tenant), as a finished plan's status from the store lists them
                    targets: {
                        let mut ts: Vec<&flotilla_core::Target> =
                            w.targets.iter().map(|&t| &self.targets[t]).collect();
                        ts.sort(); // a Target orders by shard, then tenant
                        ts.iter().map(|t| t.to_string()).collect()
                    },
                    applied: applied as u32,
                    failed: failed as u32,
                    pending: (w.targets.len() - applied - failed) as u32,
                    max_failures: budget.map_or(0, |b| b.allowed(w.targets.len())) as u32,
                    budgeted: budgeted && budget.is_some(),
                    bake_until_ms: w
                        .bake_until_ms
                        .filter(|&u| w.state == WaveState::Baking && u > now_ms)
                        .unwrap_or(0) as u64,
                    manual_gate: w.manual_gate,
                    gate: w.gate.clone(),
                }
            })
            .collect()
    }
}

/// A plan's message while it waits at wave `wave`'s manual gate.
fn gate_wait(wave: &str, plan_id: &str) -> String {
    format!("wave `{wave}` is done and baked; waiting for `flotilla plan promote {plan_id}`")
}
