//! The engine against a fake agent stream (a channel), with the embedded coordination
//! backend: what reaches an agent, and in which order.
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::pb;
use flotilla_core::pb::coordinator_message::Body;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{Engine, Event};
use crate::coordination::EmbeddedCoordination;
use crate::plan::tests::plan_of;
use crate::sessions::registry::{AttachedAgent, Fleet};
use crate::store::StoreOp;

/// An engine leading under epoch 1, its store writes answered and dropped.
fn engine() -> mpsc::Sender<Event> {
    engine_with(Arc::new(Fleet::default()))
}

/// [`engine`] over the given registry of attached agents.
fn engine_with(fleet: Arc<Fleet>) -> mpsc::Sender<Event> {
    engine_telling(fleet, broadcast::channel(16).0)
}

/// [`engine_with`], telling `changes` what changed (as it tells plan watches).
fn engine_telling(fleet: Arc<Fleet>, changes: super::Changes) -> mpsc::Sender<Event> {
    engine_storing(fleet, changes, true)
}

/// [`engine_telling`]; `flushes`: whether the store answers flushes (false: a store out of
/// reach, whose writer keeps trying and answers nothing).
fn engine_storing(
    fleet: Arc<Fleet>,
    changes: super::Changes,
    flushes: bool,
) -> mpsc::Sender<Event> {
    engine_full(fleet, changes, flushes, Duration::from_secs(30))
}

/// [`engine_storing`] with the grace an agent gone has before its runs fail.
fn engine_full(
    fleet: Arc<Fleet>,
    changes: super::Changes,
    flushes: bool,
    agent_grace: Duration,
) -> mpsc::Sender<Event> {
    engine_deciding(
        fleet,
        changes,
        flushes,
        agent_grace,
        Arc::new(EmbeddedCoordination::new(1)),
    )
}

/// [`engine_full`] on the given coordination backend (decisions written before the start).
fn engine_deciding(
    fleet: Arc<Fleet>,
    changes: super::Changes,
    flushes: bool,
    agent_grace: Duration,
    coordination: Arc<EmbeddedCoordination>,
) -> mpsc::Sender<Event> {
    let (store, mut writes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((_, op)) = writes.recv().await {
            if let StoreOp::Flush(done) = op {
                if flushes {
                    let _ = done.send(());
                } else {
                    held.push(done);
                }
            }
        }
    });
    let (events, rx) = mpsc::channel(64);
    let engine = Engine::new(
        coordination,
        agent_grace,
        store,
        changes,
        fleet,
        events.clone(),
        Default::default(),
    );
    tokio::spawn(engine.run(rx));
    events
}

/// An agent of `shard` attaching on `tx` under `epoch` (4 lanes, nothing in doubt).
fn attached(
    shard: &str,
    conn_id: u64,
    tx: mpsc::Sender<pb::CoordinatorMessage>,
    epoch: u64,
) -> Event {
    Event::Attached {
        shard: shard.into(),
        conn_id,
        tx,
        max_lanes: 4,
        in_doubt: Vec::new(),
        in_doubt_unknown: false,
        committed: Vec::new(),
        epoch,
    }
}

/// Attaches an agent of `shard` on a new stream under epoch 1; the stream.
async fn attach(
    events: &mpsc::Sender<Event>,
    shard: &str,
    conn_id: u64,
) -> mpsc::Receiver<pb::CoordinatorMessage> {
    let (tx, rx) = mpsc::channel(16);
    events.send(attached(shard, conn_id, tx, 1)).await.unwrap();
    rx
}

/// Starts the plan `p0` and hands it its shard locks: it may hand out runs.
async fn start_locked(events: &mpsc::Sender<Event>, mut run: crate::plan::PlanRun) {
    // built under the term the engine leads (1)
    run.epoch = 1;
    let (done, started) = oneshot::channel();
    events
        .send(Event::Start {
            run: Box::new(run),
            done,
        })
        .await
        .unwrap();
    started.await.unwrap();
    events
        .send(Event::LocksTaken {
            plan_id: "p0".into(),
        })
        .await
        .unwrap();
}

/// The next message for the agent, past the "not paused" that follows each definition.
async fn next_message(rx: &mut mpsc::Receiver<pb::CoordinatorMessage>) -> Body {
    loop {
        match any_message(rx).await {
            Body::Pause(p) if !p.paused => continue,
            body => return body,
        }
    }
}

async fn any_message(rx: &mut mpsc::Receiver<pb::CoordinatorMessage>) -> Body {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a message for the agent within 5s")
        .expect("the stream is open")
        .body
        .expect("a body")
}

/// The final status the engine tells the watchers of plan `p0` when it ends (within 5 s).
async fn final_status(
    told: &mut broadcast::Receiver<(String, Option<Arc<pb::PlanStatus>>)>,
) -> Arc<pb::PlanStatus> {
    loop {
        let (id, ended) = tokio::time::timeout(Duration::from_secs(5), told.recv())
            .await
            .expect("the plan ends within 5s")
            .expect("the engine tells");
        assert_eq!(id, "p0");
        if let Some(last) = ended {
            return last;
        }
    }
}

/// An agent whose stream is full when the plan starts (a burst, a slow reader): the
/// definition and the runs wait and reach it in order once it reads again. Before, both
/// were dropped, the definition was marked as sent anyway, and the runs went only after
/// a reconnect: the plan stalled.
#[tokio::test]
async fn what_a_full_stream_cannot_take_reaches_the_agent_in_order_when_it_reads() {
    let events = engine();
    let (tx, mut rx) = mpsc::channel(1);
    // The stream is full before the plan starts.
    tx.try_send(pb::CoordinatorMessage {
        body: Some(Body::Heartbeat(pb::Heartbeat::default())),
    })
    .expect("room for one");
    events.send(attached("s0", 1, tx.clone(), 1)).await.unwrap();
    let run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s0", "t2")],
        pb::FailurePolicy::AllOrNothing,
    );
    start_locked(&events, run).await;
    // The agent reads what was there; the engine's next event lets the rest go.
    assert!(matches!(next_message(&mut rx).await, Body::Heartbeat(_)));
    events.send(Event::Tick).await.unwrap();
    match next_message(&mut rx).await {
        Body::Plan(d) => assert_eq!(d.plan_id, "p0"),
        other => panic!("expected the plan's definition first, got {other:?}"),
    }
    events.send(Event::Tick).await.unwrap();
    assert!(
        matches!(any_message(&mut rx).await, Body::Pause(p) if !p.paused),
        "whether it is paused, with the definition"
    );
    events.send(Event::Tick).await.unwrap();
    match next_message(&mut rx).await {
        Body::Assign(a) => {
            assert_eq!(a.plan_id, "p0");
            assert_eq!(a.epoch, 1);
            let mut tenants: Vec<&str> = a.runs.iter().map(|r| r.tenant.as_str()).collect();
            tenants.sort();
            assert_eq!(tenants, ["t1", "t2"]);
        }
        other => panic!("expected the runs after the definition, got {other:?}"),
    }
}

