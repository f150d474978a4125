//! Approvals: a plan whose environment and risk need them (the coordinator's approval
//! matrix) is stored `awaiting_approval` and touches nothing; `plan approve` records one
//! approval in the audit trail (never the submitter's, only in a role the rule accepts),
//! and the last one the rule needs starts the plan as a submit would. `plan reject` (or a
//! cancel) ends it with nothing run.
//!
//! The approvals given are the audit trail's `approve` rows: one record, read back after
//! a restart, so a plan awaiting approval keeps the ones it had.
use flotilla_core::state::{PlanState, StepState};
use flotilla_core::{PlanSpec, pb};
use prost::Message;
use tracing::info;

use crate::actor::Actor;
use crate::approvals::{self, Risk, Rule};
use crate::error::{Conflict, CoordinatorError};
use crate::service::Coordinator;
use crate::store::{PlanRow, StepUpdate, StoreError, StoreOp};

/// The role written for an approval given in no role (a rule that accepts any).
const ANY_ROLE: &str = "any";

/// Which of the approver's roles the approval is given in: one the rule accepts,
/// preferring one of its `require`d roles that no approval has filled yet (an approver
/// who is both `lead` and `dba` fills the missing `dba`). None when the rule accepts
/// none of them.
fn approving_role(
    roles: &[String],
    rule: Option<&Rule>,
    given: &[(String, String)],
) -> Option<String> {
    let mut candidates: Vec<&str> = roles
        .iter()
        .map(|r| match r.trim() {
            "" => ANY_ROLE,
            r => r,
        })
        .collect();
    if candidates.is_empty() {
        candidates.push(ANY_ROLE);
    }
    let Some(rule) = rule else {
        return Some(candidates[0].to_string());
    };
    let accepted: Vec<&str> = candidates.into_iter().filter(|r| rule.accepts(r)).collect();
    let unfilled =
        |r: &&str| rule.require.iter().any(|q| q == r) && !given.iter().any(|(_, g)| g == r);
    accepted
        .iter()
        .copied()
        .find(unfilled)
        .or(accepted.first().copied())
        .map(str::to_string)
}

/// The roles an approver offered, for a refusal.
fn shown_roles(roles: &[String]) -> String {
    let shown: Vec<&str> = roles
        .iter()
        .map(|r| r.trim())
        .filter(|r| !r.is_empty())
        .collect();
    match shown.is_empty() {
        true => ANY_ROLE.to_string(),
        false => shown.join("` or `"),
    }
}

impl Coordinator {
    /// What approvals a plan must wait for (None: it starts at once).
    pub(super) fn approval_needed(
        &self,
        spec: &PlanSpec,
    ) -> Result<Option<String>, CoordinatorError> {
        if self.inner.approvals.is_empty() {
            return Ok(None);
        }
        let (risk, rule) = self.rule_for(&spec.environment, spec)?;
        Ok(rule.map(|r| {
            format!(
                "{} ({} plan in `{}`)",
                r.describe(),
                risk,
                env_name(&spec.environment)
            )
        }))
    }

    /// The plan's risk and the rule of the matrix that applies to it, if any.
    fn rule_for(
        &self,
        environment: &str,
        spec: &PlanSpec,
    ) -> Result<(Risk, Option<Rule>), CoordinatorError> {
        let risk = approvals::plan_risk(spec).map_err(CoordinatorError::InvalidRequest)?;
        Ok((risk, self.inner.approvals.rule(environment, risk).cloned()))
    }

    /// An approval refused (the submitter's own, a role the rule does not take, a second
    /// one): in the audit trail under the plan, as a role's refusal is (they were not).
    async fn approval_refused(
        &self,
        epoch: u64,
        actor: &Actor,
        plan_id: &str,
        why: String,
    ) -> CoordinatorError {
        self.write_under(
            epoch,
            actor.audit("denied", plan_id, &format!("approve: {why}")),
        );
        self.flush().await;
        CoordinatorError::NotAllowed(why)
    }

    /// Whether the plan's submit skipped the promotion gate (`--skip-promotion-check`).
    async fn skipped_the_gate(&self, plan_id: &str) -> Result<bool, CoordinatorError> {
        Ok(self
            .inner
            .store
            .audit(plan_id)
            .await?
            .iter()
            .any(|(_, _, action, _)| action == "skip-promotion-check"))
    }

