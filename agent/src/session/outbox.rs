//! Results waiting for the coordinator: batched per plan, flushed shortly after the first
//! is ready, and kept across streams (whatever was not sent goes out after the next Hello).
use std::collections::VecDeque;
use std::time::Duration;

use flotilla_core::pb;
use flotilla_core::pb::agent_message::Body as Out;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tracing::warn;

use crate::run::Outgoing;

/// Results are due as soon as this many runs are waiting (or one of them is urgent)...
///
/// By count, not by time: the coordinator's cost is per message (about 0.26 ms of its CPU
/// on the reference machine, against 0.02 ms per step the message carries), so a message
/// should carry several runs whatever the agent's lanes. With a 25 ms window alone, an
/// agent with one lane (a 64-shard rollout at max_parallel 16) finishing a run every 45 ms
/// sent each alone: 3.7 steps a message against 8 at 8 shards, and the coordinator's CPU per
/// step grew with the shards. The coordinator hands a shard at least 32 runs ahead, so
/// holding four back never leaves a lane idle; the shard's last run goes at once.
const BATCH_RUNS: usize = 4;
/// ...or at most this long after the first of a batch is ready (slow runs: one long data
/// change, a long DDL), so the plan's status follows within a quarter of a second.
const FLUSH_AFTER: Duration = Duration::from_millis(250);
/// What waits after the coordinator's channel was full: it reads slowly, and trying again at
/// once would spin until it does.
const RETRY_AFTER_FULL: Duration = Duration::from_millis(25);
/// A burst (a check of the journal reporting hundreds of runs already applied) goes out as
/// soon as this many are waiting, before the next result is taken: it bounds a message.
pub(crate) const FLUSH_RUNS: usize = 128;

/// Why nothing more can be sent on this stream (what was not sent waits for the next one).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamGone {
    #[error("the stream to the coordinator closed")]
    Closed,
    /// `agent::before_send_results` (feature `testing`) dropped the stream. Without the
    /// feature the failpoint compiles to nothing, and nothing builds this variant.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    #[error("failpoint agent::before_send_results")]
    Failpoint,
}

/// Results waiting for the coordinator. They outlive a stream: whatever was not sent goes
/// out after the next Hello (the coordinator takes repeats).
pub(crate) struct Outbox {
    pub rx: mpsc::UnboundedReceiver<Outgoing>,
    pub runs: Vec<(String, pb::RunResult)>,
    ready: VecDeque<pb::AgentMessage>,
    since: Option<Instant>,
    /// Runs pushed since the last flush, batched yet or not (a reply batches those before
    /// it): `BATCH_RUNS` of them are due at once.
    waiting: usize,
    /// The last flush found the coordinator's channel full: try again after
    /// `RETRY_AFTER_FULL`.
    backed_up: bool,
    /// Something waiting must go now, not after `FLUSH_AFTER`: a PREPARED result (its
    /// target holds its locks until the decision, which waits for every such result), a
    /// failure (an atomic unit aborts on it), the last run the shard had of a plan (or one
    /// of an atomic unit), a reply to a Resolve or a Rollback.
    urgent: bool,
}

impl Outbox {
    pub fn new(rx: mpsc::UnboundedReceiver<Outgoing>) -> Outbox {
        Outbox {
            rx,
            runs: Vec::new(),
            ready: VecDeque::new(),
            since: None,
            waiting: 0,
            backed_up: false,
            urgent: false,
        }
    }

    /// Queues one item. A reply goes after every run result queued before it (a Resolve
    /// after the PREPARED results it follows, a RollbackReply after the NOT_RUN of the runs
    /// it halted).
    pub fn push(&mut self, item: Outgoing) {
        let body = match item {
            Outgoing::Run {
                plan_id,
                result,
                last,
            } => {
                self.urgent |= last
                    || result.steps.iter().any(|s| {
                        s.outcome == pb::StepOutcome::Prepared as i32
                            || s.outcome == pb::StepOutcome::Failed as i32
                    });
                self.runs.push((plan_id, result));
                self.waiting += 1;
                self.since.get_or_insert_with(Instant::now);
                return;
            }
            Outgoing::Rollback(reply) => {
                // the plan's rollback on this shard waits on it
                self.urgent = true;
                Out::Rollback(reply)
            }
            Outgoing::Resolve(reply) => {
                self.urgent = true;
                Out::Resolve(reply)
            }
        };
        self.batch();
        self.ready.push_back(pb::AgentMessage { body: Some(body) });
        self.since.get_or_insert_with(Instant::now);
    }

