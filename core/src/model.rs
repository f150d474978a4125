//! The domain model: migrations, plans and targets, always valid once built.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::selector::{Selector, SelectorError};
use crate::sql::SqlError;

/// The journal's name for the shard itself when a step's scope is the whole shard.
pub const SHARD_TARGET: &str = "";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Shard,
    Tenant,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Shard => "shard",
            Scope::Tenant => "tenant",
        }
    }
    pub fn parse(s: &str) -> Option<Scope> {
        match s.trim().to_ascii_lowercase().as_str() {
            "shard" | "database" => Some(Scope::Shard),
            "tenant" | "schema" => Some(Scope::Tenant),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxMode {
    Transactional,
    NonTransactional,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// A failed step stops the plan and every applied step is undone.
    #[default]
    AllOrNothing,
    /// A failed step stops the plan; what was applied stays.
    Stop,
    /// Targets that have not failed go on; the plan ends failed.
    Continue,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::AllOrNothing => "all-or-nothing",
            FailurePolicy::Stop => "stop",
            FailurePolicy::Continue => "continue",
        }
    }
    pub fn parse(s: &str) -> Option<FailurePolicy> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "all-or-nothing" | "atomic" | "rollback" => Some(FailurePolicy::AllOrNothing),
            "stop" | "halt" => Some(FailurePolicy::Stop),
            "continue" => Some(FailurePolicy::Continue),
            _ => None,
        }
    }
}

/// A migration id: sorts, and is safe to put anywhere (journal, logs, gids).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MigrationId(String);

impl MigrationId {
    pub fn parse(s: &str) -> Result<MigrationId, PlanError> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(MigrationId(s.to_string()))
        } else {
            Err(PlanError::InvalidMigrationId { id: s.to_string() })
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The checksum of a migration's content: sha256 of its up SQL with line endings
/// normalised. Only what is applied counts, so a fixed down.sql is not an "edit".
pub fn checksum(up_sql: &str) -> String {
    let normalised = up_sql.replace("\r\n", "\n");
    let mut hasher = Sha256::new();
    hasher.update(normalised.trim().as_bytes());
    hex::encode(hasher.finalize())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub id: MigrationId,
    pub description: String,
    pub kind: String,
    pub depends_on: Vec<MigrationId>,
    /// None: the plan's default scope.
    pub scope: Option<Scope>,
    pub selector: Selector,
    pub tx_mode: TxMode,
    pub lock_timeout: Option<Duration>,
    pub statement_timeout: Option<Duration>,
    pub risk: String,
    pub up_sql: String,
    pub down_sql: String,
    pub verify_sql: Option<String>,
    pub checksum: String,
    pub source: String,
    /// A semantic version (`2.4.0`); empty = the plan's.
    pub version: String,
    /// A batched data change: the batch SQL is the change (up SQL may be empty).
    pub data: Option<DataChange>,
    /// Drops data on purpose: the lint's destructive-drop rule lets it through.
    pub destructive: bool,
    /// Lint rules turned off for this migration, each with its reason.
    pub lint_ignore: Vec<LintIgnore>,
}

/// A lint rule a migration turns off (`lint.ignore` in migration.toml), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LintIgnore {
    /// A known rule id ([`crate::lint::RULES`]).
    pub rule: String,
    /// Never empty: an ignored rule says why.
    pub reason: String,
}

pub const DEFAULT_BATCH_SIZE: u32 = 1000;
pub const MAX_BATCH_SIZE: u32 = 1_000_000;
/// The longest `target_batch_ms`: ten minutes.
pub const MAX_TARGET_BATCH_MS: u32 = 600_000;

