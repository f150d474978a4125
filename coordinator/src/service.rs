//! The coordinator's domain API: what the gRPC layer calls. Validation of a
//! plan happens here, before any shard is touched; nothing is stored half.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::dag::MigrationGraph;
use flotilla_proto::{PlanSpec, Target, pb};
use prost::Message;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{info, instrument};

use crate::coordination::Decision;
use crate::coordination::{
    Coordination, CoordinationError, EmbeddedCoordination, Leadership, LockOutcome,
};
use crate::engine::plan_run::{PlanRun, PlanState, StepStatus};
use crate::engine::{CommandKind, Event, status};
use crate::error::CoordinatorError;
use crate::fleet::Fleet;
use crate::planner::{self, ShardView};
use crate::store::{PlanRow, StepRow, Store, StoreOp, now_ms};

#[derive(Debug, Clone)]
pub struct Defaults {
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub preflight_timeout: Duration,
}

pub struct Inner {
    pub store: Store,
    pub fleet: Fleet,
    pub events: mpsc::Sender<Event>,
    pub writes: mpsc::UnboundedSender<StoreOp>,
    pub changes: broadcast::Sender<(String, bool)>,
    pub coordination: Arc<dyn Coordination>,
    /// Set with the embedded backend: attachments are its liveness signal.
    pub embedded: Option<Arc<EmbeddedCoordination>>,
    pub defaults: Defaults,
}

#[derive(Clone)]
pub struct Coordinator {
    pub inner: Arc<Inner>,
}

impl Coordinator {
    /// The epoch this coordinator leads under, or NotLeader naming the leader.
    pub fn leader_epoch(&self) -> Result<u64, CoordinatorError> {
        match &*self.inner.coordination.leadership().borrow() {
            Leadership::Leader { epoch } => Ok(*epoch),
            Leadership::Follower { leader } => Err(CoordinatorError::NotLeader {
                leader: leader.clone(),
            }),
        }
    }