/// A reconnect resends the definition on the new stream, then the runs still out.
#[tokio::test]
async fn a_new_stream_hears_the_definition_and_the_runs_still_out() {
    let events = engine();
    let attach =
        |conn_id: u64, tx: mpsc::Sender<pb::CoordinatorMessage>| attached("s0", conn_id, tx, 1);
    let (tx1, mut rx1) = mpsc::channel(16);
    events.send(attach(1, tx1)).await.unwrap();
    let run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1")],
        pb::FailurePolicy::AllOrNothing,
    );
    start_locked(&events, run).await;
    assert!(matches!(next_message(&mut rx1).await, Body::Plan(_)));
    let first = match next_message(&mut rx1).await {
        Body::Assign(a) => a.runs,
        other => panic!("expected runs, got {other:?}"),
    };
    // The stream breaks before any result; the agent comes back on a new one.
    drop(rx1);
    detach(&events, "s0", 1).await;
    let (tx2, mut rx2) = mpsc::channel(16);
    events.send(attach(2, tx2)).await.unwrap();
    assert!(matches!(any_message(&mut rx2).await, Body::Plan(_)));
    // and that the plan is not paused there (an agent may hold a pause it missed the end of)
    assert!(
        matches!(any_message(&mut rx2).await, Body::Pause(p) if !p.paused),
        "the plan's pause, or not"
    );
    match next_message(&mut rx2).await {
        Body::Assign(a) => assert_eq!(a.runs, first, "the same runs, same ids"),
        other => panic!("expected the runs again, got {other:?}"),
    }
}

/// The engine's status of plan `p0` (None: not in memory, its status from the store).
async fn engine_status(events: &mpsc::Sender<Event>) -> Option<pb::PlanStatus> {
    let (reply, answered) = oneshot::channel();
    events
        .send(Event::Status {
            plan_id: "p0".into(),
            reply,
        })
        .await
        .unwrap();
    answered.await.unwrap()
}

/// Waits until the engine handled every event sent before.
async fn handled(events: &mpsc::Sender<Event>) {
    let (reply, answered) = oneshot::channel();
    events
        .send(Event::Status {
            plan_id: "none".into(),
            reply,
        })
        .await
        .unwrap();
    answered.await.unwrap();
}

/// A session that checked leadership, then awaited the store while leadership was lost (and
/// perhaps won again under a new epoch), attaches under a term the engine does not lead. The
/// engine lets it go: its stream ends and the agent finds the leader. Before, the registry
/// kept the stream open with no engine behind it and the agent waited for work forever
/// (20 of 64 shards stalled in scripts/bench-shards.sh after a term lost on a loaded machine).
#[tokio::test]
async fn an_agent_attached_under_another_term_is_let_go() {
    let fleet = Arc::new(Fleet::default());
    let events = engine_with(fleet.clone());
    let attach = |conn_id: u64, epoch: u64| {
        let (tx, rx) = mpsc::channel(16);
        fleet
            .attach(
                "s0",
                AttachedAgent {
                    conn_id,
                    tx: tx.clone(),
                    labels: Default::default(),
                    tenants: Vec::new(),
                    version: String::new(),
                    last_seen_ms: 0,
                    database: String::new(),
                    shard_unreachable: false,
                },
            )
            .expect("no other database attached");
        (attached("s0", conn_id, tx, epoch), rx)
    };
    let ended = |mut rx: mpsc::Receiver<pb::CoordinatorMessage>| async move {
        let next = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the stream ends within 5s");
        assert!(next.is_none(), "the stream carried {next:?}");
    };

    // The term the engine leads: the agent stays.
    let (event, _kept) = attach(1, 1);
    events.send(event).await.unwrap();
    handled(&events).await;
    assert!(fleet.snapshot().contains_key("s0"));

    // Another term (the session was welcomed under an epoch the engine does not lead).
    let (event, rx) = attach(2, 7);
    events.send(event).await.unwrap();
    ended(rx).await;
    assert!(!fleet.snapshot().contains_key("s0"));

    // No term at all: the engine follows.
    events.send(Event::Follow).await.unwrap();
    let (event, rx) = attach(3, 1);
    events.send(event).await.unwrap();
    ended(rx).await;
    assert!(!fleet.snapshot().contains_key("s0"));
}

/// A plan's end reaches its watchers with its final status, built before the plan leaves
/// memory: a watch waiting for the end does not read the plan back from the store (every
/// step row: 30,000 at 10,000 tenants, where 0.36-0.66 s went by between the last step's
/// commit and the end of a `plan submit --wait`).
#[tokio::test]
async fn a_plan_that_ends_tells_its_watchers_its_final_status() {
    let (changes, mut told) = broadcast::channel(16);
    let events = engine_telling(Arc::new(Fleet::default()), changes);
    let mut rx = attach(&events, "s0", 1).await;
    let run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s0", "t2")],
        pb::FailurePolicy::Continue,
    );
    start_locked(&events, run).await;
    assert!(matches!(next_message(&mut rx).await, Body::Plan(_)));
    let runs = match next_message(&mut rx).await {
        Body::Assign(a) => a.runs,
        other => panic!("expected runs, got {other:?}"),
    };
    assert_eq!(runs.len(), 2);
    let applied = |r: &pb::Run| pb::RunResult {
        run_id: r.run_id,
        tenant: r.tenant.clone(),
        steps: vec![pb::StepResult {
            migration_id: "a".into(),
            outcome: pb::StepOutcome::Applied as i32,
            duration_ms: 3,
            ..Default::default()
        }],
        prepared_at_us: 0,
    };
    events
        .send(Event::Results {
            shard: "s0".into(),
            results: pb::RunResults {
                plan_id: "p0".into(),
                runs: runs.iter().map(applied).collect(),
            },
            received: std::time::Instant::now(),
        })
        .await
        .unwrap();
    let last = final_status(&mut told).await;
    let summary = last.summary.as_ref().expect("a summary");
    assert_eq!(summary.state, "completed");
    assert_eq!(last.migrations.len(), 1);
    assert_eq!(last.migrations[0].migration_id, "a");
    assert_eq!(last.migrations[0].applied, 2);
    assert!(last.failures.is_empty());
    // and it has left memory: a status now comes from the store
    assert!(engine_status(&events).await.is_none());
}

