//! What agents answer, folded into the plan: run results (with the checksum check of
//! steps the journal already held), rollback replies, and a shard lost past the grace.
use flotilla_core::pb;

use super::{PlanRun, PlanState, RollbackState, StepStatus};

/// The error phase of a step an agent did not run because its tenant is gone from the
/// shard (the agent's `shard::GONE`).
pub(crate) const GONE: &str = "gone";
use crate::store::StepUpdate;

impl PlanRun {
    /// Applies one run's results; returns store updates and whether a step failed.
    pub fn apply_run_result(
        &mut self,
        shard: &str,
        result: &pb::RunResult,
    ) -> (Vec<StepUpdate>, bool) {
        let Some(steps) = self
            .shards
            .get_mut(shard)
            .and_then(|sr| sr.outstanding.remove(&result.run_id))
        else {
            // A run resent after a reconnect may come back twice; the first answer counts.
            return (Vec::new(), false);
        };
        let gid = self
            .shards
            .get_mut(shard)
            .and_then(|sr| sr.gids.remove(&result.run_id));
        let mut updates = Vec::new();
        let mut failed = false;
        let mut prepared = Vec::new();
        for s in steps {
            let spec = self.spec.clone();
            let mig = &spec.migrations[self.steps[s].migration];
            let r = result
                .steps
                .iter()
                .find(|r| r.migration_id == mig.id.as_str());
            let outcome = r
                .map(|r| pb::StepOutcome::try_from(r.outcome).unwrap_or_default())
                .unwrap_or(pb::StepOutcome::NotRun);
            let mut error = r.and_then(|r| r.error.clone());
            let status = match outcome {
                pb::StepOutcome::Applied => StepStatus::Applied,
                pb::StepOutcome::AlreadyApplied => {
                    let journal = r.map(|r| r.checksum.as_str()).unwrap_or("");
                    if !journal.is_empty() && journal != mig.checksum {
                        error = Some(pb::StepError {
                            sqlstate: String::new(),
                            message: format!(
                                "checksum mismatch: the shard's journal holds {journal} for {}, the plan has {}",
                                mig.id, mig.checksum
                            ),
                            detail: String::new(),
                            phase: "journal".into(),
                        });
                        StepStatus::Failed
                    } else if r.is_some_and(|r| r.applied_by == self.id) {
                        // This plan's own row: a run sent again after a change of leader
                        // (or whose reply was lost) that the plan applied before. Applied
                        // by it (its rollback undoes it), not found applied.
                        StepStatus::Applied
                    } else {
                        StepStatus::AlreadyApplied
                    }
                }
                pb::StepOutcome::Failed => StepStatus::Failed,
                pb::StepOutcome::Prepared => StepStatus::Prepared,
                pb::StepOutcome::NotRun | pb::StepOutcome::Unspecified
                    if error.as_ref().is_some_and(|e| e.phase == GONE) =>
                {
                    if self.in_unit(s) {
                        // An atomic unit is all its targets or none: one gone fails it (the
                        // unit aborts), the error saying why.
                        StepStatus::Failed
                    } else {
                        self.gone.insert(self.steps[s].target);
                        StepStatus::NotRun
                    }
                }
                pb::StepOutcome::NotRun | pb::StepOutcome::Unspecified => {
                    let target = &self.targets[self.steps[s].target];
                    if self.state == PlanState::Running
                        && !self.failed_target(self.steps[s].target)
                        && !self.cancelled.contains(&target.shard)
                    {
                        StepStatus::Pending
                    } else {
                        StepStatus::NotRun
                    }
                }
            };
            self.set_status(s, status);
            self.end_lock_wait(s);
            if status != StepStatus::Pending && status != StepStatus::Prepared {
                self.end_progress(s);
            }
            let target = self.targets[self.steps[s].target].clone();
            if status == StepStatus::Failed {
                failed = true;
                self.failures.push(pb::StepFailure {
                    migration_id: mig.id.to_string(),
                    target: Some(pb::TargetRef {
                        shard: target.shard.clone(),
                        tenant: target.tenant.clone(),
                    }),
                    error: error.clone(),
                });
            }
            if status.done() {
                for i in 0..self.dependents[s].len() {
                    let d = self.dependents[s][i];
                    if !self.releases(s, d) {
                        continue;
                    }
                    self.remaining[d] -= 1;
                    if self.remaining[d] == 0 {
                        let dt = self.steps[d].target;
                        self.enqueue_if_ready(dt);
                    }
                }
            }
            // (a step that added an enum value held back the target's steps after it,
            // dependent or not: see `form_runs`)
            if status == StepStatus::Pending
                || (status.done() && self.adds_enum_value[self.steps[s].migration])
            {
                self.enqueue_if_ready(self.steps[s].target);
            }
            let e = error.unwrap_or_default();
            updates.push(StepUpdate {
                migration_id: mig.id.to_string(),
                shard: target.shard,
                tenant: target.tenant,
                state: status.state(),
                sqlstate: e.sqlstate,
                message: e.message,
                phase: e.phase,
                detail: e.detail,
                duration_ms: r.map(|r| r.duration_ms as i64).unwrap_or(0),
                run_id: Some(result.run_id as i64),
            });
            if status == StepStatus::Prepared {
                prepared.push(s);
            }
        }
        if let (Some(gid), false) = (gid, prepared.is_empty()) {
            self.first_prepared
                .get_or_insert_with(std::time::Instant::now);
            let run_us = result
                .steps
                .iter()
                .map(|r| r.duration_ms as i64 * 1000)
                .sum();
            self.two_phase_clock
                .prepared(&gid, result.prepared_at_us, run_us);
            if let Some(sr) = self.shards.get_mut(shard) {
                sr.prepared.insert(gid, prepared);
                if self.decision.is_some() {
                    // Prepared after its unit's abort was written (a run in flight then):
                    // the shard is resolved again, this gid with it.
                    sr.resolved = false;
                    sr.resolve_sent_on = None;
                    sr.resolve_retry_at = None;
                }
            }
        }
        (updates, failed)
    }

