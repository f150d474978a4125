//! What arrives from the coordinator, handed to the part of the agent that owns it; and the
//! preflight, which asks several parts at once (tenants, journal, two-phase, data keys).
use std::sync::Arc;

use flotilla_core::pb;
use flotilla_core::pb::agent_message::Body as Out;
use flotilla_core::pb::coordinator_message::Body as In;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, instrument, warn};

use crate::data::{check, keys};
use crate::run::Outgoing;
use crate::run::two_phase::{LockTable, check_two_phase, named_relation_locks, read_lock_table};
use crate::{Agent, shard};

/// Hands one coordinator message to the part of the agent that owns it.
pub(super) fn dispatch(agent: &Arc<Agent>, body: In, tx: &mpsc::Sender<pb::AgentMessage>) {
    match body {
        In::Welcome(_) | In::Heartbeat(_) => {}
        In::Resolve(req) => {
            let agent2 = agent.clone();
            agent.tasks.spawn(async move {
                let reply = agent2.clone().resolve(req).await;
                // through the outbox: after the results queued before it, kept across streams
                agent2.send_out(Outgoing::Resolve(reply));
            });
        }
        In::Plan(def) => agent.define_plan(def),
        In::Assign(assign) => agent.assign(assign),
        In::Halt(halt) => agent.halt(&agent.plan(&halt.plan_id)),
        In::Pause(pause) => {
            let plan = agent.plan(&pause.plan_id);
            let paused = pause.paused.then(|| {
                if pause.reason.is_empty() {
                    "paused by an operator".to_string()
                } else {
                    pause.reason.clone()
                }
            });
            // heard again after every reconnect: only a change is news
            let changed = plan.control.send_if_modified(|c| {
                let changed = c.paused.is_some() != paused.is_some();
                c.paused = paused;
                changed
            });
            if changed {
                tracing::info!(plan = %pause.plan_id, paused = pause.paused, "pause changed");
            }
        }
        In::Preflight(req) => {
            let agent2 = agent.clone();
            let tx = tx.clone();
            let span = tracing::info_span!("preflight", shard = %agent.config.shard, request = req.request_id);
            agent.tasks.spawn(
                async move {
                    let reply = agent2.preflight(req).await;
                    // a reply for a stream that is gone is dropped: its request went with it
                    if tx
                        .send(pb::AgentMessage {
                            body: Some(Out::Preflight(reply)),
                        })
                        .await
                        .is_err()
                    {
                        debug!("preflight reply dropped: the stream is gone");
                    }
                }
                .instrument(span),
            );
        }
        In::Check(req) => {
            let agent2 = agent.clone();
            let tx = tx.clone();
            agent.tasks.spawn(async move {
                let reply = agent2.check(req).await;
                // like a preflight's: a reply for a stream that is gone went with its request
                if tx
                    .send(pb::AgentMessage {
                        body: Some(Out::Check(reply)),
                    })
                    .await
                    .is_err()
                {
                    debug!("gate check reply dropped: the stream is gone");
                }
            });
        }
        In::Baseline(req) => {
            let agent2 = agent.clone();
            let tx = tx.clone();
            agent.tasks.spawn(async move {
                let dry_run = req.dry_run;
                let reply = agent2.baseline(req).await;
                if !dry_run {
                    // the coordinator's fleet view hears the rows it recorded
                    agent2.journal_dirty.mark_targets(
                        reply
                            .targets
                            .iter()
                            .filter(|t| !t.recorded.is_empty())
                            .map(|t| t.tenant.clone()),
                    );
                    super::journal::report(&agent2, &tx);
                }
                // like a preflight's: a reply for a stream that is gone went with its request
                if tx
                    .send(pb::AgentMessage {
                        body: Some(Out::Baseline(reply)),
                    })
                    .await
                    .is_err()
                {
                    debug!("baseline reply dropped: the stream is gone");
                }
            });
        }
        In::Explain(req) => {
            let agent2 = agent.clone();
            let tx = tx.clone();
            agent.tasks.spawn(async move {
                let reply = agent2.explain(req).await;
                // like a preflight's: a reply for a stream that is gone went with its request
                if tx
                    .send(pb::AgentMessage {
                        body: Some(Out::Explain(reply)),
                    })
                    .await
                    .is_err()
                {
                    debug!("dry run reply dropped: the stream is gone");
                }
            });
        }
        In::Rollback(req) => {
            let agent2 = agent.clone();
            agent.tasks.spawn(async move {
                let reply = agent2.clone().rollback(req).await;
                agent2.send_out(Outgoing::Rollback(reply));
            });
        }
    }
}

