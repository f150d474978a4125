//! The shard's journal as the coordinator's fleet view hears it: the whole journal after
//! each Welcome, then the rows of the targets whose runs ended (their results, rollbacks
//! and resolutions mark them), and the whole journal again every `discover_interval`, so a
//! change made outside Flotilla shows too. The journal is the truth; reports replace. Each
//! report is followed by the same targets' schema fingerprints (`schema`).
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
/// report ended; a whole report (after a Welcome, every discover interval, after a decision)
/// goes at once. During a rollout runs end every few milliseconds, and a report each time kept
/// one shard connection busy reading the journal and scanning the catalog, and the coordinator
/// recomputing its drift view after each, for the whole rollout, beside the steps themselves.
pub(crate) const REPORT_GAP: Duration = Duration::from_secs(1);

/// What the coordinator has not heard yet.
#[derive(Debug, Default)]
pub(crate) struct JournalDirty {
    state: std::sync::Mutex<Dirty>,
    /// A report is being read or sent: the next one waits (a later read must not overtake it).
    reporting: AtomicBool,
    /// When the last report ended (sent or not).
    last_ended: std::sync::Mutex<Option<Instant>>,
    /// A report held back by `REPORT_GAP` is due: one task waits to send it.
    deferred: AtomicBool,
}

#[derive(Debug, Default)]
struct Dirty {
    all: bool,
    targets: BTreeSet<String>,
}

impl JournalDirty {
    pub fn mark_all(&self) {
        self.state.lock().expect("journal dirty lock").all = true;
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
            // and these are rare.
            Outgoing::Resolve(_) => state.all = true,
        }
    }

    /// How long a report now has to wait: only a report of some targets waits, until
    /// `REPORT_GAP` after the last report ended.
    fn wait_at(&self, now: Instant) -> Option<Duration> {
        let state = self.state.lock().expect("journal dirty lock");
        if state.all || state.targets.is_empty() {
            return None;
        }
        let ended = (*self.last_ended.lock().expect("journal report lock"))?;
        (ended + REPORT_GAP)
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
    }

    fn take(&self) -> Option<Option<Vec<String>>> {
        let mut state = self.state.lock().expect("journal dirty lock");
        if state.all {
            *state = Dirty::default();
            Some(None)
        } else if state.targets.is_empty() {
            None
        } else {
            Some(Some(
                std::mem::take(&mut state.targets).into_iter().collect(),
            ))
        }
    }
}

/// Reads and sends what is dirty, in a task of its own (the session loop never waits on
/// the shard); at most one report at a time, and a report of some targets not sooner than
/// `REPORT_GAP` after the one before (a task sends it then). What could not be read or sent
/// is marked again: the next stream's Welcome asks for everything anyway.
pub(crate) fn report(agent: &Arc<Agent>, tx: &mpsc::Sender<pb::AgentMessage>) {
    let dirty = &agent.journal_dirty;
    if dirty.reporting.swap(true, Ordering::AcqRel) {
        return;
    }
    if let Some(wait) = dirty.wait_at(Instant::now()) {
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
    let Some(targets) = dirty.take() else {
        dirty.reporting.store(false, Ordering::Release);
        return;
    };
    let agent = agent.clone();
    let tx = tx.clone();
    tokio::spawn(async move {
        let sent = send(&agent, &tx, targets.clone()).await;
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
) -> Result<(), String> {
    let (entries, fingerprints) = read(agent, targets.as_deref()).await.map_err(|e| {
        warn!(error = %e, "cannot read the journal for the coordinator's fleet view");
        e.to_string()
    })?;
    let reset = targets.is_none();
    let mut chunks = entries.chunks(CHUNK);
    let first = chunks.next().unwrap_or(&[]);
    let message = |reset, targets, entries: &[pb::JournalEntry]| pb::AgentMessage {
        body: Some(Out::Journal(pb::JournalReport {
            reset,
            targets,
            entries: entries.to_vec(),
        })),
    };
    tx.send(message(reset, targets.clone().unwrap_or_default(), first))
        .await
        .map_err(|_| "the stream closed".to_string())?;
    for chunk in chunks {
        tx.send(message(false, Vec::new(), chunk))
            .await
            .map_err(|_| "the stream closed".to_string())?;
    }
    match fingerprints {
        Some(found) => schema::send(tx, found, targets.as_deref()).await,
        None => Ok(()),
    }
}

/// The journal rows and the same targets' schema fingerprints, from one snapshot (a
/// repeatable-read transaction): a migration's DDL commits with its journal row, so a target
/// is never seen with a head its shape does not have yet, which would pass for drift. A
/// catalog that cannot be read leaves the fingerprints out (logged; the next refresh tries).
async fn read(
    agent: &Agent,
    targets: Option<&[String]>,
) -> Result<(Vec<pb::JournalEntry>, Option<schema::Found>), sqlx::Error> {
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
    let fingerprints = schema::read(agent, &mut snapshot, targets).await;
    // read only: ending it either way is the same; a failed catalog read aborted it
    let _ = snapshot.rollback().await;
    Ok((entries, fingerprints))
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
        }
    }

    #[test]
    fn reports_of_some_targets_wait_for_the_gap_and_whole_ones_do_not() {
        let dirty = JournalDirty::default();
        let now = Instant::now();
        dirty.mark(&run("t1", &[pb::StepOutcome::Applied]));
        assert_eq!(dirty.wait_at(now), None, "the first report goes at once");
        *dirty.last_ended.lock().unwrap() = Some(now);
        assert_eq!(dirty.wait_at(now), Some(REPORT_GAP));
        let later = now + REPORT_GAP / 4;
        assert_eq!(dirty.wait_at(later), Some(REPORT_GAP - REPORT_GAP / 4));
        assert_eq!(dirty.wait_at(now + REPORT_GAP), None, "the gap is over");
        dirty.mark_all();
        assert_eq!(dirty.wait_at(now), None, "a whole report goes at once");
        let _ = dirty.take();
        assert_eq!(dirty.wait_at(now), None, "nothing to report: nothing waits");
    }

    #[test]
    fn a_prepared_run_waits_for_its_resolve_to_be_reported() {
        let dirty = JournalDirty::default();
        dirty.mark(&run(
            "t1",
            &[pb::StepOutcome::Prepared, pb::StepOutcome::Prepared],
        ));
        assert_eq!(dirty.take(), None, "nothing visible changed yet");
        dirty.mark(&run("t2", &[pb::StepOutcome::Applied]));
        dirty.mark(&run("t3", &[pb::StepOutcome::Failed]));
        assert_eq!(dirty.take(), Some(Some(vec!["t2".into(), "t3".into()])));
        dirty.mark(&Outgoing::Resolve(pb::ResolveReply::default()));
        assert_eq!(
            dirty.take(),
            Some(None),
            "after the decision: the whole journal"
        );
    }
}
