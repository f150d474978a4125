//! Data migrations at admission: what the agents found missing on a data migration's
//! targets refuses the plan, unless an earlier migration of the plan may create it.
use std::collections::BTreeMap;

use flotilla_core::dag::MigrationGraph;
use flotilla_core::protocol::DataProblemKind;
use flotilla_core::{PlanSpec, pb};

use super::preflight::StepKey;
use crate::error::{CoordinatorError, Refusal, some_of};
use crate::planner::Expansion;

/// Refuses a plan whose data migration cannot run on one of its targets, as the preflight
/// found it (table missing, key column missing, key not unique or of a type that cannot
/// order batches), naming the migration, the targets and the problem: nothing has run yet.
/// A missing table or column, or a key without a unique index, is let through when an
/// earlier migration of the plan mentions the name (it may create it); the agent checks
/// again before the first batch. So is a filter or batch SQL that PostgreSQL refuses (the
/// agents plan it with EXPLAIN) when an earlier migration, or the change's own up SQL
/// (run before its first batch), mentions the name PostgreSQL says is missing, or the
/// table for another error: its check is then said to be skipped (the returned warning),
/// and its first batch is what finds a mistake.
pub(super) fn check_data_problems(
    spec: &PlanSpec,
    expansion: &Expansion,
    problems: &BTreeMap<StepKey, pb::DataProblem>,
) -> Result<Option<String>, CoordinatorError> {
    if problems.is_empty() {
        return Ok(None);
    }
    // migration -> (targets, a problem) of the statement checks skipped
    let mut skipped: BTreeMap<usize, (usize, &pb::DataProblem)> = BTreeMap::new();
    let graph = MigrationGraph::build(spec)?;
    let mut found: BTreeMap<usize, (Vec<String>, &pb::DataProblem)> = BTreeMap::new();
    for s in &expansion.steps {
        let m = &spec.migrations[s.migration];
        if m.data.is_none() {
            continue;
        }
        let target = &expansion.targets[s.target];
        let Some(p) = problems.get(&(
            m.id.to_string(),
            target.shard.clone(),
            target.tenant.clone(),
        )) else {
            continue;
        };
        // an earlier step may create what is missing, or the unique index (or the type) a
        // key needs
        let exempt = !p.name.is_empty()
            && match p.kind.parse::<DataProblemKind>() {
                Ok(DataProblemKind::NoTable | DataProblemKind::NoColumn) => {
                    may_create(spec, &graph, s.migration, &p.name, &[])
                }
                Ok(DataProblemKind::Shape) => may_create(
                    spec,
                    &graph,
                    s.migration,
                    &p.name,
                    &["unique", "primary", "type"],
                ),
                Ok(DataProblemKind::Statement) => {
                    may_create(spec, &graph, s.migration, &p.name, &[])
                        || mentions(&m.up_sql, &p.name)
                }
                Ok(DataProblemKind::Error) | Err(_) => false,
            };
        if exempt {
            if p.kind == DataProblemKind::Statement.as_str() {
                skipped.entry(s.migration).or_insert((0, p)).0 += 1;
            }
            continue;
        }
        let entry = found.entry(s.migration).or_insert_with(|| (Vec::new(), p));
        entry.0.push(target.to_string());
    }
    let Some((&i, (targets, p))) = found.iter().next() else {
        let said: Vec<String> = skipped
            .iter()
            .map(|(&i, (targets, p))| {
                let m = &spec.migrations[i];
                format!(
                    "data migration `{}` ({}): its SQL was not checked on {targets} target(s), \
                     where {}; an earlier migration of the plan (or its own up SQL) mentions \
                     {}, so it may be right once that ran: its first batch will tell",
                    m.id,
                    m.source,
                    p.message,
                    flotilla_core::name_text(&p.name)
                )
            })
            .collect();
        return Ok((!said.is_empty()).then(|| said.join("; ")));
    };
    let m = &spec.migrations[i];
    Err(Refusal::DataProblem {
        migration: m.id.to_string(),
        source_path: m.source.clone(),
        targets: some_of(targets, 5),
        problem: p.message.clone(),
    }
    .into())
}

/// Whether the up SQL of a migration that `i` waits for (directly or not) mentions `name`
/// as a word (and, when `also` is not empty, one of those words too): it may create that
/// table or column, or the table's unique index. The migration's own up SQL does not count:
/// the agent checks the key before running it.
fn may_create(
    spec: &PlanSpec,
    graph: &MigrationGraph,
    i: usize,
    name: &str,
    also: &[&str],
) -> bool {
    let mut seen = vec![false; spec.migrations.len()];
    let mut stack = vec![i];
    while let Some(j) = stack.pop() {
        if std::mem::replace(&mut seen[j], true) {
            continue;
        }
        let up = &spec.migrations[j].up_sql;
        if j != i && mentions(up, name) && (also.is_empty() || also.iter().any(|w| mentions(up, w)))
        {
            return true;
        }
        stack.extend(graph.deps[j].iter().copied());
    }
    false
}

/// `name` as a whole word of `sql`, case-insensitively; a name only quotes can spell
/// (`"Orders"`) as that quoted name, case and all.
fn mentions(sql: &str, name: &str) -> bool {
    let text = flotilla_core::name_text(name);
    if text.starts_with('"') {
        return sql.contains(&text);
    }
    let sql = sql.to_ascii_lowercase();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$';
    sql.match_indices(name).any(|(at, _)| {
        let before = sql[..at].chars().next_back();
        let after = sql[at + name.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}
