//! The agents attached to this leader: their connections, what is resent when one
//! comes back, and shards whose agent is gone past the grace.
use std::collections::BTreeSet;
use std::time::Instant;

use flotilla_core::pb;
use flotilla_core::pb::coordinator_message::Body;
use tracing::{info, warn};

use super::{Engine, outbound};
use crate::metrics;
use crate::plan::{PlanState, RollbackState};

pub(super) use outbound::AgentConn;

impl Engine {
    pub(super) async fn on_attached(
        &mut self,
        shard: String,
        conn: AgentConn,
        in_doubt: Option<Vec<String>>,
        epoch: u64,
    ) {
        if !self.leading || epoch != self.epoch {
            // The session checked leadership before it attached, and awaited in between
            // (the control store): leadership changed meanwhile, and the follower's "let
            // every agent go" may have run before the attach. Kept in the fleet registry,
            // the stream would stay open with no engine behind it: the agent waits for work
            // forever (seen with 64 agents on a loaded machine: a term lost and won again,
            // 20 shards stalled). Let go, the stream ends and the agent finds the leader.
            if self.fleet.detach(&shard, conn.conn_id) {
                info!(shard = %shard, session_epoch = epoch, "agent attached under another term; letting it go to find the leader");
            }
            return;
        }
        match in_doubt {
            Some(gids) => {
                self.in_doubt_unknown.remove(&shard);
                self.in_doubt.insert(shard.clone(), gids);
            }
            None => {
                warn!(shard = %shard, "the agent could not list its shard's prepared transactions: its atomic units are not settled until it attaches again with them");
                self.in_doubt_unknown.insert(shard.clone());
                self.in_doubt.insert(shard.clone(), Vec::new());
            }
        }
        self.agents.insert(shard.clone(), conn);
        self.agent_seen(&shard, true);
        metrics::agents_connected(self.agents.len());
        self.forgotten_shard_back(&shard);
        let halts: Vec<String> = self
            .halt_on_attach
            .iter()
            .filter(|(_, shards)| shards.contains(&shard))
            .map(|(id, _)| id.clone())
            .collect();
        for id in halts {
            self.send_to(&shard, outbound::halt(&id));
        }
        let ids: Vec<String> = self.plans.keys().cloned().collect();
        for id in ids {
            self.resend_after_reconnect(&id, &shard);
            // (a plan rolling back asks the shard for its undo there, once it holds nothing
            // of the unit in doubt)
            self.drive(&id).await;
        }
    }

    pub(super) fn on_detached(&mut self, shard: &str, conn_id: u64) {
        if self.agents.get(shard).is_some_and(|a| a.conn_id == conn_id) {
            self.agents.remove(shard);
            self.agent_seen(shard, false);
            metrics::agents_connected(self.agents.len());
            let away: Vec<String> = self
                .plans
                .iter_mut()
                .filter_map(|(id, run)| run.agent_away(shard).then(|| id.clone()))
                .collect();
            for id in away {
                self.changed(&id);
            }
            info!(shard = %shard, "agent detached; its runs wait for it to return");
        }
    }

    /// Shards with runs in flight whose agent is neither attached nor holding a
    /// liveness key: after the grace, their runs fail under the plan's policy. Also while
    /// the plan stops or aborts: it ends (an abort: begins the rollback of what committed
    /// outside the unit) only once nothing is out, and runs out on an agent gone for good
    /// held it there for good, its locks with it. And an aborting unit's shard holding
    /// transactions of it prepared, its agent gone past the grace: the others do not wait
    /// for it (`PlanRun::leave_abort_to_etcd`); it is told the abort when its agent is back.
    pub(super) async fn check_lost_agents(&mut self) {
        let now = Instant::now();
        let gone = |s: &String| !self.agents.contains_key(s) && !self.live.contains(s);
        let mut lost: Vec<(String, String)> = Vec::new();
        let mut left: Vec<(String, String)> = Vec::new();
        let mut watched = BTreeSet::new();
        for (id, run) in &self.plans {
            if !matches!(
                run.state,
                PlanState::Running | PlanState::Stopping | PlanState::Aborting
            ) {
                continue;
            }
            let aborted = run.state == PlanState::Aborting
                && run.decision == Some(crate::coordination::Decision::Abort);
            for (shard, sr) in &run.shards {
                // (a plan a new leader took over knows what a shard holds only from its
                // agent's list: one away may hold the unit's transactions still)
                let in_doubt = aborted
                    && !sr.resolved
                    && !sr.left
                    && (!sr.prepared.is_empty() || run.shard_has_open(shard) || run.inherited);
                // Counted from when it went while its targets waited prepared for the unit's
                // decision (nothing out there): left as soon as an abort needs it, not a
                // grace after the abort. (Not any shard gone: one away between waves would
                // have its first run failed at once, with no grace.)
                let is_gone = gone(shard);
                if is_gone && (!sr.prepared.is_empty() || in_doubt) {
                    self.lost_since.entry(shard.clone()).or_insert(now);
                    watched.insert(shard.clone());
                }
                if (sr.outstanding.is_empty() && !in_doubt) || self.agents.contains_key(shard) {
                    continue;
                }
                if !is_gone {
                    // Cut off from this coordinator but alive (its liveness key):
                    // its runs wait for it rather than fail, so nothing is done twice.
                    let since = *self.detached_alive.entry(shard.clone()).or_insert(now);
                    if now.duration_since(since) >= self.agent_grace
                        && self.waited.insert(shard.clone())
                    {
                        info!(plan = %id, shard = %shard, "agent detached past the grace but alive in etcd: its runs wait for it");
                    }
                    watched.insert(shard.clone());
                    continue;
                }
                watched.insert(shard.clone());
                let since = *self.lost_since.entry(shard.clone()).or_insert(now);
                if now.duration_since(since) < self.agent_grace {
                    continue;
                }
                if sr.outstanding.is_empty() {
                    left.push((id.clone(), shard.clone()));
                } else {
                    lost.push((id.clone(), shard.clone()));
                }
            }
        }
        self.lost_since.retain(|s, _| watched.contains(s));
        self.detached_alive.retain(|s, _| watched.contains(s));
        self.waited.retain(|s| watched.contains(s));
        for (plan_id, shard) in lost {
            let reason = format!(
                "the agent of shard {shard} is lost (no stream and no liveness key for {}s)",
                self.agent_grace.as_secs()
            );
            warn!(plan = %plan_id, shard = %shard, "{reason}");
            let Some(run) = self.plans.get_mut(&plan_id) else {
                continue;
            };
            let (updates, failed) = run.fail_lost_shard(&shard, &reason);
            self.record(&plan_id, updates, failed).await;
        }
        for (plan_id, shard) in left {
            let why = format!(
                "{} (no stream and no liveness key for {}s): its prepared transactions are \
                 rolled back when it is back (it is told the abort); the other shards go on \
                 with the rollback",
                crate::plan::left_prefix(&shard),
                self.agent_grace.as_secs()
            );
            warn!(plan = %plan_id, shard = %shard, "{why}");
            let Some(run) = self.plans.get_mut(&plan_id) else {
                continue;
            };
            let updates = run.leave_abort_to_etcd(&shard, &why);
            self.record(&plan_id, updates, false).await;
        }
    }

