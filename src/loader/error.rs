//! What the loader reports about a file, and the file-reading helpers every reader shares.
use std::fs;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{path}:{line}: {message}")]
    AtLine {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("invalid {flag}: {message}")]
    Override { flag: &'static str, message: String },
}

impl LoadError {
    pub(super) fn invalid(path: &Path, message: impl Into<String>) -> LoadError {
        LoadError::Invalid {
            path: path.display().to_string(),
            message: message.into(),
        }
    }

    pub(super) fn at_line(path: &Path, line: usize, message: impl Into<String>) -> LoadError {
        LoadError::AtLine {
            path: path.display().to_string(),
            line,
            message: message.into(),
        }
    }

    /// An error at byte `offset` of `text`, the content of `path`.
    pub(super) fn at(
        path: &Path,
        text: &str,
        offset: usize,
        message: impl Into<String>,
    ) -> LoadError {
        LoadError::at_line(path, line_of(text, offset), message)
    }

    pub(super) fn io(path: &Path, error: std::io::Error) -> LoadError {
        LoadError::Io {
            path: path.display().to_string(),
            error,
        }
    }

    /// The file (and line, when known) this error is about, if it is about one.
    pub fn path(&self) -> Option<&str> {
        match self {
            LoadError::Invalid { path, .. }
            | LoadError::AtLine { path, .. }
            | LoadError::Io { path, .. } => Some(path),
            LoadError::Override { .. } => None,
        }
    }
}

/// The 1-based line holding byte `offset` of `text`.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    1 + text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// A file's text, without the byte-order mark some editors add: it is not SQL, and must
/// neither hide a dbmate marker nor change a checksum.
pub(super) fn read_text(path: &Path) -> Result<String, LoadError> {
    let bytes = fs::read(path).map_err(|e| LoadError::io(path, e))?;
    // Not UTF-8 (a file saved as Latin-1, say): where, so that it can be found (it said
    // "stream did not contain valid UTF-8" of the whole file).
    let text = String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        let line_start = bytes[..at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |n| n + 1);
        // in characters, as an editor counts them (what comes before `at` is UTF-8), past a
        // byte-order mark an editor does not show
        let before = std::str::from_utf8(&bytes[line_start..at]).unwrap_or_default();
        let before = if line_start == 0 {
            before.trim_start_matches('\u{feff}')
        } else {
            before
        };
        let column = 1 + before.chars().count();
        LoadError::at_line(
            path,
            line,
            format!(
                "not UTF-8: byte 0x{:02x} at column {column} (offset {at} in the file); save it \
                 as UTF-8",
                bytes[at]
            ),
        )
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Parses TOML, turning an error into one that names the file, line and key.
pub(super) fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, LoadError> {
    toml::from_str(text).map_err(|e| {
        let message = match toml_key(&e) {
            Some(key) => format!("`{key}`: {}", e.message()),
            None => e.message().to_string(),
        };
        match e.span() {
            Some(span) => LoadError::at(path, text, span.start, message),
            None => LoadError::invalid(path, message),
        }
    })
}

/// The dotted key a TOML error is about. The toml crate keeps it private but prints it
/// (`in `a.b``) when the error carries no input to quote, so print a copy without it.
fn toml_key(e: &toml::de::Error) -> Option<String> {
    let mut bare = e.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    shown
        .lines()
        .find_map(|l| l.strip_prefix("in `")?.strip_suffix('`'))
        .map(str::to_string)
}
