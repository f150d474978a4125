//! The shard's journal as the coordinator's fleet view hears it: the whole journal after
//! each Welcome, then the rows of the targets whose runs ended (their results, rollbacks
//! and resolutions mark them), and the whole journal again every `discover_interval`, so a
//! change made outside Flotilla shows too. The journal is the truth; reports replace. Each
//! report is followed by the same targets' schema fingerprints (`schema`), except while the
//! shard has runs queued or running: then the targets' fingerprints are cleared at the
//! coordinator (they show as not fingerprinted, never as stale) and read once the shard is
//! idle, or after `SHAPES_DEFERRED_AT_MOST`. The periodic whole report waits the same way.
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flotilla_core::pb;
use flotilla_core::pb::agent_message::Body as Out;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::schema;
use crate::Agent;
use crate::run::Outgoing;
use crate::shard;

/// Rows per message: a fleet of 2,500 tenants x 20 migrations is 50,000 rows, well over
/// what one gRPC message should carry.
const CHUNK: usize = 5_000;

/// Reports of the targets whose runs ended start at least this long after the previous
/// report ended; a whole report (after a Welcome, every discover interval) goes at once, and
/// the one after a decision this long after it. During a rollout runs end every few milliseconds, and a report each time kept
/// one shard connection busy reading the journal and scanning the catalog, and the coordinator
/// recomputing its drift view after each, for the whole rollout, beside the steps themselves.
pub(crate) const REPORT_GAP: Duration = Duration::from_secs(1);

/// How long the fingerprints of targets whose runs ended, and the periodic whole report
/// (every target's fingerprint), may wait for the shard to be idle. Reading them costs the
/// catalog functions (`pg_get_viewdef`, `pg_get_indexdef`, ...) per object of each target:
/// measured with the 1,000-tenant rollout (`bench-rollout.sh`, 4 agents), those reads took
/// 6.6 s of the server's statement time during a 7 s rollout, on the cores the steps need.
/// Deferred, they run once the runs are done. Two minutes, not the discover interval (30 s):
/// a 10,000-tenant rollout takes 30 to 60 s on the reference machine, and with 30 s the
/// whole report and the deferred fingerprints (2,500 targets a shard) came in the middle of
/// it, 4.4 s of the server's CPU in its last 5 s (`perf`, 2026-12-04). A busy shard's drift
/// view lags by at most this much; the targets show as not fingerprinted meanwhile.
pub(crate) const SHAPES_DEFERRED_AT_MOST: Duration = Duration::from_secs(120);

/// What the coordinator has not heard yet.
#[derive(Debug, Default)]
pub(crate) struct JournalDirty {
    state: std::sync::Mutex<Dirty>,
    /// A report is being read or sent: the next one waits (a later read must not overtake it).
    reporting: AtomicBool,
    /// When the last report ended (sent or not).
    last_ended: std::sync::Mutex<Option<Instant>>,
    /// When the last run's result went out.
    last_run: std::sync::Mutex<Option<Instant>>,
    /// A report held back by `REPORT_GAP` is due: one task waits to send it.
    deferred: AtomicBool,
}

#[derive(Debug, Default)]
struct Dirty {
    /// A whole report is due now: after a Welcome, a decision, a failed whole report.
    all: bool,
    /// The periodic whole report (every discover interval) is due, since then: it looks for
    /// changes made outside Flotilla, and waits for an idle shard as the fingerprints do.
    periodic_since: Option<Instant>,
    targets: BTreeSet<String>,
    /// Targets whose journal rows went out while runs were busy, without fingerprints (the
    /// coordinator holds none for them until they are read), and since when.
    unshaped: BTreeSet<String>,
    unshaped_since: Option<Instant>,
    /// No report before then: a decision was carried out here, and the other shards of its
    /// unit (often databases on the same server) are still committing theirs. Reading the
    /// whole journal and every fingerprint at once competed with their COMMIT PREPAREDs,
    /// each holding its target's locks until done: measured with `bench-two-phase.sh` (16
    /// shards on one server), decision to last COMMIT PREPARED 142 ms with that report and
    /// 76-79 ms without, against PostgreSQL's own 57-76 ms for the same commits.
    quiet_until: Option<Instant>,
}

