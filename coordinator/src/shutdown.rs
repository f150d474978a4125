//! Stopping a coordinator: hand leadership over at once, end the streams that
//! would otherwise hold the server open, and stop within a bound whatever is left.
//!
//! tonic's graceful shutdown waits for every open stream, and two kinds last as
//! long as their peer wants: an agent's `Attach` and an operator's `WatchPlan`.
//! Left alone, a leader asked to stop would stop answering but neither exit nor
//! let a follower lead before its lease expired. So, in order:
//!
//! 1. `Shutdown::begin`: watches end (with "shutting down", so a client never
//!    takes the last status it saw for the plan's end) and no agent is taken;
//! 2. the engine stops scheduling and deciding (as when leadership is lost), and
//!    what it wrote reaches the control store;
//! 3. leadership is released (the etcd session lease revoked): a follower
//!    leads at once instead of after the lease TTL;
//! 4. the agents are let go: their streams end and they find the new leader.
//!
//! The caller then stops the server and gives all of it a hard bound.
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::engine::Event;
use crate::service::Coordinator;

/// The coordinator's shutdown as it proceeds, and the long-lived streams still open.
pub struct Shutdown {
    /// Fired first: watches end, agents are refused.
    stopping: watch::Sender<bool>,
    /// Fired once leadership is released: agents' streams end.
    agents_released: watch::Sender<bool>,
    open: Mutex<BTreeMap<u64, String>>,
    next_id: AtomicU64,
}

impl Default for Shutdown {
    fn default() -> Shutdown {
        Shutdown {
            stopping: watch::channel(false).0,
            agents_released: watch::channel(false).0,
            open: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
        }
    }
}

/// Resolves once the flag is set (or its sender is gone: the coordinator is).
async fn fired(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

impl Shutdown {
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Resolves once the coordinator has begun to stop.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + use<> {
        fired(self.stopping.subscribe())
    }

    /// Resolves once the coordinator lets its agents go.
    pub fn agents_released(&self) -> impl Future<Output = ()> + Send + use<> {
        fired(self.agents_released.subscribe())
    }

    fn begin(&self) {
        // send_replace: the flag must stick even when nothing listens yet
        self.stopping.send_replace(true);
    }

    fn release_agents(&self) {
        self.agents_released.send_replace(true);
    }

    /// Counts `stream` (named `what` in the log) as open until it is dropped, which
    /// is when the server is done with it.
    pub fn track<S>(
        self: &Arc<Self>,
        what: String,
        stream: S,
    ) -> impl Stream<Item = S::Item> + use<S>
    where
        S: Stream + Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, what);
        let guard = OpenStream {
            shutdown: self.clone(),
            id,
        };
        stream.map(move |item| {
            let _held = &guard;
            item
        })
    }

    /// The streams still open, for the log of a shutdown that ran out of time.
    pub fn still_open(&self) -> Vec<String> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, String>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes its stream from [`Shutdown::still_open`] when the stream is dropped.
struct OpenStream {
    shutdown: Arc<Shutdown>,
    id: u64,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.shutdown.lock().remove(&self.id);
    }
}

impl Coordinator {
    /// Steps 1 to 4 of the module's doc: after it, only the server's own
    /// connections keep the process up.
    /// `settle` bounds step 2's wait for the engine and the store: a store or an
    /// engine that does not answer must not keep leadership from the next coordinator.
    pub(crate) async fn hand_over(&self, settle: Duration) {
        if stalled() {
            // tests: a hand-over that never ends, for the hard bound to cut short
            std::future::pending::<()>().await;
        }
        let inner = &self.inner;
        inner.shutdown.begin();
        // Nothing is scheduled or decided from here on; what agents are running
        // finishes on the shards, and the next leader rebuilds from the store and
        // the journals, as after any change of leader. What the engine wrote is in
        // the store before the next leader reads it.
        let settled = async {
            let (done, stopped) = oneshot::channel();
            self.event(Event::Stop { done }).await;
            let _ = stopped.await;
            self.flush().await;
        };
        if tokio::time::timeout(settle, settled).await.is_err() {
            warn!(
                ?settle,
                "the engine or the control store did not settle in time; releasing leadership anyway"
            );
        }
        inner.coordination.resign().await;
        info!(
            backend = inner.coordination.kind(),
            "leadership released; letting the agents go"
        );
        inner.fleet.detach_all();
        inner.shutdown.release_agents();
    }
}

/// The failpoint `coordinator::stall_hand_over` (testing builds).
fn stalled() -> bool {
    fail::fail_point!("coordinator::stall_hand_over", |_| true);
    false
}
