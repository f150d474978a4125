//! The list commands' output: `plan list`, `fleet list`, `locks list`, `audit list`.
use std::time::Duration;

use flotilla_core::pb;
use serde_json::{Value, json};

use crate::cli::Output;

pub fn plan_list(r: &pb::ListPlansResponse, output: Output) {
    if output == Output::Json {
        let v: Vec<Value> = r
            .plans
            .iter()
            .map(|p| {
                json!({
                    "plan_id": p.plan_id, "name": p.name, "state": p.state, "environment": p.environment,
                    "created_at_ms": p.created_at_ms, "updated_at_ms": p.updated_at_ms,
                    "targets": p.targets, "steps": p.steps,
                })
            })
            .collect();
        println!("{}", Value::Array(v));
        return;
    }
    // Columns as wide as their longest value (`completed_with_failures`, a catch-up plan's
    // name), the name last but for the counts: fixed widths let long ones push the rest out.
    let state = r
        .plans
        .iter()
        .map(|p| p.state.len())
        .max()
        .unwrap_or(0)
        .max(5);
    let name = r
        .plans
        .iter()
        .map(|p| p.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    // when each was submitted (UTC, to the second): the list had no time at all
    let at = |ms: u64| {
        std::time::UNIX_EPOCH
            .checked_add(Duration::from_millis(ms))
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_default()
    };
    println!(
        "{:<14} {:<20} {:<state$} {:<name$} {:>8} {:>8}",
        "PLAN", "SUBMITTED", "STATE", "NAME", "TARGETS", "STEPS"
    );
    for p in &r.plans {
        println!(
            "{:<14} {:<20} {:<state$} {:<name$} {:>8} {:>8}",
            p.plan_id,
            at(p.created_at_ms),
            p.state,
            p.name,
            p.targets,
            p.steps
        );
    }
}

pub fn fleet(r: &pb::ListFleetResponse, output: Output) {
    if !r.note.is_empty() {
        eprintln!("note: {}", r.note);
    }
    let labels = |m: &std::collections::HashMap<String, String>| {
        // a value is quoted as a selector takes it (`tenant="a,b=c"`)
        let mut v: Vec<String> = m
            .iter()
            .map(|(k, v)| format!("{k}={}", flotilla_core::selector::quoted(v)))
            .collect();
        v.sort();
        v.join(",")
    };
    if output == Output::Json {
        let v: Vec<Value> = r
            .agents
            .iter()
            .map(|a| {
                json!({
                    "shard": a.shard,
                    "connected": a.connected,
                    "shard_unreachable": a.shard_unreachable,
                    "labels": a.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
                    "version": a.version,
                    "last_seen_ms": a.last_seen_ms,
                    "tenants": a.tenants.iter().map(|t| json!({
                        "name": t.name,
                        "labels": t.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", Value::Array(v));
        return;
    }
    println!("{:<20} {:<14} {:>8}  LABELS", "SHARD", "AGENT", "TENANTS");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for a in &r.agents {
        println!(
            "{:<20} {:<14} {:>8}  {}",
            a.shard,
            match (a.connected, a.shard_unreachable) {
                // attached, but it applies nothing: its database does not answer it
                (true, true) => "shard down".to_string(),
                (true, false) => "connected".to_string(),
                // not attached, for how long ("gone" read as retired for good, for an agent
                // restarted three seconds before)
                (false, _) if a.last_seen_ms > 0 => {
                    format!("away {}", super::eta(now_ms.saturating_sub(a.last_seen_ms)))
                }
                (false, _) => "away".to_string(),
            },
            a.tenants.len(),
            labels(&a.labels)
        );
    }
}

pub fn locks(r: &pb::ListLocksResponse, output: Output) {
    if output == Output::Json {
        let v: Vec<Value> = r
            .locks
            .iter()
            .map(|l| json!({"shard": l.shard, "plan_id": l.plan_id, "lease": l.lease}))
            .collect();
        println!("{}", json!({"backend": r.backend, "locks": v}));
        return;
    }
    println!("coordination backend: {}", r.backend);
    println!("{:<24} {:<14} {:>20}", "SHARD", "PLAN", "LEASE");
    for l in &r.locks {
        println!(
            "{:<24} {:<14} {:>20}",
            l.shard,
            l.plan_id,
            format!("{:x}", l.lease)
        );
    }
}

/// `audit list`: one line per entry (`when  who  action  plan  detail`), or JSON.
pub fn audit(r: &pb::ListAuditResponse, output: Output) {
    if output == Output::Json {
        let v: Vec<Value> = r
            .entries
            .iter()
            .map(|e| {
                json!({
                    "at_ms": e.at_ms,
                    "at": rfc3339(e.at_ms),
                    "actor": e.actor,
                    "action": e.action,
                    "plan_id": e.plan_id,
                    "detail": e.detail,
                })
            })
            .collect();
        println!("{}", Value::Array(v));
        return;
    }
    if r.entries.is_empty() {
        println!("no audit entries");
        return;
    }
    for e in &r.entries {
        println!(
            "{}  {:<12} {:<12} {:<12} {}",
            rfc3339(e.at_ms),
            e.actor,
            e.action,
            if e.plan_id.is_empty() {
                "-"
            } else {
                &e.plan_id
            },
            e.detail
        );
    }
}

/// A time in ms since the epoch as RFC 3339 (UTC, milliseconds).
fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}
