//! Batched data changes (`[data]` in migration.toml): every row changed exactly once, over
//! several batches per target, resumed from the checkpoint after the agent dies mid-way.
use crate::fleet::{Cli, MigrationDir, TestFleet, WAIT};
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

/// The schema migration every backfill here depends on: the columns it fills.
fn add_columns(dir: &MigrationDir) -> anyhow::Result<()> {
    dir.migration(
        ADD_COLUMNS_ID,
        "",
        "ALTER TABLE work_orders ADD COLUMN touched int NOT NULL DEFAULT 0, ADD COLUMN score bigint;",
        "ALTER TABLE work_orders DROP COLUMN touched, DROP COLUMN score;",
    )
}

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
    let fleet = TestFleet::builder(2, 2).least_privilege().start().await?;

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

    // Bad input PostgreSQL finds: a typo'd column in the filter, after a schema migration
    // of the same plan. Refused at submit (the agents plan the filter on every target),
    // naming the change, its file, the part, the targets and PostgreSQL's message; the
    // schema migration applied nowhere. Before, it applied everywhere and the backfill's
    // first batch failed.
    let typo = MigrationDir::new()?;
    add_columns(&typo)?;
    typo.migration(
        BACKFILL_ID,
        &backfill_toml(7, true).replace("touched = 0\"", "touchd = 0\""),
        "",
        BACKFILL_DOWN,
    )?;
    let (code, _, out) = fleet.submit_wait(typo.path(), &[]).await?;
    assert_eq!(code, 2, "{out}");
    let file = typo.path().join(BACKFILL_ID);
    assert!(
        out.stderr.contains(&format!(
            "data migration `{BACKFILL_ID}` ({}) cannot run on ",
            file.display()
        )) && out
            .stderr
            .contains("its filter is refused by PostgreSQL: column \"touchd\" does not exist")
            && out.stderr.contains("tenant"),
        "{out}"
    );
    assert_eq!(fleet.journal_total().await?, 0, "nothing applied");

    // The columns the filter and batch name come with the plan's schema migration: not
    // there at submit, so their check is skipped, and said to be.
    let dir = MigrationDir::new()?;
    add_columns(&dir)?;
    dir.migration(BACKFILL_ID, &backfill_toml(7, true), "", BACKFILL_DOWN)?;
    let (code, status, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert!(
        out.stderr.contains(&format!(
            "data migration `{BACKFILL_ID}` ({}): its SQL was not checked on 4 target(s)",
            dir.path().join(BACKFILL_ID).display()
        )) && out.stderr.contains("mentions touched"),
        "{out}"
    );

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
    // each line names its lane once (a lane started by another nested in it)
    assert!(log.contains("lane{") && !log.contains("}:lane{"), "{log}");
    // The finished plan's status (from the store) keeps each target's final figures.
    let id = status["summary"]["plan_id"]
        .as_str()
        .or(status["plan_id"].as_str())
        .expect("a plan id")
        .to_string();
    let st = fleet.status(&id).await?;
    let data = st["data"].as_array().expect("data progress");
    assert_eq!(data.len(), 4, "{st}");
    for d in data {
        assert_eq!(d["state"], "done", "{d}");
        assert_eq!(d["rows_done"], 20, "{d}");
        assert_eq!(d["rows_total"], 20, "{d}");
        assert_eq!(d["batches"], 3, "{d}");
    }
    Ok(())
}

/// Each batch's transaction also finds the next batch's page and hands it back as the last
/// row of its query. Batch statements that return rows of their own (`RETURNING`, a
/// `SELECT`) do not confuse it; a full last page finds an empty next page and ends there;
/// an adapted batch size (here halved after every slow batch) asks for the page again at the
/// new size. 20 rows per tenant in batches of 5: every row once, all counted, no checkpoint.
#[tokio::test(flavor = "multi_thread")]
async fn the_next_page_found_in_each_batch_survives_returned_rows_and_resizing()
-> anyhow::Result<()> {
    let fleet = TestFleet::builder(1, 2).start().await?;
    let dir = MigrationDir::new()?;
    add_columns(&dir)?;
    let returning = |target_batch: &str| {
        format!(
            "kind = \"data\"\ndepends_on = [\"{ADD_COLUMNS_ID}\"]\n[data]\n\
             table = \"work_orders\"\nkey = \"id\"\nbatch_size = 5\n{target_batch}\
             filter = \"touched = 0\"\n\
             batch = \"UPDATE work_orders SET touched = touched + 1, score = id * 10 \
             WHERE id > $1 AND id <= $2 RETURNING id, score; \
             SELECT count(*) FROM work_orders WHERE id > $1 AND id <= $2\"\n"
        )
    };
    dir.migration(BACKFILL_ID, &returning(""), "", BACKFILL_DOWN)?;
    let (code, status, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(not_once(&fleet, 0).await?, (0, 40));
    assert_eq!(checkpoints(&fleet, 0).await?, 0);
    let id = status["summary"]["plan_id"]
        .as_str()
        .or(status["plan_id"].as_str())
        .expect("a plan id")
        .to_string();
    let st = fleet.status(&id).await?;
    for d in st["data"].as_array().expect("data progress") {
        assert_eq!(d["state"], "done", "{d}");
        assert_eq!(d["rows_done"], 20, "{d}");
        // 4 full batches; the 4th one's next page was empty, so no 5th
        assert_eq!(d["batches"], 4, "{d}");
    }

    // the same change again from scratch, with a batch size that a 1 ms target keeps halving
    fleet
        .pg
        .psql(
            &fleet.shards[0],
            &fleet
                .tenants(0)
                .iter()
                .map(|t| format!("UPDATE {t}.work_orders SET touched = 0, score = NULL;"))
                .collect::<String>(),
        )
        .await?;
    let again = MigrationDir::new()?;
    again.migration(
        "20250201000002_backfill_touched_adapted",
        &returning("target_batch_ms = 1\nmin_batch_size = 1\n")
            .replace(&format!("depends_on = [\"{ADD_COLUMNS_ID}\"]\n"), ""),
        "",
        BACKFILL_DOWN,
    )?;
    let (code, status, out) = fleet.submit_wait(again.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(not_once(&fleet, 0).await?, (0, 40));
    assert_eq!(checkpoints(&fleet, 0).await?, 0);
    Ok(())
}

/// The agent of shard_0 exits (failpoint, exit code 86) right after its 4th committed batch;
/// the restarted agent goes on from the checkpoints. Every row is changed exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_resumes_from_the_checkpoint() -> anyhow::Result<()> {
    let mut fleet = TestFleet::builder(2, 2)
        .least_privilege()
        .shard_sql(|_, tenants| touched_columns(tenants))
        .start()
        .await?;
    // shard_0's agent again, with the failpoint armed
    fleet.agents[0].take().unwrap().kill()?;
    let dsn = fleet.agent_dsn(0);
    let password_file = fleet.agent_logins[0]
        .password_file
        .to_string_lossy()
        .into_owned();
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
        "--password-file",
        password_file.as_str(),
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
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");

    for s in 0..2 {
        assert_eq!(not_once(&fleet, s).await?, (0, 40), "shard {s}");
        assert_eq!(checkpoints(&fleet, s).await?, 0, "shard {s}");
        assert_eq!(fleet.journal(s).await?.len(), 2, "shard {s}");
    }
    assert_resumed(&fleet);
    Ok(())
}

/// 20 rows in batches of 5 at 10 rows/s: the first batch at once (the bucket holds one),
/// the other 15 rows take 1.5s. A table that does not exist is refused at submit, named.
#[tokio::test(flavor = "multi_thread")]
async fn the_rate_limit_holds_and_a_missing_table_is_named() -> anyhow::Result<()> {
    let fleet = TestFleet::builder(1, 1)
        .least_privilege()
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
    // refused at submit by the data preflight (exit 2), naming the table
    let (code, _, out) = fleet.submit_wait(missing.path(), &[]).await?;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.stderr.contains("\"no_such_table\" does not exist"),
        "{out}"
    );
    assert_eq!(checkpoints(&fleet, 0).await?, 0);
    Ok(())
}

