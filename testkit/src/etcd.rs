//! Throwaway etcd clusters (one or more members) on free loopback ports below
//! 32768, retried with fresh ports when a member cannot bind, and waited on
//! until `/health` says so.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::ManagedProcess;
use crate::wait::{fatal, wait_until};
use crate::{
    TestDir, find_in_path, free_port, http, is_executable, pid_alive, read_log, tail_lines,
};

/// How long a fresh cluster (or a restarted member) may take to be healthy.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts with fresh ports if a member could not bind.
const START_ATTEMPTS: usize = 3;

/// The etcd binary: `$FLOTILLA_ETCD_BIN`, `$PATH`, `/usr/bin`, `/usr/local/bin`.
pub fn etcd_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("FLOTILLA_ETCD_BIN").filter(|b| !b.is_empty()) {
        return Ok(bin.into());
    }
    find_in_path("etcd")
        .or_else(|| {
            ["/usr/bin/etcd", "/usr/local/bin/etcd"]
                .iter()
                .map(PathBuf::from)
                .find(|path| is_executable(path))
        })
        .context(
            "etcd not found (looked at $FLOTILLA_ETCD_BIN, $PATH, /usr/bin, /usr/local/bin); \
             install it (e.g. `apt-get install etcd-server`) or run scripts/test.sh",
        )
}

/// Whether the etcd member serving clients at `addr` reports itself healthy
/// on `/health` (`{"health":"true"}`: it has a leader and can serve reads).
pub async fn etcd_health(addr: SocketAddr) -> anyhow::Result<bool> {
    let response = http::get(addr, "/health").await?;
    Ok(response.status == 200 && response.body.contains(r#""health":"true""#))
}

/// One etcd member: its ports, its dir (data and `etcd.log`) and its process
/// (absent while killed or stopped).
pub struct EtcdMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// `https` when clients must use TLS ([`EtcdTls`]), else `http`.
    scheme: &'static str,
    /// Where `/health` is served over plain HTTP: the client port, or under TLS a
    /// metrics port of its own.
    health_port: u16,
    args: Vec<String>,
    process: Option<ManagedProcess>,
    // Last field: removed after the process is killed.
    dir: TestDir,
}

impl EtcdMember {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port))
    }

    /// `http://127.0.0.1:PORT` (`https://` under TLS)
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
    }

    /// Where `/health` answers over plain HTTP.
    pub fn health_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.health_port))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// The member's log across all its runs.
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ManagedProcess::pid)
    }

    fn spawn(&mut self, bin: &PathBuf) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin);
        cmd.args(&self.args).current_dir(self.dir.path());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        let process = ManagedProcess::spawn(cmd, &format!("etcd {}", self.name), &self.log_path())?;
        self.process = Some(process);
        Ok(())
    }

    fn process(&self) -> anyhow::Result<&ManagedProcess> {
        self.process
            .as_ref()
            .with_context(|| format!("etcd member {} is not running", self.name))
    }

    async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let pid = self.process()?.pid();
        let addr = self.health_addr();
        let what = format!(
            "etcd member {} ({}) to be healthy",
            self.name,
            self.endpoint()
        );
        wait_until(&what, timeout, move || async move {
            if !pid_alive(pid) {
                return Err(fatal(anyhow::anyhow!("etcd exited")));
            }
            etcd_health(addr).await
        })
        .await
        .with_context(|| {
            format!(
                "log {}, last 30 lines:\n{}",
                self.log_path().display(),
                tail_lines(&self.log(), 30)
            )
        })
    }
}

/// An etcd cluster of N members, each on its own client and peer port.
pub struct EtcdCluster {
    bin: PathBuf,
    members: Vec<EtcdMember>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one is healthy.
    pub async fn start(size: usize) -> anyhow::Result<EtcdCluster> {
        Self::start_with_args(size, &[]).await
    }

