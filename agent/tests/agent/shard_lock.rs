//! One agent per shard: the shard's agent lock (a session-level advisory lock).
//! Runs when `FLOTILLA_TEST_PG_URL` is set; otherwise each test prints a note and passes.

use std::time::Duration;

use crate::common::*;
use flotilla_agent::{AgentConfig, AgentError};
use flotilla_core::pb;
use flotilla_core::pb::agent_message::Body as Out;
use flotilla_core::pb::coordinator_message::Body as In;
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPool};

/// The session holding the agent lock of the database, and whether a session waits for it.
async fn lock_sessions(pool: &PgPool) -> (Option<i32>, bool) {
    let rows: Vec<(i32, bool)> = sqlx::query_as(
        "SELECT pid, granted FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND ((classid::bigint << 32) | objid::bigint) = hashtext('flotilla.agent')::bigint",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    (
        rows.iter().find(|r| r.1).map(|r| r.0),
        rows.iter().any(|r| !r.1),
    )
}

async fn application_of(pool: &PgPool, pid: i32) -> String {
    sqlx::query_scalar("SELECT application_name FROM pg_stat_activity WHERE pid = $1")
        .bind(pid)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_second_agent_on_the_same_shard_is_refused() {
    let Some(f) = fleet("shard_taken", 1).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (_s, _) = h.attach(1).await;
    let (holder, _) = lock_sessions(&f.pool).await;
    let holder = holder.expect("the agent holds the lock");
    assert_eq!(application_of(&f.pool, holder).await, "flotilla-agent");

    // the same name, a second process: refused by the lock
    let second = AgentConfig::new("shard-test", &f.dsn, "http://127.0.0.1:1");
    let err = tokio::time::timeout(
        WAIT,
        flotilla_agent::start(second.clone(), std::future::pending()),
    )
    .await
    .expect("refused in time")
    .unwrap_err();
    assert!(matches!(&err, AgentError::ShardTaken { shard, .. } if shard == "shard-test"));
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "shard shard-test: another Flotilla agent is already attached to this shard database \
             (session pid {holder}, application_name flotilla-agent, client 127.0.0.1:"
        )),
        "{text}"
    );

    // another name, the same database (a copied DSN): the database is shard-test's, and
    // the refusal names both before the lock is even tried
    let other = AgentConfig::new("shard-other", &f.dsn, "http://127.0.0.1:1");
    let err = tokio::time::timeout(WAIT, flotilla_agent::start(other, std::future::pending()))
        .await
        .expect("refused in time")
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::WrongShard { shard, recorded, .. }
            if shard == "shard-other" && recorded == "shard-test"),
        "{err}"
    );

    h.stop().await;
    // released at shutdown: the next agent starts at once
    assert_eq!(lock_sessions(&f.pool).await.0, None);
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "p".into(),
        migrations: bench_migrations(),
        ..Default::default()
    }));
    let r = s
        .assign("p", 1, 1, vec![run(1, "tenant_0000", &BENCH, true)])
        .await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied; 3]);
    h.stop().await;
    f.drop().await;
}

/// Messages other than heartbeats within `wait`, if any.
async fn quiet_for(s: &mut Stream, wait: Duration) -> Option<Out> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.inbound.message()).await {
            Err(_) => return None,
            Ok(msg) => match msg.expect("stream ok").expect("stream open").body {
                // heartbeats and the fleet-view reports say nothing about runs
                Some(Out::Heartbeat(_) | Out::Journal(_) | Out::Schema(_) | Out::Tenants(_))
                | None => continue,
                Some(other) => return Some(other),
            },
        }
    }
}

#[tokio::test]
async fn an_agent_that_lost_its_lock_takes_no_runs_until_it_holds_it_again() {
    let Some(f) = fleet("lock_lost", 2).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "p".into(),
        migrations: bench_migrations(),
        ..Default::default()
    }));
    let agent_pid = lock_sessions(&f.pool).await.0.expect("the agent holds it");
    let (other, _) = lose_the_lock_to_another_session(&f, agent_pid).await;

    s.send(In::Assign(pb::Assign {
        plan_id: "p".into(),
        epoch: 1,
        lanes: 1,
        runs: vec![run(1, "tenant_0000", &BENCH, true)],
    }));
    let early = quiet_for(&mut s, Duration::from_millis(1500)).await;
    assert!(early.is_none(), "ran without the lock: {early:?}");
    assert_eq!(
        count(&f.pool, "SELECT count(*) FROM flotilla.journal").await,
        0
    );

    // the other session goes away: the agent takes the lock again and runs what waited
    other.close().await.unwrap();
    let r = s.results("p", 1).await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied; 3]);
    let holder = lock_sessions(&f.pool).await.0.expect("held again");
    assert_ne!(holder, agent_pid);
    assert_eq!(application_of(&f.pool, holder).await, "flotilla-agent");
    h.stop().await;
    f.drop().await;
}

