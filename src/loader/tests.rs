use std::fs;
use std::path::{Path, PathBuf};

use flotilla_core::{PlanError, PlanSpec, Scope, TxMode, pb};

use super::*;

const HS: &str = "2025.01.31_160000_hs_satisfaction_tracking";
const AUTO: &str = "2025.01.31_160001_auto_satisfaction_tracking";
const VIEW: &str = "2025.01.31_160002_unified_satisfaction_view";

fn write(root: &Path, rel: &str, text: &str) -> PathBuf {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, text).unwrap();
    path
}

/// A native migration `id` under `root` with the given migration.toml (None: no file).
fn native(root: &Path, id: &str, toml: Option<&str>, up: &str) {
    if let Some(t) = toml {
        write(root, &format!("{id}/migration.toml"), t);
    }
    write(root, &format!("{id}/up.sql"), up);
    write(
        root,
        &format!("{id}/down.sql"),
        &format!("-- undo {id}\nSELECT 1;\n"),
    );
}

fn load_ok(path: &Path) -> pb::PlanSpec {
    load(path, &Overrides::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load_err(path: &Path) -> String {
    match load(path, &Overrides::default()) {
        Ok(spec) => panic!("{} loaded: {spec:?}", path.display()),
        Err(e) => e.to_string(),
    }
}

fn ids(spec: &pb::PlanSpec) -> Vec<&str> {
    spec.migrations.iter().map(|m| m.id.as_str()).collect()
}

fn domain(spec: pb::PlanSpec) -> PlanSpec {
    PlanSpec::try_from(spec).unwrap_or_else(|e| panic!("{e}"))
}

fn bench_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/loader/testdata/dbmate-coord-2025-001")
}

fn assert_bench_plan(dir: &Path) {
    let spec = load_ok(dir);
    assert_eq!(
        ids(&spec),
        [
            "20250131160000_hs_satisfaction_tracking",
            "20250131160001_auto_satisfaction_tracking",
            "20250131160002_unified_satisfaction_view",
        ]
    );
    assert_eq!(spec.source, dir.display().to_string());
    let m = &spec.migrations[0];
    assert!(
        m.up_sql.starts_with("ALTER TABLE work_orders"),
        "{}",
        m.up_sql
    );
    assert!(m.up_sql.ends_with("WHERE satisfaction_rating IS NOT NULL;"));
    assert!(
        m.down_sql
            .starts_with("DROP INDEX idx_work_orders_satisfaction;")
    );
    assert!(!m.up_sql.contains("migrate:"));
    assert_eq!(m.checksum, flotilla_core::checksum(&m.up_sql));
    assert!(
        m.source
            .ends_with("20250131160000_hs_satisfaction_tracking.sql")
    );
    assert_eq!(m.tx_mode, pb::TxMode::Unspecified as i32);
    let plan = domain(spec);
    assert_eq!(plan.migrations.len(), 3);
    assert!(
        plan.migrations
            .iter()
            .all(|m| m.tx_mode == TxMode::Transactional)
    );
}

#[test]
fn loads_the_bench_dbmate_directory() {
    assert_bench_plan(&bench_fixture());
    // The shared copy, where the bench is checked out beside the repository.
    let shared = Path::new("/work/shared/bench/coord-2025-001");
    if shared.is_dir() {
        assert_bench_plan(shared);
        let ours = load_ok(&bench_fixture());
        let theirs = load_ok(shared);
        for (a, b) in ours.migrations.iter().zip(&theirs.migrations) {
            assert_eq!(a.checksum, b.checksum, "the fixture is a copy of the bench");
        }
    }
}

#[test]
fn loads_the_coordinated_example() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/coord-2025-001");
    let spec = load_ok(&dir);
    assert_eq!(spec.name, "COORD-2025-001");
    assert_eq!(ids(&spec), [HS, AUTO, VIEW]);
    assert!(
        spec.migrations.iter().all(|m| m.selector.is_empty()),
        "every tenant gets all three"
    );
    assert!(spec.migrations[0].verify_sql.contains("current_schema()"));
    assert!(spec.migrations[2].verify_sql.is_empty());
    assert_eq!(spec.migrations[0].lock_timeout_ms, 5_000);
    assert_eq!(spec.migrations[0].statement_timeout_ms, 600_000);
    assert_eq!(spec.default_scope, pb::Scope::Tenant as i32);
    assert_eq!(spec.policy, pb::FailurePolicy::AllOrNothing as i32);
    // The plan file is found in the directory, and can be named directly.
    assert_eq!(load_ok(&dir.join("plan.toml")).migrations, spec.migrations);

    let plan = domain(spec);
    assert_eq!(plan.parallel_groups.len(), 2);
    assert_eq!(plan.parallel_groups[0].len(), 2);
    let view = plan
        .migrations
        .iter()
        .find(|m| m.id.as_str() == VIEW)
        .unwrap();
    assert_eq!(view.kind, "view");
    let deps = &plan.dependencies[&view.id];
    assert_eq!(deps.len(), 2);
    assert!(
        plan.migrations
            .iter()
            .all(|m| m.tx_mode == TxMode::Transactional)
    );
}

#[test]
fn loads_a_native_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    native(
        root,
        "002_second",
        Some(
            r#"
description = "the second"
kind = "Index"
depends_on = ["001_first"]
scope = "shard"
selector = "tier in (gold, silver)"
transactional = true
lock_timeout = "2s"
statement_timeout = "1m 30s"
risk = "high"
"#,
        ),
        "CREATE INDEX i ON t (a);",
    );
    native(root, "001_first", None, "CREATE TABLE t (a int);");
    write(root, "001_first/verify.sql", "SELECT true");
    write(root, "README.md", "# notes");
    write(root, ".hidden/up.sql", "garbage");
    write(root, "notes.txt", "ignored");

    let spec = load_ok(root);
    assert_eq!(ids(&spec), ["001_first", "002_second"]);
    assert_eq!(spec.name, root.file_name().unwrap().to_str().unwrap());
    let first = &spec.migrations[0];
    assert_eq!(first.verify_sql, "SELECT true");
    assert_eq!(first.tx_mode, pb::TxMode::Unspecified as i32);
    assert_eq!(first.kind, "");
    assert_eq!(first.source, root.join("001_first").display().to_string());
    assert_eq!(
        first.checksum,
        flotilla_core::checksum("CREATE TABLE t (a int);")
    );
    let second = &spec.migrations[1];
    assert_eq!(second.description, "the second");
    assert_eq!(second.kind, "index");
    assert_eq!(second.depends_on, ["001_first"]);
    assert_eq!(second.scope, pb::Scope::Shard as i32);
    assert_eq!(second.selector, "tier in (gold, silver)");
    assert_eq!(second.tx_mode, pb::TxMode::Transactional as i32);
    assert_eq!(second.lock_timeout_ms, 2_000);
    assert_eq!(second.statement_timeout_ms, 90_000);
    assert_eq!(second.risk, "high");

    let plan = domain(spec);
    assert_eq!(plan.migrations[1].scope, Some(Scope::Shard));
    assert_eq!(plan.migrations[1].verify_sql, None);
}

