//! `flotilla fleet status`, `fleet show` and `fleet drift`: where each target of the fleet
//! is, and whose schema is not what its migrations made of its cohort.
use flotilla_core::pb;
use serde_json::{Value, json};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::call::call_leader;
use super::{EXIT_BAD_INPUT, EXIT_DRIFT, EXIT_OK, EXIT_UNAVAILABLE, Output};
use crate::loader::{self, Overrides};

/// Each migration's checksum as the files on disk give it, read as `plan submit` reads them.
fn file_checksums(path: &Path) -> Result<HashMap<String, String>, String> {
    let raw = loader::load(path, &Overrides::default()).map_err(|e| e.to_string())?;
    let spec =
        flotilla_core::PlanSpec::try_from(raw).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(spec
        .migrations
        .into_iter()
        .map(|m| (m.id.to_string(), m.checksum))
        .collect())
}

pub async fn status(
    addr: &str,
    selector: Option<String>,
    against: Option<PathBuf>,
    output: Output,
) -> u8 {
    // The files are read here, before any coordinator is asked: a bad directory is the
    // operator's to fix, and nothing is sent.
    let checksums = match against.as_deref().map(file_checksums).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => {
            eprintln!("error: --against {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let req = pb::FleetStatusRequest {
        selector: selector.unwrap_or_default(),
        checksums,
    };
    call_leader(
        addr,
        req,
        |mut c, req| async move { c.fleet_status(req).await },
        |r| {
            match output {
                Output::Json => println!("{}", status_json(&r)),
                Output::Text => print_status(&r),
            }
            // Every shard it would count away: "0 behind" (exit 0) read as a fleet up to
            // date. Some away: what the others reported stands, and they are named.
            if r.known_shards == Some(0) {
                eprintln!("error: {NO_SHARD_KNOWN}");
                EXIT_UNAVAILABLE
            } else if r.targets == 0 && !r.unreported_shards.is_empty() {
                eprintln!(
                    "error: no shard's journal was reported (not reported: {}): nothing is known of the fleet's versions",
                    r.unreported_shards.join(", ")
                );
                EXIT_UNAVAILABLE
            } else {
                EXIT_OK
            }
        },
    )
    .await
}

/// A coordinator that knows no shard (a fresh one, or the wrong one): its "0 targets" and
/// "no drift" said a fleet up to date and clean, exit 0, where nothing is known.
const NO_SHARD_KNOWN: &str = "this coordinator knows no shard (no agent has attached to it, \
     and its control store lists none): nothing is known of the fleet (is --coordinator the \
     fleet's?)";

pub async fn show(addr: &str, target: String, output: Output) -> u8 {
    call_leader(
        addr,
        pb::FleetShowRequest { target },
        |mut c, req| async move { c.fleet_show(req).await },
        |t| {
            match output {
                Output::Json => println!("{}", target_json(&t)),
                Output::Text => print_target(&t),
            }
            EXIT_OK
        },
    )
    .await
}

pub async fn drift(addr: &str, selector: Option<String>, output: Output) -> u8 {
    let req = pb::FleetDriftRequest {
        selector: selector.unwrap_or_default(),
    };
    call_leader(
        addr,
        req,
        |mut c, req| async move { c.fleet_drift(req).await },
        |r| {
            match output {
                Output::Json => println!("{}", drift_json(&r)),
                Output::Text => print_drift(&r),
            }
            // "No drift" says the selected shards were compared: one that reported nothing
            // (its agent away) is not known to be clean, and a drift check that passed while
            // the fleet was out of reach passed exactly when it knew nothing. Targets not
            // fingerprinted yet (new, or just changed: the agents read the catalog again on
            // their refresh) are named, not failed on: right after every plan there are some.
            if r.drifted > 0 {
                EXIT_DRIFT
            } else if r.known_shards == Some(0) {
                eprintln!("error: {NO_SHARD_KNOWN}");
                EXIT_UNAVAILABLE
            } else if !r.unreported_shards.is_empty() {
                eprintln!(
                    "error: no drift among the {} target(s) compared, but not every shard was: {}",
                    r.targets,
                    unknown_shapes(&r)
                );
                EXIT_UNAVAILABLE
            } else {
                if !r.unfingerprinted.is_empty() {
                    eprintln!("warning: not compared yet: {}", unknown_shapes(&r));
                }
                EXIT_OK
            }
        },
    )
    .await
}

/// The shards and targets a drift check could not compare.
fn unknown_shapes(r: &pb::FleetDriftResponse) -> String {
    let mut parts = Vec::new();
    if !r.unreported_shards.is_empty() {
        parts.push(format!(
            "shards not reported (their agents away): {}",
            r.unreported_shards.join(", ")
        ));
    }
    if !r.unfingerprinted.is_empty() {
        let shown: Vec<&str> = r
            .unfingerprinted
            .iter()
            .take(5)
            .map(String::as_str)
            .collect();
        let more = r.unfingerprinted.len().saturating_sub(shown.len());
        parts.push(format!(
            "targets with no fingerprint yet: {}{}",
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    parts.join("; ")
}

/// What a drifted target has and lacks, as lines an operator reads:
/// `shard_0/tenant_0042: column work_orders.loyalty_tier text, not in the majority's shape (249
/// targets)`. The majority's, not "the others'": other drifted targets may lack it too.
fn drift_lines(d: &pb::DriftedTarget, majority: u64) -> Vec<String> {
    if d.unknown_items {
        return vec![format!(
            "{}: fingerprint {} (the items of a shape were not reported: no diff)",
            d.target, d.fingerprint
        )];
    }
    let n = if majority == 1 {
        "1 target".to_string()
    } else {
        format!("{majority} targets")
    };
    // Tied, there is no majority to blame: the other shape is named, and the tie said.
    let (other, within) = if d.tied {
        let other = format!(
            "shape {} ({n}, as many as another: no majority)",
            short(&d.against)
        );
        (other.clone(), other)
    } else {
        (
            format!("the majority's shape ({n})"),
            format!("the majority's shape, {n}"),
        )
    };
    let extra = d
        .extra
        .iter()
        .map(|i| format!("{}: {i}, not in {other}", d.target));
    let missing = d
        .missing
        .iter()
        .map(|i| format!("{}: missing {i} (in {within})", d.target));
    extra.chain(missing).collect()
}

fn drift_json(r: &pb::FleetDriftResponse) -> Value {
    json!({
        "targets": r.targets,
        "drifted": r.drifted,
        "unfingerprinted": r.unfingerprinted,
        "unreported_shards": r.unreported_shards,
        "known_shards": r.known_shards,
        "shards": r.shards.iter().map(|s| json!({
            "shard": s.shard,
            "read_ms": s.read_ms,
            "targets": s.targets,
            "reported_at_ms": s.reported_at_ms,
        })).collect::<Vec<_>>(),
        "cohorts": r.cohorts.iter().map(|c| json!({
            "head": c.head,
            "digest": c.digest,
            "targets": c.targets,
            "majority": c.majority,
            "tied": c.tied,
            "shapes": c.shapes.iter().map(|s| json!({
                "fingerprint": s.fingerprint,
                "targets": s.targets,
                "majority": s.majority,
            })).collect::<Vec<_>>(),
            "drifted": c.drifted.iter().map(|d| json!({
                "target": d.target,
                "fingerprint": d.fingerprint,
                "extra": d.extra,
                "missing": d.missing,
                "unknown_items": d.unknown_items,
                "against": d.against,
                "tied": d.tied,
                "diff": drift_lines(d, c.majority),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn print_drift(r: &pb::FleetDriftResponse) {
    println!(
        "{} target(s) fingerprinted in {} cohort(s); {} drifted",
        r.targets,
        r.cohorts.len(),
        r.drifted
    );
    if !r.unreported_shards.is_empty() {
        println!(
            "not reported (agents not attached to this leader, or not reaching their databases): {}",
            r.unreported_shards.join(", ")
        );
    }
    if !r.unfingerprinted.is_empty() {
        let shown: Vec<&str> = r
            .unfingerprinted
            .iter()
            .take(SHOWN_TARGETS)
            .map(String::as_str)
            .collect();
        let more = r.unfingerprinted.len().saturating_sub(SHOWN_TARGETS);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        println!("not fingerprinted yet: {}{more}", shown.join(", "));
    }
    if !r.shards.is_empty() {
        let reads: Vec<String> = r
            .shards
            .iter()
            .map(|s| format!("{} {} ms", s.shard, s.read_ms))
            .collect();
        println!("catalog read: {}", reads.join(", "));
    }
    for (i, c) in r.cohorts.iter().enumerate() {
        let head = if c.head.is_empty() {
            "(nothing applied)"
        } else {
            &c.head
        };
        let shapes: Vec<String> = c
            .shapes
            .iter()
            .map(|s| format!("{} x{}", s.fingerprint, s.targets))
            .collect();
        println!(
            "\n#{} {} target(s) at {head}: {} shape(s) [{}]",
            i + 1,
            c.targets,
            c.shapes.len(),
            shapes.join(", ")
        );
        if c.drifted.is_empty() {
            println!("   no drift");
        }
        for d in &c.drifted {
            for line in drift_lines(d, c.majority) {
                println!("   {line}");
            }
        }
    }
    if r.drifted == 0 {
        println!("\nno drift");
    }
}

fn mismatch_json(m: &pb::ChecksumMismatch) -> Value {
    json!({
        "target": m.target,
        "migration": m.migration_id,
        "journal_checksum": m.journal_checksum,
        "plan_checksum": m.plan_checksum,
        "plan_id": m.plan_id,
    })
}

fn failure_json(f: &pb::LastFailure) -> Value {
    json!({
        "target": f.target,
        "migration": f.migration_id,
        "plan_id": f.plan_id,
        "sqlstate": f.sqlstate,
        "message": f.message,
        "at_ms": f.at_ms,
    })
}

fn part_way_json(c: &pb::CutShort) -> Value {
    json!({
        "target": c.target,
        "migration": c.migration_id,
        "plan_id": c.plan_id,
        "rows": c.rows,
        "batches": c.batches,
        "statements": c.statements,
        "at_ms": c.at_ms,
    })
}

/// `backfill_x in plan p: 12 batches (120000 rows) done, last at T`: a step begun and not
/// finished; the next run of it goes on from its checkpoint.
fn part_way_text(c: &pb::CutShort) -> String {
    let mut done = Vec::new();
    if c.statements > 0 {
        let s = if c.statements == 1 { "" } else { "s" };
        done.push(format!("{} up statement{s}", c.statements));
    }
    if c.batches > 0 {
        let s = if c.batches == 1 { "" } else { "es" };
        done.push(format!("{} batch{s} ({} rows)", c.batches, c.rows));
    }
    if done.is_empty() {
        done.push("nothing recorded".into());
    }
    format!(
        "{}{}: {} done, checkpoint written {}",
        c.migration_id,
        in_plan(&c.plan_id),
        done.join(" and "),
        at(c.at_ms)
    )
}

/// Why a step shows part-way: running now, or stopped where the next run goes on.
const PART_WAY: &str = "begun and not finished (running now, or stopped part-way by a cancel, a \
     halt or a failure elsewhere; its batches and statements done stand, and the next run of it \
     goes on from its checkpoint)";

fn status_json(r: &pb::FleetStatusResponse) -> Value {
    json!({
        "targets": r.targets,
        "behind": r.behind,
        "completed_plans": r.completed_plans,
        "known_shards": r.known_shards,
        "unreported_shards": r.unreported_shards,
        "gone": r.gone,
        "schema_changed": r.schema_changed,
        "renamed": r.renamed.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "unknown_plans": r.unknown_plans,
        "cohorts": r.cohorts.iter().map(|c| json!({
            "head": c.head,
            "digest": c.digest,
            "version": c.version,
            "applied": c.applied,
            "count": c.targets.len(),
            "pending": c.pending,
            "targets": c.targets,
        })).collect::<Vec<_>>(),
        "mismatches": r.mismatches.iter().map(mismatch_json).collect::<Vec<_>>(),
        "failures": r.failures.iter().map(failure_json).collect::<Vec<_>>(),
        "part_way": r.part_way.iter().map(part_way_json).collect::<Vec<_>>(),
    })
}

/// Targets named in a text cohort line before "and N more".
const SHOWN_TARGETS: usize = 5;

fn print_status(r: &pb::FleetStatusResponse) {
    let cohorts = r.cohorts.len();
    println!(
        "{} target(s) in {cohorts} cohort(s); {} behind; {} completed plan(s) counted",
        r.targets, r.behind, r.completed_plans
    );
    if !r.unknown_plans.is_empty() {
        let shown: Vec<&str> = r
            .unknown_plans
            .iter()
            .take(10)
            .map(String::as_str)
            .collect();
        let more = r.unknown_plans.len().saturating_sub(shown.len());
        println!(
            "warning: the shards' journals record {} plan(s) this control store does not know ({}{}): \
             a store made anew, or restored from a backup older than the shards? What is behind \
             counts only the plans it knows (a tenant new since is caught up on those only), and \
             those plans cannot be rolled back from here; submit their directories again to \
             know them (their applied steps are answered from the journals)",
            r.unknown_plans.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    if !r.unreported_shards.is_empty() {
        println!(
            "not reported (agents not attached to this leader, or not reaching their databases): {}",
            r.unreported_shards.join(", ")
        );
    }
    for (i, c) in r.cohorts.iter().enumerate() {
        let head = if c.head.is_empty() {
            "(nothing applied)"
        } else {
            &c.head
        };
        let version = if c.version.is_empty() {
            String::new()
        } else {
            format!(" v{}", c.version)
        };
        println!(
            "\n#{} {} target(s) at {head}{version} [{} applied, digest {}]",
            i + 1,
            c.targets.len(),
            c.applied,
            if c.digest.is_empty() { "-" } else { &c.digest },
        );
        if c.pending.is_empty() {
            println!("   up to date");
        } else {
            // the next ones to apply first, and how many more (a tenant behind a year of
            // plans printed one line of 9 KB); `fleet show TARGET` and JSON list them all
            const SHOWN_PENDING: usize = 10;
            let more = c.pending.len().saturating_sub(SHOWN_PENDING);
            println!(
                "   behind by {}: {}{}",
                c.pending.len(),
                c.pending[..c.pending.len().min(SHOWN_PENDING)].join(", "),
                if more > 0 {
                    format!(" and {more} more (`fleet show TARGET` lists them)")
                } else {
                    String::new()
                }
            );
        }
        let shown: Vec<&str> = c
            .targets
            .iter()
            .take(SHOWN_TARGETS)
            .map(String::as_str)
            .collect();
        let more = c.targets.len().saturating_sub(SHOWN_TARGETS);
        println!(
            "   {}{}",
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    if !r.gone.is_empty() {
        println!(
            "\ngone from their shards (journal rows kept): {}",
            r.gone.join(", ")
        );
    }
    // those holding another tenant's schema (renamed) have answers of their own
    let changed: Vec<&str> = r
        .schema_changed
        .iter()
        .filter(|t| !r.renamed.contains_key(*t))
        .map(String::as_str)
        .collect();
    if !changed.is_empty() {
        println!(
            "\nschema not the one their journal rows were written in (dropped and made again, or \
             restored on its own): what is applied there is not known, and no plan runs there \
             until an operator says, on the shard, flotilla.tenant_is_new('TENANT') or \
             flotilla.tenant_kept_its_history('TENANT'): {}",
            changed.join(", ")
        );
    }
    if !r.renamed.is_empty() {
        let mut renamed: Vec<String> = r
            .renamed
            .iter()
            .map(|(t, from)| format!("{t} (holds {from}'s schema)"))
            .collect();
        renamed.sort();
        println!(
            "\nrenamed (or swapped): each holds the schema of another tenant, whose journal rows \
             say what is applied there; no plan runs there until it is renamed back, or its \
             history moved (`fleet show TARGET` says how): {}",
            renamed.join(", ")
        );
    }
    if !r.mismatches.is_empty() {
        println!(
            "\nchecksum mismatches (what the journal applied is not what the file or plan holds):"
        );
        for m in &r.mismatches {
            println!(
                "  {}: {} journal {} {}",
                m.target,
                m.migration_id,
                short(&m.journal_checksum),
                compared(m)
            );
        }
    }
    if !r.part_way.is_empty() {
        println!("\nsteps {PART_WAY}:");
        for c in &r.part_way {
            println!("  {}: {}", c.target, part_way_text(c));
        }
    }
    if !r.failures.is_empty() {
        println!("{}", failure_lines(&r.failures).join("\n"));
    }
}

/// The targets' last failures, the same failure on many targets as one (a plan failing on
/// 225 tenants printed 225 lines of one error), the latest first, at most
/// [`SHOWN_FAILURES`] of them: `--output json` and `fleet show TARGET` give every one.
fn failure_lines(failures: &[pb::LastFailure]) -> Vec<String> {
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for f in failures {
        let text = failure_text(f);
        match index.get(&text) {
            Some(&g) => groups[g].1.push(&f.target),
            None => {
                index.insert(text.clone(), groups.len());
                groups.push((text, vec![&f.target]));
            }
        }
    }
    let mut lines = vec![format!("\nfailed last ({} target(s)):", failures.len())];
    for (text, targets) in groups.iter_mut().take(SHOWN_FAILURES) {
        if let [one] = targets[..] {
            lines.push(format!("  {one}: {text}"));
            continue;
        }
        targets.sort_unstable();
        let more = targets.len().saturating_sub(SHOWN_TARGETS);
        lines.push(format!("  {} targets: {text}", targets.len()));
        lines.push(format!(
            "    {}{}",
            targets[..SHOWN_TARGETS.min(targets.len())].join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    let left = groups.len().saturating_sub(SHOWN_FAILURES);
    if left > 0 {
        lines.push(format!(
            "  ... and {left} more failure(s) (`--output json` or `fleet show TARGET` for each)"
        ));
    }
    lines
}

/// At most this many of `fleet status`'s failures (each the same failure on one target or
/// many) in text.
const SHOWN_FAILURES: usize = 20;

/// What the journal's checksum was compared with: the file, or a plan.
fn compared(m: &pb::ChecksumMismatch) -> String {
    if m.plan_id.is_empty() {
        format!("file {}", short(&m.plan_checksum))
    } else {
        format!("plan {} {}", m.plan_id, short(&m.plan_checksum))
    }
}

fn short(checksum: &str) -> &str {
    checksum.get(..12).unwrap_or(checksum)
}

fn target_json(t: &pb::FleetTarget) -> Value {
    json!({
        "shard": t.shard,
        "tenant": t.tenant,
        "reported": t.reported,
        "gone": t.gone,
        "schema_changed": t.schema_changed,
        "renamed_from": t.renamed_from,
        "labels": t.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "head": t.head,
        "digest": t.digest,
        "version": t.version,
        "journal": t.journal.iter().map(|e| json!({
            "migration": e.migration_id,
            "checksum": e.checksum,
            "plan_id": e.plan_id,
            "applied_at_ms": e.applied_at_ms,
            "duration_ms": e.duration_ms,
        })).collect::<Vec<_>>(),
        "pending": t.pending,
        "mismatches": t.mismatches.iter().map(mismatch_json).collect::<Vec<_>>(),
        "last_failure": t.last_failure.as_ref().map(failure_json),
        "part_way": t.part_way.iter().map(part_way_json).collect::<Vec<_>>(),
        "fingerprint": t.fingerprint,
        "drift": t.drift.as_ref().map(|d| json!({
            "extra": d.extra,
            "missing": d.missing,
            "unknown_items": d.unknown_items,
            "diff": drift_lines(d, t.drift_majority),
        })),
    })
}

fn print_target(t: &pb::FleetTarget) {
    let name = if t.tenant.is_empty() {
        format!("shard {}", t.shard)
    } else {
        format!("{}/{}", t.shard, t.tenant)
    };
    println!("{name}");
    if !t.reported {
        println!(
            "  its shard's journal has not been reported to this coordinator (agent not attached)"
        );
    }
    if t.gone {
        println!(
            "  gone from its shard (its agent no longer finds the tenant); its journal rows stay"
        );
    }
    if t.schema_changed && !t.renamed_from.is_empty() {
        println!(
            "  it holds the schema of tenant {:?} (renamed, or swapped with it), whose journal \
             rows say what is applied there: nothing runs here until it is renamed back, or, \
             with no journal rows of its own, {:?}'s history is moved to it (its last failure, \
             or the agent's log, gives the statements)",
            t.renamed_from, t.renamed_from
        );
    } else if t.schema_changed {
        println!(
            "  its schema is not the one its journal rows were written in (dropped and made again, \
             or restored on its own): what is applied there is not known; on the shard, SELECT \
             flotilla.tenant_is_new('{0}') for a new tenant, or \
             flotilla.tenant_kept_its_history('{0}') if it holds what its journal says",
            t.tenant.replace('\'', "''")
        );
    }
    // a value is quoted as a selector takes it (a tenant named `a,b=c` read as two labels)
    let mut labels: Vec<String> = t
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={}", flotilla_core::selector::quoted(v)))
        .collect();
    labels.sort();
    println!("  labels: {}", labels.join(","));
    if !t.head.is_empty() {
        let version = if t.version.is_empty() {
            String::new()
        } else {
            format!(" (v{})", t.version)
        };
        println!("  head: {}{version}, digest {}", t.head, t.digest);
    }
    if t.reported || !t.journal.is_empty() {
        println!("  journal ({} applied):", t.journal.len());
    } else {
        // (a shard not reported has 0 rows here, which is not "none applied")
        println!("  journal: not known (its shard's journal not reported)");
    }
    for e in &t.journal {
        println!(
            "    {}  {}  {}  {}  {} ms",
            e.migration_id,
            short(&e.checksum),
            e.plan_id,
            at(e.applied_at_ms),
            e.duration_ms
        );
    }
    if !t.reported {
        // Nothing heard is not nothing pending: what it lacks is not known here.
        println!("  pending: not known (its shard's journal not reported)");
    } else if t.gone {
        println!("  pending: nothing (gone)");
    } else if t.schema_changed {
        println!("  pending: not known (its schema changed under its journal)");
    } else if t.pending.is_empty() {
        println!("  pending: none");
    } else {
        println!("  pending: {}", t.pending.join(", "));
    }
    for m in &t.mismatches {
        println!(
            "  checksum mismatch: {} journal {} {}",
            m.migration_id,
            short(&m.journal_checksum),
            compared(m)
        );
    }
    if !t.part_way.is_empty() {
        println!("  {PART_WAY}:");
        for c in &t.part_way {
            println!("    {}", part_way_text(c));
        }
    }
    if let Some(f) = &t.last_failure {
        println!("  failed last: {}", failure_text(f));
    }
    if !t.fingerprint.is_empty() {
        println!("  schema fingerprint: {}", t.fingerprint);
    }
    if let Some(d) = &t.drift {
        println!("  schema drift from its cohort:");
        for line in drift_lines(d, t.drift_majority) {
            println!("    {line}");
        }
    }
}

/// A target's last failure: its migration (when it has one: a tenant found on two shards
/// failed in none, and read `: tenant ...`), plan and SQLSTATE, then the message.
fn failure_text(f: &pb::LastFailure) -> String {
    let what = format!(
        "{}{}{}",
        f.migration_id,
        in_plan(&f.plan_id),
        sqlstate_tag(&f.sqlstate)
    );
    let what = what.trim_start();
    if what.is_empty() {
        f.message.clone()
    } else {
        format!("{what}: {}", f.message)
    }
}

/// " in plan ID" after a failure's migration, or nothing for one of no plan (a catch-up
/// plan refused before it was one).
fn in_plan(plan_id: &str) -> String {
    if plan_id.is_empty() {
        String::new()
    } else {
        format!(" in plan {plan_id}")
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC, seconds).
fn at(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// " [SQLSTATE]" after a failure, or nothing when it has none (a rollback cut short, as the
/// shard reports it, or a failure of the agent's own).
fn sqlstate_tag(sqlstate: &str) -> String {
    if sqlstate.is_empty() {
        String::new()
    } else {
        format!(" [{sqlstate}]")
    }
}

/// `fleet retire SHARD --reason R`: the shard leaves the fleet (see the coordinator's
/// `retire_shard`).
pub async fn retire(addr: &str, shard: String, reason: String, actor: String) -> u8 {
    let req = pb::RetireShardRequest {
        shard: shard.clone(),
        actor: super::call::acting(actor),
        reason,
    };
    super::call::call_leader(
        addr,
        req,
        |mut c, req| async move { c.retire_shard(req).await },
        |_| {
            println!("shard {shard} retired from the fleet (recorded in the audit trail)");
            super::EXIT_OK
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use flotilla_core::pb;

    /// A failure with no migration (a tenant found on two shards) reads as its message,
    /// not `: tenant ...`; one with a migration names it, its plan and SQLSTATE first.
    #[test]
    fn a_last_failure_reads_without_an_empty_migration() {
        let mut f = pb::LastFailure {
            message: "tenant \"t\" appeared on shard_1 while shard_0 holds it".into(),
            ..Default::default()
        };
        assert_eq!(super::failure_text(&f), f.message);
        f.migration_id = "001_a".into();
        f.plan_id = "p1".into();
        f.sqlstate = "42P01".into();
        assert_eq!(
            super::failure_text(&f),
            format!("001_a in plan p1 [42P01]: {}", f.message)
        );
    }

    /// The same failure on many targets is one entry naming a few of them in order; at most
    /// SHOWN_FAILURES entries, and how many more.
    #[test]
    fn failures_alike_are_one_entry_and_the_list_is_bounded() {
        let failure = |target: String, message: &str| pb::LastFailure {
            target,
            migration_id: "001_a".into(),
            plan_id: "p1".into(),
            sqlstate: "42P01".into(),
            message: message.into(),
            ..Default::default()
        };
        let mut failures: Vec<pb::LastFailure> = [9, 3, 7, 1, 5, 2, 8]
            .iter()
            .map(|t| {
                failure(
                    format!("shard_1/tenant_{t:04}"),
                    "relation \"legacy\" does not exist",
                )
            })
            .collect();
        for t in 0..25 {
            failures.push(failure(
                format!("shard_2/tenant_{t:04}"),
                &format!("error {t}"),
            ));
        }
        let lines = super::failure_lines(&failures);
        assert_eq!(lines[0], "\nfailed last (32 target(s)):");
        assert_eq!(
            lines[1],
            "  7 targets: 001_a in plan p1 [42P01]: relation \"legacy\" does not exist"
        );
        assert_eq!(
            lines[2],
            "    shard_1/tenant_0001, shard_1/tenant_0002, shard_1/tenant_0003, \
             shard_1/tenant_0005, shard_1/tenant_0007 and 2 more"
        );
        assert_eq!(
            lines[3],
            "  shard_2/tenant_0000: 001_a in plan p1 [42P01]: error 0"
        );
        // one entry of seven targets and 19 of one each shown; 6 left
        assert_eq!(lines.len(), 1 + 2 + 19 + 1, "{lines:#?}");
        assert_eq!(
            lines.last().unwrap(),
            "  ... and 6 more failure(s) (`--output json` or `fleet show TARGET` for each)"
        );
    }
}
