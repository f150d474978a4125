//! Tenants that appear after plans ran: the agent finds them (`--discover-interval`), and
//! when a completed plan asked for it (`catch_up = true`, or its environment is in the
//! coordinator's `--catch-up-environments`), the leader runs for them, in order, every
//! migration of those plans that their labels select: one ordinary plan
//! (`catch-up-<target>`), with the same checks, journal, policy and audit as any other.
//! Rolled-back plans do not count (only completed ones are read). A tenant that appears
//! while such a plan runs is not among its targets (fixed at its submit): it is kept (in
//! the control store too, for the next leader), and caught up when a plan completes. A tenant that vanished simply leaves the agent's list:
//! its journal rows (its history) stay on the shard.
use std::collections::{BTreeMap, BTreeSet};

use flotilla_core::dag::MigrationGraph;
use flotilla_core::selector::quoted;
use flotilla_core::{PlanSpec, Scope, pb};
use prost::Message;
use tracing::{info, warn};

use crate::error::{CoordinatorError, Refusal};
use crate::planner::{self, ShardView};
use crate::service::Coordinator;

impl Coordinator {
    /// The shard's tenants as its agent now reports them, after `before` (None: this
    /// coordinator never heard of the shard, so nothing counts as new). New tenants are
    /// caught up when a completed plan asks for it.
    pub(crate) fn tenants_seen(
        &self,
        shard: &str,
        before: Option<Vec<String>>,
        now: &[pb::Tenant],
    ) {
        let Some(before) = before else { return };
        let before: BTreeSet<String> = before.into_iter().collect();
        let appeared: Vec<pb::Tenant> = now
            .iter()
            .filter(|t| !before.contains(&t.name))
            .cloned()
            .collect();
        // As a set: a shard of 2,500 tenants made 6 million comparisons here per preflight.
        let now_names: BTreeSet<&str> = now.iter().map(|t| t.name.as_str()).collect();
        let vanished = before
            .iter()
            .filter(|name| !now_names.contains(name.as_str()))
            .count();
        if vanished > 0 {
            info!(%shard, vanished, "tenants gone from the shard; their journal rows stay");
        }
        if appeared.is_empty() {
            return;
        }
        info!(%shard, appeared = appeared.len(), "new tenants on the shard");
        let me = self.clone();
        let shard = shard.to_string();
        tokio::spawn(async move {
            me.catch_up(&shard, &appeared, false).await;
        });
    }

    /// Tenants of `shard` whose changed schema an operator answered for (`answered`): caught
    /// up on what their journals lack of the plans that ask for it (nothing, for one that
    /// kept its history and was up to date).
    pub(crate) fn schemas_answered(&self, shard: &str, answered: Vec<String>, now: &[pb::Tenant]) {
        if answered.is_empty() {
            return;
        }
        let tenants: Vec<pb::Tenant> = now
            .iter()
            .filter(|t| answered.contains(&t.name))
            .cloned()
            .collect();
        info!(%shard, tenants = tenants.len(), "tenants whose changed schema was answered for");
        let me = self.clone();
        let shard = shard.to_string();
        tokio::spawn(async move {
            // (their journals as the catch-up plan's preflight reads them on the shard: the
            // leader's copy may still hold the rows `tenant_is_new` moved away)
            me.catch_up(&shard, &tenants, false).await;
        });
    }

