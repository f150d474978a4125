//! Coordination between coordinators, and with agents: who leads (and under
//! which epoch), which plan holds which shard, the commit/abort decision of
//! each two-phase-commit group, and which agents are alive.
//!
//! Two backends sit behind one trait:
//! - [`EtcdCoordination`] (`--etcd`): leader election under a lease, plan locks
//!   under plan leases, decisions written in transactions fenced by the
//!   leader's election key (DESIGN invariants 3 and 6).
//! - [`EmbeddedCoordination`]: one coordinator, in process, always the leader;
//!   the default without etcd.
//!
//! Leadership is only a hint to stop early: the fence in each shard
//! (invariant 2) is what keeps a deposed coordinator from changing anything.
pub mod embedded;
pub mod error;
pub mod etcd;
mod leadership;
mod lock_queue;
mod members;
mod plan_locks;
mod shared;
mod watchers;

use std::collections::{BTreeSet, HashSet};

use tokio::sync::watch;

pub use lock_queue::{LockQueue, QueuedPlan};

pub use embedded::EmbeddedCoordination;
pub use error::CoordinationError;
pub use etcd::{ElectionKey, EtcdCoordination};
pub use flotilla_core::protocol::{Decision, keys};

/// This coordinator's part in the election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// Not leading; `leader` is the leader's advertised gRPC address, if one is known.
    Follower { leader: Option<String> },
    /// Leading under `epoch` (the create revision of its election key): every
    /// assignment and decision carries it.
    Leader { epoch: u64 },
}

impl Leadership {
    /// The epoch, if leading.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Leadership::Leader { epoch } => Some(*epoch),
            Leadership::Follower { .. } => None,
        }
    }

    pub fn is_leader(&self) -> bool {
        matches!(self, Leadership::Leader { .. })
    }
}

/// The answer to [`Coordination::lock_shards`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockOutcome {
    /// Every shard is now locked by the plan (none was held by another plan).
    Taken,
    /// `shard` is held by `plan_id`; the caller's plan took no lock at all.
    Held { shard: String, plan_id: String },
}

impl LockOutcome {
    /// `Held` as [`CoordinationError::LockHeld`].
    pub fn into_result(self) -> Result<(), CoordinationError> {
        match self {
            LockOutcome::Taken => Ok(()),
            LockOutcome::Held { shard, plan_id } => {
                Err(CoordinationError::LockHeld { shard, plan_id })
            }
        }
    }
}

/// One shard's lock: the plan holding it, and the lease it lives under.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ShardLock {
    pub shard: String,
    pub plan_id: String,
    pub lease: i64,
}

/// The coordination backend a coordinator runs with (etcd, or embedded).
///
/// Every method that decides something takes the caller's `epoch` and fails
/// with [`CoordinationError::NotLeader`] unless it is the current leader's.
#[tonic::async_trait]
pub trait Coordination: Send + Sync + 'static {
    /// Leadership as it changes. Losing leadership (keep-alive failed, TTL 0,
    /// stream closed, a missed local deadline) publishes `Follower` at once.
    fn leadership(&self) -> watch::Receiver<Leadership>;

    /// Where the epochs come from: they are ordered within one space only (the embedded
    /// backend's counter in the control store; one etcd cluster's revisions under one
    /// prefix). The control store's fence names it: a leader of another space (the backend
    /// changed, etcd rebuilt) takes the store over whatever its epoch.
    fn epoch_space(&self) -> String;

    /// Locks every shard for `plan_id` in one step, or none: `Taken` when each
    /// shard was free (or already held by this plan), else `Held` naming the
    /// first shard (in the order given) held by another plan.
    async fn lock_shards(
        &self,
        plan_id: &str,
        shards: &[String],
        epoch: u64,
    ) -> Result<LockOutcome, CoordinationError>;

    /// Releases every lock `plan_id` holds (nothing held is fine).
    async fn release_shards(&self, plan_id: &str, epoch: u64) -> Result<(), CoordinationError>;

    /// Releases `plan_id`'s lock on `shard` alone (not held by it: nothing done). A plan
    /// rolling back lets go of each shard whose undo its agent confirmed while it waits for
    /// the others (a shard whose agent is lost held every shard of the plan locked).
    async fn release_shard(
        &self,
        plan_id: &str,
        shard: &str,
        epoch: u64,
    ) -> Result<(), CoordinationError>;

    /// Every shard lock, ordered by shard.
    async fn locks(&self) -> Result<Vec<ShardLock>, CoordinationError>;

    /// Deletes one shard's lock whoever holds it; `false` if it was not locked.
    /// An operator override: the caller audits it.
    async fn break_lock(&self, shard: &str) -> Result<bool, CoordinationError>;

    /// The lease `plan_id`'s locks live under, if it has one.
    async fn plan_lease(&self, plan_id: &str) -> Result<Option<i64>, CoordinationError>;

    /// Keeps `lease_id` alive as `plan_id`'s lease from now on (a new leader
    /// taking over a running plan). `false` if that lease has expired.
    /// [`Coordination::lock_shards`] adopts a plan's stored lease by itself.
    async fn adopt_plan_lease(
        &self,
        plan_id: &str,
        lease_id: i64,
    ) -> Result<bool, CoordinationError>;

    /// Writes the decision for a 2PC group unless one exists, and returns the
    /// decision that stands. Fenced by leadership: a deposed leader gets
    /// `NotLeader` and writes nothing.
    async fn decide(
        &self,
        group: &str,
        decision: Decision,
        epoch: u64,
    ) -> Result<Decision, CoordinationError>;

    /// The decision of a group, if one was written.
    async fn decision(&self, group: &str) -> Result<Option<Decision>, CoordinationError>;

    /// Shards whose agents hold a live liveness key, as it changes.
    fn live_agents(&self) -> watch::Receiver<BTreeSet<String>>;

    /// Gives leadership up for good, at once, so another coordinator can lead
    /// without waiting out a lease (this one is stopping): campaigns and lease
    /// keep-alives stop and `Follower` is published. A no-op for a backend with one
    /// coordinator.
    async fn resign(&self) {}

    /// `"embedded"` or `"etcd"` (for logs and status).
    fn kind(&self) -> &'static str;
}

/// Rejects names that cannot be part of a key.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), CoordinationError> {
    if name.is_empty() {
        return Err(CoordinationError::InvalidArgument(format!(
            "{what} name is empty"
        )));
    }
    Ok(())
}

/// The shards in the order given, each once; rejects empty names.
pub(crate) fn distinct_shards(shards: &[String]) -> Result<Vec<&str>, CoordinationError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(shards.len());
    for shard in shards {
        check_name("shard", shard)?;
        if seen.insert(shard.as_str()) {
            out.push(shard.as_str());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_round_trip() {
        for d in [Decision::Commit, Decision::Abort] {
            assert_eq!(d.as_str().parse::<Decision>().unwrap(), d);
        }
        assert!("maybe".parse::<Decision>().is_err());
    }

    #[test]
    fn shards_are_deduplicated_in_order() {
        let shards = vec!["b".to_string(), "a".to_string(), "b".to_string()];
        assert_eq!(distinct_shards(&shards).unwrap(), vec!["b", "a"]);
        assert!(distinct_shards(&["".to_string()]).is_err());
    }
}
