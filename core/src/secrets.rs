//! Keeping secrets in the process (DESIGN invariant 8).
//!
//! - [`Secret`]: a password, token or key. `Debug` and `Display` print `***`; only
//!   [`Secret::expose`] gives the value, so a secret reaches a log line, an error or a status
//!   only where someone wrote `expose()`.
//! - [`SecretUrl`]: a DSN or store URL that may carry a password. It shows as
//!   [`redact_url`] does; [`SecretUrl::expose`] gives the whole address to the driver.
//! - [`scrub`] and [`panic_hook`]: the last line of defence. Every secret made through these
//!   types is remembered, and a panic's message is printed with each of them replaced, so a
//!   `panic!("{x:?}")` of something that formats a secret by hand still leaks nothing.
use std::fmt;
use std::sync::Mutex;

/// What a password inside an address is replaced with.
pub const REDACTED: &str = "<redacted>";

/// What a [`Secret`] shows as.
pub const HIDDEN: &str = "***";

/// Secrets shorter than this are not scrubbed from panic messages: replacing every `a` of a
/// one-letter password would garble the message and hide nothing worth hiding.
const SCRUB_MIN_LEN: usize = 4;

/// Every secret value this process made into a [`Secret`] or [`SecretUrl`] (for [`scrub`]).
static KNOWN: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn remember(value: &str) {
    if value.len() < SCRUB_MIN_LEN {
        return;
    }
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if !known.iter().any(|k| k == value) {
        known.push(value.to_string());
    }
}

/// `text` with every secret this process knows replaced by `***`, longest first (one secret
/// may contain another).
pub fn scrub(text: &str) -> String {
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner()).clone();
    known.sort_by_key(|k| std::cmp::Reverse(k.len()));
    let mut out = text.to_string();
    for secret in &known {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), HIDDEN);
        }
    }
    out
}

/// SQL with the literal after each `PASSWORD` keyword shown as `'***'` (`CREATE ROLE ...
/// PASSWORD '...'`, a user mapping's `OPTIONS (password '...')` or `("password" '...')`), in
/// each of PostgreSQL's string forms ('a''b', E'a\'b', U&'...', $$...$$, $tag$...$tag$): for
/// statements shown to people (the dry run), where a migration's SQL holds a password. Only
/// for display: the SQL run is the file's.
pub fn sql_passwords_hidden(sql: &str) -> String {
    let lower = sql.to_ascii_lowercase();
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut at = 0;
    while let Some(found) = lower[at..].find("password") {
        let word = at + found;
        let mut end = word + "password".len();
        let is_word = |i: usize| bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_';
        if (word > 0 && is_word(word - 1)) || (end < bytes.len() && is_word(end)) {
            out.push_str(&sql[at..end]);
            at = end;
            continue;
        }
        // an option name may be written as a quoted identifier: "password" '...'
        if word > 0 && bytes[word - 1] == b'"' && bytes.get(end) == Some(&b'"') {
            end += 1;
        }
        let mut i = end;
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let Some(after) = string_literal_end(bytes, i) else {
            out.push_str(&sql[at..end]);
            at = end;
            continue;
        };
        out.push_str(&sql[at..i]);
        out.push_str("'***'");
        at = after;
    }
    out.push_str(&sql[at..]);
    connection_passwords_hidden(&out)
}

/// A connection string's password in the SQL (`CREATE SUBSCRIPTION ... CONNECTION 'host=h
/// password=PW'`, `dblink_connect('postgresql://u:PW@h/db')`) shown as `***`.
fn connection_passwords_hidden(sql: &str) -> String {
    let stops = |c: char| c.is_whitespace() || matches!(c, '\'' | '"' | ';' | ')' | ',');
    let lower = sql.to_ascii_lowercase();
    let mut out = String::with_capacity(sql.len());
    let mut at = 0;
    // key/value: password=PW (a word of its own)
    while let Some(found) = lower[at..].find("password=") {
        let key = at + found;
        let value = key + "password=".len();
        let own_word = key == 0
            || !sql[..key]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let end = sql[value..].find(stops).map_or(sql.len(), |e| value + e);
        out.push_str(&sql[at..value]);
        if own_word && end > value {
            out.push_str(HIDDEN);
        } else {
            out.push_str(&sql[value..end]);
        }
        at = end;
    }
    out.push_str(&sql[at..]);
    // URLs: scheme://user:PW@host
    let sql = out;
    let mut out = String::with_capacity(sql.len());
    let mut at = 0;
    while let Some(found) = sql[at..].find("://") {
        let start = at + found + 3;
        let end = sql[start..].find(stops).map_or(sql.len(), |e| start + e);
        let authority_end = sql[start..end]
            .find(['/', '?', '#'])
            .map_or(end, |e| start + e);
        out.push_str(&sql[at..start]);
        match sql[start..authority_end].rfind('@') {
            Some(a) => {
                let userinfo = &sql[start..start + a];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push(':');
                        out.push_str(HIDDEN);
                        out.push_str(&sql[start + a..end]);
                    }
                    None => out.push_str(&sql[start..end]),
                }
            }
            None => out.push_str(&sql[start..end]),
        }
        at = end;
    }
    out.push_str(&sql[at..]);
    out
}

