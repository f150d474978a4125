//! Issue 2's behaviours, one test each, end to end: real PostgreSQL, a real
//! coordinator and real agents, driven through the `flotilla` CLI.
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;
use sqlx::Connection;

use crate::fleet::{Cli, MigrationDir, TestFleet, WAIT, coord_dbmate_dir, tenant_sql};
use crate::harness::{FlotillaProcess, free_port, http, run_flotilla, wait_until};
use crate::shards::{assert_logged_once, blocked, hold, logged_blocking_migration, release};

/// How many migrations the coordinated example (tests/fixtures/coord-dbmate) has.
const COORD_MIGRATIONS: usize = 3;

/// Whether `column` exists on `schema.table` of `db`.
async fn has_column(
    fleet: &TestFleet,
    db: &str,
    schema: &str,
    table: &str,
    column: &str,
) -> anyhow::Result<bool> {
    let n: i64 = fleet
        .pg
        .query_scalar(
            db,
            &format!(
                "SELECT count(*) FROM information_schema.columns
                 WHERE table_schema = '{schema}' AND table_name = '{table}' AND column_name = '{column}'"
            ),
        )
        .await?;
    Ok(n == 1)
}

/// The failures of a status JSON with this SQLSTATE.
fn failures_with<'a>(status: &'a Value, sqlstate: &str) -> Vec<&'a Value> {
    status["failures"]
        .as_array()
        .map(|a| a.iter().filter(|f| f["sqlstate"] == sqlstate).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn control_store_on_postgres_holds_plans_steps_and_audit() -> anyhow::Result<()> {
    let fleet = TestFleet::builder(2, 3)
        .postgres_store("flotilla_control")
        .start()
        .await?;
    assert!(fleet.store.starts_with("postgres://"), "{}", fleet.store);

    let (code, status, out) = fleet
        .submit_wait(&coord_dbmate_dir(), &["--actor", "e2e-operator"])
        .await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    let id = status["plan_id"].as_str().unwrap();
    let targets = 2 * 3;
    assert_eq!(status["targets"], targets);

    let db = "flotilla_control";
    let plans = fleet
        .pg
        .query_rows(
            db,
            &format!("SELECT state, targets::text, steps::text, submitted_by FROM plans WHERE id = '{id}'"),
        )
        .await?;
    let steps = COORD_MIGRATIONS * targets;
    assert_eq!(
        plans,
        vec![vec![
            "completed".to_string(),
            targets.to_string(),
            steps.to_string(),
            "e2e-operator".into()
        ]]
    );
    let by_state = fleet
        .pg
        .query_rows(
            db,
            &format!(
                "SELECT state, count(*), count(DISTINCT (shard, tenant)), count(DISTINCT migration_id)
                   FROM steps WHERE plan_id = '{id}' GROUP BY state"
            ),
        )
        .await?;
    assert_eq!(
        by_state,
        vec![vec![
            "applied".to_string(),
            steps.to_string(),
            targets.to_string(),
            COORD_MIGRATIONS.to_string()
        ]],
        "every step row applied"
    );
    let audit = fleet
        .pg
        .query_rows(
            db,
            &format!(
                "SELECT actor, action, detail FROM audit WHERE plan_id = '{id}' ORDER BY at_ms"
            ),
        )
        .await?;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0][0], "e2e-operator");
    assert_eq!(audit[0][1], "submit");
    assert!(audit[0][2].contains("6 targets"), "{audit:?}");
    // The agents are remembered there too, and the plan is listed from the store.
    let agents: i64 = fleet
        .pg
        .query_scalar(db, "SELECT count(*) FROM agents")
        .await?;
    assert_eq!(agents, 2);
    let list = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert_eq!(list[0]["plan_id"], id);
    assert_eq!(list[0]["state"], "completed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn non_transactional_index_is_built_concurrently_and_rolled_back() -> anyhow::Result<()> {
    let fleet = TestFleet::start(2, 2).await?;
    let before = fleet.fingerprint().await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_idx_customer",
        "",
        "CREATE INDEX CONCURRENTLY idx_wo_customer ON work_orders (customer_id)",
        "DROP INDEX CONCURRENTLY IF EXISTS idx_wo_customer",
    )?;
    d.migration(
        "002_note",
        "",
        "ALTER TABLE work_orders ADD COLUMN note text",
        "ALTER TABLE work_orders DROP COLUMN note",
    )?;

    // Detected from the statement, without a migration.toml.
    let p = d.path().to_string_lossy().into_owned();
    let lint = run_flotilla(&["plan", "lint", &p, "--output", "json"], &[]).await?;
    assert!(lint.success(), "{lint}");
    let v: Value = serde_json::from_str(lint.stdout.trim())?;
    let tx = |id: &str| {
        v["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["transactional"].clone())
    };
    assert_eq!(tx("001_idx_customer"), Some(Value::Bool(false)), "{v}");
    assert_eq!(tx("002_note"), Some(Value::Bool(true)), "{v}");

    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["steps"], 8);
    for (s, db) in fleet.shards.iter().enumerate() {
        for tenant in fleet.tenants(s) {
            let valid: i64 = fleet
                .pg
                .query_scalar(
                    db,
                    &format!(
                        "SELECT count(*) FROM pg_index i
                           JOIN pg_class c ON c.oid = i.indexrelid
                           JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname = '{tenant}' AND c.relname = 'idx_wo_customer'
                            AND i.indisvalid AND i.indisready"
                    ),
                )
                .await?;
            assert_eq!(valid, 1, "{db}/{tenant} has a valid idx_wo_customer");
            assert!(has_column(&fleet, db, &tenant, "work_orders", "note").await?);
        }
    }

    let id = status["plan_id"].as_str().unwrap();
    let out = fleet
        .cli(&["plan", "rollback", id, "--wait", "--output", "json"])
        .await?;
    assert_eq!(
        out.code(),
        Some(0),
        "a rollback that rolled the plan back exits 0: {out}"
    );
    let st = fleet.status(id).await?;
    assert_eq!(st["state"], "rolled_back", "{st}");
    for (s, db) in fleet.shards.iter().enumerate() {
        for tenant in fleet.tenants(s) {
            let n: i64 = fleet
                .pg
                .query_scalar(
                    db,
                    &format!("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '{tenant}' AND c.relname = 'idx_wo_customer'"),
                )
                .await?;
            assert_eq!(n, 0, "{db}/{tenant}: index dropped");
        }
    }
    assert_eq!(fleet.fingerprint().await?, before);
    assert_eq!(fleet.journal_total().await?, 0);
    Ok(())
}