    pub(super) fn failed_target(&self, t: usize) -> bool {
        self.per_target[t]
            .iter()
            .any(|&s| self.steps[s].status == StepStatus::Failed)
    }

    /// Records a shard's rollback reply; returns store updates.
    pub fn apply_rollback_reply(
        &mut self,
        shard: &str,
        reply: &pb::RollbackReply,
    ) -> Vec<StepUpdate> {
        let mut updates = Vec::new();
        // The answer to the request out now (or from an agent that does not tell which it
        // answers). An earlier request's, sent again after its stream broke while this
        // answer waited in the agent's outbox: the steps it undid are undone, but its
        // errors and whether it is complete are not this request's to say.
        let current = self.shards.get(shard).is_some_and(|sr| {
            matches!(sr.rollback, RollbackState::Asked { request, .. }
                if reply.request == 0 || reply.request == request)
        });
        for rb in &reply.steps {
            let s = self.step_of(&rb.migration_id, shard, &rb.tenant);
            // its undo's wait for a lock, if it showed one, is over either way
            if let Some(s) = s {
                self.end_lock_wait(s);
            }
            match (&rb.error, s) {
                // A tenant gone from its shard (its schema dropped): nothing of the plan is
                // left there, so its step counts as undone, with why (not a failure of the
                // rollback: one stayed rollback_failed for good, its down SQL finding no
                // tables to undo).
                (Some(e), Some(s)) if e.phase == GONE => {
                    tracing::info!(plan = %self.id, shard, tenant = %rb.tenant,
                                   migration = %rb.migration_id, "{}", e.message);
                    self.set_status(s, StepStatus::RolledBack);
                    updates.push(self.update_of(s, Some(e)));
                }
                (Some(e), None) if e.phase == GONE => {}
                (Some(_), _) if !current => {}
                (Some(e), _) => {
                    self.rollback_errors += 1;
                    self.failures.push(pb::StepFailure {
                        migration_id: rb.migration_id.clone(),
                        target: Some(pb::TargetRef {
                            shard: shard.into(),
                            tenant: rb.tenant.clone(),
                        }),
                        error: Some(pb::StepError {
                            phase: "down".into(),
                            ..e.clone()
                        }),
                    });
                    if let Some(s) = s {
                        updates.push(self.update_of(s, Some(e)));
                    }
                }
                (None, Some(s)) => {
                    // A step that failed part-way and is now undone keeps its failure in
                    // the store: the plan's status, read from there once it ended, still
                    // says what failed (the rows' message would be cleared otherwise).
                    let failed = (self.steps[s].status == StepStatus::Failed)
                        .then(|| {
                            // its run's failure, not an earlier rollback's ("down")
                            self.failures.iter().rev().find(|f| {
                                f.migration_id == rb.migration_id
                                    && f.target
                                        .as_ref()
                                        .is_some_and(|t| t.shard == shard && t.tenant == rb.tenant)
                                    && f.error.as_ref().is_some_and(|e| e.phase != "down")
                            })
                        })
                        .flatten()
                        .and_then(|f| f.error.clone());
                    // (once a step: a reply sent again after a broken stream names it again)
                    if rb.rows_kept > 0 && self.steps[s].status != StepStatus::RolledBack {
                        let kept = self.rows_kept.entry(rb.migration_id.clone()).or_default();
                        *kept = (kept.0 + rb.rows_kept, kept.1 + 1);
                    }
                    self.set_status(s, StepStatus::RolledBack);
                    updates.push(self.update_of(s, failed.as_ref()));
                    // Its data change is undone: the rows and checkpoint it reported are not
                    // there any more (the status said "1000/20000 rows, stopped", part-way at
                    // a checkpoint a new submit goes on from, of targets fully restored).
                    self.progress.remove(&(
                        rb.migration_id.clone(),
                        shard.to_string(),
                        rb.tenant.clone(),
                    ));
                }
                (None, None) => {}
            }
        }
        if !current {
            tracing::info!(plan = %self.id, shard, request = reply.request,
                           "a rollback reply to an earlier request: its undone steps taken, the rest ignored");
            return updates;
        }
        if reply.complete {
            // every undo there over: a lock wait one showed is too (its own reply may have
            // been lost with an agent that stopped, the next one naming no step)
            self.progress
                .retain(|(_, s, _), p| s != shard || p.state != flotilla_core::protocol::LOCK_WAIT);
        }
        if let Some(sr) = self.shards.get_mut(shard) {
            if reply.complete {
                sr.rollback = RollbackState::Done;
                // The agent finished every run of the plan before undoing it.
                let lost: Vec<usize> = std::mem::take(&mut sr.outstanding)
                    .into_values()
                    .flatten()
                    .collect();
                for s in lost {
                    if matches!(self.steps[s].status, StepStatus::Running(_)) {
                        self.set_status(s, StepStatus::NotRun);
                        updates.push(self.update_of(s, None));
                    }
                }
                // Nothing of the plan is applied here, as its journal says: a step still
                // counted applied was undone by an agent whose reply was lost as it stopped
                // (the one after it found nothing to undo, and the plan ended rolled_back
                // with "3/12 done"). Not when the reply names an undo that failed.
                let clean = reply
                    .steps
                    .iter()
                    .all(|rb| rb.error.as_ref().is_none_or(|e| e.phase == GONE));
                let here: Vec<usize> = (0..self.targets.len())
                    .filter(|_| clean)
                    .filter(|&t| self.targets[t].shard == shard)
                    .flat_map(|t| self.per_target[t].iter().copied())
                    .filter(|&s| self.steps[s].status == StepStatus::Applied)
                    .collect();
                for s in here {
                    self.set_status(s, StepStatus::RolledBack);
                    updates.push(self.update_of(s, None));
                }
            } else {
                // Something could not be undone: the operator has to look.
                sr.rollback = RollbackState::Done;
                self.rollback_errors = self.rollback_errors.max(1);
            }
        }
        updates
    }

