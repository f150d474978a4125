//! What the operator commands print: text for people, JSON for scripts. The
//! JSON shapes are part of the CLI's contract (README: "JSON output"). A plan's status
//! and live progress are here; `plan lint`'s findings in `lint`; the list commands in
//! `lists`.
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use flotilla_core::pb;
use flotilla_core::protocol::LOCK_WAIT;
use serde_json::{Value, json};

use super::Output;

mod lint;
mod lists;

pub use lint::{finding_at, finding_text, lint, part_sql};
pub use lists::{audit, fleet, locks, plan_list};

fn target_name(t: &Option<pb::TargetRef>) -> String {
    match t {
        Some(t) if t.tenant.is_empty() => t.shard.clone(),
        Some(t) => format!("{}/{}", t.shard, t.tenant),
        None => String::new(),
    }
}

pub fn status_json(s: &pb::PlanStatus) -> Value {
    let sum = s.summary.clone().unwrap_or_default();
    json!({
        "plan_id": sum.plan_id,
        "name": sum.name,
        "state": sum.state,
        "environment": sum.environment,
        "created_at_ms": sum.created_at_ms,
        "updated_at_ms": sum.updated_at_ms,
        "targets": sum.targets,
        "steps": sum.steps,
        "message": s.message,
        "migrations": s.migrations.iter().map(|m| json!({
            "id": m.migration_id,
            "total": m.total,
            "pending": m.pending,
            "running": m.running,
            "applied": m.applied,
            "already_applied": m.already_applied,
            "failed": m.failed,
            "rolled_back": m.rolled_back,
            "not_run": m.not_run,
            "prepared": m.prepared,
        })).collect::<Vec<_>>(),
        "failures": s.failures.iter().map(|f| {
            let e = f.error.clone().unwrap_or_default();
            let t = f.target.clone().unwrap_or_default();
            json!({
                "migration": f.migration_id,
                "target": target_name(&f.target),
                "shard": t.shard,
                "tenant": t.tenant,
                "sqlstate": e.sqlstate,
                "message": e.message,
                "detail": e.detail,
                "phase": e.phase,
            })
        }).collect::<Vec<_>>(),
        "waiting_for": s.waiting_for,
        "paused": s.paused,
        "waves": s.waves.iter().map(|w| json!({
            "name": w.name,
            "state": w.state,
            "targets": w.targets,
            "applied": w.applied,
            "failed": w.failed,
            "pending": w.pending,
            "max_failures": if w.budgeted { json!(w.max_failures) } else { Value::Null },
            "bake_until_ms": if w.bake_until_ms > 0 { json!(w.bake_until_ms) } else { Value::Null },
            "manual_gate": w.manual_gate,
            "gate": w.gate,
        })).collect::<Vec<_>>(),
        "lock_waits": lock_waits(s).map(|d| json!({
            "migration": d.migration_id,
            "shard": d.shard,
            "tenant": d.tenant,
            "reason": d.reason,
        })).collect::<Vec<_>>(),
        "data": s.data.iter().filter(|d| d.state != LOCK_WAIT).map(|d| json!({
            "migration": d.migration_id,
            "shard": d.shard,
            "tenant": d.tenant,
            "state": d.state,
            "reason": d.reason,
            "rows_done": d.rows_done,
            "rows_total": d.rows_total,
            "rows_per_second": (d.rows_per_second * 10.0).round() / 10.0,
            "batch_size": d.batch_size,
            "batches": d.batches,
            "eta_ms": d.eta_ms,
        })).collect::<Vec<_>>(),
    })
}

/// At most this many data changes get a line (the busiest first, then the rest counted).
const DATA_LINES: usize = 12;

fn data_target(d: &pb::DataProgress) -> String {
    if d.tenant.is_empty() {
        format!("{} on {}", d.migration_id, d.shard)
    } else {
        format!("{} on {}/{}", d.migration_id, d.shard, d.tenant)
    }
}

