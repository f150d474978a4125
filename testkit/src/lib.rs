//! What Flotilla's test suites share (the e2e suite, the agent's and the
//! coordinator's integration tests): throwaway etcd clusters ([`etcd`]) and
//! PostgreSQL clusters ([`postgres`]) on free loopback ports, child processes
//! with captured logs ([`process`]), polling waits ([`wait`]), a tiny HTTP
//! client ([`http`]), throwaway certificate authorities ([`tls`]) and temp dirs.
//!
//! Rules for tests built on it: never sleep a fixed time, wait for a condition
//! with [`wait_until`]; get every listening port from [`free_port`].
//!
//! Environment knobs:
//! - `FLOTILLA_KEEP_TEST_DIRS=1`: keep temp dirs (data dirs, logs) after tests.
//! - `FLOTILLA_TEST_TMPDIR`: base dir for temp dirs (default
//!   `/tmp/flotilla-tests` as root, `$TMPDIR/flotilla-tests` otherwise). As
//!   root it must be traversable by the `postgres` user.
//! - `FLOTILLA_PG_BINDIR`: directory holding `initdb`, `pg_ctl`, `psql`.
//! - `FLOTILLA_ETCD_BIN`: the `etcd` binary.
//! - `FLOTILLA_TEST_NO_SKIP=1` (set by `scripts/test.sh` when it runs the whole suite, as CI
//!   does): a test that would skip for want of a server fails instead ([`skip`]).

pub mod etcd;
pub mod http;
pub mod postgres;
pub mod process;
pub mod tls;
pub mod wait;

pub use self::{
    etcd::{Etcd, EtcdCluster},
    postgres::{PgCluster, PgClusterBuilder},
    process::ManagedProcess,
    wait::{wait_for, wait_until},
};

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, bail};
use rand::Rng;

/// A test that cannot run here (no PostgreSQL or etcd configured for it) says why and passes,
/// except where the whole suite runs (`scripts/test.sh` with no arguments, which CI runs): there
/// `FLOTILLA_TEST_NO_SKIP` is set and the skip is a failure, so a server missing from CI's
/// machine cannot pass as green.
pub fn skip(test: &str, why: &str) {
    if std::env::var_os("FLOTILLA_TEST_NO_SKIP").is_some_and(|v| !v.is_empty()) {
        panic!("[{test}] cannot run: {why} (FLOTILLA_TEST_NO_SKIP is set: nothing may be skipped)");
    }
    println!("[{test}] skipped: {why}");
}

/// Ports handed out by [`free_port`] in this process; tests run in parallel
/// threads and must not get the same port twice.
static HANDED_OUT_PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A free loopback TCP port in 15000..32000 (below the kernel's range for
/// outgoing connections), never returned twice in this process.
pub fn free_port() -> u16 {
    let mut used = HANDED_OUT_PORTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut rng = rand::rng();
    for _ in 0..10_000 {
        let port: u16 = rng.random_range(15000..32000);
        if used.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            used.insert(port);
            return port;
        }
    }
    panic!("no free loopback port found in 15000..32000");
}

/// Whether temp dirs should survive the test (`FLOTILLA_KEEP_TEST_DIRS`).
pub fn keep_test_dirs() -> bool {
    std::env::var_os("FLOTILLA_KEEP_TEST_DIRS").is_some_and(|v| !v.is_empty() && v != "0")
}

pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Base directory for all temp dirs of the suite, created on first use.
pub fn test_base_dir() -> anyhow::Result<PathBuf> {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    if let Some(base) = BASE.get() {
        return Ok(base.clone());
    }
    let base = match std::env::var_os("FLOTILLA_TEST_TMPDIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        // As root, PostgreSQL runs as `postgres`, which must traverse every
        // parent of its data dir: $TMPDIR may point somewhere private.
        _ if running_as_root() => PathBuf::from("/tmp/flotilla-tests"),
        _ => std::env::temp_dir().join("flotilla-tests"),
    };
    std::fs::create_dir_all(&base)
        .with_context(|| format!("creating test base dir {}", base.display()))?;
    // Shared by everyone (like /tmp); fails harmlessly if someone else owns it.
    let _ = std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777));
    Ok(BASE.get_or_init(|| base).clone())
}

