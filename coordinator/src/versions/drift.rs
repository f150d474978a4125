//! `fleet drift`: within each cohort (targets with the same applied set, as `fleet status`
//! groups them), the schema fingerprints the agents read and how many targets share each;
//! the targets whose shape is not the cohort's majority, with the items that differ. Pure,
//! like `status`: the tests need no coordinator.
//!
//! A cohort is where the shapes must agree: its targets ran the same migrations, so a
//! different shape was made by hand (or by a migration that behaves differently per
//! target). Across cohorts shapes differ by design and are not compared.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use flotilla_core::pb;
use flotilla_core::selector::Selector;

use super::{FleetInput, target_name};

/// One cohort's targets and their fingerprints, as they are gathered.
#[derive(Default)]
struct Gathered {
    head: String,
    digest: String,
    /// (target name, fingerprint, whether the selection shows it), in the fleet's order.
    targets: Vec<(String, String, bool)>,
}

pub fn fleet_drift(input: &FleetInput, selector: &Selector) -> pb::FleetDriftResponse {
    let shapes: HashMap<&str, &Arc<Vec<String>>> = input
        .journals
        .values()
        .flat_map(|j| j.shapes.iter().map(|(f, items)| (f.as_str(), items)))
        .collect();
    let mut cohorts: BTreeMap<(String, String), Gathered> = BTreeMap::new();
    let mut unfingerprinted = Vec::new();
    // The majority is the whole cohort's, whatever the selection shows of it: among the
    // selected alone, one drifted target was "no drift", and two of a healthy and a
    // drifted one blamed whichever fingerprint sorted first.
    let selected: HashSet<String> = input
        .targets(selector)
        .into_iter()
        .map(|t| target_name(&t.shard, &t.tenant))
        .collect();
    let everything = Selector::parse("").expect("the empty selector parses");
    for t in input.targets(&everything) {
        let name = target_name(&t.shard, &t.tenant);
        let shown = selected.contains(&name);
        let fingerprint = input
            .reported(&t.shard)
            .filter(|j| j.fingerprinted)
            .and_then(|j| j.fingerprints.get(&t.tenant));
        let Some(fingerprint) = fingerprint else {
            if shown {
                unfingerprinted.push(name);
            }
            continue;
        };
        let cohort = cohorts
            .entry((t.digest.clone(), t.head.clone()))
            .or_insert_with(|| Gathered {
                head: t.head.clone(),
                digest: t.digest.clone(),
                targets: Vec::new(),
            });
        cohort.targets.push((name, fingerprint.clone(), shown));
    }
    let mut out: Vec<pb::DriftCohort> = cohorts
        .into_values()
        .filter(|c| c.targets.iter().any(|t| t.2))
        .map(|c| compare(c, &shapes))
        .collect();
    out.sort_by(|a, b| b.targets.cmp(&a.targets).then_with(|| a.head.cmp(&b.head)));
    let shards = input
        .fleet
        .keys()
        .filter_map(|shard| {
            let j = input.reported(shard).filter(|j| j.fingerprinted)?;
            Some(pb::ShardFingerprint {
                shard: shard.clone(),
                read_ms: j.fingerprint_read_ms,
                targets: j.fingerprints.len() as u64,
                reported_at_ms: j.fingerprinted_at_ms,
            })
        })
        .collect();
    pb::FleetDriftResponse {
        targets: out.iter().map(|c| c.targets).sum(),
        drifted: out.iter().map(|c| c.drifted.len() as u64).sum(),
        cohorts: out,
        unfingerprinted,
        // Those the selection reaches (a shard outside `--selector` is not missing from its
        // answer): one of its known targets selected, or, its tenants not known, its own
        // labels such that the selector may select one (the selection above reads only
        // shards that reported, and a selector naming the missing shard found it clean).
        unreported_shards: input
            .fleet
            .iter()
            .filter(|(shard, _)| input.reported(shard).is_none())
            .filter(|(shard, view)| {
                let labels = |t| crate::planner::target_labels(shard, view, t);
                if view.tenants.is_empty() {
                    // only its name is its targets' for sure (a tenant's own labels may
                    // stand over the shard's)
                    selector.may_match(&BTreeMap::from([("shard".to_string(), shard.to_string())]))
                } else {
                    std::iter::once(None)
                        .chain(view.tenants.iter().map(Some))
                        .any(|t| selector.matches(&labels(t)))
                }
            })
            .map(|(shard, _)| shard.clone())
            .collect(),
        shards,
        known_shards: Some(input.fleet.len() as u64),
    }
}

