//! Issue 14, "Secrets" and "Least privilege": canary passwords given to every process the way
//! an operator would (a password file, the environment, a store password file), forced
//! failures on every path that could echo one (a wrong password, an unreachable shard, a
//! panic, a password in argv, debug logging), then every place a secret could land is read:
//! each process's output, every etcd key and value, every control-store row, the status JSON
//! and the metrics. The agents run as the role of deploy/sql/agent-role.sql.
use std::net::SocketAddr;

use anyhow::Context;
use serde_json::Value;

use crate::fleet::{Cli, MigrationDir, TestFleet, WAIT, coord_dbmate_dir, tenant_name, tenant_sql};
use crate::harness::least_privilege::create_agent_role;
use crate::harness::{
    CommandOutput, Etcd, FlotillaProcess, PgCluster, TestDir, free_port, http, run_flotilla,
    wait_until,
};

/// shard_0's password, in its agent's password file.
const CANARY_FILE: &str = "canaryFile7f3a91";
/// shard_1's password, in its agent's environment (FLOTILLA_SHARD_PASSWORD).
const CANARY_ENV: &str = "canaryEnv52d0c4";
/// The control store's password, in the coordinator's --store-password-file.
const CANARY_STORE: &str = "canaryStoreE61b27";
/// A wrong password (an agent and a coordinator are given it).
const CANARY_WRONG: &str = "canaryWrongA4e810";
const CANARIES: [&str; 4] = [CANARY_FILE, CANARY_ENV, CANARY_STORE, CANARY_WRONG];

const DEBUG: (&str, &str) = ("RUST_LOG", "debug");
/// Set on the agents of the forced failures: they start beside the serving agent of the
/// same shard, whose metrics port they must not try to take.
const NO_METRICS: (&str, &str) = ("FLOTILLA_TEST_NO_METRICS", "1");

/// Everything read back, by where it came from.
#[derive(Default)]
struct Evidence(Vec<(String, String)>);

impl Evidence {
    fn add(&mut self, place: impl Into<String>, text: impl Into<String>) {
        self.0.push((place.into(), text.into()));
    }

    fn output(&mut self, place: &str, out: &CommandOutput) {
        self.add(format!("{place} (stdout)"), out.stdout.clone());
        self.add(format!("{place} (stderr)"), out.stderr.clone());
    }

    /// Fails naming the place and the canary, with the line that holds it.
    fn assert_no_canary(&self) {
        for (place, text) in &self.0 {
            for canary in CANARIES {
                if let Some(line) = text.lines().find(|l| l.contains(canary)) {
                    panic!("{canary} leaked into {place}: {line}");
                }
            }
        }
    }

    fn text_of(&self, place: &str) -> String {
        self.0
            .iter()
            .filter(|(p, _)| p.starts_with(place))
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits: Vec<u32> = text.bytes().filter_map(value).collect();
    let mut out = Vec::new();
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | (d << (18 - 6 * i)));
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// Every key and value in etcd, decoded, one `key = value` a line.
async fn etcd_dump(etcd: &Etcd) -> anyhow::Result<(usize, String)> {
    // key "\0" with range_end "\0": every key
    let r = http::post_json(
        etcd.client_addr(),
        "/v3/kv/range",
        r#"{"key":"AA==","range_end":"AA=="}"#,
    )
    .await?;
    anyhow::ensure!(r.status == 200, "etcd range: {r:?}");
    let v: Value = serde_json::from_str(&r.body)?;
    let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
    let mut text = String::new();
    for kv in &kvs {
        let key = base64_decode(kv["key"].as_str().unwrap_or(""));
        let value = base64_decode(kv["value"].as_str().unwrap_or(""));
        text.push_str(&format!(
            "{} = {}\n",
            String::from_utf8_lossy(&key),
            String::from_utf8_lossy(&value)
        ));
    }
    Ok((kvs.len(), text))
}

/// Every row of every table of the control store, as text.
async fn store_dump(pg: &PgCluster) -> anyhow::Result<(usize, String)> {
    let tables = pg
        .query_rows(
            "control",
            "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name)
               FROM information_schema.tables
              WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
        )
        .await?;
    let mut rows = 0;
    let mut text = String::new();
    for table in tables.iter().map(|r| r[0].clone()) {
        for row in pg
            .query_rows("control", &format!("SELECT t::text FROM {table} t"))
            .await?
        {
            rows += 1;
            text.push_str(&format!("{table}: {}\n", row.join("|")));
        }
    }
    Ok((rows, text))
}

async fn metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let r = http::get(addr, "/metrics").await?;
    anyhow::ensure!(r.status == 200, "metrics at {addr}: {r:?}");
    Ok(r.body)
}

