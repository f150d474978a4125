//! One stream to a coordinator, from Hello to its end: heartbeats (and the silence that
//! ends a stream), batched results, and what arrives handed to `dispatch`.
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_core::pb;
use flotilla_core::pb::agent_message::Body as Out;
use flotilla_core::pb::agent_service_client::AgentServiceClient;
use flotilla_core::pb::coordinator_message::Body as In;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::transport::Endpoint;
use tracing::{info, warn};

use super::coordinators::refusal;
use super::dispatch::dispatch;
use super::journal;
use super::outbox::{FLUSH_RUNS, Outbox, StreamGone};
use crate::{Agent, metrics};

/// How long connecting to a coordinator and attaching may take.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued toward the coordinator before the agent holds back.
const OUTBOUND_CAPACITY: usize = 1024;
/// How long a Hello waits for tenant discovery before using the last list.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long resolving in-doubt prepared transactions may hold up a connection attempt.
const IN_DOUBT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long listing the shard's prepared transactions (without resolving them) may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) enum Ended {
    Shutdown,
    Lost {
        welcomed: bool,
        reason: String,
    },
    /// A follower refused the agent (or a deposed leader ended the stream), naming the
    /// leader when it knows it.
    NotLeader {
        welcomed: bool,
        leader: Option<String>,
    },
}

