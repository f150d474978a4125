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
    let (store, mut writes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(op) = writes.recv().await {
            if let StoreOp::Flush(done) = op {
                let _ = done.send(());
            }
        }
    });
    let (events, rx) = mpsc::channel(64);
    let engine = Engine::new(
        Arc::new(EmbeddedCoordination::new(1)),
        Duration::from_secs(30),
        store,
        changes,
        fleet,
        events.clone(),
    );
    tokio::spawn(engine.run(rx));
    events
}

/// Starts the plan `p0` and hands it its shard locks: it may hand out runs.
async fn start_locked(events: &mpsc::Sender<Event>, run: crate::plan::PlanRun) {
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

async fn next_message(rx: &mut mpsc::Receiver<pb::CoordinatorMessage>) -> Body {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a message for the agent within 5s")
        .expect("the stream is open")
        .body
        .expect("a body")
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
    events
        .send(Event::Attached {
            shard: "s0".into(),
            conn_id: 1,
            tx: tx.clone(),
            max_lanes: 4,
            in_doubt: Vec::new(),
            epoch: 1,
        })
        .await
        .unwrap();
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
    let attach = |conn_id: u64, tx: mpsc::Sender<pb::CoordinatorMessage>| Event::Attached {
        shard: "s0".into(),
        conn_id,
        tx,
        max_lanes: 4,
        in_doubt: Vec::new(),
        epoch: 1,
    };
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
    events
        .send(Event::Detached {
            shard: "s0".into(),
            conn_id: 1,
        })
        .await
        .unwrap();
    let (tx2, mut rx2) = mpsc::channel(16);
    events.send(attach(2, tx2)).await.unwrap();
    assert!(matches!(next_message(&mut rx2).await, Body::Plan(_)));
    match next_message(&mut rx2).await {
        Body::Assign(a) => assert_eq!(a.runs, first, "the same runs, same ids"),
        other => panic!("expected the runs again, got {other:?}"),
    }
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
        fleet.attach(
            "s0",
            AttachedAgent {
                conn_id,
                tx: tx.clone(),
                labels: Default::default(),
                tenants: Vec::new(),
                version: String::new(),
                last_seen_ms: 0,
            },
        );
        let event = Event::Attached {
            shard: "s0".into(),
            conn_id,
            tx,
            max_lanes: 4,
            in_doubt: Vec::new(),
            epoch,
        };
        (event, rx)
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
    let (tx, mut rx) = mpsc::channel(16);
    events
        .send(Event::Attached {
            shard: "s0".into(),
            conn_id: 1,
            tx,
            max_lanes: 4,
            in_doubt: Vec::new(),
            epoch: 1,
        })
        .await
        .unwrap();
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
    let last = loop {
        let (id, ended) = tokio::time::timeout(Duration::from_secs(5), told.recv())
            .await
            .expect("the plan ends within 5s")
            .expect("the engine tells");
        assert_eq!(id, "p0");
        if let Some(last) = ended {
            break last;
        }
    };
    let summary = last.summary.as_ref().expect("a summary");
    assert_eq!(summary.state, "completed");
    assert_eq!(last.migrations.len(), 1);
    assert_eq!(last.migrations[0].migration_id, "a");
    assert_eq!(last.migrations[0].applied, 2);
    assert!(last.failures.is_empty());
    // and it has left memory: a status now comes from the store
    let (reply, answered) = oneshot::channel();
    events
        .send(Event::Status {
            plan_id: "p0".into(),
            reply,
        })
        .await
        .unwrap();
    assert!(answered.await.unwrap().is_none());
}
