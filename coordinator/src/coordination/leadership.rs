//! The one task that owns the session lease: it keeps the lease alive (every
//! TTL/3), campaigns under it, observes the election, and publishes
//! leadership. A keep-alive that fails, an answer with TTL 0, a closed stream,
//! no answer within the TTL (a local deadline), or our election key vanishing
//! ends the session: `Follower` is published before anything else is awaited,
//! then a new lease is granted and the campaign starts over.
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{CampaignResponse, Client, LeaseKeepAliveStream, LeaseKeeper, ObserveStream};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, Sleep, interval_at, sleep, sleep_until, timeout};
use tracing::{debug, info, warn};

use super::Leadership;
use super::error::is_connectivity;
use super::shared::{ElectionKey, Shared};

/// A lease TTL in whole seconds, rounded up (etcd's unit).
pub(super) fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.max(1) as i64
}

/// Runs sessions until `stop` fires (or its sender is gone).
pub(super) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut failures: u32 = 0;
    while !*stop.borrow() {
        let started = Instant::now();
        let Some(reason) = session(&shared, &mut stop).await else {
            break;
        };
        // A session that lasted was healthy: start the backoff over.
        failures = if started.elapsed() > shared.ttl {
            0
        } else {
            failures.saturating_add(1)
        };
        let pause = Duration::from_millis(100 << failures.min(5)).min(shared.ttl);
        debug!(%reason, ?pause, "election session ended; starting a new one");
        tokio::select! {
            _ = stop.changed() => break,
            _ = sleep(pause) => {}
        }
    }
    shared.publish(Leadership::Follower { leader: None });
}

/// One lease's life: grant, keep alive, campaign, lead or follow. Returns why
/// it ended, or `None` when stopped.
async fn session(shared: &Shared, stop: &mut watch::Receiver<bool>) -> Option<String> {
    let mut client = shared.client.clone();
    let granted_at = Instant::now();
    let grant = match timeout(
        shared.rpc_timeout,
        client.lease_grant(ttl_seconds(shared.ttl), None),
    )
    .await
    {
        Ok(Ok(grant)) => grant,
        Ok(Err(e)) => return Some(format!("lease grant failed: {e}")),
        Err(_) => return Some("lease grant got no answer".into()),
    };
    if !grant.error().is_empty() {
        return Some(format!("lease grant refused: {}", grant.error()));
    }
    let lease = grant.id();
    let ttl = Duration::from_secs(grant.ttl().max(1) as u64);
    let mut clock = KeepAliveClock::new(granted_at, ttl);
    shared.session().lease = Some(lease);

    let outcome = keep_and_campaign(shared, stop, &mut client, lease, &mut clock).await;

    // Before anything else is awaited: whoever acted on our leadership stops now.
    let was_leader = {
        let mut session = shared.session();
        session.lease = None;
        session.leader.take().is_some()
    };
    if was_leader {
        shared.publish(Leadership::Follower { leader: None });
        match &outcome {
            Some(reason) => warn!(%reason, "lost leadership"),
            None => info!("stepped down"),
        }
    }
    // Deletes our election key at once, so the next candidate need not wait
    // out the TTL (it will anyway if etcd is gone).
    let limit = shared.rpc_timeout.min(Duration::from_secs(1));
    if let Err(e) = timeout(limit, client.lease_revoke(lease))
        .await
        .map_err(|_| "no answer".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        debug!(lease, error = %e, "could not revoke the session lease; it will expire");
    }
    outcome
}

type Campaign = Pin<Box<dyn Future<Output = Result<CampaignResponse, etcd_client::Error>> + Send>>;

