//! `flotilla fleet baseline PATH`: adopt a fleet another tool migrated. The agents read
//! each target's dbmate, golang-migrate or Flyway history (or, with `--up-to`, take every
//! migration up to one as applied) and record those migrations in Flotilla's journal, so
//! the next plan runs only what is pending.
use std::collections::BTreeMap;

use flotilla_core::pb;
use serde_json::json;

use super::call::call_leader;
use super::{BaselineArgs, EXIT_BAD_INPUT, EXIT_OK, EXIT_PLAN_FAILED, Output};
use crate::loader::{self, Overrides};

pub async fn baseline(addr: &str, args: BaselineArgs) -> u8 {
    // Read here first: a bad directory is the operator's to fix, and nothing is sent.
    let overrides = Overrides {
        selector: args.selector.clone(),
        ..Default::default()
    };
    let spec = match loader::load(&args.path, &overrides) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    if let Some(up_to) = &args.up_to
        && !spec.migrations.iter().any(|m| &m.id == up_to)
    {
        eprintln!(
            "error: --up-to `{up_to}` is not a migration of {}",
            args.path.display()
        );
        return EXIT_BAD_INPUT;
    }
    let req = pb::FleetBaselineRequest {
        spec: Some(spec),
        from: args.from.clone(),
        up_to: args.up_to.clone().unwrap_or_default(),
        dry_run: args.dry_run,
        actor: super::call::acting(args.actor.clone()),
        reason: args.reason.clone(),
    };
    call_leader(
        addr,
        req,
        |mut c, req| async move { c.fleet_baseline(req).await },
        |r| {
            match args.output {
                Output::Json => println!("{}", to_json(&r)),
                Output::Text => print(&r, &args),
            }
            // Targets refused between the dry run everywhere and the writes (a history
            // changed meanwhile): what was recorded stays, and the run says it was not all.
            if r.targets.iter().any(|t| !t.error.is_empty()) {
                EXIT_PLAN_FAILED
            } else {
                EXIT_OK
            }
        },
    )
    .await
}

fn to_json(r: &pb::FleetBaselineResponse) -> serde_json::Value {
    json!({
        "baseline_id": r.baseline_id,
        "dry_run": r.dry_run,
        "recorded_rows": r.targets.iter().map(|t| t.recorded.len()).sum::<usize>(),
        "targets": r.targets.iter().map(|t| json!({
            "shard": t.shard,
            "tenant": t.tenant,
            "tool": t.tool,
            "schema": t.schema,
            "recorded": t.recorded,
            "already": t.already,
            "pending": t.pending,
            "unknown": t.unknown,
            "error": t.error,
        })).collect::<Vec<_>>(),
    })
}

fn name(t: &pb::BaselineTarget) -> String {
    if t.tenant.is_empty() {
        t.shard.clone()
    } else {
        format!("{}/{}", t.shard, t.tenant)
    }
}

/// Targets grouped by what they hold, so 10,000 alike print as one line.
fn print(r: &pb::FleetBaselineResponse, args: &BaselineArgs) {
    let rows: usize = r.targets.iter().map(|t| t.recorded.len()).sum();
    let source = match &args.up_to {
        Some(id) => format!("every migration up to {id}"),
        None => format!(
            "{} history",
            if args.from.is_empty() {
                "auto"
            } else {
                &args.from
            }
        ),
    };
    if r.dry_run {
        println!(
            "Dry run ({source}): {} targets, {rows} journal rows would be recorded; nothing was written.",
            r.targets.len()
        );
    } else {
        println!(
            "Baseline {} ({source}): {} targets, {rows} journal rows recorded.",
            r.baseline_id,
            r.targets.len()
        );
    }
    type Key<'a> = (
        &'a str,
        &'a [String],
        &'a [String],
        &'a [String],
        &'a [String],
        &'a str,
    );
    let mut cohorts: BTreeMap<Key, Vec<String>> = BTreeMap::new();
    for t in &r.targets {
        cohorts
            .entry((
                t.tool.as_str(),
                &t.recorded,
                &t.already,
                &t.pending,
                &t.unknown,
                t.error.as_str(),
            ))
            .or_default()
            .push(name(t));
    }
    let verb = if r.dry_run {
        "would record"
    } else {
        "recorded"
    };
    for ((tool, recorded, already, pending, unknown, error), targets) in cohorts {
        let who = if targets.len() <= 3 {
            targets.join(", ")
        } else {
            format!("{} targets (e.g. {})", targets.len(), targets[0])
        };
        if !error.is_empty() {
            println!("  {who}: refused: {error}");
            continue;
        }
        let mut parts = vec![if tool.is_empty() {
            if args.up_to.is_some() {
                "up to".to_string()
            } else {
                "no history found".to_string()
            }
        } else {
            tool.to_string()
        }];
        for (label, ids) in [
            (verb, recorded),
            ("already journaled", already),
            ("pending", pending),
            ("in the history but not in the directory", unknown),
        ] {
            if !ids.is_empty() {
                parts.push(format!("{label} {}", list(ids)));
            }
        }
        println!("  {who}: {}", parts.join("; "));
    }
}

fn list(ids: &[String]) -> String {
    if ids.len() <= 4 {
        ids.join(", ")
    } else {
        format!("{} ({}, ..., {})", ids.len(), ids[0], ids[ids.len() - 1])
    }
}
