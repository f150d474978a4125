//! The operator's questions about the fleet's versions, answered by the leader from its
//! copy of the journals (see the module's docs) and the store's completed plans.
use std::collections::{BTreeMap, HashMap, HashSet};

use flotilla_core::pb;
use flotilla_core::selector::Selector;
use tracing::{debug, warn};

use super::{FleetInput, PlanInput, cohort_labels, fleet_drift, fleet_status, show_target};
use crate::error::CoordinatorError;
use crate::planner::ShardView;
use crate::service::Coordinator;

/// The least time between two recomputations of the drift metric. Each reads the whole
/// fleet (about 35 ms of CPU at 10,000 targets), and during a rollout every shard's reports
/// ask again within the second: at 1 s the metric took a fifth of the coordinator's CPU over
/// a 10,000-tenant rollout (perf). 5 s still refreshes it between two scrapes (15 s in
/// deploy/prometheus); the first report after a quiet spell computes at once.
const DRIFT_GAP: std::time::Duration = std::time::Duration::from_secs(5);

/// The leader's epoch, the fleet as the planner sees it, the completed plans, and the
/// targets whose schema changed under their journal.
type VersionsInputs = (
    u64,
    BTreeMap<String, ShardView>,
    Vec<PlanInput>,
    BTreeMap<String, String>,
);

/// Targets whose schema is not the one their journal rows were written in (dropped and
/// made again, restored on its own) are set apart from the cohorts: their journals may not
/// hold (a schema made again empty under an old name was counted up to date).
fn set_apart_changed(status: &mut pb::FleetStatusResponse, changed: &BTreeMap<String, String>) {
    if changed.is_empty() {
        return;
    }
    let mut apart = Vec::new();
    for cohort in &mut status.cohorts {
        let before = cohort.targets.len();
        cohort.targets.retain(|t| {
            let out = changed.contains_key(t);
            if out {
                apart.push(t.clone());
            }
            !out
        });
        if !cohort.pending.is_empty() {
            status.behind -= (before - cohort.targets.len()) as u64;
        }
    }
    status.cohorts.retain(|c| !c.targets.is_empty());
    status.targets = status.cohorts.iter().map(|c| c.targets.len() as u64).sum();
    apart.sort();
    // those holding another tenant's schema (renamed), named as such
    status.renamed = apart
        .iter()
        .filter_map(|t| {
            let from = changed.get(t).filter(|f| !f.is_empty())?;
            Some((t.clone(), from.clone()))
        })
        .collect();
    status.schema_changed = apart;
}

impl Coordinator {
    pub async fn fleet_status(
        &self,
        selector: &str,
        files: &HashMap<String, String>,
    ) -> Result<pb::FleetStatusResponse, CoordinatorError> {
        let selector = Selector::parse(selector)
            .map_err(|e| CoordinatorError::InvalidRequest(format!("--selector: {e}")))?;
        let (epoch, fleet, plans, changed) = self.versions_inputs().await?;
        let (journals, failures) = self.inner.versions.snapshot();
        let mut status = fleet_status(
            &FleetInput {
                fleet: &fleet,
                journals: &journals,
                epoch,
                failures: &failures,
                plans: &plans,
                files,
            },
            &selector,
        );
        set_apart_changed(&mut status, &changed);
        status.unknown_plans = self.unknown_plans(&journals).await?;
        Ok(status)
    }

    pub async fn fleet_show(&self, target: &str) -> Result<pb::FleetTarget, CoordinatorError> {
        let (epoch, fleet, plans, changed) = self.versions_inputs().await?;
        let (journals, failures) = self.inner.versions.snapshot();
        let input = FleetInput {
            fleet: &fleet,
            journals: &journals,
            epoch,
            failures: &failures,
            plans: &plans,
            files: &HashMap::new(),
        };
        // The name as given first: a tenant's name may begin or end with a space (trimmed,
        // `shard/trail ` was "no tenant `trail`"); trimmed only when that finds nothing (a
        // name pasted with a space around it).
        let mut shown = show_target(&input, target)
            .or_else(|error| match target.trim() {
                trimmed if trimmed != target => show_target(&input, trimmed).map_err(|_| error),
                _ => Err(error),
            })
            .map_err(CoordinatorError::TargetNotFound)?;
        let everything = Selector::parse("").expect("the empty selector parses");
        let drift = fleet_drift(
            &FleetInput {
                plans: &[],
                ..input
            },
            &everything,
        );
        let name = super::target_name(&shown.shard, &shown.tenant);
        if let Some(from) = changed.get(&name) {
            // its journal may not hold: nothing is known to be pending there either
            shown.schema_changed = true;
            shown.renamed_from = from.clone();
            shown.pending.clear();
        }
        shown.fingerprint = input
            .reported(&shown.shard)
            .filter(|j| j.fingerprinted)
            .and_then(|j| j.fingerprints.get(&shown.tenant))
            .cloned()
            .unwrap_or_default();
        for cohort in drift.cohorts {
            if let Some(d) = cohort.drifted.into_iter().find(|d| d.target == name) {
                shown.drift = Some(d);
                shown.drift_majority = cohort.majority;
                break;
            }
        }
        Ok(shown)
    }

