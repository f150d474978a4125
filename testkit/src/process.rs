//! Child processes with their output in a log file: killed on drop, the log's tail
//! printed when a test panics.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::wait::{self, POLL_INTERVAL};
use crate::{all_threads_stopped, file_tail, pid_alive, read_log, send_signal, tail_lines};

/// Lines of log printed when a process is dropped during a panic.
const TAIL_ON_PANIC: usize = 50;

/// How long [`ManagedProcess::terminate`] waits after SIGTERM.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(10);

/// A child process whose stdout and stderr go to a log file (appended to, so
/// a restarted daemon can share one). Killed (SIGKILL) on drop; if the thread
/// is panicking, the log tail is printed first.
pub struct ManagedProcess {
    name: String,
    child: std::process::Child,
    pid: u32,
    log_path: PathBuf,
    exit_status: Option<ExitStatus>,
}

impl ManagedProcess {
    /// Spawns `cmd` with stdin from /dev/null and stdout+stderr appended to
    /// `log_path`.
    pub fn spawn(mut cmd: Command, name: &str, log_path: &Path) -> anyhow::Result<ManagedProcess> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening log file {}", log_path.display()))?;
        let log_err = log.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(ManagedProcess {
            name: name.to_owned(),
            pid: child.id(),
            child,
            log_path: log_path.to_owned(),
            exit_status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail_lines(&self.log(), lines)
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit_status.is_none() {
            self.exit_status = self.child.try_wait().ok().flatten();
        }
        self.exit_status
    }

    /// Whether the process is still running (a stopped process is running).
    pub fn is_running(&mut self) -> bool {
        self.try_exit_status().is_none()
    }

    /// Polls the log until it contains `needle`. Fails early if the process
    /// exits first; the error carries the log tail.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let what = format!("{:?} in the log of {}", needle, self.name);
        let result = wait::wait_until(&what, timeout, move || async move {
            if self.log().contains(needle) {
                return Ok(true);
            }
            if self.exit_status.is_some() || !pid_alive(self.pid) {
                // Output written just before exiting is in the file by now.
                if self.log().contains(needle) {
                    return Ok(true);
                }
                return Err(wait::fatal(anyhow::anyhow!("{} exited", self.name)));
            }
            Ok(false)
        })
        .await;
        result.with_context(|| {
            format!(
                "log {}, last {TAIL_ON_PANIC} lines:\n{}",
                self.log_path.display(),
                self.log_tail(TAIL_ON_PANIC)
            )
        })
    }

    /// Sends `signal`; fails if the process has already been reaped (its pid
    /// may have been reused).
    pub fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        if self.exit_status.is_some() {
            bail!("{} has already exited", self.name);
        }
        send_signal(self.pid, signal).with_context(|| format!("signalling {}", self.name))
    }

    /// SIGKILL, then reap. A no-op if it has already exited.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_exit_status() {
            return Ok(status);
        }
        self.child
            .kill()
            .with_context(|| format!("killing {}", self.name))?;
        let status = self
            .child
            .wait()
            .with_context(|| format!("reaping {}", self.name))?;
        self.exit_status = Some(status);
        Ok(status)
    }

    /// SIGSTOP: freezes the process (it keeps its sockets open). Returns once every
    /// thread of it has stopped: the signal takes effect asynchronously, and a thread
    /// still running could answer a client right after `kill` returns.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGSTOP)?;
        let pid = self.pid;
        wait::wait_until_blocking(
            &format!("every thread of {} to stop", self.name),
            TERMINATE_TIMEOUT,
            || Ok(all_threads_stopped(pid)),
        )
    }

    /// SIGCONT: resumes a stopped process.
    pub fn cont(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// SIGTERM (plus SIGCONT, in case it is stopped), then waits up to
    /// [`TERMINATE_TIMEOUT`]; if still running, SIGKILLs it and fails.
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.terminate_within(TERMINATE_TIMEOUT).await
    }

    pub async fn terminate_within(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_exit_status() {
            return Ok(status);
        }
        self.signal(libc::SIGTERM)?;
        let _ = self.signal(libc::SIGCONT);
        if let Some(status) = self.wait_exit(timeout).await {
            return Ok(status);
        }
        self.kill()?;
        bail!(
            "{} did not exit within {timeout:?} of SIGTERM (killed it); last lines of {}:\n{}",
            self.name,
            self.log_path.display(),
            self.log_tail(TAIL_ON_PANIC)
        )
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL.min(Duration::from_millis(20))).await;
        }
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "[harness] {} (pid {}) log {}, last {TAIL_ON_PANIC} lines:\n{}\n[harness] end of {} log",
                self.name,
                self.pid,
                self.log_path.display(),
                file_tail(&self.log_path, TAIL_ON_PANIC),
                self.name,
            );
        }
        let _ = self.kill();
    }
}