    /// Takes the plan's shard locks (all or none), retrying while another plan
    /// holds one; the plan's status says which. The engine sends nothing for the
    /// plan before they are taken.
    pub fn take_locks(&self, plan_id: String, shards: Vec<String>, epoch: u64) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let waiting = match me
                    .inner
                    .coordination
                    .lock_shards(&plan_id, &shards, epoch)
                    .await
                {
                    Ok(LockOutcome::Taken) => {
                        let _ = me.inner.events.send(Event::LocksTaken { plan_id }).await;
                        return;
                    }
                    Ok(LockOutcome::Held {
                        shard,
                        plan_id: holder,
                    }) => {
                        format!("shard {shard} is locked by plan {holder}")
                    }
                    Err(CoordinationError::NotLeader) => return,
                    Err(e) => e.to_string(),
                };
                let _ = me
                    .inner
                    .events
                    .send(Event::LocksWaiting {
                        plan_id: plan_id.clone(),
                        message: waiting,
                    })
                    .await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                if me.leader_epoch().ok() != Some(epoch) {
                    return;
                }
            }
        });
    }

    pub async fn locks(&self) -> Result<pb::ListLocksResponse, CoordinatorError> {
        let locks = self.inner.coordination.locks().await?;
        Ok(pb::ListLocksResponse {
            locks: locks
                .into_iter()
                .map(|l| pb::ShardLock {
                    shard: l.shard,
                    plan_id: l.plan_id,
                    lease: l.lease,
                })
                .collect(),
            backend: self.inner.coordination.kind().into(),
        })
    }

    /// Breaks one shard's lock, whoever holds it: an operator's override, audited.
    pub async fn break_lock(
        &self,
        shard: &str,
        actor: &str,
        reason: &str,
    ) -> Result<bool, CoordinatorError> {
        self.leader_epoch()?;
        let holder = self
            .inner
            .coordination
            .locks()
            .await?
            .into_iter()
            .find(|l| l.shard == shard)
            .map(|l| l.plan_id)
            .unwrap_or_default();
        let broken = self.inner.coordination.break_lock(shard).await?;
        if broken {
            let _ = self.inner.writes.send(StoreOp::Audit {
                actor: if actor.is_empty() {
                    "operator".into()
                } else {
                    actor.to_string()
                },
                action: "break-lock".into(),
                plan_id: holder.clone(),
                detail: format!(
                    "shard {shard}{}",
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {reason}")
                    }
                ),
            });
            self.flush().await;
            tracing::warn!(shard, plan = %holder, "shard lock broken by {actor}");
        }
        Ok(broken)
    }

    async fn to_engine<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Event,
    ) -> Result<T, CoordinatorError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .events
            .send(make(tx))
            .await
            .map_err(|_| CoordinatorError::ShuttingDown)?;
        rx.await.map_err(|_| CoordinatorError::ShuttingDown)
    }

    async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        let _ = self.inner.writes.send(StoreOp::Flush(tx));
        let _ = rx.await;
    }

    fn definition(&self, plan_id: &str, spec: &PlanSpec) -> pb::PlanDefinition {
        pb::PlanDefinition {
            plan_id: plan_id.to_string(),
            migrations: spec.migrations.iter().map(pb::Migration::from).collect(),
            default_lock_timeout_ms: self.inner.defaults.lock_timeout.as_millis() as u64,
            default_statement_timeout_ms: self.inner.defaults.statement_timeout.as_millis() as u64,
        }
    }

    #[instrument(skip_all, fields(plan = %raw.name))]
    pub async fn submit(
        &self,
        raw: pb::PlanSpec,
    ) -> Result<pb::SubmitPlanResponse, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        let spec = PlanSpec::try_from(raw.clone())?;
        let ids: Vec<String> = spec.migrations.iter().map(|m| m.id.to_string()).collect();
        let atomic = spec.two_phase();

        // Shards seen before but not attached now: if the plan could touch them,
        // it cannot be checked or run, so it is refused rather than half-applied.
        let attached = self.inner.fleet.snapshot();
        for (shard, labels, tenants, _, last_seen) in self.inner.store.agents().await? {
            if attached.contains_key(&shard) {
                continue;
            }
            let view = ShardView {
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                tenants: serde_json::from_str(&tenants).unwrap_or_default(),
            };
            let one = BTreeMap::from([(shard.clone(), view)]);
            if planner::expand(&spec, &one).is_ok() {
                return Err(CoordinatorError::Unreachable {
                    shard,
                    reason: format!(
                        "its agent is not attached (last seen {}s ago) and the plan selects targets on it",
                        (now_ms() - last_seen).max(0) / 1000
                    ),
                });
            }
        }

        // Fresh tenants and journal rows from every attached shard, in parallel; the data
        // migrations' tables and keys checked on every target there.
        let request = pb::PreflightRequest {
            request_id: 0,
            migration_ids: ids.clone(),
            two_phase: atomic,
            data_migrations: spec
                .migrations
                .iter()
                .filter(|m| m.data.is_some())
                .map(pb::Migration::from)
                .collect(),
        };
        let checks = attached.keys().map(|shard| {
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
        let replies = futures::future::join_all(checks).await;
        let mut fleet: BTreeMap<String, ShardView> = BTreeMap::new();
        let mut applied: BTreeMap<(String, String, String), String> = BTreeMap::new();
        let mut two_phase_errors: BTreeMap<String, String> = BTreeMap::new();
        let mut data_problems: BTreeMap<(String, String, String), pb::DataProblem> =
            BTreeMap::new();
        for (shard, reply) in replies {
            let mut reply = reply?;
            for p in std::mem::take(&mut reply.data_problems) {
                data_problems.insert((p.migration_id.clone(), shard.clone(), p.tenant.clone()), p);
            }
            if !reply.two_phase_error.is_empty() {
                two_phase_errors.insert(shard.clone(), reply.two_phase_error.clone());
            }
            self.inner.fleet.set_tenants(&shard, reply.tenants.clone());
            let labels = attached[&shard].labels.clone();
            let tenants = reply
                .tenants
                .iter()
                .map(|t| (t.name.clone(), t.labels.clone().into_iter().collect()))
                .collect();
            fleet.insert(shard.clone(), ShardView { labels, tenants });
            for a in reply.applied {
                applied.insert((a.migration_id, shard.clone(), a.tenant), a.checksum);
            }
        }

        // An applied migration whose content changed since: name it and where.
        for m in &spec.migrations {
            let differs: Vec<String> = applied
                .iter()
                .filter(|((id, _, _), sum)| id == m.id.as_str() && **sum != m.checksum)
                .map(|((_, shard, tenant), _)| {
                    Target {
                        shard: shard.clone(),
                        tenant: tenant.clone(),
                    }
                    .to_string()
                })
                .collect();
            if !differs.is_empty() {
                let shown: Vec<&str> = differs.iter().take(5).map(String::as_str).collect();
                return Err(CoordinatorError::Rejected(format!(
                    "migration `{}` ({}) was edited after it was applied: its checksum {} differs from the one recorded on {}{}",
                    m.id,
                    m.source,
                    &m.checksum[..12],
                    shown.join(", "),
                    if differs.len() > 5 {
                        format!(" and {} more targets", differs.len() - 5)
                    } else {
                        String::new()
                    }
                )));
            }
        }

        let expansion = planner::expand(&spec, &fleet)?;
        check_data_problems(&spec, &expansion, &data_problems)?;
        // Two-phase commit needs every shard it prepares on able to prepare: refused
        // before any change, naming the shard and the setting.
        for s in &expansion.steps {
            let m = &spec.migrations[s.migration];
            let shard = &expansion.targets[s.target].shard;
            if m.tx_mode == flotilla_proto::TxMode::Transactional
                && spec.atomic_unit(&m.id).is_some()
                && let Some(e) = two_phase_errors.get(shard)
            {
                return Err(CoordinatorError::Rejected(format!(
                    "atomic plan refused by preflight: {e}"
                )));
            }
        }
        if spec.two_phase() {
            // A prepared change is invisible to other transactions until the
            // decision: a step cannot wait on another target's step of the same
            // unit (units before it have committed by the time it runs).
            for s in &expansion.steps {
                let unit = spec.atomic_unit(&spec.migrations[s.migration].id);
                if unit.is_none() {
                    continue;
                }
                if let Some(&d) = s.deps.iter().find(|&&d| {
                    expansion.steps[d].target != s.target
                        && spec.atomic_unit(&spec.migrations[expansion.steps[d].migration].id)
                            == unit
                }) {
                    return Err(CoordinatorError::Rejected(format!(
                        "atomic plan: `{}` on {} depends on `{}` on {}; atomic plans order steps within a target only",
                        spec.migrations[s.migration].id,
                        expansion.targets[s.target],
                        spec.migrations[expansion.steps[d].migration].id,
                        expansion.targets[expansion.steps[d].target],
                    )));
                }
            }
        }
        let plan_id = new_plan_id();
        let statuses: Vec<StepStatus> = expansion
            .steps
            .iter()
            .map(|s| {
                let t = &expansion.targets[s.target];
                let key = (
                    spec.migrations[s.migration].id.to_string(),
                    t.shard.clone(),
                    t.tenant.clone(),
                );
                if applied.contains_key(&key) {
                    StepStatus::AlreadyApplied
                } else {
                    StepStatus::Pending
                }
            })
            .collect();
        let created = now_ms();
        let mut stored = pb::PlanSpec::from(&spec);
        // Freeze the scope the plan resolved to, so a rebuild sees the same steps.
        stored.default_scope = match expansion.default_scope {
            flotilla_proto::Scope::Shard => pb::Scope::Shard as i32,
            flotilla_proto::Scope::Tenant => pb::Scope::Tenant as i32,
        };
        let row = PlanRow {
            id: plan_id.clone(),
            name: spec.name.clone(),
            environment: spec.environment.clone(),
            state: "running".into(),
            policy: spec.policy.as_str().into(),
            spec_hex: hex::encode(stored.encode_to_vec()),
            epoch: epoch as i64,
            message: String::new(),
            submitted_by: spec.submitted_by.clone(),
            created_at_ms: created,
            updated_at_ms: created,
            targets: expansion.targets.len() as i64,
            steps: expansion.steps.len() as i64,
        };
        let step_rows = expansion
            .steps
            .iter()
            .zip(&statuses)
            .map(|(s, st)| {
                let t = &expansion.targets[s.target];
                StepRow {
                    migration_id: spec.migrations[s.migration].id.to_string(),
                    shard: t.shard.clone(),
                    tenant: t.tenant.clone(),
                    state: st.as_str().into(),
                    sqlstate: String::new(),
                    message: String::new(),
                    phase: String::new(),
                    detail: String::new(),
                }
            })
            .collect();
        let _ = self.inner.writes.send(StoreOp::InsertPlan {
            plan: row,
            steps: step_rows,
        });
        let _ = self.inner.writes.send(StoreOp::Audit {
            actor: if spec.submitted_by.is_empty() {
                "operator".into()
            } else {
                spec.submitted_by.clone()
            },
            action: "submit".into(),
            plan_id: plan_id.clone(),
            detail: format!(
                "{} migrations, {} targets, from {}",
                spec.migrations.len(),
                expansion.targets.len(),
                spec.source
            ),
        });
        self.flush().await;
        info!(plan = %plan_id, targets = expansion.targets.len(), steps = expansion.steps.len(), "plan submitted");

        let spec = Arc::new(spec);
        let run = PlanRun::new(
            plan_id.clone(),
            spec.clone(),
            self.definition(&plan_id, &spec),
            expansion.targets,
            expansion.steps,
            statuses,
            created,
            epoch,
        );
        let shards: Vec<String> = run.shards.keys().cloned().collect();
        let status = self
            .to_engine(|done| Event::Start {
                run: Box::new(run),
                done,
            })
            .await?;
        self.take_locks(plan_id.clone(), shards, epoch);
        Ok(pb::SubmitPlanResponse {
            plan_id,
            status: Some(status),
        })
    }

    /// Rebuilds a stored plan in memory (to roll it back, or to resume it after a restart).
    pub async fn rebuild(&self, row: &PlanRow) -> Result<PlanRun, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        let bytes = hex::decode(&row.spec_hex).map_err(|e| {
            CoordinatorError::Store(format!("plan {}: stored spec is corrupt: {e}", row.id))
        })?;
        let raw = pb::PlanSpec::decode(bytes.as_slice())
            .map_err(|e| CoordinatorError::Store(format!("plan {}: stored spec: {e}", row.id)))?;
        let spec = PlanSpec::try_from(raw)?;
        let scope = spec.default_scope.unwrap_or(flotilla_proto::Scope::Tenant);
        let graph = MigrationGraph::build(&spec)?;
        let rows = self.inner.store.steps(&row.id).await?;
        let mut targets: Vec<Target> = Vec::new();
        let mut target_ix: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mut exists: BTreeMap<(usize, usize), String> = BTreeMap::new();
        let mig_ix: BTreeMap<String, usize> = spec
            .migrations
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.to_string(), i))
            .collect();
        for r in &rows {
            let t = *target_ix
                .entry((r.shard.clone(), r.tenant.clone()))
                .or_insert_with(|| {
                    targets.push(Target {
                        shard: r.shard.clone(),
                        tenant: r.tenant.clone(),
                    });
                    targets.len() - 1
                });
            if let Some(&m) = mig_ix.get(&r.migration_id) {
                exists.insert((m, t), r.state.clone());
            }
        }
        let steps = planner::plan_steps(&spec, &graph, &targets, scope, |m, t| {
            exists.contains_key(&(m, t))
        });
        let statuses = steps
            .iter()
            .map(|s| StepStatus::parse(&exists[&(s.migration, s.target)]))
            .collect();
        let spec = Arc::new(spec);
        let mut run = PlanRun::new(
            row.id.clone(),
            spec.clone(),
            self.definition(&row.id, &spec),
            targets,
            steps,
            statuses,
            row.created_at_ms,
            epoch,
        );
        run.inherited = true;
        Ok(run)
    }

    pub async fn status(&self, plan_id: &str) -> Result<pb::PlanStatus, CoordinatorError> {
        let id = plan_id.to_string();
        if let Some(s) = self
            .to_engine(|reply| Event::Status { plan_id: id, reply })
            .await?
        {
            return Ok(s);
        }
        let row = self
            .inner
            .store
            .plan(plan_id)
            .await?
            .ok_or_else(|| CoordinatorError::PlanNotFound(plan_id.to_string()))?;
        let order = hex::decode(&row.spec_hex)
            .ok()
            .and_then(|b| pb::PlanSpec::decode(b.as_slice()).ok())
            .map(|p| p.migrations.into_iter().map(|m| m.id).collect::<Vec<_>>())
            .unwrap_or_default();
        let steps = self.inner.store.steps(plan_id).await?;
        let data = self.inner.store.data_progress(plan_id).await?;
        Ok(status::from_store(&row, &order, &steps, data))
    }

    pub async fn list(&self, limit: u32) -> Result<pb::ListPlansResponse, CoordinatorError> {
        let limit = if limit == 0 { 50 } else { limit.min(1000) };
        let rows = self.inner.store.plans(limit as i64).await?;
        Ok(pb::ListPlansResponse {
            plans: rows.iter().map(status::summary).collect(),
        })
    }

    pub async fn command(
        &self,
        plan_id: &str,
        kind: CommandKind,
        actor: &str,
        reason: &str,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        let id = plan_id.to_string();
        let in_memory = self
            .to_engine(|reply| Event::Status { plan_id: id, reply })
            .await?
            .is_some();
        let revive = if in_memory || kind == CommandKind::Cancel {
            None
        } else {
            let row = self
                .inner
                .store
                .plan(plan_id)
                .await?
                .ok_or_else(|| CoordinatorError::PlanNotFound(plan_id.to_string()))?;
            if row.state == "rolled_back" {
                return Err(CoordinatorError::Conflict(format!(
                    "plan {plan_id} is already rolled back"
                )));
            }
            let mut run = self.rebuild(&row).await?;
            run.state = crate::engine::plan_run::PlanState::Completed;
            Some(Box::new(run))
        };
        let epoch = self.leader_epoch()?;
        let revived_shards: Option<Vec<String>> =
            revive.as_ref().map(|r| r.shards.keys().cloned().collect());
        let (id, actor, reason) = (plan_id.to_string(), actor.to_string(), reason.to_string());
        let status = self
            .to_engine(|reply| Event::Command {
                plan_id: id,
                kind,
                actor,
                reason,
                revive,
                reply,
            })
            .await??;
        if let Some(shards) = revived_shards {
            self.take_locks(plan_id.to_string(), shards, epoch);
        }
        Ok(status)
    }

    /// Cancels one shard of a running plan (policies stop and continue).
    pub async fn cancel_shard(
        &self,
        c: pb::PlanCommand,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        self.leader_epoch()?;
        let (plan_id, shard) = (c.plan_id.clone(), c.shard.trim().to_string());
        self.to_engine(|reply| Event::CancelShard {
            plan_id,
            shard,
            actor: c.actor,
            reason: c.reason,
            reply,
        })
        .await?
    }

    /// Pauses or resumes a running plan, or one shard of it (`c.shard`).
    pub async fn pause(
        &self,
        c: pb::PlanCommand,
        paused: bool,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        self.leader_epoch()?;
        let shard = (!c.shard.trim().is_empty()).then(|| c.shard.trim().to_string());
        self.to_engine(|reply| Event::Pause {
            plan_id: c.plan_id,
            shard,
            paused,
            actor: c.actor,
            reason: c.reason,
            reply,
        })
        .await?
    }

    /// Plan status snapshots as they change, ending with the final one.
    pub fn watch(
        &self,
        plan_id: String,
    ) -> mpsc::Receiver<Result<pb::PlanStatus, CoordinatorError>> {
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        let mut changes = self.inner.changes.subscribe();
        tokio::spawn(async move {
            let mut last: Option<pb::PlanStatus> = None;
            loop {
                let status = match me.status(&plan_id).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let terminal = status
                    .summary
                    .as_ref()
                    .is_some_and(|s| is_terminal(&s.state));
                let key = |s: &pb::PlanStatus| {
                    (
                        s.migrations.clone(),
                        s.summary.as_ref().map(|x| x.state.clone()),
                        s.failures.clone(),
                    )
                };
                let changed = last.as_ref().map(key) != Some(key(&status));
                if changed {
                    if tx.send(Ok(status.clone())).await.is_err() {
                        return;
                    }
                    last = Some(status);
                }
                if terminal {
                    return;
                }
                // Coalesce bursts of changes to one status every 100 ms, but
                // look at once when the plan ends; a periodic look covers a missed one.
                let due = tokio::time::Instant::now() + Duration::from_millis(100);
                let tick = tokio::time::Instant::now() + Duration::from_secs(1);
                let mut pending = false;
                loop {
                    let wake = if pending { due } else { tick };
                    tokio::select! {
                        change = changes.recv() => match change {
                            Ok((id, ended)) if id == plan_id => {
                                if ended {
                                    break;
                                }
                                pending = true;
                            }
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => pending = true,
                            Err(broadcast::error::RecvError::Closed) => break,
                        },
                        _ = tokio::time::sleep_until(wake) => break,
                    }
                }
            }
        });
        rx
    }

    pub async fn fleet(&self) -> Result<pb::ListFleetResponse, CoordinatorError> {
        // Agents attach to the leader only: a follower's view would say "gone".
        self.leader_epoch()?;
        let attached = self.inner.fleet.snapshot();
        let mut out: BTreeMap<String, pb::AgentInfo> = BTreeMap::new();
        for (shard, labels, tenants, version, last_seen) in self.inner.store.agents().await? {
            let labels: BTreeMap<String, String> =
                serde_json::from_str(&labels).unwrap_or_default();
            let tenants: Vec<(String, BTreeMap<String, String>)> =
                serde_json::from_str(&tenants).unwrap_or_default();
            out.insert(
                shard.clone(),
                pb::AgentInfo {
                    shard,
                    labels: labels.into_iter().collect(),
                    tenants: tenants
                        .into_iter()
                        .map(|(name, labels)| pb::Tenant {
                            name,
                            labels: labels.into_iter().collect(),
                        })
                        .collect(),
                    connected: false,
                    last_seen_ms: last_seen as u64,
                    version,
                },
            );
        }
        for (shard, a) in attached {
            out.insert(
                shard.clone(),
                pb::AgentInfo {
                    shard,
                    labels: a.labels.into_iter().collect(),
                    tenants: a.tenants,
                    connected: true,
                    last_seen_ms: a.last_seen_ms as u64,
                    version: a.version,
                },
            );
        }
        Ok(pb::ListFleetResponse {
            agents: out.into_values().collect(),
        })
    }

    /// Plans left running by a previous coordinator: rebuilt and continued.
    pub async fn resume_unfinished(&self) -> Result<usize, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        let rows = self.inner.store.unfinished_plans().await?;
        let mut n = 0;
        for row in rows {
            // Continued already by an earlier attempt in this term.
            let id = row.id.clone();
            if self
                .to_engine(|reply| Event::Status { plan_id: id, reply })
                .await?
                .is_some()
            {
                continue;
            }
            n += 1;
            let mut run = self.rebuild(&row).await?;
            let shards: Vec<String> = run.shards.keys().cloned().collect();
            // An atomic plan is open until it ends; a group-atomic one once its
            // current unit could have started (a transaction of it may be prepared:
            // running steps are not in the store, so the leader presumes they are).
            let atomic_open = run.current_unit().is_some()
                && (run.spec.atomic || run.unit_reachable() || row.state != "running")
                && matches!(row.state.as_str(), "running" | "committing" | "aborting");
            if atomic_open {
                // The decision stands if one was written; with none, this leader
                // presumes abort (the other leader may have died mid-prepare).
                let unit_key = run.unit_key();
                let d = match self.inner.coordination.decision(&unit_key).await? {
                    Some(d) => d,
                    None => {
                        self.inner
                            .coordination
                            .decide(&unit_key, Decision::Abort, epoch)
                            .await?
                    }
                };
                crate::metrics::decision(d == Decision::Commit);
                info!(plan = %row.id, unit = %unit_key, decision = d.as_str(), "resuming an atomic plan under its decision");
                run.decision = Some(d == Decision::Commit);
                run.state = if d == Decision::Commit {
                    PlanState::Committing
                } else {
                    PlanState::Aborting
                };
                if d == Decision::Abort {
                    run.message = format!(
                        "{}; aborted after a change of coordinator (presumed abort)",
                        row.message
                    )
                    .trim_start_matches("; ")
                    .to_string();
                    // Stored too, or the plan's status would show them pending for good.
                    let updates = run.halt_pending();
                    let _ = self.inner.writes.send(StoreOp::Steps {
                        plan_id: row.id.clone(),
                        updates,
                    });
                }
                let _ = self
                    .to_engine(|done| Event::Start {
                        run: Box::new(run),
                        done,
                    })
                    .await?;
            } else if row.state != "running" {
                // It was undoing: undo again; the journal makes that harmless.
                run.state = crate::engine::plan_run::PlanState::Completed;
                run.message = row.message.clone();
                let (id, actor) = (row.id.clone(), "coordinator".to_string());
                let _ = self
                    .to_engine(|reply| Event::Command {
                        plan_id: id,
                        kind: CommandKind::Rollback,
                        actor,
                        reason: "resuming a rollback after restart".into(),
                        revive: Some(Box::new(run)),
                        reply,
                    })
                    .await?;
            } else {
                info!(plan = %row.id, "resuming plan left running");
                let _ = self
                    .to_engine(|done| Event::Start {
                        run: Box::new(run),
                        done,
                    })
                    .await?;
            }
            // A new leader re-takes the plan's locks (adopting its lease) before
            // anything is sent for it.
            self.take_locks(row.id.clone(), shards, epoch);
        }
        Ok(n)
    }
}