/// A migration of 9 MiB of SQL (an ALTER and comments) is refused at submit and by a dry
/// run, exit 2, naming it and the limit, nothing stored or run. Before, it was taken: every
/// `plan status` and `plan explain` after it took seconds, agents missed their heartbeats
/// and the leader lost its term.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_migration_is_refused_naming_it() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 1).await?;
    let before = fleet.fingerprint().await?;
    let d = MigrationDir::new()?;
    let padding = "-- padding\n".repeat((9 << 20) / 11);
    d.migration(
        "001_huge",
        "",
        &format!("ALTER TABLE work_orders ADD COLUMN huge int;\n{padding}"),
        "ALTER TABLE work_orders DROP COLUMN huge",
    )?;
    let path = d.path().to_string_lossy().into_owned();
    for args in [
        vec!["plan", "submit", path.as_str()],
        vec!["plan", "explain", path.as_str()],
    ] {
        let out = fleet.cli(&args).await?;
        assert_eq!(out.code(), Some(2), "{args:?}: {out}");
        assert!(
            out.stderr.contains("migration `001_huge` holds")
                && out.stderr.contains("over the 8388608 a submit takes"),
            "{args:?}: {out}"
        );
    }
    let plans = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert_eq!(plans.as_array().map(Vec::len), Some(0), "{plans}");
    assert_eq!(fleet.fingerprint().await?, before);
    assert_eq!(fleet.journal_total().await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_sql_returning_false_rolls_the_plan_back() -> anyhow::Result<()> {
    let fleet = TestFleet::start(2, 2).await?;
    let before = fleet.fingerprint().await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_verified",
        "",
        "ALTER TABLE work_orders ADD COLUMN verified int",
        "ALTER TABLE work_orders DROP COLUMN verified",
    )?;
    std::fs::write(
        d.path().join("001_verified/verify.sql"),
        "SELECT current_schema() <> 'tenant_0001'",
    )?;

    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 1, "a rolled-back plan exits 1: {out}");
    assert_eq!(status["state"], "rolled_back", "{status}");
    let verify = failures_with(&status, "FL003");
    assert_eq!(verify.len(), 1, "one verify failure: {status}");
    let f = verify[0];
    assert_eq!(f["tenant"], "tenant_0001", "{f}");
    assert_eq!(f["shard"], "shard_0", "{f}");
    assert_eq!(f["migration"], "001_verified");
    assert_eq!(f["message"], "verify of 001_verified returned false", "{f}");
    assert_eq!(
        f["phase"], "verify",
        "the phase survives into the stored status: {f}"
    );
    assert!(
        status["message"].as_str().unwrap().contains("tenant_0001"),
        "{status}"
    );
    // No other tenant failed: they were applied and undone.
    assert_eq!(status["failures"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(fleet.fingerprint().await?, before);
    assert_eq!(fleet.journal_total().await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn statement_and_lock_timeouts_from_migration_toml_apply() -> anyhow::Result<()> {
    // Defaults far above the migrations' own timeouts: a failure within them
    // comes from migration.toml.
    let fleet = TestFleet::builder(2, 2)
        .coordinator_args(&["--lock-timeout", "60s", "--statement-timeout", "60s"])
        .start()
        .await?;
    let before = fleet.fingerprint().await?;

    // statement_timeout: the sleep is cancelled (57014), and the plan rolls back.
    let d = MigrationDir::new()?;
    d.migration(
        "001_marker",
        "",
        "ALTER TABLE work_orders ADD COLUMN slow_marker int",
        "ALTER TABLE work_orders DROP COLUMN slow_marker",
    )?;
    d.migration(
        "002_slow",
        "statement_timeout = \"200ms\"\n",
        "SELECT pg_sleep(5)",
        "SELECT 1",
    )?;
    // Had the timeout not applied, the sleep would end and the plan complete.
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(status["state"], "rolled_back", "{status}");
    let timeouts = failures_with(&status, "57014");
    assert!(!timeouts.is_empty(), "a 57014 failure: {status}");
    for f in &timeouts {
        assert_eq!(f["migration"], "002_slow", "{f}");
        assert!(
            f["message"].as_str().unwrap().contains("statement timeout"),
            "{f}"
        );
    }
    assert_eq!(fleet.fingerprint().await?, before);
    assert_eq!(fleet.journal_total().await?, 0);

    // lock_timeout: the test holds an ACCESS EXCLUSIVE lock on one tenant's table.
    let pool = fleet.pg.pool("shard_0").await?;
    let mut holder = pool.begin().await?;
    sqlx::query("LOCK TABLE tenant_0000.work_orders IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_locked",
        "lock_timeout = \"200ms\"\n",
        "ALTER TABLE work_orders ADD COLUMN lock_marker int",
        "ALTER TABLE work_orders DROP COLUMN lock_marker",
    )?;
    let started = Instant::now();
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    let elapsed = started.elapsed();
    holder.rollback().await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(status["state"], "rolled_back", "{status}");
    let locks = failures_with(&status, "55P03");
    assert_eq!(locks.len(), 1, "one 55P03 failure: {status}");
    assert_eq!(locks[0]["shard"], "shard_0");
    assert_eq!(locks[0]["tenant"], "tenant_0000");
    assert_eq!(locks[0]["migration"], "001_locked");
    assert!(
        locks[0]["message"]
            .as_str()
            .unwrap()
            .contains("lock timeout"),
        "{status}"
    );
    assert!(
        status["message"].as_str().unwrap().contains("tenant_0000"),
        "{status}"
    );
    assert!(
        elapsed < Duration::from_secs(30),
        "the 200ms lock_timeout applied, not the 60s default: {elapsed:?}"
    );
    assert_eq!(fleet.fingerprint().await?, before);
    assert_eq!(fleet.journal_total().await?, 0);
    Ok(())
}

const TENANT_QUERY: &str =
    "SELECT schema_name, 'industry=' || industry FROM public.tenant_directory";

fn industry_of(tenant: &str) -> &'static str {
    let n: usize = tenant.trim_start_matches("tenant_").parse().unwrap();
    if n.is_multiple_of(2) { "hs" } else { "auto" }
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_labels_from_a_query_drive_selectors() -> anyhow::Result<()> {
    let fleet = TestFleet::builder(2, 4)
        .shard_sql(|_, tenants| {
            let mut sql = String::from(
                "CREATE TABLE public.tenant_directory (schema_name text PRIMARY KEY, industry text NOT NULL);\n",
            );
            for t in tenants {
                sql.push_str(&format!(
                    "INSERT INTO public.tenant_directory VALUES ('{t}', '{}');\n",
                    industry_of(t)
                ));
            }
            sql
        })
        .tenant_query(TENANT_QUERY)
        .start()
        .await?;

    // The fleet shows each tenant with its label.
    let agents = fleet.json(&["fleet", "list", "--output", "json"]).await?;
    for a in agents.as_array().unwrap() {
        let tenants = a["tenants"].as_array().unwrap();
        assert_eq!(tenants.len(), 4, "{a}");
        for t in tenants {
            let name = t["name"].as_str().unwrap();
            assert_eq!(t["labels"]["industry"], industry_of(name), "{a}");
        }
    }

    // A migration's selector picks the hs tenants only.
    let d = MigrationDir::new()?;
    d.migration(
        "001_hs_only",
        "selector = \"industry in (hs)\"\n",
        "ALTER TABLE work_orders ADD COLUMN hs_only int",
        "ALTER TABLE work_orders DROP COLUMN hs_only",
    )?;
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["targets"], 4, "{status}");
    assert_eq!(status["steps"], 4, "{status}");
    for (s, db) in fleet.shards.iter().enumerate() {
        for tenant in fleet.tenants(s) {
            let want = industry_of(&tenant) == "hs";
            assert_eq!(
                has_column(&fleet, db, &tenant, "work_orders", "hs_only").await?,
                want,
                "{db}/{tenant}"
            );
        }
    }

    // A plan selector on the implicit `shard` label restricts it to one shard.
    let d = MigrationDir::new()?;
    d.migration(
        "001_shard1_only",
        "",
        "ALTER TABLE repair_orders ADD COLUMN s1_only int",
        "ALTER TABLE repair_orders DROP COLUMN s1_only",
    )?;
    let (code, status, out) = fleet
        .submit_wait(d.path(), &["--selector", "shard=shard_1"])
        .await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["targets"], 4, "{status}");
    for (s, db) in fleet.shards.iter().enumerate() {
        for tenant in fleet.tenants(s) {
            assert_eq!(
                has_column(&fleet, db, &tenant, "repair_orders", "s1_only").await?,
                db == "shard_1",
                "{db}/{tenant}"
            );
        }
    }
    assert_eq!(
        fleet.journal(0).await?.len(),
        2,
        "shard_0: the hs tenants only"
    );
    assert_eq!(fleet.journal(1).await?.len(), 2 + 4);
    Ok(())
}

const PASSWORD: &str = "s3cr3t-pw";

#[tokio::test(flavor = "multi_thread")]
async fn shard_password_is_used_and_never_shown() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 1).await?;
    let pg = &fleet.pg;
    pg.psql(
        "postgres",
        &format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE app LOGIN PASSWORD '{PASSWORD}';
             CREATE DATABASE app_db OWNER app;"
        ),
    )
    .await?;
    let mut tenants = String::from("SET ROLE app;\n");
    for t in ["tenant_0100", "tenant_0101"] {
        tenants.push_str(&tenant_sql(t, 5));
    }
    pg.psql("app_db", &tenants).await?;

    // Role app must authenticate with its password (everyone else keeps trust).
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba)?;
    std::fs::write(
        &hba,
        format!("host all app 127.0.0.1/32 scram-sha-256\n{old}"),
    )?;
    pg.psql("postgres", "SELECT pg_reload_conf()").await?;
    let url = format!("postgres://app@127.0.0.1:{}/app_db", pg.port());
    wait_until("pg_hba.conf reloaded", WAIT, async || {
        Ok(sqlx::PgConnection::connect(&url).await.is_err())
    })
    .await?;
    let with_pw = format!("postgres://app:{PASSWORD}@127.0.0.1:{}/app_db", pg.port());
    sqlx::PgConnection::connect(&with_pw).await?.close().await?;

    let secrets = tempfile::tempdir()?;
    let pw_file = secrets.path().join("shard.pw");
    std::fs::write(&pw_file, format!("{PASSWORD}\n"))?;
    let pw_path = pw_file.to_string_lossy().into_owned();
    let agent = FlotillaProcess::spawn(
        &[
            "--coordinator",
            &fleet.addr,
            "--log",
            "debug",
            "agent",
            "--shard",
            "app_shard",
            "--dsn",
            &url,
            "--password-file",
            &pw_path,
            "--tenant-pattern",
            "tenant_%",
        ],
        &[],
    )?;
    fleet.wait_attached(2).await?;

    let d = MigrationDir::new()?;
    d.migration(
        "001_app",
        "",
        "ALTER TABLE work_orders ADD COLUMN app_col int",
        "ALTER TABLE work_orders DROP COLUMN app_col",
    )?;
    let (code, status, out) = fleet
        .submit_wait(d.path(), &["--selector", "shard=app_shard"])
        .await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["targets"], 2);
    for t in ["tenant_0100", "tenant_0101"] {
        assert!(has_column(&fleet, "app_db", t, "work_orders", "app_col").await?);
    }
    let journal: i64 = pg
        .query_scalar("app_db", "SELECT count(*) FROM flotilla.journal")
        .await?;
    assert_eq!(journal, 2);

    let log = agent.log();
    assert!(log.contains("agent ready"), "{log}");
    assert!(!log.contains(PASSWORD), "the agent logged the password");
    let coordinator_log = fleet.coordinator.as_ref().unwrap().log();
    assert!(!coordinator_log.contains(PASSWORD));
    assert!(!out.stdout.contains(PASSWORD) && !out.stderr.contains(PASSWORD));

    // A password in the DSN is refused (exit 2), without echoing it.
    let out = run_flotilla(
        &[
            "--coordinator",
            &fleet.addr,
            "agent",
            "--shard",
            "leaky",
            "--dsn",
            &with_pw,
            "--tenant-pattern",
            "tenant_%",
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("password"), "{out}");
    assert!(
        !out.stderr.contains(PASSWORD) && !out.stdout.contains(PASSWORD),
        "the error echoes the password: {out}"
    );
    Ok(())
}

