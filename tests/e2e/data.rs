//! Batched data changes (`[data]` in migration.toml): every row changed exactly once, over
//! several batches per target, resumed from the checkpoint after the agent dies mid-way.
use crate::fleet::{MigrationDir, TestFleet, WAIT};
use crate::harness::FlotillaProcess;

const ADD_COLUMNS_ID: &str = "20250201000000_add_touched";
const BACKFILL_ID: &str = "20250201000001_backfill_touched";

/// `[data]` over `work_orders` by `id`: each batch increments `touched` of its rows, so a
/// row changed twice (a batch done twice) shows as 2.
fn backfill_toml(batch_size: u32, depends_on_schema: bool) -> String {
    let depends = if depends_on_schema {
        format!("depends_on = [\"{ADD_COLUMNS_ID}\"]\n")
    } else {
        String::new()
    };
    format!(
        "kind = \"data\"\n{depends}\
         [data]\n\
         table = \"work_orders\"\n\
         key = \"id\"\n\
         batch_size = {batch_size}\n\
         filter = \"touched = 0\"\n\
         batch = \"UPDATE work_orders SET touched = touched + 1, score = id * 10 WHERE id > $1 AND id <= $2\"\n"
    )
}

const BACKFILL_DOWN: &str = "UPDATE work_orders SET score = NULL;";

/// Rows of every tenant on shard `s` whose `touched` is not exactly 1, and the row count.
async fn not_once(fleet: &TestFleet, s: usize) -> anyhow::Result<(i64, i64)> {
    let mut bad = 0;
    let mut all = 0;
    for t in fleet.tenants(s) {
        bad += fleet
            .pg
            .query_scalar::<i64>(
                &fleet.shards[s],
                &format!(
                    "SELECT count(*) FROM {t}.work_orders WHERE touched <> 1 OR score IS DISTINCT FROM id * 10"
                ),
            )
            .await?;
        all += fleet
            .pg
            .query_scalar::<i64>(
                &fleet.shards[s],
                &format!("SELECT count(*) FROM {t}.work_orders"),
            )
            .await?;
    }
    Ok((bad, all))
}

async fn checkpoints(fleet: &TestFleet, s: usize) -> anyhow::Result<i64> {
    fleet
        .pg
        .query_scalar::<i64>(
            &fleet.shards[s],
            "SELECT count(*) FROM flotilla.checkpoints",
        )
        .await
}

/// Schema step then data step in one plan, 2 shards x 2 tenants, 20 rows per tenant in
/// batches of 7 (7 + 7 + 6): every row changed once, the journal holds both steps, no
/// checkpoint is left. Before that, a batch SQL without `$2` is refused at submit.
#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_changes_every_row_once() -> anyhow::Result<()> {
    let fleet = TestFleet::start(2, 2).await?;

    // Bad input: no upper bound in the batch SQL -> exit 2, naming the migration.
    let bad = MigrationDir::new()?;
    bad.migration(
        "20250201000009_bad_backfill",
        "[data]\ntable = \"work_orders\"\nkey = \"id\"\nbatch = \"UPDATE work_orders SET priority = 'x' WHERE id > $1\"\n",
        "",
        "UPDATE work_orders SET priority = 'normal';",
    )?;
    let (code, _, out) = fleet.submit_wait(bad.path(), &[]).await?;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.stderr.contains("20250201000009_bad_backfill") && out.stderr.contains("$2"),
        "{out}"
    );
    assert_eq!(fleet.journal_total().await?, 0);

    let dir = MigrationDir::new()?;
    dir.migration(
        ADD_COLUMNS_ID,
        "",
        "ALTER TABLE work_orders ADD COLUMN touched int NOT NULL DEFAULT 0, ADD COLUMN score bigint;",
        "ALTER TABLE work_orders DROP COLUMN touched, DROP COLUMN score;",
    )?;
    dir.migration(BACKFILL_ID, &backfill_toml(7, true), "", BACKFILL_DOWN)?;
    let (code, status, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");

    for s in 0..2 {
        let (bad, all) = not_once(&fleet, s).await?;
        assert_eq!((bad, all), (0, 40), "shard {s}");
        assert_eq!(checkpoints(&fleet, s).await?, 0, "shard {s}");
        let journal = fleet.journal(s).await?;
        let backfills = journal.iter().filter(|r| r[1] == BACKFILL_ID).count();
        assert_eq!(backfills, 2, "one journal row per tenant: {journal:?}");
        assert_eq!(journal.len(), 4, "{journal:?}");
    }
    // 3 batches per tenant: the agent logs them at the end of each change
    let log = fleet.agents[0].as_ref().unwrap().log();
    assert!(log.contains("data change done"), "{log}");
    Ok(())
}

