//! Environments at admission: a plan for an environment must name a known one, touches
//! only that environment's shards, and passes the promotion gate: every migration it
//! carries (same id, same checksum) has completed in the environment before it.
//!
//! "Completed in an environment" is read from the control store: a plan for that
//! environment which carried the migration with the same checksum ended `completed`
//! (every target it selected there applied it, or had it already). Not from the agents'
//! journals: a plan's completion is the one statement that covers every target the
//! migration selects in the environment, including shards whose agents are away now,
//! whereas the leader's copy of the journals only holds what attached agents reported.
//! The shard stays the source of truth for what is applied where: a later `plan rollback`
//! of that plan ends it `rolled_back`, and it no longer counts. `completed_with_failures`
//! does not count either (some targets failed).
use std::collections::BTreeSet;

use flotilla_core::state::PlanState;
use flotilla_core::{PlanSpec, pb};
use prost::Message;
use tracing::warn;

use crate::actor::Actor;
use crate::error::{CoordinatorError, Refusal};
use crate::service::Coordinator;
use crate::store::{PlanRow, StoreOp};

/// How the promotion gate treats a submitted plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    /// An operator's plan: the gate applies.
    Check,
    /// `--skip-promotion-check --reason TEXT`: admitted whatever it lacks, the override
    /// audited with who and why.
    Skip { reason: String },
    /// A catch-up plan: migrations of plans that completed in its environment already.
    CatchUp,
}

/// Where one of a plan's migrations stands in the environment before.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stand {
    NeverRan,
    /// A plan there carried it with another checksum (the newest such plan).
    OtherChecksum {
        plan_id: String,
        checksum: String,
    },
    /// A plan there carried it with this checksum but did not complete (the newest), and
    /// the newest plan there that completed it with another checksum, if one did: the
    /// version that ran there is not the one being promoted.
    NotCompleted {
        plan_id: String,
        state: PlanState,
        other_completed: Option<(String, String)>,
    },
    /// It completed there (this plan, the newest to), with settings its migration.toml has
    /// made less strict since (outside the checksum, which covers its SQL): each change.
    Weakened {
        plan_id: String,
        changes: Vec<String>,
    },
    /// It completed there (this plan, the newest to) with this up SQL and other files or
    /// settings outside the checksum: each named (`down.sql`, `verify.sql`, its
    /// transaction mode).
    OtherwiseChanged {
        plan_id: String,
        what: Vec<&'static str>,
    },
}

impl Coordinator {
    /// A plan's environment against the coordinator's list: with environments configured,
    /// an operator's plan must name one of them.
    /// Without an environments list the plan's environment is the name its submitter gives,
    /// and the approval matrix asks by that name: a target labelled for another environment
    /// (its `--environment-label`, `env` unless given) is refused, or naming `staging` took a
    /// plan to production's shards without production's approvals. Targets without the
    /// label are not checked.
    pub(super) fn environment_labels_agree(
        &self,
        spec: &PlanSpec,
        expansion: &crate::planner::Expansion,
        promotion: &Promotion,
    ) -> Result<(), CoordinatorError> {
        let envs = &self.inner.environments;
        if !envs.is_empty() || *promotion == Promotion::CatchUp || self.inner.approvals.is_empty() {
            return Ok(());
        }
        let others: Vec<String> = expansion
            .targets
            .iter()
            .zip(&expansion.labels)
            .filter_map(|(t, labels)| {
                let env = labels.get(&envs.label)?;
                // (names compared as catch-up compares them: without case)
                (!env.eq_ignore_ascii_case(&spec.environment))
                    .then(|| format!("{t} ({}={env})", envs.label))
            })
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        Err(Refusal::OtherEnvironment {
            environment: if spec.environment.is_empty() {
                "no environment".into()
            } else {
                format!("`{}`", spec.environment)
            },
            count: others.len(),
            targets: crate::error::some_of(&others, 5),
        }
        .into())
    }

