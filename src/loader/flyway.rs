//! Flyway's SQL migrations, read unchanged: versioned `V<version>__<description>.sql`
//! and their undo `U<version>__<description>.sql`. Versions are numbers separated by `.`
//! or `_` (`V1__init.sql`, `V1.1__add.sql`, `V2_0_1__fix.sql`) and order numerically,
//! part by part, as Flyway orders them (`1` < `1.1` < `1.10` < `2`). The migration id is the
//! file stem (`V1.1__add`); `flyway_schema_history.version` (`1.1`) is what a baseline
//! matches.
//!
//! Not supported, each refused naming the file: repeatable migrations (`R__`), which
//! Flyway re-runs whenever their checksum changes (Flotilla applies a migration once per
//! target); baseline migrations (`B<version>__`); placeholders (`${...}`), which Flyway
//! replaces and Flotilla would send unreplaced. A script configuration file beside a
//! migration (`V1__init.sql.conf`) may say `executeInTransaction=false`.
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use flotilla_core::MigrationId;
use flotilla_core::pb;

use super::error::{LoadError, read_text};
use super::parts::{Parts, statements};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Versioned,
    Undo,
}

/// A Flyway version: its numeric parts, trailing zeros dropped, so `1.0` equals `1`
/// (Flyway compares them so, and would refuse both in one directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Version(Vec<u64>);

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.cmp(&other.0)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(if parts.is_empty() { "0" } else { "" })?;
        f.write_str(&parts.join("."))
    }
}

/// A Flyway file name, split.
#[derive(Debug)]
pub(super) struct FileName {
    kind: Kind,
    version: Version,
    /// The file stem (`V1.1__add_column`): the migration id.
    stem: String,
}

/// Whether `name` looks like a Flyway SQL migration (`V`, `U`, `R` or `B`, then `__`
/// after the version): `None` if not; an error if it does but Flotilla cannot read it.
pub(super) fn parse_name(name: &str) -> Option<Result<FileName, String>> {
    let stem = name.strip_suffix(".sql")?;
    let prefix = stem.chars().next()?;
    let (version_text, _description) = stem[1..].split_once("__")?;
    let kind = match prefix {
        'V' => Kind::Versioned,
        'U' => Kind::Undo,
        'R' if version_text.is_empty() => {
            return Some(Err(
                "a Flyway repeatable migration (R__): Flyway re-runs it whenever it changes, \
                 Flotilla applies each migration once per target; make it a versioned \
                 migration (V<version>__<description>.sql)"
                    .into(),
            ));
        }
        'B' => {
            return Some(Err(
                "a Flyway baseline migration (B<version>__): not supported; make it a versioned \
                 migration (V<version>__<description>.sql)"
                    .into(),
            ));
        }
        _ => return None,
    };
    let Some(parts) = flotilla_core::foreign::flyway_version(version_text) else {
        return Some(Err(format!(
            "not a Flyway version: `{version_text}` (expected numbers separated by `.` or \
             `_`, e.g. V1.2__add_column.sql)"
        )));
    };
    if let Err(e) = MigrationId::parse(stem) {
        return Some(Err(format!("file name is not a migration id: {e}")));
    }
    Some(Ok(FileName {
        kind,
        version: Version(parts),
        stem: stem.to_string(),
    }))
}

