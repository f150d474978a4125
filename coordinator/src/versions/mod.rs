//! The fleet's versions: which target holds which migrations, as the agents' journals say.
//!
//! The leader keeps a copy of every attached shard's journal (`flotilla.journal`): the
//! whole of it after each Welcome, then the rows of the targets whose runs ended, and the
//! whole again every half minute (see the agent's `session::journal`). `fleet status` and
//! `fleet show` answer from this copy and the completed plans in the store, without asking
//! any shard: 10,000 tenants answer in well under a second. The shard stays the source of
//! truth; the copy only ever takes what a shard reported, never what a result implies.
//! Failures are the exception: they are not in the journal, so results and rollback replies
//! feed them; only a rollback cut short is also on the shard (its checkpoint marked undoing),
//! and the agents report those with their journal.
//!
//! Each journal report is followed by the same targets' schema fingerprints (the agent's
//! `session::schema`): `fleet drift` compares them within each cohort (`drift`).
mod baseline;
pub(crate) mod catch_up;
mod drift;
#[cfg(test)]
mod fixtures;
mod query;
mod spec_cache;
mod status;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use flotilla_core::pb;

pub use baseline::BASELINE_PREFIX;
pub use drift::{cohort_labels, fleet_drift};
pub use spec_cache::SpecCache;
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
    /// Steps per target begun and not finished, from their checkpoints: those whose
    /// rollback was cut short (not among `targets`' rows as applied: why such a target is
    /// behind, from the shard itself), and those a run began (`applying`: part-way).
    pub cut_short: HashMap<String, Vec<pb::CutShort>>,
    /// Whether a whole schema report arrived in this session (until then, no fingerprint
    /// of the shard counts).
    pub fingerprinted: bool,
    /// Each target's schema fingerprint ("" = the shard's own schemas).
    pub fingerprints: HashMap<String, String>,
    /// The items of the fingerprints in use, shared by every target of one shape.
    pub shapes: HashMap<String, Arc<Vec<String>>>,
    /// How long the agent's last whole catalog read took, and when it arrived.
    pub fingerprint_read_ms: u64,
    pub fingerprinted_at_ms: i64,
    /// Shapes of a schema report whose last message has not arrived yet.
    incoming: HashMap<String, Arc<Vec<String>>>,
}

/// Every shard's journal, each behind its own `Arc`: a query takes the map as it is
/// (pointers, not 10,000 targets' rows), and a report copies only its shard's journal,
/// and only while a query still holds the old one (`Arc::make_mut`).
pub type Journals = BTreeMap<String, Arc<ShardJournal>>;

/// The last failed step per (shard, tenant).
pub type Failures = HashMap<(String, String), pb::LastFailure>;

#[derive(Debug, Default)]
pub struct FleetVersions {
    state: Mutex<State>,
    /// Drift recomputations for the metric: (one runs, another was asked meanwhile).
    publishing: Mutex<(bool, bool)>,
}

#[derive(Debug, Default)]
struct State {
    shards: Arc<Journals>,
    /// The last failed step per (shard, tenant), until a step there applies.
    failures: Arc<Failures>,
}

impl State {
    /// The shard's journal to change: copied first only if a query still reads it.
    fn journal(&mut self, shard: &str) -> &mut ShardJournal {
        let shards = Arc::make_mut(&mut self.shards);
        Arc::make_mut(shards.entry(shard.to_string()).or_default())
    }
}

/// How a target's last failure begins when a rollback could not undo a step there.
pub(crate) const ROLLBACK_CUT_SHORT: &str = "the rollback";

impl FleetVersions {
    /// A shard retired (`fleet retire`): its journal's copy and last failures go with it.
    pub fn retire(&self, shard: &str) {
        let mut state = self.state.lock().expect("fleet versions lock");
        Arc::make_mut(&mut state.shards).remove(shard);
        Arc::make_mut(&mut state.failures).retain(|(s, _), _| s != shard);
    }