    /// `plan approve`: one approval, in one of `roles` (the approver's: from its credential,
    /// or `--role`); the last one the plan's rule needs starts it.
    pub async fn approve(
        &self,
        plan_id: &str,
        actor: Actor,
        roles: &[String],
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        let _one_at_a_time = self.inner.approving.lock().await;
        let row = self
            .awaiting_or_audited(epoch, &actor, plan_id, "approve")
            .await?;
        let submitter = Actor::new(&row.submitted_by, "").name;
        if actor.name == submitter {
            let why = format!(
                "{} submitted plan {plan_id} and cannot approve it: another person must",
                actor.name
            );
            return Err(self.approval_refused(epoch, &actor, plan_id, why).await);
        }
        let spec = stored_spec(&row)?;
        let (risk, rule) = self.rule_for(&row.environment, &spec)?;
        let mut given = self.approvals_of(plan_id).await?;
        let Some(role) = approving_role(roles, rule.as_ref(), &given) else {
            let rule = rule.as_ref().expect("a role is only refused by a rule");
            let why = format!(
                "{} cannot approve plan {plan_id} as `{}`: the approval rule for {risk} plans in `{}` (line {}) accepts {} (say which with --role)",
                actor.name,
                shown_roles(roles),
                env_name(&row.environment),
                rule.line,
                rule.roles.join(", ")
            );
            return Err(self.approval_refused(epoch, &actor, plan_id, why).await);
        };
        let role = role.as_str();
        if given.iter().any(|(name, _)| *name == actor.name) {
            let why = format!(
                "{} has approved plan {plan_id} already; another person must",
                actor.name
            );
            return Err(self.approval_refused(epoch, &actor, plan_id, why).await);
        }
        given.push((actor.name.clone(), role.to_string()));
        let missing = rule.as_ref().and_then(|r| r.missing(&given));
        // The approval that starts the plan checks the promotion gate again: what the plan
        // was promoted from may have been rolled back (or failed) there while it waited, and
        // the approvers signed off a change with no pass before it any more (a production
        // plan started after its staging run was undone). Unless its submit skipped the
        // gate (an admin's audited override). Refused, nothing recorded: the plan waits on.
        if missing.is_none() && !self.skipped_the_gate(plan_id).await? {
            let spec = stored_spec(&row)?;
            if let Err(refused) = self
                .promotion_gate(&spec, &super::Promotion::Check, super::Mode::DryRun)
                .await
            {
                let why = format!(
                    "plan {plan_id} cannot start: {refused}; it stays awaiting approval (cancel \
                     it, or approve it once the environment before passes again)"
                );
                return Err(self.approval_refused(epoch, &actor, plan_id, why).await);
            }
        }
        let needed = rule.as_ref().map_or(0, |r| r.approvals);
        // (counted as given and needed: a role the rule requires may make more than the
        // count needed, and "2 of 1" read as a miscount)
        let given_n = match given.len() {
            1 => "1 approval".to_string(),
            n => format!("{n} approvals"),
        };
        let what = match &missing {
            Some(m) => format!("{given_n}, {needed} needed; still needs {m}"),
            None => format!("{given_n}, {needed} needed; approved"),
        };
        self.write_under(
            epoch,
            actor.audit("approve", plan_id, &approvals::approval_detail(role, &what)),
        );
        crate::metrics::plan_approval("approve");
        info!(plan = %plan_id, approver = %actor.name, role, "plan approval: {what}");
        match missing {
            Some(m) => {
                self.write_under(
                    epoch,
                    StoreOp::PlanState {
                        plan_id: plan_id.to_string(),
                        state: PlanState::AwaitingApproval,
                        message: format!("awaiting {m}"),
                        ends: row.ends,
                    },
                );
                self.flush().await;
                self.changed(plan_id, None);
                self.status(plan_id).await
            }
            None => self.start_approved(&row, epoch).await,
        }
    }

    /// What a plan awaiting approval waits for under the approval matrix as it is now (the
    /// stored message says what it waited for at its last approval: a matrix changed at a
    /// restart made it wrong until the next). None when it cannot be read.
    pub(crate) async fn awaiting_now(&self, row: &PlanRow) -> Option<String> {
        let spec = stored_spec(row).ok()?;
        let (risk, rule) = self.rule_for(&row.environment, &spec).ok()?;
        let given = self.approvals_of(&row.id).await.ok()?;
        Some(match rule.as_ref().and_then(|r| r.missing(&given)) {
            // none given yet: the whole rule, as the submit said it
            Some(_) if given.is_empty() => format!(
                "awaiting {} ({risk} plan in `{}`)",
                rule.as_ref().expect("a rule misses approvals").describe(),
                env_name(&row.environment)
            ),
            Some(m) => format!("awaiting {m}"),
            None => format!(
                "awaiting one more `plan approve`, which starts it: the approvals given ({}) \
                 meet the approval rule as it is now (changed since)",
                given.len()
            ),
        })
    }