/// A fresh directory under [`test_base_dir`] (mode 0755), removed on drop
/// unless `FLOTILLA_KEEP_TEST_DIRS` is set.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
    /// Left in place on drop (the quickstart's `--keep`), whatever the environment says.
    keep: bool,
}

impl TestDir {
    pub fn new(prefix: &str) -> anyhow::Result<TestDir> {
        let base = test_base_dir()?;
        let path = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir_in(&base)
            .with_context(|| format!("creating temp dir in {}", base.display()))?
            .keep();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", path.display()))?;
        Ok(TestDir { path, keep: false })
    }

    /// `path` itself (created, mode 0755), which must not exist or be empty: a
    /// directory the caller named, removed on drop like the others.
    pub fn at(path: &Path) -> anyhow::Result<TestDir> {
        if path.exists() {
            let mut entries =
                std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?;
            if entries.next().is_some() {
                anyhow::bail!("{} exists and is not empty", path.display());
            }
        }
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        let path =
            std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", path.display()))?;
        Ok(TestDir { path, keep: false })
    }

    /// Leave the directory in place on drop.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if self.keep {
            // The owner said so and tells its user where the directory is.
        } else if keep_test_dirs() {
            eprintln!("[harness] keeping {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// uid and gid of the `postgres` OS user (needed when running as root).
pub fn postgres_os_user() -> anyhow::Result<(u32, u32)> {
    static IDS: OnceLock<Result<(u32, u32), String>> = OnceLock::new();
    let ids = IDS.get_or_init(|| {
        let id = |flag: &str| -> Result<u32, String> {
            let out = std::process::Command::new("id")
                .args([flag, "postgres"])
                .output()
                .map_err(|e| format!("running `id {flag} postgres`: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "there is no `postgres` OS user (`id {flag} postgres`: {}); PostgreSQL \
                     refuses to run as root, so tests running as root need it (install the \
                     postgresql package, or run `useradd -r postgres`)",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .map_err(|e| format!("parsing `id {flag} postgres`: {e}"))
        };
        Ok((id("-u")?, id("-g")?))
    });
    ids.clone().map_err(anyhow::Error::msg)
}

/// Finds `name` in `$PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

pub fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Sends `signal` to `pid`.
pub fn send_signal(pid: u32, signal: libc::c_int) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } != 0 {
        bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The state letter of a process from `/proc/PID/stat` (`R`, `S`, `T`, `Z`,
/// ...), or `None` if there is no such process.
pub fn process_state(pid: u32) -> Option<char> {
    stat_state(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The state letter of a `/proc/.../stat` line.
fn stat_state(stat: &str) -> Option<char> {
    // "pid (comm) S ppid ..."; comm may itself contain spaces and parens.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.trim_start().chars().next()
}

/// Whether every thread of `pid` is stopped (SIGSTOP) or gone, from
/// `/proc/PID/task`; true where there is no `/proc` to ask.
pub fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.filter_map(Result::ok).all(|task| {
        let state = std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| stat_state(&stat));
        matches!(state, None | Some('T' | 't' | 'Z' | 'X' | 'x'))
    })
}

/// Whether `pid` is a live process. Zombies count as dead: PID 1 in some
/// containers never reaps orphans, so a dead postmaster may linger as one.
pub fn pid_alive(pid: u32) -> bool {
    if Path::new("/proc/self/stat").exists() {
        return !matches!(process_state(pid), None | Some('Z') | Some('X') | Some('x'));
    }
    send_signal(pid, 0).is_ok()
}

/// Direct children of `pid` (from `/proc`).
pub fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| {
                    let after_comm = stat[stat.rfind(')')? + 1..].to_owned();
                    after_comm.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The text of a log file so far (invalid UTF-8 replaced; empty if unreadable).
pub fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last `n` lines of the file at `path` (empty if unreadable).
pub fn file_tail(path: &Path, n: usize) -> String {
    tail_lines(&read_log(path), n)
}

/// Quotes a string for use as an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string for use as an SQL literal.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}