/// One shard, one tenant of 400 rows with `touched`/`score`, and a signal table the
/// health check reads (`public.load`).
async fn slow_backfill_fleet() -> anyhow::Result<TestFleet> {
    backfill_fleet(1, 380).await
}

/// `shards` shards of one tenant each, with `touched`/`score` and `extra` rows more than the
/// tenant's 20, and `public.load`.
async fn backfill_fleet(shards: usize, extra: usize) -> anyhow::Result<TestFleet> {
    TestFleet::builder(shards, 1)
        .least_privilege()
        .shard_sql(move |_, tenants| {
            let t = &tenants[0];
            format!(
                "ALTER TABLE {t}.work_orders ADD COLUMN touched int NOT NULL DEFAULT 0, ADD COLUMN score bigint;
                 INSERT INTO {t}.work_orders (customer_id, priority, total_amount)
                   SELECT g % 97, 'normal', g FROM generate_series(1, {extra}) g;
                 ANALYZE {t}.work_orders;
                 CREATE TABLE public.load (v int NOT NULL);
                 INSERT INTO public.load VALUES (0);
                 -- the health check runs as the agent's role (least_privilege)
                 GRANT SELECT ON public.load TO PUBLIC;"
            )
        })
        .start()
        .await
}

/// Submits the backfill in batches of 10 at 100 rows/s (`extra` appended to its
/// migration.toml) and waits until at least `at_rows` rows are done; returns its directory
/// and plan id.
async fn start_slow_backfill(
    fleet: &TestFleet,
    extra: &str,
    args: &[&str],
    at_rows: i64,
) -> anyhow::Result<(MigrationDir, String)> {
    let dir = MigrationDir::new()?;
    let toml = slow_backfill_toml() + extra;
    dir.migration(BACKFILL_ID, &toml, "", BACKFILL_DOWN)?;
    let id = fleet.submit(dir.path(), args).await?;
    crate::harness::wait_until(&format!("{at_rows} rows done"), WAIT, async || {
        Ok(checkpoint_rows(fleet).await? >= at_rows)
    })
    .await?;
    Ok((dir, id))
}

/// A random point of the slow backfill's 400 rows, in `range`, printed so that a failing
/// run can be told apart.
fn random_rows(what: &str, range: std::ops::RangeInclusive<i64>) -> i64 {
    let at = rand::random_range(range);
    eprintln!("{what} at {at} rows");
    at
}

/// How often `public.load` was read (the health check's reads).
async fn load_scans(fleet: &TestFleet) -> anyhow::Result<i64> {
    fleet
        .pg
        .query_scalar(
            &fleet.shards[0],
            "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'load'",
        )
        .await
}

/// Rows the checkpoint of the running change says are done (0 before the first batch).
async fn checkpoint_rows(fleet: &TestFleet) -> anyhow::Result<i64> {
    checkpoint_rows_on(fleet, 0).await
}

/// [`checkpoint_rows`] on shard `s`.
async fn checkpoint_rows_on(fleet: &TestFleet, s: usize) -> anyhow::Result<i64> {
    fleet
        .pg
        .query_scalar(
            &fleet.shards[s],
            "SELECT coalesce(sum(rows), 0)::bigint FROM flotilla.checkpoints",
        )
        .await
}

async fn touched_rows(fleet: &TestFleet) -> anyhow::Result<i64> {
    touched_rows_on(fleet, 0).await
}

/// Rows of shard `s`'s first tenant changed once.
async fn touched_rows_on(fleet: &TestFleet, s: usize) -> anyhow::Result<i64> {
    let t = &fleet.tenants(s)[0];
    fleet
        .pg
        .query_scalar(
            &fleet.shards[s],
            &format!("SELECT count(*) FROM {t}.work_orders WHERE touched = 1"),
        )
        .await
}

/// Puts shard `s`'s first tenant back as it was before any backfill.
async fn untouch(fleet: &TestFleet, s: usize) -> anyhow::Result<()> {
    let t = &fleet.tenants(s)[0];
    fleet
        .pg
        .psql(
            &fleet.shards[s],
            &format!("UPDATE {t}.work_orders SET touched = 0, score = NULL"),
        )
        .await?;
    Ok(())
}

/// The backfill of [`backfill_toml`] in batches of 10 at 100 rows/s.
fn slow_backfill_toml() -> String {
    backfill_toml(10, false).replace("[data]\n", "[data]\nrows_per_second = 100\n")
}

/// Shard_0's agent logged that it resumed a change from its checkpoint.
fn assert_resumed(fleet: &TestFleet) {
    let log = fleet.agents[0].as_ref().unwrap().log();
    assert!(
        log.contains("resuming a data change from its checkpoint"),
        "{log}"
    );
}

