//! Unit tests of the pure plan state: no database, no agent, no etcd.
use super::*;
use flotilla_core::dag::MigrationGraph;
use flotilla_core::protocol::Decision;
use flotilla_core::state::{StepState, WaveState};
use flotilla_core::{Scope, pb};

/// A plan of `migrations` (each after the one before unless `groups` orders them) over
/// `targets` (shard, tenant), with `policy`; lanes as an agent with 4 would give.
pub(crate) fn plan_of(
    migrations: &[&str],
    groups: Vec<pb::ParallelGroup>,
    targets: &[(&str, &str)],
    policy: pb::FailurePolicy,
) -> PlanRun {
    let migration = |id: &str| pb::Migration {
        id: id.into(),
        // (a migration named `..enum..` adds an enum value)
        up_sql: if id.contains("enum") {
            format!("ALTER TYPE mood ADD VALUE '{id}'")
        } else {
            format!("CREATE TABLE {id} (x int)")
        },
        down_sql: format!("DROP TABLE {id}"),
        ..Default::default()
    };
    let tenants = targets.iter().any(|(_, t)| !t.is_empty());
    let raw = pb::PlanSpec {
        name: "test".into(),
        migrations: migrations.iter().map(|m| migration(m)).collect(),
        parallel_groups: groups,
        default_scope: if tenants {
            pb::Scope::Tenant as i32
        } else {
            pb::Scope::Shard as i32
        },
        policy: policy as i32,
        max_parallel: 8,
        ..Default::default()
    };
    let spec = PlanSpec::try_from(raw).expect("valid plan");
    let graph = MigrationGraph::build(&spec).expect("graph");
    let targets: Vec<Target> = targets
        .iter()
        .map(|(s, t)| Target {
            shard: s.to_string(),
            tenant: t.to_string(),
        })
        .collect();
    let scope = if tenants { Scope::Tenant } else { Scope::Shard };
    let planned = crate::planner::plan_steps(&spec, &graph, &targets, scope, |_, _| true);
    let n = planned.len();
    let mut run = PlanRun::new(
        "p0".into(),
        Arc::new(spec),
        pb::PlanDefinition {
            plan_id: "p0".into(),
            ..Default::default()
        },
        targets,
        planned,
        vec![StepStatus::Pending; n],
        0,
        7,
    );
    run.rebalance_lanes(&|_| 4);
    run
}

/// Two shards, one target each; `a` then `b` (group order), each group atomic.
fn grouped_run() -> PlanRun {
    let group = |m: &str| pb::ParallelGroup {
        migrations: vec![m.into()],
        atomic: true,
    };
    plan_of(
        &["a", "b"],
        vec![group("a"), group("b")],
        &[("s0", ""), ("s1", "")],
        pb::FailurePolicy::AllOrNothing,
    )
}

/// A group-atomic plan whose `max_parallel` is below its shards: the lanes of shards whose
/// targets all prepared (their next group's steps waiting for the unit's commit) go to the
/// shards still to run theirs, so the unit prepares everywhere and can commit. Before, those
/// shards kept their lanes for steps that could not run, the others got none: the plan
/// stalled, its prepared targets holding their locks.
#[test]
fn a_unit_spread_over_fewer_lanes_than_shards_prepares_everywhere() {
    let group = |m: &str| pb::ParallelGroup {
        migrations: vec![m.into()],
        atomic: true,
    };
    let targets: Vec<(String, String)> = (0..4)
        .flat_map(|s| (0..2).map(move |t| (format!("s{s}"), format!("t{t}"))))
        .collect();
    let refs: Vec<(&str, &str)> = targets
        .iter()
        .map(|(s, t)| (s.as_str(), t.as_str()))
        .collect();
    let mut run = plan_of(
        &["a", "b"],
        vec![group("a"), group("b")],
        &refs,
        pb::FailurePolicy::AllOrNothing,
    );
    Arc::make_mut(&mut run.spec).max_parallel = 2;
    let mut next = 1u64;
    for _ in 0..16 {
        if run.ready_to_commit() {
            break;
        }
        run.rebalance_lanes(&|_| 4);
        for s in 0..4 {
            let shard = format!("s{s}");
            for r in run.next_runs(&shard, &mut next) {
                answer(&mut run, &shard, &r, pb::StepOutcome::Prepared);
            }
        }
    }
    assert!(
        run.ready_to_commit(),
        "every target of group a prepared: {:?}",
        run.shards.values().map(|s| s.lanes).collect::<Vec<_>>()
    );
}

/// What a new leader reads from a unit's stored steps (`unit_commit_evident`): commit
/// decided when a step committed or every step prepared (a shard forgotten under the
/// commit aside), not when some prepared and the rest were not heard of, nor when a step
/// failed running.
#[test]
fn a_units_stored_steps_show_its_commit_or_not() {
    let evident = |statuses: [StepStatus; 2], failure_phase: Option<&str>| {
        let mut run = grouped_run();
        for (s, status) in statuses.into_iter().enumerate() {
            // group `a`: the first step of each shard's target
            let step = (0..run.steps.len())
                .filter(|&i| run.steps[i].migration == 0)
                .nth(s)
                .unwrap();
            run.set_status(step, status);
            if let (StepStatus::Failed, Some(phase)) = (status, failure_phase) {
                let t = &run.targets[run.steps[step].target];
                run.failures.push(pb::StepFailure {
                    migration_id: "a".into(),
                    target: Some(pb::TargetRef {
                        shard: t.shard.clone(),
                        tenant: t.tenant.clone(),
                    }),
                    error: Some(pb::StepError {
                        phase: phase.into(),
                        ..Default::default()
                    }),
                });
            }
        }
        run.unit_commit_evident()
    };
    use StepStatus::*;
    assert!(evident([Prepared, Prepared], None));
    assert!(
        evident([Applied, Pending], None),
        "a step committed: decided"
    );
    assert!(
        evident([Prepared, Failed], Some("commit")),
        "a shard forgotten"
    );
    assert!(!evident([Prepared, Pending], None), "half prepared");
    assert!(!evident([Prepared, Failed], Some("up")), "a target failed");
    assert!(!evident([Pending, Pending], None), "not begun");
}

/// A group-atomic plan with a group outside any unit before or after the atomic one: a
/// unit's step is never fused with a step outside it (that run would not be prepared, and
/// commit the unit's step before its decision), and the step outside waits for the unit
/// to commit (or the unit for it) on each target.
#[test]
fn a_units_steps_are_not_fused_with_steps_outside_it() {
    let group = |m: &str, atomic: bool| pb::ParallelGroup {
        migrations: vec![m.into()],
        atomic,
    };
    for (groups, first, second) in [
        (vec![group("a", true), group("b", false)], "a", "b"),
        (vec![group("x", false), group("a", true)], "x", "a"),
    ] {
        let ids = [first, second];
        let mut run = plan_of(
            &ids,
            groups,
            &[("s0", "t1"), ("s1", "t1")],
            pb::FailurePolicy::AllOrNothing,
        );
        assert!(run.spec.fuse, "group-atomic plans fuse");
        let mut next = 1;
        let out = run.next_runs("s0", &mut next);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].migrations, [first], "{out:?}");
        let atomic_first = first == "a";
        assert_eq!(
            !out[0].prepare_gid.is_empty(),
            atomic_first,
            "the unit's step alone is prepared: {out:?}"
        );
        // its answer: prepared (the unit's) or applied (outside it)
        let outcome = if atomic_first {
            pb::StepOutcome::Prepared
        } else {
            pb::StepOutcome::Applied
        };
        answer(&mut run, "s0", &out[0], outcome);
        let out = run.next_runs("s0", &mut next);
        if atomic_first {
            assert!(
                out.is_empty(),
                "`b` waits for the unit's commit, not its prepare: {out:?}"
            );
        } else {
            assert_eq!(out[0].migrations, ["a"], "{out:?}");
            assert!(!out[0].prepare_gid.is_empty(), "{out:?}");
        }
    }
}

