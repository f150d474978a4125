//! Environments and the promotion gate: `coordinator --environments staging,production`,
//! shards placed by their `env` label, a production plan refused until its migrations
//! completed in staging (same checksums), the audited override, and `env status`; and
//! `plan test`, the up/down/up rehearsal a team's CI runs on a scratch database.
use std::path::Path;

use serde_json::Value;

use crate::fleet::{Cli, MigrationDir, TestFleet};
use crate::harness::{PgCluster, TestDir, free_port, http, run_flotilla};

/// One tenant-scoped migration `id` creating `table` (`column` in it), in `dir`.
fn migration(dir: &MigrationDir, id: &str, table: &str, column: &str) -> anyhow::Result<()> {
    dir.migration(
        id,
        "",
        &format!("CREATE TABLE {table} ({column} int);"),
        &format!("DROP TABLE {table};"),
    )
}

/// The journal's migration ids on shard `s`, sorted and deduplicated.
async fn journaled(fleet: &TestFleet, s: usize) -> anyhow::Result<Vec<String>> {
    let mut ids: Vec<String> = fleet
        .journal(s)
        .await?
        .into_iter()
        .map(|r| r[1].clone())
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

fn environment<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["environments"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no environment {name} in {status}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn production_takes_only_what_completed_in_staging_and_the_override_is_audited()
-> anyhow::Result<()> {
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let fleet = TestFleet::builder(2, 2)
        .metrics(metrics)
        .shard_labels(&["env=staging", "env=production"])
        .coordinator_args(&["--environments", "staging,production"])
        .start()
        .await?;
    let dir = MigrationDir::new()?;
    migration(&dir, "001_loyalty", "loyalty", "points")?;

    // Never ran in staging: refused, naming it, nothing touched.
    let (code, _, out) = fleet
        .submit_wait(dir.path(), &["--environment", "production"])
        .await?;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.stderr.contains("`001_loyalty` never ran in `staging`"),
        "{out}"
    );
    assert_eq!(fleet.journal_total().await?, 0, "nothing applied");
    // An unknown environment is refused naming the known ones; so is a plan naming none.
    let out = fleet
        .cli(&[
            "plan",
            "submit",
            &dir.path().to_string_lossy(),
            "--environment",
            "qa",
        ])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("unknown environment `qa`: the coordinator knows staging, production"),
        "{out}"
    );
    let out = fleet
        .cli(&["plan", "submit", &dir.path().to_string_lossy()])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("names no environment"), "{out}");

    // Staging first: only the staging shard is touched.
    let (code, st, out) = fleet
        .submit_wait(dir.path(), &["--environment", "staging"])
        .await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(st["environment"], "staging", "{st}");
    assert_eq!(journaled(&fleet, 0).await?, ["001_loyalty"]);
    assert!(
        journaled(&fleet, 1).await?.is_empty(),
        "production untouched"
    );

    // Then production is accepted, and touches production only.
    let (code, _, out) = fleet
        .submit_wait(dir.path(), &["--environment", "production"])
        .await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(journaled(&fleet, 1).await?, ["001_loyalty"]);

    // A second migration reaches staging, then is edited: production refuses it again.
    let next = MigrationDir::new()?;
    migration(&next, "002_badges", "badges", "level")?;
    let (code, _, out) = fleet
        .submit_wait(next.path(), &["--environment", "staging"])
        .await?;
    assert_eq!(code, 0, "{out}");
    migration(&next, "002_badges", "badges", "tier")?;
    let (code, _, out) = fleet
        .submit_wait(next.path(), &["--environment", "production"])
        .await?;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.stderr
            .contains("`002_badges` ran in `staging` with another checksum"),
        "{out}"
    );
    assert_eq!(
        journaled(&fleet, 1).await?,
        ["001_loyalty"],
        "nothing applied"
    );

    // The override needs a reason, and is audited with who and why.
    let out = fleet
        .cli(&[
            "plan",
            "submit",
            &next.path().to_string_lossy(),
            "--environment",
            "production",
            "--skip-promotion-check",
        ])
        .await?;
    assert_eq!(out.code(), Some(2), "{out}");
    // The dry run takes the override too (it refused, telling to pass the flag given), and
    // writes nothing of it.
    let path = next.path().to_string_lossy().into_owned();
    let dry = [
        "plan",
        "explain",
        &path,
        "--environment",
        "production",
        "--skip-promotion-check",
        "--reason",
        "hotfix INC-42",
    ];
    let out = fleet.cli(&dry).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    let out = fleet.cli(&dry[..5]).await?;
    assert_eq!(out.code(), Some(2), "without the override: {out}");
    let (code, st, out) = fleet
        .submit_wait(
            next.path(),
            &[
                "--environment",
                "production",
                "--skip-promotion-check",
                "--reason",
                "hotfix INC-42",
                "--as",
                "alice",
            ],
        )
        .await?;
    assert_eq!(code, 0, "{out}");
    let id = st["plan_id"].as_str().unwrap().to_string();
    assert_eq!(journaled(&fleet, 1).await?, ["001_loyalty", "002_badges"]);
    let audit = fleet
        .json(&["audit", "list", "--plan", &id, "--output", "json"])
        .await?;
    let skipped = audit
        .as_array()
        .and_then(|a| a.iter().find(|e| e["action"] == "skip-promotion-check"))
        .unwrap_or_else(|| panic!("no override in {audit}"));
    assert_eq!(skipped["actor"], "alice", "{skipped}");
    let detail = skipped["detail"].as_str().unwrap();
    assert!(
        detail.contains("`002_badges` ran in `staging` with another checksum")
            && detail.ends_with(": hotfix INC-42"),
        "{detail}"
    );

    // env status: each environment's shards, plans and the migrations that reached it.
    let status = fleet.json(&["env", "status", "--output", "json"]).await?;
    let staging = environment(&status, "staging");
    let production = environment(&status, "production");
    assert_eq!(staging["shards"][0]["shard"], "shard_0", "{status}");
    assert_eq!(production["shards"][0]["shard"], "shard_1", "{status}");
    assert_eq!(production["promoted_from"], "staging", "{status}");
    assert_eq!(
        staging["plans"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    assert_eq!(production["plans"][0]["plan_id"], id.as_str(), "{status}");
    let ids = |e: &Value| -> Vec<String> {
        e["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(staging), ["001_loyalty", "002_badges"], "{status}");
    assert_eq!(ids(production), ["001_loyalty", "002_badges"], "{status}");
    // Staging holds 002 with its first checksum, production with the edited one.
    assert_ne!(
        staging["migrations"][1]["checksum"], production["migrations"][1]["checksum"],
        "{status}"
    );
    // The gate's decisions, counted per environment and outcome.
    let body = http::get(metrics, "/metrics").await?.body;
    for (env, outcome, n) in [
        ("staging", "passed", 2),
        ("production", "refused", 2),
        ("production", "passed", 1),
        ("production", "skipped", 1),
    ] {
        assert!(
            body.lines()
                .any(|l| l.starts_with("flotilla_promotion_checks_total{")
                    && l.contains(&format!("environment=\"{env}\""))
                    && l.contains(&format!("outcome=\"{outcome}\""))
                    && l.ends_with(&format!(" {n}"))),
            "no {env}/{outcome} = {n} in\n{body}"
        );
    }
    let text = fleet.cli(&["env", "status"]).await?;
    assert!(text.success(), "{text}");
    assert!(
        text.stdout.contains("production (promoted from staging)"),
        "{text}"
    );
    // (After the gate's counts: a dry run counts its check too.) The dry run for staging shows staging's targets only, as a submit would choose them
    // (before, production's attached shard was listed as away and its targets as the plan's).
    let v = fleet
        .json(&[
            "plan",
            "explain",
            &dir.path().to_string_lossy(),
            "--environment",
            "staging",
            "--output",
            "json",
        ])
        .await?;
    assert_eq!(v["targets"], 2, "{v}");
    assert_eq!(v["unknown_shards"], serde_json::json!([]), "{v}");

    Ok(())
}

/// The tables COORD-2025-001 alters, as a tenant of the reference fleet has them.
const SEED: &str = "CREATE TABLE work_orders (id bigserial PRIMARY KEY, business_id uuid NOT NULL DEFAULT gen_random_uuid(),
  customer_id bigint NOT NULL, priority text NOT NULL, total_amount numeric(12,2) NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE repair_orders (id bigserial PRIMARY KEY, business_id uuid NOT NULL DEFAULT gen_random_uuid(),
  customer_id bigint NOT NULL, total_amount numeric(12,2) NOT NULL, created_at timestamptz NOT NULL DEFAULT now());";

/// Copies a migration directory tree (one level of migration directories).
fn copy_plan(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&dest)?;
            copy_plan(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

/// The schemas of the scratch database besides the catalog's and public.
async fn schemas(pg: &PgCluster) -> anyhow::Result<Vec<String>> {
    Ok(pg
        .query_rows(
            "scratch",
            "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' \
             AND nspname NOT IN ('information_schema', 'public') ORDER BY 1",
        )
        .await?
        .into_iter()
        .map(|r| r[0].clone())
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_test_passes_the_example_and_names_a_down_that_forgets_a_column() -> anyhow::Result<()>
{
    let pg = PgCluster::start().await?;
    pg.create_database("scratch").await?;
    let dsn = pg.url("scratch");
    let files = MigrationDir::new()?;
    let seed = files.path().join("seed.sql");
    std::fs::write(&seed, SEED)?;
    let seed = seed.to_string_lossy().into_owned();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/coord-2025-001");
    let test = async |plan: &Path, extra: &[&str]| {
        let p = plan.to_string_lossy().into_owned();
        let mut args = vec!["plan", "test", p.as_str(), "--dsn", dsn.as_str()];
        args.extend_from_slice(extra);
        run_flotilla(&args, &[]).await
    };

    // The seed's example: up, verify, down (schema as before), up, verify, for each.
    let out = test(&example, &["--seed", &seed]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    for id in [
        "2025.01.31_160000_hs_satisfaction_tracking",
        "2025.01.31_160001_auto_satisfaction_tracking",
    ] {
        assert!(
            out.stdout.lines().any(|l| l.starts_with("ok")
                && l.contains(id)
                && l.contains("up, verify, down, schema restored, up again, verify again")),
            "{out}"
        );
    }
    assert!(
        schemas(&pg).await?.is_empty(),
        "cleaned up: {:?}",
        schemas(&pg).await?
    );

    // A down.sql that forgets a column: exit 1, naming the migration and the column.
    let bad = MigrationDir::new()?;
    copy_plan(&example, bad.path())?;
    let down = bad
        .path()
        .join("2025.01.31_160000_hs_satisfaction_tracking/down.sql");
    let text = std::fs::read_to_string(&down)?;
    std::fs::write(
        &down,
        text.replace("  DROP COLUMN satisfaction_comments,\n", ""),
    )?;
    let out = test(bad.path(), &["--seed", &seed]).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains(
            "migration `2025.01.31_160000_hs_satisfaction_tracking`: down.sql does not undo up.sql"
        ) && out
            .stderr
            .contains("left behind by down: column work_orders.satisfaction_comments text"),
        "{out}"
    );
    assert!(
        schemas(&pg).await?.is_empty(),
        "cleaned up after a failure too"
    );

    // A seed that fails names its line (not a line of PostgreSQL's source, which sqlx
    // appends); a server that is not there is named, with why (not the pool's "timed out").
    let bad_seed = files.path().join("bad_seed.sql");
    std::fs::write(&bad_seed, "SELECT 1;\nSELEC 1;\n")?;
    let bad_seed = bad_seed.to_string_lossy().into_owned();
    let out = test(&example, &["--seed", &bad_seed]).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr
            .contains("running the seed SQL: line 2: syntax error at or near \"SELEC\"")
            && !out.stderr.contains(" at line "),
        "{out}"
    );
    let port = flotilla_testkit::free_port();
    let nowhere = format!("postgres://postgres@127.0.0.1:{port}/scratch");
    let p = example.to_string_lossy().into_owned();
    let out = run_flotilla(
        &["plan", "test", p.as_str(), "--dsn", nowhere.as_str()],
        &[],
    )
    .await?;
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(
        out.stderr.contains(&format!("127.0.0.1:{port}/scratch"))
            && out.stderr.to_lowercase().contains("refused"),
        "{out}"
    );

    // A data migration's [test]: its rows after each up, and a wrong expectation named.
    let data = MigrationDir::new()?;
    data.migration(
        "001_contacts",
        "",
        "CREATE TABLE contacts (id int PRIMARY KEY, phone text);",
        "DROP TABLE contacts;",
    )?;
    let toml = |expect: &str| {
        format!(
            "kind = \"data\"\n[data]\ntable = \"contacts\"\nkey = \"id\"\nprior_image = [\"phone\"]\n\
             batch = \"UPDATE contacts SET phone = '+' || phone WHERE id > $1 AND id <= $2\"\n\
             [test]\nsetup = \"INSERT INTO contacts VALUES (1, '555'), (2, NULL)\"\n\
             query = \"SELECT id, phone FROM contacts ORDER BY id\"\n\
             expect = [[1, \"{expect}\"], [2, \"NULL\"]]\n"
        )
    };
    data.migration("002_phone_prefix", &toml("+555"), "", "")?;
    let out = test(data.path(), &[]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout
            .contains("up, test, down, schema restored, up again, test again"),
        "{out}"
    );
    data.migration("002_phone_prefix", &toml("555"), "", "")?;
    let out = test(data.path(), &[]).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains("migration `002_phone_prefix`: [test]: the query returned [(\"1\", \"+555\"), (\"2\", NULL)]"),
        "{out}"
    );

    // Values compared as PostgreSQL prints them: a boolean `t` (TOML true or "t"), a
    // timestamp with a space (before, a JSON rendering said "true" and "T").
    let texts = MigrationDir::new()?;
    texts.migration(
        "001_texts",
        "[test]\nquery = \"SELECT true, 'f'::boolean, NULL::int, 1.50::numeric, \
         '2024-01-02 03:04:05'::timestamp\"\n\
         expect = [[true, \"f\", \"NULL\", \"1.50\", \"2024-01-02 03:04:05\"]]\n",
        "CREATE TABLE texts (id int);",
        "DROP TABLE texts;",
    )?;
    let out = test(texts.path(), &[]).await?;
    assert_eq!(out.code(), Some(0), "{out}");

    // A down that fails leaves what its up made: named in the failure, not only logged.
    let stuck = MigrationDir::new()?;
    stuck.migration(
        "001_stuck",
        "",
        "CREATE TABLE stuck (id int);",
        "DROP TABLE nosuch;",
    )?;
    let out = test(stuck.path(), &["--scope", "shard"]).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        format!("{out}").contains(
            "not cleaned up, left in the database: what `001_stuck` applied (its down failed: table \"nosuch\" does not exist)"
        ),
        "{out}"
    );
    pg.psql("scratch", "DROP TABLE stuck").await?;

    // [test] SQL that does not parse is bad input, named by its key and line, before
    // anything runs.
    let typo = MigrationDir::new()?;
    typo.migration(
        "001_typo",
        "[test]\nquery = \"SELECT 1;\\nSELEC 2\"\n",
        "CREATE TABLE typo (id int);",
        "DROP TABLE typo;",
    )?;
    let out = test(typo.path(), &[]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("migration.toml: [test] query: line 2: syntax error at or near \"SELEC\""),
        "{out}"
    );
    // `plan lint` reads the same [test] the same way (it passed the typo before).
    let p = typo.path().to_string_lossy().into_owned();
    let out = run_flotilla(&["plan", "lint", &p], &[]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr
            .contains("migration.toml: [test] query: line 2: syntax error at or near \"SELEC\""),
        "{out}"
    );

    // A shard (a database with a flotilla schema) is not a scratch database.
    pg.psql("scratch", "CREATE SCHEMA flotilla").await?;
    let out = test(&example, &["--seed", &seed]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("it is (or was) a shard"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_environment_list_stops_the_coordinator_naming_it() -> anyhow::Result<()> {
    let dir = TestDir::new("environments")?;
    let store = dir.join("flotilla.db").to_string_lossy().into_owned();
    let listen = format!("127.0.0.1:{}", free_port());
    let start = async |extra: &[&str]| {
        let mut args = vec![
            "coordinator",
            "--listen",
            listen.as_str(),
            "--store",
            store.as_str(),
        ];
        args.extend_from_slice(extra);
        run_flotilla(&args, &[]).await
    };
    let out = start(&["--environments", "staging,production,staging"]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("environment `staging` is listed twice"),
        "{out}"
    );
    let file = dir.join("environments.toml");
    std::fs::write(
        &file,
        "environments = [\"dev\", \"prod\"]\nlable = \"stage\"\n",
    )?;
    let out = start(&["--environments-file", &file.to_string_lossy()]).await?;
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("environments.toml") && out.stderr.contains("lable"),
        "{out}"
    );
    Ok(())
}