/// The value of one sample (`name{labels}`) in Prometheus text.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_serves_prometheus_metrics() -> anyhow::Result<()> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let fleet = TestFleet::builder(2, 2).metrics(addr).start().await?;
    let (code, status, out) = fleet.submit_wait(&coord_dbmate_dir(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed");

    let r = http::get(addr, "/metrics").await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("flotilla_plans_finished_total"),
        "{}",
        r.body
    );
    assert!(
        r.body.contains("flotilla_steps_finished_total"),
        "{}",
        r.body
    );
    assert_eq!(
        sample(
            &r.body,
            "flotilla_plans_finished_total{state=\"completed\",by=\"plan\"}"
        ),
        Some(1.0),
        "{}",
        r.body
    );
    // by shard: every tenant's steps, over the two shards
    let applied: f64 = ["shard_0", "shard_1"]
        .iter()
        .filter_map(|shard| {
            sample(
                &r.body,
                &format!("flotilla_steps_finished_total{{shard=\"{shard}\",outcome=\"applied\"}}"),
            )
        })
        .sum();
    assert_eq!(applied, (COORD_MIGRATIONS * 4) as f64, "{}", r.body);
    assert_eq!(
        sample(&r.body, "flotilla_agents_connected"),
        Some(2.0),
        "{}",
        r.body
    );
    // The engine's time per event: the agents' results were folded in, one event each.
    let results = sample(
        &r.body,
        "flotilla_engine_event_seconds_count{event=\"results\"}",
    )
    .unwrap_or(0.0);
    assert!(results >= 2.0, "{}", r.body);

    // A plan status is timed where the coordinator answers it, once per answer.
    let id = status["plan_id"].as_str().unwrap();
    let before = sample(&r.body, "flotilla_plan_status_seconds_count").unwrap_or(0.0);
    assert_eq!(fleet.status(id).await?["state"], "completed");
    let body = http::get(addr, "/metrics").await?.body;
    assert_eq!(
        sample(&body, "flotilla_plan_status_seconds_count"),
        Some(before + 1.0),
        "{body}"
    );
    Ok(())
}

/// Two migrations; in the first, tenant_0002 (shard_0) waits on advisory lock
/// 4242 and every tenant logs each step it runs in `applied_log`.
fn blocking_plan() -> anyhow::Result<MigrationDir> {
    let d = MigrationDir::new()?;
    logged_blocking_migration(&d, "tenant_0002", 4242)?;
    d.migration(
        "002_more",
        "",
        "INSERT INTO applied_log VALUES ('002'); ALTER TABLE work_orders ADD COLUMN blocked_col int",
        "ALTER TABLE work_orders DROP COLUMN blocked_col; DELETE FROM applied_log WHERE step = '002'",
    )?;
    Ok(d)
}

/// Waits until shard_0's other tenants are journaled and tenant_0002 waits on the lock.
async fn wait_blocked(fleet: &TestFleet) -> anyhow::Result<()> {
    let done_per_shard = 2 * (fleet.tenants_per_shard - 1);
    wait_until(
        "shard_0's other tenants journaled, tenant_0002 blocked",
        WAIT,
        async || {
            let done: i64 = fleet
                .pg
                .query_scalar("shard_0", "SELECT count(*) FROM flotilla.journal")
                .await?;
            let waiting = blocked(&fleet.pg, 0).await?;
            Ok(done == done_per_shard as i64 && waiting == 1)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_undoes_a_running_plan() -> anyhow::Result<()> {
    let fleet = TestFleet::start(2, 4).await?;
    let before = fleet.fingerprint().await?;
    let d = blocking_plan()?;
    let lock_conn = hold(&fleet.pg, 0, 4242).await?;

    let id = fleet.submit(d.path(), &[]).await?;
    wait_blocked(&fleet).await?;
    let st = fleet
        .json(&[
            "plan", "cancel", &id, "--reason", "test", "--output", "json",
        ])
        .await?;
    assert!(
        matches!(st["state"].as_str(), Some("rolling_back" | "cancelled")),
        "{st}"
    );
    assert!(st["message"].as_str().unwrap().contains("test"), "{st}");

    release(lock_conn, 4242).await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(1), "a cancelled plan exits 1: {out}");
    assert_eq!(st["state"], "cancelled", "{st}");
    assert_eq!(fleet.fingerprint().await?, before);
    assert_eq!(fleet.journal_total().await?, 0);

    // Nothing left to cancel.
    let again = fleet.cli(&["plan", "cancel", &id]).await?;
    assert_eq!(again.code(), Some(2), "{again}");
    assert!(again.stderr.contains(&id), "{again}");
    Ok(())
}

/// A plan that waited for another plan's shard locks asks the journals again when it gets
/// them: what its submit found applied, the other plan undid meanwhile (cancelled here; a
/// canary held at its gate and rolled back, in life). Before, it reported those targets
/// already applied and ended `completed` with them unmigrated.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_that_waited_for_locks_runs_what_the_other_undid() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 4).await?;
    let d = blocking_plan()?;
    let lock_conn = hold(&fleet.pg, 0, 4242).await?;
    let first = fleet.submit(d.path(), &[]).await?;
    wait_blocked(&fleet).await?;
    // the same migrations: its submit finds three tenants applied, and it waits for the locks
    let second = fleet.submit(d.path(), &[]).await?;
    wait_until("the second plan waiting for the locks", WAIT, async || {
        let st = fleet.status(&second).await?;
        Ok(st["waiting_for"].to_string().contains("lock"))
    })
    .await?;
    let cancel = fleet
        .cli(&["plan", "cancel", &first, "--reason", "canary went wrong"])
        .await?;
    assert_eq!(cancel.code(), Some(0), "{cancel}");
    release(lock_conn, 4242).await?;
    let (_, st) = fleet.watch(&first).await?;
    assert_eq!(st["state"], "cancelled", "{st}");
    let (out, st) = fleet.watch(&second).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(
        fleet.journal_total().await?,
        8,
        "both migrations on all four tenants: {st}"
    );
    Ok(())
}

/// A rollback the next coordinator takes up keeps the plan's account of why it is undone
/// (here a step's failure), saying who resumed it. Before, the message became "rollback
/// requested by coordinator: resuming a rollback after restart", the failure's lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_rollback_keeps_why_the_plan_is_undone() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(1, 1).await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_table",
        "",
        "CREATE TABLE resumed (id int)",
        "SELECT pg_advisory_xact_lock(4646);\nDROP TABLE resumed",
    )?;
    d.migration(
        "002_fails",
        "depends_on = [\"001_table\"]\n",
        "SELECT 1 / 0",
        "SELECT 1",
    )?;
    // (not fused: 001_table commits on its own, and the failure of 002 undoes it; its undo
    // waits on a lock the test holds until the coordinator is gone: a sleep raced the kill
    // on a loaded machine, and the first coordinator finished the rollback itself)
    let lock = hold(&fleet.pg, 0, 4646).await?;
    let id = fleet.submit(d.path(), &["--no-fuse"]).await?;
    wait_until("the undo waiting on the lock", WAIT, async || {
        Ok(blocked(&fleet.pg, 0).await? == 1)
    })
    .await?;
    fleet.kill_coordinator()?;
    release(lock, 4646).await?;
    fleet.restart_coordinator().await?;
    let (_, st) = fleet.watch(&id).await?;
    assert_eq!(st["state"], "rolled_back", "{st}");
    let message = st["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("22012") && message.contains("its rollback resumed by the leader"),
        "{st}"
    );
    assert_eq!(fleet.journal_total().await?, 0);
    Ok(())
}

/// A cancel's undo that the next coordinator takes up still ends `cancelled` (the cancel's
/// end is kept with the plan), its message the cancel's reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_undone_across_a_new_coordinator_ends_cancelled() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(1, 1).await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_table",
        "",
        "CREATE TABLE cancelled_t (id int)",
        "SELECT pg_advisory_xact_lock(4747);\nDROP TABLE cancelled_t",
    )?;
    d.migration(
        "002_blocked",
        "depends_on = [\"001_table\"]\n",
        "SELECT pg_advisory_xact_lock(4343)",
        "SELECT 1",
    )?;
    let lock = hold(&fleet.pg, 0, 4343).await?;
    let id = fleet.submit(d.path(), &["--no-fuse"]).await?;
    wait_until("002_blocked waiting on the lock", WAIT, async || {
        Ok(blocked(&fleet.pg, 0).await? == 1)
    })
    .await?;
    let out = fleet
        .cli(&["plan", "cancel", &id, "--reason", "wrong window"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    // the undo of 001 waits on a lock the test holds until the coordinator is gone
    let undo_lock = hold(&fleet.pg, 0, 4747).await?;
    release(lock, 4343).await?;
    wait_until("the undo waiting on the lock", WAIT, async || {
        Ok(blocked(&fleet.pg, 0).await? == 1)
    })
    .await?;
    fleet.kill_coordinator()?;
    release(undo_lock, 4747).await?;
    fleet.restart_coordinator().await?;
    let (_, st) = fleet.watch(&id).await?;
    assert_eq!(st["state"], "cancelled", "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap_or_default()
            .contains("wrong window"),
        "{st}"
    );
    assert_eq!(fleet.journal_total().await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_coordinator_resumes_the_plan_exactly_once() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(2, 4).await?;
    let d = blocking_plan()?;
    let lock_conn = hold(&fleet.pg, 0, 4242).await?;

    let id = fleet.submit(d.path(), &[]).await?;
    wait_blocked(&fleet).await?;
    // shard_1 has nothing blocking it: let it finish, so only tenant_0002 is left.
    wait_until("shard_1 done", WAIT, async || {
        Ok(fleet.journal(1).await?.len() == 8)
    })
    .await?;

    fleet.kill_coordinator()?;
    let down = fleet.cli(&["plan", "status", &id]).await?;
    assert_eq!(down.code(), Some(3), "no coordinator: {down}");
    fleet.restart_coordinator().await?;
    // The agents find the new coordinator by themselves.
    fleet.wait_attached(2).await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "running", "resumed: {st}");

    release(lock_conn, 4242).await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(st["steps"], 16);
    for m in st["migrations"].as_array().unwrap() {
        let done = m["applied"].as_i64().unwrap() + m["already_applied"].as_i64().unwrap();
        assert_eq!(done, 8, "{m}");
        assert_eq!(m["failed"], 0, "{m}");
    }

    // Exactly once: one journal row per step, one log row per step per tenant.
    for (s, db) in fleet.shards.iter().enumerate() {
        let journal = fleet.journal(s).await?;
        assert_eq!(journal.len(), 8, "{db}: {journal:?}");
        assert!(journal.iter().all(|r| r[3] == id), "{journal:?}");
        for tenant in fleet.tenants(s) {
            assert_logged_once(&fleet.pg, db, &tenant, &["001", "002"]).await?;
            assert!(has_column(&fleet, db, &tenant, "work_orders", "blocked_col").await?);
        }
    }
    Ok(())
}

/// `blocking_plan` submitted with `args` and held where `wait_blocked` says (tenant_0002
/// on advisory lock 4242): the lock's connection (`release` it) and the plan's id.
async fn submit_blocked(
    fleet: &TestFleet,
    args: &[&str],
) -> anyhow::Result<(sqlx::pool::PoolConnection<sqlx::Postgres>, String)> {
    let d = blocking_plan()?;
    let lock_conn = hold(&fleet.pg, 0, 4242).await?;
    let id = fleet.submit(d.path(), args).await?;
    wait_blocked(fleet).await?;
    Ok((lock_conn, id))
}

/// A shard an operator cancelled stays cancelled across a restart of the coordinator: the
/// plan ends cancelled, naming the shard, with the step that was out there when the
/// coordinator went down done once and nothing else run there. Before, the new leader
/// forgot the cancel and the plan ended `halted`, its not-run steps offered to a retry.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_shard_stays_cancelled_across_a_coordinator_restart() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(2, 4).await?;
    // (not fused: a target's two steps would run as one, its second with its first)
    let (lock_conn, id) = submit_blocked(&fleet, &["--policy", "continue", "--no-fuse"]).await?;
    let out = fleet
        .cli(&[
            "plan", "cancel", &id, "--shard", "shard_0", "--reason", "hot",
        ])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    wait_until("shard_1 done", WAIT, async || {
        Ok(fleet.journal(1).await?.len() == 8)
    })
    .await?;
    fleet.kill_coordinator()?;
    fleet.restart_coordinator().await?;
    fleet.wait_attached(2).await?;
    release(lock_conn, 4242).await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_ne!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "cancelled", "{st}");
    assert!(
        st["message"]
            .as_str()
            .is_some_and(|m| m.contains("shard shard_0 cancelled by")),
        "{st}"
    );
    // tenant_0002's first step, out when the coordinator went down, ran once; its second
    // never ran
    let journal = fleet.journal(0).await?;
    assert_eq!(journal.len(), 7, "{journal:?}");
    assert_logged_once(&fleet.pg, "shard_0", "tenant_0002", &["001"]).await?;
    Ok(())
}

