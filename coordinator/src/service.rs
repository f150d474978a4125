//! The coordinator's domain API: what the gRPC layer calls (admission and recovery
//! have their own modules). Commands go to the engine, which owns plans in motion;
//! finished plans are read from the store.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::pb;
use flotilla_core::state::PlanState;
use prost::Message;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::warn;

use crate::actor::Actor;
use crate::coordination::{
    Coordination, CoordinationError, EmbeddedCoordination, Leadership, LockOutcome, QueuedPlan,
};
use crate::engine::{CommandKind, Event};
use crate::error::{Conflict, CoordinatorError};
use crate::metrics;
use crate::plan::status;
use crate::sessions::registry::Fleet;
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreOp};

/// How often a watch (`plan submit --wait`, `plan watch`) gets a new status while its plan
/// changes. Each is a whole plan status the engine builds between the results it handles:
/// at 10,000 targets a watch every 100 ms made about 540 of the 643 statuses the coordinator
/// built during a rollout (`bench-rollout.sh --scale`, mean 2.0 ms each). A person following
/// a rollout sees no difference between 100 and 500 ms; the plan's end is sent at once.
const WATCH_COALESCE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct Defaults {
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub preflight_timeout: Duration,
    /// Environments whose completed plans catch new tenants up ("*" = every one), as
    /// plans with `catch_up = true` do.
    pub catch_up_environments: Vec<String>,
}

pub struct Inner {
    pub store: Store,
    pub fleet: Arc<Fleet>,
    /// The agents' journals, for `fleet status` and `fleet show`.
    pub versions: crate::versions::FleetVersions,
    pub events: mpsc::Sender<Event>,
    pub writes: mpsc::UnboundedSender<crate::store::Termed>,
    pub changes: crate::engine::Changes,
    pub coordination: Arc<dyn Coordination>,
    /// Set with the embedded backend: attachments are its liveness signal.
    pub embedded: Option<Arc<EmbeddedCoordination>>,
    pub defaults: Defaults,
    /// How far stopping has got, and the long-lived streams still open.
    pub shutdown: Arc<Shutdown>,
    /// The approval matrix (empty: no plan waits for approval).
    pub approvals: crate::approvals::Matrix,
    /// The environments plans are promoted through (empty: none configured).
    pub environments: crate::environments::Environments,
    /// Held while an approval, a rejection or a cancel of a plan awaiting approval is
    /// decided: two last approvals at once start the plan once.
    pub approving: tokio::sync::Mutex<()>,
    /// Request ids of submits in progress here (`Coordinator::submit_once`).
    pub submitting: std::sync::Mutex<std::collections::HashSet<String>>,
    /// When operators must authenticate (see [`crate::auth`]).
    pub auth: crate::auth::AuthMode,
    /// Set once the store was seen holding an operator: authentication stays on.
    pub auth_seen: std::sync::atomic::AtomicBool,
    /// Set once the store was seen holding none: while the store does not answer, that
    /// answer stands (a read of a running plan's status is the leader's, and must not wait
    /// out the store's outage, nor fail with it).
    pub auth_off_seen: std::sync::atomic::AtomicBool,
    /// Refusals written to the audit trail lately (a flood is written once per window).
    pub refusals_seen: crate::auth::RecentRefusals,
    /// Which client certificates may attach as which shard (checked under mTLS only).
    pub agent_identities: crate::identity::AgentIdentities,
    /// Tenants that appeared, per shard, while a plan that asks for catch-up had not ended:
    /// caught up when a plan completes (see `versions::catch_up`).
    pub catch_up_deferred: std::sync::Mutex<BTreeMap<String, Vec<pb::Tenant>>>,
    /// Completed plans' specs as `fleet status`/`fleet show` read them, decoded and checked
    /// once: by plan id, with a hash of the stored spec (a `rollback --down-from` replaces
    /// it). Decoding every completed plan's spec on every call made both grow with the
    /// history (0.04 s at no plans, 0.75 s at 560 on a debug build).
    pub spec_cache: crate::versions::SpecCache,
    /// Plans whose shard locks the engine is releasing: a start of one waits for it.
    pub lock_queue: crate::coordination::LockQueue,
    /// Held by a command that reads an ended plan from the store and acts on it (a retry, a
    /// rollback), from its read to the engine's answer: two at once both read it ended, and
    /// a retry's steps stored pending under a rollback that had begun left the rolled-back
    /// plan with pending steps, its audit naming a retry that never ran.
    pub reviving: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
pub struct Coordinator {
    pub inner: Arc<Inner>,
}

/// How long an operator's command waits for the store to take its writes before it is
/// answered anyway (`Coordinator::stored_before_answered`).
const COMMAND_STORED_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Other plans found in the way of an operator's command (`found`, newest first) refuse it
/// (`refusal`, given them as shown), unless it said to go past them
/// (`--ignore-later-plans`): then they are in its audited reason, after `past`.
pub(crate) fn refuse_or_go_past(
    found: &[String],
    ignore: bool,
    actor: &mut Actor,
    past: &str,
    refusal: impl FnOnce(String) -> Conflict,
) -> Result<(), CoordinatorError> {
    if found.is_empty() {
        return Ok(());
    }
    let shown = crate::error::later_shown(found);
    if !ignore {
        return Err(refusal(shown).into());
    }
    actor.add_reason(&format!("{past} ({shown})"));
    Ok(())
}

/// Who a catch-up plan is submitted by (`versions::catch_up`).
pub(crate) const CATCH_UP_SUBMITTER: &str = "catch-up";

/// Which of a target's journal rows came after a plan's, for [`Coordinator::plans_after`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum After {
    /// applied after the plan's own last row there (its shard's order)
    Seq(i64),
    /// applied after this time (ms): the plan's submission
    AppliedAt(i64),
}

impl After {
    fn admits(self, r: &pb::JournalEntry) -> bool {
        match self {
            After::Seq(mine) => r.seq > mine,
            After::AppliedAt(since) => r.applied_at_ms > since,
        }
    }
}

impl Coordinator {
    /// The epoch this coordinator leads under, or NotLeader naming the leader.
    pub fn leader_epoch(&self) -> Result<u64, CoordinatorError> {
        match &*self.inner.coordination.leadership().borrow() {
            Leadership::Leader { epoch } => Ok(*epoch),
            Leadership::Follower { leader } => Err(CoordinatorError::NotLeader {
                leader: leader.clone(),
            }),
        }
    }

    /// A follower's answer to a read of a plan names the leader (gRPC metadata
    /// `flotilla-leader`): the follower reads the control store, behind the leader's own
    /// state by the store's write window, and without what only the leader holds (the
    /// shards a plan waits on); a client that can reach the leader asks it instead.
    pub fn naming_the_leader<T>(&self, mut response: tonic::Response<T>) -> tonic::Response<T> {
        if let Some(value) = self.leader_named() {
            response
                .metadata_mut()
                .insert(flotilla_core::protocol::LEADER_METADATA, value);
        }
        response
    }

