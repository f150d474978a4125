//! Messages to agents. Each attached agent's stream is a bounded channel; what it cannot
//! take now waits in the connection's backlog, in order, and goes as soon as the channel
//! has room (after every engine event). Nothing is dropped while the stream is open, so
//! "sent" means "will reach the agent unless its stream ends", and a stream that ends
//! brings a reconnect that resends everything outstanding.
//!
//! (Before, a send into a full channel was dropped: a plan definition dropped this way
//! was still marked as sent, and dropped runs went only after a reconnect: a stall.)
use std::collections::VecDeque;

use flotilla_core::pb;
use flotilla_core::pb::coordinator_message::Body;
use tokio::sync::mpsc::error::TrySendError;
use tracing::warn;

use super::{AgentTx, Engine};
use crate::plan::ShardRun;

/// A backlog this long means the agent reads nothing while it keeps its stream open;
/// it is said once in the log (its heartbeats decide whether it is gone).
const BACKLOG_WARN: usize = 10_000;

pub fn msg(body: Body) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage { body: Some(body) }
}

/// Whether the plan is paused on the agent's shard now.
pub(super) fn pause(plan_id: &str, paused: bool) -> Body {
    Body::Pause(pb::Pause {
        plan_id: plan_id.to_string(),
        paused,
        reason: if paused {
            format!("plan {plan_id} paused by an operator")
        } else {
            String::new()
        },
    })
}

pub(super) fn halt(plan_id: &str) -> Body {
    Body::Halt(pb::Halt {
        plan_id: plan_id.to_string(),
    })
}

/// One attached agent: its stream, and what the stream could not take yet.
pub(crate) struct AgentConn {
    pub conn_id: u64,
    pub max_lanes: u32,
    /// Its heartbeat says its shard's database does not answer it.
    pub shard_unreachable: bool,
    tx: AgentTx,
    backlog: VecDeque<pb::CoordinatorMessage>,
    warned: bool,
}

impl AgentConn {
    pub fn new(conn_id: u64, tx: AgentTx, max_lanes: u32) -> AgentConn {
        AgentConn {
            conn_id,
            max_lanes,
            shard_unreachable: false,
            tx,
            backlog: VecDeque::new(),
            warned: false,
        }
    }

    /// Sends a message behind any the stream has not taken yet. False only when the
    /// stream has ended (a reconnect resends what is outstanding).
    pub fn send(&mut self, body: Body) -> bool {
        let m = msg(body);
        if !self.backlog.is_empty() {
            self.backlog.push_back(m);
            self.warn_if_stuck();
            return true;
        }
        match self.tx.try_send(m) {
            Ok(()) => true,
            Err(TrySendError::Full(m)) => {
                self.backlog.push_back(m);
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    /// Hands the stream what waits in the backlog, in order, as far as it takes it now.
    pub fn flush(&mut self) {
        while let Some(m) = self.backlog.pop_front() {
            match self.tx.try_send(m) {
                Ok(()) => {}
                Err(TrySendError::Full(m)) => {
                    self.backlog.push_front(m);
                    return;
                }
                Err(TrySendError::Closed(_)) => {
                    // the stream ended: its Detached event follows, and a reconnect resends
                    self.backlog.clear();
                    return;
                }
            }
        }
        self.warned = false;
    }

    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    fn warn_if_stuck(&mut self) {
        if self.backlog.len() >= BACKLOG_WARN && !self.warned {
            self.warned = true;
            warn!(
                conn = self.conn_id,
                waiting = self.backlog.len(),
                "an agent takes no messages from its stream"
            );
        }
    }

    /// Sends the plan's definition on this stream unless it went there already; whether
    /// it was sent now (a new stream).
    /// The plan's definition, once per stream, and whether the plan is paused on the shard
    /// now: an agent that holds the plan paused from before (a pause it heard from another
    /// leader, or before a retry; a resume it missed) would otherwise hold its data changes
    /// at their batch boundaries for good while the plan shows running.
    pub fn send_definition(
        &mut self,
        sr: &mut ShardRun,
        definition: &pb::PlanDefinition,
        paused: bool,
    ) -> bool {
        if sr.defined_on == Some(self.conn_id) {
            return false;
        }
        if self.send(Body::Plan(definition.clone())) {
            sr.defined_on = Some(self.conn_id);
            self.send(pause(&definition.plan_id, paused));
            true
        } else {
            false
        }
    }
}

impl Engine {
    /// Sends to a shard's agent if one is attached; whether it was (a detached shard hears
    /// everything again when its agent comes back).
    pub(super) fn send_to(&mut self, shard: &str, body: Body) -> bool {
        self.agents
            .get_mut(shard)
            .is_some_and(|agent| agent.send(body))
    }

    /// Moves every agent's backlog into its stream as far as the stream takes it.
    pub(super) fn flush_outbound(&mut self) {
        for agent in self.agents.values_mut() {
            if agent.backlog() > 0 {
                agent.flush();
            }
        }
    }
}
