//! Plans' commit decisions, as their keys in etcd hold them.
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use tracing::warn;

use super::{Decision, TwoPhaseError};
use crate::config::AgentConfig;
use crate::etcd::{Etcd, Usage, call};

/// How long one etcd call (connecting, reading a decision) may take.
const ETCD_CALL_LIMIT: Duration = Duration::from_secs(3);

/// `<prefix>/decisions/<unit>`: the protocol's key layout.
pub(crate) fn decision_key(prefix: &str, unit: &str) -> String {
    flotilla_core::protocol::keys::decision(prefix, unit)
}

/// Reads plans' decisions from etcd, on one client kept between reads.
pub(crate) struct Decisions {
    etcd: Etcd,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl Decisions {
    /// None when no etcd is configured.
    pub fn from_config(config: &AgentConfig) -> Option<Decisions> {
        Some(Decisions {
            etcd: Etcd::from_config(config)?,
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// The plan's decision; None when there is none yet (or its value is neither `commit`
    /// nor `abort`). Err when etcd cannot be read.
    ///
    /// A decision is written once (the coordinator's transaction creates the key only where
    /// none is) and never deleted, so one found by a serializable read (the member's own
    /// store, no round of the consensus) is the decision, however far that member lags;
    /// only "none yet" needs the linearizable read. Every agent of a unit reads its
    /// decision the moment it hears it, each prepared target holding its locks meanwhile.
    pub async fn read(&self, plan_id: &str) -> Result<Option<Decision>, TwoPhaseError> {
        match self.read_any(plan_id, true).await? {
            Some(d) => Ok(Some(d)),
            None => self.read_any(plan_id, false).await,
        }
    }

    /// One try per member, each first in turn: a dead member must not stand between a
    /// prepared transaction and its decision.
    async fn read_any(
        &self,
        plan_id: &str,
        serializable: bool,
    ) -> Result<Option<Decision>, TwoPhaseError> {
        let mut last = None;
        for first in 0..self.etcd.members().max(1) {
            match self.read_via(plan_id, first, serializable).await {
                Ok(d) => return Ok(d),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one try"))
    }

    async fn read_via(
        &self,
        plan_id: &str,
        first: usize,
        serializable: bool,
    ) -> Result<Option<Decision>, TwoPhaseError> {
        let key = decision_key(&self.etcd.prefix, plan_id);
        let mut client = self.client.lock().await;
        let c = match client.as_mut() {
            Some(c) => c,
            None => {
                let usage = Usage::Reads(ETCD_CALL_LIMIT);
                match self.etcd.connect(first, usage, ETCD_CALL_LIMIT).await {
                    Ok(c) => client.insert(c),
                    Err(source) => {
                        return Err(TwoPhaseError::EtcdUnreachable {
                            endpoints: self.etcd.shown.clone(),
                            source,
                        });
                    }
                }
            }
        };
        let options = serializable.then(|| GetOptions::new().with_serializable());
        let found = match call(ETCD_CALL_LIMIT, c.get(key.as_str(), options)).await {
            Ok(found) => found,
            Err(source) => {
                // a fresh client next time, starting at the next member
                *client = None;
                return Err(TwoPhaseError::EtcdRead {
                    key,
                    endpoints: self.etcd.shown.clone(),
                    source,
                });
            }
        };
        let Some(kv) = found.kvs().first() else {
            return Ok(None);
        };
        match String::from_utf8_lossy(kv.value()).parse::<Decision>() {
            Ok(d) => Ok(Some(d)),
            Err(e) => {
                warn!(%key, "{e}; taking it as no decision");
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_keys_follow_the_coordinators_layout() {
        assert_eq!(decision_key("/flotilla", "p1"), "/flotilla/decisions/p1");
        assert_eq!(decision_key("/f/", "p1"), "/f/decisions/p1");
        assert_eq!(Decision::Commit.sql(), "COMMIT PREPARED");
        assert_eq!(Decision::Abort.as_str(), "abort");
    }
}
