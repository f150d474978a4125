//! SQL gates: after a wave's bake, every check of the wave runs on every target of the
//! wave, by the agents of their shards; the first breach (a value past its max, a query
//! that fails, a shard that cannot answer) fails the gate. Checks only read. A new leader
//! that finds a wave checking runs its checks again.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::pb;
use flotilla_core::state::{PlanState, WaveState};
use flotilla_core::waves::{Check, OnGateFailure};
use tracing::warn;

use super::{Engine, Event};
use crate::sessions::registry::Fleet;
use crate::store::StoreOp;

/// How long an agent may take to answer one check on its targets.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

impl Engine {
    /// Starts the current wave's gate checks if it is checking and they are not under way.
    pub(super) fn start_gate(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get(plan_id) else {
            return;
        };
        let Some(wave) = run.current_wave() else {
            return;
        };
        if wave.state != WaveState::Checking || run.state != PlanState::Running {
            return;
        }
        let key = (
            plan_id.to_string(),
            run.waves
                .iter()
                .position(|w| w.name == wave.name)
                .unwrap_or(0),
        );
        if !self.gates.insert(key.clone()) {
            return;
        }
        let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for &t in &wave.targets {
            let target = &run.targets[t];
            by_shard
                .entry(target.shard.clone())
                .or_default()
                .push(target.tenant.clone());
        }
        let checks = wave.checks.clone();
        let prom = wave.prometheus.clone();
        let fleet = self.fleet.clone();
        let events = self.events.clone();
        let epoch = self.epoch;
        let (plan_id, wave) = key;
        tokio::spawn(async move {
            let mut found = run_checks(&fleet, &plan_id, &checks, &by_shard).await;
            if let (Ok(summary), Some(p)) = (&found, &prom) {
                found = match super::prometheus::query(&p.url, &p.query).await {
                    Ok(v) => p
                        .judge(v)
                        .map(|()| {
                            let value = format!("{} = {v}", p.query);
                            if summary.is_empty() {
                                value
                            } else {
                                format!("{summary}; {value}")
                            }
                        })
                        .map_err(|why| format!("Prometheus gate: {why}")),
                    Err(e) => Err(format!("Prometheus gate: {e}")),
                };
            }
            // an engine gone is a coordinator shutting down: a new leader checks again
            let _ = events
                .send(Event::GateResult {
                    plan_id,
                    wave,
                    epoch,
                    found,
                })
                .await;
        });
    }

    /// During a bake, the wave's Prometheus gate is evaluated every interval; a breach fails
    /// the wave at once (the bake is for watching).
    pub(super) fn probe_bake(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get(plan_id) else {
            return;
        };
        let Some(wave) = run.current_wave() else {
            return;
        };
        let (WaveState::Baking, Some(p)) = (wave.state, wave.prometheus.clone()) else {
            return;
        };
        let i = run
            .waves
            .iter()
            .position(|w| w.name == wave.name)
            .unwrap_or(0);
        let key = (plan_id.to_string(), i);
        let due = self
            .probed
            .get(&key)
            .is_none_or(|at| at.elapsed() >= p.interval);
        if !due || self.gates.contains(&key) {
            return;
        }
        self.gates.insert(key.clone());
        self.probed.insert(key.clone(), std::time::Instant::now());
        let events = self.events.clone();
        let epoch = self.epoch;
        tokio::spawn(async move {
            let found = match super::prometheus::query(&p.url, &p.query).await {
                Ok(v) => p
                    .judge(v)
                    .map(|()| format!("{} = {v} during the bake", p.query))
                    .map_err(|why| format!("Prometheus gate during the bake: {why}")),
                Err(e) => Err(format!("Prometheus gate during the bake: {e}")),
            };
            let (plan_id, wave) = key;
            // an engine gone is a coordinator shutting down: a new leader probes again
            let _ = events
                .send(Event::BakeProbe {
                    plan_id,
                    wave,
                    epoch,
                    found,
                })
                .await;
        });
    }

    /// What a probe during a bake found: the latest value, or a breach that fails the wave.
    pub(super) async fn on_bake_probe(
        &mut self,
        plan_id: &str,
        wave: usize,
        found: Result<String, String>,
    ) {
        self.on_gate_found(plan_id, wave, found, true).await;
    }