#[test]
fn loads_a_dbmate_directory_with_options() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(
        root,
        "20250101000000_index.sql",
        "-- a header comment\n\n-- migrate:up transaction:false\nCREATE INDEX CONCURRENTLY i ON t (a);\n\n-- migrate:down\nDROP INDEX CONCURRENTLY i;\n",
    );
    write(
        root,
        "20240101000000_no_down.sql",
        "-- migrate:up\nCREATE TABLE t (a int);\n",
    );
    write(
        root,
        "20250303000000_bom.sql",
        "\u{feff}-- migrate:up\r\nSELECT 1;\r\n",
    );
    write(
        root,
        "20250202000000_explicit.sql",
        "--migrate:up   transaction:true\nSELECT 1;\n--   migrate:down\n",
    );
    let spec = load_ok(root);
    assert_eq!(
        ids(&spec),
        [
            "20240101000000_no_down",
            "20250101000000_index",
            "20250202000000_explicit",
            "20250303000000_bom",
        ]
    );
    let bom = &spec.migrations[3];
    assert_eq!(bom.up_sql, "SELECT 1;");
    assert_eq!(bom.checksum, flotilla_core::checksum("SELECT 1;"));
    assert_eq!(spec.migrations[0].down_sql, "");
    assert_eq!(spec.migrations[0].tx_mode, pb::TxMode::Unspecified as i32);
    assert_eq!(
        spec.migrations[1].tx_mode,
        pb::TxMode::NonTransactional as i32
    );
    assert_eq!(
        spec.migrations[1].up_sql,
        "CREATE INDEX CONCURRENTLY i ON t (a);"
    );
    assert_eq!(spec.migrations[1].down_sql, "DROP INDEX CONCURRENTLY i;");
    assert_eq!(spec.migrations[2].tx_mode, pb::TxMode::Transactional as i32);
    assert_eq!(spec.migrations[2].up_sql, "SELECT 1;");
    domain(spec);
}

#[test]
fn mixes_both_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(
        root,
        "20250103000000_c.sql",
        "-- migrate:up\nSELECT 3;\n-- migrate:down\nSELECT 0;\n",
    );
    native(root, "20250102000000_b", None, "SELECT 2;");
    write(root, "20250101000000_a.sql", "-- migrate:up\nSELECT 1;\n");
    write(root, "plan.toml", "name = \"mixed\"\n");
    let spec = load_ok(root);
    assert_eq!(
        ids(&spec),
        ["20250101000000_a", "20250102000000_b", "20250103000000_c"]
    );
    assert_eq!(spec.name, "mixed");
    domain(spec);
}

#[test]
fn plan_file_with_groups_dependencies_and_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for id in ["a", "b", "c", "d"] {
        native(
            &root.join("migrations"),
            id,
            None,
            &format!("SELECT '{id}';"),
        );
    }
    let plan = write(
        root,
        "rollout.toml",
        r#"
name = "coordinated"
description = "three of four"
environment = "staging"
migrations_dir = "migrations"
migrations = ["c", "a", "b"]
selector = "region notin (eu)"
max_parallel = 16
policy = "continue"
scope = "shard"
fuse = false
require_no_drift = true
parallel_groups = [["a", "b"], ["c"]]

[dependencies]
c = ["a", "b"]
"#,
    );
    let spec = load_ok(&plan);
    assert_eq!(ids(&spec), ["c", "a", "b"], "in the plan's order");
    assert_eq!(spec.name, "coordinated");
    assert_eq!(spec.description, "three of four");
    assert_eq!(spec.environment, "staging");
    assert_eq!(spec.selector, "region notin (eu)");
    assert_eq!(spec.max_parallel, 16);
    assert_eq!(spec.policy, pb::FailurePolicy::Continue as i32);
    assert_eq!(spec.default_scope, pb::Scope::Shard as i32);
    assert!(spec.no_fuse);
    assert!(!spec.atomic);
    assert_eq!(spec.source, plan.display().to_string());
    assert_eq!(spec.parallel_groups.len(), 2);
    assert_eq!(spec.parallel_groups[0].migrations, ["a", "b"]);
    assert!(!spec.parallel_groups[0].atomic);
    assert_eq!(spec.dependencies.len(), 1);
    assert_eq!(spec.dependencies[0].migration, "c");
    assert_eq!(spec.dependencies[0].depends_on, ["a", "b"]);

    assert!(spec.require_no_drift);

    let p = domain(spec);
    assert!(!p.fuse);
    assert_eq!(p.max_parallel, 16);
    assert!(p.require_no_drift);
    assert!(
        pb::PlanSpec::from(&p).require_no_drift,
        "kept in the stored spec"
    );

    // A group given as a table can commit atomically (and needs all-or-nothing).
    let grouped = write(
        root,
        "grouped.toml",
        r#"
migrations_dir = "migrations"
fuse = false
parallel_groups = [["a"], { migrations = ["b", "c"], atomic = true }]
"#,
    );
    let spec = load_ok(&grouped);
    assert!(!spec.parallel_groups[0].atomic);
    assert!(spec.parallel_groups[1].atomic);
    assert_eq!(spec.parallel_groups[1].migrations, ["b", "c"]);
    let p = domain(spec.clone());
    assert_eq!(p.atomic_groups, [1].into_iter().collect());
    assert!(
        p.fuse,
        "an atomic group's steps fuse into one prepared transaction"
    );
    assert!(p.two_phase());
    let id = |s: &str| flotilla_core::MigrationId::parse(s).unwrap();
    assert_eq!(p.atomic_unit(&id("b")), Some(1));
    assert_eq!(p.atomic_unit(&id("a")), None);
    let mut stop = spec;
    stop.policy = pb::FailurePolicy::Stop as i32;
    let e = flotilla_core::PlanSpec::try_from(stop)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("policy") && e.contains("atomic parallel group 2"),
        "{e}"
    );

    // A plan without a name takes its file's stem; plan.toml takes its directory's name.
    write(root, "unnamed.toml", "migrations_dir = \"migrations\"\n");
    let spec = load_ok(&root.join("unnamed.toml"));
    assert_eq!(spec.name, "unnamed");
    assert_eq!(ids(&spec), ["a", "b", "c", "d"]);
    assert!(!spec.no_fuse);
    assert_eq!(spec.default_scope, pb::Scope::Unspecified as i32);
    write(root, "plan.toml", "migrations_dir = \"migrations\"\n");
    let spec = load_ok(root);
    assert_eq!(spec.name, root.file_name().unwrap().to_str().unwrap());
}

#[test]
fn plan_naming_an_unknown_migration() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    native(root, "a", None, "SELECT 1;");
    let plan = write(
        root,
        "plan.toml",
        "name = \"x\"\nmigrations = [\n  \"a\",\n  \"zzz\",\n]\n",
    );
    let e = load_err(root);
    assert_eq!(
        e,
        format!(
            "{}:4: the plan names migration `zzz`, which is not in {}",
            plan.display(),
            root.display()
        )
    );
    write(root, "plan.toml", "migrations = [\"a\", \"a\"]\n");
    let e = load_err(root);
    assert!(
        e.contains("plan.toml:1: migration `a` is listed twice"),
        "{e}"
    );
    // A dependency left out of the list is named as such, with the fix.
    native(root, "b", Some("depends_on = [\"a\"]\n"), "SELECT 2;");
    write(root, "plan.toml", "migrations = [\"b\"]\n");
    let e = load_err(root);
    assert!(
        e.contains("plan.toml:1: migration `b` depends on `a`, which is in "),
        "{e}"
    );
    assert!(
        e.contains("not in the plan's `migrations` list: list it too"),
        "{e}"
    );
    write(root, "plan.toml", "migrations = [\"a\", \"b\"]\n");
    assert_eq!(ids(&load_ok(root)), ["a", "b"]);
    // Groups naming unknown migrations are for the graph to refuse.
    write(
        root,
        "plan.toml",
        "parallel_groups = [[\"a\"], [\"nope\"]]\n",
    );
    let spec = load_ok(root);
    let e = PlanSpec::try_from(spec).unwrap_err();
    assert!(matches!(e, PlanError::UnknownMigration { .. }), "{e}");
}

