//! The agents attached right now, and request/reply exchanges over their streams
//! (preflight), shared by the gRPC handlers.
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use flotilla_core::pb;
use tokio::sync::oneshot;

use crate::engine::{AgentTx, msg};
use crate::error::CoordinatorError;

#[derive(Clone)]
pub struct AttachedAgent {
    pub conn_id: u64,
    pub tx: AgentTx,
    pub labels: BTreeMap<String, String>,
    pub tenants: Vec<pb::Tenant>,
    pub version: String,
    pub last_seen_ms: i64,
    /// Which database the agent serves (`pb::Hello::database`; empty from older agents).
    pub database: String,
    /// Its last heartbeat said it does not hold its shard's lock (its database does not
    /// answer it): it applies nothing until it does.
    pub shard_unreachable: bool,
}

#[derive(Default)]
struct Inner {
    agents: BTreeMap<String, AttachedAgent>,
    preflights: HashMap<u64, oneshot::Sender<pb::PreflightReply>>,
    checks: HashMap<u64, oneshot::Sender<pb::CheckReply>>,
    baselines: HashMap<u64, oneshot::Sender<pb::BaselineReply>>,
    explains: HashMap<u64, oneshot::Sender<pb::ExplainReply>>,
    next_id: u64,
}

#[derive(Default)]
pub struct Fleet {
    inner: Mutex<Inner>,
    /// How many rollback replies agents sent (steps undone on their shards): a plan whose
    /// submit read the journals before one arrived may report applied what is undone.
    undo_replies: std::sync::atomic::AtomicU64,
}

