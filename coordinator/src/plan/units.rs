//! Atomic units: an atomic plan is one unit, a plan with atomic parallel groups has one
//! per group, committed in order. A unit's steps end in PREPARE on their shards; once all
//! are prepared the engine writes the unit's decision in etcd and the shards resolve.
use std::collections::BTreeSet;

use flotilla_core::pb;
use flotilla_core::protocol::{Decision, gid};

use super::{PlanRun, PlanState, StepStatus};
use crate::store::StepUpdate;

impl PlanRun {
    /// The atomic unit now in progress, if any is left.
    pub fn current_unit(&self) -> Option<usize> {
        self.units.get(self.unit_pos).copied()
    }

    /// How many atomic units the plan has moved past (committed, or nothing to prepare).
    pub fn units_behind(&self) -> usize {
        self.unit_pos
    }

    /// The decision key of the current unit: the plan id for an atomic plan,
    /// `<plan>.g<N>` for its atomic parallel group N (plan ids hold no dot).
    pub fn unit_key(&self) -> String {
        match self.current_unit() {
            Some(g) if !self.spec.atomic => gid::group_unit(&self.id, g),
            _ => self.id.clone(),
        }
    }

    /// Whether step `s` belongs to the unit in progress.
    pub fn in_unit(&self, s: usize) -> bool {
        self.unit_of[s].is_some() && self.unit_of[s] == self.current_unit()
    }