    /// What a wave's gate found: the wave goes on, waits, or fails the plan as it says.
    pub(super) async fn on_gate_result(
        &mut self,
        plan_id: &str,
        wave: usize,
        found: Result<String, String>,
    ) {
        self.on_gate_found(plan_id, wave, found, false).await;
    }

    /// One path for what gates find, during the bake (`baking`) or at the gate.
    async fn on_gate_found(
        &mut self,
        plan_id: &str,
        wave: usize,
        found: Result<String, String>,
        baking: bool,
    ) {
        self.gates.remove(&(plan_id.to_string(), wave));
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        if run.state != PlanState::Running {
            return;
        }
        let changes = if baking {
            run.bake_probe(wave, found.clone())
        } else {
            run.gate_result(wave, found.clone())
        };
        let Some(changes) = changes else {
            return;
        };
        let message = changes
            .first()
            .map(|c| c.message.clone())
            .unwrap_or_default();
        if changes.iter().any(|c| c.state == WaveState::Waiting) {
            run.message = message.clone();
        }
        // A breach while the plan is watched after its last wave rolls it back.
        let on_failure = if wave >= run.spec.rollout.waves.len() {
            OnGateFailure::Rollback
        } else {
            run.spec.rollout.on_gate_failure
        };
        self.record_waves(plan_id, changes);
        match (found.is_err(), on_failure) {
            (false, _) if baking => return,
            (false, _) => self.write_state(plan_id),
            (true, OnGateFailure::Halt) => {
                warn!(plan = %plan_id, "{message}");
                self.stop_plan(plan_id, format!("{message}; halted: what applied stays"));
            }
            (true, OnGateFailure::Rollback) => {
                warn!(plan = %plan_id, "{message}");
                self.undo_plan(plan_id, format!("{message}{}", crate::plan::UNDOING));
            }
        }
        self.drive(plan_id).await;
    }
}

/// Every check on every target, shard by shard; Ok with a summary, or the first breach.
async fn run_checks(
    fleet: &Arc<Fleet>,
    plan_id: &str,
    checks: &[Check],
    by_shard: &BTreeMap<String, Vec<String>>,
) -> Result<String, String> {
    let mut seen = 0usize;
    let mut highest: Vec<Option<f64>> = vec![None; checks.len()];
    for (i, check) in checks.iter().enumerate() {
        for (shard, tenants) in by_shard {
            let req = pb::CheckRequest {
                request_id: 0,
                plan_id: plan_id.to_string(),
                sql: check.sql.clone(),
                tenants: tenants.clone(),
                timeout_ms: 30_000,
            };
            let reply = fleet
                .check(shard, req, CHECK_TIMEOUT)
                .await
                .map_err(|e| format!("check `{}` could not run: {e}", check.name))?;
            for r in reply.results {
                let target = if r.tenant.is_empty() {
                    shard.clone()
                } else {
                    format!("{shard}/{}", r.tenant)
                };
                if !r.error.is_empty() {
                    return Err(format!(
                        "check `{}` failed on {target}: {} ({})",
                        check.name, r.error, check.sql
                    ));
                }
                check.judge(&r.value).map_err(|why| {
                    format!("check `{}` on {target} {why} ({})", check.name, check.sql)
                })?;
                if let Ok(v) = r.value.trim().parse::<f64>() {
                    highest[i] = Some(highest[i].map_or(v, |h: f64| h.max(v)));
                }
                seen += 1;
            }
        }
    }
    if checks.is_empty() {
        return Ok(String::new());
    }
    let parts: Vec<String> = checks
        .iter()
        .zip(&highest)
        .map(|(c, h)| match (c.max, h) {
            (Some(max), Some(h)) => format!("`{}` highest {h} of max {max}", c.name),
            _ => format!("`{}` true", c.name),
        })
        .collect();
    Ok(format!(
        "{} checks on {seen} results: {}",
        checks.len(),
        parts.join(", ")
    ))
}

impl Engine {
    /// Undoes the plan (a breach under `rollback`): every applied step, as all-or-nothing.
    pub(super) fn undo_plan(&mut self, plan_id: &str, message: String) {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        run.message = message;
        run.rollback_ends = PlanState::RolledBack;
        let updates = run.halt_pending();
        self.write(StoreOp::Steps {
            plan_id: plan_id.to_string(),
            updates,
        });
        self.halt_wave(plan_id);
        self.begin_rollback(plan_id);
        self.write_state(plan_id);
    }
}
