//! Agent sessions: an agent's stream registered with the fleet and the engine, the
//! coordinator's side of the heartbeat, and the agent's messages routed to where they
//! are handled. Only the leader takes agents.
//!
//! Two views of an attached agent exist on purpose: [`registry::Fleet`] is what the API
//! reads (labels, tenants, last seen, preflight exchanges) from any task; the engine's
//! connection (`engine::agents`) is the sending side, owned by the engine's one task
//! with its backlog, and exists only while this coordinator leads.
pub mod registry;
use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_core::pb;
use flotilla_core::pb::agent_message::Body;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{error, info, warn};

use crate::engine::{Event, msg};
use crate::error::{Conflict, CoordinatorError};
use crate::service::Coordinator;
use crate::store::{StoreOp, now_ms};
use registry::AttachedAgent;

/// How often each side says it is alive; three missed and the agent counts as gone.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Sized for bursts of assignments; what does not fit waits in the engine's backlog.
const STREAM_CAPACITY: usize = 4096;

pub(crate) fn tenants_json(tenants: &[pb::Tenant]) -> String {
    let v: Vec<(String, BTreeMap<String, String>)> = tenants
        .iter()
        .map(|t| (t.name.clone(), t.labels.clone().into_iter().collect()))
        .collect();
    serde_json::to_string(&v).unwrap_or_else(|_| "[]".into())
}

