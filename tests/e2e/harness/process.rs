//! The real `flotilla` binary as a child process: long-running coordinators and
//! agents, and one-shot CLI commands (generic child processes are
//! [`flotilla_testkit::process::ManagedProcess`]).

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_testkit::TestDir;
use flotilla_testkit::process::ManagedProcess;

/// Path of the `flotilla` binary under test.
pub const FLOTILLA_BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// Deadline for [`run_flotilla`].
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `flotilla` process (or another program, see
/// [`FlotillaProcess::spawn_program`]) with its log in its own temp dir.
/// Dereferences to [`ManagedProcess`] for signals, waiting and logs.
pub struct FlotillaProcess {
    // Declared before `dir`: the process dies before its log is removed.
    process: ManagedProcess,
    dir: TestDir,
}

impl FlotillaProcess {
    /// Runs the `flotilla` binary under test with `args` and extra `envs`.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<FlotillaProcess> {
        Self::spawn_program(FLOTILLA_BIN, args, envs)
    }

    /// Runs any program the same way (used for helpers and harness tests).
    pub fn spawn_program(
        program: impl AsRef<Path>,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<FlotillaProcess> {
        let program = program.as_ref();
        let stem = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "process".to_owned());
        let name = match args.first() {
            Some(first) => format!("{stem} {first}"),
            None => stem.clone(),
        };
        let dir = TestDir::new(&format!("proc-{stem}"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(dir.path());
        apply_default_env(&mut cmd);
        for (key, value) in envs {
            cmd.env(key, value);
        }
        let log_path = dir.join("output.log");
        let process = ManagedProcess::spawn(cmd, &name, &log_path)?;
        Ok(FlotillaProcess { process, dir })
    }

    /// The process's temp dir (also its working directory).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Deref for FlotillaProcess {
    type Target = ManagedProcess;

    fn deref(&self) -> &ManagedProcess {
        &self.process
    }
}

impl DerefMut for FlotillaProcess {
    fn deref_mut(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }
}

/// Environment every spawned `flotilla` gets (callers' `envs` override it):
/// no ANSI colours, so log substrings can be matched.
fn apply_default_env(cmd: &mut Command) {
    cmd.env("NO_COLOR", "1").env("RUST_BACKTRACE", "1");
}

/// Result of a one-shot command.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    /// Exit code; `None` if killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The JSON on the last line of stdout (`--output json` prints it last).
    pub fn last_json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(self.stdout.lines().last().unwrap_or(""))
            .with_context(|| format!("no JSON in the output: {self}"))
    }

    /// `Ok(self)` if the command succeeded, else an error with its output.
    pub fn expect_success(self) -> anyhow::Result<CommandOutput> {
        if self.success() {
            Ok(self)
        } else {
            bail!("command failed: {self}")
        }
    }
}

impl std::fmt::Display for CommandOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `flotilla args...` to completion (at most [`RUN_TIMEOUT`]) and
/// captures its output. A non-zero exit is not an error; check `status`.
pub async fn run_flotilla(args: &[&str], envs: &[(&str, &str)]) -> anyhow::Result<CommandOutput> {
    run_flotilla_within(args, envs, RUN_TIMEOUT).await
}

pub async fn run_flotilla_within(
    args: &[&str],
    envs: &[(&str, &str)],
    timeout: Duration,
) -> anyhow::Result<CommandOutput> {
    let mut cmd = Command::new(FLOTILLA_BIN);
    cmd.args(args);
    apply_default_env(&mut cmd);
    for (key, value) in envs {
        cmd.env(key, value);
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| format!("`flotilla {}` timed out after {timeout:?}", args.join(" ")))?
        .with_context(|| format!("running `flotilla {}`", args.join(" ")))?;
    Ok(CommandOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}