    /// Like [`EtcdCluster::start`], with extra flags for every member (e.g.
    /// `--heartbeat-interval=50`, `--election-timeout=500`).
    pub async fn start_with_args(size: usize, extra_args: &[&str]) -> anyhow::Result<EtcdCluster> {
        Self::start_with_options(size, extra_args, None).await
    }

    /// Like [`EtcdCluster::start_with_args`], clients served over TLS with client
    /// certificates required (`--client-cert-auth`) when `tls` is given.
    pub async fn start_with_options(
        size: usize,
        extra_args: &[&str],
        tls: Option<&EtcdTls>,
    ) -> anyhow::Result<EtcdCluster> {
        if size == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        let bin = etcd_binary()?;
        let mut last_error = None;
        for attempt in 1..=START_ATTEMPTS {
            let mut cluster = EtcdCluster {
                bin: bin.clone(),
                members: Self::plan_members(size, extra_args, tls)?,
            };
            for i in 0..size {
                let bin = cluster.bin.clone();
                cluster.members[i].spawn(&bin)?;
            }
            let mut result = Ok(());
            for member in &cluster.members {
                result = member.wait_healthy(ETCD_START_TIMEOUT).await;
                if result.is_err() {
                    break;
                }
            }
            let Err(err) = result else {
                return Ok(cluster);
            };
            let port_taken = cluster
                .members
                .iter()
                .any(|member| member.log().contains("address already in use"));
            if !port_taken {
                return Err(err);
            }
            eprintln!(
                "[harness] an etcd member could not bind its port (attempt {attempt}/{START_ATTEMPTS}), retrying"
            );
            last_error = Some(err);
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn plan_members(
        size: usize,
        extra_args: &[&str],
        tls: Option<&EtcdTls>,
    ) -> anyhow::Result<Vec<EtcdMember>> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let token = format!("flotilla-test-{:016x}", rand::random::<u64>());
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        ports
            .iter()
            .enumerate()
            .map(|(i, &(client_port, peer_port))| {
                let name = format!("m{i}");
                let dir = TestDir::new(&format!("etcd-{name}"))?;
                let client_url = format!("{scheme}://127.0.0.1:{client_port}");
                let peer_url = format!("http://127.0.0.1:{peer_port}");
                let mut args: Vec<String> = [
                    "--name",
                    &name,
                    "--data-dir",
                    &dir.join("data").to_string_lossy(),
                    "--listen-client-urls",
                    &client_url,
                    "--advertise-client-urls",
                    &client_url,
                    "--listen-peer-urls",
                    &peer_url,
                    "--initial-advertise-peer-urls",
                    &peer_url,
                    "--initial-cluster",
                    &initial_cluster,
                    "--initial-cluster-token",
                    &token,
                    "--initial-cluster-state",
                    "new",
                    "--logger",
                    "zap",
                    "--log-outputs",
                    "stderr",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let mut health_port = client_port;
                if let Some(tls) = tls {
                    health_port = free_port();
                    args.extend([
                        "--cert-file".to_string(),
                        tls.cert.to_string_lossy().into_owned(),
                        "--key-file".into(),
                        tls.key.to_string_lossy().into_owned(),
                        "--trusted-ca-file".into(),
                        tls.ca.to_string_lossy().into_owned(),
                        "--client-cert-auth".into(),
                        "--listen-metrics-urls".into(),
                        format!("http://127.0.0.1:{health_port}"),
                    ]);
                }
                args.extend(extra_args.iter().map(|s| s.to_string()));
                Ok(EtcdMember {
                    name,
                    client_port,
                    peer_port,
                    scheme,
                    health_port,
                    args,
                    process: None,
                    dir,
                })
            })
            .collect()
    }

    /// How many members (at least one: [`EtcdCluster::start`] refuses zero, so
    /// there is no `is_empty`).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn member(&self, i: usize) -> &EtcdMember {
        &self.members[i]
    }

    /// Client URLs of all members, `http://127.0.0.1:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].endpoint()
    }

    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.members[i].client_addr()
    }

    /// Whether member `i` answers `/health` with `"health":"true"`.
    pub async fn is_healthy(&self, i: usize) -> bool {
        etcd_health(self.members[i].health_addr())
            .await
            .unwrap_or(false)
    }

    /// Waits until member `i` is healthy; fails early if it exits.
    pub async fn wait_healthy(&self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        self.members[i].wait_healthy(timeout).await
    }

    /// SIGKILLs member `i` (a crash); its data dir is kept for a restart.
    pub fn kill_member(&mut self, i: usize) -> anyhow::Result<()> {
        let member = &mut self.members[i];
        if let Some(mut process) = member.process.take() {
            process.kill()?;
        }
        Ok(())
    }

    /// Graceful shutdown of member `i` (SIGTERM, then wait).
    pub async fn stop_member(&mut self, i: usize) -> anyhow::Result<()> {
        let member = &mut self.members[i];
        if let Some(mut process) = member.process.take() {
            process.terminate().await?;
        }
        Ok(())
    }

    /// SIGSTOP member `i`: it hangs with its sockets open.
    pub fn pause_member(&self, i: usize) -> anyhow::Result<()> {
        self.members[i].process()?.stop()
    }

    /// SIGCONT member `i` after [`EtcdCluster::pause_member`].
    pub fn resume_member(&self, i: usize) -> anyhow::Result<()> {
        self.members[i].process()?.cont()
    }

    /// Starts member `i` again on its ports and data dir (killing it first if
    /// it runs) and waits until it is healthy.
    pub async fn restart_member(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill_member(i)?;
        let bin = self.bin.clone();
        self.members[i].spawn(&bin)?;
        self.members[i].wait_healthy(ETCD_START_TIMEOUT).await
    }
}

