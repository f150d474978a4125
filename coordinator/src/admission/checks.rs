//! Checks of a plan against what the preflight found: edited migrations, and what atomic
//! units need (shards able to prepare, no dependency across targets inside a unit).
use std::collections::{BTreeMap, BTreeSet};

use flotilla_core::lint::{LintOptions, LockFootprint, Severity, lint_plan};
use flotilla_core::{PlanSpec, Target, TxMode, pb};

use super::preflight::{LockTableSeen, StepKey};
use crate::error::{CoordinatorError, Refusal, some_of};
use crate::planner::Expansion;

/// The lint, the same as `flotilla plan lint`: an error refuses the plan (each named with
/// its rule, migration, file and line, and the fix); the warnings go back with the plan.
pub(super) fn lint(spec: &PlanSpec) -> Result<Vec<pb::LintFinding>, CoordinatorError> {
    let findings = lint_plan(spec, &LintOptions::default());
    let errors: Vec<String> = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(|f| format!("{f} (fix: {})", f.hint))
        .collect();
    if !errors.is_empty() {
        return Err(CoordinatorError::Lint(errors.join("; ")));
    }
    Ok(findings.iter().map(pb::LintFinding::from).collect())
}

/// An applied migration whose content changed since: named, with where.
pub(super) fn edited_after_applied(
    spec: &PlanSpec,
    applied: &BTreeMap<StepKey, String>,
) -> Result<(), Refusal> {
    for m in &spec.migrations {
        let differs: Vec<String> = applied
            .iter()
            .filter(|((id, _, _), sum)| id == m.id.as_str() && **sum != m.checksum)
            .map(|((_, shard, tenant), _)| {
                Target {
                    shard: shard.clone(),
                    tenant: tenant.clone(),
                }
                .to_string()
            })
            .collect();
        if !differs.is_empty() {
            return Err(Refusal::EditedAfterApplied {
                migration: m.id.to_string(),
                source_path: m.source.clone(),
                checksum: m.checksum[..12].to_string(),
                targets: some_of(&differs, 5),
            });
        }
    }
    Ok(())
}

/// Atomic units: every shard a unit prepares on must be able to prepare (refused before
/// any change, naming the shard and the setting), and a prepared change is invisible to
/// other transactions until the decision, so a step cannot wait on another target's step
/// of the same unit (units before it have committed by the time it runs).
pub(super) fn atomic(
    spec: &PlanSpec,
    expansion: &Expansion,
    two_phase_errors: &BTreeMap<String, String>,
    prepare_capacity: &BTreeMap<String, (u32, u32)>,
    lock_tables: &BTreeMap<String, LockTableSeen>,
) -> Result<(), Refusal> {
    for s in &expansion.steps {
        let m = &spec.migrations[s.migration];
        let shard = &expansion.targets[s.target].shard;
        if m.tx_mode == TxMode::Transactional
            && spec.atomic_unit(&m.id).is_some()
            && let Some(e) = two_phase_errors.get(shard)
        {
            return Err(Refusal::CannotPrepare(e.clone()));
        }
    }
    if !spec.two_phase() {
        return Ok(());
    }
    let per_unit = prepared_per_unit(spec, expansion);
    prepared_at_once(&per_unit, prepare_capacity)?;
    locked_at_once(spec, expansion, &per_unit, prepare_capacity, lock_tables)?;
    for s in &expansion.steps {
        let unit = spec.atomic_unit(&spec.migrations[s.migration].id);
        if unit.is_none() {
            continue;
        }
        if let Some(&d) = s.deps.iter().find(|&&d| {
            expansion.steps[d].target != s.target
                && spec.atomic_unit(&spec.migrations[expansion.steps[d].migration].id) == unit
        }) {
            return Err(Refusal::CrossTargetDependency {
                migration: spec.migrations[s.migration].id.to_string(),
                target: expansion.targets[s.target].to_string(),
                dependency: spec.migrations[expansion.steps[d].migration].id.to_string(),
                dependency_target: expansion.targets[expansion.steps[d].target].to_string(),
            });
        }
    }
    Ok(())
}