pub(crate) fn answer(
    run: &mut PlanRun,
    shard: &str,
    r: &pb::Run,
    outcome: pb::StepOutcome,
) -> (Vec<StepUpdate>, bool) {
    let result = pb::RunResult {
        run_id: r.run_id,
        steps: r
            .migrations
            .iter()
            .map(|m| pb::StepResult {
                migration_id: m.clone(),
                outcome: outcome as i32,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    run.apply_run_result(shard, &result)
}

/// A shard's Resolve lists its prepared transactions earliest prepared first, whatever
/// their gids' order (run 10's gid sorts before run 9's), those of unknown time last.
#[test]
fn a_resolve_lists_the_earliest_prepared_first() {
    let targets: Vec<(String, String)> = (0..11)
        .map(|t| ("s0".to_string(), format!("t{t:02}")))
        .collect();
    let targets: Vec<(&str, &str)> = targets
        .iter()
        .map(|(s, t)| (s.as_str(), t.as_str()))
        .collect();
    let group = pb::ParallelGroup {
        migrations: vec!["a".into()],
        atomic: true,
    };
    let mut run = plan_of(
        &["a"],
        vec![group],
        &targets,
        pb::FailurePolicy::AllOrNothing,
    );
    run.rebalance_lanes(&|_| 16);
    let mut next = 1u64;
    let runs = run.next_runs("s0", &mut next);
    assert_eq!(runs.len(), 11, "{runs:?}");
    // prepared in reverse order of their run ids, but run 3's time is unknown
    for (i, r) in runs.iter().enumerate() {
        let at_us = if r.run_id == 3 {
            0
        } else {
            1_000_000 - i as i64
        };
        let result = pb::RunResult {
            run_id: r.run_id,
            tenant: r.tenant.clone(),
            steps: vec![pb::StepResult {
                migration_id: "a".into(),
                outcome: pb::StepOutcome::Prepared as i32,
                ..Default::default()
            }],
            prepared_at_us: at_us,
        };
        run.apply_run_result("s0", &result);
    }
    let resolve = run.resolve_for("s0", Decision::Commit).expect("a resolve");
    let order: Vec<u64> = resolve
        .gids
        .iter()
        .map(|g| {
            runs.iter()
                .find(|r| &r.prepare_gid == g)
                .expect("a gid of the runs")
                .run_id
        })
        .collect();
    let mut expected: Vec<u64> = runs
        .iter()
        .map(|r| r.run_id)
        .filter(|&id| id != 3)
        .rev()
        .collect();
    expected.push(3);
    assert_eq!(order, expected);
}

#[test]
fn a_later_atomic_group_waits_for_the_commit_of_the_one_before() {
    let mut run = grouped_run();
    let mut next = 1u64;
    let mut runs = BTreeMap::new();
    for shard in ["s0", "s1"] {
        let out = run.next_runs(shard, &mut next);
        assert_eq!(out.len(), 1, "{shard}: one run of group 1");
        assert_eq!(out[0].migrations, ["a"]);
        assert!(out[0].prepare_gid.starts_with("flotilla:p0.g1:"), "{out:?}");
        runs.insert(shard, out[0].clone());
    }
    answer(&mut run, "s0", &runs["s0"], pb::StepOutcome::Prepared);
    // Prepared is not committed: group 2 may not start on s0.
    assert!(run.next_runs("s0", &mut next).is_empty());
    assert!(!run.ready_to_commit(), "s1 has not voted");
    answer(&mut run, "s1", &runs["s1"], pb::StepOutcome::Prepared);
    assert!(run.ready_to_commit());
    let st = super::status::from_run(&run, Vec::new());
    assert_eq!(st.migrations[0].prepared, 2, "{st:?}");
    assert_eq!(st.migrations[1].pending, 2, "{st:?}");
    assert_eq!(run.unit_key(), "p0.g1");

    // The commit decision, confirmed by both shards: group 2 goes, under its own key.
    run.decision = Some(Decision::Commit);
    run.state = PlanState::Committing;
    let mut replies = BTreeMap::new();
    for shard in ["s0", "s1"] {
        let gids: Vec<String> = run.shards[shard].prepared.keys().cloned().collect();
        let reply = pb::ResolveReply {
            plan_id: "p0".into(),
            commit: true,
            resolved: gids,
            failed: Vec::new(),
            resolved_at_us: Vec::new(),
            received_at_us: 0,
        };
        assert_eq!(run.apply_resolve_reply(shard, &reply).len(), 1);
        // the same answer again (its stream dropped, the Resolve sent again): nothing
        assert!(run.apply_resolve_reply(shard, &reply).is_empty());
        replies.insert(shard, reply);
    }
    assert!(run.advance_unit().is_some());
    assert_eq!(run.state, PlanState::Running);
    assert_eq!(run.unit_key(), "p0.g2");
    // group 1's answer once more, now that group 2 runs: it settles none of group 2's
    // steps (it marked them applied on a shard where they never ran)
    for shard in ["s0", "s1"] {
        assert!(run.apply_resolve_reply(shard, &replies[shard]).is_empty());
        // nor does an answer that names no gid
        let empty = pb::ResolveReply {
            plan_id: "p0".into(),
            commit: true,
            ..Default::default()
        };
        assert!(run.apply_resolve_reply(shard, &empty).is_empty());
    }
    let st = super::status::from_run(&run, Vec::new());
    assert_eq!(st.migrations[1].pending, 2, "{st:?}");
    let out = run.next_runs("s0", &mut next);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].migrations, ["b"]);
    assert!(out[0].prepare_gid.starts_with("flotilla:p0.g2:"), "{out:?}");
}

/// A step that adds an enum value commits before the steps after it run: fused with them,
/// their use of the value failed every target ("unsafe use of new value", 55P04), and a
/// retry fused them the same way.
#[test]
fn an_added_enum_value_commits_before_the_steps_that_follow_it() {
    let mut run = plan_of(
        &["a", "b_enum", "c", "d"],
        Vec::new(),
        &[("s0", "t1")],
        pb::FailurePolicy::AllOrNothing,
    );
    let mut next = 1u64;
    let first = run.next_runs("s0", &mut next);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].migrations, ["a", "b_enum"], "{first:?}");
    answer(&mut run, "s0", &first[0], pb::StepOutcome::Applied);
    let second = run.next_runs("s0", &mut next);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(
        second[0].migrations,
        ["c", "d"],
        "fused again after it: {second:?}"
    );
}

/// A `continue` plan that ends after a failure says how it ended after the first failure,
/// not that the other targets go on.
#[test]
fn a_continue_plans_end_replaces_going_on() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s0", "t2")],
        pb::FailurePolicy::Continue,
    );
    let mut next = 1u64;
    let out = run.next_runs("s0", &mut next);
    answer(&mut run, "s0", &out[0], pb::StepOutcome::Failed);
    run.message = format!("t1 failed a: boom{}", crate::plan::GOING_ON);
    answer(&mut run, "s0", &out[1], pb::StepOutcome::Applied);
    run.advance_waves(0);
    assert!(run.settle().is_some());
    assert!(run.state.is_terminal(), "{:?}", run.state);
    assert!(
        run.message.starts_with("t1 failed a: boom; ")
            && !run.message.contains("go on")
            && run.message.contains("step(s) failed"),
        "{}",
        run.message
    );
}