    pub(super) fn check_environment(
        &self,
        spec: &PlanSpec,
        promotion: &Promotion,
    ) -> Result<(), CoordinatorError> {
        let envs = &self.inner.environments;
        if *promotion == Promotion::CatchUp {
            return Ok(());
        }
        if envs.is_empty() {
            // Without an environments list the approval matrix's environments are the ones
            // known: a plan for `prod` or `Production` matched no `production` rule and
            // needed no approval at all. (A plan naming none meets the `*` rules only.)
            let named = self.inner.approvals.environments();
            if !spec.environment.is_empty()
                && !named.is_empty()
                && !named.contains(&spec.environment.as_str())
            {
                return Err(Refusal::UnknownEnvironment {
                    environment: spec.environment.clone(),
                    known: format!(
                        "the approval matrix's {} (name it there, with `approvals = 0` if it needs none)",
                        named.join(", ")
                    ),
                }
                .into());
            }
            return Ok(());
        }
        if spec.environment.is_empty() {
            return Err(Refusal::NoEnvironment {
                known: envs.names(),
            }
            .into());
        }
        if envs.position(&spec.environment).is_none() {
            return Err(Refusal::UnknownEnvironment {
                environment: spec.environment.clone(),
                known: envs.names(),
            }
            .into());
        }
        Ok(())
    }

    /// The promotion gate. Refuses a plan whose migrations have not all completed in the
    /// environment before its own, naming each and where it stands; with `Skip`, admits it
    /// and returns the audit row of the override (written once the plan has an id).
    pub(super) async fn promotion_gate(
        &self,
        spec: &PlanSpec,
        promotion: &Promotion,
        mode: super::Mode,
    ) -> Result<Option<impl FnOnce(&str) -> StoreOp + use<>>, CoordinatorError> {
        let envs = &self.inner.environments;
        if envs.is_empty() || *promotion == Promotion::CatchUp {
            return Ok(None);
        }
        let actor = match promotion {
            Promotion::Skip { reason } => {
                // Who may skip it (an admin, with authentication on) is checked at the API,
                // from the credential: `skip_promotion_allowed`.
                Some(Actor::new(&spec.submitted_by, reason))
            }
            _ => None,
        };
        let lacking = match envs.before(&spec.environment) {
            Some(before) => {
                let plans = self.inner.store.environment_plans(before).await?;
                let stored = stored_migrations(&plans);
                let undone = self.undone_since(spec, &stored).await?;
                lacking_in(spec, &stored, &undone)
                    .into_iter()
                    .map(|(id, stand)| describe(&id, &stand, before))
                    .collect()
            }
            None => Vec::new(),
        };
        let before = envs
            .before(&spec.environment)
            .unwrap_or_default()
            .to_string();
        let outcome = match (&actor, lacking.is_empty()) {
            (Some(_), _) => "skipped",
            (None, true) => "passed",
            (None, false) => "refused",
        };
        // (a dry run's answer is not one of the gate's decisions)
        if mode == super::Mode::Submit {
            crate::metrics::promotion_check(&spec.environment, outcome);
        }
        match actor {
            None if lacking.is_empty() => Ok(None),
            None => Err(Refusal::NotPromoted {
                environment: spec.environment.clone(),
                before,
                count: lacking.len(),
                lacking: lacking.join("; "),
            }
            .into()),
            Some(actor) => {
                let what = if lacking.is_empty() {
                    format!(
                        "promotion check of `{}` skipped (nothing was missing)",
                        spec.environment
                    )
                } else {
                    warn!(plan = %spec.name, environment = %spec.environment, actor = %actor.name,
                        "promotion check skipped: {}", lacking.join("; "));
                    format!(
                        "promotion check of `{}` skipped: {}",
                        spec.environment,
                        lacking.join("; ")
                    )
                };
                Ok(Some(move |plan_id: &str| {
                    actor.audit("skip-promotion-check", plan_id, &what)
                }))
            }
        }
    }
}

