//! Halting a plan (or one shard of it) and deciding where it ends.
use flotilla_core::FailurePolicy;

use super::{PlanRun, PlanState, RollbackState, StepStatus};
use crate::store::StepUpdate;

impl PlanRun {
    /// Cancels one shard of the plan: its pending steps will not run (those in flight end at
    /// their next batch boundary or when done).
    pub fn halt_shard(&mut self, shard: &str) -> Vec<StepUpdate> {
        self.cancelled.insert(shard.to_string());
        let mut updates = Vec::new();
        for s in 0..self.steps.len() {
            if self.steps[s].status == StepStatus::Pending
                && self.targets[self.steps[s].target].shard == shard
            {
                self.set_status(s, StepStatus::NotRun);
                updates.push(self.update_of(s, None));
            }
        }
        if let Some(sr) = self.shards.get_mut(shard) {
            sr.ready.clear();
            sr.queued.clear();
        }
        updates
    }

    /// Whether a shard other than `shard`, not cancelled, has steps open.
    pub fn others_go_on(&self, shard: &str) -> bool {
        self.steps.iter().any(|step| {
            let on = &self.targets[step.target].shard;
            step.status.open() && on != shard && !self.cancelled.contains(on)
        })
    }

    pub fn halt_pending(&mut self) -> Vec<StepUpdate> {
        let mut updates = Vec::new();
        for s in 0..self.steps.len() {
            if self.steps[s].status == StepStatus::Pending {
                self.set_status(s, StepStatus::NotRun);
                updates.push(self.update_of(s, None));
            }
        }
        for sr in self.shards.values_mut() {
            sr.ready.clear();
            sr.queued.clear();
        }
        updates
    }

    /// Before anything of the plan ran: the steps its submit found applied go back to
    /// pending, to be run again, which the agents answer from their journals (applied
    /// still: already applied; undone since: run). For a plan that waited for another's
    /// shard locks, that awaited approval, or whose submit read the journals before an
    /// agent's rollback reply came in: what the submit read may have been undone meanwhile
    /// (another plan rolled back), and the plan reported those targets applied, ending
    /// `completed` with them unmigrated. The store updates.
    pub fn recheck_applied(&mut self) -> Vec<StepUpdate> {
        let mut updates = Vec::new();
        // Only in waves still to run, or the one running: a wave passed (a retry, a plan
        // rebuilt at its gate) is not gone back to, and its steps made pending would never
        // run (the plan ended halted over them).
        let running = self
            .current_wave()
            .is_some_and(|w| w.state == flotilla_core::state::WaveState::Running);
        let ahead = |run: &Self, t: usize| match run.wave_of.get(t) {
            None => running,
            Some(&w) => w > run.wave_pos || (w == run.wave_pos && running),
        };
        for s in 0..self.steps.len() {
            if self.steps[s].status == StepStatus::AlreadyApplied
                && ahead(self, self.steps[s].target)
            {
                self.set_status(s, StepStatus::Pending);
                updates.push(self.update_of(s, None));
            }
        }
        if !updates.is_empty() {
            self.recount_remaining();
            self.requeue_ready();
        }
        updates
    }

    /// Whether nothing of the plan was sent to a shard yet (every step pending, or found
    /// applied by the submit).
    pub fn untouched(&self) -> bool {
        self.steps
            .iter()
            .all(|s| matches!(s.status, StepStatus::Pending | StepStatus::AlreadyApplied))
    }

    /// Stopped (cancelled, rolled back, halted) before it held its shard locks, in this
    /// term, with nothing of its own applied: nothing of it was sent to a shard (nothing is
    /// before the locks). Not a plan a new leader rebuilt, whose term before may have run
    /// it, nor one retried with steps applied before.
    pub fn stopped_before_its_locks(&self) -> bool {
        !self.locked
            && !self.inherited
            && self.outstanding() == 0
            && matches!(
                self.state,
                PlanState::Stopping | PlanState::RollingBack | PlanState::Aborting
            )
            && self.steps.iter().all(|s| {
                matches!(
                    s.status,
                    StepStatus::Pending | StepStatus::NotRun | StepStatus::AlreadyApplied
                )
            })
    }

    /// Ends what [`Self::stopped_before_its_locks`] said: no shard has anything to undo,
    /// and no unit a decision to carry out; `settle` gives its end.
    pub fn end_before_its_locks(&mut self) {
        for sr in self.shards.values_mut() {
            sr.rollback = RollbackState::Done;
        }
        // its last status, what a watch prints at its end, no longer says it waits for them
        self.lock_wait = None;
        if self.state == PlanState::Aborting {
            self.state = PlanState::RollingBack;
        }
        let why = self.message.replace(UNDOING, "");
        self.message = if why.is_empty() {
            "ended before it held its shard locks: nothing of it ran".into()
        } else {
            format!("{why}; ended before it held its shard locks: nothing of it ran")
        };
    }

