//! Plan files (`plan.toml`): which migrations of a directory, in what order and
//! groups, on which targets, and how to react to failure.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use flotilla_core::MigrationId;
use flotilla_core::pb;
use flotilla_core::selector::Selector;
use flotilla_core::{FailurePolicy, Scope};
use serde::Deserialize;
use toml::Spanned;

use super::error::{LoadError, line_of, parse_toml, read_text};
use super::{dir, waves};

/// The plan file that a migration directory may hold.
pub const PLAN_FILE: &str = "plan.toml";

/// `plan.toml`. Every key is optional; unknown keys are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    name: Option<String>,
    description: Option<String>,
    environment: Option<String>,
    /// A semantic version for the plan's migrations that carry none (`fleet status` shows it).
    version: Option<String>,
    /// Tenants that appear after the plan completed get its migrations by themselves.
    catch_up: Option<bool>,
    /// Refuse the plan when one of its targets' schema drifted (`fleet drift`).
    require_no_drift: Option<bool>,
    /// Refuse the plan when another tool's history holds migrations the journal lacks.
    require_baseline: Option<bool>,
    migrations_dir: Option<Spanned<String>>,
    migrations: Option<Vec<Spanned<String>>>,
    selector: Option<Spanned<String>>,
    max_parallel: Option<Spanned<u32>>,
    policy: Option<Spanned<String>>,
    scope: Option<Spanned<String>>,
    fuse: Option<bool>,
    /// Commit every target's transactional steps atomically across shards (2PC).
    atomic: Option<bool>,
    #[serde(default)]
    parallel_groups: Vec<Spanned<GroupEntry>>,
    #[serde(default)]
    dependencies: BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
    /// Progressive rollout: the waves, in order.
    #[serde(default)]
    waves: Vec<Spanned<waves::WaveTable>>,
    /// The plan's error budget (policy continue).
    max_failures: Option<Spanned<waves::BudgetEntry>>,
    /// `halt` (default) or `rollback`.
    on_budget_exhausted: Option<Spanned<String>>,
    /// `halt` (default) or `rollback` when a wave's SQL gate is breached.
    on_gate_failure: Option<Spanned<String>>,
    /// After the last wave, how long its Prometheus gate keeps watching (a duration).
    watch: Option<Spanned<String>>,
}