fn data_line(d: &pb::DataProgress) -> String {
    let mut line = format!(
        "{:<48} {:>10}/{:<10} rows {:>8.0} rows/s  batch {}",
        data_target(d),
        d.rows_done,
        d.rows_total,
        d.rows_per_second,
        d.batch_size
    );
    if d.eta_ms > 0 && d.state == "running" {
        line.push_str(&format!("  ETA {}", eta(d.eta_ms)));
    }
    if d.state != "running" {
        line.push_str(&format!("  {}", d.state));
        if !d.reason.is_empty() {
            line.push_str(&format!(": {}", d.reason));
        }
    }
    line
}

pub(super) fn eta(ms: u64) -> String {
    // rounded up: under a second left read "ETA 0s" with rows still to go
    let s = ms.div_ceil(1000);
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn data_bar(d: &pb::DataProgress, width: usize) -> String {
    let total = d.rows_total.max(d.rows_done).max(1);
    let done = ((d.rows_done as u128 * width as u128) / total as u128) as usize;
    let fill = if d.state == "throttled" || d.state == "paused" {
        "="
    } else {
        "#"
    };
    format!(
        "[{}{}]",
        fill.repeat(done.min(width)),
        " ".repeat(width - done.min(width))
    )
}

/// The data changes worth a line now: those not finished, most rows left first.
fn active_data(s: &pb::PlanStatus) -> Vec<&pb::DataProgress> {
    let mut v: Vec<&pb::DataProgress> = s
        .data
        .iter()
        .filter(|d| !matches!(d.state.as_str(), "done" | LOCK_WAIT))
        .collect();
    v.sort_by_key(|d| std::cmp::Reverse(d.rows_total.saturating_sub(d.rows_done)));
    v
}

/// Schema steps waiting to try their lock again (not data changes: no rows to show).
fn lock_waits(s: &pb::PlanStatus) -> impl Iterator<Item = &pb::DataProgress> {
    s.data.iter().filter(|d| d.state == LOCK_WAIT)
}

fn lock_wait_line(d: &pb::DataProgress) -> String {
    format!("{}: {}", data_target(d), d.reason)
}

pub fn status(s: &pb::PlanStatus, output: Output) {
    if output == Output::Json {
        println!("{}", status_json(s));
        return;
    }
    let sum = s.summary.clone().unwrap_or_default();
    println!("plan {} ({})  state: {}", sum.plan_id, sum.name, sum.state);
    if !sum.environment.is_empty() {
        println!("environment: {}", sum.environment);
    }
    println!("targets: {}  steps: {}", sum.targets, sum.steps);
    if !s.message.is_empty() {
        println!("{}", s.message);
    }
    for m in &s.migrations {
        println!("  {}", migration_line(m, s));
    }
    if !s.paused.is_empty() {
        println!("paused: {}", s.paused.join(", "));
    }
    if !s.waves.is_empty() {
        println!("waves:");
        let ended = s
            .summary
            .as_ref()
            .is_some_and(|x| flotilla_core::state::PlanState::is_terminal_str(&x.state));
        for w in &s.waves {
            println!("  {}", wave_line(w, ended));
        }
    }
    let data = active_data(s);
    if !data.is_empty() {
        println!("data changes:");
        for d in data.iter().take(DATA_LINES) {
            println!("  {}", data_line(d));
        }
        if data.len() > DATA_LINES {
            println!("  ... and {} more", data.len() - DATA_LINES);
        }
    }
    let waits: Vec<_> = lock_waits(s).collect();
    if !waits.is_empty() {
        println!("waiting for table locks:");
        for d in waits.iter().take(DATA_LINES) {
            println!("  {}", lock_wait_line(d));
        }
        if waits.len() > DATA_LINES {
            println!("  ... and {} more", waits.len() - DATA_LINES);
        }
    }
    // Shard names (agents that are away) and `kind: what` entries (approval, bake, lock,
    // gate).
    if let Some(line) = waiting_agents(s) {
        println!("{line}");
    }
    for w in other_waits(s) {
        println!("waiting for {}", waiting_text(w));
    }
    failures(s);
}

/// The `kind: what` entries of `waiting_for` (approval, bake, lock, gate), but a lock wait
/// the plan's message says already (`waiting for shard locks: ...`): printed twice before.
fn other_waits(s: &pb::PlanStatus) -> impl Iterator<Item = &String> {
    s.waiting_for.iter().filter(|w| {
        w.contains(": ")
            && !w
                .strip_prefix("lock: ")
                .is_some_and(|lock| s.message.ends_with(lock))
    })
}

/// `waiting for agents of: shard_0, ...`: the shards (`waiting_for` entries without a
/// `kind: `) whose agents the plan waits for, if any.
fn waiting_agents(s: &pb::PlanStatus) -> Option<String> {
    let agents: Vec<&str> = s
        .waiting_for
        .iter()
        .filter(|w| !w.contains(": "))
        .map(String::as_str)
        .collect();
    (!agents.is_empty()).then(|| format!("waiting for agents of: {}", agents.join(", ")))
}

/// The waves a watch shows: those between their runs and the next wave (baking, checking
/// their gate, waiting at a manual one). A watch through a canary's bake printed
/// `running:` and its counts alone, the bake and its end nowhere.
fn between_waves(s: &pb::PlanStatus) -> impl Iterator<Item = &pb::WaveStatus> {
    s.waves
        .iter()
        .filter(|w| matches!(w.state.as_str(), "baking" | "checking" | "waiting"))
}

/// `quarter     running   6 targets: 2 applied, 1 failed (budget 1), 3 to go`; of a plan that
/// ended (`ended`), what is left is not applied (undone, or never run), not to go.
fn wave_line(w: &pb::WaveStatus, ended: bool) -> String {
    let mut line = format!(
        "{:<12} {:<8} {} targets: {} applied, {} failed",
        w.name,
        w.state,
        w.targets.len(),
        w.applied,
        w.failed
    );
    if w.budgeted {
        line.push_str(&format!(" (budget {})", w.max_failures));
    }
    if w.pending > 0 {
        let left = if ended { "not applied" } else { "to go" };
        line.push_str(&format!(", {} {left}", w.pending));
    }
    if w.bake_until_ms > 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let left = w.bake_until_ms.saturating_sub(now);
        line.push_str(&format!("; bake ends in {:.0}s", left as f64 / 1000.0));
    }
    if w.manual_gate && w.state != "done" {
        line.push_str("; manual gate");
    }
    if !w.gate.is_empty() {
        line.push_str(&format!("; gate: {}", w.gate));
    }
    line
}

