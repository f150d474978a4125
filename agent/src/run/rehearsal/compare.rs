//! What a rehearsal compares: the `[test]` query's rows and the schema before up and after
//! down, and the SQL it runs in a target's search_path.
use std::collections::BTreeSet;

use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{AssertSqlSafe, Connection};

use crate::step::quote_ident;

/// SQL run in one transaction with the target's search_path (none for "").
pub(super) async fn in_target(pool: &PgPool, target: &str, sql: &str) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    if !target.is_empty() {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "SET LOCAL search_path TO {}",
            quote_ident(target)
        )))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// The query's rows, each value as text (NULL as None), in the query's column order.
pub(super) async fn test_rows(
    pool: &PgPool,
    target: &str,
    query: &str,
) -> Result<Vec<Vec<Option<String>>>, sqlx::Error> {
    let query = query.trim().trim_end_matches(';');
    let mut conn: sqlx::pool::PoolConnection<sqlx::Postgres> = pool.acquire().await?;
    let conn: &mut PgConnection = &mut conn;
    let mut tx = conn.begin().await?;
    if !target.is_empty() {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "SET LOCAL search_path TO {}",
            quote_ident(target)
        )))
        .execute(&mut *tx)
        .await?;
    }
    // The simple query protocol answers in text: each value as PostgreSQL prints it (`t`
    // for true, `2024-01-01 00:00:00` for a timestamp), where a JSON rendering of the row
    // said `true` and `2024-01-01T00:00:00`.
    let found = sqlx::raw_sql(AssertSqlSafe(query.to_string()))
        .fetch_all(&mut *tx)
        .await?;
    let mut rows = Vec::with_capacity(found.len());
    for row in &found {
        let mut values = Vec::with_capacity(sqlx::Row::len(row));
        for i in 0..sqlx::Row::len(row) {
            let raw = sqlx::Row::try_get_raw(row, i)?;
            if sqlx::ValueRef::is_null(&raw) {
                values.push(None);
            } else {
                let text = raw.as_str().map_err(sqlx::Error::Decode)?;
                values.push(Some(text.to_string()));
            }
        }
        rows.push(values);
    }
    tx.rollback().await?;
    Ok(rows)
}

pub(super) fn show_rows(rows: &[Vec<Option<String>>]) -> String {
    let rows: Vec<String> = rows
        .iter()
        .map(|r| {
            let vals: Vec<String> = r
                .iter()
                .map(|v| v.as_deref().map_or("NULL".into(), |s| format!("{s:?}")))
                .collect();
            format!("({})", vals.join(", "))
        })
        .collect();
    if rows.is_empty() {
        "no rows".into()
    } else {
        format!("[{}]", rows.join(", "))
    }
}

pub(super) fn sqlstate(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(" (SQLSTATE {s})")
    }
}

/// What differs between the schema before up and after down, item by item.
pub(super) fn schema_difference(before: &[String], after: &[String]) -> String {
    let b: BTreeSet<&String> = before.iter().collect();
    let a: BTreeSet<&String> = after.iter().collect();
    let left: Vec<&str> = a.difference(&b).map(|s| s.as_str()).collect();
    let lost: Vec<&str> = b.difference(&a).map(|s| s.as_str()).collect();
    let mut parts = Vec::new();
    if !left.is_empty() {
        parts.push(format!("left behind by down: {}", left.join("; ")));
    }
    if !lost.is_empty() {
        parts.push(format!("gone after down: {}", lost.join("; ")));
    }
    format!(
        "down.sql does not undo up.sql: the schema after down differs from before up ({})",
        parts.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_difference_names_each_item() {
        let before = vec!["table t".to_string(), "column t.a integer".to_string()];
        let after = vec![
            "table t".to_string(),
            "column t.a integer".to_string(),
            "column t.b text".to_string(),
        ];
        let d = schema_difference(&before, &after);
        assert!(d.contains("left behind by down: column t.b text"), "{d}");
        assert!(!d.contains("gone"), "{d}");
        let d = schema_difference(&after, &before);
        assert!(d.contains("gone after down: column t.b text"), "{d}");
    }

    #[test]
    fn rows_show_nulls_and_texts() {
        let rows = vec![vec![Some("1".to_string()), None]];
        assert_eq!(show_rows(&rows), "[(\"1\", NULL)]");
        assert_eq!(show_rows(&[]), "no rows");
    }
}
