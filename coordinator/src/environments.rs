//! Environments: the ordered list a change is promoted through (`dev, staging,
//! production`), and which shards belong to each, by a shard label (`env=staging`).
//! Given by `flotilla coordinator --environments dev,staging,production` or read once
//! at start from a TOML file, as the approval matrix is:
//!
//! ```toml
//! environments = ["dev", "staging", "production"]   # in promotion order
//! label = "env"                                     # the shard label naming a shard's environment
//! ```
//!
//! A plan for an environment touches only that environment's shards, and is admitted only
//! once every migration it carries has completed in the environment before it (see
//! `admission::promotion`). Without environments, a plan's `environment` is a name only.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// The label key naming a shard's environment when none is given.
pub const DEFAULT_LABEL: &str = "env";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environments {
    /// In promotion order; empty: no environments configured.
    pub order: Vec<String>,
    /// The shard label whose value is the shard's environment.
    pub label: String,
}

impl Default for Environments {
    fn default() -> Environments {
        Environments {
            order: Vec::new(),
            label: DEFAULT_LABEL.to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    environments: Vec<String>,
    #[serde(default)]
    label: Option<String>,
}

impl Environments {
    /// From `--environments a,b,c` and `--environment-label KEY`; names are checked (none
    /// empty, none twice, none with characters a label value cannot hold).
    pub fn new(order: &[String], label: &str) -> Result<Environments, String> {
        let label = label.trim();
        if label.is_empty() {
            return Err("the environment label is empty (e.g. --environment-label env)".into());
        }
        let mut out = Environments {
            order: Vec::new(),
            label: label.to_string(),
        };
        for (i, name) in order.iter().enumerate() {
            let name = name.trim();
            if name.is_empty() {
                return Err(format!("environment #{} has no name", i + 1));
            }
            if let Some(bad) = name
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            {
                return Err(format!(
                    "environment `{name}`: `{bad}` is not allowed (letters, digits, - _ .)"
                ));
            }
            if out.order.iter().any(|e| e == name) {
                return Err(format!("environment `{name}` is listed twice"));
            }
            out.order.push(name.to_string());
        }
        Ok(out)
    }

    /// Reads the TOML file (`environments = [...]`, optional `label`); `label` (from the
    /// command line) applies when the file names none.
    pub fn load(path: &Path, label: &str) -> Result<Environments, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("environments file {}: {e}", path.display()))?;
        let file: File = toml::from_str(&text)
            .map_err(|e| format!("environments file {}: {e}", path.display()))?;
        if file.environments.is_empty() {
            return Err(format!(
                "environments file {}: `environments` lists none",
                path.display()
            ));
        }
        Environments::new(&file.environments, file.label.as_deref().unwrap_or(label))
            .map_err(|e| format!("environments file {}: {e}", path.display()))
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Where `environment` is in the promotion order.
    pub fn position(&self, environment: &str) -> Option<usize> {
        self.order.iter().position(|e| e == environment)
    }

    /// The environment a plan for `environment` is promoted from (None: the first).
    pub fn before(&self, environment: &str) -> Option<&str> {
        match self.position(environment)? {
            0 => None,
            i => Some(self.order[i - 1].as_str()),
        }
    }

    /// The environment a shard with these labels belongs to, if one of the known ones.
    pub fn of_shard<'a>(&'a self, labels: &BTreeMap<String, String>) -> Option<&'a str> {
        let value = labels.get(&self.label)?;
        self.order.iter().find(|e| *e == value).map(String::as_str)
    }

    /// Whether a plan for `environment` may touch a shard with these labels: always without
    /// configured environments (or for a plan that names none), else only its own shards.
    pub fn admits(&self, environment: &str, labels: &BTreeMap<String, String>) -> bool {
        self.is_empty() || environment.is_empty() || self.of_shard(labels) == Some(environment)
    }

    /// `dev, staging, production`, for messages.
    pub fn names(&self) -> String {
        self.order.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envs() -> Environments {
        Environments::new(
            &["dev".into(), "staging".into(), "production".into()],
            "env",
        )
        .unwrap()
    }

    #[test]
    fn the_order_says_where_a_plan_is_promoted_from() {
        let e = envs();
        assert_eq!(e.before("dev"), None);
        assert_eq!(e.before("staging"), Some("dev"));
        assert_eq!(e.before("production"), Some("staging"));
        assert_eq!(e.position("qa"), None);
        assert_eq!(e.names(), "dev, staging, production");
    }

    #[test]
    fn a_shard_belongs_to_the_environment_its_label_names() {
        let e = envs();
        let staging = BTreeMap::from([("env".to_string(), "staging".to_string())]);
        let unknown = BTreeMap::from([("env".to_string(), "qa".to_string())]);
        assert_eq!(e.of_shard(&staging), Some("staging"));
        assert_eq!(e.of_shard(&unknown), None);
        assert!(e.admits("staging", &staging));
        assert!(!e.admits("production", &staging));
        assert!(!e.admits("staging", &BTreeMap::new()));
        assert!(Environments::default().admits("production", &staging));
    }

    #[test]
    fn bad_lists_are_refused_by_name() {
        let dup = Environments::new(&["a".into(), "a".into()], "env").unwrap_err();
        assert!(dup.contains("`a` is listed twice"), "{dup}");
        let empty = Environments::new(&["a".into(), " ".into()], "env").unwrap_err();
        assert!(empty.contains("#2 has no name"), "{empty}");
        let odd = Environments::new(&["pro d".into()], "env").unwrap_err();
        assert!(odd.contains("`pro d`"), "{odd}");
        assert!(Environments::new(&["a".into()], " ").is_err());
    }

    #[test]
    fn a_file_lists_them_in_order_with_its_label() {
        let dir = std::env::temp_dir().join(format!("flotilla-envs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("environments.toml");
        std::fs::write(
            &path,
            "environments = [\"dev\", \"prod\"]\nlabel = \"stage\"\n",
        )
        .unwrap();
        let e = Environments::load(&path, "env").unwrap();
        assert_eq!(e.order, ["dev", "prod"]);
        assert_eq!(e.label, "stage");
        std::fs::write(&path, "environment = [\"dev\"]\n").unwrap();
        let err = Environments::load(&path, "env").unwrap_err();
        assert!(err.contains("environments.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