/// The agent of shard_0 exits (failpoint, exit code 86) right after its 4th committed batch;
/// the restarted agent goes on from the checkpoints. Every row is changed exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_resumes_from_the_checkpoint() -> anyhow::Result<()> {
    let mut fleet = TestFleet::builder(2, 2)
        .shard_sql(|_, tenants| {
            tenants
                .iter()
                .map(|t| {
                    format!(
                        "ALTER TABLE {t}.work_orders ADD COLUMN touched int NOT NULL DEFAULT 0, ADD COLUMN score bigint;\n"
                    )
                })
                .collect()
        })
        .start()
        .await?;
    // shard_0's agent again, with the failpoint armed
    fleet.agents[0].take().unwrap().kill()?;
    let dsn = fleet.pg.url(&fleet.shards[0]);
    let args = [
        "--coordinator",
        fleet.addr.as_str(),
        "agent",
        "--shard",
        fleet.shards[0].as_str(),
        "--dsn",
        dsn.as_str(),
        "--labels",
        "region=r0",
        "--tenant-pattern",
        "tenant_%",
    ];
    let mut dying = FlotillaProcess::spawn(
        &args,
        &[("FAILPOINTS", "agent::after_data_batch=3*off->return")],
    )?;
    fleet.wait_attached(2).await?;

    let dir = MigrationDir::new()?;
    // 20 rows in batches of 3: 7 batches per tenant, 14 on the shard
    dir.migration(BACKFILL_ID, &backfill_toml(3, false), "", BACKFILL_DOWN)?;
    let id = fleet.submit(dir.path(), &[]).await?;
    let exit = dying
        .wait_exit(WAIT)
        .await
        .expect("the failpoint ends shard_0's agent after its 4th batch");
    assert_eq!(exit.code(), Some(86), "{}", dying.log());

    // What is committed is exactly what the checkpoints say: no row twice, none lost.
    let db = &fleet.shards[0];
    let batches: i64 = fleet
        .pg
        .query_scalar(
            db,
            "SELECT coalesce(sum(batches), 0) FROM flotilla.checkpoints",
        )
        .await?;
    let rows: i64 = fleet
        .pg
        .query_scalar(
            db,
            "SELECT coalesce(sum(rows), 0) FROM flotilla.checkpoints",
        )
        .await?;
    // the 4th batch ended the process; the other tenant's batch in flight may have committed
    assert!((4..=5).contains(&batches), "{batches} batches");
    let mut touched = 0;
    for t in fleet.tenants(0) {
        let twice: i64 = fleet
            .pg
            .query_scalar(
                db,
                &format!("SELECT count(*) FROM {t}.work_orders WHERE touched > 1"),
            )
            .await?;
        assert_eq!(twice, 0, "{t}");
        touched += fleet
            .pg
            .query_scalar::<i64>(
                db,
                &format!("SELECT count(*) FROM {t}.work_orders WHERE touched = 1"),
            )
            .await?;
    }
    assert_eq!(touched, rows, "rows changed = rows in the checkpoints");
    assert!(touched < 40, "{touched}: the change stopped mid-way");

    fleet.agents[0] = Some(fleet.spawn_agent(0)?);
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet
        .json(&["plan", "status", &id, "--output", "json"])
        .await?;
    assert_eq!(st["state"], "completed", "{st}");

    for s in 0..2 {
        assert_eq!(not_once(&fleet, s).await?, (0, 40), "shard {s}");
        assert_eq!(checkpoints(&fleet, s).await?, 0, "shard {s}");
        assert_eq!(fleet.journal(s).await?.len(), 2, "shard {s}");
    }
    let log = fleet.agents[0].as_ref().unwrap().log();
    assert!(
        log.contains("resuming a data change from its checkpoint"),
        "{log}"
    );
    Ok(())
}

/// 20 rows in batches of 5 at 10 rows/s: the first batch at once (the bucket holds one),
/// the other 15 rows take 1.5s. A table that does not exist fails the step, naming it.
#[tokio::test(flavor = "multi_thread")]
async fn the_rate_limit_holds_and_a_missing_table_is_named() -> anyhow::Result<()> {
    let fleet = TestFleet::builder(1, 1)
        .shard_sql(|_, tenants| {
            format!(
                "ALTER TABLE {}.work_orders ADD COLUMN touched int NOT NULL DEFAULT 0, ADD COLUMN score bigint;",
                tenants[0]
            )
        })
        .start()
        .await?;
    let dir = MigrationDir::new()?;
    let toml = backfill_toml(5, false).replace("[data]\n", "[data]\nrows_per_second = 10\n");
    dir.migration(BACKFILL_ID, &toml, "", BACKFILL_DOWN)?;
    let started = std::time::Instant::now();
    let (code, status, out) = fleet.submit_wait(dir.path(), &[]).await?;
    let took = started.elapsed();
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(not_once(&fleet, 0).await?, (0, 20));
    assert!(
        took >= std::time::Duration::from_millis(1400),
        "20 rows at 10 rows/s took {took:?}"
    );
    eprintln!("20 rows at 10 rows/s (batches of 5): {took:?}");

    let missing = MigrationDir::new()?;
    missing.migration(
        "20250201000002_missing_table",
        "[data]\ntable = \"no_such_table\"\nkey = \"id\"\nbatch = \"UPDATE no_such_table SET x = 1 WHERE id > $1 AND id <= $2\"\n",
        "",
        "SELECT 1;",
    )?;
    let (code, status, out) = fleet.submit_wait(missing.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    assert!(
        status.to_string().contains("no_such_table")
            && status.to_string().contains("does not exist"),
        "{status}"
    );
    assert_eq!(checkpoints(&fleet, 0).await?, 0);
    Ok(())
}