/// The status's progress entry for the backfill, once it is in `state`.
async fn data_entry(fleet: &TestFleet, id: &str, state: &str) -> anyhow::Result<serde_json::Value> {
    crate::harness::wait_for(&format!("the backfill {state}"), WAIT, async || {
        let st = fleet.status(id).await?;
        Ok(st["data"]
            .as_array()
            .and_then(|d| d.iter().find(|e| e["state"] == state).cloned()))
    })
    .await
}

/// A custom health signal crossing its limit stops batches within one batch and shows as
/// the reason; once it is back under the limit the change goes on and ends exact.
#[tokio::test(flavor = "multi_thread")]
async fn a_health_signal_above_its_limit_throttles_the_backfill() -> anyhow::Result<()> {
    let fleet = slow_backfill_fleet().await?;
    let (_dir, id) = start_slow_backfill(
        &fleet,
        "[[data.throttle.check]]\nname = \"queue depth\"\nsql = \"SELECT v FROM public.load\"\nmax = 5\n",
        &[],
        30,
    )
    .await?;

    fleet
        .pg
        .psql(&fleet.shards[0], "UPDATE public.load SET v = 9")
        .await?;
    let at_flip = checkpoint_rows(&fleet).await?;
    let entry = data_entry(&fleet, &id, "throttled").await?;
    assert!(
        entry["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("queue depth is 9 (limit 5)"),
        "{entry}"
    );
    let stopped_at = checkpoint_rows(&fleet).await?;
    assert!(
        stopped_at <= at_flip + 10,
        "batches went on after the signal crossed its limit: {at_flip} -> {stopped_at}"
    );
    // The agent keeps reading the signal (each read scans public.load); over three more
    // reads no batch ran.
    let before = load_scans(&fleet).await?;
    crate::harness::wait_until("three more signal reads", WAIT, async || {
        Ok(load_scans(&fleet).await? >= before + 3)
    })
    .await?;
    assert_eq!(
        checkpoint_rows(&fleet).await?,
        stopped_at,
        "no batch while throttled"
    );

    fleet
        .pg
        .psql(&fleet.shards[0], "UPDATE public.load SET v = 0")
        .await?;
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(not_once(&fleet, 0).await?, (0, 400));
    Ok(())
}

/// A watch follows a backfill's rows as they move (an update at most each half second): a
/// backfill of one target sent nothing between its start and its end, its bars still on a
/// terminal and a piped watch silent for as long as it ran.
#[tokio::test(flavor = "multi_thread")]
async fn a_watch_follows_a_backfills_rows() -> anyhow::Result<()> {
    let fleet = slow_backfill_fleet().await?;
    let (_dir, id) = start_slow_backfill(&fleet, "", &[], 10).await?;
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let rows: std::collections::BTreeSet<i64> = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|st| st["state"] == "running")
        .filter_map(|st| {
            st["data"]
                .as_array()
                .and_then(|d| d.first())
                .and_then(|e| e["rows_done"].as_i64())
        })
        .collect();
    // 390 rows at 100 a second: about 4 s, 8 updates; at least three seen moving
    assert!(rows.len() >= 3, "rows seen while it ran: {rows:?}\n{out}");
    Ok(())
}

/// Pausing (at a random point) stops the backfill at a batch boundary (status: paused, with
/// its progress); nothing moves while paused; resuming finishes it with every row changed
/// once.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_backfill_stops_at_a_batch_boundary_and_resumes() -> anyhow::Result<()> {
    let fleet = slow_backfill_fleet().await?;
    let at = random_rows("pause", 10..=330);
    let (_dir, id) = start_slow_backfill(&fleet, "", &[], at).await?;
    let out = fleet
        .cli(&[
            "plan",
            "pause",
            &id,
            "--reason",
            "peak hour",
            "--output",
            "json",
        ])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let entry = data_entry(&fleet, &id, "paused").await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "paused", "{st}");
    let rows = checkpoint_rows(&fleet).await?;
    assert_eq!(entry["rows_done"].as_i64(), Some(rows), "{entry}");
    assert!(
        (350..=450).contains(&entry["rows_total"].as_i64().unwrap_or(0)),
        "estimated total: {entry}"
    );
    assert_eq!(entry["batch_size"], 10, "{entry}");
    // Every batch is done and recorded, or not done.
    assert_eq!(touched_rows(&fleet).await?, rows);
    // At 100 rows/s a batch of 10 goes every 0.1s: a second of the shard's clock past the
    // checkpoint would have held ten.
    crate::harness::wait_until("a second past the last batch", WAIT, async || {
        let past: i64 = fleet
            .pg
            .query_scalar(
                &fleet.shards[0],
                "SELECT count(*) FROM flotilla.checkpoints WHERE clock_timestamp() - updated_at > interval '1 second'",
            )
            .await?;
        Ok(past == 1)
    })
    .await?;
    assert_eq!(
        checkpoint_rows(&fleet).await?,
        rows,
        "nothing moved while paused"
    );

    let out = fleet
        .cli(&["plan", "resume", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(not_once(&fleet, 0).await?, (0, 400));

    // Pausing a shard the plan does not touch is refused, naming it.
    let out = fleet
        .cli(&["plan", "pause", &id, "--shard", "shard_9"])
        .await?;
    assert_ne!(out.code(), Some(0), "{out}");
    Ok(())
}

/// A pause outlives the coordinator and a retry. The agents hold the plan paused; before,
/// a new coordinator (or a retry) started the plan paused nowhere and said `running`, while
/// nothing moved until someone thought to resume it (and `--wait` waited for good). The
/// pause is kept with the plan now: the new coordinator shows it paused, and a shard paused
/// before a halt is still shown paused after the retry; a resume finishes each.
#[tokio::test(flavor = "multi_thread")]
async fn a_pause_outlives_a_new_coordinator_and_a_retry() -> anyhow::Result<()> {
    let mut fleet = slow_backfill_fleet().await?;
    let (_dir, id) = start_slow_backfill(&fleet, "", &[], 30).await?;
    let out = fleet.cli(&["plan", "pause", &id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    data_entry(&fleet, &id, "paused").await?;

    fleet.restart_coordinator().await?;
    // as the store has it, before the new coordinator continues it, and after
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "paused", "{st}");
    fleet
        .coordinator
        .as_ref()
        .unwrap()
        .wait_for_log("resuming plan left running", WAIT)
        .await?;
    fleet.wait_attached(1).await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "paused", "{st}");
    assert_eq!(st["paused"], serde_json::json!(["*"]), "{st}");
    // a script waiting on it comes back (exit 4: it waits for a person) rather than hang
    let out = fleet.cli(&["plan", "watch", &id]).await?;
    assert_eq!(out.code(), Some(4), "{out}");
    let out = fleet.cli(&["plan", "resume", &id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    data_entry(&fleet, &id, "running").await?;

    let shard = fleet.shards[0].clone();
    let out = fleet
        .cli(&["plan", "pause", &id, "--shard", &shard])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    // all that is left is on the paused shard: the plan waits for a person, and a script
    // waiting on it comes back (it hung)
    let out = fleet.cli(&["plan", "watch", &id]).await?;
    assert_eq!(out.code(), Some(4), "{out}");
    assert_eq!(fleet.status(&id).await?["state"], "paused");
    let out = fleet
        .cli(&["plan", "halt", &id, "--reason", "night", "--wait"])
        .await?;
    assert_eq!(fleet.status(&id).await?["state"], "halted", "{out}");
    // its step not run, but part-way (batches committed), as the text status says
    let out = fleet.cli(&["plan", "status", &id]).await?;
    assert!(
        out.stdout
            .contains("1 not run (1 part-way: stopped at a checkpoint"),
        "{out}"
    );
    let out = fleet.cli(&["plan", "retry", &id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["paused"], serde_json::json!([shard]), "{st}");
    // (all it has left is on that shard: it waits for a resume)
    assert_eq!(st["state"], "paused", "{st}");
    // resuming one shard while the plan is paused as a whole is said, not taken silently
    // (the shard stayed paused with the plan)
    let out = fleet.cli(&["plan", "pause", &id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    // a pause that changes nothing is said (it was taken quietly), as a resume's is
    let out = fleet.cli(&["plan", "pause", &id]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "plan {id} is already paused: there is nothing to pause"
        )),
        "{out}"
    );
    let out = fleet
        .cli(&["plan", "pause", &id, "--shard", &shard])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "shard {shard} of plan {id} is already paused (the plan is paused as a whole): \
             there is nothing to pause"
        )),
        "{out}"
    );
    let out = fleet
        .cli(&["plan", "resume", &id, "--shard", &shard])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "cannot resume shard {shard} of plan {id} alone: the plan is paused as a whole"
        )),
        "{out}"
    );
    // the plan's resume resumes its shards too
    let out = fleet.cli(&["plan", "resume", &id]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(
        fleet.status(&id).await?["paused"],
        serde_json::json!([]),
        "nothing paused"
    );
    // a resume with nothing paused is said, not audited as a resume
    let out = fleet.cli(&["plan", "resume", &id]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "plan {id} is not paused (nothing of it is): there is nothing to resume"
        )),
        "{out}"
    );
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(not_once(&fleet, 0).await?, (0, 400));
    Ok(())
}