/// Two agents attached (s0, s1) and an all-or-nothing plan whose one atomic group runs one
/// step on each shard, started; returns the agents' streams and the two runs.
async fn atomic_on_two_shards(
    events: &mpsc::Sender<Event>,
) -> (
    mpsc::Receiver<pb::CoordinatorMessage>,
    mpsc::Receiver<pb::CoordinatorMessage>,
    pb::Run,
    pb::Run,
) {
    let mut streams = Vec::new();
    for (conn_id, shard) in [(1, "s0"), (2, "s1")] {
        streams.push(attach(events, shard, conn_id).await);
    }
    let group = pb::ParallelGroup {
        migrations: vec!["a".into()],
        atomic: true,
    };
    let run = plan_of(
        &["a"],
        vec![group],
        &[("s0", ""), ("s1", "")],
        pb::FailurePolicy::AllOrNothing,
    );
    start_locked(events, run).await;
    let mut runs = Vec::new();
    for rx in &mut streams {
        assert!(matches!(next_message(rx).await, Body::Plan(_)));
        match next_message(rx).await {
            Body::Assign(a) => runs.extend(a.runs),
            other => panic!("expected runs, got {other:?}"),
        }
    }
    let rx1 = streams.pop().unwrap();
    let rx0 = streams.pop().unwrap();
    let r1 = runs.pop().unwrap();
    let r0 = runs.pop().unwrap();
    (rx0, rx1, r0, r1)
}

async fn result(events: &mpsc::Sender<Event>, shard: &str, r: &pb::Run, outcome: pb::StepOutcome) {
    events
        .send(Event::Results {
            shard: shard.into(),
            results: pb::RunResults {
                plan_id: "p0".into(),
                runs: vec![pb::RunResult {
                    run_id: r.run_id,
                    tenant: r.tenant.clone(),
                    steps: vec![pb::StepResult {
                        migration_id: "a".into(),
                        outcome: outcome as i32,
                        ..Default::default()
                    }],
                    prepared_at_us: 0,
                }],
            },
            received: std::time::Instant::now(),
        })
        .await
        .unwrap();
}

async fn command(
    events: &mpsc::Sender<Event>,
    kind: super::CommandKind,
) -> Result<pb::PlanStatus, crate::error::CoordinatorError> {
    let (reply, answered) = oneshot::channel();
    events
        .send(Event::Command {
            plan_id: "p0".into(),
            kind,
            actor: crate::actor::Actor::new("test", ""),
            revive: None,
            reply,
        })
        .await
        .unwrap();
    answered.await.unwrap()
}

/// `plan pause` (`paused`) or `plan resume` of plan p0 as a whole.
async fn pause(
    events: &mpsc::Sender<Event>,
    paused: bool,
) -> Result<pb::PlanStatus, crate::error::CoordinatorError> {
    let (reply, answered) = oneshot::channel();
    events
        .send(Event::Pause {
            plan_id: "p0".into(),
            shard: None,
            paused,
            actor: crate::actor::Actor::new("test", ""),
            reply,
        })
        .await
        .unwrap();
    answered.await.unwrap()
}

/// Shard `shard` answers that it resolved `r`'s prepared transaction (committed or not).
async fn resolved(events: &mpsc::Sender<Event>, shard: &str, r: &pb::Run, commit: bool) {
    events
        .send(Event::ResolveReply {
            shard: shard.into(),
            reply: pb::ResolveReply {
                plan_id: "p0".into(),
                commit,
                resolved: vec![r.prepare_gid.clone()],
                ..Default::default()
            },
        })
        .await
        .unwrap();
}

/// The next Resolve or Rollback the agent is sent (halts and the like passed over).
async fn next_decision_or_rollback(rx: &mut mpsc::Receiver<pb::CoordinatorMessage>) -> Body {
    loop {
        match next_message(rx).await {
            b @ (Body::Resolve(_) | Body::Rollback(_)) => return b,
            _ => continue,
        }
    }
}

/// A rollback asked of an atomic plan whose unit is aborting (a step failed, a run still in
/// flight) leaves the abort to finish: once the run is back the abort decision is written
/// and the shard that prepared rolls it back, then the rollback follows. Before, the
/// rollback began at once and the unit never got a decision: the run that prepared
/// meanwhile stayed prepared, its locks held, with nothing to resolve it.
#[tokio::test]
async fn a_rollback_of_an_aborting_unit_waits_for_its_abort() {
    let events = engine();
    let (mut rx0, mut rx1, r0, r1) = atomic_on_two_shards(&events).await;
    result(&events, "s0", &r0, pb::StepOutcome::Failed).await;
    let status = command(&events, super::CommandKind::Rollback)
        .await
        .expect("accepted");
    assert_eq!(status.summary.unwrap().state, "aborting");
    // the failure stays the headline, the operator's rollback after it
    let (failed_at, asked_at) = (
        status.message.find("failed"),
        status.message.find("rollback requested by"),
    );
    assert!(
        failed_at.is_some() && failed_at < asked_at,
        "{}",
        status.message
    );
    // s1's run, in flight all along, prepared
    result(&events, "s1", &r1, pb::StepOutcome::Prepared).await;
    match next_decision_or_rollback(&mut rx1).await {
        Body::Resolve(r) => assert!(!r.commit && r.gids == [r1.prepare_gid.clone()], "{r:?}"),
        other => panic!("expected the abort's Resolve first, got {other:?}"),
    }
    resolved(&events, "s1", &r1, false).await;
    // then the rollback of what committed outside the unit, on both shards
    assert!(matches!(
        next_decision_or_rollback(&mut rx1).await,
        Body::Rollback(_)
    ));
    assert!(matches!(
        next_decision_or_rollback(&mut rx0).await,
        Body::Rollback(_)
    ));
}

