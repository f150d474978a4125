//! What agents answer: run results, rollback and resolve replies, data progress. Each is
//! folded into its plan (the pure [`crate::plan`] methods), stored, and the plan driven on.
use flotilla_core::pb;
use flotilla_core::state::StepState;
use tracing::{debug, info};

use super::Engine;
use crate::metrics;
use crate::plan::RollbackState;
use crate::store::{StepUpdate, StoreOp};

impl Engine {
    /// Stores what an answer changed, applies the failure policy if a step failed, and
    /// drives the plan on.
    pub(super) async fn record(&mut self, plan_id: &str, updates: Vec<StepUpdate>, failed: bool) {
        self.write(StoreOp::Steps {
            plan_id: plan_id.to_string(),
            updates,
        });
        if failed {
            self.on_failure(plan_id);
        }
        self.drive(plan_id).await;
    }

    pub(super) async fn on_results(&mut self, shard: &str, results: pb::RunResults) {
        let plan_id = results.plan_id.clone();
        let Some(run) = self.plans.get_mut(&plan_id) else {
            return;
        };
        let mut updates: Vec<StepUpdate> = Vec::new();
        let mut failed = false;
        let rollback_done = run
            .shards
            .get(shard)
            .is_some_and(|s| s.rollback == RollbackState::Done);
        if !rollback_done {
            for r in &results.runs {
                let (u, f) = run.apply_run_result(shard, r);
                updates.extend(u);
                failed |= f;
            }
        }
        for x in &updates {
            metrics::step_finished(shard, x.state, x.duration_ms);
            // Found by the same fields as the agent's line about the step.
            debug!(plan = %plan_id, step = %x.migration_id, shard = %x.shard,
                   tenant = %x.tenant, state = x.state.as_str(), ms = x.duration_ms,
                   "step result");
            if x.state == StepState::Applied {
                self.observe_step_time(x.duration_ms);
            }
        }
        self.record(&plan_id, updates, failed).await;
    }

    pub(super) async fn on_rollback_reply(&mut self, shard: &str, reply: pb::RollbackReply) {
        let plan_id = reply.plan_id.clone();
        let Some(run) = self.plans.get_mut(&plan_id) else {
            return;
        };
        let updates = run.apply_rollback_reply(shard, &reply);
        // This shard is done with the plan (its agent undid all of it) while others are
        // not: its lock goes now, not when the slowest shard's agent (or a lost one, back
        // some day) is done. (An undo that failed keeps it: the operator looks there.)
        let let_go = reply.complete
            && run.state == flotilla_core::state::PlanState::RollingBack
            && run.rollback_errors == 0
            && run
                .shards
                .get(shard)
                .is_some_and(|s| s.rollback == RollbackState::Done)
            && run
                .shards
                .values()
                .any(|s| s.rollback != RollbackState::Done);
        for x in &updates {
            metrics::step_outcome(shard, x.state);
        }
        info!(plan = %plan_id, shard = %shard, undone = reply.steps.len(), complete = reply.complete, "rollback reply");
        if let_go {
            self.release_shard_lock(&plan_id, shard);
        }
        self.record(&plan_id, updates, false).await;
    }

    pub(super) async fn on_resolve_reply(&mut self, shard: &str, reply: pb::ResolveReply) {
        let plan_id = reply.plan_id.clone();
        let Some(run) = self.plans.get_mut(&plan_id) else {
            return;
        };
        let updates = run.apply_resolve_reply(shard, &reply);
        for x in &updates {
            metrics::step_outcome(shard, x.state);
        }
        info!(plan = %plan_id, shard = %shard, commit = reply.commit,
              resolved = reply.resolved.len(), failed = reply.failed.len(), "prepared transactions resolved");
        // (a shard of a plan rolling back, resolved now, is asked for its undo by the drive)
        self.record(&plan_id, updates, false).await;
    }

    pub(super) fn on_progress(&mut self, shard: &str, data: Vec<pb::DataProgress>) {
        let mut touched = std::collections::BTreeSet::new();
        for mut p in data {
            let Some(run) = self.plans.get_mut(&p.plan_id) else {
                continue;
            };
            // the stream says which shard; the message cannot claim another
            p.shard = shard.to_string();
            touched.insert(p.plan_id.clone());
            run.record_progress(p);
        }
        if !touched.is_empty() {
            self.publish_metrics();
        }
        for plan_id in touched {
            self.changed(&plan_id);
        }
    }
}