/// One entry of `parallel_groups`: a list of ids, or a table that can also ask
/// for atomic commit of the group.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a parallel group: a list of migration ids, or a table like { migrations = [\"a\", \"b\"], atomic = true }"
)]
enum GroupEntry {
    // Plain strings: an untagged enum cannot carry toml's spans; errors point at
    // the group.
    Ids(Vec<String>),
    Table(GroupTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupTable {
    migrations: Vec<String>,
    #[serde(default)]
    atomic: bool,
}

/// A directory without a plan file: all its migrations in id order, named after it.
pub(super) fn from_directory(dir: &Path) -> Result<pb::PlanSpec, LoadError> {
    Ok(pb::PlanSpec {
        name: directory_name(dir),
        migrations: dir::read_migrations(dir)?,
        ..Default::default()
    })
}

/// Reads the plan file at `path` and the migrations it names.
pub(super) fn load(path: &Path) -> Result<pb::PlanSpec, LoadError> {
    let text = read_text(path)?;
    let file: PlanFile = parse_toml(path, &text)?;
    let at = |span: std::ops::Range<usize>, message: String| {
        LoadError::at_line(path, line_of(&text, span.start), message)
    };
    let base = path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };

    let migrations_dir = match &file.migrations_dir {
        Some(d) => {
            let resolved = base.join(d.get_ref());
            if !resolved.is_dir() {
                return Err(at(
                    d.span(),
                    format!(
                        "migrations_dir `{}` ({}) is not a directory",
                        d.get_ref(),
                        resolved.display()
                    ),
                ));
            }
            resolved
        }
        None => base.clone(),
    };
    let mut all = dir::read_migrations(&migrations_dir)?;
    let migrations = match &file.migrations {
        None => all,
        Some(ids) => {
            let mut chosen = Vec::with_capacity(ids.len());
            let mut seen = BTreeSet::new();
            for id in ids {
                let name = id.get_ref();
                if !seen.insert(name.as_str()) {
                    return Err(at(id.span(), format!("migration `{name}` is listed twice")));
                }
                let Some(i) = all.iter().position(|m| &m.id == name) else {
                    return Err(at(
                        id.span(),
                        format!(
                            "the plan names migration `{name}`, which is not in {}",
                            migrations_dir.display()
                        ),
                    ));
                };
                chosen.push(all.swap_remove(i));
            }
            // A dependency left out of the list is in the directory, not unknown: say so,
            // and how to run the migration (the journal passes over what is applied).
            for (id, m) in ids.iter().zip(&chosen) {
                if let Some(left) = m
                    .depends_on
                    .iter()
                    .find(|d| all.iter().any(|other| &other.id == *d))
                {
                    return Err(at(
                        id.span(),
                        format!(
                            "migration `{}` depends on `{left}`, which is in {} but not in \
                             the plan's `migrations` list: list it too (on targets where it \
                             is applied already, it is passed over)",
                            m.id,
                            migrations_dir.display()
                        ),
                    ));
                }
            }
            chosen
        }
    };

    let mut spec = pb::PlanSpec {
        name: file.name.clone().unwrap_or_else(|| plan_name(path, &base)),
        description: file.description.clone().unwrap_or_default(),
        environment: file.environment.clone().unwrap_or_default(),
        version: file.version.clone().unwrap_or_default(),
        catch_up: file.catch_up.unwrap_or(false),
        require_no_drift: file.require_no_drift.unwrap_or(false),
        require_baseline: file.require_baseline.unwrap_or(false),
        migrations,
        no_fuse: file.fuse == Some(false),
        atomic: file.atomic.unwrap_or(false),
        ..Default::default()
    };
    if let Some(s) = &file.selector {
        Selector::parse(s.get_ref()).map_err(|e| at(s.span(), e.to_string()))?;
        spec.selector = s.get_ref().trim().to_string();
    }
    if let Some(n) = &file.max_parallel {
        if *n.get_ref() == 0 {
            return Err(at(n.span(), "max_parallel must be at least 1".into()));
        }
        spec.max_parallel = *n.get_ref();
    }
    if let Some(p) = &file.policy {
        spec.policy = policy_enum(p.get_ref())
            .ok_or_else(|| at(p.span(), unknown_policy(p.get_ref())))? as i32;
    }
    if let Some(s) = &file.scope {
        spec.default_scope =
            scope_enum(s.get_ref()).ok_or_else(|| at(s.span(), unknown_scope(s.get_ref())))? as i32;
    }
    // Only that the names are ids: whether they name migrations of the plan, and whether
    // the groups and dependencies make a graph, is decided with the rest of the graph.
    let check_id = |id: &Spanned<String>, place: &str| {
        MigrationId::parse(id.get_ref())
            .map(|_| id.get_ref().clone())
            .map_err(|e| at(id.span(), format!("{place}: {e}")))
    };
    for (g, group) in file.parallel_groups.iter().enumerate() {
        let place = format!("parallel group {}", g + 1);
        let (ids, atomic) = match group.get_ref() {
            GroupEntry::Ids(ids) => (ids, false),
            GroupEntry::Table(t) => (&t.migrations, t.atomic),
        };
        let migrations = ids
            .iter()
            .map(|id| {
                MigrationId::parse(id)
                    .map(|_| id.clone())
                    .map_err(|e| at(group.span(), format!("{place}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        spec.parallel_groups
            .push(pb::ParallelGroup { migrations, atomic });
    }
    for w in &file.waves {
        let wave = waves::wave(w.get_ref()).map_err(|(span, e)| at(span, e))?;
        waves::follows(&spec.waves, w.get_ref(), &wave).map_err(|(span, e)| at(span, e))?;
        spec.waves.push(wave);
    }
    if let Some(b) = &file.max_failures {
        spec.max_failures = waves::budget(b).map_err(|(span, e)| at(span, e))?;
    }
    if let Some(w) = &file.watch {
        spec.watch_ms = humantime::parse_duration(w.get_ref().trim())
            .map_err(|e| {
                at(
                    w.span(),
                    format!("watch `{}`: {e} (e.g. \"15m\")", w.get_ref()),
                )
            })?
            .as_millis() as u64;
        // The watch's own checks, at its line (the model says them naming the field only).
        if spec.watch_ms > 0 {
            if !spec.waves.iter().any(|w| w.prometheus.is_some()) {
                return Err(at(
                    w.span(),
                    "watch: a watch after the last wave needs a wave with a [waves.prometheus] gate to keep evaluating".into(),
                ));
            }
            if let Some(named) = file
                .waves
                .iter()
                .find(|t| t.get_ref().named(flotilla_core::waves::WATCH))
            {
                return Err(at(
                    named.get_ref().name_span(),
                    format!(
                        "wave `{}`: the stage after the last wave (watch) has this name; name the wave otherwise",
                        flotilla_core::waves::WATCH
                    ),
                ));
            }
        }
    }
    if let Some(o) = &file.on_gate_failure {
        match o.get_ref().trim() {
            "halt" | "rollback" => spec.on_gate_failure = o.get_ref().trim().to_string(),
            other => {
                return Err(at(
                    o.span(),
                    format!("on_gate_failure = `{other}`: use halt or rollback"),
                ));
            }
        }
    }
    if let Some(o) = &file.on_budget_exhausted {
        match o.get_ref().trim() {
            "halt" | "rollback" => spec.on_budget_exhausted = o.get_ref().trim().to_string(),
            other => {
                return Err(at(
                    o.span(),
                    format!("on_budget_exhausted = `{other}`: use halt or rollback"),
                ));
            }
        }
    }
    for (key, deps) in &file.dependencies {
        let migration = check_id(key, "[dependencies]")?;
        let place = format!("dependencies of `{migration}`");
        let depends_on = deps
            .iter()
            .map(|id| check_id(id, &place))
            .collect::<Result<_, _>>()?;
        spec.dependencies.push(pb::Dependency {
            migration,
            depends_on,
        });
    }
    Ok(spec)
}

/// A plan file's default name: its stem, or its directory's name for `plan.toml`.
fn plan_name(path: &Path, base: &Path) -> String {
    match path.file_stem().and_then(|s| s.to_str()) {
        Some(stem) if path.file_name().is_some_and(|n| n != PLAN_FILE) => stem.to_string(),
        _ => directory_name(base),
    }
}

fn directory_name(dir: &Path) -> String {
    let named = |p: &Path| p.file_name().and_then(|n| n.to_str()).map(str::to_string);
    named(dir)
        .filter(|n| n != "." && n != "..")
        .or_else(|| fs::canonicalize(dir).ok().as_deref().and_then(named))
        .unwrap_or_else(|| "unnamed".into())
}

pub(super) fn policy_enum(s: &str) -> Option<pb::FailurePolicy> {
    FailurePolicy::parse(s).map(|p| match p {
        FailurePolicy::AllOrNothing => pb::FailurePolicy::AllOrNothing,
        FailurePolicy::Stop => pb::FailurePolicy::Stop,
        FailurePolicy::Continue => pb::FailurePolicy::Continue,
    })
}

pub(super) fn unknown_policy(s: &str) -> String {
    format!("unknown failure policy `{s}`: use all-or-nothing, stop or continue")
}

/// A scope name; `auto` (or empty) leaves the choice to the coordinator.
pub(super) fn scope_enum(s: &str) -> Option<pb::Scope> {
    if matches!(s.trim().to_ascii_lowercase().as_str(), "" | "auto") {
        return Some(pb::Scope::Unspecified);
    }
    Scope::parse(s).map(|s| match s {
        Scope::Shard => pb::Scope::Shard,
        Scope::Tenant => pb::Scope::Tenant,
    })
}

pub(super) fn unknown_scope(s: &str) -> String {
    format!("unknown scope `{s}`: use tenant, shard or auto")
}
