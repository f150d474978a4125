//! Tenants that appear after plans ran: the agent finds them (`--discover-interval`), and
//! when a completed plan asked for it (`catch_up = true`, or its environment is in the
//! coordinator's `--catch-up-environments`), the leader runs for them, in order, every
//! migration of those plans that their labels select: one ordinary plan
//! (`catch-up-<target>`), with the same checks, journal, policy and audit as any other.
//! Rolled-back plans do not count (only completed ones are read). A tenant that vanished
//! simply leaves the agent's list: its journal rows (its history) stay on the shard.
use std::collections::{BTreeMap, BTreeSet};

use flotilla_core::dag::MigrationGraph;
use flotilla_core::{PlanSpec, Scope, pb};
use prost::Message;
use tracing::{info, warn};

use crate::error::CoordinatorError;
use crate::planner::{self, ShardView};
use crate::service::Coordinator;

impl Coordinator {
    /// The shard's tenants as its agent now reports them, after `before` (None: this
    /// coordinator never heard of the shard, so nothing counts as new). New tenants are
    /// caught up when a completed plan asks for it.
    pub(crate) fn tenants_seen(
        &self,
        shard: &str,
        before: Option<Vec<String>>,
        now: &[pb::Tenant],
    ) {
        let Some(before) = before else { return };
        let before: BTreeSet<String> = before.into_iter().collect();
        let appeared: Vec<pb::Tenant> = now
            .iter()
            .filter(|t| !before.contains(&t.name))
            .cloned()
            .collect();
        // As a set: a shard of 2,500 tenants made 6 million comparisons here per preflight.
        let now_names: BTreeSet<&str> = now.iter().map(|t| t.name.as_str()).collect();
        let vanished = before
            .iter()
            .filter(|name| !now_names.contains(name.as_str()))
            .count();
        if vanished > 0 {
            info!(%shard, vanished, "tenants gone from the shard; their journal rows stay");
        }
        if appeared.is_empty() {
            return;
        }
        info!(%shard, appeared = appeared.len(), "new tenants on the shard");
        let me = self.clone();
        let shard = shard.to_string();
        tokio::spawn(async move {
            match me.catch_up_plan(&shard, &appeared).await {
                Ok(None) => {}
                Ok(Some(raw)) => {
                    let name = raw.name.clone();
                    match me
                        .submit_as(raw, crate::admission::Promotion::CatchUp)
                        .await
                    {
                        Ok(r) => info!(plan = %r.plan_id, %name, "catching up new tenants"),
                        Err(e) => warn!(%shard, %name, "the catch-up plan was not accepted: {e}"),
                    }
                }
                Err(e) => warn!(%shard, "cannot work out a catch-up plan: {e}"),
            }
        });
    }

    /// Every migration of the completed plans that ask for catch-up and that select one
    /// of `tenants`, in the order the plans ran (and each plan's own order), as one plan;
    /// None when there is nothing to do.
    async fn catch_up_plan(
        &self,
        shard: &str,
        tenants: &[pb::Tenant],
    ) -> Result<Option<pb::PlanSpec>, CoordinatorError> {
        let envs = &self.inner.defaults.catch_up_environments;
        let labels = self
            .inner
            .fleet
            .snapshot()
            .get(shard)
            .map(|a| a.labels.clone())
            .unwrap_or_default();
        let fleet = BTreeMap::from([(
            shard.to_string(),
            ShardView {
                labels: labels.clone(),
                tenants: tenants
                    .iter()
                    .map(|t| (t.name.clone(), t.labels.clone().into_iter().collect()))
                    .collect(),
            },
        )]);
        let mut chosen: Vec<pb::Migration> = Vec::new();
        let mut environment = String::new();
        for row in self.inner.store.completed_plans().await? {
            let Some(raw) = hex::decode(&row.spec_hex)
                .ok()
                .and_then(|b| pb::PlanSpec::decode(b.as_slice()).ok())
            else {
                continue;
            };
            let Ok(spec) = PlanSpec::try_from(raw.clone()) else {
                continue;
            };
            let asked = spec.catch_up
                || envs
                    .iter()
                    .any(|e| e == "*" || e.eq_ignore_ascii_case(&spec.environment));
            // A plan for another environment never reached this shard's tenants.
            if !asked || !self.inner.environments.admits(&spec.environment, &labels) {
                continue;
            }
            for m in selected_migrations(&spec, &fleet) {
                let mut migration = raw.migrations[m].clone();
                // The catch-up plan is a chain of its own (below); an earlier plan's
                // names need not be in it.
                migration.depends_on.clear();
                migration.scope = pb::Scope::Tenant as i32;
                // A migration in two plans runs once, as the later plan has it.
                chosen.retain(|c| c.id != migration.id);
                chosen.push(migration);
            }
            environment = spec.environment.clone();
        }
        if chosen.is_empty() {
            return Ok(None);
        }
        let names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
        let name = match names.as_slice() {
            [one] => format!("catch-up-{shard}/{one}"),
            many => format!("catch-up-{shard}-{}-tenants", many.len()),
        };
        let dependencies = chosen
            .windows(2)
            .map(|w| pb::Dependency {
                migration: w[1].id.clone(),
                depends_on: vec![w[0].id.clone()],
            })
            .collect();
        Ok(Some(pb::PlanSpec {
            name,
            description: format!(
                "{} migration(s) of completed plans for tenants that appeared on {shard}",
                chosen.len()
            ),
            selector: format!("shard in ({shard}), tenant in ({})", names.join(", ")),
            migrations: chosen,
            dependencies,
            environment,
            policy: pb::FailurePolicy::AllOrNothing as i32,
            default_scope: pb::Scope::Tenant as i32,
            submitted_by: "catch-up".into(),
            source: "catch-up".into(),
            ..Default::default()
        }))
    }
}

/// The plan's tenant-scope migrations that select at least one tenant of `fleet`, in the
/// plan's order.
fn selected_migrations(spec: &PlanSpec, fleet: &BTreeMap<String, ShardView>) -> Vec<usize> {
    let Ok(expansion) = planner::expand(spec, fleet) else {
        return Vec::new();
    };
    let Ok(graph) = MigrationGraph::build(spec) else {
        return Vec::new();
    };
    let selected: BTreeSet<usize> = expansion
        .steps
        .iter()
        .filter(|s| !expansion.targets[s.target].is_shard())
        .map(|s| s.migration)
        .collect();
    let scope_default = expansion.default_scope;
    graph
        .order
        .iter()
        .copied()
        .filter(|m| selected.contains(m))
        .filter(|&m| spec.migrations[m].scope.unwrap_or(scope_default) == Scope::Tenant)
        .collect()
}
