//! Checks of a plan against what the preflight found: edited migrations, and what atomic
//! units need (shards able to prepare, no dependency across targets inside a unit).
use std::collections::{BTreeMap, BTreeSet};

use flotilla_core::lint::{LintOptions, LockFootprint, Severity, lint_plan};
use flotilla_core::{PlanSpec, Target, TxMode, pb};

use super::preflight::{LockTableSeen, PrepareSeen, StepKey};
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

/// The lint's `tenant-escape` again, once the fleet said what scope `auto` is: on tenants,
/// a statement outside the tenant's schema is an error (the lint of the plan alone, not
/// knowing, made it a warning).
pub(super) fn tenant_escape(
    spec: &PlanSpec,
    resolved: flotilla_core::Scope,
) -> Result<(), CoordinatorError> {
    if spec.default_scope.is_some() || resolved != flotilla_core::Scope::Tenant {
        return Ok(());
    }
    let mut scoped = spec.clone();
    scoped.default_scope = Some(resolved);
    let errors: Vec<String> = lint_plan(&scoped, &LintOptions::default())
        .iter()
        .filter(|f| f.rule == flotilla_core::lint::TENANT_ESCAPE && f.severity == Severity::Error)
        .map(|f| {
            format!(
                "{f} (the plan's scope is auto, and the fleet has tenants; fix: {})",
                f.hint
            )
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CoordinatorError::Lint(errors.join("; ")))
    }
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
            // Targets that record the file's checksum say the file is what they applied:
            // a journal row edited by hand, more likely than the file.
            let agreeing = applied
                .iter()
                .filter(|((id, _, _), sum)| id == m.id.as_str() && **sum == m.checksum)
                .count();
            let why = if agreeing == 0 {
                "the file was edited after it was applied (no target records its checksum)"
                    .to_string()
            } else {
                format!(
                    "{agreeing} other target(s) record the file's checksum: those journal rows, or the file between the applies, were edited"
                )
            };
            return Err(Refusal::EditedAfterApplied {
                migration: m.id.to_string(),
                source_path: m.source.clone(),
                checksum: m.checksum[..12].to_string(),
                targets: some_of(&differs, 5),
                why,
            });
        }
    }
    Ok(())
}

/// A plan over a tenant whose schema is not the one its journal was written in (dropped and
/// made again, or restored on its own) is refused: what is applied there is not known, and
/// a guess either way is wrong for one of the two (migrations run again over a restore, or
/// reported applied on a new tenant). The agent's words name the answers an operator gives.
pub(super) fn schemas_known(
    expansion: &Expansion,
    changed: &BTreeMap<(String, String), String>,
) -> Result<(), Refusal> {
    let said: Vec<String> = expansion
        .targets
        .iter()
        .filter_map(|t| changed.get(&(t.shard.clone(), t.tenant.clone())).cloned())
        .collect();
    if said.is_empty() {
        return Ok(());
    }
    Err(Refusal::SchemaChanged {
        count: said.len(),
        said: some_of(&said, 3),
    })
}

