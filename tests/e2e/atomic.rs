//! Issue 3: atomic commit across shards (two-phase commit), with real etcd and
//! real PostgreSQL, and faults injected at the protocol's steps.
use serde_json::Value;

use crate::fleet::{WAIT, coord_dbmate_dir};
use crate::ha::HaFleet;

/// Flotilla's prepared transactions left on a shard.
async fn prepared(fleet: &HaFleet, db: &str) -> anyhow::Result<i64> {
    fleet
        .pg
        .query_scalar(
            db,
            "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'flotilla:%' AND database = current_database()",
        )
        .await
}

/// Each shard's fence epoch: read before a fault and after it, it never goes back.
async fn fences(fleet: &HaFleet, shards: usize) -> anyhow::Result<Vec<i64>> {
    let mut out = Vec::new();
    for s in 0..shards {
        out.push(
            fleet
                .pg
                .query_scalar(&format!("shard_{s}"), "SELECT epoch FROM flotilla.fence")
                .await?,
        );
    }
    Ok(out)
}

async fn assert_fences_not_back(fleet: &HaFleet, before: &[i64]) -> anyhow::Result<()> {
    let after = fences(fleet, before.len()).await?;
    for (s, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(a >= b, "shard_{s}: the fence went back from {b} to {a}");
    }
    Ok(())
}

/// Submits COORD-2025-001 as an atomic plan without waiting; returns its id.
async fn submit_atomic(fleet: &HaFleet) -> anyhow::Result<String> {
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet
        .cli(&["plan", "submit", &dir, "--atomic", "--output", "json"])
        .await?;
    assert!(out.success(), "{out}");
    let v: Value = serde_json::from_str(out.stdout.lines().last().unwrap_or(""))?;
    Ok(v["plan_id"].as_str().unwrap_or_default().to_string())
}

async fn assert_none_prepared(fleet: &HaFleet, shards: usize) -> anyhow::Result<()> {
    for s in 0..shards {
        assert_eq!(
            prepared(fleet, &format!("shard_{s}")).await?,
            0,
            "shard_{s} holds a Flotilla prepared transaction"
        );
    }
    Ok(())
}

