//! Which part of a data change's SQL PostgreSQL refuses: the page query over its key, its
//! `filter` (in that page query), or a statement of its batch SQL. Each is planned with
//! `EXPLAIN`, which parses it, resolves its names and types and plans it without running
//! it. The preflight asks this on every target before anything of the plan ran (a typo'd
//! column failed only at the change's first batch, after the plan's earlier migrations had
//! applied everywhere); a failed batch or page asks it to say which part failed.
use flotilla_core::protocol::sqlstate;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnection, PgDatabaseError};

use super::sql;
use crate::error::Failure;
use crate::step::PreparedMigration;

/// A part of a data change's SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The page query over the key alone (the table and key as written).
    Key,
    /// The `filter`, in the page query.
    Filter,
    /// A statement of the batch SQL.
    Batch,
    /// The batch's transaction, where the batch SQL and the next page's query (with the
    /// filter) run together: an error at run time there is either's.
    BatchOrFilter,
}

impl Part {
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Key => "key",
            Part::Filter => "filter",
            Part::Batch => "batch SQL",
            Part::BatchOrFilter => {
                "batch SQL or its filter (the next page's, in the batch's transaction)"
            }
        }
    }
}

/// What PostgreSQL said when it refused a part: its SQLSTATE and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub part: Part,
    pub sqlstate: String,
    pub message: String,
}

impl Refusal {
    /// The name PostgreSQL says does not exist (`column "x" does not exist`, `relation
    /// "app.t" does not exist`, `function f(integer) does not exist`), its last part: an
    /// earlier migration of the plan may create it. None for another error.
    pub fn missing_name(&self) -> Option<String> {
        const UNDEFINED: [&str; 4] = ["42703", "42P01", "42883", sqlstate::UNDEFINED_OBJECT];
        if !UNDEFINED.contains(&self.sqlstate.as_str()) || !self.message.contains("does not exist")
        {
            return None;
        }
        let quoted = self
            .message
            .split_once('"')
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(name, _)| name);
        // unquoted: `column t.x does not exist`, `function f(integer) does not exist`
        let name = quoted.or_else(|| {
            self.message
                .split_whitespace()
                .nth(1)
                .map(|w| w.split('(').next().unwrap_or(w))
        })?;
        let last = name.rsplit('.').next().unwrap_or(name);
        (!last.is_empty()).then(|| last.to_string())
    }
}

/// Where a data change is written: `data migration `ID` (DIR/migration.toml)` (its
/// migration id alone when it came with no source).
pub(crate) fn placed(m: &PreparedMigration) -> String {
    let source = &m.migration.source;
    if source.is_empty() {
        format!("data migration `{}`", m.id())
    } else if source.ends_with(".toml") {
        format!("data migration `{}` ({source})", m.id())
    } else {
        let file = std::path::Path::new(source).join("migration.toml");
        format!("data migration `{}` ({})", m.id(), file.display())
    }
}

