//! The SQL text of a data change's batches: the page query that finds the next batch's
//! bounds (keyset pagination), the batch itself (checkpoint, prior image, batch SQL in one
//! fenced transaction), and the planner's estimate of what is left.
use std::fmt::Write;

use crate::step::sql::begin_fenced;
use crate::step::{BuildError, PreparedMigration, StepContext, quote_ident, quote_literal};

/// The bounds of one batch, as SQL: the checkpoint's text before (`NULL`: none yet) and after
/// it, and the key's exclusive lower and inclusive upper bounds (`$1`, `$2` of the batch SQL).
pub(crate) struct BatchBounds<'a> {
    pub prev_lit: &'a str,
    pub last_lit: &'a str,
    pub lower_lit: &'a str,
    pub upper_lit: &'a str,
    /// Rows in the batch.
    pub rows: i64,
    /// The batch's number on the target (1 = the first), which keys its prior image.
    pub number: i64,
    /// The next batch's full-page query ([`data_full_page`], after this batch's upper
    /// bound), run last in this batch's transaction so that the next batch needs no round
    /// trip of its own to find its bounds; `None` after the last page.
    pub next_page: Option<&'a str>,
    /// The SQL type (`format_type`) of each key column, in the key's order: a saved key is
    /// read back from its image as that type to find its row again (post images).
    pub key_types: &'a [String],
    /// The up SQL's `extra_float_digits` when it is below 1 (rounding floats), set for the
    /// batch statements alone: the session is exact (`data::EXACT_FLOATS`) for the keys and
    /// images Flotilla reads around them.
    pub up_float_digits: Option<&'a str>,
}

/// One batch of a data change as one query: a short fenced transaction that moves the
/// checkpoint, saves the prior image of the batch's rows (when asked for), runs the batch SQL
/// with `$1`/`$2` bound, finds the next batch's page (when asked), and commits. Checkpoint
/// first: a concurrent copy of the same batch waits on the checkpoint row, then fails instead
/// of running it twice. The next page comes last before the COMMIT, so its row is the last
/// row of the whole query, and a failure of it undoes the batch like any other (a page that
/// failed after a committed batch would leave the caller unsure whether to redo the batch).
/// The session already holds the step's search_path and timeouts.
pub(crate) fn data_batch(
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    b: &BatchBounds<'_>,
) -> Result<String, BuildError> {
    let d = m
        .migration
        .data
        .as_ref()
        .ok_or_else(|| BuildError::NotData(m.id().to_string()))?;
    let mut out = if d.prior_image.is_empty() {
        begin_fenced(cx)
    } else {
        // one snapshot for the image and the change: a row changed by another session in
        // between would otherwise be saved stale (the batch retries a serialization failure)
        begin_fenced(cx).replacen("BEGIN;", "BEGIN ISOLATION LEVEL REPEATABLE READ;", 1)
    };
    // A batch does not wait for its commit to reach disk: a crash of the server can lose
    // only the last batches, each together with its checkpoint (one transaction, and WAL is
    // replayed in order), so the change resumes before them and does them again. The step's
    // journal row commits synchronously after the last batch, which flushes every batch
    // before the step is reported applied. A flush per batch was most of a batch's time.
    out.push_str("SET LOCAL synchronous_commit = off;\n");
    let _ = writeln!(
        out,
        "SELECT flotilla.advance_checkpoint({}, {}, {}, {}, {}, {}, {});",
        cx.tenant_lit, m.id_lit, m.checksum_lit, cx.plan_lit, b.prev_lit, b.last_lit, b.rows
    );
    // the rows the batch works on (the page's rows: its bounds and filter), as they are
    push_image(&mut out, cx, m, b, false);
    if let Some(digits) = b.up_float_digits {
        let _ = writeln!(out, "SET LOCAL extra_float_digits = {digits};");
    }
    for statement in &d.batch {
        let bound = flotilla_core::sql::bind_parameters(statement, &[b.lower_lit, b.upper_lit])
            .map_err(|source| BuildError::Statements {
                migration: m.id().to_string(),
                what: "batch",
                source,
            })?;
        out.push_str(&bound);
        out.push_str("\n;\n");
    }
    if b.up_float_digits.is_some() {
        out.push_str("SET LOCAL extra_float_digits = 3;\n");
    }
    // the same rows as the batch left them
    push_image(&mut out, cx, m, b, true);
    if let Some(page) = b.next_page {
        out.push_str(page);
        out.push_str(";\n");
    }
    out.push_str("COMMIT;\n");
    Ok(out)
}

