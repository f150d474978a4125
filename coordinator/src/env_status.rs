//! `env status`: per environment, in promotion order, its shards, its latest plans and the
//! migrations that have completed there (what the promotion gate of the next environment
//! counts; see `admission::promotion`). Answered from the control store and the attached
//! agents' labels, without asking any shard.
use std::collections::BTreeMap;

use flotilla_core::pb;
use flotilla_core::state::PlanState;
use prost::Message;

use crate::error::CoordinatorError;
use crate::plan::status;
use crate::service::Coordinator;

/// Latest plans shown per environment when the request does not say.
const DEFAULT_PLANS: usize = 5;

impl Coordinator {
    pub async fn env_status(&self, plans: u32) -> Result<pb::EnvStatusResponse, CoordinatorError> {
        let envs = &self.inner.environments;
        let shown = match plans {
            0 => DEFAULT_PLANS,
            n => n.min(100) as usize,
        };
        // Every shard this coordinator knows (stored agents), connected or not; the labels
        // of attached agents are the fresher ones.
        let attached = self.inner.fleet.snapshot();
        let mut shards: BTreeMap<String, (BTreeMap<String, String>, bool)> = self
            .inner
            .store
            .agents()
            .await?
            .into_iter()
            .map(|a| (a.shard.clone(), (a.labels(), false)))
            .collect();
        for (shard, a) in &attached {
            shards.insert(shard.clone(), (a.labels.clone(), true));
        }
        let mut out = pb::EnvStatusResponse {
            environments: Vec::new(),
            label: envs.label.clone(),
        };
        for name in &envs.order {
            let rows = self.inner.store.environment_plans(name).await?;
            let mut migrations: Vec<pb::EnvMigration> = Vec::new();
            for row in rows.iter().filter(|r| r.state == PlanState::Completed) {
                let Some(raw) = hex::decode(&row.spec_hex)
                    .ok()
                    .and_then(|b| pb::PlanSpec::decode(b.as_slice()).ok())
                else {
                    continue;
                };
                for m in raw.migrations {
                    if !migrations
                        .iter()
                        .any(|e| e.migration_id == m.id && e.checksum == m.checksum)
                    {
                        migrations.push(pb::EnvMigration {
                            migration_id: m.id,
                            checksum: m.checksum,
                            plan_id: row.id.clone(),
                            completed_at_ms: row.updated_at_ms.max(0) as u64,
                        });
                    }
                }
            }
            out.environments.push(pb::EnvironmentStatus {
                name: name.clone(),
                promoted_from: envs.before(name).unwrap_or_default().to_string(),
                shards: shards
                    .iter()
                    .filter(|(_, (labels, _))| envs.of_shard(labels) == Some(name.as_str()))
                    .map(|(shard, (_, connected))| pb::EnvShard {
                        shard: shard.clone(),
                        connected: *connected,
                    })
                    .collect(),
                plans: rows.iter().rev().take(shown).map(status::summary).collect(),
                migrations,
            });
        }
        Ok(out)
    }
}
