//! Requests to read configuration files again without a restart: SIGHUP for the daemons
//! (as nginx, etcd and Vault take it), a channel in tests. Today a daemon reads its TLS
//! certificate, key and CA again on one; other files are read at start only.
//!
//! A watch channel, so that every part of one process that reloads something (the
//! quickstart runs a coordinator and agents together) sees each request, and requests that
//! come faster than a reload are one reload, not a queue.
use tokio::sync::watch;

/// Where a daemon hears that it should read its files again.
#[derive(Debug, Clone)]
pub struct ReloadRequests(watch::Receiver<u64>);

/// Asks the [`ReloadRequests`] of its channel to reload (tests; the SIGHUP task).
#[derive(Debug)]
pub struct RequestReload(watch::Sender<u64>);

impl RequestReload {
    pub fn request(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl ReloadRequests {
    /// A sender and its requests.
    pub fn channel() -> (RequestReload, ReloadRequests) {
        let (tx, rx) = watch::channel(0);
        (RequestReload(tx), ReloadRequests(rx))
    }

    /// Requests that never come (an embedded or test daemon that is not told to reload).
    pub fn never() -> ReloadRequests {
        ReloadRequests::channel().1
    }

    /// A request at each SIGHUP, from now on; the signal no longer ends the process (its
    /// default action), with TLS or without. Call it first thing in a daemon's `main`, in
    /// the runtime: a SIGHUP before it still ends the process. Fails when the signal
    /// handler cannot be installed; off Unix, requests never come.
    pub fn on_sighup() -> std::io::Result<ReloadRequests> {
        let (tx, rx) = ReloadRequests::channel();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hangups = signal(SignalKind::hangup())?;
            tokio::spawn(async move {
                // (once every listener is gone the handler stays: SIGHUP still ends nothing)
                while hangups.recv().await.is_some() {
                    tx.request();
                }
            });
        }
        #[cfg(not(unix))]
        drop(tx);
        Ok(rx)
    }

    /// Resolves at the next request after the last one seen; never, once its sender is gone.
    pub async fn next(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_reaches_every_listener_and_requests_that_came_together_are_one() {
        let (tx, mut a) = ReloadRequests::channel();
        let mut b = a.clone();
        tx.request();
        tx.request();
        a.next().await;
        b.next().await;
        // nothing more was asked
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), a.next()).await;
        assert!(pending.is_err());
        tx.request();
        a.next().await;
    }

    #[tokio::test]
    async fn never_never_resolves() {
        let mut never = ReloadRequests::never();
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), never.next()).await;
        assert!(pending.is_err());
    }
}