    /// A shard whose agent is gone past the grace: its runs in flight fail, so
    /// the plan's policy decides (the journal still tells, when it returns,
    /// what those runs really did).
    /// A shard forgotten while the plan rolls back (`plan forget-shard`): its undo is not
    /// waited for. Each step that may hold something there (`may_hold_undo`) is a rollback
    /// error, its failure saying `why` (stored with the step, so the ended plan's status
    /// still says it); so is a shard left to an atomic unit's abort, its transactions of
    /// the unit prepared there. The plan then ends `rollback_failed`, not `rolled_back`.
    pub fn forget_undo(&mut self, shard: &str, why: &str) -> Vec<StepUpdate> {
        let Some(sr) = self.shards.get_mut(shard) else {
            return Vec::new();
        };
        sr.rollback = RollbackState::Done;
        let left = std::mem::take(&mut sr.left);
        let error = pb::StepError {
            phase: "down".into(),
            message: why.to_string(),
            ..Default::default()
        };
        let kept: Vec<usize> = (0..self.steps.len())
            .filter(|&s| {
                self.targets[self.steps[s].target].shard == shard && self.steps[s].may_hold_undo()
            })
            .collect();
        let mut updates = Vec::new();
        for &s in &kept {
            let t = &self.targets[self.steps[s].target];
            self.failures.push(pb::StepFailure {
                migration_id: self.spec.migrations[self.steps[s].migration].id.to_string(),
                target: Some(pb::TargetRef {
                    shard: t.shard.clone(),
                    tenant: t.tenant.clone(),
                }),
                error: Some(error.clone()),
            });
            updates.push(self.update_of(s, Some(&error)));
        }
        if left && kept.is_empty() {
            self.failures.push(pb::StepFailure {
                migration_id: String::new(),
                target: Some(pb::TargetRef {
                    shard: shard.into(),
                    tenant: String::new(),
                }),
                error: Some(error),
            });
        }
        if left || !kept.is_empty() {
            self.rollback_errors += 1;
        }
        updates
    }

    pub fn fail_lost_shard(&mut self, shard: &str, reason: &str) -> (Vec<StepUpdate>, bool) {
        let Some(sr) = self.shards.get_mut(shard) else {
            return (Vec::new(), false);
        };
        let lost: Vec<usize> = std::mem::take(&mut sr.outstanding)
            .into_values()
            .flatten()
            .collect();
        let mut updates = Vec::new();
        let error = pb::StepError {
            sqlstate: String::new(),
            message: reason.to_string(),
            detail: String::new(),
            phase: "agent".into(),
        };
        for s in &lost {
            self.set_status(*s, StepStatus::Failed);
            let t = &self.targets[self.steps[*s].target];
            self.failures.push(pb::StepFailure {
                migration_id: self.spec.migrations[self.steps[*s].migration]
                    .id
                    .to_string(),
                target: Some(pb::TargetRef {
                    shard: t.shard.clone(),
                    tenant: t.tenant.clone(),
                }),
                error: Some(error.clone()),
            });
            updates.push(self.update_of(*s, Some(&error)));
        }
        (updates, !lost.is_empty())
    }
}
