//! Throwaway PostgreSQL clusters: `initdb` into a temp dir, `pg_ctl start` on
//! a free loopback port, `pg_ctl stop -m immediate` and removal on drop.
//!
//! PostgreSQL refuses to run as root, so as root `initdb`/`pg_ctl` run as the
//! `postgres` OS user (`runuser -u postgres --`) in a dir it owns.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;

use crate::wait::{POLL_INTERVAL, wait_until};
use crate::{
    TestDir, child_pids, file_tail, find_in_path, free_port, is_executable, pid_alive,
    postgres_os_user, process_state, quote_ident, read_log, running_as_root, send_signal,
};

/// Settings every cluster gets; builder settings come after and win.
const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "200"),
    ("max_prepared_transactions", "64"),
];

/// File in the data dir holding the harness's settings, included from
/// postgresql.conf and rewritten before every start.
const SETTINGS_FILE: &str = "flotilla_test.conf";

/// Attempts to find a port nobody grabbed between our check and the bind.
const START_ATTEMPTS: usize = 5;

/// `pg_ctl -w` wait, seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Deadline for one psql invocation.
const PSQL_TIMEOUT: Duration = Duration::from_secs(120);

/// Lines of server log printed when a cluster is dropped during a panic.
const TAIL_ON_PANIC: usize = 50;

/// Paths of the PostgreSQL client and server programs.
#[derive(Debug, Clone)]
pub struct PgBins {
    pub initdb: PathBuf,
    pub pg_ctl: PathBuf,
    pub psql: PathBuf,
}

impl PgBins {
    /// Looks in `$FLOTILLA_PG_BINDIR`, `pg_config --bindir`, the newest
    /// `/usr/lib/postgresql/*/bin` (Debian keeps the server binaries there),
    /// then `$PATH`.
    pub fn locate() -> anyhow::Result<PgBins> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        if let Some(dir) = std::env::var_os("FLOTILLA_PG_BINDIR").filter(|d| !d.is_empty()) {
            dirs.push(dir.into());
        }
        if let Ok(out) = std::process::Command::new("pg_config")
            .arg("--bindir")
            .stderr(Stdio::null())
            .output()
            && out.status.success()
        {
            dirs.push(String::from_utf8_lossy(&out.stdout).trim().into());
        }
        let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                Some((version, entry.path().join("bin")))
            })
            .collect();
        versioned.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
        dirs.extend(versioned.into_iter().map(|(_, dir)| dir));

        let find = |name: &str| -> anyhow::Result<PathBuf> {
            dirs.iter()
                .map(|dir| dir.join(name))
                .find(|path| is_executable(path))
                .or_else(|| find_in_path(name))
                .with_context(|| {
                    format!(
                        "PostgreSQL program `{name}` not found (looked in $FLOTILLA_PG_BINDIR, \
                         `pg_config --bindir`, /usr/lib/postgresql/*/bin, $PATH); install the \
                         PostgreSQL server (e.g. `apt-get install postgresql`) or run \
                         scripts/test.sh"
                    )
                })
        };
        Ok(PgBins {
            initdb: find("initdb")?,
            pg_ctl: find("pg_ctl")?,
            psql: find("psql")?,
        })
    }
}

/// Builder for [`PgCluster`]: extra `-c` style server settings.
#[derive(Debug, Clone, Default)]
pub struct PgClusterBuilder {
    settings: Vec<(String, String)>,
    /// Where the cluster lives (else a fresh dir under the suite's base dir).
    dir: Option<PathBuf>,
    /// The port to listen on (else a free one, tried again when taken).
    port: Option<u16>,
}

impl PgClusterBuilder {
    /// A server setting, e.g. `.setting("max_prepared_transactions", "0")`.
    /// Overrides the harness defaults.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Put the cluster (data dir, socket, log) in `dir`, which must not exist or be
    /// empty; it is removed on drop unless [`PgCluster::keep`] is called.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Listen on `port` (on a host whose rules allow some ports only): taken, the start
    /// fails naming it, rather than trying another.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    pub async fn start(self) -> anyhow::Result<PgCluster> {
        PgCluster::start_with(self.settings, self.dir, self.port).await
    }
}

/// A running PostgreSQL cluster owned by one test. Superuser `postgres`,
/// trust auth, listening on 127.0.0.1 only.
pub struct PgCluster {
    bins: PgBins,
    /// Run server programs through `runuser -u postgres --`.
    as_postgres: bool,
    port: u16,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    settings: Vec<(String, String)>,
    running: bool,
    // Last field: removed after the server is stopped in `drop`.
    dir: TestDir,
}

