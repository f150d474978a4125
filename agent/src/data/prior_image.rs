//! Prior images: the old values of the columns a data change's batches overwrite, saved by
//! each batch (see `data::sql::data_batch`) and written back, newest batch first, when the
//! change is undone.
use std::fmt::Write;

use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;
use tracing::info;

use crate::step::sql::begin_fenced;
use crate::step::{BuildError, PreparedMigration, StepContext, quote_ident};

/// Restores the prior image of one batch (`number`) of a data change and deletes it, in one
/// fenced transaction: each saved row's columns are written back where its key still is.
/// `types`: the SQL type (`format_type`) of each key and image column, by name, so that the
/// image is read back as exactly those columns (other columns of the table play no part).
fn prior_image_restore(
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    number: i64,
    types: &[(String, String)],
) -> Result<String, BuildError> {
    let d = m
        .migration
        .data
        .as_ref()
        .filter(|d| !d.prior_image.is_empty())
        .ok_or_else(|| BuildError::NoPriorImage(m.id().to_string()))?;
    let mut columns = Vec::new();
    for c in &d.columns() {
        let (_, t) = types
            .iter()
            .find(|(n, _)| n == c)
            .ok_or_else(|| BuildError::NoColumn {
                table: d.table_sql(),
                column: c.clone(),
            })?;
        // `t` is the catalog's format_type: already valid (and quoted) SQL
        columns.push(format!("{} {t}", quote_ident(c)));
    }
    let set: Vec<String> = d
        .prior_image
        .iter()
        .map(|c| format!("{q} = r.{q}", q = quote_ident(c)))
        .collect();
    let on: Vec<String> = d
        .key
        .iter()
        .map(|c| format!("t.{q} = r.{q}", q = quote_ident(c)))
        .collect();
    let mut out = begin_fenced(cx.epoch);
    let _ = writeln!(
        out,
        "UPDATE {table} AS t SET {set} FROM (SELECT r.* FROM flotilla.prior_images p, \
         LATERAL pg_catalog.jsonb_to_record(p.image) AS r({columns}) \
         WHERE p.target = {} AND p.migration_id = {} AND p.batch = {number}) AS r WHERE {on};",
        cx.tenant_lit,
        m.id_lit,
        table = d.table_sql(),
        set = set.join(", "),
        columns = columns.join(", "),
        on = on.join(" AND "),
    );
    let _ = writeln!(
        out,
        "DELETE FROM flotilla.prior_images WHERE target = {} AND migration_id = {} AND batch = {number};",
        cx.tenant_lit, m.id_lit
    );
    out.push_str("COMMIT;\n");
    Ok(out)
}

/// Restores a data change's prior image on the target, newest batch first, each batch in its
/// own fenced transaction that also deletes it: a restore cut short goes on from where it
/// stopped. The session holds the target's search_path.
pub(crate) async fn restore_prior_image(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
) -> Result<(), sqlx::Error> {
    if !m.has_prior_image() {
        return Ok(());
    }
    let numbers: Vec<i64> = sqlx::query_scalar(
        "SELECT DISTINCT batch FROM flotilla.prior_images WHERE target = $1 AND migration_id = $2 \
         ORDER BY batch DESC",
    )
    .bind(cx.tenant)
    .bind(m.id())
    .fetch_all(&mut *conn)
    .await?;
    let restored = numbers.len();
    if numbers.is_empty() {
        return Ok(());
    }
    let d = m.migration.data.as_ref().expect("a data change");
    let types = super::keys::column_types(conn, d).await?;
    for number in numbers {
        let sql = prior_image_restore(cx, m, number, &types).map_err(|e| {
            sqlx::Error::Protocol(format!("restoring the prior image of `{}`: {e}", m.id()))
        })?;
        if let Err(e) = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn).await {
            // the batch's transaction may be open (aborted): end it. If that fails too the
            // connection is gone, which the caller's cleanup finds and reports.
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            return Err(e);
        }
    }
    info!(step = m.id(), batches = restored, "prior image restored");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::fixtures::{context, with_prior_image};

    #[test]
    fn restore_text() {
        let m = with_prior_image();
        let cx = context("t1", "p", 2);
        let types = [
            ("region".to_string(), "text".to_string()),
            ("id".to_string(), "integer".to_string()),
            ("phone".to_string(), "character varying(20)".to_string()),
        ];
        assert!(prior_image_restore(&cx, &m, 4, &types[..2]).is_err());
        let restore = prior_image_restore(&cx, &m, 4, &types).unwrap();
        assert!(restore.starts_with("BEGIN;\nSELECT flotilla.check_fence(2);\nUPDATE \"contacts\" AS t SET \"phone\" = r.\"phone\""), "{restore}");
        assert!(
            restore.contains(
                "jsonb_to_record(p.image) AS r(\"region\" text, \"id\" integer, \"phone\" character varying(20))"
            ),
            "{restore}"
        );
        assert!(
            restore.contains("WHERE t.\"region\" = r.\"region\" AND t.\"id\" = r.\"id\";"),
            "{restore}"
        );
        assert!(restore.ends_with("AND batch = 4;\nCOMMIT;\n"), "{restore}");
    }
}