    /// Catches `tenants` of `shard` up on the completed plans that ask for it, and keeps
    /// them for the next completion while a plan that asks has not ended: its targets were
    /// fixed at its submit, before they appeared (they stayed behind for good). `again`:
    /// kept from before, caught up on some plans already (what their journals hold is left
    /// out).
    pub(super) async fn catch_up(&self, shard: &str, tenants: &[pb::Tenant], again: bool) {
        // A tenant that appeared here while another shard's journal holds its rows (gone
        // from that shard, or there too): moved or copied (dumped there, restored here),
        // most likely, holding what those rows say. Caught up as a new tenant it ran its
        // migrations again over what it held (a data change twice). Held back, said, for an
        // operator to record what it holds (or to run a plan for it, if it is another
        // tenant of the same name).
        let (journals, _) = self.inner.versions.snapshot();
        let fleet = self.inner.fleet.snapshot();
        let (moved, tenants): (Vec<_>, Vec<_>) = tenants
            .iter()
            .cloned()
            .map(|t| (moved_from(&journals, &fleet, shard, &t.name), t))
            .partition(|(from, _)| from.is_some());
        for (from, t) in moved {
            let (from, still_there) = from.unwrap_or_default();
            let message = moved_tenant(shard, &t.name, &from, still_there);
            warn!(%shard, tenant = %t.name, from = %from, "{message}");
            self.inner.versions.record_catch_up_refused(
                shard,
                std::slice::from_ref(&t.name),
                String::new(),
                message,
            );
        }
        let tenants: Vec<pb::Tenant> = tenants.into_iter().map(|(_, t)| t).collect();
        if tenants.is_empty() {
            return;
        }
        let tenants = &tenants[..];
        match self.asking_plans_unfinished().await {
            Ok(false) => {}
            Ok(true) => {
                self.keep_for_catch_up(shard, tenants.iter().cloned());
                // in the store too: the next leader catches them up if this one goes first
                self.write(crate::store::StoreOp::CatchUpKept {
                    shard: shard.to_string(),
                    tenants: tenants.to_vec(),
                });
                info!(%shard, tenants = tenants.len(), "new tenants kept for the catch-up after the plans under way");
            }
            Err(e) => {
                warn!(%shard, "cannot read the plans under way: {e}; new tenants are caught up on the completed plans only")
            }
        }
        let plans = match self.catch_up_plans(shard, tenants, again).await {
            Ok(plans) => plans,
            Err(e) => {
                warn!(%shard, "cannot work out a catch-up plan: {e}");
                return;
            }
        };
        for (tenants, raw) in plans {
            self.submit_catch_up(shard, &tenants, raw).await;
        }
    }

    /// Whether a plan not ended yet asks for catch-up (it gives new tenants what it
    /// applies, once it completes).
    async fn asking_plans_unfinished(&self) -> Result<bool, CoordinatorError> {
        let envs = &self.inner.defaults.catch_up_environments;
        Ok(self
            .inner
            .store
            .unfinished_plans()
            .await?
            .iter()
            .filter_map(|row| hex::decode(&row.spec_hex).ok())
            .filter_map(|b| pb::PlanSpec::decode(b.as_slice()).ok())
            // (a catch-up plan gives only what completed plans did: new tenants get that anyway)
            .any(|spec| spec.source != "catch-up" && asks_catch_up(&spec, envs)))
    }

