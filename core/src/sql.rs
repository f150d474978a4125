//! Just enough SQL lexing to split a migration into statements and to classify
//! them: which cannot run inside a transaction, and which control transactions.
//! It understands quotes, dollar quotes, comments and escape strings; it is not a parser.
//!
//! Splitting follows psql: a `;` ends a statement unless it sits inside a string,
//! quoted identifier, dollar quote or comment, inside parentheses (rule actions), or inside
//! the `BEGIN ... END` of a SQL-standard function body (`CREATE FUNCTION ... BEGIN ATOMIC`).

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SqlError {
    #[error("unterminated {what} starting at line {line}")]
    Unterminated { what: &'static str, line: usize },
    #[error("string holds a NUL byte")]
    Nul,
}

/// Splits SQL text into statements (without the trailing `;`, trimmed, empty ones dropped).
///
/// A statement made only of comments is empty. Comments before a statement stay with it;
/// comments after its last token are dropped, so a statement never ends inside a `--`
/// comment and can be embedded in other SQL safely.
pub fn split_statements(sql: &str) -> Result<Vec<String>, SqlError> {
    let mut out = Vec::new();
    let mut start = 0;
    // End of the current statement's last token that is not a comment; None: nothing yet.
    let mut content_end: Option<usize> = None;
    let mut parens = 0usize;
    let mut body = BodyTracker::default();
    for token in Lexer::new(sql) {
        let token = token?;
        match token.kind {
            Kind::Whitespace | Kind::Comment => continue,
            Kind::Semicolon if parens == 0 && body.depth == 0 => {
                if let Some(end) = content_end {
                    out.push(sql[start..end].trim().to_string());
                }
                start = token.end;
                content_end = None;
                body = BodyTracker::default();
                continue;
            }
            Kind::Open => parens += 1,
            Kind::Close => parens = parens.saturating_sub(1),
            Kind::Word => body.word(token.text(sql), parens == 0),
            _ => {}
        }
        content_end = Some(token.end);
    }
    if let Some(end) = content_end {
        out.push(sql[start..end].trim().to_string());
    }
    Ok(out)
}

/// The first statement that PostgreSQL refuses to run inside a transaction block
/// (CREATE INDEX CONCURRENTLY, ...), if any.
pub fn first_non_transactional(statements: &[String]) -> Option<&str> {
    statements
        .iter()
        .map(String::as_str)
        .find(|s| is_non_transactional(&keywords(s)))
}

/// Whether a statement adds a value to an enum type (`ALTER TYPE ... ADD VALUE`): the new
/// value cannot be used before the transaction that added it commits (SQLSTATE 55P04,
/// "unsafe use of new value"), so no later step may share that transaction.
pub fn adds_enum_value(statements: &[String]) -> bool {
    statements.iter().any(|s| {
        let keys = keywords(s);
        matches!(
            (word(keys.first()), word(keys.get(1))),
            (Some("ALTER"), Some("TYPE"))
        ) && keys
            .windows(2)
            .any(|w| word(w.first()) == Some("ADD") && word(w.get(1)) == Some("VALUE"))
    })
}

/// The first statement that would begin, end or split a transaction (BEGIN, COMMIT, ...).
/// Savepoints (SAVEPOINT, RELEASE, ROLLBACK TO) stay inside the transaction and are allowed.
pub fn first_transaction_control(statements: &[String]) -> Option<&str> {
    statements
        .iter()
        .map(String::as_str)
        .find(|s| is_transaction_control(&keywords(s)))
}

/// Whether the statement sets or resets a session setting (`SET`, `SET ROLE`, `SET SESSION
/// AUTHORIZATION`, `RESET`): its effect lives in the session that ran it, not in the
/// database, so a step that goes on in another session must run it again.
pub fn is_session_setting(statement: &str) -> bool {
    matches!(word(keywords(statement).first()), Some("SET" | "RESET"))
}

/// Whether a session setting changes who the session acts as (`SET ROLE`, `SET SESSION
/// AUTHORIZATION`, their `RESET`s; `RESET ALL` does not touch either).
pub fn changes_role(statement: &str) -> bool {
    let keys = keywords(statement);
    let w = |i: usize| word(keys.get(i));
    let rest = match (w(0), w(1)) {
        (Some("SET"), Some("SESSION" | "LOCAL")) if w(2) != Some("AUTHORIZATION") => 2,
        (Some("SET" | "RESET"), _) => 1,
        _ => return false,
    };
    matches!(
        (w(rest), w(rest + 1)),
        (Some("ROLE"), _) | (Some("SESSION"), Some("AUTHORIZATION"))
    )
}

/// Whether a statement run on its own may have committed part of its work when it fails:
/// a procedure call or DO block (which may COMMIT inside), a concurrent index build (which
/// leaves an INVALID index when it fails late), a REINDEX outside a transaction (it commits
/// index by index), a concurrent DETACH PARTITION (left pending). Any other statement on
/// its own is one transaction: a lock timeout leaves nothing of it done.
pub fn may_commit_part_way(statement: &str) -> bool {
    if is_concurrent_index_build(statement) {
        return true;
    }
    let keys = keywords(statement);
    let w = |i: usize| word(keys.get(i));
    match (w(0), w(1), w(2)) {
        (Some("CALL" | "DO"), ..) => true,
        (Some("REINDEX"), ..) | (Some("ALTER"), Some("TABLE"), _) => is_non_transactional(&keys),
        _ => false,
    }
}

/// Whether a statement is a concurrent index build (`CREATE [UNIQUE] INDEX CONCURRENTLY`):
/// of those [`may_commit_part_way`] names, the one whose only leftover on failure is an
/// INVALID index, which the agent drops.
fn is_concurrent_index_build(statement: &str) -> bool {
    let keys = keywords(statement);
    let w = |i: usize| word(keys.get(i));
    match (w(0), w(1), w(2)) {
        (Some("CREATE"), Some("INDEX"), Some("CONCURRENTLY")) => true,
        (Some("CREATE"), Some("UNIQUE"), Some("INDEX")) => w(3) == Some("CONCURRENTLY"),
        _ => false,
    }
}

/// Whether a statement is `DROP INDEX CONCURRENTLY`: it commits the index INVALID before it
/// waits for the sessions using it, so a failure there (a lock timeout) leaves it so.
pub fn is_concurrent_index_drop(statement: &str) -> bool {
    let keys = keywords(statement);
    let w = |i: usize| word(keys.get(i));
    (w(0), w(1), w(2)) == (Some("DROP"), Some("INDEX"), Some("CONCURRENTLY"))
}

/// Quotes an identifier (a schema, table or role name): always double-quoted, `"` doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal that reads the same whatever `standard_conforming_strings` is
/// (a migration may `SET` it off in the session its batches run in, and a key's text comes
/// from the application's rows): single quotes with `'` doubled, and a string holding a
/// backslash as an escape string (`E'...'`, backslashes doubled). Otherwise, with the
/// setting off, a key ending in a backslash would end the literal early, and what followed
/// it in the key would be read as SQL. PostgreSQL text cannot hold NUL, so a NUL is refused
/// rather than truncated.
pub fn quote_literal(s: &str) -> Result<String, SqlError> {
    if s.contains('\0') {
        return Err(SqlError::Nul);
    }
    if s.contains('\\') {
        return Ok(format!(
            "E'{}'",
            s.replace('\\', "\\\\").replace('\'', "''")
        ));
    }
    Ok(format!("'{}'", s.replace('\'', "''")))
}

/// Whether the parentheses of SQL text (outside strings, quoted identifiers, dollar quotes
/// and comments) close in order: none closes one not opened, and all opened are closed. A
/// condition spliced into a query inside parentheses must be, or it could close them and
/// change what the query around it means (`a) OR (b`).
pub fn balanced_parentheses(sql: &str) -> Result<bool, SqlError> {
    let mut depth = 0usize;
    for token in Lexer::new(sql) {
        match token?.kind {
            Kind::Open => depth += 1,
            Kind::Close => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return Ok(false),
            },
            _ => {}
        }
    }
    Ok(depth == 0)
}