impl Coordinator {
    /// Opens the session of an agent that said `hello` (already validated): returns the
    /// stream of messages to it; `inbound` (its messages after Hello, or why its stream
    /// failed) is read until it ends, misses three heartbeats, or the coordinator lets
    /// its agents go as it stops (the stream to the agent ends then too).
    pub async fn open_session(
        &self,
        hello: pb::Hello,
        inbound: impl Stream<Item = Result<pb::AgentMessage, String>> + Send + Unpin + 'static,
    ) -> Result<impl Stream<Item = pb::CoordinatorMessage> + Send + 'static, CoordinatorError> {
        // A coordinator stopping takes no agent: it is about to let them all go.
        if self.inner.shutdown.is_stopping() {
            return Err(CoordinatorError::ShuttingDown);
        }
        // Only the leader assigns work: a follower sends the agent on, naming the leader.
        let epoch = self.leader_epoch()?;
        let shard = hello.shard.clone();
        let inner = &self.inner;
        // A shard that has seen a later epoch than this leader's would refuse every step it
        // sends (fenced), the operator told only step by step. Without etcd the epoch is the
        // store's counter: raised to the shard's, the next start of this coordinator leads
        // above it. With etcd it is the cluster's revision (a cluster restored from a
        // snapshot: see `etcdutl snapshot restore --bump-revision`).
        if hello.fence_epoch > epoch {
            let remedy = if inner.embedded.is_some() {
                match inner.store.raise_epoch(hello.fence_epoch).await {
                    Ok(()) => format!(
                        ": this store's epoch is raised to {}; restart this coordinator, and it leads above it",
                        hello.fence_epoch
                    ),
                    Err(e) => format!(": raising this store's epoch failed: {e}"),
                }
            } else {
                ": restore etcd with `etcdutl snapshot restore --bump-revision N --mark-compacted`, N above the shard's epoch".to_string()
            };
            let refusal = Conflict::FenceAhead {
                shard: shard.clone(),
                fence: hello.fence_epoch,
                epoch,
                remedy,
            };
            error!(%shard, "{refusal}");
            return Err(refusal.into());
        }
        // A database no step ran on, under a shard this coordinator applied steps on: its
        // --dsn names another database (a copy, a new one). Taken, it was told the shard's
        // tenants had nothing applied, and catch-ups ran every migration again there.
        if hello.journal_empty == Some(true) {
            let applied = inner.store.applied_on(&shard).await?;
            if applied > 0 {
                let refusal = Conflict::ShardDatabaseWithoutJournal {
                    shard: shard.clone(),
                    database: hello.database.clone(),
                    applied,
                };
                error!(%shard, database = %hello.database, "{refusal}");
                return Err(refusal.into());
            }
        }
        let conn_id = inner.fleet.next_conn_id();
        let (tx, rx) = mpsc::channel::<pb::CoordinatorMessage>(STREAM_CAPACITY);
        let labels: BTreeMap<String, String> = hello.labels.clone().into_iter().collect();
        // What this coordinator knew of the shard's tenants, to tell the new ones.
        let before = inner
            .store
            .agent(&shard)
            .await?
            .map(|a| a.tenants().into_iter().map(|(name, _)| name).collect());
        let taken = inner.fleet.attach(
            &shard,
            AttachedAgent {
                conn_id,
                tx: tx.clone(),
                labels: labels.clone(),
                tenants: hello.tenants.clone(),
                version: hello.version.clone(),
                last_seen_ms: now_ms(),
                database: hello.database.clone(),
                shard_unreachable: false,
            },
        );
        if let Err(attached) = taken {
            warn!(%shard, database = %hello.database, %attached, "an agent of another database under an attached shard's name is refused");
            return Err(Conflict::ShardServedElsewhere {
                shard,
                attached,
                database: hello.database,
            }
            .into());
        }
        // under the term that took the agent: the engine lets an attach of another go
        self.write_under(
            epoch,
            StoreOp::Agent {
                shard: shard.clone(),
                labels: serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into()),
                tenants: tenants_json(&hello.tenants),
                version: hello.version.clone(),
                seen_ms: 0,
            },
        );
        // The channel is new and empty: the Welcome always fits.
        let _ = tx
            .send(msg(pb::coordinator_message::Body::Welcome(pb::Welcome {
                epoch,
                heartbeat_interval_ms: HEARTBEAT.as_millis() as u64,
            })))
            .await;
        inner.versions.attached(&shard, epoch);
        self.tenants_seen(&shard, before, &hello.tenants);
        info!(shard = %shard, tenants = hello.tenants.len(), "agent attached");
        if let Some(e) = &inner.embedded {
            e.set_live(&shard, true);
        }
        spawn_heartbeat(tx.downgrade(), conn_id);
        self.event(Event::Attached {
            shard: shard.clone(),
            conn_id,
            tx,
            max_lanes: hello.max_lanes,
            in_doubt: hello.in_doubt.clone(),
            in_doubt_unknown: hello.in_doubt_unknown,
            committed: hello.committed.clone(),
            epoch,
        })
        .await;
        let stream_name = format!("the agent stream of shard {shard}");
        let me = self.clone();
        tokio::spawn(async move { me.read_session(shard, conn_id, epoch, inbound).await });
        // The fleet and the engine let go of the stream at shutdown, but an attach racing
        // with it may still hold a sender: the stream ends then regardless.
        let outbound = ReceiverStream::new(rx).take_until(inner.shutdown.agents_released());
        Ok(inner.shutdown.track(stream_name, outbound))
    }

    /// Routes an agent's messages until its stream ends, then lets it go.
    /// `epoch`: the term the agent attached under.
    async fn read_session(
        &self,
        shard: String,
        conn_id: u64,
        epoch: u64,
        mut inbound: impl Stream<Item = Result<pb::AgentMessage, String>> + Unpin,
    ) {
        let inner = &self.inner;
        let released = inner.shutdown.agents_released();
        tokio::pin!(released);
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(HEARTBEAT * 3, inbound.next()) => next,
                // Dropping the agent's half too, so its call ends even if it holds it open.
                () = &mut released => break,
            };
            let m = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    warn!(shard = %shard, "agent stream error: {e}");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    warn!(shard = %shard, "agent missed its heartbeats");
                    break;
                }
            };
            let received = std::time::Instant::now();
            inner.fleet.touch(&shard, conn_id, now_ms());
            let shard = shard.clone();
            let event = match m.body {
                Some(Body::Heartbeat(hb)) => {
                    let unreachable = hb.shard_unreachable;
                    if inner.fleet.set_unreachable(&shard, conn_id, unreachable) {
                        if unreachable {
                            warn!(shard = %shard, "the agent says its shard's database does not answer it; the shard is not reported in the fleet's state until it does");
                        } else {
                            info!(shard = %shard, "the agent reaches its shard's database again");
                        }
                        // plans waiting on the shard say so (their progress there stands still)
                        self.event(Event::Reachability {
                            shard: shard.clone(),
                            conn_id,
                            unreachable,
                        })
                        .await;
                    }
                    // What its journal and catalog said may change meanwhile (another
                    // agent, a hand), and its targets were counted as last heard: not
                    // reported until the agent, back on its shard, reports the whole again.
                    if unreachable {
                        inner.versions.detached(&shard);
                    }
                    if hb.data.is_empty() {
                        continue;
                    }
                    Event::Progress {
                        shard,
                        data: hb.data,
                    }
                }
                Some(Body::Hello(_)) | None => continue,
                Some(Body::Results(results)) => {
                    inner.versions.record_results(&shard, &results, epoch);
                    Event::Results {
                        shard,
                        results,
                        received,
                    }
                }
                Some(Body::Journal(report)) => {
                    inner.versions.apply(&shard, report);
                    continue;
                }
                Some(Body::Tenants(report)) => {
                    self.record_tenants(&shard, &report.tenants);
                    continue;
                }
                Some(Body::Schema(report)) => {
                    if inner.versions.apply_schema(&shard, report) {
                        self.publish_drift();
                    }
                    continue;
                }
                Some(Body::Preflight(reply)) => {
                    inner.fleet.complete_preflight(reply);
                    continue;
                }
                Some(Body::Check(reply)) => {
                    inner.fleet.complete_check(reply);
                    continue;
                }
                Some(Body::Baseline(reply)) => {
                    inner.fleet.complete_baseline(reply);
                    continue;
                }
                Some(Body::Explain(reply)) => {
                    inner.fleet.complete_explain(reply);
                    continue;
                }
                Some(Body::Resolve(reply)) => Event::ResolveReply { shard, reply },
                Some(Body::Rollback(reply)) => {
                    inner.fleet.undo_reported();
                    inner.versions.record_rollback(&shard, &reply);
                    Event::RollbackReply { shard, reply }
                }
            };
            self.event(event).await;
        }
        // (its row as attached, for the store's "last seen" below)
        let leaving = inner.fleet.agent(&shard).filter(|a| a.conn_id == conn_id);
        if inner.fleet.detach(&shard, conn_id) {
            info!(shard = %shard, "agent detached");
            if let Some(a) = leaving {
                self.write(StoreOp::Agent {
                    shard: shard.clone(),
                    labels: serde_json::to_string(&a.labels).unwrap_or_else(|_| "{}".into()),
                    tenants: tenants_json(&a.tenants),
                    version: a.version,
                    seen_ms: a.last_seen_ms,
                });
            }
            inner.versions.detached(&shard);
            if let Some(e) = &inner.embedded {
                e.set_live(&shard, false);
            }
        }
        self.event(Event::Detached { shard, conn_id }).await;
    }

    /// An attached agent's tenants as it found them now (discovery, a preflight): the
    /// fleet's view and the store take them, and new ones may be caught up.
    pub(crate) fn record_tenants(&self, shard: &str, tenants: &[pb::Tenant]) {
        let inner = &self.inner;
        let (before, answered) = inner.fleet.set_tenants(shard, tenants.to_vec()).unzip();
        if let Some(agent) = inner.fleet.agent(shard) {
            self.write(StoreOp::Agent {
                shard: shard.to_string(),
                labels: serde_json::to_string(&agent.labels).unwrap_or_else(|_| "{}".into()),
                tenants: tenants_json(tenants),
                version: agent.version.clone(),
                seen_ms: 0,
            });
        }
        self.tenants_seen(shard, before, tenants);
        self.schemas_answered(shard, answered.unwrap_or_default(), tenants);
    }

    /// Hands the engine an event; an engine gone is a coordinator shutting down.
    pub(crate) async fn event(&self, event: Event) {
        if self.inner.events.send(event).await.is_err() {
            warn!("the engine has stopped; an agent's message is dropped");
        }
    }
}

