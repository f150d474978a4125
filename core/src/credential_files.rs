//! Files that hold credentials: how a password is read from one (`--password-file`,
//! `--store-password-file`, `--etcd-password-file`, `plan test --password-file`), and whether
//! other users of the host can read one (those, `--token-file`, `--tls-key`, `--etcd-key`).
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

/// The password in `path`: its first line, without its line end (`\n` or `\r\n`) and
/// without the byte-order mark an editor may have written first. What follows the first
/// line (a comment, a rotation note) is not the password. An empty first line is an error
/// (a secret not mounted yet, or a blank line left above the password), not "no password".
pub fn read_password(flag: &str, path: &Path) -> Result<String, CredentialFileError> {
    let bad = |reason: String| CredentialFileError {
        flag: flag.to_string(),
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let first = text
        .trim_start_matches('\u{feff}')
        .split('\n')
        .next()
        .unwrap_or("")
        .trim_end_matches('\r');
    if first.is_empty() {
        return Err(bad(if text.trim().is_empty() {
            "the file is empty".into()
        } else {
            "the first line is empty (the password is the file's first line)".into()
        }));
    }
    Ok(first.to_string())
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

    #[test]
    fn an_empty_first_line_is_an_error_naming_the_flag_and_file() {
        let empty = file("empty", "\n");
        let e = read_password("--store-password-file", &empty).unwrap_err();
        assert_eq!(e.flag, "--store-password-file");
        assert!(
            e.to_string()
                .starts_with(&format!("--store-password-file {}", empty.display()))
        );
        assert!(e.reason.contains("the file is empty"), "{e}");
        let blank_first = file("blank-first", "\r\npw\n");
        let e = read_password("--etcd-password-file", &blank_first).unwrap_err();
        assert!(e.to_string().contains("--etcd-password-file"), "{e}");
        assert!(e.reason.contains("the first line is empty"), "{e}");
        assert!(!e.to_string().contains("pw\n"), "{e}");
        let e = read_password("--password-file", Path::new("/nonexistent/pw")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--password-file /nonexistent/pw: "),
            "{e}"
        );
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
