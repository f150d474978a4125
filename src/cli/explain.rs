//! `plan explain PATH` / `plan submit PATH --dry-run`: the coordinator resolves the plan as a
//! submit would and asks the agents for the sizes of what it touches, changing nothing; this
//! prints what it found, per migration and target class.
use flotilla_core::pb;
use serde_json::{Value, json};

use super::call::{acting, call_leader};
use super::{EXIT_BAD_INPUT, EXIT_OK, EXIT_UNAVAILABLE, Output, SubmitArgs};
use crate::loader;

pub(super) async fn run(addr: &str, args: &SubmitArgs) -> u8 {
    if args.wait {
        eprintln!("error: --wait does not apply to a dry run: nothing is submitted");
        return EXIT_BAD_INPUT;
    }
    let overrides = super::plan::overrides(args);
    let mut raw = match loader::load(&args.path, &overrides) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    if let Err(e) = flotilla_core::PlanSpec::try_from(raw.clone()) {
        eprintln!("error: {}: {e}", args.path.display());
        return EXIT_BAD_INPUT;
    }
    raw.submitted_by = acting(args.actor.clone());
    if let Some(env) = &args.promotion.environment {
        raw.environment = env.trim().to_string();
    }
    let req = pb::SubmitPlanRequest {
        spec: Some(raw),
        skip_promotion_check: args.promotion.skip_promotion_check,
        override_reason: args.promotion.reason.clone().unwrap_or_default(),
        ..Default::default()
    };
    call_leader(
        addr,
        req,
        |mut c, req| async move { c.explain_plan(req).await },
        |resp| {
            match args.output {
                Output::Json => println!("{}", to_json(&resp)),
                Output::Text => print!("{}", to_text(&resp)),
            }
            // A plan the lint's errors would have a submit refuse: refused here too (a
            // pipeline gating on the dry run's exit code passed it, and the submit failed).
            // (the submit's lint, without the sizes: errors the sizes add are warned of)
            // (with --output json, what was "shown above" on stderr is in the JSON on stdout)
            let shown = match args.output {
                Output::Json => "in the JSON",
                Output::Text => "shown above",
            };
            if resp.submit_lint_errors > 0 {
                eprintln!(
                    "error: a submit would refuse this plan: the lint found errors ({shown}: each \
                     migration's findings)"
                );
                EXIT_BAD_INPUT
            } else if !resp.unknown_shards.is_empty() {
                // as the submit now: refused while a shard it selects targets on does not
                // answer (a pipeline gating on the dry run passed, and the submit failed)
                eprintln!(
                    "error: a submit now would be refused: {} ({shown}); the rest is what the \
                     coordinator last knew",
                    resp.unknown_shards.join("; ")
                );
                EXIT_UNAVAILABLE
            } else {
                EXIT_OK
            }
        },
    )
    .await
}

fn to_json(r: &pb::ExplainResponse) -> Value {
    json!({
        "name": r.name,
        "targets": r.targets,
        "steps": r.steps,
        "already_applied": r.already_applied,
        "max_parallel": r.max_parallel,
        "estimate_ms": r.estimate_ms,
        "estimate_basis": r.estimate_basis,
        "approval": r.approval,
        "unknown_shards": r.unknown_shards,
        "warnings": r.warnings,
        "waves": r.waves.iter().map(|w| json!({"name": w.name, "targets": w.targets, "max_parallel": w.max_parallel})).collect::<Vec<_>>(),
        "migrations": r.migrations.iter().map(migration_json).collect::<Vec<_>>(),
    })
}

