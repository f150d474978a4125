//! The approval matrix: per environment and risk level, how many people must approve a
//! plan before it touches anything, and in which roles. Read once at start from a TOML
//! file (`flotilla coordinator --approvals FILE`); a plan whose rule asks for approvals
//! is stored `awaiting_approval` and starts after the last one.
//!
//! ```toml
//! [[rule]]
//! environment = "production"   # a plan's `environment`, or "*"
//! risk = "high"                # low | medium | high | critical, or "*"
//! approvals = 2                # distinct approvers, never the submitter
//! roles = ["dba", "lead"]      # roles whose approval counts (empty: any role)
//! require = ["dba"]            # of the approvers, at least one of each of these roles
//! ```
//!
//! The rule that applies is the most specific that matches (a named environment before
//! "*", then a named risk before "*"); a plan no rule matches needs no approval.
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use toml::Spanned;

/// How risky a migration says it is (`risk` in its file); a plan's is its riskiest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Risk {
    Low,
    Medium,
    High,
    Critical,
}

impl Risk {
    pub const ALL: [Risk; 4] = [Risk::Low, Risk::Medium, Risk::High, Risk::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::Medium => "medium",
            Risk::High => "high",
            Risk::Critical => "critical",
        }
    }
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Risk {
    type Err = String;
    fn from_str(s: &str) -> Result<Risk, String> {
        Risk::ALL
            .into_iter()
            .find(|r| r.as_str() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("risk `{s}` is not one of low, medium, high, critical"))
    }
}

/// A plan's risk: the highest of its migrations' (a migration that says none is low). A
/// migration that says `destructive = true` counts as high at least: the flag lets its drops
/// through the lint as risk high does, so it must not also cut the approvals they need.
pub fn plan_risk(spec: &flotilla_core::PlanSpec) -> Result<Risk, String> {
    let mut risk = Risk::Low;
    for m in &spec.migrations {
        let r = migration_risk(&m.risk, counts_destructive(m.destructive, &m.lint_ignore))
            .map_err(|e| format!("migration `{}`: {e}", m.id))?;
        risk = risk.max(r);
    }
    Ok(risk)
}

/// Whether a migration counts as `destructive = true` for its risk: it says so, or its
/// `[lint] ignore` names `destructive-drop`. Ignoring the rule lets its drops through the
/// lint as the flag does, so it counts as the flag does: before, a `DROP TABLE` whose
/// migration ignored the rule stayed risk `low` and ran in an environment whose `high`
/// rule asks for approvals with none.
pub fn counts_destructive<I: HasRule>(destructive: bool, lint_ignore: &[I]) -> bool {
    destructive
        || lint_ignore
            .iter()
            .any(|i| i.rule() == flotilla_core::lint::DESTRUCTIVE_DROP)
}

/// A `[lint] ignore` entry, as read or as stored.
pub trait HasRule {
    fn rule(&self) -> &str;
}

impl HasRule for flotilla_core::model::LintIgnore {
    fn rule(&self) -> &str {
        &self.rule
    }
}

impl HasRule for flotilla_core::pb::LintIgnore {
    fn rule(&self) -> &str {
        &self.rule
    }
}

/// One migration's risk as the approvals count it: its `risk` (low when unset), high at
/// least when it says `destructive = true`.
pub fn migration_risk(risk: &str, destructive: bool) -> Result<Risk, String> {
    let said = if risk.is_empty() {
        Risk::Low
    } else {
        risk.parse::<Risk>()?
    };
    Ok(if destructive {
        said.max(Risk::High)
    } else {
        said
    })
}

/// One rule of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// An environment's name, or None for every one ("*").
    pub environment: Option<String>,
    /// A risk level, or None for every one ("*").
    pub risk: Option<Risk>,
    /// Distinct approvers needed (0: none).
    pub approvals: u32,
    /// Roles whose approval counts; empty: any role.
    pub roles: Vec<String>,
    /// Of the approvers, at least one in each of these roles.
    pub require: Vec<String>,
    /// Where the rule is in its file (for messages).
    pub line: usize,
}

impl Rule {
    pub fn accepts(&self, role: &str) -> bool {
        self.roles.is_empty() || self.roles.iter().any(|r| r == role)
    }

