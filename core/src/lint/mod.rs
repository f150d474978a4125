//! What a migration's SQL does, read with PostgreSQL's own parser (libpg_query): each
//! statement's kind and the table-level locks it takes ([`analyze`]), for the dry run's
//! lock report; and the lint ([`lint_plan`]): the [`RULES`] a plan's migrations are
//! checked against by `flotilla plan lint` and at submit (an error refuses the plan).
//!
//! Severity follows one line: an **error** is wrong whatever the table holds (data
//! dropped without saying so, a down.sql that does not undo its up, SQL that does not
//! parse); a **warning** is dangerous depending on the table's size and traffic (locks
//! held through a rewrite or a scan), which only the dry run knows.
//!
//! Lock levels follow PostgreSQL's documentation (the "Explicit Locking" chapter and each
//! command's page), not the server's catalog: nothing here connects to a database, so a
//! lock is reported on the relation as the statement names it (an index for DROP INDEX,
//! a new table for CREATE TABLE).

mod footprint;
mod locks;
mod naming;
mod parse;
mod reversal;
mod rules;

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::{Migration, PlanSpec, pb};

pub use footprint::{LockFootprint, TARGET_LOCKS, created_allowance};
pub(crate) use parse::{Parsed, parse_statements};

/// PostgreSQL's table-level lock modes, weakest first (the derived order is strength:
/// a statement holding several locks on one relation is reported with the strongest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "String")]
pub enum LockMode {
    AccessShare,
    RowShare,
    RowExclusive,
    ShareUpdateExclusive,
    Share,
    ShareRowExclusive,
    Exclusive,
    AccessExclusive,
}

impl LockMode {
    /// The name PostgreSQL's documentation and `LOCK TABLE ... IN ... MODE` use.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::AccessShare => "ACCESS SHARE",
            LockMode::RowShare => "ROW SHARE",
            LockMode::RowExclusive => "ROW EXCLUSIVE",
            LockMode::ShareUpdateExclusive => "SHARE UPDATE EXCLUSIVE",
            LockMode::Share => "SHARE",
            LockMode::ShareRowExclusive => "SHARE ROW EXCLUSIVE",
            LockMode::Exclusive => "EXCLUSIVE",
            LockMode::AccessExclusive => "ACCESS EXCLUSIVE",
        }
    }

    /// Whether this lock blocks plain reads (SELECT): only ACCESS EXCLUSIVE does.
    pub fn blocks_reads(self) -> bool {
        self == LockMode::AccessExclusive
    }

    /// Whether this lock blocks writes (INSERT/UPDATE/DELETE): SHARE and stronger.
    pub fn blocks_writes(self) -> bool {
        self >= LockMode::Share
    }
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<LockMode> for String {
    fn from(mode: LockMode) -> String {
        mode.as_str().to_string()
    }
}

/// One relation a statement locks, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelationLock {
    /// As written in the statement, schema-qualified if written so (`app.orders`).
    pub relation: String,
    pub mode: LockMode,
}

/// One statement of a migration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementInfo {
    /// 1-based line of the statement's first token (comments before it not counted).
    pub line: u32,
    /// The statement as written, without the trailing `;`.
    pub text: String,
    /// What it is, as PostgreSQL names the command: "ALTER TABLE", "CREATE INDEX
    /// CONCURRENTLY", "INSERT", ...
    pub kind: String,
    /// Table-level locks, strongest per relation, in the order the relations appear.
    pub locks: Vec<RelationLock>,
}

/// SQL that PostgreSQL's parser refuses (or that cannot even be split into statements).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line of the statement that does not parse.
    pub line: u32,
    /// The parser's message, e.g. `syntax error at or near "TABEL"`.
    pub message: String,
}

/// Parses `sql` (a whole migration file) and describes each statement: kind, line, locks.
pub fn analyze(sql: &str) -> Result<Vec<StatementInfo>, ParseError> {
    Ok(parse_statements(sql)?.into_iter().map(|p| p.info).collect())
}

/// How bad a finding is: an error refuses the plan at submit (and `plan lint` exits 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One lint rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub id: &'static str,
    pub severity: Severity,
    /// Checked only when asked for (`--rules naming`).
    pub optional: bool,
    pub summary: &'static str,
}

const fn rule_def(id: &'static str, severity: Severity, summary: &'static str) -> Rule {
    Rule {
        id,
        severity,
        optional: false,
        summary,
    }
}