    /// Runs for as long as the coordinator: at each plan that completes, the tenants kept
    /// while plans were under way are caught up (on every completed plan: the migrations
    /// their journals hold already are left out).
    pub async fn catch_up_at_each_completion(self) {
        let mut changes = self.inner.changes.subscribe();
        loop {
            let completed = match changes.recv().await {
                // (the plans a catch-up reads: completed, with failures within a budget too)
                Ok((_, Some(last))) => last.summary.as_ref().is_some_and(|s| {
                    s.state == "completed" || s.state == "completed_with_failures"
                }),
                Ok(_) => false,
                // changes missed, a completion among them maybe: look as after one
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if !completed {
                continue;
            }
            self.catch_up_kept_tenants();
        }
    }

    /// Keeps `tenants` of `shard` for the catch-up after the plans under way (in memory;
    /// the caller stores them), once each.
    pub(crate) fn keep_for_catch_up(
        &self,
        shard: &str,
        tenants: impl IntoIterator<Item = pb::Tenant>,
    ) {
        let mut deferred = self.inner.catch_up_deferred.lock().expect("deferred lock");
        let kept = deferred.entry(shard.to_string()).or_default();
        for t in tenants {
            if !kept.iter().any(|k| k.name == t.name) {
                kept.push(t);
            }
        }
    }

    /// Catches the kept tenants up (at a completion), on a task of its own: a refused submit is sent again minutes long, and the caller
    /// must not fall behind the plans' changes meanwhile. A shard's rows go from the store
    /// once its catch-up was submitted or refused for good, but for the tenants kept again
    /// (a plan asking for it still runs): taken before, a leader dying in the minutes of a
    /// submit's retries lost them.
    pub(crate) fn catch_up_kept_tenants(&self) {
        let kept =
            std::mem::take(&mut *self.inner.catch_up_deferred.lock().expect("deferred lock"));
        if kept.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            for (shard, tenants) in kept {
                // A shard whose agent is not attached here: its labels and journal are not
                // known, and a catch-up worked out now gives its tenants nothing (their rows
                // then went for good). Kept for the next completion.
                if !me.inner.fleet.is_attached(&shard) {
                    info!(%shard, tenants = tenants.len(), "tenants kept for a catch-up wait for their shard's agent");
                    me.keep_for_catch_up(&shard, tenants);
                    continue;
                }
                me.catch_up(&shard, &tenants, true).await;
                let again: BTreeSet<String> = me
                    .inner
                    .catch_up_deferred
                    .lock()
                    .expect("deferred lock")
                    .get(&shard)
                    .map(|ts| ts.iter().map(|t| t.name.clone()).collect())
                    .unwrap_or_default();
                let taken: Vec<(String, String)> = tenants
                    .iter()
                    .filter(|t| !again.contains(&t.name))
                    .map(|t| (shard.clone(), t.name.clone()))
                    .collect();
                if !taken.is_empty() {
                    me.write(crate::store::StoreOp::CatchUpTaken { tenants: taken });
                }
            }
        });
    }

    /// Submits a catch-up plan; one refused for a passing reason (no leader for a moment,
    /// the shard's agent between two streams) is sent again a few times, a minute apart at
    /// most. Refused for good, the tenants stay behind (`fleet status`), and the log says
    /// why and what catches them up, as does each tenant's last failure (`fleet status`,
    /// `fleet show`: the log alone was seen by nobody who asked why a tenant was behind).
    async fn submit_catch_up(&self, shard: &str, tenants: &[String], raw: pb::PlanSpec) {
        let name = raw.name.clone();
        let mut pause = std::time::Duration::from_secs(5);
        for attempt in 1..=CATCH_UP_ATTEMPTS {
            let refusal = match self
                .submit_as(raw.clone(), crate::admission::Promotion::CatchUp)
                .await
            {
                Ok(r) => {
                    info!(plan = %r.plan_id, %name, "catching up new tenants");
                    return;
                }
                Err(CoordinatorError::Refused(Refusal::NothingToCatchUp)) => {
                    info!(%shard, %name, "nothing to catch up: its tenants' journals hold every step");
                    return;
                }
                Err(e) => e,
            };
            if !refusal.is_passing() || attempt == CATCH_UP_ATTEMPTS {
                warn!(
                    %shard, %name, selector = %raw.selector,
                    "the catch-up plan was not accepted: {refusal}; its tenants stay behind \
                     (`flotilla fleet status`) until a plan with their migrations runs on them"
                );
                let first = raw.migrations.first().map(|m| m.id.clone());
                self.inner.versions.record_catch_up_refused(
                    shard,
                    tenants,
                    first.unwrap_or_default(),
                    format!(
                        "{CATCH_UP_REFUSED}`{name}` was not accepted: {refusal}; the tenant \
                         stays behind until a plan with its migrations runs on it"
                    ),
                );
                return;
            }
            info!(%shard, %name, attempt, "the catch-up plan was not accepted ({refusal}); sending it again in {pause:?}");
            tokio::time::sleep(pause).await;
            pause = (pause * 3).min(std::time::Duration::from_secs(60));
        }
    }

    /// Catch-up plans for `tenants`, new on `shard`: each tenant gets every migration of
    /// the completed plans that ask for catch-up and whose selectors select it (the plan's
    /// and the migration's own), in the order the plans ran (and each plan's own order; a
    /// migration in several plans where the first of them had it, as the last has it);
    /// tenants that get the same migrations share a plan. None when there is nothing to do.
    async fn catch_up_plans(
        &self,
        shard: &str,
        tenants: &[pb::Tenant],
        again: bool,
    ) -> Result<Vec<(Vec<String>, pb::PlanSpec)>, CoordinatorError> {
        let envs = &self.inner.defaults.catch_up_environments;
        let labels = self
            .inner
            .fleet
            .snapshot()
            .get(shard)
            .map(|a| a.labels.clone())
            .unwrap_or_default();
        let fleet = BTreeMap::from([(
            shard.to_string(),
            ShardView {
                labels: labels.clone(),
                tenants: tenants
                    .iter()
                    .map(|t| (t.name.clone(), t.labels.clone().into_iter().collect()))
                    .collect(),
            },
        )]);
        // What the journal of a tenant kept while plans ran holds already (caught up on the
        // plans completed before): not run again. (A tenant new now is left to the plan's
        // own checks: one made again under an old name has rows of another schema, which
        // its plan is refused for, naming the answers.)
        let (journals, _) = self.inner.versions.snapshot();
        let applied = |tenant: &str, id: &str| {
            again
                && journals
                    .get(shard)
                    .and_then(|j| j.targets.get(tenant))
                    .is_some_and(|rows| rows.iter().any(|r| r.migration_id == id))
        };
        // Each tenant's migrations, and the environment of the last plan that gave it one.
        let mut chosen: BTreeMap<String, (Vec<pb::Migration>, String)> = BTreeMap::new();
        for row in self.inner.store.completed_plans().await? {
            let Some(raw) = hex::decode(&row.spec_hex)
                .ok()
                .and_then(|b| pb::PlanSpec::decode(b.as_slice()).ok())
            else {
                continue;
            };
            let Ok(spec) = PlanSpec::try_from(raw.clone()) else {
                continue;
            };
            // A plan for another environment never reached this shard's tenants.
            if !asks_catch_up(&raw, envs)
                || !self.inner.environments.admits(&spec.environment, &labels)
            {
                continue;
            }
            for (tenant, migrations) in selected_migrations(&spec, &fleet) {
                // a plan that gives the tenant nothing (its migrations of scope shard) says
                // nothing of its environment either
                if migrations.is_empty() {
                    continue;
                }
                let migrations: Vec<usize> = migrations
                    .into_iter()
                    .filter(|&m| !applied(&tenant, raw.migrations[m].id.as_str()))
                    .collect();
                if migrations.is_empty() {
                    continue;
                }
                let (theirs, environment) = chosen.entry(tenant).or_default();
                for m in migrations {
                    let mut migration = raw.migrations[m].clone();
                    // The catch-up plan is a chain of its own (below); an earlier plan's
                    // names need not be in it.
                    migration.depends_on.clear();
                    migration.scope = pb::Scope::Tenant as i32;
                    // The version its plan gave it (the catch-up plan has none of its own:
                    // a tenant caught up showed no version where the others of its cohort
                    // showed their plan's).
                    migration.version = spec.version_of(&spec.migrations[m].id);
                    // A migration in two plans runs once, as the later plan has it, where
                    // the earlier one had it: the fleet ran it there, before the plans
                    // after it (a plan submitted again, as after a store made anew, moved
                    // `CREATE TABLE` behind the `ALTER TABLE` of the plan after it, and the
                    // new tenant's catch-up failed and was rolled back).
                    match theirs.iter_mut().find(|c| c.id == migration.id) {
                        Some(earlier) => *earlier = migration,
                        None => theirs.push(migration),
                    }
                }
                *environment = spec.environment.clone();
            }
        }
        // Tenants that get the same migrations (by id, and environment) go together: the
        // migrations, and the tenants.
        type Group = (Vec<pb::Migration>, Vec<String>);
        let mut groups: BTreeMap<(Vec<String>, String), Group> = BTreeMap::new();
        for (tenant, (migrations, environment)) in chosen {
            if migrations.is_empty() {
                continue;
            }
            let ids = migrations.iter().map(|m| m.id.clone()).collect();
            groups
                .entry((ids, environment))
                .or_insert_with(|| (migrations, Vec::new()))
                .1
                .push(tenant);
        }
        Ok(groups
            .into_iter()
            .map(|((_, environment), (migrations, names))| {
                let spec = catch_up_spec(shard, &names, migrations, environment);
                (names, spec)
            })
            .collect())
    }
}

