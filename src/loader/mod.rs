//! Reads migration directories (Flotilla's own format and dbmate's) and plan files
//! into the wire form of a plan (`pb::PlanSpec`).
use std::path::Path;

use flotilla_proto::pb;

/// Flags from `plan submit` that override the plan file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub max_parallel: Option<u32>,
    pub selector: Option<String>,
    pub policy: Option<String>,
    /// "shard" or "tenant"
    pub scope: Option<String>,
    pub no_fuse: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Loads a plan from a migration directory, or from a plan file whose migrations sit beside it.
pub fn load(path: &Path, overrides: &Overrides) -> Result<pb::PlanSpec, LoadError> {
    let _ = overrides;
    Err(LoadError::Invalid { path: path.display().to_string(), message: "not implemented".into() })
}