fn metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

#[tokio::test(flavor = "multi_thread")]
async fn no_canary_password_leaves_any_process() -> anyhow::Result<()> {
    let pg = PgCluster::start().await?;
    let secrets = TestDir::new("canaries")?;
    for s in 0..2 {
        let db = format!("shard_{s}");
        pg.create_database(&db).await?;
        let sql: String = (0..2)
            .map(|t| tenant_sql(&tenant_name(s, t, 2), 5))
            .collect();
        pg.psql(&db, &sql).await?;
    }
    let shard0 = create_agent_role(&pg, "shard_0", "tenant_%", CANARY_FILE, secrets.path()).await?;
    let shard1 = create_agent_role(&pg, "shard_1", "tenant_%", CANARY_ENV, secrets.path()).await?;
    // the control store's own role, owner of its database
    pg.psql(
        "postgres",
        &format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE flotilla_store LOGIN PASSWORD '{CANARY_STORE}';
             CREATE DATABASE control OWNER flotilla_store;"
        ),
    )
    .await?;
    // Everyone but the harness's superuser authenticates with a password from now on.
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba)?;
    std::fs::write(
        &hba,
        format!(
            "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n{old}"
        ),
    )?;
    pg.psql("postgres", "SELECT pg_reload_conf()").await?;
    wait_until("pg_hba.conf reloaded", WAIT, async || {
        use sqlx::Connection;
        Ok(sqlx::PgConnection::connect(&shard0.dsn).await.is_err())
    })
    .await?;

    let write = |name: &str, text: &str| -> anyhow::Result<String> {
        let path = secrets.join(name);
        std::fs::write(&path, format!("{text}\n"))?;
        Ok(path.to_string_lossy().into_owned())
    };
    let store_password = write("store.password", CANARY_STORE)?;
    let wrong_password = write("wrong.password", CANARY_WRONG)?;
    let shard0_password = shard0.password_file.to_string_lossy().into_owned();
    let store = format!("postgres://flotilla_store@127.0.0.1:{}/control", pg.port());

    let etcd = Etcd::start_single().await?;
    let etcd_endpoint = etcd.endpoint();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let addr = format!("http://{listen}");
    let coordinator_metrics = metrics_addr();
    let coordinator_metrics_flag = coordinator_metrics.to_string();
    let coordinator = FlotillaProcess::spawn(
        &[
            "coordinator",
            "--listen",
            &listen,
            "--store",
            &store,
            "--store-password-file",
            &store_password,
            "--etcd",
            &etcd_endpoint,
            "--metrics",
            &coordinator_metrics_flag,
        ],
        &[DEBUG],
    )?;
    coordinator
        .wait_for_log("coordinator listening", WAIT)
        .await?;

    let agent_metrics = [metrics_addr(), metrics_addr()];
    // Only the two agents that serve get --metrics; the others would find its port taken.
    let agent = |s: usize,
                 dsn: &str,
                 password_file: Option<&str>,
                 envs: &[(&str, &str)]|
     -> anyhow::Result<FlotillaProcess> {
        let shard = format!("shard_{s}");
        let metrics = agent_metrics.get(s).map(|m| m.to_string());
        let mut args = vec![
            "--coordinator",
            &addr,
            "agent",
            "--shard",
            &shard,
            "--dsn",
            dsn,
            "--tenant-pattern",
            "tenant_%",
            "--etcd",
            &etcd_endpoint,
        ];
        if let Some(metrics) = &metrics
            && envs.iter().all(|(k, _)| *k != "FLOTILLA_TEST_NO_METRICS")
        {
            args.extend(["--metrics", metrics]);
        }
        if let Some(file) = password_file {
            args.extend(["--password-file", file]);
        }
        let mut all = vec![DEBUG];
        all.extend_from_slice(envs);
        FlotillaProcess::spawn(&args, &all)
    };
    let agent0 = agent(0, &shard0.dsn, Some(&shard0_password), &[])?;
    let agent1 = agent(
        1,
        &shard1.dsn,
        None,
        &[("FLOTILLA_SHARD_PASSWORD", CANARY_ENV)],
    )?;
    let cli = async |args: &[&str]| -> anyhow::Result<CommandOutput> {
        let mut all = vec!["--coordinator", addr.as_str()];
        all.extend_from_slice(args);
        run_flotilla(&all, &[DEBUG]).await
    };
    wait_until("both agents attached", WAIT, async || {
        let out = cli(&["fleet", "list", "--output", "json"]).await?;
        let v: Value = out.last_json()?;
        Ok(v.as_array()
            .map(|a| a.iter().filter(|x| x["connected"] == true).count())
            == Some(2))
    })
    .await?;

    let mut evidence = Evidence::default();
    // A plan that completes, and one that fails on every target.
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = cli(&["plan", "submit", &dir, "--wait", "--output", "json"]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let done: Value = out.last_json()?;
    evidence.output("plan submit", &out);
    let failing = MigrationDir::new()?;
    failing.migration("20990101000000_fails", "", "SELECT 1 / 0", "SELECT 1")?;
    let path = failing.path().to_string_lossy().into_owned();
    let out = cli(&["plan", "submit", &path, "--wait", "--output", "json"]).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    let failed: Value = out.last_json()?;
    evidence.output("failing plan submit", &out);

    // The forced failures.
    // 1. A wrong password: the agent stops, saying so.
    let mut wrong = agent(0, &shard0.dsn, Some(&wrong_password), &[NO_METRICS])?;
    let status = wrong
        .wait_exit(WAIT)
        .await
        .context("wrong password: still running")?;
    assert_eq!(status.code(), Some(3), "{}", wrong.log());
    assert!(
        wrong.log().contains("password authentication failed"),
        "{}",
        wrong.log()
    );
    // 1b. A database that does not exist: the agent stops at once, naming it (before, it
    // retried forever as if the shard were starting).
    let no_db = shard0.dsn.replace("/shard_0", "/no_such_db");
    assert_ne!(no_db, shard0.dsn);
    let mut missing = agent(0, &no_db, Some(&shard0_password), &[NO_METRICS])?;
    let status = missing
        .wait_exit(WAIT)
        .await
        .context("missing database: still running")?;
    assert_eq!(status.code(), Some(3), "{}", missing.log());
    assert!(
        missing
            .log()
            .contains("database \"no_such_db\" does not exist"),
        "{}",
        missing.log()
    );
    // 2. An unreachable shard: the agent retries, naming where.
    let nowhere = format!(
        "postgres://{}@127.0.0.1:{}/shard_0",
        shard0.role,
        free_port()
    );
    let mut unreachable = agent(2, &nowhere, Some(&shard0_password), &[])?;
    unreachable
        .wait_for_log("shard not reachable yet", WAIT)
        .await?;
    unreachable.kill()?;
    // 3. A panic whose message holds the configuration and the password itself.
    let mut panicking = agent(
        0,
        &shard0.dsn,
        Some(&shard0_password),
        &[("FAILPOINTS", "agent::panic_at_start=return"), NO_METRICS],
    )?;
    let status = panicking
        .wait_exit(WAIT)
        .await
        .context("panic: still running")?;
    assert_eq!(status.code(), Some(101), "{}", panicking.log());
    assert!(
        panicking.log().contains("failpoint agent::panic_at_start"),
        "{}",
        panicking.log()
    );
    // 4. Passwords in argv: refused, without echoing them.
    let in_dsn = format!(
        "postgres://{}:{CANARY_FILE}@127.0.0.1:{}/shard_0",
        shard0.role,
        pg.port()
    );
    let out = run_flotilla(&["agent", "--shard", "shard_0", "--dsn", &in_dsn], &[DEBUG]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    evidence.output("agent with a password in --dsn", &out);
    let in_store = format!(
        "postgres://flotilla_store:{CANARY_STORE}@127.0.0.1:{}/control",
        pg.port()
    );
    let out = run_flotilla(
        &[
            "coordinator",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--store",
            &in_store,
        ],
        &[DEBUG],
    )
    .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("--store-password-file"), "{out}");
    evidence.output("coordinator with a password in --store", &out);
    // 5. The store's password wrong: the coordinator cannot open it, and says why.
    let out = run_flotilla(
        &[
            "coordinator",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--store",
            &store,
            "--store-password-file",
            &wrong_password,
        ],
        &[DEBUG],
    )
    .await?;
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(
        out.stderr.contains("password authentication failed"),
        "{out}"
    );
    evidence.output("coordinator with a wrong store password", &out);

    // What the operator sees.
    for (place, args) in [
        (
            "plan status",
            vec![
                "plan",
                "status",
                done["plan_id"].as_str().unwrap_or_default(),
                "--output",
                "json",
            ],
        ),
        (
            "failed plan status",
            vec![
                "plan",
                "status",
                failed["plan_id"].as_str().unwrap_or_default(),
                "--output",
                "json",
            ],
        ),
        ("plan list", vec!["plan", "list", "--output", "json"]),
        ("fleet list", vec!["fleet", "list", "--output", "json"]),
        ("fleet status", vec!["fleet", "status", "--output", "json"]),
        ("audit list", vec!["audit", "list", "--output", "json"]),
        ("locks list", vec!["locks", "list", "--output", "json"]),
    ] {
        let out = cli(&args).await?;
        assert!(out.success(), "{place}: {out}");
        evidence.output(place, &out);
    }
    assert!(
        evidence
            .text_of("failed plan status")
            .contains("division by zero"),
        "the failure is shown: {}",
        evidence.text_of("failed plan status")
    );
    evidence.add("coordinator metrics", metrics(coordinator_metrics).await?);
    for (s, addr) in agent_metrics.iter().enumerate() {
        evidence.add(format!("shard_{s} agent metrics"), metrics(*addr).await?);
    }
    let (keys, etcd_text) = etcd_dump(&etcd).await?;
    assert!(keys > 0, "etcd holds Flotilla's keys");
    evidence.add("etcd", etcd_text);
    let (rows, store_text) = store_dump(&pg).await?;
    assert!(rows > 0, "the control store holds rows");
    evidence.add("control store", store_text);
    // last: the processes' whole output, debug lines included
    for (place, process) in [
        ("coordinator", &coordinator),
        ("shard_0 agent", &agent0),
        ("shard_1 agent", &agent1),
        ("agent with a wrong password", &wrong),
        ("agent of an unreachable shard", &unreachable),
        ("agent that panicked", &panicking),
    ] {
        evidence.add(place, process.log());
    }
    assert!(
        evidence.text_of("coordinator").contains("DEBUG"),
        "debug logging was on"
    );
    // The least-privileged agents are not warned about being superusers.
    assert!(!evidence.text_of("shard_0 agent").contains("as a superuser"));
    evidence.assert_no_canary();

    // The role of deploy/sql/agent-role.sql reaches its own shard database only, and is no
    // superuser.
    {
        use sqlx::Connection;
        let other = format!(
            "postgres://{}:{CANARY_FILE}@127.0.0.1:{}/shard_1",
            shard0.role,
            pg.port()
        );
        let e = sqlx::PgConnection::connect(&other)
            .await
            .err()
            .context("shard_0's role connected to shard_1")?;
        assert!(e.to_string().contains("permission denied"), "{e}");
        let own = format!(
            "postgres://{}:{CANARY_FILE}@127.0.0.1:{}/shard_0",
            shard0.role,
            pg.port()
        );
        let mut conn = sqlx::PgConnection::connect(&own).await?;
        for refused in [
            "ALTER SYSTEM SET work_mem = '1MB'",
            "CREATE SCHEMA not_a_tenant",
            "CREATE DATABASE another",
        ] {
            let e = sqlx::query(refused)
                .execute(&mut conn)
                .await
                .err()
                .with_context(|| format!("the agent's role may {refused}"))?;
            assert!(
                e.to_string().contains("permission denied"),
                "{refused}: {e}"
            );
        }
        conn.close().await?;
    }
    let powers = pg
        .query_rows(
            "postgres",
            &format!(
                "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls
                   FROM pg_roles WHERE rolname = '{}'",
                shard0.role
            ),
        )
        .await?;
    assert_eq!(powers, [["f", "f", "f", "f", "f"]]);
    Ok(())
}