/// A batched data change, validated: `table` and `key` are identifiers (folded to lower case,
/// as PostgreSQL folds unquoted names), `batch_sql` uses exactly `$1` (exclusive lower bound
/// of the key) and `$2` (inclusive upper bound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataChange {
    /// `[schema, table]` or `[table]` (resolved in the target's search_path).
    pub table: Vec<String>,
    /// One column, or the columns of a composite key in the order batches follow.
    pub key: Vec<String>,
    pub batch_size: u32,
    /// 0: unlimited.
    pub rows_per_second: u64,
    /// The batch's statements, split.
    pub batch: Vec<String>,
    pub batch_sql: String,
    pub filter: Option<String>,
    /// Adaptive batch size: each batch aims at this duration; None = fixed size.
    pub target_batch: Option<Duration>,
    pub min_batch_size: u32,
    pub max_batch_size: u32,
    /// Rows per second shared by every target of the step on the shard's server; 0: none.
    pub server_rows_per_second: u64,
    /// Checked before every batch; the step waits while one is above its limit.
    pub health: Vec<HealthCheck>,
    /// Columns whose old values each batch saves before changing them (empty: none), so
    /// that undoing the step restores them.
    pub prior_image: Vec<String>,
}

/// A database health signal with the limit above which a data change waits.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub signal: HealthSignal,
    /// Shown in the throttle reason.
    pub name: String,
    pub max: f64,
}

// `max` is validated finite on receipt, so equality is total.
impl Eq for HealthCheck {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthSignal {
    /// Replay lag of the shard's slowest replica (`pg_stat_replication`), in ms.
    ReplicationLagMs,
    /// Sessions waiting for a lock on the step's table.
    LockWaits,
    /// Active client sessions on the server, this one aside.
    ActiveSessions,
    /// One statement returning one number, run on the target's session.
    Sql(String),
}

impl HealthSignal {
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthSignal::ReplicationLagMs => "replication_lag_ms",
            HealthSignal::LockWaits => "lock_waits",
            HealthSignal::ActiveSessions => "active_sessions",
            HealthSignal::Sql(_) => "sql",
        }
    }
}

impl DataChange {
    /// The table as SQL: each part quoted.
    pub fn table_sql(&self) -> String {
        self.table
            .iter()
            .map(|p| crate::sql::quote_ident(p))
            .collect::<Vec<_>>()
            .join(".")
    }
    /// The key as SQL: the quoted column, or a row `("a", "b")` of a composite key, which
    /// compares lexicographically as keyset pagination needs.
    pub fn key_sql(&self) -> String {
        match self.key.as_slice() {
            [one] => crate::sql::quote_ident(one),
            many => format!("({})", Self::column_list(many)),
        }
    }
    /// `"a", "b"`: quoted columns, comma-separated.
    pub fn column_list(columns: &[String]) -> String {
        columns
            .iter()
            .map(|c| crate::sql::quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    }
    /// The key's columns, then the prior image's.
    pub fn columns(&self) -> Vec<String> {
        self.key.iter().chain(&self.prior_image).cloned().collect()
    }
    /// The key as written in a plan (`id`, `tenant_id, id`, `"OrderId"`).
    pub fn key_text(&self) -> String {
        self.key
            .iter()
            .map(|c| name_text(c))
            .collect::<Vec<_>>()
            .join(", ")
    }
    /// The table as written in a plan (`customers`, `app."Orders"`).
    pub fn table_text(&self) -> String {
        self.table
            .iter()
            .map(|p| name_text(p))
            .collect::<Vec<_>>()
            .join(".")
    }
    /// The most rows one batch takes under the change's rate limits: one second of the
    /// lowest (`rows_per_second`, `server_rows_per_second`), none without. A batch runs as
    /// fast as the server goes and the limit is kept by the waits between batches, so a
    /// batch bigger than a second's rows is a burst past the limit (a `batch_size` of
    /// 1,000,000 at 5,000 rows/s changed a 200,000-row table in 4 s, in one batch, its
    /// application's p99 from 23 ms to 3.5 s).
    pub fn batch_cap(&self) -> u32 {
        rate_cap(self.rows_per_second, self.server_rows_per_second)
            .map_or(u32::MAX, |(_, r)| u32::try_from(r).unwrap_or(u32::MAX))
    }
    /// The first batch's size: `batch_size`, within [`Self::batch_cap`].
    pub fn first_batch_size(&self) -> u32 {
        self.batch_size.min(self.batch_cap()).max(1)
    }
    /// An adaptive batch's bounds: `min_batch_size` and `max_batch_size`, within
    /// [`Self::batch_cap`].
    pub fn batch_bounds(&self) -> (u32, u32) {
        let max = self.max_batch_size.min(self.batch_cap()).max(1);
        (self.min_batch_size.min(max).max(1), max)
    }
}

/// One name of a `[data]` table as PostgreSQL reads it: unquoted
/// (`[A-Za-z_][A-Za-z0-9_$]*`, folded to lower case) or double-quoted (`"OrderId"`, kept
/// as written, `""` a quote inside it), at most 63 bytes either way (PostgreSQL would cut a
/// longer one short, and find another name).
pub fn sql_name(s: &str) -> Option<String> {
    let s = s.trim();
    let Some(inner) = s.strip_prefix('"') else {
        return sql_identifier(s);
    };
    let inner = inner.strip_suffix('"')?;
    // every quote inside is doubled
    if inner.replace("\"\"", "").contains('"') {
        return None;
    }
    let name = inner.replace("\"\"", "\"");
    (!name.is_empty() && name.len() <= 63 && !name.contains('\0')).then_some(name)
}

/// Names separated by `sep` outside double quotes (`app."Orders"` by `.`, `"Region", id`
/// by `,`), each a [`sql_name`].
pub fn sql_names(s: &str, sep: char) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().map(sql_name).collect()
}