pub const PARSE_ERROR: &str = "parse-error";
pub const DESTRUCTIVE_DROP: &str = "destructive-drop";
pub const TABLE_REWRITE: &str = "table-rewrite";
pub const SET_NOT_NULL: &str = "set-not-null";
pub const CONSTRAINT_NOT_VALID: &str = "constraint-not-valid";
pub const INDEX_NOT_CONCURRENT: &str = "index-not-concurrent";
pub const CONCURRENTLY_IN_TRANSACTION: &str = "concurrently-in-transaction";
pub const RENAME: &str = "rename";
pub const UNBATCHED_DATA_CHANGE: &str = "unbatched-data-change";
pub const SESSION_STATE: &str = "session-state";
pub const DOWN_INCOMPLETE: &str = "down-incomplete";
pub const MISSING_DOWN: &str = "missing-down";
pub const DOWN_DROPS_EXISTING: &str = "down-drops-existing";
pub const DOWN_UNPAIRED: &str = "down-unpaired";
pub const ATOMIC_UNIT_SPLIT: &str = "atomic-unit-split";
pub const CLUSTER_WIDE: &str = "cluster-wide";
pub const DYNAMIC_SQL: &str = "dynamic-sql";
pub const DELETE_NOT_UNDONE: &str = "delete-not-undone";
pub const TIMEOUTS: &str = "timeouts";
pub const TENANT_ESCAPE: &str = "tenant-escape";
pub const NAMING_ID: &str = "naming-id";
pub const NAMING_DESCRIPTION: &str = "naming-description";

/// Every rule, in the order findings are explained in docs/file-formats.md.
pub const RULES: &[Rule] = &[
    rule_def(
        PARSE_ERROR,
        Severity::Error,
        "SQL that PostgreSQL's parser refuses (cannot be ignored)",
    ),
    rule_def(
        DESTRUCTIVE_DROP,
        Severity::Error,
        "DROP TABLE/COLUMN/SCHEMA/INDEX or TRUNCATE of an existing object, DROP TYPE/DOMAIN/EXTENSION ... CASCADE, or ALTER COLUMN TYPE ... USING a constant, without `destructive = true` or risk high/critical",
    ),
    rule_def(
        TABLE_REWRITE,
        Severity::Warning,
        "ALTER COLUMN TYPE, a volatile default, SET LOGGED, VACUUM FULL, CLUSTER...: the table is rewritten under ACCESS EXCLUSIVE",
    ),
    rule_def(
        SET_NOT_NULL,
        Severity::Warning,
        "SET NOT NULL without a validated CHECK (col IS NOT NULL) first: a full scan under ACCESS EXCLUSIVE",
    ),
    rule_def(
        CONSTRAINT_NOT_VALID,
        Severity::Warning,
        "ADD FOREIGN KEY or CHECK without NOT VALID: existing rows are checked while the lock is held",
    ),
    rule_def(
        INDEX_NOT_CONCURRENT,
        Severity::Warning,
        "CREATE INDEX (or ADD UNIQUE/PRIMARY KEY) on an existing table without CONCURRENTLY: writes blocked during the build (an error when the dry run knows the table is large)",
    ),
    rule_def(
        CONCURRENTLY_IN_TRANSACTION,
        Severity::Warning,
        "CREATE INDEX CONCURRENTLY (or another statement that cannot run in a transaction) in an atomic unit, or beside transactional statements",
    ),
    rule_def(
        RENAME,
        Severity::Warning,
        "renaming a table or column that running code still uses",
    ),
    rule_def(
        UNBATCHED_DATA_CHANGE,
        Severity::Warning,
        "UPDATE/DELETE of an existing table in one statement instead of a key-bounded [data] batch",
    ),
    rule_def(
        SESSION_STATE,
        Severity::Warning,
        "a temporary table or prepared statement in a non-transactional migration: run again after a failure, its statements go on in another session, without it",
    ),
    rule_def(
        DOWN_INCOMPLETE,
        Severity::Error,
        "down.sql does not drop something up.sql creates",
    ),
    rule_def(
        MISSING_DOWN,
        Severity::Error,
        "no down SQL, and the migration does not say irreversible",
    ),
    // A warning: what up.sql creates is read from its statements, and functions (PostGIS's
    // AddGeometryColumn, pg_partman) and DO blocks create what they do not name.
    rule_def(
        DOWN_DROPS_EXISTING,
        Severity::Warning,
        "down.sql drops something up.sql does not create: a rollback would drop what existed before the migration",
    ),
    // A warning: a down.sql that undoes the step as a whole (one DROP TABLE for a table and
    // its index) is right for an applied step, and for a step left part-way when what never
    // ran was not there before.
    rule_def(
        DOWN_UNPAIRED,
        Severity::Warning,
        "a non-transactional migration of several statements whose down.sql is not one statement per up statement: a step left part-way is undone by the whole down.sql, the undo of statements that never ran included",
    ),
    rule_def(
        CLUSTER_WIDE,
        Severity::Warning,
        "a statement on the whole PostgreSQL server (CREATE/ALTER/DROP ROLE, GRANT of a role, CREATE/ALTER/DROP DATABASE or TABLESPACE, ALTER SYSTEM): run once per target, for what every target of the server shares",
    ),
    rule_def(
        TENANT_ESCAPE,
        Severity::Error,
        "in a tenant's migration, a statement outside the tenant's schema: on a schema-qualified object (`public.x`), a schema or an extension (one per database), or a change of search_path: every tenant of the shard runs it on one shared object (a warning when the scope is auto: the submit checks it as an error when the fleet has tenants)",
    ),
    rule_def(
        DYNAMIC_SQL,
        Severity::Warning,
        "a DO block: what it runs is not read by the lint, nor its locks by the dry run",
    ),
    rule_def(
        DELETE_NOT_UNDONE,
        Severity::Warning,
        "DELETE of rows that down.sql does not put back (no INSERT or COPY), without `destructive = true`: a rollback leaves them gone",
    ),
    rule_def(
        TIMEOUTS,
        Severity::Warning,
        "statement_timeout no longer than lock_timeout: a wait for a lock is cut by the statement timeout, not given up and tried again as a lock timeout, and its blocker is not named",
    ),
    rule_def(
        ATOMIC_UNIT_SPLIT,
        Severity::Error,
        "in an atomic unit, a migration depends on one of the unit's transactional migrations but cannot share its prepared transaction (it cannot run in a transaction, waits also for one that runs outside it, or runs on other targets): it could never see what it depends on (refused at submit too)",
    ),
    Rule {
        optional: true,
        ..rule_def(
            NAMING_ID,
            Severity::Warning,
            "naming standard: id is <version>_<snake_case_description>",
        )
    },
    Rule {
        optional: true,
        ..rule_def(
            NAMING_DESCRIPTION,
            Severity::Warning,
            "naming standard: the migration has a description",
        )
    },
];

