use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use flotilla_core::pb;
use flotilla_core::selector::Selector;

use super::super::fixtures::two_shards_three_tenants as fleet;
use super::super::{Failures, Journals, ShardJournal};
use super::{FleetInput, PlanInput, fleet_status, show_target};
use crate::planner::ShardView;

const EPOCH: u64 = 7;

fn plan(id: &str, selector: &str, version: &str, migrations: &[(&str, &str)]) -> PlanInput {
    let raw = pb::PlanSpec {
        name: id.into(),
        selector: selector.into(),
        version: version.into(),
        migrations: migrations
            .iter()
            .map(|(mid, up)| pb::Migration {
                id: mid.to_string(),
                up_sql: up.to_string(),
                down_sql: "SELECT 1".into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    PlanInput {
        id: id.into(),
        spec: std::sync::Arc::new(flotilla_core::PlanSpec::try_from(raw).expect("valid plan")),
        shards: None,
    }
}

/// The input of one computation at EPOCH: no failures, no files named by the operator.
fn input<'a>(
    fleet: &'a BTreeMap<String, ShardView>,
    journals: &'a Journals,
    plans: &'a [PlanInput],
) -> FleetInput<'a> {
    static NONE: LazyLock<(Failures, HashMap<String, String>)> = LazyLock::new(Default::default);
    FleetInput {
        fleet,
        journals,
        epoch: EPOCH,
        failures: &NONE.0,
        plans,
        files: &NONE.1,
    }
}

fn entry(target: &str, migration: &str, checksum: &str, seq: i64) -> pb::JournalEntry {
    pb::JournalEntry {
        target: target.into(),
        migration_id: migration.into(),
        checksum: checksum.into(),
        plan_id: "p1".into(),
        applied_at_ms: 1,
        duration_ms: 1,
        seq,
    }
}

fn checksum(up: &str) -> String {
    flotilla_core::model::checksum(up)
}

/// Every tenant holds `applied` (migration, up SQL) pairs, except what `edit` changes.
fn journals(
    fleet: &BTreeMap<String, ShardView>,
    applied: &[(&str, &str)],
    edit: impl Fn(&str, &str, &mut Vec<pb::JournalEntry>),
) -> Journals {
    fleet
        .iter()
        .map(|(shard, view)| {
            let mut targets = HashMap::new();
            for (tenant, _) in &view.tenants {
                let mut rows: Vec<pb::JournalEntry> = applied
                    .iter()
                    .enumerate()
                    .map(|(i, (m, up))| entry(tenant, m, &checksum(up), i as i64))
                    .collect();
                edit(shard, tenant, &mut rows);
                targets.insert(tenant.clone(), rows);
            }
            (
                shard.clone(),
                Arc::new(ShardJournal {
                    epoch: EPOCH,
                    complete: true,
                    targets,
                    ..Default::default()
                }),
            )
        })
        .collect()
}

fn everything() -> Selector {
    Selector::parse("").unwrap()
}

#[test]
fn one_head_when_every_target_holds_every_completed_migration() {
    let fleet = fleet();
    let plans = [plan(
        "p1",
        "",
        "2.4.0",
        &[("001_a", "SELECT 1"), ("002_b", "SELECT 2")],
    )];
    let journals = journals(
        &fleet,
        &[("001_a", "SELECT 1"), ("002_b", "SELECT 2")],
        |_, _, _| {},
    );
    let input = input(&fleet, &journals, &plans);
    let r = fleet_status(&input, &everything());
    assert_eq!(r.targets, 6);
    assert_eq!(r.behind, 0);
    assert_eq!(r.cohorts.len(), 1);
    let c = &r.cohorts[0];
    assert_eq!(c.head, "002_b");
    assert_eq!(c.applied, 2);
    assert_eq!(c.version, "2.4.0");
    assert_eq!(c.digest.len(), 12);
    assert!(c.pending.is_empty());
    assert!(r.mismatches.is_empty() && r.unreported_shards.is_empty());
}

/// A plan of an environment that admits shard_0 only (`--environments`): shard_1's tenants,
/// which it never reached, are not behind for it.
#[test]
fn a_plan_of_another_environment_leaves_its_shards_not_behind() {
    let fleet = fleet();
    let mut p = plan("p1", "", "", &[("001_a", "SELECT 1")]);
    p.shards = Some(["shard_0".to_string()].into());
    let plans = [p];
    let journals = journals(&fleet, &[], |shard, tenant, rows| {
        if shard == "shard_0" {
            rows.push(entry(tenant, "001_a", &checksum("SELECT 1"), 1));
        }
    });
    let input = input(&fleet, &journals, &plans);
    let r = fleet_status(&input, &everything());
    assert_eq!(r.targets, 6);
    assert_eq!(r.behind, 0, "{r:?}");
}

#[test]
fn a_second_plan_to_some_targets_splits_the_fleet_and_names_what_the_rest_lack() {
    let fleet = fleet();
    // p2 selects automotive tenants; shard_1's automotive tenant has not run it yet.
    let plans = [
        plan("p1", "", "", &[("001_a", "SELECT 1")]),
        plan(
            "p2",
            "industry in (automotive)",
            "",
            &[("002_auto", "SELECT 2")],
        ),
    ];
    let journals = journals(&fleet, &[("001_a", "SELECT 1")], |shard, tenant, rows| {
        if tenant == "tenant_1" && shard == "shard_0" {
            rows.push(entry(tenant, "002_auto", &checksum("SELECT 2"), 9));
        }
    });
    let input = input(&fleet, &journals, &plans);
    let r = fleet_status(&input, &everything());
    assert_eq!(r.targets, 6);
    assert_eq!(r.behind, 1);
    assert_eq!(r.cohorts.len(), 3, "{:?}", r.cohorts);
    assert_eq!(r.cohorts[0].targets.len(), 4);
    assert_eq!(r.cohorts[0].head, "001_a");
    let behind = r.cohorts.iter().find(|c| !c.pending.is_empty()).unwrap();
    assert_eq!(behind.targets, vec!["shard_1/tenant_1".to_string()]);
    assert_eq!(behind.pending, vec!["002_auto".to_string()]);
    let ahead = r.cohorts.iter().find(|c| c.head == "002_auto").unwrap();
    assert_eq!(ahead.targets, vec!["shard_0/tenant_1".to_string()]);

    // The selector narrows the view to the automotive tenants.
    let auto = fleet_status(
        &input,
        &Selector::parse("industry in (automotive)").unwrap(),
    );
    assert_eq!(auto.targets, 2);
    assert_eq!(auto.behind, 1);
}

#[test]
fn a_journal_checksum_that_is_not_the_plans_is_named_with_its_target() {
    let fleet = fleet();
    let plans = [plan("p1", "", "", &[("001_a", "SELECT 1")])];
    let journals = journals(&fleet, &[("001_a", "SELECT 1")], |shard, tenant, rows| {
        if shard == "shard_1" && tenant == "tenant_2" {
            rows[0].checksum = "f".repeat(64);
        }
    });
    let input = input(&fleet, &journals, &plans);
    let r = fleet_status(&input, &everything());
    assert_eq!(r.mismatches.len(), 1);
    let m = &r.mismatches[0];
    assert_eq!(m.target, "shard_1/tenant_2");
    assert_eq!(m.migration_id, "001_a");
    assert_eq!(m.plan_checksum, checksum("SELECT 1"));
    // Its applied set differs, so it is a cohort of its own.
    assert_eq!(r.cohorts.len(), 2);
}

#[test]
fn shards_not_heard_under_this_epoch_are_named_not_counted() {
    let fleet = fleet();
    let plans = [plan("p1", "", "", &[("001_a", "SELECT 1")])];
    let mut journals = journals(&fleet, &[("001_a", "SELECT 1")], |_, _, _| {});
    Arc::make_mut(journals.get_mut("shard_1").unwrap()).epoch = EPOCH - 1;
    let input = input(&fleet, &journals, &plans);
    let r = fleet_status(&input, &everything());
    assert_eq!(r.targets, 3);
    assert_eq!(r.unreported_shards, vec!["shard_1".to_string()]);
}

/// A step begun and not finished by a run (a data change stopped between batches) is listed
/// part-way, newest first, named by its target; it is not a failure (a rollback cut short
/// is, beside it).
#[test]
fn a_step_begun_and_not_finished_is_part_way_not_a_failure() {
    let fleet = fleet();
    let plans = [plan("p1", "", "", &[("001_a", "SELECT 1")])];
    let mut journals = journals(&fleet, &[], |_, _, _| {});
    let applying = |migration: &str, at_ms| pb::CutShort {
        target: "tenant_1".into(),
        migration_id: migration.into(),
        plan_id: "p2".into(),
        at_ms,
        applying: true,
        rows: 300,
        batches: 3,
        ..Default::default()
    };
    Arc::make_mut(journals.get_mut("shard_0").unwrap())
        .cut_short
        .insert(
            "tenant_1".into(),
            vec![applying("002_b", 40), applying("003_c", 60)],
        );
    let input = input(&fleet, &journals, &plans);
    let r = fleet_status(&input, &everything());
    assert!(r.failures.is_empty(), "{r:?}");
    let listed: Vec<(&str, &str, i64)> = r
        .part_way
        .iter()
        .map(|c| (c.target.as_str(), c.migration_id.as_str(), c.rows))
        .collect();
    assert_eq!(
        listed,
        [
            ("shard_0/tenant_1", "003_c", 300),
            ("shard_0/tenant_1", "002_b", 300)
        ]
    );
    let shown = show_target(&input, "shard_0/tenant_1").unwrap();
    assert_eq!(shown.part_way, r.part_way);
    assert_eq!(shown.last_failure, None);
    assert!(
        show_target(&input, "shard_0/tenant_0")
            .unwrap()
            .part_way
            .is_empty()
    );
}

/// A step the shard reports a rollback cut short is the target's last failure without any
/// result or reply heard here (a coordinator that restarted, or a new leader), unless one
/// heard since is newer; it goes with the shard's report that no longer lists it.
#[test]
fn a_rollback_cut_short_on_the_shard_is_the_targets_last_failure() {
    let fleet = fleet();
    let plans = [plan("p1", "", "", &[("001_a", "SELECT 1")])];
    let mut journals = journals(&fleet, &[], |_, _, _| {});
    let cut_short = pb::CutShort {
        target: "tenant_1".into(),
        migration_id: "001_a".into(),
        plan_id: "p1".into(),
        at_ms: 50,
        undone: 2,
        ..Default::default()
    };
    Arc::make_mut(journals.get_mut("shard_0").unwrap())
        .cut_short
        .insert("tenant_1".into(), vec![cut_short.clone()]);
    let input = input(&fleet, &journals, &plans);
    let r = fleet_status(&input, &everything());
    assert_eq!(r.failures.len(), 1, "{r:?}");
    let f = &r.failures[0];
    assert_eq!(
        (
            f.target.as_str(),
            f.migration_id.as_str(),
            f.plan_id.as_str(),
            f.at_ms
        ),
        ("shard_0/tenant_1", "001_a", "p1", 50)
    );
    assert!(
        f.message
            .starts_with("the rollback of plan p1 began to undo this step")
            && f.message.contains("`flotilla plan rollback p1`")
            && f.message
                .contains("(2 down statements done; the next rollback goes on after them)"),
        "{f:?}"
    );
    let shown = show_target(&input, "shard_0/tenant_1").unwrap();
    assert_eq!(shown.last_failure.as_ref(), Some(f));

    // a failure heard here later wins; an older one does not, unless it is the rollback's own
    // reply of that step (with the down SQL's error)
    let heard = |at_ms, message: &str| {
        HashMap::from([(
            ("shard_0".to_string(), "tenant_1".to_string()),
            pb::LastFailure {
                target: "shard_0/tenant_1".into(),
                migration_id: "001_a".into(),
                plan_id: "p1".into(),
                sqlstate: "XX000".into(),
                message: message.into(),
                at_ms,
            },
        )])
    };
    let reply = "the rollback of plan p1 could not undo it, and stopped on this target: boom";
    for (at_ms, message, sqlstate) in [
        (60, "relation does not exist", "XX000"),
        (40, "relation does not exist", ""),
        (40, reply, "XX000"),
    ] {
        let failures = heard(at_ms, message);
        let input = FleetInput {
            failures: &failures,
            ..input
        };
        let shown = show_target(&input, "shard_0/tenant_1").unwrap();
        assert_eq!(shown.last_failure.unwrap().sqlstate, sqlstate, "{at_ms}");
    }

    // the shard's next report of the target, without it: no failure
    let versions = super::super::FleetVersions::default();
    versions.attached("shard_0", EPOCH);
    versions.apply(
        "shard_0",
        pb::JournalReport {
            reset: true,
            cut_short: vec![cut_short],
            ..Default::default()
        },
    );
    let (journals, failures) = versions.snapshot();
    assert_eq!(journals["shard_0"].cut_short["tenant_1"].len(), 1);
    versions.apply(
        "shard_0",
        pb::JournalReport {
            targets: vec!["tenant_1".into()],
            ..Default::default()
        },
    );
    let (journals, _) = versions.snapshot();
    assert!(journals["shard_0"].cut_short.is_empty());
    assert!(failures.is_empty());
}

#[test]
fn a_failure_shows_in_status_and_show_and_names_resolve() {
    let fleet = fleet();
    let plans = [plan("p1", "", "", &[("001_a", "SELECT 1")])];
    let journals = journals(&fleet, &[], |_, _, _| {});
    let failures = HashMap::from([(
        ("shard_0".to_string(), "tenant_2".to_string()),
        pb::LastFailure {
            target: "shard_0/tenant_2".into(),
            migration_id: "001_a".into(),
            plan_id: "p1".into(),
            sqlstate: "42P01".into(),
            message: "relation does not exist".into(),
            at_ms: 5,
        },
    )]);
    let input = FleetInput {
        failures: &failures,
        ..input(&fleet, &journals, &plans)
    };
    let r = fleet_status(&input, &everything());
    assert_eq!(r.behind, 6);
    assert_eq!(r.failures.len(), 1);
    assert_eq!(r.cohorts[0].head, "");

    let t = show_target(&input, "shard_0/tenant_2").unwrap();
    assert_eq!(t.pending, vec!["001_a".to_string()]);
    assert_eq!(t.last_failure.unwrap().sqlstate, "42P01");
    assert_eq!(t.labels.get("industry").unwrap(), "home_services");
    // A tenant name on both shards must be qualified; unknown names are refused by name.
    let e = show_target(&input, "tenant_2").unwrap_err();
    assert!(e.contains("several shards (shard_0, shard_1)"), "{e}");
    let e = show_target(&input, "tenant_9").unwrap_err();
    assert!(e.contains("`tenant_9`"), "{e}");
    let e = show_target(&input, "shard_9/tenant_0").unwrap_err();
    assert!(e.contains("no shard `shard_9`"), "{e}");
    // the shard itself, nothing expected of it and no journal row: its labels all the same
    let t = show_target(&input, "shard_1").unwrap();
    assert!(t.journal.is_empty());
    assert_eq!(
        t.labels.get("shard").map(String::as_str),
        Some("shard_1"),
        "{t:?}"
    );
}

#[test]
fn the_files_named_by_the_operator_are_compared_with_the_journal() {
    let fleet = fleet();
    let plans = [plan("p1", "", "", &[("001_a", "SELECT 1")])];
    let journals = journals(&fleet, &[("001_a", "SELECT 1")], |_, _, _| {});
    let files = HashMap::from([("001_a".to_string(), checksum("SELECT 1 -- edited"))]);
    let input = FleetInput {
        files: &files,
        ..input(&fleet, &journals, &plans)
    };
    let r = fleet_status(&input, &everything());
    assert_eq!(r.mismatches.len(), 6);
    assert!(r.mismatches.iter().all(|m| m.plan_id.is_empty()
        && m.plan_checksum == checksum("SELECT 1 -- edited")
        && m.journal_checksum == checksum("SELECT 1")));
}

#[test]
fn a_gone_tenant_is_shown_from_its_journal_rows() {
    let fleet = fleet();
    let plans = [plan("p1", "", "", &[("001_a", "SELECT 1")])];
    let mut journals = journals(&fleet, &[("001_a", "SELECT 1")], |_, _, _| {});
    // tenant_7's schema is gone from shard_0: its agent no longer lists it, its rows stay.
    let rows = vec![entry("tenant_7", "001_a", &checksum("SELECT 1"), 1)];
    Arc::make_mut(journals.get_mut("shard_0").unwrap())
        .targets
        .insert("tenant_7".into(), rows);
    let input = input(&fleet, &journals, &plans);
    assert_eq!(
        fleet_status(&input, &everything()).gone,
        vec!["shard_0/tenant_7".to_string()]
    );
    for name in ["shard_0/tenant_7", "tenant_7"] {
        let t = show_target(&input, name).unwrap();
        assert!(t.gone, "{t:?}");
        assert_eq!(t.journal.len(), 1, "{t:?}");
        assert!(t.pending.is_empty(), "{t:?}");
        assert_eq!(t.head, "001_a");
    }
    // A name with no rows anywhere is still unknown; a live tenant is not gone.
    assert!(show_target(&input, "shard_0/tenant_8").is_err());
    assert!(show_target(&input, "shard_0/").is_err());
    assert!(!show_target(&input, "shard_0/tenant_0").unwrap().gone);
}

/// A tenant whose name holds a `/` is found by that name when no shard is named by what is
/// before it (`fleet show sl/ash` said "no shard `sl`").
#[test]
fn a_tenant_named_with_a_slash_is_shown_by_its_name() {
    let mut fleet = fleet();
    fleet
        .get_mut("shard_1")
        .unwrap()
        .tenants
        .push(("sl/ash".into(), BTreeMap::new()));
    let plans = [plan("p1", "", "", &[("001_a", "SELECT 1")])];
    let journals = journals(&fleet, &[("001_a", "SELECT 1")], |_, _, _| {});
    let input = input(&fleet, &journals, &plans);
    for name in ["sl/ash", "shard_1/sl/ash"] {
        let t = show_target(&input, name).unwrap();
        assert_eq!((t.shard.as_str(), t.tenant.as_str()), ("shard_1", "sl/ash"));
    }
    let e = show_target(&input, "sl/other").unwrap_err();
    assert!(
        e.contains("no shard `sl` in the fleet, and no tenant `sl/other`"),
        "{e}"
    );
}

/// A run of an older term fenced by the shard (FL002) leaves no last failure: the newer
/// term's run goes on. Before, `fleet status` listed such targets "failed last" after a
/// restart of the coordinator while their plan ran on to complete. Another failure is
/// recorded as before, and so is a run of the agent's term fenced (its shard ahead of the
/// leader: the plan fails).
#[test]
fn a_run_fenced_for_an_older_term_is_no_failure_of_its_target() {
    let v = super::super::FleetVersions::default();
    let failed = |tenant: &str, sqlstate: &str, epoch: u64| pb::RunResult {
        run_id: (epoch << 32) + 1,
        tenant: tenant.into(),
        steps: vec![pb::StepResult {
            migration_id: "001_a".into(),
            outcome: pb::StepOutcome::Failed as i32,
            error: Some(pb::StepError {
                sqlstate: sqlstate.into(),
                message: "fenced: epoch 1 is older than the shard's epoch 2".into(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    v.record_results(
        "shard_0",
        &pb::RunResults {
            plan_id: "p1".into(),
            runs: vec![
                failed("tenant_0", "FL002", 1),
                failed("tenant_1", "23505", 1),
                failed("tenant_2", "FL002", 2),
            ],
        },
        2,
    );
    let (_, failures) = v.snapshot();
    let mut keys: Vec<&(String, String)> = failures.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            &("shard_0".to_string(), "tenant_1".to_string()),
            &("shard_0".to_string(), "tenant_2".to_string())
        ]
    );
}

/// A target's last failure is kept through its plan's other steps applied there after it
/// (`policy = continue` goes on with a target's migrations that do not depend on the one
/// that failed, and the first of them cleared it: `fleet status` listed no failure of a
/// target left part-way); a retry of the step, or another plan's step, clears it.
#[test]
fn a_last_failure_is_kept_through_its_own_plans_later_steps() {
    let v = super::super::FleetVersions::default();
    let step = |migration: &str, outcome: pb::StepOutcome| pb::StepResult {
        migration_id: migration.into(),
        outcome: outcome as i32,
        error: (outcome == pb::StepOutcome::Failed).then(|| pb::StepError {
            sqlstate: "42P01".into(),
            message: "relation \"repair_orders\" does not exist".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let report = |plan_id: &str, steps: Vec<pb::StepResult>| {
        v.record_results(
            "shard_0",
            &pb::RunResults {
                plan_id: plan_id.into(),
                runs: vec![pb::RunResult {
                    run_id: (1 << 32) + 1,
                    tenant: "tenant_0".into(),
                    steps,
                    ..Default::default()
                }],
            },
            1,
        );
    };
    let failed_last = || {
        let (_, failures) = v.snapshot();
        failures
            .values()
            .map(|f| (f.plan_id.clone(), f.migration_id.clone()))
            .collect::<Vec<_>>()
    };
    let p1 = |m: &str| ("p1".to_string(), m.to_string());
    // 003 failed, then 001 and 002 of the same plan applied (in one run, and in another)
    report(
        "p1",
        vec![
            step("003_flag", pb::StepOutcome::Failed),
            step("001_col", pb::StepOutcome::Applied),
        ],
    );
    report("p1", vec![step("002_check", pb::StepOutcome::Applied)]);
    assert_eq!(failed_last(), [p1("003_flag")]);
    // the retry applies it
    report("p1", vec![step("003_flag", pb::StepOutcome::Applied)]);
    assert!(failed_last().is_empty());
    // failed again in p2, then a later plan applies a step there: the target moved on
    report("p2", vec![step("004_more", pb::StepOutcome::Failed)]);
    assert_eq!(failed_last().len(), 1);
    report("p3", vec![step("005_other", pb::StepOutcome::Applied)]);
    assert!(failed_last().is_empty());
}