/// Cancel (at a random point) under policy `stop`: the backfill stops at a batch boundary, the plan ends
/// cancelled, exactly the checkpointed rows are changed; submitted again, it goes on from
/// the checkpoint and every row is changed once.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_backfill_leaves_whole_batches_and_resumes_later() -> anyhow::Result<()> {
    let fleet = slow_backfill_fleet().await?;
    let at = random_rows("cancel", 10..=330);
    let (dir, id) = start_slow_backfill(&fleet, "", &["--policy", "stop"], at).await?;
    let out = fleet
        .cli(&["plan", "cancel", &id, "--wait", "--output", "json"])
        .await?;
    assert_eq!(
        out.code(),
        Some(0),
        "a cancel that cancelled the plan exits 0: {out}"
    );
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "cancelled", "{st}");
    let rows = checkpoint_rows(&fleet).await?;
    assert!(rows > 0 && rows < 400, "{rows}");
    assert_eq!(touched_rows(&fleet).await?, rows, "whole batches only");
    assert_eq!(not_once(&fleet, 0).await?.0, 400 - rows);
    // The text status points at what goes on from the checkpoint: for a cancelled plan a new
    // submit (it said "a retry", which refuses a cancelled plan).
    let out = fleet.cli(&["plan", "status", &id]).await?;
    assert!(
        out.stdout.contains(
            "1 not run (1 part-way: stopped at a checkpoint, which a new submit of the plan goes on from)"
        ),
        "{out}"
    );
    // The fleet's view says so too, from the shard's checkpoint (it said nothing of a
    // backfill left part-way: the target was only behind, as one never begun is).
    let target = format!("{}/{}", fleet.shards[0], fleet.tenants(0)[0]);
    let part_way = fleet_part_way(&fleet, Some(rows)).await?;
    assert_eq!(part_way.len(), 1, "{part_way:?}");
    assert_eq!(part_way[0]["target"], target.as_str());
    assert_eq!(part_way[0]["migration"], BACKFILL_ID);
    assert_eq!(part_way[0]["plan_id"], id.as_str());
    assert!(part_way[0]["batches"].as_i64() > Some(0), "{part_way:?}");
    let out = fleet.cli(&["fleet", "show", &target]).await?;
    assert!(
        out.stdout.contains("begun and not finished")
            && out
                .stdout
                .contains(&format!("{BACKFILL_ID} in plan {id}: "))
            && out.stdout.contains(&format!("({rows} rows) done")),
        "{out}"
    );

    let (code, status, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(not_once(&fleet, 0).await?, (0, 400));
    assert_resumed(&fleet);
    // finished, it is no longer part-way
    assert!(fleet_part_way(&fleet, None).await?.is_empty());
    Ok(())
}

/// `fleet status`'s steps begun and not finished, once the fleet's view has `rows` done of
/// one (None: none at all).
async fn fleet_part_way(
    fleet: &TestFleet,
    rows: Option<i64>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut last = Vec::new();
    crate::harness::wait_until("the fleet's view of part-way steps", WAIT, async || {
        let out = fleet.cli(&["fleet", "status", "--output", "json"]).await?;
        let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
        last = v["part_way"].as_array().cloned().unwrap_or_default();
        Ok(match rows {
            Some(rows) => last.iter().any(|p| p["rows"].as_i64() == Some(rows)),
            None => last.is_empty(),
        })
    })
    .await?;
    Ok(last)
}

