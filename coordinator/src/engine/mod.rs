//! The engine: the one task that owns every plan in motion. Agent results,
//! operator commands and connection changes arrive as events; it mutates plan
//! state (the pure [`crate::plan`] types), sends work to agents, and hands writes
//! to the store writer.
//!
//! - [`agents`]: the agents attached to this leader, and agents that go away;
//! - [`outbound`]: typed messages to agents, kept until their stream takes them;
//! - [`replies`]: what agents answer; [`drive`]: handing out work, ending plans;
//! - [`commands`]: operator commands; [`failure`]: the failure policy and rollback;
//! - [`atomic`]: decisions of atomic units (two-phase commit).
mod agents;
mod atomic;
mod commands;
mod drive;
mod failure;
mod gates;
mod observe;
mod outbound;
mod prometheus;

pub use prometheus::query as prometheus_query;
mod replies;
#[cfg(test)]
mod tests;
mod waves;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_core::pb;
use flotilla_core::state::{PlanState, WaveState};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{Instrument, Span, debug, info, info_span, warn};

use crate::actor::Actor;
use crate::coordination::Coordination;
use crate::error::CoordinatorError;
use crate::metrics;
use crate::plan::{AppliedRead, PlanRun, RollbackState};
use crate::sessions::registry::Fleet;
use crate::store::StoreOp;
use agents::AgentConn;
pub use outbound::msg;

/// How a rollback's message names the leader that took it up after a change of leader
/// (followed by its term).
pub(crate) const RESUMED_BY: &str = "its rollback resumed by the leader of term";

/// How a plan's message begins when an operator's command stops it: `cancel requested by
/// NAME`, `rollback requested by NAME`, `halted by NAME` ([`by_operator`] reads them back).
pub(crate) const REQUESTED_BY: &str = " requested by ";
pub(crate) const HALTED_BY: &str = "halted by ";

/// Whether a stored plan message says an operator's command stopped the plan (a new
/// leader taking up its undo or its stop counts its end as the operator's).
pub(crate) fn by_operator(message: &str) -> bool {
    ["cancel", "rollback"].iter().any(|action| {
        message
            .strip_prefix(action)
            .is_some_and(|rest| rest.starts_with(REQUESTED_BY))
    }) || message.starts_with(HALTED_BY)
}

pub type AgentTx = mpsc::Sender<pb::CoordinatorMessage>;

/// Plan ids whose status changed (for `watch`), with the final status when the plan ended:
/// it leaves memory then, and its status from the store reads every step row (30,000 at
/// 10,000 tenants), which a watcher waiting for the end would wait for.
pub type Changes = broadcast::Sender<(String, Option<Arc<pb::PlanStatus>>)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Cancel,
    Rollback,
}

/// A reply to an operator command: the plan's status after it, or why it was refused.
pub type CommandReply = oneshot::Sender<Result<pb::PlanStatus, CoordinatorError>>;