#[test]
fn unknown_keys_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    native(
        root,
        "a",
        Some("description = \"x\"\nrisky = \"low\"\n"),
        "SELECT 1;",
    );
    let e = load_err(root);
    let file = root.join("a/migration.toml").display().to_string();
    assert!(
        e.starts_with(&format!("{file}:2: unknown field `risky`")),
        "{e}"
    );

    fs::remove_file(root.join("a/migration.toml")).unwrap();
    write(
        root,
        "plan.toml",
        "name = \"p\"\npolicy = \"stop\"\nmax_paralel = 3\n",
    );
    let e = load_err(root);
    let file = root.join("plan.toml").display().to_string();
    assert!(
        e.starts_with(&format!("{file}:3: unknown field `max_paralel`")),
        "{e}"
    );

    // a key of [dependencies] that is no migration id: its line
    write(
        root,
        "plan.toml",
        "name = \"p\"\n\n[dependencies]\n\"a\" = []\n\"../up\" = [\"a\"]\n",
    );
    let e = load_err(root);
    assert!(e.starts_with(&format!("{file}:5: [dependencies]: ")), "{e}");
    assert!(e.contains("../up"), "{e}");
}

#[test]
fn wrong_types_and_bad_values_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let toml = root.join("a/migration.toml").display().to_string();
    let cases = [
        (
            "transactional = \"yes\"\n",
            1,
            "`transactional`: invalid type",
        ),
        ("\ndepends_on = \"b\"\n", 2, "`depends_on`: invalid type"),
        (
            "description = \"x\"\nkind = \"table\"\n",
            2,
            "unknown kind `table`",
        ),
        ("risk = \"extreme\"\n", 1, "unknown risk `extreme`"),
        ("scope = \"galaxy\"\n", 1, "unknown scope `galaxy`"),
        (
            "selector = \"industry in hs\"\n",
            1,
            "expected `(` after `in`",
        ),
        (
            "depends_on = [\"ok\", \"not ok\"]\n",
            1,
            "invalid migration id `not ok`",
        ),
        ("description = [unclosed\n", 1, ""),
    ];
    for (text, line, message) in cases {
        native(root, "a", Some(text), "SELECT 1;");
        let e = load_err(root);
        assert!(e.starts_with(&format!("{toml}:{line}: ")), "{text:?}: {e}");
        assert!(e.contains(message), "{text:?}: {e}");
    }
    native(root, "a", None, "SELECT 1;");
    fs::remove_file(root.join("a/migration.toml")).unwrap();
    let plan = root.join("plan.toml").display().to_string();
    let cases = [
        ("max_parallel = -1\n", 1, ""),
        ("max_parallel = 0\n", 1, "at least 1"),
        ("fuse = \"no\"\n", 1, "`fuse`: invalid type"),
        ("\npolicy = \"yolo\"\n", 2, "unknown failure policy `yolo`"),
        ("scope = \"moon\"\n", 1, "unknown scope `moon`"),
        ("selector = \"a=(b)\"\n", 1, "expected a value after `=`"),
        ("migrations_dir = \"nowhere\"\n", 1, "is not a directory"),
        (
            "parallel_groups = [[\"a\", \"b c\"]]\n",
            1,
            "parallel group 1",
        ),
        (
            "parallel_groups = [\n  [\"a\"],\n  { migrations = [\"b c\"], atomic = true },\n]\n",
            3,
            "parallel group 2",
        ),
        (
            "parallel_groups = [{ migrations = [\"a\"], atomic = \"yes\" }]\n",
            1,
            "a list of migration ids, or a table",
        ),
        (
            "parallel_groups = [{ migrations = [\"a\"], atomik = true }]\n",
            1,
            "a list of migration ids, or a table",
        ),
    ];
    for (text, line, message) in cases {
        write(root, "plan.toml", text);
        let e = load_err(root);
        assert!(e.starts_with(&format!("{plan}:{line}: ")), "{text:?}: {e}");
        assert!(e.contains(message), "{text:?}: {e}");
    }
}

#[test]
fn bad_durations() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let toml = root.join("a/migration.toml").display().to_string();
    for (text, message) in [
        (
            "lock_timeout = \"5 parsecs\"",
            "invalid lock_timeout `5 parsecs`",
        ),
        (
            "statement_timeout = \"soon\"",
            "invalid statement_timeout `soon`",
        ),
        ("lock_timeout = \"0s\"", "must be at least 1ms"),
        (
            "lock_timeout = \"30days\"",
            "over PostgreSQL's limit of 2147483647 ms",
        ),
        (
            "statement_timeout = \"25days\"",
            "invalid statement_timeout `25days`: over PostgreSQL's limit",
        ),
        ("lock_timeout = 5", "invalid type"),
    ] {
        native(
            root,
            "a",
            Some(&format!("description = \"d\"\n{text}\n")),
            "SELECT 1;",
        );
        let e = load_err(root);
        assert!(e.starts_with(&format!("{toml}:2: ")), "{e}");
        assert!(e.contains(message), "{e}");
    }
}

