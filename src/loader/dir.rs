//! A migration directory: native migrations (one subdirectory each) and dbmate files
//! (`<version>_<name>.sql`), possibly mixed, returned sorted by id; or golang-migrate's
//! or Flyway's files, each tool's alone, returned in that tool's version order.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use flotilla_core::pb;

use super::error::LoadError;
use super::{dbmate, flyway, golang_migrate, native};

/// Whose layout a migration in a directory follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Format {
    Native,
    Dbmate,
    GolangMigrate,
    Flyway,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Native => "Flotilla's own (a subdirectory)",
            Format::Dbmate => "dbmate",
            Format::GolangMigrate => "golang-migrate",
            Format::Flyway => "Flyway",
        }
    }
}

/// Reads every migration of `dir`. Dotfiles and files other than `*.sql` (README.md,
/// plan.toml, ...) are ignored; a subdirectory must be a migration.
pub(super) fn read_migrations(dir: &Path) -> Result<Vec<pb::Migration>, LoadError> {
    let mut entries: Vec<(PathBuf, String)> = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| LoadError::io(dir, e))? {
        let entry = entry.map_err(|e| LoadError::io(dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(LoadError::invalid(&path, "file name is not UTF-8"));
        };
        if !name.starts_with('.') {
            entries.push((path, name));
        }
    }
    // Sorted, so that errors and the "mixed formats" message name the same files each run.
    entries.sort();

    let mut natives = Vec::new();
    let mut dbmate_files = Vec::new();
    let mut golang = Vec::new();
    let mut flyway_files = Vec::new();
    // Each format seen, with the first file of it, for the "mixed" error.
    let mut seen: BTreeMap<Format, PathBuf> = BTreeMap::new();
    for (path, name) in entries {
        // Follows symlinks: a linked migration directory is a migration directory.
        let meta = fs::metadata(&path).map_err(|e| LoadError::io(&path, e))?;
        // A plan file under another name (`Plan.toml`, `plan.yaml`, `plan.toml.bak`) was
        // passed over: the plan ran on every target with the defaults it meant to change.
        // (another plan file, `plan.staging.toml`, given by its path, stays allowed)
        let lower = name.to_ascii_lowercase();
        let misnamed = lower.starts_with(super::PLAN_FILE)
            || lower
                .strip_prefix("plan.")
                .is_some_and(|ext| ["yaml", "yml", "json", "tml", "tom"].contains(&ext));
        if !meta.is_dir() && name != super::PLAN_FILE && misnamed {
            return Err(LoadError::invalid(
                &path,
                format!(
                    "unexpected file beside the migrations: a plan's settings are read from {} \
                     only (rename it, or move it out of the directory)",
                    super::PLAN_FILE
                ),
            ));
        }
        let format = if meta.is_dir() {
            natives.push((path.clone(), name));
            Format::Native
        } else if !name.to_ascii_lowercase().ends_with(".sql") {
            continue;
        } else if let Some(parsed) = golang_migrate::parse_name(&name) {
            let parsed = parsed.map_err(|m| LoadError::invalid(&path, m))?;
            golang.push((path.clone(), parsed));
            Format::GolangMigrate
        } else if let Some(parsed) = flyway::parse_name(&name) {
            let parsed = parsed.map_err(|m| LoadError::invalid(&path, m))?;
            flyway_files.push((path.clone(), parsed));
            Format::Flyway
        } else {
            dbmate_files.push((path.clone(), name));
            Format::Dbmate
        };
        seen.entry(format).or_insert(path);
    }
    refuse_mixed(dir, &seen)?;

    let migrations = if !golang.is_empty() {
        golang_migrate::read_all(golang)?
    } else if !flyway_files.is_empty() {
        flyway::read_all(flyway_files)?
    } else {
        let mut migrations = Vec::with_capacity(natives.len() + dbmate_files.len());
        for (path, name) in natives {
            migrations.push(native::read(&path, &name)?);
        }
        for (path, name) in dbmate_files {
            migrations.push(dbmate::read(&path, &name)?);
        }
        migrations.sort_by(|a, b| a.id.cmp(&b.id));
        migrations
    };
    if migrations.is_empty() {
        return Err(LoadError::invalid(
            dir,
            "no migrations found: expected subdirectories holding up.sql, dbmate files \
             (<version>_<name>.sql), golang-migrate files (<version>_<name>.up.sql) or Flyway \
             files (V<version>__<description>.sql)",
        ));
    }
    let mut ids: BTreeMap<&str, &str> = BTreeMap::new();
    for m in &migrations {
        if let Some(first) = ids.insert(&m.id, &m.source) {
            return Err(LoadError::invalid(
                dir,
                format!(
                    "migration `{}` is defined twice: {first} and {}",
                    m.id, m.source
                ),
            ));
        }
    }
    Ok(migrations)
}

/// golang-migrate's and Flyway's files each order by their own version numbers, which
/// do not interleave with ids or with each other: such a directory holds one tool's files
/// only. (Native and dbmate migrations both order by id, so they may share one.)
fn refuse_mixed(dir: &Path, seen: &BTreeMap<Format, PathBuf>) -> Result<(), LoadError> {
    let foreign = [Format::GolangMigrate, Format::Flyway];
    if seen.len() < 2 || !seen.keys().any(|f| foreign.contains(f)) {
        return Ok(());
    }
    let named: Vec<String> = seen
        .iter()
        .map(|(format, path)| {
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            format!("{} ({file})", format.name())
        })
        .collect();
    Err(LoadError::invalid(
        dir,
        format!(
            "mixed migration formats: {}; a directory of golang-migrate or Flyway files holds \
             that tool's files only",
            named.join(", ")
        ),
    ))
}