/// A shard's agent gone: its data changes' lines lose their rate and ETA and say why; the
/// other shard's, and a line done, stay as they were.
#[test]
fn a_data_change_whose_agent_is_away_says_so() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s0", "t2"), ("s1", "t3")],
        pb::FailurePolicy::AllOrNothing,
    );
    let mut next = 1u64;
    run.next_runs("s0", &mut next);
    run.next_runs("s1", &mut next);
    let progress = |shard: &str, tenant: &str, state: &str| pb::DataProgress {
        migration_id: "a".into(),
        shard: shard.into(),
        tenant: tenant.into(),
        rows_done: 1500,
        rows_total: 6667,
        rows_per_second: 2494.0,
        eta_ms: 3000,
        state: state.into(),
        ..Default::default()
    };
    run.record_progress(progress("s0", "t1", "running"));
    run.record_progress(progress("s0", "t2", "done"));
    run.record_progress(progress("s1", "t3", "running"));
    assert!(run.agent_away("s0"));
    let of = |t: &str, s: &str| run.progress[&("a".into(), s.into(), t.into())].clone();
    let t1 = of("t1", "s0");
    assert_eq!(
        (t1.rows_per_second, t1.eta_ms, t1.rows_done),
        (0.0, 0, 1500),
        "{t1:?}"
    );
    assert!(t1.reason.contains("agent is away"), "{t1:?}");
    assert_eq!(of("t2", "s0").rows_per_second, 2494.0, "done: as it was");
    assert_eq!(of("t3", "s1").eta_ms, 3000, "another shard: as it was");
    assert!(!run.agent_away("s2"));
}

/// A plan whose steps an earlier plan had applied says it did nothing, and one that found
/// some applied says how many it applied itself (both read "every step applied").
#[test]
fn a_plan_says_how_many_steps_it_applied_itself() {
    for (outcomes, said) in [
        (
            [
                pb::StepOutcome::AlreadyApplied,
                pb::StepOutcome::AlreadyApplied,
            ],
            "nothing to do: every step (2) was applied before this plan",
        ),
        (
            [pb::StepOutcome::Applied, pb::StepOutcome::AlreadyApplied],
            "every step applied (1 by this plan, 1 before it)",
        ),
    ] {
        let mut run = plan_of(
            &["a"],
            Vec::new(),
            &[("s0", "t1"), ("s0", "t2")],
            pb::FailurePolicy::AllOrNothing,
        );
        let mut next = 1u64;
        let out = run.next_runs("s0", &mut next);
        for (r, outcome) in out.iter().zip(outcomes) {
            answer(&mut run, "s0", r, outcome);
        }
        run.advance_waves(0);
        assert!(run.settle().is_some());
        assert_eq!(run.state, PlanState::Completed);
        assert_eq!(run.message, said);
    }
}

#[test]
fn a_targets_ready_steps_go_fused_in_one_run_and_the_plan_completes() {
    let mut run = plan_of(
        &["a", "b"],
        Vec::new(),
        &[("s0", "t1"), ("s0", "t2")],
        pb::FailurePolicy::AllOrNothing,
    );
    let mut next = 1u64;
    let out = run.next_runs("s0", &mut next);
    assert_eq!(out.len(), 2, "one run per tenant: {out:?}");
    for r in &out {
        assert_eq!(r.migrations, ["a", "b"], "fused in dependency order");
        assert!(r.fused);
        assert!(r.prepare_gid.is_empty(), "not atomic");
    }
    assert_eq!(run.outstanding(), 2);
    assert!(run.settle().is_none(), "runs are out");
    for r in &out {
        let (updates, failed) = answer(&mut run, "s0", r, pb::StepOutcome::Applied);
        assert!(!failed);
        assert!(updates.iter().all(|u| u.state == StepState::Applied));
    }
    // A late repeat of an answered run (resent after a reconnect) changes nothing.
    let (updates, failed) = answer(&mut run, "s0", &out[0], pb::StepOutcome::Failed);
    assert!(updates.is_empty() && !failed);
    // the one wave of every target is done (no bake, no gate)
    run.advance_waves(0);
    assert!(run.settle().is_some());
    assert_eq!(run.state, PlanState::Completed);
    assert_eq!(run.message, "every step applied");
}

#[test]
fn max_parallel_is_split_over_the_busy_shards_within_each_agents_lanes() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s1", "t1"), ("s2", "t1")],
        pb::FailurePolicy::AllOrNothing,
    );
    // 8 over 3 shards: 3, 3, 2; an agent with 1 lane gets 1.
    run.rebalance_lanes(&|shard| if shard == "s2" { 1 } else { 16 });
    let lanes: Vec<u32> = run.shards.values().map(|s| s.lanes).collect();
    assert_eq!(lanes, [3, 3, 1]);
    // A shard with nothing left to do gets none.
    let mut next = 1;
    let out = run.next_runs("s0", &mut next);
    answer(&mut run, "s0", &out[0], pb::StepOutcome::Applied);
    run.rebalance_lanes(&|_| 16);
    assert_eq!(run.shards["s0"].lanes, 0);
    assert_eq!(run.shards["s1"].lanes, 4);
}

#[test]
fn a_shard_whose_steps_are_done_gets_lanes_again_when_one_is_retried() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s1", "t1"), ("s1", "t2")],
        pb::FailurePolicy::Continue,
    );
    assert_eq!((run.shards["s0"].to_run, run.shards["s1"].to_run), (1, 2));
    let mut next = 1;
    let out = run.next_runs("s0", &mut next);
    // running still counts: the shard keeps its lane until the result
    assert_eq!(run.shards["s0"].to_run, 1);
    answer(&mut run, "s0", &out[0], pb::StepOutcome::Failed);
    assert_eq!(run.shards["s0"].to_run, 0);
    run.rebalance_lanes(&|_| 16);
    assert_eq!((run.shards["s0"].lanes, run.shards["s1"].lanes), (0, 8));
    // a retry puts the failed step back: its shard is busy again and shares the lanes
    run.retry(None);
    assert_eq!(run.shards["s0"].to_run, 1);
    run.rebalance_lanes(&|_| 16);
    assert_eq!((run.shards["s0"].lanes, run.shards["s1"].lanes), (4, 4));
}

