//! Prior images: the old values of the columns a data change's batches overwrite, saved by
//! each batch (see `data::sql::data_batch`) and written back, newest batch first, when the
//! change is undone.
use std::fmt::Write;

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Row};
use tracing::{info, warn};

use crate::step::sql::begin_fenced;
use crate::step::{BuildError, PreparedMigration, StepContext, quote_ident, quote_literal};

/// Restores the prior image of one batch (`number`) of a data change and deletes it, in one
/// fenced transaction: each saved row's columns are written back where its key still is and
/// the row still holds what the batch left (its post image): a row the application changed
/// since keeps the application's value. A batch saved before post images were (shard
/// schema version 1) has none and is restored as before, unconditionally. The query's one
/// row: (rows restored, rows saved).
/// `types`: the SQL type (`format_type`) of each key and image column, by name, so that the
/// image is read back as exactly those columns (other columns of the table play no part).
fn prior_image_restore(
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    number: i64,
    types: &[(String, String)],
    json: &[String],
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
        // `t` is the catalog's format_type: already valid (and quoted) SQL. A json column
        // is read as jsonb here (a NOT NULL domain over it refused the image's JSON `null`
        // as it read the record); its value is taken below, from the image itself.
        let t = if json.contains(c) {
            "jsonb"
        } else {
            t.as_str()
        };
        columns.push(format!("{} {t}", quote_ident(c)));
    }
    // A json or jsonb column is read from the image itself, SQL NULL where the image says
    // it was (`SQL_NULLS`): `jsonb_to_record` reads JSON `null` as SQL NULL. An image saved
    // before that entry is restored as before.
    let nulls = super::sql::SQL_NULLS;
    let set: Vec<String> = d
        .prior_image
        .iter()
        .map(|c| {
            let q = quote_ident(c);
            // (the CASE is jsonb throughout, as `r` reads the column: the assignment casts
            // it to json, or to a domain over either; a branch cast to json beside one of
            // jsonb did not plan, "CASE/WHEN could not convert type jsonb to json")
            if json.contains(c) {
                let lit = quote_literal(c).expect("an identifier");
                format!(
                    "{q} = CASE WHEN NOT r.\"{nulls}\" ? '{nulls}' THEN r.{q} \
                     WHEN r.\"{nulls}\" -> '{nulls}' ? {lit} THEN NULL \
                     ELSE r.\"{nulls}\" -> {lit} END"
                )
            } else {
                format!("{q} = r.{q}")
            }
        })
        .collect();
    let on: Vec<String> = d
        .key
        .iter()
        .map(|c| format!("t.{q} = r.{q}", q = quote_ident(c)))
        .collect();
    let batch = format!(
        "q.target = {} AND q.migration_id = {} AND q.batch = {number}",
        cx.tenant_lit, m.id_lit
    );
    let mut out = begin_fenced(cx);
    // The post images are compared as the batch built them (jsonb of the same columns), so
    // that any column type compares, json too; hashed once for the batch's rows.
    let _ = writeln!(
        out,
        "WITH r AS (SELECT r.*, q.image AS \"{nulls}\" FROM flotilla.prior_images q, \
         LATERAL pg_catalog.jsonb_to_record(q.image) AS r({columns}) WHERE {batch} AND NOT q.post), \
         u AS (UPDATE {table} AS t SET {set} FROM r WHERE {on} \
         AND (NOT EXISTS (SELECT 1 FROM flotilla.prior_images q WHERE {batch} AND q.post) \
         OR {now} IN (SELECT q.image FROM flotilla.prior_images q WHERE {batch} AND q.post)) RETURNING 1) \
         SELECT (SELECT count(*) FROM u)::bigint AS restored, (SELECT count(*) FROM r)::bigint AS saved;",
        table = d.table_sql(),
        set = set.join(", "),
        columns = columns.join(", "),
        on = on.join(" AND "),
        now = super::sql::image_object(d, "t."),
    );
    let _ = writeln!(
        out,
        "DELETE FROM flotilla.prior_images WHERE target = {} AND migration_id = {} AND batch = {number};",
        cx.tenant_lit, m.id_lit
    );
    out.push_str("COMMIT;\n");
    Ok(out)
}

/// The batches of a data change whose prior images are on the target, newest first (none
/// for a change without prior images).
pub(crate) async fn prior_image_batches(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
) -> Result<Vec<i64>, sqlx::Error> {
    if !m.has_prior_image() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "SELECT DISTINCT batch FROM flotilla.prior_images WHERE target = $1 AND migration_id = $2 \
         ORDER BY batch DESC",
    )
    .bind(cx.tenant)
    .bind(m.id())
    .fetch_all(&mut *conn)
    .await
}

