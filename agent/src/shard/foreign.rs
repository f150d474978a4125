//! Other tools' history tables on the shard (dbmate's and golang-migrate's
//! `schema_migrations`, Flyway's `flyway_schema_history`), read for `fleet baseline` and
//! for the preflight's warning. Only read: Flotilla never writes another tool's table.
use std::collections::{BTreeMap, BTreeSet};

use flotilla_core::foreign::{FlywayRow, History, Tool};
use flotilla_core::sql::quote_ident;
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;

/// The history tables found in each of `schemas`: per schema, the tools whose table is
/// there. `schema_migrations` is golang-migrate's when it has a `dirty` column, else
/// dbmate's. One catalog read for all schemas.
pub(crate) async fn find_histories(
    conn: &mut PgConnection,
    schemas: &[String],
) -> Result<BTreeMap<String, BTreeSet<Tool>>, sqlx::Error> {
    let rows: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text,
                EXISTS (SELECT 1 FROM pg_attribute a
                         WHERE a.attrelid = c.oid AND a.attname = 'dirty' AND NOT a.attisdropped)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = ANY($1)
            AND c.relname IN ('schema_migrations', 'flyway_schema_history')
            AND c.relkind IN ('r', 'p')",
    )
    .bind(schemas)
    .fetch_all(&mut *conn)
    .await?;
    let mut found: BTreeMap<String, BTreeSet<Tool>> = BTreeMap::new();
    for (schema, table, dirty_column) in rows {
        let tool = match (table.as_str(), dirty_column) {
            ("flyway_schema_history", _) => Tool::Flyway,
            (_, true) => Tool::GolangMigrate,
            (_, false) => Tool::Dbmate,
        };
        found.entry(schema).or_default().insert(tool);
    }
    Ok(found)
}

/// Reads `tool`'s history in `schema` (whose table `find_histories` found there).
pub(crate) async fn read_history(
    conn: &mut PgConnection,
    schema: &str,
    tool: Tool,
) -> Result<History, sqlx::Error> {
    let table = format!("{}.{}", quote_ident(schema), quote_ident(tool.table()));
    Ok(match tool {
        Tool::Dbmate => {
            let versions: Vec<String> =
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT version::text FROM {table}")))
                    .fetch_all(&mut *conn)
                    .await?;
            History::Dbmate(versions.into_iter().map(|v| v.trim().to_string()).collect())
        }
        Tool::GolangMigrate => {
            // One row by golang-migrate's design; the highest wins should there be more,
            // and any dirty one makes it dirty.
            let (version, dirty): (Option<i64>, Option<bool>) = sqlx::query_as(AssertSqlSafe(
                format!("SELECT max(version)::bigint, bool_or(dirty) FROM {table}"),
            ))
            .fetch_one(&mut *conn)
            .await?;
            History::GolangMigrate {
                version: version.and_then(|v| u64::try_from(v).ok()),
                dirty: dirty.unwrap_or(false),
            }
        }
        Tool::Flyway => {
            let rows: Vec<(Option<String>, String, bool)> = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT version::text, type::text, success FROM {table} ORDER BY installed_rank"
            )))
            .fetch_all(&mut *conn)
            .await?;
            History::from_flyway_rows(
                &rows
                    .into_iter()
                    .map(|(version, kind, success)| FlywayRow {
                        version,
                        kind,
                        success,
                    })
                    .collect::<Vec<_>>(),
            )
        }
    })
}
