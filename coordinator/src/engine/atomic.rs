//! Decisions of atomic units (two-phase commit): the unit's decision is written in etcd,
//! fenced by leadership, once every target prepared (commit) or as soon as the unit aborts
//! (abort, runs still in flight: what prepares after it is rolled back under it); then every
//! shard resolves its prepared transactions. A unit
//! entered on an inherited plan is first checked against etcd and the agents' in-doubt
//! transactions.
use flotilla_core::pb::coordinator_message::Body;
use flotilla_core::protocol::{Decision, gid};
use tracing::{info, warn};

use super::Engine;
use crate::actor::Actor;
use crate::coordination::CoordinationError;
use crate::error::{Conflict, CoordinatorError};
use crate::metrics;
use crate::plan::PlanState;
use crate::store::StoreOp;

impl Engine {
    /// A unit entered on a plan this leader inherited may have been started by the leader
    /// before it (the store can miss its last writes): its decision in etcd stands if there
    /// is one; with none, a transaction of it prepared on a shard (in the agents' in-doubt
    /// lists) means it had started, and this leader presumes abort, as at a takeover.
    pub(super) async fn verify_unit(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get(plan_id) else {
            return;
        };
        if !run.unit_unverified || run.state != PlanState::Running {
            return;
        }
        let key = run.unit_key();
        // The decision first: one that stands needs no agent to be carried out (the
        // agents commit or abort by it as they come); with none, none can be written any
        // more but this leader's (the one before is deposed), which a cancel meanwhile
        // may write (`decision_absent`).
        let read = self.coordination.decision(&key).await;
        if let (Ok(None), Some(run)) = (&read, self.plans.get_mut(plan_id)) {
            run.decision_absent = true;
        }
        let Some(run) = self.plans.get(plan_id) else {
            return;
        };
        // whether it started needs every shard's in-doubt list: it comes with the agent's
        // attach (one that could not list them attaches again once it can)
        if matches!(read, Ok(None))
            && run
                .shards
                .keys()
                .any(|s| !self.agents.contains_key(s) || self.in_doubt_unknown.contains(s))
        {
            return;
        }
        let started = run.shards.keys().any(|s| {
            self.in_doubt
                .get(s)
                .is_some_and(|gids| gids.iter().any(|g| gid::unit_of(g) == Some(key.as_str())))
        });
        let presumed = matches!(read, Ok(None));
        let decision = match read {
            Ok(Some(d)) => Some(d),
            Ok(None) if started => {
                match self
                    .coordination
                    .decide(&key, Decision::Abort, self.epoch)
                    .await
                {
                    Ok(d) => Some(d),
                    Err(e) => {
                        warn!(plan = %plan_id, unit = %key, "writing the presumed abort failed, retrying: {e}");
                        return;
                    }
                }
            }
            Ok(None) => None,
            Err(e) => {
                warn!(plan = %plan_id, unit = %key, "reading the unit's decision failed, retrying: {e}");
                return;
            }
        };
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        run.unit_unverified = false;
        let Some(d) = decision else { return };
        metrics::decision(d);
        info!(plan = %plan_id, unit = %key, decision = d.as_str(), "a unit the previous leader started: continuing under its decision");
        run.decision = Some(d);
        if d == Decision::Commit {
            run.state = PlanState::Committing;
        } else {
            run.state = PlanState::Aborting;
            run.message = if presumed {
                format!(
                    "parallel group {} aborted when a new leader's term took it over with no commit decision written (presumed abort)",
                    run.current_unit().map_or(0, |g| g + 1)
                )
            } else {
                format!(
                    "parallel group {} aborted by the decision the leader before wrote",
                    run.current_unit().map_or(0, |g| g + 1)
                )
            };
            let updates = run.halt_pending();
            self.write(StoreOp::Steps {
                plan_id: plan_id.to_string(),
                updates,
            });
        }
        self.write_state(plan_id);
        // the decision is carried out on the next pass
        self.two_phase(plan_id).await;
    }