#[test]
fn missing_and_empty_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    native(root, "a", None, "SELECT 1;");
    write(root, "b/down.sql", "SELECT 1;");
    let e = load_err(root);
    assert_eq!(
        e,
        format!(
            "{}: a migration directory needs up.sql (and down.sql); this one has no up.sql",
            root.join("b").display()
        )
    );
    fs::remove_dir_all(root.join("b")).unwrap();

    fs::remove_file(root.join("a/down.sql")).unwrap();
    let e = load_err(root);
    assert_eq!(e, format!("{}: missing down.sql", root.join("a").display()));

    write(root, "a/down.sql", "-- nothing to undo\n");
    let e = load_err(root);
    assert!(e.contains("a/down.sql: holds no SQL statements"), "{e}");
    assert!(e.contains("irreversible = true"), "{e}");

    write(root, "a/migration.toml", "irreversible = true\n");
    let spec = load_ok(root);
    assert_eq!(spec.migrations[0].down_sql, "-- nothing to undo\n");

    write(root, "a/down.sql", "SELECT 1;");
    let e = load_err(root);
    assert!(
        e.contains("holds statements, but migration.toml says irreversible = true"),
        "{e}"
    );
    write(root, "a/down.sql", "SELECT 2;");
    fs::remove_file(root.join("a/migration.toml")).unwrap();

    write(root, "a/up.sql", "  -- only a comment\n");
    let e = load_err(root);
    assert!(e.ends_with("a/up.sql: holds no SQL statements"), "{e}");
    write(root, "a/up.sql", "SELECT 1;");

    write(root, "a/verify.sql", "SELECT true; SELECT false");
    let e = load_err(root);
    assert!(
        e.contains("verify.sql: must be one query returning a boolean; it holds 2"),
        "{e}"
    );
    // a verify that would verify nothing, silently: refused
    write(root, "a/verify.sql", "-- to do\n");
    let e = load_err(root);
    assert!(
        e.contains("verify.sql: must be one query returning a boolean; it holds 0"),
        "{e}"
    );
    fs::remove_file(root.join("a/verify.sql")).unwrap();
    fs::create_dir(root.join("a/verify.sql")).unwrap();
    let e = load_err(root);
    assert!(e.contains("verify.sql: not a regular file"), "{e}");
    fs::remove_dir(root.join("a/verify.sql")).unwrap();
    std::os::unix::fs::symlink(root.join("nowhere.sql"), root.join("a/verify.sql")).unwrap();
    let e = load_err(root);
    assert!(e.contains("verify.sql: not a regular file"), "{e}");
    fs::remove_file(root.join("a/verify.sql")).unwrap();

    write(root, "a/donw.sql", "SELECT 1;");
    let e = load_err(root);
    assert!(
        e.contains("a/donw.sql: unexpected file in a migration directory"),
        "{e}"
    );
    fs::remove_file(root.join("a/donw.sql")).unwrap();
    // settings under another name or extension were passed over, the plan run with defaults
    for misnamed in [
        "migration.yaml",
        "migration.tml",
        "up.sql.bak",
        "migration.toml~",
    ] {
        write(
            root,
            &format!("a/{misnamed}"),
            "selector = \"tier=canary\"\n",
        );
        let e = load_err(root);
        assert!(
            e.contains(&format!(
                "a/{misnamed}: unexpected file in a migration directory"
            )),
            "{misnamed}: {e}"
        );
        fs::remove_file(root.join(format!("a/{misnamed}"))).unwrap();
    }
    for misnamed in ["Plan.toml", "plan.yaml", "plan.toml.bak"] {
        write(root, misnamed, "policy = \"stop\"\n");
        let e = load_err(root);
        assert!(
            e.contains(&format!(
                "{misnamed}: unexpected file beside the migrations"
            )),
            "{misnamed}: {e}"
        );
        fs::remove_file(root.join(misnamed)).unwrap();
    }
    // another plan file beside them, given by its path, is not a misnamed plan.toml
    write(root, "plan.staging.toml", "policy = \"stop\"\n");
    load(root, &Overrides::default()).unwrap();
    fs::remove_file(root.join("plan.staging.toml")).unwrap();

    write(root, "a/up.sql", "SELECT 1;\nSELECT $$never closed;\n");
    let e = load_err(root);
    assert!(
        e.contains("a/up.sql:2: unterminated dollar-quoted string"),
        "{e}"
    );
}

#[test]
fn directory_level_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(root, "README.md", "nothing here");
    let e = load_err(root);
    assert!(e.contains("no migrations found"), "{e}");

    native(root, "has space", None, "SELECT 1;");
    let e = load_err(root);
    assert!(
        e.contains("has space: directory name is not a migration id"),
        "{e}"
    );
    fs::remove_dir_all(root.join("has space")).unwrap();

    native(root, "20250101000000_x", None, "SELECT 1;");
    write(root, "20250101000000_x.sql", "-- migrate:up\nSELECT 1;\n");
    let e = load_err(root);
    assert!(
        e.contains("migration `20250101000000_x` is defined twice"),
        "{e}"
    );
    fs::remove_file(root.join("20250101000000_x.sql")).unwrap();

    write(root, "seed.sql", "INSERT INTO t VALUES (1);");
    let e = load_err(root);
    assert!(e.contains("seed.sql: not a migration file name"), "{e}");
    fs::remove_file(root.join("seed.sql")).unwrap();

    let e = load_err(&root.join("missing"));
    assert!(e.contains("missing: "), "{e}");
    let e = load_err(&root.join("README.md"));
    assert!(
        e.contains("expected a migration directory or a plan file"),
        "{e}"
    );
}

#[test]
fn dbmate_errors_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let name = "20250101000000_m.sql";
    let file = root.join(name).display().to_string();
    let cases = [
        ("CREATE TABLE t (a int);\n", 1, "no `-- migrate:up` line"),
        (
            "-- ok\nCREATE TABLE t (a int);\n-- migrate:up\nSELECT 1;\n",
            2,
            "SQL before `-- migrate:up`",
        ),
        (
            "-- migrate:down\nSELECT 1;\n-- migrate:up\nSELECT 1;\n",
            1,
            "comes before",
        ),
        (
            "-- migrate:up\nSELECT 1;\n-- migrate:up\n",
            3,
            "a second `-- migrate:up` (the first is on line 1)",
        ),
        (
            "-- migrate:up\nSELECT 1;\n-- migrate:Down\n",
            3,
            "unknown dbmate marker `-- migrate:Down`",
        ),
        (
            "-- migrate:up transaction:maybe\nSELECT 1;\n",
            1,
            "unknown option `transaction:maybe`",
        ),
        (
            "-- migrate:up\n\n-- migrate:down\nSELECT 1;\n",
            1,
            "holds no SQL statements",
        ),
        (
            "-- migrate:up\nSELECT 1;\nSELECT 'oops;\n-- migrate:down\n",
            3,
            "unterminated quoted string",
        ),
        (
            "-- migrate:up\nSELECT 1;\n-- migrate:down\n\n/* never closed\n",
            5,
            "unterminated block comment",
        ),
    ];
    for (text, line, message) in cases {
        write(root, name, text);
        let e = load_err(root);
        assert!(e.starts_with(&format!("{file}:{line}: ")), "{text:?}: {e}");
        assert!(e.contains(message), "{text:?}: {e}");
    }
}

#[test]
fn concurrent_index_is_detected_non_transactional() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    native(root, "001_table", None, "CREATE TABLE t (a int);");
    native(
        root,
        "002_index",
        None,
        "-- online\nCREATE INDEX CONCURRENTLY i ON t (a);",
    );
    write(
        root,
        "003_dbmate.sql",
        "-- migrate:up\nINSERT INTO t VALUES (1), (2);\n",
    );
    let spec = load_ok(root);
    assert!(
        spec.migrations
            .iter()
            .all(|m| m.tx_mode == pb::TxMode::Unspecified as i32)
    );
    let plan = domain(spec);
    let modes: Vec<TxMode> = plan.migrations.iter().map(|m| m.tx_mode).collect();
    assert_eq!(
        modes,
        [
            TxMode::Transactional,
            TxMode::NonTransactional,
            TxMode::Transactional
        ]
    );

    // Saying transactional = true contradicts the statement: the domain refuses it.
    write(root, "002_index/migration.toml", "transactional = true\n");
    let e = PlanSpec::try_from(load_ok(root)).unwrap_err();
    assert!(matches!(e, PlanError::NotTransactional { .. }), "{e}");
}

