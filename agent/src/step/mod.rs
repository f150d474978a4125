//! A step as the agent holds it: a migration prepared once per plan definition, and where
//! (target, plan, epoch) one run of it happens. Below both `run` (which applies and undoes
//! steps) and `data` (whose batches are steps too), so that neither reaches into the other
//! for these types.
use flotilla_core::sql::SqlError;
use flotilla_core::{Migration, TxMode};

pub(crate) mod checkpoint;
pub(crate) mod sql;

pub(crate) use flotilla_core::sql::quote_ident;

/// Why a step's SQL text cannot be built. The messages name the value, migration or table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BuildError {
    /// `value` is escaped for display (it may hold the NUL that made it fail).
    #[error("{value:?}: {source}")]
    Literal { value: String, source: SqlError },
    #[error("migration `{migration}`: {what} SQL: {source}")]
    Statements {
        migration: String,
        what: &'static str,
        source: SqlError,
    },
    #[error("migration `{0}` is not a data change")]
    NotData(String),
    #[error("migration `{0}` saves no prior image")]
    NoPriorImage(String),
    #[error("table {table} has no column {column} to restore")]
    NoColumn { table: String, column: String },
}

/// `flotilla_core::sql::quote_literal`, naming the value when it cannot be quoted.
/// Safe because the agent's connections run with `standard_conforming_strings = on`.
pub(crate) fn quote_literal(value: &str) -> Result<String, BuildError> {
    flotilla_core::sql::quote_literal(value).map_err(|source| BuildError::Literal {
        value: value.escape_debug().to_string(),
        source,
    })
}

/// A migration made ready to run: statements split and constant literals quoted once per
/// plan definition, not once per step.
#[derive(Debug)]
pub(crate) struct PreparedMigration {
    pub migration: Migration,
    pub up: Vec<String>,
    pub down: Vec<String>,
    pub id_lit: String,
    pub checksum_lit: String,
    pub lock_timeout_ms: u64,
    pub statement_timeout_ms: u64,
}

impl PreparedMigration {
    pub fn new(
        migration: Migration,
        default_lock_timeout_ms: u64,
        default_statement_timeout_ms: u64,
    ) -> Result<PreparedMigration, BuildError> {
        let split = |sql: &str, what: &'static str| {
            flotilla_core::sql::split_statements(sql).map_err(|source| BuildError::Statements {
                migration: migration.id.to_string(),
                what,
                source,
            })
        };
        let up = split(&migration.up_sql, "up")?;
        let down = split(&migration.down_sql, "down")?;
        let ms = |d: Option<std::time::Duration>, default: u64| {
            d.map_or(default, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            })
        };
        Ok(PreparedMigration {
            id_lit: quote_literal(migration.id.as_str())?,
            checksum_lit: quote_literal(&migration.checksum)?,
            lock_timeout_ms: ms(migration.lock_timeout, default_lock_timeout_ms),
            statement_timeout_ms: ms(migration.statement_timeout, default_statement_timeout_ms),
            up,
            down,
            migration,
        })
    }

    pub fn id(&self) -> &str {
        self.migration.id.as_str()
    }

    /// A data change that saves the old values of its columns, restored when it is undone.
    pub fn has_prior_image(&self) -> bool {
        self.migration
            .data
            .as_ref()
            .is_some_and(|d| !d.prior_image.is_empty())
    }

    pub fn is_transactional(&self) -> bool {
        self.migration.tx_mode == TxMode::Transactional
    }
}

/// Where and under which plan and epoch a step runs.
pub(crate) struct StepContext<'a> {
    /// `""` for the shard itself.
    pub tenant: &'a str,
    pub tenant_lit: &'a str,
    pub plan_lit: &'a str,
    pub epoch: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("tenant_1"), "\"tenant_1\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's").unwrap(), "'it''s'");
        assert!(quote_literal("a\0b").is_err());
    }
}

/// Migrations the SQL tests of `step`, `run` and `data` share.
#[cfg(test)]
pub(crate) mod fixtures {
    use flotilla_core::{Migration, pb};

    use super::{PreparedMigration, StepContext, quote_literal};

    /// A step on `tenant` ("" for the shard) of plan `plan` at `epoch`.
    pub fn context(tenant: &'static str, plan: &str, epoch: u64) -> StepContext<'static> {
        let lit = |s: &str| &*Box::leak(quote_literal(s).unwrap().into_boxed_str());
        StepContext {
            tenant,
            tenant_lit: lit(tenant),
            plan_lit: lit(plan),
            epoch,
        }
    }

    /// Prepared as a plan with a 5s lock_timeout and no statement_timeout would.
    fn prepared(m: pb::Migration) -> PreparedMigration {
        PreparedMigration::new(Migration::try_from(m).unwrap(), 5000, 0).unwrap()
    }

    /// A schema step with its up SQL, verify query and a lock_timeout of 1.5s.
    pub fn migration(id: &str, up: &str, verify: &str) -> PreparedMigration {
        prepared(pb::Migration {
            id: id.into(),
            up_sql: up.into(),
            down_sql: "DROP TABLE t".into(),
            verify_sql: verify.into(),
            lock_timeout_ms: 1500,
            ..Default::default()
        })
    }

    /// `m2`: a one-column-key backfill of `app.customers` with a filter.
    pub fn backfill() -> PreparedMigration {
        prepared(pb::Migration {
            id: "m2".into(),
            down_sql: "SELECT 1".into(),
            verify_sql: "SELECT true".into(),
            data: Some(pb::DataChange {
                table: "app.customers".into(),
                key: "id".into(),
                batch_size: 7,
                rows_per_second: 0,
                batch_sql: "UPDATE customers SET n = n + 1 WHERE id > $1 AND id <= $2".into(),
                filter: "n = 0".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// `m3`: a composite-key change of `contacts` that saves the prior image of `phone`.
    pub fn with_prior_image() -> PreparedMigration {
        prepared(pb::Migration {
            id: "m3".into(),
            data: Some(pb::DataChange {
                table: "contacts".into(),
                key: "region, id".into(),
                batch_size: 25,
                batch_sql:
                    "UPDATE contacts SET phone = '+' WHERE (region, id) > $1 AND (region, id) <= $2"
                        .into(),
                filter: "phone !~ '^[+]'".into(),
                prior_image: vec!["phone".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}