/// Whether a plan asks that tenants appearing later get its migrations: `catch_up = true`,
/// or its environment is among the coordinator's `--catch-up-environments`.
fn asks_catch_up(spec: &pb::PlanSpec, envs: &[String]) -> bool {
    spec.catch_up
        || envs
            .iter()
            .any(|e| e == "*" || (!e.is_empty() && e.eq_ignore_ascii_case(&spec.environment)))
}

/// How a tenant's last failure begins when its catch-up plan was refused for good.
pub(crate) const CATCH_UP_REFUSED: &str = "the catch-up plan ";

/// How many times a catch-up plan refused for a passing reason is sent.
const CATCH_UP_ATTEMPTS: u32 = 5;

/// One catch-up plan: `migrations` in a chain, on `tenants` of `shard` (named in its
/// selector quoted where they need it: a tenant is named by its schema, which can hold
/// anything).
fn catch_up_spec(
    shard: &str,
    tenants: &[String],
    migrations: Vec<pb::Migration>,
    environment: String,
) -> pb::PlanSpec {
    let name = match tenants {
        [one] => format!("catch-up-{shard}/{one}"),
        many => format!("catch-up-{shard}-{}-tenants", many.len()),
    };
    let dependencies = migrations
        .windows(2)
        .map(|w| pb::Dependency {
            migration: w[1].id.clone(),
            depends_on: vec![w[0].id.clone()],
        })
        .collect();
    let names: Vec<String> = tenants.iter().map(|t| quoted(t).into_owned()).collect();
    pb::PlanSpec {
        name,
        description: format!(
            "{} migration(s) of completed plans for tenants that appeared on {shard}",
            migrations.len()
        ),
        selector: format!(
            "shard in ({}), tenant in ({})",
            quoted(shard),
            names.join(", ")
        ),
        migrations,
        dependencies,
        environment,
        policy: pb::FailurePolicy::AllOrNothing as i32,
        default_scope: pb::Scope::Tenant as i32,
        submitted_by: crate::service::CATCH_UP_SUBMITTER.into(),
        source: "catch-up".into(),
        // Never runs again what another tool's history says ran there (a tenant made the
        // old way while the application still does): refused, the tenant shown behind
        // with why, until `fleet baseline` records it.
        require_baseline: true,
        ..Default::default()
    }
}