    pub fn due(&self) -> Option<Instant> {
        let wait = if self.urgent || self.waiting >= BATCH_RUNS {
            Duration::ZERO
        } else if self.backed_up {
            RETRY_AFTER_FULL
        } else {
            FLUSH_AFTER
        };
        self.since.map(|s| s + wait)
    }

    /// Groups buffered runs into one RunResults per plan (in order of arrival), at most
    /// `FLUSH_RUNS` runs a message (behind a full channel more may have gathered).
    fn batch(&mut self) {
        let mut by_plan: Vec<pb::RunResults> = Vec::new();
        for (plan_id, run) in self.runs.drain(..) {
            match by_plan
                .iter_mut()
                .rev()
                .find(|r| r.plan_id == plan_id && r.runs.len() < FLUSH_RUNS)
            {
                Some(r) => r.runs.push(run),
                None => by_plan.push(pb::RunResults {
                    plan_id,
                    runs: vec![run],
                }),
            }
        }
        self.ready
            .extend(by_plan.into_iter().map(|r| pb::AgentMessage {
                body: Some(Out::Results(r)),
            }));
    }

    /// The agent is stopping with results still here: they never reach a coordinator from
    /// this process, so each is logged (the shard's journal holds what was applied).
    pub fn abandon(&mut self) {
        while let Ok(item) = self.rx.try_recv() {
            self.push(item);
        }
        self.batch();
        for msg in self.ready.drain(..) {
            match msg.body {
                Some(Out::Results(r)) => {
                    warn!(plan = %r.plan_id, runs = r.runs.len(), "run results not sent: the agent is stopping")
                }
                Some(Out::Rollback(r)) => {
                    warn!(plan = %r.plan_id, complete = r.complete, "rollback reply not sent: the agent is stopping")
                }
                Some(Out::Resolve(r)) => {
                    warn!(plan = %r.plan_id, resolved = r.resolved.len(), "resolve reply not sent: the agent is stopping")
                }
                _ => {}
            }
        }
        self.since = None;
        self.waiting = 0;
    }