impl Fleet {
    /// Counts a rollback reply from an agent, as it arrives (before the engine takes it).
    pub fn undo_reported(&self) {
        self.undo_replies
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many rollback replies agents sent to this coordinator so far.
    pub fn undo_replies(&self) -> u64 {
        self.undo_replies.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn next_conn_id(&self) -> u64 {
        let mut g = self.inner.lock().expect("fleet lock");
        g.next_id += 1;
        g.next_id
    }

    /// Registers an agent's stream; a newer stream for the same shard replaces the old one.
    /// Takes the agent's stream for `shard`, in place of one the shard had (an agent that
    /// came back before its old stream was seen to end). Refused, naming the database the
    /// attached one serves, when that is another database: two agents given one shard name
    /// would take the shard from each other at every attach, and a plan's runs would go to
    /// whichever held it.
    pub fn attach(&self, shard: &str, agent: AttachedAgent) -> Result<(), String> {
        let mut g = self.inner.lock().expect("fleet lock");
        if let Some(other) = g.agents.get(shard)
            && !other.database.is_empty()
            && !agent.database.is_empty()
            && other.database != agent.database
        {
            return Err(other.database.clone());
        }
        g.agents.insert(shard.to_string(), agent);
        Ok(())
    }

    /// Forgets a stream, unless a newer one for the shard took its place.
    pub fn detach(&self, shard: &str, conn_id: u64) -> bool {
        let mut g = self.inner.lock().expect("fleet lock");
        if g.agents.get(shard).is_some_and(|a| a.conn_id == conn_id) {
            g.agents.remove(shard);
            true
        } else {
            false
        }
    }

    /// Lets every agent go (their streams end): a follower keeps none.
    pub fn detach_all(&self) {
        self.inner.lock().expect("fleet lock").agents.clear();
    }

    pub fn touch(&self, shard: &str, conn_id: u64, now_ms: i64) {
        let mut g = self.inner.lock().expect("fleet lock");
        if let Some(a) = g.agents.get_mut(shard).filter(|a| a.conn_id == conn_id) {
            a.last_seen_ms = now_ms;
        }
    }

    /// Records whether the attached agent (of this connection) can reach its shard, as its
    /// heartbeat says; true when that changed.
    pub fn set_unreachable(&self, shard: &str, conn_id: u64, unreachable: bool) -> bool {
        let mut g = self.inner.lock().expect("fleet lock");
        match g.agents.get_mut(shard).filter(|a| a.conn_id == conn_id) {
            Some(a) if a.shard_unreachable != unreachable => {
                a.shard_unreachable = unreachable;
                true
            }
            _ => false,
        }
    }

    /// Replaces an attached agent's tenants; returns the names it had (None: not attached).
    /// The shard's tenants as its agent reports them now; returns the names of those it had
    /// before, and of those whose changed schema an operator has answered for since
    /// (`tenant_is_new`, `tenant_kept_its_history`): they are caught up on what their
    /// journals lack (a tenant said new never got its migrations, though the agent's message
    /// said they would run again).
    pub fn set_tenants(
        &self,
        shard: &str,
        tenants: Vec<pb::Tenant>,
    ) -> Option<(Vec<String>, Vec<String>)> {
        let mut g = self.inner.lock().expect("fleet lock");
        let a = g.agents.get_mut(shard)?;
        let settled: std::collections::BTreeSet<&str> = tenants
            .iter()
            .filter(|t| !t.schema_changed)
            .map(|t| t.name.as_str())
            .collect();
        let before = a.tenants.iter().map(|t| t.name.clone()).collect();
        let answered = a
            .tenants
            .iter()
            .filter(|t| t.schema_changed && settled.contains(t.name.as_str()))
            .map(|t| t.name.clone())
            .collect();
        a.tenants = tenants;
        Some((before, answered))
    }

    /// Whether the shard's agent is attached here (nothing copied).
    pub fn is_attached(&self, shard: &str) -> bool {
        self.inner
            .lock()
            .expect("fleet lock")
            .agents
            .contains_key(shard)
    }

    /// One attached agent, copied (not the whole fleet: its tenants' lists are large).
    pub fn agent(&self, shard: &str) -> Option<AttachedAgent> {
        self.inner
            .lock()
            .expect("fleet lock")
            .agents
            .get(shard)
            .cloned()
    }

    pub fn snapshot(&self) -> BTreeMap<String, AttachedAgent> {
        self.inner.lock().expect("fleet lock").agents.clone()
    }

    /// Asks one agent for its tenants, the journal rows of the request's migrations, and
    /// what it asks checked (two-phase commit, data migrations' tables and keys).
    pub async fn preflight(
        &self,
        shard: &str,
        mut request: pb::PreflightRequest,
        timeout: Duration,
    ) -> Result<pb::PreflightReply, CoordinatorError> {
        self.ask(
            shard,
            timeout,
            "preflight",
            |g| &mut g.preflights,
            |id| {
                request.request_id = id;
                pb::coordinator_message::Body::Preflight(request)
            },
        )
        .await
    }

    /// Has one agent run a wave's SQL gate on some of its targets.
    pub async fn check(
        &self,
        shard: &str,
        mut request: pb::CheckRequest,
        timeout: Duration,
    ) -> Result<pb::CheckReply, CoordinatorError> {
        self.ask(
            shard,
            timeout,
            "gate check",
            |g| &mut g.checks,
            |id| {
                request.request_id = id;
                pb::coordinator_message::Body::Check(request)
            },
        )
        .await
    }

    /// Has one agent read (and record) a baseline on some of its targets.
    pub async fn baseline(
        &self,
        shard: &str,
        mut request: pb::BaselineRequest,
        timeout: Duration,
    ) -> Result<pb::BaselineReply, CoordinatorError> {
        self.ask(
            shard,
            timeout,
            "baseline",
            |g| &mut g.baselines,
            |id| {
                request.request_id = id;
                pb::coordinator_message::Body::Baseline(request)
            },
        )
        .await
    }

    /// Asks one agent for the dry run's reads on some of its targets (relations' existence,
    /// sizes and row estimates); it changes nothing there.
    pub async fn explain(
        &self,
        shard: &str,
        mut request: pb::ExplainRequest,
        timeout: Duration,
    ) -> Result<pb::ExplainReply, CoordinatorError> {
        self.ask(
            shard,
            timeout,
            "dry run",
            |g| &mut g.explains,
            |id| {
                request.request_id = id;
                pb::coordinator_message::Body::Explain(request)
            },
        )
        .await
    }

    /// Sends a request on an agent's stream and waits for the reply with its id, which the
    /// session's reader hands over (`complete_*`). A reply that says the agent could not do
    /// it at all is the shard being unreachable for this.
    async fn ask<R: AgentReply>(
        &self,
        shard: &str,
        timeout: Duration,
        what: &str,
        waiters: fn(&mut Inner) -> &mut HashMap<u64, oneshot::Sender<R>>,
        request: impl FnOnce(u64) -> pb::coordinator_message::Body,
    ) -> Result<R, CoordinatorError> {
        let unreachable = |reason: String| CoordinatorError::Unreachable {
            shard: shard.to_string(),
            reason,
        };
        let (tx, rx) = oneshot::channel();
        let (agent_tx, request_id) = {
            let mut g = self.inner.lock().expect("fleet lock");
            let agent_tx = g
                .agents
                .get(shard)
                .map(|a| a.tx.clone())
                .ok_or_else(|| unreachable("its agent is not attached".into()))?;
            g.next_id += 1;
            let id = g.next_id;
            waiters(&mut g).insert(id, tx);
            (agent_tx, id)
        };
        let sent = agent_tx.send(msg(request(request_id))).await;
        let reply = match sent {
            Ok(()) => Some(tokio::time::timeout(timeout, rx).await),
            Err(_) => None,
        };
        waiters(&mut self.inner.lock().expect("fleet lock")).remove(&request_id);
        let Some(reply) = reply else {
            return Err(unreachable("its agent stream closed".into()));
        };
        match reply {
            Ok(Ok(r)) if r.error().is_empty() => Ok(r),
            Ok(Ok(r)) => Err(unreachable(r.error().to_string())),
            Ok(Err(_)) => Err(unreachable("its agent stream closed".into())),
            Err(_) => Err(unreachable(format!(
                "no {what} answer within {}s",
                timeout.as_secs()
            ))),
        }
    }

    pub fn complete_preflight(&self, reply: pb::PreflightReply) {
        let waiter = self
            .inner
            .lock()
            .expect("fleet lock")
            .preflights
            .remove(&reply.request_id);
        if let Some(w) = waiter {
            // the asker may have timed out; the reply has no one to go to then
            let _ = w.send(reply);
        }
    }

    pub fn complete_check(&self, reply: pb::CheckReply) {
        let waiter = self
            .inner
            .lock()
            .expect("fleet lock")
            .checks
            .remove(&reply.request_id);
        if let Some(w) = waiter {
            // the asker may have timed out; the reply has no one to go to then
            let _ = w.send(reply);
        }
    }

    pub fn complete_baseline(&self, reply: pb::BaselineReply) {
        let waiter = self
            .inner
            .lock()
            .expect("fleet lock")
            .baselines
            .remove(&reply.request_id);
        if let Some(w) = waiter {
            // the asker may have timed out; the reply has no one to go to then
            let _ = w.send(reply);
        }
    }
}

impl Fleet {
    pub fn complete_explain(&self, reply: pb::ExplainReply) {
        let waiter = self
            .inner
            .lock()
            .expect("fleet lock")
            .explains
            .remove(&reply.request_id);
        if let Some(w) = waiter {
            // the asker may have timed out; the reply has no one to go to then
            let _ = w.send(reply);
        }
    }
}

/// A reply an agent sends to an exchange; its error, if any, says it could not do what was
/// asked at all.
trait AgentReply {
    fn error(&self) -> &str;
}

impl AgentReply for pb::PreflightReply {
    fn error(&self) -> &str {
        &self.error
    }
}

impl AgentReply for pb::CheckReply {
    fn error(&self) -> &str {
        &self.error
    }
}

impl AgentReply for pb::BaselineReply {
    fn error(&self) -> &str {
        &self.error
    }
}

impl AgentReply for pb::ExplainReply {
    fn error(&self) -> &str {
        &self.error
    }
}
