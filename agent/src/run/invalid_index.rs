//! A failed `CREATE INDEX CONCURRENTLY` leaves an INVALID index behind: finding and
//! dropping it, so a failed non-transactional step leaves the shard as it was.
use sqlx::postgres::PgConnection;
use tracing::warn;

use super::conn::execute;

/// The index a `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name ON ...` names, if any.
fn concurrent_index_name(statement: &str) -> Option<String> {
    // Words, with a double-quoted identifier (spaces and "" inside) as one word.
    let mut words: Vec<(String, bool)> = Vec::new();
    let mut chars = statement.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut w = String::new();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        w.push('"');
                    } else {
                        break;
                    }
                } else {
                    w.push(c);
                }
            }
            words.push((w, true));
        } else {
            let mut w = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '"' || c == '(' {
                    break;
                }
                w.push(c);
                chars.next();
            }
            if w.is_empty() {
                chars.next();
            } else {
                words.push((w, false));
            }
        }
        if words.len() > 8 {
            break;
        }
    }
    let mut it = words.into_iter();
    let mut seen_concurrently = false;
    for (w, quoted) in it.by_ref() {
        let up = w.to_ascii_uppercase();
        if quoted {
            return seen_concurrently.then_some(w);
        }
        if !seen_concurrently {
            match up.as_str() {
                "CONCURRENTLY" => seen_concurrently = true,
                "CREATE" | "UNIQUE" | "INDEX" => {}
                _ => return None,
            }
            continue;
        }
        match up.as_str() {
            "IF" | "NOT" | "EXISTS" => continue,
            "ON" => return None, // unnamed: PostgreSQL picks the name
            _ => return Some(w.to_ascii_lowercase()),
        }
    }
    None
}

/// Whether `statement` is a CREATE INDEX CONCURRENTLY whose index name is already taken
/// in the step's schemas, asked before it runs: such an index is not the step's (another
/// session may be building it, or an earlier attempt by hand left it INVALID), and a
/// failure of the statement (42P07, or any other) must not drop it. A failed lookup
/// counts as taken: nothing is dropped then.
pub(super) async fn index_name_taken(conn: &mut PgConnection, statement: &str) -> bool {
    let Some(name) = concurrent_index_name(statement) else {
        return false;
    };
    let found: Result<bool, sqlx::Error> = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relname = $1 AND n.nspname = ANY (current_schemas(false)))",
    )
    .bind(&name)
    .fetch_one(&mut *conn)
    .await;
    found.unwrap_or(true)
}

/// The INVALID index (schema, name) a `CREATE INDEX CONCURRENTLY` statement names, in the
/// step's schemas, if there is one.
pub(super) async fn invalid_index(
    conn: &mut PgConnection,
    statement: &str,
) -> Option<(String, String)> {
    let name = concurrent_index_name(statement)?;
    let found: Result<Option<(String, String)>, sqlx::Error> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_index i
           JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE NOT i.indisvalid AND c.relname = $1 AND n.nspname = ANY (current_schemas(false))
          LIMIT 1",
    )
    .bind(&name)
    .fetch_optional(&mut *conn)
    .await;
    found.ok().flatten()
}

/// A failed CREATE INDEX CONCURRENTLY leaves an INVALID index behind (it still
/// costs every write to the table): find it in the step's schemas and drop it, so
/// the shard is as it was and the step can be retried. Only for a name that was free
/// before the statement ran ([`index_name_taken`]). When the drop fails (it waits for the
/// same sessions the build timed out on, under the same lock_timeout): why, naming the
/// index left.
pub(super) async fn drop_invalid_index(
    conn: &mut PgConnection,
    statement: &str,
) -> Result<(), String> {
    let Some((schema, index)) = invalid_index(conn, statement).await else {
        return Ok(());
    };
    let drop = format!(
        "DROP INDEX CONCURRENTLY IF EXISTS {}.{}",
        flotilla_core::sql::quote_ident(&schema),
        flotilla_core::sql::quote_ident(&index)
    );
    match execute(conn, drop).await {
        Ok(()) => {
            warn!(schema = %schema, index = %index, "dropped the INVALID index a failed CREATE INDEX CONCURRENTLY left");
            Ok(())
        }
        Err(e) => {
            warn!(schema = %schema, index = %index, error = %e, "could not drop an INVALID index left by a failed CREATE INDEX CONCURRENTLY");
            Err(format!(
                "the INVALID index {}.{} it left could not be dropped ({e}): drop it \
                 (DROP INDEX CONCURRENTLY) before the step runs again",
                flotilla_core::sql::quote_ident(&schema),
                flotilla_core::sql::quote_ident(&index)
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::concurrent_index_name;

    #[test]
    fn names_of_concurrent_indexes() {
        assert_eq!(
            concurrent_index_name("CREATE INDEX CONCURRENTLY idx_a ON t (a)").as_deref(),
            Some("idx_a")
        );
        assert_eq!(
            concurrent_index_name(
                "create unique index concurrently if not exists \"Idx B\" on t (b)"
            )
            .as_deref(),
            Some("Idx B")
        );
        assert_eq!(
            concurrent_index_name("CREATE INDEX CONCURRENTLY ON t (a)"),
            None
        );
        assert_eq!(concurrent_index_name("DROP INDEX CONCURRENTLY idx_a"), None);
    }
}
