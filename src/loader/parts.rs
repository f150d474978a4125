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