/// `pg_catalog.jsonb_build_object('c', <prefix>"c", ...)` over the key and prior image
/// columns: a row's image, as a batch saves it and as its undo compares it.
pub(crate) fn image_object(d: &flotilla_core::DataChange, prefix: &str) -> String {
    let pairs: Vec<String> = d
        .columns()
        .iter()
        .map(|c| {
            format!(
                "{}, {prefix}{}",
                quote_literal(c).expect("an identifier"),
                quote_ident(c)
            )
        })
        .collect();
    format!("pg_catalog.jsonb_build_object({})", pairs.join(", "))
}

/// The key of a prior image (not a post image) naming its columns that were SQL NULL: a
/// json or jsonb column's JSON `null` and its SQL NULL are both `null` in the jsonb image,
/// and the restore wrote SQL NULL for both (a NOT NULL column's rollback failed; a
/// nullable one's JSON nulls came back as SQL NULLs). Images saved before it have none,
/// and are restored as they were.
pub(crate) const SQL_NULLS: &str = "flotilla:sql_nulls";

/// A prior image's [`SQL_NULLS`] entry: `'flotilla:sql_nulls', {"c": true, ...}` over the
/// change's prior image columns that are NULL in the row (`{}` when none is).
fn sql_nulls(d: &flotilla_core::DataChange) -> String {
    let pairs: Vec<String> = d
        .prior_image
        .iter()
        .map(|c| {
            format!(
                "{}, CASE WHEN {} IS NULL THEN true END",
                quote_literal(c).expect("an identifier"),
                quote_ident(c)
            )
        })
        .collect();
    format!(
        "'{SQL_NULLS}', pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object({}))",
        pairs.join(", ")
    )
}