/// Atomic units: every shard a unit prepares on must be able to prepare (refused before
/// any change, naming the shard and the setting), and a prepared change is invisible to
/// other transactions until the decision, so a step cannot wait on another target's step
/// of the same unit (units before it have committed by the time it runs).
pub(super) fn atomic(
    spec: &PlanSpec,
    expansion: &Expansion,
    two_phase_errors: &BTreeMap<String, String>,
    prepare_capacity: &BTreeMap<String, PrepareSeen>,
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
    let servers = per_server(&per_unit, prepare_capacity);
    prepared_at_once(&servers, prepare_capacity)?;
    locked_at_once(spec, expansion, &servers, prepare_capacity, lock_tables)?;
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
        // The unit's transactional steps of a target run in its one prepared transaction,
        // whose changes nothing else sees until the decision: a step of the unit after one
        // of them must be in that transaction too (transactional, and not held back by a
        // step that runs outside it), or it would fail on what it cannot see.
        let in_unit = |d: usize| {
            expansion.steps[d].target == s.target
                && spec.atomic_unit(&spec.migrations[expansion.steps[d].migration].id) == unit
        };
        let transactional = |m: usize| spec.migrations[m].tx_mode == TxMode::Transactional;
        let Some(&d) = s
            .deps
            .iter()
            .find(|&&d| in_unit(d) && transactional(expansion.steps[d].migration))
        else {
            continue;
        };
        let outside = s
            .deps
            .iter()
            .find(|&&e| in_unit(e) && !transactional(expansion.steps[e].migration));
        let why = if !transactional(s.migration) {
            Some("it cannot run in a transaction".to_string())
        } else {
            outside.map(|&e| {
                format!(
                    "it also waits for `{}`, which runs outside the unit's transaction",
                    spec.migrations[expansion.steps[e].migration].id
                )
            })
        };
        if let Some(why) = why {
            return Err(Refusal::SplitUnitTransaction {
                migration: spec.migrations[s.migration].id.to_string(),
                dependency: spec.migrations[expansion.steps[d].migration].id.to_string(),
                why,
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

/// (unit, server) -> each of the server's shards with the unit's prepared targets there.
/// Shard databases on one server share its max_prepared_transactions and its lock table,
/// so their targets add up; a shard whose server is unknown is a server of its own.
type PerServer<'a> = BTreeMap<(usize, ServerKey<'a>), Vec<(&'a str, &'a BTreeSet<usize>)>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ServerKey<'a> {
    Server(&'a str),
    ShardAlone(&'a str),
}

fn per_server<'a>(
    per_unit: &'a PerUnit<'a>,
    prepare_capacity: &'a BTreeMap<String, PrepareSeen>,
) -> PerServer<'a> {
    let mut grouped = PerServer::new();
    for ((unit, shard), targets) in per_unit {
        let Some(seen) = prepare_capacity.get(*shard) else {
            continue;
        };
        let key = if seen.server.is_empty() {
            ServerKey::ShardAlone(shard)
        } else {
            ServerKey::Server(&seen.server)
        };
        grouped
            .entry((*unit, key))
            .or_default()
            .push((*shard, targets));
    }
    grouped
}

/// Where a refusal points: "shard s" alone (no counts), or "shards a, b (databases of one
/// server)" and each one's count of prepared targets ("a 3, b 3").
fn server_place(shards: &[(&str, &BTreeSet<usize>)]) -> (String, String) {
    match shards {
        [(shard, _)] => (format!("shard {shard}"), String::new()),
        _ => {
            let names: Vec<&str> = shards.iter().map(|(s, _)| *s).collect();
            let counts: Vec<String> = shards
                .iter()
                .map(|(s, t)| format!("{s} {}", t.len()))
                .collect();
            (
                format!("shards {} (databases of one server)", names.join(", ")),
                counts.join(", "),
            )
        }
    }
}

/// A server whose max_prepared_transactions cannot hold a unit's prepared targets on all
/// its shard databases (less those prepared there now, by any database) would fail at
/// PREPARE halfway through the unit. Refused now, naming the shards, the setting and the
/// number needed.
fn prepared_at_once(
    servers: &PerServer<'_>,
    prepare_capacity: &BTreeMap<String, PrepareSeen>,
) -> Result<(), Refusal> {
    for shards in servers.values() {
        let seen = || shards.iter().map(|(s, _)| &prepare_capacity[*s]);
        // One server: its shards read the same setting; the count now is the latest seen.
        let max = seen().map(|c| c.max_prepared).min().unwrap_or(0);
        let now = seen().map(|c| c.prepared_now).max().unwrap_or(0);
        let wanted: usize = shards.iter().map(|(_, t)| t.len()).sum();
        let room = max.saturating_sub(now) as usize;
        if wanted > room {
            let (place, counts) = server_place(shards);
            let counts = if counts.is_empty() {
                counts
            } else {
                format!("; {counts}")
            };
            return Err(Refusal::CannotPrepare(format!(
                "{place}: the plan prepares {wanted} transactions there at once (one per target{counts}), but its server's max_prepared_transactions = {max} with {now} prepared now; set max_prepared_transactions to at least {} (postgresql.conf, restart), and max_locks_per_transaction so that max_locks_per_transaction x (max_connections + max_prepared_transactions) covers the locks every prepared target holds (see README)",
                wanted + now as usize
            )));
        }
    }
    Ok(())
}

/// Every prepared target keeps its locks until the decision, in the server's shared lock
/// table, which PostgreSQL sizes for max_locks_per_transaction x (max_connections +
/// max_prepared_transactions) objects. A unit whose targets on a server (all its shard
/// databases) would hold more than that (less what is held now) fails with "out of shared
/// memory" while its statements run, after some targets prepared: refused now, naming the
/// shards, the numbers and the setting. The estimate per target is the catalog's count for
/// the relations the unit's statements name plus an allowance for what they create
/// (`flotilla_core::lint::LockFootprint`); what SQL reaches through a function or a DO
/// block is not seen, and fails the unit at runtime before PREPARE instead.
fn locked_at_once(
    spec: &PlanSpec,
    expansion: &Expansion,
    servers: &PerServer<'_>,
    prepare_capacity: &BTreeMap<String, PrepareSeen>,
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
    for ((unit, _), shards) in servers {
        let Some(footprint) = footprints.get(unit) else {
            continue;
        };
        // A shard that did not report its lock table is left out of the sum (a warning at
        // its agent); the table filling anyway still fails the unit before PREPARE.
        let shards: Vec<(&str, &BTreeSet<usize>, &LockTableSeen)> = shards
            .iter()
            .filter_map(|&(shard, targets)| lock_tables.get(shard).map(|t| (shard, targets, t)))
            .collect();
        let Some(&(_, _, table)) = shards.first() else {
            continue;
        };
        let per_target: Vec<u64> = shards
            .iter()
            .flat_map(|(_, targets, table)| {
                targets.iter().map(|&t| {
                    let tenant = &expansion.targets[t].tenant;
                    u64::from(footprint.per_target(table.named.get(tenant).copied().unwrap_or(0)))
                })
            })
            .collect();
        let estimate: u64 = per_target.iter().sum();
        let most = per_target.iter().copied().max().unwrap_or(0);
        let held = shards.iter().map(|(_, _, t)| t.held).max().unwrap_or(0);
        let max_prepared = shards
            .iter()
            .map(|(s, _, _)| prepare_capacity[*s].max_prepared)
            .min()
            .unwrap_or(0);
        let slots = u64::from(table.max_connections) + u64::from(max_prepared);
        let capacity = u64::from(table.max_locks_per_transaction) * slots;
        if estimate + held > capacity {
            let named: Vec<(&str, &BTreeSet<usize>)> =
                shards.iter().map(|(s, t, _)| (*s, *t)).collect();
            let (place, counts) = server_place(&named);
            let counts = if counts.is_empty() {
                counts
            } else {
                format!(" ({counts})")
            };
            return Err(Refusal::CannotPrepare(format!(
                "{place}: the plan's {} prepared targets there{counts} would hold about {estimate} locks at once (up to {most} each: the relations their statements name, with their indexes and TOAST tables, and what the statements create), with {held} held now, but its server's lock table holds max_locks_per_transaction = {} x (max_connections = {} + max_prepared_transactions = {max_prepared}) = {capacity}; set max_locks_per_transaction to at least {} (postgresql.conf, restart; see README)",
                per_target.len(),
                table.max_locks_per_transaction,
                table.max_connections,
                (estimate + held).div_ceil(slots.max(1)),
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
        plan_on(&["shard_0"])
    }

    /// The same plan over 3 tenants on each of `shards`.
    fn plan_on(shards: &[&str]) -> (PlanSpec, Expansion) {
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
        let fleet = shards
            .iter()
            .map(|shard| {
                let view = ShardView {
                    labels: BTreeMap::new(),
                    tenants: (0..3)
                        .map(|t| (format!("tenant_{t}"), BTreeMap::new()))
                        .collect(),
                };
                (shard.to_string(), view)
            })
            .collect();
        let expansion = planner::expand(&spec, &fleet).expect("expands");
        (spec, expansion)
    }

    fn table(max_locks: u32, held: u64) -> BTreeMap<String, LockTableSeen> {
        tables(&["shard_0"], max_locks, held)
    }

    fn tables(shards: &[&str], max_locks: u32, held: u64) -> BTreeMap<String, LockTableSeen> {
        // `orders` with its key's index and its TOAST table: 4 entries on every tenant
        let named: std::collections::HashMap<String, u32> =
            (0..3).map(|t| (format!("tenant_{t}"), 4)).collect();
        shards
            .iter()
            .map(|shard| {
                let seen = LockTableSeen {
                    max_locks_per_transaction: max_locks,
                    max_connections: 5,
                    held,
                    named: named.clone(),
                };
                (shard.to_string(), seen)
            })
            .collect()
    }

    /// Each of `shards` on `server` ("": not known), max_prepared_transactions `max`.
    fn capacity(shards: &[(&str, &str)], max: u32, now: u32) -> BTreeMap<String, PrepareSeen> {
        shards
            .iter()
            .map(|(shard, server)| {
                let seen = PrepareSeen {
                    max_prepared: max,
                    prepared_now: now,
                    server: server.to_string(),
                };
                (shard.to_string(), seen)
            })
            .collect()
    }

    #[test]
    fn a_lock_table_too_small_for_the_prepared_targets_is_refused_with_the_setting() {
        let (spec, expansion) = plan();
        let capacity = capacity(&[("shard_0", "7715@1")], 5, 0);
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
        let capacity = capacity(&[("shard_0", "7715@1")], 5, 0);
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

    /// Shard databases on one server share its max_prepared_transactions: their targets
    /// add up, where each shard alone would fit (issue 15: 4 x 2,500 tenants on one
    /// server need 10,000, not 2,500).
    #[test]
    fn shards_on_one_server_add_up_their_prepared_targets() {
        let (spec, expansion) = plan_on(&["shard_0", "shard_1"]);
        let (none, no_tables) = (BTreeMap::new(), BTreeMap::new());
        // two servers: 3 each of 4
        let apart = capacity(&[("shard_0", "1@1"), ("shard_1", "2@1")], 4, 0);
        assert!(atomic(&spec, &expansion, &none, &apart, &no_tables).is_ok());
        // a server whose identity is not known is checked alone
        let unknown = capacity(&[("shard_0", ""), ("shard_1", "")], 4, 0);
        assert!(atomic(&spec, &expansion, &none, &unknown, &no_tables).is_ok());
        // one server: 6 of 4 (less 1 prepared now)
        let together = capacity(&[("shard_0", "1@1"), ("shard_1", "1@1")], 7, 2);
        let err = atomic(&spec, &expansion, &none, &together, &no_tables)
            .expect_err("refused")
            .to_string();
        for part in [
            "shards shard_0, shard_1 (databases of one server): the plan prepares 6 transactions there at once (one per target; shard_0 3, shard_1 3)",
            "max_prepared_transactions = 7 with 2 prepared now",
            "set max_prepared_transactions to at least 8",
        ] {
            assert!(err.contains(part), "no `{part}` in: {err}");
        }
        let room = capacity(&[("shard_0", "1@1"), ("shard_1", "1@1")], 8, 2);
        assert!(atomic(&spec, &expansion, &none, &room, &no_tables).is_ok());
    }

    /// The lock table is the server's too: the estimate adds up over its shard databases,
    /// and what is held now counts once.
    #[test]
    fn shards_on_one_server_add_up_their_locks() {
        let (spec, expansion) = plan_on(&["shard_0", "shard_1"]);
        let shards = ["shard_0", "shard_1"];
        // 3 targets x 9 locks a shard = 27; the table holds 3 x (5 + 5) = 30
        let apart = capacity(&[("shard_0", "1@1"), ("shard_1", "2@1")], 5, 0);
        let none = BTreeMap::new();
        assert!(atomic(&spec, &expansion, &none, &apart, &tables(&shards, 3, 2)).is_ok());
        // one server (room for its 6 prepared targets): 54 + 2 held now of 6 x (5 + 6) = 66
        let together = capacity(&[("shard_0", "1@1"), ("shard_1", "1@1")], 6, 0);
        assert!(atomic(&spec, &expansion, &none, &together, &tables(&shards, 6, 2)).is_ok());
        // ... and of 3 x 11 = 33
        let err = atomic(&spec, &expansion, &none, &together, &tables(&shards, 3, 2))
            .expect_err("refused")
            .to_string();
        for part in [
            "shards shard_0, shard_1 (databases of one server): the plan's 6 prepared targets there (shard_0 3, shard_1 3) would hold about 54 locks at once",
            "with 2 held now",
            "max_locks_per_transaction = 3 x (max_connections = 5 + max_prepared_transactions = 6) = 33",
            "set max_locks_per_transaction to at least 6",
        ] {
            assert!(err.contains(part), "no `{part}` in: {err}");
        }
    }
}
