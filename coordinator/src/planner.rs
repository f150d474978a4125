//! Expands a plan over the fleet: which targets it touches, one step per
//! (migration, target) that applies, and each step's dependencies.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use flotilla_core::dag::MigrationGraph;
use flotilla_core::{PlanSpec, Scope, Target};

use crate::error::{CoordinatorError, Refusal};

/// What the fleet looks like to the planner: each shard's labels and tenants.
#[derive(Debug, Clone, Default)]
pub struct ShardView {
    pub labels: BTreeMap<String, String>,
    pub tenants: Vec<(String, BTreeMap<String, String>)>,
}

#[derive(Debug, Clone)]
pub struct PlannedStep {
    pub migration: usize,
    pub target: usize,
    pub deps: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Expansion {
    pub targets: Vec<Target>,
    /// Each target's labels (shard's, tenant's over them, `shard=`, `tenant=`), for waves.
    pub labels: Vec<BTreeMap<String, String>>,
    pub steps: Vec<PlannedStep>,
    pub default_scope: Scope,
}

/// The scope a plan gives migrations that do not say: tenants when the selected
/// shards have any, else the shards themselves.
pub fn default_scope(spec: &PlanSpec, fleet: &BTreeMap<String, ShardView>) -> Scope {
    spec.default_scope.unwrap_or_else(|| {
        if fleet.values().any(|v| !v.tenants.is_empty()) {
            Scope::Tenant
        } else {
            Scope::Shard
        }
    })
}

/// Labels a target is selected by: the shard's, the tenant's over them, and
/// `shard=` / `tenant=` so a selector can name them.
pub(crate) fn target_labels(
    shard: &str,
    view: &ShardView,
    tenant: Option<&(String, BTreeMap<String, String>)>,
) -> BTreeMap<String, String> {
    let mut labels = view.labels.clone();
    if let Some((_, tl)) = tenant {
        labels.extend(tl.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    // A target's own shard and tenant, over any label of those names (agents leave them
    // out; one from elsewhere must not stand in for them: `shard in (b)` would take a
    // tenant of shard a labelled `shard=b`). A shard's own target has no tenant.
    labels.insert("shard".into(), shard.to_string());
    match tenant {
        Some((name, _)) => labels.insert("tenant".into(), name.clone()),
        None => labels.remove("tenant"),
    };
    labels
}

pub fn expand(
    spec: &PlanSpec,
    fleet: &BTreeMap<String, ShardView>,
) -> Result<Expansion, CoordinatorError> {
    let graph = MigrationGraph::build(spec)?;
    let scope_default = default_scope(spec, fleet);
    let scope_of = |m: usize| spec.migrations[m].scope.unwrap_or(scope_default);

    let mut targets: Vec<Target> = Vec::new();
    let mut target_labels_of: Vec<BTreeMap<String, String>> = Vec::new();
    let mut exists: HashMap<(usize, usize), ()> = HashMap::new();
    let mut target_ix: BTreeMap<Target, usize> = BTreeMap::new();
    for (shard, view) in fleet {
        let mut candidates: Vec<(Target, BTreeMap<String, String>, Scope)> = Vec::new();
        candidates.push((
            Target {
                shard: shard.clone(),
                tenant: String::new(),
            },
            target_labels(shard, view, None),
            Scope::Shard,
        ));
        for t in &view.tenants {
            candidates.push((
                Target {
                    shard: shard.clone(),
                    tenant: t.0.clone(),
                },
                target_labels(shard, view, Some(t)),
                Scope::Tenant,
            ));
        }
        for (target, labels, kind) in candidates {
            if !spec.selector.matches(&labels) {
                continue;
            }
            for &m in &graph.order {
                let mig = &spec.migrations[m];
                if scope_of(m) == kind && mig.selector.matches(&labels) {
                    let ix = *target_ix.entry(target.clone()).or_insert_with(|| {
                        targets.push(target.clone());
                        target_labels_of.push(labels.clone());
                        targets.len() - 1
                    });
                    exists.insert((m, ix), ());
                }
            }
        }
    }
    if targets.is_empty() {
        let shards: Vec<&str> = fleet.keys().map(String::as_str).collect();
        return Err(Refusal::NoTargets {
            shards: if shards.is_empty() {
                "no agents".to_string()
            } else {
                shards.join(", ")
            },
            selector: flotilla_core::selector::shown(&spec.selector.to_string()),
        }
        .into());
    }
    let steps = plan_steps(spec, &graph, &targets, scope_default, |m, t| {
        exists.contains_key(&(m, t))
    });
    Ok(Expansion {
        targets,
        labels: target_labels_of,
        steps,
        default_scope: scope_default,
    })
}

/// Steps and their dependencies for a fixed set of targets, given which
/// (migration, target) pairs have a step. Also used to rebuild a stored plan.
pub fn plan_steps(
    spec: &PlanSpec,
    graph: &MigrationGraph,
    targets: &[Target],
    scope_default: Scope,
    exists: impl Fn(usize, usize) -> bool,
) -> Vec<PlannedStep> {
    let scope_of = |m: usize| spec.migrations[m].scope.unwrap_or(scope_default);
    let mut shard_target: BTreeMap<&str, usize> = BTreeMap::new();
    let mut tenants_of: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, t) in targets.iter().enumerate() {
        if t.is_shard() {
            shard_target.insert(&t.shard, i);
        } else {
            tenants_of.entry(&t.shard).or_default().push(i);
        }
    }
    let mut index: HashMap<(usize, usize), usize> = HashMap::new();
    let mut steps: Vec<PlannedStep> = Vec::new();
    // Targets in order, migrations in topological order within each: dependencies
    // on the same target always come first.
    for (t, _) in targets.iter().enumerate() {
        for &m in &graph.order {
            if exists(m, t) {
                index.insert((m, t), steps.len());
                steps.push(PlannedStep {
                    migration: m,
                    target: t,
                    deps: Vec::new(),
                });
            }
        }
    }
    for step in steps.iter_mut() {
        let (m, t) = (step.migration, step.target);
        let mut deps: BTreeSet<usize> = BTreeSet::new();
        // A dependency with no step on this target is looked through to its own
        // dependencies, so skipping a migration never drops an ordering.
        let mut stack: Vec<usize> = graph.deps[m].iter().copied().collect();
        let mut seen: BTreeSet<usize> = BTreeSet::new();
        while let Some(d) = stack.pop() {
            if !seen.insert(d) {
                continue;
            }
            let candidates: Vec<usize> = match (scope_of(m), scope_of(d)) {
                (a, b) if a == b => vec![t],
                (Scope::Tenant, Scope::Shard) => shard_target
                    .get(targets[t].shard.as_str())
                    .copied()
                    .into_iter()
                    .collect(),
                _ => tenants_of
                    .get(targets[t].shard.as_str())
                    .cloned()
                    .unwrap_or_default(),
            };
            let found: Vec<usize> = candidates
                .iter()
                .filter_map(|&ct| index.get(&(d, ct)).copied())
                .collect();
            if found.is_empty() {
                stack.extend(graph.deps[d].iter().copied());
            } else {
                deps.extend(found);
            }
        }
        step.deps = deps.into_iter().collect();
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A label named `shard` or `tenant` (from an agent older than the check, or a shard's
    /// own labels) never stands in for the target's own: a selector's `shard in (b)` took a
    /// tenant of shard a labelled `shard=b`, and a shard's own target took `tenant=x`.
    #[test]
    fn a_targets_own_shard_and_tenant_win_over_labels_of_those_names() {
        let view = ShardView {
            labels: [("tenant".to_string(), "x".to_string())].into(),
            tenants: Vec::new(),
        };
        let tenant = (
            "evil".to_string(),
            [
                ("shard".to_string(), "shard_b".to_string()),
                ("tenant".to_string(), "other".to_string()),
                ("tier".to_string(), "pro".to_string()),
            ]
            .into(),
        );
        let l = target_labels("shard_a", &view, Some(&tenant));
        assert_eq!(l["shard"], "shard_a");
        assert_eq!(l["tenant"], "evil");
        assert_eq!(l["tier"], "pro");
        let l = target_labels("shard_a", &view, None);
        assert_eq!(l["shard"], "shard_a");
        assert!(!l.contains_key("tenant"), "{l:?}");
    }
}