#[test]
fn overrides_apply_after_the_plan_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    native(root, "a", None, "SELECT 1;");
    write(
        root,
        "plan.toml",
        "max_parallel = 4\nselector = \"tier=gold\"\npolicy = \"stop\"\nscope = \"tenant\"\n",
    );
    let o = Overrides {
        max_parallel: Some(32),
        selector: Some(" region in (eu) ".into()),
        policy: Some("continue".into()),
        scope: Some("shard".into()),
        no_fuse: true,
        atomic: true,
    };
    let spec = load(root, &o).unwrap();
    assert_eq!(spec.max_parallel, 32);
    assert_eq!(spec.selector, "region in (eu)");
    assert_eq!(spec.policy, pb::FailurePolicy::Continue as i32);
    assert_eq!(spec.default_scope, pb::Scope::Shard as i32);
    assert!(spec.no_fuse);
    assert!(spec.atomic, "--atomic");

    // Without overrides, the plan file's values stand.
    let spec = load_ok(root);
    assert_eq!(spec.max_parallel, 4);
    assert_eq!(spec.selector, "tier=gold");
    assert_eq!(spec.policy, pb::FailurePolicy::Stop as i32);
    assert_eq!(spec.default_scope, pb::Scope::Tenant as i32);
    assert!(!spec.no_fuse);

    // `auto` clears the plan's scope.
    let o = Overrides {
        scope: Some("auto".into()),
        ..Default::default()
    };
    assert_eq!(
        load(root, &o).unwrap().default_scope,
        pb::Scope::Unspecified as i32
    );

    let bad = [
        (
            Overrides {
                policy: Some("yolo".into()),
                ..Default::default()
            },
            "invalid --policy: unknown failure policy `yolo`",
        ),
        (
            Overrides {
                scope: Some("moon".into()),
                ..Default::default()
            },
            "invalid --scope: unknown scope `moon`",
        ),
        (
            Overrides {
                selector: Some("a in b".into()),
                ..Default::default()
            },
            "invalid --selector: invalid selector `a in b`",
        ),
        (
            Overrides {
                max_parallel: Some(0),
                ..Default::default()
            },
            "invalid --max-parallel: must be at least 1 and at most 10000",
        ),
        (
            Overrides {
                max_parallel: Some(u32::MAX),
                ..Default::default()
            },
            "invalid --max-parallel: must be at least 1 and at most 10000",
        ),
    ];
    for (o, message) in bad {
        let e = load(root, &o).unwrap_err();
        assert!(matches!(e, LoadError::Override { .. }), "{e}");
        assert!(e.to_string().starts_with(message), "{e}");
    }
}

#[test]
fn a_data_migration_reads_its_data_table() {
    let dir = tempfile::tempdir().unwrap();
    native(
        dir.path(),
        "20250201_backfill",
        Some(
            "[data]\ntable = \"customers\"\nkey = \"id\"\nbatch_size = 50\nrows_per_second = 500\n\
             filter = \"phone !~ '^\\\\+'\"\n\
             batch = \"UPDATE customers SET phone = '+' || phone WHERE id > $1 AND id <= $2\"\n",
        ),
        "-- the batch SQL is the change\n",
    );
    let spec = load_ok(dir.path());
    let m = &spec.migrations[0];
    assert_eq!(m.kind, "data");
    let d = m.data.as_ref().unwrap();
    assert_eq!((d.batch_size, d.rows_per_second), (50, 500));
    assert_eq!(d.filter, "phone !~ '^\\+'");
    let domain = domain(spec.clone());
    let dm = &domain.migrations[0];
    assert_eq!(dm.tx_mode, TxMode::NonTransactional);
    assert_eq!(dm.checksum, m.checksum, "the loader and the receiver agree");
    assert_ne!(dm.checksum, flotilla_core::checksum(&m.up_sql));
}

