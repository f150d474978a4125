//! Flotilla's native migration: a directory named by the migration id holding
//! `migration.toml` (optional), `up.sql`, `down.sql` and `verify.sql` (optional).
use std::path::Path;
use std::time::Duration;

use flotilla_core::pb;
use flotilla_core::selector::Selector;
use flotilla_core::{MigrationId, Scope};
use serde::Deserialize;
use toml::Spanned;

use super::error::{LoadError, line_of, parse_toml, read_text};
use super::parts::{Parts, statements};

const MIGRATION_FILE: &str = "migration.toml";
const UP: &str = "up.sql";
const DOWN: &str = "down.sql";
const VERIFY: &str = "verify.sql";

const KINDS: [&str; 7] = [
    "schema", "data", "index", "view", "function", "policy", "other",
];
const RISKS: [&str; 4] = ["low", "medium", "high", "critical"];

/// `migration.toml`. Every key is optional; unknown keys are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrationFile {
    description: Option<String>,
    kind: Option<Spanned<String>>,
    #[serde(default)]
    depends_on: Vec<Spanned<String>>,
    scope: Option<Spanned<String>>,
    selector: Option<Spanned<String>>,
    transactional: Option<bool>,
    lock_timeout: Option<Spanned<String>>,
    statement_timeout: Option<Spanned<String>>,
    risk: Option<Spanned<String>>,
    #[serde(default)]
    irreversible: bool,
    data: Option<DataTable>,
    /// A semantic version, e.g. "2.4.0" (`fleet status` shows it).
    version: Option<String>,
    /// What `flotilla plan test` checks after each up (not sent to the coordinator).
    test: Option<TestTable>,
    /// Drops data on purpose: the lint's destructive-drop rule lets it through.
    #[serde(default)]
    destructive: bool,
    lint: Option<LintTable>,
}

/// `[lint]` of `migration.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LintTable {
    /// `ignore = [{ rule = "index-not-concurrent", reason = "..." }]`
    #[serde(default)]
    ignore: Vec<Spanned<toml::Value>>,
}

/// `[test]` of `migration.toml`: `flotilla plan test` runs `setup` in the target before the
/// migration's first up, then after each up checks that `query` returns `expect`: its rows
/// in order, each a list of the row's values in column order, compared as PostgreSQL's text
/// of them (`"NULL"` for a null).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestTable {
    #[serde(default)]
    pub setup: String,
    pub query: String,
    #[serde(default)]
    pub expect: Vec<Vec<toml::Value>>,
}

impl TestTable {
    /// The expected rows as texts (None: NULL): strings as they are, numbers and booleans
    /// as PostgreSQL prints them.
    pub fn expected(&self) -> Result<Vec<Vec<Option<String>>>, String> {
        self.expect
            .iter()
            .enumerate()
            .map(|(r, row)| {
                row.iter()
                    .enumerate()
                    .map(|(c, v)| match v {
                        toml::Value::String(s) if s == "NULL" => Ok(None),
                        toml::Value::String(s) => Ok(Some(s.clone())),
                        toml::Value::Integer(i) => Ok(Some(i.to_string())),
                        toml::Value::Float(f) => Ok(Some(f.to_string())),
                        // as PostgreSQL prints a boolean
                        toml::Value::Boolean(b) => Ok(Some(if *b { "t" } else { "f" }.into())),
                        other => Err(format!(
                            "[test] expect: row {} value {}: {} is not a string, number or boolean",
                            r + 1,
                            c + 1,
                            other.type_str()
                        )),
                    })
                    .collect()
            })
            .collect()
    }
}

/// The `[test]` table of the migration in `dir`, if it has one.
pub fn read_test(dir: &Path) -> Result<Option<TestTable>, LoadError> {
    let toml_path = dir.join(MIGRATION_FILE);
    if !toml_path.is_file() {
        return Ok(None);
    }
    let text = read_text(&toml_path)?;
    let meta = parse_toml::<MigrationFile>(&toml_path, &text)?;
    Ok(meta.test)
}