/// Whether `spec` selects tenant `tenant` of `shard` for migration `id` (its selector and
/// the migration's own, by the shard's and the tenant's labels as its agent reported them).
/// None when the shard's agent is not attached (its labels are not known here).
pub(crate) fn selects(
    spec: &PlanSpec,
    fleet: &BTreeMap<String, crate::sessions::registry::AttachedAgent>,
    shard: &str,
    tenant: &str,
    id: &str,
) -> Option<bool> {
    let agent = fleet.get(shard)?;
    let labels = agent
        .tenants
        .iter()
        .find(|t| t.name == tenant)
        .map(|t| t.labels.clone().into_iter().collect())
        .unwrap_or_default();
    let one = BTreeMap::from([(
        shard.to_string(),
        ShardView {
            labels: agent.labels.clone(),
            tenants: vec![(tenant.to_string(), labels)],
        },
    )]);
    let m = spec.migrations.iter().position(|m| m.id.as_str() == id)?;
    Some(
        selected_migrations(spec, &one)
            .get(tenant)
            .is_some_and(|ms| ms.contains(&m)),
    )
}

/// Each tenant of `fleet` the plan selects, with the plan's tenant-scope migrations that
/// select it, in the plan's order.
fn selected_migrations(
    spec: &PlanSpec,
    fleet: &BTreeMap<String, ShardView>,
) -> BTreeMap<String, Vec<usize>> {
    let Ok(expansion) = planner::expand(spec, fleet) else {
        return BTreeMap::new();
    };
    let Ok(graph) = MigrationGraph::build(spec) else {
        return BTreeMap::new();
    };
    let mut selected: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    for s in &expansion.steps {
        let target = &expansion.targets[s.target];
        if !target.is_shard() {
            selected
                .entry(target.tenant.as_str())
                .or_default()
                .insert(s.migration);
        }
    }
    let scope_default = expansion.default_scope;
    selected
        .into_iter()
        .map(|(tenant, theirs)| {
            let ordered = graph
                .order
                .iter()
                .copied()
                .filter(|m| theirs.contains(m))
                .filter(|&m| spec.migrations[m].scope.unwrap_or(scope_default) == Scope::Tenant)
                .collect();
            (tenant.to_string(), ordered)
        })
        .collect()
}