#[test]
fn a_data_migration_takes_a_composite_key_and_refuses_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    native(
        dir.path(),
        "20250201_backfill",
        Some(
            "[data]\ntable = \"t\"\nkey = [\"a\", \"b\"]\nprior_image = [\"c\"]\nbatch = \"SELECT $1, $2\"\n",
        ),
        "",
    );
    let spec = load_ok(dir.path());
    let d = spec.migrations[0].data.as_ref().unwrap();
    assert_eq!(d.key, "a, b");
    assert_eq!(d.prior_image, vec!["c".to_string()]);
    let domain = domain(spec.clone());
    let dd = domain.migrations[0].data.as_ref().unwrap();
    assert_eq!(dd.key, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(domain.migrations[0].checksum, spec.migrations[0].checksum);

    let dir = tempfile::tempdir().unwrap();
    native(
        dir.path(),
        "20250201_backfill",
        Some("[data]\ntable = \"t\"\nkey = [\"a\", 1]\nbatch = \"SELECT $1, $2\"\n"),
        "",
    );
    let e = load_err(dir.path());
    assert!(
        e.contains("migration.toml:3") && e.contains("list of column names"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    native(
        dir.path(),
        "20250201_backfill",
        Some("[data]\ntable = \"t\"\nkey = \"id\"\nbatch_size = 0\nbatch = \"SELECT $1, $2\"\n"),
        "",
    );
    let e = load_err(dir.path());
    assert!(
        e.contains("migration.toml:4") && e.contains("batch_size"),
        "{e}"
    );

    // a number too big names the bound it is past (it said "must be at least 0")
    for (field, value, bound) in [
        ("rows_per_second", "4294967296", "4294967295"),
        ("target_batch_ms", "9223372036854775807", "600000"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        native(
            dir.path(),
            "20250201_backfill",
            Some(&format!(
                "[data]\ntable = \"t\"\nkey = \"id\"\n{field} = {value}\nbatch = \"SELECT $1, $2\"\n"
            )),
            "",
        );
        let e = load_err(dir.path());
        assert!(
            e.contains(&format!(
                "[data] {field} must be at most {bound}, got {value}"
            )),
            "{e}"
        );
    }

    // without [data], an empty up.sql is still an error
    let dir = tempfile::tempdir().unwrap();
    native(dir.path(), "20250201_empty", None, "-- nothing\n");
    assert!(load_err(dir.path()).contains("holds no SQL statements"));
}

/// Names only quotes can spell are written as PostgreSQL reads them (`"Orders"` keeps its
/// case, a bare name folds to lower case) and survive the trip to the agents: the plan sent
/// on (as the coordinator sends it) reads back the same names, under the same checksum.
/// A bare name's checksum is as it was (`Customers` and `customers` alike).
#[test]
fn a_data_migration_takes_quoted_names() {
    let dir = tempfile::tempdir().unwrap();
    native(
        dir.path(),
        "20250201_ship",
        Some(
            "[data]\ntable = 'app.\"Orders\"'\nkey = ['\"Region\"', 'Id']\nprior_image = ['\"Status\"']\n\
             batch = \"UPDATE app.\\\"Orders\\\" SET x = 1 WHERE (\\\"Region\\\", id) > $1 AND (\\\"Region\\\", id) <= $2\"\n",
        ),
        "",
    );
    let spec = load_ok(dir.path());
    let domain = domain(spec.clone());
    let d = domain.migrations[0].data.as_ref().unwrap();
    assert_eq!(d.table, ["app", "Orders"]);
    assert_eq!(d.key, ["Region", "id"]);
    assert_eq!(d.prior_image, ["Status"]);
    assert_eq!(d.table_sql(), "\"app\".\"Orders\"");
    assert_eq!(d.table_text(), "app.\"Orders\"");
    assert_eq!(d.key_text(), "\"Region\", id");
    let sent = flotilla_core::pb::Migration::from(&domain.migrations[0]);
    let again = flotilla_core::Migration::try_from(sent).expect("reads back");
    assert_eq!(again.data.as_ref(), Some(d));
    assert_eq!(again.checksum, spec.migrations[0].checksum);

    // a quoted name that folds to a bare one is that name, under the same checksum
    let sum = |table: &str| {
        let dir = tempfile::tempdir().unwrap();
        native(
            dir.path(),
            "20250201_fill",
            Some(&format!(
                "[data]\ntable = '{table}'\nkey = 'id'\nbatch = \"SELECT $1, $2\"\n"
            )),
            "",
        );
        load_ok(dir.path()).migrations[0].checksum.clone()
    };
    assert_eq!(sum("Customers"), sum("customers"));
    assert_eq!(sum("\"customers\""), sum("customers"));
    assert_ne!(sum("\"Customers\""), sum("customers"));

    // a quote left open, or an empty quoted name, is refused naming the table
    for table in ["\"Orders", "\"\"", "a.b.c"] {
        let dir = tempfile::tempdir().unwrap();
        native(
            dir.path(),
            "20250201_fill",
            Some(&format!(
                "[data]\ntable = '{table}'\nkey = 'id'\nbatch = \"SELECT $1, $2\"\n"
            )),
            "",
        );
        let spec = load_ok(dir.path());
        let e = flotilla_core::PlanSpec::try_from(spec)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("must be a table name or schema.table"),
            "{table}: {e}"
        );
    }
}

/// A `[data]` number past its upper bound names the file and the line, as one below its
/// lower bound does (the receiver's "batch_size 2000000 is more than 1000000" named the
/// file alone), and a `min_batch_size` above one second of the rate (which caps every
/// batch) is refused where it is written: it was capped without a word.
#[test]
fn data_numbers_past_their_bounds_name_the_line() {
    let cases = [
        (
            "batch_size = 2000000",
            "[data] batch_size must be at most 1000000, got 2000000",
        ),
        (
            "max_batch_size = 1000001",
            "[data] max_batch_size must be at most 1000000, got 1000001",
        ),
        (
            "min_batch_size = 1000001",
            "[data] min_batch_size must be at most 1000000, got 1000001",
        ),
        (
            "target_batch_ms = 600001",
            "[data] target_batch_ms must be at most 600000, got 600001",
        ),
        (
            "rows_per_second = 100\nmin_batch_size = 500",
            "[data] min_batch_size must be at most 100 (one second of rows_per_second = 100",
        ),
        (
            "rows_per_second = 1000\nserver_rows_per_second = 40\nmin_batch_size = 50",
            "[data] min_batch_size must be at most 40 (one second of server_rows_per_second = 40",
        ),
    ];
    for (set, message) in cases {
        let dir = tempfile::tempdir().unwrap();
        native(
            dir.path(),
            "20250201_backfill",
            Some(&format!(
                "[data]\ntable = \"t\"\nkey = \"id\"\n{set}\nbatch = \"SELECT $1, $2\"\n"
            )),
            "",
        );
        let e = load_err(dir.path());
        // the line of the field named: the last line of `set`
        let line = 3 + set.matches('\n').count() + 1;
        assert!(
            e.contains(&format!("migration.toml:{line}")) && e.contains(message),
            "{set}: {e}"
        );
    }
    // at the bound, and a rate with no explicit floor (its default follows the cap), load
    for set in [
        "rows_per_second = 100\nmin_batch_size = 100",
        "rows_per_second = 5",
        "batch_size = 1000000\ntarget_batch_ms = 600000",
    ] {
        let dir = tempfile::tempdir().unwrap();
        native(
            dir.path(),
            "20250201_backfill",
            Some(&format!(
                "[data]\ntable = \"t\"\nkey = \"id\"\n{set}\nbatch = \"SELECT $1, $2\"\n"
            )),
            "",
        );
        load_ok(dir.path());
    }
}

#[test]
fn a_plan_file_rolls_out_in_waves() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    native(root, "a", None, "CREATE TABLE a (x int);");
    write(
        root,
        "plan.toml",
        r#"policy = "continue"
max_failures = "2%"
on_budget_exhausted = "rollback"

[[waves]]
name = "canary"
selector = "tier=internal"
bake = "90s"
gate = "manual"
max_failures = 0

[[waves]]
name = "quarter"
percent = 25
max_parallel = 4
max_parallel_per_shard = 2
max_failures = 3

[[waves]]
name = "rest"
rest = true
"#,
    );
    let spec = load_ok(root);
    assert_eq!(spec.waves.len(), 3);
    assert_eq!(spec.waves[0].selector, "tier=internal");
    assert_eq!(spec.waves[0].bake_ms, 90_000);
    assert!(spec.waves[0].manual_gate);
    assert_eq!(spec.waves[0].max_failures, "0");
    assert_eq!(spec.waves[1].percent, 25.0);
    assert_eq!(
        (
            spec.waves[1].max_parallel,
            spec.waves[1].max_parallel_per_shard
        ),
        (4, 2)
    );
    assert!(spec.waves[2].rest);
    assert_eq!(spec.max_failures, "2%");
    assert_eq!(spec.on_budget_exhausted, "rollback");
    let domain = domain(spec);
    assert_eq!(domain.rollout.waves.len(), 3);
    assert!(domain.rollout.budgeted());
}

#[test]
fn bad_waves_name_the_file_line_and_wave() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    native(root, "a", None, "CREATE TABLE a (x int);");
    let file = root.join("plan.toml").display().to_string();
    for (text, line, wanted) in [
        (
            "[[waves]]\nname = \"w\"\nrest = true\nbaek = \"1m\"\n",
            4,
            "unknown field `baek`",
        ),
        (
            "[[waves]]\nname = \"w\"\nrest = true\nbake = \"soon\"\n",
            4,
            "wave `w`: bake `soon`",
        ),
        (
            "[[waves]]\nname = \"w\"\nrest = true\ngate = \"auto\"\n",
            4,
            "wave `w`: unknown gate `auto`",
        ),
        (
            "[[waves]]\nname = \"w\"\nrest = true\nmax_failures = \"lots\"\n",
            4,
            "wave `w`: max_failures: `lots`",
        ),
        (
            "on_budget_exhausted = \"panic\"\n",
            1,
            "use halt or rollback",
        ),
        (
            "[[waves]]\nname = \"w\"\nrest = true\nmax_parallel = 0\n",
            4,
            "wave `w`: max_parallel must be at least 1",
        ),
        (
            "[[waves]]\nname = \"w\"\nrest = true\nmax_parallel_per_shard = 0\n",
            4,
            "wave `w`: max_parallel_per_shard must be at least 1",
        ),
        (
            "[[waves]]\nname = \"w\"\nrest = true\n[waves.prometheus]\nurl = \"http://p:9090\"\nquery = \"up\"\nmin = 5\nmax = 1\n",
            4,
            "wave `w`: prometheus min = 5 is above max = 1",
        ),
        (
            "[[waves]]\nname = \"w\"\nrest = true\n[waves.prometheus]\nurl = \"http://p:9090\"\nquery = \"up\"\ninterval = \"0s\"\n",
            4,
            "wave `w`: prometheus interval must be at least 1s",
        ),
        // a bound of NaN let every value through the gate
        (
            "[[waves]]\nname = \"w\"\nrest = true\n[waves.prometheus]\nurl = \"http://p:9090\"\nquery = \"up\"\nmax = nan\n",
            2,
            "wave `w`: prometheus max = NaN is not a finite number",
        ),
        // the waves together, at the later wave's line; the watch's checks at its own
        (
            "[[waves]]\nname = \"a\"\ncount = 1\n[[waves]]\nname = \"a\"\nrest = true\n",
            5,
            "wave `a`: two waves have this name",
        ),
        (
            "[[waves]]\nname = \"r\"\nrest = true\n[[waves]]\nname = \"b\"\ncount = 1\n",
            5,
            "wave `b`: it comes after `r`, which takes every target left",
        ),
        (
            "watch = \"5m\"\n[[waves]]\nname = \"w\"\nrest = true\n",
            1,
            "needs a wave with a [waves.prometheus] gate",
        ),
        (
            "watch = \"5m\"\n[[waves]]\nname = \"watch\"\nrest = true\n[waves.prometheus]\nurl = \"http://p:9090\"\nquery = \"up\"\nmax = 1\n",
            3,
            "wave `watch`: the stage after the last wave (watch) has this name",
        ),
    ] {
        write(root, "plan.toml", text);
        let e = load_err(root);
        assert!(e.starts_with(&format!("{file}:{line}: ")), "{e}");
        assert!(e.contains(wanted), "{e}");
    }
    // What the model says of one wave alone, at the wave's line.
    for (text, wanted) in [
        (
            "[[waves]]\nname = \"w\"\npercent = 150\n",
            "wave `w`: percent = 150 is outside (0, 100]",
        ),
        (
            "[[waves]]\nname = \"w\"\npercent = 5\ncount = 2\n",
            "wave `w`: give only one of",
        ),
    ] {
        write(root, "plan.toml", text);
        let e = load_err(root);
        assert!(e.starts_with(&format!("{file}:2: ")), "{e}");
        assert!(e.contains(wanted), "{e}");
    }
    // What only the plan's model can say (with the plan's policy): the wave is named.
    write(
        root,
        "plan.toml",
        "[[waves]]\nname = \"w\"\nrest = true\nmax_failures = 2\n",
    );
    let e = PlanSpec::try_from(load_ok(root)).unwrap_err().to_string();
    assert!(
        e.contains("wave `w` allows 2 failed targets, but policy all-or-nothing"),
        "{e}"
    );
}