/// The one shard of a plan cancelled: its message names the cancel, and no other shards
/// going on (it read "other shards go on" with none).
#[tokio::test(flavor = "multi_thread")]
async fn a_plans_one_shard_cancelled_says_no_other_shards_go_on() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 4).await?;
    let (lock_conn, id) = submit_blocked(&fleet, &["--policy", "continue"]).await?;
    let out = fleet
        .cli(&["plan", "cancel", &id, "--shard", "shard_0"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    release(lock_conn, 4242).await?;
    let (_, st) = fleet.watch(&id).await?;
    assert_eq!(st["state"], "cancelled", "{st}");
    let message = st["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("shard shard_0 cancelled by") && !message.contains("other shards"),
        "{st}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_prints_the_final_state_and_exits_by_it() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 2).await?;
    let good = MigrationDir::new()?;
    good.migration(
        "001_fine",
        "",
        "ALTER TABLE work_orders ADD COLUMN fine int",
        "ALTER TABLE work_orders DROP COLUMN fine",
    )?;
    let (code, status, out) = fleet.submit_wait(good.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    let id = status["plan_id"].as_str().unwrap();
    let out = fleet.cli(&["plan", "watch", id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with(&format!("plan {id} completed after"))),
        "{out}"
    );

    let bad = MigrationDir::new()?;
    bad.migration("002_broken", "", "SELECT 1 / 0", "SELECT 1")?;
    let (code, status, out) = fleet.submit_wait(bad.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    let id = status["plan_id"].as_str().unwrap();
    let out = fleet.cli(&["plan", "watch", id]).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with(&format!("plan {id} rolled_back after"))),
        "{out}"
    );
    assert!(out.stdout.contains("SQLSTATE 22012"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_of_a_killed_coordinator_do_not_count_for_its_successor() -> anyhow::Result<()> {
    // One lane: tenant_0000 blocks it, the other tenants' runs wait in the agent's
    // queue. After the restart they run under the old epoch (and are fenced, or
    // apply); their results must not be taken for the new coordinator's runs.
    let mut fleet = TestFleet::start(1, 4).await?;
    let d = MigrationDir::new()?;
    logged_blocking_migration(&d, "tenant_0000", 4242)?;
    let lock_conn = hold(&fleet.pg, 0, 4242).await?;
    let id = fleet.submit(d.path(), &["--max-parallel", "1"]).await?;
    wait_until("tenant_0000 blocked", WAIT, async || {
        let waiting = blocked(&fleet.pg, 0).await?;
        Ok(waiting == 1)
    })
    .await?;
    fleet.restart_coordinator().await?;
    fleet.wait_attached(1).await?;
    release(lock_conn, 4242).await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(fleet.journal(0).await?.len(), 4);
    for tenant in fleet.tenants(0) {
        let n: i64 = fleet
            .pg
            .query_scalar(
                "shard_0",
                &format!("SELECT count(*) FROM {tenant}.applied_log"),
            )
            .await?;
        assert_eq!(n, 1, "{tenant}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_concurrent_index_leaves_no_invalid_index() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 2).await?;
    // priority repeats: a unique index cannot be built, and CREATE INDEX
    // CONCURRENTLY leaves an INVALID index behind when it fails.
    let before = fleet.fingerprint().await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_unique_customer",
        "",
        "CREATE UNIQUE INDEX CONCURRENTLY idx_wo_unique_customer ON work_orders (priority)",
        "DROP INDEX CONCURRENTLY IF EXISTS idx_wo_unique_customer",
    )?;
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(status["state"], "rolled_back", "{status}");
    assert!(
        !failures_with(&status, "23505").is_empty(),
        "a unique violation: {status}"
    );
    // Read again once the plan ended (from the store): the failed steps (which left nothing:
    // their INVALID indexes dropped) still say what failed.
    let id = status["plan_id"].as_str().unwrap();
    let stored = fleet.status(id).await?;
    // (each target that ran it: the second is not run when the first's failure halts the
    // plan before its lane began, as on a loaded machine)
    let not_run = stored["migrations"][0]["not_run"].as_u64().unwrap_or(0) as usize;
    assert_eq!(
        failures_with(&stored, "23505").len(),
        2 - not_run,
        "a unique violation on each target that ran it: {stored}"
    );
    let invalid: i64 = fleet
        .pg
        .query_scalar(
            "shard_0",
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
              WHERE c.relname = 'idx_wo_unique_customer'",
        )
        .await?;
    assert_eq!(invalid, 0, "the INVALID index was found and dropped");
    assert_eq!(fleet.fingerprint().await?, before);
    Ok(())
}

/// An open transaction that read tenant `t`'s table (ACCESS SHARE, which ALTER TABLE waits
/// for), and a migration adding a column to it with lock_timeout 300ms.
async fn a_reader_and_a_flag(
    pool: &sqlx::PgPool,
    t: &str,
) -> anyhow::Result<(sqlx::Transaction<'static, sqlx::Postgres>, MigrationDir)> {
    let mut holder = pool.begin().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {t}.work_orders"
    )))
    .execute(&mut *holder)
    .await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_add_flag",
        "lock_timeout = \"300ms\"\n",
        "ALTER TABLE work_orders ADD COLUMN flag int",
        "ALTER TABLE work_orders DROP COLUMN flag",
    )?;
    Ok((holder, d))
}

/// `dir` applied on both shards of `fleet`, then shard_1's agent killed and the plan's
/// rollback asked; its id.
async fn rolling_back_without_shard_1(
    fleet: &mut TestFleet,
    dir: &std::path::Path,
) -> anyhow::Result<String> {
    let (code, st, out) = fleet.submit_wait(dir, &[]).await?;
    assert_eq!(code, 0, "{out}");
    let id = st["plan_id"].as_str().unwrap().to_string();
    fleet.agents[1].take().expect("the agent").kill()?;
    let out = fleet.cli(&["plan", "rollback", &id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    Ok(id)
}

/// `plan forget-shard ID --shard shard_1 --reason decommissioned` with `more` flags.
async fn forget_shard_1(
    fleet: &TestFleet,
    id: &str,
    more: &[&str],
) -> anyhow::Result<crate::harness::CommandOutput> {
    let mut args = vec![
        "plan",
        "forget-shard",
        id,
        "--shard",
        "shard_1",
        "--reason",
        "decommissioned",
    ];
    args.extend_from_slice(more);
    fleet.cli(&args).await
}

/// A shard forgotten while its plan rolls back stays forgotten under a new leader: the
/// coordinator restarted before the plan ended (the other shard's undo still running), the
/// plan ends rollback_failed naming it, not waiting for it again. Before, the new leader took
/// its lock again and waited for its agent for good (a review).
#[tokio::test(flavor = "multi_thread")]
async fn a_shard_forgotten_in_a_rollback_stays_forgotten_after_a_restart() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(2, 1).await?;
    // a store slow to take each write: the forget answered before it is stored is lost
    fleet
        .restart_coordinator_with(&[("FAILPOINTS", "coordinator::store_write=return(1500)")])
        .await?;
    fleet.wait_attached(2).await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_slow_undo",
        "",
        "CREATE TABLE slow_undo (id int)",
        "SELECT pg_sleep(4); DROP TABLE slow_undo",
    )?;
    let id = rolling_back_without_shard_1(&mut fleet, d.path()).await?;
    crate::fleet::wait_running(&fleet.pg, &fleet.shards[0], "pg_sleep(4)", 1).await?;
    let out = forget_shard_1(&fleet, &id, &[]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    // killed at once: the forget was stored before it was answered (a forget answered and
    // lost with the store writer's window was seen before)
    fleet.kill_coordinator()?;
    fleet.restart_coordinator().await?;
    let (_, st) = fleet.watch(&id).await?;
    assert_eq!(st["state"], "rollback_failed", "{st}");
    let named = st["failures"].as_array().is_some_and(|f| {
        f.iter().any(|f| {
            f["shard"] == "shard_1"
                && f["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("shard shard_1 forgotten by"))
        })
    });
    assert!(named, "{st}");
    let undone: i64 = fleet
        .pg
        .query_scalar(&fleet.shards[0], "SELECT count(*) FROM flotilla.journal")
        .await?;
    assert_eq!(undone, 0, "shard_0 undone");
    let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
    assert_eq!(locks["locks"].as_array().map(Vec::len), Some(0), "{locks}");
    let audit = fleet
        .json(&["audit", "list", "--plan", &id, "--output", "json"])
        .await?;
    assert!(
        audit
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["action"] == "forget-shard")),
        "{audit}"
    );
    Ok(())
}

/// A plan rolling back while a shard's agent is gone for good (its database decommissioned)
/// is not held for good: an admin forgets the shard (`plan forget-shard`, audited), the plan
/// ends rollback_failed naming it once the other shards are undone, and its locks go (the
/// shard can then be retired). Before, it stayed rolling_back, and forget-shard, lock breaks
/// and retire were all refused (a walk-through).
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_waiting_for_a_shard_gone_for_good_ends_when_it_is_forgotten()
-> anyhow::Result<()> {
    let mut fleet = TestFleet::start(2, 1).await?;
    let id = rolling_back_without_shard_1(&mut fleet, &coord_dbmate_dir()).await?;
    crate::harness::wait_until("shard_0 undone, shard_1 waited for", WAIT, async || {
        let st = fleet.status(&id).await?;
        let undone: i64 = fleet
            .pg
            .query_scalar(&fleet.shards[0], "SELECT count(*) FROM flotilla.journal")
            .await?;
        Ok(st["state"] == "rolling_back" && undone == 0)
    })
    .await?;
    let out = forget_shard_1(&fleet, &id, &["--wait", "--output", "json"]).await?;
    let st: Value = serde_json::from_str(out.stdout.lines().last().unwrap_or("{}"))?;
    assert_eq!(st["state"], "rollback_failed", "{out}");
    let named = st["failures"].as_array().is_some_and(|f| {
        f.iter().any(|f| {
            f["shard"] == "shard_1"
                && f["message"].as_str().is_some_and(|m| {
                    m.contains("shard shard_1 forgotten by")
                        && m.contains("(decommissioned)")
                        && m.contains(&format!("flotilla plan rollback {id}"))
                })
        })
    });
    assert!(named, "{st}");
    let locks = fleet.json(&["locks", "list", "--output", "json"]).await?;
    assert_eq!(locks["locks"].as_array().map(Vec::len), Some(0), "{locks}");
    let out = fleet
        .cli(&["fleet", "retire", "shard_1", "--reason", "decommissioned"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    Ok(())
}

/// A rollback's undo blocked behind an application's transaction shows in `plan status` as
/// waiting for its lock, as a step does (a rollback stuck for a minute showed nothing until
/// it failed), and no more once it is through.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_waiting_for_a_lock_shows_it() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 1).await?;
    let t = fleet.tenants(0)[0].clone();
    let db = fleet.shards[0].clone();
    let pool = fleet.pg.pool(&db).await?;
    let (holder, d) = a_reader_and_a_flag(&pool, &t).await?;
    holder.rollback().await?;
    let (code, st, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    let id = st["plan_id"].as_str().unwrap().to_string();
    let (holder, _) = a_reader_and_a_flag(&pool, &t).await?;
    let out = fleet.cli(&["plan", "rollback", &id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let mut seen = Value::Null;
    crate::harness::wait_until("the undo shown waiting for its lock", WAIT, async || {
        let status = fleet
            .json(&["plan", "status", &id, "--output", "json"])
            .await?;
        seen = status.clone();
        Ok(status["state"] == "rolling_back"
            && status["lock_waits"].as_array().is_some_and(|w| {
                w.iter().any(|w| {
                    w["tenant"] == t.as_str()
                        && w["migration"] == "001_add_flag"
                        && w["reason"]
                            .as_str()
                            .is_some_and(|r| r.starts_with("its undo's lock timed out"))
                })
            }))
    })
    .await
    .with_context(|| format!("last seen: {seen}"))?;
    let text = fleet.cli(&["plan", "status", &id]).await?;
    assert!(
        text.stdout.contains("waiting for table locks:")
            && text.stdout.contains(&format!(
                "001_add_flag on {db}/{t}: its undo's lock timed out"
            )),
        "{text}"
    );
    holder.rollback().await?;
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(1), "rolled back: {out}");
    let status = fleet
        .json(&["plan", "status", &id, "--output", "json"])
        .await?;
    assert_eq!(status["state"], "rolled_back", "{status}");
    assert_eq!(status["lock_waits"], serde_json::json!([]), "{status}");
    Ok(())
}

/// A long transaction holds a lock that ALTER TABLE needs: the step gives up within its
/// lock_timeout each time (so a probe query on the table never waits behind it for longer),
/// tries again after a pause, and succeeds once the holder ends. When the holder never ends,
/// the final error names the table and the blocking session.
#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_schema_change_retries_within_lock_timeout() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 1).await?;
    let t = fleet.tenants(0)[0].clone();
    let db = fleet.shards[0].clone();
    let pool = fleet.pg.pool(&db).await?;
    let (holder, d) = a_reader_and_a_flag(&pool, &t).await?;
    let id = fleet.submit(d.path(), &[]).await?;
    // Wait for the step to be waiting for its lock, then probe the table: the probe queues
    // behind the ALTER and must get through within about one lock_timeout.
    crate::harness::wait_until("the ALTER waiting for its lock", WAIT, async || {
        let n: i64 = fleet
            .pg
            .query_scalar(
                &db,
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND mode = 'AccessExclusiveLock'",
            )
            .await?;
        Ok(n > 0)
    })
    .await?;
    for _ in 0..3 {
        let probe = Instant::now();
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {t}.work_orders"
        )))
        .fetch_one(&pool)
        .await?;
        assert_eq!(n, 20);
        let waited = probe.elapsed();
        assert!(
            waited < Duration::from_millis(1300),
            "a probe waited {waited:?} behind the schema change (lock_timeout 300ms)"
        );
    }
    let agent_log = || fleet.agents[0].as_ref().unwrap().log();
    crate::harness::wait_until("a retry", WAIT, async || {
        Ok(agent_log().contains("lock timeout; trying again after a pause"))
    })
    .await?;
    // Between its attempts the step shows in the plan's status as waiting for its lock,
    // and from its second retry on with who holds it (watched from the first timeout on).
    let mut seen = Value::Null;
    crate::harness::wait_until("the status naming the lock's holder", WAIT, async || {
        let status = fleet
            .json(&["plan", "status", &id, "--output", "json"])
            .await?;
        seen = status["lock_waits"].clone();
        Ok(seen.as_array().is_some_and(|w| {
            w.iter().any(|w| {
                w["tenant"] == t.as_str()
                    && w["migration"] == "001_add_flag"
                    && w["reason"].as_str().is_some_and(|r| {
                        r.contains("attempt") && r.contains(&format!("{t}.work_orders"))
                    })
            })
        }))
    })
    .await
    .with_context(|| format!("last seen: {seen}"))?;
    let text = fleet.cli(&["plan", "status", &id]).await?;
    assert!(
        text.stdout.contains("waiting for table locks:")
            && text
                .stdout
                .contains(&format!("001_add_flag on {db}/{t}: lock timeout")),
        "{text}"
    );
    holder.rollback().await?;
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    // once the step applied, it waits for nothing
    let status = fleet
        .json(&["plan", "status", &id, "--output", "json"])
        .await?;
    assert_eq!(status["lock_waits"], serde_json::json!([]), "{status}");
    assert!(
        status["data"].as_array().is_some_and(|d| d.is_empty()),
        "a schema step is no data change: {status}"
    );
    let cols: i64 = fleet
        .pg
        .query_scalar(
            &db,
            &format!(
                "SELECT count(*) FROM information_schema.columns WHERE table_schema = '{t}' AND column_name = 'flag'"
            ),
        )
        .await?;
    assert_eq!(cols, 1);

    // A holder that never lets go: every attempt times out; the error names the table and
    // the blocking session.
    let mut holder = pool.begin().await?;
    sqlx::query("SELECT set_config('application_name', 'long-report', true)")
        .execute(&mut *holder)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {t}.work_orders"
    )))
    .execute(&mut *holder)
    .await?;
    let d = MigrationDir::new()?;
    d.migration(
        "002_add_flag2",
        "lock_timeout = \"300ms\"\n",
        "ALTER TABLE work_orders ADD COLUMN flag2 int",
        "ALTER TABLE work_orders DROP COLUMN flag2",
    )?;
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    holder.rollback().await?;
    assert_eq!(code, 1, "{out}");
    let locks = failures_with(&status, "55P03");
    assert_eq!(locks.len(), 1, "{status}");
    let message = locks[0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("4 attempts")
            && message.contains(&format!("{t}.work_orders"))
            && message.contains("long-report"),
        "{message}"
    );
    Ok(())
}

