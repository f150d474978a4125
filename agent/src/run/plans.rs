//! Plans on this shard: their definitions, their queues of runs, and the lanes that drain
//! them. A lane holds one pooled connection while its plan has queued runs, so runs reuse
//! connections without a pool round trip (or a ping) between them.
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flotilla_core::pb;
use futures::FutureExt;
use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tracing::{Instrument, debug, info, info_span, instrument, warn};

use super::job::{self, Claimed, DefinitionError, Halts, Job, PlanDef, PlanError};
use super::two_phase::prepared_among;
use super::{Outgoing, executor};
use crate::data::{DataHooks, PlanControl};
use crate::error::{Failure, classify, is_lock_timeout};
use crate::{Agent, metrics, shard};

/// One plan's state on this shard.
pub(crate) struct Plan {
    pub id: String,
    /// The definition as this agent has it (see [`Definition`]): a watch, so the runs
    /// assigned while it is being read wait for it.
    definition: tokio::sync::watch::Sender<Definition>,
    /// Definitions received, counted: a read that ends after a later one began is dropped.
    reads: AtomicU64,
    /// The definition as it came, to know the same one sent again on a new stream: it is
    /// not split into statements again (a plan of 30 MB of SQL took the agent's one thread
    /// for seconds at every attach, its heartbeats stopped, the coordinator dropped the
    /// stream, and sent the definition again on the next: the agent never got out).
    received: Mutex<Option<pb::PlanDefinition>>,
    state: Mutex<PlanState>,
    changed: Notify,
    /// Pause and halt, as running data changes see them between batches.
    pub control: tokio::sync::watch::Sender<PlanControl>,
    /// Held for the whole of a rollback of the plan here: a second request (the coordinator
    /// asks again on every new stream, and one may come while the first still undoes) waits,
    /// then finds undone what the first undid. Two at once both read the same journal rows,
    /// and each ran every step's down SQL: twice for an UPDATE ... SET n = n - 1.
    pub undoing: tokio::sync::Mutex<()>,
}

/// A plan's definition on this shard.
#[derive(Default)]
enum Definition {
    /// None has arrived.
    #[default]
    None,
    /// One arrived and its SQL is being split into statements, off the agent's thread: a
    /// plan of tens of MB of SQL took it for seconds, and its heartbeats stopped.
    Reading,
    /// Read; Err when it did not validate.
    Read(Result<Arc<PlanDef>, DefinitionError>),
}

/// Runs whose journal one lane reads at once.
const JOURNAL_BATCH: usize = 64;

/// What a lane does next.
enum Next {
    /// Read the journal for these runs (taken off the queue), under the halt count then.
    Check(Vec<Job>, u64),
    Run(Box<Job>),
    /// Open the lane's connection before taking a run of an atomic unit (see `lane`).
    Connect,
    /// Nothing queued until another lane's batch comes back, or until the other lanes
    /// have their connections.
    Wait,
    /// The plan is paused here: no run starts until it is resumed (or halted).
    Paused,
}

#[derive(Default)]
struct PlanState {
    queue: VecDeque<Job>,
    lanes: usize,
    workers: usize,
    in_flight: usize,
    /// Runs a lane took off the queue to read their journal: they come back to it.
    checking: usize,
    /// Lanes holding their slot (counted when they got it, even before their task first
    /// ran), and those of them with a connection (or that failed to get one: their runs
    /// fail on it, rather than hold the others back).
    live: usize,
    connected: usize,
    /// Bumped by every halt, so runs read from the journal before it are not queued after it.
    halts: u64,
    /// A run of a plan that stops at a failure failed here, assigned under this epoch: its
    /// runs of that epoch (or before) queued then, and those assigned after, are not run
    /// (NOT_RUN) until a definition of a later generation (a retry) comes. The
    /// coordinator's halt follows, a round trip later: runs queued here went on meanwhile,
    /// seen with `policy = "stop"` and one lane (three tenants applied after the first had
    /// failed). Runs of a later epoch (a new leader's, which decides from what it knows)
    /// are run: a run of a deposed leader's failing on the fence stops nothing of its own.
    stopped: Option<u64>,
    generation: u64,
}

impl PlanState {
    /// Whether a run assigned under `epoch` is not to run: the plan stopped at a failure
    /// under that epoch or a later one.
    fn stopped_for(&self, epoch: u64) -> bool {
        self.stopped.is_some_and(|at| epoch <= at)
    }
}

impl PlanState {
    /// Nothing of the plan is queued here and nothing is in flight but the caller's `mine`
    /// runs: a result reported now is the last the shard has of it, with nothing left to
    /// batch it with, and the coordinator waits on it (the plan's end, the next wave, more
    /// runs). Decided in the same locked step that counts the runs out of `in_flight`.
    fn nothing_else(&self, mine: usize) -> bool {
        self.queue.is_empty() && self.in_flight <= mine
    }
}

impl Plan {
    /// Runs of this plan queued or running here.
    pub fn busy(&self) -> bool {
        let st = self.state.lock().expect("plan lock");
        st.in_flight > 0 || !st.queue.is_empty()
    }