/// An atomic unit cancelled with one target prepared and another still running: the abort
/// is written at once and the prepared target rolled back (its locks released) while the
/// other runs; the run that prepares after the decision is rolled back under it, and the
/// plan ends only once nothing of it is prepared or out. Before, the decision waited for
/// the slowest run in flight, every prepared target holding its locks meanwhile.
#[tokio::test]
async fn an_atomic_units_abort_does_not_wait_for_its_runs_in_flight() {
    let events = engine();
    let (mut rx0, mut rx1, r0, r1) = atomic_on_two_shards(&events).await;
    result(&events, "s0", &r0, pb::StepOutcome::Prepared).await;
    let status = command(&events, super::CommandKind::Cancel)
        .await
        .expect("accepted");
    assert_eq!(status.summary.unwrap().state, "aborting");
    // s1's run still out: s0 is told to roll back now
    match next_decision_or_rollback(&mut rx0).await {
        Body::Resolve(r) => assert!(!r.commit && r.gids == [r0.prepare_gid.clone()], "{r:?}"),
        other => panic!("expected the abort's Resolve, got {other:?}"),
    }
    resolved(&events, "s0", &r0, false).await;
    handled(&events).await;
    let status = engine_status(&events)
        .await
        .expect("in motion: a run is out");
    assert_eq!(status.summary.unwrap().state, "aborting");
    // s1's run prepared after the decision: rolled back under it
    result(&events, "s1", &r1, pb::StepOutcome::Prepared).await;
    match next_decision_or_rollback(&mut rx1).await {
        Body::Resolve(r) => assert!(!r.commit && r.gids == [r1.prepare_gid.clone()], "{r:?}"),
        other => panic!("expected the abort's Resolve, got {other:?}"),
    }
    resolved(&events, "s1", &r1, false).await;
    // then the rollback of what committed outside the unit
    assert!(matches!(
        next_decision_or_rollback(&mut rx1).await,
        Body::Rollback(_)
    ));
}

/// A rollback or cancel asked while the unit's commit decision is being carried out is
/// refused, naming the shards that have not committed yet: the COMMIT PREPAREDs still to
/// come would change the journals a rollback reads. Once they have, the plan completes.
/// A pause is refused too (the commit does not stop for one: it was taken, and said the
/// plan held while it went on); a resume is refused for what it is (nothing is paused).
#[tokio::test]
async fn a_rollback_while_a_unit_commits_is_refused_until_it_has() {
    let events = engine();
    let (_rx0, mut rx1, r0, r1) = atomic_on_two_shards(&events).await;
    result(&events, "s0", &r0, pb::StepOutcome::Prepared).await;
    result(&events, "s1", &r1, pb::StepOutcome::Prepared).await;
    match next_decision_or_rollback(&mut rx1).await {
        Body::Resolve(r) => assert!(r.commit, "{r:?}"),
        other => panic!("expected the commit's Resolve, got {other:?}"),
    }
    resolved(&events, "s0", &r0, true).await;
    for kind in [super::CommandKind::Rollback, super::CommandKind::Cancel] {
        let refused = command(&events, kind)
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            refused.contains("is committing parallel group 1")
                && refused.contains("not yet committed on s1)"),
            "{refused}"
        );
    }
    let refused = pause(&events, true).await.expect_err("refused").to_string();
    assert!(
        refused.contains("is committing") && refused.contains("would not hold its atomic commit"),
        "{refused}"
    );
    let refused = pause(&events, false)
        .await
        .expect_err("refused")
        .to_string();
    assert!(refused.contains("is not paused"), "{refused}");
    resolved(&events, "s1", &r1, true).await;
    handled(&events).await;
    // completed, it has left memory (its status comes from the store)
    assert!(engine_status(&events).await.is_none());
}

/// A plan ends while the control store is out of reach (its writer keeps trying and answers
/// no flush): the engine waits a bounded time for the final state to be stored, then the
/// plan ends and its watchers are told, and the engine goes on handling events. Before the
/// bound, the engine waited for the flush as long as the store was away.
#[tokio::test(start_paused = true)]
async fn a_plan_ends_while_the_store_is_out_of_reach() {
    let (changes, mut told) = broadcast::channel(16);
    let events = engine_storing(Arc::new(Fleet::default()), changes, false);
    let mut rx = attach(&events, "s0", 1).await;
    let run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1")],
        pb::FailurePolicy::Continue,
    );
    start_locked(&events, run).await;
    assert!(matches!(next_message(&mut rx).await, Body::Plan(_)));
    let runs = match next_message(&mut rx).await {
        Body::Assign(a) => a.runs,
        other => panic!("expected runs, got {other:?}"),
    };
    for r in &runs {
        result(&events, "s0", r, pb::StepOutcome::Applied).await;
    }
    let last = loop {
        // on the paused clock: the bounded wait runs out, no real time passes
        let (_, ended) = tokio::time::timeout(Duration::from_secs(60), told.recv())
            .await
            .expect("the plan ends though its final state is not stored yet")
            .expect("the engine tells");
        if let Some(last) = ended {
            break last;
        }
    };
    assert_eq!(last.summary.as_ref().unwrap().state, "completed");
    // and the engine goes on: it answers
    handled(&events).await;
}

async fn forget(
    events: &mpsc::Sender<Event>,
    shard: &str,
) -> Result<pb::PlanStatus, crate::error::CoordinatorError> {
    let (reply, answered) = oneshot::channel();
    events
        .send(Event::ForgetShard {
            plan_id: "p0".into(),
            shard: shard.into(),
            actor: crate::actor::Actor::new("alice", "shard_1's database is lost"),
            reply,
        })
        .await
        .unwrap();
    answered.await.unwrap()
}

/// The stream `conn_id` of `shard`'s agent ends.
async fn detach(events: &mpsc::Sender<Event>, shard: &str, conn_id: u64) {
    events
        .send(Event::Detached {
            shard: shard.into(),
            conn_id,
        })
        .await
        .unwrap();
}

/// Why a forget of `shard` is refused (it must be).
async fn forget_refused(events: &mpsc::Sender<Event>, shard: &str) -> String {
    forget(events, shard)
        .await
        .expect_err("a refusal")
        .to_string()
}

