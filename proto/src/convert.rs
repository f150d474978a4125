//! Wire -> domain conversion, validated on receipt; domain -> wire for sending.
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
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
        if up.is_empty() {
            return Err(PlanError::EmptyUp {
                migration: m.id.clone(),
                source_file: source,
            });
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
        let tx_mode = match (pb::TxMode::try_from(m.tx_mode).unwrap_or_default(), non_tx) {
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
        let computed = checksum(&m.up_sql);
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
            source,
        })
    }
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
        if p.max_parallel > 10_000 {
            return Err(PlanError::Field {
                field: "max_parallel".into(),
                reason: format!("{} is more than 10000", p.max_parallel),
            });
        }
        let policy = match pb::FailurePolicy::try_from(p.policy).unwrap_or_default() {
            pb::FailurePolicy::Unspecified | pb::FailurePolicy::AllOrNothing => {
                FailurePolicy::AllOrNothing
            }
            pb::FailurePolicy::Stop => FailurePolicy::Stop,
            pb::FailurePolicy::Continue => FailurePolicy::Continue,
        };
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
            // An atomic plan prepares one transaction per target: its steps fuse.
            fuse: !p.no_fuse || p.atomic,
            atomic: p.atomic,
            submitted_by: p.submitted_by,
            source: p.source,
        };
        // Cycles and unknown names are part of what makes a plan valid.
        MigrationGraph::build(&spec)?;
        Ok(spec)
    }
}

impl From<&PlanSpec> for pb::PlanSpec {
    fn from(p: &PlanSpec) -> pb::PlanSpec {
        pb::PlanSpec {
            name: p.name.clone(),
            description: p.description.clone(),
            migrations: p.migrations.iter().map(pb::Migration::from).collect(),
            selector: p.selector.to_string(),
            parallel_groups: p
                .parallel_groups
                .iter()
                .map(|g| pb::ParallelGroup {
                    migrations: g.iter().map(ToString::to_string).collect(),
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
        }
    }
}