    /// Whether these approvals (approver, role) are enough, and if not what is missing.
    pub fn missing(&self, approvals: &[(String, String)]) -> Option<String> {
        let have = approvals.len() as u32;
        let mut lacking = Vec::new();
        if have < self.approvals {
            lacking.push(format!("{} more approval(s)", self.approvals - have));
        }
        for role in &self.require {
            if !approvals.iter().any(|(_, r)| r == role) {
                lacking.push(format!("one from the `{role}` role"));
            }
        }
        (!lacking.is_empty()).then(|| lacking.join(" and "))
    }

    /// What the rule asks for, in words: `2 approvals (roles dba, lead; at least one dba)`.
    pub fn describe(&self) -> String {
        let mut out = format!("{} approval(s)", self.approvals);
        let mut parts = Vec::new();
        if !self.roles.is_empty() {
            parts.push(format!("roles {}", self.roles.join(", ")));
        }
        if !self.require.is_empty() {
            parts.push(format!("at least one {}", self.require.join(", one ")));
        }
        if !parts.is_empty() {
            out.push_str(&format!(" ({})", parts.join("; ")));
        }
        out
    }

    fn specificity(&self) -> u8 {
        (self.environment.is_some() as u8) * 2 + self.risk.is_some() as u8
    }
}

/// The approval matrix (empty: no plan needs approval).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matrix {
    pub rules: Vec<Rule>,
}

impl Matrix {
    /// The rule for a plan of `environment` and `risk`, if one asks for approvals.
    pub fn rule(&self, environment: &str, risk: Risk) -> Option<&Rule> {
        self.rules
            .iter()
            .filter(|r| r.environment.as_deref().is_none_or(|e| e == environment))
            .filter(|r| r.risk.is_none_or(|k| k == risk))
            .max_by_key(|r| r.specificity())
            .filter(|r| r.approvals > 0 || !r.require.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The environments the rules name (not `*`), sorted, each once.
    pub fn environments(&self) -> Vec<&str> {
        let named: std::collections::BTreeSet<&str> = self
            .rules
            .iter()
            .filter_map(|r| r.environment.as_deref())
            .collect();
        named.into_iter().collect()
    }

    /// Reads and checks an approvals file; errors name the file and line.
    pub fn load(path: &Path) -> Result<Matrix, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("approvals file {}: {e}", path.display()))?;
        Matrix::parse(&text).map_err(|e| format!("approvals file {}: {e}", path.display()))
    }

