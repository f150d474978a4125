//! From SQL text to parse trees with their lines.
//!
//! libpg_query parses a whole file at once and gives each statement's byte offset; its
//! errors carry no position, so a file that fails is split again with our own splitter
//! ([`crate::sql::split_statements`], which does not need valid SQL) and each piece
//! parsed alone, to name the line of the statement at fault.

use pg_query::NodeEnum;

use super::{ParseError, StatementInfo, locks};

/// One parsed statement: what [`super::analyze`] reports, and the tree the rules read.
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    pub info: StatementInfo,
    pub node: NodeEnum,
}

pub(crate) fn parse_statements(sql: &str) -> Result<Vec<Parsed>, ParseError> {
    let result =
        pg_query::parse(sql, pg_query::ParserOptions::DEFAULT).map_err(|e| locate_error(sql, e))?;
    let mut out = Vec::with_capacity(result.protobuf.stmts.len());
    let mut lines = Lines::new(sql);
    for raw in &result.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.clone()) else {
            continue;
        };
        // Offsets are bytes; a statement after the first starts right after the previous
        // `;`, so its whitespace and comments are skipped to find its first token.
        let from = usize::try_from(raw.stmt_location)
            .unwrap_or(0)
            .min(sql.len());
        let end = match usize::try_from(raw.stmt_len) {
            Ok(0) | Err(_) => sql.len(),
            Ok(len) => (from + len).min(sql.len()),
        };
        let start = skip_blanks(sql, from, end);
        let text = sql
            .get(start..end)
            .unwrap_or_default()
            .trim_end()
            .to_string();
        let (kind, locks) = locks::describe(&node);
        out.push(Parsed {
            info: StatementInfo {
                line: lines.at(start),
                text,
                kind,
                locks,
            },
            node,
        });
    }
    Ok(out)
}

fn parser_message(err: pg_query::Error) -> String {
    match err {
        pg_query::Error::Parse(message) => message,
        pg_query::Error::Conversion(_) => "the SQL holds a NUL byte".to_string(),
        other => other.to_string(),
    }
}

fn locate_error(sql: &str, err: pg_query::Error) -> ParseError {
    let message = parser_message(err);
    let statements = match crate::sql::split_statements(sql) {
        Ok(statements) => statements,
        Err(crate::sql::SqlError::Unterminated { line, .. }) => {
            return ParseError {
                line: u32::try_from(line).unwrap_or(u32::MAX),
                message,
            };
        }
        Err(crate::sql::SqlError::Nul) => return ParseError { line: 1, message },
    };
    // The splitter's statements are verbatim slices of the file, in order.
    let mut from = 0;
    let mut lines = Lines::new(sql);
    for statement in &statements {
        let Some(offset) = sql[from..].find(statement.as_str()) else {
            break;
        };
        let at = from + offset;
        from = at + statement.len();
        if let Err(e) = pg_query::parse(statement, pg_query::ParserOptions::DEFAULT) {
            return ParseError {
                line: lines.at(skip_blanks(sql, at, from)),
                message: parser_message(e),
            };
        }
    }
    ParseError { line: 1, message }
}

/// 1-based lines of byte offsets asked in increasing order: each newline is counted once,
/// where counting from the start for every statement took a file of 20,000 statements
/// (400 KB) 28 s to lint.
struct Lines<'a> {
    sql: &'a [u8],
    at: usize,
    line: usize,
}

impl<'a> Lines<'a> {
    fn new(sql: &'a str) -> Lines<'a> {
        Lines {
            sql: sql.as_bytes(),
            at: 0,
            line: 1,
        }
    }

    /// The line of offset `at` (from the start again when asked for one before the last).
    fn at(&mut self, at: usize) -> u32 {
        let at = at.min(self.sql.len());
        if at < self.at {
            (self.at, self.line) = (0, 1);
        }
        self.line += self.sql[self.at..at]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        self.at = at;
        u32::try_from(self.line).unwrap_or(u32::MAX)
    }
}

/// The offset of the first token at or after `from` (before `end`): whitespace, `--`
/// comments and (nested) `/* */` comments skipped.
fn skip_blanks(sql: &str, mut from: usize, end: usize) -> usize {
    let bytes = sql.as_bytes();
    while from < end {
        match bytes[from] {
            b if b.is_ascii_whitespace() => from += 1,
            b'-' if bytes.get(from + 1) == Some(&b'-') => {
                while from < end && bytes[from] != b'\n' {
                    from += 1;
                }
            }
            b'/' if bytes.get(from + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while from < end {
                    if bytes[from] == b'/' && bytes.get(from + 1) == Some(&b'*') {
                        depth += 1;
                        from += 2;
                    } else if bytes[from] == b'*' && bytes.get(from + 1) == Some(&b'/') {
                        depth -= 1;
                        from += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        from += 1;
                    }
                }
            }
            _ => break,
        }
    }
    from.min(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_count_each_newline_once_and_start_again_when_asked_back() {
        let sql = "a;\nb;\n\nc;\n";
        let mut lines = Lines::new(sql);
        assert_eq!(lines.at(0), 1);
        assert_eq!(lines.at(3), 2);
        assert_eq!(lines.at(7), 4);
        assert_eq!(lines.at(7), 4);
        assert_eq!(lines.at(1), 1);
        assert_eq!(lines.at(usize::MAX), 5);
    }

    #[test]
    fn statements_far_down_a_long_file_get_their_lines() {
        let sql = "SELECT 1;\n".repeat(5000) + "/* x */\nDROP TABLE t;\n";
        let parsed = parse_statements(&sql).unwrap();
        assert_eq!(parsed.len(), 5001);
        assert_eq!(parsed[4999].info.line, 5000);
        assert_eq!(parsed[5000].info.line, 5002);
        assert!(parsed[5000].info.text.starts_with("DROP TABLE"));
    }
}