/// `[data]` of `migration.toml`: a batched data change.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataTable {
    table: Spanned<String>,
    /// One column, or a list of columns (a composite key).
    key: Spanned<toml::Value>,
    batch_size: Option<Spanned<i64>>,
    rows_per_second: Option<Spanned<i64>>,
    batch: Spanned<String>,
    filter: Option<String>,
    /// Adaptive batch size toward this duration per batch.
    target_batch_ms: Option<Spanned<i64>>,
    min_batch_size: Option<Spanned<i64>>,
    max_batch_size: Option<Spanned<i64>>,
    /// One budget for every target of the step on the shard's server.
    server_rows_per_second: Option<Spanned<i64>>,
    throttle: Option<ThrottleTable>,
    /// Columns whose old values are saved per batch, restored when the step is undone.
    #[serde(default)]
    prior_image: Vec<String>,
}

/// `[data.throttle]`: health signals checked before every batch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThrottleTable {
    max_replication_lag_ms: Option<Spanned<f64>>,
    max_lock_waits: Option<Spanned<f64>>,
    max_active_sessions: Option<Spanned<f64>>,
    #[serde(default)]
    check: Vec<CheckTable>,
}

/// `[[data.throttle.check]]`: custom SQL returning one number.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckTable {
    name: String,
    sql: String,
    max: f64,
}