/// TLS for etcd's clients: its server certificate and the CA that signs the clients'.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A single-member etcd.
pub struct Etcd {
    cluster: EtcdCluster,
}

impl Etcd {
    /// A single-member etcd serving clients over TLS only, with client certificates
    /// signed by `tls.ca` required.
    pub async fn start_tls(tls: &EtcdTls) -> anyhow::Result<Etcd> {
        Ok(Etcd {
            cluster: EtcdCluster::start_with_options(1, &[], Some(tls)).await?,
        })
    }

    /// Turns etcd's user/password auth on: a `root` user (etcd requires one before auth
    /// can be enabled) and `user` with `password`, allowed to read and write every key
    /// under `prefix`. Connects over TLS as `client` (signed by `ca`) when given.
    pub async fn enable_auth(
        &self,
        tls: Option<(&std::path::Path, &crate::tls::CertFiles)>,
        user: &str,
        password: &str,
        prefix: &str,
    ) -> anyhow::Result<()> {
        use etcd_client::{Client, Permission};
        let options = Self::admin_options(tls)?;
        let mut c = Client::connect([self.endpoint()], Some(options)).await?;
        c.user_add("root", format!("{password}-root"), None).await?;
        c.user_grant_role("root", "root").await?;
        c.role_add("flotilla").await?;
        c.role_grant_permission("flotilla", Permission::read_write(prefix).with_prefix())
            .await?;
        c.user_add(user, password, None).await?;
        c.user_grant_role(user, "flotilla").await?;
        c.auth_enable().await.context("enabling etcd auth")?;
        Ok(())
    }

    /// Deletes `key` (no TLS, no auth), as etcd's data lost or restored from an older
    /// snapshot would; returns how many keys went.
    pub async fn delete_key(&self, key: &str) -> anyhow::Result<i64> {
        let mut c = etcd_client::Client::connect([self.endpoint()], None).await?;
        Ok(c.delete(key, None).await?.deleted())
    }

    /// Writes `value` into the leader key of election `name`, its lease kept (no TLS, no
    /// auth), as a mis-set `--advertise` or someone with write access to etcd would leave
    /// it; returns the key.
    pub async fn overwrite_leader(&self, name: &str, value: &str) -> anyhow::Result<String> {
        let mut c = etcd_client::Client::connect([self.endpoint()], None).await?;
        let leader = c.leader(name).await?;
        let key = leader
            .kv()
            .map(|kv| kv.key().to_vec())
            .context("the election has no leader")?;
        c.put(
            key.clone(),
            value,
            Some(etcd_client::PutOptions::new().with_ignore_lease()),
        )
        .await?;
        Ok(String::from_utf8_lossy(&key).into_owned())
    }

