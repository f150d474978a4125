//! `fleet status` and `fleet show`, computed from the journals' copy, the fleet's labels
//! and the completed plans: pure, so the tests need no coordinator.
use std::collections::{BTreeMap, HashMap};

use flotilla_core::PlanSpec;
use flotilla_core::pb;
use flotilla_core::selector::Selector;
use sha2::{Digest, Sha256};

use super::{Failures, Journals, ROLLBACK_CUT_SHORT, ShardJournal, target_name};
use crate::planner::{self, ShardView};

/// A completed plan, whose migrations the targets it selects should hold.
pub struct PlanInput {
    pub id: String,
    pub spec: std::sync::Arc<PlanSpec>,
    /// The shards its environment admits (`--environments`); None: every shard. A plan for
    /// development never reaches production's tenants, which are not behind for it.
    pub shards: Option<std::collections::BTreeSet<String>>,
}

#[derive(Clone, Copy)]
pub struct FleetInput<'a> {
    pub fleet: &'a BTreeMap<String, ShardView>,
    pub journals: &'a Journals,
    /// The leader's epoch: a journal reported under an older one is stale.
    pub epoch: u64,
    pub failures: &'a Failures,
    /// Oldest first: a later plan's checksum of a migration wins.
    pub plans: &'a [PlanInput],
    /// Checksums of the files the operator named (`fleet status --against DIR`).
    pub files: &'a HashMap<String, String>,
}

/// A migration a target should hold, from the latest completed plan that gives it one.
#[derive(Debug, Clone)]
struct Expected {
    migration_id: String,
    checksum: String,
    plan_id: String,
    version: String,
}

/// One target, worked out.
#[derive(Debug)]
pub(super) struct TargetState {
    pub(super) shard: String,
    pub(super) tenant: String,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) journal: Vec<pb::JournalEntry>,
    pub(super) head: String,
    pub(super) digest: String,
    pub(super) version: String,
    pub(super) pending: Vec<String>,
    pub(super) mismatches: Vec<pb::ChecksumMismatch>,
}

