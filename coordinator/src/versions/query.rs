//! The operator's questions about the fleet's versions, answered by the leader from its
//! copy of the journals (see the module's docs) and the store's completed plans.
use std::collections::{BTreeMap, HashMap};

use flotilla_core::selector::Selector;
use flotilla_core::{PlanSpec, pb};
use prost::Message;
use tracing::warn;

use super::{FleetInput, PlanInput, fleet_status, show_target};
use crate::error::CoordinatorError;
use crate::planner::ShardView;
use crate::service::Coordinator;

impl Coordinator {
    pub async fn fleet_status(
        &self,
        selector: &str,
        files: &HashMap<String, String>,
    ) -> Result<pb::FleetStatusResponse, CoordinatorError> {
        let selector = Selector::parse(selector)
            .map_err(|e| CoordinatorError::InvalidRequest(format!("--selector: {e}")))?;
        let (epoch, fleet, plans) = self.versions_inputs().await?;
        let (journals, failures) = self.inner.versions.snapshot();
        Ok(fleet_status(
            &FleetInput {
                fleet: &fleet,
                journals: &journals,
                epoch,
                failures: &failures,
                plans: &plans,
                files,
            },
            &selector,
        ))
    }

    pub async fn fleet_show(&self, target: &str) -> Result<pb::FleetTarget, CoordinatorError> {
        let (epoch, fleet, plans) = self.versions_inputs().await?;
        let (journals, failures) = self.inner.versions.snapshot();
        show_target(
            &FleetInput {
                fleet: &fleet,
                journals: &journals,
                epoch,
                failures: &failures,
                plans: &plans,
                files: &HashMap::new(),
            },
            target.trim(),
        )
        .map_err(CoordinatorError::TargetNotFound)
    }

    /// The leader's epoch, every shard's labels and tenants, and the completed plans.
    async fn versions_inputs(
        &self,
    ) -> Result<(u64, BTreeMap<String, ShardView>, Vec<PlanInput>), CoordinatorError> {
        // Agents report their journals to the leader only.
        let epoch = self.leader_epoch()?;
        let fleet = self
            .fleet()
            .await?
            .agents
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
        let mut plans = Vec::new();
        for row in self.inner.store.completed_plans().await? {
            let spec = hex::decode(&row.spec_hex)
                .ok()
                .and_then(|b| pb::PlanSpec::decode(b.as_slice()).ok())
                .and_then(|p| PlanSpec::try_from(p).ok());
            match spec {
                Some(spec) => plans.push(PlanInput { id: row.id, spec }),
                // A plan a newer rule refuses still counts for what it applied; but its
                // migrations cannot be expanded: say so rather than guess.
                None => {
                    warn!(plan = %row.id, "a completed plan's spec does not decode; not counted in fleet status")
                }
            }
        }
        Ok((epoch, fleet, plans))
    }
}