/// Completions that no longer stand, by migration: (the completed plans, the plan whose
/// undo took the migration out from under them). See [`Coordinator::undone_since`].
type Undone = std::collections::BTreeMap<String, (BTreeSet<String>, String)>;

impl Coordinator {
    /// For each of `spec`'s migrations, the completions in the environment before (newest
    /// first, up to the newest that stands) whose migration a later undo took out: a plan
    /// that found it applied by another plan on a target (`already_applied` there) and
    /// completed, and that other plan's rollback (or cancel's, or failed rollback's) undid it
    /// on that target since. Such a completion did nothing there, and passed the gate for a
    /// change no longer in the environment. Per target: an undo on other targets (a
    /// catch-up's on one new tenant, another region's plan) leaves it standing.
    async fn undone_since(
        &self,
        spec: &PlanSpec,
        stored: &Stored<'_>,
    ) -> Result<Undone, CoordinatorError> {
        let mut out = Undone::new();
        let undoers: Vec<&PlanRow> = stored
            .iter()
            .map(|(r, _)| *r)
            .filter(|r| {
                !matches!(
                    r.state,
                    PlanState::Completed | PlanState::CompletedWithFailures
                )
            })
            .collect();
        if undoers.is_empty() {
            return Ok(out);
        }
        for m in &spec.migrations {
            let id = m.id.as_str();
            let mut completions: Vec<&PlanRow> = stored
                .iter()
                .filter(|(r, ms)| {
                    r.state == PlanState::Completed
                        && ms.iter().any(|t| t.id == id && t.checksum == m.checksum)
                })
                .map(|(r, _)| *r)
                .collect();
            completions.sort_by_key(|r| std::cmp::Reverse(r.updated_at_ms));
            for p in completions {
                let mut by = None;
                for r in undoers.iter().filter(|r| r.updated_at_ms > p.updated_at_ms) {
                    if self.inner.store.undone_under(&r.id, &p.id, id).await? {
                        by = Some(r.id.clone());
                        break;
                    }
                }
                let Some(by) = by else {
                    // the newest completion that stands: the gate passes on it
                    break;
                };
                let entry = out
                    .entry(id.to_string())
                    .or_insert_with(|| (BTreeSet::new(), by));
                entry.0.insert(p.id.clone());
            }
        }
        Ok(out)
    }
}

/// An environment's plans, newest first, each with the migrations it carried (its stored
/// spec decoded once, for the gate's reads of it).
type Stored<'a> = Vec<(&'a PlanRow, Vec<pb::Migration>)>;

/// [`Stored`] of `plans` (oldest first, as the store gives them).
fn stored_migrations(plans: &[PlanRow]) -> Stored<'_> {
    plans
        .iter()
        .rev()
        .filter_map(|row| {
            let bytes = hex::decode(&row.spec_hex).ok()?;
            let Ok(raw) = pb::PlanSpec::decode(bytes.as_slice()) else {
                warn!(plan = %row.id, "stored plan spec unreadable; not counted by the promotion gate");
                return None;
            };
            Some((row, raw.migrations))
        })
        .collect()
}

/// [`lacking_in`] of `plans` (oldest first).
#[cfg(test)]
fn lacking(spec: &PlanSpec, plans: &[PlanRow], undone: &Undone) -> Vec<(String, Stand)> {
    lacking_in(spec, &stored_migrations(plans), undone)
}

