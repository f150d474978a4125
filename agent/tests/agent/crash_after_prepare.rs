//! An agent that dies between PREPARE TRANSACTION and reporting it (the failpoint
//! `agent::after_prepare_before_report`, feature `testing`; needs `FLOTILLA_TEST_PG_URL` with
//! `max_prepared_transactions` above 0). The failpoint exits the process, so the agent that
//! crashes runs in a child process: this test binary again, running `crash_child` only
//! ([`run_in_child`]).

use std::time::Duration;

use crate::common::*;
use flotilla_core::pb;
use flotilla_core::pb::coordinator_message::Body as In;

/// Set for the child: the shard's DSN.
const CHILD_DSN: &str = "FLOTILLA_TEST_CRASH_CHILD_DSN";
const GID: &str = "flotilla:pcrash:1:1:tenant_0000";

fn define(s: &Stream) {
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pcrash".into(),
        migrations: bench_migrations(),
        ..Default::default()
    }));
}

/// The child's part: prepares a run and dies before reporting it. Passes at once otherwise.
#[tokio::test]
async fn crash_child() {
    let Ok(dsn) = std::env::var(CHILD_DSN) else {
        return;
    };
    let mut h = Harness::start(|_| {}, &dsn).await;
    let (mut s, _) = h.attach(1).await;
    define(&s);
    s.send(In::Assign(pb::Assign {
        plan_id: "pcrash".into(),
        epoch: 1,
        lanes: 1,
        runs: vec![prepared_run(1, "tenant_0000", &BENCH, GID)],
    }));
    let got = s.next().await;
    panic!("the agent reported instead of exiting at the failpoint: {got:?}");
}

#[tokio::test]
async fn a_crash_after_prepare_leaves_it_in_doubt_for_the_next_agent() {
    if std::env::var_os(CHILD_DSN).is_some() {
        return;
    }
    let Some(f) = fleet_2pc("crash_prepare", 1).await else {
        return;
    };
    let out = run_in_child(
        "crash_after_prepare::crash_child",
        &[
            (CHILD_DSN, &f.dsn),
            ("FAILPOINTS", "agent::after_prepare_before_report=return"),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(86),
        "the child did not exit at the failpoint:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // prepared, not committed
    assert_eq!(prepared_gids(&f.pool).await, [GID]);
    assert_eq!(
        count(&f.pool, "SELECT count(*) FROM flotilla.journal").await,
        0
    );
    // the dead agent's sessions (and its shard lock) go with it
    let deadline = tokio::time::Instant::now() + WAIT;
    while count(
        &f.pool,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'flotilla-agent'",
    )
    .await
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the child's sessions stayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // a fresh agent (no etcd) lists it; the leader decides; the run resent meanwhile is
    // PREPARED without running again
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, hello) = h.attach(1).await;
    assert_eq!(hello.in_doubt, [GID]);
    define(&s);
    let r = s
        .assign(
            "pcrash",
            1,
            1,
            vec![prepared_run(1, "tenant_0000", &BENCH, GID)],
        )
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Prepared; 3], "{r:?}");
    let reply = s.resolve("pcrash", true, 1, &[GID]).await;
    assert_eq!(reply.resolved, [GID], "{reply:?}");
    assert_eq!(
        count(
            &f.pool,
            "SELECT count(*) FROM flotilla.journal WHERE plan_id = 'pcrash'"
        )
        .await,
        3
    );
    assert!(prepared_gids(&f.pool).await.is_empty());
    h.stop().await;
    f.drop().await;
}