/// Where the SQL string literal that starts at `i` ends (just past it), or None when no
/// literal starts there. An unterminated one runs to the end.
fn string_literal_end(bytes: &[u8], i: usize) -> Option<usize> {
    let at = |k: usize| bytes.get(k).copied();
    match at(i)? {
        b'$' => {
            // $tag$ ... $tag$: the tag is an identifier without `$`, or empty
            let mut t = i + 1;
            while at(t).is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80) {
                t += 1;
            }
            if at(t) != Some(b'$') || at(i + 1).is_some_and(|b| b.is_ascii_digit()) {
                return None;
            }
            let tag = &bytes[i..=t];
            let body = t + 1;
            Some(
                bytes[body..]
                    .windows(tag.len())
                    .position(|w| w == tag)
                    .map_or(bytes.len(), |p| body + p + tag.len()),
            )
        }
        b'\'' | b'E' | b'e' | b'U' | b'u' => {
            let (quote, escaped) = match at(i)? {
                b'\'' => (i, false),
                b'E' | b'e' => (i + 1, true),
                _ if at(i + 1) == Some(b'&') => (i + 2, false),
                _ => return None,
            };
            if at(quote) != Some(b'\'') {
                return None;
            }
            let mut j = quote + 1;
            while j < bytes.len() {
                match bytes[j] {
                    b'\\' if escaped => j += 2,
                    b'\'' if at(j + 1) == Some(b'\'') => j += 2,
                    b'\'' => return Some(j + 1),
                    _ => j += 1,
                }
            }
            Some(bytes.len())
        }
        _ => None,
    }
}

/// A password, token or key. Shown as `***`; [`Secret::expose`] is the only way to the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        let value = value.into();
        remember(&value);
        Secret(value)
    }

    /// The value itself: for the driver or the server that checks it, never for a person.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HIDDEN)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HIDDEN)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret::new(value)
    }
}