/// What one report reads and sends.
#[derive(Debug, PartialEq, Eq)]
enum Take {
    /// The whole journal and every target's fingerprint.
    Whole,
    /// Some targets' journal rows; with `shapes`, their fingerprints from the same
    /// snapshot, else a message that clears them.
    Targets { targets: Vec<String>, shapes: bool },
}

impl Dirty {
    /// Whether the unshaped targets' fingerprints still wait for an idle shard.
    fn shapes_wait(&self, busy: bool, now: Instant) -> bool {
        busy && self
            .unshaped_since
            .is_none_or(|since| now.duration_since(since) < SHAPES_DEFERRED_AT_MOST)
    }

    /// Whether a whole report is due now (a periodic one once the shard is idle or it waited
    /// `SHAPES_DEFERRED_AT_MOST`).
    fn whole_due(&self, busy: bool, now: Instant) -> bool {
        self.all
            || self
                .periodic_since
                .is_some_and(|since| !busy || now.duration_since(since) >= SHAPES_DEFERRED_AT_MOST)
    }
}

impl JournalDirty {
    pub fn mark_all(&self) {
        self.state.lock().expect("journal dirty lock").all = true;
    }

    /// The discover interval's whole report: at once on an idle shard, else when it is idle
    /// (at most `SHAPES_DEFERRED_AT_MOST` later).
    pub fn mark_periodic(&self) {
        self.mark_periodic_at(Instant::now());
    }

    fn mark_periodic_at(&self, now: Instant) {
        self.state
            .lock()
            .expect("journal dirty lock")
            .periodic_since
            .get_or_insert(now);
    }

    /// Targets whose journal rows changed outside a run (a baseline recorded them).
    pub fn mark_targets(&self, targets: impl IntoIterator<Item = String>) {
        self.state
            .lock()
            .expect("journal dirty lock")
            .targets
            .extend(targets);
    }

    /// The targets whose journal rows an outgoing result or reply follows.
    pub fn mark(&self, item: &Outgoing) {
        self.mark_at(item, Instant::now());
    }

    fn mark_at(&self, item: &Outgoing, now: Instant) {
        if matches!(item, Outgoing::Run { .. }) {
            *self.last_run.lock().expect("journal run lock") = Some(now);
        }
        let mut state = self.state.lock().expect("journal dirty lock");
        match item {
            // A run that only PREPARED changed nothing others can see yet, and reading its
            // target's schema now would wait on the very locks the prepared transaction holds
            // (competing with the unit's COMMIT PREPAREDs for connections): the Resolve reply
            // marks the whole journal once the decision is carried out.
            Outgoing::Run { result, .. }
                if !result.steps.is_empty()
                    && result
                        .steps
                        .iter()
                        .all(|s| s.outcome == pb::StepOutcome::Prepared as i32) => {}
            Outgoing::Run { result, .. } => {
                state.targets.insert(result.tenant.clone());
            }
            Outgoing::Rollback(reply) => {
                state
                    .targets
                    .extend(reply.steps.iter().map(|s| s.tenant.clone()));
            }
            // COMMIT/ROLLBACK PREPARED: the gids name the targets, a full report is simpler
            // and these are rare; it waits out the unit's other commits (`quiet_until`).
            Outgoing::Resolve(_) => {
                state.all = true;
                state.quiet_until = Some(now + REPORT_GAP);
            }
        }
    }

    /// Whether the shard counts as busy for the reports: runs queued or running (`runs`), or
    /// a run's result went out less than `REPORT_GAP` ago. Between one run's end and the next
    /// one's arrival (its result goes to the coordinator, which hands out the next) the agent
    /// holds no run for a few milliseconds at a time: idle by its queue alone, and in a
    /// 10,000-tenant rollout the deferred fingerprints were read in such a moment, in the
    /// middle of it.
    fn busy_at(&self, runs: bool, now: Instant) -> bool {
        runs || self
            .last_run
            .lock()
            .expect("journal run lock")
            .is_some_and(|at| now.duration_since(at) < REPORT_GAP)
    }