/// `plan forget-shard`: a unit committing waits for a shard whose agent is gone for good;
/// forgetting it is refused while its agent is attached (it commits by itself) and for a
/// shard that has committed, and otherwise fails that shard's part as not confirmed, naming
/// who and why; once the other shards have committed the plan ends failed, where before it
/// stayed committing, its locks held, for as long as the shard was away.
#[tokio::test]
async fn a_shard_gone_for_good_is_forgotten_and_the_committing_plan_ends_failed() {
    let (changes, mut told) = broadcast::channel(64);
    let events = engine_telling(Arc::new(Fleet::default()), changes);
    let (_rx0, mut rx1, r0, r1) = atomic_on_two_shards(&events).await;
    result(&events, "s0", &r0, pb::StepOutcome::Prepared).await;
    result(&events, "s1", &r1, pb::StepOutcome::Prepared).await;
    match next_decision_or_rollback(&mut rx1).await {
        Body::Resolve(r) => assert!(r.commit, "{r:?}"),
        other => panic!("expected the commit's Resolve, got {other:?}"),
    }
    let refused = forget_refused(&events, "s1").await;
    assert!(
        refused.contains("the agent of shard s1 is attached to this coordinator"),
        "{refused}"
    );
    let refused = forget_refused(&events, "s9").await;
    assert!(refused.contains("no target on shard `s9`"), "{refused}");
    // s1's agent goes away before it committed, and is forgotten: the plan still commits,
    // waiting for s0
    detach(&events, "s1", 2).await;
    let status = forget(&events, "s1").await.expect("forgotten");
    assert_eq!(status.summary.unwrap().state, "committing");
    let refused = forget_refused(&events, "s1").await;
    assert!(
        refused.contains("shard s1 of plan p0 was forgotten already"),
        "{refused}"
    );
    let refused = forget_refused(&events, "s0").await;
    assert!(
        refused.contains("the agent of shard s0 is attached"),
        "{refused}"
    );
    resolved(&events, "s0", &r0, true).await;
    let last = final_status(&mut told).await;
    let summary = last.summary.as_ref().expect("a summary");
    assert_eq!(summary.state, "failed", "{summary:?}");
    assert!(
        last.message
            .contains("parallel group 1 committed on 1 of 2 shards; not confirmed on s1"),
        "{}",
        last.message
    );
    assert_eq!(last.failures.len(), 1, "{:?}", last.failures);
    let failure = &last.failures[0];
    assert_eq!(failure.target.as_ref().unwrap().shard, "s1");
    let error = failure.error.as_ref().unwrap();
    assert_eq!(error.phase, "commit");
    assert!(
        error
            .message
            .contains("shard s1 was forgotten by alice (shard_1's database is lost)"),
        "{}",
        error.message
    );
    assert_eq!(last.migrations[0].applied, 1, "{:?}", last.migrations);
    // ended, a second forget is told so
    let refused = forget(&events, "s1").await.expect_err("ended");
    assert!(matches!(
        refused,
        crate::error::CoordinatorError::PlanNotFound(_)
    ));
}

/// A forgotten shard whose agent comes back before the plan ended with the unit's
/// transaction in hand (in doubt there): the forget is undone, the shard is told the
/// decision as any other, and the plan ends committed everywhere, with no failure left
/// (before, it ended failed, "not confirmed" on a shard that had committed). Back without
/// it (its database restored from a backup), it stays forgotten.
#[tokio::test]
async fn a_forgotten_shard_back_before_the_plan_ended_commits_with_the_rest() {
    let (changes, mut told) = broadcast::channel(64);
    let events = engine_telling(Arc::new(Fleet::default()), changes);
    let (_rx0, mut rx1, r0, r1) = atomic_on_two_shards(&events).await;
    result(&events, "s0", &r0, pb::StepOutcome::Prepared).await;
    result(&events, "s1", &r1, pb::StepOutcome::Prepared).await;
    assert!(matches!(next_decision_or_rollback(&mut rx1).await, Body::Resolve(r) if r.commit));
    detach(&events, "s1", 2).await;
    let status = forget(&events, "s1").await.expect("forgotten");
    assert_eq!(status.failures.len(), 1, "{:?}", status.failures);
    // back without the unit's transaction (its database restored from a backup): stays
    // forgotten, no Resolve
    let mut empty = attach(&events, "s1", 3).await;
    detach(&events, "s1", 3).await;
    let refused = forget_refused(&events, "s1").await;
    assert!(refused.contains("was forgotten already"), "{refused}");
    while let Ok(m) = empty.try_recv() {
        assert!(!matches!(m.body, Some(Body::Resolve(_))), "{m:?}");
    }
    // back with it still in doubt: forgotten no more, told the decision
    let (tx, mut back) = mpsc::channel(16);
    events
        .send(Event::Attached {
            shard: "s1".into(),
            conn_id: 4,
            tx,
            max_lanes: 4,
            in_doubt: vec![r1.prepare_gid.clone()],
            in_doubt_unknown: false,
            committed: Vec::new(),
            epoch: 1,
        })
        .await
        .unwrap();
    match next_decision_or_rollback(&mut back).await {
        Body::Resolve(r) => {
            assert!(r.commit, "{r:?}");
            assert_eq!(r.gids, vec![r1.prepare_gid.clone()], "{r:?}");
        }
        other => panic!("expected the commit's Resolve, got {other:?}"),
    }
    // forgotten no more: a forget is refused as for any attached agent
    let refused = forget_refused(&events, "s1").await;
    assert!(
        refused.contains("the agent of shard s1 is attached"),
        "{refused}"
    );
    resolved(&events, "s1", &r1, true).await;
    resolved(&events, "s0", &r0, true).await;
    let last = final_status(&mut told).await;
    let summary = last.summary.as_ref().expect("a summary");
    assert_eq!(summary.state, "completed", "{summary:?}: {}", last.message);
    assert!(last.failures.is_empty(), "{:?}", last.failures);
    assert_eq!(last.migrations[0].applied, 2, "{:?}", last.migrations);
}

/// A plan built under another term than the one the engine leads (leadership lost and won
/// again between its caller's check and its start) is not taken in: its caller answers from
/// the store, and this term's recovery continues it. Taken in, it never got its locks (taken
/// under the caller's term, refused) and this term's recovery passed it over as in motion:
/// it hung.
#[tokio::test]
async fn a_plan_started_under_another_term_is_left_to_this_ones_recovery() {
    let events = engine();
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1")],
        pb::FailurePolicy::AllOrNothing,
    );
    run.epoch = 7;
    let (done, started) = oneshot::channel();
    events
        .send(Event::Start {
            run: Box::new(run),
            done,
        })
        .await
        .unwrap();
    assert!(started.await.is_err(), "not started: its caller hears so");
    assert!(engine_status(&events).await.is_none(), "not in motion");
}