    /// An agent attached under `epoch`: what was known of its journal is stale until it
    /// reports the whole again.
    pub fn attached(&self, shard: &str, epoch: u64) {
        let mut state = self.state.lock().expect("fleet versions lock");
        let journal = state.journal(shard);
        journal.epoch = epoch;
        journal.complete = false;
        journal.fingerprinted = false;
        journal.incoming.clear();
    }

    /// A shard's agent detached from here: its journal and catalog as last reported may
    /// change without this coordinator hearing (another leader's plans, a hand's DDL), so
    /// the shard is "not reported" until its agent is back and reports the whole again.
    /// Before, `fleet status` kept counting its targets up to date, `fleet drift` its
    /// catalog, however long the agent was gone.
    pub fn detached(&self, shard: &str) {
        let mut state = self.state.lock().expect("fleet versions lock");
        let journal = state.journal(shard);
        journal.complete = false;
        journal.fingerprinted = false;
        journal.incoming.clear();
    }

    /// A schema report's message; true when it was the report's last (the fingerprints
    /// changed, and the drift view with them).
    pub fn apply_schema(&self, shard: &str, report: pb::SchemaReport) -> bool {
        let mut state = self.state.lock().expect("fleet versions lock");
        let journal = state.journal(shard);
        for shape in report.shapes {
            journal
                .incoming
                .insert(shape.fingerprint, Arc::new(shape.items));
        }
        if !report.last {
            return false;
        }
        if report.whole {
            journal.fingerprints.clear();
            journal.fingerprinted = true;
            journal.fingerprint_read_ms = report.read_ms;
            journal.fingerprinted_at_ms = crate::store::now_ms();
        }
        for target in &report.targets {
            journal.fingerprints.remove(target);
        }
        for f in report.fingerprints {
            journal.fingerprints.insert(f.target, f.fingerprint);
        }
        let incoming = std::mem::take(&mut journal.incoming);
        journal.shapes.extend(incoming);
        let used: HashSet<&String> = journal.fingerprints.values().collect();
        journal.shapes.retain(|f, _| used.contains(f));
        true
    }

