//! Polling helpers: tests wait for conditions, never sleep a fixed time.

use std::fmt;
use std::time::{Duration, Instant};

/// How often conditions are re-checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `check` every 50ms until it returns `Ok(true)`; the error names
/// `what`. `check` is an async closure, so it may borrow from the test:
/// `wait_until("row", t, async || Ok(pg.query_scalar::<i64>(..).await? == 1))`.
///
/// `Err` from `check` counts as "not yet" (a server may be restarting) and is
/// reported if the wait times out; wrap an error with [`fatal`] to stop
/// waiting at once. Each check is itself bounded by the remaining time.
pub async fn wait_until<F>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: AsyncFnMut() -> anyhow::Result<bool>,
{
    wait_for(what, timeout, async || {
        check().await.map(|done| done.then_some(()))
    })
    .await
}

/// Like [`wait_until`], for a check that produces a value once ready
/// (`Ok(Some(value))`).
pub async fn wait_for<T, F>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: AsyncFnMut() -> anyhow::Result<Option<T>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut last_error: Option<anyhow::Error> = None;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(POLL_INTERVAL);
        match tokio::time::timeout(remaining, check()).await {
            Ok(Ok(Some(value))) => return Ok(value),
            Ok(Ok(None)) => {}
            Ok(Err(err)) => {
                if err.is::<Fatal>() {
                    return Err(err.context(format!("while waiting for {what}")));
                }
                last_error = Some(err);
            }
            Err(_) => last_error = Some(anyhow::anyhow!("a single check took {remaining:?}")),
        }
        if Instant::now() >= deadline {
            let mut msg = format!(
                "timed out after {:.1?} waiting for {what} ({attempts} checks)",
                start.elapsed()
            );
            if let Some(err) = last_error {
                msg.push_str(&format!("; last error: {err:#}"));
            }
            anyhow::bail!(msg);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Blocking variant of [`wait_until`] for synchronous code (e.g. `Drop`).
pub fn wait_until_blocking(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last_error = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(err) if err.is::<Fatal>() => {
                return Err(err.context(format!("while waiting for {what}")));
            }
            Err(err) => last_error = Some(err),
        }
        if start.elapsed() >= timeout {
            let mut msg = format!("timed out after {:.1?} waiting for {what}", start.elapsed());
            if let Some(err) = last_error {
                msg.push_str(&format!("; last error: {err:#}"));
            }
            anyhow::bail!(msg);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Marks an error as fatal: [`wait_until`] / [`wait_for`] stop at once
/// instead of retrying, e.g. `return Err(fatal(anyhow!("process exited")))`.
pub fn fatal(err: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Fatal(err.into()))
}

/// See [`fatal`].
pub struct Fatal(anyhow::Error);

impl fmt::Debug for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Fatal {}
