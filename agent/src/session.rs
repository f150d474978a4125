//! The agent's stream to the coordinator: Hello, heartbeats, dispatch of what arrives,
//! batched results, and reconnecting with backoff when the stream is lost.
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_proto::pb;
use flotilla_proto::pb::agent_message::Body as Out;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::pb::coordinator_message::Body as In;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::{Instrument, debug, info, instrument, warn};

use crate::error::AgentError;
use crate::{Agent, metrics};

/// Results are sent at most this long after the first of a batch is ready...
const FLUSH_AFTER: Duration = Duration::from_millis(25);
/// ...or as soon as this many runs are waiting.
const FLUSH_RUNS: usize = 128;
/// Messages queued toward the coordinator before the agent holds back.
const OUTBOUND_CAPACITY: usize = 1024;
/// How long a Hello waits for tenant discovery before using the last list.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent's tasks hand to the session for sending, kept across reconnects.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Run {
        plan_id: String,
        result: pb::RunResult,
    },
    Rollback(pb::RollbackReply),
}

/// Results waiting for the coordinator. They outlive a stream: whatever was not sent goes
/// out after the next Hello (the coordinator takes repeats).
pub(crate) struct Outbox {
    rx: mpsc::UnboundedReceiver<Outgoing>,
    runs: Vec<(String, pb::RunResult)>,
    ready: VecDeque<pb::AgentMessage>,
    since: Option<Instant>,
}

impl Outbox {
    pub fn new(rx: mpsc::UnboundedReceiver<Outgoing>) -> Outbox {
        Outbox {
            rx,
            runs: Vec::new(),
            ready: VecDeque::new(),
            since: None,
        }
    }

    fn push(&mut self, item: Outgoing) {
        match item {
            Outgoing::Run { plan_id, result } => self.runs.push((plan_id, result)),
            Outgoing::Rollback(reply) => self.ready.push_back(pb::AgentMessage {
                body: Some(Out::Rollback(reply)),
            }),
        }
        self.since.get_or_insert_with(Instant::now);
    }

    fn due(&self) -> Option<Instant> {
        self.since.map(|s| s + FLUSH_AFTER)
    }

    /// Groups buffered runs into one RunResults per plan (in order of arrival).
    fn batch(&mut self) {
        let mut by_plan: Vec<pb::RunResults> = Vec::new();
        for (plan_id, run) in self.runs.drain(..) {
            match by_plan.iter_mut().find(|r| r.plan_id == plan_id) {
                Some(r) => r.runs.push(run),
                None => by_plan.push(pb::RunResults {
                    plan_id,
                    runs: vec![run],
                }),
            }
        }
        self.ready
            .extend(by_plan.into_iter().map(|r| pb::AgentMessage {
                body: Some(Out::Results(r)),
            }));
    }

    /// Sends what is ready without waiting. Err when the stream is gone.
    fn flush(&mut self, tx: &mpsc::Sender<pb::AgentMessage>) -> Result<(), String> {
        fail::fail_point!("agent::before_send_results", |_| Err(
            "failpoint agent::before_send_results".to_string()
        ));
        self.batch();
        while let Some(msg) = self.ready.pop_front() {
            match tx.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(msg)) => {
                    // the coordinator is slow to read: try again shortly
                    self.ready.push_front(msg);
                    self.since = Some(Instant::now());
                    return Ok(());
                }
                Err(TrySendError::Closed(msg)) => {
                    self.ready.push_front(msg);
                    return Err("the stream to the coordinator closed".into());
                }
            }
        }
        self.since = None;
        Ok(())
    }
}

/// Exponential backoff between `min` and `max`, with jitter (`jitter` in [0, 1)) over the
/// upper half of the step, so a fleet of agents does not reconnect in lockstep.
pub(crate) fn backoff_delay(attempt: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let step = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    let floor = (step / 2).max(min);
    floor + step.saturating_sub(floor).mul_f64(jitter.clamp(0.0, 1.0))
}

pub(crate) fn endpoint(shard: &str, address: &str) -> Result<Endpoint, AgentError> {
    Endpoint::from_shared(address.to_string())
        .map(|e| e.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true))
        .map_err(|e| AgentError::Coordinator {
            shard: shard.to_string(),
            address: address.to_string(),
            reason: format!("not a valid address: {e}"),
        })
}

