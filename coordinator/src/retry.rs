//! `plan retry`: after an operator fixed the cause, the failed and not-run steps of an
//! ended plan run again: the same plan (id, checksums, waves, budget), a new attempt for
//! each step, applied targets untouched.
use std::collections::BTreeSet;

use flotilla_core::state::PlanState;
use tracing::info;

use crate::actor::Actor;
use crate::engine::Event;
use crate::error::{Conflict, CoordinatorError, Refusal};
use crate::service::Coordinator;
use crate::store::{StoreOp, WaveRow};

impl Coordinator {
    pub async fn retry(
        &self,
        plan_id: &str,
        targets: &[String],
        ignore_later: bool,
        mut actor: Actor,
    ) -> Result<flotilla_core::pb::PlanStatus, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        // (not beside a rollback or another retry reading the same ended plan: see `reviving`)
        let _reviving = self.inner.reviving.lock().await;
        // A plan in motion (a retry already under way, a rollback) is not retried.
        let id = plan_id.to_string();
        if let Some(status) = self
            .to_engine(|reply| Event::Status { plan_id: id, reply })
            .await?
        {
            return Err(Conflict::NotRetryable {
                plan_id: plan_id.to_string(),
                state: status
                    .summary
                    .and_then(|s| s.state.parse().ok())
                    .unwrap_or(PlanState::Running),
            }
            .into());
        }
        let row = self.stored_plan(plan_id).await?;
        if !matches!(
            row.state,
            PlanState::Failed | PlanState::Halted | PlanState::CompletedWithFailures
        ) {
            return Err(Conflict::NotRetryable {
                plan_id: plan_id.to_string(),
                state: row.state,
            }
            .into());
        }
        let mut run = self.rebuild(&row).await?;
        if run.spec.two_phase() {
            // Its units' decisions stand in etcd: steps run again under one would be
            // resolved by it (an agent's sweep commits them) before the rest prepared.
            return Err(Refusal::AtomicRetry {
                plan_id: plan_id.to_string(),
            }
            .into());
        }
        let only = if targets.is_empty() {
            None
        } else {
            let mut set = BTreeSet::new();
            for name in targets {
                // `shard/tenant` names one target; `shard` names the shard and its tenants.
                let name = name.trim();
                let found: Vec<usize> = (0..run.targets.len())
                    .filter(|&i| {
                        let t = &run.targets[i];
                        t.to_string() == name || (!name.contains('/') && t.shard == name)
                    })
                    .collect();
                if found.is_empty() {
                    return Err(Refusal::UnknownTarget {
                        plan_id: plan_id.to_string(),
                        target: name.to_string(),
                    }
                    .into());
                }
                set.extend(found);
            }
            Some(set)
        };
        let updates = run.retry(only.as_ref());
        if updates.is_empty() {
            return Err(Conflict::NothingToRetry {
                plan_id: plan_id.to_string(),
            }
            .into());
        }
        // Other plans that applied migrations since this one was submitted, on the targets
        // it runs again on: its steps would go over theirs, older migrations after newer
        // ones (a week-old plan retried re-ran its SQL on top of six later plans').
        let again: BTreeSet<(String, String)> = updates
            .iter()
            .map(|u| (u.shard.clone(), u.tenant.clone()))
            .collect();
        let since = row.created_at_ms;
        let later = self.plans_after(plan_id, |shard, tenant, _| {
            again
                .contains(&(shard.to_string(), tenant.to_string()))
                .then_some(crate::service::After::AppliedAt(since))
        });
        crate::service::refuse_or_go_past(
            &later,
            ignore_later,
            &mut actor,
            "past later plans",
            |later| Conflict::LaterPlansRetry {
                plan_id: plan_id.to_string(),
                later,
            },
        )?;
        retry_checked_failpoint().await;
        let n = updates.len();
        let steps = if n == 1 { "step" } else { "steps" };
        run.message = actor.explain(&format!(
            "{}{n} {steps} requested by {}",
            crate::plan::RETRY_NOTE,
            actor.name
        ));
        run.retry_note = run.message.clone();
        info!(plan = %plan_id, steps = n, "{}", run.message);
        // One transaction: a plan stored failed with its steps pending again would find
        // nothing to retry, and no coordinator would continue it.
        let mut together = vec![StoreOp::Steps {
            plan_id: plan_id.to_string(),
            updates,
        }];
        if !run.spec.rollout.waves.is_empty() {
            let waves = run
                .waves
                .iter()
                .enumerate()
                .map(|(i, w)| WaveRow {
                    idx: i as i64,
                    name: w.name.clone(),
                    state: w.state,
                    bake_until_ms: w.bake_until_ms,
                    gate: String::new(),
                })
                .collect();
            together.push(StoreOp::Waves {
                plan_id: plan_id.to_string(),
                waves,
            });
        }
        together.push(StoreOp::PlanState {
            plan_id: plan_id.to_string(),
            state: PlanState::Running,
            message: run.message.clone(),
            ends: PlanState::RolledBack,
        });
        let what = if targets.is_empty() {
            format!("{n} steps")
        } else {
            format!("{n} steps on {}", targets.join(", "))
        };
        together.push(actor.audit("retry", plan_id, &what));
        // its place among the plans waiting for shard locks, with its state: a term ending
        // right after this flush leaves the next leader its place too
        together.push(StoreOp::Queued {
            plan_id: plan_id.to_string(),
            at_ms: crate::store::now_ms(),
        });
        // under the term that checked the plan: a leader deposed meanwhile stores nothing
        self.write_under(epoch, StoreOp::Together(together));
        self.flush().await;
        self.term_ends_here_for_a_fault_test().await;
        if let Err(ended) = self.still_leading_in(epoch) {
            // stored before the next term fenced the store, the retry is that term's now
            // the retry's state write stamps the row, whatever state the plan is in by now
            let (before, stamped) = (row.state, row.updated_at_ms);
            self.landed_as_the_term_ended(plan_id, ended, |now| {
                now.state != before || now.updated_at_ms != stamped
            })
            .await?;
            return self.status(plan_id).await;
        }
        match self.start_run(run).await? {
            Some(status) => Ok(status),
            // stored under a term that ended since: the next one runs it
            None => self.status(plan_id).await,
        }
    }
}

/// `coordinator::retry_checked=return(MS)`: a retry that checked the plan waits MS
/// milliseconds before it stores anything, for a fault test to send another command then.
async fn retry_checked_failpoint() {
    if let Some(ms) = retry_checked_ms() {
        tracing::warn!(ms, "failpoint coordinator::retry_checked: the retry waits");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

fn retry_checked_ms() -> Option<u64> {
    // A misspelt delay fails loudly: taken for none, the fault test would prove nothing.
    fail::fail_point!("coordinator::retry_checked", |ms: Option<String>| {
        let ms = ms.unwrap_or_default();
        Some(ms.trim().parse().unwrap_or_else(|_| {
            panic!("failpoint coordinator::retry_checked=return(MS): `{ms}` is not a number of milliseconds")
        }))
    });
    None
}