/// Whether SQL text holds a comment (`--` or `/* */`, outside strings, quoted identifiers
/// and dollar quotes).
pub fn has_comment(sql: &str) -> Result<bool, SqlError> {
    for token in Lexer::new(sql) {
        if token?.kind == Kind::Comment {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The positional parameters (`$1`, `$2`, ...) that SQL text uses, outside strings, quoted
/// identifiers, dollar quotes and comments: sorted, each once.
pub fn parameters(sql: &str) -> Result<Vec<u32>, SqlError> {
    let mut out = Vec::new();
    for token in Lexer::new(sql) {
        let token = token?;
        if let Some(n) = parameter(token, sql) {
            out.push(n);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn parameter(token: Token, sql: &str) -> Option<u32> {
    if token.kind != Kind::Word {
        return None;
    }
    let digits = token.text(sql).strip_prefix('$')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Replaces each parameter `$n` (outside strings, quoted identifiers, dollar quotes and
/// comments) with `values[n - 1]`, which must already be quoted SQL (a literal). A parameter
/// without a value is left as it is (the caller checks [`parameters`] first).
pub fn bind_parameters(sql: &str, values: &[&str]) -> Result<String, SqlError> {
    let mut out = String::with_capacity(sql.len() + values.iter().map(|v| v.len()).sum::<usize>());
    for token in Lexer::new(sql) {
        let token = token?;
        match parameter(token, sql).and_then(|n| values.get((n as usize).checked_sub(1)?)) {
            // spaces around the value: `x>$1` must not become `x>'-'...` glued to an operator
            Some(v) => {
                out.push(' ');
                out.push_str(v);
                out.push(' ');
            }
            None => out.push_str(token.text(sql)),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- classification

/// A statement's tokens as classification sees them: words upper-cased, parentheses,
/// anything quoted as `Quoted`, other punctuation as `Other`; comments dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Word(String),
    Open,
    Close,
    Quoted,
    Other,
}

/// Classification only looks at the first few keywords; this many is plenty.
const KEYWORDS: usize = 64;

fn keywords(stmt: &str) -> Vec<Key> {
    let mut out = Vec::new();
    for token in Lexer::new(stmt) {
        // Statements come from `split_statements`, so they lex; stop quietly if not.
        let Ok(token) = token else { break };
        let key = match token.kind {
            Kind::Whitespace | Kind::Comment => continue,
            Kind::Word => Key::Word(token.text(stmt).to_ascii_uppercase()),
            Kind::Open => Key::Open,
            Kind::Close => Key::Close,
            Kind::String | Kind::QuotedIdent => Key::Quoted,
            Kind::Semicolon | Kind::Other => Key::Other,
        };
        out.push(key);
        if out.len() >= KEYWORDS {
            break;
        }
    }
    out
}

fn word(k: Option<&Key>) -> Option<&str> {
    match k {
        Some(Key::Word(w)) => Some(w.as_str()),
        _ => None,
    }
}

/// The keys outside any parentheses (the parentheses themselves dropped).
fn top_level(keys: &[Key]) -> Vec<&Key> {
    let mut depth = 0usize;
    let mut out = Vec::new();
    for k in keys {
        match k {
            Key::Open => depth += 1,
            Key::Close => depth = depth.saturating_sub(1),
            k if depth == 0 => out.push(k),
            _ => {}
        }
    }
    out
}

fn is_non_transactional(keys: &[Key]) -> bool {
    let w = |i: usize| word(keys.get(i));
    match (w(0), w(1), w(2)) {
        (Some("CREATE"), Some("INDEX"), Some("CONCURRENTLY")) => true,
        (Some("CREATE"), Some("UNIQUE"), Some("INDEX")) => w(3) == Some("CONCURRENTLY"),
        (Some("DROP"), Some("INDEX"), Some("CONCURRENTLY")) => true,
        (Some("REINDEX"), ..) => reindex_outside_transaction(&keys[1..]),
        (Some("VACUUM"), ..) => true,
        (Some("CREATE" | "DROP"), Some("DATABASE" | "TABLESPACE"), _) => true,
        // ALTER DATABASE name SET TABLESPACE x moves files and refuses a transaction block.
        (Some("ALTER"), Some("DATABASE"), _) => top_level(&keys[2..])
            .windows(2)
            .any(|p| word(Some(p[0])) == Some("SET") && word(Some(p[1])) == Some("TABLESPACE")),
        (Some("ALTER"), Some("SYSTEM"), _) => true,
        // ALTER TABLE parent DETACH PARTITION child CONCURRENTLY
        (Some("ALTER"), Some("TABLE"), _) => {
            let top = top_level(&keys[2..]);
            let detach = top.windows(2).position(|p| {
                word(Some(p[0])) == Some("DETACH") && word(Some(p[1])) == Some("PARTITION")
            });
            detach.is_some_and(|i| {
                top.len() > i + 3 && word(top.last().copied()) == Some("CONCURRENTLY")
            })
        }
        // CLUSTER without a table reclusters every table, and refuses a transaction block.
        (Some("CLUSTER"), ..) => cluster_without_table(&keys[1..]),
        (Some("DISCARD"), Some("ALL"), _) => true,
        _ => false,
    }
}

/// `REINDEX [(options)] {INDEX|TABLE|SCHEMA|DATABASE|SYSTEM} [CONCURRENTLY] name`:
/// SCHEMA, DATABASE and SYSTEM never run in a transaction block, nor does CONCURRENTLY.
fn reindex_outside_transaction(keys: &[Key]) -> bool {
    let mut i = 0;
    if keys.first() == Some(&Key::Open) {
        // Options: `(CONCURRENTLY [true|on|1], VERBOSE, ...)`.
        let mut concurrently = false;
        i = 1;
        while i < keys.len() && keys[i] != Key::Close {
            if word(keys.get(i)) == Some("CONCURRENTLY") {
                concurrently = !matches!(word(keys.get(i + 1)), Some("FALSE" | "OFF" | "0" | "NO"));
            }
            i += 1;
        }
        if concurrently {
            return true;
        }
        i += 1;
    }
    match word(keys.get(i)) {
        Some("SCHEMA" | "DATABASE" | "SYSTEM") => true,
        Some("INDEX" | "TABLE") => word(keys.get(i + 1)) == Some("CONCURRENTLY"),
        _ => false,
    }
}

/// `CLUSTER`, `CLUSTER VERBOSE`, `CLUSTER (VERBOSE)`: no table named.
fn cluster_without_table(keys: &[Key]) -> bool {
    let mut rest = keys;
    if rest.first() == Some(&Key::Open) {
        match rest.iter().position(|k| *k == Key::Close) {
            Some(close) => rest = &rest[close + 1..],
            None => return false,
        }
    } else if word(rest.first()) == Some("VERBOSE") {
        rest = &rest[1..];
    }
    rest.is_empty()
}

fn is_transaction_control(keys: &[Key]) -> bool {
    let w = |i: usize| word(keys.get(i));
    match w(0) {
        Some("BEGIN" | "COMMIT" | "END" | "ABORT") => true,
        Some("START") => w(1) == Some("TRANSACTION"),
        Some("PREPARE") => w(1) == Some("TRANSACTION"),
        // ROLLBACK [WORK|TRANSACTION] TO [SAVEPOINT] s stays inside the transaction;
        // ROLLBACK, ROLLBACK AND CHAIN and ROLLBACK PREPARED do not.
        Some("ROLLBACK") => {
            let next = match w(1) {
                Some("WORK" | "TRANSACTION") => w(2),
                other => other,
            };
            next != Some("TO")
        }
        _ => false,
    }
}

// ---------------------------------------------------------------- psql's BEGIN ... END heuristic

/// Tracks `CREATE [OR REPLACE] {FUNCTION|PROCEDURE} ... BEGIN ATOMIC ... END`, whose body
/// holds semicolons outside any quote. The same heuristic as psql (`psqlscan.l`): note
/// the first four words of the statement; when they say CREATE [OR REPLACE] FUNCTION or
/// PROCEDURE, count BEGIN (and CASE inside it) up and END down, outside parentheses.
#[derive(Debug, Default)]
struct BodyTracker {
    count: usize,
    leading: [u8; 4],
    depth: usize,
}

impl BodyTracker {
    /// A word of the statement; `top_level`: outside parentheses.
    fn word(&mut self, w: &str, top_level: bool) {
        let lower = w.to_ascii_lowercase();
        if self.count < self.leading.len()
            && matches!(
                lower.as_str(),
                "create" | "function" | "procedure" | "or" | "replace"
            )
        {
            self.leading[self.count] = lower.as_bytes()[0];
        }
        self.count += 1;
        let l = self.leading;
        let routine = l[0] == b'c'
            && (matches!(l[1], b'f' | b'p')
                || (l[1] == b'o' && l[2] == b'r' && matches!(l[3], b'f' | b'p')));
        if !routine || !top_level {
            return;
        }
        match lower.as_str() {
            "begin" => self.depth += 1,
            "case" if self.depth >= 1 => self.depth += 1,
            "end" => self.depth = self.depth.saturating_sub(1),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------- the lexer

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Whitespace,
    /// `-- ...` or `/* ... */` (nested).
    Comment,
    /// An identifier, keyword, number or `$1` parameter.
    Word,
    /// '...', E'...', or a dollar-quoted string.
    String,
    /// "..."
    QuotedIdent,
    Semicolon,
    Open,
    Close,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

impl Token {
    fn text(self, src: &str) -> &str {
        &src[self.start..self.end]
    }
}

struct Lexer<'a> {
    src: &'a str,
    bytes: &'a [u8],
    pos: usize,
    failed: bool,
}

/// Bytes that may continue an identifier: PostgreSQL allows `$` after the first character,
/// and any non-ASCII byte.
fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Lexer<'a> {
        Lexer {
            src,
            bytes: src.as_bytes(),
            pos: 0,
            failed: false,
        }
    }

    fn at(&self, i: usize) -> Option<u8> {
        self.bytes.get(i).copied()
    }

    fn line_of(&self, pos: usize) -> usize {
        1 + self.bytes[..pos].iter().filter(|&&b| b == b'\n').count()
    }

    fn unterminated(&self, what: &'static str, start: usize) -> SqlError {
        SqlError::Unterminated {
            what,
            line: self.line_of(start),
        }
    }

    /// Past the closing quote of a '...' string (or "..." identifier) whose opening
    /// quote is at `open`; a doubled quote is part of the content. With `backslash`,
    /// a backslash escapes the next byte (E'...' strings).
    fn quoted(&self, open: usize, quote: u8, backslash: bool) -> Option<usize> {
        let mut i = open + 1;
        while i < self.bytes.len() {
            let b = self.bytes[i];
            if backslash && b == b'\\' {
                i += 2;
            } else if b == quote {
                if self.at(i + 1) == Some(quote) {
                    i += 2;
                } else {
                    return Some(i + 1);
                }
            } else {
                i += 1;
            }
        }
        None
    }

    /// The delimiter (`$$` or `$tag$`) starting at `start`, if one does.
    fn dollar_delimiter(&self, start: usize) -> Option<&'a str> {
        let mut i = start + 1;
        if let Some(b) = self.at(i)
            && b != b'$'
        {
            if !is_ident_start(b) {
                return None;
            }
            while self.at(i).is_some_and(|b| is_ident_byte(b) && b != b'$') {
                i += 1;
            }
        }
        (self.at(i) == Some(b'$')).then(|| &self.src[start..=i])
    }

    fn block_comment_end(&self, start: usize) -> Option<usize> {
        let mut depth = 0usize;
        let mut i = start;
        while i + 1 < self.bytes.len() {
            match (self.bytes[i], self.bytes[i + 1]) {
                (b'/', b'*') => {
                    depth += 1;
                    i += 2;
                }
                (b'*', b'/') => {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => i += 1,
            }
        }
        None
    }

    fn token(&mut self) -> Result<Option<Token>, SqlError> {
        let start = self.pos;
        let Some(b) = self.at(start) else {
            return Ok(None);
        };
        let next = self.at(start + 1);
        let (kind, end) = match b {
            b if b.is_ascii_whitespace() => {
                let mut i = start + 1;
                while self.at(i).is_some_and(|b| b.is_ascii_whitespace()) {
                    i += 1;
                }
                (Kind::Whitespace, i)
            }
            b'-' if next == Some(b'-') => {
                let end = self.src[start..]
                    .find('\n')
                    .map_or(self.bytes.len(), |n| start + n);
                (Kind::Comment, end)
            }
            b'/' if next == Some(b'*') => {
                let end = self
                    .block_comment_end(start)
                    .ok_or_else(|| self.unterminated("block comment", start))?;
                (Kind::Comment, end)
            }
            b'\'' => {
                let end = self
                    .quoted(start, b'\'', false)
                    .ok_or_else(|| self.unterminated("quoted string", start))?;
                (Kind::String, end)
            }
            b'"' => {
                let end = self
                    .quoted(start, b'"', false)
                    .ok_or_else(|| self.unterminated("quoted identifier", start))?;
                (Kind::QuotedIdent, end)
            }
            b'e' | b'E' if next == Some(b'\'') => {
                let end = self
                    .quoted(start + 1, b'\'', true)
                    .ok_or_else(|| self.unterminated("escape string", start))?;
                (Kind::String, end)
            }
            b'$' => match self.dollar_delimiter(start) {
                Some(delim) => {
                    let body = start + delim.len();
                    let close = self.src[body..]
                        .find(delim)
                        .ok_or_else(|| self.unterminated("dollar-quoted string", start))?;
                    (Kind::String, body + close + delim.len())
                }
                // `$1`: a parameter.
                None if next.is_some_and(|b| b.is_ascii_digit()) => {
                    let mut i = start + 1;
                    while self.at(i).is_some_and(|b| b.is_ascii_digit()) {
                        i += 1;
                    }
                    (Kind::Word, i)
                }
                None => (Kind::Other, start + 1),
            },
            b if is_ident_byte(b) => {
                // Identifiers, keywords and numbers; `$` continues a word (`a$b$` is one
                // identifier, not a dollar quote), and any other prefix of a quote
                // (U&'..', B'..', X'..', N'..') is a word followed by a plain string.
                let mut i = start + 1;
                while self.at(i).is_some_and(is_ident_byte) {
                    i += 1;
                }
                (Kind::Word, i)
            }
            b';' => (Kind::Semicolon, start + 1),
            b'(' => (Kind::Open, start + 1),
            b')' => (Kind::Close, start + 1),
            _ => {
                // One character (not byte): keep slices on char boundaries.
                let len = self.src[start..].chars().next().map_or(1, char::len_utf8);
                (Kind::Other, start + len)
            }
        };
        self.pos = end;
        Ok(Some(Token { kind, start, end }))
    }
}

impl Iterator for Lexer<'_> {
    type Item = Result<Token, SqlError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let t = self.token().transpose();
        if matches!(t, Some(Err(_))) {
            self.failed = true;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(sql: &str) -> Vec<String> {
        split_statements(sql).unwrap_or_else(|e| panic!("{sql:?}: {e}"))
    }

    fn stmts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn non_tx(sql: &str) -> Option<String> {
        first_non_transactional(&split(sql)).map(str::to_string)
    }

    fn control(sql: &str) -> Option<String> {
        first_transaction_control(&split(sql)).map(str::to_string)
    }

    #[test]
    fn an_enum_value_added_is_seen_however_the_type_is_named() {
        for sql in [
            "ALTER TYPE order_status ADD VALUE 'cancelled'",
            "-- new state\nalter type app.\"Order Status\" add value if not exists 'x' after 'y'",
            "CREATE TABLE t (id int); ALTER TYPE s.mood ADD VALUE 'meh' BEFORE 'sad';",
        ] {
            assert!(adds_enum_value(&split(sql)), "{sql}");
        }
        for sql in [
            "ALTER TYPE order_status RENAME VALUE 'a' TO 'b'",
            "ALTER TYPE addr ADD ATTRIBUTE value text",
            "ALTER TABLE t ADD COLUMN value text",
            "SELECT 'ALTER TYPE t ADD VALUE x'",
        ] {
            assert!(!adds_enum_value(&split(sql)), "{sql}");
        }
    }

    #[test]
    fn splits_simple_statements() {
        assert_eq!(
            split("SELECT 1; SELECT 2;"),
            stmts(&["SELECT 1", "SELECT 2"])
        );
        assert_eq!(split("  SELECT 1  "), stmts(&["SELECT 1"]));
        assert_eq!(
            split("SELECT 1;;; ;\n;SELECT 2"),
            stmts(&["SELECT 1", "SELECT 2"])
        );
        assert!(split("").is_empty());
        assert!(split(" ;\n ; ").is_empty());
        assert_eq!(
            split(
                "ALTER TABLE t\n  ADD COLUMN a int,\n  ADD COLUMN b text;\nCREATE INDEX i ON t (a);\n"
            ),
            stmts(&[
                "ALTER TABLE t\n  ADD COLUMN a int,\n  ADD COLUMN b text",
                "CREATE INDEX i ON t (a)"
            ])
        );
    }

    #[test]
    fn comment_only_statements_are_empty() {
        assert!(split("-- nothing here\n").is_empty());
        assert!(split("/* nothing */ ; -- still nothing\n; /* a /* nested */ one */").is_empty());
        assert_eq!(
            split("-- first\nSELECT 1; -- trailing\n-- more\n"),
            stmts(&["-- first\nSELECT 1"])
        );
        // Comments after the last token are dropped, so the statement never ends in a `--`.
        assert_eq!(split("SELECT 1 -- why\n;"), stmts(&["SELECT 1"]));
        assert_eq!(split("SELECT 1 /* x */"), stmts(&["SELECT 1"]));
        assert_eq!(
            split("SELECT /* a; b */ 1"),
            stmts(&["SELECT /* a; b */ 1"])
        );
    }

    #[test]
    fn semicolons_inside_quotes_and_comments_do_not_split() {
        assert_eq!(
            split("INSERT INTO t VALUES ('a;b', 'it''s; fine'); SELECT 2"),
            stmts(&["INSERT INTO t VALUES ('a;b', 'it''s; fine')", "SELECT 2"])
        );
        assert_eq!(
            split(r"SELECT 'C:\'; SELECT 2"),
            stmts(&[r"SELECT 'C:\'", "SELECT 2"])
        );
        assert_eq!(
            split(r"SELECT E'it\'s; \\'; SELECT 2"),
            stmts(&[r"SELECT E'it\'s; \\'", "SELECT 2"])
        );
        assert_eq!(split(r"SELECT e'a'';\''; SELECT 2").len(), 2);
        assert_eq!(
            split(r#"CREATE TABLE "we;ird ""x""" (a int); SELECT 2"#),
            stmts(&[r#"CREATE TABLE "we;ird ""x""" (a int)"#, "SELECT 2"])
        );
        assert_eq!(split("SELECT 1 -- a; b\n, 2; SELECT 3").len(), 2);
        assert_eq!(split("SELECT /* a /* b; */ c; */ 1; SELECT 2").len(), 2);
        // A word ending in E is not an escape-string prefix.
        assert_eq!(
            split(r"SELECT namE'\'; SELECT 2"),
            stmts(&[r"SELECT namE'\'", "SELECT 2"])
        );
        // U&, B, X and N prefixes are plain strings.
        assert_eq!(
            split(r"SELECT U&'d\0061t\+000061;'; SELECT B'101'").len(),
            2
        );
    }

    #[test]
    fn dollar_quotes() {
        let sql = "DO $$ BEGIN RAISE NOTICE 'x;'; END $$; SELECT 2";
        assert_eq!(
            split(sql),
            stmts(&["DO $$ BEGIN RAISE NOTICE 'x;'; END $$", "SELECT 2"])
        );
        let sql = "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\nBEGIN\n  RETURN $$;$$::text;\nEND;\n$body$;\nSELECT f()";
        let got = split(sql);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].ends_with("$body$"));
        // An unmatched quote inside a dollar quote is just content.
        assert_eq!(split("SELECT $q$ it's \" $q$; SELECT 2").len(), 2);
        // A different tag does not close it.
        assert_eq!(split("SELECT $a$ $b$; $a$; SELECT 2").len(), 2);
        // `$1` is a parameter, and `$` inside an identifier starts no quote.
        assert_eq!(
            split("PREPARE p AS SELECT $1; SELECT a$b$c FROM t; SELECT 3").len(),
            3
        );
        // Tags are case-sensitive.
        assert!(split_statements("SELECT $A$ x $a$;").is_err());
    }

    #[test]
    fn sql_standard_function_bodies_keep_their_semicolons() {
        let sql = "CREATE OR REPLACE FUNCTION f(a int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT 1;\n  SELECT CASE WHEN a > 0 THEN 1 ELSE 2 END;\nEND;\nSELECT f(1);";
        let got = split(sql);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].ends_with("END"), "{got:?}");
        assert_eq!(got[1], "SELECT f(1)");
        let sql = "CREATE PROCEDURE p() BEGIN ATOMIC INSERT INTO t VALUES (1); END; CALL p()";
        assert_eq!(split(sql).len(), 2);
        // Outside CREATE FUNCTION/PROCEDURE, BEGIN and END are ordinary statements.
        assert_eq!(
            split("BEGIN; SELECT 1; END;"),
            stmts(&["BEGIN", "SELECT 1", "END"])
        );
        assert_eq!(split("SELECT CASE WHEN true THEN 1 END; SELECT 2").len(), 2);
        // A trigger executing a function is not a function body.
        assert_eq!(
            split("CREATE TRIGGER t BEFORE INSERT ON x FOR EACH ROW EXECUTE FUNCTION f(); BEGIN;")
                .len(),
            2
        );
    }

    #[test]
    fn semicolons_inside_parentheses_do_not_split() {
        let sql = "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); INSERT INTO b VALUES (2)); SELECT 1";
        let got = split(sql);
        assert_eq!(got.len(), 2, "{got:?}");
    }

    #[test]
    fn unterminated_things_name_their_line() {
        let cases = [
            ("SELECT 1;\nSELECT 'oops", "quoted string", 2),
            ("SELECT 1;\n\nSELECT E'oops\\'", "escape string", 3),
            ("SELECT \"oops", "quoted identifier", 1),
            (
                "SELECT 1;\nDO $$ BEGIN\nEND $ $;",
                "dollar-quoted string",
                2,
            ),
            (
                "SELECT 1;\nDO $fn$ BEGIN END $$;",
                "dollar-quoted string",
                2,
            ),
            ("SELECT 1 /* a /* b */", "block comment", 1),
            ("SELECT 1;\n/*\n/* */\n", "block comment", 2),
        ];
        for (sql, what, line) in cases {
            assert_eq!(
                split_statements(sql),
                Err(SqlError::Unterminated { what, line }),
                "{sql:?}"
            );
        }
        assert_eq!(
            split_statements("'x").unwrap_err().to_string(),
            "unterminated quoted string starting at line 1"
        );
        // A line comment may end the text.
        assert_eq!(split("SELECT 1 -- no newline"), stmts(&["SELECT 1"]));
    }

    #[test]
    fn non_ascii_text_survives() {
        assert_eq!(
            split("INSERT INTO t VALUES ('héllo; wörld'); SELECT 'ü' § 2; -- ende ✓"),
            stmts(&["INSERT INTO t VALUES ('héllo; wörld')", "SELECT 'ü' § 2"])
        );
        assert_eq!(split("SELECT ñame FROM tàble").len(), 1);
    }

    #[test]
    fn session_settings() {
        for s in [
            "SET ROLE app_owner",
            "set search_path = app",
            "-- why\nSET SESSION AUTHORIZATION admin",
            "RESET ALL",
            "SET LOCAL lock_timeout = '1s'",
        ] {
            assert!(is_session_setting(s), "{s}");
        }
        for s in [
            "ALTER TABLE t SET (fillfactor = 70)",
            "UPDATE t SET a = 1",
            "SELECT set_config('a.b', 'c', false)",
            "'SET'",
        ] {
            assert!(!is_session_setting(s), "{s}");
        }
    }

    #[test]
    fn role_changes() {
        for s in [
            "SET ROLE app_owner",
            "set session role app_owner",
            "SET LOCAL ROLE app_owner",
            "RESET ROLE",
            "-- who\nSET SESSION AUTHORIZATION admin",
            "RESET SESSION AUTHORIZATION",
        ] {
            assert!(changes_role(s), "{s}");
        }
        for s in [
            "SET TimeZone = 'UTC'",
            "SET SESSION search_path = app",
            "RESET ALL",
            "SET role_name.x = 1",
            "UPDATE t SET role = 'a'",
        ] {
            assert!(!changes_role(s), "{s}");
        }
    }

    #[test]
    fn statements_that_may_commit_part_way() {
        for s in [
            "CALL backfill()",
            "-- chunks\ndo $$ begin commit; end $$",
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "create unique index concurrently if not exists i on t (a)",
            "REINDEX TABLE CONCURRENTLY t",
            "REINDEX SCHEMA app",
            "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
        ] {
            assert!(may_commit_part_way(s), "{s}");
        }
        for s in [
            "DROP INDEX CONCURRENTLY IF EXISTS i",
            "DROP TABLE IF EXISTS t",
            "UPDATE t SET n = n - 1",
            "VACUUM t",
            "REINDEX TABLE t",
            "ALTER TABLE t DROP COLUMN c",
            "SELECT 'CALL x()'",
        ] {
            assert!(!may_commit_part_way(s), "{s}");
        }
        // of those, the concurrent index builds (their leftover the agent drops)
        for s in [
            "-- build\nCREATE INDEX CONCURRENTLY i ON t (a)",
            "create unique index concurrently if not exists i on t (a)",
        ] {
            assert!(is_concurrent_index_build(s), "{s}");
        }
        for s in [
            "CREATE INDEX i ON t (a)",
            "REINDEX TABLE CONCURRENTLY t",
            "CALL x()",
        ] {
            assert!(!is_concurrent_index_build(s), "{s}");
        }
        assert!(is_concurrent_index_drop(
            "drop index concurrently if exists i"
        ));
        assert!(!is_concurrent_index_drop("DROP INDEX i"));
    }

    #[test]
    fn detects_non_transactional_statements() {
        let yes = [
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "create unique index concurrently if not exists i on t (a)",
            "-- build it online\n/* really */ CREATE INDEX\n  CONCURRENTLY i ON t (a)",
            "DROP INDEX CONCURRENTLY IF EXISTS i",
            "REINDEX INDEX CONCURRENTLY i",
            "REINDEX TABLE CONCURRENTLY t",
            "REINDEX (VERBOSE, CONCURRENTLY) TABLE t",
            "REINDEX (CONCURRENTLY true) INDEX i",
            "REINDEX SCHEMA s",
            "REINDEX DATABASE",
            "REINDEX SYSTEM",
            "VACUUM",
            "vacuum (analyze) t",
            "VACUUM FULL t",
            "CREATE DATABASE d",
            "DROP DATABASE IF EXISTS d",
            "ALTER DATABASE d SET TABLESPACE fast",
            "ALTER SYSTEM SET work_mem = '64MB'",
            "CREATE TABLESPACE fast LOCATION '/ssd'",
            "DROP TABLESPACE fast",
            "CLUSTER",
            "CLUSTER VERBOSE",
            "CLUSTER (VERBOSE)",
            "ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY",
            "ALTER TABLE s.p DETACH PARTITION \"s\".\"p1\" CONCURRENTLY",
            "DISCARD ALL",
        ];
        for s in yes {
            assert_eq!(first_non_transactional(&stmts(&[s])), Some(s), "{s}");
        }
        let no = [
            "CREATE INDEX i ON t (a)",
            "CREATE INDEX concurrently_idx ON t (a)",
            "INSERT INTO t VALUES ('concurrently')",
            "INSERT INTO t VALUES ('CREATE INDEX CONCURRENTLY')",
            "SELECT 'VACUUM'",
            "-- VACUUM\nSELECT 1",
            "/* CREATE INDEX CONCURRENTLY */ CREATE INDEX i ON t (a)",
            "COMMENT ON TABLE t IS 'run VACUUM after'",
            "REFRESH MATERIALIZED VIEW CONCURRENTLY mv",
            "REINDEX INDEX i",
            "REINDEX TABLE t",
            "REINDEX (CONCURRENTLY false) TABLE t",
            "REINDEX (VERBOSE) TABLE t",
            "CLUSTER t USING i",
            "CLUSTER t",
            "CLUSTER VERBOSE t",
            "ALTER DATABASE d SET work_mem = '1MB'",
            "ALTER TABLE t ADD COLUMN concurrently int",
            "ALTER TABLE p DETACH PARTITION p1",
            "ALTER TABLE p DETACH PARTITION concurrently",
            "ALTER TABLE p DETACH PARTITION p1 FINALIZE",
            "DISCARD PLANS",
            "DO $$ BEGIN EXECUTE 'VACUUM'; END $$",
            "CREATE TABLE vacuum_log (id int)",
            "\"VACUUM\"",
        ];
        for s in no {
            assert_eq!(first_non_transactional(&stmts(&[s])), None, "{s}");
        }
        assert_eq!(
            non_tx("ALTER TABLE t ADD a int; CREATE INDEX CONCURRENTLY i ON t (a); VACUUM t"),
            Some("CREATE INDEX CONCURRENTLY i ON t (a)".into())
        );
        assert_eq!(non_tx("SELECT 1; SELECT 2"), None);
    }

    #[test]
    fn detects_transaction_control() {
        let yes = [
            "BEGIN",
            "begin transaction isolation level serializable",
            "BEGIN WORK",
            "START TRANSACTION",
            "COMMIT",
            "COMMIT AND CHAIN",
            "END",
            "end transaction",
            "ROLLBACK",
            "ROLLBACK WORK",
            "ROLLBACK AND CHAIN",
            "ABORT",
            "PREPARE TRANSACTION 'gid'",
            "COMMIT PREPARED 'gid'",
            "ROLLBACK PREPARED 'gid'",
            "-- done\nCOMMIT",
            "/* go */ BEGIN",
        ];
        for s in yes {
            assert_eq!(first_transaction_control(&stmts(&[s])), Some(s), "{s}");
        }
        let no = [
            "SAVEPOINT s",
            "RELEASE SAVEPOINT s",
            "RELEASE s",
            "ROLLBACK TO SAVEPOINT s",
            "ROLLBACK TO s",
            "ROLLBACK WORK TO SAVEPOINT s",
            "ROLLBACK TRANSACTION TO s",
            "PREPARE q AS SELECT 1",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SELECT 'BEGIN'",
            "-- BEGIN\nSELECT 1",
            "DO $$ BEGIN PERFORM 1; END $$",
            "DO $$\nBEGIN\n  COMMIT;\nEND\n$$",
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN RETURN; END $$",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
            "INSERT INTO log VALUES ('COMMIT')",
            "\"begin\"",
            "STARTS",
        ];
        for s in no {
            assert_eq!(first_transaction_control(&stmts(&[s])), None, "{s}");
        }
        assert_eq!(control("SELECT 1; COMMIT; BEGIN"), Some("COMMIT".into()));
        assert_eq!(
            control(
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; SELECT f()"
            ),
            None
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("tenant_0001"), "\"tenant_0001\"");
        assert_eq!(quote_ident("Mixed Case"), "\"Mixed Case\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident(""), "\"\"");
        assert_eq!(quote_literal("plain").unwrap(), "'plain'");
        assert_eq!(quote_literal("it's").unwrap(), "'it''s'");
        // an escape string, read the same with standard_conforming_strings on or off
        assert_eq!(quote_literal(r"C:\dir").unwrap(), r"E'C:\\dir'");
        assert_eq!(quote_literal(r"end\").unwrap(), r"E'end\\'");
        assert_eq!(quote_literal(r"a\'b").unwrap(), r"E'a\\''b'");
        assert!(balanced_parentheses("(a OR b) AND (c)").unwrap());
        assert!(balanced_parentheses("f(')') = ')'").unwrap());
        assert!(!balanced_parentheses("a) OR (b").unwrap());
        assert!(!balanced_parentheses("(a OR b").unwrap());
        assert_eq!(quote_literal("").unwrap(), "''");
        assert_eq!(quote_literal("a\0b"), Err(SqlError::Nul));
        assert_eq!(SqlError::Nul.to_string(), "string holds a NUL byte");
        // What was quoted lexes back as one token.
        let lit = quote_literal("x'; DROP TABLE t; --").unwrap();
        assert_eq!(split(&format!("SELECT {lit}; SELECT 2")).len(), 2);
        let id = quote_ident("x\"; DROP TABLE t; --");
        assert_eq!(split(&format!("SELECT * FROM {id}; SELECT 2")).len(), 2);
    }
}