fn failures(s: &pb::PlanStatus) {
    if s.failures.is_empty() {
        return;
    }
    println!("failures:");
    for f in s.failures.iter().take(20) {
        let e = f.error.clone().unwrap_or_default();
        let code = if e.sqlstate.is_empty() {
            String::new()
        } else {
            format!(" SQLSTATE {}", e.sqlstate)
        };
        println!(
            "  {} on {}:{} {}",
            f.migration_id,
            target_name(&f.target),
            code,
            e.message
        );
        // PostgreSQL's DETAIL says which row or key (`Key (email)=(dup) is duplicated.`)
        if !e.detail.is_empty() {
            println!("    detail: {}", e.detail);
        }
    }
    if s.failures.len() > 20 {
        println!("  ... and {} more", s.failures.len() - 20);
    }
}

/// A `waiting_for` entry as a person reads it: a bake's end (milliseconds since the epoch
/// in the JSON) as a UTC time and how long is left.
fn waiting_text(w: &str) -> String {
    let Some((head, until)) = w.rsplit_once(" until ") else {
        return w.to_string();
    };
    let Ok(ms) = until.parse::<u64>() else {
        return w.to_string();
    };
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let left = at
        .duration_since(std::time::SystemTime::now())
        .map(|d| format!(", in {}", eta(d.as_millis() as u64)))
        .unwrap_or_default();
    format!(
        "{head} until {}{left}",
        humantime::format_rfc3339_seconds(at)
    )
}