/// The plan's migrations that have not completed among `stored` (one environment's),
/// each with where it stands; `undone`: the completions there that no longer stand
/// ([`Coordinator::undone_since`]).
fn lacking_in(spec: &PlanSpec, stored: &Stored<'_>, undone: &Undone) -> Vec<(String, Stand)> {
    // the submitted migrations as a plan carries them (to compare with the stored ones)
    let now = pb::PlanSpec::from(spec).migrations;
    // the same, each migration as (id, checksum)
    let carried: Vec<(&PlanRow, Vec<(String, String)>)> = stored
        .iter()
        .map(|(row, ms)| {
            let ids = ms
                .iter()
                .map(|m| (m.id.clone(), m.checksum.clone()))
                .collect();
            (*row, ids)
        })
        .collect();
    let mut out = Vec::new();
    for m in &spec.migrations {
        let id = m.id.as_str();
        let same = |(i, c): &(String, String)| i == id && *c == m.checksum;
        // Completed there with this SQL: by a version whose settings this one keeps (or
        // makes stricter), else it stands weakened (the newest completion named).
        // the completions there that no longer stand, and the undo that took it out
        let (voided, undid) = match undone.get(id) {
            Some((voided, by)) => (Some(voided), stored.iter().find(|(r, _)| r.id == *by)),
            None => (None, None),
        };
        let undid = undid.map(|(r, _)| *r);
        let completed: Vec<(&PlanRow, &pb::Migration)> = stored
            .iter()
            .filter(|(row, _)| row.state == PlanState::Completed)
            .filter(|(row, _)| voided.is_none_or(|v| !v.contains(&row.id)))
            .filter_map(|(row, ms)| {
                ms.iter()
                    .find(|t| t.id == id && t.checksum == m.checksum)
                    .map(|t| (*row, t))
            })
            .collect();
        if completed.is_empty()
            && let Some(u) = undid
        {
            out.push((
                id.to_string(),
                Stand::NotCompleted {
                    plan_id: u.id.clone(),
                    state: u.state,
                    other_completed: None,
                },
            ));
            continue;
        }
        if let Some((newest, there)) = completed.first() {
            let kept: Vec<&(&PlanRow, &pb::Migration)> = completed
                .iter()
                .filter(|(_, t)| weakened(m, t).is_empty())
                .collect();
            // The checksum covers the up SQL: a down SQL edited after the environment
            // before (a `DELETE` added, say) went to approvers as the version they passed
            // there, and a rollback ran it on production unseen; a verify SQL or a
            // transaction mode changed since are as unseen there.
            let mine = now.iter().find(|n| n.id == id);
            // (the stored one read as a plan carries it too: fields it left unset mean
            // their defaults)
            let changed = |t: &pb::Migration| {
                let there = flotilla_core::Migration::try_from(t.clone())
                    .map(|m| pb::Migration::from(&m))
                    .unwrap_or_else(|_| t.clone());
                mine.map_or(Vec::new(), |n| changed_since(n, &there))
            };
            if kept.iter().any(|(_, t)| changed(t).is_empty()) {
                continue;
            }
            if let Some((row, t)) = kept.first() {
                out.push((
                    id.to_string(),
                    Stand::OtherwiseChanged {
                        plan_id: row.id.clone(),
                        what: changed(t),
                    },
                ));
                continue;
            }
            out.push((
                id.to_string(),
                Stand::Weakened {
                    plan_id: newest.id.clone(),
                    changes: weakened(m, there),
                },
            ));
            continue;
        }
        let stand = if let Some((row, _)) = carried.iter().find(|(_, ms)| ms.iter().any(same)) {
            Stand::NotCompleted {
                plan_id: row.id.clone(),
                state: row.state,
                other_completed: carried
                    .iter()
                    .filter(|(row, _)| row.state == PlanState::Completed)
                    .find_map(|(row, ms)| {
                        ms.iter()
                            .find(|(i, c)| i == id && *c != m.checksum)
                            .map(|(_, c)| (row.id.clone(), c.clone()))
                    }),
            }
        } else if let Some((row, ms)) = carried
            .iter()
            .find(|(_, ms)| ms.iter().any(|(i, _)| i == id))
        {
            Stand::OtherChecksum {
                plan_id: row.id.clone(),
                checksum: ms
                    .iter()
                    .find(|(i, _)| i == id)
                    .map(|(_, c)| c.clone())
                    .unwrap_or_default(),
            }
        } else {
            Stand::NeverRan
        };
        out.push((id.to_string(), stand));
    }
    out
}

