//! Issue 16: adopting a fleet another tool migrated. Real PostgreSQL with dbmate-,
//! golang-migrate- and Flyway-shaped history tables made by the test in those tools'
//! own layouts; `fleet baseline` records what they applied, and a plan then runs only
//! what is pending. Dirty or failed histories are refused with nothing recorded, and a
//! dry run writes nothing.
use std::path::Path;

use serde_json::Value;

use crate::fleet::{Cli, TestFleet};

/// dbmate's own table (`dbmate` creates it so).
const DBMATE_TABLE: &str = "CREATE TABLE {s}.schema_migrations (version varchar(128) PRIMARY KEY)";
/// golang-migrate's own table (its postgres driver creates it so).
const GOLANG_TABLE: &str = "CREATE TABLE {s}.schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL)";
/// Flyway's own table (Flyway 10 creates it so on PostgreSQL).
const FLYWAY_TABLE: &str = "CREATE TABLE {s}.flyway_schema_history (
    installed_rank integer NOT NULL PRIMARY KEY, version varchar(50), description varchar(200) NOT NULL,
    type varchar(20) NOT NULL, script varchar(1000) NOT NULL, checksum integer,
    installed_by varchar(100) NOT NULL, installed_on timestamp NOT NULL DEFAULT now(),
    execution_time integer NOT NULL, success boolean NOT NULL)";

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join(name), text)?;
    Ok(())
}

/// Runs `sql` (with `{s}` standing for the schema) in every tenant schema of the fleet.
async fn on_every_tenant(fleet: &TestFleet, sql: &str) -> anyhow::Result<()> {
    for (s, db) in fleet.shards.iter().enumerate() {
        for tenant in fleet.tenants(s) {
            fleet.pg.psql(db, &sql.replace("{s}", &tenant)).await?;
        }
    }
    Ok(())
}

/// The database of a tenant's shard.
fn db_of(fleet: &TestFleet, tenant: &str) -> String {
    (0..fleet.shards.len())
        .find(|&s| fleet.tenants(s).iter().any(|t| t == tenant))
        .map(|s| fleet.shards[s].clone())
        .expect("a tenant of the fleet")
}

async fn columns(fleet: &TestFleet, tenant: &str) -> anyhow::Result<Vec<String>> {
    let rows = fleet
        .pg
        .query_rows(
            &db_of(fleet, tenant),
            &format!(
                "SELECT column_name FROM information_schema.columns
                  WHERE table_schema = '{tenant}' AND table_name = 'work_orders'
                    AND column_name LIKE 'mark_%' ORDER BY 1"
            ),
        )
        .await?;
    Ok(rows.into_iter().map(|r| r[0].clone()).collect())
}

/// Journal rows (target, migration, plan) on every shard.
async fn journals(fleet: &TestFleet) -> anyhow::Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    for s in 0..fleet.shards.len() {
        for r in fleet.journal(s).await? {
            out.push((r[0].clone(), r[1].clone(), r[3].clone()));
        }
    }
    out.sort();
    Ok(out)
}

fn targets_of(v: &Value) -> Vec<Value> {
    v["targets"].as_array().cloned().unwrap_or_default()
}

