//! Issue 3, fault 7: an agent cut off from the coordinator for longer than the
//! grace (but alive: its liveness key stays in etcd), then healed: no work lost
//! or doubled.
use std::time::Duration;

use crate::fleet::{Cli, MigrationDir, WAIT, tenant_name, tenant_sql};
use crate::ha::HaFleet;
use crate::harness::{FlotillaProcess, TcpProxy, wait_until};
use crate::shards::{blocked, hold, logged_blocking_migration, release};

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cut_off_past_the_grace_then_healed_loses_and_doubles_nothing()
-> anyhow::Result<()> {
    let fleet = HaFleet::builder(1, 1, 2)
        .coordinator_args(&["--agent-grace", "2s"])
        .start()
        .await?;
    // A second shard whose agent reaches the coordinator through a proxy the test cuts.
    fleet.pg.create_database("shard_1").await?;
    let sql: String = (0..2)
        .map(|t| tenant_sql(&tenant_name(1, t, 2), 5))
        .collect();
    fleet.pg.psql("shard_1", &sql).await?;
    let upstream = fleet.addrs[0].trim_start_matches("http://").parse()?;
    let proxy = TcpProxy::start(upstream).await?;
    let via = format!("http://{}", proxy.addr());
    let dsn = fleet.pg.url("shard_1");
    let _agent = FlotillaProcess::spawn(
        &[
            "--coordinator",
            &via,
            "agent",
            "--shard",
            "shard_1",
            "--dsn",
            &dsn,
            "--tenant-pattern",
            "tenant_%",
            "--etcd",
            &fleet.etcd_endpoints(),
            "--lease-ttl",
            "2s",
        ],
        &[],
    )?;
    fleet.wait_connected(2).await?;
    let epochs = crate::shards::fences(&fleet.pg, 2).await?;

    // One tenant of shard_1 blocks on an advisory lock the test holds.
    let d = MigrationDir::new()?;
    logged_blocking_migration(&d, "tenant_0003", 91)?;
    let lock = hold(&fleet.pg, 1, 91).await?;
    let id = fleet.submit(d.path(), &[]).await?;
    wait_until("tenant_0003 blocked", WAIT, async || {
        let n = blocked(&fleet.pg, 1).await?;
        Ok(n == 1)
    })
    .await?;

    // Cut the agent off: the coordinator waits past the grace (2s here).
    proxy.cut().await?;
    let coordinator = fleet.coordinators[0].as_ref().unwrap();
    coordinator
        .wait_for_log(
            "agent detached past the grace but alive in etcd",
            Duration::from_secs(60),
        )
        .await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "running", "an alive agent's runs wait: {st}");
    assert!(
        st["waiting_for"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "shard_1"),
        "{st}"
    );

    // The blocked step finishes while the agent is cut off; healing delivers it.
    release(lock, 91).await?;
    wait_until(
        "tenant_0003's step committed while cut off",
        WAIT,
        async || {
            let n: i64 = fleet
                .pg
                .query_scalar(
                    "shard_1",
                    "SELECT count(*) FROM flotilla.journal WHERE target = 'tenant_0003'",
                )
                .await?;
            Ok(n == 1)
        },
    )
    .await?;
    proxy.heal().await?;
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    for s in 0..2 {
        let db = format!("shard_{s}");
        assert_eq!(
            fleet.journal_rows(s).await?,
            2,
            "{db}: one journal row per tenant"
        );
        for t in 0..2 {
            let tenant = tenant_name(s, t, 2);
            let rows: i64 = fleet
                .pg
                .query_scalar(&db, &format!("SELECT count(*) FROM {tenant}.applied_log"))
                .await?;
            assert_eq!(rows, 1, "{db}/{tenant}: applied exactly once");
        }
    }
    crate::shards::assert_fences_not_back(&fleet.pg, &epochs).await
}

/// A coordinator cut off from etcd knows no leader. A read asked of it with the leader
/// listed beside it (`--coordinator cut,leader`) comes from the leader. Before, its read
/// from the control store stood, "no coordinator leads now", for as long as the cut lasted,
/// the leader one address further.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_finds_the_leader_listed_beside_a_coordinator_that_knows_none() -> anyhow::Result<()>
{
    let mut fleet = HaFleet::start(2, 1, 2).await?;
    fleet.wait_connected(1).await?;
    // coordinator 0 again, its etcd behind a proxy the test cuts; coordinator 1 leads
    fleet.coordinators[0].take().expect("running").kill()?;
    let upstream = fleet.etcd.endpoints()[0]
        .trim_start_matches("http://")
        .parse()?;
    let proxy = TcpProxy::start(upstream).await?;
    let via = format!("http://{}", proxy.addr());
    let listen = format!("127.0.0.1:{}", fleet.ports[0]);
    let c0 = FlotillaProcess::spawn(
        &[
            "coordinator",
            "--listen",
            &listen,
            "--store",
            &fleet.store,
            "--etcd",
            &via,
            "--lease-ttl",
            &fleet.lease_ttl,
        ],
        &[],
    )?;
    c0.wait_for_log("coordinator listening", WAIT).await?;
    fleet.coordinators[0] = Some(c0);
    // coordinator 0 leads: coordinator 1 stopped, then back as a follower
    fleet.coordinators[1].take().expect("running").kill()?;
    fleet.coordinators[0]
        .as_ref()
        .unwrap()
        .wait_for_log("elected leader", WAIT)
        .await?;
    let c1 = fleet.spawn_coordinator(1)?;
    c1.wait_for_log("coordinator listening", WAIT).await?;
    fleet.coordinators[1] = Some(c1);
    fleet.wait_connected(1).await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_note",
        "",
        "ALTER TABLE work_orders ADD COLUMN cut_note int",
        "ALTER TABLE work_orders DROP COLUMN cut_note",
    )?;
    let id = fleet.submit(d.path(), &[]).await?;
    let out = fleet.cli(&["plan", "watch", &id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");

    // cut from etcd, the leader steps down; coordinator 1 is elected
    proxy.cut().await?;
    let status = |addrs: String| {
        let id = id.clone();
        async move {
            crate::harness::run_flotilla(&["--coordinator", &addrs, "plan", "status", &id], &[])
                .await
        }
    };
    // coordinator 0 alone: it knows no leader
    wait_until("coordinator 0 knowing no leader", WAIT, async || {
        let out = status(fleet.addrs[0].clone()).await?;
        Ok(out.stderr.contains("no coordinator leads now"))
    })
    .await?;
    // and coordinator 1 elected
    fleet.coordinators[1]
        .as_ref()
        .unwrap()
        .wait_for_log("elected leader", WAIT)
        .await?;
    let out = status(format!("{},{}", fleet.addrs[0], fleet.addrs[1])).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        !out.stderr.contains("no coordinator leads now") && out.stdout.contains("completed"),
        "{out}"
    );
    proxy.heal().await?;
    Ok(())
}