    /// Makes every auth token etcd has issued invalid, as their expiry would: auth turned
    /// off and on again by `root` (whose password [`Etcd::enable_auth`] made from `password`).
    /// A client holding a token is refused with `invalid auth token` on its next request.
    pub async fn invalidate_auth_tokens(
        &self,
        tls: Option<(&std::path::Path, &crate::tls::CertFiles)>,
        password: &str,
    ) -> anyhow::Result<()> {
        let options = Self::admin_options(tls)?.with_user("root", format!("{password}-root"));
        let mut c = etcd_client::Client::connect([self.endpoint()], Some(options)).await?;
        c.auth_disable().await.context("disabling etcd auth")?;
        // a new client: the one above holds a token that the disable just voided
        let mut c =
            etcd_client::Client::connect([self.endpoint()], Some(Self::admin_options(tls)?))
                .await?;
        c.auth_enable().await.context("enabling etcd auth again")?;
        Ok(())
    }

    /// Connection options for the test's own administrative client.
    fn admin_options(
        tls: Option<(&std::path::Path, &crate::tls::CertFiles)>,
    ) -> anyhow::Result<etcd_client::ConnectOptions> {
        use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
        let mut options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
        if let Some((ca, client)) = tls {
            options = options.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
                    .identity(Identity::from_pem(
                        std::fs::read(&client.cert)?,
                        std::fs::read(&client.key)?,
                    )),
            );
        }
        Ok(options)
    }

    pub async fn start_single() -> anyhow::Result<Etcd> {
        Ok(Etcd {
            cluster: EtcdCluster::start(1).await?,
        })
    }

    /// A single-member etcd for `test`, or `None` after a note when there is
    /// no etcd binary (suites that run without etcd skip such tests and
    /// pass). Panics if a binary is there but etcd does not start.
    pub async fn start_or_skip(test: &str) -> Option<Etcd> {
        if let Err(err) = etcd_binary() {
            crate::skip(test, &format!("{err:#}"));
            return None;
        }
        match Etcd::start_single().await {
            Ok(etcd) => Some(etcd),
            Err(err) => panic!("[{test}] etcd did not start: {err:#}"),
        }
    }

    /// An etcd of `members` members behind the same handle, each with
    /// `extra_args` (the single-member methods act on member 0);
    /// [`Etcd::cluster_mut`] kills or stops the others.
    pub async fn start_members(members: usize, extra_args: &[&str]) -> anyhow::Result<Etcd> {
        Ok(Etcd {
            cluster: EtcdCluster::start_with_args(members, extra_args).await?,
        })
    }

    pub fn cluster_mut(&mut self) -> &mut EtcdCluster {
        &mut self.cluster
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        self.cluster.endpoint(0)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.cluster.endpoints()
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.cluster.client_addr(0)
    }

    pub fn port(&self) -> u16 {
        self.cluster.member(0).client_port()
    }

    pub async fn is_healthy(&self) -> bool {
        self.cluster.is_healthy(0).await
    }

    pub fn log(&self) -> String {
        self.cluster.member(0).log()
    }

    pub fn pid(&self) -> Option<u32> {
        self.cluster.member(0).pid()
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.cluster.kill_member(0)
    }

    /// Graceful shutdown (SIGTERM, then wait).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.cluster.stop_member(0).await
    }

    /// SIGSTOP.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.cluster.pause_member(0)
    }

    /// SIGCONT.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.cluster.resume_member(0)
    }

    /// Starts again on the same port and data dir; waits until healthy.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.cluster.restart_member(0).await
    }

    pub fn cluster(&self) -> &EtcdCluster {
        &self.cluster
    }
}
