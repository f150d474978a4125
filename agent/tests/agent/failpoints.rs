//! The agent's failpoints against a real PostgreSQL (feature `testing`, and
//! `FLOTILLA_TEST_PG_URL`). Failpoints are process-wide: the test runs alone in a child
//! process.

use crate::common::*;
use flotilla_core::pb;
use flotilla_core::pb::coordinator_message::Body as In;

#[tokio::test]
async fn failpoints_fail_steps_undos_and_sends() {
    if !alone_in_child_process("failpoints::failpoints_fail_steps_undos_and_sends") {
        return;
    }
    let Some(f) = fleet("failpoints", 2).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    let define = |s: &Stream| {
        s.send(In::Plan(pb::PlanDefinition {
            plan_id: "fp".into(),
            migrations: bench_migrations(),
            ..Default::default()
        }))
    };
    define(&s);

    // a failure right before COMMIT leaves nothing behind
    fail::cfg("agent::before_step_commit", "1*return(boom)").unwrap();
    let r = s
        .assign("fp", 1, 1, vec![run(1, "tenant_0000", &BENCH, true)])
        .await;
    assert_eq!(
        outcomes(&r[&1]),
        [
            pb::StepOutcome::NotRun,
            pb::StepOutcome::NotRun,
            pb::StepOutcome::Failed
        ]
    );
    let e = r[&1].steps[2].error.clone().unwrap();
    assert_eq!(e.message, "failpoint agent::before_step_commit: boom");
    assert_eq!(
        count(&f.pool, "SELECT count(*) FROM flotilla.journal").await,
        0
    );
    assert_eq!(
        count(&f.pool, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'satisfaction_rating'").await,
        0
    );

    // results that could not be sent go out on the next stream
    fail::cfg("agent::before_send_results", "1*return").unwrap();
    s.send(In::Assign(pb::Assign {
        plan_id: "fp".into(),
        epoch: 1,
        lanes: 1,
        runs: vec![run(2, "tenant_0000", &BENCH, true)],
    }));
    let (mut s, _) = h.attach(1).await;
    define(&s);
    let r = s.results("fp", 1).await;
    assert_eq!(outcomes(&r[&2]), [pb::StepOutcome::Applied; 3]);
    drop(s);

    // a failed undo stops its target and leaves its journal row
    let (mut s, _) = h.attach(1).await;
    define(&s);
    fail::cfg("agent::before_rollback_step", "1*return(no)").unwrap();
    let reply = s.rollback("fp", 1).await;
    assert!(!reply.complete);
    assert_eq!(reply.steps.len(), 1);
    assert_eq!(
        reply.steps[0].error.as_ref().unwrap().message,
        "failpoint agent::before_rollback_step: no"
    );
    assert_eq!(
        count(&f.pool, "SELECT count(*) FROM flotilla.journal").await,
        3
    );
    let reply = s.rollback("fp", 1).await;
    assert!(reply.complete && reply.steps.len() == 3, "{reply:?}");

    // applied by another session while it ran, and the journal cannot be read again to say
    // by which version: not this version's `already_applied`, nor a failure: not run (the
    // coordinator runs it again, and that run's journal read says)
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "fp2".into(),
        migrations: vec![migration("idem", "SELECT pg_sleep(0.4)", "SELECT 1", "")],
        ..Default::default()
    }));
    // every read fails (it is tried three times)
    fail::cfg("agent::settle_journal_read", "3*return").unwrap();
    let r3 = run_while_another_applies(&mut s, &f.pool, "fp2", 1, 3, "tenant_0001").await;
    assert_eq!(outcomes(&r3), [pb::StepOutcome::NotRun], "{r3:?}");
    let e = r3.steps[0].error.clone().unwrap();
    assert!(
        e.message
            .contains("another session applied it first, and re-reading the journal failed"),
        "{e:?}"
    );

    // one read that fails is tried again: the journal then says whose it is
    fail::cfg("agent::settle_journal_read", "1*return").unwrap();
    let r4 = run_while_another_applies(&mut s, &f.pool, "fp2", 1, 4, "tenant_0000").await;
    assert_eq!(outcomes(&r4), [pb::StepOutcome::AlreadyApplied], "{r4:?}");
    assert_eq!(r4.steps[0].checksum, "theirs");

    // The step's connection lost mid-step (its backend terminated) and the journal cannot
    // be read: whether it committed is unknown, and its SQL did not fail: not run (under
    // all-or-nothing a FAILED rolled the whole plan back for one lost connection). With the
    // journal read, the answer is definite: not applied, failed.
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "fp3".into(),
        migrations: vec![migration("slow", "SELECT pg_sleep(30)", "SELECT 1", "")],
        ..Default::default()
    }));
    for (run_id, journal_reads, outcome) in [
        (5, "3*return", pb::StepOutcome::NotRun),
        (6, "off", pb::StepOutcome::Failed),
    ] {
        fail::cfg("agent::settle_journal_read", journal_reads).unwrap();
        s.send(In::Assign(pb::Assign {
            plan_id: "fp3".into(),
            epoch: 1,
            lanes: 1,
            runs: vec![run(run_id, "tenant_0000", &["slow"], true)],
        }));
        wait_running(&f.pool, "pg_sleep(30)").await;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()",
        )
        .execute(&f.pool)
        .await
        .unwrap();
        let r = s.results("fp3", 1).await.remove(&run_id).unwrap();
        assert_eq!(outcomes(&r), [outcome], "{r:?}");
        if outcome == pb::StepOutcome::NotRun {
            let e = r.steps[0].error.clone().unwrap();
            assert!(
                e.message.contains("the connection to the shard was lost"),
                "{e:?}"
            );
        }
    }
    h.stop().await;
    f.drop().await;
}

