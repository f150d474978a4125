//! Operator commands on a plan in motion: pause/resume, cancel, rollback, and the
//! cancel of one shard. Each is checked against the plan's state, audited, and carried
//! out by the failure policy's own paths.
use flotilla_core::FailurePolicy;
use tracing::info;

use super::{CommandKind, Engine, REQUESTED_BY, outbound};
use crate::actor::Actor;
use crate::error::{Conflict, CoordinatorError, Refusal};
use crate::plan::{PlanRun, PlanState};
use crate::store::StoreOp;

impl Engine {
    /// Pauses or resumes a plan or one shard of it: the shard's agent stops its data changes
    /// at their next batch boundary, and no new run goes there until it is resumed.
    pub(super) fn pause(
        &mut self,
        plan_id: &str,
        shard: Option<&str>,
        paused: bool,
        actor: &Actor,
    ) -> Result<(), CoordinatorError> {
        let action = if paused { "pause" } else { "resume" };
        let Some(run) = self.plans.get_mut(plan_id) else {
            return Err(Conflict::NotRunning {
                plan_id: plan_id.to_string(),
                action,
            }
            .into());
        };
        if let Some(s) = shard
            && !run.shards.contains_key(s)
        {
            return Err(no_such_shard(run, s));
        }
        if run.state.is_terminal() {
            return Err(Conflict::Ended {
                plan_id: plan_id.to_string(),
                state: run.state,
            }
            .into());
        }
        // Undo, commit and abort do not stop at batch boundaries: a pause taken there would
        // say the plan is held while it goes on (a resume is still taken, to clear one).
        let unheeded = match run.state {
            PlanState::RollingBack => Some("undo"),
            PlanState::Committing => Some("atomic commit"),
            PlanState::Aborting => Some("atomic abort"),
            _ => None,
        };
        // An atomic plan is one unit from its first step to its commit: a pause would say it
        // is held while every run of it goes on (it was taken, and the plan committed).
        if paused && run.spec.atomic {
            return Err(Refusal::AtomicPause {
                plan_id: plan_id.to_string(),
            }
            .into());
        }
        if paused && let Some(what) = unheeded {
            return Err(Conflict::NotPausable {
                plan_id: plan_id.to_string(),
                state: run.state,
                what,
            }
            .into());
        }
        match (shard, paused) {
            // A pause that changes nothing is said, as a resume of nothing paused is (it was
            // taken quietly, and audited as a pause)
            (None, true) if run.paused.plan => {
                return Err(Conflict::AlreadyPaused {
                    what: format!("plan {plan_id} is already paused"),
                }
                .into());
            }
            (Some(s), true) if run.paused.plan || run.paused.shards.contains(s) => {
                return Err(Conflict::AlreadyPaused {
                    what: format!(
                        "shard {s} of plan {plan_id} is already paused{}",
                        if run.paused.plan {
                            " (the plan is paused as a whole)"
                        } else {
                            ""
                        }
                    ),
                }
                .into());
            }
            (None, true) => run.paused.plan = true,
            // (nothing paused: said, not audited as a resume that changed nothing)
            (None, false) if !run.paused.plan && run.paused.shards.is_empty() => {
                return Err(Conflict::PlanNotPaused {
                    plan_id: plan_id.to_string(),
                }
                .into());
            }
            // resuming the plan resumes every shard of it
            (None, false) => run.paused = Default::default(),
            (Some(s), true) => {
                run.paused.shards.insert(s.to_string());
            }
            // Resuming one shard resumes only that shard's own pause: not the plan's as a
            // whole (it stays paused there), nor a shard not paused. Said, not taken silently.
            (Some(s), false) if run.paused.plan || !run.paused.shards.contains(s) => {
                let why = if run.paused.plan {
                    "the plan is paused as a whole: resume it without --shard".to_string()
                } else if run.paused.shards.is_empty() {
                    "it is not paused (nothing of the plan is)".to_string()
                } else {
                    let shards: Vec<&str> = run.paused.shards.iter().map(String::as_str).collect();
                    format!("it is not paused (paused: {})", shards.join(", "))
                };
                return Err(Conflict::NotPaused {
                    plan_id: plan_id.to_string(),
                    shard: s.to_string(),
                    why,
                }
                .into());
            }
            (Some(s), false) => {
                run.paused.shards.remove(s);
            }
        }
        let stored = run.paused.stored();
        let shards: Vec<String> = match shard {
            Some(s) => vec![s.to_string()],
            None => run.shards.keys().cloned().collect(),
        };
        let what = actor.explain(&format!(
            "{} {}by {}",
            if paused { "paused" } else { "resumed" },
            shard.map(|s| format!("on {s} ")).unwrap_or_default(),
            actor.name
        ));
        info!(plan = %plan_id, "{what}");
        let on = shard.map(|s| format!("shard {s}")).unwrap_or_default();
        // kept, so that a new leader (or a retry) leaves the plan paused where its agents are
        self.write(StoreOp::Together(vec![
            StoreOp::Paused {
                plan_id: plan_id.to_string(),
                paused: stored,
            },
            actor.audit(action, plan_id, &on),
        ]));
        for s in shards {
            self.send_pause(plan_id, &s);
        }
        Ok(())
    }

