//! Waves in the engine: moving a plan's waves along (bakes end on the engine's tick),
//! storing where they are so that a new leader goes on from there, `plan promote` and
//! `plan halt`, and error budgets past their limit.
use flotilla_core::state::{PlanState, WaveState};
use flotilla_core::waves::OnBudgetExhausted;
use tracing::{info, warn};

use super::{Engine, HALTED_BY};
use crate::actor::Actor;
use crate::error::{Conflict, CoordinatorError, Refusal};
use crate::plan::waves::WaveChange;
use crate::store::{StoreOp, WaveRow, now_ms};

impl Engine {
    /// Moves the plan's waves along now; stores and logs what moved.
    pub(super) fn advance_waves(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        if run.state != PlanState::Running {
            return;
        }
        let changes = run.advance_waves(now_ms());
        if let Some(waiting) = changes.iter().rev().find(|c| c.state == WaveState::Waiting) {
            run.message = waiting.message.clone();
            self.write_state(plan_id);
        }
        self.record_waves(plan_id, changes);
        self.start_gate(plan_id);
        self.probe_bake(plan_id);
    }

    /// Stores the waves that moved (plans with waves only) and logs each move.
    pub(super) fn record_waves(&self, plan_id: &str, changes: Vec<WaveChange>) {
        let Some(run) = self.plans.get(plan_id) else {
            return;
        };
        if changes.is_empty() || run.spec.rollout.waves.is_empty() {
            return;
        }
        for c in &changes {
            info!(plan = %plan_id, wave = c.wave, state = c.state.as_str(), "{}", c.message);
        }
        let waves = changes
            .iter()
            .map(|c| WaveRow {
                idx: c.wave as i64,
                name: run.waves[c.wave].name.clone(),
                state: c.state,
                bake_until_ms: c.bake_until_ms,
                gate: run.waves[c.wave].gate.clone(),
            })
            .collect();
        self.write(StoreOp::Waves {
            plan_id: plan_id.to_string(),
            waves,
        });
    }

    /// The plan stopped (rollback, halt, stop, cancel): its wave in progress is halted.
    pub(super) fn halt_wave(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        let changes: Vec<WaveChange> = run.halt_wave().into_iter().collect();
        self.record_waves(plan_id, changes);
    }

    /// `plan promote`: the wave waiting at its manual gate passes and the next one starts.
    /// With `named` (`--wave`), only that wave's gate: a promote of a wave already past
    /// (sent again, a pipeline's retry) changes nothing.
    pub(super) fn promote(
        &mut self,
        plan_id: &str,
        named: Option<&str>,
        actor: &Actor,
    ) -> Result<(), CoordinatorError> {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return Err(Conflict::NotRunning {
                plan_id: plan_id.to_string(),
                action: "promote",
            }
            .into());
        };
        if let Some(named) = named {
            match run.wave_place(named) {
                None => {
                    let waves: Vec<&str> = run.waves.iter().map(|w| w.name.as_str()).collect();
                    return Err(CoordinatorError::InvalidRequest(format!(
                        "plan {plan_id} has no wave `{named}` (its waves: {})",
                        waves.join(", ")
                    )));
                }
                Some(std::cmp::Ordering::Less) => {
                    info!(plan = %plan_id, wave = named, "promote of a wave already past: nothing to do");
                    return Ok(());
                }
                Some(std::cmp::Ordering::Greater) => {
                    return Err(Conflict::NotAtGate {
                        plan_id: plan_id.to_string(),
                        now: format!(
                            "wave `{named}` has not started; {}",
                            run.current_wave()
                                .map(|w| format!("wave `{}` is {}", w.name, w.state.as_str()))
                                .unwrap_or_default()
                        ),
                    }
                    .into());
                }
                Some(std::cmp::Ordering::Equal) => {}
            }
        }
        let waiting = run
            .current_wave()
            .filter(|w| w.state == WaveState::Waiting)
            .map(|w| w.name.clone());
        let (Some(wave), PlanState::Running) = (waiting, run.state) else {
            return Err(Conflict::NotAtGate {
                plan_id: plan_id.to_string(),
                now: run
                    .current_wave()
                    .map(|w| format!("wave `{}` is {}", w.name, w.state.as_str()))
                    .unwrap_or_else(|| format!("it is {}", run.state)),
            }
            .into());
        };
        let changes = run.promote().expect("a wave waits");
        run.message = actor.explain(&format!("wave `{wave}` promoted by {}", actor.name));
        info!(plan = %plan_id, "{}", run.message);
        self.record_waves(plan_id, changes);
        self.write(actor.audit("promote", plan_id, &format!("wave {wave}")));
        self.write_state(plan_id);
        Ok(())
    }

    /// `plan halt`: no new step starts, what is in flight finishes, what applied stays; the
    /// plan ends halted.
    pub(super) fn halt(&mut self, plan_id: &str, actor: &Actor) -> Result<(), CoordinatorError> {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return Err(Conflict::NotRunning {
                plan_id: plan_id.to_string(),
                action: "halt",
            }
            .into());
        };
        if run.state != PlanState::Running {
            return Err(Conflict::NotHaltable {
                plan_id: plan_id.to_string(),
                state: run.state,
            }
            .into());
        }
        if run.spec.two_phase() {
            // Prepared transactions need a decision: stopping where it is would leave them
            // holding their locks. Cancel aborts them and undoes the plan.
            return Err(Refusal::AtomicHalt {
                plan_id: plan_id.to_string(),
            }
            .into());
        }
        let message = actor.explain(&format!("{HALTED_BY}{}", actor.name));
        self.stop_plan(plan_id, message);
        if let Some(run) = self.plans.get_mut(plan_id) {
            run.by_operator = true;
        }
        self.write(actor.audit("halt", plan_id, ""));
        Ok(())
    }

    /// Under `continue`: failures past an error budget halt the plan where it is, or undo
    /// it, as the plan says. Whether a budget was past its limit.
    pub(super) fn check_budget(&mut self, plan_id: &str) -> bool {
        let Some(run) = self.plans.get(plan_id) else {
            return false;
        };
        if run.state != PlanState::Running {
            return false;
        }
        let Some(why) = run.budget_exhausted() else {
            return false;
        };
        warn!(plan = %plan_id, "{why}");
        match run.spec.rollout.on_budget_exhausted {
            OnBudgetExhausted::Halt => {
                self.stop_plan(plan_id, format!("{why}; halted: what applied stays"));
            }
            OnBudgetExhausted::Rollback => {
                self.undo_plan(plan_id, format!("{why}{}", crate::plan::UNDOING));
            }
        }
        true
    }

    /// Stops the plan where it is, to end halted once nothing is in flight.
    pub(super) fn stop_plan(&mut self, plan_id: &str, message: String) {
        let run = self.plans.get_mut(plan_id).expect("present");
        run.message = message;
        run.rollback_ends = PlanState::Halted;
        run.state = PlanState::Stopping;
        let updates = run.halt_pending();
        self.write(StoreOp::Steps {
            plan_id: plan_id.to_string(),
            updates,
        });
        self.halt_wave(plan_id);
        self.halt_everywhere(plan_id);
        self.write_state(plan_id);
    }
}