    /// How long a report now has to wait: any report until `REPORT_GAP` after a decision
    /// carried out here; otherwise only a report of some targets waits, until `REPORT_GAP`
    /// after the last report ended; fingerprints and a periodic whole report deferred while
    /// runs are busy are looked at again every `REPORT_GAP` until the shard is idle.
    fn wait_at(&self, now: Instant, busy: bool) -> Option<Duration> {
        let state = self.state.lock().expect("journal dirty lock");
        let quiet = state
            .quiet_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|d| !d.is_zero());
        if quiet.is_some() {
            return quiet;
        }
        if state.whole_due(busy, now) {
            return None;
        }
        if state.targets.is_empty() {
            // deferred fingerprints past their wait go now, whatever else still waits
            if !state.unshaped.is_empty() && !state.shapes_wait(busy, now) {
                return None;
            }
            return (!state.unshaped.is_empty() || state.periodic_since.is_some())
                .then_some(REPORT_GAP);
        }
        let ended = (*self.last_ended.lock().expect("journal report lock"))?;
        (ended + REPORT_GAP)
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
    }

    fn take(&self, busy: bool, now: Instant) -> Option<Take> {
        let mut state = self.state.lock().expect("journal dirty lock");
        if state.whole_due(busy, now) {
            *state = Dirty::default();
            return Some(Take::Whole);
        }
        if state.shapes_wait(busy, now) {
            if state.targets.is_empty() {
                return None;
            }
            let targets = std::mem::take(&mut state.targets);
            state.unshaped.extend(targets.iter().cloned());
            state.unshaped_since.get_or_insert(now);
            return Some(Take::Targets {
                targets: targets.into_iter().collect(),
                shapes: false,
            });
        }
        if state.targets.is_empty() && state.unshaped.is_empty() {
            return None;
        }
        let mut targets = std::mem::take(&mut state.targets);
        targets.append(&mut state.unshaped);
        state.unshaped_since = None;
        Some(Take::Targets {
            targets: targets.into_iter().collect(),
            shapes: true,
        })
    }
}

/// Reads and sends what is dirty, in a task of its own (the session loop never waits on
/// the shard); at most one report at a time, and a report of some targets not sooner than
/// `REPORT_GAP` after the one before (a task sends it then). What could not be read or sent
/// is marked again: the next stream's Welcome asks for everything anyway.
pub(crate) fn report(agent: &Arc<Agent>, tx: &mpsc::Sender<pb::AgentMessage>) {
    let dirty = &agent.journal_dirty;
    // A stream that ended (a deferred look may outlive it) reads nothing: the next
    // stream's Welcome asks for the whole journal anyway.
    if tx.is_closed() {
        return;
    }
    if dirty.reporting.swap(true, Ordering::AcqRel) {
        return;
    }
    let now = Instant::now();
    let busy = dirty.busy_at(agent.runs_busy(), now);
    if let Some(wait) = dirty.wait_at(now, busy) {
        dirty.reporting.store(false, Ordering::Release);
        if !dirty.deferred.swap(true, Ordering::AcqRel) {
            let agent = agent.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                agent.journal_dirty.deferred.store(false, Ordering::Release);
                report(&agent, &tx);
            });
        }
        return;
    }
    let Some(what) = dirty.take(busy, now) else {
        dirty.reporting.store(false, Ordering::Release);
        return;
    };
    let agent = agent.clone();
    let tx = tx.clone();
    tokio::spawn(async move {
        let (targets, shapes) = match what {
            Take::Whole => (None, true),
            Take::Targets { targets, shapes } => (Some(targets), shapes),
        };
        let sent = send(&agent, &tx, targets.clone(), shapes).await;
        if let Err(why) = sent {
            debug!(%why, "journal report not sent; it goes again");
            match targets {
                None => agent.journal_dirty.mark_all(),
                Some(targets) => agent
                    .journal_dirty
                    .state
                    .lock()
                    .expect("journal dirty lock")
                    .targets
                    .extend(targets),
            }
        }

        *agent
            .journal_dirty
            .last_ended
            .lock()
            .expect("journal report lock") = Some(Instant::now());
        agent
            .journal_dirty
            .reporting
            .store(false, Ordering::Release);
        if !shapes {
            // The fingerprints wait for an idle shard: nothing else may come to ask again
            // (this may have been the last run), so look again now; while runs are busy,
            // that waits a `REPORT_GAP` at a time.
            report(&agent, &tx);
        }
    });
}