fn migration_line(m: &pb::MigrationProgress, s: &pb::PlanStatus) -> String {
    let done = m.applied + m.already_applied;
    // Steps not run whose data change stopped part-way (a halt, a cancel): their committed
    // batches stand, and a retry goes on from the checkpoint. "not run" alone read as
    // nothing done.
    let part_way = s
        .data
        .iter()
        .filter(|d| d.migration_id == m.migration_id && d.state == "stopped" && d.rows_done > 0)
        .count()
        .min(m.not_run as usize);
    let mut line = format!("{:<48} {:>5}/{:<5} done", m.migration_id, done, m.total);
    for (n, what) in [
        // handed to the agents: up to max_parallel of them run at once, the rest wait in
        // the agents' queues ("13 running" under max_parallel 2 read as a broken limit)
        (m.running, "running or queued"),
        (m.prepared, "prepared"),
        (m.failed, "failed"),
        (m.rolled_back, "rolled back"),
        (m.not_run, "not run"),
        (m.already_applied, "already applied"),
    ] {
        if n > 0 {
            line.push_str(&format!(", {n} {what}"));
        }
        if what == "not run" && part_way > 0 {
            // `plan retry` takes a failed, halted or completed_with_failures plan; a
            // cancelled one is submitted again (it was pointed at a retry that refused it).
            let state = s.summary.as_ref().map_or("", |p| p.state.as_str());
            // (a plan undoing, or undone, is not retried: no retry goes on from them)
            let undoing = matches!(
                state,
                "rolling_back" | "rolled_back" | "rollback_failed" | "aborting"
            );
            let again = if state == "cancelled" {
                "a new submit of the plan"
            } else {
                "a retry"
            };
            line.push_str(&if undoing {
                format!(" ({part_way} part-way: stopped at a checkpoint, its batches done)")
            } else {
                format!(
                    " ({part_way} part-way: stopped at a checkpoint, which {again} goes on from)"
                )
            });
        }
    }
    line
}

fn bar(m: &pb::MigrationProgress, width: usize) -> String {
    let total = m.total.max(1) as usize;
    let done = ((m.applied + m.already_applied) as usize * width) / total;
    let failed = (m.failed as usize * width)
        .div_ceil(total)
        .min(width - done);
    format!(
        "[{}{}{}]",
        "#".repeat(done),
        "!".repeat(failed),
        " ".repeat(width - done - failed)
    )
}

/// Live progress: bars redrawn in place on a terminal, a line per change otherwise.
pub struct Progress {
    output: Output,
    tty: bool,
    drawn: usize,
    /// In JSON, an object per update (`plan watch`), or the last one only (`--wait`: a
    /// script reads its stdout as one object; `jq .state` printed a state per update).
    every_update: bool,
    /// Not a terminal: the last line printed (its time left out), and when. An update in
    /// which only data changes' rows moved is printed once every [`DATA_LINE_EVERY`] (the
    /// coordinator sends one each half second while a backfill runs).
    printed: Option<(String, Instant)>,
}

/// How often a piped watch prints a line for data changes' progress alone.
const DATA_LINE_EVERY: Duration = Duration::from_secs(10);

impl Progress {
    pub fn new(output: Output, every_update: bool) -> Progress {
        Progress {
            output,
            tty: std::io::stdout().is_terminal(),
            drawn: 0,
            every_update,
            printed: None,
        }
    }