async fn keep_and_campaign(
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
    client: &mut Client,
    lease: i64,
    clock: &mut KeepAliveClock,
) -> Option<String> {
    let (mut keeper, mut answers) = match open_keep_alive(client, lease, clock).await {
        Ok(pair) => pair,
        Err(reason) => return Some(reason),
    };

    let every = clock.ttl / 3;
    let mut tick = interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut campaign: Option<Campaign> = Some({
        let mut client = client.clone();
        let (name, value) = (shared.election.clone(), shared.advertise.clone());
        Box::pin(async move { client.campaign(name, value, lease).await })
    });
    let mut observer = Observer::new(client.clone(), shared.election.clone());
    let mut leading: Option<ElectionKey> = None;

    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return None,
            _ = sleep_until(clock.deadline()) => {
                return Some("no keep-alive answered within the lease TTL".into());
            }
            answer = answers.message() => {
                let broken = match answer {
                    Ok(Some(answer)) if answer.ttl() > 0 => {
                        clock.acked(Duration::from_secs(answer.ttl() as u64));
                        None
                    }
                    Ok(Some(_)) => return Some("the lease expired (keep-alive answered TTL 0)".into()),
                    Ok(None) => Some("the keep-alive stream closed".to_string()),
                    Err(e) => Some(format!("keep-alive failed: {e}")),
                };
                if let Some(broken) = broken {
                    // The stream's connection broke (the etcd member it ran to died, say);
                    // the lease lives on in etcd: carry on over another member, in time.
                    (keeper, answers) = match reopen_keep_alive(client, lease, clock, &broken).await {
                        Ok(pair) => pair,
                        Err(reason) => return Some(reason),
                    };
                }
            }
            _ = tick.tick() => {
                let at = Instant::now();
                match tokio::time::timeout_at(clock.deadline(), keeper.keep_alive()).await {
                    Ok(Ok(())) => clock.sent(at),
                    Ok(Err(e)) => {
                        let broken = format!("keep-alive failed: {e}");
                        (keeper, answers) = match reopen_keep_alive(client, lease, clock, &broken).await {
                            Ok(pair) => pair,
                            Err(reason) => return Some(reason),
                        };
                    }
                    Err(_) => return Some("no keep-alive answered within the lease TTL".into()),
                }
            }
            won = async { campaign.as_mut().expect("guarded by is_some").await }, if campaign.is_some() => {
                campaign = None;
                let key = match won {
                    Ok(mut won) => won.take_leader(),
                    Err(e) => return Some(format!("campaign failed: {e}")),
                };
                let Some(key) = key.filter(|k| k.lease() == lease && k.rev() > 0) else {
                    return Some("campaign answered without our election key".into());
                };
                let key = ElectionKey {
                    key: String::from_utf8_lossy(key.key()).into_owned(),
                    epoch: key.rev() as u64,
                    lease,
                };
                let epoch = key.epoch;
                shared.session().leader = Some(key.clone());
                shared.publish(Leadership::Leader { epoch });
                info!(epoch, key = %key.key, "elected leader");
                leading = Some(key);
            }
            _ = shared.refused.notified() => {
                let refused = shared.refused_epoch.load(Ordering::SeqCst);
                if leading.as_ref().is_some_and(|me| me.epoch == refused) {
                    return Some("etcd refused a write fenced by our election key".into());
                }
            }
            seen = observer.next() => match &leading {
                // The leader is the candidate with the lowest create revision:
                // a later one leading means ours is gone. An earlier one is a
                // report from before we won.
                Some(me) if seen.key != me.key && seen.create_revision > me.epoch as i64 => {
                    return Some(format!("our election key is gone; {} leads now", seen.value));
                }
                Some(_) => {}
                None if seen.lease != lease => {
                    shared.publish(Leadership::Follower { leader: Some(seen.value) });
                }
                None => {}
            },
        }
    }
}