fn migration_json(m: &pb::ExplainMigration) -> Value {
    json!({
        "id": m.id,
        "kind": m.kind,
        "scope": m.scope,
        "tx_mode": m.tx_mode,
        "risk": m.risk,
        "targets": m.targets,
        "already_applied": m.already_applied,
        "statements": m.statements.iter().map(|s| json!({
            "line": s.line,
            "text": s.text,
            "kind": s.kind,
            "locks": s.locks.iter().map(|l| json!({"relation": l.relation, "mode": l.mode})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "statements_error": m.statements_error,
        "relations": m.relations.iter().map(|r| json!({
            "relation": r.relation,
            "present": r.present,
            "missing": r.missing,
            "unknown": r.unknown,
            "bytes": {"min": r.min_bytes, "median": r.median_bytes, "max": r.max_bytes},
            "rows": {"min": r.min_rows, "median": r.median_rows, "max": r.max_rows},
            "targets": r.per_target.iter().map(|t| json!({
                "target": t.target,
                "state": t.state,
                "bytes": t.bytes,
                "rows": t.rows,
                "error": t.error,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "step_estimate_ms": m.step_estimate_ms,
        "estimate_ms": m.estimate_ms,
        "estimate_basis": m.estimate_basis,
        "findings": m.findings.iter().map(|f| json!({
            "rule": f.rule,
            "severity": f.severity,
            "file": f.file,
            "line": f.line,
            "message": f.message,
            "hint": f.hint,
        })).collect::<Vec<_>>(),
    })
}

fn to_text(r: &pb::ExplainResponse) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "dry run of plan {}: {} targets, {} steps ({} applied already), {} targets at once; nothing was changed",
        r.name, r.targets, r.steps, r.already_applied, r.max_parallel
    );
    let estimate = if r.steps > 0 && r.already_applied >= r.steps {
        // (it printed the basis of a sum over nothing, without a figure)
        "none: every step is applied already".to_string()
    } else if r.estimate_ms == 0 {
        r.estimate_basis.clone()
    } else {
        format!("{} ({})", duration(r.estimate_ms), r.estimate_basis)
    };
    let _ = writeln!(o, "estimated duration: {estimate}");
    if !r.approval.is_empty() {
        let _ = writeln!(o, "would wait for {}", r.approval);
    }
    for w in &r.warnings {
        let _ = writeln!(o, "{w}");
    }
    for s in &r.unknown_shards {
        let _ = writeln!(o, "unknown: {s}");
    }
    let _ = writeln!(o, "waves:");
    for w in &r.waves {
        // a wave's own parallelism wins over the plan's (and over --max-parallel)
        let at_once = if w.max_parallel > 0 {
            format!(", {} at once", w.max_parallel)
        } else {
            String::new()
        };
        let _ = writeln!(
            o,
            "  {}: {} target(s){at_once}: {}",
            w.name,
            w.targets.len(),
            some_of(&w.targets, 8)
        );
    }
    for m in &r.migrations {
        let _ = writeln!(
            o,
            "\nmigration {} ({}, per {}, {}{}): {} target(s), {} applied already",
            m.id,
            if m.kind.is_empty() { "schema" } else { &m.kind },
            m.scope,
            m.tx_mode,
            if m.risk.is_empty() {
                String::new()
            } else {
                format!(", risk {}", m.risk)
            },
            m.targets,
            m.already_applied
        );
        if !m.statements_error.is_empty() {
            let _ = writeln!(
                o,
                "  statements could not be parsed: {}",
                m.statements_error
            );
        }
        for s in &m.statements {
            let text: String = s.text.split_whitespace().collect::<Vec<_>>().join(" ");
            let _ = writeln!(o, "  line {}: {}", s.line, shorten(&text, 100));
            for l in &s.locks {
                let _ = writeln!(o, "      takes {} on {}", l.mode, l.relation);
            }
        }
        for rel in &m.relations {
            let mut line = format!("  {}: on {} target(s)", rel.relation, rel.present);
            if rel.present > 0 {
                let _ = write!(
                    line,
                    ", size {} / {} / {} (min / median / max)",
                    bytes(rel.min_bytes),
                    bytes(rel.median_bytes),
                    bytes(rel.max_bytes)
                );
                if rel.median_rows >= 0 {
                    let _ = write!(
                        line,
                        ", rows ~{} / {} / {}",
                        rel.min_rows, rel.median_rows, rel.max_rows
                    );
                } else {
                    line.push_str(", rows not estimated (never analyzed)");
                }
            }
            if rel.missing > 0 {
                // which (a relation the migration alters, missing on a few targets, is
                // where it will fail: the count alone did not say where to look)
                let missing: Vec<String> = rel
                    .per_target
                    .iter()
                    .filter(|t| t.state == "missing")
                    .map(|t| t.target.clone())
                    .collect();
                let _ = write!(line, "; missing on {}", rel.missing);
                if !missing.is_empty() && rel.present > 0 {
                    let _ = write!(line, ": {}", some_of(&missing, 5));
                }
            }
            if rel.unknown > 0 {
                let _ = write!(line, "; unknown on {}", rel.unknown);
            }
            let _ = writeln!(o, "{line}");
        }
        if m.step_estimate_ms == 0 {
            let _ = writeln!(o, "  estimate: {}", m.estimate_basis);
        } else {
            let _ = writeln!(
                o,
                "  estimate: {} a target, {} in all ({})",
                duration(m.step_estimate_ms),
                duration(m.estimate_ms),
                m.estimate_basis
            );
        }
        for f in &m.findings {
            let _ = writeln!(
                o,
                "  lint {} {} ({}:{}): {} (fix: {})",
                f.severity, f.rule, f.file, f.line, f.message, f.hint
            );
        }
    }
    o
}

fn some_of(items: &[String], n: usize) -> String {
    if items.len() <= n {
        items.join(", ")
    } else {
        format!("{}, ... ({} more)", items[..n].join(", "), items.len() - n)
    }
}

fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

fn bytes(b: i64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn duration(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relation missing on some targets and present on others is named where it is
    /// missing (the migration altering it fails there); one missing everywhere (made by the
    /// migration) is counted only.
    #[test]
    fn a_relation_missing_on_some_targets_names_them() {
        let target = |t: &str, state: &str| pb::TargetSize {
            target: t.into(),
            state: state.into(),
            ..Default::default()
        };
        let r = pb::ExplainResponse {
            name: "p".into(),
            migrations: vec![pb::ExplainMigration {
                id: "001_a".into(),
                relations: vec![
                    pb::RelationSizes {
                        relation: "repair_orders".into(),
                        present: 1,
                        missing: 2,
                        per_target: vec![
                            target("shard_0/tenant_0001", "present"),
                            target("shard_3/tenant_0299", "missing"),
                            target("shard_1/tenant_0120", "missing"),
                        ],
                        ..Default::default()
                    },
                    pb::RelationSizes {
                        relation: "made_here".into(),
                        missing: 1,
                        per_target: vec![target("shard_0/tenant_0001", "missing")],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = to_text(&r);
        assert!(
            text.contains("; missing on 2: shard_3/tenant_0299, shard_1/tenant_0120\n"),
            "{text}"
        );
        assert!(
            text.contains("  made_here: on 0 target(s); missing on 1\n"),
            "{text}"
        );
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(8192), "8.0 kB");
        assert_eq!(bytes(3 * 1024 * 1024 + 512 * 1024), "3.5 MB");
    }

    #[test]
    fn text_says_no_history_and_names_unknown_shards() {
        let r = pb::ExplainResponse {
            name: "p".into(),
            targets: 2,
            steps: 2,
            estimate_basis: "no history".into(),
            unknown_shards: vec!["shard_1: its agent is not attached".into()],
            migrations: vec![pb::ExplainMigration {
                id: "001_a".into(),
                scope: "tenant".into(),
                tx_mode: "transactional".into(),
                targets: 2,
                statements: vec![pb::ExplainStatement {
                    line: 1,
                    text: "ALTER TABLE t ADD COLUMN x int".into(),
                    kind: "ALTER TABLE".into(),
                    locks: vec![pb::StatementLock {
                        relation: "t".into(),
                        mode: "ACCESS EXCLUSIVE".into(),
                    }],
                }],
                estimate_basis: "no history".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = to_text(&r);
        assert!(text.contains("estimated duration: no history"), "{text}");
        // every step applied already: nothing to estimate, said so
        let all_applied = pb::ExplainResponse {
            steps: 2,
            already_applied: 2,
            estimate_basis: "sum over migrations of their steps".into(),
            ..r.clone()
        };
        assert!(
            to_text(&all_applied)
                .contains("estimated duration: none: every step is applied already"),
            "{}",
            to_text(&all_applied)
        );
        assert!(
            text.contains("unknown: shard_1: its agent is not attached"),
            "{text}"
        );
        assert!(text.contains("takes ACCESS EXCLUSIVE on t"), "{text}");
        let v = to_json(&r);
        assert_eq!(
            v["migrations"][0]["statements"][0]["locks"][0]["mode"],
            "ACCESS EXCLUSIVE"
        );
    }
}