#[test]
fn an_edited_migration_found_in_a_journal_fails_its_step() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1")],
        pb::FailurePolicy::AllOrNothing,
    );
    let mut next = 1;
    let out = run.next_runs("s0", &mut next);
    let result = pb::RunResult {
        run_id: out[0].run_id,
        steps: vec![pb::StepResult {
            migration_id: "a".into(),
            outcome: pb::StepOutcome::AlreadyApplied as i32,
            checksum: "0000".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let (updates, failed) = run.apply_run_result("s0", &result);
    assert!(failed);
    assert_eq!(updates[0].state, StepState::Failed);
    assert_eq!(updates[0].phase, "journal");
    assert!(
        updates[0].message.starts_with("checksum mismatch"),
        "{}",
        updates[0].message
    );
    assert_eq!(run.failures.len(), 1);
}

/// A step the journal holds from this very plan (a run sent again after a change of leader,
/// whose first copy the leader before saw applied) is the plan's applied step, and its
/// rollback's to undo; one another plan applied is found applied.
#[test]
fn a_step_the_journal_holds_from_this_plan_is_applied_by_it() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s0", "t2")],
        pb::FailurePolicy::AllOrNothing,
    );
    let mut next = 1;
    let out = run.next_runs("s0", &mut next);
    let checksum = run.spec.migrations[0].checksum.clone();
    let result = |r: &pb::Run, by: &str| pb::RunResult {
        run_id: r.run_id,
        tenant: r.tenant.clone(),
        steps: vec![pb::StepResult {
            migration_id: "a".into(),
            outcome: pb::StepOutcome::AlreadyApplied as i32,
            checksum: checksum.clone(),
            applied_by: by.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let own = run.id.clone();
    let (updates, failed) = run.apply_run_result("s0", &result(&out[0], &own));
    assert!(!failed);
    assert_eq!(updates[0].state, StepState::Applied);
    let (updates, _) = run.apply_run_result("s0", &result(&out[1], "p-other"));
    assert_eq!(updates[0].state, StepState::AlreadyApplied);
}

/// A data change whose last progress report was lost (the agent stopped after the step
/// applied, and the step was answered from the journal when it ran again): its progress is
/// not left running under the step applied, and a report of it running that comes after
/// the result is not taken.
#[test]
fn a_steps_progress_is_not_left_running_after_its_result() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s0", "t2")],
        pb::FailurePolicy::Continue,
    );
    let mut next = 1;
    let out = run.next_runs("s0", &mut next);
    let progress = |tenant: &str| pb::DataProgress {
        migration_id: "a".into(),
        shard: "s0".into(),
        tenant: tenant.into(),
        rows_done: 80,
        rows_total: 100,
        rows_per_second: 10.0,
        eta_ms: 2000,
        state: "running".into(),
        ..Default::default()
    };
    run.record_progress(progress("t1"));
    run.record_progress(progress("t2"));
    answer(&mut run, "s0", &out[0], pb::StepOutcome::AlreadyApplied);
    answer(&mut run, "s0", &out[1], pb::StepOutcome::Failed);
    let of = |run: &PlanRun, t: &str| run.progress[&("a".into(), "s0".into(), t.into())].clone();
    let (t1, t2) = (of(&run, "t1"), of(&run, "t2"));
    assert_eq!((t1.state.as_str(), t1.eta_ms), ("done", 0), "{t1:?}");
    assert!(
        t1.reason.contains("last progress report was lost"),
        "{t1:?}"
    );
    assert_eq!(
        (t2.state.as_str(), t2.rows_per_second),
        ("stopped", 0.0),
        "{t2:?}"
    );
    run.record_progress(progress("t1"));
    assert_eq!(
        of(&run, "t1").state,
        "done",
        "a late report of it running is dropped"
    );
}

/// A run of a data change that another run applied first (its copy, sent again after a
/// coordinator was killed mid-change) fails and says so in its last progress; the step is
/// applied, and its line says done, whether that report comes before the result or after.
#[test]
fn a_failed_report_of_a_step_applied_elsewhere_reads_done() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s0", "t2")],
        pb::FailurePolicy::Continue,
    );
    let mut next = 1;
    let out = run.next_runs("s0", &mut next);
    let failed = |tenant: &str| pb::DataProgress {
        migration_id: "a".into(),
        shard: "s0".into(),
        tenant: tenant.into(),
        rows_total: 100,
        state: "failed".into(),
        reason: "already applied on target (its journal row is there)".into(),
        ..Default::default()
    };
    run.record_progress(failed("t1"));
    answer(&mut run, "s0", &out[0], pb::StepOutcome::AlreadyApplied);
    answer(&mut run, "s0", &out[1], pb::StepOutcome::AlreadyApplied);
    run.record_progress(failed("t2"));
    for t in ["t1", "t2"] {
        let p = &run.progress[&("a".into(), "s0".into(), t.into())];
        assert_eq!(p.state, "done", "{t}: {p:?}");
        assert!(p.reason.contains("applied by another run"), "{t}: {p:?}");
    }
    // an undo's failed restore, its step applied until the rollback's reply, stays failed
    run.state = PlanState::RollingBack;
    run.record_progress(pb::DataProgress {
        reason: "its restore failed".into(),
        ..failed("t1")
    });
    let p = &run.progress[&("a".into(), "s0".into(), "t1".into())];
    assert_eq!(
        (p.state.as_str(), p.reason.as_str()),
        ("failed", "its restore failed")
    );
}

#[test]
fn under_continue_a_failed_tenant_stops_alone_and_the_plan_ends_failed() {
    let mut run = plan_of(
        &["a", "b"],
        Vec::new(),
        &[("s0", "t1"), ("s0", "t2")],
        pb::FailurePolicy::Continue,
    );
    // Not fused: a failure of `a` leaves `b` of that tenant waiting for good.
    let mut next = 1;
    let out = run.next_runs("s0", &mut next);
    let (t1, t2) = (&out[0], &out[1]);
    let result = |r: &pb::Run, first: pb::StepOutcome| pb::RunResult {
        run_id: r.run_id,
        steps: vec![
            pb::StepResult {
                migration_id: "a".into(),
                outcome: first as i32,
                ..Default::default()
            },
            pb::StepResult {
                migration_id: "b".into(),
                outcome: pb::StepOutcome::NotRun as i32,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let (_, failed) = run.apply_run_result("s0", &result(t1, pb::StepOutcome::Failed));
    assert!(failed);
    // t1's `b` is not run again; t2's fused run came back with `b` not run: it goes again.
    run.apply_run_result("s0", &result(t2, pb::StepOutcome::Applied));
    let again = run.next_runs("s0", &mut next);
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].tenant, "t2");
    assert_eq!(again[0].migrations, ["b"]);
    answer(&mut run, "s0", &again[0], pb::StepOutcome::Applied);
    run.advance_waves(0);
    let updates = run.settle().expect("settled");
    assert_eq!(run.state, PlanState::Failed);
    assert!(
        updates.iter().all(|u| u.state == StepState::NotRun),
        "{updates:?}"
    );
    let st = super::status::from_run(&run, Vec::new());
    assert_eq!(st.migrations[0].failed, 1);
    assert_eq!(st.migrations[1].applied, 1);
    assert_eq!(st.migrations[1].not_run, 1);
}

/// Step `a` applied on t1 of s0 and of s1, the plan rolling back, each shard asked (request 5).
fn applied_on_two_shards_rolling_back() -> PlanRun {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s1", "t1")],
        pb::FailurePolicy::AllOrNothing,
    );
    let mut next = 1;
    for shard in ["s0", "s1"] {
        let out = run.next_runs(shard, &mut next);
        answer(&mut run, shard, &out[0], pb::StepOutcome::Applied);
    }
    run.state = PlanState::RollingBack;
    for sr in run.shards.values_mut() {
        sr.rollback = RollbackState::Asked {
            conn_id: 1,
            request: 5,
        };
    }
    run
}

/// Plan p0's rollback reply to `request`: step `a` of t1 undone (or its `error`).
fn undo_of_a_on_t1(
    error: Option<pb::StepError>,
    request: u64,
    complete: bool,
) -> pb::RollbackReply {
    pb::RollbackReply {
        plan_id: "p0".into(),
        steps: vec![pb::RolledBackStep {
            migration_id: "a".into(),
            tenant: "t1".into(),
            error,
            ..Default::default()
        }],
        complete,
        request,
    }
}

#[test]
fn a_rollback_ends_when_every_shard_answered_and_an_undo_error_fails_it() {
    let mut run = applied_on_two_shards_rolling_back();
    let reply = undo_of_a_on_t1;
    let cannot = || {
        Some(pb::StepError {
            message: "cannot drop".into(),
            ..Default::default()
        })
    };
    // an answer to an earlier request (4), incomplete: not this request's to end
    run.apply_rollback_reply("s0", &reply(cannot(), 4, false));
    assert_eq!(
        run.shards["s0"].rollback,
        RollbackState::Asked {
            conn_id: 1,
            request: 5
        }
    );
    assert!(run.failures.is_empty() && run.rollback_errors == 0);
    run.apply_rollback_reply("s0", &reply(None, 5, true));
    assert!(run.settle().is_none(), "s1 has not answered");
    run.apply_rollback_reply("s1", &reply(cannot(), 5, true));
    assert!(run.settle().is_some());
    assert_eq!(run.state, PlanState::RollbackFailed);
    assert_eq!(run.failures[0].error.as_ref().unwrap().phase, "down");
}