    /// Tells a shard's agent whether the plan is paused there now.
    fn send_pause(&mut self, plan_id: &str, shard: &str) {
        let Some(paused) = self.plans.get(plan_id).map(|r| r.is_paused(shard)) else {
            return;
        };
        self.send_to(shard, outbound::pause(plan_id, paused));
    }

    /// Cancels or rolls back a plan; `revive` brings a finished plan back to roll it back
    /// (a new leader's recovery: the plan as stored, its message and how it ends).
    pub(super) fn command(
        &mut self,
        plan_id: &str,
        kind: CommandKind,
        actor: &Actor,
        revive: Option<Box<PlanRun>>,
    ) -> Result<(), CoordinatorError> {
        let revived = revive.is_some();
        if !self.plans.contains_key(plan_id) {
            match (kind, revive) {
                // read from the store under another term (leadership lost and won since):
                // asked again, this term reads it
                (CommandKind::Rollback, Some(run)) if run.epoch != self.epoch => {
                    return Err(CoordinatorError::NotLeader { leader: None });
                }
                (CommandKind::Rollback, Some(run)) => {
                    self.halt_on_attach.remove(plan_id);
                    self.plans.insert(plan_id.to_string(), *run);
                }
                (CommandKind::Cancel, _) => {
                    return Err(Conflict::NotRunning {
                        plan_id: plan_id.to_string(),
                        action: "cancel",
                    }
                    .into());
                }
                _ => return Err(CoordinatorError::PlanNotFound(plan_id.to_string())),
            }
        }
        let run = self.plans.get_mut(plan_id).expect("present");
        let action = match kind {
            CommandKind::Cancel => "cancel",
            CommandKind::Rollback => "rollback",
        };
        match (kind, run.state) {
            (_, PlanState::RollingBack) => {
                return Err(Conflict::RollingBack {
                    plan_id: plan_id.to_string(),
                }
                .into());
            }
            (CommandKind::Cancel, state) if state.is_terminal() => {
                return Err(Conflict::EndedUseRollback {
                    plan_id: plan_id.to_string(),
                    state,
                }
                .into());
            }
            // A unit the leader before may have decided (its decision not read yet): the
            // abort would halt its steps, and etcd answer with the commit, its shards
            // committing what the plan then reports not run.
            (_, PlanState::Running) if run.unit_unverified && !run.decision_absent => {
                return Err(Conflict::UnitUnverified {
                    plan_id: plan_id.to_string(),
                    action,
                }
                .into());
            }
            // The unit's commit decision is written: every shard must commit it; a rollback
            // begun now would read journals the COMMIT PREPAREDs still to come change.
            (_, PlanState::Committing) => {
                let mut waiting: Vec<String> = run
                    .shards
                    .iter()
                    .filter(|(name, s)| !s.resolved && run.shard_has_open(name))
                    .map(|(name, _)| name.clone())
                    .collect();
                waiting.sort();
                let waiting = match waiting.len() {
                    0..=3 => waiting.join(", "),
                    n => format!("{} and {} more shards", waiting[..3].join(", "), n - 3),
                };
                return Err(Conflict::Committing {
                    plan_id: plan_id.to_string(),
                    unit: match run.current_unit() {
                        Some(g) if !run.spec.atomic => format!("parallel group {}", g + 1),
                        _ => "its atomic unit".to_string(),
                    },
                    waiting,
                    action,
                }
                .into());
            }
            _ => {}
        }
        // Aborting already for a failure of its own: the failure stays the headline (it read
        // "cancel requested by ...", the cause in the failures list alone), and the end is
        // still the plan's.
        let own_abort = !revived && run.state == PlanState::Aborting && !run.by_operator;
        run.message = if own_abort && !run.message.is_empty() {
            format!(
                "{}; {}",
                run.message,
                actor.explain(&format!("{action}{REQUESTED_BY}{}", actor.name))
            )
        } else if revived && !run.message.is_empty() {
            // A rollback a new leader takes up: the plan's own account of why it is undone
            // (a step's failure, an operator's rollback and reason) stays, with who resumed
            // it (the last to: not one more clause at each change of leader).
            let why = match run.message.find(super::RESUMED_BY) {
                Some(at) => run.message[..at].trim_end_matches("; "),
                None => run.message.as_str(),
            };
            format!("{why}; {}", actor.explain(""))
        } else {
            actor.explain(&format!("{action}{REQUESTED_BY}{}", actor.name))
        };
        let undo = kind == CommandKind::Rollback || run.policy() == FailurePolicy::AllOrNothing;
        // (a rollback taken up keeps how it was to end: a cancel's undo ends cancelled)
        // (a rollback taken up keeps who began it, and how it ends: its reviver says; a
        // plan aborting for its own failure ends as that abort does)
        if !revived && !own_abort {
            run.by_operator = true;
            run.rollback_ends = if kind == CommandKind::Cancel {
                PlanState::Cancelled
            } else {
                PlanState::RolledBack
            };
        }
        let updates = run.halt_pending();
        self.write(StoreOp::Steps {
            plan_id: plan_id.to_string(),
            updates,
        });
        self.write(actor.audit(action, plan_id, ""));
        let atomic_in_flight = {
            let run = &self.plans[plan_id];
            run.spec.two_phase()
                && run.current_unit().is_some()
                && matches!(run.state, PlanState::Running | PlanState::Committing)
                && run.decision.is_none()
        };
        if self.plans[plan_id].state == PlanState::Aborting {
            // The unit's abort is under way: its decision is written, every shard rolls
            // its prepared transactions back, and once nothing is in flight the rollback
            // of the rest follows (`two_phase`); begun here, it would pass over the
            // decision and leave what prepares meanwhile prepared, with none.
        } else if undo && atomic_in_flight {
            // Prepared transactions are aborted by decision, then the rest undone.
            let run = self.plans.get_mut(plan_id).expect("present");
            run.state = PlanState::Aborting;
            self.halt_everywhere(plan_id);
        } else if undo {
            self.begin_rollback(plan_id);
        } else {
            // Stopping, to end as `rollback_ends` says (cancelled) once nothing is out
            // (`settle`): set cancelled at once, it never ended (no end is settled from
            // there), its locks held for as long as this coordinator led.
            let run = self.plans.get_mut(plan_id).expect("present");
            run.state = PlanState::Stopping;
            self.halt_everywhere(plan_id);
        }
        self.write_state(plan_id);
        Ok(())
    }