#[test]
fn loads_a_golang_migrate_directory_in_numeric_order() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(
        root,
        "1_create_users.up.sql",
        "CREATE TABLE users (id bigint);\n",
    );
    write(root, "1_create_users.down.sql", "DROP TABLE users;\n");
    write(
        root,
        "2_add_email.up.sql",
        "ALTER TABLE users ADD COLUMN email text;\n",
    );
    write(
        root,
        "10_add_index.up.sql",
        "CREATE INDEX users_email ON users (email);\n",
    );
    write(
        root,
        "000003_padded.up.sql",
        "ALTER TABLE users ADD COLUMN name text;\n",
    );
    write(
        root,
        "000003_padded.down.sql",
        "ALTER TABLE users DROP COLUMN name;\n",
    );
    write(root, "README.md", "not a migration\n");
    let spec = load_ok(root);
    assert_eq!(
        ids(&spec),
        [
            "1_create_users",
            "2_add_email",
            "000003_padded",
            "10_add_index"
        ]
    );
    let m = &spec.migrations[0];
    assert_eq!(m.up_sql, "CREATE TABLE users (id bigint);");
    assert_eq!(m.down_sql, "DROP TABLE users;");
    assert_eq!(m.checksum, flotilla_core::checksum(&m.up_sql));
    assert!(m.source.ends_with("1_create_users.up.sql"), "{}", m.source);
    assert_eq!(spec.migrations[1].down_sql, "");
    assert_eq!(
        spec.migrations[2].down_sql,
        "ALTER TABLE users DROP COLUMN name;"
    );
    // Numeric order, not id order: each runs after the one before it.
    let plan = domain(spec);
    assert_eq!(plan.migrations.len(), 4);
}

#[test]
fn golang_migrate_errors_name_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(root, "1_a.up.sql", "SELECT 1;\n");
    write(root, "2_b.down.sql", "SELECT 2;\n");
    let e = load_err(root);
    assert!(
        e.contains("2_b.down.sql: a down file without an up file for version 2"),
        "{e}"
    );
    fs::remove_file(root.join("2_b.down.sql")).unwrap();

    write(root, "01_c.up.sql", "SELECT 3;\n");
    let e = load_err(root);
    assert!(e.contains("version 1 is given twice"), "{e}");
    assert!(e.contains("1_a.up.sql") && e.contains("01_c.up.sql"), "{e}");
    fs::remove_file(root.join("01_c.up.sql")).unwrap();

    write(root, "1_other.down.sql", "SELECT 0;\n");
    let e = load_err(root);
    assert!(
        e.contains("1_other.down.sql: the down file of version 1"),
        "{e}"
    );
    fs::remove_file(root.join("1_other.down.sql")).unwrap();

    write(root, "3_empty.up.sql", "-- nothing yet\n");
    let e = load_err(root);
    assert!(e.contains("3_empty.up.sql: holds no SQL statements"), "{e}");
    fs::remove_file(root.join("3_empty.up.sql")).unwrap();

    write(root, "4_quote.up.sql", "SELECT 1;\nSELECT 'open;\n");
    let e = load_err(root);
    assert!(e.contains("4_quote.up.sql:2: unterminated"), "{e}");
    fs::remove_file(root.join("4_quote.up.sql")).unwrap();

    write(root, "5x.up.sql", "SELECT 5;\n");
    let e = load_err(root);
    assert!(
        e.contains("5x.up.sql: not a golang-migrate file name"),
        "{e}"
    );
    fs::remove_file(root.join("5x.up.sql")).unwrap();

    write(root, "99999999999999999999_big.up.sql", "SELECT 1;\n");
    let e = load_err(root);
    assert!(e.contains("larger than golang-migrate's versions"), "{e}");
}

#[test]
fn loads_a_flyway_directory_in_version_order_with_undo_and_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(root, "V1__init.sql", "CREATE TABLE t (id bigint);\n");
    write(root, "V1.1__add.sql", "ALTER TABLE t ADD COLUMN a int;\n");
    write(root, "U1.1__add.sql", "ALTER TABLE t DROP COLUMN a;\n");
    write(root, "V1.2__two.sql", "ALTER TABLE t ADD COLUMN b int;\n");
    write(root, "V1_10__ten.sql", "ALTER TABLE t ADD COLUMN c int;\n");
    write(
        root,
        "V2__index.sql",
        "CREATE INDEX CONCURRENTLY t_a ON t (a);\n",
    );
    write(
        root,
        "V2__index.sql.conf",
        "# Flyway script config\nexecuteInTransaction=false\n",
    );
    let spec = load_ok(root);
    assert_eq!(
        ids(&spec),
        [
            "V1__init",
            "V1.1__add",
            "V1.2__two",
            "V1_10__ten",
            "V2__index"
        ]
    );
    assert_eq!(spec.migrations[1].down_sql, "ALTER TABLE t DROP COLUMN a;");
    assert_eq!(spec.migrations[0].down_sql, "");
    assert_eq!(
        spec.migrations[4].tx_mode,
        pb::TxMode::NonTransactional as i32
    );
    assert_eq!(spec.migrations[0].tx_mode, pb::TxMode::Unspecified as i32);
    let plan = domain(spec);
    assert_eq!(plan.migrations[4].tx_mode, TxMode::NonTransactional);
}