fn target<'a>(targets: &'a [Value], tenant: &str) -> &'a Value {
    targets
        .iter()
        .find(|t| t["tenant"] == tenant)
        .unwrap_or_else(|| panic!("no target {tenant} in {targets:?}"))
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// dbmate ran the first two migrations everywhere (the first only, on tenant_0003): a plan
/// submitted without a baseline is warned (and fails: the columns exist); with
/// `require_baseline` it is refused; the dry run says what would be recorded and writes
/// nothing; the baseline records it; the plan then runs only what is pending.
#[tokio::test(flavor = "multi_thread")]
async fn a_dbmate_fleet_is_baselined_then_runs_only_what_is_pending() -> anyhow::Result<()> {
    let fleet = TestFleet::start(2, 2).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    for (version, column) in [
        ("20250101000000", "a"),
        ("20250102000000", "b"),
        ("20250103000000", "c"),
    ] {
        write(
            d,
            &format!("{version}_mark_{column}.sql"),
            &format!(
                "-- migrate:up\nALTER TABLE work_orders ADD COLUMN mark_{column} int;\n\n\
                 -- migrate:down\nALTER TABLE work_orders DROP COLUMN mark_{column};\n"
            ),
        )?;
    }
    // What dbmate did: its table, its rows, and the migrations' effects.
    on_every_tenant(
        &fleet,
        &format!(
            "{DBMATE_TABLE};
             ALTER TABLE {{s}}.work_orders ADD COLUMN mark_a int;
             INSERT INTO {{s}}.schema_migrations VALUES ('20250101000000');"
        ),
    )
    .await?;
    for (s, db) in fleet.shards.iter().enumerate() {
        for tenant in fleet.tenants(s).into_iter().filter(|t| t != "tenant_0003") {
            fleet
                .pg
                .psql(
                    db,
                    &format!(
                        "ALTER TABLE {tenant}.work_orders ADD COLUMN mark_b int;
                         INSERT INTO {tenant}.schema_migrations VALUES ('20250102000000');"
                    ),
                )
                .await?;
        }
    }
    let path = d.to_string_lossy().into_owned();

    // Without a baseline: warned at submit, and the re-run fails (all-or-nothing undoes it).
    let (code, status, out) = fleet.submit_wait(d, &[]).await?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(status["state"], "rolled_back", "{status}");
    // each target with what its own history says: tenant_0003 ran mark_a alone
    assert!(
        out.stderr.contains(
            "warning: dbmate's history on shard_0/tenant_0000, shard_0/tenant_0001, \
             shard_1/tenant_0002 says 20250101000000_mark_a, 20250102000000_mark_b; \
             on shard_1/tenant_0003 says 20250101000000_mark_a: already ran there"
        ) && out.stderr.contains("fleet baseline"),
        "{out}"
    );
    assert_eq!(fleet.journal_total().await?, 0);

    // With require_baseline: refused, nothing stored or run.
    let strict = tempfile::tempdir()?;
    write(
        strict.path(),
        "plan.toml",
        &format!("require_baseline = true\nmigrations_dir = \"{path}\"\n"),
    )?;
    let out = fleet
        .cli(&[
            "plan",
            "submit",
            &strict.path().join("plan.toml").to_string_lossy(),
        ])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("require_baseline")
            && out.stderr.contains("dbmate")
            && out.stderr.contains("20250102000000_mark_b"),
        "{out}"
    );
    // The plan's dry run warns as its submit does (it said nothing of the history before).
    let out = fleet.cli(&["plan", "explain", &path]).await?;
    assert!(
        out.stdout.contains("warning: dbmate's history on")
            && out.stdout.contains("fleet baseline"),
        "{out}"
    );

    // The dry run: per target what would be recorded; nothing is written.
    let dry = fleet
        .json(&["fleet", "baseline", &path, "--dry-run", "--output", "json"])
        .await?;
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(dry["recorded_rows"], 7, "{dry}");
    let targets = targets_of(&dry);
    assert_eq!(targets.len(), 4, "{dry}");
    let t0 = target(&targets, "tenant_0000");
    assert_eq!(t0["tool"], "dbmate", "{t0}");
    assert_eq!(
        ids(&t0["recorded"]),
        ["20250101000000_mark_a", "20250102000000_mark_b"]
    );
    assert_eq!(ids(&t0["pending"]), ["20250103000000_mark_c"]);
    let t3 = target(&targets, "tenant_0003");
    assert_eq!(ids(&t3["recorded"]), ["20250101000000_mark_a"]);
    assert_eq!(
        ids(&t3["pending"]),
        ["20250102000000_mark_b", "20250103000000_mark_c"]
    );
    assert_eq!(fleet.journal_total().await?, 0, "a dry run writes nothing");

    // The baseline: recorded as applied, under one baseline id, audited.
    let done = fleet
        .json(&[
            "fleet", "baseline", &path, "--reason", "adopting", "--output", "json",
        ])
        .await?;
    let baseline_id = done["baseline_id"].as_str().unwrap().to_string();
    assert!(baseline_id.starts_with("baseline-"), "{done}");
    let rows = journals(&fleet).await?;
    assert_eq!(rows.len(), 7, "{rows:?}");
    assert!(
        rows.iter().all(|(_, _, plan)| *plan == baseline_id),
        "{rows:?}"
    );
    assert!(rows.contains(&(
        "tenant_0003".into(),
        "20250101000000_mark_a".into(),
        baseline_id.clone()
    )));
    let trail = fleet
        .json(&["audit", "list", "--plan", &baseline_id, "--output", "json"])
        .await?;
    let trail = trail.as_array().cloned().unwrap_or_default();
    assert!(
        trail.iter().any(|a| a["action"] == "baseline"
            && a["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("7 journal rows")),
        "{trail:?}"
    );
    // Again: everything is already journaled, nothing more is recorded.
    let again = fleet
        .json(&["fleet", "baseline", &path, "--output", "json"])
        .await?;
    assert_eq!(again["recorded_rows"], 0, "{again}");
    assert_eq!(journals(&fleet).await?.len(), 7);

    // The plan now runs only what is pending: no warning, and it completes.
    let (code, status, out) = fleet.submit_wait(d, &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert!(!out.stderr.contains("warning: dbmate"), "{out}");
    let counts = |id: &str| {
        status["migrations"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["id"] == id))
            .map(|m| {
                (
                    m["already_applied"].as_u64().unwrap(),
                    m["applied"].as_u64().unwrap(),
                )
            })
            .unwrap()
    };
    assert_eq!(counts("20250101000000_mark_a"), (4, 0), "{status}");
    assert_eq!(counts("20250102000000_mark_b"), (3, 1), "{status}");
    assert_eq!(counts("20250103000000_mark_c"), (0, 4), "{status}");
    for (s, _) in fleet.shards.iter().enumerate() {
        for tenant in fleet.tenants(s) {
            assert_eq!(
                columns(&fleet, &tenant).await?,
                ["mark_a", "mark_b", "mark_c"]
            );
        }
    }
    Ok(())
}

/// A tenant made the old way after the fleet was adopted (the application still makes
/// them with dbmate): its catch-up plan would run again what dbmate's history says ran
/// there. Refused as `require_baseline` refuses a plan, whatever the plans that asked
/// for catch-up said, the tenant shown behind with why; nothing runs there. Before, the
/// catch-up ran it again (here a CREATE that failed; an INSERT would have run twice).
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_made_the_old_way_is_not_caught_up_over_its_history() -> anyhow::Result<()> {
    let fleet = TestFleet::builder(1, 2)
        .agent_args(&["--discover-interval", "1s"])
        .start()
        .await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    write(
        d,
        "20250101000000_mark_a.sql",
        "-- migrate:up\nALTER TABLE work_orders ADD COLUMN mark_a int;\n\n\
         -- migrate:down\nALTER TABLE work_orders DROP COLUMN mark_a;\n",
    )?;
    write(
        d,
        "20250201000000_mark_b.sql",
        "-- migrate:up\nALTER TABLE work_orders ADD COLUMN mark_b int;\n\n\
         -- migrate:down\nALTER TABLE work_orders DROP COLUMN mark_b;\n",
    )?;
    let plan = tempfile::tempdir()?;
    write(
        plan.path(),
        "plan.toml",
        &format!(
            "catch_up = true\nmigrations_dir = \"{}\"\n",
            d.to_string_lossy()
        ),
    )?;
    let (code, _, out) = fleet
        .submit_wait(&plan.path().join("plan.toml"), &[])
        .await?;
    assert_eq!(code, 0, "{out}");

    let db = fleet.shards[0].clone();
    fleet
        .pg
        .psql(&db, &crate::fleet::tenant_sql("tenant_0900", 2))
        .await?;
    fleet
        .pg
        .psql(
            &db,
            &format!(
                "{}; ALTER TABLE tenant_0900.work_orders ADD COLUMN mark_a int;
                 INSERT INTO tenant_0900.schema_migrations VALUES ('20250101000000');",
                DBMATE_TABLE.replace("{s}", "tenant_0900")
            ),
        )
        .await?;
    let failure = crate::harness::wait_for(
        "the catch-up refusal shown",
        crate::fleet::WAIT,
        async || {
            let show = fleet
                .json(&["fleet", "show", "shard_0/tenant_0900", "--output", "json"])
                .await?;
            let f = show["last_failure"].clone();
            Ok((!f.is_null()).then_some(f))
        },
    )
    .await?;
    let message = failure["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("was not accepted")
            && message.contains("require_baseline")
            && message.contains("dbmate")
            && message.contains("fleet baseline"),
        "{failure}"
    );
    let journal_rows = async || -> anyhow::Result<i64> {
        fleet
            .pg
            .query_scalar(
                &db,
                "SELECT count(*) FROM flotilla.journal WHERE target = 'tenant_0900'",
            )
            .await
    };
    assert_eq!(journal_rows().await?, 0, "nothing ran there");

    // Its history recorded (`fleet baseline`), it is caught up on what it lacks (it stayed
    // behind, still said refused, until a plan was run over it by hand).
    let path = plan.path().join("plan.toml").to_string_lossy().into_owned();
    let out = fleet
        .cli(&[
            "fleet",
            "baseline",
            &path,
            "--selector",
            "shard = shard_0, tenant = tenant_0900",
        ])
        .await?;
    assert!(out.success(), "{out}");
    crate::harness::wait_until(
        "the tenant caught up after its baseline",
        crate::fleet::WAIT,
        async || Ok(journal_rows().await? == 2),
    )
    .await?;
    let marks: i64 = fleet
        .pg
        .query_scalar(
            &db,
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'tenant_0900' \
             AND table_name = 'work_orders' AND column_name IN ('mark_a', 'mark_b')",
        )
        .await?;
    assert_eq!(marks, 2);
    // (the leader's view follows the catch-up's result, which follows its commit)
    crate::harness::wait_until(
        "the refusal gone and nothing pending",
        crate::fleet::WAIT,
        async || {
            let show = fleet
                .json(&["fleet", "show", "shard_0/tenant_0900", "--output", "json"])
                .await?;
            Ok(show["last_failure"].is_null() && show["pending"] == serde_json::json!([]))
        },
    )
    .await?;
    Ok(())
}

/// golang-migrate: one row, the last version; a dirty one anywhere refuses the whole
/// baseline with nothing recorded, naming the target; once fixed, everything up to each
/// target's version is recorded.
#[tokio::test(flavor = "multi_thread")]
async fn a_dirty_golang_migrate_state_is_refused_and_nothing_is_recorded() -> anyhow::Result<()> {
    let fleet = TestFleet::start(2, 2).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    for (n, column) in [("000001", "a"), ("000002", "b"), ("000010", "c")] {
        write(
            d,
            &format!("{n}_mark_{column}.up.sql"),
            &format!("ALTER TABLE work_orders ADD COLUMN mark_{column} int;\n"),
        )?;
        write(
            d,
            &format!("{n}_mark_{column}.down.sql"),
            &format!("ALTER TABLE work_orders DROP COLUMN mark_{column};\n"),
        )?;
    }
    on_every_tenant(
        &fleet,
        &format!("{GOLANG_TABLE}; INSERT INTO {{s}}.schema_migrations VALUES (1, false);"),
    )
    .await?;
    let db = db_of(&fleet, "tenant_0002");
    fleet
        .pg
        .psql(
            &db,
            "UPDATE tenant_0002.schema_migrations SET version = 2, dirty = true",
        )
        .await?;
    let path = d.to_string_lossy().into_owned();

    let out = fleet.cli(&["fleet", "baseline", &path]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("tenant_0002") && out.stderr.contains("dirty at version 2"),
        "{out}"
    );
    assert_eq!(
        fleet.journal_total().await?,
        0,
        "refused: nothing recorded anywhere"
    );

    fleet
        .pg
        .psql(
            &db,
            "UPDATE tenant_0002.schema_migrations SET dirty = false",
        )
        .await?;
    let done = fleet
        .json(&[
            "fleet",
            "baseline",
            &path,
            "--from",
            "golang-migrate",
            "--output",
            "json",
        ])
        .await?;
    assert_eq!(done["recorded_rows"], 5, "{done}");
    let targets = targets_of(&done);
    assert_eq!(
        ids(&target(&targets, "tenant_0002")["recorded"]),
        ["000001_mark_a", "000002_mark_b"]
    );
    assert_eq!(
        ids(&target(&targets, "tenant_0000")["pending"]),
        ["000002_mark_b", "000010_mark_c"]
    );
    assert_eq!(target(&targets, "tenant_0000")["tool"], "golang-migrate");
    assert_eq!(fleet.journal_total().await?, 5);
    Ok(())
}

/// Flyway: a failed run refuses the baseline; once repaired, applied versions (undone ones
/// not) are recorded. `--up-to` takes a fleet migrated by hand, reading no history.
#[tokio::test(flavor = "multi_thread")]
async fn flyway_histories_and_up_to_are_recorded() -> anyhow::Result<()> {
    let fleet = TestFleet::start(1, 3).await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    for (v, column) in [("1", "a"), ("1.1", "b"), ("2", "c")] {
        write(
            d,
            &format!("V{v}__mark_{column}.sql"),
            &format!("ALTER TABLE work_orders ADD COLUMN mark_{column} int;\n"),
        )?;
    }
    let row = |rank: u32, version: &str, kind: &str, success: bool| {
        format!(
            "INSERT INTO {{s}}.flyway_schema_history (installed_rank, version, description, type, script, \
             installed_by, execution_time, success) VALUES ({rank}, '{version}', 'x', '{kind}', 'V{version}__x.sql', \
             'flyway', 1, {success});"
        )
    };
    on_every_tenant(
        &fleet,
        &format!(
            "{FLYWAY_TABLE}; {} {} {} {}",
            row(1, "1", "SQL", true),
            row(2, "1.1", "SQL", true),
            row(3, "1.1", "UNDO_SQL", true),
            row(4, "1.1", "SQL", true)
        ),
    )
    .await?;
    let shard = &fleet.shards[0];
    fleet
        .pg
        .psql(
            shard,
            &row(5, "2", "SQL", false).replace("{s}", "tenant_0001"),
        )
        .await?;
    let path = d.to_string_lossy().into_owned();

    let out = fleet
        .cli(&["fleet", "baseline", &path, "--dry-run"])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("tenant_0001") && out.stderr.contains("flyway repair"),
        "{out}"
    );
    fleet
        .pg
        .psql(
            shard,
            "DELETE FROM tenant_0001.flyway_schema_history WHERE NOT success",
        )
        .await?;
    let done = fleet
        .json(&["fleet", "baseline", &path, "--output", "json"])
        .await?;
    assert_eq!(done["recorded_rows"], 6, "{done}");
    let targets = targets_of(&done);
    assert_eq!(target(&targets, "tenant_0000")["tool"], "flyway");
    assert_eq!(
        ids(&target(&targets, "tenant_0000")["recorded"]),
        ["V1__mark_a", "V1.1__mark_b"]
    );
    assert_eq!(
        ids(&target(&targets, "tenant_0000")["pending"]),
        ["V2__mark_c"]
    );

    // By hand: a second directory, no history of its own: --up-to records the first two.
    let by_hand = tempfile::tempdir()?;
    for (id, column) in [
        ("20250101000000_x", "x"),
        ("20250102000000_y", "y"),
        ("20250103000000_z", "z"),
    ] {
        write(
            by_hand.path(),
            &format!("{id}.sql"),
            &format!("-- migrate:up\nALTER TABLE work_orders ADD COLUMN mark_{column} int;\n"),
        )?;
    }
    let hand = by_hand.path().to_string_lossy().into_owned();
    let out = fleet
        .cli(&["fleet", "baseline", &hand, "--up-to", "20250109000000_nope"])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("--up-to `20250109000000_nope` is not a migration"),
        "{out}"
    );
    let done = fleet
        .json(&[
            "fleet",
            "baseline",
            &hand,
            "--up-to",
            "20250102000000_y",
            "--output",
            "json",
        ])
        .await?;
    assert_eq!(done["recorded_rows"], 6, "{done}");
    assert_eq!(
        ids(&target(&targets_of(&done), "tenant_0002")["recorded"]),
        ["20250101000000_x", "20250102000000_y"]
    );
    assert_eq!(fleet.journal_total().await?, 12);
    Ok(())
}