/// A shard's agent restarted on another database with no Flotilla journal (a copy made
/// before Flotilla ran there, a new one, a typo'd --dsn) is refused at attach, naming the
/// database and what this coordinator applied on the shard, and nothing runs there. Before,
/// it was taken: the shard's tenants read "nothing applied", and catch-ups ran every
/// migration again on the copy (walk-throughs). `fleet retire` first lets it join as new.
#[tokio::test(flavor = "multi_thread")]
async fn a_shard_agent_on_a_database_without_its_journal_is_refused() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(1, 1).await?;
    let (code, _, out) = fleet.submit_wait(&coord_dbmate_dir(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    fleet.pg.create_database("shard_0_copy").await?;
    fleet
        .pg
        .psql("shard_0_copy", &tenant_sql("tenant_0000", 1))
        .await?;
    fleet.agents[0].take().expect("the agent").kill()?;
    let copy_dsn = fleet.pg.url("shard_0_copy");
    let copy = fleet.spawn_agent_on(0, &copy_dsn)?;
    copy.wait_for_log("has no Flotilla journal", WAIT).await?;
    let log = copy.log();
    assert!(
        log.contains("/shard_0_copy")
            && log.contains("this coordinator's plans applied 3 step(s) on the shard")
            && log.contains("flotilla fleet retire shard_0"),
        "{log}"
    );
    let list = fleet.json(&["fleet", "list", "--output", "json"]).await?;
    assert_eq!(list[0]["connected"], false, "not taken: {list}");
    let on_copy: i64 = fleet
        .pg
        .query_scalar("shard_0_copy", "SELECT count(*) FROM flotilla.journal")
        .await?;
    assert_eq!(on_copy, 0, "nothing ran on the copy");
    // replaced on purpose: retired, the shard joins anew from the new database
    let out = fleet
        .cli(&["fleet", "retire", "shard_0", "--reason", "replaced"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let attached = async |fleet: &TestFleet| {
        crate::harness::wait_until("the new database's agent attached", WAIT, async || {
            let list = fleet.json(&["fleet", "list", "--output", "json"]).await?;
            Ok(list[0]["connected"] == true)
        })
        .await
    };
    attached(&fleet).await?;
    // and again after a restart, nothing run there yet (the steps before the retire are
    // not counted against it)
    drop(copy);
    crate::harness::wait_until("the agent gone", WAIT, async || {
        let list = fleet.json(&["fleet", "list", "--output", "json"]).await?;
        Ok(list[0]["connected"] == false)
    })
    .await?;
    let copy = fleet.spawn_agent_on(0, &copy_dsn)?;
    attached(&fleet).await?;
    assert!(
        !copy.log().contains("has no Flotilla journal"),
        "{}",
        copy.log()
    );
    drop(copy);
    Ok(())
}

/// A DSN copied from another agent's configuration points the agent at another shard's
/// database: refused at start, naming both shards, and nothing of that shard changes. An
/// agent running as a superuser is warned.
/// A second agent given an attached shard's name but another database is refused at
/// attach, its log naming both databases; the first keeps the shard, and a plan runs on the
/// first database only. Before, the two took the shard from each other at every attach,
/// the fleet's tenants flipping between the two databases, and a plan ran on whichever
/// held it.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_database_under_an_attached_shards_name_is_refused() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 1).await?;
    fleet.pg.create_database("shard_0_dup").await?;
    fleet
        .pg
        .psql("shard_0_dup", &tenant_sql("tenant_0900", 1))
        .await?;
    let dup_dsn = fleet.pg.url("shard_0_dup");
    let dup = FlotillaProcess::spawn(
        &[
            "--coordinator",
            &fleet.addr,
            "agent",
            "--shard",
            "shard_0",
            "--dsn",
            &dup_dsn,
            "--tenant-pattern",
            "tenant_%",
        ],
        &[],
    )?;
    dup.wait_for_log("two agents are given one shard name", WAIT)
        .await?;
    let log = dup.log();
    assert!(
        log.contains("/shard_0; this agent serves database") && log.contains("/shard_0_dup"),
        "{log}"
    );
    let list = fleet.json(&["fleet", "list", "--output", "json"]).await?;
    assert_eq!(
        list[0]["tenants"][0]["name"], "tenant_0000",
        "the first agent keeps the shard: {list}"
    );
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let (code, st, out) = fleet.submit_wait(&coord_dbmate_dir(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(st["targets"], 1, "tenant_0000 alone: {st}");
    let on_dup: i64 = fleet
        .pg
        .query_scalar("shard_0_dup", "SELECT count(*) FROM flotilla.journal")
        .await?;
    assert_eq!(on_dup, 0, "nothing ran on the second database");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copied_dsn_is_refused_naming_both_shards() -> anyhow::Result<()> {
    let fleet = crate::fleet::TestFleet::start(2, 1).await?;
    for agent in fleet.agents.iter().flatten() {
        assert!(agent.log().contains("as a superuser"), "{}", agent.log());
    }
    let fence_before: String = fleet
        .pg
        .query_scalar(
            "shard_0",
            "SELECT epoch || '@' || updated_at FROM flotilla.fence",
        )
        .await?;
    let copied = fleet.pg.url("shard_0");
    let out = run_flotilla(
        &[
            "--coordinator",
            &fleet.addr,
            "agent",
            "--shard",
            "shard_1",
            "--dsn",
            &copied,
            "--tenant-pattern",
            "tenant_%",
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("shard shard_1: database shard_0 belongs to shard shard_0"),
        "{out}"
    );
    let fence_after: String = fleet
        .pg
        .query_scalar(
            "shard_0",
            "SELECT epoch || '@' || updated_at FROM flotilla.fence",
        )
        .await?;
    assert_eq!(fence_before, fence_after);
    let recorded: String = fleet
        .pg
        .query_scalar(
            "shard_0",
            "SELECT value FROM flotilla.meta WHERE key = 'shard'",
        )
        .await?;
    assert_eq!(recorded, "shard_0");
    Ok(())
}

/// Issue 16: `--store sqlite://PATH`, the URL form people write, of a file that does not
/// exist yet: the coordinator creates it and serves.
#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_store_url_to_a_new_file_is_created() -> anyhow::Result<()> {
    let dir = TestDir::new("sqlite-url")?;
    let file = dir.join("fresh.db");
    let store = format!("sqlite://{}", file.to_string_lossy());
    let listen = format!("127.0.0.1:{}", free_port());
    let coordinator = FlotillaProcess::spawn(
        &["coordinator", "--listen", &listen, "--store", &store],
        &[],
    )?;
    coordinator
        .wait_for_log("coordinator listening", WAIT)
        .await?;
    assert!(file.exists(), "{} was not created", file.display());
    let out = run_flotilla(
        &[
            "--coordinator",
            &format!("http://{listen}"),
            "plan",
            "list",
            "--output",
            "json",
        ],
        &[],
    )
    .await?;
    assert!(out.success(), "{out}");
    Ok(())
}

/// A file that is not a database given as the store: the coordinator stops at once saying
/// so (it tried for 30 s, then said "pool timed out", the cause in sqlx's log lines only).
#[tokio::test(flavor = "multi_thread")]
async fn a_store_file_that_is_not_a_database_is_named_at_once() -> anyhow::Result<()> {
    let dir = TestDir::new("junk-store")?;
    let file = dir.join("notes.txt");
    std::fs::write(
        &file,
        "not a database, only a few words of text, long enough to read\n".repeat(100),
    )?;
    let listen = format!("127.0.0.1:{}", free_port());
    let out = run_flotilla(
        &[
            "coordinator",
            "--listen",
            &listen,
            "--store",
            &file.to_string_lossy(),
        ],
        &[],
    )
    .await?;
    assert!(!out.success(), "{out}");
    assert!(
        out.stderr.contains("file is not a database") && out.stderr.contains("notes.txt"),
        "{out}"
    );
    Ok(())
}

/// The etcd password over plaintext, from a file other users can read: the coordinator and
/// the agent each say both, naming the etcd address and the file with its mode (the password
/// went to `http://` etcd without a word), and read the password as every password file is
/// read, by its first line (a rotation note under it stays out), so etcd takes them.
#[tokio::test(flavor = "multi_thread")]
async fn an_etcd_password_in_plaintext_and_an_open_password_file_are_said() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    let etcd = Etcd::start_single().await?;
    etcd.enable_auth(None, "flotilla", "etcd-plain-pw", "/flotilla")
        .await?;
    let files = TestDir::new("etcd-plaintext")?;
    let password_file = files.join("etcd-password");
    std::fs::write(&password_file, "etcd-plain-pw\n# rotated 2026-12-01\n")?;
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o644))?;
    let password_path = password_file.to_string_lossy().into_owned();
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("http://"), "{endpoint}");
    let etcd_args = [
        "--etcd",
        endpoint.as_str(),
        "--etcd-user",
        "flotilla",
        "--etcd-password-file",
        password_path.as_str(),
    ];
    let fleet = TestFleet::builder(1, 1)
        .coordinator_args(&etcd_args)
        .agent_args(&etcd_args)
        .start()
        .await?;
    let plaintext =
        format!("the etcd password (--etcd-password-file) is sent in plaintext to {endpoint}");
    let open = format!(
        "--etcd-password-file {password_path} can be read by other users of this host (mode 0644)"
    );
    let coordinator = fleet.coordinator.as_ref().unwrap();
    coordinator
        .wait_for_log("coordination backend: etcd", WAIT)
        .await?;
    let agent = fleet.agents[0].as_ref().unwrap();
    // etcd took the password (its first line): the agent's liveness key is there
    agent.wait_for_log("liveness key put in etcd", WAIT).await?;
    for (who, log) in [("coordinator", coordinator.log()), ("agent", agent.log())] {
        assert!(log.contains(&plaintext), "{who}: {log}");
        assert!(log.contains(&open), "{who}: {log}");
        assert!(!log.contains("etcd-plain-pw"), "{who} logged the password");
    }

    // A wrong password: the agent says etcd refused its user, naming the endpoint and the
    // user, not that etcd is unreachable (it did, and retried for good without a word).
    fleet.pg.create_database("shard_1").await?;
    let dsn = fleet.pg.url("shard_1");
    let wrong_file = files.join("wrong-password");
    std::fs::write(&wrong_file, "# rotated 2026-12-01\nnot-the-password\n")?;
    let wrong_path = wrong_file.to_string_lossy().into_owned();
    let agent_args = |password: &str| -> Vec<String> {
        [
            "--coordinator",
            fleet.addr.as_str(),
            "agent",
            "--shard",
            "shard_1",
            "--dsn",
            &dsn,
            "--etcd",
            endpoint.as_str(),
            "--etcd-user",
            "flotilla",
            "--etcd-password-file",
            password,
        ]
        .map(str::to_string)
        .to_vec()
    };
    let args = agent_args(&wrong_path);
    let refused =
        FlotillaProcess::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[])?;
    refused
        .wait_for_log(
            &format!(
                "etcd at {endpoint} refused the agent's user flotilla: authentication failed (no such user, or the wrong password"
            ),
            WAIT,
        )
        .await?;
    assert!(!refused.log().contains("unreachable"), "{}", refused.log());
    assert!(
        !refused.log().contains("not-the-password"),
        "{}",
        refused.log()
    );

    // A password holding a CR (an editor's stray ^M): refused at start, naming the file and
    // the line, exit 2; retrying could not help, and etcd would refuse it for good.
    let cr_file = files.join("cr-password");
    std::fs::write(&cr_file, "etcd-plain-pw\r\r\n")?;
    let cr_path = cr_file.to_string_lossy().into_owned();
    let args = agent_args(&cr_path);
    let out = run_flotilla(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "--etcd-password-file {cr_path}: the password (line 1) holds a carriage return (CR"
        )),
        "{out}"
    );
    assert!(!out.stderr.contains("etcd-plain-pw"), "{out}");
    Ok(())
}
