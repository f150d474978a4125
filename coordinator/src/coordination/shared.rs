//! What the etcd backend's handle and its background tasks (leadership, plan lease
//! keep-alive, agent liveness) share: the client, the session, the published leadership.
//! It sits below all of them, so they depend on it and not on each other.
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::{Notify, watch};

use super::error::ErrorContext;
use super::{CoordinationError, Leadership};

/// The election key this coordinator won: `epoch` is its create revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionKey {
    pub key: String,
    pub epoch: u64,
    /// The session lease the key lives under.
    pub lease: i64,
}

/// State shared by the public handle and its background tasks.
pub(super) struct Shared {
    pub client: Client,
    pub errors: ErrorContext,
    /// Where this backend's epochs come from ([`super::Coordination::epoch_space`]).
    pub epoch_space: String,
    pub prefix: String,
    /// The election's name, `<prefix>/leader`.
    pub election: String,
    pub advertise: String,
    /// The lease TTL asked for (etcd may grant more).
    pub ttl: Duration,
    /// How long a single request may take before etcd counts as unavailable.
    pub rpc_timeout: Duration,
    pub leadership: watch::Sender<Leadership>,
    pub live: watch::Sender<BTreeSet<String>>,
    pub session: Mutex<Session>,
    /// plan id -> its lease, kept alive while this coordinator leads.
    pub plan_leases: Mutex<HashMap<String, i64>>,
    /// The epoch under which etcd last refused a fenced write, and a wake-up
    /// for the leadership loop: our election key is gone even if neither the
    /// lease nor the observe stream said so (e.g. deleted by hand).
    pub refused_epoch: AtomicU64,
    pub refused: Notify,
}

#[derive(Default)]
pub(super) struct Session {
    pub lease: Option<i64>,
    pub leader: Option<ElectionKey>,
}

impl Shared {
    pub fn session(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn plan_leases(&self) -> MutexGuard<'_, HashMap<String, i64>> {
        self.plan_leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops keeping `lease` alive for `plan_id` (unless the plan moved on to
    /// another lease meanwhile).
    pub fn forget_plan_lease(&self, plan_id: &str, lease: i64) {
        let mut plans = self.plan_leases();
        if plans.get(plan_id) == Some(&lease) {
            plans.remove(plan_id);
        }
    }

    /// Publishes a change of leadership (and only a change).
    pub fn publish(&self, next: Leadership) {
        self.leadership.send_if_modified(|current| {
            if *current == next {
                false
            } else {
                *current = next;
                true
            }
        });
    }

    /// etcd refused a write fenced with `epoch`: if we still lead under it,
    /// tell the leadership loop to step down.
    pub(super) fn fence_refused(&self, epoch: u64) {
        if self
            .session()
            .leader
            .as_ref()
            .is_some_and(|k| k.epoch == epoch)
        {
            self.refused_epoch.store(epoch, Ordering::SeqCst);
            self.refused.notify_one();
        }
    }

    /// The election key to fence a write with, if this coordinator leads under
    /// `epoch` as far as it knows (etcd has the last word in the transaction).
    pub(super) fn leader_key(&self, epoch: u64) -> Result<String, CoordinationError> {
        if self.leadership.borrow().epoch() != Some(epoch) {
            return Err(CoordinationError::NotLeader);
        }
        match &self.session().leader {
            Some(key) if key.epoch == epoch => Ok(key.key.clone()),
            _ => Err(CoordinationError::NotLeader),
        }
    }
}
