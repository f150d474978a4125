//! Reads migration directories (Flotilla's own format and dbmate's) and plan files
//! into the wire form of a plan (`pb::PlanSpec`).
//!
//! The loader reports what is wrong with a *file* (unreadable, malformed, unknown keys,
//! unterminated quotes, missing `up.sql`), naming the file and, where it can, the line.
//! Whether the plan as a whole makes sense (cycles, unknown dependencies, transaction
//! modes) is decided by `flotilla_proto::PlanSpec::try_from`, which every plan goes
//! through on receipt anyway. See docs/file-formats.md.
use std::fs;
use std::path::Path;

use flotilla_proto::pb;
use flotilla_proto::selector::Selector;
use flotilla_proto::{FailurePolicy, Scope};

mod dbmate;
mod dir;
mod native;
mod plan;
#[cfg(test)]
mod tests;

/// The plan file that a migration directory may hold.
pub const PLAN_FILE: &str = "plan.toml";

/// Flags from `plan submit` that override the plan file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub max_parallel: Option<u32>,
    pub selector: Option<String>,
    pub policy: Option<String>,
    /// "shard" or "tenant"
    pub scope: Option<String>,
    pub no_fuse: bool,
    /// `--atomic`: two-phase commit across shards.
    pub atomic: bool,
}

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
    fn invalid(path: &Path, message: impl Into<String>) -> LoadError {
        LoadError::Invalid {
            path: path.display().to_string(),
            message: message.into(),
        }
    }

    fn at_line(path: &Path, line: usize, message: impl Into<String>) -> LoadError {
        LoadError::AtLine {
            path: path.display().to_string(),
            line,
            message: message.into(),
        }
    }

    /// An error at byte `offset` of `text`, the content of `path`.
    fn at(path: &Path, text: &str, offset: usize, message: impl Into<String>) -> LoadError {
        LoadError::at_line(path, line_of(text, offset), message)
    }

    fn io(path: &Path, error: std::io::Error) -> LoadError {
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
fn line_of(text: &str, offset: usize) -> usize {
    1 + text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// A file's text, without the byte-order mark some editors add: it is not SQL, and must
/// neither hide a dbmate marker nor change a checksum.
fn read_text(path: &Path) -> Result<String, LoadError> {
    let text = fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Parses TOML, turning an error into one that names the file, line and key.
fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, LoadError> {
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

/// Loads a plan from a migration directory, or from a plan file whose migrations sit beside it.
pub fn load(path: &Path, overrides: &Overrides) -> Result<pb::PlanSpec, LoadError> {
    let meta = fs::metadata(path).map_err(|e| LoadError::io(path, e))?;
    let mut spec = if meta.is_dir() {
        let plan_file = path.join(PLAN_FILE);
        if plan_file.is_file() {
            plan::load(&plan_file)?
        } else {
            plan::from_directory(path)?
        }
    } else if path.extension().is_some_and(|e| e == "toml") {
        plan::load(path)?
    } else {
        return Err(LoadError::invalid(
            path,
            "expected a migration directory or a plan file (*.toml)",
        ));
    };
    spec.source = path.display().to_string();
    chain_when_unordered(&mut spec);
    apply(&mut spec, overrides)?;
    Ok(spec)
}

/// A plan that says nothing about order (no parallel groups, no dependencies,
/// no `depends_on`) runs its migrations in id order on each target, as every
/// single-database tool (dbmate included) would: each waits for the one before.
fn chain_when_unordered(spec: &mut pb::PlanSpec) {
    let unordered = spec.parallel_groups.is_empty()
        && spec.dependencies.is_empty()
        && spec.migrations.iter().all(|m| m.depends_on.is_empty());
    if !unordered {
        return;
    }
    spec.dependencies = spec
        .migrations
        .windows(2)
        .map(|w| pb::Dependency {
            migration: w[1].id.clone(),
            depends_on: vec![w[0].id.clone()],
        })
        .collect();
}

/// Applies command-line overrides on top of what the plan file says.
fn apply(spec: &mut pb::PlanSpec, o: &Overrides) -> Result<(), LoadError> {
    if let Some(n) = o.max_parallel {
        if n == 0 {
            return Err(LoadError::Override {
                flag: "--max-parallel",
                message: "must be at least 1".into(),
            });
        }
        spec.max_parallel = n;
    }
    if let Some(s) = &o.selector {
        Selector::parse(s).map_err(|e| LoadError::Override {
            flag: "--selector",
            message: e.to_string(),
        })?;
        spec.selector = s.trim().to_string();
    }
    if let Some(p) = &o.policy {
        spec.policy = policy_enum(p).ok_or_else(|| LoadError::Override {
            flag: "--policy",
            message: unknown_policy(p),
        })? as i32;
    }
    if let Some(s) = &o.scope {
        spec.default_scope = scope_enum(s).ok_or_else(|| LoadError::Override {
            flag: "--scope",
            message: unknown_scope(s),
        })? as i32;
    }
    if o.atomic {
        spec.atomic = true;
    }
    if o.no_fuse {
        spec.no_fuse = true;
    }
    Ok(())
}

fn policy_enum(s: &str) -> Option<pb::FailurePolicy> {
    FailurePolicy::parse(s).map(|p| match p {
        FailurePolicy::AllOrNothing => pb::FailurePolicy::AllOrNothing,
        FailurePolicy::Stop => pb::FailurePolicy::Stop,
        FailurePolicy::Continue => pb::FailurePolicy::Continue,
    })
}

fn unknown_policy(s: &str) -> String {
    format!("unknown failure policy `{s}`: use all-or-nothing, stop or continue")
}

/// A scope name; `auto` (or empty) leaves the choice to the coordinator.
fn scope_enum(s: &str) -> Option<pb::Scope> {
    if matches!(s.trim().to_ascii_lowercase().as_str(), "" | "auto") {
        return Some(pb::Scope::Unspecified);
    }
    Scope::parse(s).map(|s| match s {
        Scope::Shard => pb::Scope::Shard,
        Scope::Tenant => pb::Scope::Tenant,
    })
}

fn unknown_scope(s: &str) -> String {
    format!("unknown scope `{s}`: use tenant, shard or auto")
}
