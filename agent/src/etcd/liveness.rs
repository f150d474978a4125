//! The agent's liveness key in etcd: `<prefix>/agents/<shard>` under a lease of the agent's
//! own, kept alive every third of its TTL by one task. Coordinators watch these keys to tell
//! a dead agent from a slow one. Liveness is advice, not exclusion: the shard's agent lock
//! and fence decide who may change the shard.
//!
//! etcd being away never stops the agent: it keeps serving its coordinator stream while this
//! task retries in the background, and re-grants a lease (re-putting the key) whenever the
//! old one is lost, expired or revoked.
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use super::{Etcd, EtcdError, Refusal, Usage, call};
use crate::config::{AgentConfig, backoff_delay};
use crate::metrics;

/// `<prefix>/agents/<shard>`: the protocol's key layout.
pub(crate) fn agent_key(prefix: &str, shard: &str) -> String {
    flotilla_core::protocol::keys::agent(prefix, shard)
}

/// The value of the key: who holds it (never a secret).
pub(crate) fn agent_value() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into());
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "host": host,
    })
    .to_string()
}

struct Liveness {
    etcd: Etcd,
    key: String,
    value: String,
    ttl: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
}

/// Starts the liveness task when etcd endpoints are configured. It runs until `stop`,
/// then revokes its lease (the key goes with it).
pub(crate) fn spawn(config: &AgentConfig, stop: CancellationToken) -> Option<JoinHandle<()>> {
    let liveness = Liveness {
        etcd: Etcd::from_config(config)?,
        key: agent_key(&config.etcd_prefix, &config.shard),
        value: agent_value(),
        ttl: Duration::from_secs(config.lease_ttl.as_secs_f64().ceil().max(1.0) as u64),
        reconnect_min: config.reconnect_min,
        reconnect_max: config.reconnect_max,
    };
    let span = tracing::info_span!("liveness", shard = %config.shard);
    Some(tokio::spawn(liveness.run(stop).instrument(span)))
}

/// How the etcd client says a lease it was asked to keep alive has expired (its
/// `LeaseKeepAliveError` when the first answer's TTL is 0).
const LEASE_NOT_FOUND: &str = "lease not found";

impl Liveness {
    /// How long one etcd call may take before it counts as failed.
    fn call_timeout(&self) -> Duration {
        (self.ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(5))
    }