/// SIGKILL of the agent at two random points of the backfill: each time the rows changed
/// are exactly those of the committed batches (whole batches, none twice), and the
/// restarted agent goes on from the checkpoint; at the end every row is changed once.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_at_random_points_loses_and_repeats_no_batch() -> anyhow::Result<()> {
    let mut fleet = slow_backfill_fleet().await?;
    let first = random_rows("first SIGKILL", 10..=150);
    let second = random_rows("second SIGKILL", first + 20..=first + 200);
    let (_dir, id) = start_slow_backfill(&fleet, "", &[], first).await?;
    for (i, at) in [first, second].into_iter().enumerate() {
        if i > 0 {
            crate::harness::wait_until(&format!("{at} rows done"), WAIT, async || {
                Ok(checkpoint_rows(&fleet).await? >= at)
            })
            .await?;
        }
        let status = fleet.agents[0].take().expect("the agent").kill()?;
        assert!(!status.success(), "killed: {status}");
        let rows = checkpoint_rows(&fleet).await?;
        assert!(rows >= at && rows < 400, "{rows} rows at the kill");
        assert_eq!(touched_rows(&fleet).await?, rows, "whole batches only");
        assert_eq!(not_once(&fleet, 0).await?.0, 400 - rows, "none twice");
        fleet.agents[0] = Some(fleet.spawn_agent(0)?);
    }
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(not_once(&fleet, 0).await?, (0, 400));
    assert_eq!(checkpoints(&fleet, 0).await?, 0);
    assert_resumed(&fleet);
    Ok(())
}

/// Cancel one shard of a plan (policy `continue`): that shard's backfill stops at a batch
/// boundary, whole batches only; the other shard's goes on to the end; the plan ends
/// cancelled, naming the shard. Under all-or-nothing the same request is refused, naming
/// why, and the plan goes on.
#[tokio::test(flavor = "multi_thread")]
async fn cancelling_one_shard_stops_it_and_lets_the_others_finish() -> anyhow::Result<()> {
    let fleet = backfill_fleet(2, 180).await?;
    let toml = slow_backfill_toml();

    // all-or-nothing: refused, the plan goes on
    let dir = MigrationDir::new()?;
    dir.migration(BACKFILL_ID, &toml, "", BACKFILL_DOWN)?;
    let id = fleet.submit(dir.path(), &[]).await?;
    let out = fleet
        .cli(&["plan", "cancel", &id, "--shard", "shard_0"])
        .await?;
    assert_ne!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("all-or-nothing"), "{out}");
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    for s in 0..2 {
        assert_eq!(not_once(&fleet, s).await?, (0, 200), "shard {s}");
    }

    // continue: shard_0 cancelled part-way, shard_1 finishes
    for s in 0..2 {
        untouch(&fleet, s).await?;
    }
    let dir = MigrationDir::new()?;
    let again = "20250201000003_backfill_touched_again";
    dir.migration(again, &toml, "", BACKFILL_DOWN)?;
    let id = fleet.submit(dir.path(), &["--policy", "continue"]).await?;
    let at = random_rows("cancel shard_0", 10..=120);
    crate::harness::wait_until(&format!("{at} rows done on shard_0"), WAIT, async || {
        Ok(checkpoint_rows_on(&fleet, 0).await? >= at)
    })
    .await?;
    let out = fleet
        .cli(&[
            "plan",
            "cancel",
            &id,
            "--shard",
            "shard_0",
            "--reason",
            "hot shard",
            "--wait",
            "--output",
            "json",
        ])
        .await?;
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "cancelled", "{out}\n{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap_or_default()
            .contains("shard shard_0 cancelled by"),
        "{st}"
    );
    let rows = checkpoint_rows_on(&fleet, 0).await?;
    assert!(rows >= at && rows < 200, "{rows} rows on shard_0");
    assert_eq!(
        touched_rows_on(&fleet, 0).await?,
        rows,
        "whole batches only on shard_0"
    );
    assert_eq!(not_once(&fleet, 0).await?.0, 200 - rows);
    assert_eq!(not_once(&fleet, 1).await?, (0, 200), "shard_1 finished");
    assert_eq!(checkpoints(&fleet, 1).await?, 0);
    Ok(())
}

/// The coordinator is killed (SIGKILL) at a random point of the backfill and a new one
/// starts on the same store: the agent's change goes on from where the shard's checkpoint
/// says, every row is changed once, and the data migration's verify.sql runs at the end.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_coordinator_lets_the_backfill_go_on_and_verify_runs() -> anyhow::Result<()> {
    let mut fleet = slow_backfill_fleet().await?;
    let dir = MigrationDir::new()?;
    let toml = slow_backfill_toml();
    dir.migration(BACKFILL_ID, &toml, "", BACKFILL_DOWN)?;
    std::fs::write(
        dir.path().join(BACKFILL_ID).join("verify.sql"),
        "SELECT NOT EXISTS (SELECT 1 FROM work_orders WHERE touched <> 1)",
    )?;
    let id = fleet.submit(dir.path(), &[]).await?;
    let at = random_rows("coordinator SIGKILL", 10..=300);
    crate::harness::wait_until(&format!("{at} rows done"), WAIT, async || {
        Ok(checkpoint_rows(&fleet).await? >= at)
    })
    .await?;
    fleet.restart_coordinator().await?;
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(not_once(&fleet, 0).await?, (0, 400));
    assert_eq!(checkpoints(&fleet, 0).await?, 0);

    // a verify.sql that fails leaves no journal row: the change is not recorded as applied
    untouch(&fleet, 0).await?;
    let dir = MigrationDir::new()?;
    let failing = "20250201000004_backfill_checked";
    dir.migration(failing, &backfill_toml(50, false), "", BACKFILL_DOWN)?;
    std::fs::write(
        dir.path().join(failing).join("verify.sql"),
        "SELECT count(*) = 0 FROM work_orders",
    )?;
    let (code, status, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 1, "{out}");
    assert!(status.to_string().contains("verify"), "{status}");
    let applied: i64 = fleet
        .pg
        .query_scalar(
            &fleet.shards[0],
            &format!("SELECT count(*) FROM flotilla.journal WHERE migration_id = '{failing}'"),
        )
        .await?;
    assert_eq!(applied, 0);
    Ok(())
}