    /// Whether the plan reached its end; sets the final state when it did.
    pub fn settle(&mut self) -> Option<Vec<StepUpdate>> {
        match self.state {
            PlanState::Running => {
                if self.outstanding() > 0 || self.shards.values().any(|s| !s.ready.is_empty()) {
                    return None;
                }
                // A wave still running, baking or waiting at its gate (`advance_waves`).
                if !self.waves_done() {
                    return None;
                }
                // Prepared steps wait for the decision (the engine writes it).
                if self.steps.iter().any(|s| s.status == StepStatus::Prepared) {
                    return None;
                }
                let mut updates = Vec::new();
                let any_failed = self.steps.iter().any(|s| s.status == StepStatus::Failed);
                // Steps waiting on a failed one (continue policy) will never run.
                for s in 0..self.steps.len() {
                    if self.steps[s].status == StepStatus::Pending {
                        self.set_status(s, StepStatus::NotRun);
                        updates.push(self.update_of(s, None));
                    }
                }
                // Not run for no failure and no cancel: a retry of some targets only leaves
                // the others as they were. The plan did not complete.
                let left = (0..self.steps.len())
                    .filter(|&s| {
                        self.steps[s].status == StepStatus::NotRun
                            && !self.gone.contains(&self.steps[s].target)
                            && !self
                                .cancelled
                                .contains(&self.targets[self.steps[s].target].shard)
                    })
                    .count();
                let within_budget = self.failures_within_budget();
                self.state = if any_failed && within_budget {
                    PlanState::CompletedWithFailures
                } else if any_failed {
                    PlanState::Failed
                } else if !self.cancelled.is_empty() {
                    // an operator cancelled a shard of it, and nothing failed
                    self.by_operator = true;
                    PlanState::Cancelled
                } else if left > 0 {
                    // steps left with nothing failed or cancelled: what an operator's choice
                    // left (a retry of some targets of a halted plan), not news to them
                    self.by_operator = true;
                    PlanState::Halted
                } else {
                    PlanState::Completed
                };
                // A plan with waves said what its waves did along the way; its end says how
                // it ended.
                let waved = !self.spec.rollout.waves.is_empty();
                // Under `continue`, the first failure's message said the others go on; at
                // the end it says how the plan ended instead (its last line read "...; other
                // targets go on" on a plan ended failed).
                let first_failure = self
                    .message
                    .strip_suffix(crate::plan::GOING_ON)
                    .map(str::to_string);
                if first_failure.is_some() {
                    self.message.clear();
                }
                if self.message.is_empty()
                    || self.message_is_retry_note()
                    || (waved && self.cancelled.is_empty())
                {
                    self.message = if any_failed && within_budget {
                        format!(
                            "every wave done; {} step(s) failed, within the error budget",
                            self.failures.len()
                        )
                    } else if any_failed {
                        format!("{} step(s) failed", self.failures.len())
                    } else if left > 0 {
                        format!("{left} step(s) were not run; `flotilla plan retry` runs them")
                    } else {
                        // (a plan whose every step an earlier plan had applied did nothing:
                        // "every step applied" read as if it had)
                        let count =
                            |st: StepStatus| self.steps.iter().filter(|s| s.status == st).count();
                        // (steps of tenants gone meanwhile are neither: said below)
                        let (applied, before) = (
                            count(StepStatus::Applied),
                            count(StepStatus::AlreadyApplied),
                        );
                        if before == 0 {
                            "every step applied".into()
                        } else if applied == 0 {
                            format!(
                                "nothing to do: every step ({before}) was applied before this plan"
                            )
                        } else {
                            format!(
                                "every step applied ({applied} by this plan, {before} before it)"
                            )
                        }
                    };
                }
                if let Some(first) = first_failure.filter(|_| !waved) {
                    self.message = format!("{first}; {}", self.message);
                }
                // A group-atomic plan's message is its last unit's ("parallel group 2
                // committed ..."): its end says it applied everything, and how many groups
                // committed atomically.
                if self.state == PlanState::Completed
                    && !self.spec.atomic
                    && self.units.len() > 1
                    && self.message.starts_with("parallel group ")
                {
                    self.message = format!(
                        "every step applied, {} atomic groups each committed atomically; the last: {}",
                        self.units.len(),
                        self.message
                    );
                }
                // A data change that applied everywhere and changed no row anywhere: a typo
                // in its filter, most likely (it read as every step applied).
                for id in self.data_changes_that_changed_nothing() {
                    self.message = format!(
                        "{}; data change {id} changed no row on any target (its filter, or its \
                         table empty?)",
                        self.message
                    );
                }
                if !self.gone.is_empty() {
                    let names: Vec<String> = self
                        .gone
                        .iter()
                        .map(|&t| {
                            let t = &self.targets[t];
                            crate::versions::target_name(&t.shard, &t.tenant)
                        })
                        .collect();
                    self.message = format!(
                        "{}; {} target(s) gone from their shards during the plan (their schemas \
                         dropped or renamed), nothing more of it run there: {}",
                        self.message,
                        names.len(),
                        crate::error::some_of(&names, 5)
                    );
                }
                Some(updates)
            }
            // A shard was forgotten while the unit committed (`plan forget-shard`): once the
            // other shards have committed, the plan ends failed, nothing after the unit run.
            PlanState::Committing
                if self.all_resolved()
                    && self.outstanding() == 0
                    && !self.forgotten_shards().is_empty() =>
            {
                let forgotten: Vec<String> = self
                    .forgotten_shards()
                    .into_iter()
                    .map(str::to_string)
                    .collect();
                let updates = self.halt_pending();
                let not_run = updates.len();
                let unit = match self.current_unit() {
                    Some(g) if !self.spec.atomic => format!("parallel group {}", g + 1),
                    _ => "the plan".to_string(),
                };
                self.state = PlanState::Failed;
                self.message = format!(
                    "{unit} committed on {} of {} shards; not confirmed on {} (forgotten by an \
                     operator: `plan status` and the audit trail say who and why; the shard \
                     commits its part from the decision in etcd if its agent comes back){}",
                    self.shards_of_unit() - forgotten.len(),
                    self.shards_of_unit(),
                    forgotten.join(", "),
                    if not_run > 0 {
                        format!("; {not_run} step(s) after it were not run")
                    } else {
                        String::new()
                    }
                );
                Some(updates)
            }
            // ... and waits for the runs still out meanwhile.
            PlanState::Committing if !self.forgotten_shards().is_empty() => None,
            // A group-atomic plan goes on after its unit commits (`advance_unit`).
            PlanState::Committing if !self.spec.atomic => None,
            PlanState::Committing => self.all_resolved().then(|| {
                self.state = PlanState::Completed;
                self.message = format!(
                    "every step applied, committed atomically on {} shards ({})",
                    self.shards.len(),
                    self.window_report()
                );
                Vec::new()
            }),
            PlanState::Stopping => (self.outstanding() == 0).then(|| {
                // an operator's cancel ends cancelled, a halt (an operator's, or a budget
                // past its limit) halted, a failure under `stop` failed
                self.state = match self.rollback_ends {
                    PlanState::Cancelled | PlanState::Halted => self.rollback_ends,
                    _ => PlanState::Failed,
                };
                Vec::new()
            }),
            PlanState::RollingBack => {
                if self
                    .shards
                    .values()
                    .all(|s| s.rollback == RollbackState::Done)
                {
                    self.state = if self.rollback_errors > 0 {
                        PlanState::RollbackFailed
                    } else {
                        self.rollback_ends
                    };
                    if self.rollback_errors > 0 {
                        self.message = format!(
                            "{}; rollback could not undo every step: see failures",
                            self.message.replace(UNDOING, "")
                        );
                    } else {
                        // said while it ran; ended, it is done
                        self.message = self.message.replace(UNDOING, UNDONE);
                    }
                    // an atomic unit's abort, said while it ran ("aborting: no target
                    // commits"), is over: it read so in the ended plan's status
                    self.message = aborted(&self.message, self.rollback_errors == 0);
                    for (id, (rows, targets)) in &self.rows_kept {
                        let kept = format!(
                            "data change {id}: its prior image was not put back on {rows} \
                             row(s) on {targets} target(s), changed or deleted since their \
                             batch (they keep their newer values)"
                        );
                        self.message = if self.message.is_empty() {
                            kept
                        } else {
                            format!("{}; {kept}", self.message)
                        };
                    }
                    Some(Vec::new())
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// How a plan's message says, while it rolls back, why: and once it has.
pub(crate) const UNDOING: &str = "; every applied step is being undone";
const UNDONE: &str = "; every applied step was undone";

/// How an atomic unit's abort is said while it runs (the plan's whole unit, or a
/// group-atomic plan's group `{}`), and once the plan has ended.
pub(crate) const ABORTING: &str = "; aborting: no target commits";
const ABORTED: &str = "; aborted: no target committed";
pub(crate) const ABORTING_GROUP: (&str, &str) = (
    "; aborting parallel group ",
    ": no target of it commits, and what the groups before it committed is undone",
);
const ABORTED_GROUP: (&str, &str) = (
    "; aborted parallel group ",
    ": no target of it committed, and what the groups before it committed was undone",
);

/// The message of an ended plan whose unit aborted: said in the past (the groups before
/// a group-atomic plan's aborted one `undone`, or not all: its rollback failed, and says so).
fn aborted(message: &str, undone: bool) -> String {
    let message = message.replace(ABORTING, ABORTED);
    let tail = if undone {
        ABORTED_GROUP.1
    } else {
        ": no target of it committed"
    };
    match message.find(ABORTING_GROUP.0) {
        Some(at) if message[at..].contains(ABORTING_GROUP.1) => format!(
            "{}{}",
            &message[..at],
            message[at..]
                .replacen(ABORTING_GROUP.0, ABORTED_GROUP.0, 1)
                .replacen(ABORTING_GROUP.1, tail, 1)
        ),
        _ => message,
    }
}

impl PlanRun {
    /// `plan retry` of an ended plan: its failed and not-run steps (on `only`, or on every
    /// target) are pending again and the plan runs; applied steps stay applied (their
    /// journal rows make a repeat harmless anyway). The waves with work again run again, in
    /// order; the others stay passed. Returns the store updates; none when nothing is left.
    pub fn retry(&mut self, only: Option<&std::collections::BTreeSet<usize>>) -> Vec<StepUpdate> {
        let mut updates = Vec::new();
        for s in 0..self.steps.len() {
            let t = self.steps[s].target;
            if only.is_some_and(|o| !o.contains(&t)) {
                continue;
            }
            if matches!(
                self.steps[s].status,
                StepStatus::Failed | StepStatus::NotRun
            ) {
                self.set_status(s, StepStatus::Pending);
                updates.push(self.update_of(s, None));
            }
        }
        if updates.is_empty() {
            return updates;
        }
        let retried: std::collections::BTreeSet<usize> = (0..self.steps.len())
            .filter(|&s| self.steps[s].status == StepStatus::Pending)
            .map(|s| self.steps[s].target)
            .collect();
        self.failures.retain(|f| {
            let Some(t) = &f.target else { return true };
            !retried
                .iter()
                .any(|&i| self.targets[i].shard == t.shard && self.targets[i].tenant == t.tenant)
        });
        self.state = PlanState::Running;
        self.rollback_ends = PlanState::RolledBack;
        // a retried plan that fails again failed by itself
        self.by_operator = false;
        self.cancelled.clear();
        self.recount_remaining();
        // Waves: a wave that passed and has no work again stays passed, with what its gates
        // found; every other one runs again in order, its bake and gate included (a wave
        // halted at its gate is not promoted by a retry).
        let stored: Vec<super::waves::StoredWave> = self
            .waves
            .iter()
            .map(|w| {
                let again = w.targets.iter().any(|t| retried.contains(t));
                if w.state == flotilla_core::state::WaveState::Done && !again {
                    super::waves::StoredWave {
                        state: flotilla_core::state::WaveState::Done,
                        bake_until_ms: None,
                        gate: w.gate.clone(),
                    }
                } else {
                    super::waves::StoredWave::new(flotilla_core::state::WaveState::Pending, None)
                }
            })
            .collect();
        let wave_of = self.wave_of.clone();
        self.set_waves(wave_of, &stored);
        updates
    }
}

impl PlanRun {
    /// Under `continue`: whether every failed target is in a wave with an error budget (its
    /// own or the plan's): then failing is what the budget allowed.
    fn failures_within_budget(&self) -> bool {
        if self.spec.policy != FailurePolicy::Continue || !self.spec.rollout.budgeted() {
            return false;
        }
        let rollout = &self.spec.rollout;
        let budgeted = |t: usize| {
            rollout.budget.is_some()
                || self
                    .waves
                    .get(self.wave_of.get(t).copied().unwrap_or(0))
                    .is_some_and(|w| w.budget.is_some())
        };
        (0..self.steps.len())
            .filter(|&s| self.steps[s].status == StepStatus::Failed)
            .all(|s| budgeted(self.steps[s].target))
    }
}