    async fn run(self, stop: CancellationToken) {
        let mut client = None;
        let mut lease = None;
        // the member a new client starts at: the next one after each loss, so that a member
        // that died or hung under the keep-alive stream is not the one asked again
        let mut first = 0usize;
        let mut ever_up = false;
        let mut attempt = 0u32;
        let mut last_refusal: Option<Refusal> = None;
        loop {
            let held = tokio::select! {
                r = self.hold(&mut client, &mut lease, first) => Some(r),
                () = stop.cancelled() => None,
            };
            metrics::etcd_liveness_up(false);
            let Some(((reason, refusal), was_up)) = held else {
                break;
            };
            client = None;
            first = first.wrapping_add(1);
            if was_up {
                attempt = 0;
            }
            let delay = backoff_delay(
                attempt,
                self.reconnect_min,
                self.reconnect_max,
                rand::random(),
            );
            if let Some(refusal) = refusal {
                // (said at the first and every twelfth: an operator mends it, not a retry;
                // the first after attempts that met no refusal too)
                if attempt.is_multiple_of(12) || last_refusal != Some(refusal) {
                    self.refused(refusal, &reason, attempt);
                } else {
                    debug!(endpoints = %self.etcd.shown, %reason, attempt, ?delay, "etcd retry");
                }
            } else if was_up {
                // (a lease is the cluster's, not a member's: `hold` keeps it through the next
                // member when it lives, and says so when it does not)
                info!(endpoints = %self.etcd.shown, key = %self.key, %reason, "the agent's liveness keep-alive broke; keeping its lease through the next etcd member");
            } else if attempt == 0 && !ever_up {
                error!(endpoints = %self.etcd.shown, %reason, "etcd is unreachable at {}: the agent's liveness key is not published; retrying in the background (the agent still serves its coordinator)", self.etcd.shown);
            } else if attempt.is_multiple_of(12) {
                warn!(endpoints = %self.etcd.shown, %reason, attempt, "etcd is still unreachable; retrying");
            } else {
                debug!(endpoints = %self.etcd.shown, %reason, attempt, ?delay, "etcd retry");
            }
            ever_up |= was_up;
            last_refusal = refusal;
            attempt = attempt.saturating_add(1);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => break,
            }
        }
        // the last lease granted, unless it is known to be gone (through a new client when
        // the last broke)
        let client = match (client, lease) {
            (Some(c), _) => Some(c),
            (None, Some(_)) => self
                .etcd
                .connect(first, Usage::Lease, self.call_timeout())
                .await
                .ok(),
            (None, None) => None,
        };
        if let (Some(mut c), Some(id)) = (client, lease) {
            match tokio::time::timeout(self.call_timeout(), c.lease_revoke(id)).await {
                Ok(Ok(_)) => info!(key = %self.key, "revoked the liveness lease"),
                Ok(Err(e)) => {
                    warn!(key = %self.key, error = %e, "could not revoke the liveness lease; it expires with its TTL")
                }
                Err(_) => {
                    warn!(key = %self.key, "revoking the liveness lease timed out; it expires with its TTL")
                }
            }
        }
    }

    /// Says that etcd refused the agent's user, naming the endpoints and the user.
    fn refused(&self, refusal: Refusal, reason: &str, attempt: u32) {
        let user = self
            .etcd
            .user()
            .unwrap_or("(none: --etcd-user is not given)");
        match refusal {
            Refusal::Authentication => error!(
                endpoints = %self.etcd.shown,
                user,
                attempt,
                %reason,
                "etcd at {} refused the agent's user {user}: authentication failed (no such user, or the wrong password: --etcd-user, --etcd-password-file); the agent's liveness key is not published; retrying in the background",
                self.etcd.shown
            ),
            Refusal::Permission => error!(
                endpoints = %self.etcd.shown,
                user,
                attempt,
                %reason,
                "etcd at {} refused the agent's user {user} the key {}: permission denied (grant the user's role readwrite on the --etcd-prefix); the agent's liveness key is not published; retrying in the background",
                self.etcd.shown,
                self.key
            ),
        }
    }

    /// Grants a lease, puts the key under it and keeps it alive. Returns why it stopped (and
    /// whether etcd refused the agent's user), and whether the key was up before.
    /// `first`: the member a new client starts at.
    async fn hold(
        &self,
        client: &mut Option<Client>,
        lease: &mut Option<i64>,
        first: usize,
    ) -> ((String, Option<Refusal>), bool) {
        let down = |what: String, e: EtcdError| ((format!("{what}: {e}"), e.refusal()), false);
        let limit = self.call_timeout();
        let c = match client {
            Some(c) => c,
            None => match self.etcd.connect(first, Usage::Lease, limit).await {
                Ok(c) => client.insert(c),
                Err(reason) => return down("connecting".into(), reason),
            },
        };
        let ttl = self.ttl.as_secs() as i64;
        // The lease held before, if it lives: its key is still there, and the coordinator
        // sees no change (a new lease for every keep-alive stream one member broke put the
        // key again, and said the lease was lost, at each single member's stall).
        let kept = match *lease {
            Some(id) => match call(limit, c.lease_keep_alive(id)).await {
                Ok((mut keeper, mut responses)) => {
                    if let Err(e) = keeper.keep_alive().await {
                        return down("keeping the lease alive".into(), e.into());
                    }
                    match call(limit, responses.message()).await {
                        Ok(Some(r)) if r.ttl() > 0 => {
                            info!(key = %self.key, lease = %format!("{id:x}"), "the liveness lease kept through another etcd member");
                            Some((id, keeper, responses))
                        }
                        Ok(_) => {
                            warn!(key = %self.key, lease = %format!("{id:x}"), "the agent's liveness lease is lost (expired); granting a new one and putting the key again");
                            *lease = None;
                            None
                        }
                        // not known to be gone: tried again through the next member
                        Err(reason) => return down("keeping the lease alive".into(), reason),
                    }
                }
                // Expired while etcd was out of reach (frozen, partitioned past the TTL): the
                // client says so as it opens the keep-alive. It was asked again for good,
                // the key missing and the shard counted away, long after etcd was back.
                Err(EtcdError::Client(etcd_client::Error::LeaseKeepAliveError(why)))
                    if why.contains(LEASE_NOT_FOUND) =>
                {
                    warn!(key = %self.key, lease = %format!("{id:x}"), "the agent's liveness lease expired while etcd was out of reach; granting a new one and putting the key again");
                    *lease = None;
                    None
                }
                Err(reason) => return down("keeping the lease alive".into(), reason),
            },
            None => None,
        };
        let (id, mut keeper, mut responses) = match kept {
            Some(kept) => kept,
            None => {
                let id = match call(limit, c.lease_grant(ttl, None)).await {
                    Ok(granted) => granted.id(),
                    Err(reason) => return down("granting a lease".into(), reason),
                };
                let put = c.put(
                    self.key.as_str(),
                    self.value.as_str(),
                    Some(PutOptions::new().with_lease(id)),
                );
                if let Err(reason) = call(limit, put).await {
                    // (not kept: a lease whose key was not put is kept alive for nothing,
                    // the key missing for as long; it expires)
                    return down(format!("putting {}", self.key), reason);
                }
                // the key is under it: the one to keep, and to revoke at the end
                *lease = Some(id);
                let (keeper, responses) = match call(limit, c.lease_keep_alive(id)).await {
                    Ok(pair) => pair,
                    Err(reason) => return down("keeping the lease alive".into(), reason),
                };
                info!(key = %self.key, lease = %format!("{id:x}"), ttl, "liveness key put in etcd");
                (id, keeper, responses)
            }
        };
        metrics::etcd_liveness_up(true);
        let up = |reason: String| ((reason, None), true);
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = keeper.keep_alive().await {
                return up(format!("keep-alive: {e}"));
            }
            match call(limit, responses.message()).await {
                Ok(Some(r)) if r.ttl() > 0 => {}
                Ok(Some(_)) => {
                    // nothing left to revoke
                    *lease = None;
                    return up(format!("lease {id:x} is gone (expired or revoked)"));
                }
                Ok(None) => return up("the keep-alive stream ended".into()),
                Err(reason) => return up(format!("keep-alive: {reason}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_coordinators_layout() {
        assert_eq!(
            agent_key("/flotilla", "shard_0"),
            "/flotilla/agents/shard_0"
        );
        assert_eq!(agent_key("/flotilla/", "s1"), "/flotilla/agents/s1");
        let v: serde_json::Value = serde_json::from_str(&agent_value()).unwrap();
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["pid"], std::process::id());
        assert!(v["host"].as_str().is_some_and(|h| !h.is_empty()));
    }
}