/// Another shard whose reported journal holds rows of `tenant`: the shard it is moved (or
/// copied) from, most likely, with whether its agent still lists it there (a move restores
/// the tenant on its new shard before it drops it on the old one, and either agent may look
/// first; a copy leaves it). A tenant's name is taken as unique in the fleet here, as `fleet
/// show TENANT` takes it. (`journals` and `fleet` read once for all the tenants found.)
fn moved_from(
    journals: &super::Journals,
    fleet: &BTreeMap<String, crate::sessions::registry::AttachedAgent>,
    shard: &str,
    tenant: &str,
) -> Option<(String, bool)> {
    journals
        .iter()
        .filter(|(other, _)| other.as_str() != shard)
        .find(|(_, journal)| {
            journal
                .targets
                .get(tenant)
                .is_some_and(|rows| !rows.is_empty())
        })
        .map(|(other, _)| {
            let still_there = fleet
                .get(other.as_str())
                .is_none_or(|a| a.tenants.iter().any(|t| t.name == tenant));
            (other.clone(), still_there)
        })
}

/// What the log, `fleet status` and `fleet show` say of a tenant that appeared on `shard`
/// while the journal of `from` (where it is gone, or `still_there`) holds its rows.
fn moved_tenant(shard: &str, tenant: &str, from: &str, still_there: bool) -> String {
    let selector = format!("shard = {}, tenant = {}", quoted(shard), quoted(tenant));
    let (there, what) = if still_there {
        ("where it is too", "copied, or being moved,")
    } else {
        ("where it is gone", "moved")
    };
    format!(
        "tenant {tenant:?} appeared on shard {shard} while the journal of shard {from}, {there}, \
         holds its rows: {what} from {from}? It is not caught up as a new tenant (its migrations \
         would run again over what it holds); record what it holds with `flotilla fleet baseline \
         DIR --up-to ID --selector '{selector}'`, or, if it is another tenant of the same name, \
         run a plan for it with that selector"
    )
}

#[cfg(test)]
mod tests {
    use flotilla_core::pb;

    /// A plan asks for catch-up by its own word or its environment's; an empty environment
    /// entry (`--catch-up-environments ''`) is none, not the plans that name none.
    #[test]
    fn an_empty_environment_entry_asks_nothing() {
        let plan = |environment: &str, catch_up| pb::PlanSpec {
            environment: environment.into(),
            catch_up,
            ..Default::default()
        };
        let envs = |e: &[&str]| e.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(!super::asks_catch_up(&plan("", false), &envs(&[""])));
        assert!(super::asks_catch_up(&plan("", true), &envs(&[""])));
        assert!(super::asks_catch_up(&plan("", false), &envs(&["*"])));
        assert!(super::asks_catch_up(
            &plan("Staging", false),
            &envs(&["staging"])
        ));
        assert!(!super::asks_catch_up(
            &plan("production", false),
            &envs(&["staging", ""])
        ));
    }
}