/// A schema change waiting to try again after a lock timeout, when its plan is cancelled,
/// is not tried again: it stops NOT_RUN (its transaction was undone), the plan ends
/// cancelled, and no lock-timeout failure is charged to it.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_stops_a_blocked_schema_change_between_its_attempts() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 1).await?;
    let t = fleet.tenants(0)[0].clone();
    let pool = fleet.pg.pool(&fleet.shards[0]).await?;
    let (holder, d) = a_reader_and_a_flag(&pool, &t).await?;
    let id = fleet.submit(d.path(), &["--policy", "stop"]).await?;
    let agent_log = || fleet.agents[0].as_ref().unwrap().log();
    crate::harness::wait_until("a retry", WAIT, async || {
        Ok(agent_log().contains("lock timeout; trying again after a pause"))
    })
    .await?;
    let out = fleet
        .cli(&["plan", "cancel", &id, "--wait", "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    holder.rollback().await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "cancelled", "{st}");
    assert!(failures_with(&st, "55P03").is_empty(), "{st}");
    assert_eq!(migration_counts(&st, "001_add_flag")["not_run"], 1, "{st}");
    assert!(
        agent_log().contains("not tried again: the plan was halted meanwhile"),
        "{}",
        agent_log()
    );
    assert_eq!(fleet.journal_total().await?, 0);
    Ok(())
}

/// Three chained migrations; the second fails on `tenant_0001` only (shard_0).
fn failing_on_one_tenant() -> anyhow::Result<MigrationDir> {
    let d = MigrationDir::new()?;
    d.migration(
        "001_first",
        "",
        "ALTER TABLE work_orders ADD COLUMN first_mark int",
        "ALTER TABLE work_orders DROP COLUMN first_mark",
    )?;
    d.migration(
        "002_second",
        "",
        "DO $$ BEGIN IF current_schema() = 'tenant_0001' THEN \
           RAISE EXCEPTION 'second_mark refused here'; END IF; END $$;\n\
         ALTER TABLE work_orders ADD COLUMN second_mark int",
        "ALTER TABLE work_orders DROP COLUMN second_mark",
    )?;
    d.migration(
        "003_third",
        "",
        "ALTER TABLE work_orders ADD COLUMN third_mark int",
        "ALTER TABLE work_orders DROP COLUMN third_mark",
    )?;
    Ok(d)
}

/// A migration's counters in a status JSON.
fn migration_counts(status: &Value, id: &str) -> Value {
    status["migrations"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["id"] == id))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Every tenant's columns agree with its journal: a migration is in the journal exactly
/// where its column is (what applied stayed applied, nothing half-done).
async fn columns_match_journals(fleet: &TestFleet) -> anyhow::Result<usize> {
    let mut applied = 0;
    for (s, db) in fleet.shards.iter().enumerate() {
        let journal = fleet.journal(s).await?;
        for tenant in fleet.tenants(s) {
            for (id, column) in [
                ("001_first", "first_mark"),
                ("002_second", "second_mark"),
                ("003_third", "third_mark"),
            ] {
                let journaled = journal.iter().any(|r| r[0] == tenant && r[1] == id);
                let present = has_column(fleet, db, &tenant, "work_orders", column).await?;
                assert_eq!(
                    journaled, present,
                    "{tenant} on {db}: {id} journaled {journaled}, column present {present}"
                );
                applied += usize::from(present);
            }
        }
    }
    Ok(applied)
}

/// A submit sent again with its request id (a pipeline retrying the command after its
/// answer was lost) answers with the plan the first stored, and starts no second plan; the
/// same id for another plan (other files, or the same with other settings) is refused,
/// changing nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_submit_sent_again_with_its_request_id_starts_no_second_plan() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 1).await?;
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let submit = |dir: String| {
        let on = &fleet;
        async move {
            on.cli(&[
                "plan",
                "submit",
                &dir,
                "--request-id",
                "pipeline-42",
                "--wait",
                "--output",
                "json",
            ])
            .await
        }
    };
    let first = submit(dir.clone()).await?;
    assert_eq!(first.code(), Some(0), "{first}");
    let first: Value = serde_json::from_str(first.stdout.lines().last().unwrap())?;
    let again = submit(dir.clone()).await?;
    assert_eq!(again.code(), Some(0), "{again}");
    assert!(again.stderr.contains("was received before"), "{again}");
    let again_status: Value = serde_json::from_str(again.stdout.lines().last().unwrap())?;
    assert_eq!(again_status["plan_id"], first["plan_id"], "{again}");
    let plans = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert_eq!(plans.as_array().map(Vec::len), Some(1), "{plans}");

    // The same files with another setting are another plan: refused, naming what differs
    // (before, answered with the first plan, exit 0, as if the changed one had run).
    let out = fleet
        .cli(&[
            "plan",
            "submit",
            &dir,
            "--request-id",
            "pipeline-42",
            "--policy",
            "stop",
            "--selector",
            "tenant = tenant_0000",
        ])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("with other settings (selector, policy)"),
        "{out}"
    );

    let other = MigrationDir::new()?;
    other.migration(
        "001_other",
        "",
        "ALTER TABLE work_orders ADD COLUMN other_mark int;",
        "ALTER TABLE work_orders DROP COLUMN other_mark;",
    )?;
    let out = submit(other.path().to_string_lossy().into_owned()).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("request id pipeline-42 was used for plan"),
        "{out}"
    );
    // and it names what differs in the files
    assert!(
        out.stderr.contains("migrations added: 001_other")
            && out.stderr.contains("migrations left out:"),
        "{out}"
    );
    let plans = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert_eq!(plans.as_array().map(Vec::len), Some(1), "{plans}");
    Ok(())
}

