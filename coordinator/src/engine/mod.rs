//! The engine: the one task that owns every plan in motion. Agent results,
//! operator commands and connection changes arrive as events; it mutates plan
//! state, sends work to agents, and hands writes to the store writer.
pub mod plan_run;
pub mod status;

use std::collections::HashMap;

use flotilla_proto::pb;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::error::CoordinatorError;
use crate::metrics;
use crate::store::StoreOp;
use plan_run::{PlanRun, PlanState, RollbackState, ShardRun};

pub type AgentTx = mpsc::Sender<pb::CoordinatorMessage>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Cancel,
    Rollback,
}

pub enum Event {
    Attached {
        shard: String,
        conn_id: u64,
        tx: AgentTx,
        max_lanes: u32,
        /// Flotilla's prepared transactions the agent could not resolve alone.
        in_doubt: Vec<String>,
    },
    ResolveReply {
        shard: String,
        reply: pb::ResolveReply,
    },
    Detached {
        shard: String,
        conn_id: u64,
    },
    Results {
        shard: String,
        results: pb::RunResults,
    },
    RollbackReply {
        shard: String,
        reply: pb::RollbackReply,
    },
    Start {
        run: Box<PlanRun>,
        done: oneshot::Sender<pb::PlanStatus>,
    },
    Command {
        plan_id: String,
        kind: CommandKind,
        actor: String,
        reason: String,
        /// A finished plan to bring back for a rollback (loaded by the caller).
        revive: Option<Box<PlanRun>>,
        reply: oneshot::Sender<Result<pb::PlanStatus, CoordinatorError>>,
    },
    /// Cancels one shard of a running plan (policies stop and continue).
    CancelShard {
        plan_id: String,
        shard: String,
        actor: String,
        reason: String,
        reply: oneshot::Sender<Result<pb::PlanStatus, CoordinatorError>>,
    },
    Status {
        plan_id: String,
        reply: oneshot::Sender<Option<pb::PlanStatus>>,
    },
    /// This coordinator leads under `epoch`: plans are rebuilt and continued by the caller.
    Lead {
        epoch: u64,
    },
    /// Leadership is lost: stop scheduling and deciding at once.
    Follow,
    LocksTaken {
        plan_id: String,
    },
    LocksWaiting {
        plan_id: String,
        message: String,
    },
    /// Shards whose agents hold a liveness key (etcd) or are attached (embedded).
    LiveAgents(std::collections::BTreeSet<String>),
    /// Data changes' progress, from an agent's heartbeat.
    Progress {
        shard: String,
        data: Vec<pb::DataProgress>,
    },
    /// Pause or resume a plan (`shard` None) or one shard of it.
    Pause {
        plan_id: String,
        shard: Option<String>,
        paused: bool,
        actor: String,
        reason: String,
        reply: oneshot::Sender<Result<pb::PlanStatus, CoordinatorError>>,
    },
    Tick,
}

struct AgentConn {
    conn_id: u64,
    tx: AgentTx,
    max_lanes: u32,
}

pub struct Engine {
    epoch: u64,
    leading: bool,
    coordination: std::sync::Arc<dyn crate::coordination::Coordination>,
    live: std::collections::BTreeSet<String>,
    lost_since: HashMap<String, std::time::Instant>,
    agent_grace: std::time::Duration,
    in_doubt: HashMap<String, Vec<String>>,
    detached_alive: HashMap<String, std::time::Instant>,
    waited: std::collections::BTreeSet<String>,
    store: mpsc::UnboundedSender<StoreOp>,
    agents: HashMap<String, AgentConn>,
    plans: HashMap<String, PlanRun>,
    next_run_id: u64,
    changes: broadcast::Sender<(String, bool)>,
}