/// Reads the migration in directory `dir`, whose name is `name`.
pub(super) fn read(dir: &Path, name: &str) -> Result<pb::Migration, LoadError> {
    let up_path = dir.join(UP);
    if !up_path.is_file() {
        return Err(LoadError::invalid(
            dir,
            format!("a migration directory needs {UP} (and {DOWN}); this one has no {UP}"),
        ));
    }
    if let Err(e) = MigrationId::parse(name) {
        return Err(LoadError::invalid(
            dir,
            format!("directory name is not a migration id: {e}"),
        ));
    }
    check_entries(dir)?;

    let toml_path = dir.join(MIGRATION_FILE);
    let (meta, toml_text) = if toml_path.is_file() {
        let text = read_text(&toml_path)?;
        (parse_toml::<MigrationFile>(&toml_path, &text)?, text)
    } else {
        (MigrationFile::default(), String::new())
    };
    // Errors about a key's value point at the line that holds it.
    let at = |span: std::ops::Range<usize>, message: String| {
        LoadError::at_line(&toml_path, line_of(&toml_text, span.start), message)
    };

    let up_sql = read_text(&up_path)?;
    // A data migration's change is its batch SQL: its up.sql may be empty.
    if statements(&up_path, &up_sql, 1)?.is_empty() && meta.data.is_none() {
        return Err(LoadError::invalid(&up_path, "holds no SQL statements"));
    }

    let down_path = dir.join(DOWN);
    if !down_path.is_file() {
        let hint = if meta.irreversible {
            "; an irreversible migration says so with an empty down.sql"
        } else {
            ""
        };
        return Err(LoadError::invalid(dir, format!("missing {DOWN}{hint}")));
    }
    let down_sql = read_text(&down_path)?;
    let down_empty = statements(&down_path, &down_sql, 1)?.is_empty();
    // a data change with a prior image is undone by restoring it: down.sql may be empty
    let restores = meta
        .data
        .as_ref()
        .is_some_and(|d| !d.prior_image.is_empty());
    match (down_empty, meta.irreversible) {
        (true, false) if restores => {}
        (true, false) => {
            return Err(LoadError::invalid(
                &down_path,
                format!(
                    "holds no SQL statements; if the migration cannot be undone, \
                     say `irreversible = true` in {MIGRATION_FILE}"
                ),
            ));
        }
        (false, true) => {
            return Err(LoadError::invalid(
                &down_path,
                format!("holds statements, but {MIGRATION_FILE} says irreversible = true"),
            ));
        }
        _ => {}
    }

    let verify_path = dir.join(VERIFY);
    // there (a link too, even one to nothing) but not a file: the migration would run
    // unverified without a word
    let verify_there = std::fs::symlink_metadata(&verify_path).is_ok();
    let verify_sql = if verify_path.is_file() {
        let text = read_text(&verify_path)?;
        let n = statements(&verify_path, &text, 1)?.len();
        if n != 1 {
            return Err(LoadError::invalid(
                &verify_path,
                format!(
                    "must be one query returning a boolean; it holds {n} statements \
                     (delete the file for a migration without one)"
                ),
            ));
        }
        text
    } else if verify_there {
        return Err(LoadError::invalid(
            &verify_path,
            "not a regular file (a directory, a link to nothing, ...)".to_string(),
        ));
    } else {
        String::new()
    };

    let mut m = Parts {
        id: name.to_string(),
        up_sql,
        down_sql,
        verify_sql,
        source: dir.display().to_string(),
    }
    .into_migration();

    m.destructive = meta.destructive;
    if let Some(lint) = &meta.lint {
        for entry in &lint.ignore {
            m.lint_ignore
                .push(lint_ignore(entry.get_ref()).map_err(|e| at(entry.span(), e))?);
        }
    }
    if meta.irreversible {
        // Said in so many words: the lint's missing-down rule has its answer.
        m.lint_ignore.push(pb::LintIgnore {
            rule: flotilla_core::lint::MISSING_DOWN.into(),
            reason: format!("irreversible = true in {MIGRATION_FILE}"),
        });
    }
    m.description = meta.description.unwrap_or_default().trim().to_string();
    m.version = meta.version.unwrap_or_default();
    if let Some(kind) = meta.kind {
        m.kind = one_of(&kind, &KINDS, "kind").map_err(|e| at(kind.span(), e))?;
    }
    if let Some(risk) = meta.risk {
        m.risk = one_of(&risk, &RISKS, "risk").map_err(|e| at(risk.span(), e))?;
    }
    for d in &meta.depends_on {
        MigrationId::parse(d.get_ref()).map_err(|e| at(d.span(), format!("depends_on: {e}")))?;
        m.depends_on.push(d.get_ref().clone());
    }
    if let Some(scope) = meta.scope {
        let s = Scope::parse(scope.get_ref()).ok_or_else(|| {
            at(
                scope.span(),
                format!("unknown scope `{}`: use tenant or shard", scope.get_ref()),
            )
        })?;
        m.scope = match s {
            Scope::Shard => pb::Scope::Shard,
            Scope::Tenant => pb::Scope::Tenant,
        } as i32;
    }
    if let Some(selector) = meta.selector {
        Selector::parse(selector.get_ref()).map_err(|e| at(selector.span(), e.to_string()))?;
        m.selector = selector.get_ref().trim().to_string();
    }
    m.tx_mode = match meta.transactional {
        None => pb::TxMode::Unspecified,
        Some(true) => pb::TxMode::Transactional,
        Some(false) => pb::TxMode::NonTransactional,
    } as i32;
    if let Some(t) = meta.lock_timeout {
        m.lock_timeout_ms = millis(&t, "lock_timeout").map_err(|e| at(t.span(), e))?;
    }
    if let Some(t) = meta.statement_timeout {
        m.statement_timeout_ms = millis(&t, "statement_timeout").map_err(|e| at(t.span(), e))?;
    }
    if let Some(data) = meta.data {
        let d = data;
        let key = match d.key.get_ref() {
            toml::Value::String(k) => k.clone(),
            toml::Value::Array(cols) if !cols.is_empty() && cols.iter().all(|c| c.is_str()) => cols
                .iter()
                .filter_map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            _ => {
                return Err(at(
                    d.key.span(),
                    "[data] key must be a column name or a list of column names".into(),
                ));
            }
        };
        // Each number's range, checked here where its line is known (the receiver's own
        // check of a too-big batch size named the file alone).
        let ranged = |v: &Spanned<i64>, name: &str, min: i64, max: i64| {
            let n = *v.get_ref();
            if n < min {
                Err(at(
                    v.span(),
                    format!("[data] {name} must be at least {min}, got {n}"),
                ))
            } else if n > max {
                // (it said "must be at least 1" of a number too big)
                Err(at(
                    v.span(),
                    format!("[data] {name} must be at most {max}, got {n}"),
                ))
            } else {
                Ok(n)
            }
        };
        let rows = |v: &Spanned<i64>, name: &str, min: i64| ranged(v, name, min, u32::MAX as i64);
        let sizes =
            |v: &Spanned<i64>, name: &str| ranged(v, name, 1, flotilla_core::MAX_BATCH_SIZE as i64);
        let batch_size = match &d.batch_size {
            Some(v) => sizes(v, "batch_size")? as u32,
            None => 0,
        };
        let rows_per_second = match &d.rows_per_second {
            Some(v) => rows(v, "rows_per_second", 0)? as u64,
            None => 0,
        };
        if d.table.get_ref().trim().is_empty() {
            return Err(at(d.table.span(), "[data] table is empty".into()));
        }
        if d.batch.get_ref().trim().is_empty() {
            return Err(at(d.batch.span(), "[data] batch SQL is empty".into()));
        }
        let filter = d.filter.unwrap_or_default();
        let opt = |v: &Option<Spanned<i64>>,
                   check: &dyn Fn(&Spanned<i64>) -> Result<i64, LoadError>| {
            v.as_ref().map_or(Ok(0), |v| check(v).map(|n| n as u64))
        };
        let target_batch_ms = opt(&d.target_batch_ms, &|v| {
            ranged(
                v,
                "target_batch_ms",
                1,
                flotilla_core::MAX_TARGET_BATCH_MS.into(),
            )
        })? as u32;
        let min_batch_size = opt(&d.min_batch_size, &|v| sizes(v, "min_batch_size"))? as u32;
        let max_batch_size = opt(&d.max_batch_size, &|v| sizes(v, "max_batch_size"))? as u32;
        let server_rows_per_second = opt(&d.server_rows_per_second, &|v| {
            rows(v, "server_rows_per_second", 1)
        })?;
        // A floor above what one batch may take under the rate (one second of the lower
        // limit) cannot be kept: refused rather than capped without a word, which ran
        // smaller batches than the file asked for. (`batch_size` and `max_batch_size`
        // above it are capped, as documented: they are ceilings, which the rate lowers.)
        if let Some(v) = &d.min_batch_size
            && let Some((limit, rate)) =
                flotilla_core::model::rate_cap(rows_per_second, server_rows_per_second)
            && u64::from(min_batch_size) > rate
        {
            return Err(at(
                v.span(),
                format!(
                    "[data] min_batch_size must be at most {rate} (one second of {limit} = {rate}: \
                     a batch takes no more than one second of the rate), got {min_batch_size}"
                ),
            ));
        }
        let mut health = Vec::new();
        if let Some(t) = d.throttle {
            for (signal, max) in [
                ("replication_lag_ms", t.max_replication_lag_ms),
                ("lock_waits", t.max_lock_waits),
                ("active_sessions", t.max_active_sessions),
            ] {
                if let Some(max) = max {
                    if *max.get_ref() < 0.0 {
                        return Err(at(
                            max.span(),
                            format!("[data.throttle] max_{signal} must be at least 0"),
                        ));
                    }
                    health.push(pb::HealthCheck {
                        signal: signal.into(),
                        name: signal.into(),
                        sql: String::new(),
                        max: *max.get_ref(),
                    });
                }
            }
            for c in t.check {
                health.push(pb::HealthCheck {
                    signal: "sql".into(),
                    name: c.name,
                    sql: c.sql,
                    max: c.max,
                });
            }
        }
        let data = pb::DataChange {
            table: d.table.into_inner().trim().to_string(),
            key: key.trim().to_string(),
            batch_size,
            rows_per_second,
            batch_sql: d.batch.into_inner(),
            filter,
            target_batch_ms,
            min_batch_size,
            max_batch_size,
            server_rows_per_second,
            health,
            prior_image: d.prior_image,
        };
        m.checksum = flotilla_core::data_checksum(&m.up_sql, &data);
        m.data = Some(data);
        if m.kind.is_empty() {
            m.kind = "data".into();
        }
    }
    Ok(m)
}

