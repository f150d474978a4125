//! A migration directory: native migrations (one subdirectory each) and dbmate files
//! (`<version>_<name>.sql`), possibly mixed, returned sorted by id.
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use flotilla_core::pb;

use super::error::LoadError;
use super::{dbmate, native};

/// Reads every migration of `dir`. Dotfiles and files other than `*.sql` (README.md,
/// plan.toml, ...) are ignored; a subdirectory must be a migration.
pub(super) fn read_migrations(dir: &Path) -> Result<Vec<pb::Migration>, LoadError> {
    let entries = fs::read_dir(dir).map_err(|e| LoadError::io(dir, e))?;
    let mut migrations = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LoadError::io(dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(LoadError::invalid(&path, "file name is not UTF-8"));
        };
        if name.starts_with('.') {
            continue;
        }
        // Follows symlinks: a linked migration directory is a migration directory.
        let meta = fs::metadata(&path).map_err(|e| LoadError::io(&path, e))?;
        if meta.is_dir() {
            migrations.push(native::read(&path, &name)?);
        } else if name.to_ascii_lowercase().ends_with(".sql") {
            migrations.push(dbmate::read(&path, &name)?);
        }
    }
    if migrations.is_empty() {
        return Err(LoadError::invalid(
            dir,
            "no migrations found: expected subdirectories holding up.sql, \
             or dbmate files named <version>_<name>.sql",
        ));
    }
    migrations.sort_by(|a, b| a.id.cmp(&b.id));
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for m in &migrations {
        if let Some(first) = seen.insert(&m.id, &m.source) {
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