    /// The same for a follower's refusal of such a read: a plan submitted a moment ago is
    /// not in the store yet (not found here), and the leader has it.
    pub fn naming_the_leader_in(&self, mut refusal: tonic::Status) -> tonic::Status {
        if let Some(value) = self.leader_named() {
            refusal
                .metadata_mut()
                .insert(flotilla_core::protocol::LEADER_METADATA, value);
        }
        refusal
    }

    /// The leader's address, when this coordinator follows one it knows.
    fn leader_named(&self) -> Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
        match self.leader_epoch() {
            Err(CoordinatorError::NotLeader {
                leader: Some(leader),
            }) => leader.parse().ok(),
            // No leader now (etcd away, an election): the answer is the store's, which a
            // running plan's progress reaches only through a leader; the client says so.
            Err(CoordinatorError::NotLeader { leader: None }) => Some(
                tonic::metadata::MetadataValue::from_static(flotilla_core::protocol::NO_LEADER),
            ),
            _ => None,
        }
    }

    /// After a request's writes under `epoch` were flushed, before it starts what they
    /// stored: whether this coordinator still leads in that term. Had the term ended
    /// meanwhile, the store refused them (a later leader, maybe this one again, fenced it)
    /// and the engine must not run what the store does not hold.
    pub(crate) fn still_leading_in(&self, epoch: u64) -> Result<(), CoordinatorError> {
        match self.leader_epoch()? {
            now if now == epoch => Ok(()),
            now => Err(CoordinatorError::TermChanged { epoch, now }),
        }
    }

    /// A request's writes were flushed under a term, and [`Self::still_leading_in`] then
    /// refused with `ended`: the term ended while they waited. They landed before the next
    /// term fenced the store, which continues from them (on this coordinator or another),
    /// or the store refused them; `landed` tells by the plan's row as read now (the flush
    /// returned with them written or given up, so the row is final). Ok: they landed, and
    /// the request is to be answered as done: answered "send it again", it would be sent
    /// again (the CLI follows a refusal to the new leader by itself) and submit the plan a
    /// second time. Else `ended`, or [`CoordinatorError::TermEndedUnread`].
    pub(crate) async fn landed_as_the_term_ended(
        &self,
        plan_id: &str,
        ended: CoordinatorError,
        landed: impl FnOnce(&crate::store::PlanRow) -> bool,
    ) -> Result<(), CoordinatorError> {
        match self.inner.store.plan(plan_id).await {
            Ok(Some(row)) if landed(&row) => {
                warn!(plan = %plan_id, "this coordinator's term ended right after the request's writes were stored: the term leading now continues from them ({ended})");
                Ok(())
            }
            Ok(_) => Err(ended),
            Err(e) => Err(CoordinatorError::TermEndedUnread {
                plan_id: plan_id.to_string(),
                cause: e.to_string(),
            }),
        }
    }

    /// Fault tests (`coordinator::term_ends_after_flush`, on the requests that check
    /// [`Self::still_leading_in`]): this coordinator's term ends right after a request's
    /// writes were flushed, before it checks its term, which nothing else can time: it
    /// resigns (and campaigns no more; another coordinator takes over).
    pub(crate) async fn term_ends_here_for_a_fault_test(&self) {
        if !term_ends_after_flush() {
            return;
        }
        warn!("failpoint coordinator::term_ends_after_flush: resigning");
        self.inner.coordination.resign().await;
        let mut leadership = self.inner.coordination.leadership();
        let ended = leadership.wait_for(|l| matches!(l, Leadership::Follower { .. }));
        if tokio::time::timeout(Duration::from_secs(10), ended)
            .await
            .is_err()
        {
            warn!(
                "failpoint coordinator::term_ends_after_flush: still leading 10 s after resigning"
            );
        }
    }

    /// Takes the plan's shard locks (all or none), waiting while another plan holds one or a
    /// plan queued before it (by `order`: its submit time, or when an operator asked for it
    /// again) needs one of its shards; the plan's status says which. The engine sends
    /// nothing for the plan before they are taken.
    pub fn take_locks(&self, plan_id: String, shards: Vec<String>, epoch: u64, order: i64) {
        let me = self.clone();
        tokio::spawn(async move {
            let queued = me
                .inner
                .lock_queue
                .enter(&plan_id, epoch, order, shards.iter().cloned());
            let mut told = String::new();
            loop {
                // made before looking: a release between the look and the wait wakes it
                let moved = queued.moved();
                // queued again by a later start of the plan (a halt and a retry): that
                // start's task holds its place now, and this one leaves before it tries
                if queued.replaced() {
                    return;
                }
                let waiting = match me.lock_ahead(&queued, &plan_id).await {
                    Some(ahead) => {
                        // waiting behind a plan is a wait for a lock like any
                        queued.stands_in_the_way(true);
                        ahead
                    }
                    None if queued.replaced() => return,
                    None => match me
                        .inner
                        .coordination
                        .lock_shards(&plan_id, &shards, epoch)
                        .await
                    {
                        Ok(LockOutcome::Taken) => {
                            // out of the queue: the plans behind it wait for its locks now
                            drop(moved);
                            drop(queued);
                            // an engine gone is a coordinator shutting down: nothing to tell
                            let _ = me.inner.events.send(Event::LocksTaken { plan_id }).await;
                            return;
                        }
                        Ok(LockOutcome::Held {
                            shard,
                            plan_id: holder,
                        }) => {
                            queued.stands_in_the_way(true);
                            format!("shard {shard} is locked by plan {holder}")
                        }
                        Err(CoordinationError::NotLeader) => return,
                        Err(e) => {
                            // an error it may never get past (more shards than one etcd
                            // transaction takes): the plans queued behind it go on meanwhile;
                            // not one that passes (etcd electing a leader), or they would go
                            // first when it is back
                            if matches!(e, CoordinationError::InvalidArgument(_)) {
                                queued.stands_in_the_way(false);
                            }
                            e.to_string()
                        }
                    },
                };
                // said when it changes (each wake sent it again: a status change to every
                // watcher, per plan waiting, at every shard a rollback released)
                if waiting != told {
                    let sent = me
                        .inner
                        .events
                        .send(Event::LocksWaiting {
                            plan_id: plan_id.clone(),
                            message: waiting.clone(),
                        })
                        .await;
                    if sent.is_err() {
                        return;
                    }
                    told = waiting;
                }
                // a lock released here wakes it at once; a second covers what is not told
                // (a lock's lease expiring in etcd)
                let _ = tokio::time::timeout(Duration::from_secs(1), moved).await;
                if me.leader_epoch().ok() != Some(epoch) || queued.replaced() {
                    return;
                }
                // ended while it waited (a cancel): it needs them no more
                if me
                    .inner
                    .store
                    .plan(&plan_id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|row| row.state.is_terminal())
                {
                    return;
                }
            }
        });
    }

    /// Why a plan waiting for its locks does not try for them yet, if it does not: a
    /// release of its own locks from before is under way (taken now, that release would
    /// delete them under this run), or a plan queued before it needs one of its shards. Not
    /// the latter when it holds a lock already: a new leader takes again the locks of the
    /// plans running under the term before, which no plan queued before them may wait
    /// behind (they wait for those very locks).
    async fn lock_ahead(&self, queued: &QueuedPlan, plan_id: &str) -> Option<String> {
        if self.inner.lock_queue.pending(plan_id) {
            return Some("its locks from before are being released".to_string());
        }
        let (ahead, shard) = queued.behind()?;
        let holds = self
            .inner
            .coordination
            .locks()
            .await
            .is_ok_and(|locks| locks.iter().any(|l| l.plan_id == plan_id));
        (!holds).then(|| {
            format!("plan {ahead}, queued before it, waits for shard {shard} too: queued behind it")
        })
    }

    pub async fn locks(&self) -> Result<pb::ListLocksResponse, CoordinatorError> {
        let locks = self.inner.coordination.locks().await?;
        Ok(pb::ListLocksResponse {
            locks: locks
                .into_iter()
                .map(|l| pb::ShardLock {
                    shard: l.shard,
                    plan_id: l.plan_id,
                    lease: l.lease,
                })
                .collect(),
            backend: self.inner.coordination.kind().into(),
        })
    }

    /// Breaks one shard's lock, whoever holds it: an operator's override, audited.
    pub async fn break_lock(
        &self,
        shard: &str,
        actor: &str,
        reason: &str,
    ) -> Result<bool, CoordinatorError> {
        self.leader_epoch()?;
        let holder = self
            .inner
            .coordination
            .locks()
            .await?
            .into_iter()
            .find(|l| l.shard == shard)
            .map(|l| l.plan_id)
            .unwrap_or_default();
        // A plan in motion here that holds the lock is halted first (what applied stays):
        // going on without its lock, it would run beside the next plan to take the shard.
        // (Halted with nothing in flight, it ends and lets its locks go itself.)
        let mut halted = false;
        if !holder.is_empty() {
            let halter = Actor::new(
                actor,
                &format!("its lock on shard {shard} was broken: {reason}"),
            );
            let id = holder.clone();
            let answer = self
                .to_engine(|reply| Event::Halt {
                    plan_id: id,
                    actor: halter,
                    reply,
                })
                .await?;
            match answer {
                Ok(_) => {
                    halted = true;
                    self.stored_before_answered(self.leader_epoch()?).await?;
                    warn!(plan = %holder, shard, "halting the plan whose shard lock is broken");
                }
                // not in motion here (its coordinator died), or stopping already (it hands
                // out nothing more; what is in flight may be what is stuck)
                Err(CoordinatorError::Conflict(
                    Conflict::NotRunning { .. }
                    | Conflict::NotHaltable {
                        state: PlanState::Stopping,
                        ..
                    },
                )) => {}
                Err(e) => {
                    let remedy = match &e {
                        CoordinatorError::Conflict(Conflict::NotHaltable {
                            state: PlanState::Committing,
                            ..
                        }) => {
                            "wait for its commit to end (`plan forget-shard` for a shard whose \
                             agent is gone for good)"
                        }
                        CoordinatorError::Conflict(Conflict::NotHaltable {
                            state: PlanState::Aborting | PlanState::RollingBack,
                            ..
                        }) => "wait for its undo to end",
                        _ => "cancel it, or wait for its end",
                    };
                    return Err(Conflict::LockHolderInMotion {
                        plan_id: holder,
                        shard: shard.to_string(),
                        why: e.to_string(),
                        remedy,
                    }
                    .into());
                }
            }
        }
        let broken = self.inner.coordination.break_lock(shard).await? || halted;
        if broken {
            // a plan waiting for the shard takes it now, not at its next look
            self.inner.lock_queue.freed();
            let actor = Actor::new(actor, reason);
            // the lock is broken in etcd whoever leads now: its audit entry is unfenced
            self.write_unfenced(actor.audit("break-lock", &holder, &format!("shard {shard}")));
            self.flush().await;
            warn!(shard, plan = %holder, "shard lock broken by {}", actor.name);
        }
        Ok(broken)
    }

    pub(crate) async fn to_engine<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Event,
    ) -> Result<T, CoordinatorError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .events
            .send(make(tx))
            .await
            .map_err(|_| CoordinatorError::ShuttingDown)?;
        rx.await.map_err(|_| CoordinatorError::ShuttingDown)
    }

    /// Hands a plan this term stored (or took back from the store) to the engine to run; its
    /// status, or None when the engine leads another term by now (lost and won again since
    /// the caller checked): that term continues the stored plan itself (its recovery), and
    /// takes its locks.
    pub(crate) async fn start_run(
        &self,
        run: crate::plan::PlanRun,
    ) -> Result<Option<pb::PlanStatus>, CoordinatorError> {
        // queued as handed over now: a submit's, or a retry's or an approval's (an ended or
        // waiting plan asked for again), not its first submit's (it went ahead of plans
        // submitted since); a retry's and an approval's place is stored with their state,
        // for a new leader, a submit's is its creation
        let (plan_id, epoch, order) = (run.id.clone(), run.epoch, crate::store::now_ms());
        let shards: Vec<String> = run.shards.keys().cloned().collect();
        match self
            .to_engine(|done| Event::Start {
                run: Box::new(run),
                done,
            })
            .await
        {
            Ok(status) => {
                self.take_locks(plan_id, shards, epoch, order);
                Ok(Some(status))
            }
            Err(CoordinatorError::ShuttingDown) if self.still_leading_in(epoch).is_err() => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Hands a leader's write to the store writer (in order with the engine's), under the
    /// term this coordinator leads in: the store refuses it once a later leader fenced the
    /// store. One handed over after this coordinator stopped leading (its request checked
    /// leadership, then waited) goes under epoch 0, which the store refuses once any leader
    /// has fenced it.
    pub(crate) fn write(&self, op: StoreOp) {
        self.send_write(Some(self.leader_epoch().unwrap_or(0)), op);
    }

    /// [`Self::write`] for a decision made under `epoch` (the leadership a request checked
    /// before it waited on the store or the engine): refused once a later leader fenced the
    /// store, even if this coordinator leads again meanwhile under a later epoch.
    pub(crate) fn write_under(&self, epoch: u64, op: StoreOp) {
        self.send_write(Some(epoch), op);
    }

    /// Hands a write that any coordinator makes, leading or not, to the store writer, with
    /// no fence: an audit entry of a refused connection or request, or of what was done
    /// outside the store and stands whoever leads (a lock broken in etcd, a baseline
    /// recorded in the shards' journals).
    pub(crate) fn write_unfenced(&self, op: StoreOp) {
        self.send_write(None, op);
    }

    fn send_write(&self, term: Option<u64>, op: StoreOp) {
        if self.inner.writes.send((term, op)).is_err() {
            // only at shutdown, with the writer gone
            warn!("store writer gone; a write is dropped");
        }
    }

    /// Waits until every write handed over before it is in the store.
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.write(StoreOp::Flush(tx));
        if rx.await.is_err() {
            warn!("store writer gone before a flush");
        }
    }

    pub async fn status(&self, plan_id: &str) -> Result<pb::PlanStatus, CoordinatorError> {
        let started = std::time::Instant::now();
        let status = self.status_now(plan_id).await;
        if status.is_ok() {
            metrics::plan_status_answered(started.elapsed());
        }
        status
    }

    async fn status_now(&self, plan_id: &str) -> Result<pb::PlanStatus, CoordinatorError> {
        let id = plan_id.to_string();
        if let Some(s) = self
            .to_engine(|reply| Event::Status { plan_id: id, reply })
            .await?
        {
            return Ok(s);
        }
        let mut row = self.stored_plan(plan_id).await?;
        if row.state == PlanState::AwaitingApproval
            && let Some(now) = self.awaiting_now(&row).await
        {
            row.message = now;
        }
        // What the status needs of the plan itself: its migrations' order and its waves.
        let raw = hex::decode(&row.spec_hex)
            .ok()
            .and_then(|b| pb::PlanSpec::decode(b.as_slice()).ok());
        // The order needs only the wire form (it survives a spec a newer rule refuses).
        let order: Vec<String> = raw
            .as_ref()
            .map(|p| p.migrations.iter().map(|m| m.id.clone()).collect())
            .unwrap_or_default();
        let spec = raw.and_then(|p| flotilla_core::PlanSpec::try_from(p).ok());
        let waves = self.inner.store.waves(plan_id).await?;
        let steps = self
            .inner
            .store
            .step_summary(plan_id, !waves.is_empty())
            .await?;
        let data = self.inner.store.data_progress(plan_id).await?;
        Ok(status::from_store(
            &row,
            &order,
            spec.as_ref(),
            &steps,
            &waves,
            data,
        ))
    }

    pub async fn list(&self, limit: u32) -> Result<pb::ListPlansResponse, CoordinatorError> {
        let limit = if limit == 0 { 50 } else { limit.min(1000) };
        let rows = self.inner.store.plans(limit as i64).await?;
        let mut plans: Vec<pb::PlanSummary> = rows.iter().map(status::summary).collect();
        // The store says running for a plan in motion; the engine knows more (waiting at a
        // manual gate, paused), as `plan status` says: the list says the same.
        for p in plans
            .iter_mut()
            .filter(|p| p.state == PlanState::Running.as_str())
        {
            let id = p.plan_id.clone();
            if let Ok(Some(s)) = self
                .to_engine(|reply| Event::Status { plan_id: id, reply })
                .await
                && let Some(summary) = s.summary
            {
                p.state = summary.state;
            }
        }
        Ok(pb::ListPlansResponse { plans })
    }

    /// `plan rollback`: [`Coordinator::command`], refused for a plan that ended when later
    /// plans applied migrations on its targets after it, unless `ignore_later`.
    pub async fn rollback(
        &self,
        plan_id: &str,
        actor: Actor,
        ignore_later: bool,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        self.command_past(plan_id, CommandKind::Rollback, actor, ignore_later)
            .await
    }

    pub async fn command(
        &self,
        plan_id: &str,
        kind: CommandKind,
        actor: Actor,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        self.command_past(plan_id, kind, actor, false).await
    }

    /// The later plans' rows on a plan's targets, from the leader's copy of the journals
    /// (what attached agents reported): per later plan, its migrations and targets, each
    /// target's rows applied after the plan's own last there.
    pub(crate) fn later_plans(&self, plan_id: &str) -> Vec<String> {
        self.plans_after(plan_id, |_, _, rows| {
            rows.iter()
                .filter(|r| r.plan_id == plan_id)
                .map(|r| r.seq)
                .max()
                .map(After::Seq)
        })
    }

    /// Catch-up plans that applied the plan's migrations on targets outside it (tenants that
    /// appeared after it completed), newest first: each named with those migrations and
    /// some of its targets. A catch-up rolled back is not among them (its rows are gone).
    async fn caught_up_on(
        &self,
        plan_id: &str,
        spec: &flotilla_core::PlanSpec,
        submitted_ms: i64,
    ) -> Result<Vec<String>, CoordinatorError> {
        let mine: std::collections::BTreeSet<&str> =
            spec.migrations.iter().map(|m| m.id.as_str()).collect();
        let (journals, _) = self.inner.versions.snapshot();
        // Its migrations' rows on targets it has none on (its own targets: the later-plans
        // check speaks for them), by the plan that wrote them.
        let mut rows_of: BTreeMap<&str, Vec<(&str, &str, &pb::JournalEntry)>> = BTreeMap::new();
        for (shard, journal) in journals.iter() {
            for (tenant, rows) in &journal.targets {
                if rows.iter().any(|r| r.plan_id == plan_id) {
                    continue;
                }
                for r in rows
                    .iter()
                    .filter(|r| mine.contains(r.migration_id.as_str()))
                {
                    rows_of.entry(r.plan_id.as_str()).or_default().push((
                        shard.as_str(),
                        tenant.as_str(),
                        r,
                    ));
                }
            }
        }
        let fleet = self.inner.fleet.snapshot();
        let mut caught_up = Vec::new();
        for (plan, rows) in rows_of {
            // Another plan of the same migrations elsewhere (a region's plan after another
            // region's) is its own rollout: only a catch-up is this plan's own, carried on.
            let Some(row) = self.inner.store.plan(plan).await? else {
                continue;
            };
            // A catch-up of its environment submitted after it (both times the coordinators'
            // clocks: a row's applied_at is its shard's): one of another environment, or from
            // before it, gave the tenant another plan's migration.
            if row.submitted_by != CATCH_UP_SUBMITTER
                || row.state == PlanState::RolledBack
                || row.created_at_ms <= submitted_ms
                || row.environment != spec.environment
            {
                continue;
            }
            let (mut migrations, mut targets, mut newest) =
                (std::collections::BTreeSet::new(), Vec::new(), 0);
            // On a tenant it selects for the migration (a catch-up of another plan of the same
            // migrations, for another region, is that plan's; a shard whose agent is away
            // counts, its labels unknown here).
            for (shard, tenant, r) in rows {
                let selected = crate::versions::catch_up::selects(
                    spec,
                    &fleet,
                    shard,
                    tenant,
                    &r.migration_id,
                );
                if selected == Some(false) {
                    continue;
                }
                newest = newest.max(r.applied_at_ms);
                migrations.insert(r.migration_id.as_str());
                let target = crate::versions::target_name(shard, tenant);
                if !targets.contains(&target) {
                    targets.push(target);
                }
            }
            if targets.is_empty() {
                continue;
            }
            let migrations: Vec<&str> = migrations.into_iter().collect();
            caught_up.push((
                newest,
                format!(
                    "catch-up plan {plan}: {} on {}",
                    migrations.join(", "),
                    crate::error::some_of(&targets, 3)
                ),
            ));
        }
        caught_up.sort_by_key(|(newest, _)| std::cmp::Reverse(*newest));
        Ok(caught_up.into_iter().map(|(_, named)| named).collect())
    }

    /// Other plans' rows on the targets `after` picks, those after what it says for each
    /// (or none: the target is passed over), newest plan first: each named with its
    /// migrations and some of its targets (a `fleet baseline` as what it is).
    pub(crate) fn plans_after(
        &self,
        plan_id: &str,
        after: impl Fn(&str, &str, &[pb::JournalEntry]) -> Option<After>,
    ) -> Vec<String> {
        let (journals, _) = self.inner.versions.snapshot();
        // (plan -> its migrations, targets and when its newest row applied, for newest first)
        type Later = (std::collections::BTreeSet<String>, Vec<String>, i64);
        let mut later: BTreeMap<String, Later> = BTreeMap::new();
        for (shard, journal) in journals.iter() {
            for (tenant, rows) in &journal.targets {
                let Some(after) = after(shard, tenant, rows) else {
                    continue;
                };
                for r in rows
                    .iter()
                    .filter(|r| r.plan_id != plan_id && after.admits(r))
                {
                    let (migrations, targets, newest) = later.entry(r.plan_id.clone()).or_default();
                    // (when it applied: a row's seq is its shard's own count, not to be
                    // compared across shards)
                    *newest = (*newest).max(r.applied_at_ms);
                    migrations.insert(r.migration_id.clone());
                    let target = crate::versions::target_name(shard, tenant);
                    if !targets.contains(&target) {
                        targets.push(target);
                    }
                }
            }
        }
        let mut later: Vec<(String, Later)> = later.into_iter().collect();
        // newest first, the order to roll them back in
        later.sort_by_key(|(_, (_, _, newest))| std::cmp::Reverse(*newest));
        later
            .into_iter()
            .map(|(plan, (migrations, targets, _))| {
                // a baseline is no plan: it recorded what another tool applied, and is not
                // rolled back (`plan rollback baseline-...` is "not found")
                let what = if plan.starts_with(crate::versions::BASELINE_PREFIX) {
                    format!(
                        "fleet baseline {plan} (another tool's migrations, recorded: not a plan to roll back)"
                    )
                } else {
                    format!("plan {plan}")
                };
                let migrations: Vec<String> = migrations.into_iter().collect();
                let more = match migrations.len() {
                    n if n > 5 => format!(" and {} more migrations", n - 5),
                    _ => String::new(),
                };
                format!(
                    "{what}: {}{more} on {}",
                    migrations[..migrations.len().min(5)].join(", "),
                    crate::error::some_of(&targets, 3)
                )
            })
            .collect()
    }

    async fn command_past(
        &self,
        plan_id: &str,
        kind: CommandKind,
        mut actor: Actor,
        ignore_later: bool,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        let _reviving = self.inner.reviving.lock().await;
        let id = plan_id.to_string();
        let in_memory = self
            .to_engine(|reply| Event::Status { plan_id: id, reply })
            .await?
            .is_some();
        if !in_memory && kind == CommandKind::Cancel {
            // A plan awaiting approval is in the store only: ended there.
            if let Some(status) = self.cancel_awaiting(plan_id, &actor).await? {
                return Ok(status);
            }
        }
        // a follower sends the operator to the leader (before reading the store's row: a
        // follower holds no plan in memory, and would refuse every rollback as not taken
        // over)
        let epoch = self.leader_epoch()?;
        let revive = if in_memory || kind == CommandKind::Cancel {
            None
        } else {
            let row = self.stored_plan(plan_id).await?;
            if row.state == PlanState::RolledBack {
                return Err(Conflict::RolledBack {
                    plan_id: plan_id.to_string(),
                }
                .into());
            }
            // Neither ran: there is nothing to undo (a waiting plan is cancelled or rejected).
            if row.state == PlanState::Rejected {
                return Err(Conflict::Ended {
                    plan_id: plan_id.to_string(),
                    state: row.state,
                }
                .into());
            }
            if row.state == PlanState::AwaitingApproval {
                return Err(Conflict::NotRunning {
                    plan_id: plan_id.to_string(),
                    action: "roll back (it awaits approval: cancel or reject it)",
                }
                .into());
            }
            // A plan that has not ended is this leader's to resume first (its atomic unit
            // may need a presumed abort; its runs may be in flight): rebuilt as completed,
            // its rollback would pass over that.
            if !row.state.is_terminal() {
                return Err(Conflict::NotTakenOver {
                    plan_id: plan_id.to_string(),
                    state: row.state,
                }
                .into());
            }
            // Later plans' migrations on its targets may rest on what it made (a column
            // added to a table it created): its down SQL would take them, and their rows,
            // with it, and their journal rows would still say applied.
            refuse_or_go_past(
                &self.later_plans(plan_id),
                ignore_later,
                &mut actor,
                "past later plans",
                |later| Conflict::LaterPlans {
                    plan_id: plan_id.to_string(),
                    later,
                },
            )?;
            let mut run = self.rebuild(&row).await?;
            // Tenants that appeared after it completed got its migrations from catch-up
            // plans: their journal rows are those plans', which this rollback does not undo
            // (it left its migration, and the rows written since, there alone, said
            // rolled_back).
            refuse_or_go_past(
                &self
                    .caught_up_on(plan_id, &run.spec, row.created_at_ms)
                    .await?,
                ignore_later,
                &mut actor,
                "leaving its migrations where catch-ups applied them",
                |caught_up| Conflict::CaughtUp {
                    plan_id: plan_id.to_string(),
                    caught_up,
                },
            )?;
            run.state = PlanState::Completed;
            run.by_operator = true;
            Some(Box::new(run))
        };
        if revive.is_some() {
            // it was read from the store under this term, and is undone in it
            self.still_leading_in(epoch)?;
        }
        let revived_shards: Option<Vec<String>> =
            revive.as_ref().map(|r| r.shards.keys().cloned().collect());
        let id = plan_id.to_string();
        let answer = self
            .to_engine(|reply| Event::Command {
                plan_id: id,
                kind,
                actor,
                revive,
                reply,
            })
            .await?;
        // queued as asked now: plans submitted since go first where they wait too (and so
        // under a new leader: stored with the command's writes)
        let now = crate::store::now_ms();
        if answer.is_ok() {
            if revived_shards.is_some() {
                self.write_under(
                    epoch,
                    crate::store::StoreOp::Queued {
                        plan_id: plan_id.to_string(),
                        at_ms: now,
                    },
                );
            }
            self.stored_before_answered(epoch).await?;
        }
        let status = self.named_if_not_running(plan_id, answer).await?;
        if let Some(shards) = revived_shards {
            self.take_locks(plan_id.to_string(), shards, epoch, now);
        }
        self.ended_if_gone(plan_id, status).await
    }

    /// `fleet retire SHARD`: a shard whose agent is gone for good (its database
    /// decommissioned) leaves the fleet: its agent row, its journal's copy and last
    /// failures go, so a plan is no longer refused as touching it while unreachable, and
    /// `fleet status` no longer counts it. Refused, changing nothing, for a shard the fleet
    /// does not have, while its agent is attached or alive in etcd, and while a plan not
    /// ended has steps there (cancel that shard of it, or forget it, first). An agent of it
    /// that comes back later attaches as a new shard would.
    pub async fn retire_shard(&self, shard: &str, actor: &Actor) -> Result<(), CoordinatorError> {
        let epoch = self.leader_epoch()?;
        if self.inner.store.agent(shard).await?.is_none() {
            return Err(CoordinatorError::InvalidRequest(format!(
                "the fleet has no shard `{shard}` (`flotilla fleet list` names them)"
            )));
        }
        let how = if self.inner.fleet.is_attached(shard) {
            Some("attached to this coordinator")
        } else if self
            .inner
            .coordination
            .live_agents()
            .borrow()
            .contains(shard)
        {
            Some("alive (its liveness key is in etcd)")
        } else {
            None
        };
        if let Some(how) = how {
            return Err(CoordinatorError::InvalidRequest(format!(
                "the agent of shard {shard} is {how}: a shard is retired once its agent is gone \
                 for good (stop it first)"
            )));
        }
        let open = self.inner.store.open_plans_on(shard).await?;
        if !open.is_empty() {
            return Err(CoordinatorError::InvalidRequest(format!(
                "plan(s) {} not ended have steps on shard {shard}: cancel that shard of a running \
                 one (`plan cancel ID --shard {shard}`), forget it in one committing its atomic \
                 unit (`plan forget-shard ID --shard {shard}`), or let them end (one aborting or rolling \
                 back waits for the shard's agent: start it again), first",
                open.join(", ")
            )));
        }
        self.write_under(
            epoch,
            StoreOp::Together(vec![
                StoreOp::RetireAgent {
                    shard: shard.to_string(),
                },
                actor.audit("retire-shard", "", &format!("shard {shard}")),
            ]),
        );
        self.flush().await;
        if let Err(ended) = self.still_leading_in(epoch) {
            // retired before the next term fenced the store: the shard is out all the same
            self.inner
                .store
                .agent(shard)
                .await?
                .map_or(Ok(()), |_| Err(ended))?;
        }
        // An agent of it that attached between the checks and the delete keeps its row
        // (and its place in the metrics); otherwise it is no longer awaited there.
        let back = self.inner.fleet.snapshot().remove(shard);
        if back.is_none() {
            let _ = self
                .inner
                .events
                .send(Event::Retired {
                    shard: shard.to_string(),
                })
                .await;
        }
        if let Some(back) = back {
            self.write_under(
                epoch,
                StoreOp::Agent {
                    shard: shard.to_string(),
                    labels: serde_json::to_string(&back.labels).unwrap_or_else(|_| "{}".into()),
                    tenants: crate::sessions::tenants_json(&back.tenants),
                    version: back.version.clone(),
                    seen_ms: 0,
                },
            );
            self.flush().await;
            return Err(CoordinatorError::InvalidRequest(format!(
                "the agent of shard {shard} attached while it was retired: it stays in the fleet"
            )));
        }
        self.inner.versions.retire(shard);
        warn!(%shard, operator = %actor.name, "shard retired from the fleet");
        Ok(())
    }

    /// `plan rollback ID --down-from DIR`: the down SQL of a plan that ended is replaced by
    /// the given migrations' (each the plan's by id, with the same up SQL), stored and
    /// audited, and the plan is rolled back with it: a rollback that failed on a down.sql
    /// fixed since runs again with the fix (down.sql is outside the checksum: fixing an undo
    /// after the fact is allowed). Before, the rollback ran the stored, broken one again,
    /// and a plan `rollback_failed` had no way out. Refused, changing nothing, for a plan
    /// that has not ended (it undoes with what it has), one rolled back, and a migration
    /// that is not the plan's or whose up SQL differs.
    pub async fn rollback_with_down(
        &self,
        plan_id: &str,
        down_from: Vec<pb::Migration>,
        actor: Actor,
        ignore_later: bool,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        // the down SQL given is stored with the plan: held to the sizes a submit is
        flotilla_core::size_read(&pb::PlanSpec {
            migrations: down_from.clone(),
            ..Default::default()
        })?;
        let id = plan_id.to_string();
        if self
            .to_engine(|reply| Event::Status { plan_id: id, reply })
            .await?
            .is_some()
        {
            return Err(CoordinatorError::InvalidRequest(format!(
                "plan {plan_id} has not ended: --down-from replaces the down SQL of a plan \
                 that ended (a rollback that failed, a completed plan); this one undoes with \
                 what it has"
            )));
        }
        let row = self.stored_plan(plan_id).await?;
        // The refusals `command` makes of this row, before anything is written.
        match row.state {
            PlanState::RolledBack => {
                return Err(Conflict::RolledBack {
                    plan_id: plan_id.to_string(),
                }
                .into());
            }
            PlanState::Rejected => {
                return Err(Conflict::Ended {
                    plan_id: plan_id.to_string(),
                    state: row.state,
                }
                .into());
            }
            PlanState::AwaitingApproval => {
                return Err(Conflict::NotRunning {
                    plan_id: plan_id.to_string(),
                    action: "roll back (it awaits approval: cancel or reject it)",
                }
                .into());
            }
            state if !state.is_terminal() => {
                return Err(Conflict::NotTakenOver {
                    plan_id: plan_id.to_string(),
                    state,
                }
                .into());
            }
            _ => {}
        }
        let mut raw = hex::decode(&row.spec_hex)
            .ok()
            .and_then(|b| pb::PlanSpec::decode(b.as_slice()).ok())
            .ok_or_else(|| {
                CoordinatorError::InvalidRequest(format!(
                    "plan {plan_id}'s stored spec cannot be read"
                ))
            })?;
        let mut replaced = Vec::new();
        for m in &down_from {
            let Some(stored) = raw.migrations.iter_mut().find(|s| s.id == m.id) else {
                return Err(CoordinatorError::InvalidRequest(format!(
                    "--down-from: migration `{}` is not in plan {plan_id}",
                    m.id
                )));
            };
            if flotilla_core::checksum(&m.up_sql) != flotilla_core::checksum(&stored.up_sql)
                || m.data != stored.data
            {
                return Err(CoordinatorError::InvalidRequest(format!(
                    "--down-from: migration `{}`'s up SQL differs from what plan {plan_id} \
                     applied: not the same migration",
                    m.id
                )));
            }
            if stored.down_sql != m.down_sql {
                stored.down_sql = m.down_sql.clone();
                replaced.push(m.id.clone());
            }
        }
        // (refused before the new down SQL is stored, as the rollback would refuse it)
        let later = self.later_plans(plan_id);
        if !ignore_later && !later.is_empty() {
            return Err(Conflict::LaterPlans {
                plan_id: plan_id.to_string(),
                later: crate::error::later_shown(&later),
            }
            .into());
        }
        if !replaced.is_empty() {
            flotilla_core::PlanSpec::try_from(raw.clone())?;
            self.write_under(
                epoch,
                StoreOp::Together(vec![
                    StoreOp::PlanSpec {
                        plan_id: plan_id.to_string(),
                        spec_hex: hex::encode(raw.encode_to_vec()),
                    },
                    actor.audit(
                        "rollback-down-replaced",
                        plan_id,
                        &format!("down SQL of {} (--down-from)", replaced.join(", ")),
                    ),
                ]),
            );
            self.flush().await;
            self.still_leading_in(epoch)?;
            // the writer may have given the write up: the broken down SQL must not run again
            let landed = self
                .inner
                .store
                .plan(plan_id)
                .await?
                .is_some_and(|now| now.spec_hex == hex::encode(raw.encode_to_vec()));
            if !landed {
                return Err(CoordinatorError::InvalidRequest(format!(
                    "the new down SQL of plan {plan_id} could not be stored (the coordinator's \
                     log says why); nothing was rolled back: send it again"
                )));
            }
            warn!(plan = %plan_id, migrations = %replaced.join(", "), "down SQL replaced for a rollback");
        }
        self.rollback(plan_id, actor, ignore_later).await
    }

    /// A command the engine refused as "not running" (it holds no such plan) for a plan
    /// the store has not either is named as not found; for one that ended, as ended (in
    /// what state). Before, `plan cancel pnosuch` answered "not running; nothing to cancel".
    async fn named_if_not_running(
        &self,
        plan_id: &str,
        answer: Result<pb::PlanStatus, CoordinatorError>,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        // (the engine's "not found" too: a plan in motion when the caller looked may have
        // ended before the command reached the engine)
        if !matches!(
            &answer,
            Err(CoordinatorError::Conflict(Conflict::NotRunning { .. })
                | CoordinatorError::PlanNotFound(_))
        ) {
            return answer;
        }
        match self.inner.store.plan(plan_id).await {
            Ok(None) => Err(CoordinatorError::PlanNotFound(plan_id.to_string())),
            Ok(Some(row)) if row.state.is_terminal() => Err(Conflict::Ended {
                plan_id: plan_id.to_string(),
                state: row.state,
            }
            .into()),
            _ => answer,
        }
    }

    /// The plan's row in the control store, or PlanNotFound.
    pub(crate) async fn stored_plan(
        &self,
        plan_id: &str,
    ) -> Result<crate::store::PlanRow, CoordinatorError> {
        self.inner
            .store
            .plan(plan_id)
            .await?
            .ok_or_else(|| CoordinatorError::PlanNotFound(plan_id.to_string()))
    }

    /// A command the engine carries out on a plan it holds (`make` builds its event from
    /// the plan's id and the reply), on the leader; a refusal as "not running" named by the
    /// store (`named_if_not_running`).
    async fn plan_command(
        &self,
        plan_id: String,
        make: impl FnOnce(String, oneshot::Sender<Result<pb::PlanStatus, CoordinatorError>>) -> Event,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        let id = plan_id.clone();
        let answer = self.to_engine(|reply| make(id, reply)).await?;
        if answer.is_ok() {
            self.stored_before_answered(epoch).await?;
        }
        let status = self.named_if_not_running(&plan_id, answer).await?;
        self.ended_if_gone(&plan_id, status).await
    }

    /// A command's answer when it ended the plan at once (a halt with nothing in flight):
    /// the plan has left the engine's memory, and the engine answered with an empty status
    /// (`plan  ()  state: `); its final state is read from the store.
    async fn ended_if_gone(
        &self,
        plan_id: &str,
        status: pb::PlanStatus,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        if status.summary.is_some() {
            return Ok(status);
        }
        self.status(plan_id).await
    }

    /// What the engine did for an operator's command (a halt, a pause, a cancel: the plan's
    /// state, its audit entry) is in the store before the operator is told it is done: a
    /// leader killed right after answering lost the halt, and the next leader ran the plan
    /// to completed. A term that ended meanwhile answers as a change of leader does (the
    /// CLI sends the command again to the new leader).
    ///
    /// Bounded: with the store out of reach the command is in effect here all the same (its
    /// writes wait in the writer, which keeps trying while this term lasts), and an operator
    /// halting a plan in an incident is answered, not held until the store is back.
    async fn stored_before_answered(&self, epoch: u64) -> Result<(), CoordinatorError> {
        if tokio::time::timeout(COMMAND_STORED_WITHIN, self.flush())
            .await
            .is_err()
        {
            warn!(
                "the control store has not taken a command's writes within {COMMAND_STORED_WITHIN:?}: answered; in effect here, and stored once the store answers"
            );
            return Ok(());
        }
        self.still_leading_in(epoch)
    }

    /// Cancels one shard of a running plan (policies stop and continue).
    pub async fn cancel_shard(
        &self,
        plan_id: String,
        shard: String,
        actor: Actor,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        self.plan_command(plan_id, |plan_id, reply| Event::CancelShard {
            plan_id,
            shard,
            actor,
            reply,
        })
        .await
    }

    /// Pauses or resumes a running plan, or one shard of it (`c.shard`).
    pub async fn pause(
        &self,
        plan_id: String,
        shard: Option<String>,
        paused: bool,
        actor: Actor,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        self.plan_command(plan_id, |plan_id, reply| Event::Pause {
            plan_id,
            shard,
            paused,
            actor,
            reply,
        })
        .await
    }

    /// `plan promote`: a plan waiting at a wave's manual gate goes on to the next wave.
    pub async fn promote(
        &self,
        plan_id: String,
        wave: Option<String>,
        actor: Actor,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        let named = wave.clone();
        let answer = self
            .plan_command(plan_id.clone(), |plan_id, reply| Event::Promote {
                plan_id,
                wave,
                actor,
                reply,
            })
            .await;
        // A retry of the last gate's promote once the plan completed (every wave passed):
        // nothing to do, as for any wave already past (it was refused, "already ended").
        if let (Err(_), Some(named)) = (&answer, named)
            && let Ok(status) = self.status(&plan_id).await
            && status
                .summary
                .as_ref()
                .is_some_and(|s| s.state == PlanState::Completed.as_str())
            && status.waves.iter().any(|w| w.name == named)
        {
            return Ok(status);
        }
        answer
    }

    /// `plan halt`: the plan stops where it is; what applied stays; it ends halted.
    pub async fn halt(
        &self,
        plan_id: String,
        actor: Actor,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        self.plan_command(plan_id, |plan_id, reply| Event::Halt {
            plan_id,
            actor,
            reply,
        })
        .await
    }

    /// `plan forget-shard`: a shard whose agent is gone for good stops holding up the commit
    /// of the plan's unit (see `Engine::forget_shard`). Answers the plan's status, from the
    /// store when the plan ended with it.
    pub async fn forget_shard(
        &self,
        plan_id: String,
        shard: String,
        actor: Actor,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        let id = plan_id.clone();
        let answer = self
            .to_engine(|reply| Event::ForgetShard {
                plan_id: id,
                shard,
                actor,
                reply,
            })
            .await?;
        if answer.is_ok() {
            // as any command's: its audit entry and the plan's failures are stored before
            // the operator is told (a leader killed at once lost the forget)
            self.stored_before_answered(epoch).await?;
        }
        match answer {
            Ok(status) if status.summary.is_some() => Ok(status),
            Ok(_) => self.status(&plan_id).await,
            // Not in the engine: the store says whether it ended or is yet to be taken over.
            Err(CoordinatorError::PlanNotFound(_)) => {
                let row = self.stored_plan(&plan_id).await?;
                let now = if row.state.is_terminal() || row.state == PlanState::AwaitingApproval {
                    row.state.to_string()
                } else {
                    format!(
                        "{} in the control store, not taken over by this coordinator yet",
                        row.state
                    )
                };
                Err(Conflict::NotCommitting { plan_id, now }.into())
            }
            Err(e) => Err(e),
        }
    }

    /// Plan status snapshots as they change, ending with the final one, or with
    /// `ShuttingDown` when this coordinator stops first.
    pub fn watch(
        &self,
        plan_id: String,
    ) -> mpsc::Receiver<Result<pb::PlanStatus, CoordinatorError>> {
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        let mut changes = self.inner.changes.subscribe();
        let stopping = self.inner.shutdown.stopping();
        let ended = tx.clone();
        let follow = async move {
            let mut last: Option<pb::PlanStatus> = None;
            // the final status the engine sent with the plan's end, if it did
            let mut told: Option<Arc<pb::PlanStatus>> = None;
            loop {
                let asked = match told.take() {
                    Some(s) => Ok(Arc::unwrap_or_clone(s)),
                    None => me.status(&plan_id).await,
                };
                let status = match asked {
                    Ok(s) => s,
                    Err(e) => {
                        // the watcher may have gone; either way the watch ends here
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let terminal = status
                    .summary
                    .as_ref()
                    .is_some_and(|s| PlanState::is_terminal_str(&s.state));
                let key = |s: &pb::PlanStatus| {
                    (
                        s.migrations.clone(),
                        s.summary.as_ref().map(|x| x.state.clone()),
                        s.failures.clone(),
                        s.waves
                            .iter()
                            .map(|w| (w.state.clone(), w.applied, w.failed))
                            .collect::<Vec<_>>(),
                        // a data change's rows, state and why (a lock wait too): a backfill
                        // of hours showed nothing between its start and its end, its bars
                        // still and a piped watch silent (at most one update each
                        // WATCH_COALESCE all the same)
                        s.data
                            .iter()
                            .map(|d| {
                                (
                                    d.migration_id.clone(),
                                    d.tenant.clone(),
                                    d.shard.clone(),
                                    d.state.clone(),
                                    d.reason.clone(),
                                    d.rows_done,
                                )
                            })
                            .collect::<Vec<_>>(),
                    )
                };
                let changed = last.as_ref().map(key) != Some(key(&status));
                if changed {
                    if tx.send(Ok(status.clone())).await.is_err() {
                        return;
                    }
                    last = Some(status);
                }
                if terminal {
                    return;
                }
                // Coalesce bursts of changes to one status every WATCH_COALESCE, but
                // look at once when the plan ends; a periodic look covers a missed one.
                let due = tokio::time::Instant::now() + WATCH_COALESCE;
                let tick = tokio::time::Instant::now() + Duration::from_secs(1);
                let mut pending = false;
                loop {
                    let wake = if pending { due } else { tick };
                    tokio::select! {
                        change = changes.recv() => match change {
                            Ok((id, ended)) if id == plan_id => {
                                if ended.is_some() {
                                    told = ended;
                                    break;
                                }
                                pending = true;
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => pending = true,
                            Err(broadcast::error::RecvError::Closed) => break,
                        },
                        _ = tokio::time::sleep_until(wake) => break,
                    }
                }
            }
        };
        tokio::spawn(async move {
            tokio::select! {
                () = follow => {}
                () = stopping => {
                    // The plan goes on under the next leader: the watcher is told this
                    // coordinator stopped, not shown a last status as if it were the end.
                    // A watcher whose buffer is full is not waited for.
                    let _ = ended.try_send(Err(CoordinatorError::ShuttingDown));
                }
            }
        });
        rx
    }

    pub async fn fleet(&self) -> Result<pb::ListFleetResponse, CoordinatorError> {
        Ok(self.fleet_and_store().await?.0)
    }

    /// The fleet's list, and why the control store did not answer for it (None: it did;
    /// then the list holds the agents away too).
    pub async fn fleet_and_store(
        &self,
    ) -> Result<(pb::ListFleetResponse, Option<String>), CoordinatorError> {
        // Agents attach to the leader only: a follower's view would say "gone".
        self.leader_epoch()?;
        // An agent that detached a moment ago: its row's "last seen" (written at the
        // detach) may still wait in the store writer; read before it lands, the row said the
        // agent was last seen at its attach. Bounded: with the store away, the list is
        // answered from what it has.
        // (the attached ones first: one that detaches after has its write queued before the
        // flush, or is shown attached)
        let attached = self.inner.fleet.snapshot();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.flush()).await;
        let mut out: BTreeMap<String, pb::AgentInfo> = BTreeMap::new();
        // The attached agents are the leader's own to tell; those away are the store's, which
        // may not answer (a failover of its server): the list is not held up for it.
        let stored = match tokio::time::timeout(
            std::time::Duration::from_secs(2),
            self.inner.store.agents(),
        )
        .await
        {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 2s".to_string()),
        };
        let note = match &stored {
            Ok(_) => String::new(),
            Err(why) => format!(
                "the control store does not answer ({why}): only the agents attached now are listed"
            ),
        };
        let store_down = stored.as_ref().err().cloned();
        for agent in stored.unwrap_or_default() {
            out.insert(
                agent.shard.clone(),
                pb::AgentInfo {
                    labels: agent.labels().into_iter().collect(),
                    tenants: agent
                        .tenants()
                        .into_iter()
                        .map(|(name, labels)| pb::Tenant {
                            schema_changed: false,
                            renamed_from: String::new(),
                            name,
                            labels: labels.into_iter().collect(),
                        })
                        .collect(),
                    connected: false,
                    last_seen_ms: agent.last_seen_ms as u64,
                    version: agent.version,
                    shard: agent.shard,
                    shard_unreachable: false,
                },
            );
        }
        for (shard, a) in attached {
            out.insert(
                shard.clone(),
                pb::AgentInfo {
                    shard,
                    labels: a.labels.into_iter().collect(),
                    tenants: a.tenants,
                    connected: true,
                    last_seen_ms: a.last_seen_ms as u64,
                    version: a.version,
                    shard_unreachable: a.shard_unreachable,
                },
            );
        }
        Ok((
            pb::ListFleetResponse {
                agents: out.into_values().collect(),
                note,
            },
            store_down,
        ))
    }
}

/// Whether the failpoint `coordinator::term_ends_after_flush` is set (never, unless built
/// with failpoints and told so).
fn term_ends_after_flush() -> bool {
    fail::fail_point!("coordinator::term_ends_after_flush", |_| true);
    false
}