/// A name as a `[data]` table writes it, read back by [`sql_name`] as the same name: bare
/// when it is a lower-case plain identifier, else double-quoted (`"Orders"`).
pub fn name_text(name: &str) -> String {
    let plain = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'$');
    if plain {
        name.to_string()
    } else {
        crate::sql::quote_ident(name)
    }
}

/// An unquoted SQL identifier (`[A-Za-z_][A-Za-z0-9_$]*`, at most 63 bytes), folded to
/// lower case as PostgreSQL does.
pub fn sql_identifier(s: &str) -> Option<String> {
    let s = s.trim();
    let mut bytes = s.bytes();
    let first = bytes.next()?;
    let ok = s.len() <= 63
        && (first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$');
    ok.then(|| s.to_ascii_lowercase())
}

/// The checksum of a data migration: its up SQL and what defines the change (table, key,
/// batch SQL, filter, the columns of its prior image), each normalised as in [`checksum`]
/// (names also lower-cased, a list's spaces dropped). Batch size and rate are not part of
/// it: tuning them after the fact is allowed.
pub fn data_checksum(up_sql: &str, d: &crate::pb::DataChange) -> String {
    let norm = |s: &str| s.replace("\r\n", "\n").trim().to_string();
    // Identifiers fold to lower case (as unquoted names do in PostgreSQL). A quoted name
    // keeps its case: names holding a quote are read and written back as the file would
    // spell them (`"Orders"`, and `"orders"` as `orders`, the same table); names without
    // one are normalised as they always were, so that no applied change's checksum moves.
    let quoted = |s: &str, sep: char| {
        if !s.contains('"') {
            return None;
        }
        let names = sql_names(s, sep)?;
        Some(
            names
                .iter()
                .map(|n| name_text(n))
                .collect::<Vec<_>>()
                .join(&sep.to_string()),
        )
    };
    let names = |s: &str| {
        quoted(s, ',').unwrap_or_else(|| {
            s.split(',')
                .map(|p| p.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(",")
        })
    };
    let prior = d
        .prior_image
        .iter()
        .map(|c| quoted(c, ',').unwrap_or_else(|| c.trim().to_ascii_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let table = quoted(&d.table, '.').unwrap_or_else(|| norm(&d.table.to_ascii_lowercase()));
    let mut hasher = Sha256::new();
    let mut parts = vec![
        ("up", norm(up_sql)),
        ("table", table),
        ("key", names(&d.key)),
        ("batch", norm(&d.batch_sql)),
        ("filter", norm(&d.filter)),
    ];
    // only when asked for, so that the checksums of changes without one stay as they were
    if !prior.is_empty() {
        parts.push(("prior_image", prior));
    }
    for (name, part) in parts {
        hasher.update(format!("{name}:{}:", part.len()).as_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(hasher.finalize())
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlanSpec {
    pub name: String,
    pub description: String,
    pub migrations: Vec<Migration>,
    pub selector: Selector,
    pub parallel_groups: Vec<Vec<MigrationId>>,
    pub dependencies: BTreeMap<MigrationId, Vec<MigrationId>>,
    pub max_parallel: u32,
    pub environment: String,
    pub policy: FailurePolicy,
    /// None: tenants when the selected shards have tenants, else the shards.
    pub default_scope: Option<Scope>,
    pub fuse: bool,
    /// Commit every target's transactional steps atomically across shards (2PC).
    pub atomic: bool,
    /// Parallel groups (0-based) whose transactional steps commit atomically
    /// across shards, each as its own unit, one after the other.
    pub atomic_groups: BTreeSet<usize>,
    pub submitted_by: String,
    pub source: String,
    /// Waves, budgets and what a budget past its limit does.
    pub rollout: crate::waves::Rollout,
    /// A semantic version (`2.4.0`) for the migrations that carry none; empty = none.
    pub version: String,
    /// Tenants that appear after it completed get its migrations (a catch-up plan).
    pub catch_up: bool,
    /// Refuse the plan when a target's schema drifted from its cohort's (else: a warning).
    pub require_no_drift: bool,
    /// Refuse the plan when another tool's history says a target already has migrations
    /// its journal lacks (`fleet baseline` first; else: a warning).
    pub require_baseline: bool,
}

pub const DEFAULT_MAX_PARALLEL: u32 = 8;

/// The most targets a plan (or a wave, or a wave on one shard) migrates at once.
pub const MAX_PARALLEL: u32 = 10_000;

impl PlanSpec {
    /// The version a migration brings a target to: its own, else the plan's ("" = none).
    pub fn version_of(&self, id: &MigrationId) -> String {
        self.migrations
            .iter()
            .find(|m| &m.id == id)
            .map(|m| m.version.as_str())
            .filter(|v| !v.is_empty())
            .unwrap_or(&self.version)
            .to_string()
    }

    /// Whether any of the plan's steps commit through two-phase commit.
    pub fn two_phase(&self) -> bool {
        self.atomic || !self.atomic_groups.is_empty()
    }

    /// The atomic unit a migration belongs to: 0 for every migration of an atomic
    /// plan, the group's index for one in an atomic parallel group, else none.
    pub fn atomic_unit(&self, id: &MigrationId) -> Option<usize> {
        if self.atomic {
            return Some(0);
        }
        self.atomic_groups.iter().copied().find(|&g| {
            self.parallel_groups
                .get(g)
                .is_some_and(|ms| ms.contains(id))
        })
    }

    pub fn migration(&self, id: &MigrationId) -> Option<&Migration> {
        self.migrations.iter().find(|m| &m.id == id)
    }
}

/// Where a step runs: a shard, or one tenant of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub shard: String,
    /// `SHARD_TARGET` (empty) for the shard itself.
    pub tenant: String,
}

impl Target {
    pub fn is_shard(&self) -> bool {
        self.tenant.is_empty()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tenant.is_empty() {
            write!(f, "{}", self.shard)
        } else {
            write!(f, "{}/{}", self.shard, self.tenant)
        }
    }
}

/// The longest `lock_timeout` or `statement_timeout` PostgreSQL takes, in milliseconds
/// (an int): a longer one fails every step's `SET`.
pub const MAX_TIMEOUT_MS: u64 = i32::MAX as u64;

/// Why a timeout of `ms` milliseconds is not one PostgreSQL takes (None: it is).
pub fn timeout_over_limit(ms: u128) -> Option<String> {
    (ms > u128::from(MAX_TIMEOUT_MS))
        .then(|| format!("over PostgreSQL's limit of {MAX_TIMEOUT_MS} ms (about 24.8 days)"))
}

/// Checks a tenant (schema) name found on a shard. Names are always quoted when
/// used; this only refuses what no schema name should hold.
pub fn validate_tenant_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty tenant name".into());
    }
    if name.len() > 63 {
        return Err(format!("tenant name `{name}` is longer than 63 bytes"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(format!("tenant name {name:?} holds a control character"));
    }
    // The schemas PostgreSQL and Flotilla keep for themselves (`pg_` names are reserved
    // to the system): a tenant's steps run with the search path set to it, and a
    // migration's `DROP TABLE IF EXISTS journal` run in `flotilla` would drop the agent's
    // own journal. A tenant pattern of `%` finds them all.
    if name.starts_with("pg_") || name == "information_schema" || name == "flotilla" {
        return Err(format!(
            "`{name}` is a system schema (PostgreSQL's or Flotilla's), not a tenant"
        ));
    }
    Ok(())
}

/// A shard name: also used in journal rows, metrics labels and (later) etcd keys.
pub fn validate_shard_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid shard name `{name}`: use 1-63 characters from [A-Za-z0-9._-]"
        ))
    }
}

/// Label keys every target has of itself: `shard` (its shard's name) and `tenant` (its
/// tenant's). A label of that name would stand in for them, and a selector's
/// `shard in (b)` would take a tenant of shard a labelled `shard=b`.
pub const RESERVED_LABEL_KEYS: [&str; 2] = ["shard", "tenant"];

/// Labels `k=v,k2=v2` as given on a command line: a key given twice, or a reserved one
/// ([`RESERVED_LABEL_KEYS`]), is refused.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in label_pairs(s)? {
        if RESERVED_LABEL_KEYS.contains(&k.as_str()) {
            return Err(format!(
                "label key `{k}` is reserved: every target has it (its {k}'s name)"
            ));
        }
        if out.contains_key(&k) {
            return Err(format!("label key `{k}` is given twice"));
        }
        out.insert(k, v);
    }
    Ok(out)
}