impl FleetInput<'_> {
    pub(super) fn reported(&self, shard: &str) -> Option<&ShardJournal> {
        self.journals
            .get(shard)
            .map(|j| j.as_ref())
            .filter(|j| j.complete && j.epoch == self.epoch)
    }

    /// The target's steps begun and not finished (`applying`), newest first, named as
    /// `fleet status` lists them.
    pub(super) fn part_way(&self, shard: &str, tenant: &str) -> Vec<pb::CutShort> {
        let mut steps: Vec<pb::CutShort> = self
            .reported(shard)
            .and_then(|j| j.cut_short.get(tenant))
            .into_iter()
            .flatten()
            .filter(|s| s.applying)
            .map(|s| pb::CutShort {
                target: target_name(shard, tenant),
                ..s.clone()
            })
            .collect();
        steps.sort_by_key(|s| std::cmp::Reverse(s.at_ms));
        steps
    }

    /// The target's last failure: the newest of the one results and replies left here and
    /// the steps its shard reports a rollback cut short (which outlive this coordinator's
    /// memory: after a restart or a change of leader they still say why the target is
    /// behind). The rollback's own reply of the same step wins whatever the clocks say (the
    /// shard's and this coordinator's may differ): it carries the down SQL's error.
    pub(super) fn last_failure(&self, shard: &str, tenant: &str) -> Option<pb::LastFailure> {
        let recorded = self.failures.get(&(shard.to_string(), tenant.to_string()));
        let cut_short = self
            .reported(shard)
            .and_then(|j| j.cut_short.get(tenant))
            .and_then(|steps| steps.iter().filter(|s| !s.applying).max_by_key(|s| s.at_ms));
        match (recorded, cut_short) {
            (Some(f), Some(c))
                if f.at_ms >= c.at_ms
                    || (f.message.starts_with(ROLLBACK_CUT_SHORT)
                        && f.migration_id == c.migration_id
                        && f.plan_id == c.plan_id) =>
            {
                Some(f.clone())
            }
            (_, Some(c)) => Some(pb::LastFailure {
                target: target_name(shard, tenant),
                migration_id: c.migration_id.clone(),
                plan_id: c.plan_id.clone(),
                sqlstate: String::new(),
                message: format!(
                    "{ROLLBACK_CUT_SHORT} of plan {} began to undo this step and did not \
                     finish{}: the step counts as not applied until `flotilla plan rollback {}` \
                     runs to its end",
                    c.plan_id,
                    match c.undone {
                        0 => String::new(),
                        1 => " (1 down statement done; the next rollback goes on after it)"
                            .to_string(),
                        n => format!(
                            " ({n} down statements done; the next rollback goes on after them)"
                        ),
                    },
                    c.plan_id
                ),
                at_ms: c.at_ms,
            }),
            (f, None) => f.cloned(),
        }
    }

    /// What each target should hold: every step the completed plans would give it over
    /// today's fleet (its labels now, so a tenant that came later counts too).
    fn expected(&self) -> HashMap<(String, String), Vec<Expected>> {
        let mut out: HashMap<(String, String), Vec<Expected>> = HashMap::new();
        for plan in self.plans {
            let admitted: BTreeMap<String, ShardView>;
            let fleet = match &plan.shards {
                Some(shards) => {
                    admitted = self
                        .fleet
                        .iter()
                        .filter(|(s, _)| shards.contains(*s))
                        .map(|(s, v)| (s.clone(), v.clone()))
                        .collect();
                    &admitted
                }
                None => self.fleet,
            };
            let Ok(expansion) = planner::expand(&plan.spec, fleet) else {
                continue;
            };
            for step in &expansion.steps {
                let target = &expansion.targets[step.target];
                let migration = &plan.spec.migrations[step.migration];
                let list = out
                    .entry((target.shard.clone(), target.tenant.clone()))
                    .or_default();
                let expected = Expected {
                    migration_id: migration.id.to_string(),
                    checksum: migration.checksum.clone(),
                    plan_id: plan.id.clone(),
                    version: plan.spec.version_of(&migration.id),
                };
                match list
                    .iter_mut()
                    .find(|e| e.migration_id == expected.migration_id)
                {
                    Some(earlier) => *earlier = expected,
                    None => list.push(expected),
                }
            }
        }
        out
    }

    /// Every reported target the selector takes: the tenants, and the shard itself when its
    /// journal or a plan gives it something, or it has a last failure.
    pub(super) fn targets(&self, selector: &Selector) -> Vec<TargetState> {
        let mut expected = self.expected();
        let mut out = Vec::new();
        for (shard, view) in self.fleet {
            let Some(journal) = self.reported(shard) else {
                continue;
            };
            let shard_itself = (String::new(), BTreeMap::new());
            let candidates = std::iter::once(&shard_itself).chain(view.tenants.iter());
            for tenant in candidates {
                let key = (shard.clone(), tenant.0.clone());
                let rows = journal.targets.get(&tenant.0).cloned().unwrap_or_default();
                let wanted = expected.remove(&key).unwrap_or_default();
                if tenant.0.is_empty()
                    && rows.is_empty()
                    && wanted.is_empty()
                    && !journal.cut_short.contains_key("")
                    && !self.failures.contains_key(&key)
                {
                    continue;
                }
                let labels =
                    planner::target_labels(shard, view, (!tenant.0.is_empty()).then_some(tenant));
                if !selector.matches(&labels) {
                    continue;
                }
                out.push(work_out(
                    shard, &tenant.0, labels, rows, &wanted, self.files,
                ));
            }
        }
        out
    }
}

fn work_out(
    shard: &str,
    tenant: &str,
    labels: BTreeMap<String, String>,
    journal: Vec<pb::JournalEntry>,
    expected: &[Expected],
    files: &HashMap<String, String>,
) -> TargetState {
    let name = target_name(shard, tenant);
    let applied: HashMap<&str, &pb::JournalEntry> = journal
        .iter()
        .map(|e| (e.migration_id.as_str(), e))
        .collect();
    let pending = expected
        .iter()
        .filter(|e| !applied.contains_key(e.migration_id.as_str()))
        .map(|e| e.migration_id.clone())
        .collect();
    // Against the files when the operator named them (what they will submit next),
    // else against the latest completed plan that carries the migration.
    let mismatches = journal
        .iter()
        .filter_map(|row| {
            let (checksum, plan_id) = match files.get(&row.migration_id) {
                Some(file) => (file.clone(), String::new()),
                None => {
                    let e = expected
                        .iter()
                        .find(|e| e.migration_id == row.migration_id)?;
                    (e.checksum.clone(), e.plan_id.clone())
                }
            };
            (row.checksum != checksum).then(|| pb::ChecksumMismatch {
                target: name.clone(),
                migration_id: row.migration_id.clone(),
                journal_checksum: row.checksum.clone(),
                plan_checksum: checksum,
                plan_id,
            })
        })
        .collect();
    let head = journal
        .last()
        .map(|e| e.migration_id.clone())
        .unwrap_or_default();
    let version = expected
        .iter()
        .find(|e| e.migration_id == head)
        .map(|e| e.version.clone())
        .unwrap_or_default();
    TargetState {
        shard: shard.to_string(),
        tenant: tenant.to_string(),
        labels,
        digest: digest(&journal),
        journal,
        head,
        version,
        pending,
        mismatches,
    }
}

