//! The agent's stream to the coordinator: Hello, heartbeats, dispatch of what arrives,
//! batched results, and reconnecting when the stream is lost: to the next coordinator of the
//! list, or to the leader a follower named, with a backoff once a whole round failed.
//!
//! - `stream`: one stream, from Hello to its end.
//! - `dispatch`: what arrives, handed to the part of the agent that owns it.
//! - `outbox`: results kept across streams until sent.
//! - `journal`: the shard's journal, reported for the coordinator's fleet view.
//! - `schema`: the targets' schema fingerprints, reported with it (for `fleet drift`).
//! - `explain`: the dry run's reads (relations' existence, sizes, row estimates).
//! - `coordinators`: which coordinator to dial next.
//! - `client_tls`: the TLS it dials with, read again at each SIGHUP.
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{ClientTlsConfig, Endpoint};
use tracing::{error, info, instrument, warn};

use crate::config::{backoff_delay, redact_dsn, redact_list};
use crate::error::AgentError;
use crate::{Agent, metrics};

mod baseline;
mod client_tls;
mod coordinators;
mod dispatch;
mod explain;
mod journal;
mod outbox;
mod schema;
mod stream;

pub(crate) use client_tls::ClientTls;
pub(crate) use coordinators::Rotation;
pub(crate) use journal::JournalDirty;
pub(crate) use outbox::Outbox;
use stream::{Ended, session};

/// A coordinator address as a tonic endpoint; an address that does not parse is a
/// configuration error (checked for the whole list at start).
pub(crate) fn endpoint(
    shard: &str,
    address: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, AgentError> {
    let bad = |reason: String| AgentError::Coordinator {
        shard: shard.to_string(),
        // shown in the error: never a password written into the address
        address: flotilla_core::secrets::redact_url(address),
        reason,
    };
    let endpoint = Endpoint::from_shared(address.to_string())
        .map(|e| e.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true))
        .map_err(|e| bad(format!("not a valid address: {e}")))?;
    // tonic speaks TLS to https:// addresses only, so the configuration can go on all
    match tls {
        Some(tls) => endpoint
            .tls_config(tls.clone())
            .map_err(|e| bad(format!("TLS: {e}"))),
        None if flotilla_core::tls::is_https(address) => Err(bad(
            "an https:// address needs --tls-ca (and --tls-cert and --tls-key for mTLS)".into(),
        )),
        None => Ok(endpoint),
    }
}

/// Keeps a stream to a coordinator (the leader) open until shutdown.
#[instrument(skip_all, fields(shard = %agent.config.shard))]
pub(crate) async fn run(agent: Arc<Agent>, mut outbox: Outbox, rotation: Rotation) {
    reconnect(&agent, &mut outbox, rotation).await;
    outbox.abandon();
}

/// Dials coordinators in turn and holds a stream to the one that takes the agent; returns
/// only at shutdown.
async fn reconnect(agent: &Arc<Agent>, outbox: &mut Outbox, mut rotation: Rotation) {
    let mut attempt = 0u32;
    // why each coordinator of the round did not take the stream (said with the round)
    let mut refusals: Vec<String> = Vec::new();
    loop {
        let address = rotation.next_address();
        let shown = redact_dsn(&address);
        let ended = match endpoint(
            &agent.config.shard,
            &address,
            agent.client_tls.current().as_ref(),
        ) {
            Ok(endpoint) => session(agent, outbox, &endpoint, &shown).await,
            // only a leader named by a refusal can be invalid: the list was checked at start
            Err(e) => Ended::Lost {
                welcomed: false,
                reason: e.to_string(),
            },
        };
        let (welcomed, follow) = match ended {
            Ended::Shutdown => return,
            Ended::Lost { welcomed, reason } => {
                // A stream that was up and ended is news; a dial that did not take (the dead
                // leader a follower still names until its lease runs out: dozens a minute)
                // is said once per round, below.
                if welcomed {
                    warn!(coordinator = %shown, %reason, "coordinator stream lost");
                } else {
                    tracing::debug!(coordinator = %shown, %reason, "coordinator did not take the stream");
                    if refusals.len() < 8 {
                        refusals.push(format!("{shown}: {reason}"));
                    }
                }
                (welcomed, false)
            }
            Ended::NotLeader { welcomed, leader } => {
                let follow = match rotation.refused(&address, leader.clone()) {
                    Ok(follow) => follow,
                    Err(downgrade) => {
                        // a configuration to mend (the leader's --advertise, its key in
                        // etcd), said at each refusal: the agent keeps to its list meanwhile
                        error!(coordinator = %shown, leader = %downgrade.leader, "{downgrade}");
                        if refusals.len() < 8 {
                            refusals.push(format!("{shown}: {downgrade}"));
                        }
                        false
                    }
                };
                let leader = leader.as_deref().map_or("unknown".into(), redact_dsn);
                info!(coordinator = %shown, %leader, follow, "the coordinator is not the leader");
                (welcomed, follow)
            }
        };
        metrics::coordinator_connected(false);
        if welcomed {
            attempt = 0;
            refusals.clear();
            rotation.new_round();
        }
        if follow || (!welcomed && !rotation.round_failed()) {
            // the named leader, or the next coordinator of the round, right away
            continue;
        }
        // a full round failed (or a welcomed stream ended): pause before the next round
        let delay = backoff_delay(
            attempt,
            agent.config.reconnect_min,
            agent.config.reconnect_max,
            rand::random(),
        );
        if !welcomed {
            refusals.dedup();
            // (none refused it: each was a follower naming no leader, or went away)
            let why = if refusals.is_empty() {
                String::new()
            } else {
                format!(" ({})", refusals.join("; "))
            };
            warn!(coordinators = %redact_list(&agent.config.coordinator), attempt, ?delay, "no coordinator took the agent{why}; retrying");
            refusals.clear();
            attempt = attempt.saturating_add(1);
        }
        rotation.new_round();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = agent.cancel.cancelled() => return,
        }
    }
}