/// A DSN or URL that may carry a password (`scheme://user:PW@host/...`, `?password=PW`, or a
/// key/value `password=PW`). Shown with the password replaced ([`redact_url`]);
/// [`SecretUrl::expose`] gives the whole address to the driver that connects with it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        let url = url.into();
        if let Some(password) = userinfo_password(&url) {
            remember(password);
        }
        for (_, value) in secret_query_params(&url) {
            remember(&url[value.clone()]);
            remember(&percent_decode(&url[value]));
        }
        SecretUrl(url)
    }

    /// The whole address, password included: for the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The address with any password replaced (what `Display` shows).
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// Whether the address carries a password in any of the forms [`redact_url`] knows.
    pub fn has_password(&self) -> bool {
        redact_url(&self.0) != self.0
    }

    /// The same address with `password` in its userinfo (`scheme://user:PW@host`),
    /// percent-encoded; an address without `scheme://` is returned unchanged.
    pub fn with_password(&self, password: &Secret) -> SecretUrl {
        let url = &self.0;
        let Some(scheme_end) = url.find("://") else {
            return self.clone();
        };
        let rest_start = scheme_end + 3;
        let authority_end = url[rest_start..]
            .find(['/', '?', '#'])
            .map_or(url.len(), |i| rest_start + i);
        let authority = &url[rest_start..authority_end];
        let (user, host) = match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                (user, &authority[at + 1..])
            }
            None => ("", authority),
        };
        let encoded = percent_encode_userinfo(password.expose());
        remember(&encoded);
        SecretUrl::new(format!(
            "{}{user}:{encoded}@{host}{}",
            &url[..rest_start],
            &url[authority_end..]
        ))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> SecretUrl {
        SecretUrl::new(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> SecretUrl {
        SecretUrl::new(url)
    }
}

impl From<&String> for SecretUrl {
    fn from(url: &String) -> SecretUrl {
        SecretUrl::new(url.as_str())
    }
}

/// The password of `scheme://user:PW@host...`, as written.
fn userinfo_password(url: &str) -> Option<&str> {
    let rest_start = url.find("://")? + 3;
    let authority_end = url[rest_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| rest_start + i);
    let at = url[rest_start..authority_end].rfind('@')?;
    let userinfo = &url[rest_start..rest_start + at];
    userinfo.split_once(':').map(|(_, pw)| pw)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode_userinfo(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A panic hook for the binaries: prints the panic as the default hook would (message,
/// place, and a backtrace when RUST_BACKTRACE asks for one), with every known secret
/// scrubbed from the message.
pub fn panic_hook(info: &std::panic::PanicHookInfo<'_>) {
    let message = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "Box<dyn Any>".to_string());
    let place = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed>");
    let backtrace = std::backtrace::Backtrace::capture();
    let mut text = format!("thread '{name}' panicked{place}:\n{}\n", scrub(&message));
    if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
        text.push_str(&format!("stack backtrace:\n{backtrace}\n"));
    }
    eprint!("{text}");
}

/// Hides passwords in a DSN or URL, whichever way they were written:
/// `scheme://user:PW@host`, `?password=PW` in a URL, or `password=PW` in a key/value
/// connection string.
pub fn redact_url(dsn: &str) -> String {
    let mut out = dsn.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest_start + colon + 1..rest_start + at, REDACTED);
            }
        }
    }
    // A URL's query keys as the driver reads them: percent-decoded (`pass%77ord`), and in
    // any case (`Password`, which a driver that does not know the key logs with its value).
    for (_, value) in secret_query_params(&out).into_iter().rev() {
        out.replace_range(value, REDACTED);
    }
    redact_password_params(&out)
}

/// Whether a query key names a secret: `password`, `sslpassword` (a client key's
/// passphrase), whatever their case or percent-encoding.
fn is_secret_key(raw: &str) -> bool {
    matches!(
        percent_decode(raw).to_ascii_lowercase().as_str(),
        "password" | "sslpassword"
    )
}

/// The parameters of a URL's query (`scheme://...?k=v&k2=v2`) whose key names a secret:
/// each key as written, and the byte range of its value.
fn secret_query_params(url: &str) -> Vec<(String, std::ops::Range<usize>)> {
    if !url.contains("://") {
        return Vec::new();
    }
    let Some(q) = url.find('?') else {
        return Vec::new();
    };
    let end = url[q..].find('#').map_or(url.len(), |i| q + i);
    let mut found = Vec::new();
    let mut start = q + 1;
    while start <= end {
        let stop = url[start..end].find('&').map_or(end, |i| start + i);
        let pair = &url[start..stop];
        if let Some((key, _)) = pair.split_once('=')
            && is_secret_key(key)
        {
            found.push((key.to_string(), start + key.len() + 1..stop));
        }
        start = stop + 1;
    }
    found
}

