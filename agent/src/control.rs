//! What a running data change reads and writes between batches: its plan's pause and halt
//! signals, the shard server's shared row budget, and the progress board the session sends
//! to the coordinator with every heartbeat.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_proto::pb;
use tokio::sync::watch;

use crate::data::TokenBucket;

/// A plan's control state on this shard, published to its running data changes.
#[derive(Debug, Clone, Default)]
pub(crate) struct PlanControl {
    /// Why the plan (or this shard of it) is paused, if it is.
    pub paused: Option<String>,
    /// Bumped by every halt (cancel, a failure elsewhere, an abort): a running data change
    /// stops at its next batch boundary.
    pub halts: u64,
}

/// What a data change needs from the agent besides its connection.
pub(crate) struct DataHooks {
    pub plan_id: String,
    pub shard: String,
    pub control: watch::Receiver<PlanControl>,
    pub board: Arc<ProgressBoard>,
    pub buckets: Arc<ServerBuckets>,
}

/// (plan, migration, target)
type ProgressKey = (String, String, String);

/// One server's row budget for a step, shared by its targets' runs.
pub(crate) type SharedBucket = Arc<Mutex<TokenBucket>>;

/// The latest progress of each data change of the agent, keyed by (plan, migration, target).
/// The session sends what changed with each heartbeat; finished entries go once sent.
#[derive(Default)]
pub(crate) struct ProgressBoard {
    entries: Mutex<BTreeMap<ProgressKey, (pb::DataProgress, bool)>>,
}

impl ProgressBoard {
    pub fn update(&self, p: pb::DataProgress) {
        let key = (p.plan_id.clone(), p.migration_id.clone(), p.tenant.clone());
        self.entries
            .lock()
            .expect("progress lock")
            .insert(key, (p, true));
    }

    /// Entries changed since the last call; entries of changes that ended are dropped once
    /// they have been handed out.
    pub fn take_changed(&self) -> Vec<pb::DataProgress> {
        let mut entries = self.entries.lock().expect("progress lock");
        let mut out = Vec::new();
        entries.retain(|_, (p, changed)| {
            let finished = matches!(p.state.as_str(), "done" | "stopped" | "failed");
            if *changed {
                out.push(p.clone());
                *changed = false;
            }
            // a change that ended is forgotten once its last state went out
            !finished
        });
        out
    }

    /// After a new stream: everything still running is sent again.
    /// Entries that [`Self::take_changed`] handed out but could not be sent: changed again,
    /// unless a newer state of theirs came in meanwhile.
    pub fn put_back(&self, unsent: Vec<pb::DataProgress>) {
        let mut entries = self.entries.lock().expect("progress lock");
        for p in unsent {
            let key = (p.plan_id.clone(), p.migration_id.clone(), p.tenant.clone());
            entries.entry(key).or_insert((p, true));
        }
    }

    pub fn mark_all_changed(&self) {
        for (_, changed) in self.entries.lock().expect("progress lock").values_mut() {
            *changed = true;
        }
    }
}

/// One token bucket per data step for all its targets on this shard's server: the
/// `server_rows_per_second` budget. A fresh bucket starts empty, so a restarted agent does
/// not burst past the budget.
#[derive(Default)]
pub(crate) struct ServerBuckets {
    buckets: Mutex<HashMap<(String, String), SharedBucket>>,
}

impl ServerBuckets {
    pub fn bucket(&self, plan: &str, migration: &str, rate: u64, capacity: u64) -> SharedBucket {
        self.buckets
            .lock()
            .expect("buckets lock")
            .entry((plan.to_string(), migration.to_string()))
            .or_insert_with(|| {
                Arc::new(Mutex::new(TokenBucket::new(
                    rate,
                    capacity,
                    Duration::ZERO,
                    Instant::now(),
                )))
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(migration: &str, state: &str, rows: u64) -> pb::DataProgress {
        pb::DataProgress {
            plan_id: "p".into(),
            migration_id: migration.into(),
            tenant: "t".into(),
            rows_done: rows,
            state: state.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_board_sends_changes_once_and_forgets_finished_changes() {
        let board = ProgressBoard::default();
        board.update(progress("a", "running", 10));
        board.update(progress("b", "running", 5));
        assert_eq!(board.take_changed().len(), 2);
        assert!(board.take_changed().is_empty(), "nothing changed");
        board.update(progress("a", "done", 20));
        let sent = board.take_changed();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].rows_done, 20);
        // `a` is gone after it was sent as done; `b` still runs and is resent after a reconnect
        board.mark_all_changed();
        let again = board.take_changed();
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(again[0].migration_id, "b");
    }
}
