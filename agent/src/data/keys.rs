//! The key of a data change as a target's catalog has it: the table exists, the key's
//! columns exist, a unique index covers them (so the key orders the rows uniquely), and
//! each column's type has a floor (the first batch's exclusive lower bound). Used before a
//! change's first batch, and at submit by the preflight, so that a bad key is named before
//! anything changed.
//!
//! A bound is a key value as text per column. A checkpoint stores it as that text for a
//! one-column key, and as a JSON array of the texts for a composite key (as the page query
//! prints it).
use flotilla_core::DataChange;
use flotilla_core::protocol::DataProblemKind;
use sqlx::postgres::PgConnection;

use crate::step::{BuildError, quote_literal};

/// Why a key bound cannot be turned into SQL: it does not fit the key, or a checkpoint's
/// stored text does not parse.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BoundError {
    #[error("a bound of {values} values for a key of {columns} columns")]
    Arity { values: usize, columns: usize },
    #[error("checkpoint key {text:?} is not a JSON array of texts: {source}")]
    NotJson {
        text: String,
        source: serde_json::Error,
    },
    #[error("checkpoint key {text:?} has {values} values for a key of {columns} columns")]
    Count {
        text: String,
        values: usize,
        columns: usize,
    },
    #[error(transparent)]
    Quote(#[from] BuildError),
}

/// The value below every key of a type (exclusive lower bound of the first batch), as SQL
/// text to quote, by `pg_type.typname`.
pub(crate) fn key_floor(typname: &str) -> Option<&'static str> {
    Some(match typname {
        "int2" => "-32768",
        "int4" => "-2147483648",
        "int8" => "-9223372036854775808",
        "numeric" | "float4" | "float8" => "-Infinity",
        "date" | "timestamp" | "timestamptz" => "-infinity",
        "text" | "varchar" | "bpchar" | "name" | "citext" => "",
        "uuid" => "00000000-0000-0000-0000-000000000000",
        _ => return None,
    })
}

/// A data change's key on one target: each column's SQL type (`format_type`) and floor.
#[derive(Debug, Clone)]
pub(crate) struct KeyShape {
    pub types: Vec<String>,
    pub floors: Vec<&'static str>,
}

impl KeyShape {
    /// The exclusive lower bound of the first batch: the floor of every column.
    pub fn floor(&self) -> Vec<String> {
        self.floors.iter().map(|f| f.to_string()).collect()
    }

    /// A bound as SQL: a quoted literal for one column (typed by the comparison it is in),
    /// `ROW('a'::type, '5'::type)` for a composite key (compared column by column, in order).
    pub fn literal(&self, bound: &[String]) -> Result<String, BoundError> {
        if bound.len() != self.types.len() {
            return Err(BoundError::Arity {
                values: bound.len(),
                columns: self.types.len(),
            });
        }
        if let [one] = bound {
            return Ok(quote_literal(one)?);
        }
        let mut parts = Vec::with_capacity(bound.len());
        for (v, t) in bound.iter().zip(&self.types) {
            // `t` is the catalog's format_type: already valid (and quoted) SQL
            parts.push(format!("{}::{t}", quote_literal(v)?));
        }
        Ok(format!("ROW({})", parts.join(", ")))
    }
}

/// A checkpoint's stored bound, for a key of `columns` columns.
pub(crate) fn decode_bound(text: &str, columns: usize) -> Result<Vec<String>, BoundError> {
    if columns == 1 {
        return Ok(vec![text.to_string()]);
    }
    let values: Vec<String> = serde_json::from_str(text).map_err(|source| BoundError::NotJson {
        text: text.to_string(),
        source,
    })?;
    if values.len() != columns {
        return Err(BoundError::Count {
            text: text.to_string(),
            values: values.len(),
            columns,
        });
    }
    Ok(values)
}

/// What is wrong with a data change's table or key on a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyProblem {
    /// The table does not exist (its name, the message): an earlier step of the plan may
    /// still create it.
    NoTable(String, String),
    /// A column of the key (or of the prior image) does not exist (its name, the message).
    NoColumn(String, String),
    /// No unique index covers the key, or a key type without a floor (the table's name,
    /// the message): an earlier step may still create the index or change the type.
    Shape(String, String),
}

