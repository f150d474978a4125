//! What the migration readers (native and dbmate) share: a migration's parts as read,
//! and the early split of its SQL.
use std::path::Path;

use flotilla_core::pb;
use flotilla_core::sql;

use super::error::LoadError;

/// Splits SQL read from `path` (whose first line is line `first_line` of the file) to
/// find unterminated quotes and comments early, naming the file and line.
pub(super) fn statements(
    path: &Path,
    sql_text: &str,
    first_line: usize,
) -> Result<Vec<String>, LoadError> {
    sql::split_statements(sql_text).map_err(|e| match e {
        sql::SqlError::Unterminated { what, line } => {
            LoadError::at_line(path, first_line + line - 1, format!("unterminated {what}"))
        }
        other => LoadError::invalid(path, other.to_string()),
    })
}

/// A migration's parts as read, before they go on the wire.
pub(super) struct Parts {
    pub id: String,
    pub up_sql: String,
    pub down_sql: String,
    pub verify_sql: String,
    pub source: String,
}

impl Parts {
    /// The wire migration with its checksum; everything else at its default.
    pub fn into_migration(self) -> pb::Migration {
        pb::Migration {
            checksum: flotilla_core::checksum(&self.up_sql),
            id: self.id,
            up_sql: self.up_sql,
            down_sql: self.down_sql,
            verify_sql: self.verify_sql,
            source: self.source,
            ..Default::default()
        }
    }
}

/// dbmate, Flyway and golang-migrate files have no metadata file: a lint rule is turned off
/// by a comment line anywhere in the (up) file, `-- flotilla:lint-ignore <rule> <reason>` (the
/// reason is required).
const LINT_IGNORE: &str = "-- flotilla:lint-ignore";

pub(super) fn lint_ignores(text: &str) -> Result<Vec<pb::LintIgnore>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(rest) = line.trim().strip_prefix(LINT_IGNORE) else {
            continue;
        };
        let rest = rest.trim();
        let (rule, reason) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if let Err(e) = flotilla_core::lint::check_ignorable(rule) {
            return Err((i + 1, format!("`{LINT_IGNORE}`: {e}")));
        }
        if reason.trim().is_empty() {
            return Err((
                i + 1,
                format!(
                    "`{LINT_IGNORE} {rule}` needs a reason after the rule: say why it is safe here"
                ),
            ));
        }
        out.push(pb::LintIgnore {
            rule: rule.to_string(),
            reason: reason.trim().to_string(),
        });
    }
    Ok(out)
}

/// [`lint_ignores`] of the file at `path` (a Flyway or golang-migrate up file), its errors
/// named at their line there.
pub(super) fn lint_ignores_in(path: &Path) -> Result<Vec<pb::LintIgnore>, LoadError> {
    lint_ignores(&std::fs::read_to_string(path).unwrap_or_default())
        .map_err(|(line, msg)| LoadError::at_line(path, line, msg))
}