    pub fn apply(&self, shard: &str, report: pb::JournalReport) {
        let mut state = self.state.lock().expect("fleet versions lock");
        let journal = state.journal(shard);
        if report.reset {
            journal.targets.clear();
            journal.cut_short.clear();
            journal.complete = true;
        }
        for target in &report.targets {
            journal.targets.remove(target);
            journal.cut_short.remove(target);
        }
        for step in report.cut_short {
            journal
                .cut_short
                .entry(step.target.clone())
                .or_default()
                .push(step);
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

    /// Failed steps become the target's last failure; an applied one clears it, and goes
    /// into the shard's journal copy at once: the agent's report of it follows by up to a
    /// second (its report gap), and `plan submit --wait && fleet status` said the targets
    /// the plan had just applied were behind. The agent's report of the target replaces
    /// these rows.
    /// `epoch`: the term the agent attached under (a run's id carries the term that sent
    /// it in its high 32 bits).
    pub fn record_results(&self, shard: &str, results: &pb::RunResults, epoch: u64) {
        let mut state = self.state.lock().expect("fleet versions lock");
        let now = crate::store::now_ms();
        let journal = state.journal(shard);
        for run in &results.runs {
            for step in &run.steps {
                if pb::StepOutcome::try_from(step.outcome) != Ok(pb::StepOutcome::Applied) {
                    continue;
                }
                let rows = journal.targets.entry(run.tenant.clone()).or_default();
                if rows.iter().any(|e| e.migration_id == step.migration_id) {
                    continue;
                }
                let seq = rows.last().map_or(0, |e| e.seq + 1);
                // Its fingerprint is older than this row now: it would pass for drift (or
                // hide it) until the agent reads the shape again, as its own report of
                // the row says too.
                journal.fingerprints.remove(&run.tenant);
                let rows = journal.targets.entry(run.tenant.clone()).or_default();
                rows.push(pb::JournalEntry {
                    target: run.tenant.clone(),
                    migration_id: step.migration_id.clone(),
                    checksum: step.checksum.clone(),
                    plan_id: results.plan_id.clone(),
                    applied_at_ms: now,
                    duration_ms: step.duration_ms,
                    seq,
                });
            }
        }
        let failures = Arc::make_mut(&mut state.failures);
        for run in &results.runs {
            let key = (shard.to_string(), run.tenant.clone());
            for step in &run.steps {
                match pb::StepOutcome::try_from(step.outcome) {
                    // A run of an older term fenced by the shard (FL002) is no failure
                    // of the target: the newer term's run of the step goes on (the
                    // engine drops the old run's result too). After a restart of the
                    // coordinator, `fleet status` listed a batched change's targets as
                    // "failed last" while the plan ran on to complete. (A run of this
                    // term fenced, its shard ahead of this leader, is a failure.)
                    Ok(pb::StepOutcome::Failed)
                        if run.run_id >> 32 < epoch
                            && step.error.as_ref().is_some_and(|e| {
                                e.sqlstate == flotilla_core::protocol::sqlstate::FENCED
                            }) => {}
                    Ok(pb::StepOutcome::Failed) => {
                        let error = step.error.clone().unwrap_or_default();
                        failures.insert(
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
                    // A step applied clears the target's last failure when it is that
                    // step (a retry) or a step of another plan (the target moved on). A
                    // step of the failed plan applied after the failure does not: under
                    // `policy = continue` a target's other migrations go on after one
                    // failed there, and that cleared it (the target part-way, listed by
                    // no `fleet status`).
                    Ok(pb::StepOutcome::Applied)
                        if failures.get(&key).is_some_and(|f| {
                            f.plan_id != results.plan_id || f.migration_id == step.migration_id
                        }) =>
                    {
                        failures.remove(&key);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Targets' last failures as the control store holds them (at start): each taken where
    /// nothing is known of the target yet (what the agents report since is newer).
    pub fn restore_failures(&self, found: Vec<((String, String), pb::LastFailure)>) {
        let mut state = self.state.lock().expect("fleet versions lock");
        let failures = Arc::make_mut(&mut state.failures);
        for (key, failure) in found {
            failures.entry(key).or_insert(failure);
        }
    }

    /// A catch-up plan refused for good (not for a passing reason) is each of its tenants'
    /// last failure: why they are behind, where an operator looks. A step applied there
    /// later clears it, as any failure.
    pub fn record_catch_up_refused(
        &self,
        shard: &str,
        tenants: &[String],
        migration_id: String,
        message: String,
    ) {
        let mut state = self.state.lock().expect("fleet versions lock");
        let now = crate::store::now_ms();
        let failures = Arc::make_mut(&mut state.failures);
        for tenant in tenants {
            failures.insert(
                (shard.to_string(), tenant.clone()),
                pb::LastFailure {
                    target: target_name(shard, tenant),
                    migration_id: migration_id.clone(),
                    plan_id: String::new(),
                    sqlstate: String::new(),
                    message: message.clone(),
                    at_ms: now,
                },
            );
        }
    }

    /// Of `tenants` of `shard`, those whose last failure is their catch-up plan's refusal,
    /// that failure cleared: something they lacked was done since (a `fleet baseline`), and
    /// their catch-up is asked again.
    pub fn take_catch_up_refused(&self, shard: &str, tenants: &[String]) -> Vec<String> {
        let mut state = self.state.lock().expect("fleet versions lock");
        let failures = Arc::make_mut(&mut state.failures);
        tenants
            .iter()
            .filter(|t| {
                let key = (shard.to_string(), t.to_string());
                let refused = failures.get(&key).is_some_and(|f| {
                    f.plan_id.is_empty() && f.message.starts_with(catch_up::CATCH_UP_REFUSED)
                });
                if refused {
                    failures.remove(&key);
                }
                refused
            })
            .cloned()
            .collect()
    }

    /// A step a rollback could not undo becomes its target's last failure: the target is
    /// left part-way back (its journal row, if any, still says applied; an agent takes a
    /// non-transactional step's as not applied until a rollback finishes), and the fleet
    /// view is where an operator looks for why. A rollback that then undoes that step there
    /// clears it.
    ///
    /// What it undid leaves the shard's journal copy at once, as an applied step enters it
    /// ([`Self::record_results`]): the agent's report follows by up to a second or more, and
    /// meanwhile `plan rollback` of the plan before it was refused for "later plans" naming
    /// the plan just rolled back, and `fleet status` showed its head.
    pub fn record_rollback(&self, shard: &str, reply: &pb::RollbackReply) {
        let mut state = self.state.lock().expect("fleet versions lock");
        let now = crate::store::now_ms();
        let journal = state.journal(shard);
        let undone: HashSet<(&str, &str)> = reply
            .steps
            .iter()
            .filter(|s| s.error.is_none())
            .map(|s| (s.tenant.as_str(), s.migration_id.as_str()))
            .collect();
        let mut touched = Vec::new();
        for (tenant, rows) in journal.targets.iter_mut() {
            let before = rows.len();
            // every applied step of the plan here undone: each of its rows goes
            rows.retain(|r| {
                r.plan_id != reply.plan_id
                    || !(reply.complete
                        || undone.contains(&(tenant.as_str(), r.migration_id.as_str())))
            });
            if rows.len() != before {
                touched.push(tenant.clone());
            }
        }
        for tenant in touched {
            // its shape is the one from before the undo: drift until the agent reads it again
            journal.fingerprints.remove(&tenant);
        }
        let failures = Arc::make_mut(&mut state.failures);
        for step in &reply.steps {
            let key = (shard.to_string(), step.tenant.clone());
            let Some(error) = &step.error else {
                if failures.get(&key).is_some_and(|f| {
                    f.migration_id == step.migration_id && f.message.starts_with(ROLLBACK_CUT_SHORT)
                }) {
                    failures.remove(&key);
                }
                continue;
            };
            // a tenant gone from its shard was passed over, nothing of the plan there to
            // undo: no failure of the rollback (the plan counts its steps undone)
            if error.phase == crate::plan::GONE {
                continue;
            }
            failures.insert(
                key,
                pb::LastFailure {
                    target: target_name(shard, &step.tenant),
                    migration_id: step.migration_id.clone(),
                    plan_id: reply.plan_id.clone(),
                    sqlstate: error.sqlstate.clone(),
                    message: format!(
                        "{ROLLBACK_CUT_SHORT} of plan {} could not undo it, and stopped on this \
                         target: {}",
                        reply.plan_id, error.message
                    ),
                    at_ms: now,
                },
            );
        }
    }

    /// Whether the caller should recompute the drift metric now: false while a
    /// recomputation runs (it is asked to run once more instead; see `publish_done`).
    pub fn publish_start(&self) -> bool {
        let mut p = self.publishing.lock().expect("drift publish lock");
        if p.0 {
            p.1 = true;
            return false;
        }
        p.0 = true;
        true
    }

    /// A recomputation ended: true when another was asked meanwhile (run it).
    pub fn publish_done(&self) -> bool {
        let mut p = self.publishing.lock().expect("drift publish lock");
        if p.1 {
            p.1 = false;
            return true;
        }
        p.0 = false;
        false
    }

    /// What is known now, for one computation outside the lock: shared, not copied (a
    /// report meanwhile copies what it changes).
    pub fn snapshot(&self) -> (Arc<Journals>, Arc<Failures>) {
        let state = self.state.lock().expect("fleet versions lock");
        (state.shards.clone(), state.failures.clone())
    }
}
