//! The failure policy: what a failed step does to its plan (all-or-nothing undoes
//! everything, an atomic unit aborts, `stop` halts, `continue` goes on), and the
//! rollback that undoes applied steps shard by shard.
use flotilla_core::pb::coordinator_message::Body;
use flotilla_core::{FailurePolicy, pb};
use tracing::warn;

use super::{Engine, outbound};
use crate::plan::{PlanState, RollbackState};
use crate::store::StoreOp;

impl Engine {
    pub(super) fn on_failure(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        if run.state != PlanState::Running {
            return;
        }
        let first = run.failures.first().cloned();
        let what = first
            .as_ref()
            .map(|f| {
                let t = f.target.clone().unwrap_or_default();
                let e = f.error.clone().unwrap_or_default();
                let target = if t.tenant.is_empty() {
                    t.shard
                } else {
                    format!("{}/{}", t.shard, t.tenant)
                };
                format!(
                    "step {} failed on {target}{}: {}",
                    f.migration_id,
                    if e.sqlstate.is_empty() {
                        String::new()
                    } else {
                        format!(" (SQLSTATE {})", e.sqlstate)
                    },
                    e.message
                )
            })
            .unwrap_or_else(|| "a step failed".into());
        warn!(plan = %plan_id, "{what}");
        match run.policy() {
            FailurePolicy::AllOrNothing if run.spec.two_phase() && run.current_unit().is_some() => {
                // (a group-atomic plan's groups that committed before are undone by their
                // down SQL: its message said no target commits, and the committed group was
                // found rolled back)
                run.message = match run.current_unit() {
                    Some(g) if !run.spec.atomic && run.units_behind() > 0 => format!(
                        "{what}{}{}{}",
                        crate::plan::ABORTING_GROUP.0,
                        g + 1,
                        crate::plan::ABORTING_GROUP.1
                    ),
                    _ => format!("{what}{}", crate::plan::ABORTING),
                };
                run.rollback_ends = PlanState::RolledBack;
                run.state = PlanState::Aborting;
                let updates = run.halt_pending();
                self.write(StoreOp::Steps {
                    plan_id: plan_id.to_string(),
                    updates,
                });
                self.halt_everywhere(plan_id);
            }
            FailurePolicy::AllOrNothing => {
                run.message = format!("{what}{}", crate::plan::UNDOING);
                run.rollback_ends = PlanState::RolledBack;
                let updates = run.halt_pending();
                self.write(StoreOp::Steps {
                    plan_id: plan_id.to_string(),
                    updates,
                });
                self.begin_rollback(plan_id);
            }
            FailurePolicy::Stop => {
                run.message = format!("{what}; the plan stopped, applied steps stay");
                run.state = PlanState::Stopping;
                let updates = run.halt_pending();
                self.write(StoreOp::Steps {
                    plan_id: plan_id.to_string(),
                    updates,
                });
                self.halt_everywhere(plan_id);
            }
            FailurePolicy::Continue => {
                if run.message.is_empty() || run.message_is_retry_note() {
                    run.message = format!("{what}{}", crate::plan::GOING_ON);
                }
            }
        }
        self.write_state(plan_id);
        // Under `continue` the plan goes on while failures stay within the error budget.
        self.check_budget(plan_id);
    }

    /// Tells every attached shard of the plan to stop at its next boundary.
    pub(super) fn halt_everywhere(&mut self, plan_id: &str) {
        self.halt_wave(plan_id);
        let Some(run) = self.plans.get(plan_id) else {
            return;
        };
        let shards: Vec<String> = run.shards.keys().cloned().collect();
        for shard in shards {
            self.send_to(&shard, outbound::halt(plan_id));
        }
    }

    pub(super) fn begin_rollback(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        run.state = PlanState::RollingBack;
        for (name, sr) in run.shards.iter_mut() {
            sr.rollback = if run.undone_before.contains(name) {
                RollbackState::Done
            } else {
                RollbackState::NotAsked
            };
        }
        self.halt_wave(plan_id);
        let Some(run) = self.plans.get(plan_id) else {
            return;
        };
        // Nothing is asked of a plan's shards before it holds their locks (a new leader's
        // revived rollback: asked before, an undo ran on a shard another plan had locked
        // meanwhile; the locks taken, the drive asks them).
        let locked = run.locked;
        let shards: Vec<String> = run.shards.keys().cloned().collect();
        for shard in shards {
            // (one holding transactions of the unit in doubt is told the decision first,
            // on the tick: `resolve_before_undo`)
            if locked && !self.in_doubt_before_undo(plan_id, &shard) {
                self.ask_rollback(plan_id, &shard);
            }
        }
        // stored rolling back: a new leader resumes it so (stored `aborting`, it re-took
        // every shard's lock, those let go of since too, and aborted again)
        self.write_state(plan_id);
    }

    /// Asks a shard's agent to undo what the plan applied there (if it is attached and
    /// has not answered for good yet).
    pub(super) fn ask_rollback(&mut self, plan_id: &str, shard: &str) {
        let Some(agent) = self.agents.get_mut(shard) else {
            return;
        };
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        let n_shards = run.shards.len().max(1) as u32;
        let Some(sr) = run.shards.get_mut(shard) else {
            return;
        };
        if sr.rollback == RollbackState::Done {
            return;
        }
        agent.send_definition(sr, &run.definition, false);
        let lanes = (run.spec.max_parallel / n_shards).clamp(1, agent.max_lanes.max(1));
        // from the run ids' sequence: unique in this term, and across terms (the epoch
        // in its high bits), so no earlier request's reply matches it
        let request = self.next_run_id;
        self.next_run_id += 1;
        let sent = agent.send(Body::Rollback(pb::RollbackRequest {
            plan_id: plan_id.to_string(),
            epoch: self.epoch,
            lanes,
            request,
        }));
        if sent {
            sr.rollback = RollbackState::Asked {
                conn_id: agent.conn_id,
                request,
            };
        }
    }
}