/// The rule with this id.
pub fn rule(id: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.id == id)
}

pub fn rule_ids() -> Vec<&'static str> {
    RULES.iter().map(|r| r.id).collect()
}

/// Whether a migration may turn `rule` off (`[lint] ignore`, `-- flotilla:lint-ignore`): an
/// unknown rule, or `parse-error` (SQL PostgreSQL refuses fails whatever is said), is refused
/// with why.
pub fn check_ignorable(rule: &str) -> Result<(), String> {
    if rule == PARSE_ERROR {
        return Err(format!(
            "`{PARSE_ERROR}` cannot be ignored: PostgreSQL refuses that SQL whatever the lint says; fix it"
        ));
    }
    if self::rule(rule).is_none() {
        let ignorable: Vec<&str> = rule_ids()
            .into_iter()
            .filter(|r| *r != PARSE_ERROR)
            .collect();
        return Err(format!(
            "unknown rule `{rule}`: use one of {}",
            ignorable.join(", ")
        ));
    }
    Ok(())
}

/// What the lint found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub rule: String,
    pub severity: Severity,
    pub migration: String,
    /// The part of the migration: "up.sql", "down.sql", "verify.sql" or "migration.toml".
    pub file: String,
    /// 1-based line in that part; 0: the migration as a whole.
    pub line: u32,
    pub message: String,
    /// How to make it safe (or how to say it is meant).
    pub hint: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}[{}] {} {}",
            self.severity, self.rule, self.migration, self.file
        )?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl From<&Finding> for pb::LintFinding {
    fn from(f: &Finding) -> pb::LintFinding {
        pb::LintFinding {
            rule: f.rule.clone(),
            severity: f.severity.as_str().to_string(),
            migration: f.migration.clone(),
            file: f.file.clone(),
            line: f.line,
            message: f.message.clone(),
            hint: f.hint.clone(),
        }
    }
}

