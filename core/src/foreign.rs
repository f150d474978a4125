//! Other migration tools' histories (dbmate, golang-migrate, Flyway): which of a
//! directory's migrations each says it applied, so a fleet those tools migrated can be
//! adopted (`fleet baseline`) instead of every old migration running again.
//!
//! Each tool keys its history by a version taken from the file name, and Flotilla reads
//! their directories unchanged, so a migration's id carries that version:
//! - dbmate: `schema_migrations(version)`, one row per applied file; the version is the
//!   file name's leading digits as written (`20250131160000`).
//! - golang-migrate: `schema_migrations(version bigint, dirty boolean)`, one row: the
//!   last version applied, every lower one applied before it; `dirty` says the last one
//!   failed halfway, which only a person can sort out.
//! - Flyway: `flyway_schema_history`, one row per run with `version`, `type` and
//!   `success`; a failed row likewise needs a person (`flyway repair`).
use std::collections::BTreeSet;
use std::fmt;

/// A tool whose history a baseline reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tool {
    Dbmate,
    GolangMigrate,
    Flyway,
}

impl Tool {
    pub const ALL: [Tool; 3] = [Tool::Dbmate, Tool::GolangMigrate, Tool::Flyway];

    pub fn as_str(self) -> &'static str {
        match self {
            Tool::Dbmate => "dbmate",
            Tool::GolangMigrate => "golang-migrate",
            Tool::Flyway => "flyway",
        }
    }

    pub fn parse(s: &str) -> Option<Tool> {
        Tool::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The table the tool keeps its history in (by default).
    pub fn table(self) -> &'static str {
        match self {
            Tool::Dbmate | Tool::GolangMigrate => "schema_migrations",
            Tool::Flyway => "flyway_schema_history",
        }
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Flyway version: numbers separated by `.` or `_`, trailing zeros dropped so that
/// `1.0` equals `1`, as Flyway compares them. None if `text` is not one.
pub fn flyway_version(text: &str) -> Option<Vec<u64>> {
    let mut parts = Vec::new();
    for part in text.split(['.', '_']) {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        parts.push(part.parse::<u64>().ok()?);
    }
    while parts.last() == Some(&0) {
        parts.pop();
    }
    Some(parts)
}

/// The version an id carries for `tool`, if it carries one: the leading digits (dbmate,
/// golang-migrate), or what follows `V` up to `__` (Flyway).
pub fn id_version(tool: Tool, id: &str) -> Option<Version> {
    match tool {
        Tool::Dbmate | Tool::GolangMigrate => {
            let digits = id.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || (id.len() > digits && id.as_bytes()[digits] != b'_') {
                return None;
            }
            let text = &id[..digits];
            Some(if tool == Tool::Dbmate {
                Version::Text(text.to_string())
            } else {
                Version::Number(text.parse().ok()?)
            })
        }
        Tool::Flyway => {
            let rest = id.strip_prefix('V')?;
            let (version, _) = rest.split_once("__")?;
            flyway_version(version).map(Version::Parts)
        }
    }
}

/// A version as each tool writes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    /// dbmate: the digits as written.
    Text(String),
    /// golang-migrate: a number.
    Number(u64),
    /// Flyway: its parts.
    Parts(Vec<u64>),
}

/// What one target's history of one tool says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum History {
    /// dbmate: the versions applied.
    Dbmate(BTreeSet<String>),
    /// golang-migrate: the last version applied (None: the table is empty).
    GolangMigrate { version: Option<u64>, dirty: bool },
    /// Flyway: the versions applied (undone ones removed), the version a baseline row
    /// stands for (everything up to it counts as applied), and the first failed run.
    Flyway {
        applied: BTreeSet<Vec<u64>>,
        baseline: Option<Vec<u64>>,
        failed: Option<String>,
    },
}

/// One row of `flyway_schema_history`, as read (ordered by `installed_rank`).
#[derive(Debug, Clone)]
pub struct FlywayRow {
    pub version: Option<String>,
    pub kind: String,
    pub success: bool,
}

impl History {
    pub fn tool(&self) -> Tool {
        match self {
            History::Dbmate(_) => Tool::Dbmate,
            History::GolangMigrate { .. } => Tool::GolangMigrate,
            History::Flyway { .. } => Tool::Flyway,
        }
    }

    /// Flyway's rows in the order it ran them.
    pub fn from_flyway_rows(rows: &[FlywayRow]) -> History {
        let mut applied = BTreeSet::new();
        let mut baseline = None;
        let mut failed = None;
        for r in rows {
            // Repeatable runs (no version) and the schema-creation marker carry nothing.
            let Some(v) = r.version.as_deref().and_then(flyway_version) else {
                continue;
            };
            if !r.success {
                failed.get_or_insert_with(|| r.version.clone().unwrap_or_default());
                continue;
            }
            match r.kind.as_str() {
                "SCHEMA" => {}
                "BASELINE" => baseline = Some(v),
                // An undo (Teams) or a deleted row (`flyway repair`) takes it back.
                "UNDO_SQL" | "UNDO_JDBC" | "UNDO_SCRIPT" | "DELETE" => {
                    applied.remove(&v);
                }
                _ => {
                    applied.insert(v);
                }
            }
        }
        History::Flyway {
            applied,
            baseline,
            failed,
        }
    }

