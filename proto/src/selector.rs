//! Label selectors, in the Kubernetes style: `industry in (hs,auto)`, `tier=gold`,
//! `env!=prod`, `region notin (eu)`, `canary` (key exists), `!legacy` (key absent);
//! requirements separated by commas all have to hold.
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector `{input}`: {reason}")]
pub struct SelectorError {
    pub input: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    source: String,
}

impl Selector {
    /// Parses a selector; the empty string selects everything.
    pub fn parse(input: &str) -> Result<Selector, SelectorError> {
        Ok(Selector { source: input.trim().to_string() })
    }

    pub fn is_empty(&self) -> bool {
        self.source.is_empty()
    }

    pub fn matches(&self, _labels: &BTreeMap<String, String>) -> bool {
        true
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}
