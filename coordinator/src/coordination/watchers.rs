//! Background tasks beside the leadership loop: keeping plan leases alive
//! while this coordinator leads, and following the agents' liveness keys.
//!
//! Plan leases have their own task so that a slow answer for one of them
//! never delays the leadership loop noticing its own lease is gone.
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, WatchOptions};
use tokio::sync::watch;
use tokio::time::{MissedTickBehavior, interval, sleep, timeout};
use tracing::{debug, warn};

use super::keys;
use super::shared::Shared;

/// Keeps every plan lease in `shared.plan_leases` alive every TTL/3, while
/// this coordinator leads (a deposed one lets them go: the new leader adopts
/// them). A lease found expired is forgotten: its locks are gone.
pub(super) async fn keep_plan_leases(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let every = shared.ttl / 3;
    let mut tick = interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let leadership = shared.leadership.subscribe();
    let mut keepers: HashMap<i64, (LeaseKeeper, LeaseKeepAliveStream)> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if !leadership.borrow().is_leader() {
            keepers.clear();
            continue;
        }
        let leases: Vec<(String, i64)> = shared
            .plan_leases()
            .iter()
            .map(|(plan, lease)| (plan.clone(), *lease))
            .collect();
        keepers.retain(|id, _| leases.iter().any(|(_, lease)| lease == id));
        for (plan, lease) in leases {
            match timeout(every, keep_once(&shared, &mut keepers, lease)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    keepers.remove(&lease);
                    shared.forget_plan_lease(&plan, lease);
                    warn!(
                        plan,
                        lease, "plan lease expired: the plan's shard locks are gone"
                    );
                }
                Ok(Err(e)) => {
                    keepers.remove(&lease);
                    debug!(plan, lease, error = %e, "plan lease keep-alive failed; retrying");
                }
                Err(_) => {
                    keepers.remove(&lease);
                    debug!(plan, lease, "plan lease keep-alive got no answer; retrying");
                }
            }
        }
    }
}

/// One keep-alive round trip: `Ok(false)` when the lease no longer exists.
async fn keep_once(
    shared: &Shared,
    keepers: &mut HashMap<i64, (LeaseKeeper, LeaseKeepAliveStream)>,
    lease: i64,
) -> Result<bool, etcd_client::Error> {
    if let Some((keeper, answers)) = keepers.get_mut(&lease) {
        keeper.keep_alive().await?;
        return match answers.message().await? {
            Some(answer) => Ok(answer.ttl() > 0),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "keep-alive stream closed".into(),
            )),
        };
    }
    // Opening the stream sends the first keep-alive and waits for its answer.
    match shared.client.clone().lease_keep_alive(lease).await {
        Ok(pair) => {
            keepers.insert(lease, pair);
            Ok(true)
        }
        Err(etcd_client::Error::LeaseKeepAliveError(msg)) if msg.contains("not found") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Publishes the set of shards with a liveness key under `<prefix>/agents/`:
/// a listing, then a watch from just after it; starts over after any error.
/// While etcd is unreachable the last set known stays published.
pub(super) async fn follow_agents(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let prefix = keys::agents_prefix(&shared.prefix);
    loop {
        let reason = tokio::select! {
            _ = stop.changed() => return,
            reason = follow_agents_once(&shared, &prefix) => reason,
        };
        debug!(%reason, "agent liveness watch ended; starting over");
        tokio::select! {
            _ = stop.changed() => return,
            _ = sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Follows the agents' keys until something fails; returns why.
async fn follow_agents_once(shared: &Shared, prefix: &str) -> String {
    let mut client = shared.client.clone();
    let listing = timeout(
        shared.rpc_timeout,
        client.get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ),
    )
    .await;
    let listing = match listing {
        Ok(Ok(listing)) => listing,
        Ok(Err(e)) => return format!("listing agents failed: {e}"),
        Err(_) => return "listing agents got no answer".into(),
    };
    let revision = listing.header().map(|h| h.revision()).unwrap_or_default();
    let mut live: BTreeSet<String> = listing
        .kvs()
        .iter()
        .filter_map(|kv| Some(keys::strip(kv.key_str().ok()?, prefix)?.to_string()))
        .collect();
    publish(shared, &live);

    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = match timeout(shared.rpc_timeout, client.watch(prefix, Some(options))).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return format!("watching agents failed: {e}"),
        Err(_) => return "watching agents got no answer".into(),
    };
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return "the watch stream closed".into(),
            Err(e) => return format!("the watch stream failed: {e}"),
        };
        if resp.canceled() {
            return format!("the watch was cancelled: {}", resp.cancel_reason());
        }
        for event in resp.events() {
            let Some(shard) = event
                .kv()
                .and_then(|kv| kv.key_str().ok())
                .and_then(|key| keys::strip(key, prefix))
            else {
                continue;
            };
            match event.event_type() {
                EventType::Put => live.insert(shard.to_string()),
                EventType::Delete => live.remove(shard),
            };
        }
        publish(shared, &live);
    }
}

fn publish(shared: &Shared, live: &BTreeSet<String>) {
    shared.live.send_if_modified(|current| {
        if current == live {
            false
        } else {
            current.clone_from(live);
            true
        }
    });
}