/// The rows a data change's undo left with their newer values (changed since their batch)
/// are said at the plan's end, by change, once a step (a reply sent again names it again):
/// a rollback that restored 10 rows of 200,000 read as a plain success.
#[test]
fn the_rows_an_undo_kept_are_said_at_the_end() {
    let mut run = applied_on_two_shards_rolling_back();
    let kept = |rows| pb::RollbackReply {
        steps: vec![pb::RolledBackStep {
            rows_kept: rows,
            ..undo_of_a_on_t1(None, 5, true).steps[0].clone()
        }],
        ..undo_of_a_on_t1(None, 5, true)
    };
    run.apply_rollback_reply("s0", &kept(7));
    run.apply_rollback_reply("s0", &kept(7));
    run.apply_rollback_reply("s1", &kept(5));
    assert!(run.settle().is_some());
    assert_eq!(run.state, PlanState::RolledBack);
    assert!(
        run.message.ends_with(
            "data change a: its prior image was not put back on 12 row(s) on 2 target(s), \
             changed or deleted since their batch (they keep their newer values)"
        ),
        "{}",
        run.message
    );
}

/// An atomic unit's abort is said while it runs ("aborting: no target commits"); the
/// ended plan's message says it in the past (it read "aborting" in a rolled_back status).
#[test]
fn an_ended_abort_is_said_in_the_past() {
    let ended = |message: &str, undo_error: bool| {
        let mut run = applied_on_two_shards_rolling_back();
        run.message = message.to_string();
        let error = undo_error.then(|| pb::StepError {
            message: "cannot drop".into(),
            ..Default::default()
        });
        run.apply_rollback_reply("s0", &undo_of_a_on_t1(None, 5, true));
        run.apply_rollback_reply("s1", &undo_of_a_on_t1(error, 5, true));
        assert!(run.settle().is_some());
        run.message
    };
    let atomic = format!("step a failed on s0/t0: boom{}", crate::plan::ABORTING);
    assert_eq!(
        ended(&atomic, false),
        "step a failed on s0/t0: boom; aborted: no target committed"
    );
    let group = format!(
        "step a failed on s0/t0: boom{}2{}",
        crate::plan::ABORTING_GROUP.0,
        crate::plan::ABORTING_GROUP.1
    );
    assert_eq!(
        ended(&group, false),
        "step a failed on s0/t0: boom; aborted parallel group 2: no target of it committed, \
         and what the groups before it committed was undone"
    );
    // what the groups before it committed was not all undone: its rollback says so
    assert_eq!(
        ended(&group, true),
        "step a failed on s0/t0: boom; aborted parallel group 2: no target of it committed; \
         rollback could not undo every step: see failures"
    );
}

/// An agent that undid a shard's steps and stopped before its reply went out: the agent
/// after it finds nothing of the plan applied and answers complete, naming no step. The
/// steps are undone (the plan ended rolled_back saying "1/2 done").
#[test]
fn a_complete_rollback_reply_undoes_the_steps_it_does_not_name() {
    let mut run = applied_on_two_shards_rolling_back();
    let undone = undo_of_a_on_t1(None, 5, true);
    run.apply_rollback_reply("s0", &undone);
    let nothing_here = pb::RollbackReply {
        steps: Vec::new(),
        ..undone.clone()
    };
    let updates = run.apply_rollback_reply("s1", &nothing_here);
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert!(run.settle().is_some());
    assert_eq!(run.state, PlanState::RolledBack);
    let st = super::status::from_run(&run, Vec::new());
    assert_eq!(st.migrations[0].applied, 0);
    assert_eq!(st.migrations[0].rolled_back, 2);
}

/// Progress is kept for the plan's own steps only, one entry each whatever comes again.
#[test]
fn progress_is_kept_for_the_plans_steps_only() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1")],
        pb::FailurePolicy::Continue,
    );
    let progress = |migration: &str, shard: &str, tenant: &str, done| pb::DataProgress {
        plan_id: "p0".into(),
        migration_id: migration.into(),
        shard: shard.into(),
        tenant: tenant.into(),
        rows_done: done,
        ..Default::default()
    };
    for done in [10, 20] {
        run.record_progress(progress("a", "s0", "t1", done));
    }
    for (m, shard, tenant) in [("zz", "s0", "t1"), ("a", "s9", "t1"), ("a", "s0", "t2")] {
        run.record_progress(progress(m, shard, tenant, 1));
    }
    assert_eq!(run.progress.len(), 1);
    let kept = run.progress.values().next().unwrap();
    assert_eq!((kept.migration_id.as_str(), kept.rows_done), ("a", 20));
    // undone, its rows and checkpoint are gone: so is its progress
    run.state = PlanState::RollingBack;
    run.shards.get_mut("s0").unwrap().rollback = RollbackState::Asked {
        conn_id: 1,
        request: 1,
    };
    run.apply_rollback_reply("s0", &undo_of_a_on_t1(None, 1, true));
    assert!(run.progress.is_empty(), "{:?}", run.progress);
    // the undo's last report, after the reply: not taken back
    run.record_progress(progress("a", "s0", "t1", 30));
    assert!(run.progress.is_empty(), "{:?}", run.progress);
}

/// A schema step's lock wait shows while its step runs only: not before it is sent, and
/// gone with its result (a late report of it is not taken back).
#[test]
fn a_lock_wait_shows_while_its_step_runs_only() {
    let mut run = plan_of(&["a"], Vec::new(), &[("s0", "t1")], pb::FailurePolicy::Stop);
    let wait = || pb::DataProgress {
        plan_id: "p0".into(),
        migration_id: "a".into(),
        shard: "s0".into(),
        tenant: "t1".into(),
        state: flotilla_core::protocol::LOCK_WAIT.into(),
        reason: "lock timeout; attempt 2 of 4".into(),
        ..Default::default()
    };
    run.record_progress(wait());
    assert!(run.progress.is_empty(), "not sent yet: {:?}", run.progress);
    let mut next = 1;
    let out = run.next_runs("s0", &mut next);
    run.record_progress(wait());
    assert_eq!(run.progress.len(), 1, "{:?}", run.progress);
    answer(&mut run, "s0", &out[0], pb::StepOutcome::Applied);
    assert!(run.progress.is_empty(), "{:?}", run.progress);
    run.record_progress(wait());
    assert!(run.progress.is_empty(), "late: {:?}", run.progress);
}

#[test]
fn a_paused_shard_gets_no_runs_until_resumed() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s1", "t1")],
        pb::FailurePolicy::Stop,
    );
    run.paused.shards.insert("s0".into());
    let mut next = 1;
    assert!(run.next_runs("s0", &mut next).is_empty());
    assert_eq!(run.next_runs("s1", &mut next).len(), 1);
    run.paused.plan = true;
    assert!(run.is_paused("s1"));
    assert_eq!(run.paused.listed(), ["*", "s0"]);
    run.paused = Paused::default();
    assert_eq!(run.next_runs("s0", &mut next).len(), 1);
}