/// What of `now` (the migration submitted, as a plan carries it) differs from `there` (the
/// version that completed in the environment before, with the same checksum) outside the
/// checksum: the down and verify SQL (compared as the checksum compares the up SQL: line
/// ends and the ends of the text aside, so a CRLF checkout is the same file) and the
/// transaction mode. (Not the scope: a migration's own field beside the plan's default,
/// resolved at each submit, told nothing of where it ran.)
fn changed_since(now: &pb::Migration, there: &pb::Migration) -> Vec<&'static str> {
    let text = |a: &str, b: &str| flotilla_core::checksum(a) == flotilla_core::checksum(b);
    let mut what = Vec::new();
    if !text(&now.down_sql, &there.down_sql) {
        what.push("down.sql");
    }
    if !text(&now.verify_sql, &there.verify_sql) {
        what.push("verify.sql");
    }

    // (unspecified: detected from the statements, not a mode to compare)
    if now.tx_mode != there.tx_mode && now.tx_mode != 0 && there.tx_mode != 0 {
        what.push("transaction mode");
    }
    what
}

/// What `now` (the migration submitted) makes less strict than `there` (the version that
/// completed in the environment before, with the same SQL): a lower risk (the approvals a
/// plan needs are counted from it), `destructive` newly set, lint rules newly ignored (the
/// lint that passed it there saw them). Empty when nothing is.
fn weakened(now: &flotilla_core::Migration, there: &pb::Migration) -> Vec<String> {
    use crate::approvals::{counts_destructive, migration_risk};
    let mut changes = Vec::new();
    // As the approvals count it: `destructive = true` dropped since lowers it too.
    if let (Ok(now_risk), Ok(there_risk)) = (
        migration_risk(
            &now.risk,
            counts_destructive(now.destructive, &now.lint_ignore),
        ),
        migration_risk(
            &there.risk,
            counts_destructive(there.destructive, &there.lint_ignore),
        ),
    ) && now_risk < there_risk
    {
        // Say where a level came from when `destructive` raised it, not the risk line.
        let as_said = |risk: crate::approvals::Risk, destructive: bool| {
            if destructive {
                format!("`{risk}` (`destructive = true`)")
            } else {
                format!("`{risk}`")
            }
        };
        changes.push(format!(
            "risk {} there, {} now (the approvals a plan needs are counted from its risk)",
            as_said(there_risk, there.destructive),
            as_said(now_risk, now.destructive)
        ));
    }
    if now.destructive && !there.destructive {
        changes.push("`destructive = true` now, not there".to_string());
    }
    for ignore in &now.lint_ignore {
        if !there.lint_ignore.iter().any(|t| t.rule == ignore.rule) {
            changes.push(format!(
                "lint rule `{}` ignored now, not there",
                ignore.rule
            ));
        }
    }
    changes
}

fn short(checksum: &str) -> &str {
    &checksum[..checksum.len().min(12)]
}