#[test]
fn flyway_errors_name_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(root, "V1__init.sql", "SELECT 1;\n");

    write(
        root,
        "R__views.sql",
        "CREATE OR REPLACE VIEW v AS SELECT 1;\n",
    );
    let e = load_err(root);
    assert!(
        e.contains("R__views.sql: a Flyway repeatable migration"),
        "{e}"
    );
    fs::remove_file(root.join("R__views.sql")).unwrap();

    write(root, "B5__baseline.sql", "SELECT 1;\n");
    let e = load_err(root);
    assert!(
        e.contains("B5__baseline.sql: a Flyway baseline migration"),
        "{e}"
    );
    fs::remove_file(root.join("B5__baseline.sql")).unwrap();

    write(root, "U3__gone.sql", "SELECT 1;\n");
    let e = load_err(root);
    assert!(
        e.contains("U3__gone.sql: an undo migration without a versioned migration V3__"),
        "{e}"
    );
    fs::remove_file(root.join("U3__gone.sql")).unwrap();

    write(root, "V1.0__again.sql", "SELECT 2;\n");
    let e = load_err(root);
    assert!(e.contains("version 1 is given twice"), "{e}");
    assert!(
        e.contains("V1__init.sql") && e.contains("V1.0__again.sql"),
        "{e}"
    );
    fs::remove_file(root.join("V1.0__again.sql")).unwrap();

    write(root, "V1.x__bad.sql", "SELECT 2;\n");
    let e = load_err(root);
    assert!(
        e.contains("V1.x__bad.sql: not a Flyway version: `1.x`"),
        "{e}"
    );
    fs::remove_file(root.join("V1.x__bad.sql")).unwrap();

    write(
        root,
        "V2__schema.sql",
        "SELECT 1;\nCREATE TABLE ${schema}.t (id int);\n",
    );
    let e = load_err(root);
    assert!(
        e.contains("V2__schema.sql:2: Flyway placeholder `${schema}`"),
        "{e}"
    );
    write(root, "V2__schema.sql", "SELECT 2;\n");

    write(
        root,
        "V2__schema.sql.conf",
        "executeInTransaction=false\nmixed=true\n",
    );
    let e = load_err(root);
    assert!(
        e.contains("V2__schema.sql.conf:2: unsupported script setting `mixed`"),
        "{e}"
    );
    write(root, "V2__schema.sql.conf", "executeInTransaction=maybe\n");
    let e = load_err(root);
    assert!(
        e.contains("V2__schema.sql.conf:1: executeInTransaction is `maybe`"),
        "{e}"
    );
}

#[test]
fn refuses_directories_that_mix_tools() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(root, "1_a.up.sql", "SELECT 1;\n");
    write(root, "V2__b.sql", "SELECT 2;\n");
    let e = load_err(root);
    assert!(e.contains("mixed migration formats"), "{e}");
    assert!(
        e.contains("golang-migrate (1_a.up.sql)") && e.contains("Flyway (V2__b.sql)"),
        "{e}"
    );
    fs::remove_file(root.join("V2__b.sql")).unwrap();

    write(root, "20250101000000_c.sql", "-- migrate:up\nSELECT 3;\n");
    let e = load_err(root);
    assert!(
        e.contains("dbmate (20250101000000_c.sql)") && e.contains("golang-migrate (1_a.up.sql)"),
        "{e}"
    );
    fs::remove_file(root.join("20250101000000_c.sql")).unwrap();
    fs::remove_file(root.join("1_a.up.sql")).unwrap();

    write(root, "V1__a.sql", "SELECT 1;\n");
    native(root, "20250102000000_b", None, "SELECT 2;");
    let e = load_err(root);
    assert!(
        e.contains("Flotilla's own (a subdirectory) (20250102000000_b)")
            && e.contains("Flyway (V1__a.sql)"),
        "{e}"
    );
}

#[test]
fn a_plan_file_names_golang_migrate_migrations_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(root, "migrations/1_a.up.sql", "SELECT 1;\n");
    write(root, "migrations/2_b.up.sql", "SELECT 2;\n");
    write(
        root,
        "plan.toml",
        "name = \"gm\"\nmigrations_dir = \"migrations\"\nmigrations = [\"2_b\"]\n",
    );
    let spec = load_ok(&root.join("plan.toml"));
    assert_eq!(ids(&spec), ["2_b"]);
}

/// Without groups or `[dependencies]`, a migration naming no `depends_on` waits for the one
/// before it, whatever the others name; one naming some waits for those only. Before, one
/// `depends_on` anywhere took the id order away from every migration (`002` ran beside
/// `001`, whose table it altered). No wait is added that would close a cycle.
#[test]
fn a_migration_naming_no_dependency_follows_the_one_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    native(root, "001_promo", None, "CREATE TABLE promo (id int);");
    native(
        root,
        "002_promo_code",
        None,
        "ALTER TABLE promo ADD COLUMN code text;",
    );
    native(
        root,
        "003_promo_log",
        Some("depends_on = [\"001_promo\"]\n"),
        "CREATE TABLE promo_log (id int);",
    );
    native(root, "004_after", None, "SELECT 4;");
    let spec = load_ok(root);
    let deps: Vec<(String, Vec<String>)> = spec
        .dependencies
        .iter()
        .map(|d| (d.migration.clone(), d.depends_on.clone()))
        .collect();
    // 004 waits for 002 and 003 both (003 named only 001, and ran beside 002)
    assert_eq!(
        deps,
        [
            ("002_promo_code".to_string(), vec!["001_promo".to_string()]),
            (
                "004_after".to_string(),
                vec!["002_promo_code".to_string(), "003_promo_log".to_string()]
            ),
        ]
    );
    // 001 waits for 002 (written): 002, after it in id order, does not wait for 001 back
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    native(
        root,
        "001_a",
        Some("depends_on = [\"002_b\"]\n"),
        "SELECT 1;",
    );
    native(root, "002_b", None, "SELECT 2;");
    let spec = load_ok(root);
    assert!(spec.dependencies.is_empty(), "{:?}", spec.dependencies);
    flotilla_core::PlanSpec::try_from(spec).expect("no cycle");
    // nor through waits added before: 001 waits for 003 (written); 002 follows 001, and
    // 003, which 001 waits for through nothing written, would close 003 -> 002 -> 001 -> 003
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    native(
        root,
        "001_a",
        Some("depends_on = [\"003_c\"]\n"),
        "SELECT 1;",
    );
    native(root, "002_b", None, "SELECT 2;");
    native(root, "003_c", None, "SELECT 3;");
    let spec = load_ok(root);
    let deps: Vec<(String, Vec<String>)> = spec
        .dependencies
        .iter()
        .map(|d| (d.migration.clone(), d.depends_on.clone()))
        .collect();
    assert_eq!(
        deps,
        [("002_b".to_string(), vec!["001_a".to_string()])],
        "{deps:?}"
    );
    let spec = flotilla_core::PlanSpec::try_from(spec).expect("no cycle");
    flotilla_core::dag::MigrationGraph::build(&spec).expect("no cycle");
}

/// A file that is not UTF-8 (saved as Latin-1) is named with the line, column and byte where
/// it stops being UTF-8 (it said "stream did not contain valid UTF-8" of the whole file).
#[test]
fn a_file_not_utf8_is_named_where() {
    let tmp = tempfile::tempdir().unwrap();
    native(tmp.path(), "001_a", None, "SELECT 1;\n");
    let up = tmp.path().join("001_a/up.sql");
    // (the column in characters: "é" before it is one, two bytes)
    fs::write(
        &up,
        "SELECT 1;\nSELECT 'é caf"
            .bytes()
            .chain(*b"\xe9';\n")
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.ends_with(&format!(
            "{}:2: not UTF-8: byte 0xe9 at column 14 (offset 24 in the file); save it as UTF-8",
            up.display()
        )),
        "{e}"
    );
}