async fn satisfaction_columns(fleet: &HaFleet, db: &str) -> anyhow::Result<i64> {
    fleet
        .pg
        .query_scalar(
            db,
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'satisfaction_rating'
               AND table_name IN ('work_orders', 'repair_orders')",
        )
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_atomic_plan_commits_on_every_shard_at_once() -> anyhow::Result<()> {
    let fleet = HaFleet::start(1, 3, 2).await?;
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet
        .cli(&[
            "plan", "submit", &dir, "--atomic", "--wait", "--output", "json",
        ])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st: Value = serde_json::from_str(out.stdout.lines().last().unwrap())?;
    assert_eq!(st["state"], "completed", "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("committed atomically"),
        "{st}"
    );
    for s in 0..3 {
        let db = format!("shard_{s}");
        // 2 tenants x 2 tables.
        assert_eq!(satisfaction_columns(&fleet, &db).await?, 4, "{db}");
        let journal: i64 = fleet
            .pg
            .query_scalar(&db, "SELECT count(*) FROM flotilla.journal")
            .await?;
        assert_eq!(journal, 6, "{db}");
    }
    assert_none_prepared(&fleet, 3).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_target_aborts_every_prepared_transaction() -> anyhow::Result<()> {
    let fleet = HaFleet::start(1, 3, 2).await?;
    fleet
        .pg
        .psql(
            "shard_2",
            "ALTER TABLE tenant_0005.repair_orders ADD COLUMN satisfaction_comments text",
        )
        .await?;
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet
        .cli(&[
            "plan", "submit", &dir, "--atomic", "--wait", "--output", "json",
        ])
        .await?;
    assert_eq!(out.code(), Some(1), "{out}");
    let st: Value = serde_json::from_str(out.stdout.lines().last().unwrap())?;
    assert_eq!(st["state"], "rolled_back", "{st}");
    for s in 0..3 {
        let db = format!("shard_{s}");
        assert_eq!(
            satisfaction_columns(&fleet, &db).await?,
            0,
            "{db}: nothing committed"
        );
        let journal: i64 = fleet
            .pg
            .query_scalar(&db, "SELECT count(*) FROM flotilla.journal")
            .await?;
        assert_eq!(journal, 0, "{db}");
    }
    assert_none_prepared(&fleet, 3).await
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_before_the_decision_means_abort_everywhere() -> anyhow::Result<()> {
    let mut fleet = HaFleet::start(1, 2, 2).await?;
    let epochs = fences(&fleet, 2).await?;
    // Restart the coordinator with a failpoint: it exits with every target
    // prepared and no decision written.
    fleet
        .restart_coordinator_with(0, &[("FAILPOINTS", "coordinator::before_decision=return")])
        .await?;
    fleet.wait_connected(2).await?;
    let id = submit_atomic(&fleet).await?;
    let status = fleet.coordinators[0]
        .as_mut()
        .unwrap()
        .wait_exit(WAIT)
        .await
        .expect("the failpoint ends it");
    assert_eq!(status.code(), Some(86));
    // Every target is prepared, nothing committed.
    for s in 0..2 {
        let gids = fleet
            .pg
            .query_rows(
                &format!("shard_{s}"),
                "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'flotilla:%' AND database = current_database() ORDER BY 1",
            )
            .await?;
        assert_eq!(
            gids.len(),
            2,
            "shard_{s}: both tenants prepared, once: {gids:?}"
        );
        assert_eq!(
            satisfaction_columns(&fleet, &format!("shard_{s}")).await?,
            0
        );
    }
    // A new coordinator finds no decision: it presumes abort.
    let c = fleet.spawn_coordinator(0)?;
    c.wait_for_log("coordinator listening", WAIT).await?;
    fleet.coordinators[0] = Some(c);
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(1), "{out}");
    let st = fleet
        .json(&["plan", "status", &id, "--output", "json"])
        .await?;
    assert_eq!(st["state"], "rolled_back", "{st}");
    for s in 0..2 {
        assert_eq!(
            satisfaction_columns(&fleet, &format!("shard_{s}")).await?,
            0
        );
    }
    assert_fences_not_back(&fleet, &epochs).await?;
    assert_none_prepared(&fleet, 2).await
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_after_the_commit_decision_means_every_shard_commits()
-> anyhow::Result<()> {
    let mut fleet = HaFleet::start(1, 2, 2).await?;
    let epochs = fences(&fleet, 2).await?;
    fleet
        .restart_coordinator_with(0, &[("FAILPOINTS", "coordinator::after_decision=return")])
        .await?;
    fleet.wait_connected(2).await?;
    let id = submit_atomic(&fleet).await?;
    let status = fleet.coordinators[0]
        .as_mut()
        .unwrap()
        .wait_exit(WAIT)
        .await
        .expect("the failpoint ends it");
    assert_eq!(status.code(), Some(87));
    // The decision is in etcd: agents commit by themselves (they read it), and a
    // new coordinator finishes the plan.
    let c = fleet.spawn_coordinator(0)?;
    c.wait_for_log("coordinator listening", WAIT).await?;
    fleet.coordinators[0] = Some(c);
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    for s in 0..2 {
        assert_eq!(
            satisfaction_columns(&fleet, &format!("shard_{s}")).await?,
            4,
            "shard_{s} committed"
        );
    }
    assert_fences_not_back(&fleet, &epochs).await?;
    assert_none_prepared(&fleet, 2).await
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_refuses_a_shard_without_prepared_transactions() -> anyhow::Result<()> {
    let fleet = HaFleet::start(1, 1, 1).await?;
    // The shard's server cannot prepare: the plan is refused before any change.
    fleet
        .pg
        .psql("postgres", "ALTER SYSTEM SET max_prepared_transactions = 0")
        .await?;
    let mut pg = fleet;
    pg.pg.restart().await?;
    let fleet = pg;
    fleet.wait_connected(1).await?;
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet
        .cli(&["plan", "submit", &dir, "--atomic", "--wait"])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("max_prepared_transactions") && out.stderr.contains("shard_0"),
        "{out}"
    );
    assert_eq!(satisfaction_columns(&fleet, "shard_0").await?, 0);
    Ok(())
}