/// An agent that lost its lock while an agent of a newer release took the shard and upgraded
/// its flotilla schema does not serve the shard when it takes the lock back (it would not
/// heed what the newer schema records): it lets the lock go and takes no runs, until the
/// schema is one it knows.
#[tokio::test]
async fn an_agent_that_takes_its_lock_back_over_a_newer_schema_takes_no_runs() {
    let Some(f) = fleet("lock_newer", 1).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "p".into(),
        migrations: bench_migrations(),
        ..Default::default()
    }));
    let agent_pid = lock_sessions(&f.pool).await.0.expect("the agent holds it");
    // the newer agent: holds the lock, upgrades the schema, goes away
    let (mut other, mark) = lose_the_lock_to_another_session(&f, agent_pid).await;
    sqlx::query(
        "UPDATE flotilla.meta SET value = (value::int + 1)::text WHERE key = 'schema_version'",
    )
    .execute(&mut other)
    .await
    .unwrap();
    other.close().await.unwrap();
    wait_for_log(
        mark,
        "the shard's flotilla schema is newer than this agent's",
    )
    .await;

    s.send(In::Assign(pb::Assign {
        plan_id: "p".into(),
        epoch: 1,
        lanes: 1,
        runs: vec![run(1, "tenant_0000", &BENCH, true)],
    }));
    let early = quiet_for(&mut s, Duration::from_millis(1500)).await;
    assert!(early.is_none(), "ran over a newer schema: {early:?}");
    assert_eq!(
        count(&f.pool, "SELECT count(*) FROM flotilla.journal").await,
        0
    );
    // the lock is let go each time, not kept from a newer agent
    let mut newer_agent = PgConnection::connect(&f.dsn).await.unwrap();
    flotilla_testkit::wait::wait_until("the agent lock free", WAIT, async || {
        Ok(
            sqlx::query_scalar::<_, bool>(
                "SELECT pg_try_advisory_lock(hashtext('flotilla.agent'))",
            )
            .fetch_one(&mut newer_agent)
            .await
            .unwrap(),
        )
    })
    .await
    .expect("the lock let go");
    newer_agent.close().await.unwrap();

    // the schema is one it knows again: it takes the lock and runs what waited
    sqlx::query(
        "UPDATE flotilla.meta SET value = (value::int - 1)::text WHERE key = 'schema_version'",
    )
    .execute(&f.pool)
    .await
    .unwrap();
    let r = s.results("p", 1).await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied; 3]);
    h.stop().await;
    f.drop().await;
}

/// Another session queues for the shard's agent lock, then the agent's lock session dies:
/// the lock passes to the waiting session (as it would to a second agent), which is
/// returned with the log mark from before the agent lost it, once the agent said so.
async fn lose_the_lock_to_another_session(f: &Fleet, agent_pid: i32) -> (PgConnection, usize) {
    let mut other = PgConnection::connect(&f.dsn).await.unwrap();
    let waiting = tokio::spawn(async move {
        sqlx::query("SELECT pg_advisory_lock(hashtext('flotilla.agent'))")
            .execute(&mut other)
            .await
            .unwrap();
        other
    });
    flotilla_testkit::wait::wait_until("a session waiting for the agent lock", WAIT, async || {
        Ok(lock_sessions(&f.pool).await.1)
    })
    .await
    .expect("waiting");
    let mark = log_mark();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(agent_pid)
        .execute(&f.pool)
        .await
        .unwrap();
    let other = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("lock passed on")
        .unwrap();
    // the agent checks its lock's connection every second; it says when it finds it gone
    wait_for_log(mark, "lost the connection holding the shard's agent lock").await;
    (other, mark)
}