/// One cohort: its shapes by how many share them, the majority (the most shared), and the
/// others. When two shapes are shared by as many targets and none by more, there is no
/// majority: which one was edited by hand is not known here, so every target of the cohort
/// counts as drifted, each compared with the first other shape of the tie (before, the
/// smaller fingerprint was taken for the majority: the healthy half of a two-target cohort
/// could be the one named, and `require_no_drift` let the edited one through).
fn compare(c: Gathered, shapes: &HashMap<&str, &Arc<Vec<String>>>) -> pb::DriftCohort {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, f, _) in &c.targets {
        *counts.entry(f.as_str()).or_default() += 1;
    }
    let mut ranked: Vec<(&str, u64)> = counts.into_iter().collect();
    // Most shared first; the fingerprint's order only makes the answer the same each call.
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let top = ranked[0].1;
    let tie: Vec<&str> = ranked
        .iter()
        .take_while(|(_, n)| *n == top)
        .map(|(f, _)| *f)
        .collect();
    let tied = tie.len() > 1;
    let majority = (!tied).then_some(tie[0]);
    let drifted = c
        .targets
        .iter()
        .filter(|(_, f, shown)| *shown && Some(f.as_str()) != majority)
        .map(|(target, f, _)| {
            let against = tie
                .iter()
                .find(|t| **t != f.as_str())
                .copied()
                .unwrap_or(tie[0]);
            let mut d = pb::DriftedTarget {
                target: target.clone(),
                fingerprint: f.clone(),
                against: against.to_string(),
                tied,
                ..Default::default()
            };
            match (shapes.get(f.as_str()), shapes.get(against)) {
                (Some(own), Some(common)) => (d.extra, d.missing) = diff(own, common),
                _ => d.unknown_items = true,
            }
            d
        })
        .collect();
    pb::DriftCohort {
        head: c.head,
        digest: c.digest,
        targets: c.targets.iter().filter(|t| t.2).count() as u64,
        majority: top,
        shapes: ranked
            .iter()
            .map(|(f, n)| pb::DriftShape {
                fingerprint: f.to_string(),
                targets: *n,
                majority: Some(*f) == majority,
            })
            .collect(),
        drifted,
        tied,
    }
}

/// What `own` has that `common` lacks, and what it lacks of `common`, each sorted.
fn diff(own: &[String], common: &[String]) -> (Vec<String>, Vec<String>) {
    let own_set: BTreeSet<&String> = own.iter().collect();
    let common_set: BTreeSet<&String> = common.iter().collect();
    (
        own_set
            .difference(&common_set)
            .map(|s| s.to_string())
            .collect(),
        common_set
            .difference(&own_set)
            .map(|s| s.to_string())
            .collect(),
    )
}

/// Each cohort's label for `flotilla_drifted_targets` and its drifted targets: the head
/// migration ("none" when nothing is applied), with `@digest` when another cohort already
/// took that head (same head, other applied set). Bounded by the number of cohorts.
pub fn cohort_labels(r: &pb::FleetDriftResponse) -> Vec<(String, u64)> {
    let mut taken = BTreeSet::new();
    r.cohorts
        .iter()
        .map(|c| {
            let head = if c.head.is_empty() { "none" } else { &c.head };
            let label = if taken.contains(head) {
                format!("{head}@{}", c.digest)
            } else {
                head.to_string()
            };
            taken.insert(head.to_string());
            (label, c.drifted.len() as u64)
        })
        .collect()
}

#[cfg(test)]
mod tests;