/// 2 shards x 3 tenants in two waves: `first` takes t1 of each shard, `rest` the others.
fn waved(policy: pb::FailurePolicy, first: pb::Wave, max_failures: &str) -> (PlanRun, Vec<usize>) {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[
            ("s0", "t1"),
            ("s0", "t2"),
            ("s0", "t3"),
            ("s1", "t1"),
            ("s1", "t2"),
            ("s1", "t3"),
        ],
        policy,
    );
    let mut raw = pb::PlanSpec::from(&*run.spec);
    raw.waves = vec![
        pb::Wave {
            name: "first".into(),
            selector: "tenant=t1".into(),
            ..first
        },
        pb::Wave {
            name: "rest".into(),
            rest: true,
            ..Default::default()
        },
    ];
    raw.max_failures = max_failures.into();
    run.spec = Arc::new(PlanSpec::try_from(raw).expect("valid plan"));
    let wave_of: Vec<usize> = run
        .targets
        .iter()
        .map(|t| usize::from(t.tenant != "t1"))
        .collect();
    run.set_waves(wave_of.clone(), &[]);
    run.rebalance_lanes(&|_| 4);
    (run, wave_of)
}

#[test]
fn a_wave_runs_only_its_targets_then_bakes_then_waits_for_promote() {
    let first = pb::Wave {
        bake_ms: 1_000,
        manual_gate: true,
        ..Default::default()
    };
    let (mut run, _) = waved(pb::FailurePolicy::AllOrNothing, first, "");
    let mut next = 1;
    let out = run.next_runs("s0", &mut next);
    assert_eq!(out.len(), 1, "only the first wave's target: {out:?}");
    assert_eq!(out[0].tenant, "t1");
    assert!(run.advance_waves(0).is_empty(), "its run is out");
    answer(&mut run, "s0", &out[0], pb::StepOutcome::Applied);
    let out = run.next_runs("s1", &mut next);
    answer(&mut run, "s1", &out[0], pb::StepOutcome::Applied);
    // done: it bakes until 1s after now, and nothing of the next wave goes meanwhile
    let changes = run.advance_waves(10_000);
    assert_eq!(changes[0].state, WaveState::Baking);
    assert_eq!(changes[0].bake_until_ms, Some(11_000));
    assert!(run.next_runs("s0", &mut next).is_empty());
    assert!(run.advance_waves(10_999).is_empty(), "still baking");
    assert!(
        run.settle().is_none(),
        "a plan does not end while a wave bakes"
    );
    // baked: the manual gate holds it
    let changes = run.advance_waves(11_000);
    assert_eq!(changes[0].state, WaveState::Waiting);
    assert!(run.next_runs("s0", &mut next).is_empty());
    let st = super::status::from_run(&run, Vec::new());
    assert_eq!(st.summary.unwrap().state, "waiting");
    assert_eq!(st.waves[0].state, "waiting");
    assert_eq!(st.waves[0].applied, 2);
    // promoted: the rest goes
    let changes = run.promote().expect("a wave waits");
    assert_eq!(changes[1].state, WaveState::Running);
    assert!(run.promote().is_none(), "nothing waits now");
    let out = run.next_runs("s0", &mut next);
    let tenants: Vec<&str> = out.iter().map(|r| r.tenant.as_str()).collect();
    assert_eq!(tenants, ["t2", "t3"]);
}

#[test]
fn a_rebuilt_plan_goes_on_from_the_stored_waves() {
    let (mut run, wave_of) = waved(pb::FailurePolicy::AllOrNothing, Default::default(), "");
    // stored: the first wave done, the rest running
    run.set_waves(
        wave_of,
        &[
            StoredWave::new(WaveState::Done, None),
            StoredWave::new(WaveState::Running, None),
        ],
    );
    run.rebalance_lanes(&|_| 4);
    let mut next = 1;
    let out = run.next_runs("s1", &mut next);
    let tenants: Vec<&str> = out.iter().map(|r| r.tenant.as_str()).collect();
    assert_eq!(tenants, ["t2", "t3"]);
}

/// What a wave's gates found stays in `plan status` after a retry of a later wave's failure
/// (the passed wave is not run again) and after a rebuild from the store (a new leader): it
/// was dropped by both, and the canary's line lost its gate's result.
#[test]
fn a_passed_waves_gate_result_outlives_a_retry_and_a_rebuild() {
    let (mut run, wave_of) = waved(pb::FailurePolicy::AllOrNothing, Default::default(), "");
    run.waves[0].checks = vec![flotilla_core::waves::Check {
        name: "orders".into(),
        sql: "SELECT true".into(),
        max: None,
    }];
    let mut next = 1;
    for shard in ["s0", "s1"] {
        let out = run.next_runs(shard, &mut next);
        answer(&mut run, shard, &out[0], pb::StepOutcome::Applied);
    }
    // no bake: done, baked and checking at once
    let changes = run.advance_waves(1_000);
    assert_eq!(changes.last().map(|c| c.state), Some(WaveState::Checking));
    let changes = run
        .gate_result(0, Ok("orders = true on 2 targets".into()))
        .expect("the wave was checking");
    assert_eq!(changes[0].state, WaveState::Done);
    // the rest fails on s0's t2: the plan fails, and a retry runs the rest again
    run.rebalance_lanes(&|_| 4);
    let out = run.next_runs("s0", &mut next);
    let t2 = out.iter().find(|r| r.tenant == "t2").expect("t2 goes");
    answer(&mut run, "s0", t2, pb::StepOutcome::Failed);
    assert!(!run.retry(None).is_empty(), "the failed step runs again");
    let shown = |run: &PlanRun| {
        let st = super::status::from_run(run, Vec::new());
        (st.waves[0].state.clone(), st.waves[0].gate.clone())
    };
    assert_eq!(
        shown(&run),
        ("done".to_string(), "orders = true on 2 targets".to_string())
    );
    assert_eq!(run.waves[1].state, WaveState::Running);
    // a new leader rebuilds the waves from the store's rows
    let stored: Vec<StoredWave> = run
        .waves
        .iter()
        .map(|w| StoredWave {
            state: w.state,
            bake_until_ms: w.bake_until_ms,
            gate: w.gate.clone(),
        })
        .collect();
    let (mut rebuilt, _) = waved(pb::FailurePolicy::AllOrNothing, Default::default(), "");
    rebuilt.set_waves(wave_of, &stored);
    assert_eq!(
        shown(&rebuilt),
        ("done".to_string(), "orders = true on 2 targets".to_string())
    );
}

/// The journals' second look after a wait for locks makes pending again only what a wave
/// still to run (or the one running) holds: a wave passed is not gone back to, and its
/// steps made pending would never run (the plan ended halted over them).
#[test]
fn a_second_look_at_the_journals_leaves_passed_waves_alone() {
    let (mut run, wave_of) = waved(pb::FailurePolicy::AllOrNothing, Default::default(), "");
    for s in 0..run.steps.len() {
        run.set_status(s, StepStatus::AlreadyApplied);
    }
    // the first wave passed, the rest running (a retry, or a plan rebuilt there)
    run.set_waves(
        wave_of.clone(),
        &[
            StoredWave::new(WaveState::Done, None),
            StoredWave::new(WaveState::Running, None),
        ],
    );
    run.rebalance_lanes(&|_| 4);
    let updates = run.recheck_applied();
    let tenants: Vec<&str> = updates.iter().map(|u| u.tenant.as_str()).collect();
    assert_eq!(tenants.len(), 4, "only the rest's: {tenants:?}");
    assert!(tenants.iter().all(|t| *t != "t1"), "{tenants:?}");
    // (lanes go to the shards with steps to run at each hand-out)
    run.rebalance_lanes(&|_| 4);
    let mut next = 1;
    let out = run.next_runs("s0", &mut next);
    let sent: Vec<&str> = out.iter().map(|r| r.tenant.as_str()).collect();
    assert_eq!(sent, ["t2", "t3"]);
    // a fresh plan, at its first wave: that wave's steps are looked at again
    let (mut run, _) = waved(pb::FailurePolicy::AllOrNothing, Default::default(), "");
    for s in 0..run.steps.len() {
        run.set_status(s, StepStatus::AlreadyApplied);
    }
    assert_eq!(run.recheck_applied().len(), 6);
    run.rebalance_lanes(&|_| 4);
    let out = run.next_runs("s0", &mut next);
    assert_eq!(out.len(), 1, "the first wave's target: {out:?}");
    assert_eq!(out[0].tenant, "t1");
}

