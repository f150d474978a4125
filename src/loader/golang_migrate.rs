//! golang-migrate's migration files, read unchanged: `<version>_<title>.up.sql` and,
//! optionally, `<version>_<title>.down.sql`, where the version is any unsigned number
//! (`1`, `000042`, `20250131160000`) and versions order numerically, as golang-migrate
//! orders them. The migration id is the up file's stem without `.up`
//! (`000042_add_users`); `schema_migrations.version` (42) is what a baseline matches.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flotilla_core::MigrationId;
use flotilla_core::pb;

use super::error::{LoadError, read_text};
use super::parts::{Parts, statements};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

/// A golang-migrate file name, split.
#[derive(Debug)]
pub(super) struct FileName {
    version: u64,
    /// `<version>_<title>`, as written (zero padding kept): the migration id.
    stem: String,
    direction: Direction,
}

/// Whether `name` looks like a golang-migrate file (a number, `_`, and `.up.sql` or
/// `.down.sql`): `None` if not, an error if it does but cannot be one.
pub(super) fn parse_name(name: &str) -> Option<Result<FileName, String>> {
    let (stem, direction) = if let Some(s) = name.strip_suffix(".up.sql") {
        (s, Direction::Up)
    } else if let Some(s) = name.strip_suffix(".down.sql") {
        (s, Direction::Down)
    } else {
        return None;
    };
    let digits = stem.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    if stem.len() > digits && stem.as_bytes()[digits] != b'_' {
        return Some(Err(
            "not a golang-migrate file name: expected <version>_<title>.up.sql or \
             <version>_<title>.down.sql with a numeric version"
                .into(),
        ));
    }
    let version = match stem[..digits].parse::<u64>() {
        Ok(v) => v,
        Err(_) => {
            return Some(Err(format!(
                "version `{}` is larger than golang-migrate's versions (an unsigned 64-bit number)",
                &stem[..digits]
            )));
        }
    };
    if let Err(e) = MigrationId::parse(stem) {
        return Some(Err(format!("file name is not a migration id: {e}")));
    }
    Some(Ok(FileName {
        version,
        stem: stem.to_string(),
        direction,
    }))
}

/// Reads a directory's golang-migrate files (`files`: each path with its parsed name)
/// into migrations in version order. Every version needs an up file; a version given
/// twice (`1_a.up.sql` and `01_b.up.sql`) is an error naming both.
pub(super) fn read_all(files: Vec<(PathBuf, FileName)>) -> Result<Vec<pb::Migration>, LoadError> {
    #[derive(Default)]
    struct Pair {
        up: Option<(PathBuf, String)>,
        down: Option<(PathBuf, String)>,
    }
    let mut by_version: BTreeMap<u64, Pair> = BTreeMap::new();
    for (path, name) in files {
        let pair = by_version.entry(name.version).or_default();
        let slot = match name.direction {
            Direction::Up => &mut pair.up,
            Direction::Down => &mut pair.down,
        };
        if let Some((first, _)) = slot {
            return Err(LoadError::invalid(
                &path,
                format!(
                    "version {} is given twice: {} and this file (golang-migrate keys \
                     migrations by their number)",
                    name.version,
                    first.display()
                ),
            ));
        }
        *slot = Some((path, name.stem));
    }
    let mut migrations = Vec::with_capacity(by_version.len());
    for (version, pair) in by_version {
        let Some((up_path, stem)) = pair.up else {
            let (down_path, _) = pair.down.expect("a version has at least one file");
            return Err(LoadError::invalid(
                &down_path,
                format!("a down file without an up file for version {version}"),
            ));
        };
        let up_sql = read_sql(&up_path)?;
        if statements(&up_path, &up_sql, 1)?.is_empty() {
            return Err(LoadError::invalid(&up_path, "holds no SQL statements"));
        }
        // (the file's lines, as read: the comment's line is the file's)
        let lint_ignore = super::parts::lint_ignores_in(&up_path)?;
        let down_sql = match &pair.down {
            Some((down_path, down_stem)) => {
                if *down_stem != stem {
                    return Err(LoadError::invalid(
                        down_path,
                        format!(
                            "the down file of version {version} is named `{down_stem}`, its up \
                             file `{stem}`: name both alike"
                        ),
                    ));
                }
                read_sql(down_path)?
            }
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
        migrations.push(m);
    }
    Ok(migrations)
}

/// A file's SQL, trimmed, with unterminated quotes and comments found now.
fn read_sql(path: &Path) -> Result<String, LoadError> {
    let text = read_text(path)?;
    statements(path, &text, 1)?;
    Ok(text.trim().to_string())
}
