//! Which etcd members the coordinator's client sends its requests to.
//!
//! etcd-client balances requests over every endpoint it was given, and a member that is
//! down (connection refused) or hung (stopped, a stalled host) keeps getting its share:
//! each such request fails, or waits out its timeout. Seen with one member of three
//! killed: the shard locks of a finished plan failed to release for half a minute (the
//! next plan waited for them), and an atomic plan's decision write was retried, every
//! prepared target holding its locks the while. Each member is probed here on a client of
//! its own; one that does not answer twice in a row is taken out of the shared client's
//! endpoints, and put back once it answers again. The last one left is never taken out:
//! with every member away, requests fail as before, naming them all.
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use tokio::sync::watch;
use tracing::{info, warn};

use super::shared::Shared;

/// How often each member is asked.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Probes unanswered in a row before a member is taken out.
const FAILS_TO_REMOVE: u32 = 2;

struct Member {
    /// As given (`--etcd`): what the shared client was built from.
    endpoint: String,
    /// Its own client for the probe (none until it connects).
    probe: Option<Client>,
    /// Whether the shared client sends requests to it now.
    in_use: bool,
    fails: u32,
}

/// Probes every member until `stop`, taking those that do not answer out of the shared
/// client's endpoints and putting them back when they answer. Nothing to do for one
/// member.
pub(super) async fn watch(
    shared: Arc<Shared>,
    endpoints: Vec<String>,
    options: ConnectOptions,
    tls: bool,
    mut stop: watch::Receiver<bool>,
) {
    if endpoints.len() < 2 {
        return;
    }
    let mut members: Vec<Member> = endpoints
        .into_iter()
        .map(|endpoint| Member {
            endpoint,
            probe: None,
            in_use: true,
            fails: 0,
        })
        .collect();
    // a probe takes at most this: a hung member must not hold up the others' probes
    let limit = shared.rpc_timeout.min(PROBE_EVERY);
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        let answers = futures::future::join_all(
            members
                .iter_mut()
                .map(|m| probe(m, &options, &shared.election, limit)),
        )
        .await;
        for (i, answer) in answers.into_iter().enumerate() {
            let in_use = members.iter().filter(|m| m.in_use).count();
            let m = &mut members[i];
            match answer {
                Ok(()) => {
                    m.fails = 0;
                    if !m.in_use && shared.client.add_endpoint(&m.endpoint).await.is_ok() {
                        m.in_use = true;
                        info!(member = %redacted(&m.endpoint), "etcd member answers again: requests go to it again");
                    }
                }
                Err(reason) => {
                    m.fails += 1;
                    // a fresh client next time (a member restarted, a connection gone bad)
                    m.probe = None;
                    if m.in_use
                        && m.fails >= FAILS_TO_REMOVE
                        && in_use > 1
                        && shared
                            .client
                            .remove_endpoint(uri_of(&m.endpoint, tls))
                            .await
                            .is_ok()
                    {
                        m.in_use = false;
                        warn!(member = %redacted(&m.endpoint), %reason, "etcd member does not answer: requests go to the other members until it does");
                    }
                }
            }
        }
    }
}

/// Asks one member, on its own client, what `connect` asks (the election's key count): a
/// linearizable read, which a member cut off from its cluster's quorum cannot answer either.
async fn probe(
    m: &mut Member,
    options: &ConnectOptions,
    election: &str,
    limit: Duration,
) -> Result<(), String> {
    let ask = async {
        if m.probe.is_none() {
            let c = Client::connect([m.endpoint.as_str()], Some(options.clone()))
                .await
                .map_err(|e| e.to_string())?;
            m.probe = Some(c);
        }
        let c = m.probe.as_mut().expect("connected");
        c.get(
            election,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(limit, ask).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// The endpoint as the shared client keyed it: etcd-client puts `http://` (or `https://`
/// with TLS) before an endpoint given without a scheme.
fn uri_of(endpoint: &str, tls: bool) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_string()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

fn redacted(endpoint: &str) -> String {
    flotilla_core::secrets::redact_url(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_without_a_scheme_is_keyed_as_the_client_keys_it() {
        assert_eq!(uri_of("127.0.0.1:2379", false), "http://127.0.0.1:2379");
        assert_eq!(uri_of("127.0.0.1:2379", true), "https://127.0.0.1:2379");
        assert_eq!(uri_of("https://etcd-1:2379", false), "https://etcd-1:2379");
    }
}
