//! The lint as a process: `flotilla plan lint` over the fixture directory (one migration
//! per rule), and the same checks at submit, where an error refuses the plan before any
//! shard is touched and warnings come back with the accepted plan.
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::fleet::{Cli, MigrationDir, TestFleet};
use crate::harness::run_flotilla;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lint")
}

/// The findings of `plan lint --output json`, as (migration, rule, at).
fn findings(v: &Value) -> Vec<(String, String, String)> {
    v["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or_default().to_string();
            (s("migration"), s("rule"), s("at"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_lint_names_rule_file_and_line_and_exits_1_on_errors() -> anyhow::Result<()> {
    let dir = fixtures().to_string_lossy().into_owned();
    let out = run_flotilla(
        &[
            "plan", "lint", &dir, "--output", "json", "--rules", "naming",
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code(), Some(1), "errors exit 1: {out}");
    let v = out.last_json()?;
    let all = findings(&v);
    let has = |migration: &str, rule: &str, at_end: &str| {
        all.iter()
            .any(|(m, r, at)| m == migration && r == rule && at.ends_with(at_end))
    };
    assert!(
        has(
            "002_drop_legacy",
            "destructive-drop",
            "002_drop_legacy/up.sql:1"
        ),
        "{all:#?}"
    );
    assert!(has(
        "018_syntax_error",
        "parse-error",
        "018_syntax_error/up.sql:3"
    ));
    assert!(has(
        "015_down_forgets_column",
        "down-incomplete",
        "up.sql:1"
    ));
    assert!(has(
        "020_missing_down",
        "missing-down",
        "020_missing_down.sql"
    ));
    assert!(has(
        "019-AddFlag",
        "naming-id",
        "019-AddFlag/migration.toml"
    ));
    assert!(
        v["errors"].as_u64() > Some(0) && v["warnings"].as_u64() > Some(0),
        "{v}"
    );
    // well formed, but not valid: a script reading `valid` sees what the exit code says
    assert_eq!(
        (&v["well_formed"], &v["valid"]),
        (&Value::Bool(true), &Value::Bool(false))
    );

    // Warnings only: exit 0, and the text says where and how to fix.
    let tmp = MigrationDir::new()?;
    std::fs::write(
        tmp.path().join("20250301000000_add_index.sql"),
        "-- migrate:up\n\n-- orders are looked up by customer\nCREATE INDEX idx_orders_customer ON orders (customer_id);\n\n-- migrate:down\nDROP INDEX idx_orders_customer;\n",
    )?;
    let p = tmp.path().to_string_lossy().into_owned();
    let out = run_flotilla(&["plan", "lint", &p], &[]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    // The line is the file's (a dbmate up section starts after its marker).
    assert!(
        out.stdout
            .contains("warning[index-not-concurrent] 20250301000000_add_index at ")
            && out
                .stdout
                .contains("20250301000000_add_index.sql:4: CREATE INDEX on orders")
            && out.stdout.contains("fix: CREATE INDEX CONCURRENTLY"),
        "{out}"
    );

    // The coordinated example lints clean.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/coord-2025-001");
    let out = run_flotilla(&["plan", "lint", &example.to_string_lossy()], &[]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains("lint: no findings"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_refuses_a_lint_error_touching_no_shard_and_returns_warnings() -> anyhow::Result<()>
{
    let fleet = TestFleet::start(1, 2).await?;
    let before = fleet.fingerprint().await?;

    // Drops a column that running code reads, without saying it means to.
    let d = MigrationDir::new()?;
    d.migration(
        "001_drop_priority",
        "",
        "-- priority is computed now\nALTER TABLE work_orders DROP COLUMN priority;",
        "ALTER TABLE work_orders ADD COLUMN priority text;",
    )?;
    let p = d.path().to_string_lossy().into_owned();
    let out = fleet.cli(&["plan", "submit", &p]).await?;
    assert_eq!(out.code(), Some(2), "refused as bad input: {out}");
    assert!(
        out.stderr.contains("destructive-drop")
            && out.stderr.contains("001_drop_priority up.sql:2")
            && out.stderr.contains("destructive = true"),
        "{out}"
    );
    // Nothing stored, nothing applied, no schema changed.
    let list = fleet.json(&["plan", "list", "--output", "json"]).await?;
    assert!(
        list.as_array().is_none_or(|a| a.is_empty()),
        "no plan stored: {list}"
    );
    assert_eq!(fleet.journal_total().await?, 0);
    assert_eq!(fleet.fingerprint().await?, before);

    // Scope auto, outside the tenant's schema: a warning for `plan lint` (the scope is the
    // fleet's to say), refused by the submit once the fleet has tenants; nothing made in
    // public (before, the first tenant made the table, the second raced it, and the undo
    // looked for it in the tenant's schema).
    let shared = MigrationDir::new()?;
    shared.migration(
        "001_flags",
        "",
        "SET search_path TO public;\nCREATE TABLE feature_flags (name text PRIMARY KEY);",
        "DROP TABLE feature_flags;",
    )?;
    let sp = shared.path().to_string_lossy().into_owned();
    let out = run_flotilla(&["plan", "lint", &sp], &[]).await?;
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        out.stdout.contains("warning[tenant-escape] 001_flags at ")
            && out.stdout.contains("scope auto"),
        "{out}"
    );
    // told the scope, as a submit is, the lint says it as the submit will
    let out = run_flotilla(&["plan", "lint", &sp, "--scope", "tenant"], &[]).await?;
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains("error[tenant-escape] 001_flags"),
        "{out}"
    );
    let out = fleet.cli(&["plan", "submit", &sp]).await?;
    assert_eq!(out.code(), Some(2), "refused as bad input: {out}");
    assert!(
        out.stderr
            .contains("error[tenant-escape] 001_flags up.sql:1")
            && out.stderr.contains("the fleet has tenants"),
        "{out}"
    );
    let made: i64 = fleet
        .pg
        .query_scalar(
            &fleet.shards[0],
            "SELECT count(*) FROM pg_tables WHERE tablename = 'feature_flags'",
        )
        .await?;
    assert_eq!(made, 0);
    assert_eq!(fleet.journal_total().await?, 0);

    // Said on purpose, and with a warning-only index: accepted, the warning printed.
    d.migration(
        "001_drop_priority",
        "destructive = true\n",
        "-- priority is computed now\nALTER TABLE work_orders DROP COLUMN priority;",
        "ALTER TABLE work_orders ADD COLUMN priority text;",
    )?;
    d.migration(
        "002_index_created_at",
        "",
        "CREATE INDEX idx_work_orders_created_at ON work_orders (created_at);",
        "DROP INDEX idx_work_orders_created_at;",
    )?;
    let (code, status, out) = fleet.submit_wait(d.path(), &[]).await?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status["state"], "completed", "{status}");
    assert!(
        out.stderr
            .contains("warning[index-not-concurrent] 002_index_created_at at ")
            && out.stderr.contains("002_index_created_at/up.sql:1"),
        "{out}"
    );
    assert_eq!(fleet.journal_total().await?, 4);
    Ok(())
}