impl Engine {
    pub fn new(
        coordination: std::sync::Arc<dyn crate::coordination::Coordination>,
        agent_grace: std::time::Duration,
        store: mpsc::UnboundedSender<StoreOp>,
        changes: broadcast::Sender<(String, bool)>,
    ) -> Engine {
        // Leading from the first moment when the backend says so (the embedded one
        // always does), so a submit can never race the first Lead event.
        let (epoch, leading) = match coordination.leadership().borrow().epoch() {
            Some(e) => (e, true),
            None => (0, false),
        };
        Engine {
            epoch,
            leading,
            coordination,
            live: Default::default(),
            lost_since: HashMap::new(),
            agent_grace,
            in_doubt: HashMap::new(),
            detached_alive: HashMap::new(),
            waited: Default::default(),
            store,
            agents: HashMap::new(),
            plans: HashMap::new(),
            // Run ids are unique across coordinator epochs: after a restart, results
            // of the old coordinator's runs (finished, or fenced, while it was gone)
            // must not be taken for the new one's runs.
            next_run_id: (epoch << 32) + 1,
            changes,
        }
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        while let Some(event) = events.recv().await {
            self.handle(event).await;
        }
        debug!("engine stopped");
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Attached {
                shard,
                conn_id,
                tx,
                max_lanes,
                in_doubt,
            } => {
                if !self.leading {
                    return;
                }
                self.in_doubt.insert(shard.clone(), in_doubt);
                self.agents.insert(
                    shard.clone(),
                    AgentConn {
                        conn_id,
                        tx,
                        max_lanes,
                    },
                );
                metrics::agents_connected(self.agents.len());
                let ids: Vec<String> = self.plans.keys().cloned().collect();
                for id in ids {
                    self.resend_after_reconnect(&id, &shard);
                    self.drive(&id).await;
                }
            }
            Event::Detached { shard, conn_id } => {
                if self
                    .agents
                    .get(&shard)
                    .is_some_and(|a| a.conn_id == conn_id)
                {
                    self.agents.remove(&shard);
                    metrics::agents_connected(self.agents.len());
                    info!(shard = %shard, "agent detached; its runs wait for it to return");
                }
            }
            Event::Results { shard, results } => {
                let plan_id = results.plan_id.clone();
                let Some(run) = self.plans.get_mut(&plan_id) else {
                    return;
                };
                let mut updates = Vec::new();
                let mut failed = false;
                let rollback_done = run
                    .shards
                    .get(&shard)
                    .is_some_and(|s| s.rollback == RollbackState::Done);
                if !rollback_done {
                    for r in &results.runs {
                        let (u, f) = run.apply_run_result(&shard, r);
                        for x in &u {
                            metrics::step_finished(&x.state, x.duration_ms);
                        }
                        updates.extend(u);
                        failed |= f;
                    }
                }
                self.write(StoreOp::Steps {
                    plan_id: plan_id.clone(),
                    updates,
                });
                if failed {
                    self.on_failure(&plan_id);
                }
                self.drive(&plan_id).await;
            }
            Event::RollbackReply { shard, reply } => {
                let plan_id = reply.plan_id.clone();
                let Some(run) = self.plans.get_mut(&plan_id) else {
                    return;
                };
                let updates = run.apply_rollback_reply(&shard, &reply);
                info!(plan = %plan_id, shard = %shard, undone = reply.steps.len(), complete = reply.complete, "rollback reply");
                self.write(StoreOp::Steps {
                    plan_id: plan_id.clone(),
                    updates,
                });
                self.drive(&plan_id).await;
            }
            Event::Start { run, done } => {
                if !self.leading {
                    return;
                }
                let id = run.id.clone();
                metrics::plan_started();
                self.plans.insert(id.clone(), *run);
                self.drive(&id).await;
                let status = self.status_of(&id);
                let _ = done.send(status.unwrap_or_default());
            }
            Event::CancelShard {
                plan_id,
                shard,
                actor,
                reason,
                reply,
            } => {
                let result = self.cancel_shard(&plan_id, &shard, &actor, &reason);
                if result.is_ok() {
                    self.drive(&plan_id).await;
                }
                let _ = reply.send(result.map(|_| self.status_of(&plan_id).unwrap_or_default()));
            }
            Event::Command {
                plan_id,
                kind,
                actor,
                reason,
                revive,
                reply,
            } => {
                let result = self.command(&plan_id, kind, &actor, &reason, revive);
                let ok = result.is_ok();
                if ok {
                    self.drive(&plan_id).await;
                }
                let _ = reply.send(result.map(|_| self.status_of(&plan_id).unwrap_or_default()));
            }
            Event::Status { plan_id, reply } => {
                let _ = reply.send(self.status_of(&plan_id));
            }
            Event::Progress { shard, data } => {
                let mut touched = std::collections::BTreeSet::new();
                for mut p in data {
                    let Some(run) = self.plans.get_mut(&p.plan_id) else {
                        continue;
                    };
                    // the stream says which shard; the message cannot claim another
                    p.shard = shard.clone();
                    touched.insert(p.plan_id.clone());
                    run.record_progress(p);
                }
                for plan_id in touched {
                    if let Some(run) = self.plans.get(&plan_id) {
                        metrics::data_progress(run);
                    }
                    let _ = self.changes.send((plan_id, false));
                }
            }
            Event::Pause {
                plan_id,
                shard,
                paused,
                actor,
                reason,
                reply,
            } => {
                let result = self.pause(&plan_id, shard.as_deref(), paused, &actor, &reason);
                if result.is_ok() {
                    self.drive(&plan_id).await;
                }
                let _ = reply.send(result.map(|_| self.status_of(&plan_id).unwrap_or_default()));
            }
            Event::Lead { epoch } => {
                if self.leading && self.epoch == epoch {
                    return;
                }
                info!(epoch, "leading: scheduling and deciding");
                self.epoch = epoch;
                self.leading = true;
                // Runs of an earlier term may still come back; their ids carry
                // the old epoch, so they never match this term's runs.
                self.next_run_id = (epoch << 32) + 1;
                self.plans.clear();
            }
            Event::Follow => {
                if self.leading {
                    warn!(
                        epoch = self.epoch,
                        "leadership lost: stopped scheduling and deciding"
                    );
                }
                self.leading = false;
                // Dropping the plans and the agent streams stops everything at
                // once; agents find the new leader, which rebuilds from the store
                // and the journals.
                self.plans.clear();
                self.agents.clear();
                metrics::agents_connected(0);
            }
            Event::LocksTaken { plan_id } => {
                if let Some(run) = self.plans.get_mut(&plan_id) {
                    run.locked = true;
                    run.lock_wait = None;
                    info!(plan = %plan_id, "shard locks taken");
                }
                self.drive(&plan_id).await;
            }
            Event::LocksWaiting { plan_id, message } => {
                if let Some(run) = self.plans.get_mut(&plan_id) {
                    run.lock_wait = Some(message);
                }
                let _ = self.changes.send((plan_id, false));
            }
            Event::LiveAgents(live) => {
                self.live = live;
            }
            Event::Tick => {
                self.check_lost_agents().await;
                // Decisions that could not be written (etcd away) are retried.
                let waiting: Vec<String> = self
                    .plans
                    .iter()
                    .filter(|(_, r)| {
                        matches!(r.state, PlanState::Committing | PlanState::Aborting)
                            || r.ready_to_commit()
                            || r.unit_unverified
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in waiting {
                    self.drive(&id).await;
                }
            }
            Event::ResolveReply { shard, reply } => {
                let plan_id = reply.plan_id.clone();
                let Some(run) = self.plans.get_mut(&plan_id) else {
                    return;
                };
                let updates = run.apply_resolve_reply(&shard, &reply);
                info!(plan = %plan_id, shard = %shard, commit = reply.commit,
                      resolved = reply.resolved.len(), failed = reply.failed.len(), "prepared transactions resolved");
                self.write(StoreOp::Steps {
                    plan_id: plan_id.clone(),
                    updates,
                });
                self.drive(&plan_id).await;
            }
        }
    }

    /// Shards with runs in flight whose agent is neither attached nor holding a
    /// liveness key: after the grace, their runs fail under the plan's policy.
    async fn check_lost_agents(&mut self) {
        let now = std::time::Instant::now();
        let gone = |s: &String| !self.agents.contains_key(s) && !self.live.contains(s);
        let mut lost: Vec<(String, String)> = Vec::new();
        let mut watched = std::collections::BTreeSet::new();
        for (id, run) in &self.plans {
            if run.state != PlanState::Running {
                continue;
            }
            for (shard, sr) in &run.shards {
                if sr.outstanding.is_empty() || self.agents.contains_key(shard) {
                    continue;
                }
                if !gone(shard) {
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
                if now.duration_since(since) >= self.agent_grace {
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
            self.write(StoreOp::Steps {
                plan_id: plan_id.clone(),
                updates,
            });
            if failed {
                self.on_failure(&plan_id);
            }
            self.drive(&plan_id).await;
        }
    }

    fn write(&self, op: StoreOp) {
        if let StoreOp::Steps { updates, .. } = &op
            && updates.is_empty()
        {
            return;
        }
        let _ = self.store.send(op);
    }

    fn status_of(&self, plan_id: &str) -> Option<pb::PlanStatus> {
        let run = self.plans.get(plan_id)?;
        let waiting: Vec<String> = run
            .shards
            .iter()
            .filter(|(shard, sr)| {
                !self.agents.contains_key(*shard)
                    && (!sr.outstanding.is_empty()
                        || (run.state == PlanState::RollingBack
                            && sr.rollback != RollbackState::Done))
            })
            .map(|(s, _)| s.clone())
            .collect();
        Some(status::from_run(run, waiting))
    }

    /// Pauses or resumes a plan or one shard of it: the shard's agent stops its data changes
    /// at their next batch boundary, and no new run goes there until it is resumed.
    fn pause(
        &mut self,
        plan_id: &str,
        shard: Option<&str>,
        paused: bool,
        actor: &str,
        reason: &str,
    ) -> Result<(), CoordinatorError> {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return Err(CoordinatorError::Conflict(format!(
                "plan {plan_id} is not running; nothing to {}",
                if paused { "pause" } else { "resume" }
            )));
        };
        if let Some(s) = shard
            && !run.shards.contains_key(s)
        {
            return Err(CoordinatorError::Rejected(format!(
                "plan {plan_id} has no target on shard `{s}` (its shards: {})",
                run.shards.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        if run.state.is_terminal() {
            return Err(CoordinatorError::Conflict(format!(
                "plan {plan_id} already ended {}",
                run.state.as_str()
            )));
        }
        let key = shard.unwrap_or(plan_run::ALL_SHARDS).to_string();
        if paused {
            run.paused.insert(key);
        } else if shard.is_none() {
            // resuming the plan resumes every shard of it
            run.paused.clear();
        } else {
            run.paused.remove(&key);
        }
        let shards: Vec<String> = match shard {
            Some(s) => vec![s.to_string()],
            None => run.shards.keys().cloned().collect(),
        };
        let who = if actor.is_empty() { "operator" } else { actor };
        let what = format!(
            "{} {}by {who}{}",
            if paused { "paused" } else { "resumed" },
            shard.map(|s| format!("on {s} ")).unwrap_or_default(),
            if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            }
        );
        info!(plan = %plan_id, "{what}");
        self.write(StoreOp::Audit {
            actor: who.to_string(),
            action: if paused { "pause" } else { "resume" }.into(),
            plan_id: plan_id.to_string(),
            detail: format!(
                "{}{reason}",
                shard.map(|s| format!("shard {s}: ")).unwrap_or_default()
            ),
        });
        for s in shards {
            self.send_pause(plan_id, &s);
        }
        Ok(())
    }

    /// Tells a shard's agent whether the plan is paused there now.
    fn send_pause(&self, plan_id: &str, shard: &str) {
        let (Some(run), Some(agent)) = (self.plans.get(plan_id), self.agents.get(shard)) else {
            return;
        };
        let _ = agent
            .tx
            .try_send(pause_message(plan_id, run.is_paused(shard)));
    }

    fn command(
        &mut self,
        plan_id: &str,
        kind: CommandKind,
        actor: &str,
        reason: &str,
        revive: Option<Box<PlanRun>>,
    ) -> Result<(), CoordinatorError> {
        if !self.plans.contains_key(plan_id) {
            match (kind, revive) {
                (CommandKind::Rollback, Some(run)) => {
                    self.plans.insert(plan_id.to_string(), *run);
                }
                (CommandKind::Cancel, _) => {
                    return Err(CoordinatorError::Conflict(format!(
                        "plan {plan_id} is not running; nothing to cancel"
                    )));
                }
                _ => return Err(CoordinatorError::PlanNotFound(plan_id.to_string())),
            }
        }
        let run = self.plans.get_mut(plan_id).expect("present");
        let action = match kind {
            CommandKind::Cancel => "cancel",
            CommandKind::Rollback => "rollback",
        };
        match (kind, run.state) {
            (_, PlanState::RollingBack) => {
                return Err(CoordinatorError::Conflict(format!(
                    "plan {plan_id} is already rolling back"
                )));
            }
            (CommandKind::Cancel, s) if s.is_terminal() => {
                return Err(CoordinatorError::Conflict(format!(
                    "plan {plan_id} already ended {}; use `plan rollback` to undo it",
                    s.as_str()
                )));
            }
            _ => {}
        }
        let who = if actor.is_empty() { "operator" } else { actor };
        run.message = format!(
            "{action} requested by {who}{}",
            if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            }
        );
        let undo = kind == CommandKind::Rollback
            || run.policy() == flotilla_proto::FailurePolicy::AllOrNothing;
        run.rollback_ends = if kind == CommandKind::Cancel {
            PlanState::Cancelled
        } else {
            PlanState::RolledBack
        };
        let updates = run.halt_pending();
        let msg = run.message.clone();
        self.write(StoreOp::Steps {
            plan_id: plan_id.to_string(),
            updates,
        });
        self.write(StoreOp::Audit {
            actor: who.to_string(),
            action: action.into(),
            plan_id: plan_id.to_string(),
            detail: reason.to_string(),
        });
        let atomic_in_flight = {
            let run = &self.plans[plan_id];
            run.spec.two_phase()
                && run.current_unit().is_some()
                && matches!(run.state, PlanState::Running | PlanState::Committing)
                && run.decision.is_none()
        };
        if undo && atomic_in_flight {
            // Prepared transactions are aborted by decision, then the rest undone.
            let run = self.plans.get_mut(plan_id).expect("present");
            run.state = PlanState::Aborting;
            self.halt_everywhere(plan_id);
        } else if undo {
            self.begin_rollback(plan_id);
        } else {
            let run = self.plans.get_mut(plan_id).expect("present");
            run.state = PlanState::Stopping;
            self.halt_everywhere(plan_id);
            let run = self.plans.get_mut(plan_id).expect("present");
            if run.outstanding() == 0 {
                run.state = PlanState::Cancelled;
            }
        }
        let state = self.plans[plan_id].state.as_str().to_string();
        self.write(StoreOp::PlanState {
            plan_id: plan_id.to_string(),
            state,
            message: msg,
        });
        Ok(())
    }

    /// Cancels one shard of a running plan: its steps not started will not run, its data
    /// changes stop at their next batch boundary, the other shards go on; the plan ends
    /// cancelled. Refused under all-or-nothing, which cannot finish without the shard.
    fn cancel_shard(
        &mut self,
        plan_id: &str,
        shard: &str,
        actor: &str,
        reason: &str,
    ) -> Result<(), CoordinatorError> {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return Err(CoordinatorError::Conflict(format!(
                "plan {plan_id} is not running; nothing to cancel"
            )));
        };
        if run.state != PlanState::Running {
            return Err(CoordinatorError::Conflict(format!(
                "plan {plan_id} is {}; only a running plan's shard can be cancelled",
                run.state.as_str()
            )));
        }
        if !run.shards.contains_key(shard) {
            return Err(CoordinatorError::Rejected(format!(
                "plan {plan_id} has no step on shard {shard}"
            )));
        }
        if run.policy() == flotilla_proto::FailurePolicy::AllOrNothing || run.spec.two_phase() {
            return Err(CoordinatorError::Rejected(format!(
                "plan {plan_id} is all-or-nothing: it cannot finish without shard {shard}; \
                 cancel the whole plan (`flotilla plan cancel {plan_id}`), which undoes what it applied"
            )));
        }
        if run.cancelled.contains(shard) {
            return Err(CoordinatorError::Conflict(format!(
                "shard {shard} of plan {plan_id} is already cancelled"
            )));
        }
        let who = if actor.is_empty() { "operator" } else { actor };
        let said = format!(
            "shard {shard} cancelled by {who}{}",
            if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            }
        );
        run.message = if run.message.is_empty() {
            format!("{said}; other shards go on")
        } else {
            format!("{}; {said}", run.message)
        };
        let updates = run.halt_shard(shard);
        let (state, message) = (run.state.as_str().to_string(), run.message.clone());
        self.write(StoreOp::Steps {
            plan_id: plan_id.to_string(),
            updates,
        });
        self.write(StoreOp::Audit {
            actor: who.to_string(),
            action: "cancel".into(),
            plan_id: plan_id.to_string(),
            detail: format!(
                "shard {shard}{}",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            ),
        });
        self.write(StoreOp::PlanState {
            plan_id: plan_id.to_string(),
            state,
            message,
        });
        if let Some(a) = self.agents.get(shard) {
            let _ =
                a.tx.try_send(msg(pb::coordinator_message::Body::Halt(pb::Halt {
                    plan_id: plan_id.to_string(),
                })));
        }
        info!(plan = %plan_id, shard, "shard cancelled");
        Ok(())
    }

    fn on_failure(&mut self, plan_id: &str) {
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
            flotilla_proto::FailurePolicy::AllOrNothing
                if run.spec.two_phase() && run.current_unit().is_some() =>
            {
                run.message = format!("{what}; aborting: no target commits");
                run.rollback_ends = PlanState::RolledBack;
                run.state = PlanState::Aborting;
                let updates = run.halt_pending();
                self.write(StoreOp::Steps {
                    plan_id: plan_id.to_string(),
                    updates,
                });
                self.halt_everywhere(plan_id);
            }
            flotilla_proto::FailurePolicy::AllOrNothing => {
                run.message = format!("{what}; every applied step is being undone");
                run.rollback_ends = PlanState::RolledBack;
                let updates = run.halt_pending();
                self.write(StoreOp::Steps {
                    plan_id: plan_id.to_string(),
                    updates,
                });
                self.begin_rollback(plan_id);
            }
            flotilla_proto::FailurePolicy::Stop => {
                run.message = format!("{what}; the plan stopped, applied steps stay");
                run.state = PlanState::Stopping;
                let updates = run.halt_pending();
                self.write(StoreOp::Steps {
                    plan_id: plan_id.to_string(),
                    updates,
                });
                self.halt_everywhere(plan_id);
            }
            flotilla_proto::FailurePolicy::Continue => {
                if run.message.is_empty() {
                    run.message = format!("{what}; other targets go on");
                }
            }
        }
        let run = &self.plans[plan_id];
        self.write(StoreOp::PlanState {
            plan_id: plan_id.to_string(),
            state: run.state.as_str().into(),
            message: run.message.clone(),
        });
    }

    fn halt_everywhere(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get(plan_id) else {
            return;
        };
        for shard in run.shards.keys() {
            if let Some(a) = self.agents.get(shard) {
                let _ =
                    a.tx.try_send(msg(pb::coordinator_message::Body::Halt(pb::Halt {
                        plan_id: plan_id.to_string(),
                    })));
            }
        }
    }

    fn begin_rollback(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        run.state = PlanState::RollingBack;
        for sr in run.shards.values_mut() {
            sr.rollback = RollbackState::NotAsked;
        }
        let shards: Vec<String> = run.shards.keys().cloned().collect();
        for shard in shards {
            self.ask_rollback(plan_id, &shard);
        }
    }

    fn ask_rollback(&mut self, plan_id: &str, shard: &str) {
        let Some(agent) = self.agents.get(shard) else {
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
        send_definition(sr, &run.definition, agent);
        let lanes = (run.spec.max_parallel / n_shards).clamp(1, agent.max_lanes.max(1));
        let sent = agent
            .tx
            .try_send(msg(pb::coordinator_message::Body::Rollback(
                pb::RollbackRequest {
                    plan_id: plan_id.to_string(),
                    epoch: self.epoch,
                    lanes,
                },
            )));
        if sent.is_ok() {
            sr.rollback = RollbackState::Asked(agent.conn_id);
        }
    }

    /// After an agent (re)attaches: its plan definitions and outstanding runs
    /// are sent again; the agent's journal turns repeats into "already applied".
    fn resend_after_reconnect(&mut self, plan_id: &str, shard: &str) {
        let Some(agent) = self.agents.get(shard) else {
            return;
        };
        let conn_id = agent.conn_id;
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        let Some(sr) = run.shards.get_mut(shard) else {
            return;
        };
        if !send_definition(sr, &run.definition, agent) {
            return;
        }
        if run.is_paused(shard) {
            // a new stream (or agent process) hears the pause again
            let _ = agent.tx.try_send(pause_message(plan_id, true));
        }
        let Some(sr) = run.shards.get_mut(shard) else {
            return;
        };
        if run.state == PlanState::RollingBack {
            if matches!(sr.rollback, RollbackState::Asked(c) if c != conn_id) {
                sr.rollback = RollbackState::NotAsked;
            }
            self.ask_rollback(plan_id, shard);
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
            let _ = agent
                .tx
                .try_send(msg(pb::coordinator_message::Body::Assign(pb::Assign {
                    plan_id: plan_id.to_string(),
                    epoch: self.epoch,
                    lanes: sr.lanes.max(1),
                    runs,
                })));
        }
    }

    /// Hands out work, asks for rollbacks not asked yet, and ends the plan when done.
    async fn drive(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        // Nothing goes to agents before the plan holds its shard locks.
        if !self.leading || !run.locked {
            let _ = self.changes.send((plan_id.to_string(), false));
            return;
        }
        self.two_phase(plan_id).await;
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        if let Some(message) = run.advance_unit() {
            info!(plan = %plan_id, "{message}");
            let state = run.state.as_str().to_string();
            self.write(StoreOp::PlanState {
                plan_id: plan_id.to_string(),
                state,
                message,
            });
        }
        self.verify_unit(plan_id).await;
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        if run.state == PlanState::Running {
            let agents = &self.agents;
            let lanes_of = |shard: &str| agents.get(shard).map(|a| a.max_lanes).unwrap_or(1);
            run.rebalance_lanes(&lanes_of);
            let shards: Vec<String> = run.shards.keys().cloned().collect();
            for shard in shards {
                let Some(agent) = self.agents.get(&shard) else {
                    continue;
                };
                let sr = run.shards.get_mut(&shard).expect("shard");
                send_definition(sr, &run.definition, agent);
                let lanes = sr.lanes;
                let runs = run.next_runs(&shard, &mut self.next_run_id);
                if !runs.is_empty() {
                    let assign = pb::Assign {
                        plan_id: plan_id.to_string(),
                        epoch: self.epoch,
                        lanes,
                        runs,
                    };
                    // The channel is sized for bursts; a full one means the agent is
                    // gone or stuck, and its runs are resent when it comes back.
                    if let Err(e) = agent
                        .tx
                        .try_send(msg(pb::coordinator_message::Body::Assign(assign)))
                    {
                        warn!(shard = %shard, "cannot hand runs to agent: {e}");
                    }
                }
            }
        } else if run.state == PlanState::RollingBack {
            let shards: Vec<String> = run
                .shards
                .iter()
                .filter(|(_, sr)| sr.rollback == RollbackState::NotAsked)
                .map(|(s, _)| s.clone())
                .collect();
            for shard in shards {
                self.ask_rollback(plan_id, &shard);
            }
        }
        let run = self.plans.get_mut(plan_id).expect("present");
        if let Some(updates) = run.settle() {
            let state = run.state;
            let message = run.message.clone();
            let progress: Vec<pb::DataProgress> = run.progress.values().cloned().collect();
            info!(plan = %plan_id, state = state.as_str(), "{message}");
            metrics::plan_finished(state.as_str());
            self.write(StoreOp::Steps {
                plan_id: plan_id.to_string(),
                updates,
            });
            if !progress.is_empty() {
                // the status of a finished plan comes from the store: keep its figures
                self.write(StoreOp::DataProgress {
                    plan_id: plan_id.to_string(),
                    entries: progress,
                });
            }
            self.write(StoreOp::PlanState {
                plan_id: plan_id.to_string(),
                state: state.as_str().into(),
                message,
            });
            // Readers switch to the store once the plan leaves memory: make sure
            // the final state is there first.
            let (tx, rx) = oneshot::channel();
            let _ = self.store.send(StoreOp::Flush(tx));
            let _ = rx.await;
            self.plans.remove(plan_id);
            let (coordination, id, epoch) =
                (self.coordination.clone(), plan_id.to_string(), self.epoch);
            tokio::spawn(async move {
                // While this coordinator leads it keeps the plan's lease alive: a release
                // that failed once (an etcd member gone, say) is retried, or the locks
                // would outlive the plan. A deposed leader lets the lease expire.
                let mut attempt = 0u32;
                loop {
                    match coordination.release_shards(&id, epoch).await {
                        Ok(()) => return,
                        Err(crate::coordination::CoordinationError::NotLeader) => {
                            warn!(plan = %id, "not the leader any more: the shard locks expire with the plan's lease");
                            return;
                        }
                        Err(e) => {
                            let pause = std::time::Duration::from_millis(250 << attempt.min(4));
                            attempt += 1;
                            warn!(plan = %id, "releasing shard locks failed, retrying in {pause:?}: {e}");
                            tokio::time::sleep(pause).await;
                        }
                    }
                }
            });
            let _ = self.changes.send((plan_id.to_string(), true));
            return;
        }
        let _ = self.changes.send((plan_id.to_string(), false));
    }
}

/// Sends the plan's definition on the agent's current stream unless it went there
/// already; whether it was sent now (a new stream).
fn send_definition(sr: &mut ShardRun, definition: &pb::PlanDefinition, agent: &AgentConn) -> bool {
    if sr.defined_on == Some(agent.conn_id) {
        return false;
    }
    let _ = agent
        .tx
        .try_send(msg(pb::coordinator_message::Body::Plan(definition.clone())));
    sr.defined_on = Some(agent.conn_id);
    true
}

impl Engine {
    /// A unit entered on a plan this leader inherited may have been started by the leader
    /// before it (the store can miss its last writes): its decision in etcd stands if there
    /// is one; with none, a transaction of it prepared on a shard (in the agents' in-doubt
    /// lists) means it had started, and this leader presumes abort, as at a takeover.
    async fn verify_unit(&mut self, plan_id: &str) {
        use crate::coordination::Decision;
        let Some(run) = self.plans.get(plan_id) else {
            return;
        };
        if !run.unit_unverified || run.state != PlanState::Running {
            return;
        }
        let key = run.unit_key();
        // every shard's in-doubt list is needed: it comes with the agent's attach
        if run.shards.keys().any(|s| !self.agents.contains_key(s)) {
            return;
        }
        let started = run.shards.keys().any(|s| {
            self.in_doubt.get(s).is_some_and(|gids| {
                gids.iter()
                    .any(|g| plan_run::plan_of_gid(g) == Some(key.as_str()))
            })
        });
        let decision = match self.coordination.decision(&key).await {
            Ok(Some(d)) => Some(d),
            Ok(None) if started => {
                match self
                    .coordination
                    .decide(&key, Decision::Abort, self.epoch)
                    .await
                {
                    Ok(d) => Some(d),
                    Err(e) => {
                        warn!(plan = %plan_id, unit = %key, "writing the presumed abort failed, retrying: {e}");
                        return;
                    }
                }
            }
            Ok(None) => None,
            Err(e) => {
                warn!(plan = %plan_id, unit = %key, "reading the unit's decision failed, retrying: {e}");
                return;
            }
        };
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        run.unit_unverified = false;
        let Some(d) = decision else { return };
        metrics::decision(d == Decision::Commit);
        info!(plan = %plan_id, unit = %key, decision = d.as_str(), "a unit the previous leader started: continuing under its decision");
        run.decision = Some(d == Decision::Commit);
        if d == Decision::Commit {
            run.state = PlanState::Committing;
        } else {
            run.state = PlanState::Aborting;
            run.message = format!(
                "parallel group {} aborted after a change of coordinator (presumed abort)",
                run.current_unit().map_or(0, |g| g + 1)
            );
            let updates = run.halt_pending();
            self.write(StoreOp::Steps {
                plan_id: plan_id.to_string(),
                updates,
            });
        }
        let run = &self.plans[plan_id];
        self.write(StoreOp::PlanState {
            plan_id: plan_id.to_string(),
            state: run.state.as_str().into(),
            message: run.message.clone(),
        });
        // the decision is carried out on the next pass
        self.two_phase(plan_id).await;
    }
}

/// Whether the plan is paused on the agent's shard now.
fn pause_message(plan_id: &str, paused: bool) -> pb::CoordinatorMessage {
    msg(pb::coordinator_message::Body::Pause(pb::Pause {
        plan_id: plan_id.to_string(),
        paused,
        reason: if paused {
            format!("plan {plan_id} paused by an operator")
        } else {
            String::new()
        },
    }))
}

pub fn msg(body: pb::coordinator_message::Body) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage { body: Some(body) }
}

impl Engine {
    /// Atomic plans: writes the decision once every target prepared (commit) or
    /// once a failed plan has nothing in flight (abort), then has every shard
    /// resolve its prepared transactions; an abort ends in the rollback of what
    /// committed outside 2PC. Decisions are fenced by leadership in etcd.
    async fn two_phase(&mut self, plan_id: &str) {
        use crate::coordination::{CoordinationError, Decision};
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        if !run.spec.two_phase() || run.current_unit().is_none() {
            return;
        }
        // The unit deciding now: the plan, or one atomic parallel group of it.
        let unit_key = run.unit_key();
        let want = if run.ready_to_commit() {
            Some(Decision::Commit)
        } else if run.state == PlanState::Aborting && run.outstanding() == 0 {
            Some(Decision::Abort)
        } else if run.state == PlanState::Committing {
            Some(Decision::Commit)
        } else {
            None
        };
        let Some(want) = want else { return };
        if run.decision.is_none() {
            // Fault tests: a coordinator that dies with every target prepared and
            // no decision written (a new leader presumes abort).
            fail::fail_point!("coordinator::before_decision", |_| {
                std::process::exit(86);
            });
            match self.coordination.decide(&unit_key, want, self.epoch).await {
                Ok(d) => {
                    metrics::decision(d == Decision::Commit);
                    info!(plan = %plan_id, unit = %unit_key, decision = d.as_str(), "decision written");
                    let run = self.plans.get_mut(plan_id).expect("present");
                    run.decision = Some(d == Decision::Commit);
                    run.state = if d == Decision::Commit {
                        PlanState::Committing
                    } else {
                        PlanState::Aborting
                    };
                    let (id, state, message) = (
                        run.id.clone(),
                        run.state.as_str().to_string(),
                        run.message.clone(),
                    );
                    self.write(StoreOp::PlanState {
                        plan_id: id,
                        state,
                        message,
                    });
                    // Fault tests: dies with the decision written, before any shard heard it.
                    fail::fail_point!("coordinator::after_decision", |_| {
                        std::process::exit(87);
                    });
                }
                Err(CoordinationError::NotLeader) => {
                    warn!(plan = %plan_id, "not the leader any more: no decision written");
                    return;
                }
                Err(e) => {
                    warn!(plan = %plan_id, "writing the decision failed, retrying: {e}");
                    return;
                }
            }
        }
        let run = self.plans.get_mut(plan_id).expect("present");
        let commit = run.decision == Some(true);
        let shards: Vec<String> = run.shards.keys().cloned().collect();
        for shard in &shards {
            let Some(agent) = self.agents.get(shard) else {
                continue;
            };
            let run = self.plans.get_mut(plan_id).expect("present");
            let sr = run.shards.get_mut(shard).expect("shard");
            if sr.resolved
                || sr.resolve_sent_on == Some(agent.conn_id)
                || sr
                    .resolve_retry_at
                    .is_some_and(|at| std::time::Instant::now() < at)
            {
                continue;
            }
            // After a takeover the gids are known only from the agent's in-doubt list.
            if sr.prepared.is_empty() {
                let known: Vec<String> = self
                    .in_doubt
                    .get(shard)
                    .map(|g| {
                        g.iter()
                            .filter(|g| {
                                crate::engine::plan_run::plan_of_gid(g) == Some(unit_key.as_str())
                            })
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                if known.is_empty() {
                    // Nothing of the plan is prepared on the shard (any more): the
                    // agent resolved it from the decision in etcd, or it never
                    // prepared. The decision says what its steps are now.
                    let updates = run.settle_shard_without_prepared(shard, commit);
                    self.write(StoreOp::Steps {
                        plan_id: plan_id.to_string(),
                        updates,
                    });
                    continue;
                }
                let sr = run.shards.get_mut(shard).expect("shard");
                for g in known {
                    sr.prepared.entry(g).or_default();
                }
            }
            let run = self.plans.get_mut(plan_id).expect("present");
            if let Some(resolve) = run.resolve_for(shard, commit) {
                let sr = run.shards.get_mut(shard).expect("shard");
                if agent
                    .tx
                    .try_send(msg(pb::coordinator_message::Body::Resolve(resolve)))
                    .is_ok()
                {
                    sr.resolve_sent_on = Some(agent.conn_id);
                }
            }
        }
        let run = self.plans.get_mut(plan_id).expect("present");
        if run.state == PlanState::Aborting && run.all_resolved() {
            // What committed outside 2PC (non-transactional steps) is undone now.
            self.begin_rollback(plan_id);
        }
    }
}