/// `migration `x` never ran in `staging``, and the like.
fn describe(id: &str, stand: &Stand, env: &str) -> String {
    match stand {
        Stand::NeverRan => format!("`{id}` never ran in `{env}`"),
        Stand::Weakened { plan_id, changes } => format!(
            "`{id}` completed in `{env}` (plan {plan_id}) with settings its migration.toml has \
             made less strict since: {} (set them back, or run it in `{env}` again)",
            changes.join("; ")
        ),
        Stand::OtherwiseChanged { plan_id, what } => format!(
            "`{id}` completed in `{env}` (plan {plan_id}) with another {}: what `{env}` ran \
             was not this (run it in `{env}` again as it is now)",
            what.join(", another ")
        ),
        Stand::OtherChecksum { plan_id, checksum } => format!(
            "`{id}` ran in `{env}` with another checksum ({} in plan {plan_id}): it was edited since",
            short(checksum)
        ),
        Stand::NotCompleted {
            plan_id,
            state,
            other_completed,
        } => {
            let stand = match state {
                // (undone on purpose, or after a failure: either way it does not stand there)
                PlanState::RolledBack => {
                    format!("`{id}` was rolled back in `{env}` (plan {plan_id} ended {state})")
                }
                PlanState::Failed
                | PlanState::RollbackFailed
                | PlanState::CompletedWithFailures => {
                    format!("`{id}` failed in `{env}` (plan {plan_id} ended {state})")
                }
                s if s.is_terminal() => {
                    format!("`{id}` did not complete in `{env}` (plan {plan_id} ended {s})")
                }
                s => format!("`{id}` has not completed in `{env}` yet (plan {plan_id} is {s})"),
            };
            match other_completed {
                Some((other, checksum)) => format!(
                    "{stand}; plan {other} completed it there with another checksum ({}): the \
                     file differs from the version that completed in `{env}`",
                    short(checksum)
                ),
                None => stand,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, state: PlanState, migrations: &[(&str, &str)]) -> PlanRow {
        let spec = pb::PlanSpec {
            migrations: migrations
                .iter()
                .map(|(id, sum)| pb::Migration {
                    id: id.to_string(),
                    checksum: sum.to_string(),
                    // as `plan` writes them
                    down_sql: "SELECT 1".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        PlanRow {
            id: id.into(),
            name: id.into(),
            environment: "staging".into(),
            state,
            ends: state,
            policy: String::new(),
            spec_hex: hex::encode(spec.encode_to_vec()),
            epoch: 1,
            message: String::new(),
            submitted_by: String::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            targets: 1,
            steps: 1,
            paused: String::new(),
        }
    }

    fn plan(migrations: &[(&str, &str)]) -> PlanSpec {
        let raw = pb::PlanSpec {
            name: "p".into(),
            environment: "production".into(),
            migrations: migrations
                .iter()
                .map(|(id, up)| pb::Migration {
                    id: id.to_string(),
                    up_sql: up.to_string(),
                    down_sql: "SELECT 1".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        PlanSpec::try_from(raw).unwrap()
    }

    #[test]
    fn each_migration_is_named_with_where_it_stands() {
        let spec = plan(&[
            ("001_done", "CREATE TABLE a (x int)"),
            ("002_never", "CREATE TABLE b (x int)"),
            ("003_edited", "CREATE TABLE c (x int)"),
            ("004_failed", "CREATE TABLE d (x int)"),
            ("005_running", "CREATE TABLE e (x int)"),
        ]);
        let sum = |i: usize| spec.migrations[i].checksum.clone();
        let (s0, s2, s3, s4) = (sum(0), sum(2), sum(3), sum(4));
        let plans = vec![
            row(
                "p1",
                PlanState::Completed,
                &[("001_done", &s0), ("003_edited", "ffff")],
            ),
            row("p2", PlanState::RolledBack, &[("004_failed", &s3)]),
            row("p3", PlanState::Running, &[("005_running", &s4)]),
            // a later plan that carried it again and rolled back leaves the completion standing
            row("p4", PlanState::RolledBack, &[("001_done", &s0)]),
        ];
        let found = lacking(&spec, &plans, &Undone::new());
        let ids: Vec<&str> = found.iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(
            ids,
            ["002_never", "003_edited", "004_failed", "005_running"]
        );
        let text: Vec<String> = found
            .iter()
            .map(|(i, s)| describe(i, s, "staging"))
            .collect();
        assert_eq!(text[0], "`002_never` never ran in `staging`");
        assert!(
            text[1].contains("another checksum (ffff in plan p1)"),
            "{}",
            text[1]
        );
        assert_eq!(
            text[2],
            "`004_failed` was rolled back in `staging` (plan p2 ended rolled_back)"
        );
        assert!(text[3].contains("not completed in `staging` yet (plan p3 is running)"));
        assert!(!s2.is_empty());
    }

    /// A migration applied there by a plan rolled back since no longer stands there, though
    /// a later plan that found it applied (and did nothing) completed; a completion after
    /// the rollback stands again.
    #[test]
    fn a_completion_before_the_rollback_that_took_it_out_does_not_count() {
        let spec = plan(&[("001_x", "CREATE TABLE a (x int)")]);
        let sum = spec.migrations[0].checksum.clone();
        let at = |mut r: PlanRow, ms: i64| {
            r.updated_at_ms = ms;
            r
        };
        let applied = at(row("p1", PlanState::RolledBack, &[("001_x", &sum)]), 30);
        let no_op = at(row("p2", PlanState::Completed, &[("001_x", &sum)]), 20);
        let undone = Undone::from([(
            "001_x".to_string(),
            (BTreeSet::from(["p2".to_string()]), "p1".to_string()),
        )]);
        let plans = vec![applied.clone(), no_op.clone()];
        let found = lacking(&spec, &plans, &undone);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            describe(&found[0].0, &found[0].1, "staging"),
            "`001_x` was rolled back in `staging` (plan p1 ended rolled_back)"
        );
        // nothing undone: the completion stands
        assert!(lacking(&spec, &plans, &Undone::new()).is_empty());
        let again = at(row("p3", PlanState::Completed, &[("001_x", &sum)]), 40);
        assert!(lacking(&spec, &[applied, no_op, again], &undone).is_empty());
    }

    /// The same up SQL completed there with another down SQL (a `DELETE` added after
    /// staging passed it): refused, naming the plan that completed it; the down SQL that
    /// completed there passes.
    #[test]
    fn a_down_sql_edited_since_the_migration_completed_is_refused() {
        let mut spec = plan(&[("001_x", "CREATE TABLE a (x int)")]);
        let sum = spec.migrations[0].checksum.clone();
        let done = row("p1", PlanState::Completed, &[("001_x", &sum)]);
        assert!(lacking(&spec, std::slice::from_ref(&done), &Undone::new()).is_empty());
        // a CRLF checkout, a trailing newline: the same file
        spec.migrations[0].down_sql = "SELECT 1\r\n\n".into();
        assert!(lacking(&spec, std::slice::from_ref(&done), &Undone::new()).is_empty());
        spec.migrations[0].down_sql = "DROP TABLE a; DELETE FROM work_orders;".into();
        let found = lacking(&spec, std::slice::from_ref(&done), &Undone::new());
        assert_eq!(
            found,
            [(
                "001_x".to_string(),
                Stand::OtherwiseChanged {
                    plan_id: "p1".into(),
                    what: vec!["down.sql"],
                }
            )]
        );
        let text = describe(&found[0].0, &found[0].1, "staging");
        assert!(
            text.contains("completed in `staging` (plan p1) with another down.sql"),
            "{text}"
        );
        // a verify SQL changed since, too; a scope said in migration.toml is not compared
        // (the plan's default, resolved at each submit, decides where it runs)
        spec.migrations[0].down_sql = "SELECT 1".into();
        spec.migrations[0].verify_sql = Some("SELECT true".into());
        spec.migrations[0].scope = Some(flotilla_core::Scope::Tenant);
        let found = lacking(&spec, std::slice::from_ref(&done), &Undone::new());
        let text = describe(&found[0].0, &found[0].1, "staging");
        assert!(text.contains("with another verify.sql:"), "{text}");
    }

    /// The same SQL completed there, its migration.toml made less strict since (risk
    /// lowered, which cut production's approvals; destructive set; a lint rule ignored):
    /// refused, naming each change. A stricter one (risk raised) passes, and so does one
    /// any completion there had the same settings of.
    #[test]
    fn settings_made_less_strict_since_the_migration_completed_are_refused() {
        let mut spec = plan(&[("001_x", "CREATE TABLE a (x int)")]);
        let sum = spec.migrations[0].checksum.clone();
        let mut high = row("p1", PlanState::Completed, &[("001_x", &sum)]);
        let mut raw =
            pb::PlanSpec::decode(hex::decode(&high.spec_hex).unwrap().as_slice()).unwrap();
        raw.migrations[0].risk = "high".into();
        high.spec_hex = hex::encode(raw.encode_to_vec());
        spec.migrations[0].risk = "low".into();
        spec.migrations[0].destructive = true;
        spec.migrations[0].lint_ignore = vec![flotilla_core::model::LintIgnore {
            rule: "index-not-concurrent".into(),
            reason: "small table".into(),
        }];
        let found = lacking(&spec, std::slice::from_ref(&high), &Undone::new());
        assert_eq!(found.len(), 1);
        // destructive counts as high: the risk itself is not cut
        assert_eq!(
            describe(&found[0].0, &found[0].1, "staging"),
            "`001_x` completed in `staging` (plan p1) with settings its migration.toml has made \
             less strict since: `destructive = true` now, not there; lint rule \
             `index-not-concurrent` ignored now, not there (set them back, or run it in \
             `staging` again)"
        );
        spec.migrations[0].destructive = false;
        spec.migrations[0].lint_ignore.clear();
        let found = lacking(&spec, std::slice::from_ref(&high), &Undone::new());
        assert_eq!(
            describe(&found[0].0, &found[0].1, "staging"),
            "`001_x` completed in `staging` (plan p1) with settings its migration.toml has made \
             less strict since: risk `high` there, `low` now (the approvals a plan needs are \
             counted from its risk) (set them back, or run it in `staging` again)"
        );
        // risk low there too, but `destructive = true` made it high
        let mut destructive = row("p1", PlanState::Completed, &[("001_x", &sum)]);
        raw.migrations[0].risk = "low".into();
        raw.migrations[0].destructive = true;
        destructive.spec_hex = hex::encode(raw.encode_to_vec());
        let found = lacking(&spec, std::slice::from_ref(&destructive), &Undone::new());
        assert_eq!(
            describe(&found[0].0, &found[0].1, "staging"),
            "`001_x` completed in `staging` (plan p1) with settings its migration.toml has made \
             less strict since: risk `high` (`destructive = true`) there, `low` now (the \
             approvals a plan needs are counted from its risk) (set them back, or run it in \
             `staging` again)"
        );
        // stricter than there: passes
        spec.migrations[0].risk = "critical".into();
        spec.migrations[0].destructive = false;
        spec.migrations[0].lint_ignore.clear();
        assert!(lacking(&spec, std::slice::from_ref(&high), &Undone::new()).is_empty());
        // low now, and an older plan completed it there at low: passes
        spec.migrations[0].risk = "low".into();
        let low = row("p0", PlanState::Completed, &[("001_x", &sum)]);
        assert_eq!(lacking(&spec, &[high.clone()], &Undone::new()).len(), 1);
        assert!(lacking(&spec, &[low, high], &Undone::new()).is_empty());
    }

    /// A version rolled back there while an edited one completed: both are said (it named
    /// the rolled-back plan alone, and the operator looked for a failure).
    #[test]
    fn a_rolled_back_version_names_the_other_that_completed() {
        let spec = plan(&[("001_x", "CREATE TABLE a (x int)")]);
        let sum = spec.migrations[0].checksum.clone();
        let plans = vec![
            row("p1", PlanState::RolledBack, &[("001_x", &sum)]),
            row("p2", PlanState::Failed, &[("001_x", "eeee")]),
            row("p3", PlanState::Completed, &[("001_x", "ffff")]),
        ];
        let found = lacking(&spec, &plans, &Undone::new());
        assert_eq!(found.len(), 1);
        assert_eq!(
            describe(&found[0].0, &found[0].1, "staging"),
            "`001_x` was rolled back in `staging` (plan p1 ended rolled_back); plan p3 \
             completed it there with another checksum (ffff): the file differs from the \
             version that completed in `staging`"
        );
    }
}
