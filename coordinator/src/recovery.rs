//! Recovery: a new leader (or a restarted coordinator) rebuilds every unfinished plan
//! from the control store and continues it; the agents' journals turn repeats into
//! "already applied". An atomic unit that may have started continues under its decision
//! in etcd, and with none this leader presumes abort (DESIGN invariants 3 and 4).
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use flotilla_core::dag::MigrationGraph;
use flotilla_core::protocol::Decision;
use flotilla_core::state::{PlanState, StepState};
use flotilla_core::{PlanSpec, Target, pb};
use prost::Message;
use tracing::{error, info, warn};

use crate::actor::Actor;
use crate::engine::{CommandKind, Event};
use crate::error::CoordinatorError;
use crate::plan::{PlanRun, StepStatus};
use crate::planner;
use crate::service::Coordinator;
use crate::store::{PlanRow, StoreError, StoreOp};

impl Coordinator {
    /// Rebuilds a stored plan in memory (to roll it back, or to resume it after a restart).
    pub async fn rebuild(&self, row: &PlanRow) -> Result<PlanRun, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        let corrupt = |reason: String| StoreError::Corrupt {
            plan: row.id.clone(),
            what: "spec",
            reason,
        };
        let bytes = hex::decode(&row.spec_hex).map_err(|e| corrupt(e.to_string()))?;
        let raw = pb::PlanSpec::decode(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let spec = PlanSpec::try_from(raw)?;
        let scope = spec.default_scope.unwrap_or(flotilla_core::Scope::Tenant);
        let graph = MigrationGraph::build(&spec)?;
        let rows = self.inner.store.steps(&row.id).await?;
        let mut targets: Vec<Target> = Vec::new();
        let mut target_ix: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mut exists: BTreeMap<(usize, usize), StepState> = BTreeMap::new();
        let mut wave_of: Vec<usize> = Vec::new();
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
                    wave_of.push(r.wave.max(0) as usize);
                    targets.len() - 1
                });
            if let Some(&m) = mig_ix.get(&r.migration_id) {
                exists.insert((m, t), r.state);
            }
        }
        let steps = planner::plan_steps(&spec, &graph, &targets, scope, |m, t| {
            exists.contains_key(&(m, t))
        });
        let statuses = steps
            .iter()
            .map(|s| StepStatus::from_stored(exists[&(s.migration, s.target)]))
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
        // Waves where the store left them: a bake's end is absolute, a manual gate still
        // waits, what a gate found is still shown; a new leader goes on from there.
        let stored: Vec<crate::plan::StoredWave> = self
            .inner
            .store
            .waves(&row.id)
            .await?
            .into_iter()
            .map(|w| crate::plan::StoredWave {
                state: w.state,
                bake_until_ms: w.bake_until_ms,
                gate: w.gate,
            })
            .collect();
        run.set_waves(wave_of, &stored);
        // waiting at a manual gate: says so again (a new leader's status said nothing, only
        // `waiting_for` named the gate)
        if let Some(message) = run.waiting_at_gate() {
            run.message = message;
        }
        // paused where an operator paused it (its agents hold it paused there still)
        run.paused = crate::plan::Paused::from_stored(&row.paused);
        // The failures its term before saw, from their step rows: the status of a plan
        // taken over listed none while its waves counted them, and its end said "1 step(s)
        // failed" of two.
        run.failures = rows
            .iter()
            .filter(|r| r.state == StepState::Failed)
            .map(crate::store::StepRow::failure)
            .collect();
        // Tenants the term before found gone from their shards, from their step rows: their
        // steps are not left for a retry, and the plan's end still names them.
        for r in rows
            .iter()
            .filter(|r| r.state == StepState::NotRun && r.phase == crate::plan::GONE)
        {
            if let Some(t) = run
                .targets
                .iter()
                .position(|t| t.shard == r.shard && t.tenant == r.tenant)
            {
                run.gone.insert(t);
            }
        }
        // Shards an operator cancelled while it ran, from the audit trail (a retry since
        // runs them again): before, a new leader forgot them and the plan ended `halted`
        // ("steps were not run; retry runs them") instead of cancelled. Their steps not
        // run are stored so; one out as the term ended is sent again, for its outcome,
        // and the halt after it (`agents`), as under the leader before.
        if row.state == PlanState::Running {
            for shard in self.cancelled_shards(&row.id).await? {
                if run.shards.contains_key(&shard) {
                    run.cancelled.insert(shard);
                }
            }
            // its message names them, and is how it ends (`settle`)
            if !run.cancelled.is_empty() {
                run.message = row.message.clone();
            }
        }
        run.inherited = true;
        Ok(run)
    }

    /// The shards of a running plan cancelled one by one (`plan cancel --shard`) since its
    /// submit or its last retry, as its audit trail says.
    async fn cancelled_shards(
        &self,
        plan_id: &str,
    ) -> Result<std::collections::BTreeSet<String>, CoordinatorError> {
        let mut cancelled = std::collections::BTreeSet::new();
        for (action, detail) in self.inner.store.cancels_and_retries(plan_id).await? {
            match action.as_str() {
                "retry" => cancelled.clear(),
                // "shard NAME", then ": REASON" when one was given (a shard's name holds
                // no colon nor space); a whole plan's cancel says no shard
                "cancel" => {
                    if let Some(name) = detail.strip_prefix("shard ")
                        && let Some(name) = name.split([':', ' ']).next()
                        && flotilla_core::model::validate_shard_name(name).is_ok()
                    {
                        cancelled.insert(name.to_string());
                    }
                }
                _ => {}
            }
        }
        Ok(cancelled)
    }

    /// The shards an operator forgot (`plan forget-shard`) since the plan's rollback was
    /// last asked by one (a rollback, a cancel or a retry by an operator start anew; one a
    /// new leader resumed does not), each with what the forget said.
    async fn forgotten_in_rollback(
        &self,
        plan_id: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, CoordinatorError> {
        let mut forgotten = std::collections::BTreeMap::new();
        let entries = self
            .inner
            .store
            .plan_audit(plan_id, &["rollback", "cancel", "retry", "forget-shard"])
            .await?;
        for (action, actor, detail) in entries {
            match action.as_str() {
                "forget-shard" => {
                    if let Some(name) = detail.strip_prefix("shard ")
                        && let Some(name) = name.split([':', ' ']).next()
                        && flotilla_core::model::validate_shard_name(name).is_ok()
                    {
                        forgotten.insert(name.to_string(), actor);
                    }
                }
                _ if actor != "coordinator" => forgotten.clear(),
                _ => {}
            }
        }
        Ok(forgotten)
    }

    /// Plans left running by a previous coordinator: rebuilt and continued.
    pub async fn resume_unfinished(&self) -> Result<usize, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        // Fault tests: a leader that cannot take its unfinished plans over yet (etcd or the
        // store failing as it takes over): it retries while its term lasts.
        fail::fail_point!("coordinator::resume_unfinished", |_| Err(
            crate::store::StoreError::Sql(sqlx::Error::InvalidArgument(
                "failpoint coordinator::resume_unfinished".into()
            ))
            .into()
        ));
        // A term of this process before may have left step updates the writer has not
        // stored yet (they wait up to its window), or results its engine has not handled
        // yet (queued behind the Lead event): one answer from the engine puts the writes of
        // everything before it in the writer's queue, the flush stores them, and the reads
        // below come after.
        self.to_engine(|reply| Event::Status {
            plan_id: String::new(),
            reply,
        })
        .await?;
        self.flush().await;
        // From here on the store refuses the writes of any earlier term (a deposed leader's
        // queued step updates, a plan's end it decided before it knew): what is read below
        // is what this term continues from, and nobody else changes it after.
        let space = self.inner.coordination.epoch_space();
        let fenced = self.inner.store.fence(&space, epoch).await?;
        if fenced.epoch > epoch {
            // A later leader of this space took the store over: this term is over. Or the
            // space's epochs went back (etcd restored from a snapshot, or rebuilt alike):
            // the shards' fences refuse this epoch too, and the operator must move etcd's
            // revisions past the old ones (README, Epochs and fencing).
            error!(
                epoch,
                stored = %fenced,
                "the control store was taken over under a later epoch than ours: not continuing its plans (if no other coordinator leads, etcd's revisions went back: restore it with --bump-revision)"
            );
            return Err(CoordinatorError::NotLeader { leader: None });
        }
        // Tenants a leader before kept for the catch-up after the plans under way: caught
        // up at the next completion here (they were lost with the leader that kept them).
        let kept = self.inner.store.catch_up_kept().await?;
        if !kept.is_empty() {
            let n: usize = kept.values().map(Vec::len).sum();
            info!(
                tenants = n,
                "tenants kept for a catch-up by the leader before"
            );
            // caught up at the next completion (not at once: no agent has attached to this
            // leader yet, and a catch-up worked out without their labels and journals gives
            // nothing, the review found)
            for (shard, tenants) in kept {
                self.keep_for_catch_up(&shard, tenants);
            }
        }
        // every shard of the fleet is in this term's metrics, its agent attached or not (a
        // store that does not answer here fails the takeover just below anyway)
        match self.inner.store.agents().await {
            Ok(rows) => {
                let last_seen_ms = rows
                    .into_iter()
                    .map(|a| (a.shard, a.last_seen_ms))
                    .collect();
                self.inner
                    .events
                    .send(Event::KnownAgents { last_seen_ms })
                    .await
                    .map_err(|_| CoordinatorError::ShuttingDown)?;
            }
            Err(e) => warn!("reading the fleet's shards for the metrics: {e}"),
        }
        let rows = self.inner.store.unfinished_plans().await?;
        // Plans awaiting approval are not continued (they wait on), only counted.
        self.count_awaiting().await;
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
            // An undo or a stop an operator asked for still ends by the operator.
            run.by_operator = crate::engine::by_operator(&row.message);
            let mut shards: Vec<String> = run.shards.keys().cloned().collect();
            // An atomic plan is open until it ends; a group-atomic one once its
            // current unit could have started (a transaction of it may be prepared:
            // running steps are not in the store, so the leader presumes they are).
            let atomic_open = run.current_unit().is_some()
                && (run.spec.atomic || run.unit_reachable() || row.state != PlanState::Running)
                && matches!(
                    row.state,
                    PlanState::Running | PlanState::Committing | PlanState::Aborting
                );
            if atomic_open {
                // The decision stands if one was written; with none, this leader
                // presumes abort (the other leader may have died mid-prepare).
                let unit_key = run.unit_key();
                // whether this leader presumed the abort (not one found written: an abort
                // decided before the change, now written at once, read "presumed")
                let mut presumed = false;
                let d = match self.inner.coordination.decision(&unit_key).await? {
                    Some(d) => d,
                    None => {
                        // Stored committing, its unit's steps showing the commit decided
                        // (`unit_commit_evident`): its decision was durable before that
                        // state was written (`two_phase` writes the state once `decide`
                        // answered, the steps' PREPARED before it),
                        // and its key is lost since (etcd's data wiped, or restored from a
                        // snapshot older than the decision). Presumed aborted, it was undone
                        // by down SQL where shards had committed: a plan said committed
                        // atomically, half-migrated when a down SQL failed. (A unit after
                        // the one committing, where the rebuild moved past a unit stored
                        // committed everywhere, has nothing under way: presumed aborted, as
                        // any unit with no decision.)
                        // Also a plan left committing by a coordinator from before decisions
                        // were kept in the store: it had decided commit.
                        let decided = if row.state == PlanState::Committing
                            && run.unit_commit_evident()
                        {
                            warn!(plan = %row.id, unit = %unit_key, "stored committing, but no decision in etcd (its data lost or restored from an older snapshot?): its commit decision is written again");
                            Decision::Commit
                        } else if row.state == PlanState::Committing
                            && self.inner.store.committed_before_decisions(&row.id).await?
                        {
                            info!(plan = %row.id, unit = %unit_key, "left committing by a coordinator from before the store kept decisions: its commit decision stands");
                            Decision::Commit
                        } else {
                            presumed = true;
                            Decision::Abort
                        };
                        self.inner
                            .coordination
                            .decide(&unit_key, decided, epoch)
                            .await?
                    }
                };
                crate::metrics::decision(d);
                info!(plan = %row.id, unit = %unit_key, decision = d.as_str(), "resuming an atomic plan under its decision");
                run.decision = Some(d);
                run.state = if d == Decision::Commit {
                    PlanState::Committing
                } else {
                    PlanState::Aborting
                };
                // a cancel's abort ends cancelled, as it would have under the leader before
                run.rollback_ends = match row.ends {
                    PlanState::Cancelled => PlanState::Cancelled,
                    _ => PlanState::RolledBack,
                };
                if d == Decision::Abort {
                    run.message = if presumed {
                        format!(
                            "{}; aborted when a new leader's term took it over with no commit decision written (presumed abort: the term before, of this coordinator or another, may have ended mid-prepare)",
                            row.message
                        )
                        .trim_start_matches("; ")
                        .to_string()
                    } else if row.state == PlanState::Running || row.message.is_empty() {
                        // the abort was written, and the leader before ended before its
                        // reason was stored
                        format!(
                            "{}; aborted by the decision the leader before wrote",
                            row.message
                        )
                        .trim_start_matches("; ")
                        .to_string()
                    } else {
                        row.message.clone()
                    };
                    // Stored too, or the plan's status would show them pending for good.
                    let updates = run.halt_pending();
                    self.write_under(
                        epoch,
                        StoreOp::Steps {
                            plan_id: row.id.clone(),
                            updates,
                        },
                    );
                }
                self.to_engine(|done| Event::Start {
                    run: Box::new(run),
                    done,
                })
                .await?;
            } else if row.state == PlanState::Stopping {
                // It was stopping (stop policy, cancel, halt): the runs in flight went with
                // the old leader and the journals hold what they did; no new step starts,
                // and it ends as it was going to. Nothing applied is undone.
                run.message = row.message.clone();
                run.rollback_ends = row.ends;
                let updates = run.halt_pending();
                run.state = PlanState::Stopping;
                self.write_under(
                    epoch,
                    StoreOp::Steps {
                        plan_id: row.id.clone(),
                        updates,
                    },
                );
                info!(plan = %row.id, ends = row.ends.as_str(), "finishing the stop of a plan left stopping");
                self.to_engine(|done| Event::Start {
                    run: Box::new(run),
                    done,
                })
                .await?;
            } else if matches!(row.state, PlanState::RollingBack | PlanState::Aborting) {
                // It was undoing: undo again; the journal makes that harmless. (Not a plan
                // left committing with no unit left: every unit's steps are stored
                // applied, its last decision carried out before the state was written.
                // Undone, a plan that applied everywhere ended rolled back.)
                run.state = PlanState::Completed;
                run.message = row.message.clone();
                // a cancel's undo ends cancelled; any other, rolled back
                run.rollback_ends = match row.ends {
                    PlanState::Cancelled => PlanState::Cancelled,
                    _ => PlanState::RolledBack,
                };
                // A shard with nothing of the plan left to undo, as its steps are stored
                // (undone, not run, another plan's), had its undo confirmed and let go of
                // its lock, which another plan may hold now: it is neither locked nor asked
                // again (re-taken, it was taken from that plan once its lease expired with
                // the leader before). A shard left to an abort (its agent lost) is not one:
                // its transactions of the unit are told the abort when its agent is back.
                if row.state == PlanState::RollingBack {
                    let stored = self.inner.store.steps(&row.id).await?;
                    let left: BTreeSet<&str> = stored
                        .iter()
                        .filter(|r| {
                            r.state == StepState::NotRun
                                && r.message.starts_with(&crate::plan::left_prefix(&r.shard))
                        })
                        .map(|r| r.shard.as_str())
                        .collect();
                    let open: BTreeSet<String> = run
                        .shards
                        .keys()
                        .filter(|name| run.may_hold_undo(name))
                        .cloned()
                        .collect();
                    // A shard an operator forgot while the plan rolled back (`plan
                    // forget-shard`): not waited for again (a new leader took its lock and
                    // waited for its agent for good); its steps' failures, stored with
                    // them (they stay applied), are the plan's again, and it ends
                    // rollback_failed as under the leader before.
                    let forgotten = self.forgotten_in_rollback(&row.id).await?;
                    for (shard, by) in &forgotten {
                        let said: Vec<pb::StepFailure> = stored
                            .iter()
                            .filter(|r| {
                                &r.shard == shard && r.phase == "down" && !r.message.is_empty()
                            })
                            .map(crate::store::StepRow::failure)
                            .collect();
                        if said.is_empty() {
                            run.failures.push(pb::StepFailure {
                                migration_id: String::new(),
                                target: Some(pb::TargetRef {
                                    shard: shard.clone(),
                                    tenant: String::new(),
                                }),
                                error: Some(pb::StepError {
                                    phase: "down".into(),
                                    message: format!(
                                        "shard {shard} forgotten by {by} while the plan rolled back: what the plan applied there is not undone"
                                    ),
                                    ..Default::default()
                                }),
                            });
                        }
                        run.failures.extend(said);
                    }
                    if !forgotten.is_empty() {
                        run.rollback_errors += 1;
                    }
                    for (name, sr) in run.shards.iter_mut() {
                        if forgotten.contains_key(name) {
                            run.undone_before.insert(name.clone());
                        } else if left.contains(name.as_str()) {
                            sr.left = true;
                        } else if !open.contains(name) {
                            run.undone_before.insert(name.clone());
                        }
                    }
                    shards.retain(|s| !run.undone_before.contains(s));
                }
                let id = row.id.clone();
                let resumed = self
                    .to_engine(|reply| Event::Command {
                        plan_id: id,
                        kind: CommandKind::Rollback,
                        actor: Actor::new(
                            "coordinator",
                            &format!("{} {epoch}", crate::engine::RESUMED_BY),
                        ),
                        revive: Some(Box::new(run)),
                        reply,
                    })
                    .await?;
                if let Err(e) = resumed {
                    warn!(plan = %row.id, "cannot resume its rollback: {e}");
                }
            } else {
                info!(plan = %row.id, state = %row.state, "resuming plan left running");
                self.to_engine(|done| Event::Start {
                    run: Box::new(run),
                    done,
                })
                .await?;
            }
            // A new leader re-takes the plan's locks (adopting its lease) before
            // anything is sent for it.
            // in the order they queued under the term before: by submit, or by when they
            // were asked for again (a retry, an approval)
            let queued = self.inner.store.queued_at(&row.id).await?.unwrap_or(0);
            let order = row.created_at_ms.max(queued);
            self.take_locks(row.id.clone(), shards, epoch, order);
        }
        Ok(n)
    }
}
