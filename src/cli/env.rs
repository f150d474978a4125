//! `flotilla env status`: the environments the coordinator promotes plans through.
use flotilla_core::pb;
use serde_json::{Value, json};

use super::call::call_any;
use super::{EXIT_OK, Output};

/// A read: any coordinator answers it; a refusal exits as every command's does.
pub async fn status(addr: &str, plans: u32, output: Output) -> u8 {
    call_any(
        addr,
        pb::EnvStatusRequest { plans },
        |mut c, req| async move { c.env_status(req).await },
        |r| {
            render(&r, output);
            EXIT_OK
        },
    )
    .await
}

fn render(r: &pb::EnvStatusResponse, output: Output) {
    if output == Output::Json {
        println!("{}", to_json(r));
        return;
    }
    if r.environments.is_empty() {
        println!(
            "no environments configured (flotilla coordinator --environments dev,staging,production)"
        );
        return;
    }
    for e in &r.environments {
        let from = if e.promoted_from.is_empty() {
            String::new()
        } else {
            format!(" (promoted from {})", e.promoted_from)
        };
        println!("{}{from}", e.name);
        let shards: Vec<String> = e
            .shards
            .iter()
            .map(|s| {
                if s.connected {
                    s.shard.clone()
                } else {
                    format!("{} (away)", s.shard)
                }
            })
            .collect();
        if shards.is_empty() {
            println!("  shards: none (label {}={})", r.label, e.name);
        } else {
            println!("  shards: {}", shards.join(", "));
        }
        if e.plans.is_empty() {
            println!("  plans: none");
        } else {
            println!("  plans:");
            for p in &e.plans {
                println!("    {}  {:<24} {}", p.plan_id, p.name, p.state);
            }
        }
        if e.migrations.is_empty() {
            println!("  migrations completed: none");
        } else {
            println!("  migrations completed:");
            for m in &e.migrations {
                println!(
                    "    {}  {}  (plan {})",
                    m.migration_id,
                    &m.checksum[..m.checksum.len().min(12)],
                    m.plan_id
                );
            }
        }
    }
}

fn to_json(r: &pb::EnvStatusResponse) -> Value {
    json!({
        "label": r.label,
        "environments": r.environments.iter().map(|e| json!({
            "name": e.name,
            "promoted_from": e.promoted_from,
            "shards": e.shards.iter().map(|s| json!({
                "shard": s.shard,
                "connected": s.connected,
            })).collect::<Vec<_>>(),
            "plans": e.plans.iter().map(|p| json!({
                "plan_id": p.plan_id,
                "name": p.name,
                "state": p.state,
                "created_at_ms": p.created_at_ms,
                "updated_at_ms": p.updated_at_ms,
                "targets": p.targets,
            })).collect::<Vec<_>>(),
            "migrations": e.migrations.iter().map(|m| json!({
                "id": m.migration_id,
                "checksum": m.checksum,
                "plan_id": m.plan_id,
                "completed_at_ms": m.completed_at_ms,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