/// The first part of `m`'s SQL that PostgreSQL will not plan on the session, whose
/// search_path is the target's: the page query over the key, then with the filter, then
/// each batch statement with `$1`/`$2` bound to `lower_lit`/`upper_lit`. Nothing runs.
/// Outside a transaction each `EXPLAIN` is its own; inside one, the first refusal aborts
/// it (the caller rolls it back). `Err`: the session failed, not the change's SQL.
pub(crate) async fn refused_part(
    conn: &mut PgConnection,
    m: &PreparedMigration,
    lower_lit: &str,
    upper_lit: &str,
) -> Result<Option<Refusal>, sqlx::Error> {
    for (part, statement) in parts(m, lower_lit, upper_lit) {
        let explain = format!("EXPLAIN {statement}");
        match sqlx::raw_sql(AssertSqlSafe(explain))
            .execute(&mut *conn)
            .await
        {
            Ok(_) => {}
            Err(sqlx::Error::Database(db)) if sql_refused(db.code().as_deref()) => {
                let message = match db.try_downcast_ref::<PgDatabaseError>() {
                    Some(pg) => pg.message().to_string(),
                    None => db.message().to_string(),
                };
                return Ok(Some(Refusal {
                    part,
                    sqlstate: db.code().map(|c| c.into_owned()).unwrap_or_default(),
                    message,
                }));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The parts of `m`'s SQL that `EXPLAIN` takes, in the order they are checked, with
/// `$1`/`$2` bound.
fn parts(m: &PreparedMigration, lower_lit: &str, upper_lit: &str) -> Vec<(Part, String)> {
    let Some(d) = m.migration.data.as_ref() else {
        return Vec::new();
    };
    let mut parts = Vec::with_capacity(d.batch.len() + 2);
    if let Some(page) = sql::data_page_unfiltered(m, lower_lit) {
        parts.push((Part::Key, page));
    }
    if d.filter.is_some()
        && let Some(page) = sql::data_page(m, lower_lit, 1)
    {
        parts.push((Part::Filter, page));
    }
    for statement in &d.batch {
        // (the batch's own check refused one that does not bind: it never runs)
        if let Ok(bound) = flotilla_core::sql::bind_parameters(statement, &[lower_lit, upper_lit])
            && explainable(&bound)
        {
            parts.push((Part::Batch, bound));
        }
    }
    parts
}

/// The preflight's check of a data change's SQL on one target (its table and key found
/// there as `shape`): [`refused_part`] with the first batch's bounds, in a read-only
/// transaction (`EXPLAIN` without `ANALYZE` runs nothing; read-only says so to the server
/// too) that is rolled back, with the target's search_path as a step sets it and short
/// timeouts (the plan of an UPDATE takes the table's ROW EXCLUSIVE lock: a preflight does
/// not queue behind a long lock on it). `Err`: it could not be checked (a lock timeout, the
/// session), which the caller logs: the change is then checked by its first batch.
pub(crate) async fn preflight_statements(
    conn: &mut PgConnection,
    m: &PreparedMigration,
    shape: &super::keys::KeyShape,
    tenant: &str,
) -> Result<Option<Refusal>, sqlx::Error> {
    let floor = shape
        .literal(&shape.floor())
        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
    let begin = read_only_begin(Some(tenant));
    // Every part in one round trip (a preflight asks this of each of a shard's thousands
    // of tenants); only a target where one is refused is asked part by part, to name it.
    let mut all = begin.clone();
    for (_, statement) in parts(m, &floor, &floor) {
        all.push_str(&format!("\nEXPLAIN {statement};"));
    }
    all.push_str("\nROLLBACK;");
    if sqlx::raw_sql(AssertSqlSafe(all))
        .execute(&mut *conn)
        .await
        .is_ok()
    {
        return Ok(None);
    }
    refused_read_only(conn, m, (&floor, &floor), Some(tenant)).await
}

/// `BEGIN` of the read-only transaction the parts are planned in: short timeouts, and the
/// tenant's search_path when given (a failed batch's session has the step's already).
fn read_only_begin(tenant: Option<&str>) -> String {
    let mut begin = String::from(
        "BEGIN READ ONLY; SET LOCAL lock_timeout = '2s'; SET LOCAL statement_timeout = '10s';",
    );
    if let Some(tenant) = tenant.filter(|t| !t.is_empty()) {
        begin.push_str(&format!(
            " SET LOCAL search_path TO {};",
            flotilla_core::sql::quote_ident(tenant)
        ));
    }
    begin
}

/// [`refused_part`] part by part in a read-only transaction, rolled back however it ends
/// (its set-up failing too: the session is left outside a transaction). The session's own
/// transaction, if any (aborted by a failure), is rolled back first.
async fn refused_read_only(
    conn: &mut PgConnection,
    m: &PreparedMigration,
    (lower_lit, upper_lit): (&str, &str),
    tenant: Option<&str>,
) -> Result<Option<Refusal>, sqlx::Error> {
    sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await?;
    let refused = match sqlx::raw_sql(AssertSqlSafe(read_only_begin(tenant)))
        .execute(&mut *conn)
        .await
    {
        Ok(_) => refused_part(conn, m, lower_lit, upper_lit).await,
        Err(e) => Err(e),
    };
    let rolled_back = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
    let refused = refused?;
    rolled_back?;
    Ok(refused)
}

/// Whether a statement is one `EXPLAIN` takes (PostgreSQL plans SELECT, INSERT, UPDATE,
/// DELETE, MERGE, VALUES, TABLE and WITH queries; a `CALL` or a `SET` in a batch is not
/// checked ahead).
fn explainable(statement: &str) -> bool {
    let first = statement
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase();
    matches!(
        first.as_str(),
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "VALUES" | "TABLE" | "WITH"
    )
}

/// A refusal of the statement itself (its text, names, types or privileges: class 42, or
/// a data exception while planning, class 22), not of the session (a lock or statement
/// timeout, the server going away), which says nothing of the change's SQL.
fn sql_refused(code: Option<&str>) -> bool {
    code.is_some_and(|c| c.starts_with("42") || c.starts_with("22"))
}

/// A failure of a data change's page query or batch that its SQL may explain (not a
/// conflict, a fence, a moved checkpoint, a lock timeout or the server going away, which
/// have their own handling and words).
pub(crate) fn may_be_the_changes(failure: &Failure) -> bool {
    let code = failure.error.sqlstate.as_str();
    !code.is_empty()
        && !code.starts_with("FL")
        && !failure.is_conflict()
        && !failure.server_gone()
        && !failure.is_lock_timeout()
}

/// Names the part of the change that `failure` came from, and where the change is
/// written: `data migration `ID` (FILE): its filter failed: <PostgreSQL's message>`.
/// `fallback`: the part the failed query ran when no part is refused on its own (an error
/// at run time, not at planning: a batch's is its batch SQL's, a page's its filter's).
pub(crate) async fn name_the_part(
    conn: &mut PgConnection,
    m: &PreparedMigration,
    mut failure: Failure,
    (lower_lit, upper_lit): (&str, &str),
    fallback: Part,
) -> Failure {
    if !may_be_the_changes(&failure) {
        return failure;
    }
    // as the preflight asks it, read-only and rolled back (planning may run a function
    // marked IMMUTABLE: in autocommit, whatever it did stayed, past the fence)
    let part = match refused_read_only(conn, m, (lower_lit, upper_lit), None).await {
        Ok(Some(r)) if r.sqlstate == failure.error.sqlstate => r.part,
        _ => fallback,
    };
    failure.error.message = format!(
        "{}: its {} failed: {}",
        placed(m),
        part.as_str(),
        failure.error.message
    );
    failure
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(sqlstate: &str, message: &str) -> Refusal {
        Refusal {
            part: Part::Filter,
            sqlstate: sqlstate.into(),
            message: message.into(),
        }
    }

    #[test]
    fn the_missing_name_is_read_from_postgresqls_message() {
        assert_eq!(
            refusal("42703", "column \"phone_e16\" does not exist").missing_name(),
            Some("phone_e16".into())
        );
        assert_eq!(
            refusal("42703", "column c.phone does not exist").missing_name(),
            Some("phone".into())
        );
        assert_eq!(
            refusal("42P01", "relation \"app.Orders\" does not exist").missing_name(),
            Some("Orders".into())
        );
        assert_eq!(
            refusal("42883", "function normalise(text) does not exist").missing_name(),
            Some("normalise".into())
        );
        assert_eq!(
            refusal(
                "42804",
                "argument of WHERE must be type boolean, not type integer"
            )
            .missing_name(),
            None
        );
    }

    #[test]
    fn only_plannable_statements_are_explained() {
        assert!(explainable("  update t set x = 1"));
        assert!(explainable("WITH a AS (SELECT 1) SELECT * FROM a"));
        assert!(!explainable("CALL fill($1, $2)"));
        assert!(!explainable("SET LOCAL work_mem = '64MB'"));
    }
}