/// The shard's PostgreSQL is crashed (postmaster SIGKILL) at a random point of the backfill
/// and started again (crash recovery): the batch in flight is undone with its checkpoint,
/// and the change goes on from the last committed batch to every row once.
#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_shard_resumes_the_backfill_from_its_checkpoint() -> anyhow::Result<()> {
    let mut fleet = slow_backfill_fleet().await?;
    let at = random_rows("postmaster SIGKILL", 10..=300);
    let (_dir, id) = start_slow_backfill(&fleet, "", &[], at).await?;
    // The test server runs with synchronous_commit off: a crash may lose its last commits,
    // each batch with its checkpoint. A CHECKPOINT makes the first `at` rows durable, so
    // there is always a checkpoint to resume from (a kill at a low row count could lose
    // them all, and the change would rightly start over instead).
    fleet.pg.psql(&fleet.shards[0], "CHECKPOINT").await?;
    fleet.pg.kill_postmaster().await?;
    fleet.pg.restart().await?;
    // What survived the crash still agrees: whole batches with their checkpoints.
    // The restarted shard lets the backfill go on at once: both counts come from one
    // statement (one snapshot), or a batch committed between two reads would differ.
    let t = &fleet.tenants(0)[0];
    let both: String = fleet
        .pg
        .query_scalar(
            &fleet.shards[0],
            &format!(
                "SELECT (SELECT coalesce(sum(rows), 0) FROM flotilla.checkpoints) || ' ' || \
                 (SELECT count(*) FROM {t}.work_orders WHERE touched = 1)"
            ),
        )
        .await?;
    let (rows, touched) = both.split_once(' ').expect("two counts");
    let (rows, touched): (i64, i64) = (rows.parse()?, touched.parse()?);
    assert!(rows < 400, "{rows} rows at the crash");
    assert!(
        rows >= at,
        "{rows} rows survived the crash; {at} were made durable"
    );
    assert_eq!(touched, rows, "whole batches only");
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(not_once(&fleet, 0).await?, (0, 400));
    assert_eq!(checkpoints(&fleet, 0).await?, 0);
    assert_resumed(&fleet);
    Ok(())
}

/// One tenant whose application holds the last row of `work_orders` (FOR UPDATE, in the
/// returned transaction), and a backfill submitted with lock_timeout 300ms: its first
/// batches get through, the last waits. Returns once the agent has logged a retry after
/// the lock timeout, and what committed meanwhile is checked: kept, once, with its
/// checkpoint. `extra`: the submit's arguments. With `queued_behind`, another session of
/// the application waits for the row first (it takes it and lets it go once the holder
/// ends), so the backfill waits behind that waiter, on the row's tuple lock: its retry names
/// the row all the same, and the holder beside the waiter.
async fn blocked_backfill(
    fleet: &TestFleet,
    pool: &sqlx::PgPool,
    extra: &[&str],
    queued_behind: bool,
) -> anyhow::Result<(
    sqlx::Transaction<'static, sqlx::Postgres>,
    MigrationDir,
    String,
)> {
    let t = fleet.tenants(0)[0].clone();
    let mut holder = pool.begin().await?;
    let last_row = format!(
        "SELECT id FROM {t}.work_orders WHERE id = (SELECT max(id) FROM {t}.work_orders) FOR UPDATE"
    );
    sqlx::query(sqlx::AssertSqlSafe(last_row.clone()))
        .execute(&mut *holder)
        .await?;
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await?;
    if queued_behind {
        let waiter = pool.clone();
        let sql = last_row.clone();
        tokio::spawn(async move { sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&waiter).await });
        crate::harness::wait_until(
            "the application's second session waits for the row",
            WAIT,
            async || {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE'",
                )
                .fetch_one(pool)
                .await?;
                Ok(waiting == 1)
            },
        )
        .await?;
    }
    let dir = MigrationDir::new()?;
    dir.migration(
        BACKFILL_ID,
        &format!("lock_timeout = \"300ms\"\n{}", backfill_toml(7, false)),
        "",
        BACKFILL_DOWN,
    )?;
    let id = fleet.submit(dir.path(), extra).await?;
    // the second attempt's wait is watched: its retry names the row's table
    let agent_log = || fleet.agents[0].as_ref().unwrap().log();
    let row = format!("a row of {t}.work_orders held by pid");
    // behind another waiter, the session that holds the row is named too
    let holder_named = format!("pid {holder_pid} (");
    crate::harness::wait_until(
        "a retry naming the row's table and its holder",
        WAIT,
        async || {
            let log = agent_log();
            Ok(log.contains("lock timeout; trying again after a pause")
                && log.contains(&row)
                && log.contains(&holder_named))
        },
    )
    .await?;
    let (once, twice): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FILTER (WHERE touched = 1), count(*) FILTER (WHERE touched > 1) FROM {t}.work_orders"
    )))
    .fetch_one(pool)
    .await?;
    // between its attempts the change shows as held back by the lock, not as failed
    crate::harness::wait_until("the change shown throttled by the lock", WAIT, async || {
        let st = fleet.status(&id).await?;
        let d = &st["data"][0];
        assert_ne!(d["state"], "failed", "{st}");
        Ok(d["state"] == "throttled"
            && d["reason"]
                .as_str()
                .is_some_and(|r| r.contains("lock timeout") && r.contains("trying again")))
    })
    .await?;
    assert!(
        (7..20).contains(&once) && twice == 0,
        "{once} once, {twice} twice"
    );
    assert_eq!(checkpoints(fleet, 0).await?, 1);
    Ok((holder, dir, id))
}

/// The columns the backfills here fill, already on every tenant (`shard_sql`).
fn touched_columns(tenants: &[String]) -> String {
    tenants
        .iter()
        .map(|t| {
            format!(
                "ALTER TABLE {t}.work_orders ADD COLUMN touched int NOT NULL DEFAULT 0, ADD COLUMN score bigint;\n"
            )
        })
        .collect()
}

async fn touched_column_fleet() -> anyhow::Result<TestFleet> {
    TestFleet::builder(1, 1)
        .shard_sql(|_, tenants| touched_columns(tenants))
        .start()
        .await
}

/// A batch that waits on a row the application holds gives up within the step's
/// lock_timeout and the data change is tried again after a pause, from its checkpoint: the
/// batches committed before the wait are not run again (every row changed exactly once),
/// and the change finishes once the holder lets go. Another session of the application
/// waits for the row before it: the retry names the row (not the whole table) all the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_blocked_on_a_row_goes_on_from_its_checkpoint() -> anyhow::Result<()> {
    let fleet = touched_column_fleet().await?;
    let pool = fleet.pg.pool(&fleet.shards[0]).await?;
    let (holder, _dir, id) = blocked_backfill(&fleet, &pool, &[], true).await?;
    holder.rollback().await?;
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(not_once(&fleet, 0).await?, (0, 20));
    assert_eq!(checkpoints(&fleet, 0).await?, 0);
    let journal = fleet.journal(0).await?;
    assert_eq!(journal.len(), 1, "{journal:?}");
    Ok(())
}

