//! Wire -> domain conversion, validated on receipt; domain -> wire for sending.
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::dag::MigrationGraph;
use crate::model::*;
use crate::pb;
use crate::selector::Selector;
use crate::sql;

fn opt_ms(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

fn ms(d: Option<Duration>) -> u64 {
    d.map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn scope_from(v: i32) -> Option<Scope> {
    match pb::Scope::try_from(v).unwrap_or(pb::Scope::Unspecified) {
        pb::Scope::Shard => Some(Scope::Shard),
        pb::Scope::Tenant => Some(Scope::Tenant),
        pb::Scope::Unspecified => None,
    }
}

fn scope_to(s: Option<Scope>) -> i32 {
    match s {
        Some(Scope::Shard) => pb::Scope::Shard as i32,
        Some(Scope::Tenant) => pb::Scope::Tenant as i32,
        None => pb::Scope::Unspecified as i32,
    }
}

impl TryFrom<pb::Migration> for Migration {
    type Error = PlanError;

    fn try_from(m: pb::Migration) -> Result<Migration, PlanError> {
        let id = MigrationId::parse(&m.id)?;
        let source = if m.source.is_empty() {
            m.id.clone()
        } else {
            m.source.clone()
        };
        let depends_on = m
            .depends_on
            .iter()
            .map(|d| MigrationId::parse(d))
            .collect::<Result<Vec<_>, _>>()?;
        let selector = Selector::parse(&m.selector).map_err(|error| PlanError::Selector {
            migration: m.id.clone(),
            source_file: source.clone(),
            error,
        })?;
        let sql_err = |error| PlanError::Sql {
            migration: m.id.clone(),
            source_file: source.clone(),
            error,
        };
        let up = sql::split_statements(&m.up_sql).map_err(sql_err)?;
        let data = match &m.data {
            Some(d) => Some(data_change(&m.id, &source, d)?),
            None => None,
        };
        if up.is_empty() && data.is_none() {
            return Err(PlanError::EmptyUp {
                migration: m.id.clone(),
                source_file: source,
            });
        }
        for (setting, ms) in [
            ("lock_timeout", m.lock_timeout_ms),
            ("statement_timeout", m.statement_timeout_ms),
        ] {
            if ms > MAX_TIMEOUT_MS {
                return Err(PlanError::Timeout {
                    migration: m.id.clone(),
                    source_file: source.clone(),
                    setting,
                    ms,
                });
            }
        }
        let down = sql::split_statements(&m.down_sql).map_err(sql_err)?;
        let verify = sql::split_statements(&m.verify_sql).map_err(sql_err)?;
        for stmts in [&up, &down, &verify] {
            if let Some(s) = sql::first_transaction_control(stmts) {
                return Err(PlanError::TransactionControl {
                    migration: m.id.clone(),
                    source_file: source.clone(),
                    statement: s.to_string(),
                });
            }
        }
        let non_tx =
            sql::first_non_transactional(&up).or_else(|| sql::first_non_transactional(&down));
        let requested = pb::TxMode::try_from(m.tx_mode).unwrap_or_default();
        if data.is_some() && requested == pb::TxMode::Transactional {
            return Err(PlanError::Data {
                migration: m.id.clone(),
                source_file: source,
                reason:
                    "a data migration commits batch by batch; it cannot be transactional = true"
                        .into(),
            });
        }
        // A data migration runs batch by batch, each in its own transaction: as a whole it is
        // not transactional, so the coordinator gives it a run of its own.
        let non_tx = non_tx.or(data.as_ref().map(|_| "[data]"));
        let tx_mode = match (requested, non_tx) {
            (pb::TxMode::Transactional, Some(statement)) => {
                return Err(PlanError::NotTransactional {
                    migration: m.id.clone(),
                    source_file: source,
                    statement: statement.to_string(),
                });
            }
            (pb::TxMode::Transactional, None) => TxMode::Transactional,
            (pb::TxMode::NonTransactional, _) => TxMode::NonTransactional,
            (pb::TxMode::Unspecified, Some(_)) => TxMode::NonTransactional,
            (pb::TxMode::Unspecified, None) => TxMode::Transactional,
        };
        if verify.len() > 1 {
            return Err(PlanError::Field {
                field: format!("verify SQL of `{}` ({source})", m.id),
                reason: "must be one query returning a boolean".into(),
            });
        }
        let computed = match &m.data {
            Some(d) => data_checksum(&m.up_sql, d),
            None => checksum(&m.up_sql),
        };
        if !m.checksum.is_empty() && m.checksum != computed {
            return Err(PlanError::ChecksumMismatch {
                migration: m.id.clone(),
                sent: m.checksum.clone(),
                computed,
            });
        }
        Ok(Migration {
            id,
            description: m.description,
            kind: if m.kind.is_empty() {
                "schema".into()
            } else {
                m.kind.to_ascii_lowercase()
            },
            depends_on,
            scope: scope_from(m.scope),
            selector,
            tx_mode,
            lock_timeout: opt_ms(m.lock_timeout_ms),
            statement_timeout: opt_ms(m.statement_timeout_ms),
            risk: if m.risk.is_empty() {
                "low".into()
            } else {
                m.risk.to_ascii_lowercase()
            },
            up_sql: m.up_sql,
            down_sql: m.down_sql,
            verify_sql: verify.into_iter().next(),
            checksum: computed,
            version: semver(&m.version).map_err(|reason| PlanError::Version {
                what: format!("migration {}", m.id),
                reason,
            })?,
            lint_ignore: lint_ignore(&m.id, &source, m.lint_ignore)?,
            destructive: m.destructive,
            source,
            data,
        })
    }
}

/// `lint.ignore`: a known rule (a typo would silently ignore nothing), with a reason.
fn lint_ignore(
    migration: &str,
    source: &str,
    ignore: Vec<pb::LintIgnore>,
) -> Result<Vec<LintIgnore>, PlanError> {
    ignore
        .into_iter()
        .map(|i| {
            let field = || format!("lint.ignore of `{migration}` ({source})");
            let rule = i.rule.trim().to_string();
            if crate::lint::rule(&rule).is_none() {
                return Err(PlanError::Field {
                    field: field(),
                    reason: format!(
                        "unknown rule `{rule}`: use one of {}",
                        crate::lint::rule_ids().join(", ")
                    ),
                });
            }
            let reason = i.reason.trim().to_string();
            if reason.is_empty() {
                return Err(PlanError::Field {
                    field: field(),
                    reason: format!("rule `{rule}` is ignored without a reason: say why"),
                });
            }
            Ok(LintIgnore { rule, reason })
        })
        .collect()
}

/// How a `[data]` name is written, for the errors that refuse one.
const NAME_SHAPE: &str = "each [A-Za-z_][A-Za-z0-9_$]*, folded to lower case, or double-quoted \
                          as PostgreSQL quotes a name: \"OrderId\"";

/// Validates a `DataChange` on receipt; every error names the migration.
fn data_change(id: &str, source: &str, d: &pb::DataChange) -> Result<DataChange, PlanError> {
    let err = |reason: String| PlanError::Data {
        migration: id.to_string(),
        source_file: source.to_string(),
        reason,
    };
    let key_text = d.key.trim();
    let key = sql_names(key_text, ',').ok_or_else(|| {
        err(format!(
            "key `{key_text}` must be a column name, or column names separated by `,` \
             ({NAME_SHAPE})"
        ))
    })?;
    if key.len() > 8 {
        return Err(err(format!(
            "key `{key_text}` has {} columns; at most 8",
            key.len()
        )));
    }
    if let Some(c) = key
        .iter()
        .enumerate()
        .find_map(|(i, c)| key[..i].contains(c).then_some(c))
    {
        return Err(err(format!(
            "key `{key_text}` names column {} twice",
            name_text(c)
        )));
    }
    let mut prior_image = Vec::with_capacity(d.prior_image.len());
    for c in &d.prior_image {
        let col = sql_name(c).ok_or_else(|| {
            err(format!(
                "prior_image column `{}` must be a column name ({NAME_SHAPE})",
                c.trim()
            ))
        })?;
        if key.contains(&col) {
            return Err(err(format!(
                "prior_image column {} is part of the key: the key finds the rows to restore and must not change",
                name_text(&col)
            )));
        }
        if prior_image.contains(&col) {
            return Err(err(format!(
                "prior_image names column {} twice",
                name_text(&col)
            )));
        }
        prior_image.push(col);
    }
    let table = sql_names(d.table.trim(), '.')
        .filter(|parts| parts.len() <= 2)
        .ok_or_else(|| {
            err(format!(
                "table `{}` must be a table name or schema.table ({NAME_SHAPE})",
                d.table.trim()
            ))
        })?;
    let batch_size = match d.batch_size {
        0 => DEFAULT_BATCH_SIZE,
        n if n > MAX_BATCH_SIZE => {
            return Err(err(format!("batch_size {n} is more than {MAX_BATCH_SIZE}")));
        }
        n => n,
    };
    let sql_err = |what: &str, e: sql::SqlError| err(format!("{what}: {e}"));
    let batch = sql::split_statements(&d.batch_sql).map_err(|e| sql_err("batch SQL", e))?;
    if batch.is_empty() {
        return Err(err("batch SQL is empty".into()));
    }
    if let Some(s) = sql::first_transaction_control(&batch) {
        return Err(err(format!(
            "batch SQL: `{s}` controls the transaction; each batch runs in Flotilla's own"
        )));
    }
    if let Some(s) = sql::first_non_transactional(&batch) {
        return Err(err(format!(
            "batch SQL: `{s}` cannot run inside a batch's transaction"
        )));
    }
    let params = sql::parameters(&d.batch_sql).map_err(|e| sql_err("batch SQL", e))?;
    for (n, what) in [(1, "exclusive lower"), (2, "inclusive upper")] {
        if !params.contains(&n) {
            return Err(err(format!(
                "batch SQL does not use ${n}, the {what} bound of the key: write e.g. `WHERE {k} > $1 AND {k} <= $2`",
                k = if key.len() == 1 {
                    key[0].clone()
                } else {
                    format!("({})", key.join(", "))
                }
            )));
        }
    }
    if let Some(n) = params.iter().find(|&&n| n > 2) {
        return Err(err(format!(
            "batch SQL uses ${n}; only $1 (lower bound) and $2 (upper bound) are given"
        )));
    }
    let filter = d.filter.trim();
    let filter = if filter.is_empty() {
        None
    } else {
        let stmts = sql::split_statements(filter).map_err(|e| sql_err("filter", e))?;
        if stmts.len() != 1
            || !sql::parameters(filter)
                .map_err(|e| sql_err("filter", e))?
                .is_empty()
        {
            return Err(err(
                "filter must be one condition (no `;`, no parameters), e.g. `phone !~ '^\\+'`"
                    .into(),
            ));
        }
        // it is put inside parentheses after the key's bounds: one that closes them would
        // take the bounds off part of the table (`a) OR (b`)
        // spliced into one line of the page's and the batches' SQL: a `--` there would
        // comment out the rest of it
        if sql::has_comment(filter).map_err(|e| sql_err("filter", e))? {
            return Err(err(format!(
                "filter `{filter}` holds a comment: a filter is one condition, without `--` or `/* */`"
            )));
        }
        if !sql::balanced_parentheses(filter).map_err(|e| sql_err("filter", e))? {
            return Err(err(format!(
                "filter `{filter}` has parentheses that do not pair up: a `)` with no `(` \
                 before it, or a `(` never closed"
            )));
        }
        Some(stmts.into_iter().next().expect("one"))
    };
    let target_batch =
        (d.target_batch_ms > 0).then(|| Duration::from_millis(d.target_batch_ms.into()));
    if d.target_batch_ms > MAX_TARGET_BATCH_MS {
        return Err(err(format!(
            "target_batch_ms {} is more than {MAX_TARGET_BATCH_MS} (ten minutes)",
            d.target_batch_ms
        )));
    }
    let min_batch_size = if d.min_batch_size == 0 {
        batch_size.min(10)
    } else {
        d.min_batch_size
    };
    let max_batch_size = if d.max_batch_size == 0 {
        batch_size
            .saturating_mul(10)
            .clamp(batch_size, 100_000.max(batch_size))
    } else {
        d.max_batch_size
    };
    if max_batch_size > MAX_BATCH_SIZE {
        return Err(err(format!(
            "max_batch_size {max_batch_size} is more than {MAX_BATCH_SIZE}"
        )));
    }
    if !(min_batch_size <= batch_size && batch_size <= max_batch_size) {
        return Err(err(format!(
            "batch sizes must satisfy min_batch_size ({min_batch_size}) <= batch_size ({batch_size}) <= max_batch_size ({max_batch_size})"
        )));
    }
    let mut health = Vec::with_capacity(d.health.len());
    for (i, h) in d.health.iter().enumerate() {
        let place = if h.name.is_empty() {
            format!("health check {} ({})", i + 1, h.signal)
        } else {
            format!("health check `{}`", h.name)
        };
        if !h.max.is_finite() || h.max < 0.0 {
            return Err(err(format!(
                "{place}: max must be a number of at least 0, got {}",
                h.max
            )));
        }
        let signal = match h.signal.as_str() {
            "replication_lag_ms" => HealthSignal::ReplicationLagMs,
            "lock_waits" => HealthSignal::LockWaits,
            "active_sessions" => HealthSignal::ActiveSessions,
            "sql" => {
                let stmts = sql::split_statements(&h.sql).map_err(|e| sql_err(&place, e))?;
                if stmts.len() != 1 {
                    return Err(err(format!(
                        "{place}: sql must be one statement that returns one number, got {}",
                        stmts.len()
                    )));
                }
                if !sql::parameters(&h.sql)
                    .map_err(|e| sql_err(&place, e))?
                    .is_empty()
                {
                    return Err(err(format!("{place}: sql takes no parameters")));
                }
                if sql::first_transaction_control(&stmts).is_some() {
                    return Err(err(format!(
                        "{place}: sql must not control the transaction"
                    )));
                }
                HealthSignal::Sql(stmts.into_iter().next().expect("one"))
            }
            other => {
                return Err(err(format!(
                    "{place}: unknown signal `{other}`: use replication_lag_ms, lock_waits, active_sessions or sql"
                )));
            }
        };
        if !matches!(signal, HealthSignal::Sql(_)) && !h.sql.trim().is_empty() {
            return Err(err(format!("{place}: only a `sql` signal takes sql")));
        }
        let name = if h.name.trim().is_empty() {
            signal.as_str().to_string()
        } else {
            h.name.trim().to_string()
        };
        health.push(HealthCheck {
            signal,
            name,
            max: h.max,
        });
    }
    Ok(DataChange {
        table,
        key,
        batch_size,
        rows_per_second: d.rows_per_second,
        batch,
        batch_sql: d.batch_sql.clone(),
        filter,
        target_batch,
        min_batch_size,
        max_batch_size,
        server_rows_per_second: d.server_rows_per_second,
        health,
        prior_image,
    })
}

impl From<&Migration> for pb::Migration {
    fn from(m: &Migration) -> pb::Migration {
        pb::Migration {
            id: m.id.to_string(),
            description: m.description.clone(),
            kind: m.kind.clone(),
            depends_on: m.depends_on.iter().map(ToString::to_string).collect(),
            scope: scope_to(m.scope),
            selector: m.selector.to_string(),
            tx_mode: match m.tx_mode {
                TxMode::Transactional => pb::TxMode::Transactional as i32,
                TxMode::NonTransactional => pb::TxMode::NonTransactional as i32,
            },
            lock_timeout_ms: ms(m.lock_timeout),
            statement_timeout_ms: ms(m.statement_timeout),
            risk: m.risk.clone(),
            up_sql: m.up_sql.clone(),
            down_sql: m.down_sql.clone(),
            verify_sql: m.verify_sql.clone().unwrap_or_default(),
            checksum: m.checksum.clone(),
            source: m.source.clone(),
            version: m.version.clone(),
            destructive: m.destructive,
            lint_ignore: m
                .lint_ignore
                .iter()
                .map(|i| pb::LintIgnore {
                    rule: i.rule.clone(),
                    reason: i.reason.clone(),
                })
                .collect(),
            data: m.data.as_ref().map(|d| pb::DataChange {
                table: d.table_text(),
                key: d.key_text(),
                batch_size: d.batch_size,
                rows_per_second: d.rows_per_second,
                batch_sql: d.batch_sql.clone(),
                filter: d.filter.clone().unwrap_or_default(),
                target_batch_ms: d.target_batch.map(|t| t.as_millis() as u32).unwrap_or(0),
                min_batch_size: d.min_batch_size,
                max_batch_size: d.max_batch_size,
                server_rows_per_second: d.server_rows_per_second,
                health: d
                    .health
                    .iter()
                    .map(|h| pb::HealthCheck {
                        signal: h.signal.as_str().into(),
                        name: h.name.clone(),
                        sql: match &h.signal {
                            HealthSignal::Sql(q) => q.clone(),
                            _ => String::new(),
                        },
                        max: h.max,
                    })
                    .collect(),
                prior_image: d.prior_image.iter().map(|c| name_text(c)).collect(),
            }),
        }
    }
}

impl TryFrom<pb::PlanSpec> for PlanSpec {
    type Error = PlanError;

    fn try_from(p: pb::PlanSpec) -> Result<PlanSpec, PlanError> {
        if p.migrations.is_empty() {
            return Err(PlanError::Empty);
        }
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let mut migrations = Vec::with_capacity(p.migrations.len());
        for m in p.migrations {
            let src = if m.source.is_empty() {
                m.id.clone()
            } else {
                m.source.clone()
            };
            match seen.entry(m.id.clone()) {
                Entry::Occupied(e) => {
                    return Err(PlanError::Duplicate {
                        id: m.id.clone(),
                        first: e.get().clone(),
                        second: src,
                    });
                }
                Entry::Vacant(v) => {
                    v.insert(src);
                }
            }
            migrations.push(Migration::try_from(m)?);
        }
        let selector = Selector::parse(&p.selector).map_err(PlanError::PlanSelector)?;
        let parallel_groups = p
            .parallel_groups
            .iter()
            .map(|g| {
                g.migrations
                    .iter()
                    .map(|id| MigrationId::parse(id))
                    .collect()
            })
            .collect::<Result<Vec<Vec<_>>, _>>()?;
        let atomic_groups: BTreeSet<usize> = p
            .parallel_groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.atomic)
            .map(|(i, _)| i)
            .collect();
        let mut dependencies: BTreeMap<MigrationId, Vec<MigrationId>> = BTreeMap::new();
        for d in &p.dependencies {
            let m = MigrationId::parse(&d.migration)?;
            let ds = d
                .depends_on
                .iter()
                .map(|x| MigrationId::parse(x))
                .collect::<Result<Vec<_>, _>>()?;
            dependencies.entry(m).or_default().extend(ds);
        }
        if p.max_parallel > crate::model::MAX_PARALLEL {
            return Err(PlanError::Field {
                field: "max_parallel".into(),
                reason: format!(
                    "{} is more than {}",
                    p.max_parallel,
                    crate::model::MAX_PARALLEL
                ),
            });
        }
        let policy = match pb::FailurePolicy::try_from(p.policy).unwrap_or_default() {
            pb::FailurePolicy::Unspecified | pb::FailurePolicy::AllOrNothing => {
                FailurePolicy::AllOrNothing
            }
            pb::FailurePolicy::Stop => FailurePolicy::Stop,
            pb::FailurePolicy::Continue => FailurePolicy::Continue,
        };
        if (p.atomic || !atomic_groups.is_empty()) && policy != FailurePolicy::AllOrNothing {
            // A failed vote aborts the unit and the plan with it; stopping or going
            // on would leave the fleet half-migrated, which atomic commit rules out.
            return Err(PlanError::Field {
                field: "policy".into(),
                reason: format!(
                    "`{}` cannot go with atomic commit ({}): an atomic plan undoes everything when a target fails; use all-or-nothing",
                    policy.as_str(),
                    if p.atomic {
                        "atomic = true".to_string()
                    } else {
                        format!(
                            "atomic parallel group {}",
                            atomic_groups.first().map(|g| g + 1).unwrap_or(0)
                        )
                    }
                ),
            });
        }
        if !p.waves.is_empty() && (p.atomic || !atomic_groups.is_empty()) {
            // An atomic unit commits on all of its targets at once; waves roll them a few
            // at a time. The two cannot hold together.
            return Err(PlanError::Field {
                field: "waves".into(),
                reason: "waves cannot go with atomic commit: an atomic unit commits on every target at once, a wave on a few of them".into(),
            });
        }
        let rollout = crate::waves::Rollout::from_pb(
            &p.waves,
            &p.max_failures,
            &p.on_budget_exhausted,
            &p.on_gate_failure,
            p.watch_ms,
            policy,
        )?;
        // The name is printed by every command, audited and logged: no line breaks or
        // terminal escapes in it, and a length a table column can show.
        if p.name.chars().count() > 200 || p.name.chars().any(char::is_control) {
            return Err(PlanError::Field {
                field: "name".into(),
                reason: format!(
                    "{:?}: a plan's name is at most 200 printable characters",
                    p.name.chars().take(80).collect::<String>()
                ),
            });
        }
        let spec = PlanSpec {
            name: if p.name.is_empty() {
                "unnamed".into()
            } else {
                p.name
            },
            description: p.description,
            migrations,
            selector,
            parallel_groups,
            dependencies,
            max_parallel: if p.max_parallel == 0 {
                DEFAULT_MAX_PARALLEL
            } else {
                p.max_parallel
            },
            environment: p.environment,
            policy,
            default_scope: scope_from(p.default_scope),
            // An atomic unit prepares one transaction per target: its steps fuse.
            fuse: !p.no_fuse || p.atomic || !atomic_groups.is_empty(),
            atomic: p.atomic,
            // The whole plan is one unit already.
            atomic_groups: if p.atomic {
                BTreeSet::new()
            } else {
                atomic_groups
            },
            submitted_by: p.submitted_by,
            source: p.source,
            rollout,
            version: semver(&p.version).map_err(|reason| PlanError::Version {
                what: "the plan".into(),
                reason,
            })?,
            catch_up: p.catch_up,
            require_no_drift: p.require_no_drift,
            require_baseline: p.require_baseline,
        };
        // Cycles and unknown names are part of what makes a plan valid.
        MigrationGraph::build(&spec)?;
        Ok(spec)
    }
}

/// A semantic version as `fleet status` shows it: MAJOR.MINOR.PATCH, numbers without
/// leading zeros, an optional `-pre.release` and `+build` of [0-9A-Za-z.-]; "" = none.
fn semver(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(String::new());
    }
    let bad = || format!("`{v}` is not a semantic version like 2.4.0");
    let (core, rest) = match v.find(['-', '+']) {
        Some(i) => (&v[..i], &v[i..]),
        None => (v, ""),
    };
    let numbers: Vec<&str> = core.split('.').collect();
    let number_ok = |n: &&str| {
        !n.is_empty()
            && n.chars().all(|c| c.is_ascii_digit())
            && (n.len() == 1 || !n.starts_with('0'))
    };
    if numbers.len() != 3 || !numbers.iter().all(number_ok) {
        return Err(bad());
    }
    let suffix_ok = rest
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'));
    if !suffix_ok || rest == "-" || rest == "+" {
        return Err(bad());
    }
    Ok(v.to_string())
}