enum Ended {
    Shutdown,
    Lost { welcomed: bool, reason: String },
}

/// Keeps a stream to the coordinator open until shutdown.
#[instrument(skip_all, fields(shard = %agent.config.shard))]
pub(crate) async fn run(agent: Arc<Agent>, mut outbox: Outbox, endpoint: Endpoint) {
    let mut attempt = 0u32;
    loop {
        match session(&agent, &mut outbox, &endpoint).await {
            Ended::Shutdown => return,
            Ended::Lost { welcomed, reason } => {
                metrics::coordinator_connected(false);
                if welcomed {
                    attempt = 0;
                }
                let delay = backoff_delay(
                    attempt,
                    agent.config.reconnect_min,
                    agent.config.reconnect_max,
                    rand::random(),
                );
                warn!(coordinator = %agent.config.coordinator, %reason, attempt, ?delay, "coordinator stream lost, reconnecting");
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    () = tokio::time::sleep(delay) => metrics::reconnected(),
                    () = agent.cancel.cancelled() => return,
                }
            }
        }
    }
}

/// An error with its sources (tonic's transport error alone says only "transport error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One stream, from Hello to its end.
async fn session(agent: &Arc<Agent>, outbox: &mut Outbox, endpoint: &Endpoint) -> Ended {
    let lost = |welcomed, reason: String| Ended::Lost { welcomed, reason };
    let channel = tokio::select! {
        c = endpoint.connect() => match c {
            Ok(c) => c,
            Err(e) => return lost(false, format!("connecting: {}", chain(&e))),
        },
        () = agent.cancel.cancelled() => return Ended::Shutdown,
    };
    let mut client = AgentServiceClient::new(channel);
    // a shard that does not answer must not hold up the Hello: the last list will do
    let tenants = match tokio::time::timeout(DISCOVERY_TIMEOUT, agent.refresh_tenants()).await {
        Ok(Ok(tenants)) => tenants,
        _ => agent.known_tenants(),
    };
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let hello = pb::Hello {
        shard: agent.config.shard.clone(),
        labels: agent.config.labels.clone().into_iter().collect(),
        tenants,
        version: env!("CARGO_PKG_VERSION").to_string(),
        max_lanes: agent.config.max_connections,
    };
    let _ = tx.try_send(pb::AgentMessage {
        body: Some(Out::Hello(hello)),
    });
    let mut inbound = tokio::select! {
        r = client.attach(ReceiverStream::new(rx)) => match r {
            Ok(response) => response.into_inner(),
            Err(status) => return lost(false, format!("attach: {status}")),
        },
        () = agent.cancel.cancelled() => return Ended::Shutdown,
    };
    let mut welcomed = false;
    let mut heartbeat = tokio::time::interval(agent.config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let due = outbox.due().filter(|_| welcomed);
        tokio::select! {
            biased;
            () = agent.cancel.cancelled() => return Ended::Shutdown,
            msg = inbound.message() => match msg {
                Ok(Some(msg)) => {
                    let Some(body) = msg.body else { continue };
                    if let In::Welcome(w) = &body {
                        welcomed = true;
                        metrics::coordinator_connected(true);
                        agent.welcome_epoch.store(w.epoch, Ordering::Relaxed);
                        if w.heartbeat_interval_ms > 0 {
                            heartbeat = tokio::time::interval(Duration::from_millis(w.heartbeat_interval_ms));
                            heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        }
                        info!(epoch = w.epoch, heartbeat_ms = w.heartbeat_interval_ms, "coordinator welcomed the agent");
                    } else {
                        dispatch(agent, body, &tx);
                    }
                }
                Ok(None) => return lost(welcomed, "the coordinator ended the stream".into()),
                Err(status) => return lost(welcomed, format!("stream error: {status}")),
            },
            Some(item) = outbox.rx.recv() => {
                outbox.push(item);
                if welcomed
                    && outbox.runs.len() >= FLUSH_RUNS
                    && let Err(reason) = outbox.flush(&tx)
                {
                    return lost(welcomed, reason);
                }
            }
            () = sleep_until(due), if due.is_some() => {
                if let Err(reason) = outbox.flush(&tx) {
                    return lost(welcomed, reason);
                }
            }
            _ = heartbeat.tick() => {
                let beat = pb::AgentMessage { body: Some(Out::Heartbeat(pb::Heartbeat { sent_at_ms: unix_ms() })) };
                if let Err(TrySendError::Closed(_)) = tx.try_send(beat) {
                    return lost(welcomed, "the stream to the coordinator closed".into());
                }
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due).await;
    }
}

/// Hands one coordinator message to the part of the agent that owns it.
fn dispatch(agent: &Arc<Agent>, body: In, tx: &mpsc::Sender<pb::AgentMessage>) {
    match body {
        In::Welcome(_) => {}
        In::Plan(def) => agent.define_plan(def),
        In::Assign(assign) => agent.assign(assign),
        In::Halt(halt) => agent.halt(&agent.plan(&halt.plan_id)),
        In::Preflight(req) => {
            let agent2 = agent.clone();
            let tx = tx.clone();
            let span = tracing::info_span!("preflight", shard = %agent.config.shard, request = req.request_id);
            agent.tasks.spawn(
                async move {
                    let reply = agent2.preflight(req).await;
                    // a reply for a stream that is gone is dropped: its request went with it
                    if tx
                        .send(pb::AgentMessage {
                            body: Some(Out::Preflight(reply)),
                        })
                        .await
                        .is_err()
                    {
                        debug!("preflight reply dropped: the stream is gone");
                    }
                }
                .instrument(span),
            );
        }
        In::Rollback(req) => {
            let agent2 = agent.clone();
            agent.tasks.spawn(async move {
                let outbox = agent2.outbox.clone();
                let reply = agent2.rollback(req).await;
                let _ = outbox.send(Outgoing::Rollback(reply));
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_in_bounds() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(backoff_delay(0, min, max, 0.0), min);
        assert_eq!(
            backoff_delay(0, min, max, 0.999),
            Duration::from_millis(100)
        );
        assert_eq!(backoff_delay(3, min, max, 0.0), Duration::from_millis(400));
        assert!(backoff_delay(3, min, max, 0.999) <= Duration::from_millis(800));
        for attempt in [10, 31, 1000] {
            for j in [0.0, 0.5, 0.999] {
                let d = backoff_delay(attempt, min, max, j);
                assert!(
                    d >= Duration::from_millis(2500) && d <= max,
                    "{attempt} {j} {d:?}"
                );
            }
        }
    }

    fn run_result(id: u64) -> pb::RunResult {
        pb::RunResult {
            run_id: id,
            tenant: format!("t{id}"),
            steps: Vec::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn outbox_batches_per_plan_and_keeps_what_was_not_sent() {
        let (_in_tx, in_rx) = mpsc::unbounded_channel();
        let mut outbox = Outbox::new(in_rx);
        for (plan, id) in [("a", 1), ("b", 2), ("a", 3)] {
            outbox.push(Outgoing::Run {
                plan_id: plan.into(),
                result: run_result(id),
            });
        }
        assert_eq!(outbox.due(), Some(Instant::now() + FLUSH_AFTER));
        let (tx, mut rx) = mpsc::channel(8);
        outbox.flush(&tx).unwrap();
        assert!(outbox.due().is_none());
        let Some(Out::Results(r)) = rx.recv().await.unwrap().body else {
            panic!("not results")
        };
        assert_eq!((r.plan_id.as_str(), r.runs.len()), ("a", 2));
        let Some(Out::Results(r)) = rx.recv().await.unwrap().body else {
            panic!("not results")
        };
        assert_eq!((r.plan_id.as_str(), r.runs.len()), ("b", 1));
        // a closed stream keeps the batch for the next one
        outbox.push(Outgoing::Run {
            plan_id: "c".into(),
            result: run_result(4),
        });
        drop(rx);
        assert!(outbox.flush(&tx).is_err());
        let (tx2, mut rx2) = mpsc::channel(8);
        outbox.flush(&tx2).unwrap();
        let Some(Out::Results(r)) = rx2.recv().await.unwrap().body else {
            panic!("not results")
        };
        assert_eq!((r.plan_id.as_str(), r.runs[0].run_id), ("c", 4));
    }
}