/// The applied set's digest: 12 hex of sha256 over its sorted `id:checksum` lines ("" when
/// nothing is applied), so two targets with the same migrations share it whatever the order.
fn digest(journal: &[pb::JournalEntry]) -> String {
    if journal.is_empty() {
        return String::new();
    }
    let mut lines: Vec<String> = journal
        .iter()
        .map(|e| format!("{}:{}\n", e.migration_id, e.checksum))
        .collect();
    lines.sort();
    let mut hasher = Sha256::new();
    for line in &lines {
        hasher.update(line.as_bytes());
    }
    hex::encode(hasher.finalize())[..12].to_string()
}

pub fn fleet_status(input: &FleetInput, selector: &Selector) -> pb::FleetStatusResponse {
    let targets = input.targets(selector);
    let mut cohorts: BTreeMap<(String, String, Vec<String>), pb::Cohort> = BTreeMap::new();
    let mut mismatches = Vec::new();
    let mut failures = Vec::new();
    let mut part_way = Vec::new();
    let mut behind = 0u64;
    for t in targets {
        if !t.pending.is_empty() {
            behind += 1;
        }
        if let Some(f) = input.last_failure(&t.shard, &t.tenant) {
            failures.push(f);
        }
        part_way.extend(input.part_way(&t.shard, &t.tenant));
        mismatches.extend(t.mismatches.iter().cloned());
        let cohort = cohorts
            .entry((t.digest.clone(), t.head.clone(), t.pending.clone()))
            .or_insert_with(|| pb::Cohort {
                head: t.head.clone(),
                digest: t.digest.clone(),
                version: t.version.clone(),
                applied: t.journal.len() as u64,
                pending: t.pending.clone(),
                targets: Vec::new(),
            });
        cohort.targets.push(target_name(&t.shard, &t.tenant));
    }
    let mut cohorts: Vec<pb::Cohort> = cohorts.into_values().collect();
    cohorts.sort_by(|a, b| {
        b.targets
            .len()
            .cmp(&a.targets.len())
            .then_with(|| a.head.cmp(&b.head))
    });
    failures.sort_by_key(|f| std::cmp::Reverse(f.at_ms));
    part_way.sort_by_key(|s| std::cmp::Reverse(s.at_ms));
    let mut gone = Vec::new();
    for (shard, view) in input.fleet {
        let Some(journal) = input.reported(shard) else {
            continue;
        };
        let mut names: Vec<&String> = journal
            .targets
            .iter()
            .filter(|(t, rows)| {
                !t.is_empty() && !rows.is_empty() && !view.tenants.iter().any(|(n, _)| n == *t)
            })
            // the selector asked for: by its shard's labels and its name (its own labels
            // went with it)
            .filter(|(t, _)| {
                let named = ((*t).clone(), BTreeMap::new());
                selector.matches(&planner::target_labels(shard, view, Some(&named)))
            })
            .map(|(t, _)| t)
            .collect();
        names.sort();
        gone.extend(names.into_iter().map(|t| target_name(shard, t)));
    }
    let unreported_shards = input
        .fleet
        .keys()
        .filter(|shard| input.reported(shard).is_none())
        .cloned()
        .collect();
    pb::FleetStatusResponse {
        targets: cohorts.iter().map(|c| c.targets.len() as u64).sum(),
        behind,
        cohorts,
        mismatches,
        failures,
        unreported_shards,
        completed_plans: input.plans.len() as u64,
        known_shards: Some(input.fleet.len() as u64),
        gone,
        // (the leader's query sets them: see `query::set_apart_changed`)
        schema_changed: Vec::new(),
        renamed: Default::default(),
        // (the leader's query sets them: see `query::unknown_plans`)
        unknown_plans: Vec::new(),
        part_way,
    }
}

