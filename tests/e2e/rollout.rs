//! Issue 2's end-to-end scenarios: files on disk -> CLI -> coordinator -> agents
//! -> PostgreSQL shards -> status back, with real processes throughout.
use crate::fleet::{Cli, MigrationDir, TestFleet, WAIT, coord_dbmate_dir};
use crate::harness::wait_until;
use crate::shards::{assert_logged_once, blocked, hold, logged_blocking_migration, release};

const COLS: &str = "satisfaction_rating,satisfaction_comments,satisfaction_survey_sent_at,satisfaction_response_method";

#[tokio::test(flavor = "multi_thread")]
async fn coordinated_plan_rolls_across_three_shards() -> anyhow::Result<()> {
    let fleet = TestFleet::start(3, 4).await?;
    let before_journal = fleet.journal_total().await?;
    assert_eq!(before_journal, 0);

    let (code, status, out) = fleet
        .submit_wait(&coord_dbmate_dir(), &["--max-parallel", "4"])
        .await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["targets"], 12);
    assert_eq!(status["steps"], 36);
    for m in status["migrations"].as_array().unwrap() {
        assert_eq!(m["applied"], 12, "{m}");
        assert_eq!(m["failed"], 0);
    }

    // The catalog of every tenant holds the change.
    for (s, db) in fleet.shards.iter().enumerate() {
        for tenant in fleet.tenants(s) {
            for table in ["work_orders", "repair_orders"] {
                let cols: String = fleet
                    .pg
                    .query_scalar(
                        db,
                        &format!(
                            "SELECT string_agg(column_name, ',' ORDER BY column_name) FROM information_schema.columns
                             WHERE table_schema = '{tenant}' AND table_name = '{table}' AND column_name LIKE 'satisfaction%'"
                        ),
                    )
                    .await?;
                let mut want: Vec<&str> = COLS.split(',').collect();
                want.sort();
                assert_eq!(cols, want.join(","), "{db}/{tenant}.{table}");
                let idx: i64 = fleet
                    .pg
                    .query_scalar(
                        db,
                        &format!("SELECT count(*) FROM pg_indexes WHERE schemaname = '{tenant}' AND indexname = 'idx_{table}_satisfaction'"),
                    )
                    .await?;
                assert_eq!(idx, 1, "{db}/{tenant} index on {table}");
            }
            let view: i64 = fleet
                .pg
                .query_scalar(
                    db,
                    &format!("SELECT count(*) FROM pg_views WHERE schemaname = '{tenant}' AND viewname = 'unified_satisfaction'"),
                )
                .await?;
            assert_eq!(view, 1, "{db}/{tenant} view");
        }
        // The journal records every step with its checksum, in the same shard.
        let journal = fleet.journal(s).await?;
        assert_eq!(journal.len(), 12, "{db} journal: {journal:?}");
        assert!(
            journal.iter().all(|r| r[2].len() == 64),
            "checksums recorded: {journal:?}"
        );
    }

    // Fleet view: three connected shards with their tenants and labels.
    let fleet_json = fleet.json(&["fleet", "list", "--output", "json"]).await?;
    let agents = fleet_json.as_array().unwrap();
    assert_eq!(agents.len(), 3);
    for a in agents {
        assert_eq!(a["connected"], true);
        assert_eq!(a["tenants"].as_array().unwrap().len(), 4);
        assert!(a["labels"]["region"].is_string());
    }

    // Re-submitting a completed plan changes nothing: every step is already applied.
    let before = fleet.fingerprint().await?;
    let seq_before = fleet
        .pg
        .query_rows(
            "shard_0",
            "SELECT target, migration_id, finished_at::text FROM flotilla.journal ORDER BY 1,2",
        )
        .await?;
    let (code, status, out) = fleet.submit_wait(&coord_dbmate_dir(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed");
    for m in status["migrations"].as_array().unwrap() {
        assert_eq!(m["already_applied"], 12, "{m}");
        assert_eq!(m["applied"], 0, "{m}");
    }
    assert_eq!(fleet.fingerprint().await?, before);
    let seq_after = fleet
        .pg
        .query_rows(
            "shard_0",
            "SELECT target, migration_id, finished_at::text FROM flotilla.journal ORDER BY 1,2",
        )
        .await?;
    assert_eq!(
        seq_before, seq_after,
        "journal rows untouched by the re-submit"
    );

    // The plans are listed, newest first, and status works by id.
    let list = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert_eq!(list.as_array().unwrap().len(), 2);
    let id = list[1]["plan_id"].as_str().unwrap().to_string();
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "completed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_tenant_rolls_every_target_back() -> anyhow::Result<()> {
    let fleet = TestFleet::start(3, 3).await?;
    // One tenant of one shard already has a conflicting column: the first
    // migration fails there (duplicate_column, 42701).
    fleet
        .pg
        .psql(
            "shard_1",
            "ALTER TABLE tenant_0004.repair_orders ADD COLUMN satisfaction_comments text",
        )
        .await?;
    let before = fleet.fingerprint().await?;

    let (code, status, out) = fleet
        .submit_wait(&coord_dbmate_dir(), &["--max-parallel", "6"])
        .await?;
    assert_eq!(code, 1, "a rolled-back plan exits 1: {out}");
    assert_eq!(status["state"], "rolled_back", "{status}");
    let failures = status["failures"].as_array().unwrap();
    let f = failures
        .iter()
        .find(|f| f["sqlstate"] == "42701")
        .unwrap_or_else(|| panic!("no 42701 failure in {status}"));
    assert_eq!(f["shard"], "shard_1");
    assert_eq!(f["tenant"], "tenant_0004");
    assert_eq!(f["migration"], "20250131160001_auto_satisfaction_tracking");
    assert!(
        status["message"].as_str().unwrap().contains("tenant_0004"),
        "{status}"
    );

    // Every target is back to its exact prior schema, and the journal is empty.
    assert_eq!(fleet.fingerprint().await?, before);
    assert_eq!(fleet.journal_total().await?, 0);

    // Text status names the failing target and SQLSTATE too.
    let id = status["plan_id"].as_str().unwrap();
    let text = fleet.cli(&["plan", "status", id]).await?;
    assert!(
        text.stdout.contains("SQLSTATE 42701") && text.stdout.contains("shard_1/tenant_0004"),
        "{text}"
    );
    Ok(())
}

pub(crate) async fn assert_refused(
    fleet: &TestFleet,
    dir: &std::path::Path,
    extra: &[&str],
    expect: &[&str],
) -> anyhow::Result<()> {
    let before = fleet.fingerprint().await?;
    let plans_before = fleet
        .json(&["plan", "list", "--output", "json"])
        .await?
        .as_array()
        .unwrap()
        .len();
    let (code, _, out) = fleet.submit_wait(dir, extra).await?;
    assert_eq!(code, 2, "bad input exits 2: {out}");
    for e in expect {
        assert!(out.stderr.contains(e), "stderr should name `{e}`: {out}");
    }
    assert_eq!(fleet.fingerprint().await?, before, "no shard touched");
    let plans_after = fleet
        .json(&["plan", "list", "--output", "json"])
        .await?
        .as_array()
        .unwrap()
        .len();
    assert_eq!(plans_before, plans_after, "nothing stored");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_error_and_changes_nothing() -> anyhow::Result<()> {
    let fleet = TestFleet::start(2, 2).await?;
    let add = |n: &str| format!("ALTER TABLE work_orders ADD COLUMN {n} int");
    let drop = |n: &str| format!("ALTER TABLE work_orders DROP COLUMN {n}");

    // A dependency cycle, named.
    let d = MigrationDir::new()?;
    d.migration("001_a", "depends_on = [\"003_c\"]\n", &add("a"), &drop("a"))?;
    d.migration("002_b", "depends_on = [\"001_a\"]\n", &add("b"), &drop("b"))?;
    d.migration("003_c", "depends_on = [\"002_b\"]\n", &add("c"), &drop("c"))?;
    assert_refused(&fleet, d.path(), &[], &["cycle", "001_a", "002_b", "003_c"]).await?;

    // An unknown dependency.
    let d = MigrationDir::new()?;
    d.migration(
        "001_a",
        "depends_on = [\"000_missing\"]\n",
        &add("a"),
        &drop("a"),
    )?;
    // (where it is declared: the migration's own directory)
    let declared = format!("(depends_on in {})", d.path().join("001_a").display());
    assert_refused(&fleet, d.path(), &[], &["000_missing", &declared]).await?;

    // A duplicate id: the same migration in both formats.
    let d = MigrationDir::new()?;
    d.migration("20250101000000_x", "", &add("a"), &drop("a"))?;
    std::fs::write(
        d.path().join("20250101000000_x.sql"),
        format!(
            "-- migrate:up\n{};\n-- migrate:down\n{};\n",
            add("a"),
            drop("a")
        ),
    )?;
    assert_refused(&fleet, d.path(), &[], &["20250101000000_x"]).await?;

    // A malformed metadata file names the file.
    let d = MigrationDir::new()?;
    d.migration("001_a", "depends_on = 7\nrisk = \n", &add("a"), &drop("a"))?;
    assert_refused(&fleet, d.path(), &[], &["migration.toml"]).await?;

    // An empty target set.
    let d = MigrationDir::new()?;
    d.migration("001_a", "", &add("a"), &drop("a"))?;
    assert_refused(
        &fleet,
        d.path(),
        &["--selector", "region in (nowhere)"],
        &["empty target set"],
    )
    .await?;

    // Transaction control inside a migration.
    let d = MigrationDir::new()?;
    d.migration("001_a", "", &format!("{}; COMMIT;", add("a")), &drop("a"))?;
    assert_refused(&fleet, d.path(), &[], &["001_a", "COMMIT"]).await?;

    // Hostile names stay data: a tenant called `tenant_x"; drop ...` is just a schema.
    fleet
        .pg
        .psql(
            "shard_0",
            "CREATE SCHEMA \"tenant_x\"\"; DROP TABLE tenant_0000.work_orders; --\"",
        )
        .await?;

    // An applied migration edited afterwards: refused, naming migration and targets.
    let d = MigrationDir::new()?;
    d.migration(
        "001_a",
        "",
        "CREATE TABLE IF NOT EXISTS audit_note (id int)",
        "DROP TABLE audit_note",
    )?;
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed");
    // The hostile tenant got the table too, and no other table was dropped.
    let n: i64 = fleet
        .pg
        .query_scalar("shard_0", "SELECT count(*) FROM pg_tables WHERE tablename = 'work_orders' AND schemaname LIKE 'tenant_%'")
        .await?;
    assert_eq!(n, 2);
    d.migration(
        "001_a",
        "",
        "CREATE TABLE IF NOT EXISTS audit_note (id int, edited int)",
        "DROP TABLE audit_note",
    )?;
    assert_refused(
        &fleet,
        d.path(),
        &[],
        &[
            "001_a",
            "the file was edited after it was applied",
            "shard_0/tenant_0000",
        ],
    )
    .await?;
    // The file as applied again, and one journal row edited by hand: the refusal says the
    // other targets record the file's checksum (it blamed the file).
    d.migration(
        "001_a",
        "",
        "CREATE TABLE IF NOT EXISTS audit_note (id int)",
        "DROP TABLE audit_note",
    )?;
    fleet
        .pg
        .psql(
            "shard_0",
            "UPDATE flotilla.journal SET checksum = repeat('0', 64) WHERE target = 'tenant_0000' AND migration_id = '001_a'",
        )
        .await?;
    assert_refused(
        &fleet,
        d.path(),
        &[],
        &[
            "001_a",
            "differs from the one the journal records on shard_0/tenant_0000",
            "other target(s) record the file's checksum",
        ],
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_plan_reconciles_from_its_journal() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(2, 4).await?;
    // Each tenant records, in the migration's own transaction, that it ran: a
    // step applied twice would leave two rows. One tenant of shard_0 waits on
    // an advisory lock the test holds, so the agent can be killed mid-plan.
    let d = MigrationDir::new()?;
    logged_blocking_migration(&d, "tenant_0002", 4242)?;
    d.migration(
        "002_more",
        "",
        "INSERT INTO applied_log VALUES ('002'); ALTER TABLE work_orders ADD COLUMN reconciled int",
        "ALTER TABLE work_orders DROP COLUMN reconciled; DELETE FROM applied_log WHERE step = '002'",
    )?;
    let lock_conn = hold(&fleet.pg, 0, 4242).await?;

    let id = fleet.submit(d.path(), &[]).await?;

    // Wait until every other tenant of shard_0 is done and tenant_0002 is blocked.
    wait_until(
        "three tenants of shard_0 journaled, one blocked",
        WAIT,
        async || {
            let done: i64 = fleet
                .pg
                .query_scalar("shard_0", "SELECT count(*) FROM flotilla.journal")
                .await?;
            let waiting = blocked(&fleet.pg, 0).await?;
            Ok(done == 6 && waiting == 1)
        },
    )
    .await?;
    let mut agent = fleet.agents[0].take().unwrap();
    agent.kill()?;
    release(lock_conn, 4242).await?;

    // The plan waits for the shard; a new agent reconciles from the journal.
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "running", "{st}");
    fleet.agents[0] = Some(fleet.spawn_agent(0)?);
    let (out, st) = fleet.watch(&id).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");

    // Exactly once: one journal row per step and one log row per step per tenant.
    for (s, db) in fleet.shards.iter().enumerate() {
        assert_eq!(fleet.journal(s).await?.len(), 8, "{db}");
        for tenant in fleet.tenants(s) {
            assert_logged_once(&fleet.pg, db, &tenant, &["001", "002"]).await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_command_undoes_a_completed_plan_in_reverse_order() -> anyhow::Result<()> {
    let fleet = TestFleet::start(2, 2).await?;
    let before = fleet.fingerprint().await?;
    // --no-fuse: every step in its own transaction, the two parallel-group
    // migrations of a tenant at once.
    let (code, status, out) = fleet
        .submit_wait(&coord_dbmate_dir(), &["--no-fuse"])
        .await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed");
    assert_ne!(fleet.fingerprint().await?, before);
    let id = status["plan_id"].as_str().unwrap().to_string();

    // The view depends on both tables' columns: undoing in the wrong order fails.
    let out = fleet
        .cli(&[
            "plan", "rollback", &id, "--wait", "--reason", "test", "--output", "json",
        ])
        .await?;
    assert_eq!(
        out.code(),
        Some(0),
        "a rollback that rolled the plan back exits 0: {out}"
    );
    let st = fleet.status(&id).await?;
    assert_eq!(st["state"], "rolled_back", "{st}");
    for m in st["migrations"].as_array().unwrap() {
        assert_eq!(m["rolled_back"], m["total"], "{m}");
    }
    assert_eq!(fleet.fingerprint().await?, before);
    assert_eq!(fleet.journal_total().await?, 0);
    let history: i64 = fleet
        .pg
        .query_scalar("shard_0", "SELECT count(*) FROM flotilla.journal_history")
        .await?;
    assert_eq!(history, 6);

    // A second rollback is refused: nothing left to undo.
    let again = fleet.cli(&["plan", "rollback", &id]).await?;
    assert_eq!(again.code(), Some(2), "{again}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn quickstart_runs_the_whole_system_in_one_process() -> anyhow::Result<()> {
    use crate::fleet::{tenant_name, tenant_sql};
    use crate::harness::{FlotillaProcess, PgCluster, free_port, run_flotilla};
    let pg = PgCluster::start().await?;
    let mut shards = Vec::new();
    for s in 0..2 {
        let db = format!("shard_{s}");
        pg.create_database(&db).await?;
        let sql: String = (0..2)
            .map(|t| tenant_sql(&tenant_name(s, t, 2), 5))
            .collect();
        pg.psql(&db, &sql).await?;
        shards.push(format!("{db}={}", pg.url(&db)));
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let addr = format!("http://{listen}");
    let quick = FlotillaProcess::spawn(
        &[
            "quickstart",
            "--listen",
            &listen,
            "--shard",
            &shards[0],
            "--shard",
            &shards[1],
        ],
        &[],
    )?;
    quick
        .wait_for_log("flotilla quickstart: coordinator on", WAIT)
        .await?;
    // it says that it stays in front, as the demo does (it said nothing)
    quick.wait_for_log("Serving until Ctrl-C", WAIT).await?;
    wait_until("both embedded agents attached", WAIT, async || {
        let out = run_flotilla(
            &["--coordinator", &addr, "fleet", "list", "--output", "json"],
            &[],
        )
        .await?;
        Ok(out.stdout.matches("\"connected\":true").count() == 2)
    })
    .await?;
    let dir = coord_dbmate_dir().to_string_lossy().into_owned();
    let out = run_flotilla(
        &["--coordinator", &addr, "plan", "submit", &dir, "--wait"],
        &[],
    )
    .await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("completed"), "{out}");
    for s in 0..2 {
        let n: i64 = pg
            .query_scalar(
                &format!("shard_{s}"),
                "SELECT count(*) FROM flotilla.journal",
            )
            .await?;
        assert_eq!(n, 6, "shard_{s}: 2 tenants x 3 migrations");
    }
    Ok(())
}

/// An agent keeps open on its shard only the sessions it uses: its lanes, its lock session,
/// and one for a read beside them (the journal report, the fence). Every session open on a
/// server replays each catalog invalidation the migrations' DDL sends, idle or not (issue
/// 15: three more idle sessions a database made the 1,000-tenant floor 15-20% slower), so
/// the pool's connections rotating through short reads, each kept alive by its turn, were
/// a cost for the whole rollout. Afterwards only the lock session stays.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_keeps_open_only_the_sessions_it_uses() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 40).await?;
    let sessions = "SELECT count(*) FROM pg_stat_activity \
                    WHERE application_name = 'flotilla-agent' AND datname = current_database()";
    let count = async || fleet.pg.query_scalar::<i64>("shard_0", sessions).await;
    // The start-up inventory's reads are done and their connections closed.
    wait_until("only the agent's lock session is open", WAIT, async || {
        Ok(count().await? == 1)
    })
    .await?;

    let id = fleet
        .submit(&coord_dbmate_dir(), &["--max-parallel", "2"])
        .await?;
    // A read connection of the plan's preflight (done before the submit returned; under load
    // its reads overlap the agent's journal report) stays open, idle, for the pool's idle
    // timeout (500 ms, shard/connect.rs) while the lanes start. Counted from here: the
    // sessions in use (not idle since before this instant), so a connection the pool keeps
    // alive by handing it out in turns still counts.
    let since: String = fleet
        .pg
        .query_scalar("shard_0", "SELECT clock_timestamp()")
        .await?;
    let in_use =
        format!("{sessions} AND NOT (state = 'idle' AND state_change < '{since}'::timestamptz)");
    let count_in_use = async || fleet.pg.query_scalar::<i64>("shard_0", &in_use).await;
    let done = std::sync::atomic::AtomicBool::new(false);
    let watch = async {
        let r = fleet.watch(&id).await;
        done.store(true, std::sync::atomic::Ordering::Release);
        r
    };
    let sample = async {
        let mut seen = Vec::new();
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            seen.push(count_in_use().await?);
        }
        anyhow::Ok(seen)
    };
    let (watched, seen) = tokio::join!(watch, sample);
    let (out, st) = watched?;
    let seen = seen?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(st["state"], "completed", "{st}");
    // two lanes + the lock session (when it checks its lock) + one read beside them
    let most = seen.iter().copied().max().unwrap_or(0);
    assert!(
        most <= 4,
        "the agent's sessions on shard_0 during the rollout: {seen:?}"
    );
    assert!(most >= 2, "the samples saw the two lanes at work: {seen:?}");
    wait_until(
        "the lanes' connections closed after the plan",
        WAIT,
        async || Ok(count().await? == 1),
    )
    .await?;
    Ok(())
}