impl PgCluster {
    /// A cluster with the default settings.
    pub async fn start() -> anyhow::Result<PgCluster> {
        Self::builder().start().await
    }

    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder::default()
    }

    async fn start_with(
        extra_settings: Vec<(String, String)>,
        dir: Option<PathBuf>,
        port: Option<u16>,
    ) -> anyhow::Result<PgCluster> {
        let bins = PgBins::locate()?;
        let as_postgres = running_as_root();
        let dir = match dir {
            Some(path) => TestDir::at(&path)?,
            None => TestDir::new("pg")?,
        };
        if as_postgres {
            let (uid, gid) = postgres_os_user()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("chown postgres {}", dir.path().display()))?;
        }
        let mut settings: Vec<(String, String)> = DEFAULT_SETTINGS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        settings.extend(extra_settings);
        let mut cluster = PgCluster {
            bins,
            as_postgres,
            port: 0,
            data_dir: dir.join("data"),
            socket_dir: dir.path().to_owned(),
            log_path: dir.join("postgres.log"),
            settings,
            running: false,
            dir,
        };
        cluster.initdb().await?;

        let mut last_error = None;
        for attempt in 1..=START_ATTEMPTS {
            cluster.port = port.unwrap_or_else(free_port);
            let log_offset = cluster.log_len();
            match cluster.pg_ctl_start().await {
                Ok(()) => return Ok(cluster),
                Err(err) => {
                    let new_log = cluster.log_since(log_offset);
                    let port_taken = new_log.contains("Address already in use")
                        || new_log.contains("could not create any TCP/IP sockets");
                    if !port_taken {
                        return Err(err);
                    }
                    if let Some(port) = port {
                        return Err(err).context(format!("port {port} is in use"));
                    }
                    eprintln!(
                        "[harness] postgres could not bind port {} (attempt {attempt}/{START_ATTEMPTS}), retrying",
                        cluster.port
                    );
                    last_error = Some(err);
                }
            }
        }
        Err(last_error.expect("at least one attempt")).context(format!(
            "postgres failed to bind a port {START_ATTEMPTS} times"
        ))
    }

    async fn initdb(&self) -> anyhow::Result<()> {
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        self.run_server_program(
            &self.bins.initdb,
            &[
                "-D",
                &data_dir,
                "--auth=trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )
        .await?;
        let conf = self.data_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)
            .with_context(|| format!("reading {}", conf.display()))?;
        text.push_str(&format!(
            "\n# Added by the flotilla test harness.\ninclude_if_exists '{SETTINGS_FILE}'\n"
        ));
        std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
        Ok(())
    }

    fn write_settings(&self) -> anyhow::Result<()> {
        let mut text = String::from("# Written by the flotilla test harness before each start.\n");
        let socket_dir = self.socket_dir.to_string_lossy().into_owned();
        let fixed = [
            ("port".to_owned(), self.port.to_string()),
            ("unix_socket_directories".to_owned(), socket_dir),
        ];
        for (name, value) in fixed.iter().chain(&self.settings) {
            text.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        let path = self.data_dir.join(SETTINGS_FILE);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        if self.as_postgres {
            let (uid, gid) = postgres_os_user()?;
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    async fn pg_ctl_start(&mut self) -> anyhow::Result<()> {
        self.write_settings()?;
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let log_path = self.log_path.to_string_lossy().into_owned();
        let result = self
            .run_server_program(
                &self.bins.pg_ctl,
                &[
                    "start",
                    "-w",
                    "-t",
                    PG_CTL_TIMEOUT_SECS,
                    "-D",
                    &data_dir,
                    "-l",
                    &log_path,
                ],
            )
            .await;
        match result {
            Ok(_) => {
                self.running = true;
                Ok(())
            }
            Err(err) => {
                // pg_ctl may give up while the server still starts up.
                self.kill_leftover_postmaster();
                Err(err.context(format!(
                    "starting postgres on port {}; server log tail:\n{}",
                    self.port,
                    file_tail(&self.log_path, 30)
                )))
            }
        }
    }

    /// Runs initdb/pg_ctl, as the `postgres` user when we are root.
    async fn run_server_program(&self, program: &Path, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = if self.as_postgres {
            let mut cmd = tokio::process::Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd
        } else {
            tokio::process::Command::new(program)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let what = format!("{} {}", program.display(), args.join(" "));
        let out = cmd
            .output()
            .await
            .with_context(|| format!("running {what}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "{what} failed ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    fn run_server_program_blocking(&self, program: &Path, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = if self.as_postgres {
            let mut cmd = std::process::Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd
        } else {
            std::process::Command::new(program)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("PGDATA")
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "{} {} failed: {}",
                program.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The directory holding the data dir, the socket and the server log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `pg_ctl` command that starts this cluster again (after [`PgCluster::keep`]).
    pub fn start_command(&self) -> String {
        let pg_ctl = format!(
            "{} -D {} -l {} start",
            self.bins.pg_ctl.display(),
            self.data_dir.display(),
            self.log_path.display()
        );
        if self.as_postgres {
            format!("runuser -u postgres -- {pg_ctl}")
        } else {
            pg_ctl
        }
    }

    /// Leave the cluster's directory in place when dropped (the server is still
    /// stopped: call [`PgCluster::stop`] first for a clean shutdown).
    pub fn keep(&mut self) {
        self.dir.keep();
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Directory of the unix socket (`.s.PGSQL.PORT`).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    fn log_since(&self, offset: u64) -> String {
        let log = std::fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(log.get(offset as usize..).unwrap_or_default()).into_owned()
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// PID of the postmaster, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let path = self.data_dir.join("postmaster.pid");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (is the server running?)", path.display()))?;
        text.lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .with_context(|| format!("malformed {}", path.display()))
    }

    /// Creates a database owned by `postgres`.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<()> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        )
        .await
        .map(drop)
    }

    /// Runs `sql` through `psql -X -q -At -v ON_ERROR_STOP=1` (fed on stdin,
    /// so several statements are fine) and returns stdout without the final
    /// newline: one line per row, columns separated by `|`.
    pub async fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        self.psql_with_args(db, sql, &[]).await
    }

    async fn psql_with_args(&self, db: &str, sql: &str, extra: &[&str]) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let mut cmd = tokio::process::Command::new(&self.bins.psql);
        cmd.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", db])
            .args(extra)
            .args(["-f", "-"])
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGAPPNAME", "flotilla-test-harness")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let run = async {
            let mut child = cmd.spawn().context("spawning psql")?;
            let mut stdin = child.stdin.take().context("psql stdin")?;
            let sql = sql.to_owned();
            let write = async move {
                let result = stdin.write_all(sql.as_bytes()).await;
                drop(stdin);
                result
            };
            let (write_result, output) = tokio::join!(write, child.wait_with_output());
            let output = output.context("waiting for psql")?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !output.status.success() {
                bail!("psql failed ({}): {}", output.status, stderr.trim());
            }
            write_result.context("writing SQL to psql")?;
            let mut stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            while stdout.ends_with('\n') {
                stdout.pop();
            }
            Ok(stdout)
        };
        tokio::time::timeout(PSQL_TIMEOUT, run)
            .await
            .with_context(|| format!("psql timed out after {PSQL_TIMEOUT:?}"))?
            .with_context(|| format!("psql on {} db {db:?}: {}", self.url(db), abbreviate(sql)))
    }

    /// A single value parsed from psql's text output (`t`/`f` for booleans,
    /// so parse those as `String`, or select `x::int`).
    pub async fn query_scalar<T>(&self, db: &str, sql: &str) -> anyhow::Result<T>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        let out = self.psql(db, sql).await?;
        if out.contains('\n') {
            bail!("expected one value from {}, got:\n{out}", abbreviate(sql));
        }
        out.parse::<T>()
            .map_err(|err| anyhow::anyhow!("parsing {out:?} from {}: {err}", abbreviate(sql)))
    }

    /// Rows of a single query as text (NULL becomes ""). Values may contain
    /// `|` and newlines.
    pub async fn query_rows(&self, db: &str, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
        const FIELD_SEP: &str = "\u{1f}";
        const RECORD_SEP: &str = "\u{1e}";
        let out = self
            .psql_with_args(db, sql, &["-F", FIELD_SEP, "-R", RECORD_SEP])
            .await?;
        Ok(out
            .split(RECORD_SEP)
            .filter(|record| !record.is_empty())
            .map(|record| record.split(FIELD_SEP).map(str::to_owned).collect())
            .collect())
    }

    /// A small sqlx pool on `db`.
    pub async fn pool(&self, db: &str) -> anyhow::Result<sqlx::PgPool> {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&self.url(db))
            .await
            .with_context(|| format!("connecting sqlx to {}", self.url(db)))
    }

    /// Fast shutdown (`pg_ctl stop -m fast`).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        self.run_server_program(
            &self.bins.pg_ctl,
            &[
                "stop",
                "-w",
                "-t",
                PG_CTL_TIMEOUT_SECS,
                "-m",
                "fast",
                "-D",
                &data_dir,
            ],
        )
        .await?;
        self.running = false;
        Ok(())
    }

    /// SIGKILLs the postmaster (a crash, for fault tests) and waits until it
    /// and its backends are gone. Recovery happens on [`PgCluster::restart`].
    pub async fn kill_postmaster(&mut self) -> anyhow::Result<()> {
        let pid = self.postmaster_pid()?;
        let children = child_pids(pid);
        send_signal(pid, libc::SIGKILL).context("killing the postmaster")?;
        self.running = false;
        wait_until(
            "the killed postmaster to die",
            Duration::from_secs(10),
            move || async move { Ok(!pid_alive(pid)) },
        )
        .await?;
        // Backends notice the postmaster's death on their own; the restarted
        // server refuses to start while they hold the shared memory.
        let children = &children;
        let orphans_gone = wait_until(
            "orphaned backends to exit",
            Duration::from_secs(10),
            move || async move { Ok(children.iter().all(|&child| !pid_alive(child))) },
        )
        .await;
        if orphans_gone.is_err() {
            for &child in children {
                let _ = send_signal(child, libc::SIGKILL);
            }
            wait_until(
                "orphaned backends to die",
                Duration::from_secs(10),
                move || async move { Ok(children.iter().all(|&child| !pid_alive(child))) },
            )
            .await?;
        }
        self.remove_lock_files_of_zombie(pid);
        Ok(())
    }

    /// If the dead postmaster lingers as a zombie (a PID 1 that never reaps
    /// orphans, as in some containers), `kill(pid, 0)` still succeeds and a
    /// new postmaster would take its lock files as live: remove them.
    fn remove_lock_files_of_zombie(&self, pid: u32) {
        if process_state(pid) == Some('Z') {
            let _ = std::fs::remove_file(self.data_dir.join("postmaster.pid"));
            let _ =
                std::fs::remove_file(self.socket_dir.join(format!(".s.PGSQL.{}.lock", self.port)));
        }
    }

    /// Starts the server again on the same port and data dir (stopping it
    /// first if it runs). After [`PgCluster::kill_postmaster`] this runs
    /// crash recovery.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.running {
            self.stop().await?;
        }
        // Retries while leftovers of a crashed server are still going away.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let offset = self.log_len();
            let Err(err) = self.pg_ctl_start().await else {
                return Ok(());
            };
            let log = self.log_since(offset);
            let transient =
                log.contains("lock file") || log.contains("pre-existing shared memory block");
            if !transient || Instant::now() >= deadline {
                return Err(err.context("restarting postgres"));
            }
            tokio::time::sleep(4 * POLL_INTERVAL).await;
        }
    }

    /// Best effort: SIGKILL a postmaster that `pg_ctl` left behind.
    fn kill_leftover_postmaster(&self) {
        if let Ok(pid) = self.postmaster_pid()
            && pid_alive(pid)
        {
            let _ = send_signal(pid, libc::SIGKILL);
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "[harness] postgres on port {} log {}, last {TAIL_ON_PANIC} lines:\n{}\n[harness] end of postgres log",
                self.port,
                self.log_path.display(),
                file_tail(&self.log_path, TAIL_ON_PANIC)
            );
        }
        if self.data_dir.join("postmaster.pid").exists() {
            let data_dir = self.data_dir.to_string_lossy().into_owned();
            let stopped = self.run_server_program_blocking(
                &self.bins.pg_ctl,
                &["stop", "-w", "-t", "30", "-m", "immediate", "-D", &data_dir],
            );
            if stopped.is_err() {
                self.kill_leftover_postmaster();
            }
        }
    }
}

fn abbreviate(sql: &str) -> String {
    const MAX: usize = 200;
    let sql = sql.trim();
    match sql.char_indices().nth(MAX) {
        Some((idx, _)) => format!("{:?}...", &sql[..idx]),
        None => format!("{sql:?}"),
    }
}