    /// Sends what is ready without waiting. Err when the stream is gone.
    pub fn flush(&mut self, tx: &mpsc::Sender<pb::AgentMessage>) -> Result<(), StreamGone> {
        fail::fail_point!("agent::before_send_results", |_| Err(StreamGone::Failpoint));
        loop {
            // What is ready goes first, and the runs since are batched only then: behind a
            // full channel they keep gathering into one message, not one per retry.
            if self.ready.is_empty() {
                self.batch();
            }
            let Some(msg) = self.ready.pop_front() else {
                break;
            };
            match tx.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(msg)) => {
                    // the coordinator is slow to read: try again shortly, urgent or not
                    // (trying again at once would spin until it reads)
                    self.ready.push_front(msg);
                    self.since = Some(Instant::now());
                    self.urgent = false;
                    self.waiting = 0;
                    self.backed_up = true;
                    return Ok(());
                }
                Err(TrySendError::Closed(msg)) => {
                    self.ready.push_front(msg);
                    return Err(StreamGone::Closed);
                }
            }
        }
        self.since = None;
        self.urgent = false;
        self.waiting = 0;
        self.backed_up = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbox, and the sender that keeps its intake open.
    fn outbox() -> (mpsc::UnboundedSender<Outgoing>, Outbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Outbox::new(rx))
    }

    fn run(plan: &str, id: u64, last: bool) -> Outgoing {
        Outgoing::Run {
            plan_id: plan.into(),
            result: run_result(id),
            last,
        }
    }

    fn run_result(id: u64) -> pb::RunResult {
        pb::RunResult {
            run_id: id,
            tenant: format!("t{id}"),
            steps: Vec::new(),
            prepared_at_us: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_prepared_result_goes_at_once() {
        let (_in_tx, mut outbox) = outbox();
        outbox.push(run("a", 1, false));
        assert_eq!(outbox.due(), Some(Instant::now() + FLUSH_AFTER));
        let mut prepared = run_result(2);
        prepared.steps.push(pb::StepResult {
            outcome: pb::StepOutcome::Prepared as i32,
            ..Default::default()
        });
        outbox.push(Outgoing::Run {
            plan_id: "a".into(),
            result: prepared,
            last: false,
        });
        assert_eq!(
            outbox.due(),
            Some(Instant::now()),
            "due now, with what waited before it"
        );
        let (tx, _rx) = mpsc::channel(8);
        outbox.flush(&tx).unwrap();
        outbox.push(run("a", 3, false));
        assert_eq!(
            outbox.due(),
            Some(Instant::now() + FLUSH_AFTER),
            "urgent ends with the flush"
        );
    }

    /// A message carries several runs whatever the agent's lanes: due at once when
    /// `BATCH_RUNS` wait, else after the window; the count starts again after a flush.
    #[tokio::test(start_paused = true)]
    async fn a_few_runs_go_together_and_one_waits_out_the_window() {
        let (_in_tx, mut outbox) = outbox();
        let first = Instant::now();
        for id in 1..BATCH_RUNS as u64 {
            outbox.push(run("a", id, false));
            tokio::time::advance(Duration::from_millis(10)).await;
            assert_eq!(outbox.due(), Some(first + FLUSH_AFTER), "run {id} waits");
        }
        outbox.push(run("b", 9, false));
        assert_eq!(outbox.due(), Some(first), "due now: {BATCH_RUNS} runs wait");
        let (tx, mut rx) = mpsc::channel(8);
        outbox.flush(&tx).unwrap();
        let mut sent = 0;
        while let Ok(msg) = rx.try_recv() {
            let Some(Out::Results(r)) = msg.body else {
                panic!("not results")
            };
            sent += r.runs.len();
        }
        assert_eq!(sent, BATCH_RUNS, "every waiting run went");
        outbox.push(run("a", 10, false));
        assert_eq!(outbox.due(), Some(Instant::now() + FLUSH_AFTER));
    }

    /// The shard's last run of a plan: nothing is left to batch it with, and the
    /// coordinator waits on it (the plan's end, the next wave, more runs).
    #[tokio::test(start_paused = true)]
    async fn the_last_run_of_a_plan_goes_at_once() {
        let (_in_tx, mut outbox) = outbox();
        outbox.push(run("a", 1, false));
        assert_eq!(outbox.due(), Some(Instant::now() + FLUSH_AFTER));
        outbox.push(run("a", 2, true));
        assert_eq!(outbox.due(), Some(Instant::now()), "due now");
        let (tx, mut rx) = mpsc::channel(8);
        outbox.flush(&tx).unwrap();
        let Some(Out::Results(r)) = rx.recv().await.unwrap().body else {
            panic!("not results")
        };
        assert_eq!(r.runs.len(), 2, "with what waited before it");

        // a coordinator slow to read: what did not fit is tried again shortly, urgent or
        // not (at once again would spin until it reads), however many runs wait
        for plan in ["b", "c", "d", "e"] {
            outbox.push(run(plan, 3, true));
        }
        let (tx, _rx) = mpsc::channel(1);
        outbox.flush(&tx).unwrap();
        assert_eq!(outbox.due(), Some(Instant::now() + RETRY_AFTER_FULL));
    }

    /// Behind a full channel, runs keep gathering into one message (not one per retry),
    /// and a message carries at most `FLUSH_RUNS` runs.
    #[tokio::test(start_paused = true)]
    async fn runs_behind_a_full_channel_gather_into_few_messages() {
        let (_in_tx, mut outbox) = outbox();
        let (tx, mut rx) = mpsc::channel(1);
        tx.try_send(pb::AgentMessage { body: None }).unwrap(); // the channel is full
        outbox.push(run("a", 1, false));
        outbox.push(run("a", 2, false));
        outbox.flush(&tx).unwrap();
        for id in 3..4 + FLUSH_RUNS as u64 {
            outbox.push(run("a", id, false));
            outbox.flush(&tx).unwrap(); // full every time
        }
        let mut sizes = Vec::new();
        loop {
            rx.recv().await.unwrap(); // the coordinator reads one
            outbox.flush(&tx).unwrap();
            match rx.try_recv() {
                Ok(pb::AgentMessage {
                    body: Some(Out::Results(r)),
                }) => sizes.push(r.runs.len()),
                Ok(other) => panic!("{other:?}"),
                Err(_) => break,
            }
            if outbox.due().is_none() {
                break;
            }
            tx.try_send(pb::AgentMessage { body: None }).unwrap();
        }
        assert_eq!(
            sizes,
            [2, FLUSH_RUNS, 1],
            "the first batch, then the rest together"
        );
    }

    /// A rollback's reply goes at once (the plan's rollback waits on it), and the runs
    /// towards `BATCH_RUNS` are counted again from each flush.
    #[tokio::test(start_paused = true)]
    async fn a_rollback_reply_goes_at_once_and_runs_count_from_each_flush() {
        let (_in_tx, mut outbox) = outbox();
        outbox.push(run("a", 1, false));
        outbox.push(Outgoing::Rollback(pb::RollbackReply {
            plan_id: "a".into(),
            ..Default::default()
        }));
        assert_eq!(outbox.due(), Some(Instant::now()), "the reply is due now");
        let (tx, _rx) = mpsc::channel(8);
        outbox.flush(&tx).unwrap();

        let first = Instant::now();
        for id in 2..BATCH_RUNS as u64 {
            outbox.push(run("b", id, false));
        }
        outbox.push(Outgoing::Resolve(pb::ResolveReply {
            plan_id: "b".into(),
            ..Default::default()
        }));
        outbox.flush(&tx).unwrap();
        for id in 10..10 + BATCH_RUNS as u64 - 1 {
            outbox.push(run("c", id, false));
        }
        assert_eq!(
            outbox.due(),
            Some(first + FLUSH_AFTER),
            "a new count after a flush"
        );
        outbox.push(run("c", 20, false));
        assert_eq!(
            outbox.due(),
            Some(first),
            "{BATCH_RUNS} runs since the flush"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn outbox_batches_per_plan_and_keeps_what_was_not_sent() {
        let (_in_tx, mut outbox) = outbox();
        for (plan, id) in [("a", 1), ("b", 2), ("a", 3)] {
            outbox.push(run(plan, id, false));
        }
        assert_eq!(outbox.due(), Some(Instant::now() + FLUSH_AFTER));
        let (tx, mut rx) = mpsc::channel(8);
        outbox.flush(&tx).unwrap();
        assert!(outbox.due().is_none());
        let Some(Out::Results(r)) = rx.recv().await.unwrap().body else {
            panic!("not results")
        };
        assert_eq!((r.plan_id.as_str(), r.runs.len()), ("a", 2));
        let Some(Out::Results(r)) = rx.recv().await.unwrap().body else {
            panic!("not results")
        };
        assert_eq!((r.plan_id.as_str(), r.runs.len()), ("b", 1));
        // a closed stream keeps the batch for the next one
        outbox.push(run("c", 4, false));
        drop(rx);
        assert!(outbox.flush(&tx).is_err());
        let (tx2, mut rx2) = mpsc::channel(8);
        outbox.flush(&tx2).unwrap();
        let Some(Out::Results(r)) = rx2.recv().await.unwrap().body else {
            panic!("not results")
        };
        assert_eq!((r.plan_id.as_str(), r.runs[0].run_id), ("c", 4));
    }

    #[tokio::test(start_paused = true)]
    async fn replies_go_after_the_results_queued_before_them() {
        let (_in_tx, mut outbox) = outbox();
        outbox.push(run("a", 1, false));
        outbox.push(Outgoing::Resolve(pb::ResolveReply {
            plan_id: "a".into(),
            commit: true,
            ..Default::default()
        }));
        outbox.push(run("a", 2, false));
        let (tx, mut rx) = mpsc::channel(8);
        outbox.flush(&tx).unwrap();
        let mut order = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            order.push(match msg.body.unwrap() {
                Out::Results(r) => format!("results {}", r.runs[0].run_id),
                Out::Resolve(r) => format!("resolve {}", r.plan_id),
                other => panic!("{other:?}"),
            });
        }
        assert_eq!(order, ["results 1", "resolve a", "results 2"]);
    }
}