/// An atomic plan aborting (a target failed) while another shard's agent is gone for good
/// with a run still out: once the grace is past, that run fails as lost and the abort is
/// written, so the shards that prepared roll back and release their locks. Before, the
/// abort waited for that run for good (only Running plans looked for lost agents).
#[tokio::test]
async fn an_aborting_plan_does_not_wait_for_an_agent_gone_for_good() {
    let events = engine_full(
        Arc::new(Fleet::default()),
        broadcast::channel(16).0,
        true,
        Duration::ZERO,
    );
    let (_rx0, _rx1, r0, _r1) = atomic_on_two_shards(&events).await;
    // s1's agent goes (no stream, no liveness key), its run out
    detach(&events, "s1", 2).await;
    result(&events, "s0", &r0, pb::StepOutcome::Failed).await;
    let state = async |events: &mpsc::Sender<Event>| {
        engine_status(events)
            .await
            .and_then(|s| s.summary)
            .map(|s| s.state)
    };
    assert_eq!(state(&events).await.as_deref(), Some("aborting"));
    events.send(Event::Tick).await.unwrap();
    let after = state(&events).await;
    assert_ne!(
        after.as_deref(),
        Some("aborting"),
        "the abort went on: {after:?}"
    );
}

/// A stop a new leader finishes for one gone before its Halt reached the agents: each of
/// the plan's shards is told to halt it as its agent attaches (the agent may still have the
/// old leader's runs queued), though the plan ended at its start. Before, nothing was sent,
/// and the queued runs went on after the plan ended and its locks were released.
#[tokio::test]
async fn a_stop_finished_for_an_earlier_leader_halts_each_agent_as_it_attaches() {
    let events = engine();
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s1", "t1")],
        pb::FailurePolicy::Stop,
    );
    run.inherited = true;
    run.state = crate::plan::PlanState::Stopping;
    start_locked(&events, run).await;
    for (conn_id, shard) in [(1, "s0"), (2, "s1")] {
        let mut rx = attach(&events, shard, conn_id).await;
        match next_message(&mut rx).await {
            Body::Halt(h) => assert_eq!(h.plan_id, "p0"),
            other => panic!("expected the plan's halt, got {other:?}"),
        }
    }
}

/// A plan that stops (here a cancel) while a shard's agent is away: the halt it missed
/// follows the runs resent when it is back, so what it still holds queued answers not run
/// (the agent answers a resent copy of a run it holds from that run, so the halt reaches
/// the runs themselves). Before, nothing followed, and the shard ran everything it held
/// after the plan was stopped.
#[tokio::test]
async fn a_stop_while_an_agent_was_away_halts_it_when_back() {
    let events = engine();
    let mut rx0 = attach(&events, "s0", 1).await;
    let _rx1 = attach(&events, "s1", 2).await;
    let run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s0", "t2"), ("s1", "t3")],
        pb::FailurePolicy::Continue,
    );
    start_locked(&events, run).await;
    assert!(matches!(next_message(&mut rx0).await, Body::Plan(_)));
    assert!(matches!(next_message(&mut rx0).await, Body::Assign(_)));
    drop(rx0);
    detach(&events, "s0", 1).await;
    let status = command(&events, super::CommandKind::Cancel)
        .await
        .expect("cancel taken");
    assert_eq!(status.summary.unwrap().state, "stopping");
    let (tx, mut back) = mpsc::channel(16);
    events.send(attached("s0", 3, tx, 1)).await.unwrap();
    assert!(matches!(next_message(&mut back).await, Body::Plan(_)));
    assert!(matches!(next_message(&mut back).await, Body::Assign(_)));
    match next_message(&mut back).await {
        Body::Halt(h) => assert_eq!(h.plan_id, "p0"),
        other => panic!("expected the plan's halt, got {other:?}"),
    }
}

/// An agent back after a hand-out while it was away (which gave its shard the one lane an
/// absent agent can take) gets its runs resent with the lanes it has, not one: with one,
/// the runs went one at a time (an atomic unit's other targets holding their prepared locks
/// meanwhile).
#[tokio::test]
async fn runs_resent_after_a_reconnect_go_with_the_shards_lanes() {
    let events = engine();
    let mut rx0 = attach(&events, "s0", 1).await;
    let mut rx1 = attach(&events, "s1", 2).await;
    let run = plan_of(
        &["a"],
        Vec::new(),
        &[
            ("s0", "t1"),
            ("s0", "t2"),
            ("s1", "t3"),
            ("s1", "t4"),
            ("s1", "t5"),
        ],
        pb::FailurePolicy::Continue,
    );
    start_locked(&events, run).await;
    let lanes_of = |body: Body| match body {
        Body::Assign(a) => (a.lanes, a.runs),
        other => panic!("expected runs, got {other:?}"),
    };
    assert!(matches!(next_message(&mut rx0).await, Body::Plan(_)));
    let (lanes, _) = lanes_of(next_message(&mut rx0).await);
    assert!(lanes > 1, "{lanes}");
    assert!(matches!(next_message(&mut rx1).await, Body::Plan(_)));
    let (_, s1_runs) = lanes_of(next_message(&mut rx1).await);
    // s0's agent goes; s1's results make a hand-out while it is away
    drop(rx0);
    detach(&events, "s0", 1).await;
    result(&events, "s1", &s1_runs[0], pb::StepOutcome::Applied).await;
    handled(&events).await;
    let (tx, mut back) = mpsc::channel(16);
    events.send(attached("s0", 3, tx, 1)).await.unwrap();
    assert!(matches!(next_message(&mut back).await, Body::Plan(_)));
    let (lanes, runs) = lanes_of(next_message(&mut back).await);
    assert_eq!(runs.len(), 2, "both runs still out");
    assert!(lanes > 1, "resent with {lanes} lane(s)");
}

/// A shard whose agent is away is named in the status while the plan has steps there still
/// to run, though none was sent to it yet (it waits for a lane, or its agent never came):
/// before, only shards with runs out were, and a plan waiting on one showed nothing.
#[tokio::test]
async fn the_status_names_an_away_shard_with_steps_left() {
    let events = engine();
    let _rx0 = attach(&events, "s0", 1).await;
    let run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s1", "t2")],
        pb::FailurePolicy::AllOrNothing,
    );
    start_locked(&events, run).await;
    let status = engine_status(&events).await.expect("in motion");
    assert_eq!(status.waiting_for, ["s1"], "{status:?}");
}

