use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use flotilla_core::pb;
use flotilla_core::selector::Selector;

use super::super::FleetVersions;
use super::super::fixtures::two_shards_three_tenants as fleet;
use super::{FleetInput, cohort_labels, fleet_drift};
use crate::planner::ShardView;

const EPOCH: u64 = 3;

fn base() -> Vec<String> {
    vec![
        "column work_orders.id bigint not null".to_string(),
        "index idx_y ON work_orders USING btree (id)".to_string(),
        "table work_orders".to_string(),
    ]
}

fn with(mut items: Vec<String>, extra: &str) -> Vec<String> {
    items.push(extra.to_string());
    items.sort();
    items
}

fn without(items: Vec<String>, gone: &str) -> Vec<String> {
    items.into_iter().filter(|i| !i.starts_with(gone)).collect()
}

/// A fingerprint of `items`: on the agent a digest; any name that is one per shape will do.
fn fingerprint(items: &[String]) -> String {
    format!("fp[{}]", items.join("|"))
}

fn journal(migrations: &[(&str, &[&str])]) -> pb::JournalReport {
    let mut entries = Vec::new();
    for (i, (tenant, applied)) in migrations.iter().enumerate() {
        for (j, m) in applied.iter().enumerate() {
            entries.push(pb::JournalEntry {
                target: tenant.to_string(),
                migration_id: m.to_string(),
                checksum: format!("sum-{m}"),
                plan_id: "p1".into(),
                seq: (i * 10 + j) as i64,
                ..Default::default()
            });
        }
    }
    pb::JournalReport {
        reset: true,
        targets: Vec::new(),
        entries,
        cut_short: Vec::new(),
    }
}

/// A whole schema report of `shapes` per tenant, in one message.
fn schema(tenants: &[(&str, Vec<String>)]) -> pb::SchemaReport {
    let mut shapes = HashMap::new();
    let mut fingerprints = Vec::new();
    for (tenant, items) in tenants {
        let f = fingerprint(items);
        shapes.insert(f.clone(), items.clone());
        fingerprints.push(pb::TargetFingerprint {
            target: tenant.to_string(),
            fingerprint: f,
        });
    }
    pb::SchemaReport {
        shapes: shapes
            .into_iter()
            .map(|(fingerprint, items)| pb::SchemaShape { fingerprint, items })
            .collect(),
        last: true,
        whole: true,
        targets: Vec::new(),
        fingerprints,
        read_ms: 12,
    }
}

const ALL: [&str; 3] = ["tenant_0", "tenant_1", "tenant_2"];

/// Every tenant of both shards at m1 and of the base shape, unless `shape` says otherwise.
fn versions(shape: impl Fn(&str, &str) -> Vec<String>) -> FleetVersions {
    let v = FleetVersions::default();
    for shard in ["shard_0", "shard_1"] {
        v.attached(shard, EPOCH);
        let applied: Vec<(&str, &[&str])> = ALL.iter().map(|t| (*t, &["m1"][..])).collect();
        v.apply(shard, journal(&applied));
        let shapes: Vec<(&str, Vec<String>)> = ALL.iter().map(|t| (*t, shape(shard, t))).collect();
        assert!(v.apply_schema(shard, schema(&shapes)));
    }
    v
}

fn drift(v: &FleetVersions, selector: &str) -> pb::FleetDriftResponse {
    drift_over(v, &fleet(), selector)
}

/// `fleet drift` over `fleet` from what `v` holds, as the leader answers it.
fn drift_over(
    v: &FleetVersions,
    fleet: &BTreeMap<String, ShardView>,
    selector: &str,
) -> pb::FleetDriftResponse {
    let (journals, failures) = v.snapshot();
    fleet_drift(
        &FleetInput {
            fleet,
            journals: &journals,
            epoch: EPOCH,
            failures: &failures,
            plans: &[],
            files: &HashMap::new(),
        },
        &Selector::parse(selector).unwrap(),
    )
}