/// A plan definition whose SQL takes long to read (a plan of tens of MB of SQL took the
/// agent's thread for seconds) is read off the thread the agent's stream runs on: its
/// heartbeats go on meanwhile (the coordinator drops a stream three intervals silent), and
/// runs assigned before the definition is read wait for it, then apply. The read is held
/// by a failpoint until the heartbeats have been seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_read_at_length_leaves_the_heartbeats_going() {
    if !alone_in_child_process(
        "failpoints::a_definition_read_at_length_leaves_the_heartbeats_going",
    ) {
        return;
    }
    let Some(f) = fleet("fp_slow_definition", 1).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    fail::cfg("agent::reading_definition", "pause").unwrap();
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "slow".into(),
        migrations: bench_migrations(),
        ..Default::default()
    }));
    s.send(In::Assign(pb::Assign {
        plan_id: "slow".into(),
        epoch: 1,
        lanes: 1,
        runs: vec![run(1, "tenant_0000", &BENCH, true)],
    }));
    // while the read is held: heartbeats (one may have been on its way before), nothing
    // else. Each within a few seconds (every 100 ms here): the failpoint is let go before
    // any assertion, so a stream task held by the read fails the test rather than hang it.
    let mut heartbeats = 0;
    let mut unexpected = None;
    while heartbeats < 5 && unexpected.is_none() {
        let Ok(msg) =
            tokio::time::timeout(std::time::Duration::from_secs(3), s.inbound.message()).await
        else {
            break;
        };
        match msg
            .expect("stream ok")
            .expect("stream open")
            .body
            .expect("body")
        {
            pb::agent_message::Body::Heartbeat(_) => heartbeats += 1,
            pb::agent_message::Body::Journal(_)
            | pb::agent_message::Body::Schema(_)
            | pb::agent_message::Body::Tenants(_) => {}
            other => unexpected = Some(other),
        }
    }
    fail::remove("agent::reading_definition");
    assert!(
        unexpected.is_none(),
        "expected only heartbeats while the definition is read, got {unexpected:?}"
    );
    assert_eq!(
        heartbeats, 5,
        "the agent's heartbeats stopped while its definition was read"
    );
    let r = s.results("slow", 1).await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied; 3]);
    drop(s);
    h.stop().await;
    f.drop().await;
}