    /// Cancels one shard of a running plan: its steps not started will not run, its data
    /// changes stop at their next batch boundary, the other shards go on; the plan ends
    /// cancelled. Refused under all-or-nothing, which cannot finish without the shard.
    pub(super) fn cancel_shard(
        &mut self,
        plan_id: &str,
        shard: &str,
        actor: &Actor,
    ) -> Result<(), CoordinatorError> {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return Err(Conflict::NotRunning {
                plan_id: plan_id.to_string(),
                action: "cancel",
            }
            .into());
        };
        if run.state != PlanState::Running {
            return Err(Conflict::ShardOfStoppedPlan {
                plan_id: plan_id.to_string(),
                state: run.state,
            }
            .into());
        }
        if !run.shards.contains_key(shard) {
            return Err(Refusal::NoStepOnShard {
                plan_id: plan_id.to_string(),
                shard: shard.to_string(),
            }
            .into());
        }
        if run.policy() == FailurePolicy::AllOrNothing || run.spec.two_phase() {
            return Err(Refusal::ShardNeeded {
                plan_id: plan_id.to_string(),
                shard: shard.to_string(),
            }
            .into());
        }
        if run.cancelled.contains(shard) {
            return Err(Conflict::ShardCancelled {
                plan_id: plan_id.to_string(),
                shard: shard.to_string(),
            }
            .into());
        }
        let said = actor.explain(&format!("shard {shard} cancelled by {}", actor.name));
        // (said only when another shard has steps to go on with: a plan's one shard
        // cancelled read "other shards go on")
        run.message = if run.message.is_empty() && run.others_go_on(shard) {
            format!("{said}; other shards go on")
        } else if run.message.is_empty() {
            said
        } else {
            format!("{}; {said}", run.message)
        };
        let updates = run.halt_shard(shard);
        self.write(StoreOp::Steps {
            plan_id: plan_id.to_string(),
            updates,
        });
        self.write(actor.audit("cancel", plan_id, &format!("shard {shard}")));
        self.write_state(plan_id);
        self.send_to(shard, outbound::halt(plan_id));
        info!(plan = %plan_id, shard, "shard cancelled");
        Ok(())
    }
}

/// The refusal of a command naming a shard the plan has no target on (its shards listed).
pub(super) fn no_such_shard(run: &PlanRun, shard: &str) -> CoordinatorError {
    Refusal::NoSuchShard {
        plan_id: run.id.clone(),
        shard: shard.to_string(),
        shards: run.shards.keys().cloned().collect::<Vec<_>>().join(", "),
    }
    .into()
}