    /// Starts a plan whose approvals are in, as a submit would have.
    async fn start_approved(
        &self,
        row: &PlanRow,
        epoch: u64,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        let mut run = self.rebuild(row).await?;
        // It never ran: nothing of it can be prepared anywhere.
        run.inherited = false;
        // What its submit found applied may be undone since (a rollback while it waited).
        run.applied_read = crate::plan::AppliedRead::BeforeApproval;
        self.write_under(
            epoch,
            StoreOp::Together(vec![
                StoreOp::PlanState {
                    plan_id: row.id.clone(),
                    state: PlanState::Running,
                    message: String::new(),
                    ends: row.ends,
                },
                // its place among the plans waiting for shard locks, with its state: a term
                // ending right after this flush leaves the next leader its place too
                StoreOp::Queued {
                    plan_id: row.id.clone(),
                    at_ms: crate::store::now_ms(),
                },
            ]),
        );
        self.flush().await;
        self.term_ends_here_for_a_fault_test().await;
        if let Err(ended) = self.still_leading_in(epoch) {
            // stored before the next term fenced the store, the start is that term's now
            self.landed_as_the_term_ended(&row.id, ended, |now| {
                now.state != PlanState::AwaitingApproval
            })
            .await?;
            return self.status(&row.id).await;
        }
        info!(plan = %row.id, "plan approved; starting");
        let status = match self.start_run(run).await? {
            Some(status) => status,
            // stored under a term that ended since: the next one runs it
            None => self.status(&row.id).await?,
        };
        self.count_awaiting().await;
        Ok(status)
    }

    /// `plan reject`: the plan ends `rejected`, nothing having run.
    pub async fn reject(
        &self,
        plan_id: &str,
        actor: Actor,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        let epoch = self.leader_epoch()?;
        let _one_at_a_time = self.inner.approving.lock().await;
        let row = self
            .awaiting_or_audited(epoch, &actor, plan_id, "reject")
            .await?;
        self.write_under(epoch, actor.audit("reject", plan_id, ""));
        crate::metrics::plan_approval("reject");
        let message = actor.explain(&format!("rejected by {}", actor.name));
        self.end_unstarted(&row, PlanState::Rejected, message, epoch)
            .await
    }

    /// A cancel of a plan awaiting approval: it ends `cancelled`, nothing having run.
    /// None when the plan is not awaiting approval (the engine handles the cancel).
    pub(crate) async fn cancel_awaiting(
        &self,
        plan_id: &str,
        actor: &Actor,
    ) -> Result<Option<pb::PlanStatus>, CoordinatorError> {
        let _one_at_a_time = self.inner.approving.lock().await;
        // the term first: the row read under it is what its writes decide on
        let epoch = self.leader_epoch()?;
        let Some(row) = self.inner.store.plan(plan_id).await? else {
            return Ok(None);
        };
        if row.state != PlanState::AwaitingApproval {
            return Ok(None);
        }
        self.write_under(
            epoch,
            actor.audit("cancel", plan_id, "while awaiting approval"),
        );
        let message = actor.explain(&format!("cancelled by {} before approval", actor.name));
        self.end_unstarted(&row, PlanState::Cancelled, message, epoch)
            .await
            .map(Some)
    }

    /// Ends a plan that never started: its steps not run, its state `state`; stored under
    /// `epoch`, the term that found it awaiting approval.
    async fn end_unstarted(
        &self,
        row: &PlanRow,
        state: PlanState,
        message: String,
        epoch: u64,
    ) -> Result<pb::PlanStatus, CoordinatorError> {
        let updates = self
            .inner
            .store
            .steps(&row.id)
            .await?
            .into_iter()
            .filter(|s| s.state == StepState::Pending)
            .map(|s| StepUpdate {
                migration_id: s.migration_id,
                shard: s.shard,
                tenant: s.tenant,
                state: StepState::NotRun,
                sqlstate: String::new(),
                message: String::new(),
                phase: String::new(),
                detail: String::new(),
                duration_ms: 0,
                run_id: None,
            })
            .collect();
        self.write_under(
            epoch,
            StoreOp::Steps {
                plan_id: row.id.clone(),
                updates,
            },
        );
        self.write_under(
            epoch,
            StoreOp::PlanState {
                plan_id: row.id.clone(),
                state,
                message: message.clone(),
                ends: state,
            },
        );
        self.flush().await;
        // (an approver's rejection, or an operator's cancel of a plan awaiting approval)
        crate::metrics::plan_finished(state, true);
        self.count_awaiting().await;
        info!(plan = %row.id, state = state.as_str(), "{message}");
        let status = self.status(&row.id).await?;
        self.changed(&row.id, Some(status.clone()));
        Ok(status)
    }

