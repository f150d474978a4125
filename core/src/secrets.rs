//! Keeping secrets in the process (DESIGN invariant 8): the one redactor for addresses
//! that may carry a password, used wherever a DSN or store URL is logged or shown.

/// What a password is replaced with.
pub const REDACTED: &str = "<redacted>";

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
    redact_password_params(&out)
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
    }
}
