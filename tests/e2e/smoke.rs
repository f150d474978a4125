//! Tests of the harness itself: if these fail, nothing else in the suite can
//! be trusted.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::etcd::etcd_health;
use crate::harness::wait::fatal;
use crate::harness::{
    Etcd, EtcdCluster, FlotillaProcess, PgCluster, TcpProxy, free_port, http, process_state,
    run_flotilla, wait_until,
};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn free_ports_are_unique_and_below_the_ephemeral_range() {
    let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
    assert!(
        ports.iter().all(|p| (15000..32000).contains(p)),
        "{ports:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_until_names_what_it_waited_for() {
    let started = Instant::now();
    let err = wait_until(
        "the moon to turn blue",
        Duration::from_millis(300),
        || async { Ok(false) },
    )
    .await
    .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        format!("{err:#}").contains("the moon to turn blue"),
        "{err:#}"
    );

    let mut calls = 0;
    wait_until("the third call", WAIT, || {
        calls += 1;
        let done = calls >= 3;
        async move { Ok(done) }
    })
    .await
    .unwrap();
    assert_eq!(calls, 3);

    // Fatal errors stop the wait at once.
    let started = Instant::now();
    let err = wait_until("something impossible", WAIT, || async {
        Err(fatal(anyhow::anyhow!("it broke for good")))
    })
    .await
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(format!("{err:#}").contains("it broke for good"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_runs_sql_through_psql_and_sqlx() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    assert_eq!(
        pg.url("smoke"),
        format!("postgres://postgres@127.0.0.1:{}/smoke", pg.port())
    );
    pg.create_database("smoke").await?;

    let out = pg
        .psql(
            "smoke",
            "CREATE TABLE t (id int PRIMARY KEY, name text);
             INSERT INTO t VALUES (1, 'one'), (2, 'two|pipe');
             SELECT id, name FROM t ORDER BY id;",
        )
        .await?;
    assert_eq!(out, "1|one\n2|two|pipe");
    let rows = pg
        .query_rows("smoke", "SELECT id, name FROM t ORDER BY id")
        .await?;
    assert_eq!(rows, vec![vec!["1", "one"], vec!["2", "two|pipe"]]);
    let count: i64 = pg.query_scalar("smoke", "SELECT count(*) FROM t").await?;
    assert_eq!(count, 2);

    let err = pg
        .psql("smoke", "SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("no_such_table"), "{err:#}");

    let pool = pg.pool("smoke").await?;
    let name: String = sqlx::query_scalar("SELECT name FROM t WHERE id = $1")
        .bind(2i32)
        .fetch_one(&pool)
        .await?;
    assert_eq!(name, "two|pipe");
    let id = 3;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO t VALUES ({id}, 'three')"
    )))
    .execute(&pool)
    .await?;
    pool.close().await;
    assert_eq!(
        pg.psql("smoke", "SELECT name FROM t WHERE id = 3").await?,
        "three"
    );

    // The harness defaults are in effect.
    assert_eq!(
        pg.psql("postgres", "SHOW max_prepared_transactions")
            .await?,
        "64"
    );
    assert_eq!(pg.psql("postgres", "SHOW max_connections").await?, "200");
    assert_eq!(pg.psql("postgres", "SHOW fsync").await?, "off");
    assert_eq!(
        pg.psql("postgres", "SHOW listen_addresses").await?,
        "127.0.0.1"
    );
    assert_eq!(
        pg.psql("postgres", "SELECT current_user").await?,
        "postgres"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_builder_settings_apply_per_cluster() -> anyhow::Result<()> {
    let (default, no_2pc) = tokio::try_join!(
        PgCluster::start(),
        PgCluster::builder()
            .setting("max_prepared_transactions", "0")
            .setting("cluster_name", "it's quoted")
            .start(),
    )?;
    assert_ne!(default.port(), no_2pc.port());

    let pool = no_2pc.pool("postgres").await?;
    let setting: String = sqlx::query_scalar("SHOW max_prepared_transactions")
        .fetch_one(&pool)
        .await?;
    assert_eq!(setting, "0");
    let err = no_2pc
        .psql("postgres", "BEGIN; PREPARE TRANSACTION 'x';")
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("prepared transactions are disabled"),
        "{err:#}"
    );
    assert_eq!(
        no_2pc.psql("postgres", "SHOW cluster_name").await?,
        "it's quoted"
    );

    assert_eq!(
        default
            .psql("postgres", "SHOW max_prepared_transactions")
            .await?,
        "64"
    );
    default
        .psql(
            "postgres",
            "CREATE TABLE t (x int); BEGIN; INSERT INTO t VALUES (1); PREPARE TRANSACTION 'x'; \
             COMMIT PREPARED 'x';",
        )
        .await?;
    assert_eq!(
        default
            .query_scalar::<i64>("postgres", "SELECT count(*) FROM t")
            .await?,
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_survives_a_killed_postmaster() -> anyhow::Result<()> {
    let mut pg = PgCluster::start().await?;
    let port = pg.port();
    let first_pid = pg.postmaster_pid()?;
    // synchronous_commit=on so the commit is in the WAL file (the OS cache,
    // with fsync=off) rather than in shared memory when the postmaster dies.
    pg.psql(
        "postgres",
        "SET synchronous_commit = on;
         CREATE TABLE survivors (id int);
         INSERT INTO survivors SELECT generate_series(1, 100);",
    )
    .await?;
    // Keep a backend busy so the kill also orphans it.
    let pool = pg.pool("postgres").await?;
    let busy = tokio::spawn({
        let pool = pool.clone();
        async move { sqlx::query("SELECT pg_sleep(60)").execute(&pool).await }
    });
    wait_until("pg_sleep to be running", WAIT, || async {
        Ok(pg
            .query_scalar::<i64>(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
            )
            .await?
            == 1)
    })
    .await?;

    pg.kill_postmaster().await?;
    assert!(!pg.is_running());
    assert!(
        pg.psql("postgres", "SELECT 1").await.is_err(),
        "the server still answers after kill_postmaster"
    );
    let busy_result = busy.await?;
    assert!(
        busy_result.is_err(),
        "the orphaned query should have failed"
    );
    pool.close().await;

    pg.restart().await?;
    assert_eq!(pg.port(), port);
    assert_ne!(pg.postmaster_pid()?, first_pid);
    assert_eq!(
        pg.query_scalar::<i64>("postgres", "SELECT sum(id) FROM survivors")
            .await?,
        5050
    );
    assert!(
        pg.log().contains("database system was interrupted"),
        "no crash recovery in the log:\n{}",
        pg.log()
    );

    // A clean stop and start keeps the data too.
    pg.stop().await?;
    assert!(pg.psql("postgres", "SELECT 1").await.is_err());
    pg.restart().await?;
    assert_eq!(
        pg.query_scalar::<i64>("postgres", "SELECT count(*) FROM survivors")
            .await?,
        100
    );
    Ok(())
}

// etcd keys and values go through its JSON gateway base64-encoded.
const KEY_B64: &str = "ZmxvdGlsbGEvc21va2U="; // "flotilla/smoke"
const VALUE_B64: &str = "cmVwbGljYXRlZA=="; // "replicated"

async fn etcd_put(endpoint: std::net::SocketAddr) -> anyhow::Result<()> {
    let body = format!(r#"{{"key":"{KEY_B64}","value":"{VALUE_B64}"}}"#);
    let response = http::post_json(endpoint, "/v3/kv/put", &body).await?;
    anyhow::ensure!(response.status == 200, "put failed: {response:?}");
    Ok(())
}

async fn etcd_get_has_value(endpoint: std::net::SocketAddr) -> anyhow::Result<bool> {
    let body = format!(r#"{{"key":"{KEY_B64}"}}"#);
    let response = http::post_json(endpoint, "/v3/kv/range", &body).await?;
    anyhow::ensure!(response.status == 200, "range failed: {response:?}");
    Ok(response.body.contains(VALUE_B64))
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_single_member_serves_and_restarts() -> anyhow::Result<()> {
    let mut etcd = Etcd::start_single().await?;
    assert_eq!(etcd.endpoints(), vec![etcd.endpoint()]);
    assert_eq!(etcd.endpoint(), format!("http://127.0.0.1:{}", etcd.port()));
    assert!(etcd_health(etcd.client_addr()).await?);

    assert!(!etcd_get_has_value(etcd.client_addr()).await?);
    etcd_put(etcd.client_addr()).await?;
    assert!(etcd_get_has_value(etcd.client_addr()).await?);

    etcd.kill()?;
    assert!(
        etcd_health(etcd.client_addr()).await.is_err(),
        "etcd still answers"
    );
    etcd.restart().await?;
    assert!(etcd.is_healthy().await);
    assert!(
        etcd_get_has_value(etcd.client_addr()).await?,
        "the key did not survive the restart"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_three_member_cluster_replicates_and_tolerates_a_dead_member() -> anyhow::Result<()> {
    let mut cluster = EtcdCluster::start(3).await?;
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.len(), 3);
    assert_eq!(endpoints.iter().collect::<BTreeSet<_>>().len(), 3);
    for i in 0..3 {
        assert!(
            etcd_health(cluster.client_addr(i)).await?,
            "member {i} unhealthy"
        );
        // Every member knows all three.
        let members = http::post_json(cluster.client_addr(i), "/v3/cluster/member/list", "{}")
            .await?
            .body;
        for endpoint in &endpoints {
            assert!(
                members.contains(endpoint.as_str()),
                "{endpoint} missing in {members}"
            );
        }
    }

    etcd_put(cluster.client_addr(0)).await?;
    // Ranges are linearizable: a write through member 0 is visible on 2.
    assert!(etcd_get_has_value(cluster.client_addr(2)).await?);

    cluster.kill_member(1)?;
    assert!(!cluster.is_healthy(1).await);
    // Two of three keep a quorum (after an election if 1 was the leader).
    for i in [0, 2] {
        cluster.wait_healthy(i, WAIT).await?;
    }
    cluster.restart_member(1).await?;
    let addr = cluster.client_addr(1);
    wait_until(
        "the restarted member to serve the key",
        WAIT,
        || async move { etcd_get_has_value(addr).await },
    )
    .await?;

    // A paused member looks dead to its clients; resuming brings it back.
    cluster.pause_member(2)?;
    assert!(!cluster.is_healthy(2).await);
    cluster.resume_member(2)?;
    cluster.wait_healthy(2, WAIT).await?;
    Ok(())
}

async fn start_echo_server() -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", free_port())).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    Ok(addr)
}

async fn echo_round_trip(stream: &mut TcpStream, message: &[u8]) -> anyhow::Result<()> {
    stream.write_all(message).await?;
    let mut buf = vec![0; message.len()];
    tokio::time::timeout(WAIT, stream.read_exact(&mut buf))
        .await
        .context("echo timed out")??;
    anyhow::ensure!(buf == message, "echoed {buf:?}, sent {message:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_proxy_forwards_delays_cuts_and_heals() -> anyhow::Result<()> {
    let echo = start_echo_server().await?;
    let proxy = TcpProxy::start(echo).await?;
    assert_ne!(proxy.addr(), echo);
    assert_eq!(proxy.upstream(), echo);

    let mut conn = TcpStream::connect(proxy.addr()).await?;
    echo_round_trip(&mut conn, b"hello through the proxy").await?;
    assert_eq!(proxy.active_connections(), 1);

    // Both directions are delayed.
    proxy.delay(Duration::from_millis(300));
    let started = Instant::now();
    echo_round_trip(&mut conn, b"slow").await?;
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    proxy.delay(Duration::ZERO);
    echo_round_trip(&mut conn, b"fast again").await?;

    proxy.cut().await?;
    assert!(proxy.is_cut());
    assert_eq!(proxy.active_connections(), 0);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, conn.read(&mut buf))
        .await
        .context("the cut connection stayed open")?;
    assert!(matches!(read, Ok(0) | Err(_)), "read {read:?} after cut");
    let refused = TcpStream::connect(proxy.addr()).await;
    assert!(refused.is_err(), "a new connection got through a cut proxy");

    proxy.heal().await?;
    let mut conn = TcpStream::connect(proxy.addr()).await?;
    echo_round_trip(&mut conn, b"healed").await?;
    assert_eq!(proxy.accepted_connections(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_log_signal_and_exit() -> anyhow::Result<()> {
    let mut shell = FlotillaProcess::spawn_program(
        "sh",
        &[
            "-c",
            "echo ready; echo \"$SMOKE_VAR\"; trap 'echo got-term; exit 7' TERM; \
             while :; do sleep 0.05; done",
        ],
        &[("SMOKE_VAR", "from-the-env")],
    )?;
    shell.wait_for_log("ready", WAIT).await?;
    shell.wait_for_log("from-the-env", WAIT).await?;
    assert!(shell.log_path().starts_with(shell.dir()));

    let pid = shell.pid();
    shell.stop()?;
    wait_until("the shell to be stopped", WAIT, || async move {
        Ok(process_state(pid) == Some('T'))
    })
    .await?;
    shell.cont()?;
    wait_until("the shell to run again", WAIT, || async move {
        Ok(!matches!(process_state(pid), Some('T') | None))
    })
    .await?;
    let status = shell.terminate().await?;
    assert_eq!(status.code(), Some(7));
    assert!(shell.log().contains("got-term"));
    assert!(!shell.is_running());

    // Waiting for a line from a process that already exited fails fast and
    // shows what it did print.
    let short = FlotillaProcess::spawn_program("sh", &["-c", "echo bye-bye"], &[])?;
    let started = Instant::now();
    let err = short.wait_for_log("never printed", WAIT).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(format!("{err:#}").contains("bye-bye"), "{err:#}");

    let mut sleeper = FlotillaProcess::spawn_program("sleep", &["1000"], &[])?;
    assert!(
        sleeper
            .wait_exit(Duration::from_millis(200))
            .await
            .is_none()
    );
    let status = sleeper.kill()?;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_flotilla_binary_runs() -> anyhow::Result<()> {
    let output = run_flotilla(&["--help"], &[]).await?;
    assert!(output.success(), "{output}");

    let mut process = FlotillaProcess::spawn(&["--help"], &[])?;
    let status = process
        .wait_exit(WAIT)
        .await
        .context("flotilla --help did not exit")?;
    assert!(status.success(), "{status}\n{}", process.log());
    Ok(())
}