/// Phases of the coordinator's one heartbeat clock: each agent's stream beats on one of
/// them (by its connection number), so the runtime wakes a few times a second for all the
/// agents' heartbeats rather than once per agent at the instant each attached: at 64
/// agents those wake-ups (epoll and futex) were a fifth of the coordinator's idle CPU. More
/// than one phase, so that a fleet of a thousand agents is not a thousand messages in one
/// instant every second, with results waiting behind them.
const BEAT_PHASES: u32 = 8;

/// The next instant of phase `slot` (of `BEAT_PHASES`) on the heartbeat clock.
fn next_beat(slot: u64) -> tokio::time::Instant {
    static CLOCK: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let now = tokio::time::Instant::now();
    beat_after(*CLOCK.get_or_init(|| now), now, slot)
}

/// The first instant after `now`, within a heartbeat, of phase `slot` on the clock that
/// started at `origin`.
fn beat_after(
    origin: tokio::time::Instant,
    now: tokio::time::Instant,
    slot: u64,
) -> tokio::time::Instant {
    let phase = HEARTBEAT / BEAT_PHASES * (slot % u64::from(BEAT_PHASES)) as u32;
    let first = origin + phase;
    match now.checked_duration_since(first) {
        Some(since) => {
            let into = since.as_nanos() % HEARTBEAT.as_nanos();
            now + (HEARTBEAT - Duration::from_nanos(into as u64))
        }
        None if first - now <= HEARTBEAT => first,
        // a clock behind the origin (a test runtime's paused clock): a phase of its own
        None => now + HEARTBEAT,
    }
}