/// Looks for tenants that appeared or vanished, in a task of its own; tells the
/// coordinator when the list changed (it catches the new ones up, if asked to).
pub(crate) fn discover(agent: &Arc<Agent>, tx: &mpsc::Sender<pb::AgentMessage>) {
    let agent = agent.clone();
    let tx = tx.clone();
    tokio::spawn(async move {
        let before = agent.known_tenants();
        let Ok(now) = agent.refresh_tenants().await else {
            return; // logged; the last list stands
        };
        let names = |t: &[pb::Tenant]| t.iter().map(|t| t.name.clone()).collect::<BTreeSet<_>>();
        let (old, new) = (names(&before), names(&now));
        if old == new && before == now {
            return;
        }
        info!(
            appeared = new.difference(&old).count(),
            vanished = old.difference(&new).count(),
            tenants = now.len(),
            "the shard's tenants changed"
        );
        let report = pb::AgentMessage {
            body: Some(Out::Tenants(pb::TenantsReport { tenants: now })),
        };
        if tx.send(report).await.is_err() {
            // the next stream's Hello carries the list
            debug!("tenants report not sent: the stream closed");
        }
    });
}

async fn send(
    agent: &Agent,
    tx: &mpsc::Sender<pb::AgentMessage>,
    targets: Option<Vec<String>>,
    shapes: bool,
) -> Result<(), String> {
    let (entries, cut_short, fingerprints) =
        read(agent, targets.as_deref(), shapes).await.map_err(|e| {
            warn!(error = %crate::error::Shown(&e), "cannot read the journal for the coordinator's fleet view");
            e.to_string()
        })?;
    let reset = targets.is_none();
    let mut chunks = entries.chunks(CHUNK);
    let first = chunks.next().unwrap_or(&[]);
    let message = |reset, targets, entries: &[pb::JournalEntry], cut_short| pb::AgentMessage {
        body: Some(Out::Journal(pb::JournalReport {
            reset,
            targets,
            entries: entries.to_vec(),
            cut_short,
        })),
    };
    // the steps cut short (a few, if any) go with the first chunk, which clears their targets
    tx.send(message(
        reset,
        targets.clone().unwrap_or_default(),
        first,
        cut_short,
    ))
    .await
    .map_err(|_| "the stream closed".to_string())?;
    for chunk in chunks {
        tx.send(message(false, Vec::new(), chunk, Vec::new()))
            .await
            .map_err(|_| "the stream closed".to_string())?;
    }
    match (fingerprints, targets) {
        (Some(found), targets) => schema::send(tx, found, targets.as_deref()).await,
        // Rows newer than the fingerprints the coordinator holds for these targets: those
        // would pass for drift until they are read, so they go (see `Take::Targets`).
        (None, Some(targets)) if !shapes => schema::clear(tx, targets).await,
        (None, _) => Ok(()),
    }
}

/// The journal rows, the same targets' steps a rollback cut short, and their schema
/// fingerprints, from one snapshot (a
/// repeatable-read transaction): a migration's DDL commits with its journal row, so a target
/// is never seen with a head its shape does not have yet, which would pass for drift. A
/// catalog that cannot be read leaves the fingerprints out (logged; the next refresh tries).
async fn read(
    agent: &Agent,
    targets: Option<&[String]>,
    shapes: bool,
) -> Result<
    (
        Vec<pb::JournalEntry>,
        Vec<pb::CutShort>,
        Option<schema::Found>,
    ),
    sqlx::Error,