#[test]
fn failures_past_the_wave_budget_are_named_and_within_it_complete_with_failures() {
    let first = pb::Wave {
        max_failures: "1".into(),
        ..Default::default()
    };
    let (mut run, _) = waved(pb::FailurePolicy::Continue, first.clone(), "");
    let mut next = 1;
    let a = run.next_runs("s0", &mut next);
    answer(&mut run, "s0", &a[0], pb::StepOutcome::Failed);
    assert_eq!(
        run.budget_exhausted(),
        None,
        "1 failure is within a budget of 1"
    );
    let b = run.next_runs("s1", &mut next);
    answer(&mut run, "s1", &b[0], pb::StepOutcome::Failed);
    let why = run.budget_exhausted().expect("past the budget");
    assert!(
        why.contains("wave `first`: its error budget of 1")
            && why.contains("was passed when 2 of its 2 targets had failed"),
        "{why}"
    );
    assert!(why.contains("budget of 1"), "{why}");

    // the plan's budget of 2 over 6 targets, one failure: the plan completes with it
    let (mut run, _) = waved(pb::FailurePolicy::Continue, Default::default(), "2");
    let a = run.next_runs("s0", &mut next);
    answer(&mut run, "s0", &a[0], pb::StepOutcome::Failed);
    let b = run.next_runs("s1", &mut next);
    answer(&mut run, "s1", &b[0], pb::StepOutcome::Applied);
    assert_eq!(run.budget_exhausted(), None);
    run.advance_waves(0);
    for shard in ["s0", "s1"] {
        for r in run.next_runs(shard, &mut next) {
            answer(&mut run, shard, &r, pb::StepOutcome::Applied);
        }
    }
    run.advance_waves(0);
    assert!(run.waves_done());
    assert!(run.settle().is_some());
    assert_eq!(run.state, PlanState::CompletedWithFailures);
    let st = super::status::from_run(&run, Vec::new());
    assert_eq!((st.waves[0].failed, st.waves[0].applied), (1, 1));
    assert_eq!((st.waves[1].applied, st.waves[1].pending), (4, 0));
}

/// A plan without waves passing its error budget is named as the plan (it was "wave
/// `all`", a wave no file names).
#[test]
fn a_plan_without_waves_passing_its_budget_says_the_plan() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1"), ("s0", "t2"), ("s1", "t1")],
        pb::FailurePolicy::Continue,
    );
    let mut raw = pb::PlanSpec::from(&*run.spec);
    raw.max_failures = "1".into();
    run.spec = Arc::new(PlanSpec::try_from(raw).expect("valid plan"));
    run.set_waves(vec![0; run.targets.len()], &[]);
    run.rebalance_lanes(&|_| 4);
    let mut next = 1;
    for shard in ["s0", "s1"] {
        for r in run.next_runs(shard, &mut next) {
            answer(&mut run, shard, &r, pb::StepOutcome::Failed);
        }
    }
    let why = run.budget_exhausted().expect("past the budget");
    assert!(
        why.starts_with("the plan: its error budget of 1 (max_failures = \"1\") was passed when 3 of its 3 targets had failed"),
        "{why}"
    );
}

#[test]
fn a_wave_caps_parallelism_per_shard() {
    let (mut run, wave_of) = waved(pb::FailurePolicy::AllOrNothing, Default::default(), "");
    let mut raw = pb::PlanSpec::from(&*run.spec);
    raw.waves[1].max_parallel_per_shard = 1;
    run.spec = Arc::new(PlanSpec::try_from(raw).unwrap());
    run.set_waves(
        wave_of,
        &[
            StoredWave::new(WaveState::Done, None),
            StoredWave::new(WaveState::Running, None),
        ],
    );
    run.rebalance_lanes(&|_| 4);
    assert_eq!(run.shards["s0"].lanes, 1);
    assert_eq!(run.shards["s1"].lanes, 1);
}

/// A status lists failures by target, whatever the order they happened in: the same list
/// as a finished plan's status read back from the store.
#[test]
fn failures_are_listed_by_target_not_by_when_they_happened() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t2"), ("s0", "t1"), ("s1", "t0")],
        pb::FailurePolicy::Continue,
    );
    let mut next = 1u64;
    let mut runs = run.next_runs("s1", &mut next);
    runs.extend(run.next_runs("s0", &mut next));
    // s1's target fails first, then s0's in their order t2, t1
    for r in &runs {
        let shard = if r.tenant == "t0" { "s1" } else { "s0" };
        let (_, failed) = answer(&mut run, shard, r, pb::StepOutcome::Failed);
        assert!(failed);
    }
    let happened: Vec<String> = run
        .failures
        .iter()
        .map(|f| f.target.as_ref().unwrap().tenant.clone())
        .collect();
    assert_eq!(happened, ["t0", "t2", "t1"]);
    let st = super::status::from_run(&run, Vec::new());
    let listed: Vec<(String, String)> = st
        .failures
        .iter()
        .map(|f| {
            let t = f.target.as_ref().unwrap();
            (t.shard.clone(), t.tenant.clone())
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("s0".to_string(), "t1".to_string()),
            ("s0".to_string(), "t2".to_string()),
            ("s1".to_string(), "t0".to_string())
        ]
    );
}

/// A wave's targets are listed by (shard, tenant) whatever the plan's target order, as a
/// finished plan's status from the store lists them.
#[test]
fn a_waves_targets_are_listed_by_shard_and_tenant() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s1", "t2"), ("s0", "t3"), ("s0", "t1")],
        pb::FailurePolicy::Continue,
    );
    let mut raw = pb::PlanSpec::from(&*run.spec);
    raw.waves = vec![pb::Wave {
        name: "all".into(),
        rest: true,
        ..Default::default()
    }];
    run.spec = Arc::new(PlanSpec::try_from(raw).expect("valid plan"));
    run.set_waves(vec![0; 3], &[]);
    let st = super::status::from_run(&run, Vec::new());
    assert_eq!(st.waves[0].targets, ["s0/t1", "s0/t3", "s1/t2"]);
}

/// A plan that ended while paused lists no pause in its final status (the watch's last
/// status, from memory), as its status from the store does.
#[test]
fn a_plan_that_ended_is_paused_nowhere() {
    let mut run = plan_of(
        &["a"],
        Vec::new(),
        &[("s0", "t1")],
        pb::FailurePolicy::Continue,
    );
    run.paused.plan = true;
    run.paused.shards.insert("s0".into());
    let st = super::status::from_run(&run, Vec::new());
    assert_eq!(st.paused, ["*", "s0"]);
    run.state = PlanState::Cancelled;
    let st = super::status::from_run(&run, Vec::new());
    assert!(st.paused.is_empty(), "{:?}", st.paused);
}

/// `grouped_run` with group 1 prepared on both shards and its decision commit; the next
/// run id.
fn group_one_committing() -> (PlanRun, u64) {
    let mut run = grouped_run();
    let mut next = 1u64;
    let mut runs = BTreeMap::new();
    for shard in ["s0", "s1"] {
        let out = run.next_runs(shard, &mut next);
        runs.insert(shard, out[0].clone());
    }
    answer(&mut run, "s0", &runs["s0"], pb::StepOutcome::Prepared);
    answer(&mut run, "s1", &runs["s1"], pb::StepOutcome::Prepared);
    run.decision = Some(Decision::Commit);
    run.state = PlanState::Committing;
    (run, next)
}

