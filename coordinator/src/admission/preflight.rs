//! The preflight: every shard the plan could touch is asked, in parallel, for its tenants,
//! the journal rows of the plan's migrations, whether it can prepare transactions, and
//! what its targets lack for the plan's data migrations. A shard seen before but not
//! attached now refuses the plan if the plan selects targets on it.
use std::collections::BTreeMap;

use flotilla_core::{PlanSpec, pb};

use crate::error::CoordinatorError;
use crate::planner::{self, ShardView};
use crate::service::Coordinator;
use crate::store::now_ms;

/// (migration, shard, tenant): how the preflight's findings are keyed.
pub(super) type StepKey = (String, String, String);

/// What the fleet said about a plan.
#[derive(Default)]
pub(super) struct Seen {
    /// Labels and fresh tenants of every attached shard.
    pub fleet: BTreeMap<String, ShardView>,
    /// Journal rows of the plan's migrations, with their checksums.
    pub applied: BTreeMap<StepKey, String>,
    /// Shards that cannot prepare transactions, and why.
    pub two_phase_errors: BTreeMap<String, String>,
    /// What a data migration's target lacks.
    pub data_problems: BTreeMap<StepKey, pb::DataProblem>,
}

impl Coordinator {
    /// Shards seen before but not attached now: if the plan could touch them, it cannot
    /// be checked or run, so it is refused rather than half-applied.
    pub(super) async fn refuse_unattached(&self, spec: &PlanSpec) -> Result<(), CoordinatorError> {
        let attached = self.inner.fleet.snapshot();
        for agent in self.inner.store.agents().await? {
            if attached.contains_key(&agent.shard) {
                continue;
            }
            let one = BTreeMap::from([(agent.shard.clone(), agent.view())]);
            if planner::expand(spec, &one).is_ok() {
                return Err(CoordinatorError::Unreachable {
                    shard: agent.shard,
                    reason: format!(
                        "its agent is not attached (last seen {}s ago) and the plan selects targets on it",
                        (now_ms() - agent.last_seen_ms).max(0) / 1000
                    ),
                });
            }
        }
        Ok(())
    }

    /// Fresh tenants and journal rows from every attached shard, in parallel; the data
    /// migrations' tables and keys checked on every target there.
    pub(super) async fn preflight(&self, spec: &PlanSpec) -> Result<Seen, CoordinatorError> {
        let attached = self.inner.fleet.snapshot();
        let request = pb::PreflightRequest {
            request_id: 0,
            migration_ids: spec.migrations.iter().map(|m| m.id.to_string()).collect(),
            two_phase: spec.two_phase(),
            data_migrations: spec
                .migrations
                .iter()
                .filter(|m| m.data.is_some())
                .map(pb::Migration::from)
                .collect(),
        };
        let asks = attached.keys().map(|shard| {
            let request = request.clone();
            async move {
                let r = self
                    .inner
                    .fleet
                    .preflight(shard, request, self.inner.defaults.preflight_timeout)
                    .await;
                (shard.clone(), r)
            }
        });
        let replies = futures::future::join_all(asks).await;
        let mut seen = Seen::default();
        for (shard, reply) in replies {
            let mut reply = reply?;
            for p in std::mem::take(&mut reply.data_problems) {
                seen.data_problems
                    .insert((p.migration_id.clone(), shard.clone(), p.tenant.clone()), p);
            }
            if !reply.two_phase_error.is_empty() {
                seen.two_phase_errors
                    .insert(shard.clone(), reply.two_phase_error.clone());
            }
            self.record_tenants(&shard, &reply.tenants);
            let labels = attached[&shard].labels.clone();
            let tenants = reply
                .tenants
                .iter()
                .map(|t| (t.name.clone(), t.labels.clone().into_iter().collect()))
                .collect();
            seen.fleet
                .insert(shard.clone(), ShardView { labels, tenants });
            for a in reply.applied {
                seen.applied
                    .insert((a.migration_id, shard.clone(), a.tenant), a.checksum);
            }
        }
        Ok(seen)
    }
}