pub fn is_terminal(state: &str) -> bool {
    matches!(
        state,
        "completed" | "failed" | "rolled_back" | "rollback_failed" | "cancelled"
    )
}

fn new_plan_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("p{}", &u[..10])
}

/// Refuses a plan whose data migration cannot run on one of its targets, as the preflight
/// found it (table missing, key column missing, key not unique or of a type that cannot
/// order batches), naming the migration, the targets and the problem: nothing has run yet.
/// A missing table or column, or a key without a unique index, is let through when an
/// earlier migration of the plan mentions the name (it may create it); the agent checks
/// again before the first batch.
fn check_data_problems(
    spec: &PlanSpec,
    expansion: &planner::Expansion,
    problems: &BTreeMap<(String, String, String), pb::DataProblem>,
) -> Result<(), CoordinatorError> {
    if problems.is_empty() {
        return Ok(());
    }
    let graph = MigrationGraph::build(spec)?;
    let mut found: BTreeMap<usize, (Vec<String>, &pb::DataProblem)> = BTreeMap::new();
    for s in &expansion.steps {
        let m = &spec.migrations[s.migration];
        if m.data.is_none() {
            continue;
        }
        let target = &expansion.targets[s.target];
        let Some(p) = problems.get(&(
            m.id.to_string(),
            target.shard.clone(),
            target.tenant.clone(),
        )) else {
            continue;
        };
        // an earlier step may create what is missing, or the unique index (or the type) a
        // key needs
        let exempt = !p.name.is_empty()
            && match p.kind.as_str() {
                "no_table" | "no_column" => may_create(spec, &graph, s.migration, &p.name, &[]),
                "shape" => may_create(
                    spec,
                    &graph,
                    s.migration,
                    &p.name,
                    &["unique", "primary", "type"],
                ),
                _ => false,
            };
        if exempt {
            continue;
        }
        let entry = found.entry(s.migration).or_insert_with(|| (Vec::new(), p));
        entry.0.push(target.to_string());
    }
    let Some((&i, (targets, p))) = found.iter().next() else {
        return Ok(());
    };
    let m = &spec.migrations[i];
    let shown: Vec<&str> = targets.iter().take(5).map(String::as_str).collect();
    Err(CoordinatorError::Rejected(format!(
        "data migration `{}` ({}) cannot run on {}{}: {}; nothing was changed",
        m.id,
        m.source,
        shown.join(", "),
        if targets.len() > 5 {
            format!(" and {} more targets", targets.len() - 5)
        } else {
            String::new()
        },
        p.message
    )))
}

/// Whether the up SQL of a migration that `i` waits for (directly or not) mentions `name`
/// as a word (and, when `also` is not empty, one of those words too): it may create that
/// table or column, or the table's unique index. The migration's own up SQL does not count:
/// the agent checks the key before running it.
fn may_create(
    spec: &PlanSpec,
    graph: &MigrationGraph,
    i: usize,
    name: &str,
    also: &[&str],
) -> bool {
    let mut seen = vec![false; spec.migrations.len()];
    let mut stack = vec![i];
    while let Some(j) = stack.pop() {
        if std::mem::replace(&mut seen[j], true) {
            continue;
        }
        let up = &spec.migrations[j].up_sql;
        if j != i && mentions(up, name) && (also.is_empty() || also.iter().any(|w| mentions(up, w)))
        {
            return true;
        }
        stack.extend(graph.deps[j].iter().copied());
    }
    false
}

/// `name` (an unquoted identifier, lower case) as a whole word of `sql`, case-insensitively.
fn mentions(sql: &str, name: &str) -> bool {
    let sql = sql.to_ascii_lowercase();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$';
    sql.match_indices(name).any(|(at, _)| {
        let before = sql[..at].chars().next_back();
        let after = sql[at + name.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}