    /// Parses an approvals file's text; errors name the line.
    pub fn parse(text: &str) -> Result<Matrix, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            rule: Vec<Spanned<RawRule>>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawRule {
            environment: Spanned<String>,
            risk: Spanned<String>,
            approvals: Spanned<i64>,
            #[serde(default)]
            roles: Vec<Spanned<String>>,
            #[serde(default)]
            require: Vec<Spanned<String>>,
        }
        // toml's own messages say `line N, column M` already.
        let file: File = toml::from_str(text).map_err(|e| e.to_string().trim().to_string())?;
        let line_of = |span: std::ops::Range<usize>| {
            text[..span.start.min(text.len())]
                .bytes()
                .filter(|b| *b == b'\n')
                .count()
                + 1
        };
        let mut rules: Vec<Rule> = Vec::new();
        for raw in file.rule {
            let line = line_of(raw.span());
            let raw = raw.into_inner();
            let at = |s: std::ops::Range<usize>, msg: String| format!("line {}: {msg}", line_of(s));
            let environment = match raw.environment.get_ref().trim() {
                "" => {
                    return Err(at(
                        raw.environment.span(),
                        "environment is empty (name one, or \"*\" for every one)".into(),
                    ));
                }
                "*" => None,
                e => Some(e.to_string()),
            };
            let risk = match raw.risk.get_ref().trim() {
                "*" => None,
                r => Some(r.parse::<Risk>().map_err(|e| at(raw.risk.span(), e))?),
            };
            let approvals = *raw.approvals.get_ref();
            if !(0..=100).contains(&approvals) {
                return Err(at(
                    raw.approvals.span(),
                    format!("approvals = {approvals}: give 0 to 100"),
                ));
            }
            let role_name = |r: &Spanned<String>| -> Result<String, String> {
                let name = r.get_ref().trim();
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(at(
                        r.span(),
                        format!("role `{name}`: letters, digits, `_` and `-` only"),
                    ));
                }
                Ok(name.to_string())
            };
            let roles = raw
                .roles
                .iter()
                .map(role_name)
                .collect::<Result<Vec<_>, _>>()?;
            let mut require = Vec::new();
            for r in &raw.require {
                let name = role_name(r)?;
                if !roles.is_empty() && !roles.contains(&name) {
                    return Err(at(
                        r.span(),
                        format!(
                            "required role `{name}` is not among the rule's roles ({})",
                            roles.join(", ")
                        ),
                    ));
                }
                require.push(name);
            }
            if (require.len() as i64) > approvals {
                return Err(at(
                    raw.approvals.span(),
                    format!(
                        "approvals = {approvals} cannot include one of each required role ({})",
                        require.join(", ")
                    ),
                ));
            }
            let rule = Rule {
                environment,
                risk,
                approvals: approvals as u32,
                roles,
                require,
                line,
            };
            if let Some(same) = rules
                .iter()
                .find(|r| r.environment == rule.environment && r.risk == rule.risk)
            {
                return Err(format!(
                    "line {line}: a second rule for environment `{}` and risk `{}` (the first is at line {})",
                    rule.environment.as_deref().unwrap_or("*"),
                    rule.risk.map_or("*", Risk::as_str),
                    same.line
                ));
            }
            rules.push(rule);
        }
        Ok(Matrix { rules })
    }
}

/// The audit trail's detail of an approval: its role first, so it can be read back.
pub fn approval_detail(role: &str, what: &str) -> String {
    format!("role {role}; {what}")
}