/// A table is large from this size on, when sizes are known (32 MiB: building an index
/// on it while writes wait takes seconds on ordinary hardware).
pub const DEFAULT_LARGE_TABLE_BYTES: u64 = 32 << 20;

/// What the lint is asked to check.
#[derive(Debug, Clone)]
pub struct LintOptions {
    /// The seed's naming standards (`--rules naming`).
    pub naming: bool,
    /// Table sizes in bytes, by `table` or `schema.table`, as the dry run measured them.
    /// Without them `index-not-concurrent` warns of every existing table; with them it
    /// speaks only of tables at least `large_table_bytes` big (and unknown ones), as an error
    /// for the large ones.
    pub table_bytes: Option<BTreeMap<String, u64>>,
    pub large_table_bytes: u64,
}

impl Default for LintOptions {
    fn default() -> LintOptions {
        LintOptions {
            naming: false,
            table_bytes: None,
            large_table_bytes: DEFAULT_LARGE_TABLE_BYTES,
        }
    }
}

/// Lints every migration of a plan, in the plan's order (a table created by an earlier
/// migration of the plan is new, and empty, for the ones after it). Findings a migration's
/// `lint.ignore` names are left out; a parse error cannot be ignored.
pub fn lint_plan(spec: &PlanSpec, options: &LintOptions) -> Vec<Finding> {
    let mut seen = rules::Seen::default();
    let mut findings = Vec::new();
    for m in &spec.migrations {
        let atomic = spec.atomic_unit(&m.id).is_some();
        let tenant = m
            .scope
            .or(spec.default_scope)
            .map(|s| s == crate::Scope::Tenant);
        let mut found = lint_migration(m, atomic, tenant, options, &mut seen);
        found.retain(|f| f.rule == PARSE_ERROR || !m.lint_ignore.iter().any(|i| i.rule == f.rule));
        findings.extend(found);
    }
    atomic_unit_split(spec, &mut findings);
    findings
}

/// [`ATOMIC_UNIT_SPLIT`], from the plan's files alone (the submit's own check, on every
/// target's steps, says the same of the expanded plan): a prepared change is seen only
/// inside its target's one prepared transaction until the unit's decision, so a migration of
/// the unit that waits for one of the unit's transactional migrations must run in that same
/// transaction, on the same targets. Pairs whose targets depend on the fleet (a migration
/// with no scope of its own, the plan none either, beside one with a scope; either with a
/// selector of its own) are left to the submit: an error here refuses the submit too, so
/// it says only what holds on every fleet.
fn atomic_unit_split(spec: &PlanSpec, findings: &mut Vec<Finding>) {
    if !spec.two_phase() {
        return;
    }
    let Ok(graph) = crate::dag::MigrationGraph::build(spec) else {
        return; // the graph's own error is reported where the plan is read
    };
    let ms = &spec.migrations;
    let scope = |i: usize| ms[i].scope.or(spec.default_scope);
    let transactional = |i: usize| ms[i].tx_mode == crate::TxMode::Transactional;
    for (i, m) in ms.iter().enumerate() {
        let Some(unit) = spec.atomic_unit(&m.id) else {
            continue;
        };
        // (a migration with a selector of its own may have no step on a target where the
        // other has one: the expanded plan decides, at submit)
        if !m.selector.is_empty() {
            continue;
        }
        let in_unit: Vec<usize> = graph.deps[i]
            .iter()
            .copied()
            .filter(|&d| spec.atomic_unit(&ms[d].id) == Some(unit) && ms[d].selector.is_empty())
            .collect();
        let Some(&d) = in_unit.iter().find(|&&d| transactional(d)) else {
            continue;
        };
        let why = match (scope(i), scope(d)) {
            (a, b) if a == b => {
                if !transactional(i) {
                    Some("it cannot run in a transaction".to_string())
                } else {
                    in_unit.iter().find(|&&e| !transactional(e)).map(|&e| {
                        format!(
                            "it also waits for `{}`, which runs outside the unit's transaction",
                            ms[e].id
                        )
                    })
                }
            }
            (Some(a), Some(b)) => Some(format!(
                "it runs on other targets (scope {} against {})",
                a.as_str(),
                b.as_str()
            )),
            _ => None,
        };
        let Some(why) = why else {
            continue;
        };
        if m.lint_ignore.iter().any(|x| x.rule == ATOMIC_UNIT_SPLIT) {
            continue;
        }
        findings.push(Finding {
            rule: ATOMIC_UNIT_SPLIT.to_string(),
            severity: Severity::Error,
            migration: m.id.to_string(),
            file: "migration.toml".to_string(),
            line: 0,
            message: format!(
                "depends on `{}` in the same atomic unit, but {why}: within an atomic unit a step sees another step's changes only in its target's one prepared transaction, which holds the unit's transactional steps",
                ms[d].id
            ),
            hint: if spec.atomic {
                // the whole plan is one unit: no later group commits after it
                format!(
                    "run `{}` in a plan of its own after this one, or make its changes transactional",
                    m.id
                )
            } else {
                format!(
                    "run `{}` in a later parallel group (after the unit committed), or make its changes transactional",
                    m.id
                )
            },
        });
    }
}