/// Policy `stop` with one lane: the runs the coordinator had queued on the agent behind
/// the failing one are not run (before, the agent applied the three tenants queued behind
/// the failed one in the round trip before the coordinator's halt reached it).
#[tokio::test(flavor = "multi_thread")]
async fn policy_stop_runs_nothing_the_agent_had_queued_behind_the_failure() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 4).await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_slow_fail",
        "",
        "DO $$ BEGIN IF current_schema() = 'tenant_0000' THEN PERFORM pg_sleep(0.5); \
         RAISE EXCEPTION 'refused here' USING DETAIL = 'tenant_0000 only', \
         HINT = 'run it after 002'; END IF; END $$;\n\
         ALTER TABLE work_orders ADD COLUMN stop_mark int;",
        "ALTER TABLE work_orders DROP COLUMN stop_mark;",
    )?;
    let (code, status, out) = fleet
        .submit_wait(d.path(), &["--policy", "stop", "--max-parallel", "1"])
        .await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(status["state"], "failed", "{status}");
    let m = migration_counts(&status, "001_slow_fail");
    assert_eq!(m["failed"], 1, "{m}");
    assert_eq!(m["applied"], 0, "nothing ran after the failure: {m}");
    assert_eq!(m["not_run"], 3, "{m}");
    assert_eq!(fleet.journal_total().await?, 0);
    // the text status shows PostgreSQL's DETAIL and HINT under the failure (the hint, what
    // to do, was dropped)
    let id = status["plan_id"].as_str().expect("an id");
    let text = fleet.cli(&["plan", "status", id]).await?;
    assert!(
        text.stdout.contains("refused here")
            && text.stdout.contains("detail: tenant_0000 only")
            && text.stdout.contains("HINT: run it after 002"),
        "{text}"
    );
    // a cancel of the ended plan says it ended; of no plan, that there is none
    let out = fleet.cli(&["plan", "cancel", id]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("already ended failed"), "{out}");
    let out = fleet.cli(&["plan", "cancel", "pnosuch"]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("pnosuch") && out.stderr.contains("not found"),
        "{out}"
    );
    Ok(())
}

/// Policy `stop`: a failing step stops the plan where it is. Nothing more starts, what
/// applied stays (nothing is rolled back), the plan ends `failed` and `--wait` exits 1.
#[tokio::test(flavor = "multi_thread")]
async fn policy_stop_stops_at_a_failing_step_and_keeps_what_applied() -> anyhow::Result<()> {
    let fleet = TestFleet::start(2, 2).await?;
    let d = failing_on_one_tenant()?;
    // Unfused, each step commits by itself: tenant_0001's first migration commits before
    // its second fails, so there is something applied that `stop` must keep.
    let (code, status, out) = fleet
        .submit_wait(d.path(), &["--policy", "stop", "--no-fuse"])
        .await?;
    assert_eq!(code, 1, "a failed plan exits 1: {out}");
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("the plan stopped, applied steps stay"),
        "{status}"
    );
    let failures = status["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{status}");
    assert_eq!(failures[0]["tenant"], "tenant_0001", "{status}");
    assert_eq!(failures[0]["migration"], "002_second", "{status}");
    assert!(
        failures[0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("second_mark refused here"),
        "{status}"
    );
    // tenant_0001's first migration had to apply before its second could fail: it stayed.
    assert!(
        has_column(
            &fleet,
            "shard_0",
            "tenant_0001",
            "work_orders",
            "first_mark"
        )
        .await?
    );
    assert!(
        !has_column(
            &fleet,
            "shard_0",
            "tenant_0001",
            "work_orders",
            "second_mark"
        )
        .await?
    );
    let mut steps = 0;
    for id in ["001_first", "002_second", "003_third"] {
        let m = migration_counts(&status, id);
        assert_eq!(m["rolled_back"], 0, "stop undoes nothing: {m}");
        assert_eq!(m["pending"], 0, "{m}");
        assert_eq!(m["running"], 0, "{m}");
        steps += m["applied"].as_u64().unwrap();
    }
    assert_eq!(
        migration_counts(&status, "003_third")["applied"]
            .as_u64()
            .unwrap()
            + migration_counts(&status, "003_third")["not_run"]
                .as_u64()
                .unwrap(),
        4,
        "{status}"
    );
    assert!(
        migration_counts(&status, "003_third")["not_run"]
            .as_u64()
            .unwrap()
            >= 1,
        "tenant_0001's third migration never ran: {status}"
    );
    let applied = columns_match_journals(&fleet).await?;
    assert_eq!(applied as u64, steps, "{status}");
    assert_eq!(fleet.journal_total().await?, applied);
    Ok(())
}

