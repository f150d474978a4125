//! The lint over tests/fixtures/lint: one migration per rule and clean ones. A finding is
//! expected exactly where a fixture says `expect: RULE` (see its README.md).
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use flotilla_core::PlanSpec;
use flotilla_core::lint::{ATOMIC_UNIT_SPLIT, Finding, LintOptions, RULES, lint_plan};

use super::{Overrides, load};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lint")
}

/// (migration, rule, file, line) of every `expect:` marker; a marker outside a native
/// migration's up.sql/down.sql is about the migration as a whole (file and line not compared).
fn expected(dir: &Path) -> BTreeSet<(String, String, String, u32)> {
    let mut out = BTreeSet::new();
    let mut read = |id: &str, file: &str, path: &Path, lines: bool| {
        let text = std::fs::read_to_string(path).unwrap();
        for (i, line) in text.lines().enumerate() {
            if let Some((_, rules)) = line.split_once("expect:") {
                for rule in rules.split_whitespace() {
                    let (file, line) = if lines {
                        (file.to_string(), i as u32 + 1)
                    } else {
                        ("*".to_string(), 0)
                    };
                    out.insert((id.to_string(), rule.to_string(), file, line));
                }
            }
        }
    };
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            for file in ["up.sql", "down.sql"] {
                read(&name, file, &path.join(file), true);
            }
            read(&name, "*", &path.join("migration.toml"), false);
        } else if let Some(id) = name.strip_suffix(".sql") {
            read(id, "*", &path, false);
        }
    }
    out
}

fn found(findings: &[Finding]) -> BTreeSet<(String, String, String, u32)> {
    findings
        .iter()
        .map(|f| {
            let file = if f.line == 0 {
                "*".to_string()
            } else {
                f.file.clone()
            };
            (f.migration.clone(), f.rule.clone(), file, f.line)
        })
        .collect()
}

fn lint_fixtures(naming: bool) -> Vec<Finding> {
    let raw = load(&fixtures(), &Overrides::default()).expect("fixtures load");
    let spec = PlanSpec::try_from(raw).expect("fixtures are a valid plan");
    let options = LintOptions {
        naming,
        ..LintOptions::default()
    };
    lint_plan(&spec, &options)
}

#[test]
fn each_fixture_finds_its_rule_on_its_line_and_clean_ones_find_nothing() {
    let findings = lint_fixtures(true);
    let expected = expected(&fixtures());
    let found = found(&findings);
    let missing: Vec<_> = expected.difference(&found).collect();
    let unexpected: Vec<_> = found.difference(&expected).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "missing: {missing:#?}\nunexpected: {unexpected:#?}\nall findings: {findings:#?}"
    );
    // Every rule has a fixture that shows it.
    let rules: BTreeSet<&str> = findings.iter().map(|f| f.rule.as_str()).collect();
    // (atomic-unit-split needs an atomic plan, which the fixtures are not: the core's lint
    // tests and the e2e atomic tests show it)
    for rule in RULES.iter().filter(|r| r.id != ATOMIC_UNIT_SPLIT) {
        assert!(rules.contains(rule.id), "no fixture shows rule {}", rule.id);
    }
    // A finding says what to do about it.
    assert!(
        findings
            .iter()
            .all(|f| !f.message.is_empty() && !f.hint.is_empty())
    );
}

#[test]
fn naming_rules_are_checked_only_when_asked_for() {
    let findings = lint_fixtures(false);
    assert!(
        findings.iter().all(|f| !f.rule.starts_with("naming-")),
        "{findings:#?}"
    );
    assert!(findings.iter().any(|f| f.rule == "destructive-drop"));
}

#[test]
fn the_coordinated_example_lints_clean() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/coord-2025-001");
    let raw = load(&dir, &Overrides::default()).unwrap();
    let spec = PlanSpec::try_from(raw).unwrap();
    let findings = lint_plan(
        &spec,
        &LintOptions {
            naming: true,
            ..LintOptions::default()
        },
    );
    assert!(findings.is_empty(), "{findings:#?}");
    // Its two index builds are ignored with a reason, which the wire carries.
    let ignored: Vec<_> = spec
        .migrations
        .iter()
        .flat_map(|m| &m.lint_ignore)
        .collect();
    assert_eq!(ignored.len(), 2);
    assert!(
        ignored
            .iter()
            .all(|i| i.rule == "index-not-concurrent" && !i.reason.is_empty())
    );
}

// --- What the files say to the lint: `destructive`, `[lint] ignore`, dbmate's comment. ---

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn native(root: &Path, toml: &str) {
    write(root, "001_a/migration.toml", toml);
    write(root, "001_a/up.sql", "CREATE INDEX i ON t (x);\n");
    write(root, "001_a/down.sql", "DROP INDEX i;\n");
}

