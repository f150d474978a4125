//! The server's shared lock table, for the two-phase preflight (issue 15): how many objects
//! it holds, how many are locked now, and what the plan's named relations take on each
//! target. Every prepared target keeps its locks until COMMIT/ROLLBACK PREPARED, so a unit
//! over many targets of one server can fill the table; the coordinator compares.
use std::collections::HashMap;

use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPool;

use super::TwoPhaseError;
use crate::step::quote_ident;

/// The lock table's size settings and what is held in it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockTable {
    pub max_locks_per_transaction: u32,
    pub max_connections: u32,
    /// Entries held now: pg_locks rows not on the fast path (a backend's weak locks on up
    /// to 16 relations stay in its own slots until it prepares). One row per lock mode, so
    /// an object locked in two modes counts twice: the figure errs high.
    pub held: u64,
}

/// The settings the shared table is sized by (PostgreSQL: max_locks_per_transaction x
/// (max_connections + max_prepared_transactions) objects), and the entries held now.
pub(crate) async fn read_lock_table(
    pool: &PgPool,
    shard: &str,
) -> Result<LockTable, TwoPhaseError> {
    let setting = |name: &'static str| async move {
        let value: String = sqlx::raw_sql(AssertSqlSafe(format!("SHOW {name}")))
            .fetch_one(pool)
            .await
            .and_then(|row| sqlx::Row::try_get::<String, _>(&row, 0))
            .map_err(|source| TwoPhaseError::Setting {
                shard: shard.to_string(),
                setting: name,
                source,
            })?;
        Ok::<u32, TwoPhaseError>(value.trim().parse().unwrap_or(0))
    };
    let max_locks_per_transaction = setting("max_locks_per_transaction").await?;
    let max_connections = setting("max_connections").await?;
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_catalog.pg_locks WHERE NOT fastpath")
            .fetch_one(pool)
            .await
            .map_err(|source| TwoPhaseError::Setting {
                shard: shard.to_string(),
                setting: "pg_locks",
                source,
            })?;
    Ok(LockTable {
        max_locks_per_transaction,
        max_connections,
        held: u64::try_from(held).unwrap_or(0),
    })
}

/// Per target (tenant; "" for the shard itself), the lock table entries the relations,
/// and the agent's own bookkeeping, take: each relation that exists there (resolved as a step resolves it: in the tenant's
/// schema, or the shard's search_path; a schema-qualified name as written), plus its
/// indexes, its TOAST table and index, and the sequences it owns, which a DROP or a
/// rewriting ALTER TABLE locks with it. One statement for every target, reading the catalog
/// only (no lock on the relations themselves).
const NAMED_LOCKS: &str = "WITH t(tenant) AS (SELECT unnest($1::text[])), \
     named AS ( \
       SELECT t.tenant, to_regclass(CASE WHEN t.tenant = '' THEN n \
                                    ELSE pg_catalog.quote_ident(t.tenant) || '.' || n END) AS rel \
         FROM t CROSS JOIN unnest($2::text[]) AS n \
       UNION \
       SELECT t.tenant, to_regclass(q) FROM t CROSS JOIN unnest($3::text[]) AS q) \
     SELECT t.tenant, COALESCE(sum( \
         1 + (SELECT count(*) FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid) \
           + CASE WHEN c.reltoastrelid <> 0 THEN 2 ELSE 0 END \
           + (SELECT count(*) FROM pg_catalog.pg_depend d \
                JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
               WHERE d.classid = 'pg_catalog.pg_class'::regclass \
                 AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid = c.oid) \
       ) FILTER (WHERE c.oid IS NOT NULL), 0)::bigint \
     FROM t LEFT JOIN named ON named.tenant = t.tenant \
     LEFT JOIN pg_catalog.pg_class c ON c.oid = named.rel \
     GROUP BY t.tenant";

/// What every step's transaction locks besides its own SQL: the fence (checked first) and
/// the journal (the step's row), with their indexes. Measured at 2,500 prepared targets of
/// COORD-2025-001: 22 pg_locks rows per target, 16 of them the migration's own.
const BOOKKEEPING: [&str; 2] = ["flotilla.fence", "flotilla.journal"];

pub(crate) async fn named_relation_locks(
    pool: &PgPool,
    tenants: &[String],
    relations: &[String],
) -> Result<HashMap<String, u32>, sqlx::Error> {
    let relations: Vec<String> = relations
        .iter()
        .cloned()
        .chain(BOOKKEEPING.iter().map(|r| r.to_string()))
        .collect();
    // The parser's names: each part already folded, so quoted part by part; an unqualified
    // one is qualified with each tenant's schema in the statement.
    let (qualified, bare): (Vec<&String>, Vec<&String>) =
        relations.iter().partition(|r| r.contains('.'));
    let quote = |r: &String| r.split('.').map(quote_ident).collect::<Vec<_>>().join(".");
    let rows: Vec<(String, i64)> = sqlx::query_as(NAMED_LOCKS)
        .bind(tenants)
        .bind(bare.into_iter().map(quote).collect::<Vec<_>>())
        .bind(qualified.into_iter().map(quote).collect::<Vec<_>>())
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(t, n)| (t, u32::try_from(n).unwrap_or(u32::MAX)))
        .collect())
}