pub enum Event {
    Attached {
        shard: String,
        conn_id: u64,
        tx: AgentTx,
        max_lanes: u32,
        /// Flotilla's prepared transactions the agent could not resolve alone.
        in_doubt: Vec<String>,
        /// The agent could not list them (`pb::Hello::in_doubt_unknown`).
        in_doubt_unknown: bool,
        /// Those it committed from etcd since it started (`pb::Hello::committed`).
        committed: Vec<String>,
        /// The epoch the session was welcomed under.
        epoch: u64,
    },
    ResolveReply {
        shard: String,
        reply: pb::ResolveReply,
    },
    Detached {
        shard: String,
        conn_id: u64,
    },
    /// An attached agent's heartbeat said its shard's database stopped (or started again)
    /// answering it.
    Reachability {
        shard: String,
        conn_id: u64,
        unreachable: bool,
    },
    Results {
        shard: String,
        results: pb::RunResults,
        /// When the results came off the agent's stream (for the scheduling latency).
        received: Instant,
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
        actor: Actor,
        /// A finished plan to bring back for a rollback (loaded by the caller).
        revive: Option<Box<PlanRun>>,
        reply: CommandReply,
    },
    /// Cancels one shard of a running plan (policies stop and continue).
    CancelShard {
        plan_id: String,
        shard: String,
        actor: Actor,
        reply: CommandReply,
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
    /// The coordinator is stopping: as `Follow`; `done` is answered once the engine
    /// has let go, so every write it made is in the store writer's queue by then.
    Stop {
        done: oneshot::Sender<()>,
    },
    LocksTaken {
        plan_id: String,
    },
    LocksWaiting {
        plan_id: String,
        message: String,
    },
    /// Shards whose agents hold a liveness key (etcd) or are attached (embedded).
    LiveAgents(BTreeSet<String>),
    /// Data changes' progress, from an agent's heartbeat.
    Progress {
        shard: String,
        data: Vec<pb::DataProgress>,
    },
    /// `plan promote`: the wave waiting at its manual gate passes.
    Promote {
        plan_id: String,
        /// `--wave`: only that wave's gate
        wave: Option<String>,
        actor: Actor,
        reply: CommandReply,
    },
    /// `plan halt`: the plan stops where it is and ends halted.
    Halt {
        plan_id: String,
        actor: Actor,
        reply: CommandReply,
    },
    /// `plan forget-shard`: a shard whose agent is gone for good stops holding up the
    /// commit of the plan's unit.
    ForgetShard {
        plan_id: String,
        shard: String,
        actor: Actor,
        reply: CommandReply,
    },
    /// What a wave's SQL gates found (from the task that ran them).
    GateResult {
        plan_id: String,
        wave: usize,
        /// The term that ran the check: another term's answer is not this one's.
        epoch: u64,
        found: Result<String, String>,
    },
    /// What a Prometheus probe during a bake found.
    BakeProbe {
        plan_id: String,
        wave: usize,
        epoch: u64,
        found: Result<String, String>,
    },
    /// Pause or resume a plan (`shard` None) or one shard of it.
    Pause {
        plan_id: String,
        shard: Option<String>,
        paused: bool,
        actor: Actor,
        reply: CommandReply,
    },
    Tick,
    /// The shards the control store knows of, with when each agent was last seen: a new
    /// leader's metrics show the agents away from the start (see `known_from_store`).
    KnownAgents {
        last_seen_ms: Vec<(String, i64)>,
    },
    /// A shard retired from the fleet (`fleet retire`): its agent is no longer awaited.
    Retired {
        shard: String,
    },
}

impl Event {
    /// The event's name, for the time the engine spent on it (`flotilla_engine_event_seconds`).
    fn kind(&self) -> &'static str {
        match self {
            Event::Attached { .. } => "attached",
            Event::ResolveReply { .. } => "resolve_reply",
            Event::Detached { .. } => "detached",
            Event::Results { .. } => "results",
            Event::RollbackReply { .. } => "rollback_reply",
            Event::Start { .. } => "start",
            Event::Command { .. } => "command",
            Event::CancelShard { .. } => "cancel_shard",
            Event::Status { .. } => "status",
            Event::Lead { .. } => "lead",
            Event::Follow => "follow",
            Event::Stop { .. } => "stop",
            Event::LocksTaken { .. } => "locks_taken",
            Event::LocksWaiting { .. } => "locks_waiting",
            Event::LiveAgents(_) => "live_agents",
            Event::Progress { .. } => "progress",
            Event::Reachability { .. } => "reachability",
            Event::Promote { .. } => "promote",
            Event::Halt { .. } => "halt",
            Event::ForgetShard { .. } => "forget_shard",
            Event::GateResult { .. } => "gate_result",
            Event::BakeProbe { .. } => "bake_probe",
            Event::Pause { .. } => "pause",
            Event::Tick => "tick",
            Event::KnownAgents { .. } => "known_agents",
            Event::Retired { .. } => "retired",
        }
    }
}

/// An event the engine takes longer than this on is logged (at debug): everything queued
/// behind it, a `plan status` or the runs an agent's results free, waits that long.
const SLOW_EVENT: Duration = Duration::from_millis(100);

