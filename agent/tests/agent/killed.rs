//! An agent killed (SIGKILL: an OOM kill, a pod gone) in the middle of a step's statement.
//! The agent runs in a child process of this test binary (`killed_child` alone), which the
//! test kills once the statement is under way.

use std::process::{Command, Stdio};

use crate::common::*;
use flotilla_core::pb;
use flotilla_core::pb::coordinator_message::Body as In;

/// Set for the child: the shard's DSN.
const CHILD_DSN: &str = "FLOTILLA_TEST_KILLED_CHILD_DSN";
/// A step that takes its table's ACCESS EXCLUSIVE lock and then works for five minutes.
const SLOW_UP: &str = "LOCK TABLE work_orders IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(300)";
const SLOW: &str = "20250101000000_slow";

/// The child's part: starts the slow step and waits to be killed. Passes at once otherwise.
#[tokio::test]
async fn killed_child() {
    let Ok(dsn) = std::env::var(CHILD_DSN) else {
        return;
    };
    let mut h = Harness::start(|_| {}, &dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "pkilled".into(),
        migrations: vec![migration(SLOW, SLOW_UP, "SELECT 1", "")],
        ..Default::default()
    }));
    s.send(In::Assign(pb::Assign {
        plan_id: "pkilled".into(),
        epoch: 1,
        lanes: 1,
        runs: vec![run(1, "tenant_0000", &[SLOW], false)],
    }));
    // the test kills this process while the step's statement runs
    loop {
        let _ = s.next().await;
    }
}

/// The server ends the statement of a killed agent, and its transaction with its locks,
/// within about a second (`client_connection_check_interval`, asked of servers 14 and
/// later). Before, the statement ran to its end (five minutes here), the tenant's table
/// locked all along against its traffic and against the step's next run.
#[tokio::test]
async fn a_killed_agents_statement_ends_with_it() {
    if std::env::var_os(CHILD_DSN).is_some() {
        return;
    }
    let Some(f) = fleet("killed", 1).await else {
        return;
    };
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    if version < 140_000 {
        flotilla_testkit::skip(
            "killed",
            "the server is older than 14: no connection checks",
        );
        f.drop().await;
        return;
    }
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--exact",
            "killed::killed_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DSN, &f.dsn)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the child");
    wait_running(&f.pool, "pg_sleep(300)").await;
    child.kill().expect("kill the child");
    child.wait().expect("the child ends");
    flotilla_testkit::wait::wait_until("the killed agent's statement ended", WAIT, async || {
        Ok(count(
            &f.pool,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND position('pg_sleep(300)' in query) > 0 \
             AND state = 'active'",
        )
        .await
            == 0)
    })
    .await
    .expect("the statement ended long before its five minutes");
    // its lock went with it: the table is free at once
    let mut tx = f.pool.begin().await.unwrap();
    sqlx::raw_sql("LOCK TABLE tenant_0000.work_orders IN ACCESS EXCLUSIVE MODE NOWAIT")
        .execute(&mut *tx)
        .await
        .expect("the table's lock was released");
    tx.rollback().await.unwrap();
    assert_eq!(
        count(&f.pool, "SELECT count(*) FROM flotilla.journal").await,
        0,
        "nothing journaled"
    );
    f.drop().await;
}