/// Labels `k=v,k2=v2` in the order given, their syntax checked (keys from
/// `[A-Za-z0-9._-/]`), nothing else.
pub fn label_pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("label `{part}` is not key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        let key_ok = !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            return Err(format!("label key `{k}` must use [A-Za-z0-9._-/]"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Everything that makes a plan invalid. Each message names what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the plan holds no migrations")]
    Empty,
    #[error("{what} holds {bytes} bytes of SQL, over the {limit} a submit takes ({hint})")]
    TooLarge {
        what: String,
        bytes: usize,
        limit: usize,
        hint: &'static str,
    },
    #[error("wave `{wave}`: {reason}")]
    Wave { wave: String, reason: String },
    #[error("version of {what}: {reason}")]
    Version { what: String, reason: String },
    #[error("invalid migration id `{id}`: use 1-128 characters from [A-Za-z0-9._-]")]
    InvalidMigrationId { id: String },
    #[error("duplicate migration id `{id}` (in {first} and {second})")]
    Duplicate {
        id: String,
        first: String,
        second: String,
    },
    #[error("migration `{migration}` ({place}) depends on unknown migration `{depends_on}`")]
    UnknownDependency {
        migration: String,
        /// Where the dependency is declared: the migration's source, or the plan's
        /// `[dependencies]`.
        place: String,
        depends_on: String,
    },
    #[error("the plan names unknown migration `{id}` in {place}")]
    UnknownMigration { id: String, place: String },
    #[error("dependency cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("migration `{migration}` ({source_file}): {error}")]
    Selector {
        migration: String,
        source_file: String,
        error: SelectorError,
    },
    #[error("plan selector: {0}")]
    PlanSelector(SelectorError),
    #[error("migration `{migration}` ({source_file}): {error}")]
    Sql {
        migration: String,
        source_file: String,
        error: SqlError,
    },
    #[error("migration `{migration}` ({source_file}): up SQL is empty")]
    EmptyUp {
        migration: String,
        source_file: String,
    },
    #[error(
        "migration `{migration}` ({source_file}): `{statement}` controls the transaction; Flotilla opens and commits it"
    )]
    TransactionControl {
        migration: String,
        source_file: String,
        statement: String,
    },
    #[error(
        "migration `{migration}` ({source_file}): `{statement}` cannot run inside a transaction, but the migration says transactional = true"
    )]
    NotTransactional {
        migration: String,
        source_file: String,
        statement: String,
    },
    #[error("migration `{migration}`: checksum {sent} does not match its content ({computed})")]
    ChecksumMismatch {
        migration: String,
        sent: String,
        computed: String,
    },
    #[error("migration `{migration}` appears in parallel group {first} and {second}")]
    GroupTwice {
        migration: String,
        first: usize,
        second: usize,
    },
    #[error("migration `{migration}` ({source_file}): [data] {reason}")]
    Data {
        migration: String,
        source_file: String,
        reason: String,
    },
    #[error("invalid {field}: {reason}")]
    Field { field: String, reason: String },
    #[error(
        "migration `{migration}` ({source_file}): {setting} of {ms} ms is over PostgreSQL's limit of {max} ms (about 24.8 days)",
        max = MAX_TIMEOUT_MS
    )]
    Timeout {
        migration: String,
        source_file: String,
        setting: &'static str,
        ms: u64,
    },
}