/// The targets a plan's first hand-out of runs names (its definition read past).
async fn first_runs(rx: &mut mpsc::Receiver<pb::CoordinatorMessage>) -> Vec<String> {
    loop {
        if let Body::Assign(a) = next_message(rx).await {
            let mut tenants: Vec<String> = a.runs.iter().map(|r| r.tenant.clone()).collect();
            tenants.sort();
            return tenants;
        }
    }
}

/// A plan whose submit read a step applied, and which took its locks at once: if an
/// agent's rollback reply came in after the submit read the journals (another plan's
/// rollback ran its course before this plan tried its locks), the step is sent again for
/// the journal to say; before, the plan reported the target applied. Without one, nothing
/// is asked again. A plan that awaited approval always asks again.
#[tokio::test]
async fn steps_read_applied_are_asked_again_when_a_rollback_reply_came_in_since() {
    use crate::plan::{AppliedRead, StepStatus};
    for (read, undo_after, asked_again) in [
        (AppliedRead::AtSubmit { undo_replies: 0 }, false, false),
        (AppliedRead::AtSubmit { undo_replies: 0 }, true, true),
        (AppliedRead::BeforeApproval, false, true),
        (AppliedRead::Before, true, false),
    ] {
        let fleet = Arc::new(Fleet::default());
        let events = engine_with(fleet.clone());
        let mut rx = attach(&events, "s0", 1).await;
        let mut run = plan_of(
            &["a"],
            Vec::new(),
            &[("s0", "t1"), ("s0", "t2")],
            pb::FailurePolicy::AllOrNothing,
        );
        run.set_status(0, StepStatus::AlreadyApplied);
        run.applied_read = read;
        if undo_after {
            fleet.undo_reported();
        }
        start_locked(&events, run).await;
        let wanted: &[&str] = if asked_again { &["t1", "t2"] } else { &["t2"] };
        assert_eq!(
            first_runs(&mut rx).await,
            wanted,
            "{read:?}, undo after: {undo_after}"
        );
    }
}

/// An atomic plan that awaited approval, whose submit found a target applied: once it has
/// its locks, that target's step is asked again within the unit (the plan's first and only
/// unit), and whatever the journal says, applied still or undone and prepared now, the
/// unit commits with it. Before, an atomic plan was not asked again: a rollback that undid
/// the step while the plan awaited approval left the target reported applied, unmigrated.
#[tokio::test]
async fn an_atomic_plan_asks_again_for_the_steps_its_submit_read_applied() {
    use crate::plan::{AppliedRead, StepStatus};
    for undone in [false, true] {
        let (changes, mut told) = broadcast::channel(64);
        let events = engine_telling(Arc::new(Fleet::default()), changes);
        let mut rx = attach(&events, "s0", 1).await;
        let group = pb::ParallelGroup {
            migrations: vec!["a".into()],
            atomic: true,
        };
        let mut run = plan_of(
            &["a"],
            vec![group],
            &[("s0", "t1"), ("s0", "t2")],
            pb::FailurePolicy::AllOrNothing,
        );
        run.set_status(0, StepStatus::AlreadyApplied);
        run.applied_read = AppliedRead::BeforeApproval;
        start_locked(&events, run).await;
        let runs = loop {
            if let Body::Assign(a) = next_message(&mut rx).await {
                break a.runs;
            }
        };
        let mut tenants: Vec<&str> = runs.iter().map(|r| r.tenant.as_str()).collect();
        tenants.sort();
        assert_eq!(tenants, ["t1", "t2"], "undone: {undone}");
        assert!(runs.iter().all(|r| !r.prepare_gid.is_empty()), "{runs:?}");
        let t1 = runs.iter().find(|r| r.tenant == "t1").unwrap();
        let t2 = runs.iter().find(|r| r.tenant == "t2").unwrap();
        let t1_outcome = if undone {
            pb::StepOutcome::Prepared
        } else {
            pb::StepOutcome::AlreadyApplied
        };
        result(&events, "s0", t1, t1_outcome).await;
        result(&events, "s0", t2, pb::StepOutcome::Prepared).await;
        let resolve = loop {
            if let Body::Resolve(r) = next_message(&mut rx).await {
                break r;
            }
        };
        assert!(resolve.commit, "{resolve:?}");
        let mut wanted = vec![t2.prepare_gid.clone()];
        if undone {
            wanted.insert(0, t1.prepare_gid.clone());
        }
        let mut gids = resolve.gids.clone();
        gids.sort();
        wanted.sort();
        assert_eq!(gids, wanted, "undone: {undone}");
        for r in [t1, t2]
            .into_iter()
            .filter(|r| wanted.contains(&r.prepare_gid))
        {
            resolved(&events, "s0", r, true).await;
        }
        // the unit committed, the plan completes, with t1 applied (already, or now)
        let last = final_status(&mut told).await;
        let summary = last.summary.as_ref().expect("a summary");
        assert_eq!(summary.state, "completed", "undone: {undone}: {last:?}");
        let m = &last.migrations[0];
        assert_eq!(
            (m.applied, m.already_applied),
            if undone { (2, 0) } else { (1, 1) },
            "undone: {undone}: {last:?}"
        );
    }
}

/// A plan a new leader took over in an atomic unit the leader before decided to commit
/// (the store missed the decision's state): the leader reads the decision without waiting
/// for the unit's agents, and a cancel is refused as while committing. Before, the cancel
/// was taken while the unit waited for its agents: it halted the unit's steps and asked for
/// an abort, which the decision store answered with the commit; the shards committed what
/// the plan reported not run, and the cancel's undo never came.
#[tokio::test]
async fn a_taken_over_unit_decided_to_commit_is_not_cancelled() {
    use crate::coordination::{Coordination, Decision};
    let coordination = Arc::new(EmbeddedCoordination::new(1));
    let group = pb::ParallelGroup {
        migrations: vec!["a".into()],
        atomic: true,
    };
    let mut run = plan_of(
        &["a"],
        vec![group],
        &[("s0", "t1"), ("s1", "t1")],
        pb::FailurePolicy::AllOrNothing,
    );
    coordination
        .decide(&run.unit_key(), Decision::Commit, 1)
        .await
        .unwrap();
    let events = engine_deciding(
        Arc::new(Fleet::default()),
        broadcast::channel(16).0,
        true,
        Duration::from_secs(30),
        coordination,
    );
    run.inherited = true;
    run.unit_unverified = true;
    start_locked(&events, run).await;
    events.send(Event::Tick).await.unwrap();
    let e = command(&events, super::CommandKind::Cancel)
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("commit"), "{e}");
    let state = engine_status(&events)
        .await
        .and_then(|s| s.summary)
        .map(|s| s.state);
    assert_eq!(state.as_deref(), Some("committing"), "no agent attached");
}

