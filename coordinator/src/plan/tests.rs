//! Unit tests of the pure plan state: no database, no agent, no etcd.
use super::*;
use flotilla_proto::dag::MigrationGraph;
use flotilla_proto::protocol::Decision;
use flotilla_proto::{Scope, pb};

/// Two shards, one target each; `a` then `b` (group order), each group atomic.
fn grouped_run() -> PlanRun {
    let migration = |id: &str| pb::Migration {
        id: id.into(),
        up_sql: format!("CREATE TABLE {id} (x int)"),
        down_sql: format!("DROP TABLE {id}"),
        ..Default::default()
    };
    let raw = pb::PlanSpec {
        name: "grouped".into(),
        migrations: vec![migration("a"), migration("b")],
        parallel_groups: vec![
            pb::ParallelGroup {
                migrations: vec!["a".into()],
                atomic: true,
            },
            pb::ParallelGroup {
                migrations: vec!["b".into()],
                atomic: true,
            },
        ],
        default_scope: pb::Scope::Shard as i32,
        ..Default::default()
    };
    let spec = PlanSpec::try_from(raw).expect("valid plan");
    let graph = MigrationGraph::build(&spec).expect("graph");
    let targets: Vec<Target> = ["s0", "s1"]
        .iter()
        .map(|s| Target {
            shard: s.to_string(),
            tenant: String::new(),
        })
        .collect();
    let planned = crate::planner::plan_steps(&spec, &graph, &targets, Scope::Shard, |_, _| true);
    let n = planned.len();
    let mut run = PlanRun::new(
        "p0".into(),
        Arc::new(spec),
        pb::PlanDefinition::default(),
        targets,
        planned,
        vec![StepStatus::Pending; n],
        0,
        7,
    );
    run.rebalance_lanes(&|_| 4);
    run
}

fn answer(run: &mut PlanRun, shard: &str, r: &pb::Run, outcome: pb::StepOutcome) {
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
    run.apply_run_result(shard, &result);
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
    for shard in ["s0", "s1"] {
        let gids: Vec<String> = run.shards[shard].prepared.keys().cloned().collect();
        run.apply_resolve_reply(
            shard,
            &pb::ResolveReply {
                plan_id: "p0".into(),
                commit: true,
                resolved: gids,
                failed: Vec::new(),
            },
        );
    }
    assert!(run.advance_unit().is_some());
    assert_eq!(run.state, PlanState::Running);
    assert_eq!(run.unit_key(), "p0.g2");
    let out = run.next_runs("s0", &mut next);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].migrations, ["b"]);
    assert!(out[0].prepare_gid.starts_with("flotilla:p0.g2:"), "{out:?}");
}