/// Policy `continue`: a failing step stops its own target only; every other target runs
/// every migration, the failed target's later migrations are not run, nothing is rolled
/// back, and the plan ends `failed` (no error budget given), exit 1.
#[tokio::test(flavor = "multi_thread")]
async fn policy_continue_runs_every_other_target_past_a_failing_step() -> anyhow::Result<()> {
    let fleet = TestFleet::start(2, 2).await?;
    let d = failing_on_one_tenant()?;
    let (code, status, out) = fleet
        .submit_wait(d.path(), &["--policy", "continue"])
        .await?;
    assert_eq!(code, 1, "a plan with a failed step exits 1: {out}");
    assert_eq!(status["state"], "failed", "{status}");
    let failures = status["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{status}");
    assert_eq!(failures[0]["tenant"], "tenant_0001", "{status}");
    assert_eq!(failures[0]["migration"], "002_second", "{status}");
    let first = migration_counts(&status, "001_first");
    assert_eq!(
        (first["applied"].as_u64(), first["failed"].as_u64()),
        (Some(4), Some(0)),
        "{first}"
    );
    let second = migration_counts(&status, "002_second");
    assert_eq!(
        (second["applied"].as_u64(), second["failed"].as_u64()),
        (Some(3), Some(1)),
        "{second}"
    );
    let third = migration_counts(&status, "003_third");
    assert_eq!(
        (third["applied"].as_u64(), third["not_run"].as_u64()),
        (Some(3), Some(1)),
        "{third}"
    );
    for id in ["001_first", "002_second", "003_third"] {
        assert_eq!(migration_counts(&status, id)["rolled_back"], 0, "{status}");
    }
    for (s, db) in fleet.shards.iter().enumerate() {
        for tenant in fleet.tenants(s) {
            let failed = tenant == "tenant_0001";
            assert!(has_column(&fleet, db, &tenant, "work_orders", "first_mark").await?);
            for column in ["second_mark", "third_mark"] {
                assert_eq!(
                    has_column(&fleet, db, &tenant, "work_orders", column).await?,
                    !failed,
                    "{tenant}.{column}"
                );
            }
        }
    }
    assert_eq!(columns_match_journals(&fleet).await?, 10);
    assert_eq!(fleet.journal_total().await?, 10);
    Ok(())
}

/// A plan over tonic's default 4 MiB message limit (a large seed migration) is taken by the
/// coordinator and reaches the agents: the CLI, the coordinator and the agents' streams
/// agree on one limit (64 MiB). Before, the coordinator refused it with "decoded message
/// length too large", naming neither the plan nor the limit.
#[tokio::test(flavor = "multi_thread")]
async fn a_plan_over_four_mebibytes_goes_through() -> anyhow::Result<()> {
    let fleet = TestFleet::builder(1, 1).start().await?;
    let d = MigrationDir::new()?;
    let filler = format!("-- {}\n", "x".repeat(1020)).repeat(5 * 1024);
    d.migration(
        "001_big_seed",
        "",
        &format!("{filler}CREATE TABLE big_seed (x int);"),
        "DROP TABLE big_seed;",
    )?;
    let (code, st, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(fleet.journal_total().await?, 1);
    Ok(())
}

/// A rollback of a plan that ended, after a later plan applied migrations on its targets
/// (a column added to the table it made) is refused, naming the later plan and its
/// targets, changing nothing: its down SQL dropped the table, the later plan's column and
/// the rows written since with it, and the later plan's journal row still said applied.
/// `--ignore-later-plans` rolls it back all the same, and the audit trail says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_under_a_later_plan_is_refused_until_told() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 1).await?;
    let base = MigrationDir::new()?;
    base.migration(
        "001_base",
        "",
        "CREATE TABLE base_t (x int);",
        "DROP TABLE base_t;",
    )?;
    let col = MigrationDir::new()?;
    col.migration(
        "002_col",
        "",
        "ALTER TABLE base_t ADD COLUMN y int;",
        "ALTER TABLE base_t DROP COLUMN y;",
    )?;
    let (code, first, out) = fleet.submit_wait(base.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    let (code, second, out) = fleet.submit_wait(col.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    let (first, second) = (
        first["plan_id"].as_str().unwrap_or_default().to_string(),
        second["plan_id"].as_str().unwrap_or_default().to_string(),
    );
    let tenant = crate::fleet::tenant_name(0, 0, 1);
    fleet
        .pg
        .psql(
            &fleet.shards[0],
            &format!("INSERT INTO {tenant}.base_t VALUES (1, 2)"),
        )
        .await?;
    // the later plan's journal rows reach the leader's copy (they do at once, with results)
    let out = fleet
        .cli(&[
            "plan",
            "rollback",
            &first,
            "--wait",
            "--reason",
            "undo base",
        ])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "later plans applied migrations on its targets after it (plan {second}: 002_col on shard_0/{tenant})"
        )),
        "{out}"
    );
    let rows = fleet
        .pg
        .query_rows(&fleet.shards[0], &format!("SELECT y FROM {tenant}.base_t"))
        .await?;
    assert_eq!(rows, vec![vec!["2".to_string()]], "nothing changed");
    assert_eq!(fleet.status(&first).await?["state"], "completed");

    // Another tool's migration recorded after both (`fleet baseline`): named as the
    // baseline it is (no plan to roll back), and first, newest first.
    let other = MigrationDir::new()?;
    other.migration(
        "003_other_tool",
        "",
        "CREATE TABLE other_tool_t (id int);",
        "DROP TABLE other_tool_t;",
    )?;
    let op = other.path().to_string_lossy().into_owned();
    let out = fleet
        .cli(&[
            "fleet",
            "baseline",
            &op,
            "--up-to",
            "003_other_tool",
            "--reason",
            "made by hand",
        ])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    // (its rows reach the leader's copy of the journals with the agent's next report)
    let mut out = None;
    wait_until("the baseline among the later plans", WAIT, async || {
        let o = fleet
            .cli(&["plan", "rollback", &first, "--reason", "undo base"])
            .await?;
        let seen = o.stderr.contains("fleet baseline");
        out = Some(o);
        Ok(seen)
    })
    .await?;
    let out = out.expect("asked");
    assert_eq!(out.code(), Some(2), "{out}");
    let (baseline_at, second_at) = (
        out.stderr.find("(fleet baseline baseline-"),
        out.stderr.find(&format!("; plan {second}: 002_col")),
    );
    assert!(
        baseline_at.is_some()
            && second_at.is_some()
            && baseline_at < second_at
            && out.stderr.contains("not a plan to roll back"),
        "{out}"
    );

    let out = fleet
        .cli(&[
            "plan",
            "rollback",
            &first,
            "--wait",
            "--reason",
            "undo base",
            "--ignore-later-plans",
        ])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let audit = fleet
        .json(&["audit", "list", "--plan", &first, "--output", "json"])
        .await?;
    assert!(
        audit
            .to_string()
            .contains("undo base; past later plans (fleet baseline baseline-")
            && audit
                .to_string()
                .contains(&format!("; plan {second}: 002_col")),
        "{audit}"
    );
    Ok(())
}

/// A selector of 100,000 characters that selects nothing: refused as any (exit 2, saying
/// it selects nothing, shortened), not "h2 protocol error" (exit 3): the whole selector
/// echoed in the refusal overflowed the gRPC status header.
#[tokio::test(flavor = "multi_thread")]
async fn a_huge_selector_is_refused_as_bad_input() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 1).await?;
    let names: Vec<String> = (0..10_000).map(|i| format!("nobody_{i:05}")).collect();
    let selector = format!("tenant in ({})", names.join(","));
    assert!(selector.len() > 100_000);
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = fleet
        .cli(&["plan", "submit", &dir, "--selector", &selector])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("empty target set") && out.stderr.contains("characters)"),
        "{out}"
    );
    assert!(!out.stderr.contains("h2 protocol error"), "{out}");
    Ok(())
}