    pub fn update(&mut self, s: &pb::PlanStatus, elapsed: Duration) {
        let state = s
            .summary
            .as_ref()
            .map(|x| x.state.clone())
            .unwrap_or_default();
        match self.output {
            Output::Json if self.every_update => println!("{}", status_json(s)),
            Output::Json => {}
            Output::Text if self.tty => {
                let mut out = std::io::stdout().lock();
                if self.drawn > 0 {
                    let _ = write!(out, "\x1b[{}A", self.drawn);
                }
                let _ = writeln!(out, "\x1b[2K{:>6.1}s  {}", elapsed.as_secs_f64(), state);
                for m in &s.migrations {
                    let _ = writeln!(out, "\x1b[2K  {} {}", bar(m, 30), migration_line(m, s));
                }
                let data = active_data(s);
                let shown = data.len().min(DATA_LINES);
                for d in data.iter().take(DATA_LINES) {
                    let _ = writeln!(out, "\x1b[2K  {} {}", data_bar(d, 30), data_line(d));
                }
                let mut lines = 1 + s.migrations.len() + shown;
                for w in between_waves(s) {
                    let _ = writeln!(out, "\x1b[2K  wave {}", wave_line(w, false));
                    lines += 1;
                }
                for d in lock_waits(s).take(DATA_LINES) {
                    let _ = writeln!(out, "\x1b[2K  waiting for its lock: {}", lock_wait_line(d));
                    lines += 1;
                }
                if let Some(line) = waiting_agents(s) {
                    let _ = writeln!(out, "\x1b[2K  {line}");
                    lines += 1;
                }
                if data.len() > DATA_LINES {
                    let _ = writeln!(
                        out,
                        "\x1b[2K  ... and {} more data changes",
                        data.len() - DATA_LINES
                    );
                    lines += 1;
                }
                // lines drawn before and not now are cleared, so nothing stale stays
                let stale = self.drawn.saturating_sub(lines);
                for _ in 0..stale {
                    let _ = writeln!(out, "\x1b[2K");
                }
                self.drawn = lines + stale;
                let _ = out.flush();
            }
            Output::Text => {
                let parts: Vec<String> = s
                    .migrations
                    .iter()
                    .map(|m| {
                        // (an atomic unit's prepared targets, and what a rollback undid: a
                        // watch of a unit committing or aborting read "16/24 done" alone)
                        let mut part = format!(
                            "{} {}/{} done {} failed {} running or queued",
                            m.migration_id,
                            m.applied + m.already_applied,
                            m.total,
                            m.failed,
                            m.running
                        );
                        for (n, what) in [(m.prepared, "prepared"), (m.rolled_back, "rolled back")]
                        {
                            if n > 0 {
                                part.push_str(&format!(" {n} {what}"));
                            }
                        }
                        part
                    })
                    .collect();
                let line = format!("{state}: {}", parts.join(" | "));
                if !self.piped_line_due(&line, s) {
                    return;
                }
                println!("[{:>6.1}s] {line}", elapsed.as_secs_f64());
                for d in active_data(s).iter().take(DATA_LINES) {
                    println!("    {}", data_line(d));
                }
                for w in between_waves(s) {
                    println!("    wave {}", wave_line(w, false));
                }
                for d in lock_waits(s).take(DATA_LINES) {
                    println!("    waiting for its lock: {}", lock_wait_line(d));
                }
                if let Some(line) = waiting_agents(s) {
                    println!("    {line}");
                }
            }
        }
    }

    /// Whether a piped watch prints this update: its line (time left out) changed, or its
    /// data changes' states, waves, lock waits or the agents it waits for did; or its data
    /// changes' rows alone did, and [`DATA_LINE_EVERY`] has passed since the last line.
    fn piped_line_due(&mut self, line: &str, s: &pb::PlanStatus) -> bool {
        let mut whole = line.to_string();
        // a change's state (throttled, paused, failed) at once; its rows alone not, nor its
        // reason's figures ("replication lag 12.3 (limit 10)"), nor the order the busiest
        // first puts them in
        let mut states: Vec<String> = active_data(s)
            .iter()
            .map(|d| format!("{} {}", data_target(d), d.state))
            .collect();
        states.sort();
        for st in states {
            whole.push_str(&st);
        }
        for w in between_waves(s) {
            whole.push_str(&wave_line(w, false));
        }
        for d in lock_waits(s) {
            whole.push_str(&lock_wait_line(d));
        }
        whole.push_str(&waiting_agents(s).unwrap_or_default());
        let due = match &self.printed {
            Some((last, at)) => *last != whole || at.elapsed() >= DATA_LINE_EVERY,
            None => true,
        };
        if due {
            self.printed = Some((whole, Instant::now()));
        }
        due
    }