#[test]
fn one_shape_is_no_drift() {
    let r = drift(&versions(|_, _| base()), "");
    assert_eq!((r.targets, r.drifted), (6, 0));
    assert_eq!(r.cohorts.len(), 1);
    let c = &r.cohorts[0];
    assert_eq!((c.head.as_str(), c.targets, c.majority), ("m1", 6, 6));
    assert_eq!(c.shapes.len(), 1);
    assert!(r.unfingerprinted.is_empty() && r.unreported_shards.is_empty());
    assert_eq!(r.shards.len(), 2);
    assert_eq!(r.shards[0].read_ms, 12);
    assert_eq!(cohort_labels(&r), [("m1".to_string(), 0)]);
}

#[test]
fn a_column_added_by_hand_is_named_with_its_table() {
    let v = versions(|shard, t| {
        if shard == "shard_1" && t == "tenant_2" {
            with(base(), "column work_orders.loyalty_tier text")
        } else {
            base()
        }
    });
    let r = drift(&v, "");
    assert_eq!(r.drifted, 1);
    let c = &r.cohorts[0];
    assert_eq!((c.targets, c.majority), (6, 5));
    assert_eq!(c.shapes.len(), 2);
    assert!(c.shapes[0].majority && c.shapes[0].targets == 5);
    assert_eq!(c.shapes[1].targets, 1);
    let d = &c.drifted[0];
    assert_eq!(d.target, "shard_1/tenant_2");
    assert_eq!(d.extra, ["column work_orders.loyalty_tier text"]);
    assert!(d.missing.is_empty() && !d.unknown_items);
    assert_eq!(cohort_labels(&r), [("m1".to_string(), 1)]);
}

#[test]
fn a_dropped_index_is_missing_and_a_changed_type_is_both() {
    let v = versions(|shard, t| match (shard, t) {
        ("shard_0", "tenant_0") => without(base(), "index idx_y"),
        ("shard_0", "tenant_1") => with(
            without(base(), "column work_orders.id"),
            "column work_orders.id integer not null",
        ),
        _ => base(),
    });
    let r = drift(&v, "");
    assert_eq!(r.drifted, 2);
    let by: HashMap<&str, &pb::DriftedTarget> = r.cohorts[0]
        .drifted
        .iter()
        .map(|d| (d.target.as_str(), d))
        .collect();
    let dropped = by["shard_0/tenant_0"];
    assert!(dropped.extra.is_empty());
    assert_eq!(
        dropped.missing,
        ["index idx_y ON work_orders USING btree (id)"]
    );
    let retyped = by["shard_0/tenant_1"];
    assert_eq!(retyped.extra, ["column work_orders.id integer not null"]);
    assert_eq!(retyped.missing, ["column work_orders.id bigint not null"]);
}

#[test]
fn cohorts_are_compared_apart_and_selectors_narrow() {
    // shard_0's tenants ran m2 too (a column more): another cohort, not drift.
    let v = versions(|shard, _| {
        if shard == "shard_0" {
            with(base(), "column work_orders.note text")
        } else {
            base()
        }
    });
    let applied: Vec<(&str, &[&str])> = ALL.iter().map(|t| (*t, &["m1", "m2"][..])).collect();
    v.apply("shard_0", journal(&applied));
    let r = drift(&v, "");
    assert_eq!((r.targets, r.drifted), (6, 0));
    assert_eq!(r.cohorts.len(), 2);
    let labels: Vec<String> = cohort_labels(&r).into_iter().map(|(l, _)| l).collect();
    assert!(labels.contains(&"m1".to_string()) && labels.contains(&"m2".to_string()));
    let r = drift(&v, "industry in (automotive)");
    assert_eq!(r.targets, 2);
    assert_eq!(r.cohorts.len(), 2);
}

