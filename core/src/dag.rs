//! The migration graph of a plan: edges from `depends_on`, the plan's explicit
//! `dependencies`, and its `parallel_groups` (each group runs after the one before it).
use std::collections::{BTreeMap, BTreeSet};

use crate::model::{MigrationId, PlanError, PlanSpec};

#[derive(Debug, Clone)]
pub struct MigrationGraph {
    /// `deps[i]`: indices (into `PlanSpec::migrations`) that migration `i` waits for.
    pub deps: Vec<BTreeSet<usize>>,
    /// A topological order, ties broken by migration id so it is deterministic.
    pub order: Vec<usize>,
}

impl MigrationGraph {
    /// Builds and checks the graph: unknown names, duplicates in groups, cycles
    /// (the error names the cycle).
    pub fn build(plan: &PlanSpec) -> Result<MigrationGraph, PlanError> {
        let index: BTreeMap<&MigrationId, usize> = plan
            .migrations
            .iter()
            .enumerate()
            .map(|(i, m)| (&m.id, i))
            .collect();
        let mut deps: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); plan.migrations.len()];

        for (i, m) in plan.migrations.iter().enumerate() {
            for d in &m.depends_on {
                let j = *index.get(d).ok_or_else(|| PlanError::UnknownDependency {
                    migration: m.id.to_string(),
                    place: if m.source.is_empty() {
                        "its depends_on".to_string()
                    } else {
                        format!("depends_on in {}", m.source)
                    },
                    depends_on: d.to_string(),
                })?;
                deps[i].insert(j);
            }
        }
        for (m, ds) in &plan.dependencies {
            let i = *index.get(m).ok_or_else(|| PlanError::UnknownMigration {
                id: m.to_string(),
                place: "dependencies".into(),
            })?;
            for d in ds {
                let j = *index.get(d).ok_or_else(|| PlanError::UnknownDependency {
                    migration: m.to_string(),
                    place: "the plan's [dependencies]".to_string(),
                    depends_on: d.to_string(),
                })?;
                deps[i].insert(j);
            }
        }
        let mut group_of: BTreeMap<usize, usize> = BTreeMap::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (g, group) in plan.parallel_groups.iter().enumerate() {
            let mut members = Vec::new();
            for id in group {
                let i = *index.get(id).ok_or_else(|| PlanError::UnknownMigration {
                    id: id.to_string(),
                    place: format!("parallel group {}", g + 1),
                })?;
                if let Some(first) = group_of.insert(i, g) {
                    return Err(PlanError::GroupTwice {
                        migration: id.to_string(),
                        first: first + 1,
                        second: g + 1,
                    });
                }
                members.push(i);
            }
            groups.push(members);
        }
        for pair in groups.windows(2) {
            for &later in &pair[1] {
                deps[later].extend(pair[0].iter().copied());
            }
        }
        for (i, d) in deps.iter_mut().enumerate() {
            d.remove(&i);
        }
        // A self-dependency is a cycle of one.
        for (m, ds) in plan
            .migrations
            .iter()
            .map(|m| (&m.id, &m.depends_on))
            .chain(plan.dependencies.iter())
        {
            if ds.contains(m) {
                return Err(PlanError::Cycle(vec![m.to_string(), m.to_string()]));
            }
        }

        if let Some(cycle) = find_cycle(&deps) {
            let mut names: Vec<String> = cycle
                .iter()
                .map(|&i| plan.migrations[i].id.to_string())
                .collect();
            names.push(names[0].clone());
            return Err(PlanError::Cycle(names));
        }
        let order = topo_order(plan, &deps);
        Ok(MigrationGraph { deps, order })
    }
}

/// A dependency cycle, in apply order, if there is one. Depth-first, with the path kept on
/// the heap: a directory with no declared order runs as one chain, and a recursive search
/// of a chain of some thousands of migrations overflowed the stack of whichever thread
/// read it (a coordinator's worker thread aborts the whole process then).
fn find_cycle(deps: &[BTreeSet<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; deps.len()];
    // The open nodes, dependent -> dependency, and where each is in its dependencies.
    let mut path: Vec<usize> = Vec::new();
    let mut next: Vec<std::collections::btree_set::Iter<'_, usize>> = Vec::new();
    for root in 0..deps.len() {
        if mark[root] != Mark::New {
            continue;
        }
        mark[root] = Mark::Open;
        path.push(root);
        next.push(deps[root].iter());
        while let Some(dependencies) = next.last_mut() {
            match dependencies.next().copied() {
                Some(d) => match mark[d] {
                    Mark::Open => {
                        let pos = path.iter().position(|&x| x == d).unwrap_or(0);
                        // The path runs dependent -> dependency; name it in apply order.
                        let mut cycle: Vec<usize> = path[pos..].to_vec();
                        cycle.reverse();
                        return Some(cycle);
                    }
                    Mark::New => {
                        mark[d] = Mark::Open;
                        path.push(d);
                        next.push(deps[d].iter());
                    }
                    Mark::Done => {}
                },
                None => {
                    next.pop();
                    let n = path.pop().expect("one open node per frame");
                    mark[n] = Mark::Done;
                }
            }
        }
    }
    None
}

fn topo_order(plan: &PlanSpec, deps: &[BTreeSet<usize>]) -> Vec<usize> {
    let n = deps.len();
    let mut remaining: Vec<usize> = deps.iter().map(BTreeSet::len).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(i);
        }
    }
    let mut ready: BTreeSet<(&MigrationId, usize)> = (0..n)
        .filter(|&i| remaining[i] == 0)
        .map(|i| (&plan.migrations[i].id, i))
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(first) = ready.iter().next().copied() {
        ready.remove(&first);
        order.push(first.1);
        for &k in &dependents[first.1] {
            remaining[k] -= 1;
            if remaining[k] == 0 {
                ready.insert((&plan.migrations[k].id, k));
            }
        }
    }
    order
}