    /// Atomic plans: writes the decision once every target prepared (commit) or
    /// as soon as the unit aborts (abort), then has every shard
    /// resolve its prepared transactions; an abort ends in the rollback of what
    /// committed outside 2PC. Decisions are fenced by leadership in etcd.
    pub(super) async fn two_phase(&mut self, plan_id: &str) {
        let Some(run) = self.plans.get_mut(plan_id) else {
            return;
        };
        if !run.spec.two_phase() || run.current_unit().is_none() {
            return;
        }
        // The unit deciding now: the plan, or one atomic parallel group of it.
        let unit_key = run.unit_key();
        let want = if run.ready_to_commit() {
            Some(Decision::Commit)
        } else if run.state == PlanState::Aborting {
            // At once, runs of the unit still in flight: every target that prepared lets go
            // of its locks now, not when the unit's slowest run ends (12 s of an
            // application's traffic on every prepared tenant in a walk-through). A run that
            // prepares after it is rolled back under it all the same: its result names its
            // gid (a Resolve follows, `apply_run_result`), the agent's abort rolls back the
            // unit's gids it was not told of once its runs are done, and a halted run does
            // not prepare at all.
            Some(Decision::Abort)
        } else if run.state == PlanState::Committing {
            Some(Decision::Commit)
        } else {
            None
        };
        let Some(want) = want else { return };
        if run.decision.is_none() {
            // Fault tests: a coordinator that dies with every target prepared and
            // no decision written (a new leader presumes abort).
            fail::fail_point!("coordinator::before_decision", |_| {
                std::process::exit(86);
            });
            match self.coordination.decide(&unit_key, want, self.epoch).await {
                Ok(d) => {
                    metrics::decision(d);
                    info!(plan = %plan_id, unit = %unit_key, decision = d.as_str(), "decision written");
                    let run = self.plans.get_mut(plan_id).expect("present");
                    run.two_phase_clock.decided(crate::plan::timings::now_us());
                    run.decision = Some(d);
                    run.state = if d == Decision::Commit {
                        PlanState::Committing
                    } else {
                        PlanState::Aborting
                    };
                    self.write_state(plan_id);
                    // Fault tests: dies with the decision written, before any shard heard it.
                    fail::fail_point!("coordinator::after_decision", |_| {
                        std::process::exit(87);
                    });
                }
                Err(CoordinationError::NotLeader) => {
                    warn!(plan = %plan_id, "not the leader any more: no decision written");
                    return;
                }
                Err(e) => {
                    warn!(plan = %plan_id, "writing the decision failed, retrying: {e}");
                    return;
                }
            }
        }
        let run = self.plans.get_mut(plan_id).expect("present");
        let Some(decision) = run.decision else {
            return;
        };
        if run.decision_lost && decision.is_commit() {
            run.decision_lost = false;
            // Gone from etcd while this leader carried it out (its data wiped, or restored
            // from an older snapshot): the agents commit only by the key, and the unit stayed
            // committing, every prepared target holding its locks, until a new leader wrote
            // it again. Written again here (only where there is none). Read first: a shard
            // that reads no key while etcd holds one looks elsewhere (its `--etcd` or
            // `--etcd-prefix`), and writing would only say, every second, that it was gone.
            match self.coordination.decision(&unit_key).await {
                Ok(Some(_)) => {
                    warn!(plan = %plan_id, unit = %unit_key, "a shard reads no decision for the unit while etcd holds one: check that shard agent's --etcd and --etcd-prefix");
                }
                Ok(None) => match self
                    .coordination
                    .decide(&unit_key, decision, self.epoch)
                    .await
                {
                    Ok(d) if d == decision => {
                        warn!(plan = %plan_id, unit = %unit_key, "the unit's commit decision was gone from etcd (its data lost or restored from an older snapshot?): written again");
                        let run = self.plans.get_mut(plan_id).expect("present");
                        for sr in run.shards.values_mut() {
                            sr.resolve_retry_at = None;
                        }
                    }
                    Ok(d) => {
                        tracing::error!(plan = %plan_id, unit = %unit_key, found = d.as_str(), "the unit's commit decision was gone from etcd, and another is there now: not carried out; the plan waits for an operator");
                        return;
                    }
                    Err(e) => {
                        warn!(plan = %plan_id, unit = %unit_key, "writing the lost commit decision again failed, retrying: {e}");
                        let run = self.plans.get_mut(plan_id).expect("present");
                        run.decision_lost = true;
                        return;
                    }
                },
                Err(e) => {
                    warn!(plan = %plan_id, unit = %unit_key, "reading the unit's decision failed, retrying: {e}");
                    let run = self.plans.get_mut(plan_id).expect("present");
                    run.decision_lost = true;
                    return;
                }
            }
        }
        let run = self.plans.get_mut(plan_id).expect("present");
        let Some(decision) = run.decision else {
            return;
        };
        let shards: Vec<String> = run.shards.keys().cloned().collect();
        for shard in &shards {
            let Some(conn_id) = self.agents.get(shard).map(|a| a.conn_id) else {
                continue;
            };
            let run = self.plans.get_mut(plan_id).expect("present");
            let sr = run.shards.get_mut(shard).expect("shard");
            if sr.resolved
                || sr.resolve_sent_on == Some(conn_id)
                || sr
                    .resolve_retry_at
                    .is_some_and(|at| std::time::Instant::now() < at)
            {
                continue;
            }
            // After a takeover the gids are known only from the agent's in-doubt list; an
            // agent that could not list them says so, and nothing is settled from its
            // empty list (its transactions may be prepared still, holding their locks).
            if sr.prepared.is_empty() && self.in_doubt_unknown.contains(shard.as_str()) {
                continue;
            }
            // A shard with runs out and nothing prepared is settled by their answers (an
            // abort is written before they are back): settled now, a run that prepared
            // meanwhile would find its steps counted not run and its shard done.
            if sr.prepared.is_empty() && !sr.outstanding.is_empty() {
                continue;
            }
            if sr.prepared.is_empty() {
                let known: Vec<String> = self
                    .in_doubt
                    .get(shard)
                    .map(|g| {
                        g.iter()
                            .filter(|g| gid::unit_of(g) == Some(unit_key.as_str()))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                if known.is_empty() {
                    // Nothing of the plan is prepared on the shard (any more): the
                    // agent resolved it from the decision in etcd, or it never
                    // prepared. The decision says what its steps are now.
                    let updates = run.settle_shard_without_prepared(shard, decision);
                    self.write(StoreOp::Steps {
                        plan_id: plan_id.to_string(),
                        updates,
                    });
                    continue;
                }
                let sr = run.shards.get_mut(shard).expect("shard");
                for g in known {
                    sr.prepared.entry(g).or_default();
                }
            }
            let run = self.plans.get_mut(plan_id).expect("present");
            if let Some(resolve) = run.resolve_for(shard, decision) {
                let sr = run.shards.get_mut(shard).expect("shard");
                if self
                    .agents
                    .get_mut(shard)
                    .is_some_and(|a| a.send(Body::Resolve(resolve)))
                {
                    sr.resolve_sent_on = Some(conn_id);
                }
            }
        }
        let run = self.plans.get_mut(plan_id).expect("present");
        // After a takeover, a shard not heard from (its agent away, or attached without
        // the list of its prepared transactions) may hold the unit's still: the rollback
        // (and the release of the plan's locks) waits for its list. (Its agent is needed
        // for the rollback anyway.)
        let unlisted = run.inherited
            && run.shards.iter().any(|(s, sr)| {
                !sr.resolved
                    && !sr.left
                    && sr.prepared.is_empty()
                    && (!self.agents.contains_key(s) || self.in_doubt_unknown.contains(s))
            });
        if run.state == PlanState::Aborting
            && run.outstanding() == 0
            && run.all_resolved()
            && !unlisted
        {
            // What committed outside 2PC (non-transactional steps) is undone now.
            self.begin_rollback(plan_id);
        }
    }

    /// Whether a shard of a plan rolling back is to be told its unit's decision before its
    /// undo is asked: left to the abort while its agent was lost, or (a plan rebuilt by a new
    /// leader) naming transactions of the unit in doubt in the list its agent attached with.
    /// Its undo asked first, the agent finds nothing of them in its journal (they are not
    /// committed), answers that nothing is applied, and the plan ends with them prepared,
    /// holding their locks: an agent without etcd (or under the embedded backend) reads no
    /// decision by itself.
    pub(super) fn in_doubt_before_undo(&self, plan_id: &str, shard: &str) -> bool {
        let Some(run) = self.plans.get(plan_id) else {
            return false;
        };
        let Some(sr) = run.shards.get(shard) else {
            return false;
        };
        if sr.resolved {
            return false;
        }
        if sr.left {
            return true;
        }
        if run.current_unit().is_none() {
            return false;
        }
        // an agent attached without its list: what it holds is not known (as a new leader's
        // decision waits for it, `two_phase`'s `unlisted`)
        if self.in_doubt_unknown.contains(shard) {
            return true;
        }
        let unit = run.unit_key();
        self.in_doubt
            .get(shard)
            .is_some_and(|gids| gids.iter().any(|g| gid::unit_of(g) == Some(unit.as_str())))
    }

    /// Tells a shard of a plan rolling back the decision for the unit's transactions it
    /// holds in doubt ([`Self::in_doubt_before_undo`]): those the plan knows prepared there,
    /// and those its agent's list names, under the unit's decision (read from the decision
    /// store when this leader has none; written as an abort when there is none at all: the
    /// unit never committed). True when nothing is left to resolve there (its undo may be
    /// asked); false while its answer is awaited, or it cannot be told yet.
    pub(super) async fn resolve_before_undo(&mut self, plan_id: &str, shard: &str) -> bool {
        if !self.in_doubt_before_undo(plan_id, shard) {
            return true;
        }
        let Some(conn_id) = self.agents.get(shard).map(|a| a.conn_id) else {
            return false;
        };
        let unknown = self.in_doubt_unknown.contains(shard);
        let Some(run) = self.plans.get_mut(plan_id) else {
            return false;
        };
        let unit_key = run.unit_key();
        let Some(sr) = run.shards.get_mut(shard) else {
            return true;
        };
        // (its list not read and nothing of it known: its next connect lists it. A Resolve
        // it could not carry out is sent again on the tick, after a pause.)
        if (unknown && sr.prepared.is_empty())
            || sr.resolve_sent_on == Some(conn_id)
            || sr
                .resolve_retry_at
                .is_some_and(|at| std::time::Instant::now() < at)
        {
            return false;
        }
        for g in self.in_doubt.get(shard).into_iter().flatten() {
            if gid::unit_of(g) == Some(unit_key.as_str()) {
                sr.prepared.entry(g.clone()).or_default();
            }
        }
        if sr.prepared.is_empty() {
            sr.resolved = true;
            return true;
        }
        let decision = match run.decision {
            Some(d) => d,
            None => {
                // none written: the unit's steps say whether it committed (its key lost
                // since), as a new leader's recovery reads them; else it never did
                let evident = run.unit_commit_evident();
                let found = match self.coordination.decision(&unit_key).await {
                    Ok(Some(d)) => Ok(d),
                    Ok(None) => self
                        .coordination
                        .decide(
                            &unit_key,
                            if evident {
                                Decision::Commit
                            } else {
                                Decision::Abort
                            },
                            self.epoch,
                        )
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match found {
                    Ok(d) => {
                        info!(plan = %plan_id, unit = %unit_key, decision = d.as_str(), shard = %shard, "a shard of a plan rolling back holds transactions of its unit in doubt: told the unit's decision before its undo");
                        let run = self.plans.get_mut(plan_id).expect("present");
                        run.decision = Some(d);
                        d
                    }
                    Err(e) => {
                        warn!(plan = %plan_id, unit = %unit_key, "reading the unit's decision failed; its in-doubt shard is told later: {e}");
                        return false;
                    }
                }
            }
        };
        let run = self.plans.get_mut(plan_id).expect("present");
        let Some(resolve) = run.resolve_for(shard, decision) else {
            return true;
        };
        if self
            .agents
            .get_mut(shard)
            .is_some_and(|a| a.send(Body::Resolve(resolve)))
            && let Some(sr) = run.shards.get_mut(shard)
        {
            sr.resolve_sent_on = Some(conn_id);
        }
        false
    }

    /// The agent of a shard forgotten while a plan commits attached again before the plan
    /// ended, with its part of the unit in hand: the forget is undone
    /// (`PlanRun::shard_back`), and the shard resolves under the decision as any other does,
    /// so the plan can end committed everywhere. In hand means every transaction of the
    /// unit this leader knows it prepared there (any, after a change of coordinator) is
    /// still in doubt there or was committed by the agent from the decision in etcd since
    /// it started. A shard back without them (its database restored from a backup, or
    /// made anew) stays forgotten: its part is not confirmed, whatever a Resolve would say
    /// of transactions it does not hold.
    pub(super) fn forgotten_shard_back(&mut self, shard: &str) {
        let held: std::collections::BTreeSet<&str> = self
            .in_doubt
            .get(shard)
            .into_iter()
            .chain(self.committed.get(shard))
            .flatten()
            .map(String::as_str)
            .collect();
        let ids: Vec<String> = self
            .plans
            .iter()
            .filter(|(_, run)| run.forgotten_shards().contains(shard))
            .filter(|(id, run)| {
                let unit = run.unit_key();
                let known: Vec<&str> = run
                    .shards
                    .get(shard)
                    .map(|sr| sr.prepared.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                let in_hand = if known.is_empty() {
                    held.iter().any(|g| gid::unit_of(g) == Some(unit.as_str()))
                } else {
                    known.iter().all(|g| held.contains(g))
                };
                if !in_hand {
                    info!(plan = %id, shard = %shard, "a forgotten shard's agent is back without the unit's transactions (neither in doubt nor committed from etcd since its start): it stays not confirmed");
                }
                in_hand
            })
            .map(|(id, _)| id.clone())
            .collect();
        for plan_id in ids {
            let run = self.plans.get_mut(&plan_id).expect("present");
            let updates = run.shard_back(shard);
            run.message = format!(
                "shard {shard} came back after it was forgotten: its part commits from the \
                 decision"
            );
            info!(plan = %plan_id, shard = %shard, "a forgotten shard came back while its plan commits");
            self.write(StoreOp::Steps {
                plan_id: plan_id.clone(),
                updates,
            });
            self.write_state(&plan_id);
        }
    }

    /// `plan forget-shard`: the unit's commit decision is written and carried out on every
    /// shard but this one, whose agent is gone for good (not attached, no liveness key): its
    /// part fails as "not confirmed", and the plan ends `failed` once the others have
    /// committed, releasing its shard locks. Refused while the agent is there, since it
    /// commits by itself; nothing else changes. The decision stays in etcd: an agent that
    /// comes back after all commits the shard's prepared transactions from it.
    pub(super) fn forget_shard(
        &mut self,
        plan_id: &str,
        shard: &str,
        actor: &Actor,
    ) -> Result<(), CoordinatorError> {
        let Some(run) = self.plans.get_mut(plan_id) else {
            // the service reads the store: ended, or not taken over yet
            return Err(CoordinatorError::PlanNotFound(plan_id.to_string()));
        };
        if run.state == PlanState::RollingBack {
            return self.forget_shard_undo(plan_id, shard, actor);
        }
        if run.state != PlanState::Committing {
            return Err(Conflict::NotCommitting {
                plan_id: plan_id.to_string(),
                now: run.state.to_string(),
            }
            .into());
        }
        let Some(sr) = run.shards.get(shard) else {
            return Err(super::commands::no_such_shard(run, shard));
        };
        // Nothing of the unit open there: committed (this leader saw it, or the steps were
        // stored applied before a takeover), forgotten already, or never in the unit. A
        // forget would only stop its later steps, and a unit after it could never commit.
        let done = if run.forgotten_shards().contains(shard) {
            Some("was forgotten already")
        } else if sr.resolved || !run.shard_has_open(shard) {
            Some("has nothing of the unit left to commit (its part committed, or it has none)")
        } else {
            None
        };
        if let Some(what) = done {
            return Err(Conflict::ShardResolved {
                plan_id: plan_id.to_string(),
                shard: shard.to_string(),
                what,
            }
            .into());
        }
        refuse_present(&self.agents, &self.live, plan_id, shard)?;
        let why = format!(
            "{}{} while the plan committed; its prepared transactions commit from the \
             decision in etcd if its agent comes back, and its journal says what applied",
            crate::plan::forgotten_prefix(shard),
            by_whom(actor)
        );
        warn!(plan = %plan_id, shard = %shard, operator = %actor.name, "shard forgotten while its plan commits");
        let updates = run.forget_shard(shard, &why);
        run.message = actor.explain(&format!("shard {shard} forgotten by {}", actor.name));
        self.write(StoreOp::Steps {
            plan_id: plan_id.to_string(),
            updates,
        });
        self.write(actor.audit("forget-shard", plan_id, &format!("shard {shard}")));
        self.write_state(plan_id);
        Ok(())
    }

    /// `plan forget-shard` of a plan rolling back: a shard whose agent is gone for good (its
    /// database decommissioned) is not waited for. Its undo is given up: the plan ends
    /// `rollback_failed` once the other shards are undone, naming the shard and what it
    /// holds of the plan, and lets go of its locks; `plan rollback` again undoes the rest
    /// once an agent is back there. Before, such a plan waited for good, and nothing an
    /// operator could do (retire, lock break, forget) ended it. Refused while the agent is
    /// there, or when the shard's undo is done.
    fn forget_shard_undo(
        &mut self,
        plan_id: &str,
        shard: &str,
        actor: &Actor,
    ) -> Result<(), CoordinatorError> {
        let run = self.plans.get(plan_id).expect("present");
        let Some(sr) = run.shards.get(shard) else {
            return Err(super::commands::no_such_shard(run, shard));
        };
        if sr.rollback == crate::plan::RollbackState::Done {
            return Err(Conflict::ShardResolved {
                plan_id: plan_id.to_string(),
                shard: shard.to_string(),
                what: "has its undo done (or nothing to undo)",
            }
            .into());
        }
        refuse_present(&self.agents, &self.live, plan_id, shard)?;
        let why = format!(
            "shard {shard} forgotten by {} while the plan rolled back: what the plan applied \
             there is not undone (`flotilla plan rollback {plan_id}` undoes it once an agent is \
             back there; a transaction of an atomic unit prepared there is rolled back under \
             the unit's abort decision when its agent is back)",
            by_whom(actor)
        );
        warn!(plan = %plan_id, shard = %shard, operator = %actor.name, "shard forgotten while its plan rolls back");
        let run = self.plans.get_mut(plan_id).expect("present");
        let updates = run.forget_undo(shard, &why);
        self.write(StoreOp::Steps {
            plan_id: plan_id.to_string(),
            updates,
        });
        self.write(actor.audit("forget-shard", plan_id, &format!("shard {shard}")));
        self.write_state(plan_id);
        Ok(())
    }
}

/// A forget of `shard` is refused while its agent is there (attached, or alive in etcd): it
/// commits, or undoes, by itself.
fn refuse_present(
    agents: &std::collections::HashMap<String, super::outbound::AgentConn>,
    live: &std::collections::BTreeSet<String>,
    plan_id: &str,
    shard: &str,
) -> Result<(), CoordinatorError> {
    let how = if agents.contains_key(shard) {
        "attached to this coordinator"
    } else if live.contains(shard) {
        "alive (its liveness key is in etcd)"
    } else {
        return Ok(());
    };
    Err(Conflict::AgentPresent {
        plan_id: plan_id.to_string(),
        shard: shard.to_string(),
        how,
    }
    .into())
}

/// Who forgot a shard, with their reason: `alice (its database is lost)`.
fn by_whom(actor: &Actor) -> String {
    if actor.reason.is_empty() {
        actor.name.clone()
    } else {
        format!("{} ({})", actor.name, actor.reason)
    }
}