    /// A watch given up before the plan's end (no coordinator took it up): with `--wait` in
    /// JSON, the last status seen is printed all the same (stdout was empty, though it was
    /// known); the exit code says the watch was cut short.
    pub fn gave_up(&self, s: &pb::PlanStatus) {
        if self.output == Output::Json && !self.every_update {
            println!("{}", status_json(s));
        }
    }

    /// The plan's end. Its time is the plan's own (its submit to its last change), not how
    /// long this command watched: a watch started late, or an approve's `--wait`, said
    /// "cancelled after 0.1s" of a plan that ran for minutes.
    pub fn finish(&mut self, s: &pb::PlanStatus, watched: Duration) {
        if self.output == Output::Json {
            if !self.every_update {
                println!("{}", status_json(s));
            }
            return;
        }
        let sum = s.summary.clone().unwrap_or_default();
        match sum
            .updated_at_ms
            .checked_sub(sum.created_at_ms)
            .filter(|_| sum.created_at_ms > 0)
        {
            Some(ms) => println!(
                "plan {} {} after {:.1}s (since it was submitted)",
                sum.plan_id,
                sum.state,
                Duration::from_millis(ms).as_secs_f64()
            ),
            None => println!(
                "plan {} {} (watched for {:.1}s)",
                sum.plan_id,
                sum.state,
                watched.as_secs_f64()
            ),
        }
        if !s.message.is_empty() {
            println!("{}", s.message);
        }
        failures(s);
    }
}

pub fn submitted(r: &pb::SubmitPlanResponse, output: Output) {
    match output {
        Output::Json => {
            let mut v = r.status.as_ref().map(status_json).unwrap_or(json!({}));
            v["plan_id"] = json!(r.plan_id);
            // The lint's warnings on the accepted plan (also on stderr, as text).
            v["findings"] = r
                .findings
                .iter()
                .map(|f| {
                    json!({
                        "rule": f.rule,
                        "severity": f.severity,
                        "migration": f.migration,
                        "file": f.file,
                        "line": f.line,
                        "message": f.message,
                        "hint": f.hint,
                    })
                })
                .collect();
            println!("{v}");
        }
        Output::Text => {
            println!("plan {} submitted", r.plan_id);
            if let Some(m) = r
                .status
                .as_ref()
                .map(|s| &s.message)
                .filter(|m| !m.is_empty())
            {
                println!("{m}");
            }
        }
    }
}

#[cfg(test)]
mod wave_tests {
    use super::*;

    #[test]
    fn a_wave_of_an_ended_plan_has_nothing_to_go() {
        let w = pb::WaveStatus {
            name: "canary".into(),
            state: "done".into(),
            targets: vec!["s0/t0".into(), "s0/t1".into()],
            pending: 2,
            ..Default::default()
        };
        assert!(wave_line(&w, false).ends_with("0 applied, 0 failed, 2 to go"));
        assert!(wave_line(&w, true).ends_with("0 applied, 0 failed, 2 not applied"));
    }
}

#[cfg(test)]
mod data_tests {
    use super::*;

    /// A piped watch prints a line when what it says changed, and for data changes' rows
    /// alone once every DATA_LINE_EVERY (the coordinator sends their progress each half
    /// second: a line each for hours).
    #[test]
    fn a_piped_watch_prints_rows_alone_now_and_then() {
        let mut p = Progress::new(Output::Text, true);
        let mut s = pb::PlanStatus::default();
        s.data.push(pb::DataProgress {
            migration_id: "fill".into(),
            tenant: "t1".into(),
            shard: "s0".into(),
            state: "running".into(),
            rows_done: 10,
            rows_total: 100,
            ..Default::default()
        });
        assert!(p.piped_line_due("running: fill 0/1 done", &s));
        s.data[0].rows_done = 20;
        assert!(
            !p.piped_line_due("running: fill 0/1 done", &s),
            "rows alone"
        );
        // its state (and why) at once
        s.data[0].state = "throttled".into();
        assert!(p.piped_line_due("running: fill 0/1 done", &s));
        // the steps' line at once
        assert!(p.piped_line_due("running: fill 1/1 done", &s));
        // rows alone, once DATA_LINE_EVERY passed
        let at = Instant::now().checked_sub(DATA_LINE_EVERY).unwrap();
        p.printed.as_mut().unwrap().1 = at;
        s.data[0].rows_done = 30;
        assert!(p.piped_line_due("running: fill 1/1 done", &s));
    }