#[cfg(test)]
mod tenant_name_tests {
    use super::validate_tenant_name;

    #[test]
    fn system_schemas_are_not_tenants() {
        for name in [
            "pg_catalog",
            "pg_toast",
            "pg_temp_3",
            "information_schema",
            "flotilla",
        ] {
            let e = validate_tenant_name(name).unwrap_err();
            assert!(e.contains("system schema"), "{name}: {e}");
        }
        for name in [
            "tenant_0001",
            "Acme Corp",
            "flotilla_app",
            "public",
            "pgbench",
        ] {
            assert_eq!(validate_tenant_name(name), Ok(()), "{name}");
        }
        assert!(validate_tenant_name("").is_err());
        assert!(validate_tenant_name(&"x".repeat(64)).is_err());
        assert!(validate_tenant_name("a\nb").is_err());
    }
}

#[cfg(test)]
mod label_tests {
    use super::parse_labels;

    /// An agent's `--labels`: a key every target has of itself (`shard`, `tenant`), or one
    /// given twice, is refused, naming it (the second value was taken silently).
    #[test]
    fn reserved_and_repeated_label_keys_are_refused() {
        let l = parse_labels("region=eu, tier=gold").unwrap();
        assert_eq!(l.len(), 2);
        for (text, wanted) in [
            ("region=eu,shard=b", "label key `shard` is reserved"),
            ("tenant=x", "label key `tenant` is reserved"),
            ("a=b,a=c", "label key `a` is given twice"),
        ] {
            let e = parse_labels(text).unwrap_err();
            assert!(e.contains(wanted), "{text}: {e}");
        }
    }
}