/// Saves the image of the batch's rows (a change with a prior image): before its statements
/// (`post` false: the rows the filter takes, to restore) or after them (`post` true: those
/// rows as the batch left them, which its undo compares).
fn push_image(
    out: &mut String,
    cx: &StepContext<'_>,
    m: &PreparedMigration,
    b: &BatchBounds<'_>,
    post: bool,
) {
    let Some(d) = m
        .migration
        .data
        .as_ref()
        .filter(|d| !d.prior_image.is_empty())
    else {
        return;
    };
    if post {
        // After the change, the rows saved before it, as it left them, each found again by
        // its key (read back from its image as the key's type): driven by the saved rows,
        // a unique-key lookup each, whatever the filter (which may no longer take them) or
        // the planner's idea of the tables' sizes. A row the batch deleted has none.
        let on: Vec<String> = d
            .key
            .iter()
            .zip(b.key_types)
            .map(|(c, t)| {
                format!(
                    "t.{} = (q.image ->> {})::{t}",
                    quote_ident(c),
                    quote_literal(c).expect("an identifier")
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "INSERT INTO flotilla.prior_images (target, migration_id, batch, image, post) \
             SELECT q.target, q.migration_id, q.batch, n.image, true FROM flotilla.prior_images q \
             CROSS JOIN LATERAL (SELECT {} AS image FROM {} t WHERE {}) n \
             WHERE q.target = {} AND q.migration_id = {} AND q.batch = {} AND NOT q.post;",
            image_object(d, "t."),
            d.table_sql(),
            on.join(" AND "),
            cx.tenant_lit,
            m.id_lit,
            b.number,
        );
        return;
    }
    let _ = writeln!(
        out,
        "INSERT INTO flotilla.prior_images (target, migration_id, batch, image, post) \
         SELECT {}, {}, {}, {} || pg_catalog.jsonb_build_object({}), false FROM {} \
         WHERE {key} > {} AND {key} <= {}{};",
        cx.tenant_lit,
        m.id_lit,
        b.number,
        image_object(d, ""),
        sql_nulls(d),
        d.table_sql(),
        b.lower_lit,
        b.upper_lit,
        data_filter(d),
        key = d.key_sql(),
    );
}

/// The next page of keys after `lower_lit`: how many rows (at most the batch size) and the
/// last key, as a checkpoint stores it (text; a JSON array of texts for a composite key).
/// Keyset pagination over the key's index; only the last key is turned into text. An empty
/// page is `(0, NULL)`.
pub(crate) fn data_page(m: &PreparedMigration, lower_lit: &str, limit: u32) -> Option<String> {
    let d = m.migration.data.as_ref()?;
    let key = d.key_sql();
    let filter = data_filter(d);
    let table = d.table_sql();
    let cols = flotilla_core::DataChange::column_list(&d.key);
    if d.key.len() == 1 {
        // the page's last key by the page's own order (no max(): uuid has none, and a
        // search_path could make it another type's). The text is named `last`: an output
        // column named `k` would make `ORDER BY k` sort the text ('9' after '10').
        return Some(format!(
            "WITH page AS MATERIALIZED (SELECT {key} AS k FROM {table} WHERE {key} > {lower_lit}{filter} \
             ORDER BY {cols} LIMIT {limit}) \
             SELECT (SELECT count(*) FROM page)::bigint, (SELECT k::text AS last FROM page ORDER BY k DESC LIMIT 1)"
        ));
    }
    let ks: Vec<String> = (1..=d.key.len()).map(|i| format!("k{i}")).collect();
    let select: Vec<String> = d
        .key
        .iter()
        .zip(&ks)
        .map(|(c, k)| format!("{} AS {k}", quote_ident(c)))
        .collect();
    let texts: Vec<String> = ks.iter().map(|k| format!("{k}::text")).collect();
    let order: Vec<String> = ks.iter().map(|k| format!("{k} DESC")).collect();
    // a row with a NULL in its key compares as unknown or, when an earlier column decides,
    // as greater: keep it out of every page, as a one-column key's NULL is
    let not_null: String = d
        .key
        .iter()
        .map(|c| format!(" AND {} IS NOT NULL", quote_ident(c)))
        .collect();
    Some(format!(
        "WITH page AS MATERIALIZED (SELECT {select} FROM {table} WHERE {key} > {lower_lit}{not_null}{filter} \
         ORDER BY {cols} LIMIT {limit}) \
         SELECT (SELECT count(*) FROM page)::bigint, \
         (SELECT pg_catalog.jsonb_build_array({texts})::text AS last FROM page ORDER BY {order} LIMIT 1)",
        select = select.join(", "),
        texts = texts.join(", "),
        order = order.join(", "),
    ))
}

/// The first key after `lower_lit` by the key's order, without the filter: the table and
/// key as the change writes them, which `check` plans apart from the filter.
pub(crate) fn data_page_unfiltered(m: &PreparedMigration, lower_lit: &str) -> Option<String> {
    let d = m.migration.data.as_ref()?;
    let cols = flotilla_core::DataChange::column_list(&d.key);
    Some(format!(
        "SELECT {cols} FROM {} WHERE {} > {lower_lit} ORDER BY {cols} LIMIT 1",
        d.table_sql(),
        d.key_sql()
    ))
}

/// The last key of the next *full* page after `lower_lit` (exactly `limit` keys), as
/// [`data_page`] gives it, or NULL when fewer keys are left: one row, one column. Folded into
/// each batch's transaction to find the next batch's bounds. It reads the keys in order and
/// turns only the page's last into text (no page kept, counted or sorted again, as
/// [`data_page`] does), so it costs the batch about what the hand-written keyset loop's
/// `max(id)` of its page does; the last, short page is then asked for on its own, once.
/// The inner query selects the key columns under their own names, so that `ORDER BY` means
/// the columns whichever way it resolves their names.
pub(crate) fn data_full_page(m: &PreparedMigration, lower_lit: &str, limit: u32) -> Option<String> {
    let d = m.migration.data.as_ref()?;
    let key = d.key_sql();
    let filter = data_filter(d);
    let table = d.table_sql();
    let cols = flotilla_core::DataChange::column_list(&d.key);
    let offset = limit.max(1) - 1;
    let (last, not_null) = if let [one] = d.key.as_slice() {
        (format!("p.{}::text", quote_ident(one)), String::new())
    } else {
        let texts: Vec<String> = d
            .key
            .iter()
            .map(|c| format!("p.{}::text", quote_ident(c)))
            .collect();
        // as in `data_page`: a row with a NULL in its key is in no page
        let not_null: String = d
            .key
            .iter()
            .map(|c| format!(" AND {} IS NOT NULL", quote_ident(c)))
            .collect();
        (
            format!("pg_catalog.jsonb_build_array({})::text", texts.join(", ")),
            not_null,
        )
    };
    Some(format!(
        "SELECT (SELECT {last} FROM (SELECT {cols} FROM {table} WHERE {key} > {lower_lit}{not_null}{filter} \
         ORDER BY {cols} OFFSET {offset} LIMIT 1) AS p) AS last"
    ))
}

/// Whether the table holds a key at or below `floor_lit` (the first batch's exclusive lower
/// bound) or with a NULL in it: such a row would never be in a batch.
pub(crate) fn keys_at_floor(d: &flotilla_core::DataChange, floor_lit: &str) -> String {
    let nulls: String = d
        .key
        .iter()
        .map(|c| format!(" OR {} IS NULL", quote_ident(c)))
        .collect();
    format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE {} <= {floor_lit}{nulls})",
        d.table_sql(),
        d.key_sql()
    )
}