    /// After an agent (re)attaches: its plan definitions and outstanding runs
    /// are sent again; the agent's journal turns repeats into "already applied".
    fn resend_after_reconnect(&mut self, plan_id: &str, shard: &str) {
        // The shard's lanes as of now, its agent back: while it was away a hand-out gave it
        // one (what an absent agent can take), and the runs resent with that went one at a
        // time (an atomic unit's other targets holding their prepared locks meanwhile).
        let agents = &self.agents;
        if let Some(run) = self.plans.get_mut(plan_id) {
            run.rebalance_lanes(&|s: &str| agents.get(s).map(|a| a.max_lanes).unwrap_or(1));
        }
        let Some(agent) = self.agents.get_mut(shard) else {
            return;
        };
        let conn_id = agent.conn_id;
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        // with whether it is paused there (a new stream, or agent process, hears it again)
        let paused = run.is_paused(shard);
        let Some(sr) = run.shards.get_mut(shard) else {
            return;
        };
        if !agent.send_definition(sr, &run.definition, paused) {
            return;
        }
        let Some(sr) = run.shards.get_mut(shard) else {
            return;
        };
        if run.state == PlanState::RollingBack {
            if matches!(sr.rollback, RollbackState::Asked { conn_id: c, .. } if c != conn_id) {
                sr.rollback = RollbackState::NotAsked;
            }
            // (its undo is asked by the drive, once it holds nothing of the unit in doubt)
            return;
        }
        let runs: Vec<pb::Run> = sr
            .outstanding
            .iter()
            .map(|(&run_id, steps)| {
                let t = &run.targets[run.steps[steps[0]].target];
                pb::Run {
                    // The same gid as the first send: a run of an atomic plan must end in
                    // PREPARE again (never COMMIT), and the agent answers PREPARED for a gid
                    // already prepared (its vote lost with the old stream or process).
                    prepare_gid: sr.gids.get(&run_id).cloned().unwrap_or_default(),
                    run_id,
                    tenant: t.tenant.clone(),
                    migrations: steps
                        .iter()
                        .map(|&s| run.spec.migrations[run.steps[s].migration].id.to_string())
                        .collect(),
                    fused: steps.len() > 1,
                }
            })
            .collect();
        if !runs.is_empty() {
            info!(plan = %plan_id, shard = %shard, runs = runs.len(), "resending runs after reconnect");
            agent.send(Body::Assign(pb::Assign {
                plan_id: plan_id.to_string(),
                epoch: self.epoch,
                lanes: sr.lanes.max(1),
                runs,
            }));
        }
        // The plan stopped (a halt, a cancel, a failure) or this shard was cancelled while
        // the agent was away: the halt it missed follows, or what it still holds queued
        // runs after the stop. Safe after the resend: the agent answers a copy of a run it
        // still holds from that run (never queues it twice), so the halt reaches the runs
        // themselves (before that claim, a copy answered not run while the first still
        // executed, and the plan ended with it running: why this halt was once taken out).
        if matches!(run.state, PlanState::Stopping | PlanState::Aborting)
            || run.cancelled.contains(shard)
        {
            agent.send(outbound::halt(plan_id));
        }
    }
}