/// A selection shows its targets measured against the whole cohort's majority: one
/// drifted target selected alone was "no drift" (it was its own majority), and a healthy
/// and a drifted one together blamed whichever fingerprint sorted first.
#[test]
fn a_selection_is_measured_against_the_whole_cohort() {
    let v = versions(|shard, t| {
        if shard == "shard_0" && t == "tenant_2" {
            without(base(), "index idx_y")
        } else {
            base()
        }
    });
    let r = drift(&v, "shard = shard_0, tenant = tenant_2");
    assert_eq!((r.targets, r.drifted), (1, 1), "{r:?}");
    assert_eq!(r.cohorts[0].drifted[0].target, "shard_0/tenant_2");
    assert_eq!(r.cohorts[0].majority, 5, "the whole cohort's majority");
    let r = drift(&v, "tenant in (tenant_2), shard in (shard_0, shard_1)");
    assert_eq!((r.targets, r.drifted), (2, 1), "{r:?}");
    assert_eq!(r.cohorts[0].drifted[0].target, "shard_0/tenant_2");
    let r = drift(&v, "shard = shard_1");
    assert_eq!((r.targets, r.drifted), (3, 0), "{r:?}");
}

/// Two shapes shared by as many targets: no majority, so both sides count as drifted, each
/// compared with the other (before, the smaller fingerprint was the "majority": the healthy
/// target could be the one named, and the edited one passed `require_no_drift`).
#[test]
fn a_tie_has_no_majority_and_names_every_target() {
    // one cohort of two targets of two shapes (the others ran another migration)
    let v = versions(|shard, t| {
        if shard == "shard_1" && t == "tenant_0" {
            with(base(), "column work_orders.a text")
        } else {
            base()
        }
    });
    for shard in ["shard_0", "shard_1"] {
        let applied: Vec<(&str, &[&str])> = ALL
            .iter()
            .map(|t| {
                let lone = *t == "tenant_0";
                (*t, if lone { &["m1"][..] } else { &["m1", "m9"][..] })
            })
            .collect();
        v.apply(shard, journal(&applied));
    }
    let r = drift(&v, "");
    let pair = r.cohorts.iter().find(|c| c.targets == 2).unwrap();
    assert!(pair.tied, "{pair:?}");
    assert!(pair.shapes.iter().all(|s| !s.majority), "{pair:?}");
    let mut named: Vec<&str> = pair.drifted.iter().map(|d| d.target.as_str()).collect();
    named.sort();
    assert_eq!(named, ["shard_0/tenant_0", "shard_1/tenant_0"]);
    let edited = pair
        .drifted
        .iter()
        .find(|d| d.target == "shard_1/tenant_0")
        .unwrap();
    assert!(edited.tied);
    assert_eq!(edited.extra, ["column work_orders.a text"]);
    let healthy = pair
        .drifted
        .iter()
        .find(|d| d.target == "shard_0/tenant_0")
        .unwrap();
    assert_eq!(healthy.missing, ["column work_orders.a text"]);
    assert_eq!(healthy.against, edited.fingerprint);
    // The other cohort (4 targets of one shape) has its majority as before.
    let rest = r.cohorts.iter().find(|c| c.targets == 4).unwrap();
    assert!(!rest.tied && rest.drifted.is_empty() && rest.shapes[0].majority);
    assert_eq!(r.drifted, 2);
}

#[test]
fn reports_in_chunks_partial_reports_and_a_new_session() {
    let v = versions(|_, _| base());
    // A whole report in two messages: nothing changes before the last.
    let changed = with(base(), "column work_orders.x text");
    let f = fingerprint(&changed);
    let first = pb::SchemaReport {
        shapes: vec![pb::SchemaShape {
            fingerprint: f.clone(),
            items: changed.clone(),
        }],
        ..Default::default()
    };
    assert!(!v.apply_schema("shard_0", first));
    assert_eq!(drift(&v, "").drifted, 0);
    // The last message names only tenant_2: its fingerprint is replaced, the others stay.
    let last = pb::SchemaReport {
        last: true,
        targets: vec!["tenant_2".into()],
        fingerprints: vec![pb::TargetFingerprint {
            target: "tenant_2".into(),
            fingerprint: f.clone(),
        }],
        ..Default::default()
    };
    assert!(v.apply_schema("shard_0", last));
    let r = drift(&v, "");
    assert_eq!(r.drifted, 1);
    assert_eq!(r.cohorts[0].drifted[0].extra, ["column work_orders.x text"]);
    // A new session: the shard's fingerprints do not count until its whole report.
    v.attached("shard_0", EPOCH);
    let applied: Vec<(&str, &[&str])> = ALL.iter().map(|t| (*t, &["m1"][..])).collect();
    v.apply("shard_0", journal(&applied));
    let r = drift(&v, "");
    assert_eq!((r.targets, r.drifted), (3, 0));
    assert_eq!(r.unfingerprinted.len(), 3);
    // A shape whose items never came: drift without a diff.
    assert!(
        v.apply_schema(
            "shard_0",
            pb::SchemaReport {
                last: true,
                whole: true,
                fingerprints: ALL
                    .iter()
                    .map(|t| pb::TargetFingerprint {
                        target: t.to_string(),
                        fingerprint: if *t == "tenant_1" {
                            "lost".into()
                        } else {
                            fingerprint(&base())
                        },
                    })
                    .collect(),
                shapes: vec![pb::SchemaShape {
                    fingerprint: fingerprint(&base()),
                    items: base(),
                }],
                ..Default::default()
            }
        )
    );
    let r = drift(&v, "");
    assert_eq!(r.drifted, 1);
    assert!(r.cohorts[0].drifted[0].unknown_items);
}