/// Opens the lease's keep-alive stream (its first keep-alive answered), retrying
/// connection errors (another etcd member may answer) until the local deadline.
async fn open_keep_alive(
    client: &mut Client,
    lease: i64,
    clock: &mut KeepAliveClock,
) -> Result<(LeaseKeeper, LeaseKeepAliveStream), String> {
    loop {
        let opened_at = Instant::now();
        match tokio::time::timeout_at(clock.deadline(), client.lease_keep_alive(lease)).await {
            Ok(Ok(pair)) => {
                clock.reopened(opened_at);
                return Ok(pair);
            }
            Ok(Err(e)) if is_connectivity(&e) => {
                debug!(lease, error = %e, "opening the keep-alive failed; retrying");
                let pause = Instant::now() + Duration::from_millis(100);
                if pause >= clock.deadline() {
                    return Err(format!("keep-alive failed: {e}"));
                }
                sleep_until(pause).await;
            }
            Ok(Err(e)) => return Err(format!("keep-alive failed: {e}")),
            Err(_) => return Err("no keep-alive answered within the lease TTL".into()),
        }
    }
}

async fn reopen_keep_alive(
    client: &mut Client,
    lease: i64,
    clock: &mut KeepAliveClock,
    broken: &str,
) -> Result<(LeaseKeeper, LeaseKeepAliveStream), String> {
    warn!(lease, reason = %broken, "the lease's keep-alive stream broke; reopening it");
    match open_keep_alive(client, lease, clock).await {
        Ok(pair) => {
            info!(lease, "keep-alive stream reopened; the lease lives on");
            Ok(pair)
        }
        Err(reason) => Err(format!("{broken}; reopening it: {reason}")),
    }
}

/// When the lease may have expired at the server, from the keep-alives
/// answered: a lease lives `ttl` past the keep-alive the server last got, and
/// that one was sent no earlier than the request whose answer we hold.
pub(super) struct KeepAliveClock {
    ttl: Duration,
    /// Send times of the keep-alives not answered yet, oldest first (answers
    /// come in order on the stream).
    pending: VecDeque<Instant>,
    expires: Instant,
}

impl KeepAliveClock {
    pub fn new(granted_at: Instant, ttl: Duration) -> KeepAliveClock {
        KeepAliveClock {
            ttl,
            pending: VecDeque::new(),
            expires: granted_at + ttl - Self::margin(ttl),
        }
    }

    /// A tenth of the TTL, so this side gives up strictly before the server
    /// can hand the election to someone else.
    fn margin(ttl: Duration) -> Duration {
        ttl / 10
    }

    pub fn deadline(&self) -> Instant {
        self.expires
    }

    pub fn sent(&mut self, at: Instant) {
        self.pending.push_back(at);
    }

    /// An answer with `remaining` TTL to the oldest keep-alive in flight.
    pub fn acked(&mut self, remaining: Duration) {
        if let Some(at) = self.pending.pop_front() {
            self.renewed(at, remaining);
        }
    }

    /// A new keep-alive stream whose first keep-alive, sent at `opened_at`, was
    /// answered: those in flight on an older stream will never be.
    pub fn reopened(&mut self, opened_at: Instant) {
        self.pending.clear();
        self.renewed(opened_at, self.ttl);
    }

    pub fn renewed(&mut self, sent_at: Instant, remaining: Duration) {
        let remaining = remaining.min(self.ttl);
        let until = sent_at + remaining - Self::margin(self.ttl);
        self.expires = self.expires.max(until);
    }
}

/// A leader as the election's observe stream reports it.
struct Observed {
    key: String,
    value: String,
    create_revision: i64,
    lease: i64,
}

enum ObserveState {
    Idle,
    Opening(Pin<Box<dyn Future<Output = Result<ObserveStream, etcd_client::Error>> + Send>>),
    Streaming(Box<ObserveStream>),
    Waiting(Pin<Box<Sleep>>),
}

/// Follows the election's leader, reopening the stream after errors. `next`
/// is cancel-safe: every in-flight future lives in `state`, so it can sit in a
/// `select!` beside the keep-alive.
struct Observer {
    client: Client,
    name: String,
    state: ObserveState,
}