impl From<&PlanSpec> for pb::PlanSpec {
    fn from(p: &PlanSpec) -> pb::PlanSpec {
        let mut out = pb::PlanSpec {
            version: p.version.clone(),
            catch_up: p.catch_up,
            require_no_drift: p.require_no_drift,
            require_baseline: p.require_baseline,
            name: p.name.clone(),
            description: p.description.clone(),
            migrations: p.migrations.iter().map(pb::Migration::from).collect(),
            selector: p.selector.to_string(),
            parallel_groups: p
                .parallel_groups
                .iter()
                .enumerate()
                .map(|(i, g)| pb::ParallelGroup {
                    migrations: g.iter().map(ToString::to_string).collect(),
                    atomic: p.atomic_groups.contains(&i),
                })
                .collect(),
            dependencies: p
                .dependencies
                .iter()
                .map(|(m, ds)| pb::Dependency {
                    migration: m.to_string(),
                    depends_on: ds.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            max_parallel: p.max_parallel,
            environment: p.environment.clone(),
            policy: match p.policy {
                FailurePolicy::AllOrNothing => pb::FailurePolicy::AllOrNothing as i32,
                FailurePolicy::Stop => pb::FailurePolicy::Stop as i32,
                FailurePolicy::Continue => pb::FailurePolicy::Continue as i32,
            },
            default_scope: scope_to(p.default_scope),
            no_fuse: !p.fuse,
            atomic: p.atomic,
            submitted_by: p.submitted_by.clone(),
            source: p.source.clone(),
            ..Default::default()
        };
        p.rollout.to_pb(&mut out);
        out
    }
}

#[cfg(test)]
mod graph_tests {
    use super::*;

    fn chain(n: usize, back_edge: bool) -> pb::PlanSpec {
        let migrations = (0..n)
            .map(|i| pb::Migration {
                id: format!("m{i:06}"),
                up_sql: "SELECT 1".into(),
                depends_on: match (i, back_edge) {
                    (0, true) => vec![format!("m{:06}", n - 1)],
                    (0, false) => Vec::new(),
                    _ => vec![format!("m{:06}", i - 1)],
                },
                ..Default::default()
            })
            .collect();
        pb::PlanSpec {
            name: "long".into(),
            migrations,
            ..Default::default()
        }
    }

    /// A plan's name is printed, audited and logged: a line break, a terminal escape or a
    /// name longer than 200 characters is refused, naming the field; an empty one is
    /// `unnamed`.
    #[test]
    fn a_plans_name_is_printable() {
        let named = |name: &str| {
            PlanSpec::try_from(pb::PlanSpec {
                name: name.into(),
                ..chain(2, false)
            })
        };
        assert_eq!(named("").unwrap().name, "unnamed");
        assert_eq!(
            named("löyalty tiers 2026").unwrap().name,
            "löyalty tiers 2026"
        );
        for bad in [
            "a\nb".to_string(),
            "red \u{1b}[31m".to_string(),
            "x".repeat(201),
        ] {
            let e = named(&bad).unwrap_err().to_string();
            assert!(
                e.contains("name") && e.contains("200 printable"),
                "{bad:?}: {e}"
            );
        }
    }

    /// A chain far deeper than a test thread's 2 MiB stack took recursively: read whole,
    /// and a cycle through all of it named end to end.
    #[test]
    fn a_chain_of_fifty_thousand_migrations_is_read_and_its_cycle_named() {
        let n = 50_000;
        let spec = PlanSpec::try_from(chain(n, false)).expect("a long chain is a plan");
        assert_eq!(spec.migrations.len(), n);
        match PlanSpec::try_from(chain(n, true)) {
            Err(PlanError::Cycle(names)) => {
                assert_eq!(names.len(), n + 1);
                assert_eq!(names.first(), names.last());
            }
            other => panic!("expected the cycle, got {:?}", other.map(|_| ())),
        }
    }
}

#[cfg(test)]
mod timeout_tests {
    use super::*;

    /// A timeout PostgreSQL cannot take is refused on receipt, naming the migration: sent
    /// on, every step's `SET lock_timeout` failed on every target.
    #[test]
    fn timeouts_over_postgresqls_limit_are_refused_on_receipt() {
        let m = |lock, statement| pb::Migration {
            id: "20250201_slow".into(),
            source: "m/20250201_slow".into(),
            up_sql: "CREATE TABLE t (x int)".into(),
            lock_timeout_ms: lock,
            statement_timeout_ms: statement,
            ..Default::default()
        };
        assert!(Migration::try_from(m(MAX_TIMEOUT_MS, 0)).is_ok());
        let e = Migration::try_from(m(MAX_TIMEOUT_MS + 1, 0))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "migration `20250201_slow` (m/20250201_slow): lock_timeout of 2147483648 ms is over PostgreSQL's limit of 2147483647 ms (about 24.8 days)"
        );
        let e = Migration::try_from(m(0, u64::MAX)).unwrap_err().to_string();
        assert!(e.contains("statement_timeout of"), "{e}");
    }
}

#[cfg(test)]
mod data_tests {
    use super::*;

