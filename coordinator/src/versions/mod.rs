//! The fleet's versions: which target holds which migrations, as the agents' journals say.
//!
//! The leader keeps a copy of every attached shard's journal (`flotilla.journal`): the
//! whole of it after each Welcome, then the rows of the targets whose runs ended, and the
//! whole again every half minute (see the agent's `session::journal`). `fleet status` and
//! `fleet show` answer from this copy and the completed plans in the store, without asking
//! any shard: 10,000 tenants answer in well under a second. The shard stays the source of
//! truth; the copy only ever takes what a shard reported, never what a result implies.
//! Failures are the exception: they are not in the journal, so results feed them.
mod catch_up;
mod query;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use flotilla_core::pb;

pub use status::{FleetInput, PlanInput, fleet_status, show_target};

/// "shard/tenant", or "shard" for the shard itself: how targets are named to operators.
pub fn target_name(shard: &str, tenant: &str) -> String {
    if tenant.is_empty() {
        shard.to_string()
    } else {
        format!("{shard}/{tenant}")
    }
}

/// One shard's journal as last reported, under the epoch of the session that reported it.
#[derive(Debug, Clone, Default)]
pub struct ShardJournal {
    pub epoch: u64,
    /// Whether a whole journal arrived in this session (until then the copy is partial).
    pub complete: bool,
    /// Rows per target ("" = the shard), in the order applied.
    pub targets: HashMap<String, Vec<pb::JournalEntry>>,
}

#[derive(Debug, Default)]
pub struct FleetVersions {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    shards: BTreeMap<String, ShardJournal>,
    /// The last failed step per (shard, tenant), until a step there applies.
    failures: HashMap<(String, String), pb::LastFailure>,
}

impl FleetVersions {
    /// An agent attached under `epoch`: what was known of its journal is stale until it
    /// reports the whole again.
    pub fn attached(&self, shard: &str, epoch: u64) {
        let mut state = self.state.lock().expect("fleet versions lock");
        let journal = state.shards.entry(shard.to_string()).or_default();
        journal.epoch = epoch;
        journal.complete = false;
    }

    pub fn apply(&self, shard: &str, report: pb::JournalReport) {
        let mut state = self.state.lock().expect("fleet versions lock");
        let journal = state.shards.entry(shard.to_string()).or_default();
        if report.reset {
            journal.targets.clear();
            journal.complete = true;
        }
        for target in &report.targets {
            journal.targets.remove(target);
        }
        let mut touched = std::collections::HashSet::new();
        for entry in report.entries {
            touched.insert(entry.target.clone());
            journal
                .targets
                .entry(entry.target.clone())
                .or_default()
                .push(entry);
        }
        // Chunks of one report arrive in order, but a target's rows may span two.
        for target in touched {
            if let Some(rows) = journal.targets.get_mut(&target) {
                rows.sort_by_key(|e| e.seq);
            }
        }
    }

    /// Failed steps become the target's last failure; an applied one clears it.
    pub fn record_results(&self, shard: &str, results: &pb::RunResults) {
        let mut state = self.state.lock().expect("fleet versions lock");
        let now = crate::store::now_ms();
        for run in &results.runs {
            let key = (shard.to_string(), run.tenant.clone());
            for step in &run.steps {
                match pb::StepOutcome::try_from(step.outcome) {
                    Ok(pb::StepOutcome::Failed) => {
                        let error = step.error.clone().unwrap_or_default();
                        state.failures.insert(
                            key.clone(),
                            pb::LastFailure {
                                target: target_name(shard, &run.tenant),
                                migration_id: step.migration_id.clone(),
                                plan_id: results.plan_id.clone(),
                                sqlstate: error.sqlstate,
                                message: error.message,
                                at_ms: now,
                            },
                        );
                    }
                    Ok(pb::StepOutcome::Applied) => {
                        state.failures.remove(&key);
                    }
                    _ => {}
                }
            }
        }
    }

    /// A copy of what is known, for one computation outside the lock.
    pub fn snapshot(
        &self,
    ) -> (
        BTreeMap<String, ShardJournal>,
        HashMap<(String, String), pb::LastFailure>,
    ) {
        let state = self.state.lock().expect("fleet versions lock");
        (state.shards.clone(), state.failures.clone())
    }
}