pub struct Engine {
    epoch: u64,
    leading: bool,
    coordination: Arc<dyn Coordination>,
    /// Plans whose locks a task is releasing (a start of the same plan waits for it), and
    /// the plans waiting for theirs (a release wakes them).
    lock_queue: crate::coordination::LockQueue,
    /// Shards whose agents are alive (liveness keys), attached here or not.
    live: BTreeSet<String>,
    /// Since when a shard with runs in flight has had no agent anywhere.
    lost_since: HashMap<String, Instant>,
    agent_grace: Duration,
    /// Each shard's in-doubt prepared transactions, as its agent reported at attach.
    /// Plans this term finished stopping for an earlier leader, and their shards: each
    /// shard's agent is told to halt them when it attaches (`Event::Start`).
    halt_on_attach: BTreeMap<String, Vec<String>>,
    /// Shards whose agent attached without its in-doubt list (`pb::Hello::in_doubt_unknown`).
    in_doubt_unknown: std::collections::HashSet<String>,
    in_doubt: HashMap<String, Vec<String>>,
    /// Each shard's prepared transactions its agent committed from etcd since it started.
    committed: HashMap<String, Vec<String>>,
    /// Since when a shard with runs in flight is detached from here but alive.
    detached_alive: HashMap<String, Instant>,
    /// Shards whose "detached but alive" was logged once.
    waited: BTreeSet<String>,
    store: mpsc::UnboundedSender<crate::store::Termed>,
    agents: HashMap<String, AgentConn>,
    plans: HashMap<String, PlanRun>,
    next_run_id: u64,
    changes: Changes,
    /// The attached agents as the API sees them: gate checks go through their streams.
    fleet: Arc<Fleet>,
    /// The engine's own inbox, for tasks that report back (gate checks).
    events: mpsc::Sender<Event>,
    /// Gate checks under way: (plan, wave).
    gates: HashSet<(String, usize)>,
    /// When each baking wave's Prometheus gate was last probed: (plan, wave).
    probed: HashMap<(String, usize), Instant>,
    /// Shards whose agents this leader knows (attached once, alive in etcd, or with runs).
    known_agents: BTreeSet<String>,
    /// Since when a known shard's agent is not attached here.
    away_since: HashMap<String, Instant>,
    /// The mean time of an applied step (seconds), for plans' expected durations.
    step_seconds: f64,
    /// Label values of the engine's gauges published so far.
    published: metrics::Published,
}