/// One target by name: "shard/tenant", "shard", or a tenant name found on one shard only.
/// A tenant gone from its shard (its schema dropped, its journal rows still there) is shown
/// too, from its rows: `fleet status` names it, and the operator's next question is what it
/// held.
pub fn show_target(input: &FleetInput, name: &str) -> Result<pb::FleetTarget, String> {
    let (shard, tenant) = resolve(input, name)?;
    let reported = input.reported(&shard).is_some();
    let failure = input.last_failure(&shard, &tenant);
    let part_way = input.part_way(&shard, &tenant);
    let view = &input.fleet[&shard];
    if !tenant.is_empty() && !view.tenants.iter().any(|(t, _)| *t == tenant) {
        let rows = input
            .reported(&shard)
            .and_then(|j| j.targets.get(&tenant))
            .cloned()
            .unwrap_or_default();
        // Nothing is expected of a tenant that is not there: no pending, no plan to compare.
        let t = work_out(
            &shard,
            &tenant,
            planner::target_labels(&shard, view, Some(&(tenant.clone(), BTreeMap::new()))),
            rows,
            &[],
            input.files,
        );
        return Ok(pb::FleetTarget {
            shard: t.shard,
            tenant: t.tenant,
            labels: t.labels.into_iter().collect(),
            journal: t.journal,
            mismatches: t.mismatches,
            last_failure: failure,
            head: t.head,
            digest: t.digest,
            reported,
            gone: true,
            part_way,
            ..Default::default()
        });
    }
    let everything = Selector::parse("").expect("the empty selector parses");
    let state = input
        .targets(&everything)
        .into_iter()
        .find(|t| t.shard == shard && t.tenant == tenant);
    Ok(match state {
        Some(t) => pb::FleetTarget {
            shard: t.shard,
            tenant: t.tenant,
            labels: t.labels.into_iter().collect(),
            journal: t.journal,
            pending: t.pending,
            mismatches: t.mismatches,
            last_failure: failure,
            head: t.head,
            digest: t.digest,
            version: t.version,
            reported,
            part_way,
            // the schema's fingerprint and drift: see `query::fleet_show`
            ..Default::default()
        },
        // A shard whose journal was not heard, or the shard itself with nothing for it: its
        // labels all the same (before, empty until a journal row came).
        None => {
            let entry = view
                .tenants
                .iter()
                .find(|(t, _)| !tenant.is_empty() && *t == tenant);
            let labels = planner::target_labels(&shard, view, entry);
            pb::FleetTarget {
                labels: labels.into_iter().collect(),
                shard,
                tenant,
                last_failure: failure,
                reported,
                part_way,
                ..Default::default()
            }
        }
    })
}

/// Whether the shard's reported journal holds rows of a tenant its agent no longer finds.
fn gone_from(input: &FleetInput, shard: &str, view: &ShardView, tenant: &str) -> bool {
    !view.tenants.iter().any(|(t, _)| t == tenant)
        && input
            .reported(shard)
            .and_then(|j| j.targets.get(tenant))
            .is_some_and(|rows| !rows.is_empty())
}

fn resolve(input: &FleetInput, name: &str) -> Result<(String, String), String> {
    let fleet = input.fleet;
    // (a tenant's name may hold a `/` itself: `sl/ash` is that tenant when there is no
    // shard `sl`)
    if let Some((shard, tenant)) = name.split_once('/')
        && let Some(view) = fleet.get(shard)
    {
        if tenant.is_empty()
            || !(view.tenants.iter().any(|(t, _)| t == tenant)
                || gone_from(input, shard, view, tenant))
        {
            return Err(format!("shard `{shard}` has no tenant `{tenant}`"));
        }
        return Ok((shard.to_string(), tenant.to_string()));
    }
    if fleet.contains_key(name) {
        return Ok((name.to_string(), String::new()));
    }
    let mut shards: Vec<&String> = fleet
        .iter()
        .filter(|(_, view)| view.tenants.iter().any(|(t, _)| t == name))
        .map(|(shard, _)| shard)
        .collect();
    if shards.is_empty() {
        shards = fleet
            .iter()
            .filter(|(shard, view)| gone_from(input, shard, view, name))
            .map(|(shard, _)| shard)
            .collect();
    }
    match shards.as_slice() {
        [] => match name.split_once('/') {
            Some((shard, _)) => Err(format!(
                "no shard `{shard}` in the fleet, and no tenant `{name}`"
            )),
            None => Err(format!("no shard or tenant `{name}` in the fleet")),
        },
        [shard] => Ok(((*shard).clone(), name.to_string())),
        several => Err(format!(
            "tenant `{name}` is on several shards ({}): name it as shard/tenant",
            several
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests;