    /// Why the history cannot be trusted as it is, naming what a person must fix first.
    pub fn refusal(&self) -> Option<String> {
        match self {
            History::GolangMigrate {
                version: Some(v),
                dirty: true,
            } => Some(format!(
                "golang-migrate's schema_migrations is dirty at version {v}: that migration \
                 failed halfway; fix the schema and run `migrate force VERSION` first"
            )),
            History::Flyway {
                failed: Some(v), ..
            } => Some(format!(
                "flyway_schema_history has a failed run of version {v}: fix the schema and run \
                 `flyway repair` first"
            )),
            _ => None,
        }
    }

    /// Whether the tool applied the migration `id`.
    pub fn applied(&self, id: &str) -> bool {
        let Some(version) = id_version(self.tool(), id) else {
            return false;
        };
        match (self, version) {
            (History::Dbmate(versions), Version::Text(v)) => versions.contains(&v),
            (
                History::GolangMigrate {
                    version: Some(last),
                    ..
                },
                Version::Number(v),
            ) => v <= *last,
            (
                History::Flyway {
                    applied, baseline, ..
                },
                Version::Parts(v),
            ) => applied.contains(&v) || baseline.as_ref().is_some_and(|b| v <= *b),
            _ => false,
        }
    }

    /// The history's versions that none of `ids` carries (applied by the tool from files
    /// this directory does not hold), as the tool writes them.
    pub fn unknown<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let tool = self.tool();
        let known: BTreeSet<Version> = ids
            .into_iter()
            .filter_map(|id| id_version(tool, id))
            .collect();
        match self {
            History::Dbmate(versions) => versions
                .iter()
                .filter(|v| !known.contains(&Version::Text((*v).clone())))
                .cloned()
                .collect(),
            History::GolangMigrate {
                version: Some(v), ..
            } => {
                if known.contains(&Version::Number(*v)) {
                    Vec::new()
                } else {
                    vec![v.to_string()]
                }
            }
            History::GolangMigrate { version: None, .. } => Vec::new(),
            History::Flyway { applied, .. } => applied
                .iter()
                .filter(|v| !known.contains(&Version::Parts((*v).clone())))
                .map(|v| {
                    if v.is_empty() {
                        "0".to_string()
                    } else {
                        v.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_each_tools_version() {
        assert_eq!(
            id_version(Tool::Dbmate, "20250131160000_add"),
            Some(Version::Text("20250131160000".into()))
        );
        assert_eq!(id_version(Tool::Dbmate, "2025.01.31_160000_x"), None);
        assert_eq!(
            id_version(Tool::GolangMigrate, "000042_add"),
            Some(Version::Number(42))
        );
        assert_eq!(
            id_version(Tool::Flyway, "V1_1__add"),
            Some(Version::Parts(vec![1, 1]))
        );
        assert_eq!(
            id_version(Tool::Flyway, "V1.0__add"),
            Some(Version::Parts(vec![1]))
        );
        assert_eq!(id_version(Tool::Flyway, "20250131_x"), None);
    }

    #[test]
    fn dbmate_history_matches_the_versions_it_holds() {
        let h = History::Dbmate(["20250101000000".to_string()].into());
        assert!(h.applied("20250101000000_a"));
        assert!(!h.applied("20250102000000_b"));
        assert_eq!(h.unknown(["20250102000000_b"]), ["20250101000000"]);
        assert!(h.refusal().is_none());
    }

    #[test]
    fn golang_migrate_history_holds_everything_up_to_its_version() {
        let h = History::GolangMigrate {
            version: Some(2),
            dirty: false,
        };
        assert!(h.applied("1_a") && h.applied("000002_b") && !h.applied("3_c"));
        assert!(h.unknown(["1_a", "2_b"]).is_empty());
        let dirty = History::GolangMigrate {
            version: Some(2),
            dirty: true,
        };
        assert!(dirty.refusal().unwrap().contains("dirty at version 2"));
        let empty = History::GolangMigrate {
            version: None,
            dirty: false,
        };
        assert!(!empty.applied("1_a"));
    }

    #[test]
    fn flyway_history_follows_runs_undos_baselines_and_failures() {
        let row = |v: Option<&str>, kind: &str, success: bool| FlywayRow {
            version: v.map(str::to_string),
            kind: kind.into(),
            success,
        };
        let h = History::from_flyway_rows(&[
            row(Some("0"), "SCHEMA", true),
            row(Some("1"), "SQL", true),
            row(Some("1.1"), "SQL", true),
            row(None, "SQL", true), // a repeatable
            row(Some("1.1"), "UNDO_SQL", true),
            row(Some("2"), "SQL", true),
        ]);
        assert!(h.applied("V1__a") && h.applied("V1.0__a") && !h.applied("V1.1__b"));
        assert!(h.applied("V2__c") && !h.applied("V3__d"));
        assert_eq!(h.unknown(["V1__a"]), ["2"]);
        assert!(h.refusal().is_none());

        let based = History::from_flyway_rows(&[row(Some("5"), "BASELINE", true)]);
        assert!(based.applied("V4_9__x") && based.applied("V5__y") && !based.applied("V5.1__z"));

        let failed =
            History::from_flyway_rows(&[row(Some("1"), "SQL", true), row(Some("2"), "SQL", false)]);
        assert!(
            failed
                .refusal()
                .unwrap()
                .contains("failed run of version 2")
        );
    }
}