/// (unit, shard) -> the targets with a transactional step in the unit: each holds one
/// prepared transaction until the unit's decision, all of a shard's at once (a unit starts
/// every target together).
type PerUnit<'a> = BTreeMap<(usize, &'a str), BTreeSet<usize>>;

fn prepared_per_unit<'a>(spec: &PlanSpec, expansion: &'a Expansion) -> PerUnit<'a> {
    let mut per_unit = PerUnit::new();
    for s in &expansion.steps {
        let m = &spec.migrations[s.migration];
        let Some(unit) = spec.atomic_unit(&m.id) else {
            continue;
        };
        if m.tx_mode != TxMode::Transactional {
            continue;
        }
        let shard = expansion.targets[s.target].shard.as_str();
        per_unit.entry((unit, shard)).or_default().insert(s.target);
    }
    per_unit
}

/// A server whose max_prepared_transactions cannot hold a unit's prepared targets (less
/// those prepared there now, by any database) would fail at PREPARE halfway through the
/// unit. Refused now, naming the setting and the number needed. Shard databases on one
/// server share the limit; each shard is checked alone here.
fn prepared_at_once(
    per_unit: &PerUnit<'_>,
    prepare_capacity: &BTreeMap<String, (u32, u32)>,
) -> Result<(), Refusal> {
    for ((_, shard), targets) in per_unit {
        let Some(&(max, now)) = prepare_capacity.get(*shard) else {
            continue;
        };
        let room = max.saturating_sub(now) as usize;
        if targets.len() > room {
            return Err(Refusal::CannotPrepare(format!(
                "shard {shard}: the plan prepares {} transactions there at once (one per target), but its server's max_prepared_transactions = {max} with {now} prepared now; set max_prepared_transactions to at least {} (postgresql.conf, restart), and max_locks_per_transaction so that max_locks_per_transaction x (max_connections + max_prepared_transactions) covers the locks every prepared target holds (see README)",
                targets.len(),
                targets.len() + now as usize
            )));
        }
    }
    Ok(())
}

