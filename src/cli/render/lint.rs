//! What `plan lint` prints, and where a finding points (`plan submit` prints its
//! warnings the same way).
use flotilla_core::pb;
use serde_json::{Value, json};

use crate::cli::Output;

/// The SQL of a migration's part a finding names (empty for migration.toml).
pub fn part_sql<'a>(file: &str, up: &'a str, down: &'a str, verify: &'a str) -> &'a str {
    match file {
        "up.sql" => up,
        "down.sql" => down,
        "verify.sql" => verify,
        _ => "",
    }
}

/// Where a finding points, as `path:line` an editor opens: a native migration's part is
/// a file in its directory; a dbmate migration's part is a section of its one file, whose
/// line in the file is found by looking for the section's text there.
pub fn finding_at(source: &str, part_sql: &str, f: &pb::LintFinding) -> String {
    let path = std::path::Path::new(source);
    if path.extension().is_none_or(|e| e != "sql") {
        let file = path.join(&f.file).display().to_string();
        return if f.line > 0 {
            format!("{file}:{}", f.line)
        } else {
            file
        };
    }
    let first_line = std::fs::read_to_string(path).ok().and_then(|text| {
        let at = text
            .find(part_sql.trim())
            .filter(|_| !part_sql.trim().is_empty())?;
        Some(text[..at].matches('\n').count() as u32 + 1)
    });
    match first_line {
        Some(first) if f.line > 0 => format!("{source}:{}", first + f.line - 1),
        _ => source.to_string(),
    }
}

/// A finding for people: `warning[rule] MIGRATION at PATH:LINE: message`, then the fix.
pub fn finding_text(at: &str, f: &pb::LintFinding) -> String {
    format!(
        "{}[{}] {} at {at}: {}\n    fix: {}",
        f.severity, f.rule, f.migration, f.message, f.hint
    )
}

pub fn lint(spec: &flotilla_core::PlanSpec, findings: &[pb::LintFinding], output: Output) {
    let at = |f: &pb::LintFinding| match spec
        .migrations
        .iter()
        .find(|m| m.id.as_str() == f.migration)
    {
        Some(m) => {
            let verify = m.verify_sql.as_deref().unwrap_or_default();
            finding_at(
                &m.source,
                part_sql(&f.file, &m.up_sql, &m.down_sql, verify),
                f,
            )
        }
        None => f.migration.clone(),
    };
    let errors = findings.iter().filter(|f| f.severity == "error").count();
    let warnings = findings.len() - errors;
    let graph = flotilla_core::dag::MigrationGraph::build(spec).ok();
    let order: Vec<String> = graph
        .map(|g| {
            g.order
                .iter()
                .map(|&i| spec.migrations[i].id.to_string())
                .collect()
        })
        .unwrap_or_default();
    if output == Output::Json {
        println!(
            "{}",
            json!({
                "name": spec.name,
                // Well formed (it parsed, its DAG holds); `valid` only when no finding is
                // an error, as the exit code says: a script reading `valid` must not
                // take a plan the submit would refuse.
                "well_formed": true,
                "valid": errors == 0,
                "order": order,
                "migrations": spec.migrations.iter().map(|m| json!({
                    "id": m.id.to_string(),
                    "checksum": m.checksum,
                    "transactional": m.tx_mode == flotilla_core::TxMode::Transactional,
                    "scope": m.scope.map(|s| s.as_str()),
                    "selector": m.selector.to_string(),
                })).collect::<Vec<_>>(),
                "waves": spec.rollout.waves.iter().map(wave_lint).collect::<Vec<_>>(),
                "errors": errors,
                "warnings": warnings,
                "findings": findings.iter().map(|f| json!({
                    "rule": f.rule,
                    "severity": f.severity,
                    "migration": f.migration,
                    "file": f.file,
                    "line": f.line,
                    "at": at(f),
                    "message": f.message,
                    "hint": f.hint,
                })).collect::<Vec<_>>(),
            })
        );
        return;
    }
    // Well formed; whether it may run is the lint's to say, below.
    println!(
        "plan {} is well formed: {} migrations",
        spec.name,
        spec.migrations.len()
    );
    for id in order {
        let m = spec
            .migrations
            .iter()
            .find(|m| m.id.as_str() == id)
            .expect("in plan");
        println!(
            "  {id}  {}{}",
            if m.tx_mode == flotilla_core::TxMode::Transactional {
                "transactional"
            } else {
                "non-transactional"
            },
            if m.selector.is_empty() {
                String::new()
            } else {
                format!("  selector: {}", m.selector)
            }
        );
    }
    if !spec.rollout.waves.is_empty() {
        println!("waves:");
        for w in &spec.rollout.waves {
            let v = wave_lint(w);
            println!(
                "  {}: {}",
                w.name,
                v["summary"].as_str().unwrap_or_default()
            );
        }
        // after the last wave, as it happens (it was printed before the first)
        if !spec.rollout.watch.is_zero() {
            println!(
                "  (then watched for {}: a breach rolls the plan back)",
                humantime::format_duration(spec.rollout.watch)
            );
        }
    }
    if findings.is_empty() {
        println!("lint: no findings");
        return;
    }
    println!("lint: {errors} error(s), {warnings} warning(s)");
    for f in findings {
        println!("{}", finding_text(&at(f), f));
    }
}

/// A wave as `plan lint` describes it: what it takes, how fast, what must hold after it.
fn wave_lint(w: &flotilla_core::waves::Wave) -> Value {
    use flotilla_core::waves::Take;
    let take = match &w.take {
        Take::Selector(s) => format!("targets with {s}"),
        Take::Percent(p) => format!("{p}% of the targets left"),
        Take::Count(n) => format!("{n} of the targets left"),
        Take::Rest => "every target left".to_string(),
    };
    let mut parts = vec![take];
    if let Some(n) = w.max_parallel {
        parts.push(format!("max_parallel {n}"));
    }
    if let Some(n) = w.max_parallel_per_shard {
        parts.push(format!("{n} per shard"));
    }
    if let Some(b) = w.budget {
        parts.push(format!("max_failures {b}"));
    }
    if !w.bake.is_zero() {
        parts.push(format!("bake {}", humantime::format_duration(w.bake)));
    }
    if !w.checks.is_empty() {
        let names: Vec<&str> = w.checks.iter().map(|c| c.name.as_str()).collect();
        parts.push(format!("SQL gates: {}", names.join("; ")));
    }
    if let Some(p) = &w.prometheus {
        parts.push(format!("Prometheus gate: {}", p.query));
    }
    if w.manual_gate {
        parts.push("manual gate".into());
    }
    if w.optional {
        parts.push("optional".into());
    }
    json!({
        "name": w.name,
        "summary": parts.join(", "),
        "bake_ms": w.bake.as_millis() as u64,
        "manual_gate": w.manual_gate,
    })
}