/// Refuses files in a migration directory that look like a misnamed part
/// (`donw.sql`, `Migration.toml`, `migration.yaml`, `up.sql.bak`): they would otherwise be
/// silently ignored.
fn check_entries(dir: &Path) -> Result<(), LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LoadError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LoadError::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let lower = name.to_ascii_lowercase();
        let known = [UP, DOWN, VERIFY, MIGRATION_FILE].contains(&name.as_ref());
        // A part under another name or extension (`migration.yaml`, `migration.tml`,
        // `up.sql.bak`) was passed over: its settings (a selector, a policy) or SQL with it.
        let part = ["migration.", "up.", "down.", "verify."]
            .iter()
            .any(|stem| lower.starts_with(stem));
        let settings = [".sql", ".toml", ".tml"]
            .iter()
            .any(|ext| lower.ends_with(ext));
        if !known && !name.starts_with('.') && (part || settings) {
            return Err(LoadError::invalid(
                &entry.path(),
                format!(
                    "unexpected file in a migration directory: expected {UP}, {DOWN}, \
                     {VERIFY} or {MIGRATION_FILE}"
                ),
            ));
        }
    }
    Ok(())
}

/// One `lint.ignore` entry: `{ rule = "...", reason = "..." }`, a known rule, a reason.
fn lint_ignore(entry: &toml::Value) -> Result<pb::LintIgnore, String> {
    let shape = "lint.ignore entries are { rule = \"...\", reason = \"why it is safe here\" }";
    let toml::Value::Table(t) = entry else {
        return Err(shape.to_string());
    };
    if let Some(key) = t.keys().find(|k| *k != "rule" && *k != "reason") {
        return Err(format!("lint.ignore: unknown key `{key}`: {shape}"));
    }
    let text = |key: &str| t.get(key).and_then(toml::Value::as_str).map(str::trim);
    let rule = text("rule").ok_or_else(|| format!("lint.ignore: no rule: {shape}"))?;
    flotilla_core::lint::check_ignorable(rule).map_err(|e| format!("lint.ignore: {e}"))?;
    let reason = text("reason").unwrap_or_default();
    if reason.is_empty() {
        return Err(format!(
            "lint.ignore: rule `{rule}` is ignored without a reason: say why it is safe here"
        ));
    }
    Ok(pb::LintIgnore {
        rule: rule.to_string(),
        reason: reason.to_string(),
    })
}

fn one_of(value: &Spanned<String>, allowed: &[&str], key: &str) -> Result<String, String> {
    let v = value.get_ref().trim().to_ascii_lowercase();
    if allowed.contains(&v.as_str()) {
        Ok(v)
    } else {
        Err(format!(
            "unknown {key} `{}`: use one of {}",
            value.get_ref(),
            allowed.join(", ")
        ))
    }
}

/// A humantime duration (`5s`, `10m`, `1h 30m`) in whole milliseconds, at least 1ms.
fn millis(value: &Spanned<String>, key: &str) -> Result<u64, String> {
    let text = value.get_ref();
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid {key} `{text}`: {e} (use e.g. \"5s\", \"10m\")"))?;
    if d < Duration::from_millis(1) {
        return Err(format!("invalid {key} `{text}`: must be at least 1ms"));
    }
    if let Some(why) = flotilla_core::timeout_over_limit(d.as_millis()) {
        return Err(format!("invalid {key} `{text}`: {why}"));
    }
    Ok(d.as_millis() as u64)
}