impl KeyProblem {
    pub fn message(&self) -> &str {
        match self {
            KeyProblem::NoTable(_, m) | KeyProblem::NoColumn(_, m) | KeyProblem::Shape(_, m) => m,
        }
    }

    /// As the preflight reports it.
    pub fn to_pb(&self, migration_id: &str, tenant: &str) -> flotilla_core::pb::DataProblem {
        let (kind, name) = match self {
            KeyProblem::NoTable(n, _) => (DataProblemKind::NoTable, n.as_str()),
            KeyProblem::NoColumn(n, _) => (DataProblemKind::NoColumn, n.as_str()),
            KeyProblem::Shape(n, _) => (DataProblemKind::Shape, n.as_str()),
        };
        flotilla_core::pb::DataProblem {
            migration_id: migration_id.to_string(),
            tenant: tenant.to_string(),
            kind: kind.as_str().to_string(),
            message: self.message().to_string(),
            name: name.to_string(),
        }
    }
}

/// Name, `pg_type.typname`, SQL type (`format_type`), number, and whether it is json or
/// jsonb (or a domain over one: 114 and 3802 are their fixed OIDs), of those of `columns`
/// that the table `rel` has.
async fn columns_of(
    conn: &mut PgConnection,
    rel: sqlx::postgres::types::Oid,
    columns: &[String],
) -> Result<Vec<(String, String, String, i16, bool)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.attname::text, t.typname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnum, \
           (a.atttypid IN (114, 3802) OR t.typbasetype IN (114, 3802)) \
         FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
         WHERE a.attrelid = $1 AND a.attname = ANY($2) AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(rel)
    .bind(columns)
    .fetch_all(&mut *conn)
    .await
}

/// The SQL types (`format_type`) of a data change's key and prior-image columns, by name, on
/// the table as the session's search_path finds it (none when it does not exist), and its
/// prior-image columns of type json or jsonb, or a domain over one (JSON `null` and SQL NULL
/// are both `null` in an image, told apart on restore: see `prior_image`).
pub(crate) async fn column_types(
    conn: &mut PgConnection,
    d: &DataChange,
) -> Result<(Vec<(String, String)>, Vec<String>), sqlx::Error> {
    let rel: Option<sqlx::postgres::types::Oid> =
        sqlx::query_scalar("SELECT pg_catalog.to_regclass($1)::oid")
            .bind(d.table_sql())
            .fetch_one(&mut *conn)
            .await?;
    let Some(rel) = rel else {
        return Ok((Vec::new(), Vec::new()));
    };
    let columns = columns_of(conn, rel, &d.columns()).await?;
    let json = columns
        .iter()
        .filter(|(name, .., json)| *json && d.prior_image.contains(name))
        .map(|(name, ..)| name.clone())
        .collect();
    let types = columns
        .into_iter()
        .map(|(name, _, format, ..)| (name, format))
        .collect();
    Ok((types, json))
}

