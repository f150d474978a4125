//! The README's first command, `scripts/quickstart.sh`, as a newcomer runs it (without
//! the install step, and with the suite's own binary in place of the build): the demo
//! fleet is built in a throwaway cluster, the coordinated example is rolled on every
//! tenant, the CLI and the metrics reach it, and Ctrl-C (or `--keep`) leaves what it says.
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::Row;

use crate::harness::process::FLOTILLA_BIN;
use crate::harness::{FlotillaProcess, TestDir, free_port, pid_alive, run_flotilla, wait_until};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/quickstart.sh");
/// initdb, three shards of tenants, agents attaching and the rollout.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

fn spawn_quickstart(dir: &Path, extra: &[&str]) -> anyhow::Result<(FlotillaProcess, String)> {
    let listen = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let dir = dir.to_string_lossy().into_owned();
    let mut args = vec![
        "--dir",
        dir.as_str(),
        "--listen",
        listen.as_str(),
        "--metrics",
        metrics.as_str(),
    ];
    args.extend_from_slice(extra);
    let process = FlotillaProcess::spawn_program(
        SCRIPT,
        &args,
        &[
            ("FLOTILLA_SKIP_INSTALL", "1"),
            ("FLOTILLA_BIN", FLOTILLA_BIN),
        ],
    )?;
    Ok((process, format!("{listen}|{metrics}")))
}

/// The demo cluster's port, from the line the quickstart prints about its fleet.
fn demo_port(log: &str) -> anyhow::Result<u16> {
    let line = log
        .lines()
        .find(|l| l.starts_with("demo fleet:"))
        .context("no `demo fleet:` line in the quickstart's output")?;
    let after = line
        .split("tenant schemas on 127.0.0.1:")
        .nth(1)
        .context("the demo fleet line names no address")?;
    let port: String = after.chars().take_while(char::is_ascii_digit).collect();
    Ok(port.parse()?)
}

