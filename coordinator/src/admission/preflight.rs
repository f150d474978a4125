//! The preflight: every shard the plan could touch is asked, in parallel, for its tenants,
//! the journal rows of the plan's migrations, whether it can prepare transactions, and
//! what its targets lack for the plan's data migrations. A shard seen before but not
//! attached now refuses the plan if the plan selects targets on it.
use std::collections::BTreeMap;

use flotilla_core::{PlanSpec, pb};

use super::Mode;
use crate::error::CoordinatorError;
use crate::planner::{self, ShardView};
use crate::service::Coordinator;
use crate::sessions::registry::AttachedAgent;
use crate::store::now_ms;

/// (migration, shard, tenant): how the preflight's findings are keyed.
pub(crate) type StepKey = (String, String, String);

/// What the fleet said about a plan.
#[derive(Default)]
pub(crate) struct Seen {
    /// Labels and fresh tenants of every attached shard.
    pub fleet: BTreeMap<String, ShardView>,
    /// Journal rows of the plan's migrations, with their checksums.
    pub applied: BTreeMap<StepKey, String>,
    /// Shards that cannot prepare transactions, and why.
    pub two_phase_errors: BTreeMap<String, String>,
    /// Shards that can prepare: their server's max_prepared_transactions, prepared now,
    /// and which server that is.
    pub prepare_capacity: BTreeMap<String, PrepareSeen>,
    /// Shards that can prepare: their server's lock table, and what each target's named
    /// relations take in it.
    pub lock_tables: BTreeMap<String, LockTableSeen>,
    /// What a data migration's target lacks.
    pub data_problems: BTreeMap<StepKey, pb::DataProblem>,
    /// Targets whose journal lacks migrations another tool's history says ran there.
    pub unbaselined: Vec<pb::BaselineTarget>,
    /// Dry run only: shards that could not be asked, and why (their view in `fleet` is the
    /// one the coordinator last knew).
    pub unknown: BTreeMap<String, String>,
    /// Tenants whose schema is not the one their journal was written in, by (shard,
    /// tenant): what their agent says of each.
    pub schema_changed: BTreeMap<(String, String), String>,
}

/// A shard's server as its agent saw it for the preflight: how many transactions it can
/// hold prepared and holds now (any database's count), and which server it is ("": not
/// known; the shard is then checked alone).
#[derive(Debug, Clone, Default)]
pub(crate) struct PrepareSeen {
    pub max_prepared: u32,
    pub prepared_now: u32,
    pub server: String,
}

/// A shard server's shared lock table as its agent read it for the preflight.
#[derive(Debug, Clone, Default)]
pub(crate) struct LockTableSeen {
    pub max_locks_per_transaction: u32,
    pub max_connections: u32,
    /// Entries held now (pg_locks rows off the fast path).
    pub held: u64,
    /// Per target (tenant; "" for the shard itself): the entries the atomic units' named
    /// relations take there, with their indexes, TOAST and owned sequences.
    pub named: std::collections::HashMap<String, u32>,
}

/// The relations every atomic unit's transactional statements name: the agents count what
/// they take in the lock table on each target.
fn lock_relations(spec: &PlanSpec) -> Vec<String> {
    let mut footprint = flotilla_core::lint::LockFootprint::default();
    for m in &spec.migrations {
        if m.tx_mode == flotilla_core::TxMode::Transactional && spec.atomic_unit(&m.id).is_some() {
            footprint.add(&m.up_sql);
        }
    }
    footprint.relations.into_iter().collect()
}