/// The agent's connections to its shard probe a database that vanished from the network
/// (a dead host, a partition): every session the agent holds on the shard, the agent lock's
/// and the pool's, is on a socket with TCP keepalives and a user timeout. Without them a
/// statement in flight waits for its answer for ever (the driver sets none itself).
#[tokio::test]
async fn the_agents_connections_to_its_shard_probe_a_vanished_database() {
    let Some(f) = fleet("keepalive", 1).await else {
        return;
    };
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "p".into(),
        migrations: bench_migrations(),
        ..Default::default()
    }));
    s.send(In::Assign(pb::Assign {
        plan_id: "p".into(),
        epoch: 1,
        lanes: 1,
        runs: vec![run(1, "tenant_0000", &BENCH, true)],
    }));
    let r = s.results("p", 1).await;
    assert_eq!(outcomes(&r[&1]), [pb::StepOutcome::Applied; 3]);

    // the agent's sessions (its lock's, its pool's), by the port they come from
    let ports: Vec<i32> = sqlx::query_scalar(
        "SELECT client_port FROM pg_stat_activity \
         WHERE application_name = 'flotilla-agent' AND datname = current_database()",
    )
    .fetch_all(&f.pool)
    .await
    .unwrap();
    if ports.iter().any(|&p| p < 0) {
        eprintln!("note: the test shard is on a Unix socket; TCP keepalives not checked");
        h.stop().await;
        f.drop().await;
        return;
    }
    assert!(
        ports.len() >= 2,
        "the lock's session and a pooled one: {ports:?}"
    );
    for port in ports {
        let fd = socket_from_local_port(port as u16)
            .unwrap_or_else(|| panic!("no socket of this process from port {port}"));
        let (keepalive, idle, user_timeout_ms) = tcp_keepalive_of(fd);
        assert!(keepalive, "session from port {port} has no keepalive");
        assert_eq!((idle, user_timeout_ms), (15, 30_000), "port {port}");
    }
    h.stop().await;
    f.drop().await;
}

/// The socket of this process bound to local `port`.
fn socket_from_local_port(port: u16) -> Option<i32> {
    std::fs::read_dir("/proc/self/fd").ok()?.find_map(|e| {
        let fd: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        // SAFETY: a sockaddr_storage and its size, as getsockname expects; a number that is
        // not a socket (or closed) is an error.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let rc = unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &raw mut len) };
        if rc != 0 || i32::from(addr.ss_family) != libc::AF_INET {
            return None;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let inet: libc::sockaddr_in = unsafe { std::ptr::read((&raw const addr).cast()) };
        (u16::from_be(inet.sin_port) == port).then_some(fd)
    })
}

/// (SO_KEEPALIVE, TCP_KEEPIDLE seconds, TCP_USER_TIMEOUT ms) of a socket.
fn tcp_keepalive_of(fd: i32) -> (bool, i32, i32) {
    let get = |level, name| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a c_int and its size, as getsockopt expects.
        let rc =
            unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
        assert_eq!(rc, 0, "getsockopt on fd {fd}");
        value
    };
    (
        get(libc::SOL_SOCKET, libc::SO_KEEPALIVE) != 0,
        get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
        get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    )
}

/// A database dropped and made again under the agent (a restore from a dump begins with
/// that) is not the one the agent started on: taking its lock back there, the agent takes no
/// runs (it ran steps on a database still being restored: tables not there yet), and says
/// to restart it once the database is whole again. Nothing is written to the new database.
#[tokio::test]
async fn an_agent_takes_no_runs_on_a_database_made_again_under_it() {
    // Alone: the log lines it waits for ("lost the connection ...") are those the other lock
    // tests wait for too, and the log is the process's.
    if !alone_in_child_process(
        "shard_lock::an_agent_takes_no_runs_on_a_database_made_again_under_it",
    ) {
        return;
    }
    let Some(mut f) = fleet("lock_replaced", 1).await else {
        return;
    };
    let mark = log_mark();
    let mut h = Harness::start(|_| {}, &f.dsn).await;
    let (mut s, _) = h.attach(1).await;
    f.replace().await;
    // (the runs sent before the agent noticed went to the new database as they would to a
    // restarted one: the lock's check, every second, is what notices)
    wait_for_log(mark, "lost the connection holding the shard's agent lock").await;
    // a restore's first part: the schemas, flotilla's with its version (the tenants' tables
    // and the journal's rows not there yet)
    sqlx::raw_sql(
        "CREATE SCHEMA flotilla; CREATE TABLE flotilla.meta (key text PRIMARY KEY, value text); \
         INSERT INTO flotilla.meta VALUES ('schema_version', '4'), ('shard', 'shard-test'); \
         CREATE SCHEMA tenant_0000;",
    )
    .execute(&f.pool)
    .await
    .unwrap();
    s.send(In::Plan(pb::PlanDefinition {
        plan_id: "p".into(),
        migrations: bench_migrations(),
        ..Default::default()
    }));
    s.send(In::Assign(pb::Assign {
        plan_id: "p".into(),
        epoch: 1,
        lanes: 1,
        runs: vec![run(1, "tenant_0000", &BENCH, true)],
    }));
    let early = quiet_for(&mut s, Duration::from_millis(3000)).await;
    assert!(early.is_none(), "ran on the new database: {early:?}");
    wait_for_log(mark, "is not the one this agent started on").await;
    let written: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'flotilla'::regnamespace",
    )
    .fetch_one(&f.pool)
    .await
    .unwrap();
    assert_eq!(
        written, 2,
        "nothing written to the new database but its meta (and key)"
    );
    h.stop().await;
    f.drop().await;
}