/// A cancel that comes while a blocked data change waits to be tried again stops it at its
/// next batch boundary, its checkpoint kept: it neither goes on retrying past the cancel
/// nor fails the plan with the lock timeout. Run again once the row is free, it goes on
/// from the checkpoint.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_stops_a_blocked_backfill_between_its_attempts() -> anyhow::Result<()> {
    let fleet = touched_column_fleet().await?;
    let pool = fleet.pg.pool(&fleet.shards[0]).await?;
    // stop: a cancel leaves what is done (a rollback's down SQL would wait on the row too)
    let (holder, dir, id) = blocked_backfill(&fleet, &pool, &["--policy", "stop"], false).await?;
    let out = fleet
        .cli(&["plan", "cancel", &id, "--wait", "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "cancelled", "{st}");
    let lock_failures = st["failures"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|f| f["sqlstate"] == "55P03").count());
    assert_eq!(lock_failures, 0, "{st}");
    assert_eq!(st["data"][0]["state"], "stopped", "{st}");
    assert_eq!(checkpoints(&fleet, 0).await?, 1);
    assert!(fleet.journal(0).await?.is_empty());

    holder.rollback().await?;
    let (code, status, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(not_once(&fleet, 0).await?, (0, 20));
    assert_eq!(checkpoints(&fleet, 0).await?, 0);
    Ok(())
}

/// A rollback of a backfill with a prior image shows its restore under way (`undoing`, the
/// rows put back, at the change's rate) while it runs: a rollback of a large backfill
/// showed nothing for a minute and more, and read as hung. Undone, nothing of it is shown.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_shows_the_prior_images_restore_under_way() -> anyhow::Result<()> {
    let fleet = slow_backfill_fleet().await?;
    let dir = MigrationDir::new()?;
    let toml = backfill_toml(10, false).replace(
        "[data]\n",
        "[data]\nrows_per_second = 100\nprior_image = [\"score\"]\n",
    );
    dir.migration(BACKFILL_ID, &toml, "", BACKFILL_DOWN)?;
    let (code, st, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    let id = st["plan_id"].as_str().unwrap().to_string();
    // the application changes 3 of its rows since: their prior image is not put back
    fleet
        .pg
        .psql(
            &fleet.shards[0],
            "UPDATE tenant_0000.work_orders SET score = -1 WHERE id IN (1, 2, 3)",
        )
        .await?;
    let out = fleet.cli(&["plan", "rollback", &id]).await?;
    assert!(out.success(), "{out}");
    let undoing = data_entry(&fleet, &id, "undoing").await?;
    assert!(
        undoing["rows_total"].as_u64().unwrap_or(0) >= 400,
        "{undoing}"
    );
    let (_, st) = fleet.watch(&id).await?;
    assert_eq!(st["state"], "rolled_back", "{st}");
    assert_eq!(st["data"], serde_json::json!([]), "{st}");
    // and its end says so (only the agent's log did; its down SQL runs after the restore)
    assert!(
        st["message"].as_str().is_some_and(|m| m.contains(&format!(
            "data change {BACKFILL_ID}: its prior image was not put back on 3 row(s) on 1 target(s)"
        ))),
        "{st}"
    );
    let scored: i64 = fleet
        .pg
        .query_scalar(
            &fleet.shards[0],
            "SELECT count(*) FROM tenant_0000.work_orders WHERE score IS NOT NULL",
        )
        .await?;
    assert_eq!(scored, 0, "every score put back");
    Ok(())
}

/// An agent gone while a batch runs, its session left on the server, which goes on and
/// commits the batch (its batch and COMMIT went in one round trip): a host that vanished,
/// whose socket the server does not see closed (here a kill -9 with the connection check
/// off in the DSN, `client_connection_check_interval=0`: a killed agent's statement ends
/// with it otherwise). The restarted agent, resuming from the checkpoint it read before that
/// commit, finds the checkpoint moved under its own first batch: it goes on from the
/// checkpoint as it is now, every row done once. Before, the step failed ("another run did
/// this batch") and the plan rolled back.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_batch_goes_on_after_the_batch_its_session_committed()
-> anyhow::Result<()> {
    let mut fleet = slow_backfill_fleet().await?;
    let unchecked = format!(
        "{}{}options[client_connection_check_interval]=0",
        fleet.agent_dsn(0),
        if fleet.agent_dsn(0).contains('?') {
            "&"
        } else {
            "?"
        }
    );
    fleet.agents[0].take().expect("the agent").kill()?;
    fleet.agents[0] = Some(fleet.spawn_agent_on(0, &unchecked)?);
    fleet.wait_attached(1).await?;
    let dir = MigrationDir::new()?;
    let toml = backfill_toml(100, false)
        .replace(
            "batch = \"UPDATE work_orders SET",
            "batch = \"WITH nap AS (SELECT pg_sleep(3)) UPDATE work_orders SET",
        )
        .replace(
            "AND id <= $2\"",
            "AND id <= $2 AND EXISTS (SELECT 1 FROM nap)\"",
        );
    dir.migration(BACKFILL_ID, &toml, "", BACKFILL_DOWN)?;
    let id = fleet.submit(dir.path(), &[]).await?;
    // the second batch under way (the first committed: the checkpoint has a key)
    crate::harness::wait_until("the first batch done", WAIT, async || {
        Ok(checkpoint_rows(&fleet).await? == 100)
    })
    .await?;
    crate::fleet::wait_running(&fleet.pg, &fleet.shards[0], "pg_sleep(3)", 1).await?;
    let status = fleet.agents[0].take().expect("the agent").kill()?;
    assert!(!status.success(), "killed: {status}");
    fleet.agents[0] = Some(fleet.spawn_agent(0)?);
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(fleet.status(&id).await?["state"], "completed");
    assert_eq!(not_once(&fleet, 0).await?, (0, 400));
    let log = fleet.agents[0].as_ref().unwrap().log();
    assert!(
        log.contains("the checkpoint moved under this run"),
        "the killed agent's batch committed after the new run read the checkpoint: {log}"
    );
    Ok(())
}

/// A rollback sent while a retry of the same halted plan was between its check and its
/// writes waits for the retry, then rolls back the plan it started: the plan ends rolled
/// back with no step left pending. Before, both read the plan halted; the rollback began,
/// the retry stored its steps pending under it, and the rolled-back plan kept them pending
/// for good, its audit naming a retry that never ran.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_racing_a_retry_leaves_no_step_pending() -> anyhow::Result<()> {
    let mut fleet = slow_backfill_fleet().await?;
    let (_dir, id) = start_slow_backfill(&fleet, "", &[], 30).await?;
    let out = fleet.cli(&["plan", "halt", &id, "--wait"]).await?;
    assert_eq!(fleet.status(&id).await?["state"], "halted", "{out}");
    fleet
        .restart_coordinator_with(&[("FAILPOINTS", "coordinator::retry_checked=return(2000)")])
        .await?;
    fleet.wait_attached(1).await?;
    let retry_args = ["plan", "retry", id.as_str()];
    let retry = fleet.cli(&retry_args);
    let rollback = async {
        fleet
            .coordinator
            .as_ref()
            .unwrap()
            .wait_for_log("failpoint coordinator::retry_checked", WAIT)
            .await?;
        fleet.cli(&["plan", "rollback", &id]).await
    };
    let (retry, rollback) = tokio::join!(retry, rollback);
    let (retry, rollback) = (retry?, rollback?);
    assert_eq!(retry.code(), Some(0), "{retry}");
    assert_eq!(rollback.code(), Some(0), "{rollback}");
    let out = fleet
        .cli(&["plan", "watch", &id, "--output", "json"])
        .await?;
    let st = out.last_json()?;
    assert_eq!(st["state"], "rolled_back", "{out}");
    let pending: i64 = st["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["pending"].as_i64().unwrap())
        .sum();
    assert_eq!(pending, 0, "{st:#}");
    // the retry ran, then the rollback undid it (its down SQL clears every score)
    let t = &fleet.tenants(0)[0];
    let scored: i64 = fleet
        .pg
        .query_scalar(
            &fleet.shards[0],
            &format!("SELECT count(*) FROM {t}.work_orders WHERE score IS NOT NULL"),
        )
        .await?;
    assert_eq!(scored, 0);
    let audit = fleet
        .json(&["audit", "list", "--plan", &id, "--output", "json"])
        .await?
        .to_string();
    let (retried, rolled) = (audit.find("\"retry\""), audit.find("\"rollback\""));
    assert!(retried.is_some() && rolled.is_some(), "{audit}");
    Ok(())
}

/// A table never analyzed has its rows counted for the progress total: the planner's guess
/// for it (ten pages' worth) read "8/680 rows" on a table of 20.
#[tokio::test(flavor = "multi_thread")]
async fn a_never_analyzed_tables_rows_are_counted_for_the_total() -> anyhow::Result<()> {
    // the backfill fleet, its table not analyzed
    let fleet = TestFleet::builder(1, 1)
        .least_privilege()
        .shard_sql(|_, tenants| {
            let t = &tenants[0];
            format!(
                "ALTER TABLE {t}.work_orders ADD COLUMN touched int NOT NULL DEFAULT 0, ADD COLUMN score bigint;
                 INSERT INTO {t}.work_orders (customer_id, priority, total_amount)
                   SELECT g % 97, 'normal', g FROM generate_series(1, 380) g;"
            )
        })
        .start()
        .await?;
    let t = &fleet.tenants(0)[0];
    let analyzed: i64 = fleet
        .pg
        .query_scalar(
            &fleet.shards[0],
            &format!(
                "SELECT count(*) FROM pg_stat_user_tables WHERE schemaname = '{t}' \
                 AND relname = 'work_orders' \
                 AND coalesce(last_analyze, last_autoanalyze) IS NOT NULL"
            ),
        )
        .await?;
    let (_dir, id) = start_slow_backfill(&fleet, "", &[], 10).await?;
    let entry = data_entry(&fleet, &id, "running").await?;
    // (counted, or, had autovacuum analyzed it meanwhile, estimated from its statistics:
    // all of its rows match the filter either way)
    assert_eq!(
        entry["rows_total"], 400,
        "analyzed before: {analyzed}; {entry}"
    );
    let out = fleet.cli(&["plan", "cancel", &id, "--wait"]).await?;
    assert_eq!(fleet.status(&id).await?["state"], "cancelled", "{out}");
    Ok(())
}

/// A table never analyzed and too large to count (over 100,000 rows): its total is the
/// table's rows from a sample of its pages. Before, the planner's guesses for the range
/// and the filter (a third, and 0.5% for `touched = 0`) put 150,000 rows at 179, and past
/// it the total read a batch ahead of the rows done, with no ETA.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_never_analyzed_table_is_sized_from_a_sample() -> anyhow::Result<()> {
    let fleet = TestFleet::builder(1, 1)
        .least_privilege()
        .shard_sql(|_, tenants| {
            let t = &tenants[0];
            format!(
                "ALTER TABLE {t}.work_orders SET (autovacuum_enabled = false);
                 ALTER TABLE {t}.work_orders ADD COLUMN touched int NOT NULL DEFAULT 0, ADD COLUMN score bigint;
                 INSERT INTO {t}.work_orders (customer_id, priority, total_amount)
                   SELECT g % 97, 'normal', g FROM generate_series(1, 150000) g;"
            )
        })
        .start()
        .await?;
    let (_dir, id) = start_slow_backfill(&fleet, "", &[], 10).await?;
    let entry = data_entry(&fleet, &id, "running").await?;
    let total = entry["rows_total"].as_i64().unwrap_or(0);
    assert!(
        (135_000..=165_000).contains(&total),
        "150,020 rows, estimated {total}: {entry}"
    );
    let out = fleet.cli(&["plan", "cancel", &id, "--wait"]).await?;
    assert_eq!(fleet.status(&id).await?["state"], "cancelled", "{out}");
    Ok(())
}

/// A data change whose filter matches no row anywhere completes, and says so: it read as
/// every step applied (a typo in a filter looked like success).
#[tokio::test(flavor = "multi_thread")]
async fn a_data_change_that_changes_no_row_says_so() -> anyhow::Result<()> {
    let fleet = slow_backfill_fleet().await?;
    let dir = MigrationDir::new()?;
    let toml = backfill_toml(100, false).replace("touched = 0\"", "touched = 42\"");
    dir.migration(BACKFILL_ID, &toml, "", BACKFILL_DOWN)?;
    let (code, status, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert!(
        status["message"].as_str().unwrap().contains(&format!(
            "data change {BACKFILL_ID} changed no row on any target (its filter"
        )),
        "{status}"
    );
    assert_eq!(touched_rows(&fleet).await?, 0);
    // one that changes rows says nothing of the kind
    let dir = MigrationDir::new()?;
    dir.migration(
        "20250201000002_backfill_for_real",
        &backfill_toml(100, false),
        "",
        BACKFILL_DOWN,
    )?;
    let (code, status, out) = fleet.submit_wait(dir.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert!(
        !status["message"]
            .as_str()
            .unwrap()
            .contains("changed no row"),
        "{status}"
    );
    Ok(())
}