/// ` AND (<filter>)` of a data change, or nothing (a newline ends a trailing comment).
fn data_filter(d: &flotilla_core::DataChange) -> String {
    d.filter
        .as_ref()
        .map(|f| format!(" AND ({f}\n)"))
        .unwrap_or_default()
}

/// The planner's view of the rows still to do after `lower_lit` (EXPLAIN: its first line
/// carries `rows=N`), for the progress's estimated total.
/// Rows the change has left after `lower_lit`, counted, up to `cap` (`cap` itself: at least
/// that many), and whether the table was ever analyzed (`reltuples` is -1 before, PostgreSQL
/// 14 on; 0 with no pages before that), in one query: the count is run only for a table
/// the planner knows nothing of (its guess was ten pages' worth: "8/680 rows" on 20).
pub(crate) fn data_count_unanalyzed(
    m: &PreparedMigration,
    lower_lit: &str,
    cap: u64,
) -> Option<String> {
    let d = m.migration.data.as_ref()?;
    let table = d.table_sql();
    Some(format!(
        "SELECT CASE WHEN (SELECT c.reltuples > 0 OR c.relpages > 0 FROM pg_catalog.pg_class c \
            WHERE c.oid = {}::regclass) THEN NULL \
          ELSE (SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {} > {lower_lit}{} LIMIT {cap}) s) \
          END",
        quote_literal(&table).ok()?,
        d.key_sql(),
        data_filter(d)
    ))
}

/// The table's pages (`pg_relation_size` over the block size): one row, one bigint.
pub(crate) fn data_pages(m: &PreparedMigration) -> Option<String> {
    let d = m.migration.data.as_ref()?;
    Some(format!(
        "SELECT pg_catalog.pg_relation_size({}::regclass) / pg_catalog.current_setting('block_size')::bigint",
        quote_literal(&d.table_sql()).ok()?
    ))
}

