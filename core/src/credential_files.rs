//! Files that hold credentials: how a password or token is read from one (`--password-file`,
//! `--store-password-file`, `--etcd-password-file`, `plan test --password-file`,
//! `--token-file`), and whether
//! other users of the host can read one (those, `--token-file`, `--tls-key`, `--etcd-key`).
//!
//! A credential file holds its secret on its first line that is not blank (a token file's
//! `#` lines are comments too); what follows is not the secret.
//!
//! One reader and one check for every such flag: the agent's password file was read whole
//! while etcd's was read by its first line, so a comment under the password (`pw` then
//! `# rotated ...`) was sent as part of it, and the agent retried "not reachable" for good.
use std::path::Path;

/// A credential file that cannot be used; names the flag and the file, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {path}: {reason}")]
pub struct CredentialFileError {
    pub flag: String,
    pub path: String,
    pub reason: String,
}

/// The password in `path`: see [`read_secret`].
pub fn read_password(flag: &str, path: &Path) -> Result<String, CredentialFileError> {
    read_secret(flag, path, "password", false)
}

/// The bearer token in `path` (`--token-file`): see [`read_secret`]. A token holds no
/// spaces, so those around it (an editor's) go too.
pub fn read_token(flag: &str, path: &Path) -> Result<String, CredentialFileError> {
    // (a token never begins with `#`: a line that does is a comment, alone or not)
    read_secret(flag, path, "token", true).map(|t| t.trim().to_string())
}