impl Coordinator {
    /// Shards seen before but not attached now: if the plan could touch them, it cannot
    /// be checked or run, so it is refused rather than half-applied.
    pub(crate) async fn refuse_unattached(&self, spec: &PlanSpec) -> Result<(), CoordinatorError> {
        let attached = self.inner.fleet.snapshot();
        let away = self.away_agents(spec, &attached).await?;
        if away.is_empty() {
            return Ok(());
        }
        // Scope auto is decided over every shard the plan may touch, as at submit, not over
        // the shard gone alone: a shard with no tenants is a target only when no shard has
        // any (before, an empty shard gone away refused every plan of scope auto).
        let scoped;
        let spec = if spec.default_scope.is_none() {
            let envs = &self.inner.environments;
            let mut whole: BTreeMap<String, ShardView> = attached
                .iter()
                .filter(|(_, a)| envs.admits(&spec.environment, &a.labels))
                .map(|(shard, a)| (shard.clone(), attached_view(a)))
                .collect();
            whole.extend(away.iter().map(|a| (a.shard.clone(), a.view())));
            let mut with_scope = spec.clone();
            with_scope.default_scope = Some(planner::default_scope(spec, &whole));
            scoped = with_scope;
            &scoped
        } else {
            spec
        };
        for agent in away {
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

    /// The shards seen before whose agent is not attached now, of the plan's environment
    /// (a plan for an environment touches that environment's shards only).
    async fn away_agents(
        &self,
        spec: &PlanSpec,
        attached: &BTreeMap<String, AttachedAgent>,
    ) -> Result<Vec<crate::store::AgentRow>, CoordinatorError> {
        let envs = &self.inner.environments;
        Ok(self
            .inner
            .store
            .agents()
            .await?
            .into_iter()
            .filter(|a| {
                !attached.contains_key(&a.shard) && envs.admits(&spec.environment, &a.labels())
            })
            .collect())
    }

    /// Fresh tenants and journal rows from every attached shard, in parallel; the data
    /// migrations' tables and keys checked on every target there.
    pub(crate) async fn preflight(
        &self,
        spec: &PlanSpec,
        mode: Mode,
    ) -> Result<Seen, CoordinatorError> {
        let envs = &self.inner.environments;
        // A plan for an environment touches, and asks, that environment's shards only.
        let all = self.inner.fleet.snapshot();
        let attached: BTreeMap<&String, &AttachedAgent> = all
            .iter()
            .filter(|(_, a)| envs.admits(&spec.environment, &a.labels))
            .collect();
        // A dry run whose environment's shards are all away names them (`unknown_shards`),
        // as with some away: it said the environment had no shard, while the submit said
        // which one was unreachable.
        let away_named = mode == Mode::DryRun && !self.away_agents(spec, &all).await?.is_empty();
        if attached.is_empty() && !envs.is_empty() && !spec.environment.is_empty() && !away_named {
            return Err(crate::error::Refusal::EmptyEnvironment {
                environment: spec.environment.clone(),
                label: envs.label.clone(),
            }
            .into());
        }
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
            lock_relations: if spec.two_phase() {
                lock_relations(spec)
            } else {
                Vec::new()
            },
        };
        let asks = attached.keys().map(|shard| {
            let request = request.clone();
            async move {
                let r = self
                    .inner
                    .fleet
                    .preflight(shard, request, self.inner.defaults.preflight_timeout)
                    .await;
                (shard.to_string(), r)
            }
        });
        let replies = futures::future::join_all(asks).await;
        let mut seen = Seen::default();
        for (shard, reply) in replies {
            let mut reply = match (reply, mode) {
                (Ok(r), _) => r,
                (Err(e), Mode::Submit) => return Err(e),
                (Err(e), Mode::DryRun) => {
                    seen.fleet
                        .insert(shard.clone(), attached_view(attached[&shard]));
                    seen.unknown.insert(shard.clone(), unknown_reason(e));
                    continue;
                }
            };
            for p in std::mem::take(&mut reply.data_problems) {
                seen.data_problems
                    .insert((p.migration_id.clone(), shard.clone(), p.tenant.clone()), p);
            }
            seen.unbaselined
                .extend(std::mem::take(&mut reply.unbaselined));
            if reply.max_prepared_transactions > 0 {
                seen.prepare_capacity.insert(
                    shard.clone(),
                    PrepareSeen {
                        max_prepared: reply.max_prepared_transactions,
                        prepared_now: reply.prepared_now,
                        server: std::mem::take(&mut reply.server_id),
                    },
                );
            }
            if reply.max_locks_per_transaction > 0 {
                seen.lock_tables.insert(
                    shard.clone(),
                    LockTableSeen {
                        max_locks_per_transaction: reply.max_locks_per_transaction,
                        max_connections: reply.max_connections,
                        held: reply.locks_held,
                        named: std::mem::take(&mut reply.relation_locks),
                    },
                );
            }
            if !reply.two_phase_error.is_empty() {
                seen.two_phase_errors
                    .insert(shard.clone(), reply.two_phase_error.clone());
            }
            if mode == Mode::Submit {
                // a dry run writes nothing, not even the fleet's fresh tenants
                self.record_tenants(&shard, &reply.tenants);
            }
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
            for (tenant, said) in reply.schema_changed {
                seen.schema_changed.insert((shard.clone(), tenant), said);
            }
        }
        if mode == Mode::DryRun {
            // What a submit would refuse for: a shard seen before whose agent is away. The
            // dry run shows its targets as the coordinator last knew them, sizes unknown.
            // Only the plan's environment's (before, another environment's shards, attached,
            // were shown as away and their targets as the plan's).
            for agent in self.away_agents(spec, &all).await? {
                seen.unknown.insert(
                    agent.shard.clone(),
                    format!(
                        "its agent is not attached (last seen {}s ago)",
                        (now_ms() - agent.last_seen_ms).max(0) / 1000
                    ),
                );
                seen.fleet.insert(agent.shard.clone(), agent.view());
            }
        }
        Ok(seen)
    }
}

/// Why a shard could not be asked, without the shard's name (the caller names it).
pub(crate) fn unknown_reason(e: CoordinatorError) -> String {
    match e {
        CoordinatorError::Unreachable { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// What an attached agent said of its shard, as the planner reads it.
fn attached_view(a: &AttachedAgent) -> ShardView {
    ShardView {
        labels: a.labels.clone(),
        tenants: a
            .tenants
            .iter()
            .map(|t| (t.name.clone(), t.labels.clone().into_iter().collect()))
            .collect(),
    }
}