/// The most SQL (up, down, verify and batch together) one migration of a submitted plan may
/// hold, and a whole plan. Every plan's spec is stored and read back whole (status, the
/// fleet's views, catch-up, a new leader), and sent to every agent: a migration of 30 MB of
/// comments made each `plan explain` and `plan status` take seconds, its agents missed their
/// heartbeats, and the leader lost its term once. Checked of new plans only ([`size_read`]).
pub const MAX_MIGRATION_SQL_BYTES: usize = 8 << 20;
pub const MAX_PLAN_SQL_BYTES: usize = 16 << 20;

/// [`MAX_MIGRATION_SQL_BYTES`] of each migration and [`MAX_PLAN_SQL_BYTES`] of the plan, of
/// an operator's new plan (not a catch-up, made of migrations that passed already). Not part
/// of the model's own check: a stored plan is read with that again, and must still be
/// rebuilt, retried and rolled back.
pub fn size_read(p: &crate::pb::PlanSpec) -> Result<(), PlanError> {
    const HINT: &str = "load bulk data with a batched data change or outside the plan";
    let mut total = 0usize;
    for m in &p.migrations {
        // (its description too: 40 MiB of it in a migration.toml went through)
        let bytes = m.up_sql.len()
            + m.down_sql.len()
            + m.verify_sql.len()
            + m.description.len()
            + m.data.as_ref().map_or(0, |d| d.batch_sql.len());
        if bytes > MAX_MIGRATION_SQL_BYTES {
            return Err(PlanError::TooLarge {
                what: format!("migration `{}`", m.id),
                bytes,
                limit: MAX_MIGRATION_SQL_BYTES,
                hint: HINT,
            });
        }
        total += bytes;
    }
    if total > MAX_PLAN_SQL_BYTES {
        return Err(PlanError::TooLarge {
            what: "the plan".into(),
            bytes: total,
            limit: MAX_PLAN_SQL_BYTES,
            hint: "split it into plans that run one after the other",
        });
    }
    Ok(())
}