#[test]
fn migration_toml_carries_destructive_and_ignores_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    native(
        tmp.path(),
        "destructive = true\n\n[lint]\nignore = [\n  { rule = \"index-not-concurrent\", reason = \"t is tiny\" },\n]\n",
    );
    let spec = load(tmp.path(), &Overrides::default()).unwrap();
    let m = &spec.migrations[0];
    assert!(m.destructive);
    assert_eq!(m.lint_ignore.len(), 1);
    assert_eq!(
        (
            m.lint_ignore[0].rule.as_str(),
            m.lint_ignore[0].reason.as_str()
        ),
        ("index-not-concurrent", "t is tiny")
    );
}

#[test]
fn a_bad_ignore_is_refused_naming_file_line_and_what_is_wrong() {
    for (toml, line, says) in [
        (
            "description = \"x\"\n[lint]\nignore = [{ rule = \"index-not-concurent\", reason = \"r\" }]\n",
            3,
            "unknown rule `index-not-concurent`",
        ),
        (
            "[lint]\nignore = [\n  { rule = \"rename\" },\n]\n",
            3,
            "ignored without a reason",
        ),
        ("[lint]\nignore = [\"rename\"]\n", 2, "entries are { rule ="),
        (
            "[lint]\nignore = [{ rule = \"parse-error\", reason = \"it parses for me\" }]\n",
            2,
            "`parse-error` cannot be ignored",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        native(tmp.path(), toml);
        let e = load(tmp.path(), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("migration.toml:{line}:")) && e.contains(says),
            "{toml}: {e}"
        );
    }
}

/// Flyway and golang-migrate directories, adopted as they are, have no migration.toml: an
/// up file without its undo file says it is meant in a comment, as a dbmate file does.
/// Before, such a migration was a `missing-down` error nothing could answer, and a Flyway
/// directory (undo files are rare) could not be submitted at all.
#[test]
fn flyway_and_golang_migrate_files_answer_missing_down_in_a_comment() {
    for name in ["V1_2__add_note.sql", "000002_add_note.up.sql"] {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            name,
            "-- flotilla:lint-ignore missing-down the note stays\nCOMMENT ON TABLE orders IS 'kept';\n",
        );
        let spec = PlanSpec::try_from(load(tmp.path(), &Overrides::default()).unwrap()).unwrap();
        let findings = lint_plan(&spec, &LintOptions::default());
        assert!(findings.is_empty(), "{name}: {findings:#?}");
        assert_eq!(spec.migrations[0].lint_ignore[0].reason, "the note stays");

        // without it, the error says how to answer it there
        write(tmp.path(), name, "COMMENT ON TABLE orders IS 'kept';\n");
        let spec = PlanSpec::try_from(load(tmp.path(), &Overrides::default()).unwrap()).unwrap();
        let findings = lint_plan(&spec, &LintOptions::default());
        assert!(
            findings.len() == 1
                && findings[0]
                    .hint
                    .contains("-- flotilla:lint-ignore missing-down"),
            "{name}: {findings:#?}"
        );
        // and a rule that cannot be ignored is refused where it is said
        write(
            tmp.path(),
            name,
            "COMMENT ON TABLE orders IS 'kept';\n-- flotilla:lint-ignore parse-error no\n",
        );
        let e = load(tmp.path(), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{name}:2:")) && e.contains("cannot be ignored"),
            "{e}"
        );
    }
}

#[test]
fn irreversible_answers_missing_down_and_dbmate_says_it_in_a_comment() {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "001_a/migration.toml",
        "irreversible = true\nscope = \"shard\"\n",
    );
    write(
        tmp.path(),
        "001_a/up.sql",
        "CREATE EXTENSION IF NOT EXISTS citext WITH SCHEMA public;\n",
    );
    write(tmp.path(), "001_a/down.sql", "-- cannot be undone\n");
    write(
        tmp.path(),
        "002_b.sql",
        "-- migrate:up\n-- flotilla:lint-ignore missing-down the comment stays\nCOMMENT ON TABLE orders IS 'kept';\n",
    );
    let spec = PlanSpec::try_from(load(tmp.path(), &Overrides::default()).unwrap()).unwrap();
    let findings = lint_plan(&spec, &LintOptions::default());
    assert!(findings.is_empty(), "{findings:#?}");
    assert_eq!(
        spec.migrations[1].lint_ignore[0].reason,
        "the comment stays"
    );

    // Without a reason, the comment is refused where it is.
    write(
        tmp.path(),
        "002_b.sql",
        "-- migrate:up\n-- flotilla:lint-ignore missing-down\nCREATE EXTENSION IF NOT EXISTS hstore;\n",
    );
    let e = load(tmp.path(), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("002_b.sql:2:") && e.contains("needs a reason"),
        "{e}"
    );
}