/// `%XX` decoded (and `+` left as it is): how a URL's query key or value reads.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces the value of every `password=` parameter (URL query or key/value form).
fn redact_password_params(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(found) = lower[i..].find("password=") {
        let start = i + found;
        let preceded_ok =
            start == 0 || matches!(s.as_bytes()[start - 1], b'?' | b'&' | b' ' | b'\t');
        let value_start = start + "password=".len();
        out.push_str(&s[i..value_start]);
        if !preceded_ok {
            i = value_start;
            continue;
        }
        let rest = &s[value_start..];
        let value_len = if let Some(quoted) = rest.strip_prefix('\'') {
            // key/value form allows 'quoted values' with \' escapes
            let mut end = quoted.len();
            let mut escaped = false;
            for (j, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = j + 1;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            1 + end
        } else {
            rest.find(['&', ' ', '\t', '#']).unwrap_or(rest.len())
        };
        out.push_str(REDACTED);
        i = value_start + value_len;
    }
    out.push_str(&s[i..]);
    out
}

#[cfg(test)]
mod tests {
    /// The dry run shows a migration's statements: a password literal in them is hidden,
    /// the rest as written (quotes doubled and escaped ones included).
    #[test]
    fn passwords_in_sql_are_hidden_for_display() {
        assert_eq!(
            super::sql_passwords_hidden("CREATE ROLE app LOGIN PASSWORD 'CanaryPw_S3cr3t!x';"),
            "CREATE ROLE app LOGIN PASSWORD '***';"
        );
        assert_eq!(
            super::sql_passwords_hidden("alter role app encrypted password\n 'it''s'"),
            "alter role app encrypted password\n '***'"
        );
        assert_eq!(
            super::sql_passwords_hidden(
                "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', password E'a\\'b')"
            ),
            "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', password '***')"
        );
        // dollar-quoted, a Unicode-escaped literal, an option name quoted as an identifier
        assert_eq!(
            super::sql_passwords_hidden(
                "CREATE ROLE a PASSWORD $$x'y$$ LOGIN; ALTER ROLE b PASSWORD $pw$s$ec$pw$;"
            ),
            "CREATE ROLE a PASSWORD '***' LOGIN; ALTER ROLE b PASSWORD '***';"
        );
        assert_eq!(
            super::sql_passwords_hidden("ALTER ROLE a PASSWORD U&'d\\0061t''a'"),
            "ALTER ROLE a PASSWORD '***'"
        );
        assert_eq!(
            super::sql_passwords_hidden(
                "CREATE USER MAPPING FOR app SERVER s OPTIONS (\"user\" 'u', \"password\" 'hunter2')"
            ),
            "CREATE USER MAPPING FOR app SERVER s OPTIONS (\"user\" 'u', \"password\" '***')"
        );
        // unterminated: hidden to the end, not shown
        assert_eq!(
            super::sql_passwords_hidden("CREATE ROLE a PASSWORD $q$never closed"),
            "CREATE ROLE a PASSWORD '***'"
        );
        // a positional parameter or NULL is no literal
        let plain = "CREATE ROLE a PASSWORD NULL; ALTER ROLE b PASSWORD $1";
        assert_eq!(super::sql_passwords_hidden(plain), plain);
        // a connection string's, as key/value or in a URL
        assert_eq!(
            super::sql_passwords_hidden(
                "CREATE SUBSCRIPTION s CONNECTION 'host=db password=Hunter2 dbname=x' PUBLICATION p"
            ),
            "CREATE SUBSCRIPTION s CONNECTION 'host=db password=*** dbname=x' PUBLICATION p"
        );
        assert_eq!(
            super::sql_passwords_hidden(
                "SELECT dblink_connect('postgresql://app:S3cret@db:5432/x?sslmode=require')"
            ),
            "SELECT dblink_connect('postgresql://app:***@db:5432/x?sslmode=require')"
        );
        let plain = "SELECT dblink_connect('postgresql://app@db/x'); -- old_password=1";
        assert_eq!(super::sql_passwords_hidden(plain), plain);
        // a column of that name, or a word holding it, is not a password
        let plain = "ALTER TABLE users ADD COLUMN password_hash text, ADD COLUMN password text";
        assert_eq!(super::sql_passwords_hidden(plain), plain);
        assert_eq!(
            super::sql_passwords_hidden("UPDATE users SET password = 'x'"),
            "UPDATE users SET password = 'x'"
        );
    }

    use super::*;

    #[test]
    fn redacts_userinfo_password() {
        assert_eq!(
            redact_url("postgres://app:s3cr%40t@db.example:5432/shard_0"),
            "postgres://app:<redacted>@db.example:5432/shard_0"
        );
        assert_eq!(
            redact_url("postgres://app@db:5432/x"),
            "postgres://app@db:5432/x"
        );
        assert_eq!(redact_url("flotilla.db"), "flotilla.db");
    }

    #[test]
    fn redacts_password_parameters_of_a_store_url() {
        // The control store's own redactor once missed this form (issue 9).
        assert_eq!(
            redact_url("postgres://flotilla@db/control?password=hunter2"),
            "postgres://flotilla@db/control?password=<redacted>"
        );
        assert_eq!(
            redact_url("postgres://db/x?user=a&PASSWORD=hunter2&sslmode=require"),
            "postgres://db/x?user=a&PASSWORD=<redacted>&sslmode=require"
        );
        assert_eq!(
            redact_url("host=db password='a b\\' c' dbname=s"),
            "host=db password=<redacted> dbname=s"
        );
        assert_eq!(
            redact_url("postgres://u:pw@db/x?password=pw2"),
            "postgres://u:<redacted>@db/x?password=<redacted>"
        );
        // Keys the driver decodes (`pass%77ord` is `password`), or does not know and logs
        // with their value (`Password`), and a client key's passphrase.
        for (url, redacted) in [
            (
                "postgres://a@db/s?pass%77ord=CanaryPw_S3cr3t%21",
                "postgres://a@db/s?pass%77ord=<redacted>",
            ),
            (
                "postgres://a@db/s?sslmode=require&Password=LeakI9#x",
                "postgres://a@db/s?sslmode=require&Password=<redacted>#x",
            ),
            (
                "postgres://a@db/s?sslpassword=k3yPass&application_name=f",
                "postgres://a@db/s?sslpassword=<redacted>&application_name=f",
            ),
        ] {
            assert_eq!(redact_url(url), redacted);
            let s = SecretUrl::new(url);
            assert!(s.has_password(), "{url}");
            assert!(!format!("{s} {s:?}").contains("Canary") && !s.to_string().contains("LeakI9"));
        }
        assert!(
            scrub("pw CanaryPw_S3cr3t! and CanaryPw_S3cr3t%21")
                .matches("***")
                .count()
                == 2
        );
    }

    #[test]
    fn a_secret_shows_as_stars_everywhere_but_expose() {
        let s = Secret::new("canary-8c1e-pw");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{:?}", Some(&s)), "Some(***)");
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Holder {
            password: Secret,
        }
        let h = format!(
            "{:#?}",
            Holder {
                password: s.clone()
            }
        );
        assert!(!h.contains("canary"), "{h}");
        assert_eq!(s.expose(), "canary-8c1e-pw");
    }

    #[test]
    fn a_secret_url_shows_redacted_and_exposes_whole() {
        let u = SecretUrl::new("postgres://app:canary-77ab@db:5432/control?sslmode=require");
        assert_eq!(
            u.to_string(),
            "postgres://app:<redacted>@db:5432/control?sslmode=require"
        );
        assert!(!format!("{u:?}").contains("canary"));
        assert!(u.has_password());
        assert!(u.expose().contains("canary-77ab"));
        assert!(!SecretUrl::new("postgres://app@db/x").has_password());
        assert!(SecretUrl::new("postgres://db/x?password=zz").has_password());
        assert!(!SecretUrl::new("flotilla.db").has_password());
    }

    #[test]
    fn a_password_goes_into_the_userinfo_encoded() {
        let pw = Secret::new("p@ss:w/rd 1");
        let u = SecretUrl::new("postgres://flotilla@db:5432/control?sslmode=disable");
        let with = u.with_password(&pw);
        assert_eq!(
            with.expose(),
            "postgres://flotilla:p%40ss%3Aw%2Frd%201@db:5432/control?sslmode=disable"
        );
        assert_eq!(
            with.to_string(),
            "postgres://flotilla:<redacted>@db:5432/control?sslmode=disable"
        );
        // an existing password is replaced, a missing user stays missing
        let u = SecretUrl::new("postgres://u:old@db/x").with_password(&pw);
        assert!(
            u.expose().starts_with("postgres://u:p%40ss"),
            "{}",
            u.expose()
        );
        let u = SecretUrl::new("postgres://db/x").with_password(&pw);
        assert!(
            u.expose().starts_with("postgres://:p%40ss"),
            "{}",
            u.expose()
        );
        assert_eq!(
            SecretUrl::new("file.db").with_password(&pw).expose(),
            "file.db"
        );
    }

    #[test]
    fn scrub_removes_every_known_secret() {
        let _a = Secret::new("canary-scrub-1234");
        let _b = SecretUrl::new("postgres://u:canary-url-5678@h/db");
        let text = "failed: canary-scrub-1234 and postgres://u:canary-url-5678@h/db";
        let out = scrub(text);
        assert!(!out.contains("canary"), "{out}");
        assert_eq!(out, "failed: *** and postgres://u:***@h/db");
        // too short to scrub without garbling the text
        let _c = Secret::new("ab");
        assert_eq!(scrub("abc"), "abc");
    }
}