    /// `fleet drift`: cohorts need no plans (only what the journals applied), so this reads
    /// the fleet's labels and the leader's copy, nothing else.
    pub async fn fleet_drift(
        &self,
        selector: &str,
    ) -> Result<pb::FleetDriftResponse, CoordinatorError> {
        let selector = Selector::parse(selector)
            .map_err(|e| CoordinatorError::InvalidRequest(format!("--selector: {e}")))?;
        let (epoch, fleet, _) = self.versions_fleet().await?;
        let (journals, failures) = self.inner.versions.snapshot();
        Ok(fleet_drift(
            &FleetInput {
                fleet: &fleet,
                journals: &journals,
                epoch,
                failures: &failures,
                plans: &[],
                files: &HashMap::new(),
            },
            &selector,
        ))
    }

    /// Recomputes the drift of the whole fleet for `flotilla_drifted_targets` after a
    /// schema report, in a task of its own: one at a time, and reports that arrive
    /// meanwhile (a plan's runs end by the thousand) make one more, not one each.
    pub fn publish_drift(&self) {
        if !self.inner.versions.publish_start() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match me.fleet_drift("").await {
                    Ok(r) => crate::metrics::drifted_targets(&cohort_labels(&r)),
                    // a follower has nothing to say
                    Err(e) => debug!(error = %e, "drift not computed"),
                }
                if !me.inner.versions.publish_done() {
                    break;
                }
                // Asked again meanwhile: during a rollout every shard's reports ask all the
                // time, and each answer reads the whole fleet; the gauge follows within
                // the gap (what was asked during it is in the next computation).
                tokio::time::sleep(DRIFT_GAP).await;
            }
        });
    }

    /// The targets ("shard/tenant", or "shard") whose schema is not their cohort's majority.
    pub(crate) async fn drifted_targets(&self) -> Result<HashSet<String>, CoordinatorError> {
        let r = self.fleet_drift("").await?;
        Ok(r.cohorts
            .into_iter()
            .flat_map(|c| c.drifted.into_iter().map(|d| d.target))
            .collect())
    }

    /// The leader's epoch, every shard's labels and tenants, and the completed plans.
    async fn versions_inputs(&self) -> Result<VersionsInputs, CoordinatorError> {
        let (epoch, fleet, changed) = self.versions_fleet().await?;
        let mut plans = Vec::new();
        let rows = self.inner.store.completed_plans().await?;
        let specs = self.inner.spec_cache.specs(&rows);
        for (row, spec) in rows.into_iter().zip(specs) {
            match spec {
                Some(spec) => {
                    let envs = &self.inner.environments;
                    let shards = (!envs.is_empty()).then(|| {
                        fleet
                            .iter()
                            .filter(|(_, v)| envs.admits(&spec.environment, &v.labels))
                            .map(|(s, _)| s.clone())
                            .collect()
                    });
                    plans.push(PlanInput {
                        id: row.id,
                        spec,
                        shards,
                    })
                }
                // A plan a newer rule refuses still counts for what it applied; but its
                // migrations cannot be expanded: say so rather than guess.
                None => {
                    warn!(plan = %row.id, "a completed plan's spec does not decode; not counted in fleet status")
                }
            }
        }
        Ok((epoch, fleet, plans, changed))
    }

    /// The leader's epoch and every shard's labels and tenants.
    /// Plans the reported journals record and the control store does not know (`fleet
    /// baseline`s are not plans): a store made anew after it was lost, or restored from a
    /// backup older than the shards, counts nothing of them pending, and a tenant new since
    /// is caught up on the plans it knows only (up to date, by its count).
    async fn unknown_plans(
        &self,
        journals: &super::Journals,
    ) -> Result<Vec<String>, CoordinatorError> {
        let recorded: std::collections::BTreeSet<&str> = journals
            .values()
            .flat_map(|j| j.targets.values().flatten())
            .map(|e| e.plan_id.as_str())
            .filter(|p| !p.is_empty() && !p.starts_with(super::BASELINE_PREFIX))
            .collect();
        if recorded.is_empty() {
            return Ok(Vec::new());
        }
        let known = self.inner.store.plan_ids().await?;
        Ok(recorded
            .into_iter()
            .filter(|p| !known.contains(*p))
            .map(str::to_string)
            .collect())
    }

    async fn versions_fleet(
        &self,
    ) -> Result<(u64, BTreeMap<String, ShardView>, BTreeMap<String, String>), CoordinatorError>
    {
        // Agents report their journals to the leader only.
        let epoch = self.leader_epoch()?;
        let (listed, store_down) = self.fleet_and_store().await?;
        // Without the store, the agents away are not known: their shards would vanish from
        // the answer rather than show as not reported.
        if let Some(why) = store_down {
            return Err(crate::store::StoreError::Unreachable(format!(
                "{why}; without it the shards whose agents are away are not known"
            ))
            .into());
        }
        let agents = listed.agents;
        // Tenants whose schema is not the one their journal rows were written in (their
        // agents say so at each discovery).
        let changed = agents
            .iter()
            .flat_map(|a| {
                a.tenants.iter().filter(|t| t.schema_changed).map(|t| {
                    (
                        super::target_name(&a.shard, &t.name),
                        t.renamed_from.clone(),
                    )
                })
            })
            .collect();
        let fleet = agents
            .into_iter()
            .map(|a| {
                let view = ShardView {
                    labels: a.labels.into_iter().collect(),
                    tenants: a
                        .tenants
                        .into_iter()
                        .map(|t| (t.name, t.labels.into_iter().collect()))
                        .collect(),
                };
                (a.shard, view)
            })
            .collect();
        Ok((epoch, fleet, changed))
    }
}