/// `plan forget-shard` during group 1's commit: the forgotten shard's step of the group
/// fails as not confirmed, and the plan waits for the other shard's commit, then ends
/// failed with group 2 not run anywhere. A shard with nothing of the unit open (its part
/// committed) has nothing to forget.
#[test]
fn a_forgotten_shard_ends_the_plan_failed_once_the_others_committed() {
    let (mut run, _) = group_one_committing();
    assert!(run.shard_has_open("s1"));
    let updates = run.forget_shard("s1", "not confirmed: forgotten");
    // s1's `a` failed, its `b` not run
    let states: Vec<_> = updates
        .iter()
        .map(|u| (u.migration_id.as_str(), u.state))
        .collect();
    assert_eq!(
        states,
        [("a", StepState::Failed), ("b", StepState::NotRun)],
        "{updates:?}"
    );
    assert_eq!(updates[0].message, "not confirmed: forgotten");
    assert_eq!(updates[0].phase, "commit");
    assert_eq!(
        run.forgotten_shards().into_iter().collect::<Vec<_>>(),
        ["s1"]
    );
    assert!(!run.shard_has_open("s1"));
    // s0 has not committed yet: the plan neither moves on nor ends
    assert!(run.advance_unit().is_none());
    assert!(run.settle().is_none());
    assert_eq!(run.state, PlanState::Committing);
    let gids: Vec<String> = run.shards["s0"].prepared.keys().cloned().collect();
    run.apply_resolve_reply(
        "s0",
        &pb::ResolveReply {
            plan_id: "p0".into(),
            commit: true,
            resolved: gids,
            ..Default::default()
        },
    );
    assert!(!run.shard_has_open("s0"), "s0 committed its part");
    assert!(run.advance_unit().is_none(), "group 2 does not start");
    let updates = run.settle().expect("the plan ends");
    assert_eq!(run.state, PlanState::Failed);
    assert_eq!(updates.len(), 1, "s0's `b` not run: {updates:?}");
    assert!(
        run.message.starts_with(
            "parallel group 1 committed on 1 of 2 shards; not confirmed on s1 (forgotten by an operator"
        ) && run.message.ends_with("; 1 step(s) after it were not run"),
        "{}",
        run.message
    );
}

/// A forgotten shard back before the plan ended (its agent attached again): its step of
/// group 1 is prepared again and its failure gone, its step of group 2 pending again; once
/// both shards committed group 1, group 2 runs on both.
#[test]
fn a_forgotten_shard_back_goes_on_with_the_plan() {
    let (mut run, mut next) = group_one_committing();
    run.forget_shard("s1", "not confirmed: forgotten");
    assert!(run.shard_back("s0").is_empty(), "s0 was not forgotten");
    let updates = run.shard_back("s1");
    let states: Vec<_> = updates
        .iter()
        .map(|u| (u.migration_id.as_str(), u.state))
        .collect();
    assert_eq!(
        states,
        [("a", StepState::Prepared), ("b", StepState::Pending)],
        "{updates:?}"
    );
    assert!(run.forgotten_shards().is_empty());
    assert!(run.failures.is_empty(), "{:?}", run.failures);
    assert!(run.shard_has_open("s1"));
    assert!(run.settle().is_none());
    for shard in ["s0", "s1"] {
        let gids: Vec<String> = run.shards[shard].prepared.keys().cloned().collect();
        assert_eq!(gids.len(), 1, "{shard}");
        run.apply_resolve_reply(
            shard,
            &pb::ResolveReply {
                plan_id: "p0".into(),
                commit: true,
                resolved: gids,
                ..Default::default()
            },
        );
    }
    let moved = run
        .advance_unit()
        .expect("group 1 committed on both shards");
    assert!(
        moved.starts_with("parallel group 1 committed atomically on 2 shards"),
        "{moved}"
    );
    for shard in ["s0", "s1"] {
        let out = run.next_runs(shard, &mut next);
        assert_eq!(out.len(), 1, "{shard}'s `b` runs: {out:?}");
    }
}

/// Who ends a plan: a shard an operator cancelled, nothing failed, is the operator's end;
/// so is a halted plan of which a retry ran some targets only (steps left, nothing failed).
/// A failure on another shard after a shard's cancel is the plan's own.
#[test]
fn an_end_an_operator_chose_is_theirs_and_a_failure_is_the_plans() {
    let shards = [("s0", "t1"), ("s1", "t1")];
    let mut run = plan_of(&["a"], Vec::new(), &shards, pb::FailurePolicy::Continue);
    run.halt_shard("s1");
    let mut next = 1;
    let out = run.next_runs("s0", &mut next);
    answer(&mut run, "s0", &out[0], pb::StepOutcome::Applied);
    run.advance_waves(0);
    assert!(run.settle().is_some());
    assert_eq!((run.state, run.by_operator), (PlanState::Cancelled, true));

    let mut run = plan_of(&["a"], Vec::new(), &shards, pb::FailurePolicy::Continue);
    run.halt_shard("s1");
    let out = run.next_runs("s0", &mut next);
    answer(&mut run, "s0", &out[0], pb::StepOutcome::Failed);
    run.advance_waves(0);
    assert!(run.settle().is_some());
    assert!(!run.by_operator, "{:?}", run.state);

    // halted with both targets not run, then a retry of s0's alone, which applies
    let mut run = plan_of(&["a"], Vec::new(), &shards, pb::FailurePolicy::Continue);
    run.state = PlanState::Stopping;
    run.rollback_ends = PlanState::Halted;
    run.halt_pending();
    assert!(run.settle().is_some());
    assert_eq!(run.state, PlanState::Halted);
    let only = std::collections::BTreeSet::from([0]);
    assert!(!run.retry(Some(&only)).is_empty());
    assert!(!run.by_operator);
    let out = run.next_runs("s0", &mut next);
    answer(&mut run, "s0", &out[0], pb::StepOutcome::Applied);
    run.advance_waves(0);
    assert!(run.settle().is_some());
    assert_eq!((run.state, run.by_operator), (PlanState::Halted, true));
}

/// A retry's note alone is replaced at the plan's end by how it ended; with more said after
/// it (a shard cancelled since), it is kept: the cancel's note was lost, and a cancelled plan
/// said "every step applied".
#[test]
fn a_retrys_note_gives_way_at_the_end_but_not_what_came_after_it() {
    let ended = |message: &str, cancel: bool| {
        let mut run = plan_of(
            &["a"],
            Vec::new(),
            &[("s0", "t1"), ("s1", "t1")],
            pb::FailurePolicy::Continue,
        );
        let mut next = 1;
        let out = run.next_runs("s0", &mut next);
        answer(&mut run, "s0", &out[0], pb::StepOutcome::Applied);
        if cancel {
            run.halt_shard("s1");
            run.cancelled.insert("s1".into());
        } else {
            let out = run.next_runs("s1", &mut next);
            answer(&mut run, "s1", &out[0], pb::StepOutcome::Applied);
        }
        run.retry_note = "retry of 1 step requested by alice".into();
        run.message = message.into();
        run.advance_waves(0);
        run.settle().expect("ended");
        (run.state, run.message)
    };
    assert_eq!(
        ended("retry of 1 step requested by alice", false),
        (PlanState::Completed, "every step applied".to_string())
    );
    let (state, message) = ended(
        "retry of 1 step requested by alice; shard s1 cancelled by bob",
        true,
    );
    assert_eq!(state, PlanState::Cancelled);
    assert!(message.contains("shard s1 cancelled by bob"), "{message}");
}