impl Engine {
    pub fn new(
        coordination: Arc<dyn Coordination>,
        agent_grace: Duration,
        store: mpsc::UnboundedSender<crate::store::Termed>,
        changes: Changes,
        fleet: Arc<Fleet>,
        events: mpsc::Sender<Event>,
        lock_queue: crate::coordination::LockQueue,
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
            lock_queue,
            live: Default::default(),
            lost_since: HashMap::new(),
            agent_grace,
            in_doubt: HashMap::new(),
            in_doubt_unknown: Default::default(),
            halt_on_attach: BTreeMap::new(),
            committed: HashMap::new(),
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
            fleet,
            events,
            gates: HashSet::new(),
            probed: HashMap::new(),
            known_agents: BTreeSet::new(),
            away_since: HashMap::new(),
            step_seconds: observe::INITIAL_STEP_SECONDS,
            published: metrics::Published::default(),
        }
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        while let Some(event) = events.recv().await {
            // What the leader logs carries its epoch (a field of every line), so the
            // lines of two terms, or of a deposed leader, tell apart.
            let term = if self.leading {
                info_span!("term", epoch = self.epoch)
            } else {
                Span::none()
            };
            let kind = event.kind();
            let started = Instant::now();
            self.handle(event).instrument(term).await;
            // What an agent's stream could not take during the event goes now, in order.
            self.flush_outbound();
            let took = started.elapsed();
            metrics::engine_event(kind, took);
            if took >= SLOW_EVENT {
                debug!(
                    event = kind,
                    ms = took.as_millis() as u64,
                    "slow engine event"
                );
            }
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
                in_doubt_unknown,
                committed,
                epoch,
            } => {
                self.committed.insert(shard.clone(), committed);
                let in_doubt = (!in_doubt_unknown).then_some(in_doubt);
                self.on_attached(
                    shard,
                    AgentConn::new(conn_id, tx, max_lanes),
                    in_doubt,
                    epoch,
                )
                .await
            }
            Event::Detached { shard, conn_id } => self.on_detached(&shard, conn_id),
            Event::Results {
                shard,
                results,
                received,
            } => {
                self.on_results(&shard, results).await;
                // What the agent's stream could not take yet goes after the event; the
                // latency counts to the hand-out, not to the agent reading it.
                metrics::scheduling_latency(received.elapsed());
            }
            Event::RollbackReply { shard, reply } => self.on_rollback_reply(&shard, reply).await,
            Event::ResolveReply { shard, reply } => self.on_resolve_reply(&shard, reply).await,
            Event::Progress { shard, data } => self.on_progress(&shard, data),
            Event::Reachability {
                shard,
                conn_id,
                unreachable,
            } => {
                if let Some(a) = self.agents.get_mut(&shard).filter(|a| a.conn_id == conn_id) {
                    a.shard_unreachable = unreachable;
                    for plan_id in self.plans.keys().cloned().collect::<Vec<_>>() {
                        self.changed(&plan_id);
                    }
                }
            }
            Event::Start { run, done } => {
                // A run built under another term (leadership lost and won again since its
                // caller checked it) is not this term's: taken in, it would never get its
                // locks (they are taken under the caller's term) and would hang, and this
                // term's recovery would pass it over as in motion. Dropped, its caller
                // answers from the store, and this term continues the stored plan.
                if !self.leading || run.epoch != self.epoch {
                    if self.leading {
                        warn!(plan = %run.id, run_epoch = run.epoch, epoch = self.epoch, "a plan started under another term: left to this term's recovery");
                    }
                    return;
                }
                let id = run.id.clone();
                if self.plans.contains_key(&id) {
                    // Two starts of one plan (two retries at once): the one in motion stays.
                    warn!(plan = %id, "the plan is in motion already; not started again");
                    let _ = done.send(self.status_of(&id).unwrap_or_default());
                    return;
                }
                if run.inherited && run.state == PlanState::Stopping {
                    // A stop this term finishes for a leader gone before its Halt reached
                    // the agents: they may still have its runs queued (under its epoch,
                    // until the fence moves). Told now, and each again as it attaches.
                    let shards: Vec<String> = run.shards.keys().cloned().collect();
                    for shard in &shards {
                        self.send_to(shard, outbound::halt(&id));
                    }
                    self.halt_on_attach.insert(id.clone(), shards);
                } else {
                    // started again (a retry): its runs are this term's, not to be halted
                    self.halt_on_attach.remove(&id);
                }
                metrics::plan_started();
                self.plans.insert(id.clone(), *run);
                // seen at once, not at the next tick: a short plan may end before it
                self.publish_metrics();
                self.drive(&id).await;
                // the submitter may have gone away; the plan runs on regardless
                let _ = done.send(self.status_of(&id).unwrap_or_default());
            }
            Event::CancelShard {
                plan_id,
                shard,
                actor,
                reply,
            } => {
                let result = self.cancel_shard(&plan_id, &shard, &actor);
                self.reply(&plan_id, result, reply).await;
            }
            Event::Command {
                plan_id,
                kind,
                actor,
                revive,
                reply,
            } => {
                let result = self.command(&plan_id, kind, &actor, revive);
                self.reply(&plan_id, result, reply).await;
            }
            Event::Pause {
                plan_id,
                shard,
                paused,
                actor,
                reply,
            } => {
                let result = self.pause(&plan_id, shard.as_deref(), paused, &actor);
                self.reply(&plan_id, result, reply).await;
            }
            Event::Promote {
                plan_id,
                wave,
                actor,
                reply,
            } => {
                let result = self.promote(&plan_id, wave.as_deref(), &actor);
                self.reply(&plan_id, result, reply).await;
            }
            Event::Halt {
                plan_id,
                actor,
                reply,
            } => {
                let result = self.halt(&plan_id, &actor);
                self.reply(&plan_id, result, reply).await;
            }
            Event::ForgetShard {
                plan_id,
                shard,
                actor,
                reply,
            } => {
                let result = self.forget_shard(&plan_id, &shard, &actor);
                self.reply(&plan_id, result, reply).await;
            }
            // A check or probe of an earlier term: its plan was rebuilt since and checks
            // again (and its key in `gates` is this term's, or none).
            Event::GateResult { epoch, .. } | Event::BakeProbe { epoch, .. }
                if !self.leading || epoch != self.epoch => {}
            Event::GateResult {
                plan_id,
                wave,
                found,
                ..
            } => self.on_gate_result(&plan_id, wave, found).await,
            Event::BakeProbe {
                plan_id,
                wave,
                found,
                ..
            } => self.on_bake_probe(&plan_id, wave, found).await,
            Event::Status { plan_id, reply } => {
                // the asker may have gone away (a closed watch): nothing to tell
                let _ = reply.send(self.status_of(&plan_id));
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
                self.stop_leading();
            }
            Event::Stop { done } => {
                if self.leading {
                    info!(
                        epoch = self.epoch,
                        "stopping: stopped scheduling and deciding"
                    );
                }
                self.stop_leading();
                // the coordinator may have stopped waiting (its grace ran out)
                let _ = done.send(());
            }
            Event::LocksTaken { plan_id } => {
                // taken for a plan that ended while it waited for them: let go at once
                if !self.plans.contains_key(&plan_id) {
                    self.release_locks(&plan_id);
                }
                if let Some(run) = self.plans.get_mut(&plan_id) {
                    run.locked = true;
                    // Waited for another plan's locks: that plan may have undone since what
                    // the submit found applied (a rollback of a canary held at its gate),
                    // and this one would report those targets applied. The agents' journals
                    // say again.
                    let waited = run.lock_wait.take().is_some();
                    info!(plan = %plan_id, waited, "shard locks taken");
                    // Without a wait too: a rollback may have run its course between the
                    // submit's preflight and the locks (a rollback reply since), or while
                    // the plan awaited approval.
                    let stale = waited
                        || match run.applied_read {
                            AppliedRead::AtSubmit { undo_replies } => {
                                self.fleet.undo_replies() != undo_replies
                            }
                            AppliedRead::BeforeApproval => true,
                            AppliedRead::Before => false,
                        };
                    // An atomic plan's too: its units are worked out from its steps as
                    // they go (a step asked again is in its unit, and prepares with it, or
                    // the journal says applied); nothing of any unit ran before the locks.
                    // Not one a new leader rebuilt, whose steps its term before may have run.
                    if stale && run.state == PlanState::Running && !run.inherited && run.untouched()
                    {
                        let updates = run.recheck_applied();
                        if !updates.is_empty() {
                            info!(plan = %plan_id, steps = updates.len(), "asking the journals again for the steps the submit found applied");
                            self.write(StoreOp::Steps {
                                plan_id: plan_id.clone(),
                                updates,
                            });
                        }
                    }
                }
                self.drive(&plan_id).await;
            }
            Event::LocksWaiting { plan_id, message } => {
                if let Some(run) = self.plans.get_mut(&plan_id) {
                    run.lock_wait = Some(message);
                }
                self.changed(&plan_id);
            }
            Event::LiveAgents(live) => {
                self.live = live;
            }
            Event::KnownAgents { last_seen_ms } => {
                self.known_from_store(last_seen_ms);
                self.publish_metrics();
            }
            Event::Retired { shard } => {
                // its away time no longer counts (the alert on it resolves)
                self.known_agents.remove(&shard);
                self.away_since.remove(&shard);
                self.publish_metrics();
            }
            Event::Tick => {
                self.check_lost_agents().await;
                self.publish_metrics();
                // Decisions that could not be written (etcd away) are retried.
                let waiting: Vec<String> = self
                    .plans
                    .iter()
                    .filter(|(_, r)| {
                        matches!(r.state, PlanState::Committing | PlanState::Aborting)
                            || r.ready_to_commit()
                            || r.unit_unverified
                            // a bake ends with time, not with an answer; a gate a new
                            // leader inherited is checked again
                            || r.current_wave().is_some_and(|w| {
                                matches!(w.state, WaveState::Baking | WaveState::Checking)
                            })
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in waiting {
                    self.drive(&id).await;
                }
                // plans rolling back with an attached shard not asked for its undo yet
                // (its in-doubt transactions awaited: a Resolve it could not carry out is
                // sent again, a decision that could not be read is read again)
                let undoing: Vec<String> = self
                    .plans
                    .iter()
                    .filter(|(_, r)| {
                        r.state == PlanState::RollingBack
                            && r.shards.iter().any(|(s, sr)| {
                                sr.rollback == crate::plan::RollbackState::NotAsked
                                    && self.agents.contains_key(s)
                            })
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in undoing {
                    self.drive(&id).await;
                }
            }
        }
    }

    /// Answers an operator command, after driving the plan when it was accepted.
    async fn reply(
        &mut self,
        plan_id: &str,
        result: Result<(), CoordinatorError>,
        reply: CommandReply,
    ) {
        if result.is_ok() {
            self.drive(plan_id).await;
        }
        // the operator's CLI may have gone away; the command stands regardless
        let _ = reply.send(result.map(|()| self.status_of(plan_id).unwrap_or_default()));
    }

    /// The term this engine's writes are decided under: its epoch (its last, once it
    /// follows; 0 before it ever led). The store refuses them once a later leader has
    /// fenced it, so a deposed leader's writes cannot land over its successor's.
    fn term(&self) -> Option<u64> {
        Some(self.epoch)
    }

    fn write(&self, op: StoreOp) {
        if let StoreOp::Steps { updates, .. } = &op
            && updates.is_empty()
        {
            return;
        }
        if self.store.send((self.term(), op)).is_err() {
            // Only at shutdown: the writer is gone with the runtime. The journals
            // hold the truth for the next coordinator.
            debug!("store writer gone; a write is dropped");
        }
    }

    /// Records a plan's new state and message in the store.
    fn write_state(&self, plan_id: &str) {
        if let Some(run) = self.plans.get(plan_id) {
            self.write(StoreOp::PlanState {
                plan_id: plan_id.to_string(),
                state: run.state,
                message: run.message.clone(),
                ends: run.rollback_ends,
            });
        }
    }

    /// Tells watchers the plan changed (`ended`: for the last time).
    /// Drops the plans and the agent streams, which stops everything at once;
    /// agents find the new leader, which rebuilds from the store and the journals.
    /// Dropping the plans and the agent streams stops everything at once; agents find
    /// the new leader, which rebuilds from the store and the journals.
    fn stop_leading(&mut self) {
        self.leading = false;
        self.plans.clear();
        self.halt_on_attach.clear();
        // checks under way belong to this term (their answers are dropped): a next term
        // checks its plans' gates anew
        self.gates.clear();
        self.probed.clear();
        self.agents.clear();
        self.forget_agents();
        metrics::agents_connected(0);
    }

    fn changed(&self, plan_id: &str) {
        // no watcher subscribed is the common case, not an error
        let _ = self.changes.send((plan_id.to_string(), None));
    }

    fn ended(&self, plan_id: &str, last: pb::PlanStatus) {
        let _ = self
            .changes
            .send((plan_id.to_string(), Some(Arc::new(last))));
    }

    fn status_of(&self, plan_id: &str) -> Option<pb::PlanStatus> {
        let run = self.plans.get(plan_id)?;
        // away, or attached but its database not answering it, with something of the plan
        // left there: runs out, steps still to run (a shard waiting for a lane too), a
        // unit's decision not carried out, its rollback not done
        let work_left = |shard: &String, sr: &crate::plan::ShardRun| {
            !sr.outstanding.is_empty()
                || (run.state == PlanState::Running && sr.steps_left())
                || (matches!(run.state, PlanState::Committing | PlanState::Aborting)
                    && !sr.resolved
                    && (!sr.prepared.is_empty() || run.shard_has_open(shard)))
                || (run.state == PlanState::RollingBack && sr.rollback != RollbackState::Done)
        };
        let mut waiting: Vec<String> = run
            .shards
            .iter()
            .filter(|(shard, sr)| !self.agents.contains_key(*shard) && work_left(shard, sr))
            .map(|(s, _)| s.clone())
            .collect();
        // What else the plan waits for, named `kind: what` (shard names have no colon).
        // A shard whose database does not answer its agent: its runs stand still there
        // (their last progress is not live); before, only `fleet list` said so.
        for (shard, sr) in &run.shards {
            if self.agents.get(shard).is_some_and(|a| a.shard_unreachable) && work_left(shard, sr) {
                waiting.push(format!(
                    "database: {shard} (attached, but its database does not answer its agent: what runs there stands still)"
                ));
            }
        }
        if let Some(w) = &run.lock_wait {
            waiting.push(format!("lock: {w}"));
        }
        if run.state == PlanState::Running
            && let Some(w) = run.current_wave()
        {
            match w.state {
                WaveState::Baking => waiting.push(format!(
                    "bake: wave {} until {}",
                    w.name,
                    w.bake_until_ms.unwrap_or_default()
                )),
                WaveState::Checking => waiting.push(format!("gate: wave {}", w.name)),
                WaveState::Waiting => {
                    waiting.push(format!("promotion: wave {} (plan promote)", w.name))
                }
                _ => {}
            }
        }
        Some(crate::plan::status::from_run(run, waiting))
    }
}