/// The role of an approval's audit detail (`approval_detail`).
pub fn approval_role(detail: &str) -> Option<&str> {
    let rest = detail.strip_prefix("role ")?;
    Some(rest.split([';', ':']).next().unwrap_or(rest).trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
# the seed's matrix, by risk: low-risk staging needs none; high-risk production two,
# one of them a DBA
[[rule]]
environment = "staging"
risk = "*"
approvals = 0

[[rule]]
environment = "production"
risk = "*"
approvals = 1
roles = ["dba", "lead", "manager"]

[[rule]]
environment = "production"
risk = "high"
approvals = 2
roles = ["dba", "lead"]
require = ["dba"]

[[rule]]
environment = "*"
risk = "critical"
approvals = 3
"#;

    #[test]
    fn the_most_specific_rule_applies() {
        let m = Matrix::parse(SEED).unwrap();
        assert!(m.rule("staging", Risk::Low).is_none());
        assert!(m.rule("staging", Risk::High).is_none());
        assert!(m.rule("dev", Risk::High).is_none());
        let high = m.rule("production", Risk::High).unwrap();
        assert_eq!(
            (high.approvals, high.line),
            (2, 15),
            "the line of its `[[rule]]`"
        );
        assert_eq!(m.rule("production", Risk::Low).unwrap().approvals, 1);
        // a named environment beats a named risk
        assert_eq!(m.rule("production", Risk::Critical).unwrap().approvals, 1);
        assert_eq!(m.rule("dev", Risk::Critical).unwrap().approvals, 3);
        assert!(
            Matrix::default()
                .rule("production", Risk::Critical)
                .is_none()
        );
    }

    #[test]
    fn a_rule_counts_roles_and_requires_one_of_each() {
        let m = Matrix::parse(SEED).unwrap();
        let rule = m.rule("production", Risk::High).unwrap();
        assert!(rule.accepts("dba") && rule.accepts("lead") && !rule.accepts("dev"));
        let a = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(n, r)| (n.to_string(), r.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            rule.missing(&[]).as_deref(),
            Some("2 more approval(s) and one from the `dba` role")
        );
        assert_eq!(
            rule.missing(&a(&[("bob", "lead"), ("carol", "lead")]))
                .as_deref(),
            Some("one from the `dba` role")
        );
        assert_eq!(rule.missing(&a(&[("bob", "lead"), ("dan", "dba")])), None);
        assert_eq!(
            rule.describe(),
            "2 approval(s) (roles dba, lead; at least one dba)"
        );
    }

    #[test]
    fn bad_files_are_refused_naming_the_line() {
        let bad = [
            (
                "[[rule]]\nenvironment = \"production\"\nrisk = \"huge\"\napprovals = 1\n",
                "line 3: risk `huge`",
            ),
            (
                "[[rule]]\nenvironment = \"p\"\nrisk = \"high\"\napprovals = 1\nroles = [\"dba\"]\nrequire = [\"lead\"]\n",
                "line 6: required role `lead`",
            ),
            (
                "[[rule]]\nenvironment = \"p\"\nrisk = \"*\"\napprovals = 1\n\n[[rule]]\nenvironment = \"p\"\nrisk = \"*\"\napprovals = 2\n",
                "line 6: a second rule",
            ),
            (
                "[[rule]]\nenvironment = \"p\"\nrisk = \"low\"\napprovals = -1\n",
                "line 4: approvals = -1",
            ),
            ("[[rule]]\nenvironment = \"p\"\nrisk = \"low\"\n", "line 1"),
            (
                "[[rule]]\nenvironment = \"p\"\nrisk = \"low\"\napprovals = 1\nwho = 2\n",
                "line 5",
            ),
        ];
        for (text, want) in bad {
            let e = Matrix::parse(text).unwrap_err();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
    }

    #[test]
    fn the_example_matrix_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/approvals.toml");
        let m = Matrix::load(&path).unwrap();
        assert!(m.rule("staging", Risk::Low).is_none());
        assert_eq!(m.rule("staging", Risk::Medium).unwrap().approvals, 1);
        assert_eq!(m.rule("production", Risk::Low).unwrap().approvals, 2);
        let high = m.rule("production", Risk::High).unwrap();
        assert_eq!(high.require, ["data_ops_lead", "engineering_manager"]);
    }

    #[test]
    fn a_destructive_migration_counts_as_high_risk_at_least() {
        use flotilla_core::pb;
        let migration = |id: &str, risk: &str, destructive: bool| pb::Migration {
            id: id.to_string(),
            up_sql: "DROP TABLE t".into(),
            down_sql: "CREATE TABLE t (x int)".into(),
            risk: risk.to_string(),
            destructive,
            ..Default::default()
        };
        let spec = |ms: Vec<pb::Migration>| {
            flotilla_core::PlanSpec::try_from(pb::PlanSpec {
                name: "p".into(),
                migrations: ms,
                ..Default::default()
            })
            .unwrap()
        };
        assert_eq!(
            plan_risk(&spec(vec![migration("a", "", false)])),
            Ok(Risk::Low)
        );
        assert_eq!(
            plan_risk(&spec(vec![
                migration("a", "medium", false),
                migration("b", "low", true)
            ])),
            Ok(Risk::High),
            "risk low with destructive = true"
        );
        assert_eq!(
            plan_risk(&spec(vec![migration("a", "critical", true)])),
            Ok(Risk::Critical),
            "never lowered"
        );
        // `[lint] ignore` of `destructive-drop` lets the drop through as the flag does, and
        // counts as it does (it kept risk low: no approval for a DROP TABLE in staging)
        let ignoring = |rule: &str| pb::Migration {
            lint_ignore: vec![pb::LintIgnore {
                rule: rule.into(),
                reason: "old table".into(),
            }],
            ..migration("a", "", false)
        };
        assert_eq!(
            plan_risk(&spec(vec![ignoring("destructive-drop")])),
            Ok(Risk::High)
        );
        assert_eq!(
            plan_risk(&spec(vec![ignoring("index-not-concurrent")])),
            Ok(Risk::Low),
            "another rule ignored changes nothing"
        );
    }

    #[test]
    fn an_approvals_role_reads_back_from_its_audit_detail() {
        let d = approval_detail("dba", "1 of 2: looks fine");
        assert_eq!(approval_role(&d), Some("dba"));
        assert_eq!(approval_role("something else"), None);
    }
}