> {
    let mut snapshot = agent.pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *snapshot)
        .await?;
    // A report must never wait in a table's lock queue: behind a migration's DDL, or a
    // prepared transaction's locks (held until its decision), it would stall there, and
    // the sessions queued after it with it. It gives up instead; the next refresh tries.
    sqlx::raw_sql("SET LOCAL lock_timeout = '1s'; SET LOCAL statement_timeout = '60s'")
        .execute(&mut *snapshot)
        .await?;
    let entries = shard::read_entries(&mut snapshot, targets).await?;
    let cut_short = shard::read_cut_short(&mut snapshot, targets).await?;
    let fingerprints = if shapes {
        schema::read(agent, &mut snapshot, targets).await
    } else {
        None
    };
    // read only: ending it either way is the same; a failed catalog read aborted it
    let _ = snapshot.rollback().await;
    Ok((entries, cut_short, fingerprints))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tenant: &str, outcomes: &[pb::StepOutcome]) -> Outgoing {
        Outgoing::Run {
            plan_id: "p".into(),
            result: pb::RunResult {
                run_id: 1,
                tenant: tenant.into(),
                steps: outcomes
                    .iter()
                    .map(|o| pb::StepResult {
                        outcome: *o as i32,
                        ..Default::default()
                    })
                    .collect(),
                prepared_at_us: 0,
            },
            last: false,
        }
    }

    #[test]
    fn reports_of_some_targets_wait_for_the_gap_and_whole_ones_do_not() {
        let dirty = JournalDirty::default();
        let now = Instant::now();
        dirty.mark(&run("t1", &[pb::StepOutcome::Applied]));
        assert_eq!(
            dirty.wait_at(now, false),
            None,
            "the first report goes at once"
        );
        *dirty.last_ended.lock().unwrap() = Some(now);
        assert_eq!(dirty.wait_at(now, false), Some(REPORT_GAP));
        let later = now + REPORT_GAP / 4;
        assert_eq!(
            dirty.wait_at(later, false),
            Some(REPORT_GAP - REPORT_GAP / 4)
        );
        assert_eq!(
            dirty.wait_at(now + REPORT_GAP, false),
            None,
            "the gap is over"
        );
        dirty.mark_all();
        assert_eq!(
            dirty.wait_at(now, false),
            None,
            "a whole report goes at once"
        );
        let _ = dirty.take(false, now);
        assert_eq!(
            dirty.wait_at(now, false),
            None,
            "nothing to report: nothing waits"
        );
    }

    #[test]
    fn the_whole_report_after_a_decision_waits_out_the_units_other_commits() {
        let dirty = JournalDirty::default();
        let now = Instant::now();
        let resolved = Outgoing::Resolve(pb::ResolveReply {
            plan_id: "p".into(),
            commit: true,
            resolved: vec!["flotilla:p:1:1:t1".into()],
            ..Default::default()
        });
        dirty.mark_at(&resolved, now);
        assert_eq!(dirty.wait_at(now, false), Some(REPORT_GAP));
        // a run ending meanwhile does not bring it forward
        dirty.mark(&run("t2", &[pb::StepOutcome::Applied]));
        let later = now + REPORT_GAP / 2;
        assert_eq!(dirty.wait_at(later, false), Some(REPORT_GAP / 2));
        let after = now + REPORT_GAP;
        assert_eq!(dirty.wait_at(after, false), None);
        assert_eq!(dirty.take(false, after), Some(Take::Whole));
        assert_eq!(
            dirty.wait_at(after, false),
            None,
            "nothing left to wait for"
        );
        assert_eq!(dirty.take(false, after), None);
    }

    fn targets(names: &[&str], shapes: bool) -> Option<Take> {
        Some(Take::Targets {
            targets: names.iter().map(|n| n.to_string()).collect(),
            shapes,
        })
    }

    #[test]
    fn fingerprints_wait_for_an_idle_shard_or_for_at_most_the_deferral() {
        let dirty = JournalDirty::default();
        let now = Instant::now();
        // Runs busy: the rows go, the fingerprints wait.
        dirty.mark(&run("t1", &[pb::StepOutcome::Applied]));
        assert_eq!(dirty.take(true, now), targets(&["t1"], false));
        assert_eq!(dirty.take(true, now), None, "nothing new to send");
        assert_eq!(
            dirty.wait_at(now, true),
            Some(REPORT_GAP),
            "asked again while busy"
        );
        dirty.mark(&run("t2", &[pb::StepOutcome::Applied]));
        let later = now + REPORT_GAP;
        assert_eq!(dirty.take(true, later), targets(&["t2"], false));
        // Idle: every target still without its fingerprint is read, at once.
        assert_eq!(dirty.wait_at(later, false), None);
        assert_eq!(dirty.take(false, later), targets(&["t1", "t2"], true));
        assert_eq!(dirty.take(false, later), None);
        assert_eq!(dirty.wait_at(later, true), None, "nothing waits any more");
        // Busy for longer than the deferral: read anyway.
        dirty.mark(&run("t3", &[pb::StepOutcome::Applied]));
        assert_eq!(dirty.take(true, now), targets(&["t3"], false));
        dirty.mark(&run("t4", &[pb::StepOutcome::Applied]));
        let end = now + SHAPES_DEFERRED_AT_MOST;
        assert_eq!(dirty.take(true, end), targets(&["t3", "t4"], true));
        // A whole report reads every fingerprint: nothing stays deferred.
        dirty.mark(&run("t5", &[pb::StepOutcome::Applied]));
        assert_eq!(dirty.take(true, end), targets(&["t5"], false));
        dirty.mark_all();
        assert_eq!(dirty.take(true, end), Some(Take::Whole));
        assert_eq!(dirty.take(false, end), None);
    }

    #[test]
    fn the_periodic_whole_report_waits_for_an_idle_shard_or_for_at_most_the_deferral() {
        let dirty = JournalDirty::default();
        let now = Instant::now();
        // Idle: it goes at once.
        dirty.mark_periodic_at(now);
        assert_eq!(dirty.wait_at(now, false), None);
        assert_eq!(dirty.take(false, now), Some(Take::Whole));
        assert_eq!(dirty.take(false, now), None);
        // Busy: it waits, looked at again every gap, while the runs' targets still go.
        dirty.mark_periodic_at(now);
        assert_eq!(dirty.wait_at(now, true), Some(REPORT_GAP));
        assert_eq!(dirty.take(true, now), None);
        dirty.mark(&run("t1", &[pb::StepOutcome::Applied]));
        assert_eq!(dirty.take(true, now), targets(&["t1"], false));
        // a later interval does not move it on
        let later = now + SHAPES_DEFERRED_AT_MOST / 2;
        dirty.mark_periodic_at(later);
        assert_eq!(dirty.take(true, later), None);
        // Busy for longer than the deferral: it goes anyway, and takes the deferred
        // fingerprints with it.
        let end = now + SHAPES_DEFERRED_AT_MOST;
        assert_eq!(dirty.wait_at(end, true), None);
        assert_eq!(dirty.take(true, end), Some(Take::Whole));
        assert_eq!(dirty.take(false, end), None, "nothing waits any more");
        // One that waited goes once the shard is idle.
        dirty.mark_periodic_at(end);
        assert_eq!(dirty.take(true, end), None);
        assert_eq!(dirty.take(false, end), Some(Take::Whole));
        // Deferred fingerprints past their wait go even while a later periodic report waits.
        dirty.mark(&run("t6", &[pb::StepOutcome::Applied]));
        assert_eq!(dirty.take(true, end), targets(&["t6"], false));
        let past = end + SHAPES_DEFERRED_AT_MOST;
        dirty.mark_periodic_at(past);
        assert_eq!(dirty.wait_at(past, true), None);
        assert_eq!(dirty.take(true, past), targets(&["t6"], true));
        assert_eq!(
            dirty.wait_at(past, true),
            Some(REPORT_GAP),
            "the periodic one waits"
        );
        assert_eq!(dirty.take(false, past), Some(Take::Whole));
        // A Welcome's whole report never waits for the runs.
        dirty.mark_all();
        assert_eq!(dirty.wait_at(end, true), None);
        assert_eq!(dirty.take(true, end), Some(Take::Whole));
    }

    #[test]
    fn a_shard_between_runs_is_busy_until_a_gap_after_the_last_result() {
        let dirty = JournalDirty::default();
        let now = Instant::now();
        assert!(!dirty.busy_at(false, now), "no run yet");
        assert!(dirty.busy_at(true, now));
        dirty.mark_at(&run("t1", &[pb::StepOutcome::Applied]), now);
        // the next run is on its way from the coordinator
        assert!(dirty.busy_at(false, now + REPORT_GAP / 2));
        assert!(!dirty.busy_at(false, now + REPORT_GAP));
    }

    #[test]
    fn a_prepared_run_waits_for_its_resolve_to_be_reported() {
        let dirty = JournalDirty::default();
        dirty.mark(&run(
            "t1",
            &[pb::StepOutcome::Prepared, pb::StepOutcome::Prepared],
        ));
        let now = Instant::now();
        assert_eq!(dirty.take(false, now), None, "nothing visible changed yet");
        dirty.mark(&run("t2", &[pb::StepOutcome::Applied]));
        dirty.mark(&run("t3", &[pb::StepOutcome::Failed]));
        assert_eq!(dirty.take(false, now), targets(&["t2", "t3"], true));
        dirty.mark(&Outgoing::Resolve(pb::ResolveReply::default()));
        assert_eq!(
            dirty.take(false, now),
            Some(Take::Whole),
            "after the decision: the whole journal"
        );
    }
}