impl Agent {
    /// Fresh tenants and the journal rows of the asked migrations; with `two_phase`, whether
    /// the shard can prepare transactions.
    #[instrument(skip_all, fields(shard = %self.config.shard, request = req.request_id))]
    pub(crate) async fn preflight(&self, req: pb::PreflightRequest) -> pb::PreflightReply {
        // Without its lock session the agent takes no runs on the shard: said at once (the
        // reads below waited out the pool's timeout, and the submit its preflight's 30 s, for
        // "no preflight answer").
        if !*self.shard_lock.borrow() {
            return pb::PreflightReply {
                request_id: req.request_id,
                error: format!(
                    "shard {}: its agent does not hold the shard's agent lock now (its database does not answer it, or another agent took the lock; the agent's log says which) and takes no runs there",
                    self.config.shard
                ),
                ..Default::default()
            };
        }
        let mut errors = Vec::new();
        let tenants = match self.refresh_tenants().await {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!(
                    "shard {}: discovering tenants: {}",
                    self.config.shard,
                    crate::error::Shown(&e)
                ));
                self.known_tenants()
            }
        };
        let names: Vec<String> = tenants.iter().map(|t| t.name.clone()).collect();
        let schema_changed = match shard::changed_schemas(&self.pool, &names).await {
            Ok(changed) => {
                let mut said: Vec<(String, String)> = changed
                    .into_iter()
                    .map(|t| {
                        let said = shard::changed_schema(&self.config.shard, &t);
                        (t, said)
                    })
                    .collect();
                // a tenant renamed from another is refused the same way (its migrations
                // would run again)
                match shard::renamed_tenants(&self.pool, &names).await {
                    Ok(renamed) => {
                        // (said as holding another's schema, not as a changed one)
                        said.retain(|(t, _)| !renamed.iter().any(|(r, _)| r == t));
                        said.extend(renamed.into_iter().map(|(t, before)| {
                            let why = shard::renamed_tenant(&self.config.shard, &t, &before);
                            (t, why)
                        }))
                    }
                    Err(e) => errors.push(format!(
                        "shard {}: reading which tenants were renamed: {}",
                        self.config.shard,
                        crate::error::Shown(&e)
                    )),
                }
                said.into_iter().collect()
            }
            Err(e) => {
                errors.push(format!(
                    "shard {}: reading the tenants' schemas: {}",
                    self.config.shard,
                    crate::error::Shown(&e)
                ));
                Default::default()
            }
        };
        let (applied, undoing) = match shard::read_for_preflight(&self.pool, &req.migration_ids)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %crate::error::Shown(&e), "reading the journal for a preflight failed");
                errors.push(format!(
                    "shard {}: reading the journal: {}",
                    self.config.shard,
                    crate::error::Shown(&e)
                ));
                (Vec::new(), Vec::new())
            }
        };
        let mut capacity = None;
        let two_phase_error = if req.two_phase {
            match check_two_phase(&self.pool, &self.config.shard).await {
                Ok(c) => {
                    capacity = Some(c);
                    String::new()
                }
                Err(e) => {
                    warn!(error = %e, "this shard cannot take part in two-phase commit");
                    e.to_string()
                }
            }
        } else {
            String::new()
        };
        let (lock_table, relation_locks) = if capacity.is_some() {
            self.lock_footprint(&req.lock_relations, &tenants).await
        } else {
            (None, Default::default())
        };
        let data_problems = self.check_data(&req.data_migrations, &tenants).await;
        let unbaselined = match self
            .unbaselined(&req.migration_ids, &tenants, &applied, &undoing)
            .await
        {
            Ok(u) => u,
            Err(e) => {
                // A warning's input: the plan is not refused for it.
                warn!(error = %crate::error::Shown(&e), "reading other tools' histories for a preflight failed");
                Vec::new()
            }
        };
        pb::PreflightReply {
            max_prepared_transactions: capacity.as_ref().map_or(0, |c| c.max_prepared),
            prepared_now: capacity.as_ref().map_or(0, |c| c.prepared_now),
            server_id: capacity.map(|c| c.server).unwrap_or_default(),
            max_locks_per_transaction: lock_table.map_or(0, |l| l.max_locks_per_transaction),
            max_connections: lock_table.map_or(0, |l| l.max_connections),
            locks_held: lock_table.map_or(0, |l| l.held),
            relation_locks,
            unbaselined,
            data_problems,
            two_phase_error,
            request_id: req.request_id,
            tenants,
            applied,
            schema_changed,
            error: errors.join("; "),
        }
    }

    /// The lock table's size and use, and per target what the plan's named relations take
    /// in it. Not read: the coordinator skips the lock check for this shard (a warning
    /// here), and a lock table that fills at runtime still fails the unit before PREPARE.
    async fn lock_footprint(
        &self,
        relations: &[String],
        tenants: &[pb::Tenant],
    ) -> (Option<LockTable>, std::collections::HashMap<String, u32>) {
        let table = match read_lock_table(&self.pool, &self.config.shard).await {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "reading the lock table's settings for a preflight failed");
                return (None, Default::default());
            }
        };
        let targets: Vec<String> = std::iter::once(String::new())
            .chain(tenants.iter().map(|t| t.name.clone()))
            .collect();
        match named_relation_locks(&self.pool, &targets, relations).await {
            Ok(named) => (Some(table), named),
            Err(e) => {
                warn!(error = %crate::error::Shown(&e), "counting the plan's relations for a preflight failed");
                (None, Default::default())
            }
        }
    }

    /// The data migrations' tables and keys on every target of the shard (the shard itself
    /// and each tenant): what is wrong where. A check that cannot run is a problem too.
    async fn check_data(
        &self,
        migrations: &[pb::Migration],
        tenants: &[pb::Tenant],
    ) -> Vec<pb::DataProblem> {
        let mut problems = Vec::new();
        if migrations.is_empty() {
            return problems;
        }
        let failed = |id: &str, e: String| pb::DataProblem {
            migration_id: id.to_string(),
            kind: flotilla_core::protocol::DataProblemKind::Error
                .as_str()
                .into(),
            message: format!(
                "checking its table and key on shard {}: {}",
                self.config.shard, e
            ),
            ..Default::default()
        };
        let mut conn = match self.pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                return migrations
                    .iter()
                    .map(|m| failed(&m.id, e.to_string()))
                    .collect();
            }
        };
        for m in migrations {
            let Some(prepared) = flotilla_core::Migration::try_from(m.clone())
                .ok()
                .filter(|m| m.data.is_some())
                .and_then(|m| crate::step::PreparedMigration::new(m, 0, 0).ok())
            else {
                continue;
            };
            let d = prepared.migration.data.as_ref().expect("a data change");
            let targets = std::iter::once("").chain(tenants.iter().map(|t| t.name.as_str()));
            for tenant in targets {
                match keys::inspect(&mut conn, d, Some(tenant)).await {
                    // its table and key are there: its filter and batch SQL, as written
                    Ok(Ok(shape)) => {
                        match check::preflight_statements(&mut conn, &prepared, &shape, tenant)
                            .await
                        {
                            Ok(None) => {}
                            Ok(Some(refused)) => problems.push(pb::DataProblem {
                                migration_id: m.id.clone(),
                                tenant: tenant.to_string(),
                                kind: flotilla_core::protocol::DataProblemKind::Statement
                                    .as_str()
                                    .into(),
                                message: format!(
                                    "its {} is refused by PostgreSQL: {} (planned with EXPLAIN \
                                     on the target, nothing run)",
                                    refused.part.as_str(),
                                    refused.message
                                ),
                                name: refused
                                    .missing_name()
                                    .or_else(|| d.table.last().cloned())
                                    .unwrap_or_default(),
                            }),
                            // not a refusal of the change: its first batch checks it
                            Err(error) => warn!(
                                migration = %m.id,
                                tenant,
                                error = %crate::error::Shown(&error),
                                "checking a data change's filter and batch SQL for a preflight failed"
                            ),
                        }
                    }
                    Ok(Err(p)) => problems.push(p.to_pb(&m.id, tenant)),
                    Err(e) => {
                        problems.push(pb::DataProblem {
                            tenant: tenant.to_string(),
                            ..failed(&m.id, e.to_string())
                        });
                        break;
                    }
                }
            }
        }
        problems
    }
}