    fn data_migration(batch: &str, key: &str) -> pb::Migration {
        pb::Migration {
            id: "20250201_backfill".into(),
            source: "m/20250201_backfill".into(),
            down_sql: "UPDATE customers SET n = 0".into(),
            data: Some(pb::DataChange {
                table: "Customers".into(),
                key: key.into(),
                batch_size: 0,
                rows_per_second: 0,
                batch_sql: batch.into(),
                filter: String::new(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const BATCH: &str = "UPDATE customers SET n = n + 1 WHERE id > $1 AND id <= $2";

    #[test]
    fn health_checks_and_batch_bounds_are_checked_on_receipt() {
        let mut m = data_migration(BATCH, "id");
        let d = m.data.as_mut().unwrap();
        d.target_batch_ms = 200;
        d.health = vec![
            pb::HealthCheck {
                signal: "replication_lag_ms".into(),
                max: 5000.0,
                ..Default::default()
            },
            pb::HealthCheck {
                signal: "sql".into(),
                name: "queue".into(),
                sql: "SELECT count(*) FROM jobs".into(),
                max: 10.0,
            },
        ];
        let ok = Migration::try_from(m.clone()).unwrap();
        let d = ok.data.unwrap();
        assert_eq!(d.target_batch, Some(Duration::from_millis(200)));
        assert_eq!(
            (d.min_batch_size, d.max_batch_size),
            (10, 10 * d.batch_size)
        );
        assert_eq!(d.health[0].name, "replication_lag_ms");
        assert_eq!(
            d.health[1].signal,
            HealthSignal::Sql("SELECT count(*) FROM jobs".into())
        );

        let bad = |f: &dyn Fn(&mut pb::DataChange), needle: &str| {
            let mut m = m.clone();
            f(m.data.as_mut().unwrap());
            let e = Migration::try_from(m).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        };
        bad(
            &|d| d.health[0].signal = "vibes".into(),
            "unknown signal `vibes`",
        );
        bad(
            &|d| d.health[1].sql = "SELECT 1; SELECT 2".into(),
            "one statement",
        );
        bad(&|d| d.health[1].sql = "SELECT $1".into(), "no parameters");
        bad(&|d| d.health[1].max = f64::NAN, "health check `queue`: max");
        bad(
            &|d| d.health[0].sql = "SELECT 1".into(),
            "only a `sql` signal",
        );
        bad(
            &|d| d.min_batch_size = 5000,
            "min_batch_size (5000) <= batch_size",
        );
    }

    #[test]
    fn a_data_migration_is_valid_without_up_sql() {
        let m = Migration::try_from(data_migration(BATCH, "ID")).unwrap();
        let d = m.data.as_ref().unwrap();
        assert_eq!(m.tx_mode, TxMode::NonTransactional);
        assert_eq!(d.table, vec!["customers".to_string()]);
        assert_eq!(d.key, vec!["id".to_string()]);
        assert_eq!(d.batch_size, DEFAULT_BATCH_SIZE);
        assert_eq!(d.table_sql(), "\"customers\"");
        // the checksum covers the batch SQL, and survives the round trip
        assert_eq!(
            m.checksum,
            data_checksum("", data_migration(BATCH, "ID").data.as_ref().unwrap())
        );
        assert_ne!(m.checksum, checksum(""));
        let other =
            Migration::try_from(data_migration(&BATCH.replace("+ 1", "+ 2"), "id")).unwrap();
        assert_ne!(m.checksum, other.checksum);
        let again = Migration::try_from(pb::Migration::from(&m)).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn batch_sql_must_use_both_bounds() {
        let e = Migration::try_from(data_migration(
            "UPDATE customers SET n = 1 WHERE id > $1",
            "id",
        ))
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("`20250201_backfill`") && msg.contains("$2"),
            "{msg}"
        );
        // a `$2` inside a string does not count
        let e = Migration::try_from(data_migration(
            "UPDATE customers SET s = '$2' WHERE id > $1",
            "id",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("$2"), "{e}");
        let e = Migration::try_from(data_migration(
            "UPDATE customers SET n = $3 WHERE id > $1 AND id <= $2",
            "id",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("$3"), "{e}");
        let e = Migration::try_from(data_migration("COMMIT; SELECT $1, $2", "id")).unwrap_err();
        assert!(e.to_string().contains("controls the transaction"), "{e}");
    }

    /// The filter goes inside parentheses after the key's bounds: one whose parentheses do
    /// not pair up could close them (`key > lower AND (a) OR (b)`: rows below the bound,
    /// done again, or a checkpoint that moves back).
    #[test]
    fn a_filter_is_one_condition_with_its_parentheses_paired() {
        let with_filter = |filter: &str| {
            let mut m = data_migration(BATCH, "id");
            m.data.as_mut().unwrap().filter = filter.into();
            Migration::try_from(m)
        };
        assert!(with_filter("(phone !~ '^\\+') AND (note <> ')')").is_ok());
        for bad in ["a) OR (b", "(a OR b", "x = 1)"] {
            let e = with_filter(bad).unwrap_err().to_string();
            assert!(
                e.contains("`20250201_backfill`")
                    && e.contains(&format!("filter `{bad}`"))
                    && e.contains("do not pair up"),
                "{bad}: {e}"
            );
        }
        let e = with_filter("a = 1; DROP TABLE t").unwrap_err().to_string();
        assert!(e.contains("one condition"), "{e}");
        for commented in ["v IS NULL -- c", "v IS NULL /* c */"] {
            let e = with_filter(commented).unwrap_err().to_string();
            assert!(e.contains("holds a comment"), "{commented}: {e}");
        }
        assert!(with_filter("note <> '-- not a comment'").is_ok());
    }

    #[test]
    fn keys_are_identifiers() {
        // a composite key: columns in order, checksum independent of spacing and case
        let m = Migration::try_from(data_migration(BATCH, "Tenant_id ,id")).unwrap();
        let d = m.data.as_ref().unwrap();
        assert_eq!(d.key, vec!["tenant_id".to_string(), "id".to_string()]);
        assert_eq!(d.key_sql(), "(\"tenant_id\", \"id\")");
        assert_eq!(d.key_text(), "tenant_id, id");
        let again = Migration::try_from(data_migration(BATCH, "tenant_id, id")).unwrap();
        assert_eq!(again.checksum, m.checksum);
        assert_eq!(Migration::try_from(pb::Migration::from(&m)).unwrap(), m);
        let e = Migration::try_from(data_migration(BATCH, "id, id")).unwrap_err();
        assert!(e.to_string().contains("names column id twice"), "{e}");
        let e = Migration::try_from(data_migration(BATCH, "id,")).unwrap_err();
        assert!(e.to_string().contains("column names separated"), "{e}");
        // prior image: columns other than the key, part of the checksum
        let mut p = data_migration(BATCH, "id");
        p.data.as_mut().unwrap().prior_image = vec!["Phone".into(), "n".into()];
        let with = Migration::try_from(p.clone()).unwrap();
        assert_eq!(
            with.data.as_ref().unwrap().prior_image,
            vec!["phone".to_string(), "n".to_string()]
        );
        assert_ne!(
            with.checksum,
            Migration::try_from(data_migration(BATCH, "id"))
                .unwrap()
                .checksum
        );
        assert_eq!(
            Migration::try_from(pb::Migration::from(&with)).unwrap(),
            with
        );
        p.data.as_mut().unwrap().prior_image = vec!["id".into()];
        let e = Migration::try_from(p.clone()).unwrap_err();
        assert!(e.to_string().contains("part of the key"), "{e}");
        p.data.as_mut().unwrap().prior_image = vec!["a b".into()];
        let e = Migration::try_from(p).unwrap_err();
        assert!(e.to_string().contains("prior_image column `a b`"), "{e}");
        let e = Migration::try_from(data_migration(BATCH, "id; DROP TABLE x")).unwrap_err();
        assert!(e.to_string().contains("must be a column name"), "{e}");
        let mut m = data_migration(BATCH, "id");
        m.data.as_mut().unwrap().table = "a.b.c".into();
        assert!(Migration::try_from(m).is_err());
        let mut m = data_migration(BATCH, "id");
        m.tx_mode = pb::TxMode::Transactional as i32;
        assert!(
            Migration::try_from(m)
                .unwrap_err()
                .to_string()
                .contains("transactional")
        );
    }

    #[test]
    fn parameters_bind_outside_quotes() {
        let sql = "UPDATE t SET s = '$1', x = $$ $2 $$ WHERE id>$1 AND id <= $2 -- $1";
        assert_eq!(sql::parameters(sql).unwrap(), vec![1, 2]);
        let bound = sql::bind_parameters(sql, &["'7'", "'14'"]).unwrap();
        assert_eq!(
            bound,
            "UPDATE t SET s = '$1', x = $$ $2 $$ WHERE id> '7'  AND id <=  '14'  -- $1"
        );
    }
}