/// The secret (`what`: a password, a token) in `path`: its first line that is not blank
/// (nor, with `hash_comments`, a comment: `#` first, after any spaces), without its line end
/// (`\n` or `\r\n`) and without the byte-order mark an editor may have written first. Every
/// credential file reads so: a token file with a comment above the token was "not a token"
/// (it was read whole), and a password file's blank first line was its password.
///
/// A secret holding a control character (a CR left by an editor, a NUL) is refused: no
/// password or token holds one, the server refuses it for good, and a daemon retried
/// ("unreachable") forever. The error names the flag, the file and the line, never the secret.
///
/// `hash_comments`: lines beginning with `#` are comments (a token file's), else the first
/// line that is not blank is the secret whatever it begins with (a password's).
pub fn read_secret(
    flag: &str,
    path: &Path,
    what: &str,
    hash_comments: bool,
) -> Result<String, CredentialFileError> {
    let bad = |reason: String| CredentialFileError {
        flag: flag.to_string(),
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let text = text.trim_start_matches('\u{feff}');
    let mut lines = text.split('\n').enumerate().map(|(i, line)| {
        let line = line.strip_suffix('\r').unwrap_or(line);
        (i + 1, line)
    });
    // A password is the first line that is not blank, whatever it begins with (a generated
    // one may begin with `#`, and a note under it is not the password); a token file's `#`
    // lines are comments (a token never begins with one).
    let comment = |shown: &str| hash_comments && shown.starts_with('#');
    let secret = lines.find(|(_, line)| {
        let shown = line.trim();
        !shown.is_empty() && !comment(shown)
    });
    let Some((number, secret)) = secret else {
        return Err(bad(if text.trim().is_empty() {
            "the file is empty".into()
        } else {
            format!("the file holds no {what}: only comments (#) and blank lines")
        }));
    };
    if let Some(c) = secret.chars().find(|c| c.is_control() && *c != '\t') {
        let which = match c {
            '\r' => "a carriage return (CR: a file saved with old Mac line ends, or a stray ^M)"
                .to_string(),
            '\0' => "a NUL byte".to_string(),
            c => format!("a control character (U+{:04X})", c as u32),
        };
        return Err(bad(format!(
            "the {what} (line {number}) holds {which}, which no {what} holds: rewrite the file with the {what} alone on its line"
        )));
    }
    Ok(secret.to_string())
}

/// The permission bits of `path` when users other than its owner have any (group or
/// others: `mode & 0o077`); None when only the owner does, or the file cannot be looked at
/// (its reader says why), or off Unix.
pub fn open_to_others(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// What to say of a credential file others on the host can read, naming the flag, the
/// file and its mode; None when it is private. Said, not refused (as ssh says of a key):
/// the secret still works for whoever holds it, and refusing would not undo its exposure;
/// it would only stop a fleet whose secrets are mounted 0644 (Kubernetes' default mode).
pub fn exposure_warning(flag: &str, path: &Path) -> Option<String> {
    open_to_others(path).map(|mode| {
        format!(
            "{flag} {} can be read by other users of this host (mode {mode:04o}): chmod 600 it",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("flotilla-credfiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The password is the first line: a note under it is not sent (it was, and the
    /// server refused "saslprep ProhibitedCharacter('\n')" for good); CR and a BOM go.
    #[test]
    fn a_password_is_the_first_line_of_its_file() {
        for (name, text) in [
            ("plain", "pw\n"),
            ("bare", "pw"),
            ("noted", "pw\n# rotated 2026-12-01\n"),
            ("crlf", "pw\r\n# rotated\r\n"),
            ("bom", "\u{feff}pw\n"),
        ] {
            let path = file(name, text);
            assert_eq!(
                read_password("--password-file", &path).as_deref(),
                Ok("pw"),
                "{name}"
            );
        }
        // spaces are the password's own (they are allowed in passwords)
        let path = file("spaces", " p w \n");
        assert_eq!(read_password("--x", &path).as_deref(), Ok(" p w "));
    }

    /// Blank lines above the secret are skipped in every credential file, and `#` comments
    /// in a token file (one with a comment above its token was "not a token"); what follows
    /// a password is not it.
    #[test]
    fn blank_lines_above_the_secret_and_a_tokens_comments_are_skipped() {
        for (name, text) in [
            ("blank-first", "\r\npw\n"),
            ("noted-under", "\n  \npw\nrotated 2026-12-01 by ops\n"),
            ("crlf", "\u{feff}\r\n\r\npw\r\n# rotated\r\n"),
        ] {
            let path = file(name, text);
            assert_eq!(
                read_password("--password-file", &path).as_deref(),
                Ok("pw"),
                "{name}"
            );
        }
        let path = file("token", "# alice's token\n  flotilla_00ff  \n");
        assert_eq!(
            read_token("--token-file", &path).as_deref(),
            Ok("flotilla_00ff")
        );
    }

    #[test]
    fn a_file_without_a_secret_is_an_error_naming_the_flag_and_file() {
        let empty = file("empty", "\n");
        let e = read_password("--store-password-file", &empty).unwrap_err();
        assert_eq!(e.flag, "--store-password-file");
        assert!(
            e.to_string()
                .starts_with(&format!("--store-password-file {}", empty.display()))
        );
        assert!(e.reason.contains("the file is empty"), "{e}");
        let only_comments = file("only-comments", "# token of alice\n\n# rotated\n");
        let e = read_token("--token-file", &only_comments).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "--token-file {}: the file holds no token: only comments (#) and blank lines",
                only_comments.display()
            )
        );
        // a password that begins with `#` is the password, a note under it is not (the
        // merged reader skipped it as a comment, and sent the note)
        let hashed = file(
            "hashed",
            "#Xy7!pw\nrotated 2026-12-01 by ops\n# and a comment\n",
        );
        assert_eq!(
            read_password("--password-file", &hashed).as_deref(),
            Ok("#Xy7!pw")
        );
        let e = read_password("--password-file", Path::new("/nonexistent/pw")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--password-file /nonexistent/pw: "),
            "{e}"
        );
    }

    /// A CR inside the password (old Mac line ends, a stray ^M) or a NUL: refused, naming the
    /// file, the line and the character, never the password (etcd's agent retried it as
    /// "unreachable" for good).
    #[test]
    fn a_secret_holding_a_cr_or_nul_is_refused_without_showing_it() {
        for (name, text, which) in [
            ("cr", "secret-pw\r\r\n", "a carriage return (CR"),
            ("old-mac", "secret-pw\r# note\r", "a carriage return (CR"),
            ("nul", "\nsecret\0pw\n", "a NUL byte"),
            ("bell", "secret\u{7}pw", "a control character (U+0007)"),
        ] {
            let path = file(name, text);
            let e = read_password("--etcd-password-file", &path).unwrap_err();
            let said = e.to_string();
            assert!(
                said.starts_with(&format!(
                    "--etcd-password-file {}: the password (line ",
                    path.display()
                )) && said.contains(which),
                "{name}: {said}"
            );
            assert!(!said.contains("secret"), "{name}: {said}");
        }
        // a tab is a password's own
        let path = file("tab", "p\tw\n");
        assert_eq!(read_password("--x", &path).as_deref(), Ok("p\tw"));
    }

    #[cfg(unix)]
    #[test]
    fn a_credential_file_others_can_read_is_named_with_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let path = file("mode", "pw\n");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(exposure_warning("--tls-key", &path), None);
        for mode in [0o640, 0o604, 0o644, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let w = exposure_warning("--tls-key", &path).expect("said");
            assert!(
                w.starts_with(&format!("--tls-key {} ", path.display()))
                    && w.contains(&format!("(mode {mode:04o})")),
                "{w}"
            );
        }
        assert_eq!(open_to_others(Path::new("/nonexistent/key")), None);
    }
}