    /// The stored plan, if it awaits approval; a conflict naming its state if not.
    /// [`Self::awaiting`] for an approver's `plan approve` / `plan reject`: a refusal (the
    /// plan rejected, approved or running already) is in the plan's audit trail, as the
    /// approver's other refusals are (a second reject was in none).
    async fn awaiting_or_audited(
        &self,
        epoch: u64,
        actor: &Actor,
        plan_id: &str,
        action: &'static str,
    ) -> Result<PlanRow, CoordinatorError> {
        match self.awaiting(plan_id, action).await {
            Err(CoordinatorError::Conflict(refused @ Conflict::NotAwaitingApproval { .. })) => {
                self.write_under(
                    epoch,
                    actor.audit("denied", plan_id, &format!("{action}: {refused}")),
                );
                self.flush().await;
                Err(refused.into())
            }
            other => other,
        }
    }

    async fn awaiting(
        &self,
        plan_id: &str,
        action: &'static str,
    ) -> Result<PlanRow, CoordinatorError> {
        let row = self.stored_plan(plan_id).await?;
        if row.state != PlanState::AwaitingApproval {
            return Err(Conflict::NotAwaitingApproval {
                plan_id: plan_id.to_string(),
                state: row.state.as_str().to_string(),
                action,
            }
            .into());
        }
        Ok(row)
    }

    /// The approvals a plan has: (approver, role), from the audit trail. With operators
    /// (authentication on), one counts while its approver holds the name it approved under:
    /// revoked since (a person gone, a key compromised), or the name given to someone else
    /// since, it does not (a revoked approver's approval started a production plan).
    async fn approvals_of(&self, plan_id: &str) -> Result<Vec<(String, String)>, StoreError> {
        let operators = self.inner.store.operators().await?;
        let holders: Option<std::collections::BTreeMap<&str, i64>> =
            (!operators.is_empty()).then(|| {
                operators
                    .iter()
                    .filter(|o| o.revoked_at_ms == 0)
                    .map(|o| (o.name.as_str(), o.created_at_ms))
                    .collect()
            });
        Ok(self
            .inner
            .store
            .audit(plan_id)
            .await?
            .into_iter()
            .filter(|(_, _, action, _)| action == "approve")
            .filter(|(at, actor, _, _)| {
                holders
                    .as_ref()
                    .is_none_or(|h| h.get(actor.as_str()).is_some_and(|since| since <= at))
            })
            .map(|(_, actor, _, detail)| {
                let role = approvals::approval_role(&detail).unwrap_or(ANY_ROLE);
                (actor, role.to_string())
            })
            .collect())
    }

    /// Counts the plans awaiting approval again, for the gauge (after one came or went,
    /// and when this coordinator starts to lead).
    pub(crate) async fn count_awaiting(&self) {
        match self.inner.store.count_in(PlanState::AwaitingApproval).await {
            Ok(n) => crate::metrics::plans_awaiting_approval(n),
            Err(e) => tracing::warn!("cannot count the plans awaiting approval: {e}"),
        }
    }

    /// Tells watchers the plan changed (`ended`: for good, with its final status).
    fn changed(&self, plan_id: &str, ended: Option<pb::PlanStatus>) {
        // no watcher is no one to tell
        let _ = self
            .inner
            .changes
            .send((plan_id.to_string(), ended.map(std::sync::Arc::new)));
    }

    /// `plan audit`: the audit trail, of one plan or all.
    pub async fn audit_trail(
        &self,
        plan_id: &str,
        since_ms: u64,
        limit: u32,
    ) -> Result<pb::ListAuditResponse, CoordinatorError> {
        let limit = if limit == 0 { 1000 } else { limit.min(10_000) };
        let plan = Some(plan_id.trim()).filter(|p| !p.is_empty());
        let rows = self
            .inner
            .store
            .audit_trail(plan, since_ms.min(i64::MAX as u64) as i64, limit as i64)
            .await?;
        Ok(pb::ListAuditResponse {
            entries: rows
                .into_iter()
                .map(|r| pb::AuditEntry {
                    at_ms: r.at_ms.max(0) as u64,
                    actor: r.actor,
                    action: r.action,
                    plan_id: r.plan_id,
                    detail: r.detail,
                })
                .collect(),
        })
    }
}

/// A plan's environment as messages name it.
fn env_name(environment: &str) -> &str {
    if environment.is_empty() {
        "(none)"
    } else {
        environment
    }
}

/// The plan as it was submitted, from its stored row.
fn stored_spec(row: &PlanRow) -> Result<PlanSpec, CoordinatorError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        plan: row.id.clone(),
        what: "spec",
        reason,
    };
    let bytes = hex::decode(&row.spec_hex).map_err(|e| corrupt(e.to_string()))?;
    let raw = pb::PlanSpec::decode(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
    Ok(PlanSpec::try_from(raw)?)
}