/// Reads the key's shape on the target, or what is wrong with it. `schema`: the target's
/// schema when the connection's search_path is not set to it (the preflight); an explicit
/// `schema.table` in the change wins.
pub(crate) async fn inspect(
    conn: &mut PgConnection,
    d: &DataChange,
    schema: Option<&str>,
) -> Result<Result<KeyShape, KeyProblem>, sqlx::Error> {
    let mut name = d.table.clone();
    if name.len() == 1
        && let Some(s) = schema.filter(|s| !s.is_empty())
    {
        name.insert(0, s.to_string());
    }
    let regclass = name
        .iter()
        .map(|p| flotilla_core::sql::quote_ident(p))
        .collect::<Vec<_>>()
        .join(".");
    let table = d.table_sql();
    let rel: Option<sqlx::postgres::types::Oid> =
        sqlx::query_scalar("SELECT pg_catalog.to_regclass($1)::oid")
            .bind(&regclass)
            .fetch_one(&mut *conn)
            .await?;
    let Some(rel) = rel else {
        return Ok(Err(KeyProblem::NoTable(
            d.table.last().cloned().unwrap_or_default(),
            format!("table {regclass} does not exist"),
        )));
    };
    let wanted = d.columns();
    let columns = columns_of(conn, rel, &wanted).await?;
    let find = |c: &str| columns.iter().find(|(n, ..)| n == c);
    for c in &wanted {
        if find(c).is_none() {
            return Ok(Err(KeyProblem::NoColumn(
                c.clone(),
                format!("table {table} has no column {c}"),
            )));
        }
    }
    let key_attnums: Vec<i16> = d.key.iter().map(|c| find(c).expect("checked").3).collect();
    // Unique if a unique index (valid: a failed concurrent build leaves an INVALID one over
    // duplicates; not partial; on columns only) has all its key columns among the key's:
    // the key's values then identify one row.
    let unique: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = $1 AND i.indisunique \
           AND i.indisvalid \
           AND i.indpred IS NULL AND i.indnkeyatts <= pg_catalog.cardinality($2::int2[]) \
           AND (SELECT pg_catalog.bool_and(i.indkey[g] = ANY($2::int2[])) \
                FROM pg_catalog.generate_series(0, i.indnkeyatts - 1) g))",
    )
    .bind(rel)
    .bind(&key_attnums)
    .fetch_one(&mut *conn)
    .await?;
    let key_text = d.key_text();
    if !unique {
        return Ok(Err(KeyProblem::Shape(
            d.table.last().cloned().unwrap_or_default(),
            format!(
                "key {key_text} of {table} is not unique (no unique index on {}): batches need a key \
             that orders the rows uniquely",
                if d.key.len() == 1 {
                    "it alone".to_string()
                } else {
                    "some or all of its columns".to_string()
                }
            ),
        )));
    }
    let mut types = Vec::with_capacity(d.key.len());
    let mut floors = Vec::with_capacity(d.key.len());
    for c in &d.key {
        let (_, typname, format, ..) = find(c).expect("checked");
        let floor = key_floor(typname).ok_or_else(|| {
            KeyProblem::Shape(
                d.table.last().cloned().unwrap_or_default(),
                format!(
                    "key column {c} of {table} has type {format}, which cannot order batches yet \
                     (use integers, numerics, text, dates, timestamps or uuids)"
                ),
            )
        });
        match floor {
            Ok(f) => floors.push(f),
            Err(p) => return Ok(Err(p)),
        }
        types.push(format.clone());
    }
    Ok(Ok(KeyShape { types, floors }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors() {
        assert_eq!(key_floor("int8"), Some("-9223372036854775808"));
        assert_eq!(key_floor("text"), Some(""));
        assert_eq!(key_floor("timestamptz"), Some("-infinity"));
        assert_eq!(key_floor("jsonb"), None);
    }

    #[test]
    fn bounds_round_trip_and_quote() {
        let one = KeyShape {
            types: vec!["bigint".into()],
            floors: vec!["-9223372036854775808"],
        };
        assert_eq!(one.literal(&["7".into()]).unwrap(), "'7'");
        assert_eq!(decode_bound("7", 1).unwrap(), vec!["7".to_string()]);
        let two = KeyShape {
            types: vec!["text".into(), "bigint".into()],
            floors: vec!["", "-9223372036854775808"],
        };
        let b = vec!["it's".to_string(), "5".to_string()];
        assert_eq!(two.literal(&b).unwrap(), "ROW('it''s'::text, '5'::bigint)");
        // as jsonb prints it
        assert_eq!(decode_bound(r#"["it's", "5"]"#, 2).unwrap(), b);
        assert!(decode_bound("7", 2).is_err());
        assert!(decode_bound("[\"a\"]", 2).is_err());
        assert!(two.literal(&["a".into()]).is_err());
        assert_eq!(
            two.literal(&two.floor()).unwrap(),
            "ROW(''::text, '-9223372036854775808'::bigint)"
        );
    }
}