/// The lower of a data change's two rate limits that are set (0: unlimited), named by its
/// field: one second of it is the most a batch takes. None when neither is set.
pub fn rate_cap(rows_per_second: u64, server_rows_per_second: u64) -> Option<(&'static str, u64)> {
    [
        ("rows_per_second", rows_per_second),
        ("server_rows_per_second", server_rows_per_second),
    ]
    .into_iter()
    .filter(|(_, r)| *r > 0)
    .min_by_key(|(_, r)| *r)
}

/// An operator's new plan whose data change sets `min_batch_size` above one second of its
/// rate limit (the lower of `rows_per_second` and `server_rows_per_second`, which caps every
/// batch): the floor cannot be kept, and capping it without a word ran smaller batches than
/// the file said. The loader refuses it naming the line; this is the receiver's check, for a
/// plan sent by other means. New plans only (as [`size_read`]): a stored plan capped before
/// must still be read, retried and rolled back.
pub fn batch_floor_read(p: &crate::pb::PlanSpec) -> Result<(), PlanError> {
    for m in &p.migrations {
        let Some(d) = &m.data else { continue };
        if let Some((limit, rate)) = rate_cap(d.rows_per_second, d.server_rows_per_second)
            && u64::from(d.min_batch_size) > rate
        {
            return Err(PlanError::Data {
                migration: m.id.clone(),
                source_file: m.source.clone(),
                reason: format!(
                    "min_batch_size {} is more than {rate}, one second of {limit} \
                     (a batch takes no more than one second of the rate)",
                    d.min_batch_size
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::pb;

    /// A data change whose min_batch_size is above one second of its lower rate is refused
    /// naming the migration, its file, the value and the bound; a default floor (0) is not.
    #[test]
    fn a_batch_floor_above_the_rate_is_refused() {
        let plan = |min: u32, rate: u64, server: u64| pb::PlanSpec {
            migrations: vec![pb::Migration {
                id: "001_fill".into(),
                source: "m/001_fill/migration.toml".into(),
                data: Some(pb::DataChange {
                    min_batch_size: min,
                    rows_per_second: rate,
                    server_rows_per_second: server,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = batch_floor_read(&plan(500, 100, 0))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`001_fill` (m/001_fill/migration.toml)")
                && e.contains("min_batch_size 500 is more than 100, one second of rows_per_second"),
            "{e}"
        );
        let e = batch_floor_read(&plan(50, 100, 40))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("more than 40, one second of server_rows_per_second"),
            "{e}"
        );
        assert_eq!(batch_floor_read(&plan(100, 100, 0)), Ok(()));
        assert_eq!(batch_floor_read(&plan(0, 5, 0)), Ok(()));
        assert_eq!(batch_floor_read(&plan(5000, 0, 0)), Ok(()));
    }

    /// A migration over 8 MiB of SQL is refused naming it; a plan over 16 MiB, naming the
    /// plan.
    #[test]
    fn oversized_migrations_and_plans_are_named() {
        let m = |id: &str, bytes: usize| pb::Migration {
            id: id.into(),
            up_sql: format!("SELECT 1; --{}", "x".repeat(bytes)),
            down_sql: "SELECT 1".into(),
            ..Default::default()
        };
        let plan = |ms: Vec<pb::Migration>| pb::PlanSpec {
            migrations: ms,
            ..Default::default()
        };
        assert_eq!(size_read(&plan(vec![m("001_a", 1000)])), Ok(()));
        let e = size_read(&plan(vec![m("001_a", 10), m("002_big", 9 << 20)]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("migration `002_big` holds 9437"), "{e}");
        assert!(e.contains("over the 8388608"), "{e}");
        let many: Vec<pb::Migration> = (0..9).map(|i| m(&format!("00{i}_m"), 4 << 19)).collect();
        let e = size_read(&plan(many)).unwrap_err().to_string();
        assert!(e.starts_with("the plan holds"), "{e}");
    }
}
