//! Reads migration directories (Flotilla's own format, dbmate's, golang-migrate's and
//! Flyway's) and plan files
//! into the wire form of a plan (`pb::PlanSpec`).
//!
//! The loader reports what is wrong with a *file* (unreadable, malformed, unknown keys,
//! unterminated quotes, missing `up.sql`), naming the file and, where it can, the line.
//! Whether the plan as a whole makes sense (cycles, unknown dependencies, transaction
//! modes) is decided by `flotilla_core::PlanSpec::try_from`, which every plan goes
//! through on receipt anyway. See docs/file-formats.md.
use std::fs;
use std::path::Path;

use flotilla_core::pb;
use flotilla_core::selector::Selector;

// Dependencies point one way: plan -> dir -> {native, dbmate, golang_migrate, flyway} -> parts
// -> error.
mod dbmate;
mod dir;
mod error;
mod flyway;
mod golang_migrate;
#[cfg(test)]
mod lint_tests;
mod native;
mod parts;
mod plan;
#[cfg(test)]
mod tests;
mod waves;

pub use error::LoadError;
pub use native::{TestTable, read_test};
pub use plan::PLAN_FILE;
use plan::{policy_enum, scope_enum, unknown_policy, unknown_scope};

/// Flags from `plan submit` that override the plan file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub max_parallel: Option<u32>,
    pub selector: Option<String>,
    pub policy: Option<String>,
    /// "shard" or "tenant"
    pub scope: Option<String>,
    pub no_fuse: bool,
    /// `--atomic`: two-phase commit across shards.
    pub atomic: bool,
}

/// Loads a plan from a migration directory, or from a plan file whose migrations sit beside it.
pub fn load(path: &Path, overrides: &Overrides) -> Result<pb::PlanSpec, LoadError> {
    let meta = fs::metadata(path).map_err(|e| LoadError::io(path, e))?;
    let mut spec = if meta.is_dir() {
        let plan_file = path.join(PLAN_FILE);
        if plan_file.is_file() {
            plan::load(&plan_file)?
        } else {
            plan::from_directory(path)?
        }
    } else if path.extension().is_some_and(|e| e == "toml") {
        plan::load(path)?
    } else {
        return Err(LoadError::invalid(
            path,
            "expected a migration directory or a plan file (*.toml)",
        ));
    };
    spec.source = path.display().to_string();
    chain_implicit_order(&mut spec);
    apply(&mut spec, overrides)?;
    Ok(spec)
}

/// A plan without parallel groups or `[dependencies]` runs its migrations in its order (id
/// order, or the plan file's `migrations` list) on each target, as every single-database
/// tool (dbmate included) would: a migration that names no `depends_on` waits for every
/// one before it; one that names some waits for those only (that is how a directory says
/// two may run side by side). Before, one `depends_on` anywhere took the order away from every
/// migration: a migration naming none ran at once, before the one it followed in id order
/// ("relation does not exist"). A migration that the one before it waits for, directly or
/// through others, does not wait for it back (no cycle it did not write).
fn chain_implicit_order(spec: &mut pb::PlanSpec) {
    if !spec.parallel_groups.is_empty() || !spec.dependencies.is_empty() {
        return;
    }
    let n = spec.migrations.len();
    let index: std::collections::BTreeMap<&str, usize> = spec
        .migrations
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id.as_str(), i))
        .collect();
    // every wait so far: those written, then each one added in order (a wait added must
    // not close a cycle through the written ones and those added before it)
    let mut waits: Vec<Vec<usize>> = spec
        .migrations
        .iter()
        .map(|m| {
            m.depends_on
                .iter()
                .filter_map(|d| index.get(d.as_str()).copied())
                .collect()
        })
        .collect();
    let waits_for = |waits: &[Vec<usize>], from: usize, to: usize| {
        let mut stack = vec![from];
        let mut seen = vec![false; n];
        while let Some(i) = stack.pop() {
            if i == to {
                return true;
            }
            if !std::mem::replace(&mut seen[i], true) {
                stack.extend(waits[i].iter().copied());
            }
        }
        false
    };
    // The migrations before `i` nothing after them waits for yet: a migration naming no
    // `depends_on` waits for all of them, so it runs after every one before it (directly
    // or through others), not only after the one just before it (which may have named a
    // dependency of its own and run beside its predecessor).
    let mut frontier: Vec<usize> = Vec::new();
    let mut chained = Vec::new();
    for i in 0..n {
        if spec.migrations[i].depends_on.is_empty() {
            let after: Vec<usize> = frontier
                .iter()
                .copied()
                .filter(|&j| !waits_for(&waits, j, i))
                .collect();
            if !after.is_empty() {
                waits[i].extend(&after);
                chained.push(pb::Dependency {
                    migration: spec.migrations[i].id.clone(),
                    depends_on: after
                        .iter()
                        .map(|&j| spec.migrations[j].id.clone())
                        .collect(),
                });
            }
        }
        // what `i` waits for (written or added) is no sink any more; `i` is one
        let waited: Vec<usize> = waits[i].clone();
        frontier.retain(|j| !waited.contains(j));
        frontier.push(i);
    }
    spec.dependencies = chained;
}

/// Applies command-line overrides on top of what the plan file says.
fn apply(spec: &mut pb::PlanSpec, o: &Overrides) -> Result<(), LoadError> {
    if let Some(n) = o.max_parallel {
        // (named here: past the most, the plan's conversion named the plan file's field)
        if n == 0 || n > flotilla_core::model::MAX_PARALLEL {
            return Err(LoadError::Override {
                flag: "--max-parallel",
                message: format!(
                    "must be at least 1 and at most {}",
                    flotilla_core::model::MAX_PARALLEL
                ),
            });
        }
        spec.max_parallel = n;
    }
    if let Some(s) = &o.selector {
        Selector::parse(s).map_err(|e| LoadError::Override {
            flag: "--selector",
            message: e.to_string(),
        })?;
        spec.selector = s.trim().to_string();
    }
    if let Some(p) = &o.policy {
        spec.policy = policy_enum(p).ok_or_else(|| LoadError::Override {
            flag: "--policy",
            message: unknown_policy(p),
        })? as i32;
    }
    if let Some(s) = &o.scope {
        spec.default_scope = scope_enum(s).ok_or_else(|| LoadError::Override {
            flag: "--scope",
            message: unknown_scope(s),
        })? as i32;
    }
    if o.atomic {
        spec.atomic = true;
    }
    if o.no_fuse {
        spec.no_fuse = true;
    }
    Ok(())
}