impl Ended {
    /// A stream ended by `status`, in `what` (attaching, reading).
    fn from_status(welcomed: bool, what: &str, status: &Status) -> Ended {
        match refusal(status) {
            Some(leader) => Ended::NotLeader { welcomed, leader },
            None => {
                // the cause (a TLS alert: the coordinator refused this agent's certificate)
                // is in the status's source, after "operation was canceled"
                let cause = std::error::Error::source(status).map(chain);
                let said = format!("{status:?}");
                Ended::Lost {
                    welcomed,
                    reason: match cause {
                        Some(cause) => format!(
                            "{what}: {}: {cause}{}",
                            status.message(),
                            certificate_hint(&said)
                        ),
                        None => format!("{what}: {status}{}", certificate_hint(&said)),
                    },
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

/// What a TLS alert from the coordinator says of this agent's certificate, in words (the
/// log said "operation was canceled", the alert buried in the status's source).
fn certificate_hint(said: &str) -> &'static str {
    if said.contains("CertificateExpired") {
        " (the coordinator refused this agent's certificate: it has expired, or is not valid yet; issue a new --tls-cert)"
    } else if said.contains("UnknownCA") || said.contains("BadCertificate") {
        " (the coordinator refused this agent's certificate: it is not signed by the CA the coordinator trusts, its --tls-ca)"
    } else if said.contains("CertificateRequired") {
        " (the coordinator requires a client certificate: give the agent --tls-cert and --tls-key)"
    } else {
        ""
    }
}

/// What a failed connection says of a scheme that does not match the coordinator's: the
/// transport errors alone ("corrupt message", "broken pipe") did not say it (the CLI's did).
fn scheme_hint(address: &str, said: &str) -> &'static str {
    let https = flotilla_core::tls::is_https(address);
    if https && (said.contains("InvalidContentType") || said.contains("corrupt message")) {
        " (the coordinator there answered in plaintext: it runs without --tls-cert; give it as http://, on loopback only)"
    } else if !https
        && (said.contains("BrokenPipe")
            || said.contains("Broken pipe")
            || said.contains("connection reset")
            || said.contains("ConnectionReset"))
    {
        " (if the coordinator serves TLS, give it as https:// with --tls-ca, and the agent's certificate)"
    } else {
        ""
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One stream, from Hello to its end.
pub(super) async fn session(
    agent: &Arc<Agent>,
    outbox: &mut Outbox,
    endpoint: &Endpoint,
    address: &str,
) -> Ended {
    let lost = |welcomed, reason: String| Ended::Lost { welcomed, reason };
    // In-doubt prepared transactions are resolved from etcd at every attempt, while the
    // coordinator is dialed: so also while none is up. What is left goes in the Hello.
    let (connected, in_doubt) = tokio::select! {
        pair = async { tokio::join!(tokio::time::timeout(ATTACH_TIMEOUT, endpoint.connect()), in_doubt(agent)) } => pair,
        () = agent.cancel.cancelled() => return Ended::Shutdown,
    };
    let channel = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let said = chain(&e);
            return lost(
                false,
                format!(
                    "connecting: {said}{}{}",
                    scheme_hint(address, &said),
                    certificate_hint(&said)
                ),
            );
        }
        Err(_) => {
            return lost(
                false,
                format!("connecting: no answer within {ATTACH_TIMEOUT:?}"),
            );
        }
    };
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(flotilla_core::protocol::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(flotilla_core::protocol::MAX_MESSAGE_BYTES);
    // a shard that does not answer must not hold up the Hello: the last list will do
    let tenants = match tokio::time::timeout(DISCOVERY_TIMEOUT, agent.refresh_tenants()).await {
        Ok(Ok(tenants)) => tenants,
        _ => agent.known_tenants(),
    };
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let in_doubt_unknown = in_doubt.is_none();
    let fence_epoch = crate::shard::read_fence(&agent.pool).await.unwrap_or(0);
    let journal_empty = crate::shard::journal_empty(&agent.pool).await.ok();
    let hello = pb::Hello {
        fence_epoch,
        journal_empty,
        in_doubt: in_doubt.unwrap_or_default(),
        in_doubt_unknown,
        shard: agent.config.shard.clone(),
        labels: agent.config.labels.clone().into_iter().collect(),
        tenants,
        version: env!("CARGO_PKG_VERSION").to_string(),
        max_lanes: agent.config.max_connections,
        database: agent.database.clone(),
        committed: agent
            .committed_from_etcd
            .lock()
            .expect("committed lock")
            .iter()
            .cloned()
            .collect(),
    };
    // cannot fail: the channel is new, empty and its receiver is still here
    let _ = tx.try_send(pb::AgentMessage {
        body: Some(Out::Hello(hello)),
    });
    // A paused coordinator accepts the TCP connection and then never answers:
    // the attach is bounded so the agent moves on to the next address.
    let mut inbound = tokio::select! {
        r = tokio::time::timeout(ATTACH_TIMEOUT, client.attach(ReceiverStream::new(rx))) => match r {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                let hint = scheme_hint(address, &format!("{status:?}"));
                if hint.is_empty() {
                    return Ended::from_status(false, "attach", &status);
                }
                return lost(false, format!("attach: {status}{hint}"));
            }
            Err(_) => return lost(false, format!("no answer to attach within {ATTACH_TIMEOUT:?}")),
        },
        () = agent.cancel.cancelled() => return Ended::Shutdown,
    };
    let mut welcomed = false;
    let mut interval = agent.config.heartbeat_interval;
    let mut heartbeat = tokio::time::interval(interval);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // A paused or partitioned coordinator keeps its TCP connection open: once it has sent a
    // heartbeat (older ones never do), three intervals of silence end the stream.
    let mut last_heard: Option<Instant> = None;
    let mut last_full_report = Instant::now();
    // Whether the shard's lock was held at the last heartbeat: taken again, the whole
    // journal goes at once (the coordinator counted the shard as not reported meanwhile).
    let mut shard_held = true;
    loop {
        let due = outbox.due().filter(|_| welcomed);
        let silent_at = last_heard.map(|at| at + interval * 3);
        tokio::select! {
            biased;
            () = agent.cancel.cancelled() => return Ended::Shutdown,
            msg = inbound.message() => match msg {
                Ok(Some(msg)) => {
                    let Some(body) = msg.body else { continue };
                    if matches!(body, In::Heartbeat(_)) || last_heard.is_some() {
                        last_heard = Some(Instant::now());
                    }
                    if let In::Welcome(w) = &body {
                        welcomed = true;
                        metrics::coordinator_connected(true);
                        // counted once a stream is up again, not per dial of the rounds
                        // between (a counter that grew with the outage's length)
                        if agent
                            .welcomed_before
                            .swap(true, std::sync::atomic::Ordering::Relaxed)
                        {
                            metrics::reconnected();
                        }
                        // a new coordinator (or stream) hears where every data change stands
                        agent.progress.mark_all_changed();
                        // ...and the whole journal, for its view of the fleet's versions
                        agent.journal_dirty.mark_all();
                        journal::report(agent, &tx);
                        last_full_report = Instant::now();
                        let before = agent.welcome_epoch.swap(w.epoch, Ordering::Relaxed);
                        if w.epoch > before && before > 0 {
                            agent.drop_stale_atomic_runs(w.epoch);
                            // The shard's fence moves to the new leader's epoch now, not at
                            // its first run: runs an earlier leader handed out and still
                            // queued here are then refused by it (the new leader sends them
                            // again), not applied for seconds under the new leader's term
                            // (invariant 2: a deposed coordinator changes nothing).
                            let (a, epoch) = (agent.clone(), w.epoch);
                            tokio::spawn(async move { a.advance_fence_for_new_leader(epoch).await });
                        }
                        if w.heartbeat_interval_ms > 0 {
                            interval = Duration::from_millis(w.heartbeat_interval_ms);
                            heartbeat = tokio::time::interval(interval);
                            heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        }
                        info!(coordinator = %address, epoch = w.epoch, heartbeat_ms = w.heartbeat_interval_ms, "attached to the coordinator (the leader welcomed the agent)");
                    } else {
                        dispatch(agent, body, &tx);
                    }
                }
                Ok(None) => return lost(welcomed, "the coordinator ended the stream".into()),
                Err(status) => return Ended::from_status(welcomed, "stream error", &status),
            },
            Some(item) = outbox.rx.recv() => {
                agent.journal_dirty.mark(&item);
                outbox.push(item);
                if welcomed {
                    journal::report(agent, &tx);
                }
                if welcomed
                    && outbox.runs.len() >= FLUSH_RUNS
                    && let Err(gone) = flush(agent, outbox, &tx)
                {
                    return lost(welcomed, gone.to_string());
                }
            }
            () = sleep_until(due), if due.is_some() => {
                if let Err(gone) = flush(agent, outbox, &tx) {
                    return lost(welcomed, gone.to_string());
                }
            }
            () = sleep_until(silent_at), if silent_at.is_some() => {
                return lost(welcomed, format!("no word from the coordinator for {:?}", interval * 3));
            }
            _ = heartbeat.tick() => {
                // Attached without the list of the shard's prepared transactions: once the
                // shard lists them, attach again with them (the leader settles none of its
                // atomic units meanwhile).
                if welcomed && in_doubt_unknown && listed(agent).await.is_some() {
                    return lost(welcomed, "attaching again with the shard's prepared transactions, which it could not list before".into());
                }
                let held = *agent.shard_lock.borrow();
                let regained = held && !shard_held;
                shard_held = held;
                if welcomed {
                    // Every discover interval: tenants that came or went, and the whole
                    // journal again (so changes made outside Flotilla show too), once the
                    // shard's runs leave it the cores.
                    if regained {
                        agent.journal_dirty.mark_all();
                        last_full_report = Instant::now();
                        journal::discover(agent, &tx);
                    } else if last_full_report.elapsed() >= agent.config.discover_interval {
                        agent.journal_dirty.mark_periodic();
                        last_full_report = Instant::now();
                        journal::discover(agent, &tx);
                    }
                    journal::report(agent, &tx);
                }
                let data = if welcomed { agent.progress.take_changed() } else { Vec::new() };
                if let Err(gone) = send_heartbeat(agent, &tx, data) {
                    return lost(welcomed, gone.to_string());
                }
            }
        }
    }
}

/// The prepared transactions left in doubt after trying to resolve them; when that fails or
/// runs out of time, those prepared now (none resolved, as far as the Hello says: a Resolve
/// of one resolved meanwhile finds it gone); None when not even those can be listed in
/// time. An empty list must mean none: a new leader settles the shard's part of a unit it
/// inherited from it (committed, or never prepared) and releases the plan's locks.
async fn in_doubt(agent: &Agent) -> Option<Vec<String>> {
    if !unlisted_failpoint() {
        return None;
    }
    match tokio::time::timeout(IN_DOUBT_TIMEOUT, agent.resolve_in_doubt()).await {
        Ok(Ok(left)) => Some(left),
        Ok(Err(error)) => {
            warn!(error = %crate::error::Shown(&error), "cannot resolve the shard's prepared transactions");
            listed(agent).await
        }
        Err(_) => {
            warn!("resolving in-doubt prepared transactions took longer than {IN_DOUBT_TIMEOUT:?}");
            listed(agent).await
        }
    }
}

/// The shard's prepared transactions, listed only; None when the shard does not list them
/// in time.
async fn listed(agent: &Agent) -> Option<Vec<String>> {
    if !unlisted_failpoint() {
        return None;
    }
    match tokio::time::timeout(
        LIST_TIMEOUT,
        crate::run::two_phase::list_prepared(&agent.pool),
    )
    .await
    {
        Ok(Ok(gids)) => Some(gids),
        Ok(Err(error)) => {
            warn!(error = %crate::error::Shown(&error), "cannot list the shard's prepared transactions");
            None
        }
        Err(_) => {
            warn!("listing the shard's prepared transactions took longer than {LIST_TIMEOUT:?}");
            None
        }
    }
}

/// False while `agent::in_doubt_unlisted=return(PATH)` is configured and PATH exists (fault
/// tests: a shard whose prepared transactions cannot be listed, for as long as the test
/// keeps the file); true otherwise, and always without the `testing` feature.
fn unlisted_failpoint() -> bool {
    #[cfg(feature = "testing")]
    if let Some(Some(path)) = fail::eval("agent::in_doubt_unlisted", |arg| arg)
        && std::path::Path::new(&path).exists()
    {
        warn!(
            "failpoint agent::in_doubt_unlisted: the shard's prepared transactions are not listed"
        );
        return false;
    }
    true
}

/// Sends the results waiting in the outbox, after the progress that changed since the last
/// heartbeat: a data change's last progress ("done", its final row count) reaches the
/// coordinator before its result, so a finished plan keeps the final figures.
fn flush(
    agent: &Agent,
    outbox: &mut Outbox,
    tx: &mpsc::Sender<pb::AgentMessage>,
) -> Result<(), StreamGone> {
    let data = agent.progress.take_changed();
    if !data.is_empty() {
        send_heartbeat(agent, tx, data)?;
    }
    outbox.flush(tx)
}

/// Sends a heartbeat with `data`, the progress taken from the board. Progress that does not
/// go out goes back on the board, so it is not lost (a change that ended is on the board
/// only until its last state is handed out): a backed-up stream sends it with the next
/// heartbeat, and the next stream after its Welcome.
fn send_heartbeat(
    agent: &Agent,
    tx: &mpsc::Sender<pb::AgentMessage>,
    data: Vec<pb::DataProgress>,
) -> Result<(), StreamGone> {
    let held = *agent.shard_lock.borrow();
    let (beat, gone) = match tx.try_send(heartbeat_message(data, held)) {
        Ok(()) => return Ok(()),
        Err(TrySendError::Full(beat)) => (beat, false),
        Err(TrySendError::Closed(beat)) => (beat, true),
    };
    if let Some(Out::Heartbeat(hb)) = beat.body {
        agent.progress.put_back(hb.data);
    }
    if gone {
        Err(StreamGone::Closed)
    } else {
        Ok(())
    }
}

/// A heartbeat carrying the data changes' progress that changed since the last one.
fn heartbeat_message(data: Vec<pb::DataProgress>, shard_held: bool) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(Out::Heartbeat(pb::Heartbeat {
            sent_at_ms: unix_ms(),
            data,
            shard_unreachable: !shard_held,
        })),
    }
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due).await;
    }
}

#[cfg(test)]
mod tests {
    use super::scheme_hint;

    /// A scheme that does not match the coordinator's is said, as the CLI says it: a TLS
    /// agent at a plaintext coordinator reads a record that is not TLS, a plaintext one at
    /// a TLS coordinator has its connection cut.
    #[test]
    fn a_scheme_that_does_not_match_the_coordinators_is_said() {
        let plaintext_there = scheme_hint(
            "https://127.0.0.1:7070",
            "transport error: received corrupt message of type InvalidContentType",
        );
        assert!(
            plaintext_there.contains("answered in plaintext"),
            "{plaintext_there}"
        );
        let tls_there = scheme_hint(
            "http://10.0.0.5:7070",
            "Status { code: Unavailable, message: \"transport error\", source: hyper::Error(Io, Os { code: 32, kind: BrokenPipe }) }",
        );
        assert!(tls_there.contains("give it as https://"), "{tls_there}");
        assert_eq!(
            scheme_hint("http://10.0.0.5:7070", "connection refused"),
            ""
        );
    }
}