fn lint_migration(
    m: &Migration,
    atomic: bool,
    tenant: Option<bool>,
    options: &LintOptions,
    seen: &mut rules::Seen,
) -> Vec<Finding> {
    let mut out = rules::Out::new(m);
    if options.naming {
        naming::check(m, &mut out);
    }
    let up = match parse_statements(&m.up_sql) {
        Ok(up) => up,
        Err(e) => {
            out.parse_error("up.sql", e);
            return out.findings;
        }
    };
    let down = match parse_statements(&m.down_sql) {
        Ok(down) => Some(down),
        Err(e) => {
            out.parse_error("down.sql", e);
            None
        }
    };
    if let Some(verify) = &m.verify_sql
        && let Err(e) = parse_statements(verify)
    {
        out.parse_error("verify.sql", e);
    }
    if let Some(d) = &m.data {
        // SQL in migration.toml: named by its key (its own lines are not the file's)
        let in_toml = |what: &str, e: ParseError| ParseError {
            line: 0,
            message: format!("{what}: {}", e.message),
        };
        if let Err(e) = parse_statements(&d.batch_sql) {
            out.parse_error("migration.toml", in_toml("[data] batch", e));
        }
        if let Some(filter) = &d.filter
            && let Err(e) = parse_statements(&format!("SELECT 1 WHERE ({filter})"))
        {
            out.parse_error("migration.toml", in_toml("[data] filter", e));
        }
    }
    if let (Some(lock), Some(statement)) = (m.lock_timeout, m.statement_timeout)
        && !statement.is_zero()
        && statement <= lock
    {
        out.push(
            TIMEOUTS,
            "migration.toml",
            0,
            format!(
                "statement_timeout {}ms is no longer than lock_timeout {}ms: a statement waiting for its lock is cancelled as slow (SQLSTATE 57014), not given up and tried again after a pause as a lock timeout is, and the session holding the lock is not named",
                statement.as_millis(),
                lock.as_millis()
            ),
            "make statement_timeout longer than lock_timeout (the lock wait is part of the statement's time), or leave it unset",
        );
    }
    rules::check_up(m, &up, atomic, options, seen, &mut out);
    rules::check_tenant_escape("up.sql", &up, tenant, &mut out);
    if let Some(down) = down {
        // (counted as the agent splits them, which is what it pairs)
        let (ups, downs) = (
            crate::sql::split_statements(&m.up_sql).map_or(0, |s| s.len()),
            crate::sql::split_statements(&m.down_sql).map_or(0, |s| s.len()),
        );
        if m.tx_mode == crate::TxMode::NonTransactional && ups > 1 && downs > 0 && downs != ups {
            out.push(
                DOWN_UNPAIRED,
                "down.sql",
                down.first().map_or(1, |p| p.info.line),
                format!(
                    "{ups} up statements, {downs} down: its statements commit one by one, and a step left part-way (a statement failed) is undone by the whole down.sql, the undo of the statements that never ran too: an object of theirs that was there before (the column a failed ADD COLUMN found) is dropped, with its data"
                ),
                "write down.sql as one statement per up statement, in reverse order (`SELECT 1;` for one with nothing to undo, a SET for a SET): a rollback then undoes only what ran",
            );
        }
        // (a tenant's rollback that drops or changes a shared object does it for all)
        rules::check_tenant_escape("down.sql", &down, tenant, &mut out);
        reversal::check(m, &up, &down, &mut out);
    }
    out.findings
}

#[cfg(test)]
mod tests;