impl Observer {
    fn new(client: Client, name: String) -> Observer {
        Observer {
            client,
            name,
            state: ObserveState::Idle,
        }
    }

    async fn next(&mut self) -> Observed {
        loop {
            let next = match &mut self.state {
                ObserveState::Idle => {
                    let mut client = self.client.clone();
                    let name = self.name.clone();
                    ObserveState::Opening(Box::pin(async move { client.observe(name).await }))
                }
                ObserveState::Opening(open) => match open.await {
                    Ok(stream) => ObserveState::Streaming(Box::new(stream)),
                    Err(e) => {
                        debug!(error = %e, "observing the election failed; retrying");
                        ObserveState::Waiting(Box::pin(sleep(Duration::from_secs(1))))
                    }
                },
                ObserveState::Streaming(stream) => match stream.message().await {
                    Ok(Some(resp)) => {
                        if let Some(kv) = resp.kv() {
                            return Observed {
                                key: String::from_utf8_lossy(kv.key()).into_owned(),
                                value: String::from_utf8_lossy(kv.value()).into_owned(),
                                create_revision: kv.create_revision(),
                                lease: kv.lease(),
                            };
                        }
                        continue;
                    }
                    Ok(None) => ObserveState::Waiting(Box::pin(sleep(Duration::from_secs(1)))),
                    Err(e) => {
                        debug!(error = %e, "the election's observe stream failed; reopening");
                        ObserveState::Waiting(Box::pin(sleep(Duration::from_secs(1))))
                    }
                },
                ObserveState::Waiting(pause) => {
                    pause.as_mut().await;
                    ObserveState::Idle
                }
            };
            self.state = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_seconds(Duration::from_secs(10)), 10);
        assert_eq!(ttl_seconds(Duration::from_millis(10)), 1);
    }

    #[test]
    fn the_deadline_counts_from_the_send_of_the_answered_keep_alive() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(9);
        let mut clock = KeepAliveClock::new(t0, ttl);
        assert_eq!(clock.deadline(), t0 + Duration::from_millis(8100));

        // Two keep-alives in flight; the answer to the first one moves the
        // deadline from its send time, not from when the answer arrived.
        clock.sent(t0 + Duration::from_secs(3));
        clock.sent(t0 + Duration::from_secs(6));
        clock.acked(ttl);
        assert_eq!(clock.deadline(), t0 + Duration::from_millis(11_100));
        clock.acked(Duration::from_secs(4));
        // A shorter remaining TTL than before never moves the deadline back.
        assert_eq!(clock.deadline(), t0 + Duration::from_millis(11_100));
        // An answer with nothing in flight is ignored.
        clock.acked(ttl);
        assert_eq!(clock.deadline(), t0 + Duration::from_millis(11_100));
    }

    #[test]
    fn a_reopened_stream_forgets_the_keep_alives_of_the_broken_one() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3);
        let mut clock = KeepAliveClock::new(t0, ttl);
        // Sent on a stream that broke: never answered.
        clock.sent(t0 + Duration::from_secs(1));
        clock.reopened(t0 + Duration::from_secs(2));
        assert_eq!(clock.deadline(), t0 + Duration::from_millis(4700));
        // The next answer is for a keep-alive of the new stream, not the lost one.
        clock.sent(t0 + Duration::from_secs(3));
        clock.acked(ttl);
        assert_eq!(clock.deadline(), t0 + Duration::from_millis(5700));
    }

    #[test]
    fn an_unanswered_keep_alive_does_not_extend_the_deadline() {
        let t0 = Instant::now();
        let mut clock = KeepAliveClock::new(t0, Duration::from_secs(3));
        clock.sent(t0 + Duration::from_secs(1));
        clock.sent(t0 + Duration::from_secs(2));
        assert_eq!(clock.deadline(), t0 + Duration::from_millis(2700));
    }
}