/// Reads a directory's Flyway files into migrations in version order. An undo file
/// (`U1.1__...`) is the down SQL of the versioned migration of the same version; an undo
/// without one, or a version given twice, is an error naming the files.
pub(super) fn read_all(files: Vec<(PathBuf, FileName)>) -> Result<Vec<pb::Migration>, LoadError> {
    #[derive(Default)]
    struct Pair {
        up: Option<(PathBuf, String)>,
        undo: Option<PathBuf>,
    }
    let mut by_version: BTreeMap<Version, Pair> = BTreeMap::new();
    for (path, name) in files {
        let pair = by_version.entry(name.version.clone()).or_default();
        let first = match name.kind {
            Kind::Versioned => pair.up.as_ref().map(|(p, _)| p.clone()),
            Kind::Undo => pair.undo.clone(),
        };
        if let Some(first) = first {
            return Err(LoadError::invalid(
                &path,
                format!(
                    "version {} is given twice: {} and this file",
                    name.version,
                    first.display()
                ),
            ));
        }
        match name.kind {
            Kind::Versioned => pair.up = Some((path, name.stem)),
            Kind::Undo => pair.undo = Some(path),
        }
    }
    let mut migrations = Vec::with_capacity(by_version.len());
    for (version, pair) in by_version {
        let Some((up_path, stem)) = pair.up else {
            let undo = pair.undo.expect("a version has at least one file");
            return Err(LoadError::invalid(
                &undo,
                format!("an undo migration without a versioned migration V{version}__...sql"),
            ));
        };
        let up_sql = read_sql(&up_path)?;
        if statements(&up_path, &up_sql, 1)?.is_empty() {
            return Err(LoadError::invalid(&up_path, "holds no SQL statements"));
        }
        // (the file's lines, as read: the comment's line is the file's)
        let lint_ignore = super::parts::lint_ignores_in(&up_path)?;
        let down_sql = match &pair.undo {
            Some(p) => read_sql(p)?,
            None => String::new(),
        };
        let mut m = Parts {
            id: stem,
            up_sql,
            down_sql,
            verify_sql: String::new(),
            source: up_path.display().to_string(),
        }
        .into_migration();
        m.lint_ignore = lint_ignore;
        if let Some(in_transaction) = script_config(&up_path)? {
            m.tx_mode = if in_transaction {
                pb::TxMode::Transactional
            } else {
                pb::TxMode::NonTransactional
            } as i32;
        }
        migrations.push(m);
    }
    Ok(migrations)
}

/// A file's SQL, trimmed; unterminated quotes and Flyway placeholders are errors.
fn read_sql(path: &Path) -> Result<String, LoadError> {
    let text = read_text(path)?;
    statements(path, &text, 1)?;
    for (i, line) in text.lines().enumerate() {
        if let Some(at) = line.find("${") {
            let end = line[at..].find('}').map_or(line.len(), |e| at + e + 1);
            return Err(LoadError::at_line(
                path,
                i + 1,
                format!(
                    "Flyway placeholder `{}`: Flotilla does not replace placeholders; write \
                     the value",
                    &line[at..end]
                ),
            ));
        }
    }
    Ok(text.trim().to_string())
}

/// `executeInTransaction` from the script configuration file beside `sql_path`
/// (`<file>.sql.conf`), if there is one. Other settings are an error: silently ignoring
/// one would run the migration differently from Flyway.
fn script_config(sql_path: &Path) -> Result<Option<bool>, LoadError> {
    let mut conf = sql_path.as_os_str().to_owned();
    conf.push(".conf");
    let conf = PathBuf::from(conf);
    if !fs::exists(&conf).map_err(|e| LoadError::io(&conf, e))? {
        return Ok(None);
    }
    let text = read_text(&conf)?;
    let mut in_transaction = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let (key, value) = t
            .split_once('=')
            .map_or((t, ""), |(k, v)| (k.trim(), v.trim()));
        match (key, value) {
            ("executeInTransaction", "true") => in_transaction = Some(true),
            ("executeInTransaction", "false") => in_transaction = Some(false),
            ("executeInTransaction", other) => {
                return Err(LoadError::at_line(
                    &conf,
                    i + 1,
                    format!("executeInTransaction is `{other}`: expected true or false"),
                ));
            }
            (other, _) => {
                return Err(LoadError::at_line(
                    &conf,
                    i + 1,
                    format!(
                        "unsupported script setting `{other}`: Flotilla reads only \
                         executeInTransaction"
                    ),
                ));
            }
        }
    }
    Ok(in_transaction)
}