/// Every prepared target keeps its locks until the decision, in the server's shared lock
/// table, which PostgreSQL sizes for max_locks_per_transaction x (max_connections +
/// max_prepared_transactions) objects. A unit whose targets on a shard would hold more than
/// that (less what is held now) fails with "out of shared memory" while its statements run,
/// after some targets prepared: refused now, naming the shard, the numbers and the setting.
/// The estimate per target is the catalog's count for the relations the unit's statements
/// name plus an allowance for what they create (`flotilla_core::lint::LockFootprint`);
/// what SQL reaches through a function or a DO block is not seen, and fails the unit at
/// runtime before PREPARE instead. Like max_prepared_transactions, each shard is checked
/// alone: shard databases on one server share the table.
fn locked_at_once(
    spec: &PlanSpec,
    expansion: &Expansion,
    per_unit: &PerUnit<'_>,
    prepare_capacity: &BTreeMap<String, (u32, u32)>,
    lock_tables: &BTreeMap<String, LockTableSeen>,
) -> Result<(), Refusal> {
    let mut footprints: BTreeMap<usize, LockFootprint> = BTreeMap::new();
    for m in &spec.migrations {
        if m.tx_mode != TxMode::Transactional {
            continue;
        }
        if let Some(unit) = spec.atomic_unit(&m.id) {
            footprints.entry(unit).or_default().add(&m.up_sql);
        }
    }
    for ((unit, shard), targets) in per_unit {
        let (Some(table), Some(&(max_prepared, _)), Some(footprint)) = (
            lock_tables.get(*shard),
            prepare_capacity.get(*shard),
            footprints.get(unit),
        ) else {
            continue;
        };
        let per_target: Vec<u64> = targets
            .iter()
            .map(|&t| {
                let tenant = &expansion.targets[t].tenant;
                u64::from(footprint.per_target(table.named.get(tenant).copied().unwrap_or(0)))
            })
            .collect();
        let estimate: u64 = per_target.iter().sum();
        let most = per_target.iter().copied().max().unwrap_or(0);
        let slots = u64::from(table.max_connections) + u64::from(max_prepared);
        let capacity = u64::from(table.max_locks_per_transaction) * slots;
        if estimate + table.held > capacity {
            return Err(Refusal::CannotPrepare(format!(
                "shard {shard}: the plan's {} prepared targets there would hold about {estimate} locks at once (up to {most} each: the relations their statements name, with their indexes and TOAST tables, and what the statements create), with {} held now, but its server's lock table holds max_locks_per_transaction = {} x (max_connections = {} + max_prepared_transactions = {max_prepared}) = {capacity}; set max_locks_per_transaction to at least {} (postgresql.conf, restart; see README)",
                targets.len(),
                table.held,
                table.max_locks_per_transaction,
                table.max_connections,
                (estimate + table.held).div_ceil(slots.max(1)),
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::{self, ShardView};

    /// An atomic plan of one migration over the 3 tenants of shard_0: an ALTER TABLE
    /// (allowance 2) and a CREATE INDEX (1) on `orders`.
    fn plan() -> (PlanSpec, Expansion) {
        let spec = PlanSpec::try_from(pb::PlanSpec {
            name: "locks".into(),
            atomic: true,
            migrations: vec![pb::Migration {
                id: "m1".into(),
                up_sql: "ALTER TABLE orders ADD COLUMN note text;\nCREATE INDEX orders_note ON orders (note)".into(),
                down_sql: "DROP INDEX orders_note;\nALTER TABLE orders DROP COLUMN note".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .expect("valid plan");
        let fleet = BTreeMap::from([(
            "shard_0".to_string(),
            ShardView {
                labels: BTreeMap::new(),
                tenants: (0..3)
                    .map(|t| (format!("tenant_{t}"), BTreeMap::new()))
                    .collect(),
            },
        )]);
        let expansion = planner::expand(&spec, &fleet).expect("expands");
        (spec, expansion)
    }

    fn table(max_locks: u32, held: u64) -> BTreeMap<String, LockTableSeen> {
        // `orders` with its key's index and its TOAST table: 4 entries on every tenant
        let named = (0..3).map(|t| (format!("tenant_{t}"), 4)).collect();
        BTreeMap::from([(
            "shard_0".to_string(),
            LockTableSeen {
                max_locks_per_transaction: max_locks,
                max_connections: 5,
                held,
                named,
            },
        )])
    }

    #[test]
    fn a_lock_table_too_small_for_the_prepared_targets_is_refused_with_the_setting() {
        let (spec, expansion) = plan();
        let capacity = BTreeMap::from([("shard_0".to_string(), (5, 0))]);
        // 3 targets x (4 named + 3 created + 2) = 27 locks; the table holds 3 x (5 + 5) = 30
        assert!(atomic(&spec, &expansion, &BTreeMap::new(), &capacity, &table(3, 0)).is_ok());
        // ... less the 4 held now: refused, naming the shard, the numbers and the setting
        let err = atomic(&spec, &expansion, &BTreeMap::new(), &capacity, &table(3, 4))
            .expect_err("refused")
            .to_string();
        for part in [
            "shard shard_0: the plan's 3 prepared targets there would hold about 27 locks at once (up to 9 each",
            "with 4 held now",
            "max_locks_per_transaction = 3 x (max_connections = 5 + max_prepared_transactions = 5) = 30",
            "set max_locks_per_transaction to at least 4",
        ] {
            assert!(err.contains(part), "no `{part}` in: {err}");
        }
    }

    #[test]
    fn a_shard_that_did_not_report_its_lock_table_is_not_refused_for_it() {
        let (spec, expansion) = plan();
        let capacity = BTreeMap::from([("shard_0".to_string(), (5, 0))]);
        assert!(
            atomic(
                &spec,
                &expansion,
                &BTreeMap::new(),
                &capacity,
                &BTreeMap::new()
            )
            .is_ok()
        );
    }
}