    /// The steps of the unit in progress (none when no unit is left).
    pub(super) fn unit_steps(&self) -> impl Iterator<Item = usize> + '_ {
        let any = self.current_unit().is_some();
        (0..self.steps.len()).filter(move |&s| any && self.in_unit(s))
    }

    /// A step of a later atomic unit: it waits until the units before it committed.
    pub(super) fn waits_for_unit(&self, s: usize) -> bool {
        self.unit_of[s].is_some() && !self.in_unit(s)
    }

    /// Every step of the current unit committed (or was there already).
    pub(super) fn unit_committed(&self) -> bool {
        self.unit_steps().all(|s| {
            matches!(
                self.steps[s].status,
                StepStatus::Applied | StepStatus::AlreadyApplied
            )
        })
    }

    /// Whether the stored steps of the current unit show its commit decided, or make one
    /// sound whoever writes it: a transactional step of it committed (stored applied: only
    /// COMMIT PREPARED makes one so, and only under a commit decision), or every step of
    /// it stored prepared or committed (or there already), one at least, the steps of a
    /// shard forgotten under the commit (`forget_shard`: failed in phase `commit`) aside.
    /// Not a unit with some targets prepared and the rest not heard of: a rebuild's current
    /// unit may be the one after the unit stored `committing` (the plan's `running` between
    /// them not stored), its targets half prepared when its leader died, and a commit
    /// written for it would commit them and leave the rest. Nor the next unit, not begun,
    /// when the one before was stored committed everywhere.
    pub fn unit_commit_evident(&self) -> bool {
        let committed = self
            .unit_steps()
            .any(|s| self.steps[s].status == StepStatus::Applied && self.steps[s].transactional);
        let forgotten = |s: usize| {
            self.steps[s].status == StepStatus::Failed && self.failed_in_phase(s, "commit")
        };
        let everywhere = self.unit_steps().any(|s| {
            matches!(
                self.steps[s].status,
                StepStatus::Prepared | StepStatus::Applied
            )
        }) && self
            .unit_steps()
            .all(|s| self.steps[s].status.done() || forgotten(s));
        committed || everywhere
    }

    /// Whether step `s` has a recorded failure in `phase`.
    fn failed_in_phase(&self, s: usize, phase: &str) -> bool {
        let target = &self.targets[self.steps[s].target];
        let id = self.spec.migrations[self.steps[s].migration].id.as_str();
        self.failures.iter().any(|f| {
            f.migration_id == id
                && f.target
                    .as_ref()
                    .is_some_and(|t| t.shard == target.shard && t.tenant == target.tenant)
                && f.error.as_ref().is_some_and(|e| e.phase == phase)
        })
    }

    /// Whether a step of the current unit could have been handed out: one is past
    /// pending, or one waits for nothing.
    pub fn unit_reachable(&self) -> bool {
        self.unit_steps()
            .any(|s| self.steps[s].status != StepStatus::Pending || self.remaining[s] == 0)
    }

    /// Group-atomic plans: moves past a unit that committed (its decision resolved on
    /// every shard, or nothing of it needed one) and lets the next steps go. Returns
    /// the message to record when a unit was left behind.
    pub fn advance_unit(&mut self) -> Option<String> {
        if self.spec.atomic || self.current_unit().is_none() {
            return None;
        }
        // a unit with a shard forgotten ends the plan (`settle`)
        let decided = self.state == PlanState::Committing
            && self.all_resolved()
            && self.forgotten_shards().is_empty();
        let clean = self.state == PlanState::Running && self.unit_committed();
        if !decided && !clean {
            return None;
        }
        let g = self.current_unit().expect("unit");
        let message = if decided {
            format!(
                "parallel group {} committed atomically on {} shards ({})",
                g + 1,
                self.shards_of_unit(),
                self.window_report()
            )
        } else {
            format!(
                "parallel group {}: nothing to prepare (already applied)",
                g + 1
            )
        };
        self.unit_pos += 1;
        self.unit_unverified = self.inherited && self.current_unit().is_some();
        self.state = PlanState::Running;
        self.decision = None;
        self.decision_lost = false;
        self.first_prepared = None;
        self.two_phase_clock = super::timings::TwoPhaseClock::default();
        for sr in self.shards.values_mut() {
            sr.prepared.clear();
            sr.resolved = false;
            sr.resolve_sent_on = None;
            sr.resolve_retry_at = None;
        }
        self.recount_remaining();
        for t in 0..self.targets.len() {
            self.enqueue_if_ready(t);
        }
        self.message = message.clone();
        Some(message)
    }

    /// The window in which every shard held the unit's locks (first PREPARE to last
    /// COMMIT PREPARED), recorded as a metric; unknown when the coordinator changed
    /// during it (the new one never saw the first PREPARE).
    pub(super) fn window_report(&self) -> String {
        if let Some(t) = self.two_phase_clock.report() {
            crate::metrics::two_phase_timings(&t);
            return t.describe();
        }
        match self.first_prepared {
            Some(t) => {
                let window = t.elapsed();
                crate::metrics::two_phase_window(window);
                format!(
                    "first PREPARE to last COMMIT PREPARED: {:.3}s",
                    window.as_secs_f64()
                )
            }
            None => "the prepare window is not known: the coordinator changed during it".into(),
        }
    }

    pub(super) fn shards_of_unit(&self) -> usize {
        self.unit_steps()
            .map(|s| self.targets[self.steps[s].target].shard.as_str())
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Atomic plans: every step prepared or applied, nothing out, nothing failed.
    pub fn ready_to_commit(&self) -> bool {
        // "any prepared" also says the unit is not empty
        self.state == PlanState::Running
            && self.unit_steps().all(|s| self.steps[s].status.done())
            && self
                .unit_steps()
                .any(|s| self.steps[s].status == StepStatus::Prepared)
    }

    /// The Resolve message for a shard's prepared transactions, if it has any left: the
    /// earliest prepared first. Each target holds its locks from its PREPARE until its
    /// COMMIT PREPARED, and the agent resolves them in this order on its connections, so the
    /// ones that waited longest for the rest of the unit wait least for their commit (in the
    /// gids' own order, run 10 came before run 9 and a shard's first target could be its last
    /// committed). Those of unknown time (a result resent after a takeover) go last.
    pub fn resolve_for(&self, shard: &str, decision: Decision) -> Option<pb::Resolve> {
        let sr = self.shards.get(shard)?;
        (!sr.prepared.is_empty() && !sr.resolved).then(|| {
            let mut gids: Vec<String> = sr.prepared.keys().cloned().collect();
            gids.sort_by_key(|g| {
                self.two_phase_clock
                    .prepared_at(g)
                    .filter(|&at| at > 0)
                    .unwrap_or(i64::MAX)
            });
            pb::Resolve {
                plan_id: self.id.clone(),
                commit: decision.is_commit(),
                epoch: self.epoch,
                gids,
            }
        })
    }

    /// Records a shard's answer to a Resolve: its prepared steps are applied
    /// (commit) or not run (abort).
    pub fn apply_resolve_reply(
        &mut self,
        shard: &str,
        reply: &pb::ResolveReply,
    ) -> Vec<StepUpdate> {
        let mut updates = Vec::new();
        // A reply settles the unit deciding now, under its decision, once: a late or
        // repeated one (the Resolve sent again on a new stream while the answer to the
        // first waited in the agent's outbox) may come after the unit committed and the
        // next one began, and must not settle the next unit's steps on the shard.
        let unit = self.unit_key();
        let names_this_unit = !(reply.resolved.is_empty() && reply.failed.is_empty())
            && reply
                .resolved
                .iter()
                .chain(&reply.failed)
                .all(|g| gid::unit_of(g) == Some(unit.as_str()));
        let Some(sr) = self.shards.get_mut(shard) else {
            return updates;
        };
        if sr.resolved
            || !names_this_unit
            || self.decision.map(|d| d.is_commit()) != Some(reply.commit)
        {
            tracing::info!(plan = %self.id, shard, unit = %unit, commit = reply.commit,
                           "a resolve reply that is not this unit's answer (late or repeated): ignored");
            return updates;
        }
        let mut done_steps = Vec::new();
        if reply.commit {
            self.two_phase_clock.heard(reply.received_at_us);
        }
        for (i, gid) in reply.resolved.iter().enumerate() {
            if reply.commit {
                let at = reply.resolved_at_us.get(i).copied().unwrap_or(0);
                self.two_phase_clock.resolved(gid, at);
            }
            if let Some(steps) = sr.prepared.remove(gid) {
                done_steps.extend(steps);
            }
        }
        let all_done = sr.prepared.is_empty();
        if reply.commit
            && reply
                .failed
                .iter()
                .any(|f| f.contains(flotilla_core::protocol::NO_DECISION_KEY))
        {
            self.decision_lost = true;
        }
        if !all_done && !reply.failed.is_empty() {
            // Not final (the shard's etcd member down, say): asked again a little later,
            // on the engine's tick.
            sr.resolve_sent_on = None;
            sr.resolve_retry_at = Some(std::time::Instant::now() + RESOLVE_RETRY);
        }
        if all_done {
            sr.resolved = true;
            // After a takeover the gid -> steps mapping is gone: the shard's
            // answer covers every prepared step on it, and every step whose PREPARED
            // never reached the store (rebuilt pending: a decision is only written
            // once every step is prepared or applied).
            for s in 0..self.steps.len() {
                if self.steps[s].status.open()
                    && self.in_unit(s)
                    && self.targets[self.steps[s].target].shard == shard
                    && !done_steps.contains(&s)
                {
                    done_steps.push(s);
                }
            }
        }
        let status = if reply.commit {
            StepStatus::Applied
        } else {
            StepStatus::NotRun
        };
        for s in done_steps {
            self.set_status(s, status);
            updates.push(self.update_of(s, None));
        }
        if all_done {
            // What failed on earlier attempts is resolved now.
            self.failures.retain(|f| {
                !(f.migration_id.is_empty()
                    && f.target.as_ref().is_some_and(|t| t.shard == shard)
                    && f.error
                        .as_ref()
                        .is_some_and(|e| e.message.starts_with(RESOLVE_FAILED)))
            });
        }
        for f in &reply.failed {
            let message = format!("{RESOLVE_FAILED}{f}");
            let known = self.failures.iter().any(|x| {
                x.target.as_ref().is_some_and(|t| t.shard == shard)
                    && x.error.as_ref().is_some_and(|e| e.message == message)
            });
            if known {
                continue;
            }
            self.failures.push(pb::StepFailure {
                migration_id: String::new(),
                target: Some(pb::TargetRef {
                    shard: shard.to_string(),
                    tenant: String::new(),
                }),
                error: Some(pb::StepError {
                    sqlstate: String::new(),
                    message,
                    detail: String::new(),
                    phase: if reply.commit {
                        "commit".into()
                    } else {
                        "abort".into()
                    },
                }),
            });
        }
        updates
    }

    /// Whether every shard confirmed the decision for its prepared transactions. A
    /// shard with steps still open (prepared, or pending after a rebuild whose store
    /// missed their PREPARED) has to be heard from first; one left to an abort (its agent
    /// lost, `leave_abort_to_etcd`) is heard from when it is back.
    pub fn all_resolved(&self) -> bool {
        self.shards.iter().all(|(name, s)| {
            s.resolved || s.left || (s.prepared.is_empty() && !self.shard_has_open(name))
        })
    }

    /// `plan forget-shard`: a shard whose agent will not come back to commit its part of the
    /// unit (its database lost, say) stops holding the plan up. Its steps of the unit fail
    /// with `why` (the decision commits them, but nobody has seen them commit), its steps
    /// after them will not run, and the shard counts as resolved; the plan ends `failed`
    /// once the other shards have committed (`settle`). The decision stays in etcd, so an
    /// agent that does come back commits them then. Returns the store updates.
    pub fn forget_shard(&mut self, shard: &str, why: &str) -> Vec<StepUpdate> {
        let error = pb::StepError {
            sqlstate: String::new(),
            message: why.to_string(),
            detail: String::new(),
            phase: "commit".into(),
        };
        let mut updates = Vec::new();
        // Runs it had out (a migration outside the unit, running beside it) will not be
        // answered either: what they did there is as unknown as the unit's commit.
        let mut in_flight = BTreeSet::new();
        if let Some(sr) = self.shards.get_mut(shard) {
            in_flight.extend(std::mem::take(&mut sr.outstanding).into_values().flatten());
            sr.gids.clear();
        }
        for s in 0..self.steps.len() {
            let t = self.steps[s].target;
            if self.targets[t].shard != shard {
                continue;
            }
            if (self.in_unit(s) && self.steps[s].status.open()) || in_flight.contains(&s) {
                self.set_status(s, StepStatus::Failed);
                self.failures.push(pb::StepFailure {
                    migration_id: self.spec.migrations[self.steps[s].migration].id.to_string(),
                    target: Some(pb::TargetRef {
                        shard: self.targets[t].shard.clone(),
                        tenant: self.targets[t].tenant.clone(),
                    }),
                    error: Some(error.clone()),
                });
                updates.push(self.update_of(s, Some(&error)));
            } else if self.steps[s].status == StepStatus::Pending {
                self.set_status(s, StepStatus::NotRun);
                updates.push(self.update_of(s, None));
            }
        }
        if let Some(sr) = self.shards.get_mut(shard) {
            sr.resolved = true;
            sr.ready.clear();
            sr.queued.clear();
        }
        updates
    }

    /// An aborting unit's shard whose agent is lost (no stream, no liveness key, past the
    /// grace) with transactions of the unit prepared there: the abort is decided, so they can
    /// only roll back, and the other shards do not wait for them. Its steps of the unit are
    /// not run, saying so; the shard is left (`ShardRun::left`), and the plan goes on to undo
    /// what the other shards hold outside the unit (the shards done with theirs let go of
    /// their locks). Its agent back, it is told the abort as any shard is (an agent without
    /// etcd, or on the embedded backend, reads no decision by itself), and then asked for its
    /// undo: the plan ends only after. Before, the plan waited in `aborting` for the agent,
    /// every shard of it locked. Returns the store updates.
    pub fn leave_abort_to_etcd(&mut self, shard: &str, why: &str) -> Vec<StepUpdate> {
        let error = pb::StepError {
            sqlstate: String::new(),
            message: why.to_string(),
            detail: String::new(),
            phase: "abort".into(),
        };
        let mut updates = Vec::new();
        for s in 0..self.steps.len() {
            if self.steps[s].status.open()
                && self.in_unit(s)
                && self.targets[self.steps[s].target].shard == shard
            {
                self.set_status(s, StepStatus::NotRun);
                updates.push(self.update_of(s, Some(&error)));
            }
        }
        if let Some(sr) = self.shards.get_mut(shard) {
            sr.left = true;
            sr.ready.clear();
            sr.queued.clear();
        }
        updates
    }

    /// Whether the plan may hold something to undo on `shard`, as its steps' states say: a
    /// step applied, prepared, running or pending there, or a non-transactional one that
    /// failed (part-way). Not: steps undone, not run, another plan's, or a transactional
    /// step that failed (its transaction rolled back).
    pub fn may_hold_undo(&self, shard: &str) -> bool {
        self.steps
            .iter()
            .any(|s| self.targets[s.target].shard == shard && s.may_hold_undo())
    }

    /// A forgotten shard whose agent attached again while the unit still commits: the
    /// forget is undone, and the shard's part goes the way of any shard's under the
    /// decision (its agent committed it from etcd at its start, or is sent the Resolve), so
    /// the plan can end as if it had never been gone. Its steps the forget failed go back
    /// to prepared (those of the unit: the decision is commit, so each had prepared) or to
    /// pending (runs it had out beside the unit: its journal answers for what they did
    /// when they are sent again), and its steps the forget stopped to pending, unless a
    /// failure of their target or a cancel of the shard stops them anyway. Returns the
    /// store updates; none when the shard was not forgotten.
    pub fn shard_back(&mut self, shard: &str) -> Vec<StepUpdate> {
        if !self.forgotten_shards().contains(shard) {
            return Vec::new();
        }
        // Runs out beside the unit are known by their failure's message; the failure of a
        // unit step under commit is the forget's whatever it says (`forgotten_shards`).
        let forgotten = forgotten_prefix(shard);
        let failed_steps: Vec<Option<usize>> = self
            .failures
            .iter()
            .map(|f| {
                let t = f.target.as_ref().filter(|t| t.shard == shard)?;
                self.step_of(&f.migration_id, &t.shard, &t.tenant)
            })
            .collect();
        let beside: BTreeSet<usize> = self
            .failures
            .iter()
            .zip(&failed_steps)
            .filter(|(f, _)| {
                f.error
                    .as_ref()
                    .is_some_and(|e| e.message.starts_with(&forgotten))
            })
            .filter_map(|(_, s)| *s)
            .collect();
        let mut restored = BTreeSet::new();
        let mut updates = Vec::new();
        for s in 0..self.steps.len() {
            if self.targets[self.steps[s].target].shard != shard
                || self.steps[s].status != StepStatus::Failed
            {
                continue;
            }
            if self.in_unit(s) {
                self.set_status(s, StepStatus::Prepared);
            } else if beside.contains(&s) {
                self.set_status(s, StepStatus::Pending);
            } else {
                continue;
            }
            restored.insert(s);
            updates.push(self.update_of(s, None));
        }
        let mut failed_steps = failed_steps.into_iter();
        self.failures.retain(|_| {
            failed_steps
                .next()
                .flatten()
                .is_none_or(|s| !restored.contains(&s))
        });
        let cancelled = self.cancelled.contains(shard);
        for s in 0..self.steps.len() {
            let t = self.steps[s].target;
            if self.targets[t].shard == shard
                && self.steps[s].status == StepStatus::NotRun
                && !cancelled
                && !self.failed_target(t)
            {
                self.set_status(s, StepStatus::Pending);
                updates.push(self.update_of(s, None));
            }
        }
        if let Some(sr) = self.shards.get_mut(shard) {
            sr.resolved = false;
            sr.resolve_sent_on = None;
            sr.resolve_retry_at = None;
        }
        self.recount_remaining();
        let targets = self.shards.get(shard).map(|sr| sr.targets.clone());
        for t in targets.unwrap_or_default() {
            self.enqueue_if_ready(t);
        }
        updates
    }

    /// Shards forgotten while the unit committed (`forget_shard`): a failed step of a unit
    /// whose decision is commit can come from nothing else, as the unit commits only when
    /// every one of its steps prepared or applied. Also after a change of coordinator,
    /// from the steps stored failed.
    ///
    /// Known limit: a forgotten shard whose agent comes back after the plan ended commits
    /// from the decision in etcd, but the plan is not told: its steps stay failed there,
    /// and its journal (`fleet show`) is what says they applied. Back before the end, the
    /// forget is undone (`shard_back`).
    pub fn forgotten_shards(&self) -> BTreeSet<&str> {
        if self.state != PlanState::Committing {
            return BTreeSet::new();
        }
        self.unit_steps()
            .filter(|&s| self.steps[s].status == StepStatus::Failed)
            .map(|s| self.targets[self.steps[s].target].shard.as_str())
            .collect()
    }

    /// A shard with no prepared transaction of the plan left: under a commit
    /// decision its unfinished steps committed, under abort they did not.
    pub fn settle_shard_without_prepared(
        &mut self,
        shard: &str,
        decision: Decision,
    ) -> Vec<StepUpdate> {
        let mut updates = Vec::new();
        if let Some(sr) = self.shards.get_mut(shard) {
            sr.resolved = true;
        }
        for s in 0..self.steps.len() {
            if self.steps[s].status.open()
                && self.in_unit(s)
                && self.targets[self.steps[s].target].shard == shard
            {
                let status = if decision.is_commit() {
                    StepStatus::Applied
                } else {
                    StepStatus::NotRun
                };
                self.set_status(s, status);
                updates.push(self.update_of(s, None));
            }
        }
        updates
    }

    /// Whether a step on `shard` is not settled yet (prepared, pending or running).
    pub fn shard_has_open(&self, shard: &str) -> bool {
        (0..self.steps.len()).any(|s| {
            self.steps[s].status.open()
                && self.in_unit(s)
                && self.targets[self.steps[s].target].shard == shard
        })
    }
}

/// How the failure of a step the forget of `shard` failed starts (`plan forget-shard`):
/// what finds those steps again when the shard comes back, also after a change of
/// coordinator, which rebuilds the failures from the steps stored.
pub fn forgotten_prefix(shard: &str) -> String {
    format!("not confirmed: shard {shard} was forgotten by ")
}

/// How the message of a step of a shard left to an abort starts
/// (`PlanRun::leave_abort_to_etcd`): what a new leader knows such a shard by.
pub fn left_prefix(shard: &str) -> String {
    format!("the agent of shard {shard} is lost while the unit aborts")
}

/// How long after a failed Resolve a shard is asked again.
const RESOLVE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// How a failure to resolve a prepared transaction starts.
const RESOLVE_FAILED: &str = "resolving a prepared transaction: ";