fn postmaster_pid(dir: &Path) -> anyhow::Result<u32> {
    let text = std::fs::read_to_string(dir.join("postgres/data/postmaster.pid"))
        .context("reading the demo cluster's postmaster.pid")?;
    Ok(text.lines().next().unwrap_or("").trim().parse()?)
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> anyhow::Result<i64> {
    let row = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await?;
    Ok(row.try_get(0)?)
}

#[tokio::test]
async fn quickstart_script_rolls_the_example_across_a_demo_fleet_and_cleans_up()
-> anyhow::Result<()> {
    let base = TestDir::new("quickstart")?;
    let dir = base.join("demo");
    // its PostgreSQL on a port of our choosing (a host whose rules allow some ports only)
    let pg_port = free_port().to_string();
    let (mut qs, addrs) = spawn_quickstart(&dir, &["--pg-port", &pg_port])?;
    let (listen, metrics) = addrs.split_once('|').expect("two addresses");
    qs.wait_for_log("Serving until Ctrl-C", READY_TIMEOUT)
        .await?;
    let log = qs.log();
    if !log.contains("is applied on every tenant") {
        bail!("the example did not complete:\n{log}");
    }

    // The catalog of every shard: 20 tenants, each with the example's columns, indexes,
    // view and journal rows, and the registry's industry labels.
    let port = demo_port(&log)?;
    assert_eq!(port.to_string(), pg_port, "--pg-port");
    for s in 0..3 {
        let pool =
            sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:{port}/shard_{s}"))
                .await?;
        let tenants = "(SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant\\_%')";
        assert_eq!(
            count(&pool, &format!("SELECT count(*) FROM {tenants} t")).await?,
            20
        );
        let columns = count(
            &pool,
            &format!(
                "SELECT count(*) FROM information_schema.columns
                  WHERE table_schema IN {tenants} AND table_name IN ('work_orders', 'repair_orders')
                    AND column_name LIKE 'satisfaction\\_%'"
            ),
        )
        .await?;
        assert_eq!(columns, 20 * 2 * 4, "satisfaction columns on shard_{s}");
        let indexes = count(
            &pool,
            &format!(
                "SELECT count(*) FROM pg_indexes WHERE schemaname IN {tenants}
                    AND indexname IN ('idx_work_orders_satisfaction', 'idx_repair_orders_satisfaction')"
            ),
        )
        .await?;
        assert_eq!(indexes, 40, "satisfaction indexes on shard_{s}");
        let views = count(
            &pool,
            &format!(
                "SELECT count(*) FROM pg_views WHERE schemaname IN {tenants}
                    AND viewname = 'unified_satisfaction_view'"
            ),
        )
        .await?;
        assert_eq!(views, 20, "views on shard_{s}");
        let journal = count(
            &pool,
            "SELECT count(*) FROM flotilla.journal WHERE migration_id LIKE '2025.01.31\\_16000%'",
        )
        .await?;
        assert_eq!(journal, 60, "journal rows on shard_{s}");
        let industries = count(&pool, "SELECT count(DISTINCT industry) FROM demo.tenants").await?;
        assert_eq!(industries, 3);
        pool.close().await;
    }

    // The CLI reaches the demo's coordinator, as the printed next steps say.
    let coordinator = format!("http://{listen}");
    let fleet = run_flotilla(
        &[
            "--coordinator",
            &coordinator,
            "fleet",
            "list",
            "--output",
            "json",
        ],
        &[],
    )
    .await?
    .expect_success()?
    .last_json()?;
    let agents = fleet.as_array().context("fleet list: not a list")?;
    assert_eq!(agents.len(), 3);
    for agent in agents {
        assert_eq!(agent["connected"], true);
        let tenants = agent["tenants"]
            .as_array()
            .context("an agent without tenants")?;
        assert_eq!(tenants.len(), 20);
        assert!(
            tenants.iter().all(|t| t["labels"]["industry"].is_string()),
            "every tenant carries its industry label: {agent}"
        );
    }
    let body = crate::harness::http::get(metrics.parse()?, "/metrics")
        .await?
        .body;
    assert!(
        body.contains("flotilla_plans_finished_total{state=\"completed\",by=\"plan\"} 1"),
        "metrics:\n{body}"
    );

    // Ctrl-C: the components stop, then the cluster, then the directory goes.
    let postmaster = postmaster_pid(&dir)?;
    qs.signal(libc::SIGINT)?;
    let status = qs
        .wait_exit(EXIT_TIMEOUT)
        .await
        .context("quickstart did not exit after SIGINT")?;
    assert!(status.success(), "exit {status}:\n{}", qs.log_tail(30));
    assert!(!dir.exists(), "{} is still there", dir.display());
    wait_until(
        "the demo's postmaster to be gone",
        EXIT_TIMEOUT,
        || async move { Ok(!pid_alive(postmaster)) },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn quickstart_keep_leaves_the_stopped_cluster_and_refuses_a_directory_in_use()
-> anyhow::Result<()> {
    let base = TestDir::new("quickstart-keep")?;
    let dir = base.join("demo");
    let (mut qs, _) = spawn_quickstart(
        &dir,
        &["--keep", "--demo-shards", "1", "--demo-tenants", "2"],
    )?;
    qs.wait_for_log("Serving until Ctrl-C", READY_TIMEOUT)
        .await?;
    let postmaster = postmaster_pid(&dir)?;
    qs.signal(libc::SIGINT)?;
    let status = qs
        .wait_exit(EXIT_TIMEOUT)
        .await
        .context("quickstart did not exit after SIGINT")?;
    assert!(status.success(), "exit {status}:\n{}", qs.log_tail(30));
    assert!(
        qs.log().contains("start it again with:"),
        "{}",
        qs.log_tail(10)
    );
    // Kept: data, plan and store; the server stopped cleanly (no pid file left).
    assert!(dir.join("postgres/data/PG_VERSION").exists());
    assert!(dir.join("coord-2025-001/plan.toml").exists());
    assert!(dir.join("flotilla.db").exists());
    assert!(!dir.join("postgres/data/postmaster.pid").exists());
    assert!(!pid_alive(postmaster));

    // The kept directory is not empty: a second quickstart there is refused, and it is
    // left as it was.
    let before = std::fs::read(dir.join("coord-2025-001/plan.toml"))?;
    let out = run_flotilla(&["quickstart", "--dir", &dir.to_string_lossy()], &[]).await?;
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("is not empty"), "{out:?}");
    assert_eq!(std::fs::read(dir.join("coord-2025-001/plan.toml"))?, before);
    assert!(dir.join("postgres/data/PG_VERSION").exists());
    Ok(())
}