/// The coordinator's side of the heartbeat. It holds the stream weakly: when the fleet
/// and the engine let the agent go, the stream ends.
fn spawn_heartbeat(beat: mpsc::WeakSender<pb::CoordinatorMessage>, conn_id: u64) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval_at(next_beat(conn_id), HEARTBEAT);
        // The first at once, the others on the clock: an agent counts silence only once it
        // has heard a heartbeat, and a coordinator paused (or cut off) right after the
        // Welcome must still be noticed.
        loop {
            let m = msg(pb::coordinator_message::Body::Heartbeat(pb::Heartbeat {
                sent_at_ms: now_ms() as u64,
                ..Default::default()
            }));
            let Some(tx) = beat.upgrade() else { return };
            if tx.send(m).await.is_err() {
                return;
            }
            // held only while sending: the stream ends once the fleet and the engine let go
            drop(tx);
            every.tick().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stream beats on one of the clock's phases, within a heartbeat from now.
    #[test]
    fn heartbeats_beat_on_the_phases_of_one_clock() {
        let origin = tokio::time::Instant::now();
        let step = HEARTBEAT / BEAT_PHASES;
        for conn_id in 0..20u64 {
            for after in [0, 1, 124, 125, 999, 1000, 7_777] {
                let now = origin + Duration::from_millis(after);
                let at = beat_after(origin, now, conn_id);
                assert!(
                    at > now && at <= now + HEARTBEAT,
                    "conn {conn_id} at {after} ms"
                );
                let into = (at - origin).as_nanos() % HEARTBEAT.as_nanos();
                let want = (step * (conn_id % u64::from(BEAT_PHASES)) as u32).as_nanos();
                assert_eq!(into, want, "conn {conn_id} at {after} ms: on its phase");
            }
        }
        // a clock behind the origin beats a heartbeat from its own now
        let later = origin + Duration::from_secs(3600);
        assert_eq!(beat_after(later, origin, 3), origin + HEARTBEAT);
    }
}