    /// The plan's definition, once read (waiting while one that arrived is being read).
    pub async fn definition(&self) -> Result<Arc<PlanDef>, PlanError> {
        let mut rx = self.definition.subscribe();
        // the sender lives as long as `self`: the wait cannot see it closed
        let read = rx
            .wait_for(|d| !matches!(d, Definition::Reading))
            .await
            .expect("the plan holds the sender");
        match &*read {
            Definition::Read(Ok(def)) => Ok(def.clone()),
            Definition::Read(Err(e)) => Err(PlanError::Invalid {
                plan: self.id.clone(),
                source: e.clone(),
            }),
            Definition::None | Definition::Reading => Err(PlanError::Missing(self.id.clone())),
        }
    }

    /// Waits until no run of the plan is executing.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.changed.notified();
            if self.state.lock().expect("plan lock").in_flight == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Agent {
    /// The plans this agent has now (a copy of the list: none is held locked while each is
    /// looked at).
    fn plans_now(&self) -> Vec<Arc<Plan>> {
        self.plans
            .lock()
            .expect("plans lock")
            .values()
            .cloned()
            .collect()
    }

    /// Whether any plan has runs queued or running on this shard.
    pub(crate) fn runs_busy(&self) -> bool {
        self.plans_now().iter().any(|p| p.busy())
    }

    pub(crate) fn plan(&self, plan_id: &str) -> Arc<Plan> {
        let mut plans = self.plans.lock().expect("plans lock");
        plans
            .entry(plan_id.to_string())
            .or_insert_with(|| {
                Arc::new(Plan {
                    id: plan_id.to_string(),
                    definition: tokio::sync::watch::Sender::new(Definition::None),
                    reads: AtomicU64::new(0),
                    received: Mutex::new(None),
                    state: Mutex::new(PlanState::default()),
                    changed: Notify::new(),
                    control: tokio::sync::watch::Sender::new(Default::default()),
                    undoing: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// Takes a plan's definition: its SQL is split into statements on a blocking thread
    /// (the stream's task goes on with heartbeats); runs assigned meanwhile wait for it.
    #[instrument(skip_all, fields(shard = %self.config.shard, plan = %def.plan_id))]
    pub(crate) fn define_plan(&self, def: pb::PlanDefinition) {
        let plan = self.plan(&def.plan_id);
        {
            let received = plan.received.lock().expect("plan lock");
            if received.as_ref() == Some(&def) {
                debug!("the plan's definition again, as this agent has it");
                return;
            }
        }
        *plan.received.lock().expect("plan lock") = Some(def.clone());
        let read = plan.reads.fetch_add(1, Ordering::SeqCst) + 1;
        plan.definition.send_replace(Definition::Reading);
        let span = tracing::Span::current();
        self.tasks.spawn(
            async move {
                let converted = match tokio::task::spawn_blocking(move || {
                    fail::fail_point!("agent::reading_definition");
                    PlanDef::from_pb(def)
                })
                .await
                {
                    Ok(converted) => converted.map(Arc::new),
                    Err(e) => Err(DefinitionError::Aborted(e.to_string())),
                };
                let generation = converted.as_ref().ok().map(|d| d.generation);
                let rejected = converted.as_ref().err().map(ToString::to_string);
                // Under the watch's lock, which a definition received since (a retry's)
                // takes to say it is being read: that one is the plan's now, not this.
                let taken = plan.definition.send_if_modified(|d| {
                    if plan.reads.load(Ordering::SeqCst) != read {
                        return false;
                    }
                    // A retry's definition is newer (one sent again on a new stream is not):
                    // the plan's stop is lifted before the runs waiting for it see it.
                    if let Some(generation) = generation {
                        let mut st = plan.state.lock().expect("plan lock");
                        if generation > st.generation {
                            st.generation = generation;
                            st.stopped = None;
                        }
                    }
                    *d = Definition::Read(converted);
                    true
                });
                if let (true, Some(error)) = (taken, rejected) {
                    warn!(%error, "plan definition rejected; its runs will fail");
                }
            }
            .instrument(span),
        );
    }

    /// Sends a run's result toward the coordinator (now, or after the next Hello).
    pub(crate) fn report(&self, plan_id: &str, result: pb::RunResult) {
        // The last run of the plan this shard has (the caller counts it done after this)
        let plan = self.plans.lock().expect("plans lock").get(plan_id).cloned();
        let last = plan.is_none_or(|p| p.state.lock().expect("plan lock").nothing_else(1));
        self.report_with(plan_id, result, last);
    }

    /// [`Agent::report`], saying whether the result must go at once (see `Outbox`).
    fn report_with(&self, plan_id: &str, result: pb::RunResult, last: bool) {
        for step in &result.steps {
            metrics::step_finished(counted_as(step));
        }
        self.send_out(Outgoing::Run {
            plan_id: plan_id.to_string(),
            result,
            last,
        });
    }

    /// Queues the runs of an Assign after one journal read for all of them.
    #[instrument(skip_all, fields(shard = %self.config.shard, plan = %assign.plan_id, runs = assign.runs.len()))]
    pub(crate) fn assign(self: &Arc<Self>, assign: pb::Assign) {
        let plan = self.plan(&assign.plan_id);
        let halts = {
            let mut st = plan.state.lock().expect("plan lock");
            st.lanes = assign.lanes.max(1) as usize;
            st.halts
        };
        let agent = self.clone();
        let span = tracing::Span::current();
        self.tasks.spawn(
            async move {
                let def = match plan.definition().await {
                    Ok(def) => def,
                    Err(message) => {
                        warn!(%message, "runs assigned for a plan without a valid definition");
                        for run in &assign.runs {
                            let failure = Failure::agent("definition", message.to_string());
                            agent.report(&plan.id, job::all_failed(run, &failure));
                        }
                        return;
                    }
                };
                agent
                    .queue_runs(plan, def, assign.epoch, assign.runs, halts)
                    .await
            }
            .instrument(span),
        );
    }

    async fn queue_runs(
        self: Arc<Self>,
        plan: Arc<Plan>,
        def: Arc<PlanDef>,
        epoch: u64,
        runs: Vec<pb::Run>,
        halts: u64,
    ) {
        let mut jobs = Vec::with_capacity(runs.len());
        let hooks = Arc::new(DataHooks {
            plan_id: plan.id.clone(),
            shard: self.config.shard.clone(),
            control: plan.control.subscribe(),
            board: self.progress.clone(),
            buckets: self.buckets.clone(),
        });
        // the same count as the queue's (`halt` moves both): a halt since this Assign drops
        // these runs before they are queued, or stops them once they run
        let watch = Halts {
            control: plan.control.subscribe(),
            at_queue: halts,
        };
        for run in runs {
            match Job::new(&def, run, epoch) {
                Ok(mut job) => {
                    job.halts = Some(watch.clone());
                    job.queued_under = self.welcome_epoch.load(Ordering::Relaxed);
                    // (a schema step's too: it shows its lock waits on the board)
                    job.hooks = Some(hooks.clone());
                    match self
                        .runs_in_flight
                        .claim(job.claim_key(), job.claimed_steps())
                    {
                        Claimed::Run(claim) => job.claim = Some(claim),
                        Claimed::Copy => {
                            debug!(run = job.run.run_id, tenant = %job.tenant, "a copy of this run is already queued or running; its result answers");
                            continue;
                        }
                        Claimed::StepsBusy => {
                            info!(run = job.run.run_id, tenant = %job.tenant, "a copy of this run an earlier leader sent is queued or running here: queued once it ends, the journal answering for what it applied");
                            self.queue_after_its_copy(&plan, job, epoch, halts);
                            continue;
                        }
                    }
                    jobs.push(job);
                }
                Err(rejected) => {
                    let (run, failure) = *rejected;
                    self.report(&plan.id, job::all_failed(&run, &failure));
                }
            }
        }
        self.advance_fence(epoch).await;
        // Prepared transactions before the journal: a resent run whose transaction is
        // prepared runs nothing (its journal rows are inside it, invisible). In this order a
        // COMMIT PREPARED between the two reads shows in the journal read.
        let gids: Vec<String> = jobs
            .iter()
            .filter_map(|j| j.prepare.as_ref().map(|p| p.gid.clone()))
            .collect();
        let prepared = if gids.is_empty() {
            HashSet::new()
        } else {
            match prepared_among(&self.pool, &gids).await {
                Ok(found) => found,
                Err(error) => {
                    // a copy that runs again fails on the prepared one's locks or gid, and
                    // the failure path asks again
                    warn!(%error, "reading the prepared transactions before the runs failed; running them unchecked");
                    HashSet::new()
                }
            }
        };
        let mut todo = Vec::with_capacity(jobs.len());
        for job in jobs {
            if job
                .prepare
                .as_ref()
                .is_some_and(|p| prepared.contains(&p.gid))
            {
                debug!(
                    run = job.run.run_id,
                    "the run's transaction is already prepared"
                );
                self.report(&plan.id, job.prepared_result());
            } else {
                todo.push(job);
            }
        }
        let mut st = plan.state.lock().expect("plan lock");
        if st.halts != halts || st.stopped_for(epoch) || self.cancel.is_cancelled() {
            drop(st);
            for job in todo {
                self.report(&plan.id, job::not_run(&job.run));
            }
            return;
        }
        // The journal is read for them by the lane that takes them (see `check_journal`).
        st.queue.extend(todo);
        self.fill_lanes(&plan, &mut st);
    }

    /// Queues `job` once the copy of its steps an earlier leader sent (another run id) is no
    /// longer queued or running here; the lane that takes it reads the journal, which then
    /// answers for what that copy applied. Dropped as [`Self::queue_runs`] drops runs when
    /// the plan was halted or stopped meanwhile.
    fn queue_after_its_copy(
        self: &Arc<Self>,
        plan: &Arc<Plan>,
        mut job: Job,
        epoch: u64,
        halts: u64,
    ) {
        let (agent, plan) = (self.clone(), plan.clone());
        self.tasks.spawn(async move {
            let Some(claim) = agent
                .runs_in_flight
                .claim_when_free(job.claim_key(), job.claimed_steps())
                .await
            else {
                return;
            };
            job.claim = Some(claim);
            let mut st = plan.state.lock().expect("plan lock");
            if st.halts != halts || st.stopped_for(epoch) || agent.cancel.is_cancelled() {
                drop(st);
                agent.report(&plan.id, job::not_run(&job.run));
                return;
            }
            st.queue.push_back(job);
            agent.fill_lanes(&plan, &mut st);
        });
    }

    /// Starts lanes up to the plan's lanes, as far as its queued and running runs need.
    fn fill_lanes(self: &Arc<Self>, plan: &Arc<Plan>, st: &mut PlanState) {
        let wanted = st.lanes.min(st.queue.len() + st.in_flight);
        while st.workers < wanted {
            st.workers += 1;
            // A lane whose slot is free counts as live from here, not from its task's first
            // poll: another lane that read the journal on an open connection could otherwise
            // find every live lane connected and start its atomic run before this one was
            // counted (seen on a loaded machine: runs started a connection's time apart). One
            // that waits for a slot counts once it has it, so lanes waiting on slots that
            // other plans hold never hold back the runs of lanes that have theirs.
            let slot = self.slots.clone().try_acquire_owned().ok();
            if slot.is_some() {
                st.live += 1;
            }
            // A span of its own (it names the shard and the plan): a lane started by
            // another lane nested in it, and log lines read `lane{..}:lane{..}:...` past
            // 300 characters.
            let span =
                info_span!(parent: None, "lane", shard = %self.config.shard, plan = %plan.id);
            self.tasks
                .spawn(self.clone().lane(plan.clone(), slot).instrument(span));
        }
    }

    /// Advances the shard's fence once per new epoch, before steps of that epoch
    /// run. A failure here is not final: each step checks the fence itself.
    pub(crate) async fn advance_fence(&self, epoch: u64) {
        if self.fence_advanced.load(Ordering::Relaxed) >= epoch {
            return;
        }
        match shard::advance_fence(&self.pool, epoch).await {
            Ok(()) => {
                self.fence_advanced.fetch_max(epoch, Ordering::Relaxed);
            }
            Err(error) => {
                if is_lock_timeout(&error) {
                    warn!(
                        epoch,
                        "could not advance the shard's fence: a transaction of an older epoch holds it (a step of an earlier leader's still running, or a prepared transaction until it is resolved)"
                    );
                } else {
                    warn!(%error, epoch, "could not advance the shard's fence");
                }
            }
        }
    }

    /// A run queued under an earlier leader's term, and a newer leader has welcomed this
    /// agent since: the deposed leader's (a run a leader hands out after its welcome, of an
    /// older epoch, is the shard's fence's to refuse).
    fn handed_out_before_a_newer_leader(&self, job: &Job) -> bool {
        let now = self.welcome_epoch.load(Ordering::Relaxed);
        job.queued_under < now && job.epoch < now
    }

    /// A leader of a newer term (`epoch`) welcomed this agent: the shard's fence moves to its
    /// epoch, so that runs an earlier leader handed out and still queued here are refused by
    /// it (reported fenced; the new leader sends its own). A step of the old term under way
    /// holds the fence row until it ends: tried again a few times (each attempt waits up to
    /// the fence's lock timeout), then left to the new leader's first runs, which advance it
    /// too.
    pub(crate) async fn advance_fence_for_new_leader(&self, epoch: u64) {
        for attempt in 1..=5 {
            if self.fence_advanced.load(Ordering::Relaxed) >= epoch
                || self.welcome_epoch.load(Ordering::Relaxed) != epoch
            {
                return;
            }
            match shard::advance_fence(&self.pool, epoch).await {
                Ok(()) => {
                    self.fence_advanced.fetch_max(epoch, Ordering::Relaxed);
                    tracing::info!(
                        epoch,
                        "the shard's fence moved to the new leader's epoch: an earlier leader's runs still queued here are refused"
                    );
                    return;
                }
                Err(error) if is_lock_timeout(&error) => {
                    if attempt == 1 {
                        tracing::info!(
                            epoch,
                            "the shard's fence waits for a transaction of an older epoch (a step still running, or a prepared transaction) before it moves to the new leader's epoch"
                        );
                    }
                }
                Err(error) => {
                    warn!(%error, epoch, "could not advance the shard's fence");
                    return;
                }
            }
        }
    }

    /// A leader of a newer term (`epoch`) welcomed this agent: the runs of atomic units an
    /// earlier term handed out and that are still queued here are dropped (reported
    /// NOT_RUN). A new leader presumes such a unit aborted; run on, each PREPAREd after
    /// that, holding its target's locks with the plan already said rolled back, until the
    /// in-doubt sweep found it. Other runs go on: their results are the new leader's too.
    pub(crate) fn drop_stale_atomic_runs(&self, epoch: u64) {
        for plan in self.plans_now() {
            let dropped: Vec<Job> = {
                let mut st = plan.state.lock().expect("plan lock");
                let (dropped, kept): (VecDeque<Job>, VecDeque<Job>) = std::mem::take(&mut st.queue)
                    .into_iter()
                    .partition(|job| job.prepare.is_some() && job.epoch < epoch);
                st.queue = kept;
                Vec::from(dropped)
            };
            if dropped.is_empty() {
                continue;
            }
            tracing::info!(plan = %plan.id, dropped = dropped.len(), epoch, "an earlier leader's atomic runs queued here are not run: the new leader presumes their unit aborted");
            for job in dropped {
                self.report(&plan.id, job::not_run(&job.run));
            }
            plan.changed.notify_waiters();
        }
    }

    /// Drops the plan's queued runs (reported NOT_RUN); runs in flight finish.
    #[instrument(skip_all, fields(shard = %self.config.shard, plan = %plan.id))]
    pub(crate) fn halt(&self, plan: &Plan) {
        let dropped: Vec<Job> = {
            let mut st = plan.state.lock().expect("plan lock");
            st.halts += 1;
            st.queue.drain(..).collect()
        };
        // running data changes stop at their next batch boundary
        plan.control.send_modify(|c| c.halts += 1);
        if !dropped.is_empty() {
            tracing::info!(dropped = dropped.len(), "plan halted");
        }
        for job in dropped {
            self.report(&plan.id, job::not_run(&job.run));
        }
        // lanes waiting on the queue (a paused plan's among them) find it empty and end,
        // giving back their slots (they waited for a resume that a halted plan never gets)
        plan.changed.notify_waiters();
    }

    /// One lane: takes runs from the plan's queue until it is empty, on one connection. Runs
    /// whose journal is not read yet are taken as a batch and looked up first, on the
    /// lane's own connection: a read on a connection of its own would keep one more session
    /// open on the server for the whole rollout, and every open session replays each catalog
    /// invalidation the migrations' DDL sends (see `shard::connect`'s pool).
    ///
    /// The runs of an atomic unit (each ends in PREPARE TRANSACTION) start together: a lane
    /// opens its connection before it takes one, and takes it once every lane of the plan
    /// has one. Each target holds its locks from its PREPARE until the unit's last target
    /// prepared; lanes that started as their connections opened (a backend's start, tens
    /// of milliseconds each on a busy server) spread the PREPAREs by as much. Measured in
    /// `scripts/bench-two-phase.sh` with every target at once (PAR=160, agents'
    /// `--max-connections 12`): the first of a shard's runs ended 0.5 s before its last;
    /// with the lanes starting together, each target's PREPARE-to-COMMIT PREPARED median
    /// 322 ms against 477 ms, max 785 ms against 941 ms (medians of 3 runs).
    /// A lane that cannot get a connection counts as ready: its run fails on that.
    /// (Tests: `two_phase::an_atomic_units_runs_start_together` and
    /// `two_phase::an_atomic_units_runs_wait_for_late_lanes` in the agent's tests.)
    async fn lane(self: Arc<Self>, plan: Arc<Plan>, slot: Option<OwnedSemaphorePermit>) {
        lane_start_failpoint().await;
        let mut slot = Some(match slot {
            Some(slot) => Ok(slot),
            None => {
                let slot = self.slots.clone().acquire_owned().await;
                plan.state.lock().expect("plan lock").live += 1;
                slot
            }
        });
        let mut conn: Option<PoolConnection<Postgres>> = None;
        let mut connected = false;
        loop {
            // no new run without the shard's agent lock (false: stopping; the check below ends the lane)
            let _ = self.may_apply().await;
            let changed = plan.changed.notified();
            let next = {
                let mut st = plan.state.lock().expect("plan lock");
                let stop = st.workers > st.lanes || self.cancel.is_cancelled();
                match st.queue.front() {
                    Some(job) if !stop && !job.checked => {
                        let n = st
                            .queue
                            .iter()
                            .take(JOURNAL_BATCH)
                            .take_while(|j| !j.checked)
                            .count();
                        st.in_flight += n;
                        st.checking += n;
                        Next::Check(st.queue.drain(..n).collect(), st.halts)
                    }
                    Some(job) if !stop && job.prepare.is_some() && !connected => Next::Connect,
                    Some(job) if !stop && job.prepare.is_some() && st.connected < st.live => {
                        Next::Wait
                    }
                    // Paused: the runs handed out before the pause stay queued (they ran on,
                    // and a paused plan completed). An atomic unit's runs go on: a target
                    // that prepared holds its locks until the unit's last one has.
                    Some(job)
                        if !stop
                            && job.prepare.is_none()
                            && plan.control.borrow().paused.is_some() =>
                    {
                        Next::Paused
                    }
                    Some(_) if !stop => {
                        st.in_flight += 1;
                        Next::Run(Box::new(st.queue.pop_front().expect("a queued run")))
                    }
                    // Another lane is reading the journal for runs it will queue again: wait
                    // for them on this connection, rather than end and leave their start to
                    // a new lane on whichever pooled connection comes first.
                    None if !stop && st.checking > 0 => Next::Wait,
                    _ => {
                        // the slot goes before the lane stops counting, so that a lane
                        // started once it stopped finds the slot free (and counts as live)
                        drop(slot.take());
                        st.workers -= 1;
                        st.live -= 1;
                        if connected {
                            st.connected -= 1;
                        }
                        break;
                    }
                }
            };
            // A lane counts as connected once it tried for its connection, whatever it runs
            // (a lane busy with a long run of another kind holds back no atomic run).
            let mark_connected = |connected: &mut bool| {
                if !*connected {
                    *connected = true;
                    plan.state.lock().expect("plan lock").connected += 1;
                    plan.changed.notify_waiters();
                }
            };
            match next {
                Next::Check(batch, halts) => {
                    let n = batch.len();
                    let reported = self.check_journal(&plan, &mut conn, batch, halts).await;
                    mark_connected(&mut connected);
                    let mut st = plan.state.lock().expect("plan lock");
                    st.in_flight -= n - reported;
                    st.checking -= n;
                }
                Next::Connect => {
                    if conn.is_none() {
                        // a failure is the run's to report (`execute` tries again)
                        conn = self.pool.acquire().await.ok();
                    }
                    mark_connected(&mut connected);
                }
                Next::Wait => {
                    changed.await;
                    continue;
                }
                Next::Paused => {
                    // (the session goes back to the pool for as long as the pause lasts)
                    conn = None;
                    let mut control = plan.control.subscribe();
                    let halts = control.borrow().halts;
                    tokio::select! {
                        _ = control.wait_for(|c| c.paused.is_none() || c.halts != halts) => {}
                        // a halt empties the queue; another Assign queues more
                        () = changed => {}
                        () = self.cancel.cancelled() => {}
                    }
                    continue;
                }
                Next::Run(job)
                    if self.handed_out_before_a_newer_leader(&job)
                        || (job.prepare.is_some()
                            && job.epoch < self.welcome_epoch.load(Ordering::Relaxed)) =>
                {
                    // An earlier term's run, not started when a newer leader welcomed this
                    // agent: a deposed leader changes nothing (invariant 2), so it is not
                    // run (the new leader hands out its own). An atomic one that got past
                    // the welcome's drop (back from a journal read, or queued by an Assign
                    // that waited for its definition): the new leader presumed its unit
                    // aborted. Before, a plain one went on applying for seconds under the
                    // new leader's term; the shard's fence, moved at the welcome, refuses
                    // it too, but only once a step under way lets go of the fence row.
                    mark_connected(&mut connected);
                    let mut st = plan.state.lock().expect("plan lock");
                    debug!(
                        run = job.run.run_id,
                        epoch = job.epoch,
                        "an earlier term's run: not run (a newer leader welcomed this agent)"
                    );
                    self.report_with(&plan.id, job::not_run(&job.run), st.nothing_else(1));
                    st.in_flight -= 1;
                }
                Next::Run(job) => {
                    // an atomic run got here connected; another kind tries in `execute`
                    mark_connected(&mut connected);
                    // The fence at the run's epoch in a transaction of its own, if the try
                    // at queue time failed (an older epoch's prepared transaction held the
                    // row, and may be resolved by now): else the step's own fence check
                    // writes it, and a step that then PREPAREs holds the fence row until
                    // its decision, so every other step here times out on it and the unit
                    // aborts. Nothing but a read when the fence is there already.
                    self.advance_fence(job.epoch).await;
                    let result = self.execute(&mut conn, &job).await;
                    // Prepared for a leader since replaced (its run was under way at the
                    // change): the new leader presumed the unit aborted, and has no Resolve
                    // for a transaction it never heard of.
                    if let Some(p) = &job.prepare
                        && job.epoch < self.welcome_epoch.load(Ordering::Relaxed)
                        && result.as_ref().is_some_and(|r| {
                            r.steps
                                .iter()
                                .any(|s| s.outcome == pb::StepOutcome::Prepared as i32)
                        })
                    {
                        let agent = self.clone();
                        let gid = p.gid.clone();
                        self.tasks
                            .spawn(async move { agent.resolve_stale(gid).await });
                    }
                    // Whether it was the plan's last run here, and counting it out, in one
                    // step: two lanes ending at once would otherwise each see the other in
                    // flight, and neither result would go at once (see `Outbox`).
                    let mut st = plan.state.lock().expect("plan lock");
                    // A plan that stops at a failure: its runs queued here are not run. The
                    // failure goes first, so the coordinator stops the plan before it reads
                    // their NOT_RUN (read while it runs, they would be handed out again).
                    let failed = result.as_ref().is_some_and(|r| {
                        r.steps
                            .iter()
                            .any(|s| s.outcome == pb::StepOutcome::Failed as i32)
                    });
                    let dropped =
                        if failed && job.plan.stop_on_failure && !st.stopped_for(job.epoch) {
                            st.stopped = Some(job.epoch);
                            let (dropped, kept): (VecDeque<Job>, VecDeque<Job>) =
                                std::mem::take(&mut st.queue)
                                    .into_iter()
                                    .partition(|queued| queued.epoch <= job.epoch);
                            st.queue = kept;
                            Vec::from(dropped)
                        } else {
                            Vec::new()
                        };
                    if let Some(result) = result {
                        self.report_with(&plan.id, result, st.nothing_else(1));
                    }
                    if !dropped.is_empty() {
                        tracing::info!(
                            run = job.run.run_id,
                            dropped = dropped.len(),
                            "a run failed: the plan stops here, its queued runs are not run"
                        );
                    }
                    for dropped in dropped {
                        self.report_with(&plan.id, job::not_run(&dropped.run), false);
                    }
                    st.in_flight -= 1;
                }
            }
            plan.changed.notify_waiters();
        }
        plan.changed.notify_waiters();
    }

    /// Reads the journal for a batch of queued runs in one query on the lane's connection:
    /// a run found fully applied is reported so, the others go back to the front of the
    /// queue (in their order) knowing which of their steps are applied. A halt meanwhile
    /// (`halts` moved) drops them like the queue it drained. Returns how many of the batch
    /// it reported (and counted out of `in_flight`).
    async fn check_journal(
        self: &Arc<Self>,
        plan: &Arc<Plan>,
        conn: &mut Option<PoolConnection<Postgres>>,
        mut batch: Vec<Job>,
        halts: u64,
    ) -> usize {
        let targets: BTreeSet<&str> = batch.iter().map(|j| j.tenant.as_str()).collect();
        let migrations: BTreeSet<&str> = batch
            .iter()
            .flat_map(|j| j.steps.iter().map(|s| s.id()))
            .collect();
        let targets: Vec<String> = targets.into_iter().map(str::to_string).collect();
        let migrations: Vec<String> = migrations.into_iter().map(str::to_string).collect();
        if conn.is_none() {
            // no connection: the runs fail on it one by one, each saying why
            *conn = self.pool.acquire().await.ok();
        }
        let read = match conn.as_mut() {
            Some(c) => shard::read_applied(c, &targets, &migrations).await,
            None => Err(sqlx::Error::PoolTimedOut),
        };
        let mut changed = Vec::new();
        let mut renamed = Vec::new();
        let mut gone = Vec::new();
        match read {
            Ok(found) => {
                let mut by_key: HashMap<(String, String), job::Found> = found
                    .rows
                    .into_iter()
                    .map(|r| ((r.target.clone(), r.migration_id.clone()), r.into()))
                    .collect();
                for job in &mut batch {
                    job.mark_applied(&mut by_key);
                }
                changed = found.changed;
                renamed = found.renamed;
                gone = found.gone;
            }
            // The journal decides anyway: a step applied meanwhile fails its journal insert
            // (or its up SQL) and the failure path re-reads the journal.
            Err(error) => {
                warn!(%error, "reading the journal before the runs failed; running them unchecked")
            }
        }
        // What this batch reports goes at once when nothing is left to batch it with (what
        // is in flight is this batch's, counted out here as it is reported, in the same
        // step as that is decided), or when it is a target of an atomic unit (the decision
        // waits for every one).
        let n = batch.len();
        let mut todo = Vec::with_capacity(n);
        let mut applied = Vec::new();
        for mut job in batch {
            // A tenant holding another's schema (renamed, or swapped with it): what is
            // applied there is in the other name's journal rows, and its migrations would
            // run again (said before it is taken for a changed schema, which it is too).
            if let Some((_, before)) = renamed.iter().find(|(t, _)| *t == job.tenant) {
                let why = shard::renamed_tenant(&self.config.shard, &job.tenant, before);
                let failed = job::all_failed(&job.run, &Failure::agent("up", why));
                applied.push((job.prepare.is_some(), failed));
                continue;
            }
            // A tenant whose schema changed since its journal was written: what is applied
            // there is not known, and nothing runs until an operator says (the step fails,
            // saying how).
            if changed.contains(&job.tenant) {
                let why = shard::changed_schema(&self.config.shard, &job.tenant);
                let failed = job::all_failed(&job.run, &Failure::agent("up", why));
                applied.push((job.prepare.is_some(), failed));
                continue;
            }
            // A tenant dropped since the plan was submitted: nothing runs there (its steps
            // would run with no schema of its own on the search_path), and it is no failure.
            if gone.contains(&job.tenant) {
                let why = shard::gone_tenant(&job.tenant);
                applied.push((job.prepare.is_some(), job::all_gone(&job.run, why)));
                continue;
            }
            if job.fully_applied() {
                applied.push((job.prepare.is_some(), job.already_applied_result()));
            } else {
                job.checked = true;
                todo.push(job);
            }
        }
        let mut st = plan.state.lock().expect("plan lock");
        // runs of an epoch the plan stopped at (a failure meanwhile) are not run either
        let (stopped, todo): (Vec<Job>, Vec<Job>) =
            todo.into_iter().partition(|j| st.stopped_for(j.epoch));
        applied.extend(stopped.iter().map(|j| (false, job::not_run(&j.run))));
        let count = applied.len();
        let last = todo.is_empty() && st.nothing_else(n);
        for (i, (atomic, result)) in applied.into_iter().enumerate() {
            self.report_with(&plan.id, result, atomic || (last && i + 1 == count));
        }
        st.in_flight -= count;
        if st.halts != halts || self.cancel.is_cancelled() {
            let (left, last) = (todo.len(), st.nothing_else(todo.len()));
            for (i, job) in todo.into_iter().enumerate() {
                self.report_with(&plan.id, job::not_run(&job.run), last && i + 1 == left);
            }
            st.in_flight -= left;
            return n;
        }
        for job in todo.into_iter().rev() {
            st.queue.push_front(job);
        }
        // a lane may have ended meanwhile (the plan's lanes went down, then up again)
        self.fill_lanes(plan, &mut st);
        count
    }

    /// Runs one job on the lane's connection (acquiring one if needed). None when the agent
    /// is stopping and abandoned the run (the shard rolls back what was open).
    async fn execute(
        &self,
        conn: &mut Option<PoolConnection<Postgres>>,
        job: &Job,
    ) -> Option<pb::RunResult> {
        if conn.is_none() {
            let mut acquired = self.pool.acquire().await;
            if let Err(e) = &acquired
                && classify(e, "connect").server_gone()
            {
                // The server going down or coming back (a restart, its crash recovery):
                // nothing of the run ran, and its steps must not fail for it. Asked again
                // once the server answers (at most a minute).
                super::conn::wait_for_server(&self.pool).await;
                acquired = self.pool.acquire().await;
            }
            match acquired {
                Ok(c) => *conn = Some(c),
                Err(e) => {
                    let failure = classify(&e, "connect");
                    warn!(tenant = %job.tenant, error = %failure.error.message, "no shard connection for the run");
                    return Some(job::all_failed(&job.run, &failure));
                }
            }
        }
        let c = conn.as_mut().expect("connection");
        metrics::run_started();
        let run = AssertUnwindSafe(executor::execute_run(c, &self.pool, job)).catch_unwind();
        let outcome = tokio::select! {
            out = run => Some(out),
            () = self.abort.cancelled() => None,
        };
        metrics::run_finished();
        let (result, broken) = match outcome {
            None => (None, true),
            Some(Ok(out)) => (Some(out.result), out.broken),
            Some(Err(_panic)) => {
                let failure = Failure::agent("up", "the agent panicked while running this run");
                (Some(job::all_failed(&job.run, &failure)), true)
            }
        };
        if broken {
            // never hand a connection in an unknown state back to the pool
            if let Some(mut c) = conn.take() {
                c.close_on_drop();
            }
        }
        result
    }
}

/// `agent::lane_start=return(MS)` (feature `testing`): a lane's task waits MS milliseconds
/// before its first step, as a lane spawned on a loaded machine waits for its first poll.
async fn lane_start_failpoint() {
    #[cfg(feature = "testing")]
    if let Some(Some(ms)) = fail::eval("agent::lane_start", |arg| arg) {
        let ms = ms.parse().expect("agent::lane_start=return(MS)");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// What a step's result counts as in `flotilla_agent_steps_total`: a step the shard's fence
/// refused (after a change of leader; the new leader runs it again) is `fenced`, not
/// `failed`, which pages someone.
fn counted_as(step: &pb::StepResult) -> metrics::StepOutcome {
    match pb::StepOutcome::try_from(step.outcome) {
        Ok(pb::StepOutcome::Applied) => metrics::StepOutcome::Applied,
        Ok(pb::StepOutcome::AlreadyApplied) => metrics::StepOutcome::AlreadyApplied,
        Ok(pb::StepOutcome::NotRun) => metrics::StepOutcome::NotRun,
        Ok(pb::StepOutcome::Prepared) => metrics::StepOutcome::Prepared,
        _ if step
            .error
            .as_ref()
            .is_some_and(|e| e.sqlstate == flotilla_core::protocol::sqlstate::FENCED) =>
        {
            metrics::StepOutcome::Fenced
        }
        _ => metrics::StepOutcome::Failed,
    }
}

#[cfg(test)]
mod counted_tests {
    use super::*;

    #[test]
    fn a_fenced_step_is_not_counted_failed() {
        let failed = |sqlstate: &str| pb::StepResult {
            outcome: pb::StepOutcome::Failed as i32,
            error: Some(pb::StepError {
                sqlstate: sqlstate.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(counted_as(&failed("FL002")), metrics::StepOutcome::Fenced);
        assert_eq!(counted_as(&failed("42P07")), metrics::StepOutcome::Failed);
        let applied = pb::StepResult {
            outcome: pb::StepOutcome::Applied as i32,
            ..Default::default()
        };
        assert_eq!(counted_as(&applied), metrics::StepOutcome::Applied);
    }
}