/// The table's rows, from a sample of `percent` of its pages (`TABLESAMPLE SYSTEM`, the
/// same pages each time): for a table never analyzed and too large to count, where the
/// planner's range guess is a third of its size from its pages ("24000/35886 rows, ETA 1s"
/// on 200,000), and that size itself was 28% short on a fresh bulk load.
pub(crate) fn data_sampled_rows(m: &PreparedMigration, percent: f64) -> Option<String> {
    let d = m.migration.data.as_ref()?;
    Some(format!(
        "SELECT (count(*) * 100.0 / {percent})::bigint FROM {} TABLESAMPLE SYSTEM ({percent}) REPEATABLE (7)",
        d.table_sql()
    ))
}

pub(crate) fn data_estimate(m: &PreparedMigration, lower_lit: &str) -> Option<String> {
    let d = m.migration.data.as_ref()?;
    Some(format!(
        "EXPLAIN SELECT 1 FROM {} WHERE {} > {lower_lit}{}",
        d.table_sql(),
        d.key_sql(),
        data_filter(d)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::fixtures::{backfill, context, with_prior_image};

    #[test]
    fn data_batch_text() {
        let m = backfill();
        let cx = context("t1", "p9", 4);
        let bounds = BatchBounds {
            prev_lit: "NULL",
            last_lit: "'7'",
            lower_lit: "'-9223372036854775808'",
            upper_lit: "'7'",
            rows: 7,
            number: 1,
            next_page: None,
            key_types: &[],
            up_float_digits: None,
        };
        let sql = data_batch(&cx, &m, &bounds).unwrap();
        let ck = quote_literal(&m.migration.checksum).unwrap();
        assert_eq!(
            sql,
            format!(
                "BEGIN;\nSELECT flotilla.check_fence(4);\nSELECT flotilla.check_tenant_schema('t1');\n\
                 SET LOCAL synchronous_commit = off;\n\
                 SELECT flotilla.advance_checkpoint('t1', 'm2', {ck}, 'p9', NULL, '7', 7);\n\
                 UPDATE customers SET n = n + 1 WHERE id >  '-9223372036854775808'  AND id <=  '7' \n;\n\
                 COMMIT;\n"
            )
        );
        let page = data_full_page(&m, "'7'", 7).unwrap();
        // the next page folded into the batch: last before the COMMIT, inside its transaction
        let folded = data_batch(
            &cx,
            &m,
            &BatchBounds {
                next_page: Some(&page),
                ..bounds
            },
        )
        .unwrap();
        assert_eq!(
            folded,
            sql.replace("COMMIT;\n", &format!("{page};\nCOMMIT;\n"))
        );
        // the full page's last key only: the 7th key after '7'
        assert_eq!(
            page,
            "SELECT (SELECT p.\"id\"::text FROM (SELECT \"id\" FROM \"app\".\"customers\" WHERE \"id\" > '7' \
             AND (n = 0\n) ORDER BY \"id\" OFFSET 6 LIMIT 1) AS p) AS last"
        );
        assert_eq!(
            data_page(&m, "'7'", 7).unwrap(),
            "WITH page AS MATERIALIZED (SELECT \"id\" AS k FROM \"app\".\"customers\" WHERE \"id\" > '7' \
             AND (n = 0\n) ORDER BY \"id\" LIMIT 7) SELECT (SELECT count(*) FROM page)::bigint, \
             (SELECT k::text AS last FROM page ORDER BY k DESC LIMIT 1)"
        );
    }

    #[test]
    fn composite_key_and_prior_image_text() {
        let m = with_prior_image();
        assert!(m.has_prior_image());
        let page = data_page(&m, "ROW('a'::text, '1'::integer)", 25).unwrap();
        assert_eq!(
            page,
            "WITH page AS MATERIALIZED (SELECT \"region\" AS k1, \"id\" AS k2 FROM \"contacts\" \
             WHERE (\"region\", \"id\") > ROW('a'::text, '1'::integer) AND \"region\" IS NOT NULL \
             AND \"id\" IS NOT NULL AND (phone !~ '^[+]'\n) \
             ORDER BY \"region\", \"id\" LIMIT 25) SELECT (SELECT count(*) FROM page)::bigint, \
             (SELECT pg_catalog.jsonb_build_array(k1::text, k2::text)::text AS last FROM page ORDER BY k1 DESC, k2 DESC LIMIT 1)"
        );
        // the same text of the last key, of the 25th key after the bound
        assert_eq!(
            data_full_page(&m, "ROW('a'::text, '1'::integer)", 25).unwrap(),
            "SELECT (SELECT pg_catalog.jsonb_build_array(p.\"region\"::text, p.\"id\"::text)::text \
             FROM (SELECT \"region\", \"id\" FROM \"contacts\" \
             WHERE (\"region\", \"id\") > ROW('a'::text, '1'::integer) AND \"region\" IS NOT NULL \
             AND \"id\" IS NOT NULL AND (phone !~ '^[+]'\n) \
             ORDER BY \"region\", \"id\" OFFSET 24 LIMIT 1) AS p) AS last"
        );
        let cx = context("t1", "p", 2);
        let bounds = BatchBounds {
            prev_lit: "'[\"a\", \"1\"]'",
            last_lit: "'[\"b\", \"9\"]'",
            lower_lit: "ROW('a'::text, '1'::integer)",
            upper_lit: "ROW('b'::text, '9'::integer)",
            rows: 25,
            number: 4,
            next_page: None,
            key_types: &["text".into(), "integer".into()],
            up_float_digits: None,
        };
        let sql = data_batch(&cx, &m, &bounds).unwrap();
        // checkpoint, then the prior image of the batch's rows, then the change
        let cp = sql.find("advance_checkpoint").unwrap();
        let image = sql.find("INSERT INTO flotilla.prior_images").unwrap();
        let change = sql.find("UPDATE contacts").unwrap();
        assert!(cp < image && image < change, "{sql}");
        assert!(
            sql.contains(
                "SELECT 't1', 'm3', 4, pg_catalog.jsonb_build_object('region', \"region\", 'id', \"id\", 'phone', \"phone\") \
                 || pg_catalog.jsonb_build_object('flotilla:sql_nulls', pg_catalog.jsonb_strip_nulls(\
                 pg_catalog.jsonb_build_object('phone', CASE WHEN \"phone\" IS NULL THEN true END))), false \
                 FROM \"contacts\" WHERE (\"region\", \"id\") > ROW('a'::text, '1'::integer) \
                 AND (\"region\", \"id\") <= ROW('b'::text, '9'::integer) AND (phone !~ '^[+]'\n);"
            ),
            "{sql}"
        );
        // after the change: the rows it saved, as it left them, whatever the filter says now
        let post = sql.rfind("INSERT INTO flotilla.prior_images").unwrap();
        assert!(change < post && post < sql.find("COMMIT").unwrap(), "{sql}");
        assert!(
            sql[post..].starts_with(
                "INSERT INTO flotilla.prior_images (target, migration_id, batch, image, post) \
                 SELECT q.target, q.migration_id, q.batch, n.image, true FROM flotilla.prior_images q \
                 CROSS JOIN LATERAL (SELECT pg_catalog.jsonb_build_object('region', t.\"region\", 'id', t.\"id\", 'phone', t.\"phone\") AS image \
                 FROM \"contacts\" t WHERE t.\"region\" = (q.image ->> 'region')::text AND t.\"id\" = (q.image ->> 'id')::integer) n \
                 WHERE q.target = 't1' AND q.migration_id = 'm3' AND q.batch = 4 AND NOT q.post;\n"
            ),
            "{sql}"
        );
    }
}