#[test]
fn an_operators_stop_is_read_back_from_the_stored_message() {
    for message in [
        "rollback requested by alice",
        "rollback requested by alice: not today",
        "cancel requested by bob; its rollback resumed by the leader of term 7",
        "halted by carol: wave 2 looks wrong",
    ] {
        assert!(super::by_operator(message), "{message}");
    }
    for message in [
        "",
        "step 2025_x failed on s/t (SQLSTATE 42P01): rollback requested by nobody",
        "wave 1's gate failed; halted: what applied stays",
        "rollback requested",
        "retry of 2 steps requested by alice",
    ] {
        assert!(!super::by_operator(message), "{message}");
    }
}

/// A shard whose agent is lost with the unit's transaction prepared while the unit aborts is
/// left past the grace (none here): the other shard rolls back, and the plan waits for it
/// alone. Its agent back, it is told the abort first, and asked for its undo only once it
/// answered: asked at once (the engine's drive did, behind the gate), the undo found nothing
/// committed and the plan could end with the transaction prepared for good.
#[tokio::test]
async fn a_shard_left_to_an_abort_is_told_it_before_its_undo() {
    let events = engine_full(
        Arc::new(Fleet::default()),
        broadcast::channel(16).0,
        true,
        Duration::ZERO,
    );
    let (_rx0, mut rx1, r0, r1) = atomic_on_two_shards(&events).await;
    result(&events, "s0", &r0, pb::StepOutcome::Prepared).await;
    events
        .send(Event::Detached {
            shard: "s0".into(),
            conn_id: 1,
        })
        .await
        .unwrap();
    result(&events, "s1", &r1, pb::StepOutcome::Failed).await;
    events.send(Event::Tick).await.unwrap();
    assert!(matches!(
        next_decision_or_rollback(&mut rx1).await,
        Body::Rollback(_)
    ));
    let status = engine_status(&events).await.expect("in motion");
    assert_eq!(status.summary.unwrap().state, "rolling_back");
    assert_eq!(status.waiting_for, ["s0"]);

    let (tx, mut rx0) = mpsc::channel(16);
    let mut back = attached("s0", 3, tx, 1);
    if let Event::Attached { in_doubt, .. } = &mut back {
        *in_doubt = vec![r0.prepare_gid.clone()];
    }
    events.send(back).await.unwrap();
    match next_decision_or_rollback(&mut rx0).await {
        Body::Resolve(r) => assert!(!r.commit && r.gids == [r0.prepare_gid.clone()], "{r:?}"),
        other => panic!("expected the abort's Resolve first, got {other:?}"),
    }
    // nothing more until it answers (nor on a tick)
    events.send(Event::Tick).await.unwrap();
    handled(&events).await;
    while let Ok(m) = rx0.try_recv() {
        assert!(!matches!(m.body, Some(Body::Rollback(_))), "{m:?}");
    }
    resolved(&events, "s0", &r0, false).await;
    assert!(matches!(
        next_decision_or_rollback(&mut rx0).await,
        Body::Rollback(_)
    ));
}

/// A shard's agent gone while its target waited prepared for the unit's decision (nothing
/// out there) is left as soon as the unit aborts if it has been gone the grace already: its
/// grace counts from when it went (it counted from the abort: the other shards waited, their
/// locks held, up to a grace more).
#[tokio::test]
async fn a_shard_gone_a_grace_before_the_abort_is_left_at_once() {
    let grace = Duration::from_millis(300);
    let events = engine_full(
        Arc::new(Fleet::default()),
        broadcast::channel(16).0,
        true,
        grace,
    );
    let (_rx0, mut rx1, r0, r1) = atomic_on_two_shards(&events).await;
    result(&events, "s0", &r0, pb::StepOutcome::Prepared).await;
    detach(&events, "s0", 1).await;
    // the engine's ticks see it gone, then the grace passes (what is tested is time: the
    // grace is the input)
    events.send(Event::Tick).await.unwrap();
    handled(&events).await;
    tokio::time::sleep(grace).await;
    result(&events, "s1", &r1, pb::StepOutcome::Failed).await;
    events.send(Event::Tick).await.unwrap();
    let status = engine_status(&events).await.expect("in motion");
    assert_eq!(status.summary.unwrap().state, "rolling_back");
    assert_eq!(status.waiting_for, ["s0"]);
    assert!(matches!(
        next_decision_or_rollback(&mut rx1).await,
        Body::Rollback(_)
    ));
}

/// A rollback a new leader revives (a plan stored rolling back) asks its shards for nothing
/// before it holds their locks: asked at once, an undo ran on a shard another plan had
/// locked meanwhile. Its locks taken, the shard is asked.
#[tokio::test]
async fn a_revived_rollback_asks_nothing_before_its_locks() {
    let events = engine();
    let mut rx0 = attach(&events, "s0", 1).await;
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1")],
        pb::FailurePolicy::AllOrNothing,
    );
    run.epoch = 1;
    // applied (by the leader before): something to undo
    run.set_status(0, crate::plan::StepStatus::Applied);
    run.state = crate::plan::PlanState::Completed;
    let (reply, answered) = oneshot::channel();
    events
        .send(Event::Command {
            plan_id: "p0".into(),
            kind: super::CommandKind::Rollback,
            actor: crate::actor::Actor::new("coordinator", "resumed"),
            revive: Some(Box::new(run)),
            reply,
        })
        .await
        .unwrap();
    answered.await.unwrap().expect("the rollback revived");
    events.send(Event::Tick).await.unwrap();
    handled(&events).await;
    while let Ok(m) = rx0.try_recv() {
        assert!(!matches!(m.body, Some(Body::Rollback(_))), "{m:?}");
    }
    events
        .send(Event::LocksTaken {
            plan_id: "p0".into(),
        })
        .await
        .unwrap();
    assert!(matches!(
        next_decision_or_rollback(&mut rx0).await,
        Body::Rollback(_)
    ));
}