#[test]
fn a_query_keeps_what_was_known_when_it_began_and_reports_copy_only_their_shard() {
    let v = versions(|_, _| base());
    let (before, failures) = v.snapshot();
    let (again, failures_again) = v.snapshot();
    assert!(Arc::ptr_eq(&before, &again) && Arc::ptr_eq(&failures, &failures_again));
    let applied: Vec<(&str, &[&str])> = ALL.iter().map(|t| (*t, &["m1", "m2"][..])).collect();
    v.apply("shard_0", journal(&applied));
    let (after, _) = v.snapshot();
    assert_eq!(before["shard_0"].targets["tenant_0"].len(), 1);
    assert_eq!(after["shard_0"].targets["tenant_0"].len(), 2);
    assert!(Arc::ptr_eq(&before["shard_1"], &after["shard_1"]));
}

#[test]
fn reports_during_a_recomputation_make_one_more_not_one_each() {
    let v = FleetVersions::default();
    assert!(v.publish_start());
    assert!(!v.publish_start());
    assert!(!v.publish_start());
    assert!(v.publish_done(), "asked meanwhile: once more");
    assert!(!v.publish_done(), "then done");
    assert!(v.publish_start());
    assert!(!v.publish_done());
}

/// `fleet drift`'s computation over 4 shards x 2,500 tenants with 20 migrations each and
/// 25 items per shape, 12 drifted: `cargo test -p flotilla-coordinator --release --lib
/// drift_bench -- --ignored --nocapture`.
#[test]
#[ignore]
fn drift_bench() {
    let v = FleetVersions::default();
    let mut fleet = BTreeMap::new();
    let shape: Vec<String> = (0..25).map(|i| format!("column t.c{i:02} text")).collect();
    let migrations: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
    let ids: Vec<&str> = migrations.iter().map(String::as_str).collect();
    for s in 0..4 {
        let shard = format!("shard_{s}");
        let tenants: Vec<String> = (0..2500)
            .map(|t| format!("tenant_{:05}", s * 2500 + t))
            .collect();
        fleet.insert(
            shard.clone(),
            ShardView {
                labels: BTreeMap::new(),
                tenants: tenants
                    .iter()
                    .map(|t| (t.clone(), BTreeMap::new()))
                    .collect(),
            },
        );
        v.attached(&shard, EPOCH);
        let applied: Vec<(&str, &[&str])> =
            tenants.iter().map(|t| (t.as_str(), &ids[..])).collect();
        v.apply(&shard, journal(&applied));
        let shapes: Vec<(&str, Vec<String>)> = tenants
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let items = if i % 1000 == 7 {
                    with(shape.clone(), "column t.extra text")
                } else {
                    shape.clone()
                };
                (t.as_str(), items)
            })
            .collect();
        v.apply_schema(&shard, schema(&shapes));
    }
    let started = std::time::Instant::now();
    let r = drift_over(&v, &fleet, "");
    println!(
        "fleet drift over {} targets ({} drifted) in {:?}",
        r.targets,
        r.drifted,
        started.elapsed()
    );
    assert_eq!((r.targets, r.drifted), (10_000, 12));
}