/// Restores a data change's prior image of the batches `numbers` ([`prior_image_batches`])
/// on the target, newest batch first, each batch in its own fenced transaction that also
/// deletes it: a restore cut short goes on from where it stopped. The session holds the
/// target's search_path.
pub(crate) async fn restore_prior_image(
    conn: &mut PgConnection,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    numbers: Vec<i64>,
    shared: Option<super::UndoShared<'_>>,
) -> Result<(), sqlx::Error> {
    let restored = numbers.len();
    if numbers.is_empty() {
        return Ok(());
    }
    let d = m.migration.data.as_ref().expect("a data change");
    let (types, json) = super::keys::column_types(conn, d).await?;
    let (mut rows, mut kept) = (0i64, 0i64);
    // The change's own rate limit holds for its undo: a rollback is run while production is
    // in trouble already, and the restore wrote into the same hot table as fast as it could
    // (twice the limit, seen under pgbench). Each batch's rows are paid after it.
    let server = shared.map(|s| (s.buckets, s.publish.plan_id, m.id()));
    let mut limit = super::rate::RowLimits::new(d, None, server);
    // its progress, as the batches': about a batch's rows a batch
    let mut progress = super::progress::Progress::undoing(
        shared.map(|s| s.publish),
        cx.tenant,
        m.id(),
        numbers.len() as u64 * u64::from(d.first_batch_size()),
    );
    let last = numbers.len() - 1;
    for (i, number) in numbers.into_iter().enumerate() {
        let sql = match prior_image_restore(cx, m, number, &types, &json) {
            Ok(sql) => sql,
            Err(e) => {
                progress.set("failed", "its restore failed", d.first_batch_size());
                // not a lost connection (Protocol would say so): the change's own problem
                return Err(sqlx::Error::InvalidArgument(format!(
                    "restoring the prior image of `{}`: {}",
                    m.id(),
                    e
                )));
            }
        };
        let counts = match sqlx::raw_sql(AssertSqlSafe(sql))
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => rows.iter().find_map(|row| {
                Some((
                    row.try_get::<i64, _>("restored").ok()?,
                    row.try_get::<i64, _>("saved").ok()?,
                ))
            }),
            Err(e) => {
                // the batch's transaction may be open (aborted): end it. If that fails too the
                // connection is gone, which the caller's cleanup finds and reports.
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                progress.set("failed", "its restore failed", d.first_batch_size());
                return Err(e);
            }
        };
        if let Some((put_back, saved)) = counts {
            rows += put_back;
            kept += saved - put_back;
            // counted as each batch commits (its image goes with it): a restore cut short
            // and run again finds those batches no more
            if let Some(s) = shared {
                s.rows_kept.fetch_add(
                    (saved - put_back).max(0) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            progress.batch(saved.max(0) as u64, d.first_batch_size());
            if i < last {
                limit.wait(saved.max(0) as u64).await;
            }
        }
    }
    progress.forget();
    if kept > 0 {
        warn!(
            step = m.id(),
            tenant = cx.tenant,
            restored = rows,
            kept,
            "prior image restored, except {kept} rows changed or deleted since their batch: \
               they keep their newer values"
        );
    } else {
        info!(
            step = m.id(),
            tenant = cx.tenant,
            batches = restored,
            rows,
            "prior image restored"
        );
    }
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
        assert!(prior_image_restore(&cx, &m, 4, &types[..2], &[]).is_err());
        let restore = prior_image_restore(&cx, &m, 4, &types, &[]).unwrap();
        assert!(
            restore.starts_with(
                "BEGIN;\nSELECT flotilla.check_fence(2);\nSELECT flotilla.check_tenant_schema('t1');\nWITH r AS (SELECT r.*, q.image AS \"flotilla:sql_nulls\" FROM flotilla.prior_images q, \
                 LATERAL pg_catalog.jsonb_to_record(q.image) AS r(\"region\" text, \"id\" integer, \"phone\" character varying(20)) \
                 WHERE q.target = 't1' AND q.migration_id = 'm3' AND q.batch = 4 AND NOT q.post), \
                 u AS (UPDATE \"contacts\" AS t SET \"phone\" = r.\"phone\" FROM r \
                 WHERE t.\"region\" = r.\"region\" AND t.\"id\" = r.\"id\" \
                 AND (NOT EXISTS (SELECT 1 FROM flotilla.prior_images q WHERE q.target = 't1' AND q.migration_id = 'm3' AND q.batch = 4 AND q.post) \
                 OR pg_catalog.jsonb_build_object('region', t.\"region\", 'id', t.\"id\", 'phone', t.\"phone\") IN \
                 (SELECT q.image FROM flotilla.prior_images q WHERE q.target = 't1' AND q.migration_id = 'm3' AND q.batch = 4 AND q.post)) RETURNING 1) \
                 SELECT (SELECT count(*) FROM u)::bigint AS restored, (SELECT count(*) FROM r)::bigint AS saved;\n"
            ),
            "{restore}"
        );
        assert!(restore.ends_with("AND batch = 4;\nCOMMIT;\n"), "{restore}");
    }
}