    /// The shards whose agents a plan waits for are named apart from its other waits (a
    /// watch of a unit committing without an agent said only how many steps were done).
    #[test]
    fn the_agents_waited_for_are_named() {
        let mut s = pb::PlanStatus {
            waiting_for: vec!["shard_0".into(), "lock: x".into(), "shard_2".into()],
            ..Default::default()
        };
        assert_eq!(
            waiting_agents(&s).as_deref(),
            Some("waiting for agents of: shard_0, shard_2")
        );
        s.waiting_for = vec!["gate: wave canary".into()];
        assert_eq!(waiting_agents(&s), None);
    }

    /// A plan waiting for its shard locks says so once: its message names the lock.
    #[test]
    fn a_lock_wait_is_said_once() {
        let mut s = pb::PlanStatus {
            message: "waiting for shard locks: shard s1 is locked by plan p1".into(),
            waiting_for: vec![
                "lock: shard s1 is locked by plan p1".into(),
                "approval: 1 of 2".into(),
                "shard_3".into(),
            ],
            ..Default::default()
        };
        assert_eq!(other_waits(&s).collect::<Vec<_>>(), ["approval: 1 of 2"]);
        // a message saying something else: the lock is named among the waits
        s.message = "retry of 1 step requested by operator".into();
        assert_eq!(
            other_waits(&s).collect::<Vec<_>>(),
            ["lock: shard s1 is locked by plan p1", "approval: 1 of 2"]
        );
    }

    /// A bake's end reads as a time, not milliseconds since the epoch.
    #[test]
    fn a_bakes_end_reads_as_a_time() {
        assert_eq!(
            waiting_text("bake: wave canary until 1796574743556"),
            "bake: wave canary until 2026-12-06T16:32:23Z"
        );
        assert_eq!(waiting_text("gate: wave canary"), "gate: wave canary");
    }

    /// Steps stopped part-way: a retry goes on from them, or a new submit of a cancelled
    /// plan; a plan undoing or undone is pointed at neither.
    #[test]
    fn part_way_steps_point_at_what_goes_on_from_them() {
        let m = pb::MigrationProgress {
            migration_id: "a".into(),
            total: 4,
            applied: 2,
            not_run: 2,
            ..Default::default()
        };
        let line = |state: &str| {
            let s = pb::PlanStatus {
                summary: Some(pb::PlanSummary {
                    state: state.into(),
                    ..Default::default()
                }),
                data: vec![pb::DataProgress {
                    migration_id: "a".into(),
                    state: "stopped".into(),
                    rows_done: 10,
                    ..Default::default()
                }],
                ..Default::default()
            };
            migration_line(&m, &s)
        };
        assert!(line("halted").ends_with("which a retry goes on from)"));
        assert!(line("cancelled").ends_with("which a new submit of the plan goes on from)"));
        for undoing in ["rolling_back", "rolled_back", "aborting"] {
            let l = line(undoing);
            assert!(
                l.ends_with("stopped at a checkpoint, its batches done)"),
                "{l}"
            );
        }
    }

    /// Under a second left is "1s", not "0s" with rows still to go.
    #[test]
    fn an_eta_is_rounded_up() {
        assert_eq!(eta(400), "1s");
        assert_eq!(eta(1_000), "1s");
        assert_eq!(eta(61_500), "1m02s");
        assert_eq!(eta(3_600_000), "1h00m");
    }
}