/// A `--tenant-query` the server refuses for what it says (a table that is not there): the
/// agent stops at once, exit 2 (bad input, which a restart does not mend), naming the flag
/// and the server's words; before, exit 3 as if the shard were out of reach. Nothing is
/// written to the shard.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_query_the_server_refuses_is_bad_input() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 1).await?;
    fleet.pg.create_database("query_refused").await?;
    let dsn = fleet.pg.url("query_refused");
    let out = run_flotilla(
        &[
            "--coordinator",
            &fleet.addr,
            "agent",
            "--shard",
            "query_refused",
            "--dsn",
            &dsn,
            "--tenant-query",
            "SELECT name FROM no_such_registry",
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    let said = format!("{}{}", out.stderr, out.stdout);
    assert!(
        said.contains("--tenant-query")
            && said.contains("relation \"no_such_registry\" does not exist"),
        "{out}"
    );
    let schemas = fleet
        .pg
        .query_rows(
            "query_refused",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'flotilla'",
        )
        .await?;
    assert_eq!(schemas, vec![vec!["0".to_string()]], "nothing written");
    Ok(())
}

/// An enum value added by one migration and used by the next, in a plan that fuses a
/// target's steps into one transaction: the step that adds it commits first, so the use
/// does not fail with "unsafe use of new value" (55P04) on every target, as it did.
#[tokio::test(flavor = "multi_thread")]
async fn an_enum_value_added_commits_before_the_migration_that_uses_it() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 2).await?;
    // the type made and committed first (a value added to a type made in the same
    // transaction may be used at once from PostgreSQL 17 on)
    let first = MigrationDir::new()?;
    first.migration(
        "001_mood",
        "",
        "CREATE TYPE mood AS ENUM ('ok');",
        "DROP TYPE mood;",
    )?;
    let (code, _, out) = fleet.submit_wait(first.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    let d = MigrationDir::new()?;
    d.migration(
        "002_mood_meh",
        "irreversible = true\n",
        "ALTER TYPE mood ADD VALUE 'meh';",
        "",
    )?;
    d.migration(
        "003_orders_mood",
        "",
        "ALTER TABLE work_orders ADD COLUMN mood mood NOT NULL DEFAULT 'meh';",
        "ALTER TABLE work_orders DROP COLUMN mood;",
    )?;
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    for t in fleet.tenants(0) {
        let meh: i64 = fleet
            .pg
            .query_scalar(
                &fleet.shards[0],
                &format!("SELECT count(*) FROM {t}.work_orders WHERE mood = 'meh'"),
            )
            .await?;
        assert_eq!(meh, 20, "{t}");
    }
    // A rollback undoes the migration after the irreversible one, and stops there on each
    // target, saying what stays and how to undo it.
    let id = status["plan_id"].as_str().unwrap().to_string();
    let out = fleet
        .cli(&["plan", "rollback", &id, "--wait", "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(1), "{out}");
    let st = out.last_json()?;
    assert_eq!(st["state"], "rollback_failed", "{st}");
    let failures = st["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 2, "{st}");
    for f in failures {
        let m = f["message"].as_str().unwrap();
        assert!(
            f["migration"] == "002_mood_meh"
                && m.contains("(irreversible)")
                && m.contains("so do the steps before it")
                && m.contains(&format!("plan rollback {id} --down-from")),
            "{f}"
        );
    }
    let columns: i64 = fleet
        .pg
        .query_scalar(
            &fleet.shards[0],
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'mood'",
        )
        .await?;
    assert_eq!(columns, 0, "003 undone on both tenants");
    Ok(())
}

/// A plan run again after other plans applied migrations on the targets it runs again on
/// is refused, naming them (its steps would apply older migrations over theirs: a week-old
/// plan retried re-ran its SQL on top of six later plans'), until told; then audited.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_under_a_later_plan_is_refused_until_told() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 2).await?;
    let blocked = crate::fleet::tenant_name(0, 0, 1);
    fleet
        .pg
        .psql(
            &fleet.shards[0],
            &format!("CREATE TABLE {blocked}.not_yet (id int)"),
        )
        .await?;
    let a = MigrationDir::new()?;
    a.migration(
        "001_a_col",
        "[lint]\nignore = [{ rule = \"dynamic-sql\", reason = \"fails where not_yet is\" }]\n",
        "DO $$ BEGIN IF to_regclass('not_yet') IS NOT NULL THEN RAISE EXCEPTION 'not yet'; END IF; END $$;\n\
         ALTER TABLE work_orders ADD COLUMN a_col int;",
        "ALTER TABLE work_orders DROP COLUMN a_col;",
    )?;
    let (code, first, out) = fleet
        .submit_wait(a.path(), &["--policy", "continue"])
        .await?;
    assert_eq!(code, 1, "{out}");
    let first = first["plan_id"].as_str().unwrap().to_string();
    let b = MigrationDir::new()?;
    b.migration(
        "002_b_col",
        "",
        "ALTER TABLE work_orders ADD COLUMN b_col int;",
        "ALTER TABLE work_orders DROP COLUMN b_col;",
    )?;
    let (code, second, out) = fleet.submit_wait(b.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    let second = second["plan_id"].as_str().unwrap().to_string();
    fleet
        .pg
        .psql(&fleet.shards[0], &format!("DROP TABLE {blocked}.not_yet"))
        .await?;

    let out = fleet.cli(&["plan", "retry", &first]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "later plans applied migrations on the targets it would run again on (plan {second}: 002_b_col on shard_0/{blocked})"
        )),
        "{out}"
    );
    let cols: i64 = fleet
        .pg
        .query_scalar(
            &fleet.shards[0],
            &format!("SELECT count(*) FROM information_schema.columns WHERE table_schema = '{blocked}' AND column_name = 'a_col'"),
        )
        .await?;
    assert_eq!(cols, 0, "nothing ran");

    let out = fleet
        .cli(&["plan", "retry", &first, "--ignore-later-plans", "--wait"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let audit = fleet
        .json(&["audit", "list", "--plan", &first, "--output", "json"])
        .await?;
    assert!(
        audit
            .to_string()
            .contains(&format!("past later plans (plan {second}: 002_b_col")),
        "{audit}"
    );
    Ok(())
}

/// A rollback undoes a shard's own steps after its tenants': a tenant's step uses what the
/// shard's made (here a foreign key to a shared table). Undone side by side, the shard's
/// DROP TABLE failed on the tenants' foreign keys not yet dropped (2BP01), now and then.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_undoes_the_shards_own_steps_after_its_tenants() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 4).await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_kinds",
        "scope = \"shard\"\n",
        "CREATE TABLE public.kinds (k text PRIMARY KEY); INSERT INTO public.kinds VALUES ('repair');",
        "DROP TABLE public.kinds;",
    )?;
    d.migration(
        "002_order_kind",
        "scope = \"tenant\"\n",
        "ALTER TABLE work_orders ADD COLUMN kind text REFERENCES public.kinds;",
        "ALTER TABLE work_orders DROP COLUMN kind;",
    )?;
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    let id = status["plan_id"].as_str().unwrap().to_string();
    let out = fleet
        .cli(&["plan", "rollback", &id, "--wait", "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = out.last_json()?;
    assert_eq!(st["state"], "rolled_back", "{st}");
    let kinds: i64 = fleet
        .pg
        .query_scalar(
            &fleet.shards[0],
            "SELECT count(*) FROM pg_tables WHERE tablename = 'kinds'",
        )
        .await?;
    assert_eq!(kinds, 0);
    assert_eq!(fleet.journal_total().await?, 0);
    Ok(())
}

/// A rollback after a tenant was dropped by hand passes over it (nothing of the plan is left
/// there: its steps count as undone, saying why, and its journal rows stay as its history);
/// before, its down SQL failed for ever ("relation does not exist") and the plan stayed
/// rollback_failed. A tenant renamed is not undone under its new name: the rollback says
/// what to do, and once it is renamed back it is undone.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_passes_over_a_dropped_tenant_and_names_a_renamed_one() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 3).await?;
    let d = MigrationDir::new()?;
    d.migration(
        "001_note",
        "",
        "ALTER TABLE work_orders ADD COLUMN note text",
        "ALTER TABLE work_orders DROP COLUMN note",
    )?;
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    let id = status["plan_id"].as_str().unwrap().to_string();
    let shard = &fleet.shards[0];
    let tenants = fleet.tenants(0);
    let (dropped, renamed, kept) = (&tenants[0], &tenants[1], &tenants[2]);
    fleet
        .pg
        .psql(shard, &format!("DROP SCHEMA {dropped} CASCADE"))
        .await?;
    fleet
        .pg
        .psql(
            shard,
            &format!("ALTER SCHEMA {renamed} RENAME TO moved_away"),
        )
        .await?;

    let out = fleet
        .cli(&["plan", "rollback", &id, "--wait", "--output", "json"])
        .await?;
    let st = out.last_json()?;
    assert_eq!(st["state"], "rollback_failed", "{out}");
    let failures = st["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "the renamed tenant only: {st:#}");
    let message = failures[0]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "tenant \"{renamed}\" of shard {shard} was renamed to \"moved_away\""
        )) && message.contains(&format!(
            "ALTER SCHEMA \"moved_away\" RENAME TO \"{renamed}\""
        )),
        "{message}"
    );
    assert!(!has_column(&fleet, shard, kept, "work_orders", "note").await?);
    // nothing undone under the other name
    assert!(has_column(&fleet, shard, "moved_away", "work_orders", "note").await?);

    fleet
        .pg
        .psql(
            shard,
            &format!("ALTER SCHEMA moved_away RENAME TO {renamed}"),
        )
        .await?;
    let out = fleet
        .cli(&["plan", "rollback", &id, "--wait", "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = out.last_json()?;
    assert_eq!(st["state"], "rolled_back", "{st:#}");
    assert!(!has_column(&fleet, shard, renamed, "work_orders", "note").await?);
    // the dropped tenant's journal row stays, as its history; the others' went
    let rows = fleet
        .pg
        .query_rows(shard, "SELECT target FROM flotilla.journal ORDER BY 1")
        .await?;
    assert_eq!(rows, vec![vec![dropped.clone()]]);
    // and the fleet's view does not take the passed-over tenant for a failed undo
    let show = fleet
        .json(&[
            "fleet",
            "show",
            &format!("{shard}/{dropped}"),
            "--output",
            "json",
        ])
        .await?;
    assert!(show["last_failure"].is_null(), "{show}");
    Ok(())
}

/// A coordinator listed first that takes connections and says nothing (stopped with
/// SIGSTOP, a stalled VM: its host's kernel still accepts) is passed over for the next one
/// listed. Before, the CLI waited on it for good (`plan status`, `fleet list` hung).
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_passes_over_a_coordinator_that_takes_connections_and_says_nothing()
-> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 1).await?;
    // accepts, and never reads nor writes: what a frozen process's listening socket does
    let frozen = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let frozen_at = frozen.local_addr()?;
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((conn, _)) = frozen.accept().await {
            kept.push(conn);
        }
    });
    let list = format!("http://{frozen_at},{}", fleet.addr);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        run_flotilla(
            &["--coordinator", &list, "fleet", "list", "--output", "json"],
            &[],
        ),
    )
    .await
    .context("the CLI waited on the silent coordinator")??;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("shard_0"), "{out}");
    held.abort();
    Ok(())
}

/// A command whose stdout cannot be written (a full disk: /dev/full) says so and what it
/// means, and exits 3; before, it panicked (exit 101), a submit's plan stored and its id lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_write_to_stdout_is_said_not_a_panic() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 1).await?;
    let addr = fleet.addr.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::harness::process::FLOTILLA_BIN)
            .args(["--coordinator", &addr, "plan", "list", "--output", "json"])
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::OpenOptions::new().write(true).open("/dev/full")?)
            .output()
    })
    .await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("error: writing to stdout failed (No space left on device")
            && stderr.contains("may have taken effect")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
    Ok(())
}

/// An empty coordinator address (a CI secret left unset reaches FLOTILLA_COORDINATOR as the
/// empty string) is bad input, said so (exit 2); it was "cannot reach a coordinator ()",
/// exit 3, "try again".
#[tokio::test]
async fn an_empty_coordinator_address_is_bad_input() -> anyhow::Result<()> {
    let out =
        crate::harness::run_flotilla(&["plan", "list"], &[("FLOTILLA_COORDINATOR", "")]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains(
            "no coordinator address given: --coordinator (or FLOTILLA_COORDINATOR) is empty"
        ),
        "{out}"
    );
    Ok(())
}
