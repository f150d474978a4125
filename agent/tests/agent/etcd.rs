//! The agent's liveness key in etcd. Needs `FLOTILLA_TEST_PG_URL` (the agent needs its shard
//! first) and an etcd binary; without either, the test prints a note and passes.

use std::time::Duration;

use crate::common::*;
use etcd_client::Client;
use flotilla_testkit::Etcd;

const PREFIX: &str = "/flotilla-agent-test/";
const KEY: &str = "/flotilla-agent-test/agents/shard-test";

/// The key's lease and value once `ok(lease)` holds.
async fn wait_for_key(client: &mut Client, ok: impl Fn(i64) -> bool) -> (i64, String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = client.get(KEY, None).await.unwrap();
        if let Some(kv) = found.kvs().first()
            && ok(kv.lease())
        {
            return (kv.lease(), kv.value_str().unwrap().to_string());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no liveness key {KEY} in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn key_exists(client: &mut Client) -> bool {
    !client.get(KEY, None).await.unwrap().kvs().is_empty()
}

#[tokio::test]
async fn liveness_key_lives_under_a_lease_and_comes_back() {
    let Some(etcd) = Etcd::start_or_skip("etcd_liveness").await else {
        return;
    };
    let Some(f) = fleet("etcd_liveness", 1).await else {
        return;
    };
    let endpoint = etcd.endpoint();
    let mut h = Harness::start(
        |c| {
            c.etcd = vec![endpoint];
            c.etcd_prefix = PREFIX.into();
            c.lease_ttl = Duration::from_secs(3);
        },
        &f.dsn,
    )
    .await;
    let (_s, _) = h.attach(1).await;
    let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();

    let (lease, value) = wait_for_key(&mut client, |lease| lease != 0).await;
    let value: serde_json::Value = serde_json::from_str(&value).unwrap();
    assert_eq!(value["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(value["pid"], std::process::id());
    assert!(value["host"].is_string(), "{value}");
    let ttl = client.lease_time_to_live(lease, None).await.unwrap();
    assert!(
        ttl.granted_ttl() == 3 && ttl.ttl() > 0,
        "{}",
        ttl.granted_ttl()
    );

    // killed from outside: the key goes with the lease, and the agent puts it back
    client.lease_revoke(lease).await.unwrap();
    // (not "the key is absent now": the agent may have put it back already)
    let ttl = client.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ttl.ttl(), -1, "the revoked lease lives on");
    let (again, _) = wait_for_key(&mut client, |l| l != 0 && l != lease).await;

    // a shutdown revokes the lease: the key is gone at once, not after the TTL
    h.stop().await;
    assert!(!key_exists(&mut client).await, "the key outlived the agent");
    let ttl = client.lease_time_to_live(again, None).await.unwrap();
    assert_eq!(ttl.ttl(), -1, "the lease outlived the agent");
    f.drop().await;
    drop(etcd);
}

#[tokio::test]
async fn an_unreachable_etcd_does_not_hold_up_the_agent() {
    let Some(f) = fleet("etcd_unreachable", 1).await else {
        return;
    };
    let mut h = Harness::start(
        |c| {
            c.etcd = vec!["http://127.0.0.1:1".into()];
            c.lease_ttl = Duration::from_secs(3);
        },
        &f.dsn,
    )
    .await;
    let (mut s, hello) = h.attach(1).await;
    assert_eq!(hello.tenants.len(), 1);
    s.send(flotilla_core::pb::coordinator_message::Body::Preflight(
        flotilla_core::pb::PreflightRequest {
            two_phase: false,
            request_id: 1,
            migration_ids: Vec::new(),
            data_migrations: Vec::new(),
            lock_relations: Vec::new(),
        },
    ));
    let reply = s.next().await;
    assert!(
        matches!(reply, flotilla_core::pb::agent_message::Body::Preflight(_)),
        "{reply:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), h.stop())
        .await
        .expect("stops without etcd");
    f.drop().await;
}

/// etcd stalling under the agent's keep-alive stream for less than the lease's TTL (a member
/// stopped a moment): the agent keeps its lease through a new client, and the key is never
/// put again. Before, every such stall granted a new lease and put the key again, saying
/// the lease was lost (seen at each single member's stall in a three-member cluster).
#[tokio::test]
async fn a_keep_alive_stall_shorter_than_the_ttl_keeps_the_lease() {
    // (it waits on log lines: alone, so no other test's agent logs them, or sets the log up)
    if !alone_in_child_process("etcd::a_keep_alive_stall_shorter_than_the_ttl_keeps_the_lease") {
        return;
    }
    let Some(etcd) = Etcd::start_or_skip("etcd_stall").await else {
        return;
    };
    let Some(f) = fleet("etcd_stall", 1).await else {
        return;
    };
    let endpoint = etcd.endpoint();
    let mark = log_mark();
    let mut h = Harness::start(
        |c| {
            c.etcd = vec![endpoint];
            c.etcd_prefix = PREFIX.into();
            c.lease_ttl = Duration::from_secs(8);
        },
        &f.dsn,
    )
    .await;
    let (_s, _) = h.attach(1).await;
    let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
    let (lease, _) = wait_for_key(&mut client, |lease| lease != 0).await;
    etcd.pause().unwrap();
    wait_for_log(mark, "the agent's liveness keep-alive broke").await;
    etcd.resume().unwrap();
    wait_for_log(mark, "the liveness lease kept through another etcd member").await;
    let (now, _) = wait_for_key(&mut client, |l| l != 0).await;
    assert_eq!(now, lease, "the key is still under its first lease");
    h.stop().await;
    f.drop().await;
    drop(etcd);
}
